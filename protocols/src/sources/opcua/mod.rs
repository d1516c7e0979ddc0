//! OPC UA source: production counters and completion records from an MES
//! or PLC, by subscription (or cyclic Read), over secure sessions.
//!
//! # Invariants
//!
//! - Counter and record state (counter epochs/totals, each record signal's
//!   last stored id and sequence) is the source's cursor, stored in the
//!   same journal batch as the events it produced and adopted only once
//!   that batch is durable. The shared rules in [`crate::counter`] decide
//!   increase, wrap and reset, exactly as for Modbus counters.
//! - A record's acknowledgement (node write or method call) is made only
//!   after the journal answered that the record is durable (or a duplicate
//!   of a durable one). A crash between the two re-reads the record after
//!   restart, finds it stored as pending, and acknowledges it without a
//!   second event.
//! - A record with an acknowledgement is identified by its exchange
//!   ([`HandshakePosition`]), not by its fields: the record node showing a
//!   different record, or cleared, releases the stored one (stored
//!   durably), and a later record with equal fields (an MES restarting its
//!   sequence) is a new fact with a new id. Records without an
//!   acknowledgement are identified by their key fields.
//! - After every (re)connect, and whenever notifications may have been
//!   missed (a gap in notification sequence numbers that Republish could
//!   not fill, or the bounded notification queue overflowed), every
//!   counter and record node is read once: counters catch up by delta,
//!   records by their id.
//! - Values older than the last one processed for the same node (a late
//!   republish after a fresh read) are skipped, so they cannot look like a
//!   counter reset.
//! - Sources naming the same server and identity share one session
//!   (`shared.rs`); each has its own subscription on it and serves one
//!   session generation at a time: any reconnect is, for every source,
//!   "subscribe again and read every node once".
//! - Bad status codes are counted and make no event; a malformed record
//!   (bad JSON, missing field, wrong type) is stored as a dead letter with
//!   the reason, counted, and not acknowledged.

mod config;
mod exchange;
mod periods;
pub mod record;
mod ring;
pub mod session;
mod shared;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use buffer::event::{EventData, Origin, Quantity};
use buffer::{CloudEvent, EventType};
use opcua::client::{MonitoredItemMap, OnSubscriptionNotificationCore, Session};
use opcua::types::{
    AttributeId, CallMethodRequest, DataChangeNotification, DataValue, MonitoredItemCreateRequest,
    MonitoringMode, MonitoringParameters, NodeId, NotificationMessage, ReadValueId,
    StatusChangeNotification, StatusCode, TimestampsToReturn, Variant, WriteValue,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::counter::{CounterRules, CounterState};
use crate::runtime::{Closed, Positioned};
use crate::source::{
    record_fingerprint, CounterSignal, FieldValue, HandshakePosition, Presented, RecordSignal,
    SourceContext,
};
pub use config::*;
pub use exchange::convert;
use record::{CounterValue, JsonField};
pub use session::{Connection, UserIdentity};

/// What an OPC UA source counts (shared with metrics and status).
#[derive(Debug, Default)]
pub struct OpcUaStats {
    /// Session up.
    pub connected: AtomicBool,
    /// Sessions established.
    pub connects: AtomicU64,
    /// Failed connects and lost sessions.
    pub connection_errors: AtomicU64,
    /// Data change notifications received.
    pub notifications: AtomicU64,
    /// Full reads of every node (start, reconnect, gap, poll).
    pub full_reads: AtomicU64,
    /// Notification messages missing from the sequence.
    pub sequence_gaps: AtomicU64,
    /// Missing notification messages recovered by Republish.
    pub republished: AtomicU64,
    /// Notifications not queued (queue full; a full read follows).
    pub notifications_dropped: AtomicU64,
    /// Values with a bad status code (no event).
    pub bad_status: AtomicU64,
    /// Values older than the one already processed (skipped).
    pub stale_values: AtomicU64,
    /// Counter values of an unusable type.
    pub bad_values: AtomicU64,
    /// Malformed records, stored as dead letters.
    pub malformed_records: AtomicU64,
    /// Records whose sequence jumped (the MES overwrote unread records).
    pub records_missed: AtomicU64,
    /// Events appended.
    pub events: AtomicU64,
    /// Records acknowledged to the MES.
    pub records_acked: AtomicU64,
    /// Acknowledgements (and ring read indexes) the server refused.
    pub ack_failures: AtomicU64,
    /// Records taken from ring buffers.
    pub ring_records: AtomicU64,
    /// Records the server overwrote in a lapped ring before they were read.
    pub records_overwritten: AtomicU64,
    /// Rings whose indexes matched no stored position (new namespace).
    pub ring_restarts: AtomicU64,
}

impl crate::source::SourceCounters for OpcUaStats {
    fn family(&self) -> (&'static str, &'static str) {
        ("opcua_source", "OPC UA source counters by kind since start")
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        [
            ("connects", &self.connects),
            ("connection_errors", &self.connection_errors),
            ("notifications", &self.notifications),
            ("full_reads", &self.full_reads),
            ("sequence_gaps", &self.sequence_gaps),
            ("republished", &self.republished),
            ("notifications_dropped", &self.notifications_dropped),
            ("bad_status", &self.bad_status),
            ("stale_values", &self.stale_values),
            ("bad_values", &self.bad_values),
            ("malformed_records", &self.malformed_records),
            ("records_missed", &self.records_missed),
            ("events", &self.events),
            ("records_acked", &self.records_acked),
            ("ack_failures", &self.ack_failures),
            ("ring_records", &self.ring_records),
            ("records_overwritten", &self.records_overwritten),
            ("ring_restarts", &self.ring_restarts),
        ]
        .into_iter()
        .map(|(kind, value)| (kind, value.load(Ordering::Relaxed)))
        .collect()
    }
    fn connected(&self) -> Option<bool> {
        Some(self.connected.load(Ordering::Relaxed))
    }
}

/// Cursor stored with every append.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Cursor {
    counters: BTreeMap<String, CounterState>,
    records: BTreeMap<String, RecordMark>,
    /// Exchanges of records with an acknowledgement, by signal.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    handshakes: BTreeMap<String, HandshakePosition>,
    /// Ring buffer positions, by signal.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    rings: BTreeMap<String, crate::ring::RingPosition>,
    /// Open reconciliation periods by line (when checkpoints are on).
    #[serde(default, skip_serializing_if = "crate::period::OpenPeriods::is_empty")]
    periods: crate::period::OpenPeriods,
}

impl crate::runtime::Position for Cursor {
    fn encode(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self).ok()
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// The last record stored for a record signal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RecordMark {
    id: String,
    sequence: Option<i64>,
}

/// A watched node: what it is for.
#[derive(Clone, Copy, Debug)]
enum Item {
    Counter(usize),
    Record(usize),
    /// A ring buffer's write index.
    RingIndex(usize),
}

/// From the subscription callback to the source task.
#[derive(Debug)]
enum Notice {
    Value(u32, DataValue),
    /// `count` notification messages from `first` on were not received
    /// (a count, never a list: a server may jump by billions).
    Gap {
        subscription: u32,
        first: u32,
        count: u32,
    },
    SubscriptionLost(StatusCode),
}

/// Most notification messages the source asks to republish for one gap;
/// beyond that a full read is cheaper.
const MAX_REPUBLISH: u32 = 32;
/// Most notifications the server may put in one publish response.
const MAX_NOTIFICATIONS_PER_PUBLISH: u32 = 5000;
/// Most values folded into one durable append.
const MAX_BATCH: usize = 4096;
/// Bound of the callback → task queue.
const NOTICE_QUEUE: usize = 8192;

struct Notifier {
    tx: mpsc::Sender<Notice>,
    last_sequence: Option<u32>,
    subscription: Arc<AtomicU64>,
    overflow: Arc<AtomicBool>,
    stats: Arc<OpcUaStats>,
}

impl Notifier {
    fn send(&self, notice: Notice) {
        if self.tx.try_send(notice).is_err() {
            self.stats
                .notifications_dropped
                .fetch_add(1, Ordering::Relaxed);
            self.overflow.store(true, Ordering::SeqCst);
        }
    }
}

impl OnSubscriptionNotificationCore for Notifier {
    fn on_subscription_notification(
        &mut self,
        message: NotificationMessage,
        _items: MonitoredItemMap<'_>,
    ) {
        let seq = message.sequence_number;
        let has_data = message
            .notification_data
            .as_ref()
            .is_some_and(|d| !d.is_empty());
        tracing::trace!(seq, has_data, last = ?self.last_sequence, "notification message");
        if !has_data {
            return;
        }
        if let Some(last) = self.last_sequence {
            if seq > last.wrapping_add(1) && seq > last {
                self.send(Notice::Gap {
                    subscription: self.subscription.load(Ordering::SeqCst) as u32,
                    first: last + 1,
                    count: seq - last - 1,
                });
            }
        }
        // A recreated subscription starts again at 1.
        self.last_sequence = Some(seq);
        for (handle, value) in values_of(message) {
            match value {
                Ok(value) => self.send(Notice::Value(handle, value)),
                Err(code) => self.send(Notice::SubscriptionLost(code)),
            }
        }
    }
}

/// Data change values in a notification message (status changes as `Err`).
fn values_of(message: NotificationMessage) -> Vec<(u32, Result<DataValue, StatusCode>)> {
    let mut out = Vec::new();
    for object in message.notification_data.into_iter().flatten() {
        if let Some(change) = object.inner_as::<DataChangeNotification>() {
            for item in change.monitored_items.iter().flatten() {
                out.push((item.client_handle, Ok(item.value.clone())));
            }
        } else if let Some(status) = object.inner_as::<StatusChangeNotification>() {
            if status.status.is_bad() {
                out.push((0, Err(status.status)));
            }
        }
    }
    out
}

/// Events and cursor not yet appended, and acknowledgements that wait for
/// them to be durable.
#[derive(Default)]
struct Pending {
    events: Vec<CloudEvent>,
    next: Option<Cursor>,
    acks: Vec<AckDue>,
    /// Ring read indexes to write once the batch is durable.
    releases: Vec<ring::Release>,
    /// The time each event's period is reckoned by, by id (ms).
    period_ms: BTreeMap<uuid::Uuid, u64>,
    /// Periods this batch closes, by line.
    closed: Vec<(String, crate::period::LineTally)>,
    /// Events routed other than the source's (checkpoints), by id.
    routes: BTreeMap<uuid::Uuid, buffer::Routes>,
}

/// An acknowledgement to send once its record is durable.
struct AckDue {
    signal: String,
    id: String,
    ack: Ack,
    values: BTreeMap<String, FieldValue>,
    raw: BTreeMap<String, Variant>,
}

/// A record's fields decoded, and as read (for acknowledgements that echo
/// a field with its original type).
type Fields = (BTreeMap<String, FieldValue>, BTreeMap<String, Variant>);

/// Why serving a session stopped.
enum Stop {
    Shutdown,
    Lost(String),
}

/// The OPC UA source task: subscribes (or polls) on the session it shares
/// with every source naming the same server and identity, subscribes
/// again after every reconnect, until shutdown.
pub async fn run(ctx: SourceContext, config: OpcUaConfig, stats: Arc<OpcUaStats>) {
    let mut cursor = Positioned::<Cursor>::load(&ctx);
    let mut shutdown = ctx.shutdown.clone();
    let shared = shared::SharedSession::for_connection(&config.connection);
    let mut state = shared.watch();
    // A source's own trouble on a working session (its subscription
    // refused, a read failing) is retried with its own backoff.
    let mut backoff =
        crate::pace::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut served_generation = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let current = state.borrow_and_update().clone();
        let (generation, session) = match current {
            shared::LinkState::Up {
                generation,
                session,
            } => (generation, session),
            shared::LinkState::Connecting | shared::LinkState::Down { .. } => {
                if let shared::LinkState::Down { reason } = &current {
                    stats.connected.store(false, Ordering::SeqCst);
                    tracing::debug!(source = %ctx.name, reason = %reason, "waiting for the OPC UA session");
                }
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { return },
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        if served_generation != Some(generation) {
            stats.connects.fetch_add(1, Ordering::Relaxed);
            served_generation = Some(generation);
        }
        stats.connected.store(true, Ordering::SeqCst);
        let (link_tx, mut link_rx) = mpsc::channel(16);
        let watcher = shared::forward_end(shared.watch(), generation, link_tx);
        let subscription = Arc::new(AtomicU64::new(0));
        let stop = serve(
            &ctx,
            &config,
            &stats,
            &session,
            &mut link_rx,
            &mut cursor,
            &subscription,
        )
        .await;
        watcher.abort();
        stats.connected.store(false, Ordering::SeqCst);
        let still_up = matches!(&*state.borrow(), shared::LinkState::Up { generation: g, .. } if *g == generation);
        let id = subscription.load(Ordering::SeqCst) as u32;
        if still_up && id != 0 {
            // The session stays for the other sources: take this source's
            // subscription off it.
            let _ =
                tokio::time::timeout(Duration::from_secs(2), session.delete_subscription(id)).await;
        }
        match stop {
            Stop::Shutdown => return,
            Stop::Lost(reason) => {
                stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                if still_up {
                    let wait = backoff.next_wait();
                    tracing::warn!(source = %ctx.name, endpoint = %config.connection.endpoint, error = %reason, retry_in_ms = wait.as_millis() as u64, "OPC UA source stopped serving on a working session; subscribing again after a pause");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                } else {
                    // The session owner logs the outage once for all its
                    // sources and reconnects.
                    tracing::debug!(source = %ctx.name, error = %reason, "session lost; waiting for the next one");
                    backoff.reset();
                }
            }
        }
    }
}

/// The nodes watched, in client-handle order (handle = index + 1).
fn watched(config: &OpcUaConfig) -> Vec<(NodeId, Item)> {
    config
        .counters
        .iter()
        .enumerate()
        .map(|(i, c)| (c.node.clone(), Item::Counter(i)))
        .chain(
            config
                .records
                .iter()
                .enumerate()
                .map(|(i, r)| (r.trigger.clone(), Item::Record(i))),
        )
        .chain(
            config
                .rings
                .iter()
                .enumerate()
                .map(|(i, r)| (r.write_index.clone(), Item::RingIndex(i))),
        )
        .collect()
}

struct Served<'a> {
    ctx: &'a SourceContext,
    config: &'a OpcUaConfig,
    stats: &'a OpcUaStats,
    session: &'a Session,
    cursor: &'a mut Positioned<Cursor>,
    items: Vec<(NodeId, Item)>,
    /// One per configured counter, built once rather than per value.
    counter_signals: Vec<CounterSignal>,
    /// One per configured record.
    record_signals: Vec<RecordSignal>,
    ring_signals: Vec<RecordSignal>,
    /// Newest timestamp processed per item (ticks), against stale values.
    newest: Vec<i64>,
    /// Record ids acknowledged during this session.
    acked: BTreeMap<String, String>,
    /// Read every node again on the next tick.
    resync: bool,
    /// Last record id whose acknowledgement failed (logged once).
    ack_failed: BTreeMap<String, String>,
    /// Last malformed record text per signal (counted once).
    malformed_seen: BTreeMap<String, String>,
    /// Processed but not yet durable.
    pending: Pending,
    /// No batch stored yet in this session: what was made since the last
    /// stored reading may span a period boundary.
    resumed: bool,
}

async fn serve(
    ctx: &SourceContext,
    config: &OpcUaConfig,
    stats: &Arc<OpcUaStats>,
    session: &Session,
    link: &mut mpsc::Receiver<session::LinkEvent>,
    cursor: &mut Positioned<Cursor>,
    subscription: &Arc<AtomicU64>,
) -> Stop {
    let items = watched(config);
    let mut served = Served {
        ctx,
        config,
        stats,
        session,
        cursor,
        newest: vec![i64::MIN; items.len()],
        items,
        counter_signals: config
            .counters
            .iter()
            .map(|spec| CounterSignal {
                name: spec.signal.clone(),
                event_type: spec.event_type.clone(),
                unit: spec.unit.clone(),
                line: spec.place.line_or(&config.line),
                machine: spec.place.machine_or(&config.machine),
                attributes: spec.place.attributes.clone(),
                // The width comes with each value (its OPC UA data type);
                // floats have none (observe_measure ignores the rules).
                rules: CounterRules {
                    width: crate::counter::CounterWidth::U64,
                    max_step: spec.max_step,
                },
            })
            .collect(),
        record_signals: config
            .records
            .iter()
            .map(|spec| RecordSignal {
                name: spec.signal.clone(),
                event_type: spec.event_type.clone(),
                unit: spec.unit.clone(),
                line: spec.place.line_or(&config.line),
                machine: spec.place.machine_or(&config.machine),
                attributes: spec.place.attributes.clone(),
                reasons: spec.place.reasons.clone(),
                key: spec.key.clone(),
                type_from: spec.type_from.clone(),
            })
            .collect(),
        ring_signals: config
            .rings
            .iter()
            .map(|spec| RecordSignal {
                name: spec.signal.clone(),
                event_type: spec.event_type.clone(),
                unit: spec.unit.clone(),
                line: spec.place.line_or(&config.line),
                machine: spec.place.machine_or(&config.machine),
                attributes: spec.place.attributes.clone(),
                reasons: spec.place.reasons.clone(),
                key: Vec::new(),
                type_from: spec.type_from.clone(),
            })
            .collect(),
        acked: BTreeMap::new(),
        resync: false,
        ack_failed: BTreeMap::new(),
        malformed_seen: BTreeMap::new(),
        pending: Pending::default(),
        resumed: true,
    };
    let mut shutdown = ctx.shutdown.clone();
    let overflow = Arc::new(AtomicBool::new(false));
    let (tx, mut notices) = mpsc::channel(NOTICE_QUEUE);
    let poll_every = match &config.acquisition {
        Acquisition::Subscription {
            publishing_interval,
            sampling_interval,
            queue_size,
            keep_alive_count,
            lifetime_count,
        } => {
            let notifier = Notifier {
                tx,
                // A new subscription numbers its messages from 1, so a
                // lost first message is a gap too.
                last_sequence: Some(0),
                subscription: subscription.clone(),
                overflow: overflow.clone(),
                stats: stats.clone(),
            };
            let created = session
                .create_subscription(
                    *publishing_interval,
                    *lifetime_count,
                    *keep_alive_count,
                    MAX_NOTIFICATIONS_PER_PUBLISH,
                    0,
                    true,
                    notifier,
                )
                .await;
            let id = match created {
                Ok(id) => id,
                Err(e) => return Stop::Lost(format!("creating subscription: {e}")),
            };
            subscription.store(u64::from(id), Ordering::SeqCst);
            let requests: Vec<MonitoredItemCreateRequest> = served
                .items
                .iter()
                .enumerate()
                .map(|(i, (node, item))| MonitoredItemCreateRequest {
                    item_to_monitor: ReadValueId {
                        node_id: node.clone(),
                        attribute_id: AttributeId::Value as u32,
                        ..Default::default()
                    },
                    monitoring_mode: MonitoringMode::Reporting,
                    requested_parameters: MonitoringParameters {
                        client_handle: i as u32 + 1,
                        sampling_interval: sampling_interval.requested_ms(),
                        queue_size: *queue_size,
                        // A record overwritten before it was published must
                        // not push out the one before it.
                        discard_oldest: !matches!(item, Item::Record(_)),
                        ..Default::default()
                    },
                })
                .collect();
            match session
                .create_monitored_items(id, TimestampsToReturn::Both, requests)
                .await
            {
                Ok(results) => {
                    for (result, (node, _)) in results.iter().zip(&served.items) {
                        if result.result.status_code.is_bad() {
                            tracing::error!(source = %ctx.name, node = %node, status = %result.result.status_code, "node cannot be monitored; check the node id with `plant-edge probe opcua`");
                        }
                    }
                }
                Err(e) => return Stop::Lost(format!("creating monitored items: {e}")),
            }
            // Sequence numbers, gaps and queues are per subscription; a
            // full read after it exists closes any window before it.
            Duration::from_secs(1)
        }
        Acquisition::Polling { interval } => {
            drop(tx);
            *interval
        }
    };
    let polling = matches!(config.acquisition, Acquisition::Polling { .. });
    if let Err(stop) = served.full_read().await {
        return stop;
    }
    let mut tick = tokio::time::interval(poll_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return Stop::Shutdown;
                }
            }
            event = link.recv() => match event {
                Some(session::LinkEvent::Connected) => {
                    if let Err(stop) = served.full_read().await {
                        return stop;
                    }
                }
                Some(session::LinkEvent::Lost(code)) | Some(session::LinkEvent::Ended(code)) => {
                    return Stop::Lost(session::explain(code, &config.connection, ""));
                }
                None => return Stop::Lost("session ended".into()),
            },
            notice = notices.recv(), if !polling => match notice {
                Some(Notice::Value(handle, value)) => {
                    // Everything already queued goes into the same durable
                    // append: one fsync for a burst, not one per value.
                    let mut next = Some(Notice::Value(handle, value));
                    let mut taken = 0;
                    loop {
                        match next.take() {
                            Some(Notice::Value(handle, value)) => {
                                stats.notifications.fetch_add(1, Ordering::Relaxed);
                                if let Err(stop) = served.on_value(handle, value).await {
                                    return stop;
                                }
                                taken += 1;
                                if taken >= MAX_BATCH {
                                    break;
                                }
                                next = notices.try_recv().ok();
                            }
                            other => {
                                // A gap or a lost subscription: handled
                                // after what came before it is durable.
                                next = other;
                                break;
                            }
                        }
                    }
                    if let Err(stop) = served.flush().await {
                        return stop;
                    }
                    match next {
                        Some(Notice::Gap { subscription, first, count }) => {
                            if let Err(stop) = served.fill_gap(subscription, first, count).await {
                                return stop;
                            }
                        }
                        Some(Notice::SubscriptionLost(code)) => {
                            return Stop::Lost(format!("subscription ended by the server ({code})"));
                        }
                        Some(Notice::Value(..)) | None => {}
                    }
                }
                Some(Notice::Gap { subscription, first, count }) => {
                    if let Err(stop) = served.fill_gap(subscription, first, count).await {
                        return stop;
                    }
                }
                Some(Notice::SubscriptionLost(code)) => {
                    return Stop::Lost(format!("subscription ended by the server ({code})"));
                }
                None => return Stop::Lost("subscription closed".into()),
            },
            _ = tick.tick() => {
                // An idle line's period still closes on time.
                served.close_periods(SystemTime::now());
                if !served.pending.events.is_empty() {
                    if let Err(stop) = served.flush().await {
                        return stop;
                    }
                }
                let resync = std::mem::take(&mut served.resync);
                if polling || overflow.swap(false, Ordering::SeqCst) || resync {
                    if let Err(stop) = served.full_read().await {
                        return stop;
                    }
                }
            }
        }
    }
}

impl Served<'_> {
    fn endpoint(&self) -> &str {
        &self.config.connection.endpoint
    }

    /// Reads every watched node once and processes the values.
    async fn full_read(&mut self) -> Result<(), Stop> {
        self.stats.full_reads.fetch_add(1, Ordering::Relaxed);
        let nodes: Vec<ReadValueId> = self
            .items
            .iter()
            .map(|(node, _)| ReadValueId {
                node_id: node.clone(),
                attribute_id: AttributeId::Value as u32,
                ..Default::default()
            })
            .collect();
        let mut values = Vec::with_capacity(nodes.len());
        for chunk in nodes.chunks(500) {
            match self
                .session
                .read(chunk, TimestampsToReturn::Both, 0.0)
                .await
            {
                Ok(v) => values.extend(v),
                Err(e) => {
                    return Err(Stop::Lost(session::explain(
                        e.status(),
                        &self.config.connection,
                        &e.to_string(),
                    )))
                }
            }
        }
        for (i, value) in values.into_iter().enumerate() {
            self.on_value(i as u32 + 1, value).await?;
        }
        self.flush().await
    }

    /// Asks the server to resend missing notification messages; a full
    /// read covers whatever it no longer has.
    async fn fill_gap(&mut self, subscription: u32, first: u32, count: u32) -> Result<(), Stop> {
        self.stats
            .sequence_gaps
            .fetch_add(u64::from(count), Ordering::Relaxed);
        if count > MAX_REPUBLISH {
            tracing::warn!(source = %self.ctx.name, missing = count, first, "notification sequence jumped; reading every node instead of asking for so many");
            return self.full_read().await;
        }
        tracing::warn!(source = %self.ctx.name, missing = count, first, "notifications missing; asking the server to republish");
        for seq in (0..count).map(|i| first.wrapping_add(i)) {
            match self.session.republish(subscription, seq).await {
                Ok(message) => {
                    self.stats.republished.fetch_add(1, Ordering::Relaxed);
                    for (handle, value) in values_of(message) {
                        if let Ok(value) = value {
                            self.on_value(handle, value).await?;
                        }
                    }
                    self.flush().await?;
                }
                Err(e) => {
                    tracing::warn!(source = %self.ctx.name, sequence = seq, status = %e.status(), "republish not possible; reading every node");
                    return self.full_read().await;
                }
            }
        }
        Ok(())
    }

    async fn on_value(&mut self, handle: u32, value: DataValue) -> Result<(), Stop> {
        let index = handle.wrapping_sub(1) as usize;
        let Some((node, item)) = self.items.get(index).cloned() else {
            return Ok(());
        };
        if let Some(status) = value.status {
            if status.is_bad() {
                self.stats.bad_status.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(source = %self.ctx.name, node = %node, status = %status, "bad value: no event");
                return Ok(());
            }
        }
        // A stamp far ahead of this gateway's clock (a device clock gone
        // wrong, a year-10000 value) must not become "newest": every later
        // true value would look stale and the node would stop counting.
        const DAY_TICKS: i64 = 24 * 3600 * 10_000_000;
        let future = opcua::types::DateTime::now()
            .checked_ticks()
            .saturating_add(DAY_TICKS);
        let stamp = value
            .source_timestamp
            .or(value.server_timestamp)
            .map(|t| t.checked_ticks())
            .filter(|t| *t <= future)
            .unwrap_or(i64::MIN);
        if stamp != i64::MIN {
            if stamp < self.newest[index] {
                self.stats.stale_values.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            self.newest[index] = stamp;
        }
        match item {
            Item::Counter(i) => self.on_counter(i, &node, value).await,
            Item::Record(i) => self.on_record(i, &node, value).await,
            Item::RingIndex(i) => self.on_ring(i, &node, value).await,
        }
    }

    /// Where the value came from; `source_time` is the device's or the
    /// server's timestamp, absent when only the gateway clock was known.
    fn origin(&self, node: &NodeId, value: &DataValue) -> Origin {
        let quality = match value.status {
            Some(s) if s.is_uncertain() => "uncertain",
            _ => "good",
        };
        let source_time = match record::value_time(value, SystemTime::now()) {
            (_, record::TimeSource::Gateway) => None,
            (time, _) => Some(buffer::event::rfc3339_millis(time)),
        };
        Origin {
            protocol: "opcua".into(),
            endpoint: self.endpoint().to_owned(),
            address: node.to_string(),
            quality: quality.into(),
            source_time,
        }
    }

    /// The cursor as it will be once the pending batch is durable.
    fn working(&self) -> &Cursor {
        self.pending.next.as_ref().unwrap_or(self.cursor.get())
    }

    /// The cursor the pending batch will store, made from the stored one
    /// on first use and changed in place after that: one copy per batch.
    /// (A copy per value, compared and dropped again, was most of the
    /// source's CPU and heap churn with 1,000 nodes.)
    fn staged(&mut self) -> &mut Cursor {
        let stored = &self.cursor;
        self.pending
            .next
            .get_or_insert_with(|| stored.get().clone())
    }

    /// Appends what the values processed since the last flush produced,
    /// in one durable batch with the cursor; then, and only then, sends
    /// the acknowledgements those records are waiting for.
    async fn flush(&mut self) -> Result<(), Stop> {
        let pending = std::mem::take(&mut self.pending);
        if let Some(next) = pending.next {
            if next != *self.cursor.get() || !pending.events.is_empty() {
                let count = pending.events.len() as u64;
                let events = pending
                    .events
                    .iter()
                    .map(|e| {
                        let mut stored = self.ctx.new_event(e);
                        // The ledger reckons periods as the tally did.
                        if let (Some(entry), Some(at)) =
                            (&mut stored.ledger, pending.period_ms.get(&e.id))
                        {
                            entry.at_ms = *at;
                        }
                        if let Some(routes) = pending.routes.get(&e.id) {
                            stored.routes = *routes;
                        }
                        stored
                    })
                    .collect();
                const THEN: &str = "the values are taken again on the next reading";
                // The MES waits only for records with an acknowledgement
                // and for rings' read indexes.
                let stored = if pending.acks.is_empty() && pending.releases.is_empty() {
                    self.cursor
                        .store_batched(self.ctx, events, next, THEN)
                        .await
                } else {
                    self.cursor.store(self.ctx, events, next, THEN).await
                }
                .map_err(|Closed| Stop::Shutdown)?;
                if stored.is_none() {
                    // Nothing acknowledged: read everything again.
                    self.resync = true;
                    return Ok(());
                }
                self.stats.events.fetch_add(count, Ordering::Relaxed);
                self.resumed = false;
                self.ctx.read.periods_stored(
                    &self.ctx.name,
                    &self.cursor.get().periods,
                    &pending.closed,
                );
            }
        }
        for due in pending.acks {
            self.send_ack(due).await;
        }
        self.release_rings(pending.releases).await;
        Ok(())
    }

    async fn on_counter(
        &mut self,
        index: usize,
        node: &NodeId,
        value: DataValue,
    ) -> Result<(), Stop> {
        let spec = &self.config.counters[index];
        let signal = &self.counter_signals[index];
        let Some(variant) = value.value.as_ref() else {
            self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let reading = match record::counter_value(variant) {
            Ok(reading) => reading,
            Err(e) => {
                self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.ctx.name, signal = %spec.signal, node = %node, error = %e, "counter value unusable");
                return Ok(());
            }
        };
        let (time, time_source) = record::value_time(&value, SystemTime::now());
        let origin = self.origin(node, &value);
        let previous = self.working().counters.get(&spec.signal).copied();
        let mut observed = None;
        let (state, event) = match reading {
            CounterValue::Count(raw, width) => {
                let rules = CounterRules {
                    width,
                    ..signal.rules
                };
                let observation = rules.observe(previous, raw);
                observed = Some(observation);
                let event =
                    signal
                        .event_for(self.ctx, &observation, origin, time)
                        .map(|mut event| {
                            if spec.scale != 1.0 {
                                event.data.quantity =
                                    Quantity::Measure(observation.delta as f64 * spec.scale);
                            }
                            event
                        });
                (observation.next, event)
            }
            CounterValue::Measure(v) => {
                let (_, delta, state) = crate::counter::observe_measure(previous, v);
                let event = (delta > 0.0).then(|| {
                    signal.measure_event_for(self.ctx, delta * spec.scale, v, state, origin, time)
                });
                (state, event)
            }
        };
        let mut events: Vec<CloudEvent> = event.into_iter().collect();
        for event in &mut events {
            event
                .data
                .attributes
                .insert("time_source".into(), time_source.as_str().into());
        }
        // Only this signal's state can have changed.
        if previous != Some(state) {
            let (signal, line) = (
                spec.signal.clone(),
                self.counter_signals[index].line.clone(),
            );
            self.tally_reading(
                &signal,
                &line,
                previous,
                observed.as_ref(),
                events.first(),
                SystemTime::now(),
            );
            self.staged().counters.insert(signal, state);
            self.pending.events.extend(events);
        }
        Ok(())
    }
}
