//! Broker-to-broker TLS (docs/replication.md, "Broker-to-broker TLS"): a development CA shared
//! through `--dev-ca`, each broker's own certificate, the `quiver-peer/1` protocol with mutual
//! TLS next to the clients' `quiver/1` on the same port. Real QUIC on loopback, real files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use futures::StreamExt;
use quiver_broker::tls::{self, dev_ca, PeerAuthError, TlsFiles};
use quiver_broker::BrokerConfig;
use quiver_client::{Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition};
use quiver_protocol::limits::{ALPN, PEER_ALPN};
use quiver_protocol::ErrorCode;
use quiver_tests::{bounded, client_of, embedded, init_tracing, LOOPBACK_ANY_PORT};
use rustls::pki_types::{CertificateDer, UnixTime};

const IDLE: Duration = Duration::from_secs(10);

/// A broker's config with its data in `data` and the shared dev CA in `ca_dir`.
fn node_config(data: &Path, ca_dir: &Path) -> BrokerConfig {
    let mut config = BrokerConfig::new(data).listen(LOOPBACK_ANY_PORT);
    config.dev_ca = Some(ca_dir.to_path_buf());
    config
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)?;
    Ok(rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>()?)
}

/// Verifies `leaf` as a client certificate under `ca` with rustls's own verifier (what the
/// server does in the handshake), independently of the broker's checks.
fn verifies_under(leaf: &CertificateDer<'static>, ca: &Path) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        quiver_transport::crypto_provider(),
    )
    .build()?;
    verifier.verify_client_cert(leaf, &[], UnixTime::now())?;
    Ok(())
}

/// A bare QUIC server on loopback with the broker's TLS configuration for `files`.
fn server(files: &TlsFiles) -> anyhow::Result<quinn::Endpoint> {
    let config = tls::server_config(files, &BrokerConfig::new("/nonexistent"))?;
    Ok(quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?)
}

fn client_endpoint() -> anyhow::Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::client("127.0.0.1:0".parse()?)?)
}

/// A client configuration without a certificate of its own, trusting `ca`, offering `alpn`.
fn anonymous_client(ca: &Path, alpn: &[u8]) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(quiver_transport::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?)))
}

/// Connects `client` to `server` with `config`: both ends of the connection, or the errors.
async fn connect(
    server: &quinn::Endpoint,
    client: &quinn::Endpoint,
    config: quinn::ClientConfig,
) -> anyhow::Result<(
    Result<quinn::Connection, quinn::ConnectionError>,
    Result<quinn::Connection, quinn::ConnectionError>,
)> {
    let connecting = client.connect_with(config, server.local_addr()?, "localhost")?;
    let accept = async {
        let incoming = server.accept().await.ok_or_else(|| anyhow::anyhow!("server endpoint closed"))?;
        anyhow::Ok(incoming.await)
    };
    let (server_side, client_side) = tokio::join!(accept, connecting);
    Ok((server_side?, client_side))
}

#[test]
fn concurrent_brokers_share_one_dev_ca_and_get_their_own_certificates() -> anyhow::Result<()> {
    // Several rounds: a missing lock shows up as two CAs in some of them.
    for round in 0..5 {
        let root = tempfile::tempdir()?;
        let ca_dir = root.path().join("dev-ca");
        let barrier = Arc::new(Barrier::new(3));
        let threads: Vec<_> = (1..=3u64)
            .map(|id| {
                let config = node_config(&root.path().join(format!("node-{id}")), &ca_dir);
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    tls::ensure_node_certificates(&config, id)
                })
            })
            .collect();
        let mut leaves = Vec::new();
        for (i, t) in threads.into_iter().enumerate() {
            let files = t.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
            assert_eq!(files.ca.as_deref(), Some(ca_dir.join("ca.pem").as_path()));
            assert_eq!(files.peer_ca, files.ca);
            let leaf = read_certs(&files.cert)?.swap_remove(0);
            // Against the CA on disk now, i.e. the one CA every broker must have used.
            verifies_under(&leaf, &ca_dir.join("ca.pem"))
                .map_err(|e| anyhow::anyhow!("round {round}, node {}: {e}", i + 1))?;
            dev_ca::verify_leaf(&leaf, &read_certs(&ca_dir.join("ca.pem"))?[0], i as u64 + 1)?;
            leaves.push(leaf);
        }
        assert_eq!(read_certs(&ca_dir.join("ca.pem"))?.len(), 1);
        assert!(leaves[0] != leaves[1] && leaves[1] != leaves[2] && leaves[0] != leaves[2]);
        let mut names: Vec<_> = std::fs::read_dir(&ca_dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        assert_eq!(names, ["ca.key", "ca.lock", "ca.pem"], "no temporary files left behind");
    }
    Ok(())
}

#[tokio::test]
async fn a_broker_certificate_authenticates_a_peer_link_both_ways() -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let root = tempfile::tempdir()?;
        let ca_dir = root.path().join("dev-ca");
        let one = tls::ensure_node_certificates(&node_config(&root.path().join("n1"), &ca_dir), 1)?;
        let two = tls::ensure_node_certificates(&node_config(&root.path().join("n2"), &ca_dir), 2)?;
        // The operator's way: the same files given as --tls-cert/--tls-key/--tls-ca.
        let mut operator = BrokerConfig::new(root.path().join("n3"));
        operator.tls_cert = Some(one.cert.clone());
        operator.tls_key = Some(one.key.clone());
        operator.tls_ca = Some(ca_dir.join("ca.pem"));
        operator.validate()?;
        let operator_files = tls::ensure_certificates(&operator)?;
        assert!(operator_files.ca.is_none());

        for files in [&one, &operator_files] {
            let server = server(files)?;
            let client = client_endpoint()?;
            let (server_conn, client_conn) =
                connect(&server, &client, tls::peer_client_config(&two, IDLE)?).await?;
            let (server_conn, client_conn) = (server_conn?, client_conn?);
            assert!(tls::is_peer_alpn(&server_conn));
            let theirs = tls::peer_identity(&server_conn)?;
            assert_eq!(theirs.node_id, Some(2));
            assert_eq!(theirs.certificate, read_certs(&two.cert)?[0]);
            // The dialer sees the server's identity the same way.
            assert_eq!(tls::peer_identity(&client_conn)?.node_id, Some(1));
            client_conn.close(0u32.into(), b"done");
            server.wait_idle().await;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn peer_protocol_without_a_certificate_is_refused() -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let root = tempfile::tempdir()?;
        let ca_dir = root.path().join("dev-ca");
        let one = tls::ensure_node_certificates(&node_config(&root.path().join("n1"), &ca_dir), 1)?;
        let ca = ca_dir.join("ca.pem");

        // The TLS layer lets it through (clients have no certificate); the identity check not.
        let server = server(&one)?;
        let client = client_endpoint()?;
        let (server_conn, _client_conn) =
            connect(&server, &client, anonymous_client(&ca, PEER_ALPN)?).await?;
        let server_conn = server_conn?;
        assert!(tls::is_peer_alpn(&server_conn));
        assert_eq!(tls::peer_identity(&server_conn).err(), Some(PeerAuthError::NoCertificate));

        // A client's connection is no peer link, whatever it presents.
        let (server_conn, _client_conn) = connect(&server, &client, anonymous_client(&ca, ALPN)?).await?;
        let server_conn = server_conn?;
        assert!(!tls::is_peer_alpn(&server_conn));
        assert_eq!(tls::peer_identity(&server_conn).err(), Some(PeerAuthError::NotPeerProtocol));

        // A running broker closes such a connection with `Unauthenticated`.
        let (broker, _client) =
            embedded(&root.path().join("b1"), |c| c.dev_ca = Some(ca_dir.clone())).await?;
        let conn =
            client.connect_with(anonymous_client(&ca, PEER_ALPN)?, broker.local_addr(), "localhost")?.await?;
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, u32::from(ErrorCode::Unauthenticated.code()).into());
                assert_eq!(&close.reason[..], b"quiver-peer/1 refused: the peer presented no certificate");
            }
            other => anyhow::bail!("expected the broker to close the connection, got {other}"),
        }
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_handshake() -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let root = tempfile::tempdir()?;
        let ca_dir = root.path().join("dev-ca");
        let one = tls::ensure_node_certificates(&node_config(&root.path().join("n1"), &ca_dir), 1)?;
        let stranger = tls::ensure_node_certificates(
            &node_config(&root.path().join("x"), &root.path().join("other-ca")),
            2,
        )?;
        // Trusts the right CA (so the server is accepted) but presents the other CA's leaf.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(read_certs(&ca_dir.join("ca.pem"))?.swap_remove(0))?;
        let key = rustls_pemfile::private_key(&mut &std::fs::read(&stranger.key)?[..])?
            .ok_or_else(|| anyhow::anyhow!("no key"))?;
        let quic =
            quiver_transport::mutual_tls_client_config(roots, read_certs(&stranger.cert)?, key, PEER_ALPN)?;
        let config = quinn::ClientConfig::new(Arc::new(quic));

        let server = server(&one)?;
        let client = client_endpoint()?;
        let (server_conn, client_conn) = connect(&server, &client, config).await?;
        // rustls answers an unknown issuer with the TLS alert unknown_ca (48).
        let unknown_ca = quinn::TransportErrorCode::crypto(48);
        match server_conn {
            Err(quinn::ConnectionError::TransportError(e)) => assert_eq!(e.code, unknown_ca, "{e}"),
            other => anyhow::bail!("the server accepted a stranger's certificate: {other:?}"),
        }
        // The client may finish its side first; either way it learns of the refusal.
        let client_error = match client_conn {
            Ok(conn) => conn.closed().await,
            Err(e) => e,
        };
        match client_error {
            quinn::ConnectionError::ConnectionClosed(close) => assert_eq!(close.error_code, unknown_ca),
            other => anyhow::bail!("expected the server's unknown_ca close, got {other}"),
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn peer_protocol_is_not_offered_without_a_peer_ca() -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let data = tempfile::tempdir()?;
        let (broker, _client) = embedded(data.path(), |_| {}).await?;
        assert!(broker.peer_tls().is_none());
        let ca = broker.ca_path().cloned().ok_or_else(|| anyhow::anyhow!("no dev CA"))?;
        let client = client_endpoint()?;
        let result =
            client.connect_with(anonymous_client(&ca, PEER_ALPN)?, broker.local_addr(), "localhost")?.await;
        match result {
            // TLS alert no_application_protocol (120).
            Err(quinn::ConnectionError::ConnectionClosed(close)) => {
                assert_eq!(close.error_code, quinn::TransportErrorCode::crypto(120))
            }
            other => anyhow::bail!("expected no_application_protocol, got {other:?}"),
        }
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn clients_of_a_dev_ca_broker_trust_the_shared_ca_and_restarts_keep_the_certificate(
) -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let root = tempfile::tempdir()?;
        let ca_dir = root.path().join("dev-ca");
        let data = root.path().join("b1");
        let mut leaf: Option<Vec<u8>> = None;
        for run in 0..2 {
            let (broker, client) = embedded(&data, |c| c.dev_ca = Some(ca_dir.clone())).await?;
            assert_eq!(broker.ca_path(), Some(&ca_dir.join("ca.pem")));
            assert_eq!(node_config(&data, &ca_dir).dev_ca_path(), ca_dir.join("ca.pem"));
            let peer = broker.peer_tls().ok_or_else(|| anyhow::anyhow!("no peer TLS with --dev-ca"))?;
            assert_eq!(peer.ca, ca_dir.join("ca.pem"));
            let cert = std::fs::read(data.join("tls").join(dev_ca::LEAF_CERT_FILE))?;
            match &leaf {
                None => leaf = Some(cert),
                Some(first) => assert!(first == &cert, "run {run} issued a new certificate"),
            }
            // An ordinary client (quiver/1, no certificate, trusting DIR/ca.pem) works as ever.
            let topic = format!("t{run}");
            client.admin().create_topic(&topic, 1, Default::default()).await?;
            Producer::new(client.clone(), ProducerConfig::default())
                .send(&topic, ProducerRecord::new(format!("hello {run}")))
                .await?;
            let config = ConsumerConfig::new(&topic).start(StartPosition::Earliest);
            let mut consumer = Consumer::subscribe(client.clone(), config).await?;
            let msg = consumer.next().await.ok_or_else(|| anyhow::anyhow!("no message"))??;
            assert_eq!(&msg.value[..], format!("hello {run}").as_bytes());
            consumer.close().await;
            client.close().await;
            broker.shutdown().await;
        }
        // Another client of the restarted broker, from the CA path alone.
        let (broker, _) = embedded(&data, |c| c.dev_ca = Some(ca_dir.clone())).await?;
        client_of(&broker).await?.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[test]
fn a_leaf_is_reissued_when_the_ca_or_the_node_id_changes() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let ca_dir = root.path().join("dev-ca");
    let config = node_config(&root.path().join("n1"), &ca_dir);
    let read = |files: &TlsFiles| -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        Ok((std::fs::read(&files.cert)?, std::fs::read(&files.key)?))
    };
    let files = tls::ensure_node_certificates(&config, 1)?;
    let first = read(&files)?;
    assert!(read(&tls::ensure_node_certificates(&config, 1)?)? == first, "reused on restart");

    let renamed = read(&tls::ensure_node_certificates(&config, 7)?)?;
    assert!(renamed.0 != first.0, "a new node id gets a new certificate");
    let leaf = read_certs(&files.cert)?.swap_remove(0);
    dev_ca::verify_leaf(&leaf, &read_certs(&ca_dir.join("ca.pem"))?[0], 7)?;

    // A new CA (the directory wiped): the old leaf no longer chains, so a new one is issued.
    std::fs::remove_dir_all(&ca_dir)?;
    let files = tls::ensure_node_certificates(&config, 7)?;
    assert!(read(&files)?.0 != renamed.0);
    verifies_under(&read_certs(&files.cert)?[0], &ca_dir.join("ca.pem"))?;

    // A key that is not the certificate's (a crash between writing a new key and its
    // certificate): reissued, so certificate and key match again.
    let before = read(&files)?.0;
    let other = tls::ensure_node_certificates(&node_config(&root.path().join("n2"), &ca_dir), 7)?;
    std::fs::copy(&other.key, &files.key)?;
    let repaired = tls::ensure_node_certificates(&config, 7)?;
    assert!(read(&repaired)?.0 != before, "a certificate without its key is reissued");
    tls::server_config(&repaired, &config)?;
    Ok(())
}

#[test]
fn peer_tls_settings_are_validated() {
    let mut config = BrokerConfig::new("/tmp/unused");
    config.tls_ca = Some(PathBuf::from("ca.pem"));
    let err = config.validate().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("tls_ca"), "{err}");

    let mut config = BrokerConfig::new("/tmp/unused");
    config.tls_cert = Some(PathBuf::from("c.pem"));
    config.tls_key = Some(PathBuf::from("k.pem"));
    config.dev_ca = Some(PathBuf::from("dir"));
    let err = config.validate().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("dev_ca and tls_cert"), "{err}");
}

#[test]
fn quiverd_help_shows_the_peer_tls_flags() -> anyhow::Result<()> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quiverd-under-test")).arg("--help").output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--dev-ca <DIR>") && help.contains("QUIVER_DEV_CA"), "{help}");
    assert!(help.contains("--tls-ca <FILE>") && help.contains("QUIVER_TLS_CA"), "{help}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quiverd-under-test"))
        .args(["--dev-ca", "/tmp/x", "--tls-cert", "c", "--tls-key", "k"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    Ok(())
}
