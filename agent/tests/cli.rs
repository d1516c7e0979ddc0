//! The `plant-edge` binary as an operator uses it.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BASE: &str = r#"[agent]
site = "p"
gateway = "g"
state_dir = "STATE"

[sinks.archive]
kind = "file"
path = "STATE/archive/events.jsonl"
"#;

fn base(state: &std::path::Path) -> String {
    BASE.replace("STATE", &state.display().to_string())
}

#[test]
fn validate_refuses_bad_configs_with_exit_78_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("unknown key", format!("{}\n[journal]\nmax_byte = \"1GiB\"\n", base(dir.path())), "journal.max_byte"),
        ("bad duration", format!("{}\n[forwarder]\nretry_max = \"soon\"\n", base(dir.path())), "forwarder.retry_max"),
        ("bad size", format!("{}\n[journal]\nmax_bytes = \"lots\"\n", base(dir.path())), "journal.max_bytes"),
        ("upgrade grace too long", format!("{}\n[journal]\nupgrade_grace = \"100days\"\n", base(dir.path())), "journal.upgrade_grace"),
        (
            "missing sink",
            format!("{}\n[sources.l1]\nkind = \"simulated\"\nline = \"L1\"\nmachine = \"m\"\nsinks = [\"erp\"]\n", base(dir.path())),
            "sources.l1.sinks",
        ),
        ("missing site", base(dir.path()).replace("site = \"p\"\n", ""), "agent.site"),
        ("no threads", base(dir.path()).replace("[agent]\n", "[agent]\nworker_threads = 0\n"), "agent.worker_threads"),
        ("no sinks", "[agent]\nsite = \"p\"\ngateway = \"g\"\n".to_owned(), "sinks"),
        ("mqtt qos 0", format!("{}\n[sinks.cloud]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nqos = 0\n", base(dir.path())), "sinks.cloud.qos"),
        (
            "mqtt qos 2 persistent",
            format!("{}\n[sinks.cloud]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nqos = 2\nclean_session = false\n", base(dir.path())),
            "sinks.cloud.clean_session",
        ),
        (
            "mqtt password file missing",
            format!("{}\n[sinks.cloud]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nusername = \"gw\"\npassword_file = \"/nonexistent/pw\"\n", base(dir.path())),
            "sinks.cloud.password_file",
        ),
        (
            "mqtt ca file missing",
            format!("{}\n[sinks.cloud]\nkind = \"mqtt\"\nhost = \"broker.example\"\nca_file = \"/nonexistent/ca.pem\"\n", base(dir.path())),
            "sinks.cloud.ca_file",
        ),
        ("mqtt unknown key", format!("{}\n[sinks.cloud]\nkind = \"mqtt\"\nhost = \"h\"\nqso = 1\n", base(dir.path())), "sinks.cloud.qso"),
    ];
    for (what, text, key) in cases {
        let file = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&file, text).expect("write");
        let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{what}: {err}");
        assert!(
            err.contains(&file.display().to_string()),
            "{what}: file not named: {err}"
        );
        assert!(
            err.contains(&format!("`{key}`")),
            "{what}: key {key} not named: {err}"
        );
    }
}

#[test]
fn run_with_a_bad_config_exits_78_without_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_config(dir.path(), &format!("{}\nbogus = 1\n", base(dir.path())));
    let out = run(&["run", "-c", file.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        !dir.path().join("journal").exists(),
        "nothing may start on a bad config"
    );
}

#[test]
fn a_journal_from_a_newer_version_is_refused_with_exit_65_and_left_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let journal_dir = state.join("journal");
    // A journal a newer version wrote (its sled files and its stamp).
    let journal = buffer::Journal::open(buffer::JournalConfig::new(&journal_dir)).expect("open");
    journal.close().expect("close");
    drop(journal);
    buffer::journal::format::write(
        &journal_dir,
        &buffer::journal::format::FormatStamp {
            format: buffer::journal::format::FORMAT + 1,
            writer: "plant-edge 9.9.9".into(),
            written: "2027-01-01T00:00:00.000Z".into(),
        },
    )
    .expect("stamp");
    // Every file of the journal with its bytes.
    let files = || {
        let mut files: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(&journal_dir)
            .expect("dir")
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| (e.path(), std::fs::read(e.path()).expect("read")))
            .collect();
        files.sort();
        files
    };
    let before = files();
    let file = write_config(dir.path(), &pipeline_config(&state, "100ms"));
    let out = run(&["run", "-c", file.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("plant-edge 9.9.9")
            && text.contains(&format!("reads format {}", buffer::journal::format::FORMAT)),
        "{text}"
    );
    assert_eq!(files(), before, "nothing on disk changed");
    assert!(
        !std::fs::read_dir(&state)
            .expect("state")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("unreadable")),
        "never moved aside for a version"
    );
}

#[test]
fn printed_default_config_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(&["print-config"]);
    assert!(out.status.success());
    let text = stdout(&out).replace("/var/lib/plant-edge", &dir.path().display().to_string());
    let file = write_config(dir.path(), &text);
    let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn sigterm_stops_cleanly_and_journal_commands_read_the_state() {
    run_stop_and_read_the_state(None);
}

#[test]
fn the_agent_runs_on_one_thread_when_told_to() {
    run_stop_and_read_the_state(Some(1));
}

fn run_stop_and_read_the_state(worker_threads: Option<usize>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut text = pipeline_config(&state, "20ms");
    if let Some(n) = worker_threads {
        text = text.replace("[agent]\n", &format!("[agent]\nworker_threads = {n}\n"));
        assert!(text.contains("worker_threads"));
    }
    let file = write_config(dir.path(), &text);
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .spawn()
        .expect("spawn");
    wait_for("archived events", Duration::from_secs(20), || {
        archived_events(&state).len() >= 20
    });
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "graceful stop exits 0");

    let state_arg = state.to_str().expect("utf8");
    let out = run(&["journal", "--state", state_arg, "verify"]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("journal OK"));

    let out = run(&["journal", "--state", state_arg, "stats", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("stats json");
    let appended = stats["counters"]["appended"].as_u64().expect("appended");
    let delivered = stats["counters"]["delivered"].as_u64().expect("delivered");
    let pending = stats["pending_events"].as_u64().expect("pending");
    assert!(appended >= 20);
    assert_eq!(
        delivered + pending,
        appended,
        "every appended event is delivered or still pending"
    );
    let archived: std::collections::HashSet<String> = archived_events(&state)
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        archived.len() as u64,
        delivered,
        "the archive holds exactly the delivered ids"
    );

    let out = run(&["journal", "--state", state_arg, "export", "--events"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).lines().count() as u64,
        pending,
        "export writes the pending events"
    );
}

#[test]
fn journal_commands_refuse_a_running_agents_journal_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let file = write_config(dir.path(), &pipeline_config(&state, "100ms"));
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .spawn()
        .expect("spawn");
    wait_for("journal", Duration::from_secs(20), || {
        state.join("journal/db").exists()
    });
    let out = run(&["journal", "--state", state.to_str().expect("utf8"), "stats"]);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    child.wait().expect("wait");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("stop the agent first"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn dead_letters_can_be_listed_requeued_and_purged_from_the_cli() {
    use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut jc = JournalConfig::new(dir.path().join("journal"));
    jc.sinks = vec!["erp".into()];
    {
        let journal = Journal::open(jc.clone()).expect("open");
        let events = (0..3u128)
            .map(|n| NewEvent {
                id: uuid::Uuid::from_u128(n + 1),
                class: EventClass::Business,
                routes: journal.routes_all(),
                payload: format!("{{\"type\":\"production.completion\",\"n\":{n}}}").into_bytes(),
                ledger: None,
            })
            .collect();
        journal
            .append_blocking(AppendRequest {
                source: "s".into(),
                events,
                cursor: None,
            })
            .expect("append")
            .expect("fits");
        journal.read_batch("erp", 10).expect("read");
        journal
            .reject("erp", 1, "HTTP 422: material unknown", 2)
            .expect("reject");
        journal.close().expect("close");
    }
    let state = dir.path().to_str().expect("utf8");
    let out = run(&["journal", "--state", state, "dead-letters", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listing = stdout(&out);
    assert!(
        listing.contains("HTTP 422: material unknown") && listing.contains("sink=erp"),
        "{listing}"
    );
    assert!(
        listing.contains(&uuid::Uuid::from_u128(2).to_string()),
        "{listing}"
    );

    let out = run(&[
        "journal",
        "--state",
        state,
        "dead-letters",
        "requeue",
        "--all",
    ]);
    assert!(
        stdout(&out).contains("requeued 1"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = run(&[
        "journal",
        "--state",
        state,
        "show",
        &uuid::Uuid::from_u128(2).to_string(),
    ]);
    assert!(
        out.status.success() && stdout(&out).contains("\"n\": 1"),
        "{}",
        stdout(&out)
    );

    let journal = Journal::open(jc.clone()).expect("open");
    let again = journal.read_batch("erp", 10).expect("read");
    let requeued = again
        .iter()
        .find(|e| e.id == uuid::Uuid::from_u128(2))
        .expect("requeued event");
    journal
        .reject("erp", requeued.seq, "still 422", 1)
        .expect("reject");
    journal.close().expect("close");
    drop(journal);
    let out = run(&[
        "journal",
        "--state",
        state,
        "dead-letters",
        "purge",
        "--all",
    ]);
    assert!(
        stdout(&out).contains("purged 1"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = run(&["journal", "--state", state, "dead-letters", "list"]);
    assert!(stdout(&out).trim().is_empty());

    // Refused for two reasons; the operator fixes one and requeues only
    // what it refused.
    let journal = Journal::open(jc.clone()).expect("open");
    let batch = journal.read_batch("erp", 10).expect("read");
    let seq_of = |n: u128| {
        batch
            .iter()
            .find(|e| e.id == uuid::Uuid::from_u128(n + 1))
            .map(|e| e.seq)
            .expect("pending")
    };
    journal
        .reject("erp", seq_of(0), "HTTP 422: material M-7 unknown", 1)
        .expect("reject");
    journal
        .reject("erp", seq_of(2), "HTTP 409: order closed", 1)
        .expect("reject");
    journal.close().expect("close");
    drop(journal);
    let dead = |args: &[&str]| {
        let mut all = vec!["journal", "--state", state, "dead-letters"];
        all.extend_from_slice(args);
        let out = run(&all);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let exported = dead(&["export"]);
    let lines: Vec<serde_json::Value> = exported
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{exported}");
    assert!(
        lines
            .iter()
            .all(|l| l["event"]["type"] == "production.completion" && l["reason"].is_string()),
        "each line carries the reason and the event: {exported}"
    );
    let only = dead(&["export", "--reason", "ORDER CLOSED"]);
    assert_eq!(only.lines().count(), 1, "{only}");
    assert!(only.contains("409"), "{only}");
    assert!(dead(&["requeue", "--reason", "material m-7"]).contains("requeued 1"));
    let left = dead(&["list"]);
    assert!(
        left.contains("order closed") && !left.contains("material"),
        "only the fixed reason was requeued: {left}"
    );
    assert!(dead(&["requeue", "--reason", "nothing like this"]).contains("requeued 0"));
    let journal = Journal::open(jc.clone()).expect("open");
    let resent: Vec<uuid::Uuid> = journal
        .read_batch("erp", 10)
        .expect("read")
        .iter()
        .map(|e| e.id)
        .collect();
    // (Refusals above an unacknowledged event are sent again after a
    // reopen too: README, "Known limits".)
    assert_eq!(
        resent
            .iter()
            .filter(|id| **id == uuid::Uuid::from_u128(1))
            .count(),
        1,
        "the requeued event is pending again with its id: {resent:?}"
    );
    journal.close().expect("close");
    drop(journal);
    assert!(dead(&["purge", "--reason", "order closed"]).contains("purged 1"));
    assert!(dead(&["list"]).trim().is_empty());
}

#[test]
fn validate_names_the_signal_of_an_overlapping_or_out_of_range_modbus_map() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = |counters: &str| {
        format!(
            "{}\n[sources.press]\nkind = \"modbus\"\nendpoint = \"tcp://10.0.0.5\"\nline = \"L1\"\nmachine = \"m\"\n{counters}",
            base(dir.path())
        )
    };
    let counter = |signal: &str, address: &str, format: &str| {
        format!("[[sources.press.counters]]\nsignal = \"{signal}\"\ntype = \"production.completion\"\naddress = \"{address}\"\nformat = \"{format}\"\n")
    };
    let cases = [
        (
            source(
                &(counter("good", "holding:100", "u32") + &counter("scrap", "holding:101", "u16")),
            ),
            "sources.press.counters[0]",
            "\"scrap\"",
        ),
        (
            source(&counter("good", "holding:65535", "u32")),
            "sources.press.counters[0]",
            "\"good\"",
        ),
        (
            source(&counter("good", "coil:3", "u16")),
            "sources.press.counters[0].address",
            "\"good\"",
        ),
        (
            source(&counter("good", "holding:1", "u128")),
            "sources.press.counters[0].format",
            "\"good\"",
        ),
        (
            source("[[sources.press.records]]\nsignal = \"completion\"\ntype = \"production.completion\"\nready = \"coil:10\"\nack = \"coil:11\"\nkey = []\nfields = { sequence = { address = \"holding:300\", format = \"u16\" } }\n"),
            "sources.press.records[0].key",
            "same identity",
        ),
        (
            source("[[sources.press.records]]\nsignal = \"completion\"\ntype = \"production.completion\"\nready = \"coil:10\"\nack = \"coil:11\"\nfields = { sequence = { address = \"holding:300\", format = \"u16\" }, at = { address = \"holding:301\", format = \"u16\", epoch = \"ms\" } }\n"),
            "sources.press.records[0].fields.at.format",
            "epoch ms",
        ),
        (
            source(&("counter_window = \"300ms\"\n".to_owned() + &counter("good", "holding:1", "u16"))),
            "sources.press.counter_window",
            "dividing a second",
        ),
    ];
    for (i, (text, key, signal)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("modbus-{i}.toml"));
        std::fs::write(&file, text).expect("write");
        let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "case {i}: {err}");
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(signal),
            "case {i}: {err}"
        );
    }
}

#[test]
fn the_readme_modbus_and_https_examples_validate() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    for kind in ["modbus", "https"] {
        let block = readme
            .split("```toml")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .find(|b| b.contains(&format!("kind = \"{kind}\"")))
            .unwrap_or_else(|| panic!("a {kind} example in the README"));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_config(dir.path(), &format!("{}\n{block}", base(dir.path())));
        let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "README {kind} example: {}",
            stderr(&out)
        );
    }
}

#[test]
fn https_sink_config_is_checked_and_insecure_skip_verify_is_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = |body: &str| {
        format!(
            "{}\n[sinks.erp]\nkind = \"https\"\n{body}",
            base(dir.path())
        )
    };
    let cases = [
        (sink("url = \"http://erp.example.com/events\"\n"), "sinks.erp.url"),
        (sink("url = \"https://erp.example.com/events\"\nmode = \"bulk\"\n"), "sinks.erp.mode"),
        (sink("url = \"https://erp.example.com/events\"\nbearer_token_file = \"/nonexistent/token\"\n"), "sinks.erp.bearer_token_file"),
        (
            sink("url = \"https://erp.example.com/events\"\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n"),
            "sinks.erp.password_file",
        ),
        (sink("url = \"https://erp.example.com/events\"\nheaders = { Authorization = \"x\" }\n"), "sinks.erp.headers.Authorization"),
    ];
    for (i, (text, key)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("https-{i}.toml"));
        std::fs::write(&file, text).expect("write");
        let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
        assert_eq!(out.status.code(), Some(78), "case {i}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("`{key}`")),
            "case {i}: {}",
            stderr(&out)
        );
    }
    let file = dir.path().join("insecure.toml");
    std::fs::write(
        &file,
        sink("url = \"https://erp.example.com/events\"\ninsecure_skip_verify = true\n"),
    )
    .expect("write");
    let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("WARNING") && stderr(&out).contains("insecure_skip_verify"),
        "{}",
        stderr(&out)
    );
}

/// Entries of `dir` that look like a journal moved aside.
fn moved_aside(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("unreadable"))
        .collect()
}

#[test]
fn a_journal_the_agent_cannot_open_stops_it_and_stays_where_it_is() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let text = base(&state).replace("state_dir", "metrics_listen = \"off\"\nstate_dir");
    let file = write_config(dir.path(), &text);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = file.to_str().expect("utf8");

    // A journal with a backlog, owned by root; the agent runs as nobody.
    let journal_dir = state.join("journal");
    {
        let mut jc = buffer::JournalConfig::new(&journal_dir);
        jc.sinks = vec!["archive".into()];
        let journal = buffer::Journal::open(jc).expect("journal");
        let routes = journal.routes_all();
        journal
            .append_blocking(buffer::AppendRequest {
                source: "l1".into(),
                events: vec![buffer::NewEvent {
                    id: uuid::Uuid::from_u128(1),
                    class: buffer::EventClass::Business,
                    routes,
                    payload: br#"{"type":"production.completion"}"#.to_vec(),
                    ledger: None,
                }],
                cursor: None,
            })
            .expect("append")
            .expect("fits");
        journal.close().expect("close");
    }
    std::fs::set_permissions(&journal_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_plant-edge"))
        .args(["run", "-c", config])
        .output()
        .expect("setpriv (util-linux) runs the agent as nobody");
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert_ne!(out.status.code(), Some(78), "not a config error: {err}");
    assert!(
        err.contains(&journal_dir.display().to_string()) && err.contains("ermission denied"),
        "names the path and the OS error: {err}"
    );
    assert!(moved_aside(&state).is_empty(), "nothing moved aside: {err}");
    let mut jc = buffer::JournalConfig::new(&journal_dir);
    jc.sinks = vec!["archive".into()];
    let journal = buffer::Journal::open(jc).expect("the journal is untouched");
    assert_eq!(journal.stats().pending_events, 1, "with its backlog");
    journal.close().expect("close");
    drop(journal);

    // The journal path is a file: the same, as root.
    let state2 = dir.path().join("state2");
    std::fs::create_dir(&state2).expect("mkdir");
    std::fs::write(state2.join("journal"), b"x").expect("write");
    let file2 = dir.path().join("second.toml");
    std::fs::write(
        &file2,
        text.replace(&state.display().to_string(), &state2.display().to_string()),
    )
    .expect("write");
    let out = run(&["run", "-c", file2.to_str().expect("utf8")]);
    let err = stderr(&out);
    assert!(
        out.status.code().is_some_and(|c| c != 0 && c != 78),
        "{:?}: {err}",
        out.status.code()
    );
    assert!(err.contains("journal"), "{err}");
    assert_eq!(std::fs::read(state2.join("journal")).expect("read"), b"x");
    assert!(moved_aside(&state2).is_empty());
}

#[test]
fn the_readme_ring_buffer_example_validates_and_a_bad_ring_names_its_key() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    let block = readme
        .split("```toml")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains(".rings]]"))
        .expect("a ring buffer example in the README");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_config(dir.path(), &format!("{}\n{block}", base(dir.path())));
    let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "README ring example: {}",
        stderr(&out)
    );
    let cases = [
        ("slots = 256", "slots = 40000", "rings[0].slots", "1..32768"),
        (
            "read_index = \"holding:999\"",
            "read_index = \"input:999\"",
            "rings[0].read_index",
            "a holding register the agent may write",
        ),
        (
            "quantity = { address = \"holding:1003\"",
            "quantity = { address = \"holding:1004\"",
            "quantity.address",
            "inside the first slot",
        ),
        (
            "slots = 256",
            "slots = 32000",
            "rings[0]",
            "addresses within 0..65535",
        ),
    ];
    for (from, to, key, expected) in cases {
        assert!(block.contains(from), "{from}");
        let text = format!("{}\n{}", base(dir.path()), block.replace(from, to));
        let file = write_config(dir.path(), &text);
        let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{to}: {err}");
        assert!(err.contains(key) && err.contains(expected), "{to}: {err}");
        assert!(
            err.contains("plant-edge.toml") || err.contains(".toml"),
            "names the file: {err}"
        );
    }
}

/// A shipped ERP example with its secrets and certificates pointed at
/// files in `dir` (what an integrator fills in).
fn example_config(dir: &std::path::Path, name: &str) -> String {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/examples")
            .join(name),
    )
    .expect("example");
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        let replaced = match key {
            "password_file" | "ca_file" | "bearer_token_file" | "client_secret_file" => {
                let file = dir.join(key);
                std::fs::write(&file, "secret\n").expect("secret");
                format!("{key} = \"{}\"", file.display())
            }
            "state_dir" => format!("state_dir = \"{}\"", dir.join("state").display()),
            _ => line.to_owned(),
        };
        out.push_str(&replaced);
        out.push('\n');
    }
    out
}

#[test]
fn every_shipped_erp_example_validates_and_a_template_naming_a_missing_field_exits_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let examples = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/examples"),
    )
    .expect("examples")
    .filter_map(|e| e.ok()?.file_name().into_string().ok())
    .filter(|n| n.ends_with(".toml"))
    .collect::<Vec<_>>();
    assert_eq!(examples.len(), 6);
    for name in &examples {
        let file = write_config(dir.path(), &example_config(dir.path(), name));
        let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
    }
    let broken = example_config(dir.path(), "sap-s4hana-confirmation.toml")
        .replace("{{ unit }}", "{{ base_unit }}");
    let file = write_config(dir.path(), &broken);
    let out = run(&["validate", "-c", file.to_str().expect("utf8")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("`sinks.sap.request.body`"), "key named: {err}");
    assert!(
        err.contains("template line 8") && err.contains("base_unit"),
        "template line and the undefined name: {err}"
    );
}

#[test]
fn credentials_are_found_beside_the_config_outside_the_unit_and_status_and_journal_need_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "{}\n[sinks.cloud]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nusername = \"gw\"\npassword_file = \"mqtt-password\"\n",
        base(&dir.path().join("state")).replacen(
            "[agent]\n",
            &format!("[agent]\nmetrics_listen = \"127.0.0.1:{}\"\n", free_port()),
            1
        )
    );
    let file = write_config(dir.path(), &text);
    let path = file.to_str().expect("utf8");
    // Not there: 78, naming the key and every place looked in.
    let out = bin()
        .args(["validate", "-c", path])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("validate");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("`sinks.cloud.password_file`"), "{err}");
    let beside = dir.path().join("credentials").join("mqtt-password");
    assert!(
        err.contains(&beside.display().to_string()),
        "where it looked: {err}"
    );
    // status and journal read no secret: they get past the configuration.
    let out = bin()
        .args(["status", "-c", path])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("status");
    assert_ne!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no agent answering"),
        "{}",
        stderr(&out)
    );
    let out = bin()
        .args(["journal", "-c", path, "stats"])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("journal");
    assert_ne!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(!stderr(&out).contains("password_file"), "{}", stderr(&out));
    // Where LoadCredential= takes it from: beside the config.
    std::fs::create_dir_all(beside.parent().expect("dir")).expect("mkdir");
    std::fs::write(&beside, "s3cret\n").expect("secret");
    let out = bin()
        .args(["validate", "-c", path])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("validate");
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The README's journal commands run as root on the service's journal:
/// sled writes files at every open (settings, snapshots). Root acts as the
/// journal's owner, so none of them ends up root-owned and the service can
/// still open its journal afterwards.
#[test]
fn journal_commands_run_as_root_leave_no_root_owned_file_in_the_services_journal() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        panic!("this test checks what root leaves behind: run the suite as root (scripts/test.sh does)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    {
        let mut jc = buffer::JournalConfig::new(state.join("journal"));
        jc.sinks = vec!["erp".into()];
        let journal = buffer::Journal::open(jc).expect("journal");
        journal.close().expect("close");
    }
    // The service's user (any uid but root's).
    let (uid, gid) = (4242, 4242);
    for entry in walk(&state) {
        nix::unistd::chown(
            &entry,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .expect("chown");
    }
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let out = run(&["journal", "--state", state.to_str().expect("utf8"), "stats"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("acting as 4242"), "{}", stderr(&out));
    let root_owned: Vec<String> = walk(&state)
        .into_iter()
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| m.uid() != uid)
                .unwrap_or(false)
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(root_owned.is_empty(), "left for root only: {root_owned:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_owned()];
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_backlog_exported_and_imported_elsewhere_is_the_same_backlog_and_a_second_import_adds_nothing()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let sinks = archive_and_dead_broker(&state, free_port());
    let file = write_config(
        dir.path(),
        &pipeline_config_with_sinks(&state, "20ms", &sinks),
    );
    let mut child = bin()
        .args(["run", "-c", file.to_str().expect("utf8")])
        .spawn()
        .expect("spawn");
    wait_for("archived events", Duration::from_secs(20), || {
        archived_events(&state).len() >= 20
    });
    // Killed: the journal holds what was acknowledged, a graceful stop
    // adds nothing this test is about.
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    let stats = |state: &std::path::Path| -> serde_json::Value {
        let out = run(&[
            "journal",
            "--state",
            state.to_str().expect("utf8"),
            "stats",
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).expect("stats JSON")
    };
    let backlog = |stats: &serde_json::Value, sink: &str| -> u64 {
        stats["sinks"]
            .as_array()
            .expect("sinks")
            .iter()
            .find(|s| s["name"] == sink)
            .and_then(|s| s["backlog"].as_u64())
            .unwrap_or(0)
    };
    let before = stats(&state);
    assert!(backlog(&before, "cloud") >= 20, "{before}");

    let export = dir.path().join("backlog.ndjson");
    let out = run(&[
        "journal",
        "--state",
        state.to_str().expect("utf8"),
        "export",
        "--out",
        export.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let other = dir.path().join("other");
    let import = |expect: &str| {
        let out = run(&[
            "journal",
            "--state",
            other.to_str().expect("utf8"),
            "import",
            export.to_str().expect("utf8"),
        ]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).contains(expect), "{}", stdout(&out));
    };
    import(&format!("imported {} events", backlog(&before, "cloud")));
    let after = stats(&other);
    assert_eq!(backlog(&after, "cloud"), backlog(&before, "cloud"));
    assert_eq!(backlog(&after, "archive"), backlog(&before, "archive"));
    assert_eq!(after["pending_events"], before["pending_events"]);
    import("imported 0 events");
    assert_eq!(stats(&other)["pending_events"], before["pending_events"]);

    let out = run(&[
        "journal",
        "--state",
        other.to_str().expect("utf8"),
        "commit-upgrade",
    ]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("no upgrade to commit"),
        "{}",
        stdout(&out)
    );
}
