//! `strata report`: what the cache saved, where, and what to change.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::output::out;
use anyhow::{Context, Result, bail};
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, ValueEnum};
use strata::Config;
use strata::analytics::render;
use strata::analytics::{GroupBy, Report, ReportExtras, ReportOptions};
use strata::tiers::ReportSource;

/// Output formats of a report.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// A table for terminals.
    Table,
    /// One JSON object.
    Json,
    /// One CSV row per group.
    Csv,
    /// One self-contained HTML page with charts.
    Html,
}

/// Arguments of `strata report`.
#[derive(Args)]
pub struct ReportArgs {
    /// Only the last DUR (`24h`, `7d`); default: everything recorded.
    #[arg(long, value_name = "DUR")]
    since: Option<humantime::Duration>,
    /// Only before TIME: RFC 3339 (`2026-11-24T12:00:00Z`), a day (`2026-11-24`, up to its end),
    /// or a duration ago (`2h`).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Group the table and CSV rows by model, provider, day, hour, or API route (the
    /// response cache's routes, LLM lookups left out of the rows).
    #[arg(
        long,
        default_value = "model",
        value_name = "model|provider|day|hour|route"
    )]
    by: GroupBy,
    /// How many hot keys to list.
    #[arg(long, default_value_t = 10, value_name = "N")]
    top: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Write to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Merge every node's rollups from S3 (this node's are published first).
    #[arg(long)]
    all_nodes: bool,
}

fn parse_until(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let next = day
            .succ_opt()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .context("--until: day out of range")?;
        return Ok(next.and_utc());
    }
    if let Ok(ago) = humantime::parse_duration(text) {
        return chrono::Duration::from_std(ago)
            .ok()
            .and_then(|ago| now.checked_sub_signed(ago))
            .context("--until: duration too long");
    }
    bail!("--until {text}: expected RFC 3339 time, YYYY-MM-DD or a duration such as 2h")
}

/// The options of a report over `args`.
fn options(args: &ReportArgs) -> Result<ReportOptions> {
    let now = Utc::now();
    let since = match args.since {
        Some(d) => Some(
            chrono::Duration::from_std(*d)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                .context("--since: too long")?,
        ),
        None => None,
    };
    let until = args
        .until
        .as_deref()
        .map(|t| parse_until(t, now))
        .transpose()?;
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        bail!("--since is not before --until: the period is empty");
    }
    Ok(ReportOptions {
        since,
        until,
        group_by: args.by,
        top: args.top,
    })
}

/// Renders `report` in `format` (tables at most `width` columns wide).
pub fn rendered(report: &Report, format: Format, width: u16) -> Result<String> {
    Ok(match format {
        Format::Table => render::table(report, width),
        Format::Json => render::json(report)? + "\n",
        Format::Csv => render::csv(report)?,
        Format::Html => render::html(report)?,
    })
}

/// `strata report`.
pub async fn run(config: &Config, args: ReportArgs) -> Result<ExitCode> {
    let options = options(&args)?;
    if args.all_nodes && !config.s3.enabled {
        bail!("--all-nodes merges rollups from S3: enable [s3] in the configuration");
    }
    if !config.analytics.enabled {
        bail!("analytics are off ([analytics] enabled = false): nothing was recorded");
    }
    let cache = config.open_cache().await?;
    let source = ReportSource {
        all_nodes: args.all_nodes,
        cold_after: Some(config.analytics.cold_after),
    };
    let report = cache.report(&options, &source).await;
    crate::close(cache).await;
    let report = report?;
    let text = rendered(&report, args.format, render::terminal_width())?;
    match &args.out {
        // `-` is standard output, as for every other file argument.
        Some(path) if path.as_os_str() != "-" => std::fs::write(path, text)
            .with_context(|| format!("writing the report to {}", path.display()))?,
        _ => out!("{text}")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The report of this process's lookups (what `replay` prints at the end).
pub fn session_table(cache: &strata::TieredCache, top: usize) -> Option<String> {
    let analytics = cache.analytics()?;
    let rows = analytics.session_rows();
    let report = Report::build(
        &rows,
        &ReportOptions {
            top,
            ..Default::default()
        },
        ReportExtras {
            hot_keys: analytics.hot_keys(top),
            dropped_events: analytics.dropped(),
            ..Default::default()
        },
    );
    Some(render::table(&report, render::terminal_width()))
}
