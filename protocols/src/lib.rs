//! plant-edge's protocols: sources that turn PLC and MES signals into
//! canonical events, sinks that deliver them, and the counter semantics
//! every source shares.
//!
//! Sources never touch the journal's storage: they append through an
//! [`buffer::Appender`] and act on the answer (acknowledge a handshake,
//! advance a counter cursor) only once it says the events are durable.

pub mod counter;
pub mod pace;
pub mod period;
pub mod render;
pub mod ring;
pub mod runtime;
pub mod schedule;
pub mod sink;
pub mod sinks;
pub mod source;
pub mod sources;
pub mod tls;

/// The OPC UA library (async-opcua), for the agent's probe and tests.
pub use opcua as opcua_lib;
/// OPC UA node id, as configurations and the OPC UA source use it.
pub use opcua::types::NodeId;
pub use sink::{Sink, Verdict};
