//! Counter semantics shared by every source that reads production counters.
//!
//! A PLC counter only ever goes up, except when it **wraps** (65535 → 0) or
//! is **reset** (PLC restart, shift change, operator). A step downwards that
//! crosses the top by at most `max_step` is a wrap and counts the parts made
//! across it; any other step downwards is a reset: a new epoch starts and the
//! new raw value is counted from zero. `max_step` is the most parts the
//! machine can make between two polls, so it must be set per machine: a
//! reset from near the top to near zero is indistinguishable from a wrap
//! within that window.
//!
//! The state (epoch, last raw value, unwrapped total within the epoch) is
//! the source's cursor: it is stored in the journal in the same batch as the
//! events it produced, and only adopted after that batch is durable. Event
//! ids come from (source, signal, namespace, epoch, total): a re-poll after
//! a crash yields the same id, a wrapped counter never repeats one, and a
//! position created anew (its namespace drawn at the baseline) never
//! repeats an id of a position that was lost.

use serde::{Deserialize, Serialize};

/// Range of the raw counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CounterWidth {
    /// 16-bit (one register).
    U16,
    /// 32-bit (two registers).
    U32,
    /// 64-bit (OPC UA UInt64).
    U64,
}

impl CounterWidth {
    /// Largest raw value before the wrap.
    pub fn max(self) -> u64 {
        match self {
            Self::U16 => u16::MAX as u64,
            Self::U32 => u32::MAX as u64,
            Self::U64 => u64::MAX,
        }
    }
}

/// How to read one counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterRules {
    /// Raw range.
    pub width: CounterWidth,
    /// Most parts plausible between two polls (the wrap window).
    pub max_step: u64,
}

/// A counter's cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    /// Drawn when the position was first created (the baseline) and part
    /// of every id it makes: a position lost and created again cannot
    /// repeat ids. `None` for positions stored before namespaces existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<uuid::Uuid>,
    /// Increments on each reset.
    pub epoch: u32,
    /// Last raw value read.
    pub raw: u64,
    /// Parts counted in this epoch, wraps unrolled (monotonic).
    pub total: u64,
}

/// What a new reading means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// First reading ever: a baseline, no parts attributed (they were made
    /// before this agent watched the counter).
    Baseline,
    /// Same value as before.
    Unchanged,
    /// Counted up normally.
    Increase,
    /// Counted up across the top of the range.
    Wrap,
    /// Went down implausibly: a new epoch, the raw value counted from zero.
    Reset,
}

/// The result of one reading: the new state to store and the parts made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// Classification of the step.
    pub step: Step,
    /// Parts made since the previous reading.
    pub delta: u64,
    /// Raw value of the previous reading (0 after a reset).
    pub previous_raw: u64,
    /// State to store with the events (and adopt once durable).
    pub next: CounterState,
}

impl CounterRules {
    /// Classifies `raw` against the stored state.
    pub fn observe(&self, state: Option<CounterState>, raw: u64) -> Observation {
        let raw = raw.min(self.width.max());
        let Some(state) = state else {
            return Observation {
                step: Step::Baseline,
                delta: 0,
                previous_raw: raw,
                next: CounterState {
                    namespace: Some(buffer::id::new_namespace()),
                    epoch: 0,
                    raw,
                    total: raw,
                },
            };
        };
        let counted = |step, delta: u64, previous_raw, epoch, base: u64| Observation {
            step,
            delta,
            previous_raw,
            next: CounterState {
                namespace: state.namespace,
                epoch,
                raw,
                total: base.saturating_add(delta),
            },
        };
        if raw == state.raw {
            return counted(Step::Unchanged, 0, state.raw, state.epoch, state.total);
        }
        if raw > state.raw {
            return counted(
                Step::Increase,
                raw - state.raw,
                state.raw,
                state.epoch,
                state.total,
            );
        }
        // Down: a wrap if the step across the top is small enough.
        let across_top = (self.width.max() - state.raw)
            .saturating_add(raw)
            .saturating_add(1);
        if across_top <= self.max_step {
            counted(Step::Wrap, across_top, state.raw, state.epoch, state.total)
        } else {
            counted(Step::Reset, raw, 0, state.epoch.wrapping_add(1), 0)
        }
    }
}

/// A measured counter (kg of scrap as a float): it only grows; any drop is
/// a reset (floats have no wrap). The state keeps the last value's bits in
/// `raw`; ids use those bits, unique within an epoch because the value
/// only grows.
pub fn observe_measure(state: Option<CounterState>, value: f64) -> (Step, f64, CounterState) {
    let next = |namespace, epoch| CounterState {
        namespace,
        epoch,
        raw: value.to_bits(),
        total: 0,
    };
    let Some(state) = state else {
        return (
            Step::Baseline,
            0.0,
            next(Some(buffer::id::new_namespace()), 0),
        );
    };
    let previous = f64::from_bits(state.raw);
    if value > previous {
        (
            Step::Increase,
            value - previous,
            next(state.namespace, state.epoch),
        )
    } else if value == previous {
        (Step::Unchanged, 0.0, state)
    } else {
        (
            Step::Reset,
            value.max(0.0),
            next(state.namespace, state.epoch.wrapping_add(1)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RULES16: CounterRules = CounterRules {
        width: CounterWidth::U16,
        max_step: 1000,
    };

    fn state(epoch: u32, raw: u64, total: u64) -> Option<CounterState> {
        Some(CounterState {
            namespace: None,
            epoch,
            raw,
            total,
        })
    }

    #[test]
    fn first_reading_is_a_baseline_without_parts() {
        let o = RULES16.observe(None, 500);
        assert_eq!((o.step, o.delta), (Step::Baseline, 0));
        assert!(
            o.next.namespace.is_some(),
            "a new position gets a namespace"
        );
        assert_eq!((o.next.epoch, o.next.raw, o.next.total), (0, 500, 500));
        assert_ne!(
            RULES16.observe(None, 500).next.namespace,
            o.next.namespace,
            "a position created again never reuses a namespace"
        );
    }

    #[test]
    fn small_step_across_the_top_is_a_wrap_not_a_reset() {
        let o = RULES16.observe(state(2, 65_530, 130_000), 4);
        assert_eq!(o.step, Step::Wrap);
        assert_eq!(o.delta, 10, "65531..=65535 and 0..=4");
        assert_eq!(
            o.next,
            CounterState {
                namespace: None,
                epoch: 2,
                raw: 4,
                total: 130_010
            }
        );
    }

    #[test]
    fn implausible_drop_is_a_reset_that_counts_from_zero() {
        let o = RULES16.observe(state(2, 30_000, 30_000), 7);
        assert_eq!(o.step, Step::Reset);
        assert_eq!(o.delta, 7);
        assert_eq!(
            o.next,
            CounterState {
                namespace: None,
                epoch: 3,
                raw: 7,
                total: 7
            }
        );
    }

    #[test]
    fn thirty_two_bit_counter_wraps_at_its_own_top() {
        let rules = CounterRules {
            width: CounterWidth::U32,
            max_step: 100,
        };
        let o = rules.observe(state(0, u32::MAX as u64 - 1, 5), 3);
        assert_eq!((o.step, o.delta), (Step::Wrap, 5));
    }

    #[test]
    fn measured_counter_counts_growth_and_treats_any_drop_as_a_reset() {
        let (step, delta, st) = observe_measure(None, 1.5);
        assert_eq!((step, delta), (Step::Baseline, 0.0));
        let (step, delta, st) = observe_measure(Some(st), 4.0);
        assert_eq!((step, delta, st.epoch), (Step::Increase, 2.5, 0));
        let (step, delta, st) = observe_measure(Some(st), 0.5);
        assert_eq!((step, delta, st.epoch), (Step::Reset, 0.5, 1));
    }

    proptest! {
        /// Whatever increments the machine makes (each ≤ max_step between
        /// polls), the counted total equals the parts made, across wraps.
        #[test]
        fn counted_total_equals_parts_made_across_wraps(start in 0u64..65_536, steps in proptest::collection::vec(0u64..=1000, 1..200)) {
            let mut st = RULES16.observe(None, start).next;
            let mut raw = start;
            let mut made = 0u64;
            for step in steps {
                raw = (raw + step) % 65_536;
                made += step;
                let o = RULES16.observe(Some(st), raw);
                prop_assert_ne!(o.step, Step::Reset);
                st = o.next;
            }
            prop_assert_eq!(st.total - start, made);
            prop_assert_eq!(st.epoch, 0);
        }
    }
}
