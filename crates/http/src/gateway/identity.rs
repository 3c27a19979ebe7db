//! Who may share an answer: the credential's partition and the `X-Strata-*` scope headers, and
//! the document a request is keyed by.
//!
//! By default an answer is shared only by requests carrying the same credential. The
//! credential never enters a key in clear: it is hashed with a key of the gateway's own
//! (BLAKE3 in keyed mode), and the hash, the route and the wider scope headers go into the
//! keyed document under [`RESERVED`], so the cache's byte-for-byte check of the canonical
//! request covers them too (an MD5 collision across credentials is a miss, never an answer).
//! The narrowest scope header decides the entry's [`Scope`], which invalidation by user,
//! session or namespace selects on.

use axum::http::HeaderMap;
use serde_json::{Map, Value};
use strata_core::Scope;

use super::controls::{NAMESPACE, SESSION, USER, text};
use super::route::LlmRoute;

/// The member of a keyed document that carries the gateway's part of the key. A request that
/// already has a member of this name is not cached.
pub const RESERVED: &str = "strata_gateway";

/// The headers that carry a client's credential, in the order they are hashed.
const CREDENTIALS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// Headers that change what an upstream answers (API version, beta features, the account an
/// OpenAI key acts for): part of the key, in clear.
const SEMANTIC_HEADERS: [&str; 5] = [
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "openai-organization",
    "openai-project",
];

const MAX_SCOPE_ID: usize = 256;

/// Who sent a request, as far as sharing goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The entry's scope: the narrowest of session, user and namespace, or global.
    pub scope: Scope,
    /// The keyed hash of the credential (hex); `None` when answers are shared across
    /// credentials.
    pub partition: Option<String>,
    /// The namespace, when a narrower header decided the scope.
    pub namespace: Option<String>,
    /// The user, when a session decided the scope.
    pub user: Option<String>,
}

impl Identity {
    /// Reads a request's identity. `key` keys the credential's hash; with `share` set,
    /// credentials are not part of it.
    pub fn from_headers(headers: &HeaderMap, key: &[u8; 32], share: bool) -> Result<Self, String> {
        let namespace = scope_id(headers, NAMESPACE)?;
        let user = scope_id(headers, USER)?;
        let session = scope_id(headers, SESSION)?;
        let partition = (!share).then(|| partition(headers, key));
        let (scope, namespace, user) = match (session, user, namespace) {
            (Some(s), user, namespace) => (Scope::Session(s), namespace, user),
            (None, Some(u), namespace) => (Scope::User(u), namespace, None),
            (None, None, Some(n)) => (Scope::Namespace(n), None, None),
            (None, None, None) => (Scope::Global, None, None),
        };
        Ok(Identity {
            scope,
            partition,
            namespace,
            user,
        })
    }

    /// Makes a request body the document it is keyed by: the gateway's part (route, partition,
    /// wider scopes, what else reaches the upstream, and for routes whose shapes do not
    /// convert, whether it streams) added under [`RESERVED`]. A body that is not an object, or
    /// already has that member, is not keyed: `false`, and the body is left as it was.
    pub fn into_key_document(
        &self,
        route: LlmRoute,
        body: &mut Value,
        stream: bool,
        upstream: &Map<String, Value>,
    ) -> bool {
        let Some(object) = body.as_object_mut() else {
            return false;
        };
        if object.contains_key(RESERVED) {
            return false;
        }
        let mut part = upstream.clone();
        part.insert("route".into(), route.label().into());
        if let Some(partition) = &self.partition {
            part.insert("partition".into(), partition.as_str().into());
        }
        if let Some(namespace) = &self.namespace {
            part.insert("namespace".into(), namespace.as_str().into());
        }
        if let Some(user) = &self.user {
            part.insert("user".into(), user.as_str().into());
        }
        if !route.converts() {
            part.insert("stream".into(), stream.into());
        }
        object.insert(RESERVED.into(), Value::Object(part));
        true
    }

    /// [`Identity::into_key_document`] on a copy of `body`.
    pub fn key_document(
        &self,
        route: LlmRoute,
        body: &Value,
        stream: bool,
        upstream: &Map<String, Value>,
    ) -> Option<Value> {
        let mut document = body.clone();
        self.into_key_document(route, &mut document, stream, upstream)
            .then_some(document)
    }
}

/// What else of a request reaches the upstream and may change its answer: the query string
/// (`?beta=true`, `?api-version=…`; as a keyed hash, since some clients put a key in it) and
/// the [`SEMANTIC_HEADERS`], for [`Identity::key_document`].
pub fn upstream_context(
    query: Option<&str>,
    headers: &HeaderMap,
    key: &[u8; 32],
) -> Map<String, Value> {
    let mut context = Map::new();
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        let hash = blake3::keyed_hash(key, query.as_bytes());
        context.insert("query".into(), hash.to_hex()[..32].into());
    }
    let mut named = Map::new();
    for name in SEMANTIC_HEADERS {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        if !values.is_empty() {
            named.insert(name.into(), Value::Array(values));
        }
    }
    if !named.is_empty() {
        context.insert("headers".into(), Value::Object(named));
    }
    context
}

/// The keyed hash of a request's credentials, as 32 hex digits (`anonymous` hashes an empty
/// credential, so requests without one share among themselves only).
fn partition(headers: &HeaderMap, key: &[u8; 32]) -> String {
    let mut hasher = blake3::Hasher::new_keyed(key);
    for name in CREDENTIALS {
        for value in headers.get_all(name) {
            hasher.update(name.as_bytes());
            hasher.update(&(value.len() as u64).to_le_bytes());
            hasher.update(value.as_bytes());
        }
    }
    let hash = hasher.finalize();
    hash.to_hex()[..32].to_string()
}

fn scope_id(headers: &HeaderMap, name: &str) -> Result<Option<String>, String> {
    match text(headers, name)? {
        None | Some("") => Ok(None),
        Some(id) if id.len() > MAX_SCOPE_ID => {
            Err(format!("{name}: at most {MAX_SCOPE_ID} characters"))
        }
        Some(id) => Ok(Some(id.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: [u8; 32] = [7; 32];

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn credentials_partition_and_never_appear_in_clear() {
        let a = Identity::from_headers(&headers(&[("authorization", "Bearer sk-a")]), &KEY, false)
            .unwrap();
        let b = Identity::from_headers(&headers(&[("authorization", "Bearer sk-b")]), &KEY, false)
            .unwrap();
        assert_ne!(a.partition, b.partition);
        let body = json!({"model": "m", "messages": []});
        let doc = a
            .key_document(LlmRoute::ChatCompletions, &body, false, &Map::new())
            .unwrap();
        assert!(!doc.to_string().contains("sk-a"));
        let other_key = Identity::from_headers(
            &headers(&[("authorization", "Bearer sk-a")]),
            &[8; 32],
            false,
        )
        .unwrap();
        assert_ne!(a.partition, other_key.partition);
        let shared =
            Identity::from_headers(&headers(&[("authorization", "Bearer sk-a")]), &KEY, true)
                .unwrap();
        assert_eq!(shared.partition, None);
    }

    #[test]
    fn the_narrowest_header_is_the_scope_and_the_wider_ones_are_keyed() {
        let id = Identity::from_headers(
            &headers(&[
                ("x-strata-namespace", "team"),
                ("x-strata-user", "alice"),
                ("x-strata-session", "s1"),
            ]),
            &KEY,
            true,
        )
        .unwrap();
        assert_eq!(id.scope, Scope::Session("s1".into()));
        assert_eq!(id.namespace.as_deref(), Some("team"));
        assert_eq!(id.user.as_deref(), Some("alice"));
        let id =
            Identity::from_headers(&headers(&[("x-strata-user", "alice")]), &KEY, true).unwrap();
        assert_eq!(id.scope, Scope::User("alice".into()));
    }

    #[test]
    fn reserved_members_and_non_objects_are_not_keyed() {
        let id = Identity::from_headers(&HeaderMap::new(), &KEY, false).unwrap();
        assert!(
            id.key_document(
                LlmRoute::Messages,
                &json!({RESERVED: 1}),
                false,
                &Map::new()
            )
            .is_none()
        );
        assert!(
            id.key_document(LlmRoute::Messages, &json!([1]), false, &Map::new())
                .is_none()
        );
        let streamed = id
            .key_document(
                LlmRoute::Responses,
                &json!({"model": "m"}),
                true,
                &Map::new(),
            )
            .unwrap();
        let plain = id
            .key_document(
                LlmRoute::Responses,
                &json!({"model": "m"}),
                false,
                &Map::new(),
            )
            .unwrap();
        assert_ne!(streamed, plain, "responses key streams apart");
        let streamed = id
            .key_document(
                LlmRoute::ChatCompletions,
                &json!({"model": "m"}),
                true,
                &Map::new(),
            )
            .unwrap();
        let plain = id
            .key_document(
                LlmRoute::ChatCompletions,
                &json!({"model": "m"}),
                false,
                &Map::new(),
            )
            .unwrap();
        assert_eq!(streamed, plain, "chat converts: one entry for both");
    }

    #[test]
    fn the_query_and_api_version_headers_are_keyed_and_a_query_key_is_not_in_clear() {
        let id = Identity::from_headers(&HeaderMap::new(), &KEY, true).unwrap();
        let body = json!({"model": "m", "messages": []});
        let doc = |query: Option<&str>, headers: &HeaderMap| {
            let context = upstream_context(query, headers, &KEY);
            id.key_document(LlmRoute::Messages, &body, false, &context)
                .unwrap()
        };
        let none = HeaderMap::new();
        let plain = doc(None, &none);
        let beta = doc(Some("beta=true"), &none);
        assert_ne!(plain, beta);
        assert!(
            !doc(Some("key=sk-secret"), &none)
                .to_string()
                .contains("sk-secret")
        );
        let versioned = doc(None, &headers(&[("anthropic-beta", "tools-2024")]));
        assert_ne!(plain, versioned);
        assert_eq!(doc(None, &headers(&[("x-request-id", "1")])), plain);
    }
}
