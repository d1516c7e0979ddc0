//! `kind = "opcua"` sources: raw config, defaults and checks.

use super::*;

pub(super) fn default_security() -> String {
    "None".into()
}

pub(super) fn default_opcua_mode() -> String {
    "subscription".into()
}

pub(super) fn default_publishing_interval() -> Duration {
    Duration::from_millis(500)
}

pub(super) fn default_sampling_interval() -> RawSampling {
    RawSampling::Text("250ms".into())
}

/// `sampling_interval`: a duration, or -1 (OPC UA's "the publishing
/// interval") as a number or a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawSampling {
    Number(i64),
    Text(String),
}

impl RawSampling {
    fn parse(&self) -> Result<Sampling, String> {
        const EXPECTED: &str =
            "a duration (\"250ms\"; \"0s\" = the server's fastest rate) or -1 (the publishing interval)";
        match self {
            RawSampling::Number(-1) => Ok(Sampling::PublishingInterval),
            RawSampling::Number(0) => Ok(Sampling::Every(Duration::ZERO)),
            RawSampling::Text(text) if text.trim() == "-1" => Ok(Sampling::PublishingInterval),
            RawSampling::Text(text) => humantime::parse_duration(text.trim())
                .map(Sampling::Every)
                .map_err(|e| format!("{EXPECTED}, found {text:?} ({e})")),
            RawSampling::Number(n) => Err(format!("{EXPECTED}, found {n}")),
        }
    }
}

pub(super) fn default_queue_size() -> u32 {
    100
}

pub(super) fn default_keep_alive_count() -> u32 {
    10
}

pub(super) fn default_lifetime_count() -> u32 {
    60
}

pub(super) fn default_opcua_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOpcUa {
    endpoint: String,
    #[serde(default = "default_security")]
    security_policy: String,
    #[serde(default = "default_security")]
    security_mode: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    user_certificate: Option<PathBuf>,
    #[serde(default)]
    user_private_key: Option<PathBuf>,
    #[serde(default)]
    pki_dir: Option<PathBuf>,
    #[serde(default)]
    trust_unknown_server: bool,
    #[serde(default = "default_opcua_mode")]
    mode: String,
    #[serde(default = "default_publishing_interval", with = "humantime_serde")]
    publishing_interval: Duration,
    #[serde(default = "default_sampling_interval")]
    sampling_interval: RawSampling,
    #[serde(default = "default_queue_size")]
    queue_size: u32,
    #[serde(default = "default_keep_alive_count")]
    keep_alive_count: u32,
    #[serde(default = "default_lifetime_count")]
    lifetime_count: u32,
    #[serde(default = "default_interval", with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(default = "default_opcua_timeout", with = "humantime_serde")]
    timeout: Duration,
    line: String,
    machine: String,
    #[serde(default)]
    pub(super) sinks: Option<Vec<String>>,
    #[serde(default)]
    pub(super) attributes: BTreeMap<String, String>,
    #[serde(default)]
    counters: Vec<RawNodeCounter>,
    #[serde(default)]
    records: Vec<RawNodeRecord>,
    #[serde(default)]
    rings: Vec<RawNodeRing>,
}

/// A ring buffer of JSON records (see `sources/opcua/ring.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNodeRing {
    #[serde(default)]
    line: Option<String>,
    #[serde(default)]
    machine: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    signal: String,
    #[serde(rename = "type", default)]
    event_type: Option<String>,
    #[serde(default)]
    type_from: Option<RawTypeFrom>,
    #[serde(default)]
    reasons: BTreeMap<String, String>,
    array: String,
    write_index: String,
    read_index: String,
    slots: u32,
    fields: BTreeMap<String, String>,
    #[serde(default)]
    optional: Vec<String>,
    #[serde(default = "default_unit_of_measure")]
    unit: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNodeCounter {
    /// Line, machine and attributes of this signal's events when they are
    /// not the source's (several lines behind one address).
    #[serde(default)]
    line: Option<String>,
    #[serde(default)]
    machine: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    signal: String,
    #[serde(rename = "type")]
    event_type: String,
    node: String,
    #[serde(default = "default_max_step")]
    max_step: u64,
    #[serde(default = "default_unit_of_measure")]
    unit: String,
    #[serde(default = "default_scale")]
    scale: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNodeRecord {
    /// `record` (default): the sequence numbers this record alone; a jump
    /// means records were missed. `shared`: one numbering for several
    /// kinds of record, jumps are expected.
    #[serde(default)]
    sequence_scope: Option<String>,
    /// Line, machine and attributes of this signal's events when they are
    /// not the source's (several lines behind one address).
    #[serde(default)]
    line: Option<String>,
    #[serde(default)]
    machine: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    signal: String,
    #[serde(rename = "type", default)]
    event_type: Option<String>,
    #[serde(default)]
    type_from: Option<RawTypeFrom>,
    /// Readable reason per reason code (`"17" = "jam at infeed"`).
    #[serde(default)]
    reasons: BTreeMap<String, String>,
    /// JSON layout: the String node holding the record.
    #[serde(default)]
    node: Option<String>,
    /// Node layout: the sequence node announcing a record.
    #[serde(default)]
    sequence_node: Option<String>,
    fields: BTreeMap<String, String>,
    #[serde(default)]
    optional: Vec<String>,
    #[serde(default)]
    key: Option<Vec<String>>,
    #[serde(default = "default_unit_of_measure")]
    unit: String,
    #[serde(default)]
    ack: Option<RawAck>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAck {
    #[serde(default)]
    write: Option<String>,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    value: Option<toml::Value>,
    #[serde(default)]
    data_type: Option<String>,
    #[serde(default)]
    object: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    arguments: Vec<RawAckArgument>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAckArgument {
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    value: Option<toml::Value>,
    data_type: String,
}

pub(super) fn check_node(value: &str) -> Result<NodeId, String> {
    value.parse::<NodeId>().map_err(|_| {
        format!("an OPC UA node id like \"ns=2;s=Line1.Good\" or \"ns=3;i=1001\", found {value:?}")
    })
}

pub(super) fn ack_value(value: &toml::Value) -> Result<FieldValue, String> {
    Ok(match value {
        toml::Value::Boolean(b) => FieldValue::Bool(*b),
        toml::Value::Integer(i) => FieldValue::Int(*i),
        toml::Value::Float(f) => FieldValue::Float(*f),
        toml::Value::String(s) => FieldValue::Text(s.clone()),
        other => return Err(format!("a boolean, number or string, found {other}")),
    })
}

pub(super) fn check_ack_argument(
    field: &Option<String>,
    value: &Option<toml::Value>,
    data_type: &Option<String>,
    fields: &BTreeMap<String, String>,
) -> Result<AckArgument, (&'static str, String)> {
    let value = match (field, value) {
        (Some(name), None) => {
            if name != "sequence" && !fields.contains_key(name) {
                return Err((
                    "field",
                    format!(
                        "a field of the record ({}), found {name:?}",
                        fields.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            AckValue::Field(name.clone())
        }
        (None, Some(v)) => AckValue::Fixed(ack_value(v).map_err(|e| ("value", e))?),
        _ => {
            return Err((
                "field",
                "exactly one of field (a record field) or value (a fixed value)".into(),
            ))
        }
    };
    if let Some(t) = data_type {
        if !ACK_TYPES.contains(&t.as_str()) {
            return Err((
                "data_type",
                format!("one of {}, found {t:?}", ACK_TYPES.join(", ")),
            ));
        }
    }
    Ok(AckArgument {
        value,
        data_type: data_type.clone(),
    })
}

pub(super) fn check_opcua(
    file: &Path,
    key: &str,
    m: RawOpcUa,
    state_dir: &Path,
    site: &str,
    gateway: &str,
) -> Result<OpcUaConfig, ConfigError> {
    let err = keyed(file, key);
    let after_scheme = m.endpoint.strip_prefix("opc.tcp://").unwrap_or("");
    if after_scheme.is_empty() || after_scheme.starts_with('/') {
        return Err(err(
            "endpoint".into(),
            format!("opc.tcp://HOST:PORT[/PATH], found {:?}", m.endpoint),
        ));
    }
    if opcua_session::security_policy(&m.security_policy).is_none() {
        return Err(err(
            "security_policy".into(),
            format!(
                "one of {}, found {:?}",
                opcua_session::POLICIES.join(", "),
                m.security_policy
            ),
        ));
    }
    if opcua_session::security_mode(&m.security_mode).is_none() {
        return Err(err(
            "security_mode".into(),
            format!("None, Sign or SignAndEncrypt, found {:?}", m.security_mode),
        ));
    }
    if (m.security_policy == "None") != (m.security_mode == "None") {
        return Err(err(
            "security_mode".into(),
            "None together with security_policy None, and Sign or SignAndEncrypt with any other policy".into(),
        ));
    }
    let host = after_scheme.split(['/', ':']).next().unwrap_or("");
    if m.security_policy == "None" && !is_loopback(host) {
        tracing::warn!(source = key, endpoint = %m.endpoint, "OPC UA without security to a remote server: anyone on the network can read and forge values");
    }
    let identity = match (&m.user, &m.password_file, &m.user_certificate, &m.user_private_key) {
        (None, None, None, None) => UserIdentity::Anonymous,
        (Some(user), Some(path), None, None) => UserIdentity::UserName {
            user: user.clone(),
            password: read_secret(file, path)
                .map_err(|why| err("password_file".into(), format!("a readable file or systemd credential ({why})")))?,
        },
        (Some(_), None, _, _) => return Err(err("password_file".into(), "set with user".into())),
        (None, Some(_), _, _) => return Err(err("user".into(), "set when password_file is set".into())),
        (None, None, Some(cert), Some(private)) => {
            for (sub, path) in [("user_certificate", cert), ("user_private_key", private)] {
                readable_file(path).map_err(|why| err(sub.into(), format!("a readable file ({why})")))?;
            }
            UserIdentity::Certificate {
                cert: cert.clone(),
                key: private.clone(),
            }
        }
        _ => {
            return Err(err(
                "user".into(),
                "one identity: none (anonymous), user + password_file, or user_certificate + user_private_key".into(),
            ))
        }
    };
    let pki_dir = m.pki_dir.clone().unwrap_or_else(|| state_dir.join("pki"));
    writable(&pki_dir)
        .map_err(|why| err("pki_dir".into(), format!("a writable directory ({why})")))?;
    let acquisition = match m.mode.as_str() {
        "subscription" => {
            // sampling_interval 0 is OPC UA's "as fast as the server can":
            // what an event-like record node needs so that every change
            // reaches the queue.
            if m.publishing_interval < Duration::from_millis(10) {
                return Err(err("publishing_interval".into(), "at least 10ms".into()));
            }
            if m.keep_alive_count == 0 || m.lifetime_count < 3 * m.keep_alive_count {
                return Err(err(
                    "lifetime_count".into(),
                    format!(
                        "at least 3 × keep_alive_count ({}), found {}",
                        3 * m.keep_alive_count.max(1),
                        m.lifetime_count
                    ),
                ));
            }
            if m.queue_size == 0 {
                return Err(err("queue_size".into(), "at least 1".into()));
            }
            Acquisition::Subscription {
                publishing_interval: m.publishing_interval,
                sampling_interval: m
                    .sampling_interval
                    .parse()
                    .map_err(|why| err("sampling_interval".into(), why))?,
                queue_size: m.queue_size,
                keep_alive_count: m.keep_alive_count,
                lifetime_count: m.lifetime_count,
            }
        }
        "polling" => {
            if m.poll_interval < Duration::from_millis(10) {
                return Err(err("poll_interval".into(), "at least 10ms".into()));
            }
            Acquisition::Polling {
                interval: m.poll_interval,
            }
        }
        other => {
            return Err(err(
                "mode".into(),
                format!("subscription or polling, found {other:?}"),
            ))
        }
    };
    if m.timeout < Duration::from_millis(100) {
        return Err(err("timeout".into(), "at least 100ms".into()));
    }
    let mut signals = std::collections::BTreeSet::new();
    let mut counters = Vec::new();
    for (i, c) in m.counters.into_iter().enumerate() {
        let ckey = format!("counters[{i}]");
        if !valid_name(&c.signal) || !signals.insert(c.signal.clone()) {
            return Err(err(
                format!("{ckey}.signal"),
                "a unique name of 1-64 letters, digits, '-' or '_'".into(),
            ));
        }
        let node = check_node(&c.node).map_err(|e| err(format!("{ckey}.node"), e))?;
        if c.max_step == 0 || !c.scale.is_finite() || c.scale <= 0.0 {
            return Err(err(
                format!("{ckey}.max_step"),
                "max_step above 0 and scale a positive number".into(),
            ));
        }
        counters.push(NodeCounter {
            signal: c.signal,
            event_type: buffer::EventType(c.event_type),
            node,
            max_step: c.max_step,
            unit: c.unit,
            scale: c.scale,
            place: placement(c.line, c.machine, c.attributes),
        });
    }
    let mut records = Vec::new();
    for (i, r) in m.records.into_iter().enumerate() {
        let rkey = format!("records[{i}]");
        if !valid_name(&r.signal) || !signals.insert(r.signal.clone()) {
            return Err(err(
                format!("{rkey}.signal"),
                "a unique name of 1-64 letters, digits, '-' or '_'".into(),
            ));
        }
        if let Some(name) = r.optional.iter().find(|n| !r.fields.contains_key(*n)) {
            return Err(err(
                format!("{rkey}.optional"),
                format!("names of fields, found {name:?}"),
            ));
        }
        let (trigger, layout) = match (&r.node, &r.sequence_node) {
            (Some(node), None) => {
                let trigger = check_node(node).map_err(|e| err(format!("{rkey}.node"), e))?;
                let mut fields = Vec::new();
                for (name, pointer) in &r.fields {
                    if !pointer.starts_with('/') {
                        return Err(err(
                            format!("{rkey}.fields.{name}"),
                            format!("a JSON pointer into the record like \"/order/id\", found {pointer:?}"),
                        ));
                    }
                    fields.push(JsonField {
                        name: name.clone(),
                        pointer: pointer.clone(),
                        required: !r.optional.contains(name),
                    });
                }
                (trigger, RecordLayout::Json(fields))
            }
            (None, Some(seq)) => {
                let trigger = check_node(seq).map_err(|e| err(format!("{rkey}.sequence_node"), e))?;
                let mut fields = Vec::new();
                for (name, node) in &r.fields {
                    if name == "sequence" {
                        return Err(err(format!("{rkey}.fields.sequence"), "not set: the sequence comes from sequence_node".into()));
                    }
                    let node = check_node(node).map_err(|e| err(format!("{rkey}.fields.{name}"), e))?;
                    fields.push((name.clone(), node));
                }
                (trigger, RecordLayout::Nodes(fields))
            }
            _ => {
                return Err(err(
                    format!("{rkey}.node"),
                    "either node (a String node holding the record as JSON; fields are JSON pointers) or sequence_node (fields are node ids)".into(),
                ))
            }
        };
        let has_sequence = r.sequence_node.is_some() || r.fields.contains_key("sequence");
        let key = match r.key {
            Some(key) => {
                if let Some(k) = key.iter().find(|k| {
                    *k != "sequence" && !r.fields.contains_key(*k)
                        || (*k == "sequence" && !has_sequence)
                }) {
                    return Err(err(
                        format!("{rkey}.key"),
                        format!("names of fields, found {k:?}"),
                    ));
                }
                key
            }
            None if has_sequence => vec!["sequence".to_owned()],
            None => r.fields.keys().cloned().collect(),
        };
        if key.is_empty() {
            return Err(err(
                format!("{rkey}.key"),
                "at least one field name (an empty key would give every record the same identity)"
                    .into(),
            ));
        }
        // Without an acknowledgement the key is the record's only identity:
        // a field that may be missing makes different records look alike.
        if r.ack.is_none() {
            if let Some(k) = key.iter().find(|k| r.optional.contains(*k)) {
                return Err(err(
                    format!("{rkey}.key"),
                    format!("fields every record has (without an ack the key is the record's identity), found optional field {k:?}; add a sequence or order field to the key, or configure an ack"),
                ));
            }
        }
        let ack = match r.ack {
            None => None,
            Some(a) => {
                let akey = format!("{rkey}.ack");
                match (&a.write, &a.method) {
                    (Some(node), None) => {
                        if a.object.is_some() || !a.arguments.is_empty() {
                            return Err(err(
                                akey,
                                "write with field or value; object and arguments belong to method"
                                    .into(),
                            ));
                        }
                        Some(Ack::Write {
                            node: check_node(node).map_err(|e| err(format!("{akey}.write"), e))?,
                            value: check_ack_argument(&a.field, &a.value, &a.data_type, &r.fields)
                                .map_err(|(sub, e)| err(format!("{akey}.{sub}"), e))?,
                        })
                    }
                    (None, Some(method)) => {
                        let object = a.object.as_deref().ok_or_else(|| {
                            err(
                                format!("{akey}.object"),
                                "the node id of the object the method belongs to".into(),
                            )
                        })?;
                        let mut arguments = Vec::new();
                        for (j, arg) in a.arguments.iter().enumerate() {
                            arguments.push(
                                check_ack_argument(
                                    &arg.field,
                                    &arg.value,
                                    &Some(arg.data_type.clone()),
                                    &r.fields,
                                )
                                .map_err(|(sub, e)| {
                                    err(format!("{akey}.arguments[{j}].{sub}"), e)
                                })?,
                            );
                        }
                        Some(Ack::Call {
                            object: check_node(object)
                                .map_err(|e| err(format!("{akey}.object"), e))?,
                            method: check_node(method)
                                .map_err(|e| err(format!("{akey}.method"), e))?,
                            arguments,
                        })
                    }
                    _ => {
                        return Err(err(
                            akey,
                            "either write (a node to write) or method (with object and arguments)"
                                .into(),
                        ))
                    }
                }
            }
        };
        let (event_type, type_from) = record_type(r.event_type, r.type_from, |f| {
            r.fields.contains_key(f) || (f == "sequence" && has_sequence)
        })
        .map_err(|(sub, why)| err(format!("{rkey}.{sub}"), why))?;
        let reasons = record_reasons(r.reasons, r.fields.contains_key("reason_code"))
            .map_err(|(sub, why)| err(format!("{rkey}.{sub}"), why))?;
        let sequence_shared = match r.sequence_scope.as_deref() {
            None | Some("record") => false,
            Some("shared") => true,
            Some(other) => {
                return Err(err(
                    format!("{rkey}.sequence_scope"),
                    format!("\"record\" (this record's own numbering) or \"shared\" (one numbering for several kinds of record), found {other:?}"),
                ))
            }
        };
        records.push(NodeRecord {
            signal: r.signal,
            event_type,
            trigger,
            layout,
            key,
            unit: r.unit,
            ack,
            type_from,
            place: protocols::source::Placement {
                reasons,
                ..placement(r.line, r.machine, r.attributes)
            },
            sequence_shared,
        });
    }
    let mut rings = Vec::new();
    for (i, r) in m.rings.into_iter().enumerate() {
        let rkey = format!("rings[{i}]");
        if !valid_name(&r.signal) || !signals.insert(r.signal.clone()) {
            return Err(err(
                format!("{rkey}.signal"),
                "a unique name of 1-64 letters, digits, '-' or '_'".into(),
            ));
        }
        let array = check_node(&r.array).map_err(|e| err(format!("{rkey}.array"), e))?;
        let write_index =
            check_node(&r.write_index).map_err(|e| err(format!("{rkey}.write_index"), e))?;
        let read_index =
            check_node(&r.read_index).map_err(|e| err(format!("{rkey}.read_index"), e))?;
        if r.slots == 0 || r.slots > 100_000 {
            return Err(err(
                format!("{rkey}.slots"),
                format!("1..100000 elements, found {}", r.slots),
            ));
        }
        if r.fields.is_empty() {
            return Err(err(format!("{rkey}.fields"), "at least one field".into()));
        }
        if let Some(name) = r.optional.iter().find(|n| !r.fields.contains_key(*n)) {
            return Err(err(
                format!("{rkey}.optional"),
                format!("names of fields, found {name:?}"),
            ));
        }
        let mut fields = Vec::new();
        for (name, pointer) in &r.fields {
            if !pointer.starts_with('/') {
                return Err(err(
                    format!("{rkey}.fields.{name}"),
                    format!("a JSON pointer into the record like \"/order/id\", found {pointer:?}"),
                ));
            }
            fields.push(JsonField {
                name: name.clone(),
                pointer: pointer.clone(),
                required: !r.optional.contains(name),
            });
        }
        let (event_type, type_from) =
            record_type(r.event_type, r.type_from, |f| r.fields.contains_key(f))
                .map_err(|(sub, why)| err(format!("{rkey}.{sub}"), why))?;
        let reasons = record_reasons(r.reasons, r.fields.contains_key("reason_code"))
            .map_err(|(sub, why)| err(format!("{rkey}.{sub}"), why))?;
        rings.push(protocols::sources::opcua::NodeRing {
            signal: r.signal,
            event_type,
            array,
            write_index,
            read_index,
            slots: r.slots,
            fields,
            unit: r.unit,
            type_from,
            place: protocols::source::Placement {
                reasons,
                ..placement(r.line, r.machine, r.attributes)
            },
        });
    }
    if counters.is_empty() && records.is_empty() && rings.is_empty() {
        return Err(err(
            "counters".into(),
            "at least one counter, record or ring".into(),
        ));
    }
    Ok(OpcUaConfig {
        connection: Connection {
            endpoint: m.endpoint,
            security_policy: m.security_policy,
            security_mode: m.security_mode,
            identity,
            pki_dir,
            trust_unknown_server: m.trust_unknown_server,
            application_uri: format!("urn:plant-edge:{site}:{gateway}"),
            timeout: m.timeout,
        },
        acquisition,
        line: m.line,
        machine: m.machine,
        counters,
        records,
        rings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, MINIMAL, OPCUA};

    #[test]
    fn opcua_source_is_checked_and_mistakes_name_their_key() {
        let config = parse(&format!("{MINIMAL}{OPCUA}")).expect("valid opcua source");
        let SourceKind::OpcUa(source) = &config.sources[0].kind else {
            panic!("opcua source expected");
        };
        assert_eq!(source.records[0].key, vec!["sequence".to_owned()]);
        assert!(source.connection.pki_dir.ends_with("pki"));
        // 0: the server's fastest sampling, every change of a record node.
        let sampling = |setting: &str| {
            let text = OPCUA.replacen(
                "line = \"L1\"",
                &format!("line = \"L1\"\nsampling_interval = {setting}"),
                1,
            );
            parse(&format!("{MINIMAL}{text}")).map(|config| match &config.sources[0].kind {
                SourceKind::OpcUa(source) => match &source.acquisition {
                    Acquisition::Subscription {
                        sampling_interval, ..
                    } => *sampling_interval,
                    other => panic!("subscription expected, got {other:?}"),
                },
                _ => panic!("opcua source expected"),
            })
        };
        assert_eq!(
            sampling("\"0s\"").expect("0s is valid"),
            Sampling::Every(Duration::ZERO)
        );
        // -1: the publishing interval, as a number or a string.
        for setting in ["-1", "\"-1\""] {
            assert_eq!(
                sampling(setting).expect("-1 is valid"),
                Sampling::PublishingInterval
            );
        }
        for wrong in ["-2", "\"fast\""] {
            let why = sampling(wrong).expect_err("not a sampling interval");
            assert_eq!(why.key, "sources.mes1.sampling_interval", "{why}");
            assert!(
                why.expected.contains("-1 (the publishing interval)"),
                "{why}"
            );
        }
        let cases = [
            (
                "ns=2;s=Line1.Good\"",
                "nonsense\"",
                "sources.mes1.counters[0].node",
            ),
            (
                "endpoint = \"opc.tcp://",
                "endpoint = \"http://",
                "sources.mes1.endpoint",
            ),
            (
                "line = \"L1\"",
                "line = \"L1\"\nsecurity_policy = \"Basic128\"",
                "sources.mes1.security_policy",
            ),
            (
                "line = \"L1\"",
                "line = \"L1\"\nsecurity_policy = \"Basic256Sha256\"",
                "sources.mes1.security_mode",
            ),
            (
                "line = \"L1\"",
                "line = \"L1\"\nlifetime_count = 5",
                "sources.mes1.lifetime_count",
            ),
            (
                "\"/qty\" }",
                "\"qty\" }",
                "sources.mes1.records[0].fields.quantity",
            ),
            (
                "field = \"sequence\"",
                "field = \"batch\"",
                "sources.mes1.records[0].ack.field",
            ),
            (
                "line = \"L1\"",
                "line = \"L1\"\nuser = \"gw\"",
                "sources.mes1.password_file",
            ),
            (
                "fields = {",
                "key = [], fields = {",
                "sources.mes1.records[0].key",
            ),
            (
                "fields = {",
                "sequence_scope = \"global\", fields = {",
                "sources.mes1.records[0].sequence_scope",
            ),
            (
                "type = \"production.completion\", node = \"ns=2;s=Line1.Record\"",
                "type_from = { field = \"kind\", map = { \"1\" = \"production.completion\" } }, node = \"ns=2;s=Line1.Record\"",
                "sources.mes1.records[0].type_from.field",
            ),
            (
                "type = \"production.completion\", node = \"ns=2;s=Line1.Record\"",
                "type = \"production.completion\", type_from = { field = \"sequence\", map = { \"1\" = \"production.scrap\" } }, node = \"ns=2;s=Line1.Record\"",
                "sources.mes1.records[0].type",
            ),
            // Reasons are looked up by the record's reason_code.
            (
                "type = \"production.completion\", node = \"ns=2;s=Line1.Record\"",
                "type = \"production.completion\", reasons = { \"17\" = \"jam\" }, node = \"ns=2;s=Line1.Record\"",
                "sources.mes1.records[0].reasons",
            ),
            // Without an ack the key is the identity: an optional field in
            // it would make different records look alike.
            (
                "quantity = \"/qty\" }, ack = { write = \"ns=2;s=Line1.Ack\", field = \"sequence\" }",
                "quantity = \"/qty\", order = \"/order\" }, optional = [\"order\"], key = [\"order\"]",
                "sources.mes1.records[0].key",
            ),
        ];
        for (from, to, key) in cases {
            let text = format!("{MINIMAL}{}", OPCUA.replacen(from, to, 1));
            let e = parse(&text).expect_err(key);
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn an_opcua_ring_is_checked_and_mistakes_name_their_key() {
        let ring = "\n[[sources.mes1.rings]]\nsignal = \"ring\"\ntype = \"production.completion\"\narray = \"ns=2;s=Line1.Ring\"\nwrite_index = \"ns=2;s=Line1.RingWrite\"\nread_index = \"ns=2;s=Line1.RingRead\"\nslots = 64\nfields = { sequence = \"/seq\", quantity = \"/qty\" }\n";
        let config = parse(&format!("{MINIMAL}{OPCUA}{ring}")).expect("valid ring");
        let SourceKind::OpcUa(source) = &config.sources[0].kind else {
            panic!("opcua source expected");
        };
        assert_eq!(source.rings[0].slots, 64);
        assert_eq!(source.rings[0].fields.len(), 2);
        for (from, to, key) in [
            ("slots = 64", "slots = 0", "sources.mes1.rings[0].slots"),
            (
                "\"/qty\"",
                "\"qty\"",
                "sources.mes1.rings[0].fields.quantity",
            ),
            (
                "\"ns=2;s=Line1.RingRead\"",
                "\"RingRead\"",
                "sources.mes1.rings[0].read_index",
            ),
            (
                "signal = \"ring\"",
                "signal = \"completion\"",
                "sources.mes1.rings[0].signal",
            ),
        ] {
            let text = format!("{MINIMAL}{OPCUA}{}", ring.replacen(from, to, 1));
            let e = parse(&text).expect_err(key);
            assert_eq!(e.key, key, "{e}");
        }
    }
}
