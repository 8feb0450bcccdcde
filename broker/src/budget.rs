//! Memory budgets a connection's requests and answers count against (docs/security.md,
//! "Resource bounds"). Depends on nothing else in the broker, so the log and partition code can
//! count what they read.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use quiver_protocol::limits::{MIN_SEND_WINDOW_BYTES, SEND_WINDOW_BYTES};

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

/// Shares `max_total_send_bytes` among the clients' connections: what the broker has written to
/// a connection and the client has not acknowledged (or not yet been sent, the client not
/// reading) waits in that connection's QUIC send window, outside the buffer budgets. Each
/// connection's window is at most the total over the number of connections, rounded down to a
/// power of two so that windows change only when that count crosses one (then all at once),
/// between `MIN_SEND_WINDOW_BYTES` and `SEND_WINDOW_BYTES`. Links between brokers keep full
/// windows. A window made smaller does not drop what a connection already holds: the bound is
/// exact for connections filling their windows together (docs/security.md).
#[derive(Debug)]
pub struct SendWindows {
    total: u64,
    /// The client connections, and the window they all have now.
    open: Mutex<(HashMap<u64, quinn::Connection>, u64)>,
}

impl SendWindows {
    pub fn new(total: u64) -> Arc<SendWindows> {
        Arc::new(SendWindows { total, open: Mutex::new((HashMap::new(), SEND_WINDOW_BYTES)) })
    }

    /// Counts `conn` (the broker's connection `id`) among the clients' until the returned
    /// slot is dropped.
    pub fn join(self: &Arc<Self>, id: u64, conn: &quinn::Connection) -> SendWindowSlot {
        let mut open = self.open.lock();
        open.0.insert(id, conn.clone());
        conn.set_send_window(open.1);
        self.rebalance(&mut open);
        SendWindowSlot { windows: Arc::clone(self), id }
    }

    /// The window every client connection has now.
    pub fn window(&self) -> u64 {
        self.open.lock().1
    }

    /// Shrinks every window at once when the share falls below it; grows them only once the
    /// share is four times the window (then to half the share), so a count that swings across
    /// one power of two does not touch every connection each time.
    fn rebalance(&self, open: &mut (HashMap<u64, quinn::Connection>, u64)) {
        let window = next_window(self.total, open.0.len(), open.1);
        if window != open.1 {
            open.1 = window;
            for conn in open.0.values() {
                conn.set_send_window(window);
            }
            metrics::gauge!("quiver_client_send_window_bytes").set(window as f64);
        }
    }
}

/// A client connection's place among those sharing `max_total_send_bytes`.
#[derive(Debug)]
pub struct SendWindowSlot {
    windows: Arc<SendWindows>,
    id: u64,
}

impl Drop for SendWindowSlot {
    fn drop(&mut self) {
        let mut open = self.windows.open.lock();
        open.0.remove(&self.id);
        self.windows.rebalance(&mut open);
    }
}

/// The window for `connections` sharing `total`, given the `current` one: at most the share
/// (a power of two) down to `MIN_SEND_WINDOW_BYTES`; smaller at once when the share falls
/// below it, larger only once the share is four times it (then half the share, at most
/// `SEND_WINDOW_BYTES`), so a count swinging across one power of two changes nothing.
fn next_window(total: u64, connections: usize, current: u64) -> u64 {
    let share = prev_power_of_two(total / connections.max(1) as u64);
    if share < current {
        share.max(MIN_SEND_WINDOW_BYTES)
    } else if share >= current.saturating_mul(4) {
        (share / 2).min(SEND_WINDOW_BYTES)
    } else {
        current
    }
}

/// The largest power of two at most `n` (1 for 0).
fn prev_power_of_two(n: u64) -> u64 {
    if n == 0 {
        1
    } else {
        1 << (63 - n.leading_zeros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shrink_at_once_and_grow_with_hysteresis() {
        let total = 1 << 30;
        let mut w = SEND_WINDOW_BYTES;
        let mut changes = 0;
        for n in 1..=20_000usize {
            let next = next_window(total, n, w);
            assert!((MIN_SEND_WINDOW_BYTES..=SEND_WINDOW_BYTES).contains(&next));
            // The bound: the windows together stay within the total (above the floor).
            assert!(next * n as u64 <= total.max(MIN_SEND_WINDOW_BYTES * n as u64), "{n}: {next}");
            changes += usize::from(next != w);
            w = next;
        }
        assert_eq!(w, MIN_SEND_WINDOW_BYTES);
        assert_eq!(changes, 10, "64 MiB down to 64 KiB, one halving at a time");
        // Swinging across 4,096 connections: one change, not one per swing.
        let (mut w, mut swings) = (256 << 10, 0);
        for n in [4097, 4096, 4097, 4096, 4097] {
            let next = next_window(total, n, w);
            swings += usize::from(next != w);
            w = next;
        }
        assert_eq!((swings, w), (1, 128 << 10));
        // Back to a few connections: full windows again.
        assert_eq!(next_window(total, 4, MIN_SEND_WINDOW_BYTES), SEND_WINDOW_BYTES);
    }

    #[test]
    fn windows_are_powers_of_two_within_the_limits() {
        assert_eq!(prev_power_of_two(0), 1);
        assert_eq!(prev_power_of_two(1), 1);
        assert_eq!(prev_power_of_two(3 << 20), 2 << 20);
        assert_eq!(prev_power_of_two(u64::MAX), 1 << 63);
    }
}
