//! The engine driven by scripted events and a manual clock, without sockets or disks (as
//! quinn-proto is tested), and a property test over random event sequences.

#![allow(clippy::single_range_in_vec_init)] // acked ranges, not ranges of values

use super::*;
use proptest::prelude::*;

/// Records per batch in the model log, and bytes per record.
const BATCH: u64 = 4;
const RECORD_BYTES: u64 = 10;

fn cfg() -> Config {
    Config {
        start: 0,
        window_bytes: 1 << 20,
        window_messages: 1 << 20,
        max_deliver_bytes: 1 << 20,
        ack_wait_ms: 0,
        max_deliveries: 0,
        group: true,
    }
}

/// The engine with a model log and a client that records what it was sent. Plays the driver.
struct Harness {
    engine: Engine,
    ledger: AckLedger,
    ends: Ends,
    now: u64,
    /// Every delivery sent, in order.
    delivered: Vec<Delivery>,
    settled: Vec<(Range<u64>, Settle)>,
    /// Dead-letter writes asked for and not answered yet, oldest first.
    dlq_queue: VecDeque<Vec<(Range<u64>, u32)>>,
    /// Records appended to the dead-letter topic (offset, count).
    dlq: Vec<(u64, u32)>,
    /// Ownership checks are answered yes (false: the subscription was fenced).
    owner: bool,
    owner_checks: usize,
    persists: Vec<Persist>,
}

impl Harness {
    fn new(cfg: Config, high: u64) -> Self {
        let ledger = AckLedger::new(cfg.start);
        Harness {
            engine: Engine::new(cfg),
            ledger,
            ends: Ends { log_start: 0, high },
            now: 0,
            delivered: vec![],
            settled: vec![],
            dlq_queue: VecDeque::new(),
            dlq: vec![],
            owner: true,
            owner_checks: 0,
            persists: vec![],
        }
    }

    /// The model log's read: whole batches from the one holding `offset`, up to `max` bytes
    /// (at least one), below the high watermark.
    fn read(&self, offset: u64, max: u64) -> Option<(u64, u64, u64)> {
        if offset >= self.ends.high {
            return None;
        }
        let base = offset - offset % BATCH;
        let mut next = base + BATCH;
        let mut bytes = BATCH * RECORD_BYTES;
        while next + BATCH <= self.ends.high && bytes + BATCH * RECORD_BYTES <= max {
            next += BATCH;
            bytes += BATCH * RECORD_BYTES;
        }
        Some((base, next.min(self.ends.high), bytes))
    }

    /// Polls and carries out actions until the engine waits (or is refused ownership).
    /// Returns the wait's deadline.
    fn run(&mut self) -> Option<u64> {
        for _ in 0..10_000 {
            match self.engine.poll(&mut self.ledger, self.ends, self.now) {
                Action::CheckOwner => {
                    self.owner_checks += 1;
                    if !self.owner {
                        return None; // the driver ends a fenced subscription
                    }
                    self.engine.owner_confirmed();
                }
                Action::Read { offset, max_bytes } => {
                    assert!(max_bytes >= 1);
                    if offset < self.ends.log_start {
                        self.engine.read_gone();
                        continue;
                    }
                    let r = self.read(offset, max_bytes);
                    let bytes = r.map(|r| r.2).unwrap_or(0);
                    self.engine.on_read(&mut self.ledger, r.map(|r| (r.0, r.1)), bytes, self.now);
                }
                Action::Deliver(d) => {
                    self.persists.push(d.persist);
                    if d.persist == Persist::Wait {
                        let h = self.ledger.horizon();
                        self.ledger.persisted(h);
                    }
                    self.delivered.push(d);
                }
                Action::DeadLetter(records) => self.dlq_queue.push_back(records),
                Action::Settled(ranges, why) => self.settled.extend(ranges.into_iter().map(|r| (r, why))),
                Action::Wait { until } => return until,
            }
            self.engine.take_dirty();
        }
        panic!("the engine never waits");
    }

    fn ack(&mut self, ack: ClientAck) {
        self.engine.on_ack(&mut self.ledger, ack, self.now);
    }

    /// Finishes the oldest dead-letter write.
    fn finish_dead_letter(&mut self, written: bool) {
        let records = self.dlq_queue.pop_front().expect("a dead-letter write");
        if written {
            for (r, c) in &records {
                self.dlq.extend(r.clone().map(|o| (o, *c)));
            }
        }
        let ranges = merged_ranges(&records);
        self.engine.on_dead_lettered(&mut self.ledger, &ranges, written, self.now);
    }

    /// Offsets handed out, with their counts, in order.
    fn handed_out(&self) -> Vec<(u64, u32)> {
        self.delivered
            .iter()
            .flat_map(|d| d.pieces.iter().flat_map(|p| p.range.clone().map(|o| (o, p.count))))
            .collect()
    }

    fn in_flight_messages(&self) -> u64 {
        let floor = self.engine.window().acked();
        self.delivered
            .iter()
            .filter(|d| !d.redelivery)
            .flat_map(|d| d.pieces.iter())
            .map(|p| p.range.end.saturating_sub(p.range.start.max(floor)))
            .sum()
    }
}

#[test]
fn first_deliveries_stop_at_the_window_and_resume_on_acks() {
    let mut h =
        Harness::new(Config { window_messages: 8, max_deliver_bytes: BATCH * RECORD_BYTES, ..cfg() }, 40);
    assert_eq!(h.run(), None);
    // Two batches of four fill the window of eight.
    assert_eq!(h.delivered.len(), 2);
    assert!(h.delivered.iter().all(|d| d.whole && !d.redelivery));
    assert_eq!(h.engine.position(), 8);
    // An ack above a hole does not free anything; the floor does.
    h.ack(ClientAck::Acked(0, vec![4..8]));
    h.run();
    assert_eq!(h.delivered.len(), 2);
    h.ack(ClientAck::Acked(4, vec![]));
    assert_eq!(h.ledger.floor(), 8);
    h.run();
    assert_eq!(h.delivered.len(), 4);
    assert_eq!(h.handed_out(), (0..16).map(|o| (o, 1)).collect::<Vec<_>>());
    // The first delivery past the durable horizon waited for its write; the next did not.
    assert_eq!(h.persists[0], Persist::Wait);
    assert_eq!(h.persists[1], Persist::Lazily);
}

#[test]
fn one_delivery_goes_out_even_when_larger_than_the_window() {
    let mut h = Harness::new(Config { window_bytes: 1, ..cfg() }, 12);
    h.run();
    assert_eq!(h.delivered.len(), 1);
    assert!(h.engine.in_flight_bytes() > 1);
}

#[test]
fn unacknowledged_records_come_back_after_their_ack_wait() {
    let mut h = Harness::new(Config { ack_wait_ms: 1000, ..cfg() }, 8);
    assert_eq!(h.run(), Some(1000));
    h.ack(ClientAck::Acked(0, vec![0..2, 5..8]));
    h.now = 999;
    assert_eq!(h.run(), Some(1000));
    assert_eq!(h.delivered.len(), 1);
    h.now = 1000;
    let checks = h.owner_checks;
    assert_eq!(h.run(), Some(2000));
    assert_eq!(h.owner_checks, checks + 1, "ownership is checked before taking what is due");
    let again = &h.delivered[1];
    assert!(again.redelivery && !again.whole);
    assert_eq!(again.pieces, vec![Piece { range: 2..5, count: 2 }]);
    assert_eq!(again.persist, Persist::Wait, "a raised count is durable before it goes out");
}

#[test]
fn a_nack_brings_one_record_back_after_its_delay() {
    let mut h = Harness::new(cfg(), 4);
    assert_eq!(h.run(), None, "no deadlines without an ack wait");
    h.ack(ClientAck::Nack(2, 50));
    h.ack(ClientAck::Acked(2, vec![3..4]));
    assert_eq!(h.run(), Some(50));
    h.now = 50;
    h.run();
    assert_eq!(h.delivered.last().map(|d| d.pieces.clone()), Some(vec![Piece { range: 2..3, count: 2 }]));
}

#[test]
fn records_handed_out_max_deliveries_times_are_dead_lettered_not_sent() {
    let mut h = Harness::new(Config { ack_wait_ms: 10, max_deliveries: 2, ..cfg() }, 4);
    h.run();
    h.ack(ClientAck::Acked(0, vec![1..4])); // 0 stays unacknowledged
    h.now = 10;
    h.run();
    assert_eq!(h.handed_out().last(), Some(&(0, 2)));
    h.now = 20;
    h.run();
    // Third time due: its dead letter is asked for, it is not sent, and it is not settled
    // before the write finishes.
    assert_eq!(h.handed_out().len(), 5);
    assert_eq!(h.dlq_queue.len(), 1);
    assert_eq!(h.dlq_queue[0], vec![(0..1, 2)]);
    assert_eq!(h.ledger.floor(), 0);
    assert!(h.settled.is_empty());
    h.finish_dead_letter(true);
    h.run();
    assert_eq!(h.ledger.floor(), 4);
    assert_eq!(h.settled, vec![(0..1, Settle::DeadLettered)]);
    assert_eq!(h.dlq, vec![(0, 2)]);
}

#[test]
fn a_failed_dead_letter_leaves_the_record_pending_and_hands_it_out_again() {
    let mut h = Harness::new(Config { ack_wait_ms: 10, max_deliveries: 1, ..cfg() }, 4);
    h.run();
    h.ack(ClientAck::Acked(1, vec![]));
    h.now = 10;
    h.run();
    assert_eq!(h.dlq_queue.len(), 1);
    h.finish_dead_letter(false);
    h.run();
    // Handed out again (count 2), and not acknowledged.
    assert_eq!(h.delivered.last().map(|d| d.pieces.clone()), Some(vec![Piece { range: 1..4, count: 2 }]));
    assert_eq!(h.ledger.floor(), 1);
    assert!(h.settled.is_empty());
}

#[test]
fn first_deliveries_of_exhausted_records_go_to_the_dead_letters_first() {
    // An earlier session handed 0..4 out once and 0..2 twice, and ended.
    let mut h = Harness::new(Config { max_deliveries: 2, ..cfg() }, 8);
    h.ledger.deliver(0..4, NO_DEADLINE);
    h.ledger.deliver(0..2, NO_DEADLINE);
    h.ledger.end_session();
    h.run();
    assert_eq!(h.dlq_queue.front(), Some(&vec![(0..2, 2)]));
    // The rest of the read waits for the dead letters, so the client learns they are settled
    // before it gets what follows them (as when they were written in line).
    assert!(h.delivered.is_empty());
    h.ack(ClientAck::Acked(0, vec![]));
    assert_eq!(h.run(), None);
    assert!(h.delivered.is_empty());
    h.finish_dead_letter(true);
    h.run();
    assert_eq!(h.settled, vec![(0..2, Settle::DeadLettered)]);
    let first = &h.delivered[0];
    assert!(!first.whole);
    assert_eq!(first.pieces, vec![Piece { range: 2..4, count: 2 }, Piece { range: 4..8, count: 1 }]);
}

#[test]
fn a_slow_dead_letter_topic_holds_its_subscription_back() {
    let mut h =
        Harness::new(Config { ack_wait_ms: 10, max_deliveries: 1, max_deliver_bytes: 1, ..cfg() }, 400);
    h.run();
    let first = h.delivered.len();
    h.now = 10;
    h.run();
    assert_eq!(h.dlq_queue.len(), 1, "one write outstanding at most");
    assert_eq!(h.delivered.len(), first, "nothing read or sent while it is");
    h.now = 1000;
    h.run();
    assert_eq!((h.dlq_queue.len(), h.delivered.len()), (1, first));
    h.finish_dead_letter(true);
    h.run();
    assert_eq!(h.dlq_queue.len(), 1, "the next batch's records are due too");
}

#[test]
fn falling_behind_retention_settles_the_deleted_offsets() {
    let mut h =
        Harness::new(Config { window_messages: 4, max_deliver_bytes: BATCH * RECORD_BYTES, ..cfg() }, 40);
    h.run();
    assert_eq!(h.engine.position(), 4);
    h.ends.log_start = 20;
    h.run();
    assert_eq!(h.settled, vec![(0..20, Settle::FellBehind)]);
    assert_eq!(h.ledger.floor(), 20);
    assert_eq!(h.engine.in_flight_bytes(), 4 * RECORD_BYTES, "the window was freed, then refilled");
    assert_eq!(h.handed_out().last(), Some(&(23, 1)));
}

#[test]
fn due_records_that_retention_deleted_are_settled_not_sent() {
    let mut h = Harness::new(Config { ack_wait_ms: 5, ..cfg() }, 8);
    h.run();
    h.ends.log_start = 4;
    h.now = 5;
    h.run();
    assert!(h.settled.contains(&(0..4, Settle::Deleted)) || h.settled.contains(&(0..4, Settle::FellBehind)));
    assert_eq!(h.delivered.last().map(|d| d.pieces.clone()), Some(vec![Piece { range: 4..8, count: 2 }]));
}

#[test]
fn a_fenced_subscription_takes_nothing_from_the_group() {
    // Two sessions share a group's ledger; the newer one took the partition over.
    let mut h = Harness::new(Config { ack_wait_ms: 5, ..cfg() }, 8);
    h.run();
    h.owner = false;
    h.now = 5;
    h.run();
    assert_eq!(h.delivered.len(), 1, "nothing handed out again after the ownership check failed");
    assert_eq!(h.ledger.next_due(), Some(5), "what is due stays for the owner");
    h.ends.log_start = 4;
    h.run();
    assert_eq!(h.ledger.floor(), 0, "no retention commit either");
}

#[test]
fn acknowledged_ranges_out_of_order_move_the_floor_once_contiguous() {
    let mut h = Harness::new(cfg(), 12);
    h.run();
    h.ack(ClientAck::Acked(0, vec![8..12]));
    h.ack(ClientAck::Acked(0, vec![4..8]));
    assert_eq!(h.ledger.floor(), 0);
    assert_eq!(h.engine.in_flight_bytes(), 12 * RECORD_BYTES);
    h.ack(ClientAck::Acked(4, vec![]));
    assert_eq!(h.ledger.floor(), 12);
    assert_eq!(h.engine.in_flight_bytes(), 0);
    // Acks beyond what was handed out are ignored.
    h.ack(ClientAck::Acked(20, vec![30..40]));
    assert_eq!(h.ledger.floor(), 12);
}

/// A random step of the world around the engine.
#[derive(Debug, Clone)]
enum Step {
    Append(u64),
    /// Ack the n-th delivered piece (modulo), or a random range.
    AckPiece(usize),
    AckBelow(u64),
    Nack(u64, u32),
    Tick(u64),
    Retention(u64),
    DeadLetterDone(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u64..4).prop_map(|n| Step::Append(n * BATCH)),
        any::<usize>().prop_map(Step::AckPiece),
        (0u64..80).prop_map(Step::AckBelow),
        (0u64..80, 0u32..30).prop_map(|(o, d)| Step::Nack(o, d)),
        (1u64..40).prop_map(Step::Tick),
        (0u64..6).prop_map(|n| Step::Retention(n * BATCH)),
        any::<bool>().prop_map(Step::DeadLetterDone),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn invariants_hold_over_random_event_sequences(
        steps in proptest::collection::vec(step(), 1..80),
        window_messages in 1u64..12,
        max_deliveries in 0u32..4,
        max_bytes in 1u64..100,
    ) {
        let config = Config {
            window_messages,
            window_bytes: 1 << 20,
            max_deliver_bytes: max_bytes,
            ack_wait_ms: 10,
            max_deliveries,
            ..cfg()
        };
        let mut h = Harness::new(config, 0);
        let check = |h: &Harness| -> Result<(), TestCaseError> {
            let w = h.engine.window();
            prop_assert!(w.acked() <= w.delivered(), "window floor past the delivered end");
            let delivered_end = h.delivered.iter().flat_map(|d| d.pieces.last()).map(|p| p.range.end).max().unwrap_or(0);
            prop_assert!(h.ledger.floor() <= delivered_end.max(h.ends.log_start), "ack floor past the delivered end");
            // In flight never exceeds the window, but for the one delivery always allowed.
            let last = h.delivered.iter().rev().find(|d| !d.redelivery).map(|d| d.messages).unwrap_or(0);
            prop_assert!(h.in_flight_messages() < window_messages + last);
            // Nothing is settled as dead-lettered that is not in the dead-letter topic.
            for (r, why) in &h.settled {
                if *why == Settle::DeadLettered {
                    for o in r.clone() {
                        prop_assert!(h.dlq.iter().any(|(d, _)| *d == o), "{o} settled as dead but not written");
                    }
                }
            }
            // Dead letters only of records handed out max_deliveries times.
            for (o, c) in &h.dlq {
                prop_assert!(max_deliveries > 0 && *c >= max_deliveries, "{o} dead-lettered at count {c}");
            }
            Ok(())
        };
        for s in steps {
            match s {
                Step::Append(n) => h.ends.high += n,
                Step::AckPiece(i) => {
                    let pieces: Vec<&Piece> = h.delivered.iter().flat_map(|d| d.pieces.iter()).collect();
                    if !pieces.is_empty() {
                        let r = pieces[i % pieces.len()].range.clone();
                        h.ack(ClientAck::Acked(0, vec![r]));
                    }
                }
                Step::AckBelow(o) => h.ack(ClientAck::Acked(o, vec![])),
                Step::Nack(o, d) => h.ack(ClientAck::Nack(o, d)),
                Step::Tick(ms) => h.now += ms,
                Step::Retention(n) => h.ends.log_start = (h.ends.log_start + n).min(h.ends.high),
                Step::DeadLetterDone(ok) => {
                    if !h.dlq_queue.is_empty() {
                        h.finish_dead_letter(ok);
                    }
                }
            }
            h.run();
            check(&h)?;
        }
        // Then a client that acknowledges everything it gets and a dead-letter topic that
        // writes: every offset ever delivered ends acknowledged, dead-lettered or deleted by
        // retention; nothing is silently dropped.
        // (Only what it gets from here on: what it got before comes back, or is dead-lettered.)
        let mut seen = h.delivered.len();
        for _ in 0..1000 {
            while !h.dlq_queue.is_empty() {
                h.finish_dead_letter(true);
            }
            let ranges: Vec<Range<u64>> =
                h.delivered[seen..].iter().flat_map(|d| d.pieces.iter().map(|p| p.range.clone())).collect();
            seen = h.delivered.len();
            for r in ranges {
                h.ack(ClientAck::Acked(0, vec![r]));
            }
            h.now += 10;
            h.run();
            check(&h)?;
            if h.ledger.floor() >= h.ends.high && h.dlq_queue.is_empty() {
                break;
            }
        }
        prop_assert_eq!(h.ledger.floor(), h.ends.high, "records left neither acknowledged nor dead-lettered");
        for o in 0..h.ends.high {
            let acked_by_client = h.delivered.iter().any(|d| d.pieces.iter().any(|p| p.range.contains(&o)));
            let dead = h.dlq.iter().any(|(d, _)| *d == o);
            let deleted = h.settled.iter().any(|(r, why)| *why != Settle::DeadLettered && r.contains(&o));
            prop_assert!(acked_by_client || dead || deleted, "offset {o} settled without delivery, dead letter or retention");
        }
    }
}
