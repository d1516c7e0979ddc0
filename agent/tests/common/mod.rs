//! Helpers for running the `plant-edge` binary in tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plant-edge"))
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run plant-edge")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `text` (from [`pipeline_config`]) with the metrics endpoint on `port`.
pub fn with_metrics(text: &str, port: u16) -> String {
    text.replace(
        "shutdown_timeout = \"5s\"",
        &format!("shutdown_timeout = \"5s\"\nmetrics_listen = \"127.0.0.1:{port}\""),
    )
}

/// Sinks for an outage: an archive that delivers and a cloud broker that
/// is down for the whole test (nothing listens on `closed`).
pub fn archive_and_dead_broker(state: &Path, closed: u16) -> String {
    format!(
        "[sinks.archive]\nkind = \"file\"\npath = \"{}/archive/events.jsonl\"\n\n[sinks.cloud]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nport = {closed}\n",
        state.display()
    )
}

/// A config with simulated lines and a file archive under `state`.
pub fn pipeline_config(state: &Path, interval: &str) -> String {
    let archive = format!(
        "[sinks.archive]\nkind = \"file\"\npath = \"{}/archive/events.jsonl\"\nrotate_bytes = \"64KiB\"\n",
        state.display()
    );
    pipeline_config_with_sinks(state, interval, &archive)
}

/// Simulated lines (a 16-bit press counter that wraps, a 32-bit welder)
/// feeding the given sink sections.
pub fn pipeline_config_with_sinks(state: &Path, interval: &str, sinks: &str) -> String {
    format!(
        r#"[agent]
site = "test-plant"
gateway = "gw"
state_dir = "{state}"
shutdown_timeout = "5s"

{sinks}

[sources.press]
kind = "simulated"
line = "L1"
machine = "press1"
interval = "{interval}"
good_per_tick = 5
scrap_every = 3
counter_bits = 16
start = 65500

[sources.weld]
kind = "simulated"
line = "L2"
machine = "weld1"
interval = "{interval}"
good_per_tick = 2
scrap_every = 0
counter_bits = 32
"#,
        state = state.display()
    )
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("plant-edge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Waits until `f` holds, or panics with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every archived CloudEvent (live and rotated files), in file order.
pub fn archived_events(state: &Path) -> Vec<serde_json::Value> {
    let dir = state.join("archive");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    // Rotated files carry a timestamp; the live file is newest.
    files.sort_by_key(|p| {
        (
            p.file_name().is_some_and(|n| n == "events.jsonl"),
            p.clone(),
        )
    });
    let mut events = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            events.push(
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("archive line is not JSON ({e}): {line:?}")),
            );
        }
    }
    events
}

#[derive(Debug, PartialEq)]
struct Step {
    epoch: u64,
    total: u64,
    quantity: u64,
}

/// Checks, per counter, that the distinct events form an unbroken chain
/// from the baseline of [`pipeline_config`] to the cursor the journal
/// stored: a lost event or a double count breaks it. Returns the parts.
pub fn check_counter_chains(
    by_id: &std::collections::BTreeMap<String, serde_json::Value>,
    journal: &buffer::Journal,
) -> u64 {
    use std::collections::BTreeMap;
    // (source urn, counter signal) -> steps
    let mut chains: BTreeMap<(String, String), Vec<Step>> = BTreeMap::new();
    for event in by_id.values() {
        let signal = match event["type"].as_str() {
            Some("production.completion") => "good",
            Some("production.scrap") => "scrap",
            other => panic!("unexpected type {other:?}"),
        };
        let source = event["source"].as_str().expect("source").to_owned();
        chains
            .entry((source, signal.to_owned()))
            .or_default()
            .push(Step {
                epoch: event["data"]["counter"]["epoch"].as_u64().expect("epoch"),
                total: event["sequence"]
                    .as_str()
                    .expect("sequence")
                    .parse()
                    .expect("total"),
                quantity: event["data"]["quantity"].as_u64().expect("quantity"),
            });
    }
    assert!(
        chains.len() >= 3,
        "expected press good/scrap and weld good chains, got {:?}",
        chains.keys()
    );
    let mut parts = 0;
    for ((source, signal), mut steps) in chains {
        steps.sort_by_key(|s| (s.epoch, s.total));
        let name = source.rsplit(':').next().expect("name");
        let cursor = journal
            .source_cursor(name)
            .expect("cursor")
            .expect("source has a cursor");
        let cursor: serde_json::Value = serde_json::from_slice(&cursor).expect("cursor json");
        let baseline = match (name, signal.as_str()) {
            ("press", "good") => 65500,
            _ => 0,
        };
        let mut expected_from = baseline;
        for step in &steps {
            assert_eq!(
                step.epoch, 0,
                "{source}/{signal}: a restart must not look like a counter reset"
            );
            assert_eq!(
                step.total - step.quantity,
                expected_from,
                "{source}/{signal}: chain broken at total {} (parts lost or counted twice)",
                step.total
            );
            expected_from = step.total;
            parts += step.quantity;
        }
        assert_eq!(
            cursor[&signal]["total"].as_u64(),
            Some(expected_from),
            "{source}/{signal}: the stored cursor must end where the events end"
        );
    }
    parts
}

/// Distinct events by id; a repeat must describe the same fact.
#[derive(Default)]
pub struct Distinct {
    /// Events by id.
    pub by_id: std::collections::BTreeMap<String, serde_json::Value>,
    /// Deliveries of an id already seen.
    pub repeated: usize,
}

impl Distinct {
    /// Adds one delivered or pending event.
    pub fn add(&mut self, event: serde_json::Value) {
        let id = event["id"].as_str().expect("id").to_owned();
        match self.by_id.get(&id) {
            Some(seen) => {
                assert_eq!(
                    seen["data"]["quantity"], event["data"]["quantity"],
                    "same id, different fact"
                );
                assert_eq!(
                    seen["sequence"], event["sequence"],
                    "same id, different fact"
                );
                self.repeated += 1;
            }
            None => {
                self.by_id.insert(id, event);
            }
        }
    }

    /// Adds the events still pending in the journal under `state` (the
    /// agent stopped); returns the journal, for the counter chains.
    pub fn add_pending(&mut self, state: &Path) -> buffer::Journal {
        let mut jc = buffer::JournalConfig::new(state.join("journal"));
        jc.lock_wait = Duration::from_secs(5);
        let journal = buffer::Journal::open(jc).expect("the journal reopens");
        journal
            .scan_events(0, |e| {
                self.add(serde_json::from_slice(&e.payload).expect("pending payload"));
                true
            })
            .expect("scan");
        journal
    }
}

/// A free loopback port (for the agent's metrics endpoint, a closed peer).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The value of the first metric line that starts with `name`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// GET on the agent's endpoint: (status, body); `None` while it is not up.
pub async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

/// Waits until `path` answers `status` with a body containing `text`.
pub async fn wait_for_answer(port: u16, path: &str, status: u16, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((s, body)) = get(port, path).await {
            if s == status && body.contains(text) {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {status} with {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the metric `name` satisfies `ok`; returns its value.
pub async fn wait_for_metric(port: u16, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, body)) = get(port, "/metrics").await {
            if let Some(value) = metric(&body, name).filter(|v| ok(*v)) {
                return value;
            }
        }
        assert!(Instant::now() < deadline, "metric {name} never got there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
