//! The route policy: which requests are cached, for how long, for whom, under which tags, and
//! which requests invalidate what. Read from `[[http.routes]]` and `[[http.invalidate]]`, or
//! built in Rust with [`Policy::builder`]. The tower layer and the reverse proxy both take a
//! [`Policy`]; neither has rules of its own.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, Method};
use serde::{Deserialize, Serialize};

use crate::error::HttpError;

/// Who may share a route's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteScope {
    /// Shared by every client without credentials; a request with `Authorization` passes
    /// through uncached (RFC 9111 §3.5). The default.
    #[default]
    Anonymous,
    /// Shared by every client, `Authorization` or not: the route says its answers are public.
    Public,
    /// Private to one user: the value of `user_header` (or of `Authorization` when it is not
    /// set), hashed with a key. A request without it passes through uncached.
    User,
    /// Private to one session: the `session_header` value, or the `session_cookie` cookie.
    Session,
}

impl RouteScope {
    /// Whether entries are shared between clients (a shared cache's rules apply).
    pub fn shared(self) -> bool {
        matches!(self, RouteScope::Anonymous | RouteScope::Public)
    }
}

/// One cached route, as configured (`[[http.routes]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name in metrics and reports (default: its path pattern).
    #[serde(default)]
    pub name: String,
    /// The path pattern: literal segments, `{name}` for one segment, `{*name}` for the rest.
    pub path: String,
    /// The methods cached: `GET` and `HEAD` by default. `POST` only when listed; its key then
    /// covers the body.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// How long an answer is fresh.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// The `Cache-Control` sent to clients (default: from the scope and the TTL).
    #[serde(default)]
    pub cache_control: Option<String>,
    /// Who shares the route's entries.
    #[serde(default)]
    pub scope: RouteScope,
    /// The header that names the user, for `scope = "user"` (default: `Authorization`).
    #[serde(default)]
    pub user_header: Option<String>,
    /// The header that names the session, for `scope = "session"` (default:
    /// `X-Strata-Session`).
    #[serde(default)]
    pub session_header: Option<String>,
    /// A cookie that names the session, for `scope = "session"` (read when the header is absent).
    #[serde(default)]
    pub session_cookie: Option<String>,
    /// Request headers whose values select a variant (`Accept`, `Accept-Language`, …).
    /// `Accept-Encoding` needs no listing: strata compresses each answer itself.
    #[serde(default)]
    pub vary: Vec<String>,
    /// Tags of the route's entries, with parameters: `jobs:{job_id}`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// How long past its TTL a stale answer is served while one background call refreshes it.
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Option<Duration>,
    /// How long past its TTL a stale answer is served when the service fails (5xx, unreachable).
    #[serde(default, with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    /// Statuses stored besides RFC 9111's heuristically cacheable 200, 203, 204, 301, 404, 410
    /// (when set, exactly these).
    #[serde(default)]
    pub statuses: Option<Vec<u16>>,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}

/// One mutation rule, as configured (`[[http.invalidate]]`): after a 2xx answer to one of
/// `methods` on `path`, `tags` are invalidated on every node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidateConfig {
    /// The path pattern, as a route's.
    pub path: String,
    /// The methods that mutate (default: `POST`, `PUT`, `PATCH`, `DELETE`).
    #[serde(default = "mutating_methods")]
    pub methods: Vec<String>,
    /// The tags to invalidate, with the pattern's parameters.
    pub tags: Vec<String>,
}

fn mutating_methods() -> Vec<String> {
    ["POST", "PUT", "PATCH", "DELETE"]
        .into_iter()
        .map(String::from)
        .collect()
}

/// A path pattern: `/jobs/{job_id}`, `/files/{*path}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
    Rest(String),
}

/// The parameters a path matched, in pattern order.
pub type Params = Vec<(String, String)>;

impl Pattern {
    /// Parses a pattern; it must start with `/`, and a `{*rest}` may only end it.
    pub fn parse(text: &str) -> Result<Pattern, HttpError> {
        let bad = |why: &str| HttpError::Config(format!("path pattern `{text}`: {why}"));
        let Some(rest) = text.strip_prefix('/') else {
            return Err(bad("must start with `/`"));
        };
        let mut segments = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        for (i, part) in parts.iter().enumerate() {
            let segment = match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(name) => match name.strip_prefix('*') {
                    Some(name) if i + 1 == parts.len() => Segment::Rest(name.to_string()),
                    Some(_) => return Err(bad("`{*name}` must be the last segment")),
                    None => Segment::Param(name.to_string()),
                },
                None if part.contains(['{', '}']) => {
                    return Err(bad("a parameter is a whole segment"));
                }
                None => Segment::Literal(part.to_string()),
            };
            if let Segment::Param(name) | Segment::Rest(name) = &segment
                && (name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_'))
            {
                return Err(bad("parameter names are letters, digits and `_`"));
            }
            segments.push(segment);
        }
        Ok(Pattern {
            text: text.to_string(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parameters of `path` if it matches.
    pub fn matches(&self, path: &str) -> Option<Params> {
        let rest = path.strip_prefix('/')?;
        let mut parts = if rest.is_empty() {
            None
        } else {
            Some(rest.split('/'))
        };
        let mut params = Vec::new();
        let mut consumed = 0usize;
        for segment in &self.segments {
            match segment {
                Segment::Rest(name) => {
                    let tail = path.get(1 + consumed..).unwrap_or("");
                    params.push((name.clone(), tail.to_string()));
                    return Some(params);
                }
                Segment::Literal(text) => {
                    let part = parts.as_mut()?.next()?;
                    if part != text {
                        return None;
                    }
                    consumed += part.len() + 1;
                }
                Segment::Param(name) => {
                    let part = parts.as_mut()?.next()?;
                    if part.is_empty() {
                        return None;
                    }
                    params.push((name.clone(), part.to_string()));
                    consumed += part.len() + 1;
                }
            }
        }
        match parts.as_mut().and_then(Iterator::next) {
            Some(_) => None,
            None => Some(params),
        }
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) | Segment::Rest(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }
}

/// A tag with parameters: `jobs:{job_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTemplate(String);

impl TagTemplate {
    fn new(text: &str, pattern: &Pattern) -> Result<TagTemplate, HttpError> {
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| HttpError::Config(format!("tag `{text}`: an unclosed `{{`")))?;
            let name = &rest[open + 1..open + close];
            if !pattern.names().any(|n| n == name) {
                return Err(HttpError::Config(format!(
                    "tag `{text}`: `{{{name}}}` is not a parameter of `{}`",
                    pattern.as_str()
                )));
            }
            rest = &rest[open + close + 1..];
        }
        if text.is_empty() || text.len() > 128 || text.chars().any(char::is_control) {
            return Err(HttpError::Config(format!(
                "tag `{text}`: 1 to 128 printable characters"
            )));
        }
        Ok(TagTemplate(text.to_string()))
    }

    /// The tag for a request's parameters. A value's `:` (the tags' level separator) is
    /// written `%3A`, so a path cannot name a tag above its own.
    pub fn expand(&self, params: &Params) -> String {
        let mut out = self.0.clone();
        for (name, value) in params {
            let placeholder = format!("{{{name}}}");
            if out.contains(&placeholder) {
                out = out.replace(&placeholder, &value.replace(':', "%3A"));
            }
        }
        out
    }
}

/// A cached route, compiled.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its name in metrics and reports.
    pub name: String,
    /// Its path pattern.
    pub pattern: Pattern,
    /// The methods cached (`HEAD` is answered from `GET`'s entries).
    pub methods: Vec<Method>,
    /// How long an answer is fresh.
    pub ttl: Duration,
    /// The `Cache-Control` sent to clients.
    pub cache_control: String,
    /// Who shares the entries.
    pub scope: RouteScope,
    /// The header naming the user (`scope = "user"`).
    pub user_header: HeaderName,
    /// The header naming the session (`scope = "session"`).
    pub session_header: HeaderName,
    /// The cookie naming the session (`scope = "session"`).
    pub session_cookie: Option<String>,
    /// Request headers in the key, lowercase, sorted.
    pub vary: Vec<HeaderName>,
    /// Tags of the entries.
    pub tags: Vec<TagTemplate>,
    /// Served stale while refreshing, this long past the TTL.
    pub stale_while_revalidate: Duration,
    /// Served stale on failure, this long past the TTL.
    pub stale_if_error: Duration,
    /// Statuses stored.
    pub statuses: Vec<u16>,
    /// The slug of entry keys.
    pub(crate) slug: strata_core::ModelSlug,
    /// What the route did since start.
    pub counters: std::sync::Arc<super::RouteCounters>,
}

/// RFC 9111 §4.2.2: statuses cacheable by default (those of them a service answers to a read).
pub const DEFAULT_STATUSES: [u16; 6] = [200, 203, 204, 301, 404, 410];

impl Route {
    /// Compiles a configured route.
    pub fn new(config: &RouteConfig) -> Result<Route, HttpError> {
        let pattern = Pattern::parse(&config.path)?;
        let methods = methods(&config.methods, &config.path)?;
        if let Some(m) = methods
            .iter()
            .find(|m| !matches!(**m, Method::GET | Method::HEAD | Method::POST))
        {
            return Err(HttpError::Config(format!(
                "route `{}`: {m} answers are not cached (GET, HEAD and POST are)",
                config.path
            )));
        }
        if config.ttl.is_zero() {
            return Err(HttpError::Config(format!(
                "route `{}`: a TTL of zero caches nothing",
                config.path
            )));
        }
        let header =
            |name: &Option<String>, default: &'static str| -> Result<HeaderName, HttpError> {
                match name {
                    Some(n) => HeaderName::try_from(n.as_str())
                        .map_err(|_| HttpError::Config(format!("`{n}` is not a header name"))),
                    None => Ok(HeaderName::from_static(default)),
                }
            };
        let mut vary = Vec::new();
        for name in &config.vary {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|_| HttpError::Config(format!("vary: `{name}` is not a header name")))?;
            if name != axum::http::header::ACCEPT_ENCODING && !vary.contains(&name) {
                vary.push(name);
            }
        }
        vary.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let tags = config
            .tags
            .iter()
            .map(|t| TagTemplate::new(t, &pattern))
            .collect::<Result<Vec<_>, _>>()?;
        let ttl_secs = config.ttl.as_secs();
        let cache_control = match &config.cache_control {
            Some(cc) => cc.clone(),
            None if config.scope.shared() => format!("public, max-age={ttl_secs}"),
            None => format!("private, max-age={ttl_secs}"),
        };
        if axum::http::HeaderValue::try_from(cache_control.as_str()).is_err() {
            return Err(HttpError::Config(format!(
                "route `{}`: cache_control `{cache_control}` is not a header value",
                config.path
            )));
        }
        Ok(Route {
            name: if config.name.is_empty() {
                config.path.clone()
            } else {
                config.name.clone()
            },
            pattern,
            methods,
            ttl: config.ttl,
            cache_control,
            scope: config.scope,
            user_header: header(&config.user_header, "authorization")?,
            session_header: header(&config.session_header, "x-strata-session")?,
            session_cookie: config.session_cookie.clone(),
            vary,
            tags,
            stale_while_revalidate: config.stale_while_revalidate.unwrap_or_default(),
            stale_if_error: config.stale_if_error.unwrap_or_default(),
            statuses: config
                .statuses
                .clone()
                .unwrap_or_else(|| DEFAULT_STATUSES.to_vec()),
            slug: strata_core::ModelSlug::new(if config.name.is_empty() {
                &config.path
            } else {
                &config.name
            }),
            counters: Default::default(),
        })
    }

    /// How long an entry is kept: fresh, then stale for as long as either stale rule serves it.
    pub fn keep_for(&self) -> Duration {
        self.ttl + self.stale_while_revalidate.max(self.stale_if_error)
    }
}

fn methods(names: &[String], path: &str) -> Result<Vec<Method>, HttpError> {
    names
        .iter()
        .map(|m| {
            Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                .map_err(|_| HttpError::Config(format!("`{path}`: `{m}` is not a method")))
        })
        .collect()
}

/// A mutation rule, compiled.
#[derive(Debug, Clone)]
pub struct Mutation {
    /// Its path pattern.
    pub pattern: Pattern,
    /// The methods that mutate.
    pub methods: Vec<Method>,
    /// The tags invalidated after a 2xx answer.
    pub tags: Vec<TagTemplate>,
}

impl Mutation {
    /// Compiles a configured rule.
    pub fn new(config: &InvalidateConfig) -> Result<Mutation, HttpError> {
        let pattern = Pattern::parse(&config.path)?;
        let tags = config
            .tags
            .iter()
            .map(|t| TagTemplate::new(t, &pattern))
            .collect::<Result<Vec<_>, _>>()?;
        if tags.is_empty() {
            return Err(HttpError::Config(format!(
                "invalidate `{}`: no tags",
                config.path
            )));
        }
        Ok(Mutation {
            methods: methods(&config.methods, &config.path)?,
            pattern,
            tags,
        })
    }
}

/// What a request is to the policy.
#[derive(Debug)]
pub enum Matched<'a> {
    /// A read the route caches.
    Cached(&'a Arc<Route>, Params),
    /// A mutation: these tags are invalidated after a 2xx answer.
    Mutation(Vec<String>),
    /// Neither: passed through untouched.
    Pass,
}

/// The compiled policy. Routes are tried in order; the first whose pattern and method match
/// caches the request.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    routes: Vec<Arc<Route>>,
    mutations: Vec<Mutation>,
}

impl Policy {
    /// A policy from configured routes and rules.
    pub fn new(
        routes: &[RouteConfig],
        invalidate: &[InvalidateConfig],
    ) -> Result<Policy, HttpError> {
        let routes = routes
            .iter()
            .map(|r| Route::new(r).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let mut names = std::collections::HashSet::new();
        if let Some(r) = routes.iter().find(|r| !names.insert(r.name.as_str())) {
            return Err(HttpError::Config(format!(
                "two routes are named `{}`",
                r.name
            )));
        }
        Ok(Policy {
            routes,
            mutations: invalidate
                .iter()
                .map(Mutation::new)
                .collect::<Result<_, _>>()?,
        })
    }

    /// A builder, for policies written in Rust.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// What `method path` is to the policy.
    pub fn classify(&self, method: &Method, path: &str) -> Matched<'_> {
        for route in &self.routes {
            if route.methods.contains(method)
                && let Some(params) = route.pattern.matches(path)
            {
                return Matched::Cached(route, params);
            }
        }
        let mut tags = Vec::new();
        for rule in &self.mutations {
            if rule.methods.contains(method)
                && let Some(params) = rule.pattern.matches(path)
            {
                tags.extend(rule.tags.iter().map(|t| t.expand(&params)));
            }
        }
        if tags.is_empty() {
            Matched::Pass
        } else {
            tags.dedup();
            Matched::Mutation(tags)
        }
    }
}

/// Builds a [`Policy`] in Rust.
///
/// ```
/// use std::time::Duration;
/// use strata_http::api::{Policy, RouteScope};
/// let policy = Policy::builder()
///     .route("/health", Duration::from_secs(30), |r| r.scope(RouteScope::Public))
///     .route("/jobs/{job_id}", Duration::from_secs(60), |r| {
///         r.scope(RouteScope::User).user_header("x-user").tag("jobs:{job_id}")
///     })
///     .invalidate(&["PUT", "PATCH", "DELETE"], "/jobs/{job_id}", &["jobs:list", "jobs:{job_id}"])
///     .build()
///     .unwrap();
/// assert_eq!(policy.routes().len(), 2);
/// ```
#[derive(Debug, Default)]
pub struct PolicyBuilder {
    routes: Vec<RouteConfig>,
    invalidate: Vec<InvalidateConfig>,
}

/// One route being built; see [`PolicyBuilder::route`].
#[derive(Debug)]
pub struct RouteBuilder(RouteConfig);

impl RouteBuilder {
    /// Names the route in metrics and reports.
    pub fn name(mut self, name: &str) -> Self {
        self.0.name = name.into();
        self
    }
    /// Sets the methods cached.
    pub fn methods(mut self, methods: &[&str]) -> Self {
        self.0.methods = methods.iter().map(|m| m.to_string()).collect();
        self
    }
    /// Sets who shares the entries.
    pub fn scope(mut self, scope: RouteScope) -> Self {
        self.0.scope = scope;
        self
    }
    /// Sets the header naming the user.
    pub fn user_header(mut self, name: &str) -> Self {
        self.0.user_header = Some(name.into());
        self
    }
    /// Sets the cookie naming the session.
    pub fn session_cookie(mut self, name: &str) -> Self {
        self.0.session_cookie = Some(name.into());
        self
    }
    /// Sets the `Cache-Control` sent to clients.
    pub fn cache_control(mut self, value: &str) -> Self {
        self.0.cache_control = Some(value.into());
        self
    }
    /// Adds a request header to the key.
    pub fn vary(mut self, name: &str) -> Self {
        self.0.vary.push(name.into());
        self
    }
    /// Adds a tag (with parameters).
    pub fn tag(mut self, tag: &str) -> Self {
        self.0.tags.push(tag.into());
        self
    }
    /// Serves stale while refreshing, this long past the TTL.
    pub fn stale_while_revalidate(mut self, d: Duration) -> Self {
        self.0.stale_while_revalidate = Some(d);
        self
    }
    /// Serves stale when the service fails, this long past the TTL.
    pub fn stale_if_error(mut self, d: Duration) -> Self {
        self.0.stale_if_error = Some(d);
        self
    }
    /// Sets the statuses stored.
    pub fn statuses(mut self, statuses: &[u16]) -> Self {
        self.0.statuses = Some(statuses.to_vec());
        self
    }
}

impl PolicyBuilder {
    /// Adds a route with its TTL; `f` sets the rest.
    pub fn route(
        mut self,
        path: &str,
        ttl: Duration,
        f: impl FnOnce(RouteBuilder) -> RouteBuilder,
    ) -> Self {
        let config = RouteConfig {
            name: String::new(),
            path: path.into(),
            methods: default_methods(),
            ttl,
            cache_control: None,
            scope: RouteScope::default(),
            user_header: None,
            session_header: None,
            session_cookie: None,
            vary: Vec::new(),
            tags: Vec::new(),
            stale_while_revalidate: None,
            stale_if_error: None,
            statuses: None,
        };
        self.routes.push(f(RouteBuilder(config)).0);
        self
    }

    /// Adds a mutation rule.
    pub fn invalidate(mut self, methods: &[&str], path: &str, tags: &[&str]) -> Self {
        self.invalidate.push(InvalidateConfig {
            path: path.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        });
        self
    }

    /// Compiles the policy; an error says which route or rule is wrong.
    pub fn build(self) -> Result<Policy, HttpError> {
        Policy::new(&self.routes, &self.invalidate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_segments_and_rests() {
        let p = Pattern::parse("/jobs/{job_id}").unwrap();
        assert_eq!(
            p.matches("/jobs/42"),
            Some(vec![("job_id".into(), "42".into())])
        );
        assert_eq!(p.matches("/jobs"), None);
        assert_eq!(p.matches("/jobs/"), None);
        assert_eq!(p.matches("/jobs/42/download"), None);
        let rest = Pattern::parse("/files/{*path}").unwrap();
        assert_eq!(
            rest.matches("/files/a/b.txt"),
            Some(vec![("path".into(), "a/b.txt".into())])
        );
        let root = Pattern::parse("/").unwrap();
        assert!(root.matches("/").is_some() && root.matches("/x").is_none());
        assert!(Pattern::parse("jobs").is_err());
        assert!(Pattern::parse("/{*a}/b").is_err());
        assert!(Pattern::parse("/a{b}").is_err());
    }

    #[test]
    fn tags_expand_parameters_and_cannot_climb() {
        let p = Pattern::parse("/jobs/{job_id}").unwrap();
        let t = TagTemplate::new("jobs:{job_id}", &p).unwrap();
        assert_eq!(t.expand(&vec![("job_id".into(), "42".into())]), "jobs:42");
        assert_eq!(
            t.expand(&vec![("job_id".into(), "a:b".into())]),
            "jobs:a%3Ab"
        );
        assert!(TagTemplate::new("jobs:{nope}", &p).is_err());
    }

    #[test]
    fn first_matching_route_wins_and_mutations_collect_tags() {
        let policy = Policy::builder()
            .route("/jobs", Duration::from_secs(120), |r| r.tag("jobs:list"))
            .route("/jobs/{job_id}", Duration::from_secs(60), |r| {
                r.tag("jobs:{job_id}")
            })
            .invalidate(&["POST"], "/jobs", &["jobs:list"])
            .invalidate(&["PUT"], "/jobs/{job_id}", &["jobs:list", "jobs:{job_id}"])
            .build()
            .unwrap();
        match policy.classify(&Method::GET, "/jobs/7") {
            Matched::Cached(route, params) => {
                assert_eq!(route.name, "/jobs/{job_id}");
                assert_eq!(route.tags[0].expand(&params), "jobs:7");
            }
            other => panic!("{other:?}"),
        }
        match policy.classify(&Method::PUT, "/jobs/42") {
            Matched::Mutation(tags) => assert_eq!(tags, ["jobs:list", "jobs:42"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            policy.classify(&Method::DELETE, "/jobs/42"),
            Matched::Pass
        ));
        assert!(matches!(
            policy.classify(&Method::POST, "/jobs/42"),
            Matched::Pass
        ));
    }

    #[test]
    fn bad_routes_are_refused_with_a_reason() {
        let zero = Policy::builder()
            .route("/x", Duration::ZERO, |r| r)
            .build()
            .unwrap_err();
        assert!(zero.to_string().contains("zero"), "{zero}");
        let put = Policy::builder()
            .route("/x", Duration::from_secs(1), |r| r.methods(&["PUT"]))
            .build()
            .unwrap_err();
        assert!(put.to_string().contains("PUT"), "{put}");
        let twice = Policy::builder()
            .route("/x", Duration::from_secs(1), |r| r)
            .route("/x", Duration::from_secs(1), |r| r)
            .build()
            .unwrap_err();
        assert!(twice.to_string().contains("two routes"), "{twice}");
    }

    #[test]
    fn default_cache_control_follows_the_scope() {
        let policy = Policy::builder()
            .route("/health", Duration::from_secs(30), |r| {
                r.scope(RouteScope::Public)
            })
            .route("/me", Duration::from_secs(60), |r| {
                r.scope(RouteScope::User)
            })
            .build()
            .unwrap();
        assert_eq!(policy.routes()[0].cache_control, "public, max-age=30");
        assert_eq!(policy.routes()[1].cache_control, "private, max-age=60");
    }
}
