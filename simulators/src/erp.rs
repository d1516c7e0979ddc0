//! A simulated ERP endpoint: a real HTTPS server (axum over rustls/ring with
//! an rcgen certificate) that records CloudEvents, deduplicates by
//! `Idempotency-Key`, issues OAuth2 tokens, and fails on command.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

/// A scripted answer for the next request.
#[derive(Clone, Copy, Debug)]
pub enum Scripted {
    /// Answer with this status.
    Status(u16),
    /// 429 with `Retry-After: n` seconds.
    TooManyRequests(u64),
}

/// What the ERP has seen and how it behaves.
#[derive(Default)]
pub struct ErpState {
    /// Event ids posted, in arrival order, after dedup by Idempotency-Key.
    pub posted: Mutex<Vec<(String, String)>>,
    /// The events themselves, in the same order.
    pub events: Mutex<Vec<serde_json::Value>>,
    /// Idempotency keys already posted.
    pub keys: Mutex<HashSet<String>>,
    /// Requests received (including refused and repeated ones).
    pub requests: Mutex<u64>,
    /// Answers to give before normal processing resumes.
    pub script: Mutex<VecDeque<Scripted>>,
    /// Event ids the ERP refuses (422) whenever they are in a request.
    pub poison: Mutex<HashSet<String>>,
    /// When set, requests need a bearer token from `/token`.
    pub require_token: Mutex<bool>,
    /// Tokens issued, with the time the server silently revokes them.
    pub tokens: Mutex<HashMap<String, Instant>>,
    /// How long a token really lives (the response claims an hour).
    pub token_life: Mutex<Duration>,
    /// 401s answered.
    pub unauthorized: Mutex<u64>,
    /// When set, every POST is answered with this status (a revoked
    /// credential: 403; a moved endpoint: 404), nothing recorded.
    pub refuse_all: Mutex<Option<u16>>,
    /// When set, every POST is answered `301 Location: <this>` (a proxy
    /// sending clients to a login page, which answers GET with 200).
    pub redirect_to: Mutex<Option<String>>,
    /// When set, bodies larger than this are answered 413.
    pub max_body: Mutex<Option<usize>>,
    /// When set, every POST is answered 503 with a body that never ends.
    pub endless_error_body: Mutex<bool>,
    /// When set, the token endpoint refuses any other `client_secret`.
    pub client_secret: Mutex<Option<String>>,
    /// `expires_in` the token endpoint claims (default 3600).
    pub token_expires_in: Mutex<Option<u64>>,
}

async fn events(State(state): State<Arc<ErpState>>, headers: HeaderMap, body: Bytes) -> Response {
    *state.requests.lock().expect("state") += 1;
    if *state.require_token.lock().expect("state") {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let valid = token.is_some_and(|t| {
            state
                .tokens
                .lock()
                .expect("state")
                .get(&t)
                .is_some_and(|until| *until > Instant::now())
        });
        if !valid {
            *state.unauthorized.lock().expect("state") += 1;
            return (StatusCode::UNAUTHORIZED, "token expired").into_response();
        }
    }
    if *state.endless_error_body.lock().expect("state") {
        let chunk = Bytes::from_static(&[b'x'; 8192]);
        let endless =
            futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::body::Body::from_stream(endless),
        )
            .into_response();
    }
    if let Some(code) = *state.refuse_all.lock().expect("state") {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::FORBIDDEN);
        return (status, "access revoked").into_response();
    }
    if let Some(to) = state.redirect_to.lock().expect("state").clone() {
        return (StatusCode::MOVED_PERMANENTLY, [("location", to)], "moved").into_response();
    }
    if let Some(max) = *state.max_body.lock().expect("state") {
        if body.len() > max {
            return (StatusCode::PAYLOAD_TOO_LARGE, "request entity too large").into_response();
        }
    }
    if let Some(scripted) = state.script.lock().expect("state").pop_front() {
        return match scripted {
            Scripted::Status(code) => (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "scripted failure",
            )
                .into_response(),
            Scripted::TooManyRequests(secs) => (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", secs.to_string())],
                "slow down",
            )
                .into_response(),
        };
    }
    let raw = if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return (StatusCode::BAD_REQUEST, "bad gzip").into_response();
        }
        out
    } else {
        body.to_vec()
    };
    let value: serde_json::Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not JSON: {e}")).into_response(),
    };
    let list = match value {
        serde_json::Value::Array(list) => list,
        single => vec![single],
    };
    let ids: Vec<(String, String)> = list
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap_or("").to_owned(),
                e["source"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    if let Some((bad, _)) = ids
        .iter()
        .find(|(id, _)| state.poison.lock().expect("state").contains(id))
    {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("unknown material in event {bad}"),
        )
            .into_response();
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if key.is_empty() {
        return (StatusCode::BAD_REQUEST, "Idempotency-Key missing").into_response();
    }
    if state.keys.lock().expect("state").insert(key) {
        state.posted.lock().expect("state").extend(ids);
        state.events.lock().expect("state").extend(list);
    }
    StatusCode::OK.into_response()
}

async fn token(
    State(state): State<Arc<ErpState>>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    let expected = state.client_secret.lock().expect("state").clone();
    if expected.is_some_and(|secret| form.get("client_secret") != Some(&secret)) {
        *state.unauthorized.lock().expect("state") += 1;
        return (StatusCode::UNAUTHORIZED, "invalid_client").into_response();
    }
    let mut tokens = state.tokens.lock().expect("state");
    let name = format!("tok-{}", tokens.len() + 1);
    let life = *state.token_life.lock().expect("state");
    tokens.insert(name.clone(), Instant::now() + life);
    let expires_in = state
        .token_expires_in
        .lock()
        .expect("state")
        .unwrap_or(3600);
    let body =
        serde_json::json!({"access_token": name, "token_type": "Bearer", "expires_in": expires_in})
            .to_string();
    ([("content-type", "application/json")], body).into_response()
}

/// A running simulated ERP.
pub struct Erp {
    /// Shared state (inspect and script it).
    pub state: Arc<ErpState>,
    /// Where it listens.
    pub addr: SocketAddr,
    tls: axum_server::tls_rustls::RustlsConfig,
    handle: Option<axum_server::Handle<SocketAddr>>,
}

impl Erp {
    /// Starts on a free loopback port with the given server certificate.
    pub async fn start(cert: &std::path::Path, key: &std::path::Path) -> Erp {
        let tls = tls_config(cert, key);
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let state = Arc::new(ErpState {
            token_life: Mutex::new(Duration::from_secs(3600)),
            ..ErpState::default()
        });
        let mut erp = Erp {
            state,
            addr,
            tls,
            handle: None,
        };
        erp.serve();
        erp
    }

    fn serve(&mut self) {
        let app = Router::new()
            .route("/events", post(events))
            .route("/token", post(token))
            .route(
                "/login",
                axum::routing::get(|| async { "<html>please log in</html>" }),
            )
            .with_state(self.state.clone());
        let handle = axum_server::Handle::new();
        let server = axum_server::bind_rustls(self.addr, self.tls.clone()).handle(handle.clone());
        tokio::spawn(async move {
            let _ = server.serve(app.into_make_service()).await;
        });
        self.handle = Some(handle);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(self.addr).is_err() {
            assert!(Instant::now() < deadline, "ERP server did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// URL of the events endpoint (host `localhost`, as in the certificate).
    pub fn url(&self) -> String {
        format!("https://localhost:{}/events", self.addr.port())
    }

    /// URL of a login page that answers GET with 200.
    pub fn login_url(&self) -> String {
        format!("https://localhost:{}/login", self.addr.port())
    }

    /// URL of the token endpoint.
    pub fn token_url(&self) -> String {
        format!("https://localhost:{}/token", self.addr.port())
    }

    /// Takes the server down (connections dropped).
    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(self.addr).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Back up on the same port.
    pub fn start_again(&mut self) {
        self.serve();
    }

    /// Ids posted, in order (after dedup by Idempotency-Key).
    pub fn posted(&self) -> Vec<(String, String)> {
        self.state.posted.lock().expect("state").clone()
    }
}

/// The TLS settings of a simulated ERP (h2 and HTTP/1.1, ring).
pub(crate) fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> axum_server::tls_rustls::RustlsConfig {
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> = rustls_pemfile_certs(cert);
    let key = rustls_pemfile_key(key);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config))
}

fn rustls_pemfile_certs(path: &std::path::Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .expect("cert file")
        .collect::<Result<_, _>>()
        .expect("certs")
}

fn rustls_pemfile_key(path: &std::path::Path) -> rustls::pki_types::PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_file(path).expect("key")
}
