//! The producer: per-partition batching with linger and a byte limit, pipelined produce
//! requests on one stream per partition, and retries on a new connection after a loss.
//!
//! Delivery is at-least-once: a batch whose acknowledgement was lost with the connection is
//! sent again (idempotent sequence numbers arrive with issue 4 and make it exactly-once).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::BatchBuilder;
use quiver_protocol::limits::MAX_BATCH_BYTES;
use quiver_protocol::message::{Acks, Message};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::connection::{unexpected, Client};
use crate::error::ClientError;
use crate::transport::{write_encoded, FrameReader};

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub acks: Acks,
    /// How long a partition's batch waits for more records before it is sent.
    pub linger: Duration,
    /// A batch is sent once it reaches this size.
    pub max_batch_bytes: usize,
    /// Produce requests a partition may have unacknowledged at once.
    pub max_in_flight: usize,
    /// Bytes of records buffered (queued or in flight) before `send` waits.
    pub buffer_bytes: usize,
    /// How long a record may take, retries included, before it fails.
    pub delivery_timeout: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::Leader,
            linger: Duration::from_millis(5),
            max_batch_bytes: 1024 * 1024,
            max_in_flight: 8,
            buffer_bytes: 64 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(60),
        }
    }
}

/// A record to send.
#[derive(Debug, Clone, Default)]
pub struct ProducerRecord {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
    /// Overrides the partitioner.
    pub partition: Option<u32>,
    /// Create time in ms since the epoch; now if unset.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    pub fn new(value: impl Into<Bytes>) -> Self {
        ProducerRecord { value: value.into(), ..Default::default() }
    }
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }
    pub fn partition(mut self, p: u32) -> Self {
        self.partition = Some(p);
        self
    }

    fn size(&self) -> usize {
        let headers: Vec<(&str, &[u8])> = self.headers.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        BatchBuilder::record_size(self.key.as_deref(), &self.value, &headers)
    }
}

/// Where an acknowledged record landed. `offset` is `None` under `acks = none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: u32,
    pub offset: Option<u64>,
}

/// Resolves when the broker acknowledged the record (or it failed).
#[derive(Debug)]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<Result<RecordMetadata, ClientError>>,
}

impl std::future::Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ClientError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx).poll(cx).map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// Sends records to topics.
///
/// ```no_run
/// # async fn demo() -> Result<(), quiver_client::ClientError> {
/// use quiver_client::{Client, ClientConfig, Producer, ProducerConfig, ProducerRecord};
/// let client = Client::connect(ClientConfig::new("127.0.0.1:7420", "ca.pem")).await?;
/// let producer = Producer::new(client, ProducerConfig::default());
/// let meta = producer.send("orders", ProducerRecord::new("hello").key("customer-7")).await?;
/// println!("stored at partition {} offset {:?}", meta.partition, meta.offset);
/// // Pipelined: queue many, then wait for the acknowledgements.
/// let mut acks = Vec::new();
/// for i in 0..1000 {
///     acks.push(producer.enqueue("orders", ProducerRecord::new(format!("event {i}"))).await?);
/// }
/// for a in acks { a.await?; }
/// producer.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Producer {
    client: Client,
    config: Arc<ProducerConfig>,
    topics: parking_lot::Mutex<HashMap<String, Arc<TopicSender>>>,
    buffer: Arc<Semaphore>,
}

#[derive(Debug)]
struct TopicSender {
    partitions: Vec<mpsc::Sender<Command>>,
    next: AtomicU32,
}

enum Command {
    Record(Pending),
    Flush(oneshot::Sender<()>),
}

struct Pending {
    record: ProducerRecord,
    reply: oneshot::Sender<Result<RecordMetadata, ClientError>>,
    _permit: OwnedSemaphorePermit,
}

impl Producer {
    pub fn new(client: Client, config: ProducerConfig) -> Self {
        let buffer = Arc::new(Semaphore::new(config.buffer_bytes.max(MAX_BATCH_BYTES)));
        Producer { client, config: Arc::new(config), topics: Default::default(), buffer }
    }

    /// Sends one record and waits for its acknowledgement.
    pub async fn send(&self, topic: &str, record: ProducerRecord) -> Result<RecordMetadata, ClientError> {
        self.enqueue(topic, record).await?.await
    }

    /// Queues a record; waits only for buffer space. The returned future resolves on ack.
    pub async fn enqueue(&self, topic: &str, record: ProducerRecord) -> Result<DeliveryFuture, ClientError> {
        let size = record.size();
        if size + quiver_protocol::batch::BATCH_HEADER_BYTES > MAX_BATCH_BYTES {
            return Err(ClientError::Protocol(format!("record of {size} bytes exceeds the batch limit")));
        }
        let sender = self.topic(topic).await?;
        let n = sender.partitions.len() as u32;
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p < n => p,
            (Some(p), _) => {
                return Err(ClientError::Protocol(format!("topic '{topic}' has no partition {p}")))
            }
            (None, Some(key)) => (murmur2(key) & 0x7fff_ffff) % n,
            (None, None) => sender.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let permit =
            self.buffer.clone().acquire_many_owned(size as u32).await.map_err(|_| ClientError::Closed)?;
        let (reply, rx) = oneshot::channel();
        sender.partitions[partition as usize]
            .send(Command::Record(Pending { record, reply, _permit: permit }))
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(DeliveryFuture { rx })
    }

    /// Sends every queued record now and waits until all of them are acknowledged or failed.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let senders: Vec<_> = self.topics.lock().values().cloned().collect();
        let mut waits = Vec::new();
        for s in senders {
            for p in &s.partitions {
                let (tx, rx) = oneshot::channel();
                if p.send(Command::Flush(tx)).await.is_ok() {
                    waits.push(rx);
                }
            }
        }
        for w in waits {
            let _ = w.await;
        }
        Ok(())
    }

    /// Flushes and stops the partition tasks.
    pub async fn close(self) -> Result<(), ClientError> {
        self.flush().await?;
        self.topics.lock().clear();
        Ok(())
    }

    async fn topic(&self, topic: &str) -> Result<Arc<TopicSender>, ClientError> {
        if let Some(t) = self.topics.lock().get(topic) {
            return Ok(t.clone());
        }
        let info = crate::admin::Admin::new(self.client.clone()).describe_topic(topic).await?;
        let mut topics = self.topics.lock();
        if let Some(t) = topics.get(topic) {
            return Ok(t.clone());
        }
        let name: Arc<str> = Arc::from(topic);
        let partitions = (0..info.partitions.len() as u32)
            .map(|p| {
                let (tx, rx) = mpsc::channel(1024);
                let task = PartitionTask::new(self.client.clone(), self.config.clone(), name.clone(), p);
                tokio::spawn(task.run(rx));
                tx
            })
            .collect();
        let sender = Arc::new(TopicSender { partitions, next: AtomicU32::new(0) });
        topics.insert(topic.to_string(), sender.clone());
        Ok(sender)
    }
}

type Reply = oneshot::Sender<Result<RecordMetadata, ClientError>>;

struct InFlight {
    frame: quiver_protocol::message::Encoded,
    replies: Vec<(Reply, OwnedSemaphorePermit)>,
    flushes: Vec<oneshot::Sender<()>>,
    deadline: Instant,
}

struct Open {
    records: Vec<(Reply, OwnedSemaphorePermit)>,
    builder: BatchBuilder,
    linger_until: Instant,
}

struct PartitionTask {
    client: Client,
    config: Arc<ProducerConfig>,
    topic: Arc<str>,
    partition: u32,
    open: Option<Open>,
    in_flight: VecDeque<InFlight>,
    stream: Option<(quinn::SendStream, FrameReader)>,
    /// Delay before the next retry; doubles per consecutive failure, reset by a success.
    backoff: Duration,
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl PartitionTask {
    fn new(client: Client, config: Arc<ProducerConfig>, topic: Arc<str>, partition: u32) -> Self {
        PartitionTask {
            client,
            config,
            topic,
            partition,
            open: None,
            in_flight: VecDeque::new(),
            stream: None,
            backoff: MIN_BACKOFF,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut closing = false;
        loop {
            if closing && self.open.is_none() && self.in_flight.is_empty() {
                return;
            }
            let linger = self.open.as_ref().map(|o| o.linger_until);
            let max_in_flight = self.config.max_in_flight.max(1);
            let accepting = !closing && self.in_flight.len() < max_in_flight;
            let awaiting_acks = self.stream.is_some() && !self.in_flight.is_empty();
            // Waiting for an answer is bounded by the oldest batch's delivery deadline.
            let answer_by = self.in_flight.front().map(|f| f.deadline);
            tokio::select! {
                cmd = rx.recv(), if accepting => match cmd {
                    Some(Command::Record(p)) => self.add(p).await,
                    Some(Command::Flush(done)) => self.flush(done).await,
                    None => { closing = true; self.send_open().await; }
                },
                _ = sleep_until(linger), if linger.is_some() && self.in_flight.len() < max_in_flight => {
                    self.send_open().await
                }
                resp = next_response(&mut self.stream, answer_by), if awaiting_acks => self.on_response(resp).await,
                else => {
                    // Nothing can progress (closing with nothing left, or no stream for what is
                    // in flight): resend what remains, which also expires it when due.
                    if self.in_flight.is_empty() { return; }
                    self.resend_all().await;
                }
            }
        }
    }

    async fn add(&mut self, p: Pending) {
        let headers: Vec<(&str, &[u8])> =
            p.record.headers.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        let size = BatchBuilder::record_size(p.record.key.as_deref(), &p.record.value, &headers);
        if let Some(o) = &self.open {
            if o.builder.size_bytes() + size > self.config.max_batch_bytes.min(MAX_BATCH_BYTES) {
                self.send_open().await;
            }
        }
        let open = self.open.get_or_insert_with(|| Open {
            records: Vec::new(),
            builder: BatchBuilder::new(self.config.max_batch_bytes.min(64 * 1024)),
            linger_until: Instant::now() + self.config.linger,
        });
        let ts = p.record.timestamp_ms.unwrap_or_else(now_ms);
        open.builder.push(ts, p.record.key.as_deref(), &p.record.value, &headers);
        open.records.push((p.reply, p._permit));
        if open.builder.size_bytes() >= self.config.max_batch_bytes || self.config.linger.is_zero() {
            self.send_open().await;
        }
    }

    async fn flush(&mut self, done: oneshot::Sender<()>) {
        self.send_open().await;
        match self.in_flight.back_mut() {
            Some(last) => last.flushes.push(done),
            None => {
                let _ = done.send(());
            }
        }
    }

    /// Sends the open batch, if any.
    async fn send_open(&mut self) {
        let Some(open) = self.open.take() else { return };
        let msg = Message::Produce {
            topic: self.topic.to_string(),
            partition: self.partition,
            acks: self.config.acks,
            batch: open.builder.finish(),
        };
        let flight = InFlight {
            frame: msg.encode(),
            replies: open.records,
            flushes: Vec::new(),
            deadline: Instant::now() + self.config.delivery_timeout,
        };
        let frame = flight.frame.clone();
        self.in_flight.push_back(flight);
        if self.write(frame).await.is_err() {
            self.resend_all().await;
        }
        if self.config.acks == Acks::None {
            // No response will come: the write is all there is.
            while let Some(f) = self.in_flight.pop_front() {
                complete(f, |_| Ok(RecordMetadata { partition: self.partition, offset: None }));
            }
        }
    }

    async fn write(&mut self, frame: quiver_protocol::message::Encoded) -> Result<(), ClientError> {
        if self.stream.is_none() {
            let conn = self.client.connection().await?;
            let timeout = self.client.config().request_timeout;
            let (send, recv) = tokio::time::timeout(timeout, conn.open_bi())
                .await
                .map_err(|_| ClientError::Timeout(timeout.as_millis() as u64))??;
            self.stream = Some((send, FrameReader::new(recv)));
        }
        let Some((send, _)) = self.stream.as_mut() else { return Err(ClientError::Closed) };
        write_encoded(send, frame).await?;
        Ok(())
    }

    async fn on_response(&mut self, resp: Result<Option<Message>, ClientError>) {
        let Some(flight) = self.in_flight.pop_front() else { return };
        let partition = self.partition;
        match resp {
            Ok(Some(Message::ProduceOk { base_offset, .. })) => {
                self.backoff = MIN_BACKOFF;
                complete(flight, |i| Ok(RecordMetadata { partition, offset: Some(base_offset + i as u64) }))
            }
            Ok(Some(Message::Error { code, message })) if !code.is_retriable() => {
                complete(flight, |_| Err(ClientError::Broker { code, message: message.clone() }))
            }
            Ok(Some(Message::Error { .. })) | Ok(None) | Err(_) => {
                // Lost connection, a retriable error or no answer in time: after a pause, every
                // batch in flight goes again, in order.
                self.in_flight.push_front(flight);
                tokio::time::sleep(self.backoff).await;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                self.resend_all().await;
            }
            Ok(Some(other)) => complete(flight, |_| Err(unexpected(other.clone()))),
        }
    }

    /// Reconnects and resends every in-flight batch, in order, until each batch's deadline.
    async fn resend_all(&mut self) {
        loop {
            self.stream = None;
            let now = Instant::now();
            while self.in_flight.front().is_some_and(|f| f.deadline <= now) {
                if let Some(f) = self.in_flight.pop_front() {
                    let timeout = self.config.delivery_timeout.as_millis() as u64;
                    complete(f, |_| Err(ClientError::Timeout(timeout)));
                }
            }
            if self.in_flight.is_empty() {
                return;
            }
            let frames: Vec<_> = self.in_flight.iter().map(|f| f.frame.clone()).collect();
            let mut ok = true;
            for frame in frames {
                if let Err(e) = self.write(frame).await {
                    tracing::debug!(topic = %self.topic, partition = self.partition, "resend failed: {e}");
                    ok = false;
                    break;
                }
            }
            if ok {
                return;
            }
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn complete(flight: InFlight, result: impl Fn(usize) -> Result<RecordMetadata, ClientError>) {
    for (i, (reply, _permit)) in flight.replies.into_iter().enumerate() {
        let _ = reply.send(result(i));
    }
    for f in flight.flushes {
        let _ = f.send(());
    }
}

async fn next_response(
    stream: &mut Option<(quinn::SendStream, FrameReader)>,
    by: Option<Instant>,
) -> Result<Option<Message>, ClientError> {
    let Some((_, reader)) = stream else { return std::future::pending().await };
    match by {
        Some(by) => match tokio::time::timeout_at(by, reader.next()).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ClientError::Timeout(0)),
        },
        None => Ok(reader.next().await?),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Kafka's murmur2, so keys map to the same partitions as in Kafka clients.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    let len = data.len();
    let mut h = SEED ^ len as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::murmur2;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32, -58897971);
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }
}
