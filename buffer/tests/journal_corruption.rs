//! A damaged journal directory gives an error or a moved-aside journal,
//! never a panic, and never silently loses what is still readable.

use std::path::{Path, PathBuf};

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, JournalError, NewEvent};
use uuid::Uuid;

const EVENTS: u64 = 600;

fn config(path: &Path) -> JournalConfig {
    let mut config = JournalConfig::new(path);
    config.sinks = vec!["erp".into()];
    config
}

fn build(path: &Path) {
    let journal = Journal::open(config(path)).expect("open");
    let routes = journal.routes_all();
    for chunk in 0..EVENTS / 50 {
        let events = (chunk * 50..chunk * 50 + 50)
            .map(|n| NewEvent {
                id: Uuid::from_u128(n as u128 + 1),
                class: EventClass::Business,
                routes,
                payload: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "z".repeat(300)).into_bytes(),
                ledger: None,
            })
            .collect();
        journal
            .append_blocking(AppendRequest {
                source: "s".into(),
                events,
                cursor: None,
            })
            .expect("append")
            .expect("fits");
    }
    journal.close().expect("close");
}

/// Opens with move-aside; returns the events still readable (in order).
fn reopen(path: &Path) -> (Vec<u64>, Option<PathBuf>) {
    let (journal, aside) =
        Journal::open_or_move_aside(config(path)).expect("a usable journal, old or fresh");
    eprintln!(
        "reopened: moved aside {aside:?}, {} chunks verified",
        journal.verify().chunks
    );
    let report = journal.verify();
    let mut ns = Vec::new();
    let scan = journal.scan_events(0, |e| {
        let v: serde_json::Value =
            serde_json::from_slice(&e.payload).expect("stored payloads decode");
        ns.push(v["n"].as_u64().expect("n"));
        true
    });
    if scan.is_err() || !report.is_ok() {
        eprintln!(
            "journal reports problems (expected for damage): {:?} {:?}",
            scan.err(),
            report.problems
        );
    }
    (ns, aside)
}

fn flip_bytes(file: &Path, at_fraction: f64, count: usize) {
    let mut bytes = std::fs::read(file).expect("read");
    let start = ((bytes.len() as f64) * at_fraction) as usize;
    for b in bytes.iter_mut().skip(start).take(count) {
        *b ^= 0xA5;
    }
    std::fs::write(file, bytes).expect("write");
}

fn assert_prefix_or_moved(ns: &[u64], aside: &Option<PathBuf>) {
    match aside {
        Some(old) => {
            assert!(old.exists(), "the unreadable journal is kept, not deleted");
            assert!(ns.is_empty(), "a fresh journal starts empty");
        }
        None => {
            // What sled still reads must be a clean prefix, in order, no duplicates.
            assert_eq!(
                ns,
                (0..ns.len() as u64).collect::<Vec<_>>(),
                "readable part must be intact and in order"
            );
        }
    }
}

#[test]
fn truncated_log_recovers_a_prefix_or_moves_aside() {
    for fraction in [0.9, 0.5, 0.1] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        build(&path);
        let db = path.join("db");
        let len = std::fs::metadata(&db).expect("db").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .expect("open db")
            .set_len((len as f64 * fraction) as u64)
            .expect("truncate");
        let (ns, aside) = reopen(&path);
        assert_prefix_or_moved(&ns, &aside);
    }
}

#[test]
fn flipped_bytes_in_the_log_never_panic() {
    for (fraction, count) in [(0.3, 64), (0.6, 4096), (0.95, 16)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        build(&path);
        flip_bytes(&path.join("db"), fraction, count);
        let (ns, aside) = reopen(&path);
        assert_prefix_or_moved(&ns, &aside);
    }
}

/// sled rewrites `conf` at every open without syncing it: after a power
/// cut it can be torn. It holds the agent's own settings, so it is written
/// again; the journal is neither refused nor moved aside (rule 7).
#[test]
fn a_torn_or_garbage_sled_settings_file_is_rewritten_and_the_journal_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    build(&path);
    let good = std::fs::read(path.join("conf")).expect("conf");
    let torn: Vec<(&str, Vec<u8>)> = vec![
        ("half", good[..good.len() / 2].to_vec()),
        ("without its CRC", good[..good.len() - 4].to_vec()),
        ("garbage", b"\x00\x01this is not a sled config\xff".to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in torn {
        std::fs::write(path.join("conf"), &bytes).expect("write conf");
        let (ns, aside) = reopen(&path);
        assert!(aside.is_none(), "{what}: moved aside");
        assert_eq!(
            ns,
            (0..EVENTS).collect::<Vec<_>>(),
            "{what}: every event kept"
        );
        assert_eq!(
            std::fs::read(path.join("conf")).expect("conf"),
            good,
            "{what}: settings written again"
        );
    }
}

#[test]
fn positions_are_stored_compressed_and_a_damaged_one_reaches_the_source_as_unreadable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    let position = br#"{"counters":{"good":{"namespace":"6f1c3a52-97d4-4b0e-a1f3-2c5d8e9b7a10","epoch":0,"raw":48211,"total":48211}},"records":{}}"#;
    {
        let journal = Journal::open(config(&path)).expect("open");
        let routes = journal.routes_all();
        journal
            .append_blocking(AppendRequest {
                source: "line1".into(),
                events: vec![NewEvent {
                    id: Uuid::from_u128(1),
                    class: EventClass::Business,
                    routes,
                    payload: b"{}".to_vec(),
                    ledger: None,
                }],
                cursor: Some(position.to_vec()),
            })
            .expect("append")
            .expect("fits");
        journal.close().expect("close");
    }
    let key = b"cline1";
    {
        let db = open_raw(&path);
        let stored = db.get(key).expect("get").expect("cursor stored");
        assert!(
            stored.len() < position.len() * 3 / 4,
            "stored {} bytes for a {}-byte position",
            stored.len(),
            position.len()
        );
    }
    {
        let journal = Journal::open(config(&path)).expect("reopen");
        assert_eq!(
            journal.source_cursor("line1").expect("cursor").as_deref(),
            Some(&position[..])
        );
        journal.close().expect("close");
    }
    let damaged = {
        let db = open_raw(&path);
        let mut value = db.get(key).expect("get").expect("cursor").to_vec();
        let last = value.len() - 1;
        value.truncate(last / 2);
        db.insert(key, value.clone()).expect("damage");
        db.flush().expect("flush");
        value
    };
    let journal = Journal::open(config(&path)).expect("reopen damaged");
    assert_eq!(
        journal.source_cursor("line1").expect("no error").as_deref(),
        Some(&damaged[..]),
        "handed over as stored, for the source's unreadable-position path"
    );
}

/// Opens the journal's sled directory directly. sled releases its file
/// lock only when its background threads let go of the closed journal, a
/// moment after `close` (`Journal::open` waits the same way).
fn open_raw(path: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return db,
            Err(e) if e.to_string().contains("could not acquire lock") => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "sled lock still held 10 s after close: {e}"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("raw sled open: {e}"),
        }
    }
}

/// Overwrites one sled value of the journal, as a bad sector would.
fn damage_value(path: &Path, family: u8, nth: usize) -> u64 {
    let db = open_raw(path);
    let (key, _) = db
        .scan_prefix([family])
        .nth(nth)
        .expect("entry")
        .expect("read");
    db.insert(&key, &b"\xff\xfe garbage"[..]).expect("damage");
    db.flush().expect("flush");
    u64::from_be_bytes(key[1..9].try_into().expect("seq key"))
}

fn drain_all(journal: &Journal) -> Vec<u64> {
    let mut ns = Vec::new();
    loop {
        let batch = journal.read_batch("erp", 100).expect("read");
        if batch.is_empty() {
            return ns;
        }
        for e in &batch {
            let v: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
            ns.push(v["n"].as_u64().expect("n"));
        }
        journal
            .ack("erp", &batch.iter().map(|e| e.seq).collect::<Vec<_>>())
            .expect("ack");
    }
}

#[test]
fn undecodable_chunk_is_quarantined_and_the_rest_still_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    build(&path);
    let first = damage_value(&path, b'e', 3);
    let journal = Journal::open(config(&path)).expect("opens despite one bad chunk");
    assert!(
        !journal.verify().is_ok(),
        "verify must report the damaged chunk"
    );
    let delivered = drain_all(&journal);
    let lost = EVENTS - delivered.len() as u64;
    assert!(
        lost > 0 && lost <= 64,
        "only the damaged chunk is held back (lost {lost})"
    );
    assert!(delivered.windows(2).all(|w| w[0] < w[1]), "order kept");
    assert!(
        !delivered.contains(&first),
        "the damaged chunk's events are not invented"
    );
    assert_eq!(
        journal.counters().quarantined,
        lost,
        "every held-back event is counted"
    );
}

#[test]
fn undecodable_index_entry_costs_only_its_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    build(&path);
    damage_value(&path, b'k', 2);
    let journal = Journal::open(config(&path)).expect("opens despite one bad index entry");
    let report = journal.verify();
    assert!(
        report.problems.iter().any(|p| p.contains("without meta")),
        "{:?}",
        report.problems
    );
    let delivered = drain_all(&journal);
    assert!(
        delivered.len() as u64 >= EVENTS - 64,
        "the rest is delivered ({} of {EVENTS})",
        delivered.len()
    );
}

/// Names in `dir` that look like a journal moved aside.
fn moved_aside(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("unreadable"))
        .collect()
}

#[test]
fn an_io_error_at_open_is_an_error_and_nothing_on_disk_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A journal path that is a file, not a directory.
    let file = dir.path().join("journal");
    std::fs::write(&file, b"not a journal").expect("write");
    let error = Journal::open_or_move_aside(config(&file))
        .err()
        .expect("a file is no journal");
    assert!(
        error.to_string().contains(&file.display().to_string()),
        "names the path: {error}"
    );
    assert_eq!(std::fs::read(&file).expect("read"), b"not a journal");
    assert!(moved_aside(dir.path()).is_empty());

    // sled's log is not what sled expects (a directory): an I/O error,
    // the journal with its backlog stays where it is.
    let path = dir.path().join("journal2");
    build(&path);
    let db = path.join("db");
    let log = std::fs::read(&db).expect("read db");
    std::fs::rename(&db, path.join("db.kept")).expect("rename");
    std::fs::create_dir(&db).expect("mkdir");
    match Journal::open_or_move_aside(config(&path)) {
        Err(JournalError::Open {
            path: named,
            reason,
        }) => {
            assert_eq!(named, path);
            assert!(reason.to_lowercase().contains("directory"), "{reason}");
        }
        Err(other) => panic!("expected an I/O error, got {other}"),
        Ok(_) => panic!("a directory is not a log"),
    }
    assert!(moved_aside(dir.path()).is_empty(), "nothing moved aside");
    // Put right, the same journal opens with everything it held.
    std::fs::remove_dir(&db).expect("rmdir");
    std::fs::rename(path.join("db.kept"), &db).expect("rename back");
    assert_eq!(std::fs::read(&db).expect("read"), log);
    let (ns, aside) = reopen(&path);
    assert!(aside.is_none());
    assert_eq!(ns.len() as u64, EVENTS, "the backlog is intact");
}
