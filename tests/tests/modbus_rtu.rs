//! Modbus RTU over a pseudo-terminal pair: a tokio-modbus RTU server on the
//! master side answers for two unit ids; two device tasks share the serial
//! line on the slave side without their frames colliding.

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buffer::{EventType, Journal, JournalConfig};
use protocols::source::{Classifier, SourceContext};
use protocols::sources::modbus::map::{Format, Order};
use protocols::sources::modbus::{
    self, CounterSpec, Endpoint, ModbusConfig, ModbusStats, SerialSettings,
};
use tokio::sync::watch;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_serial::SerialPort;

/// Holding register 0 per unit id.
#[derive(Clone, Default)]
struct Bus {
    counters: Arc<Mutex<HashMap<u8, u16>>>,
}

impl Service for Bus {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let counters = self.counters.lock().expect("bus");
        // A unit that is not on the bus stays silent, as on a real line.
        let Some(value) = counters.get(&req.slave).copied() else {
            return ready(Ok(None));
        };
        ready(match req.request {
            Request::ReadHoldingRegisters(0, 1) => {
                Ok(Some(Response::ReadHoldingRegisters(vec![value])))
            }
            _ => Err(ExceptionCode::IllegalDataAddress),
        })
    }
}

fn source(name: &str, journal: &Journal, shutdown: watch::Receiver<bool>) -> SourceContext {
    let (appender, _writer) = journal.start_writer();
    SourceContext {
        site: "site1".into(),
        gateway: "gw1".into(),
        name: name.into(),
        attributes: Default::default(),
        routes: journal.routes_all(),
        classifier: Classifier::default(),
        appender,
        initial_cursor: None,
        shutdown,
        read: Default::default(),
        periods: None,
    }
}

fn device(path: &str, unit: u8) -> ModbusConfig {
    ModbusConfig {
        endpoint: Endpoint::Rtu(SerialSettings {
            path: path.into(),
            baud: 19_200,
            parity: "even".into(),
            data_bits: 8,
            stop_bits: 1,
        }),
        unit,
        poll_interval: Duration::from_millis(30),
        timeout: Duration::from_millis(300),
        max_gap: 8,
        counter_window: std::time::Duration::ZERO,
        line: format!("L{unit}"),
        machine: format!("m{unit}"),
        counters: vec![CounterSpec {
            signal: "good".into(),
            event_type: EventType::completion(),
            address: "holding:0".parse().expect("address"),
            format: Format::U16,
            order: Order::default(),
            max_step: 1000,
            unit: "EA".into(),
            scale: 1.0,
            place: Default::default(),
        }],
        records: vec![],
        rings: vec![],
        context: vec![],
    }
}

fn totals(journal: &Journal) -> HashMap<String, u64> {
    let mut totals = HashMap::new();
    journal
        .scan_events(0, |e| {
            let v: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
            *totals
                .entry(v["data"]["line"].as_str().expect("line").to_owned())
                .or_default() += v["data"]["quantity"].as_u64().expect("q");
            true
        })
        .expect("scan");
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_units_share_one_serial_line_and_each_counts_its_own_parts() {
    let (master, slave) = tokio_serial::SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("pty slave path");
    let bus = Bus::default();
    bus.counters
        .lock()
        .expect("bus")
        .extend([(1u8, 100u16), (2u8, 5_000u16)]);
    let server =
        tokio::spawn(tokio_modbus::server::rtu::Server::new(master).serve_forever(bus.clone()));

    let dir = tempfile::tempdir().expect("tempdir");
    let mut jc = JournalConfig::new(dir.path().join("journal"));
    jc.sinks = vec!["erp".into()];
    let journal = Journal::open(jc).expect("journal");
    let (stop, shutdown) = watch::channel(false);
    let stats1 = Arc::new(ModbusStats::default());
    let stats2 = Arc::new(ModbusStats::default());
    let t1 = tokio::spawn(modbus::run(
        source("unit1", &journal, shutdown.clone()),
        device(&path, 1),
        stats1.clone(),
    ));
    let t2 = tokio::spawn(modbus::run(
        source("unit2", &journal, shutdown.clone()),
        device(&path, 2),
        stats2.clone(),
    ));

    for step in 1..=10u16 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut c = bus.counters.lock().expect("bus");
        c.insert(1, 100 + step * 3);
        c.insert(2, 5_000 + step * 7);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = totals(&journal);
        if t.get("L1") == Some(&30) && t.get("L2") == Some(&70) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "totals {t:?}; unit1 {stats1:?}; unit2 {stats2:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        stats1.exceptions.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no garbled frames"
    );
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let _ = t1.await;
        let _ = t2.await;
    })
    .await;
    server.abort();
    drop(slave);
}
