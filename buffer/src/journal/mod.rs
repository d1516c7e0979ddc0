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
mod open;
mod segments;
mod sinks;
pub mod upgrade;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::EventClass;
use dedup::DedupWindow;
use layout::ChunkMeta;
use open::{panic_message, FileSyncer};

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
    /// A segment file could not be read for a reason other than damage
    /// (EIO, permissions, no file descriptors left): an error the reader
    /// retries, never a reason to quarantine what the file holds.
    #[error("reading journal segment file {path}: {error}")]
    SegmentRead {
        /// The segment file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
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
    /// The segment files holding chunk bytes.
    segments: segments::Segments,
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
    /// Reads chunk bytes from the segment files.
    segment_reader: segments::Reader,
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

impl Journal {
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
        // Taken before the flush: their pointers' removal is in a batch
        // already applied, so this flush makes it durable.
        let dead = self.state().segments.take_dead();
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
        } else {
            segments::delete(&self.inner.config.path, &dead);
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
