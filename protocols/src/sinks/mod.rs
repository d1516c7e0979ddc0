//! Sink implementations.

pub mod file;
pub mod mqtt;
