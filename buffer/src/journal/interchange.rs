//! The journal's interchange format: what survives any change of sled or of
//! the journal's own layout. Versioned NDJSON, one record per line:
//!
//! ```text
//! {"record":"header","plant_edge_journal":1,"format":1,"writer":"plant-edge 0.1.0","exported":"…"}
//! {"record":"event","id":"…","seq":7,"source":"line-1","class":"business","sinks":["erp"],"event":{…CloudEvent…}}
//! {"record":"dead_letter","id":"…","seq":3,"source":"line-1","class":"business","sink":"erp","reason":"…","attempts":2,"dead_at":"…","appended_at":"…","event":{…}}
//! {"record":"position","source":"line-1","state":{…}}
//! {"record":"end","events":1,"dead_letters":1,"positions":1}
//! ```
//!
//! Invariants:
//! - An event's bytes are carried exactly (`event` holds the stored JSON as
//!   it is; bytes that are not one line of JSON go in `event_base64`), so an
//!   imported event is sent as the original would have been, same id.
//! - Import never stores an id twice: ids already pending or dead-lettered
//!   in the journal, or in its dedup window, are counted as duplicates.
//! - Positions are written after the events they follow: an import cut
//!   short leaves the old positions, and the sources re-read (same ids)
//!   rather than skip.
//! - Version 1 only grows by optional fields: an older build reads what a
//!   newer one writes (the rollback spool relies on it), and a record kind
//!   it does not know is an error, not skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::commit::AppendRequest;
use super::layout::{self, DeadLetterRecord, StoredEvent};
use super::{Journal, JournalError, LedgerEntry, NewEvent};
use crate::EventClass;

/// The interchange format's version this build writes and reads.
pub const INTERCHANGE_VERSION: u32 = 1;

/// Events committed per import commit (one fdatasync each).
const IMPORT_BATCH: usize = 512;

/// What an export wrote or an import took.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InterchangeCounts {
    /// Pending events.
    pub events: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Source positions.
    pub positions: u64,
    /// Events (or dead letters) not stored again: their id was known.
    pub duplicates: u64,
    /// The file ended with its `end` record (a cut-short file did not).
    pub complete: bool,
    /// Events stored without the sinks the newer version had already
    /// delivered them to (a rollback spool).
    pub already_delivered: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    record: String,
    plant_edge_journal: u32,
    format: u32,
    writer: String,
    exported: String,
    /// The exporter's next sequence: numbering goes on above it, so no
    /// sequence names two events (absent in a rollback spool, whose event
    /// records carry every sequence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_seq: Option<u64>,
}

#[derive(Deserialize)]
struct Kind {
    record: String,
}

#[derive(Serialize, Deserialize)]
struct EventRecord<'a> {
    record: &'a str,
    id: Uuid,
    seq: u64,
    source: String,
    class: String,
    sinks: Vec<String>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    event: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event_base64: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct DeadLetterLine<'a> {
    record: &'a str,
    id: Uuid,
    seq: u64,
    source: String,
    class: String,
    sink: String,
    reason: String,
    attempts: u32,
    dead_at: String,
    appended_at: String,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    event: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event_base64: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct PositionRecord<'a> {
    record: &'a str,
    source: String,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    state: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state_base64: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct EndRecord {
    record: String,
    events: u64,
    dead_letters: u64,
    positions: u64,
}

fn class_name(class: EventClass) -> &'static str {
    match class {
        EventClass::Business => "business",
        EventClass::Telemetry => "telemetry",
    }
}

fn class_of(name: &str) -> Result<EventClass, String> {
    match name {
        "business" => Ok(EventClass::Business),
        "telemetry" => Ok(EventClass::Telemetry),
        other => Err(format!("class {other:?} is neither business nor telemetry")),
    }
}

/// Bytes as one line of JSON when they are that, else base64.
fn as_json(bytes: &[u8]) -> (Option<&RawValue>, Option<String>) {
    let json = (!bytes.contains(&b'\n'))
        .then(|| std::str::from_utf8(bytes).ok())
        .flatten()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
    match json {
        Some(raw) => (Some(raw), None),
        None => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

fn bytes_of(raw: Option<&RawValue>, encoded: Option<&str>, what: &str) -> Result<Vec<u8>, String> {
    match (raw, encoded) {
        (Some(raw), _) => Ok(raw.get().as_bytes().to_vec()),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("{what}_base64 is not base64: {e}")),
        (None, None) => Err(format!("neither {what} nor {what}_base64")),
    }
}

fn rfc3339(ms: u64) -> String {
    crate::event::rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

fn ms_of(text: &str) -> Option<u64> {
    humantime::parse_rfc3339(text)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

fn failed(e: impl std::fmt::Display) -> JournalError {
    JournalError::Interchange(e.to_string())
}

/// One line of an event record, without its newline (the rollback spool
/// writes the same lines).
pub(super) fn event_line(
    seq: u64,
    class: EventClass,
    sinks: Vec<String>,
    event: &StoredEvent,
) -> Result<Vec<u8>, JournalError> {
    let (json, encoded) = as_json(&event.payload);
    serde_json::to_vec(&EventRecord {
        record: "event",
        id: Uuid::from_bytes(event.id),
        seq,
        source: event.source.clone(),
        class: class_name(class).into(),
        sinks,
        event: json,
        event_base64: encoded,
    })
    .map_err(failed)
}

/// One line of a position record, without its newline.
pub(super) fn position_line(source: &str, plain: &[u8]) -> Result<Vec<u8>, JournalError> {
    let (json, encoded) = as_json(plain);
    serde_json::to_vec(&PositionRecord {
        record: "position",
        source: source.to_owned(),
        state: json,
        state_base64: encoded,
    })
    .map_err(failed)
}

pub(super) fn dead_letter_line(record: &DeadLetterRecord) -> Result<Vec<u8>, JournalError> {
    let (json, encoded) = as_json(&record.event.payload);
    serde_json::to_vec(&DeadLetterLine {
        record: "dead_letter",
        id: Uuid::from_bytes(record.event.id),
        seq: record.seq,
        source: record.event.source.clone(),
        class: class_name(EventClass::from_code(record.class)).into(),
        sink: record.sink.clone(),
        reason: record.reason.clone(),
        attempts: record.attempts,
        dead_at: rfc3339(record.dead_ms),
        appended_at: rfc3339(record.appended_ms),
        event: json,
        event_base64: encoded,
    })
    .map_err(failed)
}

/// The header line, without its newline.
pub(super) fn header_line(format: u32, next_seq: Option<u64>) -> Result<Vec<u8>, JournalError> {
    serde_json::to_vec(&Header {
        record: "header".into(),
        plant_edge_journal: INTERCHANGE_VERSION,
        format,
        writer: super::format::this_writer(),
        exported: rfc3339(super::now_ms()),
        next_seq,
    })
    .map_err(failed)
}

/// What the ledger keeps of an imported event, read from its CloudEvent.
fn ledger_entry_of(payload: &[u8]) -> Option<LedgerEntry> {
    #[derive(Deserialize)]
    struct Data {
        line: String,
        quantity: crate::Quantity,
    }
    #[derive(Deserialize)]
    struct View {
        time: String,
        #[serde(rename = "type")]
        event_type: String,
        data: Data,
    }
    let view: View = serde_json::from_slice(payload).ok()?;
    Some(LedgerEntry {
        at_ms: ms_of(&view.time)?,
        line: view.data.line,
        event_type: view.event_type,
        quantity: match view.data.quantity {
            crate::Quantity::Count(n) => n as f64,
            crate::Quantity::Measure(x) => x,
        },
    })
}

impl Journal {
    /// Writes the backlog (every event some sink still needs, with those
    /// sinks), the dead letters and every source's position in the
    /// interchange format.
    pub fn export_to(&self, out: &mut dyn Write) -> Result<InterchangeCounts, JournalError> {
        let mut counts = InterchangeCounts::default();
        let mut put = |line: Vec<u8>| -> Result<(), JournalError> {
            out.write_all(&line)
                .and_then(|_| out.write_all(b"\n"))
                .map_err(|e| failed(format!("writing the export: {e}")))
        };
        put(header_line(
            super::format::current(),
            Some(self.state().next_seq),
        )?)?;
        let (metas, sinks) = {
            let st = self.state();
            let metas: Vec<_> = st
                .chunks
                .iter()
                .filter(|(_, meta)| !meta.dropped)
                .map(|(first, meta)| (*first, *meta))
                .collect();
            let sinks: Vec<_> = st
                .sinks
                .iter()
                .map(|s| (s.name.clone(), s.slot, s.cursor, s.done.clone()))
                .collect();
            (metas, sinks)
        };
        for (first, meta) in metas {
            let Some(events) = self.load_chunk(first)? else {
                continue;
            };
            for (offset, event) in events.iter().enumerate() {
                let seq = first + offset as u64;
                let waiting: Vec<String> = sinks
                    .iter()
                    .filter(|(_, slot, cursor, done)| {
                        event.routes & (1u64 << slot) != 0 && seq >= *cursor && !done.contains(&seq)
                    })
                    .map(|(name, ..)| name.clone())
                    .collect();
                if waiting.is_empty() {
                    continue;
                }
                put(event_line(
                    seq,
                    EventClass::from_code(meta.class),
                    waiting,
                    event,
                )?)?;
                counts.events += 1;
            }
        }
        for (_, record) in self.dead_letter_records()? {
            put(dead_letter_line(&record)?)?;
            counts.dead_letters += 1;
        }
        for (source, plain) in self.source_cursors()? {
            put(position_line(&source, &plain)?)?;
            counts.positions += 1;
        }
        put(serde_json::to_vec(&EndRecord {
            record: "end".into(),
            events: counts.events,
            dead_letters: counts.dead_letters,
            positions: counts.positions,
        })
        .map_err(failed)?)?;
        counts.complete = true;
        Ok(counts)
    }

    /// Every source's stored position, decoded.
    pub(super) fn source_cursors(&self) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let mut out = Vec::new();
        for item in self.inner.tree.scan_prefix([layout::SOURCE_CURSOR]) {
            let (key, _) = item?;
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            if let Some(plain) = self.source_cursor(&name)? {
                out.push((name, plain));
            }
        }
        Ok(out)
    }

    /// Ids of every event pending or dead-lettered here.
    fn known_ids(&self) -> Result<HashSet<[u8; 16]>, JournalError> {
        let firsts: Vec<u64> = self.state().chunks.keys().copied().collect();
        let mut ids = HashSet::new();
        for first in firsts {
            for event in self.load_chunk(first)?.unwrap_or_default() {
                ids.insert(event.id);
            }
        }
        for (_, record) in self.dead_letter_records()? {
            ids.insert(record.event.id);
        }
        Ok(ids)
    }

    /// Reads an interchange file into this journal: events are appended (in
    /// the file's order, unknown sinks registered), dead letters stored as
    /// dead letters, positions replace the stored ones. Ids the journal
    /// holds are skipped and counted. Not atomic as a whole, but safe to
    /// run again: what a first run stored is skipped the second time.
    pub fn import_from(&self, input: &mut dyn BufRead) -> Result<InterchangeCounts, JournalError> {
        self.import_with(input, &HashMap::new())
    }

    /// [`Self::import_from`], with the sinks each event (by its sequence in
    /// the file) was already delivered to: those are left out of its routes.
    pub(super) fn import_with(
        &self,
        input: &mut dyn BufRead,
        delivered: &HashMap<u64, Vec<String>>,
    ) -> Result<InterchangeCounts, JournalError> {
        let mut counts = InterchangeCounts::default();
        let mut known = self.known_ids()?;
        let mut pending: Vec<(String, NewEvent)> = Vec::new();
        let mut line = String::new();
        let mut number = 0u64;
        let mut header_seen = false;
        let mut numbering_from = None;
        // Written once, after every event: a rollback spool holds one
        // position per commit, and a position stored after its events is
        // the safe order (a crash in between re-reads, same ids).
        let mut positions: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        loop {
            line.clear();
            let read = input
                .read_line(&mut line)
                .map_err(|e| failed(format!("reading line {}: {e}", number + 1)))?;
            if read == 0 {
                break;
            }
            number += 1;
            let text = line.trim_end();
            if text.is_empty() {
                continue;
            }
            if counts.complete {
                return Err(failed(format!(
                    "line {number}: a record after the end record"
                )));
            }
            let bad = |e: &dyn std::fmt::Display| failed(format!("line {number}: {e}"));
            let kind: Kind = serde_json::from_str(text).map_err(|e| bad(&e))?;
            if !header_seen {
                let header: Header = serde_json::from_str(text).map_err(|e| bad(&e))?;
                if kind.record != "header" {
                    return Err(bad(&"the first record must be the header"));
                }
                if header.plant_edge_journal > INTERCHANGE_VERSION {
                    return Err(bad(&format!(
                        "interchange version {} (written by {}); this build reads version {INTERCHANGE_VERSION} and older",
                        header.plant_edge_journal, header.writer
                    )));
                }
                header_seen = true;
                numbering_from = header.next_seq;
                continue;
            }
            match kind.record.as_str() {
                "event" => {
                    let record: EventRecord = serde_json::from_str(text).map_err(|e| bad(&e))?;
                    let payload = bytes_of(record.event, record.event_base64.as_deref(), "event")
                        .map_err(|e| bad(&e))?;
                    let class = class_of(&record.class).map_err(|e| bad(&e))?;
                    if !known.insert(*record.id.as_bytes()) {
                        counts.duplicates += 1;
                        continue;
                    }
                    for sink in &record.sinks {
                        self.register_sink(sink)?;
                    }
                    let mut sinks = record.sinks;
                    if let Some(done) = delivered.get(&record.seq) {
                        sinks.retain(|sink| !done.contains(sink));
                        counts.already_delivered += 1;
                    }
                    let routes = self.routes_for(&sinks)?;
                    let ledger = ledger_entry_of(&payload);
                    // Each event keeps its sequence where numbering allows
                    // (its `journalseq` stays what the ERP may have seen):
                    // the events before a gap are committed, and the
                    // numbering jumps over it.
                    let next = self.state().next_seq + pending.len() as u64;
                    if record.seq > next {
                        self.import_events(std::mem::take(&mut pending), &mut counts)?;
                        self.number_from(record.seq)?;
                    }
                    pending.push((
                        record.source,
                        NewEvent {
                            id: record.id,
                            class,
                            routes,
                            payload,
                            ledger,
                        },
                    ));
                    if pending.len() >= IMPORT_BATCH {
                        self.import_events(std::mem::take(&mut pending), &mut counts)?;
                    }
                }
                "dead_letter" => {
                    let record: DeadLetterLine = serde_json::from_str(text).map_err(|e| bad(&e))?;
                    let payload = bytes_of(record.event, record.event_base64.as_deref(), "event")
                        .map_err(|e| bad(&e))?;
                    let class = class_of(&record.class).map_err(|e| bad(&e))?;
                    self.import_events(std::mem::take(&mut pending), &mut counts)?;
                    if self.holds_dead_letter(&record.id, &record.sink)? {
                        counts.duplicates += 1;
                        continue;
                    }
                    self.register_sink(&record.sink)?;
                    let routes = self.routes_for(std::slice::from_ref(&record.sink))?;
                    let now = super::now_ms();
                    let stored = DeadLetterRecord {
                        seq: record.seq,
                        sink: record.sink,
                        reason: record.reason,
                        attempts: record.attempts,
                        dead_ms: ms_of(&record.dead_at).unwrap_or(now),
                        appended_ms: ms_of(&record.appended_at).unwrap_or(now),
                        class: class.code(),
                        event: StoredEvent {
                            id: *record.id.as_bytes(),
                            routes: routes.0,
                            source: record.source,
                            payload,
                        },
                    };
                    self.store_dead_letter(stored)?;
                    counts.dead_letters += 1;
                }
                "position" => {
                    let record: PositionRecord = serde_json::from_str(text).map_err(|e| bad(&e))?;
                    let plain = bytes_of(record.state, record.state_base64.as_deref(), "state")
                        .map_err(|e| bad(&e))?;
                    positions.insert(record.source, plain);
                    counts.positions += 1;
                }
                "end" => {
                    let end: EndRecord = serde_json::from_str(text).map_err(|e| bad(&e))?;
                    let _ = (end.events, end.dead_letters, end.positions, end.record);
                    counts.complete = true;
                }
                // Applied before the import (a rollback spool's deliveries).
                "delivered" => {}
                "header" => return Err(bad(&"a second header")),
                other => return Err(bad(&format!("unknown record kind {other:?}"))),
            }
        }
        self.import_events(pending, &mut counts)?;
        self.store_positions(&positions)?;
        if !header_seen {
            return Err(failed("empty file: no header record"));
        }
        if let Some(next) = numbering_from {
            self.number_from(next)?;
        }
        self.settle_cursors()?;
        Ok(counts)
    }

    /// Appends imported events, one request per run of one source.
    fn import_events(
        &self,
        events: Vec<(String, NewEvent)>,
        counts: &mut InterchangeCounts,
    ) -> Result<(), JournalError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut requests: Vec<AppendRequest> = Vec::new();
        for (source, event) in events {
            match requests.last_mut() {
                Some(last) if last.source == source => last.events.push(event),
                _ => requests.push(AppendRequest {
                    source,
                    events: vec![event],
                    cursor: None,
                }),
            }
        }
        for outcome in self.commit_all(requests)? {
            counts.events += outcome.appended() as u64;
            counts.duplicates += outcome.duplicates().len() as u64;
        }
        Ok(())
    }

    fn holds_dead_letter(&self, id: &Uuid, sink: &str) -> Result<bool, JournalError> {
        Ok(self
            .dead_letter_records()?
            .iter()
            .any(|(_, r)| r.event.id == *id.as_bytes() && r.sink == sink))
    }

    fn store_dead_letter(&self, record: DeadLetterRecord) -> Result<(), JournalError> {
        self.check_poisoned()?;
        let _commit = self.commit_guard();
        let mut batch = sled::Batch::default();
        {
            let mut st = self.state();
            Self::put_dead_letter(&mut st, &mut batch, record)?;
            let counters = Self::counters_value(&st)?;
            batch.insert(layout::COUNTERS, counters);
        }
        self.inner.tree.apply_batch(batch)?;
        self.sync()
    }

    /// Moves each sink's cursor over the sequences that hold nothing for
    /// it (gaps, events routed elsewhere) up to its first pending event,
    /// so that its backlog counts what it still has to send.
    fn settle_cursors(&self) -> Result<(), JournalError> {
        self.check_poisoned()?;
        let _commit = self.commit_guard();
        let (sinks, firsts, next) = {
            let st = self.state();
            let sinks: Vec<(usize, u8, u64)> = st
                .sinks
                .iter()
                .enumerate()
                .filter(|(_, s)| s.done.is_empty())
                .map(|(i, s)| (i, s.slot, s.cursor))
                .collect();
            let firsts: Vec<(u64, u64, bool)> = st
                .chunks
                .iter()
                .map(|(first, meta)| (*first, meta.last, meta.dropped))
                .collect();
            (sinks, firsts, st.next_seq)
        };
        let mut moved = Vec::new();
        for (index, slot, cursor) in sinks {
            let mut settled = cursor;
            'chunks: for &(first, last, dropped) in &firsts {
                if last < settled {
                    continue;
                }
                if dropped {
                    settled = last + 1;
                    continue;
                }
                let events = self.load_chunk(first)?.unwrap_or_default();
                settled = settled.max(first);
                for (offset, event) in events.iter().enumerate() {
                    let seq = first + offset as u64;
                    if seq < settled {
                        continue;
                    }
                    if event.routes & (1u64 << slot) != 0 {
                        break 'chunks;
                    }
                    settled = seq + 1;
                }
            }
            if firsts.iter().all(|&(_, last, _)| last < settled) {
                settled = next;
            }
            if settled > cursor {
                moved.push((index, slot, settled));
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        {
            let mut st = self.state();
            for (index, slot, settled) in moved {
                let sink = &mut st.sinks[index];
                sink.cursor = settled;
                sink.read_upto = sink.read_upto.max(settled);
                batch.insert(&[layout::SINK_CURSOR, slot], &settled.to_be_bytes());
            }
        }
        self.inner.tree.apply_batch(batch)?;
        self.sync()
    }

    /// Makes the next sequence at least `seq` (the ones skipped are a gap
    /// every sink passes over), durably.
    fn number_from(&self, seq: u64) -> Result<(), JournalError> {
        self.check_poisoned()?;
        let _commit = self.commit_guard();
        {
            let mut st = self.state();
            if st.next_seq >= seq {
                return Ok(());
            }
            st.next_seq = seq;
        }
        self.inner
            .tree
            .insert(layout::NEXT_SEQ, &seq.to_be_bytes())?;
        self.sync()?;
        self.publish_durable(seq);
        Ok(())
    }

    /// Replaces the sources' stored positions, durably, in one batch.
    fn store_positions(&self, positions: &BTreeMap<String, Vec<u8>>) -> Result<(), JournalError> {
        if positions.is_empty() {
            return Ok(());
        }
        self.check_poisoned()?;
        let _commit = self.commit_guard();
        let mut batch = sled::Batch::default();
        for (source, plain) in positions {
            batch.insert(
                layout::named_key(layout::SOURCE_CURSOR, source),
                layout::encode_cursor(plain),
            );
        }
        self.inner.tree.apply_batch(batch)?;
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u128, source: &str) -> StoredEvent {
        StoredEvent {
            id: Uuid::from_u128(id).into_bytes(),
            routes: 0,
            source: source.into(),
            payload: format!("{{\"specversion\":\"1.0\",\"n\":{id}}}").into_bytes(),
        }
    }

    #[test]
    fn bytes_that_are_not_one_line_of_json_travel_as_base64_and_come_back_exactly() {
        for payload in [
            &b"{\"a\":\n1}"[..],
            b"\xff\x00binary",
            b"{\"specversion\":\"1.0\"}",
        ] {
            let mut stored = event(1, "s");
            stored.payload = payload.to_vec();
            let line = event_line(0, EventClass::Business, vec![], &stored).expect("line");
            assert!(!line.contains(&b'\n'));
            let record: EventRecord = serde_json::from_slice(&line).expect("parses");
            let back =
                bytes_of(record.event, record.event_base64.as_deref(), "event").expect("bytes");
            assert_eq!(back, payload);
        }
    }
}
