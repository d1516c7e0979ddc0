//! 1,000 OPC UA counter nodes changing every 100 ms, watched by the real
//! agent binary through one subscription: notifications/s turned into
//! durable events, the agent's CPU% and peak RSS.
//!
//! Run: `cargo bench -p plant-edge --bench opcua_subscription`
//! (`PLANT_EDGE_BENCH_SECONDS` sets the run length, default 20;
//! `PLANT_EDGE_BENCH_JOURNAL` adds lines to `[journal]`, e.g. `cache = "8MiB"`;
//! `PLANT_EDGE_BENCH_WRAP` runs another command as the agent, see below.)
//! The sink points at a closed port so that events stay in the journal.

// Bench harness entry points are not public API.
#![allow(missing_docs)]

use std::fmt::Write as _;
use std::time::Duration;

use plant_edge_tests::measure::{cpu_seconds_of, peak_rss_mib_of, unit_environment};
use plant_edge_tests::mes::{Mes, MesOptions};

const NODES: usize = 1000;

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
        let dir = tempfile::tempdir().expect("tempdir");
        let mes = Mes::start(&MesOptions::open(dir.path().join("mes-pki")))
        .await;
        let nodes = mes.add_counters(NODES);
        let state = dir.path().join("state");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let mut config = format!(
            "[agent]\nsite = \"bench\"\ngateway = \"gw\"\nstate_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\n[journal]\nmax_bytes = \"4GiB\"\n{}\n\
             [sinks.cloud]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nport = {closed}\n\n\
             [sources.mes]\nkind = \"opcua\"\nendpoint = \"{}\"\npublishing_interval = \"100ms\"\nsampling_interval = \"50ms\"\nline = \"L1\"\nmachine = \"m1\"\n",
            state.display(),
            std::env::var("PLANT_EDGE_BENCH_JOURNAL").unwrap_or_default(),
            mes.endpoint()
        );
        for (i, node) in nodes.iter().enumerate() {
            write!(
                config,
                "[[sources.mes.counters]]\nsignal = \"c{i}\"\ntype = \"production.completion\"\nnode = \"{node}\"\n"
            )
            .expect("fmt");
        }
        let file = dir.path().join("bench.toml");
        std::fs::write(&file, config).expect("config");
        // `PLANT_EDGE_BENCH_WRAP="heaptrack -o /tmp/agent /path/to/plant-edge"`
        // runs that command instead of the gateway binary (a profiler, a
        // build with symbols); CPU and RSS are then the wrapper's.
        let wrap = std::env::var("PLANT_EDGE_BENCH_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let gateway = plant_edge_tests::measure::gateway_agent();
        let mut agent = std::process::Command::new(words.next().unwrap_or(&gateway));
        let mut agent = agent
            .args(words)
            .envs(unit_environment())
            .args(["run", "-c", file.to_str().expect("utf8")])
            .stderr(std::fs::File::create(dir.path().join("agent.log")).expect("log file"))
            .spawn()
            .expect("agent");
        let pid = agent.id();
        // Session, subscription and the baseline read of every node.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let cpu0 = cpu_seconds_of(pid);
        let started = std::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let changes = seconds * 10;
        for k in 0..changes {
            tick.tick().await;
            mes.set_counters(NODES, (k + 1) as u32);
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let wall = started.elapsed().as_secs_f64();
        let scrape = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).ok()?;
            Some(text)
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
        let cpu = cpu_seconds_of(pid) - cpu0;
        let rss = peak_rss_mib_of(pid);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        agent.wait().expect("agent exit");
        let journal = buffer::Journal::open(buffer::JournalConfig::new(state.join("journal")))
            .expect("journal");
        let mut events = 0u64;
        let mut parts = 0u64;
        journal
            .scan_events(0, |e| {
                events += 1;
                let v: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
                parts += v["data"]["quantity"].as_u64().unwrap_or(0);
                true
            })
            .expect("scan");
        let changed = NODES as u64 * changes;
        println!(
            "{NODES} nodes changing every 100 ms for {wall:.0} s: {changed} value changes, {events} durable events = {:.0} events/s; parts counted {parts} of {changed}; agent CPU {:.0}% of one core; peak RSS {rss:.1} MiB",
            events as f64 / wall,
            cpu / wall * 100.0
        );
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        for line in log.lines().filter(|l| (l.contains("WARN") || l.contains("ERROR")) && !l.contains("mqtt")).take(8) {
            println!("  agent: {line}");
        }
        for line in scrape.lines().filter(|l| l.starts_with("plant_edge_opcua_source{")) {
            println!("  {line}");
        }
        mes.stop().await;
    });
}
