//! `quiver bench`: a load generator in the manner of `nats bench` and
//! `kafka-producer-perf-test`. Producers and consumers each use their own connection; every
//! message carries its send time so consumers measure publish-to-deliver latency.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::StreamExt;
use hdrhistogram::Histogram;
use quiver_protocol::message::{Acks, Durability, StartPosition, TopicConfig};
use serde::Serialize;

use quiver_client::{
    Client, ClientConfig, ClientError, Consumer, ConsumerConfig, DeliveryFuture, Producer, ProducerConfig,
    ProducerRecord,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub client: ClientConfig,
    pub topic: Option<String>,
    pub producers: usize,
    pub consumers: usize,
    pub partitions: u32,
    pub message_size: usize,
    /// Total messages across producers; ignored when `duration` is set.
    pub messages: u64,
    pub duration: Option<Duration>,
    pub acks: Acks,
    pub batch_bytes: usize,
    pub linger: Duration,
    pub durability: Durability,
    pub flush_interval_ms: u32,
    /// Replicas of each partition of the topic the bench creates (a cluster's broker count).
    pub replicas: u16,
    /// Each producer sends one message and waits for its ack before the next.
    pub one_at_a_time: bool,
    /// Messages a producer may have unacknowledged; it waits for the oldest beyond this.
    pub max_inflight: usize,
    /// Sample this process's RSS: a local broker's pid.
    pub broker_pid: Option<u32>,
    /// Connections opened before the run and held, idle, until it ends (what many quiet
    /// clients cost the broker in memory and latency).
    pub idle_connections: usize,
    pub progress: bool,
}

/// Throughput of one side.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub messages: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub msgs_per_sec: f64,
    pub mb_per_sec: f64,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Opens `n` connections, a few handshakes at a time, that stay idle (keep-alives only).
/// A handshake whose packets were dropped (thousands of connections share the broker's one
/// UDP socket, and a burst can overflow its receive buffer) waits out QUIC's doubling
/// retransmission timers and may pass the connect timeout: it is tried again, as a client
/// reconnecting would.
async fn open_idle_connections(client: &ClientConfig, n: usize) -> Result<Vec<Client>, ClientError> {
    const HANDSHAKES_AT_ONCE: usize = 32;
    const ATTEMPTS: usize = 3;
    let connect = || async {
        let mut attempt = 1;
        loop {
            match Client::connect(client.clone()).await {
                Err(e) if attempt < ATTEMPTS && e.is_retriable() => attempt += 1,
                r => return r,
            }
        }
    };
    futures::stream::iter((0..n).map(|_| connect()))
        .buffer_unordered(HANDSHAKES_AT_ONCE)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Resident memory of the broker, when its pid was given.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub start_kib: u64,
    pub peak_kib: u64,
    pub end_kib: u64,
}

/// The first producer's QUIC path at the end of its run: on loopback the packet size should
/// have reached `quiver_protocol::limits::MAX_UDP_PAYLOAD`, which roughly doubles throughput over
/// Ethernet-sized packets; lost packets cost retransmissions and a smaller congestion window.
#[derive(Debug, Clone, Serialize)]
pub struct PathStats {
    pub mtu: u16,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub black_holes_detected: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub topic: String,
    pub producers: usize,
    pub consumers: usize,
    pub partitions: u32,
    pub message_size: usize,
    pub acks: String,
    pub durability: String,
    pub batch_bytes: usize,
    pub linger_ms: u64,
    pub one_at_a_time: bool,
    pub idle_connections: usize,
    pub produce: Throughput,
    /// Aggregate over consumers (each consumer reads every message).
    pub consume: Option<Throughput>,
    pub produce_latency: Latency,
    pub end_to_end_latency: Option<Latency>,
    pub broker_memory: Option<Memory>,
    pub producer_path: Option<PathStats>,
}

/// Runs the benchmark and reports.
pub async fn run(config: BenchConfig) -> Result<BenchReport, ClientError> {
    let admin_client = Client::connect(config.client.clone()).await?;
    let topic = match &config.topic {
        Some(t) => t.clone(),
        None => format!("bench-{}-{}", std::process::id(), now_ns() % 1_000_000),
    };
    if config.topic.is_none() || admin_client.admin().describe_topic(&topic).await.is_err() {
        let topic_config = TopicConfig::default()
            .with_durability(config.durability)
            .with_flush_interval_ms(config.flush_interval_ms)
            .with_segment_bytes(1024 * 1024 * 1024)
            .with_replicas(config.replicas);
        admin_client.admin().create_topic(&topic, config.partitions, topic_config).await?;
    }
    let info = admin_client.admin().describe_topic(&topic).await?;
    let partitions = info.partitions.len() as u32;
    // With no producers the consumers read what the topic already holds (consume-only mode).
    let existing: u64 = info.partitions.iter().map(|p| p.high_watermark - p.log_start_offset).sum();

    let idle = open_idle_connections(&config.client, config.idle_connections).await?;

    let bars =
        Bars::new(config.progress, config.duration.is_none().then_some(config.messages), config.consumers);
    let memory = config.broker_pid.map(MemorySampler::start);

    // Consumers first, so they see every message from offset 0.
    let produced_total = Arc::new(AtomicU64::new(if config.producers == 0 { existing } else { u64::MAX }));
    let mut consumer_tasks = Vec::new();
    for i in 0..config.consumers {
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let (client_config, topic, total, bar) =
            (config.client.clone(), topic.clone(), produced_total.clone(), bars.consumed.clone());
        let e2e = config.producers > 0;
        let task = on_own_thread(format!("bench-consumer-{i}"), async move || {
            let client = Client::connect(client_config).await?;
            let consumer = Consumer::subscribe(
                client.clone(),
                ConsumerConfig::new(topic).start(StartPosition::Earliest),
            )
            .await?;
            let _ = ready_tx.send(());
            consume(consumer, client, total, bar, e2e).await
        })?;
        // Subscribed before anything is produced, so it sees every message from offset 0. A
        // consumer that could not subscribe fails the bench now, not after the produce run.
        if ready.await.is_err() {
            return match task.await {
                Ok(Err(e)) => Err(e),
                _ => Err(ClientError::Protocol("a bench consumer stopped before it subscribed".into())),
            };
        }
        consumer_tasks.push(task);
    }

    let deadline = config.duration.map(|d| Instant::now() + d);
    let per_producer = config.messages / config.producers.max(1) as u64;
    let started = Instant::now();
    let mut producer_tasks = Vec::new();
    for i in 0..config.producers {
        let count = if i == 0 {
            config.messages - per_producer * (config.producers.max(1) as u64 - 1)
        } else {
            per_producer
        };
        let (config, topic, bar) = (config.clone(), topic.clone(), bars.produced.clone());
        producer_tasks.push(on_own_thread(format!("bench-producer-{i}"), async move || {
            let client = Client::connect(config.client.clone()).await?;
            produce(client, topic, config, count, deadline, bar).await
        })?);
    }
    let mut produce_hist = new_histogram();
    let mut produced = 0u64;
    let mut finished = started;
    let mut producer_path = None;
    for t in producer_tasks {
        let (n, hist, done, path) = t.await.map_err(|e| ClientError::Protocol(e.to_string()))??;
        produced += n;
        finished = finished.max(done);
        let _ = produce_hist.add(&hist);
        producer_path = producer_path.or(path);
    }
    let produce_secs = finished.saturating_duration_since(started).as_secs_f64();
    if config.producers > 0 {
        produced_total.store(produced, Ordering::Release);
    }

    let mut e2e_hist = new_histogram();
    let mut consume_secs: f64 = 0.0;
    let mut consumed = 0u64;
    for t in consumer_tasks {
        let (n, secs, hist) = t.await.map_err(|e| ClientError::Protocol(e.to_string()))??;
        consumed += n;
        consume_secs = consume_secs.max(secs);
        let _ = e2e_hist.add(&hist);
    }
    bars.finish();
    let memory = match memory {
        Some(m) => m.stop().await,
        None => None,
    };
    let bytes = produced * config.message_size as u64;
    let report = BenchReport {
        topic,
        producers: config.producers,
        consumers: config.consumers,
        partitions,
        message_size: config.message_size,
        acks: format!("{:?}", config.acks).to_lowercase(),
        durability: format!("{:?}", config.durability).to_lowercase(),
        batch_bytes: config.batch_bytes,
        linger_ms: config.linger.as_millis() as u64,
        one_at_a_time: config.one_at_a_time,
        idle_connections: idle.len(),
        produce: throughput(produced, bytes, produce_secs),
        consume: (config.consumers > 0)
            .then(|| throughput(consumed, consumed * config.message_size as u64, consume_secs)),
        produce_latency: latency(&produce_hist),
        end_to_end_latency: (config.consumers > 0 && config.producers > 0).then(|| latency(&e2e_hist)),
        broker_memory: memory,
        producer_path,
    };
    // Together: each close waits for its endpoint to drain.
    futures::future::join_all(idle.iter().map(|c| c.close())).await;
    if config.topic.is_none() {
        // The fresh topic was this run's own: its data goes with it (`--topic` keeps a topic).
        if let Err(e) = admin_client.admin().delete_topic(&report.topic).await {
            eprintln!("warning: could not delete the bench topic {}: {e}", report.topic);
        }
    }
    admin_client.close().await;
    Ok(report)
}

/// Runs one load-generating client on a thread of its own with a single-threaded runtime, as a
/// separate client process would. Its connection's tasks (the quinn drivers, the partition
/// tasks, the loop here) then never wake each other across threads; on a 2-core machine a
/// shared multi-threaded runtime costs about a quarter of the consume throughput in cross-thread
/// wake-ups (BENCHMARKS.md).
fn on_own_thread<T, F>(
    name: String,
    f: impl FnOnce() -> F + Send + 'static,
) -> Result<tokio::sync::oneshot::Receiver<Result<T, ClientError>>, ClientError>
where
    F: std::future::Future<Output = Result<T, ClientError>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(f()),
                Err(e) => Err(ClientError::Protocol(format!("cannot start a runtime: {e}"))),
            };
            let _ = tx.send(result);
        })
        .map_err(|e| ClientError::Protocol(format!("cannot start a bench thread: {e}")))?;
    Ok(rx)
}

async fn produce(
    client: Client,
    topic: String,
    config: BenchConfig,
    count: u64,
    deadline: Option<Instant>,
    bar: indicatif::ProgressBar,
) -> Result<(u64, Histogram<u64>, Instant, Option<PathStats>), ClientError> {
    let producer = Producer::new(
        client.clone(),
        ProducerConfig::default()
            .with_acks(config.acks)
            .with_linger(if config.one_at_a_time { Duration::ZERO } else { config.linger })
            .with_max_batch_bytes(config.batch_bytes),
    );
    let filler = Bytes::from(vec![b'x'; config.message_size.saturating_sub(8)]);
    let clock = Clock::new();
    let mut hist = new_histogram();
    // Acknowledgements are observed in send order (they complete in order per partition), so
    // only the oldest future is polled: no per-message waker bookkeeping. The clock is read
    // once per message sent and once per pass over what completed, not once per message
    // acknowledged: a whole batch completes at the same instant.
    let mut in_flight: VecDeque<(Instant, DeliveryFuture)> = VecDeque::new();
    let mut sent = 0u64;
    let done = |sent: u64| match deadline {
        Some(d) => Instant::now() >= d,
        None => sent >= count,
    };
    while !done(sent) {
        // At the in-flight bound, wait for the oldest before sending more (as nats-bench
        // does): at most `max_inflight` messages are ever unacknowledged.
        if in_flight.len() >= config.max_inflight.max(1) {
            if let Some((t0, oldest)) = in_flight.pop_front() {
                oldest.await?;
                record_us(&mut hist, t0.elapsed());
                bar.inc(1);
            }
        }
        let t0 = Instant::now();
        let record = ProducerRecord::new(payload(&filler, config.message_size, clock.wall_ns(t0)));
        let ack = producer.enqueue(&topic, record).await?;
        sent += 1;
        if config.one_at_a_time {
            ack.await?;
            record_us(&mut hist, t0.elapsed());
            bar.inc(1);
            continue;
        }
        in_flight.push_back((t0, ack));
        // Settle what completed, without waiting.
        let mut now = None;
        let mut settled = 0;
        while let Some((t0, front)) = in_flight.front_mut() {
            match futures::FutureExt::now_or_never(&mut *front) {
                Some(r) => {
                    r?;
                    let now = *now.get_or_insert_with(Instant::now);
                    record_us(&mut hist, now.saturating_duration_since(*t0));
                    in_flight.pop_front();
                    settled += 1;
                }
                None => break,
            }
        }
        if settled > 0 {
            bar.inc(settled);
        }
    }
    producer.flush().await?;
    for (t0, ack) in in_flight {
        ack.await?;
        record_us(&mut hist, t0.elapsed());
        bar.inc(1);
    }
    // The run ends with the last acknowledgement, as nats-bench's does; closing the
    // connection (QUIC drains it for three probe timeouts) is not part of it.
    let finished = Instant::now();
    let path = client.connection_stats().await.map(|c| PathStats {
        mtu: c.mtu,
        sent_packets: c.sent_packets,
        lost_packets: c.lost_packets,
        black_holes_detected: c.black_holes_detected,
    });
    client.close().await;
    Ok((sent, hist, finished, path))
}

async fn consume(
    mut consumer: Consumer,
    client: Client,
    total: Arc<AtomicU64>,
    bar: indicatif::ProgressBar,
    e2e: bool,
) -> Result<(u64, f64, Histogram<u64>), ClientError> {
    let mut hist = new_histogram();
    let mut n = 0u64;
    let mut first: Option<u64> = None;
    let mut last = 0;
    loop {
        let target = total.load(Ordering::Acquire);
        if n >= target {
            break;
        }
        // A message already buffered costs no timer; only an empty stream waits with one.
        let next = match futures::FutureExt::now_or_never(consumer.next()) {
            Some(next) => next,
            None => match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
                Ok(next) => next,
                Err(_) => continue, // re-check the target
            },
        };
        let Some(msg) = next else { break };
        let msg = msg?;
        msg.ack();
        n += 1;
        // With producers running, every message's publish->deliver latency is recorded (one
        // clock read serves it and the elapsed time). Reading what a topic already holds has
        // no latency to report: the clock is read at the first message, every 1,024th and
        // the last.
        if e2e || first.is_none() || n.is_multiple_of(1024) || n >= target {
            let now = now_ns();
            first.get_or_insert(now);
            last = now;
            if e2e && msg.value.len() >= 8 {
                let sent = u64::from_le_bytes(msg.value[..8].try_into().unwrap_or([0; 8]));
                let lat = now.saturating_sub(sent);
                hist.saturating_record((lat / 1000).max(1));
            }
        }
        if n.is_multiple_of(1024) {
            bar.inc(1024);
        }
    }
    let secs = first.map(|f| last.saturating_sub(f) as f64 / 1e9).unwrap_or(0.0);
    consumer.close().await;
    client.close().await;
    Ok((n, secs, hist))
}

/// Wall-clock time derived from `Instant`s, so a message's send time costs one clock read for
/// both its produce→ack latency and the timestamp its consumer compares against.
struct Clock {
    instant: Instant,
    wall_ns: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock { instant: Instant::now(), wall_ns: now_ns() }
    }

    fn wall_ns(&self, at: Instant) -> u64 {
        self.wall_ns + at.saturating_duration_since(self.instant).as_nanos() as u64
    }
}

fn payload(filler: &Bytes, size: usize, wall_ns: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(8));
    b.put_u64_le(wall_ns);
    b.put_slice(&filler[..size.saturating_sub(8).min(filler.len())]);
    b.freeze()
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn record_us(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

fn throughput(messages: u64, bytes: u64, seconds: f64) -> Throughput {
    let s = seconds.max(1e-9);
    Throughput {
        messages,
        bytes,
        seconds,
        msgs_per_sec: messages as f64 / s,
        mb_per_sec: bytes as f64 / s / 1e6,
    }
}

fn latency(h: &Histogram<u64>) -> Latency {
    Latency {
        samples: h.len(),
        p50_us: h.value_at_quantile(0.50) as f64,
        p90_us: h.value_at_quantile(0.90) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        p999_us: h.value_at_quantile(0.999) as f64,
        max_us: h.max() as f64,
    }
}

impl BenchReport {
    /// The human-readable summary.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "quiver bench: topic {} | {} producer(s), {} consumer(s), {} partition(s), {}-byte messages, acks={}, durability={}, batch {} B, linger {} ms{}{}",
            self.topic,
            self.producers,
            self.consumers,
            self.partitions,
            self.message_size,
            self.acks,
            self.durability,
            self.batch_bytes,
            self.linger_ms,
            if self.one_at_a_time { ", one at a time" } else { "" },
            if self.idle_connections > 0 { format!(", {} idle connections", self.idle_connections) } else { String::new() }
        );
        let tp = |name: &str, t: &Throughput| {
            format!(
                "{name:<8} {:>12} msgs in {:>7.2} s = {:>12.0} msg/s {:>9.1} MB/s\n",
                t.messages, t.seconds, t.msgs_per_sec, t.mb_per_sec
            )
        };
        s.push_str(&tp("produce", &self.produce));
        if let Some(c) = &self.consume {
            s.push_str(&tp("consume", c));
        }
        let lat = |name: &str, l: &Latency| {
            format!(
                "{name:<24} p50 {:>8.0} µs  p90 {:>8.0}  p99 {:>8.0}  p99.9 {:>8.0}  max {:>8.0}  ({} samples)\n",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.samples
            )
        };
        s.push_str(&lat("produce->ack latency", &self.produce_latency));
        if let Some(l) = &self.end_to_end_latency {
            s.push_str(&lat("publish->deliver latency", l));
        }
        if let Some(p) = &self.producer_path {
            let _ = writeln!(
                s,
                "producer connection: {}-byte packets, {} sent, {} lost",
                p.mtu, p.sent_packets, p.lost_packets
            );
        }
        if let Some(m) = &self.broker_memory {
            let _ = writeln!(
                s,
                "broker RSS: start {:.1} MiB, peak {:.1} MiB, end {:.1} MiB",
                m.start_kib as f64 / 1024.0,
                m.peak_kib as f64 / 1024.0,
                m.end_kib as f64 / 1024.0
            );
        }
        s
    }
}

/// Progress bars on stderr (hidden when not wanted).
struct Bars {
    multi: indicatif::MultiProgress,
    produced: indicatif::ProgressBar,
    consumed: indicatif::ProgressBar,
}

impl Bars {
    fn new(show: bool, total: Option<u64>, consumers: usize) -> Self {
        let multi = if show {
            indicatif::MultiProgress::new()
        } else {
            indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
        };
        let style =
            indicatif::ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {per_sec} {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> ");
        let bar = |prefix: &str, len: Option<u64>| {
            let b = multi.add(match len {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::no_length(),
            });
            b.set_style(style.clone());
            b.set_prefix(prefix.to_string());
            b
        };
        let produced = bar("produce", total);
        let consumed = bar("consume", total.map(|t| t * consumers as u64));
        Bars { multi, produced, consumed }
    }

    fn finish(&self) {
        self.produced.finish_and_clear();
        self.consumed.finish_and_clear();
        let _ = self.multi.clear();
    }
}

/// Samples a process's RSS every 100 ms.
struct MemorySampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Memory>,
}

impl MemorySampler {
    fn start(pid: u32) -> Self {
        let (stop, mut rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let start = rss_kib(pid).unwrap_or(0);
            let mut m = Memory { start_kib: start, peak_kib: start, end_kib: start };
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if let Some(r) = rss_kib(pid) {
                    m.peak_kib = m.peak_kib.max(r);
                    m.end_kib = r;
                }
            }
            m
        });
        MemorySampler { stop, task }
    }

    async fn stop(self) -> Option<Memory> {
        let _ = self.stop.send(());
        self.task.await.ok()
    }
}

/// Resident set size of a process in KiB, from /proc. (The broker reads its own the same way,
/// in `quiver_broker::observability`; the CLI does not depend on the broker.)
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
