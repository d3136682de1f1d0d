//! shaper: per-connection bandwidth shaping for Linux, driven by a Lua policy.
//!
//! Every cycle runs one pipeline, and the modules follow it:
//!
//! ```text
//! scan ──► process ──► policy ──► account ──► shape (reconcile + apply)
//! sockets   owners      Lua        usage       HTB + u32 + IFB over netlink
//! ```
//!
//! [`daemon`] runs the cycle; [`cli`] is the command line; [`config`] and [`units`] are shared by
//! every stage. See `docs/design.md` for the cycle, the kernel layout and the policy contract.

pub mod account;
pub mod classify;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod names;
pub mod policy;
pub mod process;
pub mod scan;
pub mod shape;
pub mod text;
pub mod trust;
pub mod units;
