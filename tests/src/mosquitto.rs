//! A real Mosquitto broker on a free loopback port, with its own config,
//! persistence directory and log, stopped when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Broker options.
#[derive(Default, Clone)]
pub struct BrokerOptions {
    /// ACL file contents (anonymous clients are the `pattern`/top-level rules).
    pub acl: Option<String>,
    /// TLS listener: (CA, server cert, server key); clients must present a cert.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Log only warnings and errors (benchmarks): per-message logging costs
    /// the broker a third of its throughput.
    pub quiet: bool,
}

/// A running Mosquitto.
pub struct Broker {
    child: Option<Child>,
    /// The loopback port it listens on.
    pub port: u16,
    dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    for candidate in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("mosquitto is not installed: scripts/test.sh installs it (apt-get install mosquitto)");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Broker {
    /// Starts a broker and waits until it accepts connections.
    pub fn start(options: BrokerOptions) -> Broker {
        let dir = tempfile::tempdir().expect("broker dir");
        let port = free_port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {dir}/\nautosave_interval 1\n\
             log_dest file {dir}/mosquitto.log\nlog_type {log_type}\nset_tcp_nodelay true\nmax_queued_messages 0\nmax_inflight_messages 100\nuser root\n",
            dir = dir.path().display(),
            log_type = if options.quiet { "warning" } else { "all" },
        );
        if let Some(acl) = &options.acl {
            let path = dir.path().join("acl");
            std::fs::write(&path, acl).expect("acl");
            conf.push_str(&format!("acl_file {}\n", path.display()));
        }
        if let Some((ca, cert, key)) = &options.tls {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                ca.display(),
                cert.display(),
                key.display()
            ));
        }
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("conf");
        let mut broker = Broker {
            child: None,
            port,
            dir,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let child = Command::new(binary())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("mosquitto exited ({status}); log:\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {}; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops the broker with SIGTERM (it saves its persistence) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A message the test subscriber received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 user properties.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
}

/// A persistent-session MQTT 5 subscriber to `#` that records everything,
/// reconnecting across broker restarts.
pub fn subscribe_all(port: u16, client_id: &str) -> Arc<Mutex<Vec<Received>>> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let received = Arc::new(Mutex::new(Vec::new()));
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(3600))
        .set_keep_alive(Duration::from_secs(5));
    let (client, mut event_loop) = AsyncClient::new(options, 1000);
    let sink = received.clone();
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
    tokio::spawn(async move {
        let mut subscribed = Some(subscribed_tx);
        loop {
            match event_loop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe("#", QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let props = p.properties.clone().unwrap_or_default();
                    sink.lock().expect("received").push(Received {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                        user_properties: props.user_properties,
                        content_type: props.content_type,
                    });
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    subscribed_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("subscriber subscribed");
    received
}
