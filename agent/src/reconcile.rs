//! Reconciliation: per line and period, what the PLC counted (the
//! checkpoints), what the gateway sent, delivered, still holds or
//! dead-lettered (the journal's ledger), and, with an ERP's bookings
//! export, what the ERP booked: `plant-edge journal report` and
//! `plant-edge reconcile`.
//!
//! The ledger is read from the journal directly when the agent is stopped,
//! or asked from the running agent (`/ledger` on its metrics endpoint):
//! the end of a shift is no reason to stop the line's gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use buffer::{Fate, Journal, JournalConfig, JournalError, LedgerEvent};
use protocols::period::{millis, PeriodRule, CHECKPOINT};
use serde::Serialize;

use crate::config::Config;

/// The window a report covers, as given on the command line.
#[derive(clap::Args, Debug, Clone)]
pub struct Window {
    /// Start: RFC 3339 (`2026-12-04T06:00:00+01:00`), a UTC date
    /// (`2026-12-04`), or a time ago (`8h`, `2days`). Default: 24 h ago.
    #[arg(long)]
    pub since: Option<String>,
    /// End, in the same forms. Default: now.
    #[arg(long)]
    pub until: Option<String>,
}

impl Window {
    /// `[from, to)` in ms since the epoch.
    pub fn bounds(&self) -> anyhow::Result<(u64, u64)> {
        let now = SystemTime::now();
        let from = match &self.since {
            Some(text) => instant(text, now)?,
            None => millis(now).saturating_sub(86_400_000),
        };
        let to = match &self.until {
            Some(text) => instant(text, now)?,
            None => millis(now) + 1,
        };
        if from >= to {
            bail!("--since must lie before --until");
        }
        Ok((from, to))
    }
}

fn instant(text: &str, now: SystemTime) -> anyhow::Result<u64> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Ok(t.as_millisecond().max(0) as u64);
    }
    if let Ok(d) = text.parse::<jiff::civil::Date>() {
        let t =
            jiff::tz::TimeZone::UTC.to_timestamp(d.to_datetime(jiff::civil::Time::midnight()))?;
        return Ok(t.as_millisecond().max(0) as u64);
    }
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(millis(now).saturating_sub(ago.as_millis() as u64));
    }
    bail!("{text:?} is not a time: use RFC 3339 (2026-12-04T06:00:00+01:00), a date (2026-12-04) or a time ago (8h)")
}

/// Where the ledger comes from: a config file (its journal, or its running
/// agent) or a state directory.
pub fn ledger(
    config: Option<&Path>,
    state: Option<&Path>,
    from_ms: u64,
    to_ms: u64,
) -> anyhow::Result<Vec<LedgerEvent>> {
    let loaded = config.map(Config::load_without_secrets).transpose()?;
    let dir = match (&loaded, state) {
        (Some(c), _) => c.journal_dir(),
        (None, Some(state)) => state.join("journal"),
        (None, None) => bail!("say which journal: -c CONFIG or --state DIR"),
    };
    if !dir.join("db").exists() {
        bail!("no journal at {}", dir.display());
    }
    let mut jc = JournalConfig::new(&dir);
    jc.lock_wait = Duration::from_millis(300);
    match Journal::open(jc) {
        Ok(journal) => Ok(journal.ledger(from_ms, to_ms)?),
        Err(JournalError::Locked { .. }) => {
            let Some(addr) = loaded.as_ref().and_then(|c| c.metrics_listen) else {
                bail!(
                    "the journal at {} is in use by the running agent; pass -c CONFIG with agent.metrics_listen on to ask it",
                    dir.display()
                );
            };
            let url = format!("http://{addr}/ledger?from_ms={from_ms}&to_ms={to_ms}");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let answer = reqwest::Client::builder()
                    .timeout(Duration::from_secs(120))
                    .build()?
                    .get(&url)
                    .send()
                    .await
                    .with_context(|| format!("asking the running agent at {url}"))?;
                if !answer.status().is_success() {
                    bail!("the agent at {url} answered {}", answer.status());
                }
                let body = answer.bytes().await?;
                serde_json::from_slice::<Vec<LedgerEvent>>(&body)
                    .with_context(|| format!("the agent's answer at {url} is not a ledger"))
            })
        }
        Err(e) => Err(e).context("opening the journal"),
    }
}

/// The period rule of a config (`None`: UTC days).
pub fn rule_of(config: Option<&Path>) -> anyhow::Result<PeriodRule> {
    let rule = match config {
        Some(file) => Config::load_without_secrets(file)?
            .checkpoints
            .map(|c| (*c.rule).clone()),
        None => None,
    };
    Ok(rule.unwrap_or(PeriodRule::Every(Duration::from_secs(86_400))))
}

/// One line's figures over one period.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PeriodRow {
    /// Line.
    pub line: String,
    /// Period start (ms).
    pub start_ms: u64,
    /// Period end (ms).
    pub end_ms: u64,
    /// Parts the PLC counted (its checkpoints); `None` while the period
    /// is open or its checkpoint left the ledger.
    pub counted: Option<f64>,
    /// Quantity of the events the gateway made in the period.
    pub sent: f64,
    /// Events made.
    pub events: u64,
    /// Of `sent`: delivered to every sink.
    pub delivered: f64,
    /// Of `sent`: still in the journal.
    pub pending: f64,
    /// Of `sent`: dead-lettered.
    pub dead_lettered: f64,
    /// Booked by the ERP (with `--bookings`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub booked: Option<f64>,
}

impl PeriodRow {
    /// Counted minus sent (0 when the period is not closed).
    pub fn difference(&self) -> f64 {
        self.counted.map_or(0.0, |c| c - self.sent)
    }
}

/// Groups ledger events by line and period.
pub fn report(events: &[LedgerEvent], rule: &PeriodRule) -> Vec<PeriodRow> {
    let mut rows: BTreeMap<(String, u64), PeriodRow> = BTreeMap::new();
    for e in events {
        let (start, end) = rule.period_of(SystemTime::UNIX_EPOCH + Duration::from_millis(e.at_ms));
        let row = rows
            .entry((e.line.clone(), millis(start)))
            .or_insert_with(|| PeriodRow {
                line: e.line.clone(),
                start_ms: millis(start),
                end_ms: millis(end),
                ..PeriodRow::default()
            });
        if e.event_type == CHECKPOINT {
            *row.counted.get_or_insert(0.0) += e.quantity;
            continue;
        }
        row.sent += e.quantity;
        row.events += 1;
        match e.fate {
            Fate::Delivered => row.delivered += e.quantity,
            Fate::Pending => row.pending += e.quantity,
            Fate::DeadLettered => row.dead_lettered += e.quantity,
        }
    }
    rows.into_values().collect()
}

/// One booking from the ERP's export.
#[derive(Clone, Debug, PartialEq)]
pub struct Booking {
    /// The event id the ERP carries (`ConfirmationText`, ...).
    pub id: uuid::Uuid,
    /// Quantity booked.
    pub quantity: f64,
}

const ID_COLUMNS: &[&str] = &[
    "id",
    "event_id",
    "eventid",
    "confirmationtext",
    "sourcelinereference",
    "x_plant_edge_id",
    "external_id",
    "reference",
];
const QUANTITY_COLUMNS: &[&str] = &[
    "quantity",
    "qty",
    "yieldquantity",
    "confirmationyieldquantity",
    "quantity_done",
    "product_qty",
    "booked",
];

/// Reads an ERP's bookings export: CSV (`,` or `;`, a header naming an id
/// and a quantity column) or JSON lines (an object per line). A line whose
/// id is not an event id is an error naming the line: a silently skipped
/// booking would hide a double posting.
pub fn read_bookings(path: &Path) -> anyhow::Result<Vec<Booking>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading bookings {}", path.display()))?;
    let text = text.trim_start_matches('\u{feff}');
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut out = Vec::new();
    if first.trim_start().starts_with('{') {
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{}:{}", path.display(), n + 1);
            let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
                .with_context(|| format!("{}: not a JSON object", at()))?;
            let field = |names: &[&str]| {
                value
                    .iter()
                    .find(|(k, _)| names.contains(&k.to_lowercase().as_str()))
                    .map(|(_, v)| match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
            };
            out.push(booking(field(ID_COLUMNS), field(QUANTITY_COLUMNS), &at())?);
        }
        return Ok(out);
    }
    let delimiter = if first.matches(';').count() > first.matches(',').count() {
        ';'
    } else {
        ','
    };
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Ok(out);
    };
    let header: Vec<String> = csv_fields(header, delimiter)
        .into_iter()
        .map(|h| h.trim().to_lowercase())
        .collect();
    let column = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
    let (Some(id_at), Some(quantity_at)) = (column(ID_COLUMNS), column(QUANTITY_COLUMNS)) else {
        bail!(
            "{}: the header needs an id column (one of {}) and a quantity column (one of {}); found {:?}",
            path.display(),
            ID_COLUMNS.join(", "),
            QUANTITY_COLUMNS.join(", "),
            header
        );
    };
    for (n, line) in lines {
        let fields = csv_fields(line, delimiter);
        let at = format!("{}:{}", path.display(), n + 1);
        out.push(booking(
            fields.get(id_at).cloned(),
            fields.get(quantity_at).cloned(),
            &at,
        )?);
    }
    Ok(out)
}

fn booking(id: Option<String>, quantity: Option<String>, at: &str) -> anyhow::Result<Booking> {
    let id_text = id.unwrap_or_default();
    let id = buffer::journal::parse_id(id_text.trim())
        .with_context(|| format!("{at}: {id_text:?} is not an event id (a UUID)"))?;
    let quantity_text = quantity.unwrap_or_default();
    // ERP exports write quantities as text, some with a decimal comma.
    let quantity: f64 = quantity_text
        .trim()
        .replace(',', ".")
        .parse()
        .with_context(|| format!("{at}: {quantity_text:?} is not a quantity"))?;
    Ok(Booking { id, quantity })
}

/// One CSV record's fields (RFC 4180 quoting, no line breaks in fields).
fn csv_fields(line: &str, delimiter: char) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (c, false) if c == delimiter => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// What a reconciliation found.
#[derive(Debug, Default, Serialize)]
pub struct Findings {
    /// Per line and period, with what was booked.
    pub periods: Vec<PeriodRow>,
    /// Delivered events the ERP did not book: id, line, quantity.
    pub not_booked: Vec<(uuid::Uuid, String, f64)>,
    /// Ids the ERP booked more than once, with how often.
    pub booked_twice: Vec<(uuid::Uuid, usize)>,
    /// Booked with another quantity than sent: id, sent, booked.
    pub quantity_differs: Vec<(uuid::Uuid, f64, f64)>,
    /// Booked ids this gateway's ledger does not know in the window.
    pub unknown: Vec<uuid::Uuid>,
}

impl Findings {
    /// Whether anything does not add up.
    pub fn has_difference(&self) -> bool {
        !self.not_booked.is_empty()
            || !self.booked_twice.is_empty()
            || !self.quantity_differs.is_empty()
            || self.periods.iter().any(|p| {
                p.difference().abs() > 1e-9
                    || (p.counted.is_some() && (p.booked.unwrap_or(0.0) - p.sent).abs() > 1e-9)
            })
    }
}

/// Compares the ledger with the ERP's bookings.
pub fn reconcile(events: &[LedgerEvent], bookings: &[Booking], rule: &PeriodRule) -> Findings {
    let mut booked: BTreeMap<uuid::Uuid, (usize, f64)> = BTreeMap::new();
    for b in bookings {
        let entry = booked.entry(b.id).or_default();
        entry.0 += 1;
        entry.1 += b.quantity;
    }
    let mut findings = Findings {
        periods: report(events, rule),
        ..Findings::default()
    };
    let mut known = BTreeSet::new();
    let mut booked_by_period: BTreeMap<(String, u64), f64> = BTreeMap::new();
    for e in events.iter().filter(|e| e.event_type != CHECKPOINT) {
        known.insert(e.id);
        let (start, _) = rule.period_of(SystemTime::UNIX_EPOCH + Duration::from_millis(e.at_ms));
        match booked.get(&e.id) {
            None if e.fate == Fate::Delivered => {
                findings.not_booked.push((e.id, e.line.clone(), e.quantity));
            }
            None => {}
            Some((times, quantity)) => {
                *booked_by_period
                    .entry((e.line.clone(), millis(start)))
                    .or_default() += quantity;
                if *times > 1 {
                    findings.booked_twice.push((e.id, *times));
                } else if (quantity - e.quantity).abs() > 1e-9 {
                    findings
                        .quantity_differs
                        .push((e.id, e.quantity, *quantity));
                }
            }
        }
    }
    for row in &mut findings.periods {
        row.booked = Some(
            booked_by_period
                .get(&(row.line.clone(), row.start_ms))
                .copied()
                .unwrap_or(0.0),
        );
    }
    findings.unknown = booked
        .keys()
        .filter(|id| !known.contains(id))
        .copied()
        .collect();
    findings
}

fn when(ms: u64, zone: &jiff::tz::TimeZone) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| {
            // Whole minutes for shifts; seconds only for periods that need them.
            let format = if ms.is_multiple_of(60_000) {
                "%Y-%m-%d %H:%M %:z"
            } else {
                "%Y-%m-%d %H:%M:%S %:z"
            };
            t.to_zoned_datetime(zone.clone())
                .strftime(format)
                .to_string()
        })
        .unwrap_or_else(|_| ms.to_string())
}

fn zone_of(rule: &PeriodRule) -> jiff::tz::TimeZone {
    match rule {
        PeriodRule::Shifts { zone, .. } => zone.clone(),
        PeriodRule::Every(_) => jiff::tz::TimeZone::UTC,
    }
}

fn number(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}

/// The report as a table, one row per line and period.
pub fn report_text(rows: &[PeriodRow], rule: &PeriodRule) -> String {
    let zone = zone_of(rule);
    let mut out = String::new();
    let booked = rows.iter().any(|r| r.booked.is_some());
    let _ = write!(
        out,
        "{:<12} {:<49} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "line", "period", "counted", "sent", "delivered", "pending", "dead", "diff"
    );
    if booked {
        let _ = write!(out, " {:>9}", "booked");
    }
    out.push('\n');
    for r in rows {
        let period = format!("{} – {}", when(r.start_ms, &zone), when(r.end_ms, &zone));
        let counted = r.counted.map_or_else(|| "open".to_owned(), number);
        let _ = write!(
            out,
            "{:<12} {:<49} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9}",
            r.line,
            period,
            counted,
            number(r.sent),
            number(r.delivered),
            number(r.pending),
            number(r.dead_lettered),
            number(r.difference()),
        );
        if let Some(b) = r.booked {
            let _ = write!(out, " {:>9}", number(b));
        }
        out.push('\n');
    }
    out
}

/// The findings as text: the table, then every id to look at.
pub fn findings_text(f: &Findings, rule: &PeriodRule) -> String {
    let mut out = report_text(&f.periods, rule);
    for (id, line, quantity) in &f.not_booked {
        let _ = writeln!(
            out,
            "sent, not booked   {id}  line {line}  quantity {}",
            number(*quantity)
        );
    }
    for (id, times) in &f.booked_twice {
        let _ = writeln!(out, "booked {times} times    {id}");
    }
    for (id, sent, booked) in &f.quantity_differs {
        let _ = writeln!(
            out,
            "quantity differs   {id}  sent {}  booked {}",
            number(*sent),
            number(*booked)
        );
    }
    for id in &f.unknown {
        let _ = writeln!(out, "booked, not sent by this gateway in the window  {id}");
    }
    let _ = writeln!(
        out,
        "{}",
        if f.has_difference() {
            "DIFFERENCE: see the lines above"
        } else {
            "reconciled: every counted part was sent and booked once"
        }
    );
    out
}

/// `plant-edge reconcile`: exit `Ok(false)` on a difference.
pub fn run_reconcile(
    config: Option<PathBuf>,
    state: Option<PathBuf>,
    bookings: &Path,
    window: &Window,
    json: bool,
) -> anyhow::Result<bool> {
    let (from, to) = window.bounds()?;
    let rule = rule_of(config.as_deref())?;
    let bookings = read_bookings(bookings)?;
    let events = ledger(config.as_deref(), state.as_deref(), from, to)?;
    let findings = reconcile(&events, &bookings, &rule);
    if json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        print!("{}", findings_text(&findings, &rule));
    }
    Ok(!findings.has_difference())
}

/// `plant-edge journal report`: exit `Ok(false)` when a closed period's
/// counted and sent differ.
pub fn run_report(
    config: Option<PathBuf>,
    state: Option<PathBuf>,
    window: &Window,
    json: bool,
) -> anyhow::Result<bool> {
    let (from, to) = window.bounds()?;
    let rule = rule_of(config.as_deref())?;
    let events = ledger(config.as_deref(), state.as_deref(), from, to)?;
    let rows = report(&events, &rule);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", report_text(&rows, &rule));
    }
    Ok(rows.iter().all(|r| r.difference().abs() < 1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u128, line: &str, at_ms: u64, quantity: f64, fate: Fate) -> LedgerEvent {
        LedgerEvent {
            seq: n as u64,
            id: uuid::Uuid::from_u128(n),
            at_ms,
            source: "press1".into(),
            line: line.into(),
            event_type: "production.completion".into(),
            quantity,
            fate,
        }
    }

    #[test]
    fn csv_with_semicolons_quotes_and_decimal_commas_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("b.csv");
        let id = uuid::Uuid::from_u128(7);
        std::fs::write(
            &file,
            format!(
                "\u{feff}Order;ConfirmationText;YieldQuantity\r\n\"100;1\";{id};\"12,000\"\r\n"
            ),
        )
        .expect("write");
        assert_eq!(
            read_bookings(&file).expect("bookings"),
            vec![Booking { id, quantity: 12.0 }]
        );
        std::fs::write(&file, "order,qty\n1,2\n").expect("write");
        let e = read_bookings(&file).expect_err("no id column");
        assert!(e.to_string().contains("id column"), "{e}");
        std::fs::write(&file, "id,qty\nnot-an-id,2\n").expect("write");
        let e = read_bookings(&file).expect_err("bad id");
        assert!(format!("{e:#}").contains("b.csv:2"), "{e:#}");
    }

    #[test]
    fn a_missing_and_a_doubled_booking_are_named_and_make_a_difference() {
        let rule = PeriodRule::Every(Duration::from_secs(3600));
        let mut events = vec![
            event(1, "L1", 1_000, 3.0, Fate::Delivered),
            event(2, "L1", 2_000, 4.0, Fate::Delivered),
            event(3, "L1", 3_000, 5.0, Fate::Delivered),
        ];
        let mut checkpoint = event(9, "L1", 0, 12.0, Fate::Delivered);
        checkpoint.event_type = CHECKPOINT.into();
        events.push(checkpoint);
        let good = vec![
            Booking {
                id: uuid::Uuid::from_u128(1),
                quantity: 3.0,
            },
            Booking {
                id: uuid::Uuid::from_u128(2),
                quantity: 4.0,
            },
            Booking {
                id: uuid::Uuid::from_u128(3),
                quantity: 5.0,
            },
        ];
        let f = reconcile(&events, &good, &rule);
        assert!(!f.has_difference(), "{}", findings_text(&f, &rule));
        let bad = vec![good[0].clone(), good[0].clone(), good[2].clone()];
        let f = reconcile(&events, &bad, &rule);
        assert!(f.has_difference());
        assert_eq!(
            f.not_booked,
            vec![(uuid::Uuid::from_u128(2), "L1".into(), 4.0)]
        );
        assert_eq!(f.booked_twice, vec![(uuid::Uuid::from_u128(1), 2)]);
        assert_eq!(f.periods[0].counted, Some(12.0));
        assert_eq!(f.periods[0].booked, Some(11.0));
    }
}
