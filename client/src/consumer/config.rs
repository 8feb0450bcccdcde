//! Consumer settings.

use std::time::Duration;

use quiver_protocol::message::StartPosition;

/// Consumer settings: `ConsumerConfig::new(topic)` and `with_*` setters (`group` and `start`
/// too); the fields can be read and set, and more may come (so no struct literals outside this
/// crate).
///
/// ```
/// use quiver_client::{ConsumerConfig, StartPosition};
/// let config = ConsumerConfig::new("orders").group("billing").start(StartPosition::Earliest).with_max_deliveries(5);
/// assert_eq!(config.max_deliveries, Some(5));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    pub topic: String,
    /// With a group, consumption resumes from the group's committed offsets.
    pub group: Option<String>,
    /// Where to start when there is no committed offset.
    pub start: StartPosition,
    /// Partitions to read; all when `None`.
    pub partitions: Option<Vec<u32>>,
    /// Unacknowledged bytes the broker may push per partition.
    pub window_bytes: u32,
    /// Unacknowledged messages the broker may push per partition.
    pub window_messages: u32,
    /// How often acknowledgements are sent to the broker.
    pub ack_interval: Duration,
    /// With a group and no fixed `partitions`: join the group and consume the partitions the
    /// broker assigns, following rebalances. Without it, the consumer reads the partitions it
    /// is given and commits as the group's only consumer.
    pub membership: bool,
    /// A member that sends no heartbeat for this long is removed and its partitions move.
    pub session_timeout: Duration,
    /// The broker hands a message out again when it is not acknowledged within this.
    /// `None` (the default): only nacks and a new session (a rebalance, a reconnect) redeliver.
    pub ack_deadline: Option<Duration>,
    /// After this many deliveries the broker moves a message to `dead_letter_topic` instead of
    /// handing it out again. `None`: unlimited.
    pub max_deliveries: Option<u32>,
    /// Where messages past `max_deliveries` go: default `<topic>.dlq`, which the broker creates
    /// with 1 partition if missing; another topic must exist before subscribing.
    pub dead_letter_topic: Option<String>,
}

impl ConsumerConfig {
    pub fn new(topic: impl Into<String>) -> Self {
        ConsumerConfig {
            topic: topic.into(),
            group: None,
            start: StartPosition::Latest,
            partitions: None,
            window_bytes: 8 * 1024 * 1024,
            window_messages: 100_000,
            ack_interval: Duration::from_millis(100),
            membership: true,
            session_timeout: Duration::from_secs(10),
            ack_deadline: None,
            max_deliveries: None,
            dead_letter_topic: None,
        }
    }
    pub fn group(mut self, g: impl Into<String>) -> Self {
        self.group = Some(g.into());
        self
    }
    pub fn start(mut self, s: StartPosition) -> Self {
        self.start = s;
        self
    }
    pub fn with_group(self, g: impl Into<String>) -> Self {
        self.group(g)
    }
    pub fn with_start(self, s: StartPosition) -> Self {
        self.start(s)
    }
    /// Reads these partitions only (all when never set).
    pub fn with_partitions(mut self, partitions: impl Into<Vec<u32>>) -> Self {
        self.partitions = Some(partitions.into());
        self
    }
    pub fn with_window_bytes(mut self, bytes: u32) -> Self {
        self.window_bytes = bytes;
        self
    }
    pub fn with_window_messages(mut self, messages: u32) -> Self {
        self.window_messages = messages;
        self
    }
    pub fn with_ack_interval(mut self, interval: Duration) -> Self {
        self.ack_interval = interval;
        self
    }
    pub fn with_membership(mut self, membership: bool) -> Self {
        self.membership = membership;
        self
    }
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }
    /// `None`: no deadline.
    pub fn with_ack_deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.ack_deadline = deadline.into();
        self
    }
    /// `None`: unlimited.
    pub fn with_max_deliveries(mut self, max: impl Into<Option<u32>>) -> Self {
        self.max_deliveries = max.into();
        self
    }
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }
}
