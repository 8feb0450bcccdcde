//! Committed offsets of consumer groups (docs/design.md §5.4).
//!
//! An append-only file of CRC-framed entries; the last entry for a key wins. `commit` returns
//! after the entry is fsynced; `set_lazy` (acks on a subscription) only marks the key dirty and
//! `flush` persists dirty keys, so acks cost no IO each. Snapshots bound the file's size.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use quiver_protocol::codec::{Reader, WriteExt};
use quiver_protocol::limits::{MAX_STRING_BYTES, MAX_TOPIC_NAME_BYTES};

/// (group, topic, partition).
pub type OffsetKey = (Arc<str>, Arc<str>, u32);

const ENTRY_MAX_BYTES: usize = 2 + MAX_STRING_BYTES + 2 + MAX_TOPIC_NAME_BYTES + 4 + 8;
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
    offsets: HashMap<OffsetKey, u64>,
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
        let (offsets, good) = parse_entries(&data);
        if good < data.len() {
            tracing::warn!(path = %path.display(), dropped = data.len() - good, "offsets store: dropped a damaged tail");
            file.set_len(good as u64).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        let state = State { offsets, dirty: HashSet::new(), file_bytes: good as u64 };
        Ok(OffsetStore { path, state: Mutex::new(state), file: Mutex::new(file) })
    }

    pub fn get(&self, key: &OffsetKey) -> Option<u64> {
        self.state.lock().offsets.get(key).copied()
    }

    /// All committed offsets of one group and topic.
    pub fn for_topic(&self, group: &str, topic: &str) -> HashMap<u32, u64> {
        let st = self.state.lock();
        st.offsets
            .iter()
            .filter(|((g, t, _), _)| &**g == group && &**t == topic)
            .map(|((_, _, p), o)| (*p, *o))
            .collect()
    }

    /// Every committed offset (for metrics).
    pub fn all(&self) -> Vec<(OffsetKey, u64)> {
        self.state.lock().offsets.iter().map(|(k, o)| (k.clone(), *o)).collect()
    }

    /// Records an offset in memory unless a higher one is there (acks only move forward);
    /// `flush` persists it.
    pub fn set_lazy_max(&self, key: OffsetKey, offset: u64) {
        let mut st = self.state.lock();
        let current = st.offsets.get(&key).copied().unwrap_or(0);
        if offset > current || !st.offsets.contains_key(&key) {
            st.offsets.insert(key.clone(), offset);
            st.dirty.insert(key);
        }
    }

    /// Records an offset in memory; `flush` persists it.
    pub fn set_lazy(&self, key: OffsetKey, offset: u64) {
        let mut st = self.state.lock();
        st.offsets.insert(key.clone(), offset);
        st.dirty.insert(key);
    }

    /// Durably records an offset. Blocking: call from a blocking thread.
    pub fn commit_blocking(&self, key: OffsetKey, offset: u64) -> Result<(), OffsetsError> {
        // File lock first, for the whole update: a concurrent flush cannot then write an older
        // value after this one.
        let mut file = self.file.lock();
        let mut buf = BytesMut::new();
        put_entry(&mut buf, &key, offset);
        {
            let mut st = self.state.lock();
            st.offsets.insert(key.clone(), offset);
            st.dirty.remove(&key);
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
                if let Some(o) = st.offsets.get(&key) {
                    put_entry(&mut buf, &key, *o);
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
            st.offsets.retain(|(_, t, _), _| &**t != topic);
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
            let live: u64 =
                st.offsets.keys().map(|(g, t, _)| (8 + 2 + g.len() + 2 + t.len() + 12) as u64).sum();
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
            let st = self.state.lock();
            let mut buf = BytesMut::new();
            for (key, o) in &st.offsets {
                put_entry(&mut buf, key, *o);
            }
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

fn put_entry(buf: &mut BytesMut, (group, topic, partition): &OffsetKey, offset: u64) {
    let mut body = BytesMut::new();
    body.put_string(group);
    body.put_string(topic);
    body.put_u32_le(*partition);
    body.put_u64_le(offset);
    buf.put_u32_le(body.len() as u32);
    buf.put_u32_le(crc32c::crc32c(&body));
    buf.put_slice(&body);
}

/// Parses entries until the first damaged one; returns the map and the good length.
fn parse_entries(data: &[u8]) -> (HashMap<OffsetKey, u64>, usize) {
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
        let entry = (|| {
            let g = r.string("group", MAX_STRING_BYTES)?;
            let t = r.string("topic", MAX_TOPIC_NAME_BYTES)?;
            Ok::<_, quiver_protocol::DecodeError>(((Arc::from(g), Arc::from(t), r.u32()?), r.u64()?))
        })();
        match entry {
            Ok((k, o)) => {
                map.insert(k, o);
            }
            Err(_) => break,
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
            s.commit_blocking(key("g", "t", 0), 5).expect("commit");
            s.commit_blocking(key("g", "t", 0), 7).expect("commit");
            s.commit_blocking(key("g", "t", 1), 3).expect("commit");
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
    fn garbage_never_panics() {
        for seed in 0u32..200 {
            let data: Vec<u8> =
                (0..64).map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8).collect();
            let _ = parse_entries(&data);
        }
    }
}
