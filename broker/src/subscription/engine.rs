//! The push/ack/redelivery logic of one subscription as a sans-IO state machine (design.md §8,
//! §12). It does no IO and reads no clock: the driver (`driver.rs`) feeds it what happened
//! (batches read, acknowledgements, the time, the log's ends, dead letters written) and does
//! what it asks (read at an offset, send a delivery, write dead letters, tell the client what is
//! settled, persist the ledger, check ownership). The group's `AckLedger` is shared with other
//! subscriptions and the offsets store, so it is passed in, locked, with every call.

use std::collections::VecDeque;
use std::ops::Range;

use quiver_protocol::delivery::DeliveryWindow;
use quiver_protocol::ledger::{AckLedger, Piece, NO_DEADLINE};

/// How far past a delivery the delivered horizon is raised (at least; a longer delivery raises
/// it by its own length): one write of the offsets store covers this many first deliveries,
/// and after a crash up to this many records not yet handed out count as handed out once.
pub(crate) const HORIZON_STEP: u64 = 1024;

/// What the engine is set up with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Where deliveries start (the ack floor of a fresh ledger).
    pub start: u64,
    pub window_bytes: u64,
    pub window_messages: u64,
    /// At most this many bytes per delivery.
    pub max_deliver_bytes: u64,
    /// Handed-out records are due again this long after (0: only after a nack or a new session).
    pub ack_wait_ms: u32,
    /// Records already handed out this many times are dead-lettered (0: never). Only set when
    /// there is a dead-letter topic.
    pub max_deliveries: u32,
    /// The ledger is a group's: deliveries raise its durable horizon, and ownership is checked
    /// before the engine takes due records or skips deleted ones.
    pub group: bool,
}

/// The partition's ends as the driver last read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ends {
    pub log_start: u64,
    pub high: u64,
}

/// An acknowledgement frame from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientAck {
    /// Everything below the floor, and the ranges, are acknowledged.
    Acked(u64, Vec<Range<u64>>),
    /// Hand `offset` out again after the delay (ms).
    Nack(u64, u32),
}

/// Whether the group's ledger must be written before a delivery goes out (design.md §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Persist {
    /// Nothing to wait for (the change is written with the next flush).
    Lazily,
    /// Start a write now, do not wait for it (the horizon was raised ahead).
    Ahead,
    /// Write it and wait before sending (a redelivery, or past the durable horizon).
    Wait,
}

/// A delivery to send: the head, then the batches of the last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivery {
    /// The records to hand out, with their counts.
    pub pieces: Vec<Piece>,
    /// Every record of the batches goes out for the first time: a plain `Deliver`.
    pub whole: bool,
    pub bytes: u64,
    pub messages: u64,
    /// Handed out again (not counted in the window).
    pub redelivery: bool,
    pub persist: Persist,
    /// Where the next first delivery would read, and how much, if it is known now (for a read
    /// ahead).
    pub next_read: Option<(u64, u64)>,
}

/// Why the client is told that offsets are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Retention deleted them before this subscription consumed them (logged, counted).
    FellBehind,
    /// Retention deleted records that were due again.
    Deleted,
    /// Their dead letters are written.
    DeadLettered,
}

/// What the driver is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Check that the subscription still owns its group's partition; answer with
    /// [`Engine::owner_confirmed`] (or end the subscription).
    CheckOwner,
    /// Read the batches at `offset`, up to `max_bytes`; answer with [`Engine::on_read`].
    Read { offset: u64, max_bytes: u64 },
    /// Send a delivery made of the last read's batches.
    Deliver(Delivery),
    /// Append the records of these ranges (found in the last read's batches), with their
    /// delivery counts, to the dead-letter topic; answer with [`Engine::on_dead_lettered`].
    DeadLetter(Vec<(Range<u64>, u32)>),
    /// Tell the client these offsets are settled (`Settled`).
    Settled(Vec<Range<u64>>, Settle),
    /// Nothing to do before the next event, or before `until` (ms) at the latest.
    Wait { until: Option<u64> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// A first delivery at the position.
    First(u64),
    /// Handing out again from `at` (the front of `redo`), up to `end`.
    Redo { at: u64, end: u64 },
}

/// A read whose delivery waits for its dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Deferred {
    reading: Reading,
    /// The first batch's base offset, and where what it hands out ends.
    base: u64,
    to: u64,
    bytes: u64,
    /// The offsets being dead-lettered: neither handed out nor acknowledged until the write
    /// finishes.
    dead: Vec<Range<u64>>,
}

/// One subscription's delivery state.
#[derive(Debug)]
pub(crate) struct Engine {
    cfg: Config,
    window: DeliveryWindow,
    /// Where the next first delivery reads.
    position: u64,
    /// Whether anything may have a deadline (an ack wait, or a nack was applied).
    deadlines: bool,
    /// Ranges due again, taken out of the ledger, handed out before new deliveries.
    redo: VecDeque<Range<u64>>,
    /// The read asked for and not answered yet.
    reading: Option<Reading>,
    /// The read waiting for its dead letters (at most one: the client gets `Settled` for the
    /// dead letters of a read before its delivery, as when they were written in line).
    deferred: Option<Deferred>,
    /// The driver confirmed ownership for the next step that needs it.
    owner_confirmed: bool,
    /// Nothing to read until the next event or the log's ends move (the last read, at these
    /// ends, found no batch).
    stalled: Option<Ends>,
    /// The ends last passed to `poll`.
    ends: Ends,
    /// The ledger changed since the driver last took this flag.
    dirty: bool,
    out: VecDeque<Action>,
}

impl Engine {
    pub fn new(cfg: Config) -> Self {
        let window = DeliveryWindow::new(cfg.start, cfg.window_bytes.max(1), cfg.window_messages.max(1));
        Engine {
            position: cfg.start,
            deadlines: cfg.ack_wait_ms > 0,
            window,
            cfg,
            redo: VecDeque::new(),
            reading: None,
            deferred: None,
            owner_confirmed: false,
            stalled: None,
            ends: Ends { log_start: 0, high: 0 },
            dirty: false,
            out: VecDeque::new(),
        }
    }

    /// Bytes delivered first time and not yet below the ack floor.
    pub fn in_flight_bytes(&self) -> u64 {
        self.window.in_flight_bytes()
    }

    /// The delivery window (first deliveries not yet below the ack floor).
    #[cfg(test)]
    pub fn window(&self) -> &DeliveryWindow {
        &self.window
    }

    /// Where the next first delivery reads.
    #[cfg(test)]
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Whether the ledger changed since the last call (the driver marks it dirty in the
    /// offsets store).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// The driver checked ownership for the step that asked for it ([`Action::CheckOwner`]).
    pub fn owner_confirmed(&mut self) {
        self.owner_confirmed = true;
    }

    /// Applies an acknowledgement at `now` (ms). The driver checks ownership first: a
    /// subscription that lost its partition has its acks refused, not applied.
    pub fn on_ack(&mut self, ledger: &mut AckLedger, ack: ClientAck, now: u64) {
        match ack {
            ClientAck::Acked(floor, ranges) => {
                ledger.ack_below(floor);
                for r in ranges {
                    ledger.ack(r);
                }
            }
            ClientAck::Nack(offset, delay_ms) => {
                ledger.nack(offset, now.saturating_add(u64::from(delay_ms)));
                self.deadlines = true;
            }
        }
        self.dirty = true;
        self.stalled = None;
        self.free_window(ledger.floor());
    }

    /// The dead-letter write asked for by [`Action::DeadLetter`] finished at `now`: on success
    /// its records count as acknowledged (and the client is told) before the rest of their
    /// read is delivered; on failure they stay pending and go out with it (with a higher
    /// count).
    pub fn on_dead_lettered(
        &mut self,
        ledger: &mut AckLedger,
        ranges: &[Range<u64>],
        written: bool,
        now: u64,
    ) {
        let Some(d) = self.deferred.take_if(|d| d.dead == ranges) else { return };
        self.stalled = None;
        if written {
            for r in ranges {
                ledger.ack(r.clone());
            }
            self.dirty = true;
            self.free_window(ledger.floor());
            self.out.push_back(Action::Settled(ranges.to_vec(), Settle::DeadLettered));
        }
        self.hand_out_read(ledger, d.reading, d.base, d.to, d.bytes, now);
    }

    /// The next thing to do, given the log's ends and the time (ms).
    pub fn poll(&mut self, ledger: &mut AckLedger, ends: Ends, now: u64) -> Action {
        // Retention can move the log start past a high watermark that waits for an fsync.
        let ends = Ends { log_start: ends.log_start, high: ends.high.max(ends.log_start) };
        self.ends = ends;
        if let Some(a) = self.out.pop_front() {
            return a;
        }
        if self.reading.is_some() || self.deferred.is_some() {
            // The driver answers the read, or the dead letters, first.
            return Action::Wait { until: None };
        }
        // What is due goes out before new messages, even while new ones keep coming.
        if self.deadlines && self.redo.is_empty() && ledger.next_due().is_some_and(|at| at <= now) {
            if !self.owned() {
                return Action::CheckOwner;
            }
            self.redo.extend(ledger.take_due(now));
        }
        if let Some(a) = self.next_redo(ledger, ends) {
            return a;
        }
        // The floor also moves by dead letters and commits: free the window by it.
        let floor = ledger.floor();
        self.free_window(floor);
        self.position = self.position.max(floor);
        if self.position < ends.log_start {
            // Retention deleted records this subscription had not consumed (it fell behind).
            if !self.owned() {
                return Action::CheckOwner;
            }
            // Everything below the log start counts as settled, also what was delivered and
            // not acknowledged (it can never be handed out again).
            let gone = floor..ends.log_start;
            ledger.commit(ends.log_start);
            self.dirty = true;
            self.free_window(ends.log_start);
            self.position = ends.log_start;
            return Action::Settled(vec![gone], Settle::FellBehind);
        }
        if self.stalled.is_some_and(|at| at != ends) {
            self.stalled = None;
        }
        if self.position < ends.high && self.window.has_room() && self.stalled.is_none() {
            self.reading = Some(Reading::First(self.position));
            return Action::Read { offset: self.position, max_bytes: self.budget() };
        }
        let until = if self.deadlines { ledger.next_due() } else { None };
        Action::Wait { until }
    }

    /// The next step of handing out what is due again, if any.
    fn next_redo(&mut self, ledger: &mut AckLedger, ends: Ends) -> Option<Action> {
        while let Some(r) = self.redo.front_mut() {
            if r.start >= r.end {
                self.redo.pop_front();
                continue;
            }
            if r.start < ends.log_start {
                // Retention removed them: nothing left to deliver, nothing to wait for.
                let gone = r.start..ends.log_start.min(r.end);
                r.start = gone.end;
                ledger.ack(gone.clone());
                self.dirty = true;
                return Some(Action::Settled(vec![gone], Settle::Deleted));
            }
            self.reading = Some(Reading::Redo { at: r.start, end: r.end });
            return Some(Action::Read { offset: r.start, max_bytes: self.cfg.max_deliver_bytes });
        }
        None
    }

    /// The read asked for by [`Action::Read`] returned batches from `base` up to `next`
    /// (`None`: no batch), `bytes` in all. The driver checks the subscription was not taken
    /// over before it answers.
    pub fn on_read(&mut self, ledger: &mut AckLedger, read: Option<(u64, u64)>, bytes: u64, now: u64) {
        let Some(reading) = self.reading.take() else { return };
        let to = match (reading, read) {
            (Reading::First(_), None) => {
                self.stalled = Some(self.ends);
                return;
            }
            (Reading::Redo { at, .. }, None) => {
                // Nothing there any more: what was left of the range is not handed out again
                // by this session.
                if self.redo.front().is_some_and(|r| r.start == at) {
                    self.redo.pop_front();
                }
                return;
            }
            (Reading::First(at), Some((_, next))) => {
                if at != self.position || next <= at {
                    return; // the position moved meanwhile (retention): read again
                }
                next
            }
            (Reading::Redo { at, end }, Some((_, next))) => {
                let to = next.min(end);
                if to <= at {
                    self.redo.pop_front();
                    return;
                }
                to
            }
        };
        let base = read.map(|r| r.0).unwrap_or_default();
        let at = match reading {
            Reading::First(at) | Reading::Redo { at, .. } => at,
        };
        // Records handed out `max_deliveries` times already go to the dead letters instead;
        // the rest of the read waits for them.
        let dead = self.exhausted(ledger, at..to);
        if !dead.is_empty() {
            let records = with_counts(ledger, &dead);
            self.deferred = Some(Deferred { reading, base, to, bytes, dead });
            self.out.push_back(Action::DeadLetter(records));
            return;
        }
        self.hand_out_read(ledger, reading, base, to, bytes, now);
    }

    /// The read asked for failed because retention deleted its offsets meanwhile: the next
    /// `poll` settles them.
    pub fn read_gone(&mut self) {
        self.reading = None;
    }

    /// Offsets in `range` to dead-letter.
    fn exhausted(&self, ledger: &AckLedger, range: Range<u64>) -> Vec<Range<u64>> {
        match self.cfg.max_deliveries {
            0 => Vec::new(),
            max => ledger.exhausted(range, max),
        }
    }

    /// Hands out what a read found, from where it was read up to `to`, and asks for the
    /// delivery.
    fn hand_out_read(
        &mut self,
        ledger: &mut AckLedger,
        reading: Reading,
        base: u64,
        to: u64,
        bytes: u64,
        now: u64,
    ) {
        match reading {
            Reading::First(at) => {
                let (pieces, persist) = self.hand_out(ledger, at..to, now);
                if !pieces.is_empty() {
                    let messages = pieces.iter().map(|p| p.range.end - p.range.start).sum();
                    let whole = base == at && pieces == [Piece { range: at..to, count: 1 }];
                    self.window.on_delivered(to, bytes, messages);
                    let next_read = self.window.has_room().then(|| (to, self.budget()));
                    self.out.push_back(Action::Deliver(Delivery {
                        pieces,
                        whole,
                        bytes,
                        messages,
                        redelivery: false,
                        persist,
                        next_read,
                    }));
                }
                self.position = self.position.max(to);
            }
            Reading::Redo { at, .. } => {
                let (pieces, persist) = self.hand_out(ledger, at..to, now);
                if !pieces.is_empty() {
                    let messages = pieces.iter().map(|p| p.range.end - p.range.start).sum();
                    self.out.push_back(Action::Deliver(Delivery {
                        pieces,
                        whole: false,
                        bytes,
                        messages,
                        redelivery: true,
                        persist,
                        next_read: None,
                    }));
                }
                if let Some(r) = self.redo.front_mut().filter(|r| r.start == at) {
                    r.start = to;
                }
            }
        }
    }

    /// Hands out `range` in the ledger: the records to send, with their counts, and whether
    /// the group's ledger must be written before they go out (design.md §12): a redelivery (a
    /// count above 1) waits until its raised count is durable, and a first delivery past the
    /// durable horizon until the horizon, raised a step ahead, is. A delivery in the last half
    /// of the step raises the horizon again and starts that write without waiting for it, so a
    /// steady stream of first deliveries never waits.
    fn hand_out(&mut self, ledger: &mut AckLedger, range: Range<u64>, now: u64) -> (Vec<Piece>, Persist) {
        let due = match self.cfg.ack_wait_ms {
            0 => NO_DEADLINE,
            wait => now.saturating_add(u64::from(wait)),
        };
        let pieces = ledger.deliver(range.clone(), due);
        self.dirty = true;
        let mut persist = Persist::Lazily;
        if let (true, Some(last)) = (self.cfg.group, pieces.last()) {
            let (end, step) = (last.range.end, HORIZON_STEP.max(range.end - range.start));
            if pieces.iter().any(|p| p.count > 1) {
                persist = Persist::Wait;
            }
            if ledger.durable_horizon() < end {
                ledger.raise_horizon(end + step);
                persist = Persist::Wait;
            } else if ledger.horizon() < end + step / 2 {
                ledger.raise_horizon(end + step);
                if persist != Persist::Wait {
                    persist = Persist::Ahead;
                }
            }
        }
        (pieces, persist)
    }

    /// Uses up the ownership check the driver confirmed; false if there is none (a group
    /// subscription asks for one first).
    fn owned(&mut self) -> bool {
        !self.cfg.group || std::mem::take(&mut self.owner_confirmed)
    }

    /// Frees the delivery window up to the ledger's floor.
    fn free_window(&mut self, floor: u64) {
        if floor > self.window.acked() {
            let _ = self.window.on_ack(floor.min(self.window.delivered()));
        }
    }

    /// Bytes the next delivery may carry: what the window has left, at most `max_deliver_bytes`.
    fn budget(&self) -> u64 {
        self.window.room_bytes().min(self.cfg.max_deliver_bytes)
    }
}

/// The dead ranges with their delivery counts, one entry per run of equal counts.
fn with_counts(ledger: &AckLedger, dead: &[Range<u64>]) -> Vec<(Range<u64>, u32)> {
    let mut out: Vec<(Range<u64>, u32)> = Vec::new();
    for r in dead {
        for o in r.clone() {
            let count = ledger.count(o);
            match out.last_mut() {
                Some((last, c)) if last.end == o && *c == count => last.end = o + 1,
                _ => out.push((o..o + 1, count)),
            }
        }
    }
    out
}

/// The ranges of a dead-letter write's records, merged (what [`Engine::on_dead_lettered`]
/// takes back).
pub(crate) fn merged_ranges(records: &[(Range<u64>, u32)]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (r, _) in records {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests;
