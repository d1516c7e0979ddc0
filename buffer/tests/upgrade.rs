//! Export/import and format upgrades against real sled directories: a
//! backlog, its dead letters and the sources' positions survive an export
//! and import, an upgrade keeps the old journal until committed, and a
//! rollback to it gets everything the newer version stored meanwhile.
//!
//! The "previous build" is this build with `PLANT_EDGE_TEST_JOURNAL_FORMAT=1`
//! (feature `test-format`): it writes format 1, chunks inline in sled; the
//! newer one is this build's own format 2, chunk bytes in segment files.
//! nextest runs each test in its own process, so setting the variable here
//! touches no other test.

use std::path::{Path, PathBuf};

use buffer::journal::upgrade;
use buffer::{AppendRequest, EventClass, Journal, JournalConfig, JournalError, NewEvent};
use uuid::Uuid;

fn event(n: u64, routes: buffer::Routes) -> NewEvent {
    NewEvent {
        id: Uuid::from_u128(u128::from(n) + 1),
        class: EventClass::Business,
        routes,
        payload: format!(
            "{{\"specversion\":\"1.0\",\"id\":\"{}\",\"type\":\"production.completion\",\"time\":\"2026-12-04T10:00:00.000Z\",\"data\":{{\"line\":\"L1\",\"quantity\":{n}}}}}",
            Uuid::from_u128(u128::from(n) + 1)
        )
        .into_bytes(),
        ledger: None,
    }
}

fn config(path: &Path) -> JournalConfig {
    let mut config = JournalConfig::new(path);
    config.sinks = vec!["erp".into(), "mqtt".into()];
    config
}

fn append(journal: &Journal, range: std::ops::Range<u64>, cursor: &str) {
    let routes = journal.routes_all();
    journal
        .append_blocking(AppendRequest {
            source: "press1".into(),
            events: range.map(|n| event(n, routes)).collect(),
            cursor: Some(cursor.as_bytes().to_vec()),
        })
        .expect("append")
        .expect("fits");
}

/// Ids pending for `sink`, in order.
fn pending(journal: &Journal, sink: &str) -> Vec<Uuid> {
    pending_seqs(journal, sink)
        .into_iter()
        .map(|(_, id)| id)
        .collect()
}

/// Sequences and ids pending for `sink`, in order (read from the start).
fn pending_seqs(journal: &Journal, sink: &str) -> Vec<(u64, Uuid)> {
    journal.rewind(sink).expect("rewind");
    let read = journal
        .read_batch(sink, 10_000)
        .expect("read")
        .into_iter()
        .map(|e| (e.seq, e.id))
        .collect();
    journal.rewind(sink).expect("rewind");
    read
}

fn ids(range: std::ops::Range<u64>) -> Vec<Uuid> {
    range.map(|n| Uuid::from_u128(u128::from(n) + 1)).collect()
}

fn open(path: &Path, format: Option<u32>) -> Result<Journal, JournalError> {
    match format {
        Some(n) => std::env::set_var("PLANT_EDGE_TEST_JOURNAL_FORMAT", n.to_string()),
        None => std::env::remove_var("PLANT_EDGE_TEST_JOURNAL_FORMAT"),
    }
    Journal::open(config(path))
}

fn close(journal: Journal) {
    journal.close().expect("close");
    drop(journal);
}

fn stamp(path: &Path) -> u32 {
    buffer::journal::format::read(path)
        .expect("read")
        .expect("stamped")
        .format
}

fn kept(path: &Path) -> PathBuf {
    path.with_file_name("journal.format-1")
}

#[test]
fn export_and_import_carry_the_backlog_per_sink_dead_letters_and_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = Journal::open(config(&dir.path().join("a"))).expect("open");
    append(&source, 0..10, "{\"counter\":10}");
    // erp has delivered 0..4 and refused 4; mqtt nothing.
    let read = source.read_batch("erp", 5).expect("read");
    source
        .ack("erp", &read[..4].iter().map(|e| e.seq).collect::<Vec<_>>())
        .expect("ack");
    source
        .reject("erp", read[4].seq, "422 order closed", 3)
        .expect("reject");
    let mut exported = Vec::new();
    let counts = source.export_to(&mut exported).expect("export");
    assert_eq!(
        (counts.events, counts.dead_letters, counts.positions),
        (10, 1, 1)
    );
    let text = String::from_utf8(exported.clone()).expect("utf8");
    assert!(text
        .lines()
        .next()
        .expect("header")
        .contains("\"plant_edge_journal\":1"));
    assert!(text
        .lines()
        .last()
        .expect("end")
        .contains("\"record\":\"end\""));

    let target = Journal::open(JournalConfig::new(dir.path().join("b"))).expect("open");
    let counts = target
        .import_from(&mut exported.as_slice())
        .expect("import");
    assert_eq!(
        (
            counts.events,
            counts.dead_letters,
            counts.positions,
            counts.duplicates,
            counts.complete
        ),
        (10, 1, 1, 0, true)
    );
    assert_eq!(
        pending(&target, "erp"),
        ids(5..10),
        "erp: what it had not delivered"
    );
    assert_eq!(
        pending_seqs(&target, "mqtt"),
        pending_seqs(&source, "mqtt"),
        "each event keeps its sequence (its journalseq)"
    );
    assert_eq!(target.stats().next_seq, source.stats().next_seq);
    assert_eq!(pending(&target, "mqtt"), ids(0..10), "mqtt: everything");
    let letters = target.dead_letters().expect("dead letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (
            letters[0].id,
            letters[0].sink.as_str(),
            letters[0].reason.as_str(),
            letters[0].attempts
        ),
        (ids(4..5)[0], "erp", "422 order closed", 3)
    );
    assert_eq!(
        target.source_cursor("press1").expect("cursor"),
        Some(b"{\"counter\":10}".to_vec())
    );
    // The payload is carried byte for byte.
    source.rewind("mqtt").expect("rewind");
    target.rewind("mqtt").expect("rewind");
    let original = source.read_batch("mqtt", 1).expect("read");
    let imported = target.read_batch("mqtt", 1).expect("read");
    assert_eq!(original[0].payload, imported[0].payload);

    // Again: nothing is stored twice.
    let again = target
        .import_from(&mut exported.as_slice())
        .expect("import again");
    assert_eq!(
        (again.events, again.dead_letters, again.duplicates),
        (0, 0, 11)
    );
    assert_eq!(target.stats().pending_events, 10);

    // A file cut short says so.
    let cut: Vec<u8> = text
        .lines()
        .take(4)
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    let fresh = Journal::open(JournalConfig::new(dir.path().join("c"))).expect("open");
    let partial = fresh.import_from(&mut cut.as_slice()).expect("import");
    assert_eq!((partial.events, partial.complete), (3, false));

    // A newer interchange version is refused, naming it.
    let newer = text.replacen("\"plant_edge_journal\":1", "\"plant_edge_journal\":7", 1);
    let refused = fresh
        .import_from(&mut newer.as_bytes())
        .expect_err("newer version refused");
    assert!(
        refused.to_string().contains("interchange version 7"),
        "{refused}"
    );
}

#[test]
fn an_upgrade_keeps_the_old_journal_until_committed_and_a_rollback_gets_all_the_newer_version_stored(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");

    // The current version: a backlog of 3.
    let journal = open(&path, Some(1)).expect("open");
    append(&journal, 0..3, "c3");
    close(journal);
    assert_eq!(stamp(&path), 1);

    // The newer version migrates into a new directory, keeps the old one.
    let before = {
        let journal = open(&path, Some(1)).expect("open");
        let read = pending_seqs(&journal, "erp");
        close(journal);
        read
    };
    let journal = open(&path, Some(2)).expect("upgrade");
    assert_eq!(
        pending_seqs(&journal, "erp"),
        before,
        "same sequences after the upgrade"
    );
    assert_eq!(stamp(&path), 2);
    assert_eq!(stamp(&kept(&path)), 1, "the old journal is kept as it was");
    let marker = journal.upgrade_pending().expect("uncommitted");
    assert_eq!((marker.from_format, marker.to_format), (1, 2));
    assert_eq!(pending(&journal, "erp"), ids(0..3));
    assert_eq!(
        journal.source_cursor("press1").expect("c"),
        Some(b"c3".to_vec())
    );
    append(&journal, 3..6, "c6");
    let newer = pending_seqs(&journal, "erp");
    // It delivers some of the backlog to erp before it is rolled back.
    let read = journal.read_batch("erp", 4).expect("read");
    journal
        .ack("erp", &read.iter().map(|e| e.seq).collect::<Vec<_>>())
        .expect("ack");
    close(journal);
    assert!(kept(&path).join(upgrade::SPOOL_FILE).exists());

    // Rolled back: the kept journal plus everything the newer one stored.
    let journal = open(&path, Some(1)).expect("rollback");
    assert_eq!(stamp(&path), 1);
    assert!(!kept(&path).exists() && !path.with_file_name("journal.rolled-back").exists());
    assert!(journal.upgrade_pending().is_none());
    assert_eq!(
        pending_seqs(&journal, "mqtt"),
        newer,
        "everything, in order, with the sequences the newer version gave"
    );
    // erp got 0..4 from the newer version: 3, which it stored itself, is
    // not sent again; 0..3 came from before the upgrade and go again with
    // the same ids (the spool knows deliveries of what it stored only).
    let mut expected = ids(0..3);
    expected.extend(ids(4..6));
    assert_eq!(pending(&journal, "erp"), expected);
    assert_eq!(
        journal.source_cursor("press1").expect("c"),
        Some(b"c6".to_vec())
    );
    assert!(!path.join(upgrade::SPOOL_FILE).exists());
    append(&journal, 6..8, "c8");
    close(journal);

    // Up again, then committed: the kept journal goes.
    let journal = open(&path, Some(2)).expect("upgrade again");
    assert_eq!(pending(&journal, "mqtt"), ids(0..8));
    assert_eq!(
        journal.source_cursor("press1").expect("c"),
        Some(b"c8".to_vec())
    );
    let (marker, freed) = journal
        .commit_upgrade()
        .expect("commit")
        .expect("was pending");
    assert_eq!(marker.kept, "journal.format-1");
    assert!(freed > 0);
    assert!(!kept(&path).exists());
    append(&journal, 8..9, "c9");
    close(journal);

    // Committed: the previous version refuses it and changes nothing.
    let before: Vec<_> = std::fs::read_dir(&path)
        .expect("dir")
        .flatten()
        .map(|e| (e.file_name(), std::fs::read(e.path()).ok()))
        .collect();
    let refused = open(&path, Some(1)).err().expect("refused");
    assert!(
        matches!(
            refused,
            JournalError::NewerFormat {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{refused}"
    );
    let after: Vec<_> = std::fs::read_dir(&path)
        .expect("dir")
        .flatten()
        .map(|e| (e.file_name(), std::fs::read(e.path()).ok()))
        .collect();
    assert_eq!(before, after);
}

#[test]
fn a_crash_anywhere_in_an_upgrade_or_rollback_is_finished_at_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    let journal = open(&path, Some(1)).expect("open");
    append(&journal, 0..3, "c3");
    close(journal);

    // A partial upgrade directory left by a crash is started again.
    std::fs::create_dir_all(path.with_file_name("journal.upgrading")).expect("mkdir");
    std::fs::write(path.with_file_name("journal.upgrading").join("db"), b"half").expect("write");
    let journal = open(&path, Some(2)).expect("upgrade");
    append(&journal, 3..5, "c5");
    close(journal);
    // Crashed between the two renames of the upgrade.
    std::fs::rename(&path, path.with_file_name("journal.upgrading")).expect("rename");
    let journal = open(&path, Some(2)).expect("finished");
    assert_eq!(pending(&journal, "erp"), ids(0..5));
    close(journal);

    // A crash half-way through a spool line: the line is cut, its commit
    // was never answered (its source reads it again).
    let spool = kept(&path).join(upgrade::SPOOL_FILE);
    let mut bytes = std::fs::read(&spool).expect("spool");
    bytes.extend_from_slice(b"{\"record\":\"event\",\"id\":\"00000000-00");
    std::fs::write(&spool, &bytes).expect("tear");
    let journal = open(&path, Some(2)).expect("opens");
    close(journal);
    let text = std::fs::read_to_string(&spool).expect("spool");
    assert!(text.ends_with('\n') && !text.contains("\"id\":\"00000000-00\n"));

    // Crashed between the two renames of the rollback.
    let journal = open(&path, Some(1)).expect("rollback");
    close(journal);
    let journal = open(&path, Some(2)).expect("upgrade");
    close(journal);
    std::fs::rename(&path, path.with_file_name("journal.rolled-back")).expect("rename");
    let journal = open(&path, Some(1)).expect("finished rollback");
    assert_eq!(stamp(&path), 1);
    assert_eq!(pending(&journal, "erp"), ids(0..5));
    assert_eq!(
        journal.source_cursor("press1").expect("c"),
        Some(b"c5".to_vec())
    );
}
