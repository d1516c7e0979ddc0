//! Reconciliation periods of an OPC UA source: readings, records and
//! events tallied by the gateway's time when they are processed, and a
//! checkpoint per line staged into the same batch as the first values of
//! the next period (or by the tick when the line is idle).

use std::time::SystemTime;

use buffer::{CloudEvent, Quantity};

use super::Served;
use crate::counter::{Observation, Step};
use crate::period::{checkpoint_event, millis};

impl Served<'_> {
    /// Stages a checkpoint for every line whose period ended by `now`.
    pub(super) fn close_periods(&mut self, now: SystemTime) {
        let Some(checkpointing) = self.ctx.periods.clone() else {
            return;
        };
        let rule = &checkpointing.rule;
        let now_ms = millis(now);
        if self.working().periods.0.values().all(|t| t.end_ms > now_ms) {
            return;
        }
        let resumed = self.resumed;
        let closed = self.staged().periods.close_ended(rule, now, resumed);
        for (line, tally) in closed {
            let origin = buffer::Origin {
                protocol: "opcua".into(),
                endpoint: self.endpoint().to_owned(),
                address: "checkpoint".into(),
                quality: "good".into(),
                source_time: None,
            };
            let event = checkpoint_event(self.ctx, &line, &self.config.machine, origin, &tally);
            self.pending.period_ms.insert(event.id, tally.start_ms);
            self.pending.routes.insert(event.id, checkpointing.routes);
            self.pending.events.push(event);
            self.pending.closed.push((line, tally));
        }
    }

    /// Tallies a counter reading and the event it made (if any).
    pub(super) fn tally_reading(
        &mut self,
        signal: &str,
        line: &str,
        previous: Option<crate::counter::CounterState>,
        observation: Option<&Observation>,
        event: Option<&CloudEvent>,
        now: SystemTime,
    ) {
        let Some(checkpointing) = self.ctx.periods.clone() else {
            return;
        };
        let rule = &checkpointing.rule;
        self.close_periods(now);
        let across_gap = self.resumed;
        let tally = self.staged().periods.line(rule, line, now);
        if let Some(o) = observation.filter(|o| o.step != Step::Unchanged) {
            tally.add_reading(
                signal,
                previous,
                o.next,
                o.delta,
                o.step == Step::Reset,
                across_gap,
                now,
            );
        }
        if let Some(event) = event {
            tally.add_event(event);
            let at = tally.period_ms(now);
            self.pending.period_ms.insert(event.id, at);
        }
    }

    /// Tallies a record stored with its event.
    pub(super) fn tally_record(&mut self, signal: &str, event: &CloudEvent, now: SystemTime) {
        let Some(checkpointing) = self.ctx.periods.clone() else {
            return;
        };
        let rule = &checkpointing.rule;
        self.close_periods(now);
        let quantity = match event.data.quantity {
            Quantity::Count(n) => n as f64,
            Quantity::Measure(x) => x,
        };
        let tally = self.staged().periods.line(rule, &event.data.line, now);
        tally.add_record(signal, quantity, event.sequence.clone(), now);
        tally.add_event(event);
        let at = tally.period_ms(now);
        self.pending.period_ms.insert(event.id, at);
    }
}
