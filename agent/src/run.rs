//! Wiring: journal, writer, forwarders, sources; and orderly shutdown.
//!
//! Shutdown order keeps the contract: sources stop first (no new appends,
//! nothing acknowledged to a PLC that is not durable), the writer commits
//! what it holds and ends once every appender is dropped, forwarders finish
//! the batch in hand, then the journal is synced. Everything is bounded by
//! `agent.shutdown_timeout`; what is not delivered by then stays in the
//! journal for the next start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use buffer::{Journal, JournalConfig};
use protocols::sinks::file::FileSink;
use protocols::sinks::mqtt::MqttSink;
use protocols::source::{Classifier, SourceContext, SourceCounters};
use protocols::sources::simulated::{self, Tally};
use protocols::Sink;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, SinkKind, SourceKind};
use crate::forwarder::{self, SharedStatus};
use crate::supervise::{self, Tasks};
use prometheus_client::metrics::histogram::Histogram;

/// Journal settings from the agent config.
pub fn journal_config(config: &Config) -> JournalConfig {
    let mut jc = JournalConfig::new(config.journal_dir());
    jc.max_bytes = config.journal.max_bytes;
    jc.ttl = config.journal.ttl;
    jc.cache_bytes = config.journal.cache_bytes;
    jc.min_free_disk = config.journal.min_free_disk;
    jc.ledger_keep = config.journal.ledger_keep;
    jc.ledger_max_bytes = config.journal.ledger_max_bytes;
    jc.dedup_window = config.journal.dedup_window;
    jc.dedup_window_count = config.journal.dedup_window_count;
    jc.commit_window = config.journal.commit_window;
    jc.sinks = config.sinks.iter().map(|s| s.name.clone()).collect();
    jc
}

/// A started agent.
// Status fields are read by the demo's progress line only.
#[cfg_attr(not(feature = "demo"), allow(dead_code))]
pub struct RunningAgent {
    /// The journal (for stats).
    pub journal: Journal,
    /// Per-sink forwarder status.
    pub forwarders: BTreeMap<String, SharedStatus>,
    /// Each source's own counters, whatever its kind.
    pub source_counters: Vec<(String, Arc<dyn SourceCounters>)>,
    /// Supervised source and sink tasks.
    pub tasks: Tasks,
    stop_sources: watch::Sender<bool>,
    stop_forwarders: watch::Sender<bool>,
    sources: Vec<JoinHandle<()>>,
    forwarder_tasks: Vec<JoinHandle<()>>,
    writer: JoinHandle<()>,
    shutdown_timeout: Duration,
}

/// One start of a source task, from the context of that start.
type SourceTask = Box<
    dyn Fn(SourceContext) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// The source kinds: each kind's counters (shown in metrics and status)
/// and how one start of it runs. A new kind is one arm here.
fn source_task(kind: &SourceKind, tally: &Tally) -> (Option<Arc<dyn SourceCounters>>, SourceTask) {
    match kind {
        SourceKind::Simulated(sc) => {
            let (sc, tally) = (sc.clone(), tally.clone());
            let task: SourceTask =
                Box::new(move |ctx| Box::pin(simulated::run(ctx, sc.clone(), tally.clone())));
            (None, task)
        }
        SourceKind::Modbus(mc) => {
            let stats = Arc::new(protocols::sources::modbus::ModbusStats::default());
            let (mc, counters) = ((**mc).clone(), stats.clone());
            let task: SourceTask = Box::new(move |ctx| {
                Box::pin(protocols::sources::modbus::run(
                    ctx,
                    mc.clone(),
                    stats.clone(),
                ))
            });
            (Some(counters), task)
        }
        SourceKind::OpcUa(oc) => {
            let stats = Arc::new(protocols::sources::opcua::OpcUaStats::default());
            let (oc, counters) = ((**oc).clone(), stats.clone());
            let task: SourceTask = Box::new(move |ctx| {
                Box::pin(protocols::sources::opcua::run(
                    ctx,
                    oc.clone(),
                    stats.clone(),
                ))
            });
            (Some(counters), task)
        }
    }
}

/// Each source kind's name and where it reads, for the status page.
fn source_endpoint(kind: &SourceKind) -> (String, String) {
    match kind {
        SourceKind::Simulated(sc) => ("simulated".into(), format!("sim://{}", sc.machine)),
        SourceKind::Modbus(mc) => ("modbus".into(), mc.endpoint.to_string()),
        SourceKind::OpcUa(oc) => ("opcua".into(), oc.connection.endpoint.clone()),
    }
}

/// The sink kinds: how each is built (at start and after a panic).
fn build_sink(kind: &SinkKind) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match kind {
        SinkKind::File(fc) => Box::new(FileSink::open(fc.clone())?),
        SinkKind::Mqtt(mc) => Box::new(MqttSink::start((**mc).clone())?),
        SinkKind::Https(hc) => Box::new(protocols::sinks::https::HttpsSink::new((**hc).clone())?),
    })
}

impl RunningAgent {
    /// Opens the journal and starts everything.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let jc = journal_config(config);
        let (journal, moved) =
            match tokio::task::spawn_blocking(move || Journal::open_or_move_aside(jc))
                .await
                .context("journal open task")?
            {
                Ok(opened) => opened,
                // Exits 65, which systemd does not retry: retrying cannot help.
                Err(e @ buffer::JournalError::NewerFormat { .. }) => return Err(e.into()),
                Err(e) => {
                    return Err(anyhow::Error::from(e)
                        .context("the journal was left as it is; fix the cause (systemd retries)"))
                }
            };
        if let Some(old) = moved {
            tracing::error!(old = %old.display(), "started with a FRESH journal; the unreadable one was kept at this path");
        }
        // A sink missing from the config may be a typo: its backlog stays
        // (and holds the journal's space) until it is retired explicitly.
        let mut unconfigured_sinks = Vec::new();
        for registered in journal.sink_names() {
            if !config.sinks.iter().any(|s| s.name == registered) {
                let backlog = journal.backlog(&registered).unwrap_or(0);
                tracing::error!(sink = %registered, backlog, "SINK NOT CONFIGURED: the journal keeps its undelivered events; restore it in the config, or run `plant-edge journal sinks retire {registered}` to move them to the dead letters");
                unconfigured_sinks.push(registered);
            }
        }
        let stats = journal.stats();
        tracing::info!(
            journal = %config.journal_dir().display(),
            pending = stats.pending_events,
            dead_letters = stats.dead_letters,
            next_seq = stats.next_seq,
            "journal open"
        );
        if let Some(upgrade) = journal.upgrade_pending() {
            let grace = config.journal.upgrade_grace;
            tracing::warn!(
                from_format = upgrade.from_format,
                to_format = upgrade.to_format,
                kept = %upgrade.kept,
                commits_after = %humantime::format_duration(grace),
                "journal upgrade not yet committed: the previous version can still roll back to the kept journal; `plant-edge journal commit-upgrade` commits it"
            );
            if !grace.is_zero() {
                let journal = journal.clone();
                // The clock restarts with every start: an agent that keeps
                // failing never commits, and a rollback stays possible.
                let delivered_at_start = journal.counters().delivered;
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    // Healthy: the journal writes, has room, and the new
                    // version has delivered something (or owes nothing).
                    // Until then the previous version stays one boot away.
                    loop {
                        let stats = journal.stats();
                        let delivering = journal.counters().delivered > delivered_at_start
                            || stats.pending_events == 0;
                        if !journal.is_poisoned() && !stats.full && !stats.disk_low && delivering {
                            break;
                        }
                        tokio::time::sleep(grace.min(Duration::from_secs(60))).await;
                    }
                    match journal.commit_upgrade() {
                        Ok(Some((marker, freed))) => tracing::info!(
                            kept = %marker.kept,
                            freed_bytes = freed,
                            "journal upgrade committed after its grace period"
                        ),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "committing the journal upgrade failed; it stays uncommitted")
                        }
                    }
                });
            }
        }

        let (stop_forwarders, stop_fw_rx) = watch::channel(false);
        let mut forwarders = BTreeMap::new();
        let mut forwarder_tasks = Vec::new();
        let tasks = Tasks::default();
        for sink in &config.sinks {
            // Built once here so that a bad sink fails the start loudly;
            // a restart after a panic builds it again.
            let mut first = Some(
                build_sink(&sink.kind).with_context(|| format!("starting sink {}", sink.name))?,
            );
            let status: SharedStatus = Arc::default();
            forwarders.insert(sink.name.clone(), status.clone());
            let (journal, name, kind, settings, stop) = (
                journal.clone(),
                sink.name.clone(),
                sink.kind.clone(),
                config.forwarder.clone(),
                stop_fw_rx.clone(),
            );
            forwarder_tasks.push(supervise::spawn(
                &tasks,
                "sink",
                &sink.name,
                stop_fw_rx.clone(),
                move || {
                    let built = match first.take() {
                        Some(built) => built,
                        None => match build_sink(&kind) {
                            Ok(built) => built,
                            Err(e) => {
                                tracing::error!(sink = %name, error = %format!("{e:#}"), "sink could not be started again");
                                return None;
                            }
                        },
                    };
                    Some(forwarder::run(
                        journal.clone(),
                        name.clone(),
                        built,
                        settings.clone(),
                        stop.clone(),
                        status.clone(),
                    ))
                },
            ));
        }

        let (appender, writer) = journal.start_writer();
        // 0.1 ms .. 5 s: an fsync is ~1 ms; a full journal parks appends.
        let append_latency = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
        ]);
        let observed = append_latency.clone();
        let appender = appender.observed(Arc::new(move |took: Duration| {
            observed.observe(took.as_secs_f64())
        }));
        let (stop_sources, stop_src_rx) = watch::channel(false);
        let tally: Tally = Arc::new(Mutex::new(BTreeMap::new()));
        let classifier = Classifier {
            telemetry_types: config.journal.telemetry_types.clone(),
        };
        let read = protocols::source::ReadCounts::default();
        let mut sources = Vec::new();
        let mut source_counters = Vec::new();
        for source in &config.sources {
            let ctx = SourceContext {
                site: config.site.clone(),
                gateway: config.gateway.clone(),
                name: source.name.clone(),
                attributes: source.attributes.clone(),
                routes: journal.routes_for(&source.sinks)?,
                classifier: classifier.clone(),
                appender: appender.clone(),
                initial_cursor: journal.source_cursor(&source.name)?,
                shutdown: stop_src_rx.clone(),
                read: read.clone(),
                periods: match &config.checkpoints {
                    Some(c) => Some(Arc::new(protocols::period::Checkpointing {
                        rule: (*c.rule).clone(),
                        routes: buffer::Routes(
                            journal.routes_for(&source.sinks)?.0 & journal.routes_for(&c.sinks)?.0,
                        ),
                    })),
                    None => None,
                },
            };
            // Every start, the first included, takes the position the
            // journal holds now: a restart must not count from start-up's.
            // An empty append first is a barrier: whatever a task that died
            // had queued is by then written or dropped (the writer drops
            // requests nobody waits for), so the position read is final.
            let (journal_for_restart, name) = (journal.clone(), source.name.clone());
            let fresh = move || {
                let (template, journal, name) =
                    (ctx.clone(), journal_for_restart.clone(), name.clone());
                async move {
                    let barrier = buffer::AppendRequest {
                        source: name.clone(),
                        events: Vec::new(),
                        cursor: None,
                    };
                    if let Err(e) = template.appender.append(barrier).await {
                        tracing::error!(source = %name, error = %e, "journal not answering; source not started");
                        return None;
                    }
                    match journal.source_cursor(&name) {
                        Ok(cursor) => Some(SourceContext {
                            initial_cursor: cursor,
                            ..template
                        }),
                        Err(e) => {
                            tracing::error!(source = %name, error = %e, "stored position unreadable; source not started");
                            None
                        }
                    }
                }
            };
            let stop = stop_src_rx.clone();
            let (counters, task) = source_task(&source.kind, &tally);
            if let Some(counters) = counters {
                source_counters.push((source.name.clone(), counters));
            }
            let task = Arc::new(task);
            let handle = supervise::spawn(&tasks, "source", &source.name, stop, move || {
                let (ready, task) = (fresh(), task.clone());
                Some(async move {
                    if let Some(ctx) = ready.await {
                        task(ctx).await;
                    }
                })
            });
            sources.push(handle);
        }
        if config.sources.is_empty() {
            tracing::warn!(
                "no sources configured: forwarding what the journal holds, reading nothing new"
            );
        }
        tracing::info!(config = %config.file.display(), sources = config.sources.len(), sinks = config.sinks.len(), "plant-edge running");
        if let Some(addr) = config.metrics_listen {
            let metrics = Arc::new(crate::metrics::Metrics {
                journal: journal.clone(),
                forwarders: forwarders.clone(),
                sources: source_counters.clone(),
                source_endpoints: config
                    .sources
                    .iter()
                    .map(|s| (s.name.clone(), source_endpoint(&s.kind)))
                    .collect(),
                history: Default::default(),
                lines: Default::default(),
                append_latency,
                read,
                ready_max_age: config.ready_max_backlog_age,
                unconfigured_sinks,
                tasks: tasks.clone(),
            });
            tokio::spawn(crate::metrics::serve(addr, metrics, stop_fw_rx.clone()));
        }
        Ok(Self {
            journal,
            forwarders,
            source_counters,
            tasks,
            stop_sources,
            stop_forwarders,
            sources,
            forwarder_tasks,
            writer,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// Orderly stop within the shutdown bound. Returns false if the bound
    /// was hit (what was not delivered stays in the journal).
    pub async fn stop(mut self) -> bool {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let _ = self.stop_sources.send(true);
        let mut in_time = true;
        for task in self.sources.drain(..) {
            in_time &= tokio::time::timeout_at(deadline, task).await.is_ok();
        }
        // Sources are gone, so every appender clone is dropped: the writer
        // commits what it holds and ends.
        in_time &= tokio::time::timeout_at(deadline, &mut self.writer)
            .await
            .is_ok();
        let _ = self.stop_forwarders.send(true);
        for task in self.forwarder_tasks.drain(..) {
            in_time &= tokio::time::timeout_at(deadline, task).await.is_ok();
        }
        let journal = self.journal.clone();
        match tokio::task::spawn_blocking(move || journal.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "final journal sync failed");
                in_time = false;
            }
            Err(e) => {
                tracing::error!(error = %e, "final journal sync task failed");
                in_time = false;
            }
        }
        if !in_time {
            tracing::warn!(timeout = ?self.shutdown_timeout, "shutdown bound reached; undelivered events stay in the journal");
        }
        in_time
    }
}

/// One STATUS= line for systemd: what an operator wants from
/// `systemctl status plant-edge`.
fn status_line(journal: &Journal) -> String {
    let s = journal.stats();
    format!(
        "backlog {} events, oldest {}s, dead letters {}{}",
        s.pending_events,
        s.oldest_pending_age_ms.unwrap_or(0) / 1000,
        s.dead_letters,
        if s.full {
            ", JOURNAL FULL: sources held"
        } else {
            ""
        }
    )
}

/// The watchdog is fed only when the agent can still do its job: the
/// journal accepts writes and answers a state query promptly from a
/// blocking thread (a deadlock or a starved runtime stops the pings, and
/// systemd restarts the service).
async fn healthy(journal: &Journal, tasks: &Tasks) -> bool {
    if journal.is_poisoned() {
        return false;
    }
    if let Some(task) = tasks.past_recovery() {
        tracing::error!(task = %task.name, kind = task.kind, failures = task.quick_failures, reason = ?task.last_failure, "a task keeps failing: letting systemd restart the agent");
        return false;
    }
    let j = journal.clone();
    let probe = tokio::task::spawn_blocking(move || j.stats().next_seq);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(_))
    )
}

/// `plant-edge run`: until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let agent = RunningAgent::start(&config).await?;
    // READY only now: the journal is open and sources and sinks started.
    let status = status_line(&agent.journal);
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    let watchdog = sd_notify::watchdog_enabled();
    let mut feed = tokio::time::interval(watchdog.map_or(Duration::from_secs(10), |w| {
        (w / 2).max(Duration::from_millis(10))
    }));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut report = tokio::time::interval(Duration::from_secs(60));
    report.tick().await;
    let mut health = tokio::time::interval(Duration::from_secs(1));
    let mut failed = false;
    loop {
        tokio::select! {
            _ = feed.tick() => {
                if healthy(&agent.journal, &agent.tasks).await {
                    let status = status_line(&agent.journal);
                    let mut states = vec![sd_notify::NotifyState::Status(&status)];
                    if watchdog.is_some() {
                        states.push(sd_notify::NotifyState::Watchdog);
                    }
                    let _ = sd_notify::notify(&states);
                } else {
                    tracing::error!("agent unhealthy: not feeding the systemd watchdog");
                }
            }
            _ = health.tick() => {
                if agent.journal.is_poisoned() {
                    // sled recovers from its log on the next start; carrying
                    // on would only fail every append. systemd restarts us.
                    tracing::error!("journal write failed: stopping so that a restart recovers it");
                    failed = true;
                    break;
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); break; }
            _ = report.tick() => {
                let s = agent.journal.stats();
                tracing::info!(pending = s.pending_events, appended = s.counters.appended, delivered = s.counters.delivered,
                    dead_letters = s.dead_letters, oldest_pending_ms = s.oldest_pending_age_ms, full = s.full, "status");
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    agent.stop().await;
    if failed {
        anyhow::bail!("the journal failed a write; restart to recover it");
    }
    tracing::info!("stopped");
    Ok(())
}
