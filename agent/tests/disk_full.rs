//! The journal's filesystem fills up while the agent runs (another
//! program's file, on a real 64 MiB tmpfs): sources are held, the agent
//! keeps running and says why, and when the space comes back it carries on
//! by itself with no part lost or counted twice.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (scripts/test.sh runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }

    #[allow(clippy::useless_conversion)] // 32-bit counts on armv7
    fn free(&self) -> u64 {
        let stat = nix::sys::statvfs::statvfs(&self.0).expect("statvfs");
        u64::from(stat.blocks_available()) * u64::from(stat.fragment_size())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_the_sources_and_the_agent_recovers_when_space_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Tmpfs::mount(&dir.path().join("state"), "64m");
    let state = fs.0.clone();
    // The archive lives elsewhere: only the journal's filesystem fills.
    let outside = dir.path().join("outside");
    let port = free_port();
    let sinks = format!(
        "[sinks.archive]\nkind = \"file\"\npath = \"{}/archive/events.jsonl\"\n\n[journal]\nmin_free_disk = \"24MiB\"\n",
        outside.display()
    );
    let text = with_metrics(&pipeline_config_with_sinks(&state, "20ms", &sinks), port);
    let file = write_config(dir.path(), &text);
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for_answer(port, "/readyz", 200, "ready").await;
    wait_for_metric(port, "plant_edge_journal_appended_total", |n| n >= 20.0).await;
    let parked = wait_for_metric(port, "plant_edge_journal_backpressured_total", |_| true).await;

    // Another program fills the disk to 8 MiB short of full.
    let filler = state.join("someone-elses.log");
    let fill = fs.free().saturating_sub(8 << 20);
    std::fs::write(&filler, vec![0u8; fill as usize]).expect("fill the disk");
    let why = wait_for_answer(port, "/readyz", 503, "disk full").await;
    assert!(why.contains("min_free_disk"), "{why}");
    // Both simulated lines are held: each one's append is parked, so
    // nothing can be appended until space returns.
    wait_for_metric(port, "plant_edge_journal_backpressured_total", |n| {
        n >= parked + 2.0
    })
    .await;
    let held = wait_for_metric(port, "plant_edge_journal_appended_total", |_| true).await;
    let (_, metrics) = get(port, "/metrics").await.expect("metrics");
    assert_eq!(
        metric(&metrics, "plant_edge_journal_appended_total"),
        Some(held),
        "sources are held: nothing appended"
    );
    assert!(
        child.try_wait().expect("poll").is_none(),
        "the agent keeps running"
    );
    let (_, metrics) = get(port, "/metrics").await.expect("metrics");
    assert_eq!(metric(&metrics, "plant_edge_journal_disk_low"), Some(1.0));

    // The other program's file is cleaned up: the agent carries on.
    std::fs::remove_file(&filler).expect("free the disk");
    wait_for_answer(port, "/readyz", 200, "ready").await;
    // Progress after the disk came back; and enough events in all (each
    // carries at least one part) for the chains below to mean something.
    wait_for_metric(port, "plant_edge_journal_appended_total", |n| {
        n > held && n > 55.0
    })
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));

    let mut distinct = Distinct::default();
    for event in archived_events(&outside) {
        distinct.add(event);
    }
    let journal = distinct.add_pending(&state);
    let parts = check_counter_chains(&distinct.by_id, &journal);
    assert!(parts > 50, "progress before and after ({parts} parts)");
    journal.close().expect("close");
}
