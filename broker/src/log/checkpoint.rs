//! The recovery point of a partition (docs/design.md §5.3): how far the active segment is
//! covered by a completed fsync, kept in memory and checkpointed to `<partition>/recovery-point`.
//! Recovery tells corruption (damage below it) from a torn write (damage at or after it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{replace_file, LogError};
use crate::storage::Storage;

/// Name of the checkpoint file in the partition directory.
pub(crate) const FILE: &str = "recovery-point";
/// Its temp file while it is replaced (removed at start if left over).
pub(crate) const TEMP_FILE: &str = "recovery-point.tmp";

const MAGIC: &[u8; 4] = b"QVRP";
const VERSION: u16 = 1;
/// magic, u16 version, u16 reserved, u64 segment base, u64 position, u64 next offset, u32 crc32c.
const LEN: usize = 4 + 2 + 2 + 8 + 8 + 8 + 4;

/// Bytes `..position` of segment `segment_base` were covered by a completed fsync; the batch
/// boundary there holds offset `next_offset`. Ordered by segment, then position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecoveryPoint {
    /// Base offset of the segment.
    pub segment_base: u64,
    /// Byte position in it, a batch boundary.
    pub position: u64,
    /// The offset of the batch at `position` (the log's next offset when it was taken).
    pub next_offset: u64,
}

impl RecoveryPoint {
    /// The file's bytes (little-endian).
    pub(crate) fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[8..16].copy_from_slice(&self.segment_base.to_le_bytes());
        out[16..24].copy_from_slice(&self.position.to_le_bytes());
        out[24..32].copy_from_slice(&self.next_offset.to_le_bytes());
        let crc = crc32c::crc32c(&out[..32]);
        out[32..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses the file's bytes; the error says what is wrong.
    pub(crate) fn decode(bytes: &[u8]) -> Result<RecoveryPoint, String> {
        if bytes.len() != LEN {
            return Err(format!("{} bytes, expected {LEN}", bytes.len()));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let crc = u32::from_le_bytes([bytes[32], bytes[33], bytes[34], bytes[35]]);
        if crc != crc32c::crc32c(&bytes[..32]) {
            return Err("checksum mismatch".into());
        }
        if &bytes[..4] != MAGIC || bytes[4..6] != VERSION.to_le_bytes() {
            return Err("bad magic or version".into());
        }
        let point = RecoveryPoint { segment_base: u64_at(8), position: u64_at(16), next_offset: u64_at(24) };
        if point.next_offset < point.segment_base {
            return Err(format!("next offset {} below the segment base", point.next_offset));
        }
        Ok(point)
    }
}

/// Reads `<dir>/recovery-point`: `None` if there is none or it does not check out (logged).
pub(crate) fn read(storage: &dyn Storage, dir: &Path, names: &[String]) -> Option<RecoveryPoint> {
    if !names.iter().any(|n| n == FILE) {
        return None;
    }
    let path = dir.join(FILE);
    let result = (|| -> std::io::Result<Vec<u8>> {
        let f = storage.open(&path)?;
        // Bounded: anything but the exact length is refused without reading it.
        let len = f.len()?;
        if len != LEN as u64 {
            return Ok(vec![0; usize::from(len > 0)]);
        }
        let mut buf = vec![0u8; LEN];
        f.read_exact_at(0, &mut buf)?;
        Ok(buf)
    })();
    match result.map_err(|e| e.to_string()).and_then(|b| RecoveryPoint::decode(&b)) {
        Ok(point) => Some(point),
        Err(why) => {
            tracing::error!(path = %path.display(), %why, "ignoring a damaged recovery point: the whole last segment counts as unsynced");
            None
        }
    }
}

/// The recovery point of one partition in memory, shared by the log, its sync handles and
/// whoever writes the checkpoint (a roll, the maintenance loop, shutdown). Cloning shares it.
#[derive(Debug, Clone)]
pub struct RecoveryCheckpoint {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    /// The furthest point a completed fsync covered.
    synced: Mutex<RecoveryPoint>,
    /// What the file says (`None`: nothing, or something else); its lock serialises writers.
    written: Mutex<Option<RecoveryPoint>>,
}

impl RecoveryCheckpoint {
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        synced: RecoveryPoint,
        written: Option<RecoveryPoint>,
    ) -> Self {
        let inner = Inner { storage, dir, synced: Mutex::new(synced), written: Mutex::new(written) };
        RecoveryCheckpoint { inner: Arc::new(inner) }
    }

    /// Records that a sync covering `point` completed. Never moves the point back (a sync
    /// handle taken before a roll may finish after it).
    pub(crate) fn record(&self, point: RecoveryPoint) {
        let mut synced = self.inner.synced.lock();
        if point > *synced {
            *synced = point;
        }
    }

    /// Moves the point back to `point` if it is further (a truncation is about to cut the log
    /// there) and writes the file durably before returning, so that a crash during or after the
    /// cut never finds a recovery point above bytes that were rewritten and not synced.
    pub(crate) fn lower_to(&self, point: RecoveryPoint) -> Result<(), LogError> {
        let mut written = self.inner.written.lock();
        let lowered = {
            let mut synced = self.inner.synced.lock();
            *synced = (*synced).min(point);
            *synced
        };
        // The file may say more than memory (written from an older point it never does, but
        // a stale file is cheap to rewrite): it is written whenever it is not exactly this.
        if *written == Some(lowered) {
            return Ok(());
        }
        let Inner { storage, dir, .. } = &*self.inner;
        // If the write fails the file may still hold the higher point: nobody may cut then.
        *written = None;
        replace_file(&**storage, &dir.join(FILE), &lowered.encode())?;
        storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))?;
        *written = Some(lowered);
        Ok(())
    }

    /// Sets the point to `point` unconditionally (the log was replaced by an empty one:
    /// log/reset.rs removed the file, so nothing is written yet).
    pub(crate) fn reset_to(&self, point: RecoveryPoint) {
        let mut written = self.inner.written.lock();
        *self.inner.synced.lock() = point;
        *written = None;
    }

    /// The furthest point a completed fsync covered.
    pub fn synced(&self) -> RecoveryPoint {
        *self.inner.synced.lock()
    }

    /// Writes the checkpoint if completed fsyncs covered `lag` bytes or more of the active
    /// segment beyond what the file says, so a restart after a crash scans at most about that
    /// much (plus what was written since the last fsync) whatever the checkpoint interval.
    pub fn write_if_behind(&self, lag: u64) -> Result<bool, LogError> {
        let behind = {
            let written = *self.inner.written.lock();
            let synced = self.synced();
            match written {
                Some(w) if w.segment_base == synced.segment_base => synced.position >= w.position + lag,
                _ => true,
            }
        };
        if behind {
            self.write()
        } else {
            Ok(false)
        }
    }

    /// Writes the checkpoint file if the synced point moved since it was last written:
    /// `recovery-point.tmp`, fsync, rename, fsync of the directory. No data fsync: it records
    /// syncs that already completed. Returns whether it wrote.
    pub fn write(&self) -> Result<bool, LogError> {
        let mut written = self.inner.written.lock();
        let point = self.synced();
        if *written == Some(point) {
            return Ok(false);
        }
        let Inner { storage, dir, .. } = &*self.inner;
        replace_file(&**storage, &dir.join(FILE), &point.encode())?;
        storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))?;
        *written = Some(point);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let p = RecoveryPoint { segment_base: 7, position: 1234, next_offset: 99 };
        let bytes = p.encode();
        assert_eq!(RecoveryPoint::decode(&bytes), Ok(p));
        for i in 0..LEN {
            let mut bad = bytes;
            bad[i] ^= 1;
            assert!(RecoveryPoint::decode(&bad).is_err(), "byte {i}");
        }
        assert!(RecoveryPoint::decode(&bytes[..LEN - 1]).is_err());
    }

    #[test]
    fn writes_at_once_when_the_synced_point_is_far_enough_ahead() -> Result<(), LogError> {
        let storage: Arc<dyn Storage> = Arc::new(crate::storage::MemStorage::new());
        let dir = PathBuf::from("/p");
        storage.create_dir_all(&dir).map_err(LogError::io("create", &dir))?;
        let at = |segment_base, position| RecoveryPoint {
            segment_base,
            position,
            next_offset: segment_base + position,
        };
        let checkpoint = RecoveryCheckpoint::new(storage.clone(), dir.clone(), at(0, 0), Some(at(0, 0)));
        let on_disk = || read(&*storage, &dir, &[FILE.to_string()]);
        checkpoint.record(at(0, 99));
        assert!(!checkpoint.write_if_behind(100)?);
        assert_eq!(on_disk(), None);
        checkpoint.record(at(0, 100));
        assert!(checkpoint.write_if_behind(100)?);
        assert_eq!(on_disk(), Some(at(0, 100)));
        // A later segment than the file names is always behind.
        checkpoint.record(at(500, 1));
        assert!(checkpoint.write_if_behind(100)?);
        assert_eq!(on_disk(), Some(at(500, 1)));
        assert!(!checkpoint.write_if_behind(100)?);
        Ok(())
    }
}
