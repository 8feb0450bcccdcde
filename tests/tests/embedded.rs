//! A broker embedded in an application runs on whatever Tokio runtime the application has.
//! The partition writer runs small group commits on its own thread where the runtime allows
//! it (`block_in_place`, multi-thread runtimes only) and hands them to a blocking thread
//! elsewhere; both must store and deliver every message.

use futures::StreamExt;
use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{
    Client, ClientConfig, Consumer, ConsumerConfig, Durability, Producer, ProducerConfig, ProducerRecord,
    StartPosition, TopicConfig,
};
use quiver_tests::{bounded, init_tracing};

/// Sends small records one at a time (each its own small group commit), then a burst of
/// large batches, and reads everything back in order. For every durability: only groups that
/// need no fsync may run in place.
async fn produce_and_read_back() -> anyhow::Result<()> {
    for durability in [Durability::Interval, Durability::Os, Durability::Always] {
        produce_and_read_back_with(durability).await?;
    }
    Ok(())
}

async fn produce_and_read_back_with(durability: Durability) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let broker = Broker::start(BrokerConfig::new(data.path()).listen("127.0.0.1:0".parse()?)).await?;
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
    bounded(60, produce_and_read_back()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_broker_works_on_a_multi_thread_runtime() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, produce_and_read_back()).await
}
