//! Logging setup: tracing to journald when running as a systemd service, to stderr otherwise.
//!
//! The filter comes from, in order of precedence: `-v`/`-q` on the command line, the `SHAPER_LOG`
//! environment variable (env-filter syntax, e.g. `shaper::scan=debug,info`), the config file's
//! `log_level`, and finally `info`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
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
        .compact();
    let _ = registry.with(stderr).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

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
