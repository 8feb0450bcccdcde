//! Background work: retention, persisting lazily committed offsets, and the final flush at
//! shutdown.

use std::sync::Arc;
use std::time::Duration;

use quiver_protocol::limits::VERIFY_BYTES_PER_SEC;

use crate::state::BrokerState;

/// Runs `work` on a blocking thread every `period` until shutdown.
async fn every(state: Arc<BrokerState>, period: Duration, work: fn(&BrokerState)) {
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let st = state.clone();
        let _ = tokio::task::spawn_blocking(move || work(&st)).await;
    }
}

/// Starts every periodic job: retention, persisting lazily committed offsets, sampled gauges,
/// and expiring group members.
pub(crate) fn spawn_all(state: &Arc<BrokerState>, tasks: &mut tokio::task::JoinSet<()>) {
    let c = &state.config;
    tasks.spawn(every(state.clone(), Duration::from_millis(c.retention_check_ms), apply_retention));
    tasks.spawn(every(state.clone(), Duration::from_millis(c.offsets_flush_ms), flush_offsets));
    tasks.spawn(every(state.clone(), Duration::from_millis(c.recovery_point_ms), write_recovery_points));
    tasks.spawn(every(state.clone(), Duration::from_secs(5), sample_gauges));
    tasks.spawn(every(state.clone(), Duration::from_millis(250), |st| {
        let changed = st.groups.expire();
        crate::coordinator::record_groups_blocking(st, &changed);
    }));
    let st = state.clone();
    tasks.spawn(async move {
        let _ = tokio::task::spawn_blocking(move || verify_closed_segments(&st)).await;
    });
    if state.cluster.is_some() {
        tasks.spawn(repair_damage(state.clone()));
    }
}

/// How often a cluster broker looks for damaged batches to repair from another replica.
const REPAIR_EVERY: Duration = Duration::from_secs(5);
/// Damaged batches one partition repairs per pass (each is a fetch from a peer).
const REPAIRS_PER_PASS: usize = 16;

/// In a cluster, every [`REPAIR_EVERY`]: each damaged batch a replicated partition's log knows
/// of (recovery's spans, what reads found) below its high watermark is fetched from another
/// replica and written over the damaged bytes in place (`PartitionLog::repair_batch`, which
/// checks the copy has exactly those offsets, length and leader epoch, and that the bytes
/// there do not pass as the batch). Below the commit every replica holds the same batch byte
/// for byte, and a peer serves only committed, CRC-checked batches, so the copy is the batch
/// that was damaged. Nothing is deleted or cut: a batch that cannot be repaired stays damaged
/// (refused on read, as before), and data another replica lacks is never at risk.
async fn repair_damage(state: Arc<BrokerState>) {
    let Some(cluster) = state.cluster.clone() else { return };
    let me = cluster.node_id();
    let mut tick = tokio::time::interval(REPAIR_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        for topic in state.topics.all() {
            for p in topic.partitions.iter().filter(|p| p.is_replicated()) {
                let (log, hw) = (p.shared_log(), p.high_watermark());
                let damaged =
                    tokio::task::spawn_blocking(move || log.lock().damage_to_repair(hw, REPAIRS_PER_PASS))
                        .await
                        .unwrap_or_default();
                if damaged.is_empty() {
                    continue;
                }
                let peers: Vec<u64> = cluster
                    .partitions
                    .get(&(topic.name.to_string(), p.id))
                    .map(|e| e.value().1.iter().copied().filter(|&r| r != me).collect())
                    .unwrap_or_default();
                for offset in damaged {
                    match repair_one(&cluster, &topic.name, p, offset, &peers).await {
                        Repair::Done | Repair::Retry => {}
                        Repair::DoesNotFit => {
                            tracing::info!(topic = %topic.name, partition = p.id, offset, "a replica's copy does not fit the damaged batch here; it stays damaged");
                            let log = p.shared_log();
                            let _ =
                                tokio::task::spawn_blocking(move || log.lock().give_up_repair(offset)).await;
                        }
                    }
                }
            }
        }
    }
}

/// What one repair attempt came to.
enum Repair {
    Done,
    /// No peer served a copy now (unreachable, behind, damaged too): tried again next pass.
    Retry,
    /// A copy came but is not the one batch there (another extent): not tried again.
    DoesNotFit,
}

/// Fetches the batch at `offset` from the first of `peers` that serves it and repairs the local
/// copy with it.
async fn repair_one(
    cluster: &crate::cluster::Cluster,
    topic: &str,
    p: &Arc<crate::partition::Partition>,
    offset: u64,
    peers: &[u64],
) -> Repair {
    use quiver_protocol::batch::{Batches, ValidatedBatch};
    use quiver_protocol::message::Message;
    let request = Message::Fetch { topic: topic.to_string(), partition: p.id, offset, max_bytes: 1 };
    for &peer in peers {
        let Ok(Message::FetchOk { batches, high_watermark, .. }) = cluster.read_remote(peer, &request).await
        else {
            continue;
        };
        let Some(Ok(first)) = Batches::new(&batches).next() else { continue };
        if first.header.base_offset != offset
            || first.header.next_offset() > high_watermark.min(p.high_watermark())
        {
            continue;
        }
        let Ok(good) = ValidatedBatch::new(batches.slice(first.range())) else { continue };
        let log = p.shared_log();
        let repaired = tokio::task::spawn_blocking(move || log.lock().repair_batch(&good)).await;
        return match repaired {
            Ok(Ok(true)) => Repair::Done,
            Ok(Ok(false)) => Repair::DoesNotFit, // not one batch of those offsets here: leave it
            Ok(Err(e)) => {
                tracing::warn!(%topic, partition = p.id, offset, "repairing a damaged batch: {e}");
                Repair::Retry
            }
            Err(_) => Repair::Retry,
        };
    }
    Repair::Retry
}

/// Once after start, CRC-checks every closed segment of every partition at a bounded rate
/// (recovery read only their headers), until done or shutdown.
fn verify_closed_segments(state: &BrokerState) {
    let started = std::time::Instant::now();
    let mut budget = Pacer::new(VERIFY_BYTES_PER_SEC);
    let (mut damaged, mut bytes) = (0, 0u64);
    for topic in state.topics.all() {
        for p in &topic.partitions {
            let pace = |n: u64| {
                bytes += n;
                budget.take(n);
                !state.shutdown.is_cancelled()
            };
            match p.verify_closed_blocking(pace) {
                Ok(n) => damaged += n,
                Err(e) => {
                    tracing::warn!(topic = %topic.name, partition = p.id, "verifying closed segments: {e}")
                }
            }
            if state.shutdown.is_cancelled() {
                return;
            }
        }
    }
    tracing::info!(
        bytes,
        damaged,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "verified the checksums of closed segments"
    );
}

/// Sleeps to keep a blocking loop under `rate` bytes per second, in steps of at least 1 MiB.
struct Pacer {
    rate: u64,
    owed: u64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Pacer { rate: rate.max(1), owed: 0 }
    }

    fn take(&mut self, n: u64) {
        self.owed += n;
        if self.owed >= 1 << 20 {
            std::thread::sleep(Duration::from_micros(self.owed.saturating_mul(1_000_000) / self.rate));
            self.owed = 0;
        }
    }
}

fn apply_retention(state: &BrokerState) {
    for topic in state.topics.all() {
        for p in &topic.partitions {
            if let Err(e) = p.apply_retention_blocking() {
                tracing::warn!(topic = %topic.name, partition = p.id, "retention failed: {e}");
            }
        }
    }
}

/// Checkpoints the recovery point of every partition whose completed fsyncs moved it
/// (design.md §5.3); partitions that did not change write nothing.
fn write_recovery_points(state: &BrokerState) {
    for topic in state.topics.all() {
        for p in &topic.partitions {
            if let Err(e) = p.checkpoint_blocking() {
                tracing::warn!(topic = %topic.name, partition = p.id, "writing the recovery point failed: {e}");
            }
        }
    }
}

fn flush_offsets(state: &BrokerState) {
    if let Err(e) = state.offsets.maintain_blocking() {
        tracing::warn!("persisting group offsets failed: {e}");
    }
    for store in state.coordinators.stores() {
        match store.maintain_blocking() {
            Ok(()) | Err(crate::offsets::OffsetsError::NotCoordinator { .. }) => {}
            Err(e) => tracing::warn!("persisting group offsets failed: {e}"),
        }
    }
    crate::coordinator::compact_followers(state);
}

/// Persists what the groups coordinated here acknowledged since their last flush, through their
/// offsets partitions (so before the cluster stops), at shutdown.
pub(crate) async fn close_coordinators(state: &Arc<BrokerState>) {
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for store in st.coordinators.stores() {
            if let Err(e) = store.close_blocking() {
                tracing::warn!("persisting group offsets at shutdown failed: {e}");
            }
        }
    })
    .await;
}

/// Persists offsets, syncs every partition and checkpoints its recovery point, at shutdown.
pub(crate) async fn final_flush(state: &Arc<BrokerState>) {
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = st.offsets.close_blocking() {
            tracing::warn!("persisting group offsets at shutdown failed: {e}");
        }

        for topic in st.topics.all() {
            for p in &topic.partitions {
                if let Err(e) = p.sync_blocking() {
                    tracing::warn!(topic = %topic.name, partition = p.id, "sync at shutdown failed: {e}");
                }
            }
        }
    })
    .await;
}

/// Gauges that are sampled rather than counted: partition sizes and high watermarks, group lag,
/// resident memory.
/// A partition that received nothing for this long drops its tail cache.
const IDLE_CACHE: Duration = Duration::from_secs(30);

fn sample_gauges(state: &BrokerState) {
    metrics::gauge!("quiver_tail_cache_bytes").set(state.topics.tail_cache_bytes() as f64);
    for topic in state.topics.all() {
        for p in &topic.partitions {
            p.release_idle_cache(IDLE_CACHE);
            let (bytes, segments) = p.stats();
            let labels = [("topic", topic.name.to_string()), ("partition", p.id.to_string())];
            metrics::gauge!("quiver_partition_bytes", &labels).set(bytes as f64);
            metrics::gauge!("quiver_partition_segments", &labels).set(segments as f64);
            metrics::gauge!("quiver_partition_high_watermark", &labels).set(p.high_watermark() as f64);
        }
    }
    let coordinated = state.coordinators.stores().into_iter().flat_map(|s| s.all());
    for ((group, topic, partition), committed) in state.offsets.all().into_iter().chain(coordinated) {
        let Ok(t) = state.topics.get(&topic) else { continue };
        let Ok(p) = t.partition(partition) else { continue };
        let lag = p.high_watermark().saturating_sub(committed);
        let labels = [
            ("group", group.to_string()),
            ("topic", topic.to_string()),
            ("partition", partition.to_string()),
        ];
        metrics::gauge!("quiver_group_lag", &labels).set(lag as f64);
    }
    if let Some(rss) = resident_bytes() {
        metrics::gauge!("quiver_process_resident_bytes").set(rss as f64);
    }
}

fn resident_bytes() -> Option<u64> {
    Some(crate::observability::rss_kib(std::process::id())? * 1024)
}
