//! Group membership of a consumer: heartbeats, following rebalances (revoked partitions are
//! committed and stopped before the member confirms), rejoining after being fenced.

use std::sync::Arc;
use std::time::Duration;

use quiver_protocol::message::MemberRef;
use quiver_protocol::ErrorCode;
use tokio::sync::mpsc;

use crate::admin::Admin;
use crate::admin::GroupAssignment as AssignmentMsg;
use crate::connection::Client;
use crate::error::ClientError;

use super::{ConsumerConfig, ConsumerEvent, Shared};

/// Keeps a group member alive and follows rebalances: revoked partitions are committed and
/// stopped before the member confirms (by heartbeating with the new generation), new ones
/// are started.
pub(super) struct Membership {
    pub(super) client: Client,
    pub(super) config: ConsumerConfig,
    pub(super) shared: Arc<Shared>,
    pub(super) events: mpsc::UnboundedSender<ConsumerEvent>,
}

/// A request for a membership round now (a heartbeat, and a rejoin if the broker forgot the
/// member), with where to say it is done.
/// The reply says whether the member is in the group after the round.
pub(super) type RoundRequest = Option<tokio::sync::oneshot::Sender<bool>>;

impl Membership {
    /// Heartbeats every third of the session, and at once when asked (a partition or a commit
    /// was fenced) or when the connection was re-established (the broker may have restarted
    /// and forgotten the member): a forgotten member rejoins then, not a heartbeat later.
    pub(super) async fn run(self, mut member: MemberRef, mut requests: mpsc::Receiver<RoundRequest>) {
        let Some(group) = self.config.group.clone() else { return };
        let admin = Admin::new(self.client.clone());
        let mut reconnects = self.client.reconnects();
        // The broker clamps sessions to 0.5..=300 s; heartbeat at a third of what it uses.
        let session = self.config.session_timeout.clamp(Duration::from_millis(500), Duration::from_secs(300));
        let interval = session / 3;
        let mut wait = interval;
        let mut waiting: Vec<tokio::sync::oneshot::Sender<bool>> = Vec::new();
        // Whether the connection was re-established since the last heartbeat the broker took:
        // then a fenced member is what a broker restart does, not a session that expired.
        let mut reconnected = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = reconnects.changed() => {
                    if changed.is_err() {
                        return; // the client is gone
                    }
                    reconnected = true;
                }
                request = requests.recv() => match request {
                    Some(reply) => waiting.extend(reply),
                    None => return, // the consumer is gone
                },
            }
            while let Ok(reply) = requests.try_recv() {
                waiting.extend(reply);
            }
            wait = interval;
            let joined = match admin.heartbeat(&group, &member.member_id, member.generation).await {
                Ok(a) => {
                    reconnected = false;
                    if self.apply(&admin, &group, &mut member, a).await {
                        wait = Duration::ZERO; // confirm the change at once
                    }
                    true
                }
                // Final: the topic is gone, or this client may no longer use the group.
                Err(
                    e @ ClientError::Broker {
                        code: ErrorCode::TopicDeleted | ErrorCode::NotAuthorized | ErrorCode::Unauthenticated,
                        ..
                    },
                ) => {
                    return self.topic_deleted(&group, e, waiting).await;
                }
                Err(ClientError::Broker { code: ErrorCode::FencedMember, message }) => {
                    // Removed from the group (session expired, or the broker restarted): what we
                    // held is gone. Join again.
                    // (A reconnect made by this very heartbeat has not been seen by the select.)
                    let restarted = reconnects.has_changed().unwrap_or(false);
                    reconnects.borrow_and_update();
                    if std::mem::take(&mut reconnected) || restarted {
                        // The expected course of a broker restart: memberships live in memory.
                        tracing::info!(%group, "the broker no longer knows this member (it restarted); joining the group again");
                    } else {
                        tracing::warn!(%group, "left the group ({message}); joining again");
                    }
                    let joined = match self.rejoin(&admin, &group, &mut member).await {
                        Ok(joined) => joined,
                        Err(e) => return self.topic_deleted(&group, e, waiting).await,
                    };
                    if joined {
                        wait = Duration::ZERO;
                    }
                    joined
                }
                Err(e) => {
                    tracing::debug!(%group, "heartbeat failed: {e}");
                    false
                }
            };
            for reply in waiting.drain(..) {
                let _ = reply.send(joined);
            }
        }
    }

    /// The group's topic was deleted, or the client lost its permission to use the group or
    /// topic: final. The partitions stop and the consumer's stream ends with `error` (after
    /// what was delivered before); the member never joins again, so it cannot move to a topic
    /// created again under the name.
    async fn topic_deleted(
        &self,
        group: &str,
        error: ClientError,
        waiting: Vec<tokio::sync::oneshot::Sender<bool>>,
    ) {
        tracing::debug!(%group, topic = %self.config.topic, "the group's topic was deleted: {error}");
        self.shared.stop_all();
        // The broker dropped the group with the topic: nothing to leave.
        *self.shared.member_id.lock() = None;
        for reply in waiting {
            let _ = reply.send(false);
        }
        let _ = self.shared.tx.send(Err(error)).await;
    }

    /// Joins again as a new member. What the application acknowledged under the old member is
    /// committed as the new one for the partitions it gets back, so those acknowledgements are
    /// not lost with the old membership. Returns whether the join worked; an error when the
    /// topic is gone (deleted, or unknown: the broker forgot the group across a restart after
    /// the delete), which is final.
    async fn rejoin(&self, admin: &Admin, group: &str, member: &mut MemberRef) -> Result<bool, ClientError> {
        let (floors, lost): (Vec<(u32, u64)>, Vec<u32>) = {
            let partitions = self.shared.partitions.lock();
            // The old member's sessions are over: what they still have buffered is dropped
            // before the application sees it (the partition may go to another member, which
            // can commit past it: seed 1215 handed such records out after that commit).
            for r in partitions.values() {
                r.acks.revoked.store(true, std::sync::atomic::Ordering::Release);
            }
            (
                partitions.iter().filter_map(|(p, r)| Some((*p, r.acks.committable()?))).collect(),
                partitions.keys().copied().collect(),
            )
        };
        self.shared.stop_all();
        if !lost.is_empty() {
            // Those it gets back are announced again by `apply` below.
            let _ = self.events.send(ConsumerEvent::Revoked(lost));
        }
        let a = match admin.join_group(group, &self.config.topic, None, self.config.session_timeout).await {
            Ok(a) => a,
            Err(
                e @ ClientError::Broker {
                    code: ErrorCode::TopicDeleted | ErrorCode::NotAuthorized | ErrorCode::Unauthenticated,
                    ..
                },
            ) => return Err(e),
            Err(ClientError::Broker { code: ErrorCode::UnknownTopic, .. }) => {
                return Err(ClientError::Broker {
                    code: ErrorCode::TopicDeleted,
                    message: format!("topic '{}' was deleted", self.config.topic),
                })
            }
            Err(e) => {
                tracing::warn!(%group, "joining again failed: {e}");
                return Ok(false);
            }
        };
        let new = MemberRef { member_id: a.member_id.clone(), generation: a.generation };
        for (p, floor) in floors.into_iter().filter(|(p, _)| a.partitions.contains(p)) {
            if let Err(e) =
                admin.commit_offset_as(group, &self.config.topic, p, floor, Some(new.clone())).await
            {
                tracing::warn!(%group, partition = p, "committing acknowledgements after rejoining failed: {e}");
            }
        }
        *member = MemberRef { member_id: a.member_id.clone(), generation: 0 };
        *self.shared.member_id.lock() = Some(a.member_id.clone());
        self.apply(admin, group, member, a).await;
        Ok(true)
    }

    /// Applies an assignment; returns whether anything changed.
    async fn apply(&self, admin: &Admin, group: &str, member: &mut MemberRef, a: AssignmentMsg) -> bool {
        let current: Vec<u32> = self.shared.partitions.lock().keys().copied().collect();
        let revoked: Vec<u32> = current.iter().copied().filter(|p| !a.partitions.contains(p)).collect();
        let added: Vec<u32> = a.partitions.iter().copied().filter(|p| !current.contains(p)).collect();
        for p in &revoked {
            let running = self.shared.partitions.lock().remove(p);
            if let Some(r) = running {
                r.task.abort();
                // Whatever of it is still buffered is dropped before the application sees it.
                r.acks.revoked.store(true, std::sync::atomic::Ordering::Release);
                let Some(floor) = r.acks.committable() else { continue };
                // Commit what was acknowledged, so the next owner starts right after it.
                if let Err(e) = admin.commit_offset_as(group, &self.config.topic, *p, floor, r.member).await {
                    tracing::warn!(%group, partition = p, "commit on revocation failed: {e}");
                }
            }
        }
        member.generation = a.generation;
        for p in &added {
            let ready = self.shared.start(&self.client, &self.config, *p, Some(member.clone()));
            // If its first subscription fails, forget the partition: the next heartbeat sees it
            // assigned but not running and starts it again.
            let (shared, partition) = (self.shared.clone(), *p);
            tokio::spawn(async move {
                if let Ok(Err(e)) = ready.await {
                    tracing::debug!(partition, "starting an assigned partition failed ({e}); will retry");
                    shared.partitions.lock().remove(&partition);
                }
            });
        }
        if !revoked.is_empty() {
            let _ = self.events.send(ConsumerEvent::Revoked(revoked.clone()));
        }
        if !added.is_empty() {
            let _ = self.events.send(ConsumerEvent::Assigned(added.clone()));
        }
        !revoked.is_empty() || !added.is_empty()
    }
}
