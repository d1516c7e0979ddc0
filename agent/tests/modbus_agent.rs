//! The agent with a Modbus source against a simulated PLC (a real Modbus
//! TCP server in this test process), and the `probe` command.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plant_edge_tests::plc::Plc;

fn modbus_config(state: &std::path::Path, port: u16) -> String {
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
unit = 1
poll_interval = "20ms"
timeout = "500ms"
line = "L1"
machine = "press1"

[[sources.press1.counters]]
signal = "good"
type = "production.completion"
address = "holding:0"
format = "u16"
max_step = 5000

[[sources.press1.counters]]
signal = "scrap"
type = "production.scrap"
address = "holding:2"
format = "u32"
"#,
        state = state.display()
    )
}

async fn run_async(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || common::bin().args(&args).output().expect("run"))
        .await
        .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_prints_values_and_says_why_it_cannot_read() {
    let plc = Plc::start().await;
    {
        let mut m = plc.mem();
        m.holding.insert(0, 7);
        m.set_u32(2, 100_000);
        m.set_string(10, 3, "WO-7");
        m.refuse_holding.push(50..60);
    }
    let target = format!("tcp://{}", plc.addr);
    let out = run_async(vec![
        "probe".into(),
        "modbus".into(),
        target.clone(),
        "--read".into(),
        "holding:0..1".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "holding:0 = 7 (0x0007)");
    let out = run_async(vec![
        "probe".into(),
        "modbus".into(),
        target.clone(),
        "--read".into(),
        "holding:2..4".into(),
        "--as".into(),
        "u32".into(),
    ])
    .await;
    assert!(
        stdout(&out).contains("holding:2 = 100000"),
        "{}",
        stdout(&out)
    );
    let out = run_async(vec![
        "probe".into(),
        "modbus".into(),
        target.clone(),
        "--read".into(),
        "holding:10..13".into(),
        "--as".into(),
        "string".into(),
    ])
    .await;
    assert!(stdout(&out).contains("= WO-7"), "{}", stdout(&out));
    let out = run_async(vec![
        "probe".into(),
        "modbus".into(),
        target,
        "--read".into(),
        "holding:50..52".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("IllegalDataAddress"),
        "{}",
        stderr(&out)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let out = run_async(vec![
        "probe".into(),
        "modbus".into(),
        format!("tcp://{closed}"),
        "--read".into(),
        "holding:0".into(),
    ])
    .await;
    assert!(
        stderr(&out).contains("connection refused"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_counts_parts_made_while_it_was_down_exactly_once() {
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 64_000);
    plc.mem().set_u32(2, 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let port = free_port();
    let text = with_metrics(&modbus_config(&state, plc.addr.port()), port);
    let file = write_config(dir.path(), &text);
    let config = file.to_str().expect("utf8").to_owned();
    let (mut good, mut scrap) = (64_000u32, 10u32);
    let (mut made_good, mut made_scrap) = (0u64, 0u64);
    for round in 0..6 {
        let mut child = common::bin()
            .args(["run", "-c", &config])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        if round == 0 {
            // Parts made before the agent first saw the counter are not its
            // to count (the first reading is the baseline): wait for it.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while plc.mem().reads < 3 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the agent never polled the PLC"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // The line produces while the agent runs (16-bit counter wraps)...
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(20..80))).await;
            let step = fastrand::u32(0..300);
            good = (good + step) % 65_536;
            made_good += step as u64;
            scrap += 1;
            made_scrap += 1;
            plc.mem().holding.insert(0, good as u16);
            plc.mem().set_u32(2, scrap);
        }
        if round == 5 {
            // Let the agent poll the final values before the graceful stop.
            let reads = plc.mem().reads;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while plc.mem().reads < reads + 6 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the agent stopped polling"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The source's own counters, under its kind's family.
            wait_for_metric(
                port,
                "plant_edge_modbus_source_up{source=\"press1\"}",
                |up| up == 1.0,
            )
            .await;
            wait_for_metric(
                port,
                "plant_edge_modbus_source{source=\"press1\",kind=\"polls\"}",
                |polls| polls > 0.0,
            )
            .await;
            kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
            assert_eq!(child.wait().expect("wait").code(), Some(0));
        } else {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            // ...and while it is down.
            let step = fastrand::u32(0..300);
            good = (good + step) % 65_536;
            made_good += step as u64;
            plc.mem().holding.insert(0, good as u16);
        }
    }
    let mut distinct = Distinct::default();
    for event in archived_events(&state) {
        distinct.add(event);
    }
    distinct.add_pending(&state);
    let sum = |t: &str| -> u64 {
        distinct
            .by_id
            .values()
            .filter(|e| e["type"] == t)
            .map(|e| e["data"]["quantity"].as_u64().expect("quantity"))
            .sum()
    };
    assert!(
        distinct
            .by_id
            .values()
            .all(|e| e["data"]["counter"]["epoch"] == 0),
        "no restart may look like a reset"
    );
    assert_eq!(
        sum("production.completion"),
        made_good,
        "good parts: counted once each, across wraps and restarts"
    );
    assert_eq!(sum("production.scrap"), made_scrap, "scrap parts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plc_too_slow_for_the_schedule_is_said_once_and_shown_configured_vs_achieved() {
    let plc = Plc::start().await;
    // Every request takes the PLC 60 ms: a 20 ms schedule cannot be kept.
    plc.mem().reaction = Duration::from_millis(60);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let port = free_port();
    let text = with_metrics(&modbus_config(&state, plc.addr.port()), port);
    let file = write_config(dir.path(), &text);
    let log_path = dir.path().join("agent.log");
    let mut child = common::bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn");
    // The device compares wanted and achieved polls every 10 s; the
    // achieved interval is published every 5 s.
    wait_for_metric(
        port,
        "plant_edge_modbus_source{source=\"press1\",kind=\"overruns\"}",
        |n| n >= 10.0,
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let status = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some((200, body)) = get(port, "/status").await {
            let status: serde_json::Value = serde_json::from_str(&body).expect("json");
            if log.contains("cannot keep up")
                && status["sources"][0]["schedule"]["achieved_ms"].is_number()
            {
                break status;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no schedule figures or no log line:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let schedule = &status["sources"][0]["schedule"];
    assert_eq!(schedule["configured_ms"], 20, "{schedule}");
    let achieved = schedule["achieved_ms"].as_f64().expect("achieved");
    assert!(
        achieved >= 50.0,
        "achieved {achieved} ms against 20 configured"
    );
    let (_, metrics) = get(port, "/metrics").await.expect("metrics");
    assert_eq!(
        metric(
            &metrics,
            "plant_edge_source_poll_interval_configured_seconds{source=\"press1\"}"
        ),
        Some(0.02),
        "{metrics}"
    );
    let polls = metric(
        &metrics,
        "plant_edge_source_poll_interval_seconds_count{source=\"press1\"}",
    )
    .expect("histogram count");
    let within_25ms = metric(
        &metrics,
        "plant_edge_source_poll_interval_seconds_bucket{le=\"0.025\",source=\"press1\"}",
    )
    .unwrap_or_else(|| panic!("no 25 ms bucket:\n{metrics}"));
    assert!(
        polls > 0.0 && within_25ms < polls / 10.0,
        "{polls} polls, {within_25ms} within 25 ms"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let log = std::fs::read_to_string(&log_path).expect("log");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot keep up"))
        .collect();
    assert_eq!(lines.len(), 1, "one line, not one per tick:\n{log}");
    assert!(lines[0].contains("want 50 polls/s"), "{}", lines[0]);
}

/// Runs the agent against a PLC port nobody listens on until its log
/// holds a warning; returns the log.
async fn log_of_unreachable_plc(journal_stream: bool) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let closed = free_port();
    let text = with_metrics(&modbus_config(&state, closed), free_port());
    let file = write_config(dir.path(), &text);
    let log_path = dir.path().join("agent.log");
    let mut command = common::bin();
    command
        .args(["run", "-c", file.to_str().expect("utf8")])
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stderr(std::fs::File::create(&log_path).expect("log"));
    if journal_stream {
        command.env("JOURNAL_STREAM", "8:12345");
    }
    let mut child = command.spawn().expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("PLC UNREACHABLE") {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no warning logged:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    child.wait().expect("wait");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_each_line_carries_its_priority_and_no_second_timestamp() {
    let log = log_of_unreachable_plc(true).await;
    let warning = log
        .lines()
        .find(|l| l.contains("PLC UNREACHABLE"))
        .expect("the warning");
    assert!(
        warning.starts_with("<4>"),
        "a warning is priority 4: {warning}"
    );
    assert!(
        log.lines().any(|l| l.starts_with("<6>")),
        "info lines are priority 6:\n{log}"
    );
    assert!(
        log.lines().all(|l| l.starts_with('<')
            && !l
                .get(3..)
                .unwrap_or_default()
                .trim_start()
                .starts_with("20")),
        "every line has a priority and no time of its own:\n{log}"
    );
    // Without journald: the time stays, no priority prefix.
    let plain = log_of_unreachable_plc(false).await;
    assert!(
        plain
            .lines()
            .all(|l| !l.starts_with('<') && l.trim_start().starts_with("20")),
        "no prefixes outside journald, and the time first:\n{plain}"
    );
}
