//! Many lines behind one PLC address, one source per line (as most plants
//! write it), one shared connection: does each source keep its schedule,
//! and how many Modbus requests does a tick cost?
//!
//! Run: `cargo bench -p plant-edge-tests --bench shared_plc`
//! (`PLANT_EDGE_BENCH_SECONDS` sets each run's length, default 10.)
//!
//! Against the in-process PLC (a real Modbus TCP server on loopback), with
//! the PLC answering at once and after 2 ms per request (a pymodbus
//! server's or a busy PLC's reaction), a real journal on disk with the
//! agent's default 50 ms commit window:
//!
//! 1. 20 counter sources (good + scrap counter, work order register) at
//!    100 ms, 20 parts/s per line: polls/s achieved of 200 configured,
//!    requests per tick, overruns, achieved interval.
//! 2. 4 handshake sources (one record per line) whose PLC queues (16
//!    records each) fill at 50 records/s per line: records/s acknowledged
//!    per line, and records the PLC dropped from a full queue.
//! 3. Ring buffers at 100 ms poll: one line whose PLC makes 2,000
//!    records/s into 512 slots, and 4 lines × 50 records/s into 64 slots
//!    each: records/s taken, records the PLC could not place (ring full),
//!    records overwritten (lapped).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use buffer::{EventType, Journal, JournalConfig};
use plant_edge_tests::measure::cpu_seconds;
use plant_edge_tests::plc::Plc;
use protocols::source::{Classifier, SourceContext};
use protocols::sources::modbus::map::{Format, Order};
use protocols::sources::modbus::{
    self, CounterSpec, Endpoint, FieldSpec, ModbusConfig, ModbusStats, RecordSpec,
};
use tokio::sync::watch;

fn seconds() -> u64 {
    std::env::var("PLANT_EDGE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn context(
    journal: &Journal,
    appender: &buffer::Appender,
    name: String,
    shutdown: watch::Receiver<bool>,
) -> SourceContext {
    SourceContext {
        site: "s".into(),
        gateway: "g".into(),
        name,
        attributes: Default::default(),
        routes: journal.routes_all(),
        classifier: Classifier::default(),
        appender: appender.clone(),
        initial_cursor: None,
        shutdown,
        read: Default::default(),
        periods: None,
    }
}

fn address(text: String) -> modbus::map::Address {
    text.parse().expect("address")
}

fn counter(signal: &str, event_type: EventType, register: u16) -> CounterSpec {
    CounterSpec {
        signal: signal.into(),
        event_type,
        address: address(format!("holding:{register}")),
        format: Format::U16,
        order: Order::default(),
        max_step: 1000,
        unit: "EA".into(),
        scale: 1.0,
        place: Default::default(),
    }
}

fn base_config(plc: &Plc, line: u16) -> ModbusConfig {
    ModbusConfig {
        endpoint: Endpoint::Tcp(plc.addr.to_string()),
        unit: 1,
        poll_interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        max_gap: 8,
        counter_window: std::time::Duration::ZERO,
        line: format!("L{line}"),
        machine: format!("m{line}"),
        counters: vec![],
        records: vec![],
        rings: vec![],
        context: vec![],
    }
}

fn journal_in(dir: &std::path::Path) -> Journal {
    let mut jc = JournalConfig::new(dir.join("journal"));
    jc.sinks = vec!["erp".into()];
    // The agent's default: counter polls share a commit for up to 50 ms.
    jc.commit_window = Duration::from_millis(50);
    Journal::open(jc).expect("journal")
}

/// Figures of one counter run.
struct CounterRun {
    polls_per_s: f64,
    requests_per_tick: f64,
    overruns: u64,
    achieved_ms: f64,
    cpu: f64,
}

async fn counters(lines: u16, reaction: Duration) -> CounterRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let plc = Arc::new(Plc::start().await);
    plc.mem().reaction = reaction;
    // Line i: good at 10 i, scrap at 10 i + 1, work order at 10 i + 2
    // (adjacent, as a PLC programmer lays out one data block per line).
    let making = {
        let plc = plc.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut n = 0u16;
            loop {
                tick.tick().await;
                n = n.wrapping_add(1);
                let mut m = plc.mem();
                for line in 0..lines {
                    m.holding.insert(10 * line, n);
                    m.holding.insert(10 * line + 1, n / 20);
                    m.holding.insert(10 * line + 2, 4711);
                }
            }
        })
    };
    let journal = journal_in(dir.path());
    let (appender, _writer) = journal.start_writer();
    let (stop, shutdown) = watch::channel(false);
    let mut stats = Vec::new();
    let mut tasks = Vec::new();
    for line in 0..lines {
        let mut config = base_config(&plc, line);
        config.counters = vec![
            counter("good", EventType::completion(), 10 * line),
            counter("scrap", EventType::scrap(), 10 * line + 1),
        ];
        config.context = vec![FieldSpec {
            name: "work_order".into(),
            address: address(format!("holding:{}", 10 * line + 2)),
            format: Format::U16,
            order: Order::default(),
            epoch: None,
        }];
        let s = Arc::new(ModbusStats::default());
        let ctx = context(&journal, &appender, format!("line{line}"), shutdown.clone());
        tasks.push(tokio::spawn(modbus::run(ctx, config, s.clone())));
        stats.push(s);
    }
    drop(appender);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let polls = |stats: &[Arc<ModbusStats>]| -> u64 {
        stats.iter().map(|s| s.polls.load(Ordering::Relaxed)).sum()
    };
    let overruns =
        |stats: &[Arc<ModbusStats>]| -> u64 { stats.iter().map(|s| s.schedule.overruns()).sum() };
    let (start, polls0, reads0, over0, cpu0) = (
        Instant::now(),
        polls(&stats),
        plc.mem().reads,
        overruns(&stats),
        cpu_seconds(),
    );
    tokio::time::sleep(Duration::from_secs(seconds())).await;
    let elapsed = start.elapsed().as_secs_f64();
    let done = polls(&stats) - polls0;
    let requests = plc.mem().reads - reads0;
    let cpu = (cpu_seconds() - cpu0) / elapsed;
    let achieved: Vec<f64> = stats
        .iter()
        .filter_map(|s| s.schedule.snapshot().achieved)
        .map(|a| a.as_secs_f64() * 1000.0)
        .collect();
    let run = CounterRun {
        polls_per_s: done as f64 / elapsed,
        // Ticks: each 100 ms slot of the run.
        requests_per_tick: requests as f64 / (elapsed * 10.0),
        overruns: overruns(&stats) - over0,
        achieved_ms: achieved.iter().sum::<f64>() / achieved.len().max(1) as f64,
        cpu,
    };
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    making.abort();
    run
}

/// Figures of one handshake run.
struct RecordRun {
    acked_per_line_s: f64,
    dropped: u64,
    produced: u64,
    requests_per_record: f64,
}

/// Each line's PLC program: a record every `every`, queued (16 deep,
/// dropped and counted when full); the head of the queue presented with
/// ready; ack seen → ready cleared; ack cleared → next record.
async fn plc_queues(
    plc: Arc<Plc>,
    lines: u16,
    every: Duration,
    acked: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    produced: Arc<AtomicU64>,
) {
    const DEPTH: usize = 16;
    let mut queues: Vec<VecDeque<u16>> = vec![VecDeque::new(); lines as usize];
    let mut sequence = vec![0u16; lines as usize];
    let mut next_record = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let now = Instant::now();
        let due = now >= next_record;
        if due {
            next_record += every;
        }
        let mut m = plc.mem();
        for i in 0..lines as usize {
            if due {
                produced.fetch_add(1, Ordering::Relaxed);
                sequence[i] = sequence[i].wrapping_add(1);
                if queues[i].len() >= DEPTH {
                    dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    queues[i].push_back(sequence[i]);
                }
            }
            let (ready_at, ack_at) = (2 * i as u16, 2 * i as u16 + 1);
            let ready = m.coils.get(&ready_at).copied().unwrap_or(false);
            let ack = m.coils.get(&ack_at).copied().unwrap_or(false);
            if ready && ack {
                acked.fetch_add(1, Ordering::Relaxed);
                queues[i].pop_front();
                m.coils.insert(ready_at, false);
            } else if !ready && !ack {
                if let Some(seq) = queues[i].front() {
                    m.holding.insert(100 + 10 * i as u16, *seq);
                    m.holding.insert(101 + 10 * i as u16, 1);
                    m.coils.insert(ready_at, true);
                }
            }
        }
    }
}

async fn records(lines: u16, per_line_per_s: u32, reaction: Duration) -> RecordRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let plc = Arc::new(Plc::start().await);
    plc.mem().reaction = reaction;
    let (acked, dropped, produced) = (Arc::default(), Arc::default(), Arc::default());
    let program = tokio::spawn(plc_queues(
        plc.clone(),
        lines,
        Duration::from_secs(1) / per_line_per_s,
        Arc::clone(&acked),
        Arc::clone(&dropped),
        Arc::clone(&produced),
    ));
    let journal = journal_in(dir.path());
    let (appender, _writer) = journal.start_writer();
    let (stop, shutdown) = watch::channel(false);
    let mut tasks = Vec::new();
    for line in 0..lines {
        let field = |name: &str, register: u16| FieldSpec {
            name: name.into(),
            address: address(format!("holding:{register}")),
            format: Format::U16,
            order: Order::default(),
            epoch: None,
        };
        let mut config = base_config(&plc, line);
        config.records = vec![RecordSpec {
            signal: "completion".into(),
            event_type: EventType::completion(),
            ready: address(format!("coil:{}", 2 * line)),
            ack: address(format!("coil:{}", 2 * line + 1)),
            fields: vec![
                field("sequence", 100 + 10 * line),
                field("quantity", 101 + 10 * line),
            ],
            key: vec!["sequence".into()],
            unit: "EA".into(),
            type_from: None,
            place: Default::default(),
        }];
        let ctx = context(&journal, &appender, format!("line{line}"), shutdown.clone());
        tasks.push(tokio::spawn(modbus::run(
            ctx,
            config,
            Arc::new(ModbusStats::default()),
        )));
    }
    drop(appender);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start, reads0, acked0, dropped0, produced0) = (
        Instant::now(),
        plc.mem().reads,
        acked.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed),
        produced.load(Ordering::Relaxed),
    );
    tokio::time::sleep(Duration::from_secs(seconds())).await;
    let elapsed = start.elapsed().as_secs_f64();
    let acked_in_run = acked.load(Ordering::Relaxed) - acked0;
    let run = RecordRun {
        requests_per_record: (plc.mem().reads - reads0) as f64 / acked_in_run.max(1) as f64,
        acked_per_line_s: (acked.load(Ordering::Relaxed) - acked0) as f64
            / elapsed
            / f64::from(lines),
        dropped: dropped.load(Ordering::Relaxed) - dropped0,
        produced: produced.load(Ordering::Relaxed) - produced0,
    };
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    program.abort();
    run
}

/// Figures of one ring run.
struct RingRun {
    taken_per_s: f64,
    made: u64,
    held_back: u64,
    overwritten: u64,
    requests_per_record: f64,
}

async fn rings(lines: u16, per_line_per_s: u32, slots: u16, reaction: Duration) -> RingRun {
    use plant_edge_tests::plc::RingProgram;
    let dir = tempfile::tempdir().expect("tempdir");
    let plc = Arc::new(Plc::start().await);
    plc.mem().reaction = reaction;
    let journal = journal_in(dir.path());
    let (appender, _writer) = journal.start_writer();
    let (stop, shutdown) = watch::channel(false);
    let (mut tasks, mut programs, mut stats) = (Vec::new(), Vec::new(), Vec::new());
    for line in 0..lines {
        let base = 1000 + 2000 * line;
        let program = RingProgram {
            write_index: base - 2,
            read_index: base - 1,
            first_slot: base,
            ..RingProgram::new(slots, per_line_per_s, true)
        };
        let field = |name: &str, offset: u16| FieldSpec {
            name: name.into(),
            address: address(format!("holding:{}", base + offset)),
            format: Format::U16,
            order: Order::default(),
            epoch: None,
        };
        let mut config = base_config(&plc, line);
        config.rings = vec![modbus::RingSpec {
            signal: "completions".into(),
            event_type: EventType::completion(),
            write_index: address(format!("holding:{}", program.write_index)),
            read_index: address(format!("holding:{}", program.read_index)),
            first_slot: address(format!("holding:{base}")),
            slots,
            slot_size: program.slot_size,
            fields: vec![field("sequence", 0), field("quantity", 1)],
            unit: "EA".into(),
            type_from: None,
            place: Default::default(),
        }];
        let s = Arc::new(ModbusStats::default());
        let ctx = context(&journal, &appender, format!("line{line}"), shutdown.clone());
        tasks.push(tokio::spawn(modbus::run(ctx, config, s.clone())));
        stats.push(s);
        programs.push(program);
    }
    drop(appender);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let running: Vec<_> = programs
        .iter()
        .map(|p| p.clone().start(plc.clone()))
        .collect();
    let sum = |f: &dyn Fn(&ModbusStats) -> u64| -> u64 { stats.iter().map(|s| f(s)).sum() };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start, taken0, reads0) = (
        Instant::now(),
        sum(&|s| s.ring_records.load(Ordering::Relaxed)),
        plc.mem().reads,
    );
    let made0: u64 = programs
        .iter()
        .map(|p| p.made.load(Ordering::Relaxed))
        .sum();
    let held0: u64 = programs
        .iter()
        .map(|p| p.held_back.load(Ordering::Relaxed))
        .sum();
    tokio::time::sleep(Duration::from_secs(seconds())).await;
    let elapsed = start.elapsed().as_secs_f64();
    let taken = sum(&|s| s.ring_records.load(Ordering::Relaxed)) - taken0;
    let run = RingRun {
        taken_per_s: taken as f64 / elapsed,
        made: programs
            .iter()
            .map(|p| p.made.load(Ordering::Relaxed))
            .sum::<u64>()
            - made0,
        held_back: programs
            .iter()
            .map(|p| p.held_back.load(Ordering::Relaxed))
            .sum::<u64>()
            - held0,
        overwritten: sum(&|s| s.records_overwritten.load(Ordering::Relaxed)),
        requests_per_record: (plc.mem().reads - reads0) as f64 / taken.max(1) as f64,
    };
    for program in running {
        program.abort();
    }
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    run
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let secs = seconds();
    println!("one PLC address, one source per line, one shared connection, {secs} s per run:");
    for reaction_ms in [0u64, 2] {
        let lines = 20;
        let r = runtime.block_on(counters(lines, Duration::from_millis(reaction_ms)));
        println!(
            "  {lines} counter sources at 100 ms, PLC answers in {reaction_ms} ms: {:.1} polls/s of {} configured ({:.1} %), achieved interval {:.1} ms, {:.2} requests per 100 ms tick, {} overruns, CPU {:.1} % of one core (agent + PLC)",
            r.polls_per_s,
            lines * 10,
            r.polls_per_s / f64::from(lines * 10) * 100.0,
            r.achieved_ms,
            r.requests_per_tick,
            r.overruns,
            r.cpu * 100.0
        );
    }
    for reaction_us in [0u64, 500, 1000, 2000] {
        let reaction_ms = reaction_us as f64 / 1000.0;
        let (lines, rate) = (4, 50);
        let r = runtime.block_on(records(lines, rate, Duration::from_micros(reaction_us)));
        println!(
            "  {lines} handshake sources, {rate} records/s per line, PLC answers in {reaction_ms} ms: {:.1} records/s acknowledged per line, {} of {} records dropped by the PLC's full queues, {:.1} requests per record",
            r.acked_per_line_s, r.dropped, r.produced, r.requests_per_record
        );
    }
    for (lines, rate, slots) in [(1u16, 2_000u32, 512u16), (4, 50, 64)] {
        for reaction_ms in [0u64, 2] {
            let r = runtime.block_on(rings(
                lines,
                rate,
                slots,
                Duration::from_millis(reaction_ms),
            ));
            println!(
                "  {lines} ring source(s) × {rate} records/s, {slots} slots, 100 ms poll, PLC answers in {reaction_ms} ms: {:.0} records/s taken ({} made), {} held back by a full ring, {} overwritten, {:.3} requests per record",
                r.taken_per_s, r.made, r.held_back, r.overwritten, r.requests_per_record
            );
        }
    }
}
