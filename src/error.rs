//! The library's error type: one variant per stage that can fail, each carrying a message that
//! names the thing at fault and how to fix it. Callers that branch match on the variant; the binary
//! adds context with `anyhow` and prints the chain.

pub use crate::config::ConfigError;
pub use crate::scan::ScanError;
pub use crate::units::UnitError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Unit(#[from] UnitError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Scan(#[from] ScanError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
