//! Events a policy raises with `shaper.notify(name, message [, period])`: each name and message
//! passes at most once per period (the current hour, day, week or month, as usage counts them),
//! so a policy may raise it every cycle while its condition holds. A passing event is
//!
//! - logged at warning level with the journal field `MESSAGE_ID` = [`EVENT_MESSAGE_ID`] (and
//!   `SHAPER_EVENT` = its name), so `journalctl MESSAGE_ID=…` finds every event;
//! - kept among the [`RECENT`] last for `shaper status`;
//! - counted in the metrics (`shaper_events_total{name}`);
//! - passed to `notify_command`, if set, in its environment (see [`Events::raise`]); the command
//!   runs on its own, never waited for by the cycle, at most [`MAX_RUNNING`] at once, killed
//!   after [`COMMAND_TIMEOUT`].
//!
//! What passed in the current periods is saved in `events.ron` in the state dir whenever an
//! event passes, so a restart does not raise the same warning again.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::account::{Period, period_id};
use crate::policy::Notice;

/// The journal's `MESSAGE_ID` of every policy event (a fixed sd-id128).
pub const EVENT_MESSAGE_ID: &str = "4f1a7c2e9d6b4e08a3c5b7d9e1f20a6c";
/// Events kept for `status`.
pub const RECENT: usize = 20;
/// `notify_command`s running at once; an event beyond is logged, not run.
pub const MAX_RUNNING: usize = 4;
/// How long a `notify_command` may run before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Events remembered as passed in their period (beyond, the oldest are forgotten).
const MAX_PASSED: usize = 1024;
const EVENTS_VERSION: u32 = 1;

/// One event that passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub name: String,
    pub message: String,
    pub period: Period,
    /// The period it passed in, e.g. `2026-11 from day 1`.
    pub period_id: String,
    /// When (RFC 3339).
    pub at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Stored {
    version: u32,
    /// Passed in their (then current) period: what rate-limits.
    passed: Vec<Event>,
    recent: VecDeque<Event>,
}

/// The daemon's events.
#[derive(Debug)]
pub struct Events {
    path: PathBuf,
    command: Option<PathBuf>,
    month_start_day: u8,
    stored: Stored,
    /// Events passed since the daemon started, per name (for metrics).
    counts: BTreeMap<String, u64>,
    running: Arc<AtomicUsize>,
}

impl Events {
    /// Loads what passed from `path`; a missing file is none, an unreadable one is logged and
    /// taken as none (an event may then pass again).
    pub fn load(path: PathBuf, command: Option<PathBuf>, month_start_day: u8) -> Events {
        let stored = match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}; events start afresh", path.display());
                Stored::default()
            }
            Ok(text) => match ron::from_str::<Stored>(&text) {
                Ok(s) if s.version == EVENTS_VERSION => s,
                Ok(_) | Err(_) => {
                    tracing::warn!(
                        "{} is not an events file of this version; events start afresh",
                        path.display()
                    );
                    Stored::default()
                }
            },
        };
        Events {
            path,
            command,
            month_start_day,
            stored,
            counts: BTreeMap::new(),
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Passes each notice not yet passed in its current period (see the module docs). Runs
    /// `notify_command` with `SHAPER_EVENT`, `SHAPER_MESSAGE`, `SHAPER_PERIOD` (e.g. `month`),
    /// `SHAPER_PERIOD_ID` (e.g. `2026-11 from day 1`) and `SHAPER_TIME` (RFC 3339) set.
    pub fn raise(&mut self, notices: Vec<Notice>, now: &jiff::Zoned) {
        if notices.is_empty() {
            return;
        }
        let msd = self.month_start_day;
        // What passed in periods that are over no longer holds anything back.
        self.stored
            .passed
            .retain(|e| e.period_id == period_id(e.period, now, msd));
        let mut changed = false;
        for n in notices {
            let id = period_id(n.period, now, msd);
            let passed = self.stored.passed.iter().any(|e| {
                e.name == n.name
                    && e.message == n.message
                    && e.period == n.period
                    && e.period_id == id
            });
            if passed {
                continue;
            }
            let event = Event {
                name: n.name,
                message: n.message,
                period: n.period,
                period_id: id,
                at: now.timestamp().to_string(),
            };
            tracing::warn!(
                message_id = EVENT_MESSAGE_ID,
                shaper_event = %event.name,
                "event {}: {}",
                event.name,
                event.message
            );
            *self.counts.entry(event.name.clone()).or_default() += 1;
            self.run_command(&event);
            if self.stored.passed.len() >= MAX_PASSED {
                self.stored.passed.remove(0);
            }
            self.stored.passed.push(event.clone());
            if self.stored.recent.len() >= RECENT {
                self.stored.recent.pop_front();
            }
            self.stored.recent.push_back(event);
            changed = true;
        }
        if changed {
            self.save();
        }
    }

    fn save(&mut self) {
        self.stored.version = EVENTS_VERSION;
        let written = ron::ser::to_string_pretty(&self.stored, ron::ser::PrettyConfig::new())
            .map_err(std::io::Error::other)
            .and_then(|text| crate::account::write_atomically(&self.path, &text));
        if let Err(e) = written {
            tracing::warn!(
                "cannot save events to {}: {e}; after a restart they may be raised again",
                self.path.display()
            );
        }
    }

    /// Starts `notify_command` for `event` and lets a thread of its own wait for it.
    fn run_command(&self, event: &Event) {
        let Some(command) = &self.command else {
            return;
        };
        if self.running.load(Ordering::SeqCst) >= MAX_RUNNING {
            tracing::warn!(
                "notify_command: {MAX_RUNNING} still running; not run for event {}",
                event.name
            );
            return;
        }
        let child = std::process::Command::new(command)
            .env("SHAPER_EVENT", &event.name)
            .env("SHAPER_MESSAGE", &event.message)
            .env("SHAPER_PERIOD", event.period.as_str())
            .env("SHAPER_PERIOD_ID", &event.period_id)
            .env("SHAPER_TIME", &event.at)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                tracing::warn!("notify_command {}: cannot run it: {e}", command.display());
                return;
            }
        };
        let running = self.running.clone();
        running.fetch_add(1, Ordering::SeqCst);
        let command = command.clone();
        let spawned = std::thread::Builder::new()
            .name("shaper-notify".into())
            .spawn(move || {
                let deadline = Instant::now() + COMMAND_TIMEOUT;
                loop {
                    match child.try_wait() {
                        Ok(Some(status)) if !status.success() => {
                            tracing::warn!("notify_command {}: {status}", command.display());
                            break;
                        }
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() >= deadline => {
                            tracing::warn!(
                                "notify_command {}: still running after {COMMAND_TIMEOUT:?}; \
                                 killed",
                                command.display()
                            );
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("notify_command: cannot watch it: {e}");
            self.running.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The last events, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.stored.recent.iter().cloned().collect()
    }

    /// Events passed since the daemon started, per name.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }
}

/// Where events are remembered.
pub fn events_path(state_dir: &Path) -> PathBuf {
    state_dir.join("events.ron")
}
