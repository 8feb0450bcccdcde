//! A broker embedded in an application runs on whatever Tokio runtime the application has.
//! The partition writer runs small group commits on its own thread where the runtime allows
//! it (`block_in_place`, multi-thread runtimes only) and hands them to a blocking thread
//! elsewhere; both must store and deliver every message.
//!
//! The metrics recorder is process-wide: the check that fsync groups never run in place holds
//! only while no other multi-thread-runtime broker in this test binary appends meanwhile, so
//! keep such tests out of this file.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use futures::StreamExt;
use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{
    Client, ClientConfig, Consumer, ConsumerConfig, Durability, Producer, ProducerConfig, ProducerRecord,
    StartPosition, TopicConfig,
};
use quiver_tests::{bounded, init_tracing};

/// Group commits run in place so far, from the broker's Prometheus endpoint (the recorder is
/// process-wide, shared by every broker of this test binary).
fn in_place_commits(metrics: SocketAddr) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(metrics)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with("quiver_group_commits_total{path=\"in_place\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Sends small records one at a time (each its own small group commit), then a burst of
/// large batches, and reads everything back in order, for every durability. With
/// `expect_in_place`, checks that the small commits ran in place exactly where they need no
/// fsync.
async fn produce_and_read_back(expect_in_place: bool) -> anyhow::Result<()> {
    for durability in [Durability::Interval, Durability::Os, Durability::Always] {
        produce_and_read_back_with(durability, expect_in_place).await?;
    }
    Ok(())
}

async fn produce_and_read_back_with(durability: Durability, expect_in_place: bool) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut config = BrokerConfig::new(data.path()).listen("127.0.0.1:0".parse()?);
    config.metrics_listen = Some("127.0.0.1:0".parse()?);
    let broker = Broker::start(config).await?;
    let metrics = broker.metrics_addr().ok_or_else(|| anyhow::anyhow!("metrics not served"))?;
    let before = tokio::task::spawn_blocking(move || in_place_commits(metrics)).await??;
    let ca = broker.ca_path().cloned().ok_or_else(|| anyhow::anyhow!("no development CA"))?;
    let client = Client::connect(ClientConfig::new(broker.local_addr().to_string(), ca)).await?;
    client.admin().create_topic("embedded", 1, TopicConfig { durability, ..TopicConfig::default() }).await?;

    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let mut expected = Vec::new();
    for i in 0..200 {
        let value = format!("small {i}");
        producer.send("embedded", ProducerRecord::new(value.clone())).await?;
        expected.push(value.into_bytes());
    }
    let big = vec![b'b'; 100 * 1024];
    let mut acks = Vec::new();
    for i in 0..40u8 {
        let mut value = big.clone();
        value[0] = i;
        acks.push(producer.enqueue("embedded", ProducerRecord::new(value.clone())).await?);
        expected.push(value);
    }
    for ack in acks {
        ack.await?;
    }
    if expect_in_place {
        let in_place = tokio::task::spawn_blocking(move || in_place_commits(metrics)).await?? - before;
        match durability {
            Durability::Always => assert_eq!(in_place, 0.0, "fsync groups must be handed off"),
            _ => assert!(in_place >= 200.0, "{in_place} of 200 small {durability:?} commits ran in place"),
        }
    }

    let config = ConsumerConfig::new("embedded").start(StartPosition::Earliest);
    let mut consumer = Consumer::subscribe(client.clone(), config).await?;
    for (i, want) in expected.iter().enumerate() {
        let msg = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended at {i}"))??;
        assert_eq!(msg.offset, i as u64);
        assert!(msg.value[..] == want[..], "message {i} differs");
        msg.ack();
    }
    consumer.close().await;
    client.close().await;
    broker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn an_embedded_broker_works_on_a_current_thread_runtime() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, produce_and_read_back(false)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_broker_works_on_a_multi_thread_runtime() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, produce_and_read_back(true)).await
}
