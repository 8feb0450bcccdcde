//! The topic registry: topics on disk (`topics/<name>/topic.json` plus one directory per
//! partition) and in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dashmap::DashMap;
use quiver_protocol::message::{validate_partition_count, validate_topic_name};
use quiver_protocol::{ErrorCode, TopicConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::partition::{Partition, PartitionError};
use crate::storage::Storage;

#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    pub config: TopicConfig,
    pub partitions: Vec<Arc<Partition>>,
}

impl Topic {
    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>, PartitionError> {
        self.partitions.get(id as usize).ok_or_else(|| {
            PartitionError::new(
                ErrorCode::UnknownPartition,
                format!("topic '{}' has no partition {id} (it has {})", self.name, self.partitions.len()),
            )
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct TopicFile {
    name: String,
    partitions: u32,
    config: TopicConfig,
}

#[derive(Debug)]
pub struct Topics {
    root: PathBuf,
    storage: Arc<dyn Storage>,
    map: DashMap<String, Arc<Topic>>,
    /// Serialises create and delete so two creates of one name cannot both succeed.
    admin: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    tail_cache_bytes: usize,
}

impl Topics {
    /// Loads every topic under `<data_dir>/topics`, recovering each partition. Blocking.
    pub fn load(
        data_dir: &Path,
        storage: Arc<dyn Storage>,
        shutdown: CancellationToken,
        tail_cache_bytes: usize,
    ) -> anyhow::Result<Topics> {
        use anyhow::Context;
        let root = data_dir.join("topics");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let topics = Topics {
            root: root.clone(),
            storage,
            map: DashMap::new(),
            admin: Default::default(),
            shutdown,
            tail_cache_bytes,
        };
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".deleting") {
                tracing::info!(%name, "finishing an interrupted topic delete");
                std::fs::remove_dir_all(entry.path())?;
                continue;
            }
            let meta = entry.path().join("topic.json");
            let text = match std::fs::read_to_string(&meta) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), "skipping a directory without a readable topic.json: {e}");
                    continue;
                }
            };
            let file: TopicFile =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", meta.display()))?;
            let topic = open_topic(
                &topics.storage,
                &root,
                &topics.shutdown,
                tail_cache_bytes,
                &file.name,
                file.partitions,
                file.config,
            )?;
            tracing::info!(topic = %file.name, partitions = file.partitions, "loaded topic");
            topics.map.insert(file.name, topic);
        }
        Ok(topics)
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
        let invalid = |m: String| PartitionError::new(ErrorCode::InvalidTopic, m);
        validate_topic_name(name).map_err(invalid)?;
        validate_partition_count(partitions).map_err(invalid)?;
        validate_config(&config).map_err(invalid)?;
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
        let file = TopicFile { name: name.to_string(), partitions, config: config.clone() };
        let (storage, root, shutdown) = (self.storage.clone(), self.root.clone(), self.shutdown.clone());
        let tail_cache_bytes = self.tail_cache_bytes;
        let owned = name.to_string();
        let topic = tokio::task::spawn_blocking(move || -> Result<Arc<Topic>, PartitionError> {
            let storage_err = |e: std::io::Error| PartitionError::new(ErrorCode::StorageError, e.to_string());
            let dir = root.join(&owned);
            std::fs::create_dir_all(&dir).map_err(storage_err)?;
            let topic = open_topic(&storage, &root, &shutdown, tail_cache_bytes, &owned, partitions, config)?;
            // The partition directories' entries must be durable before topic.json exists.
            std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(storage_err)?;
            write_topic_file(&dir, &file).map_err(storage_err)?;
            Ok(topic)
        })
        .await
        .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))??;
        self.map.insert(name.to_string(), topic.clone());
        tracing::info!(topic = name, partitions, "created topic");
        Ok(topic)
    }

    /// Deletes a topic: rename its directory (atomic), forget it, remove the files.
    pub async fn delete(&self, name: &str) -> Result<Arc<Topic>, PartitionError> {
        let _guard = self.admin.lock().await;
        let topic = self.get(name)?;
        let dir = self.root.join(name);
        let doomed = self.root.join(format!("{name}.deleting"));
        let storage_err = |e: std::io::Error| PartitionError::new(ErrorCode::StorageError, e.to_string());
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::rename(&dir, &doomed)?;
            std::fs::File::open(&root)?.sync_all()?;
            std::fs::remove_dir_all(&doomed)
        })
        .await
        .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(storage_err)?;
        self.map.remove(name);
        // Ends its subscriptions ("topic 'x' was deleted") and stops its writers, so its files
        // close.
        topic.partitions.iter().for_each(|p| p.close_deleted());
        tracing::info!(topic = name, "deleted topic");
        Ok(topic)
    }
}

/// Opens (creating when new) every partition of a topic. Blocking.
fn open_topic(
    storage: &Arc<dyn Storage>,
    root: &Path,
    shutdown: &CancellationToken,
    tail_cache_bytes: usize,
    name: &str,
    partitions: u32,
    config: TopicConfig,
) -> Result<Arc<Topic>, PartitionError> {
    let name: Arc<str> = Arc::from(name);
    let dir = root.join(&*name);
    let parts = (0..partitions)
        .map(|p| {
            Partition::open(
                storage.clone(),
                dir.join(p.to_string()),
                name.clone(),
                p,
                &config,
                tail_cache_bytes,
                shutdown.clone(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(Topic { name, config, partitions: parts }))
}

fn validate_config(c: &TopicConfig) -> Result<(), String> {
    if c.segment_bytes < 4096 {
        return Err("segment_bytes must be at least 4096".into());
    }
    if c.segment_bytes > u32::MAX as u64 {
        return Err("segment_bytes must fit in 32 bits (index positions are u32)".into());
    }
    Ok(())
}

fn write_topic_file(dir: &Path, file: &TopicFile) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("topic.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(file).map_err(std::io::Error::other)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("topic.json"))?;
    std::fs::File::open(dir)?.sync_all()?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}
