//! Counter events held back for the counter window: the polls of one
//! window become one event per counter, stored at the window's end.
//!
//! Invariants:
//! - Nothing held is acknowledged to anyone: a counter's value stays in the
//!   PLC, so a crash before the store only means the next start reads the
//!   counter again from the stored position (same ids for what was stored,
//!   the parts since counted once).
//! - A held event covers consecutive readings of one counter in one epoch
//!   with the same work order, material and lot: the readings at both
//!   ends stay in it (`previous` of the first, `value` of the last) and its
//!   id is that of the last reading's total, so it is the event the last
//!   poll would have made had the earlier ones not been held.
//! - Windows are aligned to the clock and divide a second, so no window
//!   spans a checkpoint period's end: what is held is stored before the
//!   period closes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use buffer::{CloudEvent, Quantity};

use crate::counter::CounterState;

/// One counter reading's part of a period's tally, replayed at the store.
#[derive(Clone, Debug)]
pub(super) struct HeldReading {
    pub line: String,
    pub signal: String,
    pub previous: Option<CounterState>,
    pub next: CounterState,
    pub delta: u64,
    pub reset: bool,
    pub across_gap: bool,
    pub at: SystemTime,
}

/// What the polls of one window made and have not stored yet.
#[derive(Debug)]
pub(super) struct Held {
    /// The window (clock milliseconds / window length).
    pub window: u64,
    /// Work order, material and lot the events were stamped with.
    pub context: BTreeMap<String, String>,
    /// Counter states after the last held reading.
    pub counters: BTreeMap<String, CounterState>,
    /// Readings to add to the period tallies, in order.
    pub readings: Vec<HeldReading>,
    /// One event per counter signal, with the time of its last reading.
    pub events: Vec<(String, CloudEvent, SystemTime)>,
}

/// The window `at` falls in.
pub(super) fn window_of(window: Duration, at: SystemTime) -> u64 {
    let ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms / (window.as_millis() as u64).max(1)
}

fn epoch_of(event: &CloudEvent) -> Option<u32> {
    event.data.counter.map(|c| c.epoch)
}

impl Held {
    /// An empty hold for `window`.
    pub(super) fn new(window: u64, context: BTreeMap<String, String>) -> Self {
        Self {
            window,
            context,
            counters: BTreeMap::new(),
            readings: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Whether a poll's events can join what is held: same window, same
    /// context, and each counter still in the epoch its held event is in.
    pub(super) fn accepts(
        &self,
        window: u64,
        context: &BTreeMap<String, String>,
        events: &[(String, CloudEvent)],
    ) -> bool {
        self.window == window
            && self.context == *context
            && events.iter().all(|(signal, event)| {
                self.events
                    .iter()
                    .find(|(held, ..)| held == signal)
                    .is_none_or(|(_, held, _)| epoch_of(held) == epoch_of(event))
            })
    }

    /// Adds one poll's event for `signal`: the first one is held as it is,
    /// later ones extend it.
    pub(super) fn add(&mut self, signal: String, event: CloudEvent, at: SystemTime) {
        let Some((_, held, held_at)) = self.events.iter_mut().find(|(s, ..)| *s == signal) else {
            self.events.push((signal, event, at));
            return;
        };
        held.data.quantity = match (held.data.quantity, event.data.quantity) {
            (Quantity::Count(a), Quantity::Count(b)) => Quantity::Count(a + b),
            (a, b) => Quantity::Measure(as_f64(a) + as_f64(b)),
        };
        if let (Some(counter), Some(later)) = (&mut held.data.counter, event.data.counter) {
            counter.value = later.value;
            counter.epoch = later.epoch;
        }
        held.id = event.id;
        held.sequence = event.sequence;
        held.time = event.time;
        *held_at = at;
    }
}

fn as_f64(quantity: Quantity) -> f64 {
    match quantity {
        Quantity::Count(n) => n as f64,
        Quantity::Measure(x) => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn event(delta: u64, previous: u64, value: u64, epoch: u32, total: u64) -> CloudEvent {
        serde_json::from_value(serde_json::json!({
            "specversion": "1.0",
            "id": uuid::Uuid::from_u128(u128::from(total)),
            "source": "urn:plant-edge:p:g:press",
            "type": "production.completion",
            "time": format!("2026-12-04T10:00:{:02}.000Z", total % 60),
            "datacontenttype": "application/json",
            "sequence": total.to_string(),
            "data": {
                "site": "p", "line": "L1", "machine": "m1", "quantity": delta, "unit": "pcs",
                "counter": {"value": value, "previous": previous, "epoch": epoch},
                "origin": {"protocol": "modbus", "endpoint": "tcp://plc", "address": "holding:0", "quality": "good"},
                "attributes": {}
            }
        }))
        .expect("a CloudEvent")
    }

    #[test]
    fn polls_of_one_window_become_one_event_with_both_readings_and_the_last_id() {
        let mut held = Held::new(7, BTreeMap::new());
        let at = SystemTime::UNIX_EPOCH;
        held.add("good".into(), event(3, 10, 13, 0, 103), at);
        assert!(held.accepts(
            7,
            &BTreeMap::new(),
            &[("good".into(), event(2, 13, 15, 0, 105))]
        ));
        held.add("good".into(), event(2, 13, 15, 0, 105), at);
        held.add("good".into(), event(65_530, 15, 9, 0, 65_635), at);
        let (_, merged, _) = &held.events[0];
        assert_eq!(merged.data.quantity, Quantity::Count(65_535));
        let counter = merged.data.counter.expect("counter");
        assert_eq!((counter.previous, counter.value, counter.epoch), (10, 9, 0));
        assert_eq!(merged.id, uuid::Uuid::from_u128(65_635));
        assert_eq!(merged.sequence.as_deref(), Some("65635"));
        // Another epoch (a reset), another window or work order: not merged.
        assert!(!held.accepts(
            7,
            &BTreeMap::new(),
            &[("good".into(), event(1, 0, 1, 1, 1))]
        ));
        assert!(!held.accepts(8, &BTreeMap::new(), &[]));
        let order = BTreeMap::from([("work_order".to_owned(), "WO-2".to_owned())]);
        assert!(!held.accepts(7, &order, &[]));
    }

    #[test]
    fn windows_are_aligned_to_the_clock() {
        let second = Duration::from_secs(1);
        let at = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(window_of(second, at(1_999)), window_of(second, at(1_000)));
        assert_ne!(window_of(second, at(2_000)), window_of(second, at(1_999)));
    }
}
