//! The offsets store on real files and under the storage crash model: every acknowledged
//! commit survives a crash, and a failed write or fsync poisons the store.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use quiver_protocol::ledger::{Piece, NO_DEADLINE};

use super::legacy::{parse_entries, put_entry, TMP_NAME};
use super::records::READ_CHUNK_BYTES;
use super::*;
use crate::storage::{FileWrapper, FsStorage, MemStorage, StorageFile, Wrapped};
use bytes::BytesMut;
use quiver_protocol::ledger::LedgerSnapshot;

pub(super) type TestResult = Result<(), Box<dyn std::error::Error>>;

pub(super) const DIR: &str = "/data/offsets";

pub(super) fn key(g: &str, t: &str, p: u32) -> OffsetKey {
    (Arc::from(g), Arc::from(t), p)
}

fn fs() -> Arc<dyn Storage> {
    Arc::new(FsStorage::new())
}

/// Storage whose files fail on demand: a failing append writes half its bytes first (a short
/// write), a failing sync or directory sync changes nothing.
#[derive(Debug, Default)]
struct Faulty {
    inner: MemStorage,
    fail_append: Arc<AtomicBool>,
    fail_sync: Arc<AtomicBool>,
    fail_sync_dir: AtomicBool,
}

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn StorageFile>,
    fail_append: Arc<AtomicBool>,
    fail_sync: Arc<AtomicBool>,
}

impl Storage for Faulty {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(FaultyFile {
            inner: self.inner.open(path)?,
            fail_append: self.fail_append.clone(),
            fail_sync: self.fail_sync.clone(),
        }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        match self.fail_sync_dir.load(SeqCst) {
            true => Err(io::Error::other("injected directory sync failure")),
            false => self.inner.sync_dir(dir),
        }
    }
}

impl StorageFile for FaultyFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(pos, buf)
    }
    fn append(&self, data: &[u8]) -> io::Result<()> {
        if self.fail_append.load(SeqCst) {
            self.inner.append(&data[..data.len() / 2])?;
            return Err(io::Error::other("injected write failure"));
        }
        self.inner.append(data)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
    fn sync(&self) -> io::Result<()> {
        match self.fail_sync.load(SeqCst) {
            true => Err(io::Error::other("injected sync failure")),
            false => self.inner.sync(),
        }
    }
}

#[test]
fn commits_survive_reopen_and_damaged_tail_is_dropped() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let s = OffsetStore::open(fs(), dir.path())?;
        s.commit_blocking(key("g", "t", 0), 5, false)?;
        s.commit_blocking(key("g", "t", 0), 7, false)?;
        s.commit_blocking(key("g", "t", 1), 3, false)?;
        s.set_lazy(key("h", "t", 0), 9);
        s.flush_blocking()?;
    }
    // A torn batch at the end: the first bytes of its header.
    let path = dir.path().join(LOG_DIR).join("00000000000000000000.log");
    let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
    f.write_all(&[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 80, 0, 0])?;
    drop(f);
    let s = OffsetStore::open(fs(), dir.path())?;
    assert_eq!(s.get(&key("g", "t", 0)), Some(7));
    assert_eq!(s.get(&key("g", "t", 1)), Some(3));
    assert_eq!(s.get(&key("h", "t", 0)), Some(9));
    s.remove_topic_blocking("t")?;
    let s = OffsetStore::open(fs(), dir.path())?;
    assert_eq!(s.get(&key("g", "t", 0)), None);
    Ok(())
}

#[test]
fn acks_above_the_floor_and_counts_survive_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let k = key("g", "t", 0);
    {
        let s = OffsetStore::open(fs(), dir.path())?;
        let l = s.ledger(&k, 0);
        {
            let mut l = l.lock();
            l.deliver(0..10, NO_DEADLINE);
            l.ack(0..2);
            l.ack(5..7);
        }
        s.mark_dirty(&k);
        s.flush_blocking()?;
    }
    let s = OffsetStore::open(fs(), dir.path())?;
    assert_eq!(s.get(&k), Some(2));
    let l = s.ledger(&k, 0);
    let pieces = l.lock().deliver(0..12, NO_DEADLINE);
    let p = |range, count| Piece { range, count };
    assert_eq!(pieces, vec![p(2..5, 2), p(7..10, 2), p(10..12, 1)]);
    Ok(())
}

#[test]
fn garbage_never_panics() {
    for seed in 0u32..200 {
        let data: Vec<u8> =
            (0..64).map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8).collect();
        let _ = parse_entries(&data, &mut HashMap::new());
    }
}

/// A log over twice the limit (what a compaction may leave at most), or an old-format file over
/// the limit, is refused at open without being read.
#[test]
fn a_file_over_the_limit_is_refused_without_reading_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Sparse: no disk space, and the store must not try to read it into memory.
    std::fs::create_dir_all(dir.path().join(LOG_DIR))?;
    let segment = dir.path().join(LOG_DIR).join("00000000000000000000.log");
    std::fs::File::create(&segment)?.set_len(2 * MAX_OFFSETS_FILE_BYTES + 1)?;
    match OffsetStore::open(fs(), dir.path()) {
        Err(e @ OffsetsError::TooLarge { .. }) => assert!(e.to_string().contains("offsets"), "{e}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    std::fs::File::create(&segment)?.set_len(0)?;
    std::fs::File::create(dir.path().join("offsets.log"))?.set_len(MAX_OFFSETS_FILE_BYTES + 1)?;
    match OffsetStore::open(fs(), dir.path()) {
        Err(e @ OffsetsError::TooLarge { .. }) => assert!(e.to_string().contains("offsets.log"), "{e}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    Ok(())
}

/// Migration reads an old-format file a chunk at a time.
#[test]
fn entries_across_read_chunks_are_all_read() -> TestResult {
    let storage = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let s = OffsetStore::open(storage.clone(), dir)?;
    // Entries of varying sizes, more than two read chunks in all, none aligned to a chunk.
    let entries = 3 * READ_CHUNK_BYTES / 40;
    let mut buf = BytesMut::new();
    for i in 0..entries {
        let k = key(&"g".repeat(1 + i % 7), "t", (i % 3) as u32);
        put_entry(&mut buf, &k, &LedgerSnapshot { floor: i as u64, ..Default::default() });
    }
    drop(s);
    storage.set_contents(&dir.join("offsets.log"), &buf)?;
    let s = OffsetStore::open(storage, dir)?;
    for i in entries - 21..entries {
        assert_eq!(s.get(&key(&"g".repeat(1 + i % 7), "t", (i % 3) as u32)), Some(i as u64));
    }
    Ok(())
}

/// Every acknowledged commit, flush and snapshot survives a power loss at any point after it,
/// starting with the first commit into a file just created.
#[test]
fn acknowledged_commits_survive_crashes() -> TestResult {
    let storage = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let mut acknowledged: HashMap<OffsetKey, u64> = HashMap::new();
    for round in 0u64..40 {
        let s = OffsetStore::open(storage.clone(), dir)?;
        for (k, o) in &acknowledged {
            assert_eq!(s.get(k), Some(*o), "round {round}: {k:?}");
        }
        let k = key("g", &format!("t{}", round % 3), (round % 2) as u32);
        let next = acknowledged.get(&k).copied().unwrap_or(0) + 1 + round;
        s.commit_blocking(k.clone(), next, false)?;
        acknowledged.insert(k, next);
        if round % 4 == 1 {
            let lazy = key("lazy", "t0", 0);
            s.set_lazy(lazy.clone(), round);
            s.flush_blocking()?;
            acknowledged.insert(lazy, round);
        }
        if round % 10 == 9 {
            // Forget a topic through a snapshot rewrite.
            s.remove_topic_blocking("t2")?;
            acknowledged.retain(|(_, t, _), _| &**t != "t2");
        }
        // Unacknowledged work in flight when the power goes: a torn tail of varying length.
        s.set_lazy(key("in-flight", "t0", 0), round);
        storage.crash_torn(round as usize % 13);
    }
    Ok(())
}

#[test]
fn a_failed_write_poisons_the_store_and_nothing_acknowledged_is_lost() -> TestResult {
    let faulty = Arc::new(Faulty::default());
    let dir = Path::new(DIR);
    let (a, b) = (key("g", "t", 0), key("g", "t", 1));
    let s = OffsetStore::open(faulty.clone(), dir)?;
    s.commit_blocking(a.clone(), 5, false)?;
    faulty.fail_append.store(true, SeqCst);
    let failed = s.commit_blocking(a.clone(), 9, false);
    assert!(matches!(failed, Err(OffsetsError::Io { .. })), "{failed:?}");
    // The failed commit is not visible.
    assert_eq!(s.get(&a), Some(5));
    faulty.fail_append.store(false, SeqCst);
    // Poisoned: nothing more is written or acknowledged, though the storage works again.
    let refused = s.commit_blocking(b.clone(), 3, false);
    assert!(matches!(refused, Err(OffsetsError::Poisoned { .. })), "{refused:?}");
    assert!(refused.map_err(|e| e.to_string()).unwrap_err().contains("restart"));
    assert_eq!(s.get(&b), None);
    s.set_lazy(b.clone(), 4);
    assert!(matches!(s.flush_blocking(), Err(OffsetsError::Poisoned { .. })));
    assert!(matches!(s.remove_topic_blocking("t"), Err(OffsetsError::Poisoned { .. })));
    assert_eq!(s.get(&a), Some(5));
    drop(s);
    // The half-written entry is on disk; reopening drops it, and the store works again.
    faulty.inner.crash_torn(usize::MAX);
    let s = OffsetStore::open(faulty.clone(), dir)?;
    assert_eq!(s.get(&a), Some(5));
    s.commit_blocking(b.clone(), 3, false)?;
    s.commit_blocking(a.clone(), 9, false)?;
    drop(s);
    faulty.inner.crash();
    let s = OffsetStore::open(faulty, dir)?;
    assert_eq!(s.get(&a), Some(9));
    assert_eq!(s.get(&b), Some(3));
    Ok(())
}

#[test]
fn a_failed_fsync_leaves_the_commit_invisible() -> TestResult {
    let faulty = Arc::new(Faulty::default());
    let dir = Path::new(DIR);
    let a = key("g", "t", 0);
    let s = OffsetStore::open(faulty.clone(), dir)?;
    s.commit_blocking(a.clone(), 5, false)?;
    faulty.fail_sync.store(true, SeqCst);
    assert!(matches!(s.commit_blocking(a.clone(), 8, false), Err(OffsetsError::Io { .. })));
    assert_eq!(s.get(&a), Some(5), "a commit whose fsync failed is not visible");
    faulty.fail_sync.store(false, SeqCst);
    assert!(matches!(s.commit_blocking(a.clone(), 8, false), Err(OffsetsError::Poisoned { .. })));
    drop(s);
    // Bytes written before the failed fsync may or may not be on disk; either way the last
    // acknowledged commit is.
    for keep in [0, usize::MAX] {
        faulty.inner.crash_torn(keep);
        let s = OffsetStore::open(faulty.clone(), dir)?;
        assert!(matches!(s.get(&a), Some(5) | Some(8)), "{:?}", s.get(&a));
    }
    Ok(())
}

#[test]
fn a_failed_flush_leaves_its_keys_dirty() -> TestResult {
    let faulty = Arc::new(Faulty::default());
    let s = OffsetStore::open(faulty.clone(), Path::new(DIR))?;
    let b = key("g", "t", 1);
    s.ledger(&b, 0).lock().deliver(0..4, NO_DEADLINE);
    s.mark_dirty(&b);
    faulty.fail_sync.store(true, SeqCst);
    assert!(matches!(s.flush_blocking(), Err(OffsetsError::Io { .. })));
    assert!(s.state.lock().dirty.contains(&b), "a failed flush leaves its keys dirty");
    faulty.fail_sync.store(false, SeqCst);
    assert!(matches!(s.flush_blocking(), Err(OffsetsError::Poisoned { .. })));
    Ok(())
}

/// A compaction whose roll cannot make the new segment's name durable poisons the store and
/// loses nothing; after a restart the compaction and a topic's removal complete.
#[test]
fn a_compaction_whose_directory_sync_fails_loses_nothing() -> TestResult {
    let faulty = Arc::new(Faulty::default());
    let dir = Path::new(DIR);
    let (keep, gone) = (key("g", "keep", 0), key("g", "gone", 0));
    let s = OffsetStore::open(faulty.clone(), dir)?;
    s.commit_blocking(gone.clone(), 6, false)?;
    for i in 1..=50 {
        s.commit_blocking(keep.clone(), i, false)?;
    }
    drop(s);
    // A limit the log holds more than half of: the periodic flush compacts.
    let full = segment_bytes_on_disk(&faulty.inner, &dir.join(LOG_DIR))?;
    let limit = full + 200;
    let s = OffsetStore::open_with_limit(faulty.clone(), dir, limit)?;
    faulty.fail_sync_dir.store(true, SeqCst);
    assert!(s.maintain_blocking().is_err());
    assert_eq!((s.get(&keep), s.get(&gone)), (Some(50), Some(6)));
    assert!(matches!(s.commit_blocking(keep.clone(), 51, false), Err(OffsetsError::Poisoned { .. })));
    drop(s);
    faulty.fail_sync_dir.store(false, SeqCst);
    faulty.inner.crash();
    let s = OffsetStore::open_with_limit(faulty.clone(), dir, limit)?;
    assert_eq!((s.get(&keep), s.get(&gone)), (Some(50), Some(6)));
    s.remove_topic_blocking("gone")?;
    s.maintain_blocking()?;
    assert!(s.state.lock().log_bytes < full / 4, "not compacted");
    drop(s);
    faulty.inner.crash();
    let s = OffsetStore::open(faulty.clone(), dir)?;
    assert_eq!((s.get(&keep), s.get(&gone)), (Some(50), None));
    Ok(())
}

#[test]
fn a_leftover_snapshot_temp_file_is_removed_at_open() -> TestResult {
    let storage = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let s = OffsetStore::open(storage.clone(), dir)?;
    s.commit_blocking(key("g", "t", 0), 4, false)?;
    drop(s);
    storage.set_contents(&dir.join(TMP_NAME), b"half a snapshot")?;
    let s = OffsetStore::open(storage.clone(), dir)?;
    assert_eq!(s.get(&key("g", "t", 0)), Some(4));
    assert_eq!(storage.contents(&dir.join(TMP_NAME)), None);
    Ok(())
}

/// What a subscription does before handing out `range` (subscription.rs `hand_out`): the ledger
/// is written first when a count is above 1 or the delivery passes the durable horizon.
fn hand_out(s: &OffsetStore, k: &OffsetKey, range: std::ops::Range<u64>) -> Result<Vec<Piece>, OffsetsError> {
    let ledger = s.ledger(k, 0);
    let (pieces, write) = {
        let mut l = ledger.lock();
        let pieces = l.deliver(range.clone(), NO_DEADLINE);
        let mut write = pieces.iter().any(|p| p.count > 1);
        if pieces.last().is_some_and(|p| l.durable_horizon() < p.range.end) {
            l.raise_horizon(range.end + 64);
            write = true;
        }
        (pieces, write)
    };
    s.mark_dirty(k);
    if write {
        s.flush_blocking()?;
    }
    Ok(pieces)
}

/// Deliveries, acks that are never flushed, new sessions and power losses at every point: no
/// record is ever handed out with a count not above every count it was handed out with before.
#[test]
fn delivery_counts_never_go_down_across_crashes() -> TestResult {
    const LOG_END: u64 = 3000;
    let storage = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let k = key("g", "t", 0);
    let mut sent = vec![0u32; LOG_END as usize];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (mut crashes, mut redelivered) = (0, 0u64);
    let mut s = OffsetStore::open(storage.clone(), dir)?;
    let mut position = 0;
    for step in 0..3000 {
        match next(10) {
            0..=5 if position < LOG_END => {
                let end = (position + 1 + next(40)).min(LOG_END);
                for p in hand_out(&s, &k, position..end)? {
                    for o in p.range {
                        assert!(
                            p.count > sent[o as usize],
                            "step {step}: offset {o} count {} after {}",
                            p.count,
                            sent[o as usize]
                        );
                        redelivered += u64::from(sent[o as usize] > 0);
                        sent[o as usize] = p.count;
                    }
                }
                position = end;
            }
            6 | 7 => {
                // An ack of a few delivered records, persisted only by a later write.
                let at = next(position.max(1));
                s.ledger(&k, 0).lock().ack(at..at + 1 + next(3));
                s.mark_dirty(&k);
            }
            8 => {
                // A new session: everything unacknowledged is handed out again.
                s.ledger(&k, 0).lock().end_session();
                position = s.get(&k).unwrap_or(0);
            }
            _ => {
                drop(s);
                storage.crash_torn(next(200) as usize);
                crashes += 1;
                s = OffsetStore::open(storage.clone(), dir)?;
                s.cut_to_logs_blocking(|_, _| Some(LOG_END))?;
                position = s.get(&k).unwrap_or(0);
            }
        }
    }
    assert!(crashes > 100 && redelivered > 1000, "{crashes} crashes, {redelivered} redeliveries");
    Ok(())
}

/// The horizon is cut to the log's end at start: records written after a restart are not
/// counted as handed out, however far the horizon was raised before the crash.
#[test]
fn records_after_the_log_end_are_not_counted_as_handed_out() -> TestResult {
    let storage = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let k = key("g", "t", 0);
    let s = OffsetStore::open(storage.clone(), dir)?;
    hand_out(&s, &k, 0..10)?;
    assert!(s.ledger(&k, 0).lock().durable_horizon() > 20);
    drop(s);
    storage.crash();
    let s = OffsetStore::open(storage.clone(), dir)?;
    s.cut_to_logs_blocking(|t, p| (t == "t" && p == 0).then_some(12))?;
    // The cut is durable: a crash right after it does not bring the old horizon back.
    drop(s);
    storage.crash();
    let s = OffsetStore::open(storage, dir)?;
    assert_eq!(s.ledger(&k, 0).lock().horizon(), 12);
    let pieces = hand_out(&s, &k, 0..14)?;
    assert_eq!(pieces, vec![Piece { range: 0..12, count: 2 }, Piece { range: 12..14, count: 1 }]);
    Ok(())
}

/// A commit-only workload (CommitOffset, group resets) never wedges at the size limit: commits
/// compact the file themselves, and every acknowledged commit survives a crash.
#[test]
fn commits_alone_never_fill_the_file() -> TestResult {
    const LIMIT: u64 = 4096;
    let storage = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let s = OffsetStore::open_with_limit(storage.clone(), dir, LIMIT)?;
    for i in 1..=2000u64 {
        s.commit_blocking(key("g", "t", (i % 4) as u32), i, false)?;
        assert!(s.state.lock().log_bytes <= LIMIT);
    }
    drop(s);
    storage.crash();
    let s = OffsetStore::open_with_limit(storage, dir, LIMIT)?;
    for p in 0..4u32 {
        assert_eq!(s.get(&key("g", "t", p)), Some(2000 - ((2000 - u64::from(p)) % 4)));
    }
    Ok(())
}

/// A log left near the limit (by an earlier run) is compacted by the periodic flush with
/// nothing dirty, and a write that would pass the limit compacts the log first.
#[test]
fn a_full_file_is_compacted_not_refused() -> TestResult {
    let storage = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let k = key("g", "t", 0);
    {
        let s = OffsetStore::open(storage.clone(), dir)?;
        for i in 1..=100u64 {
            s.commit_blocking(k.clone(), i, false)?;
        }
    }
    let full = segment_bytes_on_disk(&*storage, &dir.join(LOG_DIR))?;
    // A limit the next commit would pass: it compacts first.
    let s = OffsetStore::open_with_limit(storage.clone(), dir, full + 8)?;
    s.commit_blocking(k.clone(), 101, false)?;
    assert_eq!(s.get(&k), Some(101));
    drop(s);
    let s = OffsetStore::open(storage.clone(), dir)?;
    assert_eq!(s.get(&k), Some(101));
    drop(s);
    // The same full file, nothing dirty: the periodic flush compacts it.
    let s = OffsetStore::open(storage.clone(), dir)?;
    for i in 102..=200u64 {
        s.commit_blocking(k.clone(), i, false)?;
    }
    drop(s);
    let full = segment_bytes_on_disk(&*storage, &dir.join(LOG_DIR))?;
    let s = OffsetStore::open_with_limit(storage.clone(), dir, full + 8)?;
    s.maintain_blocking()?;
    let bytes = s.state.lock().log_bytes;
    assert!(bytes < full / 10, "not compacted: {bytes} bytes");
    assert_eq!(bytes, segment_bytes_on_disk(&*storage, &dir.join(LOG_DIR))?);
    drop(s);
    storage.crash();
    let s = OffsetStore::open(storage, dir)?;
    assert_eq!(s.get(&k), Some(200));
    Ok(())
}

/// Counts file syncs, each taking a while (so concurrent flushes queue up).
#[derive(Debug, Default)]
struct Syncs(Arc<std::sync::atomic::AtomicUsize>);

impl FileWrapper for Syncs {
    fn wrap(&self, _: &Path, inner: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        Arc::new(CountingFile { inner, syncs: self.0.clone() })
    }
}

type Counting = Wrapped<MemStorage, Syncs>;

#[derive(Debug)]
struct CountingFile {
    inner: Arc<dyn StorageFile>,
    syncs: Arc<std::sync::atomic::AtomicUsize>,
}

impl StorageFile for CountingFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(pos, buf)
    }
    fn append(&self, data: &[u8]) -> io::Result<()> {
        self.inner.append(data)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(5));
        self.inner.sync()
    }
}

/// Many subscriptions each wait for their own change while acks keep marking keys dirty: the
/// waiters share fsyncs instead of writing one each, and what each waited for is durable.
#[test]
fn concurrent_flushes_share_fsyncs() -> TestResult {
    const WAITERS: u64 = 32;
    let storage = Arc::new(Counting::default());
    let dir = Path::new(DIR);
    let s = Arc::new(OffsetStore::open(storage.clone(), dir)?);
    let start = Arc::new(std::sync::Barrier::new(WAITERS as usize + 1));
    let done = Arc::new(AtomicBool::new(false));
    // Acks on another key, marking it dirty all along.
    let noise = {
        let (s, done) = (s.clone(), done.clone());
        std::thread::spawn(move || {
            let k = key("noise", "t", 0);
            let mut n = 0;
            while !done.load(SeqCst) {
                n += 1;
                s.ledger(&k, 0).lock().commit(n);
                s.mark_dirty(&k);
                std::thread::yield_now();
            }
        })
    };
    let waiters: Vec<_> = (0..WAITERS)
        .map(|i| {
            let (s, start) = (s.clone(), start.clone());
            std::thread::spawn(move || {
                let k = key("g", "t", i as u32);
                s.ledger(&k, 0).lock().commit(100 + i);
                let epoch = s.mark_dirty(&k);
                start.wait();
                s.flush_to_blocking(epoch)
            })
        })
        .collect();
    let before = storage.wrapper.0.load(SeqCst);
    start.wait();
    for w in waiters {
        w.join().map_err(|_| "waiter panicked")??;
    }
    let syncs = storage.wrapper.0.load(SeqCst) - before;
    done.store(true, SeqCst);
    noise.join().map_err(|_| "noise panicked")?;
    assert!(syncs <= 4, "{WAITERS} waiters after one change each took {syncs} fsyncs");
    // Each waiter's change is durable.
    drop(s);
    storage.inner.crash();
    let s = OffsetStore::open(storage, dir)?;
    for i in 0..WAITERS {
        assert_eq!(s.get(&key("g", "t", i as u32)), Some(100 + i));
    }
    Ok(())
}

/// A ledger with more count ranges than an entry keeps: the folded tail is persisted as maybe
/// delivered, so after a reopen nothing in it is dead-lettered before it is handed out again.
#[test]
fn folded_counts_are_persisted_as_maybe_delivered() -> TestResult {
    let storage = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let k = key("g", "t", 0);
    let s = OffsetStore::open(storage.clone(), dir)?;
    {
        let l = s.ledger(&k, 0);
        let mut l = l.lock();
        for o in (0..3 * MAX_PERSISTED_RANGES as u64).step_by(2) {
            l.deliver(o..o + 1, NO_DEADLINE);
        }
        l.end_session();
        l.deliver(3000..3001, NO_DEADLINE);
    }
    s.mark_dirty(&k);
    s.flush_blocking()?;
    drop(s);
    storage.crash();
    let s = OffsetStore::open(storage, dir)?;
    let l = s.ledger(&k, 0);
    assert_eq!(l.lock().count(2500), 2);
    assert_eq!(l.lock().exhausted(0..4000, 2), Vec::<std::ops::Range<u64>>::new());
    Ok(())
}

/// The per-ack path: marking a ledger that is dirty already takes only its own lock, never
/// the store's (design.md §12).
#[test]
fn marking_a_dirty_ledger_takes_no_store_lock() {
    let s = OffsetStore::open(Arc::new(MemStorage::default()), Path::new(DIR)).expect("open");
    let k = key("g", "t", 0);
    let l = s.ledger(&k, 0);
    let first = s.mark_dirty_locked(&k, &mut l.lock());
    std::thread::scope(|scope| {
        // Inside the scope, so a failing assertion drops it before the scope joins the thread.
        let store_lock = s.state.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let (s, k, l) = (&s, &k, &l);
        scope.spawn(move || {
            let mut ledger = l.lock();
            ledger.deliver(0..10, NO_DEADLINE);
            let _ = tx.send(s.mark_dirty_locked(k, &mut ledger));
        });
        let epoch = rx.recv_timeout(std::time::Duration::from_secs(5));
        drop(store_lock);
        assert!(epoch.is_ok_and(|e| e > first), "an ack on a dirty ledger waited for the store's lock");
    });
}

/// A change marked after a flush took the key is in the next flush: the flag is cleared when
/// the flush snapshots the ledger, so the next change takes the store's lock again.
#[test]
fn a_change_after_a_flush_is_written_by_the_next() -> TestResult {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::default());
    let k = key("g", "t", 0);
    {
        let s = OffsetStore::open(storage.clone(), Path::new(DIR))?;
        let l = s.ledger(&k, 0);
        for end in [5, 7] {
            let epoch = {
                let mut l = l.lock();
                l.deliver(0..end, NO_DEADLINE);
                l.ack_below(end);
                s.mark_dirty_locked(&k, &mut l)
            };
            s.flush_to_blocking(epoch)?;
            assert!(s.state.lock().dirty.is_empty());
        }
        // Marked twice without a flush between: in the set once, written once.
        for end in [8, 9] {
            let mut l = l.lock();
            l.deliver(0..end, NO_DEADLINE);
            l.ack_below(end);
            s.mark_dirty_locked(&k, &mut l);
        }
        assert_eq!(s.state.lock().dirty.len(), 1);
        s.flush_blocking()?;
    }
    let s = OffsetStore::open(storage, Path::new(DIR))?;
    assert_eq!(s.get(&k), Some(9));
    Ok(())
}
