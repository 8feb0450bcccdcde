//! Per-topic settings: on the wire in `CreateTopic`/`MetadataOk`, and serialized (serde) to
//! the topic's on-disk `topic.json`.

/// When appended data is synced to disk (docs/design.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync before acknowledging, with group commit.
    Always,
    /// fsync every `flush_interval_ms`; acknowledgements do not wait.
    Interval,
    /// Never sync explicitly.
    Os,
}

/// Per-topic settings: `TopicConfig::default()` (or `new()`) and `with_*` setters; the fields
/// can be read and set, and more will come (replicas, cleanup policy), so no struct literals
/// outside this crate.
///
/// ```
/// use quiver_protocol::message::{Durability, TopicConfig};
/// let config = TopicConfig::new().with_durability(Durability::Interval).with_retention_bytes(Some(1 << 30));
/// assert_eq!(config.retention_bytes, Some(1 << 30));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct TopicConfig {
    pub retention_bytes: Option<u64>,
    pub retention_ms: Option<u64>,
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub durability: Durability,
    pub flush_interval_ms: u32,
    /// Brokers holding a copy of each partition (Raft voters, docs/replication.md). 1 on a
    /// single node; a cluster refuses more than it has brokers.
    #[serde(default = "one_replica")]
    pub replicas: u16,
}

fn one_replica() -> u16 {
    1
}

impl TopicConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }
    /// Delete the oldest segments once the partition holds more than this; `None`: no limit.
    pub fn with_retention_bytes(mut self, bytes: Option<u64>) -> Self {
        self.retention_bytes = bytes;
        self
    }
    /// Delete segments whose newest record is older than this; `None`: kept forever.
    pub fn with_retention_ms(mut self, ms: Option<u64>) -> Self {
        self.retention_ms = ms;
        self
    }
    /// Roll to a new segment file at this size.
    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }
    /// Roll to a new segment file once the active one is this old.
    pub fn with_segment_ms(mut self, ms: u64) -> Self {
        self.segment_ms = ms;
        self
    }
    /// When appends are fsynced, and so when they are acknowledged.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
    /// The fsync period with `Durability::Interval`.
    pub fn with_flush_interval_ms(mut self, ms: u32) -> Self {
        self.flush_interval_ms = ms;
        self
    }

    /// Copies of each partition in a cluster (a majority of them must have a batch durably
    /// for `Acks::All`).
    pub fn with_replicas(mut self, replicas: u16) -> Self {
        self.replicas = replicas;
        self
    }

    /// Checks every setting against its named limit (docs/design.md §2); the broker refuses a
    /// topic whose config fails this, before anything is created.
    pub fn validate(&self) -> Result<(), String> {
        use crate::limits::{MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES};
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(format!(
                "segment_bytes must be {MIN_SEGMENT_BYTES} to {MAX_SEGMENT_BYTES}, got {}",
                self.segment_bytes
            ));
        }
        if self.segment_ms == 0 {
            return Err("segment_ms must be at least 1".into());
        }
        if self.replicas == 0 || usize::from(self.replicas) > crate::limits::MAX_RAFT_VOTERS {
            return Err(format!(
                "replicas must be 1 to {}, got {}",
                crate::limits::MAX_RAFT_VOTERS,
                self.replicas
            ));
        }
        Ok(())
    }
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            segment_bytes: 256 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            durability: Durability::Always,
            flush_interval_ms: 1000,
            replicas: 1,
        }
    }
}
