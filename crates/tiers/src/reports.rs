//! Reports from a cache: this node's rollups, or every node's from S3, together with what only
//! the tiers know (storage, cold entries, TTLs).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use strata_analytics::sketch::merge_hot_keys;
use strata_analytics::{
    Analytics, ColdEntries, ColdModel, DailyRollups, HourRow, PeriodMetrics, Report, ReportExtras,
    ReportOptions, TierStorage,
};

use crate::cache::TieredCache;
use crate::error::TierError;

/// Where a report's rollups come from, and what else it looks at.
#[derive(Debug, Clone)]
pub struct ReportSource {
    /// Merge every node's daily rollups from S3 (after publishing this node's).
    pub all_nodes: bool,
    /// Entries never hit and older than this are reported as cold (a scan of the disk tier);
    /// `None` skips the scan.
    pub cold_after: Option<Duration>,
}

impl Default for ReportSource {
    fn default() -> Self {
        ReportSource {
            all_nodes: false,
            cold_after: Some(Duration::from_secs(7 * 86_400)),
        }
    }
}

/// What publishing daily rollups to S3 did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Daily documents written.
    pub documents: u64,
    /// Documents that could not be written (the days stay marked for the next try).
    pub failed: u64,
}

impl TieredCache {
    /// The analytics recorder; `None` when recording is off (or its store failed to open).
    pub fn analytics(&self) -> Option<&Analytics> {
        self.inner.analytics.as_ref()
    }

    /// The seeds' request metrics API: records one upstream call (never blocks; nothing
    /// happens when recording is off).
    pub fn record_request_metrics(
        &self,
        request_id: &str,
        provider: &str,
        response_time_ms: u64,
        cost_usd: f64,
    ) {
        if let Some(analytics) = &self.inner.analytics {
            analytics.record_request_metrics(request_id, provider, response_time_ms, cost_usd);
        }
    }

    /// The seeds' request metrics API: the upstream calls recorded over the last `hours` hours.
    pub fn metrics_for_period(&self, hours: u64) -> Result<PeriodMetrics, TierError> {
        match &self.inner.analytics {
            Some(analytics) => Ok(analytics.metrics_for_period(hours)?),
            None => Err(TierError::Invalid("analytics recording is off".into())),
        }
    }

    /// Storage used per tier on this node (L3: the objects this node's index knows).
    pub fn storage(&self) -> Vec<TierStorage> {
        let (l1, l2) = self.usage();
        let mut out = vec![TierStorage {
            tier: "l1".into(),
            entries: l1.entries,
            bytes: l1.bytes,
            capacity: l1.capacity,
        }];
        if let Some(l2) = l2 {
            out.push(TierStorage {
                tier: "l2".into(),
                entries: l2.entries,
                bytes: l2.bytes,
                capacity: l2.capacity,
            });
        }
        if let Some(l3) = &self.inner.l3 {
            let known = l3.known();
            out.push(TierStorage {
                tier: "l3".into(),
                entries: known.entries,
                bytes: known.bytes,
                capacity: None,
            });
        }
        out
    }

    /// Entries on the disk tier never served as a hit and older than `older_than`, and the bytes
    /// they hold (a scan of the disk tier; `None` without one or without analytics). A hit is
    /// one the disk tier wrote in the copy's record or one the analytics marked (L1, L3).
    pub fn cold_entries(&self, older_than: Duration) -> Result<Option<ColdEntries>, TierError> {
        let (Some(disk), Some(analytics)) = (&self.inner.disk, &self.inner.analytics) else {
            return Ok(None);
        };
        analytics.flush()?;
        // Older than any date (`cold_after = "1000000y"`): nothing is cold.
        let cutoff = chrono::Duration::from_std(older_than)
            .ok()
            .and_then(|d| Utc::now().checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        // A disk-tier hit is kept in the copy's record (its last hit), not among the hit marks:
        // as the marks are, it counts for `analytics_retention` after it was made.
        let kept_since = self.inner.analytics_retention.map_or(0, |keep| {
            let now = Utc::now().timestamp().max(0).unsigned_abs();
            now.saturating_sub(keep.as_secs())
        });
        let mut by_model: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut failed = None;
        disk.sweep(|id, decoded, bytes, last_hit| {
            if let Ok(entry) = decoded
                && entry.created_at < cutoff
            {
                let hit_on_disk = last_hit != 0 && u64::from(last_hit) >= kept_since;
                match if hit_on_disk {
                    Ok(true)
                } else {
                    analytics.was_hit(id)
                } {
                    Ok(false) => {
                        let slot = by_model.entry(entry.model).or_default();
                        slot.0 += 1;
                        slot.1 += bytes;
                    }
                    Ok(true) => {}
                    Err(e) => failed = Some(e),
                }
            }
            false
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        let mut models: Vec<ColdModel> = by_model
            .into_iter()
            .map(|(model, (entries, bytes))| ColdModel {
                model,
                entries,
                bytes,
            })
            .collect();
        models.sort_by_key(|m| std::cmp::Reverse(m.bytes));
        Ok(Some(ColdEntries {
            older_than_secs: older_than.as_secs(),
            entries: models.iter().map(|m| m.entries).sum(),
            bytes: models.iter().map(|m| m.bytes).sum(),
            by_model: models,
        }))
    }

    /// Writes this node's daily rollups to `{prefix}/analytics/{node_id}/{YYYY-MM-DD}.json` for
    /// every day recorded since the last publication (and for `also`). Nothing without S3.
    pub async fn publish_analytics(&self, also: &[NaiveDate]) -> Result<Published, TierError> {
        let (Some(l3), Some(analytics)) = (&self.inner.l3, &self.inner.analytics) else {
            return Ok(Published::default());
        };
        let mut days: BTreeSet<NaiveDate> = analytics.take_dirty_days().into_iter().collect();
        days.extend(also.iter().copied());
        let mut published = Published::default();
        let mut last_error = None;
        for day in days {
            let doc = analytics.daily(l3.node_id(), day)?;
            let body = serde_json::to_vec_pretty(&doc)
                .map_err(|e| TierError::Storage(format!("analytics document: {e}")))?;
            let path = l3.layout().analytics_path(l3.node_id(), day);
            match l3.put_object(&path, body, "application/json").await {
                Ok(()) => published.documents += 1,
                Err(e) => {
                    analytics.mark_dirty(day);
                    published.failed += 1;
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            Some(e) if published.documents == 0 => Err(e),
            _ => Ok(published),
        }
    }

    /// Every node's daily documents from S3 for the days overlapping `[since, until)`.
    pub async fn node_rollups(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<DailyRollups>, TierError> {
        let Some(l3) = &self.inner.l3 else {
            return Err(TierError::Invalid(
                "reports across nodes need the S3 tier ([s3] enabled = true)".into(),
            ));
        };
        let layout = l3.layout();
        let first = since.map(|t| t.date_naive());
        let last = until.map(|t| (t - chrono::Duration::nanoseconds(1)).date_naive());
        let paths: Vec<String> = l3
            .list(&layout.analytics_root())
            .await?
            .into_iter()
            .filter(|listed| {
                layout
                    .parse_analytics_path(&listed.key)
                    .is_some_and(|(_, day)| {
                        first.is_none_or(|f| day >= f) && last.is_none_or(|l| day <= l)
                    })
            })
            .map(|listed| listed.key)
            .collect();
        let fetched = l3
            .for_each_concurrent(paths, |path| async move {
                let bytes = l3.get_object(&path).await;
                (path, bytes)
            })
            .await;
        let mut docs = Vec::new();
        for (path, bytes) in fetched {
            let Some(bytes) = bytes? else { continue };
            match serde_json::from_slice::<DailyRollups>(&bytes) {
                Ok(doc) => docs.push(doc),
                Err(e) => {
                    tracing::warn!(%path, error = %e, "skipping an unreadable analytics document");
                }
            }
        }
        docs.sort_by(|a, b| (&a.node_id, a.date).cmp(&(&b.node_id, b.date)));
        Ok(docs)
    }

    /// The report over this node's rollups, or every node's (`source.all_nodes`).
    pub async fn report(
        &self,
        options: &ReportOptions,
        source: &ReportSource,
    ) -> Result<Report, TierError> {
        let Some(analytics) = &self.inner.analytics else {
            return Err(TierError::Invalid("analytics recording is off".into()));
        };
        let local = analytics.rows(None, None)?;
        let mut extras = ReportExtras {
            storage: self.storage(),
            cold: match source.cold_after {
                Some(after) => self.cold_entries(after)?,
                None => None,
            },
            default_ttl_secs: self.inner.ttl.default.map(|d| d.as_secs()),
            model_ttl_secs: self
                .inner
                .ttl
                .per_model
                .iter()
                .map(|(model, ttl)| (model.clone(), ttl.as_secs()))
                .collect(),
            ..Default::default()
        };
        let rows: Vec<HourRow> = if source.all_nodes {
            let days: BTreeSet<NaiveDate> = local.iter().map(|row| row.key.day()).collect();
            let days: Vec<NaiveDate> = days.into_iter().collect();
            self.publish_analytics(&days).await?;
            let docs = self.node_rollups(options.since, options.until).await?;
            let mut latest: BTreeMap<&str, &DailyRollups> = BTreeMap::new();
            for doc in &docs {
                let slot = latest.entry(doc.node_id.as_str()).or_insert(doc);
                if doc.written_at > slot.written_at {
                    *slot = doc;
                }
            }
            extras.nodes = latest.keys().map(|n| (*n).to_owned()).collect();
            extras.dropped_events = latest
                .values()
                .fold(0u64, |sum, d| sum.saturating_add(d.dropped));
            extras.hot_keys = merge_hot_keys(
                latest.values().map(|d| d.hot_keys.clone()),
                options.top.max(1),
            );
            docs.into_iter().flat_map(|doc| doc.rows).collect()
        } else {
            extras.hot_keys = analytics.hot_keys(options.top.max(1));
            extras.dropped_events = analytics.dropped_total();
            local
        };
        Ok(Report::build(&rows, options, extras))
    }
}

/// Publishes this node's daily rollups to S3 every `every` (only inside a tokio runtime).
pub(crate) fn spawn_publisher(cache: &TieredCache, every: Duration) {
    let weak = Arc::downgrade(&cache.inner);
    let every = every.max(Duration::from_secs(1));
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no async runtime: analytics reach S3 on flush() only");
        return;
    };
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(inner) = weak.upgrade() else { return };
            let cache = TieredCache { inner, actor: None };
            if let Err(e) = cache.publish_analytics(&[]).await {
                tracing::debug!(error = %e, "publishing analytics failed; will retry");
            }
        }
    });
}
