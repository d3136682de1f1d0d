//! Policy errors: the load-time error type, and the log that reports each distinct runtime error
//! once and counts repeats, so a bug that fires for every connection every second is one line in
//! the journal, not ten thousand.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// Why a script could not be loaded, or a whole cycle could not run. Messages start with
/// `file:line` wherever a line is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    /// A script (or a module it requires) that someone other than root could change, refused
    /// by a daemon running as root.
    #[error("{0}")]
    Unsafe(String),
    /// Syntax errors, errors in the script's top-level code, and contract violations found at
    /// load time (no `classify` function, a malformed `classes` table).
    #[error("{0}")]
    Load(Fault),
    /// A cycle that failed as a whole: `classes(ctx)` or `on_cycle(ctx)` raised an error, or the
    /// cycle ran out of time. The previous decisions stay in force.
    #[error("{0}")]
    Cycle(Fault),
}

impl PolicyError {
    /// What stopped the policy code, for the errors that come from running it.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            PolicyError::Load(f) | PolicyError::Cycle(f) => Some(f),
            PolicyError::Read { .. } | PolicyError::Unsafe(_) => None,
        }
    }
}

/// A position in a policy script (or a module it required).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub script: String,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.script, self.line)
    }
}

/// `file:line: `, or the fallback (`policy: `) when the line is unknown, or nothing.
struct At<'a>(&'a Option<Location>, &'a str);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(at), _) => write!(f, "{at}: "),
            (None, "") => Ok(()),
            (None, fallback) => write!(f, "{fallback}: "),
        }
    }
}

/// Why policy code stopped. The engine decides what to do next by the variant (stop the cycle,
/// rebuild the VM, keep one connection's previous decision), never by the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// A Lua error: a runtime or syntax error, a guarded library call that was refused, or a
    /// value that breaks the contract. `message` is Lua's, which starts with `file:line` when
    /// Lua knows it; `at` is that position.
    #[error("{message}")]
    Script {
        at: Option<Location>,
        message: String,
    },
    /// One `classify` call (or the script's top level) ran out of instructions.
    #[error(
        "{}instruction budget exceeded ({limit} instructions for one call; an endless loop?)",
        At(at, "")
    )]
    CallBudget { at: Option<Location>, limit: u64 },
    /// The whole cycle ran out of instructions; the rest of the cycle is skipped.
    #[error(
        "{}instruction budget for the cycle exceeded ({limit} instructions)",
        At(at, "")
    )]
    CycleBudget { at: Option<Location>, limit: u64 },
    /// The VM's allocator refused memory.
    #[error(
        "{}memory limit of {limit_mib} MiB exceeded ({detail})",
        At(at, "policy")
    )]
    Memory {
        at: Option<Location>,
        limit_mib: usize,
        detail: String,
    },
    /// The wall clock ran out: the cycle (or loading the script) was abandoned and its VM
    /// cancelled. `at` is where the script was last seen, in words.
    #[error("{at}: {} did not finish within {deadline:?} and was abandoned (a string pattern that backtracks, or a very long C call?); its VM is stopped", if *.loading { "loading the script" } else { "the cycle" })]
    Deadline {
        at: String,
        deadline: Duration,
        loading: bool,
    },
    /// Raised inside a VM the engine abandoned at its deadline, so that its thread stops.
    #[error("{}cancelled: this VM's cycle missed its deadline", At(at, ""))]
    Cancelled { at: Option<Location> },
    /// Earlier abandoned VMs have not stopped yet, so no new one is started (the number of
    /// policy threads is bounded); the previous decisions stay in force.
    #[error(
        "policy stuck: {threads} abandoned policy VM(s) are still running (the limit is {limit}); keeping the previous decisions until they stop"
    )]
    Stuck { threads: usize, limit: usize },
    /// The VM's thread could not be started or died.
    #[error("{0}")]
    Thread(String),
}

impl Fault {
    /// A Lua error message as a fault, with its leading `file:line` as the location.
    pub fn script(message: String) -> Fault {
        Fault::Script {
            at: Location::leading(&message),
            message,
        }
    }

    /// Whether the VM this fault came from can no longer run anything this cycle.
    pub fn ends_cycle(&self) -> bool {
        matches!(self, Fault::CycleBudget { .. } | Fault::Cancelled { .. })
    }
}

impl Location {
    /// The `file:line` a Lua message starts with (`policy.lua:4: attempt to ...`).
    fn leading(message: &str) -> Option<Location> {
        let mut from = 0;
        while let Some(colon) = message[from..].find(':').map(|c| from + c) {
            let rest = &message[colon + 1..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && rest[digits..].starts_with(':') {
                return Some(Location {
                    script: message[..colon].to_string(),
                    line: rest[..digits].parse().ok()?,
                });
            }
            from = colon + 1;
        }
        None
    }
}

/// One distinct error message and how often it occurred.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ErrorEntry {
    pub message: String,
    pub count: u64,
    /// The first connection it occurred for (`tcp 10.0.0.1:4000 -> 1.2.3.4:443 established`).
    pub example: Option<String>,
    /// Unix time of the last occurrence.
    pub last_seen: i64,
}

/// Distinct errors in the order first seen.
#[derive(Debug, Default)]
pub struct ErrorLog {
    entries: Vec<ErrorEntry>,
    index: HashMap<String, usize>,
}

impl ErrorLog {
    /// Records an error; returns `true` (and logs a warning) the first time a message is seen.
    pub fn report(&mut self, message: &str, example: Option<&str>) -> bool {
        let now = jiff::Timestamp::now().as_second();
        if let Some(&i) = self.index.get(message) {
            let e = &mut self.entries[i];
            e.count += 1;
            e.last_seen = now;
            return false;
        }
        match example {
            Some(ex) => tracing::warn!("policy: {message} (first for {ex})"),
            None => tracing::warn!("policy: {message}"),
        }
        self.index.insert(message.to_string(), self.entries.len());
        self.entries.push(ErrorEntry {
            message: message.to_string(),
            count: 1,
            example: example.map(str::to_string),
            last_seen: now,
        });
        true
    }

    pub fn entries(&self) -> &[ErrorEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets everything, e.g. after a reload replaced the script the errors came from.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.index.clear();
    }
}

/// The fault an mlua error carries: one the VM hook raised (found through the layers mlua wraps
/// around errors that cross Rust callbacks), else a Lua error by its message.
pub(crate) fn fault_of(error: &mlua::Error) -> Fault {
    raised(error)
        .cloned()
        .unwrap_or_else(|| Fault::script(lua_message(error)))
}

/// A [`Fault`] raised by shaper's own code inside the VM (the hook, the guards).
pub(crate) fn raised(error: &mlua::Error) -> Option<&Fault> {
    match error {
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            raised(cause)
        }
        mlua::Error::ExternalError(e) => e.downcast_ref::<Fault>(),
        _ => None,
    }
}

/// The readable part of an mlua error: Lua's `file:line: message`, without the `runtime error:`
/// prefix and the stack traceback mlua appends.
pub fn lua_message(error: &mlua::Error) -> String {
    match error {
        mlua::Error::CallbackError { cause, .. } => lua_message(cause),
        mlua::Error::WithContext { cause, context } => {
            format!("{context}: {}", lua_message(cause))
        }
        mlua::Error::RuntimeError(m) => first_line(m),
        mlua::Error::SyntaxError { message, .. } => first_line(message),
        mlua::Error::MemoryError(m) => first_line(m),
        mlua::Error::ExternalError(e) => first_line(&e.to_string()),
        other => first_line(&other.to_string()),
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_messages_are_reported_once_and_counted() {
        let mut log = ErrorLog::default();
        assert!(log.report("policy.lua:3: boom", Some("tcp a -> b")));
        assert!(!log.report("policy.lua:3: boom", Some("tcp c -> d")));
        assert!(log.report("policy.lua:4: other", None));
        assert_eq!(log.entries().len(), 2);
        assert_eq!(log.entries()[0].count, 2);
        assert_eq!(log.entries()[0].example.as_deref(), Some("tcp a -> b"));
    }

    #[test]
    fn script_faults_take_their_position_from_lua() {
        let f = Fault::script("/etc/shaper/policy.lua:12: attempt to call a nil value".into());
        let Fault::Script { at: Some(at), .. } = &f else {
            panic!("{f:?}")
        };
        assert_eq!(
            (at.script.as_str(), at.line),
            ("/etc/shaper/policy.lua", 12)
        );
        assert_eq!(
            f.to_string(),
            "/etc/shaper/policy.lua:12: attempt to call a nil value"
        );
        assert!(matches!(
            Fault::script("no position: here".into()),
            Fault::Script { at: None, .. }
        ));
    }
}
