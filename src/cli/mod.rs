//! The command line: clap definitions and one function per subcommand.
//!
//! `main.rs` only calls [`main`]; every subcommand returns `anyhow::Result<ExitCode>` so exit codes
//! are decided here: 0 success, 1 failure (or, for checking commands, "problems found"), 2 usage.

pub mod artifacts;
pub mod daemon;
pub mod logging;
pub mod policy;
pub mod shape;
pub mod snapshot;
pub mod status;
pub mod table;
pub mod top;
pub mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{ClassifierChoice, Config, DEFAULT_CONFIG_PATH};
use crate::units::{Interval, Rate, RatePair};

/// Per-connection bandwidth shaping for Linux, driven by a Lua policy.
///
/// shaper scans the host's TCP and UDP connections (IPv4 and IPv6), finds the process behind each,
/// asks a Lua script which class and limit each one gets, and installs the result as HTB classes
/// and u32 filters on the interface (upload) and an IFB device (download).
#[derive(Debug, Parser)]
#[command(
    name = "shaper",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Configuration file [default: /etc/shaper/shaper.ron; a missing default file means defaults]
    #[arg(long, global = true, value_name = "FILE", env = "SHAPER_CONFIG")]
    pub config: Option<PathBuf>,

    /// More log output (-v debug, -vv trace); overrides SHAPER_LOG and the config's log_level
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Less log output (-q warnings only, -qq errors only)
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: every interval, scan connections, run the policy and shape
    ///
    /// Without a policy script (no --script, and none at the configured path) the built-in
    /// policy applies --rate (whole interface) and --connection-rate (each connection), which
    /// also act as defaults for any script. Stops cleanly (removing everything it installed) on
    /// SIGTERM, SIGINT or `shaper stop`; reloads the script on SIGHUP, `shaper reload` or when
    /// the file changes.
    Run(Box<daemon::RunArgs>),
    /// Show what the running daemon is doing: interfaces, usage, classes, processes
    Status(daemon::StatusArgs),
    /// A live full-screen view of the running daemon: rates next to the limits in force
    ///
    /// Per process (default), class, user or connection (tab switches), refreshed every cycle;
    /// `s` or 1-9 sorts, `/` filters, `q` quits. Works for members of `status_group` without
    /// root. Exits 3 when no daemon runs or when it stops.
    Top(top::TopArgs),
    /// Show the usage history: bytes per hour, day or month, by link, process, user or class
    ///
    /// Reads history.ron and usage.ron in the state dir (no daemon needed). Finished periods
    /// keep the top names of each kind, the rest under "(other)".
    Usage(usage::UsageArgs),
    /// Print the running daemon's Prometheus metrics (OpenMetrics text)
    ///
    /// Bytes per link, class, user and process name, rates, limits, cycle timings and policy
    /// errors. Set metrics_listen (or --metrics-listen on run) to have Prometheus scrape them
    /// over HTTP instead.
    Metrics(daemon::ControlArgs),
    /// Make the running daemon re-read its policy script (checked before it replaces the old)
    Reload(daemon::ControlArgs),
    /// Stop the running daemon; it removes everything it installed
    Stop(daemon::ControlArgs),
    /// Print the effective configuration (defaults, then the config file, then flags) as RON
    ///
    /// The output is a valid shaper.ron: redirect it to a file to start a configuration.
    Config(Box<ConfigArgs>),
    /// List the live connections with the processes that own them
    ///
    /// Reads TCP and UDP sockets (IPv4 and IPv6) over sock_diag, with byte counters, and finds
    /// each socket's process. Run as root to see other users' processes.
    Snapshot(snapshot::SnapshotArgs),
    /// Load a policy script, check its contract and run it over built-in sample connections
    ///
    /// Exit status 0 when the script loads and classifies every sample connection without
    /// error, 1 otherwise. Suitable for ExecStartPre= and editor hooks.
    Check(policy::CheckArgs),
    /// Show the decisions a policy makes for recorded connections at a given time and usage
    ///
    /// Needs no root: the connections come from a file written by `shaper snapshot --ron`.
    Simulate(policy::SimulateArgs),
    /// Print the tc operations one cycle would perform now (as tc commands)
    ///
    /// Runs the policy over the live connections (or --snapshot) and compares the result with
    /// what is installed. Changes nothing.
    Plan(Box<shape::PlanArgs>),
    /// Remove everything shaper installed: its qdiscs, filters and IFB devices
    ///
    /// For after a crash, or to stop shaping by hand. Foreign qdiscs are left alone.
    Clear(shape::ClearArgs),
    /// Write man pages and shell completions to DIR (for packaging)
    #[command(hide = true)]
    GenerateArtifacts {
        /// Output directory (man/ and completions/ are created in it)
        dir: PathBuf,
    },
}

/// Flags that override configuration-file values. Shared by every command that reads the config.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// Interface to shape (repeat for several) [default: the default route's interface]
    #[arg(short, long = "interface", value_name = "IF")]
    pub interfaces: Vec<String>,
    /// Cycle interval with its unit, e.g. 1s or 500ms [default: 1s]
    #[arg(long, value_name = "TIME")]
    pub interval: Option<Interval>,
    /// Lua policy script [default: /etc/shaper/policy.lua]
    #[arg(long, value_name = "FILE", value_parser = path_arg)]
    pub script: Option<PathBuf>,
    /// Upload capacity of the link, e.g. 20mbit (8kbit to 1tbit)
    #[arg(long, value_name = "RATE")]
    pub uplink: Option<Rate>,
    /// Download capacity of the link, e.g. 100mbit
    #[arg(long, value_name = "RATE")]
    pub downlink: Option<Rate>,
    /// Bytes the line adds to every packet, 0-256, e.g. 34 (VDSL2/PPPoE), 18 (DOCSIS),
    /// 44 (ADSL/PPPoE with --linklayer atm) [default: 0]
    #[arg(long, value_name = "BYTES")]
    pub overhead: Option<u16>,
    /// Smallest size a packet is counted as, 0-256, e.g. 64 for DOCSIS [default: 0]
    #[arg(long, value_name = "BYTES")]
    pub mpu: Option<u16>,
    /// Link layer under the interface: ethernet, or atm for ADSL [default: ethernet]
    #[arg(long, value_name = "LAYER")]
    pub linklayer: Option<crate::config::LinkLayer>,
    /// Limit for the whole interface, UP[:DOWN], e.g. 2mbit:8mbit
    #[arg(long, value_name = "UP[:DOWN]")]
    pub rate: Option<RatePair>,
    /// Limit for each connection, UP[:DOWN]
    #[arg(long, value_name = "UP[:DOWN]")]
    pub connection_rate: Option<RatePair>,
    /// File holding the current --rate, re-read every cycle
    #[arg(long, value_name = "FILE", value_parser = path_arg)]
    pub rate_file: Option<PathBuf>,
    /// File holding the current --connection-rate, re-read every cycle
    #[arg(long, value_name = "FILE", value_parser = path_arg)]
    pub connection_rate_file: Option<PathBuf>,
    /// Directory for persisted usage counters [default: /var/lib/shaper; a normal user's dry
    /// run: $XDG_RUNTIME_DIR/shaper/state]
    #[arg(long, value_name = "DIR", value_parser = path_arg)]
    pub state_dir: Option<PathBuf>,
    /// Directory for the control socket and pid file [default: /run/shaper; a normal user's dry
    /// run: $XDG_RUNTIME_DIR/shaper, or /tmp/shaper-UID]
    #[arg(long, value_name = "DIR", value_parser = path_arg)]
    pub runtime_dir: Option<PathBuf>,
    /// How often usage counters are saved, with its unit [default: 10s]
    #[arg(long, value_name = "TIME")]
    pub usage_flush_interval: Option<Interval>,
    /// Day of the month on which monthly usage restarts, 1-28 [default: 1]
    #[arg(long, value_name = "DAY")]
    pub month_start_day: Option<u8>,
    /// Log filter: error, warn, info, debug, trace or an env-filter directive [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// How connections reach their class: auto (BPF where possible, else u32), bpf or u32
    /// [default: auto]
    #[arg(long, value_name = "HOW")]
    pub classifier: Option<ClassifierChoice>,
    /// cgroup v2 directory whose sockets the BPF classifier shapes from their first packet
    /// [default: the cgroup v2 mount's root]
    #[arg(long, value_name = "DIR", value_parser = path_arg)]
    pub cgroup: Option<PathBuf>,
    /// Group whose members may run `shaper status` and `shaper top` without root (the control
    /// socket becomes 0660 with this group; `reload` and `stop` stay root's)
    #[arg(long, value_name = "GROUP")]
    pub status_group: Option<String>,
    /// Serve Prometheus metrics on ADDR (GET /metrics), e.g. 127.0.0.1:9639 [default: not
    /// served]
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Program run for each policy event (shaper.notify), with SHAPER_EVENT, SHAPER_MESSAGE,
    /// SHAPER_PERIOD and SHAPER_TIME in its environment [default: none]
    #[arg(long, value_name = "PROGRAM", value_parser = path_arg)]
    pub notify_command: Option<PathBuf>,
}

/// A path flag: relative paths are taken from the current directory now, because the daemon
/// would otherwise resolve them from wherever it happens to run; an empty one is refused (it
/// meant the current directory without saying so).
pub fn path_arg(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("an empty path would mean the current directory; write a path".into());
    }
    std::path::absolute(text).map_err(|e| format!("cannot make {text:?} absolute: {e}"))
}

impl ConfigArgs {
    /// Overrides `config`'s values with the flags that were given.
    pub fn apply(&self, config: &mut Config) {
        fn set<T: Clone>(slot: &mut T, flag: &Option<T>) {
            if let Some(v) = flag {
                *slot = v.clone();
            }
        }
        fn set_some<T: Clone>(slot: &mut Option<T>, flag: &Option<T>) {
            if flag.is_some() {
                slot.clone_from(flag);
            }
        }
        if !self.interfaces.is_empty() {
            config.interfaces.clone_from(&self.interfaces);
        }
        set(&mut config.interval, &self.interval);
        set(&mut config.script, &self.script);
        set_some(&mut config.uplink, &self.uplink);
        set_some(&mut config.downlink, &self.downlink);
        set(&mut config.overhead, &self.overhead);
        set(&mut config.mpu, &self.mpu);
        set(&mut config.linklayer, &self.linklayer);
        set_some(&mut config.rate, &self.rate);
        set_some(&mut config.connection_rate, &self.connection_rate);
        set_some(&mut config.rate_file, &self.rate_file);
        set_some(&mut config.connection_rate_file, &self.connection_rate_file);
        set(&mut config.state_dir, &self.state_dir);
        set(&mut config.runtime_dir, &self.runtime_dir);
        set(&mut config.usage_flush_interval, &self.usage_flush_interval);
        set(&mut config.month_start_day, &self.month_start_day);
        set(&mut config.log_level, &self.log_level);
        set(&mut config.classifier, &self.classifier);
        set_some(&mut config.cgroup, &self.cgroup);
        set_some(&mut config.status_group, &self.status_group);
        set_some(&mut config.metrics_listen, &self.metrics_listen);
        set_some(&mut config.notify_command, &self.notify_command);
    }
}

impl Cli {
    /// Defaults, then the config file, then `flags`, validated as a whole.
    pub fn effective_config(&self, flags: &ConfigArgs) -> anyhow::Result<Config> {
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut config = Config::load(&path, explicit)?;
        flags.apply(&mut config);
        config
            .validate("command line")
            .context("a command-line flag has a value that cannot work")?;
        Ok(config)
    }
}

/// An error and its causes, `: `-separated, each said once: a cause whose text the message
/// already holds (an error that prints its source and also returns it as `source()`) is not
/// repeated, so `cannot open /run/shaper: Permission denied (os error 13)` does not end in a
/// second `: Permission denied (os error 13)`.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Parses the command line, sets up logging and runs the subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shaper: error: {}", error_chain(&e));
            match e.downcast_ref::<crate::daemon::startup::StartError>() {
                Some(start) => ExitCode::from(start.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Run(args) => daemon::run(cli, args),
        Command::Status(args) => {
            logging::init(cli.verbose, cli.quiet, None);
            daemon::status(cli, args)
        }
        Command::Top(args) => {
            // Log lines would scribble over the screen: errors only, and those end `top`.
            logging::init(cli.verbose, cli.quiet, Some("error"));
            top::run(&daemon::runtime_dir(cli, &args.runtime_dir)?)
        }
        Command::Usage(args) => {
            logging::init(cli.verbose, cli.quiet, None);
            usage::run(cli, args)
        }
        Command::Metrics(args) => {
            logging::init(cli.verbose, cli.quiet, None);
            daemon::metrics(cli, args)
        }
        Command::Reload(args) => {
            logging::init(cli.verbose, cli.quiet, None);
            daemon::control(cli, args, crate::daemon::service::Request::Reload)
        }
        Command::Stop(args) => {
            logging::init(cli.verbose, cli.quiet, None);
            daemon::control(cli, args, crate::daemon::service::Request::Stop)
        }
        Command::Config(flags) => {
            let config = cli.effective_config(flags)?;
            logging::init(cli.verbose, cli.quiet, Some(&config.log_level));
            print!("{}", config.to_ron());
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot(args) => {
            logging::init(cli.verbose, cli.quiet, None);
            snapshot::run(args)
        }
        Command::Check(args) => {
            // Problems are printed as the result; the daemon-style warnings would repeat them.
            // The script's own `print` is part of the result.
            logging::init(cli.verbose, cli.quiet, Some(&policy::quiet_filter()));
            policy::check(cli, args)
        }
        Command::Simulate(args) => {
            logging::init(cli.verbose, cli.quiet, Some(&policy::quiet_filter()));
            policy::simulate(args)
        }
        Command::Plan(args) => {
            logging::init(cli.verbose, cli.quiet, Some("warn"));
            shape::run_plan(cli, args)
        }
        Command::GenerateArtifacts { dir } => artifacts::generate(dir),
        Command::Clear(args) => {
            logging::init(cli.verbose, cli.quiet, None);
            shape::run_clear(cli, args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// An error that prints its cause and also returns it as its source, as a `thiserror`
    /// variant with a `source` field and `{source}` in its message does.
    #[derive(Debug)]
    struct Both(std::io::Error);
    impl std::fmt::Display for Both {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot open /run/shaper: {}", self.0)
        }
    }
    impl std::error::Error for Both {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_chains_say_each_cause_once() {
        let denied = || std::io::Error::from_raw_os_error(libc::EACCES);
        let e = anyhow::Error::new(Both(denied())).context("the runtime dir");
        assert_eq!(
            error_chain(&e),
            "the runtime dir: cannot open /run/shaper: Permission denied (os error 13)"
        );
        // Causes that are not repeated all appear, in order.
        let e = anyhow::Error::new(denied())
            .context("reading x")
            .context("loading y");
        assert_eq!(
            error_chain(&e),
            "loading y: reading x: Permission denied (os error 13)"
        );
        // The library's own errors print their cause without also chaining it.
        let e = crate::trust::read_text(std::path::Path::new("/nonexistent/p.lua"), false)
            .map_err(anyhow::Error::new)
            .unwrap_err();
        assert_eq!(e.chain().count(), 1, "{e:#}");
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_override_config_values() {
        let cli = Cli::try_parse_from([
            "shaper",
            "config",
            "--uplink",
            "5mbit",
            "-i",
            "eth1",
            "-i",
            "eth2",
            "--interval",
            "2s",
        ])
        .unwrap();
        let Command::Config(flags) = &cli.command else {
            panic!("parsed as config")
        };
        let mut config = Config {
            uplink: Some("1mbit".parse().unwrap()),
            month_start_day: 9,
            ..Config::default()
        };
        flags.apply(&mut config);
        assert_eq!(config.uplink.unwrap().bits_per_sec(), 5_000_000);
        assert_eq!(config.interfaces, ["eth1", "eth2"]);
        assert_eq!(config.interval.duration().as_secs(), 2);
        assert_eq!(
            config.month_start_day, 9,
            "flags not given keep the file's value"
        );
    }

    #[test]
    fn nonsense_values_are_refused_at_the_flag() {
        let msg = |args: &[&str]| {
            let mut argv = vec!["shaper", "config"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).unwrap_err().to_string()
        };
        let m = msg(&["--uplink", "0"]);
        assert!(
            m.contains("--uplink") && m.contains("smallest, 8kbit"),
            "{m}"
        );
        let m = msg(&["--rate", "0:0"]);
        assert!(m.contains("--rate") && m.contains("\"unlimited\""), "{m}");
        let m = msg(&["--uplink", "18446744073709551615bit"]);
        assert!(m.contains("the largest is 1tbit"), "{m}");
        let m = msg(&["--uplink", "0.5bit"]);
        assert!(m.contains("not a whole number"), "{m}");
        let m = msg(&["--interval", "5"]);
        assert!(m.contains("--interval") && m.contains("has no unit"), "{m}");
        let m = msg(&["--runtime-dir", ""]);
        assert!(
            m.contains("--runtime-dir") && m.contains("empty path"),
            "{m}"
        );
    }

    #[test]
    fn relative_path_flags_are_taken_from_the_current_directory() {
        let cli = Cli::try_parse_from(["shaper", "config", "--state-dir", "state"]).unwrap();
        let Command::Config(flags) = &cli.command else {
            panic!("parsed as config")
        };
        let dir = flags.state_dir.clone().unwrap();
        assert_eq!(dir, std::env::current_dir().unwrap().join("state"));
    }

    #[test]
    fn bad_flag_values_are_usage_errors_naming_the_value() {
        let err = Cli::try_parse_from(["shaper", "config", "--uplink", "30mbps"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("30mbps") && msg.contains("--uplink"), "{msg}");
    }
}
