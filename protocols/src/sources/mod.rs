//! Source implementations.

pub mod simulated;
