//! `shaper check` and `shaper simulate`: a policy run over recorded connections, no root needed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::table::{or_dash, render};
use crate::account::{StaticUsage, UsageView};
use crate::daemon::flows::FlowTable;
use crate::daemon::{Cycle, Inputs, Outcome, Rates, Sockets, Timings};
use crate::policy::{Engine, EngineOptions, ErrorEntry, PolicyError};
use crate::process::Snapshot;
use crate::shape::Capacity;

/// When and with what usage a one-off cycle runs (`check`, `simulate`).
#[derive(Debug, Clone, Args)]
pub struct WhenArgs {
    /// Local time of the cycle (time zone from TZ): "YYYY-MM-DD HH:MM", a weekday and time
    /// ("Mon 10:00": the next such moment from now, today if still ahead), or a time ("20:00":
    /// today) [default: now]
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Usage figures for ctx.usage and ctx.class, as RON (format in shaper-policy(7))
    #[arg(long, value_name = "FILE")]
    pub usage: Option<PathBuf>,
}

impl WhenArgs {
    /// The cycle's time and the usage the policy reads.
    fn resolve(&self) -> anyhow::Result<(jiff::Zoned, Arc<dyn UsageView>)> {
        let now = match &self.at {
            Some(at) => parse_at(at, &jiff::Zoned::now())?,
            None => jiff::Zoned::now(),
        };
        let usage: Arc<dyn UsageView> = match &self.usage {
            Some(path) => Arc::new(StaticUsage::load(path)?),
            None => Arc::new(StaticUsage::default()),
        };
        Ok((now, usage))
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The policy script to check [default: the configured one, /etc/shaper/policy.lua]
    pub script: Option<PathBuf>,
    /// As root, accept a script not owned by root or writable by others (as `run` would refuse)
    #[arg(long)]
    pub allow_insecure_script: bool,
    /// Also fail (exit 1) on the class-name warnings: a class name `classify` returns that no
    /// declared class matches, a declared class it never returns
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub when: WhenArgs,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The policy script
    pub script: PathBuf,
    /// Connections to classify, as written by `shaper snapshot --ron`
    #[arg(long, value_name = "FILE")]
    pub snapshot: PathBuf,
    #[command(flatten)]
    pub when: WhenArgs,
    /// The interface name ctx.interface reports
    #[arg(long, value_name = "IF")]
    pub interface: Option<String>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// The connections `shaper check` runs a policy over.
pub fn sample_snapshot() -> Snapshot {
    Snapshot::from_ron(include_str!("../policy/sample.ron"), "sample.ron")
        .expect("the built-in sample parses")
}

/// The log filter of `check` and `simulate` unless `-v`/`-q` or `SHAPER_LOG` say otherwise:
/// errors, and the script's own `print`.
pub fn quiet_filter() -> String {
    format!("error,{}=info", crate::policy::PRINT_TARGET)
}

/// Parses `--at` in `now`'s time zone: "YYYY-MM-DD HH:MM" (or with seconds, or ISO 8601's `T`);
/// a weekday and a time, "Mon 10:00" (English names, three letters or whole, any case): the
/// next such moment at or after `now`; or a time alone, "20:00": today.
pub fn parse_at(text: &str, now: &jiff::Zoned) -> anyhow::Result<jiff::Zoned> {
    let tz = now.time_zone().clone();
    let trimmed = text.trim();
    let wrong = || {
        format!(
            "--at {text:?} is not a local time: write \"2026-11-22 18:30\", \"Mon 10:00\" or \
             \"20:00\""
        )
    };
    let civil = match trimmed.split_once(' ') {
        Some((day, time)) if weekday(day).is_some() => {
            let wanted = weekday(day).unwrap_or(jiff::civil::Weekday::Monday);
            let time: jiff::civil::Time = time.trim().parse().with_context(wrong)?;
            let today = now.date();
            let days_ahead = i64::from(wanted.since(today.weekday()));
            let mut date = today.checked_add(jiff::Span::new().days(days_ahead))?;
            if days_ahead == 0 && date.to_datetime(time) < now.datetime() {
                date = date.checked_add(jiff::Span::new().days(7))?;
            }
            date.to_datetime(time)
        }
        _ if !trimmed.contains('-') => {
            let time: jiff::civil::Time = trimmed.parse().with_context(wrong)?;
            now.date().to_datetime(time)
        }
        _ => trimmed.replacen(' ', "T", 1).parse().with_context(wrong)?,
    };
    civil
        .to_zoned(tz)
        .with_context(|| format!("--at {text:?} does not exist in the local time zone"))
}

/// An English weekday name, whole or its first three letters, any case.
fn weekday(name: &str) -> Option<jiff::civil::Weekday> {
    use jiff::civil::Weekday::*;
    let lower = name.to_ascii_lowercase();
    [
        ("monday", Monday),
        ("tuesday", Tuesday),
        ("wednesday", Wednesday),
        ("thursday", Thursday),
        ("friday", Friday),
        ("saturday", Saturday),
        ("sunday", Sunday),
    ]
    .into_iter()
    .find(|(full, _)| lower.len() >= 3 && full.starts_with(&lower))
    .map(|(_, day)| day)
}

/// What a one-off cycle is run with besides the policy and the connections.
#[derive(Default)]
pub struct OnceInputs {
    /// The link capacity (`uplink`/`downlink`).
    pub link: Capacity,
    /// `--rate` and `--connection-rate`.
    pub rates: Rates,
    /// `ctx.interface`.
    pub interface: Option<String>,
}

/// One cycle of `engine` over the recorded connections of `snapshot`, through the daemon's
/// cycle (no accounting, nothing installed): the decisions are in its flow table.
pub fn run_once(
    engine: Engine,
    snapshot: Snapshot,
    now: jiff::Zoned,
    usage: Arc<dyn UsageView>,
    inputs: OnceInputs,
) -> (Cycle, Outcome) {
    let mut cycle = Cycle::new(engine, inputs.link, Path::new("/proc"));
    let outcome = cycle.run(
        Sockets::Recorded(snapshot),
        Inputs {
            now,
            interface: inputs.interface,
            usage,
            accounting: None,
            links: &[],
            closed: Vec::new(),
            rates: inputs.rates,
        },
        &mut Timings::default(),
    );
    (cycle, outcome)
}

/// One output row per connection.
#[derive(Debug, Serialize)]
pub struct DecisionRow {
    pub connection: String,
    pub process: Option<String>,
    pub user: Option<String>,
    pub class: String,
    pub limit: Option<String>,
}

pub fn decision_rows(flows: &FlowTable) -> Vec<DecisionRow> {
    flows
        .iter()
        .map(|f| DecisionRow {
            connection: f.connection.socket.to_string(),
            process: f.process.map(|p| format!("{} ({})", p.name, p.pid)),
            user: f.process.and_then(|p| p.user.clone()),
            class: f.decision.class.to_string(),
            limit: (f.decision.limit != Default::default()).then(|| f.decision.limit.to_string()),
        })
        .collect()
}

fn print_table(rows: &[DecisionRow]) {
    let rows: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.connection.clone(),
                or_dash(r.process.as_ref()),
                or_dash(r.user.as_ref()),
                r.class.clone(),
                or_dash(r.limit.as_ref()),
            ]
        })
        .collect();
    print!(
        "{}",
        render(["CONNECTION", "PROCESS", "USER", "CLASS", "LIMIT"], &rows)
    );
}

fn print_errors(entries: &[ErrorEntry]) {
    for e in entries {
        eprintln!("error: {}", crate::text::escape(&e.message));
        if let Some(ex) = &e.example {
            let ex = crate::text::escape(ex);
            let more = if e.count > 1 {
                format!(" and {} more", e.count - 1)
            } else {
                String::new()
            };
            eprintln!("       for {ex}{more}");
        }
    }
}

fn load(script: &Path, strict_permissions: bool) -> Result<Engine, PolicyError> {
    Engine::load(
        script,
        EngineOptions {
            strict_permissions,
            ..EngineOptions::default()
        },
    )
}

pub fn check(cli: &super::Cli, args: &CheckArgs) -> anyhow::Result<ExitCode> {
    // The configuration `run` would use: its capacity decides whether priorities can act.
    let config = cli.effective_config(&super::ConfigArgs::default())?;
    let script = args.script.clone().unwrap_or_else(|| config.script.clone());
    let strict = super::daemon::strict_permissions(args.allow_insecure_script);
    let (now, usage) = args.when.resolve()?;
    let engine = match load(&script, strict) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let at = describe_at(&now, &args.when);
    let (cycle, outcome) = run_once(
        engine,
        sample_snapshot(),
        now,
        usage,
        OnceInputs {
            link: Capacity {
                up: config.uplink,
                down: config.downlink,
                framing: crate::shape::Framing {
                    overhead: config.overhead,
                    mpu: config.mpu,
                    link_layer: config.linklayer,
                },
            },
            rates: Rates {
                rate: config.rate,
                connection_rate: config.connection_rate,
            },
            interface: None,
        },
    );
    let name = script.display();
    println!("{name}: classes {}", describe_classes(&outcome));
    println!(
        "decisions for the {} built-in sample connections, {at}:",
        cycle.flows().len()
    );
    print_table(&decision_rows(cycle.flows()));
    let decisions = cycle.flows().decisions();
    let unused: Vec<&str> = outcome
        .classes
        .classes
        .keys()
        .filter(|k| decisions.iter().all(|d| &d.class != *k))
        .map(|k| k.as_ref())
        .collect();
    let lint = class_names(cycle.engine(), &outcome, decisions);
    let unused: Vec<&str> = unused
        .into_iter()
        .filter(|u| !lint.never_returned.iter().any(|w| w.class == *u))
        .collect();
    if !unused.is_empty() {
        println!(
            "note: no sample connection went to {} (fine if they are meant for other traffic)",
            unused.join(", ")
        );
    }
    for w in lint.unknown.iter().chain(&lint.never_returned) {
        eprintln!("warning: {w}");
    }
    if let Some(w) = cycle.capacity_warning() {
        eprintln!("warning: {w}");
    }
    let errors = cycle.engine().errors();
    let strict_failures = if args.strict {
        lint.unknown.len() + lint.never_returned.len()
    } else {
        0
    };
    if errors.is_empty() && strict_failures == 0 {
        println!("{name}: OK");
        Ok(ExitCode::SUCCESS)
    } else {
        print_errors(errors.entries());
        if strict_failures > 0 {
            eprintln!("{name}: {strict_failures} class-name warning(s), failing with --strict");
        }
        if !errors.is_empty() {
            eprintln!("{name}: {} problem(s)", errors.entries().len());
        }
        Ok(ExitCode::FAILURE)
    }
}

/// The class-name findings of [`crate::policy::lint`] for the script `engine` runs, with the
/// classes the run's connections went to counted as returned. None when the cycle failed as a
/// whole (its error says why): the classes it declares are then unknown.
fn class_names(
    engine: &Engine,
    outcome: &Outcome,
    decisions: &[crate::policy::Decision],
) -> crate::policy::lint::ClassNames {
    if outcome.failure.is_some() {
        return Default::default();
    }
    let returned = decisions.iter().map(|d| d.class.as_ref()).collect();
    crate::policy::lint::class_names(
        engine.script(),
        engine.classify_span(),
        &outcome.classes,
        &returned,
    )
}

/// "now", or the time `--at` chose, with the usage file when one was given.
fn describe_at(now: &jiff::Zoned, when: &WhenArgs) -> String {
    let mut text = match when.at {
        Some(_) => format!("at {}", now.strftime("%a %Y-%m-%d %H:%M %Z")),
        None => "now".to_string(),
    };
    if let Some(usage) = &when.usage {
        text.push_str(&format!(" with the usage in {}", usage.display()));
    }
    text
}

fn describe_classes(outcome: &Outcome) -> String {
    outcome
        .classes
        .classes
        .values()
        .map(|c| {
            let mut parts = vec![format!("prio {}", c.prio)];
            if c.rate != Default::default() {
                parts.push(format!("rate {}", c.rate));
            }
            if c.ceil != Default::default() {
                parts.push(format!("ceil {}", c.ceil));
            }
            if c.each != crate::policy::Each::Class {
                parts.push(format!("each {}", c.each.as_str()));
            }
            if c.block {
                parts.push("blocked".to_string());
            }
            format!("{} ({})", c.name, parts.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Serialize)]
struct SimulateJson<'a> {
    at: String,
    classes: Vec<&'a crate::policy::ClassDef>,
    decisions: Vec<DecisionRow>,
    errors: &'a [ErrorEntry],
    /// Class names `classify` returns (as literals) that no declared class matches.
    warnings: Vec<&'a str>,
    /// What the policy raised with `shaper.notify` (the daemon would pass each once a period).
    notices: &'a [crate::policy::Notice],
}

pub fn simulate(args: &SimulateArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.snapshot)
        .with_context(|| format!("cannot read {}", args.snapshot.display()))?;
    let snapshot = Snapshot::from_ron(&text, &args.snapshot.display().to_string())
        .map_err(anyhow::Error::msg)?;
    let (now, usage) = args.when.resolve()?;
    let engine = load(&args.script, false)?;
    let at = now.strftime("%a %Y-%m-%d %H:%M %Z").to_string();
    let (cycle, outcome) = run_once(
        engine,
        snapshot,
        now,
        usage,
        OnceInputs {
            interface: args.interface.clone(),
            ..OnceInputs::default()
        },
    );
    let rows = decision_rows(cycle.flows());
    let errors = cycle.engine().errors();
    // What simulate adds to the run: names no declared class matches, in classify's own
    // returns (a class never returned over one snapshot is no finding: `check` reports that).
    let unknown = class_names(cycle.engine(), &outcome, cycle.flows().decisions()).unknown;
    if args.json {
        let out = SimulateJson {
            at,
            classes: outcome.classes.classes.values().collect(),
            decisions: rows,
            errors: errors.entries(),
            warnings: unknown.iter().map(|w| w.message.as_str()).collect(),
            notices: &outcome.notices,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("at {at}; classes {}", describe_classes(&outcome));
        print_table(&rows);
        for n in &outcome.notices {
            println!(
                "notify {}: {} (passed on once a {})",
                n.name, n.message, n.period
            );
        }
        print_errors(errors.entries());
        for w in &unknown {
            eprintln!("warning: {w}");
        }
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
