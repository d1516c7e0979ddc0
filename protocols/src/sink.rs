//! The sink trait: where forwarders hand journal batches for delivery.

use std::time::Duration;

use async_trait::async_trait;
use buffer::PendingEvent;

/// What a sink says about one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Confirmed by the peer (PUBACK, HTTP 2xx, fsync): acknowledge it.
    Delivered,
    /// Not now (connection down, 5xx, 429): try again, after `after` if the
    /// peer said when.
    Retry {
        /// Delay the peer asked for (Retry-After), if any.
        after: Option<Duration>,
        /// Why, for logs and status.
        reason: String,
    },
    /// The endpoint refuses everything (bad credentials, wrong URL or
    /// topic, a redirect): not the event's fault, so it stays in the
    /// journal; retried with capped backoff while the sink alarms.
    Hold {
        /// Why, for logs, status and readiness.
        reason: String,
    },
    /// Accepted by the peer, not final yet (an ERP's queue): stays in the
    /// journal, is handed to the sink again to follow up, and does not hold
    /// up the events after it. Never counted as a failed attempt.
    Pending {
        /// When the peer accepted it.
        since: std::time::SystemTime,
        /// When to ask again.
        after: Duration,
        /// Older than the sink's alarm bound.
        overdue: bool,
        /// What the peer said, for status.
        reason: String,
    },
    /// Never (the peer singled this event out: 400, 422, a refused topic
    /// while others are accepted): to the dead letters with the reason.
    Rejected {
        /// Why, kept with the dead letter.
        reason: String,
    },
}

impl Verdict {
    /// A retry without a peer-given delay.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            after: None,
            reason: reason.into(),
        }
    }
}

/// A destination for events.
///
/// `deliver` gets events in journal order and returns one verdict per
/// event, in the same order. A sink that must preserve order at its peer
/// answers `Retry` for every event after the first one it could not
/// deliver; the forwarder then re-sends exactly those, in order.
#[async_trait]
pub trait Sink: Send {
    /// Delivers a batch; one verdict per event.
    async fn deliver(&mut self, batch: &[PendingEvent]) -> Vec<Verdict>;

    /// Flushes and releases resources at shutdown.
    async fn close(&mut self) {}
}
