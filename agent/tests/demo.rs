#![cfg(feature = "demo")]
//! `plant-edge demo`, the README's first command: simulated PLC and MES,
//! the agent, a simulated HTTPS ERP that goes down midway; the
//! reconciliation must show nothing lost, nothing posted twice, and the
//! outage held in the journal.

mod common;

use common::*;

#[test]
fn demo_reconciles_plc_and_mes_production_with_the_erp_across_an_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("demo");
    let out = bin()
        .args([
            "demo",
            "--duration",
            "14s",
            "--outage",
            "5s",
            "--state",
            state.to_str().expect("utf8"),
        ])
        .output()
        .expect("run demo");
    let table = stdout(&out);
    let progress = stderr(&out);
    assert!(out.status.success(), "demo failed:\n{table}\n{progress}");
    assert!(
        table.contains("RESULT: nothing lost, nothing posted twice"),
        "{table}"
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('L'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let kinds: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[2])).collect();
    for expected in [
        ("L1", "counter"),
        ("L2", "counter"),
        ("L2", "record"),
        ("L3", "counter"),
        ("L3", "record"),
    ] {
        assert!(
            kinds.contains(&expected),
            "row {expected:?} missing:\n{table}"
        );
    }
    for row in &rows {
        let produced: u64 = row[3].parse().expect("produced");
        let delivered: u64 = row[4].parse().expect("delivered");
        assert_eq!(produced, delivered, "{row:?}");
        assert_eq!(row[5], "0", "lost: {row:?}");
        assert_eq!(row[6], "0", "duplicates: {row:?}");
    }
    let held: u64 = table
        .lines()
        .find_map(|l| l.strip_prefix("cloud outage: "))
        .and_then(|l| l.split("held up to ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no outage line:\n{table}"));
    assert!(
        held > 0,
        "the outage shows in the journal's backlog:\n{table}"
    );
    let chart = table
        .lines()
        .find(|l| l.starts_with("backlog, one column per second"))
        .unwrap_or_else(|| panic!("no backlog chart:\n{table}"));
    // Rise to the peak during the outage, fall after it (a sample may catch
    // a few events in flight, so "fall" is a low bar, not an empty one).
    let bars: Vec<char> = chart.chars().filter(|c| ('▁'..='█').contains(c)).collect();
    let peak = bars.iter().position(|c| *c == '█');
    assert!(
        peak.is_some_and(|p| bars[p..].iter().any(|c| ('▁'..='▃').contains(c))),
        "the outage shows as a rise and fall of the backlog: {chart}"
    );
    // The terminal shows progress; the agent's log is in the state folder.
    assert!(progress.contains("agent log: "), "{progress}");
    assert!(
        !progress.contains(" INFO ") && !progress.contains(" WARN "),
        "no agent log lines on the terminal:\n{progress}"
    );
    let log = std::fs::read_to_string(state.join("agent.log")).expect("agent log kept");
    assert!(log.contains("plant-edge running"), "{log}");
    assert!(progress.contains("erp:retrying"), "{progress}");
    assert!(progress.contains("cloud link back"), "{progress}");
    assert!(
        state.join("plant-edge-demo.toml").exists(),
        "the demo leaves its config to copy"
    );
    let out = run(&[
        "validate",
        "-c",
        state.join("plant-edge-demo.toml").to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "the demo's config validates: {}",
        stderr(&out)
    );
}
