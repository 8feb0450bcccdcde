//! Subscription streams: push `Deliver` frames from a start position, within the client's
//! delivery window and QUIC's stream flow control, and take acknowledgements back. Every
//! subscription keeps an `AckLedger` (per message acks, delivery counts, deadlines); a group's
//! ledger outlives its subscriptions and is persisted with the group's offsets (design.md §12).

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use quiver_client::transport::{write_message, FrameReader};
use quiver_protocol::batch::{BatchBuilder, BatchHeader, BatchSplitter, RecordIter};
use quiver_protocol::delivery::DeliveryWindow;
use quiver_protocol::ledger::{
    AckLedger, Piece, DELIVERY_COUNT, NO_DEADLINE, ORIGIN_OFFSET, ORIGIN_PARTITION, ORIGIN_TOPIC,
};
use quiver_protocol::message::{
    deliver_head, deliver_some_head, validate_group_name, DeliveryRange, Message, RedeliveryPolicy,
    StartPosition, Subscribe,
};
use quiver_protocol::{ErrorCode, TopicConfig};
use tokio::sync::mpsc;

use crate::offsets::{OffsetKey, SharedLedger};
use crate::partition::{Partition, PartitionError};
use crate::server::BrokerState;

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
}

/// An acknowledgement frame from the client.
enum ClientAck {
    /// Everything below the floor, and the ranges, are acknowledged.
    Acked(u64, Vec<Range<u64>>),
    Nack(u64, u32),
}

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
    let p = setup.partition.clone();
    let subscribed = Message::Subscribed {
        start_offset: setup.start,
        log_start_offset: p.log_start_offset(),
        high_watermark: p.high_watermark(),
    };
    if write_message(&mut send, &subscribed).await.is_err() {
        release(&state, &setup);
        return;
    }
    tracing::debug!(topic = %p.topic, partition = p.id, start = setup.start, group = ?sub.group, "subscription started");
    metrics::gauge!("quiver_subscriptions").increment(1.0);
    let (ack_tx, ack_rx) = mpsc::channel(16);
    let acks = tokio::spawn(read_acks(reader, ack_tx));
    let window_bytes = u64::from(sub.window_bytes.clamp(1, state.config.max_window_bytes));
    let mut window = DeliveryWindow::new(setup.start, window_bytes, u64::from(sub.window_messages.max(1)));
    let mut session = Session { state: &state, setup: &setup, send: &mut send, window: &mut window };
    if let Err(e) = session.push(ack_rx).await {
        let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
    }
    metrics::gauge!("quiver_inflight_delivery_bytes").decrement(window.in_flight_bytes() as f64);
    let _ = send.finish();
    acks.abort();
    release(&state, &setup);
    metrics::gauge!("quiver_subscriptions").decrement(1.0);
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
        state.groups.check_owner(g, &sub.topic, sub.member.as_ref(), sub.partition)?;
    }
    let (log_start, hw) = (partition.log_start_offset(), partition.high_watermark());
    // Retention can move the log start past a high watermark that waits for an fsync.
    let hw = hw.max(log_start);
    let committed = key.as_ref().and_then(|k| state.offsets.get(k));
    let start = match (committed, sub.start) {
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
    // Only now, with nothing left to fail, does a group subscription take the partition over
    // (single active consumer per partition until group membership arrives).
    let (group, ledger) = match key {
        Some(key) => {
            let generation = state.next_generation.fetch_add(1, Ordering::Relaxed);
            state.group_owners.insert(key.clone(), generation);
            let ledger = state.offsets.ledger(&key, start);
            {
                let mut l = ledger.lock();
                // What an earlier session handed out and did not get acknowledged is handed out
                // again by this one, with higher delivery counts.
                l.end_session();
                if start > l.floor() {
                    l.commit(start); // retention removed what the group had not consumed
                } else if start < l.floor() {
                    // The log is shorter than the group's position (a crash lost unsynced
                    // records, whose offsets are reused): what the ledger knows is void.
                    l.reset(start);
                }
            }
            (Some((key, generation)), ledger)
        }
        None => (None, Arc::new(Mutex::new(AckLedger::new(start)))),
    };
    let member = sub.group.clone().zip(sub.member.clone());
    Ok(Setup { partition, start, group, member, ledger, policy: sub.policy.clone() })
}

fn release(state: &BrokerState, setup: &Setup) {
    if let Some((key, generation)) = &setup.group {
        if state.group_owners.remove_if(key, |_, g| g == generation).is_some() {
            setup.ledger.lock().end_session();
        }
    }
}

/// Forwards the client's acknowledgements; ends when the client's half ends or misbehaves.
async fn read_acks(mut reader: FrameReader, acks: mpsc::Sender<ClientAck>) {
    loop {
        let ack = match reader.next().await {
            Ok(Some(Message::Ack { next_offset })) => ClientAck::Acked(next_offset, vec![]),
            Ok(Some(Message::AckRanges { floor, ranges })) => ClientAck::Acked(floor, ranges),
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
    state: &'a BrokerState,
    setup: &'a Setup,
    send: &'a mut quinn::SendStream,
    window: &'a mut DeliveryWindow,
}

impl Session<'_> {
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
            while let Ok(ack) = acks.try_recv() {
                deadlines |= self.apply_ack(ack)?;
            }
            let high = *hw.borrow_and_update();
            position = position.max(self.setup.ledger.lock().floor());
            if position < high && self.window.has_room() {
                let max =
                    self.window.room_bytes().min(u64::from(self.state.config.max_deliver_bytes)) as usize;
                let mut parts = p.read_parts(position, max).await?;
                if let Some(ext) = extent(&parts) {
                    self.check_not_taken_over()?;
                    let pieces = self.setup.ledger.lock().deliver(position..ext.next, self.due());
                    let bytes: u64 = parts.iter().map(|b| b.len() as u64).sum();
                    let messages: u64 = pieces.iter().map(|p| p.range.end - p.range.start).sum();
                    if !pieces.is_empty() {
                        let whole =
                            ext.base == position && pieces == [Piece { range: position..ext.next, count: 1 }];
                        // Head, then the batches as they are (cached or read), without a copy.
                        parts.insert(0, head(high, &pieces, bytes, whole));
                        if self.send.write_all_chunks(&mut parts).await.is_err() {
                            return Ok(()); // the client went away
                        }
                        messages_out.increment(messages);
                        bytes_out.increment(bytes);
                        self.window.on_delivered(ext.next, bytes, messages);
                        metrics::gauge!("quiver_inflight_delivery_bytes").increment(bytes as f64);
                    }
                    position = ext.next;
                    continue;
                }
            }
            let next_due = if deadlines { self.setup.ledger.lock().next_due() } else { None };
            let due_in = next_due.map(|at| std::time::Duration::from_millis(at.saturating_sub(clock_ms())));
            tokio::select! {
                _ = fence_check.tick(), if self.setup.member.is_some() => self.check_owner()?,
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

    /// Applies an acknowledgement; returns whether it set a deadline (a nack).
    fn apply_ack(&mut self, ack: ClientAck) -> Result<bool, PartitionError> {
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
        if !moved {
            return Ok(nacked);
        }
        let before = self.window.in_flight_bytes();
        let _ = self.window.on_ack(floor.min(self.window.delivered()));
        metrics::gauge!("quiver_inflight_delivery_bytes")
            .decrement(before.saturating_sub(self.window.in_flight_bytes()) as f64);
        if let Some((key, _)) = &self.setup.group {
            // A subscription that was taken over, or whose member lost the partition, no longer
            // counts for the group.
            self.check_owner()?;
            self.state.offsets.mark_dirty(key);
        }
        Ok(nacked)
    }

    /// Fails once this subscription no longer owns its group's partition: taken over by a
    /// newer subscription, or its member lost the partition.
    fn check_owner(&self) -> Result<(), PartitionError> {
        self.check_not_taken_over()?;
        still_owner(self.state, self.setup)
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
                if at < p.log_start_offset() {
                    // Retention removed them: nothing left to deliver.
                    at = p.log_start_offset();
                    continue;
                }
                let max = self.state.config.max_deliver_bytes as usize;
                let mut parts = p.read_parts(at, max).await?;
                let Some(ext) = extent(&parts) else { break };
                let end = ext.next.min(range.end);
                let max_deliveries = self.setup.policy.max_deliveries;
                let dead = self.setup.ledger.lock().exhausted(at..end, max_deliveries);
                if !dead.is_empty() {
                    self.dead_letter(&parts, &dead).await?;
                    {
                        let mut l = self.setup.ledger.lock();
                        for r in &dead {
                            l.ack(r.clone());
                        }
                    }
                    if write_message(self.send, &Message::Settled { ranges: dead }).await.is_err() {
                        return Ok(false);
                    }
                    if let Some((key, _)) = &self.setup.group {
                        self.state.offsets.mark_dirty(key);
                    }
                }
                let pieces = self.setup.ledger.lock().deliver(at..end, self.due());
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

    /// Writes the records of `dead` (found in `parts`) to the dead-letter topic, with headers
    /// naming their origin, and waits until they are appended there.
    async fn dead_letter(&self, parts: &[Bytes], dead: &[Range<u64>]) -> Result<(), PartitionError> {
        let p = &self.setup.partition;
        let name = self.setup.policy.dead_letter_topic.clone().unwrap_or_else(|| format!("{}.dlq", p.topic));
        let topic = match self.state.topics.get(&name) {
            Ok(t) => t,
            Err(_) => {
                let config = TopicConfig::default();
                match self.state.topics.create(&name, 1, config, self.state.config.max_partitions_total).await
                {
                    Ok(t) => t,
                    Err(e) if e.code == ErrorCode::TopicExists => self.state.topics.get(&name)?,
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
        let batch = bytes::BytesMut::from(&builder.finish()[..]);
        let appended = target.submit(batch).await?;
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

/// How often a group member's subscription re-checks that it still owns the partition.
const FENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

fn still_owner(state: &BrokerState, setup: &Setup) -> Result<(), PartitionError> {
    match &setup.member {
        Some((group, member)) => {
            state.groups.check_owner(group, &setup.partition.topic, Some(member), setup.partition.id)
        }
        None => Ok(()),
    }
}

/// The first batch's base offset, the offset after the last batch, and the record count, of
/// a read.
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
