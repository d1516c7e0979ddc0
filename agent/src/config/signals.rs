//! What counters and records of every source kind share in the config:
//! their line and machine, type (fixed or from a code), reasons, units.

use super::*;

pub(super) fn default_max_step() -> u64 {
    1000
}

pub(super) fn default_unit_of_measure() -> String {
    "EA".into()
}

pub(super) fn default_scale() -> f64 {
    1.0
}

/// A signal's own line, machine and attributes (empty line/machine: the
/// source's).
pub(super) fn placement(
    line: Option<String>,
    machine: Option<String>,
    attributes: BTreeMap<String, String>,
) -> protocols::source::Placement {
    protocols::source::Placement {
        line: line.filter(|l| !l.is_empty()),
        machine: machine.filter(|m| !m.is_empty()),
        attributes,
        reasons: BTreeMap::new(),
    }
}

/// `reasons = { "17" = "jam at infeed" }` of a record: only with a
/// `reason_code` field to look up, and every reason readable text.
pub(super) fn record_reasons(
    reasons: BTreeMap<String, String>,
    has_reason_code: bool,
) -> Result<BTreeMap<String, String>, (String, String)> {
    if reasons.is_empty() {
        return Ok(reasons);
    }
    if !has_reason_code {
        return Err((
            "reasons".into(),
            "a record with a reason_code field (the reasons are looked up by its value)".into(),
        ));
    }
    if let Some((code, _)) = reasons.iter().find(|(_, text)| text.trim().is_empty()) {
        return Err((
            format!("reasons.{code}"),
            "a readable reason, like \"jam at infeed\"".into(),
        ));
    }
    Ok(reasons)
}

/// `type_from = { field = "kind", map = { "1" = "production.completion" } }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTypeFrom {
    field: String,
    map: BTreeMap<String, String>,
}

/// A record's event type: fixed (`type`) or from a field's code
/// (`type_from`), exactly one of them. Returns the type used where a code
/// is not known (dead letters) and the map.
pub(super) fn record_type(
    event_type: Option<String>,
    type_from: Option<RawTypeFrom>,
    has_field: impl Fn(&str) -> bool,
) -> Result<(buffer::EventType, Option<protocols::source::TypeFromField>), (String, String)> {
    match (event_type, type_from) {
        (Some(t), None) if !t.is_empty() => Ok((buffer::EventType(t), None)),
        (None, Some(from)) => {
            if !has_field(&from.field) {
                return Err((
                    "type_from.field".into(),
                    format!("one of the record's fields, found {:?}", from.field),
                ));
            }
            if from.map.is_empty() || from.map.values().any(|t| t.is_empty()) {
                return Err((
                    "type_from.map".into(),
                    "codes mapped to event types, like { \"1\" = \"production.completion\", \"2\" = \"production.scrap\" }".into(),
                ));
            }
            let fallback = from.map.values().next().cloned().unwrap_or_default();
            let map = from
                .map
                .into_iter()
                .map(|(code, t)| (code, buffer::EventType(t)))
                .collect();
            Ok((
                buffer::EventType(fallback),
                Some(protocols::source::TypeFromField {
                    field: from.field,
                    map,
                }),
            ))
        }
        _ => Err((
            "type".into(),
            "either type (an event type) or type_from (a field's code mapped to types), not both"
                .into(),
        )),
    }
}
