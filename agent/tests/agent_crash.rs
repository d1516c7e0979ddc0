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

use std::time::Duration;

use common::*;

const KILLS: usize = 15;

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

    let mut distinct = Distinct::default();
    for event in archived_events(&state) {
        distinct.add(event);
    }
    let journal = distinct.add_pending(&state);
    assert!(journal.verify().is_ok(), "{:?}", journal.verify().problems);

    let (by_id, repeated) = (&distinct.by_id, distinct.repeated);
    let parts = check_counter_chains(by_id, &journal);
    assert!(
        parts > 100,
        "the agent must have made progress between kills ({parts} parts)"
    );
    eprintln!(
        "{KILLS} kills: {} distinct events, {parts} parts, {repeated} repeated deliveries",
        by_id.len()
    );
}
