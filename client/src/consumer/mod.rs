//! The consumer: one subscription stream per partition, merged into one `Stream` of messages.
//!
//! Each partition tracks what the application acknowledged and sends it to the broker as
//! `AckRanges` (the contiguous acknowledged prefix, the ack floor, and the ranges above it).
//! The broker keeps acknowledgements per message (design.md §12): it frees the delivery window,
//! hands out again what is nacked or past its ack deadline (with a higher delivery count),
//! dead-letters what passed `max_deliveries`, and for a group persists the floor and the ranges
//! above it (lazily, or at once with `commit`). After a lost connection each partition
//! re-subscribes. Without a group it drops first deliveries of what it already handed out; with
//! a group, what it handed out and had not acknowledged comes back as a redelivery (count + 1),
//! as it would to another member.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use parking_lot::Mutex;
use quiver_protocol::batch::{BatchSplitter, RecordIter};
use quiver_protocol::message::{
    DeliveryRange, MemberRef, Message, RedeliveryPolicy, StartPosition, Subscribe,
};
use quiver_protocol::ErrorCode;
use rangemap::RangeSet;
use tokio::sync::{mpsc, Notify};

use crate::admin::Admin;
use crate::connection::{unexpected, Client};
use crate::error::ClientError;
use quiver_transport::{write_message, FrameReader};

mod membership;

use membership::{Membership, RoundRequest};

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
    /// With a group and no fixed `partitions`: join the group and consume the partitions the
    /// broker assigns, following rebalances. Without it, the consumer reads the partitions it
    /// is given and commits as the group's only consumer.
    pub membership: bool,
    /// A member that sends no heartbeat for this long is removed and its partitions move.
    pub session_timeout: Duration,
    /// The broker hands a message out again when it is not acknowledged within this.
    /// `None` (the default): only nacks and a new session (a rebalance, a reconnect) redeliver.
    pub ack_deadline: Option<Duration>,
    /// After this many deliveries the broker moves a message to `dead_letter_topic` instead of
    /// handing it out again. `None`: unlimited.
    pub max_deliveries: Option<u32>,
    /// Where messages past `max_deliveries` go: default `<topic>.dlq`, which the broker creates
    /// with 1 partition if missing; another topic must exist before subscribing.
    pub dead_letter_topic: Option<String>,
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
            membership: true,
            session_timeout: Duration::from_secs(10),
            ack_deadline: None,
            max_deliveries: None,
            dead_letter_topic: None,
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
    /// 1 on first delivery; higher when handed out again after a nack or a missed deadline.
    pub delivery_count: u32,
    acks: Arc<AckState>,
}

impl ConsumedMessage {
    /// Marks this message processed. Acks may come in any order; the broker learns the
    /// contiguous prefix.
    pub fn ack(&self) {
        self.acks.ack(self.offset);
    }

    /// Asks the broker to hand this message out again after `delay` (at once with `None`),
    /// with its delivery count + 1, or to dead-letter it once it reached `max_deliveries`.
    pub fn nack(&self, delay: Option<Duration>) {
        self.acks.nack(self.offset, delay.unwrap_or(Duration::ZERO));
    }
}

/// Deliveries (from all partitions) queued between the partition tasks and the application.
const DELIVERIES_BUFFERED: usize = 64;
/// Requests for a membership round queued for the membership task (one round answers all).
const ROUND_REQUESTS_QUEUED: usize = 64;

/// Acknowledgements of one partition.
#[derive(Debug)]
struct AckState {
    inner: Mutex<AckFloor>,
    changed: Notify,
    /// Set when the partition was revoked: its messages still buffered are dropped.
    revoked: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct AckFloor {
    /// Everything below is acknowledged.
    floor: u64,
    /// Acknowledged offsets above the floor.
    above: RangeSet<u64>,
    /// Nacked offsets not acknowledged since: they pass the reconnect filter when they come back
    /// (even as a first delivery, if the broker lost the nack with the connection).
    nacked: BTreeSet<u64>,
    /// Next offset to hand to the application (drops redeliveries after a reconnect).
    next_expected: u64,
    /// Whether the broker has told where consumption starts: until then the floor means
    /// nothing and is never committed.
    started: bool,
    /// Bumped by every ack, so the session knows when to tell the broker.
    version: u64,
    /// The version at which an ack wakes the session to send at once (between ticks); acks
    /// before it wait for the tick, so acking costs no wake-up per message.
    wake_at: u64,
    /// Nacks not yet sent: (offset, delay in ms).
    nacks: Vec<(u64, u32)>,
}

impl AckState {
    fn new() -> Self {
        AckState {
            inner: Mutex::new(AckFloor {
                floor: 0,
                above: RangeSet::new(),
                nacked: BTreeSet::new(),
                next_expected: 0,
                started: false,
                version: 0,
                wake_at: 0,
                nacks: Vec::new(),
            }),
            changed: Notify::new(),
            revoked: Default::default(),
        }
    }

    fn nack(&self, offset: u64, delay: Duration) {
        let delay_ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        let mut a = self.inner.lock();
        if offset >= a.floor && !a.above.contains(&offset) {
            a.nacks.push((offset, delay_ms));
            a.nacked.insert(offset);
        }
        drop(a);
        self.changed.notify_one();
    }

    fn ack(&self, offset: u64) {
        let mut a = self.inner.lock();
        if offset < a.floor {
            return;
        }
        a.version += 1;
        if offset == a.floor {
            a.floor += 1;
            a.merge_above();
        } else {
            a.above.insert(offset..offset + 1);
        }
        if !a.nacked.is_empty() {
            a.nacked.remove(&offset);
        }
        let wake = a.version >= a.wake_at;
        drop(a);
        if wake {
            self.changed.notify_one();
        }
    }

    fn floor(&self) -> u64 {
        self.inner.lock().floor
    }

    /// The floor to commit, once consumption has started.
    fn committable(&self) -> Option<u64> {
        let a = self.inner.lock();
        a.started.then_some(a.floor)
    }
}

/// The record count of a delivery, from its batch headers (an estimate for sizing only).
fn records_in(batches: &[u8]) -> usize {
    let mut pos = 0;
    let mut n = 0;
    while let Some(h) = batches.get(pos..).and_then(|b| quiver_protocol::BatchHeader::parse(b).ok()) {
        n += h.records_count as usize;
        pos += h.total_len();
    }
    // A record takes at least 7 bytes: a broker cannot make us reserve more than that allows.
    n.min(batches.len() / 7 + 1)
}

/// Acknowledged ranges above the floor per `AckRanges` frame; more go in further frames.
const MAX_RANGES_PER_ACK: usize = 4096;

impl AckFloor {
    /// Moves the floor over acknowledged ranges that now touch it.
    fn merge_above(&mut self) {
        if let Some(r) = self.above.get(&self.floor).cloned() {
            self.floor = r.end;
        }
        if self.above.first().is_some_and(|r| r.start < self.floor) {
            self.above.remove(0..self.floor);
        }
        if self.nacked.first().is_some_and(|o| *o < self.floor) {
            self.nacked = self.nacked.split_off(&self.floor);
        }
    }

    /// The broker settled these offsets (dead letters, or acknowledged by the group before).
    fn settle(&mut self, ranges: Vec<std::ops::Range<u64>>) {
        for r in ranges {
            if r.end <= self.floor {
                continue;
            }
            if r.start <= self.floor {
                self.floor = r.end;
            } else {
                self.above.insert(r);
            }
            self.merge_above();
        }
        self.version += 1;
    }

    /// Frames to send to the broker: nacks, and `AckRanges` when acks changed since `sent`
    /// and it is time (a tick, or `eager_gap` messages acknowledged). Returns the version sent.
    fn take_frames(&mut self, sent: Option<u64>, on_tick: bool, eager_gap: u64) -> (Vec<Message>, u64) {
        let mut frames = Vec::new();
        if !self.started {
            return (frames, sent.unwrap_or(0));
        }
        let changed = sent != Some(self.version);
        let due = on_tick || sent.is_none() || self.version - sent.unwrap_or(0) >= eager_gap;
        if changed && due {
            // All ranges the broker can remember (`MAX_ACKED_RANGES`), a frame per
            // `MAX_RANGES_PER_ACK`; the first frame also carries the floor alone if none.
            let mut ranges =
                self.above.iter().take(quiver_protocol::limits::MAX_ACKED_RANGES).cloned().peekable();
            loop {
                let chunk: Vec<std::ops::Range<u64>> = ranges.by_ref().take(MAX_RANGES_PER_ACK).collect();
                frames.push(Message::AckRanges { floor: self.floor, ranges: chunk });
                if ranges.peek().is_none() {
                    break;
                }
            }
        }
        for (offset, delay_ms) in self.nacks.drain(..) {
            frames.push(Message::Nack { offset, delay_ms });
        }
        let version = if changed && due { self.version } else { sent.unwrap_or(0) };
        self.wake_at = version + eager_gap;
        (frames, version)
    }

    /// Aligns local state with where a (re)subscription starts.
    fn reconcile(&mut self, start: u64, high_watermark: u64, first: bool, topic: &str, partition: u32) {
        if first || !self.started {
            // The broker decided where we start (committed offset or start position).
            self.floor = start;
            self.next_expected = start;
            self.started = true;
            return;
        }
        if self.next_expected > high_watermark.max(start) {
            // The log is shorter than what we handed out: the broker lost unsynced data
            // (durability interval/os) and will reuse those offsets. Start over from the broker.
            tracing::warn!(%topic, partition, handed_out = self.next_expected, high_watermark, "partition log went backwards; resuming from the broker's position");
            self.floor = start;
            self.above = RangeSet::new();
            self.nacked.clear();
            self.next_expected = start;
            return;
        }
        if start > self.floor {
            // Retention removed offsets we had not acknowledged (they can never be acked now),
            // or the group acknowledged them in other sessions.
            self.floor = start;
            self.merge_above();
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
/// What [`Consumer::commit`] did, per partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Partitions committed, with the offset committed (everything below it is acknowledged;
    /// the group resumes there).
    pub committed: std::collections::BTreeMap<u32, u64>,
    /// Partitions read by this consumer whose subscription has not started yet (just assigned,
    /// or still subscribing): nothing was acknowledged there, nothing was committed.
    pub skipped: Vec<u32>,
    /// Partitions that moved to another member before their acknowledgements could be
    /// committed: what was acknowledged there since the last commit is delivered again to the
    /// new owner.
    pub revoked: Vec<u32>,
}

impl CommitReport {
    /// Whether every partition this consumer reads was committed.
    pub fn is_complete(&self) -> bool {
        self.skipped.is_empty() && self.revoked.is_empty()
    }
}

/// What happened to the partitions of a group member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerEvent {
    Assigned(Vec<u32>),
    /// Revoked partitions were committed (their ack floor) before they were given up.
    Revoked(Vec<u32>),
}

#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    /// One item per delivery (a whole `Deliver` frame's records), so the channel costs one
    /// send and wake-up per delivery, not per message.
    rx: mpsc::Receiver<Result<Vec<ConsumedMessage>, ClientError>>,
    /// The delivery being handed out (moved here whole, not copied message by message).
    buffered: std::vec::IntoIter<ConsumedMessage>,
    shared: Arc<Shared>,
    membership: Option<tokio::task::JoinHandle<()>>,
    events: Option<mpsc::UnboundedReceiver<ConsumerEvent>>,
}

/// State the consumer shares with its membership task.
#[derive(Debug)]
struct Shared {
    topic: Arc<str>,
    tx: mpsc::Sender<Result<Vec<ConsumedMessage>, ClientError>>,
    partitions: parking_lot::Mutex<std::collections::BTreeMap<u32, Running>>,
    /// This consumer's group member id, once joined.
    member_id: parking_lot::Mutex<Option<String>>,
    /// Asks the membership task (if any) for a heartbeat, and a rejoin if the broker forgot
    /// the member, now rather than at the next interval.
    rounds: mpsc::Sender<RoundRequest>,
}

#[derive(Debug)]
struct Running {
    acks: Arc<AckState>,
    member: Option<MemberRef>,
    task: tokio::task::JoinHandle<()>,
}

impl Shared {
    /// Starts consuming a partition; the receiver says whether the subscription worked.
    fn start(
        self: &Arc<Self>,
        client: &Client,
        config: &ConsumerConfig,
        partition: u32,
        member: Option<MemberRef>,
    ) -> tokio::sync::oneshot::Receiver<Result<(), ClientError>> {
        let acks = Arc::new(AckState::new());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = PartitionConsumer {
            client: client.clone(),
            config: config.clone(),
            topic: self.topic.clone(),
            partition,
            acks: acks.clone(),
            member: member.clone(),
            tx: self.tx.clone(),
            rounds: self.rounds.clone(),
        };
        let task = tokio::spawn(task.run(ready_tx));
        self.partitions.lock().insert(partition, Running { acks, member, task });
        ready_rx
    }

    fn stop_all(&self) {
        for (_, r) in std::mem::take(&mut *self.partitions.lock()) {
            r.task.abort();
        }
    }
}

impl Consumer {
    /// Looks the topic up (failing fast on an unknown topic) and subscribes: with a group (and
    /// `membership`), to the partitions the group assigns; otherwise to the selected ones.
    pub async fn subscribe(client: Client, config: ConsumerConfig) -> Result<Consumer, ClientError> {
        if let Some(g) = &config.group {
            quiver_protocol::message::validate_group_name(g)
                .map_err(|message| ClientError::Broker { code: ErrorCode::InvalidGroup, message })?;
        }
        let admin = Admin::new(client.clone());
        let info = admin.describe_topic(&config.topic).await?;
        let all: Vec<u32> = info.partitions.iter().map(|p| p.partition).collect();
        let (tx, rx) = mpsc::channel(DELIVERIES_BUFFERED);
        let (rounds, round_requests) = mpsc::channel(ROUND_REQUESTS_QUEUED);
        let shared = Arc::new(Shared {
            topic: Arc::from(config.topic.as_str()),
            tx,
            partitions: Default::default(),
            member_id: Default::default(),
            rounds,
        });
        let mut consumer = Consumer {
            client: client.clone(),
            config: config.clone(),
            rx,
            buffered: Default::default(),
            shared,
            membership: None,
            events: None,
        };
        let (selected, member) = match (&config.group, &config.partitions) {
            (Some(group), None) if config.membership => {
                let a = admin.join_group(group, &config.topic, None, config.session_timeout).await?;
                *consumer.shared.member_id.lock() = Some(a.member_id.clone());
                let member = MemberRef { member_id: a.member_id.clone(), generation: a.generation };
                (a.partitions, Some(member))
            }
            (_, None) => (all, None),
            (_, Some(ps)) => {
                if let Some(p) = ps.iter().find(|p| !all.contains(p)) {
                    return Err(ClientError::Broker {
                        code: ErrorCode::UnknownPartition,
                        message: format!("topic '{}' has no partition {p}", config.topic),
                    });
                }
                (ps.clone(), None)
            }
        };
        let ready: Vec<_> =
            selected.iter().map(|p| consumer.shared.start(&client, &config, *p, member.clone())).collect();
        // Wait until every partition is subscribed, so errors surface here.
        for r in ready {
            match r.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    consumer.shared.stop_all();
                    return Err(e);
                }
                Err(_) => return Err(ClientError::Closed),
            }
        }
        if let Some(m) = member {
            let (events_tx, events_rx) = mpsc::unbounded_channel();
            let _ = events_tx.send(ConsumerEvent::Assigned(selected));
            let task = Membership { client, config, shared: consumer.shared.clone(), events: events_tx };
            consumer.membership = Some(tokio::spawn(task.run(m, round_requests)));
            consumer.events = Some(events_rx);
        }
        Ok(consumer)
    }

    /// Partition assignments and revocations of a group member (once; `None` afterwards or
    /// without membership).
    pub fn events(&mut self) -> Option<mpsc::UnboundedReceiver<ConsumerEvent>> {
        self.events.take()
    }

    /// Partitions this consumer reads now.
    pub fn assignment(&self) -> Vec<u32> {
        self.shared.partitions.lock().keys().copied().collect()
    }

    /// Durably commits each partition's ack floor for the group and reports, per partition,
    /// what was committed (nothing without a group). A partition whose subscription has not
    /// started yet has nothing to commit and is listed in `skipped`; one that moved to another
    /// member before its acknowledgements could be committed is listed in `revoked`. When the
    /// broker no longer knows this member (it restarted, or the session expired), the consumer
    /// rejoins at once and commits as the new member; an error means a partition could not be
    /// committed (those before it may have been). A partition whose stream ended with a final
    /// error (damaged data, say) is still committed up to what the application acknowledged:
    /// call this after the error, before closing, so the group resumes there.
    pub async fn commit(&self) -> Result<CommitReport, ClientError> {
        let mut report = CommitReport::default();
        let Some(group) = &self.config.group else { return Ok(report) };
        let admin = Admin::new(self.client.clone());
        let running: Vec<(u32, Arc<AckState>, Option<MemberRef>)> = self
            .shared
            .partitions
            .lock()
            .iter()
            .map(|(p, r)| (*p, r.acks.clone(), r.member.clone()))
            .collect();
        for (p, acks, member) in running {
            let Some(floor) = acks.committable() else {
                report.skipped.push(p);
                continue;
            };
            let refused =
                match admin.commit_offset_as(group, &self.config.topic, p, floor, member.clone()).await {
                    Ok(()) => {
                        report.committed.insert(p, floor);
                        continue;
                    }
                    Err(e) if member.is_some() && e.code() == Some(ErrorCode::FencedMember) => e,
                    Err(e) => return Err(e),
                };
            // Forgotten by the broker, or the partition moved: let the membership catch up, then
            // commit as the member that holds the partition now.
            match self.member_after_round(p).await {
                Some(Some(now)) if Some(&now) != member.as_ref() => {
                    let floor = acks.floor();
                    admin.commit_offset_as(group, &self.config.topic, p, floor, Some(now)).await?;
                    report.committed.insert(p, floor);
                }
                Some(None) => report.revoked.push(p),
                _ => return Err(refused),
            }
        }
        Ok(report)
    }

    /// Runs a membership round (heartbeat, rejoin if forgotten). `None` when it failed or there
    /// is no membership; else the member that now reads `partition`, if this consumer does.
    async fn member_after_round(&self, partition: u32) -> Option<Option<MemberRef>> {
        self.membership.as_ref()?;
        let (reply, done) = tokio::sync::oneshot::channel();
        self.shared.rounds.send(Some(reply)).await.ok()?;
        let bound = self.client.config().request_timeout * 3;
        let joined = tokio::time::timeout(bound, done).await.ok()?.ok()?;
        if !joined {
            return None;
        }
        Some(self.shared.partitions.lock().get(&partition).and_then(|r| r.member.clone()))
    }

    /// Stops the subscriptions and leaves the group (waiting for the broker to take note, so
    /// the partitions are free for others at once). Uncommitted acknowledgements are not
    /// committed here: call `commit` first.
    pub async fn close(mut self) {
        if let Some((group, member_id)) = self.stop() {
            let _ = Admin::new(self.client.clone()).leave_group(&group, &member_id).await;
        }
    }

    /// Stops everything; returns the membership to leave, if any.
    fn stop(&mut self) -> Option<(String, String)> {
        if let Some(m) = self.membership.take() {
            m.abort();
        }
        self.shared.stop_all();
        let member_id = self.shared.member_id.lock().take()?;
        Some((self.config.group.clone()?, member_id))
    }
}

impl Drop for Consumer {
    /// Dropping without `close` leaves the group in the background.
    fn drop(&mut self) {
        if let Some((group, member_id)) = self.stop() {
            let admin = Admin::new(self.client.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = admin.leave_group(&group, &member_id).await;
                });
            }
        }
    }
}

impl Stream for Consumer {
    type Item = Result<ConsumedMessage, ClientError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(m) = self.buffered.next() {
                if m.acks.revoked.load(std::sync::atomic::Ordering::Acquire) {
                    continue; // its partition went to another member
                }
                return Poll::Ready(Some(Ok(m)));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(batch))) => self.buffered = batch.into_iter(),
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
    member: Option<MemberRef>,
    tx: mpsc::Sender<Result<Vec<ConsumedMessage>, ClientError>>,
    rounds: mpsc::Sender<RoundRequest>,
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
                Err(e)
                    if ready.is_none()
                        && self.member.is_some()
                        && e.code() == Some(ErrorCode::FencedMember) =>
                {
                    // The group moved on (a rebalance, or the broker restarted and forgot the
                    // member): the membership task rejoins and restarts partitions.
                    tracing::debug!(topic = %self.topic, partition = self.partition, "partition fenced ({e}); leaving it to the membership task");
                    // At once: after a broker restart the member must rejoin before anything
                    // (commits included) works again. A full queue means a round is coming.
                    let _ = self.rounds.try_send(None);
                    return;
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
                    Some(Message::Error { code, message }) => return Err(ClientError::Broker { code, message }),
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

    /// Hands a delivery's records to the application: all of them, or with `ranges` only
    /// those in a range, with its delivery count. Returns the number of records received, or
    /// `None` once the application is gone.
    async fn deliver(
        &self,
        batches: Bytes,
        ranges: Option<&[DeliveryRange]>,
    ) -> Result<Option<u64>, ClientError> {
        let mut count = 0;
        // Sized once from the batch headers, so the vector never grows by copying.
        let mut out = Vec::with_capacity(match ranges {
            // A redelivery may carry a whole batch for one record.
            Some(ranges) => {
                ranges.iter().map(|r| r.end.saturating_sub(r.start)).sum::<u64>().min(1 << 16) as usize
            }
            None => records_in(&batches),
        });
        // Only this task moves `next_expected`, so it is read once and written back once.
        let (mut expected, nacked) = {
            let a = self.acks.inner.lock();
            (a.next_expected, if a.nacked.is_empty() { BTreeSet::new() } else { a.nacked.clone() })
        };
        let mut range = 0;
        let mut reacked = false;
        for item in BatchSplitter::new(batches) {
            let (header, batch) =
                item.map_err(|e| ClientError::Protocol(format!("corrupt delivery: {e}")))?;
            for record in RecordIter::new(batch, header) {
                let r = record.map_err(|e| ClientError::Protocol(format!("corrupt record: {e}")))?;
                count += 1;
                let delivery_count = match ranges {
                    None => 1,
                    Some(ranges) => {
                        while range < ranges.len() && ranges[range].end <= r.offset {
                            range += 1;
                        }
                        match ranges.get(range) {
                            Some(d) if d.start <= r.offset => d.delivery_count,
                            _ => continue, // acknowledged already, or before our position
                        }
                    }
                };
                if r.offset < expected && !nacked.contains(&r.offset) {
                    if delivery_count <= 1 {
                        continue; // the batch began before our position, or handed out before a reconnect
                    }
                    // Handed out again (its ack deadline passed, or a new session began) after
                    // the application acknowledged it, before the broker heard: say it again
                    // instead of handing the message out twice. Only redeliveries get here.
                    let mut a = self.acks.inner.lock();
                    if r.offset < a.floor || a.above.contains(&r.offset) {
                        a.version += 1;
                        reacked = true;
                        continue;
                    }
                }
                expected = expected.max(r.offset + 1);
                out.push(ConsumedMessage {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset: r.offset,
                    timestamp_ms: r.timestamp,
                    key: r.key,
                    value: r.value,
                    headers: r.headers,
                    delivery_count,
                    acks: self.acks.clone(),
                });
            }
        }
        self.acks.inner.lock().next_expected = expected;
        if reacked {
            self.acks.changed.notify_one();
        }
        if !out.is_empty() && self.tx.send(Ok(out)).await.is_err() {
            return Ok(None);
        }
        Ok(Some(count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_acknowledged_range_reaches_the_broker() {
        let state = AckState::new();
        let mut a = state.inner.lock();
        a.started = true;
        // 5,000 disjoint acknowledged offsets above the floor: more than one frame holds.
        for i in 0..5_000u64 {
            a.above.insert(2 * i + 1..2 * i + 2);
        }
        a.version = 1;
        let (frames, version) = a.take_frames(None, true, 1);
        assert_eq!(version, 1);
        let mut sent = Vec::new();
        for f in &frames {
            match f {
                Message::AckRanges { floor, ranges } => {
                    assert_eq!(*floor, 0);
                    assert!(ranges.len() <= MAX_RANGES_PER_ACK);
                    sent.extend(ranges.iter().cloned());
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(sent, a.above.iter().cloned().collect::<Vec<_>>(), "every range, in order");

        // With nothing above the floor, one frame carries the floor alone.
        a.above = RangeSet::new();
        a.floor = 7;
        a.version = 2;
        let (frames, _) = a.take_frames(Some(1), true, 1);
        assert_eq!(frames, vec![Message::AckRanges { floor: 7, ranges: Vec::new() }]);
    }
}
