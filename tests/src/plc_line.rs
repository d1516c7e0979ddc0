//! A simulated production line in a PLC: a part counter at `holding:0`
//! and completion records handed over by the 4-phase handshake (ready
//! `coil:0` → ack `coil:1` → ready cleared → ack cleared → next record;
//! sequence `holding:10`, work order `holding:11..15`, quantity
//! `holding:15`). Counts what the PLC itself saw, so a test can reconcile
//! what the agent delivered against it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use simulators::plc::Plc;

/// The config lines of a Modbus source reading this line.
pub fn source_config(name: &str, endpoint: &str, poll_interval: &str) -> String {
    format!(
        r#"[sources.{name}]
kind = "modbus"
endpoint = "{endpoint}"
poll_interval = "{poll_interval}"
timeout = "500ms"
line = "L1"
machine = "{name}"

[[sources.{name}.counters]]
signal = "good"
type = "production.completion"
address = "holding:0"
format = "u16"
max_step = 5000

[[sources.{name}.records]]
signal = "completion"
type = "production.completion"
ready = "coil:0"
ack = "coil:1"
fields = {{ sequence = {{ address = "holding:10", format = "u16" }}, work_order = {{ address = "holding:11", format = "string", length = 4 }}, quantity = {{ address = "holding:15", format = "u16" }} }}
"#
    )
}

/// What the simulated PLC program did, as the PLC saw it.
#[derive(Default)]
pub struct Line {
    /// Make parts and records.
    pub producing: AtomicBool,
    /// Present queued records.
    pub presenting: AtomicBool,
    /// Parts made (all restarts together).
    pub made: AtomicU64,
    /// Records made and not yet presented.
    pub queued: AtomicU64,
    /// Records the PLC saw acknowledged, and their quantities.
    pub acked: AtomicU64,
    /// Sum of the quantities of the acknowledged records.
    pub acked_quantity: AtomicU64,
    /// The PLC's own record sequence (starts again after a restart).
    pub sequence: AtomicU64,
}

impl Line {
    /// Starts or stops production and the handing over of records.
    pub fn run(&self, on: bool) {
        self.producing.store(on, Ordering::SeqCst);
        self.presenting.store(on, Ordering::SeqCst);
    }
}

/// The PLC program: one part every `tick`, a record every 40 parts.
pub async fn program(plc: Arc<Plc>, line: Arc<Line>, tick: Duration) {
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(tick).await;
        ticks += 1;
        let mut m = plc.mem();
        if line.producing.load(Ordering::SeqCst) {
            let good = m.holding.get(&0).copied().unwrap_or(0);
            m.holding.insert(0, good.wrapping_add(1));
            line.made.fetch_add(1, Ordering::SeqCst);
            if ticks.is_multiple_of(40) {
                line.queued.fetch_add(1, Ordering::SeqCst);
            }
        }
        let ready = m.coils.get(&0).copied().unwrap_or(false);
        let ack = m.coils.get(&1).copied().unwrap_or(false);
        if ready && ack {
            let quantity = u64::from(m.holding.get(&15).copied().unwrap_or(0));
            line.acked.fetch_add(1, Ordering::SeqCst);
            line.acked_quantity.fetch_add(quantity, Ordering::SeqCst);
            m.coils.insert(0, false);
        } else if !ready
            && !ack
            && line.presenting.load(Ordering::SeqCst)
            && line.queued.load(Ordering::SeqCst) > 0
        {
            line.queued.fetch_sub(1, Ordering::SeqCst);
            let seq = line.sequence.fetch_add(1, Ordering::SeqCst) + 1;
            // Few distinct values: after a restart the records repeat.
            m.holding.insert(10, seq as u16);
            m.set_string(11, 4, &format!("WO-{}", seq % 3));
            m.holding.insert(15, 1 + (seq % 4) as u16);
            m.coils.insert(0, true);
        }
    }
}

/// Waits until the agent polled the PLC `n` more times.
pub async fn polled(plc: &Plc, n: u64, limit: Duration) {
    let start = plc.mem().reads;
    let deadline = Instant::now() + limit;
    while plc.mem().reads < start + n {
        assert!(Instant::now() < deadline, "the agent stopped polling");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the handshake is idle (no record presented or acked).
pub async fn handshake_idle(plc: &Plc, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        {
            let m = plc.mem();
            if !m.coils.get(&0).copied().unwrap_or(false)
                && !m.coils.get(&1).copied().unwrap_or(false)
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the handshake never settled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Parts and records in a set of distinct CloudEvents, for reconciling
/// against a [`Line`]: (counted parts, records, sum of record quantities).
pub fn tally<'a>(events: impl IntoIterator<Item = &'a serde_json::Value>) -> (u64, u64, u64) {
    let (mut parts, mut records, mut record_quantity) = (0, 0, 0);
    for event in events {
        let quantity = event["data"]["quantity"].as_u64().expect("quantity");
        if event["data"]["counter"].is_object() {
            parts += quantity;
        } else {
            records += 1;
            record_quantity += quantity;
        }
    }
    (parts, records, record_quantity)
}
