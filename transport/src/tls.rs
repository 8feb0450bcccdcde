//! TLS configurations that are not specific to the broker or the SDK: a client that presents a
//! certificate of its own (mutual TLS), as links between brokers do.

use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the settings, the roots, or the certificate and key (e.g. they do not
    /// match).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The provider offers no cipher suite QUIC can use for its initial packets.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// A QUIC client TLS configuration for mutual TLS: TLS 1.3 only with [`crate::crypto_provider`],
/// servers verified against `roots` (the server name is checked by rustls as for any client),
/// `chain` and `key` presented as this end's client certificate, and `alpn` as the only
/// protocol offered. No 0-RTT: a replayed first flight must not repeat a request.
pub fn mutual_tls_client_config(
    roots: rustls::RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<QuicClientConfig, TlsConfigError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(Arc::new(roots))
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = false;
    Ok(QuicClientConfig::try_from(tls)?)
}
