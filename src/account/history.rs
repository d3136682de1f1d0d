//! Usage history: the figures of finished periods, so `shaper usage` and policies
//! (`ctx.usage(period, key, ago)`) can read yesterday or last month.
//!
//! Accounting keeps the current period of each length in its books (`usage.ron`); when a period
//! ends its book is archived here, in `history.ron` beside it. Only hours, days and months are
//! kept (see [`RETENTION`]); weeks are not.
//!
//! **Bounds.** The file must stay small with any number of programs: each archived period keeps
//! the link's figure and, per kind (`process`, `user`, `class`), the names with the most bytes
//! (20 per hour, 30 per day, 100 per month); the others are summed under the name
//! [`OTHER`]. The oldest periods are dropped beyond 48 hours, 400 days and 36 months. With
//! those caps the file stays under [`SIZE_BOUND`] whatever the traffic (see the test with 1,000
//! process names over 400 days).
//!
//! **Durability.** The file is written atomically like `usage.ron`, at the same flush, and only
//! when a period was archived since the last write. A period ended but not yet written when the
//! daemon is killed is still in `usage.ron` (as of its last flush), from which the next start
//! archives it: the loss is at most one flush interval.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Period, StateError, Usage, UsageKey};
use crate::units::Size;

/// Version of the history file format.
const HISTORY_VERSION: u32 = 1;

/// The name past periods sum the names beyond their cap under, per kind: `process:(other)`.
pub const OTHER: &str = "(other)";

/// What is kept of each period length: how many periods, and how many names per kind in each.
pub const RETENTION: [(Period, usize, usize); 3] = [
    (Period::Hour, 48, 20),
    (Period::Day, 400, 30),
    (Period::Month, 36, 100),
];

/// The most the history file takes with the caps of [`RETENTION`] full in every period, names
/// of up to 32 bytes (process names have at most 15) and figures of up to 100 GB: what the size
/// test asserts (it measures about 3.2 MB).
pub const SIZE_BOUND: u64 = 4 << 20;

/// Bytes per key in one period.
pub type Figures = BTreeMap<UsageKey, Usage>;

/// Past periods of one length by id (`2026-11-22`, `2026-11-22T10`, `2026-11 from day 1`), which
/// sort in time order.
pub type Past = BTreeMap<String, Figures>;

/// Finished periods, shared cheaply with each cycle's view (`Arc`): a period is archived once an
/// hour at most, so the copy-on-write copy is rare.
#[derive(Debug, Clone, Default)]
pub struct History {
    periods: BTreeMap<Period, Arc<Past>>,
    /// Archived to since the last save.
    dirty: bool,
}

/// One period as stored: per key, (up, down) bytes.
type StoredFigures = BTreeMap<UsageKey, (u64, u64)>;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    version: u32,
    /// Per period length, per period id.
    periods: BTreeMap<Period, BTreeMap<String, StoredFigures>>,
}

fn retention(period: Period) -> Option<(usize, usize)> {
    RETENTION
        .iter()
        .find(|(p, ..)| *p == period)
        .map(|&(_, keep, names)| (keep, names))
}

/// Keeps the link and, per kind, the `names` biggest keys; sums the rest under [`OTHER`].
fn cap(usage: Figures, names: usize) -> Figures {
    let mut by_kind: BTreeMap<u8, Vec<(UsageKey, Usage)>> = BTreeMap::new();
    let mut out = Figures::new();
    for (key, u) in usage {
        let kind = match key {
            UsageKey::Link | UsageKey::Unattributed => {
                out.insert(key, u);
                continue;
            }
            UsageKey::Process(_) => 0,
            UsageKey::User(_) => 1,
            UsageKey::Class(_) => 2,
        };
        by_kind.entry(kind).or_default().push((key, u));
    }
    for (kind, mut keys) in by_kind {
        keys.sort_by_key(|(_, u)| std::cmp::Reverse(u.total()));
        let mut rest = keys.split_off(keys.len().min(names));
        out.extend(keys);
        if rest.is_empty() {
            continue;
        }
        let other = match kind {
            0 => UsageKey::Process(OTHER.into()),
            1 => UsageKey::User(OTHER.into()),
            _ => UsageKey::Class(OTHER.into()),
        };
        let sum = rest
            .drain(..)
            .fold(Usage::default(), |a, (_, u)| plus(a, u));
        let slot = out.entry(other).or_default();
        *slot = plus(*slot, sum);
    }
    out
}

fn plus(a: Usage, b: Usage) -> Usage {
    Usage {
        up: Size::from_bytes(a.up.bytes().saturating_add(b.up.bytes())),
        down: Size::from_bytes(a.down.bytes().saturating_add(b.down.bytes())),
    }
}

/// The instant `ago` periods before `now` (calendar days and months in `now`'s zone, so a DST
/// day is one day), or `None` out of range.
pub fn periods_ago(period: Period, now: &jiff::Zoned, ago: u32) -> Option<jiff::Zoned> {
    let n = i64::from(ago);
    let span = match period {
        Period::Hour => jiff::Span::new().try_hours(n),
        Period::Day => jiff::Span::new().try_days(n),
        Period::Week => jiff::Span::new().try_weeks(n),
        Period::Month => jiff::Span::new().try_months(n),
    }
    .ok()?;
    now.checked_sub(span).ok()
}

/// When the period `id` (as [`super::period_id`] writes it) starts, in local civil time.
pub fn period_start(period: Period, id: &str) -> Option<jiff::civil::DateTime> {
    match period {
        Period::Hour => {
            let (date, hour) = id.split_once('T')?;
            let date: jiff::civil::Date = date.parse().ok()?;
            Some(date.at(hour.parse().ok()?, 0, 0, 0))
        }
        Period::Day => id
            .parse::<jiff::civil::Date>()
            .ok()
            .map(|d| d.at(0, 0, 0, 0)),
        Period::Week => {
            let date: jiff::civil::Date = id.strip_prefix("week of ")?.parse().ok()?;
            Some(date.at(0, 0, 0, 0))
        }
        Period::Month => {
            let (month, day) = id.split_once(" from day ")?;
            let date: jiff::civil::Date = format!("{month}-{:02}", day.parse::<i8>().ok()?)
                .parse()
                .ok()?;
            Some(date.at(0, 0, 0, 0))
        }
    }
}

/// The history file beside the usage file.
pub fn history_path(usage_path: &Path) -> PathBuf {
    usage_path.with_file_name("history.ron")
}

impl History {
    /// Keeps a finished period (capped); a period length that is not kept is ignored. Replaces
    /// what was kept under the same id.
    pub fn archive(&mut self, period: Period, id: String, usage: Figures) {
        let Some((keep, names)) = retention(period) else {
            return;
        };
        if id.is_empty() || usage.is_empty() {
            return;
        }
        let past = Arc::make_mut(self.periods.entry(period).or_default());
        past.insert(id, cap(usage, names));
        while past.len() > keep {
            past.pop_first();
        }
        self.dirty = true;
    }

    /// As [`History::archive`] unless the period is already kept: the file written after the
    /// period ended has more than a `usage.ron` written before.
    pub fn archive_if_absent(&mut self, period: Period, id: String, usage: Figures) {
        if !self
            .periods
            .get(&period)
            .is_some_and(|p| p.contains_key(&id))
        {
            self.archive(period, id, usage);
        }
    }

    /// The kept periods of each length.
    pub fn periods(&self) -> &BTreeMap<Period, Arc<Past>> {
        &self.periods
    }

    /// Writes the file (atomically) if anything was archived since the last write.
    pub fn save(&mut self, path: &Path) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let stored = Stored {
            version: HISTORY_VERSION,
            periods: self
                .periods
                .iter()
                .map(|(p, past)| {
                    let past = past
                        .iter()
                        .map(|(id, usage)| {
                            let usage = usage
                                .iter()
                                .map(|(k, u)| (k.clone(), (u.up.bytes(), u.down.bytes())))
                                .collect();
                            (id.clone(), usage)
                        })
                        .collect();
                    (*p, past)
                })
                .collect(),
        };
        // One line per period: readable, and a third of the pretty form's size.
        let pretty = ron::ser::PrettyConfig::new().depth_limit(3);
        let text = ron::ser::to_string_pretty(&stored, pretty).map_err(std::io::Error::other)?;
        super::live::write_atomically(path, &text)?;
        self.dirty = false;
        Ok(())
    }

    /// Reads the file; a missing one is an empty history.
    pub fn read(path: &Path) -> Result<History, StateError> {
        let Some(bytes) = super::live::read_state(path, "the usage history")? else {
            return Ok(History::default());
        };
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            StateError::Corrupt(format!("usage history {} is corrupt ({e})", path.display()))
        })?;
        let stored: Stored = ron::from_str(text).map_err(|e| {
            StateError::Corrupt(format!("usage history {} is corrupt ({e})", path.display()))
        })?;
        if stored.version != HISTORY_VERSION {
            return Err(StateError::Corrupt(format!(
                "usage history {} has version {} (expected {HISTORY_VERSION})",
                path.display(),
                stored.version
            )));
        }
        let periods = stored
            .periods
            .into_iter()
            .map(|(p, past)| {
                let past = past
                    .into_iter()
                    .map(|(id, usage)| {
                        let usage = usage
                            .into_iter()
                            .map(|(k, (up, down))| {
                                let u = Usage {
                                    up: Size::from_bytes(up),
                                    down: Size::from_bytes(down),
                                };
                                (k, u)
                            })
                            .collect();
                        (id, usage)
                    })
                    .collect();
                (p, Arc::new(past))
            })
            .collect();
        Ok(History {
            periods,
            dirty: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_beyond_the_cap_are_summed_and_the_oldest_dropped() {
        let mut h = History::default();
        for day in 0..402u32 {
            let mut usage = Figures::new();
            usage.insert(
                UsageKey::Link,
                Usage {
                    up: Size::from_bytes(1),
                    down: Size::from_bytes(2),
                },
            );
            for i in 0..60u64 {
                usage.insert(
                    UsageKey::Process(format!("p{i}")),
                    Usage {
                        up: Size::from_bytes(i),
                        down: Size::from_bytes(0),
                    },
                );
            }
            h.archive(Period::Day, format!("day {day:03}"), usage);
        }
        let days = &h.periods()[&Period::Day];
        assert_eq!(days.len(), 400);
        assert_eq!(
            days.keys().next().unwrap(),
            "day 002",
            "the two oldest dropped"
        );
        let last = &days["day 401"];
        // The link, the 30 biggest and "(other)" holding p0..p29 (0+1+…+29 bytes).
        assert_eq!(last.len(), 32);
        assert_eq!(last[&UsageKey::Process(OTHER.into())].up.bytes(), 435);
        assert!(last.contains_key(&UsageKey::Process("p59".into())));
        assert!(!last.contains_key(&UsageKey::Process("p29".into())));
        h.archive(Period::Week, "week of 2026-11-16".into(), last.clone());
        let start = |p, id| period_start(p, id).map(|d| d.to_string());
        assert_eq!(
            start(Period::Hour, "2026-11-22T10").as_deref(),
            Some("2026-11-22T10:00:00")
        );
        assert_eq!(
            start(Period::Month, "2026-10 from day 15").as_deref(),
            Some("2026-10-15T00:00:00")
        );
        assert_eq!(
            start(Period::Day, "2026-11-22").as_deref(),
            Some("2026-11-22T00:00:00")
        );
        assert!(
            !h.periods().contains_key(&Period::Week),
            "weeks are not kept"
        );
    }
}
