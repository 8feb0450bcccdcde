//! Broker-to-broker TLS: who is at the other end of a `quiver-peer/1` connection, and the client
//! configuration a broker dials its peers with (docs/replication.md, "Broker-to-broker TLS").
//!
//! Brokers share the clients' UDP port. A connection is a peer link when it negotiated
//! [`PEER_ALPN`]; the broker offers that protocol only when a peer CA is configured, and then
//! asks every connection for a certificate but lets one without a certificate through the
//! handshake (clients have none). So the TLS layer alone does not refuse a peer without a
//! certificate: the server calls [`peer_identity`] after the handshake and closes a connection
//! that asked for the peer protocol without one ([`close_unauthenticated`]). A certificate that
//! is presented is always verified by rustls against the peer CA; one from another CA fails
//! the handshake.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quiver_protocol::limits::PEER_ALPN;
use quiver_protocol::ErrorCode;
use rustls_pki_types::CertificateDer;

use super::{load_certs, load_key, load_roots, TlsFiles};

/// What a verified peer certificate says about the broker that presented it.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The node id of the certificate's `quiver://broker/<id>` URI name (certificates issued
    /// from a `--dev-ca` directory carry one). `None` when the certificate has none (or more
    /// than one): it is still a broker's, but bound to no node id.
    pub node_id: Option<u64>,
    /// The end-entity certificate (DER), as presented and verified.
    pub certificate: CertificateDer<'static>,
}

/// Why a connection is not an authenticated broker-to-broker link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthError {
    /// The connection negotiated another protocol (a client's `quiver/1`), or none.
    #[error("the connection did not negotiate quiver-peer/1")]
    NotPeerProtocol,
    /// The peer asked for `quiver-peer/1` but presented no certificate.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The presented certificate could not be read (rustls accepted it, so this is not expected).
    #[error("the peer's certificate cannot be parsed: {0}")]
    BadCertificate(String),
}

/// Whether the connection negotiated the broker-to-broker protocol, [`PEER_ALPN`].
pub fn is_peer_alpn(conn: &quinn::Connection) -> bool {
    negotiated_alpn(conn).as_deref() == Some(PEER_ALPN)
}

/// The identity of the broker at the other end: Ok only when the connection negotiated
/// [`PEER_ALPN`] and the peer presented a certificate chain. rustls verified that chain during
/// the handshake against the peer CA (the server's client verifier, or the dialer's roots from
/// [`peer_client_config`]), so any certificate seen here is one the peer CA signed. Works on
/// both ends of a link.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, PeerAuthError> {
    if !is_peer_alpn(conn) {
        return Err(PeerAuthError::NotPeerProtocol);
    }
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(PeerAuthError::NoCertificate)?;
    let certificate = chain.into_iter().next().ok_or(PeerAuthError::NoCertificate)?;
    // A broker's certificate serves clients too (serverAuth); a client certificate issued by
    // the same CA (`quiverd client-cert`, clientAuth only) is not a broker's.
    let (_, parsed) = x509_parser::parse_x509_certificate(&certificate)
        .map_err(|e| PeerAuthError::BadCertificate(e.to_string()))?;
    if let Ok(Some(eku)) = parsed.extended_key_usage() {
        if !eku.value.server_auth && !eku.value.any {
            return Err(PeerAuthError::BadCertificate(
                "a client certificate (no serverAuth usage) is not a broker's".into(),
            ));
        }
    }
    let node_id = {
        let ee = webpki::EndEntityCert::try_from(&certificate)
            .map_err(|e| PeerAuthError::BadCertificate(e.to_string()))?;
        super::dev_ca::node_id_of(&ee)
    };
    Ok(PeerIdentity { node_id, certificate })
}

/// Closes a connection that failed [`peer_identity`] with the application code
/// `Unauthenticated` (24) and the reason, so the other broker's log says why.
pub fn close_unauthenticated(conn: &quinn::Connection, err: &PeerAuthError) {
    let code = quinn::VarInt::from_u32(u32::from(ErrorCode::Unauthenticated.code()));
    let reason = format!("quiver-peer/1 refused: {err}");
    conn.close(code, reason.as_bytes());
}

/// What a broker needs to take part in a cluster's TLS: how to dial its peers, and the CA their
/// certificates are checked against. Incoming peer links arrive on the broker's own endpoint,
/// whose server configuration offers [`PEER_ALPN`] when this exists.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// Dial a peer with `endpoint.connect_with(client.clone(), addr, server_name)`, where
    /// `server_name` is a name in the peer's certificate: for `--dev-ca` certificates the host
    /// of its `--peers` entry when that is localhost, a loopback address, the peer's hostname
    /// or its (specified) listen IP.
    pub client: quinn::ClientConfig,
    /// The CA that signs broker certificates (`--dev-ca`'s `ca.pem`, or `--tls-ca`).
    pub ca: PathBuf,
}

impl PeerTls {
    /// Builds the dialing side from the broker's certificate files; `None` without a peer CA.
    pub fn from_files(files: &TlsFiles, idle_timeout: Duration) -> anyhow::Result<Option<PeerTls>> {
        let Some(ca) = &files.peer_ca else { return Ok(None) };
        Ok(Some(PeerTls { client: peer_client_config(files, idle_timeout)?, ca: ca.clone() }))
    }
}

/// The quinn client configuration for dialing peers: TLS 1.3 only, ALPN [`PEER_ALPN`], the peer
/// CA as the only root, and this broker's certificate and key as its client certificate. Keep-
/// alives at a sixth of `idle_timeout` keep a quiet link open.
pub fn peer_client_config(files: &TlsFiles, idle_timeout: Duration) -> anyhow::Result<quinn::ClientConfig> {
    let ca = files.peer_ca.as_ref().context("no peer CA configured (--dev-ca or --tls-ca)")?;
    let roots = load_roots(ca)?;
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let quic = quiver_transport::mutual_tls_client_config(roots, chain, key, PEER_ALPN)
        .with_context(|| format!("building the peer client configuration from {}", files.cert.display()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quiver_transport::transport_config();
    // As a client's: a link carries replication traffic, so the same generous window.
    t.receive_window((64u32 * 1024 * 1024).into());
    let idle = idle_timeout.max(Duration::from_millis(300));
    t.keep_alive_interval(Some(idle / 6));
    t.max_idle_timeout(Some(idle.try_into()?));
    client.transport_config(Arc::new(t));
    Ok(client)
}

fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}
