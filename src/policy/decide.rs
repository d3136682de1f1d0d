//! What the policy returns, checked: class definitions, class names and limits.
//!
//! Everything a script hands back passes through here, so a typo or a wrong unit becomes an error
//! naming the value, never a silently wrong limit.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use mlua::{Table, Value};
use serde::{Deserialize, Serialize};

use crate::units::{Rate, RatePair};

/// The class every connection belongs to unless the policy says otherwise.
pub const DEFAULT_CLASS: &str = "default";
/// Priority of a class that does not set one (HTB priorities run 0, served first, to 7).
pub const DEFAULT_PRIO: u8 = 4;
/// More classes than this is almost certainly a script generating names per connection.
pub const MAX_CLASSES: usize = 1000;

/// What a class's `rate` and `ceil` apply to (NetLimiter's limit scopes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Each {
    /// The class as a whole shares its `ceil`.
    #[default]
    Class,
    /// Every process in the class gets its own `rate`/`ceil`.
    Process,
    /// Every connection in the class gets its own `rate`/`ceil`.
    Connection,
}

impl Each {
    pub fn as_str(self) -> &'static str {
        match self {
            Each::Class => "class",
            Each::Process => "process",
            Each::Connection => "connection",
        }
    }
}

/// One class as declared in `classes`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClassDef {
    pub name: Arc<str>,
    /// 0 (served first) to 7.
    pub prio: u8,
    /// Guaranteed rate (HTB `rate`); unset = a small share.
    pub rate: RatePair,
    /// Maximum rate (HTB `ceil`); unset = the link.
    pub ceil: RatePair,
    pub each: Each,
    pub description: Option<String>,
    /// Every packet of the class's connections is dropped (NetLimiter's Blocker): `block = true`.
    #[serde(default)]
    pub block: bool,
}

impl ClassDef {
    pub fn default_class() -> ClassDef {
        ClassDef {
            name: DEFAULT_CLASS.into(),
            prio: DEFAULT_PRIO,
            rate: RatePair::default(),
            ceil: RatePair::default(),
            each: Each::Class,
            description: None,
            block: false,
        }
    }
}

/// The validated classes of one cycle, by name; always contains `default`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClassSet {
    pub classes: BTreeMap<Arc<str>, ClassDef>,
}

impl Default for ClassSet {
    fn default() -> Self {
        let d = ClassDef::default_class();
        ClassSet {
            classes: BTreeMap::from([(d.name.clone(), d)]),
        }
    }
}

impl ClassSet {
    pub fn get(&self, name: &str) -> Option<&ClassDef> {
        self.classes.get(name)
    }

    /// The interned name of the default class.
    pub fn default_name(&self) -> Arc<str> {
        self.classes
            .get(DEFAULT_CLASS)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| DEFAULT_CLASS.into())
    }

    pub fn names(&self) -> String {
        self.classes
            .keys()
            .map(|k| k.as_ref())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The policy's answer for one connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    pub class: Arc<str>,
    /// A limit for this one connection, on top of its class's.
    pub limit: RatePair,
}

impl Decision {
    pub fn default_for(classes: &ClassSet) -> Decision {
        Decision {
            class: classes.default_name(),
            limit: RatePair::default(),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.class)?;
        if self.limit != RatePair::default() {
            write!(f, " limit {}", self.limit)?;
        }
        Ok(())
    }
}

/// A Lua string value as Rust text; `None` for other types or invalid UTF-8.
pub(crate) fn as_text(v: &Value) -> Option<String> {
    v.as_string()
        .and_then(|s| s.to_str().ok().map(|s| s.to_string()))
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) | Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Table(_) => "a table",
        Value::Function(_) => "a function",
        Value::Thread(_) => "a coroutine",
        _ => "a userdata value",
    }
}

const RATE_FORMS: &str =
    "a number of bit/s, a string with a unit such as \"2mbit\", or {up = ..., down = ...}";

/// One direction's rate: a number of bit/s, a unit string, `"unlimited"` or nil. Numbers go
/// through the same parser as strings, so the same floor, ceiling and whole-number rule apply.
pub(crate) fn rate_value(v: &Value, what: &str) -> Result<Option<Rate>, String> {
    let text = match v {
        Value::Nil => return Ok(None),
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s
            .to_str()
            .map_err(|_| format!("{what} is not valid UTF-8"))?
            .to_string(),
        other => {
            return Err(format!(
                "{what} must be {RATE_FORMS}; got {}",
                type_name(other)
            ));
        }
    };
    if text.trim().eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let rate: Rate = text.parse().map_err(|e| format!("{what}: {e}"))?;
    Ok(Some(rate))
}

/// A limit in any of its forms: number or string (both directions), or `{up =, down =}`.
pub(crate) fn limit_value(v: &Value, what: &str) -> Result<RatePair, String> {
    match v {
        Value::Table(t) => {
            let mut pair = RatePair::default();
            for entry in t.pairs::<Value, Value>() {
                let (k, value) = entry.map_err(|e| format!("{what}: {e}"))?;
                match as_text(&k).as_deref() {
                    Some("up") => pair.up = rate_value(&value, &format!("{what}.up"))?,
                    Some("down") => pair.down = rate_value(&value, &format!("{what}.down"))?,
                    _ => {
                        return Err(format!(
                            "{what} has an unknown key {}: a limit table takes only `up` and `down`",
                            describe_key(&k)
                        ));
                    }
                }
            }
            Ok(pair)
        }
        other => {
            let both = rate_value(other, what)?;
            Ok(RatePair {
                up: both,
                down: both,
            })
        }
    }
}

fn describe_key(k: &Value) -> String {
    match as_text(k) {
        Some(s) => format!("{s:?}"),
        None => format!("({})", type_name(k)),
    }
}

/// Where a connection goes when its `classify` fails (the `on_error` global): a policy error
/// must not open the door, since a process controls much of what the policy reads (its name,
/// its argv) and could otherwise make `classify` fail on purpose to escape a limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnError {
    /// The connection's earlier decision; for a new connection, the decision another
    /// connection of the same process got; else `default`.
    #[default]
    Previous,
    /// The `default` class.
    Default,
    /// A declared class (e.g. a slow one, to fail closed).
    Class(Arc<str>),
}

/// Reads the `on_error` global: nil, `"previous"`, `"default"` or a declared class.
pub(crate) fn on_error_value(v: &Value, classes: &ClassSet) -> Result<OnError, String> {
    match v {
        Value::Nil => Ok(OnError::Previous),
        Value::String(s) => match &*s.to_string_lossy() {
            "previous" => Ok(OnError::Previous),
            "default" => Ok(OnError::Default),
            name => match classes.classes.get_key_value(name) {
                Some((k, _)) => Ok(OnError::Class(k.clone())),
                None => Err(format!(
                    "on_error = {name:?}: not \"previous\", \"default\" or a declared class \
                     (declared classes: {})",
                    classes.names()
                )),
            },
        },
        other => Err(format!(
            "on_error must be \"previous\", \"default\" or a class name; got {}",
            type_name(other)
        )),
    }
}

/// A class name returned by `classify`: a declared name, or nil for `default`.
pub(crate) fn class_value(v: &Value, classes: &ClassSet) -> Result<Arc<str>, String> {
    match v {
        Value::Nil => Ok(classes.default_name()),
        Value::String(s) => {
            let name = s
                .to_str()
                .map_err(|_| "class name is not valid UTF-8".to_string())?;
            match classes.classes.get_key_value(&*name) {
                Some((k, _)) => Ok(k.clone()),
                None => Err(format!(
                    "classify returned unknown class {:?}{}; declared classes: {}",
                    &*name,
                    did_you_mean(&name, classes),
                    classes.names()
                )),
            }
        }
        other => Err(format!(
            "classify must return a class name (a string) or nil; got {}",
            type_name(other)
        )),
    }
}

/// The declared class closest to `wanted`, if it is close enough to be a typo: at most two
/// edits (a swap of neighbours counting as one), and fewer than the name has letters.
pub fn closest_class<'a>(wanted: &str, classes: &'a ClassSet) -> Option<&'a str> {
    classes
        .classes
        .keys()
        .map(|name| (strsim::osa_distance(wanted, name), name.as_ref()))
        .filter(|&(d, _)| d <= 2 && d < wanted.chars().count())
        .min()
        .map(|(_, name)| name)
}

/// `" (did you mean `video`?)"` for a class name no declared class matches, or nothing.
pub fn did_you_mean(wanted: &str, classes: &ClassSet) -> String {
    closest_class(wanted, classes)
        .map(|name| format!(" (did you mean `{name}`?)"))
        .unwrap_or_default()
}

/// Where in the script text a class seems to be declared: the first line that assigns its name.
/// Lua does not record where a table field was written, so this is a search, good for messages.
/// An empty key is never found (it would match everywhere without advancing).
pub(crate) fn line_of_key(source: &str, key: &str) -> Option<usize> {
    if key.is_empty() {
        return None;
    }
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let assigns = |line: &str| {
        let mut from = 0;
        while let Some(at) = line[from..].find(key) {
            let start = from + at;
            let end = start + key.len();
            let before = line[..start].chars().next_back();
            let before_ok = before.is_none_or(|c| !ident(c)) || matches!(before, Some('"' | '\''));
            let after = line[end..]
                .trim_start_matches(['"', '\'', ']'])
                .trim_start();
            if before_ok
                && line[end..].chars().next().is_none_or(|c| !ident(c))
                && after.starts_with('=')
                && !after.starts_with("==")
            {
                return true;
            }
            from = end;
        }
        false
    };
    source.lines().position(assigns).map(|i| i + 1)
}

/// Validates a `classes` table. `at(name)` gives the `file:line` prefix for a class's errors,
/// `at("")` the one for errors about the table as a whole.
pub(crate) fn class_set(table: &Table, at: &dyn Fn(&str) -> String) -> Result<ClassSet, String> {
    let mut set = ClassSet::default();
    for entry in table.pairs::<Value, Value>() {
        let (key, def) = entry.map_err(|e| e.to_string())?;
        let Some(name) = as_text(&key) else {
            let found = match key {
                Value::Integer(i) => format!("an entry without a name (at position {i})"),
                ref other => format!("a key that is {}", type_name(other)),
            };
            return Err(format!(
                "{}: classes are keyed by name, as in `classes = {{ bulk = {{ prio = 7 }} }}`; \
                 found {found}",
                at(""),
            ));
        };
        if name.is_empty() {
            return Err(format!("{}: class name must not be empty", at("")));
        }
        if name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(format!(
                "{}: class name {name:?} must be 1-64 letters, digits, '_', '-' or '.'",
                at(&name)
            ));
        }
        let Value::Table(def) = def else {
            return Err(format!(
                "{}: class {name:?} must be a table such as {{ prio = 1, ceil = \"2mbit\" }}; got {}",
                at(&name),
                type_name(&def)
            ));
        };
        let class = class_def(&name, &def).map_err(|e| format!("{}: {e}", at(&name)))?;
        set.classes.insert(class.name.clone(), class);
        if set.classes.len() > MAX_CLASSES {
            return Err(format!(
                "{}: more than {MAX_CLASSES} classes; use `each = \"connection\"` or a returned \
                 limit instead of a class per connection",
                at("")
            ));
        }
    }
    Ok(set)
}

fn class_def(name: &str, def: &Table) -> Result<ClassDef, String> {
    let mut class = ClassDef {
        name: name.into(),
        ..ClassDef::default_class()
    };
    for entry in def.pairs::<Value, Value>() {
        let (k, v) = entry.map_err(|e| e.to_string())?;
        let what = |field: &str| format!("classes.{name}.{field}");
        match as_text(&k).as_deref() {
            Some("prio") => {
                class.prio = match v {
                    Value::Integer(p @ 0..=7) => p as u8,
                    Value::Number(p) if p.fract() == 0.0 && (0.0..=7.0).contains(&p) => p as u8,
                    other => {
                        return Err(format!(
                            "{} must be a whole number from 0 (served first) to 7; got {}",
                            what("prio"),
                            match other {
                                Value::Integer(i) => i.to_string(),
                                Value::Number(n) => n.to_string(),
                                ref v => type_name(v).to_string(),
                            }
                        ));
                    }
                }
            }
            Some("rate") => class.rate = limit_value(&v, &what("rate"))?,
            Some("ceil") => class.ceil = limit_value(&v, &what("ceil"))?,
            Some("each") => {
                class.each = match as_text(&v).as_deref() {
                    Some("class") => Each::Class,
                    Some("process") => Each::Process,
                    Some("connection") => Each::Connection,
                    _ => {
                        return Err(format!(
                            "{} must be \"class\", \"process\" or \"connection\"",
                            what("each")
                        ));
                    }
                }
            }
            Some("description") => {
                class.description = Some(
                    as_text(&v)
                        .ok_or_else(|| format!("{} must be a string", what("description")))?,
                )
            }
            Some("block") => {
                class.block = match v {
                    Value::Boolean(b) => b,
                    ref other => {
                        return Err(format!(
                            "{} must be true or false; got {}",
                            what("block"),
                            type_name(other)
                        ));
                    }
                }
            }
            _ => {
                return Err(format!(
                    "class {name:?} has an unknown key {}: use prio, rate, ceil, each, block or \
                     description",
                    describe_key(&k)
                ));
            }
        }
    }
    if class.block {
        if name == DEFAULT_CLASS {
            return Err(format!(
                "classes.{name}.block: the default class cannot be blocked (it carries every \
                 connection the policy does not classify); block a class of its own and return \
                 it from classify"
            ));
        }
        if class.rate != RatePair::default()
            || class.ceil != RatePair::default()
            || class.each != Each::Class
        {
            return Err(format!(
                "classes.{name}: a blocked class drops every packet, so rate, ceil and each mean \
                 nothing; remove them or `block`"
            ));
        }
    }
    for (dir, rate, ceil) in [
        ("up", class.rate.up, class.ceil.up),
        ("down", class.rate.down, class.ceil.down),
    ] {
        if let (Some(r), Some(c)) = (rate, ceil)
            && r > c
        {
            return Err(format!(
                "classes.{name}: rate.{dir} {r} is above ceil.{dir} {c}; the guaranteed rate cannot exceed the maximum"
            ));
        }
    }
    Ok(class)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::Lua;

    fn eval(lua: &Lua, code: &str) -> Value {
        lua.load(code).eval().unwrap()
    }

    #[test]
    fn limit_forms() {
        let lua = Lua::new();
        let l = |code: &str| limit_value(&eval(&lua, code), "limit");
        assert_eq!(l("2000000").unwrap().up.unwrap().bits_per_sec(), 2_000_000);
        assert_eq!(
            l("'2mbit'").unwrap().down.unwrap().bits_per_sec(),
            2_000_000
        );
        let p = l("{up = '1mbit', down = 8e6}").unwrap();
        assert_eq!(p.up.unwrap().bits_per_sec(), 1_000_000);
        assert_eq!(p.down.unwrap().bits_per_sec(), 8_000_000);
        assert_eq!(l("{down = '8mbit'}").unwrap().up, None);
        assert_eq!(l("nil").unwrap(), RatePair::default());
        assert!(l("-5").unwrap_err().contains("negative"));
        for zero in ["0", "'0mbit'", "0.0", "7999"] {
            let msg = l(zero).unwrap_err();
            assert!(
                msg.contains("smallest, 8kbit") && msg.contains("unlimited"),
                "{msg}"
            );
        }
        assert!(l("8000.5").unwrap_err().contains("not a whole number"));
        assert!(l("1e13").unwrap_err().contains("the largest is 1tbit"));
        assert_eq!(l("8e3").unwrap().up.unwrap().bits_per_sec(), 8000);
        assert!(l("0/0").unwrap_err().contains("NaN"));
        assert!(l("true").unwrap_err().contains("got a boolean"));
        assert!(l("'2mbps'").unwrap_err().contains("ambiguous"));
        assert!(
            l("{up = '1mbit', sideways = 2}")
                .unwrap_err()
                .contains("\"sideways\"")
        );
        assert!(l("{up = {}}").unwrap_err().contains("limit.up"));
    }

    #[test]
    fn classes_are_validated_with_names_and_keys() {
        let lua = Lua::new();
        let at = |n: &str| format!("policy.lua:{n}");
        let t = |code: &str| match eval(&lua, code) {
            Value::Table(t) => class_set(&t, &at),
            _ => unreachable!(),
        };
        let set = t("{ bulk = { prio = 7, ceil = { up = '1mbit' }, each = 'process' } }").unwrap();
        assert_eq!(set.names(), "bulk, default");
        let bulk = set.get("bulk").unwrap();
        assert_eq!((bulk.prio, bulk.each), (7, Each::Process));
        assert_eq!(bulk.ceil.up.unwrap().bits_per_sec(), 1_000_000);
        let e = t("{ bulk = { cel = '1mbit' } }").unwrap_err();
        assert!(
            e.starts_with("policy.lua:bulk") && e.contains("\"cel\""),
            "{e}"
        );
        assert!(
            t("{ bulk = { prio = 9 } }")
                .unwrap_err()
                .contains("0 (served first) to 7")
        );
        assert!(
            t("{ bulk = { each = 'user' } }")
                .unwrap_err()
                .contains("each")
        );
        assert!(t("{ bulk = 5 }").unwrap_err().contains("must be a table"));
        assert!(t("{ ['a b'] = {} }").unwrap_err().contains("\"a b\""));
        let e = t("{ default = { prio = 4 }, { prio = 1 } }").unwrap_err();
        assert!(
            e.starts_with("policy.lua:: classes are keyed by name") && e.contains("position 1"),
            "{e}"
        );
        let e = t("{ [''] = {} }").unwrap_err();
        assert_eq!(e, "policy.lua:: class name must not be empty");
        assert!(
            t("{ x = { rate = '2mbit', ceil = '1mbit' } }")
                .unwrap_err()
                .contains("above ceil")
        );
    }

    #[test]
    fn a_class_may_block_but_not_the_default_one() {
        let lua = Lua::new();
        let at = |n: &str| format!("policy.lua:{n}");
        let t = |code: &str| match eval(&lua, code) {
            Value::Table(t) => class_set(&t, &at),
            _ => unreachable!(),
        };
        let set = t("{ telemetry = { block = true, prio = 7 } }").unwrap();
        assert!(set.get("telemetry").unwrap().block);
        assert!(!set.get("default").unwrap().block);
        let e = t("{ default = { block = true } }").unwrap_err();
        assert!(e.contains("default class cannot be blocked"), "{e}");
        let e = t("{ x = { block = true, ceil = '1mbit' } }").unwrap_err();
        assert!(e.contains("rate, ceil and each mean nothing"), "{e}");
        let e = t("{ x = { block = 'yes' } }").unwrap_err();
        assert!(e.contains("classes.x.block must be true or false"), "{e}");
    }

    #[test]
    fn class_names_must_be_declared() {
        let lua = Lua::new();
        let set = ClassSet::default();
        assert_eq!(&*class_value(&Value::Nil, &set).unwrap(), "default");
        let e = class_value(&eval(&lua, "'bulkk'"), &set).unwrap_err();
        assert!(
            e.contains("\"bulkk\"") && e.contains("declared classes: default"),
            "{e}"
        );
        assert!(
            class_value(&eval(&lua, "42"), &set)
                .unwrap_err()
                .contains("a number")
        );
    }

    #[test]
    fn finds_the_line_declaring_a_key() {
        let src = "classes = {\n  interactive = { prio = 1 },\n  [\"bulk\"] = {},\n}\n\
                   if x then return { slow = { prio = 9 } } end\nif a.slow == 1 then end\n";
        assert_eq!(line_of_key(src, "interactive"), Some(2));
        assert_eq!(line_of_key(src, "bulk"), Some(3));
        assert_eq!(line_of_key(src, "slow"), Some(5));
        assert_eq!(line_of_key(src, "nope"), None);
        assert_eq!(line_of_key(src, ""), None, "an empty key ends the search");
    }
}
