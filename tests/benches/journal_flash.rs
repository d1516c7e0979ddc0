//! Bytes written to storage per event for a steady trickle of small
//! commits, as a gateway sees it: 20 lines polled every 100 ms, each poll
//! appending 0–2 realistic events of ~700 bytes (one per poll on average: 200
//! events/s), with a sink that acknowledges everything every 100 ms, so
//! acks, cursor moves and garbage collection are counted too. Real journal
//! in a directory on disk (not tmpfs).
//!
//! Run: `cargo bench -p plant-edge-tests --bench journal_flash`
//! (`PLANT_EDGE_BENCH_SECONDS` sets each run's length, default 20;
//! `PLANT_EDGE_BENCH_DIR` the directory, default the system temp dir;
//! `PLANT_EDGE_BENCH_WINDOWS` which commit windows, e.g. `50`;
//! `PLANT_EDGE_BENCH_LEDGER=0` appends without ledger entries, to see
//! what the ledger costs; `PLANT_EDGE_BENCH_LINES` and
//! `PLANT_EDGE_BENCH_POLL_MS` another plant's shape, e.g. `1` and `1000`
//! for one line whose counter window stores once a second).
//! Prints, per `journal.commit_window`: bytes written per event
//! (`write_bytes` of /proc/self/io), commits per second, and the append
//! latency a source waits for "stored" (p50, p99).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
use plant_edge_tests::measure::{realistic_event, storage_bytes_written};

fn line_count() -> u64 {
    std::env::var("PLANT_EDGE_BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn poll_ms() -> u64 {
    std::env::var("PLANT_EDGE_BENCH_POLL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}
const SINK: &str = "cloud";

fn seconds() -> u64 {
    std::env::var("PLANT_EDGE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// The commit windows to measure (`PLANT_EDGE_BENCH_WINDOWS`, milliseconds,
/// comma-separated; default 0,20,50,100).
fn windows() -> Vec<u64> {
    std::env::var("PLANT_EDGE_BENCH_WINDOWS")
        .ok()
        .map(|v| v.split(',').filter_map(|w| w.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![0, 20, 50, 100])
}

/// How often the sink acknowledges what it read (`PLANT_EDGE_BENCH_ACK_MS`,
/// default 100; 0: never, to see what appends alone cost).
fn ack_every() -> Option<Duration> {
    let ms = std::env::var("PLANT_EDGE_BENCH_ACK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// Whether events carry a ledger entry, as the agent's sources' do.
fn with_ledger() -> bool {
    std::env::var("PLANT_EDGE_BENCH_LEDGER").map_or(true, |v| v != "0")
}

struct Figures {
    events: u64,
    bytes: u64,
    commits_per_s: f64,
    p50: Duration,
    p99: Duration,
}

async fn run(window: Duration) -> Figures {
    let base = std::env::var_os("PLANT_EDGE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let mut config = JournalConfig::new(dir.path().join("journal"));
    config.sinks = vec![SINK.into()];
    config.commit_window = window;
    let journal = Journal::open(config).expect("journal");
    let (appender, writer) = journal.start_writer();
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let (events, commits) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut lines = Vec::new();
    for line in 0..line_count() {
        let (appender, routes) = (appender.clone(), journal.routes_all());
        let (stop, measuring, events, latencies) = (
            stop.clone(),
            measuring.clone(),
            events.clone(),
            latencies.clone(),
        );
        lines.push(tokio::spawn(async move {
            // Lines poll out of step with each other, as real ones do.
            tokio::time::sleep(Duration::from_millis(line * 5)).await;
            let mut poll = tokio::time::interval(Duration::from_millis(poll_ms()));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                poll.tick().await;
                let made = fastrand::u64(0..=2);
                let batch: Vec<NewEvent> = (0..made)
                    .map(|_| {
                        n += 1;
                        NewEvent {
                            id: uuid::Uuid::from_u128(((line as u128) << 64) | n as u128),
                            class: EventClass::Business,
                            routes,
                            payload: realistic_event(line, n),
                            ledger: with_ledger().then(|| buffer::LedgerEntry {
                                at_ms: std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0, |d| d.as_millis() as u64),
                                line: format!("L{line}"),
                                event_type: "production.completion".into(),
                                quantity: 1.0,
                            }),
                        }
                    })
                    .collect();
                let started = Instant::now();
                // A counter poll: may share its commit (handshakes do not wait).
                appender
                    .append_batched(AppendRequest {
                        source: format!("line{line}"),
                        events: batch,
                        cursor: Some(n.to_be_bytes().to_vec()),
                    })
                    .await
                    .expect("append");
                if measuring.load(Ordering::Relaxed) {
                    events.fetch_add(made, Ordering::Relaxed);
                    latencies.lock().expect("latencies").push(started.elapsed());
                }
            }
        }));
    }
    let sink = {
        let (journal, stop) = (journal.clone(), stop.clone());
        tokio::spawn(async move {
            let Some(every) = ack_every() else { return };
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(every).await;
                let journal = journal.clone();
                tokio::task::spawn_blocking(move || {
                    let batch = journal.read_batch(SINK, 10_000).expect("read");
                    let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
                    journal.ack(SINK, &seqs).expect("ack");
                })
                .await
                .expect("sink");
            }
        })
    };
    let mut durable = journal.durable_watch();
    let counter = {
        let (commits, measuring) = (commits.clone(), measuring.clone());
        tokio::spawn(async move {
            while durable.changed().await.is_ok() {
                if measuring.load(Ordering::Relaxed) {
                    commits.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Warm up (sled's first segments, the dedup window's first entries).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written_before = storage_bytes_written();
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(seconds())).await;
    measuring.store(false, Ordering::Relaxed);
    let bytes = storage_bytes_written() - written_before;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for line in lines {
        let _ = line.await;
    }
    let _ = sink.await;
    counter.abort();
    drop(appender);
    let _ = writer.await;
    let mut latencies = latencies.lock().expect("latencies").clone();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Figures {
        events: events.load(Ordering::Relaxed),
        bytes,
        commits_per_s: commits.load(Ordering::Relaxed) as f64 / elapsed,
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "journal writes per event: {} lines polled every {} ms, {}-byte events, acked every 100 ms, {} s each",
        line_count(),
        poll_ms(),
        realistic_event(1, 1).len(),
        seconds()
    );
    for window_ms in windows() {
        let f = runtime.block_on(run(Duration::from_millis(window_ms)));
        println!(
            "  commit_window {window_ms:>3} ms: {:>6.0} bytes/event ({} events, {:.0} KiB/s), {:5.1} commits/s, append latency p50 {:5.1} ms p99 {:5.1} ms",
            f.bytes as f64 / f.events.max(1) as f64,
            f.events,
            f.bytes as f64 / 1024.0 / seconds() as f64,
            f.commits_per_s,
            f.p50.as_secs_f64() * 1000.0,
            f.p99.as_secs_f64() * 1000.0,
        );
    }
}
