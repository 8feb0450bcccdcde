//! A test storage that "crashes" (fails every mutating operation) after a countdown: the way
//! tests stop a multi-step write at every point and check what recovery makes of it.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::SeqCst};
use std::sync::Arc;

use super::{MemStorage, Storage, StorageFile};

/// Storage whose mutating operations (directory creations, writes, syncs, removals, renames,
/// directory syncs) fail once `budget` of them have run (a negative budget never fails): a
/// crash at that point. A failing append writes half its bytes first (a torn write).
#[derive(Debug)]
pub(crate) struct Countdown {
    pub(crate) mem: Arc<MemStorage>,
    pub(crate) budget: Arc<AtomicI64>,
    /// Set once an operation failed.
    failed: Arc<AtomicBool>,
}

impl Countdown {
    /// Over `mem`, failing after `budget` operations (negative: never).
    pub(crate) fn new(mem: Arc<MemStorage>, budget: Arc<AtomicI64>) -> Self {
        Countdown { mem, budget, failed: Arc::default() }
    }

    /// Fails every operation after the next `budget`.
    pub(crate) fn arm(&self, budget: i64) {
        self.budget.store(budget, SeqCst);
    }

    /// Whether an operation failed.
    pub(crate) fn tripped(&self) -> bool {
        self.failed.load(SeqCst)
    }

    fn tick(&self) -> io::Result<()> {
        tick(&self.budget, &self.failed)
    }
}

#[derive(Debug)]
struct CountdownFile {
    inner: Arc<dyn StorageFile>,
    budget: Arc<AtomicI64>,
    failed: Arc<AtomicBool>,
}

fn tick(budget: &AtomicI64, failed: &AtomicBool) -> io::Result<()> {
    let left = budget.load(SeqCst);
    if left == 0 {
        failed.store(true, SeqCst);
        return Err(io::Error::other("injected crash"));
    }
    if left > 0 {
        budget.store(left - 1, SeqCst);
    }
    Ok(())
}

impl Countdown {
    fn file(&self, inner: Arc<dyn StorageFile>) -> CountdownFile {
        CountdownFile { inner, budget: self.budget.clone(), failed: self.failed.clone() }
    }
}

impl Storage for Countdown {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.tick()?;
        self.mem.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.mem.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(self.file(self.mem.open(path)?)))
    }
    fn open_segment(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(self.file(self.mem.open_segment(path)?)))
    }
    fn fds_per_segment_file(&self) -> u64 {
        self.mem.fds_per_segment_file()
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.tick()?;
        self.mem.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.tick()?;
        self.mem.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.tick()?;
        self.mem.sync_dir(dir)
    }
}

impl StorageFile for CountdownFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(pos, buf)
    }
    fn append(&self, data: &[u8]) -> io::Result<()> {
        if let Err(e) = tick(&self.budget, &self.failed) {
            self.inner.append(&data[..data.len() / 2])?;
            return Err(e);
        }
        self.inner.append(data)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        tick(&self.budget, &self.failed)?;
        self.inner.truncate(len)
    }
    fn sync(&self) -> io::Result<()> {
        tick(&self.budget, &self.failed)?;
        self.inner.sync()
    }
}
