//! `plant-edge validate --connect` against the in-process simulators and
//! a real Mosquitto, with one deliberately wrong register address, a wrong
//! OPC UA password and an ERP certificate the gateway does not trust: one
//! line per item, the reason on each red one, exit 1, and nothing written
//! to the PLC.

mod common;

use common::*;
use plant_edge_tests::erp::Erp;
use plant_edge_tests::mes::{Mes, MesOptions, USER};
use plant_edge_tests::mosquitto::{Broker, BrokerOptions};
use plant_edge_tests::plc::Plc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_connect_names_every_item_and_what_is_wrong_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let plc = Plc::start().await;
    {
        let mut m = plc.mem();
        m.holding.insert(0, 1234);
        // The wrong address: this PLC has nothing at 100.
        m.refuse_holding.push(100..101);
        m.coils.insert(10, true);
    }
    let mes = Mes::start(&MesOptions {
        require_user: true,
        ..MesOptions::open(dir.path().join("mes-pki"))
    })
    .await;
    mes.set("Line1.Good", 77u32);
    let password = dir.path().join("opcua-password");
    std::fs::write(&password, "not-the-password").expect("password file");
    // The ERP's certificate comes from a CA the gateway was not given.
    let pki = plant_edge_tests::pki::generate(dir.path(), "erp");
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    let broker = Broker::start(BrokerOptions::default());
    let text = format!(
        r#"[agent]
site = "p1"
gateway = "gw"
state_dir = "{state}"
metrics_listen = "off"

[sinks.archive]
kind = "file"
path = "{state}/archive/events.jsonl"

[sinks.cloud]
kind = "mqtt"
host = "127.0.0.1"
port = {mqtt}

[sinks.erp]
kind = "https"
url = "{erp}"

[sources.press]
kind = "modbus"
endpoint = "tcp://{plc}"
timeout = "1s"
line = "L1"
machine = "press"

[[sources.press.counters]]
signal = "good"
type = "production.completion"
address = "holding:0"

[[sources.press.counters]]
signal = "scrap"
type = "production.scrap"
address = "holding:100"

[[sources.press.records]]
signal = "completion"
type = "production.completion"
ready = "coil:10"
ack = "coil:11"
fields = {{ sequence = {{ address = "holding:5", format = "u16" }} }}

[sources.mes]
kind = "opcua"
endpoint = "{endpoint}"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
trust_unknown_server = true
user = "{user}"
password_file = "{password}"
timeout = "3s"
line = "L2"
machine = "filler"

[[sources.mes.counters]]
signal = "good"
type = "production.completion"
node = "{good}"
"#,
        state = state.display(),
        mqtt = broker.port,
        erp = erp.url(),
        plc = plc.addr,
        endpoint = mes.endpoint(),
        user = USER,
        password = password.display(),
        good = mes.node("Line1.Good"),
    );
    let file = write_config(dir.path(), &text);
    let config = file.to_str().expect("utf8").to_owned();
    let out = tokio::task::spawn_blocking(move || run(&["validate", "--connect", "-c", &config]))
        .await
        .expect("validate");
    let report = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "red items fail the check:\n{report}{}",
        stderr(&out)
    );
    let line = |start: &str| {
        report
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{report}"))
            .to_owned()
    };
    line("ok    source press: PLC tcp://");
    assert!(line("ok    source press: counter good at holding:0").ends_with("u16 = 1234"));
    assert!(
        line("FAIL  source press: counter scrap at holding:100").contains("IllegalDataAddress"),
        "the wrong address is named with the device's answer"
    );
    assert!(
        line("ok    source press: record completion ready flag at coil:10")
            .ends_with("bool = true")
    );
    line("ok    source press: record completion ack flag at coil:11");
    assert!(
        line("FAIL  source mes: OPC UA").contains("refused the user identity"),
        "the wrong password is named"
    );
    assert!(
        line("FAIL  sink erp:").contains("certificate")
            && line("FAIL  sink erp:").contains("ca_file"),
        "the untrusted certificate is named with what to do"
    );
    assert!(line("ok    sink cloud:").contains("acknowledged"));
    line("ok    sink archive:");
    assert!(report.contains("3 of "), "{report}");
    assert_eq!(plc.mem().coils.get(&11), None, "nothing written to the PLC");
    assert_eq!(
        erp.state.events.lock().expect("erp").len(),
        0,
        "nothing posted"
    );
    assert!(!state.join("journal").exists(), "no journal opened");
    mes.stop().await;
}
