//! Source implementations.

pub mod modbus;
pub mod simulated;
