//! Templates that put events into a peer's own shape (an ERP's request
//! body, URL path and headers; an MQTT payload), with MiniJinja.
//!
//! Invariants:
//! - Undefined is strict: a field the event does not have is an error,
//!   never an empty string (`| default(…)` says otherwise explicitly).
//! - A template whose output is JSON escapes every value as JSON
//!   (`{{ work_order }}` writes `"WO-7"`, quotes included), so no value can
//!   break out of its place in the body.
//! - Rendering is bounded (MiniJinja's fuel): a template cannot loop forever.
//! - An event that does not render is the caller's dead letter with the
//!   reason, never a silent drop.

use std::collections::BTreeMap;
use std::sync::Arc;

use buffer::PendingEvent;
use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};

/// Instructions one render may spend (loops over a batch of 10,000 events
/// and a dozen fields each use about a tenth of it).
const FUEL: u64 = 5_000_000;

/// How a template's values are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escape {
    /// Each value as JSON (the output is a JSON document).
    Json,
    /// As text (URL paths, headers, XML with explicit filters).
    None,
}

impl Escape {
    /// JSON for JSON content types, text otherwise.
    pub fn for_content_type(content_type: &str) -> Self {
        if content_type.to_ascii_lowercase().contains("json") {
            Escape::Json
        } else {
            Escape::None
        }
    }
}

/// A template that did not compile or render: names the configuration key
/// and the line in the template.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("template {key}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct TemplateError {
    /// The configuration key the template came from (`request.body`).
    pub key: String,
    /// Line in the template, where MiniJinja knows it.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl TemplateError {
    /// What a configuration check expects, said with this error.
    pub fn expected(&self) -> String {
        let line = self
            .line
            .map(|l| format!(" (template line {l})"))
            .unwrap_or_default();
        format!(
            "a template that renders every event{line}: {}",
            self.message
        )
    }

    fn from_minijinja(key: &str, error: &minijinja::Error) -> Self {
        let mut message = match error.kind() {
            ErrorKind::UndefinedError => "undefined value (the event has no such field; use `| default(...)` if it is optional)".to_owned(),
            _ => error.kind().to_string(),
        };
        if let Some(detail) = error.detail() {
            message.push_str(": ");
            message.push_str(detail);
        }
        // The source line, so the operator sees which use is undefined.
        if let (Some(source), Some(range)) = (error.template_source(), error.range()) {
            let snippet: String = source
                .get(range)
                .unwrap_or_default()
                .chars()
                .take(80)
                .collect();
            if !snippet.is_empty() {
                message.push_str(&format!(" (at `{snippet}`)"));
            }
        }
        Self {
            key: key.to_owned(),
            line: error.line(),
            message,
        }
    }
}

/// The plant's time zone for the date helpers: `name` (IANA) or, without
/// one, the system's. `Err` says what was expected.
pub fn plant_zone(name: Option<&str>) -> Result<jiff::tz::TimeZone, String> {
    match name {
        Some(name) => jiff::tz::TimeZone::get(name).map_err(|e| {
            format!("an IANA time zone such as \"Europe/Berlin\", found {name:?} ({e})")
        }),
        None => Ok(jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC)),
    }
}

/// A template given inline or in a file (relative to `base`, the
/// configuration file's directory); `None` when neither is set. `Err`
/// says what was expected.
pub fn template_text(
    inline: Option<&str>,
    file: Option<&std::path::Path>,
    base: &std::path::Path,
) -> Result<Option<String>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err("either the template or its file, not both".into()),
        (Some(text), None) => Ok(Some(text.to_owned())),
        (None, Some(file)) => {
            let path = base.join(file);
            std::fs::read_to_string(&path)
                .map(Some)
                .map_err(|e| format!("a readable template file ({}: {e})", path.display()))
        }
        (None, None) => Ok(None),
    }
}

/// A set of named templates sharing helpers and the plant's time zone.
#[derive(Clone)]
pub struct Templates {
    env: Arc<Environment<'static>>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

/// Builds a [`Templates`] set: add each template, then [`Self::build`].
pub struct TemplatesBuilder {
    env: Environment<'static>,
}

impl TemplatesBuilder {
    /// An empty set whose date helpers use `zone` (the plant's time zone).
    pub fn new(zone: jiff::tz::TimeZone) -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        // Escaping is chosen per template by its name's suffix (see `add`).
        env.set_auto_escape_callback(|name| {
            if name.ends_with("#json") {
                AutoEscape::Json
            } else {
                AutoEscape::None
            }
        });
        env.add_filter("odata_date", odata_date);
        env.add_filter(
            "epoch_ms",
            |value: Value| -> Result<i64, minijinja::Error> {
                Ok(instant(&value)?.as_millisecond())
            },
        );
        env.add_filter("decimal", decimal);
        let date_zone = zone.clone();
        env.add_filter(
            "local_date",
            move |value: Value, format: Option<String>| -> Result<String, minijinja::Error> {
                local(&value, &date_zone, format.as_deref().unwrap_or("%Y-%m-%d"))
            },
        );
        env.add_filter(
            "local_time",
            move |value: Value, format: Option<String>| -> Result<String, minijinja::Error> {
                local(
                    &value,
                    &zone,
                    format.as_deref().unwrap_or("%Y-%m-%dT%H:%M:%S"),
                )
            },
        );
        Self { env }
    }

    /// Compiles `source` under `key` (the configuration key, used in
    /// errors and to render it).
    pub fn add(&mut self, key: &str, source: &str, escape: Escape) -> Result<(), TemplateError> {
        let name = match escape {
            Escape::Json => format!("{key}#json"),
            Escape::None => key.to_owned(),
        };
        self.env
            .add_template_owned(name, source.to_owned())
            .map_err(|e| TemplateError::from_minijinja(key, &e))
    }

    /// The finished set.
    pub fn build(self) -> Templates {
        Templates {
            env: Arc::new(self.env),
        }
    }
}

impl Templates {
    /// Renders the template added under `key` with `context`.
    pub fn render(&self, key: &str, context: &Value) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(&format!("{key}#json"))
            .or_else(|_| self.env.get_template(key))
            .map_err(|e| TemplateError::from_minijinja(key, &e))?;
        template
            .render(context.clone())
            .map_err(|e| TemplateError::from_minijinja(key, &e))
    }

    /// Whether a template was added under `key`.
    pub fn has(&self, key: &str) -> bool {
        self.env.get_template(key).is_ok() || self.env.get_template(&format!("{key}#json")).is_ok()
    }
}

/// An event as templates see it: the CloudEvents members (`id`, `source`,
/// `type`, `time`, `subject`, `sequence`), every member of `data` at the
/// top level (`line`, `work_order`, `quantity`, `counter`, `attributes`,
/// …), `data` itself, `seq` (the journal sequence) and `cloudevent` (the
/// whole envelope). Members the event does not have are undefined.
///
/// Members are converted when a template reads them, not before: a body
/// that uses eight fields pays for eight.
pub fn event_value(event: &PendingEvent) -> Result<Value, String> {
    // Every payload in the journal is a `buffer::CloudEvent`: read as that
    // type it costs a third of a JSON tree. Anything else is read as JSON.
    if let Ok(typed) = serde_json::from_slice::<buffer::CloudEvent>(&event.payload) {
        return Ok(Value::from_object(TypedEvent {
            event: typed,
            seq: event.seq,
        }));
    }
    let envelope: serde_json::Value = serde_json::from_slice(&event.payload)
        .map_err(|e| format!("event {} is not JSON: {e}", event.id))?;
    if !envelope.is_object() {
        return Err(format!("event {} is not a JSON object", event.id));
    }
    Ok(Value::from_object(EventObject {
        envelope,
        seq: event.seq,
    }))
}

/// A canonical event behind [`event_value`], its members converted when
/// read.
#[derive(Debug)]
struct TypedEvent {
    event: buffer::CloudEvent,
    seq: u64,
}

/// Members of a [`TypedEvent`], for enumeration.
const TYPED_MEMBERS: &[&str] = &[
    "id",
    "source",
    "type",
    "time",
    "subject",
    "sequence",
    "specversion",
    "datacontenttype",
    "site",
    "line",
    "machine",
    "work_order",
    "material",
    "quantity",
    "unit",
    "lot",
    "reason_code",
    "counter",
    "origin",
    "attributes",
    "data",
    "seq",
    "cloudevent",
];

impl minijinja::value::Object for TypedEvent {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        let e = &self.event;
        let d = &e.data;
        let text = |s: &str| Some(Value::from(s));
        let optional = |s: &Option<String>| s.as_deref().map(Value::from);
        match key {
            "id" => Some(Value::from(e.id.to_string())),
            "source" => text(&e.source),
            "type" => text(e.event_type.as_str()),
            "time" => text(&e.time),
            "subject" => optional(&e.subject),
            "sequence" => optional(&e.sequence),
            "specversion" => text(&e.specversion),
            "datacontenttype" => text(&e.datacontenttype),
            "site" => text(&d.site),
            "line" => text(&d.line),
            "machine" => text(&d.machine),
            "work_order" => optional(&d.work_order),
            "material" => optional(&d.material),
            "quantity" => Some(match d.quantity {
                buffer::Quantity::Count(n) => Value::from(n),
                buffer::Quantity::Measure(x) => Value::from(x),
            }),
            "unit" => text(&d.unit),
            "lot" => optional(&d.lot),
            "reason_code" => optional(&d.reason_code),
            "counter" => d
                .counter
                .as_ref()
                .map(|c| Value::from(minijinja::value::Serde(c))),
            "origin" => Some(Value::from(minijinja::value::Serde(&d.origin))),
            "attributes" => Some(Value::from(minijinja::value::Serde(&d.attributes))),
            "data" => Some(Value::from(minijinja::value::Serde(d))),
            "seq" => Some(Value::from(self.seq)),
            "cloudevent" => Some(Value::from(minijinja::value::Serde(e))),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> minijinja::value::Enumerator {
        minijinja::value::Enumerator::Str(TYPED_MEMBERS)
    }
}

/// An event that is not a canonical one (read as JSON), converted lazily.
#[derive(Debug)]
struct EventObject {
    envelope: serde_json::Value,
    seq: u64,
}

impl EventObject {
    fn data(&self) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.envelope.get("data").and_then(|d| d.as_object())
    }
}

impl minijinja::value::Object for EventObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        match key {
            "seq" => return Some(Value::from(self.seq)),
            "cloudevent" => return Some(json_value(&self.envelope)),
            "data" => return self.envelope.get("data").map(json_value),
            _ => {}
        }
        self.data()
            .and_then(|d| d.get(key))
            .or_else(|| self.envelope.get(key))
            .map(json_value)
    }

    fn enumerate(self: &Arc<Self>) -> minijinja::value::Enumerator {
        let mut keys: Vec<Value> = ["seq", "cloudevent"].into_iter().map(Value::from).collect();
        if let Some(data) = self.data() {
            keys.extend(data.keys().map(|k| Value::from(k.as_str())));
        }
        if let Some(members) = self.envelope.as_object() {
            keys.extend(members.keys().map(|k| Value::from(k.as_str())));
        }
        minijinja::value::Enumerator::Values(keys)
    }
}

/// A JSON value for templates (null members count as absent upstream).
fn json_value(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Value::from(u),
            (None, Some(i)) => Value::from(i),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(text) => Value::from(text.as_str()),
        other => Value::from(minijinja::value::Serde(other)),
    }
}

/// Context for one event's request: its fields at the top level, also as
/// `event`, and `events` (a list of one), plus `extra`.
pub fn single_context(event: &Value, extra: &[(&str, Value)]) -> Value {
    let mut map: BTreeMap<String, Value> = BTreeMap::new();
    map.insert("event".into(), event.clone());
    map.insert("events".into(), Value::from(vec![event.clone()]));
    for (k, v) in extra {
        map.insert((*k).to_owned(), v.clone());
    }
    // `extra` and `event`/`events` first, then the event's own members.
    minijinja::value::merge_maps([Value::from(map), event.clone()])
}

/// Context for a batch: `events` in journal order, plus `extra`.
pub fn batch_context(events: Vec<Value>, extra: &[(&str, Value)]) -> Value {
    let mut map: BTreeMap<String, Value> = BTreeMap::new();
    map.insert("events".into(), Value::from(events));
    for (k, v) in extra {
        map.insert((*k).to_owned(), v.clone());
    }
    Value::from(map)
}

/// A complete sample event (every optional member set) for `validate`:
/// a template that renders it renders every well-formed event with the
/// same members. `attributes` are the ones the plant's events carry.
pub fn sample_event(attributes: &BTreeMap<String, String>) -> PendingEvent {
    let event = buffer::CloudEvent::new(
        uuid::Uuid::from_u128(0x6f1c_2b7e_58a4_5d3c_9e21_4b7a_0c5d_e8f1),
        buffer::event::source_urn("plant1", "gw1", "press1"),
        buffer::EventType::completion(),
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_196_265_123),
        buffer::EventData {
            site: "plant1".into(),
            line: "L1".into(),
            machine: "press1".into(),
            work_order: Some("1000123".into()),
            material: Some("FG-100".into()),
            quantity: buffer::Quantity::Count(3),
            unit: "EA".into(),
            lot: Some("LOT-7".into()),
            reason_code: Some("R01".into()),
            counter: Some(buffer::event::CounterReading {
                value: 18342,
                previous: 18339,
                epoch: 2,
            }),
            origin: buffer::Origin {
                protocol: "modbus".into(),
                endpoint: "tcp://192.0.2.10:502".into(),
                address: "hr:100".into(),
                quality: "good".into(),
                source_time: Some("2025-11-26T22:31:05.123Z".into()),
            },
            attributes: attributes.clone(),
            checkpoint: None,
        },
    );
    PendingEvent {
        seq: 18342,
        id: event.id,
        source: "press1".into(),
        class: buffer::EventClass::Business,
        appended_ms: 1_764_196_265_123,
        payload: event.to_json(),
    }
}

fn bad(message: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, message.into())
}

/// An instant from an RFC 3339 text (the event's `time`), a date
/// (`2025-11-26`: its midnight UTC, as OData V2 carries dates) or
/// milliseconds.
fn instant(value: &Value) -> Result<jiff::Timestamp, minijinja::Error> {
    if let Some(text) = value.as_str() {
        if let Ok(date) = text.parse::<jiff::civil::Date>() {
            return date
                .to_zoned_datetime(jiff::tz::TimeZone::UTC)
                .map(|z| z.timestamp())
                .map_err(|e| bad(format!("{text:?}: {e}")));
        }
        return text
            .parse::<jiff::Timestamp>()
            .map_err(|e| bad(format!("{text:?} is not an RFC 3339 time: {e}")));
    }
    if let Ok(ms) = i64::try_from(value.clone()) {
        return jiff::Timestamp::from_millisecond(ms)
            .map_err(|e| bad(format!("{ms} ms is out of range: {e}")));
    }
    Err(bad(format!(
        "{value} is neither a time text nor milliseconds"
    )))
}

/// OData V2 `Edm.DateTime` as JSON wants it: `/Date(1764196265123)/`.
fn odata_date(value: Value) -> Result<String, minijinja::Error> {
    Ok(format!("/Date({})/", instant(&value)?.as_millisecond()))
}

fn local(
    value: &Value,
    zone: &jiff::tz::TimeZone,
    format: &str,
) -> Result<String, minijinja::Error> {
    let zoned = instant(value)?.to_zoned_datetime(zone.clone());
    let mut out = String::new();
    jiff::fmt::strtime::format(format, &zoned)
        .map(|text| {
            out = text;
        })
        .map_err(|e| bad(format!("format {format:?}: {e}")))?;
    Ok(out)
}

/// A quantity as ERPs want it in JSON: a decimal text (`"3"`, `"2.500"`).
fn decimal(value: Value, places: Option<u32>) -> Result<String, minijinja::Error> {
    let places = places.unwrap_or(0).min(9);
    if let Ok(whole) = i64::try_from(value.clone()) {
        if places == 0 {
            return Ok(whole.to_string());
        }
        return Ok(format!("{whole}.{}", "0".repeat(places as usize)));
    }
    let number =
        f64::try_from(value.clone()).map_err(|_| bad(format!("{value} is not a number")))?;
    if !number.is_finite() {
        return Err(bad(format!("{number} is not a finite number")));
    }
    Ok(format!("{number:.*}", places as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn templates(key: &str, source: &str, escape: Escape) -> Result<Templates, TemplateError> {
        let zone = jiff::tz::TimeZone::get("Europe/Berlin").expect("zone");
        let mut builder = TemplatesBuilder::new(zone);
        builder.add(key, source, escape)?;
        Ok(builder.build())
    }

    fn sample() -> Value {
        event_value(&sample_event(&BTreeMap::new())).expect("sample")
    }

    #[test]
    fn json_templates_escape_every_value_so_none_breaks_the_body() {
        let t = templates(
            "request.body",
            r#"{"order": {{ work_order }}, "qty": {{ quantity | decimal }}, "note": {{ note }}}"#,
            Escape::Json,
        )
        .expect("compiles");
        let context = single_context(&sample(), &[("note", Value::from("a \"quoted\"\n}"))]);
        let body = t.render("request.body", &context).expect("renders");
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(parsed["order"], "1000123");
        assert_eq!(parsed["qty"], "3");
        assert_eq!(parsed["note"], "a \"quoted\"\n}");
    }

    #[test]
    fn a_missing_field_is_an_error_naming_key_line_and_use_never_an_empty_string() {
        let t = templates(
            "request.body",
            "{\n  \"a\": {{ line }},\n  \"b\": {{ shift_leader }}\n}",
            Escape::Json,
        )
        .expect("compiles");
        let e = t
            .render("request.body", &single_context(&sample(), &[]))
            .expect_err("undefined");
        assert_eq!(e.key, "request.body");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("undefined"), "{e}");
        assert!(e.to_string().contains("shift_leader"), "{e}");
        let optional =
            templates("b", "{{ shift_leader | default('none') }}", Escape::None).expect("compiles");
        assert_eq!(
            optional
                .render("b", &single_context(&sample(), &[]))
                .expect("renders"),
            "none"
        );
    }

    #[test]
    fn a_syntax_error_names_key_and_line() {
        let e = templates("request.path", "ok\n{% for e in events %}", Escape::None)
            .expect_err("unclosed");
        assert_eq!(e.key, "request.path");
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn erp_helpers_give_odata_dates_local_dates_and_decimal_texts() {
        // 2025-11-26T22:31:05.123Z is already the 26th... and 23:31 in Berlin.
        let t = templates(
            "x",
            "{{ time | odata_date }} {{ time | local_date }} {{ time | local_time('%H:%M') }} {{ 2.5 | decimal(3) }} {{ time | epoch_ms }} {{ time | local_date | odata_date }}",
            Escape::None,
        )
        .expect("compiles");
        let out = t
            .render("x", &single_context(&sample(), &[]))
            .expect("renders");
        assert_eq!(
            out,
            "/Date(1764196265123)/ 2025-11-26 23:31 2.500 1764196265123 /Date(1764115200000)/"
        );
    }

    #[test]
    fn a_local_date_follows_the_plants_zone_across_midnight() {
        let t = templates(
            "x",
            "{{ '2025-11-26T23:30:00Z' | local_date }}",
            Escape::None,
        )
        .expect("compiles");
        assert_eq!(
            t.render("x", &Value::from(())).expect("renders"),
            "2025-11-27"
        );
    }

    #[test]
    fn batches_loop_over_events_and_fields_reach_the_counter_and_journal_sequence() {
        let t = templates(
            "request.body",
            "[{% for e in events %}{{ e.id }}{% if not loop.last %},{% endif %}{% endfor %}] {{ events[0].counter.value }} {{ events[0].seq }}",
            Escape::Json,
        )
        .expect("compiles");
        let out = t
            .render(
                "request.body",
                &batch_context(vec![sample(), sample()], &[]),
            )
            .expect("renders");
        assert_eq!(
            out,
            "[\"6f1c2b7e-58a4-5d3c-9e21-4b7a0c5de8f1\",\"6f1c2b7e-58a4-5d3c-9e21-4b7a0c5de8f1\"] 18342 18342"
        );
    }

    #[test]
    fn an_event_that_is_not_a_canonical_one_is_read_as_json_with_every_member() {
        let event = PendingEvent {
            seq: 9,
            id: uuid::Uuid::nil(),
            source: "x".into(),
            class: buffer::EventClass::Business,
            appended_ms: 0,
            payload: br#"{"id":"legacy-1","type":"production.completion","data":{"line":"L9","extra":{"shift":"B"}}}"#.to_vec(),
        };
        let value = event_value(&event).expect("json");
        let t = templates(
            "x",
            "{{ id }} {{ line }} {{ extra.shift }} {{ seq }}",
            Escape::None,
        )
        .expect("compiles");
        assert_eq!(
            t.render("x", &single_context(&value, &[]))
                .expect("renders"),
            "legacy-1 L9 B 9"
        );
    }

    #[test]
    fn an_endless_loop_runs_out_of_fuel_instead_of_hanging() {
        let t = templates(
            "x",
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            Escape::None,
        )
        .expect("compiles");
        assert!(t.render("x", &Value::from(())).is_err());
    }
}

/// `[sinks.<name>.payload]` of a message sink (MQTT): the payload from a
/// template instead of the CloudEvent.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// The template (inline).
    #[serde(default)]
    pub template: Option<String>,
    /// The template in a file (relative to the configuration file).
    #[serde(default)]
    pub template_file: Option<std::path::PathBuf>,
    /// Content type (MQTT 5 property); JSON types escape values as JSON.
    #[serde(default = "default_payload_type")]
    pub content_type: String,
    /// IANA time zone for the date helpers (default: the system's).
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Attributes the sample event for `validate` carries.
    #[serde(default)]
    pub sample_attributes: BTreeMap<String, String>,
}

fn default_payload_type() -> String {
    "application/json".into()
}

/// A checked payload template.
#[derive(Clone, Debug)]
pub struct PayloadTemplate {
    templates: Templates,
    /// Content type of what it renders.
    pub content_type: String,
}

/// The template key of a payload.
pub const PAYLOAD_KEY: &str = "payload.template";

impl PayloadConfig {
    /// Compiles and renders the sample event; `(key, expected)` on error.
    pub fn check(&self, base: &std::path::Path) -> Result<PayloadTemplate, (String, String)> {
        let zone = plant_zone(self.time_zone.as_deref())
            .map_err(|e| ("payload.time_zone".to_owned(), e))?;
        let source = template_text(
            self.template.as_deref(),
            self.template_file.as_deref(),
            base,
        )
        .map_err(|e| ("payload.template_file".to_owned(), e))?
        .ok_or_else(|| {
            (
                "payload.template".to_owned(),
                "a template or a template_file".to_owned(),
            )
        })?;
        let escape = Escape::for_content_type(&self.content_type);
        let mut builder = TemplatesBuilder::new(zone);
        builder
            .add(PAYLOAD_KEY, &source, escape)
            .map_err(|e| (e.key.clone(), e.expected()))?;
        let payload = PayloadTemplate {
            templates: builder.build(),
            content_type: self.content_type.clone(),
        };
        let sample = sample_event(&self.sample_attributes);
        let rendered = payload
            .render(&sample)
            .map_err(|e| (PAYLOAD_KEY.to_owned(), e))?;
        if escape == Escape::Json {
            serde_json::from_slice::<serde_json::Value>(&rendered).map_err(|e| {
                (
                    PAYLOAD_KEY.to_owned(),
                    format!("a template that renders JSON; the sample event's payload has {e} (values are written as JSON already: write {{{{ line }}}}, not \"{{{{ line }}}}\")"),
                )
            })?;
        }
        Ok(payload)
    }
}

impl PayloadTemplate {
    /// The payload for `event`; `Err` is the dead letter's reason.
    pub fn render(&self, event: &PendingEvent) -> Result<Vec<u8>, String> {
        let value = event_value(event)?;
        self.templates
            .render(PAYLOAD_KEY, &single_context(&value, &[]))
            .map(String::into_bytes)
            .map_err(|e| e.to_string())
    }
}
