//! Drain of a 1,000,000-event journal backlog into a local Mosquitto at
//! QoS 1 and QoS 2 through the MQTT sink, with CPU% and peak RSS of this
//! process while draining, against a bare rumqttc publisher that sends the
//! same messages (payload, topic, MQTT 5 properties) without any journal,
//! from a pool made beforehand: the ratio is the cost of durability and of
//! working out topic and properties from each event.
//!
//! Run: `cargo bench -p plant-edge-tests --bench mqtt_drain`
//! (`PLANT_EDGE_BENCH_EVENTS` overrides the count; `PLANT_EDGE_BENCH_CACHE`
//! sets the journal's cache in MiB, default the journal's own.)

use std::time::{Duration, Instant};

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
use plant_edge_tests::drive;
use plant_edge_tests::measure::{cpu_seconds, peak_rss_mib};
use plant_edge_tests::mosquitto::{Broker, BrokerOptions};
use protocols::sinks::mqtt::{MqttSink, MqttSinkConfig, MqttVersion};
use protocols::Sink;

const SINK: &str = "cloud";

fn events() -> u64 {
    std::env::var("PLANT_EDGE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn payload(n: u64) -> Vec<u8> {
    plant_edge_tests::measure::realistic_event(n % 20, n)
}

fn open(dir: &std::path::Path) -> Journal {
    let mut config = JournalConfig::new(dir.join("journal"));
    config.sinks = vec![SINK.into()];
    config.max_bytes = 4 << 30;
    if let Some(mib) = std::env::var("PLANT_EDGE_BENCH_CACHE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        config.cache_bytes = mib << 20;
    }
    Journal::open(config).expect("journal")
}

fn fill(dir: &std::path::Path, total: u64) {
    let journal = open(dir);
    let routes = journal.routes_all();
    let mut n = 0;
    while n < total {
        let events = (n..(n + 1024).min(total))
            .map(|i| NewEvent {
                id: uuid::Uuid::from_u128(i as u128 + 1),
                class: EventClass::Business,
                routes,
                payload: payload(i),
                ledger: None,
            })
            .collect();
        journal
            .append_blocking(AppendRequest {
                source: "press".into(),
                events,
                cursor: None,
            })
            .expect("append")
            .expect("fits");
        n += 1024;
    }
    journal.close().expect("close");
}

fn sink_config(port: u16, qos: u8) -> MqttSinkConfig {
    MqttSinkConfig {
        host: "127.0.0.1".into(),
        port,
        version: MqttVersion::V5,
        qos,
        client_id: format!("bench-{qos}"),
        keep_alive: Duration::from_secs(30),
        clean_session: true,
        session_expiry: Duration::from_secs(60),
        username: None,
        password: None,
        tls: None,
        topic: "plants/{site}/{line}/{type}".into(),
        status_topic: "plants/p/g/status".into(),
        inflight: 100,
        max_messages_per_second: None,
        ack_timeout: Duration::from_secs(30),
        site: "p".into(),
        gateway: "g".into(),
        payload: None,
    }
}

async fn drain(port: u16, qos: u8, total: u64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("exe");
    let status = std::process::Command::new(exe)
        .env("PLANT_EDGE_BENCH_FILL", dir.path())
        .status()
        .expect("fill child");
    assert!(status.success(), "fill failed");
    let journal = open(dir.path());
    let mut sink = MqttSink::start(sink_config(port, qos)).expect("sink");
    let (cpu0, started) = (cpu_seconds(), Instant::now());
    let drained = drive::until(&journal, SINK, &mut sink, Duration::from_secs(1800), |j| {
        j.backlog(SINK).expect("backlog") == 0
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    sink.close().await;
    assert!(drained, "backlog not drained");
    let rate = total as f64 / secs;
    println!(
        "plant-edge MQTT sink, QoS {qos}: {total} events in {secs:.1} s = {rate:.0} events/s; CPU {:.0}% of one core; peak RSS {:.1} MiB",
        cpu / secs * 100.0,
        peak_rss_mib()
    );
    rate
}

/// What the sink sends for `payload(n)`, made up front for the bare
/// publisher: topic and properties as the sink's template and envelope
/// give them (the id is a placeholder of the same length).
fn bare_message(
    n: u64,
) -> (
    String,
    bytes::Bytes,
    rumqttc::v5::mqttbytes::v5::PublishProperties,
) {
    let line = n % 20;
    let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/cloudevents+json".into()),
        user_properties: vec![
            ("ce_id".into(), uuid::Uuid::from_u128(n as u128).to_string()),
            ("ce_type".into(), "production.completion".into()),
            (
                "ce_source".into(),
                buffer::event::source_urn(
                    "plant-hamburg",
                    "gw-hall-3",
                    &format!("press-{line:02}"),
                ),
            ),
        ],
        ..Default::default()
    };
    (
        format!("plants/plant-hamburg/L{line}/production.completion"),
        payload(n).into(),
        properties,
    )
}

async fn bare_rumqttc(port: u16, total: u64) -> f64 {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let pool: Vec<_> = (0..1000).map(bare_message).collect();
    let mut options = MqttOptions::new("bench-bare", "127.0.0.1", port);
    options
        .set_outgoing_inflight_upper_limit(100)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut event_loop) = AsyncClient::new(options, 200);
    let (cpu0, started) = (cpu_seconds(), Instant::now());
    let publisher = tokio::spawn(async move {
        for n in 0..total {
            let (topic, payload, properties) = &pool[(n % 1000) as usize];
            client
                .publish_with_properties(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                    properties.clone(),
                )
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    while acked < total {
        if let Event::Incoming(Packet::PubAck(_)) = event_loop.poll().await.expect("poll") {
            acked += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    drop(publisher.await);
    let rate = total as f64 / secs;
    println!(
        "bare rumqttc publisher (no journal), QoS 1: {total} messages in {secs:.1} s = {rate:.0} messages/s; CPU {:.0}% of one core",
        cpu / secs * 100.0
    );
    rate
}

fn main() {
    if let Some(dir) = std::env::var_os("PLANT_EDGE_BENCH_FILL") {
        fill(std::path::Path::new(&dir), events());
        return;
    }
    let total = events();
    let broker = Broker::start(BrokerOptions {
        quiet: true,
        ..BrokerOptions::default()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let bare = bare_rumqttc(broker.port, total).await;
        let qos1 = drain(broker.port, 1, total).await;
        let qos2 = drain(broker.port, 2, total).await;
        println!(
            "ratio plant-edge QoS 1 / bare rumqttc: {:.2}; QoS 2 / QoS 1: {:.2}",
            qos1 / bare,
            qos2 / qos1
        );
    });
}
