//! A producer publishing numbered values at a steady pace in the background, recording when
//! each was sent and whether (and when) it was acknowledged; and the check a partition's log
//! must pass against those records. For the fault tests (tests/tests/cluster_faults.rs).
//!
//! Values are `<name>:<seq>` (`seq` zero-padded, counting from 0 per load), so a log read back
//! says which load wrote each record and in which order it was sent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use quiver_client::{Client, Producer, ProducerConfig, ProducerRecord};
use tokio::sync::watch;
use tokio::time::Instant;

/// What became of one value.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seq: u64,
    pub partition: u32,
    pub sent_at: Instant,
    /// When the acknowledgement arrived, or the error the send future resolved to.
    pub result: Result<Instant, String>,
}

impl Outcome {
    pub fn acked(&self) -> bool {
        self.result.is_ok()
    }
}

/// A producer task sending `<name>:<seq>` to `topic` every `period`, the partitions in turn.
#[derive(Debug)]
pub struct Load {
    pub name: String,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<u64>>,
}

impl Load {
    /// Starts publishing at once with a new producer on `client`.
    pub fn start(
        client: Client,
        config: ProducerConfig,
        topic: &str,
        partitions: u32,
        name: &str,
        period: Duration,
    ) -> Load {
        Self::with_producer(Arc::new(Producer::new(client, config)), topic, partitions, name, period)
    }

    /// Starts publishing at once with `producer` (shared: a later load may continue its
    /// sequence numbers).
    pub fn with_producer(
        producer: Arc<Producer>,
        topic: &str,
        partitions: u32,
        name: &str,
        period: Duration,
    ) -> Load {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(
            producer,
            topic.to_string(),
            partitions.max(1),
            name.to_string(),
            period,
            outcomes.clone(),
            stopped,
        ));
        Load { name: name.to_string(), outcomes, stop, task }
    }

    /// The earliest acknowledgement of a value sent at or after `t`.
    pub fn first_ack_sent_after(&self, t: Instant) -> Option<Instant> {
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        outcomes.iter().filter(|o| o.sent_at >= t).filter_map(|o| o.result.as_ref().ok().copied()).min()
    }

    /// Values acknowledged so far.
    pub fn acked(&self) -> usize {
        self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|o| o.acked()).count()
    }

    /// Waits until a value sent at or after `t` is acknowledged; returns when that happened.
    pub async fn wait_ack_sent_after(&self, t: Instant, within: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(at) = self.first_ack_sent_after(t) {
                return Ok(at);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{}: nothing sent after the fault was acknowledged within {within:?}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops sending, waits for every value's outcome and returns them all, in send order.
    pub async fn finish(self) -> anyhow::Result<Vec<Outcome>> {
        let _ = self.stop.send(true);
        let sent = self.task.await??;
        let mut outcomes = std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|e| e.into_inner()));
        outcomes.sort_by_key(|o| o.seq);
        anyhow::ensure!(
            outcomes.len() as u64 == sent,
            "{}: {sent} sent, {} outcomes",
            self.name,
            outcomes.len()
        );
        Ok(outcomes)
    }
}

async fn run(
    producer: Arc<Producer>,
    topic: String,
    partitions: u32,
    name: String,
    period: Duration,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = FuturesUnordered::new();
    let mut seq = 0u64;
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = tick.tick(), if !stopping => {
                let partition = (seq % u64::from(partitions)) as u32;
                let record = ProducerRecord::new(value(&name, seq)).partition(partition);
                let sent_at = Instant::now();
                let delivery = producer.enqueue(&topic, record).await;
                let s = seq;
                pending.push(async move {
                    let result = match delivery {
                        Ok(d) => d.await.map(|_| Instant::now()).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    Outcome { seq: s, partition, sent_at, result }
                });
                seq += 1;
            }
            Some(o) = pending.next() => outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(o),
            _ = stopped.changed(), if !stopping => stopping = true,
        }
        if stopping && pending.is_empty() {
            return Ok(seq);
        }
    }
}

/// The value a load named `name` sends as number `seq`.
pub fn value(name: &str, seq: u64) -> String {
    format!("{name}:{seq:07}")
}

/// What a partition's log must hold: for each load (by name) the outcomes of its values sent
/// to this partition.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    pub loads: BTreeMap<String, Vec<Outcome>>,
}

impl Expected {
    /// The outcomes of `load` for `partition` only.
    pub fn add(&mut self, name: &str, outcomes: &[Outcome], partition: u32) {
        let mine = outcomes.iter().filter(|o| o.partition == partition).cloned();
        self.loads.entry(name.to_string()).or_default().extend(mine);
    }

    /// Acknowledged values.
    pub fn acked(&self) -> usize {
        self.loads.values().flatten().filter(|o| o.acked()).count()
    }

    /// Checks a partition's log (its values in offset order) against what was sent:
    /// - every value was sent (by a known load, to this partition);
    /// - no value appears twice;
    /// - each load's values appear in the order they were sent;
    /// - every acknowledged value is there;
    /// - with `exact`, nothing else is (every value the log holds was acknowledged).
    pub fn check(&self, log: &[String], exact: bool) -> Result<(), String> {
        let index: BTreeMap<(&str, u64), &Outcome> = self
            .loads
            .iter()
            .flat_map(|(name, os)| os.iter().map(move |o| ((name.as_str(), o.seq), o)))
            .collect();
        let mut seen: BTreeSet<(&str, u64)> = BTreeSet::new();
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        for (pos, v) in log.iter().enumerate() {
            let (name, seq) = v
                .rsplit_once(':')
                .and_then(|(n, s)| Some((n, s.parse::<u64>().ok()?)))
                .ok_or_else(|| format!("record {pos} holds {v:?}, which no load sends"))?;
            let outcome = index
                .get(&(name, seq))
                .ok_or_else(|| format!("record {pos} holds {v:?}, which was never sent to this partition"))?;
            if !seen.insert((name, seq)) {
                return Err(format!("record {pos} holds {v:?} a second time"));
            }
            if let Some(&before) = last.get(name) {
                if seq < before {
                    return Err(format!(
                        "record {pos} holds {v:?} after {}: out of send order",
                        value(name, before)
                    ));
                }
            }
            last.insert(name, seq);
            if exact && !outcome.acked() {
                return Err(format!(
                    "record {pos} holds {v:?}, which was never acknowledged ({:?})",
                    outcome.result
                ));
            }
        }
        let missing: Vec<String> = self
            .loads
            .iter()
            .flat_map(|(name, os)| os.iter().filter(|o| o.acked()).map(move |o| (name.as_str(), o.seq)))
            .filter(|k| !seen.contains(k))
            .map(|(name, seq)| value(name, seq))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{} acknowledged values are missing, the first: {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            ));
        }
        Ok(())
    }
}

/// The median and the largest of `samples`.
pub fn p50_max(samples: &[Duration]) -> (Duration, Duration) {
    let mut s = samples.to_vec();
    s.sort();
    let p50 = s.get(s.len().saturating_sub(1) / 2).copied().unwrap_or_default();
    (p50, s.last().copied().unwrap_or_default())
}
