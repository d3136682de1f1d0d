//! `shaper run`, `status`, `reload` and `stop`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::ConfigArgs;
use crate::config::Config;
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
    let mut config = cli.effective_config(&args.config)?;
    super::logging::init(cli.verbose, cli.quiet, Some(&config.log_level));
    // A normal user's dry run (or a daemon granted CAP_NET_ADMIN without root's folders); a
    // run that will stop for want of the capability says only that.
    let may_run = args.dry_run || crate::daemon::startup::require_net_admin().is_ok();
    if !rustix::process::geteuid().is_root() && may_run {
        for (dir, default, sub, what) in [
            (
                &mut config.runtime_dir,
                Config::default().runtime_dir,
                "",
                "runtime_dir",
            ),
            (
                &mut config.state_dir,
                Config::default().state_dir,
                "state",
                "state_dir",
            ),
        ] {
            if *dir == default && !writable(dir) {
                let base = user_dir()?;
                let mine = if sub.is_empty() { base } else { base.join(sub) };
                tracing::info!(
                    "not root and {} is not writable: using {} as the {what} (set {what} or \
                     --{} to choose)",
                    dir.display(),
                    mine.display(),
                    what.replace('_', "-")
                );
                *dir = mine;
            }
        }
    }
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

/// The runtime dir given, else the configured one. Not root, with the default runtime dir and
/// no daemon there, the user's own ([`user_dir`]) if a daemon answers there: what `shaper run
/// --dry-run` uses when a normal user starts it.
pub(super) fn runtime_dir(
    cli: &super::Cli,
    given: &Option<std::path::PathBuf>,
) -> anyhow::Result<std::path::PathBuf> {
    if let Some(d) = given {
        return Ok(d.clone());
    }
    let configured = cli.effective_config(&ConfigArgs::default())?.runtime_dir;
    if configured == Config::default().runtime_dir
        && !rustix::process::geteuid().is_root()
        && !configured.join(service::SOCKET_NAME).exists()
        && let Some(mine) = user_runtime_base()
        && mine.join(service::SOCKET_NAME).exists()
    {
        return Ok(mine);
    }
    Ok(configured)
}

/// Whether this process may create files in `dir`, or create `dir` (its nearest existing
/// ancestor is writable).
fn writable(dir: &Path) -> bool {
    use rustix::fs::{Access, access};
    dir.ancestors()
        .find(|d| d.exists())
        .is_some_and(|d| access(d, Access::WRITE_OK | Access::EXEC_OK).is_ok())
}

/// `$XDG_RUNTIME_DIR/shaper` when the session has one (an absolute path), else
/// `/tmp/shaper-UID`.
fn user_runtime_base() -> Option<PathBuf> {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(xdg) if xdg.is_absolute() && xdg.is_dir() => Some(xdg.join("shaper")),
        _ => Some(PathBuf::from(format!(
            "/tmp/shaper-{}",
            rustix::process::geteuid().as_raw()
        ))),
    }
}

/// The folder a daemon started by a normal user keeps its runtime and state in, when the
/// defaults (`/run/shaper`, `/var/lib/shaper`: root's) were not configured and cannot be
/// written: [`user_runtime_base`]. In `/tmp`, the folder is made 0700 and used only if it is
/// the user's own, not a symlink and open to no one else (another user could have made it
/// first).
pub fn user_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = user_runtime_base().expect("a fallback always exists");
    if dir.starts_with("/tmp") {
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", dir.display()));
            }
        }
        let meta = std::fs::symlink_metadata(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?;
        let uid = rustix::process::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
            anyhow::bail!(
                "{} is not a folder of yours open to no one else (uid {}, mode {:04o}); remove \
                 it, or set --runtime-dir and --state-dir",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            );
        }
    }
    Ok(dir)
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
