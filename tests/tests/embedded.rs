//! A broker embedded in an application runs on whatever Tokio runtime the application has.
//! Small appends without fsync run on the runtime's own tasks (the express path and the
//! writer's in-place groups, on either kind of runtime) and the rest on blocking threads; both
//! must store and deliver every message.
//!
//! The metrics recorder is process-wide: the check that fsync groups never run on the
//! runtime holds only while no other broker in this test binary appends meanwhile, so the
//! tests here take `SERIAL` and other brokers stay out of this file.

use futures::StreamExt;
use quiver_client::{
    Consumer, ConsumerConfig, Durability, Producer, ProducerConfig, ProducerRecord, StartPosition,
    TopicConfig,
};
use quiver_tests::{bounded, embedded, http_get, init_tracing, metric_sum, LOOPBACK_ANY_PORT};

/// One test at a time: they read a process-wide counter.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Appends run on the runtime's tasks so far (express and in place), from the broker's
/// Prometheus endpoint (the recorder is process-wide, shared by every broker of this binary).
fn in_place_commits(metrics: std::net::SocketAddr) -> anyhow::Result<f64> {
    let text = http_get(metrics, "/metrics")?;
    Ok(metric_sum(&text, "quiver_group_commits_total{path=\"in_place\"}")
        + metric_sum(&text, "quiver_group_commits_total{path=\"express\"}"))
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
    let (broker, client) = embedded(data.path(), |c| c.metrics_listen = Some(LOOPBACK_ANY_PORT)).await?;
    let metrics = broker.metrics_addr().ok_or_else(|| anyhow::anyhow!("metrics not served"))?;
    let before = tokio::task::spawn_blocking(move || in_place_commits(metrics)).await??;
    client.admin().create_topic("embedded", 1, TopicConfig::default().with_durability(durability)).await?;

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
            // All but the first, which records the partition's first leader epoch (an fsync).
            _ => assert!(in_place >= 199.0, "{in_place} of 200 small {durability:?} commits ran in place"),
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
    let _serial = SERIAL.lock().await;
    bounded(60, produce_and_read_back(true)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_broker_works_on_a_multi_thread_runtime() -> anyhow::Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    bounded(60, produce_and_read_back(true)).await
}
