//! The whole agent, SIGKILLed at random instants and restarted: no part is
//! lost or counted twice.
//!
//! The simulated lines count parts on counters (one 16-bit counter wraps
//! many times). After the kills, the archive plus what is still pending in
//! the journal must hold, per counter, an unbroken chain: each event's
//! unwrapped total minus its quantity equals the previous event's total,
//! starting at the baseline, ending exactly at the cursor the journal
//! stored. A lost event breaks the chain; a double count breaks it too;
//! a repeated delivery repeats an id with identical content (allowed).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const KILLS: usize = 15;

#[derive(Debug, PartialEq)]
struct Step {
    epoch: u64,
    total: u64,
    quantity: u64,
}

#[test]
fn sigkilled_agent_loses_and_duplicates_no_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let file = write_config(dir.path(), &pipeline_config(&state, "10ms"));
    let config = file.to_str().expect("utf8");
    for _ in 0..KILLS {
        let mut child = bin()
            .args(["run", "-c", config])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn agent");
        std::thread::sleep(Duration::from_millis(fastrand::u64(150..900)));
        assert!(
            child.try_wait().expect("poll").is_none(),
            "the agent must still be running when killed"
        );
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    let mut by_id: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut repeated = 0;
    let mut collect = |event: serde_json::Value| {
        let id = event["id"].as_str().expect("id").to_owned();
        match by_id.get(&id) {
            Some(seen) => {
                assert_eq!(
                    seen["data"]["quantity"], event["data"]["quantity"],
                    "same id, different fact"
                );
                assert_eq!(
                    seen["sequence"], event["sequence"],
                    "same id, different fact"
                );
                repeated += 1;
            }
            None => {
                by_id.insert(id, event);
            }
        }
    };
    for event in archived_events(&state) {
        collect(event);
    }
    let mut jc = buffer::JournalConfig::new(state.join("journal"));
    jc.lock_wait = Duration::from_secs(5);
    let journal = buffer::Journal::open(jc).expect("journal reopens after kills");
    assert!(journal.verify().is_ok(), "{:?}", journal.verify().problems);
    journal
        .scan_events(0, |e| {
            collect(serde_json::from_slice(&e.payload).expect("pending payload"));
            true
        })
        .expect("scan");

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
    assert!(
        parts > 100,
        "the agent must have made progress between kills ({parts} parts)"
    );
    eprintln!(
        "{KILLS} kills: {} distinct events, {parts} parts, {repeated} repeated deliveries",
        by_id.len()
    );
}
