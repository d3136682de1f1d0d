//! Stage 4, **account**: usage per period and per key, rates and class figures.
//!
//! This module defines the read side the policy sees ([`UsageView`]: `ctx.usage(period, key)` and
//! `ctx.class(name)` in Lua) and [`StaticUsage`], a fixed set of figures read from a RON file, which
//! `shaper simulate --usage FILE` and the tests use. The daemon's live accounting implements the
//! same trait.

pub mod history;
mod live;

pub use history::{Past, periods_ago};
pub(crate) use live::write_atomically;
pub use live::{
    Accounting, Charge, ConnTrack, LinkCounters, Observed, StateError, is_local, period_id,
};

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::units::Size;

/// A usage period. Periods follow local time; a month starts on the configured day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Week,
    Month,
}

impl Period {
    pub const ALL: [Period; 4] = [Period::Hour, Period::Day, Period::Week, Period::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Period::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown period {s:?}: use \"hour\", \"day\", \"week\" or \"month\"")
            })
    }
}

/// What a usage figure is counted for. Written (in policies, `--usage` files and the saved
/// usage) as `link` (the whole interface, what an ISP counts), `process:NAME`, `user:NAME` or
/// `class:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum UsageKey {
    Link,
    /// Bytes on the link no owner was found for (the link's IP bytes less every process's;
    /// ICMP, ARP and retransmitted payload are in it too), so the processes' lines and this one
    /// add up to the link.
    Unattributed,
    Process(String),
    User(String),
    Class(String),
}

impl fmt::Display for UsageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageKey::Link => f.write_str("link"),
            UsageKey::Unattributed => f.write_str("unattributed"),
            UsageKey::Process(name) => write!(f, "process:{name}"),
            UsageKey::User(name) => write!(f, "user:{name}"),
            UsageKey::Class(name) => write!(f, "class:{name}"),
        }
    }
}

impl FromStr for UsageKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "link" {
            return Ok(UsageKey::Link);
        }
        if s == "unattributed" {
            return Ok(UsageKey::Unattributed);
        }
        let parsed = s.split_once(':').and_then(|(kind, name)| {
            let name = name.to_string();
            match kind {
                "process" => Some(UsageKey::Process(name)),
                "user" => Some(UsageKey::User(name)),
                "class" => Some(UsageKey::Class(name)),
                _ => None,
            }
        });
        parsed.ok_or_else(|| {
            format!(
                "unknown usage key {s:?}: use \"link\", \"unattributed\", \"process:NAME\", \
                 \"user:NAME\" or \"class:NAME\""
            )
        })
    }
}

impl From<UsageKey> for String {
    fn from(key: UsageKey) -> String {
        key.to_string()
    }
}

impl TryFrom<String> for UsageKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Per-connection figures from accounting (zero where unknown, e.g. in `simulate`), as the
/// policy reads them (`conn.rate_up`, `conn.age`, …).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConnStats {
    /// Recent rates, bits per second.
    pub rate_up: f64,
    pub rate_down: f64,
    /// Seconds since shaper first saw the connection.
    pub age: f64,
    /// Token-bucket levels in bytes for a connection with its own limit, per direction.
    pub tokens_up: Option<f64>,
    pub tokens_down: Option<f64>,
}

/// Bytes moved in one period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Usage {
    pub up: Size,
    pub down: Size,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.up.bytes().saturating_add(self.down.bytes())
    }
}

/// A class's figures in the current cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassStats {
    /// Connections in the class.
    pub connections: u64,
    /// Recent rates, bits per second.
    pub rate_up: f64,
    pub rate_down: f64,
    /// Token-bucket levels in bytes for a class with a ceiling (as a whole), per direction:
    /// full after a second below the ceiling, negative while the class is held back.
    pub tokens_up: Option<f64>,
    pub tokens_down: Option<f64>,
}

/// A token bucket fed by observed bytes: filled at `rate` bytes per second up to `burst`
/// (one second's worth), drained by what was sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub rate: f64,
    pub burst: f64,
    pub level: f64,
}

impl Bucket {
    /// A full bucket for a limit in bits per second.
    pub fn for_limit(bits_per_second: u64) -> Bucket {
        let rate = bits_per_second as f64 / 8.0;
        Bucket {
            rate,
            burst: rate,
            level: rate,
        }
    }

    /// Refills for `seconds` and takes `bytes`. The level may go below zero (by at most ten
    /// bursts): traffic observed above the limit, e.g. before the kernel applied it.
    pub fn update(&mut self, seconds: f64, bytes: u64) {
        self.level = ((self.level + self.rate * seconds).min(self.burst) - bytes as f64)
            .max(-10.0 * self.burst);
    }
}

/// What the policy may read about usage. Implementations must be cheap: the policy may call
/// `ctx.usage` for every connection.
pub trait UsageView: Send + Sync {
    /// Usage of `key` in the current `period`; zero when nothing is known.
    fn usage(&self, period: Period, key: &UsageKey) -> Usage;
    /// Figures of a class; `None` for a class with no traffic yet.
    fn class(&self, name: &str) -> Option<ClassStats>;
    /// Usage of `key` in the `period` `ago` periods before the one containing `now` (1: the
    /// previous hour, yesterday, last month); zero when that period is not kept.
    fn usage_ago(&self, period: Period, key: &UsageKey, ago: u32, now: &jiff::Zoned) -> Usage {
        let _ = (period, key, ago, now);
        Usage::default()
    }
}

/// Fixed figures, e.g. from `shaper simulate --usage FILE`:
///
/// ```ron
/// (
///     usage: {
///         month: { "link": (up: "2GB", down: "38GB"), "user:alice": (down: "12GB") },
///         day: { "link": (down: "900MB") },
///     },
///     classes: { "bulk": (connections: 3, rate_down: 4000000) },
///     past: { day: { "2026-11-22": { "process:firefox": (down: "3GB") } } },
/// )
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticUsage {
    pub usage: BTreeMap<Period, BTreeMap<UsageKey, Usage>>,
    pub classes: BTreeMap<String, ClassStats>,
    /// Finished periods by id ([`period_id`]), for [`UsageView::usage_ago`].
    pub past: BTreeMap<Period, Arc<Past>>,
    /// The day months start on, to find past months' ids (0 reads as 1).
    pub month_start_day: u8,
}

impl StaticUsage {
    /// Reads a RON usage file; errors name the file and position.
    pub fn load(path: &Path) -> anyhow::Result<StaticUsage> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
            .from_str(&text)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}:{}: {}",
                    path.display(),
                    e.span.start.line,
                    e.span.start.col,
                    e.code
                )
            })
    }
}

impl UsageView for StaticUsage {
    fn usage(&self, period: Period, key: &UsageKey) -> Usage {
        self.usage
            .get(&period)
            .and_then(|keys| keys.get(key))
            .copied()
            .unwrap_or_default()
    }

    fn class(&self, name: &str) -> Option<ClassStats> {
        self.classes.get(name).copied()
    }

    fn usage_ago(&self, period: Period, key: &UsageKey, ago: u32, now: &jiff::Zoned) -> Usage {
        if ago == 0 {
            return self.usage(period, key);
        }
        periods_ago(period, now, ago)
            .map(|then| period_id(period, &then, self.month_start_day))
            .and_then(|id| self.past.get(&period)?.get(&id)?.get(key).copied())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_usage_parses_units_and_answers_queries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.ron");
        std::fs::write(
            &path,
            r#"(usage: { month: { "link": (up: "2GB", down: "38GB") } },
                classes: { "bulk": (connections: 3) })"#,
        )
        .unwrap();
        let u = StaticUsage::load(&path).unwrap();
        assert_eq!(
            u.usage(Period::Month, &UsageKey::Link).total(),
            40_000_000_000
        );
        assert_eq!(u.usage(Period::Day, &UsageKey::Link).total(), 0);
        assert_eq!(u.class("bulk").unwrap().connections, 3);
        std::fs::write(&path, r#"(usage: { day: { "host:x": (up: "1GB") } })"#).unwrap();
        let msg = StaticUsage::load(&path).unwrap_err().to_string();
        assert!(msg.contains("unknown usage key \"host:x\""), "{msg}");
        std::fs::write(&path, r#"(usage: { fortnight: {} })"#).unwrap();
        let msg = StaticUsage::load(&path).unwrap_err().to_string();
        assert!(
            msg.contains("usage.ron:1:") && msg.contains("fortnight"),
            "{msg}"
        );
    }

    #[test]
    fn usage_keys_read_and_write_as_text() {
        for text in [
            "link",
            "process:curl",
            "user:alice",
            "class:bulk",
            "user:a:b",
        ] {
            let key: UsageKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
        }
        assert_eq!(
            "process:curl".parse::<UsageKey>(),
            Ok(UsageKey::Process("curl".into()))
        );
        assert!("links".parse::<UsageKey>().is_err());
        assert!("pid:5".parse::<UsageKey>().is_err());
    }
}
