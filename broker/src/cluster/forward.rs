//! Forwarding a client stream's produce requests to the partition's leader, pipelined and in
//! order: one bidirectional stream to the leader per client stream, written in the order the
//! client's requests arrive, its answers read back in the same order (the leader answers a
//! stream's requests in order, as it does for clients). A produce stream of the SDK carries one
//! partition, so its batches reach the leader in the order the producer sent them.
//!
//! If the leader changes, the next request opens a stream to the new one; if the link breaks,
//! every request waiting on it gets `NotLeader` and the caller retries it on its own (the
//! producer's sequence numbers make the retry idempotent).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use quiver_protocol::message::Message;
use quiver_protocol::ErrorCode;
use quiver_transport::{write_message, FrameReader};
use tokio::sync::oneshot;

use super::PeerLinks;
use crate::partition::PartitionError;

type Answer = oneshot::Sender<Result<Message, PartitionError>>;

/// The forward stream of one client stream (none until its first forwarded request), and
/// which broker the stream's produce requests went to.
#[derive(Default)]
pub(crate) struct StreamForward {
    open: Option<Open>,
    /// The broker (this one or the leader forwarded to) the stream's last produce went to.
    target: Option<u64>,
    /// The stream's produce requests not yet answered, whichever broker handles them.
    outstanding: Arc<std::sync::atomic::AtomicUsize>,
    /// Set once the leader changed under requests in flight: every later produce on the
    /// stream is refused, so none can overtake a batch the producer will re-send.
    refusing: bool,
}

/// A produce request of the stream in flight; dropped once it is answered.
pub(crate) struct Claim(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

struct Open {
    leader: u64,
    send: quinn::SendStream,
    waiting: Arc<Mutex<VecDeque<Answer>>>,
}

impl Drop for Open {
    fn drop(&mut self) {
        let _ = self.send.finish();
    }
}

fn lost(why: impl std::fmt::Display) -> PartitionError {
    PartitionError::new(ErrorCode::NotLeader, format!("the link to the partition's leader broke: {why}"))
}

impl StreamForward {
    /// Claims the stream's next produce for `leader`. `NotLeader` when the leader changed while
    /// earlier requests of the stream are unanswered (they may yet fail, and a later batch must
    /// not reach the new leader before them), and for every produce after that.
    pub(crate) fn claim(&mut self, leader: u64) -> Result<Claim, PartitionError> {
        use std::sync::atomic::Ordering;
        let busy = self.outstanding.load(Ordering::Acquire) > 0;
        if self.refusing || (busy && self.target.is_some_and(|t| t != leader)) {
            self.refusing = true;
            return Err(PartitionError::new(
                ErrorCode::NotLeader,
                format!("the partition's leader moved to broker {leader} with batches in flight; re-send them in order"),
            ));
        }
        self.target = Some(leader);
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        Ok(Claim(self.outstanding.clone()))
    }

    /// Writes `request` to `leader` on this stream's forward stream (opening one, or a new one
    /// when the leader changed) and returns where its answer will arrive.
    pub(crate) async fn send(
        &mut self,
        links: &PeerLinks,
        leader: u64,
        request: &Message,
    ) -> Result<oneshot::Receiver<Result<Message, PartitionError>>, PartitionError> {
        if self.open.as_ref().is_some_and(|o| o.leader != leader) {
            self.open = None;
        }
        if self.open.is_none() {
            let conn =
                links.connection(leader).ok_or_else(|| lost(format!("broker {leader} is not connected")))?;
            let (send, recv) = conn.open_bi().await.map_err(lost)?;
            let waiting = Arc::new(Mutex::new(VecDeque::new()));
            tokio::spawn(read_answers(recv, waiting.clone()));
            self.open = Some(Open { leader, send, waiting });
        }
        let Some(open) = self.open.as_mut() else { return Err(lost("no stream")) };
        let (tx, rx) = oneshot::channel();
        // Registered before the write, so an answer can never arrive before its waiter.
        open.waiting.lock().push_back(tx);
        if let Err(e) = write_message(&mut open.send, request).await {
            self.open = None;
            return Err(lost(e));
        }
        Ok(rx)
    }
}

/// Hands the leader's answers to the requests in order; when the stream ends, fails the rest.
async fn read_answers(recv: quinn::RecvStream, waiting: Arc<Mutex<VecDeque<Answer>>>) {
    let mut reader = FrameReader::new(recv);
    let why = loop {
        match reader.next().await {
            Ok(Some(answer)) => {
                let Some(tx) = waiting.lock().pop_front() else {
                    break "an answer nobody asked for".to_string();
                };
                let _ = tx.send(Ok(answer));
            }
            Ok(None) => break "the stream ended".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    for tx in waiting.lock().drain(..) {
        let _ = tx.send(Err(lost(&why)));
    }
}
