//! Client, PKI, endpoint selection and identity for OPC UA connections,
//! shared by the source and `plant-edge probe opcua`.
//!
//! The PKI directory holds `own/cert.der` + `private/private.pem` (made on
//! first start if absent, for the gateway's hostname and application URI),
//! `trusted/` and `rejected/`. A server certificate that is not in
//! `trusted/` is refused and copied to `rejected/`; the error names the
//! file to move.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use opcua::client::transport::TcpConnector;
use opcua::client::{Client, ClientBuilder, IdentityToken, Password, Session, SessionEventLoop};
use opcua::crypto::SecurityPolicy;
use opcua::types::{MessageSecurityMode, StatusCode};

/// Who the gateway logs in as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserIdentity {
    /// No user.
    Anonymous,
    /// User name and password (read from a file or credential; never logged).
    UserName {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// X.509 user certificate and its private key.
    Certificate {
        /// DER or PEM certificate.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
}

/// How to reach and trust one server.
#[derive(Clone, Debug)]
pub struct Connection {
    /// `opc.tcp://host:port/path`.
    pub endpoint: String,
    /// `None`, `Basic256Sha256`, `Aes128_Sha256_RsaOaep`, `Aes256_Sha256_RsaPss`.
    pub security_policy: String,
    /// `None`, `Sign`, `SignAndEncrypt`.
    pub security_mode: String,
    /// User identity.
    pub identity: UserIdentity,
    /// PKI directory (own, private, trusted, rejected).
    pub pki_dir: PathBuf,
    /// Trust an unknown server certificate on first use (commissioning only).
    pub trust_unknown_server: bool,
    /// Application URI of this client (`urn:plant-edge:<site>:<gateway>`).
    pub application_uri: String,
    /// Timeout of each request and of connecting.
    pub timeout: Duration,
}

/// The security policy names the configuration accepts.
pub const POLICIES: [&str; 4] = [
    "None",
    "Basic256Sha256",
    "Aes128_Sha256_RsaOaep",
    "Aes256_Sha256_RsaPss",
];

/// Parses a policy name as the configuration spells it.
pub fn security_policy(name: &str) -> Option<SecurityPolicy> {
    match name {
        "None" => Some(SecurityPolicy::None),
        "Basic256Sha256" => Some(SecurityPolicy::Basic256Sha256),
        "Aes128_Sha256_RsaOaep" => Some(SecurityPolicy::Aes128Sha256RsaOaep),
        "Aes256_Sha256_RsaPss" => Some(SecurityPolicy::Aes256Sha256RsaPss),
        _ => None,
    }
}

/// Parses a message security mode name.
pub fn security_mode(name: &str) -> Option<MessageSecurityMode> {
    match name {
        "None" => Some(MessageSecurityMode::None),
        "Sign" => Some(MessageSecurityMode::Sign),
        "SignAndEncrypt" => Some(MessageSecurityMode::SignAndEncrypt),
        _ => None,
    }
}

/// Builds the client; creates the PKI directory and own certificate if absent.
pub fn client(connection: &Connection) -> Result<Client, String> {
    // Sources sharing a PKI folder would race to create the gateway's
    // certificate (one fails with "already exists" and starts without
    // one); creating clients one at a time lets the first make it and the
    // others find it.
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|p| p.into_inner());
    for sub in ["own", "private", "trusted", "rejected"] {
        let dir = connection.pki_dir.join(sub);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create PKI directory {}: {e}", dir.display()))?;
    }
    ClientBuilder::new()
        .application_name("plant-edge")
        .application_uri(connection.application_uri.clone())
        .product_uri("urn:plant-edge")
        .pki_dir(connection.pki_dir.clone())
        .create_sample_keypair(true)
        .trust_server_certs(connection.trust_unknown_server)
        .verify_server_certs(true)
        // The source reconnects itself (fresh session, fresh subscription,
        // full read), with its own capped backoff.
        .session_retry_limit(0)
        .session_timeout(60_000)
        .request_timeout(connection.timeout)
        .keep_alive_interval(Duration::from_secs(5))
        .max_failed_keep_alive_count(3)
        // The library's default of 1,000 array elements breaks a session as
        // soon as one publish carries more changes than that; these bounds
        // fit 5,000 notifications per publish (the source asks for no more).
        .max_array_length(100_000)
        .max_message_size(16 * 1024 * 1024)
        .max_chunk_count(512)
        .client()
        .map_err(|errors| format!("OPC UA client configuration: {}", errors.join("; ")))
}

fn identity(connection: &Connection) -> Result<IdentityToken, String> {
    Ok(match &connection.identity {
        UserIdentity::Anonymous => IdentityToken::Anonymous,
        UserIdentity::UserName { user, password } => {
            IdentityToken::UserName(user.clone(), Password::new(password.clone()))
        }
        UserIdentity::Certificate { cert, key } => IdentityToken::new_x509_path(cert, key)
            .map_err(|e| {
                format!(
                    "user certificate {} / key {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?,
    })
}

/// Discovers the server's endpoints, picks the one with the configured
/// policy and mode, and prepares a session (connected by polling the loop).
pub async fn open(
    client: &mut Client,
    connection: &Connection,
) -> Result<(Arc<Session>, SessionEventLoop<TcpConnector>), String> {
    let policy = security_policy(&connection.security_policy)
        .ok_or_else(|| format!("unknown security policy {}", connection.security_policy))?;
    let mode = security_mode(&connection.security_mode)
        .ok_or_else(|| format!("unknown security mode {}", connection.security_mode))?;
    let token = identity(connection)?;
    let endpoint = (connection.endpoint.as_str(), policy.to_str(), mode);
    let connect = client.connect_to_matching_endpoint(endpoint, token);
    match tokio::time::timeout(connection.timeout.max(Duration::from_secs(1)), connect).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(explain(e.status(), connection, &e.to_string())),
        Err(_) => Err(format!(
            "no answer from {} within {:?}",
            connection.endpoint, connection.timeout
        )),
    }
}

/// Drives the session until it is connected; the error says why not.
pub async fn connected(
    session: &Session,
    events: &mut tokio::sync::mpsc::Receiver<LinkEvent>,
    connection: &Connection,
) -> Result<(), String> {
    let wait = async {
        match events.recv().await {
            Some(LinkEvent::Connected) => Ok(()),
            Some(LinkEvent::Lost(code)) | Some(LinkEvent::Ended(code)) => {
                Err(explain(code, connection, ""))
            }
            None => Err("session ended".to_owned()),
        }
    };
    let _ = session;
    match tokio::time::timeout(connection.timeout.max(Duration::from_secs(2)) * 3, wait).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "session with {} not established within {:?}",
            connection.endpoint,
            connection.timeout * 3
        )),
    }
}

/// What the session's event loop reports to its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Session active.
    Connected,
    /// Connection lost (the owner reconnects).
    Lost(StatusCode),
    /// The loop ended (connect failed or closed).
    Ended(StatusCode),
}

/// Runs the session's event loop on a task, forwarding what matters.
pub fn drive(
    event_loop: SessionEventLoop<TcpConnector>,
    tx: tokio::sync::mpsc::Sender<LinkEvent>,
) -> tokio::task::JoinHandle<()> {
    use futures_util::StreamExt;
    use opcua::client::SessionPollResult;
    tokio::spawn(async move {
        let stream = event_loop.enter();
        futures_util::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(SessionPollResult::Reconnected(_)) => LinkEvent::Connected,
                Ok(SessionPollResult::ConnectionLost(code)) => LinkEvent::Lost(code),
                Ok(SessionPollResult::ReconnectFailed(code)) => LinkEvent::Lost(code),
                Ok(_) => continue,
                Err(code) => {
                    let _ = tx.send(LinkEvent::Ended(code)).await;
                    return;
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let _ = tx.send(LinkEvent::Ended(StatusCode::Good)).await;
    })
}

/// A status code in words an OT engineer can act on.
pub fn explain(code: StatusCode, connection: &Connection, detail: &str) -> String {
    let pki = &connection.pki_dir;
    let base = match code {
        StatusCode::BadCertificateUntrusted
        | StatusCode::BadSecurityChecksFailed
        | StatusCode::BadCertificateInvalid => match newest_rejected(pki) {
            Some(file) => format!(
                "the server's certificate is not trusted; it was saved as {}. If this is the right server, move that file to {} and the gateway connects on its next attempt",
                file.display(),
                pki.join("trusted").display()
            ),
            None => format!(
                "the server refused our security, or its certificate is not trusted ({code}); check {} and that the server trusts this gateway's certificate {}",
                pki.join("rejected").display(),
                pki.join("own/cert.der").display()
            ),
        },
        StatusCode::BadCertificateTimeInvalid => {
            "the server's certificate has expired or is not yet valid; check both clocks and renew it".to_owned()
        }
        StatusCode::BadCertificateHostNameInvalid | StatusCode::BadCertificateUriInvalid => format!(
            "the server's certificate does not name {} (host name or application URI); connect by the name in its certificate",
            connection.endpoint
        ),
        StatusCode::BadIdentityTokenInvalid | StatusCode::BadIdentityTokenRejected | StatusCode::BadUserAccessDenied => {
            "the server refused the user identity; check user name and password (or user certificate) and the user's rights".to_owned()
        }
        StatusCode::BadSecurityPolicyRejected | StatusCode::BadSecurityModeRejected | StatusCode::BadTcpEndpointUrlInvalid => format!(
            "the server offers no endpoint with security policy {} and mode {}; `plant-edge probe opcua {}` lists what it offers",
            connection.security_policy, connection.security_mode, connection.endpoint
        ),
        StatusCode::BadNotConnected | StatusCode::BadConnectionClosed | StatusCode::BadCommunicationError | StatusCode::BadTimeout => {
            format!("no connection to {} ({code})", connection.endpoint)
        }
        other => format!("{other}"),
    };
    if detail.is_empty() || base.contains(detail) {
        base
    } else {
        format!("{base} [{detail}]")
    }
}

/// The most recently rejected server certificate, if any.
pub fn newest_rejected(pki_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(pki_dir.join("rejected"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, path)| path)
}
