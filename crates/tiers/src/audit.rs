//! The audit trail: every invalidation, clear, gc and epoch reset, appended to a log kept in
//! the disk tier (tree `audit`) and, with S3, in `{prefix}/control/audit/{node}/{day}.jsonl`
//! (this node's records of that UTC day, rewritten whole at each one: only this node writes it).
//!
//! Who did it is the cache's actor: a name from configuration for the command, the caller for
//! the admin API ([`TieredCache::acting_as`]).

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::cache::TieredCache;
use crate::error::TierError;

/// One audited operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When it was done.
    pub at: DateTime<Utc>,
    /// Which node did it (its S3 node id, or `local` without S3).
    pub node: String,
    /// What was done: `invalidate`, `clear`, `gc`, `epochs reset`.
    pub action: String,
    /// What it selected (`model gpt-4o`, `keys matching gpt-4o_*`), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// How many entries it affected, where the operation knows (keys, patterns, clear, gc);
    /// `None` for an epoch selector, which touches no entry.
    pub affected: Option<u64>,
    /// Who did it.
    pub who: String,
}

/// The log, in the disk tier's database (or nowhere, without one).
pub(crate) struct AuditLog {
    tree: Option<sled::Tree>,
    seq: AtomicU32,
}

impl AuditLog {
    pub(crate) fn new(tree: Option<sled::Tree>) -> Self {
        AuditLog {
            tree,
            seq: AtomicU32::new(0),
        }
    }

    /// Appends a record; the key orders records by time.
    fn append(&self, record: &AuditRecord) -> Result<(), TierError> {
        let Some(tree) = &self.tree else {
            return Ok(());
        };
        let mut key = Vec::with_capacity(12);
        // Unsigned, big-endian: byte order is time order.
        let ms = u64::try_from(record.at.timestamp_millis()).unwrap_or(0);
        key.extend_from_slice(&ms.to_be_bytes());
        key.extend_from_slice(&self.seq.fetch_add(1, Relaxed).to_be_bytes());
        let value = serde_json::to_vec(record)
            .map_err(|e| TierError::Storage(format!("encoding an audit record: {e}")))?;
        tree.insert(key, value)?;
        tree.flush()?;
        Ok(())
    }

    /// The records from `since` on (all of them with `None`), oldest first.
    pub(crate) fn since(
        &self,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<AuditRecord>, TierError> {
        let Some(tree) = &self.tree else {
            return Ok(Vec::new());
        };
        let start = since
            .map_or(0, |t| u64::try_from(t.timestamp_millis()).unwrap_or(0))
            .to_be_bytes();
        let mut out = Vec::new();
        for item in tree.range(start..) {
            let (_, value) = item?;
            // A record this release cannot read is skipped, not an error for the rest.
            if let Ok(record) = serde_json::from_slice(&value) {
                out.push(record);
            }
        }
        Ok(out)
    }
}

impl TieredCache {
    /// This cache acting for `who`: the operations it audits record that name. Cheap (shares
    /// everything else).
    pub fn acting_as(&self, who: impl Into<String>) -> TieredCache {
        TieredCache {
            inner: std::sync::Arc::clone(&self.inner),
            actor: Some(std::sync::Arc::from(who.into())),
        }
    }

    /// Who the audit trail says did what this handle does.
    pub fn actor(&self) -> &str {
        self.actor.as_deref().unwrap_or(&self.inner.actor)
    }

    /// The audit trail of this node, from `since` on, oldest first.
    pub fn audit_trail(&self, since: Option<DateTime<Utc>>) -> Result<Vec<AuditRecord>, TierError> {
        self.inner.audit.since(since)
    }

    /// Appends to the audit trail (the disk tier, and with S3 this node's file of the day).
    /// A failure to record is logged, never the operation's failure.
    pub(crate) async fn audit(
        &self,
        action: &str,
        selector: Option<String>,
        affected: Option<u64>,
    ) {
        let record = AuditRecord {
            at: Utc::now(),
            node: self
                .inner
                .l3
                .as_ref()
                .map_or_else(|| "local".to_string(), |l3| l3.node_id().to_string()),
            action: action.to_string(),
            selector,
            affected,
            who: self.actor().to_string(),
        };
        tracing::info!(action, selector = ?record.selector, ?affected, who = %record.who, "audit");
        if let Err(e) = self.inner.audit.append(&record) {
            tracing::error!(error = %e, action, "cannot record the operation in the audit trail");
            return;
        }
        if let Some(l3) = &self.inner.l3 {
            let day = record.at.date_naive();
            if let Err(e) = self.publish_audit_day(l3, day).await {
                tracing::warn!(error = %e, "cannot write the audit trail to S3; it is kept locally");
            }
        }
    }

    async fn publish_audit_day(&self, l3: &crate::S3Tier, day: NaiveDate) -> Result<(), TierError> {
        let start = day.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
        let lines: String = self
            .inner
            .audit
            .since(start)?
            .into_iter()
            .filter(|r| r.at.date_naive() == day)
            .filter_map(|r| serde_json::to_string(&r).ok())
            .map(|line| line + "\n")
            .collect();
        let path = l3.layout().audit_path(l3.node_id(), day);
        l3.put_object(&path, lines.into_bytes(), "application/x-ndjson")
            .await
    }
}
