//! The systemd unit as shipped, and the agent's sd_notify conversation.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn systemd_analyze() -> Command {
    assert!(
        std::path::Path::new("/usr/bin/systemd-analyze").exists(),
        "systemd-analyze missing: scripts/test.sh installs Debian's systemd package"
    );
    Command::new("/usr/bin/systemd-analyze")
}

/// The shipped unit with ExecStart pointing at the binary under test
/// (verify checks that the command exists).
fn unit_under_test(dir: &std::path::Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/plant-edge.service"
    ))
    .expect("unit");
    let path = dir.join("plant-edge.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/plant-edge", env!("CARGO_BIN_EXE_plant-edge")),
    )
    .expect("write unit");
    path
}

#[test]
fn shipped_unit_verifies_and_scores_ok_on_exposure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_under_test(dir.path());
    let out = systemd_analyze()
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("verify");
    let complaints =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !complaints.contains("plant-edge.service:"),
        "systemd-analyze verify: {complaints}"
    );
    let out = systemd_analyze()
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .expect("security");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let score: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for plant-edge.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in: {report}"));
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{report}");
    eprintln!("systemd-analyze security: {score}");
}

/// `RestartPreventExitStatus=78` looks at the main process only: a config
/// check in `ExecStartPre=` that exits 78 makes systemd restart the unit
/// forever (seen under a real systemd: 17 restarts in 100 s). The check is
/// `run`'s own, in the main process.
#[test]
fn a_bad_config_stops_the_unit_because_only_the_main_process_checks_it() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/plant-edge.service"
    ))
    .expect("unit");
    let directives: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(
        !directives.iter().any(|l| l.starts_with("ExecStartPre=")),
        "an ExecStartPre= exiting 78 is restarted forever"
    );
    let prevented: Vec<&str> = directives
        .iter()
        .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .expect("RestartPreventExitStatus=")
        .split_whitespace()
        .collect();
    // 78: a bad config; 65: a journal written by a newer version.
    assert!(
        prevented.contains(&"78") && prevented.contains(&"65"),
        "{prevented:?}"
    );
    let exec = directives
        .iter()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(exec.contains(" run "), "{exec}");
    // And `run` itself exits 78 on a bad config, before anything starts.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[agent]\nsite = 3\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plant-edge"))
        .args(["run", "-c", file.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn agent_tells_systemd_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let file = write_config(dir.path(), &pipeline_config(&state, "20ms"));
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut messages: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while messages.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 3 {
        assert!(Instant::now() < deadline, "no watchdog pings: {messages:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !messages.iter().any(|m| m.contains("STOPPING=1")) {
        assert!(Instant::now() < deadline, "no STOPPING: {messages:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let ready = messages
        .iter()
        .position(|m| m.contains("READY=1"))
        .expect("READY=1 sent");
    let first_ping = messages
        .iter()
        .position(|m| m.contains("WATCHDOG=1"))
        .expect("ping");
    assert!(
        ready <= first_ping,
        "READY before the first watchdog ping: {messages:?}"
    );
    assert!(
        messages[ready].contains("STATUS=backlog "),
        "status with the backlog: {}",
        messages[ready]
    );
}
