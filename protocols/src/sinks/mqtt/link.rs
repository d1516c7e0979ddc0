//! The link task: owns rumqttc's client and event loop (v3.1.1 or v5),
//! pairs each outgoing publish with its journal sequence in request order,
//! and turns the broker's acknowledgements into verdicts.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    LastWill as LastWill5, Packet as Packet5, PubAckReason, PubCompReason, PubRecReason,
    PublishProperties,
};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use tokio::sync::{mpsc, watch};

use super::{status_payload, MqttSinkConfig, MqttVersion};
use crate::pace::Backoff;
use crate::sink::Verdict;
use crate::tls;

pub(super) enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

pub(super) enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// What the link task cares about, from either protocol version.
pub(super) enum LinkEvent {
    Connected,
    Sent(u16),
    /// Final answer for a pkid: `Ok` delivered, `Err((retry, reason))`.
    Done(u16, Result<(), (bool, String)>),
    Other,
}

pub(super) struct Publication {
    pub(super) topic: String,
    pub(super) payload: Bytes,
    pub(super) retain: bool,
    /// MQTT 5 properties (ignored for 3.1.1).
    pub(super) properties: Option<PublishProperties>,
}

impl Client {
    pub(super) fn try_publish(&self, qos: u8, p: Publication) -> Result<(), String> {
        match self {
            Client::V4(c) => {
                let qos = if qos == 2 {
                    rumqttc::QoS::ExactlyOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                c.try_publish(p.topic, qos, p.retain, p.payload)
                    .map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let qos = if qos == 2 {
                    QoS5::ExactlyOnce
                } else {
                    QoS5::AtLeastOnce
                };
                c.try_publish_with_properties(
                    p.topic,
                    qos,
                    p.retain,
                    p.payload,
                    p.properties.unwrap_or_default(),
                )
                .map_err(|e| e.to_string())
            }
        }
    }

    pub(super) fn try_disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

pub(super) fn v5_failure(reason: &str, code: u8, transient: bool) -> Result<(), (bool, String)> {
    Err((transient, format!("MQTT 5 reason {reason} (0x{code:02x})")))
}

impl Loop {
    /// The next event; `Err` is the connection's failure, described for
    /// the operator.
    pub(super) async fn poll(&mut self) -> Result<LinkEvent, String> {
        match self {
            Loop::V4(l) => {
                use rumqttc::{Event, Outgoing, Packet};
                match l.poll().await.map_err(|e| describe_connection_error(&e))? {
                    Event::Incoming(Packet::ConnAck(_)) => Ok(LinkEvent::Connected),
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ok(LinkEvent::Sent(pkid)),
                    Event::Incoming(Packet::PubAck(a)) => Ok(LinkEvent::Done(a.pkid, Ok(()))),
                    Event::Incoming(Packet::PubComp(c)) => Ok(LinkEvent::Done(c.pkid, Ok(()))),
                    _ => Ok(LinkEvent::Other),
                }
            }
            Loop::V5(l) => {
                use rumqttc::v5::Event;
                use rumqttc::Outgoing;
                match l.poll().await.map_err(|e| describe_connection_error(&e))? {
                    Event::Incoming(Packet5::ConnAck(_)) => Ok(LinkEvent::Connected),
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ok(LinkEvent::Sent(pkid)),
                    Event::Incoming(Packet5::PubAck(a)) => {
                        Ok(LinkEvent::Done(a.pkid, puback_verdict(&a.reason)))
                    }
                    // A failed PUBREC ends the QoS 2 flow: no PUBREL, no PUBCOMP.
                    Event::Incoming(Packet5::PubRec(r)) => match pubrec_verdict(&r.reason) {
                        Ok(()) => Ok(LinkEvent::Other),
                        failure => Ok(LinkEvent::Done(r.pkid, failure)),
                    },
                    Event::Incoming(Packet5::PubComp(c)) => Ok(LinkEvent::Done(
                        c.pkid,
                        match c.reason {
                            PubCompReason::Success => Ok(()),
                            PubCompReason::PacketIdentifierNotFound => {
                                v5_failure("PacketIdentifierNotFound", 0x92, true)
                            }
                        },
                    )),
                    _ => Ok(LinkEvent::Other),
                }
            }
        }
    }
}

/// Permanent refusals dead-letter; quota is a "later".
pub(super) fn puback_verdict(reason: &PubAckReason) -> Result<(), (bool, String)> {
    match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
        PubAckReason::QuotaExceeded => v5_failure("QuotaExceeded", 0x97, true),
        PubAckReason::PacketIdentifierInUse => v5_failure("PacketIdentifierInUse", 0x91, true),
        PubAckReason::UnspecifiedError => v5_failure("UnspecifiedError", 0x80, false),
        PubAckReason::ImplementationSpecificError => {
            v5_failure("ImplementationSpecificError", 0x83, false)
        }
        PubAckReason::NotAuthorized => v5_failure("NotAuthorized", 0x87, false),
        PubAckReason::TopicNameInvalid => v5_failure("TopicNameInvalid", 0x90, false),
        PubAckReason::PayloadFormatInvalid => v5_failure("PayloadFormatInvalid", 0x99, false),
    }
}

pub(super) fn pubrec_verdict(reason: &PubRecReason) -> Result<(), (bool, String)> {
    match reason {
        PubRecReason::Success | PubRecReason::NoMatchingSubscribers => Ok(()),
        PubRecReason::QuotaExceeded => v5_failure("QuotaExceeded", 0x97, true),
        PubRecReason::PacketIdentifierInUse => v5_failure("PacketIdentifierInUse", 0x91, true),
        PubRecReason::UnspecifiedError => v5_failure("UnspecifiedError", 0x80, false),
        PubRecReason::ImplementationSpecificError => {
            v5_failure("ImplementationSpecificError", 0x83, false)
        }
        PubRecReason::NotAuthorized => v5_failure("NotAuthorized", 0x87, false),
        PubRecReason::TopicNameInvalid => v5_failure("TopicNameInvalid", 0x90, false),
        PubRecReason::PayloadFormatInvalid => v5_failure("PayloadFormatInvalid", 0x99, false),
    }
}

/// Marker in the FIFO for the agent's own status messages.
pub(super) const STATUS: Option<u64> = None;

pub(super) struct Shared {
    pub(super) client: Option<Client>,
    /// Journal sequences of queued publishes, in request order.
    pub(super) fifo: VecDeque<Option<u64>>,
}

pub(super) struct Link {
    pub(super) shared: Mutex<Shared>,
    pub(super) connected: watch::Sender<bool>,
    /// Increments on every CONNACK.
    pub(super) generation: AtomicU64,
    pub(super) last_error: Mutex<String>,
    pub(super) status_acked: tokio::sync::Notify,
}

impl Link {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a publish and records its sequence, atomically.
    pub(super) fn publish(&self, qos: u8, seq: Option<u64>, p: Publication) -> Result<(), String> {
        let mut shared = self.lock();
        let Some(client) = shared.client.as_ref() else {
            return Err(self.last_error());
        };
        let result = client.try_publish(qos, p);
        if result.is_ok() {
            shared.fifo.push_back(seq);
        }
        result
    }

    pub(super) fn last_error(&self) -> String {
        let e = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if e.is_empty() {
            "not connected to the broker yet".into()
        } else {
            e
        }
    }
}

pub(super) fn new_connection(
    config: &MqttSinkConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> (Client, Loop) {
    let transport = match tls {
        Some(tls) => {
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone()))
        }
        None => rumqttc::Transport::tcp(),
    };
    // Room for a full window plus status messages: try_publish never
    // finds the request channel full while the window is respected.
    let capacity = config.inflight as usize + 16;
    let will = status_payload(config, "offline");
    match config.version {
        MqttVersion::V311 => {
            let mut o = rumqttc::MqttOptions::new(&config.client_id, &config.host, config.port);
            o.set_keep_alive(config.keep_alive)
                .set_clean_session(config.clean_session)
                .set_inflight(config.inflight)
                .set_transport(transport)
                .set_last_will(rumqttc::LastWill::new(
                    &config.status_topic,
                    will,
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            if let Some(user) = &config.username {
                o.set_credentials(user, config.password.clone().unwrap_or_default());
            }
            let (c, mut l) = rumqttc::AsyncClient::new(o, capacity);
            l.set_network_options(network_options());
            (Client::V4(c), Loop::V4(Box::new(l)))
        }
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&config.client_id, &config.host, config.port);
            o.set_keep_alive(config.keep_alive)
                .set_clean_start(config.clean_session)
                .set_outgoing_inflight_upper_limit(config.inflight)
                .set_transport(transport)
                .set_last_will(LastWill5::new(
                    &config.status_topic,
                    will,
                    QoS5::AtLeastOnce,
                    true,
                    None,
                ));
            if !config.clean_session {
                o.set_session_expiry_interval(Some(
                    config.session_expiry.as_secs().min(u32::MAX as u64) as u32,
                ));
            }
            if let Some(user) = &config.username {
                o.set_credentials(user, config.password.clone().unwrap_or_default());
            }
            o.set_network_options(network_options());
            let (c, l) = rumqttc::v5::AsyncClient::new(o, capacity);
            (Client::V5(c), Loop::V5(Box::new(l)))
        }
    }
}

/// Nagle stays on: it packs a window of small publishes into few segments.
/// The 40 ms stall seen at the end of each batch comes from the broker's
/// side (its last PUBACKs wait for our delayed ACK); Mosquitto's
/// `set_tcp_nodelay true` removes it (README, "MQTT sink").
pub(super) fn network_options() -> rumqttc::NetworkOptions {
    let mut options = rumqttc::NetworkOptions::new();
    options.set_connection_timeout(10);
    options
}

pub(super) fn describe_connection_error(error: &(dyn std::error::Error + 'static)) -> String {
    if tls::certificate_refused(error) {
        format!("TLS: the broker's certificate was not accepted ({error}); check ca_file and the broker's host name")
    } else {
        format!("broker connection: {error}")
    }
}

pub(super) async fn run_link(
    config: MqttSinkConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    link: Arc<Link>,
    verdicts: mpsc::UnboundedSender<(u64, Verdict)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(400), Duration::from_secs(30));
    let mut outage = crate::pace::Outage::default();
    loop {
        let (client, mut event_loop) = new_connection(&config, tls.as_ref());
        link.lock().client = Some(client);
        let mut inflight: HashMap<u16, Option<u64>> = HashMap::new();
        let error = loop {
            let event = tokio::select! {
                event = event_loop.poll() => event,
                _ = stop.changed() => {
                    if *stop.borrow() {
                        // Let the offline status and DISCONNECT go out.
                        let drain = tokio::time::timeout(Duration::from_secs(2), async {
                            while event_loop.poll().await.is_ok() {}
                        });
                        let _ = drain.await;
                        return;
                    }
                    continue;
                }
            };
            match event {
                Ok(LinkEvent::Connected) => {
                    backoff.reset();
                    link.generation.fetch_add(1, Ordering::SeqCst);
                    link.connected.send_replace(true);
                    let broker = format!("{}:{}", config.host, config.port);
                    match outage.recovered() {
                        Some((lasted, failures)) => {
                            tracing::info!(%broker, after = %crate::pace::human(lasted), failed_attempts = failures, "MQTT broker back")
                        }
                        None => tracing::info!(%broker, "MQTT connected"),
                    }
                    let birth = Publication {
                        topic: config.status_topic.clone(),
                        payload: status_payload(&config, "online").into(),
                        retain: true,
                        properties: None,
                    };
                    if let Err(e) = link.publish(1, STATUS, birth) {
                        tracing::warn!(error = %e, "MQTT birth message not queued");
                    }
                }
                Ok(LinkEvent::Sent(pkid)) => {
                    let seq = link.lock().fifo.pop_front().flatten();
                    inflight.insert(pkid, seq);
                }
                Ok(LinkEvent::Done(pkid, outcome)) => match inflight.remove(&pkid) {
                    Some(Some(seq)) => {
                        let verdict = match outcome {
                            Ok(()) => Verdict::Delivered,
                            Err((true, reason)) => Verdict::retry(reason),
                            Err((false, reason)) => Verdict::Rejected {
                                reason: format!("broker refused the publish: {reason}"),
                            },
                        };
                        let _ = verdicts.send((seq, verdict));
                    }
                    Some(None) => link.status_acked.notify_waiters(),
                    None => tracing::debug!(pkid, "acknowledgement for an unknown packet id"),
                },
                Ok(LinkEvent::Other) => {}
                Err(e) => break e,
            }
        };
        link.connected.send_replace(false);
        *link.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error.clone();
        let orphans: Vec<u64> = {
            let mut shared = link.lock();
            shared.client = None;
            shared
                .fifo
                .drain(..)
                .flatten()
                .chain(inflight.into_values().flatten())
                .collect()
        };
        for seq in orphans {
            let _ = verdicts.send((seq, Verdict::retry(error.clone())));
        }
        let wait = backoff.next_wait();
        if outage.failed() {
            tracing::warn!(error = %error, since = %outage.since_text(), "MQTT LINK DOWN: reconnecting with backoff; events wait in the journal");
        } else {
            tracing::debug!(error = %error, retry_in_ms = wait.as_millis() as u64, "MQTT link still down");
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => if *stop.borrow() { return; },
        }
    }
}

// Borrowed where the JSON has no escapes: every publish parses one, and
// owned copies of fields only read once are allocations for nothing.
