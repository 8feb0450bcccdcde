//! The producer: records are appended under a short lock into a per-partition accumulator
//! (Kafka's RecordAccumulator design), so `enqueue` costs a copy into the open batch and no
//! channel send or task wake-up per record. One sender task per partition closes batches when
//! they are full or their linger expires, pipelines them as produce requests on one stream,
//! completes every record of a batch at once from the batch's acknowledgement, and resends
//! in order on a new connection after a loss.
//!
//! A batch whose acknowledgement was lost with the connection is sent again. With
//! `idempotent` (the default) each batch carries the producer's id and the sequence number
//! of its first record in the partition, and the broker answers a batch it already wrote
//! with the original offsets: each record is written once. Without it, delivery is
//! at-least-once.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::{BatchBuilder, ProducerIdentity};
use quiver_protocol::limits::MAX_BATCH_BYTES;
use quiver_protocol::message::{Acks, Encoded, Message};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::time::Instant;

use crate::connection::{unexpected, Client};
use crate::error::ClientError;
use quiver_transport::{write_encoded, FrameReader};

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
    /// How long a record may take, from `send`/`enqueue` to its acknowledgement, waiting for
    /// an in-flight slot and retries included, before it fails.
    pub delivery_timeout: Duration,
    /// Number each partition's records so the broker writes a retried batch only once. Only
    /// with `acks = leader`: with `acks = none` nothing tells the producer that a batch failed,
    /// and every later batch of the partition would then be refused as a sequence gap, unseen
    /// (Kafka likewise requires acknowledgements for idempotence).
    pub idempotent: bool,
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
            idempotent: true,
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
}

/// Where an acknowledged record landed. `offset` is `None` under `acks = none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: u32,
    pub offset: Option<u64>,
}

/// The shared outcome of one batch: every record's future reads it.
#[derive(Debug, Default)]
struct BatchCompletion {
    /// Base offset (`None` under acks = none) or the error.
    result: OnceLock<Result<Option<u64>, ClientError>>,
    wakers: parking_lot::Mutex<Vec<Option<Waker>>>,
}

impl BatchCompletion {
    fn complete(&self, result: Result<Option<u64>, ClientError>) {
        let _ = self.result.set(result);
        let wakers = std::mem::take(&mut *self.wakers.lock());
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }
}

/// Resolves when the broker acknowledged the record (or it failed).
#[derive(Debug)]
pub struct DeliveryFuture {
    completion: Arc<BatchCompletion>,
    index: u32,
    partition: u32,
    /// Our slot in the completion's waker list, once registered.
    slot: Option<usize>,
}

impl DeliveryFuture {
    /// The partition the record was assigned to.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    fn output(&self, r: &Result<Option<u64>, ClientError>) -> Result<RecordMetadata, ClientError> {
        match r {
            Ok(base) => {
                Ok(RecordMetadata { partition: self.partition, offset: base.map(|b| b + self.index as u64) })
            }
            Err(e) => Err(e.clone()),
        }
    }
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ClientError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(r) = self.completion.result.get() {
            return Poll::Ready(self.output(r));
        }
        let completion = self.completion.clone();
        let mut wakers = completion.wakers.lock();
        // Re-check under the lock: `complete` sets the result before taking the wakers.
        if let Some(r) = completion.result.get() {
            drop(wakers);
            return Poll::Ready(self.output(r));
        }
        match self.slot {
            Some(i) if i < wakers.len() => wakers[i] = Some(cx.waker().clone()),
            _ => {
                wakers.push(Some(cx.waker().clone()));
                self.slot = Some(wakers.len() - 1);
            }
        }
        Poll::Pending
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
    /// From the broker on first use when idempotent; -1 otherwise.
    producer_id: tokio::sync::OnceCell<i64>,
}

#[derive(Debug)]
struct TopicSender {
    partitions: Vec<Arc<PartitionQueue>>,
    next: AtomicU32,
}

/// The accumulator of one partition, shared by `enqueue` callers and the sender task.
#[derive(Debug, Default)]
struct PartitionQueue {
    state: parking_lot::Mutex<Accumulator>,
    /// Wakes the sender: a batch was opened, closed, flushed, or the producer closed.
    wake: Notify,
}

#[derive(Debug, Default)]
struct Accumulator {
    open: Option<OpenBatch>,
    /// Closed batches waiting for an in-flight slot, oldest first.
    ready: VecDeque<OpenBatch>,
    /// Batches closed so far, and completed so far (they complete in order).
    closed_count: u64,
    completed_count: u64,
    /// Flushes waiting for `completed_count` to reach their target.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    closing: bool,
}

#[derive(Debug)]
struct OpenBatch {
    builder: BatchBuilder,
    completion: Arc<BatchCompletion>,
    count: u32,
    /// Buffer permits (bytes) the batch holds; returned when it completes.
    permits: u32,
    linger_until: Instant,
    /// When the batch fails if not acknowledged: `delivery_timeout` after its first record was
    /// queued (as Kafka counts it), not after it was first sent.
    deadline: Instant,
}

impl Accumulator {
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
}

impl Producer {
    pub fn new(client: Client, config: ProducerConfig) -> Self {
        let buffer = Arc::new(Semaphore::new(config.buffer_bytes.max(MAX_BATCH_BYTES)));
        Producer {
            client,
            config: Arc::new(config),
            topics: Default::default(),
            buffer,
            producer_id: tokio::sync::OnceCell::new(),
        }
    }

    /// Sends one record and waits for its acknowledgement.
    pub async fn send(&self, topic: &str, record: ProducerRecord) -> Result<RecordMetadata, ClientError> {
        self.enqueue(topic, record).await?.await
    }

    /// Queues a record; waits only for buffer space. The returned future resolves on ack.
    pub async fn enqueue(&self, topic: &str, record: ProducerRecord) -> Result<DeliveryFuture, ClientError> {
        let headers: Vec<(&str, &[u8])> = record.headers.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        let size = BatchBuilder::record_size(record.key.as_deref(), &record.value, &headers);
        if size + quiver_protocol::batch::BATCH_HEADER_BYTES > MAX_BATCH_BYTES {
            return Err(ClientError::Protocol(format!("record of {size} bytes exceeds the batch limit")));
        }
        if self.client.is_closed() {
            return Err(ClientError::Closed);
        }
        let producer_id = self.producer_id().await?;
        let sender = self.topic(topic, producer_id).await?;
        let n = sender.partitions.len() as u32;
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p < n => p,
            (Some(p), _) => {
                return Err(ClientError::Protocol(format!("topic '{topic}' has no partition {p}")))
            }
            (None, Some(key)) => (murmur2(key) & 0x7fff_ffff) % n,
            (None, None) => sender.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        // Buffer space is counted in bytes and given back when the record's batch completes.
        self.buffer.acquire_many(size as u32).await.map_err(|_| ClientError::Closed)?.forget();
        let queue = &sender.partitions[partition as usize];
        let max_batch = self.config.max_batch_bytes.clamp(1, MAX_BATCH_BYTES);
        let ts = record.timestamp_ms.unwrap_or_else(now_ms);
        let (completion, index, wake) = {
            let mut acc = queue.state.lock();
            if acc.closing {
                self.buffer.add_permits(size);
                return Err(ClientError::Closed);
            }
            let mut wake = false;
            if acc.open.as_ref().is_some_and(|o| o.builder.size_bytes() + size > max_batch) {
                wake |= acc.close_open();
            }
            let open = acc.open.get_or_insert_with(|| {
                wake = true; // the sender starts this batch's linger timer
                OpenBatch {
                    builder: BatchBuilder::new(max_batch.min(64 * 1024)),
                    completion: Arc::new(BatchCompletion::default()),
                    count: 0,
                    permits: 0,
                    linger_until: after(self.config.linger),
                    deadline: after(self.config.delivery_timeout),
                }
            });
            open.builder.push(ts, record.key.as_deref(), &record.value, &headers);
            let index = open.count;
            open.count += 1;
            open.permits += size as u32;
            let completion = open.completion.clone();
            if open.builder.size_bytes() >= max_batch || self.config.linger.is_zero() {
                wake |= acc.close_open();
            }
            (completion, index, wake)
        };
        if wake {
            queue.wake.notify_one();
        }
        Ok(DeliveryFuture { completion, index, partition, slot: None })
    }

    /// Sends every queued record now and waits until all of them are acknowledged or failed.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let queues: Vec<_> = self.topics.lock().values().flat_map(|t| t.partitions.iter().cloned()).collect();
        let mut waits = Vec::new();
        for q in queues {
            let (tx, rx) = oneshot::channel();
            {
                let mut acc = q.state.lock();
                acc.close_open();
                let target = acc.closed_count;
                if acc.completed_count >= target {
                    continue;
                }
                acc.flushes.push((target, tx));
            }
            q.wake.notify_one();
            waits.push(rx);
        }
        for w in waits {
            let _ = w.await;
        }
        Ok(())
    }

    /// Flushes; the sender tasks end once the producer is dropped and nothing is left.
    pub async fn close(self) -> Result<(), ClientError> {
        self.flush().await
    }

    /// The producer id, asked of the broker once (idempotent producers), or -1.
    async fn producer_id(&self) -> Result<i64, ClientError> {
        if !self.config.idempotent || self.config.acks == Acks::None {
            return Ok(-1);
        }
        let id = self
            .producer_id
            .get_or_try_init(|| async {
                match self.client.request(&Message::InitProducer).await? {
                    Message::InitProducerOk { producer_id, .. } => Ok(producer_id),
                    other => Err(unexpected(other)),
                }
            })
            .await?;
        Ok(*id)
    }

    async fn topic(&self, topic: &str, producer_id: i64) -> Result<Arc<TopicSender>, ClientError> {
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
                let queue = Arc::new(PartitionQueue::default());
                let task = Sender {
                    client: self.client.clone(),
                    config: self.config.clone(),
                    topic: name.clone(),
                    partition: p,
                    producer_id,
                    queue: queue.clone(),
                    buffer: self.buffer.clone(),
                    in_flight: VecDeque::new(),
                    stream: None,
                    backoff: MIN_BACKOFF,
                    last_error: None,
                    sequence_broken: false,
                    next_sequence: 0,
                };
                tokio::spawn(task.run());
                queue
            })
            .collect();
        let sender = Arc::new(TopicSender { partitions, next: AtomicU32::new(0) });
        topics.insert(topic.to_string(), sender.clone());
        Ok(sender)
    }
}

impl Drop for Producer {
    /// Queued records are still sent; the sender tasks end once nothing is left.
    fn drop(&mut self) {
        for t in self.topics.lock().values() {
            for q in &t.partitions {
                q.state.lock().closing = true;
                q.wake.notify_one();
            }
        }
    }
}

struct InFlight {
    frame: Encoded,
    completion: Arc<BatchCompletion>,
    permits: u32,
    deadline: Instant,
}

/// The per-partition sender task.
struct Sender {
    client: Client,
    config: Arc<ProducerConfig>,
    topic: Arc<str>,
    partition: u32,
    producer_id: i64,
    queue: Arc<PartitionQueue>,
    buffer: Arc<Semaphore>,
    in_flight: VecDeque<InFlight>,
    stream: Option<(quinn::SendStream, FrameReader)>,
    /// Delay before the next retry; doubles per consecutive failure, reset by a success.
    backoff: Duration,
    /// Why the last attempt failed, reported if a batch's delivery timeout then expires.
    last_error: Option<String>,
    /// An idempotent batch failed: sequences must restart under a new producer id.
    sequence_broken: bool,
    /// Sequence number of the next record (idempotent producers), assigned when a batch is
    /// first sent, so sequences are dense in send order.
    next_sequence: i32,
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Sender {
    async fn run(mut self) {
        let max_in_flight = self.config.max_in_flight.max(1);
        loop {
            if self.client.is_closed() {
                // Nothing can be sent any more: fail what waits instead of retrying until each
                // delivery timeout (and, for idempotent batches, asking for a producer id
                // forever).
                self.fail_all(ClientError::Closed);
                return;
            }
            if self.sequence_broken {
                self.restart_sequence().await;
                if self.sequence_broken {
                    continue; // no producer id yet: send nothing until there is one
                }
            }
            // Take what can go now; note when the open batch's linger ends.
            let (to_send, linger, done) = {
                let mut acc = self.queue.state.lock();
                let now = Instant::now();
                if acc.open.as_ref().is_some_and(|o| o.linger_until <= now) || acc.closing {
                    acc.close_open();
                }
                let room = max_in_flight.saturating_sub(self.in_flight.len());
                let n = room.min(acc.ready.len());
                let to_send: Vec<OpenBatch> = acc.ready.drain(..n).collect();
                let done = acc.closing && acc.open.is_none() && acc.ready.is_empty() && to_send.is_empty();
                (to_send, acc.open.as_ref().map(|o| o.linger_until), done)
            };
            if done && self.in_flight.is_empty() {
                return;
            }
            for batch in to_send {
                self.send(batch).await;
            }
            let awaiting_acks = self.stream.is_some() && !self.in_flight.is_empty();
            let answer_by = self.in_flight.front().map(|f| f.deadline);
            let has_room = self.in_flight.len() < max_in_flight;
            let stranded = !self.in_flight.is_empty() && self.stream.is_none();
            tokio::select! {
                _ = self.queue.wake.notified() => {}
                _ = sleep_until(linger), if linger.is_some() && has_room => {}
                resp = next_response(&mut self.stream, answer_by), if awaiting_acks => self.on_response(resp).await,
                // Batches in flight without a stream (a resend gave up for now): try again.
                _ = tokio::time::sleep(self.backoff), if stranded => self.resend_all().await,
            }
        }
    }

    /// Finishes a closed batch and sends it.
    async fn send(&mut self, batch: OpenBatch) {
        let identity = if self.producer_id >= 0 {
            let base_sequence = self.next_sequence;
            // Sequences wrap at 2^31, as in Kafka; they are never negative.
            self.next_sequence = self.next_sequence.wrapping_add(batch.count as i32) & i32::MAX;
            ProducerIdentity { producer_id: self.producer_id, producer_epoch: 0, base_sequence }
        } else {
            ProducerIdentity::default()
        };
        let msg = Message::Produce {
            topic: self.topic.to_string(),
            partition: self.partition,
            acks: self.config.acks,
            batch: batch.builder.with_identity(identity).finish(),
        };
        let flight = InFlight {
            frame: msg.encode(),
            completion: batch.completion,
            permits: batch.permits,
            deadline: batch.deadline,
        };
        let frame = flight.frame.clone();
        let stranded = self.stream.is_none() && !self.in_flight.is_empty();
        self.in_flight.push_back(flight);
        // With older batches waiting for a resend, the new one goes after them, in order.
        if stranded {
            self.resend_all().await;
        } else if let Err(e) = self.write(frame).await {
            self.last_error = Some(e.to_string());
            self.resend_all().await;
        }
        if self.config.acks == Acks::None {
            // No response will come: the write is all there is.
            while let Some(f) = self.in_flight.pop_front() {
                self.complete(f, Ok(None));
            }
        }
    }

    async fn write(&mut self, frame: Encoded) -> Result<(), ClientError> {
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
        match resp {
            Ok(Some(Message::ProduceOk { base_offset, .. })) => {
                self.backoff = MIN_BACKOFF;
                self.last_error = None;
                self.complete(flight, Ok(Some(base_offset)));
            }
            Ok(Some(Message::Error { code, message })) if !code.is_retriable() => {
                self.complete(flight, Err(ClientError::Broker { code, message }))
            }
            Ok(Some(Message::Error { .. })) | Ok(None) | Err(_) => {
                // Lost connection, a retriable error or no answer in time: after a pause, every
                // batch in flight goes again, in order.
                let why = match resp {
                    Ok(Some(Message::Error { code, message })) => {
                        ClientError::Broker { code, message }.to_string()
                    }
                    Ok(_) => "the stream ended without an answer".to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::debug!(topic = %self.topic, partition = self.partition, "produce failed, will retry: {why}");
                self.last_error = Some(why);
                self.in_flight.push_front(flight);
                self.pause().await;
                self.resend_all().await;
            }
            Ok(Some(other)) => self.complete(flight, Err(unexpected(other))),
        }
    }

    /// Fails every batch in flight, oldest first (without touching the sequence state).
    fn fail_in_flight(&mut self, err: &ClientError) {
        while let Some(f) = self.in_flight.pop_front() {
            self.finish(f.completion, f.permits, Err(err.clone()));
        }
    }

    /// Fails every batch in flight and queued, oldest first, and refuses new records.
    fn fail_all(&mut self, err: ClientError) {
        self.queue.state.lock().closing = true;
        self.fail_pending(err);
    }

    /// Fails every batch in flight or queued (the partition stays open for later records).
    fn fail_pending(&mut self, err: ClientError) {
        self.fail_in_flight(&err);
        let queued: Vec<OpenBatch> = {
            let mut acc = self.queue.state.lock();
            acc.close_open();
            acc.ready.drain(..).collect()
        };
        for b in queued {
            self.finish(b.completion, b.permits, Err(err.clone()));
        }
    }

    /// Completes a batch: its records' futures, buffer space, and flushes waiting for it.
    fn complete(&mut self, flight: InFlight, result: Result<Option<u64>, ClientError>) {
        if result.is_err() && self.producer_id >= 0 {
            // The failed batch's sequence numbers are spent: the broker would refuse every later
            // batch as a gap. `run` starts this partition over under a new producer id.
            self.sequence_broken = true;
        }
        self.finish(flight.completion, flight.permits, result);
    }

    fn finish(
        &self,
        completion: Arc<BatchCompletion>,
        permits: u32,
        result: Result<Option<u64>, ClientError>,
    ) {
        completion.complete(result);
        self.buffer.add_permits(permits as usize);
        let mut acc = self.queue.state.lock();
        acc.completed_count += 1;
        let completed = acc.completed_count;
        let (due, waiting): (Vec<_>, Vec<_>) = acc.flushes.drain(..).partition(|(t, _)| *t <= completed);
        acc.flushes = waiting;
        drop(acc);
        for (_, tx) in due {
            let _ = tx.send(());
        }
    }

    /// After a failed idempotent batch: fails what was sent after it (the broker would refuse
    /// those as a gap, as Kafka does), takes a new producer id and numbers from 0 again. Batches
    /// not yet sent keep waiting and go out under the new id. The failed ones were sent at
    /// least once, so they may have been written: the error says the outcome is unknown, not
    /// that they were not sent (a caller that retries may store them twice).
    async fn restart_sequence(&mut self) {
        let reason = ClientError::OutcomeUnknown(format!(
            "an earlier batch to {}/{} failed while this one was in flight; it may or may not have been \
             written, and it is not retried (its sequence number is void)",
            self.topic, self.partition
        ));
        self.fail_in_flight(&reason);
        match self.client.request(&Message::InitProducer).await {
            Ok(Message::InitProducerOk { producer_id, .. }) => {
                self.next_sequence = 0;
                self.producer_id = producer_id;
                self.sequence_broken = false;
                tracing::info!(topic = %self.topic, partition = self.partition, producer_id, "restarted idempotent sequence after a failed batch");
            }
            Ok(other) => {
                tracing::warn!("unexpected answer to InitProducer: kind {}", other.kind());
                self.pause().await;
            }
            Err(e) if !e.is_retriable() => {
                // Refused for good (a limit on producer ids): what waits cannot be sent under
                // a valid sequence, so it fails now instead of waiting for an id forever.
                tracing::warn!(topic = %self.topic, partition = self.partition, "no new producer id: {e}");
                self.fail_pending(e);
                self.pause().await;
            }
            Err(e) => {
                tracing::debug!("new producer id failed ({e}); retrying");
                self.pause().await;
            }
        }
    }

    /// Waits out the current backoff, and doubles it for the next failure.
    async fn pause(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Reconnects and resends every in-flight batch, in order, until each batch's deadline.
    /// Gives up for now (leaving the stream unset) after one failed attempt; `run` retries.
    async fn resend_all(&mut self) {
        self.stream = None;
        let now = Instant::now();
        while self.in_flight.front().is_some_and(|f| f.deadline <= now) {
            if let Some(f) = self.in_flight.pop_front() {
                let after_ms = self.config.delivery_timeout.as_millis() as u64;
                self.complete(
                    f,
                    Err(ClientError::DeliveryTimeout { after_ms, last: self.last_error.clone() }),
                );
            }
        }
        if self.sequence_broken {
            // An idempotent batch failed: the ones after it carry void sequence numbers, and
            // `run` fails them (outcome unknown) before anything is resent.
            return;
        }
        let frames: Vec<_> = self.in_flight.iter().map(|f| f.frame.clone()).collect();
        for frame in frames {
            if let Err(e) = self.write(frame).await {
                tracing::debug!(topic = %self.topic, partition = self.partition, "resend failed: {e}");
                self.last_error = Some(e.to_string());
                self.stream = None;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                return;
            }
        }
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

/// `now + d`, where a huge `d` (`Duration::MAX` for "no limit") means about a century rather
/// than an overflow panic in the sender task.
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
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
