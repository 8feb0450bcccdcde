//! One fault run: a cluster behind proxies, the workload, the nemesis, the heal and quiet
//! period, the final reads, the check.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quiver_client::Acks;
use tokio::sync::watch;
use tokio::time::Instant;

use super::checker::{self, Report};
use super::history::{self, Event, Recorder, Type};
use super::nemesis::{schedule, FaultKind, Nemesis};
use super::rng::Rng;
use super::workload::{self, ConsumerSpec, ProducerSpec, Progress, GROUP};
use crate::Cluster;

/// The topic every run writes.
pub const TOPIC: &str = "faults";

/// A run the checker must flag, proving it can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegativeControl {
    /// Producers use acks=leader; the nemesis isolates a partition's leader (it keeps
    /// answering its clients alone, acks=leader once its own log has a batch), then kills it:
    /// what it acknowledged alone is cut when it rejoins, and the checker reports it `lost`.
    AcksLeader,
    /// The topic is created with durability = os (a replica fsyncs every 30 s) and every step
    /// is a power loss of every broker at once: what was acknowledged since the last fsync is
    /// gone from every replica, and the checker reports it `lost`.
    FsyncOff,
}

impl std::str::FromStr for NegativeControl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "acks-leader" => Ok(NegativeControl::AcksLeader),
            "fsync-off" => Ok(NegativeControl::FsyncOff),
            other => Err(format!("unknown negative control '{other}' (acks-leader, fsync-off)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The quiverd binary.
    pub quiverd: PathBuf,
    /// How long the nemesis runs (the heal, quiet period and final reads come after).
    pub duration: Duration,
    pub seed: u64,
    pub brokers: u64,
    pub partitions: u32,
    pub faults: Vec<FaultKind>,
    pub producers: usize,
    pub consumers: usize,
    /// Where the history, the summary and the brokers' data (and logs) go.
    pub out: PathBuf,
    pub negative_control: Option<NegativeControl>,
    /// Anomaly kinds reported but not failing (already expanded, see `checker::expand_allow`).
    pub allow: BTreeSet<String>,
    /// Process faults (kill, pause, restart, corrupt, power-loss) leave the group's coordinator alone.
    pub spare_coordinator: bool,
}

impl RunConfig {
    pub fn new(quiverd: impl Into<PathBuf>, out: impl Into<PathBuf>, seed: u64, duration: Duration) -> Self {
        RunConfig {
            quiverd: quiverd.into(),
            duration,
            seed,
            brokers: 3,
            partitions: 3,
            faults: FaultKind::ALL.to_vec(),
            producers: 3,
            consumers: 2,
            out: out.into(),
            negative_control: None,
            allow: BTreeSet::new(),
            spare_coordinator: false,
        }
    }
}

#[derive(Debug)]
pub struct RunOutcome {
    pub report: Report,
    pub history: PathBuf,
}

/// How long the quiet period may wait for the group to be delivered every acknowledged value.
const DRAIN_MAX: Duration = Duration::from_secs(45);
/// How long the brokers may take to agree on each partition's high watermark after the heal.
const SETTLE_MAX: Duration = Duration::from_secs(60);

/// Runs the whole thing and checks the history. An error means the harness itself could not
/// run (a broker that would not start at all, say); anomalies are in the report.
pub async fn run(cfg: &RunConfig) -> anyhow::Result<RunOutcome> {
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let history_path = cfg.out.join("history.jsonl");
    let rec = Recorder::create(&history_path)?;
    let leader_kills = cfg.negative_control == Some(NegativeControl::AcksLeader);
    let fsync_off = cfg.negative_control == Some(NegativeControl::FsyncOff);
    // Clock steps need libfaketime; without it they are left out, loudly.
    let faketime = crate::FakeClock::find_lib();
    let mut kinds = cfg.faults.clone();
    if kinds.contains(&FaultKind::Clock) && faketime.is_none() {
        kinds.retain(|k| *k != FaultKind::Clock);
        let why = "clock steps left out: libfaketime not found (apt-get install libfaketime, or set QUIVER_FAKETIME_LIB)";
        eprintln!("  {why}");
        rec.record(Event::new("harness", Type::Info, "faults-left-out").error(why));
    }
    let steps =
        schedule(cfg.seed, cfg.duration, cfg.brokers as usize, cfg.partitions, &kinds, cfg.negative_control);
    let clock_steps = steps.iter().any(|s| matches!(s.fault, super::nemesis::Fault::ClockStep { .. }));
    let power_loss = steps.iter().any(|s| matches!(s.fault, super::nemesis::Fault::PowerLoss(_)));
    let faults: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    rec.record(Event {
        seed: Some(cfg.seed),
        fault: Some(format!(
            "duration {:?}, brokers {}, partitions {}, faults {}, negative control {:?}, {} steps",
            cfg.duration,
            cfg.brokers,
            cfg.partitions,
            faults.join(","),
            cfg.negative_control,
            steps.len()
        )),
        ..Event::new("harness", Type::Ok, "run")
    });
    for (i, s) in steps.iter().enumerate() {
        eprintln!("  step {i:>2} at {:>6} ms, hold {:>5} ms: {:?}", s.at_ms, s.hold_ms, s.fault);
    }

    let dir = cfg.out.join("cluster");
    let quiverd = cfg.quiverd.to_string_lossy().into_owned();
    // The sync ledgers (a test-only broker hook) only where a power loss will read them.
    let mut cluster = Cluster::start_with_proxies_seeded(
        &quiverd,
        &dir,
        cfg.brokers,
        cfg.seed,
        power_loss,
        faketime.as_deref().filter(|_| clock_steps),
    )
    .await?;
    let admin = cluster.client().await?;
    let replicas = cfg.brokers.min(3) as u16;
    // The default durability is `always` (fsync before a batch counts towards a commit).
    let mut topic = quiver_client::TopicConfig::default().with_replicas(replicas);
    if fsync_off {
        topic = topic.with_durability(quiver_client::Durability::Os);
    }
    cluster.create_topic_with(&admin, TOPIC, cfg.partitions, topic).await?;
    cluster.topic_everywhere(TOPIC, Duration::from_secs(30)).await?;
    rec.record(Event::new("harness", Type::Ok, "create-topic").tp(TOPIC, cfg.partitions));

    let progress = Arc::new(Progress::default());
    let (stop_producers, producers_stop) = watch::channel(false);
    let (stop_consumers, consumers_stop) = watch::channel(false);
    let mut rng = Rng::new(Rng::derive(cfg.seed, 0x776f_726b));
    // Every member gets the same broker list in the same order: the first is the broker they
    // talk to (the group's coordinator is the leader of its `__offsets` partition, wherever
    // that is; before group state was replicated it was this broker).
    let mut order: Vec<usize> = (0..cluster.nodes.len()).collect();
    rng.shuffle(&mut order);
    let coordinator = order[0];
    rec.record(Event { node: Some(coordinator), ..Event::new("harness", Type::Ok, "group-coordinator") });
    eprintln!(
        "  group coordinator: broker {}{}",
        coordinator + 1,
        if cfg.spare_coordinator { " (spared by process faults)" } else { "" }
    );
    let mut consumers = Vec::new();
    for index in 0..cfg.consumers {
        let spec = ConsumerSpec {
            index,
            nack: 0.05,
            commit_every: Duration::from_millis(rng.between(300, 2_000)),
            seed: rng.next_u64(),
        };
        let client = workload::client_in_order(&cluster, &order).await?;
        consumers.push(tokio::spawn(workload::consume(
            client,
            spec,
            TOPIC.into(),
            rec.clone(),
            progress.clone(),
            consumers_stop.clone(),
        )));
    }
    let mut producers = Vec::new();
    for index in 0..cfg.producers {
        let spec = ProducerSpec {
            index,
            acks: if leader_kills { Acks::Leader } else { Acks::All },
            // Producer 0 is always idempotent, the others as the seed says.
            idempotent: index == 0 || rng.chance(0.5),
            period: Duration::from_millis(rng.between(5, 25)),
            seed: rng.next_u64(),
        };
        eprintln!("  producer-{index}: {spec:?}");
        let client = workload::client(&cluster, &mut rng).await?;
        producers.push(tokio::spawn(workload::produce(
            client,
            spec,
            TOPIC.into(),
            cfg.partitions,
            rec.clone(),
            progress.clone(),
            producers_stop.clone(),
        )));
    }

    let start = Instant::now();
    let mut nemesis = Nemesis {
        cluster: &mut cluster,
        rec: rec.clone(),
        topic: TOPIC.into(),
        spare: cfg.spare_coordinator.then_some(coordinator),
    };
    let nemesis_result = nemesis.run(&steps, start, start + cfg.duration).await;
    if let Err(e) = &nemesis_result {
        rec.record(Event::new("nemesis", Type::Info, "nemesis").error(format!("{e:#}")));
    }
    tokio::time::sleep_until(start + cfg.duration).await;
    eprintln!("nemesis done; healed; quiet period");

    // Quiet: the producers stop and wait for their outcomes (20 s delivery timeout at most).
    let _ = stop_producers.send(true);
    for p in producers {
        match tokio::time::timeout(Duration::from_secs(60), p).await {
            Ok(Ok(Ok(()))) => {}
            other => {
                rec.record(Event::new("harness", Type::Info, "producers-stopped").error(format!("{other:?}")))
            }
        }
    }
    for p in 0..cfg.partitions {
        if let Err(e) = cluster.settled_high_watermark(TOPIC, p, SETTLE_MAX).await {
            rec.record(Event::new("harness", Type::Info, "settle").tp(TOPIC, p).error(format!("{e:#}")));
        }
    }
    // Without consumers nothing is ever delivered: no drain to wait for.
    let drained = Instant::now() + DRAIN_MAX;
    while cfg.consumers > 0 && progress.undelivered() > 0 && Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_consumers.send(true);
    for c in consumers {
        match tokio::time::timeout(Duration::from_secs(30), c).await {
            Ok(Ok(Ok(()))) => {}
            other => {
                rec.record(Event::new("harness", Type::Info, "consumers-stopped").error(format!("{other:?}")))
            }
        }
    }

    final_reads(&cluster, coordinator, cfg.partitions, &rec).await;
    admin.close().await;
    rec.flush()?;
    drop(cluster);

    let events = history::load(&history_path)?;
    let report = checker::check(&events, &cfg.allow);
    std::fs::write(cfg.out.join("summary.json"), serde_json::to_string_pretty(&report)?)?;
    nemesis_result
        .context("the nemesis failed (the run was checked anyway)")
        .map(|()| RunOutcome { report, history: history_path })
}

/// The group's committed offsets (from its coordinator: groups are kept per broker), then every
/// broker's log of every partition, into the history.
async fn final_reads(cluster: &Cluster, coordinator: usize, partitions: u32, rec: &Recorder) {
    let offsets = async {
        let client = cluster.client_of(coordinator).await?;
        let offsets = client.admin().group_offsets(GROUP, TOPIC).await;
        client.close().await;
        Ok::<_, anyhow::Error>(offsets?)
    };
    match tokio::time::timeout(Duration::from_secs(20), offsets).await {
        Ok(Ok(offsets)) => {
            for o in offsets {
                let mut e = Event::new("harness", Type::Ok, "read-committed").tp(TOPIC, o.partition);
                e.offset = o.committed;
                rec.record(e);
            }
        }
        other => rec.record(Event::new("harness", Type::Info, "read-committed").error(format!("{other:?}"))),
    }
    for node in cluster.members() {
        for p in 0..partitions {
            let e = Event { node: Some(node), ..Event::new("harness", Type::Ok, "read-log").tp(TOPIC, p) };
            let read = async {
                let client = cluster.client_of(node).await?;
                let log = crate::read_partition(&client, TOPIC, p).await;
                client.close().await;
                log
            };
            match tokio::time::timeout(Duration::from_secs(30), read).await {
                Ok(Ok(log)) => {
                    let log =
                        log.into_iter().map(|(o, v)| (o, String::from_utf8_lossy(&v).into_owned())).collect();
                    rec.record(Event { log: Some(log), ..e });
                }
                Ok(Err(err)) => {
                    // A broker that found the damage by CRC and refused to serve it says so
                    // with CorruptLog: the checker tells that apart from a broker that failed.
                    let refused = err.chain().any(|c| {
                        c.downcast_ref::<quiver_client::ClientError>()
                            .is_some_and(|e| e.code() == Some(quiver_client::ErrorCode::CorruptLog))
                    });
                    let why = if refused { format!("CorruptLog: {err:#}") } else { format!("{err:#}") };
                    rec.record(Event { kind: Type::Fail, ..e }.error(why))
                }
                Err(_) => rec.record(Event { kind: Type::Fail, ..e }.error("no whole log within 30 s")),
            }
        }
    }
}
