//! Idempotent producer: batches in flight when the broker dies are sent again after it
//! restarts, and each message is stored exactly once.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use quiver_client::{
    Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition, TopicConfig,
};
use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

/// Sends `n` messages while the broker is SIGKILLed and restarted mid-stream; returns how
/// many times each message index was stored.
async fn produce_through_a_crash(idempotent: bool, n: u64) -> anyhow::Result<HashMap<u64, u32>> {
    let dir = tempfile::tempdir()?;
    let mut broker = BrokerProcess::start(BIN, dir.path(), None).await?;
    let client = broker.client().await?;
    client.admin().create_topic("idem", 2, TopicConfig::default()).await?;
    let config = ProducerConfig { idempotent, max_batch_bytes: 16 * 1024, ..Default::default() };
    let producer = Producer::new(client.clone(), config);
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(producer.enqueue("idem", ProducerRecord::new(format!("{i}"))).await?);
        if i == n / 3 {
            // Let some batches be written but not yet acknowledged, then kill.
            tokio::time::sleep(Duration::from_millis(2)).await;
            broker.kill9();
            broker.restart().await?;
        }
    }
    for a in acks {
        a.await?;
    }
    let client = broker.client().await?;
    let mut consumer =
        Consumer::subscribe(client.clone(), ConsumerConfig::new("idem").start(StartPosition::Earliest))
            .await?;
    let total: u64 =
        client.admin().describe_topic("idem").await?.partitions.iter().map(|p| p.high_watermark).sum();
    let mut counts: HashMap<u64, u32> = HashMap::new();
    for _ in 0..total {
        let m = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        *counts.entry(std::str::from_utf8(&m.value)?.parse()?).or_default() += 1;
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_batches_are_written_exactly_once() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        const N: u64 = 30_000;
        let counts = produce_through_a_crash(true, N).await?;
        let missing: Vec<u64> = (0..N).filter(|i| !counts.contains_key(i)).collect();
        let dups: Vec<(&u64, &u32)> = counts.iter().filter(|(_, c)| **c > 1).collect();
        assert!(missing.is_empty(), "{} acknowledged messages missing", missing.len());
        assert!(dups.is_empty(), "{} messages stored more than once, e.g. {:?}", dups.len(), dups.first());
        Ok(())
    })
    .await
}

/// The same crash without idempotence shows what the test guards against: retried batches
/// that had been written are stored twice. Run with `--ignored` to see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "demonstrates the failure mode; not a regression test"]
async fn without_idempotence_retries_duplicate() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let counts = produce_through_a_crash(false, 30_000).await?;
        let dups = counts.values().filter(|c| **c > 1).count();
        eprintln!("without idempotence: {dups} messages stored more than once");
        assert!(dups > 0, "expected duplicates from retried batches");
        Ok(())
    })
    .await
}
