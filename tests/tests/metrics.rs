//! The Prometheus endpoint shows the broker's counters moving, and /healthz answers.

use quiver_client::{Producer, ProducerConfig, ProducerRecord, TopicConfig};
use quiver_tests::{bounded, embedded, http_get, init_tracing, metric_sum, LOOPBACK_ANY_PORT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_shows_traffic() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |c| c.metrics_listen = Some(LOOPBACK_ANY_PORT)).await?;
        let metrics = broker.metrics_addr().ok_or_else(|| anyhow::anyhow!("metrics not served"))?;
        client.admin().create_topic("m", 1, TopicConfig::default()).await?;

        let health = tokio::task::spawn_blocking(move || http_get(metrics, "/healthz")).await??;
        assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");

        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..10 {
            producer.send("m", ProducerRecord::new(format!("{i}"))).await?;
        }
        let body = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics")).await??;
        assert_eq!(metric_sum(&body, "quiver_messages_in_total{topic=\"m\"}"), 10.0, "{body}");
        assert!(body.contains("quiver_fsync_seconds"), "{body}");
        assert!(body.contains("quiver_produce_seconds"), "{body}");
        assert!(body.contains("quiver_connections"), "{body}");

        let missing = tokio::task::spawn_blocking(move || http_get(metrics, "/nope")).await??;
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
        let topic = TopicConfig::default().with_durability(quiver_client::Durability::Interval);
        client.admin().create_topic("loaded", 1, topic).await?;
        client.close().await;
        broker.restart().await?;

        let client = broker.client().await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..20 {
            producer.send("loaded", ProducerRecord::new(format!("{i}"))).await?;
        }
        let body = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics")).await??;
        assert_eq!(metric_sum(&body, "quiver_messages_in_total{topic=\"loaded\"}"), 20.0, "{body}");
        // Every append is counted by where it ran; all but the first (it records the first
        // leader epoch, an fsync) ran on the runtime's tasks.
        let on_runtime = metric_sum(&body, "quiver_group_commits_total{path=\"in_place\"}")
            + metric_sum(&body, "quiver_group_commits_total{path=\"express\"}");
        let handed_off = metric_sum(&body, "quiver_group_commits_total{path=\"blocking_thread\"}");
        assert!(on_runtime >= 19.0 && on_runtime + handed_off >= 20.0, "{body}");
        client.close().await;
        broker.kill9();
        Ok(())
    })
    .await
}
