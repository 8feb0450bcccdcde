//! The producer: records are appended under a short lock into a per-partition accumulator
//! (Kafka's RecordAccumulator design), so `enqueue` costs a copy into the open batch and no
//! channel send or task wake-up per record. One sender task per partition closes batches when
//! they are full or their linger expires, pipelines them as produce requests on one stream,
//! completes every record of a batch at once from the batch's acknowledgement, and resends
//! in order on a new connection after a loss.
//!
//! A batch refused with a retriable error (`NotLeader` while a partition changes leader,
//! `ShuttingDown`, a storage error) or whose acknowledgement was lost with the connection is
//! sent again, unchanged, after a pause (50 ms doubling to 1 s), together with every later
//! batch in flight and in the same order; a new connection goes to the next broker of the
//! client's list when the last one is down. Retries stop at the delivery timeout. With
//! `idempotent` (the default) each batch carries the producer's id and the sequence number
//! of its first record in the partition, and the broker answers a batch it already wrote
//! with the original offsets: each record is written once. Without it, delivery is
//! at-least-once.
//!
//! In a cluster, a partition's stream goes to its leader directly (`routing.rs`). After
//! `NotLeader` or a lost stream the sender asks where the leaders are before it opens the next
//! stream; when an answer is overdue ([`ANSWER_OVERDUE`]) it asks too, and if the leader moved
//! it gives up the stream and sends what is in flight to the new leader, in order and with the
//! same sequence numbers. While the leader is not known its stream goes over the main
//! connection (that broker forwards) and the sender looks again every [`ROUTE_CHECK`]; a
//! leader's stream looks again every [`ROUTE_MAX_AGE`] (a leader that handed over its place
//! without failing forwards, so its answers keep coming).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::routing::Route;
use quiver_transport::{write_encoded, FrameReader};

mod engine;

use engine::{Action, Answer, Done, Engine, EngineConfig};

/// A replicated partition's answer that has not come this long after the last one (or the
/// write it waits for) makes the sender ask whether the leader moved. Not an error: if the
/// leader is where it was, the sender keeps waiting and asks again ([`OVERDUE_RECHECK`]).
const ANSWER_OVERDUE: Duration = Duration::from_millis(500);
/// Once an answer is overdue and the leader has not moved, how soon the sender asks again: an
/// election in progress ends within a few hundred milliseconds.
const OVERDUE_RECHECK: Duration = Duration::from_millis(150);
/// How often a stream going over the main connection (leader unknown or unreachable) looks
/// for its leader again: soon, as a new topic's partitions may not have elected one yet when
/// the producer first asks (the topic's refreshes stay at most one per
/// [`MIN_REFRESH_INTERVAL`](crate::routing::MIN_REFRESH_INTERVAL)).
const ROUTE_CHECK: Duration = Duration::from_millis(250);
/// How often a leader's stream that works looks again anyway: a leader that hands over its
/// place without failing forwards what still reaches it, so nothing else would tell.
const ROUTE_MAX_AGE: Duration = Duration::from_secs(10);

/// Producer settings: `ProducerConfig::default()` (or `new()`) and `with_*` setters; the
/// fields can be read and set, and more may come (so no struct literals outside this crate).
///
/// ```
/// use std::time::Duration;
/// use quiver_client::ProducerConfig;
/// let config = ProducerConfig::new().with_linger(Duration::from_millis(20)).with_max_in_flight(4);
/// assert_eq!(config.max_in_flight, 4);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProducerConfig {
    /// What the broker waits for before it answers a batch: `All` (the default) a majority of
    /// the partition's replicas, `Leader` the leader alone, `None` nothing (no answer). On a
    /// single broker `All` is `Leader`.
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
    /// with `acks = all` or `leader`: with `acks = none` nothing tells the producer that a batch failed,
    /// and every later batch of the partition would then be refused as a sequence gap, unseen
    /// (Kafka likewise requires acknowledgements for idempotence).
    pub idempotent: bool,
    /// Records with neither key nor partition stay on one partition for this many bytes, then
    /// move to the next (Kafka's sticky partitioner, KIP-480 and KIP-794), so a producer over
    /// many partitions still sends full batches; the batch it leaves is sent at once. 0 sends
    /// each such record to the next partition in turn. A value below one record's size sends
    /// every record alone, at once: use 0 for round robin.
    pub sticky_partition_bytes: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(5),
            max_batch_bytes: 1024 * 1024,
            max_in_flight: 8,
            buffer_bytes: 64 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(60),
            idempotent: true,
            sticky_partition_bytes: 64 * 1024,
        }
    }
}

impl ProducerConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with_acks(mut self, acks: Acks) -> Self {
        self.acks = acks;
        self
    }
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }
    pub fn with_max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes;
        self
    }
    pub fn with_max_in_flight(mut self, batches: usize) -> Self {
        self.max_in_flight = batches;
        self
    }
    pub fn with_buffer_bytes(mut self, bytes: usize) -> Self {
        self.buffer_bytes = bytes;
        self
    }
    pub fn with_delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }
    pub fn with_idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }
    pub fn with_sticky_partition_bytes(mut self, bytes: usize) -> Self {
        self.sticky_partition_bytes = bytes;
        self
    }
}

/// A record to send.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
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
#[non_exhaustive]
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
    /// Keyless records: the sticky partition (high 32 bits) and the bytes it has taken since
    /// it was chosen (low 32), or with stickiness off the next partition in turn.
    keyless: AtomicU64,
}

impl TopicSender {
    fn new(partitions: Vec<Arc<PartitionQueue>>) -> Self {
        // Start each producer on its own partition, as Kafka's picks a random one, so that
        // producers started together do not all begin on partition 0.
        let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        let first = (seed % partitions.len().max(1) as u64) << 32;
        TopicSender { partitions, keyless: AtomicU64::new(first) }
    }

    /// The partition for a keyless record of `size` bytes, and the partition it moved away
    /// from, if it did.
    fn keyless(&self, size: usize, sticky_bytes: usize) -> (u32, Option<u32>) {
        let n = self.partitions.len().max(1) as u64;
        let mut current = self.keyless.load(Ordering::Relaxed);
        loop {
            // The bytes taken are counted in 32 bits: a larger setting is as good as u32::MAX.
            let sticky = (sticky_bytes as u64).min(u32::MAX as u64);
            let (next, chosen, left) = sticky_step(current, n, size as u64, sticky);
            match self.keyless.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return (chosen, left),
                Err(actual) => current = actual,
            }
        }
    }
}

/// One keyless record of `size` bytes over `n` partitions from state `current` (partition in
/// the high 32 bits, bytes taken in the low 32): the next state, the partition chosen and the
/// partition left behind, if any.
fn sticky_step(current: u64, n: u64, size: u64, sticky_bytes: u64) -> (u64, u32, Option<u32>) {
    let (p, taken) = ((current >> 32) % n, current & 0xffff_ffff);
    let size = size.min(u32::MAX as u64);
    if sticky_bytes == 0 {
        return (((p + 1) % n) << 32, p as u32, None);
    }
    if taken > 0 && taken + size > sticky_bytes {
        let q = (p + 1) % n;
        return ((q << 32) | size, q as u32, (q != p).then_some(p as u32));
    }
    ((p << 32) | (taken + size).min(u32::MAX as u64), p as u32, None)
}

/// One partition's engine (its accumulator, in-flight window and sequence state), shared by
/// `enqueue` callers and the sender task under a short lock.
#[derive(Debug)]
struct PartitionQueue {
    state: parking_lot::Mutex<PartitionState>,
    /// Wakes the sender: a batch was opened, closed, flushed, or the producer closed.
    wake: Notify,
}

#[derive(Debug)]
struct PartitionState {
    engine: Engine<Body, Encoded>,
    /// Batches completed so far (they complete in the order they closed).
    completed: u64,
    /// Flushes waiting for `completed` to reach their target.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    /// The sender task ended (the client closed, or the producer is done): nothing answers
    /// a flush queued after this.
    ended: bool,
}

/// A batch's records while it is open (the builder, taken when the batch is sealed into its
/// frame) and the completion its records' futures read.
#[derive(Debug)]
struct Body {
    builder: Option<BatchBuilder>,
    completion: Arc<BatchCompletion>,
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
            return Err(ClientError::RecordTooLarge { bytes: size, limit: MAX_BATCH_BYTES });
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
            (None, None) => {
                let (partition, left) = sender.keyless(size, self.config.sticky_partition_bytes);
                if let Some(left) = left {
                    // The batch just left will not grow for a while: send it now.
                    let queue = &sender.partitions[left as usize];
                    queue.state.lock().engine.flush();
                    queue.wake.notify_one();
                }
                partition
            }
        };
        // Buffer space is counted in bytes and given back when the record's batch completes.
        self.buffer.acquire_many(size as u32).await.map_err(|_| ClientError::Closed)?.forget();
        let queue = &sender.partitions[partition as usize];
        let max_batch = self.config.max_batch_bytes.clamp(1, MAX_BATCH_BYTES);
        let ts = record.timestamp_ms.unwrap_or_else(now_ms);
        let new_body = || Body {
            builder: Some(BatchBuilder::new(max_batch.min(64 * 1024))),
            completion: Arc::new(BatchCompletion::default()),
        };
        let push = |body: &mut Body, index: u32| {
            let bytes = match body.builder.as_mut() {
                Some(b) => {
                    b.push(ts, record.key.as_deref(), &record.value, &headers);
                    b.size_bytes()
                }
                None => MAX_BATCH_BYTES, // not reached: only open batches take records
            };
            ((body.completion.clone(), index), bytes)
        };
        let enqueued = queue.state.lock().engine.enqueue(Instant::now(), size, new_body, push);
        let ((completion, index), wake) = match enqueued {
            Ok(e) => e,
            Err(e) => {
                self.buffer.add_permits(size);
                return Err(e);
            }
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
                let mut st = q.state.lock();
                let target = st.engine.flush();
                // Under acks = none a written batch may still sit in QUIC's buffers: the sender
                // makes sure the broker read it (`Sender::settle_flushes`), even when every batch
                // was written before this call.
                if st.ended || (st.completed >= target && self.config.acks != Acks::None) {
                    continue;
                }
                st.flushes.push((target, tx));
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
                // Repeating it costs an unused id at worst.
                match self.client.request_retrying(&Message::InitProducer).await.result? {
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
        // The partitions' leaders (asks nothing more of a single broker). Without them streams
        // go over the main connection, which forwards: slower, not wrong.
        if let Err(e) = self.client.learn_leaders(&info).await {
            tracing::debug!(topic, "locating the partitions' leaders failed: {e}");
        }
        let mut topics = self.topics.lock();
        if let Some(t) = topics.get(topic) {
            return Ok(t.clone());
        }
        let name: Arc<str> = Arc::from(topic);
        let partitions = (0..info.partitions.len() as u32)
            .map(|p| {
                let engine = Engine::new(EngineConfig::new(&self.config, producer_id));
                let queue = Arc::new(PartitionQueue {
                    state: parking_lot::Mutex::new(PartitionState {
                        engine,
                        completed: 0,
                        flushes: Vec::new(),
                        ended: false,
                    }),
                    wake: Notify::new(),
                });
                let task = Sender {
                    client: self.client.clone(),
                    topic: name.clone(),
                    partition: p,
                    acks: self.config.acks,
                    queue: queue.clone(),
                    buffer: self.buffer.clone(),
                    stream: None,
                    route: Route::Main,
                    check_at: None,
                    stale_at: None,
                    seen_generation: 0,
                    refresh: false,
                };
                tokio::spawn(task.run());
                queue
            })
            .collect();
        let sender = Arc::new(TopicSender::new(partitions));
        topics.insert(topic.to_string(), sender.clone());
        Ok(sender)
    }
}

impl Drop for Producer {
    /// Queued records are still sent; the sender tasks end once nothing is left.
    fn drop(&mut self) {
        for t in self.topics.lock().values() {
            for q in &t.partitions {
                q.state.lock().engine.close();
                q.wake.notify_one();
            }
        }
    }
}

/// The per-partition sender task: carries out its engine's actions over one stream.
struct Sender {
    client: Client,
    topic: Arc<str>,
    partition: u32,
    acks: Acks,
    queue: Arc<PartitionQueue>,
    buffer: Arc<Semaphore>,
    stream: Option<(quinn::SendStream, FrameReader)>,
    /// Where the current stream goes (`Main` while there is none).
    route: Route,
    /// When to ask whether the partition's leader moved: an answer is overdue on a leader's
    /// stream, or the stream goes over the main connection for want of a leader.
    check_at: Option<Instant>,
    /// When a leader's stream asks again whether the leader moved, even if all is well.
    stale_at: Option<Instant>,
    /// The routing map's generation when this stream's route was last looked at: another
    /// partition's refresh may have moved this one's leader too.
    seen_generation: u64,
    /// Ask where the leader is before opening the next stream (the last one failed).
    refresh: bool,
}

impl Sender {
    async fn run(mut self) {
        loop {
            if self.client.is_closed() {
                // Nothing can be sent any more: fail what waits instead of retrying until each
                // delivery timeout (and, for idempotent batches, asking for a producer id
                // forever).
                self.queue.state.lock().engine.shutdown(ClientError::Closed);
                while let Some(action) = self.poll() {
                    if let Action::Complete(done) = action {
                        self.complete(done);
                    }
                }
                self.end();
                return;
            }
            while let Some(action) = self.poll() {
                match action {
                    Action::Send { frame, fresh } => {
                        if fresh {
                            self.stream = None;
                        }
                        let written = self.write(frame).await;
                        if written.is_err() {
                            self.lost_stream();
                        }
                        let mut st = self.queue.state.lock();
                        match written {
                            Ok(()) => st.engine.write_ok(),
                            Err(e) => {
                                tracing::debug!(topic = %self.topic, partition = self.partition, "produce write failed: {e}");
                                st.engine.write_failed(Instant::now(), e.to_string());
                            }
                        }
                    }
                    Action::Complete(done) => self.complete(done),
                    Action::RequestProducerId => self.request_producer_id().await,
                }
            }
            self.settle_flushes().await;
            let (done, answer_by, timer) = {
                let st = self.queue.state.lock();
                (st.engine.is_done(), st.engine.awaiting_answer(), st.engine.next_timer())
            };
            if done {
                self.end();
                return;
            }
            let awaiting = answer_by.is_some() && self.stream.is_some();
            if self.route != Route::Main
                && self.stream.is_some()
                && self.client.routing().generation() != self.seen_generation
            {
                // The map changed: look now (a move waits for no answer to be overdue).
                self.stale_at = Some(Instant::now());
            }
            let check_at = match (self.check_at, self.stale_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                _ = self.queue.wake.notified() => {}
                _ = sleep_until(timer), if timer.is_some() => {}
                resp = next_response(&mut self.stream, answer_by), if awaiting => {
                    let answer = answer_of(resp);
                    if let Answer::Retry(why) = &answer {
                        tracing::debug!(topic = %self.topic, partition = self.partition, "produce failed, will retry: {why}");
                        self.lost_stream();
                    }
                    let now = Instant::now();
                    let mut st = self.queue.state.lock();
                    st.engine.answer(now, answer);
                    if matches!(self.route, Route::Leader(_)) && self.stream.is_some() {
                        // Alive: the next answer is due a while from now, if one is awaited.
                        self.check_at = st.engine.awaiting_answer().map(|_| now + ANSWER_OVERDUE);
                    }
                }
                _ = sleep_until(check_at), if check_at.is_some() => self.check_route().await,
            }
        }
    }

    /// The engine's next action now.
    fn poll(&self) -> Option<Action<Body, Encoded>> {
        let (topic, partition, acks) = (&self.topic, self.partition, self.acks);
        let mut seal = |body: &mut Body, identity: ProducerIdentity| {
            let batch = body.builder.take().map(|b| b.with_identity(identity).finish()).unwrap_or_default();
            Message::Produce { topic: topic.to_string(), partition, acks, batch }.encode()
        };
        self.queue.state.lock().engine.poll(Instant::now(), &mut seal)
    }

    /// After a failed idempotent batch: a new producer id, so sequences start over.
    async fn request_producer_id(&mut self) {
        let result = self.client.request(&Message::InitProducer).await;
        let mut st = self.queue.state.lock();
        match result {
            Ok(Message::InitProducerOk { producer_id, .. }) => {
                st.engine.producer_id_granted(producer_id);
                tracing::info!(topic = %self.topic, partition = self.partition, producer_id, "restarted idempotent sequence after a failed batch");
            }
            Ok(other) => {
                tracing::warn!("unexpected answer to InitProducer: kind {}", other.kind());
                st.engine.producer_id_refused(Instant::now(), unexpected(other), false);
            }
            Err(e) if !e.is_retriable() => {
                tracing::warn!(topic = %self.topic, partition = self.partition, "no new producer id: {e}");
                st.engine.producer_id_refused(Instant::now(), e, true);
            }
            Err(e) => {
                tracing::debug!("new producer id failed ({e}); retrying");
                st.engine.producer_id_refused(Instant::now(), e, false);
            }
        }
    }

    async fn write(&mut self, frame: Encoded) -> Result<(), ClientError> {
        if self.stream.is_none() {
            self.open_stream().await?;
        }
        let Some((send, _)) = self.stream.as_mut() else { return Err(ClientError::Closed) };
        write_encoded(send, frame).await?;
        if matches!(self.route, Route::Leader(_)) && self.check_at.is_none() && self.acks != Acks::None {
            // Nothing was awaited before this batch: its answer is due from now.
            self.check_at = Some(Instant::now() + ANSWER_OVERDUE);
        }
        Ok(())
    }

    /// A stream to the partition's leader if it is known and reachable, else over the main
    /// connection; after a failure, asks where the leader is first.
    async fn open_stream(&mut self) -> Result<(), ClientError> {
        if std::mem::take(&mut self.refresh) && self.client.route(&self.topic, self.partition) != Route::Main
        {
            self.client.refresh_leaders(&self.topic).await;
        }
        self.seen_generation = self.client.routing().generation();
        let (conn, route) = self.client.connection_for(&self.topic, self.partition).await?;
        let timeout = self.client.config().request_timeout;
        let (send, recv) = tokio::time::timeout(timeout, conn.open_bi())
            .await
            .map_err(|_| ClientError::Timeout(timeout.as_millis() as u64))??;
        self.stream = Some((send, FrameReader::new(recv)));
        let now = Instant::now();
        self.check_at = (route == Route::Unknown).then(|| now + ROUTE_CHECK);
        self.stale_at = matches!(route, Route::Leader(_)).then(|| now + ROUTE_MAX_AGE);
        self.route = route;
        Ok(())
    }

    /// The stream failed (or its answers are void): the next one is opened after asking where
    /// the leader is.
    fn lost_stream(&mut self) {
        self.stream = None;
        self.check_at = None;
        self.stale_at = None;
        self.refresh = true;
    }

    /// An answer is overdue on a leader's stream, the stream goes over the main connection for
    /// want of a leader, or the leader was last checked a while ago: asks where the leader is,
    /// and moves the stream to it if it moved. Moving sends the batches in flight again, which
    /// an idempotent producer's leader writes once; without idempotence the stream moves only
    /// when no answer is awaited, or when the answer is overdue anyway (at-least-once, as after
    /// any lost answer).
    async fn check_route(&mut self) {
        let fired = Instant::now();
        let due = self.check_at.is_some_and(|t| t <= fired);
        if due {
            self.check_at = None;
        }
        let overdue = due && matches!(self.route, Route::Leader(_));
        tracing::trace!(topic = %self.topic, partition = self.partition, overdue, route = ?self.route, "checking the partition's leader");
        if self.stream.is_none() {
            // The next stream sets its own timers.
            (self.check_at, self.stale_at) = (None, None);
            return;
        }
        if overdue
            || self.route == Route::Unknown
            || self.client.routing().generation() == self.seen_generation
        {
            self.client.refresh_leaders(&self.topic).await;
        }
        self.seen_generation = self.client.routing().generation();
        let now = Instant::now();
        let route = self.client.route(&self.topic, self.partition);
        let moved = matches!(route, Route::Leader(_)) && route != self.route;
        let mut st = self.queue.state.lock();
        let awaiting = st.engine.awaiting_answer().is_some();
        if moved && (overdue || !awaiting || st.engine.is_idempotent()) {
            tracing::debug!(topic = %self.topic, partition = self.partition, from = ?self.route, to = ?route, "the partition's leader moved: re-sending what is in flight to it");
            st.engine.reroute(now);
            drop(st);
            self.stream = None;
            self.route = Route::Main;
            self.stale_at = None;
            return;
        }
        match self.route {
            Route::Unknown => self.check_at = Some(now + ROUTE_CHECK),
            Route::Leader(_) => {
                if overdue && awaiting {
                    // Still nothing: look again soon (an election may be under way).
                    self.check_at = Some(now + OVERDUE_RECHECK);
                }
                self.stale_at = Some(now + ROUTE_MAX_AGE);
            }
            Route::Main => {}
        }
    }

    /// Completes a batch: its records' future and buffer space (`settle_flushes` then answers
    /// the flushes waiting for it).
    fn complete(&self, done: Done<Body>) {
        done.payload.completion.complete(done.result);
        self.buffer.add_permits(done.permits as usize);
        self.queue.state.lock().completed += 1;
    }

    /// The task ends: every flush still waiting is answered (its batches completed or failed),
    /// and none waits after this.
    fn end(&self) {
        let waiting = {
            let mut st = self.queue.state.lock();
            st.ended = true;
            std::mem::take(&mut st.flushes)
        };
        for (_, tx) in waiting {
            let _ = tx.send(());
        }
    }

    /// Answers the flushes whose batches are all complete. Under acks = none "complete" means
    /// written to the stream, which a connection closed right after would drop unsent (or sent
    /// and not yet read by the broker): the stream is finished first and read to its end, which
    /// the broker sends once it has handled every request on it (`requests::serve`). The next
    /// batch opens a new stream.
    async fn settle_flushes(&mut self) {
        let due: Vec<_> = {
            let mut st = self.queue.state.lock();
            let completed = st.completed;
            let (due, waiting): (Vec<_>, Vec<_>) = st.flushes.drain(..).partition(|(t, _)| *t <= completed);
            st.flushes = waiting;
            due
        };
        if due.is_empty() {
            return;
        }
        if self.acks == Acks::None {
            if let Some((mut send, mut reader)) = self.stream.take() {
                let _ = send.finish();
                let timeout = self.client.config().request_timeout;
                let drained =
                    tokio::time::timeout(timeout, async { while let Ok(Some(_)) = reader.next().await {} })
                        .await;
                if drained.is_err() {
                    tracing::debug!(topic = %self.topic, partition = self.partition, "the broker did not end the stream within {timeout:?} after a flush");
                }
                (self.check_at, self.stale_at) = (None, None);
            }
        }
        for (_, tx) in due {
            let _ = tx.send(());
        }
    }
}

/// What a response means for the oldest batch in flight.
fn answer_of(resp: Result<Option<Message>, ClientError>) -> Answer {
    let why = match resp {
        Ok(Some(Message::ProduceOk { base_offset, .. })) => return Answer::Written(base_offset),
        Ok(Some(Message::Error { code, message, .. })) => {
            let e = ClientError::Broker { code, message };
            if !code.is_retriable() {
                return Answer::Fatal(e);
            }
            e.to_string()
        }
        Ok(Some(other)) => return Answer::Fatal(unexpected(other)),
        Ok(None) => "the stream ended without an answer".to_string(),
        Err(e) => e.to_string(),
    };
    // Lost connection, a retriable error (NotLeader among them) or no answer in time: after a
    // pause, every batch in flight goes again, in order, with its sequence numbers.
    Answer::Retry(why)
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
    use super::{answer_of, murmur2, Answer};
    use quiver_protocol::message::Message;
    use quiver_protocol::ErrorCode;

    #[test]
    fn not_leader_and_a_lost_answer_are_retried_and_a_refusal_is_not() {
        let error = |code: ErrorCode| Ok(Some(Message::error(code, "x")));
        for code in [ErrorCode::NotLeader, ErrorCode::ShuttingDown, ErrorCode::StorageError] {
            assert!(matches!(answer_of(error(code)), Answer::Retry(_)), "{code:?}");
        }
        assert!(matches!(answer_of(Ok(None)), Answer::Retry(_)));
        let lost = Err(crate::ClientError::ConnectionLost("reset".into()));
        assert!(matches!(answer_of(lost), Answer::Retry(_)));
        assert!(matches!(answer_of(error(ErrorCode::UnknownPartition)), Answer::Fatal(_)));
        let ok = Ok(Some(Message::ProduceOk { base_offset: 7, log_append_time_ms: -1 }));
        assert!(matches!(answer_of(ok), Answer::Written(7)));
    }

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

#[cfg(test)]
mod sticky_tests {
    use super::sticky_step;

    /// Walks `records` keyless records of `size` bytes; returns the partition of each and the
    /// partitions left behind.
    fn walk(n: u64, size: u64, sticky: u64, records: usize) -> (Vec<u32>, Vec<u32>) {
        let (mut state, mut chosen, mut left) = (0u64, Vec::new(), Vec::new());
        for _ in 0..records {
            let (next, p, l) = sticky_step(state, n, size, sticky);
            state = next;
            chosen.push(p);
            left.extend(l);
        }
        (chosen, left)
    }

    #[test]
    fn keyless_records_stay_on_a_partition_for_the_sticky_bytes_then_move_on() {
        let (chosen, left) = walk(3, 100, 1000, 25);
        // Ten records of 100 bytes fill 1000 bytes; the eleventh moves to the next partition.
        assert_eq!(&chosen[..10], &[0; 10]);
        assert_eq!(&chosen[10..20], &[1; 10]);
        assert_eq!(&chosen[20..], &[2; 5]);
        assert_eq!(left, vec![0, 1], "the batch left behind is named so it is sent at once");
        // Round the ring and back to partition 0.
        let (chosen, _) = walk(3, 100, 1000, 31);
        assert_eq!(chosen[30], 0);
    }

    #[test]
    fn zero_sticky_bytes_is_round_robin_and_big_records_go_alone() {
        let (chosen, left) = walk(4, 10, 0, 6);
        assert_eq!(chosen, vec![0, 1, 2, 3, 0, 1]);
        assert!(left.is_empty());
        let (chosen, _) = walk(4, 5000, 1000, 3);
        assert_eq!(chosen, vec![0, 1, 2], "a record above the sticky size still takes a partition to itself");
        let (chosen, left) = walk(1, 600, 1000, 4);
        assert_eq!(chosen, vec![0; 4], "one partition: always it");
        assert!(left.is_empty(), "nothing is left behind when the next partition is the same one");
    }
}
