//! Recovery from a damaged tail: truncate the last segment mid-batch, or flip a byte in its
//! last batch. Without a recovery point covering it (a power loss before any was
//! checkpointed), the broker starts, drops only the damaged tail, says so in its log, keeps the
//! cut bytes in `quarantine/`, and serves everything before it. Once the periodic checkpoint
//! covers the batch, the same damage is corruption of acknowledged data: kept and refused.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use quiver_client::{
    Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition, TopicConfig,
};
use quiver_tests::{bounded, check_damaged_partition, init_tracing, BrokerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const BATCHES: u64 = 20;
const PER_BATCH: u64 = 50;

/// Writes BATCHES batches of PER_BATCH records to partition 0, one batch per send round.
async fn fill(broker: &BrokerProcess) -> anyhow::Result<()> {
    let client = broker.client().await?;
    client.admin().create_topic("torn", 1, TopicConfig::default()).await?;
    // A long linger, so each round becomes exactly one batch when flushed.
    let config = ProducerConfig::default().with_linger(std::time::Duration::from_secs(30));
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
    // As if the power failed before any recovery point was checkpointed: the whole last
    // segment counts as possibly torn.
    let point = seg.with_file_name("recovery-point");
    if point.exists() {
        std::fs::remove_file(&point)?;
    }

    broker.restart().await?;
    let log = broker.log();
    assert!(log.contains("truncat"), "the broker should log what it dropped; log:\n{log}");
    let quarantine = seg.with_file_name("quarantine");
    assert_eq!(std::fs::read_dir(&quarantine)?.count(), 1, "the cut bytes are kept aside");
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

/// The recovery point `<partition>/recovery-point` says: (segment base, byte position).
fn recovery_point(seg: &Path) -> Option<(u64, u64)> {
    let b = std::fs::read(seg.with_file_name("recovery-point")).ok()?;
    let u64_at = |at: usize| b.get(at..at + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
    Some((u64_at(8)?, u64_at(16)?))
}

/// Acknowledged batches (durability `always`) are checkpointed by the maintenance loop; after a
/// SIGKILL, a flipped byte in the last of them is corruption: nothing is cut, reads of that
/// batch fail with `CorruptLog`, everything else reads, and new appends get new offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_below_the_recovery_point_is_kept_and_refused() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BIN, dir.path(), Some("recovery_point_ms = 100")).await?;
        fill(&broker).await?;
        let seg = segment(dir.path())?;
        let len = std::fs::metadata(&seg)?.len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while recovery_point(&seg).map(|p| p.1) != Some(len) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "no checkpoint of {len} bytes");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        broker.kill9();
        let mut bytes = std::fs::read(&seg)?;
        let (start, end) = *batch_ranges(&bytes).last().ok_or_else(|| anyhow::anyhow!("empty"))?;
        bytes[(start + end) / 2 + 10] ^= 0x40;
        std::fs::write(&seg, &bytes)?;

        broker.restart().await?;
        assert_eq!(std::fs::metadata(&seg)?.len(), len, "acknowledged bytes were cut");
        let client = broker.client().await?;
        let last = (BATCHES - 1) * PER_BATCH;
        check_damaged_partition(&client, "torn", last + 1, BATCHES * PER_BATCH).await?;
        Ok(())
    })
    .await
}
