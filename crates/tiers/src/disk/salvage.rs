//! Salvage: what sled can still read of a database it refused to open, copied into the new one.
//!
//! sled refuses a whole database for one damaged page, most often one its snapshot points to.
//! Without the snapshot, it replays its log from the start and stops at the first damaged
//! message: what was written before that reads back. So the salvage works on a copy of the
//! database moved aside, snapshot and settings file left out (the directory moved aside stays as it was found,
//! for whoever wants to look at it), and copies every tree item by item until the first read
//! that fails. Entries are copied with fresh access records (their sizes), and the S3 outbox
//! keeps only what can still be uploaded: envelopes it holds, and references to copies that
//! were salvaged. Nothing copied is trusted more than before: every entry is checked by the
//! codec when it is read, as always.

use std::path::{Path, PathBuf};

use super::index::{self, Index, Record};
use super::vlog::{Pointer, ValueLog};
use super::{
    DiskConfig, MIN_PAGE_CACHE, OLD_META_KEYS, OUTBOX_TREE, STATS_KEY, TOTALS_KEY, last_use_of,
    now_ms, open_sled_waiting, segment_bytes,
};

/// What was read back from a database moved aside as corrupt ([`super::DiskTier::salvage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Salvage {
    /// Entries copied into the new database.
    pub entries: u64,
    /// Queued S3 uploads copied (those whose envelope survived).
    pub uploads: u64,
    /// Items of the other trees copied (metadata, the S3 index, analytics, the audit trail).
    pub other: u64,
    /// Trees whose reading stopped at a damaged page before their end.
    pub trees_cut_short: u64,
}

/// Copies what can be read of the database moved aside to `aside` into the (new, empty)
/// database at `config.path`. An error says why nothing could be read; the new database is
/// then left empty.
pub(super) fn salvage(aside: &Path, config: &DiskConfig) -> Result<Salvage, String> {
    let work = work_path(aside);
    let _ = std::fs::remove_dir_all(&work);
    // sled's `conf` is left out too: it holds the settings the database was made with, which
    // strata never changes from sled's defaults, and damage there alone makes sled refuse all.
    let copied = super::copy_files(aside, &work, &|name| matches!(name, "db" | "blobs"));
    let result = copied
        .map_err(|e| format!("copying {}: {e}", aside.display()))
        .and_then(|()| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                copy_trees(&work, aside, config)
            }))
            .unwrap_or_else(|_| Err("sled panicked while reading it".into()))
        });
    if let Err(e) = std::fs::remove_dir_all(&work) {
        tracing::debug!(path = %work.display(), error = %e, "cannot remove the salvage's copy");
    }
    result
}

/// Where the copy the salvage reads is made: beside the directory moved aside.
fn work_path(aside: &Path) -> PathBuf {
    let mut name = aside.as_os_str().to_owned();
    name.push(".salvaging");
    PathBuf::from(name)
}

/// Copies the trees of the copy at `work` into the new database; envelopes in the value log
/// are read from the directory moved aside (`aside`), where they stayed, and appended to the
/// new one's.
fn copy_trees(work: &Path, aside: &Path, config: &DiskConfig) -> Result<Salvage, String> {
    let sled_error = |e: sled::Error| e.to_string();
    let old = sled::Config::new()
        .path(work)
        .cache_capacity(config.cache_capacity.max(MIN_PAGE_CACHE))
        .open()
        .map_err(|e| format!("sled cannot open it without its snapshot either: {e}"))?;
    let new = open_sled_waiting(config).map_err(|e| e.to_string())?;
    let old_values = ValueLog::read_only(aside);
    let new_values = ValueLog::open(&config.path, new.clone(), segment_bytes(config.capacity))
        .map_err(|e| format!("opening the new value log: {e}"))?;
    let mut salvage = Salvage::default();
    let mut cut_short = |tree: &[u8], e: sled::Error| {
        tracing::warn!(tree = %String::from_utf8_lossy(tree), error = %e,
            "salvage: a damaged page ends what can be read of this tree");
        salvage.trees_cut_short += 1;
    };

    let new_index = Index::open(&new).map_err(sled_error)?;
    let now = now_ms();
    // Each entry's envelope, from the old value log (or inline, as older releases stored it),
    // appended to the new one; one that cannot be read back is not salvaged.
    let mut copy =
        |id: u128, envelope: Result<Vec<u8>, ()>, last_used_ms: u64| -> Result<(), String> {
            let Ok(envelope) = envelope else {
                return Ok(());
            };
            let pointer = new_values
                .append(id, &envelope)
                .map_err(|e| format!("writing the new value log: {e}"))?;
            new_index
                .update(id, |_| {
                    Some(Record {
                        pointer,
                        last_used_ms,
                    })
                })
                .map_err(sled_error)?;
            salvage.entries += 1;
            Ok(())
        };
    let mut stopped: Vec<(&[u8], sled::Error)> = Vec::new();
    for item in Index::open(&old).map_err(sled_error)?.iter() {
        match item {
            Ok((id, record)) => {
                let envelope = old_values.read(id, &record.pointer).map_err(|_| ());
                copy(id, envelope, record.last_used_ms)?;
            }
            Err(e) => {
                stopped.push((index::TREE.as_bytes(), e));
                break;
            }
        }
    }
    // The trees of a release before the index: a pointer or an inline envelope by id, and the
    // last use in the access record (what cannot be read is "now").
    let names = old.tree_names();
    if names.iter().any(|n| n == b"entries") {
        let access = old.open_tree("access").map_err(sled_error)?;
        for item in old.open_tree("entries").map_err(sled_error)?.iter() {
            let (key, value) = match item {
                Ok(kv) => kv,
                Err(e) => {
                    stopped.push((b"entries", e));
                    break;
                }
            };
            let Some(id) = super::id_of(&key) else {
                continue;
            };
            let envelope = match Pointer::decode(&value) {
                Some(pointer) => old_values.read(id, &pointer).map_err(|_| ()),
                None => Ok(value.to_vec()),
            };
            let used = access
                .get(&key)
                .ok()
                .flatten()
                .map_or(now, |record| last_use_of(&record));
            copy(id, envelope, used)?;
        }
    }
    for (tree, e) in stopped {
        cut_short(tree, e);
    }

    for name in old.tree_names() {
        if matches!(&name[..], b"entries" | b"access") || name == index::TREE.as_bytes() {
            continue;
        }
        let (from, to) = (
            old.open_tree(&name).map_err(sled_error)?,
            new.open_tree(&name).map_err(sled_error)?,
        );
        let outbox = &name[..] == OUTBOX_TREE.as_bytes();
        let meta = &name[..] == b"meta";
        for item in from.iter() {
            let (key, value) = match item {
                Ok(kv) => kv,
                Err(e) => {
                    cut_short(&name, e);
                    break;
                }
            };
            if meta && &key[..] == STATS_KEY {
                // The copy kept beside the database is the newer: it is taken up instead.
                continue;
            }
            if meta && (&key[..] == TOTALS_KEY || OLD_META_KEYS.contains(&&key[..])) {
                // The new database is counted when it opens.
                continue;
            }
            if outbox {
                // A reference whose copy is gone has nothing left to upload.
                let kept = super::id_of(&key)
                    .map(|id| new_index.get(id))
                    .transpose()
                    .map_err(sled_error)?
                    .flatten()
                    .is_some();
                if crate::s3::outbox::is_reference(&value) && !kept {
                    continue;
                }
                salvage.uploads += 1;
            } else {
                salvage.other += 1;
            }
            to.insert(key, value).map_err(sled_error)?;
        }
    }
    new_values
        .sync()
        .map_err(|e| format!("syncing the new value log: {e}"))?;
    new.flush().map_err(sled_error)?;
    Ok(salvage)
}
