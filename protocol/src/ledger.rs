//! Per-message acknowledgements of one partition for one consumer group (design.md §12), as a
//! pure state machine: the broker feeds it deliveries, acks, nacks and the time, and it says
//! what to hand out (with delivery counts), what is due again, and where the ack floor is.
//!
//! Everything is kept as ranges of offsets, so a delivery of a thousand records or a run of
//! in-order acks costs one range operation, not one per message.

use crate::limits::MAX_ACKED_RANGES;
use std::ops::Range;

use rangemap::{RangeMap, RangeSet};

/// Header names on dead-lettered records: where the record came from, and how many times it
/// was handed out.
pub const ORIGIN_TOPIC: &str = "quiver.origin.topic";
pub const ORIGIN_PARTITION: &str = "quiver.origin.partition";
pub const ORIGIN_OFFSET: &str = "quiver.origin.offset";
pub const DELIVERY_COUNT: &str = "quiver.delivery.count";

/// No deadline: a pending message is handed out again only after a nack or a new session.
pub const NO_DEADLINE: u64 = u64::MAX;

/// Records a delivery should hand out, all with the same delivery count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub range: Range<u64>,
    /// How many times these records have been handed out, counting this time.
    pub count: u32,
}

#[derive(Debug, Clone, Default)]
pub struct AckLedger {
    /// Everything below is acknowledged (or dead-lettered).
    floor: u64,
    /// Acknowledged offsets above the floor.
    acked: RangeSet<u64>,
    /// How many times each offset at or above the floor has been handed out.
    counts: RangeMap<u64, u32>,
    /// Offsets whose count is only an upper bound: they may never have been handed out (a
    /// snapshot folded their count ranges; design.md §12). They come back with a count above
    /// it, but are not dead-lettered until handed out once more.
    maybe: RangeSet<u64>,
    /// Offsets handed out in the current session and not acknowledged, with the time (ms) at
    /// which they are due again.
    pending: RangeMap<u64, u64>,
    /// The end of everything ever handed out; acks beyond it are ignored.
    delivered_end: u64,
    /// The delivered horizon: everything below may have been handed out. The broker raises
    /// it ahead of deliveries and persists it, so that a crash cannot forget a first delivery
    /// (design.md §12).
    horizon: u64,
    /// The horizon as last persisted (at least): deliveries below it need no write.
    durable_horizon: u64,
}

/// What is kept durably of a ledger.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerSnapshot {
    pub floor: u64,
    pub acked: Vec<Range<u64>>,
    pub counts: Vec<(Range<u64>, u32)>,
    /// The delivered horizon (0 in snapshots from before it existed).
    pub horizon: u64,
    /// Offsets whose count is only an upper bound (see [`AckLedger`]); empty in snapshots
    /// from before it existed.
    pub maybe: Vec<Range<u64>>,
}

impl AckLedger {
    pub fn new(floor: u64) -> Self {
        AckLedger {
            floor,
            delivered_end: floor,
            horizon: floor,
            durable_horizon: floor,
            ..Default::default()
        }
    }

    /// Rebuilds a ledger from a snapshot (ranges below the floor are ignored). Every offset
    /// below the snapshot's horizon without a count counts as handed out once, maybe: it may
    /// have been, just before a crash, so it comes back with count 2, but it is not
    /// dead-lettered for that count before it is handed out again.
    pub fn restore(s: &LedgerSnapshot) -> Self {
        let mut l = AckLedger::new(s.floor);
        for (r, c) in &s.counts {
            if r.start < r.end && r.end > s.floor && *c > 0 {
                let r = r.start.max(s.floor)..r.end;
                l.delivered_end = l.delivered_end.max(r.end);
                l.counts.insert(r, *c);
            }
        }
        for r in &s.maybe {
            if r.start < r.end && r.end > s.floor {
                l.maybe.insert(r.start.max(s.floor)..r.end);
            }
        }
        if s.horizon > s.floor {
            let gaps: Vec<Range<u64>> = l.counts.gaps(&(s.floor..s.horizon)).collect();
            for gap in gaps {
                l.counts.insert(gap.clone(), 1);
                l.maybe.insert(gap);
            }
            l.delivered_end = l.delivered_end.max(s.horizon);
            l.horizon = s.horizon;
            l.durable_horizon = s.horizon;
        }
        // Acks are clipped to what was handed out: the end of what the snapshot knows.
        if let Some(end) = s.acked.iter().map(|r| r.end).max() {
            l.delivered_end = l.delivered_end.max(end);
        }
        for r in &s.acked {
            l.ack(r.clone());
        }
        l
    }

    /// The floor, the horizon, and up to `max_ranges` acknowledged, delivery-count and
    /// maybe-delivered ranges above the floor. With more count ranges, the first
    /// `max_ranges - 1` are kept and the rest folded into one range with the highest count among
    /// them (a snapshot never holds a count lower than the ledger's), which is marked maybe
    /// delivered: no record is dead-lettered for a folded count before it is handed out again.
    /// Maybe-delivered ranges past the last kept one are folded into it (a wider set only
    /// delays dead letters by one delivery).
    pub fn snapshot(&self, max_ranges: usize) -> LedgerSnapshot {
        let mut counts: Vec<(Range<u64>, u32)> = Vec::with_capacity(self.counts.len().min(max_ranges));
        let mut folded: Option<Range<u64>> = None;
        if max_ranges > 0 {
            let fold = self.counts.len() > max_ranges;
            for (r, c) in self.counts.iter() {
                match (&mut folded, counts.last_mut()) {
                    (Some(f), Some(last)) => {
                        f.end = r.end;
                        last.0.end = r.end;
                        last.1 = last.1.max(*c);
                    }
                    _ => {
                        if fold && counts.len() + 1 == max_ranges {
                            folded = Some(r.clone());
                        }
                        counts.push((r.clone(), *c));
                    }
                }
            }
        }
        let mut maybe = self.maybe.clone();
        if let Some(f) = folded {
            maybe.insert(f);
        }
        let mut maybe_ranges: Vec<Range<u64>> = Vec::with_capacity(maybe.len().min(max_ranges));
        if max_ranges > 0 {
            for r in maybe.iter() {
                let full = maybe_ranges.len() >= max_ranges;
                match maybe_ranges.last_mut() {
                    Some(last) if full => last.end = r.end,
                    _ => maybe_ranges.push(r.clone()),
                }
            }
        }
        LedgerSnapshot {
            floor: self.floor,
            acked: self.acked.iter().take(max_ranges).cloned().collect(),
            counts,
            horizon: self.horizon,
            maybe: maybe_ranges,
        }
    }

    /// The delivered horizon: everything below may have been handed out.
    pub fn horizon(&self) -> u64 {
        self.horizon
    }

    /// The horizon known to be persisted: handing out below it first time needs no write.
    pub fn durable_horizon(&self) -> u64 {
        self.durable_horizon
    }

    /// Raises the horizon to `end` (never lowers it); the caller persists it.
    pub fn raise_horizon(&mut self, end: u64) {
        self.horizon = self.horizon.max(end);
    }

    /// Lowers the horizon to the end of what was really handed out (at a clean shutdown, so
    /// a restart does not count records never sent as delivered). Returns whether it moved.
    pub fn settle_horizon(&mut self) -> bool {
        let end = self.delivered_end.max(self.floor);
        if self.horizon <= end {
            return false;
        }
        self.horizon = end;
        self.durable_horizon = self.durable_horizon.min(end);
        true
    }

    /// A snapshot with horizon `horizon` was persisted.
    pub fn persisted(&mut self, horizon: u64) {
        self.durable_horizon = self.durable_horizon.max(horizon);
    }

    /// The log ends at `end` (as recovered after a restart): nothing at or past it was handed
    /// out by this log, so what the ledger says of those offsets is void (new records take
    /// them).
    pub fn cut_at(&mut self, end: u64) {
        let end = end.max(self.floor);
        self.counts.remove(end..u64::MAX);
        self.maybe.remove(end..u64::MAX);
        self.acked.remove(end..u64::MAX);
        self.pending.remove(end..u64::MAX);
        self.horizon = self.horizon.min(end);
        self.durable_horizon = self.durable_horizon.min(end);
        self.delivered_end = self.delivered_end.min(end);
    }

    /// Up to `max` acknowledged ranges above the floor.
    pub fn acked_ranges(&self, max: usize) -> Vec<Range<u64>> {
        self.acked.iter().take(max).cloned().collect()
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn is_acked(&self, offset: u64) -> bool {
        offset < self.floor || self.acked.contains(&offset)
    }

    /// How many times `offset` has been handed out so far.
    pub fn count(&self, offset: u64) -> u32 {
        self.counts.get(&offset).copied().unwrap_or(0)
    }

    /// Offsets in `range` not acknowledged and already handed out at least `max` times (not
    /// counting maybe-delivered ones: they are handed out once more first).
    pub fn exhausted(&self, range: Range<u64>, max: u32) -> Vec<Range<u64>> {
        let range = range.start.max(self.floor)..range.end;
        let mut out: Vec<Range<u64>> = Vec::new();
        if range.start >= range.end || max == 0 {
            return out;
        }
        for gap in self.acked.gaps(&range) {
            for (r, c) in self.counts.overlapping(&gap) {
                if *c >= max {
                    let r = r.start.max(gap.start)..r.end.min(gap.end);
                    for r in self.maybe.gaps(&r) {
                        match out.last_mut() {
                            Some(last) if last.end == r.start => last.end = r.end,
                            _ => out.push(r),
                        }
                    }
                }
            }
        }
        out
    }

    /// Messages handed out and not acknowledged in this session.
    pub fn pending_messages(&self) -> u64 {
        self.pending.iter().map(|(r, _)| r.end - r.start).sum()
    }

    /// Hands out `range` now: returns the records to hand out (acknowledged ones skipped), with
    /// their delivery counts, and makes them due at `due_ms`.
    pub fn deliver(&mut self, range: Range<u64>, due_ms: u64) -> Vec<Piece> {
        let range = range.start.max(self.floor)..range.end;
        let mut pieces: Vec<Piece> = Vec::new();
        if range.start >= range.end {
            return pieces;
        }
        let mut push = |range: Range<u64>, count: u32| match pieces.last_mut() {
            Some(last) if last.range.end == range.start && last.count == count => last.range.end = range.end,
            _ => pieces.push(Piece { range, count }),
        };
        for gap in self.acked.gaps(&range) {
            let mut pos = gap.start;
            for (r, c) in self.counts.overlapping(&gap) {
                let (s, e) = (r.start.max(gap.start), r.end.min(gap.end));
                if pos < s {
                    push(pos..s, 1);
                }
                push(s..e, c.saturating_add(1));
                pos = e;
            }
            if pos < gap.end {
                push(pos..gap.end, 1);
            }
        }
        for p in &pieces {
            self.counts.insert(p.range.clone(), p.count);
            self.pending.insert(p.range.clone(), due_ms);
        }
        if !self.maybe.is_empty() {
            for p in &pieces {
                self.maybe.remove(p.range.clone()); // handed out for sure now
            }
        }
        self.delivered_end = self.delivered_end.max(range.end);
        pieces
    }

    /// Acknowledges `range` (clipped to what was handed out). Returns whether the floor moved.
    pub fn ack(&mut self, range: Range<u64>) -> bool {
        let range = range.start.max(self.floor)..range.end.min(self.delivered_end);
        if range.start >= range.end {
            return false;
        }
        if range.start == self.floor && self.acked.first().is_none_or(|r| r.start > range.end) {
            // In order: the floor moves without remembering a range (no allocation per ack).
            self.floor = range.end;
            self.trim();
            return true;
        }
        if self.acked.len() >= MAX_ACKED_RANGES
            && range.start != self.floor
            && !self.acked.overlaps(&(range.start.saturating_sub(1)..range.end.saturating_add(1)))
        {
            return false;
        }
        self.acked.insert(range.clone());
        self.pending.remove(range);
        self.advance()
    }

    /// Everything below `end` was handed out, by a caller that keeps no delivery counts (a
    /// consumer's own record of what it gave the application): acks up to there count.
    pub fn handed_out(&mut self, end: u64) {
        self.delivered_end = self.delivered_end.max(end);
    }

    /// `range` is settled elsewhere (the broker dead-lettered it, or the group acknowledged it
    /// in another session): acknowledged, whether or not it was handed out here. Returns
    /// whether the floor moved.
    pub fn settle(&mut self, range: Range<u64>) -> bool {
        self.handed_out(range.end);
        self.ack(range)
    }

    /// Everything below `next` is acknowledged (a cumulative ack), clipped to what was handed
    /// out. Returns whether the floor moved.
    pub fn ack_below(&mut self, next: u64) -> bool {
        self.ack(self.floor..next)
    }

    /// A commit: everything below `next` is done, whether or not this ledger saw it delivered.
    /// Only moves forward.
    pub fn commit(&mut self, next: u64) -> bool {
        if next <= self.floor {
            return false;
        }
        self.floor = next;
        self.delivered_end = self.delivered_end.max(next);
        self.trim();
        self.advance();
        true
    }

    /// Sets the floor anywhere and forgets everything else (an administrative reset).
    pub fn reset(&mut self, floor: u64) {
        *self = AckLedger::new(floor);
    }

    /// Asks for `offset` again at `due_ms` (only if it is pending).
    /// A nack that would split the pending set beyond `MAX_ACKED_RANGES` ranges is dropped
    /// (the message still comes back with its ack wait or the next session).
    pub fn nack(&mut self, offset: u64, due_ms: u64) {
        if self.pending.contains_key(&offset) && self.pending.len() < MAX_ACKED_RANGES {
            self.pending.insert(offset..offset + 1, due_ms);
        }
    }

    /// Takes the pending ranges due at `now_ms` out of the pending set. The caller hands them
    /// out again with `deliver` or settles them with `ack`.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Range<u64>> {
        let mut due: Vec<Range<u64>> = Vec::new();
        for (r, at) in self.pending.iter() {
            if *at <= now_ms {
                match due.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => due.push(r.clone()),
                }
            }
        }
        for r in &due {
            self.pending.remove(r.clone());
        }
        due
    }

    /// The earliest time something pending is due, if any has a deadline.
    pub fn next_due(&self) -> Option<u64> {
        self.pending.iter().map(|(_, at)| *at).filter(|at| *at != NO_DEADLINE).min()
    }

    /// The session that handed messages out ended: nothing is pending any more. What it had
    /// not acknowledged is handed out again by the next session, with higher counts.
    pub fn end_session(&mut self) {
        self.pending = RangeMap::new();
    }

    fn advance(&mut self) -> bool {
        let Some(r) = self.acked.get(&self.floor).cloned() else { return false };
        self.floor = r.end;
        self.trim();
        true
    }

    fn trim(&mut self) {
        if self.floor > 0 {
            self.acked.remove(0..self.floor);
            self.counts.remove(0..self.floor);
            self.maybe.remove(0..self.floor);
            self.pending.remove(0..self.floor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(range: Range<u64>, count: u32) -> Piece {
        Piece { range, count }
    }

    #[test]
    fn in_order_acks_move_the_floor() {
        let mut l = AckLedger::new(10);
        assert_eq!(l.deliver(10..20, NO_DEADLINE), vec![p(10..20, 1)]);
        assert!(!l.ack(12..15));
        assert_eq!(l.floor(), 10);
        assert!(l.ack(10..12));
        assert_eq!(l.floor(), 15);
        assert!(l.ack_below(20));
        assert_eq!(l.floor(), 20);
        assert_eq!(l.pending_messages(), 0);
        // Acks beyond what was handed out are ignored.
        assert!(!l.ack(20..30));
        assert_eq!(l.floor(), 20);
    }

    #[test]
    fn acks_count_up_to_what_the_caller_handed_out() {
        // A consumer keeps no delivery counts: it says how far it handed records out.
        let mut l = AckLedger::new(5);
        assert!(!l.ack(5..6), "nothing handed out yet");
        l.handed_out(10);
        assert!(!l.ack(7..8));
        assert!(l.ack(5..6));
        assert_eq!(l.floor(), 6);
        assert!(l.ack(6..7), "in order, merging the range above");
        assert_eq!(l.floor(), 8);
        assert!(!l.ack(10..11), "beyond what was handed out");
        assert_eq!(l.acked_ranges(10), Vec::<Range<u64>>::new());
    }

    #[test]
    fn settled_ranges_count_even_beyond_what_was_handed_out() {
        let mut l = AckLedger::new(0);
        l.handed_out(3);
        assert!(!l.settle(10..20), "above the floor");
        assert_eq!(l.acked_ranges(10), vec![10..20]);
        assert!(l.ack(0..3));
        assert_eq!(l.floor(), 3);
        assert!(l.settle(2..10), "reaches the floor and merges the settled range");
        assert_eq!(l.floor(), 20);
        assert!(l.is_acked(19) && !l.is_acked(20));
    }

    #[test]
    fn a_new_session_skips_acked_and_counts_up() {
        let mut l = AckLedger::new(0);
        l.deliver(0..10, NO_DEADLINE);
        l.ack(3..5);
        l.end_session();
        assert_eq!(l.deliver(0..12, NO_DEADLINE), vec![p(0..3, 2), p(5..10, 2), p(10..12, 1)]);
        assert_eq!(l.count(6), 2);
        assert_eq!(l.count(11), 1);
    }

    #[test]
    fn deadlines_and_nacks_make_messages_due() {
        let mut l = AckLedger::new(0);
        l.deliver(0..5, 1000);
        l.nack(2, 100);
        assert_eq!(l.next_due(), Some(100));
        assert_eq!(l.take_due(150), vec![2..3]);
        assert_eq!(l.deliver(2..3, 1150), vec![p(2..3, 2)]);
        l.ack(0..1);
        assert_eq!(l.take_due(1000), vec![1..2, 3..5]);
        assert!(l.take_due(1100).is_empty());
        assert_eq!(l.take_due(1150), vec![2..3]);
        // Dead-lettering settles a message like an ack.
        assert_eq!(l.exhausted(0..10, 2), vec![2..3]);
        assert_eq!(l.exhausted(0..10, 1), vec![1..5]);
        l.ack(2..3);
        assert_eq!(l.floor(), 1);
        assert!(l.exhausted(0..10, 2).is_empty());
    }

    #[test]
    fn snapshots_restore_floor_acks_and_counts() {
        let mut l = AckLedger::new(0);
        l.deliver(0..10, NO_DEADLINE);
        l.ack(0..2);
        l.ack(4..6);
        let s = l.snapshot(1024);
        assert_eq!(
            s,
            LedgerSnapshot {
                floor: 2,
                acked: std::iter::once(4..6).collect(),
                counts: vec![(2..10, 1)],
                horizon: 0,
                maybe: vec![],
            }
        );
        let mut r = AckLedger::restore(&s);
        assert_eq!(r.floor(), 2);
        assert_eq!(r.deliver(2..12, NO_DEADLINE), vec![p(2..4, 2), p(6..10, 2), p(10..12, 1)]);
    }

    #[test]
    fn offsets_below_the_horizon_count_as_handed_out_after_a_restore() {
        let mut l = AckLedger::new(0);
        l.deliver(0..3, NO_DEADLINE);
        l.deliver(0..1, NO_DEADLINE);
        l.raise_horizon(10);
        assert_eq!((l.horizon(), l.durable_horizon()), (10, 0));
        l.persisted(10);
        assert_eq!(l.durable_horizon(), 10);
        // A crash: deliveries of 3..10 may have happened after the snapshot.
        let mut r = AckLedger::restore(&l.snapshot(1024));
        assert_eq!(r.durable_horizon(), 10);
        assert_eq!(r.deliver(0..12, NO_DEADLINE), vec![p(0..1, 3), p(1..10, 2), p(10..12, 1)]);
        // Acks may name anything below the horizon.
        assert!(r.ack(0..10));
        assert_eq!(r.floor(), 10);
    }

    /// After a crash, offsets below the horizon that were maybe never handed out come back
    /// with count 2 but are not dead-lettered at max_deliveries = 1 before a delivery; after a
    /// clean shutdown (horizon settled to what was handed out) they come back with count 1.
    #[test]
    fn the_horizon_gap_is_maybe_delivered_and_a_clean_stop_settles_it() {
        let mut l = AckLedger::new(0);
        l.deliver(0..3, NO_DEADLINE);
        l.raise_horizon(10);
        l.persisted(10);
        let mut crashed = AckLedger::restore(&l.snapshot(1024));
        assert_eq!(crashed.exhausted(0..12, 1), vec![0..3]);
        assert_eq!(crashed.deliver(3..12, NO_DEADLINE), vec![p(3..10, 2), p(10..12, 1)]);
        assert_eq!(crashed.exhausted(0..12, 1), vec![0..12]);
        assert!(l.settle_horizon());
        assert_eq!((l.horizon(), l.durable_horizon()), (3, 3));
        let mut clean = AckLedger::restore(&l.snapshot(1024));
        assert_eq!(clean.exhausted(0..12, 1), vec![0..3]);
        assert_eq!(clean.deliver(3..12, NO_DEADLINE), vec![p(3..12, 1)]);
    }

    #[test]
    fn cut_at_voids_what_lies_past_the_log_end() {
        let mut l = AckLedger::new(0);
        l.deliver(0..4, NO_DEADLINE);
        l.raise_horizon(10);
        l.persisted(10);
        let mut r = AckLedger::restore(&l.snapshot(1024));
        r.ack(2..3);
        r.cut_at(6);
        assert_eq!((r.horizon(), r.durable_horizon()), (6, 6));
        assert_eq!(r.deliver(0..8, NO_DEADLINE), vec![p(0..2, 2), p(3..6, 2), p(6..8, 1)]);
    }

    #[test]
    fn snapshots_fold_extra_count_ranges_upwards() {
        let mut l = AckLedger::new(0);
        for o in 0..10u64 {
            for _ in 0..=(o % 3) + (o / 9) * 5 {
                l.end_session();
                l.deliver(o..o + 1, NO_DEADLINE);
            }
        }
        let s = l.snapshot(3);
        assert_eq!(s.counts.len(), 3);
        assert_eq!(s.counts[2], (2..10, 6));
        let r = AckLedger::restore(&s);
        for o in 0..10 {
            assert!(r.count(o) >= l.count(o), "offset {o}");
        }
    }

    /// More count ranges than a snapshot keeps (out-of-order acks, nacks): the folded tail
    /// takes the highest count among it, but nothing in it is dead-lettered before it is
    /// handed out again, however high that count; the counts never go down.
    #[test]
    fn folded_counts_never_make_records_exhausted() {
        const MAX: u32 = 3;
        let mut l = AckLedger::new(0);
        // Every other offset of 0..40 handed out once (20 count ranges), then offset 30 twice
        // more: it is exhausted, nothing else is.
        for o in (0..40u64).step_by(2) {
            l.deliver(o..o + 1, NO_DEADLINE);
        }
        for _ in 1..MAX {
            l.end_session();
            l.deliver(30..31, NO_DEADLINE);
        }
        l.ack(4..5);
        assert_eq!(l.exhausted(0..50, MAX), vec![30..31]);
        let s = l.snapshot(8);
        assert_eq!(s.counts.len(), 8);
        let mut r = AckLedger::restore(&s);
        for o in 0..40 {
            assert!(r.count(o) >= l.count(o), "offset {o}");
        }
        // The folded tail (and offset 30 in it) is maybe delivered: not dead-lettered yet.
        let exhausted = r.exhausted(0..50, MAX);
        assert!(exhausted.is_empty(), "exhausted after a fold: {exhausted:?}");
        // Handed out once more, each with a count above any it had; afterwards the folded
        // count applies.
        let pieces = r.deliver(0..40, NO_DEADLINE);
        for p in &pieces {
            for o in p.range.clone() {
                assert!(p.count > l.count(o), "offset {o}: {} after {}", p.count, l.count(o));
            }
        }
        assert!(r.exhausted(0..14, MAX).is_empty());
        assert_eq!(r.exhausted(0..50, MAX), vec![14..39]);
    }

    #[test]
    fn commit_and_reset() {
        let mut l = AckLedger::new(0);
        l.deliver(0..10, NO_DEADLINE);
        l.ack(6..8);
        assert!(l.commit(6));
        assert_eq!(l.floor(), 8);
        assert!(!l.commit(3));
        l.reset(3);
        assert_eq!(l.floor(), 3);
        assert_eq!(l.deliver(3..5, NO_DEADLINE), vec![p(3..5, 1)]);
    }

    proptest! {
        /// Against a model with one entry per offset: the floor is the first unacknowledged
        /// offset, deliveries skip exactly the acknowledged offsets, and counts add up.
        #[test]
        fn matches_a_per_offset_model(ops in proptest::collection::vec((0u8..6, 0u64..60, 1u64..12), 1..200)) {
            let mut l = AckLedger::new(0);
            let mut acked = [false; 80];
            let mut counts = [0u32; 80];
            let mut now = 0;
            for (op, at, len) in ops {
                now += 10;
                let r = at..(at + len).min(80);
                match op {
                    0 | 1 => {
                        let pieces = l.deliver(r.clone(), now + 50);
                        let floor = l.floor();
                        let mut expect: Vec<(u64, u32)> = vec![];
                        for o in r.clone() {
                            if o >= floor && !acked[o as usize] {
                                counts[o as usize] += 1;
                                expect.push((o, counts[o as usize]));
                            }
                        }
                        let got: Vec<(u64, u32)> = pieces.iter().flat_map(|p| p.range.clone().map(move |o| (o, p.count))).collect();
                        prop_assert_eq!(got, expect);
                    }
                    2 => {
                        let end = (r.end).min(l.delivered_end);
                        for o in r.start.max(l.floor())..end {
                            acked[o as usize] = true;
                        }
                        l.ack(r);
                    }
                    3 => {
                        for due in l.take_due(now) {
                            for o in due {
                                prop_assert!(!acked[o as usize]);
                            }
                        }
                    }
                    4 => l.end_session(),
                    _ => {
                        // A restore never gives an unacknowledged offset a lower count, even
                        // with few ranges persisted.
                        let r = AckLedger::restore(&l.snapshot(3));
                        for o in l.floor()..80 {
                            if !acked[o as usize] {
                                prop_assert!(r.count(o) >= counts[o as usize], "offset {}", o);
                            }
                        }
                    }
                }
                let model_floor = (0..80u64).find(|o| !acked[*o as usize]).unwrap_or(80);
                prop_assert_eq!(l.floor(), model_floor);
                for o in 0..80u64 {
                    prop_assert_eq!(l.is_acked(o), acked[o as usize]);
                }
            }
        }
    }
}
