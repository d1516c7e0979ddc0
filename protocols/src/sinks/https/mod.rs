//! HTTPS sink: batched, idempotent delivery to an ERP endpoint.
//!
//! Every request carries an `Idempotency-Key` (the event id; for a batch a
//! UUIDv5 over its ids in order) and the ids in the body, so the ERP can
//! post exactly once whatever the retries. Verdicts, by what the answer
//! is about:
//!
//! | answer | about | verdict |
//! |---|---|---|
//! | 2xx | | delivered (only the endpoint's own 2xx: redirects are never followed) |
//! | 408, 425, 429, 5xx, timeout, connection | a moment | retried, honouring `Retry-After` |
//! | 3xx, 401 after one credential refresh, 403, 404, 405, 407, 410 | the endpoint | **held**: nothing dead-lettered, retried with capped backoff, alarmed |
//! | 413 | the request's size | the batch is split; a single event too large is rejected |
//! | 400, 409, 422, any other 4xx; a 403/404/405/410 while other events of the same delivery were accepted | the events | rejected, the batch split in halves until the refused events are isolated |
//!
//! Requests go one at a time in journal order, which keeps each source's
//! order at the ERP. Response bodies are read up to [`MAX_BODY_BYTES`].
//!
//! With an ERP profile ([`erp`]) the request is rendered from templates and
//! a 2xx is read per event: booked → delivered; refused (JSON-RPC `error`,
//! a per-record `ERROR`, a failed `$batch` changeset) → dead letter with
//! the ERP's message; accepted-pending (queued) → kept, its status URL
//! polled until booked or failed; an answer the rules cannot read → held
//! (never delivered on doubt). A request sent without an answer (timeout,
//! reset) leaves its events in doubt: with a `lookup`, the ERP is asked
//! before they are posted again, and so is each event after a start until
//! the first one the ERP does not have (the previous process may have died
//! mid-request, or before it recorded acknowledgements).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use buffer::PendingEvent;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;

mod answer;
pub mod erp;
mod followup;
pub mod odata;

use std::collections::{HashMap, HashSet};

use minijinja::value::Value;

use self::erp::{BatchShape, ErpProfile, Repeatability};
use crate::pace::Pacer;
use crate::sink::{Sink, Verdict};
use crate::tls::{self, TlsSettings};

/// One event per request, or batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpsMode {
    /// `application/cloudevents+json`, one event per request.
    Single,
    /// `application/cloudevents-batch+json`, bounded by count and bytes.
    Batch {
        /// Most events per request.
        max_events: usize,
        /// Most body bytes per request (before gzip).
        max_bytes: usize,
    },
}

/// How requests authenticate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpsAuth {
    /// None.
    None,
    /// `Authorization: Bearer <token>`, the token read from a file and
    /// re-read when the file changes (rotated by another process).
    BearerFile(PathBuf),
    /// HTTP basic.
    Basic {
        /// User.
        user: String,
        /// Password (already read from its file).
        password: String,
    },
    /// OAuth2 client credentials.
    OAuth2 {
        /// Token endpoint.
        token_url: String,
        /// Client id.
        client_id: String,
        /// Client secret (already read from its file).
        client_secret: String,
        /// Scope, if the server wants one.
        scope: Option<String>,
    },
}

/// HTTPS sink settings.
#[derive(Clone, Debug)]
pub struct HttpsSinkConfig {
    /// Where to POST.
    pub url: String,
    /// Single or batch.
    pub mode: HttpsMode,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// gzip request bodies.
    pub gzip: bool,
    /// Authentication.
    pub auth: HttpsAuth,
    /// CA file and client certificate.
    pub tls: TlsSettings,
    /// Accept any server certificate (loudly logged; for commissioning only).
    pub insecure_skip_verify: bool,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout.
    pub request_timeout: Duration,
    /// Pace: most events per second (`None`: unpaced).
    pub max_events_per_second: Option<u32>,
    /// The ERP's dialect: request templates and answer rules (default:
    /// CloudEvents, a 2xx is a delivery).
    pub profile: ErpProfile,
}

/// Failures starting the sink.
#[derive(Debug, thiserror::Error)]
pub enum HttpsSinkError {
    /// TLS material could not be loaded.
    #[error("HTTPS sink TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The HTTP client could not be built.
    #[error("HTTPS client: {0}")]
    Client(#[from] reqwest::Error),
    /// A configured header is not valid HTTP.
    #[error("HTTPS header {0:?} is not valid")]
    Header(String),
}

/// Most bytes of a response body read (error texts, token responses): a
/// peer answering with an endless body costs no more than this.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest OAuth2 token lifetime believed (an absurd `expires_in` must not
/// overflow the clock or keep a revoked token forever).
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Outcome of one request.
enum Sent {
    Ok,
    /// Try later (with the peer's delay, if any).
    Later(Option<Duration>, String),
    /// The endpoint refuses (credentials, URL, redirect): hold, unless
    /// other events of the delivery were accepted (`singles_out`), in
    /// which case it is about these events.
    Endpoint {
        /// Why, for the log and status.
        reason: String,
        /// A status that may be about the events themselves (403, 404,
        /// 405, 410) rather than always about the endpoint (3xx, 401, 407).
        may_single_out: bool,
    },
    /// The body is too large for the endpoint (413): split it.
    TooLarge(String),
    /// Refused for good.
    Refused(String),
    /// The request could not be rendered (nothing was sent): split until
    /// the events that do not render are alone.
    Unrenderable(String),
    /// The answer says something per event (indexed like the request's
    /// events).
    PerEvent(Vec<Outcome>),
    /// Sent, but no answer came (timeout, reset): the ERP may have booked
    /// it.
    Unknown(String),
}

/// What the answer says about one event.
#[derive(Clone, Debug)]
enum Outcome {
    Booked,
    Refused(String),
    /// Accepted, not booked yet: the answer's `Location` and body.
    Pending {
        state: String,
        location: Option<String>,
        answer: serde_json::Value,
    },
    Doubt(String),
    Later(String),
}

/// What an HTTP status means for the events of the request.
fn classify(status: StatusCode, reason: String, delay: Option<Duration>) -> Sent {
    match status.as_u16() {
        408 | 425 | 429 => Sent::Later(delay, reason),
        _ if status.is_server_error() => Sent::Later(delay, reason),
        401 | 407 => Sent::Endpoint {
            reason,
            may_single_out: false,
        },
        _ if status.is_redirection() => Sent::Endpoint {
            reason,
            may_single_out: false,
        },
        403 | 404 | 405 | 410 => Sent::Endpoint {
            reason,
            may_single_out: true,
        },
        413 => Sent::TooLarge(reason),
        _ => Sent::Refused(reason),
    }
}

/// Reads at most `limit` bytes of a response body (error texts, token
/// responses: a broken transfer leaves what was read).
async fn bounded_body(response: &mut reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    let _ = read_into(response, limit, &mut body).await;
    body
}

/// Reads up to `limit` bytes into `body`; an error if the transfer broke.
async fn read_into(
    response: &mut reqwest::Response,
    limit: usize,
    body: &mut Vec<u8>,
) -> Result<(), String> {
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) => break,
            Err(e) => return Err(describe(&e)),
        }
    }
    Ok(())
}

#[derive(Default)]
struct Token {
    value: Option<String>,
    expires: Option<Instant>,
    /// Bearer file: modification time of the value read.
    modified: Option<SystemTime>,
}

/// An event the ERP accepted and has not booked yet.
#[derive(Clone, Debug)]
struct Ticket {
    /// Where its state is asked.
    status_url: String,
    since: SystemTime,
    next_poll: Instant,
    state: String,
    alarmed: bool,
}

/// Most accepted-pending events and events in doubt remembered: the
/// forwarder's batch bounds them in practice; this bounds them by design.
const MAX_REMEMBERED: usize = 100_000;

/// The HTTPS sink.
pub struct HttpsSink {
    config: HttpsSinkConfig,
    client: reqwest::Client,
    token: Token,
    pace: Pacer,
    /// SAP CSRF token and the session cookies it belongs to.
    csrf: Option<(String, Option<String>)>,
    /// Accepted-pending events by id.
    pending: HashMap<uuid::Uuid, Ticket>,
    /// Events sent without an answer: looked up before they are posted again.
    doubt: HashSet<uuid::Uuid>,
    /// Since start, every event the ERP has booked was looked up: the
    /// previous process may have delivered events whose acknowledgement
    /// it did not record. Ends at the first event the ERP does not have.
    fresh: bool,
}

struct DangerAcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl std::fmt::Debug for DangerAcceptAny {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DangerAcceptAny")
    }
}

impl rustls::client::danger::ServerCertVerifier for DangerAcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds.min(3600)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(3600)),
    )
}

/// A UUIDv5 over the ids in order: the same batch always has the same key.
pub fn batch_key(events: &[PendingEvent]) -> uuid::Uuid {
    let mut bytes = Vec::with_capacity(events.len() * 16);
    for e in events {
        bytes.extend_from_slice(e.id.as_bytes());
    }
    uuid::Uuid::new_v5(&buffer::id::NAMESPACE, &bytes)
}

fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if tls::certificate_refused(error) {
        format!("TLS: the server's certificate was not accepted ({text}); check ca_file and the URL's host name")
    } else if error.is_timeout() {
        format!("timeout: {text}")
    } else {
        format!("connection: {text}")
    }
}

impl HttpsSink {
    /// Builds the client (ring-backed rustls; no OpenSSL).
    pub fn new(config: HttpsSinkConfig) -> Result<Self, HttpsSinkError> {
        let tls_config = if config.insecure_skip_verify {
            tracing::warn!(url = %config.url, "HTTPS sink: TLS CERTIFICATE VERIFICATION IS OFF (insecure_skip_verify); anyone on the path can read and forge postings");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(tls::TlsError::from)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(DangerAcceptAny(provider)));
            Arc::new(builder.with_no_client_auth())
        } else {
            tls::client_config(&config.tls)?
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| HttpsSinkError::Header(name.clone()))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| HttpsSinkError::Header(name.to_string()))?;
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls_config).clone())
            .user_agent(concat!("plant-edge/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // A redirect is not the endpoint's acceptance: reqwest would
            // turn a POST into a GET without the body and call the login
            // page's 200 a delivery.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(4)
            .build()?;
        Ok(Self {
            pace: Pacer::new(config.max_events_per_second),
            config,
            client,
            token: Token::default(),
            csrf: None,
            pending: HashMap::new(),
            doubt: HashSet::new(),
            fresh: true,
        })
    }

    /// The Authorization header value, fetching or re-reading as needed.
    async fn authorization(&mut self, refresh: bool) -> Result<Option<String>, String> {
        match self.config.auth.clone() {
            HttpsAuth::None => Ok(None),
            // Basic is applied by reqwest per request (see `post`).
            HttpsAuth::Basic { .. } => Ok(None),
            HttpsAuth::BearerFile(path) => {
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                if refresh || self.token.value.is_none() || modified != self.token.modified {
                    let token = std::fs::read_to_string(&path).map_err(|e| {
                        format!("reading bearer token file {}: {e}", path.display())
                    })?;
                    self.token = Token {
                        value: Some(token.trim().to_owned()),
                        expires: None,
                        modified,
                    };
                }
                Ok(self.token.value.as_ref().map(|t| format!("Bearer {t}")))
            }
            HttpsAuth::OAuth2 {
                token_url,
                client_id,
                client_secret,
                scope,
            } => {
                let fresh = self
                    .token
                    .expires
                    .is_some_and(|e| e > Instant::now() + Duration::from_secs(30));
                if refresh || !fresh || self.token.value.is_none() {
                    let mut form = vec![
                        ("grant_type", "client_credentials".to_owned()),
                        ("client_id", client_id),
                        ("client_secret", client_secret),
                    ];
                    if let Some(scope) = scope {
                        form.push(("scope", scope));
                    }
                    let mut response = self
                        .client
                        .post(&token_url)
                        .form(&form)
                        .send()
                        .await
                        .map_err(|e| format!("OAuth2 token request: {}", describe(&e)))?;
                    let status = response.status();
                    let bytes = bounded_body(&mut response, MAX_BODY_BYTES).await;
                    if !status.is_success() {
                        return Err(format!("OAuth2 token endpoint answered {status}"));
                    }
                    #[derive(serde::Deserialize)]
                    struct TokenResponse {
                        access_token: String,
                        #[serde(default)]
                        expires_in: Option<u64>,
                    }
                    let token: TokenResponse = serde_json::from_slice(&bytes).map_err(|e| {
                        format!("OAuth2 token response is not JSON with access_token: {e}")
                    })?;
                    let lifetime = Duration::from_secs(token.expires_in.unwrap_or(300))
                        .min(MAX_TOKEN_LIFETIME);
                    self.token = Token {
                        value: Some(token.access_token),
                        expires: Some(Instant::now() + lifetime),
                        modified: None,
                    };
                    tracing::debug!(lifetime_s = lifetime.as_secs(), "OAuth2 token obtained");
                }
                Ok(self.token.value.as_ref().map(|t| format!("Bearer {t}")))
            }
        }
    }

    /// Commissioning: an OPTIONS request to the URL with the configured
    /// credentials, never a POST. Proves the address, the TLS trust and
    /// that the credentials are not refused (an OAuth2 token is fetched).
    /// `Ok` with what the endpoint answered; `Err` the reason.
    pub async fn check(&mut self) -> Result<String, String> {
        let authorization = self.authorization(false).await?;
        let mut request = self
            .client
            .request(reqwest::Method::OPTIONS, &self.config.url);
        if let Some(a) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, a);
        }
        if let HttpsAuth::Basic { user, password } = &self.config.auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.map_err(|e| describe(&e))?;
        let status = response.status();
        match status.as_u16() {
            401 | 403 | 407 => Err(format!(
                "HTTP {status}: the endpoint refuses the credentials"
            )),
            300..=399 => Err(format!(
                "HTTP {status}: redirected to {} (deliveries are never redirected; use the final URL)",
                response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .unwrap_or("?")
            )),
            404 | 410 => Err(format!("HTTP {status}: no such endpoint; check the URL")),
            500..=599 => Err(format!("HTTP {status}: the endpoint has a problem")),
            // 2xx, or 405 and the like: reachable, trusted, not refused.
            _ => Ok(format!("reachable, TLS trusted, credentials accepted (OPTIONS answered {status})")),
        }
    }

    /// Adds the configured credentials to a request.
    async fn authorised(
        &mut self,
        mut request: reqwest::RequestBuilder,
        refresh: bool,
    ) -> Result<reqwest::RequestBuilder, String> {
        if let Some(a) = self.authorization(refresh).await? {
            request = request.header(reqwest::header::AUTHORIZATION, a);
        }
        if let HttpsAuth::Basic { user, password } = &self.config.auth {
            request = request.basic_auth(user, Some(password));
        }
        if let Some((_, Some(cookies))) = &self.csrf {
            request = request.header(reqwest::header::COOKIE, cookies.clone());
        }
        Ok(request)
    }

    /// SAP: fetches a CSRF token (and the session cookies it is bound to)
    /// with a GET on the service root.
    async fn fetch_csrf(&mut self) -> Result<(), String> {
        self.csrf = None;
        let root = match self.config.url.rfind('/') {
            Some(i) if i > "https://".len() => format!("{}/", &self.config.url[..i]),
            _ => self.config.url.clone(),
        };
        let request = self
            .client
            .get(&root)
            .header("x-csrf-token", "Fetch")
            .header(reqwest::header::ACCEPT, "application/json");
        let request = self.authorised(request, false).await?;
        let mut response = request
            .send()
            .await
            .map_err(|e| format!("CSRF token fetch: {}", describe(&e)))?;
        let token = response
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.eq_ignore_ascii_case("required"))
            .map(str::to_owned);
        let cookies: Vec<String> = response
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .map(|v| v.trim().to_owned())
            .collect();
        let status = response.status();
        let _ = bounded_body(&mut response, MAX_BODY_BYTES).await;
        let token = token.ok_or_else(|| {
            format!("CSRF token fetch: GET {root} answered {status} without an x-csrf-token header")
        })?;
        self.csrf = Some((token, (!cookies.is_empty()).then(|| cookies.join("; "))));
        Ok(())
    }

    /// The absolute URL for a rendered status or lookup URL: absolute as
    /// written, otherwise resolved against the sink's `url` as a browser
    /// would.
    fn resolve(&self, rendered: &str) -> Result<String, String> {
        let base = reqwest::Url::parse(&self.config.url).map_err(|e| format!("url: {e}"))?;
        base.join(rendered.trim())
            .map(|u| u.to_string())
            .map_err(|e| format!("{rendered:?} is not a URL: {e}"))
    }

    /// A GET whose answer is JSON (status polls, lookups). `Ok(None)`: 404.
    async fn get_json(&mut self, url: &str) -> Result<Option<serde_json::Value>, String> {
        self.ask_json(url, None).await
    }

    /// A GET, or a POST of a JSON `body` (JSON-RPC searches), whose answer
    /// is JSON. `Ok(None)`: 404.
    async fn ask_json(
        &mut self,
        url: &str,
        body: Option<String>,
    ) -> Result<Option<serde_json::Value>, String> {
        let request = match body {
            Some(body) => self
                .client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body),
            None => self.client.get(url),
        }
        .header(reqwest::header::ACCEPT, "application/json");
        let request = self.authorised(request, false).await?;
        let mut response = request.send().await.map_err(|e| describe(&e))?;
        let status = response.status();
        let body = bounded_body(&mut response, MAX_BODY_BYTES).await;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(format!(
                "{url} answered {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("{url}: the answer is not JSON ({e})"))
    }

    /// The body, content type, URL and extra headers of one request.
    fn render_request(&self, events: &[PendingEvent], key: uuid::Uuid) -> Result<Rendered, String> {
        let profile = &self.config.profile;
        let key_value = ("batch_key", Value::from(key.to_string()));
        let values: Vec<Value> = events
            .iter()
            .map(crate::render::event_value)
            .collect::<Result<_, _>>()?;
        let single = matches!(self.config.mode, HttpsMode::Single) && events.len() == 1;
        let context = if single {
            crate::render::single_context(&values[0], &[key_value])
        } else {
            crate::render::batch_context(values.clone(), &[key_value])
        };
        let (content_type, body) = if profile.batch == BatchShape::Odata && !single {
            let changesets = values
                .iter()
                .map(|v| {
                    let c = crate::render::single_context(v, &[]);
                    Ok(odata::Changeset {
                        path: profile.templates.render(erp::keys::ODATA_PATH, &c)?,
                        body: profile.templates.render(erp::keys::BODY, &c)?,
                    })
                })
                .collect::<Result<Vec<_>, crate::render::TemplateError>>()
                .map_err(|e| e.to_string())?;
            odata::build(
                &key.simple().to_string(),
                &profile.content_type,
                &changesets,
            )
        } else {
            (
                profile.content_type.clone(),
                profile
                    .templates
                    .render(erp::keys::BODY, &context)
                    .map_err(|e| e.to_string())?,
            )
        };
        let mut url = self.config.url.clone();
        if profile.path {
            url.push_str(
                &profile
                    .templates
                    .render(erp::keys::PATH, &context)
                    .map_err(|e| e.to_string())?,
            );
        }
        let mut headers = Vec::new();
        for name in &profile.headers {
            let value = profile
                .templates
                .render(&erp::keys::header(name), &context)
                .map_err(|e| e.to_string())?;
            headers.push((name.clone(), value));
        }
        Ok(Rendered {
            url,
            content_type,
            body: body.into_bytes(),
            headers,
        })
    }

    /// One request for `events` (one or a batch); a 401 refreshes the
    /// credentials and a CSRF refusal the token, each once.
    async fn post(&mut self, events: &[PendingEvent]) -> Sent {
        let single = matches!(self.config.mode, HttpsMode::Single) && events.len() == 1;
        let key = if single {
            events[0].id
        } else {
            batch_key(events)
        };
        let rendered = if self.config.profile.templated_body {
            match self.render_request(events, key) {
                Ok(r) => r,
                Err(reason) => return Sent::Unrenderable(reason),
            }
        } else {
            cloudevents_request(&self.config.url, events, single)
        };
        let Rendered {
            url,
            content_type,
            mut body,
            headers,
        } = rendered;
        if self.config.gzip {
            use std::io::Write;
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            if encoder.write_all(&body).is_ok() {
                if let Ok(zipped) = encoder.finish() {
                    body = zipped;
                }
            }
        }
        self.pace.wait(events.len()).await;
        let first_sent = events.iter().map(|e| e.appended_ms).min().unwrap_or(0);
        let first_sent = SystemTime::UNIX_EPOCH + Duration::from_millis(first_sent);
        let (mut refreshed, mut csrf_refreshed) = (false, false);
        loop {
            if self.config.profile.csrf && self.csrf.is_none() {
                if let Err(reason) = self.fetch_csrf().await {
                    return Sent::Later(None, reason);
                }
            }
            let mut request = self
                .client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, content_type.as_str())
                .body(body.clone());
            if self.config.profile.idempotency_key {
                request = request.header("Idempotency-Key", key.to_string());
            }
            match self.config.profile.repeatability {
                Repeatability::None => {}
                Repeatability::Oasis => {
                    request = request
                        .header("Repeatability-Request-ID", key.to_string())
                        .header(
                            "Repeatability-First-Sent",
                            httpdate::fmt_http_date(first_sent),
                        );
                }
                Repeatability::Sap => {
                    request = request
                        .header("RequestID", key.simple().to_string())
                        .header(
                            "RepeatabilityCreation",
                            humantime::format_rfc3339_seconds(first_sent).to_string(),
                        );
                }
            }
            for (name, value) in &headers {
                request = request.header(name.as_str(), value.as_str());
            }
            if let Some((token, _)) = &self.csrf {
                request = request.header("x-csrf-token", token.clone());
            }
            if self.config.gzip {
                request = request.header(reqwest::header::CONTENT_ENCODING, "gzip");
            }
            let request = match self.authorised(request, refreshed).await {
                Ok(r) => r,
                Err(e) => return Sent::Later(None, e),
            };
            let mut response = match request.send().await {
                Ok(r) => r,
                // Refused before a byte was sent: nothing can have been booked.
                Err(e) if e.is_connect() => return Sent::Later(None, describe(&e)),
                Err(e) => return Sent::Unknown(describe(&e)),
            };
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED
                && !refreshed
                && self.config.auth != HttpsAuth::None
            {
                tracing::info!(url = %url, "HTTP 401: refreshing credentials and trying once more");
                refreshed = true;
                continue;
            }
            let csrf_required = response
                .headers()
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("required"));
            if status == StatusCode::FORBIDDEN
                && csrf_required
                && self.config.profile.csrf
                && !csrf_refreshed
            {
                tracing::info!(url = %url, "HTTP 403 CSRF token required: fetching a new token and trying once more");
                self.csrf = None;
                csrf_refreshed = true;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && refreshed {
                return Sent::Endpoint {
                    reason: "HTTP 401 after refreshing credentials".into(),
                    may_single_out: false,
                };
            }
            let delay = retry_after(response.headers());
            let location = ["location", "operation-location"].iter().find_map(|h| {
                response
                    .headers()
                    .get(*h)
                    .and_then(|l| l.to_str().ok())
                    .map(str::to_owned)
            });
            let answer_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let mut bytes = Vec::new();
            match read_into(&mut response, MAX_BODY_BYTES, &mut bytes).await {
                Ok(()) => {}
                // The ERP answered 2xx and the rest of its answer was
                // lost: booked or not, only a lookup can tell.
                Err(e) if status.is_success() => return Sent::Unknown(e),
                // An error's text: what arrived is enough to say why.
                Err(_) => {}
            }
            if status.is_success() {
                return self.judge_success(status, location, &answer_type, &bytes, events);
            }
            let text = String::from_utf8_lossy(&bytes);
            let erp_message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| self.config.profile.answer.state.message(&v));
            let start: String = erp_message
                .unwrap_or_else(|| text.chars().take(200).collect())
                .trim()
                .to_owned();
            let reason = match location {
                Some(to) if status.is_redirection() => format!(
                    "HTTP {}: the endpoint redirects to {to}; deliveries are never redirected, set url to the endpoint itself",
                    status.as_u16()
                ),
                _ => format!("HTTP {}: {start}", status.as_u16()),
            };
            return classify(status, reason, delay);
        }
    }

    /// Sends `events`; on refusal splits until the refused ones are alone.
    /// Fills `verdicts` (indexed like `events`); returns false if delivery
    /// must stop here (transient failure or an endpoint that refuses: the
    /// rest waits, in order). `accepted` says whether the endpoint took any
    /// event of this delivery (then a 403/404/405/410 is about the events).
    async fn deliver_isolating(
        &mut self,
        events: &[PendingEvent],
        verdicts: &mut [Option<Verdict>],
        accepted: &mut bool,
    ) -> bool {
        let wait_all = |verdicts: &mut [Option<Verdict>], verdict: Verdict| {
            verdicts.iter_mut().for_each(|v| *v = Some(verdict.clone()));
        };
        let sent = match self.post(events).await {
            Sent::Endpoint {
                reason,
                may_single_out: true,
            } if *accepted => Sent::Refused(reason),
            other => other,
        };
        match sent {
            Sent::Ok => {
                *accepted = true;
                wait_all(verdicts, Verdict::Delivered);
                true
            }
            Sent::Later(after, reason) => {
                wait_all(verdicts, Verdict::Retry { after, reason });
                false
            }
            Sent::Unknown(reason) => {
                if self.doubt.len() + events.len() <= MAX_REMEMBERED {
                    self.doubt.extend(events.iter().map(|e| e.id));
                }
                let reason =
                    format!("sent without an answer, the ERP may have booked it: {reason}");
                wait_all(verdicts, Verdict::retry(reason));
                false
            }
            Sent::Endpoint { reason, .. } => {
                wait_all(verdicts, Verdict::Hold { reason });
                false
            }
            Sent::PerEvent(outcomes) => {
                let mut go_on = true;
                for ((event, outcome), verdict) in
                    events.iter().zip(outcomes).zip(verdicts.iter_mut())
                {
                    *verdict = Some(match outcome {
                        Outcome::Booked => {
                            *accepted = true;
                            Verdict::Delivered
                        }
                        Outcome::Refused(reason) => Verdict::Rejected { reason },
                        Outcome::Pending {
                            state,
                            location,
                            answer,
                        } => {
                            *accepted = true;
                            self.accept_pending(event, state, location, answer)
                        }
                        Outcome::Doubt(why) => {
                            go_on = false;
                            if self.doubt.len() < MAX_REMEMBERED {
                                self.doubt.insert(event.id);
                            }
                            Verdict::Hold {
                                reason: format!("the ERP's answer does not say whether it booked the event: {why}"),
                            }
                        }
                        Outcome::Later(reason) => {
                            go_on = false;
                            Verdict::retry(reason)
                        }
                    });
                }
                go_on
            }
            Sent::Refused(reason) | Sent::TooLarge(reason) | Sent::Unrenderable(reason)
                if events.len() == 1 =>
            {
                verdicts[0] = Some(Verdict::Rejected { reason });
                true
            }
            sent @ (Sent::Refused(_) | Sent::TooLarge(_) | Sent::Unrenderable(_)) => {
                match &sent {
                    Sent::Unrenderable(reason) => {
                        tracing::warn!(events = events.len(), reason = %reason, "batch does not render; splitting it to find the events that do not")
                    }
                    Sent::Refused(reason) | Sent::TooLarge(reason) => {
                        tracing::warn!(events = events.len(), reason = %reason, "batch refused; splitting it")
                    }
                    _ => {}
                }
                let mid = events.len() / 2;
                let (left_v, right_v) = verdicts.split_at_mut(mid);
                if !Box::pin(self.deliver_isolating(&events[..mid], left_v, accepted)).await {
                    right_v
                        .iter_mut()
                        .for_each(|v| *v = Some(Verdict::retry("waiting behind an earlier retry")));
                    return false;
                }
                Box::pin(self.deliver_isolating(&events[mid..], right_v, accepted)).await
            }
        }
    }

    /// Posts `events` in order, in requests bounded by the mode.
    async fn post_in_order(&mut self, batch: &[PendingEvent], verdicts: &mut [Option<Verdict>]) {
        let (max_events, max_bytes) = match self.config.mode {
            HttpsMode::Single => (1, usize::MAX),
            HttpsMode::Batch {
                max_events,
                max_bytes,
            } => (max_events.max(1), max_bytes.max(1)),
        };
        let mut start = 0;
        let mut accepted = false;
        while start < batch.len() {
            let mut end = start;
            let mut bytes = 2;
            while end < batch.len()
                && end - start < max_events
                && (end == start || bytes + batch[end].payload.len() < max_bytes)
            {
                bytes += batch[end].payload.len() + 1;
                end += 1;
            }
            if !self
                .deliver_isolating(&batch[start..end], &mut verdicts[start..end], &mut accepted)
                .await
            {
                break;
            }
            start = end;
        }
    }
}

/// A request ready to send.
struct Rendered {
    url: String,
    content_type: String,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// The default body: CloudEvents, one or a batch.
fn cloudevents_request(url: &str, events: &[PendingEvent], single: bool) -> Rendered {
    let (content_type, body) = if single {
        ("application/cloudevents+json", events[0].payload.clone())
    } else {
        let mut body =
            Vec::with_capacity(events.iter().map(|e| e.payload.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&e.payload);
        }
        body.push(b']');
        ("application/cloudevents-batch+json", body)
    };
    Rendered {
        url: url.to_owned(),
        content_type: content_type.to_owned(),
        body,
        headers: Vec::new(),
    }
}

#[async_trait]
impl Sink for HttpsSink {
    async fn deliver(&mut self, batch: &[PendingEvent]) -> Vec<Verdict> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; batch.len()];
        let looks_up = self.config.profile.lookup.is_some();
        let mut stopped = false;
        for (event, verdict) in batch.iter().zip(verdicts.iter_mut()) {
            if self.pending.contains_key(&event.id) {
                *verdict = Some(self.follow_pending(event).await);
            } else if looks_up && (self.fresh || self.doubt.contains(&event.id)) {
                if stopped {
                    *verdict = Some(Verdict::retry("waiting behind a lookup that failed"));
                    continue;
                }
                match self.look_up(event).await {
                    Ok(Some(v)) => *verdict = Some(v),
                    // Events go in journal order: after the first one the
                    // ERP does not have, none after it can have been sent
                    // by the previous process.
                    Ok(None) => self.fresh = false,
                    Err(why) => {
                        stopped = true;
                        *verdict = Some(Verdict::retry(format!(
                            "asking the ERP whether the event is booked before posting it again: {why}"
                        )));
                    }
                }
            }
        }
        if stopped {
            // Posting later events before the doubtful one is settled
            // would change the order the ERP sees.
            for v in verdicts.iter_mut().filter(|v| v.is_none()) {
                *v = Some(Verdict::retry("waiting behind a lookup that failed"));
            }
        }
        let open: Vec<usize> = (0..batch.len())
            .filter(|i| verdicts[*i].is_none())
            .collect();
        if open.len() == batch.len() {
            self.post_in_order(batch, &mut verdicts).await;
        } else if !open.is_empty() {
            let rest: Vec<PendingEvent> = open.iter().map(|i| batch[*i].clone()).collect();
            let mut rest_verdicts = vec![None; rest.len()];
            self.post_in_order(&rest, &mut rest_verdicts).await;
            for (i, v) in open.into_iter().zip(rest_verdicts) {
                verdicts[i] = v;
            }
        }
        for (event, verdict) in batch.iter().zip(&verdicts) {
            if matches!(
                verdict,
                Some(Verdict::Delivered) | Some(Verdict::Rejected { .. })
            ) {
                self.doubt.remove(&event.id);
            }
        }
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or_else(|| Verdict::retry("waiting behind an earlier retry")))
            .collect()
    }
}
