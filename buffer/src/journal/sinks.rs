//! The sink side: reading in order, acknowledging, rejecting, expiring, and
//! collecting chunks every sink is done with.

use std::io::ErrorKind;
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::layout::{self, ChunkMeta, DeadLetterRecord, StoredEvent};
use super::{decode_err, encode_err, now_ms, segments, Journal, JournalError, State};
use crate::EventClass;

/// An event handed to a sink: its journal sequence and the bytes to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEvent {
    /// Journal sequence (acknowledge with this).
    pub seq: u64,
    /// Deterministic id (the ERP's idempotency key).
    pub id: Uuid,
    /// Source name.
    pub source: String,
    /// Business or telemetry.
    pub class: EventClass,
    /// When it was appended (ms since the epoch).
    pub appended_ms: u64,
    /// CloudEvents JSON.
    pub payload: Vec<u8>,
}

/// Reason recorded for events whose time-to-live ran out.
pub const EXPIRED: &str = "expired";
/// Reason recorded for events whose sink was removed from the configuration.
pub const SINK_REMOVED: &str = "sink-removed";

/// Delivered chunks that make an ack collect at once instead of leaving
/// it to the next commit.
const COLLECT_AT_ONCE: usize = 256;

impl Journal {
    pub(super) fn load_chunk(&self, first: u64) -> Result<Option<Vec<StoredEvent>>, JournalError> {
        let key = layout::seq_key(layout::CHUNK, first);
        let Some(value) = self.inner.tree.get(key)? else {
            return Ok(None);
        };
        let Some(pointer) = segments::Pointer::decode(&value) else {
            return layout::decode_chunk(&value)
                .map(Some)
                .map_err(|e| decode_err("chunk", &key, e));
        };
        let path = || segments::segment_path(&self.inner.config.path, pointer.segment);
        let bytes = match self.inner.segment_reader.read(&pointer) {
            Ok(Some(bytes)) => bytes,
            // Delivered and its segment deleted between reading the
            // pointer and the file: gone, like a chunk key already removed.
            Ok(None) if self.inner.tree.get(key)?.is_none() => return Ok(None),
            Ok(None) => {
                return Err(decode_err(
                    "chunk",
                    &key,
                    format!("segment file {} is missing", path().display()),
                ))
            }
            // Damage (a CRC mismatch, a file shorter than the pointer says)
            // is quarantined by the reader; anything else may pass and the
            // bytes are still there, so it is an error to retry.
            Err(e) if matches!(e.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof) => {
                return Err(decode_err("chunk", &key, e))
            }
            Err(error) => {
                return Err(JournalError::SegmentRead {
                    path: path(),
                    error,
                })
            }
        };
        layout::decode_chunk(&bytes)
            .map(Some)
            .map_err(|e| decode_err("chunk", &key, e))
    }

    /// Chunk metas overlapping `[from, to)`, in order.
    fn metas_between(st: &State, from: u64, to: u64) -> Vec<(u64, ChunkMeta)> {
        let mut metas = Vec::new();
        if let Some((first, meta)) = st.chunks.range(..=from).next_back() {
            if meta.last >= from {
                metas.push((*first, *meta));
            }
        }
        if from.saturating_add(1) < to {
            metas.extend(
                st.chunks
                    .range(from.saturating_add(1)..to)
                    .map(|(f, m)| (*f, *m)),
            );
        }
        metas
    }

    /// Hands `sink` its next events in sequence order (at most `max`),
    /// skipping what is not routed to it. Returns an empty batch only when
    /// it is caught up; wait on [`Journal::durable_watch`] then.
    pub fn read_batch(&self, sink: &str, max: usize) -> Result<Vec<PendingEvent>, JournalError> {
        loop {
            let (batch, caught_up) = self.read_window(sink, max.max(1))?;
            if !batch.is_empty() || caught_up {
                return Ok(batch);
            }
        }
    }

    /// One window of `max` sequences; also says whether it reached the end.
    fn read_window(
        &self,
        sink: &str,
        max: usize,
    ) -> Result<(Vec<PendingEvent>, bool), JournalError> {
        let (index, slot, from, to, metas) = {
            let st = self.state();
            let index = st.sink_index(sink)?;
            let s = &st.sinks[index];
            let from = s.read_upto;
            let to = st.durable_seq.min(from.saturating_add(max as u64));
            (index, s.slot, from, to, Self::metas_between(&st, from, to))
        };
        if from >= to {
            return Ok((Vec::new(), true));
        }
        let mut out = Vec::new();
        let mut quarantine = Vec::new();
        for (first, meta) in &metas {
            if meta.dropped {
                continue;
            }
            let events = match self.load_chunk(*first) {
                Ok(Some(events)) => events,
                // Dropped as telemetry between our look and our read.
                Ok(None) => continue,
                Err(e @ JournalError::Decode { .. }) => {
                    quarantine.push((*first, e));
                    continue;
                }
                // sled or the file system failed to read: nothing is known
                // to be damaged, so nothing is quarantined; the sink retries.
                Err(e) => return Err(e),
            };
            let done = {
                let st = self.state();
                let s = &st.sinks[index];
                let lo = from.max(*first);
                let hi = to.min(meta.last + 1);
                s.done.range(lo..hi).copied().collect::<Vec<_>>()
            };
            for (offset, event) in events.into_iter().enumerate() {
                let seq = first + offset as u64;
                if seq < from || seq >= to || done.binary_search(&seq).is_ok() {
                    continue;
                }
                if event.routes & (1u64 << slot) == 0 {
                    continue;
                }
                out.push(PendingEvent {
                    seq,
                    id: Uuid::from_bytes(event.id),
                    source: event.source,
                    class: meta.class(),
                    appended_ms: meta.appended_ms,
                    payload: crate::event::with_journal_sequence(event.payload, seq),
                });
            }
        }
        for (first, error) in quarantine {
            self.quarantine_chunk(first, &error)?;
        }
        let mut st = self.state();
        let index = st.sink_index(sink).unwrap_or(index);
        let s = &mut st.sinks[index];
        if s.read_upto != from {
            // Rewound meanwhile: the next read starts over from the cursor.
            return Ok((out, false));
        }
        let handed: std::collections::HashSet<u64> = out.iter().map(|e| e.seq).collect();
        for seq in from..to {
            if !handed.contains(&seq) {
                s.done.insert(seq);
            }
        }
        s.read_upto = to;
        let caught_up = to >= st.durable_seq;
        self.advance_and_persist(&mut st, index)?;
        Ok((out, caught_up))
    }

    /// A chunk that no longer decodes is moved to the `q` family with its
    /// raw bytes (for recovery by hand), counted and logged, so one bad
    /// value cannot stall every sink forever.
    fn quarantine_chunk(&self, first: u64, error: &JournalError) -> Result<(), JournalError> {
        let key = layout::seq_key(layout::CHUNK, first);
        let Some(mut raw) = self.inner.tree.get(key)?.map(|v| v.to_vec()) else {
            return Ok(());
        };
        // Keep the segment's bytes, not just the pointer: the segment goes
        // once its other chunks are delivered.
        if let Some(pointer) = segments::Pointer::decode(&raw) {
            if let Ok(Some(bytes)) = self.inner.segment_reader.read_raw(&pointer) {
                raw = bytes;
            }
        }
        let mut st = self.state();
        let mut batch = sled::Batch::default();
        batch.insert(&layout::seq_key(layout::QUARANTINE, first), raw);
        batch.remove(&key);
        if let Some(meta) = st.chunks.get_mut(&first) {
            meta.dropped = true;
            let segment = std::mem::replace(&mut meta.segment, layout::NO_SEGMENT);
            let bytes = meta.bytes;
            meta.bytes = 0;
            if let Ok(encoded) = layout::encode_meta(meta) {
                batch.insert(&layout::seq_key(layout::CHUNK_META, first), encoded);
            }
            st.pending_bytes -= bytes;
            st.counters.quarantined += meta_count(&st, first);
            st.segments.released(segment);
        }
        self.inner.tree.apply_batch(batch)?;
        tracing::error!(
            first_seq = first,
            error = %error,
            "journal chunk does not decode: quarantined under key family 'q' for manual recovery"
        );
        Ok(())
    }

    /// Marks `seqs` delivered for `sink`; the cursor advances over the
    /// contiguous done prefix only.
    pub fn ack(&self, sink: &str, seqs: &[u64]) -> Result<(), JournalError> {
        let mut st = self.state();
        let index = st.sink_index(sink)?;
        let s = &mut st.sinks[index];
        let mut delivered = Vec::new();
        for &seq in seqs {
            if seq >= s.cursor && seq < s.read_upto && s.done.insert(seq) {
                delivered.push(seq);
            }
        }
        st.counters.delivered += delivered.len() as u64;
        // After a rollback the previous version need not send these again.
        self.spool_delivered(sink, delivered);
        self.advance_and_persist(&mut st, index)
    }

    /// Moves one event to the dead letters for `sink`, with the reason.
    /// The event counts as done for the sink only once its dead letter is
    /// stored; an event whose chunk is already gone (telemetry dropped for
    /// space, counted then; or quarantined) is done at once, so a
    /// rejection can never stall the sink's cursor.
    pub fn reject(
        &self,
        sink: &str,
        seq: u64,
        reason: &str,
        attempts: u32,
    ) -> Result<(), JournalError> {
        let found = {
            let st = self.state();
            let index = st.sink_index(sink)?;
            let s = &st.sinks[index];
            if seq < s.cursor || s.done.contains(&seq) {
                return Ok(());
            }
            Self::metas_between(&st, seq, seq + 1).first().copied()
        };
        let stored = match found {
            Some((first, meta)) if !meta.dropped => self
                .load_chunk(first)?
                .and_then(|events| events.into_iter().nth((seq - first) as usize))
                .map(|event| (meta, event)),
            _ => None,
        };
        let mut st = self.state();
        let index = st.sink_index(sink)?;
        let Some((meta, event)) = stored else {
            tracing::warn!(
                sink,
                seq,
                reason,
                "rejected event is no longer in the journal (dropped or quarantined, counted then)"
            );
            st.sinks[index].done.insert(seq);
            return self.advance_and_persist(&mut st, index);
        };
        if st.sinks[index].done.contains(&seq) {
            return Ok(());
        }
        let record = DeadLetterRecord {
            seq,
            sink: sink.to_owned(),
            reason: reason.to_owned(),
            attempts,
            dead_ms: now_ms(),
            appended_ms: meta.appended_ms,
            class: meta.class,
            event,
        };
        // Nothing in memory changes unless the dead letter is on disk:
        // otherwise the event would count as done with no dead letter kept.
        let saved = (
            st.next_dead_letter,
            st.dead_letter_count,
            st.dead_letter_bytes,
            st.counters.rejected,
        );
        let restore = |st: &mut State| {
            (
                st.next_dead_letter,
                st.dead_letter_count,
                st.dead_letter_bytes,
                st.counters.rejected,
            ) = saved;
        };
        let mut batch = sled::Batch::default();
        let written = (|| {
            Self::put_dead_letter(&mut st, &mut batch, record)?;
            st.counters.rejected += 1;
            let s = &st.sinks[index];
            let mut cursor = s.cursor;
            while cursor == seq || s.done.contains(&cursor) {
                cursor += 1;
            }
            batch.insert(&[layout::SINK_CURSOR, s.slot], &cursor.to_be_bytes());
            batch.insert(layout::COUNTERS, Self::counters_value(&st)?);
            self.inner.tree.apply_batch(batch)?;
            Ok::<(), JournalError>(())
        })();
        if let Err(e) = written {
            restore(&mut st);
            return Err(e);
        }
        st.sinks[index].done.insert(seq);
        tracing::warn!(
            sink,
            seq,
            reason,
            attempts,
            "event rejected: moved to dead letters"
        );
        self.advance_and_persist(&mut st, index)
    }

    pub(super) fn put_dead_letter(
        st: &mut State,
        batch: &mut sled::Batch,
        record: DeadLetterRecord,
    ) -> Result<(), JournalError> {
        let number = st.next_dead_letter;
        st.next_dead_letter += 1;
        st.dead_letter_count += 1;
        st.dead_letter_bytes += record.event.charge();
        let bytes = layout::encode(&record).map_err(|e| encode_err("dead letter", e))?;
        batch.insert(&layout::seq_key(layout::DEAD_LETTER, number), bytes);
        batch.insert(layout::NEXT_DEAD_LETTER, &st.next_dead_letter.to_be_bytes());
        Ok(())
    }

    /// Forgets what is in flight for `sink`: the next read starts again at
    /// its cursor (skipping what was acknowledged since). Used after a sink
    /// reconnects, so unacknowledged events are re-sent from the journal.
    pub fn rewind(&self, sink: &str) -> Result<(), JournalError> {
        let mut st = self.state();
        let index = st.sink_index(sink)?;
        let s = &mut st.sinks[index];
        s.read_upto = s.cursor;
        Ok(())
    }

    fn advance_and_persist(&self, st: &mut State, index: usize) -> Result<(), JournalError> {
        self.advance_and_persist_with(st, index, None)
    }

    fn advance_and_persist_with(
        &self,
        st: &mut State,
        index: usize,
        batch: Option<sled::Batch>,
    ) -> Result<(), JournalError> {
        let s = &mut st.sinks[index];
        let before = s.cursor;
        while s.done.remove(&s.cursor) {
            s.cursor += 1;
        }
        s.read_upto = s.read_upto.max(s.cursor);
        let moved = s.cursor != before;
        let cursor_key = [layout::SINK_CURSOR, s.slot];
        let cursor = s.cursor.to_be_bytes();
        match batch {
            // A dead letter and the cursor over it must land together.
            Some(mut batch) => {
                batch.insert(&cursor_key, &cursor);
                batch.insert(layout::COUNTERS, Self::counters_value(st)?);
                self.inner.tree.apply_batch(batch)?;
            }
            // A plain ack writes nothing yet: the cursor and the chunks it
            // frees go into the next commit's batch, or the writer's batch
            // within a second (`save_acks`). Every sled batch writes and
            // syncs two I/O buffers of its own (a 4 KiB flash page each),
            // and acks come as often as commits. A cursor lost to a power
            // cut only resends events with their ids, as a cursor written
            // but not yet synced always could.
            None if moved => {
                st.acks_unsaved = true;
                self.inner.gc_pending.store(true, Ordering::SeqCst);
                if st.full {
                    // Held appends may fit once the commit collects.
                    self.inner.space_freed.notify_one();
                }
            }
            None => {}
        }
        // Garbage waits for a commit only while it is small: a drain with
        // no commits behind it (sources idle, a tool, no writer) collects
        // as it goes, so no collection ever grows into one huge batch.
        let floor = st.floor();
        let collectable = st
            .chunks
            .values()
            .take(COLLECT_AT_ONCE)
            .take_while(|meta| meta.last < floor)
            .count();
        if moved && st.acks_unsaved && collectable < COLLECT_AT_ONCE {
            return Ok(());
        }
        if moved {
            // GC must not interleave with a commit's unapplied batch (which
            // may rewrite a telemetry tombstone); if a commit is running it
            // collects at its end instead.
            match self.inner.commit_lock.try_lock() {
                Ok(_commit) => self.collect_garbage(st)?,
                Err(_) => self.inner.gc_pending.store(true, Ordering::SeqCst),
            }
        }
        Ok(())
    }

    /// Writes unsaved acks and collects delivered chunks in one batch
    /// (not synced: sled's flusher writes it within a second, a commit at
    /// once). The writer calls it every second while acks are unsaved.
    pub fn save_acks(&self) -> Result<(), JournalError> {
        self.check_poisoned()?;
        let _commit = self.commit_guard();
        self.save_acks_locked()
    }

    /// [`Self::save_acks`] for a caller holding the commit lock.
    pub(super) fn save_acks_locked(&self) -> Result<(), JournalError> {
        self.write_spooled_deliveries()?;
        let mut st = self.state();
        if !st.acks_unsaved && !self.inner.gc_pending.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.collect_garbage(&mut st)
    }

    /// Puts the removal of every chunk all sinks are past into `batch`,
    /// with every sink's cursor and the counters so that a removal never
    /// lands without the cursors that allow it. Updates memory at once:
    /// the caller applies the batch or poisons the journal. Returns the
    /// bytes freed. Caller holds the commit lock and the state lock.
    pub(super) fn collect_into(
        st: &mut State,
        batch: &mut sled::Batch,
    ) -> Result<u64, JournalError> {
        for s in &st.sinks {
            batch.insert(&[layout::SINK_CURSOR, s.slot], &s.cursor.to_be_bytes());
        }
        batch.insert(layout::COUNTERS, Self::counters_value(st)?);
        st.acks_unsaved = false;
        if st.sinks.is_empty() {
            return Ok(0);
        }
        let floor = st.floor();
        let dead: Vec<u64> = st
            .chunks
            .iter()
            .take_while(|(_, meta)| meta.last < floor)
            .map(|(first, _)| *first)
            .collect();
        let mut freed = 0;
        for first in dead {
            batch.remove(&layout::seq_key(layout::CHUNK, first));
            batch.remove(&layout::seq_key(layout::CHUNK_META, first));
            if let Some(meta) = st.chunks.remove(&first) {
                freed += meta.bytes;
                st.segments.released(meta.segment);
            }
        }
        st.pending_bytes -= freed;
        Ok(freed)
    }

    /// Deletes chunks every sink is past and saves unsaved acks, in a batch
    /// of its own; wakes parked appends if space freed. Caller holds the
    /// commit lock and the state lock.
    pub(super) fn collect_garbage(&self, st: &mut State) -> Result<(), JournalError> {
        self.inner.gc_pending.store(false, Ordering::SeqCst);
        let floor = st.floor();
        let collectable = st
            .chunks
            .first_key_value()
            .is_some_and(|(_, m)| m.last < floor);
        if !st.acks_unsaved && (st.sinks.is_empty() || !collectable) {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let freed = Self::collect_into(st, &mut batch)?;
        if let Err(e) = self.inner.tree.apply_batch(batch) {
            // Memory is ahead of disk now: refuse writes until a restart.
            self.inner.poisoned.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        if freed > 0 {
            self.inner.space_freed.notify_one();
        }
        Ok(())
    }

    /// Dead-letters, for every sink, the events of chunks older than the
    /// TTL that the sink has not finished. Returns how many were expired.
    pub fn expire_now(&self) -> Result<u64, JournalError> {
        let Some(ttl) = self.inner.config.ttl else {
            return Ok(0);
        };
        self.check_poisoned()?;
        let _commit = self.commit_guard();
        let deadline = now_ms().saturating_sub(ttl.as_millis() as u64);
        let expired_chunks: Vec<(u64, ChunkMeta)> = {
            let st = self.state();
            let floor = st.floor();
            st.chunks
                .iter()
                .filter(|(_, m)| m.last >= floor)
                .take_while(|(_, m)| m.appended_ms < deadline)
                .map(|(f, m)| (*f, *m))
                .collect()
        };
        let mut expired = 0;
        for (first, meta) in expired_chunks {
            let events = if meta.dropped {
                Vec::new()
            } else {
                self.load_chunk(first)?.unwrap_or_default()
            };
            let mut st = self.state();
            let mut batch = sled::Batch::default();
            for index in 0..st.sinks.len() {
                expired += Self::dead_letter_chunk_for_sink(
                    &mut st, &mut batch, index, first, &meta, &events, EXPIRED,
                )?;
            }
            st.counters.expired += expired;
            for index in 0..st.sinks.len() {
                let s = &mut st.sinks[index];
                while s.done.remove(&s.cursor) {
                    s.cursor += 1;
                }
                s.read_upto = s.read_upto.max(s.cursor);
                batch.insert(&[layout::SINK_CURSOR, s.slot], &s.cursor.to_be_bytes());
            }
            batch.insert(layout::COUNTERS, Self::counters_value(&st)?);
            self.inner.tree.apply_batch(batch)?;
            self.collect_garbage(&mut st)?;
        }
        if expired > 0 {
            tracing::warn!(
                events = expired,
                "events older than the journal TTL moved to dead letters"
            );
            self.sync()?;
        }
        Ok(expired)
    }

    /// Marks every sequence of the chunk done for the sink, dead-lettering
    /// the ones routed to it that it had not finished. Returns that count.
    fn dead_letter_chunk_for_sink(
        st: &mut State,
        batch: &mut sled::Batch,
        index: usize,
        first: u64,
        meta: &ChunkMeta,
        events: &[StoredEvent],
        reason: &str,
    ) -> Result<u64, JournalError> {
        let (slot, cursor, name) = {
            let s = &st.sinks[index];
            (s.slot, s.cursor, s.name.clone())
        };
        if cursor > meta.last {
            return Ok(0);
        }
        let mut count = 0;
        for seq in first.max(cursor)..=meta.last {
            let event = events.get((seq - first) as usize);
            let finished = st.sinks[index].done.contains(&seq);
            if let Some(event) = event {
                if !finished && event.routes & (1u64 << slot) != 0 {
                    let record = DeadLetterRecord {
                        seq,
                        sink: name.clone(),
                        reason: reason.to_owned(),
                        attempts: 0,
                        dead_ms: now_ms(),
                        appended_ms: meta.appended_ms,
                        class: meta.class,
                        event: event.clone(),
                    };
                    Self::put_dead_letter(st, batch, record)?;
                    count += 1;
                }
            }
            st.sinks[index].done.insert(seq);
        }
        Ok(count)
    }

    /// Unregisters a sink that left the configuration. Its unfinished
    /// events go to the dead letters (reason `sink-removed`), never into the
    /// void. Returns how many.
    pub fn retire_sink(&self, sink: &str) -> Result<u64, JournalError> {
        self.check_poisoned()?;
        let _commit = self.commit_guard();
        let metas: Vec<(u64, ChunkMeta)> = {
            let st = self.state();
            let index = st.sink_index(sink)?;
            let cursor = st.sinks[index].cursor;
            Self::metas_between(&st, cursor, u64::MAX)
        };
        let mut orphaned = 0;
        for (first, meta) in metas {
            let events = if meta.dropped {
                Vec::new()
            } else {
                self.load_chunk(first)?.unwrap_or_default()
            };
            let mut st = self.state();
            let index = st.sink_index(sink)?;
            let mut batch = sled::Batch::default();
            orphaned += Self::dead_letter_chunk_for_sink(
                &mut st,
                &mut batch,
                index,
                first,
                &meta,
                &events,
                SINK_REMOVED,
            )?;
            self.inner.tree.apply_batch(batch)?;
        }
        let mut st = self.state();
        let index = st.sink_index(sink)?;
        let removed = st.sinks.remove(index);
        st.counters.orphaned += orphaned;
        let mut batch = sled::Batch::default();
        batch.remove(layout::named_key(layout::SINK_SLOT, sink));
        batch.remove(&[layout::SINK_CURSOR, removed.slot]);
        batch.insert(layout::COUNTERS, Self::counters_value(&st)?);
        self.inner.tree.apply_batch(batch)?;
        self.collect_garbage(&mut st)?;
        drop(st);
        tracing::warn!(
            sink,
            orphaned,
            "sink removed from configuration: its unfinished events are in the dead letters"
        );
        self.sync()?;
        Ok(orphaned)
    }
}

fn meta_count(st: &State, first: u64) -> u64 {
    st.chunks.get(&first).map(|m| m.count(first)).unwrap_or(0)
}
