//! One segment: a `.log` file of whole record batches back to back (docs/design.md §5.1) and
//! its two sparse indexes.
//!
//! `size` (bytes of whole batches) is kept in memory and is what every read is bounded by, so
//! bytes past it (a torn or failed write) are never served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quiver_protocol::batch::{self, BatchError, BatchHeader, BATCH_HEADER_BYTES};

use super::epochs::Epochs;
use super::file_cache::FileSlot;
use super::index::{IndexFile, OffsetEntry, TimeEntry};
use super::LogError;
use crate::storage::{Storage, StorageFile};

/// Where the magic byte sits in a batch header.
const MAGIC_AT: usize = 16;

/// Why a scan of a segment stopped before the end of its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TailDefect {
    /// Fewer bytes than a batch header are left.
    #[error("{have} bytes at the end, fewer than a batch header")]
    PartialHeader {
        /// Bytes left in the file.
        have: u64,
    },
    /// The header does not parse (magic, length or record count out of bounds).
    #[error("bad batch header: {0}")]
    BadHeader(BatchError),
    /// The batch length runs past the end of the file.
    #[error("batch of {len} bytes with only {have} bytes left in the file")]
    PastEnd {
        /// Length the header claims.
        len: u64,
        /// Bytes left in the file.
        have: u64,
    },
    /// The base offset does not follow the previous batch.
    #[error("batch base offset {found}, expected {expected}")]
    OffsetMismatch {
        /// The previous batch's last offset + 1.
        expected: u64,
        /// What the header says.
        found: u64,
    },
    /// The CRC does not match the bytes.
    #[error("{0}")]
    Crc(BatchError),
    /// The batch's leader epoch (outside the CRC) is not the one the epoch record has in force
    /// at its offset (design.md §5.7): the epoch bytes are damaged.
    #[error("batch leader epoch {found}, the epoch record says {expected} at its offset")]
    EpochMismatch {
        /// The epoch the record has in force at the batch's base offset.
        expected: i32,
        /// What the header says.
        found: i32,
    },
    /// A position or relative offset no longer fits the u32 fields of the index.
    #[error("segment grew past what its index can address")]
    TooLarge,
    /// The file ends before the recovery point: bytes a completed fsync covered are gone.
    #[error("the file ends at byte {end}, before the recovery point at byte {point}")]
    Missing {
        /// Length of the file.
        end: u64,
        /// The checkpointed recovery point.
        point: u64,
    },
}

/// A batch at a position that the segment's index can address: both the position and the
/// last offset relative to the segment base fit in u32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchAt {
    pub(crate) pos: u32,
    pub(crate) rel: u32,
    pub(crate) header: BatchHeader,
}

impl BatchAt {
    /// `None` if the batch cannot be indexed in a segment based at `base`.
    pub(crate) fn new(base: u64, pos: u64, header: BatchHeader) -> Option<BatchAt> {
        let pos = u32::try_from(pos).ok()?;
        let rel = u32::try_from(header.base_offset.checked_sub(base)?).ok()?;
        u32::try_from(header.last_offset() - base).ok()?;
        Some(BatchAt { pos, rel, header })
    }
}

/// How much of each batch a scan verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Header bounds and offset continuity only (closed segments: their bytes were synced).
    Headers,
    /// Also read the whole batch and verify its CRC (the last segment, which may be torn).
    Crc,
}

/// Where a scan ended: the end of the last good batch, the offset after it, and why it stopped
/// early if it did.
#[derive(Debug)]
pub(crate) struct ScanEnd {
    pub(crate) pos: u64,
    pub(crate) next_offset: u64,
    pub(crate) defect: Option<TailDefect>,
}

/// File name of a segment file: the base offset in 20 digits and an extension.
pub(crate) fn file_name(base: u64, ext: &str) -> String {
    format!("{base:020}.{ext}")
}

/// One segment of a partition.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Offset of the first batch; also the file name.
    pub(crate) base: u64,
    /// The log file while open: always for the active segment; for a closed one, while the
    /// partition's bounded set of open closed segments holds it (design.md §5.6).
    log: Arc<FileSlot>,
    storage: Arc<dyn Storage>,
    pub(crate) log_path: PathBuf,
    pub(crate) offsets: IndexFile<OffsetEntry>,
    pub(crate) times: IndexFile<TimeEntry>,
    /// Bytes of whole batches in the log file.
    pub(crate) size: u64,
    /// Offset after the last batch.
    pub(crate) next_offset: u64,
    /// Ordinal of the first batch (design.md §5.7): the Raft index of issue 17. Written in the
    /// offset index's header when the segment is created and when it is sealed.
    pub(crate) base_ordinal: u64,
    /// Ordinals the segment holds: its batches, plus one for each damaged span recovery kept
    /// (its batches cannot be counted, and it holds at least one).
    pub(crate) batches: u64,
    /// Largest batch max timestamp; `i64::MIN` while empty.
    pub(crate) max_timestamp: i64,
    /// Clock time the segment's age (for `segment_ms`) counts from: its first append, or when
    /// it was reopened. Producer timestamps are not used: a skewed client clock would otherwise
    /// roll a segment on every append.
    pub(crate) roll_base_ms: Option<i64>,
    /// Spans whose bytes recovery found damaged and kept in place (design.md §5.3): reads of
    /// their offsets fail with [`LogError::Corrupt`].
    pub(crate) damaged: Vec<DamagedSpan>,
    /// Set once a lookup found an offset-index entry that does not point at its batch (logged
    /// and counted once per segment, see [`Segment::checked_entry`]).
    bad_index_entry: std::sync::atomic::AtomicBool,
}

/// A damaged span recovery kept in place: the offsets it held and where its bytes start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DamagedSpan {
    pub(crate) offsets: std::ops::Range<u64>,
    /// Byte position of the damage in the segment file.
    pub(crate) position: u64,
    /// Bytes of the damaged span (zero for a span the file ends before).
    pub(crate) len: u64,
}

impl Segment {
    /// Opens the three files of a segment (creating missing ones) without reading them; the
    /// segment starts out empty in memory.
    pub(crate) fn open_files(storage: &Arc<dyn Storage>, dir: &Path, base: u64) -> Result<Segment, LogError> {
        let log_path = dir.join(file_name(base, "log"));
        let log = storage.open_segment(&log_path).map_err(LogError::io("open segment", &log_path))?;
        Ok(Segment {
            base,
            log: Arc::new(parking_lot::Mutex::new(Some(log))),
            storage: storage.clone(),
            log_path,
            offsets: IndexFile::open(storage, dir.join(file_name(base, "index")), base)?,
            times: IndexFile::open(storage, dir.join(file_name(base, "timeindex")), base)?,
            size: 0,
            next_offset: base,
            base_ordinal: 0,
            batches: 0,
            max_timestamp: i64::MIN,
            roll_base_ms: None,
            damaged: Vec::new(),
            bad_index_entry: Default::default(),
        })
    }

    /// Creates a new empty segment whose first batch will have ordinal `base_ordinal`. The
    /// caller syncs the directory.
    pub(crate) fn create(
        storage: &Arc<dyn Storage>,
        dir: &Path,
        base: u64,
        base_ordinal: u64,
    ) -> Result<Segment, LogError> {
        let mut seg = Segment::open_files(storage, dir, base)?;
        let len = seg.log()?.len().map_err(LogError::io("stat segment", &seg.log_path))?;
        // Names only grow, so a non-empty file here is one we must not overwrite.
        if len != 0 {
            return Err(seg.corrupt(0, format!("new segment already holds {len} bytes")));
        }
        // The offset index's header now, durably: it is where the base ordinal of the active
        // segment survives a restart when no closed segment precedes it (retention deleted
        // them). The entries are written when the segment is sealed (design.md §5.2). Not
        // when recovery's rule for a segment without one (base offset + 1) gives the same
        // ordinal, as for every new partition's first segment: creating a topic of 4,096
        // partitions would otherwise write and fsync 4,096 more files.
        seg.set_base_ordinal(base_ordinal);
        if base.checked_add(1) != Some(base_ordinal) {
            seg.offsets.write_out()?;
        }
        Ok(seg)
    }

    /// Sets the ordinal of the first batch (in memory; written to the offset index's header
    /// when it is next written).
    pub(crate) fn set_base_ordinal(&mut self, ordinal: u64) {
        self.base_ordinal = ordinal;
        self.offsets.set_base_ordinal(ordinal);
    }

    /// The ordinal the next batch appended to this segment gets.
    pub(crate) fn next_ordinal(&self) -> u64 {
        self.base_ordinal + self.batches
    }

    /// The log file, opened if it was released. The caller of a closed segment's file tells
    /// the partition's open-file bound ([`PartitionLog`](super::PartitionLog) does).
    pub(crate) fn log(&self) -> Result<Arc<dyn StorageFile>, LogError> {
        let mut slot = self.log.lock();
        if let Some(file) = &*slot {
            return Ok(file.clone());
        }
        let file = self
            .storage
            .open_segment(&self.log_path)
            .map_err(LogError::io("open segment", &self.log_path))?;
        *slot = Some(file.clone());
        Ok(file)
    }

    /// Closes the segment's files (a closed segment's indexes live in memory; its log file
    /// reopens on demand). Readers holding the file keep it open until they finish.
    pub(crate) fn release(&mut self) {
        self.release_log();
        self.offsets.release();
        self.times.release();
    }

    /// Where the log file is kept while open (for the broker's bound on open closed segments).
    pub(crate) fn slot(&self) -> &Arc<FileSlot> {
        &self.log
    }

    /// Moves the open file (if any) to a slot of its own, so an eviction the closed-file bound
    /// chose before this segment became active again cannot close it (truncation).
    pub(crate) fn detach_slot(&mut self) {
        let file = self.log.lock().take();
        self.log = Arc::new(parking_lot::Mutex::new(file));
    }

    /// Closes the log file (reopened on demand).
    pub(crate) fn release_log(&self) {
        *self.log.lock() = None;
    }

    /// Paths of the three files.
    pub(crate) fn paths(&self) -> [&Path; 3] {
        [&self.log_path, self.offsets.path(), self.times.path()]
    }

    /// Appends one stamped batch and indexes it. Does not sync.
    pub(crate) fn append(
        &mut self,
        bytes: &[u8],
        at: BatchAt,
        interval: u32,
        now_ms: i64,
    ) -> Result<(), LogError> {
        self.log()?.append(bytes).map_err(LogError::io("append", &self.log_path))?;
        // The active segment's index lives in memory; `seal` writes the files.
        self.track(at, interval, false, false);
        self.roll_base_ms.get_or_insert(now_ms);
        Ok(())
    }

    /// Accounts for a batch that is in the file at `at.pos`: sizes, offsets, ordinals and index
    /// entries (written to the index files too if `write`). `after_damage` forces an index
    /// entry: the first batch after a damaged span must be found without walking through it.
    /// A damaged span that skipped offsets (the batch starts past `next_offset`) counts as one
    /// ordinal before it.
    pub(crate) fn track(&mut self, at: BatchAt, interval: u32, write: bool, after_damage: bool) {
        let header = &at.header;
        if after_damage && header.base_offset > self.next_offset {
            self.batches += 1;
        }
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
        // An entry once `interval` bytes were appended since the last one; the first batch of
        // a segment always. Derived from positions only, so a rebuild gives the same entries.
        let due = after_damage || self.offsets.last().is_none_or(|e| at.pos - e.pos >= interval);
        if due {
            // Ordinals grow by one per batch and offsets by at least one, so `ord <= rel`,
            // which `BatchAt` bounded by u32.
            let ord = u32::try_from(self.batches).unwrap_or(at.rel);
            self.offsets.push(OffsetEntry { rel: at.rel, pos: at.pos, ord }, write);
            if self.times.last().is_none_or(|t| self.max_timestamp > t.max_ts) {
                self.times.push(TimeEntry { max_ts: self.max_timestamp, rel: at.rel }, write);
            }
        }
        self.size = u64::from(at.pos) + header.total_len() as u64;
        self.next_offset = header.next_offset();
        self.batches += 1;
    }

    /// Counts a damaged span of `offsets` that ends the scanned part of the segment (nothing
    /// tracked after it yet): one ordinal if it holds any offset.
    pub(crate) fn count_damage(&mut self, offsets: &std::ops::Range<u64>) {
        if !offsets.is_empty() {
            self.batches += 1;
        }
    }

    /// Makes the segment durable before it stops being the active one.
    pub(crate) fn seal(&mut self) -> Result<(), LogError> {
        // A closed segment must end exactly where its last batch ends (recovery checks it):
        // cut any padding a direct-write file carries.
        let log = self.log()?;
        log.truncate(self.size).map_err(LogError::io("truncate segment", &self.log_path))?;
        log.sync().map_err(LogError::io("sync segment", &self.log_path))?;
        self.offsets.write_out()?;
        self.times.write_out()
    }

    /// Cuts the segment at byte `pos`, where the batch at `offset` starts, and syncs the cut
    /// (so appends after it never land on a file that a crash could lengthen again). Index
    /// entries from `offset` on and damaged spans after it are dropped.
    pub(crate) fn truncate(&mut self, pos: u64, offset: u64) -> Result<(), LogError> {
        // The ordinal of the first batch cut is the number kept (read before the entries go).
        let batches = match offset < self.next_offset {
            true => self.locate_offset(offset)?.0,
            false => self.batches,
        };
        let log = self.log()?;
        log.truncate(pos).map_err(LogError::io("truncate segment", &self.log_path))?;
        log.sync().map_err(LogError::io("sync segment", &self.log_path))?;
        let rel = u32::try_from(offset - self.base).unwrap_or(u32::MAX);
        self.offsets.truncate_from(rel);
        self.times.truncate_from(rel);
        self.damaged.retain(|d| d.offsets.end <= offset);
        (self.size, self.next_offset, self.batches) = (pos, offset, batches);
        // The running max timestamp: the last time entry covers every batch up to the last
        // offset entry (they are pushed together); the batches after it are read.
        self.max_timestamp = self.times.last().map_or(i64::MIN, |t| t.max_ts);
        if pos == 0 {
            self.roll_base_ms = None;
            return Ok(());
        }
        let from = self.offsets.last().copied().unwrap_or_default();
        let mut max_ts = self.max_timestamp;
        let walker = self.walker(Check::Headers)?;
        walker.run(u64::from(from.pos), self.base + u64::from(from.rel), pos, |at| {
            max_ts = max_ts.max(at.header.max_timestamp);
            true
        })?;
        self.max_timestamp = max_ts;
        Ok(())
    }

    /// Reads and checks the header of the batch at `pos`, which must lie within `size`.
    pub(crate) fn read_header(&self, pos: u64) -> Result<BatchHeader, LogError> {
        let left = self.size.saturating_sub(pos);
        if left < BATCH_HEADER_BYTES as u64 {
            return Err(self.corrupt(pos, format!("{left} bytes left, no batch header")));
        }
        let mut buf = [0u8; BATCH_HEADER_BYTES];
        self.log()?.read_exact_at(pos, &mut buf).map_err(LogError::io("read", &self.log_path))?;
        let header = BatchHeader::parse(&buf).map_err(|e| self.corrupt(pos, e.to_string()))?;
        if header.total_len() as u64 > left {
            return Err(self.corrupt(pos, format!("batch of {} bytes, {left} left", header.total_len())));
        }
        Ok(header)
    }

    /// `entry` (an offset-index entry) and the header of the batch at its position, if that
    /// batch is the one the entry names (based at `base + rel`); else the nearest entry before
    /// it that does, down to the first (position 0). A closed segment's entries come from its
    /// index file, and a damaged entry can pass the open's checks (increasing, within the
    /// segment) yet point elsewhere: passing over it keeps intact batches readable, at the cost
    /// of a longer header walk. Logged once per segment and counted
    /// (`quiver_corrupt_batches_total{found_by="index"}`). IO errors are returned as they are.
    fn checked_entry(&self, mut entry: OffsetEntry) -> Result<(OffsetEntry, BatchHeader), LogError> {
        loop {
            let found = match self.read_header(u64::from(entry.pos)) {
                Ok(header) if header.base_offset == self.base + u64::from(entry.rel) => {
                    return Ok((entry, header))
                }
                Ok(header) => format!("a batch based at {}", header.base_offset),
                Err(err @ LogError::Io { .. }) => return Err(err),
                Err(err) if entry == OffsetEntry::default() => return Err(err),
                Err(err) => err.to_string(),
            };
            if entry == OffsetEntry::default() {
                let reason = format!("the first batch is {found}, not the segment's base {}", self.base);
                return Err(self.corrupt(0, reason));
            }
            if !self.bad_index_entry.swap(true, std::sync::atomic::Ordering::Relaxed) {
                metrics::counter!("quiver_corrupt_batches_total", "found_by" => "index").increment(1);
                tracing::error!(segment = %self.log_path.display(), entry = ?entry, %found, "an offset index entry does not point at its batch; lookups walk from the entry before it");
            }
            // The segment's first batch is at position 0 whatever its entry says.
            entry = match entry.rel.checked_sub(1) {
                Some(rel) => self.offsets.floor(rel),
                None => OffsetEntry::default(),
            };
        }
    }

    /// Position and header of the batch holding `offset` (which must be in this segment):
    /// from the nearest index entry, header by header.
    pub(crate) fn find_batch(&self, offset: u64) -> Result<(u64, BatchHeader), LogError> {
        let rel = u32::try_from(offset.saturating_sub(self.base)).unwrap_or(u32::MAX);
        let (from, mut header) = self.checked_entry(self.offsets.floor(rel))?;
        let mut pos = u64::from(from.pos);
        while header.next_offset() <= offset {
            pos += header.total_len() as u64;
            header = self.read_header(pos)?;
        }
        Ok((pos, header))
    }

    /// The relative ordinal (from `base_ordinal`) of what holds `offset` (in
    /// `base..next_offset`), and where that starts: a batch, from the nearest index entry
    /// header by header, or a damaged span.
    pub(crate) fn locate_offset(&self, offset: u64) -> Result<(u64, u64), LogError> {
        if let Some(d) = self.damage_at(offset) {
            return Ok((self.damage_ordinal(d), d.offsets.start));
        }
        let rel = u32::try_from(offset.saturating_sub(self.base)).unwrap_or(u32::MAX);
        // No damaged span lies between the entry and `offset`: the first batch after one
        // always has an entry of its own.
        let (from, mut header) = self.checked_entry(self.offsets.floor(rel))?;
        let (mut pos, mut ord) = (u64::from(from.pos), u64::from(from.ord));
        while header.next_offset() <= offset {
            pos += header.total_len() as u64;
            ord += 1;
            header = self.read_header(pos)?;
        }
        Ok((ord, header.base_offset))
    }

    /// The base offset of what has relative ordinal `ord` (below `batches`): a batch, found
    /// from the nearest index entry at or before it header by header, or a damaged span.
    pub(crate) fn locate_ordinal(&self, ord: u64) -> Result<u64, LogError> {
        for d in self.damaged.iter().filter(|d| !d.offsets.is_empty()) {
            if self.damage_ordinal(d) == ord {
                return Ok(d.offsets.start);
            }
        }
        // As in `locate_offset`, the walk never crosses a damaged span: the batch after one has
        // an entry, whose ordinal is at most `ord` if the span's is below it.
        let (from, mut header) = self.checked_entry(self.offsets.floor_ordinal(ord))?;
        let (mut pos, mut at) = (u64::from(from.pos), u64::from(from.ord));
        while at < ord {
            pos += header.total_len() as u64;
            at += 1;
            header = self.read_header(pos)?;
        }
        Ok(header.base_offset)
    }

    /// The relative ordinal of a (non-empty) damaged span: one before the batch after it,
    /// which has an index entry, or the last one if nothing follows it.
    fn damage_ordinal(&self, d: &DamagedSpan) -> u64 {
        let rel = u32::try_from(d.offsets.end - self.base).unwrap_or(u32::MAX);
        match self.offsets.entry_at(rel).filter(|_| d.offsets.end < self.next_offset) {
            Some(e) => u64::from(e.ord).saturating_sub(1),
            None => self.batches.saturating_sub(1),
        }
    }

    /// Base offset of the first batch whose max timestamp is at least `ts`, if any.
    pub(crate) fn offset_for_timestamp(&self, ts: i64) -> Result<Option<u64>, LogError> {
        if self.max_timestamp < ts {
            return Ok(None);
        }
        // Every batch up to the last time entry below `ts` is older than `ts`; scan from there.
        let rel = self.times.last_before(ts).map_or(0, |e| e.rel);
        let mut pos = u64::from(self.checked_entry(self.offsets.floor(rel))?.0.pos);
        while pos < self.size {
            let header = self.read_header(pos)?;
            if header.max_timestamp >= ts {
                return Ok(Some(header.base_offset));
            }
            pos += header.total_len() as u64;
        }
        Ok(None)
    }

    /// A scanner over this segment's file that does not borrow the segment, so the callback
    /// of [`Walker::run`] may update it.
    pub(crate) fn walker(&self, check: Check) -> Result<Walker, LogError> {
        Ok(Walker { log: self.log()?, path: self.log_path.clone(), base: self.base, check, epochs: None })
    }

    /// Forgets everything in memory about the segment's content (before a rebuild).
    pub(crate) fn reset(&mut self) {
        self.offsets.set_entries(Vec::new());
        self.times.set_entries(Vec::new());
        self.size = 0;
        self.next_offset = self.base;
        self.batches = 0;
        self.max_timestamp = i64::MIN;
        self.damaged.clear();
    }

    /// The damaged span holding `offset`, if recovery found one.
    pub(crate) fn damage_at(&self, offset: u64) -> Option<&DamagedSpan> {
        self.damaged.iter().find(|d| d.offsets.contains(&offset))
    }

    /// A [`LogError::Corrupt`] for this segment.
    pub(crate) fn corrupt(&self, position: u64, reason: impl Into<String>) -> LogError {
        LogError::Corrupt { path: self.log_path.clone(), position, reason: reason.into() }
    }
}

/// Scans a segment file batch by batch (recovery and index rebuilds).
#[derive(Debug)]
pub(crate) struct Walker {
    log: Arc<dyn StorageFile>,
    path: PathBuf,
    base: u64,
    check: Check,
    /// The epoch record batches are checked against, if one is trusted.
    epochs: Option<Arc<Epochs>>,
}

impl Walker {
    /// Checks every batch's leader epoch against `epochs` too (when given): a batch whose epoch
    /// is not the one in force at its offset is a defect, as a bad CRC is, and never a place
    /// where valid data resumes. Not for a walk that builds the record from the batches.
    pub(crate) fn expecting(mut self, epochs: Option<Arc<Epochs>>) -> Walker {
        self.epochs = epochs;
        self
    }

    /// The segment file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A defect if `header`'s epoch contradicts the record (offsets the record does not cover
    /// are not checked).
    fn epoch_defect(&self, header: &BatchHeader) -> Option<TailDefect> {
        let expected = self.epochs.as_ref()?.epoch_at(header.base_offset)?;
        (expected != header.leader_epoch)
            .then_some(TailDefect::EpochMismatch { expected, found: header.leader_epoch })
    }

    /// Walks the batches from `pos` (a batch boundary holding `offset`) to `end`, calling
    /// `on_batch` for each good one, and stops at the first defect, or early (with no defect)
    /// when `on_batch` returns false.
    pub(crate) fn run(
        &self,
        mut pos: u64,
        mut offset: u64,
        end: u64,
        mut on_batch: impl FnMut(BatchAt) -> bool,
    ) -> Result<ScanEnd, LogError> {
        let mut buf = Vec::new();
        while pos < end {
            match self.next_batch(pos, offset, end, &mut buf)? {
                Ok(at) => {
                    pos += at.header.total_len() as u64;
                    offset = at.header.next_offset();
                    if !on_batch(at) {
                        break;
                    }
                }
                Err(defect) => return Ok(ScanEnd { pos, next_offset: offset, defect: Some(defect) }),
            }
        }
        Ok(ScanEnd { pos, next_offset: offset, defect: None })
    }

    /// The first position from `from` (before `end`) holding a whole batch with a valid CRC
    /// and a base offset from `min_offset` on that the segment can index, with its header:
    /// where valid data resumes after damage at `from`. The end of the damaged batch as its
    /// header says is tried first (a flipped bit usually leaves the length intact); then every
    /// position, in bounded windows.
    pub(crate) fn resync(&self, from: u64, min_offset: u64, end: u64) -> Result<Option<BatchAt>, LogError> {
        let mut buf = Vec::new();
        if from >= end {
            return Ok(None);
        }
        // A whole valid batch at `from` itself can only have failed the scan by starting past
        // the expected offset: offsets are missing, no bytes are damaged.
        if let Some(at) = self.valid_batch_at(from, min_offset, end, &mut buf)? {
            return Ok(Some(at));
        }
        let mut head = [0u8; BATCH_HEADER_BYTES];
        let hint = match end - from >= BATCH_HEADER_BYTES as u64 {
            true => {
                self.log.read_exact_at(from, &mut head).map_err(LogError::io("read", &self.path))?;
                BatchHeader::parse(&head).ok().map(|h| from + h.total_len() as u64)
            }
            false => None,
        };
        if let Some(pos) = hint.filter(|&p| p > from && p < end) {
            if let Some(at) = self.valid_batch_at(pos, min_offset, end, &mut buf)? {
                return Ok(Some(at));
            }
        }
        const WINDOW: u64 = 64 * 1024;
        let mut window = Vec::new();
        let mut start = from + 1;
        while start + BATCH_HEADER_BYTES as u64 <= end {
            let len = (WINDOW + BATCH_HEADER_BYTES as u64).min(end - start);
            window.resize(len as usize, 0);
            self.log.read_exact_at(start, &mut window).map_err(LogError::io("read", &self.path))?;
            let candidates = window.len().saturating_sub(BATCH_HEADER_BYTES - 1).min(WINDOW as usize);
            for i in 0..candidates {
                // The magic byte first: a cheap filter before a header parse.
                if window[i + MAGIC_AT] != 2 {
                    continue;
                }
                let pos = start + i as u64;
                if let Some(at) = self.valid_batch_at(pos, min_offset, end, &mut buf)? {
                    return Ok(Some(at));
                }
            }
            start += candidates as u64;
        }
        Ok(None)
    }

    /// The batch at `pos` if it is whole, has a valid CRC and a base offset from `min_offset`
    /// on that the segment can index.
    fn valid_batch_at(
        &self,
        pos: u64,
        min_offset: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<BatchAt>, LogError> {
        if end - pos < BATCH_HEADER_BYTES as u64 {
            return Ok(None);
        }
        let mut head = [0u8; BATCH_HEADER_BYTES];
        self.log.read_exact_at(pos, &mut head).map_err(LogError::io("read", &self.path))?;
        let Ok(header) = BatchHeader::parse(&head) else { return Ok(None) };
        if header.base_offset < min_offset || header.total_len() as u64 > end - pos {
            return Ok(None);
        }
        let Some(at) = BatchAt::new(self.base, pos, header) else { return Ok(None) };
        if self.epoch_defect(&header).is_some() {
            return Ok(None);
        }
        buf.resize(header.total_len(), 0);
        self.log.read_exact_at(pos, buf).map_err(LogError::io("read", &self.path))?;
        Ok(batch::verify_crc(buf, &header).is_ok().then_some(at))
    }

    /// Checks the batch at `pos`. `Err` is an IO failure, `Ok(Err)` a defect in the bytes.
    fn next_batch(
        &self,
        pos: u64,
        expected: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Result<BatchAt, TailDefect>, LogError> {
        let have = end - pos;
        if have < BATCH_HEADER_BYTES as u64 {
            return Ok(Err(TailDefect::PartialHeader { have }));
        }
        let mut head = [0u8; BATCH_HEADER_BYTES];
        self.log.read_exact_at(pos, &mut head).map_err(LogError::io("read", &self.path))?;
        let header = match BatchHeader::parse(&head) {
            Ok(header) => header,
            Err(err) => return Ok(Err(TailDefect::BadHeader(err))),
        };
        // `parse` bounded the length by MAX_BATCH_BYTES; now bound it by the file.
        let len = header.total_len() as u64;
        if len > have {
            return Ok(Err(TailDefect::PastEnd { len, have }));
        }
        if header.base_offset != expected {
            return Ok(Err(TailDefect::OffsetMismatch { expected, found: header.base_offset }));
        }
        let Some(at) = BatchAt::new(self.base, pos, header) else {
            return Ok(Err(TailDefect::TooLarge));
        };
        if let Some(defect) = self.epoch_defect(&header) {
            return Ok(Err(defect));
        }
        if self.check == Check::Crc {
            buf.resize(header.total_len(), 0);
            self.log.read_exact_at(pos, buf).map_err(LogError::io("read", &self.path))?;
            if let Err(err) = batch::verify_crc(buf, &header) {
                return Ok(Err(TailDefect::Crc(err)));
            }
        }
        Ok(Ok(at))
    }
}
