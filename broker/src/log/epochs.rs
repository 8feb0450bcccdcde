//! The leader-epoch record of a partition (docs/design.md §5.7): which leader epoch each span of
//! offsets was written in, as Kafka's `leader-epoch-checkpoint`. Every stored batch carries its
//! epoch in bytes 12..16 of its header (`partition_leader_epoch`, outside the CRC); this record
//! is the index over them that replication asks (the epoch of an offset, where an epoch ends).
//!
//! In memory it is a list of `(epoch, start offset)` entries, both strictly increasing: epoch
//! `e` covers offsets from its start up to the next entry's start (or the log end). The file
//! `<partition>/leader-epochs` is rewritten whole (temp file, fsync, rename, fsync of the
//! directory) whenever the list changes: when an epoch begins and when truncation or retention
//! removes entries.
//!
//! It also keeps the epoch of the batch just before the log start (`before`), which retention
//! and a Raft snapshot install drop: Raft must still answer the term of the entry before its
//! first one (`Storage::term(first_index - 1)`, docs/replication.md §2a). Retention needs no
//! extra write for it: until the record is rewritten after a deletion, its old entries still
//! cover that offset, and [`Epochs::truncate_from_start`] (at the rewrite, and at every open)
//! turns the entry covering it into `before`.

use std::path::Path;

use super::{replace_file, LogError};
use crate::storage::Storage;

/// Name of the file in the partition directory.
pub(crate) const FILE: &str = "leader-epochs";
/// Its temp file while it is replaced (removed at start if left over).
pub(crate) const TEMP_FILE: &str = "leader-epochs.tmp";

const MAGIC: &[u8; 4] = b"QVLE";
/// Version 2 adds `before` after the header; version 1 (no `before`) is still read.
const VERSION: u16 = 2;
const VERSION_1: u16 = 1;
/// magic, u16 version, u16 reserved, u32 entry count.
const HEADER: usize = 4 + 2 + 2 + 4;
/// Version 2 only: u8 has_before (0 or 1), u64 start, i32 epoch (zeros without one).
const BEFORE: usize = 1 + 8 + 4;
/// i32 epoch, u64 start offset.
const ENTRY: usize = 4 + 8;
/// The trailing crc32c of everything before it.
const CRC: usize = 4;

pub use quiver_protocol::limits::MAX_EPOCH_ENTRIES;

/// One epoch and the first offset written in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    /// The leader epoch (Raft term), at least 0.
    pub epoch: i32,
    /// The first offset of the epoch.
    pub start: u64,
}

/// The entries, strictly increasing in both epoch and start offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Epochs {
    entries: Vec<EpochEntry>,
    /// `(log start, epoch)`: the batch just before offset `log start` was written in `epoch`.
    before: Option<(u64, i32)>,
}

impl Epochs {
    pub(crate) fn from_entries(entries: Vec<EpochEntry>) -> Result<Epochs, String> {
        if entries.len() > MAX_EPOCH_ENTRIES {
            return Err(format!("{} entries, more than {MAX_EPOCH_ENTRIES}", entries.len()));
        }
        for (i, pair) in entries.windows(2).enumerate() {
            if pair[1].epoch <= pair[0].epoch || pair[1].start <= pair[0].start {
                return Err(format!("entry {} does not increase", i + 1));
            }
        }
        if entries.first().is_some_and(|e| e.epoch < 0) {
            return Err("negative epoch".into());
        }
        Ok(Epochs { entries, before: None })
    }

    /// The record of a log that starts at `start` after a batch written in `epoch` it does not
    /// hold (a Raft snapshot was installed: docs/replication.md §2a), with no entries yet.
    pub(crate) fn starting_after(start: u64, epoch: i32) -> Epochs {
        Epochs { entries: Vec::new(), before: Some((start, epoch)) }
    }

    /// The epoch of the batch just before offset `log_start` (the log's first), if known: from
    /// the entries while they still cover it, else from what the last
    /// [`truncate_from_start`](Self::truncate_from_start) kept.
    pub(crate) fn epoch_before(&self, log_start: u64) -> Option<i32> {
        let prev = log_start.checked_sub(1)?;
        if self.entries.first().is_some_and(|e| e.start <= prev) {
            return self.epoch_at(prev);
        }
        self.before.filter(|&(start, _)| start == log_start).map(|(_, epoch)| epoch)
    }

    pub(crate) fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    pub(crate) fn latest(&self) -> Option<i32> {
        self.entries.last().map(|e| e.epoch)
    }

    /// The epoch of `offset` (the caller checks it is in the log).
    pub(crate) fn epoch_at(&self, offset: u64) -> Option<i32> {
        let n = self.entries.partition_point(|e| e.start <= offset);
        n.checked_sub(1).map(|i| self.entries[i].epoch)
    }

    /// Kafka's `OffsetsForLeaderEpoch`: the largest epoch at most `epoch` and the offset after its
    /// last batch (the start of the next epoch, or `log_end` for the latest). For an epoch
    /// below every known one, that epoch and the first known start. `None` for an epoch above
    /// the latest, or when there are no entries.
    pub(crate) fn end_offset_for(&self, epoch: i32, log_end: u64) -> Option<(i32, u64)> {
        let latest = self.entries.last()?;
        if epoch == latest.epoch {
            return Some((epoch, log_end));
        }
        let higher = self.entries.partition_point(|e| e.epoch <= epoch);
        let next = self.entries.get(higher)?;
        match higher.checked_sub(1) {
            Some(i) => Some((self.entries[i].epoch, next.start)),
            None => Some((epoch, next.start)),
        }
    }

    /// Adds `epoch` starting at `start` (the log end). Entries at or after `start` (epochs that
    /// began and never got a batch) give way to it. Returns false if it is already the latest.
    pub(crate) fn begin(&mut self, epoch: i32, start: u64) -> Result<bool, LogError> {
        if let Some(latest) = self.latest() {
            if epoch < latest {
                return Err(LogError::EpochRegressed { latest, requested: epoch });
            }
            if epoch == latest {
                return Ok(false);
            }
        }
        if epoch < 0 {
            return Err(LogError::EpochRegressed { latest: 0, requested: epoch });
        }
        self.truncate_from_end(start);
        if self.entries.len() >= MAX_EPOCH_ENTRIES {
            return Err(LogError::TooManyEpochs);
        }
        self.entries.push(EpochEntry { epoch, start });
        Ok(true)
    }

    /// Removes the entries starting at or after `offset`. Returns whether any was.
    pub(crate) fn truncate_from_end(&mut self, offset: u64) -> bool {
        let keep = self.entries.partition_point(|e| e.start < offset);
        let changed = keep < self.entries.len();
        self.entries.truncate(keep);
        changed
    }

    /// Drops the entries wholly before `log_start` and moves the start of the one covering it
    /// there (Kafka's `truncateFromStart`). Returns whether anything changed.
    /// The epoch of the batch just before `log_start` is kept (see the module docs).
    pub(crate) fn truncate_from_start(&mut self, log_start: u64) -> bool {
        let before = self.epoch_before(log_start).map(|epoch| (log_start, epoch));
        let mut changed = before != self.before;
        self.before = before;
        let covering = self.entries.partition_point(|e| e.start <= log_start);
        let Some(first) = covering.checked_sub(1) else { return changed };
        changed |= first > 0 || self.entries[first].start != log_start;
        self.entries.drain(..first);
        if let Some(e) = self.entries.first_mut() {
            e.start = log_start;
        }
        changed
    }

    /// The file's bytes (little-endian).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + BEFORE + self.entries.len() * ENTRY + CRC);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        // At most MAX_EPOCH_ENTRIES, so it fits.
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        let (start, epoch) = self.before.unwrap_or((0, 0));
        out.push(u8::from(self.before.is_some()));
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&epoch.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.epoch.to_le_bytes());
            out.extend_from_slice(&e.start.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses the file's bytes; the error says what is wrong.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Epochs, String> {
        if bytes.len() < HEADER + CRC {
            return Err(format!("{} bytes, shorter than a header", bytes.len()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - CRC);
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc != crc32c::crc32c(body) {
            return Err("checksum mismatch".into());
        }
        let version = u16::from_le_bytes([body[4], body[5]]);
        if &body[..4] != MAGIC || (version != VERSION && version != VERSION_1) {
            return Err("bad magic or version".into());
        }
        let fixed = HEADER + if version == VERSION { BEFORE } else { 0 };
        let count = u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize;
        if count > MAX_EPOCH_ENTRIES || body.len() != fixed + count * ENTRY {
            return Err(format!("{count} entries do not fit {} bytes", body.len()));
        }
        let before = match version == VERSION {
            false => None,
            true => {
                let mut start = [0u8; 8];
                start.copy_from_slice(&body[HEADER + 1..HEADER + 9]);
                let mut epoch = [0u8; 4];
                epoch.copy_from_slice(&body[HEADER + 9..HEADER + 13]);
                let (start, epoch) = (u64::from_le_bytes(start), i32::from_le_bytes(epoch));
                match body[HEADER] {
                    0 if (start, epoch) == (0, 0) => None,
                    1 if epoch >= 0 => Some((start, epoch)),
                    _ => return Err("bad epoch before the log start".into()),
                }
            }
        };
        let entries = body[fixed..]
            .chunks_exact(ENTRY)
            .map(|c| {
                let mut epoch = [0u8; 4];
                epoch.copy_from_slice(&c[..4]);
                let mut start = [0u8; 8];
                start.copy_from_slice(&c[4..]);
                EpochEntry { epoch: i32::from_le_bytes(epoch), start: u64::from_le_bytes(start) }
            })
            .collect();
        let mut epochs = Epochs::from_entries(entries)?;
        epochs.before = before;
        Ok(epochs)
    }
}

/// Largest file a valid record can be; anything longer is refused before it is read.
const MAX_EPOCHS_FILE_BYTES: u64 = (HEADER + BEFORE + MAX_EPOCH_ENTRIES * ENTRY + CRC) as u64;

/// Reads `<dir>/leader-epochs`: `Ok(None)` if there is none, `Err` (what is wrong) if it does
/// not check out.
pub(crate) fn read(storage: &dyn Storage, dir: &Path, names: &[String]) -> Result<Option<Epochs>, String> {
    if !names.iter().any(|n| n == FILE) {
        return Ok(None);
    }
    let path = dir.join(FILE);
    let f = storage.open(&path).map_err(|e| e.to_string())?;
    let len = f.len().map_err(|e| e.to_string())?;
    if len > MAX_EPOCHS_FILE_BYTES {
        return Err(format!("{len} bytes, more than the {MAX_EPOCHS_FILE_BYTES} a record can be"));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(0, &mut buf).map_err(|e| e.to_string())?;
    Epochs::decode(&buf).map(Some)
}

/// Replaces `<dir>/leader-epochs` durably with `epochs`.
pub(crate) fn write(storage: &dyn Storage, dir: &Path, epochs: &Epochs) -> Result<(), LogError> {
    replace_file(storage, &dir.join(FILE), &epochs.encode())?;
    storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs(pairs: &[(i32, u64)]) -> Epochs {
        let entries = pairs.iter().map(|&(epoch, start)| EpochEntry { epoch, start }).collect();
        Epochs::from_entries(entries).unwrap_or_default()
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let e = epochs(&[(0, 0), (3, 10), (7, 99)]);
        let bytes = e.encode();
        assert_eq!(Epochs::decode(&bytes), Ok(e));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(Epochs::decode(&bad).is_err(), "byte {i}");
        }
        for len in 0..bytes.len() {
            assert!(Epochs::decode(&bytes[..len]).is_err(), "length {len}");
        }
        assert_eq!(Epochs::decode(&Epochs::default().encode()), Ok(Epochs::default()));
    }

    #[test]
    fn a_huge_count_is_refused_without_allocating() {
        let mut bytes = Epochs::default().encode();
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let n = bytes.len();
        let crc = crc32c::crc32c(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(Epochs::decode(&bytes).is_err());
    }

    #[test]
    fn lookups_follow_kafka() {
        let e = epochs(&[(1, 0), (3, 10), (7, 20)]);
        assert_eq!(e.epoch_at(0), Some(1));
        assert_eq!(e.epoch_at(9), Some(1));
        assert_eq!(e.epoch_at(10), Some(3));
        assert_eq!(e.epoch_at(25), Some(7));
        assert_eq!(e.end_offset_for(7, 30), Some((7, 30)));
        assert_eq!(e.end_offset_for(3, 30), Some((3, 20)));
        assert_eq!(e.end_offset_for(5, 30), Some((3, 20)), "an unknown epoch: the one below it");
        assert_eq!(e.end_offset_for(2, 30), Some((1, 10)));
        assert_eq!(e.end_offset_for(0, 30), Some((0, 0)), "below every epoch");
        assert_eq!(e.end_offset_for(8, 30), None, "above the latest");
        assert_eq!(Epochs::default().end_offset_for(0, 0), None);
    }

    #[test]
    fn begin_and_truncate() -> Result<(), LogError> {
        let mut e = epochs(&[(1, 0)]);
        assert!(!e.begin(1, 5)?);
        assert!(matches!(e.begin(0, 5), Err(LogError::EpochRegressed { latest: 1, requested: 0 })));
        assert!(e.begin(2, 5)?);
        // Epoch 2 got no batch before epoch 4 began at the same offset: it gives way.
        assert!(e.begin(4, 5)?);
        assert_eq!(e, epochs(&[(1, 0), (4, 5)]));
        assert!(e.truncate_from_end(5));
        assert_eq!(e, epochs(&[(1, 0)]));
        assert!(e.begin(6, 9)?);
        assert!(e.truncate_from_start(7));
        assert_eq!(e.entries(), epochs(&[(1, 7), (6, 9)]).entries());
        assert_eq!(e.epoch_before(7), Some(1));
        assert!(e.truncate_from_start(9));
        assert_eq!(e.entries(), epochs(&[(6, 9)]).entries());
        // The batch before the new start was epoch 1's, which the entries no longer hold.
        assert_eq!(e.epoch_before(9), Some(1));
        assert!(!e.truncate_from_start(9));
        assert_eq!(Epochs::decode(&e.encode()), Ok(e.clone()));
        // Another start than the one recorded: unknown.
        assert_eq!(e.epoch_before(8), None);
        assert!(e.truncate_from_start(10));
        assert_eq!(e.epoch_before(10), Some(6));
        Ok(())
    }

    #[test]
    fn a_snapshot_start_keeps_the_epoch_before_it_and_version_1_still_reads() {
        let mut e = Epochs::starting_after(40, 3);
        assert_eq!((e.epoch_before(40), e.latest()), (Some(3), None));
        assert!(!e.truncate_from_start(40), "an open changes nothing");
        let bytes = e.encode();
        assert_eq!(Epochs::decode(&bytes), Ok(e.clone()));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(Epochs::decode(&bad).is_err(), "byte {i}");
        }
        assert!(matches!(e.begin(3, 40), Ok(true)));
        assert_eq!(e.epoch_before(40), Some(3));
        // A version-1 file: the header and entries only.
        let mut v1 = Vec::new();
        v1.extend_from_slice(MAGIC);
        v1.extend_from_slice(&VERSION_1.to_le_bytes());
        v1.extend_from_slice(&[0, 0, 1, 0, 0, 0]);
        v1.extend_from_slice(&5i32.to_le_bytes());
        v1.extend_from_slice(&7u64.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(Epochs::decode(&v1), Ok(epochs(&[(5, 7)])));
    }
}
