//! The agent with an OPC UA source against a simulated MES (a real OPC UA
//! server in this test process): handshake records survive SIGKILL at any
//! moment, and `probe opcua` shows what the server holds.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plant_edge_tests::mes::{Mes, MesOptions};
use protocols::opcua_lib::types::Variant;

fn opcua_config(state: &std::path::Path, mes: &Mes) -> String {
    format!(
        r#"[agent]
site = "p1"
gateway = "gw"
state_dir = "{state}"
shutdown_timeout = "5s"
metrics_listen = "off"

[sinks.archive]
kind = "file"
path = "{state}/archive/events.jsonl"

[sources.mes1]
kind = "opcua"
endpoint = "{endpoint}"
mode = "subscription"
publishing_interval = "50ms"
sampling_interval = "20ms"
timeout = "2s"
line = "L1"
machine = "filler1"

[[sources.mes1.counters]]
signal = "good"
type = "production.completion"
node = "{good}"

[[sources.mes1.records]]
signal = "completion"
type = "production.completion"
node = "{record}"
fields = {{ sequence = "/seq", work_order = "/order", quantity = "/qty" }}
ack = {{ write = "{ack}", field = "sequence" }}
"#,
        state = state.display(),
        endpoint = mes.endpoint(),
        good = mes.node("Line1.Good"),
        record = mes.node("Line1.Record"),
        ack = mes.node("Line1.Ack"),
    )
}

fn record(seq: u32) -> String {
    format!(
        r#"{{"seq":{seq},"order":"WO-{}","qty":{}}}"#,
        seq / 5,
        seq % 7 + 1
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_records_survive_sigkill_exactly_once_and_are_acknowledged_only_when_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&MesOptions::open(dir.path().join("mes-pki"))).await;
    mes.set("Line1.Good", 0u32);
    let state = dir.path().join("state");
    let file = write_config(dir.path(), &opcua_config(&state, &mes));
    let config = file.to_str().expect("utf8").to_owned();
    let out = common::run(&["validate", "-c", &config]);
    assert!(out.status.success(), "validate: {}", stderr(&out));

    let mut seq = 0u32;
    let mut good = 0u32;
    let mut kills = 0;
    let mut child = common::bin()
        .args(["run", "-c", &config])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let target = 40u32;
    let mut next_kill =
        tokio::time::Instant::now() + Duration::from_millis(fastrand::u64(300..1500));
    while seq < target {
        // The MES publishes the next record only once the last one is
        // acknowledged (the handshake); the line counts meanwhile.
        let acked = mes
            .acks()
            .written
            .last()
            .cloned()
            .unwrap_or(Variant::UInt32(0));
        if acked == Variant::UInt32(seq) {
            seq += 1;
            // The agent's first reading of the counter is its baseline:
            // the line counts only once record 1 was acknowledged (the
            // agent has read every node by then).
            if seq > 1 {
                good += fastrand::u32(1..20);
                mes.set("Line1.Good", good);
            }
            mes.set("Line1.Record", record(seq));
        }
        if tokio::time::Instant::now() >= next_kill && kills < 8 {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            kills += 1;
            child = common::bin()
                .args(["run", "-c", &config])
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("respawn");
            next_kill =
                tokio::time::Instant::now() + Duration::from_millis(fastrand::u64(300..1500));
        }
        assert!(
            mes.acks().written.len() < 400,
            "runaway acknowledgements: {:?}",
            mes.acks().written.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mes.wait_acks(
        "the last record acknowledged",
        Duration::from_secs(30),
        |a| a.written.last() == Some(&Variant::UInt32(target)),
    )
    .await;
    let events = || archived_events(&state);
    let counted = |events: &[serde_json::Value]| -> u64 {
        let mut seen = BTreeSet::new();
        events
            .iter()
            .filter(|e| e["data"]["counter"].is_object())
            .filter(|e| seen.insert(e["id"].as_str().unwrap_or_default().to_owned()))
            .map(|e| e["data"]["quantity"].as_u64().unwrap_or_default())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counted(&events()) < good as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "counted {} of {good}",
            counted(&events())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));

    let events = events();
    let mut ids_by_seq: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e["data"]["work_order"].is_string())
    {
        ids_by_seq
            .entry(e["sequence"].as_str().expect("sequence").to_owned())
            .or_default()
            .insert(e["id"].as_str().expect("id").to_owned());
    }
    let expected: BTreeSet<String> = (1..=target).map(|s| s.to_string()).collect();
    let got: BTreeSet<String> = ids_by_seq.keys().cloned().collect();
    assert_eq!(
        got, expected,
        "every record delivered, none lost ({kills} SIGKILLs)"
    );
    assert!(
        ids_by_seq.values().all(|ids| ids.len() == 1),
        "a record re-read after a crash keeps its id: {ids_by_seq:?}"
    );
    assert_eq!(counted(&events), good as u64, "every part counted once");
    assert!(kills >= 4, "the agent was killed during the run ({kills})");
    mes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_opcua_browses_reads_and_explains_untrusted_servers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mes = Mes::start(&MesOptions::open(dir.path().join("mes-pki"))).await;
    mes.set("Line1.Good", 1234u32);
    let endpoint = mes.endpoint();
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_str().expect("utf8").to_owned();
    let probe = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || common::bin().args(&args).output().expect("probe"))
    };
    let out = probe(vec![
        "probe".into(),
        "opcua".into(),
        endpoint.clone(),
        "--pki-dir".into(),
        pki_arg.clone(),
        "--browse".into(),
        mes.node("Line1"),
    ])
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&mes.node("Line1.Good")) && text.contains("UInt32") && text.contains("1234"),
        "{text}"
    );
    assert!(text.contains("Acknowledge"), "methods listed too: {text}");
    let out = probe(vec![
        "probe".into(),
        "opcua".into(),
        endpoint.clone(),
        "--pki-dir".into(),
        pki_arg.clone(),
        "--read".into(),
        mes.node("Line1.Good"),
    ])
    .await
    .expect("join");
    let text = stdout(&out);
    assert!(
        text.contains("1234") && text.contains("Good") && text.contains("source time"),
        "{text}"
    );
    // --watch subscribes: every value the server publishes is printed
    // as it comes, until --for ends it.
    let mut child = common::bin()
        .args([
            "probe",
            "opcua",
            &endpoint,
            "--pki-dir",
            &pki_arg,
            "--watch",
            &mes.node("Line1.Good"),
            "--for",
            "60s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("probe --watch");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout_pipe = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout_pipe).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let wait_for = |value: &str, seen: &mut Vec<String>| {
        while !seen
            .iter()
            .any(|l: &String| l.contains(&format!("= {value} ")))
        {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!("--watch never printed {value}: {seen:#?}"),
            }
        }
    };
    wait_for("1234", &mut seen);
    mes.set("Line1.Good", 1235u32);
    wait_for("1235", &mut seen);
    mes.set("Line1.Good", 1236u32);
    wait_for("1236", &mut seen);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter()
            .all(|l| l.contains("UInt32") && l.contains("source time")),
        "{seen:#?}"
    );
    let out = probe(vec![
        "probe".into(),
        "opcua".into(),
        endpoint.clone(),
        "--pki-dir".into(),
        pki_arg.clone(),
        "--security".into(),
        "Basic256Sha256:SignAndEncrypt".into(),
        "--read".into(),
        mes.node("Line1.Good"),
    ])
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert!(
        text.contains("not trusted") && text.contains(&format!("{pki_arg}/rejected")),
        "{text}"
    );
    mes.stop().await;
}
