//! `plant-edge status`: what a running agent says about itself, as one
//! screen an OT engineer reads at a glance (or its JSON with `--json`).

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::Config;

/// Asks the agent named by `config` and prints its status.
pub async fn status(config: Config, json: bool) -> anyhow::Result<()> {
    let addr = config.metrics_listen.ok_or_else(|| {
        anyhow::anyhow!(
            "agent.metrics_listen is off in {}: no endpoint to ask",
            config.file.display()
        )
    })?;
    let url = format!("http://{addr}/status");
    let body = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("no agent answering at {url} ({e}); is plant-edge running?"))?
        .text()
        .await?;
    let value: serde_json::Value = serde_json::from_str(&body)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", summary(&value));
    }
    Ok(())
}

fn ago(now: u64, then: &serde_json::Value) -> String {
    match then.as_u64() {
        Some(t) if t > 0 => human(Duration::from_secs(now.saturating_sub(t))) + " ago",
        _ => "never".into(),
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

fn mib(bytes: &serde_json::Value) -> String {
    format!(
        "{:.1} MiB",
        bytes.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
    )
}

/// The one-screen text for a `/status` answer.
pub fn summary(v: &serde_json::Value) -> String {
    let now = v["now"].as_u64().unwrap_or(0);
    let mut out = String::new();
    let ready = v["ready"].as_str().unwrap_or("?");
    let _ = writeln!(
        out,
        "plant-edge {}: {}",
        v["version"].as_str().unwrap_or("?"),
        if ready == "ready" {
            "READY".to_owned()
        } else {
            format!("NOT READY: {ready}")
        }
    );
    let _ = writeln!(
        out,
        "journal: {} events pending (oldest {}), {} of {} used{}, {} dead letters",
        v["pending_events"],
        human(Duration::from_secs(
            v["oldest_pending_age_s"].as_u64().unwrap_or(0)
        )),
        mib(&v["used_bytes"]),
        mib(&v["max_bytes"]),
        if v["full"].as_bool() == Some(true) {
            " (FULL: business sources wait)"
        } else {
            ""
        },
        v["dead_letters"],
    );
    let _ = writeln!(out, "\nsources:");
    for s in v["sources"].as_array().into_iter().flatten() {
        let state = match (s["up"].as_bool(), s["connected"].as_bool()) {
            (Some(false), _) => "DOWN",
            (_, Some(false)) => "unreachable",
            _ => "up",
        };
        let schedule = match (
            s["schedule"]["configured_ms"].as_u64(),
            s["schedule"]["achieved_ms"].as_f64(),
        ) {
            (Some(c), Some(a)) => format!("  poll {c} ms / achieved {a} ms"),
            (Some(c), None) => format!("  poll {c} ms"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<8} {:<11} {:>8} events, last {}{}{}",
            s["source"].as_str().unwrap_or("?"),
            s["kind"].as_str().unwrap_or(""),
            state,
            s["events"].as_u64().unwrap_or(0),
            ago(now, &s["last_event"]),
            schedule,
            s["last_failure"]
                .as_str()
                .map(|f| format!("\n  {:<16} last failure: {f}", ""))
                .unwrap_or_default(),
        );
    }
    let _ = writeln!(out, "\nsinks:");
    for s in v["sinks"].as_array().into_iter().flatten() {
        let state = if s["configured"].as_bool() == Some(false) {
            "NOT CONFIGURED"
        } else if !s["holding"].is_null() {
            "HELD"
        } else if !s["retrying"].is_null() {
            "retrying"
        } else if !s["accepted_pending"].is_null() {
            "accepted-pending"
        } else {
            "up"
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<16} backlog {:>8}  delivered {:>8}  dead letters {:>5}  last delivery {}",
            s["sink"].as_str().unwrap_or("?"),
            state,
            s["backlog"].as_u64().unwrap_or(0),
            s["delivered"].as_u64().unwrap_or(0),
            s["rejected"].as_u64().unwrap_or(0),
            ago(now, &s["last_delivery"]),
        );
        let why = s["holding"]
            .as_str()
            .or(s["retrying"].as_str())
            .map(str::to_owned)
            .or_else(|| {
                let p = &s["accepted_pending"];
                (!p.is_null()).then(|| {
                    format!(
                        "{} accepted by the ERP, not booked yet ({} overdue, oldest {} s): {}",
                        p["events"],
                        p["overdue"],
                        p["oldest_age_s"],
                        p["state"].as_str().unwrap_or("")
                    )
                })
            });
        if let Some(why) = why {
            let _ = writeln!(out, "  {:<16} {why}", "");
        }
    }
    let lines = v["lines"]
        .as_array()
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    if !lines.is_empty() {
        let _ = writeln!(out, "\nlines (parts per period, from = start in UTC):");
        let _ = writeln!(
            out,
            "  {:<12} {:<7} {:>5}  {:>9} {:>9} {:>9} {:>9} {:>6} {:>6}",
            "line", "period", "from", "counted", "sent", "delivered", "pending", "dead", "diff"
        );
        for l in lines {
            for (label, p) in [("current", &l["current"]), ("last", &l["last"])] {
                if p.is_null() {
                    continue;
                }
                let n = |key: &str| p[key].as_f64().unwrap_or(0.0);
                let _ = writeln!(
                    out,
                    "  {:<12} {:<7} {:>5}  {:>9} {:>9} {:>9} {:>9} {:>6} {:>6}{}",
                    l["line"].as_str().unwrap_or("?"),
                    label,
                    period_start(p),
                    n("counted"),
                    n("sent"),
                    n("delivered"),
                    n("pending"),
                    n("dead_lettered"),
                    n("difference"),
                    if p["bridged"] == true {
                        "  (across an outage)"
                    } else {
                        ""
                    },
                );
            }
        }
    }
    out
}

/// When a period started, as the hour and minute in UTC (the report gives
/// the plant's zone).
fn period_start(p: &serde_json::Value) -> String {
    let start = p["start_ms"].as_u64().unwrap_or(0) / 1000;
    format!("{:02}:{:02}", (start / 3600) % 24, (start / 60) % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_sink_and_a_down_source_are_named_with_their_reason_on_one_screen() {
        let v = serde_json::json!({
            "now": 1000, "version": "0.1.0", "ready": "sink erp held: HTTP 403",
            "pending_events": 120, "oldest_pending_age_s": 300, "used_bytes": 1048576,
            "max_bytes": 1073741824u64, "full": false, "dead_letters": 2,
            "sources": [{"source": "press1", "kind": "modbus", "up": true, "connected": false,
                         "events": 40, "last_event": 990, "last_failure": null,
                         "schedule": {"configured_ms": 100, "achieved_ms": 100.2}}],
            "sinks": [{"sink": "erp", "configured": true, "holding": "HTTP 403: access revoked",
                       "retrying": null, "accepted_pending": null, "backlog": 120,
                       "delivered": 5, "rejected": 2, "last_delivery": 700}],
            "lines": [{"source": "press1", "line": "L1",
                       "current": {"start_ms": 21_600_000u64, "counted": 120.0, "sent": 120.0,
                                   "delivered": 0.0, "pending": 120.0, "dead_lettered": 0.0,
                                   "difference": 0.0, "bridged": false},
                       "last": null}]
        });
        let text = summary(&v);
        assert!(
            text.starts_with("plant-edge 0.1.0: NOT READY: sink erp held: HTTP 403\n"),
            "{text}"
        );
        assert!(text.contains("120 events pending (oldest 5 min)"), "{text}");
        assert!(
            text.contains("press1")
                && text.contains("unreachable")
                && text.contains("poll 100 ms / achieved 100.2 ms"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.contains("L1") && l.contains("06:00") && l.contains("120")),
            "{text}"
        );
        assert!(
            text.contains("erp")
                && text.contains("HELD")
                && text.contains("HTTP 403: access revoked"),
            "{text}"
        );
        assert!(text.lines().count() <= 24, "one screen: {text}");
    }
}
