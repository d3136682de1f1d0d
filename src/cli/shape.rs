//! `shaper plan` and `shaper clear`: what a cycle would install, and removing what shaper
//! installed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::ConfigArgs;
use crate::account::StaticUsage;
use crate::policy::{Engine, EngineOptions};
use crate::process::{ProcessTable, Snapshot};
use crate::scan::{self, Backend};
use crate::shape::netlink::NetlinkBackend;
use crate::shape::{Capacity, Features, Handles, Installed, PlanInput, TcBackend, plan, reconcile};

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Classify the connections of this snapshot instead of the live ones
    #[arg(long, value_name = "FILE")]
    pub snapshot: Option<PathBuf>,
    /// Plan as if a foreign root or ingress qdisc may be replaced
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Args)]
pub struct ClearArgs {
    /// Interface to clear (repeat for several) [default: the configured interfaces, or the
    /// default route's]
    #[arg(short, long = "interface", value_name = "IF")]
    pub interfaces: Vec<String>,
}

pub fn run_plan(cli: &super::Cli, args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let config = cli.effective_config(&args.config)?;
    let snapshot = match &args.snapshot {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Snapshot::from_ron(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?
        }
        None => {
            let sockets = scan::open(Backend::Auto)?.scan()?;
            let mut table = ProcessTable::new();
            table.update(&sockets);
            table.snapshot(sockets)
        }
    };
    let mut engine = Engine::load(&config.script, EngineOptions::default())?;
    let interfaces = config.shaped_interfaces()?;
    let mut backend = match NetlinkBackend::new() {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("note: {e}; planning as if nothing were installed");
            None
        }
    };
    for interface in interfaces {
        let (_, outcome) = super::policy::run_once(
            &mut engine,
            snapshot.clone(),
            jiff::Zoned::now(),
            Arc::new(StaticUsage::default()),
            Some(interface.clone()),
        );
        let (installed, features) = match backend.as_mut() {
            Some(b) => match b.installed(&interface) {
                Ok(i) => (i, b.features()),
                Err(e) => {
                    eprintln!("note: {e}; planning as if nothing were installed");
                    (Installed::nothing(), Features { fq_codel: true })
                }
            },
            None => (Installed::nothing(), Features { fq_codel: true }),
        };
        let desired = plan(
            &PlanInput {
                classes: &outcome.classes,
                connections: &snapshot.connections,
                decisions: &outcome.decisions,
                capacity: Capacity {
                    up: config.uplink,
                    down: config.downlink,
                },
                features,
            },
            &mut Handles::default(),
        );
        let ops = reconcile(&interface, &desired, &installed, args.replace)?;
        println!("# {interface}: {} operation(s)", ops.ops.len());
        print!("{ops}");
    }
    for e in engine.errors().entries() {
        eprintln!("policy error: {} ({} times)", e.message, e.count);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_clear(cli: &super::Cli, args: &ClearArgs) -> anyhow::Result<ExitCode> {
    let interfaces = if args.interfaces.is_empty() {
        cli.effective_config(&ConfigArgs::default())?
            .shaped_interfaces()?
    } else {
        args.interfaces.clone()
    };
    let mut backend = NetlinkBackend::new()?;
    let mut failed = false;
    for interface in interfaces {
        let installed = backend.installed(&interface)?;
        let plan = crate::shape::teardown(&interface, &installed);
        if plan.is_empty() {
            println!("{interface}: nothing of shaper's is installed");
            continue;
        }
        for (op, error) in backend.apply(&plan) {
            eprintln!("error: {op}: {error}");
            failed = true;
        }
        println!("{interface}: removed shaper's qdiscs, filters and IFB");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
