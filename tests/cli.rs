//! The `strata` command, run as a user runs it, in a fresh directory each time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, Result};
use assert_cmd::Command;
use serde_json::Value;
use tempfile::TempDir;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sharegpt-400.jsonl.zst")
}

fn strata(dir: &Path) -> Result<Command> {
    let mut cmd = Command::cargo_bin("strata")?;
    cmd.current_dir(dir).env_remove("STRATA_CONFIG");
    Ok(cmd)
}

fn json_of(output: &Output) -> Result<Value> {
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "stdout is not JSON: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn replay(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Value> {
    let mut cmd = strata(dir)?;
    cmd.arg("replay").arg(example()).args(args).arg("--json");
    for (k, v) in env {
        cmd.env(k, v);
    }
    succeeded_json(&cmd.output()?)
}

/// What a successful run printed; a failed run fails the test with its stderr.
fn succeeded_text(output: Output) -> Result<String> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The JSON a successful run printed; a failed run fails the test with its stderr.
fn succeeded_json(output: &Output) -> Result<Value> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    json_of(output)
}

fn n(report: &Value, path: &[&str]) -> u64 {
    let mut v = report;
    for p in path {
        v = &v[*p];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("{path:?} missing in {report}"))
}

fn assert_adds_up(report: &Value) {
    let hits = n(report, &["hits", "l1"])
        + n(report, &["hits", "l2"])
        + n(report, &["hits", "l3"])
        + n(report, &["hits", "coalesced"]);
    assert_eq!(
        hits + n(report, &["misses"]),
        n(report, &["requests"]),
        "{report}"
    );
    let rate = report["hit_rate"].as_f64().unwrap_or(-1.0);
    assert!((rate - hits as f64 / n(report, &["requests"]) as f64).abs() < 1e-9);
}

#[test]
fn zipf_replay_is_served_from_memory_and_its_numbers_add_up() -> Result<()> {
    let dir = TempDir::new()?;
    let report = replay(
        dir.path(),
        &["--repeat-zipf", "1.1", "--limit", "20000"],
        &[],
    )?;
    assert_eq!(n(&report, &["requests"]), 20_000);
    assert!(n(&report, &["hits", "l1"]) > 15_000, "{report}");
    assert_eq!(n(&report, &["skipped_lines"]), 0);
    assert!(report["cost_saved_usd"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(n(&report, &["tokens_saved"]) > 0);
    assert_adds_up(&report);
    Ok(())
}

#[test]
fn a_small_memory_tier_sends_lookups_to_disk() -> Result<()> {
    let dir = TempDir::new()?;
    let report = replay(
        dir.path(),
        &["--repeat-zipf", "1.1", "--limit", "5000"],
        &[("STRATA_MEMORY_CAPACITY", "64KiB")],
    )?;
    assert!(n(&report, &["hits", "l2"]) > 1000, "{report}");
    assert_adds_up(&report);
    Ok(())
}

#[test]
fn a_second_replay_in_a_new_process_is_served_from_disk() -> Result<()> {
    let dir = TempDir::new()?;
    let first = replay(dir.path(), &["--limit", "200"], &[])?;
    assert_eq!(n(&first, &["misses"]), 200);
    let second = replay(dir.path(), &["--limit", "200"], &[])?;
    assert_eq!(n(&second, &["hits", "l2"]), 200, "{second}");
    assert_eq!(n(&second, &["misses"]), 0);
    assert_adds_up(&second);
    // And the lifetime statistics count both runs.
    let output = strata(dir.path())?.args(["stats", "--json"]).output()?;
    assert!(output.status.success());
    let stats = json_of(&output)?;
    assert_eq!(n(&stats, &["lifetime", "lookups"]), 400);
    assert_eq!(n(&stats, &["lifetime", "hits", "l2"]), 200);
    assert_eq!(n(&stats, &["disk", "entries"]), 200);
    Ok(())
}

/// A disk that fills up mid-run (here: a file-size limit, which fails sled's writes with
/// `EFBIG` as a full disk fails them with `ENOSPC`) costs the cache its L2 copies, never the
/// caller's answers; the failures are counted and warned about without flooding the terminal,
/// and the next process opens the same directory and serves what was written.
#[test]
fn a_full_disk_costs_l2_copies_not_answers_and_the_directory_still_opens() -> Result<()> {
    let dir = TempDir::new()?;
    let strata_bin = assert_cmd::cargo::cargo_bin("strata");
    // 256 KiB of file for a run whose 400 entries need about 800 KiB; SIGXFSZ ignored, so the
    // write fails instead of killing the process.
    let output = std::process::Command::new("bash")
        .args(["-c", r#"trap "" XFSZ; ulimit -f 256; exec "$0" "$@""#])
        .arg(&strata_bin)
        .arg("replay")
        .arg(example())
        .args(["--limit", "400", "--json"])
        .current_dir(dir.path())
        .env_remove("STRATA_CONFIG")
        .output()?;
    let full = succeeded_json(&output)?;
    assert_eq!(n(&full, &["requests"]), 400);
    assert_eq!(n(&full, &["misses"]), 400, "{full}");
    assert!(n(&full, &["tier_errors"]) > 0, "no write failed: {full}");
    assert_adds_up(&full);
    // Said, not shouted: one warning per tier and interval, however many writes failed.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let warnings = stderr.matches("cache tier failed").count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} warnings:\n{stderr}"
    );
    // sled's own lines repeat the same failure once per tree; strata's warnings carry it.
    assert!(!stderr.contains("sled::"), "sled's own lines:\n{stderr}");
    // Standard error is a pipe here: no terminal colours in it.
    assert!(!stderr.contains('\u{1b}'), "escape codes:\n{stderr}");

    let after = replay(dir.path(), &["--limit", "400"], &[])?;
    let from_disk = n(&after, &["hits", "l2"]);
    assert!(from_disk > 0 && from_disk < 400, "{after}");
    assert_eq!(n(&after, &["misses"]), 400 - from_disk, "{after}");
    assert_eq!(n(&after, &["tier_errors"]), 0, "{after}");
    assert_adds_up(&after);
    Ok(())
}

/// Output into a pipe nobody reads (`strata … | head -1` once `head` is done) is dropped
/// quietly: the command does its work, exits as it would have and closes the cache cleanly,
/// where `println!` and `eprintln!` would have panicked.
#[test]
fn a_closed_stdout_loses_the_output_not_the_work() -> Result<()> {
    let dir = TempDir::new()?;
    for args in [
        &["replay", "--limit", "200"][..],
        &["report", "--format", "html"][..],
        &["stats"][..],
    ] {
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("strata"));
        cmd.current_dir(dir.path())
            .env_remove("STRATA_CONFIG")
            .args(args);
        if args[0] == "replay" {
            cmd.arg(example());
        }
        let output = cmd.stdout(writer).output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The unread replay stored its entries and closed the cache: all 200 are served from disk.
    let after = replay(dir.path(), &["--limit", "200"], &[])?;
    assert_eq!(n(&after, &["hits", "l2"]), 200, "{after}");

    // A miss says so on standard error; with standard error gone it still exits 1, not 101.
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "never asked"}]}"#,
    )?;
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let status = std::process::Command::new(assert_cmd::cargo::cargo_bin("strata"))
        .current_dir(dir.path())
        .env_remove("STRATA_CONFIG")
        .arg("get")
        .arg("--request")
        .arg(&request)
        .stderr(writer)
        .status()?;
    assert_eq!(status.code(), Some(1));
    Ok(())
}

/// Durations past what a date can hold are "never" where that is their meaning (a TTL, the age
/// of cold entries) and a one-line error where they are not (a report's period), never a panic;
/// a channel too large to allocate is a configuration error that names the key.
#[test]
fn absurd_durations_and_sizes_are_never_panics() -> Result<()> {
    let dir = TempDir::new()?;
    let forever = [
        ("STRATA_TTL_DEFAULT", "1000000y"),
        ("STRATA_ANALYTICS_COLD_AFTER", "1000000y"),
    ];
    let first = replay(dir.path(), &["--limit", "50"], &forever)?;
    assert_eq!(n(&first, &["misses"]), 50, "{first}");
    let again = replay(dir.path(), &["--limit", "50"], &forever)?;
    assert_eq!(n(&again, &["misses"]), 0, "never expired: {again}");
    let mut report = strata(dir.path())?;
    report.args(["report", "--format", "json"]).envs(forever);
    succeeded_json(&report.output()?)?;

    let no_panic = |args: &[&str], env: &[(&str, &str)], says: &str| -> Result<()> {
        let output = strata(dir.path())?
            .args(args)
            .envs(env.iter().copied())
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        Ok(())
    };
    no_panic(&["report", "--since", "1000000y"], &[], "--since: too long")?;
    no_panic(
        &["report", "--until", "1000000y"],
        &[],
        "--until: duration too long",
    )?;
    no_panic(
        &["stats"],
        &[("STRATA_ANALYTICS_CHANNEL_CAPACITY", "1000000000000000000")],
        "analytics.channel_capacity must be between 1 and",
    )?;

    // A cost that is no amount of money is refused before anything is stored; `never` is a TTL.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let request = examples.join("request.json");
    let request = request.to_str().context("path")?;
    let response = examples.join("response.json");
    let response = response.to_str().context("path")?;
    let put = ["put", "--request", request, "--response", response];
    for cost in ["NaN", "inf", "-5"] {
        let flag = format!("--cost-usd={cost}");
        let args = [&put[..], &[flag.as_str()]].concat();
        no_panic(&args, &[], "is not an amount of USD")?;
    }
    let args = [&put[..], &["--ttl", "never", "--cost-usd", "0.5"]].concat();
    let stored = strata(dir.path())?.args(&args).output()?;
    assert!(
        stored.status.success(),
        "{}",
        String::from_utf8_lossy(&stored.stderr)
    );
    let entry = strata(dir.path())?
        .args(["get", "--entry", "--request", request])
        .output()?;
    let entry = succeeded_json(&entry)?;
    assert_eq!(entry["expires_at"], Value::Null, "{entry}");
    assert_eq!(entry["cost"]["total"], 0.5, "{entry}");
    Ok(())
}

#[test]
fn user_scoped_replay_keeps_users_apart() -> Result<()> {
    let dir = TempDir::new()?;
    let log = dir.path().join("users.jsonl");
    let line = |user: &str| {
        format!(
            r#"{{"request": {{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "hi"}}]}}, "response": {{"usage": {{"prompt_tokens": 1000, "completion_tokens": 1000}}}}, "provider": "openai", "user": "{user}"}}"#
        )
    };
    // The last line has no user: it must not be served what a user named "anonymous" asked.
    let no_user = line("x").replace(r#", "user": "x""#, "");
    std::fs::write(
        &log,
        [
            line("a"),
            line("b"),
            line("a"),
            line("b"),
            line("anonymous"),
            no_user,
        ]
        .join("\n"),
    )?;
    let run = |scope: &str| -> Result<Value> {
        let output = strata(dir.path())?
            .args(["replay", "--json", "--scope", scope])
            .arg(&log)
            .env("STRATA_DISK_ENABLED", "false")
            .output()?;
        json_of(&output)
    };
    let by_user = run("user")?;
    assert_eq!(n(&by_user, &["misses"]), 4, "{by_user}");
    assert_eq!(n(&by_user, &["hits", "l1"]), 2, "{by_user}");
    let global = run("global")?;
    assert_eq!(n(&global, &["misses"]), 1);
    assert_eq!(n(&global, &["hits", "l1"]), 5);
    // Priced from usage: 1000 input + 1000 output tokens of gpt-4o-mini at $0.15 / $0.60 per 1M.
    let saved = global["cost_saved_usd"].as_f64().unwrap_or(0.0);
    assert!((saved - 5.0 * 0.00075).abs() < 1e-12, "{saved}");
    Ok(())
}

#[test]
fn malformed_lines_are_skipped_and_reported_by_number() -> Result<()> {
    let dir = TempDir::new()?;
    let good = zstd::decode_all(std::fs::File::open(example())?)?;
    let lines: Vec<&[u8]> = good.split(|b| *b == b'\n').take(3).collect();
    let log = dir.path().join("mixed.jsonl");
    let mut file = std::fs::File::create(&log)?;
    file.write_all("\u{feff}".as_bytes())?; // a byte-order mark is not a malformed line
    file.write_all(lines[0])?;
    file.write_all(b"\n{\"request\": not json\n")?;
    file.write_all(lines[1])?;
    file.write_all(b"\n{\"response\": {}}\n")?;
    file.write_all(lines[2])?;
    file.write_all(b"\n")?;
    drop(file);
    let output = strata(dir.path())?
        .args(["replay", "--json"])
        .arg(&log)
        .output()?;
    assert!(output.status.success());
    let report = json_of(&output)?;
    assert_eq!(n(&report, &["requests"]), 3);
    assert_eq!(n(&report, &["skipped_lines"]), 2);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("skipped line 2"), "{stderr}");
    assert!(stderr.contains("skipped line 4"), "{stderr}");
    Ok(())
}

#[test]
fn a_truncated_log_ends_where_it_breaks_and_standard_input_is_a_log() -> Result<()> {
    let dir = TempDir::new()?;
    let compressed = std::fs::read(example())?;
    // Cut inside the stream, under a name that does not say zstd: the first bytes do.
    let cut = dir.path().join("cut.jsonl");
    std::fs::write(&cut, &compressed[..compressed.len() / 3])?;
    let output = strata(dir.path())?
        .args(["replay", "--json"])
        .arg(&cut)
        .timeout(std::time::Duration::from_secs(120))
        .output()?;
    let report = succeeded_json(&output)?;
    assert_eq!(n(&report, &["skipped_lines"]), 1, "{report}");
    let requests = n(&report, &["requests"]);
    assert!(requests > 0 && requests < 400, "{report}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("skipped line {} ", requests + 1))
            && stderr.contains("read error"),
        "{stderr}"
    );

    let piped = strata(dir.path())?
        .args(["replay", "-", "--json", "--limit", "50"])
        .write_stdin(compressed)
        .timeout(std::time::Duration::from_secs(120))
        .output()?;
    let report = succeeded_json(&piped)?;
    assert_eq!(n(&report, &["requests"]), 50);
    assert_eq!(n(&report, &["skipped_lines"]), 0);
    assert!(n(&report, &["memory_peak_bytes"]) > 0, "{report}");
    assert_adds_up(&report);
    Ok(())
}

/// Ctrl-C in the middle of a long replay: the request in flight finishes, the counters are
/// saved (`stats` agrees with the report) and the report covers what ran.
/// Starts a replay that would run for hours, with its output piped, and returns once it has
/// opened its cache (its database is on disk): by then its Ctrl-C handler is installed.
fn long_replay(dir: &Path) -> Result<std::process::Child> {
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("strata"))
        .current_dir(dir)
        .env_remove("STRATA_CONFIG")
        .arg("replay")
        .arg(example())
        .args(["--repeat-zipf", "0.5", "--limit", "100000000", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let started = std::time::Instant::now();
    while !dir.join(".strata/db").exists() {
        anyhow::ensure!(
            started.elapsed().as_secs() < 60,
            "the replay never opened its cache"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(child)
}

#[test]
fn ctrl_c_stops_a_replay_that_still_saves_and_reports() -> Result<()> {
    let dir = TempDir::new()?;
    let child = long_replay(dir.path())?;
    // Let some requests run.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let signalled = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(signalled.success());
    let output = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("replay interrupted after"), "{stderr}");
    let report = json_of(&output)?;
    assert_eq!(report["interrupted"], true);
    let requests = n(&report, &["requests"]);
    assert!(requests > 0 && requests < 100_000_000, "{report}");
    assert_adds_up(&report);

    let stats = strata(dir.path())?.args(["stats", "--json"]).output()?;
    let stats = succeeded_json(&stats)?;
    assert_eq!(n(&stats, &["lifetime", "lookups"]), requests, "{stats}");
    Ok(())
}

/// A replay killed outright (`kill -9`, a crash) keeps the lifetime counters it had saved a
/// second or so before: `stats` does not start again from zero.
#[test]
fn a_killed_replay_keeps_its_counters_up_to_the_last_second() -> Result<()> {
    let dir = TempDir::new()?;
    let mut child = long_replay(dir.path())?;
    // Two saves, and sled's log written after them (every 500 ms).
    std::thread::sleep(std::time::Duration::from_millis(3000));
    child.kill()?;
    child.wait()?;

    let stats = strata(dir.path())?.args(["stats", "--json"]).output()?;
    let stats = succeeded_json(&stats)?;
    assert!(n(&stats, &["lifetime", "lookups"]) > 0, "{stats}");
    Ok(())
}

#[test]
fn a_missing_file_or_a_bad_config_fails_with_one_line() -> Result<()> {
    let dir = TempDir::new()?;
    let check = |output: Output, expect: &str| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expect), "{stderr} lacks {expect}");
    };
    // Writes a configuration file, runs `stats` with it and checks the one-line error.
    let config_fails = |check: &dyn Fn(Output, &str), name: &str, text: &str, expect: &str| {
        std::fs::write(dir.path().join(name), text)?;
        check(
            strata(dir.path())?
                .args(["--config", name, "stats"])
                .output()?,
            expect,
        );
        anyhow::Ok(())
    };
    check(
        strata(dir.path())?
            .args(["replay", "nowhere.jsonl"])
            .output()?,
        "nowhere.jsonl",
    );
    config_fails(
        &check,
        "typo.toml",
        "[memory]\ncapcity = \"1GiB\"\n",
        "capcity",
    )?;
    config_fails(
        &check,
        "bad.toml",
        "[memory]\ncapacity = \"lots\"\n",
        "memory.capacity",
    )?;
    check(
        strata(dir.path())?
            .args(["stats"])
            .env("STRATA_TTL_DEFAULT", "soon")
            .output()?,
        "soon",
    );
    // A syntax error: the parser's source snippet is left out, its place is kept.
    config_fails(
        &check,
        "unclosed.toml",
        "[memory]\ncapacity = \"256MiB\n",
        "TOML parse error at line 2, column 19: invalid basic string",
    )?;
    check(
        strata(dir.path())?
            .args(["--config", "absent.toml", "stats"])
            .output()?,
        "absent.toml",
    );
    std::fs::write(
        dir.path().join("prices.toml"),
        "[models]\nx = { input = \"a\", output = 1.0 }\n",
    )?;
    check(
        strata(dir.path())?
            .args(["stats"])
            .env("STRATA_PRICING_FILE", "prices.toml")
            .output()?,
        "pricing.file prices.toml: pricing table: invalid type: string \"a\", expected f64 at line 2",
    );
    // A bare number from the environment is read as the same text in a file would be.
    let zero = strata(dir.path())?
        .args(["stats"])
        .env("STRATA_TTL_DEFAULT", "0")
        .output()?;
    assert!(
        zero.status.success(),
        "{}",
        String::from_utf8_lossy(&zero.stderr)
    );
    Ok(())
}

#[test]
fn put_get_and_explain_from_the_command_line() -> Result<()> {
    let dir = TempDir::new()?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let request = examples.join("request.json");
    let put = strata(dir.path())?
        .args(["put", "--tag", "demo", "--provider", "openai", "--request"])
        .arg(&request)
        .arg("--response")
        .arg(examples.join("response.json"))
        .output()?;
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let key = String::from_utf8(put.stdout)?.trim().to_string();
    assert!(
        key.starts_with("gpt-4o-mini_") && key.len() == "gpt-4o-mini_".len() + 32,
        "{key}"
    );

    let got = strata(dir.path())?
        .args(["get", "--request"])
        .arg(&request)
        .output()?;
    assert!(got.status.success());
    let response = json_of(&got)?;
    assert_eq!(
        response["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );

    let other_user = strata(dir.path())?
        .args(["get", "--user", "mallory", "--request"])
        .arg(&request)
        .output()?;
    assert_eq!(other_user.status.code(), Some(1));

    let explained = strata(dir.path())?
        .args(["explain", "--json", "--request"])
        .arg(&request)
        .output()?;
    let explanation = json_of(&explained)?;
    assert_eq!(explanation["key"], key.as_str());
    let action = |field: &str| {
        explanation["fields"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["field"] == field))
            .map(|f| f["action"].clone())
    };
    assert_eq!(action("user"), Some(Value::from("dropped")));
    assert_eq!(action("messages"), Some(Value::from("transformed")));

    // The same request saved with a byte-order mark is the same request.
    let with_bom = dir.path().join("request-bom.json");
    let mut bytes = "\u{feff}".as_bytes().to_vec();
    bytes.extend(std::fs::read(&request)?);
    std::fs::write(&with_bom, bytes)?;
    let explained = strata(dir.path())?
        .args(["explain", "--json", "--request"])
        .arg(&with_bom)
        .output()?;
    assert_eq!(json_of(&explained)?["key"], key.as_str());
    Ok(())
}

/// 20,000 distinct exchanges (variants of the examples) through a 32 MiB memory tier, which they
/// overflow about three times. The disk tier is off here: sled's resident memory grows with the
/// data it holds whatever its `cache_capacity` (see ARCHITECTURE.md), and this test is about the
/// memory tier and the rest of the process.
#[test]
fn memory_tier_and_process_stay_bounded_over_20000_distinct_entries() -> Result<()> {
    let dir = TempDir::new()?;
    let text = zstd::decode_all(std::fs::File::open(example())?)?;
    let base: Vec<Value> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<_, _>>()?;
    let log = dir.path().join("distinct.jsonl.zst");
    let mut out = zstd::stream::write::Encoder::new(std::fs::File::create(&log)?, 1)?;
    for i in 0..20_000 {
        let mut exchange = base[i % base.len()].clone();
        if let Some(Value::Array(messages)) = exchange["request"].get_mut("messages")
            && let Some(last) = messages.last_mut()
        {
            let content = last["content"].as_str().unwrap_or_default().to_string();
            last["content"] = Value::from(format!("{content}\n(variant {i})"));
        }
        serde_json::to_writer(&mut out, &exchange)?;
        out.write_all(b"\n")?;
    }
    out.finish()?;
    let output = strata(dir.path())?
        .args(["replay", "--json"])
        .arg(&log)
        .env("STRATA_MEMORY_CAPACITY", "32MiB")
        .env("STRATA_DISK_ENABLED", "false")
        .output()?;
    let report = succeeded_json(&output)?;
    assert_eq!(n(&report, &["requests"]), 20_000);
    assert_eq!(n(&report, &["misses"]), 20_000);
    let bound = 32u64 << 20;
    assert_eq!(n(&report, &["memory_capacity_bytes"]), bound);
    let peak = n(&report, &["memory_peak_bytes"]);
    assert!(
        peak > bound / 2,
        "the workload should fill the memory tier: {peak}"
    );
    assert!(
        peak <= bound + bound / 10,
        "memory tier grew to {peak} bytes"
    );
    let rss = n(&report, &["peak_rss_bytes"]);
    assert!(rss < bound + (64 << 20), "peak RSS {} MiB", rss >> 20);
    Ok(())
}

/// The README's replay with both tiers on and a 32 MiB memory tier stays within 32 + 64 MiB.
#[test]
fn zipf_replay_with_both_tiers_stays_within_the_memory_budget() -> Result<()> {
    let dir = TempDir::new()?;
    let report = replay(
        dir.path(),
        &["--repeat-zipf", "1.1", "--limit", "20000"],
        &[("STRATA_MEMORY_CAPACITY", "32MiB")],
    )?;
    let bound = 32u64 << 20;
    assert!(n(&report, &["memory_peak_bytes"]) <= bound + bound / 10);
    let rss = n(&report, &["peak_rss_bytes"]);
    assert!(rss < bound + (64 << 20), "peak RSS {} MiB", rss >> 20);
    Ok(())
}

#[path = "support/s3.rs"]
mod s3_server;

#[path = "cli/report.rs"]
mod report;

/// A runtime that keeps the in-process S3 server serving while the command runs.
fn s3_runtime() -> Result<(tokio::runtime::Runtime, s3_server::TestS3)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = runtime.block_on(s3_server::TestS3::start())?;
    Ok((runtime, server))
}

fn write_config(dir: &Path, text: &str) -> Result<PathBuf> {
    let path = dir.join("strata.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[test]
fn a_second_node_with_its_own_disk_is_served_from_l3() -> Result<()> {
    let (_runtime, server) = s3_runtime()?;
    let (node_a, node_b) = (TempDir::new()?, TempDir::new()?);
    let config_a = write_config(
        node_a.path(),
        &server.config_toml(&node_a.path().join("l2")),
    )?;
    let config_b = write_config(
        node_b.path(),
        &server.config_toml(&node_b.path().join("l2")),
    )?;
    let config_a = config_a.to_string_lossy().to_string();
    let config_b = config_b.to_string_lossy().to_string();

    let first = replay(node_a.path(), &["--config", &config_a], &[])?;
    assert_adds_up(&first);
    let requests = n(&first, &["requests"]);
    assert!(n(&first, &["misses"]) > 0);
    assert_eq!(n(&first, &["hits", "l3"]), 0);

    // Node B shares the bucket, not the disk: every entry A stored comes from L3.
    let second = replay(node_b.path(), &["--config", &config_b], &[])?;
    assert_adds_up(&second);
    assert_eq!(n(&second, &["requests"]), requests);
    assert_eq!(
        n(&second, &["hits", "l3"]),
        n(&first, &["misses"]),
        "{second}"
    );
    assert_eq!(n(&second, &["misses"]), 0, "{second}");

    // The bucket can be listed and the index rebuilt from the command line.
    let listing = strata(node_b.path())?
        .args(["--config", &config_b, "ls", "--model", "gpt-4o", "--json"])
        .output()?;
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    // Into a pipe nobody reads (`strata ls | head -1`): the listing ends, the command succeeds.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let unread = std::process::Command::new(assert_cmd::cargo::cargo_bin("strata"))
        .current_dir(node_b.path())
        .env_remove("STRATA_CONFIG")
        .args(["--config", &config_b, "ls"])
        .stdout(writer)
        .output()?;
    assert!(
        unread.status.success(),
        "{}",
        String::from_utf8_lossy(&unread.stderr)
    );
    let lines = String::from_utf8(listing.stdout)?;
    let listed: Vec<Value> = lines
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert!(!listed.is_empty());
    assert!(
        listed.iter().all(|o| o["model"] == "gpt-4o"
            && o["path"].as_str().is_some_and(|p| p.ends_with(".json.zst")))
    );

    let rebuilt = strata(node_b.path())?
        .args(["--config", &config_b, "index", "rebuild"])
        .output()?;
    let text = succeeded_text(rebuilt)?;
    assert!(
        text.starts_with(&format!("indexed {} entries", n(&first, &["misses"]))),
        "{text}"
    );

    // A third node warms its disk from S3, then replays from L2 alone.
    let node_c = TempDir::new()?;
    let config_c = write_config(
        node_c.path(),
        &server.config_toml(&node_c.path().join("l2")),
    )?;
    let config_c = config_c.to_string_lossy().to_string();
    let warmed = strata(node_c.path())?
        .args(["--config", &config_c, "warm", "--since", "1h"])
        .output()?;
    assert!(
        warmed.status.success(),
        "{}",
        String::from_utf8_lossy(&warmed.stderr)
    );
    let third = replay(node_c.path(), &["--config", &config_c], &[])?;
    assert_eq!(
        n(&third, &["hits", "l2"]),
        n(&first, &["misses"]),
        "{third}"
    );
    assert_eq!(n(&third, &["hits", "l3"]), 0, "{third}");
    Ok(())
}

/// Writes a log of `n` distinct exchanges (plain JSON Lines) to `path`.
fn write_distinct_log(path: &Path, n: usize) -> Result<()> {
    let mut log = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..n {
        let exchange = serde_json::json!({
            "request": {"model": "gpt-4o-mini", "messages": [
                {"role": "user", "content": format!("What is {i} squared?")}
            ]},
            "response": {
                "id": format!("chatcmpl-{i}"), "object": "chat.completion", "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": format!("{}", i * i)}}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
            },
            "provider": "openai"
        });
        writeln!(log, "{exchange}")?;
    }
    log.flush()?;
    Ok(())
}

#[test]
fn ctrl_c_stops_an_index_rebuild_and_the_next_run_finishes_it_counting_each_object_once()
-> Result<()> {
    let (runtime, mut server) = s3_runtime()?;
    if !server.can_stop() {
        return Ok(()); // needs a server it can slow down: an external one over HTTPS cannot be
    }
    // 1,100 entries: their pointers and their entry and metadata objects take five pages of
    // 1,000 to list.
    let entries = 1_100;
    let (node_a, node_b) = (TempDir::new()?, TempDir::new()?);
    let config_of = |dir: &Path| -> Result<String> {
        let path = write_config(dir, &server.config_toml(&dir.join("l2")))?;
        Ok(path.to_string_lossy().to_string())
    };
    let (config_a, config_b) = (config_of(node_a.path())?, config_of(node_b.path())?);
    let log = node_a.path().join("distinct.jsonl");
    write_distinct_log(&log, entries)?;
    let stored = strata(node_a.path())?
        .args(["--config", &config_a, "replay"])
        .arg(&log)
        .arg("--json")
        .output()?;
    assert_eq!(n(&succeeded_json(&stored)?, &["misses"]), entries as u64);

    // Each listing answered after a second: the rebuild's five pages take five seconds, and
    // Ctrl-C lands among them.
    let lists = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    runtime.block_on(server.misbehave(s3_server::Fault::SlowLists(
        std::time::Duration::from_secs(1),
        std::sync::Arc::clone(&lists),
    )))?;
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("strata"))
        .current_dir(node_b.path())
        .env_remove("STRATA_CONFIG")
        .args(["--config", &config_b, "index", "rebuild"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // The rebuild lists the pointers (`cache-index/by-hash/`, two pages), then the entries
    // (`llm-cache/`, three pages); Ctrl-C as the first page of entries is being listed (its
    // handler was installed before any of them) stops it once that page is in.
    let started = std::time::Instant::now();
    let entries_listed = || {
        lists
            .lock()
            .is_ok_and(|seen| seen.iter().any(|query| query.contains("llm-cache")))
    };
    while !entries_listed() {
        anyhow::ensure!(
            started.elapsed().as_secs() < 60,
            "the rebuild never listed the entries"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let signalled = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(signalled.success());
    let stopped = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("index rebuild stopped before the end of the listing; run it again"),
        "{stderr}"
    );
    let first = String::from_utf8(stopped.stdout)?;
    let listed_first: u64 = first
        .split(" objects listed")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.replace(',', "").parse().ok())
        .with_context(|| format!("no count of objects listed in {first:?}"))?;
    assert!(
        listed_first > 0 && listed_first < 2 * entries as u64,
        "{first}"
    );

    // Served at full speed again, the next rebuild goes on where the first stopped; its counts
    // are the whole rebuild's, every object once.
    runtime.block_on(server.restart())?;
    let rest = strata(node_b.path())?
        .args(["--config", &config_b, "index", "rebuild"])
        .output()?;
    let text = succeeded_text(rest)?;
    assert!(
        text.starts_with("indexed 1,100 entries (2,200 objects listed); wrote 0 missing pointers"),
        "{text}"
    );
    Ok(())
}

#[test]
fn s3_commands_without_s3_say_how_to_enable_it() -> Result<()> {
    let dir = TempDir::new()?;
    let output = strata(dir.path())?.arg("ls").output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("S3 is not enabled"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    Ok(())
}

#[test]
fn invalidating_a_model_reaches_another_node_and_gc_empties_the_bucket_of_it() -> Result<()> {
    let (_runtime, server) = s3_runtime()?;
    let (node_a, node_b) = (TempDir::new()?, TempDir::new()?);
    let config_of = |dir: &Path| -> Result<String> {
        let path = write_config(dir, &server.config_toml(&dir.join("l2")))?;
        Ok(path.to_string_lossy().to_string())
    };
    let (config_a, config_b) = (config_of(node_a.path())?, config_of(node_b.path())?);
    let first = replay(node_a.path(), &["--config", &config_a], &[])?;
    let stored = n(&first, &["misses"]);

    let run = |dir: &Path, args: &[&str]| -> Result<Output> {
        let output = strata(dir)?.args(args).output()?;
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output)
    };
    let done = json_of(&run(
        node_a.path(),
        &[
            "--config",
            &config_a,
            "invalidate",
            "--model",
            "GPT-4o",
            "--json",
        ],
    )?)?;
    assert_eq!(done["exact"], false, "{done}");
    assert_eq!(done["published"], true, "{done}");
    let affected = n(&done, &["affected"]);
    assert!(affected > 0 && affected < stored, "{done}");

    // Node A holds every entry, so the estimate is the number of gpt-4o entries exactly.
    let gc = json_of(&run(
        node_a.path(),
        &["--config", &config_a, "gc", "--json"],
    )?)?;
    assert_eq!(n(&gc, &["l2", "removed"]), affected, "{gc}");
    assert_eq!(n(&gc, &["s3", "entries"]), affected, "{gc}");
    assert_eq!(n(&gc, &["s3", "objects"]), 3 * affected, "{gc}");
    let listing = run(
        node_a.path(),
        &["--config", &config_a, "ls", "--model", "gpt-4o", "--json"],
    )?;
    assert!(listing.stdout.is_empty(), "gpt-4o objects remain");

    // Node B, its own disk, the same bucket: the invalidated model misses, the rest is in L3.
    let second = replay(node_b.path(), &["--config", &config_b], &[])?;
    assert_adds_up(&second);
    assert_eq!(n(&second, &["misses"]), affected, "{second}");
    assert_eq!(n(&second, &["hits", "l3"]), stored - affected, "{second}");

    let rules = run(node_a.path(), &["--config", &config_a, "s3", "lifecycle"])?;
    let text = String::from_utf8(rules.stdout)?;
    assert!(
        text.contains("llm-cache/ 7 days after") && text.contains("--apply"),
        "{text}"
    );
    Ok(())
}

#[test]
fn invalidate_by_key_and_tag_and_clear_without_s3() -> Result<()> {
    let dir = TempDir::new()?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let put = |tag: &str, user: Option<&str>| -> Result<String> {
        let mut cmd = strata(dir.path())?;
        cmd.arg("put")
            .arg("--request")
            .arg(examples.join("request.json"))
            .arg("--response")
            .arg(examples.join("response.json"))
            .args(["--tag", tag]);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        let output = cmd.output()?;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?.trim().to_string())
    };
    let served = |user: Option<&str>| -> Result<bool> {
        let mut cmd = strata(dir.path())?;
        cmd.arg("get")
            .arg("--request")
            .arg(examples.join("request.json"));
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        Ok(cmd.output()?.status.success())
    };
    let invalidate = |args: &[&str]| -> Result<String> {
        let output = strata(dir.path())?.arg("invalidate").args(args).output()?;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    };

    let key = put("jobs:42", None)?;
    put("other", Some("ann"))?;
    assert!(served(None)? && served(Some("ann"))?);
    let text = invalidate(&["--tag", "jobs"])?;
    assert!(text.contains("about 1 entries"), "{text}");
    assert!(!served(None)? && served(Some("ann"))?);

    put("jobs:42", None)?;
    let text = invalidate(&["--key", &key])?;
    assert!(text.contains(&format!("key {key}")), "{text}");
    assert!(text.contains(": 1 entries"), "{text}");
    assert!(!served(None)?);

    let refused = strata(dir.path())?.arg("clear").output()?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let cleared = strata(dir.path())?.args(["clear", "--yes"]).output()?;
    assert!(cleared.status.success());
    let said = String::from_utf8_lossy(&cleared.stdout);
    assert!(
        said.contains("without S3 there are no other nodes"),
        "{said}"
    );
    assert!(!served(Some("ann"))?);

    let empty = strata(dir.path())?
        .args(["invalidate", "--model", ""])
        .output()?;
    assert_eq!(empty.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no selector given"));
    // `--out -` is standard output.
    let report = strata(dir.path())?
        .args(["report", "--format", "json", "--out", "-"])
        .output()?;
    succeeded_json(&report)?;
    assert!(!dir.path().join("-").exists());

    let two = strata(dir.path())?
        .args(["invalidate", "--model", "a", "--tag", "b"])
        .output()?;
    assert!(
        !two.status.success(),
        "two selectors at once must be refused"
    );
    Ok(())
}

/// One HTTP/1.1 GET over a plain TCP connection: the status line and the body.
fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::Read;
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)?;
    Ok(answer)
}

#[test]
fn serve_answers_and_stops_cleanly_on_sigterm() -> Result<()> {
    use std::io::BufRead;
    let dir = TempDir::new()?;
    let mut child = serve_in(dir.path())?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let first = lines.next().context("serve printed nothing")??;
    let addr = first
        .strip_prefix("strata: serving on http://")
        .with_context(|| format!("unexpected first line: {first}"))?
        .to_string();
    let health = http_get(&addr, "/admin/health")?;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    let metrics = http_get(&addr, "/metrics")?;
    assert!(metrics.contains("strata_misses_total 0"), "{metrics}");

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let started = std::time::Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait()? {
            break exit;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "serve did not stop after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        dir.path().join(".strata").is_dir(),
        "the disk tier was opened and kept"
    );

    // A signal sent the moment the address is printed stops it gracefully too: the handlers
    // are in place before the gateway says where it listens.
    let mut child = serve_in(dir.path())?;
    let stderr = child.stderr.take().context("stderr")?;
    let first = std::io::BufReader::new(stderr)
        .lines()
        .next()
        .context("serve printed nothing")??;
    assert!(first.starts_with("strata: serving on http://"), "{first}");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    assert!(child.wait()?.success());
    Ok(())
}

/// `strata serve` on a free loopback port, in `dir`, with its standard error piped.
fn serve_in(dir: &Path) -> Result<std::process::Child> {
    Ok(
        std::process::Command::new(assert_cmd::cargo::cargo_bin("strata"))
            .current_dir(dir)
            .env_remove("STRATA_CONFIG")
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stderr(std::process::Stdio::piped())
            .spawn()?,
    )
}

/// A secret of digits only (read from the environment as a number) was refused, and the
/// configuration error echoed it.
#[test]
fn a_secret_of_digits_is_taken_and_never_echoed() -> Result<()> {
    let dir = TempDir::new()?;
    let output = strata(dir.path())?
        .args(["stats", "--json"])
        .env("STRATA_S3_SECRET_KEY", "98765432101234")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("98765432101234"), "{stderr}");
    // A bad value elsewhere still names the setting, not the secret.
    let output = strata(dir.path())?
        .args(["stats"])
        .env("STRATA_S3_SECRET_KEY", "98765432101234")
        .env("STRATA_MEMORY_CAPACITY", "lots")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.to_lowercase().contains("capacity"), "{stderr}");
    assert!(!stderr.contains("98765432101234"), "{stderr}");
    Ok(())
}

/// `replay` held a 300 MB line whole (305 MB of memory). Lines past `MAX_LINE` are skipped and
/// reported, and the rest of the log still runs.
#[test]
fn a_line_too_long_is_skipped_without_holding_it() -> Result<()> {
    let dir = TempDir::new()?;
    let log = dir.path().join("long.jsonl.zst");
    let ok = r#"{"request": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, "response": {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}}"#;
    {
        let file = std::fs::File::create(&log)?;
        let mut zst = zstd::stream::write::Encoder::new(file, 1)?;
        writeln!(zst, "{ok}")?;
        // 300 MB without a newline: a few hundred kilobytes of zstd.
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..300 {
            zst.write_all(&chunk)?;
        }
        writeln!(zst)?;
        writeln!(zst, "{}", ok.replace("hi", "hello"))?;
        zst.finish()?;
    }
    let output = strata(dir.path())?
        .arg("replay")
        .arg(&log)
        .arg("--json")
        .output()?;
    let report = succeeded_json(&output)?;
    assert_eq!(report["requests"], 2, "{report}");
    assert_eq!(report["skipped_lines"], 1, "{report}");
    let peak = report["peak_rss_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(peak < 200 << 20, "peak RSS {peak} for a 300 MB line");
    Ok(())
}

#[test]
fn invalidations_from_the_command_are_in_the_audit_trail() -> Result<()> {
    let dir = TempDir::new()?;
    let output = strata(dir.path())?
        .args(["invalidate", "--tag", "jobs:42"])
        .env("STRATA_AUDIT_ACTOR", "nightly-job")
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = strata(dir.path())?.args(["audit", "--json"]).output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let record: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(record["action"], "invalidate");
    assert_eq!(record["selector"], "tag jobs:42");
    assert_eq!(record["who"], "nightly-job");
    Ok(())
}

/// With a key (a file, or STRATA_SECURITY_KEY), entries are sealed: a node without the key
/// reads none, one with it reads them; `encrypt` without a key is refused; `rekey` seals the
/// entries written before the key.
#[test]
fn a_key_seals_entries_and_rekey_seals_the_older_ones() -> Result<()> {
    let dir = TempDir::new()?;
    let request = dir.path().join("request.json");
    let response = dir.path().join("response.json");
    std::fs::write(
        &request,
        r#"{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "sealed?"}]}"#,
    )?;
    std::fs::write(
        &response,
        r#"{"choices": [{"message": {"role": "assistant", "content": "yes"}}]}"#,
    )?;
    let key_file = dir.path().join("strata.key");
    std::fs::write(&key_file, "0123456789abcdef0123456789abcdef-test-key\n")?;
    let run = |args: &[&str], key: bool| -> Result<Output> {
        let mut cmd = strata(dir.path())?;
        cmd.args(args).env_remove("STRATA_SECURITY_KEY");
        if key {
            cmd.env("STRATA_SECURITY_KEY_FILE", &key_file);
        }
        Ok(cmd.output()?)
    };
    let (req, resp) = (request.to_string_lossy(), response.to_string_lossy());
    // Written before there was a key; then the key comes, and rekey seals it.
    let put = run(&["put", "--request", &req, "--response", &resp], false)?;
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let rekey = run(&["rekey"], true)?;
    assert!(
        rekey.status.success(),
        "{}",
        String::from_utf8_lossy(&rekey.stderr)
    );
    assert!(String::from_utf8_lossy(&rekey.stdout).contains("rewrote 1 of 1"));
    assert_eq!(
        run(&["get", "--request", &req], true)?.status.code(),
        Some(0),
        "read with the key"
    );
    assert_eq!(
        run(&["get", "--request", &req], false)?.status.code(),
        Some(1),
        "a miss without it"
    );
    // The environment takes the key itself, never the configuration's text.
    let mut cmd = strata(dir.path())?;
    let by_env = cmd
        .args(["get", "--request", &req])
        .env(
            "STRATA_SECURITY_KEY",
            "0123456789abcdef0123456789abcdef-test-key",
        )
        .output()?;
    assert_eq!(
        by_env.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&by_env.stderr)
    );
    let refused = strata(dir.path())?
        .args(["stats"])
        .env("STRATA_SECURITY_ENCRYPT", "true")
        .env_remove("STRATA_SECURITY_KEY")
        .output()?;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs a key"));
    Ok(())
}

/// `strata epochs` shows the invalidations in force; `epochs reset` asks for `--yes`, keeps
/// what is plausible, and goes into the audit trail, as `rekey` does.
#[test]
fn epochs_shows_and_reset_repairs_and_both_are_audited() -> Result<()> {
    let dir = TempDir::new()?;
    let invalidated = strata(dir.path())?
        .args(["invalidate", "--tag", "jobs:7"])
        .output()?;
    assert!(invalidated.status.success());
    let shown = succeeded_json(&strata(dir.path())?.args(["epochs", "--json"]).output()?)?;
    assert!(
        shown["tag"]["jobs:7"].as_u64().is_some_and(|e| e > 0),
        "{shown}"
    );
    let text = strata(dir.path())?.args(["epochs"]).output()?;
    assert!(String::from_utf8_lossy(&text.stdout).contains("jobs:7"));

    let unconfirmed = strata(dir.path())?.args(["epochs", "reset"]).output()?;
    assert_eq!(unconfirmed.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unconfirmed.stderr).contains("--yes"));
    let reset = strata(dir.path())?
        .args(["epochs", "reset", "--yes"])
        .env("STRATA_AUDIT_ACTOR", "on-call")
        .output()?;
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    // An invalidation of today is no poison: it still holds.
    let after = succeeded_json(&strata(dir.path())?.args(["epochs", "--json"]).output()?)?;
    assert_eq!(after["tag"]["jobs:7"], shown["tag"]["jobs:7"]);

    let rekey = strata(dir.path())?
        .args(["rekey"])
        .env("STRATA_AUDIT_ACTOR", "on-call")
        .env(
            "STRATA_SECURITY_KEY",
            "0123456789abcdef0123456789abcdef-test-key",
        )
        .output()?;
    assert!(
        rekey.status.success(),
        "{}",
        String::from_utf8_lossy(&rekey.stderr)
    );
    let audit = strata(dir.path())?.args(["audit", "--json"]).output()?;
    let records: Vec<Value> = String::from_utf8(audit.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let actions: Vec<&str> = records
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert!(actions.contains(&"invalidate"), "{actions:?}");
    assert!(
        records.iter().any(|r| r["action"] != "invalidate"
            && r["who"] == "on-call"
            && r["action"].as_str().is_some_and(|a| a.contains("reset"))),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "rekey" && r["who"] == "on-call"),
        "{records:?}"
    );
    // Only the last minute: the same records; `--since` parses.
    let recent = strata(dir.path())?
        .args(["audit", "--since", "1m", "--json"])
        .output()?;
    assert_eq!(
        String::from_utf8(recent.stdout)?.lines().count(),
        records.len()
    );
    Ok(())
}

/// An upload S3 keeps rejecting is parked; `strata s3 outbox` and `strata stats` show it,
/// `retry` puts it back in the queue, `drop --yes` drops it.
#[test]
fn parked_uploads_are_shown_retried_and_dropped_from_the_command_line() -> Result<()> {
    let (runtime, mut server) = s3_runtime()?;
    runtime
        .block_on(server.misbehave(s3_server::Fault::RejectPutsContaining("/bad-model/".into())))?;
    let dir = TempDir::new()?;
    let config = write_config(dir.path(), &server.config_toml(&dir.path().join("l2")))?;
    let config = config.to_string_lossy().to_string();
    let request = dir.path().join("request.json");
    let response = dir.path().join("response.json");
    std::fs::write(
        &request,
        r#"{"model": "bad-model", "messages": [{"role": "user", "content": "rejected"}]}"#,
    )?;
    std::fs::write(
        &response,
        r#"{"choices": [{"message": {"role": "assistant", "content": "kept here"}}]}"#,
    )?;
    let (req, resp) = (request.to_string_lossy(), response.to_string_lossy());
    let put = strata(dir.path())?
        .args([
            "--config",
            &config,
            "put",
            "--request",
            &req,
            "--response",
            &resp,
        ])
        .output()?;
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let outbox = |args: &[&str]| -> Result<Value> {
        let mut all = vec!["--config", config.as_str(), "s3", "outbox"];
        all.extend_from_slice(args);
        succeeded_json(&strata(dir.path())?.args(&all).output()?)
    };
    // Each command's drain is one more rejection, until the upload is parked.
    let mut shown = outbox(&["--json"])?;
    for _ in 0..10 {
        if shown["parked"].as_array().is_some_and(|p| p.len() == 1) {
            break;
        }
        shown = outbox(&["--json"])?;
    }
    assert_eq!(shown["parked"].as_array().map(Vec::len), Some(1), "{shown}");
    assert_eq!(shown["pending"], 0, "{shown}");
    let stats = succeeded_json(
        &strata(dir.path())?
            .args(["--config", &config, "stats", "--json"])
            .output()?,
    )?;
    assert_eq!(stats["s3"]["parked"], 1, "{stats}");

    let retried = strata(dir.path())?
        .args(["--config", &config, "s3", "outbox", "retry"])
        .output()?;
    assert!(String::from_utf8_lossy(&retried.stdout).starts_with("1 parked uploads back"));
    let requeued = outbox(&["--json"])?;
    assert_eq!(
        requeued["parked"].as_array().map(Vec::len).unwrap_or(0)
            + requeued["pending"].as_u64().unwrap_or(0) as usize,
        1,
        "back in the queue (or parked again by this command's own drain): {requeued}"
    );
    let unconfirmed = strata(dir.path())?
        .args(["--config", &config, "s3", "outbox", "drop"])
        .output()?;
    assert_eq!(unconfirmed.status.code(), Some(2));
    for _ in 0..10 {
        if outbox(&["--json"])?["parked"]
            .as_array()
            .is_some_and(|p| p.len() == 1)
        {
            break;
        }
    }
    let dropped = strata(dir.path())?
        .args(["--config", &config, "s3", "outbox", "drop", "--yes"])
        .output()?;
    assert!(String::from_utf8_lossy(&dropped.stdout).starts_with("1 parked uploads dropped"));
    let emptied = outbox(&["--json"])?;
    assert_eq!(
        emptied["parked"].as_array().map(Vec::len),
        Some(0),
        "{emptied}"
    );
    // The entry itself stays local.
    let got = strata(dir.path())?
        .args(["--config", &config, "get", "--request", &req])
        .output()?;
    assert_eq!(got.status.code(), Some(0));
    Ok(())
}

/// A node id names objects in the bucket: anything but `[a-z0-9_-]` is refused at load.
#[test]
fn a_node_id_that_could_escape_its_place_is_refused() -> Result<()> {
    let dir = TempDir::new()?;
    for bad in ["../evil", "Node", "a/b", "."] {
        let output = strata(dir.path())?
            .args(["stats"])
            .env("STRATA_S3_NODE_ID", bad)
            .output()?;
        assert_eq!(output.status.code(), Some(2), "{bad}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("node_id"),
            "{bad}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
