//! The `strata` command: replay a workload through the cache, look entries up, store them, and
//! explain keys.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use strata::analytics::render::{human_duration, thousands};
use strata::replay::{self, ReplayOptions, ReplayReport, ScopeBy};
use strata::{Completion, Config, Profile, Scope, Stats};

mod invalidate_commands;
mod output;
use output::{errln, out, outln};
mod report_command;
mod s3_commands;
mod signals;

#[derive(Parser)]
#[command(name = "strata", version, about = "A tiered cache for LLM responses", long_about = None)]
struct Cli {
    /// Configuration file (TOML), merged over the embedded default.
    #[arg(long, global = true, env = "STRATA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Normalization profile, overriding the configuration.
    #[arg(long, global = true, value_name = "strict|standard|aggressive")]
    profile: Option<Profile>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay an exchange log through the cache and report what caching saved.
    Replay(ReplayArgs),
    /// What the cache saved, where, and what to change: a table, JSON, CSV or an HTML page.
    Report(report_command::ReportArgs),
    /// Lifetime statistics of the cache and the size of its tiers.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the cached response of a request (exit code 1 on a miss).
    Get {
        /// The request (JSON file, `-` for stdin).
        #[arg(long, value_name = "FILE")]
        request: PathBuf,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Print the whole entry as JSON, not only the response.
        #[arg(long)]
        entry: bool,
    },
    /// Store a response for a request.
    Put {
        /// The request (JSON file, `-` for stdin).
        #[arg(long, value_name = "FILE")]
        request: PathBuf,
        /// The response (JSON file).
        #[arg(long, value_name = "FILE")]
        response: PathBuf,
        /// Who served it.
        #[arg(long, default_value = "")]
        provider: String,
        /// What it cost in USD (priced from usage when absent).
        #[arg(long, value_parser = usd)]
        cost_usd: Option<f64>,
        /// How long it took.
        #[arg(long)]
        latency_ms: Option<u64>,
        /// A label (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// TTL of this entry (`90s`, `12h`, `7d`, `never`); the configured TTL when absent.
        #[arg(long, value_parser = ttl)]
        ttl: Option<Duration>,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List the entries stored in S3 (path, size, when written).
    Ls {
        /// Only this model's entries.
        #[arg(long, value_name = "MODEL")]
        model: Option<String>,
        /// Only entries written on this day (UTC).
        #[arg(long, value_name = "YYYY-MM-DD")]
        date: Option<chrono::NaiveDate>,
        /// Print JSON Lines.
        #[arg(long)]
        json: bool,
    },
    /// Pull entries from S3 into the local disk tier.
    Warm {
        /// Only this model's entries.
        #[arg(long, value_name = "MODEL")]
        model: Option<String>,
        /// Only entries written within this duration (`12h`, `7d`).
        #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
        since: Option<Duration>,
    },
    /// The local index of the S3 objects this node knows.
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// Take cached answers back, on every tier and every node sharing the bucket.
    Invalidate {
        #[command(flatten)]
        selector: invalidate_commands::SelectorArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Invalidate everything, on every tier and node, and delete the bucket's entries.
    Clear {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
    /// Delete expired and invalidated entries from the disk tier and from S3.
    Gc {
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The invalidation epochs in force (`reset --yes` repairs epochs poisoned with values
    /// from the future, here and in the bucket).
    Epochs {
        #[command(subcommand)]
        command: Option<EpochsCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The audit trail: every invalidation, clear, gc and epochs reset on this node, with when
    /// and who.
    Audit {
        /// Only the last DUR (`24h`, `7d`).
        #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Print JSON Lines.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite the disk tier's entries under the current key ([security]): entries sealed
    /// under an old key or written before there was one. With S3, they are uploaded again.
    Rekey,
    /// Bucket settings.
    S3 {
        #[command(subcommand)]
        command: S3Command,
    },
    /// Run the caching gateway: OpenAI- and Anthropic-compatible routes, the admin API and
    /// /metrics (see `[server]` in the configuration).
    Serve {
        /// Listen here instead of `[server] listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Show which fields of a request go into its key, and how.
    Explain {
        /// The request (JSON file, `-` for stdin).
        #[arg(long, value_name = "FILE")]
        request: PathBuf,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum S3Command {
    /// Print the lifecycle rules that expire entries after the longest TTL; `--apply`
    /// installs them, so old entries cost nothing even if no gc runs.
    Lifecycle {
        /// Install the rules on the bucket.
        #[arg(long)]
        apply: bool,
    },
    /// The upload queue: what waits, and the uploads parked after S3 rejected them again and
    /// again (`retry` requeues them, `drop --yes` drops them; their entries stay local).
    Outbox {
        #[command(subcommand)]
        command: Option<OutboxCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Put the parked uploads back in the queue.
    Retry,
    /// Drop the parked uploads.
    Drop {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum EpochsCommand {
    /// Drop epochs beyond every clock (forged, or left by a clock gone wrong) from this node and
    /// rewrite the bucket's shared document and this node's copy.
    Reset {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Rebuild the local index, and any missing by-hash pointers, from a listing of the bucket.
    Rebuild,
}

#[derive(Args)]
struct ReplayArgs {
    /// Exchange log: JSON Lines, plain or `.zst`.
    file: PathBuf,
    /// Stop after N requests.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Draw requests with Zipf(S) repetition instead of replaying in order.
    #[arg(long, value_name = "S")]
    repeat_zipf: Option<f64>,
    /// Key exchanges globally, per user or per session.
    #[arg(long, default_value = "global", value_name = "global|user|session")]
    scope: ScopeBy,
    /// Seed of the Zipf draw.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ScopeArgs {
    /// Scope the entry to a user.
    #[arg(long, conflicts_with_all = ["session", "namespace"])]
    user: Option<String>,
    /// Scope the entry to a session.
    #[arg(long, conflicts_with = "namespace")]
    session: Option<String>,
    /// Scope the entry to a namespace.
    #[arg(long)]
    namespace: Option<String>,
}

impl ScopeArgs {
    fn scope(&self) -> Scope {
        match (&self.user, &self.session, &self.namespace) {
            (Some(u), _, _) => Scope::User(u.clone()),
            (_, Some(s), _) => Scope::Session(s.clone()),
            (_, _, Some(n)) => Scope::Namespace(n.clone()),
            _ => Scope::Global,
        }
    }
}

/// What is logged when `STRATA_LOG` is not set: warnings, but none of sled's own lines. Every
/// sled failure strata meets is already warned about (throttled) and counted by strata, with sled's
/// error in it; sled adds a line per tree and per background flush for the same failure (a full
/// disk printed a dozen identical ones).
const DEFAULT_LOG_FILTER: &str = "warn,sled=off";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("strata: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            errln!("strata: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The exit code of a command that failed (as for clap's usage errors); 1 is `get`'s miss.
const EXIT_ERROR: u8 = 2;

/// The exit code of a replay stopped by Ctrl-C (128 + SIGINT), after it reported what ran.
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

/// Sets `stop` at the first Ctrl-C, so a replay can finish the request in flight, save and
/// report; a second Ctrl-C ends the process at once.
pub(crate) fn stop_on_ctrl_c() -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    // Registered here, before the command starts its work, not when the task first runs.
    let mut interrupt = signals::Caught::interrupt();
    let watcher = tokio::spawn(async move {
        interrupt.recv().await;
        flag.store(true, Ordering::Relaxed);
        errln!("strata: interrupted: saving and reporting what ran (Ctrl-C again to quit at once)");
        interrupt.recv().await;
        std::process::exit(i32::from(EXIT_INTERRUPTED));
    });
    (stop, watcher)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(profile) = cli.profile {
        config.normalization.profile = profile;
    }
    match cli.command {
        Command::Replay(args) => replay_command(&config, args).await,
        Command::Report(args) => report_command::run(&config, args).await,
        Command::Serve { listen } => serve_command(config, listen).await,
        Command::Stats { json } => stats_command(&config, json).await,
        Command::Get {
            request,
            scope,
            entry,
        } => get_command(&config, &request, &scope.scope(), entry).await,
        Command::Put {
            request,
            response,
            provider,
            cost_usd,
            latency_ms,
            tags,
            ttl,
            scope,
        } => {
            let cache = config.open_cache().await?;
            let request = read_json(&request)?;
            let mut completion = Completion::from_value(&read_json(&response)?)
                .provider(provider)
                .tags(tags);
            completion.cost_usd = cost_usd;
            completion.latency_ms = latency_ms;
            completion.ttl = ttl;
            let entry = cache
                .put(&request, &scope.scope(), completion)
                .await
                .context("request cannot be cached")?;
            close(cache).await;
            outln!("{}", entry.cache_key)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Invalidate { selector, json } => {
            invalidate_commands::invalidate(&config, &selector, json).await
        }
        Command::Clear { yes } => invalidate_commands::clear(&config, yes).await,
        Command::Audit { since, json } => invalidate_commands::audit(&config, since, json).await,
        Command::Rekey => invalidate_commands::rekey(&config).await,
        Command::Epochs { command, json } => match command {
            None => invalidate_commands::epochs(&config, json).await,
            Some(EpochsCommand::Reset { yes }) => {
                invalidate_commands::reset_epochs(&config, yes).await
            }
        },
        Command::Gc { dry_run, json } => invalidate_commands::gc(&config, dry_run, json).await,
        Command::S3 {
            command: S3Command::Lifecycle { apply },
        } => invalidate_commands::lifecycle(&config, apply).await,
        Command::S3 {
            command: S3Command::Outbox { command, json },
        } => match command {
            None => s3_commands::outbox(&config, json).await,
            Some(OutboxCommand::Retry) => s3_commands::outbox_retry(&config).await,
            Some(OutboxCommand::Drop { yes }) => s3_commands::outbox_drop(&config, yes).await,
        },
        Command::Ls { model, date, json } => {
            s3_commands::ls(&config, model.as_deref(), date, json).await
        }
        Command::Warm { model, since } => s3_commands::warm(&config, model.as_deref(), since).await,
        Command::Index {
            command: IndexCommand::Rebuild,
        } => s3_commands::rebuild_index(&config).await,
        Command::Explain {
            request,
            scope,
            json,
        } => {
            let explanation = config
                .normalizer()
                .explain(&read_json(&request)?, &scope.scope())
                .context("request cannot be keyed")?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&explanation)?)?;
            } else {
                outln!("key      {}", explanation.key)?;
                outln!("profile  {}", explanation.profile)?;
                outln!("scope    {}", explanation.scope)?;
                outln!("model    {}", explanation.model)?;
                outln!()?;
                for field in &explanation.fields {
                    let action = format!("{:?}", field.action).to_lowercase();
                    outln!("  {:<22} {:<12} {}", field.field, action, field.detail)?;
                }
                outln!()?;
                outln!(
                    "canonical request ({} bytes):",
                    explanation.canonical.get().len()
                )?;
                outln!("{}", explanation.canonical.get())?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn replay_command(config: &Config, args: ReplayArgs) -> Result<ExitCode> {
    if args.file.is_dir() {
        bail!(
            "{}: is a directory, not an exchange log",
            args.file.display()
        );
    }
    if args.file != Path::new("-") && !args.file.is_file() {
        bail!("{}: no such file", args.file.display());
    }
    if let Some(s) = args.repeat_zipf
        && !(s.is_finite() && s > 0.0)
    {
        bail!("--repeat-zipf must be a positive number, found {s}");
    }
    let (stop, watcher) = stop_on_ctrl_c();
    let opening = std::time::Instant::now();
    let cache = config.open_cache().await?;
    let open_s = opening.elapsed().as_secs_f64();
    let options = ReplayOptions {
        limit: args.limit,
        repeat_zipf: args.repeat_zipf,
        scope: args.scope,
        seed: args.seed,
        stop: Some(stop),
    };
    let bar = progress_bar();
    let mut report = replay::replay(&cache, &args.file, &options, |done, total| {
        if done.is_multiple_of(256) {
            if let Some(total) = total {
                bar.set_length(total);
            }
            bar.set_position(done);
        }
    })
    .await?;
    bar.finish_and_clear();
    let summary = (!args.json)
        .then(|| report_command::session_table(&cache, 5))
        .flatten();
    let closing = std::time::Instant::now();
    close(cache).await;
    report.open_s = Some(open_s);
    report.close_s = Some(closing.elapsed().as_secs_f64());
    for skipped in &report.skipped {
        errln!(
            "strata: skipped line {} of {}: {}",
            skipped.line,
            args.file.display(),
            skipped.reason
        );
    }
    if report.skipped_lines > report.skipped.len() as u64 {
        errln!(
            "strata: … and {} more skipped lines",
            report.skipped_lines - report.skipped.len() as u64
        );
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_replay(config, &args, &report, summary.as_deref())?;
    }
    watcher.abort();
    if report.interrupted {
        errln!(
            "strata: replay interrupted after {} requests",
            thousands(report.requests)
        );
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata serve`: the gateway until SIGTERM or Ctrl-C, then a graceful stop.
async fn serve_command(
    mut config: Config,
    listen: Option<std::net::SocketAddr>,
) -> Result<ExitCode> {
    if let Some(addr) = listen {
        config.server.listen = addr;
    }
    // The handlers are in place before the address is printed: a signal sent as soon as
    // the gateway answers stops it gracefully, never by the default action.
    let shutdown = signals::shutdown();
    let cache = config.open_cache().await?;
    let gateway = strata_http::Gateway::with_http(cache, config.server.clone(), &config.http)?;
    let server = strata_http::Server::bind(gateway).await?;
    // The address goes to standard error as the first line, so scripts (and tests) that
    // listen on port 0 learn the port.
    errln!("strata: serving on http://{}", server.local_addr()?);
    if config.server.admin_listen.is_some() {
        errln!("strata: admin API on http://{}", server.admin_addr()?);
    }
    server.run(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Flushes and closes the cache. Uploads S3 could not take stay queued for the next run: a
/// warning, not a failure.
async fn close(cache: strata::TieredCache) {
    let pending = cache.l3().map(|l3| l3.pending()).unwrap_or(0);
    if let Err(e) = cache.close().await {
        errln!("strata: warning: {e}");
    } else if pending > 0 {
        tracing::debug!(pending, "outbox drained");
    }
}

fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} replay [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
    ) {
        bar.set_style(style);
    }
    bar
}

fn print_replay(
    config: &Config,
    args: &ReplayArgs,
    r: &ReplayReport,
    summary: Option<&str>,
) -> Result<()> {
    let mode = match args.repeat_zipf {
        Some(s) => format!("Zipf({s}) draws"),
        None => "in order".to_string(),
    };
    outln!(
        "strata replay {} ({mode}, profile {}, scope {})",
        args.file.display(),
        config.normalization.profile,
        args.scope.as_str()
    )?;
    outln!(
        "  requests {} · skipped lines {} · lookup p50 {:.1} µs · p99 {:.1} µs · {} req/s",
        thousands(r.requests),
        thousands(r.skipped_lines),
        r.lookup_latency_us.p50,
        r.lookup_latency_us.p99,
        thousands(r.throughput_rps as u64)
    )?;
    if r.tier_errors > 0 {
        outln!(
            "  tier errors {} (served as misses)",
            thousands(r.tier_errors)
        )?;
    }
    match summary {
        Some(table) => out!("{table}")?,
        // Recording is off: the replay's own counts.
        None => outln!(
            "  hits {} ({:.2}%: L1 {} · L2 {} · L3 {}) · misses {} · cost saved ${:.4} · tokens saved {} · latency saved {}",
            thousands(r.hits.total()),
            r.hit_rate * 100.0,
            thousands(r.hits.l1),
            thousands(r.hits.l2),
            thousands(r.hits.l3),
            thousands(r.misses),
            r.cost_saved_usd,
            thousands(r.tokens_saved),
            human_duration(Duration::from_millis(r.latency_saved_ms))
        )?,
    }
    Ok(())
}

async fn stats_command(config: &Config, json: bool) -> Result<ExitCode> {
    let cache = config.open_cache().await?;
    let stats = cache.lifetime_stats();
    let (memory, disk) = cache.usage();
    let on_disk = cache.disk().and_then(|d| match d.occupied_bytes() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            errln!("strata: warning: cannot measure the disk tier's directory: {e}");
            None
        }
    });
    let s3 = cache.l3().map(|l3| {
        // Measured now (the drainer measures as the queue grows).
        if let Err(e) = l3.bound_outbox() {
            errln!("strata: warning: cannot measure the upload queue: {e}");
        }
        l3.stats()
    });
    close(cache).await;
    if json {
        let out = serde_json::json!({
            "lifetime": stats,
            "hit_rate": stats.hit_rate(),
            "disk": disk,
            "disk_on_disk_bytes": on_disk,
            "s3": s3,
            "disk_path": config.disk.enabled.then(|| config.disk.path.clone()),
            "memory_capacity_bytes": memory.capacity,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        print_stats(config, &stats, disk, on_disk)?;
        if let Some(q) = s3 {
            outln!(
                "  upload queue     {:>12}   {} of {} · parked {} · dropped for space {}",
                thousands(q.pending),
                bytesize::ByteSize::b(q.outbox_bytes),
                bytesize::ByteSize::b(config.s3.outbox_capacity.as_u64()),
                thousands(q.parked),
                thousands(q.dropped_for_space)
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_stats(
    config: &Config,
    s: &Stats,
    disk: Option<strata::tiers::TierUsage>,
    on_disk: Option<u64>,
) -> Result<()> {
    outln!("strata stats (lifetime of {})", config.disk.path.display())?;
    outln!("  lookups          {:>12}", thousands(s.lookups))?;
    outln!(
        "  hits             {:>12}   {:.2}%   L1 {} · L2 {} · L3 {}",
        thousands(s.hits.total()),
        s.hit_rate() * 100.0,
        thousands(s.hits.l1),
        thousands(s.hits.l2),
        thousands(s.hits.l3)
    )?;
    outln!("  misses           {:>12}", thousands(s.misses))?;
    outln!(
        "  cost saved       {:>12}",
        format!("${:.4}", s.cost_saved_usd)
    )?;
    outln!("  tokens saved     {:>12}", thousands(s.tokens_saved))?;
    outln!(
        "  latency saved    {:>12}",
        human_duration(Duration::from_millis(s.latency_saved_ms))
    )?;
    let errors = s.errors;
    outln!(
        "  errors           {:>12}   corrupt {} · collisions {} · tier failures {}",
        thousands(errors.corrupt + errors.collisions + errors.l1 + errors.l2 + errors.l3),
        errors.corrupt,
        errors.collisions,
        errors.l1 + errors.l2 + errors.l3
    )?;
    if let Some(d) = disk {
        outln!(
            "  disk tier        {:>12}   entries, {:.1} MiB of {:.0} MiB",
            thousands(d.entries),
            d.bytes as f64 / (1 << 20) as f64,
            d.capacity.unwrap_or(0) as f64 / (1 << 20) as f64
        )?;
        if let Some(on_disk) = on_disk {
            // `disk.capacity` bounds the payload; sled's files take more (README: Disk space).
            outln!(
                "  on disk          {:>12}   MiB, {:.2}× the payload (sled's log and segments)",
                format!("{:.1}", on_disk as f64 / (1 << 20) as f64),
                on_disk as f64 / d.bytes.max(1) as f64
            )?;
        }
    }
    Ok(())
}

async fn get_command(
    config: &Config,
    request: &Path,
    scope: &Scope,
    entry: bool,
) -> Result<ExitCode> {
    let cache = config.open_cache().await?;
    let request = read_json(request)?;
    let found = cache
        .get(&request, scope)
        .await
        .context("request cannot be keyed")?;
    // What to say, worked out before the cache closes; said after.
    let said = match &found {
        Some(lookup) if entry => Ok(serde_json::to_string_pretty(&*lookup.entry)?),
        Some(lookup) => Ok(lookup.response().get().to_owned()),
        None => Err(cache.key(&request, scope)?.key),
    };
    close(cache).await;
    match said {
        Ok(text) => {
            outln!("{text}")?;
            Ok(ExitCode::SUCCESS)
        }
        Err(key) => {
            errln!("strata: miss: no entry for {key}");
            Ok(ExitCode::from(1))
        }
    }
}

/// An amount of US dollars: finite and not negative.
fn usd(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!(
            "`{text}` is not an amount of USD (a number, 0 or more)"
        )),
    }
}

/// A TTL as the configuration writes it; `never` is a TTL no date can reach, which the cache
/// stores as no expiry.
fn ttl(text: &str) -> Result<Duration, String> {
    Ok(strata::config::parse_ttl(text)?.unwrap_or(Duration::MAX))
}

fn read_json(path: &Path) -> Result<Value> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
    } else {
        text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    }
    // Editors on Windows save JSON with a byte-order mark, which RFC 8259 lets readers ignore.
    let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
    serde_json::from_str(body).with_context(|| format!("{} is not valid JSON", path.display()))
}
