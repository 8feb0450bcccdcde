//! The sparse offset and time indexes of one segment (docs/design.md §5.2).
//!
//! Both files are a header (`magic`, `u16 version`, `u16 reserved`, `u64 base offset`, and for
//! the offset index since version 2 a `u64 base ordinal`, little-endian) and fixed-size
//! little-endian entries. The entries are also kept in a `Vec`, which is what lookups use; the
//! file only saves a scan of the segment at start-up. Indexes are never the truth: a file that
//! fails any check here is rebuilt from the log. A version-1 offset index (no ordinals) is
//! rebuilt too, once, and written back as version 2.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::storage::{Storage, StorageFile};

use super::LogError;

/// Bytes of the header of the time index and of a version-1 offset index.
pub(crate) const INDEX_HEADER_BYTES: usize = 16;
/// Bytes of the header of a version-2 offset index (with the segment's base ordinal).
pub(crate) const OFFSET_INDEX_HEADER_BYTES: usize = 24;

/// One fixed-size entry of an index file.
pub(crate) trait IndexEntry: Copy + fmt::Debug + PartialEq {
    /// First four bytes of the file.
    const MAGIC: [u8; 4];
    /// The version written (the only one read).
    const VERSION: u16;
    /// Bytes of the header: whether it carries the segment's base ordinal after the base offset.
    const HEADER_BYTES: usize;
    /// Encoded size of one entry.
    const BYTES: usize;
    /// Appends the little-endian encoding.
    fn encode(&self, out: &mut Vec<u8>);
    /// Decodes exactly `Self::BYTES` bytes.
    fn decode(bytes: &[u8; 12]) -> Self;
    /// Offset of the batch this entry points at, relative to the segment base.
    fn rel(&self) -> u32;
    /// Whether this is what the entry for a segment's first batch must be.
    fn is_first(&self) -> bool;
    /// Whether `self` may follow `prev` (entries are strictly increasing).
    fn follows(&self, prev: &Self) -> bool;
    /// Whether the entry points inside a segment of `log_len` bytes spanning `span` offsets.
    fn within(&self, log_len: u64, span: u64) -> bool;
}

/// Offset index entry: the batch whose base offset is `base + rel` starts at byte `pos`, and
/// its ordinal is the segment's base ordinal + `ord` (design.md §5.7). `ord <= rel`: every
/// batch holds at least one offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct OffsetEntry {
    pub(crate) rel: u32,
    pub(crate) pos: u32,
    pub(crate) ord: u32,
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
    const VERSION: u16 = 2;
    const HEADER_BYTES: usize = OFFSET_INDEX_HEADER_BYTES;
    const BYTES: usize = 12;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.rel.to_le_bytes());
        out.extend_from_slice(&self.pos.to_le_bytes());
        out.extend_from_slice(&self.ord.to_le_bytes());
    }
    fn decode(b: &[u8; 12]) -> Self {
        OffsetEntry { rel: le_u32(b, 0), pos: le_u32(b, 4), ord: le_u32(b, 8) }
    }
    fn rel(&self) -> u32 {
        self.rel
    }
    fn is_first(&self) -> bool {
        *self == OffsetEntry::default()
    }
    fn follows(&self, prev: &Self) -> bool {
        self.rel > prev.rel && self.pos > prev.pos && self.ord > prev.ord
    }
    fn within(&self, log_len: u64, span: u64) -> bool {
        u64::from(self.pos) < log_len && u64::from(self.rel) < span && self.ord <= self.rel
    }
}

impl IndexEntry for TimeEntry {
    const MAGIC: [u8; 4] = *b"QVTI";
    const VERSION: u16 = 1;
    const HEADER_BYTES: usize = INDEX_HEADER_BYTES;
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
    fn is_first(&self) -> bool {
        self.rel == 0
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
    /// A version-1 offset index, written before ordinals existed: its entries carry none.
    #[error("version 1, without ordinals")]
    OldVersion,
    /// The entries do not end on an entry boundary.
    #[error("partial entry at the end")]
    PartialEntry,
    /// Entry `0` is not (0, 0, 0), or a non-empty segment has no entry.
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
    /// Ordinal of the segment's first batch, written in the header of an offset index (the time
    /// index has no such field and ignores it).
    base_ordinal: u64,
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
            base_ordinal: 0,
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

    /// Reads and checks the file against a segment of `log_len` bytes spanning `span` offsets:
    /// its entries and, for an offset index, the base ordinal in its header. Does not change
    /// `self`.
    pub(crate) fn load(&self, log_len: u64, span: u64) -> Result<(Vec<E>, u64), IndexDefect> {
        let file = self.file().map_err(|e| IndexDefect::Unreadable(e.to_string()))?;
        let len = file.len().map_err(|e| IndexDefect::Unreadable(e.to_string()))?;
        // Each entry names a distinct batch, so a longer file cannot be ours: check before
        // allocating anything from a length found on disk.
        let max_entries = log_len / quiver_protocol::batch::BATCH_HEADER_BYTES as u64 + 1;
        let max = E::HEADER_BYTES as u64 + max_entries * E::BYTES as u64;
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

    /// The base ordinal in the file's header, if the file has a whole version-2 header for
    /// this segment (whatever follows it): what survives of an index whose entries are
    /// damaged, and how the active segment's base ordinal is kept (its header is written when
    /// the segment is created, design.md §5.2). Reads the header only.
    pub(crate) fn header_ordinal(&self) -> Option<u64> {
        let file = self.file().ok()?;
        if file.len().ok()? < E::HEADER_BYTES as u64 {
            return None;
        }
        let mut header = vec![0u8; E::HEADER_BYTES];
        file.read_exact_at(0, &mut header).ok()?;
        decode_header::<E>(&header, self.base).ok().flatten()
    }

    /// Ordinal of the segment's first batch, as written in the header.
    pub(crate) fn set_base_ordinal(&mut self, ordinal: u64) {
        self.base_ordinal = ordinal;
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
        let bytes = encode_file::<E>(self.base, self.base_ordinal, &self.entries);
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
        n.checked_sub(1).and_then(|i| self.entries.get(i).copied()).unwrap_or_default()
    }

    /// The last entry at or before relative ordinal `ord`: where a scan for it starts.
    pub(crate) fn floor_ordinal(&self, ord: u64) -> OffsetEntry {
        let n = self.entries.partition_point(|e| u64::from(e.ord) <= ord);
        n.checked_sub(1).and_then(|i| self.entries.get(i).copied()).unwrap_or_default()
    }

    /// The entry for the batch at relative offset `rel`, if it has one.
    pub(crate) fn entry_at(&self, rel: u32) -> Option<OffsetEntry> {
        self.entries.binary_search_by_key(&rel, |e| e.rel).ok().and_then(|i| self.entries.get(i).copied())
    }
}

impl IndexFile<TimeEntry> {
    /// The last entry whose `max_ts` is below `ts`: every batch up to it is older than `ts`.
    pub(crate) fn last_before(&self, ts: i64) -> Option<TimeEntry> {
        let n = self.entries.partition_point(|e| e.max_ts < ts);
        n.checked_sub(1).and_then(|i| self.entries.get(i).copied())
    }
}

/// The whole file for `entries`. `base_ordinal` is written only where the header has room
/// for it (the offset index).
pub(crate) fn encode_file<E: IndexEntry>(base: u64, base_ordinal: u64, entries: &[E]) -> Vec<u8> {
    let mut out = Vec::with_capacity(E::HEADER_BYTES + entries.len() * E::BYTES);
    out.extend_from_slice(&E::MAGIC);
    out.extend_from_slice(&E::VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&base.to_le_bytes());
    if E::HEADER_BYTES == OFFSET_INDEX_HEADER_BYTES {
        out.extend_from_slice(&base_ordinal.to_le_bytes());
    }
    for entry in entries {
        entry.encode(&mut out);
    }
    out
}

/// Checks the header at the start of `bytes` (a whole file, or at least its header); returns
/// the base ordinal if the header has one and `bytes` holds it whole.
fn decode_header<E: IndexEntry>(bytes: &[u8], base: u64) -> Result<Option<u64>, IndexDefect> {
    let fixed = encode_file::<E>(base, 0, &[]);
    let want = &fixed[..INDEX_HEADER_BYTES];
    let Some(head) = bytes.get(..INDEX_HEADER_BYTES) else {
        return Err(IndexDefect::TooShort(bytes.len() as u64));
    };
    if head == want {
        if E::HEADER_BYTES != OFFSET_INDEX_HEADER_BYTES {
            return Ok(None);
        }
        let ordinal = bytes.get(INDEX_HEADER_BYTES..OFFSET_INDEX_HEADER_BYTES).and_then(|b| {
            let b: [u8; 8] = b.try_into().ok()?;
            Some(u64::from_le_bytes(b))
        });
        return Ok(ordinal);
    }
    // The same header with version 1: an offset index written before ordinals existed.
    let mut v1 = want.to_vec();
    v1[4..6].copy_from_slice(&1u16.to_le_bytes());
    match E::VERSION != 1 && head == v1.as_slice() {
        true => Err(IndexDefect::OldVersion),
        false => Err(IndexDefect::BadHeader),
    }
}

/// Checks a whole index file (header and entries) and decodes its entries and base ordinal
/// (0 for the time index, which has none).
pub(super) fn decode_entries<E: IndexEntry>(
    bytes: &[u8],
    base: u64,
    log_len: u64,
    span: u64,
) -> Result<(Vec<E>, u64), IndexDefect> {
    let base_ordinal = decode_header::<E>(bytes, base)?.unwrap_or(0);
    let body = bytes.get(E::HEADER_BYTES..).ok_or(IndexDefect::TooShort(bytes.len() as u64))?;
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
        Some(first) if !first.is_first() => Err(IndexDefect::MissingFirst),
        None if log_len > 0 => Err(IndexDefect::MissingFirst),
        _ => Ok((entries, base_ordinal)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const BASE: u64 = 1000;
    const ORD: u64 = 77;

    /// Entries `(rel, pos, ord)`.
    fn offsets(entries: &[(u32, u32, u32)]) -> Vec<OffsetEntry> {
        entries.iter().map(|&(rel, pos, ord)| OffsetEntry { rel, pos, ord }).collect()
    }

    fn file_for<E: IndexEntry>(entries: &[E]) -> Vec<u8> {
        encode_file(BASE, ORD, entries)
    }

    #[test]
    fn header_layout_is_as_specified() {
        let bytes = file_for(&offsets(&[(0, 0, 0), (3, 4100, 2)]));
        assert_eq!(&bytes[0..4], b"QVIX");
        assert_eq!(&bytes[4..6], &[2, 0]);
        assert_eq!(&bytes[6..8], &[0, 0]);
        assert_eq!(&bytes[8..16], &BASE.to_le_bytes());
        assert_eq!(&bytes[16..24], &ORD.to_le_bytes());
        assert_eq!(&bytes[24..36], &[0; 12]);
        assert_eq!(&bytes[36..40], &3u32.to_le_bytes());
        assert_eq!(&bytes[40..44], &4100u32.to_le_bytes());
        assert_eq!(&bytes[44..48], &2u32.to_le_bytes());
        assert_eq!(bytes.len(), 24 + 2 * 12);
        let times = file_for(&[TimeEntry { max_ts: -5, rel: 0 }]);
        assert_eq!(&times[0..4], b"QVTI");
        assert_eq!(&times[4..6], &[1, 0]);
        assert_eq!(&times[16..24], &(-5i64).to_le_bytes());
        assert_eq!(times.len(), 16 + 12);
    }

    #[test]
    fn valid_files_round_trip() {
        let entries = offsets(&[(0, 0, 0), (3, 4100, 1), (9, 9000, 5)]);
        assert_eq!(decode_entries(&file_for(&entries), BASE, 10_000, 20), Ok((entries, ORD)));
        let times = vec![TimeEntry { max_ts: 5, rel: 0 }, TimeEntry { max_ts: 9, rel: 4 }];
        assert_eq!(decode_entries(&file_for(&times), BASE, 10_000, 20), Ok((times, 0)));
        assert_eq!(
            decode_entries::<OffsetEntry>(&file_for::<OffsetEntry>(&[]), BASE, 0, 0),
            Ok((vec![], ORD))
        );
    }

    #[test]
    fn every_defect_is_detected() {
        let good = file_for(&offsets(&[(0, 0, 0), (3, 4100, 1)]));
        let check = |bytes: &[u8]| decode_entries::<OffsetEntry>(bytes, BASE, 10_000, 20);
        assert_eq!(check(&good[..10]), Err(IndexDefect::TooShort(10)));
        assert_eq!(check(&good[..20]), Err(IndexDefect::TooShort(20)));
        assert_eq!(check(&good[..good.len() - 1]), Err(IndexDefect::PartialEntry));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(check(&magic), Err(IndexDefect::BadHeader));
        let mut version = good.clone();
        version[4] = 3;
        assert_eq!(check(&version), Err(IndexDefect::BadHeader));
        version[4] = 1;
        assert_eq!(check(&version), Err(IndexDefect::OldVersion));
        assert_eq!(decode_entries::<OffsetEntry>(&good, BASE + 1, 10_000, 20), Err(IndexDefect::BadHeader));
        assert_eq!(check(&file_for(&offsets(&[(0, 0, 0), (3, 20_000, 1)]))), Err(IndexDefect::PastEnd(1)));
        assert_eq!(check(&file_for(&offsets(&[(0, 0, 0), (30, 200, 1)]))), Err(IndexDefect::PastEnd(1)));
        // More batches than offsets.
        assert_eq!(check(&file_for(&offsets(&[(0, 0, 0), (3, 200, 4)]))), Err(IndexDefect::PastEnd(1)));
        assert_eq!(
            check(&file_for(&offsets(&[(0, 0, 0), (3, 100, 1), (3, 200, 2)]))),
            Err(IndexDefect::NotIncreasing(2))
        );
        assert_eq!(
            check(&file_for(&offsets(&[(0, 0, 0), (3, 100, 1), (5, 200, 1)]))),
            Err(IndexDefect::NotIncreasing(2))
        );
        assert_eq!(check(&file_for(&offsets(&[(1, 0, 0)]))), Err(IndexDefect::MissingFirst));
        // The first batch is at position 0.
        assert_eq!(check(&file_for(&offsets(&[(0, 1, 0), (3, 100, 1)]))), Err(IndexDefect::MissingFirst));
        assert_eq!(check(&file_for(&offsets(&[(0, 0, 1)]))), Err(IndexDefect::PastEnd(0)));
        assert_eq!(check(&file_for::<OffsetEntry>(&[])), Err(IndexDefect::MissingFirst));
        let times = [TimeEntry { max_ts: 5, rel: 0 }, TimeEntry { max_ts: 5, rel: 4 }];
        assert_eq!(
            decode_entries::<TimeEntry>(&file_for(&times), BASE, 10_000, 20),
            Err(IndexDefect::NotIncreasing(1))
        );
    }

    #[test]
    fn a_version_1_offset_index_is_recognised_and_has_no_ordinal() -> Result<(), LogError> {
        let mut v1 = b"QVIX\x01\x00\x00\x00".to_vec();
        v1.extend_from_slice(&BASE.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode_entries::<OffsetEntry>(&v1, BASE, 10_000, 20), Err(IndexDefect::OldVersion));
        let storage: Arc<dyn crate::storage::Storage> = Arc::new(MemStorage::new());
        let dir = Path::new("/p");
        storage.create_dir_all(dir).map_err(LogError::io("mkdir", dir))?;
        let f = storage.open(&dir.join("i")).map_err(LogError::io("open", dir))?;
        f.append(&v1).map_err(LogError::io("write", dir))?;
        let index = IndexFile::<OffsetEntry>::open(&storage, dir.join("i"), BASE)?;
        assert_eq!(index.header_ordinal(), None);
        let mut v2 = IndexFile::<OffsetEntry>::open(&storage, dir.join("j"), BASE)?;
        v2.set_base_ordinal(ORD);
        v2.write_out()?;
        assert_eq!(v2.header_ordinal(), Some(ORD));
        Ok(())
    }

    #[test]
    fn load_refuses_implausible_lengths_before_reading() -> Result<(), LogError> {
        let storage: Arc<dyn crate::storage::Storage> = Arc::new(MemStorage::new());
        let dir = Path::new("/p");
        storage.create_dir_all(dir).map_err(LogError::io("mkdir", dir))?;
        let mut index = IndexFile::<OffsetEntry>::open(&storage, dir.join("i"), BASE)?;
        index.rewrite()?;
        for i in 0..10 {
            index.push(OffsetEntry { rel: i, pos: i * 100, ord: i }, true);
        }
        // 10 entries cannot belong to a 200-byte segment (at most 4 batches).
        assert!(matches!(index.load(200, 10), Err(IndexDefect::TooLong { .. })));
        assert_eq!(index.load(1000, 10).map(|(e, _)| e.len()), Ok(10));
        Ok(())
    }

    #[test]
    fn lookups() -> Result<(), LogError> {
        let storage: Arc<dyn crate::storage::Storage> = Arc::new(MemStorage::new());
        storage.create_dir_all(Path::new("/p")).map_err(LogError::io("mkdir", Path::new("/p")))?;
        let mut index = IndexFile::<OffsetEntry>::open(&storage, PathBuf::from("/p/i"), 0)?;
        index.set_entries(offsets(&[(0, 0, 0), (10, 5000, 4), (20, 10_000, 9)]));
        assert_eq!(index.floor(0), OffsetEntry { rel: 0, pos: 0, ord: 0 });
        assert_eq!(index.floor(15), OffsetEntry { rel: 10, pos: 5000, ord: 4 });
        assert_eq!(index.floor(99), OffsetEntry { rel: 20, pos: 10_000, ord: 9 });
        assert_eq!(index.floor_ordinal(3).rel, 0);
        assert_eq!(index.floor_ordinal(4).rel, 10);
        assert_eq!(index.floor_ordinal(100).rel, 20);
        assert_eq!(index.entry_at(10).map(|e| e.ord), Some(4));
        assert_eq!(index.entry_at(11), None);
        Ok(())
    }
}
