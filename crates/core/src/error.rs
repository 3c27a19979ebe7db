//! Errors about a request that cannot be keyed.

/// Why a request could not be normalized into a cache key.
///
/// A caller that gets this error should still run its LLM call: the cache treats such a request as
/// an uncacheable miss.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request is not a JSON object.
    #[error("request must be a JSON object, found {found}")]
    NotAnObject {
        /// The JSON type that was found instead.
        found: &'static str,
    },
    /// A required field is absent.
    #[error("request has no `{field}` field")]
    MissingField {
        /// The missing field.
        field: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("request field `{field}` must be {expected}")]
    WrongType {
        /// Path of the field, such as `messages[2].role`.
        field: String,
        /// The expected JSON type.
        expected: &'static str,
    },
    /// The request text is not valid JSON.
    #[error("request is not valid JSON: {0}")]
    Json(String),
    /// The request nests arrays and objects more deeply than [`crate::normalize::MAX_DEPTH`].
    #[error("request nests more than {limit} levels deep")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
}
