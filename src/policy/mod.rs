//! Stage 3, **policy**: the user's Lua script decides a class and a limit for every connection.
//!
//! The contract (full reference: `docs/policy.md`):
//!
//! * `classes`: a table, or a function of `ctx` returning one, of class definitions
//!   (`prio`, `rate`, `ceil`, `each`, `description`). `default` always exists.
//! * `classify(conn, ctx)`: called once per connection per cycle; returns a class name (nil =
//!   `default`) and optionally a limit for that connection (a number of bit/s, a unit string, or
//!   `{up = …, down = …}`).
//! * `on_cycle(ctx)`: optional, called once per cycle before any `classify`.
//!
//! Failure handling, from smallest to largest:
//!
//! * `classify` fails for one connection (runtime error, its instruction budget, memory, an
//!   unknown class, a bad limit): that connection keeps its previous decision, or goes to
//!   `default` if it is new. The error is reported once per distinct message, then counted.
//! * `classes(ctx)` or `on_cycle(ctx)` fails, or the cycle's instruction budget runs out: every
//!   connection keeps its previous decision.
//! * The cycle overruns its wall-clock deadline (a C call no hook can interrupt): it is abandoned,
//!   every connection keeps its previous decision, and the VM is rebuilt from the script.
//! * A reload that fails to compile or load keeps the running script.
//!
//! The VM runs on a thread of its own ([`Engine`]), so a stuck script never blocks the daemon.

mod api;
mod decide;
mod errors;
mod vm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use decide::{ClassDef, ClassSet, DEFAULT_CLASS, Decision, Each};
pub use errors::{ErrorEntry, ErrorLog, PolicyError};
pub use vm::{LIBRARY, LIBRARY_DIR};

use crate::account::{ConnStats, UsageView};
use crate::process::Snapshot;

/// A policy script: its path (for messages, `require` and reload) and the text that was loaded.
#[derive(Debug, Clone)]
pub struct Script {
    pub path: PathBuf,
    pub source: String,
}

/// sshd's StrictModes for policy files: a root daemon runs the code, so only root may be able
/// to change it. Checked before a file is read.
pub fn check_permissions(path: &Path) -> Result<(), PolicyError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| PolicyError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let p = path.display();
    let fix = "or run with --allow-insecure-script while developing";
    if meta.uid() != 0 {
        return Err(PolicyError::Unsafe(format!(
            "refusing {p}: it is owned by uid {}, not root, and shaper runs it as root. \
             Fix: `chown root:root {p}` ({fix})",
            meta.uid()
        )));
    }
    let who = match (meta.mode() & 0o020 != 0, meta.mode() & 0o002 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "its group",
        (false, true) => "everyone",
        (true, true) => "its group and everyone",
    };
    Err(PolicyError::Unsafe(format!(
        "refusing {p}: it is writable by {who} (mode {:04o}), and shaper runs it as root. \
         Fix: `chmod go-w {p}` ({fix})",
        meta.mode() & 0o7777
    )))
}

impl Script {
    /// Reads a script, first checking its permissions when `strict`.
    pub fn read_checked(path: &Path, strict: bool) -> Result<Script, PolicyError> {
        if strict {
            check_permissions(path)?;
        }
        Script::read(path)
    }

    pub fn read(path: &Path) -> Result<Script, PolicyError> {
        let source = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Script {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Limits on a policy's use of the machine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Lua instructions one `classify` call may execute.
    pub call_budget: u64,
    /// Lua instructions a whole cycle may execute.
    pub cycle_budget: u64,
    /// Bytes the VM may allocate.
    pub memory_limit: usize,
    /// Wall-clock time a cycle (or loading the script) may take before it is abandoned.
    pub deadline: Duration,
    /// Refuse a script or module that is not owned by root or is writable by group or others
    /// (sshd's StrictModes): set when running as root.
    pub strict_permissions: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            call_budget: 1_000_000,
            cycle_budget: 200_000_000,
            memory_limit: 64 << 20,
            deadline: Duration::from_millis(750),
            strict_permissions: false,
        }
    }
}

/// Everything one cycle of the policy reads.
pub struct CycleInput {
    pub snapshot: Arc<Snapshot>,
    /// Parallel to `snapshot.connections`; may be empty.
    pub stats: Vec<ConnStats>,
    /// Each connection's decision from an earlier cycle (the flow table's), parallel to
    /// `snapshot.connections` (may be shorter; missing = a new connection): what a connection
    /// keeps when its `classify` or the whole cycle fails.
    pub previous: Vec<Option<Decision>>,
    /// The cycle's time, in the zone `ctx.time` is given in.
    pub now: jiff::Zoned,
    pub interface: Option<String>,
    pub usage: Arc<dyn UsageView>,
    /// The whole-interface and per-connection limits from `--rate`/`--connection-rate` and their
    /// files (`ctx.rate`, `ctx.connection_rate`); the daemon also applies them as defaults.
    pub rate: Option<crate::units::RatePair>,
    pub connection_rate: Option<crate::units::RatePair>,
}

/// What one cycle produced.
#[derive(Debug)]
pub struct CycleOutcome {
    pub classes: ClassSet,
    /// One per connection of the input, in order.
    pub decisions: Vec<Decision>,
    /// Connections whose decision came from a fallback (error, or a failed cycle).
    pub fallbacks: usize,
    /// Set when the cycle failed as a whole; the decisions are then the previous ones.
    pub failure: Option<PolicyError>,
}

enum Request {
    Cycle(Arc<CycleInput>),
}

type VmReply = Result<vm::VmCycle, PolicyError>;

/// A VM on its own thread.
struct Worker {
    requests: Sender<Request>,
    replies: Receiver<VmReply>,
    progress: Arc<Mutex<vm::Progress>>,
    abandoned: Arc<AtomicBool>,
    required: Vec<PathBuf>,
    /// `file:line` of `classify`.
    classify_at: String,
}

impl Worker {
    /// Starts a thread, builds the VM there and waits (up to the deadline) for it to load.
    fn spawn(script: Arc<Script>, options: &EngineOptions) -> Result<Worker, PolicyError> {
        let (req_tx, req_rx) = mpsc::channel::<Request>();
        let (rep_tx, rep_rx) = mpsc::channel::<VmReply>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(Vec<PathBuf>, String), PolicyError>>();
        let progress = Arc::new(Mutex::new(vm::Progress::default()));
        let abandoned = Arc::new(AtomicBool::new(false));
        let thread_options = options.clone();
        let (thread_progress, thread_abandoned) = (progress.clone(), abandoned.clone());
        let script_name = script.path.display().to_string();
        std::thread::Builder::new()
            .name("shaper-policy".into())
            .spawn(move || {
                let mut vm =
                    match vm::Vm::build(script, &thread_options, thread_progress, thread_abandoned)
                    {
                        Ok(vm) => {
                            let _ = ready_tx
                                .send(Ok((vm.required.borrow().clone(), vm.classify_at.clone())));
                            vm
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                while let Ok(Request::Cycle(input)) = req_rx.recv() {
                    let reply = vm.run_cycle(input, &thread_options);
                    if rep_tx.send(reply).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| PolicyError::Load(format!("cannot start the policy thread: {e}")))?;
        let (required, classify_at) = match ready_rx.recv_timeout(options.deadline) {
            Ok(result) => result?,
            Err(RecvTimeoutError::Timeout) => {
                abandoned.store(true, Ordering::Relaxed);
                let at = progress
                    .lock()
                    .ok()
                    .and_then(|p| p.last_position())
                    .unwrap_or(script_name);
                return Err(PolicyError::Load(format!(
                    "{at}: loading the script took longer than {:?}",
                    options.deadline
                )));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PolicyError::Load(
                    "the policy thread died while loading".into(),
                ));
            }
        };
        Ok(Worker {
            requests: req_tx,
            replies: rep_rx,
            progress,
            abandoned,
            required,
            classify_at,
        })
    }
}

/// The policy engine: a script, its VM thread, the classes of the last good cycle, and the log
/// of errors. Decisions are not kept here: the caller's flow table holds them and passes them in
/// ([`CycleInput::previous`]).
pub struct Engine {
    script: Arc<Script>,
    options: EngineOptions,
    worker: Worker,
    classes: ClassSet,
    errors: ErrorLog,
    /// Cycles abandoned at their deadline since the engine started.
    pub abandoned_cycles: u64,
}

impl Engine {
    /// Reads, compiles and loads a script. Errors (unreadable file, syntax, top-level errors, no
    /// `classify`) carry `file:line`.
    pub fn load(path: &Path, options: EngineOptions) -> Result<Engine, PolicyError> {
        Engine::from_script(
            Script::read_checked(path, options.strict_permissions)?,
            options,
        )
    }

    pub fn from_script(script: Script, options: EngineOptions) -> Result<Engine, PolicyError> {
        let script = Arc::new(script);
        let worker = Worker::spawn(script.clone(), &options)?;
        Ok(Engine {
            script,
            options,
            worker,
            classes: ClassSet::default(),
            errors: ErrorLog::default(),
            abandoned_cycles: 0,
        })
    }

    pub fn script(&self) -> &Script {
        &self.script
    }

    /// The script and every module it required from its folder: the files to watch for reload.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.script.path.clone()];
        files.extend(self.worker.required.iter().cloned());
        files
    }

    pub fn errors(&self) -> &ErrorLog {
        &self.errors
    }

    /// The classes of the last successful cycle.
    pub fn classes(&self) -> &ClassSet {
        &self.classes
    }

    /// Re-reads the script and swaps it in if it loads; on error the running script stays.
    pub fn reload(&mut self) -> Result<(), PolicyError> {
        let script = Arc::new(Script::read_checked(
            &self.script.path,
            self.options.strict_permissions,
        )?);
        let worker = Worker::spawn(script.clone(), &self.options)?;
        self.script = script;
        self.worker = worker;
        self.errors.clear();
        Ok(())
    }

    /// Runs one cycle. Never fails: failures become fallbacks, reported in the outcome and the
    /// error log.
    pub fn run(&mut self, input: CycleInput) -> CycleOutcome {
        let input = Arc::new(input);
        let reply = if self
            .worker
            .requests
            .send(Request::Cycle(input.clone()))
            .is_err()
        {
            Err(RecvTimeoutError::Disconnected)
        } else {
            self.worker.replies.recv_timeout(self.options.deadline)
        };
        match reply {
            Ok(Ok(cycle)) => self.merge(&input, cycle),
            Ok(Err(failure)) => self.fail(&input, failure),
            Err(RecvTimeoutError::Timeout) => {
                self.abandoned_cycles += 1;
                self.worker.abandoned.store(true, Ordering::Relaxed);
                let failure = PolicyError::Cycle(format!(
                    "{}: the cycle did not finish within {:?} and was abandoned (a string \
                     pattern that backtracks, or a very long C call?); the VM is rebuilt",
                    self.stuck_at(&input),
                    self.options.deadline
                ));
                self.rebuild();
                self.fail(&input, failure)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let failure = PolicyError::Cycle("the policy thread stopped; restarting it".into());
                self.rebuild();
                self.fail(&input, failure)
            }
        }
    }

    /// Where a stuck cycle is: the line the hook saw in the running `classify` call, or that
    /// call's `classify` with its connection, or the last line seen at all.
    fn stuck_at(&self, input: &CycleInput) -> String {
        let Ok(p) = self.worker.progress.lock() else {
            return self.script.path.display().to_string();
        };
        if let Some(at) = p.position_in_call() {
            return at;
        }
        if let Some(c) = p.conn.and_then(|i| input.snapshot.connections.get(i)) {
            return format!("{} (classify, for {})", self.worker.classify_at, c.socket);
        }
        p.last_position()
            .unwrap_or_else(|| self.script.path.display().to_string())
    }

    /// Replaces the worker with a fresh VM from the script that was running (not from the file,
    /// which may hold an unchecked edit).
    fn rebuild(&mut self) {
        match Worker::spawn(self.script.clone(), &self.options) {
            Ok(worker) => self.worker = worker,
            Err(e) => {
                self.errors
                    .report(&format!("rebuilding the VM failed: {e}"), None);
            }
        }
    }

    /// Connection `i`'s earlier decision, or `default` for a new connection.
    fn previous_or_default(&self, input: &CycleInput, i: usize) -> Decision {
        input
            .previous
            .get(i)
            .cloned()
            .flatten()
            .unwrap_or_else(|| Decision::default_for(&self.classes))
    }

    fn fail(&mut self, input: &CycleInput, failure: PolicyError) -> CycleOutcome {
        self.errors.report(&failure.to_string(), None);
        let decisions: Vec<Decision> = (0..input.snapshot.connections.len())
            .map(|i| self.previous_or_default(input, i))
            .collect();
        CycleOutcome {
            classes: self.classes.clone(),
            fallbacks: decisions.len(),
            decisions,
            failure: Some(failure),
        }
    }

    fn merge(&mut self, input: &CycleInput, cycle: vm::VmCycle) -> CycleOutcome {
        self.classes = cycle.classes;
        let mut fallbacks = 0;
        let mut results = cycle.decisions.into_iter();
        let mut decisions = Vec::with_capacity(input.snapshot.connections.len());
        for (i, c) in input.snapshot.connections.iter().enumerate() {
            let decision = match results.next() {
                Some(Ok(d)) => d,
                Some(Err(message)) => {
                    fallbacks += 1;
                    self.errors.report(&message, Some(&c.socket.to_string()));
                    self.previous_or_default(input, i)
                }
                None => {
                    // The cycle stopped early (its budget ran out).
                    fallbacks += 1;
                    self.previous_or_default(input, i)
                }
            };
            // A class that disappeared from `classes` sends its connections to default.
            decisions.push(if self.classes.get(&decision.class).is_some() {
                decision
            } else {
                Decision::default_for(&self.classes)
            });
        }
        CycleOutcome {
            classes: self.classes.clone(),
            decisions,
            fallbacks,
            failure: None,
        }
    }
}
