//! The Quiver client SDK: [`Client`] (a connection), [`Producer`], [`Consumer`] and [`Admin`].
//!
//! Everything talks to the broker over QUIC with TLS 1.3; see `docs/design.md` for the
//! protocol.

pub mod admin;
pub mod connection;
pub mod consumer;
pub mod error;
pub mod producer;
pub mod redelivery;

pub use admin::Admin;
pub use connection::{Client, ClientConfig};
pub use consumer::{CommitReport, ConsumedMessage, Consumer, ConsumerConfig, ConsumerEvent};
pub use error::ClientError;
pub use producer::{DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata};
pub use quiver_protocol::message::{Acks, Durability, StartPosition, TopicConfig, TopicInfo};
pub use quiver_transport::{default_ca_path, DEFAULT_PORT};

impl Client {
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }
}
