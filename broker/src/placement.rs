//! Replica placement by rendezvous hashing (highest random weight; docs/replication.md §6).
//!
//! For a partition, every broker gets a weight, a hash of the partition's name and the broker's
//! id; the partition's replicas are the brokers with the highest weights, in weight order, and
//! the first is its preferred leader. Every broker computes the same answer from the same
//! broker set, with no shared table, and a change of the set moves only what it must: a new
//! broker takes the replicas for which it now outweighs the lowest of the old ones (about
//! `R / N` of them), a removed broker's replicas go each to the next broker in that partition's
//! order, and nothing else moves. The controller records the result in its log (issue 17);
//! this module is the pure function.
//!
//! The hash is XXH3-64, whose output is fixed by its specification, so placement never changes
//! with a compiler, platform or library version.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A broker's id (`--node-id`).
pub type BrokerId = u64;

/// The weight of `broker` for `topic`/`partition`: the topic's name and the partition hashed
/// with the broker id as the seed, then mixed once more so that consecutive ids do not give
/// correlated weights.
pub fn weight(topic: &str, partition: u32, broker: BrokerId) -> u64 {
    let mut key = Vec::with_capacity(topic.len() + 5);
    key.extend_from_slice(topic.as_bytes());
    key.push(0); // topic names never hold a NUL: "a" + 12 and "a1" + 2 differ
    key.extend_from_slice(&partition.to_le_bytes());
    xxh3_64_with_seed(&key, broker.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The `replicas` brokers of `brokers` that hold `topic`/`partition`, highest weight first
/// (the first is the preferred leader). Fewer if there are fewer brokers; duplicate ids count
/// once. Ties (a 2^-64 event) go to the lower id, so the order is total.
pub fn replicas(topic: &str, partition: u32, brokers: &[BrokerId], replicas: usize) -> Vec<BrokerId> {
    let mut weighted: Vec<(u64, BrokerId)> =
        brokers.iter().map(|&b| (weight(topic, partition, b), b)).collect();
    weighted.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    weighted.dedup_by_key(|w| w.1);
    weighted.into_iter().take(replicas).map(|(_, b)| b).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn place_all(brokers: &[BrokerId], partitions: u32, r: usize) -> Vec<Vec<BrokerId>> {
        (0..partitions).map(|p| replicas("orders", p, brokers, r)).collect()
    }

    fn counts(placed: &[Vec<BrokerId>], leaders_only: bool) -> HashMap<BrokerId, usize> {
        let mut c = HashMap::new();
        for rs in placed {
            let take = if leaders_only { 1 } else { rs.len() };
            for b in &rs[..take] {
                *c.entry(*b).or_default() += 1;
            }
        }
        c
    }

    /// `weight("orders", 0, 1)`, as every broker of every version must compute it.
    const GOLDEN_WEIGHT: u64 = 17_925_961_776_960_227_380;

    #[test]
    fn replicas_are_distinct_ordered_and_the_same_everywhere() {
        let brokers = [1, 2, 3, 4, 5];
        for p in 0..100 {
            let rs = replicas("t", p, &brokers, 3);
            assert_eq!(rs.len(), 3);
            let mut sorted = rs.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 3, "distinct: {rs:?}");
            // The order of the broker list does not matter.
            assert_eq!(replicas("t", p, &[5, 3, 1, 4, 2, 3], 3), rs);
        }
        assert_eq!(replicas("t", 0, &[7, 9], 3).len(), 2, "fewer brokers than replicas");
        assert!(replicas("t", 0, &[], 3).is_empty());
        // Fixed by XXH3's specification: a change here moves every partition of every cluster.
        assert_eq!(weight("orders", 0, 1), GOLDEN_WEIGHT, "the weight function changed");
        assert_ne!(weight("a", 12, 1), weight("a1", 2, 1), "name and partition do not run together");
    }

    /// Replicas and preferred leaders spread evenly: over 3,000 partitions each broker's share
    /// is within 15 % of the mean, for 3, 5 and 10 brokers.
    #[test]
    fn replicas_and_leaders_spread_evenly() {
        for n in [3u64, 5, 10] {
            let brokers: Vec<BrokerId> = (1..=n).collect();
            let placed = place_all(&brokers, 3000, 3);
            for (what, leaders_only) in [("replicas", false), ("leaders", true)] {
                let c = counts(&placed, leaders_only);
                let total: usize = c.values().sum();
                let mean = total as f64 / n as f64;
                for b in &brokers {
                    let got = *c.get(b).unwrap_or(&0) as f64;
                    assert!(
                        (got - mean).abs() <= 0.15 * mean,
                        "{n} brokers: broker {b} has {got} {what}, mean {mean}"
                    );
                }
            }
        }
    }

    /// Adding a broker moves only replicas to it, about R/(N+1) of them; removing one moves
    /// only its own replicas, and each partition keeps the order of the others.
    #[test]
    fn adding_or_removing_a_broker_moves_few_partitions() {
        let (partitions, r) = (3000u32, 3usize);
        let five: Vec<BrokerId> = (1..=5).collect();
        let six: Vec<BrokerId> = (1..=6).collect();
        let before = place_all(&five, partitions, r);
        let after = place_all(&six, partitions, r);
        let mut moved = 0usize;
        for (b, a) in before.iter().zip(&after) {
            let gone: Vec<_> = b.iter().filter(|x| !a.contains(x)).collect();
            let came: Vec<_> = a.iter().filter(|x| !b.contains(x)).collect();
            assert!(came.iter().all(|&&x| x == 6), "only the new broker gains: {b:?} -> {a:?}");
            assert!(gone.len() <= 1 && gone.len() == came.len(), "{b:?} -> {a:?}");
            moved += came.len();
        }
        let expected = partitions as f64 * r as f64 / 6.0;
        let ratio = moved as f64 / expected;
        assert!((0.85..=1.15).contains(&ratio), "moved {moved} replicas, about {expected} expected");

        // Removing broker 3: partitions without it keep their replicas exactly.
        let without: Vec<BrokerId> = five.iter().copied().filter(|&b| b != 3).collect();
        for (p, b) in before.iter().enumerate() {
            let a = replicas("orders", p as u32, &without, r);
            if !b.contains(&3) {
                assert_eq!(&a, b, "partition {p} did not hold broker 3 and must not move");
            } else {
                let kept: Vec<_> = b.iter().copied().filter(|&x| x != 3).collect();
                assert_eq!(&a[..kept.len()], &kept[..], "the others keep their order");
            }
        }
    }
}
