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
//! * The cycle overruns its wall-clock deadline: it is abandoned, every connection keeps its
//!   previous decision, the VM is cancelled (its hook raises at the next instruction check or
//!   guarded library call, and its thread ends) and the next cycle starts a fresh VM from the
//!   script. While [`MAX_ABANDONED`] cancelled VMs are still running, no new one is started and
//!   cycles report [`Fault::Stuck`]: the number of policy threads is bounded by construction.
//! * A reload that fails to compile or load keeps the running script.
//!
//! The VM runs on a thread of its own ([`Engine`]), so a stuck script never blocks the daemon.

mod api;
mod decide;
mod errors;
pub mod lint;
mod vm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use decide::{ClassDef, ClassSet, DEFAULT_CLASS, Decision, Each, OnError};
pub use errors::{ErrorEntry, ErrorLog, Fault, Location, PolicyError};
pub use vm::{LIBRARY, LIBRARY_DIR};

/// The tracing target of a policy's `print`: `check` and `simulate` show it at their quiet
/// default level (the script's own output is part of their result), the daemon logs it at info.
pub const PRINT_TARGET: &str = "shaper::policy::print";

use crate::account::{ConnStats, UsageView};
use crate::process::Snapshot;

/// A policy script: its path (for messages, `require` and reload) and the text that was loaded.
#[derive(Debug, Clone)]
pub struct Script {
    pub path: PathBuf,
    pub source: String,
}

/// Reads a policy file or module, with sshd's StrictModes when `strict` (a root daemon runs the
/// code, so only root may be able to change it, or any folder on its path): opened once, checked
/// through the descriptor, and read from it ([`crate::trust`]).
pub fn read_source(path: &Path, strict: bool) -> Result<String, PolicyError> {
    use crate::trust::TrustError;
    crate::trust::read_text(path, strict).map_err(|e| match e {
        TrustError::Open { path, error } => PolicyError::Read {
            path: path.display().to_string(),
            message: error.to_string(),
        },
        unsafe_or_odd => PolicyError::Unsafe(format!(
            "{unsafe_or_odd} (or run with --allow-insecure-script while developing)"
        )),
    })
}

impl Script {
    /// Reads a script, checking its permissions and its folders' when `strict`.
    pub fn read_checked(path: &Path, strict: bool) -> Result<Script, PolicyError> {
        Ok(Script {
            path: path.to_path_buf(),
            source: read_source(path, strict)?,
        })
    }

    pub fn read(path: &Path) -> Result<Script, PolicyError> {
        Script::read_checked(path, false)
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
    /// Wall-clock time a cycle may take before it is abandoned: the daemon cycles every second,
    /// so a cycle stuck in a long C call must not hold the shaping back for longer.
    pub deadline: Duration,
    /// Wall-clock time loading the script (building its VM and running its top level) may take,
    /// and a reload waits for stopped VMs to end. Loading happens once per start or reload, not
    /// every cycle, so this is generous: a slow or loaded machine (an emulated VM, a debug
    /// build beside a compiler) must not fail a start that would succeed a second later. The
    /// instruction budget and memory limit still stop a top level that loops or allocates.
    pub load_deadline: Duration,
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
            load_deadline: Duration::from_secs(10),
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
    /// What the policy raised with `shaper.notify`, each once (the daemon rate-limits them).
    pub notices: Vec<Notice>,
}

/// An event a policy raised with `shaper.notify(name, message [, period])`: the daemon passes
/// it on at most once per name and message per `period`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Notice {
    pub name: String,
    pub message: String,
    pub period: crate::account::Period,
}

enum Request {
    Cycle(Arc<CycleInput>),
}

type VmReply = Result<vm::VmCycle, PolicyError>;

/// Most cancelled VMs whose threads may still be running. While this many are, no new VM is
/// started, so an engine never has more than this plus one policy threads.
pub const MAX_ABANDONED: usize = 2;

/// A VM on its own thread.
struct Worker {
    requests: Sender<Request>,
    replies: Receiver<VmReply>,
    progress: Arc<Mutex<vm::Progress>>,
    abandoned: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    required: Vec<PathBuf>,
    /// `file:line` of `classify`.
    classify_at: String,
    /// Its first and last lines in the script.
    classify_span: Option<(usize, usize)>,
}

/// What a VM reports once it has loaded.
struct Loaded {
    required: Vec<PathBuf>,
    classify_at: String,
    classify_span: Option<(usize, usize)>,
}

/// The threads of VMs the engine gave up on at a deadline (or replaced at a reload). Each was
/// told to stop (its hook and guards raise [`Fault::Cancelled`]) and ends at its next check, or
/// at once if it was idle.
#[derive(Default)]
struct Abandoned(Vec<JoinHandle<()>>);

impl Abandoned {
    /// Cancels a worker's VM and keeps its thread to count until it ends.
    fn push(&mut self, worker: Worker) {
        worker.abandoned.store(true, Ordering::Relaxed);
        self.0.push(worker.thread);
    }

    /// How many abandoned threads are still running.
    fn alive(&mut self) -> usize {
        let (ended, running) = std::mem::take(&mut self.0)
            .into_iter()
            .partition::<Vec<_>, _>(JoinHandle::is_finished);
        // Joined, so the ended threads are gone from the process, not only done.
        for thread in ended {
            let _ = thread.join();
        }
        self.0 = running;
        self.0.len()
    }

    /// Waits up to `timeout` for fewer than [`MAX_ABANDONED`] to be running; `Err` with the
    /// count if they are not.
    fn make_room(&mut self, timeout: Duration) -> Result<(), Fault> {
        let until = Instant::now() + timeout;
        loop {
            let threads = self.alive();
            if threads < MAX_ABANDONED {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(Fault::Stuck {
                    threads,
                    limit: MAX_ABANDONED,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Worker {
    /// Starts a thread, builds the VM there and waits (up to the load deadline) for it to load. A
    /// load that overruns the deadline is cancelled and its thread joins `abandoned`.
    fn spawn(
        script: Arc<Script>,
        options: &EngineOptions,
        abandoned: &mut Abandoned,
    ) -> Result<Worker, PolicyError> {
        let (req_tx, req_rx) = mpsc::channel::<Request>();
        let (rep_tx, rep_rx) = mpsc::channel::<VmReply>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Loaded, PolicyError>>();
        let progress = Arc::new(Mutex::new(vm::Progress::default()));
        let cancelled = Arc::new(AtomicBool::new(false));
        let thread_options = options.clone();
        let (thread_progress, thread_cancelled) = (progress.clone(), cancelled.clone());
        let script_name = script.path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("shaper-policy".into())
            .spawn(move || {
                let mut vm = match vm::Vm::build(
                    script,
                    &thread_options,
                    thread_progress,
                    thread_cancelled.clone(),
                ) {
                    Ok(vm) => {
                        let _ = ready_tx.send(Ok(Loaded {
                            required: vm.required.borrow().clone(),
                            classify_at: vm.classify_at.clone(),
                            classify_span: vm.classify_span,
                        }));
                        vm
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(Request::Cycle(input)) = req_rx.recv() {
                    let reply = vm.run_cycle(input, &thread_options);
                    if thread_cancelled.load(Ordering::Relaxed) || rep_tx.send(reply).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| {
                PolicyError::Load(Fault::Thread(format!(
                    "cannot start the policy thread: {e}"
                )))
            })?;
        let worker = |loaded: Loaded| Worker {
            requests: req_tx,
            replies: rep_rx,
            progress: progress.clone(),
            abandoned: cancelled.clone(),
            thread,
            required: loaded.required,
            classify_at: loaded.classify_at,
            classify_span: loaded.classify_span,
        };
        match ready_rx.recv_timeout(options.load_deadline) {
            Ok(Ok(loaded)) => Ok(worker(loaded)),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => {
                let at = progress
                    .lock()
                    .ok()
                    .and_then(|p| p.last_location())
                    .map_or(script_name, |at| at.to_string());
                abandoned.push(worker(Loaded {
                    required: Vec::new(),
                    classify_at: String::new(),
                    classify_span: None,
                }));
                Err(PolicyError::Load(Fault::Deadline {
                    at,
                    deadline: options.load_deadline,
                    loading: true,
                }))
            }
            Err(RecvTimeoutError::Disconnected) => Err(PolicyError::Load(Fault::Thread(
                "the policy thread died while loading".into(),
            ))),
        }
    }
}

/// The policy engine: a script, its VM thread, the classes of the last good cycle, and the log
/// of errors. Decisions are not kept here: the caller's flow table holds them and passes them in
/// ([`CycleInput::previous`]).
pub struct Engine {
    script: Arc<Script>,
    options: EngineOptions,
    /// The running VM; `None` after one was abandoned, until the next cycle starts another.
    worker: Option<Worker>,
    abandoned: Abandoned,
    /// Modules the script required from its folder (kept while no VM runs).
    required: Vec<PathBuf>,
    classes: ClassSet,
    /// The `on_error` of the last successful cycle.
    on_error: OnError,
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
        let mut abandoned = Abandoned::default();
        let worker = Worker::spawn(script.clone(), &options, &mut abandoned)?;
        Ok(Engine {
            script,
            options,
            required: worker.required.clone(),
            worker: Some(worker),
            abandoned,
            classes: ClassSet::default(),
            on_error: OnError::default(),
            errors: ErrorLog::default(),
            abandoned_cycles: 0,
        })
    }

    pub fn script(&self) -> &Script {
        &self.script
    }

    /// The first and last lines of `classify` in the script, while a VM is loaded and
    /// `classify` is defined in the script itself (not in a module).
    pub fn classify_span(&self) -> Option<(usize, usize)> {
        self.worker.as_ref().and_then(|w| w.classify_span)
    }

    /// The script and every module it required from its folder: the files to watch for reload.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.script.path.clone()];
        files.extend(self.required.iter().cloned());
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
    /// If too many cancelled VMs are still running, waits up to the load deadline for them to
    /// end.
    pub fn reload(&mut self) -> Result<(), PolicyError> {
        let script = Arc::new(Script::read_checked(
            &self.script.path,
            self.options.strict_permissions,
        )?);
        self.abandoned
            .make_room(self.options.load_deadline)
            .map_err(PolicyError::Load)?;
        let worker = Worker::spawn(script.clone(), &self.options, &mut self.abandoned)?;
        self.script = script;
        self.required.clone_from(&worker.required);
        // The old VM is idle: closing its channel ends its thread, counted until it has.
        if let Some(old) = self.worker.replace(worker) {
            self.abandoned.push(old);
        }
        self.errors.clear();
        Ok(())
    }

    /// Policy threads this engine has: the running VM's and cancelled ones not yet ended.
    pub fn threads(&mut self) -> usize {
        self.abandoned.alive() + usize::from(self.worker.is_some())
    }

    /// The running VM, or a new one from the script that was running (not from the file, which
    /// may hold an unchecked edit) if the last was abandoned; none while too many cancelled
    /// VMs are still running.
    fn worker(&mut self) -> Result<&Worker, PolicyError> {
        if self.worker.is_none() {
            self.abandoned
                .make_room(Duration::ZERO)
                .map_err(PolicyError::Cycle)?;
            let worker = Worker::spawn(self.script.clone(), &self.options, &mut self.abandoned)?;
            self.required.clone_from(&worker.required);
            self.worker = Some(worker);
        }
        Ok(self.worker.as_ref().expect("started above"))
    }

    /// Runs one cycle. Never fails: failures become fallbacks, reported in the outcome and the
    /// error log.
    pub fn run(&mut self, input: CycleInput) -> CycleOutcome {
        let input = Arc::new(input);
        let deadline = self.options.deadline;
        let reply = match self.worker() {
            Err(failure) => return self.fail(&input, failure),
            Ok(worker) => match worker.requests.send(Request::Cycle(input.clone())) {
                Err(_) => Err(RecvTimeoutError::Disconnected),
                Ok(()) => worker.replies.recv_timeout(deadline),
            },
        };
        match reply {
            Ok(Ok(cycle)) => self.merge(&input, cycle),
            Ok(Err(failure)) => self.fail(&input, failure),
            Err(RecvTimeoutError::Timeout) => {
                self.abandoned_cycles += 1;
                let failure = PolicyError::Cycle(Fault::Deadline {
                    at: self.stuck_at(&input),
                    deadline,
                    loading: false,
                });
                self.abandon();
                self.fail(&input, failure)
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.abandon();
                let failure = PolicyError::Cycle(Fault::Thread(
                    "the policy thread stopped; the next cycle starts another".into(),
                ));
                self.fail(&input, failure)
            }
        }
    }

    /// Cancels the running VM; the next cycle starts a fresh one.
    fn abandon(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.abandoned.push(worker);
        }
    }

    /// Where a stuck cycle is: the line the hook saw in the running `classify` call, or that
    /// call's `classify` with its connection, or the last line seen at all.
    fn stuck_at(&self, input: &CycleInput) -> String {
        let script = || self.script.path.display().to_string();
        let Some(worker) = &self.worker else {
            return script();
        };
        let Ok(p) = worker.progress.lock() else {
            return script();
        };
        if let Some(at) = p.location_in_call() {
            return at.to_string();
        }
        if let Some(c) = p.conn.and_then(|i| input.snapshot.connections.get(i)) {
            return format!("{} (classify, for {})", worker.classify_at, c.socket);
        }
        p.last_location().map_or_else(script, |at| at.to_string())
    }

    /// The decision for connection `i` when its `classify` (or the whole cycle) failed, as
    /// `on_error` says. `decided` holds the decisions of this cycle that succeeded.
    fn fallback(&self, input: &CycleInput, i: usize, decided: &[Option<Decision>]) -> Decision {
        let previous = || input.previous.get(i).cloned().flatten();
        match &self.on_error {
            OnError::Class(class) if self.classes.get(class).is_some() => Decision {
                class: class.clone(),
                limit: Default::default(),
            },
            OnError::Default | OnError::Class(_) => Decision::default_for(&self.classes),
            OnError::Previous => previous()
                .or_else(|| self.same_process(input, i, decided))
                .unwrap_or_else(|| Decision::default_for(&self.classes)),
        }
    }

    /// What another connection of connection `i`'s owner was given: this cycle's decision,
    /// else an earlier one.
    fn same_process(
        &self,
        input: &CycleInput,
        i: usize,
        decided: &[Option<Decision>],
    ) -> Option<Decision> {
        let connections = &input.snapshot.connections;
        let pid = connections.get(i)?.owner.as_ref()?.pid;
        let same =
            |j: &usize| *j != i && connections[*j].owner.as_ref().map(|o| o.pid) == Some(pid);
        let indices = || (0..connections.len()).filter(same);
        indices()
            .find_map(|j| decided.get(j).cloned().flatten())
            .or_else(|| indices().find_map(|j| input.previous.get(j).cloned().flatten()))
    }

    fn fail(&mut self, input: &CycleInput, failure: PolicyError) -> CycleOutcome {
        self.errors.report(&failure.to_string(), None);
        let decisions: Vec<Decision> = (0..input.snapshot.connections.len())
            .map(|i| self.fallback(input, i, &[]))
            .collect();
        CycleOutcome {
            classes: self.classes.clone(),
            fallbacks: decisions.len(),
            decisions,
            failure: Some(failure),
            notices: Vec::new(),
        }
    }

    fn merge(&mut self, input: &CycleInput, cycle: vm::VmCycle) -> CycleOutcome {
        self.classes = cycle.classes;
        self.on_error = cycle.on_error;
        let mut fallbacks = 0;
        let n = input.snapshot.connections.len();
        let mut results: Vec<Option<Result<Decision, Fault>>> =
            cycle.decisions.into_iter().map(Some).collect();
        results.resize_with(n, || None);
        // A class that disappeared from `classes` sends its connections to default.
        let decided: Vec<Option<Decision>> = results
            .iter()
            .map(|r| match r {
                Some(Ok(d)) if self.classes.get(&d.class).is_some() => Some(d.clone()),
                Some(Ok(_)) => Some(Decision::default_for(&self.classes)),
                _ => None,
            })
            .collect();
        let mut decisions = Vec::with_capacity(n);
        for (i, c) in input.snapshot.connections.iter().enumerate() {
            let decision = match (&decided[i], &results[i]) {
                (Some(d), _) => d.clone(),
                (None, Some(Err(fault))) => {
                    fallbacks += 1;
                    self.errors
                        .report(&fault.to_string(), Some(&c.socket.to_string()));
                    self.fallback(input, i, &decided)
                }
                // The cycle stopped early (its budget ran out).
                (None, _) => {
                    fallbacks += 1;
                    self.fallback(input, i, &decided)
                }
            };
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
            notices: cycle.notices,
        }
    }
}
