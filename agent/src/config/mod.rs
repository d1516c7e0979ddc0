//! Configuration: TOML file → raw structs (serde, unknown keys refused) →
//! checked [`Config`] (references resolved, bounds and paths checked).
//!
//! Every error names the file, the key and what was expected; `main` turns
//! it into exit code 78 (EX_CONFIG) so systemd's `RestartPreventExitStatus`
//! stops a restart loop on a bad config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
pub use journal::JournalSettings;
use journal::RawJournal;
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

mod checkpoints;
mod error;
mod files;
mod https;
mod journal;
mod modbus;
mod mqtt;
mod opcua;
mod signals;

pub use error::ConfigError;
use error::{keyed, line_of, toml_error};
use files::*;
use https::*;
use modbus::*;
use mqtt::*;
use opcua::*;
use signals::*;

/// The commented default configuration (`plant-edge print-config`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../packaging/plant-edge.toml");

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/plant-edge")
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
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
    #[serde(default)]
    checkpoints: Option<checkpoints::RawCheckpoints>,
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
    #[serde(default)]
    worker_threads: Option<i64>,
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_ready_max_age() -> Duration {
    Duration::from_secs(15 * 60)
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
    /// Threads running the agent's tasks: `None` one per core, 1 a
    /// single-threaded runtime (one slow core), n a pool of n.
    pub worker_threads: Option<usize>,
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
    /// Reconciliation periods and the sinks of their events (`None`: no
    /// checkpoint events).
    pub checkpoints: Option<checkpoints::Checkpoints>,
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

    /// Reads the configuration for a command that logs in nowhere
    /// (`status`, `journal`): secrets are neither needed nor read.
    pub fn load_without_secrets(file: &Path) -> Result<Self, ConfigError> {
        SKIP_SECRETS.with(|s| s.set(true));
        let loaded = Self::load(file);
        SKIP_SECRETS.with(|s| s.set(false));
        loaded
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

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_routes(
    file: &Path,
    key: &str,
    routed: &[String],
    sink_names: &[String],
) -> Result<(), ConfigError> {
    let within = keyed(file, key);
    let err = |expected: String| within("sinks", expected);
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

/// Spans of one signal, for the overlap check: (table, start, end).
type Spans = Vec<(Table, u32, u32)>;

fn check(file: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let err = |key: &str, expected: String| keyed(file, "")(key, expected);
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

    let worker_threads = match raw.agent.worker_threads {
        None => None,
        Some(n @ 1..=64) => Some(n as usize),
        Some(n) => {
            return Err(err(
                "agent.worker_threads",
                format!("a number of threads from 1 (one core) to 64, found {n}"),
            ))
        }
    };
    let metrics_listen = match raw.agent.metrics_listen.as_str() {
        "off" | "" => None,
        text => Some(text.parse::<std::net::SocketAddr>().map_err(|_| {
            err(
                "agent.metrics_listen",
                format!("an address like 127.0.0.1:9464, or \"off\"; found {text:?}"),
            )
        })?),
    };
    let journal = journal::settings(&raw.journal, &err)?;
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
    let checkpoints = checkpoints::check(file, raw.checkpoints, &sinks)?;

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
        worker_threads,
        metrics_listen,
        ready_max_backlog_age: raw.agent.ready_max_backlog_age,
        journal,
        forwarder: ForwarderSettings {
            batch_size: f.batch_size,
            retry_initial: f.retry_initial,
            retry_max: f.retry_max,
            max_attempts: f.max_attempts,
        },
        sinks,
        sources,
        checkpoints,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    pub(crate) const MINIMAL: &str = r#"
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
    fn worker_threads_default_to_one_per_core_and_take_1_to_64() {
        assert_eq!(parse(MINIMAL).expect("valid").worker_threads, None);
        let with =
            |n: &str| MINIMAL.replace("[agent]\n", &format!("[agent]\nworker_threads = {n}\n"));
        assert_eq!(parse(&with("1")).expect("valid").worker_threads, Some(1));
        assert_eq!(parse(&with("64")).expect("valid").worker_threads, Some(64));
        for bad in ["0", "65", "-1"] {
            let e = parse(&with(bad)).expect_err("refused");
            assert_eq!(e.key, "agent.worker_threads", "{bad}");
            assert!(e.expected.contains("1 (one core) to 64"), "{e}");
        }
    }

    #[test]
    fn sizes_and_durations_are_human() {
        let text = format!("{MINIMAL}\n[journal]\nmax_bytes = \"512MiB\"\nttl = \"30d\"\ndedup_window = \"2h 30m\"\n");
        let config = parse(&text).expect("valid");
        assert_eq!(config.journal.max_bytes, 512 << 20);
        assert_eq!(config.journal.ttl, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(config.journal.dedup_window, Duration::from_secs(9000));
        assert_eq!(
            config.journal.commit_window,
            Duration::from_millis(50),
            "documented default"
        );
        let zero =
            parse(&format!("{MINIMAL}\n[journal]\ncommit_window = \"0s\"\n")).expect("0s is valid");
        assert_eq!(zero.journal.commit_window, Duration::ZERO);
        let e = parse(&format!("{MINIMAL}\n[journal]\ncommit_window = \"2s\"\n"))
            .expect_err("too long");
        assert_eq!(e.key, "journal.commit_window", "{e}");
        assert!(e.line.is_some(), "{e}");
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

    pub(crate) const OPCUA: &str = r#"
[sources.mes1]
kind = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840/"
line = "L1"
machine = "filler1"
counters = [{ signal = "good", type = "production.completion", node = "ns=2;s=Line1.Good" }]
records = [{ signal = "completion", type = "production.completion", node = "ns=2;s=Line1.Record", fields = { sequence = "/seq", quantity = "/qty" }, ack = { write = "ns=2;s=Line1.Ack", field = "sequence" } }]
"#;

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
