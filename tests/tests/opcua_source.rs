//! The OPC UA source against a simulated MES (a real async-opcua server on
//! loopback) and a real journal on disk.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use buffer::{EventType, Journal, JournalConfig};
use plant_edge_tests::mes::{Mes, MesOptions, CERT_USER, PASSWORD, USER};
use protocols::source::{Classifier, SourceContext};
use protocols::sources::opcua::record::JsonField;
use protocols::sources::opcua::{
    self, session, Ack, AckArgument, AckValue, Acquisition, Connection, NodeCounter, NodeRecord,
    OpcUaConfig, OpcUaStats, RecordLayout, Sampling, UserIdentity,
};
use tokio::sync::watch;

const SOURCE: &str = "mes1";

struct Rig {
    journal: Journal,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<OpcUaStats>,
}

fn connection(mes: &Mes, pki: &Path) -> Connection {
    Connection {
        endpoint: mes.endpoint(),
        security_policy: "None".into(),
        security_mode: "None".into(),
        identity: UserIdentity::Anonymous,
        pki_dir: pki.to_owned(),
        trust_unknown_server: false,
        application_uri: "urn:plant-edge:site1:gw1".into(),
        timeout: Duration::from_secs(2),
    }
}

fn counter(mes: &Mes, signal: &str, event_type: EventType, name: &str) -> NodeCounter {
    NodeCounter {
        signal: signal.into(),
        event_type,
        node: mes.node(name).parse().expect("node id"),
        max_step: 1000,
        unit: "EA".into(),
        scale: 1.0,
        place: Default::default(),
    }
}

fn json_fields() -> Vec<JsonField> {
    let f = |name: &str, pointer: &str, required| JsonField {
        name: name.into(),
        pointer: pointer.into(),
        required,
    };
    vec![
        f("sequence", "/seq", true),
        f("work_order", "/order", true),
        f("material", "/material", false),
        f("quantity", "/qty", true),
        f("lot", "/lot", false),
    ]
}

fn json_record(mes: &Mes, ack: bool) -> NodeRecord {
    NodeRecord {
        signal: "completion".into(),
        event_type: EventType::completion(),
        trigger: mes.node("Line1.Record").parse().expect("node id"),
        layout: RecordLayout::Json(json_fields()),
        key: vec!["sequence".into()],
        unit: "EA".into(),
        type_from: None,
        place: Default::default(),
        sequence_shared: false,
        ack: ack.then(|| Ack::Write {
            node: mes.node("Line1.Ack").parse().expect("node id"),
            value: AckArgument {
                value: AckValue::Field("sequence".into()),
                data_type: None,
            },
        }),
    }
}

fn subscription() -> Acquisition {
    Acquisition::Subscription {
        publishing_interval: Duration::from_millis(50),
        sampling_interval: Sampling::Every(Duration::from_millis(25)),
        queue_size: 100,
        keep_alive_count: 10,
        lifetime_count: 60,
    }
}

fn config(
    connection: Connection,
    counters: Vec<NodeCounter>,
    records: Vec<NodeRecord>,
) -> OpcUaConfig {
    OpcUaConfig {
        connection,
        acquisition: subscription(),
        line: "L1".into(),
        machine: "filler1".into(),
        counters,
        records,
        rings: vec![],
    }
}

fn start(dir: &Path, config: OpcUaConfig) -> Rig {
    start_with_bound(dir, config, JournalConfig::DEFAULT_MAX_BYTES)
}

/// [`start`] with the journal's disk bound set to `max_bytes`.
fn start_with_bound(dir: &Path, config: OpcUaConfig, max_bytes: u64) -> Rig {
    start_with(dir, config, max_bytes, None)
}

/// [`start`] with a disk bound and reconciliation periods.
fn start_with(
    dir: &Path,
    config: OpcUaConfig,
    max_bytes: u64,
    periods: Option<protocols::period::PeriodRule>,
) -> Rig {
    // Shown by the test runner only when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,protocols=debug")
        .with_test_writer()
        .try_init();
    let mut jc = JournalConfig::new(dir.join("journal"));
    jc.sinks = vec!["erp".into()];
    jc.max_bytes = max_bytes;
    let journal = Journal::open(jc).expect("journal");
    let (appender, _writer) = journal.start_writer();
    let (stop, shutdown) = watch::channel(false);
    let stats = Arc::new(OpcUaStats::default());
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
        read: Default::default(),
        periods: periods.map(|rule| {
            Arc::new(protocols::period::Checkpointing {
                rule,
                routes: journal.routes_all(),
            })
        }),
    };
    let task = tokio::spawn(opcua::run(ctx, config, stats.clone()));
    Rig {
        journal,
        stop,
        task,
        stats,
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

    fn cursor(&self) -> serde_json::Value {
        self.journal
            .source_cursor(SOURCE)
            .expect("cursor")
            .map(|c| serde_json::from_slice(&c).expect("json"))
            .unwrap_or_default()
    }

    /// Waits until `check` holds for the stored cursor.
    async fn until(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value, &[serde_json::Value]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let cursor = self.cursor();
            if check(&cursor, &self.events()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never saw {what}; cursor {cursor}; stats {:?}",
                self.stats
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn counted(&self, signal: &str, raw: u64) {
        self.until(&format!("{signal} = {raw}"), |c, _| {
            c["counters"][signal]["raw"].as_u64() == Some(raw)
        })
        .await;
    }

    async fn stop(self) -> Journal {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        self.journal
    }
}

fn of_type<'a>(events: &'a [serde_json::Value], t: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["type"] == t).collect()
}

fn record_json(seq: u32, order: &str, qty: f64) -> String {
    format!(r#"{{"seq":{seq},"order":"{order}","material":"M-100","qty":{qty},"lot":"L{seq}"}}"#)
}

fn options(dir: &Path) -> MesOptions {
    MesOptions::open(dir.join("mes-pki"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_turns_counter_changes_and_records_into_events_and_acks_after_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Good", 100u32);
    mes.set("Line1.Scrap", 65_530u16);
    let rig = start(
        dir.path(),
        config(
            connection(&mes, &dir.path().join("pki")),
            vec![
                counter(&mes, "good", EventType::completion(), "Line1.Good"),
                counter(&mes, "scrap", EventType::scrap(), "Line1.Scrap"),
            ],
            vec![json_record(&mes, true)],
        ),
    );
    rig.counted("good", 100).await;
    rig.counted("scrap", 65_530).await;
    mes.set("Line1.Good", 105u32);
    rig.counted("good", 105).await;
    mes.set("Line1.Good", 112u32);
    mes.set("Line1.Scrap", 3u16); // wraps: 65530 → 3 is 9 parts
    rig.counted("good", 112).await;
    rig.counted("scrap", 3).await;
    for seq in 1..=3u32 {
        mes.set(
            "Line1.Record",
            record_json(seq, &format!("WO-{seq}"), 10.0 * seq as f64),
        );
        mes.wait_acks(&format!("ack {seq}"), Duration::from_secs(10), |a| {
            a.written.len() == seq as usize
        })
        .await;
        // The ack arrived: the record must already be in the journal.
        let events = rig.events();
        assert!(
            events
                .iter()
                .any(|e| e["sequence"].as_str() == Some(seq.to_string().as_str())),
            "record {seq} acknowledged before it was stored"
        );
    }
    let events = rig.events();
    let good: Vec<u64> = of_type(&events, "production.completion")
        .iter()
        .filter(|e| e["data"]["counter"].is_object())
        .map(|e| e["data"]["quantity"].as_u64().expect("quantity"))
        .collect();
    assert_eq!(good, vec![5, 7], "baseline 100 not counted, then +5, +7");
    let scrap: Vec<u64> = of_type(&events, "production.scrap")
        .iter()
        .map(|e| e["data"]["quantity"].as_u64().expect("quantity"))
        .collect();
    assert_eq!(scrap, vec![9], "16-bit wrap counted across the top");
    let records: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| {
            e["data"]["origin"]["address"]
                .as_str()
                .is_some_and(|a| a.contains("record"))
        })
        .collect();
    assert_eq!(records.len(), 3);
    assert_eq!(records[1]["data"]["work_order"], "WO-2");
    assert_eq!(records[1]["data"]["material"], "M-100");
    assert_eq!(records[1]["data"]["lot"], "L2");
    assert_eq!(records[1]["data"]["quantity"], 20.0);
    assert_eq!(records[1]["data"]["attributes"]["cost_center"], "4711");
    assert_eq!(records[1]["data"]["origin"]["protocol"], "opcua");
    assert_eq!(records[1]["data"]["attributes"]["time_source"], "source");
    assert!(records[1]["data"]["origin"]["source_time"].is_string());
    let written: Vec<_> = mes.acks().written;
    assert_eq!(
        written,
        vec![opcua_types_u32(1), opcua_types_u32(2), opcua_types_u32(3)],
        "each record acknowledged once, with its sequence, as UInt32 like the node"
    );
    // The MES sees the write before the source hears its answer and counts it.
    let stats = rig.stats.clone();
    rig.until("3 acknowledgements counted", move |_, _| {
        stats.records_acked.load(Ordering::Relaxed) == 3
    })
    .await;
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_of_an_mes_line_balance_its_counter_and_records_per_period() {
    const PERIOD_MS: u64 = 1000;
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Good", 100u32);
    let rig = start_with(
        dir.path(),
        config(
            connection(&mes, &dir.path().join("pki")),
            vec![counter(&mes, "good", EventType::completion(), "Line1.Good")],
            vec![json_record(&mes, true)],
        ),
        JournalConfig::DEFAULT_MAX_BYTES,
        Some(protocols::period::PeriodRule::Every(Duration::from_millis(
            PERIOD_MS,
        ))),
    );
    rig.counted("good", 100).await;
    let (mut good, mut made) = (100u32, 0.0);
    for step in 1..=30u32 {
        tokio::time::sleep(Duration::from_millis(90)).await;
        good += step % 7;
        made += f64::from(step % 7);
        mes.set("Line1.Good", good);
        if step % 5 == 0 {
            let seq = step / 5;
            mes.set("Line1.Record", record_json(seq, "WO-1", 2.5));
            made += 2.5;
            mes.wait_acks("ack", Duration::from_secs(10), |a| {
                a.written.len() == seq as usize
            })
            .await;
        }
    }
    rig.counted("good", u64::from(good)).await;
    // The period holding the last parts closes on its own (no new values).
    let last_made = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    rig.until("the last period closed", |_, events| {
        of_type(events, "production.checkpoint")
            .iter()
            .any(|c| c["data"]["checkpoint"]["end_ms"].as_u64() > Some(last_made))
    })
    .await;
    let events = rig.events();
    let ledger = rig.journal.ledger(0, u64::MAX).expect("ledger");
    let mut counted_total = 0.0;
    let mut records_total = 0.0;
    let checkpoints = of_type(&events, "production.checkpoint");
    assert!(
        checkpoints.len() >= 3,
        "about 3 s of production in 1 s periods"
    );
    for c in checkpoints {
        let t = &c["data"]["checkpoint"];
        let (start, end) = (
            t["start_ms"].as_u64().expect("start"),
            t["end_ms"].as_u64().expect("end"),
        );
        let sent: f64 = ledger
            .iter()
            .filter(|e| {
                e.event_type != "production.checkpoint" && e.at_ms >= start && e.at_ms < end
            })
            .map(|e| e.quantity)
            .sum();
        let counted = c["data"]["quantity"].as_f64().expect("quantity");
        assert_eq!(
            counted, sent,
            "period {start}: counted vs the events in it: {c}"
        );
        let records: f64 = t["records"]["completion"]["quantity"]
            .as_f64()
            .unwrap_or(0.0);
        let counter = t["counters"]["good"]["counted"].as_f64().unwrap_or(0.0);
        assert_eq!(counted, counter + records, "{c}");
        counted_total += counted;
        records_total += records;
    }
    assert_eq!(
        counted_total, made,
        "the checkpoints add up to what the line made"
    );
    assert_eq!(records_total, 6.0 * 2.5, "every record in a checkpoint");
    rig.stop().await;
    mes.stop().await;
}

fn opcua_types_u32(n: u32) -> ::opcua::types::Variant {
    ::opcua::types::Variant::UInt32(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_stream_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = options(dir.path());
    let mes = Mes::start(&opts).await;
    let port = mes.addr.port();
    mes.set("Line1.Good", 1_000u32);
    let rig = start(
        dir.path(),
        config(
            connection(&mes, &dir.path().join("pki")),
            vec![counter(&mes, "good", EventType::completion(), "Line1.Good")],
            vec![json_record(&mes, true)],
        ),
    );
    rig.counted("good", 1_000).await;
    mes.set("Line1.Good", 1_010u32);
    mes.set("Line1.Record", record_json(1, "WO-1", 5.0));
    mes.wait_acks("ack 1", Duration::from_secs(10), |a| a.written.len() == 1)
        .await;
    rig.counted("good", 1_010).await;
    mes.stop().await;
    // The line keeps producing while the MES server restarts.
    let mes = Mes::start(&MesOptions {
        port,
        ..opts.clone()
    })
    .await;
    mes.set("Line1.Good", 1_042u32);
    mes.set("Line1.Record", record_json(1, "WO-1", 5.0)); // still showing the last record
    rig.counted("good", 1_042).await;
    mes.set("Line1.Record", record_json(2, "WO-2", 6.0));
    mes.wait_acks("ack 2 after restart", Duration::from_secs(20), |a| {
        a.written.contains(&opcua_types_u32(2))
    })
    .await;
    mes.set("Line1.Good", 1_050u32);
    rig.counted("good", 1_050).await;
    assert!(
        rig.stats.connects.load(Ordering::Relaxed) >= 2,
        "reconnected"
    );
    let events = rig.events();
    let counted: u64 = events
        .iter()
        .filter(|e| e["data"]["counter"].is_object())
        .map(|e| e["data"]["quantity"].as_u64().expect("quantity"))
        .sum();
    assert_eq!(
        counted, 50,
        "every part from 1000 to 1050 counted exactly once"
    );
    let sequences: Vec<&str> = events
        .iter()
        .filter_map(|e| e["sequence"].as_str())
        .collect();
    let record_seqs: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["data"]["work_order"].is_string())
        .collect();
    assert_eq!(
        record_seqs.len(),
        2,
        "record 1 seen again after restart is not a second event; {sequences:?}"
    );
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["id"].as_str().expect("id"))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "no duplicate ids");
    assert!(
        !mes.acks().written.contains(&opcua_types_u32(1)) || mes.acks().written.len() <= 2,
        "record 1 acknowledged again at most once after the restart"
    );
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_dead_lettered_with_the_reason_and_not_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    let rig = start(
        dir.path(),
        config(
            connection(&mes, &dir.path().join("pki")),
            vec![],
            vec![json_record(&mes, true)],
        ),
    );
    rig.until("connected", |_, _| {
        rig.stats.connected.load(Ordering::SeqCst)
    })
    .await;
    let bad = [
        "{this is not json",
        r#"{"seq":1,"qty":3}"#,
        r#"{"seq":1,"order":"WO-1","qty":"three"}"#,
    ];
    for (i, text) in bad.iter().enumerate() {
        mes.set("Line1.Record", *text);
        rig.until("dead letter", |_, _| {
            rig.journal.dead_letters().expect("dead letters").len() == i + 1
        })
        .await;
    }
    mes.set("Line1.Record", 42u32); // wrong type altogether
    rig.until("dead letter for a number", |_, _| {
        rig.journal.dead_letters().expect("dead letters").len() == 4
    })
    .await;
    mes.set("Line1.Record", record_json(1, "WO-1", 3.0));
    mes.wait_acks("ack of the good record", Duration::from_secs(10), |a| {
        !a.written.is_empty()
    })
    .await;
    let dead = rig.journal.dead_letters().expect("dead letters");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(reasons[0].contains("not JSON"), "{reasons:?}");
    assert!(
        reasons[1].contains("missing field work_order"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("quantity is text"), "{reasons:?}");
    assert!(reasons[3].contains("expected a JSON string"), "{reasons:?}");
    assert_eq!(rig.stats.malformed_records.load(Ordering::Relaxed), 4);
    assert_eq!(
        mes.acks().written,
        vec![opcua_types_u32(1)],
        "only the good record acknowledged"
    );
    assert_eq!(rig.events().len(), 1, "only the good record is an event");
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_records_acknowledged_by_method_call_and_polling_mode_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Good", 7u32);
    mes.set("Line1.Weight", 10.5f64);
    let node = |n: &str| mes.node(n).parse().expect("node id");
    let record = NodeRecord {
        signal: "completion".into(),
        event_type: EventType::completion(),
        trigger: node("Line1.Seq"),
        layout: RecordLayout::Nodes(vec![
            ("work_order".into(), node("Line1.Order")),
            ("quantity".into(), node("Line1.Qty")),
        ]),
        key: vec!["sequence".into()],
        unit: "KG".into(),
        type_from: None,
        place: Default::default(),
        sequence_shared: false,
        ack: Some(Ack::Call {
            object: node("Line1"),
            method: node("Line1.Acknowledge"),
            arguments: vec![AckArgument {
                value: AckValue::Field("sequence".into()),
                data_type: Some("UInt32".into()),
            }],
        }),
    };
    let mut cfg = config(
        connection(&mes, &dir.path().join("pki")),
        vec![
            counter(&mes, "good", EventType::completion(), "Line1.Good"),
            NodeCounter {
                unit: "KG".into(),
                ..counter(&mes, "weight", EventType::scrap(), "Line1.Weight")
            },
        ],
        vec![record],
    );
    cfg.acquisition = Acquisition::Polling {
        interval: Duration::from_millis(50),
    };
    let rig = start(dir.path(), cfg);
    rig.counted("good", 7).await;
    mes.set("Line1.Good", 9u32);
    mes.set("Line1.Weight", 12.0f64);
    rig.counted("good", 9).await;
    rig.until("weight", |c, _| {
        c["counters"]["weight"]["raw"].as_u64() == Some(12.0f64.to_bits())
    })
    .await;
    mes.set("Line1.Order", "WO-77");
    mes.set("Line1.Qty", 4.25f64);
    mes.set("Line1.Seq", 5u32);
    mes.wait_acks("method ack", Duration::from_secs(10), |a| {
        !a.called.is_empty()
    })
    .await;
    mes.set_bad("Line1.Good");
    rig.until("bad status counted", |_, _| {
        rig.stats.bad_status.load(Ordering::Relaxed) > 0
    })
    .await;
    let events = rig.events();
    let record = events
        .iter()
        .find(|e| e["data"]["work_order"] == "WO-77")
        .expect("record event");
    assert_eq!(record["data"]["quantity"], 4.25);
    assert_eq!(record["data"]["unit"], "KG");
    assert_eq!(record["sequence"], "5");
    assert_eq!(mes.acks().called, vec![vec![opcua_types_u32(5)]]);
    let weight: Vec<f64> = of_type(&events, "production.scrap")
        .iter()
        .map(|e| e["data"]["quantity"].as_f64().expect("quantity"))
        .collect();
    assert_eq!(weight, vec![1.5]);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["data"]["counter"].is_object())
            .count(),
        1,
        "good 7 → 9 once; the bad status made no event"
    );
    rig.stop().await;
    mes.stop().await;
}

/// Basic256Sha256 SignAndEncrypt as `identity`.
fn sign_and_encrypt(mes: &Mes, pki: &Path, identity: UserIdentity) -> Connection {
    Connection {
        security_policy: "Basic256Sha256".into(),
        security_mode: "SignAndEncrypt".into(),
        identity,
        ..connection(mes, pki)
    }
}

/// Connects once with the given security and identity; `Err` is the
/// operator-facing message.
async fn try_connect(connection: &Connection) -> Result<(), String> {
    let mut client = session::client(connection)?;
    let (session, event_loop) = session::open(&mut client, connection).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let driver = session::drive(event_loop, tx);
    let result = session::connected(&session, &mut rx, connection).await;
    if result.is_ok() {
        let read = session
            .read(
                &[::opcua::types::ReadValueId {
                    node_id: ::opcua::types::VariableId::Server_ServerStatus_State.into(),
                    attribute_id: ::opcua::types::AttributeId::Value as u32,
                    ..Default::default()
                }],
                ::opcua::types::TimestampsToReturn::Neither,
                0.0,
            )
            .await
            .map_err(|e| format!("read over the secure session: {e}"))?;
        assert!(read[0].value.is_some(), "server state readable");
        let _ = session.disconnect().await;
    }
    driver.abort();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_sessions_need_a_trusted_server_certificate_and_the_right_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&MesOptions {
        require_user: true,
        ..options(dir.path())
    })
    .await;
    let pki = dir.path().join("pki");
    let secure = sign_and_encrypt(
        &mes,
        &pki,
        UserIdentity::UserName {
            user: USER.into(),
            password: PASSWORD.into(),
        },
    );
    let refused = try_connect(&secure)
        .await
        .expect_err("untrusted server must be refused");
    assert!(
        refused.contains("server's certificate is not trusted")
            && refused.contains("rejected")
            && refused.contains("trusted"),
        "documented message: {refused}"
    );
    let rejected = session::newest_rejected(&pki).expect("server certificate copied to rejected/");
    std::fs::rename(
        &rejected,
        pki.join("trusted")
            .join(rejected.file_name().expect("name")),
    )
    .expect("operator moves it to trusted/");
    try_connect(&secure)
        .await
        .expect("Basic256Sha256 SignAndEncrypt with user/password after trusting");

    for (policy, mode) in [
        ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
        ("Aes256_Sha256_RsaPss", "Sign"),
    ] {
        let mut other = secure.clone();
        other.security_policy = policy.into();
        other.security_mode = mode.into();
        try_connect(&other)
            .await
            .unwrap_or_else(|e| panic!("{policy} {mode}: {e}"));
    }

    let mut wrong = secure.clone();
    wrong.identity = UserIdentity::UserName {
        user: USER.into(),
        password: "not-the-password".into(),
    };
    let denied = try_connect(&wrong)
        .await
        .expect_err("wrong password refused");
    assert!(denied.contains("refused the user identity"), "{denied}");

    let mut anonymous = secure.clone();
    anonymous.identity = UserIdentity::Anonymous;
    assert!(
        try_connect(&anonymous).await.is_err(),
        "anonymous not offered"
    );
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_starting_together_on_a_fresh_pki_folder_share_one_gateway_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    let pki = dir.path().join("pki");
    let mut secure = sign_and_encrypt(&mes, &pki, UserIdentity::Anonymous);
    secure.trust_unknown_server = true;
    // What the library says while the clients are made (the agent hides
    // its logs by default; the race showed as errors there and as sessions
    // without a certificate).
    let said = Captured::default();
    let writer = said.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("the only subscriber in this test process");
    // Four sources of one agent start at the same instant; each needs the
    // gateway certificate for SignAndEncrypt on its first attempt.
    const SOURCES: usize = 4;
    let start = Arc::new(std::sync::Barrier::new(SOURCES));
    let sources: Vec<_> = (0..SOURCES)
        .map(|_| {
            let (start, secure) = (start.clone(), secure.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                start.wait();
                runtime.block_on(try_connect(&secure))
            })
        })
        .collect();
    for (i, source) in sources.into_iter().enumerate() {
        source
            .join()
            .expect("source thread")
            .unwrap_or_else(|e| panic!("source {i} could not connect on its first attempt: {e}"));
    }
    let own: Vec<_> = std::fs::read_dir(pki.join("own"))
        .expect("own/ exists")
        .collect();
    assert_eq!(own.len(), 1, "one gateway certificate: {own:?}");
    let said = said.text();
    assert!(
        !said.contains("Certificate creation failed")
            && !said.contains("missing its application instance certificate"),
        "certificate race: {said}"
    );
    mes.stop().await;
}

/// Log output kept for assertions.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A user certificate and key as an OT engineer would get them from the
/// plant's PKI (here made with async-opcua's own generator).
fn user_certificate(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join(format!("{name}.der"));
    let key = dir.join(format!("{name}.pem"));
    ::opcua::crypto::CertificateStore::create_certificate_and_key(
        &::opcua::crypto::X509Data {
            key_size: 2048,
            common_name: name.into(),
            organization: "plant".into(),
            organizational_unit: "line1".into(),
            country: "DE".into(),
            state: "BY".into(),
            alt_host_names: vec![format!("urn:plant:user:{name}")].into(),
            certificate_duration_days: 30,
        },
        true,
        &cert,
        &key,
    )
    .expect("user certificate");
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_user_identity_and_trust_on_first_use_for_commissioning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = user_certificate(dir.path(), CERT_USER);
    let (stranger_cert, stranger_key) = user_certificate(dir.path(), "stranger");
    let mes = Mes::start(&MesOptions {
        require_user: true,
        x509_user: Some(cert.clone()),
        ..options(dir.path())
    })
    .await;
    let pki = dir.path().join("pki");
    let mut secure = sign_and_encrypt(
        &mes,
        &pki,
        UserIdentity::Certificate {
            cert: cert.clone(),
            key: key.clone(),
        },
    );
    // Commissioning switch: the unknown server certificate is trusted and
    // kept in trusted/, so the switch can be turned off afterwards.
    secure.trust_unknown_server = true;
    try_connect(&secure)
        .await
        .expect("X.509 user over SignAndEncrypt, server trusted on first use");
    let trusted: Vec<_> = std::fs::read_dir(pki.join("trusted"))
        .expect("trusted/ exists")
        .collect();
    assert_eq!(
        trusted.len(),
        1,
        "the server certificate was stored in trusted/"
    );
    assert!(
        session::newest_rejected(&pki).is_none(),
        "nothing rejected when trusting on first use"
    );
    secure.trust_unknown_server = false;
    try_connect(&secure)
        .await
        .expect("still trusted with the switch off again");

    let mut stranger = secure.clone();
    stranger.identity = UserIdentity::Certificate {
        cert: stranger_cert,
        key: stranger_key,
    };
    let denied = try_connect(&stranger)
        .await
        .expect_err("a user certificate the server does not know is refused");
    assert!(denied.contains("refused the user identity"), "{denied}");

    let mut mismatched = secure.clone();
    mismatched.identity = UserIdentity::Certificate {
        cert,
        key: dir.path().join("stranger.pem"),
    };
    assert!(
        try_connect(&mismatched).await.is_err(),
        "a key that does not belong to the certificate cannot sign the token"
    );
    mes.stop().await;
}

/// A TCP relay between the source and the MES that can lose one
/// PublishResponse carrying data, as a flaky network path or a
/// misbehaving gateway in between would. Only for SecurityPolicy None:
/// the secure channel's sequence numbers of later messages are lowered
/// by one so the channel itself still looks intact and only the
/// subscription's notification sequence shows the gap.
struct LossyRelay {
    drop_next_data: Arc<std::sync::atomic::AtomicBool>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    /// Added to the notification sequence number of every data publish
    /// (a server that jumps its sequence).
    jump: Arc<std::sync::atomic::AtomicU32>,
    /// Rewrites "end of times" timestamps (i64::MAX ticks, which
    /// async-opcua sends for anything past 9999) to i64::MAX - 1 ticks:
    /// a real date in year 30828, as a server with a broken clock sends.
    far_future: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Encoding id of PublishResponse (i=829) as a four-byte node id.
const PUBLISH_RESPONSE: [u8; 4] = [0x01, 0x00, 0x3d, 0x03];

impl LossyRelay {
    async fn start(listen: std::net::SocketAddr, upstream: std::net::SocketAddr) -> LossyRelay {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .expect("bind relay");
        let drop_next_data = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let jump = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let far_future = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (arm, count, shift, future) = (
            drop_next_data.clone(),
            dropped.clone(),
            jump.clone(),
            far_future.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut client_read, client_write) = client.into_split();
                let (server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                tokio::spawn(relay_down(
                    server_read,
                    client_write,
                    arm.clone(),
                    count.clone(),
                    shift.clone(),
                    future.clone(),
                ));
            }
        });
        LossyRelay {
            drop_next_data,
            dropped,
            jump,
            far_future,
            task,
        }
    }
}

/// Server → client: whole frames, one data PublishResponse dropped on
/// request, later sequence numbers shifted down.
async fn relay_down(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    arm: Arc<std::sync::atomic::AtomicBool>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    jump: Arc<std::sync::atomic::AtomicU32>,
    far_future: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut shift = 0u32;
    loop {
        let mut header = [0u8; 8];
        if from.read_exact(&mut header).await.is_err() {
            return;
        }
        let size = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        let mut frame = header.to_vec();
        frame.resize(size.max(8), 0);
        if from.read_exact(&mut frame[8..]).await.is_err() {
            return;
        }
        let kind = &frame[0..3];
        let data_sequence = (kind == b"MSG" && frame[3] == b'F')
            .then(|| publish_data_sequence_at(&frame))
            .flatten();
        if data_sequence.is_some() && arm.swap(false, Ordering::SeqCst) {
            shift += 1;
            dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        if data_sequence.is_some() && far_future.load(Ordering::SeqCst) {
            let end_of_times = i64::MAX.to_le_bytes();
            let year_30828 = (i64::MAX - 1).to_le_bytes();
            let mut at = 0;
            while at + 8 <= frame.len() {
                if frame[at..at + 8] == end_of_times {
                    frame[at..at + 8].copy_from_slice(&year_30828);
                    at += 8;
                } else {
                    at += 1;
                }
            }
        }
        let jump = jump.load(Ordering::SeqCst);
        if let (Some(at), true) = (data_sequence, jump > 0) {
            let seq = u32::from_le_bytes(frame[at..at + 4].try_into().expect("4 bytes"));
            frame[at..at + 4].copy_from_slice(&seq.wrapping_add(jump).to_le_bytes());
        }
        if let Some(at) = sequence_offset(&frame) {
            if shift > 0 && frame.len() >= at + 4 {
                let seq = u32::from_le_bytes(frame[at..at + 4].try_into().expect("4 bytes"));
                frame[at..at + 4].copy_from_slice(&(seq - shift).to_le_bytes());
            }
        }
        if to.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// Where the sequence number sits in a MSG, CLO or OPN chunk (policy None).
fn sequence_offset(frame: &[u8]) -> Option<usize> {
    let le_i32 = |at: usize| {
        frame
            .get(at..at + 4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    match &frame[0..3] {
        b"MSG" | b"CLO" => Some(16),
        b"OPN" => {
            // channel id, then policy URI, sender certificate and receiver
            // thumbprint as length-prefixed byte strings (-1 = null).
            let mut at = 12;
            for _ in 0..3 {
                at += 4 + le_i32(at)?.max(0) as usize;
            }
            Some(at)
        }
        _ => None,
    }
}

/// Where the notification sequence number sits, if a single-chunk MSG is a
/// PublishResponse with notification data (not a keep-alive). Walks the
/// fixed part of the response.
fn publish_data_sequence_at(frame: &[u8]) -> Option<usize> {
    if frame.get(24..28) != Some(&PUBLISH_RESPONSE[..]) {
        return None;
    }
    let le_i32 = |at: usize| {
        frame
            .get(at..at + 4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    // ResponseHeader: timestamp, handle, result, then diagnostics (empty:
    // mask 0), string table, additional header (null extension object).
    let mut at = 28 + 8 + 4 + 4;
    if frame.get(at) != Some(&0) {
        return None;
    }
    at += 1;
    if le_i32(at).is_none_or(|n| n > 0) {
        return None;
    }
    at += 4 + 3;
    // subscription id, available sequence numbers, more notifications
    at += 4;
    let available = le_i32(at)?;
    at += 4 + 4 * available.max(0) as usize + 1;
    // NotificationMessage: sequence number, publish time, data array
    let sequence_at = at;
    at += 4 + 8;
    le_i32(at).is_some_and(|n| n > 0).then_some(sequence_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_is_republished_and_no_record_is_missed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Good", 100u32);
    mes.set("Line1.Record", record_json(1, "WO-1", 10.0));
    // Same port on another loopback address: OPC UA servers check the
    // port of the endpoint URL, not the host.
    let relay_addr = std::net::SocketAddr::from(([127, 0, 0, 2], mes.addr.port()));
    let relay = LossyRelay::start(relay_addr, mes.addr).await;
    let mut through_relay = connection(&mes, &dir.path().join("pki"));
    through_relay.endpoint = format!("opc.tcp://{relay_addr}/");
    let rig = start(
        dir.path(),
        config(
            through_relay,
            vec![counter(&mes, "good", EventType::completion(), "Line1.Good")],
            vec![json_record(&mes, false)],
        ),
    );
    rig.counted("good", 100).await;
    let records = |events: &[serde_json::Value]| -> Vec<String> {
        of_type(events, "production.completion")
            .iter()
            .filter(|e| e["data"]["work_order"].is_string())
            .filter_map(|e| e["sequence"].as_str().map(str::to_owned))
            .collect()
    };
    rig.until("record 1", |_, e| records(e) == ["1"]).await;
    // The initial values of both nodes must be through first, so the
    // message the relay loses is the one with record 2.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rig.stats.notifications.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no notification through the relay"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    relay.drop_next_data.store(true, Ordering::SeqCst);
    mes.set("Line1.Record", record_json(2, "WO-2", 20.0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while relay.dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never saw record 2's notification"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Record 2 now exists only in the server's retransmission queue; the
    // next notification shows the gap.
    mes.set("Line1.Record", record_json(3, "WO-3", 30.0));
    mes.set("Line1.Good", 107u32);
    rig.counted("good", 107).await;
    rig.until("records 1, 2, 3", |_, e| records(e) == ["1", "2", "3"])
        .await;
    let stats = &rig.stats;
    assert!(
        stats.sequence_gaps.load(Ordering::Relaxed) >= 1,
        "{stats:?}"
    );
    assert!(stats.republished.load(Ordering::Relaxed) >= 1, "{stats:?}");
    assert_eq!(
        stats.full_reads.load(Ordering::Relaxed),
        1,
        "recovered by Republish, not by reading everything again: {stats:?}"
    );
    assert_eq!(stats.records_missed.load(Ordering::Relaxed), 0, "{stats:?}");
    relay.task.abort();
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_dropped_while_the_journal_is_full_are_recovered_by_a_full_read() {
    const NODES: usize = 1000;
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    let nodes = mes.add_counters(NODES);
    let counters = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| NodeCounter {
            signal: format!("c{i}"),
            event_type: EventType::completion(),
            node: node.parse().expect("node id"),
            max_step: 1000,
            unit: "EA".into(),
            scale: 1.0,
            place: Default::default(),
        })
        .collect();
    // The first append (up to 4,096 values) fills the journal; the next
    // one waits for the ERP, so the source stops taking notifications and
    // the 8,192-entry queue behind it overflows (after some 17 rounds).
    let rig = start_with_bound(
        dir.path(),
        config(connection(&mes, &dir.path().join("pki")), counters, vec![]),
        100_000,
    );
    rig.until("baselines", |c, _| {
        c["counters"].as_object().is_some_and(|m| m.len() == NODES)
    })
    .await;
    // One round of changes per 60 ms (the server samples every 25 ms;
    // closer changes would merge into one) until the queue has overflowed;
    // the full read must then bring every counter to the last round.
    let mut rounds = 0u32;
    let mut pace = tokio::time::interval(Duration::from_millis(60));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        pace.tick().await;
        rounds += 1;
        mes.set_counters(NODES, rounds);
        if rig.stats.notifications_dropped.load(Ordering::SeqCst) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the notification queue never overflowed after {rounds} rounds: {:?}",
            rig.stats
        );
    }
    let rounds = u64::from(rounds);
    // The ERP comes back: drain until every counter is at the last round.
    let mut quantity = vec![0u64; NODES];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // The cursor is stored in the same commit as its events: once it
        // shows the last round, reading on finds every event.
        let cursor = rig.cursor();
        let caught_up =
            (0..NODES).all(|i| cursor["counters"][format!("c{i}")]["raw"].as_u64() == Some(rounds));
        let batch = rig.journal.read_batch("erp", 2000).expect("read");
        for event in &batch {
            let e: serde_json::Value = serde_json::from_slice(&event.payload).expect("json");
            if let Some(i) = e["data"]["origin"]["address"]
                .as_str()
                .and_then(|a| a.rsplit_once("Bench.C"))
                .and_then(|(_, n)| n.parse::<usize>().ok())
            {
                quantity[i] += e["data"]["quantity"].as_u64().expect("quantity");
            }
        }
        rig.journal
            .ack("erp", &batch.iter().map(|e| e.seq).collect::<Vec<_>>())
            .expect("ack");
        // Readers see an event once it is durable; the cursor can show a
        // commit a moment earlier, so wait for the parts too.
        let parts: u64 = quantity.iter().sum();
        if batch.is_empty() && caught_up && parts >= NODES as u64 * rounds {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let behind: Vec<_> = (0..NODES)
                .filter(|i| cursor["counters"][format!("c{i}")]["raw"].as_u64() != Some(rounds))
                .take(5)
                .map(|i| (i, cursor["counters"][format!("c{i}")].clone(), quantity[i]))
                .collect();
            panic!(
                "counters never caught up ({parts} parts read): {behind:?} {:?} journal {:?} {:?}",
                rig.stats,
                rig.journal.counters(),
                rig.journal.stats()
            );
        }
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let wrong: Vec<(usize, u64)> = quantity
        .iter()
        .enumerate()
        .filter(|(_, q)| **q != rounds)
        .map(|(i, q)| (i, *q))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "every counter delivered {rounds} parts in all, exactly: {wrong:?} ({:?})",
        rig.stats
    );
    assert!(
        rig.stats.full_reads.load(Ordering::SeqCst) >= 2,
        "the overflow was closed by a full read: {:?}",
        rig.stats
    );
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_an_mes_repeats_after_restarting_its_sequence_are_new_facts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    let rig = start(
        dir.path(),
        config(
            connection(&mes, &dir.path().join("pki")),
            vec![],
            vec![json_record(&mes, true)],
        ),
    );
    let present = |text: String, expected: usize| {
        let mes = &mes;
        async move {
            mes.set("Line1.Record", text);
            mes.wait_acks("the ack", Duration::from_secs(10), move |a| {
                a.written.len() == expected
            })
            .await
        }
    };
    for seq in 1..=3u32 {
        present(record_json(seq, &format!("WO-{seq}"), 10.0), seq as usize).await;
    }
    // The MES restarts its sequence: the same records, field for field.
    for seq in 1..=3u32 {
        present(
            record_json(seq, &format!("WO-{seq}"), 10.0),
            3 + seq as usize,
        )
        .await;
    }
    // Cleared, then the last record's twin: released, so a new fact.
    mes.set("Line1.Record", String::new());
    rig.until("the release stored", |c, _| {
        c["handshakes"]["completion"]["pending"].is_null()
    })
    .await;
    present(record_json(3, "WO-3", 10.0), 7).await;
    let records: Vec<String> = rig
        .events()
        .iter()
        .filter(|e| {
            e["data"]["origin"]["address"]
                .as_str()
                .is_some_and(|a| a.contains("record"))
        })
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(records.len(), 7, "every acknowledged record is stored");
    assert_eq!(
        records
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        7,
        "a different fact never gets an old id"
    );
    // The MES sees the write before the source hears its answer and counts it.
    let stats = rig.stats.clone();
    rig.until("7 acknowledgements counted", move |_, _| {
        stats.records_acked.load(Ordering::Relaxed) == 7
    })
    .await;
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_jumping_its_sequence_near_2_32_costs_one_full_read_not_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Good", 100u32);
    let relay_addr = std::net::SocketAddr::from(([127, 0, 0, 3], mes.addr.port()));
    let relay = LossyRelay::start(relay_addr, mes.addr).await;
    let mut through_relay = connection(&mes, &dir.path().join("pki"));
    through_relay.endpoint = format!("opc.tcp://{relay_addr}/");
    let rig = start(
        dir.path(),
        config(
            through_relay,
            vec![counter(&mes, "good", EventType::completion(), "Line1.Good")],
            vec![],
        ),
    );
    rig.counted("good", 100).await;
    let reads_before = rig.stats.full_reads.load(Ordering::SeqCst);
    // From now on the server's notification numbers jump by ~4 billion.
    relay.jump.store(u32::MAX - 10, Ordering::SeqCst);
    mes.set("Line1.Good", 105u32);
    rig.counted("good", 105).await;
    mes.set("Line1.Good", 109u32);
    rig.counted("good", 109).await;
    let stats = &rig.stats;
    assert!(
        stats.sequence_gaps.load(Ordering::SeqCst) >= 1_000_000,
        "the gap was seen for what it is: {stats:?}"
    );
    assert!(
        stats.full_reads.load(Ordering::SeqCst) > reads_before,
        "closed by a full read: {stats:?}"
    );
    assert_eq!(stats.republished.load(Ordering::SeqCst), 0, "{stats:?}");
    let quantities: u64 = rig
        .events()
        .iter()
        .map(|e| e["data"]["quantity"].as_u64().expect("quantity"))
        .sum();
    assert_eq!(quantities, 9, "every part counted once");
    relay.task.abort();
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_past_year_9999_is_clamped_and_marked_and_the_source_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Good", 100u32);
    mes.set("Line1.Scrap", 7u16);
    let relay_addr = std::net::SocketAddr::from(([127, 0, 0, 4], mes.addr.port()));
    let relay = LossyRelay::start(relay_addr, mes.addr).await;
    relay.far_future.store(true, Ordering::SeqCst);
    let mut through_relay = connection(&mes, &dir.path().join("pki"));
    through_relay.endpoint = format!("opc.tcp://{relay_addr}/");
    let rig = start(
        dir.path(),
        config(
            through_relay,
            vec![
                counter(&mes, "good", EventType::completion(), "Line1.Good"),
                counter(&mes, "scrap", EventType::scrap(), "Line1.Scrap"),
            ],
            vec![],
        ),
    );
    rig.counted("good", 100).await;
    rig.counted("scrap", 7).await;
    // The device's clock says year 12000; on the wire it arrives as a
    // date in year 30828.
    mes.set_at(
        "Line1.Good",
        104u32,
        ::opcua::types::DateTime::ymd_hms(12000, 1, 1, 0, 0, 0),
    );
    rig.counted("good", 104).await;
    // The source task lives on.
    mes.set("Line1.Scrap", 9u16);
    rig.counted("scrap", 9).await;
    let events = rig.events();
    assert_eq!(events.len(), 2);
    let good = of_type(&events, "production.completion");
    assert_eq!(good[0]["time"], "9999-12-31T23:59:59.999Z");
    assert_eq!(good[0]["data"]["attributes"]["time_source"], "clamped");
    assert_eq!(
        of_type(&events, "production.scrap")[0]["data"]["attributes"]["time_source"],
        "source"
    );
    relay.task.abort();
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_journal_is_dead_lettered_alone_and_the_rest_flows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Good", 100u32);
    let rig = start(
        dir.path(),
        config(
            connection(&mes, &dir.path().join("pki")),
            vec![counter(&mes, "good", EventType::completion(), "Line1.Good")],
            vec![json_record(&mes, true)],
        ),
    );
    rig.counted("good", 100).await;
    // A 40,000-character lot: a legal OPC UA string, too big for an event.
    let huge = format!(
        r#"{{"seq":1,"order":"WO-1","material":"M-100","qty":1,"lot":"{}"}}"#,
        "L".repeat(40_000)
    );
    mes.set("Line1.Record", huge);
    mes.set("Line1.Good", 103u32);
    rig.until("the big record dead-lettered", |_, _| {
        rig.journal.dead_letters().expect("dead letters").len() == 1
    })
    .await;
    rig.counted("good", 103).await;
    mes.set("Line1.Record", record_json(2, "WO-2", 2.0));
    mes.wait_acks("ack of the next record", Duration::from_secs(10), |a| {
        !a.written.is_empty()
    })
    .await;
    let dead = rig.journal.dead_letters().expect("dead letters");
    assert!(
        dead[0].reason.contains("more than the 16384"),
        "{}",
        dead[0].reason
    );
    assert_eq!(
        mes.acks().written,
        vec![opcua_types_u32(2)],
        "the oversized record is not acknowledged; the next one is"
    );
    let events = rig.events();
    assert_eq!(events.len(), 2, "the counter step and the next record");
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_the_record_stored_last_is_not_posted_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Record", record_json(1, "WO-1", 10.0));
    // A cursor as the previous version wrote it: record 1 stored (by its
    // key id), no handshake position yet.
    {
        let mut jc = JournalConfig::new(dir.path().join("journal"));
        jc.sinks = vec!["erp".into()];
        let journal = Journal::open(jc).expect("journal");
        let urn = buffer::event::source_urn("site1", "gw1", SOURCE);
        let id = buffer::id::record_event_id(&urn, "completion", &["1"]);
        let cursor = format!(
            r#"{{"counters":{{}},"records":{{"completion":{{"id":"{id}","sequence":1}}}}}}"#
        );
        journal
            .append_blocking(buffer::AppendRequest {
                source: SOURCE.into(),
                events: vec![],
                cursor: Some(cursor.into_bytes()),
            })
            .expect("append")
            .expect("fits");
        journal.close().expect("close");
    }
    let rig = start(
        dir.path(),
        config(
            connection(&mes, &dir.path().join("pki")),
            vec![],
            vec![json_record(&mes, true)],
        ),
    );
    mes.wait_acks(
        "record 1 acknowledged again",
        Duration::from_secs(10),
        |a| a.written.len() == 1,
    )
    .await;
    assert!(
        rig.events().is_empty(),
        "record 1 is not stored a second time"
    );
    mes.set("Line1.Record", record_json(2, "WO-2", 20.0));
    mes.wait_acks("record 2", Duration::from_secs(10), |a| {
        a.written.len() == 2
    })
    .await;
    assert_eq!(rig.events().len(), 1, "the next record is new");
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_interval_zero_delivers_every_change_of_a_record_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    let mut cfg = config(
        connection(&mes, &dir.path().join("pki")),
        vec![],
        vec![json_record(&mes, false)],
    );
    cfg.acquisition = Acquisition::Subscription {
        publishing_interval: Duration::from_millis(50),
        sampling_interval: Sampling::Every(Duration::ZERO),
        queue_size: 100,
        keep_alive_count: 10,
        lifetime_count: 60,
    };
    let rig = start(dir.path(), cfg);
    // Subscribed once the node's current value came through.
    rig.until("the first notification", |_, _| {
        rig.stats.notifications.load(Ordering::SeqCst) >= 1
    })
    .await;
    // 30 records back to back, faster than any sampling period.
    for seq in 1..=30u32 {
        mes.set("Line1.Record", record_json(seq, &format!("WO-{seq}"), 1.0));
    }
    rig.until("all 30 records", |_, events| events.len() == 30)
        .await;
    let sequences: Vec<String> = rig
        .events()
        .iter()
        .map(|e| e["sequence"].as_str().expect("sequence").to_owned())
        .collect();
    assert_eq!(
        sequences,
        (1..=30).map(|n| n.to_string()).collect::<Vec<_>>(),
        "every change, in order"
    );
    assert_eq!(rig.stats.records_missed.load(Ordering::Relaxed), 0);
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_serves_several_lines_with_their_own_line_and_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Good", 100u32);
    mes.set("Line1.Scrap", 7u16);
    let place = |line: &str| protocols::source::Placement {
        line: Some(line.into()),
        machine: Some(format!("filler-{line}")),
        ..Default::default()
    };
    let rig = start(
        dir.path(),
        config(
            connection(&mes, &dir.path().join("pki")),
            vec![
                NodeCounter {
                    place: place("L7"),
                    ..counter(&mes, "good", EventType::completion(), "Line1.Good")
                },
                NodeCounter {
                    place: place("L8"),
                    ..counter(&mes, "scrap", EventType::scrap(), "Line1.Scrap")
                },
            ],
            vec![],
        ),
    );
    rig.counted("good", 100).await;
    rig.counted("scrap", 7).await;
    mes.set("Line1.Good", 102u32);
    mes.set("Line1.Scrap", 8u16);
    rig.counted("good", 102).await;
    rig.counted("scrap", 8).await;
    let mut lines: Vec<(String, String, String)> = rig
        .events()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().expect("type").to_owned(),
                e["data"]["line"].as_str().expect("line").to_owned(),
                e["data"]["machine"].as_str().expect("machine").to_owned(),
            )
        })
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            (
                "production.completion".into(),
                "L7".into(),
                "filler-L7".into()
            ),
            ("production.scrap".into(), "L8".into(), "filler-L8".into()),
        ]
    );
    assert_eq!(rig.stats.connects.load(Ordering::SeqCst), 1, "one session");
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_shared_with_other_records_does_not_report_missed_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    // The MES numbers completions and scrap in one sequence: this node
    // sees every other number.
    let run = |shared: bool| {
        let dir = dir.path().join(if shared { "shared" } else { "own" });
        let record = NodeRecord {
            sequence_shared: shared,
            ..json_record(&mes, false)
        };
        let cfg = config(connection(&mes, &dir.join("pki")), vec![], vec![record]);
        let mes = &mes;
        async move {
            std::fs::create_dir_all(&dir).expect("dir");
            let rig = start(&dir, cfg);
            rig.until("connected", |_, _| {
                rig.stats.connected.load(Ordering::SeqCst)
            })
            .await;
            for seq in [1u32, 3, 5] {
                mes.set("Line1.Record", record_json(seq, &format!("WO-{seq}"), 1.0));
                rig.until("stored", |c, _| {
                    c["records"]["completion"]["sequence"].as_u64() == Some(u64::from(seq))
                })
                .await;
            }
            let missed = rig.stats.records_missed.load(Ordering::Relaxed);
            assert_eq!(rig.events().len(), 3);
            rig.stop().await;
            missed
        }
    };
    assert_eq!(run(true).await, 0, "shared numbering: jumps are expected");
    assert_eq!(run(false).await, 2, "own numbering: 2 and 4 were missed");
    mes.stop().await;
}

/// Established TCP connections this process's server side holds on `port`
/// (from /proc/net/tcp: local port, state 01).
fn established_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3
                && fields[1].rsplit(':').next() == Some(&format!("{port:04X}"))
                && fields[3] == "01"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_naming_one_server_and_identity_share_one_session() {
    let (dir, other) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mes = Mes::start(&options(dir.path())).await;
    mes.set("Line1.Good", 100u32);
    mes.set("Line1.Scrap", 7u16);
    let pki = dir.path().join("pki");
    let line1 = start(
        dir.path(),
        config(
            connection(&mes, &pki),
            vec![counter(&mes, "good", EventType::completion(), "Line1.Good")],
            vec![],
        ),
    );
    let line2 = start(
        other.path(),
        config(
            connection(&mes, &pki),
            vec![counter(&mes, "scrap", EventType::scrap(), "Line1.Scrap")],
            vec![],
        ),
    );
    line1.counted("good", 100).await;
    line2.counted("scrap", 7).await;
    mes.set("Line1.Good", 103u32);
    mes.set("Line1.Scrap", 9u16);
    line1.counted("good", 103).await;
    line2.counted("scrap", 9).await;
    let port = mes
        .endpoint()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("port");
    assert_eq!(
        established_on(port),
        1,
        "two sources, one server and identity: one connection"
    );
    // One line stops; the other keeps its subscription on the session.
    line1.stop().await;
    mes.set("Line1.Scrap", 12u16);
    line2.counted("scrap", 12).await;
    assert_eq!(
        line2.stats.connects.load(Ordering::SeqCst),
        1,
        "the session stayed up"
    );
    let scrap: u64 = line2
        .events()
        .iter()
        .map(|e| e["data"]["quantity"].as_u64().expect("quantity"))
        .sum();
    assert_eq!(scrap, 5, "2 + 3 parts, each once");
    line2.stop().await;
    mes.stop().await;
}

fn ring(mes: &Mes) -> protocols::sources::opcua::NodeRing {
    protocols::sources::opcua::NodeRing {
        signal: "completions".into(),
        event_type: EventType::completion(),
        array: mes.node("Line1.Ring").parse().expect("node id"),
        write_index: mes.node("Line1.RingWrite").parse().expect("node id"),
        read_index: mes.node("Line1.RingRead").parse().expect("node id"),
        slots: u32::from(plant_edge_tests::mes::RING_SLOTS),
        fields: json_fields(),
        unit: "EA".into(),
        type_from: None,
        place: Default::default(),
    }
}

fn ring_config(mes: &Mes, pki: &Path) -> OpcUaConfig {
    let mut config = config(connection(mes, pki), vec![], vec![]);
    config.rings = vec![ring(mes)];
    config
}

async fn ring_released_up_to(mes: &Mes, index: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while mes.ring_read_index() != index {
        assert!(
            tokio::time::Instant::now() < deadline,
            "read index {} never reached {index}",
            mes.ring_read_index()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn sequences_of(rig: &Rig) -> Vec<u64> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mes_ring_buffer_is_taken_in_order_once_and_released_only_when_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    let rig = start(dir.path(), ring_config(&mes, &dir.path().join("pki")));
    // 100 records into 16 slots: the MES waits for the read index.
    let records: Vec<String> = (1..=100).map(|seq| record_json(seq, "WO-7", 1.0)).collect();
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sent < records.len() {
        sent += mes.ring_push(&records[sent..], true);
        // Released only what is durable.
        let released = mes.ring_read_index() as usize;
        assert!(
            rig.events().len() >= released,
            "read index {released} ahead of the journal"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ring stalled at {sent}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ring_released_up_to(&mes, 100).await;
    assert_eq!(
        sequences_of(&rig),
        (1..=100).collect::<Vec<_>>(),
        "each record once, in order"
    );
    let ids: std::collections::BTreeSet<String> = rig
        .events()
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 100);
    assert_eq!(rig.stats.ring_records.load(Ordering::SeqCst), 100);
    assert_eq!(rig.stats.records_overwritten.load(Ordering::SeqCst), 0);
    // A restart reads the ring again and takes nothing twice.
    let journal = rig.stop().await;
    drop(journal);
    let rig = start(dir.path(), ring_config(&mes, &dir.path().join("pki")));
    mes.ring_push(&[record_json(101, "WO-7", 1.0)], true);
    ring_released_up_to(&mes, 101).await;
    assert_eq!(sequences_of(&rig), (1..=101).collect::<Vec<_>>());
    rig.stop().await;
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapped_mes_ring_is_counted_and_a_malformed_element_is_a_dead_letter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&options(dir.path())).await;
    // 40 records into 16 slots before the agent looks (an MES that does
    // not wait): 24 overwritten; record 30 is not JSON.
    let records: Vec<String> = (1..=40)
        .map(|seq| {
            if seq == 30 {
                "not json".to_owned()
            } else {
                record_json(seq, "WO-8", 2.0)
            }
        })
        .collect();
    assert_eq!(mes.ring_push(&records, false), 40);
    let rig = start(dir.path(), ring_config(&mes, &dir.path().join("pki")));
    ring_released_up_to(&mes, 40).await;
    assert_eq!(rig.stats.records_overwritten.load(Ordering::SeqCst), 24);
    let expected: Vec<u64> = (25..=40).filter(|s| *s != 30).collect();
    assert_eq!(sequences_of(&rig), expected);
    let dead = rig.journal.dead_letters().expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        format!("{:?}", dead[0]).contains("not JSON"),
        "{:?}",
        dead[0]
    );
    rig.stop().await;
    mes.stop().await;
}
