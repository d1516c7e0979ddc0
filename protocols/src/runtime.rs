//! The one place where a source's position meets the journal.
//!
//! Every source (Modbus, OPC UA, simulated) keeps a position: counter
//! states, handshake positions, the last record seen. The rules:
//!
//! - It is read once when the source starts, from what the journal stored
//!   with the source's last durable append. One that does not decode is
//!   logged and counted and the source starts in a new id namespace
//!   ([`SourceContext::stored_position`]), never silently from zero.
//! - A new position is stored in the same durable write as the events it
//!   accounts for, and adopted only after the journal answered. Whatever
//!   a device is told (an acknowledgement) comes after that answer.
//! - A write the journal did not take (full, disk low, failed) keeps the
//!   old position: the source reads the same values again and makes the
//!   same events with the same ids.
//! - A closed journal means the agent stops: the source ends.

use std::collections::BTreeMap;

use buffer::{AppendOutcome, AppendRequest, JournalError, NewEvent};

use crate::counter::CounterState;
use crate::source::SourceContext;

/// A source's position as it is stored with its events.
pub trait Position: Clone + Default + PartialEq + Send {
    /// The bytes stored with the append (`None`: nothing to store).
    fn encode(&self) -> Option<Vec<u8>>;
    /// The position from stored bytes; an error names what is wrong.
    fn decode(bytes: &[u8]) -> Result<Self, String>;
}

/// Counter states by signal: the simulated source's position.
impl Position for BTreeMap<String, CounterState> {
    fn encode(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self).ok()
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// The journal is closed: the agent is stopping and the source ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// A source's durable position.
#[derive(Debug)]
pub struct Positioned<P> {
    current: P,
}

impl<P: Position> Positioned<P> {
    /// The position the journal holds for this source now.
    pub fn load(ctx: &SourceContext) -> Self {
        Self {
            current: ctx.stored_position(P::decode),
        }
    }

    /// The position as stored (the last one the journal confirmed).
    pub fn get(&self) -> &P {
        &self.current
    }

    /// Fills in what the stored position lacks (a signal new in the
    /// config), without storing it: nothing filled in names an event until
    /// it is stored with one, and keeping it in memory keeps ids made from
    /// it stable while this process runs.
    pub fn complete(&mut self, fill: impl FnOnce(&mut P)) {
        fill(&mut self.current)
    }

    /// Stores `events` with `next` as one durable write and adopts `next`
    /// once the journal confirmed it, at once: a device waits on it (a
    /// handshake). `Ok(None)`: not stored now (logged with `then`, what the
    /// source does about it); the old position stays, so the same reading
    /// makes the same events again.
    pub async fn store(
        &mut self,
        ctx: &SourceContext,
        events: Vec<NewEvent>,
        next: P,
        then: &str,
    ) -> Result<Option<AppendOutcome>, Closed> {
        self.store_with(ctx, events, next, then, true).await
    }

    /// As [`store`](Self::store) for what no device waits on (a counter
    /// poll): the commit may wait up to the journal's `commit_window` to
    /// share its write with others.
    pub async fn store_batched(
        &mut self,
        ctx: &SourceContext,
        events: Vec<NewEvent>,
        next: P,
        then: &str,
    ) -> Result<Option<AppendOutcome>, Closed> {
        self.store_with(ctx, events, next, then, false).await
    }

    async fn store_with(
        &mut self,
        ctx: &SourceContext,
        events: Vec<NewEvent>,
        next: P,
        then: &str,
        urgent: bool,
    ) -> Result<Option<AppendOutcome>, Closed> {
        let request = self.request(ctx, events, &next);
        let answer = if urgent {
            ctx.appender.append(request).await
        } else {
            ctx.appender.append_batched(request).await
        };
        match answer {
            Ok(outcome) => {
                self.current = next;
                Ok(Some(outcome))
            }
            Err(e) => not_stored(ctx, e, then),
        }
    }

    /// As [`store`](Self::store), but the events go to the dead letters
    /// with `reason` (a record that must not be posted, yet is durable so
    /// the device may be told). Returns how many were kept.
    pub async fn store_dead_letter(
        &mut self,
        ctx: &SourceContext,
        events: Vec<NewEvent>,
        next: P,
        reason: &str,
        then: &str,
    ) -> Result<Option<usize>, Closed> {
        let request = self.request(ctx, events, &next);
        match ctx.appender.dead_letter(request, reason).await {
            Ok(kept) => {
                self.current = next;
                Ok(Some(kept))
            }
            Err(e) => not_stored(ctx, e, then),
        }
    }

    fn request(&self, ctx: &SourceContext, events: Vec<NewEvent>, next: &P) -> AppendRequest {
        AppendRequest {
            source: ctx.name.clone(),
            events,
            cursor: next.encode(),
        }
    }
}

/// A closed journal ends the source; any other failure is logged with
/// what the source does about it.
fn not_stored<T>(
    ctx: &SourceContext,
    error: JournalError,
    then: &str,
) -> Result<Option<T>, Closed> {
    match error {
        JournalError::Closed => Err(Closed),
        other => {
            tracing::error!(source = %ctx.name, error = %other, "not stored; {then}");
            Ok(None)
        }
    }
}

/// Keeps `events` as dead letters with `reason`, without a position (what
/// the source read is unusable and moves nothing on). `Ok(None)`: not
/// kept now (logged with `then`).
pub async fn keep_dead_letter(
    ctx: &SourceContext,
    events: Vec<NewEvent>,
    reason: &str,
    then: &str,
) -> Result<Option<usize>, Closed> {
    let request = AppendRequest {
        source: ctx.name.clone(),
        events,
        cursor: None,
    };
    match ctx.appender.dead_letter(request, reason).await {
        Ok(kept) => Ok(Some(kept)),
        Err(e) => not_stored(ctx, e, then),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use buffer::{Journal, JournalConfig};

    /// A position that is just a number.
    #[derive(Clone, Debug, Default, PartialEq)]
    struct Count(u64);

    impl Position for Count {
        fn encode(&self) -> Option<Vec<u8>> {
            Some(self.0.to_string().into_bytes())
        }
        fn decode(bytes: &[u8]) -> Result<Self, String> {
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|t| t.parse().ok())
                .map(Count)
                .ok_or_else(|| "not a number".into())
        }
    }

    fn context(
        journal: &Journal,
        appender: buffer::Appender,
        cursor: Option<Vec<u8>>,
    ) -> SourceContext {
        SourceContext {
            site: "s".into(),
            gateway: "g".into(),
            name: "plc".into(),
            attributes: Default::default(),
            routes: journal.routes_all(),
            classifier: Default::default(),
            appender,
            initial_cursor: cursor,
            shutdown: tokio::sync::watch::channel(false).1,
            read: Default::default(),
            periods: None,
        }
    }

    #[tokio::test]
    async fn a_position_is_adopted_once_stored_and_a_closed_journal_ends_the_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = JournalConfig::new(dir.path().join("journal"));
        config.sinks = vec!["erp".into()];
        let journal = Journal::open(config).expect("journal");
        let (appender, writer) = journal.start_writer();
        let ctx = context(&journal, appender.clone(), None);
        let mut position = Positioned::<Count>::load(&ctx);
        assert_eq!(
            position.get(),
            &Count(0),
            "nothing stored: a fresh position"
        );

        let stored = position.store(&ctx, Vec::new(), Count(7), "again").await;
        assert!(matches!(stored, Ok(Some(_))), "{stored:?}");
        assert_eq!(position.get(), &Count(7));
        let cursor = journal.source_cursor("plc").expect("cursor");
        assert_eq!(cursor.as_deref(), Some(&b"7"[..]), "stored with the append");
        let restarted = context(&journal, appender.clone(), cursor);
        assert_eq!(Positioned::<Count>::load(&restarted).get(), &Count(7));

        writer.abort();
        let _ = writer.await;
        let closed = position.store(&ctx, Vec::new(), Count(8), "again").await;
        assert_eq!(closed.map(|o| o.is_some()), Err(Closed));
        assert_eq!(
            position.get(),
            &Count(7),
            "not adopted without the journal's answer"
        );

        let unreadable = context(&journal, appender, Some(b"seven".to_vec()));
        assert_eq!(Positioned::<Count>::load(&unreadable).get(), &Count(0));
        assert_eq!(
            unreadable.read.positions_lost().get("plc"),
            Some(&1),
            "an unreadable position is counted, not silently reset"
        );
    }
}
