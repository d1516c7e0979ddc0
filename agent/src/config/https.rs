//! `kind = "https"` sinks: raw config, defaults and checks.

use super::*;

pub(super) fn default_https_mode() -> String {
    "batch".into()
}

pub(super) fn default_batch_events() -> usize {
    500
}

pub(super) fn default_batch_bytes() -> ByteSize {
    ByteSize::mib(1)
}

pub(super) fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

pub(super) fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth2 {
    token_url: String,
    client_id: String,
    client_secret_file: PathBuf,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttpsSink {
    url: String,
    #[serde(default = "default_https_mode")]
    mode: String,
    #[serde(default = "default_batch_events")]
    batch_events: usize,
    #[serde(default = "default_batch_bytes")]
    batch_bytes: ByteSize,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    gzip: bool,
    #[serde(default)]
    bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    oauth2: Option<RawOAuth2>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    client_cert: Option<PathBuf>,
    #[serde(default)]
    client_key: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_verify: bool,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    request_timeout: Duration,
    #[serde(default)]
    max_events_per_second: u32,
    #[serde(default)]
    request: Option<protocols::sinks::https::erp::RequestConfig>,
    #[serde(default)]
    answer: Option<protocols::sinks::https::erp::AnswerConfig>,
    #[serde(default)]
    pending: Option<protocols::sinks::https::erp::PendingConfig>,
    #[serde(default)]
    lookup: Option<protocols::sinks::https::erp::LookupConfig>,
}

pub(super) fn check_https(
    file: &Path,
    key: &str,
    h: RawHttpsSink,
) -> Result<HttpsSinkConfig, ConfigError> {
    let err = keyed(file, key);
    let host = h
        .url
        .strip_prefix("https://")
        .or_else(|| h.url.strip_prefix("http://"))
        .and_then(|rest| rest.split(['/', ':']).next())
        .filter(|host| !host.is_empty())
        .ok_or_else(|| err("url", format!("an https:// URL, found {:?}", h.url)))?;
    if h.url.starts_with("http://") && !is_loopback(host) {
        return Err(err(
            "url",
            "https:// (plain http is allowed only to a loopback address)".into(),
        ));
    }
    let mode = match h.mode.as_str() {
        "single" => HttpsMode::Single,
        "batch" => {
            if h.batch_events == 0 || h.batch_events > 10_000 {
                return Err(err("batch_events", "between 1 and 10000".into()));
            }
            HttpsMode::Batch {
                max_events: h.batch_events,
                max_bytes: h.batch_bytes.as_u64().max(1024) as usize,
            }
        }
        other => {
            return Err(err(
                "mode",
                format!("\"single\" or \"batch\", found {other:?}"),
            ))
        }
    };
    let methods = [
        h.bearer_token_file.is_some(),
        h.username.is_some() || h.password_file.is_some(),
        h.oauth2.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        return Err(err(
            "oauth2",
            "one authentication method: bearer_token_file, username/password_file, or oauth2"
                .into(),
        ));
    }
    let auth = if let Some(path) = h.bearer_token_file {
        readable_file(&path).map_err(|why| {
            err(
                "bearer_token_file",
                format!("a readable file holding the token ({why})"),
            )
        })?;
        HttpsAuth::BearerFile(path)
    } else if let Some(o) = h.oauth2 {
        let client_secret = read_secret(file, &o.client_secret_file).map_err(|why| {
            err(
                "oauth2.client_secret_file",
                format!("a readable file holding the client secret ({why})"),
            )
        })?;
        HttpsAuth::OAuth2 {
            token_url: o.token_url,
            client_id: o.client_id,
            client_secret,
            scope: o.scope,
        }
    } else if let Some(user) = h.username {
        let path = h
            .password_file
            .ok_or_else(|| err("password_file", "set with username".into()))?;
        let password = read_secret(file, &path).map_err(|why| {
            err(
                "password_file",
                format!("a readable file holding the password ({why})"),
            )
        })?;
        HttpsAuth::Basic { user, password }
    } else if h.password_file.is_some() {
        return Err(err("username", "set when password_file is set".into()));
    } else {
        HttpsAuth::None
    };
    check_tls_files(&h.ca_file, &h.client_cert, &h.client_key)
        .map_err(|(sub, why)| err(sub, why))?;
    if h.insecure_skip_verify {
        eprintln!(
            "plant-edge: WARNING: {}: `{key}.insecure_skip_verify = true` turns TLS certificate checks off; \
             anyone on the path can read and forge postings. Use ca_file instead.",
            file.display()
        );
    }
    if h.connect_timeout.is_zero() || h.request_timeout.is_zero() {
        return Err(err("request_timeout", "durations above 0".into()));
    }
    for name in h.headers.keys() {
        if name.eq_ignore_ascii_case("authorization")
            || name.eq_ignore_ascii_case("idempotency-key")
        {
            return Err(err(
                &format!("headers.{name}"),
                "a header plant-edge does not set itself".into(),
            ));
        }
    }
    let batched = matches!(mode, HttpsMode::Batch { .. });
    let profile = protocols::sinks::https::erp::ProfileConfig {
        request: h.request,
        answer: h.answer,
        pending: h.pending,
        lookup: h.lookup,
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let profile = profile
        .check(base, batched)
        .and_then(|p| p.check_rendering(batched).map(|()| p))
        .map_err(|e| keyed::<String>(file, key)(e.key, e.expected))?;
    Ok(HttpsSinkConfig {
        profile,
        url: h.url,
        mode,
        headers: h.headers.into_iter().collect(),
        gzip: h.gzip,
        auth,
        tls: TlsSettings {
            ca_file: h.ca_file,
            client_cert: h.client_cert,
            client_key: h.client_key,
            alpn: Vec::new(),
        },
        insecure_skip_verify: h.insecure_skip_verify,
        connect_timeout: h.connect_timeout,
        request_timeout: h.request_timeout,
        max_events_per_second: (h.max_events_per_second > 0).then_some(h.max_events_per_second),
    })
}
