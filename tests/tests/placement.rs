//! Placement with fewer replicas than brokers (issue 17, docs/replication.md §2b): four
//! `quiverd` on loopback, a topic whose partitions have three replicas each, placed by
//! rendezvous hashing. Every broker, also one holding no replica of a partition, answers
//! metadata and status for it, takes its produce requests and serves its reads; losing a broker
//! loses nothing acknowledged.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use quiver_client::{
    Acks, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition,
};
use quiver_tests::{bounded, init_tracing, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");
const TOPIC: &str = "spread";
const PARTITIONS: u32 = 6;

/// Publishes `n` values through a client of broker `node` alone, `acks = all`.
async fn publish_via(cluster: &Cluster, node: usize, from: usize, n: usize) -> anyhow::Result<Vec<String>> {
    let client = cluster.client_of(node).await?;
    let producer = Producer::new(client.clone(), ProducerConfig::default().with_acks(Acks::All));
    let mut sent = Vec::new();
    for i in from..from + n {
        let v = format!("b{}-{i}", node + 1);
        producer
            .send(TOPIC, ProducerRecord::new(v.clone()).key(format!("k{i}")))
            .await
            .with_context(|| format!("publishing {v} through broker {}", node + 1))?;
        sent.push(v);
    }
    producer.close().await?;
    client.close().await;
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_on_three_of_four_brokers_serve_through_every_broker() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = tempfile::tempdir()?;
        let mut cluster = Cluster::start(BIN, dir.path(), 4).await?;
        let client = cluster.client().await?;
        cluster.create_topic(&client, TOPIC, PARTITIONS, 3).await?;

        // Placement as the pure function computes it, for every broker alike.
        let ids = [1u64, 2, 3, 4];
        let expected: BTreeMap<u32, Vec<u32>> = (0..PARTITIONS)
            .map(|p| {
                let rs = quiver_broker::placement::replicas(TOPIC, p, &ids, 3);
                (p, rs.into_iter().map(|r| r as u32).collect())
            })
            .collect();
        let mut hosted = BTreeMap::<u32, usize>::new();
        for rs in expected.values() {
            for r in rs {
                *hosted.entry(*r).or_default() += 1;
            }
        }
        assert_eq!(hosted.values().sum::<usize>(), PARTITIONS as usize * 3);
        assert!(hosted.len() == 4, "every broker holds some partition: {hosted:?}");

        // Every broker describes every partition with its replicas and an elected leader among
        // them, also the partitions it holds no replica of (learned from their leaders).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for node in 0..4 {
            loop {
                let mut status = cluster
                    .status_of(node)
                    .await
                    .with_context(|| format!("status of broker {}", node + 1))?;
                // The internal `__offsets` partitions (group state) are listed too.
                status.partitions.retain(|r| r.topic == TOPIC);
                let mut ok = status.partitions.len() == PARTITIONS as usize;
                for r in &status.partitions {
                    assert_eq!(
                        r.replicas,
                        expected[&r.partition],
                        "broker {} on partition {}",
                        node + 1,
                        r.partition
                    );
                    ok &= r.leader.is_some_and(|l| r.replicas.contains(&l));
                }
                if ok {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "broker {} never knew every leader: {status:?}",
                    node + 1
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        // Produce through each broker alone: each holds no replica of some partition.
        let mut sent = Vec::new();
        for node in 0..4 {
            sent.extend(publish_via(&cluster, node, node * 1000, 60).await?);
        }
        sent.sort();
        // Every broker serves everything acknowledged, once, also what it holds no copy of.
        for node in 0..4 {
            let mut got = cluster.read_all_from(node, TOPIC, sent.len()).await?;
            got.sort();
            assert_eq!(got, sent, "broker {} serves other data", node + 1);
        }
        // Metadata from a broker without a replica carries the leader's high watermark.
        let outsider = (1..=4u32).find(|b| !expected[&0].contains(b)).expect("a broker outside partition 0");
        let info = cluster.client_of(outsider as usize - 1).await?.admin().describe_topic(TOPIC).await?;
        let inside =
            cluster.client_of(expected[&0][0] as usize - 1).await?.admin().describe_topic(TOPIC).await?;
        let hw = |i: &quiver_client::TopicInfo| {
            i.partitions.iter().find(|p| p.partition == 0).map(|p| p.high_watermark)
        };
        assert!(hw(&inside).is_some_and(|h| h > 0));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut outside_hw = hw(&info);
        while outside_hw != hw(&inside) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let info = cluster.client_of(outsider as usize - 1).await?.admin().describe_topic(TOPIC).await?;
            outside_hw = hw(&info);
        }
        assert_eq!(outside_hw, hw(&inside), "broker {outsider} holds no replica of partition 0");

        // The CLI against that broker: `cluster status --json` and `topic describe` show every
        // partition with its leader, replicas, in-sync replicas and lag.
        let node = &cluster.nodes[outsider as usize - 1];
        let (mut status_cmd, mut describe_cmd) = (node.cli(CLI), node.cli(CLI));
        status_cmd.args(["cluster", "status", "--json"]);
        describe_cmd.args(["topic", "describe", TOPIC]);
        let (status, described) =
            tokio::task::spawn_blocking(move || (status_cmd.output(), describe_cmd.output())).await?;
        let (status, described) = (status?, described?);
        anyhow::ensure!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        let v: serde_json::Value = serde_json::from_slice(&status.stdout)?;
        let parts: Vec<&serde_json::Value> = v["partitions"]
            .as_array()
            .context("partitions")?
            .iter()
            .filter(|p| p["topic"] == TOPIC)
            .collect();
        assert_eq!(parts.len(), PARTITIONS as usize, "{v}");
        for p in parts {
            let replicas: Vec<u64> =
                p["replicas"].as_array().context("replicas")?.iter().filter_map(|r| r.as_u64()).collect();
            assert_eq!(replicas.len(), 3, "{v}");
            assert!(p["leader"].as_u64().is_some_and(|l| replicas.contains(&l)), "{v}");
            assert!(
                p["in_sync"].as_array().is_some_and(|i| !i.is_empty()),
                "in_sync learned from the leader: {v}"
            );
            assert!(p["lag"].is_u64() && p["commit"].as_u64() > Some(0), "{v}");
        }
        anyhow::ensure!(described.status.success(), "{}", String::from_utf8_lossy(&described.stderr));
        let described = String::from_utf8_lossy(&described.stdout).into_owned();
        let lines: Vec<&str> = described.lines().collect();
        let header: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            header,
            ["partition", "leader", "epoch", "replicas", "in_sync", "lag", "log_start", "high_watermark"]
        );
        assert_eq!(lines.len(), 3 + PARTITIONS as usize, "{described}");
        assert!(lines[3..].iter().all(|l| l.split_whitespace().nth(4) != Some("-")), "{described}");

        // A group consuming through a broker commits every partition's position, also those
        // held elsewhere, and reads them back.
        let via = outsider as usize - 1;
        let gclient = cluster.client_of(via).await?;
        let mut consumer = Consumer::subscribe(
            gclient.clone(),
            ConsumerConfig::new(TOPIC).group("g").start(StartPosition::Earliest),
        )
        .await?;
        let mut seen = 0;
        while seen < sent.len() {
            let m = tokio::time::timeout(Duration::from_secs(20), consumer.next())
                .await
                .map_err(|_| anyhow::anyhow!("the group got {seen} of {}", sent.len()))?
                .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            m.ack();
            seen += 1;
        }
        let report = consumer.commit().await?;
        assert_eq!(report.committed.len(), PARTITIONS as usize, "{report:?}");
        consumer.close().await;
        let offsets = gclient.admin().group_offsets("g", TOPIC).await?;
        let info = gclient.admin().describe_topic(TOPIC).await?;
        for o in &offsets {
            let hw = info.partitions.iter().find(|p| p.partition == o.partition).map(|p| p.high_watermark);
            assert!(
                o.committed.is_some() && o.committed <= hw,
                "partition {}: {o:?} against {hw:?}",
                o.partition
            );
            assert!(o.committed > Some(0) || hw == Some(0), "partition {}: {o:?}", o.partition);
        }
        gclient.close().await;

        // Lose a broker: the partitions it held keep two of three replicas, elect, and go on.
        cluster.nodes[3].kill9();
        // The others count it down within a couple of seconds (its frames stop at once; its
        // links would take their 3 s idle timeout).
        let killed = std::time::Instant::now();
        loop {
            let status = cluster.status_of(0).await?;
            if status.brokers.iter().any(|b| b.id == 4 && !b.up) {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(2), "broker 4 still up: {status:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut more = Vec::new();
        for node in 0..3 {
            more.extend(publish_via(&cluster, node, 10_000 + node * 1000, 30).await?);
        }
        sent.extend(more);
        sent.sort();
        for node in 0..3 {
            let mut got = cluster.read_all_from(node, TOPIC, sent.len()).await?;
            got.sort();
            assert_eq!(got, sent, "broker {} serves other data after broker 4 died", node + 1);
        }
        client.close().await;
        Ok(())
    })
    .await
}

/// A broker that has not applied a topic's create yet (the controller log reaches it a moment
/// later) makes a request for that topic wait for it instead of answering `UnknownTopic`, for a
/// bounded time: a genuinely unknown topic is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_behind_on_a_create_waits_for_it() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let cluster = Cluster::start(BIN, dir.path(), 3).await?;
        let warm = cluster.client().await?; // waits for the brokers to serve
        cluster.create_topic(&warm, "warmup", 1, 3).await?;
        warm.close().await;
        // A broker that does not lead the controller (stopping the leader would stall the
        // create itself): each broker logs its own election.
        let mut controller: Option<(String, usize)> = None;
        for (i, n) in cluster.nodes.iter().enumerate() {
            // Lines start with their RFC 3339 time: the newest election is the greatest.
            let log = n.log();
            if let Some(line) = log.lines().rfind(|l| l.contains("elected controller leader")) {
                if controller.as_ref().is_none_or(|(newest, _)| line > newest.as_str()) {
                    controller = Some((line.to_string(), i));
                }
            }
        }
        let leader =
            controller.map(|(_, i)| i).context("no broker logged its election as controller leader")?;
        let victim = (0..3).find(|&i| i != leader).context("three brokers")?;
        let others: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
        let client = cluster.client_in_order(&others, |c| c).await?;
        let behind = cluster.client_of(victim).await?;
        // The victim is stopped while the others create the topic: the controller's entries
        // wait in its socket and reach it together with the request sent right after it
        // resumes, which may be read first.
        let pid = cluster.nodes[victim].pid().context("victim pid")?.to_string();
        let signal = |sig: &str| std::process::Command::new("kill").args([sig, &pid]).status();
        anyhow::ensure!(signal("-STOP")?.success());
        let created = cluster.create_topic(&client, "late", 2, 3).await;
        anyhow::ensure!(signal("-CONT")?.success());
        created?;
        let info = match behind.admin().describe_topic("late").await {
            Ok(info) => info,
            Err(e) => anyhow::bail!("broker {} refused a topic it was about to learn: {e:#}", victim + 1),
        };
        assert_eq!(info.partitions.len(), 2);
        // A topic nobody created is refused, after the bounded wait.
        let started = std::time::Instant::now();
        let unknown = behind.admin().describe_topic("never-created").await;
        assert!(unknown.is_err(), "{unknown:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        behind.close().await;
        client.close().await;
        Ok(())
    })
    .await
}
