//! The gateway's steady state: the release agent binary reading 20 lines
//! (one simulated PLC each, a completion counter rising by 2 every 100 ms,
//! a scrap counter by 1 every 2 s: about 20 parts/s per line), polled every
//! 100 ms, forwarding to a local Mosquitto at QoS 1, for half an hour.
//! Every sample prints the agent's RSS, CPU over the interval, bytes it
//! wrote to storage per event (`write_bytes` of /proc/<pid>/io), the
//! journal's size on disk, the dedup window's memory and the backlog.
//!
//! Run: `cargo bench -p plant-edge --bench gateway_soak`
//! (`PLANT_EDGE_BENCH_SECONDS` run length, default 1800;
//! `PLANT_EDGE_BENCH_SAMPLE` seconds between samples, default 60;
//! `PLANT_EDGE_BENCH_ONE_CORE=1` pins the agent to core 0 with
//! `agent.worker_threads = 1`; `PLANT_EDGE_BENCH_JOURNAL` adds lines to
//! `[journal]`, e.g. `cache = "4MiB"`; `PLANT_EDGE_BENCH_COUNTER_WINDOW`
//! each source's `counter_window`, default `1s`, `0s` stores every poll.)

// Bench harness entry points are not public API.
#![allow(missing_docs)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use plant_edge_tests::measure::{
    cpu_seconds_of, peak_rss_mib_of, rss_mib_of, storage_bytes_written_of,
};
use plant_edge_tests::mosquitto::{Broker, BrokerOptions};
use plant_edge_tests::plc::Plc;

const LINES: usize = 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn metrics(port: u16) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn main() {
    let seconds = env_u64("PLANT_EDGE_BENCH_SECONDS", 1800);
    let sample = env_u64("PLANT_EDGE_BENCH_SAMPLE", 60).max(1);
    let one_core = env_u64("PLANT_EDGE_BENCH_ONE_CORE", 0) == 1;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let broker = Broker::start(BrokerOptions {
            quiet: true,
            ..Default::default()
        });
        let mut plcs = Vec::new();
        for _ in 0..LINES {
            plcs.push(Plc::start().await);
        }
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let state = dir.path().join("state");
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut config = format!(
            "[agent]\nsite = \"bench\"\ngateway = \"gw\"\nstate_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n{}\n\
             [journal]\n{}\n[sinks.cloud]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nport = {}\nqos = 1\n\n",
            state.display(),
            if one_core { "worker_threads = 1\n" } else { "" },
            std::env::var("PLANT_EDGE_BENCH_JOURNAL").unwrap_or_default(),
            broker.port,
        );
        let counter_window =
            std::env::var("PLANT_EDGE_BENCH_COUNTER_WINDOW").unwrap_or_else(|_| "1s".into());
        for (line, plc) in plcs.iter().enumerate() {
            write!(
                config,
                "[sources.line{line}]\nkind = \"modbus\"\nendpoint = \"tcp://{}\"\npoll_interval = \"100ms\"\ntimeout = \"500ms\"\n\
                 counter_window = \"{counter_window}\"\n\
                 line = \"L{line}\"\nmachine = \"press{line}\"\nattributes = {{ cost_center = \"CC-{}\", work_center = \"WC-PRESS-{line:02}\" }}\n\
                 [[sources.line{line}.counters]]\nsignal = \"good\"\ntype = \"production.completion\"\naddress = \"holding:0\"\n\
                 [[sources.line{line}.counters]]\nsignal = \"scrap\"\ntype = \"production.scrap\"\naddress = \"holding:1\"\n",
                plc.addr,
                4100 + line
            )
            .expect("fmt");
        }
        let file = dir.path().join("soak.toml");
        std::fs::write(&file, config).expect("config");
        let mut command = if one_core {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", "0", env!("CARGO_BIN_EXE_plant-edge")]);
            c
        } else {
            std::process::Command::new(env!("CARGO_BIN_EXE_plant-edge"))
        };
        let mut agent = command
            // As the systemd unit runs it.
            .env("MALLOC_ARENA_MAX", "2")
            .args(["run", "-c", file.to_str().expect("utf8")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("agent (taskset is in util-linux)");
        let pid = agent.id();
        // The PLCs make parts on their own clock, out of step with the polls.
        let making = {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut k: u64 = 0;
                loop {
                    tick.tick().await;
                    k += 1;
                    for plc in &plcs {
                        let mut m = plc.mem();
                        let good = m.holding.get(&0).copied().unwrap_or(0);
                        m.holding.insert(0, good.wrapping_add(2));
                        if k.is_multiple_of(20) {
                            let scrap = m.holding.get(&1).copied().unwrap_or(0);
                            m.holding.insert(1, scrap.wrapping_add(1));
                        }
                    }
                }
            })
        };
        let started = Instant::now();
        let (mut cpu_before, mut written_before, mut appended_before) = (cpu_seconds_of(pid), storage_bytes_written_of(pid), 0.0);
        println!(
            "{LINES} lines x ~21 parts/s polled every 100 ms -> Mosquitto QoS 1{}; a sample every {sample} s for {seconds} s",
            if one_core { ", agent pinned to core 0 with worker_threads = 1" } else { "" }
        );
        println!("  minute |  RSS MiB | CPU % | events/s | bytes written/event | journal MB | dedup MiB | backlog");
        let mut rss_samples = Vec::new();
        let mut cpu_samples = Vec::new();
        while started.elapsed().as_secs() < seconds {
            tokio::time::sleep(Duration::from_secs(sample)).await;
            if let Ok(Some(status)) = agent.try_wait() {
                panic!("the agent exited during the soak: {status}");
            }
            let text = metrics(metrics_port);
            let appended = metric(&text, "plant_edge_journal_appended_total");
            let (cpu, written) = (cpu_seconds_of(pid), storage_bytes_written_of(pid));
            let events = appended - appended_before;
            let rss = rss_mib_of(pid);
            let cpu_pct = (cpu - cpu_before) / sample as f64 * 100.0;
            println!(
                "  {:6.1} | {rss:8.1} | {cpu_pct:5.1} | {:8.0} | {:18.0} | {:10.1} | {:9.1} | {:7.0}",
                started.elapsed().as_secs_f64() / 60.0,
                events / sample as f64,
                (written - written_before) as f64 / events.max(1.0),
                dir_bytes(&state.join("journal")) as f64 / 1e6,
                metric(&text, "plant_edge_journal_dedup_memory_bytes") / 1048576.0,
                metric(&text, "plant_edge_journal_pending_events"),
            );
            rss_samples.push(rss);
            cpu_samples.push(cpu_pct);
            (cpu_before, written_before, appended_before) = (cpu, written, appended);
        }
        making.abort();
        let text = metrics(metrics_port);
        println!(
            "end: RSS {:.1} MiB (peak {:.1} MiB), median CPU {:.1} % of one core, {} events appended, {} delivered",
            rss_samples.last().copied().unwrap_or(f64::NAN),
            peak_rss_mib_of(pid),
            {
                cpu_samples.sort_by(f64::total_cmp);
                cpu_samples.get(cpu_samples.len() / 2).copied().unwrap_or(f64::NAN)
            },
            metric(&text, "plant_edge_journal_appended_total"),
            metric(&text, "plant_edge_journal_delivered_total"),
        );
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        agent.wait().expect("agent exit");
        drop(broker);
    });
}
