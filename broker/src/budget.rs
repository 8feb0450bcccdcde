//! Memory budgets a connection's requests and answers count against (docs/security.md,
//! "Resource bounds"). Depends on nothing else in the broker, so the log and partition code can
//! count what they read.

use std::sync::Arc;

/// The memory a connection's answers may hold while they wait to be written (fetched batches,
/// subscription reads): counted against the same budgets as its request frames, the
/// connection's (`max_connection_buffer_bytes`) and every connection's together
/// (`max_total_buffer_bytes`), so a client that stops reading what it asked for cannot make
/// the broker hold more (docs/security.md, "Resource bounds").
#[derive(Debug, Clone)]
pub struct ReplyBudget {
    pub connection: Arc<tokio::sync::Semaphore>,
    pub total: Arc<tokio::sync::Semaphore>,
}

/// Budget permits held by a reply until it was handed to QUIC.
pub type Permits = Vec<tokio::sync::OwnedSemaphorePermit>;

impl ReplyBudget {
    /// Waits for `bytes` of both budgets (clamped to what each can ever give).
    pub async fn acquire(&self, bytes: usize) -> Permits {
        let mut held = Vec::with_capacity(2);
        for budget in [&self.connection, &self.total] {
            let n = clamp_permits(bytes);
            // A closed semaphore (never here) would leave the reply uncounted, not stuck.
            if let Ok(p) = budget.clone().acquire_many_owned(n).await {
                held.push(p);
            }
        }
        held
    }

    /// `bytes` of both budgets if they are free now.
    pub fn try_acquire(&self, bytes: usize) -> Option<Permits> {
        let n = clamp_permits(bytes);
        let c = self.connection.clone().try_acquire_many_owned(n).ok()?;
        let t = self.total.clone().try_acquire_many_owned(n).ok()?;
        Some(vec![c, t])
    }
}

/// A reply's size in permits: at least one, at most one frame (both budgets hold at least
/// `MAX_FRAME_BYTES`, `BrokerConfig::validate`).
fn clamp_permits(bytes: usize) -> u32 {
    bytes.clamp(1, quiver_protocol::limits::MAX_FRAME_BYTES) as u32
}
