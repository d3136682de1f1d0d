//! `shaper plan` and `shaper clear`: what a cycle would install, and removing what shaper
//! installed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::ConfigArgs;
use crate::account::Accounting;
use crate::daemon::cycle::KernelFacts;
use crate::daemon::{Cycle, Inputs, Interface, RateSource, Rates, Sockets, Timings, usage_path};
use crate::process::Snapshot;
use crate::scan::{self, Backend};
use crate::shape::TcBackend;
use crate::shape::netlink::NetlinkBackend;
use crate::shape::recording::RecordingBackend;

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
    /// Run a policy script that is not owned by root or that others may write (refused by
    /// default when running as root, as `run` refuses it; for development only)
    #[arg(long)]
    pub allow_insecure_script: bool,
}

#[derive(Debug, Args)]
pub struct ClearArgs {
    /// Interface to clear (repeat for several) [default: the configured interfaces, or the
    /// default route's]
    #[arg(short, long = "interface", value_name = "IF")]
    pub interfaces: Vec<String>,
}

/// Runs the daemon's cycle once — the same script (or built-in policy), rates and rate files,
/// saved usage and capacity as `shaper run` — and prints the operations it would apply, against
/// what is installed now (or against nothing, where the kernel cannot be read).
pub fn run_plan(cli: &super::Cli, args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let config = cli.effective_config(&args.config)?;
    let strict = super::daemon::strict_permissions(args.allow_insecure_script);
    let mut cycle = Cycle::load(
        &config,
        args.config.script.is_some(),
        strict,
        Path::new("/proc"),
    )?;
    let sockets = match &args.snapshot {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Sockets::Recorded(
                Snapshot::from_ron(&text, &path.display().to_string())
                    .map_err(anyhow::Error::msg)?,
            )
        }
        None => Sockets::All(scan::open(Backend::Auto)?.scan()?),
    };
    let interfaces: Vec<Interface> = config
        .shaped_interfaces()?
        .into_iter()
        .map(Interface::new)
        .collect();
    let now = jiff::Zoned::now();
    let accounting = Accounting::load(&usage_path(&config), &now, config.month_start_day);
    let rates = Rates {
        rate: RateSource::new(config.rate, config.rate_file.clone(), strict).current(),
        connection_rate: RateSource::new(
            config.connection_rate,
            config.connection_rate_file.clone(),
            strict,
        )
        .current(),
    };
    cycle.run(
        sockets,
        Inputs {
            now,
            interface: interfaces.first().map(|i| i.name().to_string()),
            usage: Arc::new(accounting.view()),
            accounting: None,
            links: &[],
            closed: Vec::new(),
            rates,
        },
        &mut Timings::default(),
    );
    let mut kernel: Option<Box<dyn TcBackend>> = match NetlinkBackend::new() {
        Ok(b) => Some(Box::new(b)),
        Err(e) => {
            eprintln!("note: {e}; planning as if nothing were installed");
            None
        }
    };
    println!("# {}", daemon_note(&config.runtime_dir, &cycle));
    for mut iface in interfaces {
        // The classifier a running daemon may have is not asked: planned as on the u32 path.
        let facts = match kernel.as_deref_mut() {
            Some(k) => match KernelFacts::read(k, &iface, false) {
                Ok(facts) => Some(facts),
                Err(e) => {
                    eprintln!("note: {e}; planning as if nothing were installed");
                    None
                }
            },
            None => None,
        };
        let planned = match facts {
            Some(facts) => cycle
                .tc_plan(&mut iface, facts, args.replace)
                .map_err(|e| e.reason)?,
            None => {
                // Nothing installed, on a kernel with the features of this one where it can be
                // asked (fq_codel leaves or not).
                let mut nothing = match kernel.as_deref_mut() {
                    Some(k) => RecordingBackend::new(k.features()),
                    None => RecordingBackend::default(),
                };
                nothing.add_link(iface.name());
                let facts = KernelFacts::read(&mut nothing, &iface, false)?;
                cycle
                    .tc_plan(&mut iface, facts, args.replace)
                    .map_err(|e| e.reason)?
            }
        };
        let ops = planned.map(|p| p.ops).unwrap_or_default();
        println!("# {}: {} operation(s)", iface.name(), ops.ops.len());
        print!("{ops}");
    }
    for e in cycle.engine().errors().entries() {
        eprintln!(
            "policy error: {} ({} times)",
            crate::text::escape(&e.message),
            e.count
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Says what the plan was made from: this command's configuration (the file and its flags) and
/// policy, never the running daemon's, which it cannot read (the daemon's flags are not
/// published); so with a daemon running, the plan is what it would do only when started alike.
fn daemon_note(runtime_dir: &Path, cycle: &Cycle) -> String {
    let policy = cycle.engine().script().path.display().to_string();
    let request = crate::daemon::service::Request::Status { all: false };
    match crate::daemon::service::request(runtime_dir, &request)
        .ok()
        .and_then(|r| r.status)
    {
        Some(running) => format!(
            "made from this command's configuration (policy {policy}), not the running \
             daemon's (pid {}, policy {}): it shows what that daemon would do only if it was \
             started with the same configuration file and flags",
            running.pid, running.policy
        ),
        None => format!(
            "made from this command's configuration (policy {policy}); no daemon answers on \
             runtime dir {}",
            runtime_dir.display()
        ),
    }
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
