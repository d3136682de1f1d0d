//! shaper's integration tests, built as one binary (see ripgrep's `tests/tests.rs`): one place for
//! shared support code and one process in which rate-measuring tests can be serialised.

#[path = "../support/mod.rs"]
mod support;

mod attribution;
mod block;
mod bpf;
mod cli;
mod control;
mod daemon;
mod evasion;
mod examples;
mod fastpath;
mod metrics;
mod names;
mod netns_kit;
mod notify;
mod pidns;
mod policy;
mod probe;
mod scan;
mod shape;
mod startup;
mod status;
mod top;
mod trust;
