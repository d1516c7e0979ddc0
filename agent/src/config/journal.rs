//! The `[journal]` section: its keys, their defaults and their checks.

use std::collections::BTreeSet;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::ConfigError;

fn default_max_bytes() -> ByteSize {
    ByteSize::gib(1)
}
fn default_cache() -> ByteSize {
    ByteSize::mib(32)
}
fn default_min_free_disk() -> ByteSize {
    ByteSize::b(buffer::JournalConfig::DEFAULT_MIN_FREE_DISK)
}
fn default_dedup_window() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_commit_window() -> Duration {
    Duration::from_millis(50)
}
fn default_dedup_window_count() -> usize {
    buffer::JournalConfig::DEFAULT_DEDUP_WINDOW_COUNT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJournal {
    #[serde(default = "default_max_bytes")]
    max_bytes: ByteSize,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    #[serde(default = "default_cache")]
    cache: ByteSize,
    #[serde(default = "default_min_free_disk")]
    min_free_disk: ByteSize,
    #[serde(default = "default_dedup_window", with = "humantime_serde")]
    dedup_window: Duration,
    #[serde(default = "default_dedup_window_count")]
    dedup_window_count: usize,
    #[serde(default = "default_commit_window", with = "humantime_serde")]
    commit_window: Duration,
    #[serde(default)]
    telemetry_types: Vec<String>,
    #[serde(default = "default_ledger_keep", with = "humantime_serde")]
    ledger_keep: Duration,
    #[serde(default = "default_ledger_max_bytes")]
    ledger_max_bytes: ByteSize,
    #[serde(default = "default_upgrade_grace", with = "humantime_serde")]
    upgrade_grace: Duration,
}

fn default_upgrade_grace() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_ledger_max_bytes() -> ByteSize {
    ByteSize::b(buffer::JournalConfig::DEFAULT_LEDGER_MAX_BYTES)
}

fn default_ledger_keep() -> Duration {
    buffer::JournalConfig::DEFAULT_LEDGER_KEEP
}

impl Default for RawJournal {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            ttl: None,
            cache: default_cache(),
            min_free_disk: default_min_free_disk(),
            dedup_window: default_dedup_window(),
            dedup_window_count: default_dedup_window_count(),
            commit_window: default_commit_window(),
            telemetry_types: Vec::new(),
            ledger_keep: default_ledger_keep(),
            ledger_max_bytes: default_ledger_max_bytes(),
            upgrade_grace: default_upgrade_grace(),
        }
    }
}

/// Journal settings after checking.
#[derive(Clone, Debug)]
pub struct JournalSettings {
    /// Bound on stored bytes.
    pub max_bytes: u64,
    /// Time-to-live of pending events.
    pub ttl: Option<Duration>,
    /// sled cache bound.
    pub cache_bytes: u64,
    /// Free space kept on the journal's filesystem (0: no check).
    pub min_free_disk: u64,
    /// How long the ledger keeps delivered events for reports (0: off).
    pub ledger_keep: Duration,
    /// Bound on the ledger's bytes.
    pub ledger_max_bytes: u64,
    /// A format upgrade commits itself after the agent ran this long
    /// (0: only `plant-edge journal commit-upgrade` commits it).
    pub upgrade_grace: Duration,
    /// Dedup window by age.
    pub dedup_window: Duration,
    /// Dedup window by count.
    pub dedup_window_count: usize,
    /// Counter polls within this share one commit (handshakes never wait).
    pub commit_window: Duration,
    /// Event types treated as telemetry.
    pub telemetry_types: BTreeSet<String>,
}

/// Checks the section; `err` names the key and what it expects.
pub(super) fn settings(
    j: &RawJournal,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<JournalSettings, ConfigError> {
    if j.max_bytes.as_u64() < ByteSize::mib(1).as_u64() {
        return Err(err(
            "journal.max_bytes",
            format!("at least 1MiB, found {}", j.max_bytes),
        ));
    }
    if j.cache.as_u64() < ByteSize::mib(1).as_u64() || j.cache.as_u64() > ByteSize::gib(4).as_u64()
    {
        return Err(err(
            "journal.cache",
            format!("between 1MiB and 4GiB, found {}", j.cache),
        ));
    }
    if let Some(ttl) = j.ttl {
        if ttl < Duration::from_secs(60) {
            return Err(err(
                "journal.ttl",
                "at least 1m (or leave it out for no expiry)".into(),
            ));
        }
    }
    if j.commit_window > Duration::from_secs(1) {
        return Err(err(
            "journal.commit_window",
            "at most 1s (counter polls wait this long for their commit; 0s commits at once)".into(),
        ));
    }
    if j.ledger_keep > Duration::from_secs(400 * 86_400) {
        return Err(err(
            "journal.ledger_keep",
            "at most 400days (about 270 bytes of flash an event, kept that long), or \"0s\" for no ledger".into(),
        ));
    }
    if j.upgrade_grace > Duration::from_secs(90 * 86_400) {
        return Err(err(
            "journal.upgrade_grace",
            "at most 90days (the kept journal and the rollback spool grow until the upgrade is committed), or \"0s\" to commit only with plant-edge journal commit-upgrade".into(),
        ));
    }
    if j.ledger_max_bytes.as_u64() < ByteSize::mib(1).as_u64() {
        return Err(err(
            "journal.ledger_max_bytes",
            format!(
                "at least 1MiB (or journal.ledger_keep = \"0s\" for no ledger), found {}",
                j.ledger_max_bytes
            ),
        ));
    }
    if j.dedup_window_count == 0 || j.dedup_window_count > 10_000_000 {
        return Err(err(
            "journal.dedup_window_count",
            "between 1 and 10000000".into(),
        ));
    }
    for t in &j.telemetry_types {
        if t == buffer::EventType::COMPLETION || t == buffer::EventType::SCRAP {
            return Err(err(
                "journal.telemetry_types",
                format!("event types that may be dropped when full; {t} is a business event and is never dropped"),
            ));
        }
    }

    Ok(JournalSettings {
        max_bytes: j.max_bytes.as_u64(),
        ttl: j.ttl,
        cache_bytes: j.cache.as_u64(),
        min_free_disk: j.min_free_disk.as_u64(),
        ledger_keep: j.ledger_keep,
        ledger_max_bytes: j.ledger_max_bytes.as_u64(),
        upgrade_grace: j.upgrade_grace,
        dedup_window: j.dedup_window,
        dedup_window_count: j.dedup_window_count,
        commit_window: j.commit_window,
        telemetry_types: j.telemetry_types.iter().cloned().collect(),
    })
}
