//! One partition's subscription: the session loop (deliveries in, acknowledgements out) and
//! the reconnect policy around it.

use std::sync::Arc;
use std::time::Duration;

use quiver_protocol::message::{MemberRef, Message, RedeliveryPolicy, StartPosition, Subscribe};
use quiver_protocol::ErrorCode;
use tokio::sync::mpsc;

use super::acks::AckState;
use super::membership::RoundRequest;
use super::{ConsumedMessage, ConsumerConfig};
use crate::admin::Admin;
use crate::connection::{unexpected, Client};
use crate::error::ClientError;
use quiver_transport::{write_message, FrameReader};

pub(super) struct PartitionConsumer {
    pub(super) client: Client,
    pub(super) config: ConsumerConfig,
    pub(super) topic: Arc<str>,
    pub(super) partition: u32,
    pub(super) acks: Arc<AckState>,
    pub(super) member: Option<MemberRef>,
    pub(super) tx: mpsc::Sender<Result<Vec<ConsumedMessage>, ClientError>>,
    pub(super) rounds: mpsc::Sender<RoundRequest>,
}

impl PartitionConsumer {
    pub(super) async fn run(self, ready: tokio::sync::oneshot::Sender<Result<(), ClientError>>) {
        let mut ready = Some(ready);
        let mut start = self.config.start;
        let mut backoff = Duration::from_millis(50);
        // The first subscription reports a lasting refusal (no such topic, a bad offset) at
        // once, and rides out a passing one (an election, a broker just killed) this long.
        let first_deadline = tokio::time::Instant::now() + self.client.config().request_timeout;
        loop {
            let result = self.session(start, &mut ready).await;
            match result {
                Ok(()) => return, // application went away
                Err(e)
                    if ready.is_none()
                        && self.member.is_some()
                        && e.code() == Some(ErrorCode::FencedMember) =>
                {
                    // The group moved on (a rebalance, or the broker restarted and forgot the
                    // member), or a broker answered that has not taken the group over yet (its
                    // membership survives a coordinator's failover). A membership round at once
                    // tells which: a rejoin or a revocation stops this task; a member that keeps
                    // the partition subscribes again here, with what it acknowledged so far
                    // (returning would leave an assigned partition that nothing reads).
                    tracing::debug!(topic = %self.topic, partition = self.partition, "partition fenced ({e}); asking the membership task");
                    let (reply, done) = tokio::sync::oneshot::channel();
                    if self.rounds.send(Some(reply)).await.is_err() {
                        return;
                    }
                    let _ = tokio::time::timeout(self.client.config().request_timeout * 3, done).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    start = StartPosition::Offset(self.acks.floor());
                }
                Err(e)
                    if ready.is_none()
                        && self.config.group.is_none()
                        && e.code() == Some(ErrorCode::OffsetOutOfRange)
                        && matches!(start, StartPosition::Offset(_)) =>
                {
                    if let Some(next) = self.resume_within_log(&e).await {
                        start = StartPosition::Offset(next);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e)
                    if ready.is_some()
                        && e.is_retriable()
                        && tokio::time::Instant::now() + backoff < first_deadline =>
                {
                    tracing::debug!(topic = %self.topic, partition = self.partition, "first subscription failed ({e}); trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) if ready.is_some() || !e.is_retriable() => {
                    match ready.take() {
                        Some(r) => {
                            let _ = r.send(Err(e));
                        }
                        None => {
                            let _ = self.tx.send(Err(e)).await;
                        }
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(topic = %self.topic, partition = self.partition, "subscription lost ({e}); resubscribing");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    // Resume where the application's acknowledgements stand.
                    let floor = self.acks.floor();
                    start = StartPosition::Offset(floor);
                    if let Some(g) = &self.config.group {
                        let _ = Admin::new(self.client.clone())
                            .commit_offset_as(g, &self.topic, self.partition, floor, self.member.clone())
                            .await;
                    }
                }
            }
        }
    }

    /// Where to resume after the broker refused the ack floor as out of range: retention deleted
    /// it while the connection was down (or a broker that lost unsynced records has not reached
    /// it). The nearest end of the partition, as a Kafka consumer resets; what lies below
    /// counts as settled. `None` when the partition's range could not be read.
    async fn resume_within_log(&self, refused: &ClientError) -> Option<u64> {
        let floor = self.acks.floor();
        let info = match Admin::new(self.client.clone()).describe_topic(&self.topic).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!("describing {} to resume failed: {e}", self.topic);
                return None;
            }
        };
        let p = info.partitions.iter().find(|p| p.partition == self.partition)?;
        let next = floor.clamp(p.log_start_offset, p.high_watermark.max(p.log_start_offset));
        if next > floor {
            let gone = floor..next;
            self.acks.inner.lock().settle(vec![gone]);
        }
        tracing::warn!(topic = %self.topic, partition = self.partition, "cannot resume at offset {floor} ({refused}); going on from {next}");
        Some(next)
    }

    /// One subscription stream until it fails. `Ok` means the application dropped the consumer.
    async fn session(
        &self,
        start: StartPosition,
        ready: &mut Option<tokio::sync::oneshot::Sender<Result<(), ClientError>>>,
    ) -> Result<(), ClientError> {
        let conn = self.client.connection().await?;
        let (mut send, recv) = conn.open_bi().await?;
        let mut reader = FrameReader::new(recv);
        let sub = Subscribe {
            topic: self.topic.to_string(),
            partition: self.partition,
            group: self.config.group.clone(),
            member: self.member.clone(),
            start,
            window_messages: self.config.window_messages,
            window_bytes: self.config.window_bytes,
            policy: RedeliveryPolicy {
                ack_wait_ms: self
                    .config
                    .ack_deadline
                    .map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1))
                    .unwrap_or(0),
                max_deliveries: self.config.max_deliveries.unwrap_or(0),
                dead_letter_topic: self.config.dead_letter_topic.clone(),
            },
            group_position: None,
        };
        write_message(&mut send, &Message::Subscribe(sub)).await?;
        let (start_offset, high_watermark) = match reader.next().await? {
            Some(Message::Subscribed { start_offset, high_watermark, .. }) => (start_offset, high_watermark),
            Some(Message::Error { code, message, .. }) => return Err(ClientError::Broker { code, message }),
            Some(other) => return Err(unexpected(other)),
            None => return Err(ClientError::ConnectionLost("subscription closed".into())),
        };
        let go_on = self.acks.inner.lock().reconcile(
            start_offset,
            high_watermark,
            ready.is_some(),
            &self.topic,
            self.partition,
        );
        if !go_on {
            let _ = send.finish();
            return Err(ClientError::ConnectionLost(format!(
                "the log there ends at {high_watermark}, before what was handed out"
            )));
        }
        if let Some(r) = ready.take() {
            let _ = r.send(Ok(()));
        }
        // Tell the broker at once what was acknowledged before this session (after a reconnect).
        let mut sent = None;
        // Ack at once when about half the window (in messages or, by the average message size so
        // far, in bytes) is waiting for it, so the broker never stalls on a full window.
        let (mut seen_bytes, mut seen_messages) = (0u64, 0u64);
        let half_window_messages = u64::from(self.config.window_messages / 2).max(1);
        let half_window_bytes = u64::from(self.config.window_bytes / 2).max(1);
        let mut tick = tokio::time::interval(self.config.ack_interval.max(Duration::from_millis(1)));
        loop {
            let mut on_tick = false;
            tokio::select! {
                frame = reader.next() => match frame? {
                    Some(Message::Deliver { batches, .. }) => {
                        seen_bytes += batches.len() as u64;
                        match self.deliver(batches, None).await? {
                            Some(count) => seen_messages += count,
                            None => return Ok(()),
                        }
                    }
                    Some(Message::DeliverSome { batches, ranges, .. }) => {
                        seen_bytes += batches.len() as u64;
                        match self.deliver(batches, Some(&ranges)).await? {
                            Some(count) => seen_messages += count,
                            None => return Ok(()),
                        }
                    }
                    Some(Message::Settled { ranges }) => {
                        // Dead-lettered by the broker, or acknowledged by the group before:
                        // acknowledged as far as we are concerned.
                        self.acks.inner.lock().settle(ranges);
                    }
                    Some(Message::Error { code, message, .. }) => return Err(ClientError::Broker { code, message }),
                    Some(other) => return Err(unexpected(other)),
                    None => return Err(ClientError::ConnectionLost("subscription closed by the broker".into())),
                },
                _ = self.acks.changed.notified() => {}
                _ = tick.tick() => on_tick = true,
            }
            // Ack on the tick, or at once when half the window is waiting for it; nacks at once.
            let average = (seen_bytes / seen_messages.max(1)).max(1);
            let eager_gap = half_window_messages.min(half_window_bytes / average).max(1);
            let (frames, now) = self.acks.inner.lock().take_frames(sent, on_tick, eager_gap);
            for frame in frames {
                write_message(&mut send, &frame).await?;
            }
            sent = Some(now);
        }
    }
}
