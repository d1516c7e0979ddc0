//! The agent with the shipped ERP examples against simulated ERPs (real
//! TLS): a queued D365 message is accepted-pending, visible in `/status`
//! and in metrics, until the ERP's batch job processes it (then delivered,
//! or a dead letter with D365's message); SAP, which does not deduplicate,
//! books nothing twice across SIGKILLs of the agent.

mod common;

use common::*;
use plant_edge_tests::erp_apis::ErpApis;
use plant_edge_tests::erp_events::{completion, journal_of};

/// The journal the agent will open, holding `orders.len()` completions for
/// `sink` (as a source would have appended them); their ids in order.
fn prefill(state: &std::path::Path, sink: &str, orders: &[&str]) -> Vec<String> {
    let events = orders
        .iter()
        .enumerate()
        .map(|(i, order)| completion(uuid::Uuid::new_v4(), order, i as u64 + 1, i as u64 + 1))
        .collect();
    let (journal, ids) = journal_of(state, sink, events);
    journal.close().expect("close");
    ids
}

/// One sink's part of a `/status` answer.
fn sink_status(status: &str, name: &str) -> serde_json::Value {
    let status: serde_json::Value = serde_json::from_str(status).expect("status JSON");
    status["sinks"]
        .as_array()
        .expect("sinks")
        .iter()
        .find(|s| s["sink"] == name)
        .unwrap_or_else(|| panic!("sink {name} in {status}"))
        .clone()
}

/// The agent process, killed when the test ends however it ends.
struct Stopped(std::process::Child);

impl Stopped {
    /// SIGTERM, as systemd stops it: the agent records what it did.
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_d365_message_shows_as_accepted_pending_until_the_erp_books_or_fails_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = plant_edge_tests::pki::generate(dir.path(), "erp");
    let apis = ErpApis::start(&pki.server_cert, &pki.server_key).await;
    apis.state
        .closed_orders
        .lock()
        .expect("state")
        .insert("1000999".into());
    let state = dir.path().join("state");
    let ids = prefill(&state, "d365", &["1000123", "1000999", "1000123"]);
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/examples/dynamics365-report-finished.toml"),
    )
    .expect("example");
    let secret = dir.path().join("d365-secret");
    std::fs::write(&secret, "s3cret\n").expect("secret");
    let port = free_port();
    // The example as an integrator fills it in: its hosts, CA, secret;
    // the PLC source is not reachable here and does not need to be.
    let text = example
        .replace("https://contoso.operations.dynamics.com", &apis.base())
        .replace(
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token",
            &format!(
                "{}{}",
                apis.base(),
                plant_edge_tests::erp_apis::paths::TOKEN
            ),
        )
        .replace("/etc/plant-edge/d365-ca.pem", &pki.ca.display().to_string())
        .replace(
            "\"d365-secret\"",
            &format!("{:?}", secret.display().to_string()),
        )
        .replace("/var/lib/plant-edge", &state.display().to_string())
        .replace("poll_every = \"10s\"", "poll_every = \"200ms\"")
        .replace("192.168.10.20:502", &format!("127.0.0.1:{}", free_port()));
    let text = text.replacen(
        "[agent]\n",
        &format!("[agent]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
        1,
    );
    let file = write_config(dir.path(), &text);
    let mut agent = Stopped(
        bin()
            .args(["run", "-c", file.to_str().expect("utf8")])
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(dir.path().join("agent.log")).expect("log"))
            .spawn()
            .expect("spawn"),
    );
    let status = wait_for_answer(port, "/status", 200, "\"accepted_pending\":{").await;
    let sink = sink_status(&status, "d365");
    assert_eq!(sink["accepted_pending"]["events"], 3, "{sink}");
    assert_eq!(sink["backlog"], 3, "kept in the journal: {sink}");
    assert_eq!(sink["delivered"], 0, "queued is not booked: {sink}");
    wait_for_metric(
        port,
        "plant_edge_sink_accepted_pending_events{sink=\"d365\"}",
        |v| v == 3.0,
    )
    .await;
    assert!(apis.state.booked_keys().is_empty());
    assert_eq!(apis.state.d365_queued(), 3);
    // The ERP's batch job runs: two booked, one failed (closed order).
    apis.state.process_d365_queue();
    wait_for_metric(port, "plant_edge_sink_backlog_events{sink=\"d365\"}", |v| {
        v == 0.0
    })
    .await;
    wait_for_metric(
        port,
        "plant_edge_sink_accepted_pending_events{sink=\"d365\"}",
        |v| v == 0.0,
    )
    .await;
    let status = wait_for_answer(port, "/status", 200, "\"sink\":\"d365\"").await;
    let sink = sink_status(&status, "d365");
    assert_eq!(sink["delivered"], 2, "{sink}");
    assert_eq!(sink["rejected"], 1, "{sink}");
    assert!(sink["accepted_pending"].is_null(), "{sink}");
    assert_eq!(
        apis.state.booked_keys(),
        vec![ids[0].clone(), ids[2].clone()]
    );
    agent.stop();
    let out = run(&[
        "journal",
        "--state",
        state.to_str().expect("utf8"),
        "dead-letters",
        "list",
    ]);
    let listed = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        listed.contains(&ids[1]) && listed.contains("Production order 1000999 has status Ended"),
        "the dead letter carries D365's message: {listed}"
    );
}

/// A shipped example as an integrator fills it in: the simulator's host
/// for `host`, its CA, secrets in files, the state directory; the PLC
/// source points at a closed port (it need not be reachable).
fn filled_in(name: &str, host: &str, apis: &ErpApis, dir: &std::path::Path, port: u16) -> String {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/examples")
            .join(name),
    )
    .expect("example");
    let pki_ca = dir.join("ca.pem");
    let mut out = String::new();
    for line in example.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        let line = match key {
            "password_file" | "client_secret_file" => {
                let file = dir.join(key);
                std::fs::write(&file, "secret\n").expect("secret");
                format!("{key} = {:?}", file.display().to_string())
            }
            "ca_file" => format!("ca_file = {:?}", pki_ca.display().to_string()),
            "state_dir" => format!("state_dir = {:?}", dir.join("state").display().to_string()),
            _ => line.replace(host, &apis.base()),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.replace("192.168.10.20:502", &format!("127.0.0.1:{}", free_port()))
        .replacen(
            "[agent]\n",
            &format!("[agent]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
            1,
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sap_books_every_confirmation_once_across_sigkills_of_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = plant_edge_tests::pki::generate(dir.path(), "erp");
    std::fs::copy(&pki.ca, dir.path().join("ca.pem")).expect("ca");
    let apis = ErpApis::start(&pki.server_cert, &pki.server_key).await;
    let state = dir.path().join("state");
    let ids = prefill(&state, "sap", &["1000123"; 300]);
    let port = free_port();
    let text = filled_in(
        "sap-s4hana-confirmation.toml",
        "https://s4.example.com:44300",
        &apis,
        dir.path(),
        port,
    );
    let file = write_config(dir.path(), &text);
    let spawn = || {
        bin()
            .args(["run", "-c", file.to_str().expect("utf8")])
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn")
    };
    for round in 1..=3 {
        let mut agent = spawn();
        // Killed while confirmations are being posted, some acknowledged in
        // memory only.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while apis.state.booked_keys().len() < round * 60 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no progress"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let _ = agent.kill();
        let _ = agent.wait();
    }
    let _agent = Stopped(spawn());
    wait_for_metric(port, "plant_edge_sink_backlog_events{sink=\"sap\"}", |v| {
        v == 0.0
    })
    .await;
    assert_eq!(
        apis.state.double_bookings(),
        Vec::<String>::new(),
        "SAP booked a confirmation twice"
    );
    assert_eq!(
        apis.state.booked_keys(),
        ids,
        "every confirmation once, in order"
    );
    assert!(
        *apis.state.lookups.lock().expect("state") >= 4,
        "each start asked SAP first"
    );
}
