//! Property test: the journal against an in-memory model.
//!
//! Random sequences of append / read / ack / reject / rewind / restart /
//! requeue, on two sinks with mixed routing, over a real sled directory.
//! After every step each sink cursor must lie between the model's bounds
//! (it never passes an event the sink still owes, and never lags behind
//! what the sink has finished and read past), every read must be exactly the next events the
//! model expects, and at the end a full drain must deliver or dead-letter
//! every routed event: nothing lost, nothing appended twice.

use std::collections::{BTreeMap, BTreeSet};

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
use proptest::prelude::*;
use uuid::Uuid;

const SINKS: [&str; 2] = ["a", "b"];

#[derive(Clone, Debug)]
enum Op {
    Append {
        source: u8,
        count: u8,
        reuse: Option<u8>,
        only: Option<u8>,
    },
    Read {
        sink: u8,
        max: u8,
    },
    Ack {
        sink: u8,
        pick: u8,
    },
    Reject {
        sink: u8,
        pick: u8,
    },
    Rewind {
        sink: u8,
    },
    Restart,
    Requeue,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 1u8..6, proptest::option::weighted(0.2, any::<u8>()), proptest::option::weighted(0.3, 0u8..2))
            .prop_map(|(source, count, reuse, only)| Op::Append { source, count, reuse, only }),
        4 => (0u8..2, 1u8..8).prop_map(|(sink, max)| Op::Read { sink, max }),
        4 => (0u8..2, any::<u8>()).prop_map(|(sink, pick)| Op::Ack { sink, pick }),
        1 => (0u8..2, any::<u8>()).prop_map(|(sink, pick)| Op::Reject { sink, pick }),
        1 => (0u8..2).prop_map(|sink| Op::Rewind { sink }),
        1 => Just(Op::Restart),
        1 => Just(Op::Requeue),
    ]
}

#[derive(Clone, Debug)]
struct ModelEvent {
    id: Uuid,
    routed: [bool; 2],
}

#[derive(Default, Debug)]
struct ModelSink {
    done: BTreeSet<u64>,
    in_flight: Vec<u64>,
    read_upto: u64,
    /// The journal has scanned (and skipped unrouted events) at least this far.
    scanned_upto: u64,
    delivered_ids: Vec<Uuid>,
}

#[derive(Default, Debug)]
struct Model {
    events: BTreeMap<u64, ModelEvent>,
    next_seq: u64,
    ids_seen: BTreeSet<Uuid>,
    next_id: u128,
    sinks: [ModelSink; 2],
    /// (sink, id) in dead-letter order.
    dead: Vec<(usize, Uuid)>,
}

impl Model {
    /// Highest legal cursor: the first routed event the sink has not finished.
    fn cursor_upper(&self, sink: usize) -> u64 {
        (0..self.next_seq)
            .find(|seq| {
                let routed = self.events.get(seq).is_some_and(|e| e.routed[sink]);
                routed && !self.sinks[sink].done.contains(seq)
            })
            .unwrap_or(self.next_seq)
    }

    /// Lowest legal cursor: unrouted events count as done once read past.
    fn cursor_lower(&self, sink: usize) -> u64 {
        let s = &self.sinks[sink];
        (0..self.next_seq)
            .find(|seq| {
                let routed = self.events.get(seq).is_some_and(|e| e.routed[sink]);
                let skipped = !routed && *seq < s.scanned_upto;
                !s.done.contains(seq) && !skipped
            })
            .unwrap_or(self.next_seq)
    }

    fn expected_unread(&self, sink: usize) -> Vec<u64> {
        let s = &self.sinks[sink];
        self.events
            .iter()
            .filter(|(seq, e)| **seq >= s.read_upto && e.routed[sink] && !s.done.contains(seq))
            .map(|(seq, _)| *seq)
            .collect()
    }
}

fn open(dir: &std::path::Path) -> Journal {
    let mut config = JournalConfig::new(dir.join("journal"));
    config.sinks = SINKS.iter().map(|s| s.to_string()).collect();
    config.cache_bytes = 1 << 20;
    Journal::open(config).expect("open")
}

fn cursor_of(journal: &Journal, sink: usize) -> u64 {
    journal
        .stats()
        .sinks
        .iter()
        .find(|s| s.name == SINKS[sink])
        .expect("sink")
        .cursor
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut journal = open(dir.path());
    let mut model = Model::default();
    let mut last_cursor = [0u64; 2];
    for op in ops {
        match op {
            Op::Append {
                source,
                count,
                reuse,
                only,
            } => {
                let routed = match only {
                    Some(sink) => {
                        let mut r = [false; 2];
                        r[sink as usize] = true;
                        r
                    }
                    None => [true; 2],
                };
                let routes = match only {
                    Some(sink) => journal
                        .routes_for(&[SINKS[sink as usize].to_string()])
                        .expect("routes"),
                    None => journal.routes_all(),
                };
                let mut events = Vec::new();
                let mut ids = Vec::new();
                for i in 0..count {
                    let id = match (reuse, model.ids_seen.len()) {
                        (Some(pick), n) if n > 0 && i == 0 => {
                            *model.ids_seen.iter().nth(pick as usize % n).expect("id")
                        }
                        _ => {
                            model.next_id += 1;
                            Uuid::from_u128(model.next_id)
                        }
                    };
                    ids.push(id);
                    events.push(NewEvent {
                        id,
                        class: EventClass::Business,
                        routes,
                        payload: id.to_string().into_bytes(),
                        ledger: None,
                    });
                }
                let outcome = journal
                    .append_blocking(AppendRequest {
                        source: format!("s{source}"),
                        events,
                        cursor: None,
                    })
                    .expect("append")
                    .expect("fits");
                let mut batch_ids = BTreeSet::new();
                for (id, seq) in ids.iter().zip(&outcome.seqs) {
                    let duplicate = model.ids_seen.contains(id) || !batch_ids.insert(*id);
                    prop_assert_eq!(seq.is_none(), duplicate, "dedup verdict for {}", id);
                    if let Some(seq) = seq {
                        prop_assert_eq!(*seq, model.next_seq, "sequences are contiguous");
                        model.events.insert(*seq, ModelEvent { id: *id, routed });
                        model.next_seq += 1;
                    }
                }
                model.ids_seen.extend(ids);
            }
            Op::Read { sink, max } => {
                let sink = sink as usize;
                let got = journal.read_batch(SINKS[sink], max as usize).expect("read");
                let expected = model.expected_unread(sink);
                let got_seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
                prop_assert!(got_seqs.len() <= max as usize);
                prop_assert_eq!(
                    &got_seqs[..],
                    &expected[..got_seqs.len()],
                    "read must be the next events in order"
                );
                prop_assert_eq!(
                    got_seqs.is_empty(),
                    expected.is_empty(),
                    "empty only when caught up"
                );
                for e in &got {
                    prop_assert_eq!(e.id, model.events[&e.seq].id);
                }
                let s = &mut model.sinks[sink];
                match got_seqs.last() {
                    Some(last) => s.read_upto = last + 1,
                    None => s.read_upto = model.next_seq,
                }
                s.scanned_upto = s.scanned_upto.max(s.read_upto);
                model.sinks[sink].in_flight.extend(got_seqs);
            }
            Op::Ack { sink, pick } | Op::Reject { sink, pick }
                if model.sinks[sink as usize].in_flight.is_empty() =>
            {
                let _ = pick;
            }
            Op::Ack { sink, pick } => {
                let sink = sink as usize;
                let s = &mut model.sinks[sink];
                let seq = s.in_flight.remove(pick as usize % s.in_flight.len());
                journal.ack(SINKS[sink], &[seq]).expect("ack");
                s.done.insert(seq);
                s.delivered_ids.push(model.events[&seq].id);
            }
            Op::Reject { sink, pick } => {
                let sink = sink as usize;
                let s = &mut model.sinks[sink];
                let seq = s.in_flight.remove(pick as usize % s.in_flight.len());
                journal
                    .reject(SINKS[sink], seq, "model says no", 1)
                    .expect("reject");
                s.done.insert(seq);
                model.dead.push((sink, model.events[&seq].id));
            }
            Op::Rewind { sink } => {
                let sink = sink as usize;
                journal.rewind(SINKS[sink]).expect("rewind");
                let cursor = cursor_of(&journal, sink);
                let s = &mut model.sinks[sink];
                s.in_flight.clear();
                s.read_upto = cursor;
            }
            Op::Restart => {
                let cursors = [cursor_of(&journal, 0), cursor_of(&journal, 1)];
                journal.close().expect("close");
                drop(journal);
                journal = open(dir.path());
                for (sink, &cursor) in cursors.iter().enumerate() {
                    // Only the contiguous prefix is persisted: what was
                    // acknowledged above a hole is delivered again.
                    prop_assert_eq!(cursor_of(&journal, sink), cursor, "cursor survives restart");
                    let s = &mut model.sinks[sink];
                    s.done.retain(|seq| *seq < cursor);
                    s.in_flight.clear();
                    s.read_upto = cursor;
                    s.scanned_upto = cursor;
                }
            }
            Op::Requeue => {
                let requeued = journal.requeue_dead_letters(None).expect("requeue");
                prop_assert_eq!(requeued as usize, model.dead.len());
                for (sink, id) in std::mem::take(&mut model.dead) {
                    let mut routed = [false; 2];
                    routed[sink] = true;
                    model
                        .events
                        .insert(model.next_seq, ModelEvent { id, routed });
                    model.next_seq += 1;
                }
            }
        }
        for sink in 0..2 {
            let cursor = cursor_of(&journal, sink);
            let (lower, upper) = (model.cursor_lower(sink), model.cursor_upper(sink));
            prop_assert!(
                lower <= cursor && cursor <= upper,
                "cursor of {} is {}, model allows {}..={}",
                SINKS[sink],
                cursor,
                lower,
                upper
            );
            prop_assert!(cursor >= last_cursor[sink], "cursor moved backwards");
            last_cursor[sink] = cursor;
        }
        let dead_ids: Vec<Uuid> = journal
            .dead_letters()
            .expect("dead")
            .iter()
            .map(|d| d.id)
            .collect();
        prop_assert_eq!(
            dead_ids,
            model.dead.iter().map(|(_, id)| *id).collect::<Vec<_>>()
        );
    }

    // Drain everything: each routed event is delivered or dead, nothing lost.
    for (sink, name) in SINKS.iter().enumerate() {
        journal.rewind(name).expect("rewind");
        loop {
            let batch = journal.read_batch(name, 64).expect("read");
            if batch.is_empty() {
                break;
            }
            let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
            journal.ack(name, &seqs).expect("ack");
            model.sinks[sink]
                .delivered_ids
                .extend(batch.iter().map(|e| e.id));
        }
        let reached: BTreeSet<Uuid> = model.sinks[sink]
            .delivered_ids
            .iter()
            .copied()
            .chain(
                model
                    .dead
                    .iter()
                    .filter(|(s, _)| *s == sink)
                    .map(|(_, id)| *id),
            )
            .collect();
        for event in model.events.values().filter(|e| e.routed[sink]) {
            prop_assert!(
                reached.contains(&event.id),
                "{} lost for sink {}",
                event.id,
                SINKS[sink]
            );
        }
    }
    prop_assert_eq!(
        journal.stats().pending_events,
        0,
        "delivered events are collected"
    );
    let report = journal.verify();
    prop_assert!(report.is_ok(), "verify: {:?}", report.problems);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn journal_matches_model_through_acks_rejects_restarts_and_requeues(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
