//! Handshake records per second per line: the Modbus source against an
//! in-process PLC (a real Modbus TCP server on loopback) with a 4-phase
//! handshake per line and a queue that is never empty, over one
//! connection, with a real journal (fsync per record and per release).
//!
//! Run: `cargo bench -p plant-edge-tests --bench handshake_records`
//! (`PLANT_EDGE_BENCH_SECONDS` sets each run's length, default 10).
//! Prints records/s per line for 1 and 4 lines, with the PLC presenting
//! the next record at once (1 ms scan) and 10 ms after the ack, and the
//! process's CPU (agent and PLC together: an upper bound for the agent).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use buffer::{EventType, Journal, JournalConfig};
use plant_edge_tests::measure::cpu_seconds;
use plant_edge_tests::plc::Plc;
use protocols::source::{Classifier, SourceContext};
use protocols::sources::modbus::map::{Format, Order};
use protocols::sources::modbus::{
    self, Endpoint, FieldSpec, ModbusConfig, ModbusStats, RecordSpec,
};
use tokio::sync::watch;

fn seconds() -> u64 {
    std::env::var("PLANT_EDGE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn record(i: u16) -> RecordSpec {
    let field = |name: &str, address: u16| FieldSpec {
        name: name.into(),
        address: format!("holding:{address}").parse().expect("address"),
        format: Format::U16,
        order: Order::default(),
        epoch: None,
    };
    RecordSpec {
        signal: format!("line{i}"),
        event_type: EventType::completion(),
        ready: format!("coil:{}", 2 * i).parse().expect("ready"),
        ack: format!("coil:{}", 2 * i + 1).parse().expect("ack"),
        fields: vec![
            field("sequence", 100 + 10 * i),
            field("quantity", 101 + 10 * i),
        ],
        key: vec!["sequence".into()],
        unit: "EA".into(),
        type_from: None,
        place: protocols::source::Placement {
            line: Some(format!("L{i}")),
            ..Default::default()
        },
    }
}

/// The PLC side: a 1 ms scan; a record acked → ready cleared; ack cleared
/// → the next record `delay` later.
async fn plc_program(plc: Arc<Plc>, lines: u16, delay: Duration, acked: Arc<AtomicU64>) {
    let mut next_at = vec![Instant::now(); lines as usize];
    let mut sequence = vec![0u16; lines as usize];
    loop {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let now = Instant::now();
        let mut m = plc.mem();
        for i in 0..lines {
            let (ready_at, ack_at) = (2 * i, 2 * i + 1);
            let ready = m.coils.get(&ready_at).copied().unwrap_or(false);
            let ack = m.coils.get(&ack_at).copied().unwrap_or(false);
            if ready && ack {
                acked.fetch_add(1, Ordering::Relaxed);
                m.coils.insert(ready_at, false);
                next_at[i as usize] = now + delay;
            } else if !ready && !ack && now >= next_at[i as usize] {
                let seq = &mut sequence[i as usize];
                *seq = seq.wrapping_add(1);
                m.holding.insert(100 + 10 * i, *seq);
                m.holding.insert(101 + 10 * i, 1);
                m.coils.insert(ready_at, true);
            }
        }
    }
}

/// Records/s per line and the process's CPU (agent and in-process PLC) as
/// a share of one core over the same window.
async fn run(lines: u16, delay: Duration) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let plc = Arc::new(Plc::start().await);
    let acked = Arc::new(AtomicU64::new(0));
    let program = tokio::spawn(plc_program(plc.clone(), lines, delay, acked.clone()));
    let mut jc = JournalConfig::new(dir.path().join("journal"));
    jc.sinks = vec!["erp".into()];
    let journal = Journal::open(jc).expect("journal");
    let (appender, _writer) = journal.start_writer();
    let (stop, shutdown) = watch::channel(false);
    let ctx = SourceContext {
        site: "s".into(),
        gateway: "g".into(),
        name: "plc".into(),
        attributes: Default::default(),
        routes: journal.routes_all(),
        classifier: Classifier::default(),
        appender,
        initial_cursor: None,
        shutdown,
        read: Default::default(),
        periods: None,
    };
    let config = ModbusConfig {
        endpoint: Endpoint::Tcp(plc.addr.to_string()),
        unit: 1,
        poll_interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        max_gap: 8,
        counter_window: std::time::Duration::ZERO,
        line: "L0".into(),
        machine: "plc".into(),
        counters: vec![],
        records: (0..lines).map(record).collect(),
        rings: vec![],
        context: vec![],
    };
    let task = tokio::spawn(modbus::run(ctx, config, Arc::new(ModbusStats::default())));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start, from, cpu_from) = (Instant::now(), acked.load(Ordering::Relaxed), cpu_seconds());
    tokio::time::sleep(Duration::from_secs(seconds())).await;
    let done = acked.load(Ordering::Relaxed) - from;
    let elapsed = start.elapsed().as_secs_f64();
    let per_line = done as f64 / elapsed / f64::from(lines);
    let cpu = (cpu_seconds() - cpu_from) / elapsed;
    let _ = stop.send(true);
    let _ = task.await;
    program.abort();
    (per_line, cpu)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "handshake records per second per line (one connection, 100 ms poll, {} s each):",
        seconds()
    );
    for (lines, delay_ms) in [(1u16, 0u64), (4, 0), (1, 10), (4, 10)] {
        let (rate, cpu) = runtime.block_on(run(lines, Duration::from_millis(delay_ms)));
        println!(
            "  {lines} line(s), next record {delay_ms:>2} ms after the ack: {rate:7.1} records/s per line, CPU {:5.1} % of one core (agent + in-process PLC)",
            cpu * 100.0
        );
    }
}
