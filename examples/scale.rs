//! The scale harness: N distinct exchanges through the `strata` command, and what it costs as N
//! grows. `scripts/scale` runs it on a release build (`scripts/scale 100000 1000000`); the test
//! command runs it on 2,000 entries as a smoke check.
//!
//! For each N, in a fresh temporary directory:
//! 1. N distinct exchanges are made from `../shared/data/sharegpt-chat-dev.jsonl.zst` (the
//!    ShareGPT workload, taken in turn, each made distinct by a suffix on its last message);
//! 2. `strata replay` of all N into an empty cache (all misses: write throughput);
//! 3. `strata replay` of all N again in a new process (all disk-tier hits while the working set
//!    is larger than memory);
//! 4. `strata replay` of the first `HOT` exchanges twice in one process (disk-tier hits, then
//!    memory-tier hits);
//! 5. `strata stats` and `strata report`.
//!
//! Every phase is its own process, and its peak RSS is the kernel's (`wait4`'s `ru_maxrss`), over
//! the whole process, opening and closing included, taken by a launcher that loads nothing (see
//! [`strata`]). The bytes the directory occupies (allocated blocks, as `strata stats` reports
//! them) are set against the payload the disk tier counts. A small-scale run (`HOT` entries,
//! the same phases) is made first in the same run, so that the disk-tier hit at N is compared
//! with the disk-tier hit at small scale measured minutes apart, not on another day.
//!
//! `STRATA_SCALE_KEEP=1` keeps each N's logs and cache directory (the path is printed).
//!
//! `STRATA_SCALE_S3=10000,100000` runs the bucket commands instead: N entries seeded into the
//! test suite's S3 server (s3s-fs on a loopback port) by a replay with S3, then `strata ls`,
//! `index rebuild`, `warm` and `gc --dry-run`, each a new process on a new disk tier, with
//! objects (or entries) per second and peak RSS.
//!
//! Prints one table row per N (Markdown, for BENCHMARKS.md) and the bounds it checks.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

#[allow(unused_imports)]
#[path = "../tests/support/s3.rs"]
mod s3;

/// Exchanges looked up twice for the memory-tier figures, and the small-scale N.
const HOT: usize = 20_000;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--launch") {
        return launch(&args[1..]);
    }
    let sizes: Vec<usize> = if args.is_empty() {
        vec![100_000]
    } else {
        args.iter()
            .map(|a| {
                a.replace('_', "")
                    .parse()
                    .with_context(|| format!("N: {a}"))
            })
            .collect::<Result<_>>()?
    };
    let strata = strata_binary()?;
    let data = std::env::var_os("STRATA_DATA").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/sharegpt-chat-dev.jsonl.zst"),
        PathBuf::from,
    );
    let base = load(&data)?;
    let memory = std::env::var("STRATA_MEMORY_CAPACITY").unwrap_or_else(|_| "256MiB".into());
    println!(
        "strata: {} · workload: {} ({} exchanges) · memory tier {memory}",
        strata.display(),
        data.display(),
        base.len()
    );
    if let Ok(list) = std::env::var("STRATA_SCALE_S3") {
        println!("\n{}", S3Row::header());
        for n in list.split(',').filter(|n| !n.is_empty()) {
            let n: usize = n
                .replace('_', "")
                .parse()
                .with_context(|| format!("N: {n}"))?;
            println!("{}", run_s3(&strata, &base, n)?.row());
        }
        return Ok(());
    }
    let hot = HOT.min(sizes.iter().copied().min().unwrap_or(HOT));
    let small = run(&strata, &base, hot, hot)?;
    println!("\n{}", Row::header());
    println!("{}", small.row());
    for &n in &sizes {
        let row = run(&strata, &base, n, hot)?;
        println!("{}", row.row());
        row.check(&small, &memory)?;
    }
    Ok(())
}

/// The `strata` binary built beside this example (`target/<profile>/strata`).
fn strata_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("STRATA_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("where this example runs from")?;
    let strata = profile_dir.join("strata");
    if !strata.is_file() {
        bail!(
            "{} is not built: cargo build --bin strata (with --release for figures)",
            strata.display()
        );
    }
    Ok(strata)
}

/// The workload's exchanges, as parsed lines.
fn load(path: &Path) -> Result<Vec<Value>> {
    let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let reader = BufReader::new(zstd::Decoder::new(file)?);
    let mut out = Vec::new();
    for line in reader.split(b'\n') {
        let line = line?;
        if !line.iter().all(u8::is_ascii_whitespace) {
            out.push(serde_json::from_slice(&line)?);
        }
    }
    if out.is_empty() {
        bail!("{}: no exchanges", path.display());
    }
    Ok(out)
}

/// Writes exchanges `range` (distinct by index) to a zstd JSON Lines file, `times` over.
fn write_log(base: &[Value], path: &Path, count: usize, times: usize) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut out = zstd::Encoder::new(std::io::BufWriter::new(file), 1)?;
    for _ in 0..times {
        for i in 0..count {
            let mut exchange = base[i % base.len()].clone();
            distinct(&mut exchange, i);
            serde_json::to_writer(&mut out, &exchange)?;
            out.write_all(b"\n")?;
        }
    }
    out.finish()?.flush()?;
    Ok(())
}

/// Makes exchange `i` distinct from every other: a suffix on its last message's text.
fn distinct(exchange: &mut Value, i: usize) {
    let suffix = format!(" [#{i}]");
    let message = exchange
        .pointer_mut("/request/messages")
        .and_then(Value::as_array_mut)
        .and_then(|m| m.last_mut());
    match message.and_then(|m| m.get_mut("content")) {
        Some(Value::String(text)) => text.push_str(&suffix),
        Some(Value::Array(parts)) => {
            parts.push(serde_json::json!({"type": "text", "text": suffix}))
        }
        _ => {
            // No message text to mark: a seed the provider would see makes it distinct.
            if let Some(request) = exchange.get_mut("request").and_then(Value::as_object_mut) {
                request.insert("seed".into(), i.into());
            }
        }
    }
}

/// What one process did: its JSON output, wall time and peak RSS.
struct Ran {
    json: Value,
    wall_s: f64,
    peak_rss: u64,
}

/// Runs `strata args…` on the cache at `dir`, with its peak RSS.
///
/// Linux carries a process's RSS high-water mark across `exec` into the new program's
/// `ru_maxrss`, and a child forked from this harness starts out with the harness's pages
/// (the workload, the in-process S3 server): measured directly, every command would peak at
/// least at the harness's own size. So `strata` is started by a small launcher (this binary
/// again, with `--launch`, which loads nothing) that waits for it with `wait4` and writes its
/// peak to a file.
fn strata(bin: &Path, dir: &Path, args: &[&str]) -> Result<Ran> {
    let started = Instant::now();
    let rss_file = tempfile::NamedTempFile::new()?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--launch")
        .arg(bin)
        .args(args)
        .env("STRATA_DISK_PATH", dir)
        .env("STRATA_SCALE_RSS_FILE", rss_file.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the launcher")?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("strata {}: {}", args.join(" "), output.status);
    }
    let peak_kb: u64 = std::fs::read_to_string(rss_file.path())?
        .trim()
        .parse()
        .context("the launcher's peak RSS")?;
    Ok(Ran {
        json: serde_json::from_slice(&output.stdout).unwrap_or(Value::Null),
        wall_s: started.elapsed().as_secs_f64(),
        peak_rss: peak_kb * 1024,
    })
}

/// `scale --launch BIN ARGS…`: runs BIN with ARGS (standard streams and environment passed
/// through), writes its peak RSS in KiB (`wait4`) to `$STRATA_SCALE_RSS_FILE`, and exits as it
/// did.
fn launch(args: &[String]) -> Result<()> {
    let (bin, rest) = args.split_first().context("--launch BIN ARGS…")?;
    let rss_file = std::env::var_os("STRATA_SCALE_RSS_FILE").context("STRATA_SCALE_RSS_FILE")?;
    let child = Command::new(bin)
        .args(rest)
        .spawn()
        .with_context(|| bin.clone())?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value, and `wait4` writes into our own locals.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet waited for (its `Child` handle is not used again).
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    std::fs::write(&rss_file, usage.ru_maxrss.to_string())?;
    let exit = std::process::ExitStatus::from_raw(status);
    std::process::exit(exit.code().unwrap_or(1));
}

/// One N's figures.
struct Row {
    n: usize,
    write_rps: f64,
    write_p50: f64,
    write_p99: f64,
    l2_p50: f64,
    l2_p99: f64,
    l1_p50: f64,
    l1_p99: f64,
    open_s: f64,
    close_s: f64,
    peak_rss: [u64; 3],
    payload: u64,
    on_disk: u64,
    stats_s: f64,
    stats_rss: u64,
    report_s: f64,
    report_rss: u64,
}

fn field(json: &Value, pointer: &str) -> f64 {
    json.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}

fn run(bin: &Path, base: &[Value], n: usize, hot: usize) -> Result<Row> {
    let tmp = tempfile::Builder::new().prefix("strata-scale-").tempdir()?;
    let log = tmp.path().join("all.jsonl.zst");
    let hot_log = tmp.path().join("hot.jsonl.zst");
    let dir = tmp.path().join("cache");
    eprintln!("N = {n}: making the exchange logs");
    write_log(base, &log, n, 1)?;
    write_log(base, &hot_log, hot.min(n), 2)?;
    let log = log.to_string_lossy().into_owned();
    let hot_log = hot_log.to_string_lossy().into_owned();
    eprintln!("N = {n}: write");
    let write = strata(bin, &dir, &["replay", &log, "--json"])?;
    let misses = field(&write.json, "/misses");
    if misses != n as f64 {
        bail!("the write run missed {misses} times, not {n}: the exchanges are not distinct");
    }
    eprintln!("N = {n}: second replay");
    let second = strata(bin, &dir, &["replay", &log, "--json"])?;
    eprintln!("N = {n}: hot replay");
    let again = strata(bin, &dir, &["replay", &hot_log, "--json"])?;
    eprintln!("N = {n}: stats and report");
    let stats = strata(bin, &dir, &["stats", "--json"])?;
    let report = strata(bin, &dir, &["report", "--format", "json"])?;
    let runs = [&write, &second, &again];
    let row = Row {
        n,
        write_rps: field(&write.json, "/throughput_rps"),
        write_p50: field(&write.json, "/lookup_latency_us/p50"),
        write_p99: field(&write.json, "/lookup_latency_us/p99"),
        l2_p50: field(&second.json, "/lookup_latency_by_outcome_us/L2/p50"),
        l2_p99: field(&second.json, "/lookup_latency_by_outcome_us/L2/p99"),
        l1_p50: field(&again.json, "/lookup_latency_by_outcome_us/L1/p50"),
        l1_p99: field(&again.json, "/lookup_latency_by_outcome_us/L1/p99"),
        open_s: runs
            .iter()
            .map(|r| field(&r.json, "/open_s"))
            .fold(0.0, f64::max),
        close_s: runs
            .iter()
            .map(|r| field(&r.json, "/close_s"))
            .fold(0.0, f64::max),
        peak_rss: [write.peak_rss, second.peak_rss, again.peak_rss],
        payload: field(&stats.json, "/disk/bytes") as u64,
        on_disk: field(&stats.json, "/disk_on_disk_bytes") as u64,
        stats_s: stats.wall_s,
        stats_rss: stats.peak_rss,
        report_s: report.wall_s,
        report_rss: report.peak_rss,
    };
    if std::env::var_os("STRATA_SCALE_KEEP").is_some() {
        eprintln!("N = {n}: kept {}", tmp.keep().display());
    }
    Ok(row)
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / f64::from(1 << 20))
}

impl Row {
    fn header() -> String {
        [
            "| N | write req/s | write p50 / p99 µs | L2 hit p50 / p99 µs | L1 hit p50 / p99 µs \
             | open / close s (max) | peak RSS MiB write / replay / hot | payload MiB | on disk MiB (×) \
             | stats s / MiB | report s / MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        .join("\n")
    }

    fn row(&self) -> String {
        format!(
            "| {} | {:.0} | {:.0} / {:.0} | {:.1} / {:.0} | {:.1} / {:.0} | {:.2} / {:.2} | {} / {} / {} | {} | {} ({:.2}×) | {:.2} / {} | {:.2} / {} |",
            self.n,
            self.write_rps,
            self.write_p50,
            self.write_p99,
            self.l2_p50,
            self.l2_p99,
            self.l1_p50,
            self.l1_p99,
            self.open_s,
            self.close_s,
            mib(self.peak_rss[0]),
            mib(self.peak_rss[1]),
            mib(self.peak_rss[2]),
            mib(self.payload),
            mib(self.on_disk),
            self.on_disk as f64 / self.payload.max(1) as f64,
            self.stats_s,
            mib(self.stats_rss),
            self.report_s,
            mib(self.report_rss),
        )
    }

    /// Prints each bound of the scale issue against this row: met, or by how much it is missed.
    fn check(&self, small: &Row, memory: &str) -> Result<()> {
        let memory_bound = memory
            .parse::<bytesize::ByteSize>()
            .map_err(anyhow::Error::msg)?
            .as_u64();
        let rss_bound = memory_bound + (16 << 20) + (64 << 20);
        let peak = self.peak_rss.iter().copied().max().unwrap_or(0);
        let say = |what: &str, ok: bool, detail: String| {
            println!(
                "  N = {}: {what}: {} ({detail})",
                self.n,
                if ok { "met" } else { "NOT met" }
            );
        };
        say(
            "peak RSS ≤ memory + page cache + 64 MiB",
            peak <= rss_bound,
            format!("{} MiB against {} MiB", mib(peak), mib(rss_bound)),
        );
        let factor = self.on_disk as f64 / self.payload.max(1) as f64;
        say(
            "directory ≤ 1.5× payload",
            factor <= 1.5,
            format!("{factor:.2}×"),
        );
        let ratio = self.l2_p50 / small.l2_p50;
        say(
            "L2 hit p50 ≤ 2× the small-scale one",
            ratio <= 2.0,
            format!(
                "{:.1} µs against {:.1} µs: {ratio:.2}×",
                self.l2_p50, small.l2_p50
            ),
        );
        say(
            "open ≤ 2 s, close ≤ 2 s",
            self.open_s <= 2.0 && self.close_s <= 2.0,
            format!("{:.2} s, {:.2} s", self.open_s, self.close_s),
        );
        Ok(())
    }
}

/// One N's figures for the bucket commands: (wall s, objects or entries handled, peak RSS).
struct S3Row {
    n: usize,
    seed_s: f64,
    phases: [(f64, u64, u64); 4],
}

impl S3Row {
    fn header() -> String {
        [
            "| N entries (objects) | seed s | ls objects/s · MiB | index rebuild objects/s · MiB \
             | warm entries/s · MiB | gc (dry run) objects/s · MiB |",
            "|---|---|---|---|---|---|",
        ]
        .join("\n")
    }

    fn row(&self) -> String {
        let cell = |(wall, handled, rss): (f64, u64, u64)| {
            format!("{:.0} · {}", handled as f64 / wall.max(1e-9), mib(rss))
        };
        format!(
            "| {} ({}) | {:.1} | {} | {} | {} | {} |",
            self.n,
            3 * self.n,
            self.seed_s,
            cell(self.phases[0]),
            cell(self.phases[1]),
            cell(self.phases[2]),
            cell(self.phases[3]),
        )
    }
}

/// The bucket commands over N entries (3N objects: entry, metadata, pointer) in the test
/// suite's S3 server: seeded by a replay with S3, then `ls`, `index rebuild`, `warm` and
/// `gc --dry-run`, each in a new process on a new disk tier.
fn run_s3(bin: &Path, base: &[Value], n: usize) -> Result<S3Row> {
    let runtime = tokio::runtime::Runtime::new()?;
    let server = runtime.block_on(s3::TestS3::start())?;
    let tmp = tempfile::Builder::new()
        .prefix("strata-scale-s3-")
        .tempdir()?;
    let log = tmp.path().join("all.jsonl.zst");
    write_log(base, &log, n, 1)?;
    let log = log.to_string_lossy().into_owned();
    let config = tmp.path().join("strata.toml");
    std::fs::write(
        &config,
        format!(
            "{}close_timeout = \"1h\"\n",
            server.config_toml(&tmp.path().join("unused"))
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    let disk = |name: &str| tmp.path().join(name);
    eprintln!("S3, N = {n}: seeding the bucket");
    let seed = strata(
        bin,
        &disk("seed"),
        &["--config", &config, "replay", &log, "--json"],
    )?;
    eprintln!("S3, N = {n}: ls");
    let ls = strata(bin, &disk("ls"), &["--config", &config, "ls", "--json"])?;
    eprintln!("S3, N = {n}: index rebuild");
    let rebuild = strata(
        bin,
        &disk("rebuild"),
        &["--config", &config, "index", "rebuild"],
    )?;
    eprintln!("S3, N = {n}: warm");
    let warm = strata(bin, &disk("warm"), &["--config", &config, "warm"])?;
    eprintln!("S3, N = {n}: gc --dry-run");
    let gc = strata(
        bin,
        &disk("gc"),
        &["--config", &config, "gc", "--dry-run", "--json"],
    )?;
    let listed = field(&gc.json, "/s3/listed") as u64;
    if listed != 3 * n as u64 {
        bail!(
            "gc listed {listed} objects, not {}: the seed did not upload all",
            3 * n
        );
    }
    drop(server);
    Ok(S3Row {
        n,
        seed_s: seed.wall_s,
        phases: [
            (ls.wall_s, 2 * n as u64, ls.peak_rss),
            (rebuild.wall_s, 3 * n as u64, rebuild.peak_rss),
            (warm.wall_s, n as u64, warm.peak_rss),
            (gc.wall_s, 3 * n as u64, gc.peak_rss),
        ],
    })
}
