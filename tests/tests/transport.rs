//! The QUIC transport between the SDK and a real broker process.

use std::time::Duration;

use quiver_protocol::limits::MAX_UDP_PAYLOAD;
use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

/// Both ends accept datagrams up to `MAX_UDP_PAYLOAD` and discover the path's MTU, so on
/// loopback a connection that starts at 1,200 bytes soon sends packets far larger than Ethernet's 1,452 bytes: the
/// single biggest factor in throughput (BENCHMARKS.md). If either end stopped advertising the
/// larger size, discovery would stop at 1,452 and this would time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_grow_past_ethernet_size_on_loopback() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let client = broker.client().await?;
        let conn = client.connection().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mtu = conn.stats().path.current_mtu;
            if mtu > 1452 {
                assert!(mtu <= MAX_UDP_PAYLOAD, "{mtu} above the bound");
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "MTU stayed at {mtu}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.close().await;
        Ok(())
    })
    .await
}
