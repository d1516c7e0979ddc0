//! The ledger: every event the journal stored (id, sequence, source, line,
//! type, quantity and the time its period is reckoned by), kept after
//! delivery for [`JournalConfig::ledger_keep`](super::JournalConfig), so
//! `journal report` and `reconcile` can say what was sent in a past period.
//!
//! Invariants:
//! - One record per commit, written in that commit's batch: an event is in
//!   the ledger exactly when it was stored, a repeat refused by dedup never.
//! - Records are keyed by the commit's first sequence, so the oldest come
//!   first and pruning removes from the front only.

use std::collections::BTreeSet;

use bincode::{Decode, Encode};
use uuid::Uuid;

use super::layout;
use super::{decode_err, Journal, JournalError};

/// What the ledger keeps of an event, given by the source with it.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerEntry {
    /// The time its period is reckoned by (ms since the epoch): the read
    /// time of the poll that made it.
    pub at_ms: u64,
    /// Production line.
    pub line: String,
    /// Event type.
    pub event_type: String,
    /// Quantity (count or measure).
    pub quantity: f64,
}

/// One stored event as the writer hands it to the ledger.
#[derive(Clone, Debug)]
pub(crate) struct LedgerRow {
    pub seq: u64,
    pub id: [u8; 16],
    pub at_ms: u64,
    pub source: String,
    pub line: String,
    pub event_type: String,
    pub quantity: f64,
    /// Kept as a dead letter at the source (never queued for delivery).
    pub dead_at_source: bool,
}

/// A commit's rows as stored: names once in a table, numbers as small
/// differences (varints), counts as integers. The ledger is written with
/// every commit, and sled rewrites the leaf it lands in: every byte saved
/// here is saved again at each rewrite.
#[derive(Clone, Debug, Encode, Decode)]
struct PackedRecord {
    names: Vec<String>,
    first_seq: u64,
    first_ms: u64,
    rows: Vec<PackedRow>,
}

#[derive(Clone, Debug, Encode, Decode)]
struct PackedRow {
    /// `seq - first_seq`; dead letters at the source have no sequence.
    seq_after: u64,
    id: [u8; 16],
    ms_after: i64,
    source: u32,
    line: u32,
    event_type: u32,
    quantity: PackedQuantity,
    dead_at_source: bool,
}

#[derive(Clone, Copy, Debug, Encode, Decode)]
enum PackedQuantity {
    Count(u64),
    Measure(f64),
}

/// The value of one ledger record.
pub(crate) fn encode_rows(rows: &[LedgerRow]) -> Result<Vec<u8>, bincode::error::EncodeError> {
    // Sequences start at 0; a dead letter at the source has none (0 too).
    let first_seq = rows
        .iter()
        .filter(|r| !r.dead_at_source)
        .map(|r| r.seq)
        .min()
        .unwrap_or(0);
    let first_ms = rows.first().map_or(0, |r| r.at_ms);
    let mut names: Vec<String> = Vec::new();
    let mut index = |name: &str| -> u32 {
        match names.iter().position(|n| n == name) {
            Some(i) => i as u32,
            None => {
                names.push(name.to_owned());
                (names.len() - 1) as u32
            }
        }
    };
    let packed: Vec<PackedRow> = rows
        .iter()
        .map(|r| PackedRow {
            seq_after: if r.dead_at_source {
                0
            } else {
                r.seq.saturating_sub(first_seq)
            },
            id: r.id,
            ms_after: r.at_ms as i64 - first_ms as i64,
            source: index(&r.source),
            line: index(&r.line),
            event_type: index(&r.event_type),
            quantity: if r.quantity.fract() == 0.0
                && r.quantity >= 0.0
                && r.quantity < 2f64.powi(53)
            {
                PackedQuantity::Count(r.quantity as u64)
            } else {
                PackedQuantity::Measure(r.quantity)
            },
            dead_at_source: r.dead_at_source,
        })
        .collect();
    layout::encode(&PackedRecord {
        names,
        first_seq,
        first_ms,
        rows: packed,
    })
}

/// The rows of one ledger record.
pub(crate) fn decode_rows(bytes: &[u8]) -> Result<Vec<LedgerRow>, bincode::error::DecodeError> {
    let packed: PackedRecord = layout::decode(bytes)?;
    let name = |i: u32| packed.names.get(i as usize).cloned().unwrap_or_default();
    Ok(packed
        .rows
        .iter()
        .map(|r| LedgerRow {
            seq: if r.dead_at_source {
                0
            } else {
                packed.first_seq.saturating_add(r.seq_after)
            },
            id: r.id,
            // Saturating: a damaged record must not panic a report.
            at_ms: (packed.first_ms as i64).saturating_add(r.ms_after).max(0) as u64,
            source: name(r.source),
            line: name(r.line),
            event_type: name(r.event_type),
            quantity: match r.quantity {
                PackedQuantity::Count(n) => n as f64,
                PackedQuantity::Measure(x) => x,
            },
            dead_at_source: r.dead_at_source,
        })
        .collect())
}

/// Where an event the ledger remembers is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Some sink still has it to deliver.
    Pending,
    /// Every sink it was routed to is done with it and none dead-lettered it.
    Delivered,
    /// A sink rejected it, it expired, or the source refused it.
    DeadLettered,
}

/// An event as the ledger remembers it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LedgerEvent {
    /// Journal sequence (0: dead-lettered at the source).
    pub seq: u64,
    /// Event id.
    pub id: Uuid,
    /// Period time (ms since the epoch).
    pub at_ms: u64,
    /// Source name.
    pub source: String,
    /// Line.
    pub line: String,
    /// Event type.
    pub event_type: String,
    /// Quantity.
    pub quantity: f64,
    /// Where it is now.
    pub fate: Fate,
}

impl Journal {
    /// Every ledger event with `from_ms <= at_ms < to_ms`, in sequence
    /// order, with its fate now. Reads the whole ledger.
    pub fn ledger(&self, from_ms: u64, to_ms: u64) -> Result<Vec<LedgerEvent>, JournalError> {
        self.ledger_scan(from_ms, to_ms, None)
    }

    /// As [`Journal::ledger`] for a recent window (a status page): reads
    /// from the newest record back and stops at the first one made wholly
    /// before `from_ms - slack_ms`. Events whose time lies further before
    /// their commit than `slack_ms` (a MES backlog with its own old
    /// timestamps) may be missed; `journal report` reads everything.
    pub fn ledger_recent(
        &self,
        from_ms: u64,
        to_ms: u64,
        slack_ms: u64,
    ) -> Result<Vec<LedgerEvent>, JournalError> {
        self.ledger_scan(from_ms, to_ms, Some(from_ms.saturating_sub(slack_ms)))
    }

    fn ledger_scan(
        &self,
        from_ms: u64,
        to_ms: u64,
        stop_before: Option<u64>,
    ) -> Result<Vec<LedgerEvent>, JournalError> {
        let mut records = Vec::new();
        let scan = self.inner.tree.scan_prefix([layout::LEDGER]);
        let items: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            match stop_before {
                Some(_) => Box::new(scan.rev()),
                None => Box::new(scan),
            };
        for item in items {
            let (key, value) = item?;
            let rows = decode_rows(&value).map_err(|e| decode_err("ledger", &key, e))?;
            if let Some(stop) = stop_before {
                if rows.iter().all(|r| r.at_ms < stop) {
                    break;
                }
            }
            records.push(rows);
        }
        if stop_before.is_some() {
            records.reverse();
        }
        // Only chunks holding the window's events are read for their routes.
        let seqs = records
            .iter()
            .flatten()
            .filter(|r| !r.dead_at_source && r.at_ms >= from_ms && r.at_ms < to_ms)
            .map(|r| r.seq);
        let pending = match (seqs.clone().min(), seqs.max()) {
            (Some(lo), Some(hi)) => self.pending_seqs(lo, hi)?,
            _ => BTreeSet::new(),
        };
        let dead: BTreeSet<[u8; 16]> = self
            .dead_letter_records()?
            .into_iter()
            .map(|(_, r)| r.event.id)
            .collect();
        let mut out = Vec::new();
        for rows in records {
            for row in rows {
                if row.at_ms < from_ms || row.at_ms >= to_ms {
                    continue;
                }
                let fate = if row.dead_at_source || dead.contains(&row.id) {
                    Fate::DeadLettered
                } else if pending.contains(&row.seq) {
                    Fate::Pending
                } else {
                    Fate::Delivered
                };
                out.push(LedgerEvent {
                    seq: row.seq,
                    id: Uuid::from_bytes(row.id),
                    at_ms: row.at_ms,
                    source: row.source,
                    line: row.line,
                    event_type: row.event_type,
                    quantity: row.quantity,
                    fate,
                });
            }
        }
        Ok(out)
    }

    /// The oldest period time the ledger still holds (ms), if any.
    pub fn ledger_since(&self) -> Result<Option<u64>, JournalError> {
        let Some(item) = self.inner.tree.scan_prefix([layout::LEDGER]).next() else {
            return Ok(None);
        };
        let (key, value) = item?;
        let rows = decode_rows(&value).map_err(|e| decode_err("ledger", &key, e))?;
        Ok(rows.iter().map(|r| r.at_ms).min())
    }

    /// Sequences some sink still has to deliver.
    /// Sequences in `lo..=hi` some sink still has to deliver. Chunks every
    /// sink's cursor has passed are not read: a status page asks this
    /// every few seconds, with a backlog of any size.
    fn pending_seqs(&self, lo: u64, hi: u64) -> Result<BTreeSet<u64>, JournalError> {
        let metas: Vec<(u64, layout::ChunkMeta)> = {
            let st = self.state();
            let floor = st.floor();
            st.chunks
                .range(..=hi)
                .filter(|(_, m)| m.last >= lo.max(floor))
                .map(|(k, m)| (*k, *m))
                .collect()
        };
        let mut pending = BTreeSet::new();
        for (first, meta) in metas {
            if meta.dropped {
                continue;
            }
            let Some(events) = self.load_chunk(first)? else {
                continue;
            };
            let st = self.state();
            for (offset, event) in events.iter().enumerate() {
                let seq = first + offset as u64;
                let open = st.sinks.iter().any(|s| {
                    event.routes & (1u64 << s.slot) != 0
                        && seq >= s.cursor
                        && !s.done.contains(&seq)
                });
                if open {
                    pending.insert(seq);
                }
            }
        }
        Ok(pending)
    }

    /// Adds to `batch` the removal of ledger records from the front that
    /// are wholly older than `cutoff_ms`, or while the ledger holds more
    /// than `max_bytes` (at most `limit` records); returns the bytes freed.
    pub(super) fn prune_ledger(
        &self,
        batch: &mut sled::Batch,
        cutoff_ms: u64,
        mut bytes: u64,
        max_bytes: u64,
        limit: usize,
    ) -> Result<u64, JournalError> {
        let mut freed = 0;
        for item in self.inner.tree.scan_prefix([layout::LEDGER]).take(limit) {
            let (key, value) = item?;
            let newest = decode_rows(&value)
                .map(|rows| rows.iter().map(|row| row.at_ms).max().unwrap_or(0))
                // An unreadable record is of no use to a report: pruned.
                .unwrap_or(0);
            if newest >= cutoff_ms && bytes <= max_bytes {
                break;
            }
            let size = (key.len() + value.len()) as u64;
            batch.remove(key);
            bytes = bytes.saturating_sub(size);
            freed += size;
        }
        Ok(freed)
    }

    /// Bytes the ledger's records hold (keys and values), for its bound.
    pub(super) fn ledger_bytes(tree: &sled::Tree) -> Result<u64, JournalError> {
        let mut bytes = 0;
        for item in tree.scan_prefix([layout::LEDGER]) {
            let (key, value) = item?;
            bytes += (key.len() + value.len()) as u64;
        }
        Ok(bytes)
    }
}
