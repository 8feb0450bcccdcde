//! Producer and consumer settings at their edges, against an embedded broker.

use std::time::Duration;

use futures::StreamExt;
use quiver_client::{
    Acks, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition,
    TopicConfig,
};
use quiver_tests::{bounded, embedded, init_tracing};

/// `Duration::MAX` is how a user says "no limit"; it used to overflow `Instant` arithmetic in
/// the sender task, which panicked and left every record's future pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_linger_and_delivery_timeout_work() -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        client.admin().create_topic("unlimited", 1, TopicConfig::default()).await?;
        let config =
            ProducerConfig::default().with_linger(Duration::MAX).with_delivery_timeout(Duration::MAX);
        let producer = Producer::new(client.clone(), config);
        let mut acks = Vec::new();
        for i in 0..3 {
            acks.push(producer.enqueue("unlimited", ProducerRecord::new(format!("{i}"))).await?);
        }
        producer.flush().await?; // the batch waits for its linger, or for this
        for (i, a) in acks.into_iter().enumerate() {
            assert_eq!(a.await?.offset, Some(i as u64));
        }
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// `acks = none` with the default `idempotent = true`: the producer does not number its
/// batches (it could never learn that one failed), and everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_with_default_settings_delivers_everything() -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        client.admin().create_topic("ff", 1, TopicConfig::default()).await?;
        let config = ProducerConfig::default().with_acks(Acks::None).with_max_batch_bytes(4096);
        let producer = Producer::new(client.clone(), config);
        const N: u64 = 2000;
        for i in 0..N {
            producer.enqueue("ff", ProducerRecord::new(format!("{i}"))).await?;
        }
        producer.flush().await?;
        // Nothing is acknowledged; wait until the broker has it all.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while client.admin().describe_topic("ff").await?.partitions[0].high_watermark < N {
            assert!(std::time::Instant::now() < deadline, "not everything arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut consumer =
            Consumer::subscribe(client.clone(), ConsumerConfig::new("ff").start(StartPosition::Earliest))
                .await?;
        for i in 0..N {
            let m = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            assert_eq!((m.offset, std::str::from_utf8(&m.value)?), (i, i.to_string().as_str()));
            m.ack();
        }
        consumer.close().await;
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// `acks = none`, then `flush` and the client closed at once, as `quiver publish --acks none`
/// does once per run: `flush` returns only once the broker has read what was written (the
/// stream finished and read to its end). Before, a record could still sit in QUIC's buffers
/// when the connection closed: a new user lost a third of ten such publishes, exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_then_close_at_once_loses_nothing() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, admin) = embedded(dir.path(), |_| {}).await?;
        admin.admin().create_topic("ff-close", 1, TopicConfig::default()).await?;
        const RUNS: u64 = 20;
        for i in 0..RUNS {
            let client = quiver_tests::client_of(&broker).await?;
            let producer = Producer::new(client.clone(), ProducerConfig::default().with_acks(Acks::None));
            producer.enqueue("ff-close", ProducerRecord::new(format!("{i}"))).await?;
            producer.flush().await?;
            client.close().await;
        }
        let hw = admin.admin().describe_topic("ff-close").await?.partitions[0].high_watermark;
        anyhow::ensure!(hw == RUNS, "{hw} of {RUNS} fire-and-forget records arrived");
        admin.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// A flush after the client closed returns (its batches failed `Closed`) instead of waiting for
/// a sender task that has ended, under every acks setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_after_the_client_closed_returns() -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let dir = tempfile::tempdir()?;
        let (broker, admin) = embedded(dir.path(), |_| {}).await?;
        admin.admin().create_topic("closing", 1, TopicConfig::default()).await?;
        for acks in [Acks::None, Acks::Leader, Acks::All] {
            let client = quiver_tests::client_of(&broker).await?;
            let producer = Producer::new(client.clone(), ProducerConfig::default().with_acks(acks));
            producer.enqueue("closing", ProducerRecord::new("x")).await?;
            producer.flush().await?;
            client.close().await;
            let _ = producer.enqueue("closing", ProducerRecord::new("y")).await;
            tokio::time::timeout(Duration::from_secs(5), producer.flush())
                .await
                .map_err(|_| anyhow::anyhow!("flush after close hung under {acks:?}"))?
                .ok();
        }
        admin.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// Closing the client fails what the producer still holds at once, and later sends too,
/// instead of retrying each batch until its delivery timeout (then idempotent ones forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_client_fails_pending_records_at_once() -> anyhow::Result<()> {
    init_tracing();
    bounded(20, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        client.admin().create_topic("closing", 1, TopicConfig::default()).await?;
        let config = ProducerConfig::default().with_linger(Duration::from_millis(200));
        let producer = Producer::new(client.clone(), config);
        producer.send("closing", ProducerRecord::new("first")).await?;
        let mut pending = Vec::new();
        for i in 0..10 {
            pending.push(producer.enqueue("closing", ProducerRecord::new(format!("{i}"))).await?);
        }
        client.close().await; // before the batch's linger ends
        let started = std::time::Instant::now();
        for p in pending {
            assert!(matches!(p.await, Err(ClientError::Closed)), "a pending record did not fail with Closed");
        }
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        let later = producer.send("closing", ProducerRecord::new("later")).await;
        assert!(matches!(later, Err(ClientError::Closed)), "{later:?}");
        producer.flush().await?;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// A message whose ack deadline passes after the application acknowledged it, but before the
/// acknowledgement reached the broker (acks go out on a tick), comes back from the broker. The
/// consumer does not hand it to the application a second time; it repeats the ack instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_message_redelivered_before_its_ack_arrived_is_not_handed_out_again(
) -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        client.admin().create_topic("late-acks", 1, TopicConfig::default()).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..100 {
            producer.enqueue("late-acks", ProducerRecord::new(format!("{i}"))).await?;
        }
        producer.flush().await?;
        let config = ConsumerConfig::new("late-acks")
            .with_ack_interval(Duration::from_secs(2))
            .with_ack_deadline(Some(Duration::from_millis(200)));
        let mut consumer = Consumer::subscribe(client.clone(), config.start(StartPosition::Earliest)).await?;
        let mut received = Vec::new();
        while received.len() < 100 {
            let m = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            assert_eq!(m.offset, received.len() as u64);
            received.push(m);
        }
        // The session's first ack goes out at once; once it has, the rest wait for the tick.
        received[0].ack();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for m in &received[1..] {
            m.ack();
        }
        // Deadlines (200 ms) pass before those acks go out (2 s tick), and after.
        let again = tokio::time::timeout(Duration::from_millis(3000), consumer.next()).await;
        if let Ok(Some(m)) = again {
            let m = m?;
            anyhow::bail!("offset {} handed out again (delivery {})", m.offset, m.delivery_count);
        }
        consumer.close().await;
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}
