//! The gateway image as an OT team meets it: flashed (a copy of the image
//! on a larger disk), configured by dropping files on its FAT partition,
//! booted under a real systemd (PID 1) in a qemu VM, reading a Modbus TCP
//! PLC on the host and forwarding to an HTTPS ERP on the host through
//! qemu's user network. Then what an OT engineer does and suffers: the
//! status page and summary, credentials by hand and in the unit, journal
//! commands as root, SIGKILL, a hung process, a bad config (on disk and on
//! the FAT partition), an ERP outage across a reboot, and power cuts (qemu
//! killed: the guest loses everything it had not synced).
//!
//! Reconciled at the end against what the PLC itself saw: every record the
//! PLC saw acknowledged reached the ERP, every part the PLC counted was
//! delivered; repeats only with the same id.
//!
//! Needs the image `scripts/test.sh` builds (see `vm::gateway_image`).
//! `PLANT_EDGE_VM_POWER_CUTS` sets the number of power cuts (default 3;
//! `scripts/power-cuts.sh` runs 100).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plant_edge_tests::erp::Erp;
use plant_edge_tests::pki;
use plant_edge_tests::plc::Plc;
use plant_edge_tests::plc_line::{self, Line};
use plant_edge_tests::vm::{gateway_image, Vm};

const METRICS_PORT: u16 = 9464;
const ERP_SECRET: &str = "erp-s3cret";
const SERVICE: &str = "plant-edge.service";

fn config(erp_port: u16, plc_port: u16) -> String {
    format!(
        r#"[agent]
site = "vm-plant"
gateway = "gw-vm"
state_dir = "/var/lib/plant-edge"
metrics_listen = "0.0.0.0:{METRICS_PORT}"
shutdown_timeout = "10s"

[sinks.erp]
kind = "https"
url = "https://10.0.2.2:{erp_port}/events"
mode = "batch"
ca_file = "/etc/plant-edge/certs/ca.pem"
oauth2 = {{ token_url = "https://10.0.2.2:{erp_port}/token", client_id = "gw-vm", client_secret_file = "erp-secret" }}
connect_timeout = "2s"
request_timeout = "5s"

{}"#,
        plc_line::source_config("press1", &format!("tcp://10.0.2.2:{plc_port}"), "50ms")
    )
}

/// `systemctl show` properties of the service.
fn show(vm: &Vm, properties: &str) -> HashMap<String, String> {
    vm.sh(&format!("systemctl show -p {properties} {SERVICE}"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn wait_active(vm: &Vm, what: &str) {
    vm.wait_until(
        what,
        Duration::from_secs(120),
        &format!("systemctl is-active -q {SERVICE}"),
    );
}

/// Waits until systemd restarted the service (more restarts than
/// `restarts_before`) and it is active again.
fn wait_restarted(vm: &Vm, what: &str, restarts_before: &str) {
    vm.wait_until(
        what,
        Duration::from_secs(90),
        &format!(
            "[ \"$(systemctl show -p NRestarts --value {SERVICE})\" -gt {restarts_before} ] && systemctl is-active -q {SERVICE}"
        ),
    );
}

/// GET from the host through a forwarded port (plain HTTP/1.0).
fn http_get(port: u16, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: gateway\r\n\r\n").expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    answer
}

/// The ERP's events, one per id, and how many arrived more than once.
fn delivered(erp: &Erp) -> (HashMap<String, serde_json::Value>, usize) {
    let mut by_id = HashMap::new();
    let mut repeats = 0;
    for event in erp.state.events.lock().expect("events").iter() {
        let id = event["id"].as_str().expect("id").to_owned();
        if let Some(first) = by_id.insert(id, event.clone()) {
            assert_eq!(&first, event, "a repeat carries the same event");
            repeats += 1;
        }
    }
    (by_id, repeats)
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_image_runs_the_service_under_systemd_through_outages_and_power_cuts() {
    let image = gateway_image();
    let cuts: usize = std::env::var("PLANT_EDGE_VM_POWER_CUTS")
        .ok()
        .map(|v| v.parse().expect("PLANT_EDGE_VM_POWER_CUTS: a number"))
        .unwrap_or(3);

    let host = tempfile::tempdir().expect("tempdir");
    let pki = pki::generate(host.path(), "plant-edge VM test CA");
    let mut erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    *erp.state.require_token.lock().expect("state") = true;
    *erp.state.client_secret.lock().expect("state") = Some(ERP_SECRET.to_owned());
    let plc = Arc::new(Plc::start().await);
    let line = Arc::new(Line::default());
    let program = tokio::spawn(plc_line::program(
        plc.clone(),
        line.clone(),
        // 20 parts/s: a reboot's outage stays under the counter's max_step.
        Duration::from_millis(50),
    ));

    // Flashed, and configured from a laptop: config, secret and CA
    // certificate dropped on the FAT partition.
    let mut vm = Vm::flash(&image, 4096, &[METRICS_PORT]);
    let drop = vm.scratch().join("drop");
    std::fs::create_dir_all(drop.join("credentials")).expect("drop dir");
    std::fs::create_dir_all(drop.join("certs")).expect("drop dir");
    std::fs::write(
        drop.join("plant-edge.toml"),
        config(erp.addr.port(), plc.addr.port()),
    )
    .expect("config");
    std::fs::write(drop.join("credentials/erp-secret"), ERP_SECRET).expect("secret");
    std::fs::copy(&pki.ca, drop.join("certs/ca.pem")).expect("ca");
    vm.put_on_config_partition(&[
        &drop.join("plant-edge.toml"),
        &drop.join("credentials"),
        &drop.join("certs"),
    ]);

    let first_boot = vm.boot();
    eprintln!("first boot to ssh: {first_boot:?}");

    // The configuration partition: installed, secrets gone from the FAT.
    vm.wait_until(
        "the first-boot import wrote its outcome",
        Duration::from_secs(60),
        "test -f /boot/plant-config/plant-edge-result.txt",
    );
    let result = vm.sh("cat /boot/plant-config/plant-edge-result.txt");
    assert!(result.starts_with("INSTALLED"), "{result}");
    vm.sh(
        "test ! -e /boot/plant-config/plant-edge.toml && test ! -e /boot/plant-config/credentials",
    );
    assert_eq!(
        vm.sh("stat -c %a:%U /etc/plant-edge/credentials/erp-secret")
            .trim(),
        "600:root"
    );
    // The journal's own partition, grown to the 4 GiB disk at first boot.
    assert_eq!(
        vm.sh("findmnt -no SOURCE /var/lib/plant-edge").trim(),
        "/dev/vda4"
    );
    let data_mib: u64 = vm
        .sh("df -BM --output=size /var/lib/plant-edge | tail -n 1")
        .trim()
        .trim_end_matches('M')
        .parse()
        .expect("size");
    assert!(data_mib > 2000, "data partition grown: {data_mib} MiB");

    // READY=1 reached (Type=notify) and the STATUS= line.
    wait_active(&vm, "the service started from the dropped config");
    let props = show(&vm, "StatusText,NRestarts");
    assert!(!props["StatusText"].is_empty(), "{props:?}");
    plc_line::polled(&plc, 10, Duration::from_secs(120)).await;
    line.run(true);
    wait_for("events reach the ERP", Duration::from_secs(120), || {
        erp.state.events.lock().expect("events").len() >= 20
            && line.acked.load(Ordering::SeqCst) >= 3
    })
    .await;
    // The secret reached the token endpoint from inside the unit...
    assert_eq!(*erp.state.unauthorized.lock().expect("state"), 0);
    // ...and is found by hand, outside it (no $CREDENTIALS_DIRECTORY).
    vm.sh("plant-edge validate -c /etc/plant-edge/plant-edge.toml");

    let summary = vm.sh("plant-edge status -c /etc/plant-edge/plant-edge.toml");
    assert!(
        summary.contains("erp") && summary.contains("press1"),
        "{summary}"
    );
    let page = http_get(vm.host_port(METRICS_PORT), "/status");
    assert!(
        page.starts_with("HTTP/1.") && page.contains(" 200 ") && page.contains("press1"),
        "{page}"
    );
    let security = vm.sh(&format!(
        "systemd-analyze security --no-pager {SERVICE} | tail -n 1"
    ));
    let exposure: f64 = security
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("exposure level in {security:?}"));
    assert!(exposure <= 2.0, "{security}");

    // SIGKILL: systemd starts it again.
    let before = show(&vm, "MainPID,NRestarts");
    vm.sh(&format!("systemctl kill -s KILL {SERVICE}"));
    wait_restarted(&vm, "restarted after SIGKILL", &before["NRestarts"]);

    // A hung process (SIGSTOP): the watchdog kills and restarts it. The
    // unit's 30 s shortened to 4 s for the test.
    vm.sh(&format!(
        "mkdir -p /run/systemd/system/{SERVICE}.d && printf '[Service]\\nWatchdogSec=4s\\n' > /run/systemd/system/{SERVICE}.d/watchdog.conf && systemctl daemon-reload && systemctl restart {SERVICE}"
    ));
    let before = show(&vm, "MainPID,NRestarts");
    vm.sh(&format!("kill -STOP {}", before["MainPID"]));
    wait_restarted(
        &vm,
        "the watchdog restarted the hung agent",
        &before["NRestarts"],
    );
    vm.sh(&format!(
        "journalctl -u {SERVICE} --no-pager | grep -q 'Watchdog timeout'"
    ));
    vm.sh(&format!(
        "rm -r /run/systemd/system/{SERVICE}.d && systemctl daemon-reload"
    ));

    // A clean stop within the unit's bound, exit 0.
    let stop_ms: u64 = vm
        .sh(&format!(
            "s=$(date +%s%N); systemctl stop {SERVICE}; echo $(( ($(date +%s%N) - s) / 1000000 ))"
        ))
        .trim()
        .parse()
        .expect("ms");
    let stopped = show(&vm, "Result,ExecMainStatus,ActiveState");
    assert_eq!(stopped["Result"], "success", "{stopped:?}");
    assert_eq!(stopped["ExecMainStatus"], "0", "{stopped:?}");
    eprintln!("clean stop: {stop_ms} ms");

    // Journal commands as root (umask 077) do not lock the service out.
    vm.sh("umask 077 && plant-edge journal --state /var/lib/plant-edge stats");
    vm.sh(&format!("systemctl start {SERVICE}"));
    wait_active(&vm, "started after a journal command as root");
    assert_eq!(
        vm.sh("find /var/lib/plant-edge/journal ! -user plant-edge")
            .trim(),
        "",
        "files of another owner in the journal"
    );

    // A bad config: exit 78, failed, not restarted.
    vm.sh("cp /etc/plant-edge/plant-edge.toml /root/good.toml && echo 'polling = \"fast\"' >> /etc/plant-edge/plant-edge.toml");
    let _ = vm.ssh(&format!("systemctl restart {SERVICE}"));
    vm.wait_until(
        "a bad config fails the unit",
        Duration::from_secs(60),
        &format!("systemctl is-failed -q {SERVICE}"),
    );
    // A negative: nothing to wait for but time. Two RestartSec=5s.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let failed = show(&vm, "ActiveState,ExecMainStatus,NRestarts");
    assert_eq!(failed["ActiveState"], "failed", "{failed:?}");
    assert_eq!(failed["ExecMainStatus"], "78", "{failed:?}");
    assert_eq!(failed["NRestarts"], "0", "not restarted: {failed:?}");
    vm.sh(&format!(
        "install -m 0640 -g plant-edge /root/good.toml /etc/plant-edge/plant-edge.toml && systemctl reset-failed {SERVICE} && systemctl start {SERVICE}"
    ));
    wait_active(&vm, "started again with the good config");

    // The ERP goes away: warnings reach journald as warnings, one timestamp.
    erp.stop();
    vm.wait_until(
        "a warning about the ERP in journalctl -p warning",
        Duration::from_secs(120),
        &format!("journalctl -u {SERVICE} -p warning -o cat --no-pager | grep -qi erp"),
    );
    let warnings = vm.sh(&format!(
        "journalctl -u {SERVICE} -p warning -o cat --no-pager | grep -i erp | tail -n 3"
    ));
    assert!(
        !warnings
            .lines()
            .any(|l| l.starts_with("20") && l.as_bytes().get(4) == Some(&b'-')),
        "a second timestamp: {warnings}"
    );

    // A reboot with a backlog, and a bad config dropped on the FAT
    // partition meanwhile: refused with the reason, the old one kept.
    let owed_before = erp.state.events.lock().expect("events").len();
    // A backlog: parts made while the ERP is away.
    let made_before = line.made.load(Ordering::SeqCst);
    wait_for(
        "parts made during the ERP outage",
        Duration::from_secs(60),
        || line.made.load(Ordering::SeqCst) > made_before + 50,
    )
    .await;
    vm.sh("printf '[agent]\\nsite = 5\\n' > /boot/plant-config/plant-edge.toml && sync");
    let reboot = vm.reboot();
    eprintln!("reboot to ssh: {reboot:?}");
    let result = vm.sh("cat /boot/plant-config/plant-edge-result.txt");
    assert!(
        result.starts_with("REFUSED") && result.contains("site"),
        "{result}"
    );
    vm.sh("test -f /boot/plant-config/plant-edge.toml");
    wait_active(&vm, "the service with the previous config after the reboot");
    erp.start_again();
    wait_for(
        "the backlog delivered after the reboot",
        Duration::from_secs(180),
        || erp.state.events.lock().expect("events").len() > owed_before + 50,
    )
    .await;

    // Power cuts at random moments.
    for cut in 0..cuts {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(500..8000))).await;
        vm.power_cut();
        let boot = vm.boot();
        wait_active(&vm, "the service after a power cut");
        eprintln!("power cut {}: back in {boot:?}", cut + 1);
    }

    // Production stops (records already made are still handed over);
    // everything the PLC saw reaches the ERP.
    line.producing.store(false, Ordering::SeqCst);
    let limit = Duration::from_secs(600);
    wait_for("the PLC's record queue drained", limit, || {
        line.queued.load(Ordering::SeqCst) == 0
    })
    .await;
    plc_line::handshake_idle(&plc, limit).await;
    plc_line::polled(&plc, 30, limit).await;
    let made = line.made.load(Ordering::SeqCst);
    let acked = line.acked.load(Ordering::SeqCst);
    wait_for("every part and record delivered", limit, || {
        let (by_id, _) = delivered(&erp);
        let (parts, records, _) = plc_line::tally(by_id.values());
        parts >= made && records >= acked
    })
    .await;
    let (by_id, repeats) = delivered(&erp);
    let (parts, records, record_quantity) = plc_line::tally(by_id.values());
    eprintln!(
        "{cuts} power cuts, 1 reboot: {made} parts made, {parts} delivered; {acked} records acknowledged, {records} delivered; {repeats} repeated deliveries"
    );
    assert_eq!(parts, made, "every part counted once");
    assert_eq!(records, acked, "every acknowledged record delivered, once");
    assert_eq!(
        record_quantity,
        line.acked_quantity.load(Ordering::SeqCst),
        "with the quantities the PLC handed over"
    );
    program.abort();
}
