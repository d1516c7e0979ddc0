//! On-disk key layout and record encodings of the journal (one sled tree).
//!
//! Everything lives in one tree so that one `apply_batch` can change events,
//! dedup entries, source cursors, sink cursors and dead letters atomically.
//! The first byte of a key names its family; numbers are big-endian so that
//! sled's key order is numeric order.

use bincode::{Decode, Encode};

/// `e` + first seq: a chunk of consecutive events (bincode `Vec<StoredEvent>`).
pub(crate) const CHUNK: u8 = b'e';
/// `k` + first seq: the chunk's [`ChunkMeta`], small so that open reads no payload.
pub(crate) const CHUNK_META: u8 = b'k';
/// `d` + first seq of a commit: the ids that commit appended (dedup window).
pub(crate) const DEDUP: u8 = b'd';
/// `c` + source name: the source's opaque cursor state.
pub(crate) const SOURCE_CURSOR: u8 = b'c';
/// `n` + sink name: the sink's slot (0..64), its bit in the routes mask.
pub(crate) const SINK_SLOT: u8 = b'n';
/// `s` + slot: the sink's cursor, all sequences below it are done for it.
pub(crate) const SINK_CURSOR: u8 = b's';
/// `x` + dead-letter number: a [`DeadLetterRecord`].
pub(crate) const DEAD_LETTER: u8 = b'x';
/// `q` + first seq: the raw bytes of a chunk that no longer decodes, kept
/// for recovery by hand (its events are counted as quarantined).
pub(crate) const QUARANTINE: u8 = b'q';
/// Next sequence to assign.
pub(crate) const NEXT_SEQ: &[u8] = b"m:next_seq";
/// Next dead-letter number.
pub(crate) const NEXT_DEAD_LETTER: &[u8] = b"m:next_dead_letter";
/// Cumulative counters, so a stopped agent's drops stay inspectable.
pub(crate) const COUNTERS: &[u8] = b"m:counters";

/// Largest events may get: keeps every sled value far below sled's blob
/// threshold (segment/4), so no blob file escapes our fdatasync.
pub const MAX_EVENT_BYTES: usize = 16 * 1024;
/// A chunk is closed once it holds this many payload bytes...
pub(crate) const CHUNK_TARGET_BYTES: usize = 4 * 1024;
/// ...or this many events.
pub(crate) const CHUNK_MAX_EVENTS: usize = 64;

pub(crate) fn seq_key(family: u8, seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = family;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub(crate) fn named_key(family: u8, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(family);
    key.extend_from_slice(name.as_bytes());
    key
}

pub(crate) fn key_seq(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

pub(crate) fn u64_value(value: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = value.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// One event inside a chunk. Class and append time are per chunk.
#[derive(Clone, Debug, Encode, Decode, PartialEq, Eq)]
pub(crate) struct StoredEvent {
    pub id: [u8; 16],
    pub routes: u64,
    pub source: String,
    pub payload: Vec<u8>,
}

impl StoredEvent {
    /// Bytes charged against `max_bytes` (payload plus bookkeeping).
    pub fn charge(&self) -> u64 {
        (self.payload.len() + self.source.len() + 40) as u64
    }
}

/// Index entry of a chunk, kept in memory for all pending chunks.
#[derive(Clone, Copy, Debug, Encode, Decode, PartialEq, Eq)]
pub(crate) struct ChunkMeta {
    pub last: u64,
    pub class: u8,
    pub appended_ms: u64,
    pub bytes: u64,
    /// Set when telemetry was dropped for space: the sequences stay
    /// accounted for (verify sees no hole) but the payload is gone.
    pub dropped: bool,
}

impl ChunkMeta {
    pub fn class(&self) -> crate::EventClass {
        crate::EventClass::from_code(self.class)
    }

    pub fn count(&self, first: u64) -> u64 {
        self.last - first + 1
    }
}

/// Ids appended by one commit, for the dedup window.
#[derive(Clone, Debug, Encode, Decode)]
pub(crate) struct DedupRecord {
    pub appended_ms: u64,
    pub ids: Vec<[u8; 16]>,
}

/// A rejected or expired event, with why and where.
#[derive(Clone, Debug, Encode, Decode, PartialEq, Eq)]
pub(crate) struct DeadLetterRecord {
    pub seq: u64,
    pub sink: String,
    pub reason: String,
    pub attempts: u32,
    pub dead_ms: u64,
    pub appended_ms: u64,
    pub class: u8,
    pub event: StoredEvent,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub(crate) fn encode<T: Encode>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::encode_to_vec(value, config())
}

pub(crate) fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
    let (value, used) = bincode::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}
