//! Replicated consumer-group state (issue 18 item 1, docs/replication.md §10) with real
//! processes: three `quiverd`, one group whose members talk to different brokers, and the
//! group's coordinator (the leader of its `__offsets` partition) killed with SIGKILL.
//!
//! - Members given different brokers are one group (the brokers forward to the coordinator):
//!   each value goes to one of them.
//! - After the coordinator's kill the group resumes from its committed offsets at the new
//!   coordinator: no offset below a confirmed commit is delivered again, and every value at or
//!   above it is delivered.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use quiver_client::{
    Client, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition,
};
use quiver_tests::{bounded, init_tracing, test_dir, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const TOPIC: &str = "orders";
const GROUP: &str = "billing";
const PARTITIONS: u32 = 3;
const VALUES: usize = 300;

/// The broker id coordinating `group`: the leader of its offsets partition, as broker `i` sees it.
async fn coordinator(cluster: &Cluster, i: usize, group: &str) -> anyhow::Result<u32> {
    let k = crc32c::crc32c(group.as_bytes()) % 8;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(status) = cluster.status_of(i).await {
            let leader = status
                .partitions
                .iter()
                .find(|p| p.topic == "__offsets" && p.partition == k)
                .and_then(|p| p.leader);
            if let Some(l) = leader {
                return Ok(l);
            }
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no leader of __offsets/{k}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads `n` messages of the group through `client`, acking each; returns (partition, offset).
async fn consume(client: &Client, n: usize) -> anyhow::Result<(Consumer, Vec<(u32, u64)>)> {
    let config = ConsumerConfig::new(TOPIC).group(GROUP).start(StartPosition::Earliest);
    let mut consumer = Consumer::subscribe(client.clone(), config).await?;
    let mut got = Vec::new();
    while got.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .map_err(|_| anyhow::anyhow!("no message within 20 s after {} of {n}", got.len()))?
            .ok_or_else(|| anyhow::anyhow!("the consumer ended"))??;
        m.ack();
        got.push((m.partition, m.offset));
    }
    Ok((consumer, got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_spans_brokers_and_survives_its_coordinators_kill() -> anyhow::Result<()> {
    init_tracing();
    bounded(150, async {
        let dir = test_dir()?;
        let (mut cluster, admin) = Cluster::start_with_topic(BIN, dir.path(), 3, TOPIC, PARTITIONS, 3).await?;
        let producer = Producer::new(admin.clone(), ProducerConfig::default());
        let mut acks = Vec::with_capacity(VALUES);
        for i in 0..VALUES {
            let record = ProducerRecord::new(format!("v{i}")).partition((i as u32) % PARTITIONS);
            acks.push(producer.enqueue(TOPIC, record).await?);
        }
        for ack in acks {
            ack.await?;
        }

        let coord = coordinator(&cluster, 0, GROUP).await?;
        let others: Vec<usize> = (0..3).filter(|&i| i != cluster.index_of(coord)).collect();
        eprintln!("group {GROUP} is coordinated by broker {coord}");

        // Two members, each talking to a broker that is not the coordinator: one group, so no
        // offset goes to both.
        let (a_client, b_client) = (cluster.client_of(others[0]).await?, cluster.client_of(others[1]).await?);
        let (a, a_got) = consume(&a_client, 60).await?;
        let (b, b_got) = consume(&b_client, 30).await?;
        let a_set: BTreeSet<_> = a_got.iter().collect();
        let shared: Vec<_> = b_got.iter().filter(|x| a_set.contains(x)).collect();
        // A rebalance hands A's partitions over at B's join: what A had not committed may come
        // again to B, but only above A's commits. Commit both, then check against the commits.
        let (a_report, b_report) = (a.commit().await?, b.commit().await?);
        eprintln!("A read {} and committed {:?}; B read {} ({} also read by A) and committed {:?}",
            a_got.len(), a_report.committed, b_got.len(), shared.len(), b_report.committed);
        a.close().await;
        b.close().await;
        let committed: BTreeMap<u32, u64> = admin
            .admin()
            .group_offsets(GROUP, TOPIC)
            .await?
            .into_iter()
            .filter_map(|o| Some((o.partition, o.committed?)))
            .collect();
        anyhow::ensure!(committed.values().sum::<u64>() >= 30, "too little committed: {committed:?}");
        eprintln!("committed before the kill: {committed:?}");

        // Kill the coordinator; the group goes on at another broker from what it committed.
        let victim = cluster.index_of(coord);
        cluster.nodes[victim].kill9();
        let c_client = cluster.client_of(others[0]).await?;
        let rest: usize = (0..PARTITIONS).map(|p| {
            let total = (0..VALUES).filter(|i| (*i as u32) % PARTITIONS == p).count() as u64;
            (total - committed.get(&p).copied().unwrap_or(0)) as usize
        }).sum();
        let (c, c_got) = consume(&c_client, rest).await?;
        let again: Vec<_> = c_got.iter().filter(|(p, o)| *o < committed.get(p).copied().unwrap_or(0)).collect();
        anyhow::ensure!(again.is_empty(), "offsets below a confirmed commit delivered again: {again:?}");
        let distinct: BTreeSet<_> = c_got.iter().collect();
        anyhow::ensure!(distinct.len() == rest, "{} distinct of the {rest} uncommitted values", distinct.len());
        let new_coord = coordinator(&cluster, others[0], GROUP).await?;
        anyhow::ensure!(new_coord != coord, "the coordinator did not move");
        eprintln!("after the kill, broker {new_coord} coordinates; the group read the {rest} values above its commits, none below");
        c.close().await;
        for c in [a_client, b_client, c_client, admin] {
            c.close().await;
        }
        Ok(())
    })
    .await
}

/// Membership survives the coordinator (docs/replication.md §10, invariant 4): two members
/// settle on two partitions each, the coordinator is SIGKILLed, and the next coordinator
/// continues the group from its membership record: same generation, same member ids, same
/// partitions, no rebalance (neither member sees a revocation), and both go on reading what is
/// produced after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_keep_their_ids_and_partitions_across_the_coordinators_kill() -> anyhow::Result<()> {
    init_tracing();
    bounded(150, async {
        const TOPIC: &str = "tasks";
        const GROUP: &str = "workers";
        let dir = test_dir()?;
        let (mut cluster, admin) = Cluster::start_with_topic(BIN, dir.path(), 3, TOPIC, 4, 3).await?;
        let coord = coordinator(&cluster, 0, GROUP).await?;
        let others: Vec<usize> = (0..3).filter(|&i| i != cluster.index_of(coord)).collect();
        eprintln!("group {GROUP} is coordinated by broker {coord}");

        let subscribe = |client: Client| async move {
            let mut config = ConsumerConfig::new(TOPIC).group(GROUP).start(StartPosition::Earliest);
            config.session_timeout = Duration::from_secs(10);
            anyhow::Ok(Consumer::subscribe(client, config).await?)
        };
        let (a_client, b_client) = (cluster.client_of(others[0]).await?, cluster.client_of(others[1]).await?);
        let mut a = subscribe(a_client.clone()).await?;
        let mut b = subscribe(b_client.clone()).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while a.assignment().len() != 2 || b.assignment().len() != 2 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no even split: {:?} {:?}",
                a.assignment(),
                b.assignment()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (mut a_events, mut b_events) = (a.events().expect("events"), b.events().expect("events"));
        // What the first rebalance said (A gave B two partitions) is not what this test is about.
        for events in [&mut a_events, &mut b_events] {
            while events.try_recv().is_ok() {}
        }
        let before = admin.admin().describe_group(GROUP).await?;
        eprintln!("before the kill: generation {} members {:?}", before.generation, before.members);
        anyhow::ensure!(before.members.len() == 2, "{before:?}");

        let victim = cluster.index_of(coord);
        cluster.nodes[victim].kill9();
        let survivor = cluster.client_of(others[0]).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let after = loop {
            match survivor.admin().describe_group(GROUP).await {
                Ok(d) => break d,
                Err(e) => {
                    anyhow::ensure!(tokio::time::Instant::now() < deadline, "no coordinator answered: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        eprintln!("after the kill: generation {} members {:?}", after.generation, after.members);
        let ids = |d: &quiver_client::GroupDescription| {
            let mut m: Vec<_> =
                d.members.iter().map(|m| (m.member_id.clone(), m.partitions.clone())).collect();
            m.sort();
            m
        };
        anyhow::ensure!(
            after.generation == before.generation && ids(&after) == ids(&before),
            "the group changed across the kill: {before:?} -> {after:?}"
        );

        // Both members go on reading: every value produced now reaches one of them.
        let producer = Producer::new(survivor.clone(), ProducerConfig::default());
        for i in 0..40u32 {
            producer.send(TOPIC, ProducerRecord::new(format!("after-{i}")).partition(i % 4)).await?;
        }
        let mut seen = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        while seen.len() < 40 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "only {} of 40 values after the kill",
                seen.len()
            );
            let m = tokio::select! {
                Some(m) = a.next() => m?,
                Some(m) = b.next() => m?,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            m.ack();
            seen.insert(m.value.to_vec());
        }
        for events in [&mut a_events, &mut b_events] {
            while let Ok(e) = events.try_recv() {
                anyhow::ensure!(
                    !matches!(e, quiver_client::ConsumerEvent::Revoked(_)),
                    "a member lost partitions across the kill: {e:?}"
                );
            }
        }
        let last = survivor.admin().describe_group(GROUP).await?;
        anyhow::ensure!(ids(&last) == ids(&before), "the group changed later: {last:?}");
        a.close().await;
        b.close().await;
        for c in [a_client, b_client, survivor, admin] {
            c.close().await;
        }
        Ok(())
    })
    .await
}

/// Dead letters in a cluster: the default dead-letter topic is created through the controller
/// with the source topic's replicas (so every broker knows it and its data survives a broker),
/// and the coordinator hands the letters to that partition's leader. Before, the coordinator
/// created `<topic>.dlq` in its own registry only, unreplicated and unknown to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_to_a_replicated_topic_every_broker_knows() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        const TOPIC: &str = "jobs";
        let dir = test_dir()?;
        let (cluster, admin) = Cluster::start_with_topic(BIN, dir.path(), 3, TOPIC, 1, 3).await?;
        let producer = Producer::new(admin.clone(), ProducerConfig::default());
        for v in ["bad", "good"] {
            producer.send(TOPIC, ProducerRecord::new(v)).await?;
        }
        let mut config = ConsumerConfig::new(TOPIC).group("crew").start(StartPosition::Earliest);
        config.max_deliveries = Some(2);
        let client = cluster.client_of(1).await?;
        let mut consumer = Consumer::subscribe(client.clone(), config).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        // 'bad' is refused at each of its two deliveries, then goes to the dead letters.
        let (mut good, mut refused) = (false, 0);
        while !good || refused < 2 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "good {good}, 'bad' refused {refused} times"
            );
            let m = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("the consumer ended"))??;
            match &m.value[..] {
                b"bad" => {
                    m.nack(None);
                    refused += 1;
                }
                _ => {
                    m.ack();
                    good = true;
                }
            }
        }
        // Every broker knows the dead-letter topic, as a replicated topic, and serves the letter.
        for i in 0..3 {
            // (A broker lists a topic it applied a moment ago before it has placed its replicas.)
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let c = cluster.client_of(i).await?;
                let info = c.admin().describe_topic("jobs.dlq").await;
                c.close().await;
                let seen = match info {
                    Ok(info) if info.partitions[0].replicas.len() == 3 => break,
                    Ok(info) => format!("replicas {:?}", info.partitions[0].replicas),
                    Err(e) => e.to_string(),
                };
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "broker {}: jobs.dlq: {seen}", i + 1);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let letters = cluster.read_all_from(i, "jobs.dlq", 1).await?;
            anyhow::ensure!(letters == ["bad"], "broker {} serves {letters:?}", i + 1);
        }
        consumer.close().await;
        for c in [client, admin] {
            c.close().await;
        }
        Ok(())
    })
    .await
}

/// `quiver group list` in a cluster is whole or an error, never silently partial: groups live
/// in the offsets partitions, each listed by its coordinator; right after one coordinator is
/// killed, the list (asked through another broker at once) still names every group, once the
/// partition has a new coordinator (the broker answers `NotCoordinator` meanwhile, which the
/// SDK retries). Before, the dead broker's groups were missing from an answer given at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_list_is_whole_across_a_coordinators_kill() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = test_dir()?;
        let (mut cluster, admin) = Cluster::start_with_topic(BIN, dir.path(), 3, "t", 1, 3).await?;
        Producer::new(admin.clone(), ProducerConfig::default()).send("t", ProducerRecord::new("x")).await?;
        // Groups on several offsets partitions, each with a committed offset.
        let groups: Vec<String> = (0..12).map(|i| format!("team-{i}")).collect();
        for g in &groups {
            admin.admin().commit_offset(g, "t", 0, 1).await?;
        }
        let coord = coordinator(&cluster, 0, &groups[0]).await?;
        let victim = cluster.index_of(coord);
        let survivor = (victim + 1) % 3;
        let client = cluster.client_of(survivor).await?;
        let mut want = groups.clone();
        want.sort();
        anyhow::ensure!(client.admin().list_groups().await? == want, "before the kill");
        cluster.nodes[victim].kill9();
        let listed = client.admin().list_groups().await?;
        anyhow::ensure!(listed == want, "after killing broker {coord}: {listed:?}");
        client.close().await;
        admin.close().await;
        Ok(())
    })
    .await
}

/// With fewer replicas than brokers a group's coordinator may hold no replica of a partition:
/// it hands the subscription on to a replica, also when another broker forwarded it (the
/// second hop). A group consumer through any broker reads every value; clients cannot write
/// into `__offsets`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reads_partitions_its_coordinator_holds_no_replica_of() -> anyhow::Result<()> {
    init_tracing();
    bounded(150, async {
        let dir = test_dir()?;
        let cluster = Cluster::start(BIN, dir.path(), 3).await?;
        let admin = cluster.client().await?;
        // One replica each: every coordinator lacks two of the three partitions.
        cluster.create_topic(&admin, TOPIC, PARTITIONS, 1).await?;
        cluster.topic_everywhere(TOPIC, Duration::from_secs(20)).await?;
        let producer = Producer::new(admin.clone(), ProducerConfig::default());
        for i in 0..30u32 {
            producer.send(TOPIC, ProducerRecord::new(format!("v{i}")).partition(i % PARTITIONS)).await?;
        }
        let refused = producer.send("__offsets", ProducerRecord::new("forged")).await;
        anyhow::ensure!(refused.is_err(), "a client wrote into __offsets");
        for node in 0..3 {
            let client = cluster.client_of(node).await?;
            let config =
                ConsumerConfig::new(TOPIC).group(format!("via-{node}")).start(StartPosition::Earliest);
            let mut consumer = Consumer::subscribe(client.clone(), config).await?;
            let mut got = BTreeSet::new();
            while got.len() < 30 {
                let m = tokio::time::timeout(Duration::from_secs(20), consumer.next())
                    .await
                    .map_err(|_| anyhow::anyhow!("via broker {}: {} of 30 values", node + 1, got.len()))?
                    .ok_or_else(|| anyhow::anyhow!("the consumer ended"))??;
                m.ack();
                got.insert((m.partition, m.offset));
            }
            consumer.close().await;
            client.close().await;
        }
        admin.close().await;
        Ok(())
    })
    .await
}

/// A coordinator holding no replica of a partition hands its subscription and commits to a
/// replica (docs/replication.md §10). The commits are kept in the coordinator's replicated
/// store too, and the replica serving the partition next starts at them: four brokers, three
/// replicas a partition, a group whose coordinator lacks one partition; the replica serving it
/// is SIGKILLed after a commit, and the group goes on at another replica from that commit
/// (before, that replica's own store knew nothing of the group: it started from the earliest
/// offset and delivered the committed records again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_survives_the_replica_a_coordinator_handed_its_partition_to() -> anyhow::Result<()> {
    init_tracing();
    bounded(170, async {
        let dir = test_dir()?;
        let (mut cluster, admin) =
            Cluster::start_with_topic(BIN, dir.path(), 4, TOPIC, PARTITIONS, 3).await?;
        // A group whose coordinator holds no replica of some partition `p`.
        let mut found = None;
        for i in 0..32 {
            let group = format!("handed-{i}");
            let coord = coordinator(&cluster, 0, &group).await?;
            let status = cluster.status_of(cluster.index_of(coord)).await?;
            let lacking = status.partitions.iter().find(|r| r.topic == TOPIC && !r.replicas.contains(&coord));
            if let Some(r) = lacking {
                found = Some((group, coord, r.partition, r.replicas.clone()));
                break;
            }
        }
        let (group, coord, p, replicas) = found.context("no group whose coordinator lacks a partition")?;
        // The coordinator hands the partition to the first replica it reaches, in placement order.
        let serving = replicas[0];
        eprintln!("group {group}: coordinator {coord}, partition {p} on {replicas:?}, served by {serving}");
        let producer = Producer::new(admin.clone(), ProducerConfig::default());
        for i in 0..20 {
            producer.send(TOPIC, ProducerRecord::new(format!("before-{i}")).partition(p)).await?;
        }
        let via = cluster.client_of(cluster.index_of(coord)).await?;
        let config = ConsumerConfig::new(TOPIC).group(group.clone()).start(StartPosition::Earliest);
        let mut first = Consumer::subscribe(via.clone(), config.clone()).await?;
        // The 20 records of partition `p` (after the leader's marker at offset 0).
        let (mut read, mut end) = (0, 0);
        while read < 20 {
            let m = tokio::time::timeout(Duration::from_secs(20), first.next())
                .await
                .map_err(|_| anyhow::anyhow!("no message within 20 s after {read} of 20"))?
                .ok_or_else(|| anyhow::anyhow!("the consumer ended"))??;
            m.ack();
            if m.partition == p {
                read += 1;
                end = m.offset + 1;
            }
        }
        let report = first.commit().await?;
        anyhow::ensure!(
            report.committed.get(&p) == Some(&end),
            "committed {:?}, not {end} of partition {p}",
            report.committed
        );
        first.close().await;

        let victim = cluster.index_of(serving);
        cluster.nodes[victim].kill9();
        for i in 0..10 {
            producer.send(TOPIC, ProducerRecord::new(format!("after-{i}")).partition(p)).await?;
        }
        let mut second = Consumer::subscribe(via.clone(), config).await?;
        let mut got = Vec::new();
        while got.iter().filter(|(q, _)| *q == p).count() < 10 {
            let m = tokio::time::timeout(Duration::from_secs(30), second.next())
                .await
                .map_err(|_| anyhow::anyhow!("too few of the 10 values after the kill: {got:?}"))?
                .ok_or_else(|| anyhow::anyhow!("the consumer ended"))??;
            m.ack();
            got.push((m.partition, m.offset));
            if m.partition == p {
                anyhow::ensure!(
                    m.offset >= end,
                    "offset {} delivered again below the commit ({end}): {got:?}",
                    m.offset
                );
            }
        }
        eprintln!("after broker {serving}'s kill the group read offsets {got:?}");
        second.close().await;
        for c in [via, admin] {
            c.close().await;
        }
        Ok(())
    })
    .await
}
