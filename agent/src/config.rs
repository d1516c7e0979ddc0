//! Configuration: TOML file → raw structs (serde, unknown keys refused) →
//! checked [`Config`] (references resolved, bounds and paths checked).
//!
//! Every error names the file, the key and what was expected; `main` turns
//! it into exit code 78 (EX_CONFIG) so systemd's `RestartPreventExitStatus`
//! stops a restart loop on a bad config.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use protocols::counter::CounterWidth;
use protocols::sinks::file::FileSinkConfig;
use protocols::sinks::https::{HttpsAuth, HttpsMode, HttpsSinkConfig};
use protocols::sinks::mqtt::{MqttSinkConfig, MqttVersion};
use protocols::source::FieldValue;
use protocols::sources::modbus::map::{Address, Format, Order, Table};
use protocols::sources::modbus::{
    CounterSpec, Endpoint, FieldSpec, ModbusConfig, RecordSpec, SerialSettings,
};
use protocols::sources::opcua::record::JsonField;
use protocols::sources::opcua::session as opcua_session;
use protocols::sources::opcua::{
    Ack, AckArgument, AckValue, Acquisition, Connection, NodeCounter, NodeRecord, OpcUaConfig,
    RecordLayout, Sampling, UserIdentity, ACK_TYPES,
};
use protocols::sources::simulated::SimulatedConfig;
use protocols::tls::TlsSettings;
use protocols::NodeId;
use serde::Deserialize;

/// The commented default configuration (`plant-edge print-config`).
pub const DEFAULT_CONFIG: &str = include_str!("../../packaging/plant-edge.toml");

/// A configuration problem: which file, which key, what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// Dotted key path (`journal.max_bytes`), or `-` for the whole file.
    pub key: String,
    /// What the key should hold, or what went wrong.
    pub expected: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: ", self.file.display(), line)?,
            None => write!(f, "{}: ", self.file.display())?,
        }
        write!(f, "key `{}`: {}", self.key, self.expected)
    }
}

impl std::error::Error for ConfigError {}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/plant-edge")
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_bytes() -> ByteSize {
    ByteSize::gib(1)
}
fn default_cache() -> ByteSize {
    ByteSize::mib(32)
}
fn default_min_free_disk() -> ByteSize {
    ByteSize::b(buffer::JournalConfig::DEFAULT_MIN_FREE_DISK)
}
fn default_dedup_window() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_dedup_window_count() -> usize {
    200_000
}
fn default_batch_size() -> usize {
    256
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}
fn default_rotate_bytes() -> ByteSize {
    ByteSize::mib(64)
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_good_per_tick() -> u64 {
    3
}
fn default_scrap_every() -> u64 {
    10
}
fn default_counter_bits() -> u8 {
    16
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Plain text lines (journald adds time and unit).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: RawAgent,
    #[serde(default)]
    journal: RawJournal,
    #[serde(default)]
    forwarder: RawForwarder,
    #[serde(default)]
    sinks: BTreeMap<String, RawSink>,
    #[serde(default)]
    sources: BTreeMap<String, RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    site: String,
    gateway: String,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    log_format: LogFormat,
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    shutdown_timeout: Duration,
    #[serde(default = "default_metrics_listen")]
    metrics_listen: String,
    #[serde(default = "default_ready_max_age", with = "humantime_serde")]
    ready_max_backlog_age: Duration,
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_ready_max_age() -> Duration {
    Duration::from_secs(15 * 60)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    #[serde(default = "default_max_bytes")]
    max_bytes: ByteSize,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    #[serde(default = "default_cache")]
    cache: ByteSize,
    #[serde(default = "default_min_free_disk")]
    min_free_disk: ByteSize,
    #[serde(default = "default_dedup_window", with = "humantime_serde")]
    dedup_window: Duration,
    #[serde(default = "default_dedup_window_count")]
    dedup_window_count: usize,
    #[serde(default)]
    telemetry_types: Vec<String>,
}

impl Default for RawJournal {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            ttl: None,
            cache: default_cache(),
            min_free_disk: default_min_free_disk(),
            dedup_window: default_dedup_window(),
            dedup_window_count: default_dedup_window_count(),
            telemetry_types: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForwarder {
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    retry_initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    retry_max: Duration,
    #[serde(default)]
    max_attempts: Option<u32>,
}

impl Default for RawForwarder {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
            max_attempts: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum RawSink {
    File(RawFileSink),
    Mqtt(Box<RawMqttSink>),
    Https(Box<RawHttpsSink>),
}

fn default_https_mode() -> String {
    "batch".into()
}
fn default_batch_events() -> usize {
    500
}
fn default_batch_bytes() -> ByteSize {
    ByteSize::mib(1)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth2 {
    token_url: String,
    client_id: String,
    client_secret_file: PathBuf,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpsSink {
    url: String,
    #[serde(default = "default_https_mode")]
    mode: String,
    #[serde(default = "default_batch_events")]
    batch_events: usize,
    #[serde(default = "default_batch_bytes")]
    batch_bytes: ByteSize,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    gzip: bool,
    #[serde(default)]
    bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    oauth2: Option<RawOAuth2>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    client_cert: Option<PathBuf>,
    #[serde(default)]
    client_key: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_verify: bool,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    request_timeout: Duration,
    #[serde(default)]
    max_events_per_second: u32,
}

fn default_mqtt_protocol() -> String {
    "5".into()
}
fn default_qos() -> u8 {
    1
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(3600)
}
fn default_mqtt_topic() -> String {
    "plants/{site}/{line}/{type}".into()
}
fn default_status_topic() -> String {
    "plants/{site}/{gateway}/status".into()
}
fn default_inflight() -> u16 {
    100
}
fn default_mqtt_rate() -> u32 {
    2000
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqttSink {
    host: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default = "default_mqtt_protocol")]
    protocol: String,
    #[serde(default = "default_qos")]
    qos: u8,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    keep_alive: Duration,
    #[serde(default)]
    clean_session: Option<bool>,
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    session_expiry: Duration,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    tls: Option<bool>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    client_cert: Option<PathBuf>,
    #[serde(default)]
    client_key: Option<PathBuf>,
    #[serde(default)]
    alpn: Vec<String>,
    #[serde(default = "default_mqtt_topic")]
    topic: String,
    #[serde(default = "default_status_topic")]
    status_topic: String,
    #[serde(default = "default_inflight")]
    inflight: u16,
    #[serde(default = "default_mqtt_rate")]
    max_messages_per_second: u32,
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    ack_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSink {
    path: PathBuf,
    #[serde(default = "default_rotate_bytes")]
    rotate_bytes: ByteSize,
    #[serde(default)]
    keep_files: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum RawSource {
    Simulated(RawSimulated),
    Modbus(Box<RawModbus>),
    Opcua(Box<RawOpcUa>),
}

fn default_security() -> String {
    "None".into()
}
fn default_opcua_mode() -> String {
    "subscription".into()
}
fn default_publishing_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_sampling_interval() -> RawSampling {
    RawSampling::Text("250ms".into())
}

/// `sampling_interval`: a duration, or -1 (OPC UA's "the publishing
/// interval") as a number or a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSampling {
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
fn default_queue_size() -> u32 {
    100
}
fn default_keep_alive_count() -> u32 {
    10
}
fn default_lifetime_count() -> u32 {
    60
}
fn default_opcua_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpcUa {
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
    sinks: Option<Vec<String>>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    counters: Vec<RawNodeCounter>,
    #[serde(default)]
    records: Vec<RawNodeRecord>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeCounter {
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
struct RawNodeRecord {
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
struct RawAck {
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
struct RawAckArgument {
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    value: Option<toml::Value>,
    data_type: String,
}

fn default_modbus_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_max_gap() -> u16 {
    8
}
fn default_unit_id() -> u8 {
    1
}
fn default_word_order() -> String {
    "big".into()
}
fn default_max_step() -> u64 {
    1000
}
fn default_unit_of_measure() -> String {
    "EA".into()
}
fn default_scale() -> f64 {
    1.0
}
fn default_baud() -> u32 {
    19200
}
fn default_parity() -> String {
    "even".into()
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModbus {
    endpoint: String,
    #[serde(default = "default_unit_id")]
    unit: u8,
    #[serde(default = "default_interval", with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(default = "default_modbus_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_max_gap")]
    max_gap: u16,
    line: String,
    machine: String,
    #[serde(default = "default_word_order")]
    word_order: String,
    #[serde(default)]
    byte_swap: bool,
    #[serde(default = "default_baud")]
    baud: u32,
    #[serde(default = "default_parity")]
    parity: String,
    #[serde(default = "default_data_bits")]
    data_bits: u8,
    #[serde(default = "default_stop_bits")]
    stop_bits: u8,
    #[serde(default)]
    sinks: Option<Vec<String>>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    counters: Vec<RawCounter>,
    #[serde(default)]
    records: Vec<RawRecord>,
    #[serde(default)]
    context: BTreeMap<String, RawField>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCounter {
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
    address: String,
    #[serde(default = "default_counter_format")]
    format: String,
    #[serde(default)]
    word_order: Option<String>,
    #[serde(default)]
    byte_swap: Option<bool>,
    #[serde(default = "default_max_step")]
    max_step: u64,
    #[serde(default = "default_unit_of_measure")]
    unit: String,
    #[serde(default = "default_scale")]
    scale: f64,
}

fn default_counter_format() -> String {
    "u16".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
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
    ready: String,
    ack: String,
    fields: BTreeMap<String, RawField>,
    #[serde(default)]
    key: Option<Vec<String>>,
    #[serde(default = "default_unit_of_measure")]
    unit: String,
}

/// A signal's own line, machine and attributes (empty line/machine: the
/// source's).
fn placement(
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
fn record_reasons(
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
struct RawTypeFrom {
    field: String,
    map: BTreeMap<String, String>,
}

/// A record's event type: fixed (`type`) or from a field's code
/// (`type_from`), exactly one of them. Returns the type used where a code
/// is not known (dead letters) and the map.
fn record_type(
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    address: String,
    format: String,
    /// The field is the event's time: epoch seconds (`"s"`) or
    /// milliseconds (`"ms"`).
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    length: Option<u16>,
    #[serde(default)]
    word_order: Option<String>,
    #[serde(default)]
    byte_swap: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSimulated {
    line: String,
    machine: String,
    #[serde(default = "default_interval", with = "humantime_serde")]
    interval: Duration,
    #[serde(default = "default_good_per_tick")]
    good_per_tick: u64,
    #[serde(default = "default_scrap_every")]
    scrap_every: u64,
    #[serde(default = "default_counter_bits")]
    counter_bits: u8,
    #[serde(default)]
    start: u64,
    #[serde(default)]
    sinks: Option<Vec<String>>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

/// Journal settings after checking.
#[derive(Clone, Debug)]
pub struct JournalSettings {
    /// Bound on stored bytes.
    pub max_bytes: u64,
    /// Time-to-live of pending events.
    pub ttl: Option<Duration>,
    /// sled cache bound.
    pub cache_bytes: u64,
    /// Free space kept on the journal's filesystem (0: no check).
    pub min_free_disk: u64,
    /// Dedup window by age.
    pub dedup_window: Duration,
    /// Dedup window by count.
    pub dedup_window_count: usize,
    /// Event types treated as telemetry.
    pub telemetry_types: BTreeSet<String>,
}

/// Forwarder settings after checking.
#[derive(Clone, Debug)]
pub struct ForwarderSettings {
    /// Events per delivery.
    pub batch_size: usize,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Retry delay cap.
    pub retry_max: Duration,
    /// Give up (dead-letter) after this many attempts; `None` retries until
    /// the journal TTL expires the event.
    pub max_attempts: Option<u32>,
}

/// A configured sink.
#[derive(Clone, Debug)]
pub enum SinkKind {
    /// JSON-lines archive.
    File(FileSinkConfig),
    /// MQTT broker.
    Mqtt(Box<MqttSinkConfig>),
    /// HTTPS endpoint (ERP).
    Https(Box<HttpsSinkConfig>),
}

/// A configured sink with its name.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Name (journal cursor key).
    pub name: String,
    /// What it is.
    pub kind: SinkKind,
}

/// A configured source.
#[derive(Clone, Debug)]
pub enum SourceKind {
    /// Simulated line.
    Simulated(SimulatedConfig),
    /// Modbus TCP/RTU device.
    Modbus(Box<ModbusConfig>),
    /// OPC UA server (MES or PLC).
    OpcUa(Box<OpcUaConfig>),
}

/// A configured source with its name and routing.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Name (cursor key, part of event ids).
    pub name: String,
    /// Sinks its events go to.
    pub sinks: Vec<String>,
    /// Static attributes.
    pub attributes: BTreeMap<String, String>,
    /// What it is.
    pub kind: SourceKind,
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it was read from.
    pub file: PathBuf,
    /// Site code.
    pub site: String,
    /// Gateway name.
    pub gateway: String,
    /// State directory (journal lives in `<state_dir>/journal`).
    pub state_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// Bound on graceful shutdown.
    pub shutdown_timeout: Duration,
    /// Metrics and health endpoint (`None`: off).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `/readyz` fails when the oldest pending event is older.
    pub ready_max_backlog_age: Duration,
    /// Journal settings.
    pub journal: JournalSettings,
    /// Forwarder settings.
    pub forwarder: ForwarderSettings,
    /// Sinks, by name order.
    pub sinks: Vec<SinkConfig>,
    /// Sources, by name order.
    pub sources: Vec<SourceConfig>,
}

impl Config {
    /// The journal directory.
    pub fn journal_dir(&self) -> PathBuf {
        self.state_dir.join("journal")
    }

    /// Reads, parses and checks a config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_owned(),
            key: "-".into(),
            expected: format!("a readable TOML file ({e})"),
            line: None,
        })?;
        Self::parse(file, &text)
    }

    /// Parses and checks config text (`file` is for messages).
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
        check(file, raw).map_err(|mut e| {
            // Checks after parsing know the key, not the line: found here
            // once for all of them.
            if e.line.is_none() {
                e.line = line_of(text, &e.key);
            }
            e
        })
    }
}

/// The line (1-based) that sets `key` (dotted, `name[n]` for the n-th of
/// an array of tables) in TOML `text`, or the nearest table or inline
/// table above it; `None` when nothing of the key is in the text (a
/// default).
fn line_of(text: &str, key: &str) -> Option<usize> {
    let wanted: Vec<&str> = key.split('.').collect();
    let mut table: Vec<String> = Vec::new();
    // Arrays of tables seen so far, by their path: how many entries.
    let mut arrays: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(usize, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        let path: Vec<String> = if let Some(header) = t.strip_prefix("[[") {
            let name = header.split("]]").next().unwrap_or("").trim();
            let mut parts = resolve_arrays(name, &arrays);
            let full = name.to_owned();
            let index = arrays.get(&full).copied().unwrap_or(0);
            arrays.insert(full, index + 1);
            if let Some(last) = parts.last_mut() {
                *last = format!("{last}[{index}]");
            }
            table = parts.clone();
            parts
        } else if let Some(header) = t.strip_prefix('[') {
            let name = header.split(']').next().unwrap_or("").trim();
            table = resolve_arrays(name, &arrays);
            table.clone()
        } else if let Some((name, _)) = t.split_once('=') {
            let mut path = table.clone();
            path.extend(
                name.trim()
                    .split('.')
                    .map(|p| p.trim().trim_matches('"').to_owned()),
            );
            path
        } else {
            continue;
        };
        // `records = [...]` (an inline array) holds `records[0]`.
        let matched = path
            .iter()
            .zip(&wanted)
            .take_while(|(have, want)| {
                want.strip_prefix(have.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('['))
            })
            .count();
        // Only a line on the key's own path counts (not a sibling that
        // shares its table), and the deepest one wins.
        if matched == path.len() && matched > 0 && best.is_none_or(|(depth, _)| matched > depth) {
            best = Some((matched, i + 1));
        }
    }
    best.map(|(_, line)| line)
}

/// `sources.mes1.records` inside the current entry of an array of tables
/// above it (`sources.mes1` is not one; `x.items` in `[[x.items]]` is).
fn resolve_arrays(name: &str, arrays: &BTreeMap<String, usize>) -> Vec<String> {
    let parts: Vec<&str> = name.split('.').map(str::trim).collect();
    let mut resolved = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let prefix = parts[..=i].join(".");
        match arrays.get(&prefix) {
            // Not the header's own last part: that one is indexed by the caller.
            Some(count) if i + 1 < parts.len() => {
                resolved.push(format!("{part}[{}]", count.saturating_sub(1)))
            }
            _ => resolved.push((*part).to_owned()),
        }
    }
    resolved
}

/// Turns a TOML/serde error into file, dotted key, line and message.
fn toml_error(file: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim().to_owned();
    let Some(span) = error.span() else {
        return ConfigError {
            file: file.to_owned(),
            key: "-".into(),
            expected: message,
            line: None,
        };
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let mut table = String::new();
    for line in before.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
        }
    }
    let current = text.lines().nth(line_no - 1).unwrap_or("").trim();
    if current.starts_with('[') {
        // Errors inside a tagged table (a sink's or source's kind) point at
        // its header: that header is the table the field belongs to.
        table = current
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_owned();
    }
    let mut key = if current.starts_with('[') {
        table.clone()
    } else {
        let name = current.split('=').next().unwrap_or("").trim();
        match (table.is_empty(), name.is_empty()) {
            (_, true) => table.clone(),
            (true, false) => name.to_owned(),
            (false, false) => format!("{table}.{name}"),
        }
    };
    // serde names the offending field itself for unknown and missing ones.
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        if !key.ends_with(field) {
            key = if table.is_empty() {
                field.to_owned()
            } else {
                format!("{table}.{field}")
            };
        }
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        key = if key.is_empty() {
            field.to_owned()
        } else {
            format!("{key}.{field}")
        };
    }
    if key.is_empty() {
        key = "-".into();
    }
    ConfigError {
        file: file.to_owned(),
        key,
        expected: message,
        line: Some(line_no),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether `dir` (or, if absent, its nearest existing ancestor) accepts a
/// new file. Probes with a real file: permission bits do not tell the whole
/// truth (read-only mounts, ACLs, systemd's ProtectSystem).
fn writable(dir: &Path) -> Result<(), String> {
    let mut probe_dir = dir;
    while !probe_dir.exists() {
        match probe_dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => probe_dir = parent,
            _ => return Ok(()),
        }
    }
    if !probe_dir.is_dir() {
        return Err(format!("{} is not a directory", probe_dir.display()));
    }
    let probe = probe_dir.join(format!(".plant-edge-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("{} is not writable: {e}", probe_dir.display())),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn readable_file(path: &Path) -> Result<(), String> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads a secret from a file (or a systemd credential: the path is then
/// `$CREDENTIALS_DIRECTORY/<name>`); trailing newlines are not part of it.
fn read_secret(path: &Path) -> Result<String, String> {
    let path = match (
        path.is_relative(),
        std::env::var_os("CREDENTIALS_DIRECTORY"),
    ) {
        (true, Some(dir)) if !path.exists() => PathBuf::from(dir).join(path),
        _ => path.to_owned(),
    };
    std::fs::read_to_string(&path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// CA file, client certificate and key: readable, and cert and key together.
fn check_tls_files(
    ca_file: &Option<PathBuf>,
    client_cert: &Option<PathBuf>,
    client_key: &Option<PathBuf>,
) -> Result<(), (&'static str, String)> {
    if client_cert.is_some() != client_key.is_some() {
        return Err((
            "client_key",
            "set together with client_cert (mutual TLS needs both)".into(),
        ));
    }
    for (sub, path) in [
        ("ca_file", ca_file),
        ("client_cert", client_cert),
        ("client_key", client_key),
    ] {
        if let Some(path) = path {
            readable_file(path).map_err(|why| (sub, format!("a readable PEM file ({why})")))?;
        }
    }
    Ok(())
}

fn check_https(file: &Path, key: &str, h: RawHttpsSink) -> Result<HttpsSinkConfig, ConfigError> {
    let err = |sub: &str, expected: String| ConfigError {
        file: file.to_owned(),
        key: format!("{key}.{sub}"),
        expected,
        line: None,
    };
    let host = h
        .url
        .strip_prefix("https://")
        .or_else(|| h.url.strip_prefix("http://"))
        .and_then(|rest| rest.split(['/', ':']).next())
        .filter(|host| !host.is_empty())
        .ok_or_else(|| err("url", format!("an https:// URL, found {:?}", h.url)))?;
    if h.url.starts_with("http://") && !is_loopback(host) {
        return Err(err(
            "url",
            "https:// (plain http is allowed only to a loopback address)".into(),
        ));
    }
    let mode = match h.mode.as_str() {
        "single" => HttpsMode::Single,
        "batch" => {
            if h.batch_events == 0 || h.batch_events > 10_000 {
                return Err(err("batch_events", "between 1 and 10000".into()));
            }
            HttpsMode::Batch {
                max_events: h.batch_events,
                max_bytes: h.batch_bytes.as_u64().max(1024) as usize,
            }
        }
        other => {
            return Err(err(
                "mode",
                format!("\"single\" or \"batch\", found {other:?}"),
            ))
        }
    };
    let methods = [
        h.bearer_token_file.is_some(),
        h.username.is_some() || h.password_file.is_some(),
        h.oauth2.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        return Err(err(
            "oauth2",
            "one authentication method: bearer_token_file, username/password_file, or oauth2"
                .into(),
        ));
    }
    let auth = if let Some(path) = h.bearer_token_file {
        readable_file(&path).map_err(|why| {
            err(
                "bearer_token_file",
                format!("a readable file holding the token ({why})"),
            )
        })?;
        HttpsAuth::BearerFile(path)
    } else if let Some(o) = h.oauth2 {
        let client_secret = read_secret(&o.client_secret_file).map_err(|why| {
            err(
                "oauth2.client_secret_file",
                format!("a readable file holding the client secret ({why})"),
            )
        })?;
        HttpsAuth::OAuth2 {
            token_url: o.token_url,
            client_id: o.client_id,
            client_secret,
            scope: o.scope,
        }
    } else if let Some(user) = h.username {
        let path = h
            .password_file
            .ok_or_else(|| err("password_file", "set with username".into()))?;
        let password = read_secret(&path).map_err(|why| {
            err(
                "password_file",
                format!("a readable file holding the password ({why})"),
            )
        })?;
        HttpsAuth::Basic { user, password }
    } else if h.password_file.is_some() {
        return Err(err("username", "set when password_file is set".into()));
    } else {
        HttpsAuth::None
    };
    check_tls_files(&h.ca_file, &h.client_cert, &h.client_key)
        .map_err(|(sub, why)| err(sub, why))?;
    if h.insecure_skip_verify {
        eprintln!(
            "plant-edge: WARNING: {}: `{key}.insecure_skip_verify = true` turns TLS certificate checks off; \
             anyone on the path can read and forge postings. Use ca_file instead.",
            file.display()
        );
    }
    if h.connect_timeout.is_zero() || h.request_timeout.is_zero() {
        return Err(err("request_timeout", "durations above 0".into()));
    }
    for name in h.headers.keys() {
        if name.eq_ignore_ascii_case("authorization")
            || name.eq_ignore_ascii_case("idempotency-key")
        {
            return Err(err(
                &format!("headers.{name}"),
                "a header plant-edge does not set itself".into(),
            ));
        }
    }
    Ok(HttpsSinkConfig {
        url: h.url,
        mode,
        headers: h.headers.into_iter().collect(),
        gzip: h.gzip,
        auth,
        tls: TlsSettings {
            ca_file: h.ca_file,
            client_cert: h.client_cert,
            client_key: h.client_key,
            alpn: Vec::new(),
        },
        insecure_skip_verify: h.insecure_skip_verify,
        connect_timeout: h.connect_timeout,
        request_timeout: h.request_timeout,
        max_events_per_second: (h.max_events_per_second > 0).then_some(h.max_events_per_second),
    })
}

fn check_mqtt(
    file: &Path,
    key: &str,
    m: RawMqttSink,
    agent: &RawAgent,
) -> Result<MqttSinkConfig, ConfigError> {
    let err = |sub: &str, expected: String| ConfigError {
        file: file.to_owned(),
        key: format!("{key}.{sub}"),
        expected,
        line: None,
    };
    if m.host.trim().is_empty() {
        return Err(err("host", "a broker host name or address".into()));
    }
    let version = match m.protocol.as_str() {
        "5" | "5.0" => MqttVersion::V5,
        "3.1.1" | "4" => MqttVersion::V311,
        other => {
            return Err(err(
                "protocol",
                format!("\"5\" or \"3.1.1\", found {other:?}"),
            ))
        }
    };
    match m.qos {
        1 | 2 => {}
        0 => {
            return Err(err(
                "qos",
                "1 or 2: QoS 0 has no acknowledgement, so completions and scrap could be lost"
                    .into(),
            ))
        }
        other => return Err(err("qos", format!("1 or 2, found {other}"))),
    }
    let clean_session = m.clean_session.unwrap_or(m.qos == 2);
    if m.qos == 2 && !clean_session {
        return Err(err(
            "clean_session",
            "true with qos = 2: unconfirmed events are re-sent from the journal with new packet ids, \
             which a persistent QoS 2 session could discard as duplicates"
                .into(),
        ));
    }
    let tls_on = m.tls.unwrap_or(!is_loopback(&m.host));
    if !tls_on && (m.ca_file.is_some() || m.client_cert.is_some() || m.client_key.is_some()) {
        return Err(err(
            "tls",
            "true when ca_file, client_cert or client_key is set".into(),
        ));
    }
    check_tls_files(&m.ca_file, &m.client_cert, &m.client_key)
        .map_err(|(sub, why)| err(sub, why))?;
    let password = match &m.password_file {
        Some(path) => Some(read_secret(path).map_err(|why| {
            err(
                "password_file",
                format!("a readable file holding the password ({why})"),
            )
        })?),
        None => None,
    };
    if password.is_some() && m.username.is_none() {
        return Err(err("username", "set when password_file is set".into()));
    }
    if m.topic.contains('#') || m.topic.contains('+') || m.topic.is_empty() {
        return Err(err(
            "topic",
            "a topic template without wildcards, e.g. \"plants/{site}/{line}/{type}\"".into(),
        ));
    }
    if m.inflight == 0 || m.inflight > 1000 {
        return Err(err(
            "inflight",
            format!("between 1 and 1000, found {}", m.inflight),
        ));
    }
    if m.keep_alive < Duration::from_secs(5) {
        return Err(err("keep_alive", "at least 5s".into()));
    }
    let status_topic = m
        .status_topic
        .replace("{site}", &agent.site)
        .replace("{gateway}", &agent.gateway);
    Ok(MqttSinkConfig {
        port: m.port.unwrap_or(if tls_on { 8883 } else { 1883 }),
        host: m.host,
        version,
        qos: m.qos,
        client_id: m
            .client_id
            .unwrap_or_else(|| format!("plant-edge-{}-{}", agent.site, agent.gateway)),
        keep_alive: m.keep_alive,
        clean_session,
        session_expiry: m.session_expiry,
        username: m.username,
        password,
        tls: tls_on.then_some(TlsSettings {
            ca_file: m.ca_file,
            client_cert: m.client_cert,
            client_key: m.client_key,
            alpn: m.alpn,
        }),
        topic: m.topic,
        status_topic,
        inflight: m.inflight,
        max_messages_per_second: (m.max_messages_per_second > 0)
            .then_some(m.max_messages_per_second),
        ack_timeout: m.ack_timeout,
        site: agent.site.clone(),
        gateway: agent.gateway.clone(),
    })
}

fn check_routes(
    file: &Path,
    key: &str,
    routed: &[String],
    sink_names: &[String],
) -> Result<(), ConfigError> {
    let err = |expected: String| ConfigError {
        file: file.to_owned(),
        key: format!("{key}.sinks"),
        expected,
        line: None,
    };
    if let Some(missing) = routed.iter().find(|s| !sink_names.contains(s)) {
        return Err(err(format!(
            "names of configured sinks ({}), found {missing:?}",
            sink_names.join(", ")
        )));
    }
    if routed.is_empty() {
        return Err(err("at least one sink".into()));
    }
    Ok(())
}

fn order_of(word_order: &str, byte_swap: bool) -> Result<Order, String> {
    let low_word_first = match word_order {
        "big" => false,
        "little" => true,
        other => return Err(format!("\"big\" or \"little\", found {other:?}")),
    };
    Ok(Order {
        low_word_first,
        swap_bytes: byte_swap,
    })
}

/// Spans of one signal, for the overlap check: (table, start, end).
type Spans = Vec<(Table, u32, u32)>;

fn span(address: Address, width: u16) -> (Table, u32, u32) {
    (
        address.table,
        address.offset as u32,
        address.offset as u32 + width as u32,
    )
}

/// A register-backed field (record field or counter context).
fn check_field(
    file: &Path,
    key: &str,
    fkey: &str,
    name: &str,
    f: &RawField,
    word_order: &str,
    byte_swap: bool,
) -> Result<FieldSpec, ConfigError> {
    let err = |sub: &str, expected: String| ConfigError {
        file: file.to_owned(),
        key: format!("{key}.{fkey}.{sub}"),
        expected,
        line: None,
    };
    let address: Address = f.address.parse().map_err(|e| err("address", e))?;
    let format = Format::parse(&f.format, f.length).map_err(|e| err("format", e))?;
    if !matches!(address.table, Table::Holding | Table::Input)
        || address.bit.is_some()
        || format == Format::Bool
    {
        return Err(err("address", "a holding or input register".into()));
    }
    let order = order_of(
        f.word_order.as_deref().unwrap_or(word_order),
        f.byte_swap.unwrap_or(byte_swap),
    )
    .map_err(|e| err("word_order", e))?;
    let epoch = match f.epoch.as_deref() {
        None => None,
        Some(unit) if !matches!(format, Format::U32 | Format::U64 | Format::I64) => {
            return Err(err(
                "format",
                format!("u32, u64 or i64 for a time in epoch {unit}"),
            ))
        }
        Some("s") => Some(protocols::source::Epoch::Seconds),
        Some("ms") => Some(protocols::source::Epoch::Millis),
        Some(other) => {
            return Err(err(
                "epoch",
                format!("\"s\" (seconds) or \"ms\" (milliseconds), found {other:?}"),
            ))
        }
    };
    Ok(FieldSpec {
        name: name.to_owned(),
        address,
        format,
        order,
        epoch,
    })
}

fn check_modbus(file: &Path, key: &str, m: RawModbus) -> Result<ModbusConfig, ConfigError> {
    let err = |sub: String, expected: String| ConfigError {
        file: file.to_owned(),
        key: format!("{key}.{sub}"),
        expected,
        line: None,
    };
    let endpoint = if let Some(rest) = m.endpoint.strip_prefix("tcp://") {
        let hostport = if rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            rest.to_owned()
        } else {
            format!("{rest}:502")
        };
        if rest.is_empty() {
            return Err(err(
                "endpoint".into(),
                "tcp://HOST[:PORT] or rtu:///dev/ttyX".into(),
            ));
        }
        Endpoint::Tcp(hostport)
    } else if let Some(path) = m.endpoint.strip_prefix("rtu://") {
        if !path.starts_with('/') {
            return Err(err(
                "endpoint".into(),
                "rtu:///dev/ttyX (an absolute device path)".into(),
            ));
        }
        if !matches!(m.parity.as_str(), "none" | "even" | "odd") {
            return Err(err(
                "parity".into(),
                format!("none, even or odd, found {:?}", m.parity),
            ));
        }
        if !matches!(m.data_bits, 7 | 8) || !matches!(m.stop_bits, 1 | 2) {
            return Err(err(
                "data_bits".into(),
                "data_bits 7 or 8 and stop_bits 1 or 2".into(),
            ));
        }
        Endpoint::Rtu(SerialSettings {
            path: path.to_owned(),
            baud: m.baud,
            parity: m.parity.clone(),
            data_bits: m.data_bits,
            stop_bits: m.stop_bits,
        })
    } else {
        return Err(err(
            "endpoint".into(),
            format!(
                "tcp://HOST[:PORT] or rtu:///dev/ttyX, found {:?}",
                m.endpoint
            ),
        ));
    };
    if m.unit == 0 || m.unit > 247 {
        return Err(err(
            "unit".into(),
            format!("a unit id 1..247, found {}", m.unit),
        ));
    }
    if m.poll_interval < Duration::from_millis(10) {
        return Err(err("poll_interval".into(), "at least 10ms".into()));
    }
    if m.timeout.is_zero() || m.timeout > Duration::from_secs(60) {
        return Err(err("timeout".into(), "between 1ms and 60s".into()));
    }
    order_of(&m.word_order, m.byte_swap).map_err(|e| err("word_order".into(), e))?;
    if m.counters.is_empty() && m.records.is_empty() {
        return Err(err(
            "counters".into(),
            "at least one counter or record".into(),
        ));
    }
    let mut signals: Vec<(String, String, Spans)> = Vec::new();
    let mut counters = Vec::new();
    for (i, c) in m.counters.into_iter().enumerate() {
        let ckey = format!("counters[{i}]");
        let address: Address = c
            .address
            .parse()
            .map_err(|e| err(format!("{ckey}.address"), e))?;
        if !matches!(address.table, Table::Holding | Table::Input) || address.bit.is_some() {
            return Err(err(
                format!("{ckey}.address"),
                format!("a holding or input register for counter {:?}", c.signal),
            ));
        }
        let format = match c.format.as_str() {
            "u16" => Format::U16,
            "i16" => Format::I16,
            "u32" => Format::U32,
            "i32" => Format::I32,
            "f32" => Format::F32,
            "u64" => Format::U64,
            "i64" => Format::I64,
            "f64" => Format::F64,
            other => {
                return Err(err(
                    format!("{ckey}.format"),
                    format!(
                    "u16, i16, u32, i32, u64, i64, f32 or f64 for counter {:?}, found {other:?}",
                    c.signal
                ),
                ))
            }
        };
        let order = order_of(
            c.word_order.as_deref().unwrap_or(&m.word_order),
            c.byte_swap.unwrap_or(m.byte_swap),
        )
        .map_err(|e| err(format!("{ckey}.word_order"), e))?;
        if c.max_step == 0 {
            return Err(err(
                format!("{ckey}.max_step"),
                "at least 1 (the most parts made between two polls)".into(),
            ));
        }
        if !(c.scale.is_finite() && c.scale > 0.0) {
            return Err(err(format!("{ckey}.scale"), "a positive number".into()));
        }
        if c.event_type.is_empty() || c.signal.is_empty() {
            return Err(err(ckey.clone(), "a signal name and an event type".into()));
        }
        signals.push((c.signal.clone(), ckey, vec![span(address, format.width())]));
        counters.push(CounterSpec {
            signal: c.signal,
            event_type: buffer::EventType(c.event_type),
            address,
            format,
            order,
            max_step: c.max_step,
            unit: c.unit,
            scale: c.scale,
            place: placement(c.line, c.machine, c.attributes),
        });
    }
    let mut records = Vec::new();
    for (i, r) in m.records.into_iter().enumerate() {
        let rkey = format!("records[{i}]");
        let ready: Address = r
            .ready
            .parse()
            .map_err(|e| err(format!("{rkey}.ready"), e))?;
        if matches!(ready.table, Table::Holding | Table::Input) && ready.bit.is_none() {
            return Err(err(
                format!("{rkey}.ready"),
                "a coil, a discrete input or a register bit like holding:200.0".into(),
            ));
        }
        let ack: Address = r.ack.parse().map_err(|e| err(format!("{rkey}.ack"), e))?;
        if !matches!(ack.table, Table::Coil | Table::Holding) || ack.bit.is_some() {
            return Err(err(
                format!("{rkey}.ack"),
                "a coil or a holding register the agent may write".into(),
            ));
        }
        if r.fields.is_empty() {
            return Err(err(format!("{rkey}.fields"), "at least one field".into()));
        }
        let mut spans = vec![span(ready, 1), span(ack, 1)];
        let mut fields = Vec::new();
        for (name, f) in &r.fields {
            let field = check_field(
                file,
                key,
                &format!("{rkey}.fields.{name}"),
                name,
                f,
                &m.word_order,
                m.byte_swap,
            )?;
            spans.push(span(field.address, field.format.width()));
            fields.push(field);
        }
        let key_fields = r.key.unwrap_or_else(|| r.fields.keys().cloned().collect());
        if key_fields.is_empty() {
            return Err(err(
                format!("{rkey}.key"),
                "at least one field name (an empty key would give every record the same identity)"
                    .into(),
            ));
        }
        if let Some(missing) = key_fields.iter().find(|k| !r.fields.contains_key(*k)) {
            return Err(err(
                format!("{rkey}.key"),
                format!("names of the record's fields, found {missing:?}"),
            ));
        }
        let (event_type, type_from) =
            record_type(r.event_type, r.type_from, |f| r.fields.contains_key(f))
                .map_err(|(sub, why)| err(format!("{rkey}.{sub}"), why))?;
        let reasons = record_reasons(r.reasons, r.fields.contains_key("reason_code"))
            .map_err(|(sub, why)| err(format!("{rkey}.{sub}"), why))?;
        signals.push((r.signal.clone(), rkey, spans));
        records.push(RecordSpec {
            signal: r.signal,
            event_type,
            ready,
            ack,
            fields,
            key: key_fields,
            unit: r.unit,
            type_from,
            place: protocols::source::Placement {
                reasons,
                ..placement(r.line, r.machine, r.attributes)
            },
        });
    }
    let mut context = Vec::new();
    let mut context_spans = Vec::new();
    for (name, f) in &m.context {
        let fkey = format!("context.{name}");
        if !matches!(name.as_str(), "work_order" | "material" | "lot") {
            return Err(err(fkey, "work_order, material or lot".into()));
        }
        let field = check_field(file, key, &fkey, name, f, &m.word_order, m.byte_swap)?;
        context_spans.push(span(field.address, field.format.width()));
        context.push(field);
    }
    if !context_spans.is_empty() {
        signals.push(("context".into(), "context".into(), context_spans));
    }
    for (signal, skey, spans) in &signals {
        for (table, _, end) in spans {
            if *end > 65_536 {
                return Err(err(
                    skey.clone(),
                    format!(
                        "addresses within 0..65535: signal {signal:?} ends at {:?} {}",
                        table,
                        end - 1
                    ),
                ));
            }
        }
    }
    for (i, (a, akey, a_spans)) in signals.iter().enumerate() {
        for (b, _, b_spans) in &signals[i + 1..] {
            for (ta, sa, ea) in a_spans {
                for (tb, sb, eb) in b_spans {
                    if ta == tb && sa < eb && sb < ea {
                        return Err(err(
                            akey.clone(),
                            format!("a register map where signals do not overlap: {a:?} ({ta:?} {sa}..{ea}) overlaps {b:?} ({tb:?} {sb}..{eb})"),
                        ));
                    }
                }
            }
        }
    }
    Ok(ModbusConfig {
        endpoint,
        unit: m.unit,
        poll_interval: m.poll_interval,
        timeout: m.timeout,
        max_gap: m.max_gap.min(64),
        line: m.line,
        machine: m.machine,
        counters,
        records,
        context,
    })
}

fn check_node(value: &str) -> Result<NodeId, String> {
    value.parse::<NodeId>().map_err(|_| {
        format!("an OPC UA node id like \"ns=2;s=Line1.Good\" or \"ns=3;i=1001\", found {value:?}")
    })
}

fn ack_value(value: &toml::Value) -> Result<FieldValue, String> {
    Ok(match value {
        toml::Value::Boolean(b) => FieldValue::Bool(*b),
        toml::Value::Integer(i) => FieldValue::Int(*i),
        toml::Value::Float(f) => FieldValue::Float(*f),
        toml::Value::String(s) => FieldValue::Text(s.clone()),
        other => return Err(format!("a boolean, number or string, found {other}")),
    })
}

fn check_ack_argument(
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

fn check_opcua(
    file: &Path,
    key: &str,
    m: RawOpcUa,
    state_dir: &Path,
    site: &str,
    gateway: &str,
) -> Result<OpcUaConfig, ConfigError> {
    let err = |sub: String, expected: String| ConfigError {
        file: file.to_owned(),
        key: format!("{key}.{sub}"),
        expected,
        line: None,
    };
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
            password: read_secret(path)
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
    if counters.is_empty() && records.is_empty() {
        return Err(err(
            "counters".into(),
            "at least one counter or record".into(),
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
    })
}

fn check(file: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let err = |key: &str, expected: String| ConfigError {
        file: file.to_owned(),
        key: key.to_owned(),
        expected,
        line: None,
    };
    for (key, value) in [
        ("agent.site", &raw.agent.site),
        ("agent.gateway", &raw.agent.gateway),
    ] {
        if !valid_name(value) {
            return Err(err(
                key,
                format!("1-64 letters, digits, '-' or '_', found {value:?}"),
            ));
        }
    }
    writable(&raw.agent.state_dir)
        .map_err(|why| err("agent.state_dir", format!("a writable directory ({why})")))?;
    if raw.agent.shutdown_timeout.is_zero() || raw.agent.shutdown_timeout > Duration::from_secs(300)
    {
        return Err(err(
            "agent.shutdown_timeout",
            "a duration between 1s and 5m".into(),
        ));
    }

    let metrics_listen = match raw.agent.metrics_listen.as_str() {
        "off" | "" => None,
        text => Some(text.parse::<std::net::SocketAddr>().map_err(|_| {
            err(
                "agent.metrics_listen",
                format!("an address like 127.0.0.1:9464, or \"off\"; found {text:?}"),
            )
        })?),
    };
    let j = &raw.journal;
    if j.max_bytes.as_u64() < ByteSize::mib(1).as_u64() {
        return Err(err(
            "journal.max_bytes",
            format!("at least 1MiB, found {}", j.max_bytes),
        ));
    }
    if j.cache.as_u64() < ByteSize::mib(1).as_u64() || j.cache.as_u64() > ByteSize::gib(4).as_u64()
    {
        return Err(err(
            "journal.cache",
            format!("between 1MiB and 4GiB, found {}", j.cache),
        ));
    }
    if let Some(ttl) = j.ttl {
        if ttl < Duration::from_secs(60) {
            return Err(err(
                "journal.ttl",
                "at least 1m (or leave it out for no expiry)".into(),
            ));
        }
    }
    if j.dedup_window_count == 0 || j.dedup_window_count > 10_000_000 {
        return Err(err(
            "journal.dedup_window_count",
            "between 1 and 10000000".into(),
        ));
    }
    for t in &j.telemetry_types {
        if t == buffer::EventType::COMPLETION || t == buffer::EventType::SCRAP {
            return Err(err(
                "journal.telemetry_types",
                format!("event types that may be dropped when full; {t} is a business event and is never dropped"),
            ));
        }
    }

    let f = &raw.forwarder;
    if f.batch_size == 0 || f.batch_size > 10_000 {
        return Err(err(
            "forwarder.batch_size",
            format!("between 1 and 10000, found {}", f.batch_size),
        ));
    }
    if f.retry_initial.is_zero() || f.retry_initial > f.retry_max {
        return Err(err(
            "forwarder.retry_initial",
            "a duration above 0 and not above forwarder.retry_max".into(),
        ));
    }

    if raw.sinks.is_empty() {
        return Err(err(
            "sinks",
            "at least one sink, e.g. [sinks.archive] with kind = \"file\"".into(),
        ));
    }
    if raw.sinks.len() > buffer::journal::MAX_SINKS {
        return Err(err(
            "sinks",
            format!("at most {} sinks", buffer::journal::MAX_SINKS),
        ));
    }
    let mut sinks = Vec::new();
    for (name, sink) in raw.sinks {
        let key = format!("sinks.{name}");
        if !valid_name(&name) {
            return Err(err(
                &key,
                "a name of 1-64 letters, digits, '-' or '_'".into(),
            ));
        }
        let kind = match sink {
            RawSink::File(fs) => {
                let dir = fs.path.parent().unwrap_or(Path::new("."));
                if fs.path.file_name().is_none() {
                    return Err(err(&format!("{key}.path"), "a file path".into()));
                }
                writable(dir).map_err(|why| {
                    err(
                        &format!("{key}.path"),
                        format!("a file in a writable directory ({why})"),
                    )
                })?;
                if fs.rotate_bytes.as_u64() < 4096 {
                    return Err(err(&format!("{key}.rotate_bytes"), "at least 4KiB".into()));
                }
                if fs.keep_files == Some(0) {
                    return Err(err(
                        &format!("{key}.keep_files"),
                        "at least 1 (or leave it out to keep all)".into(),
                    ));
                }
                SinkKind::File(FileSinkConfig {
                    path: fs.path,
                    rotate_bytes: fs.rotate_bytes.as_u64(),
                    keep_files: fs.keep_files,
                })
            }
            RawSink::Mqtt(m) => SinkKind::Mqtt(Box::new(check_mqtt(file, &key, *m, &raw.agent)?)),
            RawSink::Https(h) => SinkKind::Https(Box::new(check_https(file, &key, *h)?)),
        };
        sinks.push(SinkConfig { name, kind });
    }
    let sink_names: Vec<String> = sinks.iter().map(|s| s.name.clone()).collect();

    let mut sources = Vec::new();
    for (name, source) in raw.sources {
        let key = format!("sources.{name}");
        if !valid_name(&name) {
            return Err(err(
                &key,
                "a name of 1-64 letters, digits, '-' or '_'".into(),
            ));
        }
        match source {
            RawSource::Modbus(m) => {
                let routed = m.sinks.clone().unwrap_or_else(|| sink_names.clone());
                check_routes(file, &key, &routed, &sink_names)?;
                let attributes = m.attributes.clone();
                sources.push(SourceConfig {
                    name,
                    sinks: routed,
                    attributes,
                    kind: SourceKind::Modbus(Box::new(check_modbus(file, &key, *m)?)),
                });
            }
            RawSource::Opcua(m) => {
                let routed = m.sinks.clone().unwrap_or_else(|| sink_names.clone());
                check_routes(file, &key, &routed, &sink_names)?;
                let attributes = m.attributes.clone();
                let checked = check_opcua(
                    file,
                    &key,
                    *m,
                    &raw.agent.state_dir,
                    &raw.agent.site,
                    &raw.agent.gateway,
                )?;
                sources.push(SourceConfig {
                    name,
                    sinks: routed,
                    attributes,
                    kind: SourceKind::OpcUa(Box::new(checked)),
                });
            }
            RawSource::Simulated(sim) => {
                let routed = sim.sinks.unwrap_or_else(|| sink_names.clone());
                if let Some(missing) = routed.iter().find(|s| !sink_names.contains(s)) {
                    return Err(err(
                        &format!("{key}.sinks"),
                        format!(
                            "names of configured sinks ({}), found {missing:?}",
                            sink_names.join(", ")
                        ),
                    ));
                }
                if routed.is_empty() {
                    return Err(err(&format!("{key}.sinks"), "at least one sink".into()));
                }
                if sim.interval < Duration::from_millis(10) {
                    return Err(err(&format!("{key}.interval"), "at least 10ms".into()));
                }
                let width = match sim.counter_bits {
                    16 => CounterWidth::U16,
                    32 => CounterWidth::U32,
                    64 => CounterWidth::U64,
                    other => {
                        return Err(err(
                            &format!("{key}.counter_bits"),
                            format!("16, 32 or 64, found {other}"),
                        ))
                    }
                };
                sources.push(SourceConfig {
                    name,
                    sinks: routed,
                    attributes: sim.attributes,
                    kind: SourceKind::Simulated(SimulatedConfig {
                        line: sim.line,
                        machine: sim.machine,
                        interval: sim.interval,
                        good_per_tick: sim.good_per_tick,
                        scrap_every: sim.scrap_every,
                        width,
                        start: sim.start,
                    }),
                });
            }
        }
    }

    Ok(Config {
        file: file.to_owned(),
        site: raw.agent.site,
        gateway: raw.agent.gateway,
        state_dir: raw.agent.state_dir,
        log_format: raw.agent.log_format,
        shutdown_timeout: raw.agent.shutdown_timeout,
        metrics_listen,
        ready_max_backlog_age: raw.agent.ready_max_backlog_age,
        journal: JournalSettings {
            max_bytes: j.max_bytes.as_u64(),
            ttl: j.ttl,
            cache_bytes: j.cache.as_u64(),
            min_free_disk: j.min_free_disk.as_u64(),
            dedup_window: j.dedup_window,
            dedup_window_count: j.dedup_window_count,
            telemetry_types: j.telemetry_types.iter().cloned().collect(),
        },
        forwarder: ForwarderSettings {
            batch_size: f.batch_size,
            retry_initial: f.retry_initial,
            retry_max: f.retry_max,
            max_attempts: f.max_attempts,
        },
        sinks,
        sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    const MINIMAL: &str = r#"
[agent]
site = "plant1"
gateway = "gw1"
state_dir = "/tmp/plant-edge-config-test"

[sinks.archive]
kind = "file"
path = "/tmp/plant-edge-config-test/archive/events.jsonl"
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.journal.max_bytes, 1 << 30);
        assert_eq!(config.journal.cache_bytes, 32 << 20);
        assert_eq!(config.forwarder.batch_size, 256);
        assert_eq!(config.sinks.len(), 1);
    }

    #[test]
    fn sizes_and_durations_are_human() {
        let text = format!("{MINIMAL}\n[journal]\nmax_bytes = \"512MiB\"\nttl = \"30d\"\ndedup_window = \"2h 30m\"\n");
        let config = parse(&text).expect("valid");
        assert_eq!(config.journal.max_bytes, 512 << 20);
        assert_eq!(config.journal.ttl, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(config.journal.dedup_window, Duration::from_secs(9000));
    }

    #[test]
    fn unknown_key_is_named_with_its_table() {
        let text = format!("{MINIMAL}\n[journal]\nmax_byte = \"1GiB\"\n");
        let e = parse(&text).expect_err("unknown key");
        assert_eq!(e.key, "journal.max_byte", "{e}");
        assert!(e.expected.contains("max_bytes"), "{e}");
    }

    #[test]
    fn unknown_key_inside_a_tagged_sink_is_refused() {
        let text = MINIMAL.replace("kind = \"file\"", "kind = \"file\"\nrotate = 5");
        let e = parse(&text).expect_err("unknown key");
        assert!(e.to_string().contains("rotate"), "{e}");
    }

    const OPCUA: &str = r#"
[sources.mes1]
kind = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840/"
line = "L1"
machine = "filler1"
counters = [{ signal = "good", type = "production.completion", node = "ns=2;s=Line1.Good" }]
records = [{ signal = "completion", type = "production.completion", node = "ns=2;s=Line1.Record", fields = { sequence = "/seq", quantity = "/qty" }, ack = { write = "ns=2;s=Line1.Ack", field = "sequence" } }]
"#;

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
    fn errors_found_after_parsing_name_their_line() {
        let line_of_error = |text: &str| {
            let e = parse(text).expect_err("invalid");
            let line = e.line.unwrap_or_else(|| panic!("no line: {e}"));
            (
                e.key.clone(),
                text.lines().nth(line - 1).unwrap_or("").trim().to_owned(),
            )
        };
        let (key, line) =
            line_of_error(&MINIMAL.replace("gateway = \"gw1\"", "gateway = \"gw 1\""));
        assert_eq!(
            (key.as_str(), line.as_str()),
            ("agent.gateway", "gateway = \"gw 1\"")
        );
        // Inside an inline array of tables: the line holding it.
        let text = format!(
            "{MINIMAL}{}",
            OPCUA.replacen("type = \"production.completion\", node = \"ns=2;s=Line1.Record\"", "type = \"production.completion\", reasons = { \"17\" = \"jam\" }, node = \"ns=2;s=Line1.Record\"", 1)
        );
        let (key, line) = line_of_error(&text);
        assert_eq!(key, "sources.mes1.records[0].reasons");
        assert!(
            line.starts_with("records = [{") && line.contains("reasons"),
            "{line}"
        );
        // The second of two tables of an array: its own lines.
        let text = format!(
            "{MINIMAL}\n[sources.press1]\nkind = \"modbus\"\nendpoint = \"tcp://127.0.0.1:502\"\nline = \"L1\"\nmachine = \"p\"\n\n[[sources.press1.counters]]\nsignal = \"good\"\ntype = \"production.completion\"\naddress = \"holding:0\"\n\n[[sources.press1.counters]]\nsignal = \"scrap\"\ntype = \"production.scrap\"\naddress = \"holding:1\"\nmax_step = 0\n"
        );
        let (key, line) = line_of_error(&text);
        assert_eq!(
            (key.as_str(), line.as_str()),
            ("sources.press1.counters[1].max_step", "max_step = 0")
        );
        // A key left to its default: the table that lacks it.
        let (key, line) = line_of_error(&format!("{MINIMAL}\n[sources.line1]\nkind = \"simulated\"\nline = \"L1\"\nmachine = \"m\"\nsinks = [\"erp\"]\n"));
        assert_eq!(
            (key.as_str(), line.as_str()),
            ("sources.line1.sinks", "sinks = [\"erp\"]")
        );
    }

    #[test]
    fn bad_duration_names_the_key() {
        let text = format!("{MINIMAL}\n[forwarder]\nretry_max = \"soon\"\n");
        let e = parse(&text).expect_err("bad duration");
        assert_eq!(e.key, "forwarder.retry_max", "{e}");
    }

    #[test]
    fn source_routed_to_missing_sink_is_refused() {
        let text = format!("{MINIMAL}\n[sources.line1]\nkind = \"simulated\"\nline = \"L1\"\nmachine = \"m\"\nsinks = [\"erp\"]\n");
        let e = parse(&text).expect_err("missing sink");
        assert_eq!(e.key, "sources.line1.sinks");
        assert!(e.expected.contains("archive"), "{e}");
    }

    #[test]
    fn completion_cannot_be_declared_telemetry() {
        let text = format!("{MINIMAL}\n[journal]\ntelemetry_types = [\"production.completion\"]\n");
        assert_eq!(
            parse(&text).expect_err("business").key,
            "journal.telemetry_types"
        );
    }

    #[test]
    fn shipped_default_config_is_valid() {
        let text =
            DEFAULT_CONFIG.replace("/var/lib/plant-edge", "/tmp/plant-edge-default-config-test");
        parse(&text).expect("the packaged default config must validate");
    }
}
