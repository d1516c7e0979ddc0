//! ERP profiles: the request in the ERP's own shape (templates) and its
//! answer read the way that ERP means it (rules), per event.
//!
//! Invariants:
//! - An event counts as delivered only when the answer says it was booked:
//!   a 2xx whose body says otherwise (JSON-RPC `error`, a per-record
//!   `ERROR`, a failed `$batch` changeset) is not a delivery.
//! - An answer the rules cannot read is doubt, never a delivery and never a
//!   dead letter: the event is held (alarmed) and, where a lookup is
//!   configured, the ERP is asked before it is posted again.
//! - Accepted-pending (queued, not booked) events stay in the journal until
//!   the ERP says booked (delivered) or failed (dead letter).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use minijinja::value::Value;
use serde::Deserialize;

use crate::render::{Escape, TemplateError, Templates, TemplatesBuilder};

fn json_type() -> String {
    "application/json".into()
}

fn yes() -> bool {
    true
}

fn default_poll_every() -> Duration {
    Duration::from_secs(5)
}

fn default_alarm_after() -> Duration {
    Duration::from_secs(15 * 60)
}

/// How a batch of events becomes one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatchShape {
    /// The body template loops over `events`.
    #[default]
    Template,
    /// OData `$batch`: each event's body (rendered alone) is one changeset
    /// `POST <odata_path>`; the answer has a status per changeset.
    Odata,
}

/// Headers that make a repeated request recognisable to ERPs that support it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Repeatability {
    /// None beyond `Idempotency-Key`.
    #[default]
    None,
    /// OASIS Repeatable Requests: `Repeatability-Request-ID` and
    /// `Repeatability-First-Sent`.
    Oasis,
    /// SAP: `RequestID` and `RepeatabilityCreation`.
    Sap,
}

/// `[sinks.<name>.request]`: the request in the ERP's own shape.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestConfig {
    /// Body template (inline).
    #[serde(default)]
    pub body: Option<String>,
    /// Body template in a file (relative to the configuration file).
    #[serde(default)]
    pub body_file: Option<PathBuf>,
    /// `Content-Type` of the body; JSON types escape every value as JSON.
    #[serde(default = "json_type")]
    pub content_type: String,
    /// Template appended to the sink's `url` (a path, a query).
    #[serde(default)]
    pub path: Option<String>,
    /// Header templates.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How a batch becomes one request.
    #[serde(default)]
    pub batch: BatchShape,
    /// `batch = "odata"`: the path each changeset posts to (a template).
    #[serde(default)]
    pub odata_path: Option<String>,
    /// IANA time zone for `local_date`/`local_time` (default: the system's).
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Attributes the sample event carries for `validate` (those the
    /// plant's events carry and templates use).
    #[serde(default)]
    pub sample_attributes: BTreeMap<String, String>,
    /// Send `Idempotency-Key` (default true).
    #[serde(default = "yes")]
    pub idempotency_key: bool,
    /// Repeatable-request headers.
    #[serde(default)]
    pub repeatability: Repeatability,
    /// SAP's CSRF token: fetched with `x-csrf-token: Fetch`, sent with
    /// every POST, fetched again once on `403` + `x-csrf-token: Required`.
    #[serde(default)]
    pub csrf: bool,
}

impl Default for RequestConfig {
    /// What a sink without `[request]` does: CloudEvents with
    /// `Idempotency-Key` (the serde defaults, not the types' zero values).
    fn default() -> Self {
        Self {
            body: None,
            body_file: None,
            content_type: json_type(),
            path: None,
            headers: BTreeMap::new(),
            batch: BatchShape::Template,
            odata_path: None,
            time_zone: None,
            sample_attributes: BTreeMap::new(),
            idempotency_key: true,
            repeatability: Repeatability::None,
            csrf: false,
        }
    }
}

/// `[sinks.<name>.answer]`: what a response means, per event.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerConfig {
    /// JSON pointer: present and not null in a 2xx body → refused (JSON-RPC
    /// `/error`).
    #[serde(default)]
    pub error: Option<String>,
    /// JSON pointer to the ERP's message (in the body, or in an item).
    #[serde(default)]
    pub message: Option<String>,
    /// JSON pointer to a state (in the body, or in an item).
    #[serde(default)]
    pub state: Option<String>,
    /// States that mean booked.
    #[serde(default)]
    pub booked: Vec<String>,
    /// States that mean refused.
    #[serde(default)]
    pub refused: Vec<String>,
    /// States that mean accepted, not yet booked.
    #[serde(default)]
    pub pending: Vec<String>,
    /// JSON pointer to a per-event array of results.
    #[serde(default)]
    pub items: Option<String>,
    /// JSON pointer, inside an item, to the echoed event id (else items
    /// match events by position).
    #[serde(default)]
    pub item_key: Option<String>,
    /// 2xx statuses that mean accepted, not yet booked (202 with
    /// `Location`).
    #[serde(default)]
    pub pending_statuses: Vec<u16>,
}

/// `[sinks.<name>.pending]`: asking the ERP about an accepted-pending event.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingConfig {
    /// Status URL template (the event's fields, `location`, `answer`).
    pub url: String,
    /// JSON pointer to the state in the status answer.
    pub state: String,
    /// States that mean booked.
    pub booked: Vec<String>,
    /// States that mean failed for good.
    pub failed: Vec<String>,
    /// JSON pointer to the ERP's message.
    #[serde(default)]
    pub message: Option<String>,
    /// How often to ask.
    #[serde(default = "default_poll_every", with = "humantime_serde_shim")]
    pub poll_every: Duration,
    /// Older than this: logged as an error and counted as overdue.
    #[serde(default = "default_alarm_after", with = "humantime_serde_shim")]
    pub alarm_after: Duration,
}

/// `[sinks.<name>.lookup]`: asking whether an event is already booked
/// before posting it again after a failure that left it in doubt.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// URL template (the event's fields).
    pub url: String,
    /// A JSON body template: the lookup is then a POST (JSON-RPC
    /// `search_read`); without one, a GET.
    #[serde(default)]
    pub body: Option<String>,
    /// JSON pointer: present (not null, not an empty list) → booked.
    #[serde(default)]
    pub found: Option<String>,
    /// JSON pointer to a state instead (D365's message state).
    #[serde(default)]
    pub state: Option<String>,
    /// States that mean booked.
    #[serde(default)]
    pub booked: Vec<String>,
    /// States that mean failed for good.
    #[serde(default)]
    pub failed: Vec<String>,
    /// States that mean accepted, not yet booked.
    #[serde(default)]
    pub pending: Vec<String>,
    /// JSON pointer to the ERP's message.
    #[serde(default)]
    pub message: Option<String>,
}

/// Durations as `"5s"` without a dependency on the agent's serde helpers.
mod humantime_serde_shim {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// A configuration problem: the key under the sink and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileError {
    /// Key under the sink's table (`request.body`).
    pub key: String,
    /// What is expected, with what was found.
    pub expected: String,
}

impl From<TemplateError> for ProfileError {
    fn from(e: TemplateError) -> Self {
        Self {
            expected: e.expected(),
            key: e.key,
        }
    }
}

fn problem(key: &str, expected: impl Into<String>) -> ProfileError {
    ProfileError {
        key: key.to_owned(),
        expected: expected.into(),
    }
}

/// A checked JSON pointer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pointer(String);

impl Pointer {
    fn parse(key: &str, text: &str) -> Result<Self, ProfileError> {
        if text.is_empty() || text.starts_with('/') {
            Ok(Self(text.to_owned()))
        } else {
            Err(problem(
                key,
                format!("a JSON pointer starting with '/' (RFC 6901), found {text:?}"),
            ))
        }
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value it points at (null counts as absent).
    pub fn find<'a>(&self, value: &'a serde_json::Value) -> Option<&'a serde_json::Value> {
        value.pointer(&self.0).filter(|v| !v.is_null())
    }

    /// The value as text (strings unquoted), if present.
    pub fn text(&self, value: &serde_json::Value) -> Option<String> {
        self.find(value).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

fn pointer(key: &str, text: &Option<String>) -> Result<Option<Pointer>, ProfileError> {
    text.as_deref().map(|t| Pointer::parse(key, t)).transpose()
}

/// What a state means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Meaning {
    /// Booked: delivered.
    Booked,
    /// Refused for good, with the ERP's message.
    Refused(String),
    /// Accepted, not yet booked.
    Pending(String),
    /// Not understood.
    Doubt(String),
}

/// State pointer with its value lists.
#[derive(Clone, Debug)]
pub struct StateRule {
    state: Option<Pointer>,
    booked: Vec<String>,
    refused: Vec<String>,
    pending: Vec<String>,
    message: Option<Pointer>,
}

impl StateRule {
    /// What `value` (a body or an item) says; `None` without a state pointer.
    pub fn meaning(&self, value: &serde_json::Value) -> Option<Meaning> {
        let pointer = self.state.as_ref()?;
        let message = self.message(value);
        Some(match pointer.text(value) {
            Some(s) if self.booked.contains(&s) => Meaning::Booked,
            Some(s) if self.refused.contains(&s) => {
                Meaning::Refused(message.unwrap_or_else(|| format!("state {s}")))
            }
            Some(s) if self.pending.contains(&s) => Meaning::Pending(s),
            Some(s) => Meaning::Doubt(format!(
                "state {s:?} at {} is not a configured one",
                pointer.0
            )),
            None => Meaning::Doubt(format!("no state at {}", pointer.0)),
        })
    }

    /// The ERP's message in `value`, if the rule names where.
    pub fn message(&self, value: &serde_json::Value) -> Option<String> {
        self.message.as_ref().and_then(|m| m.text(value))
    }
}

/// The answer rules, checked.
#[derive(Clone, Debug)]
pub struct AnswerRules {
    /// Refused when present in a 2xx body.
    pub error: Option<Pointer>,
    /// State of the whole answer, or of each item.
    pub state: StateRule,
    /// Per-event results.
    pub items: Option<Pointer>,
    /// Echoed event id inside an item.
    pub item_key: Option<Pointer>,
    /// 2xx statuses that mean accepted-pending.
    pub pending_statuses: Vec<u16>,
}

impl AnswerRules {
    /// Whether the 2xx body must be read at all (otherwise a 2xx is booked,
    /// as for CloudEvents endpoints).
    pub fn reads_body(&self) -> bool {
        self.error.is_some() || self.state.state.is_some() || self.items.is_some()
    }
}

/// Polling an accepted-pending event.
#[derive(Clone, Debug)]
pub struct PendingPoll {
    /// The state rule for the status answer (failed = refused).
    pub rule: StateRule,
    /// Poll interval.
    pub poll_every: Duration,
    /// Alarm bound.
    pub alarm_after: Duration,
}

/// Asking whether an event is booked.
#[derive(Clone, Debug)]
pub struct Lookup {
    /// Booked when present.
    pub found: Option<Pointer>,
    /// Or by state.
    pub rule: StateRule,
}

impl Lookup {
    /// What a lookup answer says.
    pub fn meaning(&self, value: &serde_json::Value) -> Meaning {
        if let Some(found) = &self.found {
            return match found.find(value) {
                Some(serde_json::Value::Array(items)) if items.is_empty() => {
                    Meaning::Doubt("not found".into())
                }
                Some(_) => Meaning::Booked,
                None => Meaning::Doubt("not found".into()),
            };
        }
        self.rule
            .meaning(value)
            .unwrap_or_else(|| Meaning::Doubt("not found".into()))
    }
}

/// Template keys.
pub mod keys {
    /// The body.
    pub const BODY: &str = "request.body";
    /// The path appended to the URL.
    pub const PATH: &str = "request.path";
    /// A changeset's path.
    pub const ODATA_PATH: &str = "request.odata_path";
    /// The pending status URL.
    pub const PENDING_URL: &str = "pending.url";
    /// The lookup URL.
    pub const LOOKUP_URL: &str = "lookup.url";
    /// The lookup's POST body.
    pub const LOOKUP_BODY: &str = "lookup.body";
    /// A header template: `request.headers.<name>`.
    pub fn header(name: &str) -> String {
        format!("request.headers.{name}")
    }
}

/// Everything that makes a sink speak one ERP's dialect.
#[derive(Clone, Debug)]
pub struct ErpProfile {
    /// Compiled templates (body, path, headers, pending and lookup URLs).
    pub templates: Templates,
    /// Whether the body comes from a template (else CloudEvents).
    pub templated_body: bool,
    /// Content type of a templated body.
    pub content_type: String,
    /// Whether a path template is set.
    pub path: bool,
    /// Header names with templates.
    pub headers: Vec<String>,
    /// Batch shape.
    pub batch: BatchShape,
    /// Send `Idempotency-Key`.
    pub idempotency_key: bool,
    /// Repeatable-request headers.
    pub repeatability: Repeatability,
    /// SAP CSRF dance.
    pub csrf: bool,
    /// Answer rules.
    pub answer: AnswerRules,
    /// Accepted-pending polling.
    pub pending: Option<PendingPoll>,
    /// Lookup before re-posting.
    pub lookup: Option<Lookup>,
    /// Sample attributes for `validate`.
    pub sample_attributes: BTreeMap<String, String>,
}

impl Default for ErpProfile {
    fn default() -> Self {
        Self {
            templates: TemplatesBuilder::new(jiff::tz::TimeZone::UTC).build(),
            templated_body: false,
            content_type: json_type(),
            path: false,
            headers: Vec::new(),
            batch: BatchShape::Template,
            idempotency_key: true,
            repeatability: Repeatability::None,
            csrf: false,
            answer: AnswerRules {
                error: None,
                state: StateRule {
                    state: None,
                    booked: Vec::new(),
                    refused: Vec::new(),
                    pending: Vec::new(),
                    message: None,
                },
                items: None,
                item_key: None,
                pending_statuses: Vec::new(),
            },
            pending: None,
            lookup: None,
            sample_attributes: BTreeMap::new(),
        }
    }
}

/// The sink's profile tables as written in the configuration.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ProfileConfig {
    /// `request`.
    #[serde(default)]
    pub request: Option<RequestConfig>,
    /// `answer`.
    #[serde(default)]
    pub answer: Option<AnswerConfig>,
    /// `pending`.
    #[serde(default)]
    pub pending: Option<PendingConfig>,
    /// `lookup`.
    #[serde(default)]
    pub lookup: Option<LookupConfig>,
}

impl ProfileConfig {
    /// Checks and compiles; `base` resolves a relative `body_file`;
    /// `batched` says whether the sink sends batches.
    pub fn check(&self, base: &Path, batched: bool) -> Result<ErpProfile, ProfileError> {
        let request = self.request.clone().unwrap_or_default();
        let zone = crate::render::plant_zone(request.time_zone.as_deref())
            .map_err(|e| problem("request.time_zone", e))?;
        let mut builder = TemplatesBuilder::new(zone);
        let body = crate::render::template_text(
            request.body.as_deref(),
            request.body_file.as_deref(),
            base,
        )
        .map_err(|e| problem("request.body_file", e))?;
        let escape = Escape::for_content_type(&request.content_type);
        if let Some(body) = &body {
            builder.add(keys::BODY, body, escape)?;
        }
        if self.request.is_some() && body.is_none() {
            return Err(problem(
                "request.body",
                "a body template (body or body_file) when [request] is set",
            ));
        }
        if let Some(path) = &request.path {
            builder.add(keys::PATH, path, Escape::None)?;
        }
        for (name, template) in &request.headers {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(problem(&keys::header(name), "a valid HTTP header name"));
            }
            let lower = name.to_ascii_lowercase();
            if [
                "authorization",
                "idempotency-key",
                "content-type",
                "x-csrf-token",
            ]
            .contains(&lower.as_str())
            {
                return Err(problem(
                    &keys::header(name),
                    "a header plant-edge does not set itself",
                ));
            }
            builder.add(&keys::header(name), template, Escape::None)?;
        }
        if request.batch == BatchShape::Odata {
            let path = request.odata_path.as_deref().ok_or_else(|| {
                problem(
                    "request.odata_path",
                    "the entity set each changeset posts to (e.g. \"ProdnOrdConf2\") with batch = \"odata\"",
                )
            })?;
            builder.add(keys::ODATA_PATH, path, Escape::None)?;
            if !batched {
                return Err(problem(
                    "request.batch",
                    "\"odata\" only with mode = \"batch\"",
                ));
            }
        }
        let answer = self.answer.clone().unwrap_or_default();
        let state_rule = StateRule {
            state: pointer("answer.state", &answer.state)?,
            booked: answer.booked.clone(),
            refused: answer.refused.clone(),
            pending: answer.pending.clone(),
            message: pointer("answer.message", &answer.message)?,
        };
        if state_rule.state.is_some() && answer.booked.is_empty() {
            return Err(problem(
                "answer.booked",
                "the states that mean booked, with answer.state",
            ));
        }
        if answer.items.is_some() && state_rule.state.is_none() {
            return Err(problem(
                "answer.state",
                "a JSON pointer to each item's state, with answer.items",
            ));
        }
        if let Some(s) = answer
            .pending_statuses
            .iter()
            .find(|s| !(200..300).contains(*s))
        {
            return Err(problem(
                "answer.pending_statuses",
                format!("2xx statuses, found {s}"),
            ));
        }
        let wants_pending = !answer.pending.is_empty() || !answer.pending_statuses.is_empty();
        let pending = match (&self.pending, wants_pending) {
            (Some(p), _) => {
                builder.add(keys::PENDING_URL, &p.url, Escape::None)?;
                if p.booked.is_empty() || p.failed.is_empty() {
                    return Err(problem("pending.booked", "the states that mean booked and failed (pending.failed)"));
                }
                if p.poll_every.is_zero() {
                    return Err(problem("pending.poll_every", "a duration above 0"));
                }
                Some(PendingPoll {
                    rule: StateRule {
                        state: Some(Pointer::parse("pending.state", &p.state)?),
                        booked: p.booked.clone(),
                        refused: p.failed.clone(),
                        pending: Vec::new(),
                        message: pointer("pending.message", &p.message)?,
                    },
                    poll_every: p.poll_every,
                    alarm_after: p.alarm_after,
                })
            }
            (None, true) => {
                return Err(problem(
                    "pending",
                    "a [pending] table (url, state, booked, failed) when answers can be accepted-pending",
                ))
            }
            (None, false) => None,
        };
        let lookup = match &self.lookup {
            Some(l) => {
                builder.add(keys::LOOKUP_URL, &l.url, Escape::None)?;
                if let Some(body) = &l.body {
                    builder.add(keys::LOOKUP_BODY, body, Escape::Json)?;
                }
                let rule = StateRule {
                    state: pointer("lookup.state", &l.state)?,
                    booked: l.booked.clone(),
                    refused: l.failed.clone(),
                    pending: l.pending.clone(),
                    message: pointer("lookup.message", &l.message)?,
                };
                if l.found.is_some() == rule.state.is_some() {
                    return Err(problem(
                        "lookup.found",
                        "either found (a JSON pointer) or state with booked/failed",
                    ));
                }
                if !l.pending.is_empty() && pending.is_none() {
                    return Err(problem(
                        "lookup.pending",
                        "a [pending] table to follow pending events",
                    ));
                }
                Some(Lookup {
                    found: pointer("lookup.found", &l.found)?,
                    rule,
                })
            }
            None => None,
        };
        Ok(ErpProfile {
            templates: builder.build(),
            templated_body: body.is_some(),
            content_type: request.content_type.clone(),
            path: request.path.is_some(),
            headers: request.headers.keys().cloned().collect(),
            batch: request.batch,
            idempotency_key: request.idempotency_key,
            repeatability: request.repeatability,
            csrf: request.csrf,
            answer: AnswerRules {
                error: pointer("answer.error", &answer.error)?,
                state: state_rule,
                items: pointer("answer.items", &answer.items)?,
                item_key: pointer("answer.item_key", &answer.item_key)?,
                pending_statuses: answer.pending_statuses.clone(),
            },
            pending,
            lookup,
            sample_attributes: request.sample_attributes,
        })
    }
}

impl ErpProfile {
    /// The body a sample event (a batch of two for batch bodies) renders
    /// to: what golden files keep for every shipped example.
    pub fn sample_body(&self, batched: bool) -> Result<String, ProfileError> {
        let sample = crate::render::sample_event(&self.sample_attributes);
        let value = crate::render::event_value(&sample).map_err(|e| problem("request", e))?;
        let key = ("batch_key", Value::from(sample.id.to_string()));
        let context = if batched && self.batch == BatchShape::Template {
            crate::render::batch_context(vec![value.clone(), value], &[key])
        } else {
            crate::render::single_context(&value, &[key])
        };
        Ok(self.templates.render(keys::BODY, &context)?)
    }

    /// `validate`: renders every template against a sample event (a batch
    /// of two for batch bodies) and checks that JSON bodies parse.
    pub fn check_rendering(&self, batched: bool) -> Result<(), ProfileError> {
        let sample = crate::render::sample_event(&self.sample_attributes);
        let value = crate::render::event_value(&sample).map_err(|e| problem("request", e))?;
        let single = crate::render::single_context(
            &value,
            &[
                ("location", Value::from("https://erp.example/status/1")),
                ("answer", Value::from(())),
                ("batch_key", Value::from(sample.id.to_string())),
            ],
        );
        let batch = crate::render::batch_context(
            vec![value.clone(), value.clone()],
            &[("batch_key", Value::from(sample.id.to_string()))],
        );
        let per_request = if batched && self.batch == BatchShape::Template {
            &batch
        } else {
            &single
        };
        if self.templated_body {
            let body = self.templates.render(keys::BODY, per_request)?;
            if Escape::for_content_type(&self.content_type) == Escape::Json {
                serde_json::from_str::<serde_json::Value>(&body).map_err(|e| {
                    let line = body.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
                    problem(
                        keys::BODY,
                        format!(
                            "a template that renders JSON; the sample event's body has {e}: `{}` (values are written as JSON already: write {{{{ work_order }}}}, not \"{{{{ work_order }}}}\", and {{% if %}} for literal commas)",
                            line.trim()
                        ),
                    )
                })?;
            }
        }
        if self.path {
            let path = self.templates.render(keys::PATH, per_request)?;
            if path.contains(char::is_whitespace) {
                return Err(problem(
                    keys::PATH,
                    format!("a path without spaces (use | urlencode), rendered {path:?}"),
                ));
            }
        }
        for name in &self.headers {
            let key = keys::header(name);
            let value = self.templates.render(&key, per_request)?;
            if reqwest::header::HeaderValue::from_str(&value).is_err() {
                return Err(problem(
                    &key,
                    format!("a valid header value, rendered {value:?}"),
                ));
            }
        }
        for key in [keys::ODATA_PATH, keys::PENDING_URL, keys::LOOKUP_URL] {
            if self.templates.has(key) {
                self.templates.render(key, &single)?;
            }
        }
        if self.templates.has(keys::LOOKUP_BODY) {
            let body = self.templates.render(keys::LOOKUP_BODY, &single)?;
            serde_json::from_str::<serde_json::Value>(&body).map_err(|e| {
                problem(
                    keys::LOOKUP_BODY,
                    format!("a template that renders JSON; the sample event's gives {e}"),
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(toml_text: &str) -> Result<ErpProfile, ProfileError> {
        let config: ProfileConfig = toml::from_str(toml_text).expect("toml");
        config.check(Path::new("."), true)
    }

    #[test]
    fn a_template_naming_a_missing_field_fails_validation_with_key_and_line() {
        let p = profile(
            "[request]\nbody = '''[\n{% for e in events %}{\"a\": {{ e.line }},\n \"b\": {{ e.shift }}}{% endfor %}]'''\n",
        )
        .expect("compiles");
        let e = p.check_rendering(true).expect_err("undefined");
        assert_eq!(e.key, "request.body");
        assert!(e.expected.contains("line 3"), "{e:?}");
    }

    #[test]
    fn a_quoted_value_in_a_json_template_is_caught_by_validate() {
        let p =
            profile("[request]\nbody = '{\"a\": \"{{ work_order }}\"}'\nbatch = \"template\"\n")
                .expect("compiles");
        let e = p.check_rendering(false).expect_err("bad JSON");
        assert!(e.expected.contains("not \"{{ work_order }}\""), "{e:?}");
    }

    #[test]
    fn pending_answers_need_a_pending_table_and_pointers_start_with_a_slash() {
        let e = profile("[answer]\npending_statuses = [202]\n").expect_err("no pending");
        assert_eq!(e.key, "pending");
        let e = profile("[answer]\nerror = \"error\"\n").expect_err("pointer");
        assert_eq!(e.key, "answer.error");
    }

    #[test]
    fn a_sink_without_a_request_table_keeps_sending_idempotency_key() {
        let p = profile("").expect("empty");
        assert!(p.idempotency_key && !p.templated_body && !p.csrf);
        assert_eq!(p.repeatability, Repeatability::None);
    }

    #[test]
    fn items_are_read_by_state_and_refusals_carry_the_erps_message() {
        let p = profile(
            "[answer]\nitems = \"/items\"\nstate = \"/InterfaceStatusCode\"\nbooked = [\"SUCCESS\"]\nrefused = [\"ERROR\"]\nmessage = \"/ErrorMessage\"\n",
        )
        .expect("compiles");
        let item = serde_json::json!({"InterfaceStatusCode": "ERROR", "ErrorMessage": "Work order 7 is closed"});
        assert_eq!(
            p.answer.state.meaning(&item),
            Some(Meaning::Refused("Work order 7 is closed".into()))
        );
        let odd = serde_json::json!({"InterfaceStatusCode": "WARNING"});
        assert!(matches!(
            p.answer.state.meaning(&odd),
            Some(Meaning::Doubt(_))
        ));
    }
}
