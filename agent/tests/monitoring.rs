//! The Grafana dashboard and the Prometheus alert rules shipped in
//! packaging/monitoring: every metric they query exists in the agent's
//! /metrics (an agent with a Modbus and an OPC UA source, a file and an
//! MQTT sink), the dashboard is valid JSON, and the rules pass promtool.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use plant_edge_tests::mes::{Mes, MesOptions};
use plant_edge_tests::plc::Plc;

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/monitoring")
}

/// Metric names (`plant_edge_...`) in a query or a rules file.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("plant_edge_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

fn config(state: &Path, port: u16, plc: &Plc, mes: &Mes, closed: u16) -> String {
    format!(
        r#"[agent]
site = "p1"
gateway = "gw"
state_dir = "{state}"
shutdown_timeout = "5s"
metrics_listen = "127.0.0.1:{port}"

[checkpoints]
every = "1h"

[sinks.archive]
kind = "file"
path = "{state}/archive/events.jsonl"

[sinks.cloud]
kind = "mqtt"
host = "127.0.0.1"
port = {closed}

[sources.press]
kind = "modbus"
endpoint = "tcp://{plc}"
poll_interval = "50ms"
line = "L1"
machine = "press"

[[sources.press.counters]]
signal = "good"
type = "production.completion"
address = "holding:0"

[sources.mes]
kind = "opcua"
endpoint = "{endpoint}"
publishing_interval = "50ms"
timeout = "2s"
line = "L2"
machine = "filler"

[[sources.mes.counters]]
signal = "good"
type = "production.completion"
node = "{good}"
"#,
        state = state.display(),
        plc = plc.addr,
        endpoint = mes.endpoint(),
        good = mes.node("Line1.Good"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_query_only_metrics_the_agent_exports() {
    let dashboard_text =
        std::fs::read_to_string(monitoring_dir().join("plant-edge-dashboard.json"))
            .expect("dashboard shipped");
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard_text).expect("the dashboard is valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(
        panels.len() >= 8,
        "backlog, delivery, sources, journal, tasks"
    );
    let mut queried = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    let rules_path = monitoring_dir().join("plant-edge-alerts.yml");
    let rules = std::fs::read_to_string(&rules_path).expect("rules shipped");
    queried.extend(metric_names(&rules));
    for wanted in [
        "plant_edge_journal_oldest_pending_age_seconds",
        "plant_edge_journal_dead_letters",
        "plant_edge_modbus_source_up",
        "plant_edge_journal_used_bytes",
        "plant_edge_task_restarts",
    ] {
        assert!(queried.contains(wanted), "{wanted} is watched");
    }

    // promtool from Debian's prometheus package (scripts/test.sh extracts
    // it and sets PROMTOOL).
    let promtool = std::env::var_os("PROMTOOL").unwrap_or_else(|| "promtool".into());
    let checked = std::process::Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules_path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool not found ({e}): run scripts/test.sh, which extracts it from Debian's prometheus package, or set PROMTOOL"
            )
        });
    assert!(
        checked.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let plc = Plc::start().await;
    plc.mem().holding.insert(0, 5);
    let mes = Mes::start(&MesOptions::open(dir.path().join("mes-pki"))).await;
    mes.set("Line1.Good", 100u32);
    let (port, closed) = (free_port(), free_port());
    let file = write_config(dir.path(), &config(&state, port, &plc, &mes, closed));
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Counting starts after the baseline: change both counters until the
    // per-source event counts show up too.
    let deadline = Instant::now() + Duration::from_secs(30);
    let exported = loop {
        plc.mem().holding.insert(0, 5 + fastrand::u16(1..100));
        mes.set("Line1.Good", 100u32 + fastrand::u32(1..100));
        if let Some((200, body)) = get(port, "/metrics").await {
            let missing: Vec<&String> = queried
                .iter()
                .filter(|name| {
                    !body.lines().any(|l| {
                        l.starts_with(name.as_str()) && l[name.len()..].starts_with(['{', ' '])
                    })
                })
                .collect();
            if missing.is_empty() {
                break body;
            }
            assert!(
                Instant::now() < deadline,
                "queried but not exported: {missing:?}\n{body}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exported.contains("plant_edge_opcua_source_up{source=\"mes\"}"));
    child.kill().expect("kill");
    child.wait().expect("reap");
    mes.stop().await;
}
