//! One broker, many partitions: a connection gets a stream per partition although it starts
//! with a small stream limit, and every partition's tail is served when the shared tail-cache
//! budget holds only a few of them (the rest read from the files).

use std::collections::HashMap;
use std::time::Duration;

use quiver_client::{
    Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition, TopicConfig,
};
use quiver_tests::{bounded, embedded, init_tracing, next_message};

/// More partitions than the starting stream limit (`INITIAL_STREAMS_PER_CONNECTION`), so the
/// producer's and the consumer's streams on one connection need the limit raised several times.
const PARTITIONS: u32 = 3 * quiver_broker::config::INITIAL_STREAMS_PER_CONNECTION;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_writes_and_reads_every_partition_of_a_wide_topic() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let data = tempfile::tempdir()?;
        let (broker, client) = embedded(data.path(), |_| {}).await?;
        client.admin().create_topic("wide", PARTITIONS, TopicConfig::default()).await?;

        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let mut acks = Vec::new();
        for p in 0..PARTITIONS {
            acks.push(producer.enqueue("wide", ProducerRecord::new(format!("to {p}")).partition(p)).await?);
        }
        for ack in acks {
            ack.await?;
        }

        let config = ConsumerConfig::new("wide").start(StartPosition::Earliest);
        let mut consumer = Consumer::subscribe(client.clone(), config).await?;
        let mut seen = HashMap::new();
        while seen.len() < PARTITIONS as usize {
            let msg = next_message(&mut consumer, Duration::from_secs(30)).await?;
            assert_eq!(msg.value, format!("to {}", msg.partition).as_bytes());
            assert!(seen.insert(msg.partition, msg.offset).is_none(), "partition {} twice", msg.partition);
            msg.ack();
        }
        consumer.close().await;
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_at_the_tail_get_everything_when_the_tail_cache_budget_is_small() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        const PARTS: u32 = 8;
        const PER_PARTITION: usize = 200;
        let data = tempfile::tempdir()?;
        // Room for about two 4 KiB records in all caches together.
        let (broker, client) = embedded(data.path(), |c| c.tail_cache_bytes_total = 10 * 1024).await?;
        client.admin().create_topic("budget", PARTS, TopicConfig::default()).await?;
        let config = ConsumerConfig::new("budget").start(StartPosition::Earliest);
        let mut consumer = Consumer::subscribe(client.clone(), config).await?;

        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let value = |p: u32, i: usize| {
            let mut v = format!("{p}:{i}:").into_bytes();
            v.resize(4096, b'x');
            v
        };
        let mut acks = Vec::new();
        for i in 0..PER_PARTITION {
            for p in 0..PARTS {
                acks.push(producer.enqueue("budget", ProducerRecord::new(value(p, i)).partition(p)).await?);
            }
        }
        for ack in acks {
            ack.await?;
        }
        let mut next = vec![0usize; PARTS as usize];
        for _ in 0..PARTS as usize * PER_PARTITION {
            let msg = next_message(&mut consumer, Duration::from_secs(30)).await?;
            let p = msg.partition;
            let i = next[p as usize];
            assert_eq!(msg.value[..], value(p, i)[..], "partition {p} message {i}");
            next[p as usize] += 1;
            msg.ack();
        }
        consumer.close().await;
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}
