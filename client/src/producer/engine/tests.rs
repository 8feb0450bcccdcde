//! The producer engine driven by scripts and a manual clock, with a model broker that writes
//! batches, answers in order and deduplicates idempotent retries.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;

use super::*;

/// A batch's records while open: their ids and the bytes the batch takes.
#[derive(Debug, Default)]
struct Recs {
    ids: Vec<u64>,
    bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
struct Frame {
    ids: Vec<u64>,
    identity: ProducerIdentity,
}

type Outcome = Result<Option<u64>, ClientError>;

struct Sim {
    e: Engine<Recs, Frame>,
    now: Instant,
    next_record: u64,
    /// Every outcome each record got.
    outcomes: HashMap<u64, Vec<Outcome>>,
    /// Completions in the order they came out.
    completed: Vec<Vec<u64>>,
    /// Every frame sealed, in order.
    sealed: Vec<Frame>,
    /// Every write: the frame and whether it opened a fresh stream.
    writes: Vec<(Frame, bool)>,
    /// Frames written on the current stream and not yet answered.
    stream: VecDeque<Frame>,
    /// The next this many writes fail.
    fail_writes: usize,
    pid_requests: usize,
    pid_pending: bool,
    next_pid: i64,
    /// The model broker: next offset, and where each (producer id, base sequence) was written.
    log_end: u64,
    by_sequence: HashMap<(i64, i32), u64>,
}

fn cfg(linger_ms: u64, max_batch: usize, max_in_flight: usize, producer_id: i64) -> EngineConfig {
    EngineConfig {
        linger: Duration::from_millis(linger_ms),
        max_batch_bytes: max_batch,
        max_in_flight,
        delivery_timeout: Duration::from_secs(60),
        acks: true,
        producer_id,
    }
}

impl Sim {
    fn new(cfg: EngineConfig) -> Self {
        Sim {
            next_pid: cfg.producer_id.max(0) + 100,
            e: Engine::new(cfg),
            now: Instant::now(),
            next_record: 0,
            outcomes: HashMap::new(),
            completed: Vec::new(),
            sealed: Vec::new(),
            writes: Vec::new(),
            stream: VecDeque::new(),
            fail_writes: 0,
            pid_requests: 0,
            pid_pending: false,
            log_end: 0,
            by_sequence: HashMap::new(),
        }
    }

    /// Enqueues a record of `size` bytes; returns its id, or the refusal.
    fn enqueue(&mut self, size: usize) -> Result<u64, ClientError> {
        let id = self.next_record;
        let r = self.e.enqueue(self.now, size, Recs::default, |p, index| {
            assert_eq!(index as usize, p.ids.len());
            p.ids.push(id);
            p.bytes = if p.bytes == 0 { BATCH_HEADER_BYTES + size } else { p.bytes + size };
            ((), p.bytes)
        });
        r.map(|_| {
            self.next_record += 1;
            id
        })
    }

    /// Carries out every action due now.
    fn run(&mut self) {
        let sealed = &mut self.sealed;
        let mut seal = |p: &mut Recs, identity: ProducerIdentity| {
            let f = Frame { ids: p.ids.clone(), identity };
            sealed.push(f.clone());
            f
        };
        while let Some(action) = self.e.poll(self.now, &mut seal) {
            match action {
                Action::Send { frame, fresh } => {
                    if fresh {
                        self.stream.clear();
                    }
                    self.writes.push((frame.clone(), fresh));
                    if self.fail_writes > 0 {
                        self.fail_writes -= 1;
                        self.stream.clear();
                        self.e.write_failed(self.now, "write failed".into());
                    } else {
                        self.stream.push_back(frame);
                        self.e.write_ok();
                    }
                }
                Action::Complete(done) => {
                    for (i, id) in done.payload.ids.iter().enumerate() {
                        let r = match &done.result {
                            Ok(base) => Ok(base.map(|b| b + i as u64)),
                            Err(e) => Err(e.clone()),
                        };
                        self.outcomes.entry(*id).or_default().push(r);
                    }
                    self.completed.push(done.payload.ids);
                }
                Action::RequestProducerId => {
                    assert!(!self.pid_pending, "a second producer id request while one is under way");
                    self.pid_requests += 1;
                    self.pid_pending = true;
                }
            }
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        self.run();
    }

    /// The broker writes the oldest frame on the stream (once per idempotent sequence).
    fn broker_write(&mut self, f: &Frame) -> u64 {
        let key = (f.identity.producer_id, f.identity.base_sequence);
        if f.identity.producer_id >= 0 {
            if let Some(base) = self.by_sequence.get(&key) {
                return *base;
            }
        }
        let base = self.log_end;
        self.log_end += f.ids.len() as u64;
        self.by_sequence.insert(key, base);
        base
    }

    /// The oldest frame in flight, if its answer is due.
    fn due(&mut self) -> Option<Frame> {
        self.e.awaiting_answer()?;
        let f = self.stream.pop_front();
        assert!(f.is_some(), "the engine awaits an answer for nothing written");
        f
    }

    /// The broker writes and acknowledges the oldest frame.
    fn ack(&mut self) -> bool {
        let Some(f) = self.due() else { return false };
        let base = self.broker_write(&f);
        let before = self.completed.len();
        self.e.answer(self.now, Answer::Written(base));
        self.run();
        assert_eq!(self.completed.get(before), Some(&f.ids), "an answer completed another batch");
        true
    }

    /// The broker writes the oldest frame but the answer is lost with the connection.
    fn lose_answer(&mut self) {
        if let Some(f) = self.due() {
            self.broker_write(&f);
            self.stream.clear();
            self.e.answer(self.now, Answer::Retry("connection lost".into()));
            self.run();
        }
    }

    /// The partition's leader moved and the driver gives up its stream: the old stream's
    /// frames may all have reached the log (forwarded by the old leader), their answers are lost.
    fn reroute(&mut self) {
        let frames: Vec<Frame> = self.stream.drain(..).collect();
        if self.e.awaiting_answer().is_some() {
            for f in &frames {
                self.broker_write(f);
            }
        }
        self.e.reroute(self.now);
        self.run();
    }

    /// A retriable error for the oldest frame (not written).
    fn retry(&mut self) {
        if self.due().is_some() {
            self.stream.clear();
            self.e.answer(self.now, Answer::Retry("not leader".into()));
            self.run();
        }
    }

    /// A fatal error for the oldest frame (not written).
    fn fatal(&mut self) {
        if self.due().is_some() {
            self.e.answer(self.now, Answer::Fatal(ClientError::Protocol("refused".into())));
            self.run();
        }
    }

    fn grant(&mut self) {
        if std::mem::take(&mut self.pid_pending) {
            self.next_pid += 1;
            self.e.producer_id_granted(self.next_pid);
            self.run();
        }
    }

    fn refuse(&mut self, fatal: bool) {
        if std::mem::take(&mut self.pid_pending) {
            self.e.producer_id_refused(self.now, ClientError::Protocol("no ids left".into()), fatal);
            self.run();
        }
    }

    fn outcome(&self, id: u64) -> &Outcome {
        let o = &self.outcomes[&id];
        assert_eq!(o.len(), 1, "record {id}: {o:?}");
        &o[0]
    }

    fn writes_since(&self, from: usize) -> Vec<(Vec<u64>, i32, bool)> {
        self.writes[from..]
            .iter()
            .map(|(f, fresh)| (f.ids.clone(), f.identity.base_sequence, *fresh))
            .collect()
    }
}

#[test]
fn batches_close_by_size_and_by_linger() {
    let mut s = Sim::new(cfg(10, BATCH_HEADER_BYTES + 100, 8, -1));
    s.enqueue(50).unwrap();
    s.enqueue(50).unwrap(); // header + 100: full, closes at once
    s.enqueue(50).unwrap(); // opens the next batch
    s.run();
    assert_eq!(s.writes_since(0), vec![(vec![0, 1], -1, true)]);
    assert_eq!(s.e.next_timer(), Some(s.now + Duration::from_millis(10)));
    s.advance(9);
    assert_eq!(s.writes.len(), 1, "the second batch lingers");
    s.enqueue(60).unwrap(); // would overflow: the open batch closes, a new one opens
    s.run();
    assert_eq!(s.writes_since(1), vec![(vec![2], -1, false)]);
    s.advance(10);
    assert_eq!(s.writes_since(2), vec![(vec![3], -1, false)]);
    while s.ack() {}
    for id in 0..4 {
        assert_eq!(s.outcome(id).as_ref().unwrap(), &Some(id));
    }
}

#[test]
fn the_in_flight_window_holds_back_batches() {
    let mut s = Sim::new(cfg(0, 1000, 2, -1));
    for _ in 0..4 {
        s.enqueue(10).unwrap();
    }
    s.run();
    assert_eq!(s.writes.len(), 2);
    assert_eq!(s.e.next_timer(), None, "nothing to wait for but answers");
    assert!(s.ack());
    assert_eq!(s.writes_since(2), vec![(vec![2], -1, false)]);
    while s.ack() {}
    assert_eq!(s.writes.len(), 4);
    assert!((0..4).all(|id| s.outcome(id).as_ref().unwrap() == &Some(id)));
}

#[test]
fn a_retry_keeps_sequence_numbers_and_order_after_a_pause() {
    let mut s = Sim::new(cfg(0, 1000, 8, 7));
    for _ in 0..3 {
        s.enqueue(10).unwrap();
    }
    s.run();
    assert_eq!(s.writes_since(0), vec![(vec![0], 0, true), (vec![1], 1, false), (vec![2], 2, false)]);
    s.retry();
    s.enqueue(10).unwrap();
    s.run();
    assert_eq!(s.writes.len(), 3, "nothing is sent during the pause");
    assert_eq!(s.e.next_timer(), Some(s.now + MIN_BACKOFF));
    s.advance(49);
    assert_eq!(s.writes.len(), 3);
    s.advance(1);
    assert_eq!(
        s.writes_since(3),
        vec![(vec![0], 0, true), (vec![1], 1, false), (vec![2], 2, false), (vec![3], 3, false)],
        "the same frames again, in order, on a fresh stream, then the new batch"
    );
    assert_eq!(s.sealed.len(), 4, "a batch is sealed (numbered) once");
    while s.ack() {}
    assert!((0..4).all(|id| s.outcome(id).as_ref().unwrap() == &Some(id)));
}

#[test]
fn a_duplicate_after_a_lost_answer_completes_once_with_the_original_offset() {
    let mut s = Sim::new(cfg(0, 1000, 8, 7));
    for _ in 0..2 {
        s.enqueue(10).unwrap();
    }
    s.run();
    s.lose_answer(); // record 0 is written at offset 0, its answer lost
    s.advance(50);
    assert_eq!(s.writes_since(2), vec![(vec![0], 0, true), (vec![1], 1, false)]);
    while s.ack() {}
    assert_eq!(s.outcome(0).as_ref().unwrap(), &Some(0), "the broker's answer to the duplicate");
    assert_eq!(s.outcome(1).as_ref().unwrap(), &Some(1));
    assert_eq!(s.log_end, 2, "written once");
}

#[test]
fn a_lost_stream_resends_unanswered_batches_in_order() {
    let mut s = Sim::new(cfg(0, 1000, 8, 7));
    s.enqueue(10).unwrap();
    s.enqueue(10).unwrap();
    s.run();
    // The third batch's first write fails: everything unanswered goes again at once.
    s.fail_writes = 1;
    s.enqueue(10).unwrap();
    s.run();
    assert_eq!(
        s.writes_since(2),
        vec![(vec![2], 2, false), (vec![0], 0, true), (vec![1], 1, false), (vec![2], 2, false)]
    );
    // Now the resend fails too: the next try waits a doubled backoff.
    s.stream.clear();
    s.fail_writes = 1;
    s.e.write_failed(s.now, "reset".into());
    s.run();
    let n = s.writes.len();
    assert_eq!(s.writes_since(n - 1), vec![(vec![0], 0, true)], "resent at once after a first failure");
    s.advance(99);
    assert_eq!(s.writes.len(), n, "a failed resend backs off");
    s.advance(1);
    assert_eq!(s.writes_since(n), vec![(vec![0], 0, true), (vec![1], 1, false), (vec![2], 2, false)]);
    while s.ack() {}
    assert!((0..3).all(|id| s.outcome(id).as_ref().unwrap() == &Some(id)));
}

#[test]
fn a_moved_leader_gets_the_batches_in_flight_at_once_in_order_with_their_sequences() {
    let mut s = Sim::new(cfg(0, 1000, 8, 7));
    for _ in 0..3 {
        s.enqueue(10).unwrap();
    }
    s.run();
    assert!(s.ack(), "record 0 answered on the old leader's stream");
    // Records 1 and 2 reached the log through the old leader; their answers are lost.
    s.reroute();
    assert_eq!(
        s.writes_since(3),
        vec![(vec![1], 1, true), (vec![2], 2, false)],
        "no pause, a fresh stream, the same order and sequence numbers"
    );
    s.enqueue(10).unwrap();
    s.run();
    while s.ack() {}
    assert!((0..4).all(|id| s.outcome(id).as_ref().unwrap() == &Some(id)), "each once, in order");
    assert_eq!(s.log_end, 4, "the new leader wrote the resent batches once");

    // With nothing awaited, a move only opens the next stream fresh.
    let n = s.writes.len();
    s.reroute();
    assert_eq!(s.writes.len(), n, "nothing resent");
    s.enqueue(10).unwrap();
    s.run();
    assert_eq!(s.writes_since(n), vec![(vec![4], 4, true)]);
}

#[test]
fn a_refused_producer_id_fails_waiting_records_and_a_new_one_restarts_sequences() {
    let mut s = Sim::new(cfg(0, 1000, 8, 7));
    s.enqueue(10).unwrap();
    s.enqueue(10).unwrap();
    s.run();
    s.fatal(); // record 0 refused for good: the sequence is broken
    assert!(matches!(s.outcome(0), Err(ClientError::Protocol(_))));
    assert!(matches!(s.outcome(1), Err(ClientError::OutcomeUnknown(_))), "sent after the failed one");
    assert_eq!(s.pid_requests, 1);
    s.enqueue(10).unwrap(); // waits for a producer id
    s.run();
    assert_eq!(s.writes.len(), 2);
    s.refuse(true);
    assert!(matches!(s.outcome(2), Err(ClientError::Protocol(m)) if m == "no ids left"));
    s.enqueue(10).unwrap();
    s.advance(49); // asks again after a pause
    assert_eq!(s.pid_requests, 1);
    s.advance(1);
    assert_eq!(s.pid_requests, 2);
    s.grant();
    assert_eq!(s.writes_since(2), vec![(vec![3], 0, true)], "numbered from 0 under the new id");
    assert_eq!(s.writes[2].0.identity.producer_id, s.next_pid);
    assert!(s.ack());
    assert_eq!(s.outcome(3).as_ref().unwrap(), &Some(0));
}

#[test]
fn close_sends_the_lingering_batch_and_refuses_new_records() {
    let mut s = Sim::new(cfg(3_600_000, 1000, 8, -1));
    s.enqueue(10).unwrap();
    s.enqueue(10).unwrap();
    s.run();
    assert!(s.writes.is_empty());
    s.e.close();
    assert!(matches!(s.enqueue(10), Err(ClientError::Closed)));
    s.run();
    assert_eq!(s.writes_since(0), vec![(vec![0, 1], -1, true)]);
    assert!(!s.e.is_done());
    assert!(s.ack());
    assert!(s.e.is_done());
}

#[test]
fn flush_closes_the_open_batch() {
    let mut s = Sim::new(cfg(3_600_000, 1000, 8, -1));
    s.enqueue(10).unwrap();
    assert_eq!(s.e.flush(), 1, "one batch to wait for");
    s.run();
    assert_eq!(s.writes.len(), 1);
}

#[test]
fn a_batch_past_its_delivery_timeout_fails_at_the_resend() {
    let mut c = cfg(0, 1000, 8, 7);
    c.delivery_timeout = Duration::from_millis(30);
    let mut s = Sim::new(c);
    s.enqueue(10).unwrap();
    s.run();
    s.retry();
    s.advance(50);
    assert!(
        matches!(s.outcome(0), Err(ClientError::DeliveryTimeout { last: Some(m), .. }) if m == "not leader")
    );
    assert_eq!(s.pid_requests, 1, "a failed idempotent batch restarts the sequence");
}

#[test]
fn without_acks_a_batch_is_done_once_written() {
    let mut c = cfg(0, 1000, 1, -1);
    c.acks = false;
    let mut s = Sim::new(c);
    s.enqueue(10).unwrap();
    s.enqueue(10).unwrap();
    s.run();
    assert_eq!(s.writes.len(), 2);
    assert_eq!(s.outcome(0).as_ref().unwrap(), &None);
    assert_eq!(s.outcome(1).as_ref().unwrap(), &None);
    assert_eq!(s.e.awaiting_answer(), None);
}

#[test]
fn client_shutdown_fails_everything_once() {
    let mut s = Sim::new(cfg(3_600_000, 1000, 8, 7));
    s.enqueue(10).unwrap();
    s.e.flush();
    s.run();
    s.enqueue(10).unwrap();
    s.e.shutdown(ClientError::Closed);
    s.run();
    assert!(matches!(s.outcome(0), Err(ClientError::Closed)));
    assert!(matches!(s.outcome(1), Err(ClientError::Closed)));
    assert!(s.e.is_done());
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue(usize),
    Advance(u64),
    Ack,
    LoseAnswer,
    Reroute,
    Retry,
    Fatal,
    FailNextWrite,
    Flush,
    Close,
    Grant,
    Refuse(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..120).prop_map(Op::Enqueue),
        3 => (0u64..120).prop_map(Op::Advance),
        5 => Just(Op::Ack),
        1 => Just(Op::LoseAnswer),
        1 => Just(Op::Reroute),
        1 => Just(Op::Retry),
        1 => Just(Op::Fatal),
        1 => Just(Op::FailNextWrite),
        1 => Just(Op::Flush),
        1 => Just(Op::Close),
        1 => Just(Op::Grant),
        1 => any::<bool>().prop_map(Op::Refuse),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn every_record_completes_once_in_order_with_contiguous_sequences(
        linger in 0u64..20,
        max_batch in 100usize..400,
        max_in_flight in 1usize..4,
        timeout_ms in 50u64..2_000,
        acks in any::<bool>(),
        idempotent in any::<bool>(),
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let producer_id = if idempotent && acks { 1 } else { -1 };
        let mut c = cfg(linger, max_batch, max_in_flight, producer_id);
        c.delivery_timeout = Duration::from_millis(timeout_ms);
        c.acks = acks;
        let mut s = Sim::new(c);
        let mut closed = false;
        for op in ops {
            match op {
                Op::Enqueue(size) => {
                    let r = s.enqueue(size);
                    prop_assert_eq!(r.is_err(), closed);
                    s.run();
                }
                Op::Advance(ms) => s.advance(ms),
                Op::Ack => { s.ack(); }
                Op::LoseAnswer => s.lose_answer(),
                Op::Reroute => s.reroute(),
                Op::Retry => s.retry(),
                Op::Fatal => s.fatal(),
                Op::FailNextWrite => s.fail_writes += 1,
                Op::Flush => { s.e.flush(); s.run(); }
                Op::Close => { s.e.close(); closed = true; s.run(); }
                Op::Grant => s.grant(),
                Op::Refuse(fatal) => s.refuse(fatal),
            }
        }
        // Drain: a healthy broker from here on.
        s.fail_writes = 0;
        s.e.close();
        s.run();
        let mut steps = 0;
        while !s.e.is_done() {
            steps += 1;
            prop_assert!(steps < 10_000, "stuck");
            if s.ack() {
                continue;
            }
            if s.pid_pending {
                s.grant();
                continue;
            }
            let t = s.e.next_timer();
            prop_assert!(t.is_some(), "nothing to wait for, yet not done");
            if let Some(t) = t {
                s.now = s.now.max(t);
                s.run();
            }
        }
        // Every record completed or failed exactly once.
        for id in 0..s.next_record {
            let n = s.outcomes.get(&id).map_or(0, Vec::len);
            prop_assert_eq!(n, 1, "record {} has {} outcomes", id, n);
        }
        prop_assert_eq!(s.outcomes.len() as u64, s.next_record);
        // Completed offsets increase in enqueue order.
        let mut last = None;
        for id in 0..s.next_record {
            if let Ok(Some(offset)) = s.outcomes[&id][0] {
                prop_assert!(last.is_none_or(|l| offset > l), "record {} at {} after {:?}", id, offset, last);
                last = Some(offset);
            }
        }
        // Per producer id, sequences are contiguous from 0 in send order; each id is used in one run.
        let mut next: HashMap<i64, i32> = HashMap::new();
        let mut current = None;
        for f in &s.sealed {
            let pid = f.identity.producer_id;
            if pid < 0 {
                prop_assert_eq!(f.identity.base_sequence, -1);
                continue;
            }
            if current != Some(pid) {
                prop_assert!(!next.contains_key(&pid), "producer id {} reused", pid);
                current = Some(pid);
            }
            let expected = next.entry(pid).or_insert(0);
            prop_assert_eq!(f.identity.base_sequence, *expected);
            *expected += f.ids.len() as i32;
        }
    }
}

/// Records that never leave because no producer id comes (a broker that cannot issue one) fail
/// at their delivery timeout, as Kafka's `delivery.timeout.ms` covers time in the accumulator;
/// the sequence stays whole for what is sent once an id comes.
#[test]
fn records_waiting_for_a_producer_id_fail_at_their_delivery_timeout() {
    let mut c = cfg(0, 1000, 8, 7);
    c.delivery_timeout = Duration::from_millis(100);
    let mut s = Sim::new(c);
    s.enqueue(10).unwrap();
    s.run();
    s.fatal(); // the sequence is broken: a new producer id is asked for, and never comes
    assert_eq!(s.pid_requests, 1);
    s.advance(10);
    s.enqueue(10).unwrap();
    s.enqueue(10).unwrap();
    s.run();
    let deadline = s.e.next_timer().expect("a timer while records wait for an id");
    assert_eq!(deadline, s.now + Duration::from_millis(100), "their delivery timeout");
    s.advance(99);
    assert!(!s.outcomes.contains_key(&1), "not yet");
    s.advance(1);
    assert!(matches!(s.outcome(1), Err(ClientError::DeliveryTimeout { .. })), "{:?}", s.outcomes);
    assert!(matches!(s.outcome(2), Err(ClientError::DeliveryTimeout { .. })));
    assert_eq!(s.writes.len(), 1, "nothing was sent without an id");
    s.grant();
    s.enqueue(10).unwrap();
    s.run();
    let sent: Vec<_> = s.writes_since(1).into_iter().map(|(ids, seq, _)| (ids, seq)).collect();
    assert_eq!(sent, vec![(vec![3], 0)], "numbered from 0 under the new id");
}

/// A queued batch past its delivery timeout does not complete before an older one still in
/// flight: a flush counts completions against the batches closed before it, so an early one
/// would release it while the older batch is unresolved.
#[test]
fn a_queued_batch_never_expires_ahead_of_one_in_flight() {
    let mut c = cfg(0, 1000, 1, 7);
    c.delivery_timeout = Duration::from_millis(100);
    let mut s = Sim::new(c);
    s.enqueue(10).unwrap(); // batch 0: sent, in flight, no answer yet
    s.run();
    assert_eq!(s.writes.len(), 1);
    let target = s.e.flush(); // everything enqueued so far: batch 0
    assert_eq!(target, 1);
    s.advance(10);
    s.enqueue(10).unwrap(); // batch 1: waits for the in-flight slot
    s.run();
    s.advance(101); // both past their deadline; the broker has not answered batch 0
    assert!(
        (s.completed.len() as u64) < target || s.outcomes.contains_key(&0),
        "flush target {target} reached by {:?} while record 0 is still in flight",
        s.completed
    );
}
