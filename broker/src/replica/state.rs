//! The durable Raft state of one partition replica: raft-rs's `HardState` (term, vote, commit),
//! its `ConfState`, and the position just before the log's first entry (Raft's "dummy entry":
//! the index and term `Storage::term` must still answer for `first_index - 1`).
//!
//! One small file, `<partition>/raft-state`, rewritten whole with the log's one protocol for
//! such files (`<name>.tmp`, fsync, rename, fsync of the directory: a crash leaves the old
//! version or the new one). Little-endian, CRC-checked, and its length is checked against
//! [`MAX_RAFT_STATE_BYTES`] before it is read:
//!
//! ```text
//! "QVRS" | u16 version 2 | u16 reserved 0 | u64 term | u64 vote | u64 commit
//! | u64 snapshot index | u64 snapshot term | u8 auto_leave
//! | 4 x (u32 count, count x u64 id): voters, learners, voters_outgoing, learners_next
//! | u64 conf index (version 2 only)
//! | u32 crc32c of everything before it
//! ```
//!
//! The conf index is the Raft index of the last configuration change the `ConfState` holds
//! (0: none, the group's first configuration): a committed change at or below it is already in
//! the configuration and is not applied again (docs/replication.md §11). Version 1 files (no
//! conf index) read as 0.

use std::path::Path;

use quiver_protocol::limits::{MAX_RAFT_STATE_BYTES, MAX_RAFT_VOTERS};
use raft::eraftpb::{ConfState, HardState};

use super::ReplicaError;
use crate::log::{replace_file, LogError, RAFT_STATE_FILE};
use crate::storage::Storage;

const MAGIC: &[u8; 4] = b"QVRS";
const VERSION: u16 = 2;
/// magic, version, reserved, five u64, auto_leave.
const FIXED: usize = 4 + 2 + 2 + 5 * 8 + 1;

/// What the file holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct DurableState {
    pub(crate) hard_state: HardState,
    pub(crate) conf_state: ConfState,
    /// The index and term of the entry just before the log's first one (0, 0 for a log that
    /// never dropped a prefix).
    pub(crate) snapshot_index: u64,
    pub(crate) snapshot_term: u64,
    /// The index of the last configuration change `conf_state` holds (0: none).
    pub(crate) conf_index: u64,
}

impl DurableState {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let hs = &self.hard_state;
        let cs = &self.conf_state;
        let lists = [cs.get_voters(), cs.get_learners(), cs.get_voters_outgoing(), cs.get_learners_next()];
        let ids: usize = lists.iter().map(|l| l.len()).sum();
        let mut out = Vec::with_capacity(FIXED + 4 * 4 + 8 * ids + 8 + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        for v in [hs.get_term(), hs.get_vote(), hs.get_commit(), self.snapshot_index, self.snapshot_term] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(u8::from(cs.get_auto_leave()));
        for list in lists {
            out.extend_from_slice(&(list.len() as u32).to_le_bytes());
            for id in list {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        out.extend_from_slice(&self.conf_index.to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<DurableState, String> {
        let Some((body, crc)) = buf.split_last_chunk::<4>() else {
            return Err(format!("{} bytes, too short", buf.len()));
        };
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err("CRC mismatch".into());
        }
        let mut r = Reader { buf: body, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err("bad magic".into());
        }
        let version = u16::from_le_bytes(r.array()?);
        if !(1..=VERSION).contains(&version) {
            return Err(format!("version {version}, only 1 to {VERSION} are known"));
        }
        r.take(2)?;
        let mut hard_state = HardState::default();
        hard_state.set_term(r.u64()?);
        hard_state.set_vote(r.u64()?);
        hard_state.set_commit(r.u64()?);
        let (snapshot_index, snapshot_term) = (r.u64()?, r.u64()?);
        let auto_leave = match r.take(1)?[0] {
            0 => false,
            1 => true,
            other => return Err(format!("auto_leave {other}")),
        };
        let mut lists: [Vec<u64>; 4] = Default::default();
        for list in &mut lists {
            let count = u32::from_le_bytes(r.array()?) as usize;
            if count > MAX_RAFT_VOTERS {
                return Err(format!("{count} ids in a list, more than {MAX_RAFT_VOTERS}"));
            }
            *list = (0..count).map(|_| r.u64()).collect::<Result<_, _>>()?;
        }
        let conf_index = if version >= 2 { r.u64()? } else { 0 };
        if r.pos != body.len() {
            return Err(format!("{} trailing bytes", body.len() - r.pos));
        }
        let [voters, learners, voters_outgoing, learners_next] = lists;
        let mut conf_state = ConfState::default();
        conf_state.set_voters(voters);
        conf_state.set_learners(learners);
        conf_state.set_voters_outgoing(voters_outgoing);
        conf_state.set_learners_next(learners_next);
        conf_state.set_auto_leave(auto_leave);
        Ok(DurableState { hard_state, conf_state, snapshot_index, snapshot_term, conf_index })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(format!("cut off at byte {}: need {n} more", self.pos));
        };
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Reads `<dir>/raft-state`; `None` if the replica never wrote one.
pub(crate) fn read(storage: &dyn Storage, dir: &Path) -> Result<Option<DurableState>, ReplicaError> {
    let path = dir.join(RAFT_STATE_FILE);
    let names = storage.list(dir).map_err(LogError::io("list directory", dir))?;
    if !names.iter().any(|n| n == RAFT_STATE_FILE) {
        return Ok(None);
    }
    let corrupt = |reason: String| ReplicaError::StateCorrupt { path: path.clone(), reason };
    let f = storage.open(&path).map_err(LogError::io("open raft state", &path))?;
    let len = f.len().map_err(LogError::io("raft state length", &path))?;
    if len > MAX_RAFT_STATE_BYTES {
        return Err(corrupt(format!("{len} bytes, more than the {MAX_RAFT_STATE_BYTES} it can be")));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(0, &mut buf).map_err(LogError::io("read raft state", &path))?;
    DurableState::decode(&buf).map(Some).map_err(corrupt)
}

/// Replaces `<dir>/raft-state` durably with `state`: once this returns, a crash keeps it.
pub(crate) fn write(storage: &dyn Storage, dir: &Path, state: &DurableState) -> Result<(), ReplicaError> {
    replace_file(storage, &dir.join(RAFT_STATE_FILE), &state.encode())?;
    storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::MemStorage;

    fn sample() -> DurableState {
        let mut s = DurableState { snapshot_index: 7, snapshot_term: 3, conf_index: 6, ..Default::default() };
        s.hard_state.set_term(5);
        s.hard_state.set_vote(2);
        s.hard_state.set_commit(9);
        s.conf_state.set_voters(vec![1, 2, 3]);
        s.conf_state.set_learners(vec![4]);
        s.conf_state.set_auto_leave(true);
        s
    }

    #[test]
    fn round_trips_and_refuses_every_damaged_byte_and_cut() {
        let s = sample();
        let bytes = s.encode();
        assert_eq!(DurableState::decode(&bytes), Ok(s));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(DurableState::decode(&bad).is_err(), "byte {i}");
        }
        for len in 0..bytes.len() {
            assert!(DurableState::decode(&bytes[..len]).is_err(), "length {len}");
        }
        let empty = DurableState::default();
        assert_eq!(DurableState::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn survives_a_crash_once_written_and_refuses_an_oversized_file() -> Result<(), Box<dyn std::error::Error>>
    {
        let mem = Arc::new(MemStorage::new());
        let dir = Path::new("/p");
        mem.create_dir_all(dir)?;
        mem.sync_dir(Path::new("/"))?;
        assert_eq!(read(&*mem, dir)?, None);
        write(&*mem, dir, &sample())?;
        mem.crash();
        assert_eq!(read(&*mem, dir)?, Some(sample()));
        mem.set_contents(&dir.join(RAFT_STATE_FILE), &vec![0; MAX_RAFT_STATE_BYTES as usize + 1])?;
        assert!(matches!(read(&*mem, dir), Err(ReplicaError::StateCorrupt { .. })));
        Ok(())
    }
}
