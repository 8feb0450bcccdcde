//! The topic registry: topics on disk (`topics/<name>/topic.json` plus one directory per
//! partition) and in memory.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dashmap::DashMap;
use quiver_protocol::limits::MAX_TOPIC_FILE_BYTES;
use quiver_protocol::message::{validate_partition_count, validate_topic_name};
use quiver_protocol::{ErrorCode, TopicConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::partition::{Partition, PartitionError, SharedBudgets};
use crate::storage::Storage;

#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    pub config: TopicConfig,
    pub partitions: Vec<Arc<Partition>>,
    /// In a cluster: the controller log index of its create (`TopicFile::created_at_index`);
    /// `None` on one node and for topics created before it was recorded.
    pub created_at_index: Option<u64>,
    /// Its per-topic counters, looked up once (a lookup allocates the label and hashes it).
    pub metrics: TopicMetrics,
}

/// The counters a produce or fetch request bumps, labelled with the topic. Looked up from the
/// metrics recorder installed when the topic is loaded or created: an embedding application
/// must install its recorder before `Broker::start`, or these count into a no-op recorder.
#[derive(Debug)]
pub struct TopicMetrics {
    pub messages_in: metrics::Counter,
    pub bytes_in: metrics::Counter,
    pub fetch_bytes: metrics::Counter,
}

impl TopicMetrics {
    fn new(topic: &Arc<str>) -> Self {
        TopicMetrics {
            messages_in: metrics::counter!("quiver_messages_in_total", "topic" => topic.to_string()),
            bytes_in: metrics::counter!("quiver_bytes_in_total", "topic" => topic.to_string()),
            fetch_bytes: metrics::counter!("quiver_fetch_bytes_total", "topic" => topic.to_string()),
        }
    }
}

impl Topic {
    fn new(
        name: Arc<str>,
        config: TopicConfig,
        partitions: Vec<Arc<Partition>>,
        created_at_index: Option<u64>,
    ) -> Self {
        let metrics = TopicMetrics::new(&name);
        Topic { name, config, partitions, created_at_index, metrics }
    }

    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>, PartitionError> {
        self.partitions.get(id as usize).ok_or_else(|| {
            PartitionError::new(
                ErrorCode::UnknownPartition,
                format!("topic '{}' has no partition {id} (it has {})", self.name, self.partitions.len()),
            )
        })
    }
}

/// `topics/<name>/topic.json`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct TopicFile {
    pub(crate) name: String,
    pub(crate) partitions: u32,
    pub(crate) config: TopicConfig,
    /// In a cluster: the controller log index of the create this topic came from. A name
    /// deleted and created again has several creates in the log; replaying the log at start
    /// must apply the older ones (and their deletes) to nothing, not to these files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) created_at_index: Option<u64>,
}

impl TopicFile {
    /// Parses and checks the file's bytes (length at most [`MAX_TOPIC_FILE_BYTES`], then the
    /// name, the partition count and the config against their limits): a damaged file must
    /// not make the start allocate a job per partition it claims.
    pub(crate) fn decode(bytes: &[u8]) -> Result<TopicFile, String> {
        if bytes.len() as u64 > MAX_TOPIC_FILE_BYTES {
            return Err(format!("{} bytes, more than {MAX_TOPIC_FILE_BYTES}", bytes.len()));
        }
        let file: TopicFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        validate_topic_name(&file.name)?;
        validate_partition_count(file.partitions)?;
        file.config.validate()?;
        Ok(file)
    }

    /// The file's bytes.
    pub(crate) fn encode(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}

/// Reads at most [`MAX_TOPIC_FILE_BYTES`] + 1 bytes of `path`.
fn read_topic_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_TOPIC_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[derive(Debug)]
pub struct Topics {
    root: PathBuf,
    /// Where deleted topics go (renamed, atomically) before their files are removed.
    trash: PathBuf,
    storage: Arc<dyn Storage>,
    map: DashMap<String, Arc<Topic>>,
    /// Serialises create and delete so two creates of one name cannot both succeed.
    admin: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    budgets: SharedBudgets,
}

impl Topics {
    /// Loads every topic under `<data_dir>/topics`, recovering each partition. Blocking.
    pub fn load(
        data_dir: &Path,
        storage: Arc<dyn Storage>,
        shutdown: CancellationToken,
        budgets: SharedBudgets,
    ) -> anyhow::Result<Topics> {
        use anyhow::Context;
        let root = data_dir.join("topics");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let topics = Topics {
            root: root.clone(),
            trash: data_dir.join(TRASH_DIR),
            storage,
            map: DashMap::new(),
            admin: Default::default(),
            shutdown,
            budgets,
        };
        // Deletes interrupted by a crash finish here. Trash names never collide with topic
        // names: they live in their own directory.
        let trash = data_dir.join(TRASH_DIR);
        std::fs::create_dir_all(&trash).with_context(|| format!("creating {}", trash.display()))?;
        empty_trash(&trash);
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
            let entry = entry?;
            let dir_name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.path().join("topic.json");
            let text = match read_topic_file(&meta) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && entry.path().is_dir() => {
                    // topic.json is written last: this is a create that a crash interrupted,
                    // which never acknowledged anything.
                    tracing::warn!(dir = %entry.path().display(), "removing an interrupted topic create (no topic.json)");
                    discard(&entry.path(), &trash)?;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), "skipping a directory without a readable topic.json: {e}");
                    continue;
                }
            };
            let file = TopicFile::decode(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("parsing {}", meta.display()))?;
            if file.name != dir_name {
                if dir_name == format!("{}.deleting", file.name) {
                    // Versions before 0.2 renamed a deleted topic to `<name>.deleting` in place.
                    tracing::info!(dir = %dir_name, "finishing an interrupted topic delete (old layout)");
                    discard(&entry.path(), &trash)?;
                } else {
                    tracing::warn!(dir = %entry.path().display(), topic = %file.name, "skipping a topic directory whose topic.json names another topic");
                }
                continue;
            }
            files.push(file);
        }
        // Every partition of every topic, several at once (recovery mostly waits for the disk).
        let jobs: Vec<(usize, u32)> =
            files.iter().enumerate().flat_map(|(t, f)| (0..f.partitions).map(move |p| (t, p))).collect();
        let count = u32::try_from(jobs.len()).context("too many partitions")?;
        let names: Vec<Arc<str>> = files.iter().map(|f| Arc::from(f.name.as_str())).collect();
        let mut opened = parallel_map(count, OPEN_THREADS, |i| {
            let (t, p) = jobs[i as usize];
            let (file, name) = (&files[t], &names[t]);
            Partition::open(
                topics.storage.clone(),
                root.join(&file.name).join(p.to_string()),
                name.clone(),
                p,
                &file.config,
                &topics.budgets,
                topics.shutdown.clone(),
            )
        })?
        .into_iter();
        for (file, name) in files.into_iter().zip(names) {
            let partitions: Vec<_> = opened.by_ref().take(file.partitions as usize).collect();
            tracing::info!(topic = %file.name, partitions = file.partitions, "loaded topic");
            let topic = Arc::new(Topic::new(name, file.config, partitions, file.created_at_index));
            topics.map.insert(file.name, topic);
        }
        Ok(topics)
    }

    /// Bytes all tail caches hold now.
    pub fn tail_cache_bytes(&self) -> usize {
        self.budgets.tail_cache.budget.used()
    }

    pub fn get(&self, name: &str) -> Result<Arc<Topic>, PartitionError> {
        self.map
            .get(name)
            .map(|t| t.clone())
            .ok_or_else(|| PartitionError::new(ErrorCode::UnknownTopic, format!("unknown topic '{name}'")))
    }

    pub fn all(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<_> = self.map.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Creates a topic durably: partition directories and their files, an fsync of the topic
    /// directory, then `topic.json` (tmp, fsync, rename, fsync dir). A crash before the rename
    /// leaves a directory without `topic.json`, which load skips.
    pub async fn create(
        &self,
        name: &str,
        partitions: u32,
        config: TopicConfig,
        max_partitions_total: u32,
    ) -> Result<Arc<Topic>, PartitionError> {
        self.create_at(name, partitions, config, max_partitions_total, None).await
    }

    /// [`create`](Self::create), recording the controller log index of the create (cluster).
    pub(crate) async fn create_at(
        &self,
        name: &str,
        partitions: u32,
        config: TopicConfig,
        max_partitions_total: u32,
        created_at_index: Option<u64>,
    ) -> Result<Arc<Topic>, PartitionError> {
        let invalid = |m: String| PartitionError::new(ErrorCode::InvalidTopic, m);
        validate_topic_name(name).map_err(invalid)?;
        validate_partition_count(partitions).map_err(invalid)?;
        config.validate().map_err(invalid)?;
        let _guard = self.admin.lock().await;
        if self.map.contains_key(name) {
            return Err(PartitionError::new(
                ErrorCode::TopicExists,
                format!("topic '{name}' already exists"),
            ));
        }
        let existing: u64 = self.map.iter().map(|t| t.partitions.len() as u64).sum();
        if existing + u64::from(partitions) > u64::from(max_partitions_total) {
            return Err(invalid(format!(
                "the broker holds {existing} partitions; {partitions} more would pass max_partitions_total={max_partitions_total}"
            )));
        }
        if let Some(limit) = crate::open_files::limit() {
            let per_file = self.storage.fds_per_segment_file();
            let most = crate::open_files::partitions_within(limit, per_file);
            if existing + u64::from(partitions) > most {
                return Err(PartitionError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "topic '{name}' needs {partitions} partitions and the broker holds {existing}: its open-file limit of {limit} allows {most} partitions (counting {} descriptors each, {} for older segments being read, and {} kept for the rest); raise the limit (ulimit -n) of quiverd",
                        crate::open_files::FILES_PER_PARTITION * per_file,
                        crate::open_files::CLOSED_SEGMENT_FILES as u64 * per_file,
                        crate::open_files::RESERVED_FDS
                    ),
                ));
            }
        }
        let file = TopicFile { name: name.to_string(), partitions, config: config.clone(), created_at_index };
        let (storage, root, shutdown) = (self.storage.clone(), self.root.clone(), self.shutdown.clone());
        let budgets = self.budgets.clone();
        let owned = name.to_string();
        let trash = self.trash.clone();
        let topic = tokio::task::spawn_blocking(move || -> Result<Arc<Topic>, PartitionError> {
            let storage_err = |what: &str, e: std::io::Error| {
                PartitionError::new(ErrorCode::StorageError, format!("creating topic '{owned}': {what}: {e}"))
            };
            let dir = root.join(&owned);
            if dir.join("topic.json").exists() {
                // A topic the broker could not load at start (its log says why): its data may
                // be all someone has, so it is never discarded to make room for a new one.
                return Err(PartitionError::new(
                    ErrorCode::TopicExists,
                    format!(
                        "{} holds a topic that could not be loaded at start (see the broker's log); move it away to create '{owned}' anew",
                        dir.display()
                    ),
                ));
            }
            if dir.exists() {
                // Not a topic (no topic.json): what a failed create left (load removes these
                // too). Nothing in it was ever acknowledged.
                discard(&dir, &trash).map_err(|e| storage_err("removing a leftover directory", e))?;
            }
            let created: Result<Arc<Topic>, PartitionError> = (|| {
                std::fs::create_dir(&dir).map_err(|e| storage_err("create directory", e))?;
                let topic =
                    open_topic(&storage, &root, &shutdown, &budgets, &file)?;
                // The partition directories' entries must be durable before topic.json exists.
                std::fs::File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| storage_err("sync directory", e))?;
                write_topic_file(&dir, &file).map_err(|e| storage_err("write topic.json", e))?;
                Ok(topic)
            })();
            if let Err(e) = &created {
                tracing::warn!(topic = %owned, partitions, "creating a topic failed: {}", e.message);
                // Nothing of a failed create stays behind (its files close as `topic` drops).
                if let Err(e) = discard(&dir, &trash) {
                    tracing::warn!(dir = %dir.display(), "could not remove what a failed create left: {e}");
                }
            }
            created
        })
        .await
        .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))??;
        self.map.insert(name.to_string(), topic.clone());
        tracing::info!(topic = name, partitions, "created topic");
        Ok(topic)
    }

    /// Deletes a topic: rename its directory into the trash (atomic, durable once both
    /// directories are synced), forget it, run `dropped` (the groups' removal), remove the
    /// files, then run `forget` (blocking: the group offsets' removal), still under the admin
    /// lock, so the name cannot be created again before it is done. A failed `forget` is
    /// logged and reported (the topic is gone).
    pub async fn delete(
        &self,
        name: &str,
        dropped: impl FnOnce(),
        forget: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Result<Arc<Topic>, PartitionError> {
        let _guard = self.admin.lock().await;
        let topic = self.get(name)?;
        let dir = self.root.join(name);
        let trash = self.trash.clone();
        tokio::task::spawn_blocking(move || discard(&dir, &trash))
            .await
            .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| {
                PartitionError::new(ErrorCode::StorageError, format!("deleting topic '{name}': {e}"))
            })?;
        self.map.remove(name);
        dropped();
        // Ends its subscriptions ("topic 'x' was deleted") and stops its writers, so its files
        // close.
        topic.partitions.iter().for_each(|p| p.close_deleted());
        tracing::info!(topic = name, "deleted topic");
        let forgotten = tokio::task::spawn_blocking(forget).await.unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = forgotten {
            tracing::error!(topic = name, "deleted topic, but could not remove its group offsets ({e}): a topic created again under this name would inherit them");
            return Err(PartitionError::new(
                ErrorCode::StorageError,
                format!("topic '{name}' was deleted, but its group offsets could not be removed: {e}"),
            ));
        }
        Ok(topic)
    }
}

/// Directory (beside `topics/`) that deleted topics are renamed into before removal.
const TRASH_DIR: &str = "trash";

/// Removes `dir` for good: a rename into `trash` under a fresh name (so a crash leaves either
/// the whole directory or none of it under `topics/`), both directories synced, then the
/// files. Blocking.
fn discard(dir: &Path, trash: &Path) -> std::io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let doomed = trash.join(format!("{nanos}-{}-{seq}", std::process::id()));
    std::fs::create_dir_all(trash)?;
    std::fs::rename(dir, &doomed)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    std::fs::File::open(trash)?.sync_all()?;
    std::fs::remove_dir_all(&doomed)
}

/// Removes whatever a crash left in the trash. Failures are logged: the next start retries.
fn empty_trash(trash: &Path) {
    let Ok(entries) = std::fs::read_dir(trash) else { return };
    for entry in entries.flatten() {
        tracing::info!(dir = %entry.path().display(), "finishing an interrupted topic delete");
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(entry.path()),
            _ => std::fs::remove_file(entry.path()),
        };
        if let Err(e) = removed {
            tracing::warn!(dir = %entry.path().display(), "could not empty the trash: {e}");
        }
    }
}

/// Threads that open (recover) partitions at once. Recovery is mostly waiting for the disk
/// (reading the bytes after each partition's recovery point), so more threads than cores.
const OPEN_THREADS: usize = 16;

/// Creates every partition of a new topic. Blocking; must be
/// called where a tokio runtime is current (each partition starts its writer task).
fn open_topic(
    storage: &Arc<dyn Storage>,
    root: &Path,
    shutdown: &CancellationToken,
    budgets: &SharedBudgets,
    file: &TopicFile,
) -> Result<Arc<Topic>, PartitionError> {
    let (name, config): (Arc<str>, TopicConfig) = (Arc::from(file.name.as_str()), file.config.clone());
    let dir = root.join(&*name);
    let open = |p: u32| {
        Partition::open(
            storage.clone(),
            dir.join(p.to_string()),
            name.clone(),
            p,
            &config,
            budgets,
            shutdown.clone(),
        )
    };
    // One at a time: a new partition is a few directory entries and fsyncs in the same
    // directory, which threads only contend for (on 16 threads each openat, mkdir and fsync
    // took 4-7x as long, strace on the development VM).
    let parts = parallel_map(file.partitions, 1, open)?;
    Ok(Arc::new(Topic::new(name, config, parts, file.created_at_index)))
}

/// `f(0..n)` on up to `threads` threads (each entering the caller's tokio runtime), results in
/// order; the first error wins and the remaining items are skipped.
fn parallel_map<T: Send>(
    n: u32,
    threads: usize,
    f: impl Fn(u32) -> Result<T, PartitionError> + Sync,
) -> Result<Vec<T>, PartitionError> {
    use std::sync::atomic::{AtomicBool, AtomicU32};
    let threads = threads.min(n as usize);
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let runtime = tokio::runtime::Handle::try_current().ok();
    let next = AtomicU32::new(0);
    let failed = AtomicBool::new(false);
    let mut results: Vec<(u32, Result<T, PartitionError>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let _entered = runtime.as_ref().map(|r| r.enter());
                    let mut done = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let r = f(i);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        done.push((i, r));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(done) => done,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

fn write_topic_file(dir: &Path, file: &TopicFile) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("topic.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(file.encode().map_err(std::io::Error::other)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("topic.json"))?;
    std::fs::File::open(dir)?.sync_all()?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    crate::storage::ledger::replaced_whole(&dir.join("topic.json"));
    Ok(())
}
