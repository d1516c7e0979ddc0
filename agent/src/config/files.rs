//! What the checks read off the machine: writable directories, readable
//! files, secrets (files, systemd credentials) and TLS material.

use std::path::{Path, PathBuf};

/// Whether `dir` (or, if absent, its nearest existing ancestor) accepts a
/// new file. Probes with a real file: permission bits do not tell the whole
/// truth (read-only mounts, ACLs, systemd's ProtectSystem).
pub(super) fn writable(dir: &Path) -> Result<(), String> {
    let mut probe_dir = dir;
    while !probe_dir.exists() {
        match probe_dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => probe_dir = parent,
            _ => return Ok(()),
        }
    }
    if !probe_dir.is_dir() {
        return Err(format!("{} is not a directory", probe_dir.display()));
    }
    let probe = probe_dir.join(format!(".plant-edge-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("{} is not writable: {e}", probe_dir.display())),
    }
}

pub(super) fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub(super) fn readable_file(path: &Path) -> Result<(), String> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", path.display()))
}

thread_local! {
    /// Set while a command that never logs in anywhere (`status`,
    /// `journal`) loads the configuration: it must work without access to
    /// the secrets (they are root-only, and not there outside the unit).
    pub(super) static SKIP_SECRETS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Where a secret named by a relative path is looked for, in order: the
/// path itself (relative to the working directory), the unit's
/// `$CREDENTIALS_DIRECTORY`, then `credentials/` beside the configuration
/// file (`/etc/plant-edge/credentials/`, where `LoadCredential=` takes them
/// from), so `validate` by hand finds what the unit will get.
pub(super) fn secret_candidates(config_file: &Path, path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_owned()];
    if path.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            out.push(PathBuf::from(dir).join(path));
        }
        let beside = config_file
            .parent()
            .unwrap_or(Path::new("."))
            .join("credentials")
            .join(path);
        out.push(beside);
    }
    out
}

/// Reads a secret (a file, a systemd credential, or one in `credentials/`
/// beside the config; see [`secret_candidates`]); trailing newlines are not
/// part of it.
pub(super) fn read_secret(config_file: &Path, path: &Path) -> Result<String, String> {
    if SKIP_SECRETS.with(|s| s.get()) {
        return Ok(String::new());
    }
    let candidates = secret_candidates(config_file, path);
    let Some(found) = candidates.iter().find(|c| c.exists()) else {
        let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
        return Err(format!("not found; looked in {}", tried.join(", ")));
    };
    std::fs::read_to_string(found)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|e| format!("{}: {e}", found.display()))
}

/// CA file, client certificate and key: readable, and cert and key together.
pub(super) fn check_tls_files(
    ca_file: &Option<PathBuf>,
    client_cert: &Option<PathBuf>,
    client_key: &Option<PathBuf>,
) -> Result<(), (&'static str, String)> {
    if client_cert.is_some() != client_key.is_some() {
        return Err((
            "client_key",
            "set together with client_cert (mutual TLS needs both)".into(),
        ));
    }
    for (sub, path) in [
        ("ca_file", ca_file),
        ("client_cert", client_cert),
        ("client_key", client_key),
    ] {
        if let Some(path) = path {
            readable_file(path).map_err(|why| (sub, format!("a readable PEM file ({why})")))?;
        }
    }
    Ok(())
}
