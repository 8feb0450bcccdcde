//! Bounded retries of one-shot requests (administration, producer ids) across a broker change:
//! the broker was not the partition's leader just then, it is shutting down, or the connection
//! could not be made or was lost (the next attempt connects through the broker list, to the
//! next broker first). Produce requests have their own retries, batch by batch, in the
//! producer's engine; both pause the same way.

use std::time::Duration;

use quiver_protocol::message::Message;
use quiver_protocol::ErrorCode;
use tokio::time::Instant;

use crate::connection::{request_on, Client};
use crate::error::ClientError;

/// First pause after a failure; doubles per consecutive failure up to `MAX_BACKOFF`.
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(50);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A request's answer after its retries, and whether an attempt before the last may have
/// been carried out by a broker (its answer was lost): a create then finding the topic, or a
/// delete not finding it, may be its own earlier attempt's doing.
#[derive(Debug)]
pub(crate) struct Retried {
    pub result: Result<Message, ClientError>,
    pub maybe_done_before: bool,
}

/// What a failed attempt means for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The request did not reach a broker, or a broker refused it before acting: try again.
    NotDone,
    /// The answer was lost with the connection: the broker may have acted. Try again.
    MaybeDone,
    /// The broker is going away (it may have acted): try again on another connection.
    BrokerLeaving,
    /// Retrying would not help.
    Final,
}

fn failure(e: &ClientError) -> Failure {
    match e {
        ClientError::Unreachable { .. } | ClientError::Refused { .. } => Failure::NotDone,
        ClientError::AllBrokersFailed { .. } if e.is_retriable() => Failure::NotDone,
        ClientError::ConnectionLost(_) => Failure::MaybeDone,
        ClientError::Broker { code: ErrorCode::NotLeader | ErrorCode::NotCoordinator, .. } => {
            Failure::NotDone
        }
        // Sent while the broker's requests were still being answered: one may have finished.
        ClientError::Broker { code: ErrorCode::ShuttingDown, .. } => Failure::BrokerLeaving,
        _ => Failure::Final,
    }
}

impl Client {
    /// Sends `msg` until it gets an answer, retrying (50 ms pause doubling to 1 s) on the
    /// failures [`failure`] names, for at most the request timeout in all. Only for requests
    /// that are safe to repeat, or whose caller reads `maybe_done_before`.
    pub(crate) async fn request_retrying(&self, msg: &Message) -> Retried {
        let timeout = self.config().request_timeout;
        let deadline = Instant::now() + timeout;
        let mut backoff = MIN_BACKOFF;
        let mut maybe_done_before = false;
        // The last answer that said why (an attempt cut short by the deadline says nothing).
        let mut last_reason: Option<ClientError> = None;
        loop {
            let (result, conn) = match self.live_connection().await {
                Ok(conn) => {
                    let left = deadline.saturating_duration_since(Instant::now()).max(MIN_BACKOFF);
                    (request_on(&conn, msg, left).await, Some(conn))
                }
                Err(e) => (Err(e), None),
            };
            let e = match result {
                Ok(m) => return Retried { result: Ok(m), maybe_done_before },
                Err(e) => e,
            };
            let kind = failure(&e);
            if kind == Failure::Final || Instant::now() + backoff >= deadline {
                // A last attempt cut short by the deadline may have been carried out: say so,
                // with the last answer that said why the earlier ones were not.
                let e = match (e, last_reason) {
                    (ClientError::Timeout(_), Some(ClientError::Broker { code, message })) => {
                        maybe_done_before = true;
                        let message = format!(
                            "{message} (for {} ms; the last attempt got no answer and may have been carried out)",
                            timeout.as_millis()
                        );
                        ClientError::Broker { code, message }
                    }
                    (ClientError::Timeout(_), _) => {
                        maybe_done_before = true;
                        ClientError::Timeout(timeout.as_millis() as u64)
                    }
                    (e, _) => e,
                };
                return Retried { result: Err(e), maybe_done_before };
            }
            if !matches!(e, ClientError::Timeout(_)) {
                last_reason = Some(e.clone());
            }
            maybe_done_before |= matches!(kind, Failure::MaybeDone | Failure::BrokerLeaving);
            if let (Failure::BrokerLeaving, Some(conn)) = (kind, &conn) {
                self.abandon(conn);
            }
            tracing::debug!(kind = msg.kind(), "request failed, retrying in {backoff:?}: {e}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(code: ErrorCode) -> ClientError {
        ClientError::Broker { code, message: String::new() }
    }

    #[test]
    fn not_leader_and_unreachable_brokers_are_retried_as_not_done() {
        assert_eq!(failure(&broker(ErrorCode::NotLeader)), Failure::NotDone);
        let dead = ClientError::Unreachable { addr: "b:1".into(), timeout_ms: 1 };
        assert_eq!(failure(&dead), Failure::NotDone);
        let all = ClientError::AllBrokersFailed { attempts: vec![dead.clone(), dead] };
        assert_eq!(failure(&all), Failure::NotDone);
    }

    #[test]
    fn a_lost_answer_or_a_leaving_broker_may_have_been_acted_on() {
        assert_eq!(failure(&ClientError::ConnectionLost("reset".into())), Failure::MaybeDone);
        assert_eq!(failure(&broker(ErrorCode::ShuttingDown)), Failure::BrokerLeaving);
    }

    #[test]
    fn refusals_and_bad_settings_are_final() {
        for code in [ErrorCode::UnknownTopic, ErrorCode::TopicExists, ErrorCode::InvalidTopic] {
            assert_eq!(failure(&broker(code)), Failure::Final, "{code:?}");
        }
        let tls = ClientError::Connect { addr: "b:1".into(), reason: "TLS".into() };
        assert_eq!(failure(&tls), Failure::Final);
        assert_eq!(
            failure(&ClientError::AllBrokersFailed { attempts: vec![tls.clone(), tls] }),
            Failure::Final
        );
        assert_eq!(failure(&ClientError::Timeout(5)), Failure::Final, "the whole budget is spent");
    }
}
