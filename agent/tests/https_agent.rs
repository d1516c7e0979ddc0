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
