//! Journal benchmarks: durable append throughput by batch size (criterion),
//! then figures criterion does not give: single-append p50/p99, drain rate,
//! open time and peak RSS with 1,000,000 pending events (measured in a fresh
//! child process so the peak belongs to that scenario alone).

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent, Routes};
use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use uuid::Uuid;

const PAYLOAD: usize = 500;
const SCENARIO_ENV: &str = "PLANT_EDGE_BENCH_SCENARIO";

fn events(start: u64, n: u64, routes: Routes) -> Vec<NewEvent> {
    (start..start + n)
        .map(|i| NewEvent {
            id: Uuid::from_u128(i as u128 + 1),
            class: EventClass::Business,
            routes,
            payload: {
                let mut p = format!("{{\"type\":\"production.completion\",\"n\":{i},\"pad\":\"")
                    .into_bytes();
                p.resize(PAYLOAD - 2, b'x');
                p.extend_from_slice(b"\"}");
                p
            },
            ledger: None,
        })
        .collect()
}

fn open(dir: &std::path::Path) -> Journal {
    let mut config = JournalConfig::new(dir.join("journal"));
    config.sinks = vec!["erp".into()];
    config.max_bytes = 4 * 1024 * 1024 * 1024;
    if let Some(mib) = std::env::var("PLANT_EDGE_BENCH_CACHE_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        config.cache_bytes = mib * 1024 * 1024;
    }
    Journal::open(config).expect("open journal")
}

fn append(journal: &Journal, start: u64, n: u64) {
    let routes = journal.routes_all();
    journal
        .append_blocking(AppendRequest {
            source: "bench".into(),
            events: events(start, n, routes),
            cursor: None,
        })
        .expect("append")
        .expect("fits");
}

fn durable_appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("durable_append");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    for batch in [1u64, 64, 1024] {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = open(dir.path());
        let mut next = 0u64;
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("batch_{batch}"), |b| {
            b.iter_batched(
                || {
                    let start = next;
                    next += batch;
                    events(start, batch, journal.routes_all())
                },
                |events| {
                    journal
                        .append_blocking(AppendRequest {
                            source: "bench".into(),
                            events,
                            cursor: None,
                        })
                        .expect("append")
                        .expect("fits")
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, durable_appends);

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

const TOTAL: u64 = 1_000_000;

/// Child 1: fills a journal with 1M pending events and closes it.
fn fill_scenario(dir: &std::path::Path) {
    let journal = open(dir);
    let started = Instant::now();
    let mut n = 0;
    while n < TOTAL {
        append(&journal, n, 1024.min(TOTAL - n));
        n += 1024;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fill 1M (batches of 1024): {:.0} events/s",
        TOTAL as f64 / secs
    );
    journal.close().expect("close");
    println!("peak RSS while filling: {:.1} MiB", peak_rss_mib());
}

/// Child 2, a fresh process like an agent restarting on a backlog: open,
/// then drain; the RSS peak is this scenario's alone.
fn drain_scenario(dir: &std::path::Path) {
    let disk: u64 = walk_size(&dir.join("journal"));
    let started = Instant::now();
    let journal = open(dir);
    let open_time = started.elapsed();
    println!("open with 1M pending: {:.3} s", open_time.as_secs_f64());
    println!(
        "peak RSS after opening 1M pending: {:.1} MiB; on disk {:.0} MiB",
        peak_rss_mib(),
        disk as f64 / 1048576.0
    );
    let started = Instant::now();
    let mut drained = 0u64;
    loop {
        let batch = journal.read_batch("erp", 1024).expect("read");
        if batch.is_empty() {
            break;
        }
        drained += batch.len() as u64;
        let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
        journal.ack("erp", &seqs).expect("ack");
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(drained, TOTAL, "drain must see every event");
    println!(
        "drain 1M (read+ack, batches of 1024): {:.0} events/s",
        TOTAL as f64 / secs
    );
    println!("peak RSS while draining 1M: {:.1} MiB", peak_rss_mib());
}

fn walk_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        walk_size(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn latency_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open(dir.path());
    let mut samples = Vec::with_capacity(2000);
    for i in 0..2000 {
        let started = Instant::now();
        append(&journal, i, 1);
        samples.push(started.elapsed());
    }
    samples.sort();
    println!(
        "single durable append latency: p50 {:.3} ms, p99 {:.3} ms (2000 appends)",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3
    );
}

fn main() {
    if let Some(scenario) = std::env::var_os(SCENARIO_ENV) {
        let dir = std::path::PathBuf::from(std::env::var_os("PLANT_EDGE_BENCH_DIR").expect("dir"));
        match scenario.to_str() {
            Some("fill") => fill_scenario(&dir),
            _ => drain_scenario(&dir),
        }
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if filter.is_empty() || filter.iter().any(|f| "figures".contains(f.as_str())) {
        latency_figures();
        let exe = std::env::current_exe().expect("current exe");
        let dir = tempfile::tempdir().expect("tempdir");
        for scenario in ["fill", "drain"] {
            let status = std::process::Command::new(&exe)
                .env(SCENARIO_ENV, scenario)
                .env("PLANT_EDGE_BENCH_DIR", dir.path())
                .status()
                .expect("run 1M scenario");
            assert!(status.success(), "1M {scenario} scenario failed");
        }
    }
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
