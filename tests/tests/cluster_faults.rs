//! Fault tests of replicated partitions with real processes (issue 17, docs/replication.md §7
//! and §9.2): three `quiverd` on loopback, producers with `acks = all` publishing numbered
//! values in the background (`quiver_tests::workload`), and
//! - the partition's leader killed with SIGKILL and restarted, again and again;
//! - the leader cut off from its peers (a UDP proxy on every broker-to-broker path) while a
//!   client talks to it directly, then healed;
//! - every broker restarted gracefully in turn, with a consumer group reading;
//! - `acks = leader` against `acks = all` on an isolated leader: the first is acknowledged and
//!   then lost, the second never acknowledged (docs/replication.md §3).
//!
//! After each, every broker alone must serve exactly the acknowledged values, once each, in
//! send order, at the same offsets (`Expected::check`, whose teeth the first test shows).
//! Failover times are printed for the record.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use quiver_client::{ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, StartPosition};
use quiver_tests::workload::{p50_max, value, Expected, Load, Outcome};
use quiver_tests::{bounded, init_tracing, read_partition, test_dir, Cluster};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
/// How often the background producers send a value.
const PERIOD: Duration = Duration::from_millis(5);
/// How long the cluster may take to elect a leader, or a broker to catch up.
const SETTLE: Duration = Duration::from_secs(20);
/// The longest failover a client of a surviving broker may see after the leader is killed.
const FOLLOWER_CLIENT_FAILOVER_MAX: Duration = Duration::from_secs(4);

/// The log check must fail on a lost, a repeated, a reordered, an unsent and (when exact) an
/// unacknowledged value, or the fault tests below prove nothing.
#[test]
fn the_log_check_catches_loss_duplicates_reordering_and_strangers() {
    let now = Instant::now();
    let outcome = |seq, ok: bool| Outcome {
        seq,
        partition: 0,
        sent_at: now,
        result: if ok { Ok(now) } else { Err("timed out".into()) },
    };
    let mut expected = Expected::default();
    expected.add("a", &[outcome(0, true), outcome(1, true), outcome(2, false), outcome(3, true)], 0);
    let log = |seqs: &[u64]| seqs.iter().map(|&s| value("a", s)).collect::<Vec<_>>();
    assert_eq!(expected.check(&log(&[0, 1, 3]), true), Ok(()));
    assert_eq!(expected.check(&log(&[0, 1, 2, 3]), false), Ok(()), "an unacknowledged value may be there");
    for (bad, exact, why) in [
        (log(&[0, 3]), false, "missing"),
        (log(&[0, 1, 1, 3]), false, "second time"),
        (log(&[1, 0, 3]), false, "send order"),
        (log(&[0, 1, 3, 4]), false, "never sent"),
        (vec![value("a", 0), value("a", 1), value("b", 0), value("a", 3)], false, "never sent"),
        (log(&[0, 1, 2, 3]), true, "never acknowledged"),
    ] {
        let e = expected.check(&bad, exact).expect_err(why);
        assert!(e.contains(why), "{bad:?}: {e}");
    }
}

/// Kill -9 of the partition's leader under load, `QUIVER_FAULT_KILLS` times (5 by default).
/// Odd kills leave the client's broker alone (a follower forwarding to the leader: the
/// failover is the cluster's); even kills hit the broker the client talks to (the failover
/// includes the client's move to another broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_under_acks_all_lose_nothing() -> anyhow::Result<()> {
    let kills = std::env::var("QUIVER_FAULT_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(5);
    leader_kills(kills).await
}

/// The long version: 20 kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about two minutes; run with --ignored (or set QUIVER_FAULT_KILLS on the CI test)"]
async fn leader_kills_under_acks_all_lose_nothing_20_times() -> anyhow::Result<()> {
    leader_kills(20).await
}

async fn leader_kills(kills: u32) -> anyhow::Result<()> {
    init_tracing();
    bounded(60 + 30 * u64::from(kills), async {
        let dir = test_dir()?;
        let mut cluster = Cluster::start(BIN, dir.path(), 3).await?;
        let admin = cluster.client().await?;
        cluster.create_topic(&admin, "f", 1, 3).await?;
        cluster.topic_everywhere("f", SETTLE).await?;
        let all = [0, 1, 2];
        let mut expected = Expected::default();
        let mut failovers: [Vec<Duration>; 2] = Default::default();
        for kill in 1..=kills {
            let leader = cluster.agreed_leader(&all, "f", 0, SETTLE).await?;
            let li = cluster.index_of(leader);
            let followers: Vec<usize> = all.iter().copied().filter(|&i| i != li).collect();
            let clients_broker = kill % 2 == 0;
            let order = match clients_broker {
                true => vec![li, followers[0], followers[1]],
                false => vec![followers[0], followers[1], li],
            };
            let client = cluster.client_in_order(&order, client_timeouts).await?;
            let name = format!("k{kill}");
            let load = Load::start(client.clone(), ProducerConfig::default(), "f", 1, &name, PERIOD);
            wait_acked(&load, 20).await?;

            cluster.nodes[li].kill9();
            let killed = Instant::now();
            let first = load.wait_ack_sent_after(killed, SETTLE).await?;
            let failover = first - killed;
            failovers[usize::from(clients_broker)].push(failover);

            cluster.nodes[li].restart().await?;
            let new_leader = cluster.agreed_leader(&all, "f", 0, SETTLE).await?;
            let target = cluster.partition_of(cluster.index_of(new_leader), "f", 0).await?.commit;
            cluster.caught_up(li, new_leader, "f", 0, target, SETTLE).await?;
            let outcomes = load.finish().await?;
            client.close().await;
            let failed: Vec<_> = outcomes.iter().filter(|o| !o.acked()).collect();
            eprintln!(
                "kill {kill}: broker {leader} ({}) killed; failover {failover:?}; broker {new_leader} leads; {} values, {} failed",
                if clients_broker { "the client's broker" } else { "not the client's broker" },
                outcomes.len(),
                failed.len(),
            );
            anyhow::ensure!(failed.is_empty(), "kill {kill}: sends failed: {:?}", &failed[..failed.len().min(3)]);
            expected.add(&name, &outcomes, 0);
        }
        // An election takes about a second (timeouts of 400-800 ms); a client of the killed
        // broker also waits out its idle timeout. The bounds are loose for a loaded machine,
        // yet below what a forward stuck on the dead leader cost (5.1 s, FORWARD_TIMEOUT).
        let bounds = [FOLLOWER_CLIENT_FAILOVER_MAX, CLIENT_IDLE + FOLLOWER_CLIENT_FAILOVER_MAX];
        for (k, what) in ["a follower's client", "the leader's client"].into_iter().enumerate() {
            let samples = &failovers[k];
            if !samples.is_empty() {
                let (p50, max) = p50_max(samples);
                eprintln!("failover with {what} ({} kills): p50 {p50:?}, max {max:?}: {samples:?}", samples.len());
                anyhow::ensure!(max < bounds[k], "failover with {what} took {max:?} (bound {:?})", bounds[k]);
            }
        }

        // Every broker alone serves exactly what was acknowledged, once, in send order, at the
        // same offsets.
        cluster.settled_high_watermark("f", 0, SETTLE).await?;
        let logs = read_every_broker(&cluster, "f", 0).await?;
        for (i, log) in logs.iter().enumerate() {
            let values: Vec<String> = log.iter().map(|(_, v)| v.clone()).collect();
            expected.check(&values, true).map_err(|e| anyhow::anyhow!("broker {}: {e}", i + 1))?;
            anyhow::ensure!(log == &logs[0], "broker {} serves other offsets than broker 1", i + 1);
        }
        eprintln!("{} values acknowledged, each served once by every broker", expected.acked());
        // The check has teeth on this very log: one acknowledged value dropped is caught.
        let mut dropped: Vec<String> = logs[0].iter().map(|(_, v)| v.clone()).collect();
        dropped.remove(dropped.len() / 2);
        anyhow::ensure!(expected.check(&dropped, true).is_err(), "the check missed a dropped value");
        admin.close().await;
        Ok(())
    })
    .await
}

/// The leader cut off from both peers while a client talks to it directly: nothing it is sent
/// is acknowledged, it steps down, the majority elects another leader and goes on; after the
/// heal it follows, cuts what it held uncommitted, and every broker serves the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_stops_acknowledging_and_truncates_after_healing() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = test_dir()?;
        let cluster = Cluster::start_with_proxies(BIN, dir.path(), 3).await?;
        let admin = cluster.client().await?;
        cluster.create_topic(&admin, "iso", 1, 3).await?;
        cluster.topic_everywhere("iso", SETTLE).await?;
        let all = [0, 1, 2];
        let leader = cluster.agreed_leader(&all, "iso", 0, SETTLE).await?;
        let li = cluster.index_of(leader);
        let majority: Vec<usize> = all.iter().copied().filter(|&i| i != li).collect();

        // A producer on the leader alone, and one on the two others; both acknowledged first.
        let lclient = cluster.client_of(li).await?;
        let lproducer = Arc::new(Producer::new(
            lclient.clone(),
            ProducerConfig::default().with_delivery_timeout(Duration::from_secs(6)),
        ));
        let warm = Load::with_producer(lproducer.clone(), "iso", 1, "warm", PERIOD);
        let mclient = cluster.client_in_order(&majority, client_timeouts).await?;
        let maj = Load::start(mclient.clone(), ProducerConfig::default(), "iso", 1, "maj", PERIOD);
        wait_acked(&warm, 20).await?;
        wait_acked(&maj, 20).await?;
        let warm = warm.finish().await?;
        anyhow::ensure!(warm.iter().all(Outcome::acked), "a send to the healthy leader failed");

        cluster.isolate(li);
        let isolated = Instant::now();
        let iso = Load::with_producer(lproducer.clone(), "iso", 1, "iso", PERIOD);
        let first = maj.wait_ack_sent_after(isolated, SETTLE).await?;
        let new_leader = cluster.agreed_leader(&majority, "iso", 0, SETTLE).await?;
        // Check-quorum: the isolated broker stops claiming the lead on its own.
        let c = &cluster;
        let stepped_down = wait_until(SETTLE, || async move {
            c.partition_of(li, "iso", 0).await.is_ok_and(|v| v.leader != Some(leader))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let iso = iso.finish().await?;
        let stepped_down_after = stepped_down.map(|at| at - isolated);
        eprintln!(
            "isolated broker {leader}: the majority's first acknowledgement {:?} later (broker {new_leader} leads); \
             it stepped down after {stepped_down_after:?}; {} values sent to it, errors: {:?}",
            first - isolated,
            iso.len(),
            error_kinds(&iso),
        );
        anyhow::ensure!(stepped_down_after.is_some(), "the isolated leader never stepped down");
        let acked: Vec<_> = iso.iter().filter(|o| o.acked()).collect();
        anyhow::ensure!(acked.is_empty(), "the isolated leader acknowledged {:?}", &acked[..acked.len().min(3)]);
        anyhow::ensure!(!iso.is_empty(), "nothing was sent to the isolated leader");
        drop(lproducer);
        lclient.close().await;

        cluster.heal();
        let healed = Instant::now();
        let after = cluster.agreed_leader(&all, "iso", 0, SETTLE).await?;
        let target = cluster.partition_of(cluster.index_of(after), "iso", 0).await?.commit;
        cluster.caught_up(li, after, "iso", 0, target, SETTLE).await?;
        eprintln!("healed: broker {leader} follows broker {after} and caught up in {:?}", healed.elapsed());
        let maj = maj.finish().await?;
        anyhow::ensure!(maj.iter().all(Outcome::acked), "a send on the majority side failed");
        mclient.close().await;

        cluster.settled_high_watermark("iso", 0, SETTLE).await?;
        let mut expected = Expected::default();
        expected.add("warm", &warm, 0);
        expected.add("iso", &iso, 0);
        expected.add("maj", &maj, 0);
        let logs = read_every_broker(&cluster, "iso", 0).await?;
        for (i, log) in logs.iter().enumerate() {
            let values: Vec<String> = log.iter().map(|(_, v)| v.clone()).collect();
            expected.check(&values, true).map_err(|e| anyhow::anyhow!("broker {}: {e}", i + 1))?;
            anyhow::ensure!(log == &logs[0], "broker {} serves other offsets than broker 1", i + 1);
        }
        // What it held uncommitted was really there, and cut.
        anyhow::ensure!(
            cluster.nodes[li].log().contains("truncating a diverged Raft suffix"),
            "broker {leader} never truncated its uncommitted suffix"
        );
        admin.close().await;
        Ok(())
    })
    .await
}

/// SIGTERM and restart of each broker in turn while a producer (acks = all) publishes and a
/// consumer group reads: every send succeeds (the SDK's retries absorb the restarts), nothing
/// acknowledged is lost, the group receives every acknowledged value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = test_dir()?;
        let mut cluster = Cluster::start(BIN, dir.path(), 3).await?;
        let admin = cluster.client().await?;
        cluster.create_topic(&admin, "roll", 2, 3).await?;
        cluster.topic_everywhere("roll", SETTLE).await?;
        let all = [0, 1, 2];
        let pclient = cluster.client_in_order(&all, client_timeouts).await?;
        let load = Load::start(pclient.clone(), ProducerConfig::default(), "roll", 2, "r", PERIOD);

        let cclient = cluster.client_in_order(&[2, 1, 0], client_timeouts).await?;
        let config = ConsumerConfig::new("roll").group("readers").start(StartPosition::Earliest);
        let consumer = Consumer::subscribe(cclient.clone(), config).await?;
        let reader = Reader::start(consumer);
        wait_acked(&load, 50).await?;

        for i in all {
            let stopped = Instant::now();
            cluster.nodes[i].restart_graceful().await?;
            let up = stopped.elapsed();
            for p in 0..2 {
                let leader = cluster.agreed_leader(&all, "roll", p, SETTLE).await?;
                let target = cluster.partition_of(cluster.index_of(leader), "roll", p).await?.commit;
                cluster.caught_up(i, leader, "roll", p, target, SETTLE).await?;
            }
            eprintln!(
                "broker {} restarted in {up:?}, caught up after {:?}; {} values acknowledged so far",
                i + 1,
                stopped.elapsed(),
                load.acked()
            );
        }
        let before = load.acked();
        wait_acked(&load, before + 50).await?;
        let outcomes = load.finish().await?;
        pclient.close().await;
        let failed: Vec<_> = outcomes.iter().filter(|o| !o.acked()).collect();
        anyhow::ensure!(
            failed.is_empty(),
            "{} sends failed, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );

        // The group gets every acknowledged value (again after a rebalance or reconnect: at
        // least once).
        let want: std::collections::BTreeSet<String> = outcomes.iter().map(|o| value("r", o.seq)).collect();
        let got = reader.wait_for(&want, SETTLE).await;
        let r: Vec<String> = reader.received().into_iter().map(|(_, v)| v).collect();
        let distinct: std::collections::BTreeSet<&String> = r.iter().collect();
        eprintln!(
            "the group received {} values, {} distinct, of {} acknowledged",
            r.len(),
            distinct.len(),
            want.len()
        );
        anyhow::ensure!(
            got,
            "the group missed {:?}",
            want.iter().filter(|v| !distinct.contains(v)).take(5).collect::<Vec<_>>()
        );
        anyhow::ensure!(distinct.iter().all(|v| want.contains(*v)), "the group received a value never sent");
        drop(reader);
        cclient.close().await;

        for p in 0..2 {
            cluster.settled_high_watermark("roll", p, SETTLE).await?;
            let mut expected = Expected::default();
            expected.add("r", &outcomes, p);
            let logs = read_every_broker(&cluster, "roll", p).await?;
            for (i, log) in logs.iter().enumerate() {
                let values: Vec<String> = log.iter().map(|(_, v)| v.clone()).collect();
                expected
                    .check(&values, true)
                    .map_err(|e| anyhow::anyhow!("broker {}, partition {p}: {e}", i + 1))?;
                anyhow::ensure!(log == &logs[0], "broker {} serves other offsets than broker 1", i + 1);
            }
        }
        admin.close().await;
        Ok(())
    })
    .await
}

/// Timeouts of the test clients. A broker killed outright sends nothing more, so a client
/// connected to it notices only when its QUIC idle timeout passes: with the default (30 s)
/// that is the failover time a client of the killed leader sees (measured: 30.07 s). The tests
/// use 3 s, as a cluster's clients should today (issue 17's report: a broker restarted on the
/// same address could tell them at once with a stateless reset, were its reset key stable).
fn client_timeouts(c: ClientConfig) -> ClientConfig {
    c.with_connect_timeout(Duration::from_secs(2)).with_idle_timeout(CLIENT_IDLE)
}

const CLIENT_IDLE: Duration = Duration::from_secs(3);

async fn wait_acked(load: &Load, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE;
    while load.acked() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}: {} of {n} values acknowledged in time",
            load.name,
            load.acked()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Polls `ok` until it holds (returns when) or `within` passes (`None`).
async fn wait_until<F, Fut>(within: Duration, mut ok: F) -> Option<Instant>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if ok().await {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each broker's log of `topic`/`partition` as (offset, value), read from that broker alone.
async fn read_every_broker(
    cluster: &Cluster,
    topic: &str,
    partition: u32,
) -> anyhow::Result<Vec<Vec<(u64, String)>>> {
    let mut logs = Vec::new();
    for i in 0..cluster.nodes.len() {
        let client = cluster.client_of(i).await?;
        let log = read_partition(&client, topic, partition).await?;
        client.close().await;
        logs.push(log.into_iter().map(|(o, v)| (o, String::from_utf8_lossy(&v).into_owned())).collect());
    }
    Ok(logs)
}

/// How the failed sends failed, counted by the start of their error.
fn error_kinds(outcomes: &[Outcome]) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for o in outcomes {
        if let Err(e) = &o.result {
            *kinds.entry(e.chars().take(60).collect::<String>()).or_insert(0) += 1;
        }
    }
    kinds
}

/// A retried idempotent batch that the leader holds but has not committed must not be
/// acknowledged (`acks = all`: acknowledged once committed, docs/replication.md §3): the
/// leader is cut off from its peers, a batch is sent to it, then the same batch again (as the
/// SDK resends every batch in flight after a failure). Whatever the leader answers, a batch it
/// acknowledged must be in every broker's log after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_is_not_acknowledged_before_it_is_committed() -> anyhow::Result<()> {
    use quiver_protocol::batch::{BatchBuilder, ProducerIdentity};
    use quiver_protocol::message::{Acks, Message};
    init_tracing();
    bounded(90, async {
        let dir = test_dir()?;
        let cluster = Cluster::start_with_proxies(BIN, dir.path(), 3).await?;
        let admin = cluster.client().await?;
        cluster.create_topic(&admin, "dup", 1, 3).await?;
        cluster.topic_everywhere("dup", SETTLE).await?;
        let all = [0, 1, 2];
        let leader = cluster.agreed_leader(&all, "dup", 0, SETTLE).await?;
        let li = cluster.index_of(leader);
        let lclient = cluster.client_of(li).await?;
        let (producer_id, producer_epoch) = match lclient.request(&Message::InitProducer).await? {
            Message::InitProducerOk { producer_id, producer_epoch } => (producer_id, producer_epoch),
            other => anyhow::bail!("InitProducer answered with kind {}", other.kind()),
        };
        let produce = |seq: i32, v: &str| {
            let identity = ProducerIdentity { producer_id, producer_epoch, base_sequence: seq };
            let mut b = BatchBuilder::new(256).with_identity(identity);
            b.push(0, None, v.as_bytes(), &[]);
            Message::Produce { topic: "dup".into(), partition: 0, acks: Acks::All, batch: b.finish() }
        };
        // One committed batch first, so the leader knows the producer.
        match lclient.request(&produce(0, "committed")).await? {
            Message::ProduceOk { .. } => {}
            other => anyhow::bail!("the healthy leader answered kind {}", other.kind()),
        }

        cluster.isolate(li);
        let first = {
            let (c, m) = (lclient.clone(), produce(1, "held"));
            tokio::spawn(async move { c.request(&m).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = tokio::time::timeout(Duration::from_secs(3), lclient.request(&produce(1, "held"))).await;
        let first = tokio::time::timeout(Duration::from_secs(10), first).await;
        let acked = |r: &Result<Message, quiver_client::ClientError>| matches!(r, Ok(Message::ProduceOk { .. }));
        let again_acked = matches!(&again, Ok(r) if acked(r));
        let first_acked = matches!(&first, Ok(Ok(r)) if acked(r));
        eprintln!("to the isolated leader {leader}: the batch {first:?}; sent again: {again:?}");
        // The two others elect a leader of their own before the heal.
        let majority: Vec<usize> = all.iter().copied().filter(|&i| i != li).collect();
        let elected = cluster.agreed_leader(&majority, "dup", 0, SETTLE).await?;
        eprintln!("broker {elected} leads the majority");

        cluster.heal();
        let after = cluster.agreed_leader(&all, "dup", 0, SETTLE).await?;
        let target = cluster.partition_of(cluster.index_of(after), "dup", 0).await?.commit;
        cluster.caught_up(li, after, "dup", 0, target, SETTLE).await?;
        cluster.settled_high_watermark("dup", 0, SETTLE).await?;
        let logs = read_every_broker(&cluster, "dup", 0).await?;
        let held_everywhere = logs.iter().all(|l| l.iter().any(|(_, v)| v == "held"));
        eprintln!("after the heal broker {after} leads; the logs: {:?}", logs[0]);
        anyhow::ensure!(
            !(first_acked || again_acked) || held_everywhere,
            "the isolated leader acknowledged a batch (first {first_acked}, again {again_acked}) that the cluster then lost"
        );
        lclient.close().await;
        admin.close().await;
        Ok(())
    })
    .await
}

/// `acks = leader` against `acks = all` on a leader cut off from its peers (docs/replication.md
/// §3): the isolated leader acknowledges `acks = leader` batches once its own log has them
/// (fsynced: the topic's default durability), before any follower does, and never an
/// `acks = all` batch. An idempotent `acks = leader` batch sent again is answered with the
/// offsets its first send got (the leader holds it), the same batch asked with `acks = all`
/// is not (not committed). After the heal the majority's leader cuts the old leader's suffix:
/// the writes it acknowledged alone are gone from every log, while every `acks = all`
/// acknowledgement stays. acks=leader can lose acknowledged writes; acks=all cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_leader_answers_before_the_commit_and_can_lose_what_it_answered() -> anyhow::Result<()> {
    use quiver_protocol::batch::{BatchBuilder, ProducerIdentity};
    use quiver_protocol::message::{Acks, Message};
    init_tracing();
    bounded(120, async {
        let dir = test_dir()?;
        let cluster = Cluster::start_with_proxies(BIN, dir.path(), 3).await?;
        let admin = cluster.client().await?;
        cluster.create_topic(&admin, "acks", 1, 3).await?;
        cluster.topic_everywhere("acks", SETTLE).await?;
        let all = [0, 1, 2];
        let leader = cluster.agreed_leader(&all, "acks", 0, SETTLE).await?;
        let li = cluster.index_of(leader);
        let majority: Vec<usize> = all.iter().copied().filter(|&i| i != li).collect();
        let lclient = cluster.client_of(li).await?;
        let (producer_id, producer_epoch) = match lclient.request(&Message::InitProducer).await? {
            Message::InitProducerOk { producer_id, producer_epoch } => (producer_id, producer_epoch),
            other => anyhow::bail!("InitProducer answered with kind {}", other.kind()),
        };
        let produce = |acks: Acks, v: &str, seq: Option<i32>| {
            let mut b = BatchBuilder::new(256);
            if let Some(base_sequence) = seq {
                b = b.with_identity(ProducerIdentity { producer_id, producer_epoch, base_sequence });
            }
            b.push(0, None, v.as_bytes(), &[]);
            Message::Produce { topic: "acks".into(), partition: 0, acks, batch: b.finish() }
        };
        let offset_of = |r: &Result<Message, quiver_client::ClientError>| match r {
            Ok(Message::ProduceOk { base_offset, .. }) => Some(*base_offset),
            _ => None,
        };
        // Committed with acks = all while healthy, idempotent and not.
        for (v, seq) in [("all-before", None), ("all-before-idem", Some(0))] {
            let r = lclient.request(&produce(Acks::All, v, seq)).await;
            anyhow::ensure!(offset_of(&r).is_some(), "the healthy leader answered {v} with {r:?}");
        }

        cluster.isolate(li);
        let isolated = Instant::now();
        // acks = all first: it waits for a commit that cannot come.
        let pending_all = {
            let (c, m) = (lclient.clone(), produce(Acks::All, "all-isolated", None));
            tokio::spawn(async move { c.request(&m).await })
        };
        // The isolated leader steps down 1-2 election timeouts (1-2 s) after its followers
        // fall silent (check-quorum); until then it answers acks = leader on its own.
        let mut lead_acked = Vec::new();
        let idem = lclient.request(&produce(Acks::Leader, "leader-idem", Some(1))).await;
        let idem_again = lclient.request(&produce(Acks::Leader, "leader-idem", Some(1))).await;
        let idem_all = lclient.request(&produce(Acks::All, "leader-idem", Some(1))).await;
        for k in 0..10 {
            let v = format!("leader-{k}");
            let r = lclient.request(&produce(Acks::Leader, &v, None)).await;
            if let Some(o) = offset_of(&r) {
                lead_acked.push((o, v));
            }
        }
        let answered_within = isolated.elapsed();
        eprintln!(
            "isolated broker {leader}: within {answered_within:?} it acknowledged {} of 10 acks=leader batches \
             {lead_acked:?}; the idempotent one {idem:?}, sent again {idem_again:?}, with acks=all {idem_all:?}",
            lead_acked.len()
        );
        anyhow::ensure!(
            lead_acked.len() == 10,
            "the isolated leader did not acknowledge every acks=leader batch on its own log"
        );
        let idem_offset = offset_of(&idem).ok_or_else(|| anyhow::anyhow!("idempotent acks=leader: {idem:?}"))?;
        anyhow::ensure!(
            offset_of(&idem_again) == Some(idem_offset),
            "an acks=leader retry of a batch the leader holds got {idem_again:?}, not its offset {idem_offset}"
        );
        anyhow::ensure!(
            offset_of(&idem_all).is_none(),
            "an acks=all retry of an uncommitted batch was acknowledged: {idem_all:?}"
        );

        // The two others elect a leader of their own and go on with acks = all.
        let elected = cluster.agreed_leader(&majority, "acks", 0, SETTLE).await?;
        let mclient = cluster.client_in_order(&majority, client_timeouts).await?;
        let mproducer = Producer::new(mclient.clone(), ProducerConfig::default().with_acks(Acks::All));
        for k in 0..20 {
            mproducer.send("acks", quiver_client::ProducerRecord::new(format!("maj-{k}")).partition(0)).await?;
        }
        let all_isolated = tokio::time::timeout(Duration::from_secs(10), pending_all).await;
        let all_isolated_acked = matches!(&all_isolated, Ok(Ok(r)) if offset_of(r).is_some());
        eprintln!("broker {elected} leads the majority; the acks=all batch sent to the isolated leader: {all_isolated:?}");
        anyhow::ensure!(!all_isolated_acked, "the isolated leader acknowledged an acks=all batch");

        cluster.heal();
        let after = cluster.agreed_leader(&all, "acks", 0, SETTLE).await?;
        let target = cluster.partition_of(cluster.index_of(after), "acks", 0).await?.commit;
        cluster.caught_up(li, after, "acks", 0, target, SETTLE).await?;
        cluster.settled_high_watermark("acks", 0, SETTLE).await?;
        let logs = read_every_broker(&cluster, "acks", 0).await?;
        eprintln!("after the heal broker {after} leads; the log: {:?}", logs[0]);
        for (i, log) in logs.iter().enumerate() {
            anyhow::ensure!(log == &logs[0], "broker {} serves other offsets than broker 1", i + 1);
        }
        let has = |v: &str| logs[0].iter().any(|(_, x)| x == v);
        // acks = all: every acknowledgement kept.
        for v in ["all-before", "all-before-idem"].into_iter().map(String::from).chain((0..20).map(|k| format!("maj-{k}"))) {
            anyhow::ensure!(has(&v), "{v}, acknowledged with acks=all, is not in the log");
        }
        // acks = leader: what the isolated leader acknowledged alone was cut.
        let lost: Vec<_> = lead_acked.iter().filter(|(_, v)| !has(v)).collect();
        anyhow::ensure!(
            lost.len() == lead_acked.len() && !has("leader-idem"),
            "acks=leader batches acknowledged by the isolated leader survived: {:?}",
            lead_acked.iter().filter(|(_, v)| has(v)).collect::<Vec<_>>()
        );
        for (o, v) in &lost {
            let now = logs[0].iter().find(|(x, _)| x == o).map(|(_, x)| x.as_str());
            eprintln!("acknowledged {v} at offset {o} (acks=leader): lost; offset {o} now holds {now:?}");
        }
        anyhow::ensure!(
            cluster.nodes[li].log().contains("truncating a diverged Raft suffix"),
            "broker {leader} never truncated what it acknowledged alone"
        );
        drop(mproducer);
        mclient.close().await;
        lclient.close().await;
        admin.close().await;
        Ok(())
    })
    .await
}

/// Every broker killed at once and started again, a plain (groupless) consumer tailing
/// throughout: it sees each record once. The restarted replicas report a high watermark below
/// what the consumer was handed until a leader commits in its new term; that is a replica
/// catching up, not a log that lost records, so the consumer waits instead of starting over
/// from the short log (a new user's `quiver tail` printed 5,000-6,000 records twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_across_a_whole_cluster_kill_sees_each_record_once() -> anyhow::Result<()> {
    init_tracing();
    bounded(150, async {
        let dir = test_dir()?;
        let (mut cluster, admin) = Cluster::start_with_topic(BIN, dir.path(), 3, "whole", 1, 3).await?;
        let all = [0, 1, 2];
        let pclient = cluster.client_in_order(&all, client_timeouts).await?;
        let load = Load::start(
            pclient.clone(),
            ProducerConfig::default(),
            "whole",
            1,
            "w",
            Duration::from_millis(2),
        );
        let cclient = cluster.client_in_order(&all, client_timeouts).await?;
        let config = ConsumerConfig::new("whole").start(StartPosition::Earliest);
        let consumer = Consumer::subscribe(cclient.clone(), config).await?;
        let reader = Reader::start(consumer);
        wait_acked(&load, 500).await?;
        // Mid-stream: the consumer was handed records a moment ago.
        for node in cluster.nodes.iter_mut() {
            node.kill9();
        }
        for node in cluster.nodes.iter_mut() {
            node.restart().await?;
        }
        let before = load.acked();
        wait_acked(&load, before + 500).await?;
        let outcomes = load.finish().await?;
        let want: std::collections::BTreeSet<String> =
            outcomes.iter().filter(|o| o.acked()).map(|o| value("w", o.seq)).collect();
        let got = reader.wait_for(&want, SETTLE).await;
        let r = reader.received();
        drop(reader);
        anyhow::ensure!(got, "the consumer did not get every acknowledged value ({} received)", r.len());
        let mut seen = std::collections::BTreeSet::new();
        let twice: Vec<u64> = r.iter().map(|(o, _)| *o).filter(|o| !seen.insert(*o)).collect();
        eprintln!("{} records received, {} acknowledged, {} offsets twice", r.len(), want.len(), twice.len());
        anyhow::ensure!(
            twice.is_empty(),
            "{} offsets delivered twice, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        );
        for c in [pclient, cclient, admin] {
            c.close().await;
        }
        Ok(())
    })
    .await
}

/// A leader stopped gracefully (SIGTERM) hands its partitions' leadership to caught-up
/// followers before it goes, instead of leaving them to elect after an election timeout:
/// its log says every group moved, the others agree on a new leader, and produce goes on
/// (how long the step takes is measured by `TARGET=rolling SIGNAL=TERM bench/failover.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_gracefully_hands_its_partitions_over() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = test_dir()?;
        let (mut cluster, admin) = Cluster::start_with_topic(BIN, dir.path(), 3, "handover", 2, 3).await?;
        let all = [0, 1, 2];
        let leader = cluster.agreed_leader(&all, "handover", 0, SETTLE).await?;
        let i = cluster.index_of(leader);
        let others: Vec<usize> = all.iter().copied().filter(|&n| n != i).collect();
        let client = cluster.client_in_order(&others, client_timeouts).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        producer.send("handover", quiver_client::ProducerRecord::new("before").partition(0)).await?;
        cluster.nodes[i].terminate().await?;
        let log = cluster.nodes[i].log();
        let line = log
            .lines()
            .find(|l| l.contains("handed leadership over before stopping"))
            .ok_or_else(|| anyhow::anyhow!("no hand-over in the stopped leader's log:\n{log}"))?;
        anyhow::ensure!(line.contains("still_leading=0"), "not every group moved: {line}");
        let next = cluster.agreed_leader(&others, "handover", 0, SETTLE).await?;
        anyhow::ensure!(next != leader, "broker {leader} still leads");
        producer.send("handover", quiver_client::ProducerRecord::new("after").partition(0)).await?;
        eprintln!("broker {leader} stopped; broker {next} leads: {line}");
        for c in [client, admin] {
            c.close().await;
        }
        Ok(())
    })
    .await
}

/// A consumer read in the background, every message acknowledged as it comes; stops when
/// dropped.
struct Reader {
    received: Arc<Mutex<Vec<(u64, String)>>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Reader {
    fn start(mut consumer: Consumer) -> Reader {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = consumer.next().await {
                let m = m?;
                m.ack();
                let v = String::from_utf8_lossy(&m.value).into_owned();
                sink.lock().unwrap_or_else(|e| e.into_inner()).push((m.offset, v));
            }
            anyhow::Ok(())
        });
        Reader { received, task }
    }

    /// (offset, value) of every message so far, in delivery order.
    fn received(&self) -> Vec<(u64, String)> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether every value of `want` arrived within `within`.
    async fn wait_for(&self, want: &std::collections::BTreeSet<String>, within: Duration) -> bool {
        let got = wait_until(within, || async {
            let r = self.received.lock().unwrap_or_else(|e| e.into_inner());
            let r: std::collections::BTreeSet<&String> = r.iter().map(|(_, v)| v).collect();
            want.iter().all(|v| r.contains(v))
        })
        .await;
        got.is_some()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}
