//! Text that others choose (process names and cmdlines, user and unit names, class names and
//! event messages from a policy) made safe to show on a terminal or write to a log.
//!
//! A process can name itself anything: `prctl(PR_SET_NAME, "\x1b[31mx\n")` would recolour the
//! screen of whoever runs `shaper status`, split a table row to forge another, or split a log
//! line. Wherever such text is shown, it goes through [`escape`]; JSON output and the policy
//! keep the raw value.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as it is: C0 controls (tab and newline included: one
/// row or log line must stay one), DEL, C1 controls (some terminals take `\u{9b}` for ESC `[`),
/// and the bidirectional overrides and isolates, which reorder what follows them on the line.
fn must_escape(c: char) -> bool {
    matches!(c,
        '\0'..='\x1f' | '\x7f' | '\u{80}'..='\u{9f}'
        | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with each character of [`must_escape`] written as an escape: `\n`, `\r`, `\t`,
/// `\x1b` (other C0 controls and DEL likewise), `\u{9b}` (C1 and bidi controls). Everything else
/// is kept, so ordinary names read as they are; borrowed when nothing needs escaping.
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_but(text, false)
}

/// [`escape`] for a log line, where a tab is harmless (and Lua's `print` separates its values
/// with tabs): tabs are kept.
pub fn escape_line(text: &str) -> Cow<'_, str> {
    escape_but(text, true)
}

fn escape_but(text: &str, keep_tabs: bool) -> Cow<'_, str> {
    let escaped = |c: char| must_escape(c) && !(keep_tabs && c == '\t');
    if !text.chars().any(escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !escaped(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c <= '\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape("firefox"), "firefox");
        assert!(matches!(
            escape("Web Content"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(escape("\x1b[31mred\n"), "\\x1b[31mred\\n");
        assert_eq!(escape("a\rb\tc\0d\x7f"), "a\\rb\\tc\\x00d\\x7f");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape("abc\u{202e}gpj.exe"), "abc\\u{202e}gpj.exe");
        assert_eq!(escape("Straße 東京 ünïcödé"), "Straße 東京 ünïcödé");
        assert_eq!(super::escape_line("a\tb\nc"), "a\tb\\nc");
    }

    #[test]
    fn escaped_text_has_no_control_characters_left() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let escaped = escape(&all);
        assert!(!escaped.chars().any(super::must_escape), "{escaped}");
        assert!(!escaped.contains('\n'));
    }
}
