//! What an OPC UA source is configured with.

use super::*;

/// How often the server samples a monitored node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// At this period; zero is the server's fastest rate (every change of
    /// an event-like node reaches the queue).
    Every(Duration),
    /// At the subscription's publishing interval (OPC UA's -1).
    PublishingInterval,
}

impl Sampling {
    /// The value of MonitoringParameters.samplingInterval, in milliseconds.
    pub(super) fn requested_ms(self) -> f64 {
        match self {
            Sampling::Every(period) => period.as_secs_f64() * 1000.0,
            Sampling::PublishingInterval => -1.0,
        }
    }
}

/// Subscription or cyclic Read.
#[derive(Clone, Debug, PartialEq)]
pub enum Acquisition {
    /// Monitored items in one subscription.
    Subscription {
        /// How often the server sends what changed.
        publishing_interval: Duration,
        /// How often the server samples each node.
        sampling_interval: Sampling,
        /// Values the server queues per node between publishes (records:
        /// discard-oldest is off, so a full queue keeps the oldest).
        queue_size: u32,
        /// Publishing intervals without data before a keep-alive.
        keep_alive_count: u32,
        /// Publishing intervals without a publish request before the
        /// server drops the subscription (at least 3 × keep-alive).
        lifetime_count: u32,
    },
    /// Read every node each interval (servers with unreliable subscriptions).
    Polling {
        /// Read interval.
        interval: Duration,
    },
}

/// A counter node.
#[derive(Clone, Debug)]
pub struct NodeCounter {
    /// Signal name (part of the id, key of its state).
    pub signal: String,
    /// Event type of its increases.
    pub event_type: EventType,
    /// The node.
    pub node: NodeId,
    /// Most parts plausible between two readings (wrap window).
    pub max_step: u64,
    /// Unit of measure.
    pub unit: String,
    /// Quantity = increase × scale.
    pub scale: f64,
    /// Line, machine and attributes when not the source's.
    pub place: crate::source::Placement,
}

/// How a record's fields are published.
#[derive(Clone, Debug)]
pub enum RecordLayout {
    /// The trigger node is a String holding a JSON object.
    Json(Vec<JsonField>),
    /// The trigger node is the record's sequence; the fields are nodes
    /// read together once the sequence changes.
    Nodes(Vec<(String, NodeId)>),
}

/// Where an acknowledgement value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum AckValue {
    /// A field of the record (typically `sequence`).
    Field(String),
    /// A fixed value.
    Fixed(FieldValue),
}

/// An acknowledgement argument or written value, with its OPC UA type.
#[derive(Clone, Debug, PartialEq)]
pub struct AckArgument {
    /// The value.
    pub value: AckValue,
    /// `Boolean`, `Int16`, `UInt16`, `Int32`, `UInt32`, `Int64`, `UInt64`,
    /// `Double`, `String`; `None`: the written node's current type.
    pub data_type: Option<String>,
}

/// How the MES is told a record is stored.
#[derive(Clone, Debug)]
pub enum Ack {
    /// Write a value to a node.
    Write {
        /// The node.
        node: NodeId,
        /// What to write.
        value: AckArgument,
    },
    /// Call a method.
    Call {
        /// Object the method belongs to.
        object: NodeId,
        /// The method.
        method: NodeId,
        /// Input arguments.
        arguments: Vec<AckArgument>,
    },
}

/// A completion or scrap record node.
#[derive(Clone, Debug)]
pub struct NodeRecord {
    /// Signal name (part of the id).
    pub signal: String,
    /// Event type.
    pub event_type: EventType,
    /// Node whose change announces a record (JSON string or sequence).
    pub trigger: NodeId,
    /// Field mapping.
    pub layout: RecordLayout,
    /// Field names that identify the record (default: `sequence`).
    pub key: Vec<String>,
    /// Unit of `quantity`.
    pub unit: String,
    /// Acknowledgement after durable, if the MES waits for one.
    pub ack: Option<Ack>,
    /// Event type from a field's code (overrides `event_type`).
    pub type_from: Option<crate::source::TypeFromField>,
    /// Line, machine and attributes when not the source's.
    pub place: crate::source::Placement,
    /// The record's sequence is shared with other kinds of record (one
    /// numbering for completions and scrap): a jump is no sign of a missed
    /// record, so none is reported.
    pub sequence_shared: bool,
}

/// A ring buffer of records in the MES or PLC: a String array node of
/// `slots` JSON records, a UInt32 write index the server advances after
/// filling a slot and a UInt32 read index the agent writes back once the
/// records before it are durable (free-running counts modulo 2^32; record
/// `k` is in element `k mod slots`).
#[derive(Clone, Debug)]
pub struct NodeRing {
    /// Signal name (part of every id).
    pub signal: String,
    /// Event type (unless `type_from` says).
    pub event_type: EventType,
    /// The String array node.
    pub array: NodeId,
    /// The write index node (watched).
    pub write_index: NodeId,
    /// The read index node (written by the agent).
    pub read_index: NodeId,
    /// Elements of the array.
    pub slots: u32,
    /// Fields of each JSON record.
    pub fields: Vec<JsonField>,
    /// Unit of `quantity`.
    pub unit: String,
    /// Event type from a field's code (overrides `event_type`).
    pub type_from: Option<crate::source::TypeFromField>,
    /// Line, machine and attributes when not the source's.
    pub place: crate::source::Placement,
}

/// One OPC UA server.
#[derive(Clone, Debug)]
pub struct OpcUaConfig {
    /// Endpoint, security, identity, PKI.
    pub connection: Connection,
    /// Subscription or polling.
    pub acquisition: Acquisition,
    /// Line.
    pub line: String,
    /// Machine.
    pub machine: String,
    /// Counter nodes.
    pub counters: Vec<NodeCounter>,
    /// Record nodes.
    pub records: Vec<NodeRecord>,
    /// Ring buffers of records.
    pub rings: Vec<NodeRing>,
}

/// The OPC UA type names an acknowledgement may be written as.
pub const ACK_TYPES: [&str; 9] = [
    "Boolean", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Double", "String",
];

/// Default PKI directory inside the state directory.
pub fn default_pki_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("pki")
}
