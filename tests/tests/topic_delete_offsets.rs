//! Deleting a topic removes its groups' offsets before the name can be created again, and a
//! delete whose offsets cannot be removed says so (design.md §5.4).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use quiver_broker::storage::{FileWrapper, FsStorage, StorageFile, Wrapped};
use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{Consumer, ConsumerConfig, StartPosition, TopicConfig};
use quiver_tests::{bounded, client_of, init_tracing, next_message, publish, LOOPBACK_ANY_PORT};

/// Real files, except that the offsets store's fsyncs fail once `fail` is set.
#[derive(Debug, Default)]
struct FailingOffsets {
    fail: Arc<AtomicBool>,
}

impl FileWrapper for FailingOffsets {
    fn wrap(&self, path: &Path, file: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        let offsets = path.components().any(|c| c.as_os_str() == "offsets");
        Arc::new(FailingFile { inner: file, fail: offsets.then(|| self.fail.clone()) })
    }
}

#[derive(Debug)]
struct FailingFile {
    inner: Arc<dyn StorageFile>,
    fail: Option<Arc<AtomicBool>>,
}

impl StorageFile for FailingFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(pos, buf)
    }
    fn append(&self, data: &[u8]) -> io::Result<()> {
        self.inner.append(data)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
    fn sync(&self) -> io::Result<()> {
        match self.fail.as_ref().is_some_and(|f| f.load(SeqCst)) {
            true => Err(io::Error::other("injected offsets sync failure")),
            false => self.inner.sync(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_starts_from_zero_for_a_group() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let storage = Wrapped { inner: FsStorage::new(), wrapper: FailingOffsets::default() };
        let fail = storage.wrapper.fail.clone();
        let config = BrokerConfig::new(dir.path()).listen(LOOPBACK_ANY_PORT);
        let broker = Broker::start_with_storage(config, Arc::new(storage)).await?;
        let client = client_of(&broker).await?;
        let admin = client.admin();
        admin.create_topic("t", 1, TopicConfig::default()).await?;
        publish(&client, "t", (0..5).map(|i| format!("old-{i}"))).await?;
        admin.commit_offset("g", "t", 0, 5).await?;

        admin.delete_topic("t").await?;
        admin.create_topic("t", 1, TopicConfig::default()).await?;
        publish(&client, "t", (0..3).map(|i| format!("new-{i}"))).await?;
        let mut c = Consumer::subscribe(
            client.clone(),
            ConsumerConfig::new("t").group("g").start(StartPosition::Earliest),
        )
        .await?;
        let m = next_message(&mut c, Duration::from_secs(10)).await?;
        anyhow::ensure!(m.offset == 0 && &m.value[..] == b"new-0", "started at {} ({:?})", m.offset, m.value);
        c.close().await;

        // The offsets' tombstones cannot be made durable (the offsets log's fsync fails): the
        // delete reports it instead of answering Done.
        admin.create_topic("u", 1, TopicConfig::default()).await?;
        admin.commit_offset("g", "u", 0, 0).await?;
        fail.store(true, SeqCst);
        match admin.delete_topic("u").await {
            Err(e) => anyhow::ensure!(e.to_string().contains("group offsets"), "{e}"),
            Ok(()) => anyhow::bail!("the delete succeeded although its offsets were not removed"),
        }
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}
