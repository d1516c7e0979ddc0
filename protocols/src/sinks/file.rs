//! JSON-lines file sink: an append-only local archive, fsynced, rotated by
//! size. One CloudEvent per line.
//!
//! An event is `Delivered` only after its line was written and the file
//! `fdatasync`ed. A crash between write and the journal's acknowledgement
//! repeats the line on restart (same id: consumers dedup by `id`). A line
//! cut short by a crash belongs to an unacknowledged event, so it is
//! truncated away on open and written again in full.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use buffer::PendingEvent;

use crate::sink::{Sink, Verdict};

/// File sink settings.
#[derive(Clone, Debug)]
pub struct FileSinkConfig {
    /// The live file, e.g. `/var/lib/plant-edge/archive/events.jsonl`.
    pub path: PathBuf,
    /// Rotate once the live file reaches this size.
    pub rotate_bytes: u64,
    /// Keep at most this many rotated files (oldest deleted, logged); `None`
    /// keeps all.
    pub keep_files: Option<usize>,
}

/// Failures opening or writing the archive.
#[derive(Debug, thiserror::Error)]
pub enum FileSinkError {
    /// The directory or file could not be created or opened.
    #[error("opening archive {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing, syncing or rotating failed.
    #[error("writing archive {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

struct Archive {
    config: FileSinkConfig,
    file: File,
    len: u64,
    rotated: u64,
}

impl Archive {
    fn open(config: FileSinkConfig) -> Result<Self, FileSinkError> {
        let open_err = |source| FileSinkError::Open {
            path: config.path.clone(),
            source,
        };
        if let Some(dir) = config.path.parent() {
            fs::create_dir_all(dir).map_err(open_err)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&config.path)
            .map_err(open_err)?;
        let len = drop_partial_line(&mut file).map_err(open_err)?;
        Ok(Self {
            config,
            file,
            len,
            rotated: 0,
        })
    }

    fn write(&mut self, lines: &[u8]) -> Result<(), FileSinkError> {
        let write_err = |source| FileSinkError::Write {
            path: self.config.path.clone(),
            source,
        };
        self.file.write_all(lines).map_err(write_err)?;
        self.file.sync_data().map_err(write_err)?;
        self.len += lines.len() as u64;
        if self.len >= self.config.rotate_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), FileSinkError> {
        let path = self.config.path.clone();
        let write_err = |source| FileSinkError::Write {
            path: path.clone(),
            source,
        };
        let stamp = humantime::format_rfc3339_millis(std::time::SystemTime::now())
            .to_string()
            .replace(':', "");
        self.rotated += 1;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("events");
        let target = path.with_file_name(format!("{stem}-{stamp}-{}.jsonl", self.rotated));
        fs::rename(&path, &target).map_err(write_err)?;
        self.file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(write_err)?;
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(write_err)?;
        }
        self.len = 0;
        tracing::info!(archive = %target.display(), "archive rotated");
        if let Some(keep) = self.config.keep_files {
            self.prune(keep, stem);
        }
        Ok(())
    }

    /// Deletes the oldest rotated files beyond `keep`: the site's retention
    /// policy for events that were already delivered here.
    fn prune(&self, keep: usize, stem: &str) {
        let Some(dir) = self.config.path.parent() else {
            return;
        };
        let mut rotated = rotated_files(dir, stem);
        rotated.sort();
        let excess = rotated.len().saturating_sub(keep);
        for old in rotated.into_iter().take(excess) {
            match fs::remove_file(&old) {
                Ok(()) => {
                    tracing::info!(file = %old.display(), "old archive file removed (keep_files)")
                }
                Err(e) => {
                    tracing::warn!(file = %old.display(), error = %e, "removing old archive file failed")
                }
            }
        }
    }
}

/// Rotated archive files of `stem` in `dir`.
pub fn rotated_files(dir: &Path, stem: &str) -> Vec<PathBuf> {
    let prefix = format!("{stem}-");
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".jsonl"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Truncates a trailing partial line; returns the resulting length.
fn drop_partial_line(file: &mut File) -> std::io::Result<u64> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(0);
    }
    // Look back a bounded stretch for the last newline; events are <= 16 KiB.
    let window = len.min(64 * 1024);
    file.seek(SeekFrom::Start(len - window))?;
    let mut tail = vec![0u8; window as usize];
    file.read_exact(&mut tail)?;
    if tail.last() == Some(&b'\n') {
        return Ok(len);
    }
    let keep = match tail.iter().rposition(|b| *b == b'\n') {
        Some(pos) => len - window + pos as u64 + 1,
        None if window == len => 0,
        None => return Ok(len),
    };
    tracing::warn!(
        cut_bytes = len - keep,
        "archive ended in a partial line (crash mid-write); truncated, it will be rewritten"
    );
    file.set_len(keep)?;
    file.sync_data()?;
    Ok(keep)
}

/// The JSON-lines archive sink.
pub struct FileSink {
    archive: Arc<Mutex<Archive>>,
}

impl FileSink {
    /// Opens (or creates) the archive.
    pub fn open(config: FileSinkConfig) -> Result<Self, FileSinkError> {
        Ok(Self {
            archive: Arc::new(Mutex::new(Archive::open(config)?)),
        })
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn deliver(&mut self, batch: &[PendingEvent]) -> Vec<Verdict> {
        let mut lines = Vec::with_capacity(batch.iter().map(|e| e.payload.len() + 1).sum());
        let mut verdicts = Vec::with_capacity(batch.len());
        let mut written = Vec::new();
        for (i, event) in batch.iter().enumerate() {
            // A line must be one JSON value or the archive's readers break.
            if serde_json::from_slice::<serde::de::IgnoredAny>(&event.payload).is_err()
                || event.payload.contains(&b'\n')
            {
                verdicts.push(Verdict::Rejected {
                    reason: "payload is not single-line JSON".to_owned(),
                });
                continue;
            }
            lines.extend_from_slice(&event.payload);
            lines.push(b'\n');
            verdicts.push(Verdict::Delivered);
            written.push(i);
        }
        if written.is_empty() {
            return verdicts;
        }
        let archive = self.archive.clone();
        let result = tokio::task::spawn_blocking(move || {
            archive
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(&lines)
        })
        .await;
        let failure = match result {
            Ok(Ok(())) => return verdicts,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("archive writer task failed: {e}"),
        };
        for i in written {
            verdicts[i] = Verdict::retry(failure.clone());
        }
        verdicts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use buffer::EventClass;
    use uuid::Uuid;

    fn event(seq: u64, payload: &str) -> PendingEvent {
        PendingEvent {
            seq,
            id: Uuid::from_u128(seq as u128),
            source: "s".into(),
            class: EventClass::Business,
            appended_ms: 0,
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn writes_one_line_per_event_and_rejects_non_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("archive/events.jsonl");
        let mut sink = FileSink::open(FileSinkConfig {
            path: path.clone(),
            rotate_bytes: 1 << 20,
            keep_files: None,
        })
        .expect("open");
        let verdicts = sink
            .deliver(&[
                event(0, "{\"a\":1}"),
                event(1, "not json"),
                event(2, "{\"a\":2}"),
            ])
            .await;
        assert_eq!(verdicts[0], Verdict::Delivered);
        assert!(matches!(verdicts[1], Verdict::Rejected { .. }));
        assert_eq!(verdicts[2], Verdict::Delivered);
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "{\"a\":1}\n{\"a\":2}\n"
        );
    }

    #[tokio::test]
    async fn rotates_by_size_and_keeps_only_keep_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let mut sink = FileSink::open(FileSinkConfig {
            path: path.clone(),
            rotate_bytes: 100,
            keep_files: Some(2),
        })
        .expect("open");
        for seq in 0..20 {
            let payload = format!("{{\"n\":{seq},\"pad\":\"{}\"}}", "x".repeat(40));
            assert_eq!(
                sink.deliver(&[event(seq, &payload)]).await,
                vec![Verdict::Delivered]
            );
        }
        let rotated = rotated_files(dir.path(), "events");
        assert_eq!(rotated.len(), 2, "{rotated:?}");
    }

    #[test]
    fn partial_trailing_line_is_cut_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        fs::write(&path, "{\"a\":1}\n{\"a\":2").expect("write");
        let _sink = FileSink::open(FileSinkConfig {
            path: path.clone(),
            rotate_bytes: 1 << 20,
            keep_files: None,
        })
        .expect("open");
        assert_eq!(fs::read_to_string(&path).expect("read"), "{\"a\":1}\n");
    }
}
