//! `shaper usage`: the usage history (`history.ron`) and the current periods (`usage.ron`) as a
//! table with a bar per row. Reads the files; needs no daemon.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::account::history::period_start;
use crate::account::{Accounting, Period, Usage, UsageKey, period_id};
use crate::units::Size;

/// What rows stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum By {
    /// One row per period: the whole interface
    Link,
    /// One row per process name, summed over the periods shown
    Process,
    /// One row per user
    User,
    /// One row per class
    Class,
}

/// Period lengths with a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HistoryPeriod {
    Hour,
    Day,
    Month,
}

impl From<HistoryPeriod> for Period {
    fn from(p: HistoryPeriod) -> Period {
        match p {
            HistoryPeriod::Hour => Period::Hour,
            HistoryPeriod::Day => Period::Day,
            HistoryPeriod::Month => Period::Month,
        }
    }
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// What each row is: a period of the whole interface (link), or a process, user or class
    /// name summed over the periods shown
    #[arg(long, value_enum, default_value = "link")]
    pub by: By,
    /// Period length: hour (last 48 kept), day (400) or month (36)
    #[arg(long, value_enum, default_value = "day")]
    pub period: HistoryPeriod,
    /// Show periods from the one containing DATE (YYYY-MM-DD or "YYYY-MM-DD HH:MM", local
    /// time) [default: every kept period with --by link; the current one otherwise]
    #[arg(long, value_name = "DATE", value_parser = parse_since)]
    pub since: Option<jiff::civil::DateTime>,
    /// Print JSON (bytes as integers)
    #[arg(long)]
    pub json: bool,
    /// Directory of usage.ron and history.ron [default: the configured state_dir]
    #[arg(long, value_name = "DIR", value_parser = super::path_arg)]
    pub state_dir: Option<std::path::PathBuf>,
}

fn parse_since(text: &str) -> Result<jiff::civil::DateTime, String> {
    text.parse::<jiff::civil::DateTime>()
        .or_else(|_| text.parse::<jiff::civil::Date>().map(|d| d.at(0, 0, 0, 0)))
        .map_err(|_| format!("{text:?} is not a date: write YYYY-MM-DD or \"YYYY-MM-DD HH:MM\""))
}

#[derive(Debug, Serialize)]
struct Row {
    /// The period id (`--by link`) or the name.
    name: String,
    up: u64,
    down: u64,
    total: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    by: String,
    period: String,
    /// The ids of the periods summed, oldest first.
    periods: Vec<String>,
    rows: Vec<Row>,
}

fn row(name: String, u: Usage) -> Row {
    Row {
        name,
        up: u.up.bytes(),
        down: u.down.bytes(),
        total: u.total(),
    }
}

/// The rows for `args` from the saved state at `now`.
fn report(accounting: &Accounting, args: &UsageArgs, now: &jiff::Zoned, msd: u8) -> Report {
    let period = Period::from(args.period);
    let since = match args.since {
        Some(since) => since.to_zoned(now.time_zone().clone()).ok(),
        None if args.by == By::Link => None,
        None => Some(now.clone()),
    };
    // From the start of the period containing `since`.
    let from = since.and_then(|s| period_start(period, &period_id(period, &s, msd)));
    let periods: Vec<_> = accounting
        .periods(period)
        .into_iter()
        .filter(|(id, _)| from.is_none_or(|f| period_start(period, id).is_some_and(|s| s >= f)))
        .collect();
    let rows = if args.by == By::Link {
        periods
            .iter()
            .map(|(id, usage)| {
                let u = usage.get(&UsageKey::Link).copied().unwrap_or_default();
                row(id.to_string(), u)
            })
            .collect()
    } else {
        let mut sums: BTreeMap<&str, Usage> = BTreeMap::new();
        for (_, usage) in &periods {
            for (key, u) in *usage {
                let name = match (args.by, key) {
                    (By::Process, UsageKey::Process(n))
                    | (By::User, UsageKey::User(n))
                    | (By::Class, UsageKey::Class(n)) => n.as_str(),
                    // Bytes on the link no process was charged for: a line of their own, so
                    // the processes' lines add up to the link.
                    (By::Process | By::User, UsageKey::Unattributed) => "(unattributed)",
                    _ => continue,
                };
                let sum = sums.entry(name).or_default();
                sum.up = Size::from_bytes(sum.up.bytes().saturating_add(u.up.bytes()));
                sum.down = Size::from_bytes(sum.down.bytes().saturating_add(u.down.bytes()));
            }
        }
        let mut rows: Vec<Row> = sums
            .into_iter()
            .map(|(name, u)| row(name.to_string(), u))
            .collect();
        rows.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.name.cmp(&b.name)));
        rows
    };
    Report {
        by: format!("{:?}", args.by).to_lowercase(),
        period: period.to_string(),
        periods: periods.iter().map(|(id, _)| id.to_string()).collect(),
        rows,
    }
}

/// A bar of `width` cells for `value` out of `max`: eighth blocks on a terminal, `#` otherwise.
fn bar(value: u64, max: u64, width: usize, unicode: bool) -> String {
    if max == 0 {
        return String::new();
    }
    let eighths = (value as u128 * width as u128 * 8 / max as u128) as usize;
    if !unicode {
        return "#".repeat(eighths / 8);
    }
    const PARTS: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];
    let mut out = "█".repeat(eighths / 8);
    out.push_str(PARTS[eighths % 8]);
    out
}

fn render(report: &Report, unicode: bool) -> String {
    let max = report.rows.iter().map(|r| r.total).max().unwrap_or(0);
    let first = if report.by == "link" {
        report.period.to_uppercase()
    } else {
        report.by.to_uppercase()
    };
    let rows: Vec<[String; 5]> = report
        .rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                Size::from_bytes(r.up).human(),
                Size::from_bytes(r.down).human(),
                Size::from_bytes(r.total).human(),
                bar(r.total, max, 20, unicode),
            ]
        })
        .collect();
    let mut out = String::new();
    if report.by != "link" {
        match (report.periods.first(), report.periods.last()) {
            (Some(a), Some(b)) if a != b => out.push_str(&format!("{a} to {b}\n")),
            (Some(a), _) => out.push_str(&format!("{a}\n")),
            _ => {}
        }
    }
    if report.rows.is_empty() {
        out.push_str("no usage recorded for these periods\n");
        return out;
    }
    out.push_str(&super::table::render(
        [&first, "UP", "DOWN", "TOTAL", ""],
        &rows,
    ));
    out
}

pub fn run(cli: &super::Cli, args: &UsageArgs) -> anyhow::Result<ExitCode> {
    let config = cli.effective_config(&super::ConfigArgs {
        state_dir: args.state_dir.clone(),
        ..super::ConfigArgs::default()
    })?;
    let path = crate::daemon::usage_path(&config);
    let now = jiff::Zoned::now();
    let accounting = Accounting::read(&path, &now, config.month_start_day).with_context(|| {
        format!(
            "cannot show the usage saved in {}",
            config.state_dir.display()
        )
    })?;
    let report = report(&accounting, args, &now, config.month_start_day);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, std::io::stdout().is_terminal()));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_row() {
        assert_eq!(bar(10, 10, 4, true), "████");
        assert_eq!(bar(5, 10, 4, true), "██");
        assert_eq!(bar(1, 16, 2, true), "▏");
        assert_eq!(bar(5, 10, 4, false), "##");
        assert_eq!(bar(0, 0, 4, true), "");
    }
}
