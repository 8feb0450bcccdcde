//! One partition's producer logic as a plain state machine, without I/O or clocks: batching,
//! the in-flight window, idempotent sequence numbers, retries after retriable errors or a lost
//! stream, producer-id restarts, and failing records on fatal errors. The sender task in
//! `producer/mod.rs` drives it over a real QUIC stream; the tests below drive it with scripts
//! and a manual clock, as quinn-proto is tested.
//!
//! The driver feeds events (a record enqueued, a write done or failed, the broker's answer to
//! the oldest batch in flight, a producer id granted or refused), and calls [`Engine::poll`]
//! with the current time until it returns `None`, carrying out each [`Action`] in order. It
//! then waits for whichever comes first: a wake-up from `enqueue`/`flush`/`close`, the time
//! [`Engine::next_timer`] names, or the answer to the oldest batch while
//! [`Engine::awaiting_answer`] says one is due.
//!
//! The payload `P` (records under construction, and whatever completes them) and the wire
//! frame `F` are the driver's: the engine only counts records and bytes, seals a payload into
//! a frame once (with its producer identity) and hands frames and payloads back.

use std::collections::VecDeque;
use std::time::Duration;

use quiver_protocol::batch::{ProducerIdentity, BATCH_HEADER_BYTES};
use quiver_protocol::limits::MAX_BATCH_BYTES;
use tokio::time::Instant;

use crate::error::ClientError;

/// The pauses after failures: the same as for other requests' retries.
pub(crate) use crate::retry::{MAX_BACKOFF, MIN_BACKOFF};

/// The settings the engine needs (from `ProducerConfig`).
#[derive(Debug, Clone)]
pub(crate) struct EngineConfig {
    pub linger: Duration,
    /// A batch closes once it reaches this size (1..=MAX_BATCH_BYTES).
    pub max_batch_bytes: usize,
    /// Batches sent and not yet answered, at least 1.
    pub max_in_flight: usize,
    pub delivery_timeout: Duration,
    /// The broker answers each batch (`acks = leader` or `all`); without it a batch is done
    /// once written.
    pub acks: bool,
    /// The producer id batches carry, or -1 (not idempotent).
    pub producer_id: i64,
}

impl EngineConfig {
    pub(crate) fn new(config: &super::ProducerConfig, producer_id: i64) -> Self {
        EngineConfig {
            linger: config.linger,
            max_batch_bytes: config.max_batch_bytes.clamp(1, MAX_BATCH_BYTES),
            max_in_flight: config.max_in_flight.max(1),
            delivery_timeout: config.delivery_timeout,
            acks: config.acks != quiver_protocol::message::Acks::None,
            producer_id,
        }
    }
}

/// The broker's answer to the oldest batch in flight.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// Written at this base offset.
    Written(u64),
    /// Refused for good: the batch fails with this error.
    Fatal(ClientError),
    /// A retriable error, the stream ended or no answer came in time (why): everything in
    /// flight goes again after a pause.
    Retry(String),
}

/// A finished batch: complete its records (`result` holds the base offset).
#[derive(Debug)]
pub(crate) struct Done<P> {
    pub payload: P,
    /// Buffer bytes the batch held.
    pub permits: u32,
    pub result: Result<Option<u64>, ClientError>,
}

/// What the driver does next.
#[derive(Debug)]
pub(crate) enum Action<P, F> {
    /// Write `frame` on the partition's stream, opening one if there is none; with `fresh`,
    /// drop the current stream first (its answers are void). Report the outcome with
    /// [`Engine::write_ok`] or [`Engine::write_failed`].
    Send { frame: F, fresh: bool },
    /// A batch is finished.
    Complete(Done<P>),
    /// Ask the broker for a new producer id; report with [`Engine::producer_id_granted`] or
    /// [`Engine::producer_id_refused`].
    RequestProducerId,
}

#[derive(Debug)]
struct Batch<P> {
    payload: P,
    count: u32,
    permits: u32,
    /// Bytes the finished batch takes so far (as the payload reports).
    bytes: usize,
    linger_until: Instant,
    /// When the batch fails if not acknowledged: `delivery_timeout` after its first record was
    /// queued (as Kafka counts it), not after it was first sent.
    deadline: Instant,
}

#[derive(Debug)]
struct Flight<P, F> {
    batch: Batch<P>,
    frame: F,
}

/// One partition's sender state.
#[derive(Debug)]
pub(crate) struct Engine<P, F> {
    cfg: EngineConfig,
    open: Option<Batch<P>>,
    /// Closed batches waiting for an in-flight slot, oldest first.
    ready: VecDeque<Batch<P>>,
    /// Sealed batches not yet answered (or, without acks, not yet written), oldest first.
    in_flight: VecDeque<Flight<P, F>>,
    /// `in_flight[..written]` were written on the current stream.
    written: usize,
    /// The driver holds a stream whose answers count; if not, the next write opens a fresh one.
    stream: bool,
    /// The stream was lost with batches in flight: all of them go again, in order, from then.
    resend_at: Option<Instant>,
    /// The writes under way are a resend: a failure backs off instead of retrying at once.
    resending: bool,
    /// Nothing is sent until then (a pause after a failure).
    paused_until: Option<Instant>,
    backoff: Duration,
    /// Why the last attempt failed, reported if a batch's delivery timeout then expires.
    last_error: Option<String>,
    /// An idempotent batch failed: sequences restart under a new producer id.
    broken: bool,
    /// A `RequestProducerId` is being carried out.
    requesting: bool,
    /// Sequence number of the next record, assigned when a batch is first sent, so sequences
    /// are dense in send order.
    next_sequence: i32,
    /// New records are refused; the open batch closes at once.
    closing: bool,
    /// Batches closed so far (they complete in this order).
    closed_count: u64,
    done: VecDeque<Done<P>>,
}

/// `now + d`, where a huge `d` (`Duration::MAX` for "no limit") means about a century rather
/// than an overflow panic.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl<P, F: Clone> Engine<P, F> {
    pub(crate) fn new(cfg: EngineConfig) -> Self {
        Engine {
            cfg,
            open: None,
            ready: VecDeque::new(),
            in_flight: VecDeque::new(),
            written: 0,
            stream: false,
            resend_at: None,
            resending: false,
            paused_until: None,
            backoff: MIN_BACKOFF,
            last_error: None,
            broken: false,
            requesting: false,
            next_sequence: 0,
            closing: false,
            closed_count: 0,
            done: VecDeque::new(),
        }
    }

    /// Adds a record of at most `size` bytes: `new` makes an empty payload when a batch opens,
    /// `push(payload, index)` adds the record and returns what the caller wants back with the
    /// batch's size in bytes after it. Returns that and whether the driver must be woken (a
    /// batch opened, so a linger timer starts, or closed).
    pub(crate) fn enqueue<R>(
        &mut self,
        now: Instant,
        size: usize,
        new: impl FnOnce() -> P,
        push: impl FnOnce(&mut P, u32) -> (R, usize),
    ) -> Result<(R, bool), ClientError> {
        if self.closing {
            return Err(ClientError::Closed);
        }
        let max_batch = self.cfg.max_batch_bytes;
        let mut wake = false;
        if self.open.as_ref().is_some_and(|o| o.bytes + size > max_batch) {
            wake |= self.close_open();
        }
        let open = self.open.get_or_insert_with(|| {
            wake = true; // the driver starts this batch's linger timer
            Batch {
                payload: new(),
                count: 0,
                permits: 0,
                bytes: BATCH_HEADER_BYTES,
                linger_until: after(now, self.cfg.linger),
                deadline: after(now, self.cfg.delivery_timeout),
            }
        });
        let (r, bytes) = push(&mut open.payload, open.count);
        open.count += 1;
        open.permits = open.permits.saturating_add(size as u32);
        open.bytes = bytes;
        if open.bytes >= max_batch || self.cfg.linger.is_zero() {
            wake |= self.close_open();
        }
        Ok((r, wake))
    }

    /// Closes the open batch so it goes now; returns how many batches were closed so far: once
    /// that many have completed, everything enqueued before the flush is done.
    pub(crate) fn flush(&mut self) -> u64 {
        self.close_open();
        self.closed_count
    }

    /// Refuses new records; what is queued is still sent.
    pub(crate) fn close(&mut self) {
        self.closing = true;
    }

    /// Nothing can be sent any more (the client closed): fails everything in flight and
    /// queued, and refuses new records.
    pub(crate) fn shutdown(&mut self, err: ClientError) {
        self.closing = true;
        self.fail_pending(&err);
    }

    /// Closing, and every batch completed and handed out.
    pub(crate) fn is_done(&self) -> bool {
        self.closing
            && self.open.is_none()
            && self.ready.is_empty()
            && self.in_flight.is_empty()
            && self.done.is_empty()
    }

    /// Some(deadline of the oldest batch) while its answer is due on the current stream.
    pub(crate) fn awaiting_answer(&self) -> Option<Instant> {
        if !self.cfg.acks || !self.stream || self.written == 0 || self.broken || self.paused_until.is_some() {
            return None;
        }
        self.in_flight.front().map(|f| f.batch.deadline)
    }

    /// When the driver must poll again if nothing else happens.
    pub(crate) fn next_timer(&self) -> Option<Instant> {
        // Batches never sent fail at their delivery timeout also while a pause or the wait for
        // a new producer id holds them back (nothing else wakes the driver then).
        let queued = match self.in_flight.is_empty() {
            true => self.ready.front().into_iter().chain(self.open.as_ref()).map(|b| b.deadline).min(),
            false => None,
        };
        if let Some(t) = self.paused_until {
            return Some(queued.map_or(t, |q| q.min(t)));
        }
        if self.broken {
            return queued;
        }
        let linger = self
            .open
            .as_ref()
            .filter(|_| self.in_flight.len() < self.cfg.max_in_flight)
            .map(|o| o.linger_until);
        match (linger, self.resend_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next thing to do at `now`; `seal` turns a batch's payload into its frame, once, when
    /// it is first sent.
    pub(crate) fn poll(
        &mut self,
        now: Instant,
        seal: &mut impl FnMut(&mut P, ProducerIdentity) -> F,
    ) -> Option<Action<P, F>> {
        self.expire_queued(now);
        if let Some(d) = self.done.pop_front() {
            return Some(Action::Complete(d));
        }
        if self.paused_until.is_some_and(|t| t > now) {
            return None;
        }
        self.paused_until = None;
        if self.broken {
            return self.restart_sequence();
        }
        // The open batch goes when its linger ends (or the producer closes).
        if self.open.as_ref().is_some_and(|o| o.linger_until <= now) || self.closing {
            self.close_open();
        }
        self.resend_if_due(now);
        if self.broken {
            // An idempotent batch expired in the resend: the ones after it carry void sequence
            // numbers, and fail (outcome unknown) before anything is sent again.
            return self.restart_sequence();
        }
        while self.in_flight.len() < self.cfg.max_in_flight {
            let Some(mut batch) = self.ready.pop_front() else { break };
            let identity = if self.cfg.producer_id >= 0 {
                let base_sequence = self.next_sequence;
                // Sequences wrap at 2^31, as in Kafka; they are never negative.
                self.next_sequence = self.next_sequence.wrapping_add(batch.count as i32) & i32::MAX;
                ProducerIdentity { producer_id: self.cfg.producer_id, producer_epoch: 0, base_sequence }
            } else {
                ProducerIdentity::default()
            };
            let frame = seal(&mut batch.payload, identity);
            if self.resend_at.is_some() {
                // Older batches wait for a resend: the new one goes after them, all now.
                self.resend_at = Some(now);
            }
            self.in_flight.push_back(Flight { batch, frame });
        }
        self.resend_if_due(now);
        if self.broken {
            return self.restart_sequence();
        }
        if self.resend_at.is_none() && self.written < self.in_flight.len() {
            let frame = self.in_flight[self.written].frame.clone();
            self.written += 1;
            let fresh = !self.stream;
            self.stream = true;
            return Some(Action::Send { frame, fresh });
        }
        self.done.pop_front().map(Action::Complete)
    }

    /// The last `Send` was written.
    pub(crate) fn write_ok(&mut self) {
        if !self.cfg.acks {
            // No answer will come: the write is all there is.
            if self.written > 0 {
                if let Some(f) = self.in_flight.pop_front() {
                    self.written -= 1;
                    self.finish(f.batch, Ok(None));
                }
            }
        }
        if self.written == self.in_flight.len() {
            self.resending = false;
        }
    }

    /// The last `Send` failed: every batch in flight goes again on a fresh stream, at once
    /// after a first failure, after a backoff when a resend failed.
    pub(crate) fn write_failed(&mut self, now: Instant, why: String) {
        tracing::debug!("produce write failed: {why}");
        self.last_error = Some(why);
        self.stream = false;
        self.written = 0;
        if self.resending {
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            self.resending = false;
            if !self.cfg.acks {
                while let Some(f) = self.in_flight.pop_front() {
                    self.finish(f.batch, Ok(None));
                }
                return;
            }
            self.resend_at = Some(after(now, self.backoff));
        } else {
            self.resend_at = Some(now);
        }
    }

    /// The partition's leader moved (the driver gives up its stream for one to the new
    /// leader): every batch written and not answered goes again at once, in order and with its
    /// sequence numbers, on a fresh stream; the new leader answers one it already has with its
    /// offsets. No pause: nothing failed.
    pub(crate) fn reroute(&mut self, now: Instant) {
        self.stream = false;
        if self.written > 0 {
            self.written = 0;
            self.resend_at = Some(now);
        }
    }

    /// Batches carry a producer id and sequence numbers, so a resend is written once.
    pub(crate) fn is_idempotent(&self) -> bool {
        self.cfg.producer_id >= 0
    }

    /// The broker's answer to the oldest batch in flight.
    pub(crate) fn answer(&mut self, now: Instant, answer: Answer) {
        if self.written == 0 {
            return; // nothing was written on this stream
        }
        match answer {
            Answer::Written(base) => {
                self.backoff = MIN_BACKOFF;
                self.last_error = None;
                if let Some(f) = self.in_flight.pop_front() {
                    self.written -= 1;
                    self.finish(f.batch, Ok(Some(base)));
                }
            }
            Answer::Fatal(e) => {
                if let Some(f) = self.in_flight.pop_front() {
                    self.written -= 1;
                    self.finish(f.batch, Err(e));
                }
            }
            Answer::Retry(why) => {
                // After a pause, every batch in flight goes again, in order.
                self.last_error = Some(why);
                self.stream = false;
                self.written = 0;
                self.pause(now);
                self.resend_at = Some(now);
            }
        }
    }

    /// A new producer id: sequences start again from 0.
    pub(crate) fn producer_id_granted(&mut self, producer_id: i64) {
        self.requesting = false;
        self.cfg.producer_id = producer_id;
        self.next_sequence = 0;
        self.broken = false;
    }

    /// No new producer id. `fatal` (a limit on producer ids): what waits cannot be sent under a
    /// valid sequence, so it fails now instead of waiting for an id forever. Either way the
    /// engine asks again after a pause.
    pub(crate) fn producer_id_refused(&mut self, now: Instant, err: ClientError, fatal: bool) {
        self.requesting = false;
        if fatal {
            self.fail_pending(&err);
        }
        self.pause(now);
    }

    fn restart_sequence(&mut self) -> Option<Action<P, F>> {
        if !self.in_flight.is_empty() {
            // Their sequence numbers follow the failed batch's: the broker would refuse them as
            // a gap, as Kafka does. They were sent at least once, so they may have been written:
            // the error says the outcome is unknown (a caller that retries may store them twice).
            let reason = ClientError::OutcomeUnknown(
                "an earlier batch to this partition failed while this one was in flight; it may or may \
                 not have been written, and it is not retried (its sequence number is void)"
                    .to_string(),
            );
            while let Some(f) = self.in_flight.pop_front() {
                self.push_done(f.batch, Err(reason.clone()));
            }
            // Answers still due on the stream belong to the void batches.
            self.written = 0;
            self.stream = false;
            self.resend_at = None;
            self.resending = false;
        }
        if let Some(d) = self.done.pop_front() {
            return Some(Action::Complete(d));
        }
        if self.requesting {
            return None;
        }
        self.requesting = true;
        Some(Action::RequestProducerId)
    }

    /// When a resend is due: the stream starts over, batches past their delivery timeout
    /// fail, and every other batch in flight is written again, in order.
    fn resend_if_due(&mut self, now: Instant) {
        if self.resend_at.is_some_and(|t| t <= now) {
            self.resend_at = None;
            self.resending = true;
            self.stream = false;
            self.written = 0;
            self.expire(now);
        }
    }

    fn pause(&mut self, now: Instant) {
        self.paused_until = Some(after(now, self.backoff));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Fails batches never sent whose delivery timeout passed: they wait for an in-flight
    /// slot, the end of a pause or a new producer id that does not come, and the timeout covers
    /// the whole time a record waits (Kafka's `delivery.timeout.ms` does too). Never sent, they
    /// hold no sequence number, so the sequence stays whole.
    fn expire_queued(&mut self, now: Instant) {
        if !self.in_flight.is_empty() {
            // Batches complete in the order they closed: the ones in flight go first (they
            // expire at their resend).
            return;
        }
        let after_ms = self.cfg.delivery_timeout.as_millis() as u64;
        let timed_out = |last: &Option<String>| ClientError::DeliveryTimeout { after_ms, last: last.clone() };
        while self.ready.front().is_some_and(|b| b.deadline <= now) {
            if let Some(b) = self.ready.pop_front() {
                let err = timed_out(&self.last_error);
                self.push_done(b, Err(err));
            }
        }
        if self.ready.is_empty() && self.open.as_ref().is_some_and(|b| b.deadline <= now) {
            if let Some(b) = self.open.take() {
                self.closed_count += 1; // as if closed: flushes count completions against it
                let err = timed_out(&self.last_error);
                self.push_done(b, Err(err));
            }
        }
    }

    /// Fails the oldest batches whose delivery timeout passed.
    fn expire(&mut self, now: Instant) {
        while self.in_flight.front().is_some_and(|f| f.batch.deadline <= now) {
            if let Some(f) = self.in_flight.pop_front() {
                let after_ms = self.cfg.delivery_timeout.as_millis() as u64;
                let err = ClientError::DeliveryTimeout { after_ms, last: self.last_error.clone() };
                self.finish(f.batch, Err(err));
            }
        }
    }

    fn close_open(&mut self) -> bool {
        match self.open.take() {
            Some(b) => {
                self.ready.push_back(b);
                self.closed_count += 1;
                true
            }
            None => false,
        }
    }

    /// Completes a sent batch; a failed idempotent one breaks the sequence.
    fn finish(&mut self, batch: Batch<P>, result: Result<Option<u64>, ClientError>) {
        if result.is_err() && self.cfg.producer_id >= 0 {
            self.broken = true;
        }
        self.push_done(batch, result);
    }

    fn push_done(&mut self, batch: Batch<P>, result: Result<Option<u64>, ClientError>) {
        self.done.push_back(Done { payload: batch.payload, permits: batch.permits, result });
    }

    /// Fails every batch in flight or queued, oldest first, without touching the sequence state.
    fn fail_pending(&mut self, err: &ClientError) {
        while let Some(f) = self.in_flight.pop_front() {
            self.push_done(f.batch, Err(err.clone()));
            // Answers still due on the stream belong to failed batches.
            self.stream = false;
        }
        self.written = 0;
        self.resend_at = None;
        self.resending = false;
        self.close_open();
        while let Some(b) = self.ready.pop_front() {
            self.push_done(b, Err(err.clone()));
        }
    }
}

#[cfg(test)]
mod tests;
