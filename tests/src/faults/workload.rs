//! The workload of a fault run: producers sending unique values (`p<k>-<seq>`) to chosen
//! partitions and group consumers that ack, sometimes nack, and commit, every operation
//! recorded in the history. Each process draws its choices (partition, pace, ack or nack,
//! when to commit) from its own seeded RNG.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use quiver_client::{
    Acks, Client, ClientConfig, Consumer, ConsumerConfig, ConsumerEvent, Producer, ProducerConfig,
    ProducerRecord, StartPosition,
};
use tokio::sync::watch;

use super::history::{Event, Recorder, Type};
use super::rng::Rng;
use crate::Cluster;

/// The consumer group of a run.
pub const GROUP: &str = "faults";

/// Values the producers had acknowledged and the group was delivered, so the run knows when
/// the group has caught up.
#[derive(Debug, Default)]
pub struct Progress {
    pub acked: Mutex<HashSet<String>>,
    pub delivered: Mutex<HashSet<String>>,
}

impl Progress {
    /// Acknowledged values the group has not been delivered yet.
    pub fn undelivered(&self) -> usize {
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        let delivered = self.delivered.lock().unwrap_or_else(|e| e.into_inner());
        acked.iter().filter(|v| !delivered.contains(*v)).count()
    }
}

/// Client timeouts for the workload: a killed or paused broker is left after 3 s of silence
/// (the QUIC idle timeout) rather than the default 30 s.
pub fn client_timeouts(c: ClientConfig) -> ClientConfig {
    c.with_connect_timeout(Duration::from_secs(2)).with_idle_timeout(Duration::from_secs(3))
}

/// A client of the cluster given the brokers in a seeded order.
pub async fn client(cluster: &Cluster, rng: &mut Rng) -> anyhow::Result<Client> {
    let mut order: Vec<usize> = (0..cluster.nodes.len()).collect();
    rng.shuffle(&mut order);
    client_in_order(cluster, &order).await
}

/// A client of the cluster given the brokers in `order` (retried while the cluster starts).
pub async fn client_in_order(cluster: &Cluster, order: &[usize]) -> anyhow::Result<Client> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match cluster.client_in_order(order, client_timeouts).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// How a producer is set up.
#[derive(Debug, Clone)]
pub struct ProducerSpec {
    pub index: usize,
    pub acks: Acks,
    pub idempotent: bool,
    /// Time between two sends.
    pub period: Duration,
    pub seed: u64,
}

/// Sends until `stop`, then waits for every outcome; records everything.
pub async fn produce(
    client: Client,
    spec: ProducerSpec,
    topic: String,
    partitions: u32,
    rec: Recorder,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let process = format!("producer-{}", spec.index);
    let acks = match spec.acks {
        Acks::Leader => "leader",
        Acks::None => "none",
        _ => "all",
    };
    let config = ProducerConfig::default()
        .with_acks(spec.acks)
        .with_idempotent(spec.idempotent)
        .with_delivery_timeout(Duration::from_secs(20))
        .with_linger(Duration::from_millis(2));
    let producer = Producer::new(client.clone(), config);
    let mut rng = Rng::new(spec.seed);
    let mut tick = tokio::time::interval(spec.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = FuturesUnordered::new();
    let mut seq = 0u64;
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = tick.tick(), if !stopping => {
                let partition = rng.below(u64::from(partitions)) as u32;
                let value = format!("p{}-{seq}", spec.index);
                seq += 1;
                rec.record(Event {
                    idempotent: Some(spec.idempotent),
                    acks: Some(acks.into()),
                    ..Event::new(&process, Type::Invoke, "produce").tp(&topic, partition).value(&value)
                });
                let record = ProducerRecord::new(value.clone()).partition(partition);
                let delivery = producer.enqueue(&topic, record).await;
                pending.push(async move {
                    match delivery {
                        Ok(d) => (value, partition, d.await.map_err(|e| (e, true))),
                        Err(e) => (value, partition, Err((e, false))),
                    }
                });
            }
            Some((value, partition, result)) = pending.next() => {
                let e = Event::new(&process, Type::Ok, "produce").tp(&topic, partition).value(&value);
                match result {
                    Ok(meta) => {
                        rec.record(Event { offset: meta.offset, ..e });
                        progress.acked.lock().unwrap_or_else(|e| e.into_inner()).insert(value);
                    }
                    // Refused before it was sent: certainly not written.
                    Err((err, false)) => rec.record(Event { kind: Type::Fail, ..e }.error(err)),
                    // Sent, then failed: it may have been written.
                    Err((err, true)) => rec.record(Event { kind: Type::Info, ..e }.error(err)),
                }
            }
            _ = stop.changed(), if !stopping => stopping = true,
        }
        if stopping && pending.is_empty() {
            break;
        }
    }
    drop(producer);
    client.close().await;
    Ok(())
}

/// How a group consumer is set up.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub index: usize,
    /// Probability of nacking a delivery instead of acking it.
    pub nack: f64,
    /// Time between two commits.
    pub commit_every: Duration,
    pub seed: u64,
}

/// Reads as a member of [`GROUP`] until `stop`: each delivery recorded, acked (or nacked),
/// commits every `commit_every`, a new session after its stream fails. At `stop` it commits
/// once more and leaves.
pub async fn consume(
    cluster_client: Client,
    spec: ConsumerSpec,
    topic: String,
    rec: Recorder,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let process = format!("consumer-{}", spec.index);
    let mut rng = Rng::new(spec.seed);
    let mut session = 0u64;
    while !*stop.borrow() {
        session += 1;
        rec.record(Event::new(&process, Type::Invoke, "subscribe").session(session));
        let config = ConsumerConfig::new(&topic)
            .group(GROUP)
            .start(StartPosition::Earliest)
            .with_session_timeout(Duration::from_secs(6));
        let mut consumer = match Consumer::subscribe(cluster_client.clone(), config).await {
            Ok(c) => c,
            Err(e) => {
                rec.record(Event::new(&process, Type::Fail, "subscribe").session(session).error(e));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        rec.record(Event::new(&process, Type::Ok, "subscribe").session(session));
        let events = consumer.events().map(|mut rx| {
            let (rec, process) = (rec.clone(), process.clone());
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    let (f, ps) = match ev {
                        ConsumerEvent::Assigned(ps) => ("assign", ps),
                        ConsumerEvent::Revoked(ps) => ("revoke", ps),
                        _ => continue,
                    };
                    rec.record(Event {
                        partitions: Some(ps),
                        ..Event::new(&process, Type::Ok, f).session(session)
                    });
                }
            })
        });
        let mut commit_at = tokio::time::Instant::now() + spec.commit_every;
        let ended = loop {
            let next = tokio::select! {
                n = tokio::time::timeout(Duration::from_millis(300), consumer.next()) => n,
                _ = stop.changed() => break None,
            };
            match next {
                Ok(Some(Ok(m))) => {
                    let value = String::from_utf8_lossy(&m.value).into_owned();
                    rec.record(Event {
                        delivery_count: Some(m.delivery_count),
                        ..Event::new(&process, Type::Ok, "deliver")
                            .tp(&topic, m.partition)
                            .offset(m.offset)
                            .value(&value)
                            .session(session)
                    });
                    progress.delivered.lock().unwrap_or_else(|e| e.into_inner()).insert(value.clone());
                    let f = if rng.chance(spec.nack) { "nack" } else { "ack" };
                    if f == "nack" {
                        m.nack(Some(Duration::from_millis(rng.between(0, 500))));
                    } else {
                        m.ack();
                    }
                    rec.record(
                        Event::new(&process, Type::Ok, f)
                            .tp(&topic, m.partition)
                            .offset(m.offset)
                            .session(session),
                    );
                }
                Ok(Some(Err(e))) => break Some(e.to_string()),
                Ok(None) => break Some("stream ended".into()),
                Err(_) => {}
            }
            if tokio::time::Instant::now() >= commit_at {
                commit(&consumer, &process, session, &rec).await;
                commit_at = tokio::time::Instant::now() + spec.commit_every;
            }
        };
        if let Some(e) = &ended {
            rec.record(Event::new(&process, Type::Info, "session-end").session(session).error(e));
        }
        commit(&consumer, &process, session, &rec).await;
        tokio::time::timeout(Duration::from_secs(10), consumer.close()).await.ok();
        if let Some(t) = events {
            t.abort();
        }
        if ended.is_some() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    cluster_client.close().await;
    Ok(())
}

async fn commit(consumer: &Consumer, process: &str, session: u64, rec: &Recorder) {
    rec.record(Event::new(process, Type::Invoke, "commit").session(session));
    let done = Event::new(process, Type::Ok, "commit").session(session);
    match tokio::time::timeout(Duration::from_secs(10), consumer.commit()).await {
        Ok(Ok(report)) => rec.record(Event {
            offsets: Some(report.committed),
            partitions: (!report.revoked.is_empty()).then_some(report.revoked),
            ..done
        }),
        // Partitions before the one that failed may have been committed: unknown, not failed.
        Ok(Err(e)) => rec.record(Event { kind: Type::Info, ..done }.error(e)),
        Err(_) => rec.record(Event { kind: Type::Info, ..done }.error("no answer within 10 s")),
    }
}
