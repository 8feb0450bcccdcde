//! What every connection and background task of a broker shares ([`BrokerState`]), and the
//! helpers the request, subscription and maintenance code use on it. The server builds the
//! state and sits on top; nothing here depends on it.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use dashmap::DashMap;
use quiver_protocol::message::Message;
use quiver_protocol::{ErrorCode, FrameError};
use quiver_transport::{write_message, FrameReader, ReadError};
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::offsets::{OffsetKey, OffsetStore};
use crate::partition::PartitionError;
use crate::topics::Topics;

/// State shared by every connection.
#[derive(Debug)]
pub struct BrokerState {
    pub config: BrokerConfig,
    pub topics: Arc<Topics>,
    /// The broker's own offsets store: every group's on one node; in a cluster only the
    /// ledgers of subscriptions handed here by a coordinator holding no replica of their
    /// partition (docs/replication.md §10).
    pub offsets: Arc<OffsetStore>,
    /// Cluster mode: the offsets partitions this broker coordinates the groups of.
    pub coordinators: crate::offsets::Coordinators,
    pub producer_ids: crate::producers::ProducerIds,
    /// The live subscription generation for each (group, topic, partition). A newer
    /// subscription takes the partition over; the older one's acks are then ignored.
    pub group_owners: DashMap<OffsetKey, u64>,
    /// Consumer-group membership.
    pub groups: crate::groups::Groups,
    pub next_generation: AtomicU64,
    pub connections: AtomicUsize,
    /// TLS handshakes in progress (at most `max_handshakes`).
    pub handshakes: AtomicUsize,
    /// Bytes of request frames all connections may hold at once.
    pub total_buffer: Arc<tokio::sync::Semaphore>,
    /// `max_total_send_bytes` shared among the clients' connections.
    pub send_windows: Arc<crate::budget::SendWindows>,
    pub shutdown: CancellationToken,
    /// Appends dead letters for the subscriptions, outside their delivery loops.
    pub dead_letters: crate::dead_letters::DeadLetterWriter,
    /// Cluster mode: the controller, the peer links and the partitions' Raft groups.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Who connections are and what they may do (docs/security.md).
    pub auth: Arc<crate::auth::Auth>,
    /// Which CA client and peer certificates must chain to (docs/security.md).
    pub cert_checks: crate::tls::CertChecks,
    /// The address the endpoint is bound to.
    pub local_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

impl BrokerState {
    /// The topic `name`. In a cluster, a broker may apply a topic's create a heartbeat after the
    /// broker that answered it (the client then asks this one at once): an unknown name waits
    /// up to `cluster::TOPIC_WAIT` for the controller log to bring it before it is refused.
    pub(crate) async fn topic(&self, name: &str) -> Result<Arc<crate::topics::Topic>, PartitionError> {
        match (self.topics.get(name), &self.cluster) {
            (Err(e), Some(cluster)) if e.code == ErrorCode::UnknownTopic => {
                cluster.wait_for_topic(&self.topics, name).await.ok_or(e)
            }
            (found, _) => found,
        }
    }

    /// In a cluster, waits (as `topic`) for a topic this broker does not know yet, so what
    /// follows sees it with its placement: call before deciding where a request is served.
    pub(crate) async fn settle(&self, name: &str) {
        if self.cluster.is_some() && self.topics.get(name).is_err() {
            let _ = self.topic(name).await;
        }
    }
}

/// Answers an unrecoverable stream error (bad length, version, timeout) and ends the stream.
pub(crate) async fn fail_stream(send: &mut quinn::SendStream, reader: &mut FrameReader, e: ReadError) {
    let code = match &e {
        ReadError::Frame(FrameError::TooLarge(_)) => ErrorCode::FrameTooLarge,
        ReadError::Frame(FrameError::UnsupportedVersion(_)) => ErrorCode::UnsupportedVersion,
        ReadError::Message(m) => m.code(),
        _ => ErrorCode::Malformed,
    };
    if matches!(e, ReadError::Read(_)) {
        return; // the peer is gone; nothing to answer
    }
    tracing::debug!("closing a stream: {e}");
    metrics::counter!("quiver_protocol_errors_total").increment(1);
    let _ = write_message(send, &Message::error(code, e.to_string())).await;
    let _ = send.finish();
    reader.stop(code.code() as u32);
}

pub use crate::budget::{Permits, ReplyBudget};
