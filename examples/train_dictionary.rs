//! Trains the zstd dictionary that strata's codec compresses entries with
//! (`crates/core/dict/exchanges-v1.zdict`).
//!
//! ```text
//! cargo run --release --example train_dictionary -- \
//!     ../shared/data/sharegpt-chat-dev.jsonl.zst examples/sharegpt-400.jsonl.zst \
//!     crates/core/dict/exchanges-v1.zdict
//! ```
//!
//! The samples are entry payloads exactly as the codec lays them out before compressing
//! (canonical request, response, metadata), built from every exchange of the first log that the
//! second (the example workload) does not hold, so the benchmarks, which run on the example
//! workload, measure the dictionary on exchanges it was not trained on.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use strata::core::Codec;
use strata::replay::{ExchangeLog, parse_exchange};
use strata::{Scope, TieredCache};

/// Size of the dictionary: 16 KiB did as well as 32, 64 or 112 KiB on held-out exchanges.
const DICTIONARY_BYTES: usize = 16 << 10;

fn lines(path: &Path) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut log = ExchangeLog::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    while let Some(line) = log.next_line() {
        // A line that cannot be read (malformed) is no sample.
        if let Ok((n, bytes)) = line {
            out.push((n, bytes.to_vec()));
        }
    }
    Ok(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [source, held_out, out] = args.as_slice() else {
        bail!("usage: train_dictionary SOURCE.jsonl[.zst] HELD_OUT.jsonl[.zst] OUT.zdict");
    };
    let held_out: HashSet<Vec<u8>> = lines(held_out)?.into_iter().map(|(_, l)| l).collect();
    let cache = TieredCache::builder().analytics(None).build();
    // Never compresses: `open` then hands back the payload as the codec would compress it.
    let plain = Codec::new(usize::MAX, 1);
    let mut samples = Vec::new();
    let mut skipped = 0;
    for (n, line) in lines(source)? {
        if held_out.contains(&line) {
            skipped += 1;
            continue;
        }
        let Ok(exchange) = parse_exchange(n, &line) else {
            continue;
        };
        let Ok(entry) = cache
            .put(&exchange.request, &Scope::Global, exchange.completion())
            .await
        else {
            continue;
        };
        samples.push(plain.open(&plain.encode(&entry)?)?);
    }
    let dictionary =
        zstd::dict::from_samples(&samples, DICTIONARY_BYTES).context("training the dictionary")?;
    std::fs::write(out, &dictionary).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{} bytes trained on {} entries ({} held out) -> {}",
        dictionary.len(),
        samples.len(),
        skipped,
        out.display()
    );
    Ok(())
}
