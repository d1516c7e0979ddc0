//! MQTT topics from a template: `{site}`, `{line}`, `{machine}`, `{type}`,
//! `{source}` and `{gateway}` filled from the event, each level sanitised
//! so that no value adds a level or a wildcard.

use std::borrow::Cow;

#[derive(serde::Deserialize)]
pub(super) struct TopicFields<'a> {
    #[serde(rename = "type", borrow)]
    pub(super) event_type: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) source: Cow<'a, str>,
    #[serde(borrow)]
    data: TopicData<'a>,
}

#[derive(serde::Deserialize)]
struct TopicData<'a> {
    #[serde(default, borrow)]
    site: Cow<'a, str>,
    #[serde(default, borrow)]
    line: Cow<'a, str>,
    #[serde(default, borrow)]
    machine: Cow<'a, str>,
}

/// The envelope fields topics and properties are made of.
pub(super) fn topic_fields(payload: &[u8]) -> Result<TopicFields<'_>, String> {
    serde_json::from_slice(payload).map_err(|e| format!("payload is not a CloudEvent: {e}"))
}

/// One piece of a topic template.
#[derive(Clone, Debug, PartialEq)]
enum TopicPart {
    Text(String),
    Site,
    Gateway,
    Line,
    Machine,
    Type,
    Source,
}

/// A topic template split once into text and fields, so rendering a topic
/// is one pass and one allocation per publish. A field's value never
/// becomes a placeholder itself (a line named `{type}` stays that text).
#[derive(Clone, Debug)]
pub(super) struct TopicTemplate {
    parts: Vec<TopicPart>,
}

impl TopicTemplate {
    pub(super) fn parse(template: &str) -> Self {
        const FIELDS: [(&str, TopicPart); 6] = [
            ("{site}", TopicPart::Site),
            ("{gateway}", TopicPart::Gateway),
            ("{line}", TopicPart::Line),
            ("{machine}", TopicPart::Machine),
            ("{type}", TopicPart::Type),
            ("{source}", TopicPart::Source),
        ];
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            rest = &rest[open..];
            match FIELDS.iter().find(|(name, _)| rest.starts_with(name)) {
                Some((name, part)) => {
                    if !text.is_empty() {
                        parts.push(TopicPart::Text(std::mem::take(&mut text)));
                    }
                    parts.push(part.clone());
                    rest = &rest[name.len()..];
                }
                None => {
                    text.push('{');
                    rest = &rest[1..];
                }
            }
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(TopicPart::Text(text));
        }
        Self { parts }
    }

    pub(super) fn render(&self, site: &str, gateway: &str, fields: &TopicFields<'_>) -> String {
        let site = if fields.data.site.is_empty() {
            site
        } else {
            &fields.data.site
        };
        let source_name = fields.source.rsplit(':').next().unwrap_or("");
        let mut topic = String::with_capacity(64);
        for part in &self.parts {
            let value = match part {
                TopicPart::Text(text) => {
                    topic.push_str(text);
                    continue;
                }
                TopicPart::Site => site,
                TopicPart::Gateway => gateway,
                TopicPart::Line => &fields.data.line,
                TopicPart::Machine => &fields.data.machine,
                TopicPart::Type => &fields.event_type,
                TopicPart::Source => source_name,
            };
            push_level(&mut topic, value);
        }
        topic
    }
}

/// A topic level must not contain `/`, `+`, `#` or NUL, nor be empty.
fn push_level(topic: &mut String, value: &str) {
    if value.is_empty() {
        topic.push('_');
        return;
    }
    topic.extend(value.chars().map(|c| {
        if matches!(c, '/' | '+' | '#' | '\0') {
            '_'
        } else {
            c
        }
    }));
}

/// Renders a topic template for one event.
pub fn render_topic(
    template: &str,
    site: &str,
    gateway: &str,
    payload: &[u8],
) -> Result<String, String> {
    Ok(TopicTemplate::parse(template).render(site, gateway, &topic_fields(payload)?))
}
