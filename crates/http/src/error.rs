//! Errors of the HTTP side.

/// What can stop the gateway from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A bad `[server]` setting; the message names it.
    #[error("configuration: {0}")]
    Config(String),
    /// A listener could not be bound, or a file read.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A tier failed (opening, flushing at shutdown).
    #[error(transparent)]
    Tier(#[from] strata_tiers::TierError),
}
