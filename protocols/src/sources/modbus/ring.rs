//! Records at line speed: a ring buffer in the PLC.
//!
//! The PLC keeps `slots` records of `slot_size` registers from
//! `first_slot`, a write index it advances after filling a slot, and a
//! read index the agent writes back. Both indexes are free-running u16
//! counts (records written / records taken, modulo 65536); record `k`
//! sits in slot `k mod slots`. The PLC may fill slot `k mod slots` only
//! while `k - read_index < slots`; a PLC that does not wait laps the
//! agent, which shows as more than `slots` records pending.
//!
//! # Invariants
//!
//! - Identity, release of records stored before a stop, restarted and
//!   lapped rings: as [`crate::ring`] says, with 16-bit indexes.
//! - New records are stored together with the ring's new position in one
//!   durable write; only then is the read index written to the PLC. A
//!   record is never released to the PLC before it is durable.
//! - A lapped ring is counted (`records_overwritten`) and logged with how
//!   many records the PLC overwrote; a restarted one is counted
//!   (`ring_restarts`) and logged.
//! - A slot whose fields do not decode, or whose type code the map does
//!   not know, is kept as a dead letter with the reason (it cannot stay in
//!   the ring without holding every record behind it).

use super::handshake::record_event_of;
use super::*;
use crate::ring::{look, RingPosition};

/// A register's index counts modulo 2^16.
const MODULUS: u64 = 1 << 16;

/// Most records taken from one ring in one durable write.
const MOST_PER_WRITE: u64 = 512;

/// A ring buffer of records in the PLC.
#[derive(Clone, Debug)]
pub struct RingSpec {
    /// Signal name (part of every id).
    pub signal: String,
    /// Event type (unless `type_from` says).
    pub event_type: EventType,
    /// Register the PLC advances after writing a slot (u16, free-running).
    pub write_index: Address,
    /// Holding register the agent writes back (u16, free-running).
    pub read_index: Address,
    /// First register of slot 0.
    pub first_slot: Address,
    /// Slots in the ring (1..=32768).
    pub slots: u16,
    /// Registers per slot.
    pub slot_size: u16,
    /// The record's fields, at their addresses in slot 0.
    pub fields: Vec<FieldSpec>,
    /// Unit of measure of `quantity`.
    pub unit: String,
    /// Event type from a field's code (overrides `event_type`).
    pub type_from: Option<crate::source::TypeFromField>,
    /// Line, machine and attributes when not the source's.
    pub place: crate::source::Placement,
}

fn ring_signal(config: &ModbusConfig, ring: &RingSpec) -> RecordSignal {
    RecordSignal {
        name: ring.signal.clone(),
        event_type: ring.event_type.clone(),
        unit: ring.unit.clone(),
        line: ring.place.line_or(&config.line),
        machine: ring.place.machine_or(&config.machine),
        attributes: ring.place.attributes.clone(),
        reasons: ring.place.reasons.clone(),
        key: Vec::new(),
        type_from: ring.type_from.clone(),
    }
}

/// Takes what every ring holds, as long as full batches keep coming and
/// the poll has time.
pub(super) async fn drain_rings(
    device: &Device,
    ctx: &SourceContext,
    config: &ModbusConfig,
    stats: &ModbusStats,
    position: &mut Positioned<Position>,
    poll_started: tokio::time::Instant,
) -> Result<(), PollError> {
    let deadline = poll_started + config.poll_interval.mul_f64(0.8);
    for ring in &config.rings {
        while take(device, ctx, config, stats, ring, position).await?
            && tokio::time::Instant::now() < deadline
        {}
    }
    Ok(())
}

/// One look at a ring; `true` when it held more than one write takes.
async fn take(
    device: &Device,
    ctx: &SourceContext,
    config: &ModbusConfig,
    stats: &ModbusStats,
    ring: &RingSpec,
    position: &mut Positioned<Position>,
) -> Result<bool, PollError> {
    let indexes = read_spans(
        device,
        &[(ring.write_index, 1), (ring.read_index, 1)],
        config,
        stats,
        false,
    )
    .await?;
    let word = |a: Address| match indexes.value(a, Format::U16, Order::default()) {
        Ok(Some(Value::Int(n))) => u16::try_from(n).ok(),
        _ => None,
    };
    let (Some(written), Some(read_back)) = (word(ring.write_index), word(ring.read_index)) else {
        return Ok(false);
    };
    let slots = u64::from(ring.slots);
    let found = look(
        position.get().rings.get(&ring.signal),
        u64::from(written),
        u64::from(read_back),
        MODULUS,
        slots,
    );
    if found.unreleased > 0 {
        tracing::info!(source = %ctx.name, ring = %ring.signal, records = found.unreleased, "ring records stored before a stop are released to the PLC now");
    }
    if found.restarted {
        stats.ring_restarts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(source = %ctx.name, ring = %ring.signal, plc_read_index = read_back, plc_write_index = written, "RING RESTARTED: the PLC's indexes do not match the stored position (PLC restarted or ring re-initialised); its records get new ids");
    }
    if found.overwritten > 0 {
        let overwritten = found.overwritten;
        stats
            .records_overwritten
            .fetch_add(overwritten, Ordering::Relaxed);
        tracing::error!(source = %ctx.name, ring = %ring.signal, overwritten, slots = ring.slots, "RING LAPPED: the PLC overwrote {overwritten} records before they were read; the PLC must wait for the read index (or the ring needs more slots or a shorter poll_interval)");
    }
    let (at, pending) = (found.at, found.pending);
    let device_index = |p: &RingPosition| p.device_index(MODULUS) as u16;
    if pending == 0 {
        // A new namespace is stored at once, so the restart is seen once.
        if found.restarted && !store(ctx, stats, ring, position, Vec::new(), &at).await? {
            return Ok(false);
        }
        if device_index(&at) != read_back {
            release(device, ctx, config, stats, ring, device_index(&at)).await?;
        }
        return Ok(false);
    }
    let count = pending.min(MOST_PER_WRITE);
    let spans: Vec<(Address, u16)> = (0..count)
        .flat_map(|i| {
            let slot = ((at.next + i) % slots) as u16;
            ring.fields.iter().map(move |f| {
                (
                    slot_address(f.address, slot, ring.slot_size),
                    f.format.width(),
                )
            })
        })
        .collect();
    let snapshot = read_spans(device, &spans, config, stats, false).await?;
    let signal = ring_signal(config, ring);
    let urn = ctx.urn();
    // Runs of posted records and single dead letters, in ring order.
    let mut posted = Vec::new();
    for i in 0..count {
        let index = at.next + i;
        let slot = (index % slots) as u16;
        let mut values = BTreeMap::new();
        let mut unusable = None;
        for field in &ring.fields {
            let address = slot_address(field.address, slot, ring.slot_size);
            match snapshot.value(address, field.format, field.order) {
                Ok(Some(v)) => {
                    values.insert(field.name.clone(), v);
                }
                // The device refused the read: nothing taken now.
                Ok(None) => return Ok(false),
                Err(e) => unusable = Some(format!("field {} unusable: {e}", field.name)),
            }
        }
        if unusable.is_none() {
            unusable = record_quantity(&values)
                .err()
                .map(|e| format!("quantity unusable: {e}"))
                .or_else(|| signal.event_type_for(&values).err());
        }
        let id = at.id(&urn, &ring.signal, index);
        let event = record_event_of(
            ctx,
            config,
            &signal,
            &ring.fields,
            format!("unit {} ring {} slot {slot}", config.unit, ring.signal),
            id,
            &values,
        );
        match unusable {
            None => posted.push(event),
            Some(reason) => {
                // What precedes it is stored first, in ring order.
                let upto = RingPosition {
                    namespace: at.namespace,
                    next: index,
                };
                if !store(
                    ctx,
                    stats,
                    ring,
                    position,
                    std::mem::take(&mut posted),
                    &upto,
                )
                .await?
                {
                    return Ok(false);
                }
                stats.bad_values.fetch_add(1, Ordering::Relaxed);
                tracing::error!(source = %ctx.name, ring = %ring.signal, slot, reason = %reason, "ring record kept as a dead letter, not posted");
                let past = RingPosition {
                    namespace: at.namespace,
                    next: index + 1,
                };
                let mut next = position.get().clone();
                next.rings.insert(ring.signal.clone(), past);
                let kept = position
                    .store_dead_letter(
                        ctx,
                        vec![ctx.new_event(&event)],
                        next,
                        &format!("ring record refused: {reason}"),
                        "ring not read back; taken again next poll",
                    )
                    .await
                    .map_err(|Closed| PollError::Stopped)?;
                if kept.is_none() {
                    return Ok(false);
                }
                stats.records_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let end = RingPosition {
        namespace: at.namespace,
        next: at.next + count,
    };
    let moved = position.get().rings.get(&ring.signal) != Some(&end);
    if (!posted.is_empty() || moved) && !store(ctx, stats, ring, position, posted, &end).await? {
        return Ok(false);
    }
    release(device, ctx, config, stats, ring, device_index(&end)).await?;
    Ok(pending > count)
}

/// Stores `events` with the ring at `at` in one durable write; `false`
/// when the journal did not take them (nothing released, read again).
async fn store(
    ctx: &SourceContext,
    stats: &ModbusStats,
    ring: &RingSpec,
    position: &mut Positioned<Position>,
    records: Vec<buffer::CloudEvent>,
    at: &RingPosition,
) -> Result<bool, PollError> {
    let count = records.len() as u64;
    let mut next = position.get().clone();
    next.rings.insert(ring.signal.clone(), at.clone());
    let now = std::time::SystemTime::now();
    let mut events = Vec::with_capacity(records.len());
    for record in &records {
        let mut event = ctx.new_event(record);
        if let Some(rule) = ctx.periods.as_deref().map(|c| &c.rule) {
            let quantity = match record.data.quantity {
                buffer::Quantity::Count(n) => n as f64,
                buffer::Quantity::Measure(x) => x,
            };
            let tally = next.periods.line(rule, &record.data.line, now);
            tally.add_record(&ring.signal, quantity, record.sequence.clone(), now);
            tally.add_event(record);
            if let Some(entry) = &mut event.ledger {
                entry.at_ms = tally.period_ms(now);
            }
        }
        events.push(event);
    }
    let stored = position
        .store(
            ctx,
            events,
            next,
            "ring not read back; taken again next poll",
        )
        .await
        .map_err(|Closed| PollError::Stopped)?;
    if stored.is_some() {
        stats.events.fetch_add(count, Ordering::Relaxed);
        stats.ring_records.fetch_add(count, Ordering::Relaxed);
        ctx.read
            .periods_stored(&ctx.name, &position.get().periods, &[]);
    }
    Ok(stored.is_some())
}

/// Writes the read index back: the PLC may reuse the slots before it.
async fn release(
    device: &Device,
    ctx: &SourceContext,
    config: &ModbusConfig,
    stats: &ModbusStats,
    ring: &RingSpec,
    read_index: u16,
) -> Result<(), PollError> {
    match device
        .write(config.unit, ring.read_index, read_index, config.timeout)
        .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(code)) => {
            stats.exceptions.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(source = %ctx.name, ring = %ring.signal, exception = ?code, "device refused the read index");
            Ok(())
        }
        Err(e) => {
            stats.transport_errors.fetch_add(1, Ordering::Relaxed);
            Err(PollError::Transport(e))
        }
    }
}

/// Where a field given at its slot-0 address sits in `slot`.
fn slot_address(address: Address, slot: u16, slot_size: u16) -> Address {
    Address {
        offset: address.offset.wrapping_add(slot.wrapping_mul(slot_size)),
        ..address
    }
}
