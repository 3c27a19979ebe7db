//! Compression ratio and encode/decode time of strata's codec at several zstd levels, with and
//! without the built-in dictionary, on the entries of an exchange log: what to weigh when
//! choosing `[codec] zstd_level` and `dictionary`.
//!
//! ```text
//! cargo run --release --example codec_levels -- examples/sharegpt-400.jsonl.zst
//! ```
//!
//! Each time is the median over 15 passes of the per-entry mean over 5 rounds of every entry.
//!
//! A second table sweeps zstd itself at level -1 with the dictionary, on the same payloads:
//! the shortest match it looks for (zstd's default is 5; the codec asks for 7 at the negative
//! levels) and the size of its match table, against the ratio and the time to decompress.
//!
//! A third sweeps zstd's search strategies, with literals Huffman-coded (zstd's choice above the
//! negative levels) or stored raw (its choice at them): whether a compressor that searches
//! harder, behind the callers on the writer threads, could buy a better ratio or a faster
//! decode (decoding costs per sequence, and per literal when they are Huffman-coded).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use strata::core::Codec;
use strata::core::codec::{DICTIONARY, FAST_HASH_LOG, HEADER_LEN};
use strata::replay::{ExchangeLog, parse_exchange};
use strata::{Scope, TieredCache};
use zstd::zstd_safe::{CParameter, ParamSwitch, Strategy};

const PASSES: usize = 15;
const ROUNDS: usize = 5;

fn median(mut micros: Vec<f64>) -> f64 {
    micros.sort_by(f64::total_cmp);
    micros[micros.len() / 2]
}

fn main() -> Result<()> {
    let path = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("examples/sharegpt-400.jsonl.zst"));
    let mut log =
        ExchangeLog::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut exchanges = Vec::new();
    while let Some(line) = log.next_line() {
        if let Ok((n, bytes)) = line
            && let Ok(exchange) = parse_exchange(n, bytes)
        {
            exchanges.push(exchange);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let cache = TieredCache::builder().analytics(None).build();
    let entries = runtime.block_on(async {
        let mut entries = Vec::new();
        for e in &exchanges {
            if let Ok(entry) = cache.put(&e.request, &Scope::Global, e.completion()).await {
                entries.push(entry);
            }
        }
        entries
    });
    anyhow::ensure!(!entries.is_empty(), "no exchanges in {}", path.display());
    let plain = Codec::new(usize::MAX, 1);
    let mut raw = 0;
    for entry in &entries {
        raw += plain.encode(entry)?.len();
    }
    println!(
        "{} entries, {:.0} bytes each uncompressed",
        entries.len(),
        raw as f64 / entries.len() as f64
    );
    println!("level  dictionary  ratio  encode µs  decode µs");
    for (level, dictionary) in [
        (3, true),
        (1, true),
        (1, false),
        (-1, true),
        (-1, false),
        (-3, true),
        (-5, true),
        (-7, true),
    ] {
        let codec = Codec::new(1024, level).with_dictionary(dictionary);
        let mut envelopes = Vec::with_capacity(entries.len());
        for entry in &entries {
            envelopes.push(codec.encode(entry)?);
        }
        let stored: usize = envelopes.iter().map(Vec::len).sum();
        let per_entry = (ROUNDS * entries.len()) as f64;
        let (mut encode, mut decode) = (Vec::new(), Vec::new());
        for _ in 0..PASSES {
            let started = Instant::now();
            for _ in 0..ROUNDS {
                for entry in &entries {
                    black_box(codec.encode(entry)?);
                }
            }
            encode.push(started.elapsed().as_secs_f64() * 1e6 / per_entry);
            let started = Instant::now();
            for _ in 0..ROUNDS {
                for envelope in &envelopes {
                    black_box(codec.decode(envelope)?);
                }
            }
            decode.push(started.elapsed().as_secs_f64() * 1e6 / per_entry);
        }
        println!(
            "{level:>5}  {:>10}  {:>5.2}  {:>9.2}  {:>9.2}",
            if dictionary { "yes" } else { "no" },
            raw as f64 / stored as f64,
            median(encode),
            median(decode)
        );
    }
    let payloads = entries
        .iter()
        .map(|entry| Ok(plain.encode(entry)?.split_off(HEADER_LEN)))
        .collect::<Result<Vec<_>>>()?;
    let raw: usize = payloads.iter().map(Vec::len).sum();
    println!("\nzstd alone, level -1 with the dictionary");
    println!("min match  hash log  ratio  decompress µs");
    let settings = [
        None,
        Some((6, 13)),
        Some((6, 14)),
        Some((7, 13)),
        Some((7, 14)),
        Some((7, 15)),
    ];
    for setting in settings {
        let mut compressor = zstd::bulk::Compressor::with_dictionary(-1, DICTIONARY)?;
        if let Some((min_match, hash_log)) = setting {
            compressor.set_parameter(CParameter::MinMatch(min_match))?;
            compressor.set_parameter(CParameter::HashLog(hash_log))?;
        }
        let frames = payloads
            .iter()
            .map(|p| compressor.compress(p))
            .collect::<std::io::Result<Vec<_>>>()?;
        let stored: usize = frames.iter().map(Vec::len).sum();
        let decode = decompress_micros(&frames, &payloads)?;
        let (min_match, hash_log) = match setting {
            Some((m, h)) => (m.to_string(), h.to_string()),
            None => ("default".into(), "default".into()),
        };
        println!(
            "{min_match:>9}  {hash_log:>8}  {:>5.2}  {:>13.2}",
            raw as f64 / stored as f64,
            decode
        );
    }
    println!("\nzstd alone with the dictionary, by search strategy");
    println!("level  strategy  literals  min match  ratio  compress µs  decompress µs");
    for (level, strategy) in [
        (-1, Strategy::ZSTD_fast),
        (3, Strategy::ZSTD_dfast),
        (5, Strategy::ZSTD_greedy),
        (9, Strategy::ZSTD_lazy2),
        (13, Strategy::ZSTD_btlazy2),
    ] {
        // At the negative levels zstd's own choice is raw literals: a row asking for them would
        // repeat it.
        let modes: &[ParamSwitch] = if level < 0 {
            &[ParamSwitch::Auto]
        } else {
            &[ParamSwitch::Auto, ParamSwitch::Disable]
        };
        for &literals in modes {
            for min_match in [None, Some(6), Some(7)] {
                let mut compressor = zstd::bulk::Compressor::with_dictionary(level, DICTIONARY)?;
                compressor.set_parameter(CParameter::Strategy(strategy))?;
                compressor.set_parameter(CParameter::LiteralCompressionMode(literals))?;
                if level < 0 {
                    // The codec's match table at the negative levels.
                    compressor.set_parameter(CParameter::HashLog(FAST_HASH_LOG))?;
                }
                if let Some(min_match) = min_match {
                    compressor.set_parameter(CParameter::MinMatch(min_match))?;
                }
                let mut compress = Vec::new();
                let mut frames = Vec::new();
                for _ in 0..3 {
                    let started = Instant::now();
                    frames = payloads
                        .iter()
                        .map(|p| compressor.compress(p))
                        .collect::<std::io::Result<Vec<_>>>()?;
                    compress.push(started.elapsed().as_secs_f64() * 1e6 / frames.len() as f64);
                }
                let stored: usize = frames.iter().map(Vec::len).sum();
                // zstd's choice for literals at the level: raw at the negative ones.
                let literals = match (literals, level < 0) {
                    (ParamSwitch::Disable, _) | (_, true) => "raw",
                    _ => "huffman",
                };
                println!(
                    "{level:>5}  {:>8}  {literals:>8}  {:>9}  {:>5.2}  {:>11.2}  {:>13.2}",
                    format!("{strategy:?}").trim_start_matches("ZSTD_"),
                    min_match.map_or("default".into(), |m| m.to_string()),
                    raw as f64 / stored as f64,
                    median(compress),
                    decompress_micros(&frames, &payloads)?
                );
            }
        }
    }
    Ok(())
}

/// The median over passes of the time to decompress each of `frames` (into a buffer that fits
/// the largest of `payloads`), in microseconds per frame.
fn decompress_micros(frames: &[Vec<u8>], payloads: &[Vec<u8>]) -> Result<f64> {
    let mut decompressor = zstd::bulk::Decompressor::with_dictionary(DICTIONARY)?;
    let mut out = vec![0; payloads.iter().map(Vec::len).max().unwrap_or(0)];
    let mut decode = Vec::new();
    for pass in 0..=PASSES {
        let started = Instant::now();
        for _ in 0..ROUNDS {
            for frame in frames {
                black_box(decompressor.decompress_to_buffer(frame, &mut out)?);
            }
        }
        // The first pass warms the output buffer and the caches up.
        if pass > 0 {
            decode.push(started.elapsed().as_secs_f64() * 1e6 / (ROUNDS * frames.len()) as f64);
        }
    }
    Ok(median(decode))
}
