//! The newest batches of a partition, kept in memory as the very `Bytes` that were appended.
//!
//! Subscribers that keep up with producers read from here: no syscall, no copy, no blocking
//! thread hand-off; a delivery is a list of `Bytes` handles written straight to the QUIC
//! stream. Older offsets come from the segment files.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

#[derive(Debug)]
pub struct TailCache {
    /// (base offset, next offset, batch), oldest first; offsets are contiguous.
    batches: VecDeque<(u64, u64, Bytes)>,
    /// When the newest batch was added: an idle partition gives its memory back.
    last_push: Option<Instant>,
    bytes: usize,
    max_bytes: usize,
}

impl TailCache {
    pub fn new(max_bytes: usize) -> Self {
        TailCache { batches: VecDeque::new(), bytes: 0, max_bytes, last_push: None }
    }

    /// Adds an appended batch, evicting the oldest past the size limit.
    pub fn push(&mut self, base: u64, next: u64, batch: Bytes) {
        if self.max_bytes == 0 {
            return;
        }
        if self.batches.back().is_some_and(|(_, n, _)| *n != base) {
            // Not contiguous (should not happen): start over rather than serve a gap.
            self.batches.clear();
            self.bytes = 0;
        }
        self.bytes += batch.len();
        self.batches.push_back((base, next, batch));
        self.last_push = Some(Instant::now());
        while self.bytes > self.max_bytes && self.batches.len() > 1 {
            if let Some((_, _, b)) = self.batches.pop_front() {
                self.bytes -= b.len();
            }
        }
    }

    /// Drops the batches from offset `offset` on (the log was truncated there). A batch that
    /// holds `offset` goes too, though truncation cuts at batch boundaries.
    pub fn truncate(&mut self, offset: u64) {
        while self.batches.back().is_some_and(|(_, next, _)| *next > offset) {
            if let Some((_, _, b)) = self.batches.pop_back() {
                self.bytes -= b.len();
            }
        }
    }

    /// Empties the cache if nothing was appended for `idle` (readers fall back to the files).
    pub fn release_if_idle(&mut self, idle: Duration) {
        if self.last_push.is_some_and(|t| t.elapsed() >= idle) {
            self.batches.clear();
            self.bytes = 0;
            self.last_push = None;
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
}
