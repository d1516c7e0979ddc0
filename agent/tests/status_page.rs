//! The status page at `/`, rendered by a real headless browser (Debian's
//! chromium): it shows every configured source and sink by name, and a
//! sink whose broker is down as retrying with its backlog.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Runs headless chromium on `url` with `args`; its stdout.
fn chromium(args: &[&str], url: &str) -> String {
    let browser = std::env::var_os("CHROMIUM").unwrap_or_else(|| "chromium".into());
    let out = std::process::Command::new(&browser)
        .args([
            "--headless",
            // Root in CI and on the dev machines.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            // Lets the page fetch /status and render before the dump.
            "--virtual-time-budget=8000",
        ])
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!("chromium not found ({e}): run scripts/test.sh, which installs Debian's chromium, or set CHROMIUM")
        });
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the table row whose `data-<kind>` is `name` (tags dropped).
fn row_text(dom: &str, kind: &str, name: &str) -> String {
    let marker = format!("data-{kind}=\"{name}\"");
    let Some(start) = dom.find(&marker) else {
        panic!("no {kind} row for {name} in the page:\n{dom}");
    };
    let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom[start..end].chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_sources_sinks_and_an_outage_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (port, closed) = (free_port(), free_port());
    let sinks = archive_and_dead_broker(&state, closed);
    let text = with_metrics(&pipeline_config_with_sinks(&state, "20ms", &sinks), port);
    let file = write_config(dir.path(), &text);
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // The outage shows in /status once the MQTT sink gives up waiting.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, body)) = get(port, "/status").await {
            let status: serde_json::Value = serde_json::from_str(&body).expect("json");
            let cloud = status["sinks"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["sink"] == "cloud").cloned());
            if cloud.is_some_and(|c| c["retrying"].is_string() && c["backlog"].as_u64() > Some(0)) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the cloud outage never showed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (page_status, page) = get(port, "/").await.expect("page");
    assert_eq!(page_status, 200);
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http"),
        "everything the page needs is in the binary (no CDN)"
    );

    let url = format!("http://127.0.0.1:{port}/");
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&["--dump-dom"], &url)
    })
    .await
    .expect("browser");
    for source in ["press", "weld"] {
        let row = row_text(&dom, "source", source);
        assert!(
            row.contains(" up ") && row.contains("simulated"),
            "{source}: {row}"
        );
    }
    let archive = row_text(&dom, "sink", "archive");
    assert!(archive.contains(" up "), "archive: {archive}");
    let cloud = row_text(&dom, "sink", "cloud");
    assert!(cloud.contains("retrying"), "cloud: {cloud}");
    let backlog: u64 = cloud
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("a backlog figure");
    assert!(backlog > 0, "the cloud's backlog is shown: {cloud}");
    assert!(
        dom.contains("production.completion"),
        "the last events are listed"
    );

    let shot = dir.path().join("status.png");
    let screenshot = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || chromium(&[&screenshot, "--window-size=1280,1600"], &url))
        .await
        .expect("browser");
    check_png(&shot);
    child.kill().expect("kill");
    child.wait().expect("reap");
}

fn check_png(path: &Path) {
    let png = std::fs::read(path).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    // A blank page compresses to a few KiB; tables and text do not.
    assert!(png.len() > 20_000, "screenshot of {} bytes", png.len());
}
