//! What every source gets from the agent, and the event building they share.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use buffer::event::{CounterReading, EventData, Origin, Quantity};
use buffer::{Appender, CloudEvent, EventClass, EventType, NewEvent, Routes};
use tokio::sync::watch;

use crate::counter::{CounterRules, CounterState, Observation};

/// Decides business vs telemetry from the event type.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    /// Types that may be dropped oldest-first when the journal is full.
    pub telemetry_types: BTreeSet<String>,
}

impl Classifier {
    /// Completion and scrap are always business, whatever the config says.
    pub fn class_of(&self, event_type: &EventType) -> EventClass {
        let t = event_type.as_str();
        if t != EventType::COMPLETION && t != EventType::SCRAP && self.telemetry_types.contains(t) {
            EventClass::Telemetry
        } else {
            EventClass::Business
        }
    }
}

/// Identity and plumbing of one configured source.
#[derive(Clone)]
pub struct SourceContext {
    /// Site code (first part of the event `source`).
    pub site: String,
    /// Gateway name.
    pub gateway: String,
    /// Source name from the configuration (keys its cursor).
    pub name: String,
    /// Static attributes stamped into every event's data.
    pub attributes: BTreeMap<String, String>,
    /// Sinks its events go to.
    pub routes: Routes,
    /// Business or telemetry by type.
    pub classifier: Classifier,
    /// Where events go.
    pub appender: Appender,
    /// Cursor stored with this source's last durable append.
    pub initial_cursor: Option<Vec<u8>>,
    /// Becomes `true` when the agent stops.
    pub shutdown: watch::Receiver<bool>,
}

impl SourceContext {
    /// The CloudEvents `source` of this source's events.
    pub fn urn(&self) -> String {
        buffer::event::source_urn(&self.site, &self.gateway, &self.name)
    }

    /// Wraps a canonical event for the journal.
    pub fn new_event(&self, event: &CloudEvent) -> NewEvent {
        NewEvent::from_cloud_event(
            event,
            self.classifier.class_of(&event.event_type),
            self.routes,
        )
    }
}

/// A counter signal: which register or node, what type of event it makes.
#[derive(Clone, Debug)]
pub struct CounterSignal {
    /// Signal name (part of the id; keys the counter's state in the cursor).
    pub name: String,
    /// Event type its increases produce.
    pub event_type: EventType,
    /// Unit of measure.
    pub unit: String,
    /// Line the counter belongs to.
    pub line: String,
    /// Machine the counter belongs to.
    pub machine: String,
    /// Wrap and reset rules.
    pub rules: CounterRules,
}

impl CounterSignal {
    /// The event for a counted increase, or `None` when nothing was made.
    pub fn event_for(
        &self,
        ctx: &SourceContext,
        observation: &Observation,
        origin: Origin,
        read_at: SystemTime,
    ) -> Option<CloudEvent> {
        if observation.delta == 0 {
            return None;
        }
        let next: CounterState = observation.next;
        let urn = ctx.urn();
        let id = buffer::id::counter_event_id(&urn, &self.name, next.epoch, next.total);
        let data = EventData {
            site: ctx.site.clone(),
            line: self.line.clone(),
            machine: self.machine.clone(),
            work_order: None,
            material: None,
            quantity: Quantity::Count(observation.delta),
            unit: self.unit.clone(),
            lot: None,
            reason_code: None,
            counter: Some(CounterReading {
                value: next.raw,
                previous: observation.previous_raw,
                epoch: next.epoch,
            }),
            origin,
            attributes: ctx.attributes.clone(),
        };
        let mut event = CloudEvent::new(id, urn, self.event_type.clone(), read_at, data);
        event.sequence = Some(next.total.to_string());
        Some(event)
    }
}
