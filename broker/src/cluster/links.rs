//! Links to the other brokers (docs/replication.md §5): one QUIC connection per peer with
//! mutual TLS (ALPN `quiver-peer/1`), dialled by this broker and re-dialled with back-off
//! when lost. Raft messages for every group go out on one unidirectional stream per
//! connection, in order, as `Message::Raft` frames; a full queue drops (Raft resends what
//! is lost). Requests this broker forwards (a produce to the leader, a topic create to the
//! controller's leader) go on bidirectional streams of the same connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quiver_protocol::message::Message;
use quiver_protocol::ErrorCode;
use quiver_transport::{write_message, FrameReader};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::partition::PartitionError;

/// Raft frames queued for one peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;
/// Frames written to the stream in one go.
const WRITE_BATCH: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer from which nothing came for this long counts as down in `cluster status` and for
/// choosing where reads go: ten heartbeat ticks.
const UP_WINDOW: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Peer {
    queue: mpsc::Sender<Bytes>,
    conn: watch::Receiver<Option<quinn::Connection>>,
    /// When a frame from this peer last arrived, in ms since `PeerLinks::started` (0: never).
    heard_ms: std::sync::atomic::AtomicU64,
}

/// This broker's links to its peers.
#[derive(Debug)]
pub(crate) struct PeerLinks {
    me: u64,
    /// Grows when a broker is added (docs/replication.md §11); a removed broker's link stays
    /// until this broker restarts.
    peers: dashmap::DashMap<u64, Arc<Peer>>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    shutdown: CancellationToken,
    dropped: metrics::Counter,
    /// Poked when a group here became leader: the brokers holding no replica of it are told
    /// at once (`announce.rs`) rather than at the next round.
    pub(crate) announce: tokio::sync::Notify,
    /// The broker's one Raft clock: bumped every `driver::TICK`, watched by every group.
    pub(crate) ticks: watch::Receiver<u64>,
    started: std::time::Instant,
}

impl PeerLinks {
    /// Starts a dialler per peer (every entry of `peers` but `me`).
    pub(crate) fn start(
        me: u64,
        peers: &BTreeMap<u64, SocketAddr>,
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        shutdown: CancellationToken,
    ) -> Arc<PeerLinks> {
        let (tick_tx, ticks) = watch::channel(0u64);
        tokio::spawn(tick(tick_tx, shutdown.clone()));
        let links = Arc::new(PeerLinks {
            me,
            ticks,
            started: std::time::Instant::now(),
            peers: dashmap::DashMap::new(),
            endpoint,
            client,
            shutdown,
            dropped: metrics::counter!("quiver_raft_messages_dropped_total"),
            announce: tokio::sync::Notify::new(),
        });
        for (&id, &addr) in peers {
            links.add_peer(id, addr);
        }
        links
    }

    /// Starts dialling broker `id` at `addr` unless it is this broker or already a peer.
    pub(crate) fn add_peer(&self, id: u64, addr: SocketAddr) {
        if id == self.me || self.peers.contains_key(&id) {
            return;
        }
        let (queue, rx) = mpsc::channel(PEER_QUEUE);
        let (conn_tx, conn) = watch::channel(None);
        let (endpoint, client, shutdown) =
            (self.endpoint.clone(), self.client.clone(), self.shutdown.clone());
        tokio::spawn(dial(id, addr, endpoint, client, rx, conn_tx, shutdown));
        self.peers.insert(id, Arc::new(Peer { queue, conn, heard_ms: Default::default() }));
    }

    /// Whether `id` is a peer (a broker of the cluster, or one removed since this start).
    pub(crate) fn is_peer(&self, id: u64) -> bool {
        self.peers.contains_key(&id)
    }

    /// Queues a raft-rs message for its recipient; dropped (and counted) if the link's queue
    /// is full or the recipient is not a peer.
    pub(crate) fn send(&self, group: u64, m: &raft::eraftpb::Message) {
        let Some(peer) = self.peers.get(&m.to) else {
            if m.to != self.me {
                tracing::debug!(to = m.to, "a Raft message for a broker that is not a peer");
            }
            return;
        };
        let Some(wire) = crate::replica::to_wire(group, m) else { return };
        let mut buf = BytesMut::with_capacity(wire.encoded_len());
        wire.encode(&mut buf);
        let frame = Message::Raft { payload: buf.freeze() }.encode().to_bytes();
        if peer.queue.try_send(frame).is_err() {
            self.dropped.increment(1);
        }
    }

    /// Queues an encoded frame for peer `id` on its Raft stream; dropped (and counted) if the
    /// queue is full: what goes this way is resent (`Leaders` every round).
    pub(crate) fn send_frame(&self, id: u64, frame: Bytes) {
        if let Some(peer) = self.peers.get(&id) {
            if peer.queue.try_send(frame).is_err() {
                self.dropped.increment(1);
            }
        }
    }

    /// The peers' ids (this broker not included).
    pub(crate) fn peer_ids(&self) -> impl Iterator<Item = u64> + '_ {
        let mut ids: Vec<u64> = self.peers.iter().map(|p| *p.key()).collect();
        ids.sort_unstable();
        ids.into_iter()
    }

    /// The live connection to peer `id`, if any.
    pub(crate) fn connection(&self, id: u64) -> Option<quinn::Connection> {
        self.peers.get(&id).and_then(|p| p.conn.borrow().clone())
    }

    /// Notes a frame from peer `id` (its Raft stream: heartbeats flow every tick).
    pub(crate) fn heard_from(&self, id: u64) {
        if let Some(p) = self.peers.get(&id) {
            let now = self.started.elapsed().as_millis() as u64 + 1;
            p.heard_ms.store(now, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether `id` is up: its link is connected and a frame came from it within `UP_WINDOW`
    /// (a killed broker's link stays open until its idle timeout; its heartbeats stop at once).
    /// This broker: always.
    pub(crate) fn is_up(&self, id: u64) -> bool {
        id == self.me
            || self.peers.get(&id).is_some_and(|p| {
                let heard = p.heard_ms.load(std::sync::atomic::Ordering::Relaxed);
                let now = self.started.elapsed().as_millis() as u64 + 1;
                p.conn.borrow().is_some()
                    && heard > 0
                    && now.saturating_sub(heard) <= UP_WINDOW.as_millis() as u64
            })
    }

    /// Sends `msg` to broker `id` as a client would, and returns its one answer. Waits up to
    /// `timeout` in all, including for the link to come up.
    pub(crate) async fn request(
        &self,
        id: u64,
        msg: &Message,
        timeout: Duration,
    ) -> Result<Message, PartitionError> {
        let unavailable = |why: String| {
            PartitionError::new(ErrorCode::NotLeader, format!("broker {id} is unreachable: {why}"))
        };
        let peer =
            self.peers.get(&id).map(|p| p.value().clone()).ok_or_else(|| unavailable("not a peer".into()))?;
        let attempt = async {
            let mut conn = peer.conn.clone();
            let conn = conn.wait_for(Option::is_some).await.map_err(|e| unavailable(e.to_string()))?.clone();
            let Some(conn) = conn else { return Err(unavailable("no connection".into())) };
            let (mut send, recv) = conn.open_bi().await.map_err(|e| unavailable(e.to_string()))?;
            write_message(&mut send, msg).await.map_err(|e| unavailable(e.to_string()))?;
            let _ = send.finish();
            let mut reader = FrameReader::new(recv);
            match reader.next().await {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) => Err(unavailable("stream closed without an answer".into())),
                Err(e) => Err(unavailable(e.to_string())),
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| unavailable(format!("no answer within {timeout:?}")))?
    }
}

/// The Raft clock of every group on this broker (one timer, not one per group).
async fn tick(ticks: watch::Sender<u64>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(super::driver::TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => { ticks.send_modify(|t| *t = t.wrapping_add(1)); }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Keeps one peer connected and writes its queued Raft frames.
async fn dial(
    id: u64,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    mut queue: mpsc::Receiver<Bytes>,
    conn_tx: watch::Sender<Option<quinn::Connection>>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let server_name = addr.ip().to_string();
    loop {
        let connecting = match endpoint.connect_with(client.clone(), addr, &server_name) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(peer = id, %addr, "cannot dial a peer: {e}");
                return;
            }
        };
        let conn = tokio::select! {
            c = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => c,
            _ = shutdown.cancelled() => return,
        };
        let conn = match conn {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(peer = id, %addr, "peer link: {e}");
                // Raft messages for a peer that is down are stale by the time it is back.
                while queue.try_recv().is_ok() {}
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(_) => {
                while queue.try_recv().is_ok() {}
                continue;
            }
        };
        tracing::info!(peer = id, %addr, "peer link up");
        conn_tx.send_replace(Some(conn.clone()));
        let up = std::time::Instant::now();
        let result = pump(&conn, &mut queue, &shutdown).await;
        conn_tx.send_replace(None);
        if shutdown.is_cancelled() {
            conn.close(0u32.into(), b"shutting down");
            return;
        }
        tracing::info!(peer = id, %addr, "peer link down: {}", result.err().unwrap_or_default());
        conn.close(0u32.into(), b"link reset");
        // A peer that accepts and drops at once (it is draining for a restart) is retried
        // with back-off, not a hundred times a second.
        if up.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_MIN;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Writes queued frames to one uni stream until the connection fails or the broker stops.
async fn pump(
    conn: &quinn::Connection,
    queue: &mut mpsc::Receiver<Bytes>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
    let mut chunks = Vec::with_capacity(WRITE_BATCH);
    loop {
        tokio::select! {
            first = queue.recv() => match first {
                Some(f) => chunks.push(f),
                None => return Ok(()),
            },
            e = conn.closed() => return Err(e.to_string()),
            _ = shutdown.cancelled() => return Ok(()),
        }
        while chunks.len() < WRITE_BATCH {
            match queue.try_recv() {
                Ok(f) => chunks.push(f),
                Err(_) => break,
            }
        }
        send.write_all_chunks(&mut chunks).await.map_err(|e| e.to_string())?;
        chunks.clear();
    }
}
