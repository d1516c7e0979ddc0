//! The agent with an HTTPS sink to a simulated ERP (real TLS), through the
//! real forwarder: failures and a kill lose no part.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plant_edge_tests::erp::{Erp, Scripted};

/// Waits until the ERP has recorded at least `n` events.
async fn wait_for_posted(erp: &Erp, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while erp.state.posted.lock().expect("posted").len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the ERP never received {n} events"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the agent with a simulated line and `erp` as its HTTPS sink (fast
/// retries), stderr to a log file: (metrics port, log path, process).
fn run_logged_against(
    erp: &Erp,
    ca: &std::path::Path,
    dir: &std::path::Path,
) -> (u16, std::path::PathBuf, std::process::Child) {
    let state = dir.join("state");
    let port = free_port();
    let sink = format!(
        "[sinks.erp]\nkind = \"https\"\nurl = \"{}\"\nca_file = \"{}\"\n\n[forwarder]\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n",
        erp.url(),
        ca.display()
    );
    let text = with_metrics(&pipeline_config_with_sinks(&state, "20ms", &sink), port);
    let file = write_config(dir, &text);
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .env_remove("RUST_LOG")
        .stderr(log)
        .spawn()
        .expect("spawn");
    (port, log_path, child)
}

/// Waits until the distinct events the ERP took carry more than `parts`
/// parts: a count of posts would also count events sent again after a
/// kill, and how many parts an event carries depends on the commit window.
async fn wait_for_parts(erp: &Erp, parts: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let taken: std::collections::HashMap<String, u64> = erp
            .state
            .events
            .lock()
            .expect("events")
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap_or_default().to_owned(),
                    e["data"]["quantity"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        if taken.values().sum::<u64>() > parts {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ERP never received {parts} parts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_posts_every_part_to_the_erp_through_failures_and_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = plant_edge_tests::pki::generate(dir.path(), "erp");
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    erp.state.script.lock().expect("script").extend([
        Scripted::Status(503),
        Scripted::TooManyRequests(1),
        Scripted::Status(500),
    ]);
    let state = dir.path().join("state");
    let sink = format!(
        "[sinks.erp]\nkind = \"https\"\nurl = \"{}\"\nca_file = \"{}\"\nbatch_events = 50\ngzip = true\n\n[forwarder]\nretry_initial = \"100ms\"\nretry_max = \"1s\"\n",
        erp.url(),
        pki.ca.display()
    );
    let file = write_config(
        dir.path(),
        &pipeline_config_with_sinks(&state, "10ms", &sink),
    );
    let config = file.to_str().expect("utf8").to_owned();
    let mut child = bin()
        .args(["run", "-c", &config])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Kill once the ERP has taken some events (past the scripted failures).
    wait_for_posted(&erp, 20).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let mut child = bin()
        .args(["run", "-c", &config])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let before = erp.state.posted.lock().expect("posted").len();
    wait_for_posted(&erp, before + 20).await;
    // Enough for the progress check below, whatever the kill resent.
    wait_for_parts(&erp, 150).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));

    let mut jc = buffer::JournalConfig::new(state.join("journal"));
    jc.lock_wait = Duration::from_secs(5);
    let journal = buffer::Journal::open(jc).expect("journal");
    // What the ERP confirmed plus what the journal still owes hold every
    // part: each counter chain unbroken up to the stored cursor.
    let mut distinct = Distinct::default();
    let posted = erp.state.events.lock().expect("events").clone();
    assert!(
        posted.len() > 50,
        "the ERP received events ({})",
        posted.len()
    );
    for event in posted {
        distinct.add(event);
    }
    journal
        .scan_events(0, |e| {
            distinct.add(serde_json::from_slice(&e.payload).expect("json"));
            true
        })
        .expect("scan");
    let parts = check_counter_chains(&distinct.by_id, &journal);
    assert!(parts > 100, "progress ({parts} parts)");
    assert!(
        journal.dead_letters().expect("dead").is_empty(),
        "failures were transient: no dead letters"
    );
    assert!(
        *erp.state.requests.lock().expect("requests") > 3,
        "the scripted failures were met and retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_credentials_hold_the_backlog_fail_readiness_and_resume_when_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = plant_edge_tests::pki::generate(dir.path(), "erp");
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    *erp.state.refuse_all.lock().expect("state") = Some(403);
    let state = dir.path().join("state");
    let port = free_port();
    let sink = format!(
        "[sinks.erp]\nkind = \"https\"\nurl = \"{}\"\nca_file = \"{}\"\n\n[forwarder]\nretry_initial = \"50ms\"\nretry_max = \"300ms\"\nmax_attempts = 3\n",
        erp.url(),
        pki.ca.display()
    );
    let text = with_metrics(&pipeline_config_with_sinks(&state, "20ms", &sink), port);
    let file = write_config(dir.path(), &text);
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let why = wait_for_answer(port, "/readyz", 503, "sink erp held").await;
    assert!(why.contains("HTTP 403"), "readiness says why: {why}");
    let metrics = wait_for_answer(port, "/metrics", 200, "plant_edge_sink_held").await;
    assert!(
        metrics.contains("plant_edge_sink_held{sink=\"erp\"} 1"),
        "{metrics}"
    );
    let status = wait_for_answer(port, "/status", 200, "holding").await;
    assert!(status.contains("HTTP 403"), "{status}");
    // Far past max_attempts (3): still nothing dead-lettered.
    wait_for_metric(port, "plant_edge_sink_retries{sink=\"erp\"}", |n| n >= 10.0).await;
    let (_, metrics) = get(port, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("plant_edge_journal_rejected_total 0"),
        "nothing dead-lettered while held"
    );
    // Credentials fixed: the backlog drains and the agent is ready again.
    *erp.state.refuse_all.lock().expect("state") = None;
    wait_for_answer(port, "/readyz", 200, "ready").await;
    wait_for_posted(&erp, 20).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let mut jc = buffer::JournalConfig::new(state.join("journal"));
    jc.lock_wait = Duration::from_secs(5);
    let journal = buffer::Journal::open(jc).expect("journal");
    assert!(journal.dead_letters().expect("dead").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_missing_from_the_config_keeps_its_backlog_until_it_is_retired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let port = free_port();
    // The ERP link is down: its events pile up in the journal.
    let two = format!(
        "[sinks.archive]\nkind = \"file\"\npath = \"{s}/archive/events.jsonl\"\n\n[sinks.erp]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nport = {closed}\n",
        s = state.display(),
        closed = free_port()
    );
    let metrics = format!("shutdown_timeout = \"5s\"\nmetrics_listen = \"127.0.0.1:{port}\"");
    let file = write_config(
        dir.path(),
        &pipeline_config_with_sinks(&state, "20ms", &two)
            .replace("shutdown_timeout = \"5s\"", &metrics),
    );
    let config = file.to_str().expect("utf8").to_owned();
    let mut child = bin()
        .args(["run", "-c", &config])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for_metric(port, "plant_edge_sink_backlog_events{sink=\"erp\"}", |n| {
        n > 0.0
    })
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    // A typo renames the sink: the old name's events must not be lost.
    let typo = two.replace("[sinks.erp]", "[sinks.epr]");
    write_config(
        dir.path(),
        &pipeline_config_with_sinks(&state, "20ms", &typo)
            .replace("shutdown_timeout = \"5s\"", &metrics),
    );
    let mut child = bin()
        .args(["run", "-c", &config])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let why = wait_for_answer(port, "/readyz", 503, "sink erp is not in the configuration").await;
    assert!(
        why.contains("journal sinks retire erp"),
        "says what to do: {why}"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let out = run(&[
        "journal",
        "--state",
        state.to_str().expect("utf8"),
        "stats",
        "--json",
    ]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        stats["dead_letters"], 0,
        "nothing dead-lettered by the typo"
    );
    let backlog = stats["sinks"]
        .as_array()
        .expect("sinks")
        .iter()
        .find(|s| s["name"] == "erp")
        .and_then(|s| s["backlog"].as_u64())
        .expect("erp still registered");
    assert!(backlog > 0, "its backlog is kept");
    let list = run(&[
        "journal",
        "--state",
        state.to_str().expect("utf8"),
        "sinks",
        "list",
    ]);
    assert!(stdout(&list).contains("erp\t"), "{}", stdout(&list));
    // Retired on purpose: now its undelivered events are dead letters.
    let retire = run(&[
        "journal",
        "--state",
        state.to_str().expect("utf8"),
        "sinks",
        "retire",
        "erp",
    ]);
    assert!(retire.status.success(), "{}", stderr(&retire));
    assert!(
        stdout(&retire).contains("sink erp retired"),
        "{}",
        stdout(&retire)
    );
    let out = run(&[
        "journal",
        "--state",
        state.to_str().expect("utf8"),
        "stats",
        "--json",
    ]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // The backlog counts sequences; those routed to erp become dead letters.
    let dead = stats["dead_letters"].as_u64().expect("dead letters");
    assert!(
        dead > 0 && dead <= backlog,
        "retired: its events are in the dead letters ({dead} of {backlog})"
    );
    let list = run(&[
        "journal",
        "--state",
        state.to_str().expect("utf8"),
        "sinks",
        "list",
    ]);
    assert!(!stdout(&list).contains("erp\t"), "{}", stdout(&list));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erp_outage_is_one_log_line_when_it_starts_and_one_when_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = plant_edge_tests::pki::generate(dir.path(), "erp");
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    // 503: the ERP is down for maintenance (retried, not held).
    *erp.state.refuse_all.lock().expect("state") = Some(503);
    let (port, log_path, mut child) = run_logged_against(&erp, &pki.ca, dir.path());
    // Many retries during the outage...
    wait_for_metric(port, "plant_edge_sink_retries{sink=\"erp\"}", |n| n >= 10.0).await;
    // ...then the ERP is back and the backlog drains.
    *erp.state.refuse_all.lock().expect("state") = None;
    wait_for_posted(&erp, 20).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let log = std::fs::read_to_string(&log_path).expect("log");
    let count = |text: &str| log.lines().filter(|l| l.contains(text)).count();
    assert_eq!(count("SINK DOWN"), 1, "one line when it starts:\n{log}");
    assert_eq!(count("sink back"), 1, "one line when it ends:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("sink back") && l.contains("after=")),
        "the recovery says how long it lasted:\n{log}"
    );
    assert_eq!(
        count("delivery failed"),
        0,
        "not one line per retry:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_failed_deliveries_followed_by_success_are_counted_not_logged_as_an_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = plant_edge_tests::pki::generate(dir.path(), "erp");
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    let (port, log_path, mut child) = run_logged_against(&erp, &pki.ca, dir.path());
    wait_for_posted(&erp, 5).await;
    // An ERP that drops a request now and then (one 503, then fine).
    for _ in 0..10 {
        erp.state
            .script
            .lock()
            .expect("script")
            .push_back(Scripted::Status(503));
        // Answered, then a delivery goes through before the next failure.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !erp.state.script.lock().expect("script").is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the 503 was never asked for"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let posted = erp.state.posted.lock().expect("posted").len();
        wait_for_posted(&erp, posted + 1).await;
    }
    let retries =
        wait_for_metric(port, "plant_edge_sink_retries{sink=\"erp\"}", |n| n >= 5.0).await;
    let posted = erp.state.posted.lock().expect("posted").len();
    wait_for_posted(&erp, posted + 5).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let log = std::fs::read_to_string(&log_path).expect("log");
    let count = |text: &str| log.lines().filter(|l| l.contains(text)).count();
    assert_eq!(
        count("SINK DOWN"),
        0,
        "{retries} single failures are no outage:\n{log}"
    );
    assert_eq!(count("sink back"), 0, "nor is their end:\n{log}");
}
