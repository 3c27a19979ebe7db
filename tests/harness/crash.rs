//! The crash harness: a process writing to the disk tier is killed (`kill -9`) at a random
//! moment, the store is reopened, and every lookup is checked against the log of what the
//! process confirmed. (Its first long runs found two flaws in the harness itself: an
//! invalidation done but not yet logged when the kill came read as a lost entry, and a line the
//! kill cut, continued by the next writer's `started` line, hid where that writer began. The
//! writer now logs its intent before the call and its completion after, and starts on a line of
//! its own.) Each round must show 0 wrong answers, 0 lost entries among those a flush
//! confirmed, and every invalidation made before the kill still in force.
//!
//! The writer is this same test binary, run again as a child with `STRATA_CRASH_WRITER` set
//! (as sled's crash tests do). `STRATA_CRASH_ROUNDS` sets the number of rounds (10 by default;
//! `scripts/soak` runs 100).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use strata::core::{Codec, Selector};
use strata::tiers::{DiskConfig, DiskTier, EpochStore};
use strata::{Completion, Scope, TieredCache};

const WRITER: &str = "STRATA_CRASH_WRITER";
const TEST: &str = "crash::a_writer_killed_at_any_moment_loses_nothing_it_confirmed";

fn request(i: u64) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("question {i}")}]})
}

fn answer(i: u64) -> String {
    format!("answer {i}")
}

fn open(dir: &Path) -> Result<TieredCache> {
    let disk = DiskTier::open(&DiskConfig::new(dir.join("l2")), Codec::default())?;
    Ok(TieredCache::builder()
        .epochs(EpochStore::open(&disk)?)
        .disk(disk)
        .build())
}

/// What the writer's log says: the last index a flush confirmed, and what it invalidated.
fn read_log(dir: &Path) -> Result<(Option<u64>, BTreeSet<u64>, u64)> {
    // (A `Result` for the read; the parse of a line is lenient.)
    let text = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    let (mut flushed, mut invalidated, mut next) = (None, BTreeSet::new(), 0);
    for line in text.lines() {
        // A line cut by the kill has no newline: `lines` still yields it, so only whole
        // numbers count (the writer ends every line it means with `;`).
        let Some(line) = line.strip_suffix(';') else {
            continue;
        };
        // A line a kill tore and the next writer went on (`flushed 19started 5000;`) reads
        // as nothing: not a confirmation.
        let Some((word, n)) = line.split_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match word {
            "flushed" => {
                flushed = Some(n);
                next = next.max(n + 1);
            }
            "invalidated" => {
                invalidated.insert(n);
            }
            "started" => next = next.max(n),
            _ => {}
        }
    }
    Ok((flushed, invalidated, next))
}

/// The child: writes from where the log says, flushing and logging every 10 puts and
/// invalidating one earlier key every 25, until it is killed.
async fn write_until_killed(dir: &Path) -> Result<()> {
    let (_, _, start) = read_log(dir)?;
    // Past everything an earlier round may have written and not logged.
    let start = start + 1000;
    let cache = open(dir)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))?;
    // On a line of its own: the last writer's last line may have been cut by the kill.
    writeln!(log, "\nstarted {start};")?;
    log.sync_data()?;
    for i in start.. {
        let response =
            json!({"choices": [{"message": {"role": "assistant", "content": answer(i)}}]});
        cache
            .put(
                &request(i),
                &Scope::Global,
                Completion::from_value(&response).provider("openai"),
            )
            .await?;
        if i % 10 == 9 {
            cache.flush().await?;
            writeln!(log, "flushed {i};")?;
            log.sync_data()?;
        }
        if i % 25 == 24 {
            let victim = i - 7;
            // Said before (a kill during the call may leave the entry either way) and after
            // (from then on it must hold).
            writeln!(log, "invalidating {victim};")?;
            log.sync_data()?;
            let key = cache.key(&request(victim), &Scope::Global)?;
            cache.invalidate(&Selector::Key(key.key.hex())).await?;
            writeln!(log, "invalidated {victim};")?;
            log.sync_data()?;
        }
    }
    Ok(())
}

/// The lookups after a kill: every answer right, nothing confirmed lost, every invalidation
/// holding. Returns how many entries were checked.
async fn check(dir: &Path, round: u32) -> Result<usize> {
    let (_, invalidated, _) = read_log(dir)?;
    let text = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    // Each writer's first index and the last one a flush confirmed.
    let mut writers: Vec<(u64, u64)> = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_suffix(';')) {
        if let Some(n) = line.strip_prefix("started ").and_then(|n| n.parse().ok()) {
            writers.push((n, n));
        } else if let Some(n) = line.strip_prefix("flushed ").and_then(|n| n.parse().ok())
            && let Some(last) = writers.last_mut()
        {
            last.1 = n;
        }
    }
    let cache = open(dir)?;
    let mut checked = 0;
    // Every index each writer may have reached: from its start to past its last flush (it
    // flushes every 10 puts, so what it wrote unconfirmed is fewer than that).
    for &(start, last) in &writers {
        for i in start..last + 50 {
            let found = cache.get(&request(i), &Scope::Global).await?;
            match found {
                Some(lookup) => {
                    let served: Value = lookup.entry.response_as()?;
                    let text = served["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap_or("");
                    anyhow::ensure!(
                        text == answer(i),
                        "round {round}: question {i} answered `{text}`"
                    );
                    anyhow::ensure!(
                        !invalidated.contains(&i),
                        "round {round}: question {i} was invalidated before the kill and is served"
                    );
                    checked += 1;
                }
                None => {
                    let taken_back = text.contains(&format!("invalidating {i};"));
                    anyhow::ensure!(
                        !flushed_covers(&text, i) || taken_back,
                        "round {round}: question {i} was confirmed by a flush and is lost"
                    );
                }
            }
        }
    }
    cache.close().await?;
    Ok(checked)
}

/// Whether a `flushed` line at or after `i` was written by the writer that wrote `i`.
fn flushed_covers(log: &str, i: u64) -> bool {
    let mut writer_start = None;
    for line in log.lines() {
        let Some(line) = line.strip_suffix(';') else {
            continue;
        };
        if let Some(n) = line
            .strip_prefix("started ")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if n > i {
                return false;
            }
            writer_start = Some(n);
        }
        if let Some(n) = line
            .strip_prefix("flushed ")
            .and_then(|n| n.parse::<u64>().ok())
            && writer_start.is_some_and(|s| s <= i)
            && n >= i
        {
            return true;
        }
    }
    false
}

#[test]
fn a_writer_killed_at_any_moment_loses_nothing_it_confirmed() -> Result<()> {
    if let Ok(dir) = std::env::var(WRITER) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        return runtime.block_on(write_until_killed(Path::new(&dir)));
    }
    let rounds: u32 = std::env::var("STRATA_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::TempDir::new()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let exe = std::env::current_exe()?;
    let mut seed: u64 = std::process::id().into();
    let mut total = 0;
    for round in 0..rounds {
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
            .env(WRITER, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the writer")?;
        // A random moment: 150 to 900 ms in (the writer opens the store in about 50 ms).
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(150 + (seed >> 33) % 750));
        child.kill()?;
        child.wait()?;
        total += runtime.block_on(check(dir.path(), round))?;
    }
    let (flushed, invalidated, _) = read_log(dir.path())?;
    anyhow::ensure!(
        flushed.is_some(),
        "no writer ever confirmed a flush: the harness tested nothing"
    );
    anyhow::ensure!(
        !invalidated.is_empty(),
        "no invalidation was made before a kill"
    );
    anyhow::ensure!(total > 0, "nothing was served");
    Ok(())
}
