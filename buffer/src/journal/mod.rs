//! The journal: a durable, bounded, deduplicating event log over sled.
//!
//! # Invariants
//!
//! 1. **Durable before answered.** An append is answered only after its
//!    events, their dedup entries and the source's cursor state were applied
//!    in one sled batch, `flush`ed, and sled's files `fdatasync`ed (sled's own
//!    flush uses `sync_file_range`, which neither empties the drive cache nor
//!    persists metadata). Sinks never see a sequence before it is durable.
//! 2. **Removed only when done.** A chunk is deleted only when every
//!    registered sink's cursor has passed it. A sink's cursor moves only over
//!    a contiguous prefix of sequences that are *done* for that sink:
//!    acknowledged, dead-lettered, not routed to it, or dropped telemetry.
//!    Cursors never move backwards.
//! 3. **Nothing vanishes uncounted.** Rejections and expiries become dead
//!    letters (with sink, reason, attempts and time); telemetry dropped for
//!    space leaves a tombstone meta and a counter. Business events are never
//!    dropped: their appends are parked until space frees up.
//! 4. **Same id, one append.** An id seen within the dedup window (by count
//!    and by age) is not appended again; the answer says which were
//!    duplicates. The source's cursor is still stored.
//! 5. **One writer.** Sequence numbers are assigned by whoever holds the
//!    commit lock (the group-commit task, or a requeue), so sequences are
//!    contiguous and in commit order, which keeps each source's order.
//!
//! # On-disk layout
//!
//! One sled tree; see [`layout`] for the key families. Events are stored in
//! *chunks* of up to 64 consecutive events of one class (≤ 16 KiB), each
//! with a small meta entry. One key per chunk instead of one per event is
//! what lets a batch of 1,024 events commit as ~40 sled writes, and lets open
//! rebuild the in-memory index from the metas alone, without reading payload.
//!
//! # Failure
//!
//! A failed flush or fdatasync poisons the journal: every later write fails
//! until the process restarts and sled recovers from its log (the lesson of
//! PostgreSQL's fsync bug: retrying a failed fsync can report success for
//! data that never reached the disk).

mod commit;
mod dedup;
pub mod format;
mod inspect;
pub mod interchange;
pub(crate) mod layout;
mod ledger;
mod sinks;
pub mod upgrade;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::EventClass;
use dedup::DedupWindow;
use layout::{ChunkMeta, DeadLetterRecord};

pub use commit::{AppendObserver, AppendOutcome, AppendRequest, Appender, NewEvent, Routes};
pub use inspect::{DeadLetter, EventSummary, JournalStats, SinkStats, VerifyReport};
pub use layout::MAX_EVENT_BYTES;
pub use ledger::{Fate, LedgerEntry, LedgerEvent};
pub use sinks::PendingEvent;

/// Most sinks one journal can route to (one bit each in [`Routes`]).
pub const MAX_SINKS: usize = 64;

/// Everything that can go wrong in the journal, named after the failed step.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The state directory could not be created.
    #[error("creating journal directory {path}: {error}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error (in the message, not a separate source, so that
        /// error chains do not print it twice).
        error: std::io::Error,
    },
    /// Another process (or a just-closed handle whose sled threads have not
    /// finished) holds the journal's lock. Never a reason to move it aside.
    #[error("journal at {path} is locked by another process (is another plant-edge running?)")]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// The journal could not be opened for a reason other than damage to
    /// its data (permission, EIO, a path that is not a directory, too many
    /// open files): nothing on disk is changed; fix it and start again.
    #[error("opening journal at {path}: {reason}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// The operating system's or sled's error.
        reason: String,
    },
    /// sled's own data is damaged (sled reported corruption, or panicked
    /// reading files that all read back without an I/O error). The only
    /// error that may move a journal aside.
    #[error("journal at {path} is damaged: {reason}")]
    Corrupt {
        /// The directory.
        path: PathBuf,
        /// sled's error, or the panic message if sled panicked.
        reason: String,
    },
    /// A sled read or write failed.
    #[error("journal storage: {0}")]
    Storage(#[from] sled::Error),
    /// fdatasync of sled's files failed.
    #[error("syncing journal files: {0}")]
    Sync(std::io::Error),
    /// A stored record did not decode.
    #[error("decoding {what} at key {key:?}: {message}")]
    Decode {
        /// Which record family.
        what: &'static str,
        /// Its key, hex.
        key: String,
        /// The decoder's message.
        message: String,
    },
    /// A record could not be encoded.
    #[error("encoding {what}: {message}")]
    Encode {
        /// Which record family.
        what: &'static str,
        /// The encoder's message.
        message: String,
    },
    /// The event is larger than [`MAX_EVENT_BYTES`].
    #[error("event of {size} bytes exceeds the {max}-byte limit")]
    EventTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The journal is full and the telemetry could not make room.
    #[error("journal full: telemetry event dropped (counted)")]
    TelemetryDropped,
    /// No sink of that name is registered.
    #[error("unknown sink {0:?}")]
    UnknownSink(String),
    /// More than [`MAX_SINKS`] sinks.
    #[error("too many sinks: at most {MAX_SINKS}")]
    TooManySinks,
    /// An earlier flush or fdatasync failed.
    #[error("journal refuses writes after a failed sync; restart the agent")]
    Poisoned,
    /// A commit failed (the first error, as text: it answered many requests).
    #[error("journal write failed: {0}")]
    WriteFailed(String),
    /// The writer task has stopped.
    #[error("journal writer stopped")]
    Closed,
    /// No dead letter with that number.
    #[error("no dead letter {0}")]
    NoDeadLetter(u64),
    /// An interchange file (export, import, rollback spool) could not be
    /// written or read.
    #[error("journal interchange: {0}")]
    Interchange(String),
    /// The journal was written in a newer format than this build reads
    /// (an agent rolled back to an older image): refused, nothing changed.
    #[error("journal at {path} is format {found} (written by {found_writer}); {writer} reads format {supported} and older. Nothing was changed: start the newer version again, or export the backlog with it (plant-edge journal export)")]
    NewerFormat {
        /// The directory.
        path: PathBuf,
        /// The format found.
        found: u32,
        /// Who wrote it.
        found_writer: String,
        /// The newest format this build reads.
        supported: u32,
        /// This build.
        writer: String,
    },
}

/// Journal settings; [`JournalConfig::new`] gives gateway-sized defaults.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// The sled directory.
    pub path: PathBuf,
    /// Bound on pending plus dead-lettered event bytes.
    pub max_bytes: u64,
    /// Pending events older than this are dead-lettered as `expired`.
    pub ttl: Option<Duration>,
    /// sled's page cache bound.
    pub cache_bytes: u64,
    /// Ids are remembered at least this long...
    pub dedup_window: Duration,
    /// ...and at least this many of the most recent ones.
    pub dedup_window_count: usize,
    /// Bound of the append channel (requests, not events).
    pub channel_capacity: usize,
    /// Most events one group commit takes.
    pub max_batch_events: usize,
    /// Commits start at most once per window: appends arriving meanwhile
    /// wait (at most this long) and share one write and one fdatasync.
    /// Zero commits as soon as the last one ended. Fewer, fuller writes
    /// wear flash less; each source still hears "stored" only after its
    /// commit is durable.
    pub commit_window: Duration,
    /// Sinks to register (a sink's cursor starts at the current end).
    pub sinks: Vec<String>,
    /// How long open waits for another handle to release sled's lock.
    pub lock_wait: Duration,
    /// Free space kept on the journal's filesystem: below it, business
    /// appends wait (sources held) and telemetry is refused, as when the
    /// journal is full, until space returns. 0 turns the check off.
    pub min_free_disk: u64,
    /// How long the ledger remembers stored events after delivery, for
    /// `journal report` and `reconcile`; zero writes no ledger. Costs about
    /// 270 bytes of flash writes an event (the `journal_flash` bench).
    pub ledger_keep: Duration,
    /// Bound on the ledger's bytes (about 40 an event): the oldest records
    /// go first when it is reached, whatever `ledger_keep` says.
    pub ledger_max_bytes: u64,
}

impl JournalConfig {
    /// Default cache: 32 MiB suits a gateway with 512 MiB of RAM.
    pub const DEFAULT_CACHE_BYTES: u64 = 32 * 1024 * 1024;
    /// Default disk bound.
    pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024 * 1024;
    /// Default dedup age: a day covers any restart or reconnect.
    pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);
    /// Default dedup count. The window is the second line behind each
    /// source's stored position, which already recognises what a restart
    /// or reconnect re-reads (counter values, handshake exchanges, an OPC
    /// UA record node's last record); it catches what slips past that in
    /// the minutes around it. 50,000 ids is four minutes of 20 busy lines
    /// and hours of a usual plant, in under 2 MiB.
    pub const DEFAULT_DEDUP_WINDOW_COUNT: usize = 50_000;
    /// Default append channel bound.
    pub const DEFAULT_CHANNEL_CAPACITY: usize = 1024;
    /// Default group-commit bound.
    pub const DEFAULT_MAX_BATCH_EVENTS: usize = 4096;
    /// Default free-space reserve: room for sled to finish what it has
    /// started (a segment, its own metadata) when something else fills the
    /// disk.
    pub const DEFAULT_MIN_FREE_DISK: u64 = 32 * 1024 * 1024;
    /// Default ledger memory: a week's shifts and the weekend after.
    pub const DEFAULT_LEDGER_KEEP: Duration = Duration::from_secs(8 * 86_400);
    /// Default ledger bound: about 1.5 million events, 8 days of 2 a second.
    pub const DEFAULT_LEDGER_MAX_BYTES: u64 = 64 * 1024 * 1024;

    /// Defaults for a journal in `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_bytes: Self::DEFAULT_MAX_BYTES,
            ttl: None,
            cache_bytes: Self::DEFAULT_CACHE_BYTES,
            dedup_window: Self::DEFAULT_DEDUP_WINDOW,
            dedup_window_count: Self::DEFAULT_DEDUP_WINDOW_COUNT,
            channel_capacity: Self::DEFAULT_CHANNEL_CAPACITY,
            max_batch_events: Self::DEFAULT_MAX_BATCH_EVENTS,
            commit_window: Duration::ZERO,
            sinks: Vec::new(),
            lock_wait: Duration::from_secs(5),
            min_free_disk: Self::DEFAULT_MIN_FREE_DISK,
            ledger_keep: Self::DEFAULT_LEDGER_KEEP,
            ledger_max_bytes: Self::DEFAULT_LEDGER_MAX_BYTES,
        }
    }
}

/// Cumulative counters, persisted with every write batch.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    bincode::Encode,
    bincode::Decode,
)]
pub struct Counters {
    /// Events appended.
    pub appended: u64,
    /// Appends suppressed as duplicates.
    pub duplicates: u64,
    /// Events acknowledged by a sink (per sink delivery).
    pub delivered: u64,
    /// Events a sink rejected (to dead letters).
    pub rejected: u64,
    /// Events expired by TTL (to dead letters).
    pub expired: u64,
    /// Telemetry dropped for space (oldest dropped, or incoming refused).
    pub dropped_telemetry: u64,
    /// Business appends that had to wait for space.
    pub backpressured: u64,
    /// Dead letters requeued.
    pub requeued: u64,
    /// Dead letters purged.
    pub purged: u64,
    /// Events dead-lettered because their sink was removed from config.
    pub orphaned: u64,
    /// Chunks that no longer decoded, moved aside: events inside them.
    pub quarantined: u64,
}

#[derive(Debug)]
pub(crate) struct SinkState {
    name: String,
    slot: u8,
    /// Every sequence below is done for this sink.
    cursor: u64,
    /// Next sequence to hand out; `cursor..read_upto` is in flight or done.
    read_upto: u64,
    /// Done sequences at or above `cursor`.
    done: BTreeSet<u64>,
}

#[derive(Debug)]
pub(crate) struct State {
    next_seq: u64,
    durable_seq: u64,
    chunks: BTreeMap<u64, ChunkMeta>,
    pending_bytes: u64,
    dead_letter_count: u64,
    dead_letter_bytes: u64,
    next_dead_letter: u64,
    sinks: Vec<SinkState>,
    dedup: DedupWindow,
    counters: Counters,
    full: bool,
    /// The filesystem had less than `min_free_disk` at the last commit.
    disk_low: bool,
    /// When the writer last pruned the ledger (ms).
    ledger_pruned_ms: u64,
    /// Bytes of the ledger's records, against `ledger_max_bytes`.
    ledger_bytes: u64,
    /// A sink cursor moved in memory and is not yet in sled: it goes with
    /// the next commit's batch, or within a second (see [`Journal::save_acks`]).
    acks_unsaved: bool,
}

impl State {
    fn used_bytes(&self) -> u64 {
        self.pending_bytes + self.dead_letter_bytes
    }

    fn sink_index(&self, name: &str) -> Result<usize, JournalError> {
        self.sinks
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| JournalError::UnknownSink(name.to_owned()))
    }

    /// Every registered sink's name and route slot.
    pub(crate) fn sink_slots(&self) -> Vec<(String, u8)> {
        self.sinks
            .iter()
            .map(|s| (s.name.clone(), s.slot))
            .collect()
    }

    /// Lowest cursor of all sinks: chunks wholly below it can go.
    fn floor(&self) -> u64 {
        self.sinks.iter().map(|s| s.cursor).min().unwrap_or(0)
    }
}

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

struct FileSyncer {
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
    fn sync(&mut self) -> std::io::Result<()> {
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

pub(crate) struct Inner {
    config: JournalConfig,
    tree: sled::Db,
    state: Mutex<State>,
    /// Held for the whole of a commit (seq assignment through fdatasync).
    commit_lock: Mutex<()>,
    syncer: Mutex<FileSyncer>,
    poisoned: AtomicBool,
    /// An ack moved a cursor: chunks may be collectable and the cursor is
    /// unsaved; the next commit (or the writer's second tick) takes care.
    gc_pending: AtomicBool,
    durable_tx: watch::Sender<u64>,
    /// Signalled when space is freed, to wake parked business appends.
    space_freed: Notify,
    /// The rollback spool while an upgrade is uncommitted.
    spool: Mutex<Option<upgrade::Spool>>,
}

impl Drop for Inner {
    /// The last handle going away saves unsaved acks, so a journal dropped
    /// without [`Journal::close`] (a tool, a test) does not resend them.
    fn drop(&mut self) {
        if self.poisoned.load(Ordering::SeqCst) {
            return;
        }
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if !st.acks_unsaved && !self.gc_pending.load(Ordering::SeqCst) {
            return;
        }
        let mut batch = sled::Batch::default();
        let saved = Journal::collect_into(st, &mut batch)
            .and_then(|_| self.tree.apply_batch(batch).map_err(JournalError::from))
            .and_then(|_| self.tree.flush().map(|_| ()).map_err(JournalError::from));
        if let Err(e) = saved {
            tracing::warn!(error = %e, "saving delivery cursors at close failed; those events are sent again");
        }
    }
}

/// A durable event journal; cheap to clone (shared handle).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_err(what: &'static str, key: &[u8], e: impl std::fmt::Display) -> JournalError {
    JournalError::Decode {
        what,
        key: hex(key),
        message: e.to_string(),
    }
}

fn encode_err(what: &'static str, e: impl std::fmt::Display) -> JournalError {
    JournalError::Encode {
        what,
        message: e.to_string(),
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

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
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
    fn open_dir(config: JournalConfig) -> Result<Self, JournalError> {
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
        let mut pending_bytes = 0;
        for item in tree.scan_prefix([layout::CHUNK_META]) {
            let (key, value) = item?;
            let decoded = layout::key_seq(&key)
                .ok_or_else(|| decode_err("chunk meta", &key, "short key"))
                .and_then(|first| {
                    layout::decode::<ChunkMeta>(&value)
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
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, never a
        // half-applied sled batch (sled batches are atomic), so recover.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit_guard(&self) -> MutexGuard<'_, ()> {
        self.inner
            .commit_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Flush sled and fdatasync its files; poisons the journal on failure.
    fn sync(&self) -> Result<(), JournalError> {
        let result = self
            .inner
            .tree
            .flush()
            .map_err(JournalError::from)
            .and_then(|_| {
                self.inner
                    .syncer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .sync()
                    .map_err(JournalError::Sync)
            });
        if let Err(e) = &result {
            self.inner.poisoned.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, "journal sync failed; refusing further writes");
        }
        result
    }

    fn check_poisoned(&self) -> Result<(), JournalError> {
        if self.inner.poisoned.load(Ordering::SeqCst) {
            Err(JournalError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Registers a sink (no-op if known); its cursor starts at the current end.
    pub fn register_sink(&self, name: &str) -> Result<(), JournalError> {
        let _commit = self.commit_guard();
        let mut st = self.state();
        if st.sinks.iter().any(|s| s.name == name) {
            return Ok(());
        }
        let slot = (0..MAX_SINKS as u8)
            .find(|slot| !st.sinks.iter().any(|s| s.slot == *slot))
            .ok_or(JournalError::TooManySinks)?;
        let cursor = st.next_seq;
        let mut batch = sled::Batch::default();
        batch.insert(layout::named_key(layout::SINK_SLOT, name), vec![slot]);
        batch.insert(
            vec![layout::SINK_CURSOR, slot],
            cursor.to_be_bytes().to_vec(),
        );
        self.inner.tree.apply_batch(batch)?;
        st.sinks.push(SinkState {
            name: name.to_owned(),
            slot,
            cursor,
            read_upto: cursor,
            done: BTreeSet::new(),
        });
        drop(st);
        self.sync()
    }

    /// Names of the registered sinks.
    pub fn sink_names(&self) -> Vec<String> {
        self.state().sinks.iter().map(|s| s.name.clone()).collect()
    }

    /// The routes mask for the named sinks.
    pub fn routes_for(&self, sinks: &[String]) -> Result<Routes, JournalError> {
        let st = self.state();
        let mut mask = 0u64;
        for name in sinks {
            let index = st.sink_index(name)?;
            mask |= 1u64 << st.sinks[index].slot;
        }
        Ok(Routes(mask))
    }

    /// Routes to every registered sink.
    pub fn routes_all(&self) -> Routes {
        Routes(
            self.state()
                .sinks
                .iter()
                .fold(0, |m, s| m | (1u64 << s.slot)),
        )
    }

    /// The cursor state a source stored with its last durable append.
    pub fn source_cursor(&self, source: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let key = layout::named_key(layout::SOURCE_CURSOR, source);
        let Some(stored) = self.inner.tree.get(&key)? else {
            return Ok(None);
        };
        match layout::decode_cursor(&stored) {
            Ok(plain) => Ok(Some(plain)),
            Err(e) => {
                // Handed over as stored: the source cannot read it either
                // and takes its path for an unreadable position (counted,
                // alarmed), instead of the agent refusing to start.
                tracing::error!(source, error = %e, "stored source cursor does not decompress");
                Ok(Some(stored.to_vec()))
            }
        }
    }

    /// A receiver of the durable end (next sequence); changes after each commit.
    pub fn durable_watch(&self) -> watch::Receiver<u64> {
        self.inner.durable_tx.subscribe()
    }

    /// The configuration this journal was opened with.
    pub fn config(&self) -> &JournalConfig {
        &self.inner.config
    }

    /// Sequences between `sink`'s cursor and the journal's end (O(1); what
    /// [`Journal::stats`] reports per sink without walking every chunk).
    pub fn backlog(&self, sink: &str) -> Result<u64, JournalError> {
        let st = self.state();
        let index = st.sink_index(sink)?;
        Ok(st.next_seq - st.sinks[index].cursor)
    }

    /// Whether a failed write made the journal refuse writes (restart needed).
    pub fn is_poisoned(&self) -> bool {
        self.inner.poisoned.load(Ordering::SeqCst)
    }

    /// Whether business appends are currently waiting for space.
    pub fn is_full(&self) -> bool {
        self.state().full
    }

    /// Free bytes on the journal's filesystem (for an unprivileged user),
    /// if the system can say.
    // The block counts are 32-bit on armv7: the conversions are not
    // useless there.
    #[allow(clippy::useless_conversion)]
    pub fn disk_free(&self) -> Option<u64> {
        let stat = nix::sys::statvfs::statvfs(&self.inner.config.path).ok()?;
        Some(u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size())))
    }

    /// Whether the filesystem is below the configured reserve.
    pub(crate) fn disk_is_low(&self) -> bool {
        let reserve = self.inner.config.min_free_disk;
        reserve > 0 && self.disk_free().is_some_and(|free| free < reserve)
    }

    /// Cumulative counters.
    pub fn counters(&self) -> Counters {
        self.state().counters
    }

    /// Flushes and syncs everything (for shutdown).
    pub fn close(&self) -> Result<(), JournalError> {
        let _commit = self.commit_guard();
        if self.inner.poisoned.load(Ordering::SeqCst) {
            return Err(JournalError::Poisoned);
        }
        self.save_acks_locked()?;
        self.sync()
    }

    fn counters_value(st: &State) -> Result<Vec<u8>, JournalError> {
        layout::encode(&st.counters).map_err(|e| encode_err("counters", e))
    }
}

/// Parses a hyphenated UUID (for CLI lookups).
pub fn parse_id(text: &str) -> Option<Uuid> {
    Uuid::parse_str(text).ok()
}

impl EventClass {
    fn is_telemetry(self) -> bool {
        self == EventClass::Telemetry
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
