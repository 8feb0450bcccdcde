//! Authentication and authorisation (docs/security.md), end to end on an embedded broker over
//! real QUIC: tokens, client certificates, ACLs, and ACL changes reaching live connections.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{
    AclOperation, AclResource, AclRule, Client, ClientConfig, ClientError, Consumer, ConsumerConfig,
    ErrorCode, Producer, ProducerConfig, ProducerRecord, StartPosition, TopicConfig,
};
use quiver_tests::{bounded, init_tracing, next_message, LOOPBACK_ANY_PORT};

/// A broker with tokens on (and the development CA of `dir/ca` for client certificates), with
/// `admin` a super user. Returns the broker, the token file and the admin's token.
async fn secured_broker(dir: &Path) -> anyhow::Result<(Broker, PathBuf, String)> {
    let tokens = dir.join("tokens");
    let (admin_token, line) = quiver_broker::auth::new_token("admin", None)?;
    std::fs::write(&tokens, format!("{line}\n"))?;
    let mut config = BrokerConfig::new(dir.join("data")).listen(LOOPBACK_ANY_PORT);
    config.token_file = Some(tokens.clone());
    config.dev_ca = Some(dir.join("ca"));
    config.client_ca = Some(dir.join("ca").join("ca.pem"));
    config.super_users = vec!["admin".into()];
    let broker = Broker::start(config).await?;
    Ok((broker, tokens, admin_token))
}

fn config_of(broker: &Broker) -> ClientConfig {
    let ca = broker.ca_path().cloned().unwrap_or_default();
    ClientConfig::new(broker.local_addr().to_string(), ca).with_connect_timeout(Duration::from_secs(5))
}

/// Adds a token for `principal` (optionally expired) to the token file; returns it.
fn add_token(tokens: &Path, principal: &str, expires: Option<u64>) -> anyhow::Result<String> {
    let (token, line) = quiver_broker::auth::new_token(principal, expires)?;
    let mut text = std::fs::read_to_string(tokens)?;
    text.push_str(&line);
    text.push('\n');
    std::fs::write(tokens, text)?;
    Ok(token)
}

fn rule(principal: &str, resource: AclResource, pattern: &str, operation: AclOperation) -> AclRule {
    AclRule { principal: principal.into(), resource, pattern: pattern.into(), operation }
}

fn code_of(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::AllBrokersFailed { attempts } => attempts.iter().find_map(code_of),
        other => other.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_valid_credentials_are_refused_with_a_clear_error() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, tokens, _) = secured_broker(dir.path()).await?;

        // No credentials at all.
        let err = Client::connect(config_of(&broker)).await.expect_err("anonymous refused");
        assert_eq!(code_of(&err), Some(ErrorCode::Unauthenticated), "{err}");
        assert!(err.to_string().contains("requires authentication"), "{err}");

        // A token the broker never issued, and one altered by a character.
        let alice = add_token(&tokens, "alice", None)?;
        let mut altered = alice.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'a' { b'b' } else { b'a' };
        for bad in ["qvt_0000".to_string(), String::from_utf8(altered)?] {
            let err =
                Client::connect(config_of(&broker).with_token(bad)).await.expect_err("bad token refused");
            assert_eq!(code_of(&err), Some(ErrorCode::Unauthenticated), "{err}");
            assert!(err.to_string().contains("unknown, altered or revoked"), "{err}");
        }

        // An expired token.
        let old = add_token(&tokens, "carol", Some(1_000))?;
        let err = Client::connect(config_of(&broker).with_token(old)).await.expect_err("expired refused");
        assert!(err.to_string().contains("expired"), "{err}");

        // The token added to the file after the start works without a restart.
        Client::connect(config_of(&broker).with_token(alice)).await?;

        // A client certificate that has expired, and one from a CA the broker does not know.
        let (cert_path, key_path) =
            client_cert(dir.path(), &dir.path().join("ca"), "dave", Some((2021, 1, 1)))?;
        let err = Client::connect(config_of(&broker).with_client_cert(&cert_path, &key_path))
            .await
            .expect_err("expired certificate refused");
        assert!(err.to_string().contains("expired"), "{err}");

        let other = tempfile::tempdir()?;
        let (other_broker, _, _) = secured_broker(other.path()).await?;
        let (cert_path, key_path) = client_cert(dir.path(), &other.path().join("ca"), "mallory", None)?;
        let err = Client::connect(config_of(&broker).with_client_cert(&cert_path, &key_path))
            .await
            .expect_err("unknown CA refused");
        assert!(err.to_string().contains("unknown CA") || err.to_string().contains("certificate"), "{err}");
        other_broker.shutdown().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// The error a subscription gets: at `subscribe` (describing the topic), or from its first
/// partition stream.
async fn subscription_refused(client: &Client, config: ConsumerConfig) -> anyhow::Result<ClientError> {
    match Consumer::subscribe(client.clone(), config).await {
        Err(e) => Ok(e),
        Ok(mut c) => match tokio::time::timeout(Duration::from_secs(10), c.next()).await? {
            Some(Err(e)) => Ok(e),
            other => anyhow::bail!("not refused: {:?}", other.map(|r| r.map(|m| m.offset))),
        },
    }
}

/// A client certificate for `name` from the development CA in `ca_dir`, written into `dir`
/// (valid until `not_after` when given): the certificate's and the key's paths.
fn client_cert(
    dir: &Path,
    ca_dir: &Path,
    name: &str,
    not_after: Option<(i32, u8, u8)>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = quiver_broker::tls::issue_client_certificate(
        &ca_dir.join("ca.pem"),
        &ca_dir.join("ca.key"),
        name,
        not_after,
    )?;
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert)?;
    std::fs::write(&k, key)?;
    Ok((c, k))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_without_permission_is_refused_and_nothing_is_written() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, tokens, admin_token) = secured_broker(dir.path()).await?;
        let admin = Client::connect(config_of(&broker).with_token(admin_token)).await?;
        admin.admin().create_topic("orders", 1, TopicConfig::default()).await?;

        // A client certificate names the principal: alice may consume, not produce.
        let (cert_path, key_path) = client_cert(dir.path(), &dir.path().join("ca"), "alice", None)?;
        admin
            .admin()
            .add_acls(vec![rule("alice", AclResource::Topic, "orders", AclOperation::Consume)])
            .await?;
        let alice = Client::connect(config_of(&broker).with_client_cert(&cert_path, &key_path)).await?;
        assert_eq!(alice.principal().as_deref(), Some("alice"), "the certificate's common name");
        let producer = Producer::new(
            alice.clone(),
            ProducerConfig::default().with_delivery_timeout(Duration::from_secs(5)),
        );
        let err = producer.send("orders", ProducerRecord::new("forged")).await.expect_err("produce refused");
        assert_eq!(err.code(), Some(ErrorCode::NotAuthorized), "{err}");
        assert!(err.to_string().contains("'alice' may not produce to topic 'orders'"), "{err}");

        // Nor may she create, delete, or change the ACLs.
        let err =
            alice.admin().create_topic("mine", 1, TopicConfig::default()).await.expect_err("create refused");
        assert_eq!(err.code(), Some(ErrorCode::NotAuthorized), "{err}");
        let err = alice.admin().delete_topic("orders").await.expect_err("delete refused");
        assert_eq!(err.code(), Some(ErrorCode::NotAuthorized), "{err}");
        let grant = vec![rule("alice", AclResource::Topic, "*", AclOperation::Produce)];
        let err = alice.admin().add_acls(grant).await.expect_err("ACL change refused");
        assert_eq!(err.code(), Some(ErrorCode::NotAuthorized), "{err}");

        // Nothing was written.
        let t = admin.admin().describe_topic("orders").await?;
        assert_eq!(t.partitions[0].high_watermark, 0, "a refused produce wrote nothing");

        // Listings show only what the principal may use; describing another topic is refused
        // as describing a missing one is.
        admin.admin().create_topic("secret", 1, TopicConfig::default()).await?;
        let seen: Vec<String> = alice.admin().list_topics().await?.into_iter().map(|t| t.name).collect();
        assert_eq!(seen, ["orders"]);
        for name in ["secret", "missing"] {
            let err = alice.admin().describe_topic(name).await.expect_err("not visible");
            assert_eq!(err.code(), Some(ErrorCode::NotAuthorized), "{name}: {err}");
        }
        assert_eq!(admin.admin().list_topics().await?.len(), 2, "a super user sees every topic");

        // Dead letters go where the subscriber may produce (and, for the default topic,
        // create): consuming alone does not let alice make the broker write `orders.dlq`.
        let config = ConsumerConfig::new("orders").start(StartPosition::Earliest).with_max_deliveries(1);
        let err = subscription_refused(&alice, config).await?;
        assert_eq!(err.code(), Some(ErrorCode::NotAuthorized), "{err}");
        assert!(err.to_string().contains("orders.dlq"), "{err}");

        // A token's owner is a principal too, and bob has no rules at all.
        let bob = Client::connect(config_of(&broker).with_token(add_token(&tokens, "bob", None)?)).await?;
        let refused =
            subscription_refused(&bob, ConsumerConfig::new("orders").start(StartPosition::Earliest)).await?;
        assert_eq!(refused.code(), Some(ErrorCode::NotAuthorized), "{refused}");
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_changes_reach_live_connections_and_survive_a_restart() -> anyhow::Result<()> {
    init_tracing();
    bounded(90, async {
        let dir = tempfile::tempdir()?;
        let (broker, tokens, admin_token) = secured_broker(dir.path()).await?;
        let admin = Client::connect(config_of(&broker).with_token(admin_token.clone())).await?;
        admin.admin().create_topic("events", 1, TopicConfig::default()).await?;
        let alice =
            Client::connect(config_of(&broker).with_token(add_token(&tokens, "alice", None)?)).await?;
        let producer = Producer::new(
            alice.clone(),
            ProducerConfig::default().with_delivery_timeout(Duration::from_secs(5)),
        );
        let err = producer.send("events", ProducerRecord::new("early")).await.expect_err("not yet allowed");
        assert_eq!(err.code(), Some(ErrorCode::NotAuthorized), "{err}");

        // Granted while alice stays connected: her next produce goes through.
        admin
            .admin()
            .add_acls(vec![
                rule("alice", AclResource::Topic, "ev*", AclOperation::Produce),
                rule("alice", AclResource::Topic, "events", AclOperation::Consume),
            ])
            .await?;
        let producer = Producer::new(alice.clone(), ProducerConfig::default());
        producer.send("events", ProducerRecord::new("0")).await?;

        // A live subscription ends with "not authorised" once consume is taken away.
        let mut consumer =
            Consumer::subscribe(alice.clone(), ConsumerConfig::new("events").start(StartPosition::Earliest))
                .await?;
        let m = next_message(&mut consumer, Duration::from_secs(10)).await?;
        assert_eq!(&m.value[..], b"0");
        m.ack();
        admin
            .admin()
            .remove_acls(vec![rule("alice", AclResource::Topic, "events", AclOperation::Consume)])
            .await?;
        producer.send("events", ProducerRecord::new("1")).await?;
        // Record 1 was written after the rule went: the subscription must end instead.
        let ended = match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await? {
            Some(Ok(m)) => anyhow::bail!("delivered after the revocation: {:?}", m.value),
            Some(Err(e)) => e,
            None => anyhow::bail!("the stream ended without an error"),
        };
        assert_eq!(ended.code(), Some(ErrorCode::NotAuthorized), "{ended}");

        // The rules are kept: after a restart alice still produces and still cannot consume.
        let listed = admin.admin().list_acls().await?;
        assert_eq!(listed, vec![rule("alice", AclResource::Topic, "ev*", AclOperation::Produce)]);
        drop((producer, consumer, alice, admin));
        broker.shutdown().await;
        let mut config = BrokerConfig::new(dir.path().join("data")).listen(LOOPBACK_ANY_PORT);
        config.token_file = Some(tokens.clone());
        config.super_users = vec!["admin".into()];
        let broker = Broker::start(config).await?;
        let ca = broker.ca_path().cloned().unwrap_or_default();
        let admin =
            Client::connect(ClientConfig::new(broker.local_addr().to_string(), ca).with_token(admin_token))
                .await?;
        assert_eq!(admin.admin().list_acls().await?, listed, "rules kept across a restart");
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[test]
fn a_broker_beyond_loopback_refuses_to_start_anonymous() {
    let mut config = BrokerConfig::new("/nonexistent").listen("0.0.0.0:7420".parse().unwrap());
    let err = config.validate().expect_err("refused");
    assert!(err.to_string().contains("--allow-anonymous"), "{err}");
    config.allow_anonymous = true;
    config.validate().expect("explicitly anonymous");
    config.allow_anonymous = false;
    config.token_file = Some("/tokens".into());
    config.validate().expect("authenticated");
}

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

/// A client of broker `i` of `cluster` presenting `token`, retried while the cluster elects.
async fn token_client(cluster: &quiver_tests::Cluster, i: usize, token: &str) -> anyhow::Result<Client> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let cfg = ClientConfig::new(cluster.nodes[i].addr.to_string(), &cluster.ca)
            .with_token(token)
            .with_connect_timeout(Duration::from_secs(2));
        match Client::connect(cfg).await {
            Ok(c) => return Ok(c),
            Err(e) if std::time::Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Produces one record as `client` until it is allowed (a rule reaches each broker when it
/// applies the controller's entry), or fails after `within`.
async fn produce_once_allowed(client: &Client, topic: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    let producer = Producer::new(
        client.clone(),
        ProducerConfig::default().with_delivery_timeout(Duration::from_secs(10)),
    );
    loop {
        match producer.send(topic, ProducerRecord::new("x")).await {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(ErrorCode::NotAuthorized) && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_are_replicated_by_the_controller_and_replayed_after_a_crash() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = quiver_tests::test_dir()?;
        let tokens = dir.path().join("tokens");
        let [admin_token, alice_token] = quiver_tests::write_tokens(&tokens, ["admin", "alice"])?;
        let args = vec![
            "--token-file".to_string(),
            tokens.display().to_string(),
            "--super-users".to_string(),
            "admin".to_string(),
        ];
        let mut cluster = quiver_tests::Cluster::start_with_args(BIN, dir.path(), 3, &args).await?;
        let admin = token_client(&cluster, 0, &admin_token).await?;
        admin.admin().create_topic("t", 1, TopicConfig::default().with_replicas(3)).await?;

        let alice = token_client(&cluster, 2, &alice_token).await?;
        let producer = Producer::new(
            alice.clone(),
            ProducerConfig::default().with_delivery_timeout(Duration::from_secs(10)),
        );
        let err = producer.send("t", ProducerRecord::new("no")).await.expect_err("not allowed yet");
        assert_eq!(err.code(), Some(ErrorCode::NotAuthorized), "{err}");

        // Granted through broker 1; broker 3 applies it from the controller's log.
        admin.admin().add_acls(vec![rule("alice", AclResource::Topic, "t", AclOperation::Produce)]).await?;
        produce_once_allowed(&alice, "t", Duration::from_secs(10)).await?;

        // Broker 3 killed and started again replays the rule from its log.
        cluster.nodes[2].kill9();
        cluster.nodes[2].restart().await?;
        let alice = token_client(&cluster, 2, &alice_token).await?;
        assert_eq!(
            alice.admin().list_acls().await.map(drop).map_err(|e| e.code()),
            Err(Some(ErrorCode::NotAuthorized)),
            "listing the rules is for administrators"
        );
        produce_once_allowed(&alice, "t", Duration::from_secs(20)).await?;
        let admin3 = token_client(&cluster, 2, &admin_token).await?;
        assert_eq!(
            admin3.admin().list_acls().await?,
            vec![rule("alice", AclResource::Topic, "t", AclOperation::Produce)]
        );

        // A group subscription through broker 3 (served there, or relayed to the group's
        // coordinator or a replica) ends once consume on the topic is taken away.
        admin
            .admin()
            .add_acls(vec![
                rule("alice", AclResource::Topic, "t", AclOperation::Consume),
                rule("alice", AclResource::Group, "g", AclOperation::Consume),
                rule("alice", AclResource::Group, "g", AclOperation::Commit),
            ])
            .await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut consumer = loop {
            let config = ConsumerConfig::new("t").with_group("g").start(StartPosition::Earliest);
            match Consumer::subscribe(alice.clone(), config).await {
                Ok(c) => break c,
                Err(e)
                    if e.code() == Some(ErrorCode::NotAuthorized) && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e.into()),
            }
        };
        let m = next_message(&mut consumer, Duration::from_secs(20)).await?;
        m.ack();
        admin
            .admin()
            .remove_acls(vec![rule("alice", AclResource::Topic, "t", AclOperation::Consume)])
            .await?;
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match consumer.next().await {
                    // Records already on their way before the change may still arrive.
                    Some(Ok(m)) => m.ack(),
                    Some(Err(e)) => return Ok(e),
                    None => anyhow::bail!("the stream ended without an error"),
                }
            }
        })
        .await??;
        assert_eq!(ended.code(), Some(ErrorCode::NotAuthorized), "{ended}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_close_the_connection_and_principals_hold_few() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens");
        let (alice, line) = quiver_broker::auth::new_token("alice", None)?;
        std::fs::write(&tokens, format!("{line}\n"))?;
        let mut config = BrokerConfig::new(dir.path().join("data")).listen(LOOPBACK_ANY_PORT);
        config.token_file = Some(tokens);
        config.max_connections_per_principal = 2;
        let broker = Broker::start(config).await?;
        let open = || broker.state().connections.load(std::sync::atomic::Ordering::Relaxed);

        // A live connection that presents a bad token on a new stream is closed.
        let first = Client::connect(config_of(&broker).with_token(alice.clone())).await?;
        let conn = first.connection().await?;
        let (mut send, recv) = conn.open_bi().await?;
        let hello = quiver_protocol::message::Message::Hello {
            protocol_version: 1,
            client_id: "t".into(),
            token: Some("qvt_forged".into()),
        };
        quiver_transport::write_message(&mut send, &hello).await?;
        let answer = quiver_transport::FrameReader::new(recv).next().await?;
        assert!(
            matches!(
                &answer,
                Some(quiver_protocol::message::Message::Error { code: ErrorCode::Unauthenticated, .. })
            ),
            "{answer:?}"
        );
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await?;
        assert!(closed.to_string().contains("requires authentication"), "{closed}");

        // Two connections per principal here: a third is refused, and nothing leaks.
        let a = Client::connect(config_of(&broker).with_token(alice.clone())).await?;
        let b = Client::connect(config_of(&broker).with_token(alice.clone())).await?;
        for _ in 0..5 {
            let err = Client::connect(config_of(&broker).with_token(alice.clone()))
                .await
                .expect_err("over the limit");
            assert!(err.to_string().contains("max_connections_per_principal"), "{err}");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while open() > 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(open(), 2, "refused connections are closed and not counted");
        a.close().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match Client::connect(config_of(&broker).with_token(alice.clone())).await {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!("not yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
        drop(b);
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_holding_no_partition_stops_when_its_permission_goes() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, tokens, admin_token) = secured_broker(dir.path()).await?;
        let admin = Client::connect(config_of(&broker).with_token(admin_token)).await?;
        admin.admin().create_topic("one", 1, TopicConfig::default()).await?;
        admin
            .admin()
            .add_acls(vec![
                rule("alice", AclResource::Topic, "one", AclOperation::Consume),
                rule("alice", AclResource::Group, "g", AclOperation::Consume),
                rule("alice", AclResource::Group, "g", AclOperation::Commit),
            ])
            .await?;
        let alice =
            Client::connect(config_of(&broker).with_token(add_token(&tokens, "alice", None)?)).await?;
        // Two members of one group on a one-partition topic: one of them holds nothing.
        let config = || ConsumerConfig::new("one").with_group("g").start(StartPosition::Earliest);
        let mut first = Consumer::subscribe(alice.clone(), config()).await?;
        let mut second = Consumer::subscribe(alice.clone(), config()).await?;
        admin
            .admin()
            .remove_acls(vec![rule("alice", AclResource::Group, "g", AclOperation::Consume)])
            .await?;
        for (name, consumer) in [("first", &mut first), ("second", &mut second)] {
            let ended = match tokio::time::timeout(Duration::from_secs(20), consumer.next()).await {
                Ok(Some(Err(e))) => e,
                Ok(other) => anyhow::bail!("{name}: {:?}", other.map(|r| r.map(|m| m.offset))),
                Err(_) => anyhow::bail!("{name} member kept running after losing its permission"),
            };
            assert_eq!(ended.code(), Some(ErrorCode::NotAuthorized), "{name}: {ended}");
        }
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_relayed_by_a_broker_holding_no_replica_keeps_its_consume_quota() -> anyhow::Result<()>
{
    init_tracing();
    bounded(120, async {
        const QUOTA: u64 = 1024 * 1024;
        let dir = quiver_tests::test_dir()?;
        let tokens = dir.path().join("tokens");
        let [admin_token, alice_token] = quiver_tests::write_tokens(&tokens, ["admin", "alice"])?;
        let args = vec![
            "--token-file".to_string(),
            tokens.display().to_string(),
            "--super-users".to_string(),
            "admin,alice".to_string(),
            "--quota".to_string(),
            format!("alice:consume={QUOTA}"),
        ];
        let cluster = quiver_tests::Cluster::start_with_args(BIN, dir.path(), 3, &args).await?;
        let admin = token_client(&cluster, 0, &admin_token).await?;
        admin.admin().create_topic("q", 1, TopicConfig::default().with_replicas(1)).await?;
        let producer = Producer::new(admin.clone(), ProducerConfig::default());
        let mut acks = Vec::new();
        for _ in 0..96 {
            acks.push(producer.enqueue("q", ProducerRecord::new(vec![b'q'; 64 * 1024])).await?);
        }
        for a in acks {
            a.await?;
        }
        // Alice reads through a broker that holds no replica: it relays the subscription to
        // the one that does, which sees only a peer.
        // Broker i of the test cluster has node id i + 1.
        let holder = admin.admin().describe_topic("q").await?.partitions[0].replicas[0];
        anyhow::ensure!((1..=3).contains(&holder), "replica on broker {holder}");
        let relay = (0..3).find(|i| *i as u32 + 1 != holder).unwrap_or(0);
        let alice = token_client(&cluster, relay, &alice_token).await?;
        let mut consumer =
            Consumer::subscribe(alice.clone(), ConsumerConfig::new("q").start(StartPosition::Earliest))
                .await?;
        // The first delivery, then the rate from there (the burst allowance is a tenth of a
        // second's worth).
        next_message(&mut consumer, Duration::from_secs(20)).await?.ack();
        let started = std::time::Instant::now();
        let (mut read, mut records) = (0u64, 1);
        while started.elapsed() < Duration::from_secs(3) && records < 96 {
            let m = next_message(&mut consumer, Duration::from_secs(10)).await?;
            read += m.value.len() as u64;
            records += 1;
            m.ack();
        }
        let rate = read as f64 / started.elapsed().as_secs_f64();
        eprintln!(
            "relayed consume: alice {:.2} MiB/s (quota {:.2})",
            rate / 1048576.0,
            QUOTA as f64 / 1048576.0
        );
        assert!(rate <= QUOTA as f64 * 1.1, "alice consumed {rate:.0} B/s against a quota of {QUOTA}");
        assert!(rate >= QUOTA as f64 * 0.5, "alice consumed only {rate:.0} B/s with a quota of {QUOTA}");
        Ok(())
    })
    .await
}
