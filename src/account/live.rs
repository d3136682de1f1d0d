//! Live accounting: byte deltas per cycle, recent rates, and usage per period, persisted so
//! quotas survive restarts and crashes.
//!
//! Sources: the interface's own counters less each frame's link-layer header (the IP bytes an ISP
//! counts) for the `link` key; per connection,
//! sock_diag's TCP counters with headers estimated per segment and, with the BPF classifier, its
//! UDP counters on the shaped interface, attributed to `process:NAME`, `user:NAME` and
//! `class:NAME`; a connection's last bytes at its close ([`Charge`]), so neither a connection
//! that lived less than a cycle nor any connection's tail is lost. What the link moved and no process was charged for is `unattributed`. Connections
//! over loopback are not the link's and charge nothing.
//!
//! Periods follow local civil time from the zone of `now` (hour, day, ISO week from Monday,
//! month from `month_start_day`), computed afresh every cycle: a DST change moves the day's end
//! with the clock, and after a suspend the first cycle sees the new period and starts it from
//! zero. Everything takes `now` as an argument, so tests step a clock instead of sleeping.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::history::{History, OTHER, history_path};
use super::{Bucket, ClassStats, ConnStats, Period, StaticUsage, Usage, UsageKey};
use crate::process::Process;
use crate::scan::Socket;
use crate::units::{Rate, RatePair, Size};

/// Seconds over which recent rates are averaged.
const RATE_WINDOW: f64 = 2.0;
/// Version of the state file format.
const STATE_VERSION: u32 = 1;

/// An interface's byte counters at the IP layer (from the kernel's link statistics, less each
/// frame's link-layer header: [`crate::shape::LinkState::ip_bytes`]), the unit connections are
/// charged in.
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
    /// A closed connection's final counts (`up`, `down`) against what accounting counted of it
    /// (`track`; `None`: nothing yet): returns the bytes not yet counted, and records the final
    /// counts as counted, so a scan that still lists the connection counts nothing twice.
    pub fn settle(track: &mut Option<ConnTrack>, up: u64, down: u64) -> (u64, u64) {
        let delta = match track {
            Some(t) => (up.saturating_sub(t.up), down.saturating_sub(t.down)),
            None => (up, down),
        };
        match track {
            Some(t) => {
                t.up = t.up.max(up);
                t.down = t.down.max(down);
            }
            None => {
                *track = Some(ConnTrack {
                    up,
                    down,
                    first_seen: 0,
                    last_seen: 0,
                    rate_up: 0.0,
                    rate_down: 0.0,
                    buckets: [None, None],
                })
            }
        }
        delta
    }

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

/// Bytes a connection moved since accounting last saw it, counted when it closed: its close
/// report's totals less what earlier cycles counted (see `FlowTable::close`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub process: Option<String>,
    pub user: Option<String>,
    pub class: String,
    pub up: u64,
    pub down: u64,
}

impl Charge {
    fn keys(&self) -> Vec<UsageKey> {
        let mut keys = Vec::with_capacity(3);
        if let Some(p) = &self.process {
            keys.push(UsageKey::Process(p.clone()));
        }
        if let Some(u) = &self.user {
            keys.push(UsageKey::User(u.clone()));
        }
        keys.push(UsageKey::Class(self.class.clone()));
        keys
    }
}

/// Whether a connection stays on this machine (loopback): not the link's bytes.
pub fn is_local(socket: &Socket) -> bool {
    socket.local.ip().is_loopback() || socket.remote.ip().is_loopback()
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
    history: History,
    totals: Totals,
    /// Why the usage file must not be written: it held data that could be neither read nor set
    /// aside, and a save would overwrite it.
    save_refused: Option<String>,
    /// The same for the history file.
    history_save_refused: Option<String>,
}

/// Names per kind the since-start totals keep (see [`Totals`]).
pub const TOTAL_NAMES: usize = 500;

/// Bytes per key since the daemon started, for the metrics' counters. At most [`TOTAL_NAMES`]
/// names per kind: later names count under `(other)`, so a series never loses what it counted
/// and the metrics' label sets stay bounded.
#[derive(Debug, Default)]
pub struct Totals {
    usage: BTreeMap<UsageKey, Usage>,
    names: [usize; 3],
}

impl Totals {
    fn add(&mut self, key: &UsageKey, up: u64, down: u64) {
        if up == 0 && down == 0 {
            return;
        }
        if !self.usage.contains_key(key) {
            let (kind, other) = match key {
                UsageKey::Link => (None, UsageKey::Link),
                UsageKey::Unattributed => (None, UsageKey::Unattributed),
                UsageKey::Process(_) => (Some(0), UsageKey::Process(OTHER.into())),
                UsageKey::User(_) => (Some(1), UsageKey::User(OTHER.into())),
                UsageKey::Class(_) => (Some(2), UsageKey::Class(OTHER.into())),
            };
            if let Some(kind) = kind {
                if self.names[kind] >= TOTAL_NAMES {
                    add(&mut self.usage, &other, up, down);
                    return;
                }
                self.names[kind] += 1;
            }
        }
        add(&mut self.usage, key, up, down);
    }

    /// Every key's bytes since start.
    pub fn usage(&self) -> &BTreeMap<UsageKey, Usage> {
        &self.usage
    }
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
            history: History::default(),
            totals: Totals::default(),
            save_refused: None,
            history_save_refused: None,
        }
    }

    /// Starts new periods whose time has come (their figures start from zero).
    fn roll(&mut self, now: &jiff::Zoned) {
        for period in Period::ALL {
            let id = period_id(period, now, self.month_start_day);
            let book = self.books.entry(period).or_default();
            if book.id != id {
                let ended = std::mem::replace(
                    book,
                    Book {
                        id,
                        usage: BTreeMap::new(),
                    },
                );
                self.history.archive(period, ended.id, ended.usage);
            }
        }
    }

    /// Takes one cycle's counters: every live connection (their tracks are updated in place;
    /// a connection not given here is gone), the last bytes of connections that closed
    /// (`closed`), the ceilings of the classes limited as a whole (`each = "class"`), and the
    /// interfaces' counters.
    pub fn observe<'a>(
        &mut self,
        now: &jiff::Zoned,
        connections: impl IntoIterator<Item = Observed<'a>>,
        closed: &[Charge],
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

        let mut link = [0u64; 2];
        // Bytes charged to a process this cycle, per direction.
        let mut attributed = [0u64; 2];
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
            self.totals.add(&UsageKey::Link, up, down);
            link[0] += up;
            link[1] += down;
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
            let local = is_local(c.socket);
            let (delta_up, delta_down) = if local {
                (0, 0)
            } else {
                (delta_up, delta_down)
            };
            let mut keys = Vec::with_capacity(3);
            if let Some(p) = c.process.filter(|_| !local) {
                keys.push(UsageKey::Process(p.name.to_string()));
                keys.push(UsageKey::User(
                    p.user.clone().unwrap_or_else(|| p.uid.to_string()),
                ));
                attributed[0] += delta_up;
                attributed[1] += delta_down;
            }
            if !local {
                keys.push(UsageKey::Class(c.class.to_string()));
            }
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
            for k in &keys {
                self.totals.add(k, delta_up, delta_down);
            }
            *c.track = Some(track);
        }
        for charge in closed {
            let keys = charge.keys();
            if charge.process.is_some() {
                attributed[0] += charge.up;
                attributed[1] += charge.down;
            }
            let d = class_deltas.entry(charge.class.clone()).or_default();
            d[0] += charge.up;
            d[1] += charge.down;
            for book in self.books.values_mut() {
                for k in &keys {
                    add(&mut book.usage, k, charge.up, charge.down);
                }
            }
            for k in &keys {
                self.totals.add(k, charge.up, charge.down);
            }
        }
        let [up, down] = [0, 1].map(|i| link[i].saturating_sub(attributed[i]));
        if up > 0 || down > 0 {
            for book in self.books.values_mut() {
                add(&mut book.usage, &UsageKey::Unattributed, up, down);
            }
            self.totals.add(&UsageKey::Unattributed, up, down);
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

    /// The figures the policy reads at `now`: periods that ended by `now` are rolled over
    /// first, so the first cycle of a month does not see the month before as current.
    pub fn view_at(&mut self, now: &jiff::Zoned) -> StaticUsage {
        self.roll(now);
        self.view()
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
            past: self.history.periods().clone(),
            month_start_day: self.month_start_day,
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

    /// Writes the usage counters, and the history beside them when a period was archived
    /// since ([`write_atomically`], both).
    pub fn save(&mut self, path: &Path, now: &jiff::Zoned) -> std::io::Result<()> {
        // History first: a period it holds is never archived again from an older usage file.
        // A failed history write is retried at the next save and does not keep usage unsaved.
        let history = history_path(path);
        let history_saved = match &self.history_save_refused {
            Some(why) => Err(std::io::Error::other(why.clone())),
            None => self
                .history
                .save(&history)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", history.display()))),
        };
        if let Some(why) = &self.save_refused {
            return Err(std::io::Error::other(why.clone()));
        }
        // The last good file stays beside the new one: should this one be damaged later, the
        // next start resumes from that (at most one flush interval behind) instead of zero.
        let prev = previous_path(path);
        let _ = std::fs::remove_file(&prev);
        let _ = std::fs::hard_link(path, &prev);
        let stored = Stored {
            version: STATE_VERSION,
            saved_at: now.timestamp().as_second(),
            periods: self.books.clone(),
        };
        let text = ron::ser::to_string_pretty(&stored, ron::ser::PrettyConfig::new())
            .map_err(std::io::Error::other)?;
        write_atomically(path, &text)?;
        history_saved
    }

    /// Loads saved counters: those of periods still current at `now` resume, older ones go to
    /// the history (unless it has them already). A missing file is a first start.
    ///
    /// Data that cannot be read is never overwritten: a damaged file (not UTF-8, not RON, another
    /// version) is moved aside (`…corrupt-UNIXTIME`) with a warning, and what can be salvaged is
    /// kept: the readable part of the file, else the previous save (`usage.ron.prev`), else zero.
    /// A file that cannot be read at all (permissions, I/O errors) is moved aside the same way;
    /// where even that fails, saving is refused (and said so at every flush) rather than
    /// overwriting it. The same for the history file beside it.
    pub fn load(path: &Path, now: &jiff::Zoned, month_start_day: u8) -> Accounting {
        let mut accounting = Accounting::new(month_start_day);
        let history = history_path(path);
        match History::read(&history) {
            Ok(h) => accounting.history = h,
            Err(e) => match set_aside(&history, now) {
                Ok(aside) => tracing::warn!(
                    "{e}; moved to {}, the history starts empty",
                    aside.display()
                ),
                Err(moved) => {
                    let why = format!(
                        "{e}, and it cannot be moved aside ({moved}): the history is not \
                         saved until it is (move {} away and restart shaper)",
                        history.display()
                    );
                    tracing::error!("{why}");
                    accounting.history_save_refused = Some(why);
                }
            },
        }
        match read_stored(path) {
            Ok((stored, None)) => accounting.resume(stored, now),
            Ok((stored, Some(damage))) => {
                let aside = set_aside_copy(path, now);
                tracing::warn!(
                    "usage file {} is damaged ({damage}); resuming from its readable part \
                     (the file as it was: {aside})",
                    path.display()
                );
                accounting.resume(stored, now);
            }
            Err(e) => {
                match set_aside(path, now) {
                    Ok(aside) => tracing::warn!("{e}; moved to {}", aside.display()),
                    Err(moved) => {
                        let why = format!(
                            "{e}, and it cannot be moved aside ({moved}): usage is not saved \
                             until it is (move {} away and restart shaper)",
                            path.display()
                        );
                        tracing::error!("{why}");
                        accounting.save_refused = Some(why);
                    }
                }
                let prev = previous_path(path);
                match read_stored(&prev) {
                    Ok((stored, _)) if !stored.is_empty() => {
                        tracing::warn!("resuming usage from the previous save {}", prev.display());
                        accounting.resume(stored, now);
                    }
                    _ => tracing::warn!("usage starts from zero"),
                }
            }
        }
        accounting
    }

    /// The saved state as [`Accounting::load`] resumes it, for readers beside the daemon
    /// (`shaper usage`): errors are returned and no file is moved.
    pub fn read(
        path: &Path,
        now: &jiff::Zoned,
        month_start_day: u8,
    ) -> Result<Accounting, StateError> {
        let mut accounting = Accounting::new(month_start_day);
        accounting.history = History::read(&history_path(path))?;
        accounting.resume(read_stored(path)?.0, now);
        Ok(accounting)
    }

    /// Takes saved books: current ones resume, finished ones are archived.
    fn resume(&mut self, stored: Vec<(Period, Book)>, now: &jiff::Zoned) {
        for (period, book) in stored {
            if book.id == period_id(period, now, self.month_start_day) {
                self.books.insert(period, book);
            } else {
                self.history.archive_if_absent(period, book.id, book.usage);
            }
        }
    }

    /// Bytes since the daemon started.
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// Finished periods.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Every kept period of `period`'s length, oldest first: the history's, then the current
    /// one (if it started).
    pub fn periods(&self, period: Period) -> Vec<(&str, &BTreeMap<UsageKey, Usage>)> {
        let mut out: Vec<_> = self
            .history
            .periods()
            .get(&period)
            .into_iter()
            .flat_map(|past| past.iter().map(|(id, usage)| (id.as_str(), usage)))
            .collect();
        if let Some(book) = self.books.get(&period).filter(|b| !b.id.is_empty()) {
            out.push((&book.id, &book.usage));
        }
        out
    }
}

/// Why a state file (`usage.ron`, `history.ron`) could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// It could not be read (permissions, I/O). The daemon moves it aside, or refuses to save
    /// over it; readers beside the daemon leave it where it is.
    #[error("{0}")]
    Unreadable(String),
    /// It is not a state file of this version; the daemon moves it aside.
    #[error("{0}")]
    Corrupt(String),
}

/// The books of a usage file, by period, with what was damaged when only a part of it could be
/// read (`None` when it was read whole).
type ReadBooks = (Vec<(Period, Book)>, Option<String>);

/// The books of a usage file (none for a missing file).
fn read_stored(path: &Path) -> Result<ReadBooks, StateError> {
    let Some(bytes) = read_state(path, "usage")? else {
        return Ok((Vec::new(), None));
    };
    let (stored, damage) = parse_salvaging::<Stored>(&bytes).map_err(|e| {
        StateError::Corrupt(format!("usage file {} is corrupt ({e})", path.display()))
    })?;
    if stored.version != STATE_VERSION {
        return Err(StateError::Corrupt(format!(
            "usage file {} has version {} (expected {STATE_VERSION})",
            path.display(),
            stored.version
        )));
    }
    Ok((stored.periods.into_iter().collect(), damage))
}

/// A state file's bytes; `None` when it does not exist. Every other failure is an error: an
/// unreadable file is never taken for an empty one.
pub(crate) fn read_state(path: &Path, what: &str) -> Result<Option<Vec<u8>>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::Unreadable(format!(
            "cannot read {what} from {}: {e}",
            path.display()
        ))),
    }
}

/// Parses RON state; when the whole does not parse, what precedes the first error (e.g. a
/// file with a stray byte or a torn tail after its last record), with a description of the
/// damage. Bytes that are not UTF-8 are damage too, never a reason to read the file as empty.
pub(crate) fn parse_salvaging<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, Option<String>), ron::error::SpannedError> {
    let (text, not_utf8) = match std::str::from_utf8(bytes) {
        Ok(text) => (std::borrow::Cow::Borrowed(text), false),
        Err(_) => (String::from_utf8_lossy(bytes), true),
    };
    let error = match ron::from_str::<T>(&text) {
        Ok(value) if !not_utf8 => return Ok((value, None)),
        Ok(value) => return Ok((value, Some("bytes that are not UTF-8".to_string()))),
        Err(e) => e,
    };
    let start = &error.span.start;
    let offset: usize = text
        .split_inclusive('\n')
        .take(start.line.saturating_sub(1))
        .map(str::len)
        .sum::<usize>()
        + text
            .split_inclusive('\n')
            .nth(start.line.saturating_sub(1))
            .map_or(0, |l| {
                l.char_indices()
                    .nth(start.col.saturating_sub(1))
                    .map_or(l.len(), |(i, _)| i)
            });
    match text.get(..offset).map(ron::from_str::<T>) {
        Some(Ok(value)) => Ok((
            value,
            Some(format!("{} at {}:{}", error.code, start.line, start.col)),
        )),
        _ => Err(error),
    }
}

/// Writes `text` to `path` atomically: a temporary file, fsync, rename over the old file, fsync
/// of the folder. A crash at any point leaves the old file or the new one.
///
/// The temporary file is created new (`O_EXCL`, which never follows a symlink) after a stale
/// one is unlinked, so a link planted under its name cannot make root overwrite another file;
/// it is removed again if anything fails, so no empty `usage.ron.tmp` stays behind.
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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

fn aside_path(path: &Path, now: &jiff::Zoned) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{}", now.timestamp().as_second()));
    path.with_file_name(name)
}

/// Moves a file that cannot be used out of the way, so no save overwrites it.
fn set_aside(path: &Path, now: &jiff::Zoned) -> std::io::Result<PathBuf> {
    let aside = aside_path(path, now);
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// Keeps a copy of a damaged file that was partly read (the next save replaces the original).
fn set_aside_copy(path: &Path, now: &jiff::Zoned) -> String {
    let aside = aside_path(path, now);
    match std::fs::copy(path, &aside) {
        Ok(_) => aside.display().to_string(),
        Err(e) => format!("not kept: {e}"),
    }
}

/// The previous save of a usage file, kept beside it.
fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".prev");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::UsageView;
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
                &[],
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
        let mut a = Accounting::new(1);
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

    /// Saves `usage.ron` in `dir` once per figure, the link having sent that many bytes.
    fn saved_usage(dir: &Path, sent: &[u64]) -> PathBuf {
        let path = dir.join("usage.ron");
        let now = at("2026-11-22T10:00:00", "UTC");
        let mut c = curl();
        let mut a = Accounting::new(1);
        c.cycle(&mut a, &now, [0, 0, 0, 0]);
        for &bytes in sent {
            c.cycle(&mut a, &now, [0, 0, bytes, 0]);
            a.save(&path, &now).unwrap();
        }
        path
    }

    /// One byte that is not UTF-8 appended to the file (the issue's case) loses nothing: the
    /// month resumes, the damaged file is kept aside, and the next save is whole again.
    #[test]
    fn a_stray_byte_in_the_usage_file_keeps_the_month() {
        let dir = tempfile::tempdir().unwrap();
        let path = saved_usage(dir.path(), &[3_008_054]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.push(0xff);
        std::fs::write(&path, &bytes).unwrap();
        let later = at("2026-11-22T18:00:00", "UTC");
        let mut b = Accounting::load(&path, &later, 1);
        assert_eq!(b.usage(Period::Month, &UsageKey::Link).total(), 3_008_054);
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let aside = kept
            .iter()
            .find(|n| n.starts_with("usage.ron.corrupt-"))
            .unwrap_or_else(|| panic!("the damaged file kept: {kept:?}"));
        assert_eq!(std::fs::read(dir.path().join(aside)).unwrap(), bytes);
        b.save(&path, &later).unwrap();
        let c2 = Accounting::load(&path, &later, 1);
        assert_eq!(c2.usage(Period::Month, &UsageKey::Link).total(), 3_008_054);
    }

    /// A file damaged beyond salvage (a byte in the middle) resumes from the previous save,
    /// and one that cannot be read at all is moved aside, never taken for an empty one.
    #[test]
    fn a_damaged_or_unreadable_usage_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = saved_usage(dir.path(), &[1_000_000, 2_000_000]);
        let text = std::fs::read_to_string(&path).unwrap();
        let broken = text.replacen("version", "ver\u{1}sion", 1);
        std::fs::write(&path, &broken).unwrap();
        let b = Accounting::load(&path, &at("2026-11-22T18:00:00", "UTC"), 1);
        assert_eq!(
            b.usage(Period::Month, &UsageKey::Link).total(),
            1_000_000,
            "the previous save"
        );
        assert!(!path.exists(), "moved aside");

        // A directory where the file should be: EISDIR, not "absent".
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("keep"), "x").unwrap();
        let _ = Accounting::load(&path, &at("2026-11-22T19:00:00", "UTC"), 1);
        assert!(!path.exists(), "moved aside, not written over");
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("keep").exists())
            .count();
        assert_eq!(kept, 1);
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
        let mut a = Accounting::load(&path, &at("2026-11-22T18:00:00", "UTC"), 1);
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

    /// Link usage through a day's end and a month's start, with a stepped clock: each finished
    /// hour, day and month is kept under its id, and `past` finds them by how long ago.
    #[test]
    fn history_rolls_across_midnight_and_month_start() {
        let mut c = curl();
        let mut a = Accounting::new(1);
        let link = |a: &Accounting| a.usage(Period::Day, &UsageKey::Link).total();
        c.cycle(&mut a, &at("2026-11-30T23:59:00", "Europe/Berlin"), [0; 4]);
        c.cycle(
            &mut a,
            &at("2026-11-30T23:59:30", "Europe/Berlin"),
            [0, 0, 100, 0],
        );
        assert_eq!(link(&a), 100);
        // Past local midnight, into December.
        let dec1 = at("2026-12-01T00:00:30", "Europe/Berlin");
        c.cycle(&mut a, &dec1, [0, 0, 130, 5]);
        assert_eq!(link(&a), 35, "a new day");
        let past = a.history().periods();
        let total = |p: Period, id: &str| past[&p][id][&UsageKey::Link].total();
        assert_eq!(total(Period::Day, "2026-11-30"), 100);
        assert_eq!(total(Period::Hour, "2026-11-30T23"), 100);
        assert_eq!(total(Period::Month, "2026-11 from day 1"), 100);
        assert_eq!(
            total(Period::Day, "2026-11-30"),
            total(Period::Month, "2026-11 from day 1")
        );
        let view = a.view();
        let yesterday = view.usage_ago(Period::Day, &UsageKey::Link, 1, &dec1);
        assert_eq!(yesterday.up.bytes(), 100);
        assert_eq!(
            view.usage_ago(Period::Month, &UsageKey::Link, 1, &dec1)
                .total(),
            100
        );
        assert_eq!(
            view.usage_ago(Period::Hour, &UsageKey::Link, 1, &dec1)
                .total(),
            100
        );
        assert_eq!(
            view.usage_ago(Period::Day, &UsageKey::Link, 2, &dec1)
                .total(),
            0
        );
        assert_eq!(
            view.usage_ago(Period::Day, &UsageKey::Link, 0, &dec1)
                .total(),
            35
        );
        // The process and its user are kept too.
        assert_eq!(
            past[&Period::Day]["2026-11-30"].get(&UsageKey::Process("curl".into())),
            None,
            "curl moved nothing on the 30th"
        );
        c.cycle(
            &mut a,
            &at("2026-12-01T00:00:40", "Europe/Berlin"),
            [700, 0, 830, 5],
        );
        c.cycle(
            &mut a,
            &at("2026-12-02T09:00:00", "Europe/Berlin"),
            [700, 0, 830, 5],
        );
        let dec2 = at("2026-12-02T09:00:00", "Europe/Berlin");
        let view = a.view();
        for key in [
            UsageKey::Process("curl".into()),
            UsageKey::User("alice".into()),
        ] {
            assert_eq!(
                view.usage_ago(Period::Day, &key, 1, &dec2).up.bytes(),
                700,
                "{key}"
            );
        }
        // A month starting on the 15th: the 14th still belongs to the month before.
        let mut b = Accounting::new(15);
        c.cycle(&mut b, &at("2026-12-14T23:59:00", "UTC"), [700, 0, 0, 0]);
        c.cycle(&mut b, &at("2026-12-14T23:59:30", "UTC"), [700, 0, 10, 0]);
        let dec15 = at("2026-12-15T00:00:10", "UTC");
        c.cycle(&mut b, &dec15, [700, 0, 10, 0]);
        assert_eq!(
            b.history().periods()[&Period::Month]["2026-11 from day 15"][&UsageKey::Link].total(),
            10
        );
        assert_eq!(
            b.view()
                .usage_ago(Period::Month, &UsageKey::Link, 1, &dec15)
                .total(),
            10
        );
    }

    /// A restart resumes the history; a SIGKILL after a period ended but before the next save
    /// loses nothing of it beyond the last flush: the start archives it from `usage.ron`.
    #[test]
    fn history_survives_a_restart_and_a_kill_before_the_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.ron");
        let mut c = curl();
        let mut a = Accounting::new(1);
        c.cycle(&mut a, &at("2026-11-22T23:00:00", "UTC"), [0; 4]);
        c.cycle(&mut a, &at("2026-11-22T23:59:00", "UTC"), [0, 0, 5000, 0]);
        a.save(&path, &at("2026-11-22T23:59:00", "UTC")).unwrap();
        // The day ends; the daemon is killed before it saves again.
        c.cycle(&mut a, &at("2026-11-23T00:00:01", "UTC"), [0, 0, 5100, 0]);
        let after = at("2026-11-23T08:00:00", "UTC");
        let b = Accounting::load(&path, &after, 1);
        let day = |a: &Accounting| {
            a.view()
                .usage_ago(Period::Day, &UsageKey::Link, 1, &after)
                .total()
        };
        assert_eq!(day(&b), 5000, "archived at start from the last flush");
        // A clean run: the day archived, then saved; a restart reads it from the history.
        let mut b = b;
        b.save(&path, &after).unwrap();
        assert!(dir.path().join("history.ron").exists());
        let c2 = Accounting::load(&path, &after, 1);
        assert_eq!(day(&c2), 5000);
        // The daemon saved the history with the finished day, and crashed before the usage file
        // followed: the older usage file does not overwrite the history's figure.
        let mut d = Accounting::new(1);
        d.history.archive(
            Period::Day,
            "2026-11-22".into(),
            [(
                UsageKey::Link,
                Usage {
                    up: Size::from_bytes(5100),
                    down: Size::default(),
                },
            )]
            .into(),
        );
        d.save(&path, &after).unwrap();
        std::fs::write(
            &path,
            r#"(version: 1, saved_at: 0, periods: { day: (id: "2026-11-22", usage: { "link": (up: "5000B") }) })"#,
        )
        .unwrap();
        assert_eq!(day(&Accounting::load(&path, &after, 1)), 5100);
        // A corrupt history is set aside; usage still loads.
        std::fs::write(dir.path().join("history.ron"), "(version: 1, garb").unwrap();
        let e = Accounting::read(&path, &after, 1).unwrap_err();
        assert!(matches!(e, StateError::Corrupt(_)), "{e}");
        let f = Accounting::load(&path, &after, 1);
        assert_eq!(day(&f), 5000, "archived again from usage.ron");
        assert!(!dir.path().join("history.ron").exists(), "moved aside");
    }

    /// 1,000 process names (and 200 users, 50 classes) every day for 400 days, and 48 hours and
    /// 36 months of the same, every cap full: the file stays under the stated bound and reads
    /// and writes in well under a second.
    #[test]
    fn history_stays_bounded_with_a_thousand_processes_for_400_days() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.ron");
        let mut h = History::default();
        let day0 = jiff::civil::date(2025, 10, 1);
        let figures = |seed: u64| -> super::super::history::Figures {
            let mut f: super::super::history::Figures = (0..1000u64)
                .map(|i| {
                    let u = Usage {
                        up: Size::from_bytes(1_000_003 * (i + 1) * seed % 9_999_999_937),
                        down: Size::from_bytes(7_000_001 * (i + 3) * seed % 99_999_999_977),
                    };
                    (UsageKey::Process(format!("process-{i:07}")), u)
                })
                .collect();
            let big = Usage {
                up: Size::from_bytes(99_999_999_999),
                down: Size::from_bytes(99_999_999_999),
            };
            for i in 0..200 {
                f.insert(UsageKey::User(format!("{i:0>32}")), big);
            }
            for i in 0..50 {
                f.insert(UsageKey::Class(format!("{i:0>32}")), big);
            }
            f.insert(UsageKey::Link, big);
            f
        };
        let started = std::time::Instant::now();
        for d in 0..400 {
            let date = day0.checked_add(jiff::Span::new().days(d)).unwrap();
            h.archive(Period::Day, date.to_string(), figures(d as u64 + 1));
        }
        for hr in 0..48 {
            h.archive(
                Period::Hour,
                format!("2026-11-{:02}T{:02}", 20 + hr / 24, hr % 24),
                figures(hr + 1),
            );
        }
        for m in 0..36 {
            h.archive(
                Period::Month,
                format!("{:04}-{:02} from day 1", 2024 + m / 12, m % 12 + 1),
                figures(m + 1),
            );
        }
        let built = started.elapsed();
        let t = std::time::Instant::now();
        h.save(&path).unwrap();
        let saved = t.elapsed();
        let size = std::fs::metadata(&path).unwrap().len();
        let t = std::time::Instant::now();
        let back = History::read(&path).unwrap();
        let read = t.elapsed();
        eprintln!("history: {size} bytes; archive {built:?}, save {saved:?}, read {read:?}");
        assert!(size <= super::super::history::SIZE_BOUND, "{size} bytes");
        assert_eq!(back.periods()[&Period::Day].len(), 400);
        assert_eq!(back.periods()[&Period::Day], h.periods()[&Period::Day]);
        // The times are printed, not asserted: speed is a benchmark, and a loaded machine
        // would fail a bound that an idle one passes.
    }

    /// A history that cannot be written is reported, retried, and keeps no usage unsaved.
    #[test]
    fn a_failed_history_write_still_saves_usage_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.ron");
        let history = dir.path().join("history.ron");
        std::fs::create_dir_all(history.join("in-the-way")).unwrap();
        let mut c = curl();
        let mut a = Accounting::new(1);
        c.cycle(&mut a, &at("2026-11-22T23:59:00", "UTC"), [0; 4]);
        c.cycle(&mut a, &at("2026-11-22T23:59:30", "UTC"), [0, 0, 10, 0]);
        let next = at("2026-11-23T00:00:30", "UTC");
        c.cycle(&mut a, &next, [0, 0, 30, 0]);
        let e = a.save(&path, &next).unwrap_err();
        assert!(e.to_string().contains("history.ron"), "{e}");
        let resumed = Accounting::load(&path, &next, 1);
        assert_eq!(resumed.usage(Period::Day, &UsageKey::Link).total(), 20);
        // Loading moved what stood in the history's place aside; nothing of it was lost.
        assert!(!history.exists());
        a.save(&path, &next).unwrap();
        let resumed = Accounting::load(&path, &next, 1);
        assert_eq!(
            resumed
                .view()
                .usage_ago(Period::Day, &UsageKey::Link, 1, &next)
                .total(),
            10,
            "written at the next save"
        );
    }
}
