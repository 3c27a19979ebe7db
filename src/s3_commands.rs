//! `strata ls`, `strata warm` and `strata index rebuild`: the commands that work on the bucket.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use crate::output::{errln, outln};
use anyhow::{Context, Result, bail};
use chrono::{NaiveDate, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use strata::Config;
use strata::core::ModelSlug;
use strata::tiers::S3Tier;

use crate::{close, thousands};

/// The cache of `config`, which must have S3 enabled, and its S3 tier.
pub async fn open(config: &Config) -> Result<(strata::TieredCache, S3Tier)> {
    if !config.s3.enabled {
        bail!(
            "S3 is not enabled: set [s3] enabled = true and a bucket in the configuration \
             (see config/minio.toml)"
        );
    }
    let cache = config.open_cache().await?;
    let s3 = cache.l3().cloned().context("the S3 tier did not open")?;
    Ok((cache, s3))
}

fn spinner(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{spinner}} {what} [{{elapsed_precise}}] {{pos}} objects ({{per_sec}})"
    )) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// `strata ls [--model M] [--date YYYY-MM-DD] [--json]`.
pub async fn ls(
    config: &Config,
    model: Option<&str>,
    date: Option<NaiveDate>,
    json: bool,
) -> Result<ExitCode> {
    let (cache, s3) = open(config).await?;
    let slug = model.map(|m| ModelSlug::new(&m.to_lowercase()));
    let layout = s3.layout().clone();
    let prefix = layout.listing_prefix(slug.as_ref().map(ModelSlug::as_str), date);
    let bar = spinner("listing");
    let (mut entries, mut bytes) = (0u64, 0u64);
    let mut failed = None;
    let listed = s3
        .list_pages(&prefix, |page| {
            bar.inc(page.len() as u64);
            for object in page {
                let Some(parsed) = layout.parse_entry_path(&object.key) else {
                    continue;
                };
                if date.is_some_and(|d| parsed.hour.date_naive() != d) {
                    continue;
                }
                entries += 1;
                bytes += object.size;
                let written = object.last_modified.unwrap_or(parsed.hour);
                let line = if json {
                    serde_json::json!({
                        "key": format!("{}_{}", parsed.slug, parsed.cache_id),
                        "model": parsed.slug,
                        "path": object.key,
                        "size": object.size,
                        "last_modified": written,
                    })
                    .to_string()
                } else {
                    format!(
                        "{}  {:>9}  {}",
                        written.format("%Y-%m-%d %H:%M"),
                        object.size,
                        object.key
                    )
                };
                // A closed pipe (`strata ls | head`) ends the output, not the command.
                if let Err(e) = outln!("{line}") {
                    failed.get_or_insert(e);
                }
            }
        })
        .await;
    bar.finish_and_clear();
    close(cache).await;
    let listed = listed.with_context(|| format!("listing s3://{}/{prefix}", s3.bucket()))?;
    if let Some(e) = failed {
        bail!("writing the listing: {e}");
    }
    if !json {
        errln!(
            "{} entries, {:.1} MiB ({} objects listed under s3://{}/{prefix})",
            thousands(entries),
            bytes as f64 / (1 << 20) as f64,
            thousands(listed),
            s3.bucket()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata warm [--model M] [--since DUR]`.
pub async fn warm(
    config: &Config,
    model: Option<&str>,
    since: Option<Duration>,
) -> Result<ExitCode> {
    let (cache, s3) = open(config).await?;
    let disk = cache.disk().cloned().context("warm needs the disk tier")?;
    let slug = model.map(|m| ModelSlug::new(&m.to_lowercase()));
    let since = since
        .map(|d| {
            chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| Utc::now().checked_sub_signed(d))
        })
        .map(|at| at.context("--since is too long"))
        .transpose()?;
    // What other nodes invalidated since this one last looked is not warmed.
    if let Err(e) = cache.refresh_epochs().await {
        errln!(
            "strata: warning: invalidations from other nodes unknown ({e}); warming with this node's"
        );
    }
    let epochs = cache.epochs();
    let bar = spinner("warming");
    // Ctrl-C stops after the page in hand; a second run passes over what this one stored.
    let (stop, watcher) = crate::stop_on_ctrl_c();
    let report = s3
        .warm_until(
            &disk,
            slug.as_ref().map(ModelSlug::as_str),
            since,
            |entry| epochs.admits(entry),
            |n| bar.set_position(n),
            || stop.load(std::sync::atomic::Ordering::Relaxed),
        )
        .await;
    watcher.abort();
    bar.finish_and_clear();
    close(cache).await;
    let report = report.context("warming from S3")?;
    outln!(
        "warmed {} entries into {} ({} matched, {} held already, {} expired, {} invalidated, {} failed)",
        thousands(report.warmed),
        config.disk.path.display(),
        thousands(report.matched),
        thousands(report.held),
        thousands(report.expired),
        thousands(report.invalidated),
        thousands(report.failed)
    )?;
    if report.stopped {
        errln!("strata: warm stopped before the end of the listing; run it again to go on");
        return Ok(ExitCode::from(crate::EXIT_INTERRUPTED));
    }
    Ok(if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `strata index rebuild`.
pub async fn rebuild_index(config: &Config) -> Result<ExitCode> {
    let (cache, s3) = open(config).await?;
    let bar = spinner("listing");
    // Ctrl-C stops after the page in hand; the next rebuild goes on from there.
    let (stop, watcher) = crate::stop_on_ctrl_c();
    let report = s3
        .rebuild_index_until(
            |n| bar.set_position(n),
            || stop.load(std::sync::atomic::Ordering::Relaxed),
        )
        .await;
    watcher.abort();
    bar.finish_and_clear();
    close(cache).await;
    let report = report.context("rebuilding the index")?;
    outln!(
        "indexed {} entries ({} objects listed); wrote {} missing pointers ({} failed)",
        thousands(report.indexed),
        thousands(report.listed),
        thousands(report.pointers_written),
        thousands(report.failed)
    )?;
    if report.stopped {
        errln!(
            "strata: index rebuild stopped before the end of the listing; run it again to go on"
        );
        return Ok(ExitCode::from(crate::EXIT_INTERRUPTED));
    }
    Ok(if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `strata s3 outbox`: the upload queue and the parked uploads.
pub async fn outbox(config: &Config, json: bool) -> Result<ExitCode> {
    let (cache, s3) = open(config).await?;
    let measured = s3.bound_outbox();
    let parked = s3.parked();
    let stats = s3.stats();
    close(cache).await;
    measured.context("measuring the upload queue")?;
    let parked = parked.context("listing the parked uploads")?;
    if json {
        let parked: Vec<_> = parked
            .iter()
            .map(|(digest, bytes)| serde_json::json!({"cache_id": hex(digest), "bytes": bytes}))
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "pending": stats.pending,
                "bytes": stats.outbox_bytes,
                "capacity": config.s3.outbox_capacity.as_u64(),
                "dropped_for_space": stats.dropped_for_space,
                "parked": parked,
            }))?
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "upload queue: {} waiting, {} of {} ({} dropped for space this run)",
        thousands(stats.pending),
        bytesize::ByteSize::b(stats.outbox_bytes),
        config.s3.outbox_capacity,
        thousands(stats.dropped_for_space)
    )?;
    if parked.is_empty() {
        outln!("no parked uploads")?;
    } else {
        outln!(
            "{} parked (S3 rejected them {} times; `strata s3 outbox retry` or `drop --yes`):",
            thousands(parked.len() as u64),
            strata::tiers::s3::PARK_AFTER
        )?;
        for (digest, bytes) in &parked {
            outln!("  {}  {}", hex(digest), bytesize::ByteSize::b(*bytes))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata s3 outbox retry`.
pub async fn outbox_retry(config: &Config) -> Result<ExitCode> {
    let (cache, s3) = open(config).await?;
    let moved = s3.retry_parked();
    close(cache).await;
    outln!(
        "{} parked uploads back in the queue",
        thousands(moved.context("requeueing")?)
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `strata s3 outbox drop --yes`.
pub async fn outbox_drop(config: &Config, yes: bool) -> Result<ExitCode> {
    if !yes {
        bail!(
            "drop discards the parked uploads (their entries stay local); run it again with --yes"
        );
    }
    let (cache, s3) = open(config).await?;
    let dropped = s3.drop_parked();
    close(cache).await;
    outln!(
        "{} parked uploads dropped",
        thousands(dropped.context("dropping")?)
    )?;
    Ok(ExitCode::SUCCESS)
}

fn hex(digest: &[u8; 16]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
