//! Committed offsets and acknowledgements of consumer groups (docs/design.md §5.4, §12).
//!
//! Each (group, topic, partition) has an `AckLedger`: the ack floor (the committed offset),
//! acknowledged ranges above it and delivery counts. The file is append-only, of CRC-framed
//! entries; the last entry for a key wins. `commit` returns after the entry is fsynced; acks on
//! a subscription only mark the key dirty and `flush` persists dirty keys, so acks cost no IO
//! each. Snapshots bound the file's size.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use quiver_protocol::codec::{Reader, WriteExt};
use quiver_protocol::ledger::{AckLedger, LedgerSnapshot};
use quiver_protocol::limits::{MAX_STRING_BYTES, MAX_TOPIC_NAME_BYTES};

/// (group, topic, partition).
pub type OffsetKey = (Arc<str>, Arc<str>, u32);

/// A group's acknowledgement state for one partition, shared with its subscription.
pub type SharedLedger = Arc<Mutex<AckLedger>>;

/// Acknowledged ranges (and, separately, delivery-count ranges) kept per entry; beyond them a
/// restart delivers again (design.md §12).
pub const MAX_PERSISTED_RANGES: usize = 1024;

const ENTRY_MAX_BYTES: usize = 2
    + MAX_STRING_BYTES
    + 2
    + MAX_TOPIC_NAME_BYTES
    + 4
    + 8
    + 4
    + 16 * MAX_PERSISTED_RANGES
    + 4
    + 20 * MAX_PERSISTED_RANGES;
const SNAPSHOT_MIN_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("offsets store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

#[derive(Debug)]
pub struct OffsetStore {
    path: PathBuf,
    state: Mutex<State>,
    /// Serialises file writers (commits, flushes, snapshots); held only on blocking threads.
    file: Mutex<File>,
}

#[derive(Debug, Default)]
struct State {
    ledgers: HashMap<OffsetKey, SharedLedger>,
    /// Size of each key's last written entry, to tell when a snapshot pays.
    entry_bytes: HashMap<OffsetKey, u64>,
    dirty: HashSet<OffsetKey>,
    file_bytes: u64,
}

impl OffsetStore {
    /// Opens (or creates) `<dir>/offsets.log`, recovering up to the first damaged entry.
    pub fn open(dir: &Path) -> Result<Self, OffsetsError> {
        let path = dir.join("offsets.log");
        let io_err = |source| OffsetsError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io_err)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io_err)?;
        let (entries, good) = parse_entries(&data);
        if good < data.len() {
            tracing::warn!(path = %path.display(), dropped = data.len() - good, "offsets store: dropped a damaged tail");
            file.set_len(good as u64).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        let mut state = State { file_bytes: good as u64, ..Default::default() };
        for (key, snapshot) in entries {
            state.ledgers.insert(key, Arc::new(Mutex::new(AckLedger::restore(&snapshot))));
        }
        Ok(OffsetStore { path, state: Mutex::new(state), file: Mutex::new(file) })
    }

    /// The committed offset (the ack floor).
    pub fn get(&self, key: &OffsetKey) -> Option<u64> {
        let l = self.state.lock().ledgers.get(key).cloned()?;
        let floor = l.lock().floor();
        Some(floor)
    }

    /// The key's ledger; a new one with its floor at `start` if it has none.
    pub fn ledger(&self, key: &OffsetKey, start: u64) -> SharedLedger {
        self.state
            .lock()
            .ledgers
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Mutex::new(AckLedger::new(start))))
            .clone()
    }

    /// The key's ledger changed; `flush` persists it.
    pub fn mark_dirty(&self, key: &OffsetKey) {
        let mut st = self.state.lock();
        if !st.dirty.contains(key) {
            st.dirty.insert(key.clone());
        }
    }

    fn floors(&self, filter: impl Fn(&OffsetKey) -> bool) -> Vec<(OffsetKey, u64)> {
        let ledgers: Vec<(OffsetKey, SharedLedger)> = self
            .state
            .lock()
            .ledgers
            .iter()
            .filter(|(k, _)| filter(k))
            .map(|(k, l)| (k.clone(), l.clone()))
            .collect();
        ledgers.into_iter().map(|(k, l)| (k, l.lock().floor())).collect()
    }

    /// All committed offsets of one group and topic.
    pub fn for_topic(&self, group: &str, topic: &str) -> HashMap<u32, u64> {
        self.floors(|(g, t, _)| &**g == group && &**t == topic)
            .into_iter()
            .map(|((_, _, p), o)| (p, o))
            .collect()
    }

    /// Every committed offset (for metrics).
    pub fn all(&self) -> Vec<(OffsetKey, u64)> {
        self.floors(|_| true)
    }

    /// Sets an offset in memory (an administrative reset); `flush` persists it.
    pub fn set_lazy(&self, key: OffsetKey, offset: u64) {
        self.ledger(&key, offset).lock().reset(offset);
        self.mark_dirty(&key);
    }

    /// Durably commits an offset: everything below it is acknowledged. A commit below the
    /// current floor resets the ledger when `reset` is allowed (tools on an empty group) and
    /// is otherwise ignored (members only move forward). Blocking: call from a blocking thread.
    pub fn commit_blocking(&self, key: OffsetKey, offset: u64, reset: bool) -> Result<(), OffsetsError> {
        // File lock first, for the whole update: a concurrent flush cannot then write an older
        // value after this one.
        let mut file = self.file.lock();
        let ledger = self.ledger(&key, offset);
        let snapshot = {
            let mut l = ledger.lock();
            if offset >= l.floor() {
                l.commit(offset);
            } else if reset {
                l.reset(offset);
            }
            l.snapshot(MAX_PERSISTED_RANGES)
        };
        let mut buf = BytesMut::new();
        let size = put_entry(&mut buf, &key, &snapshot);
        {
            let mut st = self.state.lock();
            st.dirty.remove(&key);
            st.entry_bytes.insert(key, size);
        }
        self.append_locked(&mut file, &buf)
    }

    /// Persists every dirty offset. Blocking.
    pub fn flush_blocking(&self) -> Result<(), OffsetsError> {
        let mut file = self.file.lock();
        let buf = {
            let mut st = self.state.lock();
            if st.dirty.is_empty() {
                return Ok(());
            }
            let mut buf = BytesMut::new();
            for key in std::mem::take(&mut st.dirty) {
                if let Some(l) = st.ledgers.get(&key) {
                    let snapshot = l.lock().snapshot(MAX_PERSISTED_RANGES);
                    let size = put_entry(&mut buf, &key, &snapshot);
                    st.entry_bytes.insert(key, size);
                }
            }
            buf
        };
        self.append_locked(&mut file, &buf)?;
        drop(file);
        self.maybe_snapshot_blocking()
    }

    /// Forgets every offset of a deleted topic, durably (by rewriting the snapshot).
    pub fn remove_topic_blocking(&self, topic: &str) -> Result<(), OffsetsError> {
        {
            let mut st = self.state.lock();
            st.ledgers.retain(|(_, t, _), _| &**t != topic);
            st.entry_bytes.retain(|(_, t, _), _| &**t != topic);
            st.dirty.retain(|(_, t, _)| &**t != topic);
        }
        self.snapshot_blocking()
    }

    fn append_locked(&self, file: &mut File, buf: &[u8]) -> Result<(), OffsetsError> {
        let io_err = |source| OffsetsError::Io { path: self.path.clone(), source };
        file.write_all(buf).map_err(io_err)?;
        file.sync_data().map_err(io_err)?;
        self.state.lock().file_bytes += buf.len() as u64;
        Ok(())
    }

    fn maybe_snapshot_blocking(&self) -> Result<(), OffsetsError> {
        let (bytes, live) = {
            let st = self.state.lock();
            if st.file_bytes < SNAPSHOT_MIN_BYTES {
                return Ok(());
            }
            let live: u64 = st.entry_bytes.values().sum();
            (st.file_bytes, live)
        };
        if bytes > 4 * live {
            self.snapshot_blocking()?;
        }
        Ok(())
    }

    /// Rewrites the file with one entry per live key: tmp, fsync, rename, fsync dir.
    fn snapshot_blocking(&self) -> Result<(), OffsetsError> {
        let io_err = |source| OffsetsError::Io { path: self.path.clone(), source };
        let mut file = self.file.lock();
        let buf = {
            let mut st = self.state.lock();
            let mut buf = BytesMut::new();
            let mut sizes = HashMap::new();
            for (key, l) in &st.ledgers {
                let snapshot = l.lock().snapshot(MAX_PERSISTED_RANGES);
                sizes.insert(key.clone(), put_entry(&mut buf, key, &snapshot));
            }
            st.entry_bytes = sizes;
            buf
        };
        let tmp = self.path.with_extension("log.tmp");
        let mut f = File::create(&tmp).map_err(io_err)?;
        f.write_all(&buf).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, &self.path).map_err(io_err)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }
        *file = OpenOptions::new().append(true).open(&self.path).map_err(io_err)?;
        self.state.lock().file_bytes = buf.len() as u64;
        Ok(())
    }
}

/// Appends one entry; returns its size.
fn put_entry(buf: &mut BytesMut, (group, topic, partition): &OffsetKey, s: &LedgerSnapshot) -> u64 {
    let mut body = BytesMut::new();
    body.put_string(group);
    body.put_string(topic);
    body.put_u32_le(*partition);
    body.put_u64_le(s.floor);
    body.put_u32_le(s.acked.len() as u32);
    for r in &s.acked {
        body.put_u64_le(r.start);
        body.put_u64_le(r.end);
    }
    body.put_u32_le(s.counts.len() as u32);
    for (r, c) in &s.counts {
        body.put_u64_le(r.start);
        body.put_u64_le(r.end);
        body.put_u32_le(*c);
    }
    buf.put_u32_le(body.len() as u32);
    buf.put_u32_le(crc32c::crc32c(&body));
    buf.put_slice(&body);
    8 + body.len() as u64
}

/// The snapshot of an entry body after its key: the floor, then the ranges, which are absent
/// in entries written before acknowledgements above the floor were kept.
fn get_snapshot(r: &mut Reader) -> Result<LedgerSnapshot, quiver_protocol::DecodeError> {
    let mut s = LedgerSnapshot { floor: r.u64()?, ..Default::default() };
    if r.remaining() > 0 {
        s.acked = r.list("acked", 16, |r| Ok(r.u64()?..r.u64()?))?;
        s.counts = r.list("counts", 20, |r| Ok((r.u64()?..r.u64()?, r.u32()?)))?;
    }
    Ok(s)
}

/// Parses entries until the first damaged one; returns the snapshots and the good length.
fn parse_entries(data: &[u8]) -> (HashMap<OffsetKey, LedgerSnapshot>, usize) {
    let mut map = HashMap::new();
    let mut pos = 0;
    while data.len() - pos >= 8 {
        let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len > ENTRY_MAX_BYTES || data.len() - pos - 8 < len {
            break;
        }
        let body = &data[pos + 8..pos + 8 + len];
        if crc32c::crc32c(body) != crc {
            break;
        }
        let mut r = Reader::new(Bytes::copy_from_slice(body));
        let key = (|| {
            let g = r.string("group", MAX_STRING_BYTES)?;
            let t = r.string("topic", MAX_TOPIC_NAME_BYTES)?;
            Ok::<OffsetKey, quiver_protocol::DecodeError>((Arc::from(g), Arc::from(t), r.u32()?))
        })();
        // An entry that is intact (the checksum holds) but not understood is skipped rather
        // than dropping what follows; its key's older entries are void too (it replaced them).
        match key.map(|k| (get_snapshot(&mut r), k)) {
            Ok((Ok(s), k)) => {
                map.insert(k, s);
            }
            Ok((Err(e), k)) => {
                tracing::warn!(group = %k.0, topic = %k.1, partition = k.2, "offsets store: skipping an entry that does not decode: {e}");
                map.remove(&k);
            }
            Err(e) => tracing::warn!("offsets store: skipping an entry that does not decode: {e}"),
        }
        pos += 8 + len;
    }
    (map, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(g: &str, t: &str, p: u32) -> OffsetKey {
        (Arc::from(g), Arc::from(t), p)
    }

    #[test]
    fn commits_survive_reopen_and_damaged_tail_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = OffsetStore::open(dir.path()).expect("open");
            s.commit_blocking(key("g", "t", 0), 5, false).expect("commit");
            s.commit_blocking(key("g", "t", 0), 7, false).expect("commit");
            s.commit_blocking(key("g", "t", 1), 3, false).expect("commit");
            s.set_lazy(key("h", "t", 0), 9);
            s.flush_blocking().expect("flush");
        }
        // A torn entry at the end.
        let path = dir.path().join("offsets.log");
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[20, 0, 0, 0, 1, 2]).expect("write");
        drop(f);
        let s = OffsetStore::open(dir.path()).expect("reopen");
        assert_eq!(s.get(&key("g", "t", 0)), Some(7));
        assert_eq!(s.get(&key("g", "t", 1)), Some(3));
        assert_eq!(s.get(&key("h", "t", 0)), Some(9));
        s.remove_topic_blocking("t").expect("remove");
        let s = OffsetStore::open(dir.path()).expect("reopen");
        assert_eq!(s.get(&key("g", "t", 0)), None);
    }

    #[test]
    fn acks_above_the_floor_and_counts_survive_reopen() {
        use quiver_protocol::ledger::{Piece, NO_DEADLINE};
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key("g", "t", 0);
        {
            let s = OffsetStore::open(dir.path()).expect("open");
            let l = s.ledger(&k, 0);
            {
                let mut l = l.lock();
                l.deliver(0..10, NO_DEADLINE);
                l.ack(0..2);
                l.ack(5..7);
            }
            s.mark_dirty(&k);
            s.flush_blocking().expect("flush");
        }
        let s = OffsetStore::open(dir.path()).expect("reopen");
        assert_eq!(s.get(&k), Some(2));
        let l = s.ledger(&k, 0);
        let pieces = l.lock().deliver(0..12, NO_DEADLINE);
        let p = |range, count| Piece { range, count };
        assert_eq!(pieces, vec![p(2..5, 2), p(7..10, 2), p(10..12, 1)]);
    }

    #[test]
    fn garbage_never_panics() {
        for seed in 0u32..200 {
            let data: Vec<u8> =
                (0..64).map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8).collect();
            let _ = parse_entries(&data);
        }
    }
}
