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
