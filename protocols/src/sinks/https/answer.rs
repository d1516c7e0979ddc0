//! Reading a 2xx the way the ERP means it: one outcome per event of the
//! request (booked, refused with the ERP's message, accepted-pending, or
//! doubt), from the profile's answer rules and OData `$batch` parts.

use std::collections::HashMap;

use buffer::PendingEvent;
use reqwest::StatusCode;

use super::erp::{BatchShape, Meaning};
use super::{odata, HttpsMode, HttpsSink, Outcome, Sent};

impl HttpsSink {
    /// What a 2xx says about each event of the request.
    pub(super) fn judge_success(
        &self,
        status: StatusCode,
        location: Option<String>,
        answer_type: &str,
        bytes: &[u8],
        events: &[PendingEvent],
    ) -> Sent {
        let profile = &self.config.profile;
        let rules = &profile.answer;
        let all = |outcome: Outcome| Sent::PerEvent(vec![outcome; events.len()]);
        let json = || serde_json::from_slice::<serde_json::Value>(bytes);
        if rules.pending_statuses.contains(&status.as_u16()) {
            return all(Outcome::Pending {
                state: format!("HTTP {}", status.as_u16()),
                location,
                answer: json().unwrap_or(serde_json::Value::Null),
            });
        }
        let multipart = profile.batch == BatchShape::Odata
            && !(matches!(self.config.mode, HttpsMode::Single) && events.len() == 1);
        if multipart {
            let text = String::from_utf8_lossy(bytes);
            let Some(parts) = odata::parse(answer_type, &text) else {
                return all(Outcome::Doubt(format!(
                    "HTTP {}: the $batch answer is not a multipart answer ({answer_type:?})",
                    status.as_u16()
                )));
            };
            if parts.len() != events.len() {
                return all(Outcome::Doubt(format!(
                    "the $batch answer has {} changeset answers for {} changesets",
                    parts.len(),
                    events.len()
                )));
            }
            return Sent::PerEvent(
                parts
                    .into_iter()
                    .map(|part| {
                        let message = || {
                            serde_json::from_str::<serde_json::Value>(&part.body)
                                .ok()
                                .and_then(|v| rules.state.message(&v))
                                .unwrap_or_else(|| part.body.chars().take(200).collect())
                        };
                        match part.status {
                            200..=299 => Outcome::Booked,
                            408 | 425 | 429 | 500..=599 => Outcome::Later(format!(
                                "changeset HTTP {}: {}",
                                part.status,
                                message()
                            )),
                            s => Outcome::Refused(format!("HTTP {s}: {}", message())),
                        }
                    })
                    .collect(),
            );
        }
        if !rules.reads_body() {
            return Sent::Ok;
        }
        let body = match json() {
            Ok(body) => body,
            Err(e) => {
                return all(Outcome::Doubt(format!(
                    "HTTP {}: the answer is not JSON ({e}); the rules cannot tell whether it was booked",
                    status.as_u16()
                )))
            }
        };
        if let Some(error) = &rules.error {
            if error.find(&body).is_some() {
                let message = rules
                    .state
                    .message(&body)
                    .or_else(|| error.text(&body))
                    .unwrap_or_default();
                return Sent::Refused(format!("HTTP {} with an error: {message}", status.as_u16()));
            }
        }
        let to_outcome = |meaning: Meaning, answer: &serde_json::Value| match meaning {
            Meaning::Booked => Outcome::Booked,
            Meaning::Refused(m) => Outcome::Refused(m),
            Meaning::Pending(state) => Outcome::Pending {
                state,
                location: location.clone(),
                answer: answer.clone(),
            },
            Meaning::Doubt(why) => Outcome::Doubt(why),
        };
        if let Some(items) = &rules.items {
            let Some(serde_json::Value::Array(list)) = items.find(&body) else {
                return all(Outcome::Doubt(format!(
                    "no list of results at {}",
                    items.as_str()
                )));
            };
            let by_key: Option<HashMap<String, &serde_json::Value>> =
                rules.item_key.as_ref().map(|k| {
                    list.iter()
                        .filter_map(|item| k.text(item).map(|key| (key, item)))
                        .collect()
                });
            if by_key.is_none() && list.len() != events.len() {
                return all(Outcome::Doubt(format!(
                    "{} results for {} events",
                    list.len(),
                    events.len()
                )));
            }
            return Sent::PerEvent(
                events
                    .iter()
                    .enumerate()
                    .map(|(i, event)| {
                        let item = match &by_key {
                            Some(map) => map.get(&event.id.to_string()).copied(),
                            None => list.get(i),
                        };
                        match item {
                            None => Outcome::Doubt(format!(
                                "the answer has no result for event {}",
                                event.id
                            )),
                            Some(item) => match rules.state.meaning(item) {
                                Some(meaning) => to_outcome(meaning, item),
                                None => Outcome::Doubt("no item state rule".into()),
                            },
                        }
                    })
                    .collect(),
            );
        }
        match rules.state.meaning(&body) {
            Some(Meaning::Refused(m)) => Sent::Refused(m),
            Some(meaning) => all(to_outcome(meaning, &body)),
            None => Sent::Ok,
        }
    }
}
