//! One partition served by the broker: its on-disk log behind a lock, a writer task that
//! group-commits appends, and a high-watermark channel that wakes subscribers.
//!
//! The high watermark is what consumers may read; it is the partition's commit offset, and a
//! produce is acknowledged when the commit offset passes its batch (`partition/commit.rs`), not
//! inline in the group commit. On one node the commit offset is the durable offset: under
//! `durability = always` it moves only after the fsync that covers a batch, so no consumer ever
//! sees data a crash could take back; under `interval` and `os` it moves after the write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use quiver_protocol::batch::{BatchHeader, Batches, ValidatedBatch};
use quiver_protocol::limits::{APPEND_QUEUE_DEPTH, MAX_GROUP_COMMIT, MAX_UNCHECKPOINTED_BYTES};
use quiver_protocol::message::Acks;
use quiver_protocol::{Durability, ErrorCode, TopicConfig};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::log::ClosedSegmentFiles;
use crate::log::{LogConfig, LogError, PartitionLog, RollFile};
use crate::producers::{ProducerStates, SeqCheck, MAX_SNAPSHOT_BYTES, SNAPSHOT_EXT};
use crate::storage::Storage;
use crate::tail_cache::{TailCache, TailCacheSettings};
use commit::CommitQueue;

mod commit;

/// A group commit of fewer than this many bytes that needs no fsync runs on the writer's own
/// task, when nothing can make it wait there (see `append_in_place`), instead of being handed
/// to a blocking thread and back: the hand-off's thread wake-ups cost more than copying a few
/// kilobytes into the page cache, and were most of a one-at-a-time round trip. (`block_in_place`
/// did this before, but it hands the worker's core to another thread on every call, which is
/// the same wake-up.) Larger groups keep the hand-off, which lets both runtime threads go on
/// with the network while megabytes are copied. The same size as `direct_writes`' threshold,
/// so a group run in place never waits for a direct write. (A buffered write can still wait
/// when the kernel throttles dirty pages; that happens under heavy write load, whose groups
/// are large and go to the hand-off.)
const INLINE_GROUP_BYTES: usize = crate::storage::DIRECT_MIN_BYTES;

/// A group commit's outcome: each append's reply and result, whether the group's fsync (if
/// any) worked, and the log end after the group.
type CommitResult = (Vec<(Reply, Result<Appended, PartitionError>)>, Result<(), String>, u64);

/// The leader epoch of every batch a single node writes (replication, issue 17, brings terms).
const LEADER_EPOCH: i32 = 0;

/// What went wrong serving a partition, with the wire code to report.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PartitionError {
    pub code: ErrorCode,
    pub message: String,
    /// With `NotLeader`: the partition's leader, when known (sent to the client).
    pub leader: Option<u32>,
}

impl PartitionError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        PartitionError { code, message: message.into(), leader: None }
    }

    /// The same error naming the partition's leader.
    pub fn with_leader(mut self, leader: Option<u64>) -> Self {
        self.leader = leader.and_then(|l| u32::try_from(l).ok());
        self
    }
}

impl From<LogError> for PartitionError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::OffsetOutOfRange { requested, log_start, next } => PartitionError::new(
                ErrorCode::OffsetOutOfRange,
                format!("offset {requested} is out of range: earliest={log_start} latest={next}"),
            ),
            corrupt @ LogError::Corrupt { .. } => {
                PartitionError::new(ErrorCode::CorruptLog, corrupt.to_string())
            }
            other => PartitionError::new(ErrorCode::StorageError, other.to_string()),
        }
    }
}

/// Result of an acknowledged append.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub base_offset: u64,
    pub last_offset: u64,
    pub append_time_ms: i64,
}

type Reply = oneshot::Sender<Result<Appended, PartitionError>>;

/// What follows a partition's log besides the files: the idempotent producers' state and the
/// tail cache, kept in step with every append and truncation. A replicated partition's Raft
/// storage keeps them as the single-node writer does.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    pub(crate) producers: Arc<Mutex<ProducerStates>>,
    pub(crate) tail: Arc<Mutex<TailCache>>,
    /// The partition's log start as readers see it (moved by a Raft snapshot install).
    pub(crate) log_start: Arc<AtomicU64>,
}

/// A producer's batch for a replicated partition's Raft group: answered once committed
/// (`acks = all`, and `none`, which answers nobody but holds its request until then), or once
/// the leader's own log has it durably per the topic's durability (`acks = leader`,
/// docs/replication.md §3).
#[derive(Debug)]
pub(crate) struct Proposal {
    pub(crate) batch: ValidatedBatch,
    pub(crate) acks: Acks,
    /// Proposed only if the group's leader is in this term (the offsets store of a coordinator
    /// writes only in the term it loaded its state in, docs/replication.md §10).
    pub(crate) term: Option<u64>,
    pub(crate) reply: Reply,
}

struct AppendRequest {
    batch: ValidatedBatch,
    reply: Reply,
}

#[derive(Debug)]
pub struct Partition {
    pub topic: Arc<str>,
    pub id: u32,
    log: Arc<Mutex<PartitionLog>>,
    high_watermark: watch::Sender<u64>,
    log_start: Arc<AtomicU64>,
    appends: mpsc::Sender<AppendRequest>,
    /// The newest appended batches, for subscribers at the tail.
    tail: Arc<Mutex<TailCache>>,
    /// Cancelled when the partition closes: at shutdown (a child of the broker's token) or when
    /// its topic is deleted. Its writer stops, its subscriptions end, and its files close once
    /// the last of them lets go of it.
    closed: CancellationToken,
    /// Set (before `closed` is cancelled) when the topic was deleted.
    deleted: std::sync::atomic::AtomicBool,
    /// The log's recovery point and its checkpoint file, written without the log's lock.
    recovery: crate::log::RecoveryCheckpoint,
    /// What the express produce path shares with the writer.
    express: Arc<Express>,
    storage: Arc<dyn Storage>,
    /// Set when the partition is replicated (cluster mode): produce goes through its Raft
    /// group's driver instead of the writer, and the group moves the high watermark. Replaced
    /// when a replica here starts again (removed from its group, then added back: §11).
    replica: parking_lot::RwLock<Option<mpsc::Sender<Proposal>>>,
}

/// The express produce path (design.md §6): a small batch without fsync, arriving while the
/// writer has nothing in hand, is appended by the request's own task, skipping the hop to the
/// writer task and back (two task wake-ups, often across threads, most of a one-at-a-time
/// round trip once the transport's own is taken out).
#[derive(Debug)]
struct Express {
    /// Appends handed to the writer and not yet answered, plus one while an express append
    /// runs. An express append claims it from 0 to 1, so it never overtakes a batch handed to
    /// the writer (a producer's batches stay in order) and the high watermark it sets is never
    /// undone by a group written before it.
    pending: AtomicU64,
    /// Set (under the log's lock) by an express append: the writer's next fsync must cover
    /// it. Cleared under the log's lock just before a sync takes its handle.
    dirty: AtomicBool,
    /// Tells the writer that `dirty` was set, so its periodic fsync runs.
    wake: Notify,
    /// Recent batches of idempotent producers (the writer's too).
    producers: Arc<Mutex<ProducerStates>>,
    durability: Durability,
    /// `quiver_group_commits_total{path="express"}`, looked up once.
    appends: metrics::Counter,
}

/// Gives back a writer-pending count taken for a request that never reached the writer (its
/// `submit` was dropped while the queue was full).
struct PendingGuard<'a>(Option<&'a AtomicU64>);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Some(pending) = self.0 {
            pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl std::fmt::Debug for AppendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendRequest").field("bytes", &self.batch.len()).finish()
    }
}

/// What all partitions of a broker share: the tail caches' memory budget and the bound on
/// open closed-segment files.
#[derive(Debug, Clone)]
pub struct SharedBudgets {
    pub tail_cache: TailCacheSettings,
    pub closed_files: Arc<ClosedSegmentFiles>,
}

impl SharedBudgets {
    /// Tail caches of `tail_per_partition` bytes each and `tail_total` together; at most
    /// `closed_files` closed segment files open.
    pub fn new(tail_per_partition: usize, tail_total: usize, closed_files: usize) -> SharedBudgets {
        SharedBudgets {
            tail_cache: TailCacheSettings::new(tail_per_partition, tail_total),
            closed_files: ClosedSegmentFiles::new(closed_files),
        }
    }
}

pub fn log_config(c: &TopicConfig, closed_files: Arc<ClosedSegmentFiles>) -> LogConfig {
    LogConfig {
        segment_bytes: c.segment_bytes,
        segment_ms: c.segment_ms,
        retention_bytes: c.retention_bytes,
        retention_ms: c.retention_ms,
        index_interval_bytes: 4096,
        closed_files,
    }
}

impl Partition {
    /// Opens (recovering) the log and starts the writer task. Blocking: call on a blocking
    /// thread or at start-up.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        topic: Arc<str>,
        id: u32,
        config: &TopicConfig,
        budgets: &SharedBudgets,
        shutdown: CancellationToken,
    ) -> Result<Arc<Partition>, PartitionError> {
        let (log, report, producers) =
            open_log(storage.clone(), dir, log_config(config, budgets.closed_files.clone()), now_ms())?;
        if report.truncated_bytes() > 0 {
            tracing::warn!(%topic, partition = id, ?report, "recovered partition by truncating a damaged tail");
        }
        let recovery = log.recovery_checkpoint();
        let next = log.next_offset();
        let start = log.log_start_offset();
        let (appends, rx) = mpsc::channel(APPEND_QUEUE_DEPTH);
        let (high_watermark, _) = watch::channel(next);
        let express = Arc::new(Express {
            pending: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            wake: Notify::new(),
            producers: Arc::new(Mutex::new(producers)),
            durability: config.durability,
            appends: metrics::counter!("quiver_group_commits_total", "path" => "express"),
        });
        let p = Arc::new(Partition {
            topic,
            id,
            log: Arc::new(Mutex::new(log)),
            high_watermark,
            log_start: Arc::new(AtomicU64::new(start)),
            appends,
            tail: Arc::new(Mutex::new(TailCache::with_settings(&budgets.tail_cache))),
            closed: shutdown.child_token(),
            deleted: Default::default(),
            recovery,
            express: express.clone(),
            storage,
            replica: parking_lot::RwLock::new(None),
        });
        let writer = Writer {
            partition: Arc::downgrade(&p),
            acks: CommitQueue::new(next),
            log: p.log.clone(),
            tail: p.tail.clone(),
            producers: express.producers.clone(),
            express,
            durability: config.durability,
            commits_in_place: metrics::counter!("quiver_group_commits_total", "path" => "in_place"),
            commits_handed_off: metrics::counter!("quiver_group_commits_total", "path" => "blocking_thread"),
        };
        let interval = Duration::from_millis(u64::from(config.flush_interval_ms.max(1)));
        tokio::spawn(writer.run(rx, interval, p.closed.clone()));
        Ok(p)
    }

    /// Closes the partition of a deleted topic: its writer stops, subscriptions end with
    /// `TopicDeleted`, and its files close once nothing uses the partition any more.
    pub fn close_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
        self.closed.cancel();
    }

    /// Resolves once the partition is closed (shutdown, or its topic deleted).
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Why the partition is closed: `TopicDeleted` or `ShuttingDown`.
    pub fn closed_error(&self) -> PartitionError {
        if self.deleted.load(Ordering::Acquire) {
            PartitionError::new(ErrorCode::TopicDeleted, format!("topic '{}' was deleted", self.topic))
        } else {
            PartitionError::new(ErrorCode::ShuttingDown, "partition is closing")
        }
    }

    /// Queues a batch; the returned receiver resolves once it is appended and, under
    /// `durability = always`, synced. Queueing in call order keeps pipelined produce requests
    /// in order. On a replicated partition it goes to the Raft group, and resolves once a
    /// majority has it durably (or with `NotLeader`): `acks = all`.
    pub async fn submit(
        &self,
        batch: ValidatedBatch,
    ) -> Result<oneshot::Receiver<Result<Appended, PartitionError>>, PartitionError> {
        self.submit_with(batch, Acks::All).await
    }

    /// [`submit`](Self::submit) on a replicated partition whose Raft leader must be in `term`:
    /// refused with `NotLeader` otherwise. Resolves once the batch is committed in that term.
    pub(crate) async fn submit_in_term(
        &self,
        batch: ValidatedBatch,
        term: u64,
    ) -> Result<oneshot::Receiver<Result<Appended, PartitionError>>, PartitionError> {
        let (reply, rx) = oneshot::channel();
        let Some(group) = self.replica.read().clone() else {
            return Err(PartitionError::new(ErrorCode::Internal, "not a replicated partition"));
        };
        group
            .send(Proposal { batch, acks: Acks::All, term: Some(term), reply })
            .await
            .map_err(|_| PartitionError::new(ErrorCode::NotLeader, "the partition's replica stopped"))?;
        Ok(rx)
    }

    /// [`submit`](Self::submit) with the producer's `acks`: on a replicated partition,
    /// `Acks::Leader` resolves once the leader's own log has the batch (appended, and fsynced
    /// under `durability = always`), before a majority may have it (docs/replication.md §3).
    /// On one node every `acks` resolves at the same point.
    pub async fn submit_with(
        &self,
        batch: ValidatedBatch,
        acks: Acks,
    ) -> Result<oneshot::Receiver<Result<Appended, PartitionError>>, PartitionError> {
        let (reply, rx) = oneshot::channel();
        let group = self.replica.read().clone();
        if let Some(group) = group {
            group
                .send(Proposal { batch, acks, term: None, reply })
                .await
                .map_err(|_| PartitionError::new(ErrorCode::NotLeader, "the partition's replica stopped"))?;
            return Ok(rx);
        }
        let Some((batch, reply)) = self.append_express(batch, reply) else {
            return Ok(rx); // answered already
        };
        self.express.pending.fetch_add(1, Ordering::AcqRel);
        let mut guard = PendingGuard(Some(&self.express.pending));
        self.appends.send(AppendRequest { batch, reply }).await.map_err(|_| self.closed_error())?;
        guard.0 = None; // the writer gives it back once the request is answered
        Ok(rx)
    }

    /// Appends `batch` here and answers `reply` when the express path applies: durability
    /// `interval` or `os`, a batch under the in-place size, nothing handed to the writer and
    /// unanswered, the log's and producer states' locks free, and no roll or new epoch due
    /// (the same tests as the writer's in-place groups). Otherwise gives both back for the
    /// writer.
    fn append_express(&self, batch: ValidatedBatch, reply: Reply) -> Option<(ValidatedBatch, Reply)> {
        let ex = &self.express;
        if ex.durability == Durability::Always
            || batch.len() >= INLINE_GROUP_BYTES
            || self.closed.is_cancelled()
        {
            return Some((batch, reply));
        }
        if ex.pending.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Some((batch, reply));
        }
        let given_back = self.append_claimed(batch, reply);
        let before = ex.pending.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before >= 1, "express claim released twice");
        given_back
    }

    fn append_claimed(&self, batch: ValidatedBatch, reply: Reply) -> Option<(ValidatedBatch, Reply)> {
        let now = now_ms();
        let Some(mut log) = self.log.try_lock() else { return Some((batch, reply)) };
        // `closed` is checked again under the log's lock: the writer's last fsync, after
        // `closed` is cancelled, checks `dirty` under the same lock, so nothing is appended here
        // that it does not cover.
        if self.closed.is_cancelled() || !log.appends_in_active_segment([batch.header()], LEADER_EPOCH, now) {
            return Some((batch, reply));
        }
        let Some(mut producers) = self.express.producers.try_lock() else { return Some((batch, reply)) };
        let appended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            append_one(&mut log, &mut producers, &self.tail, batch, now)
        }));
        match appended {
            Ok(result) => {
                if result.is_ok() {
                    // Under the log's lock, so high watermark updates follow the log's order.
                    let end = log.next_offset();
                    self.high_watermark.send_if_modified(|hw| {
                        let moved = end > *hw;
                        if moved {
                            *hw = end;
                        }
                        moved
                    });
                    if !self.express.dirty.swap(true, Ordering::AcqRel) {
                        self.express.wake.notify_one();
                    }
                }
                drop(producers);
                drop(log);
                self.express.appends.increment(1);
                let _ = reply.send(result);
            }
            Err(payload) => {
                // As for a writer group: the log or the producer states may be half updated.
                tracing::error!(topic = %self.topic, partition = self.id, "append failed: {}; stopping appends to this partition", panic_message(payload.as_ref()));
                log.mark_failed();
            }
        }
        None
    }

    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    /// Whether a Raft group serves this partition (cluster mode).
    pub fn is_replicated(&self) -> bool {
        self.replica.read().is_some()
    }

    /// The log, shared with a Raft group's storage.
    pub(crate) fn shared_log(&self) -> Arc<Mutex<PartitionLog>> {
        self.log.clone()
    }

    pub(crate) fn storage(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    /// The producer state and tail cache a Raft group keeps in step with the log.
    pub(crate) fn tracker(&self) -> Tracker {
        Tracker {
            producers: self.express.producers.clone(),
            tail: self.tail.clone(),
            log_start: self.log_start.clone(),
        }
    }

    /// Sets the high watermark to a replica's persisted commit, before the partition serves
    /// (the log may hold uncommitted entries past it).
    pub(crate) fn reset_high_watermark(&self, hw: u64) {
        self.high_watermark.send_replace(hw);
    }

    /// Moves the high watermark forward to a newly committed offset.
    pub(crate) fn advance_high_watermark(&self, hw: u64) {
        self.high_watermark.send_if_modified(|cur| {
            let moved = hw > *cur;
            if moved {
                *cur = hw;
            }
            moved
        });
    }

    /// Routes produce through a Raft group from now on.
    pub(crate) fn attach_replica(&self, events: mpsc::Sender<Proposal>) {
        *self.replica.write() = Some(events);
    }

    pub fn watch_high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }

    pub fn log_start_offset(&self) -> u64 {
        self.log_start.load(Ordering::Acquire)
    }

    /// Whole batches from the one containing `offset`, up to `max_bytes` (at least one batch),
    /// never past the high watermark, as one or more buffers: from the tail cache when the
    /// offset is recent, else from disk. Empty at the high watermark.
    pub async fn read_parts(&self, offset: u64, max_bytes: usize) -> Result<Vec<Bytes>, PartitionError> {
        if let Some(parts) = self.read_cached(offset, max_bytes) {
            return Ok(parts);
        }
        self.read_disk_parts(offset, max_bytes).await
    }

    /// What `read_parts` would serve from memory (the tail cache), if it would.
    pub fn read_cached(&self, offset: u64, max_bytes: usize) -> Option<Vec<Bytes>> {
        let hw = self.high_watermark();
        if offset < hw && offset >= self.log_start_offset() {
            return self.tail.lock().read(offset, hw, max_bytes);
        }
        None
    }

    /// As `read_parts`, always from disk (what a subscription reads ahead).
    pub async fn read_disk_parts(&self, offset: u64, max_bytes: usize) -> Result<Vec<Bytes>, PartitionError> {
        let bytes = self.read(offset, max_bytes).await?;
        Ok(if bytes.is_empty() { Vec::new() } else { vec![bytes] })
    }

    /// Whether `read_parts(offset, ..)` would be served from memory, not from disk.
    pub fn is_cached(&self, offset: u64) -> bool {
        self.tail.lock().holds(offset)
    }

    /// The high watermark a read at `offset` goes up to; `None` when there is nothing to read
    /// yet (the offset is the high watermark), an error past it.
    fn readable(&self, offset: u64) -> Result<Option<u64>, PartitionError> {
        let hw = self.high_watermark();
        if offset > hw {
            return Err(LogError::OffsetOutOfRange {
                requested: offset,
                log_start: self.log_start_offset(),
                next: hw,
            }
            .into());
        }
        Ok((offset < hw).then_some(hw))
    }

    /// As `read_parts`, from disk, in one buffer.
    pub async fn read(&self, offset: u64, max_bytes: usize) -> Result<Bytes, PartitionError> {
        let Some(hw) = self.readable(offset)? else { return Ok(Bytes::new()) };
        // Locating batches reads index and headers from disk, so it happens on a blocking
        // thread, like the read itself; the lock is held only while planning.
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || {
            let plan = log.lock().read_plan(offset, max_bytes)?;
            Ok(plan.execute_below(hw)?)
        })
        .await
        .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))?
    }

    /// As `read`, with the bytes the read will return counted against `budget` before they are
    /// read (a first batch larger than `max_bytes` is read whole, and counted whole). With
    /// `wait` false, `None` when the budget has not that much free now (a read ahead, which
    /// is never worth waiting for). The permits are the caller's to hold until the bytes are
    /// handed on.
    pub async fn read_counted(
        &self,
        offset: u64,
        max_bytes: usize,
        budget: &crate::budget::ReplyBudget,
        wait: bool,
    ) -> Result<Option<(Bytes, crate::budget::Permits)>, PartitionError> {
        let Some(hw) = self.readable(offset)? else { return Ok(Some((Bytes::new(), Vec::new()))) };
        let log = self.log.clone();
        let internal = |e: tokio::task::JoinError| PartitionError::new(ErrorCode::Internal, e.to_string());
        let plan = tokio::task::spawn_blocking(move || log.lock().read_plan(offset, max_bytes))
            .await
            .map_err(internal)??;
        let permits = match wait {
            true => budget.acquire(plan.len()).await,
            false => match budget.try_acquire(plan.len()) {
                Some(p) => p,
                None => return Ok(None),
            },
        };
        let bytes = tokio::task::spawn_blocking(move || plan.execute_below(hw)).await.map_err(internal)??;
        Ok(Some((bytes, permits)))
    }

    /// First offset whose batch has a timestamp at or after `ts_ms`, or the high watermark.
    pub async fn offset_for_timestamp(&self, ts_ms: i64) -> Result<u64, PartitionError> {
        let log = self.log.clone();
        let found = tokio::task::spawn_blocking(move || log.lock().offset_for_timestamp(ts_ms))
            .await
            .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))??;
        let hw = self.high_watermark();
        Ok(found.unwrap_or(hw).min(hw))
    }

    /// Deletes segments past retention. Blocking.
    pub fn apply_retention_blocking(&self) -> Result<(), PartitionError> {
        let mut log = self.log.lock();
        // Never past the high watermark: in a replicated partition what is above it may not
        // be committed yet (on one node every closed segment is below it).
        let report = log.apply_retention_below(now_ms(), self.high_watermark())?;
        self.log_start.store(log.log_start_offset(), Ordering::Release);
        if report.deleted_segments() > 0 {
            tracing::info!(topic = %self.topic, partition = self.id, ?report, "retention deleted segments");
        }
        Ok(())
    }

    /// Deletes the segments wholly below `offset`, never past the high watermark: a replicated
    /// offsets partition drops what its last complete snapshot replaced (docs/replication.md
    /// §10). Returns how many segments went. Blocking.
    pub(crate) fn delete_segments_below_blocking(&self, offset: u64) -> Result<usize, LogError> {
        let mut log = self.log.lock();
        let report = log.delete_segments_below(offset.min(self.high_watermark()))?;
        self.log_start.store(log.log_start_offset(), Ordering::Release);
        Ok(report.deleted_segments())
    }

    /// CRC-checks the closed segments (design.md §5.3), calling `pace` with each batch's length
    /// (it bounds the rate; false stops). Returns the number of damaged spans found, which are
    /// logged, counted and quarantined. Blocking; holds the log's lock only to pick each segment.
    pub fn verify_closed_blocking(&self, mut pace: impl FnMut(u64) -> bool) -> Result<usize, PartitionError> {
        let (mut found, mut after) = (0, None);
        loop {
            let Some(target) = self.log.lock().verify_target(after)? else { return Ok(found) };
            after = Some(target.base());
            let damage = target.verify(&mut pace)?;
            found += damage.len();
            // Noted for a cluster to repair from another replica (`maintenance::repair_damage`).
            let log = self.log.lock();
            for d in &damage {
                log.note_damage(d.offsets.start);
            }
        }
    }

    /// Gives the tail cache's memory back when the partition has been idle for `idle`.
    pub fn release_idle_cache(&self, idle: Duration) {
        self.tail.lock().release_if_idle(idle);
    }

    /// Size on disk and segment count, for describe/metrics.
    pub fn stats(&self) -> (u64, usize) {
        let log = self.log.lock();
        (log.size_bytes(), log.segment_count())
    }

    /// Syncs everything written and checkpoints the recovery point (at shutdown). Blocking.
    pub fn sync_blocking(&self) -> std::io::Result<()> {
        let handle = self.log.lock().sync_handle();
        handle.sync()?;
        self.checkpoint_blocking().map_err(std::io::Error::other)?;
        Ok(())
    }

    /// Writes the recovery-point checkpoint at once if completed fsyncs moved it
    /// `MAX_UNCHECKPOINTED_BYTES` or more past the file (after a periodic fsync). Blocking.
    fn checkpoint_if_behind(&self) {
        if self.deleted.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.recovery.write_if_behind(MAX_UNCHECKPOINTED_BYTES) {
            tracing::warn!(topic = %self.topic, partition = self.id, "writing the recovery point: {e}");
        }
    }

    /// Writes the recovery-point checkpoint if completed fsyncs moved it since the last write
    /// (no data fsync of its own). Not for a deleted topic, whose directory is going away.
    /// Blocking.
    pub fn checkpoint_blocking(&self) -> Result<bool, LogError> {
        if self.deleted.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.recovery.write()
    }
}

struct Writer {
    partition: std::sync::Weak<Partition>,
    /// The commit offset (also the high watermark) and the produce acks waiting for it.
    acks: CommitQueue<(Reply, Appended)>,
    log: Arc<Mutex<PartitionLog>>,
    tail: Arc<Mutex<TailCache>>,
    /// Recent batches of idempotent producers (shared with the express path).
    producers: Arc<Mutex<ProducerStates>>,
    express: Arc<Express>,
    durability: Durability,
    /// `quiver_group_commits_total` by path, looked up once.
    commits_in_place: metrics::Counter,
    commits_handed_off: metrics::Counter,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<AppendRequest>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = false;
        // The periodic fsync runs beside the appends, not between them: syncing a second of
        // writes can take hundreds of milliseconds, and producers would wait for all of it.
        let mut syncing: Option<tokio::task::JoinHandle<bool>> = None;
        loop {
            let first = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => break },
                _ = tick.tick(), if dirty && syncing.is_none() && self.durability == Durability::Interval => {
                    syncing = Some(self.start_sync(true));
                    dirty = false;
                    continue;
                }
                _ = self.express.wake.notified() => {
                    dirty = true; // an express append: the next tick syncs it
                    continue;
                }
                r = async {
                    match syncing.as_mut() {
                        Some(s) => s.await,
                        None => std::future::pending().await,
                    }
                }, if syncing.is_some() => {
                    syncing = None;
                    if !matches!(r, Ok(true)) {
                        dirty = true;
                    }
                    continue;
                }
                _ = shutdown.cancelled() => break,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_GROUP_COMMIT {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.commit(batch).await;
            dirty = true;
        }
        // Shutdown or partition dropped: make everything written durable (an express
        // append's `dirty` is read under the log's lock, after `closed` was cancelled).
        if let Some(s) = syncing {
            let _ = s.await;
        }
        let _ = self.start_sync(dirty).await;
    }

    /// Appends a group of batches and syncs once if the durability asks for it. The appends
    /// wait in the ack queue; the commit offset then moves to what is durable, which answers
    /// them (or the failed sync fails them).
    async fn commit(&mut self, group: Vec<AppendRequest>) {
        let n = group.len() as u64;
        self.commit_group(group).await;
        // Answered (or failed): the express path may run again once nothing is pending.
        let before = self.express.pending.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "writer pending count {before} below the group's {n}");
    }

    async fn commit_group(&mut self, group: Vec<AppendRequest>) {
        let log = self.log.clone();
        let tail = self.tail.clone();
        let producers = self.producers.clone();
        let sync = self.durability == Durability::Always;
        let bytes: usize = group.iter().map(|r| r.batch.len()).sum();
        let small = !sync && bytes < INLINE_GROUP_BYTES;
        let group = if small {
            match self.append_in_place(group) {
                Ok(result) => {
                    self.commits_in_place.increment(1);
                    return self.finish_commit(result).await;
                }
                Err(group) => group,
            }
        } else {
            group
        };
        let partition = self.partition.clone();
        let work = move || {
            let now = now_ms();
            let mut results = Vec::with_capacity(group.len());
            let (handle, next) = {
                let mut log = log.lock();
                let mut producers = producers.lock();
                for req in group {
                    let r = append_one(&mut log, &mut producers, &tail, req.batch, now);
                    results.push((req.reply, r));
                }
                (log.sync_handle(), log.next_offset())
            };
            let started = std::time::Instant::now();
            let synced = if sync { handle.sync() } else { Ok(()) };
            if sync {
                metrics::histogram!("quiver_fsync_seconds").record(started.elapsed().as_secs_f64());
                // On the blocking thread the sync ran on: at most once per
                // MAX_UNCHECKPOINTED_BYTES, so a crash leaves little to CRC-scan.
                if let Some(p) = partition.upgrade().filter(|_| synced.is_ok()) {
                    p.checkpoint_if_behind();
                }
            }
            if synced.is_err() {
                // The kernel may have dropped the dirty pages: a later fsync could succeed
                // without them, so the log refuses further appends until the broker reopens
                // it. (Here, not on the runtime: the log's lock can be held across disk work.)
                log.lock().mark_failed();
            }
            (results, synced.map_err(|e| e.to_string()), next)
        };
        self.commits_handed_off.increment(1);
        let result = tokio::task::spawn_blocking(work).await.map_err(|e| e.to_string());
        self.finish_commit(result).await;
    }

    /// A small group without fsync, appended here on the writer's task when nothing can make
    /// it wait: the log and producer locks are free (their holders may be doing disk work)
    /// and the appends stay in the active segment (a roll fsyncs, a new epoch fsyncs). Then it
    /// costs copying a few kilobytes into the page cache, less than handing the group to a
    /// blocking thread and back, whose wake-ups are most of a one-at-a-time round trip.
    /// Otherwise the group is given back for the hand-off.
    fn append_in_place(
        &mut self,
        group: Vec<AppendRequest>,
    ) -> Result<Result<CommitResult, String>, Vec<AppendRequest>> {
        let now = now_ms();
        let Some(mut log) = self.log.try_lock() else { return Err(group) };
        if !log.appends_in_active_segment(group.iter().map(|r| r.batch.header()), LEADER_EPOCH, now) {
            return Err(group);
        }
        let Some(mut producers) = self.producers.try_lock() else { return Err(group) };
        let tail = &self.tail;
        // As a blocking thread's panic would be, a panic here fails the group, not the writer.
        Ok(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut results = Vec::with_capacity(group.len());
            for req in group {
                let r = append_one(&mut log, &mut producers, tail, req.batch, now);
                results.push((req.reply, r));
            }
            (results, Ok(()), log.next_offset())
        }))
        .map_err(|payload| panic_message(payload.as_ref())))
    }

    /// Answers a group's appends once they are committed (or fails them).
    async fn finish_commit(&mut self, result: Result<CommitResult, String>) {
        let (results, synced, next) = match result {
            Ok(r) => r,
            Err(e) => {
                // The log or the producer states may be half updated: no more appends until the
                // partition is reopened. The group's producers get errors (their replies drop).
                tracing::error!("append task failed: {e}; stopping appends to this partition");
                let log = self.log.clone();
                let _ = tokio::task::spawn_blocking(move || log.lock().mark_failed()).await;
                return;
            }
        };
        for (reply, r) in results {
            match r {
                Ok(appended) => self.acks.push(appended.last_offset, (reply, appended)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        match synced {
            // One node: what this group wrote (and, under `always`, synced) is committed.
            Ok(()) => self.advance_commit(next, next),
            Err(e) => {
                tracing::error!(topic = ?self.partition.upgrade().map(|p| p.topic.clone()), "fsync failed: {e}; failing the appends it covered and stopping appends to this partition");
                for (reply, _) in self.acks.fail_all() {
                    let error = PartitionError::new(ErrorCode::StorageError, format!("fsync failed: {e}"));
                    let _ = reply.send(Err(error));
                }
            }
        }
    }

    /// Moves the commit offset to `commit` (at most `log_end`, never back; asserted): the high
    /// watermark follows, then the acks it passes are sent, here, on the writer's task (a
    /// producer told its offset can read it).
    fn advance_commit(&mut self, commit: u64, log_end: u64) {
        let released = self.acks.advance(commit, log_end);
        if let Some(p) = self.partition.upgrade() {
            // Forward only: the express path may already have moved it past this group's
            // end (never while this group was in flight: its `pending` claim excludes that).
            p.high_watermark.send_if_modified(|hw| {
                let moved = commit > *hw;
                if moved {
                    *hw = commit;
                }
                moved
            });
        }
        for (reply, appended) in released {
            let _ = reply.send(Ok(appended));
        }
    }

    /// Starts an fsync of what is written so far, on a blocking thread; the handle says
    /// whether it worked. A failure stops appends to the partition.
    fn start_sync(&self, dirty: bool) -> tokio::task::JoinHandle<bool> {
        let express = self.express.clone();
        let log = self.log.clone();
        let partition = self.partition.clone();
        tokio::task::spawn_blocking(move || {
            // Taken here, not on the runtime: the log's lock can be held across disk work
            // (retention, read planning).
            let handle = {
                let log = log.lock();
                // Cleared before the handle is taken, under the lock express appends set it
                // under: this sync covers every express append that set it.
                let express_dirty = express.dirty.swap(false, Ordering::AcqRel);
                if !dirty && !express_dirty {
                    return true;
                }
                log.sync_handle()
            };
            let started = std::time::Instant::now();
            match handle.sync() {
                Ok(()) => {
                    metrics::histogram!("quiver_fsync_seconds").record(started.elapsed().as_secs_f64());
                    if let Some(p) = partition.upgrade() {
                        p.checkpoint_if_behind();
                    }
                    true
                }
                Err(e) => {
                    tracing::error!("periodic fsync failed: {e}; stopping appends to this partition");
                    log.lock().mark_failed();
                    false
                }
            }
        })
    }
}

/// The text of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("append panicked: {text}")
}

/// Appends one batch unless it is a retry of one already written (idempotent
/// producers), which is answered with its original offsets.
fn append_one(
    log: &mut PartitionLog,
    producers: &mut ProducerStates,
    tail: &Mutex<TailCache>,
    batch: ValidatedBatch,
    now: i64,
) -> Result<Appended, PartitionError> {
    let header = *batch.header();
    match producers.check(&header) {
        SeqCheck::Duplicate { base_offset, last_offset } => {
            metrics::counter!("quiver_duplicate_batches_total").increment(1);
            return Ok(Appended { base_offset, last_offset, append_time_ms: now });
        }
        SeqCheck::OutOfOrder { expected, got } => {
            return Err(PartitionError::new(
                ErrorCode::OutOfOrderSequence,
                format!("producer {} sent sequence {got}, expected {expected}", header.producer_id),
            ));
        }
        SeqCheck::Append => {}
    }
    append_and_track(producers, tail, batch, now, |batch, snapshot| {
        log.append_with(batch, LEADER_EPOCH, now, Some(snapshot))
    })
}

/// Runs `write` (a leader's or a follower's append of `batch`), then has the producer state and
/// the tail cache follow it. If the batch rolls the log, the producers as of the new segment's
/// start are snapshot durably before the segment exists, so a retry of a batch from the old
/// segment is still recognised after a restart. A failed snapshot fails the roll and this
/// append (retriable): the dedup state is never silently lost.
pub(crate) fn append_and_track(
    producers: &mut ProducerStates,
    tail: &Mutex<TailCache>,
    mut batch: ValidatedBatch,
    now: i64,
    write: impl FnOnce(&mut ValidatedBatch, &RollFile<'_>) -> Result<crate::log::AppendInfo, LogError>,
) -> Result<Appended, PartitionError> {
    let info = {
        let encode = || producers.encode_snapshot();
        write(&mut batch, &RollFile { ext: SNAPSHOT_EXT, contents: &encode })?
    };
    producers.record(batch.header(), info.base_offset);
    // The stamped bytes, frozen without a copy, serve tail readers.
    tail.lock().push(info.base_offset, info.last_offset + 1, batch.freeze());
    Ok(Appended { base_offset: info.base_offset, last_offset: info.last_offset, append_time_ms: now })
}

/// A follower's append (docs/design.md §5.7): the leader's batch, with its offsets and epoch,
/// stored as it is; the producer state and the tail cache follow it as they follow a leader's
/// append. Not wired to a partition yet: replication (issue 17) drives it.
#[allow(dead_code)]
pub(crate) fn append_replicated_one(
    log: &mut PartitionLog,
    producers: &mut ProducerStates,
    tail: &Mutex<TailCache>,
    batch: ValidatedBatch,
    now: i64,
) -> Result<Appended, PartitionError> {
    append_and_track(producers, tail, batch, now, |batch, snapshot| {
        log.append_replicated(batch, now, Some(snapshot))
    })
}

/// Truncates the partition's log at `offset` (a follower's uncommitted suffix, design.md §5.7),
/// then drops the cut batches from the tail cache and rebuilds the producer state from the
/// newest snapshot at or below the cut, replaying the batches after it. Never below `commit`
/// (the high watermark: what consumers may have read and producers were told is stored).
/// Not wired to a partition yet: replication (issue 17) drives it.
#[allow(dead_code)]
pub(crate) fn truncate_one(
    log: &mut PartitionLog,
    producers: &mut ProducerStates,
    tail: &Mutex<TailCache>,
    offset: u64,
    commit: u64,
) -> Result<(), PartitionError> {
    // The commit offset never passes the log end, and nothing committed is ever cut.
    assert!(commit <= log.next_offset(), "commit offset {commit} past the log end {}", log.next_offset());
    if offset < commit {
        return Err(PartitionError::new(
            ErrorCode::Internal,
            format!("refusing to truncate at {offset}, below the commit offset {commit}"),
        ));
    }
    // The cache first: whatever happens next, it never serves a batch past the cut.
    tail.lock().truncate(offset);
    log.truncate_to(offset)?;
    *producers = recover_producers(log)?;
    Ok(())
}

/// Opens (recovers) a partition's log and rebuilds its producer state in the same pass over the
/// active segment: the batches recovery's CRC scan keeps are replayed onto the active
/// segment's snapshot as they are read. Only if that snapshot is missing or damaged is the log
/// read again ([`recover_producers`]).
fn open_log(
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    config: LogConfig,
    now: i64,
) -> Result<(PartitionLog, crate::log::RecoveryReport, ProducerStates), PartitionError> {
    // (segment base, its snapshot with the batches so far recorded; `None` if it did not
    // decode; empty if there was no snapshot file, which is right only for the first segment)
    let mut replayed: Option<(u64, Option<ProducerStates>, bool)> = None;
    let snapshot_at = |base: u64| -> (Option<ProducerStates>, bool) {
        let name = format!("{base:020}.{SNAPSHOT_EXT}");
        match storage.list(&dir) {
            Ok(names) if !names.contains(&name) => return (Some(ProducerStates::default()), false),
            Ok(_) => {}
            Err(_) => return (None, true),
        }
        let read = || -> Option<ProducerStates> {
            let f = storage.open(&dir.join(&name)).ok()?;
            let len = f.len().ok().filter(|&l| l <= MAX_SNAPSHOT_BYTES)?;
            let mut buf = vec![0; len as usize];
            f.read_exact_at(0, &mut buf).ok()?;
            ProducerStates::decode_snapshot(&buf)
        };
        (read(), true)
    };
    let mut observer = |base: u64, header: &BatchHeader| {
        let (_, states, _) = replayed.get_or_insert_with(|| {
            let (states, file) = snapshot_at(base);
            (base, states, file)
        });
        if let Some(states) = states {
            states.record(header, header.base_offset);
        }
    };
    let (log, report) =
        PartitionLog::open_observed(storage.clone(), dir.clone(), config, now, &mut observer)?;
    let producers = match replayed {
        Some((base, Some(states), file))
            if base == log.active_base_offset() && (file || base == log.log_start_offset()) =>
        {
            states
        }
        // An empty active segment (its snapshot is all there is), or no usable snapshot.
        _ => recover_producers(&log)?,
    };
    Ok((log, report, producers))
}

/// Rebuilds idempotent-producer state: the newest valid snapshot at or below the active
/// segment's base (normally the active segment's own), then the batch headers from there to the
/// end of the log (design.md §10).
pub(crate) fn recover_producers(log: &PartitionLog) -> Result<ProducerStates, PartitionError> {
    let (log_start, active) = (log.log_start_offset(), log.active_base_offset());
    let mut bases = log.side_file_bases(SNAPSHOT_EXT)?;
    bases.retain(|&b| b >= log_start && b <= active);
    for &base in bases.iter().rev() {
        let Some(bytes) = log.read_side_file(base, SNAPSHOT_EXT, MAX_SNAPSHOT_BYTES)? else { continue };
        match ProducerStates::decode_snapshot(&bytes) {
            Some(mut states) => {
                if base < active {
                    tracing::warn!(dir = %log.dir().display(), base, active, "using an older producer snapshot; replaying the segments after it");
                }
                replay_producers(log, base, &mut states)?;
                return Ok(states);
            }
            None => tracing::warn!(dir = %log.dir().display(), base, "producer snapshot is damaged"),
        }
    }
    if active > log_start {
        // Every roll writes the snapshot before the new segment exists, so only damage or a
        // data directory of an older version gets here.
        tracing::warn!(dir = %log.dir().display(), "no valid producer snapshot; replaying the whole log");
    }
    let mut states = ProducerStates::default();
    replay_producers(log, log_start, &mut states)?;
    Ok(states)
}

/// Records in `states` every batch from `offset` to the end of the log.
fn replay_producers(
    log: &PartitionLog,
    mut offset: u64,
    states: &mut ProducerStates,
) -> Result<(), PartitionError> {
    while offset < log.next_offset() {
        let read = log.read_plan(offset, 8 * 1024 * 1024).and_then(|plan| plan.execute());
        let bytes = match read {
            Ok(bytes) if bytes.is_empty() => break,
            Ok(bytes) => bytes,
            Err(LogError::Corrupt { .. }) => {
                // Damaged batches were never acknowledged as they are now; their producers'
                // retries would be appended again. Reported where the damage was found.
                let resume = log.resume_after_damage(offset);
                tracing::warn!(dir = %log.dir().display(), offset, resume, "skipping damaged batches while rebuilding producer state");
                offset = resume;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut next = offset;
        for span in Batches::new(&bytes).map_while(Result::ok) {
            states.record(&span.header, span.header.base_offset);
            next = span.header.next_offset();
        }
        if next <= offset {
            break; // a plan reads at least one batch, so this is not expected
        }
        offset = next;
    }
    Ok(())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogConfig;
    use crate::storage::{FileWrapper, MemStorage, Storage, StorageFile, Wrapped};
    use quiver_protocol::batch::{BatchBuilder, ProducerIdentity};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    fn batch(producer_id: i64, base_sequence: i32, records: usize) -> ValidatedBatch {
        let identity = ProducerIdentity { producer_id, producer_epoch: 0, base_sequence };
        let mut b = BatchBuilder::new(256).with_identity(identity);
        for _ in 0..records {
            b.push(1, None, b"value", &[]);
        }
        ValidatedBatch::new(b.finish()).expect("valid batch")
    }

    /// Makes producer snapshots (any file with `.producers` in its name) fail to be written or
    /// synced while set.
    #[derive(Debug, Default)]
    struct SnapshotFailure(Arc<AtomicBool>);

    impl FileWrapper for SnapshotFailure {
        fn wrap(&self, path: &Path, inner: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
            let snapshot = path.to_string_lossy().contains(".producers");
            Arc::new(FailingFile { inner, fail: snapshot.then(|| self.0.clone()) })
        }
    }

    type FailingSnapshots = Wrapped<MemStorage, SnapshotFailure>;

    #[derive(Debug)]
    struct FailingFile {
        inner: Arc<dyn StorageFile>,
        fail: Option<Arc<AtomicBool>>,
    }

    impl FailingFile {
        fn check(&self) -> std::io::Result<()> {
            match &self.fail {
                Some(fail) if fail.load(Ordering::SeqCst) => {
                    Err(std::io::Error::other("injected snapshot failure"))
                }
                _ => Ok(()),
            }
        }
    }

    impl StorageFile for FailingFile {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.inner.read_exact_at(pos, buf)
        }
        fn append(&self, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.append(data)
        }
        fn truncate(&self, len: u64) -> std::io::Result<()> {
            self.inner.truncate(len)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync()
        }
    }

    /// Segment files whose fsync fails while set (nothing else fails).
    #[derive(Debug, Default)]
    struct SyncFailure(Arc<AtomicBool>);

    impl FileWrapper for SyncFailure {
        fn wrap(&self, path: &Path, inner: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
            let segment = path.extension().is_some_and(|e| e == "log");
            Arc::new(FailingSync { inner, fail: segment.then(|| self.0.clone()) })
        }
    }

    #[derive(Debug)]
    struct FailingSync {
        inner: Arc<dyn StorageFile>,
        fail: Option<Arc<AtomicBool>>,
    }

    impl StorageFile for FailingSync {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.inner.read_exact_at(pos, buf)
        }
        fn append(&self, data: &[u8]) -> std::io::Result<()> {
            self.inner.append(data)
        }
        fn truncate(&self, len: u64) -> std::io::Result<()> {
            self.inner.truncate(len)
        }
        fn sync(&self) -> std::io::Result<()> {
            if self.fail.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            self.inner.sync()
        }
    }

    /// Under `interval` a small batch arriving while the writer has nothing in hand is appended
    /// by the caller and answered before `submit` returns (the express path), moves the high
    /// watermark, and is covered by the writer's fsyncs (the periodic one or the last, at
    /// close): a crash after a graceful close keeps it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn express_appends_are_answered_at_once_and_synced_at_close() -> anyhow::Result<()> {
        let storage = Arc::new(MemStorage::new());
        // Synced every millisecond: the writer's own appends are synced long before the close, so
        // only the express path's `dirty` can make the writer sync the express append.
        let config = TopicConfig::default().with_durability(Durability::Interval).with_flush_interval_ms(1);
        let open = |closed: &CancellationToken| {
            Partition::open(
                storage.clone(),
                PathBuf::from("/p"),
                "t".into(),
                0,
                &config,
                &SharedBudgets::new(1 << 20, 1 << 20, 2),
                closed.clone(),
            )
        };
        let closed = CancellationToken::new();
        let p = open(&closed)?;
        let bounded = |rx| tokio::time::timeout(Duration::from_secs(10), rx);
        // The first append begins epoch 0 (an fsync): the writer's.
        bounded(p.submit(batch(7, 0, 2)).await?).await???;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while p.express.pending.load(Ordering::Acquire) != 0 {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the writer never gave its request back");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // the writer's periodic sync ran
        let mut rx = p.submit(batch(7, 2, 3)).await?;
        let a = rx.try_recv().map_err(|e| anyhow::anyhow!("not answered at once: {e}"))??;
        assert_eq!((a.base_offset, a.last_offset), (2, 4));
        assert_eq!(p.high_watermark(), 5);
        // A producer's next batch out of order is refused on the express path too.
        let mut rx = p.submit(batch(7, 9, 1)).await?;
        let e = rx.try_recv()?.err().ok_or_else(|| anyhow::anyhow!("a sequence gap was accepted"))?;
        assert_eq!(e.code, ErrorCode::OutOfOrderSequence, "{e}");

        closed.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&p.express) > 1 {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the writer did not stop");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(p);
        storage.crash();
        let closed = CancellationToken::new();
        let p = open(&closed)?;
        assert_eq!(p.high_watermark(), 5, "the express append was not synced at close");
        closed.cancel();
        Ok(())
    }

    /// Under `durability = always` a produce is acknowledged once the commit offset (the
    /// fsynced offset) passes it, after the high watermark moved, so the producer can read what
    /// it was told about; a failed fsync fails the appends it covered, keeps the high watermark
    /// and the commit offset, and stops further appends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_wait_for_the_commit_offset_and_a_failed_fsync_fails_them() -> anyhow::Result<()> {
        let storage = Arc::new(Wrapped { inner: MemStorage::new(), wrapper: SyncFailure::default() });
        let fail = storage.wrapper.0.clone();
        let config = TopicConfig::default();
        assert_eq!(config.durability, Durability::Always);
        let closed = CancellationToken::new();
        let p = Partition::open(
            storage,
            PathBuf::from("/p"),
            "t".into(),
            0,
            &config,
            &SharedBudgets::new(1 << 20, 1 << 20, 2),
            closed.clone(),
        )?;
        let bounded = |rx| tokio::time::timeout(Duration::from_secs(10), rx);

        for seq in [0, 2] {
            let a = bounded(p.submit(batch(7, seq, 2)).await?).await???;
            assert_eq!(a.base_offset, seq as u64);
            assert!(p.high_watermark() > a.last_offset, "acknowledged offset {} not readable", a.last_offset);
        }
        let (hw, pending) = (p.high_watermark(), p.watch_high_watermark());
        assert_eq!(hw, 4);

        fail.store(true, Ordering::SeqCst);
        let e =
            bounded(p.submit(batch(7, 4, 1)).await?).await??.err().ok_or_else(|| anyhow::anyhow!("acked"))?;
        assert_eq!(e.code, ErrorCode::StorageError, "{e}");
        assert!(e.message.contains("fsync failed"), "{e}");
        fail.store(false, Ordering::SeqCst);
        let e =
            bounded(p.submit(batch(7, 4, 1)).await?).await??.err().ok_or_else(|| anyhow::anyhow!("acked"))?;
        assert_eq!(e.code, ErrorCode::StorageError, "appends stop after a failed fsync: {e}");
        assert_eq!(p.high_watermark(), hw);
        assert!(!pending.has_changed()?, "the high watermark never moved");
        closed.cancel();
        Ok(())
    }

    fn small_segments() -> LogConfig {
        LogConfig {
            segment_bytes: 400,
            segment_ms: 1 << 40,
            retention_bytes: None,
            retention_ms: None,
            index_interval_bytes: 300,
            ..Default::default()
        }
    }

    /// A roll whose producer snapshot cannot be written fails the append, and the retried
    /// append rolls with a durable snapshot: after a power loss, a retry of a batch written
    /// before the roll is recognised, not appended twice.
    #[test]
    fn a_failed_snapshot_write_fails_the_roll_and_a_crash_keeps_dedup_state() -> anyhow::Result<()> {
        let storage = Arc::new(FailingSnapshots::default());
        let dyn_storage: Arc<dyn Storage> = storage.clone();
        let dir = PathBuf::from("/p");
        let cfg = small_segments();
        let tail = Mutex::new(TailCache::new(1 << 20));
        let (mut log, _) = PartitionLog::open(dyn_storage.clone(), dir.clone(), cfg.clone(), 0)?;
        let mut producers = ProducerStates::default();
        let (mut seq, mut last_before_roll) = (0, None);
        loop {
            let before = log.next_offset();
            storage.wrapper.0.store(true, Ordering::SeqCst);
            match append_one(&mut log, &mut producers, &tail, batch(7, seq, 3), 1) {
                Ok(_) if log.segment_count() > 1 => break, // rolled although the snapshot failed
                Ok(a) => {
                    last_before_roll = Some((seq, a.base_offset));
                    seq += 3;
                }
                Err(e) => {
                    // The roll failed: nothing appended, the producer is told to retry.
                    assert_eq!(e.code, ErrorCode::StorageError, "{e}");
                    assert_eq!(log.next_offset(), before);
                    storage.wrapper.0.store(false, Ordering::SeqCst);
                    append_one(&mut log, &mut producers, &tail, batch(7, seq, 3), 1)?;
                    assert_eq!(log.segment_count(), 2);
                    break;
                }
            }
        }
        storage.wrapper.0.store(false, Ordering::SeqCst);
        let (retry_seq, original_offset) = last_before_roll.ok_or_else(|| anyhow::anyhow!("no roll"))?;
        log.sync()?;
        let next = log.next_offset();
        drop(log);
        storage.inner.crash();

        let (mut log, _) = PartitionLog::open(dyn_storage, dir, cfg, 0)?;
        assert_eq!(log.next_offset(), next, "synced batches survive");
        let mut producers = recover_producers(&log)?;
        let retried = append_one(&mut log, &mut producers, &tail, batch(7, retry_seq, 3), 2)?;
        assert_eq!(retried.base_offset, original_offset, "answered with the original offsets");
        assert_eq!(log.next_offset(), next, "nothing appended");
        Ok(())
    }

    /// A damaged snapshot of the active segment falls back to the previous one and replays the
    /// segments after it.
    #[test]
    fn a_damaged_snapshot_falls_back_to_the_previous_one() -> anyhow::Result<()> {
        let mem = Arc::new(MemStorage::new());
        let storage: Arc<dyn Storage> = mem.clone();
        let dir = PathBuf::from("/p");
        let tail = Mutex::new(TailCache::new(1 << 20));
        let (mut log, _) = PartitionLog::open(storage.clone(), dir.clone(), small_segments(), 0)?;
        let mut producers = ProducerStates::default();
        // Producer 1 writes only in the first segment; producer 2 keeps the log rolling.
        let first = append_one(&mut log, &mut producers, &tail, batch(1, 0, 1), 1)?;
        let mut seq = 0;
        while log.segment_count() < 3 {
            append_one(&mut log, &mut producers, &tail, batch(2, seq, 3), 1)?;
            seq += 3;
        }
        log.sync()?;
        let active = log.active_base_offset();
        let snapshot = dir.join(format!("{active:020}.producers"));
        let mut bytes = mem.contents(&snapshot).ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
        bytes[5] ^= 0x40;
        mem.set_contents(&snapshot, &bytes)?;
        drop(log);

        let (mut log, _) = PartitionLog::open(storage, dir, small_segments(), 0)?;
        let next = log.next_offset();
        let mut producers = recover_producers(&log)?;
        let retried = append_one(&mut log, &mut producers, &tail, batch(1, 0, 1), 2)?;
        assert_eq!(retried.base_offset, first.base_offset);
        assert_eq!(log.next_offset(), next, "nothing appended");
        Ok(())
    }

    /// An idempotent producer's batch A is lost in a crash while its next batch B, written
    /// after it but before any fsync covered either, survives (reordered writeback). Recovery
    /// cuts at A, so the producer's retry of A is appended at A's offset, not refused with
    /// `OutOfOrderSequence` for a B it was never told about.
    #[test]
    fn a_retry_of_a_batch_lost_before_a_surviving_one_is_appended() -> anyhow::Result<()> {
        let mem = Arc::new(MemStorage::new());
        let storage: Arc<dyn Storage> = mem.clone();
        let dir = PathBuf::from("/p");
        let cfg = LogConfig { segment_bytes: 1 << 20, ..small_segments() };
        let tail = Mutex::new(TailCache::new(1 << 20));
        let (mut log, _) = PartitionLog::open(storage.clone(), dir.clone(), cfg.clone(), 0)?;
        let mut producers = ProducerStates::default();
        append_one(&mut log, &mut producers, &tail, batch(7, 0, 3), 1)?;
        log.sync()?;
        log.recovery_checkpoint().write()?;
        let a = append_one(&mut log, &mut producers, &tail, batch(7, 3, 3), 1)?;
        append_one(&mut log, &mut producers, &tail, batch(7, 6, 3), 1)?;
        drop(log);
        mem.crash_reordered(0..batch(7, 3, 3).len());

        let (mut log, report) = PartitionLog::open(storage, dir, cfg, 0)?;
        assert!(report.damaged.is_empty(), "{:?}", report.damaged);
        assert_eq!(log.next_offset(), a.base_offset);
        let mut producers = recover_producers(&log)?;
        let retried = append_one(&mut log, &mut producers, &tail, batch(7, 3, 3), 2)?;
        assert_eq!(retried.base_offset, a.base_offset);
        append_one(&mut log, &mut producers, &tail, batch(7, 6, 3), 2)?;
        Ok(())
    }

    /// Truncation into an earlier segment rebuilds the producer state from that segment's
    /// snapshot and the batches kept after it: a retry of a kept batch is a duplicate, a
    /// retry of a cut one is appended again at the cut, and the tail cache serves no cut batch.
    #[test]
    fn truncation_rewinds_producer_state_and_the_tail_cache() -> anyhow::Result<()> {
        let mem = Arc::new(MemStorage::new());
        let storage: Arc<dyn Storage> = mem.clone();
        let dir = PathBuf::from("/p");
        let tail = Mutex::new(TailCache::new(1 << 20));
        let (mut log, _) = PartitionLog::open(storage.clone(), dir.clone(), small_segments(), 0)?;
        let mut producers = ProducerStates::default();
        let mut written = Vec::new();
        let mut seq = 0;
        while log.segment_count() < 4 {
            written.push((seq, append_one(&mut log, &mut producers, &tail, batch(7, seq, 3), 1)?));
            seq += 3;
        }
        // Cut at the second batch of the second segment.
        let second = log.side_file_bases("log")?[1];
        let at = written
            .iter()
            .position(|(_, a)| a.base_offset > second)
            .ok_or_else(|| anyhow::anyhow!("no batch"))?;
        let (cut_seq, cut) = written[at];
        let refused = truncate_one(&mut log, &mut producers, &tail, cut.base_offset, cut.base_offset + 1);
        assert!(refused.is_err(), "never below the commit offset");
        truncate_one(&mut log, &mut producers, &tail, cut.base_offset, cut.base_offset)?;
        assert_eq!(log.next_offset(), cut.base_offset);
        assert_eq!(tail.lock().read(cut.base_offset, u64::MAX, 1 << 20).map(|r| r.len()), Some(0));
        let (kept_seq, kept) = written[at - 1];
        let dup = append_one(&mut log, &mut producers, &tail, batch(7, kept_seq, 3), 2)?;
        assert_eq!(dup.base_offset, kept.base_offset, "a kept batch is still a duplicate");
        assert_eq!(log.next_offset(), cut.base_offset);
        let again = append_one(&mut log, &mut producers, &tail, batch(7, cut_seq, 3), 2)?;
        assert_eq!(again.base_offset, cut.base_offset, "a cut batch is appended again");
        let after = append_one(&mut log, &mut producers, &tail, batch(7, cut_seq + 3, 3), 2)?;
        assert_eq!(after.base_offset, cut.last_offset + 1);
        let cached = tail.lock().read(cut.base_offset, u64::MAX, 1 << 20).unwrap_or_default();
        assert_eq!(cached.len(), 2);
        // A follower of this log appends its bytes as they are, with the same producer state.
        let follower_dir = PathBuf::from("/f");
        let (mut follower, _) = PartitionLog::open(storage, follower_dir, small_segments(), 0)?;
        let (mut f_producers, f_tail) = (ProducerStates::default(), Mutex::new(TailCache::new(1 << 20)));
        let mut offset = 0;
        while offset < log.next_offset() {
            let bytes = log.read_plan(offset, 1)?.execute()?;
            let header = BatchHeader::parse(&bytes)?;
            append_replicated_one(
                &mut follower,
                &mut f_producers,
                &f_tail,
                ValidatedBatch::new(bytes.slice(..header.total_len()))?,
                3,
            )?;
            offset = header.next_offset();
        }
        assert_eq!(f_producers.encode_snapshot(), producers.encode_snapshot());
        Ok(())
    }

    /// Counts the bytes read from files whose name ends in `.log`.
    #[derive(Debug, Default)]
    struct CountReads(Arc<AtomicU64>);

    impl FileWrapper for CountReads {
        fn wrap(&self, path: &Path, inner: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
            let count = path.to_string_lossy().ends_with(".log").then(|| self.0.clone());
            Arc::new(CountingFile { inner, count })
        }
    }

    #[derive(Debug)]
    struct CountingFile {
        inner: Arc<dyn StorageFile>,
        count: Option<Arc<AtomicU64>>,
    }

    impl StorageFile for CountingFile {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
            if let Some(count) = &self.count {
                count.fetch_add(buf.len() as u64, Ordering::SeqCst);
            }
            self.inner.read_exact_at(pos, buf)
        }
        fn append(&self, data: &[u8]) -> std::io::Result<()> {
            self.inner.append(data)
        }
        fn truncate(&self, len: u64) -> std::io::Result<()> {
            self.inner.truncate(len)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.inner.sync()
        }
    }

    /// Opening a partition reads its active segment once: the producer state is replayed from
    /// the batches recovery's CRC scan reads, not by reading the segment again; and it is the
    /// state a separate replay gives, with and without a usable snapshot.
    #[test]
    fn opening_reads_the_active_segment_once() -> anyhow::Result<()> {
        let storage = Arc::new(Wrapped::<MemStorage, CountReads>::default());
        let dyn_storage: Arc<dyn Storage> = storage.clone();
        let dir = PathBuf::from("/p");
        let tail = Mutex::new(TailCache::new(1 << 20));
        for first_segment in [true, false] {
            let cfg =
                LogConfig { segment_bytes: if first_segment { 1 << 20 } else { 20_000 }, ..small_segments() };
            let dir = dir.join(first_segment.to_string());
            let (mut log, _) = PartitionLog::open(dyn_storage.clone(), dir.clone(), cfg.clone(), 0)?;
            let mut producers = ProducerStates::default();
            for i in 0..300 {
                append_one(&mut log, &mut producers, &tail, batch(i % 5, (i / 5 * 3) as i32, 3), 1)?;
            }
            assert_eq!(log.segment_count() == 1, first_segment);
            log.sync()?;
            let active = log.side_file_bases("log")?.last().copied().unwrap_or(0);
            let active_size =
                storage.inner.contents(&dir.join(format!("{active:020}.log"))).map_or(0, |b| b.len());
            let expected = producers.sorted();
            drop(log);

            // What recovering the log alone reads (its CRC scan reads each header, then the batch).
            storage.wrapper.0.store(0, Ordering::SeqCst);
            drop(PartitionLog::open(dyn_storage.clone(), dir.clone(), cfg.clone(), 0)?);
            let log_alone = storage.wrapper.0.swap(0, Ordering::SeqCst) as usize;
            let (log, _, reopened) = open_log(dyn_storage.clone(), dir.clone(), cfg.clone(), 0)?;
            let read = storage.wrapper.0.load(Ordering::SeqCst) as usize;
            assert!(
                read < log_alone + active_size / 10,
                "read {read} bytes, recovery alone {log_alone}, the active segment is {active_size}"
            );
            assert_eq!(reopened.sorted(), expected);
            assert_eq!(recover_producers(&log)?.sorted(), expected);
            drop(log);
            if !first_segment {
                // A damaged snapshot: the state comes from the older segments, read again.
                let snapshot = dir.join(format!("{active:020}.producers"));
                let mut bytes =
                    storage.inner.contents(&snapshot).ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
                bytes[5] ^= 0x40;
                storage.inner.set_contents(&snapshot, &bytes)?;
                let (_, _, reopened) = open_log(dyn_storage.clone(), dir.clone(), cfg, 0)?;
                assert_eq!(reopened.sorted(), expected);
            }
        }
        Ok(())
    }

    #[test]
    fn a_retry_from_before_a_segment_roll_is_recognised_after_a_restart() -> anyhow::Result<()> {
        let storage: Arc<MemStorage> = Arc::new(MemStorage::new());
        let dir = PathBuf::from("/p");
        storage.create_dir_all(&dir)?;
        let cfg = LogConfig {
            segment_bytes: 400,
            segment_ms: 1 << 40,
            retention_bytes: None,
            retention_ms: None,
            index_interval_bytes: 300,
            ..Default::default()
        };
        let tail = Mutex::new(TailCache::new(1 << 20));
        let (mut log, _) = PartitionLog::open(storage.clone(), dir.clone(), cfg.clone(), 0)?;
        let mut producers = ProducerStates::default();
        let (mut seq, mut last_before_roll) = (0, None);
        loop {
            let a = append_one(&mut log, &mut producers, &tail, batch(7, seq, 3), 1)?;
            if log.segment_count() > 1 {
                break;
            }
            last_before_roll = Some((seq, a.base_offset));
            seq += 3;
        }
        let (retry_seq, original_offset) = last_before_roll.ok_or_else(|| anyhow::anyhow!("no roll"))?;
        log.sync()?;
        let next = log.next_offset();
        drop(log);

        let (mut log, _) = PartitionLog::open(storage.clone(), dir, cfg, 0)?;
        let mut producers = recover_producers(&log)?;
        let retried = append_one(&mut log, &mut producers, &tail, batch(7, retry_seq, 3), 2)?;
        assert_eq!(retried.base_offset, original_offset, "answered with the original offsets");
        assert_eq!(log.next_offset(), next, "nothing appended");
        Ok(())
    }
}
