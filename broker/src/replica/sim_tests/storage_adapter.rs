//! `LogStorage` on its own, over the simulator's log settings.

use super::*;

/// The storage adapter on its own: Raft's own entries come back as Raft entries, terms and
/// indexes map to epochs and ordinals, a conflicting suffix is truncated, and the answers
/// raft-rs relies on are errors, not panics.
#[test]
fn storage_maps_entries_to_batches_and_back() -> Result<(), Error> {
    use raft::eraftpb::{Entry, EntryType};
    let mem = Arc::new(MemStorage::new());
    let storage: Arc<dyn Storage> = mem.clone();
    let (log, _) = PartitionLog::open(storage.clone(), DIR.into(), log_config(), 0)?;
    let mut store = LogStorage::open(Arc::new(Mutex::new(log)), storage, &[1, 2, 3])?;
    assert_eq!((store.first_index()?, store.last_index()?, store.term(0)?), (1, 0, 0));
    assert!(store.initial_state()?.initialized());

    let entry = |index, term, kind, data: &[u8]| {
        let mut e = Entry::default();
        e.set_index(index);
        e.set_term(term);
        e.set_entry_type(kind);
        e.set_data(Bytes::copy_from_slice(data));
        e
    };
    let mut b = BatchBuilder::new(64);
    b.push(5, None, b"hello", &[]);
    b.push(6, None, b"world", &[]);
    let user = b.finish();
    let written = [
        entry(1, 1, EntryType::EntryNormal, b""),
        entry(2, 1, EntryType::EntryNormal, &user),
        entry(3, 2, EntryType::EntryConfChangeV2, b"cc"),
        entry(4, 2, EntryType::EntryNormal, &user),
    ];
    store.append(&written, 0)?;
    assert_eq!((store.first_index()?, store.last_index()?), (1, 4));
    assert_eq!([store.term(1)?, store.term(2)?, store.term(3)?, store.term(4)?], [1, 1, 2, 2]);
    let read = store.entries(1, 5, None, raft::GetEntriesContext::empty(false))?;
    assert_eq!(read.len(), 4);
    for (r, w) in read.iter().zip(&written) {
        assert_eq!(
            (r.get_index(), r.get_term(), r.get_entry_type()),
            (w.get_index(), w.get_term(), w.get_entry_type())
        );
    }
    assert!(read[0].get_data().is_empty());
    assert_eq!(read[2].get_data(), b"cc");
    // The user batch is stored stamped: offsets 1..3 (the leader-change record took offset 0).
    let h = BatchHeader::parse(read[1].get_data())?;
    assert_eq!((h.base_offset, h.leader_epoch, h.records_count), (1, 1, 2));
    assert_eq!(BatchHeader::parse(read[3].get_data())?.base_offset, 4);
    // A size limit still returns one entry.
    assert_eq!(store.entries(2, 5, 1, raft::GetEntriesContext::empty(false))?.len(), 1);
    // Out of range: errors raft-rs expects, never a panic.
    assert!(matches!(
        store.entries(1, 6, None, raft::GetEntriesContext::empty(false)),
        Err(raft::Error::Store(raft::StorageError::Unavailable))
    ));
    assert!(matches!(store.term(5), Err(raft::Error::Store(raft::StorageError::Unavailable))));
    assert!(matches!(
        store.entries(0, 2, None, raft::GetEntriesContext::empty(false)),
        Err(raft::Error::Store(raft::StorageError::Compacted))
    ));

    // A new leader's entries conflict from index 3: truncated, then appended.
    let mut hs = store.hard_state().clone();
    hs.set_commit(2);
    store.set_hard_state(&hs)?;
    // The persisted commit never passes what was handed out and applied (§11).
    store.flush_commit()?;
    assert_eq!(store.hard_state().get_commit(), 0, "nothing applied yet");
    store.set_applied(2);
    store.flush_commit()?;
    store
        .append(&[entry(3, 3, EntryType::EntryNormal, b""), entry(4, 3, EntryType::EntryNormal, &user)], 0)?;
    assert_eq!((store.last_index()?, store.term(3)?, store.term(4)?), (4, 3, 3));
    // Never at or below the commit; never with a gap; never a control batch as user data.
    assert!(matches!(
        store.append(&[entry(2, 3, EntryType::EntryNormal, b"")], 0),
        Err(ReplicaError::TruncateCommitted { .. })
    ));
    assert!(matches!(
        store.append(&[entry(6, 3, EntryType::EntryNormal, b"")], 0),
        Err(ReplicaError::Gap { .. })
    ));
    let log = store.log().lock();
    let leader_change = batch_at(&log, 3)?;
    drop(log);
    assert!(matches!(
        store.append(&[entry(5, 3, EntryType::EntryNormal, &leader_change)], 0),
        Err(ReplicaError::UnsupportedEntry(_))
    ));
    assert!(matches!(
        store.append(&[entry(5, 3, EntryType::EntryConfChange, b"x")], 0),
        Err(ReplicaError::UnsupportedEntry(_))
    ));

    // Everything synced survives a crash, hard state and configuration included.
    let mut cs = store.initial_state()?.conf_state;
    cs.set_learners(vec![4]);
    store.set_conf_state(cs.clone(), 4)?;
    mem.crash();
    let storage: Arc<dyn Storage> = mem.clone();
    let (log, _) = PartitionLog::open(storage.clone(), Path::new(DIR).into(), log_config(), 0)?;
    let store = LogStorage::open(Arc::new(Mutex::new(log)), storage, &[1, 2, 3])?;
    assert_eq!((store.last_index()?, store.term(4)?, store.hard_state().get_commit()), (4, 3, 2));
    assert_eq!(store.initial_state()?.conf_state, cs);
    Ok(())
}
