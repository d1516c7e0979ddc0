//! The metrics and health endpoint of a running agent, and `plant-edge status`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_events_flow_and_an_outage_shows_in_backlog_and_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (port, closed) = (free_port(), free_port());
    let sinks = archive_and_dead_broker(&state, closed);
    let text = with_metrics(&pipeline_config_with_sinks(&state, "20ms", &sinks), port)
        .replace("[agent]", "[agent]\nready_max_backlog_age = \"1s\"");
    let file = write_config(dir.path(), &text);
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let get = |path: &str| {
        let (client, url) = (client.clone(), format!("{base}{path}"));
        async move {
            let r = client.get(url).send().await.ok()?;
            Some((r.status().as_u16(), r.text().await.ok()?))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some((200, body)) = get("/metrics").await {
            if metric(&body, "plant_edge_journal_appended_total").is_some_and(|v| v > 0.0) {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics endpoint never showed appends"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        metric(&first, "plant_edge_journal_dedup_memory_bytes").is_some_and(|b| b > 0.0),
        "the dedup window's memory is shown"
    );
    assert_eq!(get("/healthz").await.map(|r| r.0), Some(200));
    // The MQTT sink waits a few seconds for its broker before it reports
    // a retry; the outage shows once it does.
    let deadline = Instant::now() + Duration::from_secs(20);
    let second = loop {
        let (_, body) = get("/metrics").await.expect("scrape");
        if metric(&body, "plant_edge_sink_up{sink=\"cloud\"}") == Some(0.0) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the cloud outage never showed in sink_up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let appended = |t: &str| metric(t, "plant_edge_journal_appended_total").expect("appended");
    assert!(
        appended(&second) > appended(&first),
        "appends counted as events flow"
    );
    let backlog = |t: &str, sink: &str| {
        metric(
            t,
            &format!("plant_edge_sink_backlog_events{{sink=\"{sink}\"}}"),
        )
        .expect("backlog")
    };
    assert!(
        backlog(&second, "cloud") > backlog(&first, "cloud"),
        "the outage shows in the cloud backlog"
    );
    assert!(
        backlog(&second, "archive") < backlog(&second, "cloud"),
        "the archive keeps up"
    );
    assert!(
        second.contains("plant_edge_build_info"),
        "build info exposed"
    );
    let appends_timed = |t: &str| {
        metric(t, "plant_edge_journal_append_latency_seconds_count").expect("append latency")
    };
    assert!(
        appends_timed(&second) > appends_timed(&first),
        "durable-append latency observed as events flow"
    );
    let archive_delivery = metric(
        &second,
        "plant_edge_delivery_latency_seconds_count{sink=\"archive\"}",
    )
    .expect("delivery latency of the archive");
    assert!(archive_delivery > 0.0, "delivery latency observed per sink");
    assert!(
        second
            .lines()
            .any(|l| l.starts_with("plant_edge_source_events_read{")
                && l.contains("type=\"production.completion\"")),
        "events read per source and type"
    );
    let (code, why) = get("/readyz").await.expect("readyz");
    assert_eq!(code, 503, "not ready with a backlog older than 1s: {why}");
    assert!(why.contains("oldest pending event"), "{why}");

    let screen = tokio::task::spawn_blocking({
        let file = file.clone();
        move || run(&["status", "-c", file.to_str().expect("utf8")])
    })
    .await
    .expect("status");
    assert!(screen.status.success(), "{}", stderr(&screen));
    let screen = stdout(&screen);
    assert!(
        screen.starts_with("plant-edge "),
        "one-screen summary: {screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l.trim_start().starts_with("cloud") && l.contains("retrying")),
        "the retrying sink named: {screen}"
    );
    assert!(screen.lines().count() <= 24, "one screen: {screen}");
    let status = tokio::task::spawn_blocking({
        let file = file.clone();
        move || run(&["status", "--json", "-c", file.to_str().expect("utf8")])
    })
    .await
    .expect("status");
    assert!(status.status.success(), "{}", stderr(&status));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&status)).expect("status JSON");
    assert!(summary["pending_events"].as_u64().expect("pending") > 0);
    assert!(summary["sinks"]
        .as_array()
        .expect("sinks")
        .iter()
        .any(|s| s["sink"] == "cloud" && !s["retrying"].is_null()));

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}
