//! The Prometheus endpoint shows the broker's counters moving, and /healthz answers.

use std::io::{Read, Write};
use std::net::TcpStream;

use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{Client, ClientConfig, Producer, ProducerConfig, ProducerRecord, TopicConfig};
use quiver_tests::{bounded, init_tracing};

fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn counter(body: &str, prefix: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_shows_traffic() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let mut config = BrokerConfig::new(dir.path()).listen("127.0.0.1:0".parse()?);
        config.metrics_listen = Some("127.0.0.1:0".parse()?);
        let broker = Broker::start(config).await?;
        let metrics = broker.metrics_addr().ok_or_else(|| anyhow::anyhow!("metrics not served"))?;
        let ca = broker.ca_path().cloned().ok_or_else(|| anyhow::anyhow!("no CA"))?;
        let client = Client::connect(ClientConfig::new(broker.local_addr().to_string(), ca)).await?;
        client.admin().create_topic("m", 1, TopicConfig::default()).await?;

        let health = tokio::task::spawn_blocking(move || get(metrics, "/healthz")).await??;
        assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");

        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..10 {
            producer.send("m", ProducerRecord::new(format!("{i}"))).await?;
        }
        let body = tokio::task::spawn_blocking(move || get(metrics, "/metrics")).await??;
        assert_eq!(counter(&body, "quiver_messages_in_total{topic=\"m\"}"), 10.0, "{body}");
        assert!(body.contains("quiver_fsync_seconds"), "{body}");
        assert!(body.contains("quiver_produce_seconds"), "{body}");
        assert!(body.contains("quiver_connections"), "{body}");

        let missing = tokio::task::spawn_blocking(move || get(metrics, "/nope")).await??;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// Partitions that exist when the broker starts keep metric handles from the moment they load;
/// the recorder must be installed before that, or their counters stay at zero. A fresh
/// `quiverd` process (its own recorder) restarted over an existing topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_loaded_at_startup_are_counted() -> anyhow::Result<()> {
    init_tracing();
    bounded(90, async {
        const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
        let dir = tempfile::tempdir()?;
        let metrics: std::net::SocketAddr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?
        };
        let config = format!("metrics_listen = \"{metrics}\"\n");
        let mut broker = quiver_tests::BrokerProcess::start(BIN, dir.path(), Some(&config)).await?;
        let client = broker.client().await?;
        let topic = TopicConfig { durability: quiver_client::Durability::Interval, ..TopicConfig::default() };
        client.admin().create_topic("loaded", 1, topic).await?;
        client.close().await;
        broker.restart().await?;

        let client = broker.client().await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..20 {
            producer.send("loaded", ProducerRecord::new(format!("{i}"))).await?;
        }
        let body = tokio::task::spawn_blocking(move || get(metrics, "/metrics")).await??;
        assert_eq!(counter(&body, "quiver_messages_in_total{topic=\"loaded\"}"), 20.0, "{body}");
        assert!(counter(&body, "quiver_group_commits_total{path=\"in_place\"}") >= 20.0, "{body}");
        client.close().await;
        broker.kill9();
        Ok(())
    })
    .await
}
