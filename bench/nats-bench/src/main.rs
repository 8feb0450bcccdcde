//! `nats-bench`: the NATS JetStream counterpart of `quiver bench`.
//!
//! It runs the same workload and prints the same report (the JSON of `quiver bench --json`, see
//! `BenchReport` in `cli/src/bench.rs`), so `bench/compare.sh` can put the two side by side:
//!
//! * one JetStream stream (file storage, `--replicas` replicas, limits retention) on one subject;
//!   with `--replicas 3` on a three-server cluster each PubAck means a quorum stored the message
//!   (the counterpart of Quiver's `--acks all`). `--url` takes several servers, comma-separated;
//! * producers publish with `jetstream.publish`, which returns a future of the stream's PubAck;
//!   up to `--max-inflight` acks are outstanding per producer (pipelined), or exactly one with
//!   `--one-at-a-time`. Produce latency is publish -> PubAck of each message;
//! * consumers are created before the producers start and each reads every message from the
//!   start of the stream. By default each is an ephemeral pull consumer with
//!   `AckPolicy::Explicit` that acks every message (`--ack-policy explicit`, the usual
//!   at-least-once consumer); `--ack-policy all` acks cumulatively and `--ack-policy none` uses an
//!   ordered consumer (no acks, flow-controlled, the fastest kind);
//! * every payload starts with the send time (nanoseconds since the Unix epoch, 8 bytes,
//!   little-endian), from which consumers measure publish -> deliver latency.
//!
//! Each producer and consumer has its own connection, as in `quiver bench`.
//!
//! For failover measurements (`bench/failover.sh`): `--duration` runs the producers for a time
//! instead of a count, and `--retry` (with `--one-at-a-time`) resends a message whose PubAck
//! failed or did not come within `--ack-timeout-ms`, until one comes; its latency counts from the
//! first send, as a Quiver producer's retried batch does. The longest latency of a run spanning
//! one leader kill is then the produce stall the kill caused, overstated by at most one ack
//! timeout (a resend can only notice the new leader when the previous attempt gives up).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _, Result};
use async_nats::jetstream::{self, consumer, stream};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Parser, Debug, Clone)]
#[command(about = "NATS JetStream load generator that reports like `quiver bench`")]
struct Args {
    /// NATS server URL, or several servers of a cluster separated by commas.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Replicas of the stream the bench creates (at most the cluster's server count).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Stream to use (its subject is `<stream>.data`); created if missing. Default: a fresh
    /// stream per run, deleted at the end unless --keep-stream.
    #[arg(long)]
    stream: Option<String>,
    /// Producers; 0 with --stream reads what the stream already holds (consume-only).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    #[arg(long, default_value_t = 1024)]
    message_size: usize,
    /// Total messages across producers; ignored with --duration.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Run producers for this many seconds instead of a message count.
    #[arg(long)]
    duration: Option<f64>,
    /// Publish acks outstanding per producer (ignored with --one-at-a-time).
    #[arg(long, default_value_t = 4096)]
    max_inflight: usize,
    /// Send one message and wait for its PubAck before the next (latency mode).
    #[arg(long)]
    one_at_a_time: bool,
    /// Resend a message until a PubAck comes (failover runs; needs --one-at-a-time): after an
    /// error, or after --ack-timeout-ms without an answer. Its latency counts from the first send.
    #[arg(long, requires = "one_at_a_time")]
    retry: bool,
    /// How long a publish waits for its PubAck (the client library's request timeout).
    #[arg(long, default_value_t = 30_000)]
    ack_timeout_ms: u64,
    /// Consumer kind: explicit = pull consumer acking each message, all = pull consumer with
    /// cumulative acks (each message acked), none = ordered consumer, no acks.
    #[arg(long, value_enum, default_value_t = AckPolicyArg::Explicit)]
    ack_policy: AckPolicyArg,
    /// Messages requested per pull (pull consumers; the client library's default is 200).
    #[arg(long)]
    pull_batch: Option<usize>,
    /// The pull consumer's max_ack_pending (unacked messages outstanding; server default 1000).
    #[arg(long)]
    max_ack_pending: Option<i64>,
    /// Stream storage.
    #[arg(long, value_enum, default_value_t = StorageArg::File)]
    storage: StorageArg,
    /// Keep the stream after the run (default: delete it, freeing the disk).
    #[arg(long)]
    keep_stream: bool,
    /// Free text put in the report's `durability` field.
    #[arg(long, default_value = "nats-default")]
    durability_label: String,
    /// Sample this local server process's resident memory during the run.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum AckPolicyArg {
    Explicit,
    All,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum StorageArg {
    File,
    Memory,
}

// ---- The report: field for field the JSON of `quiver bench --json`. ----

#[derive(Debug, Clone, Serialize)]
struct Throughput {
    messages: u64,
    bytes: u64,
    seconds: f64,
    msgs_per_sec: f64,
    mb_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Latency {
    samples: u64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Memory {
    start_kib: u64,
    peak_kib: u64,
    end_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct BenchReport {
    topic: String,
    producers: usize,
    consumers: usize,
    partitions: u32,
    message_size: usize,
    acks: String,
    durability: String,
    batch_bytes: usize,
    linger_ms: u64,
    one_at_a_time: bool,
    produce: Throughput,
    consume: Option<Throughput>,
    produce_latency: Latency,
    end_to_end_latency: Option<Latency>,
    broker_memory: Option<Memory>,
    /// Resends with --retry (not in `quiver bench`'s report).
    #[serde(skip_serializing_if = "Option::is_none")]
    retries: Option<u64>,
}

/// Pause before resending after a publish failed at once (no responders while a stream has no
/// leader, a lost connection), so a retry loop does not spin.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let report = run(args.clone()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, &args));
    }
    Ok(())
}

/// Connects to the first of the comma-separated servers that answers (the client also learns
/// the cluster's other servers from them and reconnects through all of them).
async fn connect(url: &str) -> Result<async_nats::Client> {
    let servers: Vec<&str> = url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    async_nats::connect(servers).await.with_context(|| format!("connecting to {url}"))
}

fn context(client: async_nats::Client, max_inflight: usize, ack_timeout: Duration) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .timeout(ack_timeout)
        // Our own in-flight bound is `max_inflight`; leave the library's a little room so it
        // never waits on its semaphore (which would count as produce latency).
        .max_ack_inflight(max_inflight + 16)
        .backpressure_on_inflight(true)
        .build(client)
}

async fn run(args: Args) -> Result<BenchReport> {
    let admin = jetstream::new(connect(&args.url).await?);
    let fresh = args.stream.is_none();
    let name = match &args.stream {
        Some(s) => s.clone(),
        None => format!("bench-{}-{}", std::process::id(), now_ns() % 1_000_000),
    };
    let subject = format!("{name}.data");
    let stream = admin
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: match args.storage {
                StorageArg::File => stream::StorageType::File,
                StorageArg::Memory => stream::StorageType::Memory,
            },
            retention: stream::RetentionPolicy::Limits,
            num_replicas: args.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating stream {name}: {e}"))?;

    let memory = args.broker_pid.map(MemorySampler::start);

    // With no producers the consumers read what the stream already holds (consume-only).
    let existing = if args.producers == 0 {
        let mut s = admin.get_stream(&name).await.map_err(|e| anyhow!("stream {name}: {e}"))?;
        s.info().await.map_err(|e| anyhow!("stream {name}: {e}"))?.state.messages
    } else {
        u64::MAX
    };
    // Consumers first, each from the start of the stream.
    let produced_total = Arc::new(AtomicU64::new(existing));
    let e2e = args.producers > 0;
    // Each client runs on a thread of its own with a single-threaded runtime, as each client of
    // `quiver bench` does (separate client processes would not share a runtime either); a
    // consumer reports ready once subscribed, and producers start after all are.
    let mut consumer_tasks = Vec::new();
    let mut ready = Vec::new();
    for i in 0..args.consumers {
        let (args, name, total) = (args.clone(), name.clone(), produced_total.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        ready.push(ready_rx);
        consumer_tasks.push(on_own_thread(format!("nats-consumer-{i}"), move || async move {
            let (messages, client) = open_consumer(&args, &name, i).await?;
            let _ = ready_tx.send(());
            let ack = args.ack_policy != AckPolicyArg::None;
            consume(messages, client, ack, total, e2e).await
        }));
    }
    for r in ready {
        // A consumer that failed to subscribe reports its error through its task below.
        let _ = r.await;
    }

    let producers = args.producers;
    let per_producer = args.messages / producers.max(1) as u64;
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d.max(0.0)));
    let mut producer_tasks = Vec::new();
    for i in 0..producers {
        let count = if i == 0 { args.messages - per_producer * (producers as u64 - 1) } else { per_producer };
        let (args, subject) = (args.clone(), subject.clone());
        producer_tasks.push(on_own_thread(format!("nats-producer-{i}"), move || async move {
            let client = connect(&args.url).await?;
            produce(client, subject, args, count, deadline).await
        }));
    }
    let mut produce_hist = new_histogram();
    let mut produced = 0u64;
    let mut retries = 0u64;
    // As `quiver bench`: from before the producers connect to the last acknowledgement.
    let mut last_ack = started;
    for t in producer_tasks {
        let (n, hist, done, resent) = t.await.map_err(|_| anyhow!("a producer thread died"))??;
        produced += n;
        retries += resent;
        last_ack = last_ack.max(done);
        let _ = produce_hist.add(&hist);
    }
    let produce_secs = last_ack.duration_since(started).as_secs_f64();
    if producers > 0 {
        produced_total.store(produced, Ordering::Release);
    }

    let mut e2e_hist = new_histogram();
    let mut consume_secs: f64 = 0.0;
    let mut consumed = 0u64;
    for t in consumer_tasks {
        let (n, secs, hist) = t.await.map_err(|_| anyhow!("a consumer thread died"))??;
        consumed += n;
        consume_secs = consume_secs.max(secs);
        let _ = e2e_hist.add(&hist);
    }
    let memory = match memory {
        Some(m) => m.stop().await,
        None => None,
    };
    if fresh && !args.keep_stream {
        let _ = admin.delete_stream(&name).await;
    }
    drop(stream);
    let bytes = produced * args.message_size as u64;
    Ok(BenchReport {
        topic: name,
        producers,
        consumers: args.consumers,
        partitions: 1,
        message_size: args.message_size,
        // One replica: the PubAck means "stored by the leader". Replicated: the stream's raft
        // group committed the message (a quorum stored it), as Quiver's acks=all (a majority).
        acks: if args.replicas > 1 { "all".into() } else { "leader".into() },
        durability: args.durability_label.clone(),
        batch_bytes: 0,
        linger_ms: 0,
        one_at_a_time: args.one_at_a_time,
        produce: throughput(produced, bytes, produce_secs),
        consume: (args.consumers > 0)
            .then(|| throughput(consumed, consumed * args.message_size as u64, consume_secs)),
        produce_latency: latency(&produce_hist),
        end_to_end_latency: (args.consumers > 0).then(|| latency(&e2e_hist)),
        broker_memory: memory,
        retries: args.retry.then_some(retries),
    })
}

/// Subscribes consumer `i` to the stream from its start: the message stream and its client.
async fn open_consumer(
    args: &Args,
    name: &str,
    i: usize,
) -> Result<(futures::stream::BoxStream<'static, Result<jetstream::Message>>, async_nats::Client)> {
    let client = connect(&args.url).await?;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(&name).await.map_err(|e| anyhow!("stream {name}: {e}"))?;
    let messages: futures::stream::BoxStream<'static, Result<jetstream::Message>> = match args.ack_policy {
        AckPolicyArg::None => {
            let c = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("creating ordered consumer: {e}"))?;
            c.messages()
                .await
                .map_err(|e| anyhow!("ordered consumer: {e}"))?
                .map(|m| m.map_err(|e| anyhow!(e)))
                .boxed()
        }
        policy => {
            let c = stream
                .create_consumer(consumer::pull::Config {
                    // A fresh durable per run: a stream kept between runs (consume-only)
                    // must be read from the start each time.
                    name: Some(format!("bench-consumer-{}-{i}", std::process::id())),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_policy: if policy == AckPolicyArg::All {
                        consumer::AckPolicy::All
                    } else {
                        consumer::AckPolicy::Explicit
                    },
                    inactive_threshold: Duration::from_secs(60),
                    max_ack_pending: args.max_ack_pending.unwrap_or(0),
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("creating pull consumer: {e}"))?;
            let mut builder = c.stream();
            if let Some(b) = args.pull_batch {
                builder = builder.max_messages_per_batch(b);
            }
            builder
                .messages()
                .await
                .map_err(|e| anyhow!("pull consumer: {e}"))?
                .map(|m| m.map_err(|e| anyhow!(e)))
                .boxed()
        }
    };
    Ok((messages, client))
}

/// Runs the future `make` returns on a thread of its own with a single-threaded runtime.
fn on_own_thread<T, F, Fut>(name: String, make: F) -> tokio::sync::oneshot::Receiver<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| anyhow!("client runtime: {e}"))
            .and_then(|rt| rt.block_on(make()));
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        eprintln!("nats-bench: starting a client thread: {e}");
    }
    rx
}

/// One producer: `count` messages, or until `deadline`. Returns the messages acknowledged, their
/// latencies, when the last ack came and how many resends --retry made.
async fn produce(
    client: async_nats::Client,
    subject: String,
    args: Args,
    count: u64,
    deadline: Option<Instant>,
) -> Result<(u64, Histogram<u64>, Instant, u64)> {
    let js =
        context(client.clone(), args.max_inflight.max(1), Duration::from_millis(args.ack_timeout_ms.max(1)));
    let filler = Bytes::from(vec![b'x'; args.message_size.saturating_sub(8)]);
    let mut hist = new_histogram();
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0u64;
    let mut retries = 0u64;
    let more = |sent: u64| match deadline {
        Some(d) => Instant::now() < d,
        None => sent < count,
    };
    while more(sent) {
        if args.retry {
            let t0 = Instant::now();
            retries += publish_until_acked(&js, &subject, &filler, args.message_size).await;
            sent += 1;
            record_us(&mut hist, t0.elapsed());
            continue;
        }
        if !args.one_at_a_time {
            // Settle what completed, without waiting; wait only at the in-flight bound.
            while let Some(Some(r)) = futures::FutureExt::now_or_never(in_flight.next()) {
                record_us(&mut hist, r?);
            }
            while in_flight.len() >= args.max_inflight.max(1) {
                if let Some(r) = in_flight.next().await {
                    record_us(&mut hist, r?);
                }
            }
        }
        let t0 = Instant::now();
        let ack = js
            .publish(subject.clone(), payload(&filler, args.message_size))
            .await
            .map_err(|e| anyhow!("publish: {e}"))?;
        sent += 1;
        if args.one_at_a_time {
            ack.await.map_err(|e| anyhow!("publish ack: {e}"))?;
            record_us(&mut hist, t0.elapsed());
            continue;
        }
        in_flight
            .push(async move { ack.await.map(|_| t0.elapsed()).map_err(|e| anyhow!("publish ack: {e}")) });
    }
    while let Some(r) = in_flight.next().await {
        record_us(&mut hist, r?);
    }
    let done = Instant::now();
    client.flush().await.map_err(|e| anyhow!("flush: {e}"))?;
    Ok((sent, hist, done, retries))
}

/// Publishes one message, resending it until a PubAck comes (the ack timeout bounds each
/// attempt); returns the number of resends. Errors are retried, not reported: during a failover
/// they are expected (no responders, timeouts, a lost connection).
async fn publish_until_acked(js: &jetstream::Context, subject: &str, filler: &Bytes, size: usize) -> u64 {
    let mut resends = 0u64;
    loop {
        let attempt = async {
            let ack = js.publish(subject.to_string(), payload(filler, size)).await?;
            ack.await.map(|_| ())
        };
        match attempt.await {
            Ok(()) => return resends,
            Err(e) => {
                if e.kind() != jetstream::context::PublishErrorKind::TimedOut {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                resends += 1;
            }
        }
    }
}

async fn consume(
    mut messages: futures::stream::BoxStream<'static, Result<jetstream::Message>>,
    client: async_nats::Client,
    ack: bool,
    total: Arc<AtomicU64>,
    e2e: bool,
) -> Result<(u64, f64, Histogram<u64>)> {
    let mut hist = new_histogram();
    let mut n = 0u64;
    let mut first: Option<u64> = None;
    let mut last = 0;
    loop {
        let target = total.load(Ordering::Acquire);
        if n >= target {
            break;
        }
        // A message already waiting costs no timer (as in `quiver bench`); only an empty
        // stream waits with one, to re-check the target.
        let next = match futures::FutureExt::now_or_never(messages.next()) {
            Some(next) => Ok(next),
            None => tokio::time::timeout(Duration::from_millis(200), messages.next()).await,
        };
        let msg = match next {
            Ok(Some(m)) => m?,
            Ok(None) => break,
            Err(_) => continue, // re-check the target
        };
        if ack {
            // Publishes the ack; does not wait for the server (like Quiver's `msg.ack()`).
            msg.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        }
        n += 1;
        // As `quiver bench`: the clock per message only when publish->deliver latency is
        // recorded; reading a full stream reads it at the first, every 1,024th and last.
        if e2e || first.is_none() || n.is_multiple_of(1024) || n >= target {
            let now = now_ns();
            first.get_or_insert(now);
            last = now;
            if e2e && msg.payload.len() >= 8 {
                let sent = u64::from_le_bytes(msg.payload[..8].try_into().unwrap_or([0; 8]));
                hist.saturating_record((now.saturating_sub(sent) / 1000).max(1));
            }
        }
    }
    let secs = first.map(|f| last.saturating_sub(f) as f64 / 1e9).unwrap_or(0.0);
    drop(messages);
    let _ = client.flush().await;
    Ok((n, secs, hist))
}

fn payload(filler: &Bytes, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(8));
    b.put_u64_le(now_ns());
    b.put_slice(&filler[..size.saturating_sub(8).min(filler.len())]);
    b.freeze()
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 100 s, 3 significant digits (as quiver bench).
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
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

fn render(r: &BenchReport, args: &Args) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "nats-bench: stream {} | {} producer(s), {} consumer(s) (ack policy {:?}), {}-byte messages, {:?} storage, {} in flight{}",
        r.topic,
        r.producers,
        r.consumers,
        args.ack_policy,
        r.message_size,
        args.storage,
        args.max_inflight,
        if r.one_at_a_time { ", one at a time" } else { "" }
    );
    let tp = |name: &str, t: &Throughput| {
        format!(
            "{name:<8} {:>12} msgs in {:>7.2} s = {:>12.0} msg/s {:>9.1} MB/s\n",
            t.messages, t.seconds, t.msgs_per_sec, t.mb_per_sec
        )
    };
    s.push_str(&tp("produce", &r.produce));
    if let Some(c) = &r.consume {
        s.push_str(&tp("consume", c));
    }
    let lat = |name: &str, l: &Latency| {
        format!(
            "{name:<24} p50 {:>8.0} µs  p90 {:>8.0}  p99 {:>8.0}  p99.9 {:>8.0}  max {:>8.0}  ({} samples)\n",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.samples
        )
    };
    s.push_str(&lat("produce->ack latency", &r.produce_latency));
    if let Some(l) = &r.end_to_end_latency {
        s.push_str(&lat("publish->deliver latency", l));
    }
    if let Some(m) = &r.broker_memory {
        let _ = writeln!(
            s,
            "server RSS: start {:.1} MiB, peak {:.1} MiB, end {:.1} MiB",
            m.start_kib as f64 / 1024.0,
            m.peak_kib as f64 / 1024.0,
            m.end_kib as f64 / 1024.0
        );
    }
    s
}

/// Samples a process's RSS every 100 ms (as quiver bench).
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

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
