//! Replicated partitions with real processes (issue 17): three `quiverd` on loopback forming a
//! cluster through `--peers`, a topic with three replicas, and the leader of a partition
//! killed with SIGKILL while an idempotent producer with `acks = all` keeps publishing.
//! Nothing acknowledged may be lost or duplicated, every replica must serve the same committed
//! data, and the failover time is printed.

use std::collections::BTreeMap;
use std::time::Instant;

use quiver_client::{Acks, Client, Producer, ProducerConfig, ProducerRecord};
use quiver_tests::{bounded, init_tracing, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

/// Leader of each partition of `topic`, by the cluster's own account.
async fn leaders(client: &Client, topic: &str) -> anyhow::Result<BTreeMap<u32, Option<u32>>> {
    let info = client.admin().describe_topic(topic).await?;
    Ok(info.partitions.iter().map(|p| (p.partition, p.leader)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_under_acks_all_loses_nothing_and_fails_over() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = tempfile::tempdir()?;
        let mut cluster = Cluster::start(BIN, dir.path(), 3).await?;
        let client = cluster.client().await?;
        cluster.create_topic(&client, "r", 3, 3).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default().with_acks(Acks::All));
        let mut sent = Vec::new();
        for i in 0..300 {
            let v = format!("v{i}");
            producer.send("r", ProducerRecord::new(v.clone()).key(format!("k{i}"))).await?;
            sent.push(v);
        }
        let before = leaders(&client, "r").await?;
        // Kill the leader of partition 0 unless it is the broker the client talks to (the
        // client's own failover is tested elsewhere); else partition 1's or 2's.
        let victim = before
            .values()
            .flatten()
            .map(|&l| l as usize)
            .find(|&l| l != 1)
            .ok_or_else(|| anyhow::anyhow!("no partition led by broker 2 or 3: {before:?}"))?;
        cluster.nodes[victim - 1].kill9();
        let killed = Instant::now();
        let mut first_ack = None;
        for i in 300..600 {
            let v = format!("v{i}");
            producer.send("r", ProducerRecord::new(v.clone()).key(format!("k{i}"))).await?;
            first_ack.get_or_insert_with(|| killed.elapsed());
            sent.push(v);
        }
        let after = leaders(&client, "r").await?;
        eprintln!("leaders before {before:?}, after killing broker {victim}: {after:?}; all 300 later sends acknowledged {:?} after the kill, the first after {:?}", killed.elapsed(), first_ack);
        assert!(after.values().all(|l| l.is_some() && *l != Some(victim as u32)), "a partition kept a dead leader: {after:?}");

        // The killed broker comes back and catches up; every broker then serves exactly what
        // was acknowledged, once.
        cluster.nodes[victim - 1].respawn()?;
        sent.sort();
        for node in 0..3 {
            let mut got = cluster.read_all_from(node, "r", sent.len()).await?;
            got.sort();
            assert_eq!(got, sent, "broker {} serves other data", node + 1);
        }

        // The cluster's own view, as `quiver cluster status` shows it.
        let status = client.admin().cluster_status().await?;
        let (brokers, mut partitions) = (status.brokers, status.partitions);
        assert_eq!(brokers.len(), 3);
        // Besides the topic: the 8 partitions of the internal `__offsets` (group state).
        assert_eq!(partitions.iter().filter(|p| p.topic == "__offsets").count(), 8, "{partitions:?}");
        partitions.retain(|p| p.topic == "r");
        assert_eq!(partitions.len(), 3);
        assert!(partitions.iter().all(|p| p.replicas.len() == 3 && p.commit > 0), "{partitions:?}");
        client.close().await;
        Ok(())
    })
    .await
}

/// With `durability = interval` a replica's small appends need no fsync, and its driver handles
/// them on its own task instead of a blocking thread (`replica::in_place`): the same data
/// reaches every replica, a follower killed with SIGKILL and restarted catches up, and
/// everything acknowledged is served once by every broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_handled_in_place_replicate_and_survive_a_follower_kill() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = tempfile::tempdir()?;
        let mut cluster = Cluster::start_with_metrics(BIN, dir.path(), 3).await?;
        let client = cluster.client().await?;
        let config = quiver_client::TopicConfig::default()
            .with_replicas(3)
            .with_durability(quiver_client::Durability::Interval);
        cluster.create_topic_with(&client, "fast", 1, config).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default().with_acks(Acks::All));
        let mut sent = Vec::new();
        for i in 0..400 {
            let v = format!("f{i}");
            producer.send("fast", ProducerRecord::new(v.clone())).await?;
            sent.push(v);
        }
        let mut in_place = 0.0;
        for node in &cluster.nodes {
            in_place += node.metric("quiver_raft_readies_in_place_total").await?;
        }
        assert!(in_place >= 400.0, "Readies handled in place: {in_place}");
        let leader = leaders(&client, "fast").await?[&0].ok_or_else(|| anyhow::anyhow!("no leader"))?;
        let follower = (1..=3).find(|&b| b != leader as usize).unwrap_or(1);
        cluster.nodes[follower - 1].kill9();
        for i in 400..800 {
            let v = format!("f{i}");
            producer.send("fast", ProducerRecord::new(v.clone())).await?;
            sent.push(v);
        }
        cluster.nodes[follower - 1].respawn()?;
        for node in 0..3 {
            let got = cluster.read_all_from(node, "fast", sent.len()).await?;
            assert_eq!(got, sent, "broker {} serves other data", node + 1);
        }
        client.close().await;
        Ok(())
    })
    .await
}

/// A topic deleted and created again under its name keeps what the new topic acknowledged when
/// every broker restarts: each broker replays the controller log (create, delete, create) at
/// start, and the first create and the delete must apply to nothing, not to the new topic's
/// files (they once wiped them: the log then read as empty on every replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_survives_a_restart_of_every_broker() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let mut cluster = Cluster::start(BIN, dir.path(), 3).await?;
        let client = cluster.client().await?;
        let send = |producer: Producer, from: usize, n: usize| async move {
            let mut sent = Vec::new();
            for i in from..from + n {
                let v = format!("v{i}");
                producer.send("again", ProducerRecord::new(v.clone())).await?;
                sent.push(v);
            }
            anyhow::Ok(sent)
        };
        cluster.create_topic(&client, "again", 1, 3).await?;
        send(Producer::new(client.clone(), ProducerConfig::default()), 0, 10).await?;
        client.admin().delete_topic("again").await?;
        cluster.create_topic(&client, "again", 1, 3).await?;
        let sent = send(Producer::new(client.clone(), ProducerConfig::default()), 100, 50).await?;
        client.close().await;
        // All down, then all up: no broker can fetch back from a peer what its own replay
        // would have wiped.
        for node in &mut cluster.nodes {
            node.terminate().await?;
        }
        for node in &mut cluster.nodes {
            node.respawn()?;
        }
        cluster.topic_everywhere("again", std::time::Duration::from_secs(20)).await?;
        for node in 0..3 {
            let got = cluster.read_all_from(node, "again", sent.len()).await?;
            assert_eq!(got, sent, "broker {} after the restarts", node + 1);
        }
        Ok(())
    })
    .await
}
