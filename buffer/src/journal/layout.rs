//! On-disk key layout and record encodings of the journal (one sled tree).
//!
//! Everything lives in one tree so that one `apply_batch` can change events,
//! dedup entries, source cursors, sink cursors and dead letters atomically.
//! The first byte of a key names its family; numbers are big-endian so that
//! sled's key order is numeric order.

use bincode::{Decode, Encode};

/// `e` + first seq: a chunk of consecutive events (bincode `Vec<StoredEvent>`,
/// LZ4-compressed when that is smaller: see [`encode_chunk`]).
pub(crate) const CHUNK: u8 = b'e';
/// `k` + first seq: the chunk's [`ChunkMeta`], small so that open reads no payload.
pub(crate) const CHUNK_META: u8 = b'k';
/// `d` + first seq of a commit: the ids that commit appended (dedup window).
pub(crate) const DEDUP: u8 = b'd';
/// `c` + source name: the source's opaque cursor state (LZ4 with a
/// dictionary when that is smaller: see [`encode_cursor`]).
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
/// `l` + first seq of a commit + first id: the ledger rows of what that
/// commit stored (see [`super::ledger`]).
pub(crate) const LEDGER: u8 = b'l';
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
pub(crate) const CHUNK_TARGET_BYTES: usize = 16 * 1024;
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
    /// The segment file holding the chunk's bytes ([`NO_SEGMENT`]: inline
    /// in sled, as format 1 stored them, or gone).
    pub segment: u64,
}

/// [`ChunkMeta::segment`] of a chunk without a segment.
pub(crate) const NO_SEGMENT: u64 = u64::MAX;

/// A chunk meta as format 1 wrote it (no segment).
#[derive(Clone, Copy, Debug, Encode, Decode)]
struct ChunkMetaV1 {
    last: u64,
    class: u8,
    appended_ms: u64,
    bytes: u64,
    dropped: bool,
}

/// A chunk meta's stored value. A chunk without a segment (inline, or
/// its bytes dropped or quarantined) is written as format 1 wrote it:
/// [`decode_meta`] reads both, and a test build playing format 1 writes
/// what format 1 reads.
pub(crate) fn encode_meta(meta: &ChunkMeta) -> Result<Vec<u8>, bincode::error::EncodeError> {
    if meta.segment != NO_SEGMENT {
        return encode(meta);
    }
    encode(&ChunkMetaV1 {
        last: meta.last,
        class: meta.class,
        appended_ms: meta.appended_ms,
        bytes: meta.bytes,
        dropped: meta.dropped,
    })
}

/// Reads a chunk meta of this format or of format 1.
pub(crate) fn decode_meta(bytes: &[u8]) -> Result<ChunkMeta, bincode::error::DecodeError> {
    decode::<ChunkMeta>(bytes).or_else(|e| {
        decode::<ChunkMetaV1>(bytes)
            .map(|v1| ChunkMeta {
                last: v1.last,
                class: v1.class,
                appended_ms: v1.appended_ms,
                bytes: v1.bytes,
                dropped: v1.dropped,
                segment: NO_SEGMENT,
            })
            .map_err(|_| e)
    })
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

/// First byte of a compressed chunk value, followed by the plain length
/// (u32, little-endian) and the LZ4 block. A plain chunk starts with its
/// event count as a bincode varint, at most [`CHUNK_MAX_EVENTS`] and so one
/// byte below this tag; journals written before compression read as before.
const COMPRESSED_CHUNK: u8 = 0xC4;

/// The largest plain chunk a journal can hold: a chunk closes at
/// [`CHUNK_TARGET_BYTES`] or [`CHUNK_MAX_EVENTS`], and no event exceeds
/// [`MAX_EVENT_BYTES`] (plus its id, routes and source name). A damaged
/// length beyond it must not make the reader allocate gigabytes.
const MAX_PLAIN_CHUNK_BYTES: usize = CHUNK_MAX_EVENTS * (MAX_EVENT_BYTES + 1024);

/// A chunk's stored value. Compressed because sled writes every value
/// several times (the log fragment, then each rewrite of the leaf node
/// holding it): the JSON of events from one plant repeats its keys and
/// names and shrinks to a third or less, and flash wear follows the bytes.
/// Plain when compression would not save anything.
pub(crate) fn encode_chunk(
    events: &Vec<StoredEvent>,
) -> Result<Vec<u8>, bincode::error::EncodeError> {
    let plain = encode(events)?;
    let packed = lz4_flex::block::compress(&plain);
    if 5 + packed.len() >= plain.len() {
        return Ok(plain);
    }
    let mut value = Vec::with_capacity(5 + packed.len());
    value.push(COMPRESSED_CHUNK);
    value.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    value.extend_from_slice(&packed);
    Ok(value)
}

/// First byte of a compressed source cursor, followed by the plain length
/// (u16, little-endian) and the LZ4 block made with [`CURSOR_DICTIONARY`].
const COMPRESSED_CURSOR: u8 = 0xC5;
/// First byte of a plain cursor that itself starts with one of these two
/// tags (cursors are opaque to the journal; today's sources write JSON,
/// which never does).
const TAGGED_PLAIN_CURSOR: u8 = 0xC6;
/// A cursor larger than this is stored plain (the length field is a u16).
const MAX_COMPRESSED_CURSOR: usize = u16::MAX as usize;

/// What the sources' cursors are made of (their JSON keys, a UUID's
/// shape), so that a cursor of a few hundred bytes compresses on its own:
/// without a dictionary LZ4 finds little to repeat in one small value.
/// Changing it makes stored cursors unreadable: append only as a new tag.
const CURSOR_DICTIONARY: &[u8] = br#"{"counters":{"good":{"namespace":"00000000-0000-4000-8000-000000000000","epoch":0,"raw":0,"total":0},"scrap":{"namespace":"00000000-0000-4000-8000-000000000000","epoch":1,"raw":1,"total":1}},"records":{"record":{"id":"","sequence":null}},"handshakes":{"record":{"namespace":"00000000-0000-4000-8000-000000000000","cycle":0,"pending":{"#;

/// A source cursor's stored value. Every append of a source stores its
/// cursor (a counter's position goes with the parts it counted), so on a
/// gateway polling 20 lines ten times a second plain cursors were about a
/// third of the bytes sled wrote (43 of 134 KB/s, strace).
pub(crate) fn encode_cursor(plain: &[u8]) -> Vec<u8> {
    if plain.len() <= MAX_COMPRESSED_CURSOR {
        let packed = lz4_flex::block::compress_with_dict(plain, CURSOR_DICTIONARY);
        if 3 + packed.len() < plain.len() {
            let mut value = Vec::with_capacity(3 + packed.len());
            value.push(COMPRESSED_CURSOR);
            value.extend_from_slice(&(plain.len() as u16).to_le_bytes());
            value.extend_from_slice(&packed);
            return value;
        }
    }
    if matches!(
        plain.first(),
        Some(&COMPRESSED_CURSOR | &TAGGED_PLAIN_CURSOR)
    ) {
        let mut value = Vec::with_capacity(1 + plain.len());
        value.push(TAGGED_PLAIN_CURSOR);
        value.extend_from_slice(plain);
        return value;
    }
    plain.to_vec()
}

/// Reads a cursor value written by [`encode_cursor`] (or stored plain by an
/// older journal).
pub(crate) fn decode_cursor(stored: &[u8]) -> Result<Vec<u8>, String> {
    match stored.split_first() {
        Some((&COMPRESSED_CURSOR, rest)) => {
            let (length, packed) = rest
                .split_at_checked(2)
                .ok_or("compressed cursor without its length")?;
            let length = u16::from_le_bytes([length[0], length[1]]) as usize;
            let plain = lz4_flex::block::decompress_with_dict(packed, length, CURSOR_DICTIONARY)
                .map_err(|e| format!("compressed cursor: {e}"))?;
            if plain.len() != length {
                return Err(format!(
                    "compressed cursor holds {} bytes, its header says {length}",
                    plain.len()
                ));
            }
            Ok(plain)
        }
        Some((&TAGGED_PLAIN_CURSOR, rest)) => Ok(rest.to_vec()),
        _ => Ok(stored.to_vec()),
    }
}

/// Reads a chunk value written by [`encode_chunk`], compressed or plain.
pub(crate) fn decode_chunk(bytes: &[u8]) -> Result<Vec<StoredEvent>, bincode::error::DecodeError> {
    let Some((&COMPRESSED_CHUNK, rest)) = bytes.split_first() else {
        return decode(bytes);
    };
    let (length, packed) = rest.split_at_checked(4).ok_or_else(|| {
        bincode::error::DecodeError::OtherString("compressed chunk without its length".into())
    })?;
    let mut length_bytes = [0u8; 4];
    length_bytes.copy_from_slice(length);
    let length = u32::from_le_bytes(length_bytes) as usize;
    if length > MAX_PLAIN_CHUNK_BYTES {
        return Err(bincode::error::DecodeError::OtherString(format!(
            "compressed chunk claims {length} bytes, more than any chunk holds"
        )));
    }
    let plain = lz4_flex::block::decompress(packed, length)
        .map_err(|e| bincode::error::DecodeError::OtherString(format!("compressed chunk: {e}")))?;
    decode(&plain)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_shrink_with_the_dictionary_and_read_back_whatever_they_hold() {
        // A Modbus line's position as the source writes it.
        let modbus = br#"{"counters":{"good":{"namespace":"6f1c3a52-97d4-4b0e-a1f3-2c5d8e9b7a10","epoch":0,"raw":48211,"total":48211},"scrap":{"namespace":"0d9e8b7c-6a5f-4e3d-9c2b-1a0f9e8d7c6b","epoch":2,"raw":1203,"total":1187}},"records":{}}"#;
        let stored = encode_cursor(modbus);
        println!("Modbus cursor: {} -> {} bytes", modbus.len(), stored.len());
        assert!(
            stored.len() * 10 < modbus.len() * 7,
            "a Modbus cursor must shrink by at least 30 %: {} -> {}",
            modbus.len(),
            stored.len()
        );
        assert_eq!(decode_cursor(&stored).expect("decode"), modbus);
        // Tiny, binary, tag-lookalike and older plain cursors.
        for plain in [
            &b"7"[..],
            &b""[..],
            &[COMPRESSED_CURSOR][..],
            &[TAGGED_PLAIN_CURSOR, 1, 2][..],
            &[0xff; 3][..],
        ] {
            assert_eq!(decode_cursor(&encode_cursor(plain)).expect("decode"), plain);
        }
        assert_eq!(decode_cursor(modbus).expect("plain"), modbus);
        let mut damaged = stored.clone();
        damaged[1] = 0xff;
        damaged[2] = 0xff;
        assert!(
            decode_cursor(&damaged).is_err(),
            "a wrong length is an error"
        );
    }

    fn event(n: u8, payload: Vec<u8>) -> StoredEvent {
        StoredEvent {
            id: [n; 16],
            routes: 1,
            source: "press-01".into(),
            payload,
        }
    }

    fn json_events() -> Vec<StoredEvent> {
        (0..6)
            .map(|n| {
                let json = format!(
                    r#"{{"specversion":"1.0","type":"production.completion","source":"urn:plant-edge:plant:gw:press-01","data":{{"site":"plant","line":"L1","counter":{{"value":{n}}}}}}}"#
                );
                event(n, json.into_bytes())
            })
            .collect()
    }

    #[test]
    fn a_chunk_of_json_events_is_stored_compressed_and_reads_back_equal() {
        let events = json_events();
        let stored = encode_chunk(&events).expect("encode");
        let plain = encode(&events).expect("encode");
        assert_eq!(stored[0], COMPRESSED_CHUNK);
        assert!(
            stored.len() * 2 < plain.len(),
            "{} vs {}",
            stored.len(),
            plain.len()
        );
        assert_eq!(decode_chunk(&stored).expect("decode"), events);
    }

    #[test]
    fn a_chunk_written_before_compression_still_reads() {
        let events = json_events();
        let legacy = encode(&events).expect("encode");
        assert_eq!(decode_chunk(&legacy).expect("decode"), events);
    }

    #[test]
    fn a_chunk_that_does_not_compress_is_stored_plain() {
        // xorshift: bytes without the repetition LZ4 feeds on.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..3000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let events = vec![event(1, noise)];
        let stored = encode_chunk(&events).expect("encode");
        assert_eq!(stored, encode(&events).expect("encode"));
        assert_eq!(decode_chunk(&stored).expect("decode"), events);
    }

    #[test]
    fn a_damaged_compressed_chunk_is_an_error_not_a_huge_allocation() {
        let mut stored = encode_chunk(&json_events()).expect("encode");
        stored[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_chunk(&stored).is_err());
        let mut stored = encode_chunk(&json_events()).expect("encode");
        let end = stored.len() - 1;
        stored.truncate(end / 2);
        assert!(decode_chunk(&stored).is_err());
        assert!(decode_chunk(&[COMPRESSED_CHUNK, 1]).is_err());
    }
}
