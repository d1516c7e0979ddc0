//! One forwarder per sink: read a batch at the sink's cursor, deliver it,
//! act on each verdict. Delivered → ack; Rejected → dead letter; Retry →
//! back off (`protocols::pace`: exponential, capped, jittered within the
//! upper half of each step, honouring the peer's delay)
//! and re-send exactly the events still owed, in order; Hold (the endpoint
//! refuses everything) → the same, never counted towards `max_attempts`,
//! shown in status and readiness, logged once per change of state.
//!
//! Whatever a batch leaves unfinished (a stop, a failed journal write, a
//! panic) is rewound by a [`Lease`] when the batch ends, so the next read
//! starts at the sink's cursor again: nothing handed out is stranded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buffer::{Journal, PendingEvent};
use prometheus_client::metrics::histogram::Histogram;
use protocols::{Sink, Verdict};
use tokio::sync::watch;

use crate::config::ForwarderSettings;

/// What a forwarder is doing, for progress lines and status.
#[derive(Clone, Debug)]
pub struct ForwarderStatus {
    /// Events this forwarder saw delivered since start.
    pub delivered: u64,
    /// Events it dead-lettered since start.
    pub rejected: u64,
    /// Dead-lettered events by reason (first words of the reason, at most
    /// [`MAX_REASONS`] kinds; the rest counted as `other`).
    pub rejected_reasons: BTreeMap<String, u64>,
    /// Retries since start.
    pub retries: u64,
    /// Last transient failure, while it is retrying.
    pub retrying: Option<String>,
    /// Why the endpoint refuses everything, while it does (events held).
    pub holding: Option<String>,
    /// When the sink last confirmed a delivery.
    pub last_delivery: Option<std::time::SystemTime>,
    /// The last failure (retry or hold), kept after recovery.
    pub last_error: Option<String>,
    /// The current outage (logged when it starts and when it ends).
    pub outage: protocols::pace::Outage,
    /// Seconds from the event's source time to the sink's acknowledgement.
    pub delivery_latency: Histogram,
    /// Events the peer accepted and has not booked yet (as of the last
    /// batch that handed them out).
    pub accepted_pending: u64,
    /// Of those, older than the sink's alarm bound.
    pub pending_overdue: u64,
    /// When the oldest of them was accepted.
    pub pending_since: Option<std::time::SystemTime>,
    /// What the peer last said about them.
    pub pending_state: Option<String>,
}

/// Reason kinds kept apart in [`ForwarderStatus::rejected_reasons`].
pub const MAX_REASONS: usize = 16;

/// How long a delivery in flight when the agent stops may still finish.
/// Without a bound, an MQTT sink waiting for a broker that is down held
/// every stop for its 5 s connection patience.
const STOP_GRACE: Duration = Duration::from_secs(1);

impl Default for ForwarderStatus {
    fn default() -> Self {
        Self {
            delivered: 0,
            rejected: 0,
            rejected_reasons: BTreeMap::new(),
            retries: 0,
            retrying: None,
            holding: None,
            last_delivery: None,
            last_error: None,
            // One failed delivery followed by success is a retry (counted),
            // not an outage: announced after 3 failures in a row or 5 s.
            outage: protocols::pace::Outage::lasting(3, Duration::from_secs(5)),
            // 50 ms .. 1 day: a live link is sub-second; a backlog after an
            // outage is hours old.
            delivery_latency: Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                14_400.0, 86_400.0,
            ]),
            accepted_pending: 0,
            pending_overdue: 0,
            pending_since: None,
            pending_state: None,
        }
    }
}

/// A reason's kind for metrics: its words up to the first `:` (an HTTP
/// status, an MQTT reason code), so that event-specific details do not
/// make one series each.
pub fn reason_kind(reason: &str) -> String {
    let head = reason.split(':').next().unwrap_or(reason).trim();
    head.chars().take(40).collect()
}

/// The event's CloudEvents `time` (its source time), without parsing the
/// whole payload: `time` is serialised before `data`, and a quote inside a
/// string value is escaped, so the first `"time":"` is the top-level one.
fn source_time(payload: &[u8]) -> Option<std::time::SystemTime> {
    const KEY: &[u8] = b"\"time\":\"";
    let start = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = payload[start..].iter().position(|b| *b == b'"')?;
    let text = std::str::from_utf8(&payload[start..start + len]).ok()?;
    humantime::parse_rfc3339_weak(text).ok()
}

/// Shared handle to a forwarder's status.
pub type SharedStatus = Arc<Mutex<ForwarderStatus>>;

fn backoff(settings: &ForwarderSettings, attempt: u32, peer_delay: Option<Duration>) -> Duration {
    let own = protocols::pace::wait_after(settings.retry_initial, settings.retry_max, attempt);
    // A peer that names its delay (Retry-After) gets at least that, even
    // beyond retry_max: it knows its own outage better than we do.
    peer_delay.map_or(own, |d| d.max(own))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs until `stop` becomes true; the batch in hand is finished first
/// (delivered or left in the journal), never abandoned half-acknowledged.
pub async fn run(
    journal: Journal,
    sink_name: String,
    mut sink: Box<dyn Sink>,
    settings: ForwarderSettings,
    mut stop: watch::Receiver<bool>,
    status: SharedStatus,
) {
    let mut durable = journal.durable_watch();
    loop {
        if *stop.borrow() {
            break;
        }
        durable.borrow_and_update();
        let batch = {
            let (journal, name, size) = (journal.clone(), sink_name.clone(), settings.batch_size);
            blocking(move || journal.read_batch(&name, size)).await
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(sink = %sink_name, error = %e, "reading the journal failed");
                tokio::select! {
                    _ = tokio::time::sleep(settings.retry_max) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = durable.changed() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        match deliver_batch(
            &journal,
            &sink_name,
            sink.as_mut(),
            &settings,
            &mut stop,
            &status,
            batch,
        )
        .await
        {
            Finished::Done => {}
            Finished::Stopped => break,
            // Only accepted-pending events are left at the head: ask again
            // when one is due, or sooner when new events arrive.
            Finished::Pending(after) => {
                tokio::select! {
                    _ = tokio::time::sleep(after) => {}
                    _ = durable.changed() => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
    sink.close().await;
    tracing::info!(sink = %sink_name, "forwarder stopped");
}

/// What a sink was handed and did not finish: rewound to the sink's cursor
/// when the batch ends, however it ends (as Vector's finalizers do), so
/// the next read hands it out again.
struct Lease<'a> {
    journal: &'a Journal,
    sink: &'a str,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.journal.rewind(self.sink) {
            tracing::error!(sink = %self.sink, error = %e, "rewinding the sink's read position failed");
        }
    }
}

/// Returns once the agent is stopping.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    // The borrow `wait_for` returns is not Send: dropped here, not held
    // across the caller's awaits.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// How a batch ended.
enum Finished {
    /// Every event delivered or dead-lettered (or the journal must be read
    /// again after a failed write).
    Done,
    /// Stopped while backing off; the rest stays in the journal.
    Stopped,
    /// Everything else settled; accepted-pending events are due again
    /// after this.
    Pending(Duration),
}

/// Delivers one batch to the end (the unacknowledged rest stays in the
/// journal for the next read or the next start).
async fn deliver_batch(
    journal: &Journal,
    sink_name: &str,
    sink: &mut dyn Sink,
    settings: &ForwarderSettings,
    stop: &mut watch::Receiver<bool>,
    status: &SharedStatus,
    batch: Vec<PendingEvent>,
) -> Finished {
    let _lease = Lease {
        journal,
        sink: sink_name,
    };
    let mut owed = batch;
    let mut attempt: u32 = 0;
    let mut first_round = true;
    let mut pending_after: Option<Duration> = None;
    loop {
        let verdicts = {
            let delivering = sink.deliver(&owed);
            tokio::pin!(delivering);
            tokio::select! {
                verdicts = &mut delivering => verdicts,
                _ = stopping(stop) => {
                    // A delivery that answers within the grace is recorded
                    // (a request the ERP took is not sent again at the next
                    // start); one waiting for a broker that is down, or a
                    // slow endpoint, is dropped: its events stay in the
                    // journal and go again with the same ids, as after a
                    // crash.
                    match tokio::time::timeout(STOP_GRACE, &mut delivering).await {
                        Ok(verdicts) => verdicts,
                        Err(_) => return Finished::Stopped,
                    }
                }
            }
        };
        let (mut n_pending, mut n_overdue, mut oldest, mut pending_state) =
            (0u64, 0u64, None::<std::time::SystemTime>, None::<String>);
        let mut delivered = Vec::new();
        let mut delivered_times = Vec::new();
        let mut rejected = Vec::new();
        let mut retry = Vec::new();
        let mut peer_delay = None;
        let mut reason = String::new();
        let mut held: Option<String> = None;
        let mut hold_seen = false;
        for (event, verdict) in owed
            .into_iter()
            .zip(verdicts.into_iter().chain(std::iter::repeat(Verdict::retry(
                "sink returned too few verdicts",
            ))))
        {
            match verdict {
                Verdict::Delivered => {
                    delivered.push(event.seq);
                    if let Some(t) = source_time(&event.payload) {
                        delivered_times.push(t);
                    }
                }
                Verdict::Rejected { reason } => rejected.push((event.seq, reason)),
                Verdict::Retry { after, reason: why } => {
                    peer_delay = peer_delay.max(after);
                    reason = why;
                    retry.push(event);
                }
                Verdict::Hold { reason: why } => {
                    reason = why.clone();
                    hold_seen = true;
                    held = Some(why);
                    retry.push(event);
                }
                // Kept in the journal, not owed in this batch: the next
                // read hands it out again to be followed up.
                Verdict::Pending {
                    since,
                    after,
                    overdue,
                    reason: state,
                } => {
                    n_pending += 1;
                    n_overdue += u64::from(overdue);
                    oldest = Some(oldest.map_or(since, |o| o.min(since)));
                    pending_state = Some(state);
                    pending_after = Some(pending_after.map_or(after, |a| a.min(after)));
                }
            }
        }
        attempt += 1;
        if let Some(max) = settings.max_attempts {
            // An endpoint that refuses everything is not the events' fault:
            // giving up on them would empty the backlog into the dead letters.
            if attempt >= max && !retry.is_empty() && !hold_seen {
                let why = format!("gave up after {attempt} attempts: {reason}");
                rejected.extend(retry.drain(..).map(|e| (e.seq, why.clone())));
            }
        }
        let (n_delivered, n_rejected) = (delivered.len() as u64, rejected.len() as u64);
        let reasons: Vec<String> = rejected.iter().map(|(_, why)| reason_kind(why)).collect();
        let result = {
            let (journal, name) = (journal.clone(), sink_name.to_owned());
            blocking(move || -> Result<(), buffer::JournalError> {
                journal.ack(&name, &delivered)?;
                for (seq, why) in rejected {
                    journal.reject(&name, seq, &why, attempt)?;
                }
                Ok(())
            })
            .await
        };
        let recorded = result.is_ok();
        if let Err(e) = &result {
            // Whatever was not recorded is read again from the sink's
            // cursor (the lease rewinds on return): re-sent, same ids.
            tracing::error!(sink = %sink_name, error = %e, "recording delivery in the journal failed; the batch is read again");
        }
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            // The first round hands out every event at the head, so it
            // sees every pending one; retry rounds only the owed rest.
            if first_round || n_pending > 0 {
                s.accepted_pending = n_pending;
                s.pending_overdue = n_overdue;
                s.pending_since = oldest;
                s.pending_state = pending_state;
            }
            s.delivered += n_delivered;
            s.rejected += n_rejected;
            if recorded {
                let now = std::time::SystemTime::now();
                for t in &delivered_times {
                    let age = now.duration_since(*t).unwrap_or_default();
                    s.delivery_latency.observe(age.as_secs_f64());
                }
            }
            for kind in reasons {
                let known = s.rejected_reasons.len() < MAX_REASONS
                    || s.rejected_reasons.contains_key(&kind);
                let key = if known { kind } else { "other".to_owned() };
                *s.rejected_reasons.entry(key).or_default() += 1;
            }
            if recorded && n_delivered > 0 {
                s.last_delivery = Some(std::time::SystemTime::now());
            }
            if !retry.is_empty() {
                s.last_error = Some(reason.clone());
            }
            // One line when deliveries stop working, one when they work
            // again: not one per retry.
            if !retry.is_empty() && n_delivered == 0 && held.is_none() && s.outage.failed() {
                tracing::warn!(sink = %sink_name, since = %s.outage.since_text(), reason = %reason, "SINK DOWN: deliveries fail; retrying with backoff, nothing is lost");
            }
            if n_delivered > 0 && recorded {
                if let Some((lasted, failures)) = s.outage.recovered() {
                    let backlog = journal.backlog(sink_name).unwrap_or(0);
                    tracing::info!(sink = %sink_name, after = %protocols::pace::human(lasted), failed_attempts = failures, backlog, "sink back: delivering again; the backlog drains in order");
                }
            }
            s.retrying = (!retry.is_empty()).then(|| reason.clone());
            if !retry.is_empty() {
                s.retries += 1;
            }
            // A transient failure while held (the link dropped) says
            // nothing about the endpoint's refusal: only progress ends it.
            let held = match held {
                Some(why) => Some(why),
                None if n_delivered == 0 && n_rejected == 0 && !retry.is_empty() => {
                    s.holding.clone()
                }
                None => None,
            };
            // Logged once per change of state, not once per retry.
            if held != s.holding {
                match &held {
                    Some(why) => {
                        tracing::error!(sink = %sink_name, reason = %why, backlog_kept = true, "SINK HELD: the endpoint refuses every delivery; nothing is dead-lettered, retrying until it is fixed")
                    }
                    None => {
                        tracing::warn!(sink = %sink_name, "the endpoint accepts deliveries again")
                    }
                }
                s.holding = held;
            }
        }
        first_round = false;
        if !recorded {
            return Finished::Done;
        }
        if retry.is_empty() {
            return match pending_after {
                Some(after) if n_delivered == 0 && n_rejected == 0 => Finished::Pending(after),
                _ => Finished::Done,
            };
        }
        if *stop.borrow() {
            return Finished::Stopped;
        }
        let wait = backoff(settings, attempt - 1, peer_delay);
        if !hold_seen {
            tracing::debug!(sink = %sink_name, events = retry.len(), attempt, wait_ms = wait.as_millis() as u64, reason = %reason, "delivery failed; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {
                if *stop.borrow() {
                    return Finished::Stopped;
                }
            }
        }
        owed = retry;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink whose endpoint refuses everything, counting attempts.
    struct Refusing(Arc<Mutex<u32>>);

    #[async_trait::async_trait]
    impl Sink for Refusing {
        async fn deliver(&mut self, batch: &[PendingEvent]) -> Vec<Verdict> {
            *self.0.lock().expect("attempts") += 1;
            batch
                .iter()
                .map(|_| Verdict::Hold {
                    reason: "HTTP 403: access revoked".into(),
                })
                .collect()
        }
    }

    /// A sink that answers every event delivered after `answer_after`
    /// (never, with `None`: a broker that is down), counting calls.
    struct Slow {
        answer_after: Option<Duration>,
        calls: Arc<Mutex<u32>>,
    }

    #[async_trait::async_trait]
    impl Sink for Slow {
        async fn deliver(&mut self, batch: &[PendingEvent]) -> Vec<Verdict> {
            *self.calls.lock().expect("calls") += 1;
            match self.answer_after {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending::<()>().await,
            }
            batch.iter().map(|_| Verdict::Delivered).collect()
        }
    }

    /// Runs a forwarder on 5 events into `sink`, stops it once the sink
    /// has the batch, and returns the journal after the forwarder ended.
    async fn stop_during_delivery(
        dir: &std::path::Path,
        answer_after: Option<Duration>,
    ) -> Journal {
        let journal = journal_with_events(dir, 5);
        let calls = Arc::new(Mutex::new(0));
        let sink = Slow {
            answer_after,
            calls: calls.clone(),
        };
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(
            journal.clone(),
            "erp".into(),
            Box::new(sink),
            ForwarderSettings {
                batch_size: 10,
                retry_initial: Duration::from_millis(1),
                retry_max: Duration::from_millis(5),
                max_attempts: None,
            },
            stop,
            Arc::default(),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while *calls.lock().expect("calls") == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the sink never got the batch"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = stop_tx.send(true);
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the forwarder stops while its sink waits")
            .expect("forwarder");
        journal
    }

    #[tokio::test]
    async fn a_stop_does_not_wait_for_a_delivery_that_never_answers_and_keeps_its_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = stop_during_delivery(dir.path(), None).await;
        assert_eq!(journal.backlog("erp").expect("backlog"), 5);
        assert!(journal.dead_letters().expect("dead").is_empty());
        assert_eq!(
            journal.read_batch("erp", 10).expect("read").len(),
            5,
            "handed out again"
        );
    }

    #[tokio::test]
    async fn a_delivery_answering_within_the_grace_is_recorded_at_a_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = stop_during_delivery(dir.path(), Some(Duration::from_millis(100))).await;
        assert_eq!(
            journal.backlog("erp").expect("backlog"),
            0,
            "what the endpoint took is not sent again at the next start"
        );
    }

    fn journal_with_events(dir: &std::path::Path, n: u64) -> Journal {
        let mut config = buffer::JournalConfig::new(dir.join("journal"));
        config.sinks = vec!["erp".into()];
        let journal = Journal::open(config).expect("journal");
        let routes = journal.routes_all();
        journal
            .append_blocking(buffer::AppendRequest {
                source: "press1".into(),
                events: (0..n)
                    .map(|i| buffer::NewEvent {
                        id: uuid::Uuid::from_u128(u128::from(i) + 1),
                        class: buffer::EventClass::Business,
                        routes,
                        payload: br#"{"type":"production.completion"}"#.to_vec(),
                        ledger: None,
                    })
                    .collect(),
                cursor: None,
            })
            .expect("append")
            .expect("fits");
        journal
    }

    #[tokio::test]
    async fn a_held_endpoint_keeps_every_event_past_max_attempts_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = journal_with_events(dir.path(), 5);
        let settings = ForwarderSettings {
            batch_size: 10,
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(5),
            max_attempts: Some(2),
        };
        let attempts = Arc::new(Mutex::new(0));
        let status: SharedStatus = Arc::default();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(
            journal.clone(),
            "erp".into(),
            Box::new(Refusing(attempts.clone())),
            settings,
            stop,
            status.clone(),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while *attempts.lock().expect("attempts") < 5 {
            assert!(std::time::Instant::now() < deadline, "no retries");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let holding = status.lock().expect("status").holding.clone();
        assert!(
            holding.is_some_and(|h| h.contains("403")),
            "status says why the sink is held"
        );
        let _ = stop_tx.send(true);
        task.await.expect("forwarder");
        assert!(
            journal.dead_letters().expect("dead").is_empty(),
            "max_attempts never empties a held backlog into the dead letters"
        );
        assert_eq!(journal.backlog("erp").expect("backlog"), 5);
        // Stopped while holding: what was handed out is read again.
        assert_eq!(journal.read_batch("erp", 10).expect("read").len(), 5);
    }

    #[test]
    fn rejection_reasons_are_grouped_by_kind_and_source_time_is_found() {
        assert_eq!(reason_kind("HTTP 422: unknown material M-7"), "HTTP 422");
        assert_eq!(reason_kind("NotAuthorized"), "NotAuthorized");
        let payload = br#"{"specversion":"1.0","id":"x","source":"urn:a \"time\":\"no\"","type":"t","time":"2026-11-27T03:00:00.000Z","data":{"attributes":{"time":"1999-01-01T00:00:00Z"}}}"#;
        let t = source_time(payload).expect("time");
        assert_eq!(buffer::event::rfc3339_millis(t), "2026-11-27T03:00:00.000Z");
    }

    #[test]
    fn backoff_honours_the_peer_beyond_retry_max() {
        let settings = ForwarderSettings {
            batch_size: 10,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            max_attempts: None,
        };
        assert!(backoff(&settings, 30, None) <= Duration::from_secs(2));
        assert_eq!(
            backoff(&settings, 0, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
    }
}
