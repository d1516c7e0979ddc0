//! Drain of a journal backlog to a simulated ERP over HTTPS, in batch mode
//! and in one-event-per-request mode, with CPU% and peak RSS of the
//! draining process (the ERP runs in a separate process).
//!
//! Run: `cargo bench -p plant-edge-tests --bench https_drain`
//! (`PLANT_EDGE_BENCH_EVENTS` sets the backlog, default 1,000,000 for
//! batches; the single mode drains a tenth of it.)

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
use plant_edge_tests::drive;
use plant_edge_tests::measure::{cpu_seconds, peak_rss_mib};
use protocols::sinks::https::{HttpsAuth, HttpsMode, HttpsSink, HttpsSinkConfig};
use protocols::tls::TlsSettings;

const SINK: &str = "erp";

fn events() -> u64 {
    std::env::var("PLANT_EDGE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn open(dir: &std::path::Path) -> Journal {
    let mut config = JournalConfig::new(dir.join("journal"));
    config.sinks = vec![SINK.into()];
    config.max_bytes = 4 << 30;
    Journal::open(config).expect("journal")
}

fn fill(dir: &std::path::Path, total: u64) {
    let journal = open(dir);
    let routes = journal.routes_all();
    let mut n = 0;
    while n < total {
        let events = (n..(n + 1024).min(total))
            .map(|i| {
                let id = uuid::Uuid::from_u128(i as u128 + 1);
                let mut payload = format!("{{\"specversion\":\"1.0\",\"id\":\"{id}\",\"source\":\"urn:plant-edge:p:g:press\",\"type\":\"production.completion\",\"data\":{{\"n\":{i},\"pad\":\"").into_bytes();
                payload.resize(496, b'x');
                payload.extend_from_slice(b"\"}}");
                NewEvent { id, class: EventClass::Business, routes, payload, ledger: None }
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

async fn drain(url: &str, ca: &std::path::Path, mode: HttpsMode, total: u64, label: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("exe");
    let status = std::process::Command::new(exe)
        .env("PLANT_EDGE_BENCH_ROLE", "fill")
        .env("PLANT_EDGE_BENCH_DIR", dir.path())
        .env("PLANT_EDGE_BENCH_EVENTS", total.to_string())
        .status()
        .expect("fill");
    assert!(status.success());
    let journal = open(dir.path());
    let mut sink = HttpsSink::new(HttpsSinkConfig {
        url: url.into(),
        mode,
        headers: vec![],
        gzip: false,
        auth: HttpsAuth::None,
        tls: TlsSettings {
            ca_file: Some(ca.to_owned()),
            ..TlsSettings::default()
        },
        insecure_skip_verify: false,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
        max_events_per_second: None,
        profile: Default::default(),
    })
    .expect("sink");
    let (cpu0, started) = (cpu_seconds(), Instant::now());
    let drained = drive::until(&journal, SINK, &mut sink, Duration::from_secs(3600), |j| {
        j.backlog(SINK).expect("backlog") == 0
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    assert!(drained);
    println!(
        "{label}: {total} events in {secs:.1} s = {:.0} events/s; CPU {:.0}% of one core; peak RSS {:.1} MiB",
        total as f64 / secs,
        (cpu_seconds() - cpu0) / secs * 100.0,
        peak_rss_mib()
    );
}

fn main() {
    match std::env::var("PLANT_EDGE_BENCH_ROLE").as_deref() {
        Ok("fill") => {
            let dir = std::env::var_os("PLANT_EDGE_BENCH_DIR").expect("dir");
            fill(std::path::Path::new(&dir), events());
            return;
        }
        Ok("server") => {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async {
                let cert = std::env::var_os("PLANT_EDGE_BENCH_CERT").expect("cert");
                let key = std::env::var_os("PLANT_EDGE_BENCH_KEY").expect("key");
                let erp = plant_edge_tests::erp::Erp::start(cert.as_ref(), key.as_ref()).await;
                println!("{}", erp.url());
                loop {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            });
            return;
        }
        _ => {}
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
    let mut url = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut url)
        .expect("url");
    let url = url.trim().to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        drain(
            &url,
            &pki.ca,
            HttpsMode::Batch {
                max_events: 500,
                max_bytes: 1 << 20,
            },
            total,
            "batch mode (500 per request)",
        )
        .await;
        drain(
            &url,
            &pki.ca,
            HttpsMode::Single,
            (total / 10).max(1),
            "one event per request",
        )
        .await;
    });
    let _ = server.kill();
    let _ = server.wait();
}
