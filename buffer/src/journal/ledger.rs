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

#[derive(Clone, Debug, Encode, Decode)]
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

#[derive(Clone, Debug, Encode, Decode)]
pub(crate) struct LedgerRecord {
    pub rows: Vec<LedgerRow>,
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
            let record: LedgerRecord =
                layout::decode(&value).map_err(|e| decode_err("ledger", &key, e))?;
            if let Some(stop) = stop_before {
                if record.rows.iter().all(|r| r.at_ms < stop) {
                    break;
                }
            }
            records.push(record);
        }
        if stop_before.is_some() {
            records.reverse();
        }
        let pending = self.pending_seqs()?;
        let dead: BTreeSet<[u8; 16]> = self
            .dead_letter_records()?
            .into_iter()
            .map(|(_, r)| r.event.id)
            .collect();
        let mut out = Vec::new();
        for record in records {
            for row in record.rows {
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
        let record: LedgerRecord =
            layout::decode(&value).map_err(|e| decode_err("ledger", &key, e))?;
        Ok(record.rows.iter().map(|r| r.at_ms).min())
    }

    /// Sequences some sink still has to deliver.
    fn pending_seqs(&self) -> Result<BTreeSet<u64>, JournalError> {
        let metas: Vec<(u64, layout::ChunkMeta)> = {
            let st = self.state();
            st.chunks.iter().map(|(k, m)| (*k, *m)).collect()
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

    /// Adds the removal of ledger records wholly older than `cutoff_ms` to
    /// `batch` (from the front, at most `limit` records).
    pub(super) fn prune_ledger(
        &self,
        batch: &mut sled::Batch,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<usize, JournalError> {
        let mut removed = 0;
        for item in self.inner.tree.scan_prefix([layout::LEDGER]).take(limit) {
            let (key, value) = item?;
            let newest = layout::decode::<LedgerRecord>(&value)
                .map(|r| r.rows.iter().map(|row| row.at_ms).max().unwrap_or(0))
                // An unreadable record is of no use to a report: pruned.
                .unwrap_or(0);
            if newest >= cutoff_ms {
                break;
            }
            batch.remove(key);
            removed += 1;
        }
        Ok(removed)
    }
}
