//! Subscription streams: push `Deliver` frames from a start position, within the client's
//! delivery window and QUIC's stream flow control, and take acknowledgements back. Every
//! subscription keeps an `AckLedger` (per message acks, delivery counts, deadlines); a group's
//! ledger outlives its subscriptions and is persisted with the group's offsets (design.md §12).
//!
//! By job: this file sets a subscription up (start position, group takeover, dead-letter
//! topic) and fences it; `engine` decides what to deliver, hand out again, settle and
//! dead-letter (sans-IO); `driver` is the tokio loop that reads the partition, writes frames,
//! reads acks and feeds the engine; `crate::dead_letters` writes dead letters outside the loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use quiver_protocol::ledger::AckLedger;
use quiver_protocol::message::{validate_group_name, Message, RedeliveryPolicy, StartPosition, Subscribe};
use quiver_protocol::ErrorCode;
use quiver_transport::{write_message, FrameReader};

use crate::offsets::{OffsetKey, SharedLedger};
use crate::partition::{Partition, PartitionError};
use crate::state::BrokerState;

mod driver;
mod engine;

/// Where a subscription stands once set up.
struct Setup {
    partition: Arc<Partition>,
    /// (group, member) when the subscription belongs to a group member, re-checked while it
    /// runs: a member that lost the partition stops receiving it.
    member: Option<(String, quiver_protocol::MemberRef)>,
    start: u64,
    /// Group ownership: the offsets key and this subscription's generation.
    group: Option<(OffsetKey, u64)>,
    /// The group's ledger, or this subscription's own without a group.
    ledger: SharedLedger,
    policy: RedeliveryPolicy,
    /// Where dead letters go, with `max_deliveries`.
    dead_letter_topic: Option<String>,
    /// The offsets store keeping the group's ledger (a coordinator's, in a cluster).
    store: Arc<crate::offsets::OffsetStore>,
}

/// What a client's subscription is held to (docs/security.md): its permission, checked again
/// when the ACLs change; the memory budgets its disk reads count against; its principal's
/// consume quota.
#[derive(Debug)]
pub(crate) struct Limits {
    pub permission: Option<crate::auth::Permission>,
    pub budget: crate::state::ReplyBudget,
    pub quota: Option<Arc<crate::auth::RateBucket>>,
}

pub(crate) async fn run(
    state: Arc<BrokerState>,
    sub: Subscribe,
    store: Arc<crate::offsets::OffsetStore>,
    mut send: quinn::SendStream,
    reader: FrameReader,
    limits: Limits,
) {
    let setup = match setup(&state, &sub, store).await {
        Ok(s) => s,
        Err(e) => {
            let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
            let _ = send.finish();
            return;
        }
    };
    driver::serve(state, sub, setup, send, reader, limits).await
}

async fn setup(
    state: &BrokerState,
    sub: &Subscribe,
    store: Arc<crate::offsets::OffsetStore>,
) -> Result<Setup, PartitionError> {
    let topic = state.topics.get(&sub.topic)?;
    let partition = topic.partition(sub.partition)?.clone();
    let key: Option<OffsetKey> = match &sub.group {
        Some(g) if validate_group_name(g).is_err() => {
            return Err(PartitionError::new(
                ErrorCode::InvalidGroup,
                validate_group_name(g).err().unwrap_or_default(),
            ))
        }
        Some(g) => Some((Arc::from(g.as_str()), topic.name.clone(), sub.partition)),
        None => None,
    };
    if let Some(g) = &sub.group {
        state.groups.admit(g, || crate::groups::stored_groups(&store))?;
        state.groups.check_owner(g, &sub.topic, sub.member.as_ref(), sub.partition)?;
    }
    let (log_start, hw) = (partition.log_start_offset(), partition.high_watermark());
    // Retention can move the log start past a high watermark that waits for an fsync.
    let hw = hw.max(log_start);
    // A coordinator handing the subscription here says where the group stands (this store
    // may know less: it keeps only what was served here).
    let committed = key.as_ref().and_then(|k| store.get(k)).max(sub.group_position);
    // Where to start without a committed offset (a group's is read again under its lock).
    let requested = match (committed, sub.start) {
        (Some(c), _) => c.max(log_start).min(hw),
        (None, StartPosition::Earliest) => log_start,
        (None, StartPosition::Latest) => hw,
        (None, StartPosition::Offset(o)) => {
            if o > hw && behind_its_leader(state, &partition) && o <= log_end(&partition).await {
                // Replicas restarted together, or a follower a heartbeat behind: the record is
                // in this replica's log, its high watermark has not got there yet. (Past the
                // log's end the offset is out of range, as on a leader.)
                return Err(PartitionError::new(
                    ErrorCode::NotLeader,
                    format!(
                        "offset {o} is past this replica's high watermark {hw} while it catches up; retry"
                    ),
                ));
            }
            if o < log_start || o > hw {
                return Err(PartitionError::new(
                    ErrorCode::OffsetOutOfRange,
                    format!(
                        "offset {o} of {}/{} is out of range: earliest={log_start} latest={hw}",
                        topic.name, sub.partition
                    ),
                ));
            }
            o
        }
        (None, StartPosition::Timestamp(ts)) => partition.offset_for_timestamp(ts).await?.max(log_start),
    };
    let dead_letter_topic = dead_letter_topic(state, &topic.name, &sub.policy)?;
    // Only now, with nothing left to fail, does a group subscription take the partition over
    // (single active consumer per partition until group membership arrives).
    let (group, ledger, start) = match key {
        Some(key) => {
            let ledger = store.ledger(&key, requested);
            let mut l = ledger.lock();
            if let Some(position) = sub.group_position.filter(|&p| p > l.floor()) {
                l.commit(position);
            }
            // The floor and the log's ends, read under the lock: acks, commits and appends may
            // have moved them meanwhile.
            let floor = l.floor();
            let log_start = partition.log_start_offset();
            let hw = partition.high_watermark().max(log_start);
            // A replica still catching up (one just added, a follower a heartbeat behind) may
            // have a high watermark below the group's position: the position is fine, this log
            // is short for now. The subscription starts at the group's position and delivers
            // once the log gets there. Taking it for lost records and resetting the ledger
            // sent a whole group back to offset 0 in a fault run; only a ready leader's short
            // log means records were lost.
            let catching_up = floor > hw && behind_its_leader(state, &partition);
            let start = if catching_up { floor.max(log_start) } else { floor.max(log_start).min(hw) };
            if catching_up {
                tracing::info!(topic = %topic.name, partition = sub.partition, hw, floor, "the replica here is behind the group's position: the subscription waits for it");
            }
            if floor > hw && !catching_up {
                // The log is shorter than the group's position (a crash lost unsynced records,
                // whose offsets are reused): what the ledger knows is void.
                l.reset(start);
            } else if start > floor {
                l.commit(start); // retention removed what the group had not consumed
            }
            // What an earlier session handed out and did not get acknowledged is handed out
            // again by this one, with higher delivery counts.
            l.end_session();
            let generation = state.next_generation.fetch_add(1, Ordering::Relaxed);
            state.group_owners.insert(key.clone(), generation);
            drop(l);
            (Some((key, generation)), ledger, start)
        }
        None => (None, Arc::new(Mutex::new(AckLedger::new(requested).into())), requested),
    };
    let member = sub.group.clone().zip(sub.member.clone());
    Ok(Setup {
        partition,
        start,
        group,
        member,
        ledger,
        policy: sub.policy.clone(),
        dead_letter_topic,
        store,
    })
}

/// The offset after the last record in `partition`'s log, committed or not (the log's lock may
/// wait for a write: taken on a blocking thread).
async fn log_end(partition: &Partition) -> u64 {
    let log = partition.shared_log();
    tokio::task::spawn_blocking(move || log.lock().next_offset()).await.unwrap_or(0)
}

/// Whether `partition` is a replica whose high watermark may lag what the group has consumed (in
/// a cluster): any but a leader whose commit already covers everything committed before its
/// term (`ready`). Only such a leader's shorter log means records were lost.
fn behind_its_leader(state: &BrokerState, partition: &Partition) -> bool {
    let Some(cluster) = &state.cluster else { return false };
    if !partition.is_replicated() {
        return false;
    }
    match cluster.group(&partition.topic, partition.id) {
        Some((handle, _)) => {
            let status = handle.status.borrow();
            !(status.leader == Some(cluster.node_id()) && status.ready)
        }
        None => true,
    }
}

/// Where dead letters of `topic` go under `policy`: checked at subscribe, so a bad name fails
/// the subscription instead of every dead letter. Only the default `<topic>.dlq` is created by
/// the broker; a subscriber cannot make it create topics of any other name (design.md §12).
fn dead_letter_topic(
    state: &BrokerState,
    topic: &str,
    policy: &RedeliveryPolicy,
) -> Result<Option<String>, PartitionError> {
    if policy.max_deliveries == 0 {
        return Ok(None);
    }
    let name = policy.dead_letter_topic.clone().unwrap_or_else(|| default_dead_letter_topic(topic));
    let invalid = |m: String| PartitionError::new(ErrorCode::InvalidTopic, format!("dead-letter topic: {m}"));
    quiver_protocol::message::validate_topic_name(&name).map_err(invalid)?;
    if name == topic {
        return Err(invalid(format!("'{name}' is the topic itself")));
    }
    if crate::coordinator::is_internal(&name) {
        return Err(invalid(format!("'{name}' is the broker's own topic (names starting with '__')")));
    }
    if name != default_dead_letter_topic(topic) && state.topics.get(&name).is_err() {
        return Err(PartitionError::new(
            ErrorCode::UnknownTopic,
            format!("dead-letter topic '{name}' does not exist: create it first (only '{topic}.dlq' is created on demand)"),
        ));
    }
    Ok(Some(name))
}

pub(crate) fn default_dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

fn release(state: &BrokerState, setup: &Setup) {
    if let Some((key, generation)) = &setup.group {
        // Under the ledger's lock, so a subscription taking over (which ends the session under
        // the same lock) cannot have its fresh session ended by this one.
        let mut l = setup.ledger.lock();
        if state.group_owners.remove_if(key, |_, g| g == generation).is_some() {
            l.end_session();
        }
    }
}

/// Fails once this subscription no longer owns its group's partition: taken over by a newer
/// subscription, its member lost the partition, or (without a member) the group gained
/// members.
fn check_owner(state: &BrokerState, setup: &Setup) -> Result<(), PartitionError> {
    check_not_taken_over(state, setup)?;
    let p = &setup.partition;
    match (&setup.member, &setup.group) {
        (Some((group, member)), _) => state.groups.check_owner(group, &p.topic, Some(member), p.id),
        // Outside the membership (a plain `--group` consumer): only while the group has no
        // members; once one joins, its acks no longer move the group's offset.
        (None, Some(((group, _, _), _))) => state.groups.check_owner(group, &p.topic, None, p.id),
        (None, None) => Ok(()),
    }
}

/// Fails once a newer subscription of the group took the partition over (cheap: one map
/// lookup, so it runs before every delivery).
fn check_not_taken_over(state: &BrokerState, setup: &Setup) -> Result<(), PartitionError> {
    if let Some((key, generation)) = &setup.group {
        if setup.store.is_deposed() {
            return Err(PartitionError::new(
                ErrorCode::NotCoordinator,
                "this broker no longer coordinates the group; subscribe again (at the new coordinator)",
            ));
        }
        if state.group_owners.get(key).map(|g| *g != *generation).unwrap_or(true) {
            return Err(PartitionError::new(
                ErrorCode::FencedMember,
                "a newer subscription of the group took this partition over",
            ));
        }
    }
    Ok(())
}
