//! Templated ERP delivery against CloudEvents batches, same run, same
//! backlog: the Oracle Fusion example (a body template looping over 100
//! events, per-record answers matched by key) to a simulated Oracle, and
//! CloudEvents batches of 100 to the simulated CloudEvents endpoint. Both
//! servers run in a separate process; figures are for the draining
//! process. Also the cost per event of rendering and of reading the answer.
//!
//! Run: `cargo bench -p plant-edge-tests --bench erp_templates`
//! (`PLANT_EDGE_BENCH_EVENTS`, default 200,000).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
use plant_edge_tests::drive;
use plant_edge_tests::erp_events::completion;
use plant_edge_tests::measure::cpu_seconds;
use protocols::sinks::https::erp::{ErpProfile, ProfileConfig};
use protocols::sinks::https::{HttpsAuth, HttpsMode, HttpsSink, HttpsSinkConfig};
use protocols::tls::TlsSettings;

const SINK: &str = "erp";
const BATCH: usize = 100;

fn events() -> u64 {
    std::env::var("PLANT_EDGE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// A completion as a plant sends it (material and an attribute set too).
fn event(i: u64) -> buffer::CloudEvent {
    let mut e = completion(
        uuid::Uuid::from_u128(u128::from(i) + 1),
        "1000123",
        i,
        1 + i % 5,
    );
    e.data.material = Some("FG-100".into());
    e.data.attributes = [("work_center".to_owned(), "WC-10".to_owned())].into();
    e
}

/// `first`: the first event number, so that no round posts ids an earlier
/// round booked (the Oracle example looks up after a start until the first
/// event the ERP does not have: ids it has would all be asked for).
fn fill(dir: &Path, first: u64, total: u64) -> Journal {
    let mut config = JournalConfig::new(dir.join("journal"));
    config.sinks = vec![SINK.into()];
    config.max_bytes = 4 << 30;
    let journal = Journal::open(config).expect("journal");
    let routes = journal.routes_all();
    let mut n = first;
    while n < first + total {
        let events = (n..(n + 1024).min(first + total))
            .map(|i| {
                let e = event(i);
                NewEvent {
                    id: e.id,
                    class: EventClass::Business,
                    routes,
                    payload: e.to_json(),
                    ledger: None,
                }
            })
            .collect();
        journal
            .append_blocking(AppendRequest {
                source: "press1".into(),
                events,
                cursor: None,
            })
            .expect("append")
            .expect("fits");
        n += 1024;
    }
    journal
}

fn oracle_profile() -> ErpProfile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/examples/oracle-fusion-operation-transactions.toml");
    let table: toml::Table =
        toml::from_str(&std::fs::read_to_string(path).expect("example")).expect("toml");
    let sink = table["sinks"]["oracle"].clone();
    let config: ProfileConfig = sink.try_into().expect("profile");
    config.check(Path::new("."), true).expect("checks")
}

async fn drain(
    url: &str,
    ca: &Path,
    profile: ErpProfile,
    (first, total): (u64, u64),
    label: &str,
) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = fill(dir.path(), first, total);
    let mut sink = HttpsSink::new(HttpsSinkConfig {
        url: url.into(),
        mode: HttpsMode::Batch {
            max_events: BATCH,
            max_bytes: 1 << 20,
        },
        headers: Vec::new(),
        gzip: false,
        auth: HttpsAuth::Basic {
            user: "bench".into(),
            password: "bench".into(),
        },
        tls: TlsSettings {
            ca_file: Some(ca.to_owned()),
            client_cert: None,
            client_key: None,
            alpn: Vec::new(),
        },
        insecure_skip_verify: false,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
        max_events_per_second: None,
        profile,
    })
    .expect("sink");
    let (cpu0, started) = (cpu_seconds(), Instant::now());
    let drained = drive::until(&journal, SINK, &mut sink, Duration::from_secs(3600), |j| {
        j.backlog(SINK).expect("backlog") == 0
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    assert!(drained, "{label}: not drained");
    assert!(
        journal.dead_letters().expect("dead letters").is_empty(),
        "{label}: refusals"
    );
    let rate = total as f64 / secs;
    println!(
        "{label}: {total} events in {secs:.1} s = {rate:.0} events/s; CPU {:.1} µs per event in the draining process",
        (cpu_seconds() - cpu0) / total as f64 * 1e6,
    );
    rate
}

/// Rendering the Oracle body for a batch of 100 and reading a 100-record
/// answer, in-process: the cost per event of the template and the rules.
fn micro(profile: &ErpProfile) {
    let events: Vec<_> = (0..BATCH as u64)
        .map(|i| buffer::PendingEvent {
            seq: i,
            id: event(i).id,
            source: "press1".into(),
            class: EventClass::Business,
            appended_ms: 0,
            payload: event(i).to_json(),
        })
        .collect();
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        for e in &events {
            std::hint::black_box(protocols::render::event_value(e).expect("value"));
        }
    }
    let parse_us = started.elapsed().as_secs_f64() / (rounds * BATCH) as f64 * 1e6;
    let started = Instant::now();
    let mut body = String::new();
    for _ in 0..rounds {
        let values = events
            .iter()
            .map(protocols::render::event_value)
            .collect::<Result<Vec<_>, _>>()
            .expect("values");
        body = profile
            .templates
            .render(
                protocols::sinks::https::erp::keys::BODY,
                &protocols::render::batch_context(values, &[]),
            )
            .expect("renders");
    }
    let render_us = started.elapsed().as_secs_f64() / (rounds * BATCH) as f64 * 1e6;
    // The answer Oracle gives: the body echoed with a status per record.
    let mut answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    for d in answer["OperationTransactionDetail"]
        .as_array_mut()
        .expect("details")
    {
        d["InterfaceStatusCode"] = "SUCCESS".into();
    }
    let answer = answer.to_string();
    let started = Instant::now();
    let mut booked = 0;
    for _ in 0..rounds {
        let value: serde_json::Value = serde_json::from_str(&answer).expect("json");
        let rules = &profile.answer;
        let items = rules
            .items
            .as_ref()
            .expect("items")
            .find(&value)
            .expect("list");
        let key = rules.item_key.as_ref().expect("key");
        let by_key: std::collections::HashMap<String, &serde_json::Value> = items
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|i| key.text(i).map(|k| (k, i)))
            .collect();
        for e in &events {
            if let Some(item) = by_key.get(&e.id.to_string()) {
                if rules.state.meaning(item) == Some(protocols::sinks::https::erp::Meaning::Booked)
                {
                    booked += 1;
                }
            }
        }
    }
    assert_eq!(booked, rounds * BATCH);
    let rules_us = started.elapsed().as_secs_f64() / (rounds * BATCH) as f64 * 1e6;
    println!(
        "per event, in-process: rendering the Oracle body {render_us:.1} µs (of which reading the event {parse_us:.1} µs); reading its answer (parse + rules) {rules_us:.1} µs; body {} bytes per event",
        body.len() / BATCH
    );
}

fn main() {
    if std::env::var("PLANT_EDGE_BENCH_ROLE").as_deref() == Ok("server") {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let cert = std::env::var_os("PLANT_EDGE_BENCH_CERT").expect("cert");
            let key = std::env::var_os("PLANT_EDGE_BENCH_KEY").expect("key");
            let erp = plant_edge_tests::erp::Erp::start(cert.as_ref(), key.as_ref()).await;
            let apis =
                plant_edge_tests::erp_apis::ErpApis::start(cert.as_ref(), key.as_ref()).await;
            println!("{} {}", erp.url(), apis.base());
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
        return;
    }
    let total = events();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = plant_edge_tests::pki::generate(dir.path(), "bench");
    let mut server = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env("PLANT_EDGE_BENCH_ROLE", "server")
        .env("PLANT_EDGE_BENCH_CERT", &pki.server_cert)
        .env("PLANT_EDGE_BENCH_KEY", &pki.server_key)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("server");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("urls");
    let mut urls = line.split_whitespace();
    let cloudevents_url = urls.next().expect("url").to_owned();
    let apis_base = urls.next().expect("base").to_owned();
    let oracle_url = format!("{apis_base}{}", plant_edge_tests::erp_apis::paths::ORACLE);
    let profile = oracle_profile();
    micro(&profile);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut ratios = Vec::new();
        for round in 1..=2u64 {
            let first = round * 10_000_000;
            let plain = drain(
                &cloudevents_url,
                &pki.ca,
                ErpProfile::default(),
                (first, total),
                &format!("round {round}: CloudEvents batches of {BATCH}"),
            )
            .await;
            let templated = drain(
                &oracle_url,
                &pki.ca,
                profile.clone(),
                (first, total),
                &format!("round {round}: Oracle template, per-record answers, batches of {BATCH}"),
            )
            .await;
            ratios.push(templated / plain);
        }
        println!(
            "templated / CloudEvents throughput: {}",
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    });
    let _ = server.kill();
    let _ = server.wait();
}
