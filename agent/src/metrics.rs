//! The metrics and health endpoint: `/metrics` (Prometheus text),
//! `/healthz` (process alive), `/readyz` (journal writable, not full,
//! backlog younger than the threshold), `/status` (JSON for `plant-edge
//! status` and the page), `/` (the read-only status page, one HTML file in
//! the binary). Loopback by default; values are read at scrape time from
//! the journal and the tasks' own counters, so nothing is counted twice.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use buffer::Journal;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protocols::source::SourceCounters;
use tokio::sync::watch;

use crate::forwarder::SharedStatus;

/// What the endpoint reads.
pub struct Metrics {
    /// The journal.
    pub journal: Journal,
    /// Forwarder status per sink.
    pub forwarders: BTreeMap<String, SharedStatus>,
    /// Each source's own counters, whatever its kind.
    pub sources: Vec<(String, Arc<dyn SourceCounters>)>,
    /// Durable-append latency of every source's appends.
    pub append_latency: Histogram,
    /// Events made per source and type.
    pub read: protocols::source::ReadCounts,
    /// `/readyz` fails when the oldest pending event is older than this.
    pub ready_max_age: Duration,
    /// Sinks registered in the journal but missing from the configuration
    /// (their backlog is kept until `journal sinks retire`).
    pub unconfigured_sinks: Vec<String>,
    /// Supervised source and sink tasks.
    pub tasks: crate::supervise::Tasks,
    /// Each source's kind and where it reads (status page).
    pub source_endpoints: BTreeMap<String, (String, String)>,
    /// Backlog and deliveries sampled over the last hour (status page).
    pub history: History,
    /// Per-line delivery figures, reused between scrapes.
    pub lines: crate::line_status::LineCache,
}

/// A source's achieved poll intervals, as read at scrape time (one
/// family, so the exposition has one HELP and TYPE for all sources).
#[derive(Debug, Default)]
struct PollIntervals(std::sync::Mutex<Option<protocols::schedule::ScheduleSnapshot>>);

impl prometheus_client::metrics::TypedMetric for PollIntervals {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for PollIntervals {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = snapshot.as_ref() else {
            return Ok(());
        };
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            s.sum_seconds,
            s.count,
            &s.buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        <Self as prometheus_client::metrics::TypedMetric>::TYPE
    }
}

/// Samples of the whole journal's backlog and deliveries, one every
/// [`HISTORY_EVERY`], the last hour of them.
#[derive(Clone, Default)]
pub struct History(Arc<std::sync::Mutex<std::collections::VecDeque<Sample>>>);

/// One sample of [`History`].
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Sample {
    /// Unix seconds.
    pub t: u64,
    /// Events pending (not yet done by every sink).
    pub backlog: u64,
    /// Deliveries confirmed since start (all sinks).
    pub delivered: u64,
}

/// Sampling period of [`History`].
pub const HISTORY_EVERY: Duration = Duration::from_secs(10);
/// Samples kept: one hour.
const HISTORY_SAMPLES: usize = 360;

impl History {
    fn push(&self, sample: Sample) {
        let mut samples = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() >= HISTORY_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    fn samples(&self) -> Vec<Sample> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }
}

fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

type Labels = Vec<(String, String)>;

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("plant_edge");
        let s = self.journal.stats();
        let c = s.counters;
        let counters: [(&str, &str, u64); 10] = [
            (
                "journal_appended",
                "Events appended to the journal",
                c.appended,
            ),
            (
                "journal_duplicates",
                "Appends suppressed as duplicates (same id)",
                c.duplicates,
            ),
            (
                "journal_delivered",
                "Events acknowledged by a sink",
                c.delivered,
            ),
            (
                "journal_rejected",
                "Events a sink refused (dead-lettered)",
                c.rejected,
            ),
            (
                "journal_expired",
                "Events expired by TTL (dead-lettered)",
                c.expired,
            ),
            (
                "journal_dropped_telemetry",
                "Telemetry dropped for space (business events never are)",
                c.dropped_telemetry,
            ),
            (
                "journal_backpressured",
                "Business appends held for space",
                c.backpressured,
            ),
            (
                "journal_orphaned",
                "Events dead-lettered because their sink was removed",
                c.orphaned,
            ),
            (
                "journal_quarantined",
                "Events in chunks that no longer decoded",
                c.quarantined,
            ),
            ("journal_requeued", "Dead letters requeued", c.requeued),
        ];
        for (name, help, value) in counters {
            registry.register(name, help, ConstCounter::new(value));
        }
        let gauges: [(&str, &str, i64); 12] = [
            (
                "journal_dedup_ids",
                "Ids in the dedup window",
                s.dedup_ids as i64,
            ),
            (
                "journal_dedup_memory_bytes",
                "Memory the dedup window holds (bounded by journal.dedup_window_count)",
                s.dedup_bytes as i64,
            ),
            (
                "journal_pending_events",
                "Events not yet done by every sink",
                s.pending_events as i64,
            ),
            (
                "journal_pending_bytes",
                "Bytes of pending events",
                s.pending_bytes as i64,
            ),
            (
                "journal_used_bytes",
                "Pending plus dead-letter bytes (bounded by max_bytes)",
                s.used_bytes as i64,
            ),
            (
                "journal_max_bytes",
                "The journal's disk bound",
                s.max_bytes as i64,
            ),
            (
                "journal_dead_letters",
                "Dead letters kept",
                s.dead_letters as i64,
            ),
            (
                "journal_oldest_pending_age_seconds",
                "Age of the oldest pending event",
                (s.oldest_pending_age_ms.unwrap_or(0) / 1000) as i64,
            ),
            (
                "journal_full",
                "1 while business sources are held for space",
                i64::from(s.full),
            ),
            (
                "journal_disk_low",
                "1 while the journal's filesystem is below journal.min_free_disk (sources held)",
                i64::from(s.disk_low),
            ),
            (
                "journal_upgrade_uncommitted",
                "1 while a journal format upgrade is not committed (the previous version can roll back; the rollback spool grows)",
                i64::from(self.journal.upgrade_pending().is_some()),
            ),
            (
                "journal_disk_free_bytes",
                "Free bytes on the journal's filesystem",
                s.disk_free_bytes.unwrap_or(0) as i64,
            ),
        ];
        for (name, help, value) in gauges {
            registry.register(name, help, ConstGauge::new(value));
        }
        let backlog = Family::<Labels, Gauge>::default();
        for sink in &s.sinks {
            backlog
                .get_or_create(&vec![("sink".into(), sink.name.clone())])
                .set(sink.backlog as i64);
        }
        let parts = Family::<
            Labels,
            prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
        >::default();
        for l in crate::line_status::lines(&self.read, &self.journal, &self.lines) {
            let periods = [("current", Some(&l.current)), ("last", l.last.as_ref())];
            for (period, figures) in periods {
                let Some(f) = figures else { continue };
                for (kind, value) in [
                    ("counted", f.counted),
                    ("sent", f.sent),
                    ("delivered", f.delivered),
                    ("pending", f.pending),
                    ("dead_lettered", f.dead_lettered),
                ] {
                    parts
                        .get_or_create(&vec![
                            ("source".into(), l.source.clone()),
                            ("line".into(), l.line.clone()),
                            ("period".into(), period.into()),
                            ("kind".into(), kind.into()),
                        ])
                        .set(value);
                }
            }
        }
        registry.register(
            "line_parts",
            "Per line and period (current, last): parts counted at the PLC, sent, delivered, pending, dead-lettered",
            parts,
        );
        registry.register(
            "sink_backlog_events",
            "Sequences between a sink's cursor and the journal end",
            backlog,
        );
        let delivered = Family::<Labels, Gauge>::default();
        let rejected = Family::<Labels, Gauge>::default();
        let retries = Family::<Labels, Gauge>::default();
        let up = Family::<Labels, Gauge>::default();
        let held = Family::<Labels, Gauge>::default();
        let unconfigured = Family::<Labels, Gauge>::default();
        let by_reason = Family::<Labels, Gauge>::default();
        let accepted_pending = Family::<Labels, Gauge>::default();
        let pending_overdue = Family::<Labels, Gauge>::default();
        let pending_age = Family::<Labels, Gauge>::default();
        for (name, status) in &self.forwarders {
            let st = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let labels = vec![("sink".to_owned(), name.clone())];
            for (reason, n) in &st.rejected_reasons {
                by_reason
                    .get_or_create(&vec![
                        ("sink".to_owned(), name.clone()),
                        ("reason".to_owned(), reason.clone()),
                    ])
                    .set(*n as i64);
            }
            // The histogram shares its buckets with the forwarder's copy.
            registry
                .sub_registry_with_label(("sink".into(), name.clone().into()))
                .register(
                    "delivery_latency_seconds",
                    "Seconds from an event's source time to the sink's acknowledgement",
                    st.delivery_latency.clone(),
                );
            delivered.get_or_create(&labels).set(st.delivered as i64);
            rejected.get_or_create(&labels).set(st.rejected as i64);
            retries.get_or_create(&labels).set(st.retries as i64);
            up.get_or_create(&labels)
                .set(i64::from(st.retrying.is_none()));
            held.get_or_create(&labels)
                .set(i64::from(st.holding.is_some()));
            accepted_pending
                .get_or_create(&labels)
                .set(st.accepted_pending as i64);
            pending_overdue
                .get_or_create(&labels)
                .set(st.pending_overdue as i64);
            let age = st
                .pending_since
                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                .map_or(0, |d| d.as_secs() as i64);
            pending_age.get_or_create(&labels).set(age);
        }
        registry.register(
            "sink_accepted_pending_events",
            "Events the ERP accepted (queued) and has not booked yet; kept in the journal",
            accepted_pending,
        );
        registry.register(
            "sink_accepted_pending_overdue_events",
            "Accepted-pending events older than the sink's pending.alarm_after",
            pending_overdue,
        );
        registry.register(
            "sink_accepted_pending_oldest_age_seconds",
            "Age of the oldest accepted-pending event (0: none)",
            pending_age,
        );
        for name in &self.unconfigured_sinks {
            unconfigured
                .get_or_create(&vec![("sink".to_owned(), name.clone())])
                .set(1);
        }
        registry.register(
            "sink_held",
            "1 while the sink's endpoint refuses every delivery (backlog kept, not dead-lettered)",
            held,
        );
        registry.register(
            "sink_unconfigured",
            "1 for a sink the journal holds events for that the configuration no longer names",
            unconfigured,
        );
        let task_up = Family::<Labels, Gauge>::default();
        let task_restarts = Family::<Labels, Gauge>::default();
        for task in self.tasks.snapshot() {
            let labels = vec![
                ("kind".to_owned(), task.kind.to_owned()),
                ("task".to_owned(), task.name.clone()),
            ];
            task_up.get_or_create(&labels).set(i64::from(task.up));
            task_restarts
                .get_or_create(&labels)
                .set(task.restarts as i64);
        }
        registry.register(
            "task_up",
            "1 while a supervised source or sink task runs",
            task_up,
        );
        registry.register(
            "task_restarts",
            "Restarts of a supervised task after a panic or an unexpected end",
            task_restarts,
        );
        let lost = Family::<Labels, Gauge>::default();
        for (source, n) in self.read.positions_lost() {
            lost.get_or_create(&vec![("source".to_owned(), source)])
                .set(n as i64);
        }
        registry.register(
            "source_positions_lost",
            "Stored source positions that did not decode (counters restarted at a baseline in a new id namespace)",
            lost,
        );
        registry.register(
            "sink_delivered_events",
            "Events delivered by this process, per sink",
            delivered,
        );
        registry.register(
            "sink_rejected_events",
            "Events dead-lettered by this process, per sink",
            rejected,
        );
        registry.register(
            "sink_retries",
            "Delivery retries by this process, per sink",
            retries,
        );
        registry.register("sink_up", "1 unless the sink is retrying", up);
        registry.register(
            "sink_rejected_events_by_reason",
            "Events dead-lettered by this process, per sink and reason kind",
            by_reason,
        );
        let read = Family::<Labels, Gauge>::default();
        for ((source, event_type), n) in self.read.snapshot() {
            read.get_or_create(&vec![
                ("source".into(), source),
                ("type".into(), event_type),
            ])
            .set(n as i64);
        }
        registry.register(
            "source_events_read",
            "Events sources made from what they read, per source and type, since start",
            read,
        );
        registry.register(
            "journal_append_latency_seconds",
            "Seconds from a source's append to the journal's durable answer",
            self.append_latency.clone(),
        );
        // One family per source kind, named by the kind itself.
        // Per family: help, counters by kind, connected.
        type Gauges = Family<Labels, Gauge>;
        let mut families: BTreeMap<&str, (&str, Gauges, Gauges)> = BTreeMap::new();
        for (source, counters) in &self.sources {
            let (family, help) = counters.family();
            let (_, values, up) = families
                .entry(family)
                .or_insert_with(|| (help, Family::default(), Family::default()));
            for (kind, value) in counters.counters() {
                values
                    .get_or_create(&vec![
                        ("source".into(), source.clone()),
                        ("kind".into(), kind.into()),
                    ])
                    .set(value as i64);
            }
            if let Some(connected) = counters.connected() {
                up.get_or_create(&vec![("source".into(), source.clone())])
                    .set(i64::from(connected));
            }
        }
        // Configured vs achieved poll interval of every source that polls.
        let configured = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let achieved = Family::<Labels, PollIntervals>::default();
        for (source, counters) in &self.sources {
            let Some(schedule) = counters.schedule() else {
                continue;
            };
            let labels = vec![("source".to_owned(), source.clone())];
            configured
                .get_or_create(&labels)
                .set(schedule.configured.as_secs_f64());
            *achieved
                .get_or_create(&labels)
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(schedule);
        }
        registry.register(
            "source_poll_interval_seconds",
            "Seconds between a source's consecutive polls as achieved (compare source_poll_interval_configured_seconds)",
            achieved,
        );
        registry.register(
            "source_poll_interval_configured_seconds",
            "The poll interval each polled source is configured with",
            configured,
        );
        for (family, (help, values, up)) in families {
            registry.register(family, help, values);
            registry.register(
                format!("{family}_up"),
                "1 while the device or server answers",
                up,
            );
        }
        let info = Family::<Labels, Gauge>::default();
        info.get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        registry.register("build_info", "Build of the running agent", info);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }

    /// `Ok` when the agent does its job; otherwise why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.journal.is_poisoned() {
            return Err("journal refuses writes after a failed sync".into());
        }
        if let Some(task) = self.tasks.first_down() {
            return Err(format!(
                "{} {} is down and being restarted ({})",
                task.kind,
                task.name,
                task.last_failure.unwrap_or_default()
            ));
        }
        let s = self.journal.stats();
        if s.disk_low {
            return Err(format!(
                "disk full: {} bytes free on the journal's filesystem, below journal.min_free_disk; business sources are held",
                s.disk_free_bytes.unwrap_or(0)
            ));
        }
        if s.full {
            return Err("journal full: business sources are held".into());
        }
        let age = Duration::from_millis(s.oldest_pending_age_ms.unwrap_or(0));
        if age > self.ready_max_age {
            return Err(format!("oldest pending event is {}s old", age.as_secs()));
        }
        for (name, status) in &self.forwarders {
            let holding = status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .holding
                .clone();
            if let Some(why) = holding {
                return Err(format!(
                    "sink {name} held: the endpoint refuses every delivery ({why})"
                ));
            }
        }
        if let Some(name) = self.unconfigured_sinks.first() {
            let backlog = s
                .sinks
                .iter()
                .find(|k| &k.name == name)
                .map_or(0, |k| k.backlog);
            return Err(format!(
                "sink {name} is not in the configuration but the journal keeps {backlog} events for it; restore it, or run `plant-edge journal sinks retire {name}` to move them to the dead letters"
            ));
        }
        Ok(())
    }

    /// One-screen summary for `plant-edge status`.
    pub fn status(&self) -> serde_json::Value {
        let s = self.journal.stats();
        let sinks: Vec<serde_json::Value> = s
            .sinks
            .iter()
            .map(|sink| {
                let forwarder = self.forwarders.get(&sink.name).map(|st| {
                    let st = st.lock().unwrap_or_else(|p| p.into_inner());
                    serde_json::json!({
                        "retrying": st.retrying,
                        "holding": st.holding,
                        "delivered": st.delivered,
                        "rejected": st.rejected,
                        "rejected_reasons": st.rejected_reasons,
                        "last_delivery": st.last_delivery.map(unix_seconds),
                        "last_error": st.last_error,
                        "accepted_pending": (st.accepted_pending > 0).then(|| serde_json::json!({
                            "events": st.accepted_pending,
                            "overdue": st.pending_overdue,
                            "oldest_age_s": st.pending_since
                                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                                .map(|d| d.as_secs()),
                            "state": st.pending_state,
                        })),
                    })
                });
                let field = |name: &str| {
                    forwarder
                        .as_ref()
                        .map_or(serde_json::Value::Null, |f| f[name].clone())
                };
                let configured = !self.unconfigured_sinks.contains(&sink.name);
                serde_json::json!({
                    "sink": sink.name,
                    "backlog": sink.backlog,
                    "retrying": field("retrying"),
                    "holding": field("holding"),
                    "delivered": field("delivered"),
                    "rejected": field("rejected"),
                    "rejected_reasons": field("rejected_reasons"),
                    "last_delivery": field("last_delivery"),
                    "last_error": field("last_error"),
                    "accepted_pending": field("accepted_pending"),
                    "configured": configured,
                })
            })
            .collect();
        let counters: BTreeMap<&str, &Arc<dyn SourceCounters>> =
            self.sources.iter().map(|(n, c)| (n.as_str(), c)).collect();
        let read = self.read.snapshot();
        let last = self.read.last_events();
        let sources: Vec<serde_json::Value> = self
            .tasks
            .snapshot()
            .into_iter()
            .filter(|t| t.kind == "source")
            .map(|t| {
                let own = counters.get(t.name.as_str());
                let (kind, endpoint) = self
                    .source_endpoints
                    .get(&t.name)
                    .cloned()
                    .unwrap_or_default();
                let events: BTreeMap<&str, u64> = read
                    .iter()
                    .filter(|((source, _), _)| *source == t.name)
                    .map(|((_, event_type), n)| (event_type.as_str(), *n))
                    .collect();
                serde_json::json!({
                    "source": t.name,
                    "kind": kind,
                    "endpoint": endpoint,
                    "up": t.up,
                    "connected": own.and_then(|c| c.connected()),
                    "restarts": t.restarts,
                    "last_failure": t.last_failure,
                    "events": events,
                    "last_event": last.get(&t.name).copied().map(unix_seconds),
                    "counters": own.map(|c| c.counters().into_iter().collect::<BTreeMap<_, _>>()),
                    "schedule": own.and_then(|c| c.schedule()).map(|s| serde_json::json!({
                        "configured_ms": s.configured.as_millis() as u64,
                        "achieved_ms": s.achieved.map(|a| (a.as_secs_f64() * 10_000.0).round() / 10.0),
                        "late": s.late,
                        "skipped": s.skipped,
                    })),
                })
            })
            .collect();
        serde_json::json!({
            "now": unix_seconds(std::time::SystemTime::now()),
            "sources": sources,
            "lines": crate::line_status::lines(&self.read, &self.journal, &self.lines),
            "recent_events": self.read.recent(),
            "history": self.history.samples(),
            "version": env!("CARGO_PKG_VERSION"),
            "ready": self.ready().err().unwrap_or_else(|| "ready".into()),
            "pending_events": s.pending_events,
            "oldest_pending_age_s": s.oldest_pending_age_ms.unwrap_or(0) / 1000,
            "used_bytes": s.used_bytes,
            "max_bytes": s.max_bytes,
            "dead_letters": s.dead_letters,
            "full": s.full,
            "sinks": sinks,
            "tasks": self.tasks.snapshot(),
            "counters": s.counters,
        })
    }
}

async fn metrics_text(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || m.render())
        .await
        .unwrap_or_default();
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
}

async fn ready_check(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match tokio::task::spawn_blocking(move || m.ready()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

async fn status_json(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || m.status().to_string())
        .await
        .unwrap_or_default();
    ([("content-type", "application/json")], body)
}

/// The query of `/ledger`.
#[derive(Debug, serde::Deserialize)]
struct LedgerWindow {
    from_ms: u64,
    to_ms: u64,
}

/// The journal's ledger over a window, for `journal report` and
/// `reconcile` while the agent holds the journal.
async fn ledger_json(
    State(m): State<Arc<Metrics>>,
    axum::extract::Query(window): axum::extract::Query<LedgerWindow>,
) -> impl IntoResponse {
    let answer = tokio::task::spawn_blocking(move || {
        m.journal
            .ledger(window.from_ms, window.to_ms)
            .map_err(|e| e.to_string())
            .and_then(|events| serde_json::to_string(&events).map_err(|e| e.to_string()))
    })
    .await;
    match answer {
        Ok(Ok(body)) => (StatusCode::OK, [("content-type", "application/json")], body),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

/// Serves until `stop`; a port already taken is logged, not fatal (the
/// agent's job matters more than its metrics).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "metrics endpoint not started");
            return;
        }
    };
    tracing::info!(%addr, "metrics and health endpoint listening");
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_check))
        .route("/status", get(status_json))
        .route("/ledger", get(ledger_json))
        .route("/", get(status_page))
        .with_state(metrics.clone());
    // The page's chart: backlog and deliveries over the last hour.
    let sampler = {
        let (metrics, mut stop) = (metrics.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HISTORY_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let m = metrics.clone();
                let sample = tokio::task::spawn_blocking(move || {
                    let s = m.journal.stats();
                    Sample {
                        t: unix_seconds(std::time::SystemTime::now()),
                        backlog: s.pending_events,
                        delivered: s.counters.delivered,
                    }
                })
                .await;
                if let Ok(sample) = sample {
                    metrics.history.push(sample);
                }
            }
        })
    };
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
    sampler.abort();
}

/// The status page: one self-contained HTML file (no CDN, no framework),
/// read-only, refreshing itself from `/status`.
async fn status_page() -> impl IntoResponse {
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
        ],
        include_str!("status_page.html"),
    )
}
