//! The one place a policy VM is built, and what it runs each cycle.
//!
//! The sandbox: Lua 5.4 with only `table`, `string`, `math`, `utf8` and `coroutine`, plus a
//! read-only `os.time`/`os.date`/`os.clock`; no `io`, `debug`, `package`, `load`, `loadfile`,
//! `dofile`, `collectgarbage` or `string.dump`, and text chunks only (no bytecode). `require`
//! finds the embedded `lua/` library and modules in the script's own folder, nothing else.
//!
//! Limits: an instruction budget per `classify` call and per cycle, enforced by a global hook (so
//! coroutines are covered too), a memory limit, and guards on the two C functions that can run
//! long without executing a Lua instruction (`string.rep`, pattern matching). The wall-clock
//! deadline around all of it lives in [`super::Engine`].

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mlua::chunk::ChunkMode;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

use super::api::{self, ConnRef, Current, RateFiles};
use super::decide::{self, ClassSet, Decision};
use super::errors::{PolicyError, lua_message};
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
    pub fn position_in_call(&self) -> Option<String> {
        (self.position_call == self.call && !self.source.is_empty())
            .then(|| format!("{}:{}", self.source, self.line))
    }

    /// The recorded position, wherever it was taken.
    pub fn last_position(&self) -> Option<String> {
        (!self.source.is_empty()).then(|| format!("{}:{}", self.source, self.line))
    }
}

struct Budget {
    call_used: Cell<u64>,
    cycle_used: Cell<u64>,
    call_limit: u64,
    cycle_limit: u64,
}

/// What the VM hook needs.
#[derive(Clone)]
struct HookState {
    budget: Rc<Budget>,
    progress: Arc<Mutex<Progress>>,
    abandoned: Arc<AtomicBool>,
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

/// Installs the VM hook: budget checks every [`HOOK_EVERY`] instructions (global, so coroutines
/// are covered) and, with `every_line`, a position record on every line (used only to locate a
/// memory error, too slow for every cycle).
fn install_hook(lua: &Lua, state: HookState, every_line: bool) -> mlua::Result<()> {
    let mut triggers = HookTriggers::new().every_nth_instruction(HOOK_EVERY);
    if every_line {
        triggers = triggers.every_line();
    }
    lua.set_global_hook(triggers, move |lua, debug| {
        let (here, line) = script_position(lua, debug);
        if let Ok(mut p) = state.progress.lock() {
            p.line = line;
            p.position_call = p.call;
            if p.source != here {
                p.source.clone_from(&here);
            }
        }
        if debug.event() != mlua::debug::DebugEvent::Count {
            return Ok(VmState::Continue);
        }
        let budget = &state.budget;
        let step = u64::from(HOOK_EVERY);
        budget.call_used.set(budget.call_used.get() + step);
        budget.cycle_used.set(budget.cycle_used.get() + step);
        if state.abandoned.load(Ordering::Relaxed) {
            return Err(mlua::Error::runtime(format!(
                "{here}:{line}: cycle abandoned after its deadline"
            )));
        }
        if budget.call_used.get() > budget.call_limit {
            return Err(mlua::Error::runtime(format!(
                "{here}:{line}: instruction budget exceeded ({} instructions for one call; an \
                 endless loop?)",
                budget.call_limit
            )));
        }
        if budget.cycle_used.get() > budget.cycle_limit {
            return Err(mlua::Error::runtime(format!(
                "{here}:{line}: instruction budget for the cycle exceeded ({} instructions)",
                budget.cycle_limit
            )));
        }
        Ok(VmState::Continue)
    })
}

/// The result of one cycle inside the VM: the classes, and per connection a decision or the
/// error that prevented one.
pub(crate) struct VmCycle {
    pub classes: ClassSet,
    pub decisions: Vec<Result<Decision, String>>,
}

pub(crate) struct Vm {
    lua: Lua,
    classify: Function,
    /// `file:line` where `classify` is defined, for errors about what it returned.
    pub classify_at: String,
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
        let load_err = |e: mlua::Error| PolicyError::Load(lua_message(&e));
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
        });
        let hook = HookState {
            budget: budget.clone(),
            progress: progress.clone(),
            abandoned,
        };
        install_hook(&lua, hook.clone(), false).map_err(load_err)?;

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
                    tracing::info!("{log_name}: {msg}");
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

        budget.call_used.set(0);
        budget.cycle_used.set(0);
        lua.load(script.source.as_str())
            .set_name(chunk_name(&script.path))
            .set_mode(ChunkMode::Text)
            .exec()
            .map_err(|e| {
                let at = progress.lock().ok().and_then(|p| p.last_position());
                PolicyError::Load(with_memory_context(&e, at, options))
            })?;

        let classify = match lua.globals().get::<Value>("classify").map_err(load_err)? {
            Value::Function(f) => f,
            Value::Nil => {
                return Err(PolicyError::Load(format!(
                    "{name}: the script defines no `classify` function; add \
                     `function classify(conn, ctx) return \"default\" end`"
                )));
            }
            other => {
                return Err(PolicyError::Load(format!(
                    "{name}: `classify` must be a function; it is {}",
                    decide::type_name(&other)
                )));
            }
        };
        let info = classify.info();
        let classify_at = format!(
            "{}:{}",
            info.short_src.as_deref().unwrap_or(&name),
            info.line_defined.unwrap_or(0)
        );
        Ok(Vm {
            lua,
            classify,
            classify_at,
            make_ctx,
            process_meta,
            hook,
            script,
            required,
        })
    }

    /// The classes of this cycle: the `classes` table, or what `classes(ctx)` returns.
    fn classes(&self, ctx: &Table) -> Result<ClassSet, String> {
        let name = short_name(&self.script.path);
        let at = |class: &str| match decide::line_of_key(&self.script.source, class) {
            Some(line) if !class.is_empty() => format!("{name}:{line}"),
            _ => name.clone(),
        };
        let value = match self.lua.globals().get::<Value>("classes") {
            Ok(Value::Function(f)) => f.call::<Value>(ctx).map_err(|e| lua_message(&e))?,
            Ok(v) => v,
            Err(e) => return Err(lua_message(&e)),
        };
        match value {
            Value::Nil => Ok(ClassSet::default()),
            Value::Table(t) => decide::class_set(&t, &at),
            other => Err(format!(
                "{name}: `classes` must be a table (or a function returning one); it is {}",
                decide::type_name(&other)
            )),
        }
    }

    /// Runs one cycle. `Err` means the cycle failed as a whole (classes or `on_cycle`).
    pub fn run_cycle(
        &mut self,
        input: Arc<CycleInput>,
        options: &EngineOptions,
    ) -> Result<VmCycle, PolicyError> {
        self.lua.set_app_data(Current(input.clone()));
        let cache = self.lua.create_table().map(|tables| api::ProcessCache {
            tables,
            meta: self.process_meta.clone(),
        });
        let result = match cache {
            Ok(cache) => {
                self.lua.set_app_data(cache);
                self.run_cycle_inner(&input, options)
            }
            Err(e) => Err(PolicyError::Cycle(lua_message(&e))),
        };
        self.lua.remove_app_data::<Current>();
        self.lua.remove_app_data::<api::ProcessCache>();
        result
    }

    fn run_cycle_inner(
        &mut self,
        input: &CycleInput,
        options: &EngineOptions,
    ) -> Result<VmCycle, PolicyError> {
        let cycle_err = |e: String| PolicyError::Cycle(e);
        let budget = self.hook.budget.clone();
        budget.cycle_used.set(0);
        budget.call_used.set(0);
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
                time_table(&self.lua, &input.now).map_err(|e| cycle_err(e.to_string()))?,
                input.interface.as_deref(),
                limit(input.rate).map_err(|e| cycle_err(e.to_string()))?,
                limit(input.connection_rate).map_err(|e| cycle_err(e.to_string()))?,
            ))
            .map_err(|e| cycle_err(lua_message(&e)))?;
        let classes = self.classes(&ctx).map_err(cycle_err)?;
        if let Ok(Value::Function(hook)) = self.lua.globals().get::<Value>("on_cycle") {
            hook.call::<()>(&ctx).map_err(|e| {
                cycle_err(with_memory_context(
                    &e,
                    self.position(Progress::last_position),
                    options,
                ))
            })?;
        }
        let mut decisions = Vec::with_capacity(input.snapshot.connections.len());
        let mut located_memory_error = false;
        for i in 0..input.snapshot.connections.len() {
            budget.call_used.set(0);
            self.start_call(Some(i));
            let decision = match self.call_classify(i, &ctx) {
                Ok((class, limit)) => self.decision(&class, &limit, &classes),
                Err(e) if is_memory_error(&e) && !located_memory_error => {
                    located_memory_error = true;
                    let at = self.locate_memory_error(i, &ctx);
                    Err(with_memory_context(&e, at, options))
                }
                Err(e) => Err(with_memory_context(
                    &e,
                    self.position(Progress::position_in_call),
                    options,
                )),
            };
            if decision
                .as_ref()
                .is_err_and(|e| e.contains("instruction budget for the cycle"))
            {
                // The rest of the cycle would fail the same way; stop here.
                decisions.push(decision);
                break;
            }
            decisions.push(decision);
        }
        self.start_call(None);
        Ok(VmCycle { classes, decisions })
    }

    /// A position recorded by the hook, read with `which`.
    fn position(&self, which: fn(&Progress) -> Option<String>) -> Option<String> {
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
    fn locate_memory_error(&self, i: usize, ctx: &Table) -> Option<String> {
        let _ = self.lua.gc_collect();
        install_hook(&self.lua, self.hook.clone(), true).ok()?;
        self.hook.budget.call_used.set(0);
        self.start_call(Some(i));
        let _ = self.call_classify(i, ctx);
        let at = self
            .hook
            .progress
            .lock()
            .ok()
            .and_then(|p| p.position_in_call());
        let _ = install_hook(&self.lua, self.hook.clone(), false);
        let _ = self.lua.gc_collect();
        at
    }

    fn decision(
        &self,
        class: &Value,
        limit: &Value,
        classes: &ClassSet,
    ) -> Result<Decision, String> {
        let at = &self.classify_at;
        let class = decide::class_value(class, classes).map_err(|e| format!("{at}: {e}"))?;
        let limit = decide::limit_value(limit, "the limit classify returned")
            .map_err(|e| format!("{at}: {e}"))?;
        Ok(Decision { class, limit })
    }
}

/// The message of a Lua error, with `at` (a `file:line`) added to memory errors, which Lua
/// reports without a position.
fn with_memory_context(e: &mlua::Error, at: Option<String>, options: &EngineOptions) -> String {
    let message = lua_message(e);
    if is_memory_error(e) {
        format!(
            "{}: memory limit of {} MiB exceeded ({message})",
            at.unwrap_or_else(|| "policy".to_string()),
            options.memory_limit >> 20
        )
    } else {
        message
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
