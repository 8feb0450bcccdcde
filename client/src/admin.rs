//! Topic administration. Requests that are safe to repeat (reads, and creates and deletes
//! whose effect is checked) ride out a broker change with bounded retries (`retry.rs`).

use std::time::Duration;

use quiver_protocol::message::{
    AclRule, BrokerStatus, MemberInfo, MemberRef, Message, PartitionOffsets, ReplicaStatus, TopicConfig,
    TopicInfo,
};
use quiver_protocol::ErrorCode;

use crate::connection::{unexpected, Client};
use crate::error::ClientError;

/// Creates, lists, describes and deletes topics; consumer-group offsets; the cluster's state.
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

    /// Creates a topic. Retried across a lost connection or a broker change; if a retry then
    /// finds the topic, it counts as created when it has the partitions and settings asked for
    /// (the earlier attempt's doing, or an identical one's).
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
        let msg = Message::CreateTopic { name: name.into(), partitions, config: config.clone() };
        let retried = self.client.request_retrying(&msg).await;
        match retried.result {
            Ok(Message::Done) => Ok(()),
            Ok(other) => Err(unexpected(other)),
            Err(e) if e.code() == Some(ErrorCode::TopicExists) && retried.maybe_done_before => {
                match self.describe_topic(name).await {
                    Ok(t) if t.partitions.len() == partitions as usize && t.config == config => Ok(()),
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes a topic. Retried across a lost connection or a broker change; a retry that no
    /// longer finds the topic after an attempt of unknown outcome counts as deleted.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let retried = self.client.request_retrying(&Message::DeleteTopic { name: name.into() }).await;
        match retried.result {
            Ok(Message::Done) => Ok(()),
            Ok(other) => Err(unexpected(other)),
            Err(e) if e.code() == Some(ErrorCode::UnknownTopic) && retried.maybe_done_before => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Adds broker `id`, reachable at `addr` (`HOST:PORT`), to the cluster (docs/replication.md
    /// §11): answered once the controller committed it. Start the broker with `quiverd --join`;
    /// partitions then move to it on their own, a few at a time.
    pub async fn add_broker(&self, id: u32, addr: &str) -> Result<(), ClientError> {
        self.change_brokers(Message::ChangeBrokers { add: Some((id, addr.into())), remove: None }).await
    }

    /// Removes broker `id` from the cluster: its replicas move to the others (watch `cluster
    /// status`), after which it can be stopped.
    pub async fn remove_broker(&self, id: u32) -> Result<(), ClientError> {
        self.change_brokers(Message::ChangeBrokers { add: None, remove: Some(id) }).await
    }

    /// A retry after an attempt of unknown outcome that finds the change made counts as done.
    async fn change_brokers(&self, msg: Message) -> Result<(), ClientError> {
        let retried = self.client.request_retrying(&msg).await;
        match retried.result {
            Ok(Message::Done) => Ok(()),
            Ok(other) => Err(unexpected(other)),
            Err(e) if e.code() == Some(ErrorCode::Malformed) && retried.maybe_done_before => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Adds ACL rules (docs/security.md); in force for every connection once this returns.
    /// Adding a rule that exists changes nothing. Needs `admin` on the cluster.
    pub async fn add_acls(&self, rules: Vec<AclRule>) -> Result<(), ClientError> {
        self.change_acls(true, rules).await
    }

    /// Removes ACL rules; removing one that does not exist changes nothing.
    pub async fn remove_acls(&self, rules: Vec<AclRule>) -> Result<(), ClientError> {
        self.change_acls(false, rules).await
    }

    async fn change_acls(&self, add: bool, rules: Vec<AclRule>) -> Result<(), ClientError> {
        // Idempotent: a retry after an attempt of unknown outcome leaves the same rules.
        match self.client.request_retrying(&Message::ChangeAcls { add, rules }).await.result? {
            Message::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Every ACL rule, sorted by principal, resource, pattern and operation.
    pub async fn list_acls(&self) -> Result<Vec<AclRule>, ClientError> {
        match self.client.request_retrying(&Message::ListAcls).await.result? {
            Message::AclList(rules) => Ok(rules),
            other => Err(unexpected(other)),
        }
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        match self.read(&Message::Metadata { topic: None }).await? {
            Message::MetadataOk(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// A topic's settings and, per partition, its offsets, leader, epoch and replicas.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo, ClientError> {
        match self.read(&Message::Metadata { topic: Some(name.into()) }).await? {
            Message::MetadataOk(mut t) if t.len() == 1 => Ok(t.remove(0)),
            other => Err(unexpected(other)),
        }
    }

    /// The cluster as the answering broker sees it: its brokers (and whether it has a live link
    /// to each) and every replicated partition's leader, epoch, replicas, in-sync replicas and
    /// commit index. A single broker lists itself and no partitions.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        match self.read(&Message::ClusterStatus).await? {
            Message::ClusterStatusOk { brokers, partitions } => Ok(ClusterStatus { brokers, partitions }),
            other => Err(unexpected(other)),
        }
    }

    /// A request that changes nothing, so it is simply sent again after a retriable failure.
    async fn read(&self, msg: &Message) -> Result<Message, ClientError> {
        self.client.request_retrying(msg).await.result
    }

    /// Committed offsets of `group` for every partition of `topic`, with each partition's range.
    pub async fn group_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<PartitionOffsets>, ClientError> {
        match self.read(&Message::FetchOffsets { group: group.into(), topic: topic.into() }).await? {
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
        match self.until_coordinated(&msg).await? {
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
        match self.read(&Message::OffsetForTime { topic: topic.into(), partition, timestamp_ms }).await? {
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
        assignment(self.until_coordinated(&msg).await?)
    }

    /// Sends a group request again while the cluster answers `NotCoordinator` (the group's
    /// coordinator is being elected: the request was not carried out), within the request
    /// timeout. Other failures are returned as they are: a join or commit is not repeated
    /// after an answer was lost.
    async fn until_coordinated(&self, msg: &Message) -> Result<Message, ClientError> {
        let deadline = tokio::time::Instant::now() + self.client.config().request_timeout;
        let mut pause = crate::retry::MIN_BACKOFF;
        loop {
            match self.client.request(msg).await {
                Err(ClientError::Broker { code: ErrorCode::NotCoordinator, .. })
                    if tokio::time::Instant::now() + pause < deadline =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(crate::retry::MAX_BACKOFF);
                }
                other => return other,
            }
        }
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
        match self.read(&Message::ListGroups).await? {
            Message::Groups(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// A group's topic, generation, members and their partitions.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription, ClientError> {
        match self.read(&Message::DescribeGroup { group: group.into() }).await? {
            Message::GroupDescription { topic, generation, members } => {
                Ok(GroupDescription { topic, generation, members })
            }
            other => Err(unexpected(other)),
        }
    }
}

/// What [`Admin::cluster_status`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStatus {
    /// Every broker of the cluster, the answering one included.
    pub brokers: Vec<BrokerStatus>,
    /// Every replicated partition the answering broker knows of.
    pub partitions: Vec<ReplicaStatus>,
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
