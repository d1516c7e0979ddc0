//! The dedup window: ids appended recently, bounded by count and by age.
//!
//! Ids are kept in groups, one per commit, matching the `d` records on disk,
//! so that evicting a group in memory and deleting its record on disk are
//! the same step. A group is evicted only when the window stays at least
//! `max_count` ids without it, or when its newest id is older than
//! `max_age`: the effective window is never smaller than configured.
//!
//! Memory holds a 64-bit fingerprint per id, not the id: a filter in front
//! of an exact check. A fingerprint that matches is only a suspicion
//! ([`Seen::Maybe`]): the caller reads the group's `d` record and compares
//! the whole id, so two facts whose fingerprints collide are both stored,
//! never one taken for the other's repeat.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use uuid::Uuid;

/// One commit's place in the window.
#[derive(Debug)]
struct Group {
    /// First seq of the commit: names its `d` record on disk.
    key: u64,
    /// Seconds since the epoch (the window's age is counted in hours).
    appended_s: u32,
    /// How many ids of `order` it owns (from the front).
    len: u32,
}

/// Whether an id may be in the window.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Certainly not remembered.
    No,
    /// Its fingerprint is remembered, in the commits whose `d` records have
    /// these keys (newest first; more than one only after a collision):
    /// one of them holds the id if it is a repeat.
    Maybe(Vec<u64>),
}

/// Memory: 8 bytes per id in the set (plus a control byte and the table's
/// slack) and 8 in the eviction order, so about 20–30 bytes per id, plus
/// 16 bytes per commit; [`memory_bytes`](Self::memory_bytes) reports it.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    fingerprints: HashSet<u64>,
    /// The same fingerprints in commit order, for eviction.
    order: VecDeque<u64>,
    groups: VecDeque<Group>,
    max_age_ms: u64,
    max_count: usize,
}

/// Both halves folded, the high one multiplied first so that ids whose
/// halves are equal do not all fold to zero; every id bit stays in play.
fn fingerprint(id: u128) -> u64 {
    ((id >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ id as u64
}

impl DedupWindow {
    pub fn new(max_age: Duration, max_count: usize) -> Self {
        Self {
            fingerprints: HashSet::new(),
            order: VecDeque::new(),
            groups: VecDeque::new(),
            max_age_ms: max_age.as_millis() as u64,
            max_count,
        }
    }

    /// Whether `id` may be remembered, and in which commit's record.
    pub fn check(&self, id: &Uuid) -> Seen {
        let fingerprint = fingerprint(id.as_u128());
        if !self.fingerprints.contains(&fingerprint) {
            return Seen::No;
        }
        // Rare (a repeat, or a collision): a scan is fine.
        let mut records = Vec::new();
        let mut start = 0;
        for group in &self.groups {
            let end = start + group.len as usize;
            if self.order.range(start..end).any(|f| *f == fingerprint) {
                records.push(group.key);
            }
            start = end;
        }
        records.reverse();
        if records.is_empty() {
            Seen::No
        } else {
            Seen::Maybe(records)
        }
    }

    /// Remembers one commit's ids (a commit never holds an id twice).
    pub fn insert_group(&mut self, key: u64, appended_ms: u64, ids: Vec<[u8; 16]>) {
        for id in &ids {
            let fingerprint = fingerprint(u128::from_be_bytes(*id));
            self.fingerprints.insert(fingerprint);
            self.order.push_back(fingerprint);
        }
        self.groups.push_back(Group {
            key,
            // Rounded up: a group is never forgotten early.
            appended_s: appended_ms.div_ceil(1000).min(u64::from(u32::MAX)) as u32,
            len: ids.len() as u32,
        });
    }

    /// Evicts groups that fell out of the window; returns their keys so the
    /// caller deletes their records in the same batch.
    pub fn evict(&mut self, now_ms: u64) -> Vec<u64> {
        let mut evicted = Vec::new();
        while let Some(oldest) = self.groups.front() {
            let len = oldest.len as usize;
            let too_many = self.order.len() - len >= self.max_count;
            let too_old = u64::from(oldest.appended_s) * 1000 + self.max_age_ms < now_ms;
            if !(too_many || too_old) {
                break;
            }
            let Some(group) = self.groups.pop_front() else {
                break;
            };
            // A fingerprint two remembered ids share (a collision, about
            // one in 2^64 per pair) goes with the older one: the newer id
            // is then forgotten early, and a repeat of it would be stored
            // again with its own id, which the ERP posts once.
            for fingerprint in self.order.drain(..len) {
                self.fingerprints.remove(&fingerprint);
            }
            evicted.push(group.key);
        }
        // A burst that has passed leaves no oversized tables behind.
        if self.fingerprints.capacity() > 4 * self.fingerprints.len().max(1024) {
            self.fingerprints.shrink_to_fit();
            self.order.shrink_to_fit();
            self.groups.shrink_to_fit();
        }
        evicted
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Heap bytes the window holds (tables at their current capacity).
    pub fn memory_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket, buckets ≥ capacity × 8/7.
        let buckets = self.fingerprints.capacity() * 8 / 7;
        buckets * (std::mem::size_of::<u64>() + 1)
            + self.order.capacity() * std::mem::size_of::<u64>()
            + self.groups.capacity() * std::mem::size_of::<Group>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> [u8; 16] {
        [n; 16]
    }

    #[test]
    fn window_keeps_at_least_max_count_ids() {
        let mut window = DedupWindow::new(Duration::from_secs(3600), 3);
        window.insert_group(0, 0, vec![id(1), id(2)]);
        window.insert_group(2, 0, vec![id(3), id(4)]);
        assert!(
            window.evict(0).is_empty(),
            "4 ids without group 0 would be 2 < 3"
        );
        window.insert_group(4, 0, vec![id(5)]);
        assert_eq!(window.evict(0), vec![0]);
        assert_eq!(window.check(&Uuid::from_bytes(id(1))), Seen::No);
        assert_eq!(window.check(&Uuid::from_bytes(id(3))), Seen::Maybe(vec![2]));
    }

    #[test]
    fn window_forgets_ids_older_than_max_age() {
        let mut window = DedupWindow::new(Duration::from_secs(100), 1000);
        window.insert_group(0, 1_000_000, vec![id(1)]);
        window.insert_group(1, 1_050_000, vec![id(2)]);
        assert!(
            window.evict(1_100_000).is_empty(),
            "not older than 100 s yet"
        );
        assert_eq!(window.evict(1_101_000), vec![0]);
        assert_eq!(window.check(&Uuid::from_bytes(id(2))), Seen::Maybe(vec![1]));
        assert_eq!(window.len(), 1);
    }

    #[test]
    fn ids_sharing_a_fingerprint_are_only_a_suspicion_naming_their_commits() {
        let mut window = DedupWindow::new(Duration::from_secs(3600), 100);
        // Another high half, and the low half that makes the fold equal.
        let a: u128 = (7 << 64) | 9;
        let b: u128 =
            (8 << 64) | u128::from(fingerprint(a) ^ 8u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        assert_ne!(a, b);
        assert_eq!(fingerprint(a), fingerprint(b));
        window.insert_group(10, 0, vec![a.to_be_bytes()]);
        window.insert_group(20, 0, vec![id(1), id(2)]);
        assert_eq!(window.check(&Uuid::from_u128(b)), Seen::Maybe(vec![10]));
        assert_eq!(
            window.check(&Uuid::from_bytes(id(2))),
            Seen::Maybe(vec![20])
        );
    }

    #[test]
    fn a_journal_stores_both_ids_of_a_fingerprint_collision_and_still_drops_a_repeat() {
        use crate::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = JournalConfig::new(dir.path().join("journal"));
        config.sinks = vec!["erp".into()];
        let journal = Journal::open(config).expect("open");
        let a: u128 = (7 << 64) | 9;
        let b: u128 =
            (8 << 64) | u128::from(fingerprint(a) ^ 8u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        assert_eq!(fingerprint(a), fingerprint(b));
        let append = |id: u128| {
            journal
                .append_blocking(AppendRequest {
                    source: "s".into(),
                    events: vec![NewEvent {
                        id: Uuid::from_u128(id),
                        class: EventClass::Business,
                        routes: journal.routes_all(),
                        payload: b"{}".to_vec(),
                        ledger: None,
                    }],
                    cursor: None,
                })
                .expect("append")
                .expect("fits")
                .appended()
        };
        assert_eq!(append(a), 1);
        assert_eq!(
            append(b),
            1,
            "a new fact whose fingerprint collides is stored"
        );
        assert_eq!(append(a), 0, "a repeat is still a repeat");
        assert_eq!(append(b), 0);
        assert_eq!(journal.stats().pending_events, 2);
    }

    /// Fills a window twice over with commits of `per_commit` ids (so
    /// eviction runs as in steady state); returns bytes per remembered id.
    fn bytes_per_id_when_full(per_commit: u128) -> usize {
        let count = 200_000;
        let mut window = DedupWindow::new(Duration::from_secs(24 * 3600), count);
        let mut n = 0u128;
        while n < 2 * count as u128 {
            let ids = (n..n + per_commit).map(u128::to_be_bytes).collect();
            window.insert_group(n as u64, 0, ids);
            window.evict(0);
            n += per_commit;
        }
        assert_eq!(window.len(), count);
        assert_eq!(
            window.check(&Uuid::from_u128(0)),
            Seen::No,
            "the oldest are gone"
        );
        let newest = n - 1;
        let commit = (newest - newest % per_commit) as u64;
        assert_eq!(
            window.check(&Uuid::from_u128(newest)),
            Seen::Maybe(vec![commit])
        );
        window.memory_bytes() / count
    }

    #[test]
    fn a_full_window_costs_tens_of_bytes_per_id() {
        // One id per commit: the costliest shape (a group per id).
        let single = bytes_per_id_when_full(1);
        assert!(single <= 64, "{single} bytes per id, one per commit");
        // Ten per commit: counter polls sharing the commit window.
        let shared = bytes_per_id_when_full(10);
        assert!(shared <= 40, "{shared} bytes per id, ten per commit");
    }
}
