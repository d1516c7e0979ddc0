//! The dedup window: ids appended recently, bounded by count and by age.
//!
//! Ids are kept in groups, one per commit, matching the `d` records on disk,
//! so that evicting a group in memory and deleting its record on disk are
//! the same step. A group is evicted only when the window stays at least
//! `max_count` ids without it, or when its newest id is older than
//! `max_age`: the effective window is never smaller than configured.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use uuid::Uuid;

#[derive(Debug)]
struct Group {
    key: u64,
    appended_ms: u64,
    ids: Vec<[u8; 16]>,
}

#[derive(Debug)]
pub(crate) struct DedupWindow {
    ids: HashMap<Uuid, u64>,
    groups: VecDeque<Group>,
    total: usize,
    max_age_ms: u64,
    max_count: usize,
}

impl DedupWindow {
    pub fn new(max_age: Duration, max_count: usize) -> Self {
        Self {
            ids: HashMap::new(),
            groups: VecDeque::new(),
            total: 0,
            max_age_ms: max_age.as_millis() as u64,
            max_count,
        }
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains_key(id)
    }

    pub fn insert_group(&mut self, key: u64, appended_ms: u64, ids: Vec<[u8; 16]>) {
        for id in &ids {
            self.ids.insert(Uuid::from_bytes(*id), key);
        }
        self.total += ids.len();
        self.groups.push_back(Group {
            key,
            appended_ms,
            ids,
        });
    }

    /// Evicts groups that fell out of the window; returns their keys so the
    /// caller deletes their records in the same batch.
    pub fn evict(&mut self, now_ms: u64) -> Vec<u64> {
        let mut evicted = Vec::new();
        while let Some(oldest) = self.groups.front() {
            let too_many = self.total - oldest.ids.len() >= self.max_count;
            let too_old = oldest.appended_ms + self.max_age_ms < now_ms;
            if !(too_many || too_old) {
                break;
            }
            let Some(group) = self.groups.pop_front() else {
                break;
            };
            for id in &group.ids {
                let id = Uuid::from_bytes(*id);
                if self.ids.get(&id) == Some(&group.key) {
                    self.ids.remove(&id);
                }
            }
            self.total -= group.ids.len();
            evicted.push(group.key);
        }
        evicted
    }

    pub fn len(&self) -> usize {
        self.ids.len()
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
        let mut window = DedupWindow::new(Duration::from_millis(100), 1000);
        window.insert_group(0, 1_000, vec![id(1)]);
        window.insert_group(1, 1_050, vec![id(2)]);
        assert_eq!(window.evict(1_120), vec![0]);
        assert!(window.contains(&Uuid::from_bytes(id(2))));
        assert_eq!(window.len(), 1);
    }
}
