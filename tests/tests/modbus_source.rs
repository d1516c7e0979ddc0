//! The Modbus source against a simulated PLC (a real Modbus TCP server on
//! loopback) and a real journal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use buffer::{EventType, Journal, JournalConfig};
use plant_edge_tests::plc::Plc;
use protocols::source::{Classifier, SourceContext};
use protocols::sources::modbus::map::{Format, Order};
use protocols::sources::modbus::{
    self, CounterSpec, Endpoint, FieldSpec, ModbusConfig, ModbusStats, RecordSpec,
};
use tokio::sync::watch;

const SOURCE: &str = "press1";

struct Rig {
    journal: Journal,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<ModbusStats>,
    _dir: tempfile::TempDir,
}

fn counter(signal: &str, event_type: EventType, address: &str, format: Format) -> CounterSpec {
    CounterSpec {
        signal: signal.into(),
        event_type,
        address: address.parse().expect("address"),
        format,
        order: Order::default(),
        max_step: 1000,
        unit: "EA".into(),
        scale: 1.0,
        place: Default::default(),
    }
}

fn device(
    addr: std::net::SocketAddr,
    counters: Vec<CounterSpec>,
    records: Vec<RecordSpec>,
) -> ModbusConfig {
    ModbusConfig {
        endpoint: Endpoint::Tcp(addr.to_string()),
        unit: 1,
        poll_interval: Duration::from_millis(20),
        timeout: Duration::from_millis(500),
        max_gap: 8,
        counter_window: std::time::Duration::ZERO,
        line: "L1".into(),
        machine: "press1".into(),
        counters,
        records,
        rings: vec![],
        context: vec![],
    }
}

fn start(config: ModbusConfig, max_bytes: Option<u64>) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut jc = JournalConfig::new(dir.path().join("journal"));
    jc.sinks = vec!["erp".into()];
    if let Some(max) = max_bytes {
        jc.max_bytes = max;
    }
    let journal = Journal::open(jc).expect("journal");
    start_on(journal, config, dir)
}

fn start_on(journal: Journal, config: ModbusConfig, dir: tempfile::TempDir) -> Rig {
    start_on_with(journal, config, dir, Default::default())
}

fn start_on_with(
    journal: Journal,
    config: ModbusConfig,
    dir: tempfile::TempDir,
    read: protocols::source::ReadCounts,
) -> Rig {
    let (appender, _writer) = journal.start_writer();
    let (stop, shutdown) = watch::channel(false);
    let stats = Arc::new(ModbusStats::default());
    let ctx = SourceContext {
        site: "site1".into(),
        gateway: "gw1".into(),
        name: SOURCE.into(),
        attributes: [("cost_center".to_owned(), "4711".to_owned())].into(),
        routes: journal.routes_all(),
        classifier: Classifier::default(),
        appender,
        initial_cursor: journal.source_cursor(SOURCE).expect("cursor"),
        shutdown,
        read,
        periods: None,
    };
    let task = tokio::spawn(modbus::run(ctx, config, stats.clone()));
    Rig {
        journal,
        stop,
        task,
        stats,
        _dir: dir,
    }
}

impl Rig {
    fn events(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        self.journal
            .scan_events(0, |e| {
                out.push(serde_json::from_slice(&e.payload).expect("json"));
                true
            })
            .expect("scan");
        out
    }

    /// Waits until the stored counter state of `signal` has raw value `raw`.
    async fn counted_up_to(&self, signal: &str, raw: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let cursor: Option<serde_json::Value> = self
                .journal
                .source_cursor(SOURCE)
                .expect("cursor")
                .map(|c| serde_json::from_slice(&c).expect("json"));
            if cursor
                .as_ref()
                .and_then(|c| c["counters"][signal]["raw"].as_u64())
                == Some(raw)
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{signal} never reached {raw}; cursor {cursor:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) -> Journal {
        self.stop_keeping_dir().await.0
    }

    /// Stops the source; the journal and the directory it lives in (whose
    /// deletion would take the journal's segment files with it).
    async fn stop_keeping_dir(self) -> (Journal, tempfile::TempDir) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        (self.journal, self._dir)
    }
}

fn quantities(events: &[serde_json::Value], event_type: &str) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter(|e| e["type"] == event_type)
        .map(|e| {
            (
                e["data"]["quantity"].as_u64().expect("quantity"),
                e["data"]["counter"]["epoch"].as_u64().expect("epoch"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_increases_become_events_across_16_and_32_bit_wraps_and_resets() {
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 65_530);
    plc.mem().set_u32(10, 0xFFFF_FFFE);
    let rig = start(
        device(
            plc.addr,
            vec![
                counter("good", EventType::completion(), "holding:0", Format::U16),
                counter("scrap", EventType::scrap(), "holding:10", Format::U32),
            ],
            vec![],
        ),
        None,
    );
    rig.counted_up_to("good", 65_530).await;
    plc.mem().holding.insert(0, 65_534);
    rig.counted_up_to("good", 65_534).await;
    plc.mem().holding.insert(0, 3);
    plc.mem().set_u32(10, 1);
    rig.counted_up_to("good", 3).await;
    rig.counted_up_to("scrap", 1).await;
    plc.mem().holding.insert(0, 20_000);
    rig.counted_up_to("good", 20_000).await; // a big jump forward is production, not a reset
    plc.mem().holding.insert(0, 7);
    rig.counted_up_to("good", 7).await; // an implausible drop is a reset
    let events = rig.events();
    assert_eq!(
        quantities(&events, "production.completion"),
        vec![(4, 0), (5, 0), (19_997, 0), (7, 1)]
    );
    assert_eq!(quantities(&events, "production.scrap"), vec![(3, 0)]);
    let first = &events[0];
    assert_eq!(
        first["data"]["attributes"]["cost_center"], "4711",
        "static attributes stamped"
    );
    assert_eq!(first["data"]["line"], "L1");
    assert!(first["data"]["origin"]["endpoint"]
        .as_str()
        .expect("endpoint")
        .starts_with("tcp://127.0.0.1:"));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_polls_within_a_window_are_one_event_per_counter_with_both_readings() {
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 65_000);
    let mut config = device(
        plc.addr,
        vec![counter(
            "good",
            EventType::completion(),
            "holding:0",
            Format::U16,
        )],
        vec![],
    );
    config.counter_window = Duration::from_millis(500);
    let window_ms = 500u64;
    let rig = start(config, None);
    rig.counted_up_to("good", 65_000).await;
    // 2.5 s of production, 7 parts every 10 ms: across the 16-bit top.
    let mut raw: u64 = 65_000;
    let mut made = 0u64;
    let end = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
        raw = (raw + 7) % 65_536;
        made += 7;
        plc.mem().holding.insert(0, raw as u16);
    }
    rig.counted_up_to("good", raw).await;
    let polls = rig.stats.polls.load(std::sync::atomic::Ordering::Relaxed);
    let events: Vec<serde_json::Value> = rig
        .events()
        .into_iter()
        .filter(|e| e["type"] == "production.completion")
        .collect();
    let counted: u64 = events
        .iter()
        .map(|e| e["data"]["quantity"].as_u64().expect("quantity"))
        .sum();
    assert_eq!(counted, made, "every part once");
    // Each event covers consecutive readings: it starts where the last ended.
    let mut previous = 65_000;
    let mut windows = std::collections::BTreeSet::new();
    for event in &events {
        let counter = &event["data"]["counter"];
        assert_eq!(counter["previous"].as_u64(), Some(previous), "{event}");
        previous = counter["value"].as_u64().expect("value");
        let time: humantime::Timestamp =
            event["time"].as_str().expect("time").parse().expect("time");
        let ms = std::time::SystemTime::from(time)
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        assert!(
            windows.insert(ms / window_ms),
            "two events in one window: {events:?}"
        );
    }
    assert!(
        (events.len() as u64) * 3 <= polls,
        "{} events from {polls} polls: the polls of a window are one event",
        events.len()
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_counts_parts_made_meanwhile_once() {
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 100);
    let config = device(
        plc.addr,
        vec![counter(
            "good",
            EventType::completion(),
            "holding:0",
            Format::U16,
        )],
        vec![],
    );
    let rig = start(config.clone(), None);
    rig.counted_up_to("good", 100).await;
    plc.mem().holding.insert(0, 110);
    rig.counted_up_to("good", 110).await;
    let dir = rig._dir;
    let _ = rig.stop.send(true);
    let _ = rig.task.await;
    let journal = rig.journal;
    // Agent down, the line keeps producing.
    plc.mem().holding.insert(0, 135);
    let rig = start_on(journal, config, dir);
    rig.counted_up_to("good", 135).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        quantities(&rig.events(), "production.completion"),
        vec![(10, 0), (25, 0)],
        "made while down: counted once"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_and_a_silent_device_are_counted_without_events_or_crash() {
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 5);
    plc.mem().refuse_holding.push(0..2);
    let rig = start(
        device(
            plc.addr,
            vec![counter(
                "good",
                EventType::completion(),
                "holding:0",
                Format::U16,
            )],
            vec![],
        ),
        None,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rig.stats.exceptions.load(Ordering::Relaxed) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "exceptions not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rig.events().is_empty(), "no event from a refused read");
    assert_eq!(
        rig.stats.transport_errors.load(Ordering::Relaxed),
        0,
        "an exception keeps the connection"
    );
    plc.mem().refuse_holding.clear();
    rig.counted_up_to("good", 5).await;
    rig.stop().await;

    // A device that accepts TCP and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr");
    let rig = start(
        device(
            addr,
            vec![counter(
                "good",
                EventType::completion(),
                "holding:0",
                Format::U16,
            )],
            vec![],
        ),
        None,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rig.stats.transport_errors.load(Ordering::Relaxed) < 2 {
        assert!(std::time::Instant::now() < deadline, "timeouts not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rig.events().is_empty());
    assert!(!rig.task.is_finished(), "the source keeps trying");
    rig.stop().await;
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plc_link_outage_is_bridged_by_one_event_without_loss_or_duplicate() {
    let mut plc = Plc::start().await;
    plc.mem().holding.insert(0, 1_000);
    let rig = start(
        device(
            plc.addr,
            vec![counter(
                "good",
                EventType::completion(),
                "holding:0",
                Format::U16,
            )],
            vec![],
        ),
        None,
    );
    rig.counted_up_to("good", 1_000).await;
    plc.mem().holding.insert(0, 1_004);
    rig.counted_up_to("good", 1_004).await;
    plc.stop().await;
    plc.mem().holding.insert(0, 1_050);
    tokio::time::sleep(Duration::from_millis(300)).await;
    plc.restart().await;
    rig.counted_up_to("good", 1_050).await;
    let events = rig.events();
    assert_eq!(
        quantities(&events, "production.completion"),
        vec![(4, 0), (46, 0)]
    );
    assert_eq!(
        events[1]["data"]["attributes"]["bridged_outage"], "true",
        "the bridging event says so"
    );
    assert!(rig.stats.transport_errors.load(Ordering::Relaxed) > 0);
    rig.stop().await;
}

fn record_spec() -> RecordSpec {
    let field = |name: &str, address: &str, format: Format| FieldSpec {
        name: name.into(),
        address: address.parse().expect("address"),
        format,
        order: Order::default(),
        epoch: None,
    };
    RecordSpec {
        signal: "completion".into(),
        event_type: EventType::completion(),
        ready: "coil:0".parse().expect("ready"),
        ack: "coil:1".parse().expect("ack"),
        fields: vec![
            field("sequence", "holding:100", Format::U16),
            field("work_order", "holding:101", Format::String(4)),
            field("material", "holding:105", Format::String(4)),
            field("quantity", "holding:109", Format::U16),
            field("reason_code", "holding:110", Format::Bcd),
        ],
        key: vec!["sequence".into(), "work_order".into()],
        unit: "EA".into(),
        type_from: None,
        place: Default::default(),
    }
}

/// Plays the PLC side of the handshake for record `n`.
async fn plc_hands_over(plc: &Plc, n: u16) {
    {
        let mut m = plc.mem();
        m.holding.insert(100, n);
        m.set_string(101, 4, &format!("WO-{n}"));
        m.set_string(105, 4, "MAT-9");
        m.holding.insert(109, n * 10);
        m.holding.insert(110, 0x0042);
        m.coils.insert(0, true);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !plc.mem().coils.get(&1).copied().unwrap_or(false) {
        assert!(
            std::time::Instant::now() < deadline,
            "record {n} never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    plc.mem().coils.insert(0, false);
    while plc.mem().coils.get(&1).copied().unwrap_or(false) {
        assert!(
            std::time::Instant::now() < deadline,
            "ack of record {n} never released"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_record_is_acknowledged_only_after_it_is_durable() {
    let plc = Plc::start().await;
    let rig = start(device(plc.addr, vec![], vec![record_spec()]), None);
    let violated = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (journal, violated, checked) = (rig.journal.clone(), violated.clone(), checked.clone());
        plc.on_write(Box::new(move |m, table, address, value| {
            if table == 'c' && address == 1 && value == 1 {
                // The PLC asks the journal: is the record it is being told
                // about already stored?
                let sequence = m.holding.get(&100).copied().unwrap_or(0).to_string();
                let found = journal.list(0, 10_000).expect("list").iter().any(|e| {
                    journal
                        .find(Some(e.id), None)
                        .ok()
                        .flatten()
                        .is_some_and(|p| {
                            String::from_utf8_lossy(&p.payload)
                                .contains(&format!("\"sequence\":\"{sequence}\""))
                        })
                });
                if !found {
                    violated.store(true, Ordering::SeqCst);
                }
                checked.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for n in 1..=5 {
        plc_hands_over(&plc, n).await;
    }
    assert!(
        !violated.load(Ordering::SeqCst),
        "an ack was written before the record was in the journal"
    );
    assert_eq!(checked.load(Ordering::SeqCst), 5);
    let events = rig.events();
    assert_eq!(events.len(), 5);
    assert_eq!(events[2]["data"]["work_order"], "WO-3");
    assert_eq!(events[2]["data"]["material"], "MAT-9");
    assert_eq!(events[2]["data"]["quantity"], 30);
    assert_eq!(events[2]["data"]["reason_code"], "42");
    assert_eq!(events[2]["subject"], "L1/WO-3");
    assert_eq!(rig.stats.records_acked.load(Ordering::Relaxed), 5);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_holds_the_record_at_the_plc_until_space_frees() {
    let plc = Plc::start().await;
    let rig = start(device(plc.addr, vec![], vec![record_spec()]), Some(3_000));
    // Fill the journal with business events so the record cannot fit.
    fill(&rig.journal);
    {
        let mut m = plc.mem();
        m.holding.insert(100, 1);
        m.set_string(101, 4, "WO-1");
        m.holding.insert(109, 1);
        m.coils.insert(0, true);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !plc.mem().coils.get(&1).copied().unwrap_or(false),
        "no ack while the journal is full"
    );
    assert!(rig.journal.is_full(), "the condition is reported");
    // The ERP link delivers the backlog: space frees, the record goes in.
    loop {
        let batch = rig.journal.read_batch("erp", 100).expect("read");
        if batch.is_empty() {
            break;
        }
        rig.journal
            .ack("erp", &batch.iter().map(|e| e.seq).collect::<Vec<_>>())
            .expect("ack");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !plc.mem().coils.get(&1).copied().unwrap_or(false) {
        assert!(
            std::time::Instant::now() < deadline,
            "record not acknowledged after space freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rig
        .events()
        .iter()
        .any(|e| e["data"]["work_order"] == "WO-1"));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_float_scrap_counter_in_kg_reports_measured_quantities() {
    let plc = Plc::start().await;
    let set = |plc: &Plc, kg: f32| {
        let bits = kg.to_bits();
        let mut m = plc.mem();
        m.holding.insert(20, (bits >> 16) as u16);
        m.holding.insert(21, bits as u16);
    };
    set(&plc, 1.5);
    let mut spec = counter("scrap_kg", EventType::scrap(), "holding:20", Format::F32);
    spec.unit = "KG".into();
    let rig = start(device(plc.addr, vec![spec], vec![]), None);
    let wait_events = |n: usize| {
        let journal = rig.journal.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            // Counted once readable (durable), not when merely applied.
            let readable = || {
                let mut count = 0;
                journal
                    .scan_events(0, |_| {
                        count += 1;
                        true
                    })
                    .expect("scan");
                count
            };
            while readable() < n {
                assert!(std::time::Instant::now() < deadline, "expected {n} events");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // The first poll takes the baseline (stored as the source cursor).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rig.journal.source_cursor(SOURCE).expect("cursor").is_none() {
        assert!(std::time::Instant::now() < deadline, "no baseline");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    set(&plc, 4.0);
    wait_events(1).await;
    set(&plc, 0.5);
    wait_events(2).await;
    let events = rig.events();
    let got: Vec<(f64, String)> = events
        .iter()
        .map(|e| {
            (
                e["data"]["quantity"].as_f64().expect("q"),
                e["data"]["attributes"]["counter_epoch"]
                    .as_str()
                    .expect("epoch")
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![(2.5, "0".to_owned()), (0.5, "1".to_owned())],
        "growth, then a reset counted from zero"
    );
    assert_eq!(events[0]["data"]["unit"], "KG");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_events_carry_the_work_order_read_in_the_same_poll() {
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 10);
    plc.mem().set_string(40, 4, "WO-55");
    let mut config = device(
        plc.addr,
        vec![counter(
            "good",
            EventType::completion(),
            "holding:0",
            Format::U16,
        )],
        vec![],
    );
    config.context = vec![FieldSpec {
        name: "work_order".into(),
        address: "holding:40".parse().expect("address"),
        format: Format::String(4),
        order: Order::default(),
        epoch: None,
    }];
    let rig = start(config, None);
    rig.counted_up_to("good", 10).await;
    plc.mem().holding.insert(0, 13);
    rig.counted_up_to("good", 13).await;
    let events = rig.events();
    assert_eq!(events[0]["data"]["work_order"], "WO-55");
    assert_eq!(events[0]["subject"], "L1/WO-55");
    rig.stop().await;
}

/// Ids of the stored completion records, in journal order.
fn record_ids(rig: &Rig) -> Vec<String> {
    rig.events()
        .iter()
        .filter(|e| e["data"]["origin"]["address"] == "unit 1 record completion")
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_restarted_plc_repeats_field_for_field_are_new_facts_with_new_ids() {
    let plc = Plc::start().await;
    let rig = start(device(plc.addr, vec![], vec![record_spec()]), None);
    for n in 1..=3 {
        plc_hands_over(&plc, n).await;
    }
    // The PLC restarts: its record sequence starts again at 1, and the
    // line makes the same orders again, field for field.
    for n in 1..=3 {
        plc_hands_over(&plc, n).await;
    }
    let ids = record_ids(&rig);
    assert_eq!(ids.len(), 6, "every acknowledged record is stored: {ids:?}");
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 6, "a different fact never gets an old id");
    assert_eq!(rig.stats.records_acked.load(Ordering::Relaxed), 6);
    let (journal, dir) = rig.stop_keeping_dir().await;
    // The same holds after the agent restarts between two equal records.
    let rig = start_on(journal, device(plc.addr, vec![], vec![record_spec()]), dir);
    plc_hands_over(&plc, 1).await;
    let ids = record_ids(&rig);
    assert_eq!(ids.len(), 7);
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        7
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_stored_but_not_acknowledged_before_a_stop_is_acknowledged_once_after() {
    let plc = Plc::start().await;
    {
        let mut m = plc.mem();
        m.holding.insert(100, 7);
        m.set_string(101, 4, "WO-7");
        m.set_string(105, 4, "MAT-9");
        m.holding.insert(109, 70);
        m.holding.insert(110, 0x0042);
        // The ack does not reach the PLC: stored, never acknowledged.
        m.refuse_writes = true;
        m.coils.insert(0, true);
    }
    let rig = start(device(plc.addr, vec![], vec![record_spec()]), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rig.stats.exceptions.load(Ordering::Relaxed) < 3 {
        assert!(std::time::Instant::now() < deadline, "ack never tried");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        record_ids(&rig).len(),
        1,
        "stored once, however often retried"
    );
    let (journal, dir) = rig.stop_keeping_dir().await;
    // The agent restarts; the PLC still presents the same record.
    plc.mem().refuse_writes = false;
    let rig = start_on(journal, device(plc.addr, vec![], vec![record_spec()]), dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !plc.mem().coils.get(&1).copied().unwrap_or(false) {
        assert!(std::time::Instant::now() < deadline, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        record_ids(&rig).len(),
        1,
        "the re-presented record is the same fact: acknowledged, not stored again"
    );
    // Released, then the next record has the same fields: a new fact.
    plc.mem().coils.insert(0, false);
    while plc.mem().coils.get(&1).copied().unwrap_or(false) {
        assert!(std::time::Instant::now() < deadline, "ack never released");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    plc.mem().coils.insert(0, true);
    while !plc.mem().coils.get(&1).copied().unwrap_or(false) {
        assert!(
            std::time::Instant::now() < deadline,
            "second never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ids = record_ids(&rig);
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_quantity_does_not_decode_is_not_acknowledged_nor_posted() {
    let plc = Plc::start().await;
    let mut spec = record_spec();
    for field in &mut spec.fields {
        if field.name == "quantity" {
            field.format = Format::String(2);
        }
    }
    {
        let mut m = plc.mem();
        m.holding.insert(100, 1);
        m.set_string(101, 4, "WO-1");
        m.set_string(109, 2, "ten");
        m.coils.insert(0, true);
    }
    let rig = start(device(plc.addr, vec![], vec![spec]), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rig.stats.bad_values.load(Ordering::Relaxed) < 3 {
        assert!(std::time::Instant::now() < deadline, "never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !plc.mem().coils.get(&1).copied().unwrap_or(false),
        "not acknowledged: the PLC keeps the record"
    );
    assert!(record_ids(&rig).is_empty(), "never posted as quantity 1");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_counter_position_starts_ids_the_erp_has_never_seen() {
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 100);
    let config = || {
        device(
            plc.addr,
            vec![counter(
                "good",
                EventType::completion(),
                "holding:0",
                Format::U16,
            )],
            vec![],
        )
    };
    let rig = start(config(), None);
    rig.counted_up_to("good", 100).await;
    plc.mem().holding.insert(0, 110);
    rig.counted_up_to("good", 110).await;
    let first: Vec<String> = rig
        .events()
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(first.len(), 1);
    let (journal, dir) = rig.stop_keeping_dir().await;
    // The stored position is damaged; the PLC's counter was reset and
    // counts the same values again (a shift reset).
    journal
        .append_blocking(buffer::AppendRequest {
            source: SOURCE.into(),
            events: vec![],
            cursor: Some(b"{\"counters\":{\"good\":12}}".to_vec()),
        })
        .expect("append")
        .expect("fits");
    plc.mem().holding.insert(0, 100);
    let read = protocols::source::ReadCounts::default();
    let rig = start_on_with(journal, config(), dir, read.clone());
    rig.counted_up_to("good", 100).await;
    plc.mem().holding.insert(0, 110);
    rig.counted_up_to("good", 110).await;
    let ids: Vec<String> = rig
        .events()
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[1], first[0], "the same counter value is a new fact");
    assert_eq!(
        read.positions_lost().get(SOURCE),
        Some(&1),
        "the unreadable position is counted"
    );
    rig.stop().await;
}

/// One handshake of the queue PLC below: ready/ack coils and fields at
/// `base` (sequence, quantity).
fn queued_record(i: u16) -> RecordSpec {
    let field = |name: &str, address: u16| FieldSpec {
        name: name.into(),
        address: format!("holding:{address}").parse().expect("address"),
        format: Format::U16,
        order: Order::default(),
        epoch: None,
    };
    let base = 200 + i * 10;
    RecordSpec {
        signal: format!("line{i}"),
        event_type: EventType::completion(),
        ready: format!("coil:{}", 20 + 2 * i).parse().expect("ready"),
        ack: format!("coil:{}", 21 + 2 * i).parse().expect("ack"),
        fields: vec![field("sequence", base), field("quantity", base + 1)],
        key: vec!["sequence".into()],
        unit: "EA".into(),
        type_from: None,
        place: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_handshake_queues_at_50_records_a_second_drain_over_one_connection_without_drops() {
    const LINES: u16 = 4;
    const PER_LINE: u64 = 150;
    const QUEUE: u64 = 20;
    let plc = std::sync::Arc::new(Plc::start().await);
    let made = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // The PLC: every 20 ms each line makes a record into a queue of 20
    // (dropped when full, as a PLC buffer does); 4-phase handshake per line.
    let program = {
        let (plc, made, dropped, acked) =
            (plc.clone(), made.clone(), dropped.clone(), acked.clone());
        tokio::spawn(async move {
            let mut queues = [0u64; LINES as usize];
            let mut sequences = [0u16; LINES as usize];
            let mut tick = 0u64;
            loop {
                tokio::time::sleep(Duration::from_millis(2)).await;
                tick += 1;
                let mut m = plc.mem();
                for i in 0..LINES {
                    let q = &mut queues[i as usize];
                    if tick.is_multiple_of(10)
                        && made.load(Ordering::SeqCst) < PER_LINE * LINES as u64
                    {
                        made.fetch_add(1, Ordering::SeqCst);
                        if *q < QUEUE {
                            *q += 1;
                        } else {
                            dropped.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    let (ready_at, ack_at) = (20 + 2 * i, 21 + 2 * i);
                    let ready = m.coils.get(&ready_at).copied().unwrap_or(false);
                    let ack = m.coils.get(&ack_at).copied().unwrap_or(false);
                    if ready && ack {
                        acked.fetch_add(1, Ordering::SeqCst);
                        m.coils.insert(ready_at, false);
                    } else if !ready && !ack && *q > 0 {
                        *q -= 1;
                        let seq = &mut sequences[i as usize];
                        *seq += 1;
                        m.holding.insert(200 + i * 10, *seq);
                        m.holding.insert(201 + i * 10, 1);
                        m.coils.insert(ready_at, true);
                    }
                }
            }
        })
    };
    let mut config = device(plc.addr, vec![], (0..LINES).map(queued_record).collect());
    config.poll_interval = Duration::from_millis(100);
    let rig = start(config, None);
    let total = PER_LINE * LINES as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) + dropped.load(Ordering::SeqCst) < total {
        assert!(
            std::time::Instant::now() < deadline,
            "records never drained"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    program.abort();
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        0,
        "the PLC dropped records: the gateway was slower than the line"
    );
    assert_eq!(rig.events().len() as u64, total, "every record stored once");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_kind_code_sets_its_type_and_an_unknown_code_is_a_dead_letter() {
    let plc = Plc::start().await;
    let mut spec = record_spec();
    spec.fields.push(FieldSpec {
        name: "kind".into(),
        address: "holding:111".parse().expect("address"),
        format: Format::U16,
        order: Order::default(),
        epoch: None,
    });
    spec.fields.push(FieldSpec {
        name: "reason_code".into(),
        address: "holding:112".parse().expect("address"),
        format: Format::U16,
        order: Order::default(),
        epoch: None,
    });
    spec.type_from = Some(protocols::source::TypeFromField {
        field: "kind".into(),
        map: [
            ("1".to_owned(), EventType::completion()),
            ("2".to_owned(), EventType::scrap()),
        ]
        .into(),
    });
    spec.place.reasons = [("17".to_owned(), "jam at infeed".to_owned())].into();
    let rig = start(device(plc.addr, vec![], vec![spec]), None);
    for (n, kind, reason) in [(1u16, 1u16, 0u16), (2, 2, 17), (3, 7, 0), (4, 2, 99)] {
        {
            let mut m = plc.mem();
            m.holding.insert(111, kind);
            m.holding.insert(112, reason);
        }
        plc_hands_over(&plc, n).await;
    }
    let types: Vec<String> = rig
        .events()
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "production.completion",
            "production.scrap",
            "production.scrap"
        ],
        "each record carries the type its code says; code 7 is not posted"
    );
    let events = rig.events();
    let reasons: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| {
            (
                e["data"]["reason_code"].as_str().unwrap_or_default(),
                e["data"]["attributes"]["reason"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [("0", None), ("17", Some("jam at infeed")), ("99", None)],
        "a listed reason code carries its readable reason; others only their code"
    );
    let dead = rig.journal.dead_letters().expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].reason.contains("unknown type code \"7\""),
        "{}",
        dead[0].reason
    );
    assert_eq!(rig.stats.records_refused.load(Ordering::Relaxed), 1);
    assert_eq!(
        rig.stats.records_acked.load(Ordering::Relaxed),
        4,
        "the dead-lettered record is durable, so the PLC is told"
    );
    rig.stop().await;
}

/// Writes `v` into four holding registers, most significant first.
fn set_u64(plc: &Plc, address: u16, v: u64) {
    let mut m = plc.mem();
    for i in 0..4u16 {
        m.holding.insert(address + i, (v >> (48 - 16 * i)) as u16);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_the_plcs_own_time_and_64_bit_counters_count() {
    let plc = Plc::start().await;
    let mut spec = record_spec();
    spec.fields.push(FieldSpec {
        name: "produced_at".into(),
        address: "holding:120".parse().expect("address"),
        format: Format::U64,
        order: Order::default(),
        epoch: Some(protocols::source::Epoch::Millis),
    });
    set_u64(&plc, 50, 5_000_000_000);
    let rig = start(
        device(
            plc.addr,
            vec![counter(
                "good",
                EventType::completion(),
                "holding:50",
                Format::U64,
            )],
            vec![spec],
        ),
        None,
    );
    rig.counted_up_to("good", 5_000_000_000).await;
    set_u64(&plc, 50, 5_000_000_007);
    rig.counted_up_to("good", 5_000_000_007).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let plc_time = now_ms - 5_000;
    set_u64(&plc, 120, plc_time);
    plc_hands_over(&plc, 1).await;
    // A PLC whose clock was never set: the gateway's time, and it says so.
    set_u64(&plc, 120, 0);
    plc_hands_over(&plc, 2).await;
    let events = rig.events();
    let counted: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["data"]["counter"].is_object())
        .collect();
    assert_eq!(counted.len(), 1);
    assert_eq!(counted[0]["data"]["quantity"], 7);
    let records: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["data"]["origin"]["address"] == "unit 1 record completion")
        .collect();
    assert_eq!(records.len(), 2);
    let expected =
        buffer::event::rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(plc_time));
    assert_eq!(records[0]["time"], expected.as_str());
    assert_eq!(records[0]["data"]["attributes"]["time_source"], "device");
    assert_eq!(records[1]["data"]["attributes"]["time_source"], "gateway");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_behind_one_plc_address_share_one_connection_and_carry_their_own_line() {
    let plc = Plc::start().await;
    {
        let mut m = plc.mem();
        m.holding.insert(0, 10);
        m.holding.insert(1, 20);
    }
    // One source per line, both naming the same PLC: one connection.
    let line = |signal: &str, address: &str, line: &str| CounterSpec {
        place: protocols::source::Placement {
            line: Some(line.into()),
            machine: Some(format!("press-{line}")),
            attributes: [("cell".to_owned(), format!("cell-{line}"))].into(),
            ..Default::default()
        },
        ..counter(signal, EventType::completion(), address, Format::U16)
    };
    let first = start(
        device(
            plc.addr,
            vec![
                line("good_l1", "holding:0", "L1"),
                line("good_l2", "holding:1", "L2"),
            ],
            vec![],
        ),
        None,
    );
    let second = start(
        device(plc.addr, vec![line("good_l3", "holding:0", "L3")], vec![]),
        None,
    );
    first.counted_up_to("good_l1", 10).await;
    first.counted_up_to("good_l2", 20).await;
    second.counted_up_to("good_l3", 10).await;
    {
        let mut m = plc.mem();
        m.holding.insert(0, 13);
        m.holding.insert(1, 25);
    }
    first.counted_up_to("good_l1", 13).await;
    first.counted_up_to("good_l2", 25).await;
    second.counted_up_to("good_l3", 13).await;
    let mut by_line: Vec<(String, String, String, u64)> = first
        .events()
        .iter()
        .chain(second.events().iter())
        .map(|e| {
            (
                e["data"]["line"].as_str().expect("line").to_owned(),
                e["data"]["machine"].as_str().expect("machine").to_owned(),
                e["data"]["attributes"]["cell"]
                    .as_str()
                    .expect("cell")
                    .to_owned(),
                e["data"]["quantity"].as_u64().expect("quantity"),
            )
        })
        .collect();
    by_line.sort();
    assert_eq!(
        by_line,
        vec![
            ("L1".into(), "press-L1".into(), "cell-L1".into(), 3),
            ("L2".into(), "press-L2".into(), "cell-L2".into(), 5),
            ("L3".into(), "press-L3".into(), "cell-L3".into(), 3),
        ]
    );
    assert_eq!(
        plc.mem().connections,
        1,
        "two sources, one PLC address: one connection"
    );
    first.stop().await;
    second.stop().await;
}

/// Waits until `holds` is true (checked every 10 ms, at most 10 s).
async fn until(what: &str, holds: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !holds() {
        assert!(std::time::Instant::now() < deadline, "never saw {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fills `journal` with business events until it refuses more.
fn fill(journal: &Journal) {
    let routes = journal.routes_all();
    let mut n = 0u128;
    while journal
        .append_blocking(buffer::AppendRequest {
            source: "filler".into(),
            events: vec![buffer::NewEvent {
                id: uuid::Uuid::from_u128(n + 1_000_000),
                class: buffer::EventClass::Business,
                routes,
                payload: vec![b'{'; 400].into_iter().chain(*b"}").collect(),
                ledger: None,
            }],
            cursor: None,
        })
        .expect("append")
        .is_some()
    {
        n += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_waiting_for_its_journal_does_not_hold_up_other_sources_on_the_same_plc() {
    let plc = Plc::start().await;
    // Line 1's handshake record waits for a journal that is full: its
    // store is parked until space frees, for as long as that takes.
    let held = start(device(plc.addr, vec![], vec![record_spec()]), Some(3_000));
    fill(&held.journal);
    {
        let mut m = plc.mem();
        m.holding.insert(100, 1);
        m.set_string(101, 4, "WO-1");
        m.holding.insert(109, 1);
        m.coils.insert(0, true);
    }
    until("line 1's record held for space", || {
        held.journal.stats().counters.backpressured > 0
    })
    .await;
    // Line 2 on the same PLC address (same connection) keeps counting.
    plc.mem().holding.insert(50, 100);
    let counting = start(
        device(
            plc.addr,
            vec![counter(
                "good",
                EventType::completion(),
                "holding:50",
                Format::U16,
            )],
            vec![],
        ),
        None,
    );
    counting.counted_up_to("good", 100).await;
    plc.mem().holding.insert(50, 107);
    counting.counted_up_to("good", 107).await;
    assert_eq!(
        quantities(&counting.events(), "production.completion")
            .iter()
            .map(|(q, _)| q)
            .sum::<u64>(),
        7
    );
    assert!(
        !plc.mem().coils.get(&1).copied().unwrap_or(false),
        "line 1's record is still not acknowledged (not durable)"
    );
    assert_eq!(plc.mem().connections, 1, "one connection for both lines");
    counting.stop().await;
    held.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_lines_on_one_plc_are_read_with_merged_requests_each_on_its_schedule() {
    let plc = Plc::start().await;
    let rigs: Vec<Rig> = (0..20u16)
        .map(|line| {
            let mut config = device(
                plc.addr,
                vec![
                    counter(
                        "good",
                        EventType::completion(),
                        &format!("holding:{}", 10 * line),
                        Format::U16,
                    ),
                    counter(
                        "scrap",
                        EventType::scrap(),
                        &format!("holding:{}", 10 * line + 1),
                        Format::U16,
                    ),
                ],
                vec![],
            );
            config.poll_interval = Duration::from_millis(100);
            start(config, None)
        })
        .collect();
    // Every line has taken its baseline.
    for rig in &rigs {
        rig.counted_up_to("good", 0).await;
    }
    let (reads, polls) = (
        plc.mem().reads,
        rigs.iter()
            .map(|r| r.stats.polls.load(Ordering::Relaxed))
            .sum::<u64>(),
    );
    for line in 0..20u16 {
        plc.mem().holding.insert(10 * line, 5);
    }
    for rig in &rigs {
        rig.counted_up_to("good", 5).await;
    }
    let polled = || {
        rigs.iter()
            .map(|r| r.stats.polls.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    until("100 more polls", || polled() >= polls + 100).await;
    let polls = polled() - polls;
    let reads = plc.mem().reads - reads;
    // One request per source and poll unmerged; 20 lines × 10 registers
    // apart fit in two merged requests (125 registers each).
    assert!(polls >= 100, "{polls} polls");
    assert!(
        reads * 4 <= polls,
        "{reads} requests for {polls} polls: reads of one tick are not merged"
    );
    assert_eq!(plc.mem().connections, 1);
    for rig in &rigs {
        let schedule = rig.stats.schedule.snapshot();
        assert_eq!(schedule.configured, Duration::from_millis(100));
        assert!(schedule.count > 0, "intervals are recorded: {schedule:?}");
    }
    for rig in rigs {
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_read_the_plc_refuses_does_not_mark_another_lines_values_bad() {
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 10);
    // Line 2's counter sits on an address the PLC refuses; line 1's is
    // 5 registers away, close enough for the reads to be merged.
    plc.mem().refuse_holding.push(5..6);
    let ok = start(
        device(
            plc.addr,
            vec![counter(
                "good",
                EventType::completion(),
                "holding:0",
                Format::U16,
            )],
            vec![],
        ),
        None,
    );
    let refused = start(
        device(
            plc.addr,
            vec![counter(
                "good",
                EventType::completion(),
                "holding:5",
                Format::U16,
            )],
            vec![],
        ),
        None,
    );
    ok.counted_up_to("good", 10).await;
    plc.mem().holding.insert(0, 14);
    ok.counted_up_to("good", 14).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while refused.stats.exceptions.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refusal was not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        ok.stats.exceptions.load(Ordering::Relaxed),
        0,
        "line 1 saw no refusal"
    );
    assert!(refused.events().is_empty(), "nothing invented for line 2");
    ok.stop().await;
    refused.stop().await;
}

fn ring_spec(program: &plant_edge_tests::plc::RingProgram) -> modbus::RingSpec {
    let field = |name: &str, offset: u16| FieldSpec {
        name: name.into(),
        address: format!("holding:{}", program.first_slot + offset)
            .parse()
            .expect("address"),
        format: Format::U16,
        order: Order::default(),
        epoch: None,
    };
    modbus::RingSpec {
        signal: "completions".into(),
        event_type: EventType::completion(),
        write_index: format!("holding:{}", program.write_index)
            .parse()
            .expect("address"),
        read_index: format!("holding:{}", program.read_index)
            .parse()
            .expect("address"),
        first_slot: format!("holding:{}", program.first_slot)
            .parse()
            .expect("address"),
        slots: program.slots,
        slot_size: program.slot_size,
        fields: vec![field("sequence", 0), field("quantity", 1)],
        unit: "EA".into(),
        type_from: None,
        place: Default::default(),
    }
}

fn ring_device(plc: &Plc, program: &plant_edge_tests::plc::RingProgram) -> ModbusConfig {
    let mut config = device(plc.addr, vec![], vec![]);
    config.rings = vec![ring_spec(program)];
    config
}

/// Sequences of the journal's events, in journal order.
fn sequences(rig: &Rig) -> Vec<u64> {
    rig.events()
        .iter()
        .map(|e| {
            e["sequence"]
                .as_str()
                .expect("sequence")
                .parse()
                .expect("number")
        })
        .collect()
}

async fn read_back(plc: &Plc, program: &plant_edge_tests::plc::RingProgram, index: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while plc
        .mem()
        .holding
        .get(&program.read_index)
        .copied()
        .unwrap_or(0)
        != index
    {
        assert!(
            std::time::Instant::now() < deadline,
            "read index never reached {index}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_records_are_stored_in_order_once_and_released_to_the_plc_only_when_durable() {
    let plc = Arc::new(Plc::start().await);
    let program = plant_edge_tests::plc::RingProgram::new(16, 2_000, true);
    let rig = start(ring_device(&plc, &program), None);
    // Every read index the agent writes must name records already durable.
    let (journal, early) = (rig.journal.clone(), Arc::new(AtomicBool::new(false)));
    {
        let (early, read_index) = (early.clone(), program.read_index);
        plc.on_write(Box::new(move |_, table, address, value| {
            if table == 'h' && address == read_index {
                let mut stored = 0u64;
                journal
                    .scan_events(0, |_| {
                        stored += 1;
                        true
                    })
                    .expect("scan");
                if stored < u64::from(value) {
                    early.store(true, Ordering::Relaxed);
                }
            }
        }));
    }
    let running = program.clone().start(plc.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while program.made.load(Ordering::Relaxed) < 1_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the PLC program stalled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.abort();
    let made = program.made.load(Ordering::Relaxed);
    read_back(&plc, &program, made as u16).await;
    assert!(
        !early.load(Ordering::Relaxed),
        "a read index was written before its records were durable"
    );
    assert_eq!(
        sequences(&rig),
        (1..=made).collect::<Vec<_>>(),
        "every record once, in ring order"
    );
    let ids: std::collections::BTreeSet<String> = rig
        .events()
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len() as u64, made, "one id per record");
    assert_eq!(rig.stats.records_overwritten.load(Ordering::Relaxed), 0);
    assert_eq!(rig.stats.ring_records.load(Ordering::Relaxed), made);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapped_ring_is_counted_with_how_many_records_the_plc_overwrote() {
    let plc = Arc::new(Plc::start().await);
    // A PLC program that does not wait for the read index, 40 records
    // into 16 slots before the agent looks: 24 overwritten.
    let program = plant_edge_tests::plc::RingProgram::new(16, 1, false);
    program.make(&plc, 40);
    let rig = start(ring_device(&plc, &program), None);
    read_back(&plc, &program, 40).await;
    assert_eq!(rig.stats.records_overwritten.load(Ordering::Relaxed), 24);
    assert_eq!(
        sequences(&rig),
        (25..=40).collect::<Vec<_>>(),
        "the readable 16 are taken"
    );
    // The PLC waits from now on: nothing more is lost.
    program.make(&plc, 10);
    read_back(&plc, &program, 50).await;
    assert_eq!(rig.stats.records_overwritten.load(Ordering::Relaxed), 24);
    assert_eq!(sequences(&rig), (25..=50).collect::<Vec<_>>());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_records_stored_but_not_released_before_a_stop_are_released_after_without_a_second_event(
) {
    let plc = Arc::new(Plc::start().await);
    let program = plant_edge_tests::plc::RingProgram::new(16, 1, true);
    program.make(&plc, 10);
    // The PLC takes no write: the records are stored, the read index
    // stays at 0 (as after a stop between storing and writing it back).
    plc.mem().refuse_writes = true;
    let rig = start(ring_device(&plc, &program), None);
    until("10 records stored", || rig.events().len() >= 10).await;
    until("the refused release counted", || {
        rig.stats.exceptions.load(Ordering::Relaxed) > 0
    })
    .await;
    let dir = rig._dir;
    let journal = {
        let _ = rig.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), rig.task).await;
        rig.journal
    };
    assert_eq!(
        plc.mem()
            .holding
            .get(&program.read_index)
            .copied()
            .unwrap_or(0),
        0
    );
    plc.mem().refuse_writes = false;
    let rig = start_on(journal, ring_device(&plc, &program), dir);
    read_back(&plc, &program, 10).await;
    program.make(&plc, 5);
    read_back(&plc, &program, 15).await;
    assert_eq!(
        sequences(&rig),
        (1..=15).collect::<Vec<_>>(),
        "each record stored once"
    );
    assert_eq!(rig.stats.ring_restarts.load(Ordering::Relaxed), 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_the_plc_started_over_gives_its_records_new_ids() {
    let plc = Arc::new(Plc::start().await);
    let program = plant_edge_tests::plc::RingProgram::new(16, 1, true);
    let rig = start(ring_device(&plc, &program), None);
    for round in 1..=3u16 {
        program.make(&plc, 10);
        read_back(&plc, &program, 10 * round).await;
    }
    // The PLC restarts without retained memory: indexes back at 0, and
    // its new records repeat the old ones' slots and positions.
    {
        let mut m = plc.mem();
        m.holding.insert(program.write_index, 0);
        m.holding.insert(program.read_index, 0);
    }
    // Polls see the empty restarted ring before it fills again.
    until("the restart", || {
        rig.stats.ring_restarts.load(Ordering::Relaxed) > 0
    })
    .await;
    program.make(&plc, 5);
    read_back(&plc, &program, 5).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rig.events().len() < 35 {
        assert!(
            std::time::Instant::now() < deadline,
            "new records not stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ids: std::collections::BTreeSet<String> = rig
        .events()
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 35, "no new record gets an old record's id");
    assert_eq!(rig.stats.ring_restarts.load(Ordering::Relaxed), 1);
    rig.stop().await;
}
