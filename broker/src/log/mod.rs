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
//!   [`ReadPlan::execute`] reads them outside it. The bytes a plan names never change (the
//!   log only appends; recovery truncates only before the log is shared), and a plan holds its
//!   file open, so retention deleting the segment meanwhile does not break it.

mod checkpoint;
#[cfg(test)]
mod fault_tests;
mod index;
mod recovery;
mod segment;
#[cfg(test)]
mod tests;
mod verify;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use quiver_protocol::batch::{self, BatchError, BatchHeader, BATCH_HEADER_BYTES};
use quiver_protocol::limits::MAX_READ_BYTES;

use crate::storage::{Storage, StorageFile};
use segment::{BatchAt, Segment};

pub use checkpoint::{RecoveryCheckpoint, RecoveryPoint};
pub use recovery::{Damage, RecoveryReport, Truncation};
pub use segment::TailDefect;
pub use verify::VerifyTarget;

/// Largest `segment_bytes` (one limit for topics and the log).
pub use quiver_protocol::limits::MAX_SEGMENT_BYTES;

/// Per-partition settings (the storage part of `TopicConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: None,
            retention_ms: None,
            index_interval_bytes: 4096,
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
}

type SyncState = Arc<SyncGate>;

impl SyncGate {
    fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn fail(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::Release);
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
}

impl ReadPlan {
    /// Reads the span in one read and returns the whole batches in it (at least one), or
    /// nothing for an empty plan. Batch ends are found in the bytes read, not by reading each
    /// header from the file first: with `direct_writes` every file read is a device round trip.
    /// Every batch's CRC is checked before it is handed out: bytes that do not match are never
    /// served.
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
        while bytes.len() - end >= BATCH_HEADER_BYTES {
            let header = match BatchHeader::parse(&bytes[end..]) {
                Ok(header) => header,
                Err(_) if end > 0 => break, // served up to it; the next read reports it
                Err(e) => return Err(self.damaged(end, e.to_string())),
            };
            if header.base_offset >= limit || header.total_len() > bytes.len() - end {
                break; // past the limit, or the span ends inside this batch
            }
            let batch_end = end + header.total_len();
            match batch::verify_crc(&bytes[end..batch_end], &header) {
                Ok(()) => end = batch_end,
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
        metrics::counter!("quiver_corrupt_batches_total", "found_by" => "read").increment(1);
        tracing::error!(segment = %self.path.display(), position, %reason, "refusing to serve a damaged batch");
        LogError::Corrupt { path: self.path.to_path_buf(), position, reason }
    }

    /// Bytes the plan reads: whole batches and possibly the start of one more.
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
    /// Set when a write or fsync failed; see [`LogError::Poisoned`].
    poisoned: bool,
    /// Shared with every [`SyncHandle`]: serialises syncs, and records a failed one.
    sync_failed: SyncState,
    /// Base offsets of the closed segments whose log file is open, least recently used first;
    /// at most [`OPEN_CLOSED_SEGMENTS`]. (Under the owner's lock already; the mutex is for
    /// `&self` readers.)
    open_closed: parking_lot::Mutex<std::collections::VecDeque<u64>>,
    /// How far completed fsyncs cover the active segment, and its checkpoint file.
    recovery: RecoveryCheckpoint,
}

/// Closed segments per partition whose log file may be open at once (their index files are
/// never open: lookups use the entries in memory). A partition holds at most 3 (the active
/// segment's files) + this many descriptors, plus files that in-flight reads still hold.
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
        config.validate()?;
        let recovered = recovery::recover(&storage, &dir, &config, now_ms)?;
        let size_bytes = recovered.closed.iter().map(|s| s.size).sum::<u64>() + recovered.active.size;
        let recovery =
            RecoveryCheckpoint::new(storage.clone(), dir.clone(), recovered.synced, recovered.written);
        let log = PartitionLog {
            recovery,
            storage,
            dir,
            config,
            closed: recovered.closed,
            active: recovered.active,
            size_bytes,
            poisoned: false,
            sync_failed: Default::default(),
            open_closed: Default::default(),
        };
        Ok((log, recovered.report))
    }

    /// Appends one batch, which the caller has validated (`batch::validate`) and which must
    /// span `batch` exactly. Stamps the next offset and `leader_epoch` into its header (outside
    /// the CRC), rolling to a new segment first if the active one is full or too old. Does not
    /// fsync the data: use [`sync_handle`](Self::sync_handle).
    pub fn append(
        &mut self,
        batch: &mut [u8],
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
        batch: &mut [u8],
        leader_epoch: i32,
        now_ms: i64,
        roll_file: Option<&RollFile<'_>>,
    ) -> Result<AppendInfo, LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        let header = BatchHeader::parse(batch)?;
        if header.total_len() != batch.len() {
            let msg = format!("batch length says {} bytes, buffer holds {}", header.total_len(), batch.len());
            return Err(BatchError::Inconsistent(msg).into());
        }
        let base_offset = self.next_offset();
        batch::stamp(batch, base_offset, leader_epoch);
        let header = BatchHeader { base_offset, leader_epoch, ..header };
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

    /// A handle that syncs everything appended so far; see the module docs for group commit.
    pub fn sync_handle(&self) -> SyncHandle {
        // The active segment's file is always open, so this does not fail in practice.
        let file = if self.is_poisoned() { None } else { self.active.log().ok() };
        SyncHandle {
            file,
            durable_offset: self.next_offset(),
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
            return Ok(ReadPlan { file: None, path, position: 0, len: 0, first_offset: next });
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
        })
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
        let mut report = RetentionReport::default();
        while let Some(oldest) = self.closed.first() {
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
            tracing::info!(dir = %self.dir.display(), segments = ?report.deleted_bases, "retention deleted segments");
        }
        report.log_start_offset = self.log_start_offset();
        Ok(report)
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
    /// least recently used one if that makes more than [`OPEN_CLOSED_SEGMENTS`] open.
    fn open_log(&self, seg: &Segment) -> Result<Arc<dyn StorageFile>, LogError> {
        if seg.base == self.active.base {
            return seg.log();
        }
        let file = seg.log()?;
        let mut open = self.open_closed.lock();
        open.retain(|&b| b != seg.base);
        open.push_back(seg.base);
        while open.len() > OPEN_CLOSED_SEGMENTS {
            let Some(evict) = open.pop_front() else { break };
            if let Ok(i) = self.closed.binary_search_by_key(&evict, |s| s.base) {
                self.closed[i].release_log();
            }
        }
        Ok(file)
    }

    /// Whether `header` must go into a new segment. An empty segment always takes the batch.
    fn should_roll(&self, header: &BatchHeader, now_ms: i64) -> bool {
        let seg = &self.active;
        if seg.size == 0 {
            return false;
        }
        let full = seg.size + header.total_len() as u64 > self.config.segment_bytes;
        let segment_ms = i64::try_from(self.config.segment_ms).unwrap_or(i64::MAX);
        let old = seg.roll_base_ms.is_some_and(|t| now_ms.saturating_sub(t) >= segment_ms);
        let unaddressable = BatchAt::new(seg.base, seg.size, *header).is_none();
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
        let new = Segment::create(&self.storage, &self.dir, self.next_offset())?;
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
        self.open_closed.lock().retain(|&b| b != removed.base);
        self.size_bytes -= removed.size;
        Ok(())
    }
}
