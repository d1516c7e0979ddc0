//! Handshake records: taken as fast as the PLC presents them, stored
//! with the handshake's position, acknowledged only once durable,
//! released when the PLC lets go.

use super::*;

/// Pause between looks at a handshake while the PLC has its turn.
const HANDSHAKE_RECHECK: Duration = Duration::from_millis(1);
/// How long to keep looking for the next record after an exchange ended
/// (a PLC with a queue presents it within a scan or two).
const HANDSHAKE_FOLLOW_UP: Duration = Duration::from_millis(30);

/// Takes records as fast as the PLC presents them: after each step of an
/// exchange the handshake is looked at again at once (or after a short
/// pause while it is the PLC's turn), not at the next poll, until nothing
/// has moved for [`HANDSHAKE_FOLLOW_UP`] or most of the poll interval is
/// used (counters keep their rhythm).
pub(super) async fn drain_records(
    device: &Device,
    ctx: &SourceContext,
    config: &ModbusConfig,
    stats: &ModbusStats,
    position: &mut Positioned<Position>,
    acked: &mut BTreeMap<String, bool>,
    poll_started: tokio::time::Instant,
) -> Result<(), PollError> {
    if config.records.is_empty() {
        return Ok(());
    }
    let deadline = poll_started + config.poll_interval.mul_f64(0.8);
    let mut last_moved: Option<tokio::time::Instant> = None;
    loop {
        let (mut moved, mut waiting) = (false, false);
        for record in &config.records {
            match handle_record(device, ctx, config, stats, record, position, acked).await? {
                Exchange::Moved => moved = true,
                Exchange::Waiting => waiting = true,
                Exchange::Idle => {}
            }
        }
        let now = tokio::time::Instant::now();
        if moved {
            last_moved = Some(now);
        }
        let following_up = last_moved.is_some_and(|t| now.duration_since(t) < HANDSHAKE_FOLLOW_UP);
        if now >= deadline || !(moved || waiting || following_up) {
            return Ok(());
        }
        if !moved {
            tokio::time::sleep(HANDSHAKE_RECHECK).await;
        }
    }
}

/// What one look at a handshake found.
#[derive(Debug, PartialEq, Eq)]
enum Exchange {
    /// Nothing to do (no record, or one that cannot be taken now).
    Idle,
    /// The PLC's turn (it has to clear ready after our ack).
    Waiting,
    /// This look moved the exchange on (stored, acknowledged, released).
    Moved,
}

async fn handle_record(
    device: &Device,
    ctx: &SourceContext,
    config: &ModbusConfig,
    stats: &ModbusStats,
    record: &RecordSpec,
    position: &mut Positioned<Position>,
    acked: &mut BTreeMap<String, bool>,
) -> Result<Exchange, PollError> {
    let flags = read_spans(
        device,
        &[(record.ready, 1), (record.ack, 1)],
        config,
        stats,
        false,
    )
    .await?;
    let flag = |a: Address| {
        flags
            .value(a, Format::Bool, Order::default())
            .ok()
            .flatten()
            .map(|v| v == Value::Bool(true))
    };
    let (Some(ready), Some(ack_set)) = (flag(record.ready), flag(record.ack)) else {
        return Ok(Exchange::Idle);
    };
    position.complete(|p| {
        p.records.entry(record.signal.clone()).or_default();
    });
    let handshake = position.get().records[&record.signal].clone();
    if !ready {
        let mut moved = false;
        if let Some(released) = handshake.released() {
            // The PLC released the stored record. Stored before the ack is
            // cleared (after which the PLC may present the next record), so
            // that after any crash an equal next record is still new.
            let mut next = position.get().clone();
            next.records.insert(record.signal.clone(), released);
            let stored = position
                .store(ctx, Vec::new(), next, "release stored again next poll")
                .await
                .map_err(|Closed| PollError::Stopped)?;
            if stored.is_none() {
                return Ok(Exchange::Idle);
            }
            moved = true;
        }
        acked.insert(record.signal.clone(), false);
        if ack_set {
            // The PLC took the ack and cleared ready: release the ack.
            match device
                .write_flag(config.unit, record.ack, false, config.timeout)
                .await
            {
                Ok(Ok(())) => moved = true,
                Ok(Err(code)) => {
                    stats.exceptions.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = %ctx.name, signal = %record.signal, exception = ?code, "device refused clearing the ack");
                }
                Err(e) => return Err(PollError::Transport(e)),
            }
        }
        return Ok(if moved {
            Exchange::Moved
        } else {
            Exchange::Idle
        });
    }
    if ack_set {
        // Acknowledged (by this process or before a restart); waiting for
        // the PLC to clear ready.
        acked.insert(record.signal.clone(), true);
        return Ok(Exchange::Waiting);
    }
    let spans: Vec<(Address, u16)> = record
        .fields
        .iter()
        .map(|f| (f.address, f.format.width()))
        .collect();
    let snapshot = read_spans(device, &spans, config, stats, false).await?;
    let mut values = BTreeMap::new();
    for field in &record.fields {
        match snapshot.value(field.address, field.format, field.order) {
            Ok(Some(v)) => {
                values.insert(field.name.clone(), v);
            }
            Ok(None) => return Ok(Exchange::Idle),
            Err(e) => {
                // Not acknowledged: the PLC keeps the record and the line's
                // alarm shows it; nothing is lost, nothing invented.
                stats.bad_values.fetch_add(1, Ordering::Relaxed);
                tracing::error!(source = %ctx.name, signal = %record.signal, field = %field.name, error = %e, "record field unusable; record not acknowledged");
                return Ok(Exchange::Idle);
            }
        }
    }
    if let Err(e) = record_quantity(&values) {
        stats.bad_values.fetch_add(1, Ordering::Relaxed);
        tracing::error!(source = %ctx.name, signal = %record.signal, field = "quantity", error = %e, "record quantity unusable; record not acknowledged");
        return Ok(Exchange::Idle);
    }
    let acknowledged = acked.get(&record.signal).copied().unwrap_or(false);
    let presented = handshake.presented(
        &ctx.urn(),
        &record.signal,
        record_fingerprint(&values),
        acknowledged,
    );
    if let Presented::New { id, next } = presented {
        let event = record_event(ctx, config, record, id, &values);
        let mut next_position = position.get().clone();
        next_position.records.insert(record.signal.clone(), next);
        // The period is reckoned by when the gateway took the record, as
        // the checkpoint's tally is, not by the PLC's clock.
        let now = std::time::SystemTime::now();
        let mut stored_event = ctx.new_event(&event);
        const THEN: &str = "record not acknowledged; taken again next poll";
        // A type code the map does not know: kept as a dead letter (durable,
        // with the position, so the record may be acknowledged), never
        // posted with a guessed type.
        let refused = record_signal(config, record).event_type_for(&values).err();
        if let (Some(rule), None) = (ctx.periods.as_deref().map(|c| &c.rule), &refused) {
            let tally = next_position.periods.line(rule, &event.data.line, now);
            let quantity = match event.data.quantity {
                buffer::Quantity::Count(n) => n as f64,
                buffer::Quantity::Measure(x) => x,
            };
            tally.add_record(&record.signal, quantity, event.sequence.clone(), now);
            tally.add_event(&event);
            if let Some(entry) = &mut stored_event.ledger {
                entry.at_ms = tally.period_ms(now);
            }
        }
        let events = vec![stored_event];
        let stored = match &refused {
            None => position
                .store(ctx, events, next_position, THEN)
                .await
                .map(|o| o.map(|o| o.appended())),
            Some(reason) => {
                tracing::error!(source = %ctx.name, signal = %record.signal, reason = %reason, "record kept as a dead letter, not posted");
                let reason = format!("record refused: {reason}");
                position
                    .store_dead_letter(ctx, events, next_position, &reason, THEN)
                    .await
            }
        };
        let Some(appended) = stored.map_err(|Closed| PollError::Stopped)? else {
            return Ok(Exchange::Idle);
        };
        acked.insert(record.signal.clone(), false);
        ctx.read
            .periods_stored(&ctx.name, &position.get().periods, &[]);
        if refused.is_some() {
            stats.records_refused.fetch_add(1, Ordering::Relaxed);
        } else if appended > 0 {
            stats.events.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Durable (now, or before a restart): only now tell the PLC.
    match device
        .write_flag(config.unit, record.ack, true, config.timeout)
        .await
    {
        Ok(Ok(())) => {
            stats.records_acked.fetch_add(1, Ordering::Relaxed);
            acked.insert(record.signal.clone(), true);
            Ok(Exchange::Moved)
        }
        Ok(Err(code)) => {
            stats.exceptions.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(source = %ctx.name, signal = %record.signal, exception = ?code, "device refused the ack");
            Ok(Exchange::Idle)
        }
        Err(e) => Err(PollError::Transport(e)),
    }
}

fn record_signal(config: &ModbusConfig, record: &RecordSpec) -> RecordSignal {
    RecordSignal {
        name: record.signal.clone(),
        event_type: record.event_type.clone(),
        unit: record.unit.clone(),
        line: record.place.line_or(&config.line),
        machine: record.place.machine_or(&config.machine),
        attributes: record.place.attributes.clone(),
        reasons: record.place.reasons.clone(),
        key: record.key.clone(),
        type_from: record.type_from.clone(),
    }
}

fn record_event(
    ctx: &SourceContext,
    config: &ModbusConfig,
    record: &RecordSpec,
    id: uuid::Uuid,
    values: &BTreeMap<String, Value>,
) -> CloudEvent {
    record_event_of(
        ctx,
        config,
        &record_signal(config, record),
        &record.fields,
        format!("unit {} record {}", config.unit, record.signal),
        id,
        values,
    )
}

/// The event for a record read from the PLC (a handshake's or a ring
/// buffer slot's), `address` naming where it was read.
pub(super) fn record_event_of(
    ctx: &SourceContext,
    config: &ModbusConfig,
    signal: &RecordSignal,
    fields: &[FieldSpec],
    address: String,
    id: uuid::Uuid,
    values: &BTreeMap<String, Value>,
) -> CloudEvent {
    let now = SystemTime::now();
    // The PLC's own time for the record, when it has one and it is
    // believable; otherwise the gateway's, and the event says which.
    let device = fields.iter().find_map(|f| {
        let epoch = f.epoch?;
        values
            .get(&f.name)
            .map(|v| crate::source::device_time(v, epoch, now))
    });
    let (time, time_source) = device.unwrap_or((now, "gateway"));
    let origin = Origin {
        protocol: "modbus".into(),
        endpoint: config.endpoint.to_string(),
        address,
        quality: "good".into(),
        source_time: (time_source == "device").then(|| buffer::event::rfc3339_millis(time)),
    };
    let mut event = signal.event_for(ctx, id, values, origin, time);
    if device.is_some() {
        event
            .data
            .attributes
            .insert("time_source".into(), time_source.into());
    }
    event
}
