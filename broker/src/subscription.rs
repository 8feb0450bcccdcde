//! Subscription streams: push `Deliver` frames from a start position, within the client's
//! delivery window and QUIC's stream flow control, and take cumulative `Ack`s back.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use quiver_client::transport::{write_message, FrameReader};
use quiver_protocol::batch::BatchHeader;
use quiver_protocol::delivery::DeliveryWindow;
use quiver_protocol::message::{deliver_head, validate_group_name, Message, StartPosition, Subscribe};
use quiver_protocol::ErrorCode;
use tokio::sync::watch;

use crate::offsets::OffsetKey;
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
    let (ack_tx, ack_rx) = watch::channel(setup.start);
    let acks = tokio::spawn(read_acks(reader, ack_tx));
    let window_bytes = u64::from(sub.window_bytes.clamp(1, state.config.max_window_bytes));
    let mut window = DeliveryWindow::new(setup.start, window_bytes, u64::from(sub.window_messages.max(1)));
    if let Err(e) = push(&state, &setup, &mut window, &mut send, ack_rx).await {
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
    let group = key.map(|key| {
        let generation = state.next_generation.fetch_add(1, Ordering::Relaxed);
        state.group_owners.insert(key.clone(), generation);
        (key, generation)
    });
    let member = sub.group.clone().zip(sub.member.clone());
    Ok(Setup { partition, start, group, member })
}

fn release(state: &BrokerState, setup: &Setup) {
    if let Some((key, generation)) = &setup.group {
        state.group_owners.remove_if(key, |_, g| g == generation);
    }
}

/// Forwards the client's cumulative acks; ends when the client's half ends or misbehaves.
async fn read_acks(mut reader: FrameReader, acks: watch::Sender<u64>) {
    loop {
        match reader.next().await {
            Ok(Some(Message::Ack { next_offset })) => {
                acks.send_if_modified(|a| {
                    let moved = next_offset > *a;
                    *a = (*a).max(next_offset);
                    moved
                });
            }
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
        }
    }
}

async fn push(
    state: &BrokerState,
    setup: &Setup,
    window: &mut DeliveryWindow,
    send: &mut quinn::SendStream,
    mut acks: watch::Receiver<u64>,
) -> Result<(), PartitionError> {
    let p = &setup.partition;
    let messages_out = metrics::counter!("quiver_messages_out_total", "topic" => p.topic.to_string());
    let bytes_out = metrics::counter!("quiver_bytes_out_total", "topic" => p.topic.to_string());
    let mut hw = p.watch_high_watermark();
    let mut fence_check = tokio::time::interval(FENCE_CHECK);
    let mut position = setup.start;
    loop {
        if acks.has_changed().unwrap_or(false) {
            apply_ack(state, setup, window, *acks.borrow_and_update())?;
        }
        let high = *hw.borrow_and_update();
        if position < high && window.has_room() {
            let max = window.room_bytes().min(u64::from(state.config.max_deliver_bytes)) as usize;
            let mut parts = p.read_parts(position, max).await?;
            if let Some((next, messages)) = extent(&parts) {
                let bytes: u64 = parts.iter().map(|b| b.len() as u64).sum();
                // Head, then the batches as they are (cached or read), without a copy.
                parts.insert(0, deliver_head(high, bytes as usize));
                if send.write_all_chunks(&mut parts).await.is_err() {
                    return Ok(()); // the client went away
                }
                messages_out.increment(messages);
                bytes_out.increment(bytes);
                window.on_delivered(next, bytes, messages);
                metrics::gauge!("quiver_inflight_delivery_bytes").increment(bytes as f64);
                position = next;
                continue;
            }
        }
        tokio::select! {
            _ = fence_check.tick(), if setup.member.is_some() => still_owner(state, setup)?,
            r = hw.changed() => if r.is_err() { return Ok(()) },
            r = acks.changed() => match r {
                Ok(()) => apply_ack(state, setup, window, *acks.borrow_and_update())?,
                Err(_) => return Ok(()), // the client's half ended: unsubscribe
            },
            _ = state.shutdown.cancelled() => return Err(PartitionError::new(ErrorCode::ShuttingDown, "broker shutting down")),
        }
    }
}

fn apply_ack(
    state: &BrokerState,
    setup: &Setup,
    window: &mut DeliveryWindow,
    next: u64,
) -> Result<(), PartitionError> {
    let before = window.in_flight_bytes();
    let moved = window.on_ack(next).map_err(|e| PartitionError::new(ErrorCode::Malformed, e.to_string()))?;
    metrics::gauge!("quiver_inflight_delivery_bytes")
        .decrement(before.saturating_sub(window.in_flight_bytes()) as f64);
    if let (true, Some((key, generation))) = (moved, &setup.group) {
        // A subscription that was taken over, or whose member lost the partition, no longer
        // moves the group's offset.
        still_owner(state, setup)?;
        if state.group_owners.get(key).map(|g| *g == *generation).unwrap_or(false) {
            state.offsets.set_lazy_max(key.clone(), next);
        }
    }
    Ok(())
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

/// The offset after the last batch, and the record count, of a read.
fn extent(parts: &[bytes::Bytes]) -> Option<(u64, u64)> {
    let mut last = None;
    let mut messages = 0;
    for batches in parts {
        let mut pos = 0;
        while pos < batches.len() {
            let h = BatchHeader::parse(&batches[pos..]).ok()?;
            pos += h.total_len();
            messages += u64::from(h.records_count);
            last = Some(h.next_offset());
        }
    }
    last.map(|n| (n, messages))
}
