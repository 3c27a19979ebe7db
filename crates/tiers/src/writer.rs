//! Write-behind: entries reach the disk tier (and the S3 outbox) on writer threads, off the
//! caller's path.
//!
//! Encoding an entry (zstd) and inserting it into sled take most of a put; a caller that has
//! just stored an answer in L1 need not wait for them. [`Writer`] hands each entry to one of a
//! few writer threads, chosen by key so that writes of one key stay in order, through a bounded
//! queue: a caller that outruns the threads waits for room, so the queue never holds more than
//! [`QUEUE_PER_THREAD`] entries per thread and a sustained stream of puts goes at the speed the
//! writes really take.
//!
//! Until its write lands, a queued entry is *pending*: [`Writer::pending`] returns it, and the
//! lookup path reads it as the L2 copy, so a put is visible below L1 the moment it returns.
//! [`Writer::settle`] waits for every write queued so far; removal, clearing, garbage collection
//! and flushing settle first, so a queued write never lands after (and undoes) any of them.
//! Dropping the writer writes what is queued, then stops the threads.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use strata_analytics::{Counters, ErrorKind, Throttle, TierName, throttled};
use strata_core::{CacheKey, Codec, Entry};
use tokio::sync::{mpsc, oneshot};

use crate::disk::DiskTier;
use crate::error::TierError;
use crate::s3::S3Tier;

/// Entries queued per writer thread before a put waits for room.
pub(crate) const QUEUE_PER_THREAD: usize = 256;

/// The most writer threads, whatever the machine's parallelism.
const MAX_THREADS: usize = 4;

/// Where a failing tier is counted and warned about: shared by the lookup path and the writers.
#[derive(Default)]
pub(crate) struct Failures {
    pub(crate) counters: Counters,
    /// Warnings about failing tiers, L1 to L3, one per interval each.
    pub(crate) warnings: [Throttle; 3],
}

impl Failures {
    /// Counts a failure of `tier` and warns about it (throttled).
    pub(crate) fn tier_failed(&self, tier: TierName, op: &str, error: &TierError) {
        // Skipped by the breaker: the failures that opened it were counted.
        if matches!(error, TierError::CircuitOpen) {
            return;
        }
        self.counters.record_error(tier, ErrorKind::Io);
        throttled!(
            self.warnings[tier.index()],
            ?tier,
            op,
            %error,
            "cache tier failed; treating as a miss"
        );
    }
}

/// What a put writes below L1: the disk tier, the S3 outbox, or both.
pub(crate) struct Sink {
    pub(crate) disk: Option<DiskTier>,
    pub(crate) l3: Option<S3Tier>,
    pub(crate) failures: Arc<Failures>,
}

impl Sink {
    /// Writes `entry` to the disk tier and queues it for S3; a failure is counted, never
    /// returned (the entry is in L1 and the caller's work goes on).
    pub(crate) fn store(&self, key: &CacheKey, entry: &Entry) {
        let failed = |tier, op, e: &TierError| self.failures.tier_failed(tier, op, e);
        let fallback;
        let codec = match self.disk.as_ref() {
            Some(disk) => disk.codec(),
            None => {
                fallback = Codec::default();
                &fallback
            }
        };
        let envelope = match codec.encode(entry) {
            Ok(envelope) => envelope,
            Err(e) => return failed(TierName::L2, "encode", &TierError::Corrupt(e)),
        };
        // The outbox refers to the disk copy rather than holding a second one (s3::outbox); the
        // reference goes in before an eviction can take the copy.
        let beside = match (&self.disk, &self.l3) {
            (Some(disk), Some(l3)) => l3.stores_beside(disk).then_some(l3),
            _ => None,
        };
        let mut queued = false;
        if let Some(disk) = &self.disk {
            let enqueue = || beside.map(|l3| l3.enqueue_stored(key));
            match disk.put_encoded_and(key, &envelope, enqueue) {
                Ok(Some(Err(e))) => {
                    failed(TierName::L3, "enqueue", &e);
                    queued = true;
                }
                Ok(reference) => queued = reference.is_some(),
                Err(e) => failed(TierName::L2, "put", &e),
            }
        }
        if let Some(l3) = &self.l3
            && !queued
            && let Err(e) = l3.enqueue(key, &envelope)
        {
            failed(TierName::L3, "enqueue", &e);
        }
    }

    /// [`Sink::store`], with a panic in a tier caught and logged: the entry is then not written
    /// below L1, and the thread that wrote (a writer, or the caller's) goes on.
    pub(crate) fn store_guarded(&self, key: &CacheKey, entry: &Entry) {
        if catch_unwind(AssertUnwindSafe(|| self.store(key, entry))).is_err() {
            tracing::error!(%key, "writing an entry below L1 panicked; it was not written");
        }
    }
}

enum Job {
    Store(CacheKey, Arc<Entry>),
    /// Answered once every job queued before it is done.
    Settle(oneshot::Sender<()>),
    /// Holds the thread until the sender is used or dropped (tests: a write that has not
    /// landed yet).
    #[cfg(test)]
    Hold(oneshot::Sender<()>, std::sync::mpsc::Receiver<()>),
}

struct Lane {
    queue: mpsc::Sender<Job>,
    /// Entries queued and not yet written, by key id.
    pending: Arc<Mutex<HashMap<u128, Arc<Entry>>>>,
}

/// The writer threads and their queues.
pub(crate) struct Writer {
    lanes: Vec<Lane>,
    threads: Vec<JoinHandle<()>>,
    sink: Arc<Sink>,
}

fn lock(pending: &Mutex<HashMap<u128, Arc<Entry>>>) -> MutexGuard<'_, HashMap<u128, Arc<Entry>>> {
    // A writer that panicked mid-update leaves a map that is still whole.
    pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Writer {
    /// Starts the writer threads (one per core, at most [`MAX_THREADS`]). `None` if not even
    /// one could be started: the caller then writes on its own path.
    pub(crate) fn start(sink: &Arc<Sink>) -> Option<Writer> {
        let wanted = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_THREADS);
        let mut lanes = Vec::with_capacity(wanted);
        let mut threads = Vec::with_capacity(wanted);
        // The disk tier evicts on the runtime's blocking pool when it finds one: a writer thread
        // enters the runtime the cache was built in, so that a long eviction pass does not stop
        // its lane (without one, eviction runs on the thread that writes).
        let runtime = tokio::runtime::Handle::try_current().ok();
        for n in 0..wanted {
            let (queue, jobs) = mpsc::channel(QUEUE_PER_THREAD);
            let runtime = runtime.clone();
            let pending = Arc::new(Mutex::new(HashMap::new()));
            let (thread_sink, thread_pending) = (Arc::clone(sink), Arc::clone(&pending));
            let spawned = std::thread::Builder::new()
                .name(format!("strata-writer-{n}"))
                .spawn(move || {
                    let _entered = runtime.as_ref().map(tokio::runtime::Handle::enter);
                    run(jobs, &thread_sink, &thread_pending);
                });
            match spawned {
                Ok(thread) => {
                    lanes.push(Lane { queue, pending });
                    threads.push(thread);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a writer thread");
                    break;
                }
            }
        }
        if lanes.is_empty() {
            return None;
        }
        Some(Writer {
            lanes,
            threads,
            sink: Arc::clone(sink),
        })
    }

    fn lane(&self, id: u128) -> &Lane {
        // Lanes are never empty (`start`); the key's low bits are uniform.
        &self.lanes[(id % self.lanes.len() as u128) as usize]
    }

    /// Queues `entry` for writing below L1, waiting for room when the queue is full.
    ///
    /// Cancel-safe: room is reserved before the entry becomes pending, so a caller dropped
    /// while it waits leaves nothing pending that no writer will ever write.
    pub(crate) async fn store(&self, key: &CacheKey, entry: &Arc<Entry>) {
        let lane = self.lane(key.id());
        match lane.queue.reserve().await {
            Ok(room) => {
                lock(&lane.pending).insert(key.id(), Arc::clone(entry));
                room.send(Job::Store(key.clone(), Arc::clone(entry)));
            }
            // The thread is gone: write on the caller's path instead.
            Err(_) => self.sink.store_guarded(key, entry),
        }
    }

    /// Forgets a pending entry of `id` (after [`Writer::settle`] there is none, unless a
    /// writer thread died with it queued).
    pub(crate) fn forget(&self, id: u128) {
        lock(&self.lane(id).pending).remove(&id);
    }

    /// Drops `entry` from the queue if it is still the one pending for `key` (a lookup refused
    /// it as expired or invalidated): its writer then skips the key's queued writes, so it
    /// reaches neither the disk tier nor S3. A later put of the key, pending in its place, is
    /// left alone.
    pub(crate) fn forget_entry(&self, key: &CacheKey, entry: &Arc<Entry>) {
        unpend(&self.lane(key.id()).pending, key, entry);
    }

    /// The entry queued for `id` and not written yet, if any.
    pub(crate) fn pending(&self, id: u128) -> Option<Arc<Entry>> {
        lock(&self.lane(id).pending).get(&id).cloned()
    }

    /// Waits until every write queued before this call has landed.
    pub(crate) async fn settle(&self) {
        let mut answers = Vec::with_capacity(self.lanes.len());
        for lane in &self.lanes {
            let (done, answer) = oneshot::channel();
            if lane.queue.send(Job::Settle(done)).await.is_ok() {
                answers.push(answer);
            }
        }
        for answer in answers {
            // An error means the thread is gone, and its queue with it.
            let _ = answer.await;
        }
    }
}

/// Whether an entry is pending for `key`.
fn has_pending(pending: &Mutex<HashMap<u128, Arc<Entry>>>, key: &CacheKey) -> bool {
    lock(pending).contains_key(&key.id())
}

fn unpend(pending: &Mutex<HashMap<u128, Arc<Entry>>>, key: &CacheKey, entry: &Arc<Entry>) {
    let mut pending = lock(pending);
    // A later put of the same key may be queued behind this one: leave its entry.
    if pending
        .get(&key.id())
        .is_some_and(|p| Arc::ptr_eq(p, entry))
    {
        pending.remove(&key.id());
    }
}

/// Jobs a writer takes off its queue at once: the room freed wakes a waiting caller once for
/// all of them, not once per entry.
const BATCH: usize = 64;

fn run(mut jobs: mpsc::Receiver<Job>, sink: &Sink, pending: &Mutex<HashMap<u128, Arc<Entry>>>) {
    let mut batch = Vec::with_capacity(BATCH);
    while jobs.blocking_recv_many(&mut batch, BATCH) > 0 {
        for job in batch.drain(..) {
            match job {
                // Nothing pending for the key: it was forgotten (removed, or its entry refused
                // by a lookup while queued), and there is nothing to write. (An entry a later
                // put replaced is still written, before the later one.)
                Job::Store(key, entry) if has_pending(pending, &key) => {
                    // A panic in a tier must not leave the entry pending (served, but never
                    // written, nor removable) or stop the lane.
                    sink.store_guarded(&key, &entry);
                    unpend(pending, &key, &entry);
                }
                Job::Store(..) => {}
                Job::Settle(done) => {
                    let _ = done.send(());
                }
                #[cfg(test)]
                Job::Hold(holding, release) => {
                    let _ = holding.send(());
                    let _ = release.recv();
                }
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queues ends each thread once it has written what they hold.
        self.lanes.clear();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a writer thread panicked; entries it held were not written");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskConfig;
    use crate::disk::tests::entry;
    use crate::tier::Tier;
    use std::time::Duration;

    fn writer_with_disk(dir: &tempfile::TempDir) -> (Writer, DiskTier) {
        let disk = DiskTier::open(&DiskConfig::new(dir.path()), Codec::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let sink = Sink {
            disk: Some(disk.clone()),
            l3: None,
            failures: Arc::default(),
        };
        let writer = Writer::start(&Arc::new(sink)).unwrap_or_else(|| panic!("no writer thread"));
        (writer, disk)
    }

    impl Writer {
        /// Holds the thread that writes `id` until the returned sender is dropped.
        async fn hold(&self, id: u128) -> std::sync::mpsc::Sender<()> {
            let (release, held) = std::sync::mpsc::channel();
            let (holding, taken) = oneshot::channel();
            let sent = self.lane(id).queue.send(Job::Hold(holding, held)).await;
            assert!(sent.is_ok(), "writer thread gone");
            // Once the thread holds, the queue is empty behind it.
            assert!(taken.await.is_ok(), "writer thread gone");
            release
        }
    }

    #[tokio::test]
    async fn a_queued_entry_is_pending_until_written_and_the_last_put_of_a_key_wins() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let (writer, disk) = writer_with_disk(&dir);
        let (key, first) = entry(1);
        let (_, other) = entry(2);
        let mut second = (*other).clone();
        second.request.clone_from(&first.request);
        let second = Arc::new(second);

        let release = writer.hold(key.id()).await;
        writer.store(&key, &first).await;
        writer.store(&key, &second).await;
        let pending = writer
            .pending(key.id())
            .unwrap_or_else(|| panic!("not pending"));
        assert!(
            Arc::ptr_eq(&pending, &second),
            "the later put is the one read"
        );
        let on_disk = disk.get(&key).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(on_disk.is_none(), "written while the thread was held");

        drop(release);
        writer.settle().await;
        assert!(
            writer.pending(key.id()).is_none(),
            "still pending after it landed"
        );
        let on_disk = disk.get(&key).await.unwrap_or_else(|e| panic!("{e}"));
        let on_disk = on_disk.unwrap_or_else(|| panic!("never written"));
        assert_eq!(on_disk.response.get(), second.response.get());
    }

    #[tokio::test]
    async fn a_put_cancelled_while_waiting_for_room_leaves_nothing_pending() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let (writer, _disk) = writer_with_disk(&dir);
        let (first, _) = entry(0);
        let lane = |id: u128| std::ptr::from_ref(writer.lane(id));
        let same_lane: Vec<_> = (1..10_000)
            .map(entry)
            .filter(|(key, _)| lane(key.id()) == lane(first.id()))
            .take(QUEUE_PER_THREAD + 1)
            .collect();
        let release = writer.hold(first.id()).await;
        let Some(((late_key, late), queued)) = same_lane.split_last() else {
            panic!("no entries");
        };
        for (key, e) in queued {
            writer.store(key, e).await;
        }
        // The queue is full: this put waits for room, and its caller gives up.
        let gave_up = tokio::time::timeout(Duration::from_millis(50), writer.store(late_key, late));
        assert!(gave_up.await.is_err(), "found room in a full queue");
        assert!(
            writer.pending(late_key.id()).is_none(),
            "a put that was never queued is read as pending"
        );
        drop(release);
        writer.settle().await;
        for (key, _) in queued {
            assert!(writer.pending(key.id()).is_none());
        }
    }

    #[tokio::test]
    async fn an_entry_forgotten_while_queued_is_never_written() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let (writer, disk) = writer_with_disk(&dir);
        let (key, refused) = entry(1);
        let (kept_key, kept) = entry(2);
        let release = writer.hold(key.id()).await;
        writer.store(&key, &refused).await;
        writer.store(&kept_key, &kept).await;
        // Another entry than the pending one changes nothing.
        writer.forget_entry(&key, &kept);
        assert!(writer.pending(key.id()).is_some());
        writer.forget_entry(&key, &refused);
        assert!(writer.pending(key.id()).is_none());
        drop(release);
        writer.settle().await;
        let on_disk = disk.get(&key).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(on_disk.is_none(), "a forgotten entry was written");
        let on_disk = disk.get(&kept_key).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(on_disk.is_some(), "the other entry was not written");
    }

    #[tokio::test]
    async fn dropping_the_writer_writes_everything_queued() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let (writer, disk) = writer_with_disk(&dir);
        let entries: Vec<_> = (0..1000).map(entry).collect();
        for (key, e) in &entries {
            writer.store(key, e).await;
        }
        drop(writer);
        for (key, e) in &entries {
            let found = disk.get(key).await.unwrap_or_else(|e| panic!("{e}"));
            let found = found.unwrap_or_else(|| panic!("{key} lost"));
            assert_eq!(found.response.get(), e.response.get());
        }
    }
}
