//! One misbehaving client cannot exhaust the broker (docs/security.md, "Resource bounds"):
//! answers it does not read stay within the connection's budget, idle streams are ended, and
//! a principal over its quota is slowed to it while others are not.

use std::time::{Duration, Instant};

use quiver_client::{
    Client, ClientConfig, Producer, ProducerConfig, ProducerRecord, StartPosition, TopicConfig,
};
use quiver_protocol::message::Message;
use quiver_tests::{bounded, init_tracing, BrokerProcess, LOOPBACK_ANY_PORT};
use quiver_transport::{write_message, FrameReader};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

/// The broker's budget for one connection's buffered requests and unwritten answers
/// (`max_connection_buffer_bytes`), set low here so the bound is plain to see.
const CONNECTION_BUDGET: u64 = 32 * 1024 * 1024;

/// A broker process with `CONNECTION_BUDGET` per connection and a 1 MiB tail cache, and a
/// one-partition `topic` holding `records` records of `record_bytes` (written, then a second
/// to settle).
async fn broker_with_history(
    dir: &std::path::Path,
    topic: &str,
    record_bytes: usize,
    records: usize,
    more_config: &str,
) -> anyhow::Result<BrokerProcess> {
    let config = format!(
        "max_connection_buffer_bytes = {CONNECTION_BUDGET}\ntail_cache_bytes_per_partition = 1048576\n{more_config}"
    );
    let broker = BrokerProcess::start(BIN, dir, Some(&config)).await?;
    let client = broker.client().await?;
    client.admin().create_topic(topic, 1, TopicConfig::default()).await?;
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let value = vec![b'v'; record_bytes];
    let mut acks = Vec::new();
    for _ in 0..records {
        acks.push(producer.enqueue(topic, ProducerRecord::new(value.clone())).await?);
    }
    for a in acks {
        a.await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_fetches_cannot_grow_broker_memory() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        // 48 MiB of history in 2 MiB batches, nearly all of it beyond the tail cache: fetches
        // read it from disk into buffers of their own, a whole batch however few bytes they
        // ask for.
        let broker = broker_with_history(dir.path(), "big", 2 << 20, 24, "").await?;
        let before = broker.rss_kib().unwrap_or(0);
        // Another client's requests, one at a time, before the flood: the median of 30.
        let other = broker.client().await?;
        let polite = Producer::new(other.clone(), ProducerConfig::default());
        let mut quiet = Vec::new();
        for _ in 0..30 {
            let started = Instant::now();
            polite.send("big", ProducerRecord::new("x")).await?;
            other.admin().offset_for_time("big", 0, 0).await?;
            quiet.push(started.elapsed());
        }
        quiet.sort();

        // One connection asks for 512 fetches, one per stream, of one byte each (a whole
        // 2 MiB batch), and reads none.
        let hostile = broker.client().await?;
        let conn = hostile.connection().await?;
        let mut streams = Vec::new();
        for i in 0..512u64 {
            let (mut send, recv) = tokio::time::timeout(Duration::from_secs(10), conn.open_bi()).await??;
            let fetch = Message::Fetch { topic: "big".into(), partition: 0, offset: i % 23, max_bytes: 1 };
            write_message(&mut send, &fetch).await?;
            streams.push((send, recv));
        }

        // Meanwhile the other client goes on, one request at a time.
        let mut peak = before;
        let mut during = Vec::new();
        for _ in 0..30 {
            let started = Instant::now();
            polite.send("big", ProducerRecord::new("x")).await?;
            other.admin().offset_for_time("big", 0, 0).await?;
            during.push(started.elapsed());
            peak = peak.max(broker.rss_kib().unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        during.sort();
        let slowest = during[during.len() - 1];
        let grown_mib = peak.saturating_sub(before) / 1024;
        eprintln!(
            "broker RSS {before} KiB before, {peak} KiB at peak (+{grown_mib} MiB); the other client's requests: \
             median {:?} before, {:?} during (slowest {slowest:?})",
            quiet[quiet.len() / 2],
            during[during.len() / 2]
        );
        // Unbounded, the broker held every answer: about 1 GiB. Bounded: the connection's
        // budget, QUIC's send buffers and the allocator's slack.
        assert!(grown_mib < CONNECTION_BUDGET / (1 << 20) + 96, "broker grew by {grown_mib} MiB");
        assert!(slowest < Duration::from_secs(5), "the other client waited {slowest:?}");
        drop(streams);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_subscriptions_cannot_grow_broker_memory() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let broker = broker_with_history(dir.path(), "hist", 64 * 1024, 768, "").await?;
        let before = broker.rss_kib().unwrap_or(0);

        // 512 subscriptions from different points of the history, with wide windows, on one
        // connection that reads none of their deliveries: each would read 1 MiB (and 1 MiB
        // ahead) from disk and hold it while its stream is blocked.
        let hostile = broker.client().await?;
        let conn = hostile.connection().await?;
        let mut streams = Vec::new();
        for i in 0..512u64 {
            let (mut send, recv) = tokio::time::timeout(Duration::from_secs(10), conn.open_bi()).await??;
            let sub = quiver_protocol::message::Subscribe {
                topic: "hist".into(),
                partition: 0,
                group: None,
                member: None,
                start: StartPosition::Offset((i * 7) % 700),
                window_messages: 100_000,
                window_bytes: 64 << 20,
                policy: Default::default(),
                group_position: None,
            };
            write_message(&mut send, &Message::Subscribe(sub)).await?;
            streams.push((send, recv));
        }
        let mut peak = before;
        for _ in 0..30 {
            peak = peak.max(broker.rss_kib().unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let grown_mib = peak.saturating_sub(before) / 1024;
        eprintln!("broker RSS {before} KiB before, {peak} KiB at peak (+{grown_mib} MiB)");
        assert!(grown_mib < CONNECTION_BUDGET / (1 << 20) + 96, "broker grew by {grown_mib} MiB");
        drop(streams);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_ended_and_clients_carry_on() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let mut config = quiver_broker::BrokerConfig::new(dir.path()).listen(LOOPBACK_ANY_PORT);
        config.stream_idle_timeout_ms = 500;
        let broker = quiver_broker::Broker::start(config).await?;
        let ca = broker.ca_path().cloned().unwrap_or_default();
        let client = Client::connect(ClientConfig::new(broker.local_addr().to_string(), ca)).await?;
        client.admin().create_topic("t", 1, TopicConfig::default()).await?;

        // Streams that asked one thing and then nothing more are ended once idle.
        let conn = client.connection().await?;
        let mut readers = Vec::new();
        for _ in 0..50 {
            let (mut send, recv) = conn.open_bi().await?;
            write_message(&mut send, &Message::Metadata { topic: None }).await?;
            readers.push((send, FrameReader::new(recv)));
        }
        for (i, (_send, reader)) in readers.iter_mut().enumerate() {
            let answer = tokio::time::timeout(Duration::from_secs(5), reader.next()).await??;
            assert!(matches!(answer, Some(Message::MetadataOk(_))), "stream {i}: {answer:?}");
            let end = tokio::time::timeout(Duration::from_secs(5), reader.next()).await??;
            assert!(end.is_none(), "stream {i} was not ended: {end:?}");
        }

        // The SDK's own streams go idle too: a producer and a consumer idle past the timeout
        // carry on.
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        producer.send("t", ProducerRecord::new("before")).await?;
        let mut consumer = quiver_client::Consumer::subscribe(
            client.clone(),
            quiver_client::ConsumerConfig::new("t").start(StartPosition::Earliest),
        )
        .await?;
        let m = quiver_tests::next_message(&mut consumer, Duration::from_secs(5)).await?;
        m.ack();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        producer.send("t", ProducerRecord::new("after")).await?;
        let m = quiver_tests::next_message(&mut consumer, Duration::from_secs(5)).await?;
        assert_eq!(&m.value[..], b"after");
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// Produces 64 KiB records as fast as `client` may for `run`; the acknowledged bytes per second.
async fn produce_rate(client: Client, run: Duration) -> anyhow::Result<f64> {
    let producer = Producer::new(client, ProducerConfig::default());
    let value = vec![b'q'; 64 * 1024];
    let started = Instant::now();
    let mut acked = 0u64;
    let mut inflight = std::collections::VecDeque::new();
    while started.elapsed() < run {
        inflight.push_back(producer.enqueue("quota", ProducerRecord::new(value.clone())).await?);
        while inflight.len() > 32 {
            if let Some(a) = inflight.pop_front() {
                a.await?;
                acked += value.len() as u64;
            }
        }
    }
    for a in inflight {
        a.await?;
        acked += value.len() as u64;
    }
    Ok(acked as f64 / started.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_over_its_quota_is_slowed_to_it_and_others_are_not() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        const QUOTA: u64 = 2 * 1024 * 1024;
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens");
        let [alice, bob] = quiver_tests::write_tokens(&tokens, ["alice", "bob"])?;
        let mut config = quiver_broker::BrokerConfig::new(dir.path().join("data")).listen(LOOPBACK_ANY_PORT);
        config.token_file = Some(tokens);
        config.super_users = vec!["alice".into(), "bob".into()];
        config.quotas.insert(
            "alice".into(),
            quiver_broker::config::Quota {
                produce_bytes_per_sec: Some(QUOTA),
                consume_bytes_per_sec: Some(QUOTA),
            },
        );
        let broker = quiver_broker::Broker::start(config).await?;
        let ca = broker.ca_path().cloned().unwrap_or_default();
        let connect = |token: String| {
            Client::connect(ClientConfig::new(broker.local_addr().to_string(), ca.clone()).with_token(token))
        };
        let (alice, bob) = (connect(alice).await?, connect(bob).await?);
        alice.admin().create_topic("quota", 2, TopicConfig::default()).await?;

        // One batch larger than a second's quota waits its turn itself (not only the next).
        let started = Instant::now();
        Producer::new(alice.clone(), ProducerConfig::default())
            .send("quota", ProducerRecord::new(vec![b'b'; 4 << 20]))
            .await?;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1500), "a 4 MiB batch at 2 MiB/s went through in {took:?}");

        // Both at once: alice is held to her rate (within 10 %), bob is not held to it.
        let run = Duration::from_secs(4);
        let (a, b) = tokio::join!(produce_rate(alice.clone(), run), produce_rate(bob.clone(), run));
        let (a, b) = (a?, b?);
        eprintln!(
            "produce: alice {:.2} MiB/s (quota {:.2}), bob {:.2} MiB/s",
            a / 1048576.0,
            QUOTA as f64 / 1048576.0,
            b / 1048576.0
        );
        assert!(
            a <= QUOTA as f64 * 1.1 && a >= QUOTA as f64 * 0.9,
            "alice produced {a:.0} B/s against a quota of {QUOTA}"
        );
        assert!(b > QUOTA as f64 * 3.0, "bob produced only {b:.0} B/s");

        // Consuming: alice reads the history at her rate.
        let mut consumer = quiver_client::Consumer::subscribe(
            alice.clone(),
            quiver_client::ConsumerConfig::new("quota").start(StartPosition::Earliest),
        )
        .await?;
        let started = Instant::now();
        let mut read = 0u64;
        while started.elapsed() < Duration::from_secs(3) {
            let m = quiver_tests::next_message(&mut consumer, Duration::from_secs(5)).await?;
            read += m.value.len() as u64;
            m.ack();
        }
        let rate = read as f64 / started.elapsed().as_secs_f64();
        eprintln!("consume: alice {:.2} MiB/s", rate / 1048576.0);
        assert!(rate <= QUOTA as f64 * 1.1, "alice consumed {rate:.0} B/s against a quota of {QUOTA}");
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// Opens `n` streams on `conn`, asks one `Metadata` on each and reads the answer, leaving the
/// streams open and idle; the streams (kept so they stay open) and how many were refused.
async fn idle_streams(
    conn: &quinn::Connection,
    n: usize,
) -> anyhow::Result<(Vec<(quinn::SendStream, FrameReader)>, usize)> {
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        let (mut send, recv) = tokio::time::timeout(Duration::from_secs(10), conn.open_bi()).await??;
        write_message(&mut send, &Message::Metadata { topic: None }).await?;
        let mut reader = FrameReader::new(recv);
        match tokio::time::timeout(Duration::from_secs(10), reader.next()).await?? {
            Some(Message::MetadataOk(_)) => open.push((send, reader)),
            Some(Message::Error { code: quiver_protocol::ErrorCode::LimitExceeded, message, .. }) => {
                assert!(message.contains("max_streams_per_principal"), "{message}");
                refused += 1;
            }
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }
    Ok((open, refused))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_cost_little_and_one_principal_holds_only_its_share() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens");
        let [alice, bob] = quiver_tests::write_tokens(&tokens, ["alice", "bob"])?;
        let config = format!(
            "max_streams_per_principal = 6000\ntoken_file = {:?}\nsuper_users = [\"alice\", \"bob\"]\n",
            tokens.display().to_string()
        );
        let broker = BrokerProcess::start(BIN, &dir.path().join("data"), Some(&config)).await?;
        let connect = |token: &str| {
            Client::connect(ClientConfig::new(broker.addr.to_string(), broker.ca_path()).with_token(token))
        };
        let client = connect(&alice).await?;
        let conn = client.connection().await?;
        // Warm up: the first streams allocate the broker's per-thread caches.
        let (warm, _) = idle_streams(&conn, 64).await?;
        drop(warm);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = broker.rss_kib().unwrap_or(0);
        let (held, refused) = idle_streams(&conn, 4096).await?;
        assert_eq!(refused, 0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = broker.rss_kib().unwrap_or(0);
        let per_stream = after.saturating_sub(before) as f64 * 1024.0 / 4096.0;
        eprintln!("4,096 idle streams: broker RSS {before} -> {after} KiB, {per_stream:.0} bytes per stream");
        // 13.8 KB before a waiting stream's task was made small (its other states boxed) and
        // its frame buffer allocated only as bytes arrive; 7.3-8.5 KB after.
        assert!(per_stream < 12.0 * 1024.0, "{per_stream:.0} bytes per idle stream");

        // Alice's second connection gets the rest of her share, then a clear refusal; bob is
        // not held back by her; streams given back are hers again.
        let second = connect(&alice).await?;
        let conn2 = second.connection().await?;
        let (more, refused) = idle_streams(&conn2, 2000).await?;
        assert!(refused > 0, "no stream refused beyond max_streams_per_principal");
        assert!(more.len() + held.len() <= 6000, "{} + {} streams open", more.len(), held.len());
        assert!(more.len() + held.len() >= 5990, "only {} + {} streams open", more.len(), held.len());
        let bobs = connect(&bob).await?;
        let (his, refused) = idle_streams(&bobs.connection().await?, 100).await?;
        assert_eq!((his.len(), refused), (100, 0));
        drop(held);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (again, refused) = idle_streams(&conn2, 100).await?;
        assert_eq!((again.len(), refused), (100, 0));

        // A connection that has not authenticated gets a few streams (a Hello needs one), and
        // nothing but "authenticate first" beyond them.
        let raw = raw_connection(&broker).await?;
        let (mut answers, mut kept) = (Vec::new(), Vec::new());
        for _ in 0..8 {
            let (mut send, recv) = raw.open_bi().await?;
            write_message(&mut send, &Message::Metadata { topic: None }).await?;
            let mut reader = FrameReader::new(recv);
            match tokio::time::timeout(Duration::from_secs(10), reader.next()).await?? {
                Some(Message::Error { code, message, .. }) => answers.push((code, message)),
                other => anyhow::bail!("an unauthenticated stream was answered {other:?}"),
            }
            kept.push((send, reader)); // open: the next streams count them
        }
        let beyond = answers.iter().filter(|(_, m)| m.contains("authenticate first")).count();
        assert_eq!(beyond, 4, "{answers:?}");
        assert!(
            answers.iter().all(|(c, _)| *c == quiver_protocol::ErrorCode::Unauthenticated),
            "{answers:?}"
        );
        raw.close(0u32.into(), b"");
        Ok(())
    })
    .await
}

/// A QUIC connection to `broker` speaking Quiver's protocol that has sent no `Hello`.
async fn raw_connection(broker: &BrokerProcess) -> anyhow::Result<quinn::Connection> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(broker.ca_path())?;
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(quiver_transport::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![quiver_protocol::limits::ALPN.to_vec()];
    let config = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    Ok(endpoint.connect_with(config, broker.addr, "localhost")?.await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_unfinished_handshakes_hold_at_most_max_handshakes() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BIN, dir.path(), Some("validate_addresses = false\n")).await?;
        let other = broker.client().await?;
        other.admin().create_topic("t", 1, TopicConfig::default()).await?;
        let polite = Producer::new(other.clone(), ProducerConfig::default());
        let one_at_a_time = |n: usize| {
            let (polite, other) = (&polite, &other);
            async move {
                let mut took = Vec::new();
                for _ in 0..n {
                    let started = Instant::now();
                    polite.send("t", ProducerRecord::new("x")).await?;
                    other.admin().offset_for_time("t", 0, 0).await?;
                    took.push(started.elapsed());
                }
                took.sort();
                anyhow::Ok(took)
            }
        };
        let quiet = one_at_a_time(30).await?;
        let before = broker.rss_kib().unwrap_or(0);

        // 3,000 handshakes from one client, none of which finishes (the broker allows
        // `max_handshakes`, 1,024, at once and refuses the rest until some end): through a
        // proxy that passes nothing back, with address validation off so that the broker holds
        // state for each from its first packet.
        let proxy = quiver_tests::proxy::UdpProxy::start(broker.addr).await?;
        proxy.set_down(quiver_tests::proxy::LinkFaults::CUT);
        let relay = proxy.addr;
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let mut tls = rustls::ClientConfig::builder_with_provider(quiver_transport::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        tls.alpn_protocols = vec![quiver_protocol::limits::ALPN.to_vec()];
        let config = quinn::ClientConfig::new(std::sync::Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
        ));
        let mut pending = Vec::new();
        for _ in 0..3000 {
            pending.push(endpoint.connect_with(config.clone(), relay, "localhost")?);
        }
        let mut peak = before;
        let mut during = Vec::new();
        for _ in 0..10 {
            during.extend(one_at_a_time(3).await?);
            peak = peak.max(broker.rss_kib().unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        during.sort();
        let grown_mib = peak.saturating_sub(before) / 1024;
        eprintln!(
            "3,000 unfinished handshakes: broker RSS {before} KiB before, {peak} KiB at peak (+{grown_mib} MiB); \
             the other client: median {:?} before, {:?} during (slowest {:?})",
            quiet[quiet.len() / 2],
            during[during.len() / 2],
            during[during.len() - 1]
        );
        // Bounded: 1,024 handshakes at about 53 KiB each, and quinn's queue of refused ones.
        assert!(grown_mib < 96, "broker grew by {grown_mib} MiB");
        assert!(during[during.len() / 2] < quiet[quiet.len() / 2] * 3 + Duration::from_millis(5));
        drop(pending);
        endpoint.close(0u32.into(), b"");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_stop_acknowledging_share_the_broker_wide_send_bound() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        const TOTAL_BUFFER: u64 = 64 << 20;
        const TOTAL_SEND: u64 = 64 << 20;
        let dir = tempfile::tempdir()?;
        let more = format!(
            "max_total_buffer_bytes = {TOTAL_BUFFER}\nmax_total_send_bytes = {TOTAL_SEND}\nmax_connections = 1024\n"
        );
        let broker = broker_with_history(dir.path(), "big", 2 << 20, 24, &more).await?;
        let before = broker.rss_kib().unwrap_or(0);
        // 16 connections, each through a proxy that stops passing anything toward the broker
        // (no more ACKs) once 32 fetches of a whole 2 MiB batch were asked on it: what the
        // broker writes stays unacknowledged in its send windows until the connections time out.
        let mut held = Vec::new();
        for _ in 0..16 {
            let proxy = quiver_tests::proxy::UdpProxy::start(broker.addr).await?;
            let config = ClientConfig::new(proxy.addr.to_string(), broker.ca_path());
            let client = Client::connect(config).await?;
            let conn = client.connection().await?;
            let mut streams = Vec::new();
            for i in 0..32u64 {
                let (mut send, recv) =
                    tokio::time::timeout(Duration::from_secs(10), conn.open_bi()).await??;
                let fetch =
                    Message::Fetch { topic: "big".into(), partition: 0, offset: i % 23, max_bytes: 1 };
                write_message(&mut send, &fetch).await?;
                streams.push((send, recv));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            proxy.set_up(quiver_tests::proxy::LinkFaults::CUT);
            held.push((client, streams, proxy));
        }
        let mut peak = before;
        for _ in 0..40 {
            peak = peak.max(broker.rss_kib().unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let grown_mib = peak.saturating_sub(before) / 1024;
        eprintln!(
            "16 connections that stopped acknowledging: broker RSS {before} -> {peak} KiB (+{grown_mib} MiB)"
        );
        // Bounded by the answers waiting for budget and those in the send windows.
        let bound = (TOTAL_BUFFER + TOTAL_SEND) >> 20;
        // With 64 MiB windows each (the total not shared): +1,020 MiB.
        assert!(grown_mib < bound + 96, "broker grew by {grown_mib} MiB (bound {bound} MiB)");
        Ok(())
    })
    .await
}
