//! The checker on hand-written histories: a clean one passes, and each anomaly kind is found
//! (and only that kind) when the history holds it.

use std::collections::BTreeSet;

use super::checker::{check, expand_allow, Report, KINDS};
use super::history::{Event, Type};

const T: &str = "faults";

fn produce(t: u64, kind: Type, v: &str, p: u32, offset: Option<u64>, idempotent: bool) -> Event {
    Event {
        idempotent: Some(idempotent),
        offset,
        ..Event::new("producer-0", kind, "produce").tp(T, p).value(v).at(t)
    }
}

/// An acknowledged produce: invoke at `t`, ok at `t + 1`.
fn acked(t: u64, v: &str, p: u32, offset: u64) -> Vec<Event> {
    vec![produce(t, Type::Invoke, v, p, None, true), produce(t + 1, Type::Ok, v, p, Some(offset), true)]
}

fn log(node: usize, p: u32, records: &[(u64, &str)]) -> Event {
    Event {
        node: Some(node),
        log: Some(records.iter().map(|(o, v)| (*o, v.to_string())).collect()),
        ..Event::new("harness", Type::Ok, "read-log").tp(T, p).at(1_000_000)
    }
}

fn deliver(t: u64, process: &str, session: u64, p: u32, offset: u64, v: &str, count: u32) -> Event {
    Event {
        delivery_count: Some(count),
        ..Event::new(process, Type::Ok, "deliver").tp(T, p).offset(offset).value(v).session(session).at(t)
    }
}

fn commit_ok(t: u64, process: &str, p: u32, offset: u64) -> Event {
    Event { offsets: Some([(p, offset)].into()), ..Event::new(process, Type::Ok, "commit").session(1).at(t) }
}

fn subscribe(t: u64, process: &str, session: u64) -> Event {
    Event::new(process, Type::Ok, "subscribe").session(session).at(t)
}

/// Three acknowledged values on partition 0 at offsets 0..3, both brokers serving them, one
/// consumer reading all three in order and committing 3.
fn clean() -> Vec<Event> {
    let mut h = Vec::new();
    for (i, v) in ["a", "b", "c"].iter().enumerate() {
        h.extend(acked(10 * i as u64, v, 0, i as u64));
    }
    h.push(subscribe(40, "consumer-0", 1));
    for (i, v) in ["a", "b", "c"].iter().enumerate() {
        h.push(deliver(50 + i as u64, "consumer-0", 1, 0, i as u64, v, 1));
    }
    h.push(commit_ok(60, "consumer-0", 0, 3));
    let records = [(0, "a"), (1, "b"), (2, "c")];
    h.push(log(0, 0, &records));
    h.push(log(1, 0, &records));
    h
}

fn run(h: &[Event]) -> Report {
    check(h, &BTreeSet::new())
}

/// The kinds found (count > 0).
fn found(r: &Report) -> Vec<&str> {
    KINDS.iter().copied().filter(|k| r.count(k) > 0).collect()
}

#[test]
fn a_clean_history_passes() {
    let r = run(&clean());
    assert!(r.ok, "{}", r.table());
    assert_eq!(found(&r), Vec::<&str>::new());
    assert_eq!(r.stats.produce_ok, 3);
}

#[test]
fn an_acknowledged_value_missing_from_the_log_is_lost() {
    let mut h = clean();
    h.extend(acked(30, "d", 0, 3));
    h.push(deliver(58, "consumer-0", 1, 0, 3, "d", 1)); // delivered, then lost from the log
    let r = run(&h);
    assert_eq!(found(&r), ["lost"], "{}", r.table());
    assert!(!r.ok);
}

#[test]
fn a_value_of_an_idempotent_producer_twice_is_a_duplicate() {
    let mut h = clean();
    for e in h.iter_mut().filter(|e| e.f == "read-log") {
        if let Some(l) = e.log.as_mut() {
            l.push((3, "c".into()));
        }
    }
    h.push(deliver(58, "consumer-0", 1, 0, 3, "c", 1));
    let r = run(&h);
    assert_eq!(found(&r), ["duplicate"], "{}", r.table());
    // From a producer that is not idempotent, only counted.
    for e in h.iter_mut().filter(|e| e.f == "produce") {
        e.idempotent = Some(false);
    }
    let r = run(&h);
    assert!(r.ok, "{}", r.table());
    assert_eq!(r.stats.duplicate_non_idempotent, 1);
}

#[test]
fn a_value_acknowledged_at_another_offset_is_inconsistent() {
    let mut h = clean();
    h[1].offset = Some(7);
    let r = run(&h);
    assert_eq!(found(&r), ["inconsistent-offset"], "{}", r.table());
}

#[test]
fn brokers_serving_different_logs_diverge() {
    let mut h = clean();
    h.push(log(2, 0, &[(0, "a"), (1, "x"), (2, "c")]));
    let r = run(&h);
    assert!(found(&r).contains(&"divergent-replicas"), "{}", r.table());
    let mut h = clean();
    h.push(log(2, 0, &[(0, "a"), (1, "b")])); // shorter
    assert_eq!(found(&run(&h)), ["divergent-replicas"]);
}

#[test]
fn a_value_never_sent_is_a_phantom_and_an_unreadable_log_is_reported() {
    let mut h = clean();
    for e in h.iter_mut().filter(|e| e.f == "read-log") {
        if let Some(l) = e.log.as_mut() {
            l.push((3, "zzz".into()));
        }
    }
    h.push(deliver(58, "consumer-0", 1, 0, 3, "zzz", 1));
    assert_eq!(found(&run(&h)), ["phantom"]);
    let mut h = clean();
    h.push(Event {
        node: Some(2),
        ..Event::new("harness", Type::Fail, "read-log").tp(T, 0).error("no whole log within 30 s")
    });
    assert_eq!(found(&run(&h)), ["unreadable-log"]);
}

#[test]
fn offsets_going_back_within_a_session_are_non_monotonic_unless_redelivered_or_reassigned() {
    let mut h = clean();
    h.push(deliver(57, "consumer-0", 1, 0, 1, "b", 1)); // a first delivery going back
    let r = run(&h);
    assert!(found(&r).contains(&"non-monotonic-read"), "{}", r.table());
    // As a redelivery (count 2) it is not.
    let mut h = clean();
    h.push(deliver(57, "consumer-0", 1, 0, 1, "b", 2));
    assert!(!found(&run(&h)).contains(&"non-monotonic-read"));
    // Nor after an assignment change or in a new session.
    let mut h = clean();
    h.push(Event {
        partitions: Some(vec![0]),
        ..Event::new("consumer-0", Type::Ok, "assign").session(1).at(56)
    });
    h.push(deliver(57, "consumer-0", 1, 0, 1, "b", 1));
    assert!(!found(&run(&h)).contains(&"non-monotonic-read"));
}

#[test]
fn a_hole_below_what_the_group_read_is_a_skipped_offset() {
    let mut h = clean();
    h.retain(|e| !(e.f == "deliver" && e.offset == Some(1)));
    let r = run(&h);
    assert_eq!(found(&r), ["skipped-offset", "acked-never-delivered"], "{}", r.table());
}

#[test]
fn a_commit_below_a_confirmed_one_goes_back() {
    let mut h = clean();
    h.push(commit_ok(70, "consumer-1", 0, 2));
    assert_eq!(found(&run(&h)), ["commit-went-back"]);
    let mut h = clean();
    h.push(Event::new("harness", Type::Ok, "read-committed").tp(T, 0).offset(1).at(2_000_000));
    assert_eq!(found(&run(&h)), ["commit-went-back"]);
}

#[test]
fn committed_data_delivered_again_is_redelivered_after_commit() {
    let mut h = clean();
    h.push(deliver(61, "consumer-1", 1, 0, 0, "a", 2));
    let r = run(&h);
    assert_eq!(found(&r), ["redelivered-after-commit"], "{}", r.table());
    // Allowed, it is reported and does not fail the run.
    let allowed = expand_allow(&["group-redelivery".to_string()]).unwrap_or_default();
    let r = check(&h, &allowed);
    assert!(r.ok && r.count("redelivered-after-commit") == 1, "{}", r.table());
    assert!(r.table().contains("(allowed)"));
}

#[test]
fn an_acknowledged_value_the_group_never_got_is_reported() {
    let mut h = clean();
    h.retain(|e| !(e.f == "deliver" && e.offset == Some(2)));
    assert_eq!(found(&run(&h)), ["acked-never-delivered"]);
}

#[test]
fn unknown_allow_names_are_refused() {
    assert!(expand_allow(&["nope".to_string()]).is_err());
    assert!(expand_allow(&["group".to_string()]).is_ok_and(|k| k.len() == 5));
}

#[test]
fn a_broker_refusing_a_damaged_batch_is_counted_not_failed() {
    let mut h = clean();
    h.push(Event {
        node: Some(2),
        ..Event::new("harness", Type::Fail, "read-log").tp(T, 0).error("CorruptLog: batch CRC mismatch")
    });
    let r = run(&h);
    assert!(r.ok, "{}", r.table());
    assert_eq!(r.stats.refused_corrupt, ["broker 3 partition 0"]);
}
