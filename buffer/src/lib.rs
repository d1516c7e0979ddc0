//! plant-edge's buffer: the canonical event, deterministic ids, and the
//! durable journal every source writes to and every sink reads from.
//!
//! This crate knows nothing of any protocol; `protocols` builds on it.

pub mod event;
pub mod id;
pub mod journal;

pub use event::{CloudEvent, EventClass, EventData, EventType, Origin, Quantity};
pub use journal::{
    AppendOutcome, AppendRequest, Appender, Journal, JournalConfig, JournalError, NewEvent,
    PendingEvent, Routes,
};
pub use journal::{Fate, LedgerEntry, LedgerEvent};
