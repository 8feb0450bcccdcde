//! Partitions this broker holds no replica of (placement with fewer replicas than brokers,
//! docs/replication.md §2b): it still knows their leader, term, commit and offsets from what
//! their leaders tell it (`Leaders` notices), answers metadata and status for them from that,
//! forwards their produce requests to the leader (`requests::produce`, through the observer's
//! status as for any group) and hands their reads to a broker that holds them.
//!
//! Notices: every `ROUND`, and at once when a group here elects this broker, a broker sends each
//! peer one `Leaders` frame (in chunks) naming the groups it leads of which that peer holds no
//! replica (an empty one when there are none: the frame is also a liveness signal). A receiving broker takes a notice only from a replica of that group and only for a
//! term at least the one it knows; a leader not heard of within `NOTICE_TTL` is forgotten (it may
//! be gone: clients then look elsewhere instead of at a dead broker).

use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_protocol::message::{LeaderNotice, MemberRef, Message, PartitionOffsets};
use quiver_protocol::ErrorCode;
use quiver_transport::{write_message, FrameReader};
use tokio::sync::{mpsc, watch};

use super::driver::GroupStatus;
use super::{Cluster, GroupHandle, FORWARD_TIMEOUT};
use crate::partition::PartitionError;
use crate::topics::Topics;

/// How often a leader tells the other brokers what it leads.
pub(crate) const ROUND: Duration = Duration::from_millis(500);
/// A leader not heard of for this long is forgotten (several rounds, well past an election).
pub(crate) const NOTICE_TTL: Duration = Duration::from_secs(2);
/// How long `cluster status` waits for a leader's view of the partitions it leads.
const STATUS_TIMEOUT: Duration = Duration::from_millis(500);
/// Notices per `Leaders` frame (each about 60 bytes: a frame stays far below the frame limit).
const NOTICES_PER_FRAME: usize = 2048;
/// How often a spliced group subscription re-checks here that its member still owns the
/// partition (the broker serving it cannot: the membership lives here).
const OWNER_CHECK: Duration = Duration::from_secs(1);
/// Most bytes a relay takes from the serving broker at once (one charge to the quota).
const RELAY_CHUNK_BYTES: usize = 64 * 1024;

/// What this broker knows of a group it holds no replica of.
#[derive(Debug)]
pub(crate) struct Observed {
    status: watch::Sender<GroupStatus>,
    replicas: Vec<u64>,
    heard: Instant,
    log_start_offset: u64,
    high_watermark: u64,
}

/// A handle for a group this broker only observes: its status follows the notices; its queues
/// lead nowhere (nothing is ever proposed or stepped here).
pub(crate) fn observer(replicas: &[u64]) -> (GroupHandle, Observed) {
    let (events, _) = mpsc::channel(1);
    let (proposals, _) = mpsc::channel(1);
    let (status, status_rx) = watch::channel(GroupStatus::default());
    let desired = Arc::new(watch::channel(replicas.to_vec()).0);
    let observed = Observed {
        status,
        replicas: replicas.to_vec(),
        heard: Instant::now(),
        log_start_offset: 0,
        high_watermark: 0,
    };
    (GroupHandle { events, proposals, status: status_rx, desired }, observed)
}

impl Observed {
    /// The partition's replicas changed (brokers added or removed, §11).
    pub(crate) fn set_replicas(&mut self, replicas: &[u64]) {
        self.replicas = replicas.to_vec();
    }
}

impl Cluster {
    /// Takes the notices of peer `from`.
    pub(crate) fn observe(&self, from: u64, notices: Vec<LeaderNotice>) {
        let now = Instant::now();
        for n in notices {
            let Some(mut o) = self.observed.get_mut(&n.group) else {
                self.leave_if_moved_away(from, &n);
                continue;
            };
            // From a replica, or (a partition moving, §11) from any broker of the cluster.
            let member = o.replicas.contains(&from) || self.members.read().contains_key(&from);
            if !member || n.term < o.status.borrow().term {
                continue;
            }
            o.heard = now;
            o.log_start_offset = n.log_start_offset;
            o.high_watermark = n.high_watermark;
            let next = GroupStatus {
                leader: Some(from),
                term: n.term,
                commit: n.commit,
                in_sync: n.in_sync.iter().map(|&i| u64::from(i)).collect(),
                lag: n.lag,
                ..GroupStatus::default()
            };
            o.status.send_if_modified(|s| {
                let changed = *s != next;
                if changed {
                    *s = next;
                }
                changed
            });
        }
    }

    /// A notice for a group this broker runs a replica of. If the leader's applied configuration
    /// does not have this broker, a committed change removed it: the replica stops and the
    /// partition is observed (§11). A replica that was down while that change committed never
    /// hears of it otherwise (the leader sends nothing more to a removed replica) and would sit
    /// there without a leader. (If this broker is to hold a replica again, `reconcile` starts a
    /// new one, which the leader adds as a learner.)
    fn leave_if_moved_away(&self, from: u64, n: &LeaderNotice) {
        let me = self.config.node_id;
        // The leader's applied configuration has this broker (a voter being moved away, still
        // counted; a learner): it stays. Its applied configuration comes from committed changes,
        // so a replica outside it is removed for good.
        if n.members.is_empty() || n.members.contains(&(me as u32)) || from == me {
            return;
        }
        let Some(running) = self.groups.get(&n.group).map(|g| g.status.clone()) else { return };
        let status = running.borrow().clone();
        if n.term < status.term || status.leader == Some(me) {
            return;
        }
        tracing::info!(group = n.group, leader = from, "the group's leader counts this replica out of it: stopped, the partition is observed from here on");
        self.observe_instead(n.group, &running);
    }

    /// Stops the replica of `group` here whose status is `running` (dropping its handle ends
    /// its driver) and observes the group instead; nothing if another replica or an observer
    /// took its place since.
    pub(crate) fn observe_instead(&self, group: u64, running: &watch::Receiver<GroupStatus>) {
        let replicas = self
            .partitions
            .iter()
            .find(|e| e.value().0 == group)
            .map(|e| e.value().1.clone())
            .unwrap_or_default();
        let Some(mut slot) = self.groups.get_mut(&group) else { return };
        if !slot.status.same_channel(running) {
            return;
        }
        // Its driver ends once the last handle is gone; no replica of the group starts here
        // before (two drivers on one log). Recorded before the group shows as observed: a
        // `follow_members` round in between would otherwise start a second driver.
        self.ending.insert(group, running.clone());
        let (handle, observed) = observer(&replicas);
        self.observed.insert(group, observed);
        *slot = handle;
    }

    /// Forgets leaders not heard of within `NOTICE_TTL`.
    fn expire_notices(&self, now: Instant) {
        for o in self.observed.iter() {
            if now.duration_since(o.heard) > NOTICE_TTL && o.status.borrow().leader.is_some() {
                o.status.send_modify(|s| s.leader = None);
            }
        }
    }

    /// The log start and high watermark of `topic`/`partition` when this broker holds no
    /// replica of it, as its leader last said.
    pub(crate) fn observed_group(&self, topic: &str, partition: u32) -> Option<(u64, u64)> {
        let group = self.partitions.get(&(topic.to_string(), partition))?.value().0;
        self.observed.get(&group).map(|o| (o.log_start_offset, o.high_watermark))
    }

    /// Where a read of `topic`/`partition` goes when this broker holds no replica of it: the
    /// first of its replicas, in placement order, that this broker has a live link to (so a
    /// group's subscription state stays on one broker while that broker is up). `None`: read
    /// here (one node, a replica here, or a partition the cluster does not know). A request a
    /// peer forwarded (`from_peer`) is never forwarded again: it is refused instead.
    pub(crate) fn remote_reader(
        &self,
        topic: &str,
        partition: u32,
        from_peer: bool,
    ) -> Option<Result<u64, PartitionError>> {
        let entry = self.partitions.get(&(topic.to_string(), partition))?;
        let replicas = &entry.value().1;
        if replicas.contains(&self.config.node_id) {
            return None;
        }
        if from_peer {
            return Some(Err(PartitionError::new(
                ErrorCode::NotLeader,
                format!("broker {} holds no replica of {topic}/{partition}", self.config.node_id),
            )));
        }
        Some(replicas.iter().copied().find(|&r| self.links.is_up(r)).ok_or_else(|| {
            PartitionError::new(
                ErrorCode::NotLeader,
                format!(
                    "broker {} holds no replica of {topic}/{partition} and reaches none of its replicas {replicas:?}; retry",
                    self.config.node_id
                ),
            )
        }))
    }

    /// Sends a read request to broker `target` and returns its answer as this broker's.
    pub(crate) async fn read_remote(
        &self,
        target: u64,
        request: &Message,
    ) -> Result<Message, PartitionError> {
        self.links.request(target, request, FORWARD_TIMEOUT).await
    }

    /// `status` with what only a partition's leader knows (its in-sync replicas, its lag) taken
    /// from the leaders of the partitions this broker follows, asked once each (briefly: a
    /// leader that does not answer leaves its rows as they are).
    pub(crate) async fn leaders_view(&self, status: Message) -> Message {
        let Message::ClusterStatusOk { brokers, mut partitions } = status else { return status };
        let me = self.config.node_id as u32;
        let followed = |row: &quiver_protocol::message::ReplicaStatus| {
            row.leader.filter(|&l| l != me && row.replicas.contains(&me) && self.links.is_up(u64::from(l)))
        };
        let mut leaders: Vec<u32> = partitions.iter().filter_map(followed).collect();
        leaders.sort_unstable();
        leaders.dedup();
        let views = futures::future::join_all(leaders.iter().map(|&l| async move {
            match self.links.request(u64::from(l), &Message::ClusterStatus, STATUS_TIMEOUT).await {
                Ok(Message::ClusterStatusOk { partitions, .. }) => (l, partitions),
                _ => (l, Vec::new()),
            }
        }))
        .await;
        let views: std::collections::BTreeMap<u32, Vec<_>> = views.into_iter().collect();
        for row in partitions.iter_mut() {
            let Some(leader) = followed(row) else { continue };
            let theirs = views.get(&leader).and_then(|v| {
                v.iter().find(|r| {
                    r.topic == row.topic && r.partition == row.partition && r.leader == Some(leader)
                })
            });
            if let Some(theirs) = theirs {
                row.in_sync = theirs.in_sync.clone();
                row.lag = theirs.lag;
            }
        }
        Message::ClusterStatusOk { brokers, partitions }
    }

    /// `FetchOffsets` rows of the partitions read elsewhere replaced by those brokers' rows.
    pub(crate) async fn remote_offsets(
        &self,
        group: &str,
        topic: &str,
        mut rows: Vec<PartitionOffsets>,
    ) -> Result<Vec<PartitionOffsets>, PartitionError> {
        let mut asked: std::collections::BTreeMap<u64, Vec<PartitionOffsets>> = Default::default();
        for row in rows.iter_mut() {
            let Some(target) = self.remote_reader(topic, row.partition, false) else { continue };
            let target = target?;
            let theirs = match asked.entry(target) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let request =
                        Message::FetchOffsets { group: group.to_string(), topic: topic.to_string() };
                    v.insert(match self.read_remote(target, &request).await? {
                        Message::Offsets(o) => o,
                        Message::Error { code, message, .. } => {
                            return Err(PartitionError::new(code, message))
                        }
                        other => {
                            return Err(PartitionError::new(
                                ErrorCode::Internal,
                                format!(
                                    "broker {target} answered FetchOffsets with frame kind {}",
                                    other.kind()
                                ),
                            ))
                        }
                    })
                }
            };
            if let Some(theirs) = theirs.iter().find(|o| o.partition == row.partition) {
                // A coordinator's replicated store may be ahead of a replica that served the
                // partition for a while only (`requests::commit` writes both).
                let ours = row.committed;
                *row = theirs.clone();
                row.committed = row.committed.max(ours);
            }
        }
        Ok(rows)
    }
}

/// Tells the other brokers, every `ROUND` and when a group here elects this broker, which
/// groups this broker leads of those they hold no replica of; forgets stale notices.
pub(crate) async fn announce_loop(cluster: Arc<Cluster>, topics: Arc<Topics>) {
    let me = cluster.config.node_id;
    loop {
        // Brokers added since (docs/replication.md §11) are told too.
        let peers: Vec<u64> = cluster.links.peer_ids().collect();
        tokio::select! {
            _ = tokio::time::sleep(ROUND) => {}
            _ = cluster.links.announce.notified() => {}
            _ = cluster.shutdown.cancelled() => return,
        }
        cluster.expire_notices(Instant::now());
        cluster.reconcile(&topics);
        let mut per_peer: std::collections::BTreeMap<u64, Vec<LeaderNotice>> = Default::default();
        for entry in cluster.partitions.iter() {
            let ((topic, partition), (group, replicas)) = entry.pair();
            if replicas.len() > peers.len() {
                continue; // held by every broker: nobody to tell
            }
            let Some(status) = cluster.groups.get(group).map(|g| g.status.borrow().clone()) else {
                continue;
            };
            if status.leader != Some(me) || status.stopped {
                continue;
            }
            let (log_start_offset, high_watermark) = topics
                .get(topic)
                .ok()
                .and_then(|t| {
                    t.partition(*partition).ok().map(|p| (p.log_start_offset(), p.high_watermark()))
                })
                .unwrap_or_default();
            let notice = LeaderNotice {
                group: *group,
                term: status.term,
                commit: status.commit,
                log_start_offset,
                high_watermark,
                in_sync: status.in_sync.iter().map(|&i| i as u32).collect(),
                lag: status.lag,
                members: status.voters.iter().chain(&status.learners).map(|&i| i as u32).collect(),
            };
            for &peer in peers.iter().filter(|p| !replicas.contains(p)) {
                per_peer.entry(peer).or_default().push(notice.clone());
            }
        }
        // Every peer gets a frame each round, an empty one if there is nothing to tell: it is
        // also how a peer knows this broker is alive (`PeerLinks::is_up`) when no Raft group
        // has this broker lead it.
        for &peer in &peers {
            let notices = per_peer.remove(&peer).unwrap_or_default();
            if notices.is_empty() {
                cluster.links.send_frame(peer, Message::Leaders { notices }.encode().to_bytes());
                continue;
            }
            for chunk in notices.chunks(NOTICES_PER_FRAME) {
                let frame = Message::Leaders { notices: chunk.to_vec() }.encode().to_bytes();
                cluster.links.send_frame(peer, frame);
            }
        }
    }
}

/// Serves a subscription to a partition this broker holds no replica of by handing the
/// stream to `target`, which holds one: the `Subscribe` goes there (a member's as outside the
/// membership, whose owner this broker checks, at the start and every `OWNER_CHECK`), the
/// client's frames follow it one by one and the target's bytes come back as they are.
pub(crate) async fn splice_subscription(
    cluster: &Cluster,
    groups: &crate::groups::Groups,
    target: u64,
    mut sub: quiver_protocol::message::Subscribe,
    mut send: quinn::SendStream,
    reader: FrameReader,
    client: RelayedClient,
) {
    let member: Option<(String, MemberRef)> = sub.group.clone().zip(sub.member.take());
    let (topic, partition) = (sub.topic.clone(), sub.partition);
    let check = move || match &member {
        Some((group, m)) => groups.check_owner(group, &topic, Some(m), partition),
        None => Ok(()),
    };
    if let Err(e) = check() {
        let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
        let _ = send.finish();
        return;
    }
    let unreachable = |why: &str| {
        let text = format!(
            "broker {target}, which holds {}/{}, is unreachable ({why}); retry",
            sub.topic, sub.partition
        );
        Message::error(ErrorCode::NotLeader, text)
    };
    metrics::counter!("quiver_forwarded_subscriptions_total").increment(1);
    let permission = &client.permission;
    let owner = || match check() {
        Err(_) => Some(ErrorCode::FencedMember),
        Ok(()) => revoked(permission),
    };
    relay(cluster, target, &sub, (send, reader), &client, owner, unreachable).await
}

/// What a broker relaying a client's subscription applies on the client's behalf: the
/// permission to check (again whenever the ACL rules change) and the consume quota to charge
/// the bytes relayed to (the broker serving the subscription sees only a peer).
#[derive(Debug)]
pub(crate) struct RelayedClient {
    pub permission: Option<crate::auth::Permission>,
    pub quota: Option<Arc<crate::auth::RateBucket>>,
}

fn error_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(u32::from(code.code()))
}

/// Whether the ACL rules changed (`false`: they never will again); pending without a watcher.
async fn changes(watcher: &mut Option<watch::Receiver<u64>>) -> bool {
    match watcher {
        Some(w) => w.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// How a relayed stream from the serving broker ended.
enum Relayed {
    /// It finished: the client's stream is finished too.
    Finished,
    /// It was reset with this code: the client's is reset with it.
    Reset(quinn::VarInt),
    /// The link failed, or the client stopped taking the bytes.
    Lost,
}

/// Copies a stream's bytes as quinn hands them over (no copy), charging each chunk to
/// `quota` first and waiting while over it.
async fn copy_charged(
    from: &mut quinn::RecvStream,
    to: &mut quinn::SendStream,
    quota: Option<&crate::auth::RateBucket>,
) -> Relayed {
    loop {
        let chunk = match from.read_chunk(RELAY_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => return Relayed::Finished,
            Err(quinn::ReadError::Reset(code)) => return Relayed::Reset(code),
            Err(_) => return Relayed::Lost,
        };
        if let Some(q) = quota {
            let wait = q.take(chunk.len());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        if to.write_chunk(chunk).await.is_err() {
            return Relayed::Lost;
        }
    }
}

/// `NotAuthorized` once the client's permission for the subscription is gone (the ACLs
/// changed, docs/security.md).
fn revoked(permission: &Option<crate::auth::Permission>) -> Option<ErrorCode> {
    permission.as_ref().filter(|p| !p.still_allowed()).map(|_| ErrorCode::NotAuthorized)
}

/// Hands a client's group subscription whole to the group's coordinator, `target`
/// (docs/replication.md §10): the coordinator checks the membership and keeps the ledger; this
/// broker only carries the bytes. The stream ends when the coordinator ends it (a deposed
/// coordinator answers `NotCoordinator`, and the client subscribes again).
pub(crate) async fn forward_subscription(
    cluster: &Cluster,
    target: u64,
    sub: quiver_protocol::message::Subscribe,
    send: quinn::SendStream,
    reader: FrameReader,
    client: RelayedClient,
) {
    let group = sub.group.clone().unwrap_or_default();
    let unreachable = |why: &str| {
        let text =
            format!("the coordinator of group '{group}', broker {target}, is unreachable ({why}); retry");
        Message::error(ErrorCode::NotCoordinator, text)
    };
    metrics::counter!("quiver_forwarded_group_subscriptions_total").increment(1);
    relay(cluster, target, &sub, (send, reader), &client, || revoked(&client.permission), unreachable).await
}

/// Opens a stream to `target`, sends `sub` on it and copies both ways until either side ends;
/// `owner` is asked every `OWNER_CHECK` and whenever the ACL rules change whether the stream
/// may go on (an error code resets it with that code: the member lost the partition, or the
/// client its permission). What comes back is charged to the client's consume quota: over
/// it, nothing more is read from the target until the debt is paid (flow control holds the
/// target back, and the client waits).
async fn relay(
    cluster: &Cluster,
    target: u64,
    sub: &quiver_protocol::message::Subscribe,
    (mut send, mut reader): (quinn::SendStream, FrameReader),
    client: &RelayedClient,
    owner: impl Fn() -> Option<ErrorCode>,
    unreachable: impl Fn(&str) -> Message,
) {
    let opened = async {
        let conn = cluster.links.connection(target).ok_or("no link")?;
        let (mut peer_send, peer_recv) = conn.open_bi().await.map_err(|_| "the link failed")?;
        write_message(&mut peer_send, &Message::Subscribe(sub.clone()))
            .await
            .map_err(|_| "the link failed")?;
        Ok::<_, &str>((peer_send, peer_recv))
    };
    let why = match tokio::time::timeout(FORWARD_TIMEOUT, opened).await {
        Ok(Ok(streams)) => Ok(streams),
        Ok(Err(why)) => Err(why),
        Err(_) => Err("no stream within the forward timeout"),
    };
    let (mut peer_send, mut peer_recv) = match why {
        Ok(streams) => streams,
        Err(why) => {
            let _ = write_message(&mut send, &unreachable(why)).await;
            let _ = send.finish();
            return;
        }
    };
    // How the relay ended: `Some(code)` resets the client's stream with it.
    let ended: Option<quinn::VarInt> = {
        let to_client = copy_charged(&mut peer_recv, &mut send, client.quota.as_deref());
        tokio::pin!(to_client);
        let mut check = tokio::time::interval(OWNER_CHECK);
        check.tick().await;
        let mut acl_changes = client.permission.as_ref().map(|p| p.watcher());
        // The client finished its half: what the target still sends goes through, checked as
        // before.
        let mut client_done = false;
        loop {
            tokio::select! {
                end = &mut to_client => break match end {
                    Relayed::Finished => None,
                    Relayed::Reset(code) => Some(code),
                    Relayed::Lost => Some(error_code(ErrorCode::NotLeader)),
                },
                frame = reader.next(), if !client_done => match frame {
                    Ok(Some(m)) => {
                        if write_message(&mut peer_send, &m).await.is_err() {
                            break Some(error_code(ErrorCode::NotLeader));
                        }
                    }
                    Ok(None) => {
                        let _ = peer_send.finish();
                        client_done = true;
                    }
                    Err(_) => break None,
                },
                _ = check.tick() => {
                    if let Some(code) = owner() {
                        break Some(error_code(code));
                    }
                }
                changed = changes(&mut acl_changes) => {
                    if !changed {
                        acl_changes = None; // the rules can no longer change
                    } else if let Some(code) = owner() {
                        break Some(error_code(code));
                    }
                }
                _ = cluster.shutdown.cancelled() => break Some(error_code(ErrorCode::ShuttingDown)),
            }
        }
    };
    let _ = peer_send.reset(0u32.into());
    if let Some(code) = ended {
        // Mid-copy: the client's stream is reset rather than given a frame that could land
        // inside one of the target's (as the target reset its own, if it did).
        let _ = send.reset(code);
        return;
    }
    let _ = send.finish();
}
