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

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use quiver_protocol::message::MemberRef;
use quiver_protocol::ErrorCode;
use tokio::sync::mpsc;

use crate::admin::Admin;
use crate::connection::Client;
use crate::error::ClientError;

mod acks;
mod config;
mod decode;
mod membership;
mod session;

use acks::AckState;
pub use config::ConsumerConfig;
use membership::{Membership, RoundRequest};
use session::PartitionConsumer;

/// A consumed message. Key, value and header values share the delivered buffer (no copy).
#[derive(Debug, Clone)]
#[non_exhaustive]
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

/// What [`Consumer::commit`] did, per partition (more may be reported later).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
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

/// What happened to the partitions of a group member (more kinds may come).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumerEvent {
    Assigned(Vec<u32>),
    /// Revoked partitions were committed (their ack floor) before they were given up.
    Revoked(Vec<u32>),
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
    /// broker no longer knows this member (it restarted, the group's coordinator moved, or the
    /// session expired), the consumer rejoins at once: the rejoin commits what was
    /// acknowledged before it for the partitions it gets back, and this commits their new
    /// sessions as the new member (never the old session's floor after a new session began:
    /// that could undo a newer commit). An error means a partition could not be committed
    /// (those before it may have been). A partition whose stream ended with a final
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
            // Forgotten by the broker, or the partition moved: let the membership catch up. The
            // floor read above belongs to the session that was running then; once a new one
            // runs (after a rejoin, which commits the old floors before anything restarts),
            // committing that old floor could undo a newer commit of another member or cover
            // what the new session hands out. So commit the session that runs now, if this
            // consumer still reads the partition.
            // The same member and session after the round (the refusal came from a broker that
            // had not taken over the group yet): once more, as before.
            match self.session_after_round(p).await {
                Some(Some((now, now_acks)))
                    if Some(&now) != member.as_ref() || !Arc::ptr_eq(&now_acks, &acks) =>
                {
                    match self.started(p).await {
                        Some((now, floor)) => {
                            admin.commit_offset_as(group, &self.config.topic, p, floor, Some(now)).await?;
                            report.committed.insert(p, floor);
                        }
                        None => report.skipped.push(p),
                    }
                }
                Some(Some((now, _))) => {
                    let floor = acks.floor();
                    admin.commit_offset_as(group, &self.config.topic, p, floor, Some(now)).await?;
                    report.committed.insert(p, floor);
                }
                Some(None) => report.revoked.push(p),
                None => return Err(refused),
            }
        }
        Ok(report)
    }

    /// Runs a membership round (heartbeat, rejoin if forgotten). `None` when it failed or there
    /// is no membership; else the member and session that now read `partition`, if this
    /// consumer does.
    async fn session_after_round(&self, partition: u32) -> Option<Option<(MemberRef, Arc<AckState>)>> {
        self.membership.as_ref()?;
        let (reply, done) = tokio::sync::oneshot::channel();
        self.shared.rounds.send(Some(reply)).await.ok()?;
        let bound = self.client.config().request_timeout * 3;
        let joined = tokio::time::timeout(bound, done).await.ok()?.ok()?;
        if !joined {
            return None;
        }
        let partitions = self.shared.partitions.lock();
        Some(partitions.get(&partition).and_then(|r| Some((r.member.clone()?, r.acks.clone()))))
    }

    /// The member and floor of `partition`'s session once the broker said where it starts,
    /// whichever session runs then (a first subscription that failed is started again with a
    /// new one); `None` if none started within the request timeout, or the partition went.
    async fn started(&self, partition: u32) -> Option<(MemberRef, u64)> {
        let deadline = tokio::time::Instant::now() + self.client.config().request_timeout;
        loop {
            let running = {
                let partitions = self.shared.partitions.lock();
                partitions.get(&partition).map(|r| (r.member.clone(), r.acks.clone()))
            };
            if let Some((Some(member), acks)) = running {
                if let Some(floor) = acks.committable() {
                    return Some((member, floor));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
