//! Reading history from disk: with the tail cache off, every delivery is a segment read, and a
//! subscription reads the next delivery while it sends the current one (subscription.rs,
//! `ReadAhead`). Records of mixed sizes, several segments, a small delivery window and both
//! write paths; every record must arrive once, in order, intact.

use futures::StreamExt;
use quiver_client::{
    Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition, TopicConfig,
};
use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_deliver_every_record_in_order() -> anyhow::Result<()> {
    read_history("tail_cache_bytes_per_partition = 0").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_deliver_every_record_in_order_with_direct_writes() -> anyhow::Result<()> {
    read_history("tail_cache_bytes_per_partition = 0\ndirect_writes = true").await
}

/// The value of record `i`: its index, then filler of a size that varies with `i` (1..5,000
/// bytes), so batches and deliveries end at uneven places.
fn value(i: u64) -> String {
    let len = (i.wrapping_mul(2_654_435_761) % 5_000 + 1) as usize;
    let fill = char::from(b'a' + (i % 26) as u8);
    format!("{i}:{}", fill.to_string().repeat(len))
}

async fn read_history(config: &str) -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BIN, dir.path(), Some(config)).await?;
        let client = broker.client().await?;
        // Small segments: deliveries cross segment ends.
        let topic = TopicConfig::default().with_segment_bytes(4 * 1024 * 1024);
        client.admin().create_topic("history", 1, topic).await?;

        let n = 12_000u64; // about 30 MB
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let mut acks = Vec::with_capacity(n as usize);
        for i in 0..n {
            acks.push(producer.enqueue("history", ProducerRecord::new(value(i))).await?);
        }
        for a in acks {
            a.await?;
        }

        // The default window, then one of 300 KiB: a delivery that does not fit what the
        // window has left is read again rather than sent over the limit.
        for window_bytes in [None, Some(300 * 1024)] {
            let mut config = ConsumerConfig::new("history").start(StartPosition::Earliest);
            if let Some(w) = window_bytes {
                config.window_bytes = w;
            }
            let mut consumer = Consumer::subscribe(client.clone(), config).await?;
            for i in 0..n {
                let msg = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended at {i}"))??;
                anyhow::ensure!(
                    msg.offset == i,
                    "expected offset {i}, got {} (window {window_bytes:?})",
                    msg.offset
                );
                anyhow::ensure!(msg.value == value(i).as_bytes(), "offset {i} holds the wrong bytes");
                msg.ack();
            }
            consumer.close().await;
        }
        Ok(())
    })
    .await
}
