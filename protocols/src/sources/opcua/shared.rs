//! One OPC UA session per server and identity, shared by every source that
//! names the same endpoint, security and user (an MES serving several
//! lines, each configured as its own source).
//!
//! # Invariants
//!
//! - One task owns the session: it connects, drives the session's event
//!   loop, reconnects with capped backoff, and publishes the session's
//!   state; it logs an outage once per server, not once per source.
//! - Each published session carries a generation; a source serves one
//!   generation (its own subscription on it) and treats any change (lost,
//!   reconnected) as "subscribe again and read everything once", exactly
//!   as after a reconnect of its own.
//! - A source that stops serving deletes its subscription if the session
//!   is still up, so the sources left on it are not charged for it.
//! - The task ends, and closes the session, when the last source lets go.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use opcua::client::Session;
use tokio::sync::{mpsc, watch};

use super::session::{self, Connection, LinkEvent};

/// The shared session as its sources see it.
#[derive(Clone)]
pub(super) enum LinkState {
    /// Not connected yet (or again), no reason known.
    Connecting,
    /// Connected: serve this generation.
    Up {
        /// Bumped at every (re)connect.
        generation: u64,
        /// The session.
        session: Arc<Session>,
    },
    /// The last attempt failed or the session was lost: why.
    Down {
        /// In words an OT engineer can act on.
        reason: String,
    },
}

/// A source's handle on the shared session; the session closes when the
/// last handle is dropped.
pub(super) struct SharedSession {
    state: watch::Receiver<LinkState>,
    _stop: watch::Sender<bool>,
}

impl SharedSession {
    /// The shared session for `connection`: the running one, or a new
    /// task on the current runtime.
    pub(super) fn for_connection(connection: &Connection) -> Arc<SharedSession> {
        static SESSIONS: std::sync::OnceLock<Mutex<BTreeMap<String, Weak<SharedSession>>>> =
            std::sync::OnceLock::new();
        let mut sessions = SESSIONS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Everything that decides the session (the password too): kept in
        // memory as a key only, never logged.
        let key = format!("{connection:?}");
        if let Some(shared) = sessions
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|s| s.state.has_changed().is_ok())
        {
            return shared;
        }
        let (state_tx, state) = watch::channel(LinkState::Connecting);
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(own(connection.clone(), state_tx, stopped));
        let shared = Arc::new(SharedSession { state, _stop: stop });
        sessions.retain(|_, weak| weak.strong_count() > 0);
        sessions.insert(key, Arc::downgrade(&shared));
        shared
    }

    /// Watches the state.
    pub(super) fn watch(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }
}

/// Forwards the end of `generation` to a source serving it, as the
/// link events its serve loop understands.
pub(super) fn forward_end(
    mut state: watch::Receiver<LinkState>,
    generation: u64,
    tx: mpsc::Sender<LinkEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let over = match &*state.borrow_and_update() {
                LinkState::Up { generation: g, .. } => *g != generation,
                _ => true,
            };
            if over {
                let _ = tx
                    .send(LinkEvent::Lost(
                        opcua::types::StatusCode::BadConnectionClosed,
                    ))
                    .await;
                return;
            }
            if state.changed().await.is_err() {
                let _ = tx
                    .send(LinkEvent::Ended(
                        opcua::types::StatusCode::BadConnectionClosed,
                    ))
                    .await;
                return;
            }
        }
    })
}

/// The task that owns the session.
async fn own(
    connection: Connection,
    state: watch::Sender<LinkState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff =
        crate::pace::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut outage = crate::pace::Outage::default();
    let mut client = None;
    let mut generation = 0u64;
    let endpoint = connection.endpoint.clone();
    // Stopped when the last source let go (the sender is gone).
    let stopped = |stop: &watch::Receiver<bool>| stop.has_changed().is_err() || *stop.borrow();
    loop {
        if stopped(&stop) {
            return;
        }
        let opened = async {
            if client.is_none() {
                client = Some(session::client(&connection)?);
            }
            let Some(client) = client.as_mut() else {
                return Err("no client".to_owned());
            };
            session::open(client, &connection).await
        }
        .await;
        let reason = match opened {
            Err(e) => e,
            Ok((session, event_loop)) => {
                let (link_tx, mut link_rx) = mpsc::channel(16);
                let driver = session::drive(event_loop, link_tx);
                let reason = match session::connected(&session, &mut link_rx, &connection).await {
                    Err(e) => e,
                    Ok(()) => {
                        backoff.reset();
                        match outage.recovered() {
                            Some((lasted, failures)) => {
                                tracing::info!(%endpoint, after = %crate::pace::human(lasted), failed_attempts = failures, "OPC UA server back; everything is read once")
                            }
                            None => {
                                tracing::info!(%endpoint, policy = %connection.security_policy, mode = %connection.security_mode, "OPC UA session established")
                            }
                        }
                        generation += 1;
                        state.send_replace(LinkState::Up {
                            generation,
                            session: session.clone(),
                        });
                        loop {
                            tokio::select! {
                                event = link_rx.recv() => match event {
                                    // The library reconnected under us:
                                    // sources subscribe and read again.
                                    Some(LinkEvent::Connected) => {
                                        generation += 1;
                                        state.send_replace(LinkState::Up {
                                            generation,
                                            session: session.clone(),
                                        });
                                    }
                                    Some(LinkEvent::Lost(code)) | Some(LinkEvent::Ended(code)) => {
                                        break session::explain(code, &connection, "");
                                    }
                                    None => break "session ended".to_owned(),
                                },
                                _ = stop.changed() => {
                                    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
                                    driver.abort();
                                    return;
                                }
                            }
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
                driver.abort();
                reason
            }
        };
        let wait = backoff.next_wait();
        if outage.failed() {
            tracing::warn!(%endpoint, error = %reason, since = %outage.since_text(), "OPC UA SERVER UNREACHABLE: reconnecting with backoff");
        } else {
            tracing::debug!(%endpoint, error = %reason, retry_in_ms = wait.as_millis() as u64, "OPC UA server still unreachable");
        }
        state.send_replace(LinkState::Down { reason });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
}
