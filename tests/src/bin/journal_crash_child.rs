//! Crash-test child: appends from several sources until it is SIGKILLed.
//!
//! Usage: `journal_crash_child DIR`. Each source resumes from the cursor it
//! stored with its last durable append (like a real counter source), then
//! appends one event per request. After each answered append it prints
//! `A <source> <n> <seq>` and flushes stdout, so the parent knows exactly
//! which appends were acknowledged before the kill. A sink task reads and
//! acknowledges concurrently so that cursor writes and garbage collection
//! are in flight when the kill lands.

use std::io::Write;
use std::time::Duration;

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
use plant_edge_tests::crash::{crash_event_id, SINK, SOURCES};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: journal_crash_child DIR");
    let mut config = JournalConfig::new(dir);
    config.sinks = vec![SINK.to_owned()];
    config.cache_bytes = 4 << 20;
    let journal = Journal::open(config).expect("open journal");
    let (appender, _writer) = journal.start_writer();
    let routes = journal.routes_all();
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));

    let sink = {
        let journal = journal.clone();
        tokio::task::spawn_blocking(move || loop {
            let batch = journal.read_batch(SINK, 50).expect("read");
            if !batch.is_empty() {
                let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
                journal.ack(SINK, &seqs).expect("ack");
            }
            std::thread::sleep(Duration::from_millis(3));
        })
    };

    let mut tasks = Vec::new();
    for source in SOURCES {
        let appender = appender.clone();
        let journal = journal.clone();
        let stdout = stdout.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = journal
                .source_cursor(source)
                .expect("cursor")
                .map(|c| u64::from_be_bytes(c.try_into().expect("8-byte cursor")) + 1)
                .unwrap_or(0);
            loop {
                let event = NewEvent {
                    id: crash_event_id(source, n),
                    class: EventClass::Business,
                    routes,
                    payload: format!(
                        "{{\"source\":\"{source}\",\"n\":{n},\"pad\":\"{}\"}}",
                        "p".repeat(300)
                    )
                    .into_bytes(),
                    ledger: None,
                };
                let outcome = appender
                    .append(AppendRequest {
                        source: source.to_owned(),
                        events: vec![event],
                        cursor: Some(n.to_be_bytes().to_vec()),
                    })
                    .await
                    .expect("append");
                let seq = outcome.seqs[0].expect("fresh id is never a duplicate");
                let mut out = stdout.lock().expect("stdout");
                writeln!(out, "A {source} {n} {seq}").expect("print");
                out.flush().expect("flush");
                n += 1;
            }
        }));
    }
    for task in tasks {
        task.await.expect("source task");
    }
    sink.await.expect("sink");
}
