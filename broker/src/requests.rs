//! Request streams: requests are read as they arrive, handled concurrently, and answered in
//! request order. Produce requests are queued to their partition in arrival order before the
//! next frame is read, so pipelined batches append in the order they were sent.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use quiver_protocol::batch::{BatchError, ValidatedBatch};
use quiver_protocol::message::{
    Acks, BrokerStatus, Message, MessageError, PartitionInfo, PartitionOffsets, TopicInfo,
};
use quiver_protocol::ErrorCode;
use quiver_transport::{write_message, FrameReader};

use crate::auth::Direction;
use crate::coordinator::{route, Route};
use crate::offsets::OffsetStore;
use crate::partition::PartitionError;
use crate::state::{fail_stream, BrokerState, Permits, ReplyBudget};
use crate::topics::Topic;
use quiver_protocol::message::AclResource;

/// A response that may still be on its way. `None` answers nothing (acks = none).
type Pending = BoxFuture<'static, Option<Message>>;

pub(crate) async fn serve(
    state: Arc<BrokerState>,
    first: (Result<Message, MessageError>, Permits),
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    members: crate::groups::ConnectionMembers,
    budget: ReplyBudget,
) {
    let mut pending: FuturesOrdered<Held> = FuturesOrdered::new();
    // Cluster mode: where this stream's produce requests go when another broker leads.
    let mut forward = crate::cluster::StreamForward::default();
    // One fetch at a time per stream: its answer counts against the connection's budget
    // until written, and answers are written in order, so a second fetch waiting for budget
    // that a later one holds could never be answered. A fetch read while another is
    // unanswered waits here, as does a produce over its principal's quota until its turn;
    // nothing after it is read meanwhile.
    let mut blocked: Option<Request> = None;
    let mut fetching = false;
    let push = |request: Request, fetching: &mut bool, pending: &mut FuturesOrdered<Held>| {
        let (msg, permits) = request;
        match msg {
            Ok(Message::Fetch { topic, partition, offset, max_bytes }) => {
                *fetching = true;
                let (st, members, budget) = (state.clone(), members.clone(), budget.clone());
                pending.push_back(Box::pin(async move {
                    let (answer, mut held) =
                        fetch_request(st, members, topic, partition, offset, max_bytes, budget).await;
                    held.extend(permits);
                    (answer, held, true)
                }));
                None
            }
            other => Some((other, permits)),
        }
    };
    let mut reading = true;
    let idle = std::time::Duration::from_millis(state.config.stream_idle_timeout_ms);
    // A principal over its produce quota: nothing more is read from the stream until then
    // (QUIC flow control holds the client back; docs/security.md, "Quotas").
    let mut throttled_until: Option<tokio::time::Instant> = None;
    // The first request as every later one (below): charged to the quota, and waiting its
    // turn when over it.
    if let Ok(Message::Produce { batch, .. }) = &first.0 {
        if let Some(bucket) = state.auth.quota(&members, Direction::Produce) {
            throttle(&mut throttled_until, bucket.take(batch.len()));
        }
    }
    if throttled_until.is_some() {
        blocked = Some(first);
    } else if let Some((msg, permits)) = push(first, &mut fetching, &mut pending) {
        pending.push_back(holding(permits, dispatch(&state, msg, &members, &mut forward).await));
    }
    loop {
        if !reading && pending.is_empty() && blocked.is_none() {
            break; // the client finished its half and every request is answered
        }
        if throttled_until.is_some_and(|t| t <= tokio::time::Instant::now()) {
            throttled_until = None;
        }
        if !fetching && throttled_until.is_none() {
            if let Some(request) = blocked.take() {
                if let Some((msg, permits)) = push(request, &mut fetching, &mut pending) {
                    pending.push_back(holding(permits, dispatch(&state, msg, &members, &mut forward).await));
                }
            }
        }
        let can_read = reading
            && blocked.is_none()
            && throttled_until.is_none()
            && pending.len() < state.config.max_inflight_requests_per_stream;
        tokio::select! {
            biased;
            Some((response, permits, was_fetch)) = pending.next(), if !pending.is_empty() => {
                if let Some(msg) = response {
                    if write_message(&mut send, &msg).await.is_err() {
                        return;
                    }
                    if let Message::FetchOk { batches, .. } = &msg {
                        if let Some(bucket) = state.auth.quota(&members, Direction::Consume) {
                            throttle(&mut throttled_until, bucket.take(batches.len()));
                        }
                    }
                }
                drop(permits); // handed to QUIC: the answer's budget is free again
                fetching &= !was_fetch;
            }
            frame = reader.next_frame(), if can_read => match frame {
                Ok(Some(f)) => {
                    let msg = Message::decode(f.raw);
                    if let Ok(Message::Produce { batch, .. }) = &msg {
                        if let Some(bucket) = state.auth.quota(&members, Direction::Produce) {
                            throttle(&mut throttled_until, bucket.take(batch.len()));
                        }
                    }
                    // Over the quota, this very batch waits its turn (not only the next one:
                    // a producer that sends one large batch would otherwise never be slowed).
                    if throttled_until.is_some() || (fetching && matches!(msg, Ok(Message::Fetch { .. }))) {
                        blocked = Some((msg, f.permits));
                    } else if let Some((msg, permits)) = push((msg, f.permits), &mut fetching, &mut pending) {
                        pending.push_back(holding(permits, dispatch(&state, msg, &members, &mut forward).await));
                    }
                }
                Ok(None) => reading = false,
                Err(e) => {
                    // Answer what is pending, then the error, then end the stream.
                    while let Some((r, _, _)) = pending.next().await {
                        if let Some(msg) = r {
                            let _ = write_message(&mut send, &msg).await;
                        }
                    }
                    return fail_stream(&mut send, &mut reader, e).await;
                }
            },
            _ = tokio::time::sleep_until(throttled_until.unwrap_or_else(tokio::time::Instant::now)), if throttled_until.is_some() => {}
            // A request stream with nothing asked of it for this long is ended: a client
            // cannot keep thousands of idle streams (and their state) open.
            _ = tokio::time::sleep(idle), if can_read && pending.is_empty() && !members.is_peer() => {
                metrics::counter!("quiver_idle_streams_closed_total").increment(1);
                reader.stop(u32::from(ErrorCode::LimitExceeded.code()));
                let _ = send.finish();
                return;
            }
            _ = state.shutdown.cancelled() => {
                let _ = write_message(&mut send, &Message::error(ErrorCode::ShuttingDown, "broker shutting down")).await;
                let _ = send.finish();
                return;
            }
        }
    }
    let _ = send.finish();
}

/// A fetch, its answer counted against the connection's budget (`read_counted`: the bytes the
/// read returns, a first batch larger than `max_bytes` whole) until it is written.
async fn fetch_request(
    st: Arc<BrokerState>,
    members: crate::groups::ConnectionMembers,
    topic: String,
    partition: u32,
    offset: u64,
    max_bytes: u32,
    budget: ReplyBudget,
) -> (Option<Message>, Permits) {
    let request = || Message::Fetch { topic: topic.clone(), partition, offset, max_bytes };
    if let Err(e) = st.auth.authorize(&members, &request()) {
        return (Some(error(e)), Vec::new());
    }
    st.settle(&topic).await;
    if let Some(answer) = read_elsewhere(&st, &members, &topic, partition, request).await {
        // Read by another broker: its answer arrived whole (one frame); counted now, for as
        // long as it waits to be written.
        let held = match &answer {
            Message::FetchOk { batches, .. } => budget.acquire(batches.len()).await,
            _ => Vec::new(),
        };
        return (Some(answer), held);
    }
    match fetch(&st, &topic, partition, offset, max_bytes, &budget).await {
        Ok((answer, held)) => (Some(answer), held),
        Err(e) => (Some(error(e)), Vec::new()),
    }
}

/// Holds the stream back for `wait` more (a quota's debt), if that is longer than it is held.
fn throttle(until: &mut Option<tokio::time::Instant>, wait: std::time::Duration) {
    if !wait.is_zero() {
        let t = tokio::time::Instant::now() + wait;
        *until = Some(until.map_or(t, |u| u.max(t)));
    }
}

/// A request as read: the decoded message, and the budget its frame holds.
type Request = (Result<Message, MessageError>, Permits);

/// An answer on its way, the budget permits its request (and, for a fetch, its answer) holds
/// until it is written, and whether it answers a fetch.
type Held = BoxFuture<'static, (Option<Message>, Permits, bool)>;

/// Keeps a request's buffer budget taken until its response is written.
fn holding(permits: Permits, pending: Pending) -> Held {
    Box::pin(async move { (pending.await, permits, false) })
}

fn ready(msg: Message) -> Pending {
    Box::pin(async move { Some(msg) })
}

fn error(e: PartitionError) -> Message {
    Message::error_with_leader(e.code, e.message, e.leader)
}

/// Answers `Hello`: authenticates a token when one is presented, and refuses a connection
/// that has no principal when the broker requires one (so a client learns at connect, not at
/// its first request).
async fn hello(
    st: &Arc<BrokerState>,
    members: &crate::groups::ConnectionMembers,
    token: Option<String>,
) -> Message {
    // A refusal closes the connection (after the answer had time to reach the client): a
    // client without valid credentials holds no connection.
    let refuse = |answer: Message| {
        members.refuse();
        answer
    };
    if let Some(token) = token {
        let auth = st.auth.clone();
        match tokio::task::spawn_blocking(move || auth.authenticate_token_blocking(&token)).await {
            Ok(Ok(principal)) => {
                if let Err(e) = st.auth.admit(members, principal) {
                    return refuse(error(e));
                }
            }
            Ok(Err(why)) => {
                return refuse(Message::error(ErrorCode::Unauthenticated, format!("token refused: {why}")))
            }
            Err(e) => return Message::error(ErrorCode::Internal, e.to_string()),
        }
    }
    // A `Hello` is allowed without a principal (it is how a token is presented); one that
    // leaves the connection without any is refused when anonymous clients are; an anonymous
    // one counts against the connections of the principal `anonymous`.
    if let Err(e) = st.auth.authenticated(members) {
        return refuse(error(e));
    }
    if st.auth.enabled() && !members.is_peer() && members.principal().is_none() {
        if let Err(e) = st.auth.admit_anonymous(members) {
            return refuse(error(e));
        }
    }
    Message::HelloOk {
        protocol_version: quiver_protocol::limits::PROTOCOL_VERSION as u16,
        broker_id: st.config.broker_id,
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        principal: st
            .auth
            .enabled()
            .then(|| members.principal().map_or(crate::auth::ANONYMOUS.into(), |p| p.to_string())),
    }
}

/// Starts handling one request. Returns once the request is queued where order matters.
async fn dispatch(
    state: &Arc<BrokerState>,
    msg: Result<Message, MessageError>,
    members: &crate::groups::ConnectionMembers,
    forward: &mut crate::cluster::StreamForward,
) -> Pending {
    let msg = match msg {
        Ok(m) => m,
        Err(e) => {
            metrics::counter!("quiver_protocol_errors_total").increment(1);
            return ready(Message::error(e.code(), e.to_string()));
        }
    };
    // Every request is checked against the connection's principal first (docs/security.md);
    // what a peer forwards was checked where the client connected.
    if let Err(e) = state.auth.authorize(members, &msg) {
        return ready(error(e));
    }
    let st = state.clone();
    let members = members.clone();
    match msg {
        Message::Hello { token, .. } => Box::pin(async move { Some(hello(&st, &members, token).await) }),
        Message::Produce { topic, partition, acks, batch } => {
            if crate::coordinator::is_internal(&topic) && !members.is_peer() {
                // Only the coordinators write `__offsets`: a client's record there could forge
                // or erase a group's commits.
                return ready(Message::error(ErrorCode::InvalidTopic, internal_write(&topic)));
            }
            produce(state, &topic, partition, acks, batch, forward).await
        }
        // `serve` answers fetches itself (`fetch_request`: their answers count against the
        // connection's budget); none reaches here.
        Message::Fetch { .. } => {
            ready(Message::error(ErrorCode::Internal, "a fetch outside its stream's order"))
        }
        Message::CommitOffset { group, topic, partition, offset, member, reset } => Box::pin(async move {
            st.settle(&topic).await;
            let reset = reset && member.is_none();
            let request = || Message::CommitOffset {
                group: group.clone(),
                topic: topic.clone(),
                partition,
                offset,
                member: member.clone(),
                reset,
            };
            let store = match route(&st, &members, &group, Some((&topic, partition)), request).await {
                Route::Store(store) => store,
                Route::Answer(answer) => return Some(answer),
            };
            Some(
                commit(&st, &store, &members, group, &topic, partition, offset, member, reset)
                    .await
                    .unwrap_or_else(error),
            )
        }),
        Message::ListGroups => Box::pin(async move {
            Some(match list_groups(&st, &members).await {
                Message::Groups(mut groups) => {
                    groups.retain(|g| st.auth.may_see(&members, AclResource::Group, g));
                    Message::Groups(groups)
                }
                other => other,
            })
        }),
        msg @ (Message::JoinGroup { .. }
        | Message::Heartbeat { .. }
        | Message::LeaveGroup { .. }
        | Message::DescribeGroup { .. }) => Box::pin(async move {
            let group = match &msg {
                Message::JoinGroup { group, .. }
                | Message::Heartbeat { group, .. }
                | Message::LeaveGroup { group, .. }
                | Message::DescribeGroup { group } => group.clone(),
                _ => String::new(),
            };
            let store = match route(&st, &members, &group, None, || msg.clone()).await {
                Route::Store(store) => store,
                Route::Answer(answer) => return Some(answer),
            };
            // In a cluster a group's members live only on its coordinator. A peer forwards a
            // membership request to the broker it took for the coordinator; one that no longer
            // is (or is not yet) must refuse it, not start a group of its own beside the real
            // one (members there would get ids and generations the coordinator never issued).
            if st.cluster.is_some() && (!store.is_coordinated() || store.is_deposed()) {
                return Some(error(crate::coordinator::not_coordinator(&group)));
            }
            let joining = matches!(msg, Message::JoinGroup { member_id: None, .. });
            let answer = match crate::groups::handle(&st.groups, &st.topics, &store, msg, &members) {
                Ok(answer) => answer,
                Err(e) => return Some(error(e)),
            };
            // What the answer says of the membership is durable before the member hears it.
            match crate::coordinator::record_group(&st, &store, &group).await {
                Ok(()) => Some(answer),
                Err(e) => {
                    // A join the client hears as failed must not leave a member behind here
                    // holding partitions until its session expires (it joins again instead).
                    if let Message::GroupAssignment { member_id, .. } = &answer {
                        if joining {
                            st.groups.leave(&members, &group, member_id);
                        }
                    }
                    Some(error(e))
                }
            }
        }),
        Message::FetchOffsets { group, topic } => Box::pin(async move {
            st.settle(&topic).await;
            let request = || Message::FetchOffsets { group: group.clone(), topic: topic.clone() };
            let store = match route(&st, &members, &group, None, request).await {
                Route::Store(store) => store,
                Route::Answer(answer) => return Some(answer),
            };
            let rows = fetch_offsets(&st, &store, &group, &topic);
            let rows = match (&st.cluster, rows) {
                // A peer asks for the rows of the partitions held here, and takes only those
                // (a coordinator answering a forwarded request asks the others itself).
                (Some(cluster), Ok(rows)) if !members.is_peer() || store.is_coordinated() => {
                    cluster.remote_offsets(&group, &topic, rows).await
                }
                (_, rows) => rows,
            };
            Some(rows.map(Message::Offsets).unwrap_or_else(error))
        }),
        Message::Metadata { topic } => Box::pin(async move {
            if let Some(t) = &topic {
                // Refused whether or not it exists: the answer tells nothing of other topics.
                if !st.auth.may_see(&members, AclResource::Topic, t) {
                    return Some(error(st.auth.unseen(&members, AclResource::Topic, t)));
                }
                st.settle(t).await;
            }
            Some(match metadata(&st, topic.as_deref()) {
                // Only the topics the principal may do something with (docs/security.md).
                Ok(Message::MetadataOk(mut topics)) => {
                    topics.retain(|t| st.auth.may_see(&members, AclResource::Topic, &t.name));
                    Message::MetadataOk(topics)
                }
                Ok(other) => other,
                Err(e) => error(e),
            })
        }),
        Message::CreateTopic { name, partitions, config } => Box::pin(async move {
            if crate::coordinator::is_internal(&name) && !members.is_peer() {
                return Some(Message::error(ErrorCode::InvalidTopic, internal_name(&name)));
            }
            let result = match &st.cluster {
                Some(cluster) => create_in_cluster(&st, cluster, name, partitions, config).await,
                None => st
                    .topics
                    .create(&name, partitions, config, st.config.max_partitions_total)
                    .await
                    .map(drop),
            };
            Some(match result {
                Ok(()) => Message::Done,
                Err(e) => error(e),
            })
        }),
        Message::DeleteTopic { name } => Box::pin(async move {
            if crate::coordinator::is_internal(&name) {
                let text = format!(
                    "'{name}' is the broker's own topic (names starting with '__'): it cannot be deleted"
                );
                return Some(Message::error(ErrorCode::InvalidTopic, text));
            }
            if let Some(cluster) = &st.cluster {
                let request = Message::DeleteTopic { name: name.clone() };
                if let Err(e) = st.topics.get(&name) {
                    return Some(error(e));
                }
                return Some(
                    match cluster.run_command(crate::cluster::Command::DeleteTopic { name }, &request).await {
                        Ok(()) => Message::Done,
                        Err(e) => error(e),
                    },
                );
            }
            let (st2, topic) = (st.clone(), name.clone());
            let forget = move || st2.offsets.remove_topic_blocking(&topic).map_err(|e| e.to_string());
            let dropped = || st.groups.topic_deleted(&name);
            Some(match st.topics.delete(&name, dropped, forget).await {
                Ok(_) => Message::Done,
                Err(e) => error(e),
            })
        }),
        Message::ClusterStatus => Box::pin(async move {
            let status = match &st.cluster {
                // A peer asks for this broker's own view (`Cluster::leaders_view`).
                Some(cluster) if members.is_peer() => cluster.status(&st.topics),
                Some(cluster) => cluster.leaders_view(cluster.status(&st.topics)).await,
                None => single_node_status(&st),
            };
            Some(match status {
                // The partitions of the topics the principal may use (docs/security.md).
                Message::ClusterStatusOk { brokers, mut partitions } => {
                    partitions.retain(|p| st.auth.may_see(&members, AclResource::Topic, &p.topic));
                    Message::ClusterStatusOk { brokers, partitions }
                }
                other => other,
            })
        }),
        Message::ChangeAcls { add, rules } => Box::pin(async move {
            if let Some(why) = rules.iter().find_map(|r| crate::auth::validate_rule(r).err()) {
                return Some(Message::error(ErrorCode::Malformed, format!("ACL rule: {why}")));
            }
            let result = match &st.cluster {
                Some(cluster) => {
                    let request = Message::ChangeAcls { add, rules: rules.clone() };
                    let stored = rules.iter().map(crate::auth::StoredRule::from).collect();
                    cluster.run_command(crate::cluster::Command::Acls { add, rules: stored }, &request).await
                }
                None => {
                    let acls = st.auth.acls.clone();
                    tokio::task::spawn_blocking(move || acls.change_blocking(add, &rules))
                        .await
                        .unwrap_or_else(|e| {
                            Err(crate::partition::PartitionError::new(ErrorCode::Internal, e.to_string()))
                        })
                }
            };
            Some(match result {
                Ok(()) => Message::Done,
                Err(e) => error(e),
            })
        }),
        Message::ListAcls => ready(Message::AclList(state.auth.acls.list())),
        Message::ChangeBrokers { add, remove } => Box::pin(async move {
            Some(match &st.cluster {
                Some(cluster) => {
                    let request = Message::ChangeBrokers { add: add.clone(), remove };
                    match cluster.change_brokers(&st.topics, add, remove, &request).await {
                        Ok(()) => Message::Done,
                        Err(e) => error(e),
                    }
                }
                None => Message::error(
                    ErrorCode::UnexpectedKind,
                    "a single broker has no cluster to change: start brokers with --node-id and --peers",
                ),
            })
        }),
        Message::InitProducer => Box::pin(async move {
            use quiver_protocol::limits::MAX_PRODUCER_IDS_PER_CONNECTION;
            if !members.take_producer_id(std::time::Instant::now()) {
                return Some(Message::error(
                    ErrorCode::LimitExceeded,
                    format!(
                        "this connection obtained {MAX_PRODUCER_IDS_PER_CONNECTION} producer ids within a minute \
                         (MAX_PRODUCER_IDS_PER_CONNECTION); reuse a producer"
                    ),
                ));
            }
            if let Some(cluster) = &st.cluster {
                return Some(match cluster.producer_id().await {
                    Ok(producer_id) => Message::InitProducerOk {
                        producer_id,
                        producer_epoch: crate::producers::PRODUCER_EPOCH,
                    },
                    Err(e) => error(e),
                });
            }
            Some(match tokio::task::spawn_blocking(move || st.producer_ids.allocate_blocking()).await {
                Ok(Ok(producer_id)) => {
                    Message::InitProducerOk { producer_id, producer_epoch: crate::producers::PRODUCER_EPOCH }
                }
                Ok(Err(e)) => {
                    Message::error(ErrorCode::StorageError, format!("allocating a producer id: {e}"))
                }
                Err(e) => Message::error(ErrorCode::Internal, e.to_string()),
            })
        }),
        Message::ReserveProducerIds { broker } => Box::pin(async move {
            Some(match (&st.cluster, members.is_peer()) {
                (Some(cluster), true) => match cluster.reserve_producer_ids_for(u64::from(broker)).await {
                    Ok(()) => Message::Done,
                    Err(e) => error(e),
                },
                _ => Message::error(
                    ErrorCode::UnexpectedKind,
                    "ReserveProducerIds is for brokers of a cluster",
                ),
            })
        }),
        Message::OffsetForTime { topic, partition, timestamp_ms } => Box::pin(async move {
            st.settle(&topic).await;
            let request = || Message::OffsetForTime { topic: topic.clone(), partition, timestamp_ms };
            if let Some(answer) = read_elsewhere(&st, &members, &topic, partition, request).await {
                return Some(answer);
            }
            let r = async {
                let t = st.topics.get(&topic)?;
                let p = t.partition(partition)?;
                Ok::<_, PartitionError>(Message::OffsetIs {
                    offset: p.offset_for_timestamp(timestamp_ms).await?,
                })
            };
            Some(r.await.unwrap_or_else(error))
        }),
        Message::Subscribe(_) => ready(Message::error(
            ErrorCode::UnexpectedKind,
            "Subscribe must be the first frame of its own stream",
        )),
        other => ready(Message::error(
            ErrorCode::UnexpectedKind,
            format!("frame kind {} is not a request", other.kind()),
        )),
    }
}

async fn produce(
    state: &Arc<BrokerState>,
    topic: &str,
    partition: u32,
    acks: Acks,
    batch: bytes::Bytes,
    forward: &mut crate::cluster::StreamForward,
) -> Pending {
    // Cluster mode: a broker that does not lead the partition hands the request to the leader,
    // on this stream's forward stream (written here, before the next request is read, so a
    // stream's batches reach the leader in order; answered when the leader answers). When the
    // leader changes under requests in flight, the stream answers `NotLeader` from then on and
    // the producer re-sends its batches in order on a fresh stream: handing them over one by
    // one here could reorder them.
    let mut claim = None;
    if let Some(c) = state.cluster.as_ref().filter(|c| c.group(topic, partition).is_none()) {
        // A create another broker answered a moment ago.
        state.settle(topic).await;
        // Known here, but its replica (or observer) not started yet: the broker is applying
        // the create, or replaying the controller's log after a restart. Never written outside
        // Raft: such a batch would be acknowledged and then cut when the replica starts and
        // takes its leader's log. (Unknown topics and partitions are answered below.)
        let known = state.topics.get(topic).is_ok_and(|t| t.partition(partition).is_ok());
        if known && c.group(topic, partition).is_none() {
            return ready_unless_none(
                acks,
                Message::error(
                    ErrorCode::NotLeader,
                    "this broker has not started the partition's replica yet; retry",
                ),
            );
        }
    }
    if let Some((cluster, group)) =
        state.cluster.as_ref().and_then(|c| Some((c.clone(), c.group(topic, partition)?.0)))
    {
        let leader = group.status.borrow().leader;
        let Some(l) = leader else {
            return ready_unless_none(
                acks,
                Message::error(ErrorCode::NotLeader, "no leader elected for the partition yet; retry"),
            );
        };
        let c = match forward.claim(l) {
            Ok(c) => c,
            Err(e) => return ready_unless_none(acks, error(e)),
        };
        if l != cluster.node_id() {
            metrics::counter!("quiver_forwarded_produce_total").increment(1);
            // Always asks for an answer: the forward stream pairs answers with requests by order.
            // `none` asks for `all`: the leader then holds it until the commit, as it holds a
            // local `none` (its buffer budget is released when the batch is in, not sooner).
            let wire_acks = if acks == Acks::None { Acks::All } else { acks };
            let request = Message::Produce { topic: topic.to_string(), partition, acks: wire_acks, batch };
            let sent = forward.send(&cluster.links, l, &request).await;
            return Box::pin(async move {
                let now_leads = group.status.clone();
                let moved = || {
                    PartitionError::new(ErrorCode::NotLeader, "the partition's leader changed; retry")
                        .with_leader(now_leads.borrow().leader.filter(|&n| n != l))
                };
                let answer = match sent {
                    // A dead leader never answers: the next election is the signal to stop
                    // waiting for it (its link takes seconds to time out).
                    Ok(rx) => tokio::select! {
                        r = rx => r.unwrap_or_else(|_| Err(moved())),
                        _ = group.leader_moved_from(l) => Err(moved()),
                    },
                    Err(e) => Err(e),
                };
                drop(c);
                (acks != Acks::None).then(|| answer.unwrap_or_else(error))
            });
        }
        claim = Some(c);
    }
    let result = async {
        let t = state.topics.get(topic)?;
        let p = t.partition(partition)?.clone();
        let batch = ValidatedBatch::new(batch).map_err(|e| {
            let code = match e {
                BatchError::UnsupportedCompression(_) => ErrorCode::UnsupportedCompression,
                BatchError::BadLength(_) => ErrorCode::BatchTooLarge,
                _ => ErrorCode::CorruptBatch,
            };
            PartitionError::new(code, format!("rejected batch for {topic}/{partition}: {e}"))
        })?;
        let header = batch.header();
        if header.is_control() {
            // Control batches are the brokers' own (Raft's entries are stored as such,
            // docs/replication.md §2): a client's could later pass for one.
            return Err(PartitionError::new(
                ErrorCode::CorruptBatch,
                format!(
                    "rejected batch for {topic}/{partition}: control batches are written by brokers only"
                ),
            ));
        }
        // In a cluster, ids come from the controller log (docs/replication.md §2c).
        let checked = match &state.cluster {
            None => state.producer_ids.check(header.producer_id, header.producer_epoch),
            Some(c) => match c.check_producer_id(header.producer_id, header.producer_epoch).await {
                // A block this broker has not applied yet (reserved a moment ago, or this
                // broker is cut off from the controller): retriable, not a forged id.
                Err(crate::producers::ProducerIdError::NeverIssued(id)) if !c.producer_ids.known(id) => {
                    return Err(PartitionError::new(
                        ErrorCode::NotLeader,
                        format!("producer id {id} is not known to this broker yet (its controller log is behind); retry"),
                    ));
                }
                other => other,
            },
        };
        checked.map_err(|e| PartitionError::new(ErrorCode::UnknownProducer, e.to_string()))?;
        t.metrics.messages_in.increment(header.records_count as u64);
        t.metrics.bytes_in.increment(batch.len() as u64);
        let rx = p.submit_with(batch, acks).await?;
        Ok::<_, PartitionError>(rx)
    }
    .await;
    let started = std::time::Instant::now();
    let pending: Pending = match (result, acks) {
        (Err(e), Acks::Leader | Acks::All) => ready(error(e)),
        (Err(e), Acks::None) => {
            tracing::debug!("acks=none produce failed: {e}");
            Box::pin(async { None })
        }
        // No answer, but the request keeps its buffer budget until the append is done.
        (Ok(rx), Acks::None) => Box::pin(async move {
            if let Ok(Err(e)) = rx.await {
                tracing::debug!("acks=none append failed: {e}");
            }
            None
        }),
        (Ok(rx), Acks::Leader | Acks::All) => Box::pin(async move {
            let r = match rx.await {
                Ok(Ok(a)) => {
                    Message::ProduceOk { base_offset: a.base_offset, log_append_time_ms: a.append_time_ms }
                }
                Ok(Err(e)) => error(e),
                Err(_) => {
                    Message::error(ErrorCode::ShuttingDown, "partition closed before the append completed")
                }
            };
            metrics::histogram!("quiver_produce_seconds").record(started.elapsed().as_secs_f64());
            Some(r)
        }),
    };
    match claim {
        // A replicated partition led here: the stream's claim lasts until the answer.
        Some(claim) => Box::pin(async move {
            let r = pending.await;
            drop(claim);
            r
        }),
        None => pending,
    }
}

async fn fetch(
    state: &BrokerState,
    topic: &str,
    partition: u32,
    offset: u64,
    max_bytes: u32,
    budget: &ReplyBudget,
) -> Result<(Message, Permits), PartitionError> {
    let t = state.topics.get(topic)?;
    let p = t.partition(partition)?;
    let max = (max_bytes as usize).clamp(1, state.config.max_deliver_bytes.max(1) as usize);
    let started = std::time::Instant::now();
    // Counted before it is read, whole (a first batch larger than `max` included).
    let (batches, held) = p.read_counted(offset, max, budget, true).await?.unwrap_or_default();
    metrics::histogram!("quiver_fetch_seconds").record(started.elapsed().as_secs_f64());
    t.metrics.fetch_bytes.increment(batches.len() as u64);
    let answer = Message::FetchOk {
        log_start_offset: p.log_start_offset(),
        high_watermark: p.high_watermark(),
        batches,
    };
    Ok((answer, held))
}

#[allow(clippy::too_many_arguments)]
async fn commit(
    state: &Arc<BrokerState>,
    store: &Arc<OffsetStore>,
    members: &crate::groups::ConnectionMembers,
    group: String,
    topic: &str,
    partition: u32,
    offset: u64,
    member: Option<quiver_protocol::MemberRef>,
    reset: bool,
) -> Result<Message, PartitionError> {
    quiver_protocol::message::validate_group_name(&group)
        .map_err(|m| PartitionError::new(ErrorCode::InvalidGroup, m))?;
    let t = state.topics.get(topic)?;
    let p = t.partition(partition)?;
    state.groups.admit(&group, || crate::groups::stored_groups(store))?;
    state.groups.check_owner(&group, topic, member.as_ref(), partition)?;
    // Held elsewhere: the broker serving its subscription there keeps the ledger and checks the
    // offset against its log; the member was checked here, where the membership is.
    if let Some(cluster) = &state.cluster {
        // A coordinator hands the partition on also for a request a peer forwarded to it.
        let from_peer = members.is_peer() && !store.is_coordinated();
        if let Some(target) = cluster.remote_reader(topic, partition, from_peer) {
            let request = Message::CommitOffset {
                group: group.clone(),
                topic: topic.to_string(),
                partition,
                offset,
                member: None,
                reset,
            };
            let answer = cluster.read_remote(target?, &request).await?;
            // The replica serving the partition took it (its ledger lives in its own store);
            // the coordinator's replicated store keeps it too, so it survives that replica and
            // the next one starts there (docs/replication.md §10).
            if matches!(answer, Message::CommitOk) && store.is_coordinated() {
                let key = (Arc::from(group.as_str()), t.name.clone(), partition);
                commit_durably(store, key, offset, reset).await?;
            }
            return Ok(answer);
        }
    }
    if offset > p.high_watermark() {
        return Err(PartitionError::new(
            ErrorCode::OffsetOutOfRange,
            format!("cannot commit offset {offset}: latest={}", p.high_watermark()),
        ));
    }
    let key = (Arc::from(group.as_str()), t.name.clone(), partition);
    // Commits only move the group forward (a late commit must not undo a newer one); tools
    // outside the membership may reset it while the group is empty (`check_owner` above).
    commit_durably(store, key, offset, reset).await?;
    Ok(Message::CommitOk)
}

/// `OffsetStore::commit_blocking` on a blocking thread.
async fn commit_durably(
    store: &Arc<OffsetStore>,
    key: crate::offsets::OffsetKey,
    offset: u64,
    reset: bool,
) -> Result<(), PartitionError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.commit_blocking(key, offset, reset))
        .await
        .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| PartitionError::new(e.code(), e.to_string()))
}

/// In a cluster, a read of a partition this broker holds no replica of is answered by a broker
/// that holds one (`Cluster::remote_reader`); `None`: read it here.
async fn read_elsewhere(
    state: &BrokerState,
    members: &crate::groups::ConnectionMembers,
    topic: &str,
    partition: u32,
    request: impl FnOnce() -> Message,
) -> Option<Message> {
    let target = state.cluster.as_ref()?.remote_reader(topic, partition, members.is_peer())?;
    let cluster = state.cluster.as_ref()?;
    Some(match target {
        Ok(target) => cluster.read_remote(target, &request()).await.unwrap_or_else(error),
        Err(e) => error(e),
    })
}

fn fetch_offsets(
    state: &BrokerState,
    store: &OffsetStore,
    group: &str,
    topic: &str,
) -> Result<Vec<PartitionOffsets>, PartitionError> {
    let t = state.topics.get(topic)?;
    let committed = store.for_topic(group, topic);
    Ok(t.partitions
        .iter()
        .map(|p| PartitionOffsets {
            partition: p.id,
            committed: committed.get(&p.id).copied(),
            log_start_offset: p.log_start_offset(),
            high_watermark: p.high_watermark(),
        })
        .collect())
}

/// Every group the cluster knows (one node: this broker's): with members or committed offsets.
/// A client's request is answered with what every reachable broker coordinates.
async fn list_groups(state: &BrokerState, members: &crate::groups::ConnectionMembers) -> Message {
    // In a cluster every group lives in an offsets partition, listed by its coordinator. The
    // list is whole or an error (retriable), never silently partial: this broker lists what it
    // coordinates only once it has read it, and each partition's coordinator as seen before
    // asking must answer.
    let leaders = match &state.cluster {
        Some(cluster) => match offsets_leaders(state, cluster) {
            Ok(leaders) => leaders,
            Err(e) => return error(e),
        },
        None => Vec::new(),
    };
    let mut names = state.groups.names();
    let stores = std::iter::once(state.offsets.clone()).chain(state.coordinators.stores());
    for store in stores {
        names.extend(store.group_names().iter().map(|g| g.to_string()));
    }
    if let (Some(cluster), false) = (&state.cluster, members.is_peer()) {
        let peers: Vec<u64> = cluster.links.peer_ids().collect();
        let asks = peers
            .iter()
            .map(|&id| cluster.links.request(id, &Message::ListGroups, std::time::Duration::from_secs(1)));
        let mut answered = std::collections::HashSet::from([cluster.node_id()]);
        for (id, answer) in peers.iter().zip(futures::future::join_all(asks).await) {
            if let Ok(Message::Groups(more)) = answer {
                names.extend(more);
                answered.insert(*id);
            }
        }
        if let Some((k, leader)) = leaders.iter().find(|(_, l)| !l.is_some_and(|l| answered.contains(&l))) {
            let who =
                leader.map_or("none is elected yet".to_string(), |l| format!("broker {l} did not answer"));
            return Message::error(
                ErrorCode::NotCoordinator,
                format!("the coordinator of offsets partition {k} is not reachable ({who}): the list would miss its groups; retry"),
            );
        }
    }
    names.sort();
    names.dedup();
    Message::Groups(names)
}

/// The leader of each offsets partition this broker holds a replica of, as it sees them now;
/// refused (`NotCoordinator`) while this broker leads one it has not read yet (its groups would
/// be missing from what it lists).
fn offsets_leaders(
    state: &BrokerState,
    cluster: &crate::cluster::Cluster,
) -> Result<Vec<(u32, Option<u64>)>, PartitionError> {
    let Ok(topic) = state.topics.get(crate::coordinator::OFFSETS_TOPIC) else { return Ok(Vec::new()) };
    let mut leaders = Vec::new();
    for p in &topic.partitions {
        let Some((handle, _)) = cluster.group(crate::coordinator::OFFSETS_TOPIC, p.id) else { continue };
        let leader = handle.status.borrow().leader;
        if leader == Some(cluster.node_id()) && !state.coordinators.loaded.contains_key(&p.id) {
            return Err(PartitionError::new(
                ErrorCode::NotCoordinator,
                format!(
                    "broker {} is reading offsets partition {} as its new coordinator; retry",
                    cluster.node_id(),
                    p.id
                ),
            ));
        }
        leaders.push((p.id, leader));
    }
    Ok(leaders)
}

fn internal_write(name: &str) -> String {
    format!("'{name}' is the broker's own topic (consumer-group state); clients cannot write to it")
}

fn internal_name(name: &str) -> String {
    format!("topic names starting with '__' are the broker's own (here: '{name}'); pick another name")
}

/// A forwarded answer, or none for `acks = none`.
fn ready_unless_none(acks: Acks, answer: Message) -> Pending {
    match acks {
        Acks::None => Box::pin(async { None }),
        Acks::Leader | Acks::All => ready(answer),
    }
}

/// A topic create in a cluster: checked here, then run through the controller.
async fn create_in_cluster(
    state: &BrokerState,
    cluster: &crate::cluster::Cluster,
    name: String,
    partitions: u32,
    config: quiver_protocol::TopicConfig,
) -> Result<(), PartitionError> {
    let invalid = |m: String| PartitionError::new(ErrorCode::InvalidTopic, m);
    quiver_protocol::message::validate_topic_name(&name).map_err(invalid)?;
    quiver_protocol::message::validate_partition_count(partitions).map_err(invalid)?;
    config.validate().map_err(invalid)?;
    let brokers = cluster.members.read().len();
    if usize::from(config.replicas) > brokers {
        return Err(invalid(format!(
            "--replicas {} is more than the {brokers} brokers of this cluster: each replica needs a broker of its own",
            config.replicas
        )));
    }
    if state.topics.get(&name).is_ok() {
        return Err(PartitionError::new(ErrorCode::TopicExists, format!("topic '{name}' already exists")));
    }
    let request = Message::CreateTopic { name: name.clone(), partitions, config: config.clone() };
    cluster
        .run_command(
            crate::cluster::Command::CreateTopic { name, partitions, config, brokers: None },
            &request,
        )
        .await
}

/// `ClusterStatus` on a single node: itself, and no replicated partitions.
fn single_node_status(state: &BrokerState) -> Message {
    let addr =
        state.local_addr.get().map(|a| a.to_string()).unwrap_or_else(|| state.config.listen.to_string());
    Message::ClusterStatusOk {
        brokers: vec![BrokerStatus { id: state.config.broker_id, addr, up: true }],
        partitions: Vec::new(),
    }
}

fn metadata(state: &BrokerState, topic: Option<&str>) -> Result<Message, PartitionError> {
    let topics = match topic {
        Some(name) => vec![state.topics.get(name)?],
        None => state.topics.all(),
    };
    Ok(Message::MetadataOk(topics.iter().map(|t| topic_info(t, state)).collect()))
}

fn topic_info(t: &Topic, state: &BrokerState) -> TopicInfo {
    TopicInfo {
        name: t.name.to_string(),
        config: t.config.clone(),
        partitions: t
            .partitions
            .iter()
            .map(|p| {
                let (leader, epoch, replicas, offsets) =
                    match state.cluster.as_ref().and_then(|c| Some((c, c.group(&t.name, p.id)?))) {
                        Some((c, (g, replicas))) => {
                            let s = g.status.borrow();
                            let offsets = c.observed_group(&t.name, p.id);
                            (
                                s.leader.map(|l| l as u32),
                                s.term,
                                replicas.iter().map(|&r| r as u32).collect(),
                                offsets,
                            )
                        }
                        None => (Some(state.config.broker_id), 0, Vec::new(), None),
                    };
                // Held elsewhere: the offsets its leader last announced.
                let (log_start_offset, high_watermark) =
                    offsets.unwrap_or_else(|| (p.log_start_offset(), p.high_watermark()));
                PartitionInfo { partition: p.id, log_start_offset, high_watermark, leader, epoch, replicas }
            })
            .collect(),
    }
}
