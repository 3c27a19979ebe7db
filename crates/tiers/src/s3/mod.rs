//! L3: any S3-compatible object store (AWS S3, MinIO, Garage), shared by every node that points
//! at the same bucket.
//!
//! - Entries, metadata, by-hash pointers and manifest segments are laid out as [`layout`]
//!   describes.
//! - A local index (a sled tree beside the disk tier) maps the digests this node knows to their
//!   object paths, so an L3 hit it knows about is one GET. An unknown key costs one pointer GET
//!   (usually a 404).
//! - Writes are write-behind: [`S3Tier::enqueue`] puts the envelope into a durable outbox (another
//!   sled tree) and a background task drains it with bounded concurrency, retry and backoff.
//!   [`S3Tier::drain`] empties it on demand (flush, clean shutdown); after a crash the outbox
//!   resumes on the next open.
//! - Every call is bounded by the configured timeouts; after repeated failures a [`Breaker`]
//!   skips S3 for a cool-down. A failure is a miss for the caller, never an error.
//! - This node never rewrites an object another node wrote, and never deletes a corrupt object it
//!   did not write: it drops it from its index and treats the lookup as a miss.

pub mod breaker;
pub mod control;
pub mod layout;
pub mod outbox;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, ByteStreamError};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use sled::IVec;
use strata_analytics::TierName;
use strata_core::codec::MAX_PAYLOAD;
use strata_core::{CacheKey, Codec, Entry};
use tokio::sync::Notify;

pub use breaker::Breaker;
pub use layout::{Layout, MetadataDoc, ParsedPath, Pointer};

use crate::disk::DiskTier;
use crate::error::TierError;
use crate::tier::{Tier, TierUsage};

/// Settings of the S3 tier. `Debug` never shows the secret key.
#[derive(Clone)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// Endpoint URL (`http://127.0.0.1:9000` for a local MinIO); `None` for AWS.
    pub endpoint: Option<String>,
    /// Region (S3-compatible servers usually accept anything, often `us-east-1`).
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub path_style: bool,
    /// Prefix of every object; a trailing `/` is ignored.
    pub prefix: String,
    /// Access key; with `secret_key`, static credentials. Otherwise the AWS default chain
    /// (environment, profile, instance metadata).
    pub access_key: Option<String>,
    /// Secret key.
    pub secret_key: Option<String>,
    /// Bound on opening a connection.
    pub connect_timeout: Duration,
    /// Bound on one whole operation, retries included.
    pub operation_timeout: Duration,
    /// Attempts per operation (1 = no retry).
    pub max_attempts: u32,
    /// Uploads and downloads in flight at once (outbox drain, warm, index rebuild).
    pub max_concurrency: usize,
    /// Consecutive failures that open the circuit breaker (0: never).
    pub breaker_threshold: u32,
    /// How long an open breaker skips S3.
    pub breaker_cool_down: Duration,
    /// This node's name in manifest segments; empty: a random id kept in the local database.
    pub node_id: String,
    /// Bound on the bytes the upload queue holds (envelopes waiting, parked or not); past it
    /// the oldest uploads are dropped, counted and warned about.
    pub outbox_capacity: u64,
    /// Bound on the drain at close: what is left stays queued for the next run.
    pub close_timeout: Duration,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("prefix", &self.prefix)
            .field("access_key", &self.access_key.as_ref().map(|_| "<set>"))
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "<redacted>"),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("max_concurrency", &self.max_concurrency)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cool_down", &self.breaker_cool_down)
            .field("node_id", &self.node_id)
            .field("outbox_capacity", &self.outbox_capacity)
            .field("close_timeout", &self.close_timeout)
            .finish()
    }
}

impl S3Config {
    /// Defaults for `bucket`: region `us-east-1`, path style, prefix `strata`, 1 s connect and
    /// 5 s operation timeouts, 3 attempts, 16 in flight, breaker after 5 failures for 30 s.
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Config {
            bucket: bucket.into(),
            endpoint: None,
            region: "us-east-1".into(),
            path_style: true,
            prefix: "strata".into(),
            access_key: None,
            secret_key: None,
            connect_timeout: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(5),
            max_attempts: 3,
            max_concurrency: 16,
            breaker_threshold: 5,
            breaker_cool_down: Duration::from_secs(30),
            node_id: String::new(),
            outbox_capacity: 512 << 20,
            close_timeout: Duration::from_secs(10),
        }
    }

    /// An aws-sdk-s3 client for these settings: endpoint, path style, credentials, timeouts,
    /// retries, and checksums only where the operation requires them (S3-compatible servers
    /// differ in what they accept).
    pub async fn client(&self) -> Client {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.connect_timeout)
                    .operation_timeout(self.operation_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts.max(1)));
        if let Some(endpoint) = &self.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let (Some(access), Some(secret)) = (&self.access_key, &self.secret_key) {
            loader = loader.credentials_provider(Credentials::new(
                access.clone(),
                secret.clone(),
                None,
                None,
                "strata-config",
            ));
        }
        let shared = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(self.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Client::from_conf(config)
    }
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key (path).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, if the server says.
    pub last_modified: Option<DateTime<Utc>>,
    /// Its ETag, if the server says.
    pub etag: Option<String>,
}

/// A queued upload: the key's digest and the entry's envelope.
pub type Queued = ([u8; 16], Vec<u8>);

/// What one pass over the outbox did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Entries uploaded (entry, metadata and pointer objects).
    pub uploaded: u64,
    /// Entries that failed and stay queued.
    pub failed: u64,
    /// Entries dropped because their bytes were unreadable, their disk copy was gone, or S3
    /// refused them for good (too large for it); counted, logged.
    pub dropped: u64,
    /// Entries parked: S3 rejected them [`PARK_AFTER`] times (a 4xx); they wait apart, for
    /// `strata s3 outbox retry` or `drop`, and no longer hold the queue.
    pub parked: u64,
}

impl DrainReport {
    /// Entries this pass tried.
    pub fn tried(&self) -> u64 {
        self.uploaded + self.failed + self.dropped + self.parked
    }
}

/// What `index rebuild` did: over the whole rebuild, the runs a stopped one took up included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RebuildReport {
    /// Objects listed under `llm-cache/`.
    pub listed: u64,
    /// Entry objects now in the local index.
    pub indexed: u64,
    /// By-hash pointers that were missing and were written.
    pub pointers_written: u64,
    /// Pointers that could not be written.
    pub failed: u64,
    /// Whether the run stopped before the end of the listing (asked to); the next rebuild
    /// takes up where it stopped.
    pub stopped: bool,
}

/// Where a stopped `index rebuild` was, kept in [`REBUILD_STATE_TREE`] between two pages:
/// whether the pointers were all listed, the last key handled in the listing under way, and
/// the counts so far.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct RebuildState {
    pointers_listed: bool,
    after: Option<String>,
    report: RebuildReport,
}

/// The tree (of the disk tier's database) a rebuild keeps its [`RebuildState`] in while it
/// runs or once it was stopped.
const REBUILD_STATE_TREE: &str = "l3-rebuild-state";

/// The state of a run over the bucket that can be stopped between two pages and taken up by
/// the next (`index rebuild`, `gc`): saved as JSON after every page, in a tree of the disk
/// tier's database. A state that cannot be read counts as none: the run starts over.
pub(crate) struct SavedRun<T> {
    tree: sled::Tree,
    kind: std::marker::PhantomData<T>,
}

const SAVED_RUN_KEY: &[u8] = b"state";

impl<T: serde::Serialize + serde::de::DeserializeOwned> SavedRun<T> {
    /// The state a stopped run left, if any.
    pub(crate) fn load(&self) -> Result<Option<T>, TierError> {
        Ok(self
            .tree
            .get(SAVED_RUN_KEY)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Saves where the run stands.
    pub(crate) fn save(&self, state: &T) -> Result<(), TierError> {
        let bytes = serde_json::to_vec(state)
            .map_err(|e| TierError::Storage(format!("saving where the run stands: {e}")))?;
        self.tree.insert(SAVED_RUN_KEY, bytes)?;
        Ok(())
    }

    /// Forgets it: the run reached its end.
    pub(crate) fn finish(&self) -> Result<(), TierError> {
        self.tree.remove(SAVED_RUN_KEY)?;
        Ok(())
    }
}

/// What `warm` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WarmReport {
    /// Entry objects that matched the selection.
    pub matched: u64,
    /// Entries now in L2.
    pub warmed: u64,
    /// Entries skipped because they have expired.
    pub expired: u64,
    /// Entries skipped because they were invalidated.
    pub invalidated: u64,
    /// Objects that could not be read or were corrupt.
    pub failed: u64,
    /// Entries the disk tier held already (not fetched).
    pub held: u64,
    /// Whether the run stopped before the end of the listing (asked to).
    pub stopped: bool,
}

/// The scratch tree `rebuild_index` keeps the listed pointers' ids in while it runs.
const REBUILD_SCRATCH_TREE: &str = "l3-rebuild-scratch";

/// A listing read a page at a time ([`S3Tier::pages`]).
pub struct Pages {
    s3: S3Tier,
    prefix: String,
    token: Option<String>,
    /// The key to list after, on the first page only.
    start_after: Option<String>,
    /// The continuation token of the page before, to catch a server that repeats one (S3
    /// tokens are opaque; one repeated right away would loop forever).
    last_token: Option<String>,
    listed: u64,
    done: bool,
}

impl Pages {
    /// The next page, or `None` once the listing has ended. A listing cut short is an error,
    /// never a quiet end: an invalidation by pattern would miss the rest.
    pub async fn next(&mut self) -> Result<Option<Vec<Listed>>, TierError> {
        if self.done {
            return Ok(None);
        }
        let inner = &self.s3.inner;
        let prefix = &self.prefix;
        let page = inner
            .client
            .list_objects_v2()
            .bucket(&inner.bucket)
            .prefix(prefix)
            .set_start_after(self.start_after.take())
            .set_continuation_token(self.token.clone())
            .send()
            .await
            .map_err(|e| inner.failed("LIST", prefix, &e))?;
        inner.breaker.success();
        let objects: Vec<Listed> = page
            .contents()
            .iter()
            .filter_map(|o| {
                Some(Listed {
                    key: o.key()?.to_string(),
                    size: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    last_modified: o
                        .last_modified()
                        .and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
                    etag: o.e_tag().map(str::to_string),
                })
            })
            .collect();
        self.listed += objects.len() as u64;
        if page.is_truncated() != Some(true) {
            self.done = true;
            return Ok(Some(objects));
        }
        match page.next_continuation_token() {
            Some(next)
                if self.token.as_deref() != Some(next)
                    && self.last_token.as_deref() != Some(next) =>
            {
                self.last_token = self.token.take();
                self.token = Some(next.to_string());
            }
            Some(_) => {
                return Err(TierError::Storage(format!(
                    "S3 LIST {prefix}: the server repeated a continuation token"
                )));
            }
            None => {
                return Err(TierError::Storage(format!(
                    "S3 LIST {prefix}: a truncated page without a continuation token"
                )));
            }
        }
        Ok(Some(objects))
    }

    /// Objects listed so far.
    pub fn listed(&self) -> u64 {
        self.listed
    }

    /// Whether the last page has been read: [`Pages::next`] has nothing more.
    pub fn ended(&self) -> bool {
        self.done
    }
}

/// An SDK error in a few words: the server's code and message, or the root cause of a call that
/// got no answer (`Connection refused`, a timeout). The whole chain, with the raw response, is
/// about a kilobyte: it goes to the debug log.
fn brief<E>(e: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            match (e.code(), e.message()) {
                (Some(code), Some(message)) => format!("{code}: {message} (HTTP {status})"),
                (Some(code), None) => format!("{code} (HTTP {status})"),
                _ => format!("HTTP {status}"),
            }
        }
        SdkError::TimeoutError(_) => "timed out".to_string(),
        _ => {
            let mut cause: &dyn std::error::Error = e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            format!("no answer: {cause}")
        }
    }
}

/// What [`S3Tier::warm`] did with one object.
enum Warmed {
    Stored,
    /// The disk tier holds it already.
    Held,
    Expired,
    Invalidated,
    /// Listed in the hour of `since` but created before it: not a match after all.
    Older,
}

/// Counters of the S3 tier since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct S3Stats {
    /// Entries uploaded.
    pub uploaded: u64,
    /// Upload attempts that failed (the entry stayed queued).
    pub upload_failures: u64,
    /// Outbox items dropped: unreadable, their disk copy gone, or refused by S3 for good.
    pub dropped: u64,
    /// Entries waiting in the outbox.
    pub pending: u64,
    /// Entries parked after S3 rejected them again and again.
    pub parked: u64,
    /// Bytes the upload queue held when last measured (queued and parked envelopes).
    pub outbox_bytes: u64,
    /// Uploads dropped because the queue passed `outbox_capacity` (the oldest first).
    pub dropped_for_space: u64,
    /// Times the circuit breaker opened.
    pub breaker_opened: u64,
}

struct Inner {
    client: Client,
    bucket: String,
    layout: Layout,
    codec: Codec,
    /// digest → u64 LE object size · object path.
    index: sled::Tree,
    /// digest → what waits for upload: the envelope, or a reference to the disk tier's copy
    /// ([`outbox`]).
    outbox: sled::Tree,
    /// The disk tier whose database holds the outbox (and the copies references point to).
    disk: DiskTier,
    /// Source of reference sequence numbers.
    next_reference: AtomicU64,
    /// node id, manifest sequence.
    meta: sled::Tree,
    node_id: String,
    breaker: Breaker,
    /// How long reading an object's body may take (the SDK's operation timeout ends when the
    /// response headers arrive).
    body_timeout: Duration,
    max_concurrency: usize,
    /// One drain at a time (the background task or a flush).
    draining: tokio::sync::Mutex<()>,
    wake: Arc<Notify>,
    index_bytes: AtomicU64,
    uploaded: AtomicU64,
    upload_failures: AtomicU64,
    /// Warnings about failed uploads, one per interval.
    upload_warnings: strata_analytics::Throttle,
    dropped: AtomicU64,
    /// digest → an envelope S3 rejected [`PARK_AFTER`] times (an outbox value).
    parked: sled::Tree,
    /// digest → rejections so far (u32 BE), kept across runs so that short commands park too.
    rejections: sled::Tree,
    /// Where the next drain pass starts: after the last key the previous one tried, so that
    /// items failing at the head of the queue do not hold back the rest.
    cursor: std::sync::Mutex<Option<IVec>>,
    outbox_capacity: u64,
    close_timeout: Duration,
    /// Queue bytes when last measured, and bytes queued since (a new measure is due past a
    /// tenth of the bound).
    outbox_bytes: AtomicU64,
    queued_since_measure: AtomicU64,
    dropped_for_space: AtomicU64,
    /// Objects refused for a missing or wrong MAC (with a key).
    pub(crate) unauthentic: AtomicU64,
}

/// The S3 tier. Cheap to clone (clones share the client and the local state).
#[derive(Clone)]
pub struct S3Tier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Tier")
            .field("bucket", &self.inner.bucket)
            .field("prefix", &self.inner.layout.prefix())
            .field("node_id", &self.inner.node_id)
            .finish()
    }
}

const NODE_ID_KEY: &[u8] = b"node-id";
/// The copy of the node id kept beside the disk tier's database.
const NODE_ID_BESIDE: &str = "node-id";
const MANIFEST_SEQ_KEY: &[u8] = b"manifest-seq";
/// Outbox items uploaded per manifest segment.
const BATCH: usize = 256;
/// How long the drainer waits after a wake-up, so that a burst of writes becomes one batch.
const LINGER: Duration = Duration::from_millis(50);
/// Rejections (4xx) after which an upload is parked rather than tried again.
pub const PARK_AFTER: u32 = 5;

impl S3Tier {
    /// Connects to the bucket of `config`, keeping the local index and the outbox in the disk
    /// tier's database. Nothing is sent to S3 here: an unreachable server is found on first use.
    pub async fn connect(
        config: &S3Config,
        disk: &DiskTier,
        codec: Codec,
    ) -> Result<Self, TierError> {
        let client = config.client().await;
        Self::with_client(client, config, disk, codec)
    }

    /// As [`S3Tier::connect`], with a client built elsewhere.
    pub fn with_client(
        client: Client,
        config: &S3Config,
        disk: &DiskTier,
        codec: Codec,
    ) -> Result<Self, TierError> {
        if config.bucket.is_empty() {
            return Err(TierError::Unavailable("s3.bucket is empty".into()));
        }
        let index = disk.open_tree("l3-index")?;
        let outbox = disk.open_tree(crate::disk::OUTBOX_TREE)?;
        // The disk tier moves a copy the outbox refers to into it before evicting the copy.
        disk.keep_for_upload(outbox.clone());
        let meta = disk.open_tree("l3-meta")?;
        let parked = disk.open_tree("l3-parked")?;
        let rejections = disk.open_tree("l3-rejections")?;
        let node_id = if config.node_id.is_empty() {
            match meta.get(NODE_ID_KEY)? {
                Some(id) => String::from_utf8_lossy(&id).into_owned(),
                None => {
                    // A database moved aside as corrupt: the id kept beside it, so that this
                    // node goes on writing its own objects, not a stranger's.
                    let salvaged = disk
                        .salvaged(NODE_ID_BESIDE)
                        .and_then(|id| String::from_utf8(id).ok())
                        .filter(|id| {
                            id.bytes()
                                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
                                && !id.is_empty()
                        });
                    let id = match salvaged {
                        Some(id) => id,
                        None => fresh_node_id(disk.generate_id()?),
                    };
                    meta.insert(NODE_ID_KEY, id.as_bytes())?;
                    id
                }
            }
        } else if config.node_id.len() <= 64
            && config
                .node_id
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
        {
            config.node_id.clone()
        } else {
            // It names objects (`control/epochs/{node}.json`, manifests): nothing that could
            // climb out of its place or collide with another name.
            return Err(TierError::Invalid(format!(
                "node_id `{}` must be at most 64 of [a-z0-9_-]",
                config.node_id
            )));
        };
        disk.keep_beside(NODE_ID_BESIDE, node_id.as_bytes());
        let index_bytes = index
            .iter()
            .values()
            .filter_map(Result::ok)
            .map(|v| index_size(&v))
            .sum();
        Ok(S3Tier {
            inner: Arc::new(Inner {
                client,
                bucket: config.bucket.clone(),
                layout: Layout::new(&config.prefix),
                codec,
                index,
                outbox: outbox.clone(),
                disk: disk.clone(),
                next_reference: AtomicU64::new(outbox::first_sequence()),
                meta,
                node_id,
                breaker: Breaker::new(config.breaker_threshold, config.breaker_cool_down),
                body_timeout: config.operation_timeout,
                max_concurrency: config.max_concurrency.max(1),
                draining: tokio::sync::Mutex::new(()),
                wake: Arc::new(Notify::new()),
                index_bytes: AtomicU64::new(index_bytes),
                uploaded: AtomicU64::new(0),
                upload_failures: AtomicU64::new(0),
                upload_warnings: Default::default(),
                dropped: AtomicU64::new(0),
                parked,
                rejections,
                cursor: std::sync::Mutex::new(None),
                outbox_capacity: config.outbox_capacity,
                close_timeout: config.close_timeout,
                outbox_bytes: AtomicU64::new(0),
                // Measured at the first chance.
                queued_since_measure: AtomicU64::new(u64::MAX / 2),
                dropped_for_space: AtomicU64::new(0),
                unauthentic: AtomicU64::new(0),
            }),
        })
    }

    /// The S3 client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.inner.bucket
    }

    /// The object layout.
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// This node's id in manifest segments.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Counters since open.
    pub fn stats(&self) -> S3Stats {
        S3Stats {
            uploaded: self.inner.uploaded.load(Relaxed),
            upload_failures: self.inner.upload_failures.load(Relaxed),
            dropped: self.inner.dropped.load(Relaxed),
            pending: self.pending() as u64,
            parked: self.inner.parked.len() as u64,
            outbox_bytes: self.inner.outbox_bytes.load(Relaxed),
            dropped_for_space: self.inner.dropped_for_space.load(Relaxed),
            breaker_opened: self.inner.breaker.times_opened(),
        }
    }

    /// The entry objects this node's local index knows, and their bytes.
    pub fn known(&self) -> TierUsage {
        TierUsage {
            entries: self.inner.index.len() as u64,
            bytes: self.inner.index_bytes.load(Relaxed),
            capacity: None,
        }
    }

    /// Entries waiting in the outbox. Counts by walking the outbox: for reports, not for hot
    /// loops.
    pub fn pending(&self) -> usize {
        self.inner.outbox.len()
    }

    /// Whether this tier seals and authenticates under keys.
    pub fn has_keys(&self) -> bool {
        self.inner.codec.keys().is_some()
    }

    /// Whether the circuit breaker lets calls through now.
    pub fn available(&self) -> bool {
        self.inner.breaker.allows()
    }

    /// Whether the circuit breaker is open now: S3 is being skipped for a cool-down after
    /// repeated failures (a half-open breaker, letting one probe through, counts as open).
    pub fn breaker_open(&self) -> bool {
        !self.inner.breaker.remaining().is_zero()
    }

    /// Reads an entry from S3: through the local index when it knows the object, else through
    /// the by-hash pointer. Returns the decoded entry and the envelope as stored.
    pub async fn fetch(&self, key: &CacheKey) -> Result<Option<(Entry, Vec<u8>)>, TierError> {
        let inner = &self.inner;
        let id = key.digest;
        if let Some(value) = inner.index.get(id)? {
            let path = index_path(&value);
            match inner.get_bytes(&path).await? {
                Some(bytes) => return inner.decode_fetched(key, &path, bytes, true).map(Some),
                None => {
                    // Gone (deleted by gc or a lifecycle rule): forget it, try the pointer.
                    inner.forget(&id)?;
                }
            }
        }
        let pointer_path = inner.layout.pointer_path(&key.hex());
        let Some(raw) = inner.get_bytes(&pointer_path).await? else {
            return Ok(None);
        };
        let pointer: Pointer = serde_json::from_slice(&raw)
            .map_err(|e| TierError::Storage(format!("bad pointer {pointer_path}: {e}")))?;
        let Some(bytes) = inner.get_bytes(&pointer.path).await? else {
            return Ok(None);
        };
        inner
            .decode_fetched(key, &pointer.path, bytes, false)
            .map(Some)
    }

    /// Queues an entry's envelope for upload. Durable once the disk tier flushes; the
    /// background drain (or [`S3Tier::drain`]) uploads it.
    pub fn enqueue(&self, key: &CacheKey, envelope: &[u8]) -> Result<(), TierError> {
        let seq = self.inner.next_reference.fetch_add(1, Relaxed);
        self.inner
            .outbox
            .insert(key.digest, outbox::held(seq, envelope))?;
        self.inner.queued(envelope.len() as u64);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Queues an upload of the copy of `key` that the disk tier this tier was connected with
    /// holds (just written by the caller): the outbox keeps a reference to it, not a second copy.
    /// If the disk copy goes before the upload, an eviction moves the envelope into the outbox
    /// first; a copy removed as invalid, expired or corrupt is not uploaded.
    pub fn enqueue_stored(&self, key: &CacheKey) -> Result<(), TierError> {
        let seq = self.inner.next_reference.fetch_add(1, Relaxed);
        self.inner
            .outbox
            .insert(key.digest, &outbox::reference(seq))?;
        // What the reference may become: the envelope, if eviction takes the disk copy.
        self.inner.queued(2 << 10);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Whether `disk` is the disk tier this tier keeps its outbox beside (so that
    /// [`S3Tier::enqueue_stored`] may refer to its copies).
    pub fn stores_beside(&self, disk: &DiskTier) -> bool {
        self.inner.disk.same_as(disk)
    }

    /// Drops a queued upload, if any.
    pub fn dequeue(&self, key: &CacheKey) -> Result<(), TierError> {
        self.inner.outbox.remove(key.digest)?;
        Ok(())
    }

    /// Uploads an entry now: entry object, metadata object and by-hash pointer, then records it
    /// in the local index. Returns the pointer.
    pub async fn upload(&self, entry: &Entry, envelope: Vec<u8>) -> Result<Pointer, TierError> {
        self.inner.upload(entry, envelope).await
    }

    /// Uploads the whole outbox, batch after batch, until it is empty, or until a whole pass
    /// over what is queued gets nothing done. Items that fail are passed over (the next batch
    /// starts after them), so they never hold back the rest; one S3 keeps rejecting (a 4xx)
    /// is parked after [`PARK_AFTER`] tries. Returns how many entries were uploaded.
    pub async fn drain(&self) -> Result<u64, TierError> {
        let mut total = 0;
        let mut failed_in_a_row = 0;
        loop {
            let report = self.drain_once().await?;
            total += report.uploaded;
            if report.tried() == 0 {
                return Ok(total);
            }
            if report.uploaded > 0 || report.dropped > 0 || report.parked > 0 {
                failed_in_a_row = 0;
                continue;
            }
            failed_in_a_row += report.failed;
            if failed_in_a_row >= self.pending() as u64 {
                return Err(TierError::Unavailable(format!(
                    "{} uploads failed; {} entries stay queued",
                    failed_in_a_row,
                    self.pending()
                )));
            }
        }
    }

    /// [`S3Tier::drain`] within `[s3] close_timeout`: what is left stays queued for the next
    /// run, and the error says how much.
    pub async fn drain_for_close(&self) -> Result<u64, TierError> {
        match tokio::time::timeout(self.inner.close_timeout, self.drain()).await {
            Ok(drained) => drained,
            Err(_) => Err(TierError::Unavailable(format!(
                "the uploads did not finish within {:.1} s; {} entries stay queued for the next run",
                self.inner.close_timeout.as_secs_f64(),
                self.pending()
            ))),
        }
    }

    /// Measures the upload queue (queued and parked envelopes) and, past `outbox_capacity`,
    /// drops the oldest uploads until it holds 90% of it: with S3 down for long, the queue would
    /// otherwise grow with every put, past anything the disk tier's bound says. Returns how many
    /// were dropped (counted and warned about). References count for their few bytes: their
    /// envelopes are the disk tier's, within its own bound.
    pub fn bound_outbox(&self) -> Result<u64, TierError> {
        let inner = &self.inner;
        inner.queued_since_measure.store(0, Relaxed);
        inner.disk.reset_outbox_growth();
        let mut items = Vec::new();
        let mut total = 0u64;
        for (tree, which) in [(&inner.outbox, 0u8), (&inner.parked, 1u8)] {
            for item in tree.iter() {
                let (k, v) = item?;
                let bytes = (k.len() + v.len()) as u64;
                total += bytes;
                items.push((outbox::parse(&v).seq(), which, k, v, bytes));
            }
        }
        inner.outbox_bytes.store(total, Relaxed);
        if total <= inner.outbox_capacity {
            return Ok(0);
        }
        items.sort_by_key(|(seq, ..)| *seq);
        let target = inner.outbox_capacity / 10 * 9;
        let mut dropped = 0;
        for (_, which, k, v, bytes) in items {
            if total <= target {
                break;
            }
            let tree = if which == 0 {
                &inner.outbox
            } else {
                &inner.parked
            };
            if tree.compare_and_swap(&k, Some(&v), None::<&[u8]>)?.is_ok() {
                total -= bytes;
                dropped += 1;
            }
        }
        inner.outbox_bytes.store(total, Relaxed);
        inner.dropped_for_space.fetch_add(dropped, Relaxed);
        tracing::warn!(
            dropped,
            capacity = inner.outbox_capacity,
            "the upload queue passed [s3] outbox_capacity: dropped its oldest uploads (their entries stay local)"
        );
        Ok(dropped)
    }

    /// The uploads parked after S3 rejected them again and again: (digest, envelope bytes).
    pub fn parked(&self) -> Result<Vec<([u8; 16], u64)>, TierError> {
        let mut out = Vec::new();
        for item in self.inner.parked.iter() {
            let (k, v) = item?;
            if let Ok(digest) = <[u8; 16]>::try_from(k.as_ref()) {
                out.push((digest, v.len() as u64));
            }
        }
        Ok(out)
    }

    /// Puts every parked upload back in the queue, with its rejections forgotten. Returns how
    /// many.
    pub fn retry_parked(&self) -> Result<u64, TierError> {
        let mut moved = 0;
        for item in self.inner.parked.iter() {
            let (k, v) = item?;
            // A newer answer queued meanwhile wins.
            if self
                .inner
                .outbox
                .compare_and_swap(&k, None::<&[u8]>, Some(&v))?
                .is_ok()
            {
                moved += 1;
            }
            self.inner.parked.remove(&k)?;
            self.inner.rejections.remove(&k)?;
        }
        self.inner.wake.notify_one();
        Ok(moved)
    }

    /// Drops every parked upload (the entries stay in the local tiers). Returns how many.
    pub fn drop_parked(&self) -> Result<u64, TierError> {
        let n = self.inner.parked.len() as u64;
        self.inner.parked.clear()?;
        Ok(n)
    }

    /// Uploads one batch of the outbox (up to 256 entries, `max_concurrency` at a time),
    /// starting after the last one the previous batch tried, and writes their manifest segment.
    pub async fn drain_once(&self) -> Result<DrainReport, TierError> {
        let inner = &self.inner;
        let _turn = inner.draining.lock().await;
        let batch = inner.next_batch()?;
        if batch.is_empty() {
            return Ok(DrainReport::default());
        }
        if !inner.breaker.allows() {
            return Ok(DrainReport {
                failed: batch.len() as u64,
                ..DrainReport::default()
            });
        }
        let mut report = DrainReport::default();
        let mut done = Vec::new();
        let results = futures::stream::iter(batch.into_iter().map(|(k, v)| async move {
            let outcome = match inner.envelope_of(&k, &v) {
                Ok(Some(envelope)) => match inner.codec.decode(&envelope) {
                    Ok(entry) => Some(inner.upload(&entry, envelope.to_vec()).await),
                    Err(e) => {
                        tracing::error!(error = %e, "unreadable entry in the S3 outbox; dropping it");
                        None
                    }
                },
                Ok(None) => {
                    tracing::debug!(
                        "the disk copy a queued upload refers to is gone (invalidated, expired \
                         or corrupt); dropping the upload"
                    );
                    None
                }
                Err(e) => Some(Err(e)),
            };
            (k, v, outcome)
        }))
        .buffer_unordered(inner.max_concurrency)
        .collect::<Vec<_>>()
        .await;
        for (k, v, outcome) in results {
            match outcome {
                Some(Ok(pointer)) => done.push((k, v, pointer)),
                // Not attempted: the breaker's probe was out. Stays queued, not a failure.
                Some(Err(TierError::CircuitOpen)) => report.failed += 1,
                Some(Err(e @ TierError::Refused(_))) => {
                    // Queued, it would be refused again on every drain: dropped, counted. The
                    // local copies stay.
                    tracing::error!(error = %e, "S3 refuses this upload for good; dropping it");
                    inner.drop_queued(&k, &v, &mut report)?;
                }
                Some(Err(e @ TierError::Rejected(_))) => {
                    inner.upload_failures.fetch_add(1, Relaxed);
                    if inner.rejected(&k, &v)? {
                        tracing::error!(error = %e,
                            "S3 rejected this upload {PARK_AFTER} times; parked (strata s3 outbox)");
                        report.parked += 1;
                    } else {
                        strata_analytics::throttled!(
                            inner.upload_warnings,
                            error = %e,
                            "S3 rejected an upload; it stays queued, and is parked after {PARK_AFTER} tries"
                        );
                        report.failed += 1;
                    }
                }
                Some(Err(e)) => {
                    strata_analytics::throttled!(
                        inner.upload_warnings,
                        error = %e,
                        "S3 upload failed; the entry stays queued"
                    );
                    inner.upload_failures.fetch_add(1, Relaxed);
                    report.failed += 1;
                }
                None => inner.drop_queued(&k, &v, &mut report)?,
            }
        }
        if done.is_empty() {
            return Ok(report);
        }
        let lines: String = done
            .iter()
            .filter_map(|(_, _, p)| serde_json::to_string(p).ok())
            .map(|line| line + "\n")
            .collect();
        let seq = inner.next_seq()?;
        let manifest = inner.layout.manifest_path(Utc::now(), &inner.node_id, seq);
        match inner
            .put_bytes(&manifest, lines.into_bytes(), "application/x-ndjson")
            .await
        {
            Ok(()) => {}
            // Refused again on every retry, it would hold the batch (the head of the outbox)
            // queued for ever. The entries and their pointers are in S3: the batch is done
            // without its segment, which nothing reads back.
            Err(e @ TierError::Refused(_)) => {
                tracing::error!(error = %e, "S3 refuses this manifest segment for good; going on without it");
                inner.upload_failures.fetch_add(1, Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing a manifest segment failed; the batch stays queued");
                inner.upload_failures.fetch_add(done.len() as u64, Relaxed);
                report.failed += done.len() as u64;
                return Ok(report);
            }
        }
        for (k, v, _) in done {
            // Only if it was not queued again meanwhile (a newer answer for the same key).
            inner
                .outbox
                .compare_and_swap(&k, Some(&v), None::<&[u8]>)?
                .ok();
            inner.rejections.remove(&k)?;
            report.uploaded += 1;
        }
        inner.uploaded.fetch_add(report.uploaded, Relaxed);
        Ok(report)
    }

    /// Starts the background task that drains the outbox: woken by every enqueue, retrying
    /// with exponential backoff (from 250 ms up to 30 s, or the breaker's cool-down) after a
    /// failure. It ends when the last handle of the tier is dropped.
    pub fn spawn_drainer(&self) -> Option<tokio::task::JoinHandle<()>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let wake = Arc::clone(&self.inner.wake);
        Some(handle.spawn(async move {
            let mut backoff = Duration::ZERO;
            loop {
                let wait = if backoff.is_zero() {
                    Duration::from_secs(1)
                } else {
                    backoff
                };
                // Woken by an enqueue, or on a timer to retry and to notice the tier is gone.
                let woken = tokio::time::timeout(wait, wake.notified()).await.is_ok();
                if !backoff.is_zero() {
                    tokio::time::sleep(backoff).await;
                } else if woken {
                    // Let a burst of puts gather into one batch (and one manifest segment).
                    tokio::time::sleep(LINGER).await;
                }
                let Some(inner) = weak.upgrade() else { return };
                let tier = S3Tier { inner };
                if tier.inner.measure_due()
                    && let Err(e) = tier.bound_outbox()
                {
                    tracing::warn!(error = %e, "cannot measure the upload queue");
                }
                // Not `pending()`: sled counts a tree by walking it, on every wake-up.
                if tier.inner.outbox.is_empty() {
                    continue;
                }
                match tier.drain().await {
                    Ok(_) => backoff = Duration::ZERO,
                    Err(e) => {
                        let next = (backoff * 2)
                            .clamp(Duration::from_millis(250), Duration::from_secs(30));
                        backoff = next.max(tier.inner.breaker.remaining());
                        tracing::debug!(error = %e, ?backoff, "outbox drain will retry");
                    }
                }
            }
        }))
    }

    /// Lists every object under `prefix`, page by page (ListObjectsV2 continuation), calling
    /// `on_page` with each page's objects.
    pub async fn list_pages(
        &self,
        prefix: &str,
        mut on_page: impl FnMut(Vec<Listed>),
    ) -> Result<u64, TierError> {
        let mut pages = self.pages(prefix);
        while let Some(page) = pages.next().await? {
            on_page(page);
        }
        Ok(pages.listed())
    }

    /// Where a run over the bucket that can be stopped and taken up stands, kept in the tree
    /// `name` of the disk tier's database ([`SavedRun`]).
    pub(crate) fn saved_run<T>(&self, name: &str) -> Result<SavedRun<T>, TierError> {
        Ok(SavedRun {
            tree: self.scratch_tree(name)?,
            kind: std::marker::PhantomData,
        })
    }

    /// A tree of the disk tier's database for a long run's scratch state (kept out of memory).
    pub(crate) fn scratch_tree(&self, name: &str) -> Result<sled::Tree, TierError> {
        self.inner.disk.open_tree(name)
    }

    /// The objects under `prefix`, a page (up to 1,000) at a time: a caller holds one page, and
    /// may stop between two.
    pub fn pages(&self, prefix: &str) -> Pages {
        self.pages_after(prefix, None)
    }

    /// [`S3Tier::pages`], starting after the key `after` (a listing taken up where it
    /// stopped).
    pub fn pages_after(&self, prefix: &str, after: Option<String>) -> Pages {
        Pages {
            s3: self.clone(),
            prefix: prefix.to_string(),
            token: None,
            start_after: after,
            last_token: None,
            listed: 0,
            done: false,
        }
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, TierError> {
        let mut all = Vec::new();
        self.list_pages(prefix, |page| all.extend(page)).await?;
        Ok(all)
    }

    /// Runs `f` over `items` with at most `max_concurrency` in flight, returning the results
    /// in completion order.
    pub async fn for_each_concurrent<T, R, Fut>(
        &self,
        items: Vec<T>,
        f: impl Fn(T) -> Fut,
    ) -> Vec<R>
    where
        Fut: Future<Output = R>,
    {
        futures::stream::iter(items.into_iter().map(f))
            .buffer_unordered(self.inner.max_concurrency)
            .collect()
            .await
    }

    /// Reads one object; `None` when it does not exist.
    pub async fn get_object(&self, path: &str) -> Result<Option<Vec<u8>>, TierError> {
        self.inner.get_bytes(path).await
    }

    /// Writes one object.
    pub async fn put_object(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), TierError> {
        self.inner.put_bytes(path, body, content_type).await
    }

    /// Records in the local index that `key`'s entry is the object `path` of `size` bytes.
    pub fn remember(&self, key: &CacheKey, path: &str, size: u64) -> Result<(), TierError> {
        self.inner.remember(&key.digest, path, size)
    }

    /// Drops `key` from the local index (the objects stay; `gc` deletes them).
    pub fn forget(&self, key: &CacheKey) -> Result<(), TierError> {
        self.inner.forget(&key.digest)
    }

    /// Removes the whole local index (after `clear`; the queued uploads went with the disk
    /// tier's entries, in [`DiskTier::clear`]).
    pub fn clear_index(&self) -> Result<(), TierError> {
        self.inner.index.clear()?;
        self.inner.index_bytes.store(0, Relaxed);
        Ok(())
    }

    /// Every queued upload as (digest, envelope), for selecting by pattern.
    pub fn queued(&self) -> Result<Vec<Queued>, TierError> {
        let mut out = Vec::new();
        for item in self.inner.outbox.iter() {
            let (k, v) = item?;
            if let (Ok(digest), Some(envelope)) = (
                <[u8; 16]>::try_from(k.as_ref()),
                self.inner.envelope_of(&k, &v)?,
            ) {
                out.push((digest, envelope.to_vec()));
            }
        }
        Ok(out)
    }

    /// The object path the local index holds for `key`.
    pub fn known_path(&self, key: &CacheKey) -> Result<Option<String>, TierError> {
        Ok(self.inner.index.get(key.digest)?.map(|v| index_path(&v)))
    }

    /// Rebuilds the local index from a listing of `llm-cache/`, and writes the by-hash pointer
    /// of every entry object that has none (its `created` is the hour of its path, `expires`
    /// unknown). `progress` is called with the number of objects listed so far.
    pub async fn rebuild_index(
        &self,
        progress: impl FnMut(u64),
    ) -> Result<RebuildReport, TierError> {
        self.rebuild_index_until(progress, || false).await
    }

    /// [`S3Tier::rebuild_index`], a page of the listing at a time, stopping between pages once
    /// `stop` says so ([`RebuildReport::stopped`]). Where it stood is kept in the database
    /// after every page: the next rebuild takes up after the last key handled, with the counts
    /// so far, so nothing is listed, written or counted twice. A state that cannot be read
    /// starts the rebuild over.
    pub async fn rebuild_index_until(
        &self,
        mut progress: impl FnMut(u64),
        stop: impl Fn() -> bool,
    ) -> Result<RebuildReport, TierError> {
        let inner = &self.inner;
        let layout = &inner.layout;
        // The pointers listed go to a scratch tree of the database, not to memory: a listing
        // of millions is held a page at a time.
        let pointers = self.scratch_tree(REBUILD_SCRATCH_TREE)?;
        let saved = self.saved_run::<RebuildState>(REBUILD_STATE_TREE)?;
        let mut state = match saved.load()? {
            Some(state) => state,
            None => {
                pointers.clear()?;
                RebuildState::default()
            }
        };
        state.report.stopped = false;
        let save = |state: &RebuildState| saved.save(state);
        if !state.pointers_listed {
            let mut listed = self.pages_after(&layout.pointer_root(), state.after.take());
            while let Some(page) = listed.next().await? {
                let mut batch = sled::Batch::default();
                for id in page
                    .iter()
                    .filter_map(|o| layout.parse_pointer_path(&o.key))
                {
                    batch.insert(id.as_bytes(), &[]);
                }
                pointers.apply_batch(batch)?;
                state.after = page.last().map(|o| o.key.clone()).or(state.after);
                save(&state)?;
                if !listed.ended() && stop() {
                    state.report.stopped = true;
                    return Ok(state.report);
                }
            }
            // Every pointer is known: the index is built afresh from here.
            inner.index.clear()?;
            inner.index_bytes.store(0, Relaxed);
            state.pointers_listed = true;
            state.after = None;
            save(&state)?;
        }
        let mut listed_entries = self.pages_after(&layout.cache_root(), state.after.take());
        while let Some(page) = listed_entries.next().await? {
            let report = &mut state.report;
            report.listed += page.len() as u64;
            let last = page.last().map(|o| o.key.clone());
            let mut missing = Vec::new();
            for object in page {
                let Some(parsed) = layout.parse_entry_path(&object.key) else {
                    continue;
                };
                let Some(key) = parsed.key() else { continue };
                inner.remember(&key.digest, &object.key, object.size)?;
                report.indexed += 1;
                if !pointers.contains_key(parsed.cache_id.as_bytes())? {
                    missing.push(Pointer {
                        cache_id: parsed.cache_id.clone(),
                        cache_key: key.to_string(),
                        path: object.key.clone(),
                        model: parsed.slug.clone(),
                        created: object.last_modified.unwrap_or(parsed.hour),
                        expires: None,
                        size: object.size,
                        node: inner.node_id.clone(),
                    });
                }
            }
            let results = self
                .for_each_concurrent(missing, |pointer| async move {
                    let body = serde_json::to_vec(&pointer).unwrap_or_default();
                    let path = inner.layout.pointer_path(&pointer.cache_id);
                    inner.put_bytes(&path, body, "application/json").await
                })
                .await;
            for result in results {
                match result {
                    Ok(()) => report.pointers_written += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, "writing a pointer failed");
                        report.failed += 1;
                    }
                }
            }
            progress(report.listed);
            state.after = last.or(state.after);
            save(&state)?;
            if !listed_entries.ended() && stop() {
                state.report.stopped = true;
                return Ok(state.report);
            }
        }
        pointers.clear()?;
        saved.finish()?;
        Ok(state.report)
    }

    /// Pulls entries from S3 into the disk tier: those of model `slug` (or all), created at or
    /// after `since` (or ever). Each object is checked (envelope checksum) before it is stored;
    /// expired ones, and those `admits` (the epochs in force) refuses, are skipped, and so are
    /// those the disk tier holds already (not fetched again, counted as `held`). `progress` is
    /// called with each entry handled.
    pub async fn warm(
        &self,
        disk: &DiskTier,
        slug: Option<&str>,
        since: Option<DateTime<Utc>>,
        admits: impl Fn(&Entry) -> bool,
        progress: impl Fn(u64),
    ) -> Result<WarmReport, TierError> {
        self.warm_until(disk, slug, since, admits, progress, || false)
            .await
    }

    /// [`S3Tier::warm`], a page of the listing at a time (memory does not grow with the
    /// bucket), stopping between pages once `stop` says so (`WarmReport::stopped`). Run again,
    /// it takes up where it stopped: what the disk holds is passed over, so nothing is fetched
    /// or counted as warmed twice.
    pub async fn warm_until(
        &self,
        disk: &DiskTier,
        slug: Option<&str>,
        since: Option<DateTime<Utc>>,
        admits: impl Fn(&Entry) -> bool,
        progress: impl Fn(u64),
        stop: impl Fn() -> bool,
    ) -> Result<WarmReport, TierError> {
        let inner = &self.inner;
        let prefix = inner.layout.listing_prefix(slug, None);
        let since_hour = since.map(|t| {
            t.checked_sub_signed(chrono::Duration::hours(1))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        });
        let mut report = WarmReport::default();
        let now = Utc::now();
        let handled = AtomicU64::new(0);
        let (handled, progress, admits) = (&handled, &progress, &admits);
        let mut pages = self.pages(&prefix);
        while let Some(page) = pages.next().await? {
            let matched: Vec<_> = page
                .into_iter()
                .filter_map(|o| {
                    let parsed = inner.layout.parse_entry_path(&o.key)?;
                    let recent = since_hour.is_none_or(|t| parsed.hour > t);
                    recent.then_some((parsed, o))
                })
                .collect();
            report.matched += matched.len() as u64;
            let results = self
                .for_each_concurrent(matched, |(parsed, object)| async move {
                    progress(handled.fetch_add(1, Relaxed) + 1);
                    let key = parsed.key()?;
                    if disk.holds(&key) {
                        // Uploaded before `since`, so created before it too: not a match.
                        let older =
                            since.is_some_and(|t| object.last_modified.is_some_and(|m| m < t));
                        return Some(if older { Warmed::Older } else { Warmed::Held });
                    }
                    let bytes = inner.get_bytes(&object.key).await.ok()??;
                    let entry = inner.codec.decode(&bytes).ok()?;
                    // The folders tell the hour; the entry, the moment.
                    if since.is_some_and(|t| entry.created_at < t) {
                        return Some(Warmed::Older);
                    }
                    if entry.is_expired_at(now) {
                        return Some(Warmed::Expired);
                    }
                    if !admits(&entry) {
                        return Some(Warmed::Invalidated);
                    }
                    disk.put_encoded(&key, &bytes).ok()?;
                    inner.remember(&key.digest, &object.key, object.size).ok()?;
                    Some(Warmed::Stored)
                })
                .await;
            for result in results {
                match result {
                    Some(Warmed::Stored) => report.warmed += 1,
                    Some(Warmed::Held) => report.held += 1,
                    Some(Warmed::Expired) => report.expired += 1,
                    Some(Warmed::Invalidated) => report.invalidated += 1,
                    Some(Warmed::Older) => report.matched -= 1,
                    None => report.failed += 1,
                }
            }
            if stop() {
                report.stopped = true;
                break;
            }
        }
        Ok(report)
    }

    /// Decodes an envelope fetched from S3.
    pub fn decode(&self, bytes: &[u8]) -> Result<Entry, TierError> {
        Ok(self.inner.codec.decode(bytes)?)
    }
}

impl Inner {
    /// Drops an outbox item that will never be uploaded, unless it was queued again meanwhile
    /// (a newer answer for the key); counted.
    fn drop_queued(
        &self,
        key: &[u8],
        value: &IVec,
        report: &mut DrainReport,
    ) -> Result<(), TierError> {
        self.dropped.fetch_add(1, Relaxed);
        report.dropped += 1;
        self.outbox
            .compare_and_swap(key, Some(value), None::<&[u8]>)?
            .ok();
        Ok(())
    }

    fn failed<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        op: &str,
        path: &str,
        e: &SdkError<E, HttpResponse>,
    ) -> TierError {
        // A server that answered is reachable: only no answer, a timeout, a 5xx but 501, 408 or 429
        // (whatever error code, if any, the body carries) count towards the breaker.
        let status = e.raw_response().map(|r| r.status().as_u16());
        // 501 is a store that does not do what was asked (a conditional write), not a fault.
        let server_fault = status.is_none_or(|s| (s >= 500 && s != 501) || s == 408 || s == 429);
        if server_fault {
            self.breaker.failure();
        } else {
            self.breaker.success();
        }
        tracing::debug!(op, path, error = %DisplayErrorContext(e), "S3 call failed");
        let message = format!("S3 {op} {path}: {}", brief(e));
        let refused_for_good = matches!(status, Some(413 | 414))
            || matches!(
                e.code(),
                Some("EntityTooLarge" | "KeyTooLongError" | "MetadataTooLarge")
            );
        // Any other 4xx but 408 and 429 (a request the store will not take as it is): tried a
        // few times more, then parked.
        let rejected = status.is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429);
        if refused_for_good {
            TierError::Refused(message)
        } else if rejected {
            TierError::Rejected(message)
        } else {
            TierError::Storage(message)
        }
    }

    async fn get_bytes(&self, path: &str) -> Result<Option<Vec<u8>>, TierError> {
        Ok(self.get_tagged(path).await?.map(|(bytes, _)| bytes))
    }

    /// One GET: the object's bytes and its ETag; `None` when it does not exist.
    async fn get_tagged(&self, path: &str) -> Result<Option<(Vec<u8>, Option<String>)>, TierError> {
        if !self.breaker.acquire() {
            return Err(TierError::CircuitOpen);
        }
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(path)
            .send()
            .await
        {
            Ok(out) => {
                let etag = out.e_tag().map(str::to_string);
                let declared = out.content_length().and_then(|n| u64::try_from(n).ok());
                if declared.is_some_and(|n| n > MAX_OBJECT) {
                    // Nothing strata writes is this large: not read at all.
                    self.breaker.success();
                    return Err(TierError::Storage(format!(
                        "S3 GET {path}: {} bytes, more than any object strata writes",
                        declared.unwrap_or_default()
                    )));
                }
                match tokio::time::timeout(self.body_timeout, read_body(out.body, declared)).await {
                    Ok(Ok(data)) => {
                        self.breaker.success();
                        Ok(Some((data, etag)))
                    }
                    Ok(Err(BodyError::TooLarge)) => {
                        self.breaker.success();
                        Err(TierError::Storage(format!(
                            "S3 GET {path}: the body runs past {MAX_OBJECT} bytes"
                        )))
                    }
                    Ok(Err(BodyError::Read(e))) => {
                        self.breaker.failure();
                        Err(TierError::Storage(format!("S3 GET {path}: body: {e}")))
                    }
                    Err(_) => {
                        self.breaker.failure();
                        Err(TierError::Storage(format!(
                            "S3 GET {path}: the body took longer than {:?}",
                            self.body_timeout
                        )))
                    }
                }
            }
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                let missing = e.as_service_error().is_some_and(|s| s.is_no_such_key());
                // A 404 for the bucket is a misconfiguration to report, not a missing object.
                let no_bucket = e.code() == Some("NoSuchBucket");
                if !no_bucket && (missing || status == Some(404)) {
                    self.breaker.success();
                    return Ok(None);
                }
                Err(self.failed("GET", path, &e))
            }
        }
    }

    async fn put_bytes(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), TierError> {
        if !self.breaker.acquire() {
            return Err(TierError::CircuitOpen);
        }
        match self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(path)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
        {
            Ok(_) => {
                self.breaker.success();
                Ok(())
            }
            Err(e) => Err(self.failed("PUT", path, &e)),
        }
    }

    async fn upload(&self, entry: &Entry, envelope: Vec<u8>) -> Result<Pointer, TierError> {
        let path = self.layout.entry_path(entry);
        let size = envelope.len() as u64;
        let metadata = serde_json::to_vec_pretty(&MetadataDoc::of(entry, size))
            .map_err(|e| TierError::Storage(format!("metadata of {}: {e}", entry.cache_key)))?;
        let pointer = Pointer::of(entry, path.clone(), size, &self.node_id);
        let pointer_json = serde_json::to_vec(&pointer)
            .map_err(|e| TierError::Storage(format!("pointer of {}: {e}", entry.cache_key)))?;
        // The entry first: a pointer never names an object that is not there.
        self.put_bytes(&path, envelope, "application/octet-stream")
            .await?;
        let metadata_path = Layout::metadata_path(&path);
        let pointer_path = self.layout.pointer_path(&entry.cache_id);
        let (m, p) = tokio::join!(
            self.put_bytes(&metadata_path, metadata, "application/json"),
            self.put_bytes(&pointer_path, pointer_json, "application/json"),
        );
        m?;
        p?;
        if let Some(key) = CacheKey::parse(&entry.cache_key) {
            self.remember(&key.digest, &path, size)?;
        }
        Ok(pointer)
    }

    fn decode_fetched(
        &self,
        key: &CacheKey,
        path: &str,
        bytes: Vec<u8>,
        indexed: bool,
    ) -> Result<(Entry, Vec<u8>), TierError> {
        match self.codec.decode(&bytes) {
            Ok(entry) => {
                // An object of another key (a misdirected pointer) is never remembered as this
                // key's: a later removal of this key would delete it. The caller refuses it.
                let ours = entry.cache_id == key.hex();
                if ours && !indexed {
                    self.remember(&key.digest, path, bytes.len() as u64)?;
                } else if !ours && indexed {
                    self.forget(&key.digest)?;
                }
                Ok((entry, bytes))
            }
            Err(e) => {
                tracing::warn!(%path, error = %e, "corrupt object in S3; treating it as a miss");
                self.forget(&key.digest)?;
                Err(TierError::Corrupt(e))
            }
        }
    }

    /// The envelope an outbox value stands for: itself, or the disk copy it refers to (`None`
    /// when that copy is gone).
    fn envelope_of(&self, key: &[u8], value: &IVec) -> Result<Option<IVec>, TierError> {
        match outbox::parse(value) {
            outbox::Item::Reference { .. } => self.disk.raw(key),
            outbox::Item::Envelope { envelope, .. } => {
                let at = outbox::envelope_offset(value);
                Ok(Some(value.subslice(at, envelope.len())))
            }
        }
    }

    /// Counts bytes just queued; a new measure of the queue is due past a tenth of its bound.
    fn queued(&self, bytes: u64) {
        let since = self.queued_since_measure.fetch_add(bytes, Relaxed) + bytes;
        if since > self.outbox_capacity / 10 {
            self.wake.notify_one();
        }
    }

    fn measure_due(&self) -> bool {
        self.queued_since_measure.load(Relaxed) > self.outbox_capacity / 10
            || self.disk.outbox_growth() > self.outbox_capacity / 10
    }

    /// The next batch: up to [`BATCH`] items after the cursor, from the start past the end.
    fn next_batch(&self) -> Result<Vec<(IVec, IVec)>, TierError> {
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let after = match cursor.as_ref() {
            Some(k) => std::ops::Bound::Excluded(k.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let mut batch = Vec::new();
        for item in self
            .outbox
            .range((after, std::ops::Bound::Unbounded))
            .take(BATCH)
        {
            batch.push(item?);
        }
        if batch.is_empty() && cursor.is_some() {
            for item in self.outbox.iter().take(BATCH) {
                batch.push(item?);
            }
        }
        *cursor = batch.last().map(|(k, _)| k.clone());
        Ok(batch)
    }

    /// Counts a rejection of the upload of `key`; at the [`PARK_AFTER`]th, moves it (as its
    /// envelope, which the disk tier may evict otherwise) from the outbox to the parked tree.
    /// Returns whether it was parked.
    fn rejected(&self, key: &[u8], value: &IVec) -> Result<bool, TierError> {
        let count = self
            .rejections
            .update_and_fetch(key, |old| {
                let n = old
                    .and_then(|o| <[u8; 4]>::try_from(o).ok())
                    .map_or(0, u32::from_be_bytes);
                Some(n.saturating_add(1).to_be_bytes().to_vec())
            })?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map_or(0, u32::from_be_bytes);
        if count < PARK_AFTER {
            return Ok(false);
        }
        let Some(envelope) = self.envelope_of(key, value)? else {
            return Ok(false);
        };
        let seq = outbox::parse(value).seq();
        self.parked.insert(key, outbox::held(seq, &envelope))?;
        self.outbox
            .compare_and_swap(key, Some(value), None::<&[u8]>)?
            .ok();
        self.rejections.remove(key)?;
        Ok(true)
    }

    fn remember(&self, digest: &[u8; 16], path: &str, size: u64) -> Result<(), TierError> {
        let mut value = Vec::with_capacity(8 + path.len());
        value.extend_from_slice(&size.to_le_bytes());
        value.extend_from_slice(path.as_bytes());
        if let Some(old) = self.index.insert(digest, value)? {
            self.index_bytes.fetch_sub(index_size(&old), Relaxed);
        }
        self.index_bytes.fetch_add(size, Relaxed);
        Ok(())
    }

    fn forget(&self, digest: &[u8; 16]) -> Result<(), TierError> {
        if let Some(old) = self.index.remove(digest)? {
            self.index_bytes.fetch_sub(index_size(&old), Relaxed);
        }
        Ok(())
    }

    fn next_seq(&self) -> Result<u64, TierError> {
        let next = self.meta.update_and_fetch(MANIFEST_SEQ_KEY, |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        Ok(next
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }
}

fn index_size(value: &[u8]) -> u64 {
    value
        .first_chunk::<8>()
        .map_or(0, |b| u64::from_le_bytes(*b))
}

fn index_path(value: &[u8]) -> String {
    String::from_utf8_lossy(value.get(8..).unwrap_or_default()).into_owned()
}

fn fresh_node_id(seed: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = (nanos ^ seed.rotate_left(32) ^ u64::from(std::process::id()))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("node-{:012x}", mixed >> 16)
}

#[async_trait]
impl Tier for S3Tier {
    fn name(&self) -> TierName {
        TierName::L3
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>, TierError> {
        Ok(self.fetch(key).await?.map(|(entry, _)| Arc::new(entry)))
    }

    /// Uploads at once (the cache itself goes through the outbox with [`S3Tier::enqueue`]).
    async fn put(&self, _key: &CacheKey, entry: &Arc<Entry>) -> Result<(), TierError> {
        let envelope = self.inner.codec.encode(entry)?;
        self.upload(entry, envelope).await.map(|_| ())
    }

    /// Deletes the entry, its metadata and its pointer, and drops any queued upload.
    async fn remove(&self, key: &CacheKey) -> Result<(), TierError> {
        let inner = &self.inner;
        self.dequeue(key)?;
        let path = match self.known_path(key)? {
            Some(path) => Some(path),
            None => {
                let pointer_path = inner.layout.pointer_path(&key.hex());
                inner
                    .get_bytes(&pointer_path)
                    .await?
                    .and_then(|raw| serde_json::from_slice::<Pointer>(&raw).ok())
                    .map(|p| p.path)
            }
        };
        // Only an object of this key.
        let path = path.filter(|path| {
            inner
                .layout
                .parse_entry_path(path)
                .is_some_and(|parsed| parsed.cache_id == key.hex())
        });
        // The object before the pointer, and the index entry last: a removal cut short leaves a
        // way to the object for the next attempt (and a tombstone, `TieredCache::remove`).
        let mut paths = Vec::new();
        if let Some(path) = path {
            paths.push(Layout::metadata_path(&path));
            paths.push(path);
        }
        paths.push(inner.layout.pointer_path(&key.hex()));
        for path in paths {
            inner
                .client
                .delete_object()
                .bucket(&inner.bucket)
                .key(&path)
                .send()
                .await
                .map_err(|e| inner.failed("DELETE", &path, &e))?;
        }
        inner.forget(&key.digest)
    }

    /// Drains the outbox.
    async fn flush(&self) -> Result<(), TierError> {
        self.drain().await.map(|_| ())
    }

    fn usage(&self) -> TierUsage {
        TierUsage {
            entries: self.inner.index.len() as u64,
            bytes: self.inner.index_bytes.load(Relaxed),
            capacity: None,
        }
    }
}

/// The largest object a GET reads: an envelope holds at most [`MAX_PAYLOAD`] bytes of payload
/// plus its header; pointers, manifests and epochs are far smaller.
const MAX_OBJECT: u64 = MAX_PAYLOAD as u64 + (1 << 16);

enum BodyError {
    TooLarge,
    Read(ByteStreamError),
}

/// Reads a body chunk by chunk, giving up as soon as it runs past [`MAX_OBJECT`].
async fn read_body(mut body: ByteStream, declared: Option<u64>) -> Result<Vec<u8>, BodyError> {
    // Room for what the server declares, up to 1 MiB: a declared length is not yet a body.
    let capacity = declared.map_or(0, |n| usize::try_from(n.min(1 << 20)).unwrap_or(0));
    let mut data = Vec::with_capacity(capacity);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(BodyError::Read)?;
        if (data.len() + chunk.len()) as u64 > MAX_OBJECT {
            return Err(BodyError::TooLarge);
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}
