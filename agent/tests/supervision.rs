//! A source task that panics (injected in a debug build) is restarted from
//! its stored position: the agent keeps running, says what happened, and
//! `/readyz` tells the truth while the task is down.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_source_is_restarted_counted_and_shown_and_loses_no_part() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let port = free_port();
    let text = with_metrics(&pipeline_config(&state, "20ms"), port);
    let file = write_config(dir.path(), &text);
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        // The press source panics after each of its first three starts.
        .env("PLANT_EDGE_TEST_PANIC", "source:press:3")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut saw_down = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        assert!(Instant::now() < deadline, "never recovered");
        assert!(
            child.try_wait().expect("poll").is_none(),
            "the agent keeps running"
        );
        if let Some((503, body)) = get(port, "/readyz").await {
            if body.contains("source press is down") {
                saw_down = Some(body);
            }
        }
        if let Some((200, body)) = get(port, "/status").await {
            let status: serde_json::Value = serde_json::from_str(&body).expect("json");
            let press = status["tasks"]
                .as_array()
                .expect("tasks")
                .iter()
                .find(|t| t["name"] == "press")
                .cloned()
                .expect("press task");
            if press["restarts"] == 3 && press["up"] == true {
                break press;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let down = saw_down.expect("/readyz failed while the task was down");
    assert!(down.contains("injected test fault"), "{down}");
    assert!(
        status["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains("panicked: injected test fault")),
        "{status}"
    );
    wait_for_answer(port, "/readyz", 200, "ready").await;
    let (_, metrics) = get(port, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("plant_edge_task_restarts{kind=\"source\",task=\"press\"} 3"),
        "{metrics}"
    );
    // The restarted source goes on counting (good parts and scrap) before
    // the agent stops.
    let appended = metric(&metrics, "plant_edge_journal_appended_total").expect("appended");
    // Each event carries at least one part: enough of them for the
    // chains below to mean something.
    wait_for_metric(port, "plant_edge_journal_appended_total", |n| {
        n > appended && n > 55.0
    })
    .await;
    wait_for_metric(
        port,
        "plant_edge_source_events_read{source=\"press\",type=\"production.scrap\"}",
        |n| n > 0.0,
    )
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));

    let mut distinct = Distinct::default();
    for event in archived_events(&state) {
        distinct.add(event);
    }
    let journal = distinct.add_pending(&state);
    let parts = check_counter_chains(&distinct.by_id, &journal);
    assert!(
        parts > 50,
        "the restarted source counted on ({parts} parts)"
    );
}
