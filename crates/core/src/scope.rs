//! Who may see an entry.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The visibility of a cache entry. The scope is part of the key, so an entry written in one scope
/// is never found from another: a user-scoped answer is never served to a different user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Scope {
    /// Shared by every caller.
    #[default]
    Global,
    /// Shared inside a namespace (a team, a pipeline, a tenant).
    Namespace(String),
    /// Private to one user.
    User(String),
    /// Private to one session.
    Session(String),
}

impl Scope {
    /// The kind of scope as a short lowercase word (`global`, `namespace`, `user`, `session`).
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Namespace(_) => "namespace",
            Scope::User(_) => "user",
            Scope::Session(_) => "session",
        }
    }

    /// The identifier inside the scope kind; empty for [`Scope::Global`].
    pub fn id(&self) -> &str {
        match self {
            Scope::Global => "",
            Scope::Namespace(s) | Scope::User(s) | Scope::Session(s) => s,
        }
    }

    /// Feeds an unambiguous, length-prefixed encoding of the scope to `sink`.
    pub(crate) fn feed(&self, mut sink: impl FnMut(&[u8])) {
        sink(self.kind().as_bytes());
        sink(&(self.id().len() as u64).to_le_bytes());
        sink(self.id().as_bytes());
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            other => write!(f, "{}:{}", other.kind(), other.id()),
        }
    }
}
