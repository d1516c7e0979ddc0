//! Source implementations.

pub mod modbus;
pub mod opcua;
pub mod simulated;
