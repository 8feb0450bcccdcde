//! A client given several brokers (issue 17): it connects to the first that answers, names
//! every one when none does, and replaces a lost connection through the list.

use std::time::{Duration, Instant};

use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{
    Client, ClientConfig, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
    StartPosition, TopicConfig,
};
use quiver_tests::{bounded, free_udp_port, init_tracing, next_message, LOOPBACK_ANY_PORT};

async fn start(dir: &std::path::Path) -> anyhow::Result<Broker> {
    Broker::start(BrokerConfig::new(dir).listen(LOOPBACK_ANY_PORT)).await
}

fn ca_of(broker: &Broker) -> anyhow::Result<std::path::PathBuf> {
    broker.ca_path().cloned().ok_or_else(|| anyhow::anyhow!("no development CA"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_broker_first_in_the_list_is_skipped() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let broker = start(dir.path()).await?;
        let dead = format!("127.0.0.1:{}", free_udp_port());
        let list = format!("{dead},{}", broker.local_addr());
        // A dead first entry answers nothing: the next is dialled after a quarter of a second,
        // not after the first one's whole connect timeout.
        let config = ClientConfig::new(list, ca_of(&broker)?).with_connect_timeout(Duration::from_secs(5));
        let started = std::time::Instant::now();
        let client = Client::connect(config).await?;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "connecting past a dead first broker took {took:?}");

        client.admin().create_topic("listed", 2, TopicConfig::default()).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let mut acks = Vec::new();
        for i in 0..100 {
            acks.push(producer.enqueue("listed", ProducerRecord::new(format!("{i}"))).await?);
        }
        for a in acks {
            a.await?;
        }
        let mut consumer =
            Consumer::subscribe(client.clone(), ConsumerConfig::new("listed").start(StartPosition::Earliest))
                .await?;
        let mut seen = Vec::new();
        while seen.len() < 100 {
            let m = next_message(&mut consumer, Duration::from_secs(10)).await?;
            seen.push(std::str::from_utf8(&m.value)?.parse::<u32>()?);
        }
        seen.sort();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        consumer.close().await;
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_broker_answering_is_one_error_naming_each_in_bounded_time() -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let dir = tempfile::tempdir()?;
        // Any CA will do: nothing answers.
        let ca = {
            let b = start(dir.path()).await?;
            let ca = dir.path().join("ca-copy.pem");
            std::fs::copy(ca_of(&b)?, &ca)?;
            b.shutdown().await;
            ca
        };
        let dead: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_udp_port())).collect();
        let config = ClientConfig::new("unused:1", ca)
            .with_brokers(dead.clone())
            .with_connect_timeout(Duration::from_millis(400));
        let started = Instant::now();
        let err =
            Client::connect(config).await.err().ok_or_else(|| anyhow::anyhow!("connected to nothing?"))?;
        let took = started.elapsed();
        assert!(matches!(err, ClientError::AllBrokersFailed { .. }), "{err:?}");
        assert!(err.is_retriable(), "a dead broker may come back");
        let text = err.to_string();
        for d in &dead {
            assert!(text.contains(d.as_str()), "{d} not named in: {text}");
        }
        assert!(took < Duration::from_secs(3), "three 400 ms attempts took {took:?}");
        Ok(())
    })
    .await
}

/// Two independent single brokers stand in for a cluster's members (each has its own topics):
/// once the one the client talks to shuts down, its next requests go to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_is_replaced_by_the_next_in_the_list() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let (d1, d2) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let (b1, b2) = (start(d1.path()).await?, start(d2.path()).await?);
        // One CA file trusting both brokers' development CAs.
        let ca = d1.path().join("both-cas.pem");
        std::fs::write(&ca, [std::fs::read(ca_of(&b1)?)?, std::fs::read(ca_of(&b2)?)?].concat())?;
        let second = quiver_tests::client_of(&b2).await?;
        second.admin().create_topic("on-second", 1, TopicConfig::default()).await?;

        let config = ClientConfig::new("unused:1", ca)
            .with_brokers([b1.local_addr().to_string(), b2.local_addr().to_string()])
            .with_connect_timeout(Duration::from_millis(1000));
        let client = Client::connect(config).await?;
        let names = |t: Vec<quiver_client::TopicInfo>| t.into_iter().map(|t| t.name).collect::<Vec<_>>();
        assert!(names(client.admin().list_topics().await?).is_empty(), "first on the first broker");
        let mut reconnects = client.reconnects();

        b1.shutdown().await;
        let described = client.admin().describe_topic("on-second").await?;
        assert_eq!(described.name, "on-second", "answered by the second broker");
        assert!(reconnects.has_changed()?, "the client says its connection was replaced");
        reconnects.borrow_and_update();

        // Its producer too: a fresh one (producer ids are each broker's own on single brokers).
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let meta = producer.send("on-second", ProducerRecord::new("after the switch")).await?;
        assert_eq!(meta.offset, Some(0));
        client.close().await;
        second.close().await;
        b2.shutdown().await;
        Ok(())
    })
    .await
}
