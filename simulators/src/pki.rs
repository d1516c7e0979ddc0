//! A throwaway PKI for TLS tests: a CA, a server certificate for
//! `localhost` (and 10.0.2.2, the host seen from a qemu guest), and a client certificate, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// Paths of the generated PEM files.
pub struct Pki {
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate (SAN localhost, 127.0.0.1, 10.0.2.2).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair, CertificateParams) {
    let key = KeyPair::generate().expect("ca key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.clone().self_signed(&key).expect("self-sign");
    (cert, key, params)
}

/// Generates a CA with a server and a client certificate under `dir`.
pub fn generate(dir: &Path, ca_name: &str) -> Pki {
    let (ca_cert, ca_key, ca_params) = ca(ca_name);
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_key = KeyPair::generate().expect("server key");
    let mut sp = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        // The host as a qemu guest on user networking sees it.
        "10.0.2.2".to_owned(),
    ])
    .expect("params");
    sp.distinguished_name.push(DnType::CommonName, "localhost");
    let server = sp.signed_by(&server_key, &issuer).expect("server cert");
    let client_key = KeyPair::generate().expect("client key");
    let mut cp = CertificateParams::new(Vec::<String>::new()).expect("params");
    cp.distinguished_name
        .push(DnType::CommonName, "plant-edge-gateway");
    let client = cp.signed_by(&client_key, &issuer).expect("client cert");
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write pem");
        path
    };
    Pki {
        ca: write(&format!("{ca_name}-ca.pem"), ca_cert.pem()),
        server_cert: write(&format!("{ca_name}-server.pem"), server.pem()),
        server_key: write(&format!("{ca_name}-server.key"), server_key.serialize_pem()),
        client_cert: write(&format!("{ca_name}-client.pem"), client.pem()),
        client_key: write(&format!("{ca_name}-client.key"), client_key.serialize_pem()),
    }
}
