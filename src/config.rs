//! Configuration: the embedded `config/default.toml`, an optional file, and `STRATA_*`
//! environment overrides, merged in that order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Deserializer, Serialize};
use strata_analytics::{AnalyticsConfig, Pricing};
pub use strata_core::Secret;
use strata_core::{Codec, Normalizer, Profile};
use strata_tiers::{DiskConfig, DiskTier, EpochStore, S3Config, S3Tier, TieredCache, TtlPolicy};

use crate::Error;

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// Sections that `STRATA_{SECTION}_{KEY}` environment variables may set.
const SECTIONS: &[&str] = &[
    "normalization",
    "ttl",
    "memory",
    "disk",
    "s3",
    "invalidation",
    "analytics",
    "codec",
    "pricing",
    "server",
    "http",
    "audit",
    "security",
];

/// Environment variables that hold keys: read as key material, never through the
/// configuration (whose text a key must not be in).
const KEY_VARIABLES: [&str; 2] = ["STRATA_SECURITY_KEY", "STRATA_SECURITY_OLD_KEYS"];

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Request normalization.
    pub normalization: NormalizationConfig,
    /// Entry lifetimes.
    pub ttl: TtlConfig,
    /// L1.
    pub memory: MemoryConfig,
    /// L2.
    pub disk: DiskSection,
    /// L3.
    pub s3: S3Section,
    /// Invalidation across nodes and garbage collection.
    pub invalidation: InvalidationSection,
    /// Recording for reports.
    pub analytics: AnalyticsSection,
    /// The envelope codec.
    pub codec: CodecConfig,
    /// Prices.
    pub pricing: PricingConfig,
    /// The gateway (`strata serve`).
    #[serde(default)]
    pub server: strata_http::ServerConfig,
    /// Response caching for HTTP APIs behind `strata serve`: routes, mutation rules,
    /// upstreams, warming.
    #[serde(default)]
    pub http: strata_http::api::HttpConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditSection,
    /// Keys: MACs over every entry and control file, and optional encryption.
    #[serde(default)]
    pub security: SecuritySection,
    /// The keys `security` names, read when the configuration is loaded.
    #[serde(skip)]
    pub keyring: Option<std::sync::Arc<strata_core::Keyring>>,
}

/// `[security]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    /// A file holding the key (32 bytes or more), unless `STRATA_SECURITY_KEY` holds it. With a
    /// key, every entry and control file carries a MAC bound to its place, and one without a
    /// valid MAC is refused.
    #[serde(default)]
    pub key_file: PathBuf,
    /// Files of earlier keys still read (rotation); `STRATA_SECURITY_OLD_KEYS` may hold more,
    /// comma-separated.
    #[serde(default)]
    pub old_key_files: Vec<PathBuf>,
    /// Encrypt every entry (AES-256-GCM) on disk and in S3; needs a key.
    #[serde(default)]
    pub encrypt: bool,
}

/// `[audit]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Who the audit trail says ran this configuration's commands; empty: the user
    /// (`$USER`) and `command`.
    #[serde(default)]
    pub actor: String,
}

impl AuditSection {
    /// The name the audit trail records for this configuration's commands.
    pub fn actor(&self) -> String {
        if !self.actor.trim().is_empty() {
            return self.actor.trim().to_string();
        }
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".into());
        format!("{user} (command)")
    }
}

/// `[normalization]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizationConfig {
    /// The profile.
    pub profile: Profile,
    /// Model aliases, `from = "to"`.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
}

/// `[ttl]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TtlConfig {
    /// Default TTL; `None` ("never") keeps entries until evicted.
    #[serde(deserialize_with = "ttl", serialize_with = "ttl_out")]
    pub default: Option<Duration>,
    /// Per-model TTL.
    #[serde(default, with = "per_model")]
    pub models: BTreeMap<String, Duration>,
}

/// `[memory]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bound in bytes.
    pub capacity: ByteSize,
    /// Bytes of request texts already keyed, kept with their keys so that the same text again
    /// skips parsing and normalization (callers that pass text: the Python package). Apart from
    /// `capacity`; 0 turns it off.
    pub key_memo: ByteSize,
}

/// `[disk]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// Whether L2 is used.
    pub enabled: bool,
    /// Directory of the database.
    pub path: PathBuf,
    /// Bound in bytes.
    pub capacity: ByteSize,
    /// sled's page cache.
    pub page_cache: ByteSize,
    /// sled's flush interval.
    #[serde(with = "humantime_serde")]
    pub flush_every: Duration,
}

/// `[s3]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    /// Whether L3 is used.
    pub enabled: bool,
    /// The bucket.
    pub bucket: String,
    /// Endpoint URL; empty for AWS.
    pub endpoint: String,
    /// Region.
    pub region: String,
    /// Path-style addressing (needed by most S3-compatible servers).
    pub path_style: bool,
    /// Prefix of every object.
    pub prefix: String,
    /// Access key; empty: the AWS default chain (`AWS_ACCESS_KEY_ID`, profile, …).
    pub access_key: Secret,
    /// Secret key; empty: the AWS default chain.
    pub secret_key: Secret,
    /// Bound on opening a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on one operation, retries included.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Retries after a failed attempt.
    pub retries: u32,
    /// Uploads and downloads in flight at once.
    pub max_concurrency: usize,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker skips S3.
    #[serde(with = "humantime_serde")]
    pub breaker_cool_down: Duration,
    /// This node's name in the bucket; empty for a random id kept in the disk directory.
    pub node_id: String,
    /// Bound on the upload queue's bytes; past it the oldest uploads are dropped.
    pub outbox_capacity: ByteSize,
    /// Bound on the drain at close (every command's exit, the gateway's shutdown).
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
}

/// `[invalidation]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidationSection {
    /// How often each node reads the shared epochs from S3 (and publishes its own): another
    /// node's invalidation stops this one serving within about this long.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Update `control/epochs.json` with a compare-and-swap on its ETag. Turn off for servers
    /// that reject conditional writes; per-node copies keep every bump either way.
    pub conditional_writes: bool,
    /// How often a background sweep removes expired and invalidated entries from the disk
    /// tier; "never" leaves it to `strata gc` and lazy removal on lookup.
    #[serde(deserialize_with = "ttl", serialize_with = "ttl_out")]
    pub sweep_interval: Option<Duration>,
    /// `strata gc` deletes another node's copy of the epochs not written for this long (a node
    /// stopped long ago); "never" keeps them.
    #[serde(
        default = "thirty_days",
        deserialize_with = "ttl",
        serialize_with = "ttl_out"
    )]
    pub forget_nodes_after: Option<Duration>,
}

fn thirty_days() -> Option<Duration> {
    Some(Duration::from_secs(30 * 86400))
}

/// `[analytics]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsSection {
    /// Record every lookup's outcome for `strata report`.
    pub enabled: bool,
    /// Outcomes queued for the recorder before new ones are dropped (and counted); a lookup
    /// never waits for the recorder.
    pub channel_capacity: usize,
    /// Counters of the hot-key sketch.
    pub hot_keys: usize,
    /// With S3, how often this node writes its daily rollups to `{prefix}/analytics/`.
    #[serde(with = "humantime_serde")]
    pub publish_interval: Duration,
    /// Entries never hit and older than this are reported as cold.
    #[serde(with = "humantime_serde")]
    pub cold_after: Duration,
    /// How long `gc` keeps the ids of entries hit and the request metrics; "never" keeps
    /// them for ever.
    #[serde(
        default = "ninety_days",
        deserialize_with = "ttl",
        serialize_with = "ttl_out"
    )]
    pub retention: Option<Duration>,
}

fn ninety_days() -> Option<Duration> {
    Some(Duration::from_secs(90 * 86400))
}

/// `[codec]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CodecConfig {
    /// Compress payloads longer than this.
    pub compress_above: ByteSize,
    /// zstd level (-7..=22; negative levels trade ratio for speed).
    pub zstd_level: i32,
    /// Compress with the built-in dictionary.
    pub dictionary: bool,
}

/// `[pricing]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// A price table file; empty for the embedded one.
    #[serde(default)]
    pub file: PathBuf,
}

/// A TTL as written: text, or a bare number, which an environment variable such as
/// `STRATA_TTL_DEFAULT=0` is read as.
#[derive(Deserialize)]
#[serde(untagged)]
enum TtlText {
    Text(String),
    Number(u64),
}

impl TtlText {
    fn into_text(self) -> String {
        match self {
            TtlText::Text(text) => text,
            TtlText::Number(n) => n.to_string(),
        }
    }
}

fn ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = TtlText::deserialize(d)?.into_text();
    parse_ttl(&text).map_err(serde::de::Error::custom)
}

fn ttl_out<S: serde::Serializer>(ttl: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match ttl {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_str("never"),
    }
}

/// Parses a TTL as configuration writes it: a duration (`90s`, `12h`, `7d`) or `never` (`None`).
pub fn parse_ttl(text: &str) -> Result<Option<Duration>, String> {
    match text.trim() {
        "never" => Ok(None),
        other => humantime::parse_duration(other).map(Some).map_err(|e| {
            format!("invalid duration `{other}` ({e}); use e.g. `90s`, `12h`, `7d` or `never`")
        }),
    }
}

mod per_model {
    use super::*;
    use serde::Serializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        let raw = BTreeMap::<String, TtlText>::deserialize(d)?;
        raw.into_iter()
            .map(|(model, text)| match parse_ttl(&text.into_text()) {
                Ok(Some(ttl)) => Ok((model.to_lowercase(), ttl)),
                Ok(None) => Ok((model.to_lowercase(), Duration::from_secs(u64::MAX / 4))),
                Err(e) => Err(serde::de::Error::custom(format!("ttl of `{model}`: {e}"))),
            })
            .collect()
    }

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let shown: BTreeMap<&String, String> = map
            .iter()
            .map(|(k, v)| (k, humantime::format_duration(*v).to_string()))
            .collect();
        shown.serialize(s)
    }
}

/// A parser's message on one line: the source snippet it draws under a syntax error (`  |`,
/// `2 | text`, the caret) is left out; the place is in its first line already.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| {
            let gutter = line
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start();
            !line.is_empty() && !gutter.starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// `disk_path` → `disk.path`, `s3_bucket` → `s3.bucket`; `None` when the name starts with no
/// section. A dotted name (`disk.path`) is taken as it is.
fn override_path(name: &str) -> Option<String> {
    if let Some((section, _)) = name.split_once('.') {
        return SECTIONS.contains(&section).then(|| name.to_string());
    }
    let (section, rest) = name.split_once('_')?;
    (SECTIONS.contains(&section) && !rest.is_empty()).then(|| format!("{section}.{rest}"))
}

impl Config {
    /// The embedded default, with `STRATA_*` environment overrides.
    pub fn load_default() -> Result<Config, Error> {
        Config::load(None)
    }

    /// The embedded default, then `file` (if any), then `STRATA_*` environment overrides.
    pub fn load(file: Option<&Path>) -> Result<Config, Error> {
        Config::load_with(file, &[])
    }

    /// [`Config::load`], then `overrides` (each a `section.key` path and its value, as the
    /// Python package's keyword arguments give them: `disk_path` → `disk.path`). A name
    /// that is no section's key is an error, as an unknown key in a file is.
    pub fn load_with(
        file: Option<&Path>,
        overrides: &[(String, serde_json::Value)],
    ) -> Result<Config, Error> {
        let mut figment = Figment::from(Toml::string(DEFAULT_CONFIG));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(Error::Config(format!(
                    "config file {} not found",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("STRATA_").filter_map(|key| {
            let key = key.as_str().to_ascii_lowercase();
            let (section, rest) = key.split_once('_')?;
            (SECTIONS.contains(&section)
                && !KEY_VARIABLES
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case(&format!("strata_{key}"))))
            .then(|| format!("{section}.{rest}").into())
        }));
        for (name, value) in overrides {
            let path = override_path(name).ok_or_else(|| {
                Error::Config(format!(
                    "`{name}`: not a setting (a section's name, `_`, then its key: `disk_path`)"
                ))
            })?;
            figment = figment.merge(figment::providers::Serialized::global(&path, value));
        }
        let config: Config = figment.extract().map_err(|e| {
            let errors: Vec<String> = e
                .into_iter()
                .map(|e| one_line(&e.to_string().replace("key \"default.", "key \"")))
                .collect();
            Error::Config(errors.join("; "))
        })?;
        let mut config = config;
        config.validate()?;
        config.keyring = config.read_keys()?.map(std::sync::Arc::new);
        Ok(config)
    }

    /// The longest time any entry lives: the default TTL and every per-model TTL. `None` when
    /// some entries never expire.
    pub fn longest_ttl(&self) -> Option<Duration> {
        let mut longest = self.ttl.default?;
        for ttl in self.ttl.models.values() {
            longest = longest.max(*ttl);
        }
        Some(longest)
    }

    fn validate(&self) -> Result<(), Error> {
        const MAX_CHANNEL_CAPACITY: usize = 1 << 20;
        if self.invalidation.refresh_interval < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "invalidation.refresh_interval must be at least 100ms, found {}",
                humantime::format_duration(self.invalidation.refresh_interval)
            )));
        }
        // The channel's buffer is allocated whole when the cache opens.
        if !(1..=MAX_CHANNEL_CAPACITY).contains(&self.analytics.channel_capacity) {
            return Err(Error::Config(format!(
                "analytics.channel_capacity must be between 1 and {MAX_CHANNEL_CAPACITY}, found {}",
                self.analytics.channel_capacity
            )));
        }
        if !(-7..=22).contains(&self.codec.zstd_level) {
            return Err(Error::Config(format!(
                "codec.zstd_level must be between -7 and 22, found {}",
                self.codec.zstd_level
            )));
        }
        let node_id = &self.s3.node_id;
        if !node_id
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
            || node_id.len() > 64
        {
            return Err(Error::Config(format!(
                "s3.node_id must be at most 64 of [a-z0-9_-] (it names objects in the bucket), found `{node_id}`"
            )));
        }
        if self.disk.enabled && self.disk.path.as_os_str().is_empty() {
            return Err(Error::Config("disk.path must not be empty".into()));
        }
        if self.s3.enabled {
            if self.s3.bucket.trim().is_empty() {
                return Err(Error::Config(
                    "s3.bucket must be set when s3.enabled = true".into(),
                ));
            }
            if !self.disk.enabled {
                return Err(Error::Config(
                    "s3.enabled needs disk.enabled = true: the S3 index and outbox live in the \
                     disk tier's database"
                        .into(),
                ));
            }
            if self.s3.access_key.expose().is_some() != self.s3.secret_key.expose().is_some() {
                return Err(Error::Config(
                    "s3.access_key and s3.secret_key must be set together".into(),
                ));
            }
            let endpoint = &self.s3.endpoint;
            let is_url = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            if !endpoint.is_empty() && !is_url {
                return Err(Error::Config(format!(
                    "s3.endpoint must be an http:// or https:// URL, found `{}`",
                    self.s3.endpoint
                )));
            }
        }
        Ok(())
    }

    /// The normalizer this configuration describes.
    pub fn normalizer(&self) -> Normalizer {
        Normalizer::new(self.normalization.profile).with_aliases(&self.normalization.aliases)
    }

    /// The codec this configuration describes.
    pub fn codec(&self) -> Codec {
        let codec = Codec::new(
            self.codec.compress_above.as_u64() as usize,
            self.codec.zstd_level,
        )
        .with_dictionary(self.codec.dictionary);
        match &self.keyring {
            Some(keys) => codec.with_keys(std::sync::Arc::clone(keys)),
            None => codec,
        }
    }

    /// The keys `[security]` names: the current one from `STRATA_SECURITY_KEY` or `key_file`,
    /// old ones from `old_key_files` and `STRATA_SECURITY_OLD_KEYS`. `None` without a key.
    fn read_keys(&self) -> Result<Option<strata_core::Keyring>, Error> {
        use strata_core::Key;
        let key = |material: &[u8], from: &str| {
            Key::from_material(material).map_err(|e| Error::Config(format!("{from}: {e}")))
        };
        let file = |path: &Path| {
            std::fs::read(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let env = std::env::var(KEY_VARIABLES[0])
            .ok()
            .filter(|v| !v.is_empty());
        let current = match (env, self.security.key_file.as_os_str().is_empty()) {
            (Some(material), _) => key(material.as_bytes(), KEY_VARIABLES[0])?,
            (None, false) => key(
                &file(&self.security.key_file)?,
                &format!("security.key_file {}", self.security.key_file.display()),
            )?,
            (None, true) if self.security.encrypt => {
                return Err(Error::Config(
                    "security.encrypt needs a key: security.key_file, or STRATA_SECURITY_KEY"
                        .into(),
                ));
            }
            (None, true) => return Ok(None),
        };
        let mut old = Vec::new();
        for path in &self.security.old_key_files {
            old.push(key(
                &file(path)?,
                &format!("security.old_key_files {}", path.display()),
            )?);
        }
        if let Ok(list) = std::env::var(KEY_VARIABLES[1]) {
            for material in list.split(',').filter(|m| !m.trim().is_empty()) {
                old.push(key(material.as_bytes(), KEY_VARIABLES[1])?);
            }
        }
        Ok(Some(strata_core::Keyring::new(
            current,
            old,
            self.security.encrypt,
        )))
    }

    /// The TTL policy.
    pub fn ttl_policy(&self) -> TtlPolicy {
        TtlPolicy {
            default: self.ttl.default,
            per_model: self.ttl.models.clone().into_iter().collect(),
        }
    }

    /// The price table: the configured file, or the embedded one.
    pub fn pricing(&self) -> Result<Pricing, Error> {
        if self.pricing.file.as_os_str().is_empty() {
            return Ok(Pricing::embedded()?);
        }
        let text = std::fs::read_to_string(&self.pricing.file).map_err(|e| {
            Error::Config(format!("pricing.file {}: {e}", self.pricing.file.display()))
        })?;
        Pricing::from_toml(&text).map_err(|e| {
            Error::Config(format!("pricing.file {}: {e}", self.pricing.file.display()))
        })
    }

    /// The disk tier's settings.
    pub fn disk_config(&self) -> DiskConfig {
        DiskConfig {
            path: self.disk.path.clone(),
            capacity: self.disk.capacity.as_u64(),
            cache_capacity: self.disk.page_cache.as_u64(),
            flush_every_ms: self.disk.flush_every.as_millis() as u64,
        }
    }

    /// The S3 tier's settings.
    pub fn s3_config(&self) -> S3Config {
        let s = &self.s3;
        let mut config = S3Config::new(s.bucket.trim());
        config.endpoint = (!s.endpoint.is_empty()).then(|| s.endpoint.clone());
        config.region = s.region.clone();
        config.path_style = s.path_style;
        config.prefix = s.prefix.clone();
        config.access_key = s.access_key.expose().map(str::to_string);
        config.secret_key = s.secret_key.expose().map(str::to_string);
        config.connect_timeout = s.connect_timeout;
        config.operation_timeout = s.operation_timeout;
        config.max_attempts = s.retries.saturating_add(1);
        config.max_concurrency = s.max_concurrency;
        config.breaker_threshold = s.breaker_threshold;
        config.breaker_cool_down = s.breaker_cool_down;
        config.node_id = s.node_id.clone();
        config.outbox_capacity = s.outbox_capacity.as_u64();
        config.close_timeout = s.close_timeout;
        config
    }

    /// Opens the cache this configuration describes. With S3 enabled, this only builds the
    /// client: an unreachable server is found (and degraded around) on first use.
    pub async fn open_cache(&self) -> Result<TieredCache, Error> {
        let mut builder = TieredCache::builder()
            .actor(self.audit.actor())
            .normalizer(self.normalizer())
            .memory_capacity(self.memory.capacity.as_u64())
            .key_memo(self.memory.key_memo.as_u64())
            .ttl(self.ttl_policy())
            .pricing(self.pricing()?);
        builder = builder
            .refresh_interval(self.invalidation.refresh_interval)
            .sweep_interval(self.invalidation.sweep_interval)
            .analytics(self.analytics.enabled.then(|| AnalyticsConfig {
                channel_capacity: self.analytics.channel_capacity,
                hot_key_capacity: self.analytics.hot_keys,
                ..AnalyticsConfig::default()
            }))
            .publish_interval(self.analytics.publish_interval)
            .analytics_retention(self.analytics.retention)
            .forget_nodes_after(self.invalidation.forget_nodes_after);
        if self.disk.enabled {
            let disk = DiskTier::open(&self.disk_config(), self.codec())?;
            builder = builder.epochs(
                EpochStore::open(&disk)?.conditional_writes(self.invalidation.conditional_writes),
            );
            if self.s3.enabled {
                builder =
                    builder.s3(S3Tier::connect(&self.s3_config(), &disk, self.codec()).await?);
            }
            builder = builder.disk(disk);
        }
        Ok(builder.build())
    }
}
