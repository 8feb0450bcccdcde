//! Turning a delivery's record batches into messages for the application.

use std::collections::BTreeSet;

use bytes::Bytes;
use quiver_protocol::batch::{BatchSplitter, RecordIter};
use quiver_protocol::message::DeliveryRange;

use super::session::PartitionConsumer;
use super::ConsumedMessage;
use crate::error::ClientError;

/// The record count of a delivery, from its batch headers (an estimate for sizing only).
fn records_in(batches: &[u8]) -> usize {
    let n: usize = quiver_protocol::Batches::new(batches)
        .map_while(Result::ok)
        .map(|b| b.header.records_count as usize)
        .sum();
    // A record takes at least 7 bytes: a broker cannot make us reserve more than that allows.
    n.min(batches.len() / 7 + 1)
}

impl PartitionConsumer {
    /// Hands a delivery's records to the application: all of them, or with `ranges` only
    /// those in a range, with its delivery count. Returns the number of records received, or
    /// `None` once the application is gone.
    pub(super) async fn deliver(
        &self,
        batches: Bytes,
        ranges: Option<&[DeliveryRange]>,
    ) -> Result<Option<u64>, ClientError> {
        let mut count = 0;
        // Sized once from the batch headers, so the vector never grows by copying.
        let mut out = Vec::with_capacity(match ranges {
            // A redelivery may carry a whole batch for one record.
            Some(ranges) => {
                ranges.iter().map(|r| r.end.saturating_sub(r.start)).sum::<u64>().min(1 << 16) as usize
            }
            None => records_in(&batches),
        });
        // Only this task moves `next_expected`, so it is read once and written back once.
        let (mut expected, nacked, handed_before) = {
            let a = self.acks.inner.lock();
            let nacked = if a.nacked.is_empty() { BTreeSet::new() } else { a.nacked.clone() };
            (a.next_expected, nacked, a.handed_before)
        };
        let mut range = 0;
        let mut reacked = false;
        // Control batches (a Raft leader's first entry, docs/replication.md §2) are the brokers'
        // own: never handed out, acknowledged at once so the group's floor passes them. Only
        // those the delivery hands out count (see `control_handed_out`).
        let mut control = Vec::new();
        for item in BatchSplitter::new(batches) {
            let (header, batch) =
                item.map_err(|e| ClientError::Protocol(format!("corrupt delivery: {e}")))?;
            if header.is_control() {
                count += u64::from(header.records_count);
                control.extend(control_handed_out(header.base_offset..header.next_offset(), ranges));
                continue;
            }
            for record in RecordIter::new(batch, header) {
                let r = record.map_err(|e| ClientError::Protocol(format!("corrupt record: {e}")))?;
                count += 1;
                let delivery_count = match ranges {
                    None => 1,
                    Some(ranges) => {
                        while range < ranges.len() && ranges[range].end <= r.offset {
                            range += 1;
                        }
                        match ranges.get(range) {
                            Some(d) if d.start <= r.offset => d.delivery_count,
                            _ => continue, // acknowledged already, or before our position
                        }
                    }
                };
                if r.offset < expected && !nacked.contains(&r.offset) {
                    if delivery_count <= 1 {
                        continue; // the batch began before our position, or handed out before a reconnect
                    }
                    // Handed out again (its ack deadline passed, or a new session began) after
                    // the application acknowledged it, before the broker heard: say it again
                    // instead of handing the message out twice. Only redeliveries get here.
                    let mut a = self.acks.inner.lock();
                    if a.ledger.is_acked(r.offset) {
                        a.version += 1;
                        reacked = true;
                        continue;
                    }
                }
                // Below `expected` (a nacked offset, or a redelivery), or handed to the
                // application before this session started over: handed out before, so a
                // redelivery, whatever count the broker gives (a broker that took the partition
                // over without the nack or the delivery counts its first delivery as 1).
                let handed = r.offset < expected || r.offset < handed_before;
                expected = expected.max(r.offset + 1);
                let delivery_count = if handed { delivery_count.max(2) } else { delivery_count };
                out.push(ConsumedMessage {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset: r.offset,
                    timestamp_ms: r.timestamp,
                    key: r.key,
                    value: r.value,
                    headers: r.headers,
                    delivery_count,
                    acks: self.acks.clone(),
                });
            }
        }
        if let Some(end) = control.iter().map(|r| r.end).max() {
            expected = expected.max(end);
        }
        {
            let mut a = self.acks.inner.lock();
            a.handed_out(expected);
            if !control.is_empty() {
                for r in control {
                    let floor = a.ledger.floor();
                    if r.end > floor {
                        a.ledger.ack(r.start.max(floor)..r.end);
                    }
                }
                a.version += 1;
                reacked = true;
            }
        }
        if reacked {
            self.acks.changed.notify_one();
        }
        if !out.is_empty() && self.tx.send(Ok(out)).await.is_err() {
            return Ok(None);
        }
        Ok(Some(count))
    }
}

/// The offsets of a control batch (`control`) that a delivery hands out: all of them in a plain
/// `Deliver`, and with `ranges` (`DeliverSome`) only those inside a range. A `DeliverSome`
/// carries whole batches as read, which may reach past its ranges: a redelivery reads from the
/// offset handed out again up to the broker's delivery size, so its batches can hold records
/// and control batches the broker has not handed out yet. Counting such a control batch as
/// handed out would raise the position past the records before it, and their first delivery
/// would then be dropped as one handed out before (they were never handed to the application,
/// never acknowledged, and the group's floor stalled there).
fn control_handed_out(
    control: std::ops::Range<u64>,
    ranges: Option<&[DeliveryRange]>,
) -> Vec<std::ops::Range<u64>> {
    let Some(ranges) = ranges else { return vec![control] };
    ranges
        .iter()
        .map(|r| r.start.max(control.start)..r.end.min(control.end))
        .filter(|r| r.start < r.end)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, end: u64, delivery_count: u32) -> DeliveryRange {
        DeliveryRange { start, end, delivery_count }
    }

    #[test]
    fn a_plain_delivery_hands_out_its_control_batches() {
        assert_eq!(control_handed_out(2172..2173, None), vec![2172..2173]);
    }

    #[test]
    fn a_redelivery_does_not_hand_out_control_batches_past_its_ranges() {
        // The fault run's case: 2162 is handed out again (count 2) after a leader change; the
        // read behind it carries 2162..2171 and the new leader's control batch at 2172, none of
        // them handed out yet but 2162.
        let redo = [range(2162, 2163, 2)];
        assert_eq!(control_handed_out(2172..2173, Some(&redo)), Vec::<std::ops::Range<u64>>::new());
        // A first delivery that skips acknowledged offsets names the control batch in its
        // ranges, possibly in part.
        let first = [range(2160, 2161, 1), range(2171, 2174, 1)];
        assert_eq!(control_handed_out(2172..2173, Some(&first)), vec![2172..2173]);
        assert_eq!(control_handed_out(2170..2173, Some(&first)), vec![2171..2173]);
        // Below the ranges (a batch that began before the position): not handed out here.
        assert_eq!(control_handed_out(2150..2151, Some(&first)), Vec::<std::ops::Range<u64>>::new());
    }
}
