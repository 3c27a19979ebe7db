//! Invalidation epochs: O(1) bulk invalidation by model, user, session, namespace, tag, key and
//! age.
//!
//! Every selector has an epoch, a number that only grows (0 until first bumped). An entry records
//! the epochs that applied to it when it was written ([`Epochs::stamp`], kept in
//! [`Entry::epochs`]); it is served only while none of them has moved past what it recorded
//! ([`Epochs::admits`]). Bumping an epoch therefore invalidates every entry under it at once,
//! on every tier, without touching a single entry.
//!
//! A bump sets the epoch to `max(now in ms, current + 1)`: values stay monotonic and roughly
//! say when the invalidation happened. Two sets of epochs merge by taking the maximum of each
//! ([`Epochs::merge`]), so nodes can exchange them in any order, any number of times, and no
//! bump is ever lost.
//!
//! Age works differently: `not_before` (ms since the epoch) invalidates every entry created
//! before it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::entry::Entry;
use crate::scope::Scope;

/// How far ahead of this node's clock another node's may be. An entry written, or an epoch
/// bumped, later than now plus this is refused as forged (or from a clock gone wrong).
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The latest time, in ms since the Unix epoch, that a stored date or epoch may say:
/// `now` plus [`CLOCK_SKEW`].
pub fn latest_plausible_ms(now: DateTime<Utc>) -> u64 {
    u64::try_from(now.timestamp_millis())
        .unwrap_or(0)
        .saturating_add(CLOCK_SKEW.as_millis() as u64)
}

/// The separator of hierarchical tags: invalidating `jobs` also covers `jobs:42`.
pub const TAG_SEPARATOR: char = ':';

/// What an invalidation applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "by", content = "value", rename_all = "snake_case")]
pub enum Selector {
    /// Every entry.
    All,
    /// Every entry of a model (the normalized model name, as entries record it).
    Model(String),
    /// Every entry in a user's scope.
    User(String),
    /// Every entry in a session's scope.
    Session(String),
    /// Every entry in a namespace's scope.
    Namespace(String),
    /// Every entry carrying the tag, or a tag below it (`jobs` covers `jobs:42`).
    Tag(String),
    /// The entry with this cache id (32 hex digits), on every node.
    Key(String),
    /// Every entry created more than this long ago.
    OlderThan(Duration),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("all entries"),
            Selector::Model(m) => write!(f, "model {m}"),
            Selector::User(u) => write!(f, "user {u}"),
            Selector::Session(s) => write!(f, "session {s}"),
            Selector::Namespace(n) => write!(f, "namespace {n}"),
            Selector::Tag(t) => write!(f, "tag {t}"),
            Selector::Key(k) => write!(f, "key {k}"),
            Selector::OlderThan(d) => write!(f, "entries older than {}s", d.as_secs()),
        }
    }
}

/// The kinds of named epochs (every selector but [`Selector::All`] and
/// [`Selector::OlderThan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Model,
    User,
    Session,
    Namespace,
    Tag,
    Key,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::User => "user",
            Kind::Session => "session",
            Kind::Namespace => "namespace",
            Kind::Tag => "tag",
            Kind::Key => "key",
        }
    }
}

/// The name an entry records an epoch under: `all`, `model:gpt-4o`, `tag:jobs`, …
fn recorded_name(kind: Kind, id: &str) -> String {
    let prefix = kind.prefix();
    let mut name = String::with_capacity(prefix.len() + 1 + id.len());
    name.push_str(prefix);
    name.push(':');
    name.push_str(id);
    name
}

const ALL: &str = "all";

/// The epochs in force: what [`control/epochs.json`](crate) holds and every node keeps.
///
/// Fields it does not know (from a newer release) are ignored, not an error: an older node still
/// applies every bump it understands from that document, and the newer node's own copy keeps
/// what it alone knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epochs {
    /// The epoch of [`Selector::All`].
    #[serde(default)]
    pub all: u64,
    /// Entries created before this time (ms since the Unix epoch) are invalid.
    #[serde(default)]
    pub not_before_ms: i64,
    /// Epochs per model.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model: BTreeMap<String, u64>,
    /// Epochs per user scope.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user: BTreeMap<String, u64>,
    /// Epochs per session scope.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub session: BTreeMap<String, u64>,
    /// Epochs per namespace scope.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace: BTreeMap<String, u64>,
    /// Epochs per tag (each level of a hierarchical tag is its own name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tag: BTreeMap<String, u64>,
    /// Epochs per cache id: tombstones of entries invalidated one by one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub key: BTreeMap<String, u64>,
    /// Key tombstones set before this (ms since the Unix epoch) were pruned: every entry they
    /// could hide has outlived the longest TTL. A merge drops tombstones older than the larger
    /// watermark, so no node brings back what another pruned.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keys_pruned_before_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Epochs {
    /// Whether nothing was ever invalidated (the fast path of every lookup).
    pub fn is_empty(&self) -> bool {
        self.all == 0
            && self.not_before_ms == 0
            && self.model.is_empty()
            && self.user.is_empty()
            && self.session.is_empty()
            && self.namespace.is_empty()
            && self.tag.is_empty()
            && self.key.is_empty()
    }

    fn map(&self, kind: Kind) -> &BTreeMap<String, u64> {
        match kind {
            Kind::Model => &self.model,
            Kind::User => &self.user,
            Kind::Session => &self.session,
            Kind::Namespace => &self.namespace,
            Kind::Tag => &self.tag,
            Kind::Key => &self.key,
        }
    }

    fn map_mut(&mut self, kind: Kind) -> &mut BTreeMap<String, u64> {
        match kind {
            Kind::Model => &mut self.model,
            Kind::User => &mut self.user,
            Kind::Session => &mut self.session,
            Kind::Namespace => &mut self.namespace,
            Kind::Tag => &mut self.tag,
            Kind::Key => &mut self.key,
        }
    }

    /// Calls `f` with every named epoch that applies to an entry: its model, its scope, each
    /// level of each tag, its key.
    fn applicable(
        model: &str,
        scope: &Scope,
        tags: &[String],
        cache_id: &str,
        mut f: impl FnMut(Kind, &str) -> bool,
    ) -> bool {
        // As `bump` stores them: lowercase.
        let lower;
        let model = if model.chars().any(char::is_uppercase) {
            lower = model.to_lowercase();
            lower.as_str()
        } else {
            model
        };
        if !f(Kind::Model, model) {
            return false;
        }
        let scoped = match scope {
            Scope::Global => true,
            Scope::User(u) => f(Kind::User, u),
            Scope::Session(s) => f(Kind::Session, s),
            Scope::Namespace(n) => f(Kind::Namespace, n),
        };
        if !scoped {
            return false;
        }
        for tag in tags {
            for (at, _) in tag.match_indices(TAG_SEPARATOR) {
                if !f(Kind::Tag, &tag[..at]) {
                    return false;
                }
            }
            if !f(Kind::Tag, tag) {
                return false;
            }
        }
        f(Kind::Key, cache_id)
    }

    /// The epochs to record in an entry written now: every applicable epoch that was ever
    /// bumped (the others are 0, which an absent name means).
    pub fn stamp(&self, entry: &Entry) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if self.is_empty() {
            return out;
        }
        if self.all > 0 {
            out.insert(ALL.to_string(), self.all);
        }
        Self::applicable(
            &entry.model,
            &entry.scope,
            &entry.tags,
            &entry.cache_id,
            |kind, id| {
                if let Some(&epoch) = self.map(kind).get(id) {
                    out.insert(recorded_name(kind, id), epoch);
                }
                true
            },
        );
        out
    }

    /// The epochs an entry whose answer was fetched at `at_ms` records: [`Epochs::stamp`]
    /// without the epochs bumped after that time (bumps are stamped with their time). An
    /// answer fetched before an invalidation is refused after it, however late it is stored.
    pub fn stamp_as_of(&self, entry: &Entry, at_ms: u64) -> BTreeMap<String, u64> {
        let mut out = self.stamp(entry);
        out.retain(|_, value| *value <= at_ms);
        out
    }

    /// Whether an entry may still be served: created at or after `not_before_ms`, no
    /// applicable epoch has moved past the value the entry recorded, and the entry records no
    /// epoch above what is in force. No node records an epoch it does not have: a value above
    /// the one in force is forged (it would outlive the next invalidation), or from a node whose
    /// bump this one has not learnt yet (served once the next refresh brings it).
    pub fn admits(&self, entry: &Entry) -> bool {
        if self.is_empty() {
            return entry.epochs.is_empty();
        }
        self.admits_parts(
            &entry.model,
            &entry.scope,
            &entry.tags,
            &entry.cache_id,
            entry.created_at,
            &entry.epochs,
        )
    }

    /// [`Epochs::admits`] for an entry known by its parts (an object's metadata, say).
    pub fn admits_parts(
        &self,
        model: &str,
        scope: &Scope,
        tags: &[String],
        cache_id: &str,
        created_at: DateTime<Utc>,
        recorded: &BTreeMap<String, u64>,
    ) -> bool {
        if self.is_empty() {
            return recorded.is_empty();
        }
        if created_at.timestamp_millis() < self.not_before_ms {
            return false;
        }
        if !self.in_force_covers(recorded) {
            return false;
        }
        let recorded_of = |name: &str| recorded.get(name).copied().unwrap_or(0);
        if self.all > recorded_of(ALL) {
            return false;
        }
        Self::applicable(model, scope, tags, cache_id, |kind, id| {
            match self.map(kind).get(id) {
                Some(&epoch) => epoch <= recorded_of(&recorded_name(kind, id)),
                None => true,
            }
        })
    }

    /// Whether every epoch an entry recorded is at most the one in force (entries record what
    /// is in force when they are written, and epochs only grow).
    fn in_force_covers(&self, recorded: &BTreeMap<String, u64>) -> bool {
        recorded.iter().all(|(name, &value)| {
            if name == ALL {
                return value <= self.all;
            }
            let Some((prefix, id)) = name.split_once(':') else {
                return false;
            };
            let kind = match prefix {
                "model" => Kind::Model,
                "user" => Kind::User,
                "session" => Kind::Session,
                "namespace" => Kind::Namespace,
                "tag" => Kind::Tag,
                "key" => Kind::Key,
                _ => return false,
            };
            value <= self.map(kind).get(id).copied().unwrap_or(0)
        })
    }

    /// Drops every epoch above `latest_ms` (and a `not_before_ms` past it): no node bumps an
    /// epoch beyond its clock, so a value that far ahead is forged or from a clock gone wrong,
    /// and kept it would refuse every answer it covers for as long as it stays ahead (a
    /// `not_before_ms` in the far future: every answer, for good). Returns what was dropped,
    /// as `name=value`, for a warning.
    pub fn drop_beyond(&mut self, latest_ms: u64) -> Vec<String> {
        let mut dropped = Vec::new();
        if self.all > latest_ms {
            dropped.push(format!("{ALL}={}", self.all));
            self.all = 0;
        }
        if u64::try_from(self.not_before_ms).is_ok_and(|t| t > latest_ms) {
            dropped.push(format!("not_before_ms={}", self.not_before_ms));
            self.not_before_ms = 0;
        }
        if self.keys_pruned_before_ms > latest_ms {
            dropped.push(format!(
                "keys_pruned_before_ms={}",
                self.keys_pruned_before_ms
            ));
            self.keys_pruned_before_ms = 0;
        }
        for kind in [
            Kind::Model,
            Kind::User,
            Kind::Session,
            Kind::Namespace,
            Kind::Tag,
            Kind::Key,
        ] {
            self.map_mut(kind).retain(|id, value| {
                let keep = *value <= latest_ms;
                if !keep {
                    dropped.push(format!("{}={value}", recorded_name(kind, id)));
                }
                keep
            });
        }
        dropped
    }

    /// Bumps the epoch a selector names (or moves `not_before_ms`), as of `now`. Returns the
    /// new value. Every entry the selector covers that was written before stops being served.
    pub fn bump(&mut self, selector: &Selector, now: DateTime<Utc>) -> u64 {
        let now_ms = u64::try_from(now.timestamp_millis()).unwrap_or(0);
        let next = |current: u64| now_ms.max(current.saturating_add(1));
        let (kind, id) = match selector {
            Selector::All => {
                self.all = next(self.all);
                return self.all;
            }
            Selector::OlderThan(age) => {
                let age = chrono::Duration::from_std(*age).unwrap_or(chrono::Duration::MAX);
                let cutoff = now
                    .checked_sub_signed(age)
                    .map_or(i64::MIN, |t| t.timestamp_millis());
                self.not_before_ms = self.not_before_ms.max(cutoff);
                return u64::try_from(self.not_before_ms).unwrap_or(0);
            }
            Selector::Model(m) => (Kind::Model, m),
            Selector::User(u) => (Kind::User, u),
            Selector::Session(s) => (Kind::Session, s),
            Selector::Namespace(n) => (Kind::Namespace, n),
            Selector::Tag(t) => (Kind::Tag, t),
            Selector::Key(k) => (Kind::Key, k),
        };
        // Models are matched without regard to case (`strict` keeps a request's `GPT-4O`).
        let id = match kind {
            Kind::Model => id.to_lowercase(),
            _ => id.clone(),
        };
        let slot = self.map_mut(kind).entry(id).or_insert(0);
        *slot = next(*slot);
        *slot
    }

    /// Takes the maximum of every epoch of both. Returns whether `self` changed.
    pub fn merge(&mut self, other: &Epochs) -> bool {
        let mut changed = false;
        if other.all > self.all {
            self.all = other.all;
            changed = true;
        }
        if other.not_before_ms > self.not_before_ms {
            self.not_before_ms = other.not_before_ms;
            changed = true;
        }
        for kind in [
            Kind::Model,
            Kind::User,
            Kind::Session,
            Kind::Namespace,
            Kind::Tag,
            Kind::Key,
        ] {
            let mine = self.map_mut(kind);
            for (id, &epoch) in other.map(kind) {
                let slot = mine.entry(id.clone()).or_insert(0);
                if epoch > *slot {
                    *slot = epoch;
                    changed = true;
                }
            }
        }
        if other.keys_pruned_before_ms > self.keys_pruned_before_ms {
            self.keys_pruned_before_ms = other.keys_pruned_before_ms;
            changed = true;
        }
        let watermark = self.keys_pruned_before_ms;
        self.key.retain(|_, &mut epoch| epoch >= watermark);
        changed
    }

    /// Whether every epoch of `other` is already in `self` (merging it would change nothing).
    pub fn covers(&self, other: &Epochs) -> bool {
        let mut copy = self.clone();
        !copy.merge(other)
    }

    /// Drops key tombstones set before `cutoff_ms`: once every entry they could hide has
    /// expired they do nothing. Raises the watermark other nodes prune by when they merge.
    /// Returns how many were dropped.
    pub fn prune_keys_before(&mut self, cutoff_ms: u64) -> usize {
        self.keys_pruned_before_ms = self.keys_pruned_before_ms.max(cutoff_ms);
        let before = self.key.len();
        self.key.retain(|_, &mut epoch| epoch >= cutoff_ms);
        before - self.key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Cost, Tokens};

    fn entry(model: &str, scope: Scope, tags: &[&str], at: DateTime<Utc>) -> Entry {
        Entry {
            cache_id: "0123456789abcdef0123456789abcdef".into(),
            cache_key: format!("{model}_0123456789abcdef0123456789abcdef"),
            request: String::new(),
            response: crate::JsonText::null(),
            model: model.into(),
            provider: "openai".into(),
            tokens: Tokens::default(),
            cost: Cost::default(),
            latency_ms: 0,
            created_at: at,
            expires_at: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            scope,
            hit_count: 0,
            last_accessed: at,
            epochs: BTreeMap::new(),
        }
    }

    fn written(epochs: &Epochs, mut e: Entry) -> Entry {
        e.epochs = epochs.stamp(&e);
        e
    }

    #[test]
    fn a_bump_invalidates_entries_written_before_and_not_after() {
        let now = Utc::now();
        let mut epochs = Epochs::default();
        let old = written(&epochs, entry("gpt-4o", Scope::Global, &[], now));
        let other = written(&epochs, entry("claude", Scope::Global, &[], now));
        epochs.bump(&Selector::Model("gpt-4o".into()), now);
        assert!(!epochs.admits(&old));
        assert!(epochs.admits(&other));
        let new = written(&epochs, entry("gpt-4o", Scope::Global, &[], now));
        assert!(epochs.admits(&new));
        // A second bump in the same millisecond still moves the epoch.
        epochs.bump(&Selector::Model("gpt-4o".into()), now);
        assert!(!epochs.admits(&new));
    }

    #[test]
    fn models_match_without_regard_to_case() {
        let now = Utc::now();
        let mut epochs = Epochs::default();
        // `strict` keeps a request's own spelling of the model.
        let upper = written(&epochs, entry("GPT-4O", Scope::Global, &[], now));
        let lower = written(&epochs, entry("gpt-4o", Scope::Global, &[], now));
        epochs.bump(&Selector::Model("gpt-4o".into()), now);
        assert!(!epochs.admits(&upper) && !epochs.admits(&lower));
        let after = written(&epochs, entry("GPT-4O", Scope::Global, &[], now));
        assert!(epochs.admits(&after));
        epochs.bump(&Selector::Model("Gpt-4O".into()), now);
        assert!(!epochs.admits(&after));
    }

    #[test]
    fn tags_are_hierarchical() {
        let now = Utc::now();
        let mut epochs = Epochs::default();
        let job = written(&epochs, entry("m", Scope::Global, &["jobs:42"], now));
        let other_job = written(&epochs, entry("m", Scope::Global, &["jobs:7"], now));
        let jobsx = written(&epochs, entry("m", Scope::Global, &["jobsx"], now));
        epochs.bump(&Selector::Tag("jobs:42".into()), now);
        assert!(!epochs.admits(&job));
        assert!(epochs.admits(&other_job));
        epochs.bump(&Selector::Tag("jobs".into()), now);
        assert!(!epochs.admits(&other_job));
        assert!(epochs.admits(&jobsx), "`jobs` must not cover `jobsx`");
    }

    #[test]
    fn scopes_all_keys_and_age() {
        let now = Utc::now();
        let mut epochs = Epochs::default();
        let alice = written(&epochs, entry("m", Scope::User("alice".into()), &[], now));
        let bob = written(&epochs, entry("m", Scope::User("bob".into()), &[], now));
        let session = written(&epochs, entry("m", Scope::Session("s1".into()), &[], now));
        epochs.bump(&Selector::User("alice".into()), now);
        assert!(!epochs.admits(&alice) && epochs.admits(&bob) && epochs.admits(&session));
        epochs.bump(&Selector::Session("s1".into()), now);
        assert!(!epochs.admits(&session));

        let old = written(
            &epochs,
            entry("m", Scope::Global, &[], now - chrono::Duration::hours(2)),
        );
        let young = written(&epochs, entry("m", Scope::Global, &[], now));
        epochs.bump(&Selector::OlderThan(Duration::from_secs(3600)), now);
        assert!(!epochs.admits(&old) && epochs.admits(&young));

        let keyed = written(&epochs, entry("k", Scope::Global, &[], now));
        epochs.bump(&Selector::Key(keyed.cache_id.clone()), now);
        assert!(!epochs.admits(&keyed));

        let any = written(&epochs, entry("z", Scope::Global, &[], now));
        epochs.bump(&Selector::All, now);
        assert!(!epochs.admits(&any) && !epochs.admits(&bob));
    }

    #[test]
    fn merging_keeps_every_bump_in_any_order() {
        let now = Utc::now();
        let base = Epochs::default();
        let mut a = base.clone();
        let mut b = base.clone();
        a.bump(&Selector::Model("x".into()), now);
        b.bump(&Selector::Tag("t".into()), now);
        b.bump(
            &Selector::Model("x".into()),
            now + chrono::Duration::seconds(1),
        );
        let mut ab = a.clone();
        assert!(ab.merge(&b));
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert!(ab.covers(&a) && ab.covers(&b) && !a.covers(&ab));
        assert!(!ab.clone().merge(&ab), "merging again changes nothing");
        let text = serde_json::to_string(&ab).unwrap();
        assert_eq!(serde_json::from_str::<Epochs>(&text).unwrap(), ab);
    }

    #[test]
    fn a_document_from_a_newer_release_still_applies_what_this_one_knows() {
        let text = r#"{"all":0,"not_before_ms":0,"model":{"gpt-4o":7},"provider":{"openai":3}}"#;
        let epochs: Epochs = serde_json::from_str(text).unwrap();
        assert_eq!(epochs.model.get("gpt-4o"), Some(&7));
    }

    #[test]
    fn key_tombstones_are_pruned_by_age() {
        let now = Utc::now();
        let mut epochs = Epochs::default();
        let v = epochs.bump(&Selector::Key("a".into()), now);
        assert_eq!(epochs.prune_keys_before(v), 0);
        assert_eq!(epochs.prune_keys_before(v + 1), 1);
        assert!(epochs.is_empty());
        // The watermark travels: a node that still holds the tombstone drops it on merging.
        let mut other = Epochs::default();
        other.bump(&Selector::Key("0f".repeat(16)), Utc::now());
        let stale = other.key.values().next().copied().unwrap_or(0);
        let mut pruned = Epochs::default();
        pruned.prune_keys_before(stale + 1);
        other.merge(&pruned);
        assert!(other.key.is_empty(), "brought back by a merge");
        assert_eq!(other.keys_pruned_before_ms, stale + 1);
    }
}
