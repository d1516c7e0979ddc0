//! Records at line speed over OPC UA: a ring buffer the MES (or PLC)
//! exposes as a String array node of JSON records, with a UInt32 write
//! index it advances and a UInt32 read index the agent writes back.
//!
//! # Invariants
//!
//! - Identity, release of records stored before a stop, restarted and
//!   lapped rings: as [`crate::ring`] says, with 32-bit indexes.
//! - The write index is watched; each change (and every full read) reads
//!   the read index and the array in one Read, takes every new element
//!   into the pending batch with the ring's new position, and writes the
//!   read index only after that batch is durable (`flush`).
//! - An element that is not a record (not JSON, a required field
//!   missing, a quantity or type code that does not fit) is kept as a
//!   dead letter with the reason and its text; it cannot stay in the ring
//!   without holding every record behind it. A stop between keeping it
//!   and storing the position keeps it a second time (same id), never
//!   loses it.
//! - An array whose length is not the configured `slots` is refused
//!   (counted, logged): nothing is taken, nothing released.

use super::*;
use crate::ring::{look, RingPosition};

/// A UInt32 index counts modulo 2^32.
const MODULUS: u64 = 1 << 32;

/// A read index to write once the batch holding its records is durable.
pub(super) struct Release {
    pub(super) node: NodeId,
    pub(super) value: u32,
}

impl Served<'_> {
    /// The write index of ring `index` changed (or was read again).
    pub(super) async fn on_ring(
        &mut self,
        index: usize,
        node: &NodeId,
        value: DataValue,
    ) -> Result<(), Stop> {
        let spec = &self.config.rings[index];
        let Some(Variant::UInt32(written)) = value.value else {
            self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(source = %self.ctx.name, ring = %spec.signal, node = %node, value = ?value.value, "ring write index is not a UInt32; nothing taken");
            return Ok(());
        };
        let nodes = [&spec.read_index, &spec.array].map(|node| ReadValueId {
            node_id: node.clone(),
            attribute_id: AttributeId::Value as u32,
            ..Default::default()
        });
        let read = match self
            .session
            .read(&nodes, TimestampsToReturn::Both, 0.0)
            .await
        {
            Ok(read) => read,
            Err(e) => {
                return Err(Stop::Lost(session::explain(
                    e.status(),
                    &self.config.connection,
                    &e.to_string(),
                )))
            }
        };
        let read_back = match read.first().and_then(|v| v.value.as_ref()) {
            Some(Variant::UInt32(n)) => u64::from(*n),
            other => {
                self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.ctx.name, ring = %spec.signal, value = ?other, "ring read index is not a UInt32; nothing taken");
                return Ok(());
            }
        };
        let elements: Vec<Variant> = match read.get(1).and_then(|v| v.value.clone()) {
            Some(Variant::Array(array)) if array.values.len() == spec.slots as usize => {
                array.values
            }
            other => {
                self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
                let found = match &other {
                    Some(Variant::Array(array)) => format!("{} elements", array.values.len()),
                    other => format!("{other:?}"),
                };
                tracing::error!(source = %self.ctx.name, ring = %spec.signal, slots = spec.slots, found = %found, "ring array is not {} records; nothing taken", spec.slots);
                return Ok(());
            }
        };
        let slots = u64::from(spec.slots);
        let found = look(
            self.working().rings.get(&spec.signal),
            u64::from(written),
            read_back,
            MODULUS,
            slots,
        );
        if found.restarted {
            self.stats.ring_restarts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(source = %self.ctx.name, ring = %spec.signal, read_index = read_back, write_index = written, "RING RESTARTED: the server's indexes do not match the stored position (restarted or ring re-initialised); its records get new ids");
        }
        if found.overwritten > 0 {
            let overwritten = found.overwritten;
            self.stats
                .records_overwritten
                .fetch_add(overwritten, Ordering::Relaxed);
            tracing::error!(source = %self.ctx.name, ring = %spec.signal, overwritten, slots, "RING LAPPED: the server overwrote {overwritten} records before they were read; it must wait for the read index (or the ring needs more slots)");
        }
        let at = found.at;
        let signal = self.ring_signals[index].clone();
        let urn = self.ctx.urn();
        for k in at.next..at.next + found.pending {
            let slot = (k % slots) as usize;
            let id = at.id(&urn, &spec.signal, k);
            let mut origin = self.origin(&spec.array, &value);
            origin.address = format!("{}[{slot}]", spec.array);
            let (time, _) = record::value_time(&value, SystemTime::now());
            let parsed = match &elements[slot] {
                Variant::String(text) => {
                    record::json_record(text.as_ref(), &spec.fields).and_then(|values| {
                        crate::source::record_quantity(&values)?;
                        signal.event_type_for(&values)?;
                        Ok(values)
                    })
                }
                other => Err(format!(
                    "element is {}, not a JSON string",
                    record::describe(other)
                )),
            };
            match parsed {
                Ok(values) => {
                    let event = signal.event_for(self.ctx, id, &values, origin, time);
                    self.tally_record(&spec.signal, &event, SystemTime::now());
                    self.pending.events.push(event);
                }
                Err(reason) => {
                    self.stats.malformed_records.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(source = %self.ctx.name, ring = %spec.signal, slot, reason = %reason, "ring record kept as a dead letter, not posted");
                    let raw = BTreeMap::from([(
                        "raw".to_owned(),
                        FieldValue::Text(record::describe(&elements[slot])),
                    )]);
                    let event = signal.event_for(self.ctx, id, &raw, origin, time);
                    let kept = crate::runtime::keep_dead_letter(
                        self.ctx,
                        vec![self.ctx.new_event(&event)],
                        &format!("ring record refused: {reason}"),
                        "read again with the ring",
                    )
                    .await
                    .map_err(|Closed| Stop::Shutdown)?;
                    if kept.is_none() {
                        // Not kept: stop here; what came before is taken,
                        // this one is read again.
                        let upto = RingPosition {
                            namespace: at.namespace,
                            next: k,
                        };
                        self.stage_ring(index, upto, found.restarted);
                        self.resync = true;
                        return Ok(());
                    }
                }
            }
        }
        let end = RingPosition {
            namespace: at.namespace,
            next: at.next + found.pending,
        };
        if found.pending > 0 || found.unreleased > 0 || found.restarted {
            self.stats
                .ring_records
                .fetch_add(found.pending, Ordering::Relaxed);
            self.stage_ring(index, end, found.restarted);
        }
        Ok(())
    }

    /// Stages the ring's new position and the read index to write once it
    /// is durable.
    fn stage_ring(&mut self, index: usize, at: RingPosition, restarted: bool) {
        let spec = &self.config.rings[index];
        let (signal, node) = (spec.signal.clone(), spec.read_index.clone());
        let value = at.device_index(MODULUS) as u32;
        if restarted || self.working().rings.get(&signal) != Some(&at) {
            self.staged().rings.insert(signal, at);
        }
        self.pending.releases.retain(|r| r.node != node);
        self.pending.releases.push(Release { node, value });
    }

    /// Writes read indexes whose records are durable.
    pub(super) async fn release_rings(&mut self, releases: Vec<Release>) {
        let timeout = self.config.connection.timeout;
        for release in releases {
            let write = WriteValue {
                node_id: release.node.clone(),
                attribute_id: AttributeId::Value as u32,
                value: DataValue::value_only(Variant::UInt32(release.value)),
                ..Default::default()
            };
            let answer = tokio::time::timeout(timeout, self.session.write(&[write])).await;
            let refused = match answer {
                Ok(Ok(codes)) => match codes.first() {
                    Some(code) if code.is_good() => None,
                    Some(code) => Some(format!("server refused it: {code}")),
                    None => Some("no result".to_owned()),
                },
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {timeout:?}")),
            };
            if let Some(why) = refused {
                self.stats.ack_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.ctx.name, node = %release.node, error = %why, "writing the ring's read index failed; written again at the next reading");
                // No notification may come while the ring is full: the
                // next tick reads everything again and releases.
                self.resync = true;
            }
        }
    }
}
