//! Policy errors: the load-time error type, and the log that reports each distinct runtime error
//! once and counts repeats, so a bug that fires for every connection every second is one line in
//! the journal, not ten thousand.

use std::collections::HashMap;

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
    Load(String),
    /// A cycle that failed as a whole: `classes(ctx)` or `on_cycle(ctx)` raised an error, or the
    /// cycle ran out of time. The previous decisions stay in force.
    #[error("{0}")]
    Cycle(String),
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
}
