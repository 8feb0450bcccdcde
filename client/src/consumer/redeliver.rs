//! The consumer's redelivery task (design.md §12): hands out again what is due and
//! dead-letters what passed `max_deliveries`.

use std::sync::Arc;
use std::time::Duration;

use crate::admin::Admin;
use crate::connection::Client;

use super::{AckState, ConsumedMessage, ConsumerConfig, Shared};

/// Hands out due messages again, and dead-letters those past `max_deliveries`.
pub(super) struct Redeliverer {
    pub(super) client: Client,
    pub(super) config: ConsumerConfig,
    pub(super) shared: Arc<Shared>,
}

/// Due messages of one partition.
type DuePartition = (u32, Arc<AckState>, Vec<(u64, crate::redelivery::Pending)>);

impl Redeliverer {
    pub(super) async fn run(self, deadline: Duration) {
        let mut tick =
            tokio::time::interval(Duration::from_millis(50).min(deadline).max(Duration::from_millis(1)));
        let mut dead_letters: Option<crate::producer::Producer> = None;
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            let due: Vec<DuePartition> = self
                .shared
                .partitions
                .lock()
                .iter()
                .filter_map(|(p, r)| {
                    let pending = r.acks.pending.as_ref()?;
                    let due = pending.lock().take_due(now, deadline);
                    (!due.is_empty()).then(|| (*p, r.acks.clone(), due))
                })
                .collect();
            for (partition, acks, messages) in due {
                let mut again = Vec::new();
                for (offset, p) in messages {
                    if self.config.max_deliveries.is_some_and(|max| p.delivery_count > max) {
                        if self.dead_letter(&mut dead_letters, partition, offset, &p).await {
                            acks.ack(offset);
                        }
                        continue;
                    }
                    again.push(ConsumedMessage {
                        topic: self.shared.topic.clone(),
                        partition,
                        offset,
                        timestamp_ms: p.timestamp_ms,
                        key: p.key,
                        value: p.value,
                        headers: p.headers,
                        delivery_count: p.delivery_count,
                        acks: acks.clone(),
                    });
                }
                if !again.is_empty() && self.shared.tx.send(Ok(again)).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Writes a copy to the dead-letter topic; true once it is acknowledged there.
    async fn dead_letter(
        &self,
        producer: &mut Option<crate::producer::Producer>,
        partition: u32,
        offset: u64,
        p: &crate::redelivery::Pending,
    ) -> bool {
        let topic =
            self.config.dead_letter_topic.clone().unwrap_or_else(|| format!("{}.dlq", self.shared.topic));
        if producer.is_none() {
            let admin = Admin::new(self.client.clone());
            if admin.describe_topic(&topic).await.is_err() {
                let _ = admin.create_topic(&topic, 1, quiver_protocol::TopicConfig::default()).await;
            }
            *producer = Some(crate::producer::Producer::new(self.client.clone(), Default::default()));
        }
        let Some(producer) = producer.as_ref() else { return false };
        let mut record = crate::producer::ProducerRecord::new(p.value.clone());
        record.key = p.key.clone();
        record.headers = crate::redelivery::dead_letter_headers(&self.shared.topic, partition, offset, p);
        match producer.send(&topic, record).await {
            Ok(_) => {
                tracing::info!(topic = %self.shared.topic, partition, offset, dead_letter_topic = %topic, deliveries = p.delivery_count - 1, "message dead-lettered");
                true
            }
            Err(e) => {
                tracing::warn!(topic = %self.shared.topic, partition, offset, "dead-lettering failed: {e}");
                false
            }
        }
    }
}
