//! Looking into a journal: stats, listing, export, dead letters, verify.
//! These serve the `plant-edge journal ...` commands on a stopped agent.

use std::collections::BTreeSet;

use serde::Serialize;
use uuid::Uuid;

use super::layout::{self, ChunkMeta, DeadLetterRecord};
use super::sinks::PendingEvent;
use super::{commit::ChunkPlan, decode_err, now_ms, Counters, Journal, JournalError};
use crate::EventClass;

/// Per-sink position.
#[derive(Clone, Debug, Serialize)]
pub struct SinkStats {
    /// Sink name.
    pub name: String,
    /// Every sequence below is done for it.
    pub cursor: u64,
    /// Sequences between its cursor and the journal end.
    pub backlog: u64,
}

/// A journal's figures, for `journal stats`, metrics and the demo.
#[derive(Clone, Debug, Serialize)]
pub struct JournalStats {
    /// Next sequence to be assigned.
    pub next_seq: u64,
    /// Lowest sink cursor.
    pub floor: u64,
    /// Events stored and not yet done by every sink (dropped excluded).
    pub pending_events: u64,
    /// Their bytes, as charged against `max_bytes`.
    pub pending_bytes: u64,
    /// Pending plus dead-letter bytes.
    pub used_bytes: u64,
    /// The bound.
    pub max_bytes: u64,
    /// Age of the oldest pending event, ms.
    pub oldest_pending_age_ms: Option<u64>,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Their bytes.
    pub dead_letter_bytes: u64,
    /// Ids in the dedup window.
    pub dedup_ids: usize,
    /// Heap bytes the dedup window holds (bounded by
    /// `dedup_window_count`, under 100 bytes per id).
    pub dedup_bytes: usize,
    /// Bytes of the ledger's records (bounded by `ledger_max_bytes`).
    pub ledger_bytes: u64,
    /// Business appends waiting for space right now.
    pub full: bool,
    /// The filesystem is below `min_free_disk` (appends held for it).
    pub disk_low: bool,
    /// Free bytes on the journal's filesystem.
    pub disk_free_bytes: Option<u64>,
    /// Sinks and their cursors.
    pub sinks: Vec<SinkStats>,
    /// Cumulative counters.
    pub counters: Counters,
}

/// One event, as listed by `journal list`.
#[derive(Clone, Debug, Serialize)]
pub struct EventSummary {
    /// Journal sequence.
    pub seq: u64,
    /// Event id.
    pub id: Uuid,
    /// Source name.
    pub source: String,
    /// CloudEvents type, read from the payload.
    pub event_type: String,
    /// Business or telemetry.
    pub class: EventClass,
    /// Append time, RFC 3339.
    pub appended: String,
    /// Payload size.
    pub bytes: usize,
}

/// A dead letter, as listed and exported.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    /// Dead-letter number (for requeue and purge).
    pub number: u64,
    /// The journal sequence it had.
    pub seq: u64,
    /// Event id.
    pub id: Uuid,
    /// Source name.
    pub source: String,
    /// The sink that rejected it (or for which it expired).
    pub sink: String,
    /// Why.
    pub reason: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// When it became a dead letter, RFC 3339.
    pub dead_at: String,
    /// The CloudEvents JSON.
    #[serde(skip)]
    pub payload: Vec<u8>,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Chunks checked.
    pub chunks: u64,
    /// Pending events decoded.
    pub events: u64,
    /// Dead letters decoded.
    pub dead_letters: u64,
    /// Everything wrong, one line each; empty means healthy.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// No problems found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn rfc3339(ms: u64) -> String {
    crate::event::rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

fn event_type_of(payload: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct TypeOnly {
        #[serde(rename = "type")]
        event_type: String,
    }
    serde_json::from_slice::<TypeOnly>(payload)
        .map(|t| t.event_type)
        .unwrap_or_else(|_| "?".to_owned())
}

impl Journal {
    /// Current figures.
    pub fn stats(&self) -> JournalStats {
        let st = self.state();
        let floor = st.floor();
        let live = st
            .chunks
            .iter()
            .filter(|(_, m)| !m.dropped && m.last >= floor);
        // A chunk straddling the floor is only partly pending.
        let pending_events = live
            .clone()
            .map(|(f, m)| m.last + 1 - (*f).max(floor))
            .sum();
        // Delivered chunks wait up to a second for collection (acks are
        // saved with the next commit): they are used space, not pending.
        let pending_bytes = live.clone().map(|(_, m)| m.bytes).sum();
        let oldest = live.map(|(_, m)| m.appended_ms).min();
        JournalStats {
            next_seq: st.next_seq,
            floor,
            pending_events,
            pending_bytes,
            used_bytes: st.used_bytes(),
            max_bytes: self.inner.config.max_bytes,
            oldest_pending_age_ms: oldest.map(|t| now_ms().saturating_sub(t)),
            dead_letters: st.dead_letter_count,
            dead_letter_bytes: st.dead_letter_bytes,
            dedup_ids: st.dedup.len(),
            dedup_bytes: st.dedup.memory_bytes(),
            ledger_bytes: st.ledger_bytes,
            full: st.full,
            disk_low: st.disk_low,
            disk_free_bytes: self.disk_free(),
            sinks: st
                .sinks
                .iter()
                .map(|s| SinkStats {
                    name: s.name.clone(),
                    cursor: s.cursor,
                    backlog: st.next_seq - s.cursor,
                })
                .collect(),
            counters: st.counters,
        }
    }

    /// Calls `f` for every stored event from `from` on, in order, until it
    /// returns false. Pass [`JournalStats::floor`] for pending events only.
    pub fn scan_events(
        &self,
        from: u64,
        mut f: impl FnMut(PendingEvent) -> bool,
    ) -> Result<(), JournalError> {
        let metas: Vec<(u64, ChunkMeta)> = {
            let st = self.state();
            st.chunks.iter().map(|(k, m)| (*k, *m)).collect()
        };
        for (first, meta) in metas {
            if meta.last < from || meta.dropped {
                continue;
            }
            let Some(events) = self.load_chunk(first)? else {
                continue;
            };
            for (offset, event) in events.into_iter().enumerate() {
                let seq = first + offset as u64;
                if seq < from {
                    continue;
                }
                let pending = PendingEvent {
                    seq,
                    id: Uuid::from_bytes(event.id),
                    source: event.source,
                    class: meta.class(),
                    appended_ms: meta.appended_ms,
                    payload: event.payload,
                };
                if !f(pending) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Up to `limit` pending events from `from` on (never below the floor:
    /// what every sink is done with is not pending, even if not yet collected).
    pub fn list(&self, from: u64, limit: usize) -> Result<Vec<EventSummary>, JournalError> {
        let mut out = Vec::new();
        let from = from.max(self.state().floor());
        self.scan_events(from, |e| {
            out.push(EventSummary {
                seq: e.seq,
                id: e.id,
                event_type: event_type_of(&e.payload),
                source: e.source,
                class: e.class,
                appended: rfc3339(e.appended_ms),
                bytes: e.payload.len(),
            });
            out.len() < limit
        })?;
        Ok(out)
    }

    /// A stored event by id or by sequence.
    pub fn find(
        &self,
        id: Option<Uuid>,
        seq: Option<u64>,
    ) -> Result<Option<PendingEvent>, JournalError> {
        let mut found = None;
        self.scan_events(seq.unwrap_or(0), |e| {
            if Some(e.id) == id || Some(e.seq) == seq {
                found = Some(e);
                return false;
            }
            true
        })?;
        Ok(found)
    }

    pub(super) fn dead_letter_records(&self) -> Result<Vec<(u64, DeadLetterRecord)>, JournalError> {
        let mut out = Vec::new();
        for item in self.inner.tree.scan_prefix([layout::DEAD_LETTER]) {
            let (key, value) = item?;
            let number = layout::key_seq(&key)
                .ok_or_else(|| decode_err("dead letter", &key, "short key"))?;
            let record = layout::decode(&value).map_err(|e| decode_err("dead letter", &key, e))?;
            out.push((number, record));
        }
        Ok(out)
    }

    /// All dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, JournalError> {
        Ok(self
            .dead_letter_records()?
            .into_iter()
            .map(|(number, r)| DeadLetter {
                number,
                seq: r.seq,
                id: Uuid::from_bytes(r.event.id),
                source: r.event.source,
                sink: r.sink,
                reason: r.reason,
                attempts: r.attempts,
                dead_at: rfc3339(r.dead_ms),
                payload: r.event.payload,
            })
            .collect())
    }

    /// Re-appends dead letters (all, or the given numbers) for the sink that
    /// rejected them, with their original id; returns how many.
    pub fn requeue_dead_letters(&self, numbers: Option<&[u64]>) -> Result<u64, JournalError> {
        self.check_poisoned()?;
        let wanted: Option<BTreeSet<u64>> = numbers.map(|n| n.iter().copied().collect());
        let records: Vec<(u64, DeadLetterRecord)> = self
            .dead_letter_records()?
            .into_iter()
            .filter(|(n, _)| wanted.as_ref().is_none_or(|w| w.contains(n)))
            .collect();
        if let Some(w) = &wanted {
            if let Some(missing) = w.iter().find(|n| !records.iter().any(|(r, _)| r == *n)) {
                return Err(JournalError::NoDeadLetter(*missing));
            }
        }
        if records.is_empty() {
            return Ok(0);
        }
        let _commit = self.commit_guard();
        let mut st = self.state();
        let mut plan = ChunkPlan::new(st.next_seq, now_ms());
        let mut batch = sled::Batch::default();
        let mut requeued = 0;
        for (number, mut record) in records {
            let index = st.sink_index(&record.sink)?;
            record.event.routes = 1u64 << st.sinks[index].slot;
            st.dead_letter_count -= 1;
            st.dead_letter_bytes -= record.event.charge();
            batch.remove(&layout::seq_key(layout::DEAD_LETTER, number));
            plan.push(EventClass::from_code(record.class), record.event);
            requeued += 1;
        }
        let next_seq = plan.write(&mut st, &mut batch)?;
        st.counters.requeued += requeued;
        batch.insert(layout::NEXT_SEQ, &next_seq.to_be_bytes());
        batch.insert(layout::COUNTERS, Self::counters_value(&st)?);
        drop(st);
        self.inner.tree.apply_batch(batch)?;
        self.sync()?;
        self.publish_durable(next_seq);
        Ok(requeued)
    }

    /// Deletes dead letters (all, or the given numbers); returns how many.
    pub fn purge_dead_letters(&self, numbers: Option<&[u64]>) -> Result<u64, JournalError> {
        self.check_poisoned()?;
        let _commit = self.commit_guard();
        let records = self.dead_letter_records()?;
        if let Some(numbers) = numbers {
            if let Some(missing) = numbers
                .iter()
                .find(|n| !records.iter().any(|(r, _)| r == *n))
            {
                return Err(JournalError::NoDeadLetter(*missing));
            }
        }
        let mut st = self.state();
        let mut batch = sled::Batch::default();
        let mut purged = 0;
        for (number, record) in records {
            if numbers.is_some_and(|n| !n.contains(&number)) {
                continue;
            }
            batch.remove(&layout::seq_key(layout::DEAD_LETTER, number));
            st.dead_letter_count -= 1;
            st.dead_letter_bytes -= record.event.charge();
            purged += 1;
        }
        st.counters.purged += purged;
        batch.insert(layout::COUNTERS, Self::counters_value(&st)?);
        drop(st);
        self.inner.tree.apply_batch(batch)?;
        self.sync()?;
        tracing::warn!(purged, "dead letters purged");
        self.inner.space_freed.notify_one();
        Ok(purged)
    }

    /// Checks the journal: chunk sequences contiguous up to the end, every
    /// chunk and dead letter decodes, metas match chunks, cursors in range.
    /// Reports problems; never panics on bad data.
    pub fn verify(&self) -> VerifyReport {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.verify_inner())) {
            Ok(report) => report,
            Err(panic) => VerifyReport {
                problems: vec![format!("verify aborted: {}", super::panic_message(panic))],
                ..VerifyReport::default()
            },
        }
    }

    fn verify_inner(&self) -> VerifyReport {
        let mut report = VerifyReport::default();
        let (metas, next_seq, sinks, floor) = {
            let st = self.state();
            (
                st.chunks.iter().map(|(k, m)| (*k, *m)).collect::<Vec<_>>(),
                st.next_seq,
                st.sinks
                    .iter()
                    .map(|s| (s.name.clone(), s.cursor))
                    .collect::<Vec<_>>(),
                st.floor(),
            )
        };
        let mut expected: Option<u64> = None;
        for (first, meta) in &metas {
            report.chunks += 1;
            if let Some(expect) = expected {
                if *first != expect {
                    report.problems.push(format!(
                        "sequence gap: chunk starts at {first}, expected {expect}"
                    ));
                }
            }
            expected = Some(meta.last + 1);
            if meta.last < *first {
                report
                    .problems
                    .push(format!("chunk {first}: last {} before first", meta.last));
                continue;
            }
            if meta.dropped {
                continue;
            }
            match self.load_chunk(*first) {
                Ok(Some(events)) => {
                    if events.len() as u64 != meta.count(*first) {
                        report.problems.push(format!(
                            "chunk {first}: holds {} events, meta says {}",
                            events.len(),
                            meta.count(*first)
                        ));
                    }
                    report.events += events.len() as u64;
                }
                Ok(None) => report
                    .problems
                    .push(format!("chunk {first}: meta without events")),
                Err(e) => report.problems.push(format!("chunk {first}: {e}")),
            }
        }
        if let Some(end) = expected {
            if end != next_seq {
                report.problems.push(format!(
                    "last chunk ends at {}, next sequence is {next_seq}",
                    end - 1
                ));
            }
        } else if floor < next_seq && !sinks.is_empty() {
            report.problems.push(format!(
                "no chunks stored but sequences {floor}..{next_seq} are not done by every sink"
            ));
        }
        for item in self.inner.tree.scan_prefix([layout::CHUNK]) {
            match item {
                Ok((key, _)) => {
                    if let Some(first) = layout::key_seq(&key) {
                        if !metas.iter().any(|(f, _)| *f == first) {
                            report
                                .problems
                                .push(format!("chunk {first}: events without meta"));
                        }
                    }
                }
                Err(e) => report.problems.push(format!("scanning chunks: {e}")),
            }
        }
        for (name, cursor) in &sinks {
            if *cursor > next_seq {
                report.problems.push(format!(
                    "sink {name}: cursor {cursor} beyond end {next_seq}"
                ));
            }
            if let Some((first, _)) = metas.first() {
                if cursor < first {
                    report.problems.push(format!(
                        "sink {name}: cursor {cursor} below oldest stored sequence {first} (events lost)"
                    ));
                }
            }
        }
        for item in self.inner.tree.scan_prefix([layout::DEAD_LETTER]) {
            match item {
                Ok((key, value)) => match layout::decode::<DeadLetterRecord>(&value) {
                    Ok(_) => report.dead_letters += 1,
                    Err(e) => report
                        .problems
                        .push(format!("{}", decode_err("dead letter", &key, e))),
                },
                Err(e) => report.problems.push(format!("scanning dead letters: {e}")),
            }
        }
        report
    }
}
