//! Redelivery and dead letters, run by the consumer (design.md §12).
//!
//! With an ack deadline configured, every message handed to the application is remembered
//! until it is acknowledged. A message that is nacked (after an optional delay) or not
//! acknowledged before its deadline is handed out again with its delivery count + 1; once the
//! count would pass `max_deliveries` it is written to the dead-letter topic with headers naming
//! its origin, and then acknowledged. The broker only learns the ack floor, so after a consumer
//! restart or a rebalance, delivery counts start again at 1.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// Header names on dead-lettered records.
pub const ORIGIN_TOPIC: &str = "quiver.origin.topic";
pub const ORIGIN_PARTITION: &str = "quiver.origin.partition";
pub const ORIGIN_OFFSET: &str = "quiver.origin.offset";
pub const DELIVERY_COUNT: &str = "quiver.delivery.count";

/// A delivered, unacknowledged message.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
    pub delivery_count: u32,
    pub due: Instant,
}

/// Unacknowledged messages of one partition, by offset.
#[derive(Debug, Default)]
pub(crate) struct PendingSet {
    messages: BTreeMap<u64, Pending>,
}

impl PendingSet {
    pub fn delivered(&mut self, offset: u64, p: Pending) {
        self.messages.insert(offset, p);
    }

    pub fn acked(&mut self, offset: u64) {
        self.messages.remove(&offset);
    }

    /// Makes a message due after `delay`.
    pub fn nacked(&mut self, offset: u64, delay: Duration) {
        if let Some(p) = self.messages.get_mut(&offset) {
            p.due = Instant::now() + delay;
        }
    }

    /// Messages due now, with their next delivery count; their next deadline is set.
    pub fn take_due(&mut self, now: Instant, deadline: Duration) -> Vec<(u64, Pending)> {
        let mut out = Vec::new();
        for (offset, p) in self.messages.iter_mut() {
            if p.due <= now {
                p.delivery_count += 1;
                p.due = now + deadline;
                out.push((*offset, p.clone()));
            }
        }
        out
    }
}

/// Headers for a dead-lettered copy: the original's, plus where it came from.
pub(crate) fn dead_letter_headers(
    topic: &str,
    partition: u32,
    offset: u64,
    p: &Pending,
) -> Vec<(String, Bytes)> {
    let mut h = p.headers.clone();
    h.push((ORIGIN_TOPIC.into(), Bytes::from(topic.to_string())));
    h.push((ORIGIN_PARTITION.into(), Bytes::from(partition.to_string())));
    h.push((ORIGIN_OFFSET.into(), Bytes::from(offset.to_string())));
    h.push((DELIVERY_COUNT.into(), Bytes::from((p.delivery_count - 1).to_string())));
    h
}

/// Shared handle type.
pub(crate) type SharedPending = Arc<parking_lot::Mutex<PendingSet>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_messages_come_back_with_higher_counts() {
        let mut s = PendingSet::default();
        let now = Instant::now();
        let p = |due| Pending {
            timestamp_ms: 0,
            key: None,
            value: Bytes::from_static(b"v"),
            headers: vec![],
            delivery_count: 1,
            due,
        };
        s.delivered(1, p(now + Duration::from_secs(5)));
        s.delivered(2, p(now + Duration::from_secs(5)));
        s.delivered(3, p(now + Duration::from_secs(5)));
        s.acked(2);
        s.nacked(3, Duration::ZERO);
        let due = s.take_due(now + Duration::from_millis(1), Duration::from_secs(5));
        assert_eq!(due.iter().map(|(o, p)| (*o, p.delivery_count)).collect::<Vec<_>>(), vec![(3, 2)]);
        // At 4 s nothing is due; at 6 s the deadline of 1 passed and 3 is due again.
        assert!(s.take_due(now + Duration::from_secs(4), Duration::from_secs(5)).is_empty());
        let due = s.take_due(now + Duration::from_secs(6), Duration::from_secs(5));
        assert_eq!(due.iter().map(|(o, p)| (*o, p.delivery_count)).collect::<Vec<_>>(), vec![(1, 2), (3, 3)]);
    }
}
