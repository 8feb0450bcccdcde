//! Damaged stored data: a client reading it gets a clear error, never the bad bytes.

use quiver_client::{ClientError, Producer, ProducerConfig, ProducerRecord, TopicConfig};
use quiver_protocol::message::Message;
use quiver_protocol::{BatchHeader, ErrorCode};
use quiver_tests::{bounded, check_damaged_partition, embedded, init_tracing};

/// A flipped bit in a closed segment, which recovery trusts without reading its CRCs: a
/// fetch of the damaged batch fails with `CorruptLog` naming the file; a fetch from before it
/// gets the good batches only; batches after it still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_closed_segment_gives_readers_a_clear_error() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        let config = TopicConfig::default().with_segment_bytes(4096);
        client.admin().create_topic("rot", 1, config).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..40 {
            // One batch per send, about 300 bytes each: several segments.
            producer.send("rot", ProducerRecord::new(format!("{i:0>250}"))).await?;
        }
        client.close().await;
        broker.shutdown().await;

        let first = dir.path().join("topics/rot/0/00000000000000000000.log");
        let mut bytes = std::fs::read(&first)?;
        let len0 = BatchHeader::parse(&bytes)?.total_len();
        bytes[len0 + 100] ^= 0x04; // inside the second batch's records
        std::fs::write(&first, bytes)?;

        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        let fetch = |offset| Message::Fetch { topic: "rot".into(), partition: 0, offset, max_bytes: 1 << 20 };
        match client.request(&fetch(1)).await {
            Err(ClientError::Broker { code: ErrorCode::CorruptLog, message }) => {
                assert!(message.contains("00000000000000000000.log"), "{message}");
            }
            other => anyhow::bail!("expected CorruptLog, got {other:?}"),
        }
        match client.request(&fetch(0)).await? {
            Message::FetchOk { batches, .. } => assert_eq!(batches.len(), len0, "only the good batch"),
            other => anyhow::bail!("expected FetchOk, got kind {}", other.kind()),
        }
        match client.request(&fetch(2)).await? {
            Message::FetchOk { batches, .. } => assert!(!batches.is_empty()),
            other => anyhow::bail!("expected FetchOk, got kind {}", other.kind()),
        }
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// A clean shutdown checkpoints the recovery point at the end of the active segment, so bit
/// rot in its last batch found at the next start is corruption of acknowledged data: not cut,
/// refused with `CorruptLog`, its offsets never handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_rot_in_the_last_batch_after_a_clean_shutdown_is_kept_and_refused() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        client.admin().create_topic("rot", 1, TopicConfig::default()).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..10 {
            producer.send("rot", ProducerRecord::new(format!("{i:0>250}"))).await?;
        }
        client.close().await;
        broker.shutdown().await;

        let seg = dir.path().join("topics/rot/0/00000000000000000000.log");
        let mut bytes = std::fs::read(&seg)?;
        let len = bytes.len();
        let point = std::fs::read(dir.path().join("topics/rot/0/recovery-point"))?;
        assert_eq!(point[16..24], (len as u64).to_le_bytes(), "the checkpoint covers the segment");
        bytes[len - 20] ^= 0x04; // inside the last batch's records
        std::fs::write(&seg, &bytes)?;

        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        assert_eq!(std::fs::metadata(&seg)?.len() as usize, len, "acknowledged bytes were cut");
        check_damaged_partition(&client, "rot", 9, 10).await?;
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}
