//! The tokio loop of one subscription: reads the partition, writes frames, reads acks, and
//! feeds the engine (`engine.rs`), which decides what to do.

use std::sync::Arc;

use bytes::Bytes;
use quiver_protocol::batch::Batches;
use quiver_protocol::ledger::{AckLedger, Piece};
use quiver_protocol::limits::MAX_SETTLED_RANGES;
use quiver_protocol::message::{deliver_head, deliver_some_head, DeliveryRange, Message, Subscribe};
use quiver_protocol::ErrorCode;
use quiver_transport::{write_message, FrameReader};
use tokio::sync::mpsc;

use super::engine::{self, Action, ClientAck, Delivery, Ends, Engine, Persist, Settle};
use super::{check_not_taken_over, check_owner, release, Setup};
use crate::dead_letters::{Job, Written};
use crate::partition::{Partition, PartitionError};
use crate::state::BrokerState;

/// Acknowledged ranges applied in one step of a subscription's loop.
const ACK_RANGES_PER_STEP: usize = 1024;
/// Acknowledgement steps applied before the loop delivers (or waits) again.
const ACK_STEPS_PER_PASS: usize = 4;
/// How often a group member's subscription re-checks that it still owns the partition.
const FENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);
/// Read ahead only when the window leaves room for at least this much of the next delivery.
const MIN_READ_AHEAD_BYTES: u64 = 64 * 1024;

/// Milliseconds on a process-wide monotonic clock (ledger deadlines).
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

pub(super) async fn serve(
    state: Arc<BrokerState>,
    sub: Subscribe,
    setup: Setup,
    mut send: quinn::SendStream,
    reader: FrameReader,
    limits: super::Limits,
) {
    let max_deliveries = if setup.dead_letter_topic.is_some() { setup.policy.max_deliveries } else { 0 };
    let engine = Engine::new(engine::Config {
        start: setup.start,
        window_bytes: u64::from(sub.window_bytes.clamp(1, state.config.max_window_bytes)),
        window_messages: u64::from(sub.window_messages.max(1)),
        max_deliver_bytes: u64::from(state.config.max_deliver_bytes),
        ack_wait_ms: setup.policy.ack_wait_ms,
        max_deliveries,
        group: setup.group.is_some(),
    });
    // From here on the accounting is the guard's: it is settled when the guard drops, however
    // the task ends (its connection closing aborts it).
    let mut active = Active::new(state, setup, engine, limits.budget);
    active.permission = limits.permission;
    active.quota = limits.quota;
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
    if let Err(e) = active.push(&mut send, ack_rx).await {
        let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
    }
    let _ = send.finish();
}

/// A running subscription, and its share of the broker's accounting: the
/// `quiver_subscriptions` gauge, its window's bytes in `quiver_inflight_delivery_bytes`, the
/// group ownership and the acknowledgement reader. Settled in `Drop`, so it is settled whether
/// the subscription ends by itself or its task is aborted (a closing connection aborts its
/// streams' tasks).
struct Active {
    state: Arc<BrokerState>,
    setup: Setup,
    engine: Engine,
    /// The window's bytes as counted in `quiver_inflight_delivery_bytes`.
    counted: u64,
    inflight: metrics::Gauge,
    /// The offsets store's epoch of the ledger's last change (0 without a group).
    epoch: u64,
    acks: Option<tokio::task::JoinHandle<()>>,
    /// The disk read of the next delivery, started before the current one is sent.
    read_ahead: Option<ReadAhead>,
    /// Checked again when the ACL rules change (docs/security.md).
    permission: Option<crate::auth::Permission>,
    /// The connection's and the broker's budgets, which batches read from disk count against
    /// until they are handed to QUIC (cached batches are shared with the tail cache: free).
    budget: crate::state::ReplyBudget,
    /// What the batches read for the current delivery hold of them.
    held: crate::state::Permits,
    /// The consume quota of the subscriber's principal, if it has one.
    quota: Option<Arc<crate::auth::RateBucket>>,
}

impl Active {
    fn new(
        state: Arc<BrokerState>,
        setup: Setup,
        engine: Engine,
        budget: crate::state::ReplyBudget,
    ) -> Active {
        metrics::gauge!("quiver_subscriptions").increment(1.0);
        let inflight = metrics::gauge!("quiver_inflight_delivery_bytes");
        Active {
            state,
            setup,
            engine,
            counted: 0,
            inflight,
            epoch: 0,
            acks: None,
            read_ahead: None,
            permission: None,
            budget,
            held: Vec::new(),
            quota: None,
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.inflight.decrement(self.counted as f64);
        metrics::gauge!("quiver_subscriptions").decrement(1.0);
        if let Some(acks) = &self.acks {
            acks.abort();
        }
        release(&self.state, &self.setup);
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

/// A read of up to `max_bytes` at `offset`, running on its own task. Reads from disk and
/// sends to the client then overlap: a subscription catching up on history does not wait for
/// the disk and the network in turn.
struct ReadAhead {
    offset: u64,
    max_bytes: usize,
    /// The bytes read and the budget they hold (until the delivery made of them is written),
    /// or `None` when the budget had no room for them.
    task: tokio::task::JoinHandle<Result<Option<(Bytes, crate::state::Permits)>, PartitionError>>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort(); // nobody will use it (a no-op once it finished)
    }
}

impl Active {
    async fn push(
        &mut self,
        send: &mut quinn::SendStream,
        mut acks: mpsc::Receiver<ClientAck>,
    ) -> Result<(), PartitionError> {
        let p = self.setup.partition.clone();
        let messages_out = metrics::counter!("quiver_messages_out_total", "topic" => p.topic.to_string());
        let bytes_out = metrics::counter!("quiver_bytes_out_total", "topic" => p.topic.to_string());
        let mut hw = p.watch_high_watermark();
        let mut fence_check = tokio::time::interval(FENCE_CHECK);
        let mut acl_watch = self.permission.as_ref().map(|p| p.watcher());
        let consume_quota = self.quota.take();
        // Bytes of the current read charged to the quota and not yet delivered.
        let mut reserved = 0usize;
        let (written_tx, mut written_rx) = mpsc::channel::<Written>(1);
        // The batches of the last read, which deliveries and dead letters are made of.
        let mut parts: Vec<Bytes> = Vec::new();
        loop {
            // What the client sent meanwhile, a bounded amount per pass.
            for _ in 0..ACK_STEPS_PER_PASS {
                match acks.try_recv() {
                    Ok(ack) => self.apply_ack(ack)?,
                    Err(_) => break,
                }
            }
            while let Ok(w) = written_rx.try_recv() {
                self.dead_lettered(w);
            }
            if let Some(permission) = self.permission.as_mut().filter(|p| p.changed()) {
                permission.recheck()?;
            }
            let high = *hw.borrow_and_update();
            let ends = Ends { log_start: p.log_start_offset(), high };
            let action = self.with_ledger(|e, l| e.poll(l, ends, clock_ms()));
            match action {
                Action::CheckOwner => {
                    check_owner(&self.state, &self.setup)?;
                    self.engine.owner_confirmed();
                }
                Action::Read { offset, max_bytes } => {
                    // Over its principal's consume quota, the read waits its turn, before it
                    // takes any memory budget (docs/security.md, "Quotas").
                    if let Some(q) = &consume_quota {
                        q.refund(std::mem::take(&mut reserved));
                        reserved = max_bytes as usize;
                        let wait = q.take(reserved);
                        if !wait.is_zero() {
                            self.read_ahead = None;
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = self.state.shutdown.cancelled() => return Err(PartitionError::new(ErrorCode::ShuttingDown, "broker shutting down")),
                            }
                        }
                    }
                    parts = match self.read_next(&p, offset, max_bytes as usize).await {
                        // Retention moved the log start past `offset` meanwhile.
                        Err(e) if e.code == ErrorCode::OffsetOutOfRange && offset < p.log_start_offset() => {
                            self.engine.read_gone();
                            continue;
                        }
                        r => r?,
                    };
                    let ext = extent(&parts);
                    if ext.is_some() {
                        check_not_taken_over(&self.state, &self.setup)?;
                    }
                    let bytes = parts.iter().map(|b| b.len() as u64).sum();
                    let read = ext.map(|e| (e.base, e.next));
                    self.with_ledger(|e, l| e.on_read(l, read, bytes, clock_ms()));
                }
                Action::DeadLetter(records) => {
                    let Some(target) = self.setup.dead_letter_topic.clone() else {
                        // Not asked for without a dead-letter topic; if it were, the records
                        // stay pending and go out again.
                        self.dead_lettered((engine::merged_ranges(&records), false));
                        continue;
                    };
                    let job = Job {
                        topics: self.state.topics.clone(),
                        max_partitions_total: self.state.config.max_partitions_total,
                        create_if_missing: target == super::default_dead_letter_topic(&p.topic),
                        target,
                        ranges: engine::merged_ranges(&records),
                        source: p.clone(),
                        parts: parts.clone(),
                        records,
                        done: written_tx.clone(),
                        cluster: self.state.cluster.clone(),
                        replicas: self.state.topics.get(&p.topic).map_or(1, |t| t.config.replicas),
                    };
                    tokio::select! {
                        r = self.state.dead_letters.submit(job) => r?,
                        _ = self.state.shutdown.cancelled() => return Err(PartitionError::new(ErrorCode::ShuttingDown, "broker shutting down")),
                    }
                }
                Action::Deliver(mut d) => {
                    // Checked again right before anything goes out: the rules may have changed
                    // since the top of this pass (a revocation, then an append).
                    if let Some(permission) = self.permission.as_mut().filter(|p| p.changed()) {
                        permission.recheck()?;
                    }
                    match d.persist {
                        Persist::Lazily => {}
                        Persist::Ahead => {
                            let (store, epoch) = (self.setup.store.clone(), self.epoch);
                            // A failure poisons the store, which the next delivery that must
                            // wait reports.
                            drop(tokio::task::spawn_blocking(move || store.flush_to_blocking(epoch)));
                        }
                        Persist::Wait => self.write_ledger(self.epoch).await?,
                    }
                    let mut chunks = std::mem::take(&mut parts);
                    if d.redelivery {
                        // A redelivery's read reaches past what it hands out again (up to the
                        // delivery size): the batches there are not handed out by it, and an
                        // SDK that took a control batch among them as delivered skipped the
                        // records before it (docs/faults.md, "skipped-offset").
                        if let Some(end) = d.pieces.last().map(|p| p.range.end) {
                            trim_from(&mut chunks, end);
                            d.bytes = chunks.iter().map(|b| b.len() as u64).sum();
                        }
                    }
                    // Head, then the batches as they are (cached or read), without a copy.
                    chunks.insert(0, head(high, &d));
                    if !d.redelivery {
                        if let Some((next, max)) = d.next_read {
                            self.start_read_ahead(&p, next, max, high);
                        }
                    }
                    // The quota was charged the read's size before it: what the delivery
                    // left out is given back, and a delivery larger than that (a whole batch
                    // beyond `max_bytes`) is charged the rest, which the next read waits for.
                    if let Some(q) = &consume_quota {
                        let (charged, delivered) = (std::mem::take(&mut reserved), d.bytes as usize);
                        match delivered > charged {
                            true => drop(q.take(delivered - charged)),
                            false => q.refund(charged - delivered),
                        }
                    }
                    if send.write_all_chunks(&mut chunks).await.is_err() {
                        return Ok(()); // the client went away
                    }
                    // Handed to QUIC (bounded by its send window): the read's budget is free.
                    self.held.clear();

                    if d.redelivery {
                        metrics::counter!("quiver_redeliveries_total", "topic" => p.topic.to_string())
                            .increment(d.messages);
                    } else {
                        messages_out.increment(d.messages);
                        bytes_out.increment(d.bytes);
                    }
                }
                Action::Settled(ranges, why) => {
                    if let (Settle::FellBehind, Some(gone)) = (why, ranges.first()) {
                        tracing::warn!(
                            topic = %p.topic, partition = p.id, skipped = gone.end - gone.start,
                            "subscription fell behind retention: offsets {}..{} were deleted before it consumed them",
                            gone.start, gone.end
                        );
                        metrics::counter!("quiver_retention_skipped_total", "topic" => p.topic.to_string())
                            .increment(gone.end - gone.start);
                    }
                    if write_message(send, &Message::Settled { ranges }).await.is_err() {
                        return Ok(());
                    }
                }
                Action::Wait { until } => {
                    let due_in =
                        until.map(|at| std::time::Duration::from_millis(at.saturating_sub(clock_ms())));
                    tokio::select! {
                        _ = fence_check.tick(), if self.setup.group.is_some() => check_owner(&self.state, &self.setup)?,
                        r = hw.changed() => if r.is_err() { return Ok(()) },
                        ack = acks.recv() => match ack {
                            Some(ack) => self.apply_ack(ack)?,
                            None => return Ok(()), // the client's half ended: unsubscribe
                        },
                        Some(w) = written_rx.recv() => self.dead_lettered(w),
                        _ = tokio::time::sleep(due_in.unwrap_or_default()), if due_in.is_some() => {}
                        // The ACL rules changed: checked at the top of the next pass.
                        Some(Ok(())) = async { Some(acl_watch.as_mut()?.changed().await) } => {}
                        _ = self.state.shutdown.cancelled() => return Err(PartitionError::new(ErrorCode::ShuttingDown, "broker shutting down")),
                        // Its topic was deleted (the broker shutting down is the arm above).
                        _ = p.closed() => return Err(p.closed_error()),
                    }
                }
            }
        }
    }

    /// Applies an acknowledgement.
    fn apply_ack(&mut self, ack: ClientAck) -> Result<(), PartitionError> {
        // A subscription that was taken over, or whose member lost the partition, no longer
        // counts for the group: its acks are refused, not applied.
        if self.setup.group.is_some() {
            check_owner(&self.state, &self.setup)?;
        }
        self.with_ledger(|e, l| e.on_ack(l, ack, clock_ms()));
        Ok(())
    }

    /// A dead-letter write finished.
    fn dead_lettered(&mut self, (ranges, written): Written) {
        self.with_ledger(|e, l| e.on_dead_lettered(l, &ranges, written, clock_ms()));
    }

    /// Runs the engine on the ledger, locked; then, if the ledger changed, marks it dirty in
    /// the offsets store (under the ledger's lock: no broker-wide lock, design.md §12), and
    /// moves the in-flight gauge with the window.
    fn with_ledger<R>(&mut self, f: impl FnOnce(&mut Engine, &mut AckLedger) -> R) -> R {
        let Active { setup, engine, epoch, .. } = self;
        let mut l = setup.ledger.lock();
        let r = f(engine, &mut l);
        if engine.take_dirty() {
            if let Some((key, _)) = &setup.group {
                *epoch = setup.store.mark_dirty_locked(key, &mut l);
            }
        }
        drop(l);
        let now = self.engine.in_flight_bytes();
        if now != self.counted {
            if now > self.counted {
                self.inflight.increment((now - self.counted) as f64);
            } else {
                self.inflight.decrement((self.counted - now) as f64);
            }
            self.counted = now;
        }
        r
    }

    /// Makes the group's ledger durable up to the change of `epoch` (with everything else
    /// dirty in the offsets store, one fsync, shared with concurrent waiters). Fails the
    /// subscription if the store cannot write.
    async fn write_ledger(&self, epoch: u64) -> Result<(), PartitionError> {
        let store = self.setup.store.clone();
        tokio::task::spawn_blocking(move || store.flush_to_blocking(epoch))
            .await
            .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| PartitionError::new(e.code(), format!("recording deliveries: {e}")))
    }

    /// The batches at `position`, up to `max` bytes: the read started ahead when it matches,
    /// else a fresh read.
    async fn read_next(
        &mut self,
        p: &Arc<Partition>,
        position: u64,
        max: usize,
    ) -> Result<Vec<Bytes>, PartitionError> {
        self.held.clear();
        if let Some(mut ahead) = self.read_ahead.take() {
            // A failed read ahead (retention deleted the segment meanwhile, say) is repeated,
            // so the error the subscription reports is a current one.
            if ahead.offset == position && ahead.max_bytes <= max {
                if let Ok(Ok(Some((bytes, permits)))) = (&mut ahead.task).await {
                    self.held = permits;
                    return Ok(if bytes.is_empty() { Vec::new() } else { vec![bytes] });
                }
            }
        }
        if let Some(parts) = p.read_cached(position, max) {
            return Ok(parts); // shared with the tail cache: no memory of its own
        }
        // From disk, counted before it is read: a client that stops reading its deliveries
        // stalls here, not the broker's memory.
        match p.read_counted(position, max, &self.budget, true).await? {
            Some((bytes, permits)) => {
                self.held = permits;
                Ok(if bytes.is_empty() { Vec::new() } else { vec![bytes] })
            }
            None => Ok(Vec::new()),
        }
    }

    /// Starts reading the delivery at `next` (up to `max_bytes`) from disk, when there is more
    /// below `high` that the tail cache cannot serve and the window leaves room for it. The
    /// window's room only grows until the next delivery, so the read ahead fits it when its
    /// turn comes.
    fn start_read_ahead(&mut self, p: &Arc<Partition>, next: u64, max_bytes: u64, high: u64) {
        if next >= high || max_bytes < MIN_READ_AHEAD_BYTES || p.is_cached(next) {
            return;
        }
        let max_bytes = max_bytes as usize;
        // Only with budget to spare: a read ahead is an optimisation, never worth waiting for.
        let (p, budget) = (p.clone(), self.budget.clone());
        let task = tokio::spawn(async move { p.read_counted(next, max_bytes, &budget, false).await });
        self.read_ahead = Some(ReadAhead { offset: next, max_bytes, task });
    }
}

/// The head of a delivery: plain `Deliver` when every record of the batches is handed out
/// for the first time, else `DeliverSome` naming the records and their counts.
fn head(high: u64, d: &Delivery) -> Bytes {
    if d.whole {
        return deliver_head(high, d.bytes as usize);
    }
    let ranges: Vec<DeliveryRange> = d
        .pieces
        .iter()
        .map(|p: &Piece| DeliveryRange { start: p.range.start, end: p.range.end, delivery_count: p.count })
        .collect();
    deliver_some_head(high, &ranges, d.bytes as usize)
}

/// Drops the batches at or past `end` from `parts` (whole batches as read, in offset order),
/// slicing a buffer that holds several without copying it; leaves `parts` alone if a batch
/// cannot be walked.
fn trim_from(parts: &mut Vec<Bytes>, end: u64) {
    for i in 0..parts.len() {
        let mut kept = 0;
        for span in Batches::new(&parts[i]) {
            match span {
                Ok(b) if b.header.base_offset < end => kept += b.bytes.len(),
                Ok(_) => break,
                Err(_) => return, // not ours to judge here: the client reports it
            }
        }
        if kept < parts[i].len() {
            parts[i].truncate(kept);
            parts.truncate(if kept == 0 { i } else { i + 1 });
            return;
        }
    }
}

/// The first batch's base offset and the offset after the last batch, of a read.
struct Extent {
    base: u64,
    next: u64,
}

fn extent(parts: &[Bytes]) -> Option<Extent> {
    let mut ext: Option<Extent> = None;
    for batches in parts {
        for span in Batches::new(batches) {
            let h = span.ok()?.header;
            match &mut ext {
                Some(e) => e.next = h.next_offset(),
                None => ext = Some(Extent { base: h.base_offset, next: h.next_offset() }),
            }
        }
    }
    ext
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::batch::BatchBuilder;

    /// A batch of one record at `offset` (a control batch if `control`).
    fn batch(offset: u64, control: bool) -> Bytes {
        let mut b = BatchBuilder::new(64);
        if control {
            b = b.control();
        }
        b.push(0, None, b"v", &[]);
        // The base offset is outside the CRC: set it as a log does.
        let mut bytes = b.finish().to_vec();
        bytes[..8].copy_from_slice(&offset.to_be_bytes());
        Bytes::from(bytes)
    }

    fn bases(parts: &[Bytes]) -> Vec<u64> {
        parts
            .iter()
            .flat_map(|p| {
                Batches::new(p)
                    .map(|b| b.map(|b| b.header.base_offset).unwrap_or(u64::MAX))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn a_redelivery_carries_no_batch_past_what_it_hands_out_again() {
        // As read from disk: one buffer of back-to-back batches, 2162..2171 and the new
        // leader's control batch at 2172 (the fault run's case); 2162 alone is handed out again.
        let disk: Vec<u8> =
            (2162..2172).map(|o| batch(o, false)).chain([batch(2172, true)]).flatten().collect();
        let mut parts = vec![Bytes::from(disk)];
        trim_from(&mut parts, 2163);
        assert_eq!(bases(&parts), vec![2162]);
        // As read from the tail cache: a buffer per batch.
        let mut parts: Vec<Bytes> =
            (2162..2172).map(|o| batch(o, false)).chain([batch(2172, true)]).collect();
        trim_from(&mut parts, 2165);
        assert_eq!(bases(&parts), vec![2162, 2163, 2164]);
        // Nothing past the end: untouched.
        trim_from(&mut parts, 3000);
        assert_eq!(bases(&parts), vec![2162, 2163, 2164]);
    }
}
