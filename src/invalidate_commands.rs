//! `strata invalidate`, `strata clear`, `strata gc` and `strata s3 lifecycle`: taking answers
//! back and freeing what they held.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use crate::output::{errln, outln};
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use strata::Config;
use strata::core::Selector;
use strata::tiers::{GcReport, Invalidation, Progress};

use crate::{close, thousands};

/// Which entries `strata invalidate` takes back: exactly one selector.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct SelectorArgs {
    /// One entry, by display key (`gpt-4o_0123…`) or cache id (32 hex digits).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Entries whose display key matches a glob (`gpt-4o_*`).
    #[arg(long, value_name = "GLOB")]
    pattern: Option<String>,
    /// Entries in a user's scope.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Entries in a session's scope.
    #[arg(long, value_name = "SESSION")]
    session: Option<String>,
    /// Entries in a namespace's scope.
    #[arg(long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Entries of a model.
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
    /// Entries tagged with this tag or one below it (`jobs` covers `jobs:42`).
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,
    /// Entries created longer ago than this (`12h`, `7d`).
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
}

impl SelectorArgs {
    fn selector(&self) -> Option<Selector> {
        // An empty name selects nothing: it is treated as not given (and refused if alone).
        let s = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
        if let Some(k) = s(&self.key) {
            return Some(Selector::Key(k));
        }
        s(&self.user)
            .map(Selector::User)
            .or_else(|| s(&self.session).map(Selector::Session))
            .or_else(|| s(&self.namespace).map(Selector::Namespace))
            .or_else(|| s(&self.model).map(Selector::Model))
            .or_else(|| s(&self.tag).map(Selector::Tag))
            .or_else(|| self.older_than.map(Selector::OlderThan))
    }
}

fn bar(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) =
        ProgressStyle::with_template(&format!("{{spinner}} {what} [{{elapsed_precise}}] {{msg}}"))
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn show(bar: &ProgressBar, p: Progress) {
    match p {
        Progress::Listed(n) => bar.set_message(format!("{} objects listed", thousands(n))),
        Progress::Checked(n, listed) => bar.set_message(format!(
            "{} entries checked, {} objects listed",
            thousands(n),
            thousands(listed)
        )),
        Progress::Deleted(n, _) => bar.set_message(format!("{} objects deleted", thousands(n))),
    }
}

fn report(done: &Invalidation, json: bool) -> Result<()> {
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "invalidated": done.what,
                "affected": done.affected,
                "exact": done.exact,
                "published": done.published,
            })
        )?;
        return Ok(());
    }
    let count = if done.exact {
        format!("{} entries", thousands(done.affected))
    } else {
        format!(
            "about {} entries (an estimate: counted on this node's tiers)",
            thousands(done.affected)
        )
    };
    outln!("invalidated {}: {count}", done.what)?;
    if !done.published {
        errln!(
            "note: not published to S3 (disabled or unreachable); with S3 the next refresh publishes it"
        );
    }
    Ok(())
}

/// `strata invalidate SELECTOR [--json]`.
pub async fn invalidate(config: &Config, args: &SelectorArgs, json: bool) -> Result<ExitCode> {
    let cache = config.open_cache().await?;
    let done = if let Some(pattern) = &args.pattern {
        let bar = bar("invalidating");
        let done = cache.invalidate_pattern(pattern, |p| show(&bar, p)).await;
        bar.finish_and_clear();
        done
    } else {
        let selector = args
            .selector()
            .context("no selector given (an empty one selects nothing)")?;
        let estimate = match selector {
            Selector::Key(_) => Ok(0),
            _ => cache.estimate(&selector).await,
        };
        cache.invalidate(&selector).await.and_then(|mut done| {
            if !done.exact {
                done.affected = estimate?;
            }
            Ok(done)
        })
    };
    close(cache).await;
    report(&done.context("invalidating")?, json)?;
    Ok(ExitCode::SUCCESS)
}

/// `strata clear --yes`: everything, on every tier and node; then a gc of the bucket.
pub async fn clear(config: &Config, yes: bool) -> Result<ExitCode> {
    if !yes {
        bail!("clear invalidates every entry on every node; run it again with --yes to confirm");
    }
    let cache = config.open_cache().await?;
    let has_s3 = cache.l3().is_some();
    let done = cache.clear().await;
    let gc = match (&done, cache.l3()) {
        (Ok(_), Some(_)) => {
            let bar = bar("deleting S3 objects");
            let gc = cache.gc(false, |p| show(&bar, p)).await;
            bar.finish_and_clear();
            Some(gc)
        }
        _ => None,
    };
    close(cache).await;
    let done = done.context("clearing")?;
    let others = match (has_s3, done.published) {
        (false, _) => "without S3 there are no other nodes",
        (true, true) => "every node stops serving the rest within its refresh interval",
        (true, false) => {
            "S3 did not take it (unreachable?): other nodes learn of it once this node reaches S3"
        }
    };
    outln!(
        "cleared: {} entries removed on this node; {others}",
        thousands(done.affected)
    )?;
    if let Some(gc) = gc {
        print_gc(&gc.context("deleting the S3 objects")?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn print_gc(r: &GcReport) -> Result<()> {
    let verb = if r.dry_run { "would free" } else { "freed" };
    outln!(
        "L2: {verb} {} of {} entries ({})",
        thousands(r.l2_removed),
        thousands(r.l2_seen),
        mib(r.l2_bytes)
    )?;
    if r.s3_listed > 0 || r.s3_objects > 0 {
        outln!(
            "S3: {verb} {} objects ({} dead entries with their metadata and pointers, {}) of {} listed",
            thousands(r.s3_objects),
            thousands(r.s3_entries),
            mib(r.s3_bytes),
            thousands(r.s3_listed)
        )?;
    }
    if r.stale_objects > 0 {
        outln!(
            "{} {} objects of nodes stopped long ago (epoch copies, old analytics)",
            if r.dry_run { "would delete" } else { "deleted" },
            thousands(r.stale_objects)
        )?;
    }
    if r.analytics_pruned > 0 {
        outln!(
            "pruned {} analytics records past [analytics] retention",
            thousands(r.analytics_pruned)
        )?;
    }
    if r.tombstones_pruned > 0 {
        outln!(
            "pruned {} key tombstones older than the longest TTL",
            thousands(r.tombstones_pruned)
        )?;
    }
    Ok(())
}

/// `strata gc [--dry-run] [--json]`.
pub async fn gc(config: &Config, dry_run: bool, json: bool) -> Result<ExitCode> {
    let cache = config.open_cache().await?;
    // Learn other nodes' invalidations first, so their entries go too.
    if cache.l3().is_some()
        && let Err(e) = cache.refresh_epochs().await
    {
        errln!("strata: warning: cannot read the shared epochs: {e}");
    }
    let bar = bar(if dry_run { "gc (dry run)" } else { "gc" });
    // Ctrl-C stops after the page in hand; the next gc goes on from there.
    let (stop, watcher) = crate::stop_on_ctrl_c();
    let r = cache
        .gc_until(
            dry_run,
            |p| show(&bar, p),
            || stop.load(std::sync::atomic::Ordering::Relaxed),
        )
        .await;
    watcher.abort();
    bar.finish_and_clear();
    close(cache).await;
    let r = r.context("garbage collection")?;
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "dry_run": r.dry_run,
                "l2": {"seen": r.l2_seen, "removed": r.l2_removed, "bytes": r.l2_bytes},
                "s3": {"listed": r.s3_listed, "entries": r.s3_entries, "objects": r.s3_objects, "bytes": r.s3_bytes},
                "stopped": r.stopped,
            })
        )?;
    } else {
        print_gc(&r)?;
    }
    if r.stopped {
        errln!("strata: gc stopped before the end of the bucket's listing; run it again to go on");
        return Ok(ExitCode::from(crate::EXIT_INTERRUPTED));
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata s3 lifecycle [--apply]`.
pub async fn lifecycle(config: &Config, apply: bool) -> Result<ExitCode> {
    let Some(longest) = config.longest_ttl() else {
        bail!(
            "some entries never expire (ttl.default = \"never\"): no lifecycle rule can match \
             them; set a TTL first"
        );
    };
    // S3 counts whole days; an entry must never vanish before its TTL ends.
    let days = i32::try_from(longest.as_secs().div_ceil(86_400).max(1))
        .context("the longest TTL is too long for a lifecycle rule")?;
    let (cache, s3) = crate::s3_commands::open(config).await?;
    let rules = s3.lifecycle_rules(days)?;
    outln!(
        "lifecycle rules for s3://{} (longest TTL {} → {days} days):",
        s3.bucket(),
        humantime::format_duration(longest)
    )?;
    for rule in &rules {
        let prefix = rule.filter().and_then(|f| f.prefix()).unwrap_or_default();
        outln!(
            "  {}: expire objects under {prefix} {days} days after they were written",
            rule.id().unwrap_or_default()
        )?;
    }
    // The configuration is all this command knows; an entry can carry a TTL of its own.
    outln!(
        "  note: entries stored with a longer TTL of their own (`put --ttl`, `Completion::ttl`) \
         are deleted from S3 too when the rule fires"
    )?;
    if !apply {
        outln!("(dry run: run with --apply to install them)")?;
        close(cache).await;
        return Ok(ExitCode::SUCCESS);
    }
    let applied = s3.apply_lifecycle(rules).await;
    close(cache).await;
    applied.context("installing the lifecycle rules")?;
    outln!("installed")?;
    Ok(ExitCode::SUCCESS)
}

/// `strata epochs`: the invalidation epochs in force on this node (after a refresh from S3).
pub async fn epochs(config: &Config, json: bool) -> Result<ExitCode> {
    let cache = config.open_cache().await?;
    if let Err(e) = cache.refresh_epochs().await {
        errln!("strata: warning: the bucket's epochs could not be read ({e}); showing this node's");
    }
    let epochs = cache.epochs().snapshot();
    close(cache).await;
    if json {
        outln!("{}", serde_json::to_string_pretty(&*epochs)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let when = |ms: u64| {
        chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
            .map_or_else(|| format!("{ms} (not a date)"), |t| t.to_rfc3339())
    };
    if epochs.is_empty() {
        outln!("no invalidation in force")?;
        return Ok(ExitCode::SUCCESS);
    }
    if epochs.all > 0 {
        outln!("all          bumped {}", when(epochs.all))?;
    }
    if epochs.not_before_ms > 0 {
        outln!(
            "older-than   entries created before {}",
            when(u64::try_from(epochs.not_before_ms).unwrap_or(0))
        )?;
    }
    for (kind, map) in [
        ("model", &epochs.model),
        ("user", &epochs.user),
        ("session", &epochs.session),
        ("namespace", &epochs.namespace),
        ("tag", &epochs.tag),
        ("key", &epochs.key),
    ] {
        for (name, &value) in map {
            outln!("{kind:<12} {name}  bumped {}", when(value))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata epochs reset --yes`: drops epochs beyond every clock, here and in the bucket.
pub async fn reset_epochs(config: &Config, yes: bool) -> Result<ExitCode> {
    if !yes {
        bail!(
            "epochs reset rewrites this node's epochs and the bucket's shared document; run it again with --yes to confirm"
        );
    }
    let cache = config.open_cache().await?;
    let has_s3 = cache.l3().is_some();
    let dropped = cache.reset_epochs().await;
    close(cache).await;
    let dropped = dropped.context("resetting the epochs")?;
    if dropped.is_empty() {
        outln!("no epoch beyond the clock on this node; the epochs in force were republished")?;
    } else {
        outln!(
            "dropped {} epoch(s) from the future: {}",
            dropped.len(),
            dropped.join(", ")
        )?;
    }
    if has_s3 {
        outln!("wrote control/epochs.json and this node's copy from the epochs in force")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata audit [--since DUR] [--json]`.
pub async fn audit(config: &Config, since: Option<Duration>, json: bool) -> Result<ExitCode> {
    let since = since
        .map(|d| {
            chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
                .context("--since is too long")
        })
        .transpose()?;
    let cache = config.open_cache().await?;
    let trail = cache.audit_trail(since);
    close(cache).await;
    let trail = trail.context("reading the audit trail")?;
    for record in &trail {
        if json {
            outln!("{}", serde_json::to_string(record)?)?;
        } else {
            outln!(
                "{}  {:<12} {:<40} {:>8}  {} on {}",
                record.at.format("%Y-%m-%d %H:%M:%S"),
                record.action,
                record.selector.as_deref().unwrap_or("-"),
                record.affected.map_or("-".to_string(), |n| n.to_string()),
                record.who,
                record.node
            )?;
        }
    }
    if trail.is_empty() && !json {
        outln!(
            "nothing in the audit trail{}",
            if since.is_some() {
                " in that period"
            } else {
                ""
            }
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata rekey`.
pub async fn rekey(config: &Config) -> Result<ExitCode> {
    // Entries written before the key existed are read too (this node's own disk).
    let cache = config.open_cache().await?;
    let done = cache.rekey().await;
    close(cache).await;
    let (seen, rewritten) = done.context("rekeying")?;
    outln!(
        "rewrote {} of {} entries under the current key",
        thousands(rewritten),
        thousands(seen)
    )?;
    Ok(ExitCode::SUCCESS)
}
