//! Appends: the group-commit writer task and the commit itself.
//!
//! Sources send [`AppendRequest`]s over a bounded channel. The writer task
//! takes whatever has queued up (up to `max_batch_events`), commits it as one
//! sled batch, flushes and fdatasyncs once, then answers every request: one
//! sync serves many events. Business requests that do not fit under
//! `max_bytes` are parked, in arrival order, and retried when space frees;
//! their sources wait, which is the back-pressure the contract asks for.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::dedup::Seen;
use super::layout::{self, ChunkMeta, StoredEvent};
use super::ledger::{encode_rows, LedgerRow};
use super::{encode_err, now_ms, Journal, JournalError, State};
use crate::{CloudEvent, EventClass};

/// Which sinks an event goes to: bit `n` is the sink in slot `n`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Routes(pub u64);

impl Routes {
    /// Whether the sink in `slot` receives the event.
    pub fn contains_slot(self, slot: u8) -> bool {
        self.0 & (1u64 << slot) != 0
    }
}

/// An event to append: its id, class, routes and CloudEvents JSON.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// Deterministic id (dedup key).
    pub id: Uuid,
    /// Business or telemetry.
    pub class: EventClass,
    /// Target sinks.
    pub routes: Routes,
    /// The bytes sinks send.
    pub payload: Vec<u8>,
    /// What the ledger keeps of it (`None`: nothing, as for test events).
    pub ledger: Option<super::LedgerEntry>,
}

impl NewEvent {
    /// Wraps a canonical event; its ledger entry is reckoned by the
    /// event's time.
    pub fn from_cloud_event(event: &CloudEvent, class: EventClass, routes: Routes) -> Self {
        let at_ms = humantime::parse_rfc3339(&event.time)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or_else(super::now_ms);
        Self {
            id: event.id,
            class,
            routes,
            payload: event.to_json(),
            ledger: Some(super::LedgerEntry {
                at_ms,
                line: event.data.line.clone(),
                event_type: event.event_type.as_str().to_owned(),
                quantity: match event.data.quantity {
                    crate::Quantity::Count(n) => n as f64,
                    crate::Quantity::Measure(x) => x,
                },
            }),
        }
    }
}

/// A source's events plus the cursor state to store with them atomically.
#[derive(Clone, Debug, Default)]
pub struct AppendRequest {
    /// Source name (keys the cursor).
    pub source: String,
    /// Events, in source order.
    pub events: Vec<NewEvent>,
    /// Opaque cursor state stored in the same batch as the events.
    pub cursor: Option<Vec<u8>>,
}

impl AppendRequest {
    fn is_business(&self) -> bool {
        self.events.iter().any(|e| e.class == EventClass::Business)
    }

    fn charge(&self) -> u64 {
        self.events
            .iter()
            .map(|e| (e.payload.len() + self.source.len() + 40) as u64)
            .sum()
    }
}

/// The answer to an append: one entry per event, `None` for a duplicate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Assigned sequence, or `None` if the id was already in the window.
    pub seqs: Vec<Option<u64>>,
}

impl AppendOutcome {
    /// Indexes of the events that were duplicates.
    pub fn duplicates(&self) -> Vec<usize> {
        self.seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_none())
            .map(|(i, _)| i)
            .collect()
    }

    /// How many events were appended.
    pub fn appended(&self) -> usize {
        self.seqs.iter().filter(|s| s.is_some()).count()
    }
}

type Reply = oneshot::Sender<Result<AppendOutcome, JournalError>>;

struct Job {
    request: AppendRequest,
    reply: Option<Reply>,
    parked: bool,
    /// Set for events a source could not make sense of: they go straight
    /// to the dead letters of their sinks with this reason.
    dead_letter: Option<String>,
    /// A device waits for this answer (a handshake): commit without
    /// waiting out the commit window.
    urgent: bool,
}

impl Job {
    fn answer(&mut self, result: Result<AppendOutcome, JournalError>) {
        if let Some(reply) = self.reply.take() {
            // The source may have given up (shutdown); nothing to tell it.
            let _ = reply.send(result);
        }
    }
}

/// How often the writer removes ledger records past `ledger_keep`.
const LEDGER_PRUNE_EVERY_MS: u64 = 60_000;

/// How long a batched append that finds the window over waits for the
/// appends of the same poll tick (other sources on one device).
const TICK_GATHER: Duration = Duration::from_millis(2);

/// Handle sources use to append; cheap to clone. Dropping every clone stops
/// the writer once it has committed what it holds.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<Job>,
    observer: Option<AppendObserver>,
}

/// Called with the time each append took to become durable (metrics).
pub type AppendObserver = std::sync::Arc<dyn Fn(Duration) + Send + Sync>;

impl Appender {
    /// Appends and waits until the events are durable (or parked until space
    /// frees, for business events on a full journal). Commits without
    /// waiting out `commit_window`: for appends a device waits on.
    pub async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, JournalError> {
        self.append_with(request, true).await
    }

    /// As [`append`](Self::append), but the commit may wait up to
    /// `commit_window` for other appends to share its write and sync (a
    /// counter poll: nobody is held while it waits, and its position is
    /// still adopted only once durable).
    pub async fn append_batched(
        &self,
        request: AppendRequest,
    ) -> Result<AppendOutcome, JournalError> {
        self.append_with(request, false).await
    }

    async fn append_with(
        &self,
        request: AppendRequest,
        urgent: bool,
    ) -> Result<AppendOutcome, JournalError> {
        let started = std::time::Instant::now();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            request,
            reply: Some(reply),
            parked: false,
            dead_letter: None,
            urgent,
        };
        self.tx.send(job).await.map_err(|_| JournalError::Closed)?;
        let result = answer.await.map_err(|_| JournalError::Closed)?;
        if let (Some(observe), Ok(_)) = (&self.observer, &result) {
            observe(started.elapsed());
        }
        result
    }

    /// The same appender, reporting each durable append's latency.
    pub fn observed(mut self, observer: AppendObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Stores events a source could not make sense of (a malformed record)
    /// straight into the dead letters of every sink they are routed to,
    /// with `reason`, durably. Nothing is sent; an operator sees them in
    /// `journal dead-letters list` and can requeue or purge them. Ids are
    /// deduplicated like appends. Returns how many events were stored.
    pub async fn dead_letter(
        &self,
        request: AppendRequest,
        reason: &str,
    ) -> Result<usize, JournalError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            request,
            reply: Some(reply),
            parked: false,
            dead_letter: Some(reason.to_owned()),
            urgent: true,
        };
        self.tx.send(job).await.map_err(|_| JournalError::Closed)?;
        let outcome = answer.await.map_err(|_| JournalError::Closed)??;
        Ok(outcome.appended())
    }
}

/// Events of one commit, grouped into chunks as they are assigned sequences.
pub(super) struct ChunkPlan {
    next_seq: u64,
    closed: Vec<(u64, ChunkMeta, Vec<StoredEvent>)>,
    open: Option<(u64, EventClass, Vec<StoredEvent>, u64)>,
    appended_ms: u64,
    payload_in_open: usize,
}

impl ChunkPlan {
    pub(super) fn new(next_seq: u64, appended_ms: u64) -> Self {
        Self {
            next_seq,
            closed: Vec::new(),
            open: None,
            appended_ms,
            payload_in_open: 0,
        }
    }

    pub(super) fn push(&mut self, class: EventClass, event: StoredEvent) -> u64 {
        let must_close = match &self.open {
            Some((_, open_class, events, _)) => {
                *open_class != class
                    || events.len() >= layout::CHUNK_MAX_EVENTS
                    || self.payload_in_open >= layout::CHUNK_TARGET_BYTES
            }
            None => false,
        };
        if must_close {
            self.close();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.payload_in_open += event.payload.len();
        let charge = event.charge();
        let open = self.open.get_or_insert_with(|| (seq, class, Vec::new(), 0));
        open.2.push(event);
        open.3 += charge;
        seq
    }

    fn close(&mut self) {
        if let Some((first, class, events, bytes)) = self.open.take() {
            let meta = ChunkMeta {
                last: first + events.len() as u64 - 1,
                class: class.code(),
                appended_ms: self.appended_ms,
                bytes,
                dropped: false,
                segment: layout::NO_SEGMENT,
            };
            self.closed.push((first, meta, events));
        }
        self.payload_in_open = 0;
    }

    /// Puts the chunks and their metas into `batch` and the in-memory
    /// index; returns the next sequence after them.
    pub(super) fn write(
        mut self,
        st: &mut State,
        batch: &mut sled::Batch,
    ) -> Result<u64, JournalError> {
        self.close();
        let mut values = Vec::with_capacity(self.closed.len());
        for (first, _, events) in &self.closed {
            let chunk = layout::encode_chunk(events).map_err(|e| encode_err("chunk", e))?;
            values.push((*first, chunk));
        }
        // Test builds playing format 1 keep chunks inline in sled.
        #[cfg(feature = "test-format")]
        let to_segments = super::format::current() >= 2;
        #[cfg(not(feature = "test-format"))]
        let to_segments = true;
        let mut segments = vec![layout::NO_SEGMENT; values.len()];
        if to_segments {
            // Durable before the batch holding the pointers is applied:
            // sled's own flusher may make that batch durable at any moment.
            let pointers = st.segments.append(&values).map_err(JournalError::Sync)?;
            for (((_, value), segment), pointer) in
                values.iter_mut().zip(&mut segments).zip(pointers)
            {
                *value = pointer.encode().to_vec();
                *segment = pointer.segment;
            }
        }
        for (((first, mut meta, _), (_, value)), segment) in
            self.closed.into_iter().zip(values).zip(segments)
        {
            meta.segment = segment;
            let meta_bytes = layout::encode_meta(&meta).map_err(|e| encode_err("chunk meta", e))?;
            batch.insert(&layout::seq_key(layout::CHUNK, first), value);
            batch.insert(&layout::seq_key(layout::CHUNK_META, first), meta_bytes);
            st.pending_bytes += meta.bytes;
            st.counters.appended += meta.count(first);
            st.chunks.insert(first, meta);
        }
        st.next_seq = self.next_seq;
        Ok(self.next_seq)
    }
}

impl Journal {
    /// Starts the group-commit writer on the current tokio runtime.
    pub fn start_writer(&self) -> (Appender, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(self.inner.config.channel_capacity.max(1));
        let journal = self.clone();
        let handle = tokio::spawn(async move { journal.run_writer(rx).await });
        (Appender { tx, observer: None }, handle)
    }

    async fn run_writer(self, mut rx: mpsc::Receiver<Job>) {
        let mut parked: VecDeque<Job> = VecDeque::new();
        let parked_limit = self.inner.config.channel_capacity.max(1);
        let max_events = self.inner.config.max_batch_events.max(1);
        let expiry_every = self
            .inner
            .config
            .ttl
            .map(|ttl| (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(10)))
            .unwrap_or(Duration::from_secs(3600));
        let mut expiry_tick = tokio::time::interval(expiry_every);
        expiry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Space can also come back from outside (a full disk cleaned up):
        // parked appends look again every second.
        let mut recheck = tokio::time::interval(Duration::from_secs(1));
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Acks wait for the next commit to be written; with no commit
        // coming they are saved (and delivered chunks freed) every second.
        let mut save_acks = tokio::time::interval(Duration::from_secs(1));
        save_acks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let window = self.inner.config.commit_window;
        let mut last_commit: Option<tokio::time::Instant> = None;
        loop {
            let mut jobs: Vec<Job> = Vec::new();
            tokio::select! {
                job = rx.recv(), if parked.len() < parked_limit => match job {
                    Some(job) => jobs.push(job),
                    // All appenders dropped: parked requests are answered
                    // `Closed` by dropping them, so their sources do not ack.
                    None => break,
                },
                _ = self.inner.space_freed.notified(), if !parked.is_empty() => {}
                _ = recheck.tick(), if !parked.is_empty() => {}
                _ = save_acks.tick() => {
                    // While commits flow, the next one saves them anyway.
                    let committing = last_commit.is_some_and(|t| t.elapsed() < Duration::from_secs(1));
                    if !committing
                        && self.inner.gc_pending.load(Ordering::SeqCst)
                        && !self.inner.poisoned.load(Ordering::SeqCst)
                    {
                        let journal = self.clone();
                        match tokio::task::spawn_blocking(move || journal.save_acks()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::error!(error = %e, "saving delivery cursors failed"),
                            Err(e) => tracing::error!(error = %e, "saving delivery cursors failed"),
                        }
                    }
                    continue;
                }
                _ = expiry_tick.tick(), if self.inner.config.ttl.is_some() => {
                    let journal = self.clone();
                    match tokio::task::spawn_blocking(move || journal.expire_now()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "journal expiry failed"),
                        Err(e) => tracing::error!(error = %e, "journal expiry task failed"),
                    }
                    continue;
                }
            }
            // Sources polling on one tick append within a millisecond or
            // two of each other: a batched append that would commit at once
            // waits that long for them, so one commit (one sync) takes them
            // all instead of the first going alone and the rest waiting a
            // whole window.
            let window_over = last_commit.is_none_or(|t| t.elapsed() >= window);
            if !window.is_zero() && window_over {
                let until = tokio::time::Instant::now() + TICK_GATHER.min(window);
                while !jobs.iter().any(|j| j.urgent) {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        job = rx.recv() => match job {
                            Some(job) => jobs.push(job),
                            None => break,
                        },
                    }
                }
            }
            // At most one commit per window, unless a device waits on an
            // append: what arrives meanwhile joins the commit.
            if let Some(last) = last_commit.filter(|_| !window.is_zero()) {
                let until = last + window;
                while !jobs.iter().any(|j| j.urgent) {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        job = rx.recv() => match job {
                            Some(job) => jobs.push(job),
                            None => break,
                        },
                    }
                }
            }
            last_commit = Some(tokio::time::Instant::now());
            let mut events: usize = jobs.iter().map(|j| j.request.events.len()).sum();
            while events < max_events {
                match rx.try_recv() {
                    Ok(job) => {
                        events += job.request.events.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            let mut candidates: Vec<Job> = parked.drain(..).collect();
            candidates.extend(jobs);
            let journal = self.clone();
            match tokio::task::spawn_blocking(move || journal.commit_jobs(candidates)).await {
                Ok(still_parked) => parked.extend(still_parked),
                Err(e) => {
                    tracing::error!(error = %e, "journal commit task failed");
                    self.inner.poisoned.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Appends directly, without the writer task (tests, tools). A business
    /// append that does not fit is not waited for: it returns `Ok(None)` so
    /// the caller can free space and retry.
    pub fn append_blocking(
        &self,
        request: AppendRequest,
    ) -> Result<Option<AppendOutcome>, JournalError> {
        let (reply, mut answer) = oneshot::channel();
        let job = Job {
            request,
            reply: Some(reply),
            parked: false,
            dead_letter: None,
            urgent: true,
        };
        if !self.commit_jobs(vec![job]).is_empty() {
            return Ok(None);
        }
        answer
            .try_recv()
            .map_err(|_| JournalError::Closed)?
            .map(Some)
    }

    /// Commits `requests` in one group and returns their outcomes; fails
    /// when the journal has no room for all of them (those that fitted are
    /// stored, the rest are not).
    pub(super) fn commit_all(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendOutcome>, JournalError> {
        let mut answers = Vec::with_capacity(requests.len());
        let jobs = requests
            .into_iter()
            .map(|request| {
                let (reply, answer) = oneshot::channel();
                answers.push(answer);
                Job {
                    request,
                    reply: Some(reply),
                    parked: false,
                    dead_letter: None,
                    urgent: true,
                }
            })
            .collect();
        if !self.commit_jobs(jobs).is_empty() {
            return Err(JournalError::Interchange(
                "the journal is full: what was imported so far is stored; free space (deliver, or raise journal.max_bytes) and import again".into(),
            ));
        }
        answers
            .into_iter()
            .map(|mut answer| answer.try_recv().map_err(|_| JournalError::Closed)?)
            .collect()
    }

    /// Commits the jobs that fit; returns the business jobs that must wait.
    fn commit_jobs(&self, jobs: Vec<Job>) -> Vec<Job> {
        let _commit = self.commit_guard();
        let mut jobs = jobs;
        // A request whose source is gone (its task died, or gave up while
        // held) is not written: nobody will act on its answer, and a
        // restarted source re-reads its stored position; writing it later
        // would move that position behind the new task's back.
        let before = jobs.len();
        jobs.retain(|job| job.reply.as_ref().is_none_or(|r| !r.is_closed()));
        if jobs.len() < before {
            // Not events lost (nothing was acknowledged for them, their
            // source re-reads its device), but worth seeing: a task died.
            tracing::warn!(
                requests = before - jobs.len(),
                "append requests whose source task is gone were not written; the restarted source reads its device again"
            );
        }
        if let Err(e) = self.check_poisoned() {
            for job in &mut jobs {
                job.answer(Err(clone_error(&e)));
            }
            return Vec::new();
        }
        let now = now_ms();
        // Below the free-space reserve nothing that takes space is written:
        // sled failing a write half-way is worse than a held source.
        let disk_low = self.disk_is_low();
        let mut batch = sled::Batch::default();
        let mut parked_out = Vec::new();
        let mut admitted: Vec<(Job, AppendOutcome)> = Vec::new();
        // While an upgrade is uncommitted, what this commit stores also goes
        // to the rollback spool, in the interchange format.
        let spooling = self.spooling();
        let mut spool_lines: Vec<Vec<u8>> = Vec::new();
        let next_seq;
        let freed;
        {
            let mut st = self.state();
            // Collect first, into this commit's batch (one batch, one sync):
            // acks since the last commit left garbage and unsaved cursors,
            // and telemetry victims below must be above the floor (GC cannot
            // run again until we release the commit lock).
            self.inner.gc_pending.store(false, Ordering::SeqCst);
            freed = match Self::collect_into(&mut st, &mut batch) {
                Ok(freed) => freed,
                Err(e) => {
                    drop(st);
                    return self.fail_commit(admitted, jobs, e);
                }
            };
            let max_bytes = self.inner.config.max_bytes;
            let mut plan = ChunkPlan::new(st.next_seq, now);
            let mut projected = st.used_bytes();
            let mut seen_in_batch: HashSet<Uuid> = HashSet::new();
            let mut ledger_rows: Vec<LedgerRow> = Vec::new();
            let mut new_ids: Vec<[u8; 16]> = Vec::new();
            let mut blocked = false;
            let spool_slots = spooling.then(|| st.sink_slots());
            for mut job in jobs {
                if let Some(size) = job
                    .request
                    .events
                    .iter()
                    .map(|e| e.payload.len())
                    .find(|len| *len > layout::MAX_EVENT_BYTES)
                {
                    job.answer(Err(JournalError::EventTooLarge {
                        size,
                        max: layout::MAX_EVENT_BYTES,
                    }));
                    continue;
                }
                let charge = job.request.charge();
                if disk_low && charge > 0 {
                    if job.request.is_business() {
                        blocked = true;
                    } else {
                        st.counters.dropped_telemetry += job.request.events.len() as u64;
                        job.answer(Err(JournalError::TelemetryDropped));
                        continue;
                    }
                }
                // An empty journal takes any request, however large: waiting
                // for space that can never come would hold the source forever.
                else if projected + charge > max_bytes && charge > 0 && projected > 0 {
                    if job.request.is_business() {
                        blocked = true;
                    } else {
                        let needed = projected + charge - max_bytes;
                        projected -= drop_oldest_telemetry(&mut st, &mut batch, needed);
                        if projected + charge > max_bytes {
                            st.counters.dropped_telemetry += job.request.events.len() as u64;
                            tracing::warn!(
                                source = %job.request.source,
                                events = job.request.events.len(),
                                "journal full: telemetry refused"
                            );
                            job.answer(Err(JournalError::TelemetryDropped));
                            continue;
                        }
                    }
                }
                // Once one business request waits, later ones wait behind it
                // so that no source's events overtake each other.
                if blocked && job.request.is_business() {
                    if !job.parked {
                        job.parked = true;
                        st.counters.backpressured += 1;
                    }
                    parked_out.push(job);
                    continue;
                }
                let mut seqs = Vec::with_capacity(job.request.events.len());
                for event in &job.request.events {
                    let repeat = match st.dedup.check(&event.id) {
                        Seen::No => false,
                        Seen::Maybe(records) => records
                            .into_iter()
                            .any(|record| self.dedup_record_holds(record, &event.id)),
                    };
                    if repeat || !seen_in_batch.insert(event.id) {
                        st.counters.duplicates += 1;
                        seqs.push(None);
                        continue;
                    }
                    let stored = StoredEvent {
                        id: *event.id.as_bytes(),
                        routes: event.routes.0,
                        source: job.request.source.clone(),
                        payload: event.payload.clone(),
                    };
                    let keep_ledger = !self.inner.config.ledger_keep.is_zero();
                    let mut row =
                        event
                            .ledger
                            .as_ref()
                            .filter(|_| keep_ledger)
                            .map(|entry| LedgerRow {
                                seq: 0,
                                id: *event.id.as_bytes(),
                                at_ms: entry.at_ms,
                                source: job.request.source.clone(),
                                line: entry.line.clone(),
                                event_type: entry.event_type.clone(),
                                quantity: entry.quantity,
                                dead_at_source: job.dead_letter.is_some(),
                            });
                    projected += stored.charge();
                    new_ids.push(*event.id.as_bytes());
                    if let Some(reason) = &job.dead_letter {
                        match dead_letter_at_source(
                            &mut st,
                            &mut batch,
                            stored,
                            event.class,
                            reason,
                            now,
                        ) {
                            Ok(records) if spooling => {
                                for record in &records {
                                    match super::interchange::dead_letter_line(record) {
                                        Ok(line) => spool_lines.push(line),
                                        Err(e) => {
                                            drop(st);
                                            return self.fail_commit(admitted, parked_out, e);
                                        }
                                    }
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                drop(st);
                                return self.fail_commit(admitted, parked_out, e);
                            }
                        }
                        // Sequence 0: never queued for delivery.
                        seqs.push(Some(0));
                        ledger_rows.extend(row);
                        continue;
                    }
                    let spooled = spool_slots.as_ref().map(|slots| {
                        let names = super::upgrade::sink_names(slots, stored.routes);
                        (names, stored.clone())
                    });
                    let seq = plan.push(event.class, stored);
                    if let Some((names, stored)) = spooled {
                        match super::interchange::event_line(seq, event.class, names, &stored) {
                            Ok(line) => spool_lines.push(line),
                            Err(e) => {
                                drop(st);
                                return self.fail_commit(admitted, parked_out, e);
                            }
                        }
                    }
                    if let Some(row) = &mut row {
                        row.seq = seq;
                    }
                    ledger_rows.extend(row);
                    seqs.push(Some(seq));
                }
                if let Some(cursor) = &job.request.cursor {
                    if spooling {
                        match super::interchange::position_line(&job.request.source, cursor) {
                            Ok(line) => spool_lines.push(line),
                            Err(e) => {
                                drop(st);
                                return self.fail_commit(admitted, parked_out, e);
                            }
                        }
                    }
                    batch.insert(
                        layout::named_key(layout::SOURCE_CURSOR, &job.request.source),
                        layout::encode_cursor(cursor),
                    );
                }
                admitted.push((job, AppendOutcome { seqs }));
            }
            let start_seq = st.next_seq;
            next_seq = match plan.write(&mut st, &mut batch) {
                Ok(next) => next,
                Err(e) => {
                    drop(st);
                    return self.fail_commit(admitted, parked_out, e);
                }
            };
            if !new_ids.is_empty() {
                let record = layout::DedupRecord {
                    appended_ms: now,
                    ids: new_ids.clone(),
                };
                match layout::encode(&record) {
                    Ok(bytes) => batch.insert(&layout::seq_key(layout::DEDUP, start_seq), bytes),
                    Err(e) => {
                        drop(st);
                        return self.fail_commit(admitted, parked_out, encode_err("dedup", e));
                    }
                }
                st.dedup.insert_group(start_seq, now, new_ids);
            }
            for evicted in st.dedup.evict(now) {
                batch.remove(&layout::seq_key(layout::DEDUP, evicted));
            }
            if let Some(first) = ledger_rows.first() {
                let mut key = layout::seq_key(layout::LEDGER, start_seq).to_vec();
                key.extend_from_slice(&first.id);
                match encode_rows(&ledger_rows) {
                    Ok(bytes) => {
                        st.ledger_bytes += (key.len() + bytes.len()) as u64;
                        batch.insert(key, bytes);
                    }
                    Err(e) => {
                        drop(st);
                        return self.fail_commit(admitted, parked_out, encode_err("ledger", e));
                    }
                }
            }
            let ledger_max = self.inner.config.ledger_max_bytes;
            if now >= st.ledger_pruned_ms + LEDGER_PRUNE_EVERY_MS || st.ledger_bytes > ledger_max {
                st.ledger_pruned_ms = now;
                let keep = self.inner.config.ledger_keep.as_millis() as u64;
                match self.prune_ledger(
                    &mut batch,
                    now.saturating_sub(keep),
                    st.ledger_bytes,
                    ledger_max,
                    1024,
                ) {
                    Ok(freed) => st.ledger_bytes = st.ledger_bytes.saturating_sub(freed),
                    Err(e) => tracing::warn!(error = %e, "ledger not pruned this time"),
                }
            }
            batch.insert(layout::NEXT_SEQ, &next_seq.to_be_bytes());
            match Self::counters_value(&st) {
                Ok(bytes) => batch.insert(layout::COUNTERS, bytes),
                Err(e) => {
                    drop(st);
                    return self.fail_commit(admitted, parked_out, e);
                }
            }
            let now_full = !parked_out.is_empty();
            if now_full && !st.full {
                tracing::warn!(
                    used_bytes = st.used_bytes(),
                    max_bytes,
                    "JOURNAL FULL: business events are held at their sources until the backlog drains"
                );
            } else if !now_full && st.full {
                tracing::info!("journal has space again; held business events are being appended");
            }
            st.full = now_full;
            if disk_low != st.disk_low {
                if disk_low {
                    tracing::error!(
                        path = %self.inner.config.path.display(),
                        free_bytes = self.disk_free(),
                        min_free_disk = self.inner.config.min_free_disk,
                        "DISK FULL: the journal's filesystem is below its free-space reserve; business events are held at their sources, nothing is acknowledged until space returns"
                    );
                } else {
                    tracing::warn!("disk has space again; held business events are being appended");
                }
                st.disk_low = disk_low;
            }
        }
        if let Err(e) = self.inner.tree.apply_batch(batch) {
            self.inner.poisoned.store(true, Ordering::SeqCst);
            return self.fail_commit(admitted, parked_out, JournalError::Storage(e));
        }
        if freed > 0 {
            self.inner.space_freed.notify_one();
        }
        if admitted.is_empty() {
            // Only collection and cursors: no source waits on them.
            return parked_out;
        }
        if let Err(e) = self.sync() {
            return self.fail_commit(admitted, parked_out, e);
        }
        if !spool_lines.is_empty() {
            // Stored but not answered: a failure here poisons like a failed
            // sync, and the next open writes the spool's missing tail.
            if let Err(e) = self.spool_commit(&spool_lines) {
                return self.fail_commit(admitted, parked_out, e);
            }
        }
        self.publish_durable(next_seq);
        for (mut job, outcome) in admitted {
            job.answer(Ok(outcome));
        }
        parked_out
    }

    /// Whether the `d` record of a commit holds `id`: the exact check
    /// behind a fingerprint match. A record that cannot be read is no
    /// proof of a repeat, so the event is stored (a repeat stored again
    /// keeps its id, which the ERP posts once; a new fact dropped would be
    /// lost).
    fn dedup_record_holds(&self, record: u64, id: &Uuid) -> bool {
        let key = layout::seq_key(layout::DEDUP, record);
        match self.inner.tree.get(key) {
            Ok(Some(bytes)) => match layout::decode::<layout::DedupRecord>(&bytes) {
                Ok(record) => record.ids.contains(id.as_bytes()),
                Err(e) => {
                    tracing::warn!(record, error = %e, "dedup record does not decode: event stored, not taken for a repeat");
                    false
                }
            },
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(record, error = %e, "dedup record unreadable: event stored, not taken for a repeat");
                false
            }
        }
    }

    pub(super) fn publish_durable(&self, next_seq: u64) {
        self.state().durable_seq = next_seq;
        self.inner.durable_tx.send_replace(next_seq);
    }

    fn fail_commit(
        &self,
        admitted: Vec<(Job, AppendOutcome)>,
        parked: Vec<Job>,
        error: JournalError,
    ) -> Vec<Job> {
        // The in-memory state may now be ahead of disk; refuse everything
        // until a restart re-reads the truth from sled.
        self.inner.poisoned.store(true, Ordering::SeqCst);
        tracing::error!(error = %error, "journal commit failed");
        for (mut job, _) in admitted {
            job.answer(Err(clone_error(&error)));
        }
        let mut parked = parked;
        for job in &mut parked {
            job.answer(Err(JournalError::Poisoned));
        }
        Vec::new()
    }
}

/// One dead letter per routed sink for an event refused at its source.
fn dead_letter_at_source(
    st: &mut State,
    batch: &mut sled::Batch,
    event: StoredEvent,
    class: EventClass,
    reason: &str,
    now: u64,
) -> Result<Vec<layout::DeadLetterRecord>, JournalError> {
    let sinks: Vec<(String, u8)> = st.sink_slots();
    let mut stored = Vec::new();
    for (sink, slot) in sinks {
        if event.routes & (1u64 << slot) == 0 {
            continue;
        }
        let mut routed = event.clone();
        routed.routes = 1u64 << slot;
        let record = layout::DeadLetterRecord {
            seq: 0,
            sink: sink.clone(),
            reason: reason.to_owned(),
            attempts: 0,
            dead_ms: now,
            appended_ms: now,
            class: class.code(),
            event: routed,
        };
        Journal::put_dead_letter(st, batch, record.clone())?;
        stored.push(record);
        st.counters.rejected += 1;
        tracing::warn!(source = %event.source, sink, reason, "event refused at its source: stored in dead letters");
    }
    Ok(stored)
}

/// Drops the oldest telemetry chunks until `needed` bytes are free (or no
/// telemetry is left); returns the bytes freed. Counted, tombstoned.
fn drop_oldest_telemetry(st: &mut State, batch: &mut sled::Batch, needed: u64) -> u64 {
    let mut freed = 0;
    let victims: Vec<u64> = st
        .chunks
        .iter()
        .filter(|(_, m)| m.class().is_telemetry() && !m.dropped)
        .map(|(first, _)| *first)
        .collect();
    for first in victims {
        if freed >= needed {
            break;
        }
        let Some(meta) = st.chunks.get_mut(&first) else {
            continue;
        };
        let count = meta.count(first);
        freed += meta.bytes;
        st.pending_bytes -= meta.bytes;
        meta.bytes = 0;
        meta.dropped = true;
        let segment = std::mem::replace(&mut meta.segment, layout::NO_SEGMENT);
        let meta = *meta;
        st.segments.released(segment);
        batch.remove(&layout::seq_key(layout::CHUNK, first));
        if let Ok(bytes) = layout::encode_meta(&meta) {
            batch.insert(&layout::seq_key(layout::CHUNK_META, first), bytes);
        }
        st.counters.dropped_telemetry += count;
        tracing::warn!(
            first_seq = first,
            events = count,
            "journal full: oldest telemetry dropped"
        );
    }
    freed
}

/// One failure answers many requests; errors are not `Clone` (io::Error).
pub(super) fn clone_error(error: &JournalError) -> JournalError {
    match error {
        JournalError::Poisoned => JournalError::Poisoned,
        other => JournalError::WriteFailed(other.to_string()),
    }
}
