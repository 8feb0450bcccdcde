//! Dead-letter writes, out of the delivery loops (design.md §12). A subscription hands the
//! writer the batches holding its exhausted records; the writer decodes them, rebuilds a batch
//! with the origin headers, creates `<topic>.dlq` if needed, appends, and reports back. Only
//! then does the subscription count the records as done: a record is never both unacknowledged
//! and missing from the dead letters.
//!
//! One broker-wide writer of a few shards, each a task with a bounded queue; a dead-letter
//! topic always goes to the same shard, so its letters keep their order, and a slow one holds
//! back only the subscriptions that write to its shard (each has at most one write, of one
//! delivery's batches, outstanding), never memory.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use quiver_protocol::batch::{BatchBuilder, BatchSplitter, RecordIter};
use quiver_protocol::ledger::{DELIVERY_COUNT, ORIGIN_OFFSET, ORIGIN_PARTITION, ORIGIN_TOPIC};
use quiver_protocol::{ErrorCode, TopicConfig};
use tokio::sync::mpsc;

use crate::partition::{Partition, PartitionError};
use crate::topics::Topics;

/// Writer tasks; a dead-letter topic's name picks one.
const SHARDS: usize = 4;
/// Writes queued per shard before a subscription that adds one waits.
const QUEUE: usize = 16;

/// The outcome of one write: its ranges, and whether they are appended.
pub(crate) type Written = (Vec<Range<u64>>, bool);

/// Records of one delivery to dead-letter.
pub(crate) struct Job {
    pub topics: Arc<Topics>,
    /// Partitions the broker may hold (a default dead-letter topic created here counts).
    pub max_partitions_total: u32,
    /// The dead-letter topic (checked at subscribe: `<topic>.dlq` or one that existed).
    pub target: String,
    /// Whether `target` is the source topic's default dead-letter topic, created if missing.
    pub create_if_missing: bool,
    /// Where the records come from.
    pub source: Arc<Partition>,
    /// The batches holding them, as read.
    pub parts: Vec<Bytes>,
    /// The offsets to dead-letter, with their delivery counts.
    pub records: Vec<(Range<u64>, u32)>,
    /// The same offsets as merged ranges, reported back with the outcome.
    pub ranges: Vec<Range<u64>>,
    /// Where the outcome goes (the subscription; gone if it ended).
    pub done: mpsc::Sender<Written>,
    /// In a cluster: the default dead-letter topic is created through the controller (with
    /// `replicas` replicas, the source topic's), and letters go to its partition's leader.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    pub replicas: u16,
}

#[derive(Debug)]
pub struct DeadLetterWriter {
    shards: Vec<mpsc::Sender<Job>>,
}

impl DeadLetterWriter {
    /// Starts the writer's tasks (on the current runtime; they end with it, or when the writer
    /// is dropped).
    pub fn start() -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(run(rx));
                tx
            })
            .collect();
        DeadLetterWriter { shards }
    }

    /// Queues a write; waits while its shard's queue is full. The outcome goes to `job.done`.
    pub(crate) async fn submit(&self, job: Job) -> Result<(), PartitionError> {
        let shard =
            job.target.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize)) % SHARDS;
        self.shards[shard]
            .send(job)
            .await
            .map_err(|_| PartitionError::new(ErrorCode::ShuttingDown, "dead-letter writer stopped"))
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("target", &self.target).field("records", &self.records).finish()
    }
}

async fn run(mut jobs: mpsc::Receiver<Job>) {
    while let Some(job) = jobs.recv().await {
        let written = match write_retrying(&job).await {
            Ok(()) => true,
            Err(e) => {
                let p = &job.source;
                tracing::warn!(topic = %p.topic, partition = p.id, dead_letter_topic = %job.target, "could not write dead letters ({e}); they stay pending");
                false
            }
        };
        // The subscription may have ended meanwhile: its records are then handed out again by
        // the next session (and may be dead-lettered twice: at-least-once).
        let _ = job.done.send((job.ranges, written)).await;
    }
}

/// How long a write that fails for a passing reason (an election, a leader moving) is tried
/// again before its records go back to the subscription (which hands them out again).
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// [`write`], tried again while it fails with a retriable error, for up to [`RETRY_FOR`].
async fn write_retrying(job: &Job) -> Result<(), PartitionError> {
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match write(job).await {
            Err(e) if e.code.is_retriable() && tokio::time::Instant::now() + backoff < deadline => {
                tracing::debug!(dead_letter_topic = %job.target, "writing dead letters: {e}; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
            result => return result,
        }
    }
}

fn corrupt(e: impl std::fmt::Display) -> PartitionError {
    PartitionError::new(ErrorCode::CorruptBatch, e.to_string())
}

/// Writes the records of the job to the dead-letter topic, with headers naming their origin,
/// and waits until they are appended there.
async fn write(job: &Job) -> Result<(), PartitionError> {
    let (topics, name, p) = (&job.topics, job.target.as_str(), &job.source);
    let topic = match topics.get(name) {
        Ok(t) => t,
        Err(e) if !job.create_if_missing => return Err(e),
        Err(_) => match &job.cluster {
            // Every broker must know it, and its data must be replicated as the source's is:
            // created like any topic, through the controller's log.
            Some(cluster) => {
                let config = TopicConfig::default().with_replicas(job.replicas.max(1));
                let request = quiver_protocol::message::Message::CreateTopic {
                    name: name.to_string(),
                    partitions: 1,
                    config: config.clone(),
                };
                let command = crate::cluster::Command::CreateTopic {
                    name: name.to_string(),
                    partitions: 1,
                    config,
                    brokers: None,
                };
                match cluster.run_command(command, &request).await {
                    Ok(()) => {}
                    Err(e) if e.code == ErrorCode::TopicExists => {}
                    Err(e) => return Err(e),
                }
                cluster.wait_for_topic(topics, name).await.ok_or_else(|| {
                    PartitionError::new(
                        ErrorCode::UnknownTopic,
                        format!("dead-letter topic '{name}' not applied here yet"),
                    )
                })?
            }
            None => {
                let config = TopicConfig::default();
                match topics.create(name, 1, config, job.max_partitions_total).await {
                    Ok(t) => t,
                    Err(e) if e.code == ErrorCode::TopicExists => topics.get(name)?,
                    Err(e) => return Err(e),
                }
            }
        },
    };
    let target = topic.partition(0)?.clone();
    let mut builder = BatchBuilder::new(4096);
    let (topic_name, partition) = (p.topic.to_string(), p.id.to_string());
    for part in &job.parts {
        for item in BatchSplitter::new(part.clone()) {
            let (header, batch) = item.map_err(corrupt)?;
            for record in RecordIter::new(batch, header) {
                let r = record.map_err(corrupt)?;
                let Some((_, count)) = job.records.iter().find(|(d, _)| d.contains(&r.offset)) else {
                    continue;
                };
                let (offset, count) = (r.offset.to_string(), count.to_string());
                let mut headers: Vec<(&str, &[u8])> =
                    r.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())).collect();
                headers.push((ORIGIN_TOPIC, topic_name.as_bytes()));
                headers.push((ORIGIN_PARTITION, partition.as_bytes()));
                headers.push((ORIGIN_OFFSET, offset.as_bytes()));
                headers.push((DELIVERY_COUNT, count.as_bytes()));
                builder.push(r.timestamp, r.key.as_deref(), &r.value, &headers);
                tracing::info!(topic = %p.topic, partition = p.id, offset = r.offset, dead_letter_topic = %name, deliveries = %count, "message dead-lettered");
            }
        }
    }
    if builder.is_empty() {
        return Ok(());
    }
    let batch = quiver_protocol::batch::ValidatedBatch::new(builder.finish())
        .map_err(|e| PartitionError::new(ErrorCode::BatchTooLarge, format!("dead-letter batch: {e}")))?;
    append(job, name, &target, batch).await?;
    metrics::counter!("quiver_dead_letters_total", "topic" => p.topic.to_string())
        .increment(job.records.iter().map(|(r, _)| r.end - r.start).sum());
    Ok(())
}

/// Appends the letters' batch to the dead-letter partition: here when this broker leads it (or
/// on one node), else through its leader (a `Produce` with `acks = all` over the peer link).
/// Done once committed: a letter counts as written only when it survives a broker's loss.
async fn append(
    job: &Job,
    name: &str,
    target: &Arc<Partition>,
    batch: quiver_protocol::batch::ValidatedBatch,
) -> Result<(), PartitionError> {
    let leader = match &job.cluster {
        Some(cluster) if target.is_replicated() => {
            let Some((group, _)) = cluster.group(name, 0) else {
                return Err(PartitionError::new(
                    ErrorCode::NotLeader,
                    format!("broker {} holds no replica of dead-letter topic '{name}'", cluster.node_id()),
                ));
            };
            // A dead-letter topic created a moment ago elects its first leader now.
            let mut status = group.status.clone();
            let elected = tokio::time::timeout(
                crate::cluster::FORWARD_TIMEOUT,
                status.wait_for(|s| s.leader.is_some()),
            );
            let leader = match elected.await {
                Ok(Ok(s)) => s.leader,
                _ => None,
            };
            match leader {
                Some(l) if l == cluster.node_id() => None,
                Some(l) => Some((cluster, l)),
                None => return Err(PartitionError::new(ErrorCode::NotLeader, "no leader elected yet")),
            }
        }
        _ => None,
    };
    let Some((cluster, l)) = leader else {
        let appended = target.submit(batch).await?;
        return appended
            .await
            .map_err(|_| PartitionError::new(ErrorCode::ShuttingDown, "partition is closing"))?
            .map(drop);
    };
    let request = quiver_protocol::message::Message::Produce {
        topic: name.to_string(),
        partition: 0,
        acks: quiver_protocol::Acks::All,
        batch: batch.freeze(),
    };
    match cluster.links.request(l, &request, crate::cluster::FORWARD_TIMEOUT).await? {
        quiver_protocol::message::Message::ProduceOk { .. } => Ok(()),
        quiver_protocol::message::Message::Error { code, message, .. } => {
            Err(PartitionError::new(code, message))
        }
        other => Err(PartitionError::new(
            ErrorCode::Internal,
            format!("the dead-letter partition's leader answered kind {}", other.kind()),
        )),
    }
}
