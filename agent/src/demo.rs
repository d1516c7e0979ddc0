//! `plant-edge demo`: the whole job on this machine, nothing to set up.
//!
//! Inside one process, all on loopback: a simulated PLC (a Modbus TCP
//! server with two lines' good and scrap counters, one 16-bit counter that
//! wraps, and a handshake record area), a simulated MES (an OPC UA server
//! with a counter and a JSON completion record waiting for its
//! acknowledgement), a simulated cloud ERP (an HTTPS server that keeps
//! what it receives and deduplicates by id) and the agent itself, with a
//! config file the demo writes out. Midway the ERP goes down for
//! `--outage`; the journal holds everything meanwhile. At the end every
//! part made at the PLC and MES is reconciled against what reached the
//! ERP, per line, type and kind; the exit code is non-zero if anything was
//! lost.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use simulators::erp::Erp;
use simulators::mes::{Mes, MesOptions};
use simulators::plc::Plc;

use crate::config::Config;
use crate::run::RunningAgent;

/// Parts made per (line, event type, counter|record).
type Made = Arc<Mutex<BTreeMap<(String, String, String), u64>>>;

const COMPLETION: &str = "production.completion";
const SCRAP: &str = "production.scrap";

fn demo_config(
    state: &Path,
    plc: &Plc,
    mes: &Mes,
    erp: &Erp,
    ca: &Path,
    status: std::net::SocketAddr,
) -> String {
    format!(
        r#"# Written by `plant-edge demo`; a starting point for your own.
[agent]
site = "demo-plant"
gateway = "demo-gw"
state_dir = "{state}"
# The status page (per-line totals, backlog) and Prometheus metrics.
metrics_listen = "{status}"

# Each line's totals closed every 15 s as a production.checkpoint event, so
# the demo shows a few. A plant uses its shifts:
#   shifts = ["06:00", "14:00", "22:00"]
#   time_zone = "Europe/Berlin"
[checkpoints]
every = "15s"

[journal]
max_bytes = "256MiB"

[forwarder]
batch_size = 256
retry_initial = "200ms"
retry_max = "2s"

# The cloud ERP: CloudEvents over HTTPS, batched, with Idempotency-Key.
[sinks.erp]
kind = "https"
url = "{erp_url}"
ca_file = "{ca}"
mode = "batch"

# Line 1: a press on the PLC. Its good counter is 16 bits and wraps.
[sources.plc-line1]
kind = "modbus"
endpoint = "tcp://{plc}"
unit = 1
poll_interval = "100ms"
line = "L1"
machine = "press1"
attributes = {{ work_center = "WC-10", cost_center = "4711" }}

[[sources.plc-line1.counters]]
signal = "good"
type = "production.completion"
address = "holding:0"
format = "u16"
max_step = 5000

[[sources.plc-line1.counters]]
signal = "scrap"
type = "production.scrap"
address = "holding:1"
format = "u16"

# Line 2: a welder on the same PLC, 32-bit counters, and a handshake record
# (the PLC sets ready, plant-edge stores the record, then sets ack).
[sources.plc-line2]
kind = "modbus"
endpoint = "tcp://{plc}"
unit = 1
poll_interval = "100ms"
line = "L2"
machine = "weld1"

[[sources.plc-line2.counters]]
signal = "good"
type = "production.completion"
address = "holding:10"
format = "u32"

[[sources.plc-line2.counters]]
signal = "scrap"
type = "production.scrap"
address = "holding:12"
format = "u32"

[[sources.plc-line2.records]]
signal = "rework"
type = "production.completion"
ready = "coil:0"
ack = "coil:1"
key = ["sequence"]
fields = {{ sequence = {{ address = "holding:20", format = "u16" }}, work_order = {{ address = "holding:21", format = "string", length = 4 }}, quantity = {{ address = "holding:25", format = "u16" }} }}

# Line 3: a filler reported by the MES over OPC UA (subscription), with a
# completion record acknowledged once it is on disk.
[sources.mes-line3]
kind = "opcua"
endpoint = "{mes}"
pki_dir = "{state}/pki"
publishing_interval = "100ms"
sampling_interval = "50ms"
line = "L3"
machine = "filler1"

[[sources.mes-line3.counters]]
signal = "good"
type = "production.completion"
node = "{mes_good}"

[[sources.mes-line3.records]]
signal = "completion"
type = "production.completion"
node = "{mes_record}"
fields = {{ sequence = "/seq", work_order = "/order", material = "/material", quantity = "/qty" }}
ack = {{ write = "{mes_ack}", field = "sequence" }}
"#,
        state = state.display(),
        erp_url = erp.url(),
        ca = ca.display(),
        plc = plc.addr,
        mes = mes.endpoint(),
        mes_good = mes.node("Line1.Good"),
        mes_record = mes.node("Line1.Record"),
        mes_ack = mes.node("Line1.Ack"),
    )
}

fn add(made: &Made, line: &str, event_type: &str, kind: &str, parts: u64) {
    if parts > 0 {
        *made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((line.to_owned(), event_type.to_owned(), kind.to_owned()))
            .or_default() += parts;
    }
}

/// The simulated plant: what the machines make, every 100 ms.
struct Plant {
    plc: Plc,
    mes: Mes,
    made: Made,
    l1_good: u16,
    l1_scrap: u16,
    l2_good: u32,
    l2_scrap: u32,
    l2_record: u16,
    l3_good: u32,
    l3_record: u32,
}

impl Plant {
    fn tick(&mut self) {
        let made = self.made.clone();
        let step = fastrand::u16(0..12);
        self.l1_good = self.l1_good.wrapping_add(step);
        add(&made, "L1", COMPLETION, "counter", u64::from(step));
        if fastrand::u8(0..10) == 0 {
            self.l1_scrap = self.l1_scrap.wrapping_add(1);
            add(&made, "L1", SCRAP, "counter", 1);
        }
        let step = fastrand::u32(0..4);
        self.l2_good += step;
        add(&made, "L2", COMPLETION, "counter", u64::from(step));
        if fastrand::u8(0..25) == 0 {
            self.l2_scrap += 1;
            add(&made, "L2", SCRAP, "counter", 1);
        }
        {
            let mut m = self.plc.mem();
            m.holding.insert(0, self.l1_good);
            m.holding.insert(1, self.l1_scrap);
            m.set_u32(10, self.l2_good);
            m.set_u32(12, self.l2_scrap);
            // The record handshake, PLC side: ack seen → clear ready; both
            // clear → the next rework record.
            let ready = m.coils.get(&0).copied().unwrap_or(false);
            let ack = m.coils.get(&1).copied().unwrap_or(false);
            if ready && ack {
                m.coils.insert(0, false);
            } else if !ready && !ack && fastrand::u8(0..5) == 0 {
                self.l2_record = self.l2_record.wrapping_add(1);
                let quantity = fastrand::u16(1..5);
                m.holding.insert(20, self.l2_record);
                m.set_string(21, 4, &format!("RW{:02}", self.l2_record % 100));
                m.holding.insert(25, quantity);
                m.coils.insert(0, true);
                add(&made, "L2", COMPLETION, "record", u64::from(quantity));
            }
        }
        let step = fastrand::u32(0..6);
        self.l3_good += step;
        add(&made, "L3", COMPLETION, "counter", u64::from(step));
        self.mes.set("Line1.Good", self.l3_good);
        // The MES publishes its next completion once the last one was
        // acknowledged.
        let acked = self.mes.acks().written.last().cloned();
        let waiting = self.l3_record > 0
            && acked != Some(protocols::opcua_lib::types::Variant::UInt32(self.l3_record));
        if !waiting && fastrand::u8(0..4) == 0 {
            self.l3_record += 1;
            let quantity = fastrand::u32(10..40);
            self.mes.set(
                "Line1.Record",
                format!(
                    r#"{{"seq":{},"order":"WO-{}","material":"M-100","qty":{quantity}}}"#,
                    self.l3_record,
                    7000 + self.l3_record / 10
                ),
            );
            add(&made, "L3", COMPLETION, "record", u64::from(quantity));
        }
    }
}

/// One row of the reconciliation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Parts made at the PLC or MES.
    pub produced: u64,
    /// Parts in distinct events the ERP kept.
    pub delivered: u64,
    /// Events the ERP kept twice (after its dedup by id: must be 0).
    pub duplicates: u64,
}

/// Runs the demo; returns whether nothing was lost.
pub async fn run(
    duration: Duration,
    outage: Duration,
    state: Option<PathBuf>,
) -> anyhow::Result<bool> {
    let (state, _keep) = match state {
        Some(dir) => (dir, None),
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("plant-edge-demo-")
                .tempdir()?;
            (tmp.path().to_owned(), Some(tmp))
        }
    };
    std::fs::create_dir_all(&state)?;
    let log_file = state.join("agent.log");
    crate::logging::init_file(&log_file)?;
    eprintln!(
        "agent log: {}{}",
        log_file.display(),
        if _keep.is_some() {
            " (removed at the end; pass --state DIR to keep it)"
        } else {
            ""
        }
    );
    let peers = state.join("peers");
    std::fs::create_dir_all(&peers)?;
    let pki = simulators::pki::generate(&peers, "plant-edge demo CA");
    let plc = Plc::start().await;
    {
        let mut m = plc.mem();
        m.holding.insert(0, 65_000);
    }
    let mes = Mes::start(&MesOptions::open(peers.join("mes-pki"))).await;
    let mut erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    let config_path = state.join("plant-edge-demo.toml");
    // A free loopback port for the status page, chosen now.
    let status = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    std::fs::write(
        &config_path,
        demo_config(&state, &plc, &mes, &erp, &pki.ca, status),
    )?;
    eprintln!(
        "demo config: {} (copy it as a starting point)",
        config_path.display()
    );
    eprintln!(
        "simulated PLC modbus tcp://{}, MES {}, ERP {}",
        plc.addr,
        mes.endpoint(),
        erp.url()
    );
    let config = Config::load(&config_path)?;
    let agent = RunningAgent::start(&config).await?;
    eprintln!("status page: http://{status}/ (per-line totals, counted vs delivered, while the outage runs)");

    // Parts made before the agent first read a counter are not its to
    // count: the plant starts once every source has its baseline.
    let names: Vec<String> = config.sources.iter().map(|s| s.name.clone()).collect();
    let baseline_deadline = Instant::now() + Duration::from_secs(60);
    while !names
        .iter()
        .all(|n| agent.journal.source_cursor(n).ok().flatten().is_some())
    {
        if Instant::now() > baseline_deadline {
            agent.stop().await;
            anyhow::bail!("the agent did not read every simulated device within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let made: Made = Arc::default();
    let mut plant = Plant {
        plc,
        mes,
        made: made.clone(),
        l1_good: 65_000,
        l1_scrap: 0,
        l2_good: 0,
        l2_scrap: 0,
        l2_record: 0,
        l3_good: 0,
        l3_record: 0,
    };
    let started = Instant::now();
    let outage_at = if duration.is_zero() {
        Duration::from_secs(15)
    } else {
        duration.saturating_sub(outage) / 2
    };
    let mut outage_window: Option<(Duration, Option<Duration>)> = None;
    let mut peak_pending_in_outage = 0u64;
    // Backlog once a second, for the chart at the end.
    let mut backlog: Vec<u64> = Vec::new();
    let tty = std::io::stderr().is_terminal();
    let mut produce = tokio::time::interval(Duration::from_millis(100));
    let mut report = tokio::time::interval(Duration::from_secs(1));
    report.tick().await;
    loop {
        let elapsed = started.elapsed();
        if !duration.is_zero() && elapsed >= duration {
            break;
        }
        match outage_window {
            None if !outage.is_zero() && elapsed >= outage_at => {
                erp.stop();
                outage_window = Some((elapsed, None));
                eprintln!();
                eprintln!(
                    "t={:>3}s cloud link cut for {}",
                    elapsed.as_secs(),
                    humantime::format_duration(outage)
                );
            }
            Some((from, None)) if elapsed >= from + outage => {
                erp.start_again();
                outage_window = Some((from, Some(elapsed)));
                eprintln!();
                eprintln!("t={:>3}s cloud link back", elapsed.as_secs());
            }
            _ => {}
        }
        tokio::select! {
            _ = produce.tick() => plant.tick(),
            _ = report.tick() => {
                let pending = agent.journal.stats().pending_events;
                backlog.push(pending);
                if matches!(outage_window, Some((_, None))) {
                    peak_pending_in_outage = peak_pending_in_outage.max(pending);
                }
                progress(&agent, &made, &erp, started, tty);
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    if matches!(outage_window, Some((_, None))) {
        erp.start_again();
    }
    eprintln!();
    // Let the agent read the last values and the ERP receive everything.
    let produced_total =
        |made: &Made| -> u64 { made.lock().map(|m| m.values().sum()).unwrap_or(0) };
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = reconcile(&made, &erp);
        let delivered: u64 = rows.values().map(|r| r.delivered).sum();
        if delivered >= produced_total(&made) || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stats = agent.journal.stats();
    agent.stop().await;
    let rows = reconcile(&made, &erp);

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<5} {:<22} {:<8} {:>9} {:>10} {:>6} {:>11}",
        "line", "type", "kind", "produced", "delivered", "lost", "duplicates"
    )?;
    let mut lost_total = 0u64;
    let mut duplicates_total = 0u64;
    for ((line, event_type, kind), row) in &rows {
        let lost = row.produced.saturating_sub(row.delivered);
        lost_total += lost;
        duplicates_total += row.duplicates;
        writeln!(
            out,
            "{line:<5} {event_type:<22} {kind:<8} {:>9} {:>10} {lost:>6} {:>11}",
            row.produced, row.delivered, row.duplicates
        )?;
    }
    if let Some((from, to)) = outage_window {
        writeln!(
            out,
            "cloud outage: t={}s to t={}s; the journal held up to {} events meanwhile",
            from.as_secs(),
            to.unwrap_or(started.elapsed()).as_secs(),
            peak_pending_in_outage
        )?;
    }
    writeln!(
        out,
        "backlog, one column per second: t=0s {} t={}s (peak {} events)",
        sparkline(&backlog),
        backlog.len(),
        backlog.iter().max().copied().unwrap_or(0)
    )?;
    writeln!(
        out,
        "journal: appended {} delivered {} pending {} dead letters {}; ERP requests {}",
        stats.counters.appended,
        stats.counters.delivered,
        stats.pending_events,
        stats.dead_letters,
        *erp.state.requests.lock().unwrap_or_else(|p| p.into_inner())
    )?;
    let (closed, unbalanced) = checkpoints(&erp);
    writeln!(
        out,
        "checkpoints: {closed} line periods closed and delivered; {}",
        if unbalanced == 0 {
            "in each, the parts the PLC counted equal the parts the events carried".to_owned()
        } else {
            format!("{unbalanced} where they DIFFER")
        }
    )?;
    let ok = lost_total == 0 && duplicates_total == 0 && unbalanced == 0;
    writeln!(
        out,
        "{}",
        if ok {
            "RESULT: nothing lost, nothing posted twice".to_owned()
        } else {
            format!("RESULT: {lost_total} parts LOST, {duplicates_total} events posted twice")
        }
    )?;
    plant.mes.stop().await;
    Ok(ok)
}

/// Per (line, type, kind): produced at the plant vs distinct events the ERP kept.
fn reconcile(made: &Made, erp: &Erp) -> BTreeMap<(String, String, String), Reconciled> {
    let mut rows: BTreeMap<(String, String, String), Reconciled> = BTreeMap::new();
    for (key, parts) in made.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        rows.entry(key.clone()).or_default().produced = *parts;
    }
    let events = received(erp);
    let mut seen = BTreeSet::new();
    for event in events {
        // Periods' totals, checked by `checkpoints`, not parts.
        if event["type"] == protocols::period::CHECKPOINT {
            continue;
        }
        let kind = if event["data"]["counter"].is_object() {
            "counter"
        } else {
            "record"
        };
        let key = (
            event["data"]["line"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            event["type"].as_str().unwrap_or_default().to_owned(),
            kind.to_owned(),
        );
        let row = rows.entry(key).or_default();
        if !seen.insert(event["id"].as_str().unwrap_or_default().to_owned()) {
            row.duplicates += 1;
            continue;
        }
        row.delivered += event["data"]["quantity"].as_u64().unwrap_or(0);
    }
    rows
}

/// Every event the simulated ERP received, repeats included.
fn received(erp: &Erp) -> Vec<serde_json::Value> {
    erp.state
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Checkpoints the ERP received (distinct), and how many of them do not
/// balance: counted at the PLC differs from the sum of the period's events.
fn checkpoints(erp: &Erp) -> (usize, usize) {
    let events = received(erp);
    let mut seen = BTreeSet::new();
    let mut unbalanced = 0;
    for event in events
        .iter()
        .filter(|e| e["type"] == protocols::period::CHECKPOINT)
    {
        if !seen.insert(event["id"].to_string()) {
            continue;
        }
        let tally = &event["data"]["checkpoint"];
        let sent: f64 = tally["sent"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_f64()).sum())
            .unwrap_or(0.0);
        if (event["data"]["quantity"].as_f64().unwrap_or(0.0) - sent).abs() > 1e-9 {
            unbalanced += 1;
        }
    }
    (seen.len(), unbalanced)
}

/// Values as a one-line chart of block characters (the demo's outage).
fn sparkline(values: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().max().copied().unwrap_or(0).max(1);
    values
        .iter()
        .map(|v| BARS[((*v * 7).div_ceil(max)).min(7) as usize])
        .collect()
}

fn progress(agent: &RunningAgent, made: &Made, erp: &Erp, started: Instant, tty: bool) {
    let s = agent.journal.stats();
    let produced: u64 = made.lock().map(|t| t.values().sum()).unwrap_or(0);
    let delivered = erp.state.events.lock().map(|e| e.len()).unwrap_or(0);
    let mut links: Vec<String> = Vec::new();
    for (name, counters) in &agent.source_counters {
        if let Some(up) = counters.connected() {
            links.push(format!("{name}:{}", if up { "up" } else { "down" }));
        }
    }
    for (name, st) in &agent.forwarders {
        let st = st.lock().unwrap_or_else(|p| p.into_inner());
        links.push(format!(
            "{name}:{}",
            if st.retrying.is_some() {
                "retrying"
            } else {
                "up"
            }
        ));
    }
    let line = format!(
        "t={:>3}s parts made={produced} events durable={} at-ERP={delivered} pending={} oldest={:.1}s | {}",
        started.elapsed().as_secs(),
        s.counters.appended,
        s.pending_events,
        s.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0,
        links.join(" ")
    );
    if tty {
        eprint!("\r{line}\x1b[K");
    } else {
        eprintln!("{line}");
    }
}
