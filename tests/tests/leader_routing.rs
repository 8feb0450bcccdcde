//! Clients follow partition leaders (issue 17): a producer given one broker of a three-broker
//! cluster sends each partition's batches to that partition's leader itself, so no broker
//! forwards (`quiver_forwarded_produce_total` stays 0 on every broker, which a raw produce sent
//! to a non-leader shows counting); and when a leader is killed with SIGKILL mid-stream the
//! producer finds the new one and carries on, with every record stored exactly once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use quiver_client::{Acks, Client, DeliveryFuture, Producer, ProducerConfig, ProducerRecord};
use quiver_protocol::batch::BatchBuilder;
use quiver_protocol::message::Message;
use quiver_tests::{bounded, init_tracing, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const FORWARDED: &str = "quiver_forwarded_produce_total";

/// Each partition's leader once every partition of `topic` has one (none of them `dead`).
async fn settled_leaders(
    client: &Client,
    topic: &str,
    dead: Option<u32>,
) -> anyhow::Result<BTreeMap<u32, u32>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(info) = client.admin().describe_topic(topic).await {
            let leaders: BTreeMap<u32, Option<u32>> = info
                .partitions
                .iter()
                .map(|p| (p.partition, p.leader.filter(|&l| Some(l) != dead)))
                .collect();
            if leaders.values().all(Option::is_some) {
                return Ok(leaders.into_iter().map(|(p, l)| (p, l.unwrap_or_default())).collect());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "{topic}: no leader for every partition within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A broker (node index) that does not lead every partition: one broker of three at most
/// leads them all (elections do not always leave each partition with its preferred leader).
fn home_of(leaders: &BTreeMap<u32, u32>) -> usize {
    (0..3).find(|&n| leaders.values().any(|&l| l as usize != n + 1)).unwrap_or(0)
}

/// `quiver_forwarded_produce_total` of each broker that runs, by node index.
async fn forwarded(cluster: &mut Cluster) -> anyhow::Result<BTreeMap<usize, f64>> {
    let mut out = BTreeMap::new();
    for (i, node) in cluster.nodes.iter_mut().enumerate() {
        if node.is_running() {
            out.insert(i, node.metric(FORWARDED).await?);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_given_one_broker_sends_to_each_partition_leader_directly() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let mut cluster = Cluster::start_with_metrics(BIN, dir.path(), 3).await?;
        let admin = cluster.client().await?;
        cluster.create_topic(&admin, "direct", 3, 3).await?;
        let leaders = settled_leaders(&admin, "direct", None).await?;
        let home = home_of(&leaders);
        let elsewhere = leaders.iter().find(|(_, &l)| l as usize != home + 1).map(|(&p, _)| p);
        let elsewhere =
            elsewhere.ok_or_else(|| anyhow::anyhow!("no partition led elsewhere: {leaders:?}"))?;

        // One broker's address and the CA, nothing else.
        let client = cluster.client_of(home).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default().with_acks(Acks::All));
        let mut acks = Vec::new();
        for i in 0..300 {
            acks.push(
                producer.enqueue("direct", ProducerRecord::new(format!("v{i}")).key(format!("k{i}"))).await?,
            );
        }
        let mut per_partition = BTreeMap::<u32, usize>::new();
        for a in acks {
            *per_partition.entry(a.await?.partition).or_default() += 1;
        }
        assert_eq!(per_partition.len(), 3, "keys over every partition: {per_partition:?}");
        let after = forwarded(&mut cluster).await?;
        assert!(
            after.values().all(|&n| n == 0.0),
            "a broker forwarded produce requests: {after:?} (leaders {leaders:?})"
        );
        // Each leader took its partitions' records from the client itself.
        for (node, b) in cluster.nodes.iter().enumerate() {
            let want: usize = leaders
                .iter()
                .filter(|(_, &l)| l as usize == node + 1)
                .map(|(p, _)| per_partition.get(p).copied().unwrap_or(0))
                .sum();
            let got = b.metric("quiver_messages_in_total{topic=\"direct\"}").await?;
            assert_eq!(got, want as f64, "broker {} took {got} records, leads {want}", node + 1);
        }

        // The control: a produce sent to that broker for a partition it does not lead is
        // forwarded, and the counter shows it.
        let mut batch = BatchBuilder::new(64);
        batch.push(1, None, b"forwarded", &[]);
        let raw = Message::Produce {
            topic: "direct".into(),
            partition: elsewhere,
            acks: Acks::All,
            batch: batch.finish(),
        };
        match client.request(&raw).await? {
            Message::ProduceOk { .. } => {}
            other => anyhow::bail!("raw produce answered with kind {}", other.kind()),
        }
        assert_eq!(cluster.nodes[home].metric(FORWARDED).await?, 1.0, "the raw produce was forwarded");

        producer.close().await?;
        client.close().await;
        admin.close().await;
        Ok(())
    })
    .await
}

/// How long a record took from now to its acknowledgement.
async fn acknowledged(f: DeliveryFuture) -> anyhow::Result<Duration> {
    let at = Instant::now();
    f.await?;
    Ok(at.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_stream_is_followed_and_nothing_is_lost_or_doubled() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let mut cluster = Cluster::start_with_metrics(BIN, dir.path(), 3).await?;
        let admin = cluster.client().await?;
        cluster.create_topic(&admin, "kill", 3, 3).await?;
        let before = settled_leaders(&admin, "kill", None).await?;
        // Kill a leader other than the client's only broker (the client's own failover through
        // its broker list is tested in broker_list.rs).
        let home = home_of(&before);
        let victim = before.values().copied().find(|&l| l as usize != home + 1);
        let victim = victim.ok_or_else(|| anyhow::anyhow!("no partition led elsewhere: {before:?}"))?;

        let client = cluster.client_of(home).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default().with_acks(Acks::All));
        let mut sent = Vec::new();
        let mut acks = Vec::new();
        let started = Instant::now();
        let mut killed = None;
        // About 1,000 records a second for 2 s before the kill and 4 s after it, keyed over
        // every partition, acknowledgements awaited at the end.
        let mut i = 0;
        while started.elapsed() < Duration::from_secs(6) {
            if killed.is_none() && started.elapsed() >= Duration::from_secs(2) {
                cluster.nodes[victim as usize - 1].kill9();
                killed = Some(Instant::now());
            }
            for _ in 0..10 {
                let v = format!("v{i}");
                let f = producer.enqueue("kill", ProducerRecord::new(v.clone()).key(format!("k{i}"))).await?;
                acks.push(tokio::spawn(acknowledged(f)));
                sent.push(v);
                i += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let killed = killed.ok_or_else(|| anyhow::anyhow!("never killed"))?;
        let mut slowest = Duration::ZERO;
        for a in acks {
            slowest = slowest.max(a.await??);
        }
        let after = settled_leaders(&admin, "kill", Some(victim)).await?;
        eprintln!(
            "leaders {before:?}; broker {victim} killed {:?} in; after {after:?}; {} records acknowledged, \
             the slowest took {slowest:?}",
            killed - started,
            sent.len()
        );

        // Settled: the producer sends to the new leaders directly, nothing is forwarded.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let forwarded_before = forwarded(&mut cluster).await?;
        for j in 0..300 {
            let v = format!("w{j}");
            producer.send("kill", ProducerRecord::new(v.clone()).key(format!("k{j}"))).await?;
            sent.push(v);
        }
        let forwarded_after = forwarded(&mut cluster).await?;
        assert_eq!(forwarded_after, forwarded_before, "brokers forwarded after the new leaders settled");

        // Every acknowledged record exactly once, read from each surviving broker alone.
        sent.sort();
        for node in (0..3).filter(|&n| n + 1 != victim as usize) {
            let mut got = cluster.read_all_from(node, "kill", sent.len()).await?;
            got.sort();
            assert!(
                got == sent,
                "broker {} serves other data ({} values, {} sent)",
                node + 1,
                got.len(),
                sent.len()
            );
        }
        producer.close().await?;
        client.close().await;
        admin.close().await;
        Ok(())
    })
    .await
}
