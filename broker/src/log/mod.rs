//! The on-disk log of one partition (docs/design.md §5–§7).
//!
//! A partition is a directory of segments: `<base:020>.log` holds record batches back to back,
//! `<base>.index` and `<base>.timeindex` are sparse indexes into it. Only the last segment (the
//! active one) is appended to. The code here is synchronous and does no locking: the owner wraps
//! a [`PartitionLog`] in a mutex, and the two slow operations are split so they can run
//! outside it:
//!
//! * durability: [`PartitionLog::sync_handle`] under the lock, [`SyncHandle::sync`] outside
//!   it. A group-commit writer locks, appends every queued batch, takes the handle, unlocks,
//!   syncs once, and then acknowledges everything below [`SyncHandle::durable_offset`].
//! * reads: [`PartitionLog::read_plan`] under the lock locates whole batches, and
//!   [`ReadPlan::execute`] reads them outside it. The bytes a plan names below the commit
//!   offset never change (the log appends; recovery truncates only before the log is shared;
//!   [`PartitionLog::truncate_to`] cuts only above the commit offset, so
//!   [`ReadPlan::execute_below`] the commit serves unchanged batches, or fails with an IO
//!   error if the file was cut shorter than its span: read again), and a plan holds its file
//!   open, so retention deleting the segment meanwhile does not break it.

mod checkpoint;
mod epochs;
#[cfg(test)]
mod fault_tests;
mod file_cache;
mod index;
#[cfg(test)]
mod index_fuzz_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod ordinal_tests;
mod recovery;
#[cfg(test)]
mod recovery_fuzz_tests;
#[cfg(test)]
mod replication_tests;
mod reset;
#[cfg(test)]
mod reset_tests;
mod segment;
#[cfg(test)]
mod side_file_fuzz_tests;
#[cfg(test)]
mod tests;
mod verify;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use quiver_protocol::batch::{self, BatchError, BatchHeader, Batches, ValidatedBatch, WalkError};
use quiver_protocol::limits::MAX_READ_BYTES;

use crate::storage::{Storage, StorageFile};
use segment::{BatchAt, Segment};

pub use checkpoint::{RecoveryCheckpoint, RecoveryPoint};
pub use epochs::{EpochEntry, MAX_EPOCH_ENTRIES};
pub use file_cache::ClosedSegmentFiles;
pub use recovery::{Damage, RecoveryReport, Truncation};
pub use segment::TailDefect;
pub use verify::VerifyTarget;

/// The Raft hard state of the partition's replica (broker/src/replica/state.rs), in the
/// partition directory; recovery leaves it and its temp file alone.
pub const RAFT_STATE_FILE: &str = "raft-state";
/// Its temp file while it is replaced (the writer removes a leftover one first).
pub const RAFT_STATE_TEMP_FILE: &str = "raft-state.tmp";

/// Largest `segment_bytes` (one limit for topics and the log).
pub use quiver_protocol::limits::MAX_SEGMENT_BYTES;

/// Per-partition settings (the storage part of `TopicConfig`).
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Roll to a new segment before the active one would grow past this (1..=MAX_SEGMENT_BYTES).
    /// A batch larger than this still gets a segment of its own.
    pub segment_bytes: u64,
    /// Roll when the active segment's first append is this old.
    pub segment_ms: u64,
    /// Delete old segments while the rest of the partition still holds this many bytes.
    pub retention_bytes: Option<u64>,
    /// Delete old segments whose newest timestamp is older than this.
    pub retention_ms: Option<u64>,
    /// Bytes appended between two index entries.
    pub index_interval_bytes: u32,
    /// The bound on closed segments' log files open at once; the broker shares one among all
    /// partitions. By default each log has its own of [`OPEN_CLOSED_SEGMENTS`].
    pub closed_files: Arc<ClosedSegmentFiles>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: None,
            retention_ms: None,
            index_interval_bytes: 4096,
            closed_files: ClosedSegmentFiles::new(OPEN_CLOSED_SEGMENTS),
        }
    }
}

impl LogConfig {
    /// Checks the settings that could otherwise break the log's invariants.
    pub fn validate(&self) -> Result<(), LogError> {
        if self.segment_bytes == 0 || self.segment_bytes > MAX_SEGMENT_BYTES {
            return Err(LogError::InvalidConfig(format!(
                "segment_bytes {} is outside 1..={MAX_SEGMENT_BYTES}",
                self.segment_bytes
            )));
        }
        if self.segment_ms == 0 {
            return Err(LogError::InvalidConfig("segment_ms must be at least 1".into()));
        }
        Ok(())
    }
}

/// Errors of the partition log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A storage operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A read below the log start or past the next offset.
    #[error("offset {requested} is out of range: earliest={log_start} latest={next}")]
    OffsetOutOfRange {
        /// The offset asked for.
        requested: u64,
        /// The first offset still in the log.
        log_start: u64,
        /// The offset the next append gets.
        next: u64,
    },
    /// The bytes given to `append` are not exactly one batch.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// A segment's bytes contradict what the log knows about them (outside the torn tail that
    /// recovery repairs).
    #[error("corrupt segment {} at byte {position}: {reason}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where the problem was found.
        position: u64,
        /// What was wrong.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid log config: {0}")]
    InvalidConfig(String),
    /// An earlier write or fsync failed. After a failed fsync the kernel may have dropped the
    /// dirty pages, so a later fsync proves nothing: the partition must be reopened, which
    /// recovers from what is really on disk.
    #[error("an earlier write or sync of this partition failed; it must be reopened")]
    Poisoned,
    /// A leader epoch below the latest one: epochs never decrease.
    #[error("leader epoch {requested} is below the latest epoch {latest}")]
    EpochRegressed {
        /// The log's latest epoch.
        latest: i32,
        /// The epoch asked for.
        requested: i32,
    },
    /// The epoch record is full (see [`MAX_EPOCH_ENTRIES`]).
    #[error("more than {MAX_EPOCH_ENTRIES} leader epochs in one partition")]
    TooManyEpochs,
    /// A replicated batch does not start at the log end.
    #[error("replicated batch starts at offset {got}, the log ends at {expected}")]
    NotAtLogEnd {
        /// The log end offset.
        expected: u64,
        /// The batch's base offset.
        got: u64,
    },
    /// A truncation offset that is not the first offset of a batch.
    #[error("offset {offset} is inside the batch starting at {batch_base}, not at a batch boundary")]
    NotBatchBoundary {
        /// The offset asked for.
        offset: u64,
        /// The base offset of the batch holding it.
        batch_base: u64,
    },
    /// The log was truncated after this sync handle was taken: what it covered is gone, so its
    /// sync proves nothing about its `durable_offset`.
    #[error("the log was truncated after this sync was requested")]
    TruncatedSince,
    /// A [`PartitionLog::reset`] to a position no log can start at.
    #[error(
        "a log cannot start at offset {base_offset}, ordinal {base_ordinal}, after epoch {epoch_before}"
    )]
    InvalidReset { base_offset: u64, base_ordinal: u64, epoch_before: i32 },
    /// A batch ordinal outside `first_ordinal..=next_ordinal`.
    #[error("ordinal {requested} is out of range: first={first} next={next}")]
    OrdinalOutOfRange {
        /// The ordinal asked for.
        requested: u64,
        /// The ordinal of the first retained batch.
        first: u64,
        /// The ordinal the next append gets.
        next: u64,
    },
}

impl LogError {
    /// `map_err` adapter that adds the operation and path to an IO error.
    pub(crate) fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
        move |source| LogError::Io { op, path: path.to_path_buf(), source }
    }
}

/// Where an append went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of its last record.
    pub last_offset: u64,
    /// Whether a new segment was started for it; the caller may then apply retention.
    pub rolled: bool,
}

/// What deleting old segments did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Base offsets of the deleted segments, oldest first.
    pub deleted_bases: Vec<u64>,
    /// Bytes of log they held.
    pub bytes_deleted: u64,
    /// The log start offset afterwards.
    pub log_start_offset: u64,
}

impl RetentionReport {
    /// Number of segments deleted.
    pub fn deleted_segments(&self) -> usize {
        self.deleted_bases.len()
    }
}

/// A file written at every roll, durably and before the new segment exists, as
/// `<new base>.<ext>` (the partition's idempotent-producer snapshot as of the new segment's
/// first batch).
pub struct RollFile<'a> {
    /// The file's extension.
    pub ext: &'a str,
    /// Its contents, asked for only when the log rolls.
    pub contents: &'a dyn Fn() -> Vec<u8>,
}

/// Replaces the file at `path` with `bytes`: writes `<path>.tmp`, fsyncs it and renames it over
/// `path`. The caller fsyncs the directory to make the new name durable.
pub(crate) fn replace_file(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A fresh file: one left by an earlier failed attempt may hold pages a failed fsync dropped.
    match storage.remove(&tmp) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(LogError::io("remove temp file", &tmp)(err)),
    }
    let f = storage.open(&tmp).map_err(LogError::io("create temp file", &tmp))?;
    f.append(bytes).map_err(LogError::io("write temp file", &tmp))?;
    f.sync().map_err(LogError::io("sync temp file", &tmp))?;
    storage.rename(&tmp, path).map_err(LogError::io("rename temp file", path))
}

/// Makes everything appended before it was taken durable, without the log's lock.
#[derive(Debug, Clone)]
pub struct SyncHandle {
    /// `None` when the log is poisoned: syncing then must not report success.
    file: Option<Arc<dyn StorageFile>>,
    durable_offset: u64,
    /// The log's truncation count when the handle was taken.
    generation: u64,
    /// What a successful sync covers, recorded as the partition's recovery point.
    point: RecoveryPoint,
    recovery: RecoveryCheckpoint,
    /// The log's sync lock and failure flag: syncs of the log never overlap, and one that failed
    /// fails every later one. Linux reports a writeback error to one `fsync` only, so a sync
    /// racing with the failed one (a roll sealing the segment) could otherwise succeed over
    /// pages the kernel dropped.
    failed: SyncState,
}

/// Serialises a log's syncs, and records a failed one (read without the lock by appends).
#[derive(Debug, Default)]
struct SyncGate {
    lock: parking_lot::Mutex<()>,
    failed: std::sync::atomic::AtomicBool,
    /// Truncations so far (changed under `lock`): a handle from before one must not record
    /// its recovery point, which may be past the cut.
    generation: std::sync::atomic::AtomicU64,
}

type SyncState = Arc<SyncGate>;

impl SyncGate {
    fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn fail(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Before files are cut (a truncation, a reset): holds syncs off for as long as the
    /// returned guard lives and moves the generation on, so a sync handle taken before cannot
    /// record a recovery point past the cut. `None` if a sync failed: the log must be poisoned.
    fn fence(&self) -> Option<parking_lot::MutexGuard<'_, ()>> {
        let serial = self.lock.lock();
        if self.failed() {
            return None;
        }
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Some(serial)
    }
}

impl SyncHandle {
    /// `fdatasync`s the active segment. Earlier segments were synced when they were rolled.
    /// If this fails, the caller must not acknowledge anything and should call
    /// [`PartitionLog::mark_failed`].
    pub fn sync(&self) -> io::Result<()> {
        let _serial = self.failed.lock.lock();
        if self.failed.failed() {
            return Err(io::Error::other(LogError::Poisoned));
        }
        if self.failed.generation() != self.generation {
            // Not a storage failure: the log stays usable, this handle's offsets are gone.
            return Err(io::Error::other(LogError::TruncatedSince));
        }
        let result = match &self.file {
            Some(file) => file.sync(),
            None => Err(io::Error::other(LogError::Poisoned)),
        };
        match &result {
            Ok(()) => self.recovery.record(self.point),
            Err(_) => self.failed.fail(),
        }
        result
    }

    /// Every offset below this is durable once [`sync`](SyncHandle::sync) returned `Ok`.
    pub fn durable_offset(&self) -> u64 {
        self.durable_offset
    }
}

/// A span of a segment that starts at a batch, located under the log's lock and read with
/// [`execute`](ReadPlan::execute) without it.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    file: Option<Arc<dyn StorageFile>>,
    /// The segment file, for errors.
    path: Arc<Path>,
    position: u64,
    len: usize,
    first_offset: u64,
    /// The log's epoch record when the plan was made: every batch's leader epoch (outside
    /// its CRC) is checked against it before the batch is served. Shared, not copied.
    epochs: Option<Arc<epochs::Epochs>>,
    /// Where a damaged first batch is noted for repair (the log's `damage_found`).
    damage_found: Option<Arc<parking_lot::Mutex<std::collections::BTreeSet<u64>>>>,
}

impl ReadPlan {
    /// Reads the span in one read and returns the whole batches in it (at least one), or
    /// nothing for an empty plan. Batch ends are found in the bytes read, not by reading each
    /// header from the file first: with `direct_writes` every file read is a device round trip.
    /// Every batch's CRC, and its leader epoch against the epoch record, is checked before it
    /// is handed out: bytes that do not match are never served.
    pub fn execute(&self) -> Result<Bytes, LogError> {
        self.execute_below(u64::MAX)
    }

    /// As [`execute`](ReadPlan::execute), keeping only the batches that start below offset
    /// `limit` (a high watermark, which lags the log's end while an fsync runs). A damaged batch
    /// ends the span before it; if it is the first, the read fails with [`LogError::Corrupt`],
    /// logged and counted in `quiver_corrupt_batches_total`.
    pub fn execute_below(&self, limit: u64) -> Result<Bytes, LogError> {
        let Some(file) = &self.file else { return Ok(Bytes::new()) };
        // `len` is at most MAX_READ_BYTES or one batch, which the header parse bounded.
        let bytes = file.read_bytes(self.position, self.len).map_err(LogError::io("read", &self.path))?;
        let mut end = 0;
        for span in Batches::new(&bytes) {
            let (header, batch) = match span {
                Ok(span) => (span.header, span.bytes),
                Err(WalkError::Truncated { .. }) => break, // the span ends inside this batch
                Err(_) if end > 0 => break,                // served up to it; the next read reports it
                Err(WalkError::Invalid { error, .. }) => return Err(self.damaged(end, error.to_string())),
            };
            if header.base_offset >= limit {
                break;
            }
            // The epoch sits outside the CRC (the broker stamps it), so a flip there is found
            // only against the record (design.md §5.7): such a batch is damaged like one whose
            // CRC fails.
            let expected = self.epochs.as_ref().and_then(|e| e.epoch_at(header.base_offset));
            if let Some(expected) = expected.filter(|&e| e != header.leader_epoch) {
                if end > 0 {
                    break;
                }
                let (first, next, found) = (header.base_offset, header.next_offset(), header.leader_epoch);
                let reason = format!(
                    "batch leader epoch {found}, the epoch record says {expected} (batch header says offsets {first}..{next})"
                );
                return Err(self.damaged(end, reason));
            }
            match batch::verify_crc(batch, &header) {
                Ok(()) => end += batch.len(),
                Err(_) if end > 0 => break,
                Err(e) => {
                    // The header's offsets may be damaged too: a hint, not a promise.
                    let (first, next) = (header.base_offset, header.next_offset());
                    let reason = format!("{e} (batch header says offsets {first}..{next})");
                    return Err(self.damaged(end, reason));
                }
            }
        }
        if end == 0 && self.first_offset < limit {
            // The plan covers its first batch whole, so the file changed under it.
            return Err(self.damaged(0, "no whole batch".to_string()));
        }
        Ok(bytes.slice(..end))
    }

    /// A [`LogError::Corrupt`] for the batch at `at` bytes into the span, logged and counted.
    fn damaged(&self, at: usize, reason: String) -> LogError {
        let position = self.position + at as u64;
        if let (0, Some(notes)) = (at, &self.damage_found) {
            // The plan's first batch (reads stop before a damaged batch after the first).
            let mut notes = notes.lock();
            if notes.len() < DAMAGE_NOTES {
                notes.insert(self.first_offset);
            }
        }
        metrics::counter!("quiver_corrupt_batches_total", "found_by" => "read").increment(1);
        tracing::error!(segment = %self.path.display(), position, %reason, "refusing to serve a damaged batch");
        LogError::Corrupt { path: self.path.to_path_buf(), position, reason }
    }

    /// Bytes the plan reads: whole batches and possibly the start of one more (at most the
    /// `max_bytes` asked for, or the whole first batch when it is larger).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is nothing to read (the offset asked for is the next offset).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base offset of the first batch; at most the offset asked for.
    pub fn first_offset(&self) -> u64 {
        self.first_offset
    }

    /// The segment file and the byte position the span starts at (the simulator asks whether
    /// a batch is durable there).
    #[cfg(test)]
    pub(crate) fn location(&self) -> (&Path, u64) {
        (&self.path, self.position)
    }
}

/// The log of one partition. Not synchronised: the owner holds it in a mutex.
#[derive(Debug)]
pub struct PartitionLog {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    config: LogConfig,
    /// Closed segments, oldest first; contiguous, each ends where the next begins.
    closed: Vec<Segment>,
    /// The segment appends go to; starts at the end of the last closed one.
    active: Segment,
    /// Sum of all segment sizes.
    size_bytes: u64,
    /// Which leader epoch wrote which offsets; durable in `leader-epochs` (design.md §5.7).
    /// Shared with read plans, which check batches against it; replaced whole when it changes.
    epochs: Arc<epochs::Epochs>,
    /// Set when a write or fsync failed; see [`LogError::Poisoned`].
    poisoned: bool,
    /// Shared with every [`SyncHandle`]: serialises syncs, and records a failed one.
    sync_failed: SyncState,
    /// How far completed fsyncs cover the active segment, and its checkpoint file.
    recovery: RecoveryCheckpoint,
    /// Base offsets of batches reads found damaged (shared with read plans, which run outside
    /// the log's lock), for a cluster to repair from another replica ([`repair_batch`]).
    /// Bounded: beyond [`DAMAGE_NOTES`] new finds are dropped (recovery's spans stay known).
    ///
    /// [`repair_batch`]: PartitionLog::repair_batch
    damage_found: Arc<parking_lot::Mutex<std::collections::BTreeSet<u64>>>,
    /// Damaged batches a replica's copy did not fit (not one batch of known extent here):
    /// left as they are, not fetched again until the broker restarts. Bounded like the notes.
    unrepairable: std::collections::BTreeSet<u64>,
}

/// Damaged batches a log remembers for repair beyond the spans recovery recorded.
const DAMAGE_NOTES: usize = 256;

/// Closed segments whose log file may be open at once for a log with a bound of its own
/// (their index files are never open: lookups use the entries in memory). Such a partition
/// holds at most 3 (the active segment's files) + this many descriptors, plus files that
/// in-flight reads still hold. A broker shares one bound among all partitions instead.
pub const OPEN_CLOSED_SEGMENTS: usize = 2;

impl PartitionLog {
    /// Opens the partition in `dir` (creating it if missing) and recovers it (design.md §5.3).
    /// `now_ms` starts the age of a non-empty active segment.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        config: LogConfig,
        now_ms: i64,
    ) -> Result<(PartitionLog, RecoveryReport), LogError> {
        Self::open_observed(storage, dir, config, now_ms, &mut |_, _| {})
    }

    /// As [`open`](Self::open), calling `observer(segment base, header)` for every batch of the
    /// active segment that recovery keeps, in order, as its CRC scan reads them: what the
    /// partition replays into its producer state without reading the segment again.
    pub fn open_observed(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        config: LogConfig,
        now_ms: i64,
        observer: &mut dyn FnMut(u64, &BatchHeader),
    ) -> Result<(PartitionLog, RecoveryReport), LogError> {
        config.validate()?;
        reset::complete_interrupted(&storage, &dir)?;
        // The epoch record is read first: recovery checks every batch it walks against it.
        let names = storage.list(&dir).unwrap_or_default();
        let loaded = epochs::read(&*storage, &dir, &names).map(|e| e.map(Arc::new));
        let check = loaded.as_ref().ok().cloned().flatten();
        let recovered = recovery::recover(&storage, &dir, &config, now_ms, check, observer)?;
        let size_bytes = recovered.closed.iter().map(|s| s.size).sum::<u64>() + recovered.active.size;
        let recovery =
            RecoveryCheckpoint::new(storage.clone(), dir.clone(), recovered.synced, recovered.written);
        let mut log = PartitionLog {
            recovery,
            storage,
            dir,
            config,
            closed: recovered.closed,
            active: recovered.active,
            size_bytes,
            epochs: Default::default(),
            poisoned: false,
            sync_failed: Default::default(),
            damage_found: Default::default(),
            unrepairable: Default::default(),
        };
        log.load_epochs(loaded, &recovered.names)?;
        log.check_invariants(true);
        Ok((log, recovered.report))
    }

    /// Reconciles the epoch record read before recovery (`loaded`) with the recovered log
    /// (design.md §5.7): entries from the log end on are dropped (epochs that began and kept
    /// no batch, or a truncation the crash interrupted before the record was rewritten), the
    /// first entry is moved up to the log start, and the epoch of the last batch must be the
    /// record's epoch for it. A missing, damaged or contradicted record is rebuilt from the
    /// batches' headers.
    fn load_epochs(
        &mut self,
        loaded: Result<Option<Arc<epochs::Epochs>>, String>,
        names: &[String],
    ) -> Result<(), LogError> {
        let (start, end) = (self.log_start_offset(), self.next_offset());
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(why) => {
                metrics::counter!("quiver_corrupt_batches_total", "found_by" => "leader_epochs").increment(1);
                tracing::error!(dir = %self.dir.display(), %why, "the leader-epoch record is damaged; rebuilding it from the batches");
                None
            }
        };
        // Moving the first entry up is not written back: the next open derives the same, and a
        // partition that is only opened (10,000 idle ones at start) writes nothing. Entries
        // dropped from the end are (rare: a crash between an epoch's begin and its first
        // durable batch): a batch appended later at the same offset in an epoch the record in
        // memory already holds writes no record, and the next open would find it contradicting
        // the stale entry on disk and take it for a damaged epoch.
        let mut write_back = false;
        let trusted = match loaded {
            Some(e) => {
                let mut e = Arc::unwrap_or_clone(e);
                write_back = e.truncate_from_end(end);
                e.truncate_from_start(start);
                // Recovery checked every batch it walked against this record, and reads check
                // the rest, so a damaged last batch (kept as damage) does not discredit it.
                let last = match end > start {
                    true => self.last_batch_epoch(),
                    false => Ok(None),
                };
                match (end > start, last) {
                    (false, _) => Some(e),
                    (true, Ok(last))
                        if last.is_none_or(|l| e.epoch_at(end - 1) == Some(l))
                            && e.epoch_at(start).is_some() =>
                    {
                        Some(e)
                    }
                    (_, last) => {
                        tracing::warn!(dir = %self.dir.display(), last_batch_epoch = ?last.ok(), record = ?e.entries(), "the leader-epoch record does not match the log's last batch; rebuilding it");
                        None
                    }
                }
            }
            None if end > start => {
                if !names.iter().any(|n| n == epochs::FILE) {
                    tracing::info!(dir = %self.dir.display(), "no leader-epoch record; building it from the batches");
                }
                None
            }
            None => Some(Default::default()),
        };
        self.epochs = Arc::new(match trusted {
            Some(e) => {
                if write_back {
                    epochs::write(&*self.storage, &self.dir, &e)?;
                }
                e
            }
            None => {
                let rebuilt = self.rebuild_epochs()?;
                epochs::write(&*self.storage, &self.dir, &rebuilt)?;
                rebuilt
            }
        });
        Ok(())
    }

    /// The epoch stamped in the last batch of the log, if it has one that can be read.
    fn last_batch_epoch(&self) -> Result<Option<i32>, LogError> {
        let Some(seg) = std::iter::once(&self.active).chain(self.closed.iter().rev()).find(|s| s.size > 0)
        else {
            return Ok(None);
        };
        if seg.next_offset == seg.base || seg.damage_at(seg.next_offset - 1).is_some() {
            return Ok(None);
        }
        self.open_log(seg)?;
        let (_, header) = seg.find_batch(seg.next_offset - 1)?;
        Ok(Some(header.leader_epoch))
    }

    /// The epoch record as the batches' headers say: a segment whose first and last batch carry
    /// the epoch already current is skipped (epochs never decrease along the log), any other is
    /// walked header by header. Damaged spans are stepped over.
    fn rebuild_epochs(&self) -> Result<epochs::Epochs, LogError> {
        let mut entries: Vec<EpochEntry> = Vec::new();
        let note = |epoch: i32, offset: u64, entries: &mut Vec<EpochEntry>| {
            if epoch < 0 || entries.last().is_some_and(|e| epoch <= e.epoch) {
                if entries.last().is_some_and(|e| epoch < e.epoch) {
                    tracing::warn!(offset, epoch, "a batch's leader epoch is below an earlier one; ignored");
                }
                return;
            }
            entries.push(EpochEntry { epoch, start: offset });
        };
        for seg in self.segments() {
            if seg.size == 0 {
                continue;
            }
            self.open_log(seg)?;
            let current = entries.last().map(|e| e.epoch);
            let ends = seg.read_header(0).and_then(|first| {
                let (_, last) = seg.find_batch(seg.next_offset.saturating_sub(1))?;
                Ok((first.leader_epoch, last.leader_epoch))
            });
            if let Ok((first, last)) = ends {
                if first == last && Some(first) == current && seg.damaged.is_empty() {
                    continue;
                }
            }
            let walker = seg.walker(segment::Check::Headers)?;
            recovery::scan(&walker, seg.base, seg.size, |at, _| {
                note(at.header.leader_epoch, at.header.base_offset, &mut entries);
                true
            })?;
        }
        if entries.len() > MAX_EPOCH_ENTRIES {
            return Err(LogError::TooManyEpochs);
        }
        // The first epoch covers the log from its start.
        if let Some(first) = entries.first_mut() {
            first.start = self.log_start_offset();
        }
        epochs::Epochs::from_entries(entries).map_err(|why| LogError::Corrupt {
            path: self.dir.clone(),
            position: 0,
            reason: format!("leader epochs: {why}"),
        })
    }

    /// The leader epoch of the batch just before the log start, which retention or a
    /// [`reset`](Self::reset) removed: Raft's term of the entry before its first one
    /// (docs/replication.md §2a). `None` for a log that starts at offset 0, or when it is not
    /// known (an epoch record rebuilt from the batches cannot know it).
    pub fn epoch_before_start(&self) -> Option<i32> {
        self.epochs.epoch_before(self.log_start_offset())
    }

    /// Replaces the whole log with an empty one whose first batch will get offset
    /// `base_offset` and ordinal `base_ordinal`, the batch before it having been written in
    /// `epoch_before` (a replica installing a Raft snapshot: docs/replication.md §2a).
    /// Durable when this returns. A crash at any point leaves, once the partition is reopened,
    /// either the old log or the new empty one, never a mix: a marker file is written before
    /// anything is removed, and opening a partition that holds one completes the reset first
    /// (the protocol is in log/reset.rs). A failure after the marker poisons the log (reopen
    /// to complete it).
    pub fn reset(&mut self, base_offset: u64, base_ordinal: u64, epoch_before: i32) -> Result<(), LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        let r = reset::Reset { base_offset, base_ordinal, epoch_before };
        if !r.is_valid() {
            return Err(LogError::InvalidReset { base_offset, base_ordinal, epoch_before });
        }
        // A sync handle taken before covers files that are about to go.
        let gate = self.sync_failed.clone();
        let Some(_serial) = gate.fence() else {
            self.poisoned = true;
            return Err(LogError::Poisoned);
        };
        // Poisoned on any failure from here: even a failed marker write may have left the
        // marker durable, and the next open would then complete the reset over new appends.
        let done = reset::begin(&*self.storage, &self.dir, &r)
            .and_then(|()| reset::finish(&self.storage, &self.dir, &r));
        let (active, epochs) = match done {
            Ok(x) => x,
            Err(err) => {
                self.poisoned = true;
                return Err(err);
            }
        };
        for seg in self.closed.drain(..) {
            self.config.closed_files.forget(seg.slot());
        }
        self.active = active;
        self.size_bytes = 0;
        self.epochs = Arc::new(epochs);
        self.recovery.reset_to(self.active_point());
        self.check_invariants(true);
        tracing::info!(dir = %self.dir.display(), base_offset, base_ordinal, "replaced the log with an empty one (Raft snapshot)");
        Ok(())
    }

    /// The latest leader epoch (the one the last batch or [`begin_epoch`](Self::begin_epoch)
    /// has); `None` for a log that never had a batch.
    pub fn latest_epoch(&self) -> Option<i32> {
        self.epochs.latest()
    }

    /// The leader epoch of the batch holding `offset`; `None` outside `log_start..next`.
    pub fn epoch_at(&self, offset: u64) -> Option<i32> {
        if offset < self.log_start_offset() || offset >= self.next_offset() {
            return None;
        }
        self.epochs.epoch_at(offset)
    }

    /// Kafka's `OffsetsForLeaderEpoch`: the largest epoch at most `epoch` the log knows, and
    /// the offset after its last batch (the start of the next epoch; the log end for the
    /// latest). For an epoch below every known one, that epoch and the first known start.
    /// `None` for an epoch above the latest or a log without epochs. A follower truncates to
    /// the leader's answer for its own latest epoch.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        self.epochs.end_offset_for(epoch, self.next_offset())
    }

    /// The epoch record, oldest first.
    pub fn epoch_entries(&self) -> &[EpochEntry] {
        self.epochs.entries()
    }

    /// Starts leader epoch `epoch` at the log end, durably (the record is rewritten and
    /// synced before this returns). The same epoch again does nothing; a lower one is
    /// [`LogError::EpochRegressed`].
    pub fn begin_epoch(&mut self, epoch: i32) -> Result<(), LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        match self.epochs.latest() {
            Some(latest) if latest == epoch => return Ok(()), // every append: no allocation
            Some(latest) if epoch < latest => {
                return Err(LogError::EpochRegressed { latest, requested: epoch })
            }
            _ => {}
        }
        let mut next = (*self.epochs).clone();
        if next.begin(epoch, self.next_offset())? {
            epochs::write(&*self.storage, &self.dir, &next)?;
            self.epochs = Arc::new(next);
        }
        Ok(())
    }

    /// Appends one validated batch. Stamps the next offset and `leader_epoch` into it (outside
    /// the CRC, in its bytes and its header), rolling to a new segment first if the active one
    /// is full or too old. Does not fsync the data: use [`sync_handle`](Self::sync_handle).
    pub fn append(
        &mut self,
        batch: &mut ValidatedBatch,
        leader_epoch: i32,
        now_ms: i64,
    ) -> Result<AppendInfo, LogError> {
        self.append_with(batch, leader_epoch, now_ms, None)
    }

    /// As [`append`](Self::append); if the batch rolls the log, `roll_file` is written
    /// durably as the new segment's side file before the new segment exists. If that write
    /// fails, the roll fails: nothing is appended, the old segment stays active, and the next
    /// append tries the roll again. So a segment never has data without its side file.
    pub fn append_with(
        &mut self,
        batch: &mut ValidatedBatch,
        leader_epoch: i32,
        now_ms: i64,
        roll_file: Option<&RollFile<'_>>,
    ) -> Result<AppendInfo, LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        // A new epoch is recorded durably before its first batch; epochs never go back.
        self.begin_epoch(leader_epoch)?;
        let base_offset = self.next_offset();
        batch.stamp(base_offset, leader_epoch);
        let header = *batch.header();
        self.append_stamped(batch, header, now_ms, roll_file)
    }

    /// A follower's append (design.md §5.7): `batch` already carries its offsets and the leader
    /// epoch it was written in, and is stored byte for byte. It was validated as a produced
    /// batch is (length, CRC, framing: holding a [`ValidatedBatch`] proves it), must start at
    /// the log end ([`LogError::NotAtLogEnd`]) and carry an epoch at least the latest
    /// ([`LogError::EpochRegressed`]); a higher epoch is begun durably first. `roll_file` as
    /// for [`append_with`](Self::append_with).
    pub fn append_replicated(
        &mut self,
        batch: &ValidatedBatch,
        now_ms: i64,
        roll_file: Option<&RollFile<'_>>,
    ) -> Result<AppendInfo, LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        let header = *batch.header();
        if header.base_offset != self.next_offset() {
            return Err(LogError::NotAtLogEnd { expected: self.next_offset(), got: header.base_offset });
        }
        self.begin_epoch(header.leader_epoch)?;
        self.append_stamped(batch, header, now_ms, roll_file)
    }

    /// Appends a batch whose header (`header`, parsed from it) holds its final offsets and
    /// epoch, rolling first if needed.
    fn append_stamped(
        &mut self,
        batch: &[u8],
        header: BatchHeader,
        now_ms: i64,
        roll_file: Option<&RollFile<'_>>,
    ) -> Result<AppendInfo, LogError> {
        let base_offset = header.base_offset;
        // Offsets are contiguous, and the epoch record covers the batch (both checked by the
        // callers; a violation here is a bug that would corrupt the log).
        assert_eq!(base_offset, self.next_offset(), "append must start at the log end");
        assert_eq!(self.epochs.latest(), Some(header.leader_epoch), "append in the latest epoch");
        let rolled = self.should_roll(&header, now_ms);
        if rolled {
            self.roll(roll_file)?;
        }
        let Some(at) = BatchAt::new(self.active.base, self.active.size, header) else {
            // A fresh segment always fits one batch (at most MAX_RECORDS_PER_BATCH offsets).
            return Err(self.active.corrupt(self.active.size, "batch does not fit an empty segment"));
        };
        if let Err(err) = self.active.append(batch, at, self.config.index_interval_bytes, now_ms) {
            // Part of the batch may be in the file. Reads never go past `size`, and reopening
            // cuts the tail, but appending after it would bury garbage mid-segment.
            self.poisoned = true;
            return Err(err);
        }
        self.size_bytes += batch.len() as u64;
        Ok(AppendInfo { base_offset, last_offset: header.last_offset(), rolled })
    }

    /// Removes every batch from `offset` on: a follower's uncommitted suffix that diverged from
    /// the leader (design.md §5.7). `offset` must be the first offset of a batch, at least the
    /// log start and at most the log end ([`LogError::NotBatchBoundary`],
    /// [`LogError::OffsetOutOfRange`]). Cuts the segments, their indexes and side files
    /// (`<base>.<ext>` above the cut) and the epoch record. Sync handles taken before it fail
    /// with [`LogError::TruncatedSince`]. The caller never truncates below its commit offset
    /// and drops what it caches above the cut (tail cache, producer state).
    ///
    /// Crash safety, in this order: the recovery point is lowered to the cut durably first
    /// (recovery trusts bytes below it, and new appends will rewrite the bytes above); later
    /// segments are deleted newest first and the directory synced; the cut segment's file is
    /// truncated and synced; the epoch record is rewritten. A crash at any step leaves a prefix
    /// of the old log that recovery opens like any other, and the epoch record is reconciled
    /// with it at open. A failure after the first step poisons the log (reopen to recover).
    pub fn truncate_to(&mut self, offset: u64) -> Result<(), LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        let (log_start, next) = (self.log_start_offset(), self.next_offset());
        if offset < log_start || offset > next {
            return Err(LogError::OffsetOutOfRange { requested: offset, log_start, next });
        }
        if offset == next {
            // Nothing to cut but epochs that began here and got no batch.
            return self.truncate_epochs(offset);
        }
        let index = match offset >= self.active.base {
            true => self.closed.len(),
            false => self.closed.partition_point(|s| s.base <= offset).saturating_sub(1),
        };
        let seg = match self.closed.get(index) {
            Some(seg) => seg,
            None => &self.active,
        };
        let position = self.batch_position(seg, offset)?;
        let point = RecoveryPoint { segment_base: seg.base, position, next_offset: offset };
        // From here on a sync handle taken before would record a point past the cut.
        let gate = self.sync_failed.clone();
        let Some(_serial) = gate.fence() else {
            self.poisoned = true;
            return Err(LogError::Poisoned);
        };
        self.recovery.lower_to(point)?;
        let result = self.cut(index, position, offset);
        if result.is_err() {
            self.poisoned = true;
        }
        result?;
        self.truncate_epochs(offset)?;
        self.check_invariants(true);
        tracing::info!(dir = %self.dir.display(), offset, removed_from = next, "truncated the log");
        Ok(())
    }

    /// Byte position of the batch starting at `offset` in `seg`.
    fn batch_position(&self, seg: &Segment, offset: u64) -> Result<u64, LogError> {
        if offset == seg.base {
            return Ok(0);
        }
        if let Some(d) = seg.damage_at(offset) {
            return match d.offsets.start == offset {
                true => Ok(d.position),
                false => Err(LogError::NotBatchBoundary { offset, batch_base: d.offsets.start }),
            };
        }
        self.open_log(seg)?;
        let (position, header) = seg.find_batch(offset)?;
        if header.base_offset != offset {
            return Err(LogError::NotBatchBoundary { offset, batch_base: header.base_offset });
        }
        Ok(position)
    }

    /// Deletes the segments after `closed[index]` (or the active one) and cuts that one at
    /// `position`, making it the active segment.
    fn cut(&mut self, index: usize, position: u64, offset: u64) -> Result<(), LogError> {
        let keep_base = self.closed.get(index).map_or(self.active.base, |s| s.base);
        if index < self.closed.len() {
            // Newest first, so a crash leaves the segments a prefix of the old ones.
            let [log, ..] = self.active.paths();
            let log = log.to_path_buf();
            self.remove_segment_files(self.active.base, &log)?;
            while self.closed.len() > index + 1 {
                let Some(seg) = self.closed.pop() else { break };
                self.config.closed_files.forget(seg.slot());
                let log = seg.log_path.clone();
                self.remove_segment_files(seg.base, &log)?;
            }
            self.storage.sync_dir(&self.dir).map_err(LogError::io("sync directory", &self.dir))?;
            let Some(mut seg) = self.closed.pop() else {
                return Err(LogError::Corrupt {
                    path: self.dir.clone(),
                    position,
                    reason: "no segment to keep".into(),
                });
            };
            // Active again: its file stays open and leaves the closed-file bound (a slot of its
            // own, which a concurrent eviction of the old one cannot empty).
            self.config.closed_files.forget(seg.slot());
            seg.detach_slot();
            self.active = seg;
        }
        // Side files of the kept segment's base stay (a producer snapshot as of its start).
        self.remove_files_above(keep_base)?;
        self.active.truncate(position, offset)?;
        self.size_bytes = self.closed.iter().map(|s| s.size).sum::<u64>() + self.active.size;
        Ok(())
    }

    /// Removes a segment's log file, then its indexes and side files.
    fn remove_segment_files(&self, base: u64, log: &Path) -> Result<(), LogError> {
        match self.storage.remove(log) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(LogError::io("delete segment", log)(err)),
        }
        self.remove_files_above(base.saturating_sub(1))
    }

    /// Removes every `<base>.<ext>` file with a base above `base` (indexes, side files).
    fn remove_files_above(&self, base: u64) -> Result<(), LogError> {
        let names = self.storage.list(&self.dir).map_err(LogError::io("list directory", &self.dir))?;
        for name in names {
            let Some((stem, _)) = name.split_once('.') else { continue };
            if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if stem.parse::<u64>().is_ok_and(|b| b > base) {
                let path = self.dir.join(&name);
                match self.storage.remove(&path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(LogError::io("delete file", &path)(err)),
                }
            }
        }
        Ok(())
    }

    /// Drops epoch entries from `offset` on, durably if any was.
    fn truncate_epochs(&mut self, offset: u64) -> Result<(), LogError> {
        let mut next = (*self.epochs).clone();
        if next.truncate_from_end(offset) {
            epochs::write(&*self.storage, &self.dir, &next)?;
            self.epochs = Arc::new(next);
        }
        Ok(())
    }

    /// The log's structural invariants: contiguous segments, the active one at the end, epoch
    /// entries within the log and increasing, index entries below each segment's end. Cheap
    /// ones always (a violation is a bug); with `deep` (open, truncation), in debug builds,
    /// a walk over every segment's index entries.
    fn check_invariants(&self, deep: bool) {
        let last = self.closed.last().map_or(self.active.base, |s| s.next_offset);
        assert_eq!(last, self.active.base, "the active segment starts where the last closed one ends");
        assert!(self.active.next_offset >= self.active.base);
        if let Some(e) = self.epochs.entries().last() {
            assert!(e.start <= self.next_offset(), "epoch {} starts past the log end", e.epoch);
        }
        if cfg!(debug_assertions) && deep {
            let mut expected = self.log_start_offset();
            let mut ordinal = self.first_ordinal();
            for seg in self.segments() {
                assert_eq!(seg.base, expected, "segments are contiguous");
                expected = seg.next_offset;
                // Equal but for a gap that damage leaves (a span counted as one ordinal).
                assert!(seg.base_ordinal >= ordinal, "ordinals increase across segments");
                ordinal = seg.next_ordinal();
                assert!(seg.batches <= seg.next_offset - seg.base, "every batch holds an offset");
                assert!(seg.offsets.entries().iter().all(|e| u64::from(e.ord) < seg.batches.max(1)));
                let rel_end = seg.next_offset - seg.base;
                assert!(seg
                    .offsets
                    .entries()
                    .iter()
                    .all(|e| u64::from(e.rel) < rel_end && u64::from(e.pos) < seg.size));
                assert!(seg.times.entries().iter().all(|e| u64::from(e.rel) < rel_end));
            }
            assert!(self
                .epochs
                .entries()
                .windows(2)
                .all(|w| w[0].epoch < w[1].epoch && w[0].start < w[1].start));
        }
    }

    /// A handle that syncs everything appended so far; see the module docs for group commit.
    pub fn sync_handle(&self) -> SyncHandle {
        // The active segment's file is always open, so this does not fail in practice.
        let file = if self.is_poisoned() { None } else { self.active.log().ok() };
        SyncHandle {
            file,
            durable_offset: self.next_offset(),
            generation: self.sync_failed.generation(),
            point: self.active_point(),
            recovery: self.recovery.clone(),
            failed: self.sync_failed.clone(),
        }
    }

    /// The end of the active segment as a recovery point.
    fn active_point(&self) -> RecoveryPoint {
        RecoveryPoint {
            segment_base: self.active.base,
            position: self.active.size,
            next_offset: self.active.next_offset,
        }
    }

    /// The partition's recovery point: what completed fsyncs cover, and the writer of its
    /// checkpoint file (design.md §5.3), usable without the log's lock.
    pub fn recovery_checkpoint(&self) -> RecoveryCheckpoint {
        self.recovery.clone()
    }

    /// Syncs everything appended so far, holding `&mut self` (shutdown, tests).
    pub fn sync(&mut self) -> Result<(), LogError> {
        let result = self.sync_handle().sync().map_err(LogError::io("sync segment", &self.active.log_path));
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Records that a [`SyncHandle::sync`] failed: no more appends until the partition is
    /// reopened.
    pub fn mark_failed(&mut self) {
        self.poisoned = true;
    }

    /// Locates whole batches from the one holding `offset`, up to `max_bytes` (capped at
    /// [`MAX_READ_BYTES`]) but always at least one batch. Empty when `offset` is the next
    /// offset; [`LogError::OffsetOutOfRange`] below the log start or past the next offset.
    pub fn read_plan(&self, offset: u64, max_bytes: usize) -> Result<ReadPlan, LogError> {
        let (log_start, next) = (self.log_start_offset(), self.next_offset());
        if offset < log_start || offset > next {
            return Err(LogError::OffsetOutOfRange { requested: offset, log_start, next });
        }
        if offset == next {
            let path = Arc::from(self.active.log_path.as_path());
            return Ok(ReadPlan {
                file: None,
                path,
                position: 0,
                len: 0,
                first_offset: next,
                epochs: None,
                damage_found: None,
            });
        }
        let seg = self.segment_for(offset);
        if let Some(d) = seg.damage_at(offset) {
            metrics::counter!("quiver_corrupt_batches_total", "found_by" => "read").increment(1);
            let (start, end) = (d.offsets.start, d.offsets.end);
            let reason = format!(
                "offsets {start}..{end} are damaged (found at start); reading can go on from offset {end}"
            );
            return Err(seg.corrupt(d.position, reason));
        }
        let file = self.open_log(seg)?;
        let (start, first) = seg.find_batch(offset)?;
        if first.base_offset > offset {
            // Only a damaged span can make the walk skip past the offset asked for.
            return Err(seg.corrupt(start, format!("no batch holds offset {offset}")));
        }
        // The first batch whole, then up to the budget; `execute` drops a batch cut short.
        let budget = max_bytes.min(MAX_READ_BYTES).max(first.total_len()) as u64;
        let end = start.saturating_add(budget).min(seg.size);
        Ok(ReadPlan {
            file: Some(file),
            path: Arc::from(seg.log_path.as_path()),
            position: start,
            // At most MAX_READ_BYTES or one batch, so it fits in usize.
            len: usize::try_from(end - start).unwrap_or(usize::MAX),
            first_offset: first.base_offset,
            epochs: Some(self.epochs.clone()),
            damage_found: Some(self.damage_found.clone()),
        })
    }

    /// Replaces the damaged batch holding `good`'s offsets with `good` (CRC checked by the
    /// caller: a [`ValidatedBatch`]), the same batch from another replica, written in place
    /// and fsynced. Nothing else changes: not the file's length, the index, the ordinals or the
    /// epochs, so nothing that was durable can be lost by it. Done only when every check holds,
    /// else `Ok(false)` and the log is left as it is:
    /// - the batch lies in the log, and the bytes there are one batch of exactly `good`'s
    ///   offsets and length (a damaged span recovery recorded for exactly those offsets, or a
    ///   batch whose header says so), followed by the next batch (or the segment's end);
    /// - those bytes do not pass as that batch (CRC, or the leader epoch the record names):
    ///   an intact batch is never overwritten.
    ///
    /// The caller repairs only below the commit, where every replica's batch is the same
    /// entry, byte for byte (docs/replication.md §4).
    pub fn repair_batch(&mut self, good: &ValidatedBatch) -> Result<bool, LogError> {
        if self.poisoned || self.sync_failed.failed() {
            return Err(LogError::Poisoned);
        }
        let h = *good.header();
        let (base, next, len) = (h.base_offset, h.next_offset(), good.len() as u64);
        if base < self.log_start_offset() || next > self.next_offset() {
            return Ok(false);
        }
        let expected_epoch = self.epochs.epoch_at(base);
        if expected_epoch.is_some_and(|e| e != h.leader_epoch) {
            return Ok(false); // not the batch the epoch record says these offsets hold
        }
        let seg = self.segment_for(base);
        let position = match seg.damage_at(base) {
            // A span of exactly those offsets and bytes (a span of another extent, or one the
            // file ends before, is not this one batch).
            Some(d) if d.offsets == (base..next) && d.len == len => d.position,
            Some(_) => return Ok(false),
            None => match seg.find_batch(base) {
                Ok((pos, found))
                    if (found.base_offset, found.next_offset(), found.total_len() as u64)
                        == (base, next, len) =>
                {
                    pos
                }
                _ => return Ok(false),
            },
        };
        let end = position.saturating_add(len);
        if end > seg.size {
            return Ok(false);
        }
        if end == seg.size {
            if seg.next_offset != next {
                return Ok(false); // the segment should hold more after these offsets
            }
        } else {
            match seg.read_header(end) {
                Ok(after) if after.base_offset == next => {}
                _ => return Ok(false),
            }
        }
        let file = self.open_log(seg)?;
        let path = seg.log_path.clone();
        let current = file.read_bytes(position, len as usize).map_err(LogError::io("read", &path))?;
        // Never written over: bytes that pass as a batch, unless they are this very batch with
        // only its leader epoch (outside the CRC) damaged.
        if let Ok(there) = batch::validate(&current) {
            let epoch_only = (there.base_offset, there.next_offset()) == (base, next)
                && expected_epoch.is_some_and(|e| e != there.leader_epoch);
            if !epoch_only {
                return Ok(false);
            }
        }
        let active = seg.base == self.active.base;
        file.write_at(position, good).map_err(LogError::io("repair", &path))?;
        // The active segment syncs through the log's gate, so a write-back error (reported to
        // one fsync only) poisons the log instead of passing unnoticed; a closed segment has
        // nothing else unsynced.
        if active {
            self.sync()?;
        } else {
            file.sync().map_err(LogError::io("sync", &path))?;
        }
        let seg_base = self.segment_for(base).base;
        let seg = if seg_base == self.active.base {
            &mut self.active
        } else {
            match self.closed.iter_mut().find(|s| s.base == seg_base) {
                Some(s) => s,
                None => return Ok(true),
            }
        };
        seg.damaged.retain(|d| d.offsets != (base..next));
        self.forget_damage(base);
        metrics::counter!("quiver_repaired_batches_total").increment(1);
        tracing::warn!(segment = %path.display(), position, base, next, "repaired a damaged batch in place with a replica's copy");
        Ok(true)
    }

    /// Base offsets of damaged batches below `limit` to repair (recovery's spans and what reads
    /// found), at most `max`.
    pub fn damage_to_repair(&self, limit: u64, max: usize) -> Vec<u64> {
        let mut found: std::collections::BTreeSet<u64> =
            self.damage_found.lock().iter().copied().filter(|&o| o < limit).collect();
        let spans = self.closed.iter().chain(std::iter::once(&self.active)).flat_map(|s| &s.damaged);
        found.extend(spans.map(|d| d.offsets.start).filter(|&o| o < limit));
        found.into_iter().filter(|o| !self.unrepairable.contains(o)).take(max).collect()
    }

    /// A replica's copy did not fit the damaged batch at `offset`: not tried again.
    pub fn give_up_repair(&mut self, offset: u64) {
        self.forget_damage(offset);
        if self.unrepairable.len() < DAMAGE_NOTES {
            self.unrepairable.insert(offset);
        }
    }

    /// Notes a damaged batch at `offset` for repair (the background verification found it).
    pub fn note_damage(&self, offset: u64) {
        let mut notes = self.damage_found.lock();
        if notes.len() < DAMAGE_NOTES {
            notes.insert(offset);
        }
    }

    /// Forgets a damaged batch noted at `offset` (repaired, or not repairable from a copy).
    pub fn forget_damage(&self, offset: u64) {
        self.damage_found.lock().remove(&offset);
    }

    /// Where reading can go on after a read at `offset` failed with [`LogError::Corrupt`]: the
    /// end of the damaged span recovery found there, else the next segment.
    pub fn resume_after_damage(&self, offset: u64) -> u64 {
        let seg = self.segment_for(offset);
        match seg.damage_at(offset) {
            Some(d) => d.offsets.end,
            None => seg.next_offset.max(offset + 1),
        }
    }

    /// The ordinal (design.md §5.7: the Raft index) of the first retained batch, or
    /// [`next_ordinal`](Self::next_ordinal) if the log holds none.
    pub fn first_ordinal(&self) -> u64 {
        self.closed.first().map_or(self.active.base_ordinal, |s| s.base_ordinal)
    }

    /// The ordinal the next appended batch gets: one more than the last batch's. Ordinals grow
    /// by one per batch (a damaged span recovery kept counts as one), are recomputed from the
    /// log at open, and never change for a batch that stays in the log.
    pub fn next_ordinal(&self) -> u64 {
        self.active.next_ordinal()
    }

    /// The base offset of the batch with ordinal `ordinal`, or the log end offset for
    /// [`next_ordinal`](Self::next_ordinal); `None` outside `first_ordinal..=next_ordinal`.
    /// Finds the segment by binary search over base ordinals, then walks batch headers from
    /// the nearest index entry (index entries carry ordinals): at most an index interval of
    /// headers, as an offset lookup. A read error is returned (headers come from disk).
    pub fn offset_of_ordinal(&self, ordinal: u64) -> Result<Option<u64>, LogError> {
        if ordinal == self.next_ordinal() {
            return Ok(Some(self.next_offset()));
        }
        if ordinal < self.first_ordinal() || ordinal > self.next_ordinal() {
            return Ok(None);
        }
        let seg = match ordinal >= self.active.base_ordinal {
            true => &self.active,
            false => {
                let i = self.closed.partition_point(|s| s.base_ordinal <= ordinal);
                match i.checked_sub(1).and_then(|i| self.closed.get(i)) {
                    Some(seg) => seg,
                    None => return Ok(None),
                }
            }
        };
        if ordinal >= seg.next_ordinal() {
            // Only a gap left by damage (design.md §5.7) has no batch.
            return Ok(None);
        }
        self.open_log(seg)?;
        seg.locate_ordinal(ordinal - seg.base_ordinal).map(Some)
    }

    /// The ordinal of the batch holding `offset`; `None` outside `log_start..next`.
    pub fn ordinal_at(&self, offset: u64) -> Result<Option<u64>, LogError> {
        if offset < self.log_start_offset() || offset >= self.next_offset() {
            return Ok(None);
        }
        let seg = self.segment_for(offset);
        self.open_log(seg)?;
        let (rel, _) = seg.locate_offset(offset)?;
        Ok(Some(seg.base_ordinal + rel))
    }

    /// Truncates the log so that `ordinal` is the next ordinal: removes the batch with that
    /// ordinal and every later one ([`truncate_to`](Self::truncate_to) at its base offset). A
    /// Raft follower's `truncate` of a diverged suffix. [`LogError::OrdinalOutOfRange`]
    /// outside `first_ordinal..=next_ordinal`.
    pub fn truncate_to_ordinal(&mut self, ordinal: u64) -> Result<(), LogError> {
        let (first, next) = (self.first_ordinal(), self.next_ordinal());
        let Some(offset) = self.offset_of_ordinal(ordinal)? else {
            return Err(LogError::OrdinalOutOfRange { requested: ordinal, first, next });
        };
        self.truncate_to(offset)
    }

    /// The first offset still in the log.
    pub fn log_start_offset(&self) -> u64 {
        self.closed.first().map_or(self.active.base, |s| s.base)
    }

    /// The offset the next append gets; the high watermark on a single node.
    pub fn next_offset(&self) -> u64 {
        self.active.next_offset
    }

    /// Base offset of the first batch whose max timestamp is at least `ts_ms`; `None` if every
    /// batch is older (a subscriber then starts at the next offset).
    pub fn offset_for_timestamp(&self, ts_ms: i64) -> Result<Option<u64>, LogError> {
        for seg in self.segments() {
            if seg.max_timestamp < ts_ms {
                continue; // answered from memory, without opening the file
            }
            self.open_log(seg)?;
            if let Some(offset) = seg.offset_for_timestamp(ts_ms)? {
                return Ok(Some(offset));
            }
        }
        Ok(None)
    }

    /// Deletes old closed segments by size and age (design.md §7), oldest first, stopping at
    /// the first one to keep; never the active segment.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<RetentionReport, LogError> {
        self.apply_retention_below(now_ms, u64::MAX)
    }

    /// [`apply_retention`](Self::apply_retention), deleting only segments that end at or
    /// before `limit`: a replicated partition passes its high watermark, so retention never
    /// drops an entry Raft has not committed (a Raft snapshot of the log start must cover
    /// committed entries only, docs/replication.md §2a).
    pub fn apply_retention_below(&mut self, now_ms: i64, limit: u64) -> Result<RetentionReport, LogError> {
        let mut report = RetentionReport::default();
        while let Some(oldest) = self.closed.first().filter(|s| s.next_offset <= limit) {
            let by_bytes =
                self.config.retention_bytes.is_some_and(|limit| self.size_bytes - oldest.size >= limit);
            let by_age = self.config.retention_ms.is_some_and(|ms| {
                let ms = i64::try_from(ms).unwrap_or(i64::MAX);
                oldest.max_timestamp < now_ms.saturating_sub(ms)
            });
            if !(by_bytes || by_age) {
                break;
            }
            let (base, size) = (oldest.base, oldest.size);
            self.delete_oldest()?;
            report.deleted_bases.push(base);
            report.bytes_deleted += size;
        }
        if !report.deleted_bases.is_empty() {
            self.storage.sync_dir(&self.dir).map_err(LogError::io("sync directory", &self.dir))?;
            self.after_deletion(&report);
        }
        report.log_start_offset = self.log_start_offset();
        Ok(report)
    }

    /// Seals the active segment and starts a new one at the next offset, as a full one would
    /// be (same crash safety: the old segment and the directory are synced first). Does
    /// nothing to an empty active segment; returns whether it rolled. A log compacted by
    /// rewriting its live records (the offsets store, §5.4) rolls first, so that everything
    /// before the rewrite lies in whole segments [`delete_segments_below`] can drop.
    ///
    /// [`delete_segments_below`]: Self::delete_segments_below
    pub fn roll_now(&mut self) -> Result<bool, LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        if self.active.size == 0 {
            return Ok(false);
        }
        self.roll(None)?;
        Ok(true)
    }

    /// Deletes the closed segments that lie wholly below `offset`, oldest first, never the
    /// active one: Kafka's log start offset moved up by compaction. Each deletion is made
    /// durable (directory fsync) before the next, so a crash leaves the log a suffix of
    /// itself, contiguous, and never a gap.
    pub fn delete_segments_below(&mut self, offset: u64) -> Result<RetentionReport, LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        let mut report = RetentionReport::default();
        while let Some(oldest) = self.closed.first().filter(|s| s.next_offset <= offset) {
            let (base, size) = (oldest.base, oldest.size);
            self.delete_oldest()?;
            self.storage.sync_dir(&self.dir).map_err(LogError::io("sync directory", &self.dir))?;
            report.deleted_bases.push(base);
            report.bytes_deleted += size;
        }
        self.after_deletion(&report);
        report.log_start_offset = self.log_start_offset();
        Ok(report)
    }

    /// After segments were deleted from the start: drops the epochs wholly before the new
    /// start (best effort: reconciled at open anyway).
    fn after_deletion(&mut self, report: &RetentionReport) {
        if report.deleted_bases.is_empty() {
            return;
        }
        let mut next = (*self.epochs).clone();
        if next.truncate_from_start(self.log_start_offset()) {
            match epochs::write(&*self.storage, &self.dir, &next) {
                Ok(()) => self.epochs = Arc::new(next),
                Err(err) => {
                    tracing::warn!(%err, "could not rewrite the leader-epoch record after deleting segments")
                }
            }
        }
        tracing::info!(dir = %self.dir.display(), segments = ?report.deleted_bases, "deleted old segments");
    }

    /// Base offsets of the side files `<base>.<ext>` in the partition directory, ascending.
    pub fn side_file_bases(&self, ext: &str) -> Result<Vec<u64>, LogError> {
        let names = self.storage.list(&self.dir).map_err(LogError::io("list directory", &self.dir))?;
        let suffix = format!(".{ext}");
        let mut bases: Vec<u64> = names
            .iter()
            .filter_map(|name| name.strip_suffix(&suffix))
            .filter(|stem| stem.len() == 20)
            .filter_map(|stem| stem.parse::<u64>().ok())
            .collect();
        bases.sort_unstable();
        Ok(bases)
    }

    /// The side file `<base>.<ext>`, if there is one of at most `max_bytes`.
    pub fn read_side_file(&self, base: u64, ext: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, LogError> {
        let name = segment::file_name(base, ext);
        let names = self.storage.list(&self.dir).map_err(LogError::io("list directory", &self.dir))?;
        if !names.contains(&name) {
            return Ok(None);
        }
        let path = self.dir.join(&name);
        let f = self.storage.open(&path).map_err(LogError::io("open side file", &path))?;
        let len = f.len().map_err(LogError::io("side file length", &path))?;
        if len > max_bytes {
            tracing::warn!(path = %path.display(), len, "side file too large; ignoring it");
            return Ok(None);
        }
        let mut buf = vec![0; len as usize];
        f.read_exact_at(0, &mut buf).map_err(LogError::io("read side file", &path))?;
        Ok(Some(buf))
    }

    /// Writes the side file `<base>.<ext>` with the one protocol for files written whole:
    /// `<name>.tmp`, fsync, rename over the old version, fsync the directory. A crash at any
    /// point leaves either the old version or the new one, never a mix (a leftover `.tmp` is
    /// removed when the partition is opened).
    fn write_side_file(&self, base: u64, ext: &str, bytes: &[u8]) -> Result<(), LogError> {
        let path = self.dir.join(segment::file_name(base, ext));
        replace_file(&*self.storage, &path, bytes)?;
        self.storage.sync_dir(&self.dir).map_err(LogError::io("sync directory", &self.dir))
    }

    /// Removes side files `<base>.<ext>` with a base below `below` (best effort: a leftover
    /// one is only disk space, and the next roll tries again).
    fn remove_side_files_below(&self, ext: &str, below: u64) {
        let bases = match self.side_file_bases(ext) {
            Ok(bases) => bases,
            Err(err) => return tracing::warn!(%err, "could not list old side files"),
        };
        for base in bases.into_iter().filter(|&b| b < below) {
            let path = self.dir.join(segment::file_name(base, ext));
            if let Err(err) = self.storage.remove(&path) {
                tracing::warn!(path = %path.display(), %err, "could not remove an old side file");
            }
        }
    }

    /// Whether a write or sync failed (here or on a sync thread); appends are refused.
    fn is_poisoned(&self) -> bool {
        self.poisoned || self.sync_failed.failed()
    }

    /// Base offset of the active segment.
    pub fn active_base_offset(&self) -> u64 {
        self.active.base
    }

    /// Bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.closed.len() + 1
    }

    /// The partition directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.closed.iter().chain(std::iter::once(&self.active))
    }

    /// The segment holding `offset`, which is in `log_start..next`.
    fn segment_for(&self, offset: u64) -> &Segment {
        if offset >= self.active.base {
            return &self.active;
        }
        let i = self.closed.partition_point(|s| s.base <= offset);
        i.checked_sub(1).and_then(|i| self.closed.get(i)).unwrap_or(&self.active)
    }

    /// The log file of `seg`, opening it if it is a released closed segment, and closing the
    /// least recently used closed segment files beyond the bound (`config.closed_files`).
    fn open_log(&self, seg: &Segment) -> Result<Arc<dyn StorageFile>, LogError> {
        if seg.base == self.active.base {
            return seg.log();
        }
        let file = seg.log()?;
        self.config.closed_files.touch(seg.slot());
        Ok(file)
    }

    /// Whether appending batches with these headers in `leader_epoch` at `now_ms` would only
    /// write to the active segment and its indexes: no roll (which fsyncs and may wait for a
    /// sync in progress), no new epoch (which fsyncs the epochs file), no poisoned log. What a
    /// caller on an async task checks before appending there instead of on a blocking thread.
    pub fn appends_in_active_segment<'a>(
        &self,
        headers: impl IntoIterator<Item = &'a BatchHeader>,
        leader_epoch: i32,
        now_ms: i64,
    ) -> bool {
        if self.is_poisoned() || self.latest_epoch() != Some(leader_epoch) {
            return false;
        }
        let (mut size, mut next) = (self.active.size, self.next_offset());
        for header in headers {
            let stamped = BatchHeader { base_offset: next, ..*header };
            if self.rolls_at(size, &stamped, now_ms) {
                return false;
            }
            size += header.total_len() as u64;
            next = stamped.next_offset();
        }
        true
    }

    /// Whether `header` must go into a new segment. An empty segment always takes the batch.
    fn should_roll(&self, header: &BatchHeader, now_ms: i64) -> bool {
        self.rolls_at(self.active.size, header, now_ms)
    }

    /// Whether the stamped `header`, appended when the active segment holds `size` bytes, must
    /// go into a new segment: it would pass `segment_bytes`, the segment is old enough, or the
    /// batch could not be indexed in it. An empty segment always takes the batch.
    fn rolls_at(&self, size: u64, header: &BatchHeader, now_ms: i64) -> bool {
        let seg = &self.active;
        if size == 0 {
            return false;
        }
        let full = size + header.total_len() as u64 > self.config.segment_bytes;
        let segment_ms = i64::try_from(self.config.segment_ms).unwrap_or(i64::MAX);
        let old = seg.roll_base_ms.is_some_and(|t| now_ms.saturating_sub(t) >= segment_ms);
        let unaddressable = BatchAt::new(seg.base, size, *header).is_none();
        full || old || unaddressable
    }

    /// Seals the active segment and starts a new one at the next offset (design.md §6: the
    /// old segment and the directory are synced before anything goes into the new one).
    fn roll(&mut self, roll_file: Option<&RollFile<'_>>) -> Result<(), LogError> {
        {
            // No periodic sync runs meanwhile (a roll waits for one in progress), and a failed
            // one stops the roll.
            let gate = self.sync_failed.clone();
            let _serial = gate.lock.lock();
            if gate.failed() {
                self.poisoned = true;
                return Err(LogError::Poisoned);
            }
            if let Err(err) = self.active.seal() {
                gate.fail();
                self.poisoned = true;
                return Err(err);
            }
            self.recovery.record(self.active_point());
        }
        // A failure from here on leaves the old segment active and intact; the next append
        // retries the roll (sealing again is harmless, and so is rewriting the side file).
        if let Some(file) = roll_file {
            self.write_side_file(self.next_offset(), file.ext, &(file.contents)())?;
        }
        let new = Segment::create(&self.storage, &self.dir, self.next_offset(), self.next_ordinal())?;
        self.storage.sync_dir(&self.dir).map_err(LogError::io("sync directory", &self.dir))?;
        let old = std::mem::replace(&mut self.active, new);
        tracing::debug!(segment = %old.log_path.display(), next = self.active.base, "rolled segment");
        // The sealed segment is wholly below the new point, 0 of the new segment. Not writing
        // it loses nothing: a checkpoint of an older segment means the same to recovery.
        self.recovery.record(self.active_point());
        if let Err(err) = self.recovery.write() {
            tracing::warn!(dir = %self.dir.display(), %err, "could not write the recovery point at a roll");
        }
        if let Some(file) = roll_file {
            // The previous segment's side file stays, a fallback should the new one be damaged.
            self.remove_side_files_below(file.ext, old.base);
        }
        let mut old = old;
        old.release(); // reopened on demand, within the bound of open closed segments
        self.closed.push(old);
        self.check_invariants(false);
        Ok(())
    }

    /// Removes the oldest closed segment's files, the log first: once it is gone the segment
    /// is gone, and recovery removes index files left without one.
    fn delete_oldest(&mut self) -> Result<(), LogError> {
        let Some(oldest) = self.closed.first() else { return Ok(()) };
        let [log, index, timeindex] = oldest.paths();
        match self.storage.remove(log) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(LogError::io("delete segment", log)(err)),
        }
        for path in [index, timeindex] {
            if let Err(err) = self.storage.remove(path) {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), %err, "could not delete index file");
                }
            }
        }
        let removed = self.closed.remove(0);
        self.config.closed_files.forget(removed.slot());
        self.size_bytes -= removed.size;
        Ok(())
    }
}
