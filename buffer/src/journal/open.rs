//! Opening a journal: sled's lock, its settings file, telling damage
//! from I/O trouble, and rebuilding the in-memory state from the metas.
//!
//! Invariants: only proven damage ([`JournalError::Corrupt`]) may move a
//! journal aside; any other failure to open changes nothing on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::dedup::DedupWindow;
use super::layout::{self, DeadLetterRecord};
use super::{
    decode_err, format, hex, now_ms, upgrade, Counters, Inner, Journal, JournalConfig,
    JournalError, SinkState, State,
};

/// sled keeps its settings in `conf` (the settings bytes, then their
/// CRC-32 little-endian) and rewrites it at every open without syncing it:
/// a power cut can leave it empty (sled then writes it again) or torn
/// (sled refuses the whole journal as corrupt). Those settings are the
/// agent's own, passed at every open, so a torn file is not damage to the
/// journal: it is removed and sled writes it again from them.
fn settle_settings_file(dir: &Path) -> std::io::Result<()> {
    let path = dir.join("conf");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if bytes.len() <= 8 {
        return Ok(());
    }
    let (settings, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(settings) == stored {
        return Ok(());
    }
    tracing::warn!(
        file = %path.display(),
        bytes = bytes.len(),
        "the journal's settings file is torn (a power cut while sled rewrote it); writing it again from the agent's settings. The journal itself is not affected"
    );
    std::fs::remove_file(&path)?;
    File::open(dir)?.sync_all()
}

pub(super) struct FileSyncer {
    dir: PathBuf,
    db_file: File,
    synced_blobs: BTreeSet<PathBuf>,
}

impl FileSyncer {
    fn open(dir: &Path) -> std::io::Result<Self> {
        let db_file = File::open(dir.join("db"))?;
        // sled rewrote its settings at open; make them and the directory
        // durable now, not at the next cut.
        match File::open(dir.join("conf")) {
            Ok(conf) => conf.sync_all()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        File::open(dir)?.sync_all()?;
        Ok(Self {
            dir: dir.to_owned(),
            db_file,
            synced_blobs: BTreeSet::new(),
        })
    }

    /// fdatasync sled's log file and any blob file it wrote since last time.
    pub(super) fn sync(&mut self) -> std::io::Result<()> {
        self.db_file.sync_data()?;
        let blobs = self.dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&blobs) else {
            return Ok(());
        };
        let mut present = BTreeSet::new();
        let mut new_blob = false;
        for entry in entries {
            let path = entry?.path();
            if !self.synced_blobs.contains(&path) {
                match File::open(&path).and_then(|f| f.sync_all()) {
                    Ok(()) => new_blob = true,
                    // sled deletes a blob once its value is replaced or
                    // removed (a delivered chunk collected while this
                    // commit ran); that removal is in the log just synced
                    // and nothing of the blob is left to make durable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            present.insert(path);
        }
        if new_blob {
            File::open(&blobs)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

/// The first file under `dir` that does not read back in full, with the
/// I/O error; `None` when every file reads.
/// Files in the journal that belong to someone else than the journal
/// directory's owner (left by a command run as root), named for the
/// operator: sled's own "Permission denied" names none.
fn foreign_owners(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(owner) = std::fs::metadata(dir).map(|m| m.uid()) else {
        return String::new();
    };
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.uid() != owner {
                    found.push(format!("{} (uid {})", path.display(), meta.uid()));
                }
                if meta.is_dir() {
                    pending.push(path);
                }
            }
        }
    }
    if found.is_empty() {
        return String::new();
    }
    found.sort();
    format!(
        "; owned by another user than the journal (uid {owner}): {}; give them back with chown -R --reference={} {}",
        found.join(", "),
        dir.display(),
        dir.display()
    )
}

fn unreadable_file(dir: &Path) -> Option<String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return Some(format!("{}: {e}", dir.display())),
    };
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(e) => return Some(format!("{}: {e}", dir.display())),
        };
        let found = if path.is_dir() {
            unreadable_file(&path)
        } else {
            File::open(&path)
                .and_then(|mut f| std::io::copy(&mut f, &mut std::io::sink()))
                .err()
                .map(|e| format!("{}: {e}", path.display()))
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Whether another handle holds the lock sled takes on the journal's `db`
/// file (a handle of this process still closing, or another process):
/// asked of the OS with the same non-blocking `flock` sled uses, since
/// sled reports it only as message text.
fn db_file_locked(path: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let Ok(file) = std::fs::File::open(path.join("db")) else {
        return false;
    };
    // Taken and released at once when free.
    matches!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

pub(super) fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "sled panicked".to_owned()
    }
}

impl Journal {
    /// Opens (or creates) the journal and resumes every cursor; upgrades an
    /// older format, or rolls back to a journal kept from before an
    /// uncommitted upgrade (see [`upgrade`]).
    pub fn open(config: JournalConfig) -> Result<Self, JournalError> {
        upgrade::prepare(&config)?;
        let journal = Self::open_dir(config)?;
        journal.attach_upgrade_state()?;
        Ok(journal)
    }

    /// Opens the journal in `config.path` as it is.
    pub(super) fn open_dir(config: JournalConfig) -> Result<Self, JournalError> {
        std::fs::create_dir_all(&config.path).map_err(|error| JournalError::CreateDir {
            path: config.path.clone(),
            error,
        })?;
        let open_error = |reason: String| JournalError::Open {
            path: config.path.clone(),
            reason,
        };
        // Damage is proven only when every file reads back without an I/O
        // error: a panic or "corruption" over an unreadable file is an I/O
        // problem, and moving the journal aside would strand its backlog.
        let damaged = |reason: String| match unreadable_file(&config.path) {
            Some(io) => JournalError::Open {
                path: config.path.clone(),
                reason: format!("{reason} ({io})"),
            },
            None => JournalError::Corrupt {
                path: config.path.clone(),
                reason,
            },
        };
        let sled_error = |e: sled::Error| match e {
            sled::Error::Corruption { .. } => damaged(e.to_string()),
            sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                open_error(format!("{e}{}", foreign_owners(&config.path)))
            }
            other => open_error(other.to_string()),
        };
        // Before sled touches anything: a newer journal is not ours to open.
        format::check(&config.path)?;
        settle_settings_file(&config.path).map_err(|e| open_error(e.to_string()))?;
        // A damaged log can make sled panic instead of returning an error;
        // the caller must get an error it can act on (move aside), not a crash.
        let sled_config = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(Some(1000));
        // sled releases its file lock only when its background threads let
        // go of the last handle, a moment after a close; wait that out.
        let lock_deadline = std::time::Instant::now() + config.lock_wait;
        let tree = loop {
            let opened =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sled_config.open()))
                    .map_err(|p| damaged(panic_message(p)))?;
            match opened {
                Ok(tree) => break tree,
                Err(sled::Error::Io(_)) if db_file_locked(&config.path) => {
                    if std::time::Instant::now() >= lock_deadline {
                        return Err(JournalError::Locked {
                            path: config.path.clone(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(sled_error(e)),
            }
        };
        let syncer = FileSyncer::open(&config.path).map_err(|e| open_error(e.to_string()))?;
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::load_state(&tree, &config)
        }))
        .map_err(|p| damaged(panic_message(p)))?
        .map_err(|e| match e {
            JournalError::Storage(e) => sled_error(e),
            other => other,
        })?;
        let (durable_tx, _) = watch::channel(loaded.durable_seq);
        let segment_reader = super::segments::Reader::new(&config.path);
        let journal = Self {
            inner: Arc::new(Inner {
                config,
                tree,
                state: Mutex::new(loaded),
                commit_lock: Mutex::new(()),
                syncer: Mutex::new(syncer),
                poisoned: AtomicBool::new(false),
                gc_pending: AtomicBool::new(false),
                durable_tx,
                space_freed: Notify::new(),
                spool: Mutex::new(None),
                segment_reader,
            }),
        };
        let sinks = journal.inner.config.sinks.clone();
        for sink in &sinks {
            journal.register_sink(sink)?;
        }
        Ok(journal)
    }

    /// Opens the journal; if its data is proven damaged ([`JournalError::Corrupt`]
    /// or an undecodable record of our own), renames the directory to
    /// `<dir>.unreadable-<unix-seconds>` (never deletes it) and starts a
    /// fresh one. Any other error (permission, EIO, a file where the
    /// directory should be) is returned with nothing on disk changed.
    /// Returns where the old one went, if it was moved.
    pub fn open_or_move_aside(
        config: JournalConfig,
    ) -> Result<(Self, Option<PathBuf>), JournalError> {
        match Self::open(config.clone()) {
            Ok(journal) => Ok((journal, None)),
            Err(err @ (JournalError::Corrupt { .. } | JournalError::Decode { .. })) => {
                let stamp = now_ms() / 1000;
                let mut aside = config.path.clone().into_os_string();
                aside.push(format!(".unreadable-{stamp}"));
                let aside = PathBuf::from(aside);
                tracing::error!(
                    journal = %config.path.display(),
                    moved_to = %aside.display(),
                    error = %err,
                    "JOURNAL UNREADABLE: moved aside and starting a fresh journal; \
                     the old one is kept for inspection and recovery"
                );
                std::fs::rename(&config.path, &aside).map_err(|e| JournalError::Open {
                    path: config.path.clone(),
                    reason: format!("{err}; and moving it aside failed: {e}"),
                })?;
                Ok((Self::open(config)?, Some(aside)))
            }
            Err(other) => Err(other),
        }
    }

    fn load_state(tree: &sled::Db, config: &JournalConfig) -> Result<State, JournalError> {
        let read_u64 = |key: &[u8]| -> Result<Option<u64>, JournalError> {
            match tree.get(key)? {
                None => Ok(None),
                Some(v) => layout::u64_value(&v)
                    .map(Some)
                    .ok_or_else(|| decode_err("u64", key, "not 8 bytes")),
            }
        };
        let mut next_seq = read_u64(layout::NEXT_SEQ)?.unwrap_or(0);
        let next_dead_letter = read_u64(layout::NEXT_DEAD_LETTER)?.unwrap_or(0);
        let counters = match tree.get(layout::COUNTERS)? {
            Some(v) => {
                layout::decode(&v).map_err(|e| decode_err("counters", layout::COUNTERS, e))?
            }
            None => Counters::default(),
        };

        let mut chunks = BTreeMap::new();
        let mut live_segments = BTreeMap::new();
        let mut pending_bytes = 0;
        for item in tree.scan_prefix([layout::CHUNK_META]) {
            let (key, value) = item?;
            let decoded = layout::key_seq(&key)
                .ok_or_else(|| decode_err("chunk meta", &key, "short key"))
                .and_then(|first| {
                    layout::decode_meta(&value)
                        .map(|meta| (first, meta))
                        .map_err(|e| decode_err("chunk meta", &key, e))
                });
            let (first, meta) = match decoded {
                Ok(found) => found,
                // One damaged index entry must not cost the readable rest of
                // the journal: its chunk stays on disk (verify reports it as
                // events without meta) and everything else is delivered.
                Err(e) => {
                    tracing::error!(error = %e, "journal chunk index entry does not decode; its chunk is skipped and kept on disk");
                    continue;
                }
            };
            pending_bytes += meta.bytes;
            next_seq = next_seq.max(meta.last + 1);
            if meta.segment != layout::NO_SEGMENT {
                *live_segments.entry(meta.segment).or_insert(0u64) += 1;
            }
            chunks.insert(first, meta);
        }

        let mut sinks = Vec::new();
        for item in tree.scan_prefix([layout::SINK_SLOT]) {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            let slot = *value
                .first()
                .ok_or_else(|| decode_err("sink slot", &key, "empty"))?;
            let cursor_key = [layout::SINK_CURSOR, slot];
            let cursor = read_u64(&cursor_key)?.unwrap_or(next_seq).min(next_seq);
            sinks.push(SinkState {
                name,
                slot,
                cursor,
                read_upto: cursor,
                done: BTreeSet::new(),
            });
        }

        let mut dedup = DedupWindow::new(config.dedup_window, config.dedup_window_count);
        for item in tree.scan_prefix([layout::DEDUP]) {
            let (key, value) = item?;
            let group =
                layout::key_seq(&key).ok_or_else(|| decode_err("dedup", &key, "short key"))?;
            match layout::decode::<layout::DedupRecord>(&value) {
                Ok(record) => dedup.insert_group(group, record.appended_ms, record.ids),
                // A lost dedup group only weakens the second line of defence
                // (source cursors are the first); say so and carry on.
                Err(e) => {
                    tracing::warn!(key = %hex(&key), error = %e, "skipping undecodable dedup group")
                }
            }
        }

        let mut dead_letter_count = 0;
        let mut dead_letter_bytes = 0;
        for item in tree.scan_prefix([layout::DEAD_LETTER]) {
            let (_key, value) = item?;
            dead_letter_count += 1;
            dead_letter_bytes += match layout::decode::<DeadLetterRecord>(&value) {
                Ok(record) => record.event.charge(),
                Err(_) => value.len() as u64,
            };
        }

        let segments =
            super::segments::Segments::open(&config.path, live_segments).map_err(|e| {
                JournalError::Open {
                    path: config.path.clone(),
                    reason: format!("opening the chunk segment files: {e}"),
                }
            })?;
        Ok(State {
            next_seq,
            durable_seq: next_seq,
            chunks,
            pending_bytes,
            dead_letter_count,
            dead_letter_bytes,
            next_dead_letter,
            sinks,
            dedup,
            counters,
            full: false,
            disk_low: false,
            ledger_pruned_ms: 0,
            ledger_bytes: Self::ledger_bytes(tree)?,
            acks_unsaved: false,
            segments,
        })
    }
}

#[cfg(test)]
mod owner_tests {
    use super::*;

    #[test]
    fn files_of_another_owner_than_the_journal_are_named_with_their_uid() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), b"x").expect("db");
        std::fs::write(dir.path().join("snap.0000"), b"x").expect("snap");
        assert_eq!(foreign_owners(dir.path()), "", "all the journal's own");
        assert_eq!(
            std::fs::metadata(dir.path()).expect("meta").uid(),
            0,
            "this test gives files to another user: run it as root (scripts/test.sh does)"
        );
        std::os::unix::fs::chown(dir.path(), Some(4242), Some(4242)).expect("chown");
        std::os::unix::fs::chown(dir.path().join("db"), Some(4242), Some(4242)).expect("chown");
        let named = foreign_owners(dir.path());
        assert!(
            named.contains("snap.0000 (uid 0)") && !named.contains("/db "),
            "{named}"
        );
        assert!(named.contains("chown -R --reference="), "{named}");
    }
}
