//! Ring buffers of records in a device (Modbus registers, OPC UA nodes):
//! the index arithmetic every source shares.
//!
//! The device keeps `slots` records, a write index it advances after
//! filling a slot and a read index the agent writes back once the records
//! before it are durable. Both are free-running counts modulo the width
//! of the device's integer (2^16 for a register, 2^32 for a UInt32 node);
//! record `k` is in slot `k mod slots`.
//!
//! # Invariants
//!
//! - A record's identity is the stored ring position's namespace plus its
//!   64-bit count, never its fields ([`RingPosition::id`]).
//! - The device's read index may lag the stored position by at most the
//!   records it still holds (stored before a stop, not yet written back):
//!   those are released, never stored again.
//! - Indexes that match neither (the device restarted without retained
//!   memory, the ring was re-initialised) start a new namespace: a new
//!   fact never gets an old id.
//! - More than `slots` records pending means the device overwrote the
//!   oldest ones (lapped); how many is reported, the rest are taken.

use serde::{Deserialize, Serialize};

/// A ring's stored position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingPosition {
    /// Drawn when the position was created; part of every record id.
    pub namespace: uuid::Uuid,
    /// Records taken so far (the read index, 64 bits wide).
    pub next: u64,
}

impl RingPosition {
    /// A position never used before, at the device's read index.
    pub fn fresh(read_index: u64) -> Self {
        Self {
            namespace: buffer::id::new_namespace(),
            next: read_index,
        }
    }

    /// The read index as the device holds it.
    pub fn device_index(&self, modulus: u64) -> u64 {
        self.next % modulus
    }

    /// Id of the record at count `index` of this position's namespace.
    pub fn id(&self, source: &str, signal: &str, index: u64) -> uuid::Uuid {
        buffer::id::ring_record_id(source, signal, self.namespace, index)
    }
}

/// What one look at a ring's indexes found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingLook {
    /// Where to take from (after skipping overwritten records).
    pub at: RingPosition,
    /// The indexes matched no stored position: a new namespace.
    pub restarted: bool,
    /// Records stored before a stop that the device was not told about.
    pub unreleased: u64,
    /// Records the device overwrote before they were read.
    pub overwritten: u64,
    /// Records readable now, from `at.next`.
    pub pending: u64,
}

/// Compares the device's indexes with the stored position.
pub fn look(
    stored: Option<&RingPosition>,
    written: u64,
    read_back: u64,
    modulus: u64,
    slots: u64,
) -> RingLook {
    let behind = |a: u64, b: u64| (a % modulus + modulus - b % modulus) % modulus;
    let held = behind(written, read_back);
    let (mut at, mut restarted, mut unreleased) = match stored {
        // First sight: what the device says was taken was taken before
        // this agent.
        None => (RingPosition::fresh(read_back), false, 0),
        Some(at) => (at.clone(), false, 0),
    };
    let ahead = behind(at.device_index(modulus), read_back);
    if ahead != 0 {
        if ahead <= slots && ahead <= held {
            unreleased = ahead;
        } else {
            at = RingPosition::fresh(read_back);
            restarted = true;
        }
    }
    let mut pending = behind(written, at.device_index(modulus));
    let mut overwritten = 0;
    if pending > slots {
        overwritten = pending - slots;
        at.next += overwritten;
        pending = slots;
    }
    RingLook {
        at,
        restarted,
        unreleased,
        overwritten,
        pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U16: u64 = 1 << 16;

    #[test]
    fn new_records_are_pending_from_the_stored_position_across_the_index_wrap() {
        let at = RingPosition {
            namespace: uuid::Uuid::nil(),
            next: 3 * U16 + 65_530,
        };
        let found = look(Some(&at), 4, 65_530, U16, 64);
        assert_eq!(found.pending, 10, "65530 → 4 over the wrap");
        assert_eq!(found.at, at);
        assert!(!found.restarted);
    }

    #[test]
    fn records_stored_before_a_stop_are_released_not_taken_again() {
        let at = RingPosition {
            namespace: uuid::Uuid::nil(),
            next: 120,
        };
        // The device still says 100: 20 stored, not yet written back.
        let found = look(Some(&at), 125, 100, U16, 64);
        assert_eq!((found.unreleased, found.pending), (20, 5));
        assert_eq!(found.at.next, 120);
        assert!(!found.restarted);
    }

    #[test]
    fn indexes_that_match_no_stored_position_start_a_new_namespace() {
        let at = RingPosition {
            namespace: uuid::Uuid::nil(),
            next: 1_000,
        };
        // A device restarted without retained memory: 0 and 3.
        let found = look(Some(&at), 3, 0, U16, 64);
        assert!(found.restarted);
        assert_ne!(found.at.namespace, at.namespace);
        assert_eq!((found.at.next, found.pending), (0, 3));
        // Behind by fewer than the slots but with nothing held: also new.
        let found = look(Some(&at), 990, 990, U16, 64);
        assert!(found.restarted, "{found:?}");
    }

    #[test]
    fn a_lapped_ring_reports_what_was_overwritten_and_takes_the_rest() {
        let found = look(None, 40, 0, U16, 16);
        assert_eq!(
            (found.overwritten, found.pending, found.at.next),
            (24, 16, 24)
        );
    }

    #[test]
    fn ids_are_the_position_not_the_fields() {
        let at = RingPosition::fresh(0);
        assert_eq!(at.id("s", "r", 7), at.id("s", "r", 7));
        assert_ne!(at.id("s", "r", 7), at.id("s", "r", 8));
        assert_ne!(at.id("s", "r", 7), RingPosition::fresh(0).id("s", "r", 7));
    }
}
