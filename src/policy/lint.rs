//! What `check` and `simulate` find in a policy by reading it, beyond what one run over sample
//! connections shows: class names `classify` returns as string literals that no declared class
//! matches (a typo on a branch no sample connection takes), and declared classes `classify`
//! never returns.
//!
//! The reading is lexical, inside `classify`'s own lines (Lua reports where the function
//! starts and ends): every `return "name"` (or `return 'name'`, `return ("name")`), whatever
//! follows it (`, "1mbit"`), unless the literal is only part of an expression (`"a" .. x`).
//! Names computed at run time are checked when they are returned; both kinds point at the line
//! of the `return`.

use std::collections::BTreeSet;

use super::Script;
use super::decide::{ClassSet, DEFAULT_CLASS, did_you_mean};
use crate::units::{Rate, RatePair};

/// A string literal `classify` returns as its class, and the line of that `return`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnedName {
    pub line: usize,
    pub name: String,
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Punct(char),
}

/// The tokens of `text` that matter here, with their lines (counting from `first_line`):
/// comments and long strings are skipped.
fn tokens(text: &str, first_line: usize) -> Vec<(usize, Token)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = first_line;
    let mut i = 0;
    // The end of a long bracket (`[[`, `[==[`) opening at `i`, if one does: its level.
    let long_open = |i: usize| -> Option<usize> {
        if chars.get(i) != Some(&'[') {
            return None;
        }
        let level = chars[i + 1..].iter().take_while(|c| **c == '=').count();
        (chars.get(i + 1 + level) == Some(&'[')).then_some(level)
    };
    let skip_long = |mut i: usize, level: usize, line: &mut usize| -> usize {
        let close: String = std::iter::once(']')
            .chain(std::iter::repeat_n('=', level))
            .chain(std::iter::once(']'))
            .collect();
        let close: Vec<char> = close.chars().collect();
        while i < chars.len() {
            if chars[i..].starts_with(&close) {
                return i + close.len();
            }
            if chars[i] == '\n' {
                *line += 1;
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            if let Some(level) = long_open(i + 2) {
                i = skip_long(i + 4 + level, level, &mut line);
            } else {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
        } else if let Some(level) = long_open(i) {
            out.push((line, Token::Punct('[')));
            i = skip_long(i + 2 + level, level, &mut line);
        } else if c == '"' || c == '\'' {
            let start = line;
            let mut text = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c && chars[i] != '\n' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    // Escapes make a computed-looking name: kept verbatim, rarely a class.
                    text.push(chars[i]);
                    i += 1;
                }
                text.push(chars[i]);
                i += 1;
            }
            i += 1;
            out.push((start, Token::Str(text)));
        } else if c.is_alphanumeric() || c == '_' {
            let mut word = String::new();
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                word.push(chars[i]);
                i += 1;
            }
            out.push((line, Token::Word(word)));
        } else {
            out.push((line, Token::Punct(c)));
            i += 1;
        }
    }
    out
}

/// The tokens of lines `span` (first and last, from 1) of `source`: `classify`'s own.
fn span_tokens(source: &str, span: (usize, usize)) -> Vec<(usize, Token)> {
    let (first, last) = span;
    let text: String = source
        .lines()
        .skip(first.saturating_sub(1))
        .take(last + 1 - first.max(1))
        .collect::<Vec<_>>()
        .join("\n");
    tokens(&text, first.max(1))
}

/// The string literals `classify` returns as its class, in lines `span` (first and last, from
/// 1) of `source`.
pub fn returned_names(source: &str, span: (usize, usize)) -> Vec<ReturnedName> {
    let tokens = span_tokens(source, span);
    let mut found = Vec::new();
    for (k, (line, token)) in tokens.iter().enumerate() {
        if *token != Token::Word("return".into()) {
            continue;
        }
        let mut at = k + 1;
        let parenthesised = matches!(tokens.get(at), Some((_, Token::Punct('('))));
        if parenthesised {
            at += 1;
        }
        let Some((_, Token::Str(name))) = tokens.get(at) else {
            continue;
        };
        // A whole value: followed by `,` (a limit), `)` closing the parenthesis, or the end of
        // the statement; not `..`, `:`, `[`, comparison or arithmetic.
        let ends = |t: Option<&(usize, Token)>| match t {
            None => true,
            Some((_, Token::Word(w))) => w != "and" && w != "or",
            Some((_, Token::Punct(c))) => matches!(c, ',' | ';'),
            Some((_, Token::Str(_))) => false,
        };
        let whole = if parenthesised {
            matches!(tokens.get(at + 1), Some((_, Token::Punct(')')))) && ends(tokens.get(at + 2))
        } else {
            ends(tokens.get(at + 1))
        };
        if whole && !name.contains('\\') {
            found.push(ReturnedName {
                line: *line,
                name: name.clone(),
            });
        }
    }
    found
}

/// The per-connection limits `classify` returns as literals (lines `span` of `source`): the
/// second value of a `return "class", "2mbit"` or `return "class", { up = "1mbit", down =
/// "4mbit" }`. The BPF classifier holds a new process's first connections at the least of them
/// before any connection has been given one (see [`crate::shape::Desired::hold`]); limits
/// computed at run time are learnt when returned.
pub fn returned_limits(source: &str, span: (usize, usize)) -> Vec<RatePair> {
    let tokens = span_tokens(source, span);
    let at = |i: usize| tokens.get(i).map(|(_, t)| t);
    let mut found = Vec::new();
    for k in 0..tokens.len() {
        if at(k) != Some(&Token::Word("return".into()))
            || !matches!(at(k + 1), Some(Token::Str(_)))
            || at(k + 2) != Some(&Token::Punct(','))
        {
            continue;
        }
        match at(k + 3) {
            Some(Token::Str(limit)) => found.extend(limit.parse::<RatePair>().ok()),
            Some(Token::Punct('{')) => {
                let mut pair = RatePair::default();
                let mut i = k + 4;
                while let (Some(Token::Word(side)), Some(Token::Punct('=')), Some(Token::Str(v))) =
                    (at(i), at(i + 1), at(i + 2))
                {
                    let Ok(rate) = v.parse::<Rate>() else {
                        break;
                    };
                    match side.as_str() {
                        "up" => pair.up = Some(rate),
                        "down" => pair.down = Some(rate),
                        _ => break,
                    }
                    i += 3;
                    if at(i) == Some(&Token::Punct(',')) {
                        i += 1;
                    }
                }
                if at(i) == Some(&Token::Punct('}')) && pair != RatePair::default() {
                    found.push(pair);
                }
            }
            _ => {}
        }
    }
    found
}

/// One finding about a class name: the name, and the message that says it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub class: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What [`class_names`] found.
#[derive(Debug, Default, PartialEq)]
pub struct ClassNames {
    /// Each literal no declared class matches (`file:line: …`, with "did you mean").
    pub unknown: Vec<Finding>,
    /// Each declared class `classify` never returns.
    pub never_returned: Vec<Finding>,
}

impl ClassNames {
    pub fn is_empty(&self) -> bool {
        self.unknown.is_empty() && self.never_returned.is_empty()
    }
}

/// Checks the class names in `script`'s `classify` (lines `span`) against the declared
/// `classes`; `returned` are the classes connections went to in the runs that were made (the
/// sample connections), which count as returned too.
pub fn class_names(
    script: &Script,
    span: Option<(usize, usize)>,
    classes: &ClassSet,
    returned: &BTreeSet<&str>,
) -> ClassNames {
    let name = script.path.display();
    let literals = span.map_or_else(Vec::new, |span| returned_names(&script.source, span));
    let unknown = literals
        .iter()
        .filter(|r| classes.get(&r.name).is_none())
        .map(|r| Finding {
            class: r.name.clone(),
            message: format!(
                "{name}:{}: classify returns \"{}\", which no declared class matches{}; \
                 declared classes: {}",
                r.line,
                r.name,
                did_you_mean(&r.name, classes),
                classes.names()
            ),
        })
        .collect();
    let never_returned = classes
        .classes
        .keys()
        .filter(|class| &***class != DEFAULT_CLASS)
        .filter(|class| {
            !returned.contains(&***class) && !literals.iter().any(|r| r.name == ***class)
        })
        .map(|class| Finding {
            class: class.to_string(),
            message: format!(
                "{name}: class \"{class}\" is declared but classify never returns it (no \
                 `return \"{class}\"` in classify, and no sample connection went to it)"
            ),
        })
        .collect();
    ClassNames {
        unknown,
        never_returned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(source: &str) -> Vec<(usize, String)> {
        let last = source.lines().count();
        returned_names(source, (1, last))
            .into_iter()
            .map(|r| (r.line, r.name))
            .collect()
    }

    #[test]
    fn literals_returned_whole_are_found_with_their_line() {
        let found = names(
            "function classify(conn, ctx)\n\
             \x20 if conn.process.name == \"mpv\" then return \"vidoe\" end -- return \"x\"\n\
             \x20 if a then return 'bulk', \"1mbit\" elseif b then return (\"calls\") end\n\
             \x20 --[[ return \"commented\" ]]\n\
             \x20 local s = [[ return \"in a long string\" ]]\n\
             \x20 if c then return \"a\" .. x end\n\
             \x20 if d then return (\"rep\"):rep(2) end\n\
             \x20 if e then return \"esc\\\"aped\" end\n\
             \x20 return nil\n\
             end",
        );
        assert_eq!(
            found,
            [
                (2, "vidoe".to_string()),
                (3, "bulk".to_string()),
                (3, "calls".to_string())
            ]
        );
    }

    #[test]
    fn literal_limits_are_read_from_classify_returns() {
        let source = r#"function classify(conn)
  if conn.remote_port == 1 then return "bulk", "2mbit" end
  if conn.remote_port == 2 then return "bulk", { up = "1mbit", down = "8mbit" } end
  if conn.remote_port == 3 then return "bulk", "512kbit:unlimited" end
  if conn.remote_port == 4 then return "bulk", limit_for(conn) end
  if conn.remote_port == 5 then return "bulk", { up = computed } end
  -- return "bulk", "1kbit"
  return "default"
end"#;
        let limits = returned_limits(source, (1, 9));
        let rate = |t: &str| Some(t.parse::<Rate>().unwrap());
        assert_eq!(
            limits,
            vec![
                RatePair {
                    up: rate("2mbit"),
                    down: rate("2mbit")
                },
                RatePair {
                    up: rate("1mbit"),
                    down: rate("8mbit")
                },
                RatePair {
                    up: rate("512kbit"),
                    down: None
                },
            ]
        );
    }
}
