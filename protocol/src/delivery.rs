//! The delivery window of one subscription, as a pure state machine (docs/design.md §8).
//!
//! The broker records each `Deliver` it sends and each cumulative `Ack` it receives; the
//! window says whether another `Deliver` may go out. At least one delivery is always allowed
//! when nothing is in flight, so a batch larger than the window still flows.

use std::collections::VecDeque;

/// An ack that cannot be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("ack of offset {acked} is beyond the last delivered offset {delivered}")]
    BeyondDelivered { acked: u64, delivered: u64 },
}

#[derive(Debug, Clone)]
pub struct DeliveryWindow {
    max_bytes: u64,
    max_messages: u64,
    /// (offset after the delivery, bytes, messages), oldest first.
    in_flight: VecDeque<(u64, u64, u64)>,
    bytes: u64,
    messages: u64,
    acked: u64,
    delivered: u64,
}

impl DeliveryWindow {
    pub fn new(start: u64, max_bytes: u64, max_messages: u64) -> Self {
        DeliveryWindow {
            max_bytes: max_bytes.max(1),
            max_messages: max_messages.max(1),
            in_flight: VecDeque::new(),
            bytes: 0,
            messages: 0,
            acked: start,
            delivered: start,
        }
    }

    /// Whether another delivery may be sent.
    pub fn has_room(&self) -> bool {
        self.in_flight.is_empty() || (self.bytes < self.max_bytes && self.messages < self.max_messages)
    }

    /// Bytes left in the window (at least 1, so one batch can always be read).
    pub fn room_bytes(&self) -> u64 {
        self.max_bytes.saturating_sub(self.bytes).max(1)
    }

    /// A delivery ending before `next_offset` was sent.
    ///
    /// # Panics
    /// If `next_offset` does not move past what was delivered before: deliveries only move
    /// forward, and a caller that breaks that would corrupt the window's accounting.
    pub fn on_delivered(&mut self, next_offset: u64, bytes: u64, messages: u64) {
        assert!(
            next_offset > self.delivered,
            "deliveries move forward: {next_offset} after {}",
            self.delivered
        );
        self.delivered = next_offset;
        self.in_flight.push_back((next_offset, bytes, messages));
        self.bytes += bytes;
        self.messages += messages;
    }

    /// A cumulative ack: everything below `next_offset` is processed. Returns whether the
    /// acked position moved. Stale acks (below the current position) are ignored.
    pub fn on_ack(&mut self, next_offset: u64) -> Result<bool, AckError> {
        if next_offset > self.delivered {
            return Err(AckError::BeyondDelivered { acked: next_offset, delivered: self.delivered });
        }
        if next_offset <= self.acked {
            return Ok(false);
        }
        self.acked = next_offset;
        while let Some(&(end, b, m)) = self.in_flight.front() {
            if end > next_offset {
                break;
            }
            self.in_flight.pop_front();
            self.bytes -= b;
            self.messages -= m;
        }
        Ok(true)
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    pub fn in_flight_bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    #[should_panic(expected = "deliveries move forward")]
    fn a_delivery_that_does_not_move_forward_is_a_bug() {
        let mut w = DeliveryWindow::new(10, 1000, 100);
        w.on_delivered(20, 60, 10);
        w.on_delivered(20, 60, 10);
    }

    #[test]
    fn window_closes_and_reopens() {
        let mut w = DeliveryWindow::new(10, 100, 1000);
        assert!(w.has_room());
        w.on_delivered(20, 60, 10);
        assert!(w.has_room());
        w.on_delivered(30, 60, 10);
        assert!(!w.has_room());
        assert_eq!(w.on_ack(15), Ok(true)); // mid-delivery: nothing released yet
        assert!(!w.has_room());
        assert_eq!(w.on_ack(20), Ok(true));
        assert!(w.has_room());
        assert_eq!(w.on_ack(5), Ok(false));
        assert!(w.on_ack(31).is_err());
    }

    #[test]
    fn one_oversized_delivery_is_allowed() {
        let mut w = DeliveryWindow::new(0, 10, 10);
        assert!(w.has_room());
        w.on_delivered(1, 1000, 1);
        assert!(!w.has_room());
    }

    proptest! {
        #[test]
        fn accounting_matches_a_model(steps in proptest::collection::vec((any::<bool>(), 1u64..50, 1u64..500), 1..100)) {
            let mut w = DeliveryWindow::new(0, 1000, 100);
            let mut sent: Vec<(u64, u64, u64)> = vec![];
            let mut acked = 0;
            for (deliver, n, bytes) in steps {
                if deliver && w.has_room() {
                    let end = w.delivered() + n;
                    w.on_delivered(end, bytes, n);
                    sent.push((end, bytes, n));
                } else if w.delivered() > acked {
                    let to = acked + (n % (w.delivered() - acked)) + 1;
                    prop_assert_eq!(w.on_ack(to), Ok(true));
                    acked = to;
                }
                let unacked: u64 = sent.iter().filter(|(end, _, _)| *end > acked).map(|(_, b, _)| b).sum();
                prop_assert_eq!(w.in_flight_bytes(), unacked);
            }
        }
    }
}
