//! Modbus source: production counters and handshake records from PLCs,
//! over Modbus TCP or RTU.
//!
//! # Invariants
//!
//! - A counter's new state (epoch, raw, total) is stored in the journal in
//!   the same batch as the events it produced and adopted only once that
//!   batch is durable; parts made while the agent was down are counted on
//!   the first poll after start, once.
//! - A handshake record is acknowledged to the PLC (ack coil or register
//!   written) only after the journal answered that its event is durable.
//!   If the journal cannot take it (full), no ack: the PLC holds the record.
//! - A handshake exchange is a record's identity ([`HandshakePosition`]):
//!   the record is stored together with the position naming it as
//!   pending; the same record shown again before its ack was seen is
//!   acknowledged without a second event; once the PLC released it (ready
//!   dropped, stored durably before the ack is cleared, or the ack dropped
//!   after this process wrote it) the next ready record is a new fact with
//!   a new id, even if its fields repeat an earlier record's (a PLC
//!   restart starts its sequences again).
//! - A record field that does not decode, or a quantity that is not a
//!   non-negative number, leaves the record unacknowledged, logged and
//!   counted: the PLC keeps it, nothing is posted with a guessed value.
//! - Records are taken at the PLC's pace, not one per poll: after each
//!   step of an exchange the handshake is looked at again at once (every
//!   1 ms while it is the PLC's turn), for up to 80 % of the poll interval,
//!   so a PLC's record queue drains between two counter polls. Both the
//!   4-phase handshake (PLC clears ready, agent clears ack) and the one
//!   where the PLC clears ready and ack itself work.
//! - Sources naming one endpoint share its connection through one device
//!   task ([`Device`]): a source holds the connection only for the length
//!   of its own requests, never while its events wait for the journal, so
//!   one source's commit never delays another source's poll. Ticks are
//!   aligned ([`crate::schedule::Ticks`]) and counted when late or skipped.
//! - A transport error means "reconnect" (capped exponential backoff with
//!   jitter); a Modbus exception means "the device said no": the values are
//!   bad, counted, no event, the connection stays. Every request runs
//!   under a timeout.

mod device;
mod handshake;
mod held;
pub mod map;
mod ring;

pub use device::{Device, DeviceCounters};
pub use ring::RingSpec;

use handshake::drain_records;
use held::{Held, HeldReading};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use buffer::event::{Origin, Quantity};
use buffer::{CloudEvent, EventType};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::{ExceptionCode, Slave};

use crate::counter::{CounterRules, CounterState, CounterWidth, Step};
use crate::period::OpenPeriods;
use crate::runtime::{Closed, Positioned};
use crate::source::{
    record_fingerprint, record_quantity, CounterSignal, HandshakePosition, Presented, RecordSignal,
    SourceContext,
};
use map::{decode, Address, Format, Order, Read, Table, Value};

/// Where the device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://host:port`.
    Tcp(String),
    /// `rtu:///dev/ttyUSB0` with serial settings.
    Rtu(SerialSettings),
}

impl std::fmt::Display for Endpoint {
    /// As configured: `tcp://host:port` or `rtu:///dev/ttyUSB0`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
            Endpoint::Rtu(serial) => write!(f, "rtu://{}", serial.path),
        }
    }
}

/// Serial line settings for Modbus RTU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialSettings {
    /// Device path.
    pub path: String,
    /// Baud rate.
    pub baud: u32,
    /// `none`, `even`, `odd`.
    pub parity: String,
    /// 7 or 8.
    pub data_bits: u8,
    /// 1 or 2.
    pub stop_bits: u8,
}

/// A production counter in the PLC.
#[derive(Clone, Debug)]
pub struct CounterSpec {
    /// Signal name (part of the id, key of its state).
    pub signal: String,
    /// Event type of its increases.
    pub event_type: EventType,
    /// Where it is.
    pub address: Address,
    /// u16/i16/u32/i32, or f32 for a measured amount (kg) that only grows.
    pub format: Format,
    /// Word and byte order.
    pub order: Order,
    /// Most parts plausible between two polls (wrap window).
    pub max_step: u64,
    /// Unit of measure.
    pub unit: String,
    /// Quantity = increase × scale (1.0: whole pieces).
    pub scale: f64,
    /// Line, machine and attributes when not the source's.
    pub place: crate::source::Placement,
}

/// A field of a handshake record.
#[derive(Clone, Debug)]
pub struct FieldSpec {
    /// `work_order`, `material`, `quantity`, `lot`, `reason_code`, `sequence`, or any
    /// other name (stamped into the event's attributes).
    pub name: String,
    /// Where it is.
    pub address: Address,
    /// How it is encoded.
    pub format: Format,
    /// Word and byte order.
    pub order: Order,
    /// The field is the record's time (epoch seconds or milliseconds).
    pub epoch: Option<crate::source::Epoch>,
}

/// A handshake record: the PLC fills the fields and sets `ready`; the agent
/// appends, waits for durable, writes `ack`; the PLC clears `ready`; the
/// agent clears `ack`.
#[derive(Clone, Debug)]
pub struct RecordSpec {
    /// Signal name (part of the id).
    pub signal: String,
    /// Event type.
    pub event_type: EventType,
    /// Data-ready flag (coil, discrete input or register bit).
    pub ready: Address,
    /// Ack: a coil (set true) or a holding register (set 1).
    pub ack: Address,
    /// The record's fields.
    pub fields: Vec<FieldSpec>,
    /// Field names whose values identify the record (its id).
    pub key: Vec<String>,
    /// Unit of measure of `quantity`.
    pub unit: String,
    /// Event type from a field's code (overrides `event_type`).
    pub type_from: Option<crate::source::TypeFromField>,
    /// Line, machine and attributes when not the source's.
    pub place: crate::source::Placement,
}

/// One Modbus device.
#[derive(Clone, Debug)]
pub struct ModbusConfig {
    /// Where.
    pub endpoint: Endpoint,
    /// Unit (slave) id.
    pub unit: u8,
    /// Poll interval.
    pub poll_interval: Duration,
    /// Timeout of each request (and of connecting).
    pub timeout: Duration,
    /// Registers that may be read in between to merge requests.
    pub max_gap: u16,
    /// Line.
    pub line: String,
    /// Machine.
    pub machine: String,
    /// Counters.
    pub counters: Vec<CounterSpec>,
    /// Handshake records.
    pub records: Vec<RecordSpec>,
    /// Ring buffers of records.
    pub rings: Vec<RingSpec>,
    /// Registers read in the same poll as the counters and stamped into
    /// their events: `work_order`, `material`, `lot`.
    pub context: Vec<FieldSpec>,
    /// Counter polls within one window (aligned to the clock, dividing a
    /// second) are stored as one event per counter at its end; zero
    /// stores every poll. Records are never held.
    pub counter_window: Duration,
}

/// What a Modbus source counts (shared with status output).
#[derive(Debug, Default)]
pub struct ModbusStats {
    /// The last poll reached the device.
    pub connected: std::sync::atomic::AtomicBool,
    /// Polls done.
    pub polls: AtomicU64,
    /// Configured vs achieved poll interval; late and skipped ticks
    /// (overruns).
    pub schedule: crate::schedule::PollSchedule,
    /// Exception responses (device said no).
    pub exceptions: AtomicU64,
    /// Transport errors and timeouts (reconnect).
    pub transport_errors: AtomicU64,
    /// Values that did not decode.
    pub bad_values: AtomicU64,
    /// Events appended.
    pub events: AtomicU64,
    /// Records acknowledged to the PLC.
    pub records_acked: AtomicU64,
    /// Records kept as dead letters (a type code the map does not know).
    pub records_refused: AtomicU64,
    /// Records taken from ring buffers.
    pub ring_records: AtomicU64,
    /// Records a PLC overwrote in a lapped ring before they were read.
    pub records_overwritten: AtomicU64,
    /// Rings whose indexes matched no stored position (new namespace).
    pub ring_restarts: AtomicU64,
}

impl crate::source::SourceCounters for ModbusStats {
    fn family(&self) -> (&'static str, &'static str) {
        (
            "modbus_source",
            "Modbus source counters by kind since start",
        )
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let overruns = self.schedule.overruns();
        [
            ("polls", &self.polls),
            ("exceptions", &self.exceptions),
            ("transport_errors", &self.transport_errors),
            ("bad_values", &self.bad_values),
            ("events", &self.events),
            ("records_acked", &self.records_acked),
            ("records_refused", &self.records_refused),
            ("ring_records", &self.ring_records),
            ("records_overwritten", &self.records_overwritten),
            ("ring_restarts", &self.ring_restarts),
        ]
        .into_iter()
        .map(|(kind, value)| (kind, value.load(Ordering::Relaxed)))
        .chain([("overruns", overruns)])
        .collect()
    }
    fn connected(&self) -> Option<bool> {
        Some(self.connected.load(Ordering::Relaxed))
    }
    fn schedule(&self) -> Option<crate::schedule::ScheduleSnapshot> {
        Some(self.schedule.snapshot())
    }
}

/// The source's stored position: counter states and handshake positions,
/// by signal. Stored with every append of this source.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Position {
    #[serde(default)]
    counters: BTreeMap<String, CounterState>,
    #[serde(default)]
    records: BTreeMap<String, HandshakePosition>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    rings: BTreeMap<String, crate::ring::RingPosition>,
    /// Open reconciliation periods by line (when checkpoints are on).
    #[serde(default, skip_serializing_if = "OpenPeriods::is_empty")]
    periods: OpenPeriods,
}

impl crate::runtime::Position for Position {
    /// Today's form, or the counter-only map stored before handshake
    /// positions existed.
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice::<Position>(bytes).or_else(|current| {
            serde_json::from_slice::<BTreeMap<String, CounterState>>(bytes)
                .map(|counters| Position {
                    counters,
                    ..Position::default()
                })
                .map_err(|_| current.to_string())
        })
    }

    fn encode(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self).ok()
    }
}

/// A connection to one device (as [`connect`] returns it).
pub type Link = Context;

/// Why a poll stopped.
#[derive(Debug)]
enum PollError {
    /// Connection is unusable: reconnect.
    Transport(String),
    /// The journal is gone (shutdown).
    Stopped,
}

/// Opens the connection (TCP or serial) to one unit.
pub async fn connect(endpoint: &Endpoint, unit: u8, timeout: Duration) -> Result<Context, String> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            let connect = async {
                let stream = tokio::net::TcpStream::connect(addr.as_str()).await?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(tokio_modbus::client::tcp::attach_slave(
                    stream,
                    Slave(unit),
                ))
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(ctx)) => Ok(ctx),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    Err(format!("connection refused by {addr}"))
                }
                Ok(Err(e)) => Err(format!("connecting to {addr}: {e}")),
                Err(_) => Err(format!("no answer from {addr} within {timeout:?}")),
            }
        }
        Endpoint::Rtu(s) => {
            use tokio_serial::SerialPortBuilderExt;
            let parity = match s.parity.as_str() {
                "even" | "E" => tokio_serial::Parity::Even,
                "odd" | "O" => tokio_serial::Parity::Odd,
                _ => tokio_serial::Parity::None,
            };
            let port = tokio_serial::new(&s.path, s.baud)
                .parity(parity)
                .data_bits(if s.data_bits == 7 {
                    tokio_serial::DataBits::Seven
                } else {
                    tokio_serial::DataBits::Eight
                })
                .stop_bits(if s.stop_bits == 2 {
                    tokio_serial::StopBits::Two
                } else {
                    tokio_serial::StopBits::One
                })
                .timeout(timeout)
                .open_native_async()
                .map_err(|e| format!("opening {}: {e}", s.path))?;
            Ok(tokio_modbus::client::rtu::attach_slave(port, Slave(unit)))
        }
    }
}

/// Reads one group; bits come back as 0/1 words. Outer error: transport;
/// inner: the device's exception.
pub async fn read(
    ctx: &mut Context,
    r: Read,
    timeout: Duration,
) -> Result<Result<Vec<u16>, ExceptionCode>, String> {
    let bits = |v: Vec<bool>| v.into_iter().map(u16::from).collect::<Vec<u16>>();
    let call = async {
        Ok::<_, tokio_modbus::Error>(match r.table {
            Table::Holding => ctx.read_holding_registers(r.start, r.count).await?,
            Table::Input => ctx.read_input_registers(r.start, r.count).await?,
            Table::Coil => ctx.read_coils(r.start, r.count).await?.map(bits),
            Table::Discrete => ctx.read_discrete_inputs(r.start, r.count).await?.map(bits),
        })
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(e)) => Err(format!(
            "reading {} {}+{}: {e}",
            table_name(r.table),
            r.start,
            r.count
        )),
        Err(_) => Err(format!(
            "no answer within {timeout:?} reading {} {}",
            table_name(r.table),
            r.start
        )),
    }
}

fn table_name(table: Table) -> &'static str {
    match table {
        Table::Coil => "coils",
        Table::Discrete => "discrete inputs",
        Table::Input => "input registers",
        Table::Holding => "holding registers",
    }
}

/// Values read in one poll, by address; `None` for addresses whose request
/// the device answered with an exception.
struct Snapshot {
    words: BTreeMap<(Table, u16), Option<u16>>,
}

impl Snapshot {
    fn value(
        &self,
        address: Address,
        format: Format,
        order: Order,
    ) -> Result<Option<Value>, String> {
        let mut words = Vec::with_capacity(format.width() as usize);
        for i in 0..format.width() {
            match self.words.get(&(address.table, address.offset + i)) {
                Some(Some(w)) => words.push(*w),
                Some(None) => return Ok(None),
                None => return Err(format!("{address} was not read")),
            }
        }
        if let Some(bit) = address.bit {
            return Ok(Some(Value::Bool(words[0] & (1 << bit) != 0)));
        }
        if address.table == Table::Coil || address.table == Table::Discrete {
            return Ok(Some(Value::Bool(words[0] != 0)));
        }
        decode(format, order, &words).map(Some)
    }
}

async fn read_spans(
    device: &Device,
    spans: &[(Address, u16)],
    config: &ModbusConfig,
    stats: &ModbusStats,
    at_tick: bool,
) -> Result<Snapshot, PollError> {
    let mut snapshot = Snapshot {
        words: BTreeMap::new(),
    };
    let reads = device
        .read_spans(
            config.unit,
            spans.to_vec(),
            config.max_gap,
            config.timeout,
            at_tick,
        )
        .await
        .map_err(|e| {
            stats.transport_errors.fetch_add(1, Ordering::Relaxed);
            PollError::Transport(e)
        })?;
    for (r, result) in reads {
        match result {
            Ok(words) => {
                for (i, w) in words.into_iter().take(r.count as usize).enumerate() {
                    snapshot
                        .words
                        .insert((r.table, r.start + i as u16), Some(w));
                }
            }
            Err(code) => {
                stats.exceptions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %config.endpoint, unit = config.unit, table = table_name(r.table), start = r.start, count = r.count, exception = ?code, "device refused the read: values marked bad");
                for i in 0..r.count {
                    snapshot.words.insert((r.table, r.start + i), None);
                }
            }
        }
    }
    Ok(snapshot)
}

/// The Modbus source task: polls until shutdown. Every source naming the
/// same endpoint shares one connection ([`Device`]); the source holds it
/// only for its requests, never while its events wait for the journal.
pub async fn run(ctx: SourceContext, config: ModbusConfig, stats: Arc<ModbusStats>) {
    let mut position = Positioned::<Position>::load(&ctx);
    ctx.read
        .periods_stored(&ctx.name, &position.get().periods, &[]);
    let mut shutdown = ctx.shutdown.clone();
    let device = Device::for_endpoint(&config.endpoint);
    let registration = device.register(config.poll_interval, !config.counters.is_empty());
    // First wait 500 ms (as the 250 ms × 2 of the first failure was).
    let mut backoff =
        crate::pace::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut retry_at = tokio::time::Instant::now();
    let mut bridged = false;
    // The first poll of this process: what was made while it was down may
    // span a period boundary.
    let mut resumed = true;
    // Record signals whose pending record this process acknowledged.
    let mut acked: BTreeMap<String, bool> = BTreeMap::new();
    // Counter events of the current counter window, not yet stored.
    let mut held: Option<Held> = None;
    let mut ticks = crate::schedule::Ticks::aligned(config.poll_interval, &stats.schedule);
    loop {
        tokio::select! {
            _ = ticks.tick(&stats.schedule) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            // What the counter window holds is stored on the way out (not
            // needed for counting: the PLC still has it).
            let _ = store_held(&ctx, &config, &stats, &mut position, &mut held).await;
            return;
        }
        if tokio::time::Instant::now() < retry_at {
            ticks.interrupted();
            continue;
        }
        let result = poll(
            &device,
            &ctx,
            &config,
            &stats,
            &mut position,
            &mut acked,
            &mut held,
            Continuity { bridged, resumed },
        )
        .await;
        stats.polls.fetch_add(1, Ordering::Relaxed);
        registration.polled();
        match result {
            Ok(()) => {
                backoff.reset();
                bridged = false;
                resumed = false;
                stats.connected.store(true, Ordering::Relaxed);
            }
            Err(PollError::Stopped) => return,
            Err(PollError::Transport(e)) => {
                stats.connected.store(false, Ordering::Relaxed);
                // The device task logs the outage once for all its sources.
                tracing::debug!(source = %ctx.name, error = %e, "poll failed; retrying after a backoff");
                retry_at = tokio::time::Instant::now() + backoff.next_wait();
                bridged = true;
                ticks.interrupted();
            }
        }
    }
}

fn counter_signal(spec: &CounterSpec, config: &ModbusConfig) -> CounterSignal {
    CounterSignal {
        name: spec.signal.clone(),
        event_type: spec.event_type.clone(),
        unit: spec.unit.clone(),
        line: spec.place.line_or(&config.line),
        machine: spec.place.machine_or(&config.machine),
        attributes: spec.place.attributes.clone(),
        rules: CounterRules {
            width: match spec.format.width() {
                1 => CounterWidth::U16,
                2 => CounterWidth::U32,
                _ => CounterWidth::U64,
            },
            max_step: spec.max_step,
        },
    }
}

/// What lies between this poll and the last stored one.
#[derive(Clone, Copy, Debug)]
struct Continuity {
    /// The link was down since the last poll.
    bridged: bool,
    /// The first poll of this process.
    resumed: bool,
}

// One poll touches each of these; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn poll(
    device: &Device,
    ctx: &SourceContext,
    config: &ModbusConfig,
    stats: &ModbusStats,
    position: &mut Positioned<Position>,
    acked: &mut BTreeMap<String, bool>,
    held: &mut Option<Held>,
    Continuity { bridged, resumed }: Continuity,
) -> Result<(), PollError> {
    let poll_started = tokio::time::Instant::now();
    if config.counters.is_empty() {
        close_periods(ctx, config, position, bridged || resumed, SystemTime::now()).await?;
    } else {
        let spans: Vec<(Address, u16)> = config
            .counters
            .iter()
            .map(|c| (c.address, c.format.width()))
            .chain(config.context.iter().map(|f| (f.address, f.format.width())))
            .collect();
        let snapshot = read_spans(device, &spans, config, stats, true).await?;
        let context: BTreeMap<&str, String> = config
            .context
            .iter()
            .filter_map(|f| match snapshot.value(f.address, f.format, f.order) {
                Ok(Some(v)) => Some((f.name.as_str(), v.text())).filter(|(_, t)| !t.is_empty()),
                _ => None,
            })
            .collect();
        let read_at = SystemTime::now();
        let window = (!config.counter_window.is_zero())
            .then(|| held::window_of(config.counter_window, read_at));
        // A window that ended is stored before its period may close.
        if held.as_ref().is_some_and(|h| Some(h.window) != window) {
            store_held(ctx, config, stats, position, held).await?;
        }
        // Closed at the reading's time: a reading is in the period its
        // time says, its events with it.
        close_periods(ctx, config, position, bridged || resumed, read_at).await?;
        let states = held
            .as_ref()
            .map_or(&position.get().counters, |h| &h.counters)
            .clone();
        let mut next_states = states.clone();
        let mut readings = Vec::new();
        let mut events: Vec<(String, CloudEvent)> = Vec::new();
        let mut measured = false;
        for spec in &config.counters {
            if matches!(spec.format, Format::F32 | Format::F64) {
                match snapshot.value(spec.address, spec.format, spec.order) {
                    Ok(Some(Value::Float(v))) if v >= 0.0 => {
                        let (_, delta, next) =
                            crate::counter::observe_measure(states.get(&spec.signal).copied(), v);
                        next_states.insert(spec.signal.clone(), next);
                        if delta > 0.0 {
                            let mut event = counter_signal(spec, config).measure_event_for(
                                ctx,
                                delta * spec.scale,
                                v,
                                next,
                                Origin {
                                    protocol: "modbus".into(),
                                    endpoint: config.endpoint.to_string(),
                                    address: format!("unit {} {}", config.unit, spec.address),
                                    quality: "good".into(),
                                    source_time: None,
                                },
                                read_at,
                            );
                            if bridged {
                                event
                                    .data
                                    .attributes
                                    .insert("bridged_outage".into(), "true".into());
                            }
                            stamp_context(&mut event, &context);
                            // A measured counter's id is its reading: its
                            // events are stored poll by poll.
                            measured = true;
                            events.push((spec.signal.clone(), event));
                        }
                    }
                    Ok(None) => {}
                    other => {
                        stats.bad_values.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(source = %ctx.name, signal = %spec.signal, value = ?other, "measured counter value unusable");
                    }
                }
                continue;
            }
            let raw = match snapshot.value(spec.address, spec.format, spec.order) {
                Ok(Some(value)) => map::counter_raw(&value, spec.format),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(source = %ctx.name, signal = %spec.signal, error = %e, "counter value unusable");
                    None
                }
            };
            let Some(raw) = raw else {
                stats.bad_values.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let signal = counter_signal(spec, config);
            let previous = states.get(&spec.signal).copied();
            let observation = signal.rules.observe(previous, raw);
            next_states.insert(spec.signal.clone(), observation.next);
            if ctx.periods.is_some() && observation.step != Step::Unchanged {
                readings.push(HeldReading {
                    line: signal.line.clone(),
                    signal: spec.signal.clone(),
                    previous,
                    next: observation.next,
                    delta: observation.delta,
                    reset: observation.step == Step::Reset,
                    across_gap: bridged || resumed,
                    at: read_at,
                });
            }
            let origin = Origin {
                protocol: "modbus".into(),
                endpoint: config.endpoint.to_string(),
                address: format!("unit {} {}", config.unit, spec.address),
                quality: "good".into(),
                source_time: None,
            };
            if let Some(mut event) = signal.event_for(ctx, &observation, origin, read_at) {
                if spec.scale != 1.0 {
                    event.data.quantity = Quantity::Measure(observation.delta as f64 * spec.scale);
                }
                if bridged {
                    // The increase spans a link outage: one event carries
                    // everything made while the PLC was unreachable.
                    event
                        .data
                        .attributes
                        .insert("bridged_outage".into(), "true".into());
                }
                stamp_context(&mut event, &context);
                events.push((spec.signal.clone(), event));
            }
        }
        if next_states != states || !readings.is_empty() {
            let context: BTreeMap<String, String> = context
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            // After an outage or a restart, and for measured counters, the
            // poll is stored as it is, after what is held.
            let hold_in = window.filter(|_| !bridged && !resumed && !measured);
            if !held
                .as_ref()
                .is_some_and(|h| hold_in.is_some_and(|w| h.accepts(w, &context, &events)))
            {
                store_held(ctx, config, stats, position, held).await?;
            }
            let poll = held.get_or_insert_with(|| Held::new(hold_in.unwrap_or(0), context));
            poll.counters = next_states;
            poll.readings.extend(readings);
            for (signal, event) in events {
                poll.add(signal, event, read_at);
            }
            if hold_in.is_none() {
                store_held(ctx, config, stats, position, held).await?;
            }
        }
    }
    drain_records(device, ctx, config, stats, position, acked, poll_started).await?;
    ring::drain_rings(device, ctx, config, stats, position, poll_started).await
}

/// Stores what is held (one event per counter for the polls it covers)
/// with the position it brings the counters to; the records' and rings'
/// parts of the position are the stored ones. Not stored (the journal is
/// full): dropped, and the next poll counts again from the stored position.
async fn store_held(
    ctx: &SourceContext,
    config: &ModbusConfig,
    stats: &ModbusStats,
    position: &mut Positioned<Position>,
    held: &mut Option<Held>,
) -> Result<(), PollError> {
    let Some(held) = held.take() else {
        return Ok(());
    };
    let mut periods = position.get().periods.clone();
    let mut events = Vec::with_capacity(held.events.len());
    if let Some(rule) = ctx.periods.as_deref().map(|c| &c.rule) {
        for r in &held.readings {
            periods.line(rule, &r.line, r.at).add_reading(
                &r.signal,
                r.previous,
                r.next,
                r.delta,
                r.reset,
                r.across_gap,
                r.at,
            );
        }
    }
    for (_, event, at) in &held.events {
        let mut stored = ctx.new_event(event);
        if let Some(rule) = ctx.periods.as_deref().map(|c| &c.rule) {
            let tally = periods.line(rule, &event.data.line, *at);
            tally.add_event(event);
            if let Some(entry) = &mut stored.ledger {
                entry.at_ms = tally.period_ms(*at);
            }
        }
        events.push(stored);
    }
    let count = events.len() as u64;
    let next = Position {
        counters: held.counters,
        records: position.get().records.clone(),
        rings: position.get().rings.clone(),
        periods,
    };
    const THEN: &str = "counting again next poll";
    // Handshakes are looked at right after the counters: with records to
    // drain, the poll does not wait out the commit window.
    let stored = if config.records.is_empty() {
        position.store_batched(ctx, events, next, THEN).await
    } else {
        position.store(ctx, events, next, THEN).await
    }
    .map_err(|Closed| PollError::Stopped)?;
    if stored.is_some() {
        stats.events.fetch_add(count, Ordering::Relaxed);
        ctx.read
            .periods_stored(&ctx.name, &position.get().periods, &[]);
    }
    Ok(())
}

/// Closes the periods that ended with one checkpoint event per line,
/// stored with the position that opens the next ones. Not stored now (the
/// journal is full): the same checkpoint, same id, next poll.
async fn close_periods(
    ctx: &SourceContext,
    config: &ModbusConfig,
    position: &mut Positioned<Position>,
    resumed: bool,
    at: SystemTime,
) -> Result<(), PollError> {
    let Some(checkpointing) = ctx.periods.as_deref() else {
        return Ok(());
    };
    let rule = &checkpointing.rule;
    let mut next = position.get().clone();
    let closed = next.periods.close_ended(rule, at, resumed);
    if closed.is_empty() {
        return Ok(());
    }
    let events = closed
        .iter()
        .map(|(line, tally)| {
            let origin = Origin {
                protocol: "modbus".into(),
                endpoint: config.endpoint.to_string(),
                address: format!("unit {} checkpoint", config.unit),
                quality: "good".into(),
                source_time: None,
            };
            let event = crate::period::checkpoint_event(ctx, line, &config.machine, origin, tally);
            let mut stored = ctx.new_event(&event);
            stored.routes = checkpointing.routes;
            // In the ledger a checkpoint belongs to the period it closes.
            if let Some(entry) = &mut stored.ledger {
                entry.at_ms = tally.start_ms;
            }
            stored
        })
        .collect();
    let stored = position
        .store(
            ctx,
            events,
            next,
            "checkpoint not stored; closed again next poll",
        )
        .await
        .map_err(|Closed| PollError::Stopped)?;
    if stored.is_some() {
        ctx.read
            .periods_stored(&ctx.name, &position.get().periods, &closed);
    }
    Ok(())
}

/// Work order, material and lot read in the same poll as the counter.
fn stamp_context(event: &mut CloudEvent, context: &BTreeMap<&str, String>) {
    if let Some(order) = context.get("work_order") {
        event.data.work_order = Some(order.clone());
        event.subject = Some(format!("{}/{}", event.data.line, order));
    }
    if let Some(material) = context.get("material") {
        event.data.material = Some(material.clone());
    }
    if let Some(lot) = context.get("lot") {
        event.data.lot = Some(lot.clone());
    }
}
