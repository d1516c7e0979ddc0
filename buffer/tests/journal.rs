//! Journal behaviour, one concern per test, against a real sled directory.

use std::time::Duration;

use buffer::journal::JournalStats;
use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent, Routes};
use uuid::Uuid;

fn config(dir: &std::path::Path, sinks: &[&str]) -> JournalConfig {
    let mut config = JournalConfig::new(dir.join("journal"));
    config.sinks = sinks.iter().map(|s| s.to_string()).collect();
    config
}

fn event(n: u64, class: EventClass, routes: Routes) -> NewEvent {
    NewEvent {
        id: Uuid::from_u128(n as u128 + 1),
        class,
        routes,
        payload: format!(
            "{{\"type\":\"production.completion\",\"n\":{n},\"pad\":\"{}\"}}",
            "x".repeat(400)
        )
        .into_bytes(),
        ledger: None,
    }
}

fn append(journal: &Journal, source: &str, range: std::ops::Range<u64>) -> Vec<Option<u64>> {
    let routes = journal.routes_all();
    append_events(
        journal,
        source,
        range
            .map(|n| event(n, EventClass::Business, routes))
            .collect(),
    )
}

fn append_events(journal: &Journal, source: &str, events: Vec<NewEvent>) -> Vec<Option<u64>> {
    journal
        .append_blocking(AppendRequest {
            source: source.into(),
            events,
            cursor: None,
        })
        .expect("append")
        .expect("fits")
        .seqs
}

fn drain(journal: &Journal, sink: &str) -> Vec<u64> {
    let mut seen = Vec::new();
    loop {
        let batch = journal.read_batch(sink, 100).expect("read");
        if batch.is_empty() {
            return seen;
        }
        let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
        journal.ack(sink, &seqs).expect("ack");
        seen.extend(seqs);
    }
}

fn payload_n(payload: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(payload).expect("json");
    v["n"].as_u64().expect("n")
}

#[test]
fn appended_events_survive_reopen_and_are_read_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let journal = Journal::open(config(dir.path(), &["file"])).expect("open");
        assert_eq!(
            append(&journal, "press1", 0..300),
            (0..300).map(Some).collect::<Vec<_>>()
        );
        journal.close().expect("close");
    }
    let journal = Journal::open(config(dir.path(), &["file"])).expect("reopen");
    let mut got = Vec::new();
    loop {
        let batch = journal.read_batch("file", 128).expect("read");
        if batch.is_empty() {
            break;
        }
        got.extend(batch.iter().map(|e| payload_n(&e.payload)));
        journal
            .ack("file", &batch.iter().map(|e| e.seq).collect::<Vec<_>>())
            .expect("ack");
    }
    assert_eq!(got, (0..300).collect::<Vec<_>>());
    assert!(journal.verify().is_ok(), "{:?}", journal.verify());
}

#[test]
fn duplicate_ids_are_not_appended_again_even_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let journal = Journal::open(config(dir.path(), &["file"])).expect("open");
        append(&journal, "press1", 0..10);
        let again = append(&journal, "press1", 5..15);
        assert_eq!(again[..5], [None, None, None, None, None]);
        assert_eq!(again[5..], (10..15).map(Some).collect::<Vec<_>>()[..]);
    }
    let journal = Journal::open(config(dir.path(), &["file"])).expect("reopen");
    let after = append(&journal, "press1", 0..16);
    assert_eq!(
        after.iter().filter(|s| s.is_some()).count(),
        1,
        "only id 15 is new"
    );
    assert_eq!(drain(&journal, "file").len(), 16);
    assert_eq!(journal.counters().duplicates, 5 + 15);
}

#[test]
fn source_cursor_is_stored_with_its_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["file"])).expect("open");
    let routes = journal.routes_all();
    journal
        .append_blocking(AppendRequest {
            source: "press1".into(),
            events: vec![event(1, EventClass::Business, routes)],
            cursor: Some(b"epoch=2;value=18342".to_vec()),
        })
        .expect("append")
        .expect("fits");
    drop(journal);
    let journal = Journal::open(config(dir.path(), &["file"])).expect("reopen");
    assert_eq!(
        journal.source_cursor("press1").expect("cursor").as_deref(),
        Some(&b"epoch=2;value=18342"[..])
    );
    assert_eq!(journal.source_cursor("other").expect("cursor"), None);
}

#[test]
fn ack_advances_cursor_only_over_contiguous_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let journal = Journal::open(config(dir.path(), &["file"])).expect("open");
        append(&journal, "press1", 0..10);
        let batch = journal.read_batch("file", 10).expect("read");
        assert_eq!(batch.len(), 10);
        journal.ack("file", &[0, 1, 2, 5, 6]).expect("ack");
        assert_eq!(sink_cursor(&journal.stats(), "file"), 3);
        journal.ack("file", &[3]).expect("ack");
        assert_eq!(sink_cursor(&journal.stats(), "file"), 4);
        journal.close().expect("close");
    }
    // After a restart, everything from the cursor on is handed out again:
    // 5 and 6 were acknowledged above a hole, so they are re-sent (same id).
    let journal = Journal::open(config(dir.path(), &["file"])).expect("reopen");
    let again: Vec<u64> = journal
        .read_batch("file", 100)
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(again, (4..10).collect::<Vec<_>>());
}

fn sink_cursor(stats: &JournalStats, sink: &str) -> u64 {
    stats
        .sinks
        .iter()
        .find(|s| s.name == sink)
        .expect("sink")
        .cursor
}

#[test]
fn rewind_resends_unacknowledged_but_not_acknowledged_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["mqtt"])).expect("open");
    append(&journal, "press1", 0..6);
    journal.read_batch("mqtt", 6).expect("read");
    journal.ack("mqtt", &[0, 2, 4]).expect("ack");
    journal.rewind("mqtt").expect("rewind");
    let again: Vec<u64> = journal
        .read_batch("mqtt", 100)
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(again, vec![1, 3, 5]);
}

#[test]
fn events_are_read_only_by_the_sinks_they_are_routed_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["a", "b"])).expect("open");
    let only_a = journal.routes_for(&["a".into()]).expect("routes");
    let both = journal.routes_all();
    let events = vec![
        event(0, EventClass::Business, only_a),
        event(1, EventClass::Business, both),
    ];
    journal
        .append_blocking(AppendRequest {
            source: "s".into(),
            events,
            cursor: None,
        })
        .expect("append")
        .expect("fits");
    assert_eq!(drain(&journal, "a"), vec![0, 1]);
    assert_eq!(drain(&journal, "b"), vec![1]);
    let stats = journal.stats();
    assert_eq!(
        stats.pending_events, 0,
        "collected once both sinks are done: {stats:?}"
    );
    assert_eq!(stats.pending_bytes, 0);
}

#[test]
fn delivered_events_are_collected_and_free_their_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["a", "b"])).expect("open");
    append(&journal, "s", 0..200);
    let before = journal.stats().pending_bytes;
    assert!(before > 200 * 400);
    drain(&journal, "a");
    assert_eq!(
        journal.stats().pending_bytes,
        before,
        "b has not delivered yet"
    );
    drain(&journal, "b");
    assert_eq!(journal.stats().pending_bytes, 0);
    assert_eq!(
        journal.stats().used_bytes,
        before,
        "acks are saved and chunks collected with the next commit, not at once"
    );
    // The next commit collects (one batch with its events)...
    append(&journal, "s", 1000..1001);
    assert!(journal.stats().used_bytes < 1000, "{:?}", journal.stats());
    drain(&journal, "a");
    drain(&journal, "b");
    // ...and with none coming, the writer saves acks within a second.
    journal.save_acks().expect("save acks");
    assert_eq!(journal.stats().pending_bytes, 0);
    assert_eq!(journal.stats().used_bytes, 0);
    assert_eq!(journal.stats().pending_events, 0);
    drop(journal);
    let journal = Journal::open(config(dir.path(), &["a", "b"])).expect("reopen");
    assert_eq!(journal.stats().used_bytes, 0, "collection was stored");
}

#[test]
fn rejected_event_goes_to_dead_letters_and_can_be_requeued_with_its_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["erp"])).expect("open");
    append(&journal, "press1", 0..3);
    let batch = journal.read_batch("erp", 10).expect("read");
    journal.ack("erp", &[0, 2]).expect("ack");
    journal
        .reject("erp", 1, "HTTP 422: unknown material", 3)
        .expect("reject");
    assert_eq!(
        sink_cursor(&journal.stats(), "erp"),
        3,
        "reject counts as done"
    );
    let dead = journal.dead_letters().expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "HTTP 422: unknown material");
    assert_eq!(dead[0].sink, "erp");
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].id, batch[1].id);
    assert_eq!(journal.counters().rejected, 1);

    assert_eq!(journal.requeue_dead_letters(None).expect("requeue"), 1);
    assert!(journal.dead_letters().expect("list").is_empty());
    let again = journal.read_batch("erp", 10).expect("read");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, batch[1].id, "requeued with its original id");
    assert_eq!(again[0].payload, batch[1].payload);
    journal
        .reject("erp", again[0].seq, "still bad", 1)
        .expect("reject");
    assert_eq!(journal.purge_dead_letters(None).expect("purge"), 1);
    assert_eq!(journal.stats().dead_letters, 0);
    assert_eq!(journal.counters().purged, 1);
}

#[test]
fn expired_events_become_dead_letters_not_void() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), &["erp"]);
    cfg.ttl = Some(Duration::from_millis(1));
    let journal = Journal::open(cfg).expect("open");
    append(&journal, "press1", 0..5);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(journal.expire_now().expect("expire"), 5);
    let dead = journal.dead_letters().expect("list");
    assert_eq!(dead.len(), 5);
    assert!(dead.iter().all(|d| d.reason == "expired"));
    assert_eq!(journal.counters().expired, 5);
    assert!(journal.read_batch("erp", 10).expect("read").is_empty());
    assert_eq!(journal.stats().pending_events, 0);
}

#[test]
fn business_appends_are_refused_when_full_and_fit_again_after_delivery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), &["erp"]);
    cfg.max_bytes = 20_000;
    let journal = Journal::open(cfg).expect("open");
    let routes = journal.routes_all();
    let mut n = 0;
    loop {
        let outcome = journal
            .append_blocking(AppendRequest {
                source: "s".into(),
                events: vec![event(n, EventClass::Business, routes)],
                cursor: None,
            })
            .expect("append");
        if outcome.is_none() {
            break;
        }
        n += 1;
        assert!(n < 1000, "bound never hit");
    }
    assert!(journal.stats().used_bytes <= 20_000);
    assert!(journal.is_full());
    assert_eq!(journal.counters().dropped_telemetry, 0);
    drain(&journal, "erp");
    let outcome = journal
        .append_blocking(AppendRequest {
            source: "s".into(),
            events: vec![event(n, EventClass::Business, routes)],
            cursor: None,
        })
        .expect("append");
    assert!(outcome.is_some(), "space freed by delivery");
    assert!(!journal.is_full());
}

#[test]
fn telemetry_drops_oldest_when_full_and_counts_every_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), &["erp"]);
    cfg.max_bytes = 40_000;
    let journal = Journal::open(cfg).expect("open");
    let routes = journal.routes_all();
    for n in 0..200 {
        journal
            .append_blocking(AppendRequest {
                source: "state".into(),
                events: vec![event(n, EventClass::Telemetry, routes)],
                cursor: None,
            })
            .expect("telemetry never blocks")
            .expect("telemetry never parks");
    }
    let stats = journal.stats();
    assert!(stats.used_bytes <= 40_000, "{stats:?}");
    let dropped = journal.counters().dropped_telemetry;
    assert!(dropped > 100, "dropped {dropped}");
    let delivered = drain(&journal, "erp");
    assert_eq!(
        delivered.len() as u64 + dropped,
        200,
        "every event delivered or counted"
    );
    assert_eq!(*delivered.last().expect("some"), 199, "the newest survive");
    assert!(journal.verify().is_ok(), "{:?}", journal.verify());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_parks_business_appends_until_space_frees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), &["erp"]);
    cfg.max_bytes = 5_000;
    let journal = Journal::open(cfg).expect("open");
    let (appender, writer) = journal.start_writer();
    let routes = journal.routes_all();
    for n in 0..10 {
        appender
            .append(AppendRequest {
                source: "s".into(),
                events: vec![event(n, EventClass::Business, routes)],
                cursor: None,
            })
            .await
            .expect("append");
    }
    let blocked = {
        let appender = appender.clone();
        tokio::spawn(async move {
            appender
                .append(AppendRequest {
                    source: "s".into(),
                    events: vec![event(10, EventClass::Business, routes)],
                    cursor: None,
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !blocked.is_finished(),
        "a full journal must hold the append"
    );
    assert!(journal.is_full());
    let j = journal.clone();
    tokio::task::spawn_blocking(move || drain(&j, "erp"))
        .await
        .expect("drain");
    let outcome = tokio::time::timeout(Duration::from_secs(10), blocked)
        .await
        .expect("unparked")
        .expect("task")
        .expect("append");
    assert_eq!(outcome.appended(), 1);
    assert_eq!(journal.counters().backpressured, 1);
    drop(appender);
    writer.await.expect("writer ends when appenders are gone");
}

#[test]
fn a_long_drain_with_no_commits_collects_as_it_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["erp"])).expect("open");
    // One commit (and so one chunk) per event.
    for n in 0..1000 {
        append(&journal, "s", n..n + 1);
    }
    let before = journal.stats().used_bytes;
    drain(&journal, "erp");
    let after = journal.stats().used_bytes;
    assert!(
        after * 3 < before,
        "delivered chunks piled up waiting for a commit: {after} of {before} bytes still used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_with_no_commit_after_them_are_saved_by_the_writer_within_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["erp"])).expect("open");
    let (appender, writer) = journal.start_writer();
    let routes = journal.routes_all();
    appender
        .append(AppendRequest {
            source: "s".into(),
            events: (0..5)
                .map(|n| event(n, EventClass::Business, routes))
                .collect(),
            cursor: None,
        })
        .await
        .expect("append");
    let j = journal.clone();
    tokio::task::spawn_blocking(move || drain(&j, "erp"))
        .await
        .expect("drain");
    assert!(journal.stats().used_bytes > 0, "not collected at the ack");
    // No append follows: the writer's tick saves the cursor and collects.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while journal.stats().used_bytes > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivered chunks never collected: {:?}",
            journal.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(appender);
    writer.await.expect("writer");
    drop(journal);
    let journal = Journal::open(config(dir.path(), &["erp"])).expect("reopen");
    assert!(journal.read_batch("erp", 10).expect("read").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sources_share_group_commits_and_keep_their_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["erp"])).expect("open");
    let (appender, _writer) = journal.start_writer();
    let routes = journal.routes_all();
    let mut tasks = Vec::new();
    for source in 0..8u64 {
        let appender = appender.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..50u64 {
                let id = source * 1000 + n;
                appender
                    .append(AppendRequest {
                        source: format!("s{source}"),
                        events: vec![event(id, EventClass::Business, routes)],
                        cursor: Some(n.to_be_bytes().to_vec()),
                    })
                    .await
                    .expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("source");
    }
    let mut per_source: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    journal
        .scan_events(0, |e| {
            per_source
                .entry(e.source.clone())
                .or_default()
                .push(payload_n(&e.payload) % 1000);
            true
        })
        .expect("scan");
    assert_eq!(per_source.len(), 8);
    for (source, ns) in per_source {
        assert_eq!(ns, (0..50).collect::<Vec<_>>(), "{source} out of order");
        assert_eq!(
            journal.source_cursor(&source).expect("cursor"),
            Some(49u64.to_be_bytes().to_vec())
        );
    }
}

#[test]
fn removed_sink_leaves_its_backlog_in_dead_letters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["a", "b"])).expect("open");
    append(&journal, "s", 0..7);
    drain(&journal, "a");
    assert_eq!(journal.retire_sink("b").expect("retire"), 7);
    let dead = journal.dead_letters().expect("list");
    assert_eq!(dead.len(), 7);
    assert!(dead
        .iter()
        .all(|d| d.reason == "sink-removed" && d.sink == "b"));
    assert_eq!(journal.stats().pending_events, 0);
}

#[test]
fn oversized_event_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["a"])).expect("open");
    let mut big = event(0, EventClass::Business, journal.routes_all());
    big.payload = vec![b'x'; buffer::journal::MAX_EVENT_BYTES + 1];
    let err = journal
        .append_blocking(AppendRequest {
            source: "s".into(),
            events: vec![big],
            cursor: None,
        })
        .expect_err("too large");
    assert!(err.to_string().contains("exceeds"), "{err}");
}

#[test]
fn stats_count_only_what_sinks_still_owe_even_inside_a_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["erp"])).expect("open");
    append(&journal, "s", 0..5);
    journal.read_batch("erp", 3).expect("read");
    journal.ack("erp", &[0, 1, 2]).expect("ack");
    assert_eq!(journal.stats().pending_events, 2);
    let listed: Vec<u64> = journal
        .list(0, 100)
        .expect("list")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        listed,
        vec![3, 4],
        "delivered events are not listed as pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_refused_at_their_source_are_kept_as_dead_letters_per_sink_not_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["erp", "archive"])).expect("open");
    let (appender, writer) = journal.start_writer();
    let routes = journal.routes_all();
    let request = |n: u64| AppendRequest {
        source: "mes".into(),
        events: vec![event(n, EventClass::Business, routes)],
        cursor: None,
    };
    let stored = appender
        .dead_letter(request(7), "record: missing field quantity")
        .await
        .expect("dead letter");
    assert_eq!(stored, 1);
    let again = appender
        .dead_letter(request(7), "record: missing field quantity")
        .await
        .expect("dead letter");
    assert_eq!(again, 0, "the same record seen again is not stored twice");
    drop(appender);
    writer.await.expect("writer");

    assert!(journal.read_batch("erp", 10).expect("read").is_empty());
    assert!(journal.read_batch("archive", 10).expect("read").is_empty());
    drop(journal);
    let journal = Journal::open(config(dir.path(), &["erp", "archive"])).expect("reopen");
    let dead = journal.dead_letters().expect("list");
    let mut sinks: Vec<&str> = dead.iter().map(|d| d.sink.as_str()).collect();
    sinks.sort_unstable();
    assert_eq!(sinks, ["archive", "erp"], "one dead letter per routed sink");
    assert!(dead
        .iter()
        .all(|d| d.reason == "record: missing field quantity" && d.id == Uuid::from_u128(8)));
    assert_eq!(journal.requeue_dead_letters(None).expect("requeue"), 2);
    assert_eq!(journal.read_batch("erp", 10).expect("read").len(), 1);
    assert_eq!(journal.read_batch("archive", 10).expect("read").len(), 1);
}

/// Every commit fsyncs sled's new blob files; a delivered chunk collected
/// on another thread makes sled delete blobs meanwhile. That must not
/// look like a failed sync (it poisoned the journal once).
#[test]
fn collecting_delivered_chunks_while_commits_sync_never_poisons_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["erp"])).expect("open");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let (journal, stop) = (journal.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut delivered = 0u64;
            loop {
                let batch = journal.read_batch("erp", 4096).expect("read");
                if batch.is_empty() {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return delivered;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                delivered += batch.len() as u64;
                journal
                    .ack("erp", &batch.iter().map(|e| e.seq).collect::<Vec<_>>())
                    .expect("ack while commits run");
            }
        })
    };
    let blobs = dir.path().join("journal").join("blobs");
    let mut most_blobs = 0;
    const ROUNDS: u64 = 40;
    const PER_ROUND: u64 = 4096;
    for round in 0..ROUNDS {
        append(&journal, "s", round * PER_ROUND..(round + 1) * PER_ROUND);
        let now = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        most_blobs = most_blobs.max(now);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let delivered = drain.join().expect("drain thread");
    assert!(
        !journal.is_poisoned(),
        "a concurrent collection poisoned the journal"
    );
    assert_eq!(delivered, ROUNDS * PER_ROUND, "every event delivered once");
    assert!(
        most_blobs > 0,
        "sled wrote no blob files, so this test exercised nothing"
    );
}

#[test]
fn rejecting_an_event_whose_chunk_was_dropped_still_frees_the_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), &["erp"]);
    cfg.max_bytes = 40_000;
    let journal = Journal::open(cfg).expect("open");
    let routes = journal.routes_all();
    let telemetry = |n: u64| {
        journal
            .append_blocking(AppendRequest {
                source: "state".into(),
                events: vec![event(n, EventClass::Telemetry, routes)],
                cursor: None,
            })
            .expect("append")
            .expect("telemetry never parks");
    };
    telemetry(0);
    // The sink holds event 0 in flight; meanwhile newer telemetry pushes
    // it out of the full journal.
    let handed = journal.read_batch("erp", 1).expect("read");
    assert_eq!(handed.len(), 1);
    for n in 1..200 {
        telemetry(n);
    }
    assert!(journal.counters().dropped_telemetry > 0);
    journal
        .reject("erp", handed[0].seq, "HTTP 422: late refusal", 1)
        .expect("reject");
    let stats = journal.stats();
    assert!(
        sink_cursor(&stats, "erp") > handed[0].seq,
        "the cursor is past the rejected event: {stats:?}"
    );
    let delivered = drain(&journal, "erp");
    assert_eq!(
        *delivered.last().expect("the rest flows"),
        199,
        "nothing stalls behind the dropped event"
    );
}

#[test]
fn what_a_sink_was_handed_and_did_not_finish_is_read_again_after_a_rewind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["erp"])).expect("open");
    append(&journal, "press1", 0..10);
    let first = journal.read_batch("erp", 10).expect("read");
    // Five confirmed, the rest of the batch abandoned (a failed write of
    // the acknowledgement, a stop, a panicking task).
    let done: Vec<u64> = first[..5].iter().map(|e| e.seq).collect();
    journal.ack("erp", &done).expect("ack");
    assert!(
        journal.read_batch("erp", 10).expect("read").is_empty(),
        "handed out: not read twice while in flight"
    );
    journal.rewind("erp").expect("rewind");
    let again: Vec<u64> = journal
        .read_batch("erp", 10)
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(again, first[5..].iter().map(|e| e.seq).collect::<Vec<_>>());
}

#[test]
fn a_journal_in_use_is_refused_as_locked_and_opens_once_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Journal::open(config(dir.path(), &["erp"])).expect("open");
    append(&first, "plc", 0..3);
    let mut impatient = config(dir.path(), &["erp"]);
    impatient.lock_wait = Duration::from_millis(200);
    match Journal::open(impatient) {
        Err(buffer::JournalError::Locked { path }) => {
            assert_eq!(path, dir.path().join("journal"))
        }
        Err(other) => panic!("a journal in use must be reported as locked, got {other}"),
        Ok(_) => panic!("two handles on one journal"),
    }
    drop(first);
    // sled lets go of its lock a moment after the close: waited out.
    let reopened = Journal::open(config(dir.path(), &["erp"])).expect("reopen after release");
    assert_eq!(
        drain(&reopened, "erp").len(),
        3,
        "nothing lost by the refused open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_poll_waits_for_the_commit_window_and_a_handshake_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config(dir.path(), &["erp"]);
    // Long enough that only an urgent append can end the wait.
    config.commit_window = Duration::from_secs(3600);
    let journal = Journal::open(config).expect("open");
    let (appender, _writer) = journal.start_writer();
    let routes = journal.routes_all();
    let request = move |n: u64, source: &str| AppendRequest {
        source: source.into(),
        events: vec![event(n, EventClass::Business, routes)],
        cursor: Some(n.to_be_bytes().to_vec()),
    };
    let deadline = Duration::from_secs(30);
    tokio::time::timeout(deadline, appender.append_batched(request(0, "counters")))
        .await
        .expect("the first commit does not wait")
        .expect("stored");
    let poll = tokio::spawn({
        let appender = appender.clone();
        async move { appender.append_batched(request(1, "counters")).await }
    });
    // Something that must not happen has no condition to wait for: the
    // pause only gives a broken window the time to show; with the hour-long
    // window a correct one cannot finish, however slow the machine.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "a counter poll shares the next commit");
    assert_eq!(
        journal
            .source_cursor("counters")
            .expect("cursor")
            .as_deref(),
        Some(&0u64.to_be_bytes()[..]),
        "the waiting poll's position is not stored yet"
    );
    tokio::time::timeout(deadline, appender.append(request(2, "handshake")))
        .await
        .expect("a handshake record is not held by the window")
        .expect("stored");
    tokio::time::timeout(deadline, poll)
        .await
        .expect("the waiting poll went with it")
        .expect("task")
        .expect("stored");
    assert_eq!(drain(&journal, "erp").len(), 3);
    assert_eq!(
        journal
            .source_cursor("counters")
            .expect("cursor")
            .as_deref(),
        Some(&1u64.to_be_bytes()[..]),
        "the poll's position is stored with its events"
    );
}

fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("journal").join("chunks"))
        .expect("chunks directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
}

/// Events whose payload LZ4 cannot shrink much (random hex), so that a
/// few thousand fill more than one 4 MiB segment.
fn append_incompressible(journal: &Journal, range: std::ops::Range<u64>) {
    let routes = journal.routes_all();
    let events = range
        .map(|n| {
            let noise: String = (0..12)
                .map(|_| Uuid::new_v4().simple().to_string())
                .collect();
            NewEvent {
                id: Uuid::from_u128(n as u128 + 1),
                class: EventClass::Business,
                routes,
                payload: format!("{{\"n\":{n},\"noise\":\"{noise}\"}}").into_bytes(),
                ledger: None,
            }
        })
        .collect();
    append_events(journal, "press1", events);
}

#[test]
fn delivered_segment_files_are_deleted_and_what_is_pending_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["file"])).expect("open");
    for start in (0..24_000).step_by(1000) {
        append_incompressible(&journal, start..start + 1000);
    }
    let written = segment_files(dir.path());
    assert!(
        written.len() >= 3,
        "{} segment files for ~11 MB",
        written.len()
    );
    assert_eq!(drain(&journal, "file").len(), 24_000);
    // The next commit removes the delivered chunks' pointers, syncs, and
    // only then deletes their segments; the active one stays.
    append_incompressible(&journal, 24_000..24_010);
    let left = segment_files(dir.path());
    assert_eq!(
        left,
        written[written.len() - 1..],
        "only the segment being appended to is left"
    );
    journal.close().expect("close");
    drop(journal);

    let journal = Journal::open(config(dir.path(), &["file"])).expect("reopen");
    let batch = journal.read_batch("file", 100).expect("read");
    let got: Vec<u64> = batch.iter().map(|e| payload_n(&e.payload)).collect();
    assert_eq!(got, (24_000..24_010).collect::<Vec<_>>());
    assert_eq!(
        segment_files(dir.path()),
        left,
        "a reopen keeps what a pointer names"
    );
}

#[test]
fn a_damaged_segment_is_quarantined_with_its_bytes_not_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["file"])).expect("open");
    append_incompressible(&journal, 0..10);
    journal.close().expect("close");
    drop(journal);
    let segment = segment_files(dir.path()).pop().expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    bytes[10] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("damage");

    let journal = Journal::open(config(dir.path(), &["file"])).expect("reopen");
    assert!(journal.read_batch("file", 100).expect("read").is_empty());
    assert_eq!(
        journal.stats().counters.quarantined,
        10,
        "counted, not silently dropped"
    );
    // The next commit deletes the segment no pointer names any more; the
    // damaged bytes stay in the journal's quarantine for recovery by hand.
    append_incompressible(&journal, 10..11);
    assert!(
        !segment.exists(),
        "segment deleted once its chunk was quarantined"
    );
    journal.close().expect("close");
    drop(journal);
    let db = sled::open(dir.path().join("journal")).expect("sled");
    let mut key = vec![b'q'];
    key.extend_from_slice(&0u64.to_be_bytes());
    let kept = db.get(key).expect("get").expect("quarantined chunk");
    assert_eq!(
        &kept[..],
        &bytes[..],
        "the damaged chunk's bytes, not its pointer"
    );
}

#[test]
fn a_segment_that_cannot_be_read_is_an_error_to_retry_not_a_quarantine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(config(dir.path(), &["file"])).expect("open");
    append_incompressible(&journal, 0..10);
    journal.close().expect("close");
    drop(journal);
    // Reading a directory fails with EISDIR: an I/O error that says nothing
    // about the bytes, like EIO on a flaky card or running out of file
    // descriptors.
    let segment = segment_files(dir.path()).pop().expect("a segment");
    let bytes = std::fs::read(&segment).expect("read");
    std::fs::remove_file(&segment).expect("remove");
    std::fs::create_dir(&segment).expect("a directory in its place");

    let journal = Journal::open(config(dir.path(), &["file"])).expect("reopen");
    let error = journal.read_batch("file", 100).expect_err("an error");
    assert!(
        matches!(error, buffer::JournalError::SegmentRead { .. }),
        "{error}"
    );
    assert_eq!(
        journal.stats().counters.quarantined,
        0,
        "nothing quarantined"
    );
    assert_eq!(journal.stats().pending_events, 10);

    // Once the file reads again, the sink gets every event.
    std::fs::remove_dir(&segment).expect("remove directory");
    std::fs::write(&segment, &bytes).expect("restore");
    let got: Vec<u64> = journal
        .read_batch("file", 100)
        .expect("read")
        .iter()
        .map(|e| payload_n(&e.payload))
        .collect();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}
