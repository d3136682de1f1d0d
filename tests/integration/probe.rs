//! Entry point of the probe child process (see `tests/support/probe.rs`).

#[test]
#[ignore = "the child process the scan tests start; does nothing when run directly"]
fn probe_main() {
    crate::support::probe::probe_body();
}
