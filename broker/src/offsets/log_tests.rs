//! The offsets store as a partition log: its records are Kafka v2 batches, tombstones delete
//! keys, and compaction and the migration from the old file format keep every ledger through a
//! crash at any of their steps.

use std::collections::HashMap;
use std::error::Error;
use std::sync::atomic::AtomicI64;

use bytes::{Bytes, BytesMut};
use quiver_protocol::batch::{Batches, Record, RecordIter, ValidatedBatch};
use quiver_protocol::ledger::{LedgerSnapshot, NO_DEADLINE};

use super::legacy::put_entry;
use super::records::{decode_key, decode_value, Key, READ_CHUNK_BYTES};
use super::tests::{key, TestResult, DIR};
use super::*;
use crate::storage::countdown::Countdown;
use crate::storage::MemStorage;

/// Every ledger of the store, as it would be persisted.
fn snapshots(s: &OffsetStore) -> HashMap<OffsetKey, LedgerSnapshot> {
    let ledgers: Vec<(OffsetKey, SharedLedger)> =
        s.state.lock().ledgers.iter().map(|(k, l)| (k.clone(), l.clone())).collect();
    ledgers.into_iter().map(|(k, l)| (k, l.lock().snapshot(MAX_PERSISTED_RANGES))).collect()
}

/// The first segment of the store's log.
fn first_segment(storage: &MemStorage) -> Result<Vec<u8>, Box<dyn Error>> {
    let path = Path::new(DIR).join(LOG_DIR).join("00000000000000000000.log");
    Ok(storage.contents(&path).ok_or("no first segment")?)
}

fn log_start(s: &OffsetStore) -> u64 {
    match &s.writer.lock().log {
        super::Sink::Local(log) => log.log_start_offset(),
        super::Sink::Replicated(_) => unreachable!("a local store"),
    }
}

/// Commits, acks and a topic's removal: a log with many records of a few live ledgers, and
/// tombstones. Returns the ledgers as a reopened store has them.
fn populate(storage: &Arc<MemStorage>) -> Result<HashMap<OffsetKey, LedgerSnapshot>, Box<dyn Error>> {
    let dir = Path::new(DIR);
    let s = OffsetStore::open(storage.clone(), dir)?;
    for i in 1..=90u64 {
        s.commit_blocking(key("g", &format!("t{}", i % 3), 0), i, false)?;
    }
    let k = key("h", "t0", 1);
    {
        let l = s.ledger(&k, 0);
        let mut l = l.lock();
        l.deliver(0..10, NO_DEADLINE);
        l.ack(0..2);
        l.ack(5..7);
    }
    s.mark_dirty(&k);
    s.flush_blocking()?;
    s.remove_topic_blocking("t2")?;
    drop(s);
    let expected = snapshots(&OffsetStore::open(storage.clone(), dir)?);
    assert_eq!(expected.len(), 3, "{expected:?}");
    Ok(expected)
}

/// Each write is one Kafka v2 batch that the protocol's walker and validator accept, CRC
/// checked: a commit's of one record, a flush's of every dirty ledger, a removal's of
/// tombstones (empty values).
#[test]
fn records_are_kafka_v2_batches_one_per_write() -> TestResult {
    let mem = Arc::new(MemStorage::new());
    let s = OffsetStore::open(mem.clone(), Path::new(DIR))?;
    s.commit_blocking(key("g", "a", 0), 5, false)?;
    for p in 0..3u32 {
        s.set_lazy(key("g", "b", p), 10 + u64::from(p));
    }
    s.flush_blocking()?;
    s.remove_topic_blocking("a")?;
    drop(s);
    let bytes = first_segment(&mem)?;
    let mut batches: Vec<(u64, Vec<Record>)> = Vec::new();
    for span in Batches::new(&bytes).checking_crc() {
        let batch = ValidatedBatch::new(Bytes::copy_from_slice(span?.bytes))?;
        assert_eq!(batch.header().leader_epoch, 0);
        let header = *batch.header();
        let records = RecordIter::new(batch.freeze(), header).collect::<Result<Vec<_>, _>>()?;
        batches.push((header.base_offset, records));
    }
    let bases: Vec<u64> = batches.iter().map(|(b, _)| *b).collect();
    assert_eq!(bases, vec![0, 1, 4]);
    let decoded = |r: &Record| -> Result<(Key, Option<LedgerSnapshot>), Box<dyn Error>> {
        let k = decode_key(r.key.clone().ok_or("no key")?)?;
        let v = match r.value.is_empty() {
            true => None,
            false => Some(decode_value(r.value.clone())?),
        };
        Ok((k, v))
    };
    let (k, v) = decoded(&batches[0].1[0])?;
    assert_eq!(k, Key::Ledger(key("g", "a", 0)));
    assert_eq!(v.map(|v| v.floor), Some(5));
    let mut flushed = Vec::new();
    for r in &batches[1].1 {
        let (k, v) = decoded(r)?;
        flushed.push((k, v.map(|v| v.floor)));
    }
    flushed.sort_by_key(|(_, floor)| *floor);
    let want: Vec<_> = (0..3u32).map(|p| (Key::Ledger(key("g", "b", p)), Some(10 + u64::from(p)))).collect();
    assert_eq!(flushed, want);
    assert_eq!(batches[2].1.len(), 1);
    assert_eq!(decoded(&batches[2].1[0])?, (Key::Ledger(key("g", "a", 0)), None), "a tombstone");
    // A flipped bit in the CRC-covered part is caught by the walker.
    let mut bad = bytes.clone();
    bad[70] ^= 1;
    assert!(matches!(Batches::new(&bad).checking_crc().next(), Some(Err(_))));
    Ok(())
}

/// A removed topic's keys stay deleted across reopens and compaction; a key written again
/// after its tombstone is live again.
#[test]
fn a_tombstone_deletes_its_key_until_it_is_written_again() -> TestResult {
    let mem = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let s = OffsetStore::open(mem.clone(), dir)?;
    s.commit_blocking(key("g", "a", 0), 5, false)?;
    s.commit_blocking(key("g", "a", 1), 6, false)?;
    s.commit_blocking(key("g", "b", 0), 7, false)?;
    s.remove_topic_blocking("a")?;
    drop(s);
    mem.crash();
    let s = OffsetStore::open(mem.clone(), dir)?;
    assert_eq!((s.get(&key("g", "a", 0)), s.get(&key("g", "a", 1))), (None, None));
    assert_eq!(s.get(&key("g", "b", 0)), Some(7));
    s.commit_blocking(key("g", "a", 0), 3, false)?;
    drop(s);
    mem.crash();
    let s = OffsetStore::open(mem.clone(), dir)?;
    assert_eq!((s.get(&key("g", "a", 0)), s.get(&key("g", "a", 1))), (Some(3), None));
    let bytes = s.state.lock().log_bytes;
    drop(s);
    // A limit the log holds more than half of: the periodic flush compacts.
    let s = OffsetStore::open_with_limit(mem.clone(), dir, bytes + 10)?;
    s.maintain_blocking()?;
    assert!(log_start(&s) > 0, "compacted");
    assert!(s.state.lock().log_bytes < bytes);
    drop(s);
    mem.crash();
    let s = OffsetStore::open(mem, dir)?;
    assert_eq!((s.get(&key("g", "a", 0)), s.get(&key("g", "a", 1))), (Some(3), None));
    assert_eq!(s.get(&key("g", "b", 0)), Some(7));
    Ok(())
}

/// A power loss at every step of a compaction (roll, snapshot append, fsync, each segment
/// deletion), with torn tails of varying length: the store reopens with the same ledgers, and
/// the next compaction completes.
#[test]
fn a_crash_at_every_step_of_compaction_keeps_every_ledger() -> TestResult {
    const LIMIT: u64 = 16 * 1024;
    let dir = Path::new(DIR);
    let mut steps = 0;
    for n in 0i64..200 {
        let mem = Arc::new(MemStorage::new());
        let expected = populate(&mem)?;
        let faulty = Arc::new(Countdown::new(mem.clone(), Arc::new(AtomicI64::new(-1))));
        let s = OffsetStore::open_with_limit(faulty.clone(), dir, LIMIT)?;
        assert_eq!(log_start(&s), 0);
        let before = s.state.lock().log_bytes;
        faulty.arm(n);
        let result = s.maintain_blocking();
        let done = !faulty.tripped();
        if done {
            result?;
            assert!(log_start(&s) > 0, "compacted");
        }
        drop(s);
        mem.crash_torn((n as usize % 4) * 37);
        let s = OffsetStore::open_with_limit(mem.clone(), dir, LIMIT)?;
        assert_eq!(snapshots(&s), expected, "a crash at step {n}");
        // Never larger than before the compaction: a snapshot cut short is cut off, and a
        // complete one's old segments are deleted at open (else repeated crashes could leave
        // a log too large for the next compaction to fit beside).
        let reopened = s.state.lock().log_bytes;
        assert!(reopened <= before, "a crash at step {n} left {reopened} bytes, {before} before");
        s.maintain_blocking()?;
        assert!(log_start(&s) > 0, "compacted after the crash at step {n}");
        drop(s);
        mem.crash();
        let s = OffsetStore::open(mem.clone(), dir)?;
        assert_eq!(snapshots(&s), expected, "the compaction after a crash at step {n}");
        if done {
            steps = n;
            break;
        }
    }
    assert!(steps >= 5, "the compaction took {steps} steps");
    Ok(())
}

/// An `offsets.log` of the old format: some ledgers, one written twice (the last entry wins).
/// Returns its bytes and the ledgers it holds, as the store restores them.
fn old_file() -> (BytesMut, HashMap<OffsetKey, LedgerSnapshot>) {
    let rich = LedgerSnapshot {
        floor: 2,
        acked: vec![5..7, 11..12],
        counts: vec![(2..5, 2), (7..10, 1)],
        horizon: 14,
        maybe: vec![8..10, 12..14],
    };
    let entries = [
        (key("g", "t", 0), LedgerSnapshot { floor: 4, ..Default::default() }),
        (key("g", "t", 1), rich),
        (key("h", "u", 0), LedgerSnapshot { floor: 1, ..Default::default() }),
        (key("g", "t", 0), LedgerSnapshot { floor: 9, horizon: 9, ..Default::default() }),
    ];
    let mut buf = BytesMut::new();
    let mut expected = HashMap::new();
    for (k, snapshot) in entries {
        put_entry(&mut buf, &k, &snapshot);
        expected.insert(k, AckLedger::restore(&snapshot).snapshot(MAX_PERSISTED_RANGES));
    }
    (buf, expected)
}

/// A data directory of the old format opens with the same ledgers, the old file removed; a
/// power loss at any step of the migration reopens the same (the migration runs again).
#[test]
fn the_old_file_format_migrates_through_a_crash_at_every_step() -> TestResult {
    let dir = Path::new(DIR);
    let old = dir.join(legacy::FILE_NAME);
    let (bytes, expected) = old_file();
    let mut steps = 0;
    for n in 0i64..200 {
        let mem = Arc::new(MemStorage::new());
        mem.create_dir_all(dir)?;
        mem.set_contents(&old, &bytes)?;
        let faulty = Arc::new(Countdown::new(mem.clone(), Arc::new(AtomicI64::new(-1))));
        faulty.arm(n);
        let opened = OffsetStore::open(faulty.clone(), dir);
        let done = !faulty.tripped();
        if done {
            assert_eq!(snapshots(&opened?), expected);
            assert_eq!(mem.contents(&old), None, "migrated, so removed");
        } else {
            drop(opened);
        }
        mem.crash_torn((n as usize % 4) * 37);
        let s = OffsetStore::open(mem.clone(), dir)?;
        assert_eq!(snapshots(&s), expected, "a crash at step {n}");
        assert_eq!(mem.contents(&old), None, "migrated after a crash at step {n}, so removed");
        s.commit_blocking(key("g", "t", 0), 12, false)?;
        drop(s);
        mem.crash();
        let s = OffsetStore::open(mem.clone(), dir)?;
        assert_eq!(s.get(&key("g", "t", 0)), Some(12));
        assert_eq!(s.get(&key("h", "u", 0)), Some(1));
        if done {
            steps = n;
            break;
        }
    }
    assert!(steps >= 5, "the migration took {steps} steps");
    Ok(())
}

/// A log of many batches, larger than two read chunks, is read whole at open.
#[test]
fn a_log_larger_than_a_read_chunk_is_read_whole() -> TestResult {
    let mem = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    let s = OffsetStore::open(mem.clone(), dir)?;
    let group = "g".repeat(200);
    for i in 0..10_000u32 {
        s.set_lazy(key(&group, "t", i), u64::from(i));
        if i % 97 == 96 {
            s.flush_blocking()?;
        }
    }
    s.flush_blocking()?;
    drop(s);
    mem.crash();
    assert!(first_segment(&mem)?.len() > 2 * READ_CHUNK_BYTES);
    let s = OffsetStore::open(mem, dir)?;
    for i in 0..10_000u32 {
        assert_eq!(s.get(&key(&group, "t", i)), Some(u64::from(i)));
    }
    Ok(())
}

/// Record keys and values from disk are hostile: decoding garbage fails, never panics, and a
/// batch whose records do not decode changes nothing.
#[test]
fn garbage_records_never_panic() {
    for seed in 0u32..300 {
        let data: Vec<u8> =
            (0..80).map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8).collect();
        let data = Bytes::from(data);
        let _ = decode_key(data.clone());
        let _ = decode_value(data.clone());
        let mut live = records::Live::default();
        records::apply_batch(data, &mut live, &mut Default::default());
        assert!(live.ledgers.is_empty() && live.groups.is_empty());
    }
    // Lengths over their limits are refused before anything is read.
    assert!(decode_value(Bytes::from(vec![1u8; records::VALUE_MAX_BYTES + 1])).is_err());
    assert!(decode_key(Bytes::from(vec![1u8; records::KEY_MAX_BYTES + 1])).is_err());
}

/// The migration on real files: a data directory written by an older version opens with its
/// ledgers, and the old file is gone.
#[test]
fn an_old_data_directory_on_disk_migrates() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (bytes, expected) = old_file();
    std::fs::write(dir.path().join(legacy::FILE_NAME), &bytes)?;
    let storage: Arc<dyn Storage> = Arc::new(crate::storage::FsStorage::new());
    let s = OffsetStore::open(storage.clone(), dir.path())?;
    assert_eq!(snapshots(&s), expected);
    assert!(!dir.path().join(legacy::FILE_NAME).exists());
    drop(s);
    assert_eq!(snapshots(&OffsetStore::open(storage, dir.path())?), expected);
    Ok(())
}

/// The offsets log's recovery point is written by the periodic flush once its fsyncs are far
/// enough ahead, and at close, so recovery CRC-scans only what came after it (damage below it
/// is kept and reported, not taken for a torn tail with every later commit cut).
#[test]
fn the_recovery_point_is_checkpointed_by_maintenance_and_at_close() -> TestResult {
    let mem = Arc::new(MemStorage::new());
    let dir = Path::new(DIR);
    const CHECKPOINT: &str = "recovery-point";
    let file = dir.join(LOG_DIR).join(CHECKPOINT);
    let read = |mem: &MemStorage| -> Result<Vec<u8>, Box<dyn Error>> {
        let f = mem.open(&file)?;
        let mut buf = vec![0; f.len()? as usize];
        f.read_exact_at(0, &mut buf)?;
        Ok(buf)
    };
    let s = OffsetStore::open(mem.clone(), dir)?;
    s.commit_blocking(key("g", "t", 0), 5, false)?;
    s.maintain_blocking()?;
    let first = read(&mem)?; // the first one is always written
    s.commit_blocking(key("g", "t", 0), 6, false)?;
    s.maintain_blocking()?;
    assert_eq!(read(&mem)?, first, "written again below the lag");
    // Enough commits to pass the lag: the periodic flush writes it.
    for i in 0..(CHECKPOINT_LAG_BYTES / 64) {
        s.commit_blocking(key("g", "t", 1), 10 + i, false)?;
    }
    s.maintain_blocking()?;
    let after_lag = read(&mem)?;
    assert_ne!(after_lag, first, "not written past the lag");
    s.commit_blocking(key("g", "t", 2), 7, false)?;
    s.close_blocking()?;
    assert_ne!(read(&mem)?, after_lag, "not written at close");
    drop(s);
    mem.crash();
    let s = OffsetStore::open(mem.clone(), dir)?;
    assert_eq!(s.get(&key("g", "t", 2)), Some(7));
    Ok(())
}

/// A coordinator reads a replicated offsets partition (docs/replication.md §10): only up to the
/// high watermark it is given (what lies above may not be committed), stepping over Raft's own
/// entries (control batches), and a follower finds the last complete snapshot's begin offset in
/// what is committed, never in what lies above.
#[test]
fn a_replicated_log_is_read_to_its_high_watermark_past_raft_entries() -> TestResult {
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let (mut log, _) = PartitionLog::open(mem, PathBuf::from("replicated"), LogConfig::default(), 0)?;
    let append = |log: &mut PartitionLog, batches: Vec<ValidatedBatch>| -> Result<u64, LogError> {
        let first = log.next_offset();
        for mut b in batches {
            log.append(&mut b, 1, 0)?;
        }
        Ok(first)
    };
    let ledger = |k: &OffsetKey, floor: u64| {
        let mut w = records::WriteBuilder::new(0);
        w.push(k, Some(&AckLedger::new(floor).snapshot(MAX_PERSISTED_RANGES)));
        w.finish()
    };
    let raft_entry = || {
        let mut b = quiver_protocol::batch::BatchBuilder::new(64).control();
        b.push(-1, Some(&[0u8, 0, 0, 2]), &[], &[]);
        ValidatedBatch::new(b.finish())
    };
    let (a, b) = (key("g", "t", 0), key("g", "t", 1));
    append(&mut log, vec![raft_entry()?])?;
    append(&mut log, ledger(&a, 5))?;
    let begin = append(&mut log, vec![records::marker_batch(records::SNAPSHOT_BEGIN, 0, 0)])?;
    append(&mut log, ledger(&a, 7))?;
    append(&mut log, vec![records::marker_batch(records::SNAPSHOT_COMPLETE, begin, 0)])?;
    append(&mut log, vec![raft_entry()?])?;
    let hw = log.next_offset();
    // Above the high watermark: a newer ledger and a later snapshot, neither committed.
    append(&mut log, ledger(&b, 9))?;
    let later = append(&mut log, vec![records::marker_batch(records::SNAPSHOT_BEGIN, 0, 0)])?;
    append(&mut log, vec![records::marker_batch(records::SNAPSHOT_COMPLETE, later, 0)])?;

    let (live, snapshots) = records::read_log_to(&log, hw)?;
    let floors: HashMap<OffsetKey, u64> = live.ledgers.into_iter().map(|(k, (s, _))| (k, s.floor)).collect();
    assert_eq!(floors, HashMap::from([(a.clone(), 7)]), "b's record lies above the high watermark");
    assert_eq!(snapshots.last_complete, Some(begin));
    assert_eq!(records::last_complete_snapshot(&log, 0, hw), (hw, Some(begin)));
    // Read on from where it stopped once the high watermark moved.
    assert_eq!(
        records::last_complete_snapshot(&log, hw, log.next_offset()),
        (log.next_offset(), Some(later))
    );
    Ok(())
}

/// Membership records (cluster coordinators', docs/replication.md §10): the last record of a
/// group wins, a tombstone deletes it, and a record above the high watermark is not read.
#[test]
fn group_records_read_back_the_last_one_and_a_tombstone_deletes() -> TestResult {
    use quiver_protocol::group::GroupCoordinator;
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let (mut log, _) = PartitionLog::open(mem, PathBuf::from("groups"), LogConfig::default(), 0)?;
    let write = |log: &mut PartitionLog, group: &str, g: Option<&quiver_protocol::group::GroupSnapshot>| {
        let mut w = records::WriteBuilder::new(0);
        w.push_group(group, g);
        for mut b in w.finish() {
            log.append(&mut b, 1, 0)?;
        }
        Ok::<_, LogError>(())
    };
    let mut a = GroupCoordinator::new("t", 4, "n1-1");
    let m = a.join("t", None, 3000, 0)?.member_id;
    write(&mut log, "a", Some(&a.snapshot()))?;
    a.heartbeat(&m, a.generation(), 1)?;
    a.join("t", None, 3000, 2)?;
    write(&mut log, "a", Some(&a.snapshot()))?;
    let b = GroupCoordinator::new("t", 4, "n1-2");
    write(&mut log, "b", Some(&b.snapshot()))?;
    write(&mut log, "b", None)?;
    let hw = log.next_offset();
    write(&mut log, "c", Some(&b.snapshot()))?;

    let (live, _) = records::read_log_to(&log, hw)?;
    assert_eq!(live.groups.len(), 1, "b was deleted, c lies above the high watermark");
    assert_eq!(live.groups.get("a").map(|(g, _)| g), Some(&a.snapshot()));
    assert!(live.ledgers.is_empty());
    let (live, _) = records::read_log(&log)?;
    assert!(live.groups.contains_key("c"));
    Ok(())
}

/// A deleted topic's groups go with its ledgers: their membership records get tombstones in the
/// same write, so a coordinator reading the log later (after a failover) does not restore them
/// into a topic created again under the name. A compaction keeps the other groups' records.
#[test]
fn removing_a_topic_deletes_its_groups_records_and_compaction_keeps_the_rest() -> TestResult {
    use quiver_protocol::group::GroupCoordinator;
    let mem = Arc::new(MemStorage::new());
    let s = OffsetStore::open(mem.clone(), Path::new(DIR))?;
    let group_of = |topic: &str| {
        let mut g = GroupCoordinator::new(topic, 2, "n1-1");
        g.join(topic, None, 3000, 0).map(|_| g.snapshot())
    };
    let (a, b) = (group_of("a")?, group_of("b")?);
    s.record_group_blocking("ga", || Some(a.clone()))?;
    s.record_group_blocking("gb", || Some(b.clone()))?;
    s.commit_blocking(key("ga", "a", 0), 5, false)?;
    s.remove_topic_blocking("a")?;
    let read = || -> Result<Vec<String>, Box<dyn Error>> {
        let (log, _) =
            PartitionLog::open(mem.clone(), Path::new(DIR).join(LOG_DIR), LogConfig::default(), 0)?;
        let (live, _) = records::read_log(&log)?;
        let mut names: Vec<String> = live.groups.keys().map(|g| g.to_string()).collect();
        names.sort();
        Ok(names)
    };
    assert_eq!(read()?, ["gb"], "a's group has its tombstone");
    s.snapshot_locked(&mut s.writer.lock())?;
    assert_eq!(s.groups().into_iter().map(|(g, _)| g.to_string()).collect::<Vec<_>>(), ["gb"]);
    drop(s);
    assert_eq!(read()?, ["gb"], "the compacted log holds b's group only");
    Ok(())
}
