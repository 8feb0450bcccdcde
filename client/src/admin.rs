//! Topic administration.

use quiver_protocol::message::{Message, PartitionOffsets, TopicConfig, TopicInfo};

use crate::connection::{unexpected, Client};
use crate::error::ClientError;

/// Creates, lists, describes and deletes topics.
///
/// ```no_run
/// # async fn demo() -> Result<(), quiver_client::ClientError> {
/// use quiver_client::{Client, ClientConfig, TopicConfig};
/// let client = Client::connect(ClientConfig::new("127.0.0.1:7420", "ca.pem")).await?;
/// let admin = client.admin();
/// admin.create_topic("orders", 3, TopicConfig::default()).await?;
/// for t in admin.list_topics().await? {
///     println!("{} ({} partitions)", t.name, t.partitions.len());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    pub fn new(client: Client) -> Self {
        Admin { client }
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<(), ClientError> {
        match self.client.request(&Message::CreateTopic { name: name.into(), partitions, config }).await? {
            Message::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        match self.client.request(&Message::DeleteTopic { name: name.into() }).await? {
            Message::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        match self.client.request(&Message::Metadata { topic: None }).await? {
            Message::MetadataOk(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo, ClientError> {
        match self.client.request(&Message::Metadata { topic: Some(name.into()) }).await? {
            Message::MetadataOk(mut t) if t.len() == 1 => Ok(t.remove(0)),
            other => Err(unexpected(other)),
        }
    }

    /// Committed offsets of `group` for every partition of `topic`, with each partition's range.
    pub async fn group_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<PartitionOffsets>, ClientError> {
        match self.client.request(&Message::FetchOffsets { group: group.into(), topic: topic.into() }).await?
        {
            Message::Offsets(o) => Ok(o),
            other => Err(unexpected(other)),
        }
    }

    /// Durably commits `offset` (the next offset to consume) for a group and partition.
    pub async fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), ClientError> {
        let msg = Message::CommitOffset { group: group.into(), topic: topic.into(), partition, offset };
        match self.client.request(&msg).await? {
            Message::CommitOk => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}
