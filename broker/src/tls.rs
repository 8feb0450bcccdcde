//! TLS for the QUIC endpoint: load configured certificates, or generate a development CA and a
//! server certificate (rcgen) into `<data_dir>/tls/` on first start and reuse them afterwards.
//! With a peer CA (`--dev-ca DIR`, whose CA brokers share, or `--tls-ca`), the endpoint also
//! serves broker-to-broker links (ALPN `quiver-peer/1`, mutual TLS): [`peer_identity`],
//! [`PeerTls`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use quinn::crypto::rustls::QuicServerConfig;
use quiver_protocol::limits::{ALPN, PEER_ALPN};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::BrokerConfig;

pub mod dev_ca;
mod peer;

pub use peer::{
    close_unauthenticated, is_peer_alpn, peer_client_config, peer_identity, PeerAuthError, PeerIdentity,
    PeerTls,
};

/// Paths of the certificate material in use.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This broker's certificate chain: its server certificate, and its client certificate
    /// toward peers.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set when a development CA was generated (or reused): the CA clients trust.
    pub ca: Option<PathBuf>,
    /// The CA that signs broker certificates (`--dev-ca`'s `ca.pem` or `--tls-ca`). When set,
    /// the endpoint offers `quiver-peer/1` and verifies client certificates against it.
    pub peer_ca: Option<PathBuf>,
}

/// Returns the certificate files, generating development ones if none are configured. A
/// `--dev-ca` broker's certificate names `config.broker_id` (see [`ensure_node_certificates`]).
pub fn ensure_certificates(config: &BrokerConfig) -> anyhow::Result<TlsFiles> {
    ensure_node_certificates(config, u64::from(config.broker_id))
}

/// As [`ensure_certificates`], with the node id a `--dev-ca` certificate names (its CN
/// `quiver-broker-<id>` and URI name `quiver://broker/<id>`). Blocking: file locks and fsyncs.
pub fn ensure_node_certificates(config: &BrokerConfig, node_id: u64) -> anyhow::Result<TlsFiles> {
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        return Ok(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: None,
            peer_ca: config.tls_ca.clone(),
        });
    }
    if let Some(ca_dir) = &config.dev_ca {
        return dev_ca::ensure_cluster_certificates(ca_dir, &config.tls_dir(), node_id, config.listen);
    }
    let dir = config.tls_dir();
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: Some(dir.join("ca.pem")),
        peer_ca: None,
    };
    if files.cert.exists() && files.key.exists() && dir.join("ca.pem").exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    generate_dev_certificates(&dir)?;
    tracing::info!(dir = %dir.display(), "generated a development CA and server certificate");
    Ok(files)
}

fn generate_dev_certificates(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "Quiver development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut params = CertificateParams::new(local_names())?;
    params.distinguished_name.push(DnType::CommonName, "quiverd");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;

    // Keys first, certificates last: the CA file's presence means the set is complete.
    write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    write_private(&dir.join("server.key"), key.serialize_pem().as_bytes())?;
    write_atomic(&dir.join("server.pem"), cert.pem().as_bytes())?;
    write_atomic(&dir.join("ca.pem"), ca_cert.pem().as_bytes())?;
    sync_dir(dir)
}

/// The names a generated certificate is valid for: localhost, both loopback addresses and the
/// host's name.
fn local_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() && !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
    }
    names
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The quinn server configuration: TLS 1.3 only, ALPN `quiver/1`, and transport limits for a
/// broker facing untrusted clients: bounded streams per connection and connections, finite
/// flow-control windows, and an idle timeout (design.md §2 and §8a).
///
/// With a peer CA (`files.peer_ca`) it also offers `quiver-peer/1` and asks every connection
/// for a certificate, verified against that CA when presented but optional at the TLS layer so
/// clients without one still connect: [`peer_identity`] tells a peer link from a client after
/// the handshake, and the accept loop closes a `quiver-peer/1` connection it refuses.
pub fn server_config(files: &TlsFiles, config: &BrokerConfig) -> anyhow::Result<quinn::ServerConfig> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let provider = quiver_transport::crypto_provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    // Client certificates are asked for when clients (`client_ca`) or peers (`peer_ca`)
    // authenticate with them, and verified against both CAs; optional at the TLS layer so
    // connections without one still complete (tokens, anonymous clients). Which CA a chain
    // must come from is checked after the handshake ([`CertChecks`]).
    let alpn = match &files.peer_ca {
        Some(_) => vec![ALPN.to_vec(), PEER_ALPN.to_vec()],
        None => vec![ALPN.to_vec()],
    };
    let cas: Vec<&PathBuf> = files.peer_ca.iter().chain(config.client_ca.iter()).collect();
    let builder = if cas.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for ca in &cas {
            roots.roots.extend(load_roots(ca)?.roots);
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .context("client certificate verifier")?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut tls = builder.with_single_cert(certs, key).context("server certificate and key do not match")?;
    tls.alpn_protocols = alpn;
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));

    let mut t = quiver_transport::transport_config();
    // Start low and let the connection raise it as the client opens streams (server.rs):
    // quinn keeps state for every stream a peer may open, so a high starting limit costs
    // every idle connection hundreds of kilobytes.
    t.max_concurrent_bidi_streams(config.initial_streams_per_connection().into());
    // Finite windows: quinn holds at most `receive_window` unread bytes per connection; what
    // the broker has read but not finished with is bounded by its buffer budgets.
    t.receive_window((32u32 * 1024 * 1024).into());
    t.max_idle_timeout(Some(Duration::from_millis(config.idle_timeout_ms).try_into()?));
    server.transport_config(Arc::new(t));
    server.max_incoming(config.max_connections.saturating_mul(2).max(16));
    Ok(server)
}

/// Which CA a client or peer certificate must chain to, when both a client CA and a peer CA
/// are configured (the handshake accepted a chain to either): a client's certificate signed
/// by the peer CA is not a principal, nor a client's a broker.
#[derive(Clone, Default)]
pub struct CertChecks {
    client: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    peer: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl std::fmt::Debug for CertChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertChecks")
            .field("client", &self.client.is_some())
            .field("peer", &self.peer.is_some())
            .finish()
    }
}

impl CertChecks {
    pub fn new(files: &TlsFiles, config: &BrokerConfig) -> anyhow::Result<CertChecks> {
        let verifier = |ca: &PathBuf| -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(load_roots(ca)?),
                quiver_transport::crypto_provider(),
            )
            .build()
            .with_context(|| format!("CA {}", ca.display()))?;
            Ok(v)
        };
        Ok(CertChecks {
            client: config.client_ca.as_ref().map(verifier).transpose()?,
            peer: match (&files.peer_ca, &config.client_ca) {
                (Some(peer), Some(_)) => Some(verifier(peer)?),
                _ => None,
            },
        })
    }

    /// Whether client certificates authenticate clients (a client CA is configured).
    pub fn client_certificates(&self) -> bool {
        self.client.is_some()
    }

    /// Checks a peer link's chain against the peer CA alone, when a client CA shares the
    /// handshake's roots.
    pub fn check_peer(&self, conn: &quinn::Connection) -> Result<(), String> {
        match &self.peer {
            None => Ok(()),
            Some(v) => verify_chain(v.as_ref(), conn),
        }
    }

    /// The principal of a client connection's certificate (its subject common name), checked
    /// against the client CA; `None` without a certificate or without a client CA.
    pub fn client_principal(&self, conn: &quinn::Connection) -> Result<Option<String>, String> {
        let Some(v) = &self.client else { return Ok(None) };
        let Some(chain) = presented_chain(conn) else { return Ok(None) };
        verify_chain(v.as_ref(), conn)?;
        crate::auth::certificate_principal(&chain[0]).map(Some)
    }
}

/// The certificate chain the other end presented, end entity first.
fn presented_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .filter(|c| !c.is_empty())
}

fn verify_chain(
    v: &dyn rustls::server::danger::ClientCertVerifier,
    conn: &quinn::Connection,
) -> Result<(), String> {
    let chain = presented_chain(conn).ok_or("no certificate presented")?;
    v.verify_client_cert(&chain[0], &chain[1..], rustls_pki_types::UnixTime::now())
        .map(drop)
        .map_err(|e| format!("certificate not issued by the expected CA: {e}"))
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading certificate {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

/// The certificates of a PEM file as the only roots of trust (a CA file).
fn load_roots(path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).with_context(|| format!("CA certificate in {}", path.display()))?;
    }
    Ok(roots)
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading key {}", path.display()))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .with_context(|| format!("parsing key {}", path.display()))?
        .with_context(|| format!("no private key in {}", path.display()))
}

/// The QUIC endpoint configuration with a stateless-reset key kept in `<data_dir>/tls/reset.key`.
///
/// Keeping the key across restarts lets a restarted broker answer packets of connections it
/// lost in a crash with a valid stateless reset, so clients notice at once and reconnect
/// instead of waiting out the idle timeout.
pub fn endpoint_config(config: &BrokerConfig) -> anyhow::Result<quinn::EndpointConfig> {
    use ring::rand::SecureRandom;
    let path = config.tls_dir().join("reset.key");
    let secret = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 64 => bytes,
        _ => {
            let mut bytes = vec![0u8; 64];
            ring::rand::SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| anyhow::anyhow!("no system randomness for the reset key"))?;
            std::fs::create_dir_all(config.tls_dir())?;
            write_private(&path, &bytes)?;
            sync_dir(&config.tls_dir())?;
            bytes
        }
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret[..32]);
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(key));
    quiver_transport::limit_datagrams(&mut endpoint);
    // Connection ids carry a keyed hash; the same key after a restart lets the endpoint
    // recognise its own old ids and answer them with a reset instead of dropping them.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&secret[32..40]);
    let cid_key = u64::from_le_bytes(cid_key);
    endpoint.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    Ok(endpoint)
}

/// Issues a client certificate for `principal` (its subject common name, which the broker takes
/// as the principal with `--client-ca`), signed by the CA in `ca_cert` and `ca_key` (PEM
/// files: a development CA's `ca.pem` and `ca.key`). Valid until `not_after` (year, month,
/// day) when given, else for as long as rcgen's default. Returns the certificate and its
/// private key, PEM.
pub fn issue_client_certificate(
    ca_cert: &Path,
    ca_key: &Path,
    principal: &str,
    not_after: Option<(i32, u8, u8)>,
) -> anyhow::Result<(String, String)> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    crate::auth::validate_principal(principal).map_err(|e| anyhow::anyhow!(e))?;
    let ca_der = load_certs(ca_cert)?.swap_remove(0);
    let key_pem = std::fs::read_to_string(ca_key).with_context(|| format!("reading {}", ca_key.display()))?;
    let key = KeyPair::from_pem(&key_pem).with_context(|| format!("parsing {}", ca_key.display()))?;
    // The CA's own name and settings, signed again with its key: rcgen signs with an issuer
    // certificate, and this one has the name the leaf must chain to.
    let issuer = CertificateParams::from_ca_cert_der(&ca_der)
        .with_context(|| format!("reading the CA certificate {}", ca_cert.display()))?
        .self_signed(&key)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, principal);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if let Some((y, m, d)) = not_after {
        params.not_before = rcgen::date_time_ymd(y.min(2000) - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(y, m, d);
    }
    let leaf_key = KeyPair::generate()?;
    let leaf = params.signed_by(&leaf_key, &issuer, &key)?;
    Ok((leaf.pem(), leaf_key.serialize_pem()))
}
