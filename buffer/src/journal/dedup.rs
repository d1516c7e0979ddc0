//! The dedup window: ids appended recently, bounded by count and by age.
//!
//! Ids are kept in groups, one per commit, matching the `d` records on disk,
//! so that evicting a group in memory and deleting its record on disk are
//! the same step. A group is evicted only when the window stays at least
//! `max_count` ids without it, or when its newest id is older than
//! `max_age`: the effective window is never smaller than configured.

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

/// Memory: each id is held twice as 16 bytes (the set and the eviction
/// order), so about 40–70 bytes per id with the tables' slack, plus 16
/// bytes per commit; [`memory_bytes`](Self::memory_bytes) reports it.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    ids: HashSet<u128>,
    /// The same ids in commit order, for eviction.
    order: VecDeque<u128>,
    groups: VecDeque<Group>,
    max_age_ms: u64,
    max_count: usize,
}

impl DedupWindow {
    pub fn new(max_age: Duration, max_count: usize) -> Self {
        Self {
            ids: HashSet::new(),
            order: VecDeque::new(),
            groups: VecDeque::new(),
            max_age_ms: max_age.as_millis() as u64,
            max_count,
        }
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains(&id.as_u128())
    }

    /// Remembers one commit's ids (a commit never holds an id twice).
    pub fn insert_group(&mut self, key: u64, appended_ms: u64, ids: Vec<[u8; 16]>) {
        for id in &ids {
            let id = u128::from_be_bytes(*id);
            self.ids.insert(id);
            self.order.push_back(id);
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
            for id in self.order.drain(..len) {
                self.ids.remove(&id);
            }
            evicted.push(group.key);
        }
        // A burst that has passed leaves no oversized tables behind.
        if self.ids.capacity() > 4 * self.ids.len().max(1024) {
            self.ids.shrink_to_fit();
            self.order.shrink_to_fit();
            self.groups.shrink_to_fit();
        }
        evicted
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Heap bytes the window holds (tables at their current capacity).
    pub fn memory_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket, buckets ≥ capacity × 8/7.
        let buckets = self.ids.capacity() * 8 / 7;
        buckets * (std::mem::size_of::<u128>() + 1)
            + self.order.capacity() * std::mem::size_of::<u128>()
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
        assert!(!window.contains(&Uuid::from_bytes(id(1))));
        assert!(window.contains(&Uuid::from_bytes(id(3))));
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
        assert!(window.contains(&Uuid::from_bytes(id(2))));
        assert_eq!(window.len(), 1);
    }

    #[test]
    fn a_full_window_of_single_event_commits_costs_tens_of_bytes_per_id() {
        let count = 200_000;
        let mut window = DedupWindow::new(Duration::from_secs(24 * 3600), count);
        // Twice the window, one id per commit (the costliest shape), so
        // eviction runs as in steady state.
        for n in 0..2 * count as u128 {
            window.insert_group(n as u64, 0, vec![n.to_be_bytes()]);
            window.evict(0);
        }
        assert_eq!(window.len(), count);
        assert!(!window.contains(&Uuid::from_u128(0)), "the oldest are gone");
        assert!(window.contains(&Uuid::from_u128(2 * count as u128 - 1)));
        let per_id = window.memory_bytes() / count;
        assert!(per_id <= 96, "{per_id} bytes per remembered id");
    }
}
