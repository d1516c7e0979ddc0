//! Records: taking one from the MES, storing it, acknowledging it once it
//! is durable, and dead-lettering a malformed one.

use super::*;

impl Served<'_> {
    pub(super) async fn on_record(
        &mut self,
        index: usize,
        node: &NodeId,
        value: DataValue,
    ) -> Result<(), Stop> {
        let spec = &self.config.records[index];
        let Some(variant) = value.value.clone().filter(|v| !matches!(v, Variant::Empty)) else {
            // The MES cleared the record node: nothing announced, and the
            // stored record is released.
            self.release(index);
            return Ok(());
        };
        let decoded: Result<Fields, String> = match &spec.layout {
            RecordLayout::Json(fields) => match &variant {
                Variant::String(s) if s.is_empty() || s.as_ref().trim().is_empty() => {
                    self.release(index);
                    return Ok(());
                }
                Variant::String(s) => {
                    record::json_record(s.as_ref(), fields).map(|v| (v, BTreeMap::new()))
                }
                other => Err(format!(
                    "record node holds {}, expected a JSON string",
                    record::describe(other)
                )),
            },
            RecordLayout::Nodes(fields) => match self.read_fields(fields, &variant).await {
                Ok(Some(found)) => Ok(found),
                Ok(None) => {
                    self.resync = true;
                    return Ok(());
                }
                Err(e) => Err(e),
            },
        };
        let (time, time_source) = record::value_time(&value, SystemTime::now());
        let mut origin = self.origin(node, &value);
        // A type code the map does not know makes the record one that
        // cannot be posted: a dead letter with the reason, like a malformed
        // one (not acknowledged: the MES shows it until someone acts).
        let decoded = decoded.and_then(|(values, raw)| {
            self.record_signals[index]
                .event_type_for(&values)
                .map(|_| (values, raw))
        });
        let (values, raw) = match decoded {
            Ok(found) => found,
            Err(reason) => {
                self.malformed(spec, &variant, &reason, origin, time)
                    .await?;
                return Ok(());
            }
        };
        origin.address = format!("{node} record {}", spec.signal);
        let sequence = match values.get("sequence") {
            Some(FieldValue::Int(n)) => Some(*n),
            _ => None,
        };
        // A handshake record's id is its exchange; others' their key.
        let (id, next_handshake) = if spec.ack.is_some() {
            let fingerprint = record_fingerprint(&values);
            let handshake = match self.working().handshakes.get(&spec.signal) {
                Some(handshake) => handshake.clone(),
                None => self.migrated_handshake(index, &values, fingerprint),
            };
            match handshake.presented(&self.ctx.urn(), &spec.signal, fingerprint, false) {
                Presented::Stored(id) => (id, None),
                Presented::New { id, next } => (id, Some(next)),
            }
        } else {
            let id = self.record_signals[index].id_for(self.ctx, &values);
            let stored = self
                .working()
                .records
                .get(&spec.signal)
                .is_some_and(|m| m.id == id.to_string());
            (id, (!stored).then(HandshakePosition::default))
        };
        let id_text = id.to_string();
        if let Some(handshake) = next_handshake {
            let mut event =
                self.record_signals[index].event_for(self.ctx, id, &values, origin.clone(), time);
            event
                .data
                .attributes
                .insert("time_source".into(), time_source.as_str().into());
            // One record too large to store must not hold the values
            // around it: it alone goes to the dead letters.
            let size = event.to_json().len();
            if size > buffer::journal::MAX_EVENT_BYTES {
                let reason = format!(
                    "record makes an event of {size} bytes, more than the {} a journal event may hold",
                    buffer::journal::MAX_EVENT_BYTES
                );
                self.malformed(spec, &variant, &reason, origin, time)
                    .await?;
                return Ok(());
            }
            if let (Some(seq), Some(Some(last))) = (
                sequence,
                self.working().records.get(&spec.signal).map(|m| m.sequence),
            ) {
                if seq > last + 1 && !spec.sequence_shared {
                    let missed = (seq - last - 1) as u64;
                    self.stats
                        .records_missed
                        .fetch_add(missed, Ordering::Relaxed);
                    tracing::error!(source = %self.ctx.name, signal = %spec.signal, last_stored = last, now = seq, missed, "records were overwritten before they could be read; configure an acknowledgement (the MES then waits) or a larger queue_size");
                }
            }
            let (signal, acknowledged) = (spec.signal.clone(), spec.ack.is_some());
            let staged = self.staged();
            staged.records.insert(
                signal.clone(),
                RecordMark {
                    id: id_text.clone(),
                    sequence,
                },
            );
            if acknowledged {
                staged.handshakes.insert(signal.clone(), handshake);
            }
            self.tally_record(&signal, &event, SystemTime::now());
            self.pending.events.push(event);
        }
        let id = id_text;
        // Acknowledged only after the flush that makes it durable (or
        // right after it, if it already was).
        if let Some(ack) = &spec.ack {
            if self.acked.get(&spec.signal) != Some(&id) {
                self.pending.acks.push(AckDue {
                    signal: spec.signal.clone(),
                    id,
                    ack: ack.clone(),
                    values,
                    raw,
                });
            }
        }
        Ok(())
    }

    /// A handshake position for a cursor written before they existed: if
    /// the record shown is the one stored last (same key id), it is the
    /// pending one, so an upgrade does not post it a second time.
    fn migrated_handshake(
        &self,
        index: usize,
        values: &BTreeMap<String, FieldValue>,
        fingerprint: uuid::Uuid,
    ) -> HandshakePosition {
        let spec = &self.config.records[index];
        let mut handshake = HandshakePosition::default();
        let key_id = self.record_signals[index].id_for(self.ctx, values);
        if let Some(mark) = self.working().records.get(&spec.signal) {
            if mark.id == key_id.to_string() {
                handshake.pending = Some(crate::source::PendingRecord {
                    id: key_id,
                    fingerprint,
                });
            }
        }
        handshake
    }

    /// The record node of a record with an acknowledgement no longer
    /// shows the stored record: stage its release (stored with the next
    /// flush), so that an equal record later is a new fact.
    fn release(&mut self, index: usize) {
        let spec = &self.config.records[index];
        if spec.ack.is_none() {
            return;
        }
        let released = self
            .working()
            .handshakes
            .get(&spec.signal)
            .and_then(HandshakePosition::released);
        if let Some(released) = released {
            let signal = spec.signal.clone();
            self.staged().handshakes.insert(signal, released);
        }
    }

    pub(super) async fn send_ack(&mut self, due: AckDue) {
        if self.acked.get(&due.signal) == Some(&due.id) {
            return;
        }
        match self.acknowledge(&due.ack, &due.values, &due.raw).await {
            Ok(()) => {
                self.stats.records_acked.fetch_add(1, Ordering::Relaxed);
                self.acked.insert(due.signal, due.id);
            }
            Err(e) => {
                self.stats.ack_failures.fetch_add(1, Ordering::Relaxed);
                // The record node may not change again: read it anew.
                self.resync = true;
                if self.ack_failed.get(&due.signal) != Some(&due.id) {
                    tracing::warn!(source = %self.ctx.name, signal = %due.signal, error = %e, "acknowledgement refused; retried on each reading until it is taken");
                    self.ack_failed.insert(due.signal, due.id);
                }
            }
        }
    }

    /// Node layout: the trigger is the sequence; fields are read together.
    /// `Ok(None)`: a field is momentarily bad (retried on the next read).
    async fn read_fields(
        &mut self,
        fields: &[(String, NodeId)],
        sequence: &Variant,
    ) -> Result<Option<Fields>, String> {
        let mut values = BTreeMap::new();
        let mut raw = BTreeMap::new();
        values.insert(
            "sequence".to_owned(),
            record::field_value(sequence).map_err(|e| format!("field sequence: {e}"))?,
        );
        raw.insert("sequence".to_owned(), sequence.clone());
        let nodes: Vec<ReadValueId> = fields
            .iter()
            .map(|(_, node)| ReadValueId {
                node_id: node.clone(),
                attribute_id: AttributeId::Value as u32,
                ..Default::default()
            })
            .collect();
        let read = match self
            .session
            .read(&nodes, TimestampsToReturn::Neither, 0.0)
            .await
        {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(source = %self.ctx.name, error = %e, "reading record fields failed; retried");
                return Ok(None);
            }
        };
        for ((name, node), value) in fields.iter().zip(read) {
            if value.status.is_some_and(|s| s.is_bad()) {
                self.stats.bad_status.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.ctx.name, field = %name, node = %node, status = %value.status.unwrap_or(StatusCode::Good), "record field has a bad status; record not taken yet");
                return Ok(None);
            }
            match value.value {
                None | Some(Variant::Empty) => {}
                Some(v) => {
                    values.insert(
                        name.clone(),
                        record::field_value(&v)
                            .map_err(|e| format!("field {name} ({node}): {e}"))?,
                    );
                    raw.insert(name.clone(), v);
                }
            }
        }
        record::check_fields(&values)?;
        Ok(Some((values, raw)))
    }

    async fn malformed(
        &mut self,
        spec: &NodeRecord,
        variant: &Variant,
        reason: &str,
        origin: Origin,
        time: SystemTime,
    ) -> Result<(), Stop> {
        let raw = match variant {
            Variant::String(s) => s.as_ref().to_owned(),
            other => format!("{other:?}"),
        };
        // The same bad record read again (subscription start, full read)
        // is one malformed record, not two.
        if self.malformed_seen.get(&spec.signal) == Some(&raw) {
            return Ok(());
        }
        self.malformed_seen.insert(spec.signal.clone(), raw.clone());
        self.stats.malformed_records.fetch_add(1, Ordering::Relaxed);
        tracing::error!(source = %self.ctx.name, signal = %spec.signal, reason, "malformed record: kept as a dead letter, not acknowledged");
        let urn = self.ctx.urn();
        let id = buffer::id::record_event_id(&urn, &spec.signal, &["malformed", &raw]);
        let mut attributes = self.ctx.attributes.clone();
        attributes.insert("malformed".into(), reason.to_owned());
        attributes.insert("raw_record".into(), raw.chars().take(4096).collect());
        let data = EventData {
            site: self.ctx.site.clone(),
            line: spec.place.line_or(&self.config.line),
            machine: spec.place.machine_or(&self.config.machine),
            work_order: None,
            material: None,
            quantity: Quantity::Count(0),
            unit: spec.unit.clone(),
            lot: None,
            reason_code: None,
            counter: None,
            origin,
            attributes,
            checkpoint: None,
        };
        let event = CloudEvent::new(id, urn, spec.event_type.clone(), time, data);
        crate::runtime::keep_dead_letter(
            self.ctx,
            vec![self.ctx.new_event(&event)],
            &format!("malformed record: {reason}"),
            "the malformed record is not kept",
        )
        .await
        .map(|_| ())
        .map_err(|Closed| Stop::Shutdown)
    }

    async fn acknowledge(
        &mut self,
        ack: &Ack,
        values: &BTreeMap<String, FieldValue>,
        raw: &BTreeMap<String, Variant>,
    ) -> Result<(), String> {
        let timeout = self.config.connection.timeout;
        match ack {
            Ack::Write { node, value } => {
                let like = if value.data_type.is_none() {
                    let read = ReadValueId {
                        node_id: node.clone(),
                        attribute_id: AttributeId::Value as u32,
                        ..Default::default()
                    };
                    self.session
                        .read(&[read], TimestampsToReturn::Neither, 0.0)
                        .await
                        .map_err(|e| format!("reading ack node {node}: {e}"))?
                        .into_iter()
                        .next()
                        .and_then(|v| v.value)
                } else {
                    None
                };
                let variant = ack_variant(value, values, raw, like.as_ref())?;
                let write = WriteValue {
                    node_id: node.clone(),
                    attribute_id: AttributeId::Value as u32,
                    value: DataValue::value_only(variant),
                    ..Default::default()
                };
                let result = tokio::time::timeout(timeout, self.session.write(&[write]))
                    .await
                    .map_err(|_| format!("no answer writing {node} within {timeout:?}"))?
                    .map_err(|e| format!("writing {node}: {e}"))?;
                match result.first() {
                    Some(code) if code.is_good() => Ok(()),
                    Some(code) => Err(format!("server refused writing {node}: {code}")),
                    None => Err(format!("no result writing {node}")),
                }
            }
            Ack::Call {
                object,
                method,
                arguments,
            } => {
                let args = arguments
                    .iter()
                    .map(|a| ack_variant(a, values, raw, None))
                    .collect::<Result<Vec<_>, _>>()?;
                let request = CallMethodRequest {
                    object_id: object.clone(),
                    method_id: method.clone(),
                    input_arguments: Some(args),
                };
                let result = tokio::time::timeout(timeout, self.session.call_one(request))
                    .await
                    .map_err(|_| format!("no answer calling {method} within {timeout:?}"))?
                    .map_err(|e| format!("calling {method}: {e}"))?;
                if result.status_code.is_good() {
                    Ok(())
                } else {
                    Err(format!("method {method} answered {}", result.status_code))
                }
            }
        }
    }
}

/// The acknowledgement value as the server expects it.
fn ack_variant(
    argument: &AckArgument,
    values: &BTreeMap<String, FieldValue>,
    raw: &BTreeMap<String, Variant>,
    like: Option<&Variant>,
) -> Result<Variant, String> {
    let value = match &argument.value {
        AckValue::Field(name) => {
            if argument.data_type.is_none() && like.is_none() {
                if let Some(v) = raw.get(name) {
                    return Ok(v.clone());
                }
            }
            values.get(name).cloned().ok_or_else(|| {
                format!("acknowledgement uses field {name}, which the record lacks")
            })?
        }
        AckValue::Fixed(v) => v.clone(),
    };
    let type_name = match (&argument.data_type, like) {
        (Some(t), _) => t.clone(),
        (None, Some(v)) => match v {
            Variant::Boolean(_) => "Boolean",
            Variant::Int16(_) => "Int16",
            Variant::UInt16(_) => "UInt16",
            Variant::Int32(_) => "Int32",
            Variant::UInt32(_) => "UInt32",
            Variant::Int64(_) => "Int64",
            Variant::UInt64(_) => "UInt64",
            Variant::Float(_) | Variant::Double(_) => "Double",
            Variant::String(_) => "String",
            other => {
                return Err(format!(
                    "acknowledgement node holds {}; set the ack's data_type",
                    record::describe(other)
                ))
            }
        }
        .to_owned(),
        (None, None) => match &value {
            FieldValue::Bool(_) => "Boolean".into(),
            FieldValue::Int(_) => "Int64".into(),
            FieldValue::Float(_) => "Double".into(),
            FieldValue::Text(_) => "String".into(),
        },
    };
    convert(&value, &type_name)
}

/// Converts a value to an OPC UA built-in type by name.
pub fn convert(value: &FieldValue, type_name: &str) -> Result<Variant, String> {
    let int = || match value {
        FieldValue::Int(n) => Ok(*n),
        FieldValue::Bool(b) => Ok(i64::from(*b)),
        FieldValue::Text(t) => t
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("{t:?} is not an integer")),
        FieldValue::Float(f) if f.fract() == 0.0 => Ok(*f as i64),
        FieldValue::Float(f) => Err(format!("{f} is not an integer")),
    };
    let range = |e| format!("{} does not fit {type_name}: {e}", value.text());
    Ok(match type_name {
        "Boolean" => Variant::Boolean(match value {
            FieldValue::Bool(b) => *b,
            _ => int()? != 0,
        }),
        "Int16" => Variant::Int16(i16::try_from(int()?).map_err(range)?),
        "UInt16" => Variant::UInt16(u16::try_from(int()?).map_err(range)?),
        "Int32" => Variant::Int32(i32::try_from(int()?).map_err(range)?),
        "UInt32" => Variant::UInt32(u32::try_from(int()?).map_err(range)?),
        "Int64" => Variant::Int64(int()?),
        "UInt64" => Variant::UInt64(u64::try_from(int()?).map_err(range)?),
        "Double" => Variant::Double(match value {
            FieldValue::Float(f) => *f,
            _ => int()? as f64,
        }),
        "String" => Variant::String(value.text().into()),
        other => return Err(format!("unsupported acknowledgement type {other}")),
    })
}
