//! Plant peers that run on loopback inside one process: a Modbus TCP PLC,
//! an OPC UA MES and an HTTPS ERP, real protocol servers whose state the
//! caller drives and inspects. `plant-edge demo` and the end-to-end tests
//! use them; they are not part of the agent's job.

pub mod erp;
pub mod erp_apis;
pub mod mes;
pub mod pki;
pub mod plc;
