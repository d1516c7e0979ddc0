//! The canonical event: a CloudEvents 1.0 envelope in JSON structured mode.
//!
//! Every sink sends exactly these bytes, so the ERP sees one format whatever
//! the transport. The envelope's `id` is deterministic (see [`crate::id`]):
//! it never depends on when the fact was read.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The CloudEvents spec version this crate writes.
pub const SPEC_VERSION: &str = "1.0";
/// Content type of the `data` member.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// A CloudEvents event type such as `production.completion`.
///
/// Open-ended on purpose: material issues or goods receipts are new types in
/// configuration, not new code.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventType(pub String);

impl EventType {
    /// Good parts produced.
    pub const COMPLETION: &'static str = "production.completion";
    /// Parts or material scrapped.
    pub const SCRAP: &'static str = "production.scrap";

    /// The `production.completion` type.
    pub fn completion() -> Self {
        Self(Self::COMPLETION.to_owned())
    }

    /// The `production.scrap` type.
    pub fn scrap() -> Self {
        Self(Self::SCRAP.to_owned())
    }

    /// The type as written on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the journal treats an event when the disk bound is hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventClass {
    /// Completions, scrap and anything that posts to the ERP: never dropped;
    /// the source is back-pressured instead.
    Business,
    /// Machine states and similar: the oldest may be dropped (and counted).
    Telemetry,
}

impl EventClass {
    /// Stable one-byte code used in the journal's on-disk layout.
    pub fn code(self) -> u8 {
        match self {
            Self::Business => 0,
            Self::Telemetry => 1,
        }
    }

    /// Inverse of [`EventClass::code`]; unknown codes are treated as
    /// business so that a damaged byte can never make an event droppable.
    pub fn from_code(code: u8) -> Self {
        if code == 1 {
            Self::Telemetry
        } else {
            Self::Business
        }
    }
}

/// A quantity: a whole count of pieces, or a measured amount (kg of scrap).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    /// Pieces.
    Count(u64),
    /// A measured amount.
    Measure(f64),
}

/// Counter bookkeeping carried by events derived from a PLC or OPC UA counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterReading {
    /// The counter value this event brings the count up to.
    pub value: u64,
    /// The previous value, in the same epoch.
    pub previous: u64,
    /// Incremented on every counter reset, so `(epoch, value)` is unique.
    pub epoch: u32,
}

/// Where and how the event was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// `modbus`, `opcua`, `simulated`, ...
    pub protocol: String,
    /// The peer: `tcp://10.0.0.5:502`, `rtu:///dev/ttyUSB0`, `opc.tcp://...`.
    pub endpoint: String,
    /// The register, node id or record the value came from.
    pub address: String,
    /// `good`, `uncertain`; bad readings never become events.
    pub quality: String,
    /// The source's own timestamp when it has one (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_time: Option<String>,
}

/// The `data` member of a production event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventData {
    /// Plant or site code.
    pub site: String,
    /// Production line.
    pub line: String,
    /// Machine or work center on the line.
    pub machine: String,
    /// Work order, when the source knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_order: Option<String>,
    /// Material number, when the source knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub material: Option<String>,
    /// How much was produced or scrapped.
    pub quantity: Quantity,
    /// Unit of measure (`EA`, `KG`).
    pub unit: String,
    /// Lot or batch, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lot: Option<String>,
    /// Scrap reason, for scrap events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    /// Counter bookkeeping for counter-derived events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<CounterReading>,
    /// Where the value was read.
    pub origin: Origin,
    /// Static attributes from configuration (work center, cost center, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// A `production.checkpoint`'s totals over its period (see the
    /// README's "Reconciliation").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<serde_json::Value>,
}

/// A CloudEvents 1.0 event as plant-edge writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// Deterministic id of the fact (see [`crate::id`]).
    pub id: Uuid,
    /// `urn:plant-edge:<site>:<gateway>:<source-name>`.
    pub source: String,
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the fact happened (source time if known, else read time), RFC 3339.
    pub time: String,
    /// `<line>/<work-order>` or `<line>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The source's own sequence (counter value or record sequence), as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<String>,
    /// The business payload.
    pub data: EventData,
    /// Extension attribute: the event's sequence in the gateway's journal,
    /// set when a sink reads it (never stored), so the receiving side sees
    /// a gap without waiting for a checkpoint. Rises with every event the
    /// gateway stores, across all sources and lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journalseq: Option<u64>,
}

impl CloudEvent {
    /// Builds an event with the fixed envelope members filled in.
    pub fn new(
        id: Uuid,
        source: String,
        event_type: EventType,
        time: SystemTime,
        data: EventData,
    ) -> Self {
        let subject = Some(match &data.work_order {
            Some(order) => format!("{}/{}", data.line, order),
            None => data.line.clone(),
        });
        Self {
            specversion: SPEC_VERSION.to_owned(),
            id,
            source,
            event_type,
            time: rfc3339_millis(time),
            subject,
            datacontenttype: DATA_CONTENT_TYPE.to_owned(),
            sequence: None,
            data,
            journalseq: None,
        }
    }

    /// The JSON bytes every sink sends.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `payload` with the journal sequence written into its envelope as the
/// `journalseq` extension attribute. Only CloudEvents JSON as sources make
/// it (an object starting with `"specversion"`) is changed; anything else
/// is returned as it is.
pub fn with_journal_sequence(payload: Vec<u8>, seq: u64) -> Vec<u8> {
    const HEAD: &[u8] = b"{\"specversion\"";
    if !payload.starts_with(HEAD) {
        return payload;
    }
    let member = format!("{{\"journalseq\":{seq},");
    let mut out = Vec::with_capacity(payload.len() + member.len());
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(&payload[1..]);
    out
}

/// `urn:plant-edge:<site>:<gateway>:<source-name>`, the CloudEvents `source`.
pub fn source_urn(site: &str, gateway: &str, source_name: &str) -> String {
    format!("urn:plant-edge:{site}:{gateway}:{source_name}")
}

/// The latest time RFC 3339 (four-digit years) can write:
/// 9999-12-31T23:59:59.999Z.
pub fn latest_writable_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(253_402_300_799_999)
}

/// RFC 3339 UTC with milliseconds, as CloudEvents `time` expects. A time
/// past year 9999 (a peer's absurd timestamp) is written as the latest
/// writable one rather than failing: callers that take times from peers
/// clamp first and say so (see [`clamp_time`]).
pub fn rfc3339_millis(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time.min(latest_writable_time())).to_string()
}

/// `time`, or the latest writable time if it lies beyond; the flag says
/// whether it was clamped.
pub fn clamp_time(time: SystemTime) -> (SystemTime, bool) {
    let latest = latest_writable_time();
    if time > latest {
        (latest, true)
    } else {
        (time, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_past_year_9999_is_written_clamped_not_a_panic() {
        let far = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(300_000_000_000);
        assert_eq!(rfc3339_millis(far), "9999-12-31T23:59:59.999Z");
        assert_eq!(clamp_time(far), (latest_writable_time(), true));
        assert!(!clamp_time(SystemTime::UNIX_EPOCH).1);
    }

    fn sample() -> CloudEvent {
        CloudEvent::new(
            Uuid::nil(),
            source_urn("plant1", "gw1", "press1"),
            EventType::completion(),
            SystemTime::UNIX_EPOCH,
            EventData {
                site: "plant1".into(),
                line: "L1".into(),
                machine: "press1".into(),
                work_order: Some("WO-7".into()),
                material: None,
                quantity: Quantity::Count(3),
                unit: "EA".into(),
                lot: None,
                reason_code: None,
                counter: Some(CounterReading {
                    value: 18342,
                    previous: 18339,
                    epoch: 2,
                }),
                origin: Origin {
                    protocol: "modbus".into(),
                    endpoint: "tcp://127.0.0.1:502".into(),
                    address: "hr:100".into(),
                    quality: "good".into(),
                    source_time: None,
                },
                attributes: BTreeMap::new(),
                checkpoint: None,
            },
        )
    }

    #[test]
    fn envelope_has_cloudevents_required_members_and_integer_quantity() {
        let json: serde_json::Value = serde_json::from_slice(&sample().to_json()).expect("json");
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "production.completion");
        assert_eq!(json["source"], "urn:plant-edge:plant1:gw1:press1");
        assert_eq!(json["subject"], "L1/WO-7");
        assert_eq!(json["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["data"]["quantity"], serde_json::json!(3));
        assert_eq!(json["data"]["counter"]["epoch"], 2);
        assert!(json["data"].get("reason_code").is_none());
    }

    #[test]
    fn the_journal_sequence_is_written_into_the_envelope_once() {
        let sent = with_journal_sequence(sample().to_json(), 42);
        let back: CloudEvent = serde_json::from_slice(&sent).expect("decode");
        assert_eq!(back.journalseq, Some(42));
        assert_eq!(
            CloudEvent {
                journalseq: None,
                ..back
            },
            sample()
        );
        assert_eq!(with_journal_sequence(b"[1]".to_vec(), 42), b"[1]");
    }

    #[test]
    fn event_round_trips_through_json() {
        let event = sample();
        let back: CloudEvent = serde_json::from_slice(&event.to_json()).expect("decode");
        assert_eq!(back, event);
    }
}
