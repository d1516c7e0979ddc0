//! Format upgrades and rollbacks of the journal directory `P`.
//!
//! - **Upgrade** (this build's format is newer than `P`'s): `P` is exported
//!   in the interchange format and imported into `P.upgrading`, stamped with
//!   this build's format and marked with an `UPGRADE` file; then `P` becomes
//!   `P.format-<old>` (kept, untouched) and `P.upgrading` becomes `P`.
//! - **Until committed**, every commit also appends what it stored (events,
//!   dead letters at source, positions) to `P.format-<old>/ROLLBACK.ndjson`,
//!   fdatasync'ed before any source hears "stored": the previous version
//!   reads that format.
//! - **Commit** (`plant-edge journal commit-upgrade`, the agent after its
//!   grace period, or a spool past `max_bytes`): the kept directory and the
//!   marker go; a rollback is then refused like any newer journal.
//! - **Rollback** (`P` is newer than this build, and its marker names a kept
//!   directory this build reads): `P` becomes `P.rolled-back`, the kept
//!   directory becomes `P` again, and at open the spool is imported (ids
//!   deduplicated, positions replaced), then removed with `P.rolled-back`.
//!   The kept journal plus the spool hold everything the newer version
//!   captured. The spool also notes its deliveries (unsynced, with the next
//!   commit or within a second): what it stored and delivered is not sent
//!   again; the rest of what it delivered goes again with the same ids.
//! - A later format's migration reads the earlier format to export it: a
//!   build keeps the reader of the format before its own.
//!
//! Invariants: every step is a rename or a file that is written whole; a
//! crash between the two renames of an upgrade or a rollback is finished at
//! the next open; a partial `P.upgrading` is removed and the upgrade
//! started again from `P`, which nothing changed. Nothing is quarantined
//! because of a version.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::interchange;
use super::{format, Journal, JournalConfig, JournalError};

/// The marker inside an upgraded, uncommitted journal.
pub const UPGRADE_FILE: &str = "UPGRADE";
/// The rollback spool inside the kept directory.
pub const SPOOL_FILE: &str = "ROLLBACK.ndjson";

/// What an uncommitted upgrade left in its marker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeMarker {
    /// The kept journal's format.
    pub from_format: u32,
    /// Who wrote the kept journal.
    pub from_writer: String,
    /// The upgraded journal's format.
    pub to_format: u32,
    /// The kept directory's file name, beside the journal.
    pub kept: String,
    /// The first sequence of the upgraded journal that the spool carries
    /// (what came before was imported from the kept journal).
    pub spool_from_seq: u64,
    /// When the upgrade ran (RFC 3339).
    pub started: String,
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn io_error(path: &Path, step: &str) -> impl Fn(std::io::Error) -> JournalError {
    let path = path.to_owned();
    let step = step.to_owned();
    move |e| JournalError::Open {
        path: path.clone(),
        reason: format!("{step}: {e}"),
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir, "syncing the directory"))
}

fn rename(from: &Path, to: &Path) -> Result<(), JournalError> {
    std::fs::rename(from, to).map_err(io_error(from, &format!("renaming to {}", to.display())))?;
    sync_dir(&parent_of(to))
}

/// The marker of the journal in `dir`, if it holds one.
pub fn marker(dir: &Path) -> Result<Option<UpgradeMarker>, JournalError> {
    let file = dir.join(UPGRADE_FILE);
    match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| JournalError::Open {
                path: dir.to_owned(),
                reason: format!("{} is not an upgrade marker: {e}", file.display()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(dir, "reading the upgrade marker")(e)),
    }
}

fn write_marker(dir: &Path, marker: &UpgradeMarker) -> Result<(), JournalError> {
    let temporary = dir.join(format!("{UPGRADE_FILE}.new"));
    let bytes = serde_json::to_vec_pretty(marker).map_err(|e| JournalError::Encode {
        what: "upgrade marker",
        message: e.to_string(),
    })?;
    let io = io_error(dir, "writing the upgrade marker");
    let mut file = File::create(&temporary).map_err(&io)?;
    file.write_all(&bytes).map_err(&io)?;
    file.sync_all().map_err(&io)?;
    std::fs::rename(&temporary, dir.join(UPGRADE_FILE)).map_err(&io)?;
    sync_dir(dir)
}

/// The stamp of `dir`'s journal, an unstamped one holding sled's files
/// counting as format 1 (as [`format::check`] stamps it).
fn format_of(dir: &Path) -> Result<Option<u32>, JournalError> {
    Ok(match format::read(dir)? {
        Some(stamp) => Some(stamp.format),
        None if dir.join("db").exists() => Some(1),
        None => None,
    })
}

/// Brings the directory `config.path` to this build's format before it is
/// opened: finishes an interrupted upgrade or rollback, rolls back to a kept
/// journal, or upgrades an older one. A newer journal without a kept one
/// is left for [`format::check`] to refuse.
pub(super) fn prepare(config: &JournalConfig) -> Result<(), JournalError> {
    let path = &config.path;
    let upgrading = sibling(path, ".upgrading");
    let rolled_back = sibling(path, ".rolled-back");
    if !path.exists() {
        if marker(&upgrading)?.is_some() {
            tracing::warn!(journal = %path.display(), "finishing an upgrade interrupted between its renames");
            rename(&upgrading, path)?;
        } else if let Some(marker) = marker(&rolled_back)? {
            let kept = parent_of(path).join(&marker.kept);
            if kept.exists() {
                tracing::warn!(journal = %path.display(), "finishing a rollback interrupted between its renames");
                rename(&kept, path)?;
            }
        }
    }
    if upgrading.exists() {
        // The upgrade that wrote it did not finish; the journal it started
        // from is unchanged and is upgraded again below.
        std::fs::remove_dir_all(&upgrading)
            .map_err(io_error(&upgrading, "removing a partial upgrade"))?;
    }
    let Some(found) = format_of(path)? else {
        return Ok(());
    };
    let ours = format::current();
    if found > ours {
        return roll_back(path, ours);
    }
    if found < ours {
        return upgrade(config, found, ours);
    }
    Ok(())
}

fn roll_back(path: &Path, ours: u32) -> Result<(), JournalError> {
    let Some(marker) = marker(path).ok().flatten() else {
        return Ok(());
    };
    let kept = parent_of(path).join(&marker.kept);
    if !kept.exists() || format_of(&kept)?.is_none_or(|kept_format| kept_format > ours) {
        return Ok(());
    }
    let rolled_back = sibling(path, ".rolled-back");
    if rolled_back.exists() {
        std::fs::remove_dir_all(&rolled_back).map_err(io_error(
            &rolled_back,
            "removing an earlier rolled-back journal",
        ))?;
    }
    tracing::warn!(
        journal = %path.display(),
        newer_format = marker.to_format,
        kept = %kept.display(),
        "ROLLBACK: this journal was upgraded by a newer version and not committed; going back to the journal kept from before the upgrade and importing what the newer version stored since"
    );
    rename(path, &rolled_back)?;
    rename(&kept, path)
}

fn upgrade(config: &JournalConfig, found: u32, ours: u32) -> Result<(), JournalError> {
    let path = &config.path;
    let upgrading = sibling(path, ".upgrading");
    let kept_name = format!(
        "{}.format-{found}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "journal".into())
    );
    let kept = parent_of(path).join(&kept_name);
    let export_file = sibling(path, ".upgrade.ndjson");
    let from_writer = format::read(path)?
        .map(|s| s.writer)
        .unwrap_or_else(|| "plant-edge before format stamps".into());
    tracing::warn!(journal = %path.display(), from = found, to = ours, "UPGRADE: migrating the journal to this version's format; the old one is kept until the upgrade is committed");

    let mut old_config = config.clone();
    old_config.sinks.clear();
    let old = Journal::open_dir(old_config)?;
    let sinks = old.sink_names();
    {
        let io = io_error(&export_file, "writing the upgrade's export");
        let mut out = std::io::BufWriter::new(File::create(&export_file).map_err(&io)?);
        old.export_to(&mut out)?;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(&io)?;
    }
    old.close()?;
    drop(old);

    let mut new_config = config.clone();
    new_config.path = upgrading.clone();
    new_config.sinks = sinks;
    let new = Journal::open_dir(new_config)?;
    let mut input = BufReader::new(
        File::open(&export_file).map_err(io_error(&export_file, "reading the upgrade's export"))?,
    );
    let counts = new.import_from(&mut input)?;
    let marker = UpgradeMarker {
        from_format: found,
        from_writer,
        to_format: ours,
        kept: kept_name,
        spool_from_seq: new.stats().next_seq,
        started: crate::event::rfc3339_millis(std::time::SystemTime::now()),
    };
    new.close()?;
    drop(new);
    write_marker(&upgrading, &marker)?;

    if kept.exists() {
        let aside = sibling(&kept, &format!(".stale-{}", super::now_ms() / 1000));
        tracing::warn!(kept = %kept.display(), moved_to = %aside.display(), "a kept journal of that format was already there; moved aside, not deleted");
        rename(&kept, &aside)?;
    }
    rename(path, &kept)?;
    rename(&upgrading, path)?;
    let _ = std::fs::remove_file(&export_file);
    tracing::warn!(
        journal = %path.display(),
        kept = %kept.display(),
        events = counts.events,
        dead_letters = counts.dead_letters,
        positions = counts.positions,
        "UPGRADE done; commit it with `plant-edge journal commit-upgrade` once this version is good (or it commits itself after journal.upgrade_grace)"
    );
    Ok(())
}

/// Ends the upgrade of the journal at `path`: removes the kept journal and
/// the marker. Returns the marker and the bytes freed; `None` when no
/// upgrade was pending. Works on the files alone, the agent running or not.
pub fn commit(path: &Path) -> Result<Option<(UpgradeMarker, u64)>, JournalError> {
    let Some(found) = marker(path)? else {
        return Ok(None);
    };
    let kept = parent_of(path).join(&found.kept);
    let freed = directory_bytes(&kept);
    if kept.exists() {
        std::fs::remove_dir_all(&kept).map_err(io_error(&kept, "removing the kept journal"))?;
    }
    std::fs::remove_file(path.join(UPGRADE_FILE))
        .map_err(io_error(path, "removing the upgrade marker"))?;
    sync_dir(path)?;
    sync_dir(&parent_of(path))?;
    Ok(Some((found, freed)))
}

fn directory_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => directory_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The open rollback spool of an uncommitted upgrade.
pub(super) struct Spool {
    file: File,
    path: PathBuf,
    bytes: u64,
    /// Deliveries not yet written: (sink, sequences).
    delivered: Vec<(String, Vec<u64>)>,
}

impl Spool {
    /// Appends the deliveries noted since the last write, then whole
    /// `lines`, and fdatasyncs them if `sync`. `Ok(false)`: the upgrade
    /// was committed meanwhile (the spool is gone), nothing to write.
    pub(super) fn append(&mut self, lines: &[Vec<u8>], sync: bool) -> Result<bool, JournalError> {
        let io = io_error(&self.path, "appending to the rollback spool");
        if self.file.metadata().map_err(&io)?.nlink() == 0 {
            return Ok(false);
        }
        let mut buffer = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for (sink, seqs) in self.delivered.drain(..) {
            let line = serde_json::json!({"record": "delivered", "sink": sink, "seqs": seqs});
            buffer.extend_from_slice(line.to_string().as_bytes());
            buffer.push(b'\n');
        }
        for line in lines {
            buffer.extend_from_slice(line);
            buffer.push(b'\n');
        }
        if buffer.is_empty() {
            return Ok(true);
        }
        self.file.write_all(&buffer).map_err(&io)?;
        if sync {
            self.file.sync_data().map_err(&io)?;
        }
        self.bytes += buffer.len() as u64;
        Ok(true)
    }

    /// Bytes the spool holds.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The highest sequence of an event record in the spool at `path`, after
/// cutting a line torn by a crash; `None` when it holds none.
fn spool_tail(file: &mut File, path: &Path) -> Result<Option<u64>, JournalError> {
    #[derive(Deserialize)]
    struct Seq {
        record: String,
        #[serde(default)]
        seq: Option<u64>,
    }
    let io = io_error(path, "reading the rollback spool");
    file.seek(SeekFrom::Start(0)).map_err(&io)?;
    let mut reader = BufReader::new(&mut *file);
    let mut whole = 0u64;
    let mut highest = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(&io)?;
        if read == 0 || line.last() != Some(&b'\n') {
            break;
        }
        whole += read as u64;
        if let Ok(Seq {
            record,
            seq: Some(seq),
        }) = serde_json::from_slice::<Seq>(&line)
        {
            if record == "event" {
                highest = Some(highest.map_or(seq, |h: u64| h.max(seq)));
            }
        }
    }
    drop(reader);
    if file.metadata().map_err(&io)?.len() > whole {
        tracing::warn!(spool = %path.display(), "cutting a line a crash left half-written in the rollback spool");
        file.set_len(whole).map_err(&io)?;
        file.sync_all().map_err(&io)?;
    }
    file.seek(SeekFrom::End(0)).map_err(&io)?;
    Ok(highest)
}

impl Journal {
    /// After open: imports a rollback spool found in this journal (it was
    /// the kept journal of an upgrade just rolled back), and opens the spool
    /// of an uncommitted upgrade, first writing to it what a crash kept out.
    pub(super) fn attach_upgrade_state(&self) -> Result<(), JournalError> {
        let path = self.inner.config.path.clone();
        let spool_here = path.join(SPOOL_FILE);
        if spool_here.exists() {
            let counts = self.import_spool(&spool_here)?;
            tracing::warn!(
                journal = %path.display(),
                events = counts.events,
                duplicates = counts.duplicates,
                dead_letters = counts.dead_letters,
                positions = counts.positions,
                "ROLLBACK: imported what the newer version stored before it was rolled back; its deliveries are sent again with the same ids"
            );
            std::fs::remove_file(&spool_here)
                .map_err(io_error(&spool_here, "removing the imported spool"))?;
            sync_dir(&path)?;
        }
        let rolled_back = sibling(&path, ".rolled-back");
        if rolled_back.exists() {
            std::fs::remove_dir_all(&rolled_back)
                .map_err(io_error(&rolled_back, "removing the rolled-back journal"))?;
            sync_dir(&parent_of(&path))?;
        }
        let Some(marker) = marker(&path)? else {
            return Ok(());
        };
        let kept = parent_of(&path).join(&marker.kept);
        if !kept.exists() {
            // Committed by hand half-way: the kept journal went, the marker stayed.
            std::fs::remove_file(path.join(UPGRADE_FILE))
                .map_err(io_error(&path, "removing the upgrade marker"))?;
            return sync_dir(&path);
        }
        let spool_path = kept.join(SPOOL_FILE);
        let io = io_error(&spool_path, "opening the rollback spool");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&spool_path)
            .map_err(&io)?;
        let highest = spool_tail(&mut file, &spool_path)?;
        let mut spool = Spool {
            bytes: file.metadata().map_err(&io)?.len(),
            file,
            path: spool_path,
            delivered: Vec::new(),
        };
        let mut lines = Vec::new();
        if spool.bytes == 0 {
            lines.push(interchange::header_line(marker.from_format, None)?);
        }
        let from = highest.map_or(marker.spool_from_seq, |h| h + 1);
        lines.extend(self.spool_lines_from(from)?);
        for (source, plain) in self.source_cursors()? {
            lines.push(interchange::position_line(&source, &plain)?);
        }
        spool.append(&lines, true)?;
        *self.inner.spool.lock().unwrap_or_else(|p| p.into_inner()) = Some(spool);
        Ok(())
    }

    /// Imports a rollback spool: what the newer version delivered is
    /// stored as done for those sinks (its deliveries are read first, a
    /// spool lists them after the events).
    fn import_spool(&self, path: &Path) -> Result<interchange::InterchangeCounts, JournalError> {
        #[derive(Deserialize)]
        struct Delivered {
            record: String,
            #[serde(default)]
            sink: String,
            #[serde(default)]
            seqs: Vec<u64>,
        }
        let io = io_error(path, "reading the rollback spool");
        let mut delivered: HashMap<u64, Vec<String>> = HashMap::new();
        for line in BufReader::new(File::open(path).map_err(&io)?).lines() {
            let line = line.map_err(&io)?;
            if !line.contains("\"delivered\"") {
                continue;
            }
            if let Ok(found) = serde_json::from_str::<Delivered>(&line) {
                if found.record == "delivered" {
                    for seq in found.seqs {
                        delivered.entry(seq).or_default().push(found.sink.clone());
                    }
                }
            }
        }
        let mut input = BufReader::new(File::open(path).map_err(&io)?);
        self.import_with(&mut input, &delivered)
    }

    /// Event lines of every pending event at or after `from`.
    fn spool_lines_from(&self, from: u64) -> Result<Vec<Vec<u8>>, JournalError> {
        let (metas, slots) = {
            let st = self.state();
            let metas: Vec<_> = st
                .chunks
                .range(..)
                .filter(|(_, meta)| meta.last >= from && !meta.dropped)
                .map(|(first, meta)| (*first, meta.class))
                .collect();
            (metas, st.sink_slots())
        };
        let mut lines = Vec::new();
        for (first, class) in metas {
            for (offset, event) in self
                .load_chunk(first)?
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let seq = first + offset as u64;
                if seq < from {
                    continue;
                }
                lines.push(interchange::event_line(
                    seq,
                    crate::EventClass::from_code(class),
                    sink_names(&slots, event.routes),
                    event,
                )?);
            }
        }
        Ok(lines)
    }

    /// Whether commits are also written to a rollback spool.
    pub(super) fn spooling(&self) -> bool {
        self.inner
            .spool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Appends a commit's lines to the rollback spool; commits the upgrade
    /// when the spool outgrows `max_bytes`.
    pub(super) fn spool_commit(&self, lines: &[Vec<u8>]) -> Result<(), JournalError> {
        let mut guard = self.inner.spool.lock().unwrap_or_else(|p| p.into_inner());
        let Some(spool) = guard.as_mut() else {
            return Ok(());
        };
        if !spool.append(lines, true)? {
            tracing::info!("the upgrade was committed; the rollback spool is no longer written");
            *guard = None;
            return Ok(());
        }
        if spool.bytes() > self.inner.config.max_bytes {
            tracing::warn!(
                spool_bytes = spool.bytes(),
                max_bytes = self.inner.config.max_bytes,
                "the rollback spool reached journal.max_bytes: committing the upgrade (a rollback to the previous version is refused from now on; nothing is lost)"
            );
            *guard = None;
            drop(guard);
            commit(&self.inner.config.path)?;
        }
        Ok(())
    }

    /// Notes deliveries for the spool (written with the next commit or
    /// within a second; one lost to a crash is only sent again).
    pub(super) fn spool_delivered(&self, sink: &str, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        let mut guard = self.inner.spool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(spool) = guard.as_mut() {
            match spool.delivered.last_mut() {
                Some((last, noted)) if last == sink => noted.extend(seqs),
                _ => spool.delivered.push((sink.to_owned(), seqs)),
            }
        }
    }

    /// Writes the noted deliveries to the spool, unsynced.
    pub(super) fn write_spooled_deliveries(&self) -> Result<(), JournalError> {
        let mut guard = self.inner.spool.lock().unwrap_or_else(|p| p.into_inner());
        let Some(spool) = guard.as_mut() else {
            return Ok(());
        };
        if !spool.delivered.is_empty() && !spool.append(&[], false)? {
            *guard = None;
        }
        Ok(())
    }

    /// The uncommitted upgrade of this journal, if any.
    pub fn upgrade_pending(&self) -> Option<UpgradeMarker> {
        marker(&self.inner.config.path).ok().flatten()
    }

    /// Commits this journal's upgrade (see [`commit`]).
    pub fn commit_upgrade(&self) -> Result<Option<(UpgradeMarker, u64)>, JournalError> {
        *self.inner.spool.lock().unwrap_or_else(|p| p.into_inner()) = None;
        commit(&self.inner.config.path)
    }
}

/// Names of the sinks in `routes`.
pub(super) fn sink_names(slots: &[(String, u8)], routes: u64) -> Vec<String> {
    slots
        .iter()
        .filter(|(_, slot)| routes & (1u64 << slot) != 0)
        .map(|(name, _)| name.clone())
        .collect()
}
