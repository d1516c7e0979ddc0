//! MQTT sink: at-least-once delivery, acknowledged to the journal only on
//! the broker's PUBACK (QoS 1) or PUBCOMP (QoS 2).
//!
//! # How acknowledgements are matched
//!
//! rumqttc's `publish` returns when the request is queued, not when the
//! broker confirmed it. One link task owns the event loop. Publishing
//! pushes the journal sequence onto a FIFO and queues the request under one
//! lock, so the FIFO order is the request order; rumqttc assigns packet ids
//! in request order and reports each as `Outgoing::Publish(pkid)`, which the
//! link task pairs with the FIFO head. The broker's PUBACK/PUBCOMP for that
//! pkid then becomes the event's verdict.
//!
//! # Disconnects
//!
//! On any connection error the link task throws the rumqttc state away and
//! answers `Retry` for everything in flight: unconfirmed events are re-sent
//! from the journal (same event id), never from rumqttc's memory, so an
//! agent crash loses nothing either. A fresh client state reuses packet ids
//! from 1, which a broker holding a persistent QoS 2 session would discard
//! as duplicates; QoS 2 therefore requires `clean_session` (the agent's
//! `validate` enforces it).
//!
//! # Order and pacing
//!
//! Events go out in journal order (hence per-source order) through a
//! sliding window of `inflight` unacknowledged publishes, at most
//! `max_messages_per_second`. A backlog after an outage therefore drains at
//! the paced rate ahead of live events, which queue behind it in order.
//! A publish the broker answers "not now" (QuotaExceeded, no answer in
//! time) stops the batch there: nothing after it is published until it is
//! confirmed, so no later event overtakes it (events already in the
//! window when the answer comes keep the broker's order of receipt).
//!
//! # Refusals
//!
//! An MQTT 5 refusal (NotAuthorized, TopicNameInvalid, ...) singles an
//! event out only if the broker accepts other publishes; otherwise it is
//! about the endpoint (credentials, ACL, topic template) and the sink
//! holds: nothing is dead-lettered, the forwarder retries and alarms. As
//! Mosquitto drops the connection right after a refusal, a refused event
//! with nothing accepted around it becomes a *suspect*: the next attempt
//! publishes the events behind it on other topics first; if the broker
//! takes any, the suspect is dead-lettered, otherwise everything is held.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use buffer::PendingEvent;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::{mpsc, watch};

mod link;
mod topic;

use link::{run_link, Link, Publication, Shared, STATUS};
pub use topic::render_topic;
use topic::{topic_fields, TopicTemplate};

use crate::pace::Pacer;
use crate::sink::{Sink, Verdict};
use crate::tls::{self, TlsSettings};

/// MQTT protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1: no reason codes; a broker that refuses a publish may
    /// still acknowledge it.
    V311,
    /// MQTT 5: reason codes, user properties, content type.
    V5,
}

/// MQTT sink settings.
#[derive(Clone, Debug)]
pub struct MqttSinkConfig {
    /// Broker host name (also the TLS server name).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Protocol version.
    pub version: MqttVersion,
    /// 1 or 2.
    pub qos: u8,
    /// Client id.
    pub client_id: String,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Start a clean session on every connect.
    pub clean_session: bool,
    /// MQTT 5 session expiry when the session is persistent.
    pub session_expiry: Duration,
    /// User name.
    pub username: Option<String>,
    /// Password (already read from its file).
    pub password: Option<String>,
    /// TLS, if on.
    pub tls: Option<TlsSettings>,
    /// Topic template: `{site}`, `{gateway}`, `{line}`, `{machine}`, `{type}`, `{source}`.
    pub topic: String,
    /// Status topic (already rendered): retained birth `online`, will `offline`.
    pub status_topic: String,
    /// Most unacknowledged publishes.
    pub inflight: u16,
    /// Pace: most publishes per second (`None`: unpaced).
    pub max_messages_per_second: Option<u32>,
    /// Give up waiting for an acknowledgement after this (the event is retried).
    pub ack_timeout: Duration,
    /// Site, for topics.
    pub site: String,
    /// Gateway, for topics and the status message.
    pub gateway: String,
    /// The payload from a template (default: the CloudEvent).
    pub payload: Option<crate::render::PayloadTemplate>,
}

/// Failures starting the sink.
#[derive(Debug, thiserror::Error)]
pub enum MqttSinkError {
    /// TLS material could not be loaded.
    #[error("MQTT sink TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// The MQTT sink.
pub struct MqttSink {
    config: MqttSinkConfig,
    topic_template: TopicTemplate,
    link: Arc<Link>,
    verdicts: mpsc::UnboundedReceiver<(u64, Verdict)>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    pace: Pacer,
    /// Current send window and the connection it was grown on.
    window: usize,
    window_generation: u64,
    /// A refused event (seq, topic, reason) with nothing accepted around it.
    suspect: Option<(u64, String, String)>,
    /// The broker refused an event publish before (a suspect or a dead
    /// letter).
    refusal_seen: bool,
    /// The broker accepted an event publish since the last refusal.
    accepted_since_refusal: bool,
    /// Topics whose refusal was found to be about them alone (others were
    /// accepted meanwhile): later refusals on them dead-letter at once.
    singled_out: HashSet<String>,
}

/// Most topics remembered as refused on their own (a bound on memory).
const MAX_SINGLED_OUT_TOPICS: usize = 1024;

fn status_payload(config: &MqttSinkConfig, state: &str) -> Vec<u8> {
    serde_json::json!({
        "state": state,
        "site": config.site,
        "gateway": config.gateway,
        "agent": "plant-edge",
        "version": env!("CARGO_PKG_VERSION"),
        "since": buffer::event::rfc3339_millis(std::time::SystemTime::now()),
    })
    .to_string()
    .into_bytes()
}

impl MqttSink {
    /// Starts the link task; connection happens in the background.
    pub fn start(config: MqttSinkConfig) -> Result<Self, MqttSinkError> {
        let tls = config.tls.as_ref().map(tls::client_config).transpose()?;
        let link = Arc::new(Link {
            shared: Mutex::new(Shared {
                client: None,
                fifo: VecDeque::new(),
            }),
            connected: watch::channel(false).0,
            generation: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            status_acked: tokio::sync::Notify::new(),
        });
        // Unbounded by type, bounded by construction: a verdict exists only
        // for a publish `deliver` made, at most `inflight` per call, and
        // each call drains what is queued (stale ones included) while it
        // waits. A bounded channel could deadlock: the link task would
        // block on send while the forwarder sleeps in its backoff.
        let (verdict_tx, verdicts) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_link(
            config.clone(),
            tls,
            link.clone(),
            verdict_tx,
            stop_rx,
        ));
        let pace = Pacer::new(config.max_messages_per_second);
        Ok(Self {
            topic_template: TopicTemplate::parse(&config.topic),
            config,
            link,
            verdicts,
            stop,
            task: Some(task),
            pace,
            window: 1,
            window_generation: 0,
            suspect: None,
            refusal_seen: false,
            accepted_since_refusal: false,
            singled_out: HashSet::new(),
        })
    }

    /// Remembers a topic refused on its own (bounded).
    fn single_out(&mut self, topic: String) {
        if self.singled_out.len() >= MAX_SINGLED_OUT_TOPICS {
            self.singled_out.clear();
        }
        self.singled_out.insert(topic);
    }

    /// Whether the broker connection is up.
    pub fn is_connected(&self) -> bool {
        *self.link.connected.borrow()
    }

    /// Commissioning: waits for the broker to accept the login, publishes
    /// the gateway's status ("online", retained, QoS 1) and waits for its
    /// acknowledgement. Proves address, TLS, credentials and the status
    /// topic's permission without sending any event.
    pub async fn confirm_status(&self, patience: Duration) -> Result<(), String> {
        let mut connected = self.link.connected.subscribe();
        let up = tokio::time::timeout(patience, connected.wait_for(|c| *c)).await;
        if !matches!(up, Ok(Ok(_))) {
            let why = self.link.last_error();
            return Err(if why.is_empty() {
                format!("no answer from the broker within {patience:?}")
            } else {
                why
            });
        }
        let acked = self.link.status_acked.notified();
        tokio::pin!(acked);
        acked.as_mut().enable();
        let online = Publication {
            topic: self.config.status_topic.clone(),
            payload: status_payload(&self.config, "online").into(),
            retain: true,
            properties: None,
        };
        self.link.publish(1, STATUS, online)?;
        tokio::time::timeout(patience, acked).await.map_err(|_| {
            format!(
                "the broker did not acknowledge a publish to {} within {patience:?} (not allowed on that topic?)",
                self.config.status_topic
            )
        })
    }

    /// The topic an event is published on.
    fn topic(&self, event: &PendingEvent) -> Result<String, String> {
        let fields = topic_fields(&event.payload)?;
        Ok(self
            .topic_template
            .render(&self.config.site, &self.config.gateway, &fields))
    }

    fn publication(&self, event: &PendingEvent) -> Result<Publication, String> {
        let fields = topic_fields(&event.payload)?;
        let topic = self
            .topic_template
            .render(&self.config.site, &self.config.gateway, &fields);
        let (payload, content_type) = match &self.config.payload {
            Some(template) => (
                Bytes::from(template.render(event)?),
                template.content_type.clone(),
            ),
            None => (
                Bytes::copy_from_slice(&event.payload),
                "application/cloudevents+json".to_owned(),
            ),
        };
        let properties = (self.config.version == MqttVersion::V5).then(|| PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some(content_type),
            user_properties: vec![
                // Written straight into the string, not through Display's
                // formatter: this runs for every publish.
                (
                    "ce_id".into(),
                    event
                        .id
                        .hyphenated()
                        .encode_lower(&mut uuid::Uuid::encode_buffer())
                        .to_owned(),
                ),
                ("ce_type".into(), fields.event_type.into_owned()),
                ("ce_source".into(), fields.source.into_owned()),
            ],
            ..PublishProperties::default()
        });
        Ok(Publication {
            topic,
            payload,
            retain: false,
            properties,
        })
    }
}

#[async_trait]
impl Sink for MqttSink {
    async fn deliver(&mut self, batch: &[PendingEvent]) -> Vec<Verdict> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; batch.len()];
        if !self.is_connected() {
            // Wait a little for the link rather than bouncing straight back
            // into the forwarder's backoff: delivery resumes as soon as the
            // broker is back, not a backoff period later.
            let mut connected = self.link.connected.subscribe();
            let patience = self.config.ack_timeout.min(Duration::from_secs(5));
            let up = tokio::time::timeout(patience, connected.wait_for(|c| *c)).await;
            if !matches!(up, Ok(Ok(_))) {
                let reason = self.link.last_error();
                return batch
                    .iter()
                    .map(|_| Verdict::retry(reason.clone()))
                    .collect();
            }
        }
        // Journal batches are in sequence order; a verdict finds its event
        // by binary search (per-event hash maps were a tenth of the sink's
        // CPU). Any other order still works, by a linear search.
        let sorted = batch.windows(2).all(|w| w[0].seq < w[1].seq);
        let position = |seq: u64| {
            if sorted {
                batch.binary_search_by_key(&seq, |e| e.seq).ok()
            } else {
                batch.iter().position(|e| e.seq == seq)
            }
        };
        // Published in this call and not answered yet; verdicts for
        // anything else (stale ones from an earlier call) are ignored.
        let mut in_flight = vec![false; batch.len()];
        let mut outstanding = 0usize;
        // Topics of what was published while some topic was singled out:
        // a delivery on it lifts that without parsing the event again.
        // Empty (and never filled) while nothing is singled out.
        let mut kept_topics: Vec<Option<String>> = Vec::new();
        let mut next = 0;
        let mut deadline = tokio::time::Instant::now() + self.config.ack_timeout;
        // Slow start on every new connection: some brokers (Mosquitto 2.0)
        // close the connection right after refusing a publish, and the
        // reset discards the acknowledgements still in flight; a small
        // window first keeps a refusal from costing a whole window each time.
        let generation = self.link.generation.load(Ordering::SeqCst);
        if generation != self.window_generation {
            self.window_generation = generation;
            self.window = 1;
        }
        let max_window = self.config.inflight.max(1) as usize;
        let mut stalled: Option<String> = None;
        let mut refused: Vec<usize> = Vec::new();
        let mut accepted = false;
        // A suspect at the head: try the events on other topics first.
        let probing = self
            .suspect
            .clone()
            .filter(|(seq, _, _)| batch.first().map(|e| e.seq) == Some(*seq));
        loop {
            // Behind a publish the broker asked us to repeat, the rest of
            // the batch waits (in order) for the next attempt.
            while next < batch.len() && outstanding < self.window && stalled.is_none() {
                let event = &batch[next];
                next += 1;
                let publication = match self.publication(event) {
                    Ok(p) => p,
                    Err(reason) => {
                        verdicts[next - 1] = Some(Verdict::Rejected { reason });
                        continue;
                    }
                };
                if let Some((_, topic, _)) = &probing {
                    if publication.topic == *topic {
                        verdicts[next - 1] =
                            Some(Verdict::retry("waiting behind a refused publish"));
                        continue;
                    }
                }
                let kept_topic = (!self.singled_out.is_empty()).then(|| publication.topic.clone());
                self.pace.wait(1).await;
                match self
                    .link
                    .publish(self.config.qos, Some(event.seq), publication)
                {
                    Ok(()) => {
                        in_flight[next - 1] = true;
                        outstanding += 1;
                        if let Some(topic) = kept_topic {
                            kept_topics.resize(batch.len(), None);
                            kept_topics[next - 1] = Some(topic);
                        }
                    }
                    Err(reason) => {
                        // Link gone: this and everything after it waits for
                        // the next attempt, in order.
                        for v in verdicts.iter_mut().skip(next - 1) {
                            v.get_or_insert_with(|| Verdict::retry(reason.clone()));
                        }
                        next = batch.len();
                    }
                }
            }
            if outstanding == 0 {
                break;
            }
            match tokio::time::timeout_at(deadline, self.verdicts.recv()).await {
                Ok(Some(first)) => {
                    // Everything already answered is taken in one wake-up
                    // before the window is refilled.
                    let mut answer = Some(first);
                    while let Some((seq, verdict)) = answer.take() {
                        answer = self.verdicts.try_recv().ok();
                        let Some(i) = position(seq).filter(|&i| in_flight[i]) else {
                            continue;
                        };
                        in_flight[i] = false;
                        outstanding -= 1;
                        match &verdict {
                            Verdict::Delivered => {
                                self.window = (self.window + 1).min(max_window);
                                accepted = true;
                                self.accepted_since_refusal = true;
                                if !self.singled_out.is_empty() {
                                    // Taken again (the ACL was fixed). An
                                    // event published before the first
                                    // refusal has no kept topic: parsed.
                                    let topic = kept_topics
                                        .get_mut(i)
                                        .and_then(Option::take)
                                        .or_else(|| self.topic(&batch[i]).ok());
                                    if let Some(topic) = topic {
                                        self.singled_out.remove(&topic);
                                    }
                                }
                            }
                            Verdict::Retry { reason, .. } => {
                                self.window = 1;
                                stalled.get_or_insert_with(|| reason.clone());
                            }
                            Verdict::Rejected { .. } => refused.push(i),
                            Verdict::Hold { .. } | Verdict::Pending { .. } => {}
                        }
                        verdicts[i] = Some(verdict);
                        // Progress: the timeout bounds silence, not the batch.
                        deadline = tokio::time::Instant::now() + self.config.ack_timeout;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        unacknowledged = outstanding,
                        "MQTT acknowledgements timed out; events will be re-sent"
                    );
                    break;
                }
            }
        }
        // Refusals single events out when the broker takes other publishes
        // around them: in this delivery, or between an earlier refusal and
        // these (a denied topic among allowed ones). A broker that stopped
        // taking anything (ACL revoked) shows neither.
        let others_accepted = accepted || (self.refusal_seen && self.accepted_since_refusal);
        if let Some((_, _, reason)) = &probing {
            let accepted = accepted || self.accepted_since_refusal;
            verdicts[0] = Some(if accepted {
                // Others on other topics were taken: the refusal is this
                // event's (its topic's) alone.
                Verdict::Rejected {
                    reason: reason.clone(),
                }
            } else {
                Verdict::Hold {
                    reason: reason.clone(),
                }
            });
            if accepted {
                if let Some((_, topic, _)) = self.suspect.take() {
                    self.single_out(topic);
                }
            }
        }
        // Topics are worked out again here, not kept per publish: refusals
        // are rare, publishes are not.
        let refused_topics: Vec<(usize, Option<String>)> = refused
            .iter()
            .map(|&i| {
                let kept = kept_topics.get_mut(i).and_then(Option::take);
                (i, kept.or_else(|| self.topic(&batch[i]).ok()))
            })
            .collect();
        if others_accepted {
            for (_, topic) in &refused_topics {
                if let Some(topic) = topic {
                    self.single_out(topic.clone());
                }
            }
        }
        if !refused.is_empty() && !others_accepted {
            // Nothing accepted around the refusals: the endpoint refuses,
            // unless a later attempt shows otherwise (or the topic was
            // already found refused on its own).
            let known = |topic: &Option<String>| {
                topic.as_ref().is_some_and(|t| self.singled_out.contains(t))
            };
            let first = refused_topics
                .iter()
                .filter(|(_, topic)| !known(topic))
                .map(|(i, _)| *i)
                .min();
            for (i, topic) in &refused_topics {
                let i = *i;
                if known(topic) {
                    continue;
                }
                if let Some(Verdict::Rejected { reason }) = verdicts[i].take() {
                    if Some(i) == first {
                        if let Some(topic) = topic {
                            self.suspect = Some((batch[i].seq, topic.clone(), reason.clone()));
                        }
                    }
                    verdicts[i] = Some(Verdict::Hold { reason });
                }
            }
        }
        if !refused.is_empty() {
            self.refusal_seen = true;
            self.accepted_since_refusal = false;
        }
        let unsent = match &stalled {
            Some(reason) => format!("waiting behind a publish to repeat ({reason})"),
            None => "no acknowledgement from the broker in time".to_owned(),
        };
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or_else(|| Verdict::retry(unsent.clone())))
            .collect()
    }

    async fn close(&mut self) {
        if self.is_connected() {
            let offline = Publication {
                topic: self.config.status_topic.clone(),
                payload: status_payload(&self.config, "offline").into(),
                retain: true,
                properties: None,
            };
            if self.link.publish(1, STATUS, offline).is_ok() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), self.link.status_acked.notified())
                        .await;
            }
            if let Some(client) = self.link.lock().client.as_ref() {
                client.try_disconnect();
            }
        }
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::link::puback_verdict;
    use super::*;
    use rumqttc::v5::mqttbytes::v5::PubAckReason;

    #[test]
    fn topic_template_takes_fields_from_the_event_and_sanitises_levels() {
        let payload = br#"{"type":"production.scrap","source":"urn:plant-edge:p1:gw:press1","data":{"site":"p1","line":"L1/A","machine":"m#1"}}"#;
        let topic = render_topic(
            "plants/{site}/{line}/{machine}/{type}/{source}",
            "x",
            "gw",
            payload,
        )
        .expect("render");
        assert_eq!(topic, "plants/p1/L1_A/m_1/production.scrap/press1");
    }

    #[test]
    fn a_field_value_is_never_read_as_a_placeholder_and_unknown_braces_stay() {
        let payload = br#"{"type":"production.completion","source":"urn:plant-edge:p1:gw:press1","data":{"line":"{type}","machine":""}}"#;
        let topic = render_topic(
            "{gateway}/{line}/{machine}/{other}/{type}{",
            "p1",
            "gw 1",
            payload,
        )
        .expect("render");
        assert_eq!(topic, "gw 1/{type}/_/{other}/production.completion{");
        let escaped = br#"{"type":"production.scrap","source":"urn:x:\"q\"","data":{"site":"Pl\u00e4nt","line":"L1"}}"#;
        let topic = render_topic("{site}/{line}/{source}", "x", "gw", escaped).expect("render");
        assert_eq!(topic, "Pl\u{e4}nt/L1/\"q\"");
    }

    #[test]
    fn refusals_dead_letter_but_quota_retries() {
        assert!(
            matches!(puback_verdict(&PubAckReason::NotAuthorized), Err((false, r)) if r.contains("0x87"))
        );
        assert!(matches!(
            puback_verdict(&PubAckReason::QuotaExceeded),
            Err((true, _))
        ));
        assert!(puback_verdict(&PubAckReason::NoMatchingSubscribers).is_ok());
    }
}
