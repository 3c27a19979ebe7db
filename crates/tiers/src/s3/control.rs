//! Objects that control the cache rather than hold entries: the shared invalidation epochs,
//! batch deletes for garbage collection, and the bucket lifecycle rule.
//!
//! `control/epochs.json` is shared by every node and updated with a compare-and-swap on its
//! ETag (`If-Match`, or `If-None-Match: *` to create it). Not every S3-compatible server honours
//! conditional writes, and some check them without atomicity, so each node also writes its own
//! `control/epochs/{node_id}.json`, which no other node touches; readers merge all of them by
//! taking the maximum of each epoch ([`strata_core::Epochs::merge`]), so no bump is lost even
//! when a conditional write is silently ignored.

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, Delete, ExpirationStatus, LifecycleExpiration, LifecycleRule,
    LifecycleRuleFilter, ObjectIdentifier,
};
use strata_core::Epochs;

use super::S3Tier;
use crate::error::TierError;

/// What a conditional write of `control/epochs.json` expects to replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The object must not exist yet (`If-None-Match: *`).
    Absent,
    /// The object must still have this ETag (`If-Match`).
    ETag(String),
    /// No condition: the fallback for servers without conditional writes.
    Anything,
}

/// The result of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The object was written.
    Done,
    /// Another writer got there first (412 Precondition Failed, or 409 on AWS): read again.
    Conflict,
}

/// Objects per DeleteObjects request (the S3 maximum).
pub const DELETE_BATCH: usize = 1000;

impl S3Tier {
    /// Reads the shared epochs and their ETag; `None` when no node has written them yet. A
    /// document that does not parse is reported as empty (with its ETag, so it gets replaced):
    /// the per-node copies still hold every bump.
    pub async fn read_epochs(&self) -> Result<Option<(Epochs, Option<String>)>, TierError> {
        let path = self.inner.layout.epochs_path();
        let Some((body, etag)) = self.inner.get_tagged(&path).await? else {
            return Ok(None);
        };
        let epochs = self
            .open_control(&path, &body)
            .and_then(|body| serde_json::from_slice(&body).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| {
                tracing::warn!(%path, error = %e, "shared epochs refused; replacing them");
                Epochs::default()
            });
        Ok(Some((epochs, etag)))
    }

    /// Writes the shared epochs under a condition. A lost race is [`Written::Conflict`], not an
    /// error.
    pub async fn write_epochs(
        &self,
        epochs: &Epochs,
        expect: &Expect,
    ) -> Result<Written, TierError> {
        let inner = &self.inner;
        let path = inner.layout.epochs_path();
        let body = serde_json::to_vec_pretty(epochs)
            .map_err(|e| TierError::Storage(format!("encoding epochs: {e}")))?;
        let body = self.seal_control(&path, body);
        let mut request = inner
            .client
            .put_object()
            .bucket(&inner.bucket)
            .key(&path)
            .content_type("application/json")
            .body(ByteStream::from(body));
        request = match expect {
            Expect::Absent => request.if_none_match("*"),
            Expect::ETag(etag) => request.if_match(etag),
            Expect::Anything => request,
        };
        match request.send().await {
            Ok(_) => {
                inner.breaker.success();
                Ok(Written::Done)
            }
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                if matches!(status, Some(412 | 409)) {
                    inner.breaker.success();
                    return Ok(Written::Conflict);
                }
                Err(inner.failed("PUT", &path, &e))
            }
        }
    }

    /// Writes this node's own copy of the epochs.
    pub async fn write_node_epochs(&self, epochs: &Epochs) -> Result<(), TierError> {
        let path = self.inner.layout.node_epochs_path(&self.inner.node_id);
        let body = serde_json::to_vec_pretty(epochs)
            .map_err(|e| TierError::Storage(format!("encoding epochs: {e}")))?;
        let body = self.seal_control(&path, body);
        self.put_object(&path, body, "application/json").await
    }

    /// A control document as stored: under a key, sealed with a MAC bound to its path.
    pub fn seal_control(&self, path: &str, body: Vec<u8>) -> Vec<u8> {
        match self.inner.codec.keys() {
            Some(keys) => keys.seal_document(path, &body),
            None => body,
        }
    }

    /// A control document read at `path`: under a key, its body if the MAC holds for this
    /// path (anything else is refused, counted and warned about by the caller); without one,
    /// as it is.
    pub fn open_control(&self, path: &str, stored: &[u8]) -> Result<Vec<u8>, String> {
        match self.inner.codec.keys() {
            Some(keys) => keys.open_document(path, stored).map_err(|e| {
                self.inner
                    .unauthentic
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("{e} (a control file without a valid MAC is never obeyed)")
            }),
            None => Ok(stored.to_vec()),
        }
    }

    /// Reads one node's copy of the epochs; `None` if it is gone or does not parse.
    pub async fn read_node_epochs(&self, path: &str) -> Result<Option<Epochs>, TierError> {
        Ok(self.get_object(path).await?.and_then(|bytes| {
            self.open_control(path, &bytes)
                .and_then(|body| serde_json::from_slice(&body).map_err(|e| e.to_string()))
                .map_err(|e| tracing::warn!(%path, error = %e, "node epochs refused"))
                .ok()
        }))
    }

    /// Deletes objects with DeleteObjects, [`DELETE_BATCH`] at a time (the SDK adds the
    /// checksum the request requires). Returns how many the server reported deleted;
    /// `progress` gets the running count.
    pub async fn delete_objects(
        &self,
        paths: &[String],
        mut progress: impl FnMut(u64),
    ) -> Result<u64, TierError> {
        let inner = &self.inner;
        let mut deleted = 0u64;
        for chunk in paths.chunks(DELETE_BATCH) {
            let objects = chunk
                .iter()
                .map(|p| ObjectIdentifier::builder().key(p).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TierError::Storage(format!("DeleteObjects request: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| TierError::Storage(format!("DeleteObjects request: {e}")))?;
            let out = inner
                .client
                .delete_objects()
                .bucket(&inner.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| inner.failed("DeleteObjects", &inner.layout.cache_root(), &e))?;
            inner.breaker.success();
            let failed = out.errors().len();
            for e in out.errors() {
                tracing::warn!(
                    key = e.key().unwrap_or(""),
                    code = e.code().unwrap_or(""),
                    "S3 did not delete an object"
                );
            }
            // A server may list more errors than keys were sent.
            deleted += chunk.len().saturating_sub(failed) as u64;
            progress(deleted);
        }
        Ok(deleted)
    }

    /// The lifecycle rules that expire everything strata stores per entry (`llm-cache/` and
    /// `cache-index/`) `days` after it was written.
    pub fn lifecycle_rules(&self, days: i32) -> Result<Vec<LifecycleRule>, TierError> {
        let layout = &self.inner.layout;
        [
            ("strata-llm-cache", layout.cache_root()),
            ("strata-cache-index", layout.index_root()),
        ]
        .into_iter()
        .map(|(id, prefix)| {
            LifecycleRule::builder()
                .id(id)
                .filter(LifecycleRuleFilter::builder().prefix(prefix).build())
                .status(ExpirationStatus::Enabled)
                .expiration(LifecycleExpiration::builder().days(days).build())
                .build()
                .map_err(|e| TierError::Storage(format!("lifecycle rule: {e}")))
        })
        .collect()
    }

    /// Installs `rules` as the bucket's lifecycle configuration, keeping the bucket's other
    /// rules (those whose ids are not strata's).
    pub async fn apply_lifecycle(&self, rules: Vec<LifecycleRule>) -> Result<(), TierError> {
        let inner = &self.inner;
        let ours: Vec<String> = rules
            .iter()
            .filter_map(|r| r.id().map(String::from))
            .collect();
        let mut all: Vec<LifecycleRule> = match inner
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(&inner.bucket)
            .send()
            .await
        {
            Ok(out) => out
                .rules()
                .iter()
                .filter(|r| r.id().is_none_or(|id| !ours.iter().any(|o| o == id)))
                .cloned()
                .collect(),
            // No configuration yet: start empty.
            Err(e)
                if e.code() == Some("NoSuchLifecycleConfiguration")
                    || e.raw_response().is_some_and(|r| r.status().as_u16() == 404) =>
            {
                Vec::new()
            }
            // Anything else (no answer, access denied, a 5xx): writing now would replace the
            // bucket's other rules, which could not be read.
            Err(e) => {
                return Err(inner.failed("GetBucketLifecycleConfiguration", &inner.bucket, &e));
            }
        };
        all.extend(rules);
        let config = BucketLifecycleConfiguration::builder()
            .set_rules(Some(all))
            .build()
            .map_err(|e| TierError::Storage(format!("lifecycle configuration: {e}")))?;
        inner
            .client
            .put_bucket_lifecycle_configuration()
            .bucket(&inner.bucket)
            .lifecycle_configuration(config)
            .send()
            .await
            .map_err(|e| inner.failed("PutBucketLifecycleConfiguration", &inner.bucket, &e))?;
        Ok(())
    }
}
