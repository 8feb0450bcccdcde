//! Committed offsets and acknowledgements of consumer groups (docs/design.md §5.4, §12).
//!
//! Each (group, topic, partition) has an `AckLedger`: the ack floor (the committed offset),
//! acknowledged ranges above it and delivery counts. The file is append-only, of CRC-framed
//! entries; the last entry for a key wins. `commit` returns after the entry is fsynced; acks on
//! a subscription only mark the key dirty and `flush` persists dirty keys, so acks cost no IO
//! each. Snapshots bound the file's size.
//!
//! One write protocol (design.md §6.1): append, then fsync; a failed write or fsync poisons the
//! store (nothing more is written or acknowledged until the broker reopens it), and the memory
//! changes only once the write is durable. The file lives on the broker's [`Storage`], so tests
//! crash it with the storage's crash model.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use quiver_protocol::codec::{Reader, WriteExt};
use quiver_protocol::ledger::{AckLedger, LedgerSnapshot};
use quiver_protocol::limits::{
    MAX_OFFSETS_FILE_BYTES, MAX_PERSISTED_RANGES, MAX_STRING_BYTES, MAX_TOPIC_NAME_BYTES,
};

use crate::storage::{Storage, StorageFile};

/// (group, topic, partition).
pub type OffsetKey = (Arc<str>, Arc<str>, u32);

/// A group's acknowledgement state for one partition, shared with its subscription.
pub type SharedLedger = Arc<Mutex<LedgerEntry>>;

/// A ledger, and whether its key is in the store's dirty set: only the change that sets the
/// flag takes the store's lock, so acks and deliveries mark a ledger dirty without a
/// broker-wide lock (design.md §12). The flag is set and cleared under the ledger's lock;
/// while it is set, the key is in the dirty set or taken by a flush that has yet to snapshot
/// the ledger.
#[derive(Debug, Clone, Default)]
pub struct LedgerEntry {
    ledger: AckLedger,
    dirty: bool,
}

impl From<AckLedger> for LedgerEntry {
    fn from(ledger: AckLedger) -> Self {
        LedgerEntry { ledger, dirty: false }
    }
}

impl std::ops::Deref for LedgerEntry {
    type Target = AckLedger;
    fn deref(&self) -> &AckLedger {
        &self.ledger
    }
}

impl std::ops::DerefMut for LedgerEntry {
    fn deref_mut(&mut self) -> &mut AckLedger {
        &mut self.ledger
    }
}

const ENTRY_MAX_BYTES: usize = 2
    + MAX_STRING_BYTES
    + 2
    + MAX_TOPIC_NAME_BYTES
    + 4
    + 8
    + 4
    + 16 * MAX_PERSISTED_RANGES
    + 4
    + 20 * MAX_PERSISTED_RANGES
    + 8
    + 4
    + 16 * MAX_PERSISTED_RANGES;
const SNAPSHOT_MIN_BYTES: u64 = 1024 * 1024;
/// Bytes read from the file at a time at open.
const READ_CHUNK_BYTES: usize = 1024 * 1024;
const FILE_NAME: &str = "offsets.log";
const TMP_NAME: &str = "offsets.log.tmp";

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("offsets store {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The file is (or would become) larger than [`MAX_OFFSETS_FILE_BYTES`].
    #[error("offsets store {}: {bytes} bytes is more than the limit of {limit} bytes", path.display())]
    TooLarge { path: PathBuf, bytes: u64, limit: u64 },
    /// An earlier write or fsync failed. Linux reports a writeback error to one fsync only, so a
    /// later fsync proves nothing: nothing more is acknowledged until the broker restarts and
    /// recovers the file from what is really on disk.
    #[error("offsets store {}: an earlier write or sync failed; nothing more is stored until the broker restarts", path.display())]
    Poisoned { path: PathBuf },
}

#[derive(Debug)]
pub struct OffsetStore {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    path: PathBuf,
    state: Mutex<State>,
    /// Serialises file writers (commits, flushes, snapshots); held only on blocking threads.
    writer: Mutex<Writer>,
    /// [`MAX_OFFSETS_FILE_BYTES`], smaller in tests.
    max_file_bytes: u64,
    /// Bumped by every `mark_dirty` (under the state lock): a change marked with epoch `e` is
    /// in every flush that takes the dirty set at epoch `e` or later.
    epoch: AtomicU64,
    /// Every change marked at or below this epoch is durable: a flush that needs no more
    /// returns without writing (concurrent flushes share one fsync).
    durable_epoch: AtomicU64,
}

#[derive(Debug)]
struct Writer {
    file: Arc<dyn StorageFile>,
    /// Set when a write or fsync failed; see [`OffsetsError::Poisoned`].
    poisoned: bool,
}

#[derive(Debug, Default)]
struct State {
    ledgers: HashMap<OffsetKey, SharedLedger>,
    /// Size of each key's last written entry, to tell when a snapshot pays.
    entry_bytes: HashMap<OffsetKey, u64>,
    dirty: HashSet<OffsetKey>,
    file_bytes: u64,
}

/// The entries of `ledgers` as they are now, each taken out of the dirty set (its flag
/// cleared under its lock, before its snapshot): the bytes, each entry's size, and each
/// ledger with the horizon written.
#[allow(clippy::type_complexity)]
fn snapshot_entries(
    ledgers: &[(OffsetKey, SharedLedger)],
) -> (BytesMut, Vec<(OffsetKey, u64)>, Vec<(SharedLedger, u64)>) {
    let mut buf = BytesMut::new();
    let mut sizes = Vec::with_capacity(ledgers.len());
    let mut written = Vec::with_capacity(ledgers.len());
    for (key, l) in ledgers {
        let snapshot = {
            let mut l = l.lock();
            l.dirty = false;
            l.snapshot(MAX_PERSISTED_RANGES)
        };
        sizes.push((key.clone(), put_entry(&mut buf, key, &snapshot)));
        written.push((l.clone(), snapshot.horizon));
    }
    (buf, sizes, written)
}

/// What a commit does to a ledger: move it forward, or reset it when allowed.
fn apply_commit(l: &mut AckLedger, offset: u64, reset: bool) {
    if offset >= l.floor() {
        l.commit(offset);
    } else if reset {
        l.reset(offset);
    }
}

impl OffsetStore {
    /// Opens (or creates) `<dir>/offsets.log` on `storage`, recovering up to the first damaged
    /// entry. Refuses a file larger than [`MAX_OFFSETS_FILE_BYTES`].
    pub fn open(storage: Arc<dyn Storage>, dir: &Path) -> Result<Self, OffsetsError> {
        Self::open_with_limit(storage, dir, MAX_OFFSETS_FILE_BYTES)
    }

    /// `open` with another size limit than [`MAX_OFFSETS_FILE_BYTES`] (tests).
    pub(crate) fn open_with_limit(
        storage: Arc<dyn Storage>,
        dir: &Path,
        max_file_bytes: u64,
    ) -> Result<Self, OffsetsError> {
        let path = dir.join(FILE_NAME);
        let io_err = |source| OffsetsError::Io { path: path.clone(), source };
        storage.create_dir_all(dir).map_err(io_err)?;
        let names = storage.list(dir).map_err(io_err)?;
        if names.iter().any(|n| n == TMP_NAME) {
            // A snapshot that never replaced the file (a crash before its rename).
            storage.remove(&dir.join(TMP_NAME)).map_err(io_err)?;
        }
        let created = !names.iter().any(|n| n == FILE_NAME);
        let file = storage.open(&path).map_err(io_err)?;
        if created {
            // The new name (and the directory's, on a first start) must survive a crash
            // before anything is acknowledged from the file.
            storage.sync_dir(dir).map_err(io_err)?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                storage.sync_dir(parent).map_err(io_err)?;
            }
        }
        let len = file.len().map_err(io_err)?;
        if len > max_file_bytes {
            return Err(OffsetsError::TooLarge { path, bytes: len, limit: max_file_bytes });
        }
        let (entries, good) = read_entries(&*file, len).map_err(io_err)?;
        if good < len {
            tracing::warn!(path = %path.display(), dropped = len - good, "offsets store: dropped a damaged tail");
            file.truncate(good).map_err(io_err)?;
            file.sync().map_err(io_err)?;
        }
        let mut state = State { file_bytes: good, ..Default::default() };
        for (key, snapshot) in entries {
            state.ledgers.insert(key, Arc::new(Mutex::new(AckLedger::restore(&snapshot).into())));
        }
        Ok(OffsetStore {
            storage,
            dir: dir.to_path_buf(),
            path,
            state: Mutex::new(state),
            writer: Mutex::new(Writer { file, poisoned: false }),
            max_file_bytes,
            epoch: AtomicU64::new(0),
            durable_epoch: AtomicU64::new(0),
        })
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
            .or_insert_with(|| Arc::new(Mutex::new(AckLedger::new(start).into())))
            .clone()
    }

    /// The key's ledger changed; `flush` persists it. Returns the change's epoch, for
    /// [`flush_to_blocking`](Self::flush_to_blocking).
    pub fn mark_dirty(&self, key: &OffsetKey) -> u64 {
        let ledger = self.state.lock().ledgers.get(key).cloned();
        match ledger {
            Some(l) => self.mark_dirty_locked(key, &mut l.lock()),
            None => {
                self.state.lock().dirty.insert(key.clone());
                self.epoch.fetch_add(1, SeqCst) + 1
            }
        }
    }

    /// [`mark_dirty`](Self::mark_dirty) for a ledger its caller changed and still holds
    /// locked: takes the store's lock only if the key is not dirty already.
    pub fn mark_dirty_locked(&self, key: &OffsetKey, entry: &mut LedgerEntry) -> u64 {
        if !entry.dirty {
            entry.dirty = true;
            self.state.lock().dirty.insert(key.clone());
        }
        self.epoch.fetch_add(1, SeqCst) + 1
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

    /// Cuts every group's ledger to the end of its partition's log as recovered at start
    /// (`log_end` of a topic and partition; `None` for one that no longer exists): nothing at
    /// or past it was handed out, so the delivered horizon does not reach over records
    /// written after the restart (design.md §12). Persists the cut horizons, so a later
    /// crash does not bring them back. Call before serving. Blocking.
    pub fn cut_to_logs_blocking(
        &self,
        log_end: impl Fn(&str, u32) -> Option<u64>,
    ) -> Result<(), OffsetsError> {
        let ledgers: Vec<(OffsetKey, SharedLedger)> =
            self.state.lock().ledgers.iter().map(|(k, l)| (k.clone(), l.clone())).collect();
        for (key, l) in ledgers {
            let Some(end) = log_end(&key.1, key.2) else { continue };
            let cut = {
                let mut l = l.lock();
                let cut = l.horizon() > end.max(l.floor());
                l.cut_at(end);
                cut
            };
            if cut {
                self.mark_dirty(&key);
            }
        }
        self.flush_blocking()
    }

    /// Sets an offset in memory (an administrative reset); `flush` persists it.
    pub fn set_lazy(&self, key: OffsetKey, offset: u64) {
        self.ledger(&key, offset).lock().reset(offset);
        self.mark_dirty(&key);
    }

    /// Durably commits an offset: everything below it is acknowledged. A commit below the
    /// current floor resets the ledger when `reset` is allowed (tools on an empty group) and
    /// is otherwise ignored (members only move forward). The ledger changes only once the entry
    /// is durable: a failed commit is never visible. Blocking: call from a blocking thread.
    pub fn commit_blocking(&self, key: OffsetKey, offset: u64, reset: bool) -> Result<(), OffsetsError> {
        // Writer lock first, for the whole update: a concurrent flush cannot then write an
        // older value after this one.
        let mut w = self.writer.lock();
        self.check_usable(&w)?;
        let mut compacted = false;
        let size = loop {
            // Out of the dirty set before the snapshot: a change made after it marks the key
            // again.
            let (was_dirty, existing) = {
                let mut st = self.state.lock();
                (st.dirty.remove(&key), st.ledgers.get(&key).cloned())
            };
            let snapshot = match &existing {
                Some(l) => {
                    let mut next = {
                        let mut l = l.lock();
                        l.dirty = false; // out of the dirty set, and snapshotted now
                        l.ledger.clone()
                    };
                    apply_commit(&mut next, offset, reset);
                    next.snapshot(MAX_PERSISTED_RANGES)
                }
                None => AckLedger::new(offset).snapshot(MAX_PERSISTED_RANGES),
            };
            let mut buf = BytesMut::new();
            let size = put_entry(&mut buf, &key, &snapshot);
            let restore = |e| {
                if was_dirty {
                    self.state.lock().dirty.insert(key.clone());
                }
                e
            };
            if !compacted && self.would_pass_limit(buf.len()) {
                // Make room first, then take the snapshot again (the rewrite took the dirty set).
                self.state.lock().dirty.extend(was_dirty.then(|| key.clone()));
                self.rewrite_locked(&mut w, |_| true)?;
                compacted = true;
                continue;
            }
            self.append_locked(&mut w, &buf).map_err(restore)?;
            // The same operation on the live ledger (acks may have moved it meanwhile).
            {
                let ledger = self.ledger(&key, offset);
                let mut l = ledger.lock();
                apply_commit(&mut l, offset, reset);
                l.persisted(snapshot.horizon);
            }
            break size;
        };
        self.state.lock().entry_bytes.insert(key, size);
        // The commit is durable: a failed compaction only logs (the file stays as it was, or
        // the store is poisoned and the next write reports it).
        self.compact_locked(&mut w);
        Ok(())
    }

    /// Persists every dirty key. After it returns `Ok`, every change marked dirty before the
    /// call is durable; after an error the keys stay dirty. Blocking.
    pub fn flush_blocking(&self) -> Result<(), OffsetsError> {
        self.flush_to_blocking(self.epoch.load(SeqCst))
    }

    /// Makes every change marked dirty with an epoch up to `epoch` durable. Returns at once
    /// when a completed write already covered them, so waiters queued behind one fsync do not
    /// each write again (changes marked meanwhile wait for the next flush). Blocking.
    pub fn flush_to_blocking(&self, epoch: u64) -> Result<(), OffsetsError> {
        if self.durable_epoch.load(SeqCst) >= epoch {
            return Ok(());
        }
        let mut w = self.writer.lock();
        if self.durable_epoch.load(SeqCst) >= epoch {
            return Ok(()); // written while this call waited for the lock
        }
        self.check_usable(&w)?;
        self.flush_locked(&mut w)
    }

    /// The periodic flush: persists every dirty key, then compacts the file when a snapshot
    /// is due, also when nothing was dirty (a file left large by an earlier run). Blocking.
    pub fn maintain_blocking(&self) -> Result<(), OffsetsError> {
        let mut w = self.writer.lock();
        self.check_usable(&w)?;
        self.flush_locked(&mut w)?;
        self.maybe_snapshot_locked(&mut w)
    }

    fn flush_locked(&self, w: &mut Writer) -> Result<(), OffsetsError> {
        let (keys, ledgers, epoch) = {
            let mut st = self.state.lock();
            // Every change marked up to here is in the dirty set or was written (writers hold
            // the writer lock, and a failed one puts its keys back before releasing it).
            let epoch = self.epoch.load(SeqCst);
            if st.dirty.is_empty() {
                self.durable_epoch.fetch_max(epoch, SeqCst);
                return Ok(());
            }
            let keys = std::mem::take(&mut st.dirty);
            let ledgers: Vec<(OffsetKey, SharedLedger)> =
                keys.iter().filter_map(|k| Some((k.clone(), st.ledgers.get(k)?.clone()))).collect();
            (keys, ledgers, epoch)
        };
        // Snapshots outside the store's lock (a marker holds its ledger's lock, then the store's).
        let (buf, sizes, written) = snapshot_entries(&ledgers);
        if self.would_pass_limit(buf.len()) {
            // A rewrite writes every key as it is now (newer than these snapshots), so it
            // replaces the append; it takes the dirty set itself.
            self.state.lock().dirty.extend(keys);
            return self.rewrite_locked(w, |_| true);
        }
        if let Err(e) = self.append_locked(w, &buf) {
            self.state.lock().dirty.extend(keys);
            return Err(e);
        }
        self.state.lock().entry_bytes.extend(sizes);
        persisted(written);
        self.durable_epoch.fetch_max(epoch, SeqCst);
        self.compact_locked(w);
        Ok(())
    }

    /// The flush at a clean shutdown: lowers every ledger's delivered horizon to what was
    /// really handed out (design.md §12), then persists every dirty key. Under the writer
    /// lock, so no write in flight can report an older horizon durable afterwards. Blocking.
    pub fn close_blocking(&self) -> Result<(), OffsetsError> {
        let mut w = self.writer.lock();
        self.check_usable(&w)?;
        let ledgers: Vec<(OffsetKey, SharedLedger)> =
            self.state.lock().ledgers.iter().map(|(k, l)| (k.clone(), l.clone())).collect();
        for (key, l) in ledgers {
            if l.lock().settle_horizon() {
                self.mark_dirty(&key);
            }
        }
        self.flush_locked(&mut w)
    }

    /// Forgets every offset of a deleted topic, durably (by rewriting the snapshot). The
    /// offsets are forgotten in memory only once the rewrite is durable.
    pub fn remove_topic_blocking(&self, topic: &str) -> Result<(), OffsetsError> {
        let mut w = self.writer.lock();
        self.check_usable(&w)?;
        self.rewrite_locked(&mut w, |(_, t, _)| &**t != topic)?;
        let mut st = self.state.lock();
        st.ledgers.retain(|(_, t, _), _| &**t != topic);
        st.entry_bytes.retain(|(_, t, _), _| &**t != topic);
        st.dirty.retain(|(_, t, _)| &**t != topic);
        Ok(())
    }

    fn io_err(&self) -> impl FnOnce(io::Error) -> OffsetsError + '_ {
        |source| OffsetsError::Io { path: self.path.clone(), source }
    }

    fn check_usable(&self, w: &Writer) -> Result<(), OffsetsError> {
        match w.poisoned {
            true => Err(OffsetsError::Poisoned { path: self.path.clone() }),
            false => Ok(()),
        }
    }

    fn poison(&self, w: &mut Writer, e: &io::Error) {
        w.poisoned = true;
        metrics::gauge!("quiver_offsets_store_poisoned").set(1.0);
        tracing::error!(path = %self.path.display(), "offsets store: a write or sync failed ({e}); no offsets are stored or acknowledged until the broker restarts");
    }

    /// Whether appending `len` bytes would take the file past its limit.
    fn would_pass_limit(&self, len: usize) -> bool {
        self.state.lock().file_bytes + len as u64 > self.max_file_bytes
    }

    fn too_large(&self, bytes: u64) -> OffsetsError {
        OffsetsError::TooLarge { path: self.path.clone(), bytes, limit: self.max_file_bytes }
    }

    /// Appends and fsyncs `buf`; the store is poisoned if either fails.
    fn append_locked(&self, w: &mut Writer, buf: &[u8]) -> Result<(), OffsetsError> {
        let file_bytes = self.state.lock().file_bytes;
        let bytes = file_bytes + buf.len() as u64;
        if bytes > self.max_file_bytes {
            return Err(self.too_large(bytes));
        }
        if let Err(e) = w.file.append(buf).and_then(|()| w.file.sync()) {
            self.poison(w, &e);
            return Err(self.io_err()(e));
        }
        self.state.lock().file_bytes = bytes;
        Ok(())
    }

    /// Compacts when a snapshot is due, after a durable write: a failure is logged, not
    /// returned (what the caller wrote is durable either way).
    fn compact_locked(&self, w: &mut Writer) {
        if let Err(e) = self.maybe_snapshot_locked(w) {
            tracing::warn!(path = %self.path.display(), "offsets store: compaction failed: {e}");
        }
    }

    fn maybe_snapshot_locked(&self, w: &mut Writer) -> Result<(), OffsetsError> {
        let (bytes, live) = {
            let st = self.state.lock();
            (st.file_bytes, st.entry_bytes.values().sum::<u64>())
        };
        let due = (bytes >= SNAPSHOT_MIN_BYTES && bytes > 4 * live)
            || (bytes > self.max_file_bytes / 2 && bytes > 2 * live);
        if due {
            self.rewrite_locked(w, |_| true)?;
        }
        Ok(())
    }

    /// Rewrites the file with one entry per live key that `keep` keeps: tmp, fsync, rename,
    /// fsync the directory. A failure before the rename leaves the file as it was; from the
    /// rename on, it poisons the store.
    fn rewrite_locked(&self, w: &mut Writer, keep: impl Fn(&OffsetKey) -> bool) -> Result<(), OffsetsError> {
        // Every key is written, so none stays dirty (taken before the snapshots, see commit).
        let (ledgers, dirty, epoch) = {
            let mut st = self.state.lock();
            let epoch = self.epoch.load(SeqCst);
            let dirty = std::mem::take(&mut st.dirty);
            let ledgers: Vec<(OffsetKey, SharedLedger)> =
                st.ledgers.iter().filter(|(k, _)| keep(k)).map(|(k, l)| (k.clone(), l.clone())).collect();
            (ledgers, dirty, epoch)
        };
        let (buf, sizes, written) = snapshot_entries(&ledgers);
        let sizes: HashMap<OffsetKey, u64> = sizes.into_iter().collect();
        let restore_dirty = |e: OffsetsError| {
            self.state.lock().dirty.extend(dirty.iter().cloned());
            e
        };
        if buf.len() as u64 > self.max_file_bytes {
            return Err(restore_dirty(self.too_large(buf.len() as u64)));
        }
        let tmp = self.dir.join(TMP_NAME);
        if let Err(e) = self.write_new_file(&tmp, &buf) {
            let _ = self.storage.remove(&tmp);
            return Err(restore_dirty(self.io_err()(e)));
        }
        let renamed = self
            .storage
            .rename(&tmp, &self.path)
            .and_then(|()| self.storage.sync_dir(&self.dir))
            .and_then(|()| self.storage.open(&self.path));
        match renamed {
            Ok(file) => w.file = file,
            Err(e) => {
                self.poison(w, &e);
                return Err(restore_dirty(self.io_err()(e)));
            }
        }
        {
            let mut st = self.state.lock();
            st.file_bytes = buf.len() as u64;
            st.entry_bytes = sizes;
        }
        persisted(written);
        self.durable_epoch.fetch_max(epoch, SeqCst);
        Ok(())
    }

    fn write_new_file(&self, path: &Path, buf: &[u8]) -> io::Result<()> {
        // A leftover of an earlier failed rewrite would be appended to.
        match self.storage.remove(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let f = self.storage.open(path)?;
        f.append(buf)?;
        f.sync()
    }
}

/// Tells ledgers which horizons their entries made durable.
fn persisted(written: Vec<(SharedLedger, u64)>) {
    for (l, horizon) in written {
        l.lock().persisted(horizon);
    }
}

/// `u32 count, count x {u64 start, u64 end}`.
fn put_ranges(body: &mut BytesMut, ranges: &[std::ops::Range<u64>]) {
    body.put_u32_le(ranges.len() as u32);
    for r in ranges {
        body.put_u64_le(r.start);
        body.put_u64_le(r.end);
    }
}

/// Appends one entry; returns its size.
fn put_entry(buf: &mut BytesMut, (group, topic, partition): &OffsetKey, s: &LedgerSnapshot) -> u64 {
    let mut body = BytesMut::new();
    body.put_string(group);
    body.put_string(topic);
    body.put_u32_le(*partition);
    body.put_u64_le(s.floor);
    put_ranges(&mut body, &s.acked);
    body.put_u32_le(s.counts.len() as u32);
    for (r, c) in &s.counts {
        body.put_u64_le(r.start);
        body.put_u64_le(r.end);
        body.put_u32_le(*c);
    }
    body.put_u64_le(s.horizon);
    put_ranges(&mut body, &s.maybe);
    buf.put_u32_le(body.len() as u32);
    buf.put_u32_le(crc32c::crc32c(&body));
    buf.put_slice(&body);
    8 + body.len() as u64
}

/// The snapshot of an entry body after its key: the floor, then the ranges, the horizon and the
/// maybe-delivered ranges, each absent in entries written by versions before it.
fn get_snapshot(r: &mut Reader) -> Result<LedgerSnapshot, quiver_protocol::DecodeError> {
    let mut s = LedgerSnapshot { floor: r.u64()?, ..Default::default() };
    if r.remaining() > 0 {
        s.acked = r.list("acked", 16, |r| Ok(r.u64()?..r.u64()?))?;
        s.counts = r.list("counts", 20, |r| Ok((r.u64()?..r.u64()?, r.u32()?)))?;
    }
    if r.remaining() > 0 {
        s.horizon = r.u64()?;
    }
    if r.remaining() > 0 {
        s.maybe = r.list("maybe", 16, |r| Ok(r.u64()?..r.u64()?))?;
    }
    Ok(s)
}

/// Reads the entries of a file of `len` bytes a chunk at a time (never more than a chunk and
/// one entry in memory), until the first damaged one; returns them and the good length.
fn read_entries(file: &dyn StorageFile, len: u64) -> io::Result<(HashMap<OffsetKey, LedgerSnapshot>, u64)> {
    let mut map = HashMap::new();
    let mut unparsed: Vec<u8> = Vec::new();
    let (mut good, mut read) = (0u64, 0u64);
    loop {
        let (used, damaged) = parse_entries(&unparsed, &mut map);
        good += used as u64;
        unparsed.drain(..used);
        if damaged || read == len {
            return Ok((map, good));
        }
        let n = (len - read).min(READ_CHUNK_BYTES as u64) as usize;
        let old = unparsed.len();
        unparsed.resize(old + n, 0);
        file.read_exact_at(read, &mut unparsed[old..])?;
        read += n as u64;
    }
}

/// Parses the whole entries at the start of `data` into `map`; returns the bytes they take and
/// whether parsing stopped at a damaged entry (rather than at an incomplete one).
fn parse_entries(data: &[u8], map: &mut HashMap<OffsetKey, LedgerSnapshot>) -> (usize, bool) {
    let mut pos = 0;
    while data.len() - pos >= 8 {
        let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len > ENTRY_MAX_BYTES {
            return (pos, true);
        }
        if data.len() - pos - 8 < len {
            return (pos, false);
        }
        let body = &data[pos + 8..pos + 8 + len];
        if crc32c::crc32c(body) != crc {
            return (pos, true);
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
    (pos, false)
}

#[cfg(test)]
mod tests;
