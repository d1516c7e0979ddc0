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

/// A config with simulated lines and a file archive under `state`.
pub fn pipeline_config(state: &Path, interval: &str) -> String {
    format!(
        r#"[agent]
site = "test-plant"
gateway = "gw"
state_dir = "{state}"
shutdown_timeout = "5s"

[sinks.archive]
kind = "file"
path = "{state}/archive/events.jsonl"
rotate_bytes = "64KiB"

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
