//! Chaos: a handshake PLC that restarts mid-run (its record sequence and
//! its counter back to their start, so records repeat field for field)
//! while the agent is SIGKILLed at random instants, over and over.
//!
//! Reconciled at the end against what the PLC itself saw: every record the
//! PLC saw acknowledged is stored exactly once (as many distinct record
//! events as acknowledgements, with the same quantities), and the counter
//! events add up to every part the PLC made.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plant_edge_tests::plc::Plc;
use plant_edge_tests::plc_line::{self, handshake_idle, Line};

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

{source}"#,
        state = state.display(),
        source = plc_line::source_config("press1", &format!("tcp://127.0.0.1:{port}"), "10ms"),
    )
}

/// A PLC restart between records: counter and sequence back to zero. The
/// agent runs meanwhile and has stored the counter's last value, so the
/// parts before the restart are all counted.
async fn restart_plc(plc: &Plc, line: &Line) {
    line.run(false);
    handshake_idle(plc, Duration::from_secs(20)).await;
    plc_line::polled(plc, 30, Duration::from_secs(20)).await;
    {
        let mut m = plc.mem();
        m.holding.insert(0, 0);
        line.sequence.store(0, Ordering::SeqCst);
    }
    line.run(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_plc_and_a_sigkilled_agent_lose_and_repeat_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let plc = Arc::new(Plc::start().await);
    let line = Arc::new(Line::default());
    let program = tokio::spawn(plc_line::program(
        plc.clone(),
        line.clone(),
        Duration::from_millis(2),
    ));
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
    plc_line::polled(&plc, 30, Duration::from_secs(20)).await;
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
    handshake_idle(&plc, Duration::from_secs(20)).await;
    plc_line::polled(&plc, 30, Duration::from_secs(20)).await;
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
    let (parts, records, record_quantity) = plc_line::tally(distinct.by_id.values());
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
