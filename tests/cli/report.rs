//! `strata report`: numbers to the cent, rollups that survive restarts, every format, and
//! reports merged across nodes.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::{json_of, n, s3_runtime, strata, write_config};

/// One exchange of the constructed workload.
fn exchange(
    model: &str,
    provider: &str,
    text: &str,
    cost: f64,
    tokens: (u64, u64),
    ms: u64,
) -> Value {
    let usage = if provider == "anthropic" {
        json!({"input_tokens": tokens.0, "output_tokens": tokens.1})
    } else {
        json!({"prompt_tokens": tokens.0, "completion_tokens": tokens.1})
    };
    json!({
        "request": {"model": model, "messages": [{"role": "user", "content": text}]},
        "response": {"id": format!("r-{text}"), "choices": [{"message": {"role": "assistant", "content": format!("answer to {text}")}}], "usage": usage},
        "provider": provider,
        "latency_ms": ms,
        "cost_usd": cost,
    })
}

/// A workload with known costs and repeats, in order:
/// - gpt-4o "a1" ($0.0125, 100+50 tokens, 900 ms) ×4, "a2" ($0.0031, 10+5, 100 ms) ×2, and "a1"
///   with a doubled inner space ×1 (a miss under `standard`, a hit under `aggressive`);
/// - claude-sonnet-4-5 "b1" ($0.20, 1000+500, 3 s) ×3, "b2" ($0.05, 40+20, 500 ms) ×1.
///
/// Expected: 11 requests, 6 hits, 5 misses, $0.4406 saved (3 × 0.0125 + 0.0031 + 2 × 0.20),
/// 3,465 tokens saved (3 × 150 + 15 + 2 × 1,500), 8,800 ms saved (3 × 900 + 100 + 2 × 3,000).
fn workload(dir: &Path) -> Result<PathBuf> {
    let a1 = exchange(
        "gpt-4o",
        "openai",
        "what is a  cache",
        0.0125,
        (100, 50),
        900,
    );
    let a1_spaced = exchange(
        "gpt-4o",
        "openai",
        "what is a cache",
        0.0125,
        (100, 50),
        900,
    );
    let a2 = exchange("gpt-4o", "openai", "name a tier", 0.0031, (10, 5), 100);
    let b1 = exchange(
        "claude-sonnet-4-5",
        "anthropic",
        "explain sled",
        0.20,
        (1000, 500),
        3000,
    );
    let b2 = exchange(
        "claude-sonnet-4-5",
        "anthropic",
        "explain moka",
        0.05,
        (40, 20),
        500,
    );
    let order = [&a1, &b1, &a2, &a1, &b1, &a1, &a2, &b2, &b1, &a1, &a1_spaced];
    let text: String = order.iter().map(|e| format!("{e}\n")).collect();
    let path = dir.join("workload.jsonl");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn run(dir: &Path, args: &[&str]) -> Result<Output> {
    let output = strata(dir)?.args(args).output()?;
    if !output.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

fn cents(v: &Value) -> i64 {
    (v.as_f64().unwrap_or(f64::NAN) * 100.0).round() as i64
}

fn usd(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn model<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["by_model"]
        .as_array()
        .and_then(|models| models.iter().find(|m| m["group"] == name))
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

#[test]
fn the_json_report_of_a_known_workload_is_right_to_the_cent_and_survives_restarts() -> Result<()> {
    let dir = TempDir::new()?;
    let file = workload(dir.path())?;
    let file = file.to_string_lossy().to_string();

    let replayed = run(dir.path(), &["replay", &file])?;
    let table = String::from_utf8(replayed.stdout)?;
    // The replay ends with the report's summary table.
    assert!(table.contains("cost saved $0.4406"), "{table}");
    assert!(
        table.contains("claude-sonnet-4-5") && table.contains("gpt-4o"),
        "{table}"
    );

    // A new process reads what the replay's process recorded.
    let report = json_of(&run(dir.path(), &["report", "--format", "json"])?)?;
    assert_eq!(n(&report, &["requests"]), 11, "{report}");
    assert_eq!(n(&report, &["hits", "l1"]), 6, "{report}");
    assert_eq!(n(&report, &["hits", "l2"]) + n(&report, &["hits", "l3"]), 0);
    assert_eq!(n(&report, &["misses"]), 5);
    assert_eq!(cents(&report["cost_saved_usd"]), 44);
    assert!(
        (usd(&report["cost_saved_usd"]) - 0.4406).abs() < 1e-9,
        "{report}"
    );
    assert_eq!(n(&report, &["tokens_saved"]), 3_465);
    assert_eq!(n(&report, &["latency_saved_ms"]), 8_800);
    assert!((report["hit_rate"].as_f64().unwrap_or(0.0) - 6.0 / 11.0).abs() < 1e-9);

    let gpt = model(&report, "gpt-4o");
    assert_eq!(
        (
            n(gpt, &["requests"]),
            n(gpt, &["hits", "l1"]),
            n(gpt, &["misses"])
        ),
        (7, 4, 3)
    );
    assert!((usd(&gpt["cost_saved_usd"]) - 0.0406).abs() < 1e-9, "{gpt}");
    assert_eq!(n(gpt, &["tokens_saved"]), 465);
    let claude = model(&report, "claude-sonnet-4-5");
    assert_eq!(
        (
            n(claude, &["requests"]),
            n(claude, &["hits", "l1"]),
            n(claude, &["misses"])
        ),
        (4, 2, 2)
    );
    assert!(
        (usd(&claude["cost_saved_usd"]) - 0.40).abs() < 1e-9,
        "{claude}"
    );
    assert_eq!(n(claude, &["tokens_saved"]), 3_000);

    // Hot keys come from the sketch: a1 was served three times, b1 twice.
    let hot = report["hot_keys"].as_array().context("hot_keys")?;
    assert_eq!(hot[0]["hits"], 3, "{report}");
    assert_eq!(hot[0]["model"], "gpt-4o");
    assert_eq!(hot[0]["preview"], "what is a cache");
    assert_eq!(hot[1]["hits"], 2);
    // The spaced variant missed under `standard` but would have hit under `aggressive`.
    let aggressive = report["suggestions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["kind"] == "aggressive_profile"))
        .context("no aggressive-profile suggestion")?;
    assert_eq!(aggressive["misses"], 1, "{aggressive}");
    assert!((usd(&aggressive["cost_usd"]) - 0.0125).abs() < 1e-9);

    // Cold entries: stored, never hit, older than the threshold (here: any age). Of the five
    // entries, the spaced variant and b2 were never served.
    let cold = strata(dir.path())?
        .args(["report", "--format", "json"])
        .env("STRATA_ANALYTICS_COLD_AFTER", "0s")
        .output()?;
    let cold = json_of(&cold)?;
    assert_eq!(n(&cold, &["cold", "entries"]), 2, "{cold}");
    assert!(n(&cold, &["cold", "bytes"]) > 0);
    assert_eq!(
        n(&report, &["cold", "entries"]),
        0,
        "none older than 7 days"
    );

    // A second process replays the same log: the rollups of both add up (and the first one's
    // stayed on disk), every lookup now a hit from L2 or L1.
    run(dir.path(), &["replay", &file])?;
    let twice = json_of(&run(dir.path(), &["report", "--format", "json"])?)?;
    assert_eq!(n(&twice, &["requests"]), 22, "{twice}");
    assert_eq!(n(&twice, &["misses"]), 5);
    assert_eq!(
        n(&twice, &["hits", "l2"]),
        5,
        "the five stored entries come back from disk"
    );
    // Every stored entry has now been served, the two cold ones first from the disk tier
    // (which keeps that hit in the copy's record, not among the analytics' hit marks).
    let cold = strata(dir.path())?
        .args(["report", "--format", "json"])
        .env("STRATA_ANALYTICS_COLD_AFTER", "0s")
        .output()?;
    assert_eq!(
        n(&json_of(&cold)?, &["cold", "entries"]),
        0,
        "cold after L2 hits"
    );
    // 0.4406 again for the repeats, plus 0.0125 × 2 + 0.0031 + 0.20 + 0.05 for the five L2 hits.
    assert!(
        (usd(&twice["cost_saved_usd"]) - (0.4406 * 2.0 + 0.2781)).abs() < 1e-9,
        "{twice}"
    );

    // CSV: a header and one row per group.
    let csv = String::from_utf8(
        run(
            dir.path(),
            &["report", "--format", "csv", "--by", "provider"],
        )?
        .stdout,
    )?;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[0].starts_with("group,requests,hit_rate,hits_l1"),
        "{csv}"
    );
    assert!(lines.iter().any(|l| l.starts_with("anthropic,8,")), "{csv}");
    assert!(lines.iter().any(|l| l.starts_with("openai,14,")), "{csv}");

    // --since/--until: nothing recorded in the future or a day ago.
    let empty = json_of(&run(
        dir.path(),
        &["report", "--format", "json", "--until", "2h"],
    )?)?;
    assert_eq!(n(&empty, &["requests"]), 0, "{empty}");
    let recent = json_of(&run(
        dir.path(),
        &["report", "--format", "json", "--since", "1h"],
    )?)?;
    assert_eq!(n(&recent, &["requests"]), 22);
    Ok(())
}

/// The Chromium binary to render HTML with (Debian's `chromium` package).
fn chromium() -> Result<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = std::process::Command::new("which").arg(name).output()
            && out.status.success()
        {
            return Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()));
        }
    }
    bail!("no Chromium found: install Debian's `chromium` package (scripts/test does)")
}

#[test]
fn the_html_report_opens_in_a_headless_browser_with_its_charts() -> Result<()> {
    let dir = TempDir::new()?;
    let file = workload(dir.path())?;
    run(dir.path(), &["replay", &file.to_string_lossy()])?;
    let html = dir.path().join("report.html");
    run(
        dir.path(),
        &[
            "report",
            "--format",
            "html",
            "--out",
            &html.to_string_lossy(),
        ],
    )?;
    let page = std::fs::read_to_string(&html)?;
    // Self-contained: nothing is fetched from elsewhere (SVG's xmlns is a name, not a fetch).
    for fetch in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!page.contains(fetch), "{fetch} in the page");
    }

    let profile = TempDir::new()?;
    let output = std::process::Command::new(chromium()?)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", html.display()))
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dom = String::from_utf8_lossy(&output.stdout);
    // The page's script ran and found three drawn charts.
    assert!(dom.contains(r#"data-charts="3""#), "{dom}");
    for id in ["hit-rate", "cost-per-day", "per-model"] {
        assert!(dom.contains(&format!(r#"id="{id}""#)), "{id} missing");
    }
    let log = String::from_utf8_lossy(&output.stderr);
    let console_errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect();
    assert!(console_errors.is_empty(), "{console_errors:?}");
    Ok(())
}

#[test]
fn a_report_across_nodes_is_the_sum_of_each_nodes_report() -> Result<()> {
    let (runtime, server) = s3_runtime()?;
    let (node_a, node_b) = (TempDir::new()?, TempDir::new()?);
    let config_of = |dir: &Path| -> Result<String> {
        let path = write_config(dir, &server.config_toml(&dir.join("l2")))?;
        Ok(path.to_string_lossy().to_string())
    };
    let (config_a, config_b) = (config_of(node_a.path())?, config_of(node_b.path())?);

    // Two halves of the example log, one per node, each drawn with repeats.
    let lines = zstd::decode_all(std::fs::File::open(super::example())?)?;
    let lines: Vec<&[u8]> = lines
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let (first, second) = lines.split_at(lines.len() / 2);
    for (dir, half) in [(&node_a, first), (&node_b, second)] {
        let path = dir.path().join("half.jsonl");
        std::fs::write(&path, half.join(&b'\n'))?;
    }
    for (dir, config) in [(&node_a, &config_a), (&node_b, &config_b)] {
        let half = dir.path().join("half.jsonl").to_string_lossy().to_string();
        run(
            dir.path(),
            &[
                "--config",
                config,
                "replay",
                &half,
                "--repeat-zipf",
                "1.1",
                "--limit",
                "600",
            ],
        )?;
    }
    let report = |dir: &Path, config: &str, all: bool| -> Result<Value> {
        let mut args = vec!["--config", config, "report", "--format", "json"];
        if all {
            args.push("--all-nodes");
        }
        json_of(&run(dir, &args)?)
    };
    let a = report(node_a.path(), &config_a, false)?;
    let b = report(node_b.path(), &config_b, false)?;
    let all = report(node_a.path(), &config_a, true)?;
    assert_eq!(all["nodes"].as_array().map(Vec::len), Some(2), "{all}");
    for path in [
        &["requests"][..],
        &["misses"],
        &["hits", "l1"],
        &["hits", "l2"],
        &["hits", "l3"],
        &["tokens_saved"],
        &["latency_saved_ms"],
    ] {
        assert_eq!(n(&all, path), n(&a, path) + n(&b, path), "{path:?}");
    }
    assert_eq!(n(&all, &["requests"]), 1_200);
    let cost = |r: &Value| usd(&r["cost_saved_usd"]);
    assert!((cost(&all) - cost(&a) - cost(&b)).abs() < 1e-6, "{all}");
    assert!(cost(&all) > 0.0);
    let models = |r: &Value| -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = r["by_model"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["group"].as_str().unwrap_or("").to_owned(),
                    n(m, &["requests"]),
                )
            })
            .collect();
        out.sort();
        out
    };
    let mut summed = std::collections::BTreeMap::new();
    for (name, requests) in models(&a).into_iter().chain(models(&b)) {
        *summed.entry(name).or_insert(0) += requests;
    }
    assert_eq!(models(&all), summed.into_iter().collect::<Vec<_>>());

    // The per-node daily documents are where the README says.
    let keys = runtime.block_on(server.keys())?;
    let docs: Vec<&String> = keys.iter().filter(|k| k.contains("/analytics/")).collect();
    assert_eq!(docs.len(), 2, "{docs:?}");
    assert!(
        docs.iter()
            .all(|k| k.ends_with(&format!("{}.json", chrono::Utc::now().format("%Y-%m-%d"))))
    );
    Ok(())
}

/// Runs `strata args…` in `dir` with `env` to its end and returns what it printed and its peak
/// RSS, over the whole process. The kernel's figure (`ru_maxrss`) of a child includes the
/// high-water mark of the process that spawned it (it is carried across `exec`), and this test
/// process may have been large: so a small Python process spawns strata and reports its
/// children's figure.
fn with_peak_rss(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<(Output, u64)> {
    let measure = "import resource, subprocess, sys\n\
        done = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL)\n\
        sys.stderr.write('peak-rss-kib %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n\
        sys.exit(done.returncode)\n";
    let mut cmd = std::process::Command::new("python3");
    cmd.current_dir(dir)
        .env_remove("STRATA_CONFIG")
        .arg("-c")
        .arg(measure)
        .arg(assert_cmd::cargo::cargo_bin("strata"))
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let kib: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak-rss-kib "))
        .with_context(|| format!("no peak RSS reported: {stderr}"))?
        .trim()
        .parse()?;
    Ok((output, kib * 1024))
}

/// The scans of `report` (every stored entry read and decoded, for the cold entries) and of
/// `stats` do not keep what they read: over 160 entries of about 1 MiB each, each command's
/// peak RSS, opening and closing included, stays under half of what the disk tier holds.
#[test]
fn the_report_and_stats_scans_do_not_keep_what_they_read() -> Result<()> {
    let dir = TempDir::new()?;
    // Text zstd can barely shrink: random characters of a 64-letter alphabet.
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut random_text = |len: usize| -> String {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                alphabet[(state >> 58) as usize] as char
            })
            .collect()
    };
    // Written as it is made: this process stays small.
    let log = dir.path().join("large.jsonl");
    let mut lines = std::io::BufWriter::new(std::fs::File::create(&log)?);
    for i in 0..160 {
        let mut line = exchange(
            "gpt-4o",
            "openai",
            &format!("large {i}"),
            0.01,
            (10, 10),
            100,
        );
        line["response"]["choices"][0]["message"]["content"] = Value::from(random_text(1 << 20));
        serde_json::to_writer(&mut lines, &line)?;
        std::io::Write::write_all(&mut lines, b"\n")?;
    }
    std::io::Write::flush(&mut lines)?;
    drop(lines);
    let replayed = strata(dir.path())?
        .args(["replay", "--json"])
        .arg(&log)
        .env("STRATA_MEMORY_CAPACITY", "8MiB")
        .output()?;
    assert_eq!(n(&json_of(&replayed)?, &["misses"]), 160);
    std::fs::remove_file(&log)?;

    let small = [("STRATA_MEMORY_CAPACITY", "8MiB")];
    let (output, stats_rss) = with_peak_rss(dir.path(), &["stats", "--json"], &small)?;
    let stats = json_of(&output)?;
    assert_eq!(n(&stats, &["disk", "entries"]), 160, "{stats}");
    let held = n(&stats, &["disk", "bytes"]);
    assert!(held > 100 << 20, "the entries hold {held} bytes");

    let (output, report_rss) = with_peak_rss(
        dir.path(),
        &["report", "--format", "json"],
        &[small[0], ("STRATA_ANALYTICS_COLD_AFTER", "0s")],
    )?;
    let report = json_of(&output)?;
    assert_eq!(
        n(&report, &["cold", "entries"]),
        160,
        "every entry was read"
    );
    assert_eq!(n(&report, &["cold", "bytes"]), held, "and counted");

    eprintln!(
        "peak RSS: stats {} MiB, report {} MiB, held {} MiB",
        stats_rss >> 20,
        report_rss >> 20,
        held >> 20
    );
    for (command, rss) in [("stats", stats_rss), ("report", report_rss)] {
        assert!(
            rss < held / 2,
            "{command} peaked at {} MiB over {} MiB held",
            rss >> 20,
            held >> 20
        );
    }
    Ok(())
}
