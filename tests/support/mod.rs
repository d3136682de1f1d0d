//! Support code shared by the integration tests.

#![allow(dead_code)]

pub mod cgroup;
pub mod crowd;
pub mod daemon;
pub mod kernel;
pub mod latency;
pub mod netns;
pub mod probe;
pub mod shaping;
pub mod traffic;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `shaper` binary cargo built for this test run.
pub fn shaper() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shaper"))
}

/// Runs a command, returning its output; panics if it could not be started.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// A file in a fresh temporary directory, with `text` in it. The directory lives as long as the
/// returned guard.
pub fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write temporary file");
    (dir, path)
}
