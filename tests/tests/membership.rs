//! Brokers added and removed online (issue 18 item 3, docs/replication.md §11) with real
//! processes: three `quiverd`, a producer sending throughout, a fourth broker added with
//! `add_broker` and started with `--join`, then one of the first three removed. Partitions
//! move by Raft configuration changes (learner, promotion, removal) to placement over the new
//! set; every acknowledged value is still there at the end, read through the new broker, and
//! every partition's replicas are its placement over the brokers left.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quiver_client::{Producer, ProducerConfig, ProducerRecord};
use quiver_tests::{bounded, free_udp_port, init_tracing, read_partition, test_dir, BrokerProcess, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const TOPIC: &str = "moving";
const PARTITIONS: u32 = 6;

/// Waits until broker `i` reports every partition of TOPIC with exactly `replicas` as its
/// configuration and a leader among them.
async fn placed_on(cluster: &Cluster, i: usize, brokers: &[u64]) -> anyhow::Result<()> {
    placed_with(cluster, i, brokers, 3).await
}

/// As [`placed_on`] for a topic of `r` replicas.
async fn placed_with(cluster: &Cluster, i: usize, brokers: &[u64], r: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut pending = vec![(u32::MAX, BTreeSet::new(), BTreeSet::new(), None)];
        match cluster.status_of(i).await {
            Ok(status) => {
                pending.clear();
                for p in status.partitions.iter().filter(|p| p.topic == TOPIC) {
                    let want: BTreeSet<u32> =
                        quiver_broker::placement::replicas(TOPIC, p.partition, brokers, r)
                            .into_iter()
                            .map(|b| b as u32)
                            .collect();
                    let have: BTreeSet<u32> = p.replicas.iter().copied().collect();
                    if have != want || p.leader.is_none_or(|l| !want.contains(&l)) {
                        pending.push((p.partition, have, want, p.leader));
                    }
                }
            }
            Err(e) => tracing::debug!("cluster status: {e}"),
        }
        if pending.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let mut views = Vec::new();
            for (j, n) in cluster.nodes.iter().enumerate() {
                let view = match cluster.status_of(j).await {
                    Ok(s) => {
                        format!("{:?}", s.partitions.iter().filter(|p| p.topic == TOPIC).collect::<Vec<_>>())
                    }
                    Err(e) => e.to_string(),
                };
                views.push(format!("broker at {}: {view}", n.addr));
            }
            anyhow::bail!(
                "partitions not moved to placement over {brokers:?}: (partition, replicas, wanted, leader) \
                 {pending:?}; as each broker sees them:\n{}",
                views.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the `quiver` CLI against the cluster's brokers; its standard output.
async fn cli(cluster: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_quiver-under-test"));
    cmd.arg("--broker").arg(cluster.brokers()).arg("--ca").arg(&cluster.ca).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    anyhow::ensure!(out.status.success(), "quiver {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (value index, when it was sent, how long its acknowledgement took).
type Acked = Vec<(u64, std::time::Instant, Duration)>;
type Sending = tokio::task::JoinHandle<anyhow::Result<Acked>>;

/// A producer sending one value at a time (partition = index mod PARTITIONS), each awaited,
/// until told to stop.
fn produce_throughout(client: &quiver_client::Client) -> (Arc<AtomicBool>, Sending) {
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sending = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let record = ProducerRecord::new(format!("v{i}")).partition((i % PARTITIONS as u64) as u32);
                let sent = std::time::Instant::now();
                let ack = producer.enqueue(TOPIC, record).await?;
                ack.await?;
                acked.push((i, sent, sent.elapsed()));
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(acked)
        })
    };
    (stop, sending)
}

async fn stop_producing(stop: Arc<AtomicBool>, sending: Sending) -> anyhow::Result<Acked> {
    stop.store(true, Ordering::Relaxed);
    let acked = sending.await??;
    anyhow::ensure!(acked.len() > 50, "only {} values were acknowledged", acked.len());
    Ok(acked)
}

/// Every acknowledged value is in its partition, read through `reader`.
async fn all_there(reader: &quiver_client::Client, acked: &Acked) -> anyhow::Result<()> {
    for p in 0..PARTITIONS {
        let values: BTreeSet<String> = read_partition(reader, TOPIC, p)
            .await?
            .into_iter()
            .map(|(_, value)| String::from_utf8_lossy(&value).into_owned())
            .collect();
        for (i, _, _) in acked.iter().filter(|(i, _, _)| (i % PARTITIONS as u64) as u32 == p) {
            anyhow::ensure!(
                values.contains(&format!("v{i}")),
                "acknowledged v{i} is missing from partition {p}"
            );
        }
    }
    Ok(())
}

/// Three brokers and TOPIC with `replicas` replicas on each partition, created everywhere.
async fn three_with_topic(
    dir: &std::path::Path,
    replicas: u16,
) -> anyhow::Result<(Cluster, quiver_client::Client)> {
    Cluster::start_with_topic(BIN, dir, 3, TOPIC, PARTITIONS, replicas).await
}

/// How a broker is added.
enum Via {
    Sdk,
    /// `quiver cluster add-broker`, as the README shows it.
    Cli,
}

/// Adds broker `id` (reachable at a fresh loopback port) and starts it joining `cluster`.
async fn add_broker(
    cluster: &mut Cluster,
    admin: &quiver_client::Client,
    dir: &std::path::Path,
    id: u32,
    via: Via,
) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse()?;
    match via {
        Via::Sdk => admin.admin().add_broker(id, &addr.to_string()).await?,
        Via::Cli => {
            let added = cli(cluster, &["cluster", "add-broker", &format!("{id}@{addr}")]).await?;
            anyhow::ensure!(added.contains(&format!("broker {id} added")), "{added}");
        }
    }
    let ca_dir = cluster.ca.parent().ok_or_else(|| anyhow::anyhow!("no CA dir"))?.to_path_buf();
    let home = dir.join(format!("node-{id}"));
    let node = BrokerProcess::start_joining(BIN, &home, id.into(), addr, cluster.nodes[0].addr, &ca_dir)?;
    cluster.nodes.push(node);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_added_and_one_removed_under_load_lose_nothing() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = test_dir()?;
        let (mut cluster, admin) = three_with_topic(dir.path(), 3).await?;

        // A producer sends throughout, every value acknowledged by a majority.
        let (stop, sending) = produce_throughout(&admin);
        tokio::time::sleep(Duration::from_secs(1)).await;

        // Broker 4 is added, then started with --join.
        add_broker(&mut cluster, &admin, dir.path(), 4, Via::Sdk).await?;
        placed_on(&cluster, 0, &[1, 2, 3, 4]).await?;
        let status = cluster.status_of(3).await?;
        anyhow::ensure!(
            status.brokers.iter().any(|b| b.id == 4),
            "the new broker does not know itself as a broker: {:?}",
            status.brokers
        );
        anyhow::ensure!(
            status.partitions.iter().any(|p| p.topic == TOPIC && p.replicas.contains(&4)),
            "no partition moved to the new broker"
        );

        // Broker 1 is removed: its replicas move to the others. Then it is killed: nothing
        // (controller, __offsets, the topic) depends on it any more.
        admin.admin().remove_broker(1).await?;
        placed_on(&cluster, 1, &[2, 3, 4]).await?;
        let killed_at = std::time::Instant::now();
        cluster.nodes[0].kill9();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let acked = stop_producing(stop, sending).await?;
        // Measured, not asserted (speed targets live in benchmarks): the slowest
        // acknowledgement while brokers were added and removed (answered before the kill), and
        // of those in flight at or sent after the kill of the removed broker (the client's
        // first broker: its connections fail over).
        let took_of: std::collections::HashMap<std::time::Instant, Duration> =
            acked.iter().map(|(_, sent, took)| (*sent, *took)).collect();
        let acked_before = |sent: &std::time::Instant, at: std::time::Instant| *sent + took_of[sent] < at;
        let slowest = |during: &dyn Fn(&std::time::Instant) -> bool| {
            acked.iter().filter(|(_, sent, _)| during(sent)).map(|(_, _, took)| *took).max().unwrap_or_default()
        };
        eprintln!(
            "{} values acknowledged; the slowest took {:?} while brokers were added and removed, {:?} around the kill",
            acked.len(),
            slowest(&|sent| acked_before(sent, killed_at)),
            slowest(&|sent| !acked_before(sent, killed_at)),
        );
        // Still served: a topic created now is placed on the brokers left.
        let after = cluster.client_of(3).await?;
        cluster.create_topic(&after, "after", 3, 3).await?;
        // A broker added but never started can be removed again (the change is undone), and
        // the partitions that took it as a learner drop it.
        let never = format!("127.0.0.1:{}", free_udp_port());
        after.admin().add_broker(5, &never).await?;
        after.admin().remove_broker(5).await?;
        placed_on(&cluster, 1, &[2, 3, 4]).await?;
        // A removed id is not used again (its old replicas could count a wrong majority).
        let again = after.admin().add_broker(1, &cluster.nodes[0].addr.to_string()).await;
        anyhow::ensure!(
            again.as_ref().is_err_and(|e| e.to_string().contains("not used again")),
            "adding removed broker 1 again: {again:?}"
        );
        // Requests that can never be made fail at once, with what is wrong.
        let zero = after.admin().add_broker(0, &never).await;
        anyhow::ensure!(zero.as_ref().is_err_and(|e| e.to_string().contains("start at 1")), "{zero:?}");
        let taken = cluster.nodes[1].addr.to_string();
        let twice = after.admin().add_broker(9, &taken).await;
        anyhow::ensure!(twice.as_ref().is_err_and(|e| e.to_string().contains("already at")), "{twice:?}");
        let unknown = after.admin().remove_broker(9).await;
        anyhow::ensure!(unknown.as_ref().is_err_and(|e| e.to_string().contains("no broker 9")), "{unknown:?}");

        // The joined broker restarts (--join again) and serves what it holds.
        cluster.nodes[3].restart_graceful().await?;
        placed_on(&cluster, 3, &[2, 3, 4]).await?;
        // Every acknowledged value is in its partition, read through the new broker.
        all_there(&cluster.client_of(3).await?, &acked).await?;
        Ok(())
    })
    .await
}

/// The moves go on across a kill -9: broker 4 is added and, while partitions move to it, broker
/// 2 (a leader of some of them, perhaps the controller's) is killed and started again. The
/// groups' new leaders carry on from the configuration they applied; every partition ends on
/// its placement over the four brokers and every acknowledged value is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_carry_on_across_a_leaders_kill() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = test_dir()?;
        let (mut cluster, admin) = three_with_topic(dir.path(), 3).await?;
        let (stop, sending) = produce_throughout(&admin);
        tokio::time::sleep(Duration::from_millis(500)).await;
        add_broker(&mut cluster, &admin, dir.path(), 4, Via::Sdk).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.nodes[1].kill9();
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.nodes[1].restart().await?;
        placed_on(&cluster, 3, &[1, 2, 3, 4]).await?;
        placed_on(&cluster, 1, &[1, 2, 3, 4]).await?;
        let acked = stop_producing(stop, sending).await?;
        all_there(&cluster.client_of(3).await?, &acked).await?;
        all_there(&cluster.client_of(1).await?, &acked).await
    })
    .await
}

/// A topic of 2 replicas (a majority of 2 is 2) moves off a removed broker: the broker being
/// removed keeps its replicas serving until the change that removes each commits, so no group
/// loses its majority on the way (a replica that stopped as soon as its broker was placed
/// elsewhere left such a group without a leader for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_replica_topic_moves_off_a_removed_broker() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = test_dir()?;
        let (mut cluster, admin) = three_with_topic(dir.path(), 2).await?;
        let (stop, sending) = produce_throughout(&admin);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Through the CLI, as the README shows it.
        add_broker(&mut cluster, &admin, dir.path(), 4, Via::Cli).await?;
        placed_with(&cluster, 3, &[1, 2, 3, 4], 2).await?;
        let removed = cli(&cluster, &["cluster", "remove-broker", "1"]).await?;
        anyhow::ensure!(removed.contains("broker 1 removed"), "{removed}");
        placed_with(&cluster, 1, &[2, 3, 4], 2).await?;
        placed_with(&cluster, 3, &[2, 3, 4], 2).await?;
        cluster.nodes[0].kill9();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let acked = stop_producing(stop, sending).await?;
        all_there(&cluster.client_of(3).await?, &acked).await
    })
    .await
}

/// A replica added while its partition's leader is a broker that joined after the topic was
/// created: the new replica starts from the topic's first configuration, which does not hold
/// that leader, and must still follow it (docs/replication.md §11; the seeded simulation
/// `sim_a_replica_added_under_a_leader_that_joined_later_catches_up` first). Broker 4 joins and
/// is made the leader of a partition it holds (its leaders killed until it leads), then broker
/// 5 joins and that partition must move onto it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_under_a_leader_that_joined_later_catches_up() -> anyhow::Result<()> {
    init_tracing();
    bounded(300, async {
        let dir = test_dir()?;
        let (mut cluster, admin) = three_with_topic(dir.path(), 3).await?;
        let place = |p: u32, brokers: &[u64]| quiver_broker::placement::replicas(TOPIC, p, brokers, 3);
        // A partition that stays on 4 once 5 joins, and moves onto 5.
        let p = (0..PARTITIONS)
            .find(|&p| {
                let (four, five) = (place(p, &[1, 2, 3, 4]), place(p, &[1, 2, 3, 4, 5]));
                four.contains(&4) && five.contains(&4) && five.contains(&5)
            })
            .ok_or_else(|| anyhow::anyhow!("no partition of {TOPIC} stays on broker 4 and moves to 5"))?;
        let (stop, sending) = produce_throughout(&admin);
        add_broker(&mut cluster, &admin, dir.path(), 4, Via::Sdk).await?;
        placed_on(&cluster, 3, &[1, 2, 3, 4]).await?;

        // Broker 4 leads partition p: its other leaders are killed (and started again) until it
        // does.
        let mut led = false;
        for _ in 0..20 {
            let leader = cluster
                .status_of(3)
                .await?
                .partitions
                .iter()
                .find(|s| s.topic == TOPIC && s.partition == p)
                .and_then(|s| s.leader);
            match leader {
                Some(4) => {
                    led = true;
                    break;
                }
                Some(l) if (1..=3).contains(&l) => {
                    let i = (l - 1) as usize;
                    cluster.nodes[i].kill9();
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    cluster.nodes[i].restart().await?;
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        anyhow::ensure!(led, "broker 4 never led partition {p}");

        // Broker 5 joins: partition p moves onto it while broker 4 leads it.
        add_broker(&mut cluster, &admin, dir.path(), 5, Via::Sdk).await?;
        placed_on(&cluster, 4, &[1, 2, 3, 4, 5]).await?;
        let acked = stop_producing(stop, sending).await?;
        all_there(&cluster.client_of(4).await?, &acked).await
    })
    .await
}
