//! Per line, the open and the last closed period: counted at the PLC, sent,
//! delivered, pending, dead-lettered, difference (status page, `plant-edge
//! status`, metrics). Counted and sent come from the sources' stored
//! tallies; delivered, pending and dead-lettered from the journal's ledger,
//! read at most every [`REFRESH`] (a scrape must not scan the journal).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use buffer::{Fate, Journal};
use protocols::period::{millis, LineTally, CHECKPOINT};
use protocols::source::ReadCounts;
use serde::Serialize;

/// How long the ledger's figures are reused.
const REFRESH: Duration = Duration::from_secs(10);
/// Events may be stamped this long before their commit and still be found.
const LEDGER_SLACK_MS: u64 = 10 * 60 * 1000;

/// One period of one line.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PeriodFigures {
    /// Period start (ms).
    pub start_ms: u64,
    /// Period end (ms).
    pub end_ms: u64,
    /// Parts the PLC counted (counters, and records' quantities).
    pub counted: f64,
    /// Quantity the period's events carry.
    pub sent: f64,
    /// Events made.
    pub events: u64,
    /// Of `sent`: delivered to every sink.
    pub delivered: f64,
    /// Of `sent`: still in the journal.
    pub pending: f64,
    /// Of `sent`: dead-lettered.
    pub dead_lettered: f64,
    /// Counted minus sent.
    pub difference: f64,
    /// Entered across an outage (parts counted across it are included).
    pub bridged: bool,
}

/// One line's periods.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LineFigures {
    /// Source name.
    pub source: String,
    /// Line.
    pub line: String,
    /// The open period.
    pub current: PeriodFigures,
    /// The last closed one (since this agent started).
    pub last: Option<PeriodFigures>,
}

/// Fates by (source, line, period start): delivered, pending, dead.
type Fates = BTreeMap<(String, String, u64), (f64, f64, f64)>;

/// The ledger's figures, reused for [`REFRESH`].
#[derive(Default)]
pub struct LineCache(Mutex<Option<(Instant, Fates)>>);

impl LineCache {
    fn fates(&self, journal: &Journal, periods: &[(String, String, u64, u64)]) -> Fates {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, fates)) = cached.as_ref() {
            if at.elapsed() < REFRESH {
                return fates.clone();
            }
        }
        let Some(from) = periods.iter().map(|p| p.2).min() else {
            return Fates::new();
        };
        let mut fates = Fates::new();
        match journal.ledger_recent(from, millis(SystemTime::now()) + 1, LEDGER_SLACK_MS) {
            Ok(events) => {
                for e in events.iter().filter(|e| e.event_type != CHECKPOINT) {
                    let Some(period) = periods.iter().find(|p| {
                        p.0 == e.source && p.1 == e.line && p.2 <= e.at_ms && e.at_ms < p.3
                    }) else {
                        continue;
                    };
                    let entry = fates
                        .entry((e.source.clone(), e.line.clone(), period.2))
                        .or_default();
                    match e.fate {
                        Fate::Delivered => entry.0 += e.quantity,
                        Fate::Pending => entry.1 += e.quantity,
                        Fate::DeadLettered => entry.2 += e.quantity,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "ledger not readable for the status page"),
        }
        *cached = Some((Instant::now(), fates.clone()));
        fates
    }
}

fn figures(tally: &LineTally, fates: Option<&(f64, f64, f64)>) -> PeriodFigures {
    let counted = tally.counted_total();
    let sent: f64 = tally.sent.values().sum();
    let (delivered, pending, dead_lettered) = fates.copied().unwrap_or_default();
    PeriodFigures {
        start_ms: tally.start_ms,
        end_ms: tally.end_ms,
        counted,
        sent,
        events: tally.events,
        delivered,
        pending,
        dead_lettered,
        difference: counted - sent,
        bridged: tally.bridged.is_some(),
    }
}

/// Every line's figures now.
pub fn lines(read: &ReadCounts, journal: &Journal, cache: &LineCache) -> Vec<LineFigures> {
    let periods = read.periods();
    let mut wanted = Vec::new();
    for ((source, line), p) in &periods {
        wanted.push((
            source.clone(),
            line.clone(),
            p.current.start_ms,
            p.current.end_ms,
        ));
        if let Some(last) = &p.last {
            wanted.push((source.clone(), line.clone(), last.start_ms, last.end_ms));
        }
    }
    let fates = cache.fates(journal, &wanted);
    periods
        .into_iter()
        .map(|((source, line), p)| {
            let key = |start| (source.clone(), line.clone(), start);
            LineFigures {
                current: figures(&p.current, fates.get(&key(p.current.start_ms))),
                last: p
                    .last
                    .as_ref()
                    .map(|t| figures(t, fates.get(&key(t.start_ms)))),
                source,
                line,
            }
        })
        .collect()
}
