//! Sink implementations.

pub mod file;
