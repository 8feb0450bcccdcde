//! Short consumers leave nothing behind: after many `quiver tail --count 1` processes come and
//! go, the broker's subscription and in-flight gauges return to where they were.

use std::time::{Duration, Instant};

use quiver_client::TopicConfig;
use quiver_tests::{bounded, http_get, init_tracing, metric_sum, BrokerProcess};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");

const GAUGES: [&str; 3] = ["quiver_subscriptions", "quiver_inflight_delivery_bytes", "quiver_connections"];

async fn gauges(metrics: std::net::SocketAddr) -> anyhow::Result<Vec<f64>> {
    let body = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics")).await??;
    // `name ` or `name{`: not a longer name that starts the same.
    Ok(GAUGES
        .iter()
        .map(|g| metric_sum(&body, &format!("{g} ")) + metric_sum(&body, &format!("{g}{{")))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_consumers_leave_the_gauges_where_they_were() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = tempfile::tempdir()?;
        let metrics: std::net::SocketAddr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?
        };
        let config = format!("metrics_listen = \"{metrics}\"\n");
        let broker = BrokerProcess::start(BROKER, dir.path(), Some(&config)).await?;
        let client = broker.client().await?;
        client.admin().create_topic("short", 2, TopicConfig::default()).await?;
        let values = (0..2000).map(|i| format!("value-{i:04}-{}", "x".repeat(200)));
        quiver_tests::publish(&client, "short", values).await?;
        client.close().await;
        let baseline = gauges(metrics).await?;

        // Each tail subscribes to both partitions, gets a window's worth pushed, prints one
        // message and exits (plain, and as a group member).
        for i in 0..30 {
            let mut cmd = broker.cli(CLI);
            cmd.args(["tail", "short", "--from", "earliest", "--count", "1"]);
            if i % 3 == 0 {
                cmd.args(["--group", "short-group"]);
            }
            let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
            anyhow::ensure!(out.status.success(), "tail {i}: {}", String::from_utf8_lossy(&out.stderr));
        }

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = gauges(metrics).await?;
            if now == baseline {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("{GAUGES:?} are {now:?} 20 s after the consumers exited, were {baseline:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    })
    .await
}
