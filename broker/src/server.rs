//! The broker as a library: `Broker::start` binds the QUIC endpoint and serves until
//! `shutdown`. Connections and streams are tasks; every task watches one cancellation token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dashmap::DashMap;
use quiver_protocol::message::Message;
use quiver_protocol::ErrorCode;
use quiver_transport::{write_message, FrameReader};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::offsets::OffsetStore;
use crate::partition::PartitionError;
use crate::state::{fail_stream, BrokerState};
use crate::storage::{FsStorage, Storage};
use crate::topics::Topics;

/// A running broker. Dropping it does not stop it; call `shutdown`.
#[derive(Debug)]
pub struct Broker {
    state: Arc<BrokerState>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    ca_path: Option<PathBuf>,
    peer_tls: Option<crate::tls::PeerTls>,
    metrics_addr: Option<SocketAddr>,
    tasks: tokio::task::JoinHandle<()>,
}

impl Broker {
    /// Recovers the data directory, binds the endpoint and starts serving.
    pub async fn start(config: BrokerConfig) -> anyhow::Result<Broker> {
        let storage = FsStorage::new().direct_writes(config.direct_writes);
        Self::start_with_storage(config, Arc::new(storage)).await
    }

    /// As `start`, with partition logs on the given storage backend.
    pub async fn start_with_storage(
        config: BrokerConfig,
        storage: Arc<dyn Storage>,
    ) -> anyhow::Result<Broker> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        // Before anything in the directory is read or written; held until the broker stopped.
        let dir_lock = crate::data_dir::DataDirLock::acquire(&config.data_dir)?;
        // Blocking: fsyncs, and with --dev-ca a wait for the broker creating the shared CA.
        let tls_files = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || crate::tls::ensure_certificates(&config)).await??
        };
        let server_config = crate::tls::server_config(&tls_files, &config)?;
        let cert_checks = crate::tls::CertChecks::new(&tls_files, &config)?;
        let peer_tls =
            crate::tls::PeerTls::from_files(&tls_files, Duration::from_millis(config.idle_timeout_ms))?;
        let shutdown = CancellationToken::new();
        // Before anything records or keeps a metric handle (partitions do, when they load).
        let recorder = match config.metrics_listen {
            Some(_) => Some(crate::observability::install_recorder()?),
            None => None,
        };
        // Single node: ACL rules in `<data_dir>/acls.json`; a cluster's controller keeps them.
        let acl_file = config.cluster.is_none().then(|| config.data_dir.join("acls.json"));
        let auth = Arc::new(crate::auth::Auth::new(&config, acl_file)?);
        log_auth_mode(&config);
        let cluster_storage = storage.clone();
        let (topics, offsets, producer_ids) = {
            let dir = config.data_dir.clone();
            let token = shutdown.clone();
            let budgets = crate::partition::SharedBudgets::new(
                config.tail_cache_bytes_per_partition,
                config.tail_cache_bytes_total,
                crate::open_files::CLOSED_SEGMENT_FILES,
            );
            let offsets_storage = storage.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let started = std::time::Instant::now();
                let topics = Topics::load(&dir, storage, token, budgets)?;
                let all = topics.all();
                let partitions: usize = all.iter().map(|t| t.partitions.len()).sum();
                tracing::info!(
                    topics = all.len(),
                    partitions,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "recovered the partitions"
                );
                let offsets = OffsetStore::open(offsets_storage, &dir.join("offsets"))?;
                offsets.cut_to_logs_blocking(|t, p| {
                    Some(topics.get(t).ok()?.partition(p).ok()?.high_watermark())
                })?;
                let producer_ids = crate::producers::ProducerIds::open(&dir)?;
                Ok((topics, offsets, producer_ids))
            })
            .await??
        };
        let socket = quiver_transport::udp_socket(config.listen, true)
            .with_context(|| format!("binding UDP {}", config.listen))?;
        let endpoint_config = crate::tls::endpoint_config(&config)?;
        let total_buffer = config.max_total_buffer_bytes as usize;
        let send_windows = crate::budget::SendWindows::new(config.max_total_send_bytes);
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        let topics = Arc::new(topics);
        // Cluster mode: the controller replays its log (attaching the replicated partitions and
        // setting their high watermarks to their commits) before any client is served.
        let cluster = match config.cluster.clone() {
            Some(cc) => {
                // Peer links notice a dead broker within seconds (keep-alives at a sixth of it),
                // not after a client's idle timeout.
                let client = crate::tls::peer_client_config(&tls_files, crate::cluster::PEER_IDLE_TIMEOUT)?;
                Some(
                    crate::cluster::start(
                        &config,
                        cc,
                        cluster_storage,
                        topics.clone(),
                        endpoint.clone(),
                        client,
                        auth.acls.clone(),
                        // Its own token, cancelled at shutdown only after the coordinators'
                        // last flush went through their Raft groups (`run`).
                        CancellationToken::new(),
                    )
                    .await?,
                )
            }
            None => None,
        };
        let state = Arc::new(BrokerState {
            config,
            topics,
            offsets: Arc::new(offsets),
            coordinators: Default::default(),
            producer_ids,
            group_owners: DashMap::new(),
            groups: Default::default(),
            next_generation: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            total_buffer: Arc::new(tokio::sync::Semaphore::new(total_buffer)),
            send_windows,
            shutdown,
            dead_letters: crate::dead_letters::DeadLetterWriter::start(),
            cluster,
            auth,
            cert_checks,
            local_addr: local_addr.into(),
        });
        if let Some(c) = &state.cluster {
            let (groups, offsets) = (Arc::downgrade(&state), Arc::downgrade(&state));
            c.set_delete_hooks(crate::cluster::DeleteHooks {
                dropped: Box::new(move |topic| {
                    if let Some(st) = groups.upgrade() {
                        st.groups.topic_deleted(topic);
                    }
                }),
                forget: Arc::new(move |topic| match offsets.upgrade() {
                    Some(st) => {
                        // The groups coordinated here write tombstones through their offsets
                        // partitions; a store deposed meanwhile is another coordinator's to
                        // clean (it skips deleted topics when it reads its state).
                        for store in st.coordinators.stores() {
                            match store.remove_topic_blocking(topic) {
                                Err(crate::offsets::OffsetsError::NotCoordinator { .. }) | Ok(()) => {}
                                Err(e) => return Err(e.to_string()),
                            }
                        }
                        st.offsets.remove_topic_blocking(topic).map_err(|e| e.to_string())
                    }
                    None => Ok(()),
                }),
            });
        }
        let metrics_addr = match (state.config.metrics_listen, recorder) {
            (Some(addr), Some(handle)) => {
                Some(crate::observability::serve(addr, handle, state.shutdown.clone()).await?)
            }
            _ => None,
        };
        let tasks = tokio::spawn(run(state.clone(), endpoint.clone(), dir_lock));
        Ok(Broker { state, endpoint, local_addr, ca_path: tls_files.ca, peer_tls, metrics_addr, tasks })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `/metrics` and `/healthz` are served, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The development CA clients should trust, when certificates were generated (with
    /// `--dev-ca DIR`, the shared `DIR/ca.pem`).
    pub fn ca_path(&self) -> Option<&PathBuf> {
        self.ca_path.as_ref()
    }

    /// How this broker dials its peers (`quiver-peer/1`, mutual TLS) through [`Self::endpoint`],
    /// when a peer CA is configured (`--dev-ca` or `--tls-ca`).
    pub fn peer_tls(&self) -> Option<&crate::tls::PeerTls> {
        self.peer_tls.as_ref()
    }

    pub fn state(&self) -> &Arc<BrokerState> {
        &self.state
    }

    /// A token that stops the broker when cancelled (e.g. from a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Resolves once the broker has stopped (after `shutdown` or the token was cancelled).
    pub async fn stopped(self) {
        let _ = self.tasks.await;
    }

    /// Stops accepting, closes connections, persists offsets and syncs every partition.
    pub async fn shutdown(self) {
        self.state.shutdown.cancel();
        let _ = self.tasks.await;
    }

    /// The endpoint, for tests that need to look at it.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }
}

/// Says at start who may connect: with authentication off, that anyone reaching the port may
/// do anything (the development default; `validate` refused it beyond loopback unless
/// `--allow-anonymous`).
fn log_auth_mode(config: &BrokerConfig) {
    if !config.auth_enabled() {
        tracing::warn!(
            listen = %config.listen,
            "authentication is off: every client may do everything (the development default; turn it on with \
             --client-ca and/or --token-file, docs/security.md)"
        );
        if !config.super_users.is_empty() || !config.quotas.is_empty() {
            tracing::warn!(
                "super_users and quotas name principals, and with authentication off every client is \
                 `anonymous`: super_users has no effect, quotas apply only to `anonymous` and `*`"
            );
        }
        return;
    }
    tracing::info!(
        client_certificates = ?config.client_ca.as_ref().map(|p| p.display().to_string()),
        tokens = ?config.token_file.as_ref().map(|p| p.display().to_string()),
        anonymous = if config.allow_anonymous { "allowed, as principal 'anonymous'" } else { "refused" },
        super_users = ?config.super_users,
        "authentication is on: requests are checked against ACLs"
    );
}

/// How long a stopping broker waits for the leadership it hands over to move (a few round
/// trips normally; past it the rest elect without it as after a crash).
const HAND_OVER_WAIT: Duration = Duration::from_millis(1500);

async fn run(state: Arc<BrokerState>, endpoint: quinn::Endpoint, dir_lock: crate::data_dir::DataDirLock) {
    let mut conns = JoinSet::new();
    // Connections from peer brokers: they stay open until the cluster stops (after the
    // coordinators' last flush, which needs the peers' answers).
    let peers_open = Arc::new(AtomicUsize::new(0));
    let mut background = JoinSet::new();
    crate::maintenance::spawn_all(&state, &mut background);
    background.spawn(crate::coordinator::run(state.clone()));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if state.connections.load(Ordering::Relaxed) >= state.config.max_connections {
                    tracing::warn!(remote = %incoming.remote_address(), "refusing a connection: at max_connections");
                    incoming.refuse();
                    continue;
                }
                if state.config.validate_addresses && !incoming.remote_address_validated() {
                    let _ = incoming.retry();
                    continue;
                }
                // Handshakes hold state before anyone is authenticated: a bounded number at once.
                let Some(slot) = HandshakeSlot::take(&state) else {
                    metrics::counter!("quiver_handshakes_refused_total").increment(1);
                    incoming.refuse();
                    continue;
                };
                conns.spawn(handle_connection(state.clone(), incoming, slot, peers_open.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = state.shutdown.cancelled() => break,
        }
    }
    state.shutdown.cancel();
    // Every connection closes itself with `ShuttingDown` (clients reconnect). Handshakes that
    // arrive while the broker drains are completed and closed the same way, not refused: a
    // client reconnecting at once learns the broker is restarting and tries again.
    let turn_away = tokio::spawn(turn_away(endpoint.clone()));
    // In a cluster the partitions it leads move meanwhile, so their clients find a new leader
    // within a few round trips instead of an election timeout after this broker is gone.
    if let Some(cluster) = &state.cluster {
        cluster.hand_over_leadership(HAND_OVER_WAIT).await;
    }
    let clients_open = |conns: &JoinSet<()>| conns.len() > peers_open.load(Ordering::Acquire);
    while clients_open(&conns)
        && tokio::time::timeout(Duration::from_secs(5), conns.join_next()).await.ok().flatten().is_some()
    {
    }
    while background.join_next().await.is_some() {}
    // The groups coordinated here persist what was acknowledged since the last flush while
    // their offsets partitions' Raft groups still run; then the cluster stops.
    crate::maintenance::close_coordinators(&state).await;
    if let Some(cluster) = &state.cluster {
        cluster.shutdown.cancel();
    }
    while tokio::time::timeout(Duration::from_secs(2), conns.join_next()).await.ok().flatten().is_some() {}
    crate::maintenance::final_flush(&state).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    turn_away.abort();
    endpoint.close(shutting_down_code(), SHUTTING_DOWN_REASON);
    // Every file write is done: another broker may have the directory now.
    drop(dir_lock);
    tracing::info!("broker stopped");
}

/// The application close code of connections a stopping broker closes: `ShuttingDown`.
fn shutting_down_code() -> quinn::VarInt {
    quinn::VarInt::from_u32(u32::from(ErrorCode::ShuttingDown.code()))
}

const SHUTTING_DOWN_REASON: &[u8] = b"broker shutting down; reconnect";

/// While the broker drains: completes each new handshake and closes it with `ShuttingDown`.
async fn turn_away(endpoint: quinn::Endpoint) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                handshakes.spawn(async move {
                    if let Ok(conn) = incoming.await {
                        conn.close(shutting_down_code(), SHUTTING_DOWN_REASON);
                    }
                });
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
        }
    }
}

/// One of the `max_handshakes` in progress, given back when dropped.
struct HandshakeSlot(Arc<BrokerState>);

impl HandshakeSlot {
    fn take(state: &Arc<BrokerState>) -> Option<HandshakeSlot> {
        let max = state.config.max_handshakes;
        state
            .handshakes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| HandshakeSlot(state.clone()))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Streams a connection may open before it authenticates (when the broker requires it): its
/// `Hello` needs one. They are counted against no principal.
const UNAUTHENTICATED_STREAMS: usize = 4;

/// How long a connection may go without authenticating, when the broker requires it.
const AUTH_DEADLINE: Duration = Duration::from_secs(10);

/// How long a connection refused for its credentials stays open for the refusal to reach the
/// client before it is closed.
const REFUSAL_GRACE: Duration = Duration::from_millis(200);

async fn handle_connection(
    state: Arc<BrokerState>,
    incoming: quinn::Incoming,
    slot: HandshakeSlot,
    peers_open: Arc<AtomicUsize>,
) {
    let remote = incoming.remote_address();
    let mut members_principal: Option<String> = None;
    let handshake = incoming.await;
    drop(slot);
    let conn = match handshake {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%remote, "handshake failed: {e}");
            return;
        }
    };
    // A connection asking for the broker-to-broker protocol must be an authenticated broker
    // (rustls verified any certificate presented, but lets connections without one through so
    // clients connect): refuse the rest. Authenticated peer links are the cluster's to serve.
    if crate::tls::is_peer_alpn(&conn) {
        if let Err(e) = crate::tls::peer_identity(&conn) {
            tracing::warn!(%remote, "refusing a quiver-peer/1 connection: {e}");
            crate::tls::close_unauthenticated(&conn, &e);
            return;
        }
        if let Err(e) = state.cert_checks.check_peer(&conn) {
            tracing::warn!(%remote, "refusing a quiver-peer/1 connection: {e}");
            let code = quinn::VarInt::from_u32(u32::from(ErrorCode::Unauthenticated.code()));
            conn.close(code, format!("quiver-peer/1 refused: {e}").as_bytes());
            return;
        }
    }
    // A client's certificate (verified by rustls against the client CA) names its principal.
    if !crate::tls::is_peer_alpn(&conn) {
        match state.cert_checks.client_principal(&conn) {
            Ok(Some(principal)) => {
                tracing::debug!(%remote, %principal, "client authenticated by certificate");
                members_principal = Some(principal);
            }
            Ok(None) => {}
            Err(e) => {
                metrics::counter!("quiver_auth_failures_total", "method" => "certificate").increment(1);
                tracing::warn!(%remote, "refusing a client certificate: {e}");
                let code = quinn::VarInt::from_u32(u32::from(ErrorCode::Unauthenticated.code()));
                conn.close(code, format!("client certificate refused: {e}").as_bytes());
                return;
            }
        }
    }
    // A broker of the cluster: Raft frames on unidirectional streams, forwarded requests on
    // bidirectional ones (served as a client's).
    let peer = match (&state.cluster, crate::tls::is_peer_alpn(&conn)) {
        (Some(cluster), true) => match peer_id(cluster, &conn) {
            Some(id) => {
                conn.set_max_concurrent_uni_streams(4u32.into());
                Some((Arc::clone(cluster), id))
            }
            None => {
                tracing::warn!(%remote, "refusing a broker connection: not a verified peer of this cluster");
                conn.close(quinn::VarInt::from_u32(u32::from(ErrorCode::Malformed.code())), b"not a peer");
                return;
            }
        },
        _ => None,
    };
    let id = state.next_generation.fetch_add(1, Ordering::Relaxed);
    let members = match &peer {
        Some((_, node)) => crate::groups::ConnectionInfo::peer(id, *node),
        None => crate::groups::ConnectionInfo::new(id),
    };
    if let Some(p) = members_principal {
        if let Err(e) = state.auth.admit(&members, p.into()) {
            tracing::warn!(%remote, "refusing a connection: {}", e.message);
            let code = quinn::VarInt::from_u32(u32::from(e.code.code()));
            conn.close(code, e.message.as_bytes());
            return;
        }
    }
    // A peer's connection closes when the cluster stops, a client's when the broker does.
    let stop = match &peer {
        Some((cluster, _)) => {
            peers_open.fetch_add(1, Ordering::AcqRel);
            cluster.shutdown.clone()
        }
        None => state.shutdown.clone(),
    };
    // Counted against the limit checked before the handshake once more, atomically: handshakes
    // finishing together could otherwise all pass it (and the clients' send windows share a
    // total sized for `max_connections`).
    let max = state.config.max_connections;
    if state
        .connections
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .is_err()
    {
        tracing::warn!(%remote, "refusing a connection: at max_connections");
        if peer.is_some() {
            peers_open.fetch_sub(1, Ordering::AcqRel);
        }
        state.auth.release(&members);
        conn.close(
            quinn::VarInt::from_u32(u32::from(ErrorCode::LimitExceeded.code())),
            b"at max_connections",
        );
        return;
    }
    metrics::gauge!("quiver_connections").increment(1.0);
    // A client's unacknowledged answers wait in its send window: all clients share a total.
    let _send_window = peer.is_none().then(|| state.send_windows.join(id, &conn));
    tracing::debug!(%remote, "connection open");
    let mut streams = JoinSet::new();
    // A peer link carries the requests of every client forwarded here from that broker: the
    // broker-wide budget bounds it, not one client's.
    let budget = match peer {
        Some(_) => state.config.max_total_buffer_bytes,
        None => state.config.max_connection_buffer_bytes,
    };
    let buffer = Arc::new(tokio::sync::Semaphore::new(budget as usize));
    let mut stream_limit = state.config.initial_streams_per_connection();
    // A client that must authenticate and has not within AUTH_DEADLINE is closed.
    let auth_deadline = tokio::time::Instant::now() + AUTH_DEADLINE;
    let must_authenticate = peer.is_none() && state.auth.requires_credentials();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(auth_deadline), if must_authenticate && members.principal().is_none() => {
                close_unauthenticated_client(&conn, "no credentials presented within 10 s of connecting");
                break;
            }
            _ = members.refused(), if must_authenticate => {
                // Let the refusal (an answer to `Hello`) reach the client first.
                tokio::time::sleep(REFUSAL_GRACE).await;
                close_unauthenticated_client(&conn, "credentials refused");
                break;
            }
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let unauthenticated = must_authenticate && members.principal().is_none();
                    let slot = if unauthenticated && streams.len() >= UNAUTHENTICATED_STREAMS {
                        Err(PartitionError::new(
                            ErrorCode::Unauthenticated,
                            "authenticate first: a connection may open only a few streams before its Hello",
                        ))
                    } else {
                        state.auth.open_stream(&members)
                    };
                    match slot {
                        Ok(slot) => {
                            let stream = handle_stream(state.clone(), send, recv, buffer.clone(), members.clone());
                            streams.spawn(async move {
                                stream.await;
                                drop(slot);
                            });
                        }
                        Err(e) => {
                            streams.spawn(refuse_stream(send, recv, e));
                        }
                    }
                    // A connection yet to authenticate keeps its first few streams.
                    if !unauthenticated {
                        stream_limit = raise_stream_limit(&conn, streams.len(), stream_limit, state.config.max_streams_per_connection);
                    }
                }
                Err(e) => {
                    tracing::debug!(%remote, "connection closed: {e}");
                    break;
                }
            },
            s = conn.accept_uni(), if peer.is_some() => match (s, &peer) {
                (Ok(recv), Some((cluster, from))) => {
                    streams.spawn(read_raft(Arc::clone(cluster), *from, recv));
                }
                (Err(e), _) => {
                    tracing::debug!(%remote, "peer connection closed: {e}");
                    break;
                }
                _ => {}
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            _ = stop.cancelled() => {
                conn.close(shutting_down_code(), SHUTTING_DOWN_REASON);
                break;
            }
        }
    }
    streams.abort_all();
    while streams.join_next().await.is_some() {}
    let changed = state.groups.connection_closed(&members);
    if !changed.is_empty() && state.cluster.is_some() {
        let st = state.clone();
        let _ =
            tokio::task::spawn_blocking(move || crate::coordinator::record_groups_blocking(&st, &changed))
                .await;
    }
    if peer.is_some() {
        peers_open.fetch_sub(1, Ordering::AcqRel);
    }
    state.auth.release(&members);
    state.connections.fetch_sub(1, Ordering::Relaxed);
    metrics::gauge!("quiver_connections").decrement(1.0);
}

fn close_unauthenticated_client(conn: &quinn::Connection, why: &str) {
    metrics::counter!("quiver_auth_closed_total").increment(1);
    let code = quinn::VarInt::from_u32(u32::from(ErrorCode::Unauthenticated.code()));
    conn.close(code, format!("this broker requires authentication: {why}").as_bytes());
}

/// Which peer a broker connection is: the node id its certificate names (`--dev-ca`
/// certificates carry `quiver://broker/<id>`, verified against the cluster's CA at the
/// handshake), which must be one of `--peers`. A certificate without an id (an operator's,
/// `--tls-ca`) is matched by its source address: brokers dial from the endpoint they serve on,
/// so a peer's source address is its `--peers` address unless a proxy sits between.
fn peer_id(cluster: &crate::cluster::Cluster, conn: &quinn::Connection) -> Option<u64> {
    let identity = crate::tls::peer_identity(conn).ok()?;
    match identity.node_id {
        Some(id) => cluster.knows_broker(id).then_some(id),
        None => {
            let remote = conn.remote_address();
            cluster.members.read().iter().find(|(_, a)| **a == remote).map(|(id, _)| *id)
        }
    }
}

/// Reads a peer's Raft frames and hands them to their groups.
async fn read_raft(cluster: Arc<crate::cluster::Cluster>, from: u64, recv: quinn::RecvStream) {
    let mut reader = FrameReader::new(recv);
    loop {
        let frame = reader.next().await;
        if matches!(frame, Ok(Some(_))) {
            cluster.links.heard_from(from);
        }
        match frame {
            Ok(Some(Message::Raft { payload })) => cluster.deliver(from, payload),
            Ok(Some(Message::Leaders { notices })) => cluster.observe(from, notices),
            Ok(Some(other)) => {
                tracing::warn!(peer = from, kind = other.kind(), "a non-Raft frame on a Raft stream");
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(peer = from, "Raft stream: {e}");
                return;
            }
        }
    }
}

/// Doubles the connection's stream limit (up to `max`) once its open streams reach half of it,
/// so a client that needs many streams (one per partition it writes or subscribes to) gets
/// them a round trip later, and an idle connection keeps the small starting limit.
fn raise_stream_limit(conn: &quinn::Connection, open: usize, limit: u32, max: u32) -> u32 {
    if limit >= max || open < (limit / 2) as usize {
        return limit;
    }
    let raised = limit.saturating_mul(2).min(max);
    conn.set_max_concurrent_bi_streams(raised.into());
    raised
}

/// Answers a stream the broker will not serve with `e`, without reading what it asked: the
/// answer first (a client writing more on the stream meanwhile gets it before its writes fail),
/// then the stream is stopped.
async fn refuse_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, e: PartitionError) {
    let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
    let _ = send.finish();
    let _ = recv.stop(quinn::VarInt::from_u32(u32::from(e.code.code())));
}

/// The first frame decides what a stream is: `Subscribe` makes a subscription stream,
/// anything else a request stream.
async fn handle_stream(
    state: Arc<BrokerState>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    connection_buffer: Arc<tokio::sync::Semaphore>,
    members: crate::groups::ConnectionMembers,
) {
    let budget =
        crate::state::ReplyBudget { connection: connection_buffer, total: state.total_buffer.clone() };
    let mut reader = FrameReader::new(recv)
        .with_frame_timeout(Duration::from_millis(state.config.frame_timeout_ms))
        .with_budget(budget.connection.clone())
        .with_budget(budget.total.clone());
    // A stream that never says what it is for is ended like an idle one.
    let idle = Duration::from_millis(state.config.stream_idle_timeout_ms);
    let first = match tokio::time::timeout(idle, reader.next_frame()).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return fail_stream(&mut send, &mut reader, e).await,
        Err(_) => {
            metrics::counter!("quiver_idle_streams_closed_total").increment(1);
            reader.stop(u32::from(ErrorCode::LimitExceeded.code()));
            let _ = send.finish();
            return;
        }
    };
    let permits = first.permits;
    match Message::decode(first.raw) {
        Ok(Message::Subscribe(mut sub)) => {
            drop(permits);
            if !members.is_peer() {
                sub.group_position = None; // a coordinator's word only
            }
            if let Err(e) = state.auth.check_subscribe(&members, &sub) {
                let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
                let _ = send.finish();
                return;
            }
            let permission = crate::auth::Permission::watch(&state.auth, &members, &sub);
            let quota = state.auth.quota(&members, crate::auth::Direction::Consume);
            // A group's subscription is served by its coordinator (a client's is handed there
            // whole); one without a group keeps no ledger beyond itself.
            let store = match &sub.group {
                Some(_) if crate::coordinator::is_internal(&sub.topic) && !members.is_peer() => {
                    let text =
                        format!("'{}' is the broker's own topic: it has no consumer groups", sub.topic);
                    let _ = write_message(&mut send, &Message::error(ErrorCode::InvalidTopic, text)).await;
                    let _ = send.finish();
                    return;
                }
                Some(group) => {
                    let partition = Some((sub.topic.as_str(), sub.partition));
                    match Box::pin(crate::coordinator::resolve(&state, &members, group, partition)).await {
                        crate::coordinator::Resolved::Store(store) => store,
                        crate::coordinator::Resolved::Forward(target) => {
                            let Some(cluster) = &state.cluster else { return };
                            let client = crate::cluster::RelayedClient { permission, quota };
                            return Box::pin(crate::cluster::forward_subscription(
                                cluster, target, sub, send, reader, client,
                            ))
                            .await;
                        }
                        crate::coordinator::Resolved::Refused(e) => {
                            let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
                            let _ = send.finish();
                            return;
                        }
                    }
                }
                None => state.offsets.clone(),
            };
            // A partition held by other brokers only: one of them serves the subscription.
            if let Some(cluster) = &state.cluster {
                Box::pin(state.settle(&sub.topic)).await;
                // A coordinator hands the partition on also for a subscription a peer forwarded.
                let from_peer = members.is_peer() && !store.is_coordinated();
                match cluster.remote_reader(&sub.topic, sub.partition, from_peer) {
                    Some(Ok(target)) => {
                        // The replica serving it keeps the ledger in its own store, which may
                        // know nothing of the group (it never served it, or another replica
                        // did): it starts no lower than the group's replicated position.
                        if let Some(group) = sub.group.as_deref().filter(|_| store.is_coordinated()) {
                            let key = (Arc::from(group), Arc::from(sub.topic.as_str()), sub.partition);
                            sub.group_position = store.get(&key);
                        }
                        let client = crate::cluster::RelayedClient { permission, quota };
                        return Box::pin(crate::cluster::splice_subscription(
                            cluster,
                            &state.groups,
                            target,
                            sub,
                            send,
                            reader,
                            client,
                        ))
                        .await;
                    }
                    Some(Err(e)) => {
                        let _ = write_message(&mut send, &Message::error(e.code, e.message)).await;
                        let _ = send.finish();
                        return;
                    }
                    None => {}
                }
            }
            let limits = crate::subscription::Limits { permission, budget, quota };
            Box::pin(crate::subscription::run(state, sub, store, send, reader, limits)).await
        }
        // Boxed, as the subscription above: the task of a stream that is only waiting holds
        // no room for the states of the other kinds.
        first => {
            Box::pin(crate::requests::serve(state, (first, permits), send, reader, members, budget)).await
        }
    }
}
