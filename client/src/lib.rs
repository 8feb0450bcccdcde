//! The Quiver client SDK: [`Client`] (a connection), [`Producer`], [`Consumer`] and [`Admin`].
//!
//! Everything talks to the broker over QUIC with TLS 1.3; see `docs/design.md` for the
//! protocol.

mod admin;
mod connection;
mod consumer;
mod error;
mod producer;
pub mod redelivery;
mod retry;
mod routing;

pub use admin::{Admin, ClusterStatus, GroupAssignment, GroupDescription};
pub use connection::{Client, ClientConfig, ConnectionStats};
pub use consumer::{CommitReport, ConsumedMessage, Consumer, ConsumerConfig, ConsumerEvent};
pub use error::ClientError;
pub use producer::{DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata};
pub use quiver_protocol::message::{
    Acks, AclOperation, AclResource, AclRule, BrokerStatus, Durability, MemberInfo, MemberRef, PartitionInfo,
    PartitionOffsets, ReplicaStatus, StartPosition, TopicConfig, TopicInfo,
};
pub use quiver_protocol::ErrorCode;
pub use quiver_transport::{default_ca_path, DEFAULT_PORT};

impl Client {
    /// Topic and group administration over this client's connection.
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }
}

/// The public API shows no transport internals and leaves room to grow. Each of these must
/// fail to compile in an application:
///
/// ```compile_fail
/// use quiver_client::transport::FrameReader; // the QUIC layer is quiver-transport's, unexported
/// ```
///
/// ```compile_fail
/// let _ = quiver_client::bench::run; // the bench lives in the quiver CLI
/// ```
///
/// ```compile_fail
/// // Configs and errors are non-exhaustive: built by `new` and `with_*`, matched with `_`.
/// let _ = quiver_client::ClientConfig {
///     broker: String::new(),
///     ca_file: "ca.pem".into(),
///     server_name: None,
///     connect_timeout: Default::default(),
///     request_timeout: Default::default(),
///     idle_timeout: Default::default(),
///     client_id: String::new(),
/// };
/// ```
///
/// ```compile_fail
/// fn kind(e: quiver_client::ClientError) -> u8 {
///     match e {
///         quiver_client::ClientError::BadAddress { .. }
///         | quiver_client::ClientError::BadCa { .. }
///         | quiver_client::ClientError::Unreachable { .. }
///         | quiver_client::ClientError::Connect { .. }
///         | quiver_client::ClientError::Refused { .. }
///         | quiver_client::ClientError::AllBrokersFailed { .. }
///         | quiver_client::ClientError::ConnectionLost(_)
///         | quiver_client::ClientError::Broker { .. }
///         | quiver_client::ClientError::Protocol(_)
///         | quiver_client::ClientError::Timeout(_)
///         | quiver_client::ClientError::OutcomeUnknown(_)
///         | quiver_client::ClientError::DeliveryTimeout { .. }
///         | quiver_client::ClientError::Closed => 0,
///     }
/// }
/// ```
///
/// And without the `unstable-raw` feature (Quiver's own tests turn it on), no raw requests
/// and no quinn connection:
#[cfg_attr(not(feature = "unstable-raw"), doc = "```compile_fail")]
#[cfg_attr(feature = "unstable-raw", doc = "```ignore")]
/// async fn raw(c: quiver_client::Client) {
///     let _ = c.connection().await;
/// }
/// ```
#[cfg_attr(not(feature = "unstable-raw"), doc = "```compile_fail")]
#[cfg_attr(feature = "unstable-raw", doc = "```ignore")]
/// async fn raw(c: quiver_client::Client) {
///     let _ = c.request(&quiver_protocol::message::Message::InitProducer).await;
/// }
/// ```
///
/// What an application does use compiles:
///
/// ```
/// use std::time::Duration;
/// let config = quiver_client::ClientConfig::new("127.0.0.1:7420", "ca.pem")
///     .with_request_timeout(Duration::from_secs(5))
///     .with_client_id("orders-service");
/// assert_eq!(config.request_timeout, Duration::from_secs(5));
/// async fn stats(c: quiver_client::Client) -> Option<u16> {
///     c.connection_stats().await.map(|s| s.mtu)
/// }
/// ```
mod lean_api {}
