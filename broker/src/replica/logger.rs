//! raft-rs logs through `slog`; this drain forwards its records to `tracing` (target `raft`),
//! with the key-values (`raft_id`, `term`, ...) appended to the message. raft-rs logs every
//! election and role change at info for every group, so info goes to debug here; warnings and
//! errors keep their level.

use std::fmt::{self, Write};

use slog::{Drain, Level, OwnedKVList, Record, KV};

/// A logger for `RawNode::new`.
pub(crate) fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let level = match record.level() {
            Level::Critical | Level::Error => tracing::Level::ERROR,
            Level::Warning => tracing::Level::WARN,
            Level::Info => tracing::Level::DEBUG,
            Level::Debug | Level::Trace => tracing::Level::TRACE,
        };
        // The message is built only when someone listens.
        macro_rules! forward {
            ($lvl:expr) => {
                if tracing::enabled!(target: "raft", $lvl) {
                    let mut text = record.msg().to_string();
                    let mut kv = KvText(&mut text);
                    let _ = record.kv().serialize(record, &mut kv);
                    let _ = values.serialize(record, &mut kv);
                    tracing::event!(target: "raft", $lvl, "{text}");
                }
            };
        }
        match level {
            tracing::Level::ERROR => forward!(tracing::Level::ERROR),
            tracing::Level::WARN => forward!(tracing::Level::WARN),
            tracing::Level::DEBUG => forward!(tracing::Level::DEBUG),
            _ => forward!(tracing::Level::TRACE),
        }
        Ok(())
    }
}

/// Writes ` key=value` pairs into a string.
struct KvText<'a>(&'a mut String);

impl slog::Serializer for KvText<'_> {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn logging_through_the_bridge_does_not_panic() {
        let log = super::raft_logger();
        slog::info!(log, "became leader"; "term" => 3, "raft_id" => 1);
        slog::error!(log.new(slog::o!("raft_id" => 2)), "oops"; "index" => 9);
    }
}
