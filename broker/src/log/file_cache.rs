//! Closed segments' log files held open, bounded across every partition that shares one
//! [`ClosedSegmentFiles`] (the broker shares one; design.md §5.6).
//!
//! A closed segment opens its log file when a read needs it and registers it here; past the
//! limit the least recently used one is closed (reads in flight keep their handle until they
//! finish). So a broker's descriptors are one per partition (the active segment) plus this
//! one budget, however many partitions it holds.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::storage::StorageFile;

/// Where a segment keeps its open log file (`None` while closed).
pub(crate) type FileSlot = Mutex<Option<Arc<dyn StorageFile>>>;

/// Closed segments' log files open at once across the partitions sharing this.
#[derive(Debug)]
pub struct ClosedSegmentFiles {
    limit: usize,
    lru: Mutex<Lru>,
}

#[derive(Debug, Default)]
struct Lru {
    /// (slot id, stamp, slot), least recently used first; an entry whose stamp is not the
    /// slot's latest is stale and skipped.
    queue: VecDeque<(usize, u64, Weak<FileSlot>)>,
    /// The latest stamp of every registered slot.
    latest: HashMap<usize, u64>,
    next_stamp: u64,
}

impl ClosedSegmentFiles {
    pub fn new(limit: usize) -> Arc<ClosedSegmentFiles> {
        Arc::new(ClosedSegmentFiles { limit, lru: Mutex::new(Lru::default()) })
    }

    /// At most this many closed segment files are open at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Files registered now (at least the open ones; a deleted segment counts until it ages out).
    pub fn registered(&self) -> usize {
        self.lru.lock().latest.len()
    }

    /// Records that `slot` holds an open file and was just used; closes the least recently
    /// used files beyond the limit. Never called with a slot's lock held.
    pub(crate) fn touch(&self, slot: &Arc<FileSlot>) {
        let id = Arc::as_ptr(slot) as usize;
        let mut evicted = Vec::new();
        {
            let mut lru = self.lru.lock();
            lru.next_stamp += 1;
            let stamp = lru.next_stamp;
            lru.latest.insert(id, stamp);
            lru.queue.push_back((id, stamp, Arc::downgrade(slot)));
            while lru.latest.len() > self.limit {
                let Some((old, old_stamp, weak)) = lru.queue.pop_front() else { break };
                if lru.latest.get(&old) == Some(&old_stamp) {
                    lru.latest.remove(&old);
                    evicted.push(weak);
                }
            }
            if lru.queue.len() > 2 * self.limit.max(16) {
                let Lru { queue, latest, .. } = &mut *lru;
                queue.retain(|(id, stamp, _)| latest.get(id) == Some(stamp));
            }
        }
        // Outside the cache's lock: a slot's lock is taken while opening files.
        for slot in evicted.into_iter().filter_map(|w| w.upgrade()) {
            *slot.lock() = None;
        }
    }

    /// Forgets `slot` (its segment became active again or was deleted).
    pub(crate) fn forget(&self, slot: &Arc<FileSlot>) {
        self.lru.lock().latest.remove(&(Arc::as_ptr(slot) as usize));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemStorage, Storage};

    #[test]
    fn keeps_the_most_recently_used_files_open() -> std::io::Result<()> {
        let storage = MemStorage::new();
        storage.create_dir_all(std::path::Path::new("/"))?;
        let cache = ClosedSegmentFiles::new(2);
        let slots: Vec<Arc<FileSlot>> = (0..3)
            .map(|i| Ok(Arc::new(Mutex::new(Some(storage.open(std::path::Path::new(&format!("/{i}")))?)))))
            .collect::<std::io::Result<_>>()?;
        let open = || slots.iter().map(|s| s.lock().is_some()).collect::<Vec<_>>();
        cache.touch(&slots[0]);
        cache.touch(&slots[1]);
        cache.touch(&slots[0]);
        assert_eq!(open(), [true, true, true], "2 registered, the third was never registered");
        cache.touch(&slots[2]);
        assert_eq!(open(), [true, false, true], "the least recently used is closed");
        assert_eq!(cache.registered(), 2);
        cache.forget(&slots[0]);
        for _ in 0..100 {
            cache.touch(&slots[2]);
        }
        assert_eq!(cache.registered(), 1);
        assert!(cache.lru.lock().queue.len() <= 2 * 16 + 1, "stale entries are dropped");
        Ok(())
    }
}
