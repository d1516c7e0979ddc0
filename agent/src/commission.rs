//! `plant-edge validate --connect`: after the static checks, every source
//! and sink is tried as configured, one line per item, ok or FAIL with the
//! reason, so a wrong address, word order, password or certificate shows
//! before go-live.
//!
//! Invariant: nothing is written to a PLC or MES (reads only; handshake
//! flags are read, never set), no journal is opened, no event is posted
//! (the MQTT check publishes a status message under the gateway's status
//! topic, `<status_topic>/commissioning`, with its own client id, so a
//! running agent's session and retained status are untouched; HTTPS sends
//! OPTIONS).

use std::time::Duration;

use protocols::sinks::file::FileSinkConfig;
use protocols::sinks::https::{HttpsSink, HttpsSinkConfig};
use protocols::sinks::mqtt::{MqttSink, MqttSinkConfig};
use protocols::sources::modbus::map::{decode, Address, Format, Order, Read, Table, Value};
use protocols::sources::modbus::{self, ModbusConfig};
use protocols::sources::opcua::{self, OpcUaConfig, RecordLayout};
use protocols::Sink;

use crate::config::{Config, SinkKind, SourceKind};

/// One line of the report.
#[derive(Debug)]
pub struct Check {
    /// What was tried (`source press: counter good holding:0`).
    pub item: String,
    /// What was found, or why it failed.
    pub result: Result<String, String>,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.result {
            Ok(found) => write!(f, "ok    {}: {found}", self.item),
            Err(why) => write!(f, "FAIL  {}: {why}", self.item),
        }
    }
}

fn check(item: String, result: Result<String, String>) -> Check {
    Check { item, result }
}

/// Tries every source and sink of `config`.
pub async fn run(config: &Config) -> Vec<Check> {
    let mut report = Vec::new();
    for source in &config.sources {
        let name = format!("source {}", source.name);
        match &source.kind {
            SourceKind::Simulated(_) => {
                report.push(check(name, Ok("simulated, nothing to connect".into())))
            }
            SourceKind::Modbus(mc) => modbus_checks(&name, mc, &mut report).await,
            SourceKind::OpcUa(oc) => opcua_checks(&name, oc, &mut report).await,
        }
    }
    for sink in &config.sinks {
        let name = format!("sink {}", sink.name);
        let result = match &sink.kind {
            SinkKind::File(fc) => file_check(fc),
            SinkKind::Mqtt(mc) => mqtt_check(mc).await,
            SinkKind::Https(hc) => https_check(hc).await,
        };
        report.push(check(name, result));
    }
    report
}

/// Reads one value as the source would and decodes it as configured.
async fn read_value(
    link: &mut modbus::Link,
    address: Address,
    format: Format,
    order: Order,
    timeout: Duration,
) -> Result<String, String> {
    let width = if address.bit.is_some() || matches!(address.table, Table::Coil | Table::Discrete) {
        1
    } else {
        format.width()
    };
    let read = Read {
        table: address.table,
        start: address.offset,
        count: width,
    };
    let words = match modbus::read(link, read, timeout).await {
        Ok(Ok(words)) => words,
        Ok(Err(code)) => return Err(format!("the device refused the read: {code:?}")),
        Err(e) => return Err(e),
    };
    let value = match (address.bit, address.table) {
        (Some(bit), _) => Value::Bool(words.first().is_some_and(|w| w & (1 << bit) != 0)),
        (None, Table::Coil | Table::Discrete) => {
            Value::Bool(words.first().is_some_and(|w| *w != 0))
        }
        _ => decode(format, order, &words).map_err(|e| format!("read, but {e}"))?,
    };
    Ok(format!(
        "{} = {}",
        format_name(format, address),
        value.text()
    ))
}

fn format_name(format: Format, address: Address) -> String {
    if address.bit.is_some() || matches!(address.table, Table::Coil | Table::Discrete) {
        "bool".into()
    } else {
        format!("{format:?}").to_lowercase()
    }
}

async fn modbus_checks(name: &str, mc: &ModbusConfig, report: &mut Vec<Check>) {
    let device = format!("{} unit {}", mc.endpoint, mc.unit);
    let mut link = match modbus::connect(&mc.endpoint, mc.unit, mc.timeout).await {
        Ok(link) => {
            report.push(check(
                format!("{name}: PLC {device}"),
                Ok("reachable".into()),
            ));
            link
        }
        Err(e) => {
            report.push(check(format!("{name}: PLC {device}"), Err(e)));
            return;
        }
    };
    for c in &mc.counters {
        let result = read_value(&mut link, c.address, c.format, c.order, mc.timeout).await;
        report.push(check(
            format!("{name}: counter {} at {}", c.signal, c.address),
            result,
        ));
    }
    for r in &mc.records {
        for (flag, address) in [("ready", r.ready), ("ack", r.ack)] {
            let result = read_value(
                &mut link,
                address,
                Format::Bool,
                Order::default(),
                mc.timeout,
            )
            .await;
            report.push(check(
                format!("{name}: record {} {flag} flag at {address}", r.signal),
                result,
            ));
        }
        for f in &r.fields {
            let result = read_value(&mut link, f.address, f.format, f.order, mc.timeout).await;
            report.push(check(
                format!(
                    "{name}: record {} field {} at {}",
                    r.signal, f.name, f.address
                ),
                result,
            ));
        }
    }
    for f in &mc.context {
        let result = read_value(&mut link, f.address, f.format, f.order, mc.timeout).await;
        report.push(check(
            format!("{name}: context {} at {}", f.name, f.address),
            result,
        ));
    }
}

async fn opcua_checks(name: &str, oc: &OpcUaConfig, report: &mut Vec<Check>) {
    use protocols::opcua_lib::types::{AttributeId, ReadValueId, TimestampsToReturn};
    let connection = &oc.connection;
    let item = format!(
        "{name}: OPC UA {} ({} / {})",
        connection.endpoint, connection.security_policy, connection.security_mode
    );
    let mut client = match opcua::session::client(connection) {
        Ok(client) => client,
        Err(e) => return report.push(check(item, Err(e))),
    };
    let (session, event_loop) = match opcua::session::open(&mut client, connection).await {
        Ok(opened) => opened,
        Err(e) => return report.push(check(item, Err(e))),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let driver = opcua::session::drive(event_loop, tx);
    if let Err(e) = opcua::session::connected(&session, &mut rx, connection).await {
        driver.abort();
        return report.push(check(item, Err(e)));
    }
    report.push(check(
        item,
        Ok("session accepted (security and identity)".into()),
    ));
    // Every node the source watches, with what it must hold.
    let mut nodes: Vec<(String, protocols::NodeId, bool)> = Vec::new();
    for c in &oc.counters {
        nodes.push((format!("counter {}", c.signal), c.node.clone(), true));
    }
    for r in &oc.records {
        nodes.push((format!("record {}", r.signal), r.trigger.clone(), false));
        if let RecordLayout::Nodes(fields) = &r.layout {
            for (field, node) in fields {
                nodes.push((
                    format!("record {} field {field}", r.signal),
                    node.clone(),
                    false,
                ));
            }
        }
    }
    for (what, node, counter) in nodes {
        let read = session
            .read(
                &[ReadValueId {
                    node_id: node.clone(),
                    attribute_id: AttributeId::Value as u32,
                    ..Default::default()
                }],
                TimestampsToReturn::Neither,
                0.0,
            )
            .await;
        let result = match read {
            Err(e) => Err(format!("read failed: {e}")),
            Ok(values) => match values.into_iter().next() {
                None => Err("no answer for the node".into()),
                Some(value) => {
                    let status = value.status.unwrap_or_default();
                    match value.value {
                        _ if !status.is_good() => {
                            Err(format!("status {status} (no such node, or not readable)"))
                        }
                        None => Err("the node holds no value".into()),
                        Some(v) if counter => opcua::record::counter_value(&v)
                            .map(|_| format!("{v} ({})", crate::probe::type_name(&v)))
                            .map_err(|e| format!("not a counter: {e}")),
                        Some(v) => Ok(format!("readable ({})", crate::probe::type_name(&v))),
                    }
                }
            },
        };
        report.push(check(format!("{name}: {what} {node}"), result));
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
    driver.abort();
}

fn file_check(fc: &FileSinkConfig) -> Result<String, String> {
    let dir = fc.path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let probe = dir.join(".plant-edge-write-check");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| format!("{} is not writable: {e}", dir.display()))?;
    Ok(format!("{} writable", dir.display()))
}

async fn mqtt_check(mc: &MqttSinkConfig) -> Result<String, String> {
    // Its own client id and a clean session: the broker would otherwise
    // hand the running agent's session (and its in-flight publishes) to
    // the check and drop the agent's connection. Its own status topic
    // under the agent's: its birth, will and goodbye must not overwrite
    // the agent's retained online/offline.
    let check = MqttSinkConfig {
        client_id: format!("{}-check", mc.client_id),
        clean_session: true,
        session_expiry: Duration::ZERO,
        status_topic: format!("{}/commissioning", mc.status_topic),
        ..mc.clone()
    };
    let topic = check.status_topic.clone();
    let mut sink = MqttSink::start(check).map_err(|e| e.to_string())?;
    let confirmed = sink.confirm_status(Duration::from_secs(10)).await;
    sink.close().await;
    confirmed.map(|()| {
        format!(
            "{}:{} login accepted, a status publish to {topic} acknowledged",
            mc.host, mc.port
        )
    })
}

async fn https_check(hc: &HttpsSinkConfig) -> Result<String, String> {
    let mut sink = HttpsSink::new(hc.clone()).map_err(|e| e.to_string())?;
    sink.check()
        .await
        .map(|found| format!("{}: {found}", hc.url))
}
