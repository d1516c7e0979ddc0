//! `plant-edge demo`: the whole pipeline on this machine, nothing to set up.
//!
//! Two simulated lines (one with a 16-bit counter that wraps within
//! seconds) append through the real journal; a forwarder delivers to the
//! JSON-lines archive. Progress goes to stderr once a second; at the end
//! the archive is reconciled against what the sources counted, per line
//! and type, and the exit code is non-zero if anything was lost.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Config;
use crate::run::RunningAgent;

fn demo_config(state: &Path) -> String {
    format!(
        r#"# Written by `plant-edge demo`; a starting point for your own.
[agent]
site = "demo-plant"
gateway = "demo-gw"
state_dir = "{state}"

[journal]
max_bytes = "256MiB"

[forwarder]
batch_size = 256

[sinks.archive]
kind = "file"
path = "{state}/archive/events.jsonl"
rotate_bytes = "1MiB"

[sources.line1-press]
kind = "simulated"
line = "L1"
machine = "press1"
interval = "50ms"
good_per_tick = 5
scrap_every = 7
counter_bits = 16
start = 65400
attributes = {{ work_center = "WC-10", cost_center = "4711" }}

[sources.line2-weld]
kind = "simulated"
line = "L2"
machine = "weld1"
interval = "100ms"
good_per_tick = 2
scrap_every = 25
counter_bits = 32
"#,
        state = state.display()
    )
}

/// One row of the reconciliation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Parts the sources counted into the journal.
    pub produced: u64,
    /// Parts in distinct events found in the archive.
    pub delivered: u64,
    /// Archive lines repeating an id already seen (at-least-once).
    pub repeated_lines: u64,
}

/// Reads every archive file: per (line, type) parts in distinct events.
fn read_archive(archive: &Path) -> anyhow::Result<BTreeMap<(String, String), Reconciled>> {
    let dir = archive.parent().context("archive path has a directory")?;
    let stem = archive
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("events");
    let mut files = protocols::sinks::file::rotated_files(dir, stem);
    files.sort();
    files.push(archive.to_owned());
    let mut seen = HashSet::new();
    let mut rows: BTreeMap<(String, String), Reconciled> = BTreeMap::new();
    for file in files {
        let Ok(f) = std::fs::File::open(&file) else {
            continue;
        };
        for line in std::io::BufReader::new(f).lines() {
            let line = line?;
            let event: buffer::CloudEvent = serde_json::from_str(&line)
                .with_context(|| format!("archive line in {}", file.display()))?;
            let row = rows
                .entry((event.data.line.clone(), event.event_type.to_string()))
                .or_default();
            if !seen.insert(event.id) {
                row.repeated_lines += 1;
                continue;
            }
            if let buffer::Quantity::Count(n) = event.data.quantity {
                row.delivered += n;
            }
        }
    }
    Ok(rows)
}

/// Runs the demo; returns whether nothing was lost.
pub async fn run(duration: Duration, state: Option<PathBuf>) -> anyhow::Result<bool> {
    let (state, _keep) = match state {
        Some(dir) => (dir, None),
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("plant-edge-demo-")
                .tempdir()?;
            (tmp.path().to_owned(), Some(tmp))
        }
    };
    std::fs::create_dir_all(&state)?;
    let config_path = state.join("plant-edge-demo.toml");
    std::fs::write(&config_path, demo_config(&state))?;
    eprintln!(
        "demo config: {} (copy it as a starting point)",
        config_path.display()
    );
    let config = Config::load(&config_path)?;
    let archive = match &config.sinks[0].kind {
        crate::config::SinkKind::File(fc) => fc.path.clone(),
        crate::config::SinkKind::Mqtt(_) | crate::config::SinkKind::Https(_) => {
            anyhow::bail!("the demo config's first sink is the archive")
        }
    };

    let mut agent = RunningAgent::start(&config).await?;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while started.elapsed() < duration {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        progress(&agent, started, tty);
    }
    eprintln!();
    agent.stop_sources().await;
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    while agent.journal.stats().pending_events > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tally = agent
        .tally
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let stats = agent.journal.stats();
    agent.stop().await;

    let mut rows = read_archive(&archive)?;
    for ((line, event_type), produced) in tally {
        rows.entry((line, event_type)).or_default().produced = produced;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<6} {:<24} {:>10} {:>10} {:>6} {:>16}",
        "line", "type", "produced", "delivered", "lost", "repeated-lines"
    )?;
    let mut lost_total = 0u64;
    for ((line, event_type), row) in &rows {
        let lost = row.produced.saturating_sub(row.delivered);
        lost_total += lost;
        writeln!(
            out,
            "{line:<6} {event_type:<24} {:>10} {:>10} {lost:>6} {:>16}",
            row.produced, row.delivered, row.repeated_lines
        )?;
    }
    writeln!(
        out,
        "journal: appended {} delivered {} pending {} dead letters {}",
        stats.counters.appended, stats.counters.delivered, stats.pending_events, stats.dead_letters
    )?;
    writeln!(
        out,
        "{}",
        if lost_total == 0 {
            "RESULT: nothing lost".to_owned()
        } else {
            format!("RESULT: {lost_total} parts LOST")
        }
    )?;
    Ok(lost_total == 0)
}

fn progress(agent: &RunningAgent, started: Instant, tty: bool) {
    let s = agent.journal.stats();
    let produced: u64 = agent.tally.lock().map(|t| t.values().sum()).unwrap_or(0);
    let links: Vec<String> = agent
        .forwarders
        .iter()
        .map(|(name, st)| {
            let st = st.lock().unwrap_or_else(|p| p.into_inner());
            format!(
                "{name}:{}",
                if st.retrying.is_some() {
                    "retrying"
                } else {
                    "up"
                }
            )
        })
        .collect();
    let line = format!(
        "t={:>3}s parts={produced} events: durable={} delivered={} pending={} oldest={}ms links[{}]",
        started.elapsed().as_secs(),
        s.counters.appended,
        s.counters.delivered,
        s.pending_events,
        s.oldest_pending_age_ms.unwrap_or(0),
        links.join(" ")
    );
    if tty {
        eprint!("\r{line}\x1b[K");
    } else {
        eprintln!("{line}");
    }
}
