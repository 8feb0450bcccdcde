//! Clients follow partition leaders (issue 17, docs/replication.md §2b). The client keeps a map
//! from each replicated partition to its leader's address, learnt from `Metadata` (leader id and
//! epoch per partition) and the cluster's broker list (`ClusterStatus`: id and the address
//! clients dial), and connections to those brokers besides its main one, dialled when first
//! needed. A producer's partition stream goes to the leader directly; while the leader is not
//! known or cannot be reached it goes over the main connection, whose broker forwards it to the
//! leader (one extra hop: the safety net).
//!
//! A single broker's partitions have no replicas: they are not mapped, every stream stays on the
//! main connection, and no request is added (the producer's one `Metadata` per topic, which it
//! asks anyway, is all the map needs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quiver_protocol::message::{BrokerStatus, Message, TopicInfo};
use tokio::time::Instant;

use crate::connection::{request_on, unexpected, Client};
use crate::error::ClientError;

/// How long dialling a leader may take: a dead leader costs this once, then its partitions go
/// over the main connection.
pub(crate) const LEADER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection to a leader that hears nothing for this long is dropped (keep-alives go out at a
/// sixth of it), so a leader killed outright is noticed in seconds rather than at the main
/// connection's idle timeout.
pub(crate) const LEADER_IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
/// A topic's leaders are asked for at most this often, however many partitions fail at once.
pub(crate) const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(100);
/// How long a refresh's `Metadata` or `ClusterStatus` may take: a refresh runs on a partition's
/// sender task, which waits meanwhile.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);
/// A leader refresh the main connection's broker has not answered within this is asked of
/// another broker of the cluster too (`Client::ask_hedged`): a killed broker answers nothing
/// until the connection's idle timeout.
const HEDGE_AFTER: Duration = Duration::from_millis(200);
/// After a failed dial, a leader's address is not dialled again for this long (its partitions go
/// over the main connection meanwhile), doubling per failure in a row up to
/// [`MAX_UNREACHABLE_FOR`]: addresses clients cannot reach at all (brokers behind a NAT, `--peers`
/// naming internal addresses) then cost a dial a minute, not one every few seconds.
const UNREACHABLE_FOR: Duration = Duration::from_secs(5);
const MAX_UNREACHABLE_FOR: Duration = Duration::from_secs(60);

/// Where a partition's produce stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// The partition is not replicated (a single broker): the main connection, nothing to follow.
    Main,
    /// The leader, at this address (a connection of its own, or the main one if it goes there).
    Leader(Arc<str>),
    /// Replicated, but its leader is not known or not reachable just now: the main connection,
    /// whose broker forwards.
    Unknown,
}

/// The routing map: plain data, no I/O, so its rules are tested without a network.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    /// Broker id -> the address clients dial (`ClusterStatus`).
    brokers: HashMap<u32, Arc<str>>,
    /// Per topic, per partition index: its leader, `None` for a partition that is not replicated.
    /// Topics with no replicated partition are not kept.
    topics: HashMap<String, Vec<Option<Leader>>>,
    /// Addresses whose last dial failed: until when they are not tried again, and the failed
    /// dials in a row.
    unreachable: HashMap<Arc<str>, (Instant, u32)>,
    /// Bumped whenever a route may have changed (a leader, an address, a failed dial).
    generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Leader {
    /// `None` while no leader is known (or the last one could not be reached).
    id: Option<u32>,
    /// The epoch (Raft term) the leader was reported in: an answer with an older one comes from
    /// a broker that has not heard of the election yet, and is ignored.
    epoch: u64,
}

impl Routes {
    /// Takes in a topic's metadata. Returns whether a partition is led by a broker whose address
    /// is not known (ask `ClusterStatus`, then [`learn_brokers`](Routes::learn_brokers)).
    pub(crate) fn learn_topic(&mut self, info: &TopicInfo) -> bool {
        if info.partitions.iter().all(|p| p.replicas.is_empty()) {
            self.topics.remove(&info.name);
            return false;
        }
        let entries = self.topics.entry(info.name.clone()).or_default();
        let mut changed = entries.len() != info.partitions.len();
        entries.resize(info.partitions.len(), None);
        for p in &info.partitions {
            let Some(slot) = entries.get_mut(p.partition as usize) else { continue };
            let reported = Leader { id: p.leader, epoch: p.epoch };
            let new = match *slot {
                _ if p.replicas.is_empty() => None,
                Some(known) if known.epoch > p.epoch => Some(known),
                _ => Some(reported),
            };
            changed |= new.map(|l| l.id) != slot.map(|l| l.id);
            *slot = new;
        }
        if changed {
            self.generation += 1;
        }
        entries.iter().flatten().any(|l| l.id.is_some_and(|id| !self.brokers.contains_key(&id)))
    }

    /// Takes in the cluster's brokers (`ClusterStatus`).
    /// The addresses of the cluster's brokers known so far, by id.
    fn broker_addrs(&self) -> Vec<Arc<str>> {
        let mut ids: Vec<_> = self.brokers.iter().collect();
        ids.sort_unstable_by_key(|(id, _)| **id);
        ids.into_iter().map(|(_, a)| a.clone()).collect()
    }

    pub(crate) fn learn_brokers(&mut self, brokers: &[BrokerStatus]) {
        for b in brokers {
            if self.brokers.get(&b.id).is_none_or(|a| **a != *b.addr) {
                self.brokers.insert(b.id, Arc::from(b.addr.as_str()));
                self.generation += 1;
            }
        }
    }

    /// Changes whenever a route may have changed.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Where `topic`/`partition`'s stream goes at `now`.
    pub(crate) fn route(&self, topic: &str, partition: u32, now: Instant) -> Route {
        let Some(Some(leader)) = self.topics.get(topic).and_then(|t| t.get(partition as usize)) else {
            return Route::Main;
        };
        match leader.id.and_then(|id| self.brokers.get(&id)) {
            Some(addr) if self.may_dial(addr, now) => Route::Leader(addr.clone()),
            _ => Route::Unknown,
        }
    }

    /// Whether `addr` may be dialled at `now` (no failed dial in the last [`UNREACHABLE_FOR`]).
    fn may_dial(&self, addr: &str, now: Instant) -> bool {
        self.unreachable.get(addr).is_none_or(|&(until, _)| until <= now)
    }

    /// Dialling `addr` failed at `now`: the partitions it led are forgotten until metadata names
    /// a leader again, and it is not dialled again for a while.
    pub(crate) fn unreachable(&mut self, addr: &str, now: Instant) {
        let ids: Vec<u32> = self.brokers.iter().filter(|(_, a)| &***a == addr).map(|(&id, _)| id).collect();
        for leader in self.topics.values_mut().flat_map(|t| t.iter_mut().flatten()) {
            if leader.id.is_some_and(|id| ids.contains(&id)) {
                leader.id = None;
            }
        }
        let failures = self.unreachable.get(addr).map_or(0, |&(_, n)| n);
        let pause = UNREACHABLE_FOR.saturating_mul(1 << failures.min(8)).min(MAX_UNREACHABLE_FOR);
        self.unreachable.insert(Arc::from(addr), (now + pause, failures.saturating_add(1)));
        self.generation += 1;
    }

    /// Dialling `addr` succeeded: its next failure pauses it for the shortest time again.
    pub(crate) fn reachable(&mut self, addr: &str) {
        self.unreachable.remove(addr);
    }
}

/// The client's routing state: the map, the connections to leaders, and one refresh gate per
/// topic.
#[derive(Debug, Default)]
pub(crate) struct Routing {
    routes: parking_lot::Mutex<Routes>,
    /// `Routes::generation`, readable without the lock: a sender compares it once per turn of
    /// its loop to notice that another partition's refresh moved its leader.
    generation: std::sync::atomic::AtomicU64,
    /// Connections to leaders, by address; each slot is held while it is dialled, so partitions
    /// led by the same broker share one dial.
    leaders: parking_lot::Mutex<HashMap<Arc<str>, LeaderSlot>>,
    /// Per topic, when its leaders were last asked for; held during a refresh, so partitions
    /// that fail together wait for one refresh instead of each sending their own.
    refreshes: parking_lot::Mutex<HashMap<String, RefreshGate>>,
}

type LeaderSlot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;
type RefreshGate = Arc<tokio::sync::Mutex<Option<Instant>>>;

impl Routing {
    /// Changes the map under its lock and publishes its generation.
    fn update<R>(&self, f: impl FnOnce(&mut Routes) -> R) -> R {
        let mut routes = self.routes.lock();
        let r = f(&mut routes);
        self.generation.store(routes.generation(), std::sync::atomic::Ordering::Release);
        r
    }

    /// Changes whenever a route may have changed (no lock).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The leader connections, taken out (by `close`).
    pub(crate) async fn take_connections(&self) -> Vec<quinn::Connection> {
        let slots: Vec<LeaderSlot> = self.leaders.lock().values().cloned().collect();
        let mut out = Vec::new();
        for s in slots {
            out.extend(s.lock().await.take());
        }
        out
    }
}

impl Client {
    /// Where `topic`/`partition`'s stream goes now (no I/O).
    pub(crate) fn route(&self, topic: &str, partition: u32) -> Route {
        self.routing().routes.lock().route(topic, partition, Instant::now())
    }

    /// The connection for `topic`/`partition`'s produce stream, and the route it follows: the
    /// leader's connection if the leader is known and reachable, else the main connection
    /// (`Route::Unknown`: its broker forwards; `Route::Main`: not replicated).
    pub(crate) async fn connection_for(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(quinn::Connection, Route), ClientError> {
        let route = self.route(topic, partition);
        let Route::Leader(addr) = &route else { return Ok((self.live_connection().await?, route)) };
        match self.leader_connection(addr).await? {
            Some(conn) => Ok((conn, route)),
            None => Ok((self.live_connection().await?, Route::Unknown)),
        }
    }

    /// Asks the main connection's broker for `topic`'s leaders (and, if one is a broker the map
    /// has no address for, the cluster's brokers). At most once per [`MIN_REFRESH_INTERVAL`]
    /// per topic; a refresh already under way is waited for instead of repeated. A failure
    /// leaves the map as it was (streams then go where they went).
    pub(crate) async fn refresh_leaders(&self, topic: &str) {
        let gate = {
            let mut gates = self.routing().refreshes.lock();
            match gates.get(topic) {
                Some(g) => g.clone(),
                None => gates.entry(topic.to_string()).or_default().clone(),
            }
        };
        let mut last = gate.lock().await;
        if last.is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL) {
            return;
        }
        let result = async {
            let conn = self.live_connection().await?;
            match self.ask_hedged(&conn, &Message::Metadata { topic: Some(topic.into()) }).await? {
                Message::MetadataOk(t) if t.len() == 1 => {
                    tracing::trace!(topic, leaders = ?t[0].partitions.iter().map(|p| (p.leader, p.epoch)).collect::<Vec<_>>(), "partition leaders");
                    self.learn_leaders(&t[0]).await
                }
                other => Err(unexpected(other)),
            }
        };
        if let Err(e) = result.await {
            tracing::debug!(topic, "refreshing the partitions' leaders failed: {e}");
        }
        *last = Some(Instant::now());
    }

    /// Asks `request` on `main`; if that broker has not answered within [`HEDGE_AFTER`], also
    /// asks the first other broker of the cluster it knows (over that broker's own
    /// connection), and takes the first answer. Either may fail; the error is the last one.
    async fn ask_hedged(&self, main: &quinn::Connection, request: &Message) -> Result<Message, ClientError> {
        use futures::future::{select_ok, BoxFuture, FutureExt};
        let main_addr = main.remote_address();
        let first: BoxFuture<'_, Result<Message, ClientError>> =
            request_on(main, request, REFRESH_TIMEOUT).boxed();
        let hedge: BoxFuture<'_, Result<Message, ClientError>> = async move {
            tokio::time::sleep(HEDGE_AFTER).await;
            let other = self
                .routing()
                .routes
                .lock()
                .broker_addrs()
                .into_iter()
                .find(|a| a.parse::<SocketAddr>().ok() != Some(main_addr));
            let Some(addr) = other else {
                return Err(ClientError::Timeout(REFRESH_TIMEOUT.as_millis() as u64));
            };
            match self.leader_connection(&addr).await? {
                Some(conn) => request_on(&conn, request, REFRESH_TIMEOUT).await,
                None => Err(ClientError::Unreachable {
                    addr: addr.to_string(),
                    timeout_ms: LEADER_CONNECT_TIMEOUT.as_millis() as u64,
                }),
            }
        }
        .boxed();
        select_ok([first, hedge]).await.map(|(answer, _)| answer)
    }

    /// Takes in `info` (a `Metadata` answer), asking for the cluster's brokers when a leader is
    /// a broker the map has no address for. Nothing is asked for a topic that is not replicated.
    pub(crate) async fn learn_leaders(&self, info: &TopicInfo) -> Result<(), ClientError> {
        let unknown = self.routing().update(|r| r.learn_topic(info));
        if !unknown {
            return Ok(());
        }
        let conn = self.live_connection().await?;
        match request_on(&conn, &Message::ClusterStatus, REFRESH_TIMEOUT).await? {
            Message::ClusterStatusOk { brokers, .. } => {
                self.routing().update(|r| {
                    r.learn_brokers(&brokers);
                    r.learn_topic(info);
                });
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }

    /// A live connection to the broker at `addr`: the main one if it goes there, else one of its
    /// own, dialled now if need be (with a short timeout). `None` if it cannot be reached: the
    /// partitions it led are forgotten (`Routes::unreachable`).
    async fn leader_connection(&self, addr: &Arc<str>) -> Result<Option<quinn::Connection>, ClientError> {
        if let (Some(main), Ok(a)) = (self.current_connection().await, addr.parse::<SocketAddr>()) {
            if main.remote_address() == a {
                return Ok(Some(main));
            }
        }
        let slot = self.routing().leaders.lock().entry(addr.clone()).or_default().clone();
        let mut slot = slot.lock().await;
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        if let Some(c) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(Some(c.clone()));
        }
        *slot = None;
        if !self.routing().routes.lock().may_dial(addr, Instant::now()) {
            return Ok(None);
        }
        match self.dial_leader(addr).await {
            Ok(conn) if self.is_closed() => {
                conn.close(0u32.into(), b"bye");
                Err(ClientError::Closed)
            }
            Ok(conn) => {
                tracing::debug!(broker = %addr, "connected to a partition leader");
                self.routing().routes.lock().reachable(addr);
                *slot = Some(conn.clone());
                Ok(Some(conn))
            }
            Err(e) => {
                tracing::debug!(broker = %addr, "cannot reach a partition leader (its partitions go through the main connection meanwhile): {e}");
                self.routing().update(|r| r.unreachable(addr, Instant::now()));
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use quiver_protocol::message::{PartitionInfo, TopicConfig};

    use super::*;

    /// A topic whose partition `i` is led by `leaders[i]` (id, epoch); `replicated` false gives
    /// the single-node shape (leader = the broker, no replicas).
    fn topic(name: &str, leaders: &[(Option<u32>, u64)], replicated: bool) -> TopicInfo {
        TopicInfo {
            name: name.into(),
            config: TopicConfig::default(),
            partitions: leaders
                .iter()
                .enumerate()
                .map(|(i, &(leader, epoch))| PartitionInfo {
                    partition: i as u32,
                    log_start_offset: 0,
                    high_watermark: 0,
                    leader,
                    epoch,
                    replicas: if replicated { vec![1, 2, 3] } else { Vec::new() },
                })
                .collect(),
        }
    }

    fn brokers(n: u32) -> Vec<BrokerStatus> {
        (1..=n).map(|id| BrokerStatus { id, addr: format!("10.0.0.{id}:7420"), up: true }).collect()
    }

    fn leader(addr: &str) -> Route {
        Route::Leader(Arc::from(addr))
    }

    #[test]
    fn a_single_node_topic_stays_on_the_main_connection_and_needs_no_broker_list() {
        let mut r = Routes::default();
        assert!(!r.learn_topic(&topic("t", &[(Some(1), 0), (Some(1), 0)], false)), "no ClusterStatus asked");
        let now = Instant::now();
        assert_eq!(r.route("t", 0, now), Route::Main);
        assert_eq!(r.route("t", 1, now), Route::Main);
        assert_eq!(r.route("unknown-topic", 0, now), Route::Main);
        assert!(r.topics.is_empty(), "nothing kept for a topic without replicas");
    }

    #[test]
    fn replicated_partitions_go_to_their_leaders_once_the_addresses_are_known() {
        let mut r = Routes::default();
        let t = topic("t", &[(Some(1), 3), (Some(2), 3), (None, 4)], true);
        assert!(r.learn_topic(&t), "leader ids without addresses: ask ClusterStatus");
        let now = Instant::now();
        assert_eq!(r.route("t", 0, now), Route::Unknown, "no address yet: the main connection forwards");
        r.learn_brokers(&brokers(3));
        assert!(!r.learn_topic(&t), "every leader has an address now");
        assert_eq!(r.route("t", 0, now), leader("10.0.0.1:7420"));
        assert_eq!(r.route("t", 1, now), leader("10.0.0.2:7420"));
        assert_eq!(r.route("t", 2, now), Route::Unknown, "no leader elected yet");
        assert_eq!(r.route("t", 3, now), Route::Main, "no such partition: nothing to follow");
        // A leader id the broker list does not have (a broker added since) asks for it again.
        assert!(r.learn_topic(&topic("t", &[(Some(4), 5)], true)));
    }

    #[test]
    fn an_answer_from_an_older_epoch_does_not_undo_a_newer_leader() {
        let mut r = Routes::default();
        r.learn_brokers(&brokers(3));
        r.learn_topic(&topic("t", &[(Some(2), 7)], true));
        let now = Instant::now();
        // A broker that has not heard of the election still names the old leader.
        r.learn_topic(&topic("t", &[(Some(1), 6)], true));
        assert_eq!(r.route("t", 0, now), leader("10.0.0.2:7420"));
        // The same epoch without a leader (the leader stepped down) and a later one both count.
        r.learn_topic(&topic("t", &[(None, 7)], true));
        assert_eq!(r.route("t", 0, now), Route::Unknown);
        r.learn_topic(&topic("t", &[(Some(3), 8)], true));
        assert_eq!(r.route("t", 0, now), leader("10.0.0.3:7420"));
    }

    #[test]
    fn a_failed_dial_forgets_that_leader_and_skips_its_address_for_a_while() {
        let mut r = Routes::default();
        r.learn_brokers(&brokers(3));
        r.learn_topic(&topic("t", &[(Some(2), 1), (Some(3), 1), (Some(2), 1)], true));
        r.learn_topic(&topic("u", &[(Some(2), 1)], true));
        let now = Instant::now();
        r.unreachable("10.0.0.2:7420", now);
        assert_eq!(r.route("t", 0, now), Route::Unknown);
        assert_eq!(r.route("t", 2, now), Route::Unknown);
        assert_eq!(r.route("u", 0, now), Route::Unknown, "every topic it led");
        assert_eq!(r.route("t", 1, now), leader("10.0.0.3:7420"), "other leaders stay");
        // Metadata that still names it (the election is not over) does not send streams back
        // to it until the pause is over.
        r.learn_topic(&topic("t", &[(Some(2), 1), (Some(3), 1), (Some(2), 1)], true));
        assert_eq!(r.route("t", 0, now + Duration::from_secs(1)), Route::Unknown);
        assert_eq!(r.route("t", 0, now + UNREACHABLE_FOR), leader("10.0.0.2:7420"));
        // Failing again and again: the pause doubles up to a minute; a success resets it.
        let mut at = now;
        for pause in [10, 20, 40, 60, 60] {
            at += UNREACHABLE_FOR * 20;
            r.unreachable("10.0.0.2:7420", at);
            r.learn_topic(&topic("t", &[(Some(2), 1), (Some(3), 1), (Some(2), 1)], true));
            let pause = Duration::from_secs(pause);
            assert_eq!(r.route("t", 0, at + pause - Duration::from_millis(1)), Route::Unknown, "{pause:?}");
            assert_eq!(r.route("t", 0, at + pause), leader("10.0.0.2:7420"), "{pause:?}");
        }
        r.reachable("10.0.0.2:7420");
        r.unreachable("10.0.0.2:7420", at);
        r.learn_topic(&topic("t", &[(Some(2), 1), (Some(3), 1), (Some(2), 1)], true));
        assert_eq!(r.route("t", 0, at + UNREACHABLE_FOR), leader("10.0.0.2:7420"));
        // A new leader elsewhere is used at once.
        r.learn_topic(&topic("t", &[(Some(1), 2), (Some(3), 1), (Some(2), 1)], true));
        assert_eq!(r.route("t", 0, now), leader("10.0.0.1:7420"));
    }

    #[test]
    fn the_generation_moves_when_a_route_may_have_changed_and_only_then() {
        let mut r = Routes::default();
        let t = topic("t", &[(Some(1), 1), (Some(2), 1)], true);
        r.learn_topic(&t);
        r.learn_brokers(&brokers(3));
        let g = r.generation();
        r.learn_topic(&t);
        r.learn_brokers(&brokers(3));
        assert_eq!(r.generation(), g, "the same answers again change nothing");
        r.learn_topic(&topic("t", &[(Some(1), 1), (Some(3), 2)], true));
        assert!(r.generation() > g, "a new leader");
        let g = r.generation();
        r.unreachable("10.0.0.1:7420", Instant::now());
        assert!(r.generation() > g, "a failed dial");
    }

    #[test]
    fn a_topic_that_shrinks_or_loses_its_replicas_is_remapped() {
        let mut r = Routes::default();
        r.learn_brokers(&brokers(3));
        r.learn_topic(&topic("t", &[(Some(1), 1), (Some(2), 1)], true));
        r.learn_topic(&topic("t", &[(Some(1), 1)], true));
        let now = Instant::now();
        assert_eq!(r.route("t", 1, now), Route::Main);
        // Deleted and created again on a single broker (or without replicas).
        r.learn_topic(&topic("t", &[(Some(1), 0)], false));
        assert_eq!(r.route("t", 0, now), Route::Main);
    }
}
