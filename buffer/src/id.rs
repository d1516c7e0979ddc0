//! Deterministic event ids: same fact, same id.
//!
//! An id is a UUIDv5 in the plant-edge namespace over a canonical text that
//! names the fact and nothing else: never the time it was read, never the
//! journal sequence. A counter step is named by `(source, signal, epoch,
//! value)`; a record by `(source, signal, identifying fields...)`. Each part
//! is length-prefixed so that no choice of field contents can make two
//! different facts collide on the same text.
//!
//! A stored position (a counter's state, a handshake's cycle count) carries
//! a random *namespace* drawn when the position was created. It is part of
//! every id made from that position, so a position that is lost (journal
//! moved aside, cursor undecodable) and created anew can never repeat an
//! id an earlier position gave out, even if the PLC counts the same values
//! again. Positions stored before namespaces existed have none and keep
//! their old ids.

use uuid::Uuid;

/// Namespace of every plant-edge event id (a fixed, random UUID).
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6c1e_4b2a_9f0d_4f43_8a55_2d3b_7e91_c0a4);

fn derive(kind: &str, parts: &[&str]) -> Uuid {
    let mut text = String::with_capacity(64);
    text.push_str(kind);
    for part in parts {
        text.push('|');
        text.push_str(&part.len().to_string());
        text.push(':');
        text.push_str(part);
    }
    Uuid::new_v5(&NAMESPACE, text.as_bytes())
}

/// Id of the event that brings `signal` of `source` up to `value` in `epoch`
/// (a position without a namespace: one stored before namespaces existed).
pub fn counter_event_id(source: &str, signal: &str, epoch: u32, value: u64) -> Uuid {
    derive(
        "counter",
        &[source, signal, &epoch.to_string(), &value.to_string()],
    )
}

/// Id of a counter step of a position created with `namespace`.
pub fn namespaced_counter_event_id(
    source: &str,
    signal: &str,
    namespace: Option<Uuid>,
    epoch: u32,
    value: u64,
) -> Uuid {
    match namespace {
        None => counter_event_id(source, signal, epoch, value),
        Some(ns) => derive(
            "counter-ns",
            &[
                source,
                signal,
                &ns.to_string(),
                &epoch.to_string(),
                &value.to_string(),
            ],
        ),
    }
}

/// Id of the record a handshake delivered in its `cycle`th exchange, for
/// a handshake position created with `namespace`: the exchange is the
/// identity, whatever the record's fields say.
pub fn handshake_record_id(source: &str, signal: &str, namespace: Uuid, cycle: u64) -> Uuid {
    derive(
        "handshake",
        &[source, signal, &namespace.to_string(), &cycle.to_string()],
    )
}

/// Id of the record a PLC ring buffer held at free-running `index` (the
/// count of records the PLC wrote before it), for a ring position created
/// with `namespace`: the position in the ring is the identity.
pub fn ring_record_id(source: &str, signal: &str, namespace: Uuid, index: u64) -> Uuid {
    derive(
        "ring",
        &[source, signal, &namespace.to_string(), &index.to_string()],
    )
}

/// Id of a line's checkpoint for the period starting at `period_start_ms`:
/// the same period closed twice (a crash at the boundary) is the same
/// fact, so the journal's dedup and the ERP's key see one event.
pub fn checkpoint_event_id(source: &str, line: &str, period_start_ms: u64) -> Uuid {
    derive("checkpoint", &[source, line, &period_start_ms.to_string()])
}

/// A namespace for a position created now (random, never reused).
pub fn new_namespace() -> Uuid {
    Uuid::new_v4()
}

/// Id of a record event, from the fields that identify the record (for a
/// handshake record: work order, material, quantity... plus the record
/// sequence register when the PLC has one).
pub fn record_event_id(source: &str, signal: &str, key_fields: &[&str]) -> Uuid {
    let mut parts = Vec::with_capacity(key_fields.len() + 2);
    parts.push(source);
    parts.push(signal);
    parts.extend_from_slice(key_fields);
    derive("record", &parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_counter_step_gives_same_id() {
        let a = counter_event_id("urn:plant-edge:p:g:s", "good", 2, 18342);
        let b = counter_event_id("urn:plant-edge:p:g:s", "good", 2, 18342);
        assert_eq!(a, b);
        assert_eq!(a.get_version_num(), 5);
    }

    #[test]
    fn epoch_value_and_signal_each_change_the_id() {
        let base = counter_event_id("s", "good", 2, 10);
        assert_ne!(base, counter_event_id("s", "good", 3, 10));
        assert_ne!(base, counter_event_id("s", "good", 2, 11));
        assert_ne!(base, counter_event_id("s", "scrap", 2, 10));
        assert_ne!(base, counter_event_id("t", "good", 2, 10));
    }

    #[test]
    fn a_new_namespace_never_repeats_an_old_positions_ids() {
        let (a, b) = (new_namespace(), new_namespace());
        assert_ne!(a, b);
        let old = namespaced_counter_event_id("s", "good", Some(a), 0, 10);
        assert_eq!(
            old,
            namespaced_counter_event_id("s", "good", Some(a), 0, 10)
        );
        assert_ne!(
            old,
            namespaced_counter_event_id("s", "good", Some(b), 0, 10)
        );
        assert_ne!(old, counter_event_id("s", "good", 0, 10));
        assert_eq!(
            namespaced_counter_event_id("s", "good", None, 0, 10),
            counter_event_id("s", "good", 0, 10),
            "positions stored before namespaces keep their ids"
        );
        assert_ne!(
            handshake_record_id("s", "rec", a, 7),
            handshake_record_id("s", "rec", b, 7)
        );
        assert_ne!(
            handshake_record_id("s", "rec", a, 7),
            handshake_record_id("s", "rec", a, 8)
        );
    }

    #[test]
    fn field_boundaries_cannot_collide() {
        assert_ne!(
            record_event_id("s", "rec", &["ab", "c"]),
            record_event_id("s", "rec", &["a", "bc"])
        );
        assert_ne!(
            record_event_id("s", "rec", &["a|1:b"]),
            record_event_id("s", "rec", &["a", "b"])
        );
    }
}
