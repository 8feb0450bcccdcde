//! Committed offsets and acknowledgements of consumer groups (docs/design.md §5.4, §12).
//!
//! Each (group, topic, partition) has an `AckLedger`: the ack floor (the committed offset),
//! acknowledged ranges above it and delivery counts. The store keeps them as records in a
//! partition log of its own, `<dir>/0` (the broker's segment log, Kafka v2 record batches), as
//! Kafka keeps `__consumer_offsets`: the record key names the ledger, the value is its snapshot,
//! an empty value deletes the key, and reading the log from its start the last record of a key
//! wins. So the group state is a partition like any other: in a cluster, a coordinator's store
//! writes the same records through a replicated `__offsets` partition (`Sink::Replicated`,
//! the coordinator module, docs/replication.md §10). `commit` returns after its batch is fsynced
//! (committed, replicated); acks on a subscription only mark the key dirty and `flush` persists
//! dirty keys in one batch, so acks cost no IO each. Compaction appends every live ledger again
//! and drops the segments wholly below it.
//!
//! One write protocol (design.md §6.1): append, then fsync; a failed write or fsync poisons the
//! store (nothing more is written or acknowledged until the broker reopens it), and the memory
//! changes only once the write is durable. The log lives on the broker's [`Storage`], so tests
//! crash it with the storage's crash model.

#[cfg(test)]
mod fuzz_tests;
mod legacy;
mod records;

pub(crate) use records::last_complete_snapshot;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use parking_lot::Mutex;
use quiver_protocol::batch::{ValidatedBatch, BATCH_HEADER_BYTES};
use quiver_protocol::group::GroupSnapshot;
use quiver_protocol::ledger::AckLedger;
use quiver_protocol::limits::{MAX_OFFSETS_FILE_BYTES, MAX_PERSISTED_RANGES};
use quiver_protocol::ErrorCode;

use crate::log::{LogConfig, LogError, PartitionLog};
use crate::storage::Storage;
use records::{WriteBuilder, LEADER_EPOCH};

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

/// Compaction is due once the log holds this much and 4 times the live records (or more than
/// half its limit and twice the live records).
const SNAPSHOT_MIN_BYTES: u64 = 1024 * 1024;
/// How far the offsets log's fsyncs may run ahead of its written recovery point before the
/// periodic flush writes it again (a small file, written with its own fsyncs).
const CHECKPOINT_LAG_BYTES: u64 = 256 * 1024;
/// How long a coordinator's write may wait for its commit before the store gives up on it (and
/// is deposed: the coordinator reads the partition again).
const REPLICATED_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The log's directory in the store's: partition 0 of the internal offsets topic.
pub const LOG_DIR: &str = "0";
/// Segment size of the offsets log (at most the store's limit, which tests make small).
const SEGMENT_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("offsets store {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The log is (or would become) larger than its limit (see [`MAX_OFFSETS_FILE_BYTES`]).
    #[error("offsets store {}: {bytes} bytes is more than the limit of {limit} bytes", path.display())]
    TooLarge { path: PathBuf, bytes: u64, limit: u64 },
    /// An earlier write or fsync failed. Linux reports a writeback error to one fsync only, so a
    /// later fsync proves nothing: nothing more is acknowledged until the broker restarts and
    /// recovers the log from what is really on disk.
    #[error("offsets store {}: an earlier write or sync failed; nothing more is stored until the broker restarts", path.display())]
    Poisoned { path: PathBuf },
    /// The log failed for another reason than IO (damage found where it cannot be stepped over).
    #[error("offsets store {}: {source}", path.display())]
    Log { path: PathBuf, source: LogError },
    /// A cluster's offsets partition is led by another broker (or in another term) than when
    /// this store read it: this broker no longer coordinates its groups (retriable: the
    /// request goes to the new coordinator).
    #[error("no longer the group coordinator: {reason}")]
    NotCoordinator { reason: String },
}

impl OffsetsError {
    /// The code a client is told.
    pub fn code(&self) -> quiver_protocol::ErrorCode {
        match self {
            OffsetsError::NotCoordinator { .. } => quiver_protocol::ErrorCode::NotCoordinator,
            _ => quiver_protocol::ErrorCode::StorageError,
        }
    }
}

impl OffsetsError {
    /// An error of the log at `path`: its IO errors as [`OffsetsError::Io`] (naming the
    /// operation), the rest as [`OffsetsError::Log`].
    fn from_log(path: &Path, e: LogError) -> Self {
        match e {
            LogError::Io { op, path, source } => {
                OffsetsError::Io { path, source: io::Error::new(source.kind(), format!("{op}: {source}")) }
            }
            other => OffsetsError::Log { path: path.to_path_buf(), source: other },
        }
    }
}

#[derive(Debug)]
pub struct OffsetStore {
    /// The log's directory.
    path: PathBuf,
    state: Mutex<State>,
    /// Serialises log writers (commits, flushes, snapshots); held only on blocking threads.
    writer: Mutex<Writer>,
    /// The most a commit or flush lets the log hold: [`MAX_OFFSETS_FILE_BYTES`], smaller in
    /// tests. A compaction may add one snapshot of at most as much on top before it drops the
    /// old segments, so the log never holds more than twice this, which is what open accepts.
    max_log_bytes: u64,
    /// Bumped by every `mark_dirty` (under the state lock): a change marked with epoch `e` is
    /// in every flush that takes the dirty set at epoch `e` or later.
    epoch: AtomicU64,
    /// Every change marked at or below this epoch is durable: a flush that needs no more
    /// returns without writing (concurrent flushes share one fsync).
    durable_epoch: AtomicU64,
    /// A coordinator's store: set once it no longer may write (replicated sink's flag).
    deposed: Option<Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug)]
struct Writer {
    log: Sink,
    /// Set when a write or fsync failed; see [`OffsetsError::Poisoned`] (or, replicated, when
    /// this broker stopped coordinating: [`OffsetsError::NotCoordinator`]).
    poisoned: bool,
}

/// Where the store's records go.
#[derive(Debug)]
enum Sink {
    /// One node: a log of the store's own, appended and fsynced here.
    Local(Box<PartitionLog>),
    /// A cluster: an offsets partition (docs/replication.md §10) whose Raft leader this broker
    /// was in `term` when it read the state; a write is done once committed in that term.
    Replicated(Replicated),
}

#[derive(Debug)]
struct Replicated {
    partition: Arc<crate::partition::Partition>,
    term: u64,
    runtime: tokio::runtime::Handle,
    /// Set once a write failed or the coordinator loop saw the leadership go.
    deposed: Arc<std::sync::atomic::AtomicBool>,
}

/// Why a sink write failed.
enum SinkError {
    Log(LogError),
    /// The offsets partition has another leader or term now.
    Deposed(String),
}

impl Sink {
    fn size_bytes(&self) -> u64 {
        match self {
            Sink::Local(log) => log.size_bytes(),
            Sink::Replicated(r) => r.partition.shared_log().lock().size_bytes(),
        }
    }

    /// Appends `batches` durably (fsynced here, or committed by a majority in the store's
    /// term); returns the offset of the first.
    fn append_durably(&mut self, batches: Vec<ValidatedBatch>) -> Result<u64, SinkError> {
        match self {
            Sink::Local(log) => {
                let first = log.next_offset();
                let now = now_ms();
                for mut batch in batches {
                    log.append(&mut batch, LEADER_EPOCH, now).map_err(SinkError::Log)?;
                }
                log.sync().map_err(SinkError::Log)?;
                Ok(first)
            }
            Sink::Replicated(r) => {
                let deposed = |e: crate::partition::PartitionError| SinkError::Deposed(e.message);
                let (partition, term) = (r.partition.clone(), r.term);
                let write = async move {
                    // Queued in order, then awaited together: one round of replication.
                    let mut waiting = Vec::with_capacity(batches.len());
                    for batch in batches {
                        waiting.push(partition.submit_in_term(batch, term).await?);
                    }
                    let mut first = None;
                    for rx in waiting {
                        let appended = rx.await.map_err(|_| {
                            crate::partition::PartitionError::new(
                                ErrorCode::NotLeader,
                                "the offsets partition's group stopped",
                            )
                        })??;
                        first.get_or_insert(appended.base_offset);
                    }
                    Ok::<_, crate::partition::PartitionError>(first.unwrap_or(0))
                };
                // Bounded: a leader that can no longer commit steps down within an election
                // timeout (check-quorum) and fails the write, but a store must never hang its
                // callers (a shutdown's final flush among them).
                let result = r.runtime.block_on(async move {
                    tokio::time::timeout(REPLICATED_WRITE_TIMEOUT, write).await.unwrap_or_else(|_| {
                        Err(crate::partition::PartitionError::new(
                            ErrorCode::NotLeader,
                            "not committed within the replicated write timeout",
                        ))
                    })
                });
                if result.is_err() {
                    r.deposed.store(true, SeqCst);
                }
                result.map_err(deposed)
            }
        }
    }

    /// Starts a new segment (one node); a replicated log rolls on its own.
    fn roll(&mut self) -> Result<(), LogError> {
        match self {
            Sink::Local(log) => log.roll_now().map(drop),
            Sink::Replicated(_) => Ok(()),
        }
    }

    /// Deletes the segments wholly below `offset`; returns how many went.
    fn delete_below(&mut self, offset: u64) -> Result<usize, LogError> {
        match self {
            Sink::Local(log) => Ok(log.delete_segments_below(offset)?.deleted_segments()),
            Sink::Replicated(r) => r.partition.delete_segments_below_blocking(offset),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    ledgers: HashMap<OffsetKey, SharedLedger>,
    /// Size of each key's last record, to tell when a snapshot pays.
    entry_bytes: HashMap<OffsetKey, u64>,
    /// A coordinator's groups as their last durable membership records say (cluster only),
    /// with each record's size.
    groups: HashMap<Arc<str>, (GroupSnapshot, u64)>,
    dirty: HashSet<OffsetKey>,
    /// Bytes of the log's segments.
    log_bytes: u64,
}

/// Milliseconds since the Unix epoch: the batches' timestamps (the time a commit was written,
/// as Kafka's offset commits carry), and the log's segment age.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The records of `ledgers` as they are now, each taken out of the dirty set (its flag
/// cleared under its lock, before its snapshot): the batches, each record's size, and each
/// ledger with the horizon written.
#[allow(clippy::type_complexity)]
fn snapshot_entries(
    ledgers: &[(OffsetKey, SharedLedger)],
    groups: &[(Arc<str>, GroupSnapshot)],
) -> (Vec<ValidatedBatch>, Vec<(OffsetKey, u64)>, Vec<(SharedLedger, u64)>) {
    let mut write = WriteBuilder::new(now_ms());
    // A compaction's snapshot repeats the groups' membership records as they are (their
    // sizes do not change); a flush passes none.
    for (name, g) in groups {
        write.push_group(name, Some(g));
    }
    let mut sizes = Vec::with_capacity(ledgers.len());
    let mut written = Vec::with_capacity(ledgers.len());
    for (key, l) in ledgers {
        let snapshot = {
            let mut l = l.lock();
            l.dirty = false;
            l.snapshot(MAX_PERSISTED_RANGES)
        };
        sizes.push((key.clone(), write.push(key, Some(&snapshot))));
        written.push((l.clone(), snapshot.horizon));
    }
    (write.finish(), sizes, written)
}

fn batches_bytes(batches: &[ValidatedBatch]) -> u64 {
    batches.iter().map(|b| b.len() as u64).sum()
}

/// What a commit does to a ledger: move it forward, or reset it when allowed.
fn apply_commit(l: &mut AckLedger, offset: u64, reset: bool) {
    if offset >= l.floor() {
        l.commit(offset);
    } else if reset {
        l.reset(offset);
    }
}

/// Bytes of the segment files (`<base:020>.log`) in `dir`, read from their lengths only.
fn segment_bytes_on_disk(storage: &dyn Storage, dir: &Path) -> io::Result<u64> {
    let mut bytes = 0u64;
    for name in storage.list(dir)? {
        let is_segment = name
            .strip_suffix(".log")
            .is_some_and(|stem| stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()));
        if is_segment {
            bytes = bytes.saturating_add(storage.open(&dir.join(&name))?.len()?);
        }
    }
    Ok(bytes)
}

impl OffsetStore {
    /// Opens (or creates) the store in `dir`: its log in `<dir>/0`, recovered as any partition
    /// is (a torn tail is cut), after migrating an `offsets.log` of an older version into it.
    /// Refuses a log larger than twice [`MAX_OFFSETS_FILE_BYTES`] (see `max_log_bytes`).
    pub fn open(storage: Arc<dyn Storage>, dir: &Path) -> Result<Self, OffsetsError> {
        Self::open_with_limit(storage, dir, MAX_OFFSETS_FILE_BYTES)
    }

    /// `open` with another size limit than [`MAX_OFFSETS_FILE_BYTES`] (tests).
    pub(crate) fn open_with_limit(
        storage: Arc<dyn Storage>,
        dir: &Path,
        max_log_bytes: u64,
    ) -> Result<Self, OffsetsError> {
        let path = dir.join(LOG_DIR);
        let io_err = |source| OffsetsError::Io { path: path.clone(), source };
        let log_err = |e| OffsetsError::from_log(&path, e);
        storage.create_dir_all(&path).map_err(io_err)?;
        // New directories (a first start, or the first since the format changed) must survive a
        // crash before anything is acknowledged from them; the log syncs its own.
        storage.sync_dir(dir).map_err(io_err)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            storage.sync_dir(parent).map_err(io_err)?;
        }
        let hard_limit = max_log_bytes.saturating_mul(2);
        let bytes = segment_bytes_on_disk(&*storage, &path).map_err(io_err)?;
        if bytes > hard_limit {
            return Err(OffsetsError::TooLarge { path, bytes, limit: hard_limit });
        }
        let config =
            LogConfig { segment_bytes: SEGMENT_BYTES.min(max_log_bytes).max(1), ..LogConfig::default() };
        let (mut log, report) =
            PartitionLog::open(storage.clone(), path.clone(), config, now_ms()).map_err(log_err)?;
        if let Some(cut) = &report.truncation {
            tracing::warn!(path = %cut.path.display(), dropped = cut.bytes_dropped, "offsets store: dropped a torn tail");
        }
        // The log's one epoch is recorded now, not in the first commit's path.
        log.begin_epoch(LEADER_EPOCH).map_err(log_err)?;
        legacy::migrate(&*storage, dir, &mut log, max_log_bytes, hard_limit)?;
        let (mut live, mut snapshots) = records::read_log(&log).map_err(log_err)?;
        if let Some(begin) = snapshots.unfinished() {
            // A compaction cut short by a crash: its records only repeat ledgers (with changes
            // never acknowledged durable), and nothing else was written after its begin marker.
            tracing::warn!(path = %path.display(), begin, "offsets store: cutting off a snapshot a crash interrupted");
            log.truncate_to(begin).map_err(log_err)?;
            (live, snapshots) = records::read_log(&log).map_err(log_err)?;
        }
        if let Some(begin) = snapshots.last_complete.filter(|&b| b > log.log_start_offset()) {
            // A compaction whose old segments a crash kept: they are all below its snapshot.
            log.delete_segments_below(begin).map_err(log_err)?;
        }
        // One node keeps no membership records (members live in memory); a log that was an
        // offsets partition's would have none either.
        let mut state = State { log_bytes: log.size_bytes(), ..Default::default() };
        for (key, (snapshot, size)) in live.ledgers {
            state.ledgers.insert(key.clone(), Arc::new(Mutex::new(AckLedger::restore(&snapshot).into())));
            state.entry_bytes.insert(key, size);
        }
        metrics::gauge!("quiver_offsets_log_bytes").set(state.log_bytes as f64);
        Ok(OffsetStore {
            path,
            state: Mutex::new(state),
            writer: Mutex::new(Writer { log: Sink::Local(Box::new(log)), poisoned: false }),
            max_log_bytes,
            epoch: AtomicU64::new(0),
            durable_epoch: AtomicU64::new(0),
            deposed: None,
        })
    }

    /// The store of a coordinator (docs/replication.md §10): the state read from an offsets
    /// partition this broker leads in `term`, whose commit already covers every entry an earlier
    /// leader answered for (`GroupStatus::ready`). Writes are committed through its Raft group in
    /// `term` only; `deposed` is set when they no longer can be. Reads to the high watermark
    /// (never an uncommitted entry), and drops the segments below the last complete snapshot.
    /// Blocking.
    pub(crate) fn open_replicated(
        partition: Arc<crate::partition::Partition>,
        term: u64,
        runtime: tokio::runtime::Handle,
        deposed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self, OffsetsError> {
        let shared = partition.shared_log();
        let path = shared.lock().dir().to_path_buf();
        let log_err = |e| OffsetsError::from_log(&path, e);
        let hw = partition.high_watermark();
        let (live, snapshots, log_start) = {
            let log = shared.lock();
            let (live, snapshots) = records::read_log_to(&log, hw).map_err(log_err)?;
            (live, snapshots, log.log_start_offset())
        };
        if let Some(begin) = snapshots.last_complete.filter(|&b| b > log_start) {
            partition.delete_segments_below_blocking(begin).map_err(log_err)?;
        }
        let mut state =
            State { log_bytes: shared.lock().size_bytes(), groups: live.groups, ..Default::default() };
        for (key, (snapshot, size)) in live.ledgers {
            state.ledgers.insert(key.clone(), Arc::new(Mutex::new(AckLedger::restore(&snapshot).into())));
            state.entry_bytes.insert(key, size);
        }
        let sink = Sink::Replicated(Replicated { partition, term, runtime, deposed: deposed.clone() });
        Ok(OffsetStore {
            path,
            state: Mutex::new(state),
            writer: Mutex::new(Writer { log: sink, poisoned: false }),
            max_log_bytes: MAX_OFFSETS_FILE_BYTES,
            epoch: AtomicU64::new(0),
            durable_epoch: AtomicU64::new(0),
            deposed: Some(deposed),
        })
    }

    /// Forgets (in memory) the ledgers of topics `exists` denies: deleted while another broker
    /// coordinated. The next compaction leaves them out of the log.
    pub fn forget_missing_topics(&self, exists: impl Fn(&str) -> bool) {
        let mut st = self.state.lock();
        st.ledgers.retain(|(_, t, _), _| exists(t));
        let keep: HashSet<OffsetKey> = st.ledgers.keys().cloned().collect();
        st.entry_bytes.retain(|k, _| keep.contains(k));
        st.dirty.retain(|k| keep.contains(k));
        st.groups.retain(|_, (g, _)| exists(&g.topic));
    }

    /// The groups whose membership records this coordinator's store read (a new coordinator
    /// continues them, docs/replication.md §10 invariant 4).
    pub fn groups(&self) -> Vec<(Arc<str>, GroupSnapshot)> {
        self.state.lock().groups.iter().map(|(name, (g, _))| (name.clone(), g.clone())).collect()
    }

    /// Whether `group`'s last durable membership record says `now` (`None`: no record).
    pub fn group_recorded(&self, group: &str, now: Option<&GroupSnapshot>) -> bool {
        self.state.lock().groups.get(group).map(|(g, _)| g) == now
    }

    /// Makes `group`'s membership durable (committed in the coordinator's term) as `now` reads
    /// it under the store's writer lock, so records land in the order of the states they
    /// hold: a reply handed out after this returns is covered by a record at least as new.
    /// `None` (the group is gone) writes a tombstone. Nothing is written when the last record
    /// says the same. Blocking.
    pub fn record_group_blocking(
        &self,
        group: &str,
        now: impl FnOnce() -> Option<GroupSnapshot>,
    ) -> Result<(), OffsetsError> {
        let mut w = self.writer.lock();
        self.check_usable(&w)?;
        let now = now();
        if self.group_recorded(group, now.as_ref()) {
            return Ok(());
        }
        let mut write = WriteBuilder::new(now_ms());
        let size = write.push_group(group, now.as_ref());
        let batches = write.finish();
        if self.would_pass_limit(&batches) {
            self.snapshot_locked(&mut w)?;
        }
        self.append_locked(&mut w, batches, self.max_log_bytes)?;
        {
            let mut st = self.state.lock();
            match now {
                Some(g) => st.groups.insert(Arc::from(group), (g, size)),
                None => st.groups.remove(group),
            };
        }
        self.compact_locked(&mut w);
        Ok(())
    }

    /// Whether this is a coordinator's store (a cluster's `__offsets` partition), not a
    /// broker's own.
    pub fn is_coordinated(&self) -> bool {
        self.deposed.is_some()
    }

    /// Whether this is a coordinator's store that no longer may write (cheap: one atomic load).
    pub fn is_deposed(&self) -> bool {
        match &self.deposed {
            Some(d) => d.load(SeqCst),
            None => false,
        }
    }

    /// The groups with a ledger here.
    pub fn group_names(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self.state.lock().ledgers.keys().map(|(g, _, _)| g.clone()).collect();
        names.sort();
        names.dedup();
        names
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
            let mut write = WriteBuilder::new(now_ms());
            let size = write.push(&key, Some(&snapshot));
            let batches = write.finish();
            let restore = |e| {
                if was_dirty {
                    self.state.lock().dirty.insert(key.clone());
                }
                e
            };
            if !compacted && self.would_pass_limit(&batches) {
                // Make room first, then take the snapshot again (the compaction took the dirty
                // set).
                self.state.lock().dirty.extend(was_dirty.then(|| key.clone()));
                self.snapshot_locked(&mut w)?;
                compacted = true;
                continue;
            }
            self.append_locked(&mut w, batches, self.max_log_bytes).map_err(restore)?;
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
        // The commit is durable: a failed compaction only logs (the log keeps every ledger
        // either way, and a poisoned store reports it at the next write).
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

    /// The periodic flush: persists every dirty key, then compacts the log when a snapshot
    /// is due, also when nothing was dirty (a log left large by an earlier run). Blocking.
    pub fn maintain_blocking(&self) -> Result<(), OffsetsError> {
        let mut w = self.writer.lock();
        self.check_usable(&w)?;
        self.flush_locked(&mut w)?;
        self.maybe_snapshot_locked(&mut w)?;
        self.checkpoint(&w, CHECKPOINT_LAG_BYTES);
        Ok(())
    }

    /// Writes the log's recovery point once its fsyncs moved `lag` bytes or more past the last
    /// one written, so recovery CRC-scans only what came after it: without it, damage anywhere
    /// in the active segment would be taken for a torn tail and everything after it cut,
    /// acknowledged commits included (design.md §5.3). A failure only logs (the point stays
    /// where it was, which is safe).
    fn checkpoint(&self, w: &Writer, lag: u64) {
        let Sink::Local(log) = &w.log else { return };
        if let Err(e) = log.recovery_checkpoint().write_if_behind(lag) {
            tracing::warn!(path = %self.path.display(), "offsets store: writing the recovery point: {e}");
        }
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
        let (batches, sizes, written) = snapshot_entries(&ledgers, &[]);
        if self.would_pass_limit(&batches) {
            // A snapshot writes every key as it is now (newer than these records), so it
            // replaces the append; it takes the dirty set itself.
            self.state.lock().dirty.extend(keys);
            return self.snapshot_locked(w);
        }
        if let Err(e) = self.append_locked(w, batches, self.max_log_bytes) {
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
        self.flush_locked(&mut w)?;
        self.checkpoint(&w, 0);
        Ok(())
    }

    /// Forgets every offset of a deleted topic, durably: a tombstone record (an empty value)
    /// for each of its keys, in one batch. The offsets are forgotten in memory only once the
    /// tombstones are durable.
    pub fn remove_topic_blocking(&self, topic: &str) -> Result<(), OffsetsError> {
        let mut w = self.writer.lock();
        self.check_usable(&w)?;
        let mut keys: Vec<OffsetKey> =
            self.state.lock().ledgers.keys().filter(|(_, t, _)| &**t == topic).cloned().collect();
        keys.sort();
        let mut write = WriteBuilder::new(now_ms());
        for key in &keys {
            write.push(key, None);
        }
        // Its groups' membership records too: a coordinator reading the log later must not
        // restore them into a topic created again under the name.
        let mut groups: Vec<Arc<str>> = {
            let st = self.state.lock();
            st.groups.iter().filter(|(_, (g, _))| g.topic == topic).map(|(name, _)| name.clone()).collect()
        };
        groups.sort();
        for group in &groups {
            write.push_group(group, None);
        }
        let batches = write.finish();
        if self.would_pass_limit(&batches) {
            // Room first; the snapshot still holds the topic's ledgers, the tombstones follow it.
            self.snapshot_locked(&mut w)?;
        }
        self.append_locked(&mut w, batches, self.max_log_bytes)?;
        let mut st = self.state.lock();
        st.ledgers.retain(|(_, t, _), _| &**t != topic);
        st.entry_bytes.retain(|(_, t, _), _| &**t != topic);
        st.dirty.retain(|(_, t, _)| &**t != topic);
        // Its groups went with it (`Groups::topic_deleted`); the next compaction leaves their
        // records out, and a coordinator reading them meanwhile skips a missing topic's.
        st.groups.retain(|_, (g, _)| g.topic != topic);
        Ok(())
    }

    fn check_usable(&self, w: &Writer) -> Result<(), OffsetsError> {
        if let Sink::Replicated(r) = &w.log {
            if w.poisoned || r.deposed.load(SeqCst) {
                let reason = format!("the offsets partition's leadership of term {} ended", r.term);
                return Err(OffsetsError::NotCoordinator { reason });
            }
        }
        match w.poisoned {
            true => Err(OffsetsError::Poisoned { path: self.path.clone() }),
            false => Ok(()),
        }
    }

    /// Poisons the store after a failed log operation; returns the error.
    fn log_failed(&self, w: &mut Writer, e: LogError) -> OffsetsError {
        let e = OffsetsError::from_log(&self.path, e);
        w.poisoned = true;
        metrics::gauge!("quiver_offsets_store_poisoned").set(1.0);
        tracing::error!(path = %self.path.display(), "offsets store: a write or sync failed ({e}); no offsets are stored or acknowledged until the broker restarts");
        e
    }

    /// Whether appending `batches` would take the log past its limit.
    fn would_pass_limit(&self, batches: &[ValidatedBatch]) -> bool {
        self.state.lock().log_bytes + batches_bytes(batches) > self.max_log_bytes
    }

    fn too_large(&self, bytes: u64, limit: u64) -> OffsetsError {
        OffsetsError::TooLarge { path: self.path.clone(), bytes, limit }
    }

    /// Appends `batches` and fsyncs the log (or has a majority commit them), refusing to take it
    /// past `limit`; returns the offset of the first. The store is poisoned if a write or the
    /// fsync fails (replicated: deposed once the write cannot be committed in its term).
    fn append_locked(
        &self,
        w: &mut Writer,
        batches: Vec<ValidatedBatch>,
        limit: u64,
    ) -> Result<u64, OffsetsError> {
        if batches.is_empty() {
            return Ok(0);
        }
        let bytes = w.log.size_bytes() + batches_bytes(&batches);
        if bytes > limit {
            return Err(self.too_large(bytes, limit));
        }
        let first = match w.log.append_durably(batches) {
            Ok(first) => first,
            Err(SinkError::Log(e)) => return Err(self.log_failed(w, e)),
            Err(SinkError::Deposed(reason)) => {
                w.poisoned = true;
                tracing::info!(path = %self.path.display(), "offsets store: no longer the coordinator ({reason})");
                return Err(OffsetsError::NotCoordinator { reason });
            }
        };
        self.set_log_bytes(w);
        Ok(first)
    }

    fn set_log_bytes(&self, w: &Writer) {
        let bytes = w.log.size_bytes();
        self.state.lock().log_bytes = bytes;
        metrics::gauge!("quiver_offsets_log_bytes").set(bytes as f64);
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
            let groups = st.groups.values().map(|(_, size)| size).sum::<u64>();
            (st.log_bytes, st.entry_bytes.values().sum::<u64>() + groups + BATCH_HEADER_BYTES as u64)
        };
        let due = (bytes >= SNAPSHOT_MIN_BYTES && bytes > 4 * live)
            || (bytes > self.max_log_bytes / 2 && bytes > 2 * live);
        if due {
            self.snapshot_locked(w)?;
        }
        Ok(())
    }

    /// Compacts the log (design.md §5.4), a simple form of Kafka's log compaction:
    ///
    /// 1. rolls, so everything written before lies in whole segments;
    /// 2. appends every live ledger as it is now (the snapshot) and fsyncs it;
    /// 3. deletes the segments wholly below the snapshot, oldest first, each durably.
    ///
    /// A crash at any step leaves a log that reads (from its start, the last record of a key
    /// winning) as the same ledgers: a partial snapshot only repeats them; segments go only
    /// once the whole snapshot is durable, and oldest first, so a tombstone never outlives
    /// less than what it deletes. A failure poisons the store (the log may hold part of the
    /// snapshot); one before anything is written (too large) leaves the store as it was.
    fn snapshot_locked(&self, w: &mut Writer) -> Result<(), OffsetsError> {
        // Every key is written, so none stays dirty (taken before the snapshots, see commit).
        let (ledgers, dirty, epoch) = {
            let mut st = self.state.lock();
            let epoch = self.epoch.load(SeqCst);
            let dirty = std::mem::take(&mut st.dirty);
            let ledgers: Vec<(OffsetKey, SharedLedger)> =
                st.ledgers.iter().map(|(k, l)| (k.clone(), l.clone())).collect();
            (ledgers, dirty, epoch)
        };
        let groups = self.groups();
        let (batches, sizes, written) = snapshot_entries(&ledgers, &groups);
        let restore_dirty = |e: OffsetsError| {
            self.state.lock().dirty.extend(dirty.iter().cloned());
            e
        };
        let bytes = batches_bytes(&batches);
        if bytes > self.max_log_bytes {
            return Err(restore_dirty(self.too_large(bytes, self.max_log_bytes)));
        }
        let before = w.log.size_bytes();
        if let Err(e) = w.log.roll() {
            return Err(restore_dirty(self.log_failed(w, e)));
        }
        // Begin marker, the snapshot, then (once they are durable) the complete marker: open
        // cuts off a snapshot without its complete marker, and finishes one that has it.
        let limit = self.max_log_bytes.saturating_mul(2);
        let begin = vec![records::marker_batch(records::SNAPSHOT_BEGIN, 0, now_ms())];
        let start = self.append_locked(w, begin, limit).map_err(restore_dirty)?;
        self.append_locked(w, batches, limit).map_err(restore_dirty)?;
        let complete = vec![records::marker_batch(records::SNAPSHOT_COMPLETE, start, now_ms())];
        self.append_locked(w, complete, limit).map_err(restore_dirty)?;
        self.state.lock().entry_bytes = sizes.into_iter().collect();
        persisted(written);
        self.durable_epoch.fetch_max(epoch, SeqCst);
        let deleted = match w.log.delete_below(start) {
            Ok(deleted) => deleted,
            Err(e) => return Err(self.log_failed(w, e)),
        };
        self.set_log_bytes(w);
        metrics::counter!("quiver_offsets_compactions_total").increment(1);
        tracing::debug!(
            path = %self.path.display(),
            before,
            after = w.log.size_bytes(),
            segments_deleted = deleted,
            ledgers = ledgers.len(),
            "offsets store: compacted"
        );
        Ok(())
    }
}

/// The offsets partitions this broker coordinates the groups of, in a cluster (the coordinator
/// module runs them, docs/replication.md §10).
#[derive(Debug, Default)]
pub struct Coordinators {
    pub(crate) loaded: dashmap::DashMap<u32, Loaded>,
    /// Per offsets partition this broker follows: the offset up to which its compaction markers
    /// were read, and the begin offset of the last complete snapshot seen.
    pub(crate) followed: Mutex<HashMap<u32, (u64, Option<u64>)>>,
}

/// A store this broker coordinates with, and the term it was read in.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) term: u64,
    pub(crate) store: Arc<OffsetStore>,
    pub(crate) deposed: Arc<std::sync::atomic::AtomicBool>,
}

impl Coordinators {
    /// Every store this broker coordinates with.
    pub(crate) fn stores(&self) -> Vec<Arc<OffsetStore>> {
        self.loaded.iter().map(|l| l.store.clone()).collect()
    }

    /// Whether this broker coordinates offsets partition `k` in `term`.
    pub(crate) fn holds(&self, k: u32, term: u64) -> bool {
        self.loaded.get(&k).is_some_and(|l| l.term == term && !l.deposed.load(SeqCst))
    }
}

/// Tells ledgers which horizons their records made durable.
fn persisted(written: Vec<(SharedLedger, u64)>) {
    for (l, horizon) in written {
        l.lock().persisted(horizon);
    }
}

#[cfg(test)]
mod log_tests;
#[cfg(test)]
mod tests;
