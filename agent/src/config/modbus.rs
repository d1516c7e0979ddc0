//! `kind = "modbus"` sources: raw config, defaults and checks.

use super::*;

pub(super) fn default_modbus_timeout() -> Duration {
    Duration::from_secs(1)
}

pub(super) fn default_max_gap() -> u16 {
    8
}

pub(super) fn default_counter_window() -> Duration {
    Duration::from_secs(1)
}

pub(super) fn default_unit_id() -> u8 {
    1
}

pub(super) fn default_word_order() -> String {
    "big".into()
}

pub(super) fn default_baud() -> u32 {
    19200
}

pub(super) fn default_parity() -> String {
    "even".into()
}

pub(super) fn default_data_bits() -> u8 {
    8
}

pub(super) fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModbus {
    endpoint: String,
    #[serde(default = "default_unit_id")]
    unit: u8,
    #[serde(default = "default_interval", with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(default = "default_modbus_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_max_gap")]
    max_gap: u16,
    #[serde(default = "default_counter_window", with = "humantime_serde")]
    counter_window: Duration,
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
    pub(super) sinks: Option<Vec<String>>,
    #[serde(default)]
    pub(super) attributes: BTreeMap<String, String>,
    #[serde(default)]
    counters: Vec<RawCounter>,
    #[serde(default)]
    records: Vec<RawRecord>,
    #[serde(default)]
    rings: Vec<RawRing>,
    #[serde(default)]
    context: BTreeMap<String, RawField>,
}

/// A ring buffer of records in the PLC (see `sources/modbus/ring.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRing {
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
    write_index: String,
    read_index: String,
    first_slot: String,
    slots: u16,
    slot_size: u16,
    /// The fields at their addresses in the first slot.
    fields: BTreeMap<String, RawField>,
    #[serde(default = "default_unit_of_measure")]
    unit: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCounter {
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

pub(super) fn default_counter_format() -> String {
    "u16".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecord {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawField {
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

pub(super) fn order_of(word_order: &str, byte_swap: bool) -> Result<Order, String> {
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

pub(super) fn span(address: Address, width: u16) -> (Table, u32, u32) {
    (
        address.table,
        address.offset as u32,
        address.offset as u32 + width as u32,
    )
}

/// A register-backed field (record field or counter context).
pub(super) fn check_field(
    file: &Path,
    key: &str,
    fkey: &str,
    name: &str,
    f: &RawField,
    word_order: &str,
    byte_swap: bool,
) -> Result<FieldSpec, ConfigError> {
    let table = format!("{key}.{fkey}");
    let err = keyed(file, &table);
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

pub(super) fn check_modbus(
    file: &Path,
    key: &str,
    m: RawModbus,
) -> Result<ModbusConfig, ConfigError> {
    let err = keyed(file, key);
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
    let window_ms = m.counter_window.as_millis();
    if !m.counter_window.subsec_nanos().is_multiple_of(1_000_000)
        || window_ms > 1000
        || (window_ms > 0 && !1000u128.is_multiple_of(window_ms))
    {
        return Err(err(
            "counter_window".into(),
            format!(
                "\"0s\" (every poll stored) or a whole number of milliseconds dividing a second (100ms, 200ms, 250ms, 500ms, 1s), found {}",
                humantime::format_duration(m.counter_window)
            ),
        ));
    }
    order_of(&m.word_order, m.byte_swap).map_err(|e| err("word_order".into(), e))?;
    if m.counters.is_empty() && m.records.is_empty() && m.rings.is_empty() {
        return Err(err(
            "counters".into(),
            "at least one counter, record or ring".into(),
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
    let mut rings = Vec::new();
    for (i, r) in m.rings.into_iter().enumerate() {
        let rkey = format!("rings[{i}]");
        let register = |sub: &str, text: &str, writable: bool| -> Result<Address, ConfigError> {
            let address: Address = text.parse().map_err(|e| err(format!("{rkey}.{sub}"), e))?;
            let ok = if writable {
                address.table == Table::Holding
            } else {
                matches!(address.table, Table::Holding | Table::Input)
            };
            if !ok || address.bit.is_some() {
                let what = if writable {
                    "a holding register the agent may write (u16)"
                } else {
                    "a holding or input register (u16)"
                };
                return Err(err(format!("{rkey}.{sub}"), what.into()));
            }
            Ok(address)
        };
        let write_index = register("write_index", &r.write_index, false)?;
        let read_index = register("read_index", &r.read_index, true)?;
        let first_slot = register("first_slot", &r.first_slot, false)?;
        if r.slots == 0 || r.slots > 32_768 {
            return Err(err(
                format!("{rkey}.slots"),
                format!(
                    "1..32768 slots (the indexes are u16 counts), found {}",
                    r.slots
                ),
            ));
        }
        if r.slot_size == 0 || r.slot_size > 125 {
            return Err(err(
                format!("{rkey}.slot_size"),
                format!("1..125 registers per slot, found {}", r.slot_size),
            ));
        }
        if r.fields.is_empty() {
            return Err(err(format!("{rkey}.fields"), "at least one field".into()));
        }
        let mut fields = Vec::new();
        for (name, f) in &r.fields {
            let fkey = format!("{rkey}.fields.{name}");
            let field = check_field(file, key, &fkey, name, f, &m.word_order, m.byte_swap)?;
            let inside = field.address.table == first_slot.table
                && field.address.offset >= first_slot.offset
                && u32::from(field.address.offset) + u32::from(field.format.width())
                    <= u32::from(first_slot.offset) + u32::from(r.slot_size);
            if !inside {
                return Err(err(
                    format!("{fkey}.address"),
                    format!(
                        "an address inside the first slot ({first_slot} and the {} registers after it)",
                        r.slot_size - 1
                    ),
                ));
            }
            fields.push(field);
        }
        let (event_type, type_from) =
            record_type(r.event_type, r.type_from, |f| r.fields.contains_key(f))
                .map_err(|(sub, why)| err(format!("{rkey}.{sub}"), why))?;
        let reasons = record_reasons(r.reasons, r.fields.contains_key("reason_code"))
            .map_err(|(sub, why)| err(format!("{rkey}.{sub}"), why))?;
        let ring_span = (
            first_slot.table,
            u32::from(first_slot.offset),
            u32::from(first_slot.offset) + u32::from(r.slots) * u32::from(r.slot_size),
        );
        signals.push((
            r.signal.clone(),
            rkey,
            vec![span(write_index, 1), span(read_index, 1), ring_span],
        ));
        rings.push(protocols::sources::modbus::RingSpec {
            signal: r.signal,
            event_type,
            write_index,
            read_index,
            first_slot,
            slots: r.slots,
            slot_size: r.slot_size,
            fields,
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
        counter_window: m.counter_window,
        line: m.line,
        machine: m.machine,
        counters,
        records,
        rings,
        context,
    })
}
