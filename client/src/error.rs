//! Client errors. Each names what failed in terms a user can act on.

use quiver_protocol::ErrorCode;

use quiver_transport::{ReadError, WriteError};

/// What went wrong; new kinds may be added, so a `match` needs a wildcard arm.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker address could not be parsed or resolved.
    #[error("bad broker address '{addr}': {reason}")]
    BadAddress { addr: String, reason: String },
    /// The CA certificate file could not be read or holds no certificate.
    #[error("CA certificate {path}: {reason}")]
    BadCa { path: String, reason: String },
    /// The client certificate or its key could not be read.
    #[error("client certificate {path}: {reason}")]
    BadClientCert { path: String, reason: String },
    /// No connection within the timeout (nothing listening, or UDP dropped).
    #[error("broker {addr} unreachable: no answer within {timeout_ms} ms (is quiverd running there?)")]
    Unreachable { addr: String, timeout_ms: u64 },
    /// The connection failed, including TLS failures such as an untrusted certificate.
    #[error("connection to {addr} failed: {reason}")]
    Connect { addr: String, reason: String },
    /// The broker turned the connection away at the handshake: it is shutting down (a restart)
    /// or at its connection limit. Worth retrying.
    #[error("broker {addr} refused the connection: {reason}")]
    Refused { addr: String, reason: String },
    /// None of several brokers could be connected to: each attempt's error, in the order
    /// tried (each names its broker).
    #[error("{}", join_attempts(.attempts))]
    AllBrokersFailed { attempts: Vec<ClientError> },
    /// The connection was lost mid-request (including a broker shutting down).
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The broker answered with an error.
    #[error("{}", broker_message(*code, message))]
    Broker { code: ErrorCode, message: String },
    /// The broker sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A record that cannot fit in a batch, header included: not sent.
    #[error("record of {bytes} bytes is larger than the largest batch ({limit} bytes with its header)")]
    RecordTooLarge { bytes: usize, limit: usize },
    /// A request did not complete in time.
    #[error("request timed out after {0} ms")]
    Timeout(u64),
    /// A produced batch was sent but its fate is unknown and it will not be retried: it may or
    /// may not have been written.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A produced batch was not acknowledged within the producer's delivery timeout, retries
    /// included; `last` is why the last attempt failed, when one did.
    #[error("not acknowledged within {after_ms} ms{}", last_error_suffix(.last))]
    DeliveryTimeout { after_ms: u64, last: Option<String> },
    /// The producer or consumer was closed.
    #[error("closed")]
    Closed,
}

/// Each broker's reason once: the same refusal from every broker is said once, and alone when
/// every broker answered with it (they answered: a refusal, not silence).
fn join_attempts(attempts: &[ClientError]) -> String {
    let mut said: Vec<String> = Vec::new();
    for text in attempts.iter().map(ToString::to_string) {
        if !said.contains(&text) {
            said.push(text);
        }
    }
    let all_answered = attempts.iter().all(|a| matches!(a, ClientError::Broker { .. }));
    match (all_answered, said.as_slice()) {
        (true, [one]) => one.clone(),
        _ => format!("no broker answered: {}", said.join("; ")),
    }
}

fn last_error_suffix(last: &Option<String>) -> String {
    last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
}

fn broker_message(code: ErrorCode, message: &str) -> String {
    if message.is_empty() {
        format!("broker error {code}")
    } else {
        message.to_string()
    }
}

impl ClientError {
    /// The broker's error code, if the broker sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether a retry on a new connection may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::ConnectionLost(_)
            | ClientError::Refused { .. }
            | ClientError::Timeout(_)
            | ClientError::Unreachable { .. } => true,
            ClientError::Broker { code, .. } => code.is_retriable(),
            // Worth another pass if any broker might answer then (not if, say, every one
            // refused the certificate).
            ClientError::AllBrokersFailed { attempts } => attempts.iter().any(ClientError::is_retriable),
            _ => false,
        }
    }
}

// Conversions for `?` on transport calls inside this crate; hidden, not part of the API.
#[doc(hidden)]
impl From<ReadError> for ClientError {
    fn from(e: ReadError) -> Self {
        match e {
            // The connection's own reason, not "connection lost: connection lost".
            ReadError::Read(quinn::ReadError::ConnectionLost(c)) => {
                ClientError::ConnectionLost(describe_lost(&c))
            }
            ReadError::Read(e) => ClientError::ConnectionLost(e.to_string()),
            ReadError::Truncated => ClientError::ConnectionLost(e.to_string()),
            // A stalled peer or path: worth a new stream, as a lost connection is.
            ReadError::Timeout(_) => ClientError::ConnectionLost(e.to_string()),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

#[doc(hidden)]
impl From<WriteError> for ClientError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::ConnectionLost(c) => ClientError::ConnectionLost(describe_lost(&c)),
            other => ClientError::ConnectionLost(other.to_string()),
        }
    }
}

#[doc(hidden)]
impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        ClientError::ConnectionLost(describe_lost(&e))
    }
}

/// Why a connection ended, in words: a broker shutting down says so with its close code.
pub(crate) fn describe_lost(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code.into_inner() == u64::from(ErrorCode::ShuttingDown.code()) =>
        {
            "the broker is shutting down".into()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_says_why_once() {
        let closed = quinn::ConnectionError::LocallyClosed;
        let write = ClientError::from(WriteError::ConnectionLost(closed.clone()));
        let read = ClientError::from(ReadError::Read(quinn::ReadError::ConnectionLost(closed)));
        for e in [write, read] {
            assert_eq!(e.to_string(), "connection lost: closed", "{e:?}");
        }
    }

    #[test]
    fn a_stalled_frame_is_worth_a_new_stream() {
        let e = ClientError::from(ReadError::Timeout(std::time::Duration::from_secs(30)));
        assert!(e.is_retriable(), "{e:?}");
        assert!(!ClientError::from(ReadError::Truncated).to_string().is_empty());
    }

    #[test]
    fn a_broker_going_away_is_worth_a_reconnect() {
        let refused = ClientError::Refused { addr: "b:1".into(), reason: "shutting down".into() };
        assert!(refused.is_retriable());
        let close = quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(u32::from(ErrorCode::ShuttingDown.code())),
            reason: bytes::Bytes::from_static(b"broker shutting down"),
        };
        let e = ClientError::from(quinn::ConnectionError::ApplicationClosed(close));
        assert!(e.is_retriable());
        assert_eq!(e.to_string(), "connection lost: the broker is shutting down");
    }

    #[test]
    fn failing_every_broker_names_each_and_is_retriable_if_one_may_come_back() {
        let dead =
            |port: u16| ClientError::Unreachable { addr: format!("127.0.0.1:{port}"), timeout_ms: 500 };
        let tls = ClientError::Connect { addr: "127.0.0.1:3".into(), reason: "TLS: bad certificate".into() };
        let e = ClientError::AllBrokersFailed { attempts: vec![dead(1), dead(2), tls.clone()] };
        let text = e.to_string();
        for addr in ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"] {
            assert!(text.contains(addr), "{text}");
        }
        assert!(text.starts_with("no broker answered: broker 127.0.0.1:1 unreachable"), "{text}");
        assert!(e.is_retriable());
        assert!(!ClientError::AllBrokersFailed { attempts: vec![tls.clone(), tls] }.is_retriable());
        // Every broker refusing the same way (they name no address) is said once.
        let refused = ClientError::Broker {
            code: ErrorCode::Unauthenticated,
            message: "this broker requires authentication".into(),
        };
        let same =
            ClientError::AllBrokersFailed { attempts: vec![refused.clone(), refused.clone(), refused] };
        assert_eq!(same.to_string(), "this broker requires authentication");
    }

    #[test]
    fn a_delivery_timeout_names_the_last_error() {
        let e = ClientError::DeliveryTimeout { after_ms: 2000, last: Some("storage error".into()) };
        assert_eq!(e.to_string(), "not acknowledged within 2000 ms (last error: storage error)");
        let e = ClientError::DeliveryTimeout { after_ms: 5, last: None };
        assert_eq!(e.to_string(), "not acknowledged within 5 ms");
        assert!(!e.is_retriable());
    }
}
