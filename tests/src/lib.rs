//! Shared helpers for plant-edge's end-to-end and crash tests.

pub mod mosquitto;
pub mod plc_line;
pub mod vm;

pub use simulators::{erp, erp_apis, mes, pki, plc};

pub mod crash {
    //! Names shared by the journal crash test and its child process.

    use uuid::Uuid;

    /// The one sink the crash child registers.
    pub const SINK: &str = "archive";
    /// The sources the crash child appends from concurrently.
    pub const SOURCES: [&str; 4] = ["press1", "press2", "weld1", "paint1"];

    /// The deterministic id of the `n`th event of `source`.
    pub fn crash_event_id(source: &str, n: u64) -> Uuid {
        buffer::id::counter_event_id(source, "good", 0, n)
    }
}

pub mod drive {
    //! A minimal forwarder loop for sink-level tests.

    use std::time::{Duration, Instant};

    use buffer::Journal;
    use protocols::{Sink, Verdict};

    /// Feeds `sink` from the journal until `done` holds or `limit` passes;
    /// returns whether `done` held.
    pub async fn until(
        journal: &Journal,
        sink_name: &str,
        sink: &mut dyn Sink,
        limit: Duration,
        mut done: impl FnMut(&Journal) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done(journal) {
                return true;
            }
            let batch = journal.read_batch(sink_name, 256).expect("read");
            if batch.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let verdicts = sink.deliver(&batch).await;
            let mut retry = false;
            let mut pending = false;
            let mut delivered = Vec::with_capacity(batch.len());
            for (event, verdict) in batch.iter().zip(verdicts) {
                match verdict {
                    Verdict::Delivered => delivered.push(event.seq),
                    Verdict::Rejected { reason } => journal
                        .reject(sink_name, event.seq, &reason, 1)
                        .expect("reject"),
                    Verdict::Retry { reason, .. } | Verdict::Hold { reason } => {
                        if !retry {
                            eprintln!("drive: retry after seq {}: {reason}", event.seq);
                        }
                        retry = true;
                    }
                    // Handed out again at the next read, to be followed up.
                    Verdict::Pending { .. } => pending = true,
                }
            }
            journal.ack(sink_name, &delivered).expect("ack");
            if pending && !retry {
                journal.rewind(sink_name).expect("rewind");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if retry {
                journal.rewind(sink_name).expect("rewind");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        done(journal)
    }
}

pub mod measure {
    //! CPU time and peak RSS from /proc, for the benchmarks.

    fn stat_ticks(pid: &str) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field(11) + field(12)
    }

    /// A `kB` field of /proc/<pid>/status (`VmHWM:`, `VmRSS:`), in MiB.
    fn status_mib(pid: &str, field: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    fn hwm_mib(pid: &str) -> f64 {
        status_mib(pid, "VmHWM:")
    }

    fn write_bytes(pid: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/io"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Bytes this process caused to be written to storage so far
    /// (`write_bytes` of /proc/self/io: what reaches the disk, page-sized,
    /// not what was passed to write()).
    pub fn storage_bytes_written() -> u64 {
        write_bytes("self")
    }

    /// [`storage_bytes_written`] of another process.
    pub fn storage_bytes_written_of(pid: u32) -> u64 {
        write_bytes(&pid.to_string())
    }

    /// Current resident set of another process, MiB.
    pub fn rss_mib_of(pid: u32) -> f64 {
        status_mib(&pid.to_string(), "VmRSS:")
    }

    /// Private anonymous memory (heap, stacks) of another process, MiB:
    /// the part of RSS that is not pages of files (the binary, libraries),
    /// which the kernel can drop and read again.
    pub fn anonymous_mib_of(pid: u32) -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Anonymous:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// User + system CPU seconds of this process.
    pub fn cpu_seconds() -> f64 {
        stat_ticks("self") as f64 / 100.0
    }

    /// User + system CPU seconds of another process.
    pub fn cpu_seconds_of(pid: u32) -> f64 {
        stat_ticks(&pid.to_string()) as f64 / 100.0
    }

    /// Peak resident set of this process, MiB.
    pub fn peak_rss_mib() -> f64 {
        hwm_mib("self")
    }

    /// Peak resident set of another process, MiB.
    pub fn peak_rss_mib_of(pid: u32) -> f64 {
        hwm_mib(&pid.to_string())
    }

    /// `Environment=` pairs of `systemd/plant-edge.service`, so that a bench
    /// measures the agent as a gateway runs it (the allocator settings
    /// there change its RSS by a sixth). A variable already set in the
    /// bench's own environment wins, so a run can compare
    /// (`GLIBC_TUNABLES= cargo bench ...` measures without the unit's).
    pub fn unit_environment() -> Vec<(String, String)> {
        let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/plant-edge.service");
        let text = std::fs::read_to_string(unit).expect("systemd/plant-edge.service");
        text.lines()
            .filter_map(|line| line.trim().strip_prefix("Environment="))
            .filter_map(|pair| pair.split_once('='))
            .filter(|(name, _)| std::env::var_os(name).is_none())
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect()
    }

    /// The agent binary as the .deb ships it, for benchmarks of a gateway's
    /// footprint: `cargo bench` hands benches the binary built with the
    /// default `demo` feature (simulated PLC, MES and ERP servers), 32 MB
    /// on x86_64, and its extra code pages showed up as 4–5 MiB of RSS.
    /// Builds `--release --no-default-features` into `target/shipped`
    /// (a separate directory, so the bench's own build is not redone),
    /// or takes `PLANT_EDGE_BENCH_AGENT` when set.
    pub fn gateway_agent() -> String {
        if let Ok(path) = std::env::var("PLANT_EDGE_BENCH_AGENT") {
            return path;
        }
        let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let target = format!("{workspace}/target/shipped");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        eprintln!("building the gateway's agent binary (cargo build --release -p plant-edge --no-default-features) into {target}");
        let status = std::process::Command::new(cargo)
            .current_dir(workspace)
            .args([
                "build",
                "--release",
                "-p",
                "plant-edge",
                "--no-default-features",
                "--target-dir",
            ])
            .arg(&target)
            .status()
            .expect("cargo build of the gateway agent");
        assert!(status.success(), "cargo build of the gateway agent failed");
        format!("{target}/release/plant-edge")
    }

    /// The JSON of a production completion as a Modbus counter source
    /// writes it (work order, material, lot, counter, origin, three
    /// attributes; about 700 bytes), for benchmarks whose figures depend
    /// on what the payload is made of (compression, parsing): a padded
    /// dummy would compress unrealistically well.
    pub fn realistic_event(line: u64, n: u64) -> Vec<u8> {
        use buffer::event::{CounterReading, Origin};
        use buffer::{CloudEvent, EventData, EventType, Quantity};
        let now = std::time::SystemTime::now();
        let machine = format!("press-{line:02}");
        let id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{line}/{n}/{}", fastrand::u64(..)).as_bytes(),
        );
        let attributes = [
            ("cost_center", format!("CC-{}", 4100 + line)),
            ("work_center", format!("WC-PRESS-{line:02}")),
            (
                "shift",
                ["early", "late", "night"][(n % 3) as usize].to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut event = CloudEvent::new(
            id,
            buffer::event::source_urn("plant-hamburg", "gw-hall-3", &machine),
            EventType::completion(),
            now,
            EventData {
                site: "plant-hamburg".into(),
                line: format!("L{line}"),
                machine: machine.clone(),
                work_order: Some(format!("WO-2026-{:06}", 4800 + line * 7 + n / 500)),
                material: Some(format!("MAT-{:08}", 10_000_000 + line * 13)),
                quantity: Quantity::Count(1 + n % 2),
                unit: "EA".into(),
                lot: Some(format!("LOT-{}-{:04}", 26_340 + n / 2000, line)),
                reason_code: None,
                counter: Some(CounterReading {
                    value: 1_000_000 + n,
                    previous: 1_000_000 + n - 1,
                    epoch: 3,
                }),
                origin: Origin {
                    protocol: "modbus".into(),
                    endpoint: format!("tcp://10.20.3.{}:502", 10 + line),
                    address: "hr:4000".into(),
                    quality: "good".into(),
                    source_time: Some(buffer::event::rfc3339_millis(now)),
                },
                attributes,
                checkpoint: None,
            },
        );
        event.sequence = Some((1_000_000 + n).to_string());
        event.to_json()
    }
}

pub mod erp_events {
    //! Completions with work orders, as ERP tests and benches post them.

    use std::path::Path;

    use buffer::{AppendRequest, CloudEvent, EventClass, Journal, JournalConfig, NewEvent};
    use uuid::Uuid;

    /// `quantity` parts of `work_order` on line L1 (press1 of plant1/gw01),
    /// now, after the PLC counter read `reading`.
    pub fn completion(id: Uuid, work_order: &str, reading: u64, quantity: u64) -> CloudEvent {
        let mut event = CloudEvent::new(
            id,
            buffer::event::source_urn("plant1", "gw01", "press1"),
            buffer::EventType::completion(),
            std::time::SystemTime::now(),
            buffer::EventData {
                site: "plant1".into(),
                line: "L1".into(),
                machine: "press1".into(),
                work_order: Some(work_order.into()),
                material: None,
                quantity: buffer::Quantity::Count(quantity),
                unit: "EA".into(),
                lot: None,
                reason_code: None,
                counter: Some(buffer::event::CounterReading {
                    value: reading,
                    previous: reading.saturating_sub(quantity),
                    epoch: 0,
                }),
                origin: buffer::Origin {
                    protocol: "modbus".into(),
                    endpoint: "tcp://127.0.0.1:502".into(),
                    address: "hr:0".into(),
                    quality: "good".into(),
                    source_time: None,
                },
                attributes: Default::default(),
                checkpoint: None,
            },
        );
        event.sequence = Some(reading.to_string());
        event
    }

    /// Opens the journal under `state` (as the agent does) for `sink` and
    /// appends `events` in one commit; returns it and their ids in order.
    pub fn journal_of(state: &Path, sink: &str, events: Vec<CloudEvent>) -> (Journal, Vec<String>) {
        let mut config = JournalConfig::new(state.join("journal"));
        config.sinks = vec![sink.into()];
        let journal = Journal::open(config).expect("journal");
        let routes = journal.routes_all();
        let ids = events.iter().map(|e| e.id.to_string()).collect();
        journal
            .append_blocking(AppendRequest {
                source: "press1".into(),
                events: events
                    .iter()
                    .map(|e| NewEvent {
                        id: e.id,
                        class: EventClass::Business,
                        routes,
                        payload: e.to_json(),
                        ledger: None,
                    })
                    .collect(),
                cursor: None,
            })
            .expect("append")
            .expect("fits");
        (journal, ids)
    }
}
