//! The sparse offset and time indexes of one segment (docs/design.md §5.2).
//!
//! Both files are a 16-byte header (`magic`, `u16 version = 1`, `u16 reserved`, `u64 base
//! offset`, little-endian) and fixed-size little-endian entries. The entries are also kept in a
//! `Vec`, which is what lookups use; the file only saves a scan of the segment at start-up.
//! Indexes are never the truth: a file that fails any check here is rebuilt from the log.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::storage::{Storage, StorageFile};

use super::LogError;

/// Bytes of the header of both index files.
pub(crate) const INDEX_HEADER_BYTES: usize = 16;
const INDEX_VERSION: u16 = 1;

/// One fixed-size entry of an index file.
pub(crate) trait IndexEntry: Copy + fmt::Debug + PartialEq {
    /// First four bytes of the file.
    const MAGIC: [u8; 4];
    /// Encoded size of one entry.
    const BYTES: usize;
    /// Appends the little-endian encoding.
    fn encode(&self, out: &mut Vec<u8>);
    /// Decodes exactly `Self::BYTES` bytes.
    fn decode(bytes: &[u8; 12]) -> Self;
    /// Offset of the batch this entry points at, relative to the segment base.
    fn rel(&self) -> u32;
    /// Whether `self` may follow `prev` (entries are strictly increasing).
    fn follows(&self, prev: &Self) -> bool;
    /// Whether the entry points inside a segment of `log_len` bytes spanning `span` offsets.
    fn within(&self, log_len: u64, span: u64) -> bool;
}

/// Offset index entry: the batch whose base offset is `base + rel` starts at byte `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub(crate) rel: u32,
    pub(crate) pos: u32,
}

/// Time index entry: every batch up to and including the one based at `base + rel` has a max
/// timestamp of at most `max_ts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub(crate) max_ts: i64,
    pub(crate) rel: u32,
}

fn le_u32(b: &[u8; 12], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl IndexEntry for OffsetEntry {
    const MAGIC: [u8; 4] = *b"QVIX";
    const BYTES: usize = 8;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.rel.to_le_bytes());
        out.extend_from_slice(&self.pos.to_le_bytes());
    }
    fn decode(b: &[u8; 12]) -> Self {
        OffsetEntry { rel: le_u32(b, 0), pos: le_u32(b, 4) }
    }
    fn rel(&self) -> u32 {
        self.rel
    }
    fn follows(&self, prev: &Self) -> bool {
        self.rel > prev.rel && self.pos > prev.pos
    }
    fn within(&self, log_len: u64, span: u64) -> bool {
        u64::from(self.pos) < log_len && u64::from(self.rel) < span
    }
}

impl IndexEntry for TimeEntry {
    const MAGIC: [u8; 4] = *b"QVTI";
    const BYTES: usize = 12;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.max_ts.to_le_bytes());
        out.extend_from_slice(&self.rel.to_le_bytes());
    }
    fn decode(b: &[u8; 12]) -> Self {
        let ts = [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
        TimeEntry { max_ts: i64::from_le_bytes(ts), rel: le_u32(b, 8) }
    }
    fn rel(&self) -> u32 {
        self.rel
    }
    fn follows(&self, prev: &Self) -> bool {
        self.rel > prev.rel && self.max_ts > prev.max_ts
    }
    fn within(&self, _log_len: u64, span: u64) -> bool {
        u64::from(self.rel) < span
    }
}

/// Why an index file was not usable as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum IndexDefect {
    /// Shorter than its header.
    #[error("{0} bytes, shorter than the 16-byte header")]
    TooShort(u64),
    /// Longer than a segment of this size could need; not read.
    #[error("{len} bytes, more than the {max} a segment of this size can need")]
    TooLong {
        /// File length.
        len: u64,
        /// Largest plausible length.
        max: u64,
    },
    /// Wrong magic, version or base offset in the header.
    #[error("bad header")]
    BadHeader,
    /// The entries do not end on an entry boundary.
    #[error("partial entry at the end")]
    PartialEntry,
    /// Entry `0` is not (0, 0), or a non-empty segment has no entry.
    #[error("does not index the first batch")]
    MissingFirst,
    /// Entry `index` is not greater than the one before.
    #[error("entry {0} does not increase")]
    NotIncreasing(usize),
    /// Entry `index` points past the end of the segment.
    #[error("entry {0} points past the segment")]
    PastEnd(usize),
    /// The file could not be read.
    #[error("unreadable: {0}")]
    Unreadable(String),
}

/// An index file plus its entries in memory. The file is opened only while it is written or
/// read, so an index costs no file descriptor at rest.
#[derive(Debug)]
pub(crate) struct IndexFile<E> {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    /// Open while in use: between a load or write and the next [`release`](Self::release).
    file: parking_lot::Mutex<Option<Arc<dyn StorageFile>>>,
    base: u64,
    entries: Vec<E>,
    /// An append to the file failed, so the file no longer matches `entries`; it is rewritten
    /// before the next sync.
    stale: bool,
}

impl<E: IndexEntry> IndexFile<E> {
    /// An index at `path` with no entries in memory; the file is not opened (nor created) yet.
    pub(crate) fn open(storage: &Arc<dyn Storage>, path: PathBuf, base: u64) -> Result<Self, LogError> {
        Ok(IndexFile {
            path,
            storage: storage.clone(),
            file: parking_lot::Mutex::new(None),
            base,
            entries: Vec::new(),
            stale: false,
        })
    }

    /// Closes the file; lookups keep working from memory, and a later write reopens it.
    pub(crate) fn release(&mut self) {
        *self.file.get_mut() = None;
    }

    /// The file, opened (and created empty if missing) on first use.
    fn file(&self) -> io::Result<Arc<dyn StorageFile>> {
        let mut slot = self.file.lock();
        if let Some(f) = &*slot {
            return Ok(f.clone());
        }
        let f = self.storage.open(&self.path)?;
        *slot = Some(f.clone());
        Ok(f)
    }

    /// Reads and checks the file against a segment of `log_len` bytes spanning `span` offsets.
    /// Does not change `self`.
    pub(crate) fn load(&self, log_len: u64, span: u64) -> Result<Vec<E>, IndexDefect> {
        let file = self.file().map_err(|e| IndexDefect::Unreadable(e.to_string()))?;
        let len = file.len().map_err(|e| IndexDefect::Unreadable(e.to_string()))?;
        // Each entry names a distinct batch, so a longer file cannot be ours: check before
        // allocating anything from a length found on disk.
        let max_entries = log_len / quiver_protocol::batch::BATCH_HEADER_BYTES as u64 + 1;
        let max = INDEX_HEADER_BYTES as u64 + max_entries * E::BYTES as u64;
        if len > max {
            return Err(IndexDefect::TooLong { len, max });
        }
        if len < INDEX_HEADER_BYTES as u64 {
            return Err(IndexDefect::TooShort(len));
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(0, &mut bytes).map_err(|e| IndexDefect::Unreadable(e.to_string()))?;
        decode_entries(&bytes, self.base, log_len, span)
    }

    /// Last entry, if any.
    pub(crate) fn last(&self) -> Option<&E> {
        self.entries.last()
    }

    /// The entries in memory.
    pub(crate) fn entries(&self) -> &[E] {
        &self.entries
    }

    /// Drops the entries in memory from relative offset `rel` on (a truncation; the file is
    /// rewritten when the segment is sealed, and the active segment's file is never read).
    pub(crate) fn truncate_from(&mut self, rel: u32) {
        let keep = self.entries.partition_point(|e| e.rel() < rel);
        self.entries.truncate(keep);
    }

    /// Replaces the entries in memory without touching the file.
    pub(crate) fn set_entries(&mut self, entries: Vec<E>) {
        self.entries = entries;
    }

    /// Adds an entry in memory and, if `write`, at the end of the file. A failed file write is
    /// not an error of the append that caused it (the index is an optimisation): the file is
    /// marked stale and rewritten before the next sync.
    pub(crate) fn push(&mut self, entry: E, write: bool) {
        self.entries.push(entry);
        if !write || self.stale {
            return;
        }
        let mut buf = Vec::with_capacity(E::BYTES);
        entry.encode(&mut buf);
        if let Err(err) = self.file().and_then(|f| f.append(&buf)) {
            tracing::warn!(path = %self.path.display(), %err, "index append failed; will rewrite it");
            self.stale = true;
        }
    }

    /// Writes the header and every entry in memory over the file's previous content.
    pub(crate) fn rewrite(&mut self) -> Result<(), LogError> {
        let bytes = encode_file::<E>(self.base, &self.entries);
        let file = self.file().map_err(LogError::io("truncate index", &self.path))?;
        file.truncate(0).map_err(LogError::io("truncate index", &self.path))?;
        file.append(&bytes).map_err(LogError::io("write index", &self.path))?;
        self.stale = false;
        Ok(())
    }

    /// Writes every entry in memory over the file, makes it durable and closes it (a segment
    /// that stops being the active one).
    pub(crate) fn write_out(&mut self) -> Result<(), LogError> {
        self.rewrite()?;
        self.sync()?;
        self.release();
        Ok(())
    }

    /// Makes the file durable, rewriting it first if an append failed.
    pub(crate) fn sync(&mut self) -> Result<(), LogError> {
        if self.stale {
            self.rewrite()?;
        }
        self.file().and_then(|f| f.sync()).map_err(LogError::io("sync index", &self.path))
    }

    /// Path of the file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl IndexFile<OffsetEntry> {
    /// The last entry at or before relative offset `rel`: where a scan for it starts.
    pub(crate) fn floor(&self, rel: u32) -> OffsetEntry {
        let n = self.entries.partition_point(|e| e.rel <= rel);
        n.checked_sub(1).and_then(|i| self.entries.get(i).copied()).unwrap_or(OffsetEntry { rel: 0, pos: 0 })
    }
}

impl IndexFile<TimeEntry> {
    /// The last entry whose `max_ts` is below `ts`: every batch up to it is older than `ts`.
    pub(crate) fn last_before(&self, ts: i64) -> Option<TimeEntry> {
        let n = self.entries.partition_point(|e| e.max_ts < ts);
        n.checked_sub(1).and_then(|i| self.entries.get(i).copied())
    }
}

/// The whole file for `entries`.
fn encode_file<E: IndexEntry>(base: u64, entries: &[E]) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_BYTES + entries.len() * E::BYTES);
    out.extend_from_slice(&E::MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&base.to_le_bytes());
    for entry in entries {
        entry.encode(&mut out);
    }
    out
}

/// Checks a whole index file (header and entries) and decodes its entries.
fn decode_entries<E: IndexEntry>(
    bytes: &[u8],
    base: u64,
    log_len: u64,
    span: u64,
) -> Result<Vec<E>, IndexDefect> {
    let (header, body) =
        bytes.split_at_checked(INDEX_HEADER_BYTES).ok_or(IndexDefect::TooShort(bytes.len() as u64))?;
    if header != encode_file::<E>(base, &[]).as_slice() {
        return Err(IndexDefect::BadHeader);
    }
    if body.len() % E::BYTES != 0 {
        return Err(IndexDefect::PartialEntry);
    }
    let mut entries: Vec<E> = Vec::with_capacity(body.len() / E::BYTES);
    for (i, chunk) in body.chunks_exact(E::BYTES).enumerate() {
        let mut raw = [0u8; 12];
        raw[..E::BYTES].copy_from_slice(chunk);
        let entry = E::decode(&raw);
        if !entry.within(log_len, span) {
            return Err(IndexDefect::PastEnd(i));
        }
        if entries.last().is_some_and(|prev| !entry.follows(prev)) {
            return Err(IndexDefect::NotIncreasing(i));
        }
        entries.push(entry);
    }
    match entries.first() {
        // The first batch is always indexed, and only a segment without batches has no entry.
        Some(first) if first.rel() != 0 => Err(IndexDefect::MissingFirst),
        None if log_len > 0 => Err(IndexDefect::MissingFirst),
        _ => Ok(entries),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const BASE: u64 = 1000;

    fn offsets(entries: &[(u32, u32)]) -> Vec<OffsetEntry> {
        entries.iter().map(|&(rel, pos)| OffsetEntry { rel, pos }).collect()
    }

    fn file_for<E: IndexEntry>(entries: &[E]) -> Vec<u8> {
        encode_file(BASE, entries)
    }

    #[test]
    fn header_layout_is_as_specified() {
        let bytes = file_for(&offsets(&[(0, 0), (3, 4100)]));
        assert_eq!(&bytes[0..4], b"QVIX");
        assert_eq!(&bytes[4..6], &[1, 0]);
        assert_eq!(&bytes[6..8], &[0, 0]);
        assert_eq!(&bytes[8..16], &BASE.to_le_bytes());
        assert_eq!(&bytes[16..24], &[0; 8]);
        assert_eq!(&bytes[24..28], &3u32.to_le_bytes());
        assert_eq!(&bytes[28..32], &4100u32.to_le_bytes());
        let times = file_for(&[TimeEntry { max_ts: -5, rel: 0 }]);
        assert_eq!(&times[0..4], b"QVTI");
        assert_eq!(&times[16..24], &(-5i64).to_le_bytes());
        assert_eq!(times.len(), 16 + 12);
    }

    #[test]
    fn valid_files_round_trip() {
        let entries = offsets(&[(0, 0), (3, 4100), (9, 9000)]);
        assert_eq!(decode_entries(&file_for(&entries), BASE, 10_000, 20), Ok(entries));
        let times = vec![TimeEntry { max_ts: 5, rel: 0 }, TimeEntry { max_ts: 9, rel: 4 }];
        assert_eq!(decode_entries(&file_for(&times), BASE, 10_000, 20), Ok(times));
        assert_eq!(decode_entries::<OffsetEntry>(&file_for::<OffsetEntry>(&[]), BASE, 0, 0), Ok(vec![]));
    }

    #[test]
    fn every_defect_is_detected() {
        let good = file_for(&offsets(&[(0, 0), (3, 4100)]));
        let check = |bytes: &[u8]| decode_entries::<OffsetEntry>(bytes, BASE, 10_000, 20);
        assert_eq!(check(&good[..10]), Err(IndexDefect::TooShort(10)));
        assert_eq!(check(&good[..good.len() - 1]), Err(IndexDefect::PartialEntry));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(check(&magic), Err(IndexDefect::BadHeader));
        let mut version = good.clone();
        version[4] = 2;
        assert_eq!(check(&version), Err(IndexDefect::BadHeader));
        assert_eq!(decode_entries::<OffsetEntry>(&good, BASE + 1, 10_000, 20), Err(IndexDefect::BadHeader));
        assert_eq!(check(&file_for(&offsets(&[(0, 0), (3, 20_000)]))), Err(IndexDefect::PastEnd(1)));
        assert_eq!(check(&file_for(&offsets(&[(0, 0), (30, 200)]))), Err(IndexDefect::PastEnd(1)));
        assert_eq!(
            check(&file_for(&offsets(&[(0, 0), (3, 100), (3, 200)]))),
            Err(IndexDefect::NotIncreasing(2))
        );
        assert_eq!(check(&file_for(&offsets(&[(1, 0)]))), Err(IndexDefect::MissingFirst));
        assert_eq!(check(&file_for::<OffsetEntry>(&[])), Err(IndexDefect::MissingFirst));
        let times = [TimeEntry { max_ts: 5, rel: 0 }, TimeEntry { max_ts: 5, rel: 4 }];
        assert_eq!(
            decode_entries::<TimeEntry>(&file_for(&times), BASE, 10_000, 20),
            Err(IndexDefect::NotIncreasing(1))
        );
    }

    #[test]
    fn load_refuses_implausible_lengths_before_reading() -> Result<(), LogError> {
        let storage: Arc<dyn crate::storage::Storage> = Arc::new(MemStorage::new());
        let dir = Path::new("/p");
        storage.create_dir_all(dir).map_err(LogError::io("mkdir", dir))?;
        let mut index = IndexFile::<OffsetEntry>::open(&storage, dir.join("i"), BASE)?;
        index.rewrite()?;
        for i in 0..10 {
            index.push(OffsetEntry { rel: i, pos: i * 100 }, true);
        }
        // 10 entries cannot belong to a 200-byte segment (at most 4 batches).
        assert!(matches!(index.load(200, 10), Err(IndexDefect::TooLong { .. })));
        assert_eq!(index.load(1000, 10).map(|e| e.len()), Ok(10));
        Ok(())
    }

    #[test]
    fn lookups() -> Result<(), LogError> {
        let storage: Arc<dyn crate::storage::Storage> = Arc::new(MemStorage::new());
        storage.create_dir_all(Path::new("/p")).map_err(LogError::io("mkdir", Path::new("/p")))?;
        let mut index = IndexFile::<OffsetEntry>::open(&storage, PathBuf::from("/p/i"), 0)?;
        index.set_entries(offsets(&[(0, 0), (10, 5000), (20, 10_000)]));
        assert_eq!(index.floor(0), OffsetEntry { rel: 0, pos: 0 });
        assert_eq!(index.floor(15), OffsetEntry { rel: 10, pos: 5000 });
        assert_eq!(index.floor(99), OffsetEntry { rel: 20, pos: 10_000 });
        Ok(())
    }
}
