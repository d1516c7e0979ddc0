//! Turning OPC UA values into counter readings and record fields.
//!
//! Everything here is pure: a malformed record is an `Err` with a reason an
//! operator can act on, never a panic.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use opcua::types::{DataValue, DateTime, Variant};

use crate::counter::CounterWidth;
use crate::source::FieldValue;

/// A counter node's value as the shared counter rules want it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CounterValue {
    /// Integer counter: raw bit pattern and its width.
    Count(u64, CounterWidth),
    /// Measured amount that only grows (Double/Float).
    Measure(f64),
}

/// Reads a counter from a node value: UInt16/UInt32/UInt64/Int32 (bit
/// pattern, wraps like the PLC) or Double/Float (a measured amount).
pub fn counter_value(value: &Variant) -> Result<CounterValue, String> {
    Ok(match value {
        Variant::UInt16(v) => CounterValue::Count(u64::from(*v), CounterWidth::U16),
        Variant::Int16(v) => CounterValue::Count(u64::from(*v as u16), CounterWidth::U16),
        Variant::UInt32(v) => CounterValue::Count(u64::from(*v), CounterWidth::U32),
        Variant::Int32(v) => CounterValue::Count(u64::from(*v as u32), CounterWidth::U32),
        Variant::UInt64(v) => CounterValue::Count(*v, CounterWidth::U64),
        Variant::Int64(v) if *v >= 0 => CounterValue::Count(*v as u64, CounterWidth::U64),
        Variant::Double(v) if v.is_finite() && *v >= 0.0 => CounterValue::Measure(*v),
        Variant::Float(v) if v.is_finite() && *v >= 0.0 => CounterValue::Measure(f64::from(*v)),
        other => {
            return Err(format!(
                "expected UInt16, UInt32, UInt64, Int32 or a non-negative Double, found {}",
                describe(other)
            ))
        }
    })
}

/// A node value as a record field.
pub fn field_value(value: &Variant) -> Result<FieldValue, String> {
    Ok(match value {
        Variant::Boolean(b) => FieldValue::Bool(*b),
        Variant::SByte(v) => FieldValue::Int(i64::from(*v)),
        Variant::Byte(v) => FieldValue::Int(i64::from(*v)),
        Variant::Int16(v) => FieldValue::Int(i64::from(*v)),
        Variant::UInt16(v) => FieldValue::Int(i64::from(*v)),
        Variant::Int32(v) => FieldValue::Int(i64::from(*v)),
        Variant::UInt32(v) => FieldValue::Int(i64::from(*v)),
        Variant::Int64(v) => FieldValue::Int(*v),
        Variant::UInt64(v) => {
            FieldValue::Int(i64::try_from(*v).map_err(|_| format!("{v} is out of range"))?)
        }
        Variant::Float(v) => FieldValue::Float(f64::from(*v)),
        Variant::Double(v) => FieldValue::Float(*v),
        Variant::String(s) => FieldValue::Text(s.as_ref().to_owned()),
        Variant::LocalizedText(t) => FieldValue::Text(t.text.as_ref().to_owned()),
        Variant::DateTime(d) => FieldValue::Text(buffer::event::rfc3339_millis(system_time(d))),
        Variant::Guid(g) => FieldValue::Text(g.to_string()),
        other => return Err(format!("unsupported value {}", describe(other))),
    })
}

/// The type name an operator sees in a UA client, for error messages.
pub fn describe(value: &Variant) -> String {
    match value {
        Variant::Empty => "an empty value".into(),
        Variant::String(s) => format!("String {:?}", s.as_ref()),
        other => match other.type_id() {
            opcua::types::VariantTypeId::Scalar(t) => format!("{t:?}"),
            opcua::types::VariantTypeId::Array(t, _) => format!("an array of {t:?}"),
            opcua::types::VariantTypeId::Empty => "an empty value".into(),
        },
    }
}

/// A field of a JSON record: where it is and whether it must be there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonField {
    /// Field name in the canonical event (`work_order`, `quantity`, ...).
    pub name: String,
    /// RFC 6901 pointer into the record (`/order/id`).
    pub pointer: String,
    /// Missing or null is an error when required.
    pub required: bool,
}

/// Decodes a record published as a JSON string.
pub fn json_record(
    text: &str,
    fields: &[JsonField],
) -> Result<BTreeMap<String, FieldValue>, String> {
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("record is not JSON: {e}"))?;
    if !doc.is_object() {
        return Err("record is not a JSON object".into());
    }
    let mut values = BTreeMap::new();
    for field in fields {
        match doc.pointer(&field.pointer) {
            None | Some(serde_json::Value::Null) => {
                if field.required {
                    return Err(format!(
                        "missing field {} (JSON pointer {})",
                        field.name, field.pointer
                    ));
                }
            }
            Some(serde_json::Value::Bool(b)) => {
                values.insert(field.name.clone(), FieldValue::Bool(*b));
            }
            Some(serde_json::Value::Number(n)) => {
                let value = match n.as_i64() {
                    Some(i) => FieldValue::Int(i),
                    None => FieldValue::Float(n.as_f64().unwrap_or(f64::NAN)),
                };
                values.insert(field.name.clone(), value);
            }
            Some(serde_json::Value::String(s)) => {
                values.insert(field.name.clone(), FieldValue::Text(s.clone()));
            }
            Some(other) => {
                return Err(format!(
                    "field {} (JSON pointer {}) is {}, expected a string, number or boolean",
                    field.name,
                    field.pointer,
                    if other.is_array() {
                        "an array"
                    } else {
                        "an object"
                    }
                ))
            }
        }
    }
    check_fields(&values)?;
    Ok(values)
}

/// Checks the fields the canonical event gives a meaning to.
pub fn check_fields(values: &BTreeMap<String, FieldValue>) -> Result<(), String> {
    match values.get("quantity") {
        None => {}
        Some(FieldValue::Int(n)) if *n >= 0 => {}
        Some(FieldValue::Float(f)) if f.is_finite() && *f >= 0.0 => {}
        Some(FieldValue::Text(t)) => {
            return Err(format!(
                "field quantity is text {t:?}, expected a non-negative number"
            ))
        }
        Some(other) => {
            return Err(format!(
                "field quantity is {}, expected a non-negative number",
                other.text()
            ))
        }
    }
    Ok(())
}

/// Where the event's time came from, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSource {
    /// The device's SourceTimestamp.
    Source,
    /// The server's ServerTimestamp.
    Server,
    /// This gateway's clock.
    Gateway,
    /// The device's or server's timestamp lay past year 9999 and was
    /// clamped to 9999-12-31T23:59:59.999Z.
    Clamped,
}

impl TimeSource {
    /// As written into the event's attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeSource::Source => "source",
            TimeSource::Server => "server",
            TimeSource::Gateway => "gateway",
            TimeSource::Clamped => "clamped",
        }
    }
}

/// SourceTimestamp, then ServerTimestamp, then the gateway clock.
pub fn value_time(value: &DataValue, gateway_now: SystemTime) -> (SystemTime, TimeSource) {
    let usable = |t: &Option<DateTime>| t.as_ref().filter(|t| !t.is_null()).map(system_time);
    let clamped = |t: SystemTime, source| match buffer::event::clamp_time(t) {
        (t, false) => (t, source),
        (t, true) => (t, TimeSource::Clamped),
    };
    if let Some(t) = usable(&value.source_timestamp) {
        return clamped(t, TimeSource::Source);
    }
    if let Some(t) = usable(&value.server_timestamp) {
        return clamped(t, TimeSource::Server);
    }
    (gateway_now, TimeSource::Gateway)
}

fn system_time(t: &DateTime) -> SystemTime {
    let millis = t.as_chrono().timestamp_millis();
    if millis >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_millis(millis as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Vec<JsonField> {
        let f = |name: &str, pointer: &str, required| JsonField {
            name: name.into(),
            pointer: pointer.into(),
            required,
        };
        vec![
            f("sequence", "/seq", true),
            f("work_order", "/order", true),
            f("quantity", "/qty", true),
            f("lot", "/lot", false),
        ]
    }

    #[test]
    fn json_record_maps_fields_by_pointer() {
        let values =
            json_record(r#"{"seq":7,"order":"WO-1","qty":12.5}"#, &fields()).expect("valid record");
        assert_eq!(values["sequence"], FieldValue::Int(7));
        assert_eq!(values["work_order"], FieldValue::Text("WO-1".into()));
        assert_eq!(values["quantity"], FieldValue::Float(12.5));
        assert!(!values.contains_key("lot"), "optional field may be absent");
    }

    #[test]
    fn malformed_json_records_are_errors_with_the_reason() {
        let cases = [
            ("{not json", "not JSON"),
            ("[1,2]", "not a JSON object"),
            (r#"{"seq":7,"order":"WO-1"}"#, "missing field quantity"),
            (
                r#"{"seq":7,"order":"WO-1","qty":"ten"}"#,
                "quantity is text",
            ),
            (r#"{"seq":7,"order":"WO-1","qty":-3}"#, "non-negative"),
            (r#"{"seq":7,"order":{"id":1},"qty":1}"#, "is an object"),
        ];
        for (text, expected) in cases {
            let error = json_record(text, &fields()).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn counter_values_keep_their_width_and_bit_pattern() {
        assert_eq!(
            counter_value(&Variant::UInt16(65535)),
            Ok(CounterValue::Count(65535, CounterWidth::U16))
        );
        assert_eq!(
            counter_value(&Variant::Int32(-1)),
            Ok(CounterValue::Count(u32::MAX as u64, CounterWidth::U32))
        );
        assert_eq!(
            counter_value(&Variant::Double(2.5)),
            Ok(CounterValue::Measure(2.5))
        );
        assert!(counter_value(&Variant::String("12".into())).is_err());
        assert!(counter_value(&Variant::Double(f64::NAN)).is_err());
    }

    #[test]
    fn time_prefers_source_then_server_then_gateway() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut value = DataValue::new_now(Variant::UInt32(1));
        value.source_timestamp = None;
        assert_eq!(value_time(&value, now).1, TimeSource::Server);
        value.server_timestamp = None;
        assert_eq!(value_time(&value, now), (now, TimeSource::Gateway));
        value.source_timestamp = Some(DateTime::now());
        assert_eq!(value_time(&value, now).1, TimeSource::Source);
    }

    #[test]
    fn a_timestamp_past_year_9999_is_clamped_and_marked() {
        let mut value = DataValue::new_now(Variant::UInt32(1));
        value.source_timestamp = Some(DateTime::ymd_hms(12000, 1, 1, 0, 0, 0));
        let (time, source) = value_time(&value, SystemTime::UNIX_EPOCH);
        assert_eq!(source, TimeSource::Clamped);
        assert_eq!(
            buffer::event::rfc3339_millis(time),
            "9999-12-31T23:59:59.999Z"
        );
    }
}
