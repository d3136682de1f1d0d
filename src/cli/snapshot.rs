//! `shaper snapshot`: the live connections and their processes, as a table, JSON or RON.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::table::{or_dash, render};
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
        snapshot.to_ron()
    } else {
        format_table(&snapshot)
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// One line per connection, columns aligned.
pub fn format_table(snapshot: &Snapshot) -> String {
    let mut rows: Vec<[String; 10]> = snapshot
        .connections
        .iter()
        .map(|c| {
            let s = &c.socket;
            let p = snapshot.owner_process(c);
            let bytes = |b: Option<u64>| or_dash(b.map(|b| Size::from_bytes(b).human()));
            [
                s.proto.to_string(),
                s.local.to_string(),
                s.remote.to_string(),
                s.state.to_string(),
                bytes(s.bytes_up),
                bytes(s.bytes_down),
                or_dash(c.owner.as_ref().map(|o| o.pid)),
                or_dash(p.map(|p| &p.name)),
                or_dash(p.map(|p| p.user.clone().unwrap_or_else(|| p.uid.to_string()))),
                or_dash(p.and_then(|p| p.unit.as_ref())),
            ]
        })
        .collect();
    rows.sort();
    render(
        [
            "PROTO", "LOCAL", "REMOTE", "STATE", "UP", "DOWN", "PID", "PROCESS", "USER", "UNIT",
        ],
        &rows,
    )
}
