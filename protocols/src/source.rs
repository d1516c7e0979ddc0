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
    /// Events made, per source and type (metrics).
    pub read: ReadCounts,
}

/// Events every source made, by source and type; shared with metrics.
#[derive(Clone, Debug, Default)]
pub struct ReadCounts(std::sync::Arc<std::sync::Mutex<BTreeMap<String, BTreeMap<String, u64>>>>);

impl ReadCounts {
    /// Counts one event (allocates only the first time a pair is seen).
    pub fn add(&self, source: &str, event_type: &str) {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !counts.contains_key(source) {
            counts.insert(source.to_owned(), BTreeMap::new());
        }
        if let Some(types) = counts.get_mut(source) {
            match types.get_mut(event_type) {
                Some(n) => *n += 1,
                None => {
                    types.insert(event_type.to_owned(), 1);
                }
            }
        }
    }

    /// The counts so far, by (source, type).
    pub fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .iter()
            .flat_map(|(source, types)| {
                types
                    .iter()
                    .map(move |(t, n)| ((source.clone(), t.clone()), *n))
            })
            .collect()
    }
}

impl SourceContext {
    /// The CloudEvents `source` of this source's events.
    pub fn urn(&self) -> String {
        buffer::event::source_urn(&self.site, &self.gateway, &self.name)
    }

    /// Wraps a canonical event for the journal.
    pub fn new_event(&self, event: &CloudEvent) -> NewEvent {
        self.read.add(&self.name, event.event_type.as_str());
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
        let data = self.data(
            ctx,
            Quantity::Count(observation.delta),
            Some(CounterReading {
                value: next.raw,
                previous: observation.previous_raw,
                epoch: next.epoch,
            }),
            origin,
            ctx.attributes.clone(),
        );
        let mut event = CloudEvent::new(id, urn, self.event_type.clone(), read_at, data);
        event.sequence = Some(next.total.to_string());
        Some(event)
    }

    /// The event for a measured amount (kg as a float) that grew by
    /// `delta` (already scaled) to `value`; `next` is the state stored with it.
    pub fn measure_event_for(
        &self,
        ctx: &SourceContext,
        delta: f64,
        value: f64,
        next: CounterState,
        origin: Origin,
        read_at: SystemTime,
    ) -> CloudEvent {
        let urn = ctx.urn();
        let id = buffer::id::counter_event_id(&urn, &self.name, next.epoch, next.raw);
        let mut attributes = ctx.attributes.clone();
        attributes.insert("counter_value".into(), value.to_string());
        attributes.insert("counter_epoch".into(), next.epoch.to_string());
        let data = self.data(ctx, Quantity::Measure(delta), None, origin, attributes);
        CloudEvent::new(id, urn, self.event_type.clone(), read_at, data)
    }

    /// A counter event's data: no order, material, lot or reason.
    fn data(
        &self,
        ctx: &SourceContext,
        quantity: Quantity,
        counter: Option<CounterReading>,
        origin: Origin,
        attributes: BTreeMap<String, String>,
    ) -> EventData {
        EventData {
            site: ctx.site.clone(),
            line: self.line.clone(),
            machine: self.machine.clone(),
            work_order: None,
            material: None,
            quantity,
            unit: self.unit.clone(),
            lot: None,
            reason_code: None,
            counter,
            origin,
            attributes,
        }
    }
}

/// A value read for a record field or a context value.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    /// Integer (counters, quantities, sequences).
    Int(i64),
    /// Float.
    Float(f64),
    /// Text.
    Text(String),
    /// Bit.
    Bool(bool),
}

impl FieldValue {
    /// Text form, for ids and event fields.
    pub fn text(&self) -> String {
        match self {
            FieldValue::Int(v) => v.to_string(),
            FieldValue::Float(v) => v.to_string(),
            FieldValue::Text(s) => s.clone(),
            FieldValue::Bool(b) => b.to_string(),
        }
    }
}

/// Field names with a place of their own in the canonical event; any other
/// field of a record goes into the event's attributes.
const RECORD_FIELDS: [&str; 5] = ["work_order", "material", "quantity", "lot", "reason_code"];

/// A record signal: a completion or scrap the PLC or MES reports as a whole
/// (order, material, quantity, ...), identified by some of its fields.
#[derive(Clone, Debug)]
pub struct RecordSignal {
    /// Signal name (part of the id).
    pub name: String,
    /// Event type.
    pub event_type: EventType,
    /// Unit of measure of `quantity`.
    pub unit: String,
    /// Line.
    pub line: String,
    /// Machine.
    pub machine: String,
    /// Field names whose values identify the record.
    pub key: Vec<String>,
}

impl RecordSignal {
    /// The id the record gets: from its key fields, so the same record read
    /// twice (re-poll, restart, republish) is the same event.
    pub fn id_for(&self, ctx: &SourceContext, values: &BTreeMap<String, FieldValue>) -> uuid::Uuid {
        let key: Vec<String> = self
            .key
            .iter()
            .map(|k| values.get(k).map(FieldValue::text).unwrap_or_default())
            .collect();
        let key_refs: Vec<&str> = key.iter().map(String::as_str).collect();
        buffer::id::record_event_id(&ctx.urn(), &self.name, &key_refs)
    }

    /// The canonical event for one record.
    pub fn event_for(
        &self,
        ctx: &SourceContext,
        values: &BTreeMap<String, FieldValue>,
        origin: Origin,
        time: SystemTime,
    ) -> CloudEvent {
        let text = |name: &str| {
            values
                .get(name)
                .map(FieldValue::text)
                .filter(|t| !t.is_empty())
        };
        let quantity = match values.get("quantity") {
            Some(FieldValue::Int(n)) if *n >= 0 => Quantity::Count(*n as u64),
            Some(FieldValue::Float(f)) => Quantity::Measure(*f),
            _ => Quantity::Count(1),
        };
        let mut attributes = ctx.attributes.clone();
        for (name, value) in values {
            if !RECORD_FIELDS.contains(&name.as_str()) && name != "sequence" {
                attributes.insert(name.clone(), value.text());
            }
        }
        let data = EventData {
            site: ctx.site.clone(),
            line: self.line.clone(),
            machine: self.machine.clone(),
            work_order: text("work_order"),
            material: text("material"),
            quantity,
            unit: self.unit.clone(),
            lot: text("lot"),
            reason_code: text("reason_code"),
            counter: None,
            origin,
            attributes,
        };
        let mut event = CloudEvent::new(
            self.id_for(ctx, values),
            ctx.urn(),
            self.event_type.clone(),
            time,
            data,
        );
        if let Some(order) = &event.data.work_order {
            event.subject = Some(format!("{}/{order}", self.line));
        }
        event.sequence = text("sequence");
        event
    }
}
