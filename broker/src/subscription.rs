//! Subscription streams: push `Deliver` frames from a start position, within the client's
//! delivery window and QUIC's stream flow control, and take acknowledgements back. Every
//! subscription keeps an `AckLedger` (per message acks, delivery counts, deadlines); a group's
//! ledger outlives its subscriptions and is persisted with the group's offsets (design.md §12).

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use quiver_protocol::batch::{BatchBuilder, BatchHeader, BatchSplitter, RecordIter};
use quiver_protocol::delivery::DeliveryWindow;
use quiver_protocol::ledger::{
    AckLedger, Piece, DELIVERY_COUNT, NO_DEADLINE, ORIGIN_OFFSET, ORIGIN_PARTITION, ORIGIN_TOPIC,
};
use quiver_protocol::limits::MAX_SETTLED_RANGES;
use quiver_protocol::message::{
    deliver_head, deliver_some_head, validate_group_name, DeliveryRange, Message, RedeliveryPolicy,
    StartPosition, Subscribe,
};
use quiver_protocol::{ErrorCode, TopicConfig};
use quiver_transport::{write_message, FrameReader};
use tokio::sync::mpsc;

use crate::offsets::{OffsetKey, SharedLedger};
use crate::partition::{Partition, PartitionError};
use crate::state::BrokerState;

/// Where a subscription stands once set up.
struct Setup {
    partition: Arc<Partition>,
    /// (group, member) when the subscription belongs to a group member, re-checked while it
    /// runs: a member that lost the partition stops receiving it.
    member: Option<(String, quiver_protocol::MemberRef)>,
    start: u64,
    /// Group ownership: the offsets key and this subscription's generation.
    group: Option<(OffsetKey, u64)>,
    /// The group's ledger, or this subscription's own without a group.
    ledger: SharedLedger,
    policy: RedeliveryPolicy,
    /// Where dead letters go, with `max_deliveries`.
    dead_letter_topic: Option<String>,
}

/// An acknowledgement frame from the client.
enum ClientAck {
    /// Everything below the floor, and the ranges, are acknowledged.
    Acked(u64, Vec<Range<u64>>),
    Nack(u64, u32),
}

/// Acknowledged ranges applied in one step of a subscription's loop.
const ACK_RANGES_PER_STEP: usize = 1024;
/// Acknowledgement steps applied before the loop delivers (or waits) again.
const ACK_STEPS_PER_PASS: usize = 4;

/// Milliseconds on a process-wide monotonic clock (ledger deadlines).
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

pub(crate) async fn run(
    state: Arc<BrokerState>,
    sub: Subscribe,
    mut send: quinn::SendStream,
    reader: FrameReader,
) {
    let setup = match setup(&state, &sub).await {
        Ok(s) => s,
        Err(e) => {
            let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
            let _ = send.finish();
            return;
        }
    };
    let window_bytes = u64::from(sub.window_bytes.clamp(1, state.config.max_window_bytes));
    let window = DeliveryWindow::new(setup.start, window_bytes, u64::from(sub.window_messages.max(1)));
    // From here on the accounting is the guard's: it is settled when the guard drops, however
    // the task ends (its connection closing aborts it).
    let mut active = Active::new(state, setup, window);
    let p = active.setup.partition.clone();
    let subscribed = Message::Subscribed {
        start_offset: active.setup.start,
        log_start_offset: p.log_start_offset(),
        high_watermark: p.high_watermark(),
    };
    if write_message(&mut send, &subscribed).await.is_err() {
        return;
    }
    // What the group acknowledged above its floor (other members, earlier sessions): the
    // consumer counts it as acknowledged, as the deliveries skip it.
    let acked = active.setup.ledger.lock().acked_ranges(MAX_SETTLED_RANGES);
    if !acked.is_empty() && write_message(&mut send, &Message::Settled { ranges: acked }).await.is_err() {
        return;
    }
    tracing::debug!(topic = %p.topic, partition = p.id, start = active.setup.start, group = ?sub.group, "subscription started");
    let (ack_tx, ack_rx) = mpsc::channel(16);
    active.acks = Some(tokio::spawn(read_acks(reader, ack_tx)));
    let mut session = Session {
        state: &active.state,
        setup: &active.setup,
        send: &mut send,
        window: &mut active.window,
        read_ahead: None,
    };
    if let Err(e) = session.push(ack_rx).await {
        let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
    }
    let _ = send.finish();
}

/// A subscription's share of the broker's accounting: the `quiver_subscriptions` gauge, its
/// delivery window's bytes in `quiver_inflight_delivery_bytes`, the group ownership and the
/// acknowledgement reader. Settled in `Drop`, so it is settled whether the subscription ends by
/// itself or its task is aborted (a closing connection aborts its streams' tasks).
struct Active {
    state: Arc<BrokerState>,
    setup: Setup,
    /// Every byte in it is counted in `quiver_inflight_delivery_bytes`.
    window: DeliveryWindow,
    acks: Option<tokio::task::JoinHandle<()>>,
}

impl Active {
    fn new(state: Arc<BrokerState>, setup: Setup, window: DeliveryWindow) -> Active {
        metrics::gauge!("quiver_subscriptions").increment(1.0);
        Active { state, setup, window, acks: None }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        metrics::gauge!("quiver_inflight_delivery_bytes").decrement(self.window.in_flight_bytes() as f64);
        metrics::gauge!("quiver_subscriptions").decrement(1.0);
        if let Some(acks) = &self.acks {
            acks.abort();
        }
        release(&self.state, &self.setup);
    }
}

async fn setup(state: &BrokerState, sub: &Subscribe) -> Result<Setup, PartitionError> {
    let topic = state.topics.get(&sub.topic)?;
    let partition = topic.partition(sub.partition)?.clone();
    let key: Option<OffsetKey> = match &sub.group {
        Some(g) if validate_group_name(g).is_err() => {
            return Err(PartitionError::new(
                ErrorCode::InvalidGroup,
                validate_group_name(g).err().unwrap_or_default(),
            ))
        }
        Some(g) => Some((Arc::from(g.as_str()), topic.name.clone(), sub.partition)),
        None => None,
    };
    if let Some(g) = &sub.group {
        state.groups.admit(g, || crate::groups::stored_groups(&state.offsets))?;
        state.groups.check_owner(g, &sub.topic, sub.member.as_ref(), sub.partition)?;
    }
    let (log_start, hw) = (partition.log_start_offset(), partition.high_watermark());
    // Retention can move the log start past a high watermark that waits for an fsync.
    let hw = hw.max(log_start);
    let committed = key.as_ref().and_then(|k| state.offsets.get(k));
    // Where to start without a committed offset (a group's is read again under its lock).
    let requested = match (committed, sub.start) {
        (Some(c), _) => c.max(log_start).min(hw),
        (None, StartPosition::Earliest) => log_start,
        (None, StartPosition::Latest) => hw,
        (None, StartPosition::Offset(o)) => {
            if o < log_start || o > hw {
                return Err(PartitionError::new(
                    ErrorCode::OffsetOutOfRange,
                    format!("offset {o} is out of range: earliest={log_start} latest={hw}"),
                ));
            }
            o
        }
        (None, StartPosition::Timestamp(ts)) => partition.offset_for_timestamp(ts).await?.max(log_start),
    };
    let dead_letter_topic = dead_letter_topic(state, &topic.name, &sub.policy)?;
    // Only now, with nothing left to fail, does a group subscription take the partition over
    // (single active consumer per partition until group membership arrives).
    let (group, ledger, start) = match key {
        Some(key) => {
            let ledger = state.offsets.ledger(&key, requested);
            let mut l = ledger.lock();
            // The floor and the log's ends, read under the lock: acks, commits and appends may
            // have moved them meanwhile.
            let floor = l.floor();
            let log_start = partition.log_start_offset();
            let hw = partition.high_watermark().max(log_start);
            let start = floor.max(log_start).min(hw);
            if floor > hw {
                // The log is shorter than the group's position (a crash lost unsynced records,
                // whose offsets are reused): what the ledger knows is void.
                l.reset(start);
            } else if start > floor {
                l.commit(start); // retention removed what the group had not consumed
            }
            // What an earlier session handed out and did not get acknowledged is handed out
            // again by this one, with higher delivery counts.
            l.end_session();
            let generation = state.next_generation.fetch_add(1, Ordering::Relaxed);
            state.group_owners.insert(key.clone(), generation);
            drop(l);
            (Some((key, generation)), ledger, start)
        }
        None => (None, Arc::new(Mutex::new(AckLedger::new(requested))), requested),
    };
    let member = sub.group.clone().zip(sub.member.clone());
    Ok(Setup { partition, start, group, member, ledger, policy: sub.policy.clone(), dead_letter_topic })
}

/// Where dead letters of `topic` go under `policy`: checked at subscribe, so a bad name fails
/// the subscription instead of every dead letter. Only the default `<topic>.dlq` is created by
/// the broker; a subscriber cannot make it create topics of any other name (design.md §12).
fn dead_letter_topic(
    state: &BrokerState,
    topic: &str,
    policy: &RedeliveryPolicy,
) -> Result<Option<String>, PartitionError> {
    if policy.max_deliveries == 0 {
        return Ok(None);
    }
    let name = policy.dead_letter_topic.clone().unwrap_or_else(|| default_dead_letter_topic(topic));
    let invalid = |m: String| PartitionError::new(ErrorCode::InvalidTopic, format!("dead-letter topic: {m}"));
    quiver_protocol::message::validate_topic_name(&name).map_err(invalid)?;
    if name == topic {
        return Err(invalid(format!("'{name}' is the topic itself")));
    }
    if name != default_dead_letter_topic(topic) && state.topics.get(&name).is_err() {
        return Err(PartitionError::new(
            ErrorCode::UnknownTopic,
            format!("dead-letter topic '{name}' does not exist: create it first (only '{topic}.dlq' is created on demand)"),
        ));
    }
    Ok(Some(name))
}

fn default_dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

fn release(state: &BrokerState, setup: &Setup) {
    if let Some((key, generation)) = &setup.group {
        // Under the ledger's lock, so a subscription taking over (which ends the session under
        // the same lock) cannot have its fresh session ended by this one.
        let mut l = setup.ledger.lock();
        if state.group_owners.remove_if(key, |_, g| g == generation).is_some() {
            l.end_session();
        }
    }
}

/// Forwards the client's acknowledgements; ends when the client's half ends or misbehaves.
async fn read_acks(mut reader: FrameReader, acks: mpsc::Sender<ClientAck>) {
    loop {
        let ack = match reader.next().await {
            Ok(Some(Message::Ack { next_offset })) => ClientAck::Acked(next_offset, vec![]),
            Ok(Some(Message::AckRanges { floor, mut ranges })) => {
                // A frame may carry 65,536 ranges: hand them on in slices, so applying them
                // never holds the subscription's task (and a runtime thread) for long.
                while ranges.len() > ACK_RANGES_PER_STEP {
                    let rest = ranges.split_off(ACK_RANGES_PER_STEP);
                    if acks.send(ClientAck::Acked(floor, ranges)).await.is_err() {
                        return;
                    }
                    ranges = rest;
                }
                ClientAck::Acked(floor, ranges)
            }
            Ok(Some(Message::Nack { offset, delay_ms })) => ClientAck::Nack(offset, delay_ms),
            Ok(Some(other)) => {
                tracing::debug!("unexpected frame kind {} on a subscription; closing it", other.kind());
                reader.stop(ErrorCode::UnexpectedKind.code() as u32);
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("subscription stream read failed: {e}");
                return;
            }
        };
        if acks.send(ack).await.is_err() {
            return;
        }
    }
}

/// One running subscription.
struct Session<'a> {
    state: &'a Arc<BrokerState>,
    setup: &'a Setup,
    send: &'a mut quinn::SendStream,
    window: &'a mut DeliveryWindow,
    /// The disk read of the next delivery, started before the current one is sent.
    read_ahead: Option<ReadAhead>,
}

/// A read of up to `max_bytes` at `offset`, running on its own task. Reads from disk and
/// sends to the client then overlap: a subscription catching up on history does not wait for
/// the disk and the network in turn.
struct ReadAhead {
    offset: u64,
    max_bytes: usize,
    task: tokio::task::JoinHandle<Result<Vec<Bytes>, PartitionError>>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort(); // nobody will use it (a no-op once it finished)
    }
}

/// Read ahead only when the window leaves room for at least this much of the next delivery.
const MIN_READ_AHEAD_BYTES: usize = 64 * 1024;

impl Session<'_> {
    /// The batches at `position`, up to `max` bytes: the read started ahead when it matches,
    /// else a fresh read.
    async fn read_next(
        &mut self,
        p: &Arc<Partition>,
        position: u64,
        max: usize,
    ) -> Result<Vec<Bytes>, PartitionError> {
        if let Some(mut ahead) = self.read_ahead.take() {
            // A failed read ahead (retention deleted the segment meanwhile, say) is repeated,
            // so the error the subscription reports is a current one.
            if ahead.offset == position && ahead.max_bytes <= max {
                if let Ok(Ok(parts)) = (&mut ahead.task).await {
                    return Ok(parts);
                }
            }
        }
        p.read_parts(position, max).await
    }

    /// Starts reading the delivery after the one at `next` from disk, when there is more below
    /// `high` that the tail cache cannot serve and the window leaves room for it. The window's
    /// room only grows until the next delivery, so the read ahead fits it when its turn comes.
    fn start_read_ahead(&mut self, p: &Arc<Partition>, next: u64, high: u64) {
        let max_bytes = self.delivery_budget();
        if next >= high || max_bytes < MIN_READ_AHEAD_BYTES || p.is_cached(next) {
            return;
        }
        let p = p.clone();
        let task = tokio::spawn(async move { p.read_disk_parts(next, max_bytes).await });
        self.read_ahead = Some(ReadAhead { offset: next, max_bytes, task });
    }

    /// Bytes the next delivery may carry: what the window has left, at most `max_deliver_bytes`.
    fn delivery_budget(&self) -> usize {
        self.window.room_bytes().min(u64::from(self.state.config.max_deliver_bytes)) as usize
    }

    async fn push(&mut self, mut acks: mpsc::Receiver<ClientAck>) -> Result<(), PartitionError> {
        let p = self.setup.partition.clone();
        let messages_out = metrics::counter!("quiver_messages_out_total", "topic" => p.topic.to_string());
        let bytes_out = metrics::counter!("quiver_bytes_out_total", "topic" => p.topic.to_string());
        let mut hw = p.watch_high_watermark();
        let mut fence_check = tokio::time::interval(FENCE_CHECK);
        let mut position = self.setup.start;
        // Deadlines only exist with an ack wait or after a nack.
        let mut deadlines = self.setup.policy.ack_wait_ms > 0;
        loop {
            // What the client sent meanwhile, a bounded amount per pass.
            for _ in 0..ACK_STEPS_PER_PASS {
                match acks.try_recv() {
                    Ok(ack) => deadlines |= self.apply_ack(ack)?,
                    Err(_) => break,
                }
            }
            let high = *hw.borrow_and_update();
            // What is due goes out before new messages, even while new ones keep coming.
            let due_now = deadlines && self.setup.ledger.lock().next_due().is_some_and(|at| at <= clock_ms());
            if due_now && !self.redeliver_due(&p, high).await? {
                return Ok(());
            }
            // The floor also moves by dead letters and commits: free the window by it.
            let floor = self.setup.ledger.lock().floor();
            self.free_window(floor);
            position = position.max(floor);
            if position < p.log_start_offset() {
                // Retention deleted records this subscription had not consumed (it fell behind).
                match self.skip_deleted(&p).await? {
                    Some(next) => position = next,
                    None => return Ok(()),
                }
                continue;
            }
            if position < high && self.window.has_room() {
                let max = self.delivery_budget();
                let mut parts = match self.read_next(&p, position, max).await {
                    // Retention moved the log start past `position` since the check above.
                    Err(e) if e.code == ErrorCode::OffsetOutOfRange && position < p.log_start_offset() => {
                        continue;
                    }
                    r => r?,
                };
                if let Some(ext) = extent(&parts) {
                    self.check_not_taken_over()?;
                    // Records handed out `max_deliveries` times already (by earlier sessions)
                    // go to the dead letters instead.
                    if !self.settle_exhausted(&parts, position..ext.next).await? {
                        return Ok(());
                    }
                    let (pieces, write) = self.hand_out(position..ext.next);
                    if let Some(epoch) = write {
                        self.write_ledger(epoch).await?;
                    }
                    let bytes: u64 = parts.iter().map(|b| b.len() as u64).sum();
                    let messages: u64 = pieces.iter().map(|p| p.range.end - p.range.start).sum();
                    if !pieces.is_empty() {
                        let whole =
                            ext.base == position && pieces == [Piece { range: position..ext.next, count: 1 }];
                        // Head, then the batches as they are (cached or read), without a copy.
                        parts.insert(0, head(high, &pieces, bytes, whole));
                        // The gauge moves with the window, so the guard's final decrement
                        // (`Active`) matches what was added, whenever the task ends.
                        self.window.on_delivered(ext.next, bytes, messages);
                        metrics::gauge!("quiver_inflight_delivery_bytes").increment(bytes as f64);
                        self.start_read_ahead(&p, ext.next, high);
                        if self.send.write_all_chunks(&mut parts).await.is_err() {
                            return Ok(()); // the client went away
                        }
                        messages_out.increment(messages);
                        bytes_out.increment(bytes);
                    }
                    position = ext.next;
                    continue;
                }
            }
            let next_due = if deadlines { self.setup.ledger.lock().next_due() } else { None };
            let due_in = next_due.map(|at| std::time::Duration::from_millis(at.saturating_sub(clock_ms())));
            tokio::select! {
                _ = fence_check.tick(), if self.setup.group.is_some() => self.check_owner()?,
                r = hw.changed() => if r.is_err() { return Ok(()) },
                ack = acks.recv() => match ack {
                    Some(ack) => deadlines |= self.apply_ack(ack)?,
                    None => return Ok(()), // the client's half ended: unsubscribe
                },
                _ = tokio::time::sleep(due_in.unwrap_or_default()), if due_in.is_some() => {
                    if !self.redeliver_due(&p, high).await? {
                        return Ok(());
                    }
                }
                _ = self.state.shutdown.cancelled() => return Err(PartitionError::new(ErrorCode::ShuttingDown, "broker shutting down")),
                // Its topic was deleted (the broker shutting down is the arm above).
                _ = p.closed() => return Err(p.closed_error()),
            }
        }
    }

    /// When what is handed out now is due again.
    fn due(&self) -> u64 {
        match self.setup.policy.ack_wait_ms {
            0 => NO_DEADLINE,
            wait => clock_ms() + u64::from(wait),
        }
    }

    /// Hands out `range` in the ledger: the records to send, with their counts, and whether
    /// the group's ledger must be written before they go out (design.md §12): a redelivery
    /// (a count above 1) waits until its raised count is durable, and a first delivery past
    /// the durable horizon until the horizon, raised a step ahead, is. A delivery in the last
    /// half of the step raises the horizon again and starts that write without waiting for it,
    /// so a steady stream of first deliveries never waits.
    fn hand_out(&self, range: Range<u64>) -> (Vec<Piece>, Option<u64>) {
        let due = self.due();
        let mut l = self.setup.ledger.lock();
        let pieces = l.deliver(range.clone(), due);
        let (mut wait, mut ahead) = (false, false);
        if let (Some(_), Some(last)) = (&self.setup.group, pieces.last()) {
            let (end, step) = (last.range.end, HORIZON_STEP.max(range.end - range.start));
            wait = pieces.iter().any(|p| p.count > 1);
            if l.durable_horizon() < end {
                l.raise_horizon(end + step);
                wait = true;
            } else if l.horizon() < end + step / 2 {
                l.raise_horizon(end + step);
                ahead = true;
            }
        }
        drop(l);
        let epoch = self.dirty();
        if ahead && !wait {
            let st = self.state.clone();
            // A failure poisons the store, which the next delivery that must wait reports.
            drop(tokio::task::spawn_blocking(move || st.offsets.flush_to_blocking(epoch)));
        }
        (pieces, wait.then_some(epoch))
    }

    /// Makes the group's ledger durable up to the change of `epoch` (with everything else
    /// dirty in the offsets store, one fsync, shared with concurrent waiters). Fails the
    /// subscription if the store cannot write.
    async fn write_ledger(&self, epoch: u64) -> Result<(), PartitionError> {
        let st = self.state.clone();
        tokio::task::spawn_blocking(move || st.offsets.flush_to_blocking(epoch))
            .await
            .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| PartitionError::new(ErrorCode::StorageError, format!("recording deliveries: {e}")))
    }

    /// The group's ledger changed: persist it with the next flush. Returns the change's epoch
    /// in the offsets store (0 without a group).
    fn dirty(&self) -> u64 {
        match &self.setup.group {
            Some((key, _)) => self.state.offsets.mark_dirty(key),
            None => 0,
        }
    }

    /// Moves past records that retention deleted before this subscription consumed them, as a
    /// Kafka consumer resets to the earliest offset: everything below the log start counts as
    /// settled (delivered-but-unacknowledged records there can never be handed out again), the
    /// client is told so (`Settled`), and a group commits past them. Returns the position to
    /// go on from, or `None` once the client is gone.
    async fn skip_deleted(&mut self, p: &Partition) -> Result<Option<u64>, PartitionError> {
        self.check_owner()?;
        let log_start = p.log_start_offset();
        let floor = {
            let mut ledger = self.setup.ledger.lock();
            let floor = ledger.floor();
            ledger.commit(log_start);
            floor
        };
        if floor >= log_start {
            return Ok(Some(floor));
        }
        self.dirty();
        self.free_window(log_start);
        tracing::warn!(
            topic = %p.topic, partition = p.id, skipped = log_start - floor,
            "subscription fell behind retention: offsets {floor}..{log_start} were deleted before it consumed them"
        );
        metrics::counter!("quiver_retention_skipped_total", "topic" => p.topic.to_string())
            .increment(log_start - floor);
        let gone = floor..log_start;
        if write_message(self.send, &Message::Settled { ranges: vec![gone] }).await.is_err() {
            return Ok(None);
        }
        Ok(Some(log_start))
    }

    /// Frees the delivery window up to the ledger's floor.
    fn free_window(&mut self, floor: u64) {
        if floor <= self.window.acked() {
            return;
        }
        let before = self.window.in_flight_bytes();
        let _ = self.window.on_ack(floor.min(self.window.delivered()));
        metrics::gauge!("quiver_inflight_delivery_bytes")
            .decrement(before.saturating_sub(self.window.in_flight_bytes()) as f64);
    }

    /// Applies an acknowledgement; returns whether it set a deadline (a nack).
    fn apply_ack(&mut self, ack: ClientAck) -> Result<bool, PartitionError> {
        // A subscription that was taken over, or whose member lost the partition, no longer
        // counts for the group: its acks are refused, not applied.
        if self.setup.group.is_some() {
            self.check_owner()?;
        }
        let nacked = matches!(ack, ClientAck::Nack(..));
        let (moved, floor) = {
            let mut l = self.setup.ledger.lock();
            let before = l.floor();
            match ack {
                ClientAck::Acked(floor, ranges) => {
                    l.ack_below(floor);
                    for r in ranges {
                        l.ack(r);
                    }
                }
                ClientAck::Nack(offset, delay_ms) => l.nack(offset, clock_ms() + u64::from(delay_ms)),
            }
            (l.floor() != before, l.floor())
        };
        self.dirty();
        if moved {
            self.free_window(floor);
        }
        Ok(nacked)
    }

    /// Fails once this subscription no longer owns its group's partition: taken over by a
    /// newer subscription, its member lost the partition, or (without a member) the group
    /// gained members.
    fn check_owner(&self) -> Result<(), PartitionError> {
        self.check_not_taken_over()?;
        let p = &self.setup.partition;
        match (&self.setup.member, &self.setup.group) {
            (Some((group, member)), _) => self.state.groups.check_owner(group, &p.topic, Some(member), p.id),
            // Outside the membership (a plain `--group` consumer): only while the group has no
            // members; once one joins, its acks no longer move the group's offset.
            (None, Some(((group, _, _), _))) => self.state.groups.check_owner(group, &p.topic, None, p.id),
            (None, None) => Ok(()),
        }
    }

    /// Fails once a newer subscription of the group took the partition over (cheap: one map
    /// lookup, so it runs before every delivery).
    fn check_not_taken_over(&self) -> Result<(), PartitionError> {
        if let Some((key, generation)) = &self.setup.group {
            if self.state.group_owners.get(key).map(|g| *g != *generation).unwrap_or(true) {
                return Err(PartitionError::new(
                    ErrorCode::FencedMember,
                    "a newer subscription of the group took this partition over",
                ));
            }
        }
        Ok(())
    }

    /// Hands out again, or dead-letters, what is due. Returns false once the client is gone.
    async fn redeliver_due(&mut self, p: &Partition, high: u64) -> Result<bool, PartitionError> {
        self.check_owner()?;
        let due = self.setup.ledger.lock().take_due(clock_ms());
        for range in due {
            let mut at = range.start;
            while at < range.end {
                let log_start = p.log_start_offset();
                if at < log_start {
                    // Retention removed them: nothing left to deliver, nothing to wait for.
                    let gone = at..log_start.min(range.end);
                    self.setup.ledger.lock().ack(gone.clone());
                    self.dirty();
                    if write_message(self.send, &Message::Settled { ranges: vec![gone] }).await.is_err() {
                        return Ok(false);
                    }
                    at = log_start;
                    continue;
                }
                let max = self.state.config.max_deliver_bytes as usize;
                let mut parts = p.read_parts(at, max).await?;
                let Some(ext) = extent(&parts) else { break };
                let end = ext.next.min(range.end);
                if !self.settle_exhausted(&parts, at..end).await? {
                    return Ok(false);
                }
                let (pieces, write) = self.hand_out(at..end);
                if let Some(epoch) = write {
                    self.write_ledger(epoch).await?;
                }
                if !pieces.is_empty() {
                    let bytes: u64 = parts.iter().map(|b| b.len() as u64).sum();
                    let messages: u64 = pieces.iter().map(|p| p.range.end - p.range.start).sum();
                    parts.insert(0, head(high, &pieces, bytes, false));
                    if self.send.write_all_chunks(&mut parts).await.is_err() {
                        return Ok(false);
                    }
                    metrics::counter!("quiver_redeliveries_total", "topic" => p.topic.to_string())
                        .increment(messages);
                }
                at = end;
            }
        }
        Ok(true)
    }

    /// Dead-letters the records of `range` (found in `parts`) that were handed out
    /// `max_deliveries` times, marks them acknowledged and tells the client (`Settled`).
    /// Returns false once the client is gone. A dead letter that cannot be written is logged
    /// and its record stays pending (it is handed out again).
    async fn settle_exhausted(&mut self, parts: &[Bytes], range: Range<u64>) -> Result<bool, PartitionError> {
        let Some(target) = &self.setup.dead_letter_topic else { return Ok(true) };
        let dead = self.setup.ledger.lock().exhausted(range, self.setup.policy.max_deliveries);
        if dead.is_empty() {
            return Ok(true);
        }
        if let Err(e) = self.dead_letter(target, parts, &dead).await {
            let p = &self.setup.partition;
            tracing::warn!(topic = %p.topic, partition = p.id, dead_letter_topic = %target, "could not write dead letters ({e}); they stay pending");
            return Ok(true);
        }
        {
            let mut l = self.setup.ledger.lock();
            for r in &dead {
                l.ack(r.clone());
            }
        }
        self.dirty();
        Ok(write_message(self.send, &Message::Settled { ranges: dead }).await.is_ok())
    }

    /// Writes the records of `dead` (found in `parts`) to the dead-letter topic, with headers
    /// naming their origin, and waits until they are appended there.
    async fn dead_letter(
        &self,
        name: &str,
        parts: &[Bytes],
        dead: &[Range<u64>],
    ) -> Result<(), PartitionError> {
        let p = &self.setup.partition;
        let topic = match self.state.topics.get(name) {
            Ok(t) => t,
            Err(e) if name != default_dead_letter_topic(&p.topic) => return Err(e),
            Err(_) => {
                let config = TopicConfig::default();
                match self.state.topics.create(name, 1, config, self.state.config.max_partitions_total).await
                {
                    Ok(t) => t,
                    Err(e) if e.code == ErrorCode::TopicExists => self.state.topics.get(name)?,
                    Err(e) => return Err(e),
                }
            }
        };
        let target = topic.partition(0)?.clone();
        let ledger = self.setup.ledger.clone();
        let mut builder = BatchBuilder::new(4096);
        let (topic_name, partition) = (p.topic.to_string(), p.id.to_string());
        for part in parts {
            for item in BatchSplitter::new(part.clone()) {
                let (header, batch) =
                    item.map_err(|e| PartitionError::new(ErrorCode::CorruptBatch, e.to_string()))?;
                for record in RecordIter::new(batch, header) {
                    let r =
                        record.map_err(|e| PartitionError::new(ErrorCode::CorruptBatch, e.to_string()))?;
                    if !dead.iter().any(|d| d.contains(&r.offset)) {
                        continue;
                    }
                    let offset = r.offset.to_string();
                    let count = ledger.lock().count(r.offset).to_string();
                    let mut headers: Vec<(&str, &[u8])> =
                        r.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())).collect();
                    headers.push((ORIGIN_TOPIC, topic_name.as_bytes()));
                    headers.push((ORIGIN_PARTITION, partition.as_bytes()));
                    headers.push((ORIGIN_OFFSET, offset.as_bytes()));
                    headers.push((DELIVERY_COUNT, count.as_bytes()));
                    builder.push(r.timestamp, r.key.as_deref(), &r.value, &headers);
                    tracing::info!(topic = %p.topic, partition = p.id, offset = r.offset, dead_letter_topic = %name, deliveries = %count, "message dead-lettered");
                }
            }
        }
        if builder.is_empty() {
            return Ok(());
        }
        let batch = builder.finish();
        quiver_protocol::batch::validate(&batch)
            .map_err(|e| PartitionError::new(ErrorCode::BatchTooLarge, format!("dead-letter batch: {e}")))?;
        let appended = target.submit(bytes::BytesMut::from(&batch[..])).await?;
        appended
            .await
            .map_err(|_| PartitionError::new(ErrorCode::ShuttingDown, "partition is closing"))??;
        metrics::counter!("quiver_dead_letters_total", "topic" => p.topic.to_string())
            .increment(dead.iter().map(|r| r.end - r.start).sum());
        Ok(())
    }
}

/// The head of a delivery: plain `Deliver` when every record of the batches is handed out
/// for the first time, else `DeliverSome` naming the records and their counts.
fn head(high: u64, pieces: &[Piece], bytes: u64, whole: bool) -> Bytes {
    if whole {
        return deliver_head(high, bytes as usize);
    }
    let ranges: Vec<DeliveryRange> = pieces
        .iter()
        .map(|p| DeliveryRange { start: p.range.start, end: p.range.end, delivery_count: p.count })
        .collect();
    deliver_some_head(high, &ranges, bytes as usize)
}

/// How far past a delivery the delivered horizon is raised (at least; a longer delivery raises
/// it by its own length): one write of the offsets store covers this many first deliveries,
/// and after a crash up to this many records not yet handed out count as handed out once.
const HORIZON_STEP: u64 = 1024;

/// How often a group member's subscription re-checks that it still owns the partition.
const FENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// The first batch's base offset and the offset after the last batch, of a read.
struct Extent {
    base: u64,
    next: u64,
}

fn extent(parts: &[Bytes]) -> Option<Extent> {
    let mut ext: Option<Extent> = None;
    for batches in parts {
        let mut pos = 0;
        while pos < batches.len() {
            let h = BatchHeader::parse(&batches[pos..]).ok()?;
            pos += h.total_len();
            match &mut ext {
                Some(e) => e.next = h.next_offset(),
                None => ext = Some(Extent { base: h.base_offset, next: h.next_offset() }),
            }
        }
    }
    ext
}
