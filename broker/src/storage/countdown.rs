//! A test storage that "crashes" (fails every mutating operation) after a countdown: the way
//! tests stop a multi-step write at every point and check what recovery makes of it.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::Arc;

use super::{MemStorage, Storage, StorageFile};

/// Storage whose mutating operations (writes, syncs, removals, renames, directory syncs) fail
/// once `budget` of them have run (a negative budget never fails): a crash at that point.
#[derive(Debug)]
pub(crate) struct Countdown {
    pub(crate) mem: Arc<MemStorage>,
    pub(crate) budget: Arc<AtomicI64>,
}

#[derive(Debug)]
struct CountdownFile {
    inner: Arc<dyn StorageFile>,
    budget: Arc<AtomicI64>,
}

fn tick(budget: &AtomicI64) -> io::Result<()> {
    let left = budget.load(SeqCst);
    if left == 0 {
        return Err(io::Error::other("injected crash"));
    }
    if left > 0 {
        budget.store(left - 1, SeqCst);
    }
    Ok(())
}

impl Storage for Countdown {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.mem.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.mem.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(CountdownFile { inner: self.mem.open(path)?, budget: self.budget.clone() }))
    }
    fn open_segment(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(CountdownFile { inner: self.mem.open_segment(path)?, budget: self.budget.clone() }))
    }
    fn fds_per_segment_file(&self) -> u64 {
        self.mem.fds_per_segment_file()
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        tick(&self.budget)?;
        self.mem.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        tick(&self.budget)?;
        self.mem.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        tick(&self.budget)?;
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
        tick(&self.budget)?;
        self.inner.append(data)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        tick(&self.budget)?;
        self.inner.truncate(len)
    }
    fn sync(&self) -> io::Result<()> {
        tick(&self.budget)?;
        self.inner.sync()
    }
}
