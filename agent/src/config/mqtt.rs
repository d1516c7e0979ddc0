//! `kind = "mqtt"` sinks: raw config, defaults and checks.

use super::*;

pub(super) fn default_mqtt_protocol() -> String {
    "5".into()
}

pub(super) fn default_qos() -> u8 {
    1
}

pub(super) fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

pub(super) fn default_session_expiry() -> Duration {
    Duration::from_secs(3600)
}

pub(super) fn default_mqtt_topic() -> String {
    "plants/{site}/{line}/{type}".into()
}

pub(super) fn default_status_topic() -> String {
    "plants/{site}/{gateway}/status".into()
}

pub(super) fn default_inflight() -> u16 {
    100
}

pub(super) fn default_mqtt_rate() -> u32 {
    2000
}

pub(super) fn default_ack_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMqttSink {
    host: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default = "default_mqtt_protocol")]
    protocol: String,
    #[serde(default = "default_qos")]
    qos: u8,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    keep_alive: Duration,
    #[serde(default)]
    clean_session: Option<bool>,
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    session_expiry: Duration,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    tls: Option<bool>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    client_cert: Option<PathBuf>,
    #[serde(default)]
    client_key: Option<PathBuf>,
    #[serde(default)]
    alpn: Vec<String>,
    #[serde(default = "default_mqtt_topic")]
    topic: String,
    #[serde(default = "default_status_topic")]
    status_topic: String,
    #[serde(default = "default_inflight")]
    inflight: u16,
    #[serde(default = "default_mqtt_rate")]
    max_messages_per_second: u32,
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    ack_timeout: Duration,
    #[serde(default)]
    payload: Option<protocols::render::PayloadConfig>,
}

pub(super) fn check_mqtt(
    file: &Path,
    key: &str,
    m: RawMqttSink,
    agent: &RawAgent,
) -> Result<MqttSinkConfig, ConfigError> {
    let err = keyed(file, key);
    if m.host.trim().is_empty() {
        return Err(err("host", "a broker host name or address".into()));
    }
    let version = match m.protocol.as_str() {
        "5" | "5.0" => MqttVersion::V5,
        "3.1.1" | "4" => MqttVersion::V311,
        other => {
            return Err(err(
                "protocol",
                format!("\"5\" or \"3.1.1\", found {other:?}"),
            ))
        }
    };
    match m.qos {
        1 | 2 => {}
        0 => {
            return Err(err(
                "qos",
                "1 or 2: QoS 0 has no acknowledgement, so completions and scrap could be lost"
                    .into(),
            ))
        }
        other => return Err(err("qos", format!("1 or 2, found {other}"))),
    }
    let clean_session = m.clean_session.unwrap_or(m.qos == 2);
    if m.qos == 2 && !clean_session {
        return Err(err(
            "clean_session",
            "true with qos = 2: unconfirmed events are re-sent from the journal with new packet ids, \
             which a persistent QoS 2 session could discard as duplicates"
                .into(),
        ));
    }
    let tls_on = m.tls.unwrap_or(!is_loopback(&m.host));
    if !tls_on && (m.ca_file.is_some() || m.client_cert.is_some() || m.client_key.is_some()) {
        return Err(err(
            "tls",
            "true when ca_file, client_cert or client_key is set".into(),
        ));
    }
    check_tls_files(&m.ca_file, &m.client_cert, &m.client_key)
        .map_err(|(sub, why)| err(sub, why))?;
    let password = match &m.password_file {
        Some(path) => Some(read_secret(file, path).map_err(|why| {
            err(
                "password_file",
                format!("a readable file holding the password ({why})"),
            )
        })?),
        None => None,
    };
    if password.is_some() && m.username.is_none() {
        return Err(err("username", "set when password_file is set".into()));
    }
    if m.topic.contains('#') || m.topic.contains('+') || m.topic.is_empty() {
        return Err(err(
            "topic",
            "a topic template without wildcards, e.g. \"plants/{site}/{line}/{type}\"".into(),
        ));
    }
    if m.inflight == 0 || m.inflight > 1000 {
        return Err(err(
            "inflight",
            format!("between 1 and 1000, found {}", m.inflight),
        ));
    }
    if m.keep_alive < Duration::from_secs(5) {
        return Err(err("keep_alive", "at least 5s".into()));
    }
    let status_topic = m
        .status_topic
        .replace("{site}", &agent.site)
        .replace("{gateway}", &agent.gateway);
    let payload = m
        .payload
        .map(|p| p.check(file.parent().unwrap_or(Path::new("."))))
        .transpose()
        .map_err(|(sub, expected)| keyed::<String>(file, key)(sub, expected))?;
    Ok(MqttSinkConfig {
        port: m.port.unwrap_or(if tls_on { 8883 } else { 1883 }),
        host: m.host,
        version,
        qos: m.qos,
        client_id: m
            .client_id
            .unwrap_or_else(|| format!("plant-edge-{}-{}", agent.site, agent.gateway)),
        keep_alive: m.keep_alive,
        clean_session,
        session_expiry: m.session_expiry,
        username: m.username,
        password,
        tls: tls_on.then_some(TlsSettings {
            ca_file: m.ca_file,
            client_cert: m.client_cert,
            client_key: m.client_key,
            alpn: m.alpn,
        }),
        topic: m.topic,
        status_topic,
        inflight: m.inflight,
        max_messages_per_second: (m.max_messages_per_second > 0)
            .then_some(m.max_messages_per_second),
        ack_timeout: m.ack_timeout,
        site: agent.site.clone(),
        gateway: agent.gateway.clone(),
        payload,
    })
}
