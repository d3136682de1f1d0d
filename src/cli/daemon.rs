//! `shaper run`, `status`, `reload` and `stop`.

use std::process::ExitCode;

use clap::Args;

use super::ConfigArgs;
use crate::daemon::RunOptions;
use crate::daemon::service::{self, Request};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Log what would be installed each cycle; change nothing in the kernel
    #[arg(long)]
    pub dry_run: bool,
    /// Replace a root or ingress qdisc that shaper did not install
    #[arg(long)]
    pub replace: bool,
    /// Run a policy script that is not owned by root or that others may write (refused by
    /// default when running as root; for development only)
    #[arg(long)]
    pub allow_insecure_script: bool,
}

/// Whether policy files must be root's and not writable by others: when running as root, unless
/// the user opted out.
pub fn strict_permissions(allow_insecure_script: bool) -> bool {
    rustix::process::geteuid().is_root() && !allow_insecure_script
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    /// Also list every connection
    #[arg(long)]
    pub all: bool,
    /// Runtime dir of the daemon to ask [default: the configured one]
    #[arg(long, value_name = "DIR", value_parser = super::path_arg)]
    pub runtime_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// Runtime dir of the daemon [default: the configured one]
    #[arg(long, value_name = "DIR", value_parser = super::path_arg)]
    pub runtime_dir: Option<std::path::PathBuf>,
}

pub fn run(cli: &super::Cli, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let config = cli.effective_config(&args.config)?;
    super::logging::init(cli.verbose, cli.quiet, Some(&config.log_level));
    service::run(
        config,
        RunOptions {
            script_named: args.config.script.is_some(),
            dry_run: args.dry_run,
            replace: args.replace,
            strict_permissions: strict_permissions(args.allow_insecure_script),
        },
    )
}

/// The runtime dir given, else the configured one.
pub(super) fn runtime_dir(
    cli: &super::Cli,
    given: &Option<std::path::PathBuf>,
) -> anyhow::Result<std::path::PathBuf> {
    match given {
        Some(d) => Ok(d.clone()),
        None => Ok(cli.effective_config(&ConfigArgs::default())?.runtime_dir),
    }
}

pub fn status(cli: &super::Cli, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = runtime_dir(cli, &args.runtime_dir)?;
    let response = match service::request(&dir, &Request::Status { all: args.all }) {
        Ok(response) => response,
        // The LSB convention for a status query: 3 = not running.
        Err(e) if e.is::<service::NotRunning>() => {
            eprintln!("shaper: {e}");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e),
    };
    let Some(status) = response.status else {
        let error = response.error.unwrap_or_else(|| "no status".into());
        anyhow::bail!("{}", crate::text::escape(&error));
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", super::status::render(&status));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn control(cli: &super::Cli, args: &ControlArgs, request: Request) -> anyhow::Result<ExitCode> {
    let dir = runtime_dir(cli, &args.runtime_dir)?;
    let what = match request {
        Request::Reload => "reloaded",
        _ => "stopped",
    };
    let response = service::request(&dir, &request)?;
    if response.ok {
        println!("shaper {what}");
        Ok(ExitCode::SUCCESS)
    } else {
        // A failed reload quotes the policy's error, which may quote a process's name.
        let error = response.error.unwrap_or_default();
        eprintln!("shaper: {}", crate::text::escape(&error));
        Ok(ExitCode::FAILURE)
    }
}

/// `shaper metrics`: the running daemon's Prometheus metrics (OpenMetrics text).
pub fn metrics(cli: &super::Cli, args: &ControlArgs) -> anyhow::Result<ExitCode> {
    let dir = runtime_dir(cli, &args.runtime_dir)?;
    let response = service::request(&dir, &Request::Metrics)?;
    match response.metrics {
        Some(text) => {
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        None => anyhow::bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "this shaper daemon does not serve metrics; restart it".into())
        ),
    }
}
