//! What every source gets from the agent, and the event building they share.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use buffer::event::{CounterReading, EventData, Origin, Quantity};
use buffer::{Appender, CloudEvent, EventClass, EventType, NewEvent, Routes};
use serde::{Deserialize, Serialize};
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
    /// Reconciliation periods, when checkpoints are configured.
    pub periods: Option<std::sync::Arc<crate::period::Checkpointing>>,
}

/// A source kind's own counters, as the agent's metrics and status show
/// them without knowing the kind.
pub trait SourceCounters: Send + Sync {
    /// Metric family (`modbus_source`) and its help text.
    fn family(&self) -> (&'static str, &'static str);
    /// Counters by kind, since start.
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// Whether the device or server is reachable now (`None`: the kind has
    /// no connection).
    fn connected(&self) -> Option<bool> {
        None
    }
    /// Configured vs achieved poll interval (`None`: the kind does not
    /// poll on a schedule).
    fn schedule(&self) -> Option<crate::schedule::ScheduleSnapshot> {
        None
    }
}

/// Events every source made, by source and type, and stored positions
/// that could not be decoded, by source; shared with metrics.
#[derive(Clone, Debug, Default)]
pub struct ReadCounts {
    events: std::sync::Arc<std::sync::Mutex<BTreeMap<String, BTreeMap<String, u64>>>>,
    positions_lost: std::sync::Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    /// When each source last made an event.
    last_event: std::sync::Arc<std::sync::Mutex<BTreeMap<String, SystemTime>>>,
    /// The newest events of all sources, newest last (status page).
    recent: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<RecentEvent>>>,
    /// Each line's open and last closed period, by source and line.
    periods: std::sync::Arc<std::sync::Mutex<BTreeMap<(String, String), LinePeriods>>>,
}

/// A line's open period and the one closed before it, as a source stored
/// them (status page, `plant-edge status`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinePeriods {
    /// The open period.
    pub current: crate::period::LineTally,
    /// The last closed period, once one closed in this process.
    pub last: Option<crate::period::LineTally>,
}

/// One event as the status page lists it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RecentEvent {
    /// Event time, RFC 3339.
    pub time: String,
    /// Source name.
    pub source: String,
    /// Line.
    pub line: String,
    /// Event type.
    pub event_type: String,
    /// Quantity as text (count or measure).
    pub quantity: String,
    /// Event id.
    pub id: String,
}

/// Newest events kept for the status page.
pub const RECENT_EVENTS: usize = 20;

impl ReadCounts {
    /// Publishes a source's stored open periods; `closed` are the periods
    /// its last store closed.
    pub fn periods_stored(
        &self,
        source: &str,
        open: &crate::period::OpenPeriods,
        closed: &[(String, crate::period::LineTally)],
    ) {
        let mut periods = self.periods.lock().unwrap_or_else(|e| e.into_inner());
        for (line, tally) in closed {
            periods
                .entry((source.to_owned(), line.clone()))
                .or_default()
                .last = Some(tally.clone());
        }
        for (line, tally) in &open.0 {
            let entry = periods
                .entry((source.to_owned(), line.clone()))
                .or_default();
            if entry.current != *tally {
                entry.current = tally.clone();
            }
        }
    }

    /// Every line's periods, by source and line.
    pub fn periods(&self) -> BTreeMap<(String, String), LinePeriods> {
        self.periods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts one event (allocates only the first time a pair is seen).
    pub fn add(&self, source: &str, event_type: &str) {
        let mut counts = self.events.lock().unwrap_or_else(|p| p.into_inner());
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
        let counts = self.events.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .iter()
            .flat_map(|(source, types)| {
                types
                    .iter()
                    .map(move |(t, n)| ((source.clone(), t.clone()), *n))
            })
            .collect()
    }

    /// Counts one event of `source` and keeps it among the newest.
    pub fn seen(&self, source: &str, event: &CloudEvent) {
        use std::fmt::Write;
        self.add(source, event.event_type.as_str());
        let now = SystemTime::now();
        {
            let mut last = self.last_event.lock().unwrap_or_else(|p| p.into_inner());
            match last.get_mut(source) {
                Some(at) => *at = now,
                None => {
                    last.insert(source.to_owned(), now);
                }
            }
        }
        // Per event: the oldest entry's buffers are reused, so a full list
        // allocates nothing.
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let mut entry = if recent.len() >= RECENT_EVENTS {
            recent.pop_front().unwrap_or_default()
        } else {
            RecentEvent::default()
        };
        entry.time.clone_from(&event.time);
        entry.source.clear();
        entry.source.push_str(source);
        entry.line.clone_from(&event.data.line);
        entry.event_type.clear();
        entry.event_type.push_str(event.event_type.as_str());
        entry.quantity.clear();
        let _ = match event.data.quantity {
            Quantity::Count(n) => write!(entry.quantity, "{n}"),
            Quantity::Measure(v) => write!(entry.quantity, "{v}"),
        };
        entry.id.clear();
        let _ = write!(entry.id, "{}", event.id);
        recent.push_back(entry);
    }

    /// When each source last made an event.
    pub fn last_events(&self) -> BTreeMap<String, SystemTime> {
        self.last_event
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The newest events, newest last.
    pub fn recent(&self) -> Vec<RecentEvent> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Counts a stored position that did not decode.
    pub fn position_lost(&self, source: &str) {
        let mut lost = self
            .positions_lost
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *lost.entry(source.to_owned()).or_default() += 1;
    }

    /// Undecodable stored positions so far, by source.
    pub fn positions_lost(&self) -> BTreeMap<String, u64> {
        self.positions_lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl SourceContext {
    /// The position stored with this source's last durable append, decoded
    /// by `decode`; a fresh one (`T::default()`, new namespaces) when none
    /// was stored. One that does not decode is never silently reset: it is
    /// logged as an error and counted, and the new position's ids live in a
    /// namespace never used before, so no id is given to two facts.
    pub fn stored_position<T: Default>(
        &self,
        decode: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> T {
        let Some(bytes) = self.initial_cursor.as_deref() else {
            return T::default();
        };
        match decode(bytes) {
            Ok(position) => position,
            Err(e) => {
                self.read.position_lost(&self.name);
                let head: String = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into();
                tracing::error!(source = %self.name, error = %e, stored = %head, "STORED POSITION UNREADABLE: counters restart at a baseline (parts made meanwhile are not counted) and records in a new id namespace");
                T::default()
            }
        }
    }

    /// The CloudEvents `source` of this source's events.
    pub fn urn(&self) -> String {
        buffer::event::source_urn(&self.site, &self.gateway, &self.name)
    }

    /// Wraps a canonical event for the journal.
    pub fn new_event(&self, event: &CloudEvent) -> NewEvent {
        self.read.seen(&self.name, event);
        NewEvent::from_cloud_event(
            event,
            self.classifier.class_of(&event.event_type),
            self.routes,
        )
    }
}

/// Where one signal's events come from when that is not the source's own
/// line and machine: several lines behind one PLC address or MES session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Line (default: the source's).
    pub line: Option<String>,
    /// Machine (default: the source's).
    pub machine: Option<String>,
    /// Attributes added to the source's for this signal's events.
    pub attributes: BTreeMap<String, String>,
    /// Records: readable reason per `reason_code` (17 → "jam at infeed"),
    /// carried as `attributes.reason`.
    pub reasons: BTreeMap<String, String>,
}

impl Placement {
    /// The line, or the source's.
    pub fn line_or(&self, source_line: &str) -> String {
        self.line.clone().unwrap_or_else(|| source_line.to_owned())
    }

    /// The machine, or the source's.
    pub fn machine_or(&self, source_machine: &str) -> String {
        self.machine
            .clone()
            .unwrap_or_else(|| source_machine.to_owned())
    }
}

/// The source's attributes with a signal's own on top.
fn merged(ctx: &SourceContext, own: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut attributes = ctx.attributes.clone();
    attributes.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    attributes
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
    /// Attributes of this signal's events on top of the source's.
    pub attributes: BTreeMap<String, String>,
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
        let id = buffer::id::namespaced_counter_event_id(
            &urn,
            &self.name,
            next.namespace,
            next.epoch,
            next.total,
        );
        let data = self.data(
            ctx,
            Quantity::Count(observation.delta),
            Some(CounterReading {
                value: next.raw,
                previous: observation.previous_raw,
                epoch: next.epoch,
            }),
            origin,
            merged(ctx, &self.attributes),
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
        let id = buffer::id::namespaced_counter_event_id(
            &urn,
            &self.name,
            next.namespace,
            next.epoch,
            next.raw,
        );
        let mut attributes = merged(ctx, &self.attributes);
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
            checkpoint: None,
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
    /// The event type taken from a field's code instead of `event_type`.
    pub type_from: Option<TypeFromField>,
    /// Attributes of this signal's events on top of the source's.
    pub attributes: BTreeMap<String, String>,
    /// Readable reason per reason code, added as `attributes.reason`; a
    /// code not listed keeps only its `reason_code`.
    pub reasons: BTreeMap<String, String>,
}

/// An event type read from a record field through a map of codes
/// (1 → `production.completion`, 2 → `production.scrap`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeFromField {
    /// The field holding the code.
    pub field: String,
    /// Code (the field's value as text) → event type.
    pub map: BTreeMap<String, EventType>,
}

impl TypeFromField {
    /// The type the record's code names; an error naming the code when the
    /// map has none (such a record is never posted with a guessed type).
    pub fn type_of(&self, values: &BTreeMap<String, FieldValue>) -> Result<EventType, String> {
        let Some(code) = values.get(&self.field).map(FieldValue::text) else {
            return Err(format!("field {} (the type code) is missing", self.field));
        };
        self.map.get(&code).cloned().ok_or_else(|| {
            format!(
                "unknown type code {code:?} in field {}; known: {}",
                self.field,
                self.map.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

impl RecordSignal {
    /// The event type of one record: its code's, or the configured one.
    pub fn event_type_for(
        &self,
        values: &BTreeMap<String, FieldValue>,
    ) -> Result<EventType, String> {
        match &self.type_from {
            Some(from) => from.type_of(values),
            None => Ok(self.event_type.clone()),
        }
    }

    /// The id of a record without a handshake: from its key fields, so the
    /// same record read twice (re-poll, restart, republish) is the same
    /// event. Only as good as the key: `validate` requires key fields the
    /// record always has.
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
        id: uuid::Uuid,
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
        // Callers check the quantity first (`record_quantity`); a record
        // without a quantity field is one piece.
        let quantity = record_quantity(values).unwrap_or(Quantity::Count(1));
        let mut attributes = merged(ctx, &self.attributes);
        for (name, value) in values {
            if !RECORD_FIELDS.contains(&name.as_str()) && name != "sequence" {
                attributes.insert(name.clone(), value.text());
            }
        }
        if let Some(reason) = text("reason_code").and_then(|code| self.reasons.get(&code)) {
            attributes.insert("reason".into(), reason.clone());
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
            checkpoint: None,
        };
        // Callers check the code first (`event_type_for`); the configured
        // type stands in only where there is no map.
        let event_type = self
            .event_type_for(values)
            .unwrap_or_else(|_| self.event_type.clone());
        let mut event = CloudEvent::new(id, ctx.urn(), event_type, time, data);
        if let Some(order) = &event.data.work_order {
            event.subject = Some(format!("{}/{order}", self.line));
        }
        event.sequence = text("sequence");
        event
    }
}

/// A record's quantity: absent means one piece; a negative, non-finite or
/// non-numeric value is an error naming what was found (such a record is
/// never posted with a guessed quantity).
pub fn record_quantity(values: &BTreeMap<String, FieldValue>) -> Result<Quantity, String> {
    match values.get("quantity") {
        None => Ok(Quantity::Count(1)),
        Some(FieldValue::Int(n)) if *n >= 0 => Ok(Quantity::Count(*n as u64)),
        Some(FieldValue::Float(f)) if f.is_finite() && *f >= 0.0 => Ok(Quantity::Measure(*f)),
        Some(FieldValue::Text(t)) => Err(format!(
            "field quantity is text {t:?}, expected a non-negative number"
        )),
        Some(other) => Err(format!(
            "field quantity is {}, expected a non-negative number",
            other.text()
        )),
    }
}

/// What a record's fields say, as one value: two reads of the same record
/// give the same fingerprint.
pub fn record_fingerprint(values: &BTreeMap<String, FieldValue>) -> uuid::Uuid {
    let parts: Vec<String> = values
        .iter()
        .map(|(name, value)| format!("{name}={}", value.text()))
        .collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    buffer::id::record_event_id("fingerprint", "", &refs)
}

/// A handshake's stored position: the handshake cycle is a record's
/// identity (after a completed exchange the next ready record is a new
/// fact whatever its fields say), so what it counts is exchanges.
///
/// Stored in the source's cursor, in the same durable write as the record
/// it names, so a record re-presented because the agent stopped between
/// storing and acknowledging it is recognised (same id, stored once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakePosition {
    /// Drawn when the position was created; part of every record id.
    pub namespace: uuid::Uuid,
    /// Records stored through this handshake so far.
    pub cycle: u64,
    /// The record stored last, until the device is seen releasing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingRecord>,
}

/// A record stored and not yet seen released by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRecord {
    /// Its event id.
    pub id: uuid::Uuid,
    /// Its fields' fingerprint.
    pub fingerprint: uuid::Uuid,
}

/// What a ready record is, against the stored position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presented {
    /// The record stored last, shown again (the agent stopped or the
    /// acknowledgement did not arrive): acknowledge it, store nothing.
    Stored(uuid::Uuid),
    /// A new fact: store it with `next` (same durable write), then
    /// acknowledge.
    New {
        /// Its id.
        id: uuid::Uuid,
        /// The position to store with it.
        next: HandshakePosition,
    },
}

impl Default for HandshakePosition {
    fn default() -> Self {
        Self {
            namespace: buffer::id::new_namespace(),
            cycle: 0,
            pending: None,
        }
    }
}

impl HandshakePosition {
    /// Classifies a ready record. `acknowledged` says that this process
    /// has since acknowledged the pending record (the device then showing
    /// a record without the acknowledgement has released it, even if the
    /// new one has the same fields).
    pub fn presented(
        &self,
        urn: &str,
        signal: &str,
        fingerprint: uuid::Uuid,
        acknowledged: bool,
    ) -> Presented {
        if let Some(pending) = self.pending {
            if !acknowledged && pending.fingerprint == fingerprint {
                return Presented::Stored(pending.id);
            }
        }
        let cycle = self.cycle + 1;
        let id = buffer::id::handshake_record_id(urn, signal, self.namespace, cycle);
        Presented::New {
            id,
            next: Self {
                namespace: self.namespace,
                cycle,
                pending: Some(PendingRecord { id, fingerprint }),
            },
        }
    }

    /// The position once the device released the pending record, if one
    /// is pending (store it before the device can present the next one).
    pub fn released(&self) -> Option<Self> {
        self.pending.map(|_| Self {
            pending: None,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(order: &str, qty: i64) -> BTreeMap<String, FieldValue> {
        BTreeMap::from([
            ("work_order".to_owned(), FieldValue::Text(order.into())),
            ("quantity".to_owned(), FieldValue::Int(qty)),
        ])
    }

    #[test]
    fn a_record_shown_again_before_its_ack_is_the_stored_one() {
        let start = HandshakePosition::default();
        let fp = record_fingerprint(&fields("WO-1", 3));
        let Presented::New { id, next } = start.presented("urn", "rec", fp, false) else {
            panic!("first record is new");
        };
        assert_eq!(
            next.presented("urn", "rec", fp, false),
            Presented::Stored(id)
        );
    }

    #[test]
    fn after_a_release_equal_fields_are_a_new_fact_with_a_new_id() {
        let fp = record_fingerprint(&fields("WO-1", 3));
        let Presented::New { id: first, next } =
            HandshakePosition::default().presented("urn", "rec", fp, false)
        else {
            panic!("new");
        };
        let released = next.released().expect("pending");
        let Presented::New { id: second, .. } = released.presented("urn", "rec", fp, false) else {
            panic!("a released record's twin is new");
        };
        assert_ne!(first, second);
        // Acknowledged in this process and shown without the ack: released.
        assert!(matches!(
            next.presented("urn", "rec", fp, true),
            Presented::New { .. }
        ));
    }

    #[test]
    fn a_lost_position_never_repeats_record_ids() {
        let fp = record_fingerprint(&fields("WO-1", 3));
        let a = HandshakePosition::default().presented("urn", "rec", fp, false);
        let b = HandshakePosition::default().presented("urn", "rec", fp, false);
        assert_ne!(a, b);
    }

    #[test]
    fn the_newest_events_are_kept_in_order_with_their_own_fields() {
        let counts = ReadCounts::default();
        let event = |n: u64, line: &str| {
            let mut data: EventData = serde_json::from_value(serde_json::json!({
                "site": "s", "line": line, "machine": "m", "quantity": n, "unit": "EA",
                "origin": {"protocol": "modbus", "endpoint": "tcp://plc", "address": "holding:0", "quality": "good"},
            }))
            .expect("event data");
            data.quantity = Quantity::Count(n);
            CloudEvent::new(
                uuid::Uuid::from_u128(n.into()),
                "urn".into(),
                EventType::completion(),
                SystemTime::UNIX_EPOCH,
                data,
            )
        };
        // More than the list holds, with lines of different lengths so a
        // reused entry that kept old text would show.
        let total = RECENT_EVENTS as u64 + 7;
        for n in 1..=total {
            let line = if n % 2 == 0 { "L2" } else { "LINE-ELEVEN" };
            counts.seen(if n % 3 == 0 { "mes" } else { "press" }, &event(n, line));
        }
        let recent = counts.recent();
        assert_eq!(recent.len(), RECENT_EVENTS);
        for (entry, n) in recent.iter().zip(total - RECENT_EVENTS as u64 + 1..) {
            assert_eq!(entry.quantity, n.to_string());
            assert_eq!(entry.id, uuid::Uuid::from_u128(n.into()).to_string());
            assert_eq!(entry.line, if n % 2 == 0 { "L2" } else { "LINE-ELEVEN" });
            assert_eq!(entry.source, if n % 3 == 0 { "mes" } else { "press" });
            assert_eq!(entry.event_type, "production.completion");
        }
        assert_eq!(counts.last_events().len(), 2);
    }

    #[test]
    fn quantities_that_are_not_counts_are_errors() {
        assert_eq!(record_quantity(&fields("x", 2)), Ok(Quantity::Count(2)));
        assert!(record_quantity(&fields("x", -1)).is_err());
        let text = BTreeMap::from([("quantity".to_owned(), FieldValue::Text("ten".into()))]);
        assert!(record_quantity(&text).is_err());
        assert_eq!(record_quantity(&BTreeMap::new()), Ok(Quantity::Count(1)));
    }
}

/// The unit of a device's time field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epoch {
    /// Seconds since 1970.
    Seconds,
    /// Milliseconds since 1970.
    Millis,
}

/// How far a device's clock may be from the gateway's before its time is
/// not believed.
pub const DEVICE_TIME_TOLERANCE: std::time::Duration =
    std::time::Duration::from_secs(2 * 24 * 3600);

/// A record's time from a device field: the device's when plausible
/// (non-zero, within [`DEVICE_TIME_TOLERANCE`] of `now`), otherwise the
/// gateway's; the second value is what `attributes.time_source` says.
pub fn device_time(
    value: &FieldValue,
    epoch: Epoch,
    now: SystemTime,
) -> (SystemTime, &'static str) {
    let device = match value {
        FieldValue::Int(v) if *v > 0 => Some(match epoch {
            Epoch::Seconds => std::time::Duration::from_secs(*v as u64),
            Epoch::Millis => std::time::Duration::from_millis(*v as u64),
        }),
        _ => None,
    }
    .and_then(|since| SystemTime::UNIX_EPOCH.checked_add(since));
    match device {
        Some(t) => {
            let apart = t
                .duration_since(now)
                .or_else(|_| now.duration_since(t))
                .unwrap_or_default();
            if apart <= DEVICE_TIME_TOLERANCE {
                (t, "device")
            } else {
                (now, "gateway")
            }
        }
        None => (now, "gateway"),
    }
}

#[cfg(test)]
mod device_time_tests {
    use super::*;

    #[test]
    fn a_device_time_is_used_when_plausible_and_marked_when_not() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_764_600_000);
        let ms = FieldValue::Int(1_764_599_990_250);
        assert_eq!(
            device_time(&ms, Epoch::Millis, now),
            (
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_599_990_250),
                "device"
            )
        );
        assert_eq!(
            device_time(&FieldValue::Int(0), Epoch::Seconds, now),
            (now, "gateway")
        );
        // A clock reset to 1970 plus a few days, or years ahead: not believed.
        assert_eq!(
            device_time(&FieldValue::Int(400_000), Epoch::Seconds, now).1,
            "gateway"
        );
        assert_eq!(
            device_time(&FieldValue::Int(1_864_600_000), Epoch::Seconds, now).1,
            "gateway"
        );
        assert_eq!(
            device_time(&FieldValue::Int(i64::MAX), Epoch::Millis, now).1,
            "gateway"
        );
    }
}
