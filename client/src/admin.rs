//! Topic administration.

use std::time::Duration;

use quiver_protocol::message::{MemberInfo, MemberRef, Message, PartitionOffsets, TopicConfig, TopicInfo};

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
        // The broker checks the same; a name too long for the wire would otherwise come back
        // as a malformed frame instead of saying what is wrong with it.
        let invalid =
            |message| ClientError::Broker { code: quiver_protocol::ErrorCode::InvalidTopic, message };
        quiver_protocol::message::validate_topic_name(name).map_err(invalid)?;
        quiver_protocol::message::validate_partition_count(partitions).map_err(invalid)?;
        config.validate().map_err(invalid)?;
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

    /// Durably commits `offset` (the next offset to consume) for a group and partition, as a
    /// tool outside the group's membership (refused while the group has members). This is an
    /// administrative reset: it sets the offset anywhere, also backwards, and drops what the
    /// broker knew of acknowledgements above it.
    pub async fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), ClientError> {
        self.commit(group, topic, partition, offset, None, true).await
    }

    /// As `commit_offset`, as a group member (fenced unless it owns the partition).
    pub async fn commit_offset_as(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
        member: Option<MemberRef>,
    ) -> Result<(), ClientError> {
        self.commit(group, topic, partition, offset, member, false).await
    }

    async fn commit(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
        member: Option<MemberRef>,
        reset: bool,
    ) -> Result<(), ClientError> {
        let msg = Message::CommitOffset {
            group: group.into(),
            topic: topic.into(),
            partition,
            offset,
            member,
            reset,
        };
        match self.client.request(&msg).await? {
            Message::CommitOk => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The first offset of `partition` at or after `timestamp_ms` (time index), or the end.
    pub async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<u64, ClientError> {
        match self
            .client
            .request(&Message::OffsetForTime { topic: topic.into(), partition, timestamp_ms })
            .await?
        {
            Message::OffsetIs { offset } => Ok(offset),
            other => Err(unexpected(other)),
        }
    }

    /// Joins (or re-joins) a group consuming `topic`.
    pub async fn join_group(
        &self,
        group: &str,
        topic: &str,
        member_id: Option<&str>,
        session_timeout: Duration,
    ) -> Result<GroupAssignment, ClientError> {
        let msg = Message::JoinGroup {
            group: group.into(),
            topic: topic.into(),
            member_id: member_id.map(Into::into),
            session_timeout_ms: session_timeout.as_millis().min(u32::MAX as u128) as u32,
        };
        assignment(self.client.request(&msg).await?)
    }

    /// Keeps a member alive; reports the generation it has applied, returns what it owns now.
    pub async fn heartbeat(
        &self,
        group: &str,
        member_id: &str,
        generation: u64,
    ) -> Result<GroupAssignment, ClientError> {
        let msg = Message::Heartbeat { group: group.into(), member_id: member_id.into(), generation };
        assignment(self.client.request(&msg).await?)
    }

    pub async fn leave_group(&self, group: &str, member_id: &str) -> Result<(), ClientError> {
        match self
            .client
            .request(&Message::LeaveGroup { group: group.into(), member_id: member_id.into() })
            .await?
        {
            Message::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Groups with members or committed offsets.
    pub async fn list_groups(&self) -> Result<Vec<String>, ClientError> {
        match self.client.request(&Message::ListGroups).await? {
            Message::Groups(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// A group's topic, generation, members and their partitions.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription, ClientError> {
        match self.client.request(&Message::DescribeGroup { group: group.into() }).await? {
            Message::GroupDescription { topic, generation, members } => {
                Ok(GroupDescription { topic, generation, members })
            }
            other => Err(unexpected(other)),
        }
    }
}

/// A member's current assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupAssignment {
    pub member_id: String,
    pub generation: u64,
    pub partitions: Vec<u32>,
}

/// What `describe_group` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupDescription {
    pub topic: String,
    pub generation: u64,
    pub members: Vec<MemberInfo>,
}

fn assignment(m: Message) -> Result<GroupAssignment, ClientError> {
    match m {
        Message::GroupAssignment { member_id, generation, partitions } => {
            Ok(GroupAssignment { member_id, generation, partitions })
        }
        other => Err(unexpected(other)),
    }
}
