//! 50 simulated PLCs × 20 counters polled every 100 ms by the real agent
//! binary: events/s, the agent's CPU%, and the latency from a counter
//! change in the PLC to its event being committed to the journal.
//!
//! Run: `cargo bench -p plant-edge --bench modbus_poll`
//! (`PLANT_EDGE_BENCH_SECONDS` sets the run length, default 20.)
//! The sink points at a closed port so that events stay in the journal,
//! where their commit time can be read back.

// Bench harness entry points are not public API.
#![allow(missing_docs)]

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plant_edge_tests::measure::{cpu_seconds_of, peak_rss_mib_of, unit_environment};
use plant_edge_tests::plc::Plc;

const DEVICES: usize = 50;
const COUNTERS: u16 = 20;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn main() {
    let seconds: u64 = std::env::var("PLANT_EDGE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut plcs = Vec::new();
        for _ in 0..DEVICES {
            plcs.push(Plc::start().await);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let mut config = format!(
            "[agent]\nsite = \"bench\"\ngateway = \"gw\"\nstate_dir = \"{}\"\n\n[journal]\nmax_bytes = \"4GiB\"\n\n\
             [sinks.cloud]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nport = {closed}\n\n",
            state.display()
        );
        for (d, plc) in plcs.iter().enumerate() {
            write!(
                config,
                "[sources.dev{d}]\nkind = \"modbus\"\nendpoint = \"tcp://{}\"\npoll_interval = \"100ms\"\ntimeout = \"500ms\"\nline = \"L{d}\"\nmachine = \"m{d}\"\n",
                plc.addr
            )
            .expect("fmt");
            for c in 0..COUNTERS {
                write!(config, "[[sources.dev{d}.counters]]\nsignal = \"c{c}\"\ntype = \"production.completion\"\naddress = \"holding:{c}\"\n").expect("fmt");
            }
        }
        let file = dir.path().join("bench.toml");
        std::fs::write(&file, config).expect("config");
        let mut agent = std::process::Command::new(plant_edge_tests::measure::gateway_agent())
            .envs(unit_environment())
            .args(["run", "-c", file.to_str().expect("utf8")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("agent");
        let pid = agent.id();
        // Let every device take its baseline.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu0 = cpu_seconds_of(pid);
        let started = std::time::Instant::now();
        // change_ms[k] = when the counters were set to value k + 1.
        let mut change_ms = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for k in 0..(seconds * 10) {
            tick.tick().await;
            let value = (k + 1) as u16;
            // Change at a random point of the tick: the agent's polls run
            // on their own 100 ms clock, so the wait for the next poll is
            // part of what a plant sees.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..90))).await;
            change_ms.push(now_ms());
            for plc in &plcs {
                let mut m = plc.mem();
                for c in 0..COUNTERS {
                    m.holding.insert(c, value);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds_of(pid) - cpu0;
        let rss = peak_rss_mib_of(pid);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        agent.wait().expect("agent exit");

        let journal = buffer::Journal::open(buffer::JournalConfig::new(state.join("journal"))).expect("journal");
        let mut latencies = Vec::new();
        let mut internal = Vec::new();
        let mut events = 0u64;
        journal
            .scan_events(0, |e| {
                events += 1;
                let v: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
                let value = v["data"]["counter"]["value"].as_u64().unwrap_or(0) as usize;
                if let Some(changed) = value.checked_sub(1).and_then(|k| change_ms.get(k)) {
                    latencies.push(e.appended_ms.saturating_sub(*changed));
                }
                // CloudEvents `time` is when the poll read the value.
                if let Some(read_at) = v["time"].as_str().and_then(|t| humantime::parse_rfc3339(t).ok()) {
                    let read_ms = read_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                    internal.push(e.appended_ms.saturating_sub(read_ms));
                }
                true
            })
            .expect("scan");
        latencies.sort_unstable();
        internal.sort_unstable();
        let pct_of = |v: &Vec<u64>, p: f64| v.get(((v.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0);
        let pct = |p: f64| pct_of(&latencies, p);
        println!(
            "{DEVICES} devices x {COUNTERS} counters at 100 ms for {wall:.0} s: {events} events = {:.0} events/s; agent CPU {:.0}% of one core; peak RSS {rss:.1} MiB",
            events as f64 / wall,
            cpu / wall * 100.0
        );
        println!(
            "counter change -> event committed to the journal: p50 {} ms, p99 {} ms (poll interval 100 ms; fsync adds ~0.6 ms)",
            pct(0.5),
            pct(0.99)
        );
        println!(
            "  of which poll read -> committed: p50 {} ms, p99 {} ms",
            pct_of(&internal, 0.5),
            pct_of(&internal, 0.99)
        );
    });
}
