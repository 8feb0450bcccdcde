//! The partition log when storage fails: a failed write or fsync stops further appends until
//! the partition is reopened, and reopening repairs what the failure left behind.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use super::tests::{append_n, batch, check_reads, config, mem, open, segment_path, TestResult, DIR};
use super::*;
use crate::storage::{FileWrapper, MemStorage, Storage, StorageFile, Wrapped};

#[test]
fn sync_handle_covers_appends_made_before_it() -> TestResult {
    let (_, storage) = mem();
    let (mut log, _) = open(&storage, Path::new(DIR), &config(1 << 20))?;
    append_n(&mut log, 3, |_| 0)?;
    let handle = log.sync_handle();
    assert_eq!(handle.durable_offset(), log.next_offset());
    append_n(&mut log, 1, |_| 0)?;
    assert!(handle.durable_offset() < log.next_offset());
    handle.sync()?;
    log.mark_failed();
    assert!(log.sync_handle().sync().is_err());
    assert!(matches!(log.append(&mut batch(0, 1, 0), 0, 0), Err(LogError::Poisoned)));
    Ok(())
}

/// Storage whose files fail on demand: a failing append writes half its bytes first (a short
/// write), a failing sync writes nothing.
#[derive(Debug, Default)]
struct FailSwitch(Arc<AtomicBool>);

impl FileWrapper for FailSwitch {
    fn wrap(&self, _: &Path, inner: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        Arc::new(FlakyFile { inner, fail: self.0.clone() })
    }
}

type Flaky = Wrapped<MemStorage, FailSwitch>;

#[derive(Debug)]
struct FlakyFile {
    inner: Arc<dyn StorageFile>,
    fail: Arc<AtomicBool>,
}

impl Flaky {
    fn failing(&self) -> bool {
        self.wrapper.0.load(SeqCst)
    }
    fn set_failing(&self, on: bool) {
        self.wrapper.0.store(on, SeqCst);
    }
}

impl StorageFile for FlakyFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(pos, buf)
    }
    fn append(&self, data: &[u8]) -> io::Result<()> {
        if self.fail.load(SeqCst) {
            self.inner.append(&data[..data.len() / 2])?;
            return Err(io::Error::other("injected write failure"));
        }
        self.inner.append(data)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
    fn sync(&self) -> io::Result<()> {
        match self.fail.load(SeqCst) {
            true => Err(io::Error::other("injected sync failure")),
            false => self.inner.sync(),
        }
    }
}

#[test]
fn a_failed_write_poisons_the_log_until_reopened() -> TestResult {
    let flaky = Arc::new(Flaky::default());
    let storage: Arc<dyn Storage> = flaky.clone();
    let dir = Path::new(DIR);
    let cfg = config(1 << 20);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 3, |_| 0)?;
    flaky.set_failing(true);
    assert!(flaky.failing());
    assert!(matches!(log.append(&mut batch(0, 2, 0), 0, 0), Err(LogError::Io { .. })));
    flaky.set_failing(false);
    assert!(matches!(log.append(&mut batch(0, 2, 0), 0, 0), Err(LogError::Poisoned)));
    assert!(log.sync_handle().sync().is_err());
    // The half-written batch is past `size`, so reads do not see it.
    check_reads(&log, &model)?;
    drop(log);
    let (mut log, report) = open(&storage, dir, &cfg)?;
    assert!(report.truncated_bytes() > 0);
    check_reads(&log, &model)?;
    append_n(&mut log, 1, |_| 0)?;
    Ok(())
}

#[test]
fn a_failed_sync_during_a_roll_poisons_the_log() -> TestResult {
    let flaky = Arc::new(Flaky::default());
    let storage: Arc<dyn Storage> = flaky.clone();
    let (mut log, _) = open(&storage, Path::new(DIR), &config(300))?;
    append_n(&mut log, 1, |_| 0)?;
    flaky.set_failing(true);
    // The next batch does not fit, so the append rolls, and sealing the old segment fails.
    let mut big = batch(5, 4, 0);
    let first = segment_path(Path::new(DIR), 0, "log");
    let before = flaky.inner.contents(&first);
    assert!(matches!(log.append(&mut big, 0, 0), Err(LogError::Io { op: "sync segment", .. })));
    assert_eq!(flaky.inner.contents(&first), before, "nothing appended");
    assert_eq!(log.segment_count(), 1);
    flaky.set_failing(false);
    assert!(matches!(log.append(&mut big, 0, 0), Err(LogError::Poisoned)));
    assert!(matches!(log.sync(), Err(LogError::Io { .. })));
    Ok(())
}

/// Linux reports a writeback error to one fsync only. A sync that failed on another thread (the
/// periodic sync beside the appends) must stop a later roll from sealing the segment, even
/// when the storage would now report success.
#[test]
fn a_sync_that_failed_on_another_thread_stops_appends_and_rolls() -> TestResult {
    let flaky = Arc::new(Flaky::default());
    let storage: Arc<dyn Storage> = flaky.clone();
    let (mut log, _) = open(&storage, Path::new(DIR), &config(300))?;
    append_n(&mut log, 1, |_| 0)?;
    let handle = log.sync_handle();
    flaky.set_failing(true);
    let failed = std::thread::spawn(move || handle.sync().is_err()).join().map_err(|_| "sync thread")?;
    assert!(failed);
    flaky.set_failing(false); // the error was reported once; the file would sync "fine" now
                              // A batch that would roll the segment, and one that would not: both refused.
    assert!(matches!(log.append(&mut batch(5, 4, 0), 0, 0), Err(LogError::Poisoned)));
    assert!(matches!(log.append(&mut batch(0, 1, 0), 0, 0), Err(LogError::Poisoned)));
    assert_eq!(log.segment_count(), 1, "the segment was not sealed");
    assert!(log.sync_handle().sync().is_err());
    Ok(())
}
