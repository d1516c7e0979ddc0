//! The agent with an MQTT sink, SIGKILLed mid-stream and restarted, against
//! a real Mosquitto: every part made reaches the broker or is still owed
//! in the journal; repeats carry the same id.

mod common;

use std::time::Duration;

use common::*;
use plant_edge_tests::mosquitto::{subscribe_all, Broker, BrokerOptions};

const KILLS: usize = 8;
/// Messages each run must deliver before it is killed.
const PROGRESS_PER_RUN: usize = 15;

fn parts_messages(
    received: &std::sync::Mutex<Vec<plant_edge_tests::mosquitto::Received>>,
) -> usize {
    received
        .lock()
        .expect("lock")
        .iter()
        .filter(|m| m.topic.starts_with("plants/test-plant/L"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_agent_delivers_every_part_to_the_broker() {
    let broker = Broker::start(BrokerOptions::default());
    let received = subscribe_all(broker.port, "erp-subscriber");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let sink = format!(
        "[sinks.cloud]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nport = {}\nprotocol = \"5\"\nqos = 1\nkeep_alive = \"10s\"\nack_timeout = \"5s\"\n",
        broker.port
    );
    let file = write_config(
        dir.path(),
        &pipeline_config_with_sinks(&state, "10ms", &sink),
    );
    let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    for _ in 0..KILLS {
        let mut child = bin()
            .args(["run", "-c", file.to_str().expect("utf8")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn agent");
        // Kill only after this run has delivered something, so the test
        // measures crash safety and not how fast a loaded CI machine starts
        // a process; the random delay after that spreads the kill points.
        let before = parts_messages(&received);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while parts_messages(&received) < before + PROGRESS_PER_RUN {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent delivered nothing new within 30 s of its start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..600))).await;
        assert!(
            child.try_wait().expect("poll").is_none(),
            "the agent must be running when killed"
        );
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
    // Whatever the broker acknowledged is on its way to the subscriber.
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = received.lock().expect("lock").len();
        if n == last {
            break;
        }
        last = n;
    }

    let mut distinct = Distinct::default();
    let mut from_broker = 0;
    for message in received
        .lock()
        .expect("lock")
        .iter()
        .filter(|m| m.topic.starts_with("plants/test-plant/L"))
    {
        distinct.add(serde_json::from_slice(&message.payload).expect("CloudEvent JSON"));
        from_broker += 1;
    }
    let journal = distinct.add_pending(&state);
    let parts = check_counter_chains(&distinct.by_id, &journal);
    assert!(
        from_broker > 100,
        "the broker must have received events ({from_broker})"
    );
    assert!(parts > 100, "progress between kills ({parts} parts)");
    let status = received
        .lock()
        .expect("lock")
        .iter()
        .filter(|m| m.topic == "plants/test-plant/gw/status")
        .count();
    assert!(
        status >= KILLS,
        "a birth message per start and wills on kills ({status})"
    );
    eprintln!(
        "{KILLS} kills: {from_broker} messages, {} distinct events, {parts} parts, {} repeats",
        distinct.by_id.len(),
        distinct.repeated
    );
}
