//! `Client`: one QUIC connection to a broker, re-established on demand after it is lost.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quiver_protocol::limits::{ALPN, PROTOCOL_VERSION};
use quiver_protocol::message::Message;
use tokio::sync::Mutex;

use quiver_transport::{write_message, FrameReader};

use crate::error::ClientError;

/// Where to find the broker and how to trust it. Start from [`ClientConfig::new`] and adjust
/// with the `with_*` setters; more settings may come, so the struct cannot be built literally.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// `host:port` of the broker.
    pub broker: String,
    /// PEM file with the CA that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// TLS server name; defaults to the host part of `broker`.
    pub server_name: Option<String>,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// How long a request may wait for its response.
    pub request_timeout: Duration,
    /// A connection that hears nothing from the broker for this long is considered lost and
    /// replaced on the next request (keep-alives go out at a sixth of it). The effective
    /// timeout is the smaller of this and the broker's.
    pub idle_timeout: Duration,
    /// How this client introduces itself to the broker (its logs name it).
    pub client_id: String,
}

impl ClientConfig {
    /// The broker at `host:port`, trusted through the CA certificate in `ca_file`, with default
    /// timeouts (connect 5 s, request 30 s, idle 30 s).
    pub fn new(broker: impl Into<String>, ca_file: impl Into<PathBuf>) -> Self {
        ClientConfig {
            broker: broker.into(),
            ca_file: ca_file.into(),
            server_name: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            client_id: format!("quiver-client/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// The TLS server name to expect, when it is not the host part of the address.
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
    addr: SocketAddr,
    server_name: String,
    endpoint: quinn::Endpoint,
    conn: Mutex<Option<quinn::Connection>>,
    /// Set by `close`: no reconnecting afterwards.
    closed: std::sync::atomic::AtomicBool,
    /// Bumped each time a lost connection is replaced (the broker may have restarted).
    reconnects: tokio::sync::watch::Sender<u64>,
}

impl Client {
    /// Connects and exchanges `Hello`, so a bad address, certificate or broker shows up here.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let addr = resolve(&config.broker)?;
        let server_name = config.server_name.clone().unwrap_or_else(|| host_of(&config.broker));
        let endpoint = make_endpoint(&config, addr)?;
        let client = Client {
            inner: Arc::new(Inner {
                config,
                addr,
                server_name,
                endpoint,
                conn: Mutex::new(None),
                closed: Default::default(),
                reconnects: tokio::sync::watch::Sender::new(0),
            }),
        };
        client.live_connection().await?;
        Ok(client)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
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

    async fn live_connection(&self) -> Result<quinn::Connection, ClientError> {
        let mut guard = self.inner.conn.lock().await;
        if self.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        if let Some(c) = guard.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            tracing::debug!("connection to {} lost; reconnecting", self.inner.config.broker);
        }
        let conn = self.dial().await?;
        if guard.replace(conn.clone()).is_some() {
            self.inner.reconnects.send_modify(|n| *n += 1);
        }
        Ok(conn)
    }

    /// The current connection's path counters, or `None` while there is no live connection
    /// (this does not reconnect).
    pub async fn connection_stats(&self) -> Option<ConnectionStats> {
        let guard = self.inner.conn.lock().await;
        let conn = guard.as_ref().filter(|c| c.close_reason().is_none())?;
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

    async fn dial(&self) -> Result<quinn::Connection, ClientError> {
        let cfg = &self.inner.config;
        let connecting = self
            .inner
            .endpoint
            .connect(self.inner.addr, &self.inner.server_name)
            .map_err(|e| ClientError::Connect { addr: cfg.broker.clone(), reason: e.to_string() })?;
        let conn = match tokio::time::timeout(cfg.connect_timeout, connecting).await {
            Err(_) => {
                return Err(ClientError::Unreachable {
                    addr: cfg.broker.clone(),
                    timeout_ms: cfg.connect_timeout.as_millis() as u64,
                })
            }
            Ok(Err(e)) => return Err(connect_error(&cfg.broker, e)),
            Ok(Ok(c)) => c,
        };
        let hello =
            Message::Hello { protocol_version: PROTOCOL_VERSION as u16, client_id: cfg.client_id.clone() };
        match request_on(&conn, &hello, cfg.request_timeout).await? {
            Message::HelloOk { .. } => Ok(conn),
            other => Err(unexpected(other)),
        }
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

    async fn request_raw(&self, msg: &Message) -> Result<Message, ClientError> {
        let conn = self.live_connection().await?;
        request_on(&conn, msg, self.inner.config.request_timeout).await
    }

    /// Whether [`close`](Client::close) was called: every request fails with `Closed` from then.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        let mut guard = self.inner.conn.lock().await;
        self.inner.closed.store(true, std::sync::atomic::Ordering::Release);
        if let Some(c) = guard.take() {
            c.close(0u32.into(), b"bye");
        }
        drop(guard);
        self.inner.endpoint.wait_idle().await;
    }
}

async fn request_on(
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
            Some(Message::Error { code, message }) => Err(ClientError::Broker { code, message }),
            Some(m) => Ok(m),
            None => Err(ClientError::ConnectionLost("stream closed without a response".into())),
        }
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| ClientError::Timeout(timeout.as_millis() as u64))?
}

pub(crate) fn unexpected(m: Message) -> ClientError {
    ClientError::Protocol(format!("unexpected response kind {}", m.kind()))
}

fn connect_error(addr: &str, e: quinn::ConnectionError) -> ClientError {
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
        quinn::ConnectionError::ApplicationClosed(_)
        | quinn::ConnectionError::Reset
        | quinn::ConnectionError::TimedOut => {
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

fn resolve(broker: &str) -> Result<SocketAddr, ClientError> {
    let bad = |reason: String| ClientError::BadAddress { addr: broker.to_string(), reason };
    let mut addrs = broker.to_socket_addrs().map_err(|e| bad(format!("{e} (expected host:port)")))?;
    addrs.next().ok_or_else(|| bad("resolves to no address".into()))
}

fn host_of(broker: &str) -> String {
    let host = broker.rsplit_once(':').map(|(h, _)| h).unwrap_or(broker);
    host.trim_start_matches('[').trim_end_matches(']').to_string()
}

fn make_endpoint(config: &ClientConfig, addr: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
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
    let mut tls = rustls::ClientConfig::builder_with_provider(quiver_transport::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    client_config.transport_config(Arc::new(transport_config(config.idle_timeout)));
    let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().map_err(|_| {
        ClientError::BadAddress { addr: config.broker.clone(), reason: "cannot bind a local socket".into() }
    })?;
    let local = |e: std::io::Error| ClientError::Connect {
        addr: config.broker.clone(),
        reason: format!("local socket: {e}"),
    };
    let socket = quiver_transport::udp_socket(bind, false).map_err(local)?;
    let mut endpoint_config = quinn::EndpointConfig::default();
    quiver_transport::limit_datagrams(&mut endpoint_config);
    let mut endpoint =
        quinn::Endpoint::new(endpoint_config, None, socket, Arc::new(quinn::TokioRuntime)).map_err(local)?;
    endpoint.set_default_client_config(client_config);
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
    fn a_refused_handshake_is_worth_retrying_and_a_bad_certificate_is_not() {
        let refused = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
            frame_type: None,
            reason: bytes::Bytes::new(),
        });
        let e = connect_error("127.0.0.1:1", refused);
        assert!(matches!(e, ClientError::Refused { .. }), "{e:?}");
        assert!(e.is_retriable());

        let tls = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(42), // bad_certificate
            frame_type: None,
            reason: bytes::Bytes::from_static(b"invalid peer certificate: UnknownIssuer"),
        });
        assert!(!connect_error("127.0.0.1:1", tls).is_retriable());
    }
}
