//! Hostile bytes in the controller's commands (a one-record batch whose value is the command
//! as JSON, docs/replication.md §6): they come from the controller's log and from peers.
//! Arbitrary bytes, valid commands with their JSON mutated (inside a valid batch, so the JSON
//! and the checks behind it are reached) and the whole entry mutated: an error, or a command
//! within every limit that encodes to a command decoding the same; never a panic.

use bytes::Bytes;
use proptest::prelude::*;
use quiver_protocol::batch::BatchBuilder;
use quiver_protocol::limits::MAX_PARTITIONS;
use quiver_protocol::TopicConfig;

use super::controller::Command;
use crate::fuzz;

fn command() -> impl Strategy<Value = Command> {
    let name = "[a-z0-9._-]{1,30}".prop_filter("not . or ..", |n| n != "." && n != "..");
    prop_oneof![
        (
            name.clone(),
            1..=MAX_PARTITIONS,
            4096u64..=1 << 31,
            1..=5u16,
            proptest::option::of(proptest::collection::vec(1..100u64, 1..6))
        )
            .prop_map(|(name, partitions, sb, r, brokers)| Command::CreateTopic {
                name,
                partitions,
                config: TopicConfig::new().with_segment_bytes(sb).with_replicas(r),
                brokers,
            }),
        name.prop_map(|name| Command::DeleteTopic { name }),
        (
            proptest::collection::btree_map(1..100u64, 1..65535u16, 1..6),
            proptest::collection::vec(1..100u64, 1..6)
        )
            .prop_map(|(brokers, bootstrap)| Command::Brokers {
                brokers: brokers.into_iter().map(|(id, port)| (id, format!("127.0.0.1:{port}"))).collect(),
                bootstrap,
            }),
    ]
}

fn entry(json: &[u8]) -> Bytes {
    let mut b = BatchBuilder::new(128 + json.len());
    b.push(0, None, json, &[]);
    b.finish()
}

fn check(decoded: Result<Command, String>) -> Result<(), TestCaseError> {
    if let Ok(c) = decoded {
        if let Command::CreateTopic { partitions, config, .. } = &c {
            prop_assert!(*partitions >= 1 && *partitions <= MAX_PARTITIONS);
            prop_assert!(config.validate().is_ok());
        }
        prop_assert_eq!(Command::decode(c.encode()), Ok(c.clone()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz::config(256))]

    #[test]
    fn controller_commands(
        c in command(),
        muts in fuzz::mutations(),
        junk in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = Command::decode(Bytes::from(junk.clone()));
        check(Command::decode(entry(&junk)))?;
        prop_assert_eq!(Command::decode(c.encode()), Ok(c.clone()));
        let json = serde_json::to_vec(&c).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(Command::decode(entry(&fuzz::apply(&json, &muts))))?;
        check(Command::decode(Bytes::from(fuzz::apply(&c.encode(), &muts))))?;
    }
}

/// A command no proposer would have made (more partitions than a topic can have, a name with
/// a path in it) is refused at decode, before it is applied.
#[test]
fn commands_beyond_the_limits_are_refused() {
    let json = br#"{"op":"delete_topic","name":"../x"}"#;
    assert!(Command::decode(entry(json)).is_err());
    let c = Command::CreateTopic {
        name: "t".into(),
        partitions: MAX_PARTITIONS + 1,
        config: TopicConfig::new(),
        brokers: None,
    };
    assert!(Command::decode(c.encode()).is_err());
}
