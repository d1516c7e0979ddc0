//! The journal's format version: which layout of keys and records the
//! journal holds, stamped in a `FORMAT` file beside sled's files and
//! checked at every open, before sled is.
//!
//! Invariants:
//! - A journal written in a newer format is refused before sled opens it:
//!   nothing on disk changes (sled rewrites files at every open), and the
//!   error names both formats and the writer, so an agent rolled back to an
//!   older image stops with its own exit code instead of guessing, and
//!   never quarantines because of a version.
//! - A journal without a stamp but with sled's files was written before
//!   stamps existed: format 1, stamped at its first open by this version.
//! - The stamp is written whole or not at all (temporary file, fsync,
//!   rename, directory fsync).

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::JournalError;

/// The format this build writes and reads. Raised only with a reader of
/// the one before, which [`super::upgrade`] exports from.
///
/// - 1: chunks inline in sled.
/// - 2: chunk bytes in segment files, sled holding pointers (see
///   [`super::segments`]); chunk metas name their segment. Format 1 is
///   still read (inline chunks, metas without segment).
pub const FORMAT: u32 = 2;

/// The stamp's file name inside the journal directory.
pub const FORMAT_FILE: &str = "FORMAT";

/// What the journal says about who wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatStamp {
    /// The layout's number.
    pub format: u32,
    /// The program and version that first wrote it in this format.
    pub writer: String,
    /// When (RFC 3339).
    pub written: String,
}

/// This build's name and version, as stamps name their writer.
pub fn this_writer() -> String {
    format!("plant-edge {}", env!("CARGO_PKG_VERSION"))
}

/// The format this build writes: [`FORMAT`], or with the `test-format`
/// feature the one `PLANT_EDGE_TEST_JOURNAL_FORMAT` names (a "newer
/// build" for the rollback drill).
pub fn current() -> u32 {
    #[cfg(feature = "test-format")]
    if let Some(n) = std::env::var("PLANT_EDGE_TEST_JOURNAL_FORMAT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    FORMAT
}

/// Reads the stamp of the journal in `dir` (`None`: none yet).
pub fn read(dir: &Path) -> Result<Option<FormatStamp>, JournalError> {
    let file = dir.join(FORMAT_FILE);
    let open_error = |reason: String| JournalError::Open {
        path: dir.to_owned(),
        reason,
    };
    match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            open_error(format!(
                "{} is not a format stamp ({e}); nothing was changed",
                file.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(open_error(format!("reading {}: {e}", file.display()))),
    }
}

/// Writes `stamp` atomically.
pub fn write(dir: &Path, stamp: &FormatStamp) -> Result<(), JournalError> {
    let io = |e: std::io::Error| JournalError::Open {
        path: dir.to_owned(),
        reason: format!("writing the format stamp: {e}"),
    };
    let temporary = dir.join(format!("{FORMAT_FILE}.new"));
    let bytes = serde_json::to_vec_pretty(stamp).map_err(|e| JournalError::Encode {
        what: "format stamp",
        message: e.to_string(),
    })?;
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.write_all(b"\n").map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, dir.join(FORMAT_FILE)).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// Checks the journal in `dir` before sled opens it; stamps an unstamped
/// one (new: this build's format; holding sled's files: format 1).
pub(crate) fn check(dir: &Path) -> Result<FormatStamp, JournalError> {
    let ours = current();
    let stamp = match read(dir)? {
        Some(stamp) => stamp,
        None => {
            let existing = dir.join("db").exists();
            let stamp = FormatStamp {
                format: if existing { 1 } else { ours },
                writer: if existing {
                    "plant-edge before format stamps".into()
                } else {
                    this_writer()
                },
                written: crate::event::rfc3339_millis(std::time::SystemTime::now()),
            };
            write(dir, &stamp)?;
            stamp
        }
    };
    if stamp.format > ours {
        return Err(JournalError::NewerFormat {
            path: dir.to_owned(),
            found: stamp.format,
            found_writer: stamp.writer,
            supported: ours,
            writer: this_writer(),
        });
    }
    Ok(stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).expect("read"),
                )
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_new_journal_is_stamped_and_a_newer_one_is_refused_with_nothing_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let journal = crate::Journal::open(crate::JournalConfig::new(&path)).expect("open");
        journal.close().expect("close");
        drop(journal);
        let stamp = read(&path).expect("read").expect("stamped");
        assert_eq!(stamp.format, FORMAT);
        assert_eq!(stamp.writer, this_writer());
        // A newer build wrote it.
        write(
            &path,
            &FormatStamp {
                format: FORMAT + 1,
                writer: "plant-edge 9.0.0".into(),
                written: "2027-01-01T00:00:00.000Z".into(),
            },
        )
        .expect("write");
        let before = listing(&path);
        let mut config = crate::JournalConfig::new(&path);
        config.lock_wait = std::time::Duration::from_secs(5);
        let refused = crate::Journal::open(config).err().expect("refused");
        let text = refused.to_string();
        assert!(
            matches!(refused, JournalError::NewerFormat { found, supported, .. } if found == FORMAT + 1 && supported == FORMAT),
            "{text}"
        );
        assert!(
            text.contains("plant-edge 9.0.0") && text.contains(&this_writer()),
            "{text}"
        );
        assert_eq!(listing(&path), before, "nothing on disk changed");
    }

    #[test]
    fn a_journal_from_before_stamps_is_format_1() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let journal = crate::Journal::open(crate::JournalConfig::new(&path)).expect("open");
        journal.close().expect("close");
        drop(journal);
        std::fs::remove_file(path.join(FORMAT_FILE)).expect("unstamp");
        let mut config = crate::JournalConfig::new(&path);
        config.lock_wait = std::time::Duration::from_secs(5);
        let journal = crate::Journal::open(config).expect("opens");
        drop(journal);
        // Taken for format 1, so upgraded, and kept as it was found.
        let stamp = read(&path).expect("read").expect("stamped");
        assert_eq!(stamp.format, FORMAT);
        let kept = read(&dir.path().join("journal.format-1"))
            .expect("read")
            .expect("kept journal stamped");
        assert_eq!(kept.format, 1);
        assert_eq!(kept.writer, "plant-edge before format stamps");
    }
}
