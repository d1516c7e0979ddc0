//! The MQTT sink against a real Mosquitto broker.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use buffer::event::{CounterReading, EventData, Origin, Quantity};
use buffer::{AppendRequest, CloudEvent, EventClass, EventType, Journal, JournalConfig, NewEvent};
use plant_edge_tests::drive;
use plant_edge_tests::mosquitto::{subscribe_all, Broker, BrokerOptions, Received};
use protocols::sinks::mqtt::{MqttSink, MqttSinkConfig, MqttVersion};
use protocols::tls::TlsSettings;
use protocols::{Sink, Verdict};

const SINK: &str = "cloud";

fn config(port: u16, version: MqttVersion, qos: u8) -> MqttSinkConfig {
    MqttSinkConfig {
        host: "127.0.0.1".into(),
        port,
        version,
        qos,
        client_id: format!("plant-edge-test-{}", fastrand::u32(..)),
        keep_alive: Duration::from_secs(10),
        clean_session: true,
        session_expiry: Duration::from_secs(600),
        username: None,
        password: None,
        tls: None,
        topic: "plants/{site}/{line}/{type}".into(),
        status_topic: "plants/site1/gw1/status".into(),
        inflight: 100,
        max_messages_per_second: None,
        ack_timeout: Duration::from_secs(10),
        site: "site1".into(),
        gateway: "gw1".into(),
        payload: None,
    }
}

fn event(n: u64, line: &str) -> CloudEvent {
    let source = buffer::event::source_urn("site1", "gw1", "press1");
    CloudEvent::new(
        buffer::id::counter_event_id(&source, "good", 0, n),
        source,
        EventType::completion(),
        std::time::SystemTime::now(),
        EventData {
            site: "site1".into(),
            line: line.into(),
            machine: "press1".into(),
            work_order: None,
            material: None,
            quantity: Quantity::Count(1),
            unit: "EA".into(),
            lot: None,
            reason_code: None,
            counter: Some(CounterReading {
                value: n,
                previous: n.saturating_sub(1),
                epoch: 0,
            }),
            origin: Origin {
                protocol: "test".into(),
                endpoint: "-".into(),
                address: "-".into(),
                quality: "good".into(),
                source_time: None,
            },
            attributes: Default::default(),
            checkpoint: None,
        },
    )
}

fn journal_with(dir: &std::path::Path, events: impl IntoIterator<Item = CloudEvent>) -> Journal {
    let mut config = JournalConfig::new(dir.join("journal"));
    config.sinks = vec![SINK.into()];
    let journal = Journal::open(config).expect("journal");
    let routes = journal.routes_all();
    let events: Vec<NewEvent> = events
        .into_iter()
        .map(|e| NewEvent::from_cloud_event(&e, EventClass::Business, routes))
        .collect();
    for chunk in events.chunks(1000) {
        journal
            .append_blocking(AppendRequest {
                source: "press1".into(),
                events: chunk.to_vec(),
                cursor: None,
            })
            .expect("append")
            .expect("fits");
    }
    journal
}

fn delivered_all(journal: &Journal) -> bool {
    journal.backlog(SINK).expect("backlog") == 0
}

/// Event messages (not status) as (id, n), in arrival order.
fn events_received(received: &[Received]) -> Vec<(String, u64)> {
    received
        .iter()
        .filter(|r| r.topic.starts_with("plants/site1/L"))
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("CloudEvent JSON");
            (
                v["id"].as_str().expect("id").to_owned(),
                v["data"]["counter"]["value"].as_u64().expect("n"),
            )
        })
        .collect()
}

async fn wait_for_count(
    received: &std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    distinct: usize,
    limit: Duration,
) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let ids: HashSet<String> = events_received(&received.lock().expect("lock"))
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if ids.len() >= distinct || std::time::Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_arrive_exactly_once_in_order_with_cloudevent_properties() {
    let broker = Broker::start(BrokerOptions::default());
    let received = subscribe_all(broker.port, "test-subscriber");
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = journal_with(dir.path(), (0..10_000).map(|n| event(n, "L1")));
    let mut sink = MqttSink::start(config(broker.port, MqttVersion::V5, 1)).expect("sink");
    assert!(
        drive::until(
            &journal,
            SINK,
            &mut sink,
            Duration::from_secs(120),
            delivered_all
        )
        .await,
        "journal not drained"
    );
    wait_for_count(&received, 10_000, Duration::from_secs(20)).await;
    sink.close().await;
    // The offline status is published on close; it reaches the subscriber
    // a moment later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !received.lock().expect("lock").iter().any(|r| {
        r.topic == "plants/site1/gw1/status"
            && String::from_utf8_lossy(&r.payload).contains("\"offline\"")
    }) && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = received.lock().expect("lock").clone();
    let got = events_received(&received);
    assert_eq!(
        got.len(),
        10_000,
        "exactly once: no loss and no duplicate without faults"
    );
    assert_eq!(
        got.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        (0..10_000).collect::<Vec<_>>(),
        "in order"
    );
    let first = received
        .iter()
        .find(|r| r.topic == "plants/site1/L1/production.completion")
        .expect("event topic from the template");
    assert_eq!(
        first.content_type.as_deref(),
        Some("application/cloudevents+json")
    );
    let props: HashMap<_, _> = first.user_properties.iter().cloned().collect();
    assert_eq!(
        props.get("ce_type").map(String::as_str),
        Some("production.completion")
    );
    assert_eq!(
        props.get("ce_id").map(String::as_str),
        Some(got[0].0.as_str()),
        "id in user properties"
    );
    let status: Vec<&Received> = received
        .iter()
        .filter(|r| r.topic == "plants/site1/gw1/status")
        .collect();
    assert!(
        status
            .iter()
            .any(|s| String::from_utf8_lossy(&s.payload).contains("\"online\"")),
        "birth message"
    );
    assert!(
        status
            .last()
            .is_some_and(|s| String::from_utf8_lossy(&s.payload).contains("\"offline\"")),
        "offline on close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_over_mqtt_311_delivers_every_event() {
    let broker = Broker::start(BrokerOptions::default());
    let received = subscribe_all(broker.port, "test-subscriber-311");
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = journal_with(dir.path(), (0..2_000).map(|n| event(n, "L2")));
    let mut sink = MqttSink::start(config(broker.port, MqttVersion::V311, 2)).expect("sink");
    assert!(
        drive::until(
            &journal,
            SINK,
            &mut sink,
            Duration::from_secs(60),
            delivered_all
        )
        .await
    );
    wait_for_count(&received, 2_000, Duration::from_secs(20)).await;
    sink.close().await;
    let got = events_received(&received.lock().expect("lock"));
    let ids: HashSet<&String> = got.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 2_000);
    assert_eq!(got.len(), 2_000, "QoS 2 without faults: no duplicate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_mid_stream_lose_nothing_and_duplicates_keep_their_id() {
    let mut broker = Broker::start(BrokerOptions::default());
    let received = subscribe_all(broker.port, "test-subscriber-restarts");
    let dir = tempfile::tempdir().expect("tempdir");
    let total = 6_000;
    let journal = journal_with(dir.path(), (0..total).map(|n| event(n, "L3")));
    let mut cfg = config(broker.port, MqttVersion::V5, 1);
    cfg.max_messages_per_second = Some(3_000);
    let mut sink = MqttSink::start(cfg).expect("sink");
    let j = journal.clone();
    let restarts = std::thread::spawn(move || {
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(500));
            assert!(
                j.backlog(SINK).expect("backlog") > 0,
                "restart must happen mid-stream"
            );
            broker.restart();
        }
        broker
    });
    assert!(
        drive::until(
            &journal,
            SINK,
            &mut sink,
            Duration::from_secs(120),
            delivered_all
        )
        .await,
        "drained despite restarts"
    );
    let _broker = restarts.join().expect("restarts");
    wait_for_count(&received, total as usize, Duration::from_secs(30)).await;
    sink.close().await;
    let got = events_received(&received.lock().expect("lock"));
    let mut by_id: HashMap<String, u64> = HashMap::new();
    for (id, n) in &got {
        if let Some(previous) = by_id.insert(id.clone(), *n) {
            assert_eq!(
                previous, *n,
                "a duplicate carries the same id for the same fact"
            );
        }
    }
    let missing: Vec<u64> = (0..total)
        .filter(|n| !by_id.values().any(|v| v == n))
        .take(10)
        .collect();
    assert_eq!(
        by_id.len() as u64,
        total,
        "nothing lost (first missing: {missing:?})"
    );
    eprintln!(
        "{} messages for {total} events across 3 broker restarts",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_denied_topic_is_dead_lettered_with_the_reason_and_the_rest_flow() {
    let acl = "topic readwrite plants/site1/L1/#\ntopic readwrite plants/site1/gw1/status\ntopic read #\n";
    let broker = Broker::start(BrokerOptions {
        acl: Some(acl.into()),
        ..BrokerOptions::default()
    });
    let received = subscribe_all(broker.port, "test-subscriber-acl");
    let dir = tempfile::tempdir().expect("tempdir");
    let events = (0..30).map(|n| event(n, if n % 10 == 5 { "SECRET" } else { "L1" }));
    let journal = journal_with(dir.path(), events);
    let mut sink = MqttSink::start(config(broker.port, MqttVersion::V5, 1)).expect("sink");
    assert!(
        drive::until(
            &journal,
            SINK,
            &mut sink,
            Duration::from_secs(30),
            delivered_all
        )
        .await
    );
    wait_for_count(&received, 27, Duration::from_secs(10)).await;
    sink.close().await;
    let dead = journal.dead_letters().expect("dead letters");
    assert_eq!(
        dead.len(),
        3,
        "the three events for the denied topic: {dead:?}"
    );
    assert!(
        dead.iter()
            .all(|d| d.reason.contains("NotAuthorized") && d.sink == SINK),
        "{dead:?}"
    );
    // Mosquitto 2.0 closes the connection after a refused publish, so some
    // events are sent twice (same id); each must arrive at least once.
    let ids: HashSet<String> = events_received(&received.lock().expect("lock"))
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids.len(), 27, "the rest were delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_refuses_every_event_topic_holds_them_all_and_dead_letters_none() {
    // The topic template points where this client may not write: every
    // event is refused, only the status topic is allowed.
    let acl = "topic readwrite plants/site1/gw1/status\ntopic read #\n";
    let broker = Broker::start(BrokerOptions {
        acl: Some(acl.into()),
        ..BrokerOptions::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = journal_with(dir.path(), (0..20).map(|n| event(n, "L1")));
    let mut sink = MqttSink::start(config(broker.port, MqttVersion::V5, 1)).expect("sink");
    let mut held = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while held < 3 && std::time::Instant::now() < deadline {
        let batch = journal.read_batch(SINK, 256).expect("read");
        let verdicts = sink.deliver(&batch).await;
        journal.rewind(SINK).expect("rewind");
        assert!(
            verdicts
                .iter()
                .all(|v| !matches!(v, Verdict::Rejected { .. } | Verdict::Delivered)),
            "{verdicts:?}"
        );
        if let Some(Verdict::Hold { reason }) = verdicts.first() {
            assert!(reason.contains("NotAuthorized"), "{reason}");
            held += 1;
        }
    }
    sink.close().await;
    assert!(
        held >= 3,
        "the refusal holds the sink, attempt after attempt"
    );
    assert!(
        journal.dead_letters().expect("dead").is_empty(),
        "nothing dead-lettered"
    );
    assert_eq!(
        journal.backlog(SINK).expect("backlog"),
        20,
        "the backlog is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_delivers_and_a_wrong_ca_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = plant_edge_tests::pki::generate(dir.path(), "plant");
    let other = plant_edge_tests::pki::generate(dir.path(), "stranger");
    let broker = Broker::start(BrokerOptions {
        quiet: false,
        acl: None,
        tls: Some((
            pki.ca.clone(),
            pki.server_cert.clone(),
            pki.server_key.clone(),
        )),
    });
    let journal = journal_with(dir.path(), (0..50).map(|n| event(n, "L1")));
    let mut cfg = config(broker.port, MqttVersion::V5, 1);
    cfg.host = "localhost".into();
    cfg.tls = Some(TlsSettings {
        ca_file: Some(pki.ca.clone()),
        client_cert: Some(pki.client_cert.clone()),
        client_key: Some(pki.client_key.clone()),
        alpn: Vec::new(),
    });
    let mut sink = MqttSink::start(cfg.clone()).expect("sink");
    assert!(
        drive::until(
            &journal,
            SINK,
            &mut sink,
            Duration::from_secs(30),
            delivered_all
        )
        .await,
        "delivered over mutual TLS"
    );
    sink.close().await;

    cfg.tls = Some(TlsSettings {
        ca_file: Some(other.ca.clone()),
        ..cfg.tls.clone().expect("tls")
    });
    let mut wrong = MqttSink::start(cfg).expect("sink");
    let probe = journal_with(&dir.path().join("probe"), [event(999, "L1")]);
    let batch = probe.read_batch(SINK, 1).expect("read");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let verdicts = loop {
        let verdicts = wrong.deliver(&batch).await;
        let waiting = matches!(&verdicts[0], Verdict::Retry { reason, .. } if reason.contains("not connected to the broker yet"));
        if !waiting || std::time::Instant::now() > deadline {
            break verdicts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wrong.close().await;
    match &verdicts[0] {
        Verdict::Retry { reason, .. } => assert!(
            reason.contains("certificate") && reason.contains("ca_file"),
            "unclear error: {reason}"
        ),
        other => panic!("a wrong CA must fail the connection, got {other:?}"),
    }
}

/// A minimal MQTT 5 broker (rumqttc's packet codec over a real TCP
/// socket) that answers one chosen publish with QuotaExceeded, the first
/// time it sees it, and records what it accepted, in order. Mosquitto
/// never answers QuotaExceeded on its own.
async fn quota_broker(refuse_payload_n: u64) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<u64>>>) {
    use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, PubAckReason,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = accepted.clone();
    tokio::spawn(async move {
        let mut refused_once = false;
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buffer = bytes::BytesMut::new();
            loop {
                let packet = match Packet::read(&mut buffer, None) {
                    Ok(packet) => packet,
                    Err(_) => {
                        let mut chunk = [0u8; 4096];
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    }
                };
                let reply = match packet {
                    Packet::Connect(..) => Some(Packet::ConnAck(ConnAck {
                        session_present: false,
                        code: ConnectReturnCode::Success,
                        properties: None,
                    })),
                    Packet::PingReq(_) => Some(Packet::PingResp(PingResp)),
                    Packet::Publish(publish) => {
                        let n = serde_json::from_slice::<serde_json::Value>(&publish.payload)
                            .ok()
                            .and_then(|v| v["data"]["counter"]["value"].as_u64());
                        let mut ack = PubAck::new(publish.pkid, None);
                        match n {
                            Some(n) if n == refuse_payload_n && !refused_once => {
                                refused_once = true;
                                ack.reason = PubAckReason::QuotaExceeded;
                            }
                            Some(n) => log.lock().expect("log").push(n),
                            None => {}
                        }
                        Some(Packet::PubAck(ack))
                    }
                    Packet::Disconnect(_) => break,
                    _ => None,
                };
                if let Some(reply) = reply {
                    let mut out = bytes::BytesMut::new();
                    if reply.write(&mut out, None).is_err() || socket.write_all(&out).await.is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    (port, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_repeat_is_not_overtaken_by_the_events_after_it() {
    let (port, accepted) = quota_broker(3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = journal_with(dir.path(), (0..20).map(|n| event(n, "L1")));
    let mut cfg = config(port, MqttVersion::V5, 1);
    // Strict order: one publish in flight (see the README).
    cfg.inflight = 1;
    let mut sink = MqttSink::start(cfg).expect("sink");
    assert!(
        drive::until(
            &journal,
            SINK,
            &mut sink,
            Duration::from_secs(30),
            delivered_all
        )
        .await
    );
    sink.close().await;
    let order = accepted.lock().expect("log").clone();
    assert_eq!(
        order,
        (0..20).collect::<Vec<u64>>(),
        "the broker took every event once, in journal order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_template_shapes_each_message_and_an_event_it_cannot_render_is_a_dead_letter() {
    let broker = Broker::start(BrokerOptions::default());
    let received = subscribe_all(broker.port, "test-subscriber-template");
    let dir = tempfile::tempdir().expect("tempdir");
    let events: Vec<CloudEvent> = (0..20)
        .map(|n| {
            let mut e = event(n, "L1");
            e.data.work_order = (n != 7).then(|| format!("WO-{n}"));
            e
        })
        .collect();
    let missing = events[7].id.to_string();
    let journal = journal_with(dir.path(), events);
    let template: protocols::render::PayloadConfig = toml::from_str(
        r#"
content_type = "application/json"
time_zone = "Europe/Berlin"
template = '{"order": {{ work_order }}, "qty": {{ quantity | decimal(1) }}, "day": {{ time | local_date }}, "ref": {{ id }}}'
"#,
    )
    .expect("toml");
    let mut cfg = config(broker.port, MqttVersion::V5, 1);
    cfg.payload = Some(
        template
            .check(std::path::Path::new("."))
            .expect("renders the sample"),
    );
    let mut sink = MqttSink::start(cfg).expect("sink");
    assert!(
        drive::until(
            &journal,
            SINK,
            &mut sink,
            Duration::from_secs(60),
            delivered_all
        )
        .await
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let messages = loop {
        let messages: Vec<Received> = received
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.topic.starts_with("plants/site1/L"))
            .cloned()
            .collect();
        if messages.len() >= 19 || std::time::Instant::now() > deadline {
            break messages;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sink.close().await;
    assert_eq!(
        messages.len(),
        19,
        "every event that renders, once; topics seen: {:?}",
        received
            .lock()
            .expect("lock")
            .iter()
            .map(|r| r.topic.clone())
            .collect::<Vec<_>>()
    );
    for m in &messages {
        let body: serde_json::Value =
            serde_json::from_slice(&m.payload).expect("the template's JSON");
        assert!(
            body["order"].is_string() && body["qty"].is_string(),
            "{body}"
        );
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_ne!(body["ref"], missing.as_str());
    }
    let letters = journal.dead_letters().expect("dead letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id.to_string(), missing);
    assert!(
        letters[0].reason.contains("payload.template") && letters[0].reason.contains("undefined"),
        "{}",
        letters[0].reason
    );
}
