//! Live accounting: byte deltas per cycle, recent rates, and usage per period, persisted so
//! quotas survive restarts and crashes.
//!
//! Sources: the interface's own counters (what an ISP counts) for the `link` key, and sock_diag's
//! TCP byte counters for per-connection figures attributed to `process:NAME`, `user:NAME` and
//! `class:NAME`. UDP has no per-socket counters; it is in `link` but not in the per-key figures.
//!
//! Periods follow local civil time from the zone of `now` (hour, day, ISO week from Monday,
//! month from `month_start_day`), computed afresh every cycle: a DST change moves the day's end
//! with the clock, and after a suspend the first cycle sees the new period and starts it from
//! zero. Everything takes `now` as an argument, so tests step a clock instead of sleeping.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Bucket, ClassStats, ConnStats, Period, StaticUsage, Usage, UsageKey};
use crate::process::Process;
use crate::scan::Socket;
use crate::units::{Rate, RatePair, Size};

/// Seconds over which recent rates are averaged.
const RATE_WINDOW: f64 = 2.0;
/// Version of the state file format.
const STATE_VERSION: u32 = 1;

/// An interface's byte counters (from the kernel's link statistics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkCounters {
    pub interface: String,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// What accounting keeps about one connection between cycles: its field in the flow table's
/// record (accounting keeps no map of connections of its own).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnTrack {
    up: u64,
    down: u64,
    first_seen: i64,
    last_seen: i64,
    rate_up: f64,
    rate_down: f64,
    /// Buckets for the connection's own limit, per direction.
    buckets: [Option<Bucket>; 2],
}

impl ConnTrack {
    /// The figures the policy reads.
    pub fn stats(&self) -> ConnStats {
        ConnStats {
            rate_up: self.rate_up,
            rate_down: self.rate_down,
            age: (self.last_seen - self.first_seen) as f64,
            tokens_up: self.buckets[0].map(|b| b.level),
            tokens_down: self.buckets[1].map(|b| b.level),
        }
    }
}

/// One connection as accounting sees it in a cycle: its counters, who and what it is counted
/// for, and its track (taken and put back).
pub struct Observed<'a> {
    pub socket: &'a Socket,
    pub process: Option<&'a Process>,
    pub class: &'a str,
    pub limit: RatePair,
    pub track: &'a mut Option<ConnTrack>,
}

/// Keeps `slot` a bucket for `limit` (a new one when the limit changed), or none.
fn keep_bucket(slot: &mut Option<Bucket>, limit: Option<u64>) {
    match limit {
        None => *slot = None,
        Some(bits) => {
            let fresh = Bucket::for_limit(bits);
            if slot.is_none_or(|b| b.rate != fresh.rate) {
                *slot = Some(fresh);
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Book {
    /// Which period the figures belong to, e.g. `2026-11-22` for a day.
    id: String,
    usage: BTreeMap<UsageKey, Usage>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    version: u32,
    /// Unix time of the save.
    saved_at: i64,
    periods: BTreeMap<Period, Book>,
}

/// The accounting state of a running daemon.
#[derive(Debug)]
pub struct Accounting {
    month_start_day: u8,
    books: BTreeMap<Period, Book>,
    links: BTreeMap<String, (u64, u64)>,
    classes: BTreeMap<String, ClassStats>,
    class_buckets: BTreeMap<String, [Option<Bucket>; 2]>,
    last: Option<jiff::Timestamp>,
}

/// The id of the period containing `now`.
pub fn period_id(period: Period, now: &jiff::Zoned, month_start_day: u8) -> String {
    let date = now.date();
    match period {
        Period::Hour => format!("{date}T{:02}", now.hour()),
        Period::Day => date.to_string(),
        Period::Week => {
            let back = i64::from(now.weekday().to_monday_zero_offset());
            let monday = date
                .checked_sub(jiff::Span::new().days(back))
                .unwrap_or(date);
            format!("week of {monday}")
        }
        Period::Month => {
            let start = i8::try_from(month_start_day).unwrap_or(1).clamp(1, 28);
            let (mut year, mut month) = (date.year(), date.month());
            if date.day() < start {
                if month == 1 {
                    year -= 1;
                    month = 12;
                } else {
                    month -= 1;
                }
            }
            format!("{year:04}-{month:02} from day {start}")
        }
    }
}

fn add(usage: &mut BTreeMap<UsageKey, Usage>, key: &UsageKey, up: u64, down: u64) {
    if up == 0 && down == 0 {
        return;
    }
    let u = match usage.get_mut(key) {
        Some(u) => u,
        None => usage.entry(key.clone()).or_default(),
    };
    u.up = Size::from_bytes(u.up.bytes().saturating_add(up));
    u.down = Size::from_bytes(u.down.bytes().saturating_add(down));
}

impl Accounting {
    pub fn new(month_start_day: u8) -> Accounting {
        Accounting {
            month_start_day,
            books: BTreeMap::new(),
            links: BTreeMap::new(),
            classes: BTreeMap::new(),
            class_buckets: BTreeMap::new(),
            last: None,
        }
    }

    /// Starts new periods whose time has come (their figures start from zero).
    fn roll(&mut self, now: &jiff::Zoned) {
        for period in Period::ALL {
            let id = period_id(period, now, self.month_start_day);
            let book = self.books.entry(period).or_default();
            if book.id != id {
                *book = Book {
                    id,
                    usage: BTreeMap::new(),
                };
            }
        }
    }

    /// Takes one cycle's counters: every live connection (their tracks are updated in place;
    /// a connection not given here is gone), the ceilings of the classes limited as a whole
    /// (`each = "class"`), and the interfaces' counters.
    pub fn observe<'a>(
        &mut self,
        now: &jiff::Zoned,
        connections: impl IntoIterator<Item = Observed<'a>>,
        class_ceilings: &[(&str, RatePair)],
        links: &[LinkCounters],
    ) {
        self.roll(now);
        let t = now.timestamp();
        let dt = self
            .last
            .map(|l| (t.as_millisecond() - l.as_millisecond()) as f64 / 1000.0)
            .filter(|dt| *dt > 0.0);
        let first_cycle = self.last.is_none();
        self.last = Some(t);
        let alpha = dt.map_or(1.0, |dt| 1.0 - (-dt / RATE_WINDOW).exp());

        for l in links {
            let (up, down) = match self.links.get(&l.interface) {
                // A counter that went down belongs to a re-created interface: start again.
                Some(&(tx, rx)) if l.tx_bytes >= tx && l.rx_bytes >= rx => {
                    (l.tx_bytes - tx, l.rx_bytes - rx)
                }
                _ => (0, 0),
            };
            self.links
                .insert(l.interface.clone(), (l.tx_bytes, l.rx_bytes));
            for book in self.books.values_mut() {
                add(&mut book.usage, &UsageKey::Link, up, down);
            }
        }

        let mut classes: BTreeMap<String, ClassStats> = BTreeMap::new();
        let mut class_deltas: BTreeMap<String, [u64; 2]> = BTreeMap::new();
        for c in connections {
            let (up, down) = (
                c.socket.bytes_up.unwrap_or(0),
                c.socket.bytes_down.unwrap_or(0),
            );
            let (delta_up, delta_down, mut track) = match c.track.take() {
                Some(old) if up >= old.up && down >= old.down => {
                    (up - old.up, down - old.down, old)
                }
                previous => {
                    // New since the last cycle: everything it moved is new, except at start,
                    // when the counters include bytes counted before a restart.
                    let (du, dd) = if first_cycle || previous.is_some() {
                        (0, 0)
                    } else {
                        (up, down)
                    };
                    let track = ConnTrack {
                        up,
                        down,
                        first_seen: t.as_second(),
                        last_seen: t.as_second(),
                        rate_up: 0.0,
                        rate_down: 0.0,
                        buckets: [None, None],
                    };
                    (du, dd, track)
                }
            };
            if let Some(dt) = dt {
                track.rate_up += alpha * (delta_up as f64 * 8.0 / dt - track.rate_up);
                track.rate_down += alpha * (delta_down as f64 * 8.0 / dt - track.rate_down);
            }
            track.up = up;
            track.down = down;
            track.last_seen = t.as_second();
            let limits = [c.limit.up, c.limit.down].map(|r| r.map(Rate::bits_per_sec));
            for ((slot, limit), used) in track
                .buckets
                .iter_mut()
                .zip(limits)
                .zip([delta_up, delta_down])
            {
                keep_bucket(slot, limit);
                if let Some(b) = slot {
                    b.update(dt.unwrap_or(0.0), used);
                }
            }
            let mut keys = Vec::with_capacity(3);
            if let Some(p) = c.process {
                keys.push(UsageKey::Process(p.name.clone()));
                keys.push(UsageKey::User(
                    p.user.clone().unwrap_or_else(|| p.uid.to_string()),
                ));
            }
            keys.push(UsageKey::Class(c.class.to_string()));
            let d = class_deltas.entry(c.class.to_string()).or_default();
            d[0] += delta_up;
            d[1] += delta_down;
            let figures = classes.entry(c.class.to_string()).or_default();
            figures.connections += 1;
            figures.rate_up += track.rate_up;
            figures.rate_down += track.rate_down;
            for book in self.books.values_mut() {
                for k in &keys {
                    add(&mut book.usage, k, delta_up, delta_down);
                }
            }
            *c.track = Some(track);
        }
        // Class buckets: for classes whose ceiling applies to the class as a whole.
        let mut buckets = std::mem::take(&mut self.class_buckets);
        for (name, ceil) in class_ceilings {
            let name = name.to_string();
            let slots = buckets.entry(name.clone()).or_default();
            let ceil = [ceil.up, ceil.down].map(|r| r.map(Rate::bits_per_sec));
            let used = class_deltas.get(&name).copied().unwrap_or_default();
            for ((slot, limit), used) in slots.iter_mut().zip(ceil).zip(used) {
                keep_bucket(slot, limit);
                if let Some(b) = slot {
                    b.update(dt.unwrap_or(0.0), used);
                }
            }
            let figures = classes.entry(name.clone()).or_default();
            figures.tokens_up = slots[0].map(|b| b.level);
            figures.tokens_down = slots[1].map(|b| b.level);
            self.class_buckets.insert(name, *slots);
        }
        self.classes = classes;
    }

    /// The figures the policy reads (`ctx.usage`, `ctx.class`), as an immutable copy.
    pub fn view(&self) -> StaticUsage {
        StaticUsage {
            usage: self
                .books
                .iter()
                .map(|(p, b)| (*p, b.usage.clone()))
                .collect(),
            classes: self.classes.clone(),
        }
    }

    /// Usage of `key` in the current `period`.
    pub fn usage(&self, period: Period, key: &UsageKey) -> Usage {
        self.books
            .get(&period)
            .and_then(|b| b.usage.get(key))
            .copied()
            .unwrap_or_default()
    }

    pub fn classes(&self) -> &BTreeMap<String, ClassStats> {
        &self.classes
    }

    /// Writes the usage counters atomically: a temporary file, fsync, rename over the old
    /// file, fsync of the folder. A crash at any point leaves the old file or the new one.
    ///
    /// The temporary file is created new (`O_EXCL`, which never follows a symlink) after a stale
    /// one is unlinked, so a link planted under its name cannot make root overwrite another file;
    /// it is removed again if anything fails, so no empty `usage.ron.tmp` stays behind.
    pub fn save(&self, path: &Path, now: &jiff::Zoned) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let stored = Stored {
            version: STATE_VERSION,
            saved_at: now.timestamp().as_second(),
            periods: self.books.clone(),
        };
        let text = ron::ser::to_string_pretty(&stored, ron::ser::PrettyConfig::new())
            .map_err(std::io::Error::other)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
        let tmp = path.with_extension("ron.tmp");
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::File::open(dir)?.sync_all()
    }

    /// Loads saved counters: those of periods still current at `now` resume, older ones are
    /// dropped. An unreadable or corrupt file is moved aside (`…corrupt-UNIXTIME`) with a
    /// warning, and counting starts from zero; a missing file is a first start.
    pub fn load(path: &Path, now: &jiff::Zoned, month_start_day: u8) -> Accounting {
        let mut accounting = Accounting::new(month_start_day);
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return accounting,
            Err(e) => {
                tracing::warn!(
                    "cannot read usage from {}: {e}; starting from zero",
                    path.display()
                );
                return accounting;
            }
        };
        match ron::from_str::<Stored>(&text) {
            Ok(stored) if stored.version == STATE_VERSION => {
                for (period, book) in stored.periods {
                    if book.id == period_id(period, now, month_start_day) {
                        accounting.books.insert(period, book);
                    }
                }
            }
            Ok(stored) => {
                let aside = set_aside(path, now);
                tracing::warn!(
                    "usage file {} has version {} (expected {STATE_VERSION}); moved to {}, starting from zero",
                    path.display(),
                    stored.version,
                    aside.display()
                );
            }
            Err(e) => {
                let aside = set_aside(path, now);
                tracing::warn!(
                    "usage file {} is corrupt ({e}); moved to {}, starting from zero",
                    path.display(),
                    aside.display()
                );
            }
        }
        accounting
    }
}

fn set_aside(path: &Path, now: &jiff::Zoned) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{}", now.timestamp().as_second()));
    let aside = path.with_file_name(name);
    let _ = std::fs::rename(path, &aside);
    aside
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{Proto, State};

    fn at(text: &str, tz: &str) -> jiff::Zoned {
        let civil: jiff::civil::DateTime = text.parse().unwrap();
        civil
            .to_zoned(jiff::tz::TimeZone::get(tz).unwrap())
            .unwrap()
    }

    /// One connection of curl's, in class `bulk` (1 Mbit/s up as a whole), as the flow table
    /// would hand it to accounting.
    struct Fixture {
        socket: Socket,
        process: Process,
        track: Option<ConnTrack>,
    }

    fn curl() -> Fixture {
        Fixture {
            socket: Socket {
                proto: Proto::Tcp,
                local: "10.0.0.1:4000".parse().unwrap(),
                remote: "10.0.0.2:443".parse().unwrap(),
                state: State::Established,
                uid: 1000,
                inode: 5,
                cookie: 5,
                bytes_up: None,
                bytes_down: None,
            },
            process: Process {
                pid: 10,
                ppid: 1,
                name: "curl".into(),
                exe: None,
                cmdline: vec![],
                uid: 1000,
                user: Some("alice".into()),
                gid: 1000,
                cgroup: None,
                unit: None,
                start_time: 1,
                ancestors: vec![],
            },
            track: None,
        }
    }

    impl Fixture {
        /// One cycle at `now` with the connection's counters at `up`/`down` and the link's at
        /// `tx`/`rx`; returns the connection's figures.
        fn cycle(&mut self, a: &mut Accounting, now: &jiff::Zoned, bytes: [u64; 4]) -> ConnStats {
            let [up, down, tx, rx] = bytes;
            self.socket.bytes_up = Some(up);
            self.socket.bytes_down = Some(down);
            let observed = Observed {
                socket: &self.socket,
                process: Some(&self.process),
                class: "bulk",
                limit: RatePair::default(),
                track: &mut self.track,
            };
            a.observe(
                now,
                [observed],
                &[("bulk", "1mbit:unlimited".parse().unwrap())],
                &[LinkCounters {
                    interface: "eth0".into(),
                    tx_bytes: tx,
                    rx_bytes: rx,
                }],
            );
            self.track.as_ref().unwrap().stats()
        }
    }

    #[test]
    fn deltas_rates_and_keys_with_a_stepped_clock() {
        let mut c = curl();
        let mut a = Accounting::new(1);
        let t0 = at("2026-11-22T10:00:00", "UTC");
        c.cycle(&mut a, &t0, [1000, 5000, 100, 200]);
        assert_eq!(
            a.usage(Period::Day, &UsageKey::Link).total(),
            0,
            "the first cycle is the baseline"
        );
        let t1 = at("2026-11-22T10:00:01", "UTC");
        let stats = c.cycle(&mut a, &t1, [126_000, 5000, 125_100, 1200]);
        assert_eq!(a.usage(Period::Day, &UsageKey::Link).up.bytes(), 125_000);
        assert_eq!(a.usage(Period::Day, &UsageKey::Link).down.bytes(), 1000);
        assert_eq!(
            a.usage(Period::Hour, &UsageKey::Process("curl".into()))
                .up
                .bytes(),
            125_000
        );
        assert_eq!(
            a.usage(Period::Month, &UsageKey::User("alice".into()))
                .up
                .bytes(),
            125_000
        );
        assert_eq!(
            a.usage(Period::Week, &UsageKey::Class("bulk".into()))
                .up
                .bytes(),
            125_000
        );
        // 1 Mbit/s over one second, averaged over a 2 s window: 1 - e^-0.5 of it.
        let expected = 1e6 * (1.0 - (-0.5f64).exp());
        assert!((stats.rate_up - expected).abs() < 1.0, "{}", stats.rate_up);
        assert_eq!(stats.age, 1.0);
        assert_eq!(a.classes()["bulk"].connections, 1);
        // bulk's 1 Mbit/s ceiling: a 125,000-byte bucket, refilled for 1 s and drained by the
        // 125,000 bytes sent: empty. No ceiling down, no bucket.
        assert_eq!(a.classes()["bulk"].tokens_up, Some(0.0));
        assert_eq!(a.classes()["bulk"].tokens_down, None);
        assert_eq!(stats.tokens_up, None, "no limit on the connection itself");
    }

    #[test]
    fn periods_roll_over_in_local_time_across_dst() {
        let mut c = curl();
        let mut a = Accounting::new(1);
        // Europe/Berlin leaves DST on 2026-10-25 at 03:00 local (back to 02:00).
        c.cycle(
            &mut a,
            &at("2026-10-24T23:00:00", "Europe/Berlin"),
            [0, 0, 0, 0],
        );
        c.cycle(
            &mut a,
            &at("2026-10-24T23:30:00", "Europe/Berlin"),
            [0, 0, 10, 0],
        );
        assert_eq!(a.usage(Period::Day, &UsageKey::Link).total(), 10);
        // 25 hours later by the clock on the wall is still "the next day" plus one.
        c.cycle(
            &mut a,
            &at("2026-10-25T23:30:00", "Europe/Berlin"),
            [0, 0, 30, 0],
        );
        assert_eq!(
            a.usage(Period::Day, &UsageKey::Link).total(),
            20,
            "a new day started at local midnight"
        );
        assert_eq!(
            a.usage(Period::Month, &UsageKey::Link).total(),
            30,
            "same month"
        );
    }

    #[test]
    fn a_resume_after_suspend_starts_the_new_period() {
        let mut c = curl();
        let mut a = Accounting::new(15);
        c.cycle(&mut a, &at("2026-11-20T12:00:00", "UTC"), [0, 0, 0, 0]);
        c.cycle(&mut a, &at("2026-11-20T12:00:01", "UTC"), [0, 0, 500, 0]);
        // Suspended for a month: the next cycle is in another billing month.
        c.cycle(&mut a, &at("2026-12-16T08:00:00", "UTC"), [0, 0, 700, 0]);
        assert_eq!(a.usage(Period::Month, &UsageKey::Link).total(), 200);
        assert_eq!(
            period_id(Period::Month, &at("2026-12-14T08:00:00", "UTC"), 15),
            "2026-11 from day 15"
        );
        assert_eq!(
            period_id(Period::Month, &at("2026-01-03T08:00:00", "UTC"), 15),
            "2025-12 from day 15"
        );
        assert_eq!(
            period_id(Period::Week, &at("2026-11-22T08:00:00", "UTC"), 1),
            "week of 2026-11-16"
        );
    }

    #[test]
    fn saving_never_follows_a_planted_link_nor_leaves_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.ron");
        let tmp = dir.path().join("usage.ron.tmp");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let now = at("2026-11-22T10:00:00", "UTC");
        let a = Accounting::new(1);
        a.save(&path, &now).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(std::fs::read_to_string(&path).unwrap().contains("version"));
        assert!(std::fs::symlink_metadata(&tmp).is_err(), "the link is gone");

        // A save that fails (here the rename, over a folder) leaves no temporary file.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("inside")).unwrap();
        assert!(a.save(&path, &now).is_err());
        assert!(
            std::fs::symlink_metadata(&tmp).is_err(),
            "no usage.ron.tmp left"
        );
    }

    #[test]
    fn usage_survives_a_restart_and_a_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.ron");
        let now = at("2026-11-22T10:00:00", "UTC");
        let mut c = curl();
        let mut a = Accounting::new(1);
        c.cycle(&mut a, &now, [0, 0, 0, 0]);
        c.cycle(
            &mut a,
            &at("2026-11-22T10:00:05", "UTC"),
            [0, 0, 20_000_000, 0],
        );
        a.save(&path, &now).unwrap();
        let later = at("2026-11-22T18:00:00", "UTC");
        let b = Accounting::load(&path, &later, 1);
        assert_eq!(
            b.usage(Period::Day, &UsageKey::Link).total(),
            20_000_000,
            "the day resumes"
        );
        assert_eq!(
            b.usage(Period::Hour, &UsageKey::Link).total(),
            0,
            "the hour has passed"
        );
        let next_day = Accounting::load(&path, &at("2026-11-23T01:00:00", "UTC"), 1);
        assert_eq!(next_day.usage(Period::Day, &UsageKey::Link).total(), 0);
        assert_eq!(
            next_day.usage(Period::Month, &UsageKey::Link).total(),
            20_000_000
        );
        std::fs::write(&path, "(version: 1, garbage").unwrap();
        let fresh = Accounting::load(&path, &later, 1);
        assert_eq!(fresh.usage(Period::Month, &UsageKey::Link).total(), 0);
        assert!(!path.exists(), "moved aside");
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            aside
                .iter()
                .any(|n| n.to_string_lossy().starts_with("usage.ron.corrupt-")),
            "{aside:?}"
        );
    }

    /// A file written by the version whose usage keys were plain strings (`"class:bulk"`), as
    /// its `save` wrote it: it loads into the typed keys unchanged.
    #[test]
    fn usage_saved_with_string_keys_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.ron");
        std::fs::write(
            &path,
            r#"(
    version: 1,
    saved_at: 1795860000,
    periods: {
        day: (
            id: "2026-11-22",
            usage: {
                "class:bulk": (
                    up: "125KB",
                    down: "0B",
                ),
                "link": (
                    up: "125KB",
                    down: "1KB",
                ),
                "process:curl": (
                    up: "125KB",
                    down: "0B",
                ),
                "user:alice": (
                    up: "125KB",
                    down: "0B",
                ),
            },
        ),
    },
)"#,
        )
        .unwrap();
        let a = Accounting::load(&path, &at("2026-11-22T18:00:00", "UTC"), 1);
        assert!(path.exists(), "not set aside as corrupt");
        assert_eq!(a.usage(Period::Day, &UsageKey::Link).down.bytes(), 1000);
        for key in [
            UsageKey::Class("bulk".into()),
            UsageKey::Process("curl".into()),
            UsageKey::User("alice".into()),
        ] {
            assert_eq!(a.usage(Period::Day, &key).up.bytes(), 125_000, "{key}");
        }
        a.save(&path, &at("2026-11-22T18:00:00", "UTC")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"class:bulk\": ("),
            "written as before:\n{text}"
        );
    }
}
