//! raft-rs's read-only `Storage` over a partition's segment log (docs/replication.md §2, §2a),
//! and the one write path into it ([`LogStorage::append`], driven by `Ready`).
//!
//! Raft entry index = batch ordinal; entry term = the batch's leader epoch; entry data = the
//! batch's bytes, shared with the read buffer. Raft's own entries (a new leader's empty entry,
//! configuration changes) are one-record control batches, so the log holds only Kafka v2
//! batches and offsets stay contiguous; reading converts them back.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use quiver_protocol::batch::{BatchBuilder, BatchHeader, BatchSplitter, RecordIter, ValidatedBatch};
use quiver_protocol::limits::MAX_RAFT_TERM;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use super::snapshot::SnapshotData;
use super::state::{self, DurableState};
use super::ReplicaError;
use crate::log::PartitionLog;
use crate::partition::Tracker;
use crate::storage::Storage;

/// Control record types (the `i16` after the `i16` version 0 in the record key).
/// Kafka's own value for KRaft's `LeaderChange`: Raft's empty entry of a new leader.
pub(crate) const CONTROL_LEADER_CHANGE: i16 = 2;
/// Ours: a configuration change (raft-rs `EntryConfChangeV2`), the payload in the value.
pub(crate) const CONTROL_CONF_CHANGE: i16 = 5;
/// Version of the control record key.
const CONTROL_KEY_VERSION: i16 = 0;

/// One replica's Raft storage: the partition log (shared with the partition, which reads it)
/// and the durable hard state kept beside it.
#[derive(Debug)]
pub(crate) struct LogStorage {
    log: Arc<Mutex<PartitionLog>>,
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    state: DurableState,
    tracker: Option<Tracker>,
    /// Set when the log lost entries below the persisted commit (damage found at recovery,
    /// docs/replication.md §7): the commit the replica had, which it must hold again before
    /// it may vote or lead. Persisted commits never go below it meanwhile.
    repair_until: Option<u64>,
    /// The newest commit raft-rs reported (at least the persisted one).
    commit_known: u64,
    /// The last committed entry handed out and applied (its configuration change, if any,
    /// persisted): the persisted commit never passes it, or a restart (which hands out only
    /// what follows the persisted commit) would skip a change (§11).
    applied_through: u64,
    /// When (ms, the caller's clock) a moving commit was last written.
    written_ms: i64,
    /// `None`: every append is fsynced before it counts (durability `always`). `Some(ms)`:
    /// appends are fsynced at most every `ms` (durability `interval`/`os`: a majority has the
    /// batch in its page cache when it is acknowledged, as Kafka's and NATS' defaults).
    sync_every_ms: Option<i64>,
    /// When the log was last fsynced, and whether appends came after.
    synced_ms: i64,
    unsynced: bool,
}

/// How often a moving commit alone is written to `raft-state` (term and vote changes are
/// written at once, before the messages that depend on them). The persisted commit is a lower
/// bound Raft never relies on for safety (a restarted replica learns the commit from its
/// leader); what it buys is the high watermark a restarted replica serves before it hears from
/// one, and the damage check of §7. Writing it at every commit cost three fsyncs per round trip.
const COMMIT_WRITE_INTERVAL_MS: i64 = 1000;
/// A `Ready` whose entries hold fewer bytes than this, and need no fsync, is handled on the
/// driver's task (`appends_in_place`): copying a few kilobytes into the page cache costs less
/// than the two thread hand-offs of a blocking thread. The single node's express path uses the
/// same bound.
const IN_PLACE_BYTES: usize = crate::storage::DIRECT_MIN_BYTES;

/// Where an entry landed in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placed {
    pub(crate) index: u64,
    /// The entry's term: whose proposal it is (a waiter of another term is not answered by it).
    pub(crate) term: u64,
    pub(crate) base_offset: u64,
    pub(crate) last_offset: u64,
}

impl LogStorage {
    /// Opens the replica over an opened (recovered) `log` in directory `dir` of `storage`,
    /// reading its `raft-state`. A replica that never wrote one starts with `voters` as its
    /// configuration, written durably before this returns. A persisted commit beyond the log's
    /// end (the log lost what was committed) opens the replica as repairing
    /// ([`repairing`](Self::repairing)): it must not vote or lead until it has those entries
    /// again (docs/replication.md §7).
    pub(crate) fn open(
        log: Arc<Mutex<PartitionLog>>,
        storage: Arc<dyn Storage>,
        voters: &[u64],
    ) -> Result<LogStorage, ReplicaError> {
        Self::open_in(log, storage, ConfState::from((voters.to_vec(), Vec::new())), 0)
    }

    /// [`open`](Self::open) for a replica that joins a running group (docs/replication.md
    /// §11): one that never wrote its state starts with `conf`, the group's configuration as
    /// of the change at `conf_index` that made it a learner; the changes up to there are not
    /// applied again when their entries reach it, those after are.
    pub(crate) fn open_in(
        log: Arc<Mutex<PartitionLog>>,
        storage: Arc<dyn Storage>,
        conf: ConfState,
        conf_index: u64,
    ) -> Result<LogStorage, ReplicaError> {
        let dir = log.lock().dir().to_path_buf();
        let state = match state::read(&*storage, &dir)? {
            Some(state) => state,
            None => {
                let mut state = DurableState { conf_state: conf, conf_index, ..DurableState::default() };
                let first = log.lock().first_ordinal();
                // A log that starts later than ordinal 1 without a state file has no known term
                // before it; 0 makes raft-rs treat the prefix as compacted.
                state.snapshot_index = first - 1;
                state::write(&*storage, &dir, &state)?;
                state
            }
        };
        let last = log.lock().next_ordinal() - 1;
        let commit = state.hard_state.get_commit();
        let repair_until = (commit > last).then(|| {
            tracing::warn!(dir = %dir.display(), commit, last, "the log lost committed entries (damage found at recovery): this replica neither votes nor leads until it has them again from its peers");
            commit
        });
        let commit_known = state.hard_state.get_commit();
        let applied_through = {
            let log = log.lock();
            commit_known.min(log.next_ordinal() - 1).max(log.first_ordinal() - 1)
        };
        Ok(LogStorage {
            log,
            storage,
            dir,
            state,
            tracker: None,
            repair_until,
            commit_known,
            applied_through,
            written_ms: i64::MIN,
            sync_every_ms: None,
            synced_ms: i64::MIN,
            unsynced: false,
        })
    }

    /// Where a restarted replica's entries count as applied (its log is its own state
    /// machine): the persisted commit, or the log end while repairing.
    pub(crate) fn applied(&self) -> u64 {
        let log = self.log.lock();
        self.state.hard_state.get_commit().min(log.next_ordinal() - 1).max(log.first_ordinal() - 1)
    }

    /// Whether the replica is repairing lost committed entries: it must not vote or lead
    /// ([`super::may_send`]).
    pub(crate) fn repairing(&self) -> bool {
        self.repair_until.is_some()
    }

    /// Fsyncs appends at most every `interval_ms` instead of each one (`None`: each one).
    pub(crate) fn with_sync_every(mut self, interval_ms: Option<u32>) -> Self {
        self.sync_every_ms = interval_ms.map(i64::from);
        self
    }

    /// Fsyncs what was appended since the last fsync, if the interval passed.
    pub(crate) fn sync_due(&mut self, now_ms: i64) -> Result<(), ReplicaError> {
        if let Some(every) = self.sync_every_ms {
            if self.unsynced && now_ms.saturating_sub(self.synced_ms) >= every {
                self.log.lock().sync()?;
                (self.synced_ms, self.unsynced) = (now_ms, false);
            }
        }
        Ok(())
    }

    /// Keeps `tracker` in step with the log (a served partition).
    pub(crate) fn with_tracker(mut self, tracker: Tracker) -> Self {
        self.tracker = Some(tracker);
        self
    }

    /// The offset just past Raft index `index` in the log (the high watermark for a commit at
    /// `index`); `None` if the log does not hold it.
    pub(crate) fn offset_after(&self, index: u64) -> Result<Option<u64>, ReplicaError> {
        let log = self.log.lock();
        let next = log.next_ordinal();
        if index + 1 == next {
            return Ok(Some(log.next_offset()));
        }
        if index + 1 > next {
            return Ok(None);
        }
        if index + 1 < log.first_ordinal() {
            return Ok(Some(log.log_start_offset()));
        }
        Ok(log.offset_of_ordinal(index + 1)?)
    }

    /// The partition log.
    pub(crate) fn log(&self) -> &Arc<Mutex<PartitionLog>> {
        &self.log
    }

    /// The durable hard state.
    pub(crate) fn hard_state(&self) -> &HardState {
        &self.state.hard_state
    }

    /// Persists a new term or vote before returning (with the commit known so far); a hard
    /// state that only moves the commit goes to [`set_commit`](Self::set_commit).
    pub(crate) fn set_hard_state(&mut self, hs: &HardState) -> Result<(), ReplicaError> {
        let old = &self.state.hard_state;
        if (hs.get_term(), hs.get_vote()) == (old.get_term(), old.get_vote()) {
            return self.set_commit(hs.get_commit());
        }
        self.commit_known = self.commit_known.max(hs.get_commit());
        let mut next = self.state.clone();
        next.hard_state = hs.clone();
        next.hard_state.set_commit(self.persistable_commit());
        self.replace_state(next)
    }

    /// Notes that the committed entries through `index` were handed out and applied.
    pub(crate) fn set_applied(&mut self, index: u64) {
        self.applied_through = self.applied_through.max(index);
    }

    /// Records a higher commit; [`commit_due`](Self::commit_due) writes it at most every
    /// [`COMMIT_WRITE_INTERVAL_MS`], [`flush_commit`](Self::flush_commit) at once.
    pub(crate) fn set_commit(&mut self, commit: u64) -> Result<(), ReplicaError> {
        self.commit_known = self.commit_known.max(commit);
        Ok(())
    }

    /// Whether [`sync_due`](Self::sync_due) or [`commit_due`](Self::commit_due) would write
    /// at `now_ms`.
    pub(crate) fn io_due(&self, now_ms: i64) -> bool {
        let sync = self
            .sync_every_ms
            .is_some_and(|every| self.unsynced && now_ms.saturating_sub(self.synced_ms) >= every);
        sync || now_ms.saturating_sub(self.written_ms) >= COMMIT_WRITE_INTERVAL_MS
    }

    /// Whether [`append`](Self::append)ing `entries` at `now_ms` would only copy them into the
    /// active segment and its indexes (the page cache): no fsync (the topic's durability defers
    /// it and none is due), no truncation, no new epoch, no segment roll, fewer than
    /// `IN_PLACE_BYTES` in all, and the log not busy. What the replica's driver checks before
    /// handling a `Ready` on its own task instead of a blocking thread.
    pub(crate) fn appends_in_place(&self, entries: &[Entry], now_ms: i64) -> bool {
        let Some(first) = entries.first() else { return true };
        let Some(every) = self.sync_every_ms else { return false };
        if now_ms.saturating_sub(self.synced_ms) >= every {
            return false;
        }
        let term = first.get_term();
        let bytes: usize = entries.iter().map(|e| e.data.len()).sum();
        if bytes >= IN_PLACE_BYTES || entries.iter().any(|e| e.get_term() != term) {
            return false;
        }
        let Ok(epoch) = epoch_of_term(term) else { return false };
        let Some(log) = self.log.try_lock() else { return false };
        if first.get_index() != log.next_ordinal() {
            return false;
        }
        let mut headers = Vec::with_capacity(entries.len());
        for e in entries {
            match BatchHeader::parse(&e.data) {
                Ok(h) => headers.push(h),
                Err(_) => return false, // Raft's own entries: their term's first, so a new epoch
            }
        }
        log.appends_in_active_segment(headers.iter(), epoch, now_ms)
    }

    /// Writes the newest commit if the last write is [`COMMIT_WRITE_INTERVAL_MS`] old (`now_ms`
    /// on the caller's clock: the simulator's is simulated).
    pub(crate) fn commit_due(&mut self, now_ms: i64) -> Result<(), ReplicaError> {
        if now_ms.saturating_sub(self.written_ms) >= COMMIT_WRITE_INTERVAL_MS {
            self.written_ms = now_ms;
            self.flush_commit()?;
        }
        Ok(())
    }

    /// Writes the newest commit if `raft-state` lags it (at shutdown, and periodically), after
    /// an fsync of the log it refers to.
    pub(crate) fn flush_commit(&mut self) -> Result<(), ReplicaError> {
        if self.unsynced {
            self.log.lock().sync()?;
            self.unsynced = false;
        }
        let commit = self.persistable_commit();
        if commit <= self.state.hard_state.get_commit() {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.hard_state.set_commit(commit);
        self.replace_state(next)
    }

    /// The commit to persist: never below the mark of a repair in progress (§7), never above
    /// what the log holds or what was applied.
    fn persistable_commit(&self) -> u64 {
        let last = self.log.lock().next_ordinal() - 1;
        let commit = self.commit_known.min(last).min(self.applied_through);
        match self.repair_until {
            Some(mark) => commit.max(mark),
            None => commit,
        }
    }

    /// Persists a new configuration: the one after applying the configuration change at
    /// `index`.
    ///
    /// The log is fsynced first (under `durability` interval or os it may not be yet): a
    /// configuration must never be durable while the entry that made it is not, or a power
    /// loss could leave replicas that count the change as applied beside a log where a
    /// different entry later takes its index.
    pub(crate) fn set_conf_state(&mut self, cs: ConfState, index: u64) -> Result<(), ReplicaError> {
        if self.unsynced {
            self.log.lock().sync()?;
            self.unsynced = false;
        }
        let mut next = self.state.clone();
        next.conf_state = cs;
        next.conf_index = index;
        self.replace_state(next)
    }

    /// The index of the last configuration change the persisted configuration holds: a
    /// committed change at or below it is not applied again (a restart hands out again what
    /// was committed after the persisted commit).
    pub(crate) fn conf_index(&self) -> u64 {
        self.state.conf_index
    }

    /// The persisted configuration.
    pub(crate) fn conf_state(&self) -> &ConfState {
        &self.state.conf_state
    }

    /// Writes the file first, changes memory after (STYLE.md 16).
    fn replace_state(&mut self, next: DurableState) -> Result<(), ReplicaError> {
        state::write(&*self.storage, &self.dir, &next)?;
        self.state = next;
        Ok(())
    }

    /// Appends `entries` (contiguous, from a `Ready`) to the log and fsyncs it. If they start at
    /// or below the last index, the log is first truncated there: a follower's diverged,
    /// uncommitted suffix (never at or below the persisted commit:
    /// [`ReplicaError::TruncateCommitted`]). Each entry's term is stamped into its batch as the
    /// leader epoch and its offsets are the log's next ones: a leader's fresh proposal (base
    /// offset 0, epoch 0) is stamped; a batch that already carries offsets and an epoch (a
    /// follower receiving the leader's stored bytes) must carry exactly these and is stored byte
    /// for byte, else [`ReplicaError::Diverged`]. Durable when this returns.
    pub(crate) fn append(&mut self, entries: &[Entry], now_ms: i64) -> Result<Vec<Placed>, ReplicaError> {
        let Some(first) = entries.first() else { return Ok(Vec::new()) };
        let mut log = self.log.lock();
        let next = log.next_ordinal();
        if first.get_index() < next {
            let commit = self.commit_known.max(self.state.hard_state.get_commit()).min(next - 1);
            if first.get_index() <= commit {
                return Err(ReplicaError::TruncateCommitted { index: first.get_index(), commit });
            }
            tracing::info!(dir = %self.dir.display(), from = first.get_index(), "truncating a diverged Raft suffix");
            match &self.tracker {
                None => log.truncate_to_ordinal(first.get_index())?,
                Some(t) => {
                    let offset = log.offset_of_ordinal(first.get_index())?.unwrap_or(log.next_offset());
                    // The cache first: whatever happens next, it never serves a cut batch.
                    t.tail.lock().truncate(offset);
                    log.truncate_to_ordinal(first.get_index())?;
                    *t.producers.lock() = crate::partition::recover_producers(&log)
                        .map_err(|e| ReplicaError::Tracker(e.to_string()))?;
                }
            }
        } else if first.get_index() > next {
            return Err(ReplicaError::Gap { expected: next, got: first.get_index() });
        }
        let mut placed = Vec::with_capacity(entries.len());
        for entry in entries {
            let expected = log.next_ordinal();
            if entry.get_index() != expected {
                return Err(ReplicaError::Gap { expected, got: entry.get_index() });
            }
            let epoch = epoch_of_term(entry.get_term())?;
            let batch = entry_batch(entry)?;
            let h = *batch.header();
            let stamped = if (h.base_offset, h.leader_epoch) == (log.next_offset(), epoch) {
                true
            } else if (h.base_offset, h.leader_epoch) == (0, 0) {
                false
            } else {
                return Err(ReplicaError::Diverged {
                    index: entry.get_index(),
                    offset: log.next_offset(),
                    epoch,
                    batch_offset: h.base_offset,
                    batch_epoch: h.leader_epoch,
                });
            };
            let (base_offset, last_offset) = match &self.tracker {
                Some(t) => {
                    let mut producers = t.producers.lock();
                    let a = crate::partition::append_and_track(
                        &mut producers,
                        &t.tail,
                        batch,
                        now_ms,
                        |b, roll| {
                            if stamped {
                                log.append_replicated(b, now_ms, Some(roll))
                            } else {
                                log.append_with(b, epoch, now_ms, Some(roll))
                            }
                        },
                    )
                    .map_err(|e| ReplicaError::Tracker(e.to_string()))?;
                    (a.base_offset, a.last_offset)
                }
                None => {
                    let mut batch = batch;
                    let info = if stamped {
                        log.append_replicated(&batch, now_ms, None)?
                    } else {
                        log.append(&mut batch, epoch, now_ms)?
                    };
                    (info.base_offset, info.last_offset)
                }
            };
            placed.push(Placed {
                index: entry.get_index(),
                term: entry.get_term(),
                base_offset,
                last_offset,
            });
        }
        match self.sync_every_ms {
            Some(every) if now_ms.saturating_sub(self.synced_ms) < every => self.unsynced = true,
            _ => {
                log.sync()?;
                (self.synced_ms, self.unsynced) = (now_ms, false);
            }
        }
        if self.repair_until.is_some_and(|mark| log.next_ordinal() > mark) {
            tracing::info!(dir = %self.dir.display(), "repaired: the log holds every committed entry again; voting resumes");
            self.repair_until = None;
        }
        Ok(placed)
    }

    /// The term of the entry just before the log's first one (`first_index - 1`): what
    /// `raft-state` recorded for it (a snapshot installed there, or a fresh log), else the
    /// epoch record's epoch of the batch before the log start (which retention keeps).
    fn term_before(&self, log: &PartitionLog) -> Option<u64> {
        let before = log.first_ordinal() - 1;
        let recorded = (before == self.state.snapshot_index).then_some(self.state.snapshot_term);
        match recorded {
            // Term 0 is what `open` records for a log it found already trimmed, not knowing better.
            Some(term) if term > 0 => Some(term),
            _ => log.epoch_before_start().and_then(|e| u64::try_from(e).ok()).or(recorded),
        }
    }

    /// Installs a Raft snapshot from the leader (docs/replication.md §2a): the whole log is
    /// replaced by an empty one that continues at the snapshot's index + 1 and the leader's
    /// log start offset (crash-safe: `PartitionLog::reset`), the producer state and tail
    /// cache follow it, then `raft-state` records the snapshot's index and term (what
    /// `term(first_index - 1)` answers), the commit (the snapshot's index) and its
    /// configuration. A crash between the two leaves the new log with the old `raft-state`,
    /// whose commit is below the snapshot: `term` then answers from the log's epoch record.
    pub(crate) fn apply_snapshot(&mut self, snap: &Snapshot, now_ms: i64) -> Result<(), ReplicaError> {
        let meta = snap.get_metadata();
        let (index, term) = (meta.get_index(), meta.get_term());
        let data =
            SnapshotData::decode(snap.get_data()).map_err(|e| ReplicaError::Snapshot(e.to_string()))?;
        if data.index != index {
            return Err(ReplicaError::Snapshot(format!(
                "data says index {}, the metadata {index}",
                data.index
            )));
        }
        let epoch = epoch_of_term(term)?;
        let commit = self.state.hard_state.get_commit();
        if index < commit {
            return Err(ReplicaError::TruncateCommitted { index, commit });
        }
        {
            let mut log = self.log.lock();
            match &self.tracker {
                None => log.reset(data.log_start_offset, index + 1, epoch)?,
                Some(t) => {
                    // The cache first: whatever happens next, it never serves a dropped batch.
                    t.tail.lock().truncate(0);
                    log.reset(data.log_start_offset, index + 1, epoch)?;
                    t.log_start.store(log.log_start_offset(), std::sync::atomic::Ordering::Release);
                    *t.producers.lock() = crate::partition::recover_producers(&log)
                        .map_err(|e| ReplicaError::Tracker(e.to_string()))?;
                }
            }
        }
        let mut next = self.state.clone();
        (next.snapshot_index, next.snapshot_term) = (index, term);
        next.hard_state.set_commit(index);
        next.conf_state = meta.get_conf_state().clone();
        next.conf_index = data.conf_index;
        self.replace_state(next)?;
        self.commit_known = self.commit_known.max(index);
        self.applied_through = self.applied_through.max(index);
        (self.synced_ms, self.unsynced) = (now_ms, false);
        if self.repair_until.is_some_and(|mark| index >= mark) {
            tracing::info!(dir = %self.dir.display(), "repaired by a snapshot; voting resumes");
            self.repair_until = None;
        }
        tracing::info!(dir = %self.dir.display(), index, term, log_start_offset = data.log_start_offset, "installed a snapshot from the leader: the log continues at its log start");
        Ok(())
    }

    /// Entries `[low, high)`, at least one if any, then up to `max_size` bytes of data.
    fn read_entries(&self, low: u64, high: u64, max_size: u64) -> Result<Vec<Entry>, raft::Error> {
        let log = self.log.lock();
        let (first, next) = (log.first_ordinal(), log.next_ordinal());
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > next || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::new();
        let Some(mut offset) = log.offset_of_ordinal(low).map_err(store_error)? else {
            return Err(raft::Error::Store(StorageError::Unavailable));
        };
        let (mut index, mut size) = (low, 0u64);
        while index < high {
            let budget = usize::try_from(max_size.saturating_sub(size)).unwrap_or(usize::MAX);
            // The plan's read is done under the lock: a first slice (the partition's reads
            // already run plans outside it; the replica's will when it has its own task).
            let bytes = log.read_plan(offset, budget).and_then(|p| p.execute()).map_err(store_error)?;
            if bytes.is_empty() {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
            for item in BatchSplitter::new(bytes) {
                let (header, batch) = item.map_err(|e| store_error(e.to_string()))?;
                if header.base_offset != offset {
                    return Err(store_error(format!(
                        "batch at {} where {offset} was expected",
                        header.base_offset
                    )));
                }
                let entry = batch_entry(&header, batch, index).map_err(store_error)?;
                let len = entry.get_data().len() as u64;
                if !out.is_empty() && size.saturating_add(len) > max_size {
                    return Ok(out);
                }
                size = size.saturating_add(len);
                out.push(entry);
                (index, offset) = (index + 1, header.next_offset());
                if index == high {
                    break;
                }
            }
        }
        Ok(out)
    }
}

impl raft::Storage for LogStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let mut hs = self.state.hard_state.clone();
        let log = self.log.lock();
        if self.repair_until.is_some() {
            // raft-rs refuses a commit past the log; the entries come back from the leader.
            hs.set_commit(hs.get_commit().min(log.next_ordinal() - 1));
        }
        // Nor below the log start: what precedes it was committed (a snapshot covers committed
        // entries only), though a crash right after installing one may have kept an older
        // `raft-state`.
        hs.set_commit(hs.get_commit().max(log.first_ordinal() - 1));
        drop(log);
        Ok(RaftState::new(hs, self.state.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.read_entries(low, high, max_size.into().unwrap_or(raft::NO_LIMIT))
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let log = self.log.lock();
        let first = log.first_ordinal();
        if idx.checked_add(1) == Some(first) {
            return self.term_before(&log).ok_or(raft::Error::Store(StorageError::Compacted));
        }
        if idx < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx >= log.next_ordinal() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = log.offset_of_ordinal(idx).map_err(store_error)?;
        match offset.and_then(|o| log.epoch_at(o)).map(u64::try_from) {
            Some(Ok(term)) => Ok(term),
            _ => Err(store_error(format!("no leader epoch for Raft index {idx}"))),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.log.lock().first_ordinal())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.log.lock().next_ordinal() - 1)
    }

    /// The snapshot of the current log start (docs/replication.md §2a): index `first - 1`, its
    /// term, the configuration, and the log start offset as data; no log data. raft-rs asks
    /// for it when a follower needs entries before the log start (retention deleted them).
    /// `SnapshotTemporarilyUnavailable` (raft-rs tries again later) while there is nothing
    /// before the log, while the position is not committed yet (a snapshot commits what it
    /// covers on the follower), or when the term before the log start is unknown.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        let log = self.log.lock();
        let index = log.first_ordinal() - 1;
        let commit = self.commit_known.max(self.state.hard_state.get_commit());
        if index == 0 || index < request_index || index > commit {
            return unavailable;
        }
        let Some(term) = self.term_before(&log) else {
            tracing::warn!(dir = %self.dir.display(), index, to, "no snapshot for a lagging follower: the term before the log start is unknown");
            return unavailable;
        };
        let data = SnapshotData {
            log_start_offset: log.log_start_offset(),
            index,
            conf_index: self.state.conf_index,
        };
        drop(log);
        let mut snap = Snapshot::default();
        snap.set_data(Bytes::copy_from_slice(&data.encode()));
        let meta = snap.mut_metadata();
        meta.set_index(index);
        meta.set_term(term);
        meta.set_conf_state(self.state.conf_state.clone());
        tracing::info!(dir = %self.dir.display(), index, term, log_start_offset = data.log_start_offset, to, "sending a snapshot to a follower behind the log start");
        Ok(snap)
    }
}

/// A read failure as raft-rs sees it. raft-rs panics on anything but `Compacted` and
/// `Unavailable` from `entries`/`term`; the group's driver runs under `catch_unwind` and fences
/// the partition (docs/replication.md §1), so the cause is logged here first.
fn store_error(err: impl ToString) -> raft::Error {
    let reason = err.to_string();
    tracing::error!(%reason, "the Raft log could not be read");
    raft::Error::Store(StorageError::Other(reason.into()))
}

/// The leader epoch a term is stamped as: terms past [`MAX_RAFT_TERM`] cannot be stored.
fn epoch_of_term(term: u64) -> Result<i32, ReplicaError> {
    match i32::try_from(term) {
        Ok(epoch) if (1..=MAX_RAFT_TERM).contains(&term) => Ok(epoch),
        _ => Err(ReplicaError::TermOutOfRange(term)),
    }
}

/// The batch an entry is stored as (not yet stamped, unless it carries a stored batch).
pub(crate) fn entry_batch(entry: &Entry) -> Result<ValidatedBatch, ReplicaError> {
    let control = |kind: i16, value: &[u8]| {
        let mut key = [0u8; 4];
        key[..2].copy_from_slice(&CONTROL_KEY_VERSION.to_be_bytes());
        key[2..].copy_from_slice(&kind.to_be_bytes());
        // Timestamp -1 (Kafka's "none"): every replica builds the same bytes.
        let mut b = BatchBuilder::new(64 + value.len()).control();
        b.push(-1, Some(&key), value, &[]);
        ValidatedBatch::new(b.finish())
    };
    let batch = match (entry.get_entry_type(), entry.get_data().is_empty()) {
        (EntryType::EntryNormal, true) => control(CONTROL_LEADER_CHANGE, &[])?,
        (EntryType::EntryConfChangeV2, _) => control(CONTROL_CONF_CHANGE, entry.get_data())?,
        (EntryType::EntryConfChange, _) => return Err(ReplicaError::UnsupportedEntry("ConfChange (v1)")),
        (EntryType::EntryNormal, false) => {
            let batch = ValidatedBatch::new(entry.data.clone())?;
            if batch.header().is_control() {
                return Err(ReplicaError::UnsupportedEntry("a control batch as entry data"));
            }
            batch
        }
    };
    Ok(batch)
}

/// The entry a stored batch is, at Raft index `index`.
pub(crate) fn batch_entry(header: &BatchHeader, batch: Bytes, index: u64) -> Result<Entry, String> {
    let term = u64::try_from(header.leader_epoch).map_err(|_| format!("negative epoch at index {index}"))?;
    let mut entry = Entry::default();
    entry.set_index(index);
    entry.set_term(term);
    if !header.is_control() {
        entry.set_data(batch);
        return Ok(entry);
    }
    let record = match RecordIter::new(batch, *header).next() {
        Some(Ok(record)) if header.records_count == 1 => record,
        _ => return Err(format!("control batch at index {index} is not one record")),
    };
    let key = record.key.as_deref().unwrap_or_default();
    let kind = match key {
        [v0, v1, t0, t1] if i16::from_be_bytes([*v0, *v1]) == CONTROL_KEY_VERSION => {
            i16::from_be_bytes([*t0, *t1])
        }
        _ => return Err(format!("control record key {key:?} at index {index}")),
    };
    match kind {
        CONTROL_LEADER_CHANGE => entry.set_entry_type(EntryType::EntryNormal),
        CONTROL_CONF_CHANGE => {
            entry.set_entry_type(EntryType::EntryConfChangeV2);
            entry.set_data(record.value);
        }
        other => return Err(format!("control record type {other} at index {index}")),
    }
    Ok(entry)
}
