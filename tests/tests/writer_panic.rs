//! A group commit that panics (a bug, simulated here by a segment file that panics on a marked
//! append) fails that group's produce requests and stops appends to its partition, which may
//! be half written. It does not hang the producers, end the broker, or touch other partitions.
//! Both places a group commit runs are covered: in place on a multi-thread runtime, on a
//! blocking thread on a current-thread runtime.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quiver_broker::storage::{FileWrapper, FsStorage, StorageFile, Wrapped};
use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{Durability, Producer, ProducerConfig, ProducerRecord, TopicConfig};
use quiver_tests::{bounded, client_of, init_tracing, LOOPBACK_ANY_PORT};

const MARK: &[u8] = b"panic-in-append";

/// Real files, except that an append holding `MARK` (only a segment append holds record
/// values) panics.
#[derive(Debug)]
struct Panicky;

impl FileWrapper for Panicky {
    fn wrap(&self, _: &Path, file: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        Arc::new(PanickyFile(file))
    }
}

#[derive(Debug)]
struct PanickyFile(Arc<dyn StorageFile>);

impl StorageFile for PanickyFile {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(pos, buf)
    }
    fn append(&self, data: &[u8]) -> io::Result<()> {
        if data.windows(MARK.len()).any(|w| w == MARK) {
            panic!("simulated bug in a segment append");
        }
        self.0.append(data)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.0.truncate(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
}

async fn a_panicking_commit_fails_its_partition_only() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let config = BrokerConfig::new(data.path()).listen(LOOPBACK_ANY_PORT);
    let broker =
        Broker::start_with_storage(config, Arc::new(Wrapped { inner: FsStorage::new(), wrapper: Panicky }))
            .await?;
    let client = client_of(&broker).await?;
    // Interval: small groups run in place where the runtime allows it.
    let topic = TopicConfig::default().with_durability(Durability::Interval);
    client.admin().create_topic("bug", 1, topic.clone()).await?;
    client.admin().create_topic("fine", 1, topic).await?;
    let config = ProducerConfig::default().with_delivery_timeout(Duration::from_secs(2));
    let producer = Producer::new(client.clone(), config);

    producer.send("bug", ProducerRecord::new("before")).await?;
    // The producer retries a storage error (another replica could take over, one day) until
    // its delivery timeout, then says what kept failing.
    let failed = producer.send("bug", ProducerRecord::new(MARK.to_vec())).await;
    let text = failed.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains("last error") && text.contains("must be reopened"), "{text}");
    // The partition stops taking appends: it may hold half a write.
    let after = producer.send("bug", ProducerRecord::new("after")).await;
    let text = after.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains("last error") && text.contains("must be reopened"), "{text}");
    // Everything else goes on.
    producer.send("fine", ProducerRecord::new("still here")).await?;
    let hw: u64 =
        client.admin().describe_topic("bug").await?.partitions.iter().map(|p| p.high_watermark).sum();
    assert_eq!(hw, 1, "only the record before the panic is visible");

    client.close().await;
    broker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, a_panicking_commit_fails_its_partition_only()).await
}

#[tokio::test(flavor = "current_thread")]
async fn on_a_blocking_thread() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, a_panicking_commit_fails_its_partition_only()).await
}
