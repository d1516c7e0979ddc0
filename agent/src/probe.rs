//! `plant-edge probe modbus`: what a device returns, without any journal.
//! For OT engineers commissioning a register map.

use std::time::Duration;

use anyhow::{bail, Context};
use protocols::opcua_lib;
use protocols::sources::modbus::map::{decode, Address, Format, Order, Read, Table};
use protocols::sources::modbus::{self, Endpoint, SerialSettings};

/// Parses `tcp://HOST[:PORT]` or `rtu:///dev/ttyUSB0?baud=19200&parity=E`.
fn endpoint(text: &str) -> anyhow::Result<Endpoint> {
    if let Some(rest) = text.strip_prefix("tcp://") {
        let hostport = if rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            rest.to_owned()
        } else {
            format!("{rest}:502")
        };
        return Ok(Endpoint::Tcp(hostport));
    }
    if let Some(rest) = text.strip_prefix("rtu://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut serial = SerialSettings {
            path: path.to_owned(),
            baud: 19200,
            parity: "even".into(),
            data_bits: 8,
            stop_bits: 1,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("{pair:?} is not key=value"))?;
            match k {
                "baud" => serial.baud = v.parse().with_context(|| format!("baud {v:?}"))?,
                "parity" => {
                    serial.parity = match v {
                        "E" | "even" => "even",
                        "O" | "odd" => "odd",
                        "N" | "none" => "none",
                        _ => bail!("parity is E, O or N, found {v:?}"),
                    }
                    .into()
                }
                "data_bits" => {
                    serial.data_bits = v.parse().with_context(|| format!("data_bits {v:?}"))?
                }
                "stop_bits" => {
                    serial.stop_bits = v.parse().with_context(|| format!("stop_bits {v:?}"))?
                }
                _ => bail!("unknown serial setting {k:?} (baud, parity, data_bits, stop_bits)"),
            }
        }
        return Ok(Endpoint::Rtu(serial));
    }
    bail!("endpoint is tcp://HOST[:PORT] or rtu:///dev/ttyX?baud=19200&parity=E, found {text:?}")
}

/// Parses `holding:100..110` (end exclusive) or `coil:5`.
fn range(text: &str) -> anyhow::Result<Read> {
    let (start, end) = match text.split_once("..") {
        Some((s, e)) => (
            s.to_owned(),
            Some(
                e.parse::<u32>()
                    .with_context(|| format!("range end in {text:?}"))?,
            ),
        ),
        None => (text.to_owned(), None),
    };
    let address: Address = start.parse().map_err(anyhow::Error::msg)?;
    let count = match end {
        Some(end) if end > address.offset as u32 => end - address.offset as u32,
        Some(_) => bail!("range end must be above its start in {text:?}"),
        None => 1,
    };
    if count > address.table.max_per_request() as u32 {
        bail!("at most {} per request", address.table.max_per_request());
    }
    Ok(Read {
        table: address.table,
        start: address.offset,
        count: count as u16,
    })
}

/// Runs the probe; prints one line per value.
pub async fn modbus(
    target: &str,
    unit: u8,
    read: &str,
    decode_as: &str,
    low_word_first: bool,
    swap_bytes: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let endpoint = endpoint(target)?;
    let r = range(read)?;
    let mut ctx = modbus::connect(&endpoint, unit, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect: {e}"))?;
    let words = match modbus::read(&mut ctx, r, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        Ok(words) => words,
        Err(code) => bail!(
            "device answered with exception {code:?} (0x{:02x})",
            u8::from(code)
        ),
    };
    if matches!(r.table, Table::Coil | Table::Discrete) {
        for (i, w) in words.iter().enumerate() {
            println!(
                "{} = {}",
                Address {
                    table: r.table,
                    offset: r.start + i as u16,
                    bit: None
                },
                *w != 0
            );
        }
        return Ok(());
    }
    let order = Order {
        low_word_first,
        swap_bytes,
    };
    let format = match decode_as {
        "string" => Format::String(r.count),
        other => Format::parse(other, None).map_err(anyhow::Error::msg)?,
    };
    let width = format.width() as usize;
    let mut i = 0;
    while i + width <= words.len() {
        let address = Address {
            table: r.table,
            offset: r.start + i as u16,
            bit: None,
        };
        let raw: Vec<String> = words[i..i + width]
            .iter()
            .map(|w| format!("0x{w:04x}"))
            .collect();
        match decode(format, order, &words[i..i + width]) {
            Ok(value) => println!("{address} = {} ({})", value.text(), raw.join(" ")),
            Err(e) => println!("{address} = BAD: {e} ({})", raw.join(" ")),
        }
        i += width;
    }
    Ok(())
}

/// What `probe opcua` was asked.
pub struct OpcUaProbe {
    /// Server endpoint.
    pub endpoint: String,
    /// `POLICY:MODE`.
    pub security: String,
    /// User name.
    pub user: Option<String>,
    /// Password file.
    pub password_file: Option<std::path::PathBuf>,
    /// PKI directory.
    pub pki_dir: std::path::PathBuf,
    /// Trust an unknown server certificate.
    pub trust_server: bool,
    /// Node to browse.
    pub browse: Option<String>,
    /// Node to read.
    pub read: Option<String>,
    /// Node to watch.
    pub watch: Option<String>,
    /// How long to watch (0: until Ctrl-C).
    pub watch_for: Duration,
    /// Request timeout.
    pub timeout: Duration,
}

fn describe_value(value: &opcua_lib::types::DataValue) -> String {
    let shown = match &value.value {
        Some(v) => format!("{} ({})", variant_text(v), type_name(v)),
        None => "no value".to_owned(),
    };
    let status = value
        .status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "Good".into());
    let time = |t: &Option<opcua_lib::types::DateTime>| {
        t.as_ref()
            .map(|t| t.as_chrono().to_rfc3339())
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "{shown}  status {status}  source time {}  server time {}",
        time(&value.source_timestamp),
        time(&value.server_timestamp)
    )
}

fn variant_text(v: &opcua_lib::types::Variant) -> String {
    match v {
        opcua_lib::types::Variant::String(s) => format!("{:?}", s.as_ref()),
        other => other.to_string(),
    }
}

/// The OPC UA type name of a value (`UInt32`, `String`).
pub(crate) fn type_name(v: &opcua_lib::types::Variant) -> String {
    use opcua_lib::types::VariantTypeId;
    match v.type_id() {
        VariantTypeId::Empty => "Empty".into(),
        VariantTypeId::Scalar(t) => format!("{t:?}"),
        VariantTypeId::Array(t, _) => format!("array of {t:?}"),
    }
}

/// Changes the probe keeps while the terminal catches up; more are counted.
const WATCH_QUEUE: usize = 1024;

/// `--watch`: one subscription with one monitored item, printed as the
/// server publishes, the way the agent's source would see the node.
async fn watch(
    ua: &opcua_lib::client::Session,
    link: &mut tokio::sync::mpsc::Receiver<protocols::sources::opcua::session::LinkEvent>,
    node: &str,
    id: opcua_lib::types::NodeId,
    watch_for: Duration,
) -> anyhow::Result<()> {
    use opcua_lib::client::DataChangeCallback;
    use opcua_lib::types::{
        AttributeId, MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, ReadValueId,
        TimestampsToReturn,
    };
    use protocols::sources::opcua::session::LinkEvent;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let (tx, mut changes) = tokio::sync::mpsc::channel(WATCH_QUEUE);
    let not_shown = Arc::new(AtomicU64::new(0));
    let overflow = not_shown.clone();
    let callback = DataChangeCallback::new(move |value, _item| {
        if tx.try_send(value).is_err() {
            overflow.fetch_add(1, Ordering::Relaxed);
        }
    });
    let subscription = ua
        .create_subscription(Duration::from_millis(100), 60, 10, 0, 0, true, callback)
        .await
        .map_err(|e| anyhow::anyhow!("the server refused a subscription: {e}"))?;
    let request = MonitoredItemCreateRequest {
        item_to_monitor: ReadValueId {
            node_id: id,
            attribute_id: AttributeId::Value as u32,
            ..Default::default()
        },
        monitoring_mode: MonitoringMode::Reporting,
        requested_parameters: MonitoringParameters {
            client_handle: 1,
            sampling_interval: 0.0,
            queue_size: 100,
            discard_oldest: true,
            ..Default::default()
        },
    };
    let results = ua
        .create_monitored_items(subscription, TimestampsToReturn::Both, vec![request])
        .await
        .map_err(|e| anyhow::anyhow!("{node}: cannot be monitored: {e}"))?;
    if let Some(bad) = results
        .iter()
        .map(|r| r.result.status_code)
        .find(|s| s.is_bad())
    {
        anyhow::bail!("{node}: cannot be monitored: {bad}");
    }
    eprintln!("watching {node} (subscription {subscription}); Ctrl-C stops");
    let deadline = (!watch_for.is_zero()).then(|| tokio::time::Instant::now() + watch_for);
    let until_deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    let mut reported_overflow = 0;
    loop {
        tokio::select! {
            change = changes.recv() => {
                let Some(value) = change else { break };
                let dropped = not_shown.load(Ordering::Relaxed);
                if dropped > reported_overflow {
                    println!("({} changes not shown: the terminal fell behind)", dropped - reported_overflow);
                    reported_overflow = dropped;
                }
                println!(
                    "{} {node} = {}",
                    buffer::event::rfc3339_millis(std::time::SystemTime::now()),
                    describe_value(&value)
                );
            }
            event = link.recv() => {
                if let Some(LinkEvent::Lost(code) | LinkEvent::Ended(code)) = event {
                    anyhow::bail!("the connection to the server was lost: {code}");
                }
            }
            _ = &mut until_deadline => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let _ = ua.delete_subscription(subscription).await;
    Ok(())
}

/// `plant-edge probe opcua`: browse, read or watch, without any journal.
pub async fn opcua(request: OpcUaProbe) -> anyhow::Result<()> {
    use opcua_lib::types::{
        AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, NodeClass, NodeId,
        ReadValueId, ReferenceTypeId, TimestampsToReturn,
    };
    use protocols::sources::opcua::session::{self, Connection, UserIdentity};
    let (policy, mode) = request.security.split_once(':').ok_or_else(|| {
        anyhow::anyhow!("--security is POLICY:MODE, e.g. Basic256Sha256:SignAndEncrypt")
    })?;
    let identity = match (&request.user, &request.password_file) {
        (Some(user), Some(file)) => UserIdentity::UserName {
            user: user.clone(),
            password: std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("--password-file {}: {e}", file.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        },
        (None, None) => UserIdentity::Anonymous,
        _ => anyhow::bail!("--user and --password-file go together"),
    };
    let connection = Connection {
        endpoint: request.endpoint.clone(),
        security_policy: policy.to_owned(),
        security_mode: mode.to_owned(),
        identity,
        pki_dir: request.pki_dir.clone(),
        trust_unknown_server: request.trust_server,
        application_uri: "urn:plant-edge:probe".into(),
        timeout: request.timeout,
    };
    let parse = |text: &str| -> anyhow::Result<NodeId> {
        text.parse::<NodeId>()
            .map_err(|_| anyhow::anyhow!("{text:?} is not a node id (ns=2;s=Line1.Good, i=85)"))
    };
    let mut client = session::client(&connection).map_err(anyhow::Error::msg)?;
    let (ua, event_loop) = session::open(&mut client, &connection)
        .await
        .map_err(anyhow::Error::msg)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let driver = session::drive(event_loop, tx);
    session::connected(&ua, &mut rx, &connection)
        .await
        .map_err(anyhow::Error::msg)?;
    let read_one = |node: NodeId, attribute: AttributeId| ReadValueId {
        node_id: node,
        attribute_id: attribute as u32,
        ..Default::default()
    };
    let result = async {
        if let Some(node) = &request.browse {
            let description = BrowseDescription {
                node_id: parse(node)?,
                browse_direction: BrowseDirection::Forward,
                reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
                include_subtypes: true,
                node_class_mask: 0,
                result_mask: BrowseResultMask::All as u32,
            };
            let results = ua.browse(&[description], 1000, None).await?;
            let references = results
                .into_iter()
                .next()
                .and_then(|r| r.references)
                .unwrap_or_default();
            for reference in references {
                let id = reference.node_id.node_id.clone();
                let name = reference.browse_name.name.as_ref().to_owned();
                if reference.node_class == NodeClass::Variable {
                    let values = ua
                        .read(
                            &[read_one(id.clone(), AttributeId::Value)],
                            TimestampsToReturn::Both,
                            0.0,
                        )
                        .await?;
                    let value = values.into_iter().next().unwrap_or_default();
                    println!("{id}  {name}  Variable  {}", describe_value(&value));
                } else {
                    println!("{id}  {name}  {:?}", reference.node_class);
                }
            }
        } else if let Some(node) = &request.read {
            let values = ua
                .read(
                    &[read_one(parse(node)?, AttributeId::Value)],
                    TimestampsToReturn::Both,
                    0.0,
                )
                .await?;
            let value = values.into_iter().next().unwrap_or_default();
            println!("{node} = {}", describe_value(&value));
            if value.status.is_some_and(|s| s.is_bad()) {
                anyhow::bail!("{node}: {}", value.status.unwrap_or_default());
            }
        } else if let Some(node) = &request.watch {
            watch(&ua, &mut rx, node, parse(node)?, request.watch_for).await?;
        } else {
            anyhow::bail!("say what to do: --browse NODE, --read NODE or --watch NODE");
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = ua.disconnect().await;
    driver.abort();
    result
}
