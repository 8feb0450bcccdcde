//! `Client`: one QUIC connection to a broker, re-established on demand after it is lost. Given
//! several brokers (a cluster), a connection goes to the first that answers, trying them in
//! turn, and a lost one is replaced through the same list, starting after the broker it was to.
//! Producers also use connections to the leaders of replicated partitions (`routing.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quiver_protocol::limits::{ALPN, PROTOCOL_VERSION};
use quiver_protocol::message::Message;
use quiver_protocol::ErrorCode;
use tokio::sync::Mutex;

use quiver_transport::{write_message, FrameReader};

use crate::error::ClientError;

/// Where to find the brokers and how to trust them. Start from [`ClientConfig::new`] and adjust
/// with the `with_*` setters; more settings may come, so the struct cannot be built literally.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// `host:port` of the broker, or of several brokers of a cluster separated by commas
    /// (`a:7420,b:7420,c:7420`), tried in that order ([`brokers`](ClientConfig::brokers)).
    pub broker: String,
    /// PEM file with the CA(s) that signed the brokers' certificates.
    pub ca_file: PathBuf,
    /// TLS server name for every broker; by default each address's own host part.
    pub server_name: Option<String>,
    /// How long one connection attempt to one broker may take (handshake and `Hello`). With
    /// several brokers, finding none answering takes up to this times their number.
    pub connect_timeout: Duration,
    /// How long a request may wait for its response.
    pub request_timeout: Duration,
    /// A connection that hears nothing from the broker for this long is considered lost and
    /// replaced on the next request (keep-alives go out at a sixth of it). The effective
    /// timeout is the smaller of this and the broker's; with several brokers, at most 1.5 s, so a
    /// killed broker is left for the next one within seconds.
    pub idle_timeout: Duration,
    /// How this client introduces itself to the broker (its logs name it).
    pub client_id: String,
    /// A token to authenticate with (presented in `Hello`), for brokers with a token file
    /// (docs/security.md).
    pub token: Option<String>,
    /// A client certificate chain and its private key (PEM files), presented at the TLS
    /// handshake, for brokers that authenticate clients by certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl ClientConfig {
    /// The broker at `host:port` (or several, comma-separated), trusted through the CA
    /// certificate in `ca_file`, with default timeouts (connect 5 s, request 30 s, idle 30 s).
    pub fn new(broker: impl Into<String>, ca_file: impl Into<PathBuf>) -> Self {
        ClientConfig {
            broker: broker.into(),
            ca_file: ca_file.into(),
            server_name: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            client_id: format!("quiver-client/{}", env!("CARGO_PKG_VERSION")),
            token: None,
            client_cert: None,
        }
    }

    /// See [`token`](ClientConfig::token).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// See [`client_cert`](ClientConfig::client_cert): `cert` a PEM certificate chain, `key` its
    /// PEM private key.
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Several brokers of a cluster (each `host:port`), tried in this order; replaces
    /// [`broker`](ClientConfig::broker).
    ///
    /// ```
    /// let config = quiver_client::ClientConfig::new("ignored:1", "ca.pem")
    ///     .with_brokers(vec!["10.0.0.1:7420".to_string(), "10.0.0.2:7420".to_string()]);
    /// assert_eq!(config.broker, "10.0.0.1:7420,10.0.0.2:7420");
    /// assert_eq!(config.brokers(), ["10.0.0.1:7420", "10.0.0.2:7420"]);
    /// ```
    pub fn with_brokers<S: Into<String>>(mut self, brokers: impl IntoIterator<Item = S>) -> Self {
        self.broker = brokers.into_iter().map(Into::into).collect::<Vec<_>>().join(",");
        self
    }

    /// The broker addresses in the order they are tried: `broker` split at commas, blanks
    /// trimmed and empty entries dropped. Not checked here; [`Client::connect`] does.
    pub fn brokers(&self) -> Vec<String> {
        split_brokers(&self.broker).map(str::to_string).collect()
    }

    /// The TLS server name to expect, when it is not the host part of each address.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// See [`connect_timeout`](ClientConfig::connect_timeout).
    pub fn with_connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// See [`request_timeout`](ClientConfig::request_timeout).
    pub fn with_request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// See [`idle_timeout`](ClientConfig::idle_timeout).
    pub fn with_idle_timeout(mut self, t: Duration) -> Self {
        self.idle_timeout = t;
        self
    }

    /// See [`client_id`](ClientConfig::client_id).
    pub fn with_client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }
}

/// Counters of a client's current QUIC path, for diagnostics (`quiver bench` prints them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// The packet size the path settled on (MTU discovery starts at 1,200 bytes).
    pub mtu: u16,
    /// Packets sent on the path.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// How often MTU discovery found the packet size too big for the path.
    pub black_holes_detected: u64,
}

/// A handle to a broker connection. Cheap to clone; all clones share the connection, which is
/// re-established on the next request after it was lost.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    /// The brokers, in the order given.
    brokers: Vec<BrokerAddr>,
    /// TLS and transport settings of the main connection.
    quic: quinn::ClientConfig,
    /// The same TLS for connections to partition leaders, with a shorter idle timeout.
    leader_quic: quinn::ClientConfig,
    /// Partition leaders and the connections to them.
    routing: crate::routing::Routing,
    /// One endpoint per address family, bound when a broker of that family is first dialled.
    endpoints: parking_lot::Mutex<Endpoints>,
    conn: Mutex<Slot>,
    /// Set by `close`: no reconnecting afterwards.
    closed: std::sync::atomic::AtomicBool,
    /// Bumped each time a lost connection is replaced (the broker may have restarted, or be
    /// another one).
    reconnects: tokio::sync::watch::Sender<u64>,
    /// Who the broker took this client for (its `HelloOk`), when authentication is on.
    principal: parking_lot::Mutex<Option<String>>,
}

/// The connection, and where the next pass through the broker list starts: after the broker
/// of the current connection (it is the one to avoid once that connection is lost).
#[derive(Debug, Default)]
struct Slot {
    conn: Option<quinn::Connection>,
    next: usize,
}

#[derive(Debug, Default)]
struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

/// How long a dial to one broker of a list may go unanswered before the next is dialled too.
const DIAL_STAGGER: Duration = Duration::from_millis(250);

/// One broker of the list, checked to be `host:port` once, at `connect`.
#[derive(Debug, Clone)]
struct BrokerAddr {
    /// As given (`host:port`); resolved at each attempt, so a broker's new address is found.
    text: String,
    server_name: String,
}

impl Client {
    /// Connects to the first broker that answers and exchanges `Hello`, so a bad address,
    /// certificate or broker shows up here. With several brokers, each is tried in turn (with
    /// [`connect_timeout`](ClientConfig::connect_timeout) each); the error names every one
    /// that failed.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let brokers = parse_brokers(&config.broker, config.server_name.as_deref())?;
        // With several brokers to move to, a silent one is left as soon as a leader connection
        // would be (a killed broker sends nothing; only the idle timeout notices).
        let main_idle = match brokers.len() {
            1 => config.idle_timeout,
            _ => config.idle_timeout.min(crate::routing::LEADER_IDLE_TIMEOUT),
        };
        let quic = quic_config(&config, main_idle)?;
        let leader_quic = quic_config(&config, config.idle_timeout.min(crate::routing::LEADER_IDLE_TIMEOUT))?;
        let client = Client {
            inner: Arc::new(Inner {
                config,
                brokers,
                quic,
                leader_quic,
                routing: Default::default(),
                endpoints: Default::default(),
                conn: Mutex::new(Slot::default()),
                closed: Default::default(),
                reconnects: tokio::sync::watch::Sender::new(0),
                principal: Default::default(),
            }),
        };
        client.live_connection().await?;
        Ok(client)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The principal the broker authenticated this client as (docs/security.md); `None` when
    /// the broker has authentication off.
    pub fn principal(&self) -> Option<String> {
        self.inner.principal.lock().clone()
    }

    pub(crate) fn routing(&self) -> &crate::routing::Routing {
        &self.inner.routing
    }

    /// The live connection, reconnecting if the last one was lost. Raw protocol access is
    /// for this crate (and, with the `unstable-raw` feature, Quiver's own tests).
    #[cfg(not(feature = "unstable-raw"))]
    pub(crate) async fn connection(&self) -> Result<quinn::Connection, ClientError> {
        self.live_connection().await
    }

    /// The live connection, reconnecting if the last one was lost. Not a stable API.
    #[cfg(feature = "unstable-raw")]
    #[doc(hidden)]
    pub async fn connection(&self) -> Result<quinn::Connection, ClientError> {
        self.live_connection().await
    }

    pub(crate) async fn live_connection(&self) -> Result<quinn::Connection, ClientError> {
        let mut slot = self.inner.conn.lock().await;
        if self.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        if let Some(c) = slot.conn.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            tracing::debug!("connection to {} lost; reconnecting", c.remote_address());
        }
        let (conn, index) = self.dial_any(slot.next).await?;
        slot.next = (index + 1) % self.inner.brokers.len();
        if slot.conn.replace(conn.clone()).is_some() {
            self.inner.reconnects.send_modify(|n| *n += 1);
        }
        Ok(conn)
    }

    /// One pass through the brokers from `start`: the first connection made, with its index,
    /// or every attempt's error. The next broker is dialled as soon as one fails, or when the
    /// ones dialling have not answered within `DIAL_STAGGER` (a dead broker answers nothing
    /// until the connect timeout): the first to answer wins, the others are dropped.
    async fn dial_any(&self, start: usize) -> Result<(quinn::Connection, usize), ClientError> {
        use futures::stream::{FuturesUnordered, StreamExt};
        let n = self.inner.brokers.len();
        let mut failed = Vec::new();
        let dial = |i: usize| {
            let index = (start + i) % n;
            let broker = &self.inner.brokers[index];
            async move { (index, self.dial(broker, self.inner.config.connect_timeout, &self.inner.quic).await) }
        };
        let mut dialling = FuturesUnordered::new();
        dialling.push(dial(0));
        let mut launched = 1;
        loop {
            let stagger = tokio::time::sleep(DIAL_STAGGER);
            tokio::select! {
                Some((index, result)) = dialling.next() => match result {
                    Ok(conn) => {
                        if !failed.is_empty() {
                            tracing::info!(broker = %self.inner.brokers[index].text, "connected after {} other broker(s) failed", failed.len());
                        }
                        return Ok((conn, index));
                    }
                    Err(e) => {
                        tracing::debug!(broker = %self.inner.brokers[index].text, "connecting failed: {e}");
                        failed.push(e);
                        if launched < n {
                            dialling.push(dial(launched));
                            launched += 1;
                        }
                    }
                },
                _ = stagger, if launched < n => {
                    dialling.push(dial(launched));
                    launched += 1;
                }
                else => break,
            }
        }
        match failed.len() {
            1 => Err(failed.remove(0)),
            _ => Err(ClientError::AllBrokersFailed { attempts: failed }),
        }
    }

    /// The current connection's path counters, or `None` while there is no live connection
    /// (this does not reconnect).
    pub async fn connection_stats(&self) -> Option<ConnectionStats> {
        let slot = self.inner.conn.lock().await;
        let conn = slot.conn.as_ref().filter(|c| c.close_reason().is_none())?;
        let path = conn.stats().path;
        Some(ConnectionStats {
            mtu: path.current_mtu,
            sent_packets: path.sent_packets,
            lost_packets: path.lost_packets,
            black_holes_detected: path.black_holes_detected,
        })
    }

    /// Changes each time a lost connection is re-established: state the broker keeps per
    /// client (a group membership) may be gone, if the broker restarted.
    pub fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.reconnects.subscribe()
    }

    /// The main connection if it is live, without reconnecting.
    pub(crate) async fn current_connection(&self) -> Option<quinn::Connection> {
        let slot = self.inner.conn.lock().await;
        slot.conn.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }

    /// A connection to the partition leader at `addr` (`host:port`, as the cluster's brokers
    /// name themselves), with the same TLS as the main connection, its TLS server name the
    /// host part (or the configured one, as for the broker list), and a connect timeout of at
    /// most [`LEADER_CONNECT_TIMEOUT`](crate::routing::LEADER_CONNECT_TIMEOUT).
    pub(crate) async fn dial_leader(&self, addr: &str) -> Result<quinn::Connection, ClientError> {
        let broker = parse_brokers(addr, self.inner.config.server_name.as_deref())?
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::BadAddress { addr: addr.into(), reason: "no address".into() })?;
        let timeout = self.inner.config.connect_timeout.min(crate::routing::LEADER_CONNECT_TIMEOUT);
        self.dial(&broker, timeout, &self.inner.leader_quic).await
    }

    async fn dial(
        &self,
        broker: &BrokerAddr,
        timeout: Duration,
        quic: &quinn::ClientConfig,
    ) -> Result<quinn::Connection, ClientError> {
        let cfg = &self.inner.config;
        let attempt = async {
            let addr = resolve(&broker.text).await?;
            let endpoint = self.endpoint_for(&broker.text, addr)?;
            let idle = match self.inner.brokers.len() {
                1 => cfg.idle_timeout,
                _ => cfg.idle_timeout.min(crate::routing::LEADER_IDLE_TIMEOUT),
            };
            let hello = Message::Hello {
                protocol_version: PROTOCOL_VERSION as u16,
                client_id: cfg.client_id.clone(),
                token: cfg.token.clone(),
            };
            let mut backoff = crate::retry::MIN_BACKOFF;
            loop {
                let connecting = endpoint
                    .connect_with(quic.clone(), addr, &broker.server_name)
                    .map_err(|e| ClientError::Connect { addr: broker.text.clone(), reason: e.to_string() })?;
                let conn = match connecting.await {
                    Ok(conn) => conn,
                    Err(e) => match connect_error(&broker.text, e, idle.as_millis() as u64) {
                        // Turned away (a broker about to exit, or at its connection limit):
                        // like one draining below.
                        refused @ ClientError::Refused { .. } => {
                            tracing::debug!(broker = %broker.text, "{refused}; dialling again in {backoff:?}");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(crate::retry::MAX_BACKOFF);
                            continue;
                        }
                        other => return Err(other),
                    },
                };
                let answer = request_on(&conn, &hello, timeout).await;
                // The server checks a client certificate after the client's side of the
                // handshake is done: a refusal arrives as the connection closing.
                if answer.is_err() {
                    if let Some(closed @ quinn::ConnectionError::ConnectionClosed(_)) = conn.close_reason() {
                        let refused = matches!(&closed, quinn::ConnectionError::ConnectionClosed(c) if tls_alert(c.error_code).is_some());
                        if refused {
                            return Err(connect_error(&broker.text, closed, idle.as_millis() as u64));
                        }
                    }
                }
                // A broker draining for a restart completes handshakes and closes them: dial it
                // again until it is back (or the dial times out, as for a broker not there).
                if shutting_down(&conn, &answer) {
                    tracing::debug!(broker = %broker.text, "the broker is shutting down; dialling again in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(crate::retry::MAX_BACKOFF);
                    continue;
                }
                return match answer? {
                    Message::HelloOk { principal, .. } => {
                        if let Some(p) = principal {
                            *self.inner.principal.lock() = Some(p);
                        }
                        Ok(conn)
                    }
                    other => Err(unexpected(other)),
                };
            }
        };
        tokio::time::timeout(timeout, attempt).await.unwrap_or_else(|_| {
            Err(ClientError::Unreachable {
                addr: broker.text.clone(),
                timeout_ms: timeout.as_millis() as u64,
            })
        })
    }

    /// The endpoint for `addr`'s address family, bound on first use.
    fn endpoint_for(&self, broker: &str, addr: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
        let mut endpoints = self.inner.endpoints.lock();
        let slot = if addr.is_ipv6() { &mut endpoints.v6 } else { &mut endpoints.v4 };
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let endpoint = make_endpoint(self.inner.quic.clone(), broker, addr)?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Gives up the connection `conn` (its broker said it is going away): the next request
    /// connects anew, to the next broker in the list first.
    pub(crate) fn abandon(&self, conn: &quinn::Connection) {
        conn.close(0u32.into(), b"moving to another broker");
    }

    /// One request on a fresh stream, one response.
    #[cfg(not(feature = "unstable-raw"))]
    pub(crate) async fn request(&self, msg: &Message) -> Result<Message, ClientError> {
        self.request_raw(msg).await
    }

    /// One request on a fresh stream, one response. Not a stable API.
    #[cfg(feature = "unstable-raw")]
    #[doc(hidden)]
    pub async fn request(&self, msg: &Message) -> Result<Message, ClientError> {
        self.request_raw(msg).await
    }

    /// A broker that is stopping (a restart) answers `ShuttingDown` without carrying the
    /// request out: it goes again, on a new connection, until the request timeout (the broker,
    /// or another in the list, is soon back). Dial failures after such an answer count as the
    /// restart, not as the end. (A connection lost with the request in flight is not retried
    /// here: the broker may have acted on it.)
    async fn request_raw(&self, msg: &Message) -> Result<Message, ClientError> {
        let timeout = self.inner.config.request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = crate::retry::MIN_BACKOFF;
        let mut restarting = false;
        loop {
            let result = match self.live_connection().await {
                Ok(conn) => {
                    let result = request_on(&conn, msg, timeout).await;
                    restarting |=
                        matches!(result, Err(ClientError::Broker { code: ErrorCode::ShuttingDown, .. }));
                    result
                }
                Err(e) => Err(e),
            };
            match result {
                Err(e)
                    if restarting && e.is_retriable() && tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::debug!("the broker is restarting ({e}); trying again in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(crate::retry::MAX_BACKOFF);
                }
                result => return result,
            }
        }
    }

    /// Whether [`close`](Client::close) was called: every request fails with `Closed` from then.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Closes the connection politely, and those to partition leaders.
    pub async fn close(&self) {
        let mut slot = self.inner.conn.lock().await;
        self.inner.closed.store(true, std::sync::atomic::Ordering::Release);
        if let Some(c) = slot.conn.take() {
            c.close(0u32.into(), b"bye");
        }
        drop(slot);
        for c in self.inner.routing.take_connections().await {
            c.close(0u32.into(), b"bye");
        }
        let endpoints: Vec<quinn::Endpoint> = {
            let e = self.inner.endpoints.lock();
            e.v4.iter().chain(e.v6.iter()).cloned().collect()
        };
        // Long enough for the closes above to go out (their draining period is a few round
        // trips); not for a dial to a dead broker that a faster one overtook, which would drain
        // for three initial PTOs (about 3 s) and hold up every short-lived client such as the
        // CLI given a dead first broker.
        for e in endpoints {
            let _ = tokio::time::timeout(CLOSE_DRAIN, e.wait_idle()).await;
        }
    }
}

/// How long [`Client::close`] waits for its connections to finish closing.
const CLOSE_DRAIN: Duration = Duration::from_millis(100);

pub(crate) async fn request_on(
    conn: &quinn::Connection,
    msg: &Message,
    timeout: Duration,
) -> Result<Message, ClientError> {
    let fut = async {
        let (mut send, recv) = conn.open_bi().await?;
        write_message(&mut send, msg).await?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv);
        match reader.next().await? {
            Some(Message::Error { code, message, .. }) => Err(ClientError::Broker { code, message }),
            Some(m) => Ok(m),
            None => Err(ClientError::ConnectionLost("stream closed without a response".into())),
        }
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| ClientError::Timeout(timeout.as_millis() as u64))?
}

/// Whether `result` on `conn` says the broker is shutting down: its answer, or its close.
fn shutting_down(conn: &quinn::Connection, result: &Result<Message, ClientError>) -> bool {
    let code = u64::from(ErrorCode::ShuttingDown.code());
    match result {
        Err(ClientError::Broker { code: ErrorCode::ShuttingDown, .. }) => true,
        Err(ClientError::ConnectionLost(_)) => matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code.into_inner() == code
        ),
        _ => false,
    }
}

pub(crate) fn unexpected(m: Message) -> ClientError {
    ClientError::Protocol(format!("unexpected response kind {}", m.kind()))
}

fn connect_error(addr: &str, e: quinn::ConnectionError, idle_ms: u64) -> ClientError {
    let addr = addr.to_string();
    let reason = match &e {
        // A broker that is shutting down (a restart) or at its connection limit turns
        // handshakes away: worth retrying, as when it does not answer at all.
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            let reason = "it is shutting down or at its connection limit".into();
            return ClientError::Refused { addr, reason };
        }
        // The handshake heard nothing within the idle timeout: nobody answers there (worth
        // retrying later, like a connect timeout).
        quinn::ConnectionError::TimedOut => return ClientError::Unreachable { addr, timeout_ms: idle_ms },
        // The broker refused this client's certificate (docs/security.md).
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(u32::from(ErrorCode::Unauthenticated.code())) =>
        {
            let message = String::from_utf8_lossy(&c.reason).into_owned();
            return ClientError::Broker { code: ErrorCode::Unauthenticated, message };
        }
        quinn::ConnectionError::ConnectionClosed(c) if tls_alert(c.error_code).is_some() => {
            let alert = tls_alert(c.error_code).unwrap_or_default();
            let why = match alert {
                42 => "the broker refused this client's certificate (bad certificate)",
                43 => "the broker refused this client's certificate (unsupported certificate)",
                44 => "the broker refused this client's certificate (revoked)",
                45 => "the broker refused this client's certificate: it has expired (or is not yet valid)",
                48 => "the broker does not know the CA of this client's certificate (unknown CA)",
                51 => "the broker refused this client's certificate: its signature does not check out (signed by another CA of the same name?)",
                116 => "the broker requires a client certificate (--cert/--key)",
                _ => "the TLS handshake failed",
            };
            let detail = String::from_utf8_lossy(&c.reason);
            match detail.is_empty() {
                true => format!("{why} (TLS alert {alert})"),
                false => format!("{why} (TLS alert {alert}: {detail})"),
            }
        }
        quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::Reset => {
            return ClientError::ConnectionLost(crate::error::describe_lost(&e));
        }
        quinn::ConnectionError::TransportError(t) if t.to_string().contains("certificate") => {
            format!("TLS: {t} (check --ca / QUIVER_CA points at the broker's ca.pem)")
        }
        quinn::ConnectionError::ConnectionClosed(c)
            if c.reason.as_ref() == b"peer doesn't support any known protocol" =>
        {
            "the peer does not speak quiver/1".into()
        }
        _ => e.to_string(),
    };
    ClientError::Connect { addr, reason }
}

/// The TLS alert a QUIC CRYPTO_ERROR carries (codes 0x100 to 0x1ff).
fn tls_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8)
}

/// The entries of a comma-separated broker list.
fn split_brokers(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|b| !b.is_empty())
}

/// The broker list as `host:port` entries, each with its TLS server name.
fn parse_brokers(list: &str, server_name: Option<&str>) -> Result<Vec<BrokerAddr>, ClientError> {
    let brokers = split_brokers(list)
        .map(|b| {
            let bad = |reason: &str| ClientError::BadAddress { addr: b.to_string(), reason: reason.into() };
            let (host, port) = b.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?;
            port.parse::<u16>().map_err(|_| bad("expected host:port with a port number"))?;
            if host.trim_start_matches('[').trim_end_matches(']').is_empty() {
                return Err(bad("expected host:port, with a host"));
            }
            let server_name = server_name.map_or_else(|| host_of(b), str::to_string);
            Ok(BrokerAddr { text: b.to_string(), server_name })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if brokers.is_empty() {
        return Err(ClientError::BadAddress {
            addr: list.to_string(),
            reason: "no broker address (expected host:port, or several separated by commas)".into(),
        });
    }
    Ok(brokers)
}

/// The first address `broker` resolves to (asked anew at each attempt; without blocking the
/// runtime on DNS).
async fn resolve(broker: &str) -> Result<SocketAddr, ClientError> {
    let bad = |reason: String| ClientError::BadAddress { addr: broker.to_string(), reason };
    let mut addrs =
        tokio::net::lookup_host(broker).await.map_err(|e| bad(format!("{e} (expected host:port)")))?;
    addrs.next().ok_or_else(|| bad("resolves to no address".into()))
}

fn host_of(broker: &str) -> String {
    let host = broker.rsplit_once(':').map(|(h, _)| h).unwrap_or(broker);
    host.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// TLS 1.3 trusting the CA file's certificates, with the client's transport limits and `idle`
/// timeout.
fn quic_config(config: &ClientConfig, idle: Duration) -> Result<quinn::ClientConfig, ClientError> {
    let bad_ca = |reason: String| ClientError::BadCa { path: config.ca_file.display().to_string(), reason };
    let pem = std::fs::read(&config.ca_file).map_err(|e| bad_ca(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| bad_ca(e.to_string()))?;
        roots.add(cert).map_err(|e| bad_ca(e.to_string()))?;
        n += 1;
    }
    if n == 0 {
        return Err(bad_ca("no PEM certificate in the file".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(quiver_transport::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match &config.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let (chain, key) = load_client_cert(cert, key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| ClientError::BadClientCert {
                path: cert.display().to_string(),
                reason: match e {
                    rustls::Error::InconsistentKeys(_) => {
                        format!(
                            "the key {} does not belong to this certificate",
                            key_path(&config.client_cert)
                        )
                    }
                    other => other.to_string(),
                },
            })?
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    client_config.transport_config(Arc::new(transport_config(idle)));
    Ok(client_config)
}

fn key_path(pair: &Option<(PathBuf, PathBuf)>) -> String {
    pair.as_ref().map(|(_, k)| k.display().to_string()).unwrap_or_default()
}

/// A client certificate chain and key from PEM files.
fn load_client_cert(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<
    (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>),
    ClientError,
> {
    let bad = |path: &std::path::Path, reason: String| ClientError::BadClientCert {
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read(cert).map_err(|e| bad(cert, e.to_string()))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no PEM certificate in the file".into()));
    }
    let pem = std::fs::read(key).map_err(|e| bad(key, e.to_string()))?;
    let key_der = rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| bad(key, e.to_string()))?
        .ok_or_else(|| bad(key, "no PEM private key in the file".into()))?;
    Ok((chain, key_der))
}

fn make_endpoint(
    quic: quinn::ClientConfig,
    broker: &str,
    addr: SocketAddr,
) -> Result<quinn::Endpoint, ClientError> {
    let bind = if addr.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let local = |e: std::io::Error| ClientError::Connect {
        addr: broker.to_string(),
        reason: format!("local socket: {e}"),
    };
    let socket = quiver_transport::udp_socket(bind, false).map_err(local)?;
    let mut endpoint_config = quinn::EndpointConfig::default();
    quiver_transport::limit_datagrams(&mut endpoint_config);
    let mut endpoint =
        quinn::Endpoint::new(endpoint_config, None, socket, Arc::new(quinn::TokioRuntime)).map_err(local)?;
    endpoint.set_default_client_config(quic);
    Ok(endpoint)
}

/// Client-side transport limits: the shared settings, a generous connection window for
/// throughput, and keep-alives so an idle consumer's connection stays open.
fn transport_config(idle: Duration) -> quinn::TransportConfig {
    let mut t = quiver_transport::transport_config();
    t.receive_window((64u32 * 1024 * 1024).into());
    let idle = idle.max(Duration::from_millis(300));
    t.keep_alive_interval(Some(idle / 6));
    if let Ok(idle) = idle.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_list_is_split_at_commas_and_each_entry_has_its_own_server_name() {
        let b = parse_brokers(" a.example:7420, 10.0.0.2:7421,,[::1]:7422 ", None).expect("valid");
        let got: Vec<(&str, &str)> = b.iter().map(|b| (b.text.as_str(), b.server_name.as_str())).collect();
        assert_eq!(
            got,
            [("a.example:7420", "a.example"), ("10.0.0.2:7421", "10.0.0.2"), ("[::1]:7422", "::1")]
        );
        let named = parse_brokers("10.0.0.1:1,10.0.0.2:2", Some("quiver.internal")).expect("valid");
        assert!(named.iter().all(|b| b.server_name == "quiver.internal"));
        let config = ClientConfig::new("x:1, y:2", "ca.pem");
        assert_eq!(config.brokers(), ["x:1", "y:2"]);
    }

    #[test]
    fn a_bad_entry_is_named_and_an_empty_list_refused() {
        for (list, bad) in [("a:1,b", "b"), ("a:1,b:port", "b:port"), (":7420", ":7420")] {
            match parse_brokers(list, None) {
                Err(ClientError::BadAddress { addr, .. }) => assert_eq!(addr, bad, "{list}"),
                other => panic!("{list}: {other:?}"),
            }
        }
        assert!(matches!(parse_brokers(" , ", None), Err(ClientError::BadAddress { .. })));
    }

    #[test]
    fn a_refused_handshake_is_worth_retrying_and_a_bad_certificate_is_not() {
        let refused = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
            frame_type: None,
            reason: bytes::Bytes::new(),
        });
        let e = connect_error("127.0.0.1:1", refused, 1000);
        assert!(matches!(e, ClientError::Refused { .. }), "{e:?}");
        assert!(e.is_retriable());

        let tls = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(42), // bad_certificate
            frame_type: None,
            reason: bytes::Bytes::from_static(b"invalid peer certificate: UnknownIssuer"),
        });
        assert!(!connect_error("127.0.0.1:1", tls, 1000).is_retriable());
    }
}
