//! The ledger against a real sled directory: what it remembers of every
//! stored event and where that event is now, across a reopen, and its
//! bound on bytes.

use buffer::{AppendRequest, EventClass, Fate, Journal, JournalConfig, LedgerEntry, NewEvent};
use uuid::Uuid;

fn event(n: u64, routes: buffer::Routes) -> NewEvent {
    NewEvent {
        id: Uuid::from_u128(u128::from(n) + 1),
        class: EventClass::Business,
        routes,
        payload: format!("{{\"specversion\":\"1.0\",\"n\":{n}}}").into_bytes(),
        ledger: Some(LedgerEntry {
            at_ms: 1_800_000_000_000 + n * 100,
            line: format!("L{}", n % 2),
            event_type: "production.completion".into(),
            quantity: (n % 5) as f64,
        }),
    }
}

fn append(journal: &Journal, range: std::ops::Range<u64>) {
    let routes = journal.routes_all();
    journal
        .append_blocking(AppendRequest {
            source: "press1".into(),
            events: range.map(|n| event(n, routes)).collect(),
            cursor: None,
        })
        .expect("append")
        .expect("fits");
}

#[test]
fn the_ledger_remembers_every_event_and_its_fate_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = JournalConfig::new(dir.path().join("journal"));
    config.sinks = vec!["erp".into()];
    {
        let journal = Journal::open(config.clone()).expect("open");
        append(&journal, 0..10);
        let read = journal.read_batch("erp", 5).expect("read");
        let seqs: Vec<u64> = read.iter().map(|e| e.seq).collect();
        journal.ack("erp", &seqs[..4]).expect("ack");
        journal
            .reject("erp", seqs[4], "HTTP 422", 1)
            .expect("reject");
        // Sinks read the journal sequence into the envelope.
        let sent: serde_json::Value = serde_json::from_slice(&read[0].payload).expect("json");
        assert_eq!(sent["journalseq"], read[0].seq);
        journal.close().expect("close");
    }
    let journal = Journal::open(config).expect("reopen");
    let ledger = journal.ledger(0, u64::MAX).expect("ledger");
    assert_eq!(ledger.len(), 10);
    let fates: Vec<Fate> = ledger.iter().map(|e| e.fate).collect();
    assert_eq!(&fates[..4], &[Fate::Delivered; 4]);
    assert_eq!(fates[4], Fate::DeadLettered);
    assert!(fates[5..].iter().all(|f| *f == Fate::Pending), "{fates:?}");
    for (n, e) in ledger.iter().enumerate() {
        let n = n as u64;
        assert_eq!(e.id, Uuid::from_u128(u128::from(n) + 1));
        assert_eq!(e.at_ms, 1_800_000_000_000 + n * 100);
        assert_eq!(e.line, format!("L{}", n % 2));
        assert_eq!(e.quantity, (n % 5) as f64);
        assert_eq!(e.source, "press1");
    }
    // A window takes only its events.
    let window = journal
        .ledger(1_800_000_000_200, 1_800_000_000_500)
        .expect("window");
    assert_eq!(window.len(), 3);
}

#[test]
fn the_ledger_is_bounded_by_bytes_and_keeps_the_newest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = JournalConfig::new(dir.path().join("journal"));
    config.sinks = vec!["erp".into()];
    config.ledger_max_bytes = 16 * 1024;
    let journal = Journal::open(config).expect("open");
    for commit in 0..200u64 {
        append(&journal, commit * 10..commit * 10 + 10);
    }
    let ledger = journal.ledger(0, u64::MAX).expect("ledger");
    let bytes = journal.stats().ledger_bytes;
    // Checked at every commit: over by at most the record just written.
    assert!(bytes <= 16 * 1024 + 1024, "{bytes} bytes");
    assert!(ledger.len() < 2000, "the oldest went");
    assert_eq!(
        ledger.last().map(|e| e.id),
        Some(Uuid::from_u128(2000)),
        "the newest stays"
    );
    let per_event = bytes as f64 / ledger.len() as f64;
    assert!(per_event < 45.0, "{per_event:.1} bytes an event");
}
