//! Crash test in sled's style: a child appends until it is SIGKILLed at a
//! random instant; after every kill the journal is reopened and checked.
//!
//! Checked after each of the 100+ kills: every append the child saw
//! answered is present exactly once (or already delivered, below the sink
//! cursor) with its id and sequence; no id is stored twice; each source's
//! events are in order and its stored cursor covers every answered append;
//! `verify` finds nothing; the sink cursor never moves backwards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use buffer::{Journal, JournalConfig};
use plant_edge_tests::crash::{crash_event_id, SINK, SOURCES};

const KILLS: usize = 100;

fn open(dir: &std::path::Path) -> Journal {
    let mut config = JournalConfig::new(dir);
    config.sinks = vec![SINK.to_owned()];
    Journal::open(config).expect("journal must reopen after SIGKILL")
}

#[test]
fn sigkill_at_random_instants_loses_no_answered_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal_dir = dir.path().join("journal");
    let child_exe = env!("CARGO_BIN_EXE_journal_crash_child");
    // (source, n) -> seq, for every append the child saw answered.
    let mut answered: BTreeMap<(String, u64), u64> = BTreeMap::new();
    let mut last_cursor = 0u64;
    let mut total_answered_lines = 0usize;
    for kill in 0..KILLS {
        let mut child = Command::new(child_exe)
            .arg(&journal_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn crash child");
        std::thread::sleep(Duration::from_millis(fastrand::u64(10..250)));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let mut output = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut output)
            .expect("read stdout");
        // A line cut by the kill is not an answer the child saw complete.
        for line in output.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let parts: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(parts.len(), 4, "bad child line {line:?}");
            let n: u64 = parts[2].parse().expect("n");
            let seq: u64 = parts[3].parse().expect("seq");
            let previous = answered.insert((parts[1].to_owned(), n), seq);
            assert!(
                previous.is_none() || previous == Some(seq),
                "{} {n} answered twice with different seqs",
                parts[1]
            );
            total_answered_lines += 1;
        }

        let journal = open(&journal_dir);
        let report = journal.verify();
        assert!(
            report.is_ok(),
            "after kill {kill}: verify found {:?}",
            report.problems
        );
        let stats = journal.stats();
        let cursor = stats.sinks[0].cursor;
        assert!(
            cursor >= last_cursor,
            "after kill {kill}: sink cursor went back from {last_cursor} to {cursor}"
        );
        last_cursor = cursor;

        let mut stored: HashMap<uuid::Uuid, u64> = HashMap::new();
        let mut per_source_last: HashMap<String, u64> = HashMap::new();
        let mut ids = HashSet::new();
        journal
            .scan_events(0, |e| {
                assert!(
                    ids.insert(e.id),
                    "after kill {kill}: id {} stored twice",
                    e.id
                );
                let value: serde_json::Value =
                    serde_json::from_slice(&e.payload).expect("payload decodes");
                let n = value["n"].as_u64().expect("n");
                if let Some(prev) = per_source_last.insert(e.source.clone(), n) {
                    assert!(
                        n > prev,
                        "after kill {kill}: {} out of order: {n} after {prev}",
                        e.source
                    );
                }
                stored.insert(e.id, e.seq);
                true
            })
            .expect("scan");
        for ((source, n), seq) in &answered {
            if *seq >= cursor {
                assert_eq!(
                    stored.get(&crash_event_id(source, *n)),
                    Some(seq),
                    "after kill {kill}: answered append {source} #{n} (seq {seq}) is missing; sink cursor {cursor}"
                );
            }
        }
        for source in SOURCES {
            let max_answered = answered
                .range((source.to_owned(), 0)..=(source.to_owned(), u64::MAX))
                .map(|((_, n), _)| *n)
                .max();
            if let Some(max_answered) = max_answered {
                let stored_cursor = journal
                    .source_cursor(source)
                    .expect("cursor")
                    .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                    .expect("a source with answered appends has a cursor");
                assert!(stored_cursor >= max_answered, "after kill {kill}: {source} cursor {stored_cursor} behind answered {max_answered}");
            }
        }
        drop(journal);
    }
    assert!(
        total_answered_lines > KILLS,
        "the child must get appends answered between kills (got {total_answered_lines})"
    );
    eprintln!("{KILLS} kills, {total_answered_lines} answered appends checked");
}
