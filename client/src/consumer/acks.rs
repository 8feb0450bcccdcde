//! What the application acknowledged on one partition, and when to tell the broker: the ack
//! floor and the ranges above it live in protocol's `AckLedger`; nacks, the reconnect filter
//! position and the send schedule are the consumer's own.

use std::collections::BTreeSet;
use std::time::Duration;

use parking_lot::Mutex;
use quiver_protocol::ledger::AckLedger;
use quiver_protocol::limits::MAX_ACKED_RANGES;
use quiver_protocol::message::Message;
use tokio::sync::Notify;

/// Acknowledgements of one partition.
#[derive(Debug)]
pub(super) struct AckState {
    pub(super) inner: Mutex<AckFloor>,
    pub(super) changed: Notify,
    /// Set when the partition was revoked: its messages still buffered are dropped.
    pub(super) revoked: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
pub(super) struct AckFloor {
    /// The floor (everything below is acknowledged) and the acknowledged ranges above it: the
    /// broker's ledger, fed with what this consumer handed out (up to `next_expected`), what
    /// the application acknowledged and what the broker settled.
    pub(super) ledger: AckLedger,
    /// Nacked offsets not acknowledged since: they pass the reconnect filter when they come back
    /// (even as a first delivery, if the broker lost the nack with the connection).
    pub(super) nacked: BTreeSet<u64>,
    /// Next offset to hand to the application (drops redeliveries after a reconnect).
    pub(super) next_expected: u64,
    /// Offsets below this were handed to the application before a session that started over
    /// from the broker's position (`reconcile`): handed out again, they are redeliveries, and
    /// say so (a delivery count of at least 2) even when the broker's count is 1.
    pub(super) handed_before: u64,
    /// Since when resubscriptions have found the log shorter than what was handed out: a
    /// replica catching up (all brokers restarted, an election under way) for a while, a log
    /// that lost records after [`SHORT_LOG_GRACE`].
    short_since: Option<std::time::Instant>,
    /// Whether the broker has told where consumption starts: until then the floor means
    /// nothing and is never committed.
    started: bool,
    /// Bumped by every ack, so the session knows when to tell the broker.
    pub(super) version: u64,
    /// The version at which an ack wakes the session to send at once (between ticks); acks
    /// before it wait for the tick, so acking costs no wake-up per message.
    wake_at: u64,
    /// Nacks not yet sent: (offset, delay in ms).
    nacks: Vec<(u64, u32)>,
}

impl AckState {
    pub(super) fn new() -> Self {
        AckState {
            inner: Mutex::new(AckFloor {
                ledger: AckLedger::new(0),
                nacked: BTreeSet::new(),
                next_expected: 0,
                handed_before: 0,
                short_since: None,
                started: false,
                version: 0,
                wake_at: 0,
                nacks: Vec::new(),
            }),
            changed: Notify::new(),
            revoked: Default::default(),
        }
    }

    pub(super) fn nack(&self, offset: u64, delay: Duration) {
        let delay_ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        let mut a = self.inner.lock();
        if !a.ledger.is_acked(offset) {
            a.nacks.push((offset, delay_ms));
            a.nacked.insert(offset);
        }
        drop(a);
        self.changed.notify_one();
    }

    pub(super) fn ack(&self, offset: u64) {
        let mut a = self.inner.lock();
        if offset < a.ledger.floor() {
            return;
        }
        a.version += 1;
        if a.ledger.ack(offset..offset + 1) {
            a.prune_nacked();
        }
        if !a.nacked.is_empty() {
            a.nacked.remove(&offset);
        }
        let wake = a.version >= a.wake_at;
        drop(a);
        if wake {
            self.changed.notify_one();
        }
    }

    pub(super) fn floor(&self) -> u64 {
        self.inner.lock().ledger.floor()
    }

    /// The floor to commit, once consumption has started.
    pub(super) fn committable(&self) -> Option<u64> {
        let a = self.inner.lock();
        a.started.then_some(a.ledger.floor())
    }
}

/// How long resubscriptions may find the log shorter than what was handed out before the
/// consumer takes it for lost records and starts over from the broker's position: replicas
/// restarted together report a high watermark below the cluster's until a leader commits in its
/// new term (an election and a heartbeat or two).
const SHORT_LOG_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Acknowledged ranges above the floor per `AckRanges` frame; more go in further frames.
const MAX_RANGES_PER_ACK: usize = 4096;

impl AckFloor {
    /// Forgets nacks below the floor (acknowledged since).
    fn prune_nacked(&mut self) {
        let floor = self.ledger.floor();
        if self.nacked.first().is_some_and(|o| *o < floor) {
            self.nacked = self.nacked.split_off(&floor);
        }
    }

    /// The broker settled these offsets (dead letters, or acknowledged by the group before).
    pub(super) fn settle(&mut self, ranges: Vec<std::ops::Range<u64>>) {
        for r in ranges {
            self.ledger.settle(r);
        }
        self.prune_nacked();
        self.version += 1;
    }

    /// Records below `end` were handed to the application.
    pub(super) fn handed_out(&mut self, end: u64) {
        self.next_expected = end;
        self.ledger.handed_out(end);
    }

    /// Frames to send to the broker: nacks, and `AckRanges` when acks changed since `sent`
    /// and it is time (a tick, or `eager_gap` messages acknowledged). Returns the version sent.
    pub(super) fn take_frames(
        &mut self,
        sent: Option<u64>,
        on_tick: bool,
        eager_gap: u64,
    ) -> (Vec<Message>, u64) {
        let mut frames = Vec::new();
        if !self.started {
            return (frames, sent.unwrap_or(0));
        }
        let changed = sent != Some(self.version);
        let due = on_tick || sent.is_none() || self.version - sent.unwrap_or(0) >= eager_gap;
        if changed && due {
            // All ranges the broker can remember (`MAX_ACKED_RANGES`), a frame per
            // `MAX_RANGES_PER_ACK`; the first frame also carries the floor alone if none.
            let floor = self.ledger.floor();
            let mut ranges = self.ledger.acked_ranges(MAX_ACKED_RANGES).into_iter().peekable();
            loop {
                let chunk: Vec<std::ops::Range<u64>> = ranges.by_ref().take(MAX_RANGES_PER_ACK).collect();
                frames.push(Message::AckRanges { floor, ranges: chunk });
                if ranges.peek().is_none() {
                    break;
                }
            }
        }
        for (offset, delay_ms) in self.nacks.drain(..) {
            frames.push(Message::Nack { offset, delay_ms });
        }
        let version = if changed && due { self.version } else { sent.unwrap_or(0) };
        self.wake_at = version + eager_gap;
        (frames, version)
    }

    /// Aligns local state with where a (re)subscription starts. `false`: the log there is
    /// shorter than what was handed out, for less than [`SHORT_LOG_GRACE`] so far: subscribe
    /// again in a moment instead.
    pub(super) fn reconcile(
        &mut self,
        start: u64,
        high_watermark: u64,
        first: bool,
        topic: &str,
        partition: u32,
    ) -> bool {
        if first || !self.started {
            // The broker decided where we start (committed offset or start position).
            self.ledger.reset(start);
            self.next_expected = start;
            self.started = true;
            return true;
        }
        if self.next_expected > high_watermark.max(start) {
            let now = std::time::Instant::now();
            let since = *self.short_since.get_or_insert(now);
            if now.duration_since(since) < SHORT_LOG_GRACE {
                tracing::debug!(%topic, partition, handed_out = self.next_expected, high_watermark, "the log here is shorter than what was handed out; subscribing again in a moment");
                return false;
            }
            // Still shorter: the broker lost unsynced data (durability interval/os) and will
            // reuse those offsets. Start over from the broker.
            tracing::warn!(%topic, partition, handed_out = self.next_expected, high_watermark, "partition log went backwards; resuming from the broker's position");
            self.short_since = None;
            self.handed_before = self.handed_before.max(self.next_expected);
            self.ledger.reset(start);
            self.nacked.clear();
            self.next_expected = start;
            return true;
        }
        self.short_since = None;
        if start > self.ledger.floor() {
            // Retention removed offsets we had not acknowledged (they can never be acked now),
            // or the group acknowledged them in other sessions.
            self.ledger.commit(start);
            self.prune_nacked();
        }
        let next = self.next_expected.max(start);
        self.handed_out(next);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_acknowledged_range_reaches_the_broker() {
        let state = AckState::new();
        let mut a = state.inner.lock();
        a.started = true;
        a.handed_out(10_001);
        // 5,000 disjoint acknowledged offsets above the floor: more than one frame holds.
        for i in 0..5_000u64 {
            a.ledger.ack(2 * i + 1..2 * i + 2);
        }
        a.version = 1;
        let (frames, version) = a.take_frames(None, true, 1);
        assert_eq!(version, 1);
        let mut sent = Vec::new();
        for f in &frames {
            match f {
                Message::AckRanges { floor, ranges } => {
                    assert_eq!(*floor, 0);
                    assert!(ranges.len() <= MAX_RANGES_PER_ACK);
                    sent.extend(ranges.iter().cloned());
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(sent, a.ledger.acked_ranges(usize::MAX), "every range, in order");

        // With nothing above the floor, one frame carries the floor alone.
        a.ledger.reset(7);
        a.version = 2;
        let (frames, _) = a.take_frames(Some(1), true, 1);
        assert_eq!(frames, vec![Message::AckRanges { floor: 7, ranges: Vec::new() }]);
    }

    #[test]
    fn acks_move_the_floor_settled_ranges_merge_and_nacks_below_it_are_forgotten() {
        let state = AckState::new();
        state.inner.lock().reconcile(10, 100, true, "t", 0);
        state.inner.lock().handed_out(20);
        state.nack(12, Duration::ZERO);
        state.ack(11);
        state.ack(10);
        assert_eq!(state.floor(), 12);
        state.inner.lock().settle(std::iter::once(13..30).collect());
        assert_eq!(state.floor(), 12, "12 is neither acknowledged nor settled");
        state.ack(12);
        assert_eq!(state.floor(), 30, "the settled range beyond what was handed out counts");
        assert!(state.inner.lock().nacked.is_empty());
        state.ack(5); // below the floor: nothing
        assert_eq!(state.committable(), Some(30));
    }

    #[test]
    fn a_log_that_went_backwards_voids_acks_of_reused_offsets() {
        let state = AckState::new();
        state.inner.lock().reconcile(0, 100, true, "t", 0);
        state.inner.lock().handed_out(50);
        state.ack(40);
        // The broker lost unsynced records: the log ends at 30 and the offsets are reused. At
        // first that looks like a replica catching up: subscribe again, nothing changes.
        assert!(!state.inner.lock().reconcile(30, 30, false, "t", 0));
        assert_eq!(state.inner.lock().next_expected, 50);
        // Still short after the grace: lost records.
        state.inner.lock().short_since = Some(std::time::Instant::now() - SHORT_LOG_GRACE);
        assert!(state.inner.lock().reconcile(30, 30, false, "t", 0));
        assert_eq!(state.floor(), 30);
        state.ack(40); // a message handed out before the loss: its offset now means another record
        assert_eq!(state.floor(), 30);
        assert!(!state.inner.lock().ledger.is_acked(40));
    }

    #[test]
    fn a_replica_catching_up_keeps_what_was_handed_out_and_acknowledged() {
        let state = AckState::new();
        state.inner.lock().reconcile(0, 100, true, "t", 0);
        state.inner.lock().handed_out(50);
        state.ack(40);
        // All brokers restarted: the replica's high watermark is behind for a moment.
        assert!(!state.inner.lock().reconcile(30, 30, false, "t", 0));
        // Caught up: nothing was lost, nothing is handed out again.
        assert!(state.inner.lock().reconcile(30, 60, false, "t", 0));
        assert_eq!(state.inner.lock().next_expected, 50);
        assert!(state.inner.lock().ledger.is_acked(40));
        assert_eq!(state.inner.lock().handed_before, 0);
    }
}
