//! Reconciliation against the in-process PLC: checkpoint events per period
//! whose totals equal what the PLC counted and what the events carried,
//! through a 16-bit wrap, a counter reset and SIGKILLs at a boundary; and
//! `plant-edge reconcile` against an ERP's bookings.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plant_edge_tests::plc::Plc;

const PERIOD_MS: u64 = 3000;

fn config(state: &std::path::Path, plc_port: u16, metrics: u16) -> String {
    let text = format!(
        r#"[agent]
site = "p1"
gateway = "gw"
state_dir = "{state}"
shutdown_timeout = "5s"

[checkpoints]
every = "{PERIOD_MS}ms"

[sinks.archive]
kind = "file"
path = "{state}/archive/events.jsonl"

[sources.press1]
kind = "modbus"
endpoint = "tcp://127.0.0.1:{plc_port}"
unit = 1
poll_interval = "20ms"
timeout = "500ms"
# Every poll stored: the test pins down which period each part lands in
# across kills (a counter window moves up to one window of parts into the
# next period's bridged count when the agent is killed; none is lost).
counter_window = "0s"
line = "L1"
machine = "press1"

[[sources.press1.counters]]
signal = "good"
type = "production.completion"
address = "holding:0"
format = "u16"
max_step = 5000
"#,
        state = state.display()
    );
    with_metrics(&text, metrics)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn next_boundary() -> u64 {
    (now_ms() / PERIOD_MS + 1) * PERIOD_MS
}

/// Sleeps until `ms` past the next period boundary.
async fn until_after_boundary(ms: i64) {
    let now = now_ms() as i64;
    let boundary = (now / PERIOD_MS as i64 + 1) * PERIOD_MS as i64;
    let mut at = boundary + ms;
    if at <= now + 300 {
        at += PERIOD_MS as i64;
    }
    tokio::time::sleep(Duration::from_millis((at - now) as u64)).await;
}

/// The PLC's counter, and what the line really made.
struct Line {
    plc: Plc,
    raw: u32,
    made: u64,
}

impl Line {
    /// Parts made: the counter steps up (wrapping at 16 bits).
    fn make(&mut self, parts: u32) {
        self.raw = (self.raw + parts) % 65_536;
        self.made += parts as u64;
        self.plc.mem().holding.insert(0, self.raw as u16);
    }

    /// The PLC restarts its counter: it then holds what it counted since.
    fn reset_to(&mut self, raw: u16) {
        self.raw = raw as u32;
        self.made += raw as u64;
        self.plc.mem().holding.insert(0, raw);
    }

    /// Waits until the agent polled twice more (it has read the counter).
    async fn polled(&self) {
        let reads = self.plc.mem().reads;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.plc.mem().reads < reads + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent stopped polling"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn produce_for(&mut self, how_long: Duration) {
        let end = std::time::Instant::now() + how_long;
        while std::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(40)).await;
            self.make(fastrand::u32(0..250));
        }
    }
}

fn spawn_agent(config: &str) -> std::process::Child {
    common::bin()
        .args(["run", "-c", config])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn")
}

fn period_of(event: &serde_json::Value) -> u64 {
    let time: humantime::Timestamp = event["time"]
        .as_str()
        .expect("time")
        .parse()
        .expect("rfc3339");
    let ms = SystemTime::from(time)
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    ms - ms % PERIOD_MS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_match_the_plc_through_a_wrap_a_reset_and_sigkills_at_the_boundary() {
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 64_000);
    let mut line = Line {
        plc,
        raw: 64_000,
        made: 0,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let metrics = free_port();
    let file = write_config(dir.path(), &config(&state, line.plc.addr.port(), metrics));
    let file = file.to_str().expect("utf8").to_owned();

    let mut agent = spawn_agent(&file);
    // The first reading is the baseline: parts before it are not counted.
    line.polled().await;
    line.polled().await;
    // Across the 16-bit top within the first period.
    line.produce_for(Duration::from_millis(1500)).await;
    // Killed 150 ms before a boundary, started again after it: the parts
    // made while down lie across the boundary.
    // On a loaded machine the kill may come after the boundary: then the
    // agent is started again and the next boundary is tried.
    let boundary = loop {
        until_after_boundary(-150).await;
        let boundary = next_boundary();
        line.polled().await;
        agent.kill().expect("SIGKILL");
        agent.wait().expect("reap");
        if now_ms() < boundary {
            break boundary;
        }
        agent = spawn_agent(&file);
        line.polled().await;
    };
    line.make(777);
    tokio::time::sleep(Duration::from_millis(
        (boundary + 250).saturating_sub(now_ms()),
    ))
    .await;
    line.make(5);
    let mut agent = spawn_agent(&file);
    line.polled().await;
    line.produce_for(Duration::from_millis(1000)).await;
    // A counter reset mid-period.
    line.polled().await;
    line.reset_to(12);
    line.produce_for(Duration::from_millis(800)).await;
    // Killed just after a boundary: the checkpoint may be stored and not
    // yet delivered, or not yet made; either way once, with one id.
    until_after_boundary(15).await;
    agent.kill().expect("SIGKILL");
    agent.wait().expect("reap");
    let mut agent = spawn_agent(&file);
    line.produce_for(Duration::from_millis(1500)).await;
    // The line stops; the period with its last parts closes, and its
    // checkpoint reaches the archive.
    line.polled().await;
    let stopped = now_ms();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !archived_events(&state).iter().any(|e| {
        e["type"] == "production.checkpoint"
            && e["data"]["checkpoint"]["end_ms"].as_u64() > Some(stopped)
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the last period's checkpoint never reached the archive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_metric(
        metrics,
        "plant_edge_sink_backlog_events{sink=\"archive\"}",
        |n| n == 0.0,
    )
    .await;
    // While the agent runs, the report comes from it (its /ledger).
    let live = run_report(&file);
    kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(agent.wait().expect("wait").code(), Some(0));
    assert_eq!(
        live,
        run_report(&file),
        "the running agent reports what its journal holds"
    );

    let mut distinct = Distinct::default();
    for event in archived_events(&state) {
        distinct.add(event);
    }
    let events: Vec<&serde_json::Value> = distinct.by_id.values().collect();
    let mut checkpoints: Vec<&serde_json::Value> = events
        .iter()
        .copied()
        .filter(|e| e["type"] == "production.checkpoint")
        .collect();
    checkpoints.sort_by_key(|c| c["data"]["checkpoint"]["start_ms"].as_u64());
    // Baseline period, the one the first kill spans, the one the second
    // kill opens, the last.
    assert!(
        checkpoints.len() >= 3,
        "a checkpoint per period: {checkpoints:#?}"
    );
    let mut by_period: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e["type"] == "production.completion")
    {
        let entry = by_period.entry(period_of(e)).or_default();
        entry.0 += e["data"]["quantity"].as_u64().expect("count");
        entry.1 += 1;
        assert!(e["journalseq"].as_u64().is_some(), "journal sequence: {e}");
        assert!(
            e["data"]["counter"]["value"].as_u64().is_some(),
            "raw reading: {e}"
        );
    }
    let mut counted_total = 0;
    let (mut cut_short, mut resets) = (0, 0);
    let mut gaps = Vec::new();
    for (k, c) in checkpoints.iter().enumerate() {
        let t = &c["data"]["checkpoint"];
        let start = t["start_ms"].as_u64().expect("start");
        assert_eq!(t["end_ms"].as_u64(), Some(start + PERIOD_MS));
        let counted = t["counters"]["good"]["counted"].as_u64().unwrap_or(0);
        let (sent, n) = by_period.get(&start).copied().unwrap_or_default();
        assert_eq!(c["data"]["quantity"].as_u64(), Some(counted), "{c}");
        assert_eq!(
            counted, sent,
            "period {start}: counted by the PLC vs the events' sum: {c}"
        );
        assert_eq!(t["events"].as_u64(), Some(n), "period {start}: events: {c}");
        if n > 0 {
            assert_eq!(
                t["sent"]["production.completion"].as_f64(),
                Some(sent as f64)
            );
        }
        if let Some(next) = checkpoints.get(k + 1) {
            let u = &next["data"]["checkpoint"];
            assert_eq!(
                u["start_ms"].as_u64(),
                Some(start + PERIOD_MS),
                "periods meet"
            );
            assert_eq!(
                u["counters"]["good"]["start"], t["counters"]["good"]["end"],
                "a period starts at the reading the last one ended with"
            );
        }
        if t["counters"]["good"]["resets"].as_u64().unwrap_or(0) == 0 {
            // No reset: the PLC's own difference, through the wrap.
            let (s, e) = (
                t["counters"]["good"]["start"]["raw"].as_u64().unwrap_or(0),
                t["counters"]["good"]["end"]["raw"].as_u64().unwrap_or(0),
            );
            assert_eq!((e + 65_536 - s) % 65_536, counted, "PLC difference: {c}");
        } else {
            resets += 1;
        }
        if t["cut_short"] == true {
            cut_short += 1;
        }
        if let Some(gap) = t.get("bridged") {
            gaps.push(gap["counted"].as_u64().expect("counted across the gap"));
        }
        counted_total += counted;
    }
    assert_eq!(resets, 1, "one period holds the reset");
    assert!(cut_short >= 1, "the outage across the boundary is said");
    assert!(
        gaps.contains(&782),
        "the parts made while the agent was down across the boundary are said: {gaps:?}"
    );
    let first_period = checkpoints[0]["data"]["checkpoint"]["start_ms"]
        .as_u64()
        .expect("start");
    assert!(
        by_period.keys().all(|p| *p >= first_period),
        "every event lies in a checkpointed period"
    );
    assert_eq!(
        counted_total, line.made,
        "the checkpoints add up to what the line made"
    );
    // One id per period: the crash right after a boundary made no second
    // checkpoint with another id (repeats of the same id are allowed).
    let periods: std::collections::BTreeSet<_> = checkpoints
        .iter()
        .map(|c| c["data"]["checkpoint"]["start_ms"].as_u64())
        .collect();
    assert_eq!(periods.len(), checkpoints.len());

    // `journal report`: per period, counted equals sent, all delivered.
    let rows = run_report(&file);
    let closed: Vec<&serde_json::Value> = rows.iter().filter(|r| !r["counted"].is_null()).collect();
    assert_eq!(closed.len(), checkpoints.len(), "{rows:#?}");
    let mut reported = 0.0;
    for row in &rows {
        assert_eq!(row["pending"], 0.0, "{row}");
        assert_eq!(row["sent"], row["delivered"], "{row}");
        if !row["counted"].is_null() {
            assert_eq!(row["counted"], row["sent"], "{row}");
            reported += row["counted"].as_f64().expect("counted");
        }
    }
    assert_eq!(reported as u64, line.made);

    // `reconcile` against the ERP's bookings: every completion booked once
    // reconciles; one missing and one booked twice are named, exit 1.
    let completions: Vec<&serde_json::Value> = events
        .iter()
        .copied()
        .filter(|e| e["type"] == "production.completion")
        .collect();
    let csv = |rows: &[&serde_json::Value]| {
        let mut text = "Order;ConfirmationText;YieldQuantity\n".to_owned();
        for e in rows {
            text += &format!(
                "4711;{};{}\n",
                e["id"].as_str().expect("id"),
                e["data"]["quantity"]
            );
        }
        text
    };
    let bookings = dir.path().join("bookings.csv");
    std::fs::write(&bookings, csv(&completions)).expect("write");
    let out = reconcile(&file, &bookings);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("reconciled"), "{}", stdout(&out));
    let (missing, doubled) = (completions[3], completions[5]);
    let mut wrong: Vec<&serde_json::Value> = completions
        .iter()
        .copied()
        .filter(|e| e["id"] != missing["id"])
        .collect();
    wrong.push(doubled);
    std::fs::write(&bookings, csv(&wrong)).expect("write");
    let out = reconcile(&file, &bookings);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    let missing_id = missing["id"].as_str().expect("id");
    let doubled_id = doubled["id"].as_str().expect("id");
    assert!(
        text.lines()
            .any(|l| l.starts_with("sent, not booked") && l.contains(missing_id)),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("booked 2 times") && l.contains(doubled_id)),
        "{text}"
    );
}

fn run_report(config: &str) -> Vec<serde_json::Value> {
    let out = common::run(&["journal", "-c", config, "report", "--json"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("report JSON")
}

fn reconcile(config: &str, bookings: &std::path::Path) -> std::process::Output {
    common::run(&[
        "reconcile",
        "-c",
        config,
        "--bookings",
        bookings.to_str().expect("utf8"),
    ])
}
