//! `shaper snapshot`: the live connections and their processes, as a table, JSON or RON.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::process::{ProcessTable, Snapshot};
use crate::scan::{self, Backend};
use crate::units::Size;

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Print JSON (one object: connections and processes)
    #[arg(long, conflicts_with = "ron")]
    pub json: bool,
    /// Print RON, the fixture format `shaper simulate --snapshot` reads
    #[arg(long)]
    pub ron: bool,
    /// Where sockets are read from
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub scanner: Backend,
}

pub fn run(args: &SnapshotArgs) -> anyhow::Result<ExitCode> {
    let mut source = scan::open(args.scanner)?;
    let sockets = source.scan().context("scanning sockets")?;
    let mut table = ProcessTable::new();
    table.update(&sockets);
    let snapshot = table.snapshot(sockets);
    let text = if args.json {
        serde_json::to_string_pretty(&snapshot)? + "\n"
    } else if args.ron {
        to_ron(&snapshot)?
    } else {
        format_table(&snapshot)
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// The RON form of a snapshot (also what `simulate` parses).
pub fn to_ron(snapshot: &Snapshot) -> anyhow::Result<String> {
    let pretty = ron::ser::PrettyConfig::new()
        .struct_names(false)
        .compact_arrays(true);
    Ok(ron::ser::to_string_pretty(snapshot, pretty)? + "\n")
}

/// One line per connection, columns aligned.
pub fn format_table(snapshot: &Snapshot) -> String {
    let header = [
        "PROTO", "LOCAL", "REMOTE", "STATE", "UP", "DOWN", "PID", "PROCESS", "USER", "UNIT",
    ];
    let dash = || "-".to_string();
    let mut rows: Vec<[String; 10]> = snapshot
        .connections
        .iter()
        .map(|c| {
            let s = &c.socket;
            let p = snapshot.owner_process(c);
            let bytes = |b: Option<u64>| b.map_or_else(dash, |b| Size::from_bytes(b).human());
            [
                s.proto.to_string(),
                s.local.to_string(),
                s.remote.to_string(),
                s.state.to_string(),
                bytes(s.bytes_up),
                bytes(s.bytes_down),
                c.owner.as_ref().map_or_else(dash, |o| o.pid.to_string()),
                p.map_or_else(dash, |p| p.name.clone()),
                p.and_then(|p| p.user.clone())
                    .unwrap_or_else(|| p.map_or_else(dash, |p| p.uid.to_string())),
                p.and_then(|p| p.unit.clone()).unwrap_or_else(dash),
            ]
        })
        .collect();
    rows.sort();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, w) in cells.zip(widths) {
            let _ = write!(text, "{cell:<w$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}
