//! Delivery counts and `max_deliveries` hold across broker crashes (design.md §12): a group
//! takes messages and never acknowledges them, the broker is SIGKILLed right after, and every
//! redelivery after the restart carries a count above every count the message was delivered
//! with before; at `max_deliveries` the messages go to the dead letters, not out again. And
//! with a backlog longer than the delivered horizon's step, records never handed out are not
//! dead-lettered at `max_deliveries = 1` after a restart, clean or not.

use std::collections::BTreeMap;
use std::time::Duration;

use quiver_client::{Consumer, ConsumerConfig, StartPosition, TopicConfig};
use quiver_tests::{bounded, init_tracing, next_message, publish, BrokerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const N: u64 = 500;
const MAX_DELIVERIES: u32 = 3;

fn config() -> ConsumerConfig {
    let mut c = ConsumerConfig::new("q").group("g").start(StartPosition::Earliest);
    c.session_timeout = Duration::from_secs(2);
    c.max_deliveries = Some(MAX_DELIVERIES);
    c
}

fn header<'a>(m: &'a quiver_client::ConsumedMessage, name: &str) -> anyhow::Result<&'a str> {
    let (_, v) =
        m.headers.iter().find(|(k, _)| k == name).ok_or_else(|| anyhow::anyhow!("no {name} header"))?;
    Ok(std::str::from_utf8(v)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_counts_and_dead_letters_hold_across_sigkill() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BIN, dir.path(), None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("q", 1, TopicConfig::default()).await?;
        client.admin().create_topic("q.dlq", 1, TopicConfig::default()).await?;
        publish(&client, "q", (0..N).map(|i| format!("m-{i}"))).await?;
        client.close().await;

        // offset -> the highest count it was delivered with.
        let mut sent: BTreeMap<u64, u32> = BTreeMap::new();
        for round in 1..=MAX_DELIVERIES {
            let client = broker.client().await?;
            let mut consumer = Consumer::subscribe(client.clone(), config()).await?;
            for _ in 0..N {
                let m = next_message(&mut consumer, Duration::from_secs(20)).await?;
                let before = sent.insert(m.offset, m.delivery_count).unwrap_or(0);
                anyhow::ensure!(
                    m.delivery_count > before,
                    "round {round}: offset {} came back with count {} after being delivered with {before}",
                    m.offset,
                    m.delivery_count
                );
                // Nothing is acknowledged, and nothing was lost: the count is exactly the round.
                anyhow::ensure!(
                    m.delivery_count == round,
                    "round {round}: offset {} count {}",
                    m.offset,
                    m.delivery_count
                );
            }
            // Straight to SIGKILL: well within the once-a-second flush of the offsets store.
            client.close().await;
            std::mem::forget(consumer);
            broker.kill9();
            broker.restart().await?;
        }
        anyhow::ensure!(sent.len() as u64 == N);

        // Every message was handed out MAX_DELIVERIES times: the next session dead-letters
        // them all, with that count, and hands none out again.
        let client = broker.client().await?;
        let mut consumer = Consumer::subscribe(client.clone(), config()).await?;
        let mut dlq =
            Consumer::subscribe(client.clone(), ConsumerConfig::new("q.dlq").start(StartPosition::Earliest))
                .await?;
        let mut dead = Vec::new();
        for _ in 0..N {
            let m = next_message(&mut dlq, Duration::from_secs(20)).await?;
            anyhow::ensure!(header(&m, "quiver.delivery.count")? == MAX_DELIVERIES.to_string());
            dead.push(header(&m, "quiver.origin.offset")?.parse::<u64>()?);
        }
        dead.sort_unstable();
        anyhow::ensure!(dead == (0..N).collect::<Vec<_>>(), "dead letters: {dead:?}");
        let extra =
            tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut consumer)).await;
        anyhow::ensure!(extra.is_err(), "handed out past max_deliveries: {extra:?}");

        // A record written after the restarts is delivered for the first time with count 1:
        // the delivered horizon was cut to the log's end at start.
        publish(&client, "q", ["new".to_string()]).await?;
        let m = next_message(&mut consumer, Duration::from_secs(20)).await?;
        anyhow::ensure!(
            (m.offset, m.delivery_count) == (N, 1),
            "new record: offset {} count {}",
            m.offset,
            m.delivery_count
        );
        m.ack();
        consumer.close().await;
        dlq.close().await;
        client.close().await;
        Ok(())
    })
    .await
}

/// A backlog much longer than the delivered horizon's step (1,024); a group with
/// `max_deliveries = 1` takes a few records and stops; the broker restarts (SIGTERM, or SIGKILL
/// after the periodic flush). Records handed out before go to the dead letters; every record
/// never handed out is delivered, none is dead-lettered: after a clean stop with count 1, after
/// a crash with count 1 or (below the horizon, maybe handed out) 2.
async fn nothing_undelivered_is_dead_lettered(graceful: bool) -> anyhow::Result<()> {
    const BACKLOG: u64 = 3000;
    // Far above what the first session can have handed out (its window is 2 KiB).
    const HANDED_OUT_BELOW: u64 = 300;
    let config = || {
        let mut c = ConsumerConfig::new("q").group("g").start(StartPosition::Earliest);
        c.session_timeout = Duration::from_secs(2);
        c.max_deliveries = Some(1);
        c.window_bytes = 2048;
        c.window_messages = 20;
        c
    };
    let dir = tempfile::tempdir()?;
    let mut broker = BrokerProcess::start(BIN, dir.path(), None).await?;
    let client = broker.client().await?;
    client.admin().create_topic("q", 1, TopicConfig::default()).await?;
    client.admin().create_topic("q.dlq", 1, TopicConfig::default()).await?;
    // Small batches, so one delivery is a few records.
    for chunk in 0..BACKLOG / 10 {
        publish(&client, "q", (chunk * 10..chunk * 10 + 10).map(|i| format!("m-{i}"))).await?;
    }
    let mut consumer = Consumer::subscribe(client.clone(), config()).await?;
    for _ in 0..5 {
        let m = next_message(&mut consumer, Duration::from_secs(20)).await?;
        anyhow::ensure!(m.offset < HANDED_OUT_BELOW && m.delivery_count == 1, "first session: {}", m.offset);
    }
    // Past the once-a-second flush, so the counts of what was handed out are durable.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.close().await;
    std::mem::forget(consumer);
    if graceful {
        broker.restart_graceful().await?;
    } else {
        broker.restart().await?;
    }

    let client = broker.client().await?;
    let mut consumer = Consumer::subscribe(client.clone(), config()).await?;
    let mut seen = std::collections::BTreeSet::new();
    while seen.range(HANDED_OUT_BELOW..).count() < (BACKLOG - HANDED_OUT_BELOW) as usize {
        let m = next_message(&mut consumer, Duration::from_secs(10)).await.map_err(|e| {
            anyhow::anyhow!(
                "{e}; missing from {HANDED_OUT_BELOW}: {:?}",
                (HANDED_OUT_BELOW..BACKLOG).find(|o| !seen.contains(o))
            )
        })?;
        let ok = match (graceful, m.offset >= HANDED_OUT_BELOW) {
            (_, false) => m.delivery_count <= 2,
            (true, true) => m.delivery_count == 1,
            (false, true) => m.delivery_count <= 2,
        };
        anyhow::ensure!(ok, "offset {} came with count {}", m.offset, m.delivery_count);
        seen.insert(m.offset);
        m.ack();
    }
    let mut dlq =
        Consumer::subscribe(client.clone(), ConsumerConfig::new("q.dlq").start(StartPosition::Earliest))
            .await?;
    let mut dead = Vec::new();
    while let Ok(m) = next_message(&mut dlq, Duration::from_secs(2)).await {
        dead.push(header(&m, "quiver.origin.offset")?.parse::<u64>()?);
    }
    anyhow::ensure!(!dead.is_empty(), "what the first session took was not dead-lettered");
    anyhow::ensure!(
        dead.iter().all(|o| *o < HANDED_OUT_BELOW && !seen.contains(o)),
        "dead-lettered without a delivery: {dead:?}"
    );
    consumer.close().await;
    dlq.close().await;
    client.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_dead_letters_nothing_undelivered() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, nothing_undelivered_is_dead_lettered(true)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_dead_letters_nothing_undelivered() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, nothing_undelivered_is_dead_lettered(false)).await
}
