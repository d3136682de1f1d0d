//! The daemon's configuration: built-in defaults, then `/etc/shaper/shaper.ron` (or `--config`),
//! then command-line flags, each layer overriding the one before.
//!
//! The file is RON and strict: an unknown key is an error naming the key and its line, because a
//! misspelt `uplnk` silently ignored is a limit that never applies. Values use shaper's units
//! ([`crate::units`]): `uplink: "20mbit"`, `interval: "1s"`. Optional values may be written bare
//! (`uplink: "20mbit"`) or as `Some("20mbit")`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::{Interval, Rate, RatePair};

/// The largest `overhead` and `mpu`, bytes: sqm-scripts' range, and more than any real link's
/// framing (ATM with PPPoE over LLC/SNAP and VLAN is about 50).
pub const MAX_FRAMING_BYTES: u16 = 256;

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/shaper/shaper.ron";

/// Why the configuration could not be loaded. Messages name the file, line and key or value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{origin}: {key} = {value}: {reason}")]
    Invalid {
        origin: String,
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// Everything shaper can be configured with. Every field has a default, so an empty file (or none)
/// is a working configuration. Field docs are the reference for `shaper.ron`'s keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Interfaces to shape. Empty means the interface of the default route, looked up at start.
    pub interfaces: Vec<String>,
    /// How often the cycle (scan → policy → apply) runs.
    pub interval: Interval,
    /// The Lua policy script.
    pub script: PathBuf,
    /// The link's upload capacity. Set it a little below the real figure so the queue forms in
    /// shaper's classes rather than in the modem; unset means the link is not capped as a whole.
    pub uplink: Option<Rate>,
    /// The link's download capacity, with the same advice as `uplink`.
    pub downlink: Option<Rate>,
    /// Bytes the line below the interface adds to every packet, 0 to 256 (sqm-scripts'
    /// `overhead`): e.g. 34 for VDSL2 with PPPoE, 18 for DOCSIS, 44 for ADSL with PPPoE over
    /// LLC/SNAP (with `linklayer: atm`). Counted in every class's rate, together with the
    /// Ethernet header the kernel already counts.
    pub overhead: u16,
    /// The smallest size, in bytes, a packet is counted as (0 to 256; DOCSIS: 64).
    pub mpu: u16,
    /// `ethernet` (packets sent whole) or `atm` (ADSL: 48-byte payloads in 53-byte cells).
    pub linklayer: LinkLayer,
    /// A limit for the whole interface, `UP[:DOWN]` (nbdkit's `rate=`); unset = unlimited.
    pub rate: Option<RatePair>,
    /// A limit for each connection, `UP[:DOWN]` (nbdkit's `connection-rate=`); unset = unlimited.
    pub connection_rate: Option<RatePair>,
    /// A file holding the current `rate`, re-read every cycle (nbdkit's `rate-file=`).
    pub rate_file: Option<PathBuf>,
    /// A file holding the current `connection_rate`, re-read every cycle.
    pub connection_rate_file: Option<PathBuf>,
    /// Where usage counters are persisted so quotas survive restarts.
    pub state_dir: PathBuf,
    /// Where the control socket and pid file live.
    pub runtime_dir: PathBuf,
    /// How often usage counters are written to `state_dir` (at most this much is lost on a crash).
    pub usage_flush_interval: Interval,
    /// The day of the month on which monthly usage restarts (1–28), as in most data plans.
    pub month_start_day: u8,
    /// Log filter when neither `-v`/`-q` nor `SHAPER_LOG` says otherwise: `error`, `warn`, `info`,
    /// `debug`, `trace`, or an env-filter directive such as `shaper::shape=debug,info`.
    pub log_level: String,
    /// How connections reach their class: `auto` (the BPF first-packet classifier where the
    /// kernel allows it, else u32 filters), `bpf` (refuse to start without it) or `u32`.
    pub classifier: ClassifierChoice,
    /// The cgroup v2 directory the BPF classifier is attached to: sockets of processes in it (and
    /// below it) are classified from their first packet. Unset = the cgroup v2 mount's root.
    pub cgroup: Option<PathBuf>,
    /// A group whose members may read `shaper status` and `shaper top` without root: the
    /// control socket is then mode 0660 with this group. `reload` and `stop` stay root's.
    /// Unset = the socket is root's alone (0600).
    pub status_group: Option<String>,
    /// Serve Prometheus metrics over HTTP (`GET /metrics`) on this address, e.g.
    /// `"127.0.0.1:9639"`; unset = not served (`shaper metrics` prints them either way). The
    /// metrics name processes and users: keep the address local or firewalled.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// A program run for each event a policy raises (`shaper.notify`), with the event in its
    /// environment: `SHAPER_EVENT` (the name), `SHAPER_MESSAGE`, `SHAPER_PERIOD` and
    /// `SHAPER_TIME` (RFC 3339). Run directly (no shell), as the daemon's user, never waited
    /// for by the cycle; killed after 30 s. Unset = events are logged, counted and shown only.
    pub notify_command: Option<PathBuf>,
}

/// How connections reach their HTB class (config `classifier`, flag `--classifier`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClassifierChoice {
    /// The BPF classifier if it attaches, else u32 filters (the reason is logged once).
    #[default]
    Auto,
    /// The BPF classifier; the daemon refuses to start without it.
    Bpf,
    /// u32 filters made from each cycle's scan (no BPF).
    U32,
}

/// The link layer under the shaped interface (config `linklayer`, flag `--linklayer`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LinkLayer {
    /// Packets are sent whole (Ethernet, VDSL2, DOCSIS, fibre).
    #[default]
    Ethernet,
    /// Packets are cut into 53-byte ATM cells carrying 48 bytes each (ADSL, ADSL2+).
    Atm,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interfaces: Vec::new(),
            interval: Interval::from_millis(1000),
            script: PathBuf::from("/etc/shaper/policy.lua"),
            uplink: None,
            downlink: None,
            overhead: 0,
            mpu: 0,
            linklayer: LinkLayer::Ethernet,
            rate: None,
            connection_rate: None,
            rate_file: None,
            connection_rate_file: None,
            state_dir: PathBuf::from("/var/lib/shaper"),
            runtime_dir: PathBuf::from("/run/shaper"),
            usage_flush_interval: Interval::from_millis(10_000),
            month_start_day: 1,
            log_level: "info".to_string(),
            classifier: ClassifierChoice::Auto,
            cgroup: None,
            status_group: None,
            metrics_listen: None,
            notify_command: None,
        }
    }
}

fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
}

impl Config {
    /// Loads `path`, or the defaults when `path` is the default location and does not exist.
    /// An explicitly named file (`--config`) that is missing is an error: the user meant a file.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(error) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                error,
            }),
        }
    }

    /// Parses RON text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = ron_options()
            .from_str(text)
            .map_err(|e| ConfigError::Parse {
                path: origin.to_path_buf(),
                line: e.span.start.line,
                col: e.span.start.col,
                message: e.code.to_string(),
            })?;
        config.validate(&origin.display().to_string())?;
        Ok(config)
    }

    /// Checks values that parse but cannot work; `origin` says where they came from.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key, value: String, reason: &str| ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            value,
            reason: reason.to_string(),
        };
        if !(1..=28).contains(&self.month_start_day) {
            return Err(invalid(
                "month_start_day",
                self.month_start_day.to_string(),
                "use a day from 1 to 28 (29–31 do not exist in every month)",
            ));
        }
        if self.interval.duration().as_millis() < 100 {
            return Err(invalid(
                "interval",
                self.interval.to_string(),
                "use at least 100ms; shorter cycles cost CPU without shaping sooner",
            ));
        }
        if self.usage_flush_interval.duration().is_zero() {
            return Err(invalid(
                "usage_flush_interval",
                self.usage_flush_interval.to_string(),
                "use a positive interval such as \"10s\"",
            ));
        }
        for (key, value) in [("overhead", self.overhead), ("mpu", self.mpu)] {
            if value > MAX_FRAMING_BYTES {
                return Err(invalid(
                    key,
                    value.to_string(),
                    "use 0 to 256 bytes (sqm-scripts' range); common overheads are 18 (DOCSIS), \
                     34 (VDSL2/PPPoE) and 44 (ADSL/PPPoE)",
                ));
            }
        }
        for (key, path) in self.paths() {
            if let Err(reason) = check_absolute(path) {
                return Err(invalid(
                    key,
                    format!("{:?}", path.display().to_string()),
                    &reason,
                ));
            }
        }
        for name in &self.interfaces {
            if let Err(reason) = check_interface_name(name) {
                return Err(invalid("interfaces", format!("{name:?}"), &reason));
            }
        }
        if let Some(group) = &self.status_group
            && let Err(reason) = check_group_name(group)
        {
            return Err(invalid("status_group", format!("{group:?}"), &reason));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log_level) {
            return Err(invalid(
                "log_level",
                format!("{:?}", self.log_level),
                &format!("{e}; use error, warn, info, debug or trace"),
            ));
        }
        Ok(())
    }

    /// Every path-valued key with its name: the daemon resolves them from wherever it was
    /// started, so each must be absolute (an empty `runtime_dir` put the socket in the cwd).
    fn paths(&self) -> Vec<(&'static str, &Path)> {
        let mut paths = vec![
            ("script", self.script.as_path()),
            ("state_dir", self.state_dir.as_path()),
            ("runtime_dir", self.runtime_dir.as_path()),
        ];
        paths.extend(self.rate_file.as_deref().map(|p| ("rate_file", p)));
        paths.extend(
            self.connection_rate_file
                .as_deref()
                .map(|p| ("connection_rate_file", p)),
        );
        paths.extend(self.cgroup.as_deref().map(|p| ("cgroup", p)));
        paths.extend(
            self.notify_command
                .as_deref()
                .map(|p| ("notify_command", p)),
        );
        paths
    }

    /// The configuration as commented RON, the way `shaper config` prints it.
    pub fn to_ron(&self) -> String {
        let pretty = ron::ser::PrettyConfig::new().struct_names(false);
        let body = ron_options()
            .to_string_pretty(self, pretty)
            .expect("Config always serialises");
        format!(
            "// shaper's effective configuration (defaults, then the config file, then flags).\n\
             // Unset optional keys print as None; `interfaces: []` means the default route's interface.\n\
             {body}\n"
        )
    }
}

/// A limit read from a file every cycle, with nbdkit's `rate-file=` rules: a file absent from
/// the start gives the default; a file that disappears keeps its last value (so a writer can
/// replace it non-atomically without a gap); a file that cannot be parsed or is refused keeps the
/// last value and is reported once per distinct problem. Writers should replace the file
/// atomically.
///
/// Running as root, the file and its folders must be root's and not writable by others, as for
/// the policy ([`crate::trust`]); only a regular file of at most
/// [`crate::trust::SMALL_FILE_LIMIT`] bytes is read, and its content never appears in a message
/// (a rate file pointed at `/etc/shadow` must not print its first word in the log).
#[derive(Debug, Clone)]
pub struct RateFile {
    pub path: PathBuf,
    /// Apply the ownership rule.
    pub strict: bool,
    last: Option<RatePair>,
    /// The current problem, reported once: a key (a hash of the content that did not parse,
    /// never the content itself, or the refusal) and the message.
    problem: Option<(String, String)>,
}

impl RateFile {
    /// `strict`: apply the ownership rule (running as root without `--allow-insecure-script`).
    pub fn new(path: impl Into<PathBuf>, strict: bool) -> RateFile {
        RateFile {
            path: path.into(),
            strict,
            last: None,
            problem: None,
        }
    }

    /// The current value: the file's, or the last good one, or `default`.
    pub fn current(&mut self, default: Option<RatePair>) -> Option<RatePair> {
        let problem = match crate::trust::read_small(&self.path, self.strict) {
            Err(e) if e.is_not_found() => None,
            Err(e) => Some((e.to_string(), e.to_string())),
            Ok(bytes) => match std::str::from_utf8(&bytes).ok().map(|t| t.trim().parse()) {
                Some(Ok(value)) => {
                    self.last = Some(value);
                    None
                }
                _ => {
                    use std::hash::{Hash, Hasher};
                    let mut hash = std::hash::DefaultHasher::new();
                    bytes.hash(&mut hash);
                    Some((
                        format!("content {:x}", hash.finish()),
                        format!(
                            "rate file {}: not a rate (expected one like `2mbit` or \
                             `2mbit:8mbit`)",
                            self.path.display()
                        ),
                    ))
                }
            },
        };
        if let Some((key, message)) = &problem
            && self.problem.as_ref().map(|(k, _)| k) != Some(key)
        {
            tracing::warn!(
                "{message}; keeping {}",
                self.last
                    .or(default)
                    .map_or_else(|| "no limit".to_string(), |r| r.to_string())
            );
        }
        self.problem = problem;
        self.last.or(default)
    }

    /// Why the file's value is not in force, if it is not (for `status`).
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_ref().map(|(_, message)| message.as_str())
    }
}

/// The interface of the default route (IPv4 first, then IPv6), as the kernel reports it in
/// `/proc/net/route` and `/proc/net/ipv6_route`; the lowest metric wins.
pub fn default_route_interface() -> Option<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let best_v4 = v4
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask …
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000")
                .then(|| (f[6].parse::<u32>().unwrap_or(u32::MAX), f[0].to_string()))
        })
        .min();
    if let Some((_, name)) = best_v4 {
        return Some(name);
    }
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    v6.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // dest prefixlen src srclen nexthop metric refcnt use flags iface
            (f.len() == 10 && f[0].chars().all(|c| c == '0') && f[1] == "00" && f[9] != "lo").then(
                || {
                    (
                        u32::from_str_radix(f[5], 16).unwrap_or(u32::MAX),
                        f[9].to_string(),
                    )
                },
            )
        })
        .min()
        .map(|(_, name)| name)
}

impl Config {
    /// The interfaces to shape: the configured ones, or the default route's.
    pub fn shaped_interfaces(&self) -> Result<Vec<String>, ConfigError> {
        if !self.interfaces.is_empty() {
            return Ok(self.interfaces.clone());
        }
        default_route_interface()
            .map(|i| vec![i])
            .ok_or_else(|| ConfigError::Invalid {
                origin: "the routing table".into(),
                key: "interfaces",
                value: "[]".into(),
                reason: "there is no default route to take the interface from; name one with \
                     --interface or `interfaces` in shaper.ron"
                    .into(),
            })
    }
}

/// A path the daemon may rely on whatever its working directory: not empty, and absolute.
pub fn check_absolute(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err(
            "an empty path would mean the current directory; write an absolute path".into(),
        );
    }
    if !path.is_absolute() {
        return Err(
            "a relative path depends on the directory shaper is started from; write an absolute \
             path (starting with /)"
                .into(),
        );
    }
    Ok(())
}

/// Linux interface names: 1–15 bytes, no `/`, no white space, not `.` or `..`.
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err("interface names are 1 to 15 characters long".into());
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err("interface names cannot contain '/', ':' or spaces".into());
    }
    Ok(())
}

/// A group name as `groupadd` accepts it (what the daemon looks up at start).
fn check_group_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err("use an existing group's name (letters, digits, '_', '-', '.'), e.g. \"shaper\"".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_files_never_show_their_content_and_follow_the_ownership_rule() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("rate");
        let default = Some("1mbit".parse().unwrap());
        let mut file = RateFile::new(&path, true);
        assert_eq!(file.current(default), default, "absent: the default");
        std::fs::write(&path, "2mbit:8mbit\n").unwrap();
        let good = Some("2mbit:8mbit".parse().unwrap());
        assert_eq!(file.current(default), good);
        assert_eq!(file.problem(), None);

        std::fs::write(&path, "root:$6$secret:19000:0:99999:7:::\n").unwrap();
        assert_eq!(
            file.current(default),
            good,
            "malformed: keeps the last value"
        );
        let problem = file.problem().unwrap().to_string();
        assert!(problem.contains("not a rate"), "{problem}");
        assert!(
            !problem.contains("root") && !problem.contains("secret"),
            "{problem}"
        );

        // Another user's file is refused as root, whatever it holds.
        std::fs::write(&path, "50mbit").unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        assert_eq!(file.current(default), good);
        let problem = file.problem().unwrap();
        assert!(
            problem.contains("owned by uid 65534, not root"),
            "{problem}"
        );
        // …and read without the rule.
        file.strict = false;
        assert_eq!(file.current(default), Some("50mbit".parse().unwrap()));
    }

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/shaper/shaper.ron")).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("()").unwrap(), Config::default());
        assert_eq!(parse("").unwrap_or_default(), Config::default());
    }

    #[test]
    fn values_use_shaper_units_and_bare_options() {
        let c = parse(
            r#"(
                interfaces: ["eth0", "wlan0"],
                interval: "500ms",
                uplink: "20mbit",
                downlink: Some("100mbit"),
                rate: "2mbit:8mbit",
                month_start_day: 15,
            )"#,
        )
        .unwrap();
        assert_eq!(c.interfaces, ["eth0", "wlan0"]);
        assert_eq!(c.interval.duration().as_millis(), 500);
        assert_eq!(c.uplink.unwrap().bits_per_sec(), 20_000_000);
        assert_eq!(c.downlink.unwrap().bits_per_sec(), 100_000_000);
        assert_eq!(c.rate.unwrap().down.unwrap().bits_per_sec(), 8_000_000);
        assert_eq!(c.month_start_day, 15);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let msg = parse("(\n  interval: \"1s\",\n  uplnk: \"20mbit\",\n)").unwrap_err();
        assert!(msg.starts_with("/etc/shaper/shaper.ron:3:"), "{msg}");
        assert!(msg.contains("uplnk"), "{msg}");
    }

    #[test]
    fn bad_unit_names_the_value_and_line() {
        let msg = parse("(\n  uplink: \"30mbps\",\n)").unwrap_err();
        assert!(msg.starts_with("/etc/shaper/shaper.ron:2:"), "{msg}");
        assert!(msg.contains("30mbps") && msg.contains("ambiguous"), "{msg}");
    }

    #[test]
    fn invalid_values_name_key_and_fix() {
        let msg = parse("(month_start_day: 31)").unwrap_err();
        assert!(
            msg.contains("month_start_day = 31") && msg.contains("1 to 28"),
            "{msg}"
        );
        let msg = parse("(interval: \"10ms\")").unwrap_err();
        assert!(
            msg.contains("interval = 10ms") && msg.contains("100ms"),
            "{msg}"
        );
        let msg = parse("(interfaces: [\"a-very-long-interface-name\"])").unwrap_err();
        assert!(
            msg.contains("a-very-long-interface-name") && msg.contains("15"),
            "{msg}"
        );
        let msg = parse("(status_group: \"wheel; rm\")").unwrap_err();
        assert!(
            msg.contains("status_group = \"wheel; rm\"") && msg.contains("existing group"),
            "{msg}"
        );
        let msg = parse("(log_level: \"shaper=loud\")").unwrap_err();
        assert!(
            msg.contains("log_level") && msg.contains("shaper=loud"),
            "{msg}"
        );
    }

    #[test]
    fn metrics_and_notify_keys_are_checked() {
        let c =
            parse(r#"(metrics_listen: "127.0.0.1:9639", notify_command: "/usr/local/bin/hook")"#)
                .unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9639".parse().unwrap()));
        assert_eq!(
            c.notify_command.as_deref(),
            Some(Path::new("/usr/local/bin/hook"))
        );
        let msg = parse(r#"(metrics_listen: "localhost")"#).unwrap_err();
        assert!(msg.contains("shaper.ron:1:"), "{msg}");
        let msg = parse(r#"(notify_command: "hook.sh")"#).unwrap_err();
        assert!(msg.contains("notify_command = \"hook.sh\""), "{msg}");
    }

    #[test]
    fn empty_and_relative_paths_are_refused_naming_the_key() {
        for (text, key) in [
            ("(runtime_dir: \"\")", "runtime_dir"),
            ("(state_dir: \"state\")", "state_dir"),
            ("(script: \"./policy.lua\")", "script"),
            ("(rate_file: \"rate\")", "rate_file"),
            ("(connection_rate_file: \"\")", "connection_rate_file"),
            ("(cgroup: \"shaper\")", "cgroup"),
        ] {
            let msg = parse(text).unwrap_err();
            assert!(
                msg.contains(&format!("{key} = ")) && msg.contains("absolute path"),
                "{text}: {msg}"
            );
        }
        assert!(parse("(runtime_dir: \"/run/shaper-test\")").is_ok());
    }

    #[test]
    fn link_layer_keys_parse_and_are_bounded() {
        let c = Config::parse(
            "(overhead: 44, mpu: 64, linklayer: atm)",
            Path::new("/etc/shaper/shaper.ron"),
        )
        .unwrap();
        assert_eq!((c.overhead, c.mpu, c.linklayer), (44, 64, LinkLayer::Atm));
        assert_eq!(Config::default().linklayer, LinkLayer::Ethernet);
        for (text, key) in [
            ("(overhead: 300)", "overhead = 300"),
            ("(mpu: 257)", "mpu = 257"),
        ] {
            let msg = parse(text).unwrap_err();
            assert!(
                msg.contains(key) && msg.contains("0 to 256"),
                "{text}: {msg}"
            );
        }
        let msg = parse("(linklayer: adsl)").unwrap_err();
        assert!(msg.contains("adsl"), "{msg}");
    }

    #[test]
    fn one_unit_rule_for_bare_numbers() {
        let msg = parse("(\n  interval: 5,\n)").unwrap_err();
        assert!(
            msg.starts_with("/etc/shaper/shaper.ron:2:") && msg.contains("has no unit"),
            "{msg}"
        );
        let msg = parse("(usage_flush_interval: \"10\")").unwrap_err();
        assert!(msg.contains("has no unit"), "{msg}");
        let msg = parse("(uplink: 0)").unwrap_err();
        assert!(msg.contains("smallest, 8kbit"), "{msg}");
        let msg = parse("(rate: \"0:0\")").unwrap_err();
        assert!(msg.contains("smallest, 8kbit"), "{msg}");
        let msg = parse("(downlink: \"18446744073709551615bit\")").unwrap_err();
        assert!(msg.contains("the largest is 1tbit"), "{msg}");
        assert_eq!(
            parse("(uplink: 20000000)")
                .unwrap()
                .uplink
                .unwrap()
                .bits_per_sec(),
            20_000_000
        );
    }

    #[test]
    fn missing_default_file_means_defaults_but_missing_named_file_is_an_error() {
        let missing = Path::new("/nonexistent/shaper.ron");
        assert_eq!(Config::load(missing, false).unwrap(), Config::default());
        let msg = Config::load(missing, true).unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/shaper.ron"), "{msg}");
    }

    /// Issue 28, item 4: the shipped `shaper.ron` (what the packages install) sets every key the
    /// configuration has, to its default, each under a comment (a comment may cover a group of
    /// keys, such as uplink and downlink).
    #[test]
    fn the_shipped_config_has_every_key_commented_and_at_its_default() {
        let text = include_str!("../packaging/etc/shaper.ron");
        assert_eq!(
            parse(text).unwrap(),
            Config::default(),
            "the defaults, shown"
        );
        let defaults = Config::default().to_ron();
        let key = |line: &str| {
            let (name, _) = line.trim().split_once(':')?;
            (line.starts_with("    ")
                && !line.trim_start().starts_with("//")
                && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .then(|| name.to_string())
        };
        let expected: Vec<String> = defaults.lines().filter_map(key).collect();
        assert!(expected.len() >= 20, "{defaults}");
        let lines: Vec<&str> = text.lines().collect();
        let shipped: Vec<String> = lines.iter().filter_map(|l| key(l)).collect();
        assert_eq!(shipped, expected, "every key, in the struct's order");
        for (i, line) in lines.iter().enumerate() {
            let Some(name) = key(line) else { continue };
            let commented = lines[..i]
                .iter()
                .rev()
                .find(|l| key(l).is_none())
                .is_some_and(|l| l.trim_start().starts_with("//"));
            assert!(commented, "{name} has no comment above it");
        }
    }

    #[test]
    fn printed_config_parses_back() {
        let c = Config {
            uplink: Some("20mbit".parse().unwrap()),
            connection_rate: Some("1mbit:unlimited".parse().unwrap()),
            interfaces: vec!["eth0".into()],
            classifier: ClassifierChoice::U32,
            cgroup: Some("/sys/fs/cgroup/user.slice".into()),
            status_group: Some("shaper".into()),
            ..Config::default()
        };
        assert_eq!(parse(&c.to_ron()).unwrap(), c);
        assert_eq!(
            parse(&Config::default().to_ron()).unwrap(),
            Config::default()
        );
    }
}
