//! Replica repair from a snapshot with real processes (docs/replication.md §2a): a follower is
//! killed with SIGKILL, the leader writes on until retention deletes the segments the follower
//! would need, the follower comes back and catches up from a snapshot of the leader's log start
//! plus appends. It then serves exactly what the leader serves, at the same offsets.

use std::time::{Duration, Instant};

use quiver_client::{Acks, Producer, ProducerConfig, ProducerRecord, TopicConfig};
use quiver_tests::{bounded, init_tracing, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

/// (offset, value) of every message broker `node` serves of `topic` from its log start, up to
/// and including the one whose value starts with `last`.
async fn served(
    cluster: &Cluster,
    node: usize,
    topic: &str,
    last: &str,
) -> anyhow::Result<Vec<(u64, String)>> {
    use futures::StreamExt;
    use quiver_client::{Consumer, ConsumerConfig, StartPosition};
    let client = cluster.client_of(node).await?;
    let mut consumer =
        Consumer::subscribe(client.clone(), ConsumerConfig::new(topic).start(StartPosition::Earliest))
            .await?;
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .map_err(|_| anyhow::anyhow!("broker {} served {} messages, then nothing", node + 1, out.len()))?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        m.ack();
        let value = String::from_utf8(m.value.to_vec())?;
        let done = value.starts_with(last);
        out.push((m.offset, value));
        if done {
            break;
        }
    }
    consumer.close().await;
    client.close().await;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_leaders_log_start_catches_up_from_a_snapshot() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("fast-retention.toml");
        std::fs::write(&config, "retention_check_ms = 200\n")?;
        let args = ["--config".to_string(), config.display().to_string()];
        let mut cluster = Cluster::start_with_args(BIN, dir.path(), 3, &args).await?;
        let client = cluster.client().await?;
        let topic_config = TopicConfig::default()
            .with_replicas(3)
            .with_segment_bytes(16 * 1024)
            .with_retention_bytes(Some(64 * 1024));
        cluster.create_topic_with(&client, "short", 1, topic_config).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default().with_acks(Acks::All));
        let value = |i: usize| format!("{i:06}-{}", "x".repeat(500));
        for i in 0..50 {
            producer.send("short", ProducerRecord::new(value(i))).await?;
        }
        let leader = client.admin().describe_topic("short").await?.partitions[0]
            .leader
            .ok_or_else(|| anyhow::anyhow!("no leader"))?;
        let follower = (1..=3u32).find(|&b| b != leader).unwrap_or(1) as usize - 1;
        cluster.nodes[follower].kill9();
        // Far past the retention: the leader's log start moves beyond what the follower has.
        for i in 50..1500 {
            producer.send("short", ProducerRecord::new(value(i))).await?;
        }
        let leader_node = leader as usize - 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = cluster.client_of(leader_node).await?.admin().describe_topic("short").await?;
            if info.partitions[0].log_start_offset > 200 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "retention never moved the log start: {info:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster.nodes[follower].respawn()?;
        // More after its return, so it must also take appends past the snapshot.
        for i in 1500..1600 {
            producer.send("short", ProducerRecord::new(value(i))).await?;
        }
        let want = served(&cluster, leader_node, "short", "001599").await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = served(&cluster, follower, "short", "001599").await;
            match got {
                // The follower may have retained a little less (its own retention ran later).
                Ok(got) if !got.is_empty() && want.ends_with(&got) && got.len() * 2 >= want.len() => break,
                other if Instant::now() > deadline => {
                    anyhow::bail!(
                        "the follower never caught up: {:?}",
                        other.map(|g| (g.first().cloned(), g.len()))
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        let log = cluster.nodes[follower].log();
        assert!(
            log.contains("installed a snapshot from the leader"),
            "the follower caught up without a snapshot?"
        );
        client.close().await;
        Ok(())
    })
    .await
}
