//! Group resume and retention, against a broker embedded in the test process (real QUIC on
//! loopback, real files).

use std::time::Duration;

use futures::StreamExt;
use quiver_client::{
    Client, ClientConfig, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
    StartPosition, TopicConfig,
};
use quiver_protocol::ErrorCode;
use quiver_tests::{bounded, embedded, init_tracing, publish};

/// Records in the retention tests: 2,000 of about 110 bytes, numbered in their values.
const RECORDS: u64 = 2000;

fn record(i: u64) -> ProducerRecord {
    ProducerRecord::new(format!("{i:0>100}"))
}

/// A one-partition topic whose retention keeps about 64 KiB in 16 KiB segments, and a
/// producer of small (4 KiB) batches, so a few thousand records make retention delete.
async fn small_retention_topic(client: &Client, topic: &str) -> anyhow::Result<Producer> {
    let config = TopicConfig::default().with_segment_bytes(16 * 1024).with_retention_bytes(Some(64 * 1024));
    client.admin().create_topic(topic, 1, config).await?;
    Ok(Producer::new(client.clone(), ProducerConfig::default().with_max_batch_bytes(4096)))
}

/// Produces `record(i)` for every `i` in `range` and waits for all acknowledgements.
async fn produce_range(producer: &Producer, topic: &str, range: std::ops::Range<u64>) -> anyhow::Result<()> {
    let mut acks = Vec::new();
    for i in range {
        acks.push(producer.enqueue(topic, record(i)).await?);
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

/// Waits (20 s at most) until retention has moved the log start past offset 100 and it has
/// stayed put for half a second (several retention passes, with `retention_check_ms` 100: a pass
/// that ran while the producer was still writing is followed by another); returns it.
async fn log_start_after_retention(client: &Client, topic: &str) -> anyhow::Result<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen: Option<(u64, std::time::Instant)> = None;
    loop {
        let start = client.admin().describe_topic(topic).await?.partitions[0].log_start_offset;
        if start > 100 {
            match seen {
                Some((s, since)) if s == start && since.elapsed() >= Duration::from_millis(500) => {
                    return Ok(start)
                }
                Some((s, _)) if s == start => {}
                _ => seen = Some((start, std::time::Instant::now())),
            }
        }
        assert!(std::time::Instant::now() < deadline, "retention did not settle (log start {start})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads on to the last record: offsets below `log_start` (the delivery read before retention
/// ran) are acknowledged and passed over; from there, records must come in order without a
/// gap. Returns what was read after the skip, as (offset, value).
async fn read_on_after_skip(consumer: &mut Consumer, log_start: u64) -> anyhow::Result<Vec<(u64, String)>> {
    let mut read = Vec::new();
    let mut next = None;
    let mut last = 0;
    while last < RECORDS - 1 {
        let m = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        if m.offset < log_start {
            m.ack();
            continue;
        }
        let want = *next.get_or_insert(m.offset);
        assert_eq!(m.offset, want, "records out of order after the skip");
        next = Some(want + 1);
        last = m.offset;
        read.push((m.offset, String::from_utf8(m.value.to_vec())?));
        m.ack();
    }
    Ok(read)
}

async fn take(consumer: &mut Consumer, n: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        out.push(String::from_utf8(m.value.to_vec())?);
        m.ack();
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_resumes_exactly_where_it_stopped() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        client.admin().create_topic("g", 3, TopicConfig::default()).await?;
        publish(&client, "g", (0..1000).map(|i| i.to_string())).await?;

        let config = || ConsumerConfig::new("g").group("G").start(StartPosition::Earliest);
        let mut first = Consumer::subscribe(client.clone(), config()).await?;
        let a = take(&mut first, 500).await?;
        first.commit().await?;
        first.close().await;

        let mut second = Consumer::subscribe(client.clone(), config()).await?;
        let b = take(&mut second, 500).await?;
        second.commit().await?;
        // Nothing more arrives: the group has consumed everything.
        let extra = tokio::time::timeout(Duration::from_millis(500), second.next()).await;
        assert!(extra.is_err(), "unexpected extra message: {extra:?}");
        second.close().await;

        let mut all: Vec<u64> = a.iter().chain(b.iter()).map(|v| v.parse()).collect::<Result<_, _>>()?;
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>(), "no overlap and no gap");

        // Committed offsets survive a broker restart.
        client.close().await;
        broker.shutdown().await;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        let offsets = client.admin().group_offsets("G", "g").await?;
        let committed: u64 = offsets.iter().map(|p| p.committed.unwrap_or(0)).sum();
        assert_eq!(committed, 1000);
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_segments_and_reports_the_new_start() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |c| c.retention_check_ms = 100).await?;
        let producer = small_retention_topic(&client, "r").await?;
        produce_range(&producer, "r", 0..RECORDS).await?;

        // Wait for retention to catch up with everything written (2000 records of ~110 bytes in
        // 16 KiB segments are ~14 segments, of which 64 KiB, ~5, are kept) and for the reported
        // log start to be the first remaining segment's base offset.
        let segment_bases = || -> anyhow::Result<Vec<u64>> {
            let mut bases: Vec<u64> = std::fs::read_dir(dir.path().join("topics/r/0"))?
                .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
                .collect();
            bases.sort();
            Ok(bases)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let start = loop {
            let bases = segment_bases()?;
            let start = client.admin().describe_topic("r").await?.partitions[0].log_start_offset;
            if bases.len() <= 6 && bases.first() == Some(&start) {
                break start;
            }
            assert!(std::time::Instant::now() < deadline, "segments {bases:?}, log start {start}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(start > 0, "the log start should have moved");

        // Asking for a deleted offset is a clear error naming the earliest valid offset.
        let err =
            Consumer::subscribe(client.clone(), ConsumerConfig::new("r").start(StartPosition::Offset(0)))
                .await
                .err()
                .ok_or_else(|| anyhow::anyhow!("subscribing below the log start should fail"))?;
        assert!(matches!(err, ClientError::Broker { code: ErrorCode::OffsetOutOfRange, .. }), "{err}");
        assert!(err.to_string().contains(&format!("earliest={start}")), "{err}");

        // From earliest, the consumer starts at the new log start.
        let mut c =
            Consumer::subscribe(client.clone(), ConsumerConfig::new("r").start(StartPosition::Earliest))
                .await?;
        let m = c.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        assert_eq!(m.offset, start);
        c.close().await;
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// A consumer that falls behind retention (here: it holds its first delivery unacknowledged
/// while retention deletes what it has not read) goes on from the new log start, as a Kafka
/// consumer resets to the earliest offset, instead of ending with an error; its group commits
/// past the deleted records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_overtaken_by_retention_goes_on_from_the_log_start() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |c| c.retention_check_ms = 100).await?;
        let producer = small_retention_topic(&client, "behind").await?;
        producer.send("behind", record(0)).await?;

        let consumer_config = ConsumerConfig::new("behind")
            .with_window_messages(10)
            .group("slow")
            .start(StartPosition::Earliest);
        let mut consumer = Consumer::subscribe(client.clone(), consumer_config).await?;
        let first = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        assert_eq!(first.offset, 0);

        // With the window full, retention deletes everything the consumer has not read.
        produce_range(&producer, "behind", 1..RECORDS).await?;
        let log_start = log_start_after_retention(&client, "behind").await?;

        // Acknowledged, the consumer goes on: from the log start (or later, if retention ran
        // again), in order, to the end.
        first.ack();
        let read = read_on_after_skip(&mut consumer, log_start).await?;
        for (offset, value) in &read {
            assert_eq!(value, &format!("{offset:0>100}"));
        }
        assert!(read.last().is_some_and(|(o, _)| o + 1 > log_start), "nothing read after the skip");
        consumer.commit().await?;
        let offsets = client.admin().group_offsets("slow", "behind").await?;
        assert_eq!(offsets.first().and_then(|o| o.committed), Some(RECORDS), "{offsets:?}");
        consumer.close().await;
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// The same without a group, across a lost connection: the consumer resumes at its ack floor,
/// which retention deleted meanwhile; it goes on from the log start instead of ending with
/// `OffsetOutOfRange`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_without_group_resumes_after_retention_passed_it() -> anyhow::Result<()> {
    use quiver_tests::proxy::{Mode, UdpProxy};
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |c| c.retention_check_ms = 100).await?;
        let producer = small_retention_topic(&client, "gap").await?;
        producer.send("gap", record(0)).await?;

        let proxy = UdpProxy::start(broker.local_addr()).await?;
        let ca = broker.ca_path().cloned().ok_or_else(|| anyhow::anyhow!("no development CA"))?;
        let mut via_proxy = ClientConfig::new(proxy.addr.to_string(), ca);
        via_proxy.idle_timeout = Duration::from_millis(1000);
        let behind = Client::connect(via_proxy).await?;
        let consumer_config = ConsumerConfig::new("gap").with_window_messages(10);
        let mut consumer =
            Consumer::subscribe(behind.clone(), consumer_config.start(StartPosition::Earliest)).await?;
        let first = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        assert_eq!(first.offset, 0);

        // The consumer's network goes away while retention deletes what it has not read.
        proxy.set(Mode::DropAll);
        produce_range(&producer, "gap", 1..RECORDS).await?;
        let log_start = log_start_after_retention(&client, "gap").await?;
        tokio::time::sleep(Duration::from_millis(1500)).await; // the connection times out
        proxy.set(Mode::Pass);
        first.ack();
        read_on_after_skip(&mut consumer, log_start).await?;
        consumer.close().await;
        behind.close().await;
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_request_streams_are_released() -> anyhow::Result<()> {
    // Each admin request uses a stream of its own; this broker allows 64 open streams per
    // connection, so 500 sequential requests only work if finished streams are closed.
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |c| c.max_streams_per_connection = 64).await?;
        client.admin().create_topic("s", 1, TopicConfig::default()).await?;
        for _ in 0..500 {
            client.admin().describe_topic("s").await?;
        }
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}
