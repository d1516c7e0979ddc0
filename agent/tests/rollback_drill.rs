//! The rollback drill: an update framework boots a newer image, falls back
//! to the previous one, and boots the newer one again, while a line makes
//! parts and hands over completion records, and the cloud broker is down
//! until the end. Each run ends with a SIGKILL (a crash anywhere).
//!
//! The "previous image" is this binary with `PLANT_EDGE_TEST_JOURNAL_FORMAT=1`
//! (buffer's `test-format` feature, on in test builds only): it writes
//! journal format 1 (chunks inline in sled) and cannot read this build's
//! format 2 (chunk bytes in segment files), which the "newer image", this
//! binary as it is, writes. Reconciled at the end
//! against what the PLC itself saw: every part counted once, every record
//! the PLC saw acknowledged stored once, everything delivered to the
//! broker, repeats only with the same id, nothing quarantined.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plant_edge_tests::mosquitto::{subscribe_all, Broker, BrokerOptions};
use plant_edge_tests::plc::Plc;
use plant_edge_tests::plc_line::{self, handshake_idle, Line};

const NEWER: &str = "PLANT_EDGE_TEST_JOURNAL_FORMAT";

fn config(state: &Path, plc_port: u16, broker_port: u16) -> String {
    format!(
        r#"[agent]
site = "p1"
gateway = "gw"
state_dir = "{state}"
shutdown_timeout = "5s"

[sinks.archive]
kind = "file"
path = "{state}/archive/events.jsonl"

[sinks.cloud]
kind = "mqtt"
host = "127.0.0.1"
port = {broker_port}

{source}"#,
        state = state.display(),
        source = plc_line::source_config("press1", &format!("tcp://127.0.0.1:{plc_port}"), "10ms"),
    )
}

/// Starts `run` on `config`, as the newer build (this one, journal format
/// 2) or as the previous one (format 1).
fn spawn_agent(config: &str, newer: bool) -> std::process::Child {
    let mut command = bin();
    command
        .args(["run", "-c", config])
        .stderr(std::process::Stdio::null());
    if newer {
        command.env_remove(NEWER);
    } else {
        command.env(NEWER, "1");
    }
    command.spawn().expect("spawn agent")
}

fn format_of(journal: &Path) -> u32 {
    buffer::journal::format::read(journal)
        .expect("stamp readable")
        .expect("stamped")
        .format
}

/// The state directory's entries beside the journal (kept, rolled back,
/// moved aside).
fn journal_dirs(state: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state)
        .expect("state dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("journal"))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_rollback_and_upgrade_again_lose_and_double_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let journal = state.join("journal");
    let plc = Arc::new(Plc::start().await);
    let line = Arc::new(Line::default());
    let program = tokio::spawn(plc_line::program(
        plc.clone(),
        line.clone(),
        Duration::from_millis(2),
    ));
    // The broker's subscriber has a persistent session: what the agent
    // publishes after the broker comes back reaches it.
    let mut broker = Broker::start(BrokerOptions::default());
    let received = subscribe_all(broker.port, "erp");
    broker.stop();
    let file = write_config(dir.path(), &config(&state, plc.addr.port(), broker.port));
    let config = file.to_str().expect("utf8").to_owned();
    let spawn = |newer: bool| spawn_agent(&config, newer);
    /// Runs with the line producing, then holds the PLC's records back so
    /// that the kill finds records waiting for their handshake.
    async fn run_then_kill(mut child: std::process::Child, plc: &Plc, line: &Line) {
        plc_line::polled(plc, 30, Duration::from_secs(30)).await;
        line.run(true);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        line.presenting.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while line.queued.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no record queued at the PLC");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..200))).await;
        assert!(
            child.try_wait().expect("poll").is_none(),
            "the agent must still be running when killed"
        );
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        line.producing.store(false, Ordering::SeqCst);
    }

    // 1. The current version builds a backlog (broker down).
    run_then_kill(spawn(false), &plc, &line).await;
    assert_eq!(format_of(&journal), 1);

    // 2. The newer image: migrates, keeps the old journal, runs, crashes.
    run_then_kill(spawn(true), &plc, &line).await;
    assert_eq!(
        format_of(&journal),
        2,
        "the newer version migrated the journal"
    );
    assert_eq!(
        journal_dirs(&state),
        ["journal", "journal.format-1"],
        "the old journal is kept until the upgrade is committed"
    );

    // 3. The update framework falls back to the previous image.
    run_then_kill(spawn(false), &plc, &line).await;
    assert_eq!(format_of(&journal), 1, "rolled back to the kept journal");
    assert_eq!(journal_dirs(&state), ["journal"]);

    // 4. The newer image again; the broker is back; the line finishes.
    broker.restart();
    let child = spawn(true);
    plc_line::polled(&plc, 30, Duration::from_secs(30)).await;
    line.presenting.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while line.queued.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "the record queue never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handshake_idle(&plc, Duration::from_secs(20)).await;
    plc_line::polled(&plc, 30, Duration::from_secs(20)).await;
    // Everything the archive holds reaches the broker too.
    let cloud_ids = || -> std::collections::BTreeSet<String> {
        received
            .lock()
            .expect("received")
            .iter()
            .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect()
    };
    let archive_ids = || -> std::collections::BTreeSet<String> {
        archived_events(&state)
            .iter()
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (cloud, archive) = (cloud_ids(), archive_ids());
        if !archive.is_empty() && cloud == archive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broker got {} of the {} archived events",
            cloud.intersection(&archive).count(),
            archive.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let mut child = child;
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    program.abort();
    assert_eq!(journal_dirs(&state), ["journal", "journal.format-1"]);

    // Reconciled against the PLC, from what the broker received.
    let mut distinct = Distinct::default();
    for message in received.lock().expect("received").iter() {
        if let Ok(event) = serde_json::from_slice::<serde_json::Value>(&message.payload) {
            if event["id"].is_string() {
                distinct.add(event);
            }
        }
    }
    // The archive got everything too; the previous version sent again what
    // the newer one had delivered before the rollback, with the same ids.
    let mut archive = Distinct::default();
    for event in archived_events(&state) {
        archive.add(event);
    }
    assert_eq!(
        archive.by_id.keys().collect::<Vec<_>>(),
        distinct.by_id.keys().collect::<Vec<_>>()
    );
    let (parts, records, record_quantity) = plc_line::tally(distinct.by_id.values());
    let made = line.made.load(Ordering::SeqCst);
    let acked = line.acked.load(Ordering::SeqCst);
    eprintln!(
        "drill: {made} parts made, {parts} delivered; {acked} records acknowledged, {records} delivered; repeated deliveries (same id): broker {}, archive {}",
        distinct.repeated, archive.repeated
    );
    assert!(acked >= 3, "records flowed ({acked})");
    assert_eq!(parts, made, "every part counted once");
    assert_eq!(records, acked, "every acknowledged record delivered once");
    assert_eq!(
        record_quantity,
        line.acked_quantity.load(Ordering::SeqCst),
        "with the quantities the PLC handed over"
    );

    // The newer journal: nothing quarantined, nothing dead, nothing owed.
    std::env::remove_var(NEWER);
    let mut jc = buffer::JournalConfig::new(&journal);
    jc.lock_wait = Duration::from_secs(5);
    let opened = buffer::Journal::open(jc).expect("journal reopens");
    let stats = opened.stats();
    assert_eq!(stats.counters.quarantined, 0);
    assert!(opened.dead_letters().expect("dead letters").is_empty());
    assert_eq!(stats.pending_events, 0, "nothing stranded");
    opened.close().expect("close");
    drop(opened);

    // Committed: the previous version now refuses the journal (exit 65,
    // nothing changed) instead of rolling back.
    let out = bin()
        .args([
            "journal",
            "--state",
            state.to_str().expect("utf8"),
            "commit-upgrade",
        ])
        .output()
        .expect("commit-upgrade");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("upgrade committed"),
        "{}",
        stdout(&out)
    );
    assert_eq!(journal_dirs(&state), ["journal"]);
    let out = bin()
        .args(["run", "-c", &config])
        .env(NEWER, "1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert_eq!(format_of(&journal), 2);
}

#[test]
fn an_upgrade_commits_itself_after_its_grace_period_once_the_new_version_delivers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let journal = state.join("journal");
    let text = format!(
        "{}\n[journal]\nupgrade_grace = \"2s\"\n",
        pipeline_config(&state, "50ms")
    );
    let file = write_config(dir.path(), &text);
    let config = file.to_str().expect("utf8").to_owned();
    let run = |newer: bool| spawn_agent(&config, newer);
    let stop = |child: std::process::Child| {
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        let mut child = child;
        assert_eq!(child.wait().expect("wait").code(), Some(0));
    };
    let child = run(false);
    wait_for("archived events", Duration::from_secs(20), || {
        archived_events(&state).len() >= 10
    });
    stop(child);

    let child = run(true);
    wait_for("the upgrade", Duration::from_secs(20), || {
        journal.join("UPGRADE").exists() && state.join("journal.format-1").exists()
    });
    let archived = archived_events(&state).len();
    // Not before its grace period.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        journal.join("UPGRADE").exists(),
        "committed before the grace period"
    );
    wait_for(
        "the upgrade to commit itself",
        Duration::from_secs(30),
        || !journal.join("UPGRADE").exists(),
    );
    assert_eq!(
        journal_dirs(&state),
        ["journal"],
        "the kept journal is gone"
    );
    assert!(
        archived_events(&state).len() > archived,
        "it delivered meanwhile"
    );
    stop(child);
    assert_eq!(format_of(&journal), 2);
}
