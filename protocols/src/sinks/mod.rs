//! Sink implementations.

pub mod file;
pub mod https;
pub mod mqtt;
