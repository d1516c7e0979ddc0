//! Reconciliation periods: shifts at local start times in an IANA time zone,
//! or fixed periods, and the per-line tally a source keeps over one period.
//!
//! Invariants:
//! - Every instant lies in exactly one period; periods are half-open
//!   `[start, end)` and follow each other without gap or overlap, so a
//!   day with a DST change has 23- or 25-hour totals, never a lost or
//!   double-counted hour.
//! - A period is attributed by the gateway's read time of the poll that
//!   made its events, and closed by the first poll at or after its end:
//!   the tally closed is exactly the events stored before that poll.
//! - The tally is part of the source's stored position, written in the same
//!   batch as the events it counts, so a crash neither loses nor repeats a
//!   checkpoint: its id is a function of source, line and period start.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use buffer::{CloudEvent, EventData, EventType, Origin, Quantity};
use serde::{Deserialize, Serialize};

use crate::counter::CounterState;

/// Event type of a period's totals.
pub const CHECKPOINT: &str = "production.checkpoint";

/// A source's checkpoints: its periods and the sinks its checkpoint
/// events go to (a subset of the source's own).
#[derive(Clone, Debug)]
pub struct Checkpointing {
    /// How time is cut into periods.
    pub rule: PeriodRule,
    /// Sinks that take checkpoint events: those sending CloudEvents, and
    /// templated ones only when named (a template written for completions
    /// must not post a period's total as one).
    pub routes: buffer::Routes,
}

/// How time is cut into periods.
#[derive(Clone, Debug)]
pub enum PeriodRule {
    /// Shifts starting at these local times (sorted, distinct) in a zone.
    Shifts {
        /// Local start times.
        starts: Vec<jiff::civil::Time>,
        /// The plant's zone.
        zone: jiff::tz::TimeZone,
    },
    /// Fixed periods, aligned to the Unix epoch (UTC).
    Every(Duration),
}

impl PeriodRule {
    /// Parses the configuration's form: shift start times (`"06:00"`) with
    /// a zone, or a fixed length. `Err` says what was expected.
    pub fn shifts(starts: &[String], zone: &str) -> Result<Self, String> {
        let zone = crate::render::plant_zone(Some(zone))?;
        let mut times = Vec::with_capacity(starts.len());
        for text in starts {
            let time: jiff::civil::Time = text
                .parse()
                .map_err(|_| format!("local start times such as \"06:00\", found {text:?}"))?;
            times.push(time);
        }
        times.sort();
        times.dedup();
        if times.is_empty() {
            return Err("at least one shift start time such as \"06:00\"".into());
        }
        Ok(Self::Shifts {
            starts: times,
            zone,
        })
    }

    /// The period `[start, end)` containing `at`.
    pub fn period_of(&self, at: SystemTime) -> (SystemTime, SystemTime) {
        match self {
            Self::Every(length) => {
                let length_ms = (length.as_millis() as u64).max(1000);
                let ms = millis(at);
                let start = ms - ms % length_ms;
                (from_millis(start), from_millis(start + length_ms))
            }
            Self::Shifts { starts, zone } => {
                let ts = jiff::Timestamp::from_millisecond(millis(at) as i64)
                    .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
                let today = ts.to_zoned_datetime(zone.clone()).date();
                // Shift starts from the day before to the day after: with
                // one start a day, the period containing `at` may have
                // begun yesterday and end tomorrow.
                let mut instants = Vec::with_capacity(starts.len() * 3);
                for date in [today.yesterday().ok(), Some(today), today.tomorrow().ok()]
                    .into_iter()
                    .flatten()
                {
                    for start in starts {
                        if let Ok(t) = zone.to_timestamp(start.to_datetime(date)) {
                            instants.push(t.as_millisecond().max(0) as u64);
                        }
                    }
                }
                instants.sort_unstable();
                instants.dedup();
                let ms = millis(at);
                let start = instants.iter().rev().find(|s| **s <= ms).copied();
                let end = instants.iter().find(|s| **s > ms).copied();
                match (start, end) {
                    (Some(s), Some(e)) => (from_millis(s), from_millis(e)),
                    // Only at the ends of jiff's range: one day as a period.
                    _ => {
                        let s = ms - ms % 86_400_000;
                        (from_millis(s), from_millis(s + 86_400_000))
                    }
                }
            }
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn millis(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// A counter reading as the checkpoint reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    /// The PLC's raw value.
    pub raw: u64,
    /// Reset epoch.
    pub epoch: u32,
}

impl From<CounterState> for Reading {
    fn from(state: CounterState) -> Self {
        Self {
            raw: state.raw,
            epoch: state.epoch,
        }
    }
}

/// One counter signal over a period.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterTally {
    /// Reading when the period started (the last one before it, or the
    /// first one in it).
    pub start: Reading,
    /// Latest reading in the period.
    pub end: Reading,
    /// Parts the PLC counted over the period, through wraps and resets.
    pub counted: u64,
    /// Resets seen in the period.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resets: u64,
    /// The counter was read for the first time in this period (a new
    /// gateway, a new signal, or a stored position lost): parts made before
    /// that reading are not in `counted`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub baseline: bool,
}

/// One record signal over a period.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordTally {
    /// Records stored (and so acknowledged to the device).
    pub records: u64,
    /// Sum of their quantities.
    pub quantity: f64,
    /// The first record's own sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_sequence: Option<String>,
    /// The last record's own sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sequence: Option<String>,
}

/// Parts counted while the agent or the link was away, across a boundary:
/// known in total, not by period.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Gap {
    /// Read time of the last reading before the gap (ms).
    pub since_ms: u64,
    /// Parts counted across it (in this period's totals).
    pub counted: u64,
}

/// A line's totals over one period: what the PLC counted and what the
/// events carried.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LineTally {
    /// Period start (ms since the epoch).
    pub start_ms: u64,
    /// Period end (ms).
    pub end_ms: u64,
    /// Per counter signal.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counters: BTreeMap<String, CounterTally>,
    /// Per record signal.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub records: BTreeMap<String, RecordTally>,
    /// Quantity carried by the period's events, by event type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sent: BTreeMap<String, f64>,
    /// Number of events made in the period.
    pub events: u64,
    /// First event id of the period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_event: Option<uuid::Uuid>,
    /// Last event id of the period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<uuid::Uuid>,
    /// The period was entered across an outage of the agent or the link
    /// (or a lost position): parts counted across it are in the totals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridged: Option<Gap>,
    /// The period was left early by an outage: what was made after the
    /// last reading is counted in a later period's bridged gap.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cut_short: bool,
    /// Read time of the last stored reading or record (ms): where a gap
    /// begins if the next poll comes after an outage.
    #[serde(default)]
    pub last_read_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl LineTally {
    /// An empty tally for `[start, end)`.
    pub fn new(start: SystemTime, end: SystemTime) -> Self {
        Self {
            start_ms: millis(start),
            end_ms: millis(end),
            ..Self::default()
        }
    }

    /// Parts the PLC counted over the period, all counters.
    pub fn counted(&self) -> u64 {
        self.counters.values().map(|c| c.counted).sum()
    }

    /// What the PLC counted, counters and records together: the figure
    /// the period's events must add up to.
    pub fn counted_total(&self) -> f64 {
        self.counted() as f64 + self.records.values().map(|r| r.quantity).sum::<f64>()
    }

    /// The time the ledger reckons an event tallied here at `at` by: `at`,
    /// held inside this period (a poll that began before the boundary and
    /// stored after it still belongs to the period it was tallied in).
    pub fn period_ms(&self, at: SystemTime) -> u64 {
        millis(at).clamp(
            self.start_ms,
            self.end_ms.saturating_sub(1).max(self.start_ms),
        )
    }

    /// Adds an event made in the period.
    pub fn add_event(&mut self, event: &CloudEvent) {
        let quantity = match event.data.quantity {
            Quantity::Count(n) => n as f64,
            Quantity::Measure(x) => x,
        };
        *self
            .sent
            .entry(event.event_type.as_str().to_owned())
            .or_default() += quantity;
        self.events += 1;
        self.first_event.get_or_insert(event.id);
        self.last_event = Some(event.id);
    }

    /// Records a counter reading taken at `at`: `previous` is the state
    /// before it (None at a baseline), `delta` the parts counted by it,
    /// `reset` whether it started a new epoch, `across_gap` whether it is
    /// the first reading after an outage.
    #[allow(clippy::too_many_arguments)]
    pub fn add_reading(
        &mut self,
        signal: &str,
        previous: Option<CounterState>,
        next: CounterState,
        delta: u64,
        reset: bool,
        across_gap: bool,
        at: SystemTime,
    ) {
        self.last_read_ms = millis(at);
        if across_gap {
            if let Some(gap) = &mut self.bridged {
                gap.counted += delta;
            }
        }
        let tally = self
            .counters
            .entry(signal.to_owned())
            .or_insert_with(|| CounterTally {
                start: previous.unwrap_or(next).into(),
                ..CounterTally::default()
            });
        tally.end = next.into();
        tally.counted += delta;
        if previous.is_none() {
            tally.baseline = true;
        }
        if reset {
            tally.resets += 1;
        }
    }

    /// Records a record stored at `at`.
    pub fn add_record(
        &mut self,
        signal: &str,
        quantity: f64,
        sequence: Option<String>,
        at: SystemTime,
    ) {
        self.last_read_ms = millis(at);
        let tally = self.records.entry(signal.to_owned()).or_default();
        tally.records += 1;
        tally.quantity += quantity;
        if tally.first_sequence.is_none() {
            tally.first_sequence = sequence.clone();
        }
        if sequence.is_some() {
            tally.last_sequence = sequence;
        }
    }

    /// The period that follows this one for `line`, starting at `start`:
    /// counters carry their end reading over as the next start.
    pub fn successor(&self, start: SystemTime, end: SystemTime) -> Self {
        let mut next = Self::new(start, end);
        for (signal, tally) in &self.counters {
            next.counters.insert(
                signal.clone(),
                CounterTally {
                    start: tally.end,
                    end: tally.end,
                    ..CounterTally::default()
                },
            );
        }
        next
    }
}

/// A source's open periods, by line; part of its stored position.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpenPeriods(pub BTreeMap<String, LineTally>);

impl OpenPeriods {
    /// Whether no line has an open period.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `line`'s tally for the period containing `at`, opened if it has
    /// none. A period that ended is closed by [`Self::close_ended`] first.
    pub fn line(&mut self, rule: &PeriodRule, line: &str, at: SystemTime) -> &mut LineTally {
        self.0.entry(line.to_owned()).or_insert_with(|| {
            let (start, end) = rule.period_of(at);
            LineTally::new(start, end)
        })
    }

    /// Closes every line's period that ended by `now` and opens the one
    /// containing `now`; returns the closed tallies by line. `resumed`:
    /// this is the first poll after a restart or a link outage, so what
    /// was made since the last reading cannot be placed in either period:
    /// the closed one is marked cut short, the new one bridged.
    pub fn close_ended(
        &mut self,
        rule: &PeriodRule,
        now: SystemTime,
        resumed: bool,
    ) -> Vec<(String, LineTally)> {
        let now_ms = millis(now);
        let mut closed = Vec::new();
        for (line, tally) in &mut self.0 {
            if tally.end_ms > now_ms {
                continue;
            }
            let (start, end) = rule.period_of(now);
            let mut next = tally.successor(start, end);
            let mut done = std::mem::take(tally);
            if resumed {
                done.cut_short = true;
                next.bridged = Some(Gap {
                    since_ms: done.last_read_ms,
                    counted: 0,
                });
            }
            next.last_read_ms = done.last_read_ms;
            *tally = next;
            closed.push((line.clone(), done));
        }
        closed
    }
}

/// The checkpoint event closing `tally` for `line` of a source.
pub fn checkpoint_event(
    ctx: &crate::source::SourceContext,
    line: &str,
    machine: &str,
    origin: Origin,
    tally: &LineTally,
) -> CloudEvent {
    let urn = ctx.urn();
    let id = buffer::id::checkpoint_event_id(&urn, line, tally.start_ms);
    let mut attributes = BTreeMap::new();
    attributes.insert(
        "period_start".to_owned(),
        buffer::event::rfc3339_millis(from_millis(tally.start_ms)),
    );
    attributes.insert(
        "period_end".to_owned(),
        buffer::event::rfc3339_millis(from_millis(tally.end_ms)),
    );
    let data = EventData {
        site: ctx.site.clone(),
        line: line.to_owned(),
        machine: machine.to_owned(),
        work_order: None,
        material: None,
        quantity: if tally.counted_total().fract() == 0.0 {
            Quantity::Count(tally.counted_total() as u64)
        } else {
            Quantity::Measure(tally.counted_total())
        },
        unit: "EA".into(),
        lot: None,
        reason_code: None,
        counter: None,
        origin,
        attributes,
        checkpoint: serde_json::to_value(tally).ok(),
    };
    let mut event = CloudEvent::new(
        id,
        urn,
        EventType(CHECKPOINT.to_owned()),
        from_millis(tally.end_ms),
        data,
    );
    event.sequence = Some(tally.start_ms.to_string());
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        let ts: jiff::Timestamp = text.parse().expect("timestamp");
        from_millis(ts.as_millisecond() as u64)
    }

    fn hours(period: (SystemTime, SystemTime)) -> f64 {
        period
            .1
            .duration_since(period.0)
            .expect("ordered")
            .as_secs_f64()
            / 3600.0
    }

    fn berlin() -> PeriodRule {
        PeriodRule::shifts(
            &["06:00".into(), "14:00".into(), "22:00".into()],
            "Europe/Berlin",
        )
        .expect("rule")
    }

    #[test]
    fn berlin_shifts_are_eight_hours_on_an_ordinary_day() {
        let p = berlin().period_of(at("2026-06-10T10:00:00Z"));
        assert_eq!(p.0, at("2026-06-10T04:00:00Z"), "06:00 CEST");
        assert_eq!(hours(p), 8.0);
    }

    #[test]
    fn the_night_shift_of_a_dst_change_is_seven_or_nine_hours() {
        // 29 March 2026: clocks go 02:00 → 03:00 in Berlin.
        let spring = berlin().period_of(at("2026-03-29T00:30:00Z"));
        assert_eq!(spring.0, at("2026-03-28T21:00:00Z"), "22:00 CET");
        assert_eq!(spring.1, at("2026-03-29T04:00:00Z"), "06:00 CEST");
        assert_eq!(hours(spring), 7.0);
        // 25 October 2026: 03:00 → 02:00.
        let autumn = berlin().period_of(at("2026-10-25T01:30:00Z"));
        assert_eq!(hours(autumn), 9.0);
        assert_eq!(autumn.1, at("2026-10-25T05:00:00Z"), "06:00 CET");
    }

    #[test]
    fn a_day_with_a_dst_change_totals_23_and_25_hours() {
        let rule = PeriodRule::shifts(&["06:00".into()], "Europe/Berlin").expect("rule");
        // The production day from 06:00 on the 28th holds the change at
        // 02:00 on the 29th.
        assert_eq!(hours(rule.period_of(at("2026-03-29T00:00:00Z"))), 23.0);
        assert_eq!(hours(rule.period_of(at("2026-03-29T12:00:00Z"))), 24.0);
        assert_eq!(hours(rule.period_of(at("2026-10-25T00:00:00Z"))), 25.0);
        assert_eq!(hours(rule.period_of(at("2026-07-01T12:00:00Z"))), 24.0);
        // Consecutive periods meet: no instant is in two or none.
        let mut t = at("2026-03-27T05:00:00Z");
        let (mut periods, mut covered) = (0, 0.0);
        while t < at("2026-04-01T04:00:00Z") {
            let p = rule.period_of(t);
            assert_eq!(p.0, t, "each period starts where the last ended");
            covered += hours(p);
            periods += 1;
            t = p.1;
        }
        assert_eq!((periods, covered), (5, 5.0 * 24.0 - 1.0));
    }

    #[test]
    fn fixed_periods_are_aligned_and_meet() {
        let rule = PeriodRule::Every(Duration::from_secs(3600));
        let p = rule.period_of(at("2026-06-10T10:59:59.999Z"));
        assert_eq!(p, (at("2026-06-10T10:00:00Z"), at("2026-06-10T11:00:00Z")));
        assert_eq!(rule.period_of(p.1).0, p.1);
    }

    #[test]
    fn bad_shift_times_and_zones_say_what_was_expected() {
        let e = PeriodRule::shifts(&["6 Uhr".into()], "Europe/Berlin").expect_err("time");
        assert!(e.contains("\"06:00\""), "{e}");
        let e = PeriodRule::shifts(&["06:00".into()], "Europe/Bonn").expect_err("zone");
        assert!(e.contains("IANA"), "{e}");
    }
}
