//! The consumer: one subscription stream per partition, merged into one `Stream` of messages.
//!
//! Each partition tracks what the application acknowledged; the contiguous acknowledged prefix
//! (the ack floor) is sent to the broker as a cumulative `Ack`, which frees the delivery window
//! and, for a group, becomes the group's committed offset (persisted lazily by the broker, or
//! at once with `commit`). After a lost connection each partition re-subscribes from its ack
//! floor and drops what it already handed out, so the application sees no duplicates from a
//! reconnect within one consumer.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use parking_lot::Mutex;
use quiver_protocol::batch::{BatchSplitter, RecordIter};
use quiver_protocol::message::{Message, StartPosition, Subscribe};
use quiver_protocol::ErrorCode;
use tokio::sync::{mpsc, Notify};

use crate::admin::Admin;
use crate::connection::{unexpected, Client};
use crate::error::ClientError;
use crate::transport::{write_message, FrameReader};

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub topic: String,
    /// With a group, consumption resumes from the group's committed offsets.
    pub group: Option<String>,
    /// Where to start when there is no committed offset.
    pub start: StartPosition,
    /// Partitions to read; all when `None`.
    pub partitions: Option<Vec<u32>>,
    /// Unacknowledged bytes the broker may push per partition.
    pub window_bytes: u32,
    /// Unacknowledged messages the broker may push per partition.
    pub window_messages: u32,
    /// How often acknowledgements are sent to the broker.
    pub ack_interval: Duration,
}

impl ConsumerConfig {
    pub fn new(topic: impl Into<String>) -> Self {
        ConsumerConfig {
            topic: topic.into(),
            group: None,
            start: StartPosition::Latest,
            partitions: None,
            window_bytes: 8 * 1024 * 1024,
            window_messages: 100_000,
            ack_interval: Duration::from_millis(100),
        }
    }
    pub fn group(mut self, g: impl Into<String>) -> Self {
        self.group = Some(g.into());
        self
    }
    pub fn start(mut self, s: StartPosition) -> Self {
        self.start = s;
        self
    }
}

/// A consumed message. Key, value and header values share the delivered buffer (no copy).
#[derive(Debug, Clone)]
pub struct ConsumedMessage {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
    acks: Arc<AckState>,
}

impl ConsumedMessage {
    /// Marks this message processed. Acks may come in any order; the broker learns the
    /// contiguous prefix.
    pub fn ack(&self) {
        self.acks.ack(self.offset);
    }
}

/// Deliveries (from all partitions) queued between the partition tasks and the application.
const DELIVERIES_BUFFERED: usize = 64;

/// Acknowledgements of one partition.
#[derive(Debug)]
struct AckState {
    inner: Mutex<AckFloor>,
    changed: Notify,
}

#[derive(Debug)]
struct AckFloor {
    /// Everything below is acknowledged.
    floor: u64,
    /// Acknowledged offsets above the floor.
    above: BTreeSet<u64>,
    /// Next offset to hand to the application (drops redeliveries after a reconnect).
    next_expected: u64,
}

impl AckState {
    fn new() -> Self {
        AckState {
            inner: Mutex::new(AckFloor { floor: 0, above: BTreeSet::new(), next_expected: 0 }),
            changed: Notify::new(),
        }
    }

    fn ack(&self, offset: u64) {
        let mut a = self.inner.lock();
        if offset < a.floor {
            return;
        }
        if offset == a.floor {
            a.floor += 1;
            while a.above.first() == Some(&a.floor) {
                a.above.pop_first();
                a.floor += 1;
            }
        } else {
            a.above.insert(offset);
        }
        drop(a);
        self.changed.notify_one();
    }

    fn floor(&self) -> u64 {
        self.inner.lock().floor
    }
}

impl AckFloor {
    /// Aligns local state with where a (re)subscription starts.
    fn reconcile(&mut self, start: u64, high_watermark: u64, first: bool, topic: &str, partition: u32) {
        if first {
            // The broker decided where we start (committed offset or start position).
            self.floor = start;
            self.next_expected = start;
            return;
        }
        if self.next_expected > high_watermark.max(start) {
            // The log is shorter than what we handed out: the broker lost unsynced data
            // (durability interval/os) and will reuse those offsets. Start over from the broker.
            tracing::warn!(%topic, partition, handed_out = self.next_expected, high_watermark, "partition log went backwards; resuming from the broker's position");
            self.floor = start;
            self.above.clear();
            self.next_expected = start;
            return;
        }
        if start > self.floor {
            // Retention removed offsets we had not acknowledged: they can never be acked now.
            self.floor = start;
            self.above.retain(|o| *o >= start);
            while self.above.first() == Some(&self.floor) {
                self.above.pop_first();
                self.floor += 1;
            }
        }
        self.next_expected = self.next_expected.max(start);
    }
}

/// A stream of messages from every selected partition of a topic.
///
/// ```no_run
/// # async fn demo() -> Result<(), quiver_client::ClientError> {
/// use futures::StreamExt;
/// use quiver_client::{Client, ClientConfig, Consumer, ConsumerConfig, StartPosition};
/// let client = Client::connect(ClientConfig::new("127.0.0.1:7420", "ca.pem")).await?;
/// let config = ConsumerConfig::new("orders").group("billing").start(StartPosition::Earliest);
/// let mut consumer = Consumer::subscribe(client, config).await?;
/// while let Some(msg) = consumer.next().await {
///     let msg = msg?;
///     println!("{}: {:?}", msg.offset, msg.value);
///     msg.ack();
/// }
/// consumer.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    /// One item per delivery (a whole `Deliver` frame's records), so the channel costs one
    /// send and wake-up per delivery, not per message.
    rx: mpsc::Receiver<Result<Vec<ConsumedMessage>, ClientError>>,
    buffered: std::collections::VecDeque<ConsumedMessage>,
    partitions: Vec<(u32, Arc<AckState>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Consumer {
    /// Looks the topic up (failing fast on an unknown topic) and subscribes to its partitions.
    pub async fn subscribe(client: Client, config: ConsumerConfig) -> Result<Consumer, ClientError> {
        if let Some(g) = &config.group {
            quiver_protocol::message::validate_group_name(g)
                .map_err(|message| ClientError::Broker { code: ErrorCode::InvalidGroup, message })?;
        }
        let info = Admin::new(client.clone()).describe_topic(&config.topic).await?;
        let all: Vec<u32> = info.partitions.iter().map(|p| p.partition).collect();
        let selected = match &config.partitions {
            None => all,
            Some(ps) => {
                if let Some(p) = ps.iter().find(|p| !all.contains(p)) {
                    return Err(ClientError::Broker {
                        code: ErrorCode::UnknownPartition,
                        message: format!("topic '{}' has no partition {p}", config.topic),
                    });
                }
                ps.clone()
            }
        };
        let (tx, rx) = mpsc::channel(DELIVERIES_BUFFERED);
        let topic: Arc<str> = Arc::from(config.topic.as_str());
        let mut partitions = Vec::new();
        let mut tasks = Vec::new();
        let mut ready = Vec::new();
        for p in selected {
            let acks = Arc::new(AckState::new());
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let task = PartitionConsumer {
                client: client.clone(),
                config: config.clone(),
                topic: topic.clone(),
                partition: p,
                acks: acks.clone(),
                tx: tx.clone(),
            };
            tasks.push(tokio::spawn(task.run(ready_tx)));
            partitions.push((p, acks));
            ready.push(ready_rx);
        }
        // Wait until every partition is subscribed, so errors surface here.
        for r in ready {
            match r.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tasks.iter().for_each(|t| t.abort());
                    return Err(e);
                }
                Err(_) => return Err(ClientError::Closed),
            }
        }
        Ok(Consumer { client, config, rx, buffered: Default::default(), partitions, tasks })
    }

    /// Durably commits each partition's ack floor for the group. Without a group, does nothing.
    pub async fn commit(&self) -> Result<(), ClientError> {
        let Some(group) = &self.config.group else { return Ok(()) };
        let admin = Admin::new(self.client.clone());
        for (p, acks) in &self.partitions {
            admin.commit_offset(group, &self.config.topic, *p, acks.floor()).await?;
        }
        Ok(())
    }

    /// Stops the subscriptions.
    pub fn close(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Stream for Consumer {
    type Item = Result<ConsumedMessage, ClientError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(m) = self.buffered.pop_front() {
                return Poll::Ready(Some(Ok(m)));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(batch))) => self.buffered.extend(batch),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

struct PartitionConsumer {
    client: Client,
    config: ConsumerConfig,
    topic: Arc<str>,
    partition: u32,
    acks: Arc<AckState>,
    tx: mpsc::Sender<Result<Vec<ConsumedMessage>, ClientError>>,
}

impl PartitionConsumer {
    async fn run(self, ready: tokio::sync::oneshot::Sender<Result<(), ClientError>>) {
        let mut ready = Some(ready);
        let mut start = self.config.start;
        let mut backoff = Duration::from_millis(50);
        loop {
            let result = self.session(start, &mut ready).await;
            match result {
                Ok(()) => return, // application went away
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
                            .commit_offset(g, &self.topic, self.partition, floor)
                            .await;
                    }
                }
            }
        }
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
            start,
            window_messages: self.config.window_messages,
            window_bytes: self.config.window_bytes,
        };
        write_message(&mut send, &Message::Subscribe(sub)).await?;
        let (start_offset, high_watermark) = match reader.next().await? {
            Some(Message::Subscribed { start_offset, high_watermark, .. }) => (start_offset, high_watermark),
            Some(Message::Error { code, message }) => return Err(ClientError::Broker { code, message }),
            Some(other) => return Err(unexpected(other)),
            None => return Err(ClientError::ConnectionLost("subscription closed".into())),
        };
        self.acks.inner.lock().reconcile(
            start_offset,
            high_watermark,
            ready.is_some(),
            &self.topic,
            self.partition,
        );
        if let Some(r) = ready.take() {
            let _ = r.send(Ok(()));
        }
        // Acks are cumulative and may not pass what this session's broker delivered.
        let mut delivered = start_offset;
        let mut sent_ack = start_offset;
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
                        match self.deliver(batches).await? {
                            Some((next, count)) => {
                                delivered = delivered.max(next);
                                seen_messages += count;
                            }
                            None => return Ok(()),
                        }
                    }
                    Some(Message::Error { code, message }) => return Err(ClientError::Broker { code, message }),
                    Some(other) => return Err(unexpected(other)),
                    None => return Err(ClientError::ConnectionLost("subscription closed by the broker".into())),
                },
                _ = self.acks.changed.notified() => {}
                _ = tick.tick() => on_tick = true,
            }
            // Ack on the tick, or at once when half the window is waiting for it.
            let ack = self.acks.floor().min(delivered);
            let average = (seen_bytes / seen_messages.max(1)).max(1);
            let eager_gap = half_window_messages.min(half_window_bytes / average).max(1);
            if ack > sent_ack && (on_tick || ack - sent_ack >= eager_gap) {
                write_message(&mut send, &Message::Ack { next_offset: ack }).await?;
                sent_ack = ack;
            }
        }
    }

    /// Hands a delivery's records to the application. Returns the offset after the last record
    /// received and the number of records, or `None` once the application is gone.
    async fn deliver(&self, batches: Bytes) -> Result<Option<(u64, u64)>, ClientError> {
        let mut next = 0;
        let mut count = 0;
        let mut out = Vec::new();
        // Only this task moves `next_expected`, so it is read once and written back once.
        let mut expected = self.acks.inner.lock().next_expected;
        for item in BatchSplitter::new(batches) {
            let (header, batch) =
                item.map_err(|e| ClientError::Protocol(format!("corrupt delivery: {e}")))?;
            for record in RecordIter::new(batch, header) {
                let r = record.map_err(|e| ClientError::Protocol(format!("corrupt record: {e}")))?;
                next = r.offset + 1;
                count += 1;
                if r.offset < expected {
                    continue; // the batch began before our position, or a redelivery
                }
                expected = r.offset + 1;
                out.push(ConsumedMessage {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset: r.offset,
                    timestamp_ms: r.timestamp,
                    key: r.key,
                    value: r.value,
                    headers: r.headers,
                    acks: self.acks.clone(),
                });
            }
        }
        self.acks.inner.lock().next_expected = expected;
        if !out.is_empty() && self.tx.send(Ok(out)).await.is_err() {
            return Ok(None);
        }
        Ok(Some((next, count)))
    }
}
