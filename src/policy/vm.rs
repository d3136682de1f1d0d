//! The one place a policy VM is built, and what it runs each cycle.
//!
//! The sandbox: Lua 5.4 with only `table`, `string`, `math`, `utf8` and `coroutine`, plus a
//! read-only `os.time`/`os.date`/`os.clock`; no `io`, `debug`, `package`, `load`, `loadfile`,
//! `dofile`, `collectgarbage` or `string.dump`, and text chunks only (no bytecode). `require`
//! finds the embedded `lua/` library and modules in the script's own folder, nothing else.
//!
//! Limits: an instruction budget per `classify` call and per cycle, enforced by a global hook (so
//! coroutines are covered too), a memory limit, and guards (in the prelude) on the library
//! functions that can run long inside C without executing a Lua instruction: `string.rep`, pattern
//! matching, and the `table` functions that walk a length a metatable can make up. The wall-clock
//! deadline around all of it lives in [`super::Engine`], which cancels a VM that overruns it: the
//! hook then raises [`Fault::Cancelled`] and the VM's thread ends.
//!
//! What the hook raises is a typed [`Fault`], and it cannot be swallowed: `pcall`, `xpcall`,
//! `coroutine.resume` and `coroutine.close` re-raise it, so a script that catches errors in a
//! loop still stops.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlua::chunk::ChunkMode;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

use super::api::{self, ConnRef, Current, RateFiles};
use super::decide::{self, ClassSet, Decision};
use super::errors::{Fault, Location, PolicyError, fault_of, lua_message};
use super::{CycleInput, EngineOptions, Script};

/// The Lua library shipped with shaper, embedded so a policy works with no files installed.
/// Chunk names point at where packages install the files, so error messages lead somewhere real.
pub const LIBRARY: &[(&str, &str)] = &[("shaper", include_str!("../../lua/shaper.lua"))];
pub const LIBRARY_DIR: &str = "/usr/share/shaper/lua";

const PRELUDE: &str = include_str!("prelude.lua");
/// How the prelude appears in positions (`short_src` of its `=` chunk name).
const PRELUDE_NAME: &str = "[shaper prelude]";
/// Instructions between two budget checks.
const HOOK_EVERY: u32 = 1000;
/// Least time between two positions recorded by guarded library calls.
const GUARD_RECORD_EVERY: Duration = Duration::from_millis(1);

/// Where the VM is, shared with the engine so a cycle that overruns its deadline (or runs out
/// of memory) can be reported with a `file:line`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Progress {
    /// Script position when the hook last ran.
    pub source: String,
    pub line: usize,
    /// The `classify` call that position was recorded in.
    pub position_call: u64,
    /// The `classify` call running now (counting from 1), and the connection it is for.
    pub call: u64,
    pub conn: Option<usize>,
}

impl Progress {
    /// The recorded position if it belongs to the current call.
    pub fn location_in_call(&self) -> Option<Location> {
        if self.position_call == self.call {
            self.last_location()
        } else {
            None
        }
    }

    /// The recorded position, wherever it was taken.
    pub fn last_location(&self) -> Option<Location> {
        (!self.source.is_empty()).then(|| Location {
            script: self.source.clone(),
            line: self.line,
        })
    }
}

struct Budget {
    call_used: Cell<u64>,
    cycle_used: Cell<u64>,
    call_limit: u64,
    cycle_limit: u64,
    /// What the hook raised in this call, raised again by `raw.checkpoint` after a protected
    /// call caught it.
    pending: std::cell::RefCell<Option<Fault>>,
    /// When a guarded library call last recorded its position: a cycle stuck in a few long C
    /// calls runs too few instructions for the hook to say where it is, so the guards record
    /// it too, at most once per [`GUARD_RECORD_EVERY`] to stay cheap.
    guard_recorded: Cell<Option<Instant>>,
}

impl Budget {
    /// Starts a `classify` call (or the script's top level) with a fresh call budget.
    fn start_call(&self) {
        self.call_used.set(0);
        self.pending.replace(None);
    }
}

/// What the VM hook needs.
#[derive(Clone)]
struct HookState {
    budget: Rc<Budget>,
    progress: Arc<Mutex<Progress>>,
    /// Set by the engine when it abandons this VM at a deadline.
    abandoned: Arc<AtomicBool>,
}

impl HookState {
    /// The fault that must stop the running code, if any: a cancelled VM, or one the hook raised
    /// earlier in this call.
    fn interrupt(&self, at: impl FnOnce() -> Option<Location>) -> Option<Fault> {
        if self.abandoned.load(Ordering::Relaxed) {
            return Some(Fault::Cancelled { at: at() });
        }
        self.budget.pending.borrow().clone()
    }

    /// Records where the script is, for the engine to name if the cycle overruns its deadline.
    fn record(&self, source: &str, line: usize) {
        if let Ok(mut p) = self.progress.lock() {
            p.line = line;
            p.position_call = p.call;
            if p.source != source {
                p.source = source.to_string();
            }
        }
    }

    /// The checkpoint of a guarded library call: records its position (at most once a
    /// millisecond) and raises a pending stop.
    fn checkpoint(&self, lua: &Lua) -> mlua::Result<()> {
        let now = Instant::now();
        let due = self
            .budget
            .guard_recorded
            .get()
            .is_none_or(|last| now.duration_since(last) >= GUARD_RECORD_EVERY);
        if due && let Some(at) = caller_location(lua) {
            self.budget.guard_recorded.set(Some(now));
            self.record(&at.script, at.line);
        }
        match self.interrupt(|| caller_location(lua)) {
            Some(fault) => Err(self.raise(fault)),
            None => Ok(()),
        }
    }

    /// Raises `fault` into Lua, remembering it so a protected call cannot swallow it.
    fn raise(&self, fault: Fault) -> mlua::Error {
        self.budget.pending.replace(Some(fault.clone()));
        mlua::Error::external(fault)
    }
}

/// The script position of the running code, skipping the prelude's wrapper functions (the
/// position that matters there is the caller's).
fn script_position(lua: &Lua, debug: &mlua::debug::Debug) -> (String, usize) {
    let mut here = debug.source().short_src.unwrap_or_default().into_owned();
    let mut line = debug.current_line().unwrap_or(0);
    let mut level = 1;
    while here == PRELUDE_NAME && level < 8 {
        match lua.inspect_stack(level, |d| {
            (
                d.source().short_src.unwrap_or_default().into_owned(),
                d.current_line().unwrap_or(0),
            )
        }) {
            Some(found) => (here, line) = found,
            None => break,
        }
        level += 1;
    }
    (here, line)
}

/// The script position of the code that called into Rust, past the prelude's wrappers.
fn caller_location(lua: &Lua) -> Option<Location> {
    (1..8)
        .filter_map(|level| {
            lua.inspect_stack(level, |d| {
                (
                    d.source().short_src.unwrap_or_default().into_owned(),
                    d.current_line().unwrap_or(0),
                )
            })
        })
        .find(|(source, _)| source != PRELUDE_NAME && source != "[C]")
        .map(|(script, line)| Location { script, line })
}

/// What the VM hook records besides its budget checks, each too slow for every cycle and used
/// only to locate an error after the fact, by running the failing call again.
#[derive(Clone, Copy, PartialEq)]
enum Trace {
    /// Positions sampled at the budget checks.
    Sampled,
    /// Every line: where a memory error happened.
    Lines,
    /// Every return from the script's own code (not the prelude, the shaper library or C):
    /// the last is the `return` whose value `classify` gave back.
    Returns,
}

/// Installs the VM hook: budget checks every [`HOOK_EVERY`] instructions (global, so coroutines
/// are covered), recording positions as `trace` says.
fn install_hook(lua: &Lua, state: HookState, trace: Trace) -> mlua::Result<()> {
    let mut triggers = HookTriggers::new().every_nth_instruction(HOOK_EVERY);
    match trace {
        Trace::Sampled => {}
        Trace::Lines => triggers = triggers.every_line(),
        Trace::Returns => triggers = triggers.on_returns(),
    }
    lua.set_global_hook(triggers, move |lua, debug| {
        if debug.event() == mlua::debug::DebugEvent::Ret {
            let source = debug.source();
            let here = source.short_src.unwrap_or_default();
            let library = here.starts_with('[') || here.starts_with(LIBRARY_DIR);
            if let (false, Some(line)) = (library, debug.current_line()) {
                state.record(&here, line);
            }
            return Ok(VmState::Continue);
        }
        let (here, line) = script_position(lua, debug);
        state.record(&here, line);
        if debug.event() != mlua::debug::DebugEvent::Count {
            return Ok(VmState::Continue);
        }
        let budget = &state.budget;
        let step = u64::from(HOOK_EVERY);
        budget.call_used.set(budget.call_used.get() + step);
        budget.cycle_used.set(budget.cycle_used.get() + step);
        let at = || {
            Some(Location {
                script: here.clone(),
                line,
            })
        };
        let fault = if let Some(fault) = state.interrupt(at) {
            fault
        } else if budget.call_used.get() > budget.call_limit {
            Fault::CallBudget {
                at: at(),
                limit: budget.call_limit,
            }
        } else if budget.cycle_used.get() > budget.cycle_limit {
            Fault::CycleBudget {
                at: at(),
                limit: budget.cycle_limit,
            }
        } else {
            return Ok(VmState::Continue);
        };
        Err(state.raise(fault))
    })
}

/// The result of one cycle inside the VM: the classes, and per connection a decision or the
/// error that prevented one.
pub(crate) struct VmCycle {
    pub classes: ClassSet,
    pub on_error: decide::OnError,
    pub decisions: Vec<Result<Decision, Fault>>,
    pub notices: Vec<super::Notice>,
}

pub(crate) struct Vm {
    lua: Lua,
    classify: Function,
    /// `file:line` where `classify` is defined, for a stuck cycle's message.
    pub classify_at: String,
    /// The first and last lines of `classify` in the script (where `check` looks for the
    /// class names it returns), if it is defined there.
    pub classify_span: Option<(usize, usize)>,
    /// Where each distinct problem with what `classify` returned was located (its `return`).
    return_at: std::cell::RefCell<std::collections::HashMap<String, Option<Location>>>,
    make_ctx: Function,
    /// The metatable of process tables.
    process_meta: Table,
    hook: HookState,
    script: Arc<Script>,
    /// Modules loaded from the script's folder (for reload-on-change).
    pub required: Rc<std::cell::RefCell<Vec<PathBuf>>>,
}

fn chunk_name(path: &Path) -> String {
    format!("@{}", path.display())
}

fn short_name(path: &Path) -> String {
    path.display().to_string()
}

impl Vm {
    /// Builds a VM and runs the script's top level. Errors carry `file:line`.
    pub fn build(
        script: Arc<Script>,
        options: &EngineOptions,
        progress: Arc<Mutex<Progress>>,
        abandoned: Arc<AtomicBool>,
    ) -> Result<Vm, PolicyError> {
        let load_err = |e: mlua::Error| PolicyError::Load(fault_of(&e));
        let lua = Lua::new_with(
            StdLib::TABLE
                | StdLib::STRING
                | StdLib::MATH
                | StdLib::UTF8
                | StdLib::COROUTINE
                | StdLib::OS,
            LuaOptions::default(),
        )
        .map_err(load_err)?;
        let globals = lua.globals();
        for name in ["dofile", "loadfile", "load", "require", "collectgarbage"] {
            globals.raw_set(name, Value::Nil).map_err(load_err)?;
        }
        lua.set_app_data(RateFiles {
            files: Default::default(),
            strict: options.strict_permissions,
        });

        let budget = Rc::new(Budget {
            call_used: Cell::new(0),
            cycle_used: Cell::new(0),
            call_limit: options.call_budget,
            cycle_limit: options.cycle_budget,
            pending: Default::default(),
            guard_recorded: Cell::new(None),
        });
        let hook = HookState {
            budget: budget.clone(),
            progress: progress.clone(),
            abandoned,
        };
        install_hook(&lua, hook.clone(), Trace::Sampled).map_err(load_err)?;

        let required = Rc::new(std::cell::RefCell::new(Vec::new()));
        let raw = lua.create_table().map_err(load_err)?;
        let name = short_name(&script.path);
        let setup = || -> mlua::Result<()> {
            raw.set(
                "now",
                lua.create_function(|lua, ()| {
                    Ok(lua
                        .app_data_ref::<Current>()
                        .map(|c| c.0.now.timestamp().as_second())
                        .unwrap_or_else(|| jiff::Timestamp::now().as_second()))
                })?,
            )?;
            raw.set("memory_limit", options.memory_limit)?;
            let guard = hook.clone();
            raw.set(
                "checkpoint",
                lua.create_function(move |lua, ()| guard.checkpoint(lua))?,
            )?;
            raw.set(
                "pattern_limit",
                lua.create_function(|_, p: mlua::LuaString| Ok(api::pattern_limit(&p.as_bytes())))?,
            )?;
            raw.set("usage", lua.create_function(api::usage)?)?;
            raw.set("class", lua.create_function(api::class)?)?;
            raw.set("rate_file", lua.create_function(api::rate_file)?)?;
            let log_name = name.clone();
            raw.set(
                "log",
                lua.create_function(move |_, msg: String| {
                    tracing::info!(target: super::PRINT_TARGET, "{log_name}: {msg}");
                    Ok(())
                })?,
            )?;
            globals.set(
                "require",
                require_function(
                    &lua,
                    &script.path,
                    required.clone(),
                    options.strict_permissions,
                )?,
            )?;
            Ok(())
        };
        setup().map_err(load_err)?;
        let (make_ctx, process_meta): (Function, Table) = lua
            .load(PRELUDE)
            .set_name(format!("={PRELUDE_NAME}"))
            .set_mode(ChunkMode::Text)
            .call(raw)
            .map_err(load_err)?;
        lua.set_memory_limit(options.memory_limit)
            .map_err(load_err)?;

        budget.start_call();
        budget.cycle_used.set(0);
        lua.load(script.source.as_str())
            .set_name(chunk_name(&script.path))
            .set_mode(ChunkMode::Text)
            .exec()
            .map_err(|e| {
                let at = progress.lock().ok().and_then(|p| p.last_location());
                PolicyError::Load(fault(&e, at, options))
            })?;

        let classify = match lua.globals().get::<Value>("classify").map_err(load_err)? {
            Value::Function(f) => f,
            Value::Nil => {
                return Err(PolicyError::Load(Fault::script(format!(
                    "{name}: the script defines no `classify` function; add \
                     `function classify(conn, ctx) return \"default\" end`"
                ))));
            }
            other => {
                return Err(PolicyError::Load(Fault::script(format!(
                    "{name}: `classify` must be a function; it is {}",
                    decide::type_name(&other)
                ))));
            }
        };
        let info = classify.info();
        let classify_at = format!(
            "{}:{}",
            info.short_src.as_deref().unwrap_or(&name),
            info.line_defined.unwrap_or(0)
        );
        let classify_span = match (info.line_defined, info.last_line_defined) {
            (Some(first), Some(last))
                if info.short_src.as_deref() == Some(name.as_str()) && first > 0 =>
            {
                Some((first, last))
            }
            _ => None,
        };
        Ok(Vm {
            lua,
            classify,
            classify_at,
            classify_span,
            return_at: Default::default(),
            make_ctx,
            process_meta,
            hook,
            script,
            required,
        })
    }

    /// The classes of this cycle: the `classes` table, or what `classes(ctx)` returns.
    /// Errors about one class name the line that declares it; errors about the table as a
    /// whole (`""` for the class) name the line that assigns `classes`.
    fn classes(&self, ctx: &Table) -> Result<ClassSet, Fault> {
        let name = short_name(&self.script.path);
        let at = |class: &str| {
            let key = if class.is_empty() { "classes" } else { class };
            match decide::line_of_key(&self.script.source, key) {
                Some(line) => format!("{name}:{line}"),
                None => name.clone(),
            }
        };
        let value = match self.lua.globals().get::<Value>("classes") {
            Ok(Value::Function(f)) => f.call::<Value>(ctx).map_err(|e| fault_of(&e))?,
            Ok(v) => v,
            Err(e) => return Err(fault_of(&e)),
        };
        match value {
            Value::Nil => Ok(ClassSet::default()),
            Value::Table(t) => decide::class_set(&t, &at).map_err(Fault::script),
            other => Err(Fault::script(format!(
                "{name}: `classes` must be a table (or a function returning one); it is {}",
                decide::type_name(&other)
            ))),
        }
    }

    /// Runs one cycle. `Err` means the cycle failed as a whole (classes or `on_cycle`).
    pub fn run_cycle(
        &mut self,
        input: Arc<CycleInput>,
        options: &EngineOptions,
    ) -> Result<VmCycle, PolicyError> {
        self.lua.set_app_data(Current(input.clone()));
        self.lua.set_app_data(api::Notices::default());
        let cache = self.lua.create_table().map(|tables| api::ProcessCache {
            tables,
            meta: self.process_meta.clone(),
        });
        let result = match cache {
            Ok(cache) => {
                self.lua.set_app_data(cache);
                self.run_cycle_inner(&input, options)
            }
            Err(e) => Err(PolicyError::Cycle(fault_of(&e))),
        };
        self.lua.remove_app_data::<Current>();
        self.lua.remove_app_data::<api::ProcessCache>();
        self.lua.remove_app_data::<api::Notices>();
        result
    }

    fn run_cycle_inner(
        &mut self,
        input: &CycleInput,
        options: &EngineOptions,
    ) -> Result<VmCycle, PolicyError> {
        let cycle_err = |e: mlua::Error| PolicyError::Cycle(fault_of(&e));
        let budget = self.hook.budget.clone();
        budget.cycle_used.set(0);
        budget.start_call();
        let limit = |pair: Option<crate::units::RatePair>| -> mlua::Result<Value> {
            match pair {
                None => Ok(Value::Nil),
                Some(p) => {
                    let t = self.lua.create_table()?;
                    t.raw_set("up", p.up.map(|r| r.bits_per_sec()))?;
                    t.raw_set("down", p.down.map(|r| r.bits_per_sec()))?;
                    Ok(Value::Table(t))
                }
            }
        };
        let ctx: Table = self
            .make_ctx
            .call((
                input.now.timestamp().as_second(),
                time_table(&self.lua, &input.now).map_err(cycle_err)?,
                input.interface.as_deref(),
                limit(input.rate).map_err(cycle_err)?,
                limit(input.connection_rate).map_err(cycle_err)?,
            ))
            .map_err(cycle_err)?;
        let classes = self.classes(&ctx).map_err(PolicyError::Cycle)?;
        let on_error = self
            .lua
            .globals()
            .get::<Value>("on_error")
            .map_err(cycle_err)
            .and_then(|v| {
                decide::on_error_value(&v, &classes).map_err(|e| {
                    let name = short_name(&self.script.path);
                    let at = decide::line_of_key(&self.script.source, "on_error")
                        .map_or(name.clone(), |line| format!("{name}:{line}"));
                    PolicyError::Cycle(Fault::script(format!("{at}: {e}")))
                })
            })?;
        if let Ok(Value::Function(hook)) = self.lua.globals().get::<Value>("on_cycle") {
            hook.call::<()>(&ctx).map_err(|e| {
                PolicyError::Cycle(fault(&e, self.position(Progress::last_location), options))
            })?;
        }
        let mut decisions = Vec::with_capacity(input.snapshot.connections.len());
        let mut located_memory_error = false;
        for i in 0..input.snapshot.connections.len() {
            budget.start_call();
            self.start_call(Some(i));
            let decision = match self.call_classify(i, &ctx) {
                Ok((class, limit)) => self.decision(&class, &limit, &classes).map_err(|problem| {
                    let at = self.return_at(i, &ctx, &problem);
                    Fault::Script {
                        message: format!(
                            "{}: {problem}",
                            at.as_ref()
                                .map_or_else(|| self.classify_at.clone(), Location::to_string)
                        ),
                        at,
                    }
                }),
                Err(e) if is_memory_error(&e) && !located_memory_error => {
                    located_memory_error = true;
                    let at = self.locate_memory_error(i, &ctx);
                    Err(fault(&e, at, options))
                }
                Err(e) => Err(fault(
                    &e,
                    self.position(Progress::location_in_call),
                    options,
                )),
            };
            // Out of cycle budget, or cancelled: the rest of the cycle would fail the same way.
            let stop = decision.as_ref().is_err_and(Fault::ends_cycle);
            decisions.push(decision);
            if stop {
                break;
            }
        }
        self.start_call(None);
        let notices = self
            .lua
            .remove_app_data::<api::Notices>()
            .map(|n| n.0)
            .unwrap_or_default();
        Ok(VmCycle {
            classes,
            on_error,
            decisions,
            notices,
        })
    }

    /// A position recorded by the hook, read with `which`.
    fn position(&self, which: fn(&Progress) -> Option<Location>) -> Option<Location> {
        self.hook.progress.lock().ok().and_then(|p| which(&p))
    }

    fn call_classify(&self, i: usize, ctx: &Table) -> mlua::Result<(Value, Value)> {
        let conn = self.lua.create_userdata(ConnRef(i))?;
        self.classify.call::<(Value, Value)>((conn, ctx))
    }

    /// Marks the start of a `classify` call (or the end of the cycle's calls, with `None`).
    fn start_call(&self, conn: Option<usize>) {
        if let Ok(mut p) = self.hook.progress.lock() {
            p.call += 1;
            p.conn = conn;
        }
    }

    /// Lua reports a memory error without a position, and the sampling hook may not have run
    /// during the failing call. Running the call once more with a line hook, after a collection,
    /// finds the line that allocates. Done once per cycle, only when memory ran out.
    fn locate_memory_error(&self, i: usize, ctx: &Table) -> Option<Location> {
        let _ = self.lua.gc_collect();
        let at = self.rerun_traced(i, ctx, Trace::Lines);
        let _ = self.lua.gc_collect();
        at
    }

    /// The `return` that gave back what `classify` returned for connection `i`, when that was
    /// wrong (`problem`): a value carries no position, so the call runs once more with a hook
    /// on returns. Each distinct problem is located once per VM (a script that returns a
    /// misspelt class for every connection is run twice for the first only).
    fn return_at(&self, i: usize, ctx: &Table, problem: &str) -> Option<Location> {
        if let Some(at) = self.return_at.borrow().get(problem) {
            return at.clone();
        }
        let at = self.rerun_traced(i, ctx, Trace::Returns);
        self.return_at
            .borrow_mut()
            .insert(problem.to_string(), at.clone());
        at
    }

    /// Runs `classify` for connection `i` again with `trace`, and returns the last position it
    /// recorded in that call.
    fn rerun_traced(&self, i: usize, ctx: &Table, trace: Trace) -> Option<Location> {
        install_hook(&self.lua, self.hook.clone(), trace).ok()?;
        self.hook.budget.start_call();
        self.start_call(Some(i));
        let _ = self.call_classify(i, ctx);
        let at = self
            .hook
            .progress
            .lock()
            .ok()
            .and_then(|p| p.location_in_call());
        let _ = install_hook(&self.lua, self.hook.clone(), Trace::Sampled);
        at
    }

    /// The decision `classify` returned, or what is wrong with it (without a position).
    fn decision(
        &self,
        class: &Value,
        limit: &Value,
        classes: &ClassSet,
    ) -> Result<Decision, String> {
        let class = decide::class_value(class, classes)?;
        let limit = decide::limit_value(limit, "the limit classify returned")?;
        Ok(Decision { class, limit })
    }
}

/// The fault of a Lua error, with `at` as the position of memory errors, which Lua reports
/// without one.
fn fault(e: &mlua::Error, at: Option<Location>, options: &EngineOptions) -> Fault {
    if is_memory_error(e) {
        Fault::Memory {
            at,
            limit_mib: options.memory_limit >> 20,
            detail: lua_message(e),
        }
    } else {
        fault_of(e)
    }
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            is_memory_error(cause)
        }
        _ => false,
    }
}

/// `ctx.time`: the fields of `os.date("*t")`, in local time.
fn time_table(lua: &Lua, now: &jiff::Zoned) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 9)?;
    t.raw_set("year", now.year())?;
    t.raw_set("month", now.month())?;
    t.raw_set("day", now.day())?;
    t.raw_set("hour", now.hour())?;
    t.raw_set("min", now.minute())?;
    t.raw_set("sec", now.second())?;
    t.raw_set("wday", now.weekday().to_sunday_one_offset())?;
    t.raw_set("yday", now.day_of_year())?;
    let dst = now
        .time_zone()
        .to_offset_info(now.timestamp())
        .dst()
        .is_dst();
    t.raw_set("isdst", dst)?;
    Ok(t)
}

/// `require(name)`: the embedded library first, then `<script folder>/<name with dots as
/// slashes>.lua`. Names cannot climb out of the folder.
fn require_function(
    lua: &Lua,
    script: &Path,
    required: Rc<std::cell::RefCell<Vec<PathBuf>>>,
    strict_permissions: bool,
) -> mlua::Result<Function> {
    let dir = script
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let loaded = lua.create_table()?;
    let natives = api::natives(lua)?;
    lua.create_function(move |lua, name: String| {
        if let Some(v) = loaded.raw_get::<Option<Value>>(name.as_str())? {
            return Ok(v);
        }
        let (source, chunk, native) = if let Some((_, src)) =
            LIBRARY.iter().find(|(n, _)| *n == name)
        {
            (src.to_string(), format!("@{LIBRARY_DIR}/{name}.lua"), Some(natives.clone()))
        } else {
            if name.is_empty()
                || name.split('.').any(|part| {
                    part.is_empty()
                        || !part
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                })
            {
                return Err(mlua::Error::runtime(format!(
                    "require {name:?}: module names are words separated by dots, e.g. \"mylib\" or \"lib.util\""
                )));
            }
            let path = dir.join(format!("{}.lua", name.replace('.', "/")));
            // Errors name the line of the `require`, like Lua's own.
            let at = lua
                .inspect_stack(1, |d| {
                    format!(
                        "{}:{}: ",
                        d.source().short_src.unwrap_or_default(),
                        d.current_line().unwrap_or(0)
                    )
                })
                .unwrap_or_default();
            let src = super::read_source(&path, strict_permissions).map_err(|e| match e {
                super::PolicyError::Read { message, .. } => mlua::Error::runtime(format!(
                    "{at}require {name:?}: cannot read {} ({message}); policies can require the \
                     shaper library and modules next to the script",
                    path.display()
                )),
                unsafe_module => mlua::Error::runtime(format!("{at}{unsafe_module}")),
            })?;
            required.borrow_mut().push(path.clone());
            (src, chunk_name(&path), None)
        };
        let value: Value = lua
            .load(source)
            .set_name(chunk)
            .set_mode(ChunkMode::Text)
            .call((name.as_str(), native))?;
        let value = if value.is_nil() { Value::Boolean(true) } else { value };
        loaded.raw_set(name, value.clone())?;
        Ok(value)
    })
}
