//! Tier errors.

use strata_core::CodecError;

/// What a tier operation can fail with. [`crate::TieredCache`] never passes these to a caller's
/// lookup: it logs them, counts them and treats the lookup as a miss.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The stored bytes are corrupt; the tier has already removed them.
    #[error("corrupt entry: {0}")]
    Corrupt(#[from] CodecError),
    /// The storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// An I/O error outside the store (creating or moving directories).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The caller asked for something that cannot be done as asked (a bad selector or pattern).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The tier cannot be used now: it failed to open or is misconfigured, a fault was
    /// injected, or S3 did not take the outbox.
    #[error("tier unavailable: {0}")]
    Unavailable(String),
    /// The call was not made: S3's circuit breaker is open, or half-open with its one probe
    /// call already out.
    #[error("tier unavailable: S3 circuit breaker is open")]
    CircuitOpen,
    /// The store refused this one request for good (an object too large for it, a path too
    /// long): trying again cannot succeed.
    #[error("refused: {0}")]
    Refused(String),
    /// The store rejected this request (a 4xx other than 408 and 429): trying it again as it
    /// is may not help; the outbox parks an upload rejected again and again.
    #[error("rejected: {0}")]
    Rejected(String),
}

impl From<strata_analytics::AnalyticsError> for TierError {
    fn from(e: strata_analytics::AnalyticsError) -> Self {
        TierError::Storage(e.to_string())
    }
}

impl From<sled::Error> for TierError {
    fn from(e: sled::Error) -> Self {
        TierError::Storage(e.to_string())
    }
}
