//! Logging setup: tracing to journald when running as a systemd service, to stderr otherwise.
//!
//! The filter comes from, in order of precedence: `-v`/`-q` on the command line, the `SHAPER_LOG`
//! environment variable (env-filter syntax, e.g. `shaper::scan=debug,info`), the config file's
//! `log_level`, and finally `info`.
//!
//! On stderr each line starts with the local time and its UTC offset (`2026-11-23T19:20:05.123+01:00`),
//! except under systemd (`JOURNAL_STREAM` set), whose journal stamps every line itself. Colours
//! are used only when stderr is a terminal and `NO_COLOR` is unset or empty (no-color.org), so a
//! log file or `journalctl` never holds escape sequences.
//!
//! On stderr every field, the message included, is escaped ([`crate::text::escape`]): a log line
//! names processes, users, classes and policy events, and a control character in one must
//! neither reach the terminal nor split the line (forging another).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The local time with its UTC offset, to the millisecond.
struct LocalTime;

impl FormatTime for LocalTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        w.write_str(&timestamp(&jiff::Zoned::now()))
    }
}

/// How a log line's time is written: `2026-11-23T19:20:05.123+01:00`.
pub fn timestamp(now: &jiff::Zoned) -> String {
    now.strftime("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string()
}

/// Whether to colour the log: only on a terminal, and not when `NO_COLOR` is set to anything
/// but the empty string.
pub fn use_color(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Fields written as the default formatter does (`message`, then `name=value`), each escaped
/// (tabs kept).
pub fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        let text = crate::text::escape_line(&text);
        if field.name() == "message" {
            write!(w, "{text}")
        } else {
            write!(w, "{}={text}", field.name())
        }
    })
    .delimited(" ")
}

/// The environment variable holding an env-filter directive.
pub const LOG_ENV: &str = "SHAPER_LOG";

/// The filter directive for a verbosity (`-v` count minus `-q` count) relative to `info`, or `None`
/// when no flag was given.
pub fn verbosity_directive(verbose: u8, quiet: u8) -> Option<&'static str> {
    match i16::from(verbose) - i16::from(quiet) {
        0 if verbose == 0 => None,
        i16::MIN..=-2 => Some("error"),
        -1 => Some("warn"),
        0 => Some("info"),
        1 => Some("debug"),
        _ => Some("trace"),
    }
}

/// Installs the global subscriber. `config_level` is the config file's `log_level` when the
/// command reads the config. Calling it twice is harmless (the second call changes nothing).
pub fn init(verbose: u8, quiet: u8, config_level: Option<&str>) {
    let directive = verbosity_directive(verbose, quiet)
        .map(str::to_string)
        .or_else(|| std::env::var(LOG_ENV).ok().filter(|v| !v.trim().is_empty()))
        .or_else(|| config_level.map(str::to_string))
        .unwrap_or_else(|| "info".to_string());
    let filter = EnvFilter::builder().parse(&directive).unwrap_or_else(|e| {
        eprintln!("shaper: ignoring log filter {directive:?} ({e}); logging at info");
        EnvFilter::new("info")
    });
    let registry = tracing_subscriber::registry().with(filter);
    // systemd sets JOURNAL_STREAM for services whose stderr goes to the journal; only then is
    // journald the right place. An interactive `shaper check` on a systemd host still prints to
    // the terminal.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    if journal && let Ok(journald) = tracing_journald::layer() {
        // Fields go to the journal under their own names, so an event's `message_id` is the
        // journal's MESSAGE_ID (see `daemon::events`).
        let journald = journald.with_field_prefix(None);
        let _ = registry.with(journald).try_init();
        return;
    }
    // A cycle's stages are debug spans: at debug, each one's time is printed when it closes.
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_target(false)
        .fmt_fields(escaped_fields())
        .with_ansi(use_color(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .compact();
    // Under systemd the journal stamps each line already.
    let stderr = if journal {
        stderr.without_time().boxed()
    } else {
        stderr.with_timer(LocalTime).boxed()
    };
    let _ = registry.with(stderr).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_color(true, None));
        assert!(!use_color(false, None), "a file or a pipe");
        assert!(!use_color(true, Some(OsStr::new("1"))));
        assert!(
            use_color(true, Some(OsStr::new(""))),
            "empty NO_COLOR means unset"
        );
    }

    #[test]
    fn a_log_line_stays_one_line_whatever_its_fields_hold() {
        use std::sync::{Arc, Mutex};
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(escaped_fields())
            .with_ansi(false)
            .without_time()
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let name = "\x1b[31mevil\nWARN forged line";
            tracing::warn!(shaper_event = %name, "event {name}: {}", "a\rb");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text}");
        assert!(
            text.contains("event \\x1b[31mevil\\nWARN forged line: a\\rb")
                && text.contains("shaper_event=\\x1b[31mevil\\nWARN"),
            "{text}"
        );
    }

    /// A writer into a shared buffer.
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn timestamps_are_local_with_their_offset() {
        let at: jiff::Zoned = "2026-11-23T19:20:05.123456[Europe/Berlin]".parse().unwrap();
        assert_eq!(timestamp(&at), "2026-11-23T19:20:05.123+01:00");
        let utc: jiff::Zoned = "2026-07-01T08:00:00[UTC]".parse().unwrap();
        assert_eq!(timestamp(&utc), "2026-07-01T08:00:00.000+00:00");
    }

    #[test]
    fn verbosity_moves_from_info() {
        assert_eq!(verbosity_directive(0, 0), None);
        assert_eq!(verbosity_directive(1, 0), Some("debug"));
        assert_eq!(verbosity_directive(2, 0), Some("trace"));
        assert_eq!(verbosity_directive(0, 1), Some("warn"));
        assert_eq!(verbosity_directive(0, 3), Some("error"));
        assert_eq!(verbosity_directive(1, 1), Some("info"));
    }
}
