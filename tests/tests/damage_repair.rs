//! A replica whose log holds a damaged batch with valid data after it (a flipped bit below the
//! recovery point: corruption, not a torn write) repairs itself from its peers (issue 18,
//! docs/replication.md §7): it cuts its log at the damaged batch when it starts, does not vote
//! until its log passes what it held, fetches the rest from the leader, and then serves the
//! same records at the same offsets as the leader. On one node the same damage is kept in
//! place and reads of it fail (design.md §5.3): nobody else holds the data.

use std::time::Duration;

use quiver_client::{Acks, Producer, ProducerConfig, ProducerRecord};
use quiver_tests::faults::nemesis::flip_a_byte;
use quiver_tests::{bounded, init_tracing, read_partition, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const TOPIC: &str = "mend";
const SETTLE: Duration = Duration::from_secs(30);

/// Publishes `rounds` batches of 10 records each (one flush per round, so each round is its own
/// batch in the log), values `<tag>-<n>`.
async fn publish(producer: &Producer, tag: &str, rounds: usize) -> anyhow::Result<()> {
    for r in 0..rounds {
        let mut acks = Vec::new();
        for i in 0..10 {
            let value = format!("{tag}-{}", r * 10 + i);
            acks.push(producer.enqueue(TOPIC, ProducerRecord::new(value).partition(0)).await?);
        }
        producer.flush().await?;
        for a in acks {
            a.await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_damaged_batch_refetches_it_from_its_peers() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let mut cluster = Cluster::start(BIN, dir.path(), 3).await?;
        let client = cluster.client().await?;
        cluster.create_topic(&client, TOPIC, 1, 3).await?;
        let producer = Producer::new(
            client.clone(),
            ProducerConfig::default().with_acks(Acks::All).with_linger(Duration::ZERO),
        );
        publish(&producer, "before", 20).await?;
        let leader = cluster.agreed_leader(&[0, 1, 2], TOPIC, 0, SETTLE).await?;
        let li = cluster.index_of(leader);
        let victim = (li + 1) % 3;
        let hw = cluster.settled_high_watermark(TOPIC, 0, SETTLE).await?;
        // 20 batches of records after the leader's control batch.
        anyhow::ensure!(hw == 201, "expected 201 offsets, the high watermark is {hw}");

        // A clean stop writes the recovery point at the log's end: damage below it is
        // corruption, which recovery keeps in place rather than cutting.
        cluster.nodes[victim].terminate().await?;
        let partition_dir = cluster.nodes[victim].data_dir.join("topics").join(TOPIC).join("0");
        // The 6th batch of the log (of at least 21): valid batches follow it.
        let what = flip_a_byte(&partition_dir, false, 5 << 16)?;
        tracing::info!("{what}");

        publish(&producer, "while-down", 5).await?;
        cluster.nodes[victim].restart().await?;
        publish(&producer, "after", 5).await?;

        let leader_now = cluster.agreed_leader(&[li], TOPIC, 0, SETTLE).await?;
        let expected = read_partition(&cluster.client_of(li).await?, TOPIC, 0).await?;
        anyhow::ensure!(expected.len() == 300, "the leader serves {} records, not 300", expected.len());
        let commit = cluster.partition_of(li, TOPIC, 0).await?.commit;
        cluster.caught_up(victim, leader_now, TOPIC, 0, commit, SETTLE).await?;
        let log = cluster.nodes[victim].log();
        anyhow::ensure!(
            log.contains("cut the log at a damaged batch"),
            "broker {} did not cut its log at the damage:\n{log}",
            victim + 1
        );
        // Its own replica, read from it alone: the leader's records at the leader's offsets.
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let served = read_partition(&cluster.client_of(victim).await?, TOPIC, 0).await;
            match served {
                Ok(s) if s == expected => break,
                other if tokio::time::Instant::now() > deadline => {
                    let summary = other.map(|s| format!("{} records", s.len()));
                    anyhow::bail!("broker {} does not serve the leader's records: {summary:?}", victim + 1)
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        anyhow::ensure!(
            log.contains("voting resumes") || cluster.nodes[victim].log().contains("voting resumes"),
            "broker {} never left the repairing state",
            victim + 1
        );
        Ok(())
    })
    .await
}
