//! The data of a partition's Raft snapshot (docs/replication.md §2, §2a).
//!
//! A partition's state machine is its log, so a snapshot is only a position: the Raft index and
//! term of the last entry it covers are in raft-rs' `SnapshotMetadata` (with the voters), and
//! the data says where the log starts in Kafka offsets, so that the follower installing it
//! gives every later batch the offsets the leader gave it. No log data is copied: the entries
//! after the snapshot come by normal appends.
//!
//! Fixed little-endian layout, version in the header, checked whole on decode (it arrives from
//! a peer: exact length, magic, version, reserved bits, CRC):
//!
//! ```text
//! "QVSN" | u8 version 2 | u8 reserved 0 | u16 reserved 0 | u64 log start offset
//! | u64 Raft index (the metadata's, repeated) | u64 conf index
//! | u32 crc32c of everything before it
//! ```
//!
//! The conf index is the index of the last configuration change in the metadata's `ConfState`
//! (the sender's current configuration, which may hold changes committed after the snapshot's
//! index): the follower does not apply those again when their entries reach it
//! (docs/replication.md §11).

/// The data's length: the only one accepted (nothing in it has a length of its own).
pub(crate) const SNAPSHOT_DATA_LEN: usize = 4 + 1 + 1 + 2 + 8 + 8 + 8 + 4;
const MAGIC: &[u8; 4] = b"QVSN";
const VERSION: u8 = 2;

/// What the snapshot data carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SnapshotData {
    /// The Kafka offset of the first batch after the snapshot (the leader's log start).
    pub(crate) log_start_offset: u64,
    /// The Raft index the snapshot covers up to; must equal the metadata's.
    pub(crate) index: u64,
    /// The index of the last configuration change the snapshot's `ConfState` holds.
    pub(crate) conf_index: u64,
}

/// Why snapshot data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SnapshotDataError {
    #[error("snapshot data of {have} bytes, expected {SNAPSHOT_DATA_LEN}")]
    Length { have: usize },
    #[error("snapshot data: bad magic")]
    Magic,
    #[error("snapshot data version {0}, only {VERSION} is known")]
    Version(u8),
    #[error("snapshot data: reserved bytes are not zero")]
    Reserved,
    #[error("snapshot data: CRC mismatch")]
    Crc,
    #[error("snapshot data: log start offset {offset} cannot follow {index} batches")]
    Position { offset: u64, index: u64 },
}

impl SnapshotData {
    pub(crate) fn encode(&self) -> [u8; SNAPSHOT_DATA_LEN] {
        let mut out = [0u8; SNAPSHOT_DATA_LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4] = VERSION;
        out[8..16].copy_from_slice(&self.log_start_offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.index.to_le_bytes());
        out[24..32].copy_from_slice(&self.conf_index.to_le_bytes());
        let crc = crc32c::crc32c(&out[..32]);
        out[32..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<SnapshotData, SnapshotDataError> {
        let Ok(b) = <&[u8; SNAPSHOT_DATA_LEN]>::try_from(buf) else {
            return Err(SnapshotDataError::Length { have: buf.len() });
        };
        if &b[..4] != MAGIC {
            return Err(SnapshotDataError::Magic);
        }
        if b[4] != VERSION {
            return Err(SnapshotDataError::Version(b[4]));
        }
        if b[5..8] != [0, 0, 0] {
            return Err(SnapshotDataError::Reserved);
        }
        if u32::from_le_bytes([b[32], b[33], b[34], b[35]]) != crc32c::crc32c(&b[..32]) {
            return Err(SnapshotDataError::Crc);
        }
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        let data = SnapshotData { log_start_offset: u64_at(8), index: u64_at(16), conf_index: u64_at(24) };
        // Every batch holds at least one offset: `index` batches end at `index` or later.
        if data.index == 0 || data.log_start_offset < data.index {
            return Err(SnapshotDataError::Position { offset: data.log_start_offset, index: data.index });
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for data in [
            SnapshotData { log_start_offset: 1, index: 1, conf_index: 0 },
            SnapshotData { log_start_offset: 1_234_567, index: 4_321, conf_index: 5_000 },
            SnapshotData { log_start_offset: u64::MAX, index: u64::MAX, conf_index: u64::MAX },
        ] {
            assert_eq!(SnapshotData::decode(&data.encode()), Ok(data));
        }
    }

    #[test]
    fn truncated_damaged_or_garbage_data_is_an_error_not_a_panic() {
        let bytes = SnapshotData { log_start_offset: 900, index: 40, conf_index: 3 }.encode();
        for len in 0..bytes.len() {
            assert_eq!(SnapshotData::decode(&bytes[..len]), Err(SnapshotDataError::Length { have: len }));
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(SnapshotData::decode(&longer).is_err());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes;
                bad[i] ^= 1 << bit;
                assert!(SnapshotData::decode(&bad).is_err(), "byte {i} bit {bit}");
            }
        }
        // Garbage of the right length, including a valid CRC over nonsense.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..1_000 {
            let mut g = [0u8; SNAPSHOT_DATA_LEN];
            for b in g.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            assert!(SnapshotData::decode(&g).is_err());
        }
        let impossible = SnapshotData { log_start_offset: 5, index: 40, conf_index: 0 }.encode();
        assert_eq!(
            SnapshotData::decode(&impossible),
            Err(SnapshotDataError::Position { offset: 5, index: 40 })
        );
    }
}
