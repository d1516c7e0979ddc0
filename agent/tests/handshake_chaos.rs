//! Chaos: a handshake PLC that restarts mid-run (its record sequence and
//! its counter back to their start, so records repeat field for field)
//! while the agent is SIGKILLed at random instants, over and over.
//!
//! Reconciled at the end against what the PLC itself saw: every record the
//! PLC saw acknowledged is stored exactly once (as many distinct record
//! events as acknowledgements, with the same quantities), and the counter
//! events add up to every part the PLC made.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plant_edge_tests::plc::Plc;

const KILLS: usize = 32;
/// Kill rounds after which the PLC restarts.
const PLC_RESTARTS: [usize; 2] = [10, 21];

fn config(state: &std::path::Path, port: u16) -> String {
    format!(
        r#"[agent]
site = "p1"
gateway = "gw"
state_dir = "{state}"
shutdown_timeout = "5s"

[sinks.archive]
kind = "file"
path = "{state}/archive/events.jsonl"

[sources.press1]
kind = "modbus"
endpoint = "tcp://127.0.0.1:{port}"
poll_interval = "10ms"
timeout = "500ms"
line = "L1"
machine = "press1"

[[sources.press1.counters]]
signal = "good"
type = "production.completion"
address = "holding:0"
format = "u16"
max_step = 5000

[[sources.press1.records]]
signal = "completion"
type = "production.completion"
ready = "coil:0"
ack = "coil:1"
fields = {{ sequence = {{ address = "holding:10", format = "u16" }}, work_order = {{ address = "holding:11", format = "string", length = 4 }}, quantity = {{ address = "holding:15", format = "u16" }} }}
"#,
        state = state.display()
    )
}

/// What the simulated PLC program did, as the PLC saw it.
#[derive(Default)]
struct Line {
    /// Make parts and records.
    producing: AtomicBool,
    /// Present queued records.
    presenting: AtomicBool,
    /// Parts made (all restarts together).
    made: AtomicU64,
    /// Records made and not yet presented.
    queued: AtomicU64,
    /// Records the PLC saw acknowledged, and their quantities.
    acked: AtomicU64,
    acked_quantity: AtomicU64,
    /// The PLC's own record sequence (starts again after a restart).
    sequence: AtomicU64,
}

/// The PLC program: a counter, a record queue and the 4-phase handshake
/// (ready → ack → ready cleared → ack cleared → next record).
async fn plc_program(plc: Arc<Plc>, line: Arc<Line>) {
    let mut tick: u64 = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        tick += 1;
        let mut m = plc.mem();
        if line.producing.load(Ordering::SeqCst) {
            let good = m.holding.get(&0).copied().unwrap_or(0);
            m.holding.insert(0, good.wrapping_add(1));
            line.made.fetch_add(1, Ordering::SeqCst);
            if tick.is_multiple_of(40) {
                line.queued.fetch_add(1, Ordering::SeqCst);
            }
        }
        let ready = m.coils.get(&0).copied().unwrap_or(false);
        let ack = m.coils.get(&1).copied().unwrap_or(false);
        if ready && ack {
            let quantity = u64::from(m.holding.get(&15).copied().unwrap_or(0));
            line.acked.fetch_add(1, Ordering::SeqCst);
            line.acked_quantity.fetch_add(quantity, Ordering::SeqCst);
            m.coils.insert(0, false);
        } else if !ready
            && !ack
            && line.presenting.load(Ordering::SeqCst)
            && line.queued.load(Ordering::SeqCst) > 0
        {
            line.queued.fetch_sub(1, Ordering::SeqCst);
            let seq = line.sequence.fetch_add(1, Ordering::SeqCst) + 1;
            // Few distinct values: after a restart the records repeat.
            m.holding.insert(10, seq as u16);
            m.set_string(11, 4, &format!("WO-{}", seq % 3));
            m.holding.insert(15, 1 + (seq % 4) as u16);
            m.coils.insert(0, true);
        }
    }
}

/// Waits until the agent polled the PLC `n` more times.
async fn polled(plc: &Plc, n: u64) {
    let start = plc.mem().reads;
    let deadline = Instant::now() + Duration::from_secs(20);
    while plc.mem().reads < start + n {
        assert!(Instant::now() < deadline, "the agent stopped polling");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the handshake is idle (no record presented or acked).
async fn handshake_idle(plc: &Plc) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        {
            let m = plc.mem();
            if !m.coils.get(&0).copied().unwrap_or(false)
                && !m.coils.get(&1).copied().unwrap_or(false)
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the handshake never settled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A PLC restart between records: counter and sequence back to zero. The
/// agent runs meanwhile and has stored the counter's last value, so the
/// parts before the restart are all counted.
async fn restart_plc(plc: &Plc, line: &Line) {
    line.producing.store(false, Ordering::SeqCst);
    line.presenting.store(false, Ordering::SeqCst);
    handshake_idle(plc).await;
    polled(plc, 30).await;
    {
        let mut m = plc.mem();
        m.holding.insert(0, 0);
        line.sequence.store(0, Ordering::SeqCst);
    }
    line.producing.store(true, Ordering::SeqCst);
    line.presenting.store(true, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_plc_and_a_sigkilled_agent_lose_and_repeat_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let plc = Arc::new(Plc::start().await);
    let line = Arc::new(Line::default());
    let program = tokio::spawn(plc_program(plc.clone(), line.clone()));
    let file = write_config(dir.path(), &config(&state, plc.addr.port()));
    let config = file.to_str().expect("utf8").to_owned();
    let spawn = || {
        bin()
            .args(["run", "-c", &config])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn agent")
    };
    // The first start takes the counter's baseline (0) before production.
    let mut child = spawn();
    polled(&plc, 30).await;
    line.producing.store(true, Ordering::SeqCst);
    line.presenting.store(true, Ordering::SeqCst);
    for round in 0..KILLS {
        if round > 0 {
            child = spawn();
        }
        if PLC_RESTARTS.contains(&round) {
            restart_plc(&plc, &line).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(150..600))).await;
        assert!(
            child.try_wait().expect("poll").is_none(),
            "the agent must still be running when killed"
        );
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
    // Production stops; the agent catches up with the PLC, then stops.
    line.producing.store(false, Ordering::SeqCst);
    let child = spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    while line.queued.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "the record queue never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handshake_idle(&plc).await;
    polled(&plc, 30).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let mut child = child;
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    program.abort();

    let mut distinct = Distinct::default();
    for event in archived_events(&state) {
        distinct.add(event);
    }
    let mut jc = buffer::JournalConfig::new(state.join("journal"));
    jc.lock_wait = Duration::from_secs(5);
    let journal = buffer::Journal::open(jc).expect("journal reopens after kills");
    journal
        .scan_events(0, |e| {
            distinct.add(serde_json::from_slice(&e.payload).expect("payload"));
            true
        })
        .expect("scan");
    let (mut parts, mut records, mut record_quantity) = (0, 0, 0);
    for event in distinct.by_id.values() {
        let quantity = event["data"]["quantity"].as_u64().expect("quantity");
        if event["data"]["counter"].is_object() {
            parts += quantity;
        } else {
            records += 1;
            record_quantity += quantity;
        }
    }
    let made = line.made.load(Ordering::SeqCst);
    let acked = line.acked.load(Ordering::SeqCst);
    eprintln!(
        "{KILLS} kills, {} PLC restarts: {made} parts made, {parts} counted; {acked} records acknowledged, {records} stored; {} repeated deliveries",
        PLC_RESTARTS.len(),
        distinct.repeated
    );
    assert!(acked > 50, "records flowed ({acked})");
    assert_eq!(parts, made, "every part counted once");
    assert_eq!(
        records, acked,
        "every record the PLC saw acknowledged is stored, once"
    );
    assert_eq!(
        record_quantity,
        line.acked_quantity.load(Ordering::SeqCst),
        "with the quantities the PLC handed over"
    );
    assert!(journal.dead_letters().expect("dead").is_empty());
}
