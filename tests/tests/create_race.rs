//! Produces that reach a broker while it applies a topic's create (docs/replication.md §3):
//! the topic is known there a moment before each partition's replica runs. A produce in that
//! moment is refused as retriable (`requests.rs` `produce`), never written outside Raft (a
//! batch written so would be acknowledged, then cut when the replica started and took its
//! leader's log). A review found that window by reading the code; these runs, a producer that
//! knows only broker 3 sending to every partition from before the create until after it, did
//! not land a produce in it on this machine, so the test guards what a user sees around a
//! create as a whole: every acknowledged value is there afterwards.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quiver_client::{Producer, ProducerConfig, ProducerRecord};
use quiver_tests::{bounded, init_tracing, read_partition, test_dir, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const TOPIC: &str = "racing";
const PARTITIONS: u32 = 128;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produces_during_a_create_are_never_written_outside_raft() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = test_dir()?;
        let cluster = Cluster::start(BIN, dir.path(), 3).await?;
        let first = cluster.client().await?; // waits for the cluster to answer
                                             // A producer that knows only broker 3, sending to every partition in turn before the
                                             // topic exists (refused until it does) and while the brokers apply its create.
        let third = cluster.client_of(2).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let sending = {
            let (stop, third) = (stop.clone(), third.clone());
            tokio::spawn(async move {
                let producer = Producer::new(third, ProducerConfig::default());
                let mut acked = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // One value to every partition at once, the last partitions first (a
                    // broker starts the replicas of a create in partition order).
                    let mut round = Vec::new();
                    for p in (0..PARTITIONS).rev() {
                        let value = format!("v{i}");
                        i += 1;
                        if let Ok(ack) =
                            producer.enqueue(TOPIC, ProducerRecord::new(value.clone()).partition(p)).await
                        {
                            round.push((p, value, ack));
                        }
                    }
                    if round.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    for (p, value, ack) in round {
                        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), ack).await {
                            acked.push((p, value));
                        }
                    }
                }
                acked
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.create_topic(&first, TOPIC, PARTITIONS, 3).await?;
        cluster.topic_everywhere(TOPIC, Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        let acked = sending.await?;
        anyhow::ensure!(!acked.is_empty(), "nothing was acknowledged");
        // Every acknowledged value is in its partition, read through broker 1.
        let mut missing = Vec::new();
        for p in 0..PARTITIONS {
            let values: BTreeSet<String> = read_partition(&first, TOPIC, p)
                .await?
                .into_iter()
                .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
                .collect();
            missing.extend(acked.iter().filter(|(q, v)| *q == p && !values.contains(v)).cloned());
        }
        anyhow::ensure!(
            missing.is_empty(),
            "{} of {} acknowledged values are missing, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
        eprintln!("{} values acknowledged during and after the create, all there", acked.len());
        Ok(())
    })
    .await
}
