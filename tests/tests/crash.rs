//! Nothing acknowledged is lost: SIGKILL the broker process after acknowledgements, restart
//! it, and read everything back.

use std::collections::HashMap;

use futures::StreamExt;
use quiver_client::{
    Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition, TopicConfig,
};
use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() -> anyhow::Result<()> {
    survive_sigkill(None, 100_000, 0).await
}

/// The same with `direct_writes`: batches of about 1 MiB go to the disk with `O_DIRECT`, small
/// ones through the page cache, and the last block of each segment is padded (storage/direct.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_with_direct_writes() -> anyhow::Result<()> {
    survive_sigkill(Some("direct_writes = true"), 20_000, 1000).await
}

/// Publishes `n` acknowledged messages (`pad` extra bytes each), kills the broker with SIGKILL,
/// restarts it and reads every one back where it was acknowledged.
async fn survive_sigkill(config: Option<&str>, n: u64, pad: usize) -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BIN, dir.path(), config).await?;
        let client = broker.client().await?;
        client.admin().create_topic("crash", 4, TopicConfig::default()).await?;

        let padding = "p".repeat(pad);
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let mut acks = Vec::with_capacity(n as usize);
        for i in 0..n {
            let record = ProducerRecord::new(format!("m-{i}-{padding}")).key(format!("k-{}", i % 97));
            acks.push(producer.enqueue("crash", record).await?);
        }
        // (partition, offset) -> message index, for every acknowledged message.
        let mut acked: HashMap<(u32, u64), u64> = HashMap::new();
        for (i, a) in acks.into_iter().enumerate() {
            let meta = a.await?;
            let offset = meta.offset.ok_or_else(|| anyhow::anyhow!("no offset under acks=leader"))?;
            anyhow::ensure!(acked.insert((meta.partition, offset), i as u64).is_none(), "offset given twice");
        }
        assert_eq!(acked.len() as u64, n);

        // No graceful anything: the process dies with whatever is in flight.
        broker.kill9();
        broker.restart().await?;
        // Block padding left by direct writes is not damage.
        anyhow::ensure!(
            !broker.log().contains("truncating a damaged tail"),
            "recovery cut acknowledged data"
        );

        let client = broker.client().await?;
        let mut consumer =
            Consumer::subscribe(client.clone(), ConsumerConfig::new("crash").start(StartPosition::Earliest))
                .await?;
        let mut seen: HashMap<(u32, u64), u64> = HashMap::new();
        let mut last_offset: HashMap<u32, u64> = HashMap::new();
        while (seen.len() as u64) < n {
            let msg = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            // In order within each partition, no duplicates.
            if let Some(prev) = last_offset.insert(msg.partition, msg.offset) {
                anyhow::ensure!(
                    msg.offset == prev + 1,
                    "partition {} went {prev} -> {}",
                    msg.partition,
                    msg.offset
                );
            }
            let value = std::str::from_utf8(&msg.value)?;
            let index: u64 =
                value.trim_start_matches("m-").trim_end_matches('p').trim_end_matches('-').parse()?;
            anyhow::ensure!(seen.insert((msg.partition, msg.offset), index).is_none(), "duplicate");
        }
        for (pos, index) in &acked {
            anyhow::ensure!(
                seen.get(pos) == Some(index),
                "acknowledged message {index} at {pos:?} is missing or moved"
            );
        }
        // Within a partition, offset order is send order (pipelined batches append in order).
        let mut by_partition: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        for ((p, o), i) in &seen {
            by_partition.entry(*p).or_default().push((*o, *i));
        }
        for (p, mut v) in by_partition {
            v.sort();
            anyhow::ensure!(v.windows(2).all(|w| w[0].1 < w[1].1), "partition {p} is out of send order");
        }
        Ok(())
    })
    .await
}
