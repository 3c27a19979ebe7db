//! Replaying an exchange log through the cache: what would caching have saved on this traffic?
//!
//! The log is JSON Lines (plain, or zstd-compressed, told by its first bytes), one exchange
//! per line: `request`, `response`, `provider`, `latency_ms`, and optionally `user`, `session`,
//! `tags` and `cost_usd`. The executor "calls the LLM" by returning the logged response. Lines
//! are split on `\n` only: message texts may hold U+2028 and other separators.

use std::convert::Infallible;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use strata_analytics::Hits;
use strata_core::Scope;
use strata_tiers::{Completion, Outcome, TieredCache};

use crate::Error;

/// One logged exchange.
#[derive(Debug, Clone, Deserialize)]
pub struct Exchange {
    /// The request as sent.
    pub request: Value,
    /// The response as received.
    pub response: Box<RawValue>,
    /// Who served it.
    #[serde(default)]
    pub provider: String,
    /// How long it took.
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// The user who sent it.
    #[serde(default)]
    pub user: Option<String>,
    /// The session it belongs to.
    #[serde(default)]
    pub session: Option<String>,
    /// Labels.
    #[serde(default)]
    pub tags: Vec<String>,
    /// What it cost, if known; otherwise it is priced from usage.
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

impl Exchange {
    /// The completion the executor returns for this exchange.
    pub fn completion(&self) -> Completion {
        let mut completion = Completion::new(self.response.clone())
            .provider(self.provider.clone())
            .tags(self.tags.clone());
        completion.latency_ms = self.latency_ms;
        completion.cost_usd = self.cost_usd;
        completion
    }

    /// The scope this exchange is looked up in.
    pub fn scope(&self, by: ScopeBy) -> Scope {
        // An exchange without the id is keyed globally: any stand-in id ("anonymous") could be a
        // real user's, who would then be served what others asked.
        match (by, &self.user, &self.session) {
            (ScopeBy::User, Some(user), _) => Scope::User(user.clone()),
            (ScopeBy::Session, _, Some(session)) => Scope::Session(session.clone()),
            _ => Scope::Global,
        }
    }
}

/// Which scope a replay keys exchanges in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeBy {
    /// Everyone shares entries.
    #[default]
    Global,
    /// Per the exchange's `user` (global when it has none).
    User,
    /// Per the exchange's `session` (global when it has none).
    Session,
}

impl ScopeBy {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeBy::Global => "global",
            ScopeBy::User => "user",
            ScopeBy::Session => "session",
        }
    }
}

impl FromStr for ScopeBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "global" => Ok(ScopeBy::Global),
            "user" => Ok(ScopeBy::User),
            "session" => Ok(ScopeBy::Session),
            other => Err(format!(
                "unknown scope `{other}` (expected global, user or session)"
            )),
        }
    }
}

/// How to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Stop after this many requests.
    pub limit: Option<usize>,
    /// Draw requests with Zipf(s) repetition over the log's exchanges instead of in order.
    pub repeat_zipf: Option<f64>,
    /// The scope exchanges are keyed in.
    pub scope: ScopeBy,
    /// Seed of the Zipf draw.
    pub seed: u64,
    /// Set (from a Ctrl-C handler) to end the replay after the request in flight; the report
    /// then covers what ran and says it was interrupted.
    pub stop: Option<Arc<AtomicBool>>,
}

impl ReplayOptions {
    fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }
}

/// A line that was skipped, and why.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedLine {
    /// 1-based line number.
    pub line: u64,
    /// Why it was skipped.
    pub reason: String,
}

/// Lookup latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

/// What a replay did and saved.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// The log replayed.
    pub file: PathBuf,
    /// Requests looked up.
    pub requests: u64,
    /// Hits per tier.
    pub hits: Hits,
    /// Requests that ran the (replayed) executor.
    pub misses: u64,
    /// Requests that could not be keyed; they ran uncached and count as misses too.
    pub uncacheable: u64,
    /// Hits over requests.
    pub hit_rate: f64,
    /// What the hits would have cost, in USD.
    pub cost_saved_usd: f64,
    /// Tokens the hits would have used.
    pub tokens_saved: u64,
    /// Upstream latency the hits avoided, in milliseconds.
    pub latency_saved_ms: u64,
    /// Malformed lines skipped.
    pub skipped_lines: u64,
    /// The first skipped lines, with reasons.
    pub skipped: Vec<SkippedLine>,
    /// Lookup latency (the whole `get_or_execute` call), in microseconds.
    pub lookup_latency_us: Latency,
    /// The same, by what each lookup came to (`L1`, `L2`, `L3`, `Coalesced`, `Miss`); outcomes
    /// no lookup came to are left out.
    pub lookup_latency_by_outcome_us: std::collections::BTreeMap<&'static str, Latency>,
    /// Requests per second over the run.
    pub throughput_rps: f64,
    /// Wall time of the run in seconds.
    pub elapsed_s: f64,
    /// Largest weighed size of the memory tier seen after any request.
    pub memory_peak_bytes: u64,
    /// The memory tier's bound.
    pub memory_capacity_bytes: u64,
    /// Peak resident memory of the process, where the platform tells.
    pub peak_rss_bytes: Option<u64>,
    /// Tier errors met (corrupt copies, failures), all served as misses.
    pub tier_errors: u64,
    /// Whether the replay was stopped before its end ([`ReplayOptions::stop`]).
    pub interrupted: bool,
    /// Seconds opening the cache took (set by the command, which opens it).
    pub open_s: Option<f64>,
    /// Seconds closing the cache took, the write-behind drained and the disk tier flushed
    /// (set by the command, which closes it).
    pub close_s: Option<f64>,
}

const SKIPPED_KEPT: usize = 20;

/// The longest line a log may hold (an exchange with a 128k-token context is about 1 MB); a
/// longer one is skipped and reported, never held in memory whole.
pub const MAX_LINE: usize = 32 << 20;

/// Reads an exchange log line by line.
pub struct ExchangeLog {
    lines: Box<dyn BufRead>,
    line: u64,
    buf: Vec<u8>,
    /// A read failed: the rest of the log cannot be read (a truncated or corrupt stream
    /// fails the same way at every later read).
    failed: bool,
}

/// The UTF-8 byte-order mark.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl ExchangeLog {
    /// Opens a log, `-` for standard input; zstd-compressed logs (by their first bytes) are
    /// decompressed on the fly.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let source: Box<dyn Read> = if path == Path::new("-") {
            Box::new(std::io::stdin())
        } else {
            Box::new(File::open(path).map_err(io)?)
        };
        let mut raw = BufReader::with_capacity(1 << 16, source);
        let lines: Box<dyn BufRead> = if raw.fill_buf().map_err(io)?.starts_with(&ZSTD_MAGIC) {
            let decoder = zstd::stream::read::Decoder::with_buffer(raw).map_err(io)?;
            Box::new(BufReader::with_capacity(1 << 16, decoder))
        } else {
            Box::new(raw)
        };
        Ok(ExchangeLog {
            lines,
            line: 0,
            buf: Vec::with_capacity(1 << 14),
            failed: false,
        })
    }

    /// The next non-blank line as raw bytes, with its 1-based number; `None` at the end. After
    /// a read error (reported once, as a skipped line), the end.
    pub fn next_line(&mut self) -> Option<Result<(u64, &[u8]), SkippedLine>> {
        loop {
            if self.failed {
                return None;
            }
            self.buf.clear();
            self.line += 1;
            let bounded = (&mut self.lines)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut self.buf);
            if bounded.is_ok() && self.buf.len() > MAX_LINE && self.buf.last() != Some(&b'\n') {
                self.buf = Vec::with_capacity(1 << 14);
                let skipped = skip_line(&mut self.lines);
                if let Err(e) = skipped {
                    self.failed = true;
                    return Some(Err(SkippedLine {
                        line: self.line,
                        reason: format!(
                            "read error, the log ends here (truncated or corrupt?): {e}"
                        ),
                    }));
                }
                return Some(Err(SkippedLine {
                    line: self.line,
                    reason: format!("longer than {} MiB: skipped", MAX_LINE >> 20),
                }));
            }
            match bounded {
                Ok(0) => return None,
                Ok(_) => {
                    // A byte-order mark (editors on Windows write one) is not part of the JSON.
                    if self.line == 1 && self.buf.starts_with(UTF8_BOM) {
                        self.buf.drain(..UTF8_BOM.len());
                    }
                    if self.buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some(Ok((self.line, &self.buf)));
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(SkippedLine {
                        line: self.line,
                        reason: format!(
                            "read error, the log ends here (truncated or corrupt?): {e}"
                        ),
                    }));
                }
            }
        }
    }
}

/// Reads past the rest of a line without keeping it.
fn skip_line(lines: &mut dyn BufRead) -> std::io::Result<()> {
    loop {
        let available = lines.fill_buf()?;
        if available.is_empty() {
            return Ok(());
        }
        match available.iter().position(|b| *b == b'\n') {
            Some(at) => {
                lines.consume(at + 1);
                return Ok(());
            }
            None => {
                let n = available.len();
                lines.consume(n);
            }
        }
    }
}

/// Parses one line of a log.
pub fn parse_exchange(line: u64, bytes: &[u8]) -> Result<Exchange, SkippedLine> {
    serde_json::from_slice(bytes).map_err(|e| {
        // serde_json places the error at "line 1" of the one line it was given.
        let message = e.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m);
        SkippedLine {
            line,
            reason: format!("not an exchange: {message} (column {})", e.column()),
        }
    })
}

/// Replays the log at `path` through `cache`, calling `progress(done, total)` as it goes
/// (`total` is known for Zipf draws and limits).
pub async fn replay(
    cache: &TieredCache,
    path: &Path,
    options: &ReplayOptions,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<ReplayReport, Error> {
    let mut run = Run::new(cache, path);
    let mut log = ExchangeLog::open(path)?;
    match options.repeat_zipf {
        None => {
            let limit = options.limit.map(|l| l as u64);
            while let Some(line) = log.next_line() {
                if limit.is_some_and(|l| run.requests >= l) {
                    break;
                }
                if options.stopped() {
                    return Ok(run.finish(true).await);
                }
                match line.and_then(|(n, bytes)| parse_exchange(n, bytes)) {
                    Ok(exchange) => run.one(&exchange, options.scope).await,
                    Err(skipped) => run.skip(skipped),
                }
                progress(run.requests, limit);
            }
        }
        Some(s) => {
            // Keep raw lines, not parsed trees: a log is several times smaller as text.
            let mut lines: Vec<Box<[u8]>> = Vec::new();
            while let Some(line) = log.next_line() {
                if options.stopped() {
                    return Ok(run.finish(true).await);
                }
                match line.and_then(|(n, bytes)| parse_exchange(n, bytes).map(|_| bytes)) {
                    Ok(bytes) => lines.push(bytes.into()),
                    Err(skipped) => run.skip(skipped),
                }
            }
            if lines.is_empty() {
                return Ok(run.finish(false).await);
            }
            let zipf = Zipf::new(lines.len() as f64, s)
                .map_err(|e| Error::Config(format!("--repeat-zipf {s}: {e}")))?;
            let mut rng = StdRng::seed_from_u64(options.seed);
            let total = options.limit.unwrap_or(lines.len()) as u64;
            for _ in 0..total {
                if options.stopped() {
                    return Ok(run.finish(true).await);
                }
                let rank = zipf.sample(&mut rng) as usize;
                let index = rank.clamp(1, lines.len()) - 1;
                // Every kept line parsed once already.
                if let Ok(exchange) = parse_exchange(0, &lines[index]) {
                    run.one(&exchange, options.scope).await;
                }
                progress(run.requests, Some(total));
            }
        }
    }
    // A Ctrl-C that also ended the input (`zstdcat log | strata replay -`) still counts.
    Ok(run.finish(options.stopped()).await)
}

struct Run<'a> {
    cache: &'a TieredCache,
    file: PathBuf,
    started: Instant,
    before: strata_analytics::Stats,
    /// Lookup latencies in nanoseconds, to three significant digits: a few KiB whatever the
    /// number of requests (a sample per request took 16 bytes each, 16 MiB and more for a
    /// million).
    latency_ns: Histogram<u64>,
    /// Latencies again, by outcome (`outcome as usize`, as in [`Outcome::ALL`]).
    by_outcome: [Histogram<u64>; Outcome::ALL.len()],
    requests: u64,
    skipped_lines: u64,
    skipped: Vec<SkippedLine>,
    memory_peak: u64,
}

impl<'a> Run<'a> {
    fn new(cache: &'a TieredCache, file: &Path) -> Self {
        Run {
            cache,
            file: file.to_path_buf(),
            started: Instant::now(),
            before: cache.stats(),
            latency_ns: histogram(),
            by_outcome: std::array::from_fn(|_| histogram()),
            requests: 0,
            skipped_lines: 0,
            skipped: Vec::new(),
            memory_peak: 0,
        }
    }

    async fn one(&mut self, exchange: &Exchange, scope: ScopeBy) {
        let scope = exchange.scope(scope);
        let started = Instant::now();
        let result = self
            .cache
            .get_or_execute(&exchange.request, &scope, || async {
                Ok::<_, Infallible>(exchange.completion())
            })
            .await;
        let elapsed = started.elapsed();
        if let Ok(lookup) = result {
            self.requests += 1;
            let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
            self.latency_ns.saturating_record(ns);
            self.by_outcome[lookup.outcome as usize].saturating_record(ns);
        }
        self.memory_peak = self.memory_peak.max(self.cache.memory().weighted_size());
    }

    fn skip(&mut self, skipped: SkippedLine) {
        self.skipped_lines += 1;
        if self.skipped.len() < SKIPPED_KEPT {
            self.skipped.push(skipped);
        }
    }

    async fn finish(mut self, interrupted: bool) -> ReplayReport {
        let elapsed = self.started.elapsed();
        // moka weighs inserts in batches: a short replay may not have seen any weighed yet.
        self.cache.memory().run_pending_tasks().await;
        self.memory_peak = self.memory_peak.max(self.cache.memory().weighted_size());
        let mut by_outcome = std::collections::BTreeMap::new();
        for (outcome, times) in Outcome::ALL.iter().zip(&self.by_outcome) {
            if !times.is_empty() {
                by_outcome.insert(outcome.name(), latency_of(times));
            }
        }
        let stats = self.cache.stats();
        let hits = Hits {
            l1: stats.hits.l1 - self.before.hits.l1,
            l2: stats.hits.l2 - self.before.hits.l2,
            l3: stats.hits.l3 - self.before.hits.l3,
            coalesced: stats.hits.coalesced - self.before.hits.coalesced,
        };
        let uncacheable = stats.uncacheable - self.before.uncacheable;
        let misses = stats.misses - self.before.misses + uncacheable;
        let tier_errors = |s: &strata_analytics::Stats| {
            s.errors.l1 + s.errors.l2 + s.errors.l3 + s.errors.corrupt + s.errors.collisions
        };
        ReplayReport {
            file: self.file,
            requests: self.requests,
            hits,
            misses,
            uncacheable,
            hit_rate: if self.requests == 0 {
                0.0
            } else {
                hits.total() as f64 / self.requests as f64
            },
            cost_saved_usd: stats.cost_saved_usd - self.before.cost_saved_usd,
            tokens_saved: stats.tokens_saved - self.before.tokens_saved,
            latency_saved_ms: stats.latency_saved_ms - self.before.latency_saved_ms,
            skipped_lines: self.skipped_lines,
            skipped: self.skipped,
            lookup_latency_us: latency_of(&self.latency_ns),
            lookup_latency_by_outcome_us: by_outcome,
            throughput_rps: self.requests as f64 / elapsed.as_secs_f64().max(1e-9),
            elapsed_s: elapsed.as_secs_f64(),
            memory_peak_bytes: self.memory_peak,
            memory_capacity_bytes: self.cache.memory().capacity(),
            peak_rss_bytes: peak_rss_bytes(),
            tier_errors: tier_errors(&stats) - tier_errors(&self.before),
            interrupted,
            open_s: None,
            close_s: None,
        }
    }
}

/// The slowest lookup a histogram tells apart: an hour, in nanoseconds (slower ones count as an
/// hour).
const SLOWEST_NS: u64 = 3_600_000_000_000;

/// A histogram of nanoseconds from 1 ns to [`SLOWEST_NS`], to three significant digits (about
/// half a MiB).
fn histogram() -> Histogram<u64> {
    // Refused only for bounds or a precision out of range, which these are not.
    Histogram::new_with_bounds(1, SLOWEST_NS, 3).expect("valid histogram bounds")
}

/// Median, 99th percentile and slowest of recorded nanoseconds, in microseconds (0 when none);
/// the percentiles within 0.1% (the histogram's precision), the slowest as recorded.
fn latency_of(times: &Histogram<u64>) -> Latency {
    if times.is_empty() {
        return Latency::default();
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Latency {
        p50: us(times.value_at_quantile(0.5)),
        p99: us(times.value_at_quantile(0.99)),
        max: us(times.max()),
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn latencies_read_back_to_three_significant_digits_at_any_scale() {
        let mut times = histogram();
        assert_eq!(latency_of(&times).p50, 0.0);
        // 1,000 lookups: 980 of 15 µs, 19 of 400 µs, one of two hours (counted as one hour).
        for _ in 0..980 {
            times.saturating_record(15_000);
        }
        for _ in 0..19 {
            times.saturating_record(400_000);
        }
        times.saturating_record(2 * SLOWEST_NS);
        let latency = latency_of(&times);
        let near = |got: f64, want: f64| (got - want).abs() <= want / 1000.0;
        assert!(near(latency.p50, 15.0), "{latency:?}");
        assert!(near(latency.p99, 400.0), "{latency:?}");
        assert!(near(latency.max, SLOWEST_NS as f64 / 1000.0), "{latency:?}");
    }

    proptest! {
        /// Fuzz-style: any bytes as an exchange log, plain or behind zstd's magic number, are
        /// read to their end (lines skipped and reported), never a panic.
        #[test]
        fn fuzz_any_log_is_read_to_its_end(
            bytes in prop::collection::vec(any::<u8>(), 0..4096),
            zstd_magic in any::<bool>(),
        ) {
            let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
            let path = dir.path().join("log");
            let mut content = Vec::new();
            if zstd_magic {
                content.extend_from_slice(&ZSTD_MAGIC);
            }
            content.extend_from_slice(&bytes);
            std::fs::write(&path, &content).unwrap_or_else(|e| panic!("{e}"));
            let Ok(mut log) = ExchangeLog::open(&path) else {
                return Ok(());
            };
            let mut lines = 0;
            while let Some(next) = log.next_line() {
                if let Ok((n, line)) = next {
                    let _ = parse_exchange(n, line);
                }
                lines += 1;
                prop_assert!(lines <= bytes.len() + 1);
            }
        }
    }
}
