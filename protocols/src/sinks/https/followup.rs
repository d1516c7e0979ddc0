//! Following up what the ERP took but has not booked (accepted-pending,
//! polled at its status URL) and asking about events in doubt (lookups)
//! before they are posted again.

use std::time::{Instant, SystemTime};

use buffer::PendingEvent;
use minijinja::value::Value;

use super::erp::{self, Meaning};
use super::{HttpsSink, Ticket, MAX_REMEMBERED};
use crate::sink::Verdict;

impl HttpsSink {
    /// Remembers an accepted-pending event and says so.
    pub(super) fn accept_pending(
        &mut self,
        event: &PendingEvent,
        state: String,
        location: Option<String>,
        answer: serde_json::Value,
    ) -> Verdict {
        let Some(poll) = self.config.profile.pending.clone() else {
            return Verdict::Hold {
                reason:
                    "the ERP answered accepted-pending and no [pending] rule says how to follow it"
                        .into(),
            };
        };
        let status_url = crate::render::event_value(event)
            .map(|value| {
                crate::render::single_context(
                    &value,
                    &[
                        (
                            "location",
                            Value::from(location.clone().unwrap_or_default()),
                        ),
                        ("answer", Value::from(minijinja::value::Serde(&answer))),
                    ],
                )
            })
            .and_then(|c| {
                self.config
                    .profile
                    .templates
                    .render(erp::keys::PENDING_URL, &c)
                    .map_err(|e| e.to_string())
            })
            .and_then(|rendered| self.resolve(&rendered));
        let status_url = match status_url {
            Ok(url) => url,
            Err(why) => {
                self.doubt.insert(event.id);
                return Verdict::Hold {
                    reason: format!("accepted-pending, but its status URL does not render: {why}"),
                };
            }
        };
        if self.pending.len() >= MAX_REMEMBERED {
            return Verdict::Hold {
                reason: format!("more than {MAX_REMEMBERED} events accepted-pending"),
            };
        }
        let since = SystemTime::now();
        tracing::info!(event = %event.id, state = %state, status_url = %status_url, "accepted by the ERP, not booked yet; following its status");
        self.pending.insert(
            event.id,
            Ticket {
                status_url,
                since,
                next_poll: Instant::now() + poll.poll_every,
                state: state.clone(),
                alarmed: false,
            },
        );
        self.doubt.remove(&event.id);
        Verdict::Pending {
            since,
            after: poll.poll_every,
            overdue: false,
            reason: format!("accepted by the ERP, not booked yet ({state})"),
        }
    }

    /// An accepted-pending event: asks its status when due.
    pub(super) async fn follow_pending(&mut self, event: &PendingEvent) -> Verdict {
        let Some(poll) = self.config.profile.pending.clone() else {
            return Verdict::retry("pending without a rule");
        };
        let Some(ticket) = self.pending.get(&event.id).cloned() else {
            return Verdict::retry("not pending");
        };
        let now = Instant::now();
        let mut state = ticket.state.clone();
        if ticket.next_poll <= now {
            match self.get_json(&ticket.status_url).await {
                Ok(Some(answer)) => match poll.rule.meaning(&answer) {
                    Some(Meaning::Booked) => {
                        self.pending.remove(&event.id);
                        tracing::info!(event = %event.id, "the ERP booked the accepted event");
                        return Verdict::Delivered;
                    }
                    Some(Meaning::Refused(message)) => {
                        self.pending.remove(&event.id);
                        return Verdict::Rejected {
                            reason: format!("accepted, then failed in the ERP: {message}"),
                        };
                    }
                    Some(Meaning::Pending(s)) | Some(Meaning::Doubt(s)) => state = s,
                    None => {}
                },
                Ok(None) => state = "status not found yet".into(),
                Err(e) => {
                    tracing::debug!(event = %event.id, error = %e, "asking the ERP for a pending event's status failed")
                }
            }
        }
        let age = SystemTime::now()
            .duration_since(ticket.since)
            .unwrap_or_default();
        let overdue = age >= poll.alarm_after;
        if let Some(t) = self.pending.get_mut(&event.id) {
            if t.next_poll <= now {
                t.next_poll = now + poll.poll_every;
            }
            t.state = state.clone();
            if overdue && !t.alarmed {
                t.alarmed = true;
                tracing::error!(event = %event.id, age = %crate::pace::human(age), state = %state, status_url = %t.status_url, "ACCEPTED BUT NOT BOOKED: the ERP has not booked an accepted event within alarm_after; it stays in the journal and is followed");
            }
        }
        let after = self
            .pending
            .get(&event.id)
            .map(|t| t.next_poll.saturating_duration_since(Instant::now()))
            .unwrap_or(poll.poll_every);
        Verdict::Pending {
            since: ticket.since,
            after,
            overdue,
            reason: format!("accepted by the ERP, not booked yet ({state})"),
        }
    }

    /// Asks the ERP whether `event` is booked. `Ok(None)`: not there, post it.
    pub(super) async fn look_up(
        &mut self,
        event: &PendingEvent,
    ) -> Result<Option<Verdict>, String> {
        let Some(lookup) = self.config.profile.lookup.clone() else {
            return Ok(None);
        };
        let value = crate::render::event_value(event)?;
        let url = self
            .config
            .profile
            .templates
            .render(
                erp::keys::LOOKUP_URL,
                &crate::render::single_context(&value, &[]),
            )
            .map_err(|e| e.to_string())?;
        let url = self.resolve(&url)?;
        let body = if self.config.profile.templates.has(erp::keys::LOOKUP_BODY) {
            Some(
                self.config
                    .profile
                    .templates
                    .render(
                        erp::keys::LOOKUP_BODY,
                        &crate::render::single_context(&value, &[]),
                    )
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let Some(answer) = self.ask_json(&url, body).await? else {
            return Ok(None);
        };
        Ok(match lookup.meaning(&answer) {
            Meaning::Booked => {
                tracing::info!(event = %event.id, "the lookup found the event already booked; not posting it again");
                Some(Verdict::Delivered)
            }
            Meaning::Refused(message) => Some(Verdict::Rejected {
                reason: format!("the ERP has it as failed: {message}"),
            }),
            Meaning::Pending(state) => Some(self.accept_pending(event, state, None, answer)),
            Meaning::Doubt(_) => None,
        })
    }
}
