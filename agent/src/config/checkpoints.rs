//! `[checkpoints]`: the reconciliation periods every source closes with a
//! `production.checkpoint` event per line.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protocols::period::PeriodRule;
use serde::Deserialize;

use super::{keyed, ConfigError};

/// The table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheckpoints {
    /// Local shift start times, `["06:00", "14:00", "22:00"]`.
    #[serde(default)]
    shifts: Vec<String>,
    /// IANA zone of the shift times.
    #[serde(default)]
    time_zone: Option<String>,
    /// Fixed period instead of shifts (`"1h"`), aligned to UTC.
    #[serde(default, with = "humantime_serde")]
    every: Option<Duration>,
    /// Sinks that take checkpoint events (default: those sending
    /// CloudEvents).
    #[serde(default)]
    sinks: Option<Vec<String>>,
}

/// Checkpoints as checked.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    /// The periods.
    pub rule: Arc<PeriodRule>,
    /// Sinks their events go to (each source's own sinks among them).
    pub sinks: Vec<String>,
}

/// The checkpoints, `None` without a `[checkpoints]` table. `sinks` are
/// the configured ones: a templated sink (an ERP's own body) takes
/// checkpoints only when named, since a template written for completions
/// would post a period's total as one more completion.
pub(super) fn check(
    file: &Path,
    raw: Option<RawCheckpoints>,
    sinks: &[super::SinkConfig],
) -> Result<Option<Checkpoints>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let err = keyed(file, "checkpoints");
    let rule = match (raw.shifts.is_empty(), raw.every) {
        (false, Some(_)) => {
            return Err(err(
                "every",
                "either shifts (with time_zone) or every, not both".into(),
            ))
        }
        (true, None) => {
            return Err(err(
                "shifts",
                "shift start times such as [\"06:00\", \"14:00\", \"22:00\"] with time_zone, or every = \"1h\"".into(),
            ))
        }
        (true, Some(every)) => {
            // Whole seconds: a counter window (which divides a second)
            // then never spans a period's end.
            if every < Duration::from_secs(1)
                || every > Duration::from_secs(7 * 86_400)
                || every.subsec_nanos() != 0
            {
                return Err(err(
                    "every",
                    "a whole number of seconds between 1s and 7days".into(),
                ));
            }
            PeriodRule::Every(every)
        }
        (false, None) => {
            let zone = raw.time_zone.as_deref().ok_or_else(|| {
                err(
                    "time_zone",
                    "the IANA time zone of the shift times, such as \"Europe/Berlin\"".into(),
                )
            })?;
            PeriodRule::shifts(&raw.shifts, zone).map_err(|e| {
                let key = if e.contains("IANA") { "time_zone" } else { "shifts" };
                err(key, e)
            })?
        }
    };
    let names = match raw.sinks {
        Some(names) => {
            for name in &names {
                if !sinks.iter().any(|s| &s.name == name) {
                    return Err(err(
                        "sinks",
                        format!("names of configured sinks; {name:?} is not one"),
                    ));
                }
            }
            names
        }
        None => sinks
            .iter()
            .filter(|s| sends_cloudevents(&s.kind))
            .map(|s| s.name.clone())
            .collect(),
    };
    Ok(Some(Checkpoints {
        rule: Arc::new(rule),
        sinks: names,
    }))
}

/// Whether a sink sends events as CloudEvents (no body template).
fn sends_cloudevents(kind: &super::SinkKind) -> bool {
    match kind {
        super::SinkKind::File(_) => true,
        super::SinkKind::Mqtt(m) => m.payload.is_none(),
        super::SinkKind::Https(h) => !h.profile.templated_body,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use super::super::tests::MINIMAL;

    #[test]
    fn an_erp_template_takes_checkpoints_only_when_named() {
        let sinks = r#"
[sinks.erp]
kind = "https"
url = "https://erp.example.com/confirmations"
mode = "single"
[sinks.erp.request]
body = '{"id": {{ id }}, "qty": {{ quantity }}}'

[sinks.cloud]
kind = "https"
url = "https://cloud.example.com/events"
"#;
        let default = parse(&format!(
            "{MINIMAL}{sinks}\n[checkpoints]\nevery = \"1h\"\n"
        ))
        .expect("valid");
        let names = default.checkpoints.expect("on").sinks;
        assert!(names.contains(&"cloud".to_owned()), "{names:?}");
        assert!(
            !names.contains(&"erp".to_owned()),
            "a templated sink is left out: {names:?}"
        );
        let named = parse(&format!(
            "{MINIMAL}{sinks}\n[checkpoints]\nevery = \"1h\"\nsinks = [\"erp\"]\n"
        ))
        .expect("valid");
        assert_eq!(named.checkpoints.expect("on").sinks, vec!["erp".to_owned()]);
    }

    #[test]
    fn shifts_need_a_zone_and_bad_values_name_their_key() {
        let ok = parse(&format!(
            "{MINIMAL}\n[checkpoints]\nshifts = [\"06:00\", \"14:00\", \"22:00\"]\ntime_zone = \"Europe/Berlin\"\n"
        ))
        .expect("valid");
        assert!(ok.checkpoints.is_some());
        for (table, key) in [
            ("shifts = [\"06:00\"]", "checkpoints.time_zone"),
            (
                "shifts = [\"6 Uhr\"]\ntime_zone = \"Europe/Berlin\"",
                "checkpoints.shifts",
            ),
            (
                "shifts = [\"06:00\"]\ntime_zone = \"Europe/Bonn\"",
                "checkpoints.time_zone",
            ),
            ("every = \"0s\"", "checkpoints.every"),
            ("every = \"1500ms\"", "checkpoints.every"),
            ("", "checkpoints.shifts"),
        ] {
            let e = parse(&format!("{MINIMAL}\n[checkpoints]\n{table}\n")).expect_err(table);
            assert_eq!(e.key, key, "{e}");
        }
        assert!(parse(MINIMAL).expect("valid").checkpoints.is_none());
        let e = parse(&format!(
            "{MINIMAL}\n[checkpoints]\nevery = \"1h\"\nsinks = [\"nope\"]\n"
        ))
        .expect_err("unknown sink");
        assert_eq!(e.key, "checkpoints.sinks", "{e}");
    }
}
