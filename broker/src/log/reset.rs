//! Replacing a partition's whole log with an empty one that starts at a given offset and
//! ordinal: what a replica does when it installs a Raft snapshot (docs/replication.md §2a),
//! as a Kafka follower restarts from its leader's log start.
//!
//! Crash safety rests on one marker file, `<partition>/log-reset`, written whole (temp file,
//! fsync, rename, fsync of the directory) **before** anything is removed:
//!
//! 1. write the marker `(base offset, base ordinal, epoch before)`: the commit point;
//! 2. remove every segment file (logs, indexes, producer snapshots, their temp files) and the
//!    recovery point, and fsync the directory;
//! 3. write the epoch record with no entries and the epoch before the new start;
//! 4. create the empty segment at the base offset (its index header holds the base ordinal,
//!    durably) and fsync the directory;
//! 5. remove the marker and fsync the directory.
//!
//! A crash before step 1 completes leaves the old log untouched (the marker's temp file is
//! removed at open). From step 1 on, opening the partition finds the marker and performs
//! steps 2–5 again before recovery (each is idempotent), so recovery only ever sees the old
//! log or the new empty one, never a mix.
//!
//! ```text
//! "QVLR" | u16 version 1 | u16 reserved 0 | u64 base offset | u64 base ordinal
//! | i32 epoch before | u32 crc32c of everything before it
//! ```

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::epochs::{self, Epochs};
use super::segment::Segment;
use super::{checkpoint, replace_file, LogError};
use crate::storage::Storage;

/// The marker of a reset in progress, in the partition directory.
pub(crate) const FILE: &str = "log-reset";
/// Its temp file while it is written (removed at open if left over).
pub(crate) const TEMP_FILE: &str = "log-reset.tmp";

const MAGIC: &[u8; 4] = b"QVLR";
const VERSION: u16 = 1;
/// magic, version, reserved, two u64, i32, crc.
const LEN: usize = 4 + 2 + 2 + 8 + 8 + 4 + 4;

/// Where the new log starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reset {
    pub(crate) base_offset: u64,
    pub(crate) base_ordinal: u64,
    /// The leader epoch of the (dropped) batch just before `base_offset`.
    pub(crate) epoch_before: i32,
}

impl Reset {
    /// Whether the position can be a log start: ordinal at least 2 (the reset drops at least
    /// one batch), at most one more than the offset (every batch holds an offset), a valid
    /// epoch.
    pub(crate) fn is_valid(&self) -> bool {
        self.base_ordinal >= 2
            && self.base_ordinal <= self.base_offset.saturating_add(1)
            && self.epoch_before >= 0
    }

    pub(super) fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[8..16].copy_from_slice(&self.base_offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.base_ordinal.to_le_bytes());
        out[24..28].copy_from_slice(&self.epoch_before.to_le_bytes());
        let crc = crc32c::crc32c(&out[..28]);
        out[28..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Reset, String> {
        let Ok(b) = <&[u8; LEN]>::try_from(bytes) else {
            return Err(format!("{} bytes, expected {LEN}", bytes.len()));
        };
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        if u32::from_le_bytes([b[28], b[29], b[30], b[31]]) != crc32c::crc32c(&b[..28]) {
            return Err("CRC mismatch".into());
        }
        if &b[..4] != MAGIC || b[4..6] != VERSION.to_le_bytes() || b[6..8] != [0, 0] {
            return Err("bad magic or version".into());
        }
        let reset = Reset {
            base_offset: u64_at(8),
            base_ordinal: u64_at(16),
            epoch_before: i32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        };
        match reset.is_valid() {
            true => Ok(reset),
            false => Err(format!("{reset:?} cannot start a log")),
        }
    }
}

/// Step 1: the marker, durably. Once this returns, the reset will complete, now or at the next
/// open.
pub(crate) fn begin(storage: &dyn Storage, dir: &Path, reset: &Reset) -> Result<(), LogError> {
    replace_file(storage, &dir.join(FILE), &reset.encode())?;
    storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))
}

/// Steps 2–5; returns the new empty segment and epoch record.
pub(crate) fn finish(
    storage: &Arc<dyn Storage>,
    dir: &Path,
    reset: &Reset,
) -> Result<(Segment, Epochs), LogError> {
    let names = storage.list(dir).map_err(LogError::io("list directory", dir))?;
    for name in names {
        let segment_file = super::recovery::is_segment_file(&name);
        let checkpoint = name == checkpoint::FILE || name == checkpoint::TEMP_FILE;
        if segment_file || checkpoint || name == epochs::TEMP_FILE {
            let path = dir.join(&name);
            match storage.remove(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(LogError::io("remove file", &path)(err)),
            }
        }
    }
    storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))?;
    let epochs = Epochs::starting_after(reset.base_offset, reset.epoch_before);
    epochs::write(&**storage, dir, &epochs)?;
    let segment = Segment::create(storage, dir, reset.base_offset, reset.base_ordinal)?;
    storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))?;
    let marker = dir.join(FILE);
    match storage.remove(&marker) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(LogError::io("remove file", &marker)(err)),
    }
    storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))?;
    Ok((segment, epochs))
}

/// At open, before recovery: completes a reset a crash interrupted (the marker is there).
pub(crate) fn complete_interrupted(storage: &Arc<dyn Storage>, dir: &Path) -> Result<(), LogError> {
    let names = match storage.list(dir) {
        Ok(names) => names,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(LogError::io("list directory", dir)(err)),
    };
    if !names.iter().any(|n| n == FILE) {
        return Ok(());
    }
    let path = dir.join(FILE);
    let f = storage.open(&path).map_err(LogError::io("open reset marker", &path))?;
    let len = f.len().map_err(LogError::io("reset marker length", &path))?;
    let corrupt = |reason: String| LogError::Corrupt { path: path.clone(), position: 0, reason };
    if len != LEN as u64 {
        return Err(corrupt(format!("reset marker of {len} bytes, expected {LEN}")));
    }
    let mut buf = [0u8; LEN];
    f.read_exact_at(0, &mut buf).map_err(LogError::io("read reset marker", &path))?;
    let reset = Reset::decode(&buf).map_err(corrupt)?;
    tracing::warn!(dir = %dir.display(), ?reset, "completing a log reset (a Raft snapshot install) that a crash interrupted");
    finish(storage, dir, &reset)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_round_trips_and_refuses_damage() {
        let r = Reset { base_offset: 99, base_ordinal: 40, epoch_before: 3 };
        let bytes = r.encode();
        assert_eq!(Reset::decode(&bytes), Ok(r));
        for i in 0..bytes.len() {
            let mut bad = bytes;
            bad[i] ^= 1;
            assert!(Reset::decode(&bad).is_err(), "byte {i}");
        }
        for len in 0..bytes.len() {
            assert!(Reset::decode(&bytes[..len]).is_err(), "length {len}");
        }
        let impossible = Reset { base_offset: 5, base_ordinal: 40, epoch_before: 3 };
        assert!(Reset::decode(&impossible.encode()).is_err());
    }
}
