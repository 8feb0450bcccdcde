//! A development CA shared by the brokers of one cluster (`--dev-ca DIR`).
//!
//! The first broker to start creates `DIR/ca.pem` and `DIR/ca.key`; every broker then issues
//! its own leaf certificate, signed by that CA, into its `<data_dir>/tls/` (`broker.pem`,
//! `broker.key`: names of their own, so a data directory that also ran as a single node keeps
//! that node's files apart). The leaf serves clients (ServerAuth) and authenticates the broker
//! to its peers (ClientAuth); a URI name `quiver://broker/<node id>` binds it to its node id.
//!
//! Brokers started at the same instant meet at `DIR/ca.lock`: an exclusive `flock`, waited
//! for at most [`CA_LOCK_WAIT`]. Whoever holds it creates the CA if it is missing; the others
//! then find it. The key is written first and the certificate last, each to a temporary name,
//! fsynced and renamed, so `ca.pem` present means the pair is complete.

use std::fs::{File, OpenOptions, TryLockError};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::{load_certs, sync_dir, write_atomic, write_private, TlsFiles};

/// The shared CA's certificate in the `--dev-ca` directory: what clients and peers trust.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The shared CA's private key (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// The lock file brokers take while they create or read the CA.
pub const CA_LOCK_FILE: &str = "ca.lock";
/// A broker's own certificate, in its `<data_dir>/tls/`.
pub const LEAF_CERT_FILE: &str = "broker.pem";
/// A broker's own private key, in its `<data_dir>/tls/`.
pub const LEAF_KEY_FILE: &str = "broker.key";
/// How long a broker waits for another to finish creating the CA (milliseconds of work) before
/// it gives up: a holder stuck this long is stuck for good (e.g. a hung network file system).
pub const CA_LOCK_WAIT: Duration = Duration::from_secs(30);
/// The URI name that carries a broker's node id in its certificate.
pub const NODE_URI_PREFIX: &str = "quiver://broker/";

const CA_COMMON_NAME: &str = "Quiver development cluster CA";

/// Creates the shared CA in `ca_dir` if needed and this broker's leaf in `tls_dir` if it is
/// missing, not signed by that CA, or names another node. Blocking (file locks, fsyncs).
pub fn ensure_cluster_certificates(
    ca_dir: &Path,
    tls_dir: &Path,
    node_id: u64,
    listen: SocketAddr,
) -> anyhow::Result<TlsFiles> {
    let ca = SharedCa::open_or_create(ca_dir)?;
    let ca_path = ca_dir.join(CA_CERT_FILE);
    let files = TlsFiles {
        cert: tls_dir.join(LEAF_CERT_FILE),
        key: tls_dir.join(LEAF_KEY_FILE),
        ca: Some(ca_path.clone()),
        peer_ca: Some(ca_path),
    };
    match current_leaf(&files, &ca.cert_der, node_id) {
        Ok(()) => return Ok(files),
        Err(why) if files.cert.exists() => {
            tracing::info!(cert = %files.cert.display(), "issuing a new broker certificate: {why:#}")
        }
        Err(_) => {}
    }
    std::fs::create_dir_all(tls_dir).with_context(|| format!("creating {}", tls_dir.display()))?;
    let key = KeyPair::generate()?;
    let leaf = leaf_params(node_id, listen)?.signed_by(&key, &ca.issuer, &ca.key)?;
    // Checked before it is written: a CA key that does not belong to `ca.pem` would otherwise
    // give every broker a certificate nobody accepts.
    verify_leaf(leaf.der(), &ca.cert_der, node_id)
        .with_context(|| format!("{} and {} do not belong together", CA_CERT_FILE, CA_KEY_FILE))?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    write_atomic(&files.cert, leaf.pem().as_bytes())?;
    sync_dir(tls_dir)?;
    tracing::info!(cert = %files.cert.display(), ca = %ca_dir.display(), node_id, "issued this broker's certificate");
    Ok(files)
}

/// Checks that `cert` (DER) chains to `ca` for both client and server use and carries
/// `node_id`'s URI name.
pub fn verify_leaf(cert: &CertificateDer<'_>, ca: &CertificateDer<'_>, node_id: u64) -> anyhow::Result<()> {
    let anchors = [webpki::anchor_from_trusted_cert(ca).map_err(|e| anyhow::anyhow!("CA certificate: {e}"))?];
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| anyhow::anyhow!("certificate: {e}"))?;
    let algs = quiver_transport::crypto_provider().signature_verification_algorithms.all;
    for usage in [webpki::KeyUsage::client_auth(), webpki::KeyUsage::server_auth()] {
        ee.verify_for_usage(algs, &anchors, &[], UnixTime::now(), usage, None, None)
            .map_err(|e| anyhow::anyhow!("not valid under the CA: {e}"))?;
    }
    match node_id_of(&ee) {
        Some(id) if id == node_id => Ok(()),
        Some(id) => bail!("names node {id}, this broker is node {node_id}"),
        None => bail!("carries no {NODE_URI_PREFIX}<id> name"),
    }
}

/// The node id in a certificate's `quiver://broker/<id>` URI name, if it has exactly one.
pub(crate) fn node_id_of(cert: &webpki::EndEntityCert<'_>) -> Option<u64> {
    let mut ids = cert.valid_uri_names().filter_map(|uri| uri.strip_prefix(NODE_URI_PREFIX));
    let id = ids.next()?.parse().ok()?;
    // Two claims are one too many: trust neither.
    ids.next().is_none().then_some(id)
}

/// The CA as loaded or created, held only while leaves are issued.
struct SharedCa {
    cert_der: CertificateDer<'static>,
    /// The CA's parameters self-signed again with its key: rcgen 0.13 signs with an issuer's
    /// name and key only, and the name is rebuilt identically, so leaves chain to `ca.pem`
    /// (checked for every leaf by `verify_leaf`).
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl SharedCa {
    fn open_or_create(dir: &Path) -> anyhow::Result<SharedCa> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the dev CA directory {}", dir.display()))?;
        let _lock = lock(&dir.join(CA_LOCK_FILE))?;
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if cert_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path).with_context(|| {
                format!("{} exists but its key {} cannot be read", cert_path.display(), key_path.display())
            })?;
            let key =
                KeyPair::from_pem(&key_pem).with_context(|| format!("parsing {}", key_path.display()))?;
            let cert_der = load_certs(&cert_path)?.swap_remove(0);
            let issuer = ca_params(&key)?.self_signed(&key)?;
            return Ok(SharedCa { cert_der, issuer, key });
        }
        // No certificate: nothing was completed before (a key alone is a leftover of a crash
        // between the two writes, and is replaced).
        let key = KeyPair::generate()?;
        let issuer = ca_params(&key)?.self_signed(&key)?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_atomic(&cert_path, issuer.pem().as_bytes())?;
        sync_dir(dir)?;
        tracing::info!(dir = %dir.display(), "created the shared development CA");
        Ok(SharedCa { cert_der: issuer.der().clone(), issuer, key })
    }
}

/// Takes an exclusive `flock` on `path`, waiting at most [`CA_LOCK_WAIT`]. Released when the
/// file is dropped, or by the kernel if the process dies.
fn lock(path: &Path) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + CA_LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(TryLockError::WouldBlock) => bail!(
                "{} is still locked after {}s: another process is stuck creating the dev CA",
                path.display(),
                CA_LOCK_WAIT.as_secs()
            ),
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }
}

/// The CA's parameters. Its name carries a digest of its public key: each `--dev-ca` directory's
/// CA has a name of its own (a certificate of another cluster's CA is then an unknown issuer,
/// not a bad signature under a namesake), and the name is rebuilt from the key alone.
fn ca_params(key: &KeyPair) -> anyhow::Result<CertificateParams> {
    let digest = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
    let tag: String = digest.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, format!("{CA_COMMON_NAME} {tag}"));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn leaf_params(node_id: u64, listen: SocketAddr) -> anyhow::Result<CertificateParams> {
    let mut names = super::local_names();
    let ip = listen.ip();
    if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
        names.push(ip.to_string());
    }
    let mut params = CertificateParams::new(names)?;
    let uri = format!("{NODE_URI_PREFIX}{node_id}");
    params.subject_alt_names.push(SanType::URI(uri.try_into()?));
    params.distinguished_name.push(DnType::CommonName, format!("quiver-broker-{node_id}"));
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// Ok when the leaf in `files` exists, chains to `ca`, names `node_id` and has its key (a crash
/// between writing a new key and its certificate leaves a key of another certificate).
fn current_leaf(files: &TlsFiles, ca: &CertificateDer<'_>, node_id: u64) -> anyhow::Result<()> {
    let certs = load_certs(&files.cert)?;
    verify_leaf(&certs[0], ca, node_id)?;
    let key_pem =
        std::fs::read_to_string(&files.key).with_context(|| format!("reading {}", files.key.display()))?;
    let key = KeyPair::from_pem(&key_pem).with_context(|| format!("parsing {}", files.key.display()))?;
    let ee = webpki::EndEntityCert::try_from(&certs[0]).map_err(|e| anyhow::anyhow!("certificate: {e}"))?;
    if ee.subject_public_key_info().as_ref() != key.public_key_der().as_slice() {
        bail!("{} is not the key of {}", files.key.display(), files.cert.display());
    }
    Ok(())
}
