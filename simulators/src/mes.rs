//! A simulated MES line: an OPC UA server (async-opcua) on loopback with
//! counters, a JSON completion record with a sequence, a node-per-field
//! record, an acknowledgement node and an acknowledgement method.
//!
//! Node ids (namespace from [`Mes::ns`]): `Line1.Good` (UInt32),
//! `Line1.Scrap` (UInt16), `Line1.Weight` (Double), `Line1.Record`
//! (String, JSON), `Line1.Ack` (UInt32, writable), `Line1.Seq` (UInt32),
//! `Line1.Order` (String), `Line1.Qty` (Double), object `Line1` with
//! method `Line1.Acknowledge(UInt32)`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opcua::crypto::SecurityPolicy;
use opcua::nodes::{MethodBuilder, VariableBuilder};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{simple_node_manager, SimpleNodeManager};
use opcua::server::{ServerBuilder, ServerHandle, ServerUserToken, ANONYMOUS_USER_TOKEN_ID};
use opcua::types::{
    Argument, DataTypeId, DataValue, MessageSecurityMode, NodeId, ObjectId, StatusCode, Variant,
};

/// The user the simulated MES accepts.
pub const USER: &str = "gateway";
/// Its password.
pub const PASSWORD: &str = "line1-secret";
/// The user known by its certificate ([`MesOptions::x509_user`]).
pub const CERT_USER: &str = "gateway-cert";

/// How to start the MES.
#[derive(Clone, Debug)]
pub struct MesOptions {
    /// Port (0: any free one). Restart on the same port with the same value.
    pub port: u16,
    /// The server's PKI directory (own certificate kept across restarts).
    pub pki_dir: PathBuf,
    /// Accept any client certificate.
    pub trust_clients: bool,
    /// Offer only user name/password (no anonymous).
    pub require_user: bool,
    /// A user certificate (DER or PEM file) accepted as [`CERT_USER`].
    pub x509_user: Option<PathBuf>,
}

impl MesOptions {
    /// Any free port, every client certificate trusted, anonymous users
    /// allowed: the MES most tests and the demo need.
    pub fn open(pki_dir: PathBuf) -> Self {
        Self {
            port: 0,
            pki_dir,
            trust_clients: true,
            require_user: false,
            x509_user: None,
        }
    }
}

/// What the MES saw of acknowledgements.
#[derive(Clone, Debug, Default)]
pub struct Acks {
    /// Values written to `Line1.Ack`, in order.
    pub written: Vec<Variant>,
    /// Arguments of `Acknowledge` calls, in order.
    pub called: Vec<Vec<Variant>>,
}

/// A running simulated MES.
pub struct Mes {
    /// Where it listens.
    pub addr: SocketAddr,
    handle: ServerHandle,
    manager: Arc<SimpleNodeManager>,
    ns: u16,
    acks: Arc<Mutex<Acks>>,
    task: tokio::task::JoinHandle<()>,
}

const NAMESPACE: &str = "urn:plant-edge:sim:mes:line1";

/// Elements of the simulated ring buffer `Line1.Ring`.
pub const RING_SLOTS: u16 = 16;

impl Mes {
    /// Starts the server and its address space.
    pub async fn start(options: &MesOptions) -> Mes {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port))
            .await
            .expect("bind MES port");
        let addr = listener.local_addr().expect("local addr");
        let url = format!("opc.tcp://127.0.0.1:{}/", addr.port());
        let mut tokens = vec![USER];
        if options.x509_user.is_some() {
            tokens.push(CERT_USER);
        }
        if !options.require_user {
            tokens.push(ANONYMOUS_USER_TOKEN_ID);
        }
        let mut builder = ServerBuilder::new()
            .application_name("Simulated MES")
            .application_uri("urn:plant-edge:sim:mes")
            .product_uri("urn:plant-edge:sim")
            .create_sample_keypair(true)
            .pki_dir(options.pki_dir.clone())
            .host("127.0.0.1")
            .port(addr.port())
            .trust_client_certs(options.trust_clients)
            .discovery_urls(vec![url])
            .add_user_token(USER, ServerUserToken::user_pass(USER, PASSWORD));
        if let Some(cert) = &options.x509_user {
            builder = builder.add_user_token(CERT_USER, ServerUserToken::x509(CERT_USER, cert));
        }
        // Like an MES with event-like record nodes: a sampling interval of
        // 0 means every change (the library's default floor is 100 ms).
        builder.limits_mut().subscriptions.min_sampling_interval_ms = 0.0;
        builder
            .limits_mut()
            .subscriptions
            .max_monitored_item_queue_size = 1000;
        builder = builder.with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: NAMESPACE.to_owned(),
                ..Default::default()
            },
            "mes",
        ));
        let endpoints: [(&str, SecurityPolicy, MessageSecurityMode); 6] = [
            ("none", SecurityPolicy::None, MessageSecurityMode::None),
            (
                "b256_sign",
                SecurityPolicy::Basic256Sha256,
                MessageSecurityMode::Sign,
            ),
            (
                "b256_enc",
                SecurityPolicy::Basic256Sha256,
                MessageSecurityMode::SignAndEncrypt,
            ),
            (
                "aes128_enc",
                SecurityPolicy::Aes128Sha256RsaOaep,
                MessageSecurityMode::SignAndEncrypt,
            ),
            (
                "aes256_sign",
                SecurityPolicy::Aes256Sha256RsaPss,
                MessageSecurityMode::Sign,
            ),
            (
                "aes256_enc",
                SecurityPolicy::Aes256Sha256RsaPss,
                MessageSecurityMode::SignAndEncrypt,
            ),
        ];
        for (id, policy, mode) in endpoints {
            builder = builder.add_endpoint(id, ("/", policy, mode, &tokens as &[&str]));
        }
        let (server, handle) = builder.build().expect("MES server config");
        let manager = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .expect("simple node manager");
        let ns = handle
            .get_namespace_index(NAMESPACE)
            .expect("MES namespace registered");
        let acks = Arc::new(Mutex::new(Acks::default()));
        build_address_space(&manager, ns, &acks);
        let task = tokio::spawn(async move {
            if let Err(e) = server.run_with(listener).await {
                eprintln!("simulated MES stopped: {e}");
            }
        });
        Mes {
            addr,
            handle,
            manager,
            ns,
            acks,
            task,
        }
    }

    /// `opc.tcp://127.0.0.1:PORT/`.
    pub fn endpoint(&self) -> String {
        format!("opc.tcp://127.0.0.1:{}/", self.addr.port())
    }

    /// The simulation's namespace index.
    pub fn ns(&self) -> u16 {
        self.ns
    }

    /// A node id in the simulation's namespace, as the config writes it.
    pub fn node(&self, name: &str) -> String {
        format!("ns={};s={name}", self.ns)
    }

    /// Sets a variable (subscribers are notified).
    pub fn set(&self, name: &str, value: impl Into<Variant>) {
        let id = NodeId::new(self.ns, name);
        self.manager
            .set_value(
                self.handle.subscriptions(),
                &id,
                None,
                DataValue::new_now(value.into()),
            )
            .expect("set MES value");
    }

    /// Sets a variable with the given source timestamp (a device clock
    /// gone wrong).
    pub fn set_at(
        &self,
        name: &str,
        value: impl Into<Variant>,
        source_time: opcua::types::DateTime,
    ) {
        let id = NodeId::new(self.ns, name);
        let mut value = DataValue::new_now(value.into());
        value.source_timestamp = Some(source_time);
        self.manager
            .set_value(self.handle.subscriptions(), &id, None, value)
            .expect("set MES value");
    }

    /// Adds `n` UInt32 counters `Bench.C0..` under `Line1` (benchmarks);
    /// returns their node ids as the config writes them.
    pub fn add_counters(&self, n: usize) -> Vec<String> {
        let mut space = self.manager.address_space().write();
        let line = NodeId::new(self.ns, "Line1");
        let variables = (0..n)
            .map(|i| {
                let name = format!("Bench.C{i}");
                VariableBuilder::new(
                    &NodeId::new(self.ns, name.as_str()),
                    name.as_str(),
                    name.as_str(),
                )
                .data_type(DataTypeId::UInt32)
                .value(Variant::UInt32(0))
                .build()
            })
            .collect();
        space.add_variables(variables, &line);
        (0..n).map(|i| self.node(&format!("Bench.C{i}"))).collect()
    }

    /// Sets every counter made by [`Mes::add_counters`] to `value` at once.
    pub fn set_counters(&self, n: usize, value: u32) {
        let ids: Vec<NodeId> = (0..n)
            .map(|i| NodeId::new(self.ns, format!("Bench.C{i}")))
            .collect();
        self.manager
            .set_values(
                self.handle.subscriptions(),
                ids.iter()
                    .map(|id| (id, None, DataValue::new_now(Variant::UInt32(value)))),
            )
            .expect("set MES counters");
    }

    /// A variable's value as the address space holds it now.
    fn value_of(&self, name: &str) -> Option<Variant> {
        let space = self.manager.address_space().read();
        match space.find(&NodeId::new(self.ns, name)) {
            Some(opcua::nodes::NodeType::Variable(v)) => {
                v.value(
                    opcua::types::TimestampsToReturn::Neither,
                    &opcua::types::NumericRange::None,
                    &opcua::types::DataEncoding::Binary,
                    0.0,
                )
                .value
            }
            _ => None,
        }
    }

    /// The ring buffer's read index as the agent last wrote it.
    pub fn ring_read_index(&self) -> u32 {
        match self.value_of("Line1.RingRead") {
            Some(Variant::UInt32(n)) => n,
            _ => 0,
        }
    }

    /// Puts `records` (JSON texts) into the ring as an MES does: element
    /// `k mod RING_SLOTS`, then the write index. With `waits`, only as many
    /// as the agent released room for; returns how many went in.
    pub fn ring_push(&self, records: &[String], waits: bool) -> usize {
        let empty = || vec![opcua::types::UAString::from(""); RING_SLOTS as usize];
        let mut written = match self.value_of("Line1.RingWrite") {
            Some(Variant::UInt32(n)) => n,
            _ => 0,
        };
        let mut elements: Vec<opcua::types::UAString> = match self.value_of("Line1.Ring") {
            Some(Variant::Array(a)) => a
                .values
                .into_iter()
                .map(|v| match v {
                    Variant::String(s) => s,
                    _ => opcua::types::UAString::from(""),
                })
                .collect(),
            _ => empty(),
        };
        let read = self.ring_read_index();
        let mut put = 0;
        for record in records {
            if waits && written.wrapping_sub(read) >= u32::from(RING_SLOTS) {
                break;
            }
            elements[(written % u32::from(RING_SLOTS)) as usize] = record.as_str().into();
            written = written.wrapping_add(1);
            put += 1;
        }
        // The slots first, then the index that announces them.
        self.set("Line1.Ring", Variant::from(elements));
        self.set("Line1.RingWrite", written);
        put
    }

    /// Sets the ring's indexes (an MES restarting its ring).
    pub fn ring_reset(&self) {
        self.set("Line1.RingWrite", 0u32);
        self.set("Line1.RingRead", 0u32);
    }

    /// Sets a variable with a bad status (no value).
    pub fn set_bad(&self, name: &str) {
        let id = NodeId::new(self.ns, name);
        let mut value = DataValue::new_now(Variant::Empty);
        value.status = Some(StatusCode::BadSensorFailure);
        self.manager
            .set_value(self.handle.subscriptions(), &id, None, value)
            .expect("set MES status");
    }

    /// Acknowledgements seen so far.
    pub fn acks(&self) -> Acks {
        self.acks.lock().expect("acks lock").clone()
    }

    /// Waits until `check` holds for the acknowledgements, or panics.
    pub async fn wait_acks(&self, what: &str, limit: Duration, check: impl Fn(&Acks) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if check(&self.acks()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "MES never saw {what}; acks: {:?}",
                self.acks()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's own certificate (what a client must trust).
    pub fn certificate(pki_dir: &Path) -> PathBuf {
        pki_dir.join("own/cert.der")
    }

    /// Stops the server and waits until its port is closed.
    pub async fn stop(self) {
        self.handle.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

fn build_address_space(manager: &Arc<SimpleNodeManager>, ns: u16, acks: &Arc<Mutex<Acks>>) {
    let id = |name: &str| NodeId::new(ns, name);
    let line = id("Line1");
    {
        let mut space = manager.address_space().write();
        space.add_folder(&line, "Line1", "Line1", &ObjectId::ObjectsFolder.into());
        let variable = |name: &str, data_type: DataTypeId, value: Variant| {
            VariableBuilder::new(&id(name), name, name)
                .data_type(data_type)
                .value(value)
                .writable()
                .build()
        };
        space.add_variables(
            vec![
                variable("Line1.Good", DataTypeId::UInt32, Variant::UInt32(0)),
                variable("Line1.Scrap", DataTypeId::UInt16, Variant::UInt16(0)),
                variable("Line1.Weight", DataTypeId::Double, Variant::Double(0.0)),
                variable(
                    "Line1.Record",
                    DataTypeId::String,
                    Variant::String("".into()),
                ),
                variable("Line1.Ack", DataTypeId::UInt32, Variant::UInt32(0)),
                // Empty until the MES has a record to announce.
                variable("Line1.Seq", DataTypeId::UInt32, Variant::Empty),
                variable(
                    "Line1.Order",
                    DataTypeId::String,
                    Variant::String("".into()),
                ),
                variable("Line1.Qty", DataTypeId::Double, Variant::Double(0.0)),
                // A ring buffer of JSON records (RING_SLOTS elements) with
                // its write index (the MES's) and read index (the agent's).
                VariableBuilder::new(&id("Line1.Ring"), "Line1.Ring", "Line1.Ring")
                    .data_type(DataTypeId::String)
                    .value_rank(1)
                    .array_dimensions(&[u32::from(RING_SLOTS)])
                    .value(vec![opcua::types::UAString::from(""); RING_SLOTS as usize])
                    .writable()
                    .build(),
                variable("Line1.RingWrite", DataTypeId::UInt32, Variant::UInt32(0)),
                variable("Line1.RingRead", DataTypeId::UInt32, Variant::UInt32(0)),
            ],
            &line,
        );
        let method = id("Line1.Acknowledge");
        MethodBuilder::new(&method, "Acknowledge", "Acknowledge")
            .component_of(line.clone())
            .input_args(
                &mut *space,
                &id("Line1.Acknowledge.InputArguments"),
                &[Argument {
                    name: "Sequence".into(),
                    data_type: DataTypeId::UInt32.into(),
                    value_rank: -1,
                    array_dimensions: None,
                    description: "sequence of the stored record".into(),
                }],
            )
            .executable(true)
            .user_executable(true)
            .insert(&mut *space);
    }
    let written = acks.clone();
    let ack_node = id("Line1.Ack");
    manager
        .inner()
        .add_write_callback(ack_node, move |value, _range| {
            if let Some(v) = value.value {
                written.lock().expect("acks lock").written.push(v);
            }
            StatusCode::Good
        });
    let called = acks.clone();
    manager
        .inner()
        .add_method_callback(id("Line1.Acknowledge"), move |args| {
            called.lock().expect("acks lock").called.push(args.to_vec());
            Ok(Vec::new())
        });
}
