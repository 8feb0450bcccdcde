//! The newest batches of a partition, kept in memory as the very `Bytes` that were appended.
//!
//! Subscribers that keep up with producers read from here: no syscall, no copy, no blocking
//! thread hand-off; a delivery is a list of `Bytes` handles written straight to the QUIC
//! stream. Older offsets come from the segment files.

//!
//! Memory: each cache holds at most its per-partition limit, and all caches together at most
//! one broker-wide [`TailBudget`] (`tail_cache_bytes_total`). A cache that grows keeps to its
//! fair share (the budget divided by the caches holding anything), evicting its own oldest
//! batches; a batch that still does not fit in the budget is not cached, and readers read it
//! from the segment file (the page cache). So the broker's tail-cache memory is bounded by one
//! number however many partitions are written, and every written partition keeps a share.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Bytes that all tail caches of a broker may hold together.
#[derive(Debug)]
pub struct TailBudget {
    limit: usize,
    used: AtomicUsize,
    /// Caches of partitions being written (appended to since their last idle release): they
    /// share `limit` fairly.
    holders: AtomicUsize,
}

impl TailBudget {
    pub fn new(limit: usize) -> Arc<TailBudget> {
        Arc::new(TailBudget { limit, used: AtomicUsize::new(0), holders: AtomicUsize::new(0) })
    }

    /// Bytes held by all caches now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// What one cache may hold when `holders` caches hold something.
    fn share(&self, holders: usize) -> usize {
        self.limit / holders.max(1)
    }
}

/// How big each partition's tail cache may grow, and the budget all of them share.
#[derive(Debug, Clone)]
pub struct TailCacheSettings {
    pub per_partition: usize,
    pub budget: Arc<TailBudget>,
}

impl TailCacheSettings {
    pub fn new(per_partition: usize, total: usize) -> TailCacheSettings {
        TailCacheSettings { per_partition, budget: TailBudget::new(total) }
    }
}

#[derive(Debug)]
pub struct TailCache {
    /// (base offset, next offset, batch), oldest first; offsets are contiguous.
    batches: VecDeque<(u64, u64, Bytes)>,
    /// When the newest batch was added: an idle partition gives its memory back.
    last_push: Option<Instant>,
    /// Bytes held, all of them taken from `budget`.
    bytes: usize,
    max_bytes: usize,
    budget: Arc<TailBudget>,
    /// Whether this cache counts among the budget's holders (written since its last release).
    holding: bool,
}

impl TailCache {
    /// A cache of at most `max_bytes` with a budget of its own.
    #[cfg(test)]
    pub fn new(max_bytes: usize) -> Self {
        TailCache::with_settings(&TailCacheSettings::new(max_bytes, max_bytes))
    }

    pub fn with_settings(settings: &TailCacheSettings) -> Self {
        TailCache {
            batches: VecDeque::new(),
            bytes: 0,
            max_bytes: settings.per_partition,
            last_push: None,
            budget: settings.budget.clone(),
            holding: false,
        }
    }

    /// Adds an appended batch, evicting this partition's oldest past its limit or when the
    /// shared budget is spent. A batch that still does not fit is not cached (the cache is
    /// then empty: it only ever holds a contiguous run of the newest batches).
    pub fn push(&mut self, base: u64, next: u64, batch: Bytes) {
        if self.batches.back().is_some_and(|(_, n, _)| *n != base) {
            // Not contiguous (a batch was not cached, or the log was truncated): start over
            // rather than serve a gap.
            self.clear();
        }
        let len = batch.len();
        if len > self.max_bytes {
            self.clear();
            return;
        }
        let holders = self.budget.holders.load(Ordering::Relaxed) + usize::from(!self.holding);
        let limit = self.max_bytes.min(self.budget.share(holders));
        while self.bytes > 0 && self.bytes + len > limit {
            self.pop_oldest();
        }
        while !self.budget.try_take(len) {
            if !self.pop_oldest() {
                // Other partitions hold the budget: this batch is read from the file.
                metrics::counter!("quiver_tail_cache_skipped_batches_total").increment(1);
                self.set_holding(true);
                return;
            }
        }
        self.bytes += len;
        self.batches.push_back((base, next, batch));
        self.last_push = Some(Instant::now());
        self.set_holding(true);
    }

    /// Counts this cache among the budget's holders, or no longer.
    fn set_holding(&mut self, holding: bool) {
        if holding != self.holding {
            match holding {
                true => self.budget.holders.fetch_add(1, Ordering::Relaxed),
                false => self.budget.holders.fetch_sub(1, Ordering::Relaxed),
            };
            self.holding = holding;
        }
    }

    fn pop_oldest(&mut self) -> bool {
        match self.batches.pop_front() {
            Some((_, _, b)) => {
                self.bytes -= b.len();
                self.budget.give(b.len());
                true
            }
            None => false,
        }
    }

    fn clear(&mut self) {
        self.batches.clear();
        self.budget.give(self.bytes);
        self.bytes = 0;
    }

    /// Drops the batches from offset `offset` on (the log was truncated there). A batch that
    /// holds `offset` goes too, though truncation cuts at batch boundaries.
    pub fn truncate(&mut self, offset: u64) {
        while self.batches.back().is_some_and(|(_, next, _)| *next > offset) {
            if let Some((_, _, b)) = self.batches.pop_back() {
                self.bytes -= b.len();
                self.budget.give(b.len());
            }
        }
    }

    /// Empties the cache if nothing was appended for `idle` (readers fall back to the files).
    pub fn release_if_idle(&mut self, idle: Duration) {
        if self.last_push.is_some_and(|t| t.elapsed() >= idle) {
            self.clear();
            self.last_push = None;
            self.set_holding(false);
        }
    }

    /// Whether a read at `offset` would be served from the cache.
    pub fn holds(&self, offset: u64) -> bool {
        self.batches.front().is_some_and(|(first, _, _)| *first <= offset)
    }

    /// Whole batches from the one containing `offset`, below `limit`, up to `max_bytes` (at
    /// least one). `None` when `offset` is older than the cache.
    pub fn read(&self, offset: u64, limit: u64, max_bytes: usize) -> Option<Vec<Bytes>> {
        let (first, _, _) = self.batches.front()?;
        if offset < *first {
            return None;
        }
        let start = self.batches.partition_point(|(_, next, _)| *next <= offset);
        let mut out = Vec::new();
        let mut size = 0;
        for (base, _, batch) in self.batches.range(start..) {
            if *base >= limit || (!out.is_empty() && size + batch.len() > max_bytes) {
                break;
            }
            size += batch.len();
            out.push(batch.clone());
        }
        Some(out)
    }
}

impl Drop for TailCache {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
        self.bytes = 0;
        self.set_holding(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_contiguous_tail_and_evicts() {
        let mut c = TailCache::new(30);
        for i in 0..5u64 {
            c.push(i * 10, i * 10 + 10, Bytes::from(vec![i as u8; 10]));
        }
        // 50 bytes pushed, 30 kept: batches at 20, 30, 40.
        assert!(c.read(15, 100, 100).is_none());
        let r = c.read(25, 100, 100).expect("cached");
        assert_eq!(r.len(), 3);
        assert_eq!(r[0][0], 2);
        // Limit (high watermark) and byte budget (at least one batch).
        assert_eq!(c.read(20, 40, 100).expect("cached").len(), 2);
        assert_eq!(c.read(20, 100, 1).expect("cached").len(), 1);
        assert_eq!(c.read(50, 100, 100).expect("cached").len(), 0);
        // Idle: the memory goes back, readers go to the files.
        c.release_if_idle(Duration::from_secs(3600));
        assert!(c.read(40, 100, 100).is_some());
        assert!(c.holds(20) && !c.holds(19));
        c.release_if_idle(Duration::ZERO);
        assert!(c.read(40, 100, 100).is_none());
        assert!(!c.holds(40));
    }

    #[test]
    fn truncation_drops_the_cut_batches() {
        let mut c = TailCache::new(100);
        for i in 0..5u64 {
            c.push(i * 10, i * 10 + 10, Bytes::from(vec![i as u8; 10]));
        }
        c.truncate(30);
        assert_eq!(c.read(0, 100, 100).map(|r| r.len()), Some(3));
        assert_eq!(c.read(30, 100, 100).map(|r| r.len()), Some(0));
        // Appends go on from the cut, contiguous again.
        c.push(30, 31, Bytes::from_static(b"new"));
        assert_eq!(c.read(30, 100, 100), Some(vec![Bytes::from_static(b"new")]));
        assert_eq!(c.read(0, 100, 1000).map(|r| r.len()), Some(4), "the older batches stay");
        c.truncate(0);
        assert!(c.read(0, 100, 100).is_none());
    }

    #[test]
    fn caches_share_one_budget() {
        let settings = TailCacheSettings::new(40, 50);
        let mut a = TailCache::with_settings(&settings);
        let mut b = TailCache::with_settings(&settings);
        for i in 0..4u64 {
            a.push(i * 10, i * 10 + 10, Bytes::from(vec![1u8; 10]));
        }
        assert_eq!(settings.budget.used(), 40);
        // b fits one batch in what is left; its second evicts its first; a third still fits.
        b.push(0, 5, Bytes::from(vec![2u8; 10]));
        assert_eq!(settings.budget.used(), 50);
        b.push(5, 9, Bytes::from(vec![2u8; 10]));
        assert_eq!(settings.budget.used(), 50);
        assert!(b.holds(5) && !b.holds(4));
        // A batch larger than what b can free is not cached; b is then empty, a untouched.
        b.push(9, 12, Bytes::from(vec![2u8; 20]));
        assert!(!b.holds(9) && b.read(9, 100, 100).is_none());
        assert_eq!(settings.budget.used(), 40);
        assert!(a.read(0, 100, 100).is_some_and(|r| r.len() == 4));
        // The next batch starts a fresh run once there is room.
        b.push(12, 13, Bytes::from(vec![2u8; 10]));
        assert!(b.holds(12));
        drop(a);
        assert_eq!(settings.budget.used(), 10);
        b.release_if_idle(Duration::ZERO);
        assert_eq!(settings.budget.used(), 0);
    }

    #[test]
    fn a_batch_over_the_partition_limit_is_not_cached() {
        let mut c = TailCache::new(30);
        c.push(0, 1, Bytes::from(vec![0u8; 10]));
        c.push(1, 2, Bytes::from(vec![0u8; 31]));
        assert!(c.read(0, 100, 100).is_none() && c.read(1, 100, 100).is_none());
    }

    #[test]
    fn written_partitions_share_the_budget_fairly() {
        let settings = TailCacheSettings::new(1000, 100);
        let mut caches: Vec<TailCache> = (0..4).map(|_| TailCache::with_settings(&settings)).collect();
        // The first cache alone may take the whole budget.
        for i in 0..10u64 {
            caches[0].push(i, i + 1, Bytes::from(vec![0u8; 10]));
        }
        assert_eq!(settings.budget.used(), 100);
        // Three more written partitions: each gets a share, the first gives its excess back
        // as it goes on writing.
        for round in 0..10u64 {
            for (c, cache) in caches.iter_mut().enumerate() {
                let base = if c == 0 { 10 + round } else { round };
                cache.push(base, base + 1, Bytes::from(vec![0u8; 10]));
            }
        }
        for (c, cache) in caches.iter().enumerate() {
            let held = cache.bytes;
            assert!((10..=30).contains(&held), "cache {c} holds {held} of a 25-byte share");
        }
        assert!(settings.budget.used() <= 100);
        drop(caches);
        assert_eq!((settings.budget.used(), settings.budget.holders.load(Ordering::Relaxed)), (0, 0));
    }
}
