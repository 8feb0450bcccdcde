//! Prometheus metrics over HTTP (`GET /metrics`) and a liveness probe (`GET /healthz`).
//!
//! The `metrics` facade is used throughout the broker; this installs the Prometheus recorder
//! and serves its rendering. The HTTP side is deliberately tiny (two fixed GET paths, bounded
//! request size, a read timeout), so it adds no web framework to the broker.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use quiver_protocol::limits::MAX_METRICS_REQUEST_BYTES;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder once; later calls reuse it. Brokers that
/// start at the same time in one process (an application's, or tests) all get the handle of
/// the recorder that was installed: the check and the installation happen under one lock.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: parking_lot::Mutex<Option<PrometheusHandle>> = parking_lot::Mutex::new(None);
    let mut slot = HANDLE.lock();
    if let Some(h) = slot.as_ref() {
        return Ok(h.clone());
    }
    let buckets = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5,
    ];
    let recorder =
        PrometheusBuilder::new().set_buckets(&buckets).context("histogram buckets")?.build_recorder();
    let handle = recorder.handle();
    // Another recorder (e.g. an embedding application's) may be installed already: then it
    // records, and our handle is still served (and stays empty).
    if metrics::set_global_recorder(recorder).is_ok() {
        describe();
    }
    *slot = Some(handle.clone());
    Ok(handle)
}

/// Serves `/metrics` and `/healthz` until shutdown.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).await.with_context(|| format!("binding metrics listener {addr}"))?;
    let local = listener.local_addr()?;
    // Histogram samples pile up in the recorder until something drains them: a scrape or
    // this upkeep. Without it, a broker nobody scrapes would grow by every sample recorded.
    let upkeep = handle.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => upkeep.run_upkeep(),
                _ = stop.cancelled() => return,
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                _ = shutdown.cancelled() => return,
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(READ_TIMEOUT, respond(stream, &handle)).await;
            });
        }
    });
    Ok(local)
}

async fn respond(mut stream: tokio::net::TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_METRICS_REQUEST_BYTES {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", "text/plain; version=0.0.4", handle.render()),
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Names, units and help text of every metric the broker records (also listed in the README).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("quiver_messages_in_total", "Records appended, by topic");
    describe_counter!("quiver_bytes_in_total", Unit::Bytes, "Record batch bytes appended, by topic");
    describe_counter!("quiver_messages_out_total", "Records pushed to subscribers, by topic");
    describe_counter!(
        "quiver_bytes_out_total",
        Unit::Bytes,
        "Record batch bytes pushed to subscribers, by topic"
    );
    describe_counter!("quiver_fetch_bytes_total", Unit::Bytes, "Bytes returned by Fetch requests, by topic");
    describe_counter!(
        "quiver_retention_skipped_total",
        "Offsets a subscription skipped because retention deleted them before it consumed them, by topic"
    );
    describe_counter!(
        "quiver_group_commits_total",
        "Partition appends, by where they ran: express (one small batch on the request's task, no fsync), in_place (a small group on the writer's task, no fsync) or blocking_thread"
    );
    describe_histogram!(
        "quiver_produce_seconds",
        Unit::Seconds,
        "Produce request latency (queue, append, sync)"
    );
    describe_histogram!("quiver_fetch_seconds", Unit::Seconds, "Fetch request latency");
    describe_histogram!("quiver_fsync_seconds", Unit::Seconds, "Group-commit and periodic fsync latency");
    describe_counter!(
        "quiver_redeliveries_total",
        "Records handed out again (nack or ack deadline), by topic"
    );
    describe_counter!("quiver_dead_letters_total", "Records moved to a dead-letter topic, by topic");
    describe_counter!(
        "quiver_repaired_batches_total",
        "Damaged batches repaired in place from another replica's copy"
    );
    describe_counter!("quiver_group_records_total", "Group membership records written by coordinators");
    describe_counter!("quiver_duplicate_batches_total", "Idempotent retries answered without appending");
    describe_counter!("quiver_protocol_errors_total", "Malformed, oversized or unexpected frames");
    describe_gauge!("quiver_connections", "Open client connections");
    describe_gauge!("quiver_subscriptions", "Live subscription streams");
    describe_gauge!(
        "quiver_inflight_delivery_bytes",
        Unit::Bytes,
        "Delivered but unacknowledged bytes, all subscriptions"
    );
    describe_gauge!("quiver_partition_bytes", Unit::Bytes, "Bytes on disk per partition");
    describe_gauge!("quiver_partition_segments", "Segment files per partition");
    describe_gauge!("quiver_partition_high_watermark", "Next offset per partition");
    describe_gauge!("quiver_group_lag", "High watermark minus committed offset per group and partition");
    describe_gauge!("quiver_process_resident_bytes", Unit::Bytes, "Broker resident memory");
}

/// Resident set size of a process in KiB (`VmRSS` in `/proc/<pid>/status`); `None` where
/// there is no /proc or the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_resident_set_of_this_process() {
        let kib = super::rss_kib(std::process::id()).unwrap_or(0);
        assert!(kib > 0, "VmRSS of this process: {kib} KiB");
    }
}
