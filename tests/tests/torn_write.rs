//! Recovery from a damaged tail: truncate the last segment mid-batch, or flip a byte in its
//! last batch; the broker starts, drops only the damaged tail, says so in its log, and serves
//! everything before it.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use quiver_client::{
    Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition, TopicConfig,
};
use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const BATCHES: u64 = 20;
const PER_BATCH: u64 = 50;

/// Writes BATCHES batches of PER_BATCH records to partition 0, one batch per send round.
async fn fill(broker: &BrokerProcess) -> anyhow::Result<()> {
    let client = broker.client().await?;
    client.admin().create_topic("torn", 1, TopicConfig::default()).await?;
    // A long linger, so each round becomes exactly one batch when flushed.
    let config = ProducerConfig { linger: std::time::Duration::from_secs(30), ..Default::default() };
    let producer = Producer::new(client.clone(), config);
    for b in 0..BATCHES {
        let mut acks = Vec::new();
        for i in 0..PER_BATCH {
            acks.push(producer.enqueue("torn", ProducerRecord::new(format!("{b}-{i}"))).await?);
        }
        producer.flush().await?;
        for a in acks {
            a.await?;
        }
    }
    client.close().await;
    Ok(())
}

fn segment(data: &Path) -> anyhow::Result<PathBuf> {
    let dir = data.join("topics").join("torn").join("0");
    let mut logs: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs.pop().ok_or_else(|| anyhow::anyhow!("no segment in {}", dir.display()))
}

/// Byte ranges of the batches in a segment file (Kafka v2: length at bytes 8..12, big-endian).
fn batch_ranges(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 12 <= bytes.len() {
        let len =
            u32::from_be_bytes([bytes[pos + 8], bytes[pos + 9], bytes[pos + 10], bytes[pos + 11]]) as usize;
        out.push((pos, pos + 12 + len));
        pos += 12 + len;
    }
    out
}

async fn read_all(broker: &BrokerProcess) -> anyhow::Result<Vec<String>> {
    let client = broker.client().await?;
    let info = client.admin().describe_topic("torn").await?;
    let hw = info.partitions[0].high_watermark;
    let mut consumer =
        Consumer::subscribe(client.clone(), ConsumerConfig::new("torn").start(StartPosition::Earliest))
            .await?;
    let mut out = Vec::new();
    while (out.len() as u64) < hw {
        let m = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        out.push(String::from_utf8(m.value.to_vec())?);
    }
    Ok(out)
}

async fn damage_and_check(damage: impl FnOnce(&Path, (usize, usize))) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = BrokerProcess::start(BIN, dir.path(), None).await?;
    fill(&broker).await?;
    broker.kill9();

    let seg = segment(dir.path())?;
    let bytes = std::fs::read(&seg)?;
    let ranges = batch_ranges(&bytes);
    assert_eq!(ranges.len() as u64, BATCHES, "one batch per send round");
    let last = *ranges.last().ok_or_else(|| anyhow::anyhow!("empty segment"))?;
    damage(&seg, last);

    broker.restart().await?;
    let log = broker.log();
    assert!(log.contains("truncat"), "the broker should log what it dropped; log:\n{log}");
    let values = read_all(&broker).await?;
    // Everything before the damaged batch, nothing after.
    let expected: Vec<String> =
        (0..BATCHES - 1).flat_map(|b| (0..PER_BATCH).map(move |i| format!("{b}-{i}"))).collect();
    assert_eq!(values, expected);

    // The partition keeps working: a new append lands right after the last good batch.
    let client = broker.client().await?;
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let meta = producer.send("torn", ProducerRecord::new("after")).await?;
    assert_eq!(meta.offset, Some((BATCHES - 1) * PER_BATCH));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_last_batch_is_dropped() -> anyhow::Result<()> {
    init_tracing();
    bounded(
        120,
        damage_and_check(|seg, (start, end)| {
            let f = std::fs::OpenOptions::new().write(true).open(seg).expect("open segment");
            f.set_len(((start + end) / 2) as u64).expect("truncate");
        }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_last_batch_is_dropped() -> anyhow::Result<()> {
    init_tracing();
    bounded(
        120,
        damage_and_check(|seg, (start, end)| {
            let mut bytes = std::fs::read(seg).expect("read segment");
            bytes[(start + end) / 2 + 10] ^= 0x40; // inside the records, covered by the CRC
            std::fs::write(seg, &bytes).expect("write segment");
        }),
    )
    .await
}
