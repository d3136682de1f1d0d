//! What a script sees: `conn` and `conn.process` as userdata whose fields are computed only when
//! read, and the Rust primitives behind `ctx`, `require` and the sandbox guards.
//!
//! A connection is passed as a small userdata holding its index into the cycle's input, which the
//! VM keeps as app data; reading `conn.remote_port` looks the value up there. Building a table per
//! connection, or going through serde, costs several times more for the fields a policy never
//! reads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use mlua::{Lua, UserData, UserDataFields, UserDataMethods, Value};

use super::CycleInput;
use crate::account::{Period, UsageKey};
use crate::config::RateFile;
use crate::process::Pid;

/// The cycle being evaluated, as VM app data.
pub(crate) struct Current(pub Arc<CycleInput>);

/// nbdkit-style rate files read by `ctx.rate_file`, kept across cycles; `strict` as
/// [`super::EngineOptions::strict_permissions`].
pub(crate) struct RateFiles {
    pub files: HashMap<PathBuf, RateFile>,
    pub strict: bool,
}

fn with_input<R>(lua: &Lua, f: impl FnOnce(&CycleInput) -> R) -> mlua::Result<R> {
    let current = lua
        .app_data_ref::<Current>()
        .ok_or_else(|| mlua::Error::runtime("conn and ctx are only valid during a cycle"))?;
    Ok(f(&current.0))
}

/// `conn`: one connection of the cycle.
pub(crate) struct ConnRef(pub usize);

fn conn_field<R>(
    lua: &Lua,
    this: &ConnRef,
    f: impl FnOnce(&CycleInput, &crate::process::Connection) -> R,
) -> mlua::Result<R> {
    with_input(lua, |input| f(input, &input.snapshot.connections[this.0]))
}

fn stats_of(input: &CycleInput, i: usize) -> super::ConnStats {
    input.stats.get(i).copied().unwrap_or_default()
}

impl UserData for ConnRef {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("proto", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.proto.as_str())
        });
        fields.add_field_method_get("family", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.family())
        });
        fields.add_field_method_get("local_addr", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.local.ip().to_string())
        });
        fields.add_field_method_get("local_port", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.local.port())
        });
        fields.add_field_method_get("remote_addr", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.remote.ip().to_string())
        });
        fields.add_field_method_get("remote_port", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.remote.port())
        });
        fields.add_field_method_get("remote_host", |lua, this| {
            conn_field(lua, this, |_, c| c.remote_host.clone())
        });
        fields.add_field_method_get("state", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.state.as_str())
        });
        fields.add_field_method_get("uid", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.uid)
        });
        fields.add_field_method_get("bytes_up", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.bytes_up)
        });
        fields.add_field_method_get("bytes_down", |lua, this| {
            conn_field(lua, this, |_, c| c.socket.bytes_down)
        });
        fields.add_field_method_get("rate_up", |lua, this| {
            with_input(lua, |input| stats_of(input, this.0).rate_up)
        });
        fields.add_field_method_get("rate_down", |lua, this| {
            with_input(lua, |input| stats_of(input, this.0).rate_down)
        });
        fields.add_field_method_get("age", |lua, this| {
            with_input(lua, |input| stats_of(input, this.0).age)
        });
        fields.add_field_method_get("tokens_up", |lua, this| {
            with_input(lua, |input| stats_of(input, this.0).tokens_up)
        });
        fields.add_field_method_get("tokens_down", |lua, this| {
            with_input(lua, |input| stats_of(input, this.0).tokens_down)
        });
        fields.add_field_method_get("process", |lua, this| {
            match conn_field(lua, this, |_, c| c.owner.as_ref().map(|o| o.pid))? {
                Some(pid) => process_value(lua, pid),
                None => Ok(Value::Nil),
            }
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |lua, this, ()| {
            conn_field(lua, this, |_, c| c.socket.to_string())
        });
    }
}

/// The cycle's process tables, built on first use: `conn.process` is a plain table shared by
/// every connection of that process, so reading `p.name` ten times costs ten table lookups, not
/// ten calls into Rust. `meta` (from the prelude) gives them `descends_from` and `__tostring`.
pub(crate) struct ProcessCache {
    pub tables: mlua::Table,
    pub meta: mlua::Table,
}

/// The table for `pid`, from the cycle's cache or built now (with its ancestors).
pub(crate) fn process_value(lua: &Lua, pid: Pid) -> mlua::Result<Value> {
    let (tables, meta) = {
        let cache = lua
            .app_data_ref::<ProcessCache>()
            .ok_or_else(|| mlua::Error::runtime("conn.process is only valid during a cycle"))?;
        (cache.tables.clone(), cache.meta.clone())
    };
    if let Value::Table(t) = tables.raw_get::<Value>(pid)? {
        return Ok(Value::Table(t));
    }
    let Some(p) = with_input(lua, |input| input.snapshot.processes.get(&pid).cloned())? else {
        return Ok(Value::Nil);
    };
    let t = lua.create_table_with_capacity(0, 14)?;
    t.raw_set("pid", p.pid)?;
    t.raw_set("ppid", p.ppid)?;
    // Lua strings are byte strings: the policy sees the exact bytes, UTF-8 or not.
    t.raw_set("name", lua.create_string(p.name.as_bytes())?)?;
    if let Some(exe) = &p.exe {
        t.raw_set("exe", lua.create_string(exe.as_bytes())?)?;
    }
    let cmdline = lua.create_table_with_capacity(p.cmdline.len(), 0)?;
    for arg in &p.cmdline {
        cmdline.raw_push(lua.create_string(arg.as_bytes())?)?;
    }
    t.raw_set("cmdline", cmdline)?;
    t.raw_set("uid", p.uid)?;
    t.raw_set("user", p.user.as_deref())?;
    t.raw_set("gid", p.gid)?;
    t.raw_set("cgroup", p.cgroup.as_deref())?;
    t.raw_set("unit", p.unit.as_deref())?;
    t.raw_set("start_time", p.start_time)?;
    t.set_metatable(Some(meta))?;
    // Cached before the ancestors are built, so a (malformed) cycle in the chain terminates.
    tables.raw_set(pid, &t)?;
    let ancestors = lua.create_table_with_capacity(p.ancestors.len(), 0)?;
    for a in &p.ancestors {
        match process_value(lua, *a)? {
            Value::Table(at) => ancestors.raw_push(at)?,
            _ => break, // not in this cycle's snapshot: the chain ends here
        }
    }
    if p.ancestors.first() == Some(&p.ppid) {
        t.raw_set("parent", ancestors.raw_get::<Value>(1)?)?;
    }
    t.raw_set("ancestors", ancestors)?;
    Ok(Value::Table(t))
}

/// `raw.usage(period, key, ago)` → up, down (bytes): the current period, or the one `ago`
/// periods before it (1 = yesterday for `"day"`).
pub(crate) fn usage(
    lua: &Lua,
    (period, key, ago): (String, String, Option<u32>),
) -> mlua::Result<(u64, u64)> {
    let period: Period = period.parse().map_err(mlua::Error::runtime)?;
    let key: UsageKey = key.parse().map_err(mlua::Error::runtime)?;
    with_input(lua, |input| {
        let u = match ago.unwrap_or(0) {
            0 => input.usage.usage(period, &key),
            ago => input.usage.usage_ago(period, &key, ago, &input.now),
        };
        (u.up.bytes(), u.down.bytes())
    })
}

/// What `raw.class` returns: connections, rate_up, rate_down, tokens_up, tokens_down.
type ClassFigures = (u64, f64, f64, Option<f64>, Option<f64>);

/// `raw.class(name)` → [`ClassFigures`].
pub(crate) fn class(lua: &Lua, name: String) -> mlua::Result<ClassFigures> {
    with_input(lua, |input| {
        let c = input.usage.class(&name).unwrap_or_default();
        (
            c.connections,
            c.rate_up,
            c.rate_down,
            c.tokens_up,
            c.tokens_down,
        )
    })
}

/// `raw.rate_file(path, default)` → up, down (bit/s or nil), with nbdkit's semantics: a file
/// absent from the start gives `default`; a file that disappears keeps its last value; a file
/// that cannot be parsed keeps the last value and logs a warning ([`RateFile`]).
pub(crate) fn rate_file(
    lua: &Lua,
    (path, default): (String, Value),
) -> mlua::Result<(Option<u64>, Option<u64>)> {
    let default =
        super::decide::limit_value(&default, "rate_file default").map_err(mlua::Error::runtime)?;
    let path = PathBuf::from(path);
    let mut files = lua
        .app_data_mut::<RateFiles>()
        .ok_or_else(|| mlua::Error::runtime("rate files unavailable"))?;
    let strict = files.strict;
    let value = files
        .files
        .entry(path.clone())
        .or_insert_with(|| RateFile::new(path, strict))
        .current(Some(default))
        .unwrap_or_default();
    Ok((
        value.up.map(|r| r.bits_per_sec()),
        value.down.map(|r| r.bits_per_sec()),
    ))
}

/// Largest subject a pattern may be matched against. Lua's matcher backtracks: with `q`
/// repeating items (`*`, `+`, `-`, and `%b` and back-references, which scan the subject) its cost
/// grows as `len^q` per start position, and there are `len` start positions unless it is
/// anchored; each optional item (`?`) doubles it; each step compares one of the pattern's items.
/// A subject is refused when that exceeds about 10^8 steps, which Lua's matcher runs in about a
/// second.
pub(crate) fn pattern_limit(pattern: &[u8]) -> u64 {
    const STEPS: f64 = 1e8;
    let (mut repeating, mut optional, mut items) = (0i32, 0i32, 0u32);
    let anchored = pattern.first() == Some(&b'^');
    let mut i = usize::from(anchored);
    while i < pattern.len() {
        // The end of a single-character class (which a quantifier may follow), or `None` for
        // items that take none.
        let class_end = match (pattern[i], pattern.get(i + 1)) {
            (b'(' | b')', _) => {
                i += 1;
                continue;
            }
            (b'%', Some(b'b')) => {
                repeating += 1;
                i += 4;
                None
            }
            (b'%', Some(b'f')) => {
                i = set_end(pattern, i + 2);
                None
            }
            (b'%', Some(b'1'..=b'9')) => {
                repeating += 1;
                i += 2;
                None
            }
            (b'%', _) => Some(i + 2),
            (b'[', _) => Some(set_end(pattern, i)),
            _ => Some(i + 1),
        };
        items += 1;
        if let Some(end) = class_end {
            i = end;
            match pattern.get(i) {
                Some(b'*' | b'+' | b'-') => {
                    repeating += 1;
                    i += 1;
                }
                Some(b'?') => {
                    optional += 1;
                    i += 1;
                }
                _ => {}
            }
        }
    }
    let per_length = STEPS / (f64::from(items.max(1)) * 2f64.powi(optional));
    let exponent = repeating + i32::from(!anchored);
    if exponent == 0 {
        // The cost does not grow with the subject: all or nothing.
        return if per_length >= 1.0 { u64::MAX >> 1 } else { 0 };
    }
    per_length.max(0.0).powf(1.0 / f64::from(exponent)).floor() as u64
}

/// The index just past a `[set]` starting at `start` (Lua's rules: a `]` first in the set, or
/// after `^`, is literal; `%` escapes the next byte).
fn set_end(pattern: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    if pattern.get(i) == Some(&b'^') {
        i += 1;
    }
    i += 1;
    while i < pattern.len() && pattern[i] != b']' {
        i += if pattern[i] == b'%' { 2 } else { 1 };
    }
    i + 1
}

/// `shaper.cidr(...)`: a set of networks with `:contains(addr)`.
pub(crate) struct CidrSet(Vec<ipnet::IpNet>);

impl UserData for CidrSet {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("contains", |_, this, addr: Option<String>| {
            let Some(ip) = addr.and_then(|a| a.parse::<std::net::IpAddr>().ok()) else {
                return Ok(false);
            };
            let ip = match ip {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, Into::into),
                v4 => v4,
            };
            Ok(this.0.iter().any(|net| net.contains(&ip)))
        });
    }
}

/// The native half of the `shaper` library, passed to it when it is required.
/// What `shaper.notify` raised in the running cycle, as VM app data.
#[derive(Default)]
pub(crate) struct Notices(pub Vec<super::Notice>);

/// Most distinct notices one cycle may raise; more are an error (a message built from a
/// connection's fields would otherwise raise one per connection).
const MAX_NOTICES: usize = 16;

/// Longest message `shaper.notify` keeps, in bytes; longer ones are cut at a character boundary
/// and end in `…`.
pub const MAX_MESSAGE: usize = 1024;

fn truncate_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// `shaper.notify(name, message [, period])`: records the notice for the daemon.
fn notify(
    lua: &Lua,
    (name, message, period): (String, mlua::LuaString, Option<String>),
) -> mlua::Result<()> {
    // Lossy: a process name that is not UTF-8 in the message must not fail the call.
    let message = message.to_string_lossy();
    let valid_name = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !valid_name {
        return Err(mlua::Error::runtime(format!(
            "shaper.notify: name {name:?} must be 1 to 64 letters, digits, '_', '-' or '.' \
             (it names the event in metrics and hooks)"
        )));
    }
    // Cut, not refused: a message often carries what a process chose (its name, argv), and an
    // error here would fail `classify` for that process's connection.
    let message = truncate_message(message);
    let period: Period = period
        .as_deref()
        .unwrap_or("day")
        .parse()
        .map_err(|e| mlua::Error::runtime(format!("shaper.notify: {e}")))?;
    let mut notices = lua.app_data_mut::<Notices>().ok_or_else(|| {
        mlua::Error::runtime("shaper.notify is only valid during a cycle (in classify or classes)")
    })?;
    let notice = super::Notice {
        name,
        message,
        period,
    };
    if notices.0.contains(&notice) {
        return Ok(());
    }
    if notices.0.len() >= MAX_NOTICES {
        return Err(mlua::Error::runtime(format!(
            "shaper.notify: more than {MAX_NOTICES} different notices in one cycle; keep \
             messages free of per-connection details"
        )));
    }
    notices.0.push(notice);
    Ok(())
}

pub(crate) fn natives(lua: &Lua) -> mlua::Result<mlua::Table> {
    let t = lua.create_table()?;
    t.set("notify", lua.create_function(notify)?)?;
    t.set(
        "match_domain",
        lua.create_function(|_, (host, patterns): (Option<String>, mlua::Value)| {
            let Some(host) = host else {
                return Ok(false);
            };
            let matches = |p: &str| crate::names::match_domain(&host, p);
            match patterns {
                mlua::Value::String(p) => Ok(matches(&p.to_str()?)),
                mlua::Value::Table(list) => {
                    for p in list.sequence_values::<String>() {
                        if matches(&p?) {
                            return Ok(true);
                        }
                    }
                    Ok(false)
                }
                other => Err(mlua::Error::runtime(format!(
                    "shaper.match_domain: the pattern is a {}, not a string such as \
                     \"*.example.com\" or a list of them",
                    other.type_name()
                ))),
            }
        })?,
    )?;
    t.set(
        "rate",
        lua.create_function(|_, text: String| {
            text.parse::<crate::units::Rate>()
                .map(|r| r.bits_per_sec())
                .map_err(mlua::Error::runtime)
        })?,
    )?;
    t.set(
        "size",
        lua.create_function(|_, text: String| {
            text.parse::<crate::units::Size>()
                .map(|s| s.bytes())
                .map_err(mlua::Error::runtime)
        })?,
    )?;
    t.set(
        "cidr",
        lua.create_function(|lua, specs: mlua::Variadic<String>| {
            let nets = specs
                .iter()
                .map(|s| {
                    s.parse::<ipnet::IpNet>()
                        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| {
                            mlua::Error::runtime(format!(
                                "shaper.cidr: {s:?} is not an address or network such as \"10.0.0.0/8\" or \"fd00::/8\""
                            ))
                        })
                })
                .collect::<mlua::Result<Vec<_>>>()?;
            lua.create_userdata(CidrSet(nets))
        })?,
    )?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::pattern_limit;

    #[test]
    fn pattern_limits_grow_with_quantifiers() {
        assert!(
            pattern_limit(b"^firefox") > 1 << 40,
            "anchored, no repetition"
        );
        assert_eq!(
            pattern_limit(b"firefox"),
            14_285_714,
            "one start position per byte: linear, times the pattern's 7 items"
        );
        assert_eq!(pattern_limit(b"%d+%.%d+"), 321); // 2 repeating + unanchored, 3 items
        assert_eq!(pattern_limit(b".-.-.-b"), 70);
        assert_eq!(pattern_limit(b"^.-.-.-b"), 292);
        assert!(
            pattern_limit(b"%-%-type=(%w+)") > 1000,
            "escaped '-' is no quantifier"
        );
        assert!(
            pattern_limit(b"[a-z]") > 1 << 20,
            "'-' in a set is no quantifier"
        );
    }

    #[test]
    fn optional_items_balanced_and_backreferences_count() {
        let many_optional = format!("^{}{}", "a?".repeat(30), "a".repeat(30));
        assert_eq!(pattern_limit(many_optional.as_bytes()), 0, "2^30 paths");
        assert!(
            pattern_limit(b"^a?b?c") > 1 << 40,
            "a few options are cheap"
        );
        assert_eq!(pattern_limit(b"%b()"), 10_000, "unanchored %b: len^2");
        assert_eq!(pattern_limit(b"^(a*)%1"), 7_071);
        assert!(
            pattern_limit(b"%f[%w]%w") > 1 << 20,
            "a frontier scans nothing"
        );
    }
}
