//! Chunk payloads in append-only segment files of our own, beside sled's
//! files (`<journal>/chunks/<first seq>.seg`); sled holds a small pointer
//! per chunk (segment, offset, length, CRC) under the chunk's key.
//!
//! Why: sled 0.34 keeps the leaves it wrote in memory until its cache
//! evicts them, and its eviction acts per shard only after 64 accesses to
//! that shard's pages. A backlog's leaves are written once and not read
//! again until sent, so 200,000 pending events held about 20 MiB of RSS
//! whatever `journal.cache` said. Pointers of 25 bytes per chunk of up to
//! 64 events make that about 0.4 bytes per pending event.
//!
//! # Invariants
//!
//! 1. **Bytes before pointers.** A commit writes its chunks to the active
//!    segment and `fdatasync`s it (and the directory when the segment is
//!    new) before the sled batch holding the pointers is applied, so sled
//!    can never make a pointer durable (its flusher runs on its own) whose
//!    bytes are not.
//! 2. **A segment lives while a pointer does.** Each segment's live chunks
//!    are counted in memory (rebuilt at open from the chunk metas); a
//!    segment is deleted only when none is left, it is not the one being
//!    appended to, and the batch that removed its last pointer was flushed
//!    and synced. A crash in between leaves an unreferenced file, deleted
//!    at the next open.
//! 3. **New names only.** A segment is named after the first sequence it
//!    holds; sequences only grow, so a new segment's name is above every
//!    live one's. A file of that name can only be an orphan of a commit
//!    that never became durable, and is overwritten.
//! 4. **Checked on read.** Every read checks the chunk's CRC; a mismatch is
//!    an error the caller quarantines (raw bytes kept), never a silent
//!    skip.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// First byte of a chunk value that points into a segment file. Inline
/// chunks (journals of format 1) start with a bincode count of at most 64
/// events or with 0xC4 (compressed).
const SEGMENT_POINTER: u8 = 0xC7;
/// Tag, segment, offset, length, CRC.
const POINTER_LEN: usize = 1 + 8 + 8 + 4 + 4;
/// A new segment is started once the active one holds this much.
pub(crate) const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// More than any chunk holds (64 events of at most 16 KiB, plain).
const MAX_CHUNK_BYTES: u32 = 8 * 1024 * 1024;
/// The directory inside the journal's.
pub(crate) const SEGMENT_DIR: &str = "chunks";

/// Where a chunk's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pointer {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl Pointer {
    pub fn encode(&self) -> [u8; POINTER_LEN] {
        let mut value = [0u8; POINTER_LEN];
        value[0] = SEGMENT_POINTER;
        value[1..9].copy_from_slice(&self.segment.to_be_bytes());
        value[9..17].copy_from_slice(&self.offset.to_be_bytes());
        value[17..21].copy_from_slice(&self.len.to_be_bytes());
        value[21..25].copy_from_slice(&self.crc.to_be_bytes());
        value
    }

    /// The pointer in a chunk value, or `None` for an inline chunk.
    pub fn decode(value: &[u8]) -> Option<Pointer> {
        if value.len() != POINTER_LEN || value[0] != SEGMENT_POINTER {
            return None;
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&value[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&value[at..at + 4]);
            u32::from_be_bytes(b)
        };
        Some(Pointer {
            segment: u64_at(1),
            offset: u64_at(9),
            len: u32_at(17),
            crc: u32_at(21),
        })
    }
}

/// The segment file of `segment` in the journal directory `journal`.
pub(crate) fn segment_path(journal: &Path, segment: u64) -> PathBuf {
    journal.join(SEGMENT_DIR).join(format!("{segment:020}.seg"))
}

/// The readers' side: reads chunks through the last segment file it
/// opened (a drain reads one segment after another, and a read batch
/// often ends inside a chunk that the next one reads again).
#[derive(Debug)]
pub(crate) struct Reader {
    journal: PathBuf,
    open: std::sync::Mutex<Option<(u64, File)>>,
}

impl Reader {
    /// A reader of the segments of the journal in `journal`.
    pub fn new(journal: &Path) -> Reader {
        Reader {
            journal: journal.to_owned(),
            open: std::sync::Mutex::new(None),
        }
    }

    /// Reads the bytes `pointer` names; a short file or a CRC mismatch is
    /// an `InvalidData` error. `Ok(None)`: the segment file is gone.
    pub fn read(&self, pointer: &Pointer) -> io::Result<Option<Vec<u8>>> {
        let bytes = match self.read_raw(pointer)? {
            Some(bytes) => bytes,
            None => return Ok(None),
        };
        let crc = crc32fast::hash(&bytes);
        if crc != pointer.crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "segment {} at {}: CRC {crc:08x}, the pointer says {:08x}",
                    pointer.segment, pointer.offset, pointer.crc
                ),
            ));
        }
        Ok(Some(bytes))
    }

    /// The bytes `pointer` names, unchecked (for quarantine).
    pub fn read_raw(&self, pointer: &Pointer) -> io::Result<Option<Vec<u8>>> {
        // A damaged pointer must not make the reader allocate gigabytes.
        if pointer.len > MAX_CHUNK_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "pointer into segment {} says {} bytes",
                    pointer.segment, pointer.len
                ),
            ));
        }
        // A file deleted after it was opened still reads: only chunks whose
        // pointer was just removed (delivered) could be read from it.
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.as_ref().is_none_or(|(id, _)| *id != pointer.segment) {
            *open = None;
            let file = match File::open(segment_path(&self.journal, pointer.segment)) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            *open = Some((pointer.segment, file));
        }
        let Some((_, file)) = open.as_ref() else {
            return Err(io::Error::other("no segment open"));
        };
        let mut bytes = vec![0u8; pointer.len as usize];
        if let Err(e) = file.read_exact_at(&mut bytes, pointer.offset) {
            // The next read opens the file again: the one that failed may
            // be a stale handle (the file was replaced, restored from a copy).
            *open = None;
            return Err(e);
        }
        Ok(Some(bytes))
    }
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    id: u64,
    file: File,
    len: u64,
}

/// The writer's side: the active segment, live chunks per segment, and
/// segments waiting for a sync before they may be deleted.
#[derive(Debug)]
pub(crate) struct Segments {
    journal: PathBuf,
    active: Option<Active>,
    live: BTreeMap<u64, u64>,
    dead: Vec<u64>,
    /// A write or sync failed: every later append fails (see the journal's
    /// poisoning: retrying a failed fsync can report success for lost data).
    failed: bool,
}

impl Segments {
    /// Opens the segment directory of `journal` (creating it), with the
    /// live chunk count of each segment from the chunk metas; deletes
    /// segment files no pointer names (orphans of an unfinished commit or
    /// of a deletion cut short).
    pub fn open(journal: &Path, live: BTreeMap<u64, u64>) -> io::Result<Segments> {
        let dir = journal.join(SEGMENT_DIR);
        match std::fs::create_dir(&dir) {
            Ok(()) => File::open(journal)?.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let mut removed = false;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(id) = id {
                if !live.contains_key(&id) {
                    std::fs::remove_file(entry.path())?;
                    removed = true;
                }
            }
        }
        if removed {
            File::open(&dir)?.sync_all()?;
        }
        Ok(Segments {
            journal: journal.to_owned(),
            active: None,
            live,
            dead: Vec::new(),
            failed: false,
        })
    }

    /// Appends `chunks` (first sequence, bytes) and makes them durable;
    /// returns a pointer for each, in order.
    pub fn append(&mut self, chunks: &[(u64, Vec<u8>)]) -> io::Result<Vec<Pointer>> {
        if self.failed {
            return Err(io::Error::other(
                "an earlier segment write or sync failed; restart to recover",
            ));
        }
        let Some((first, _)) = chunks.first() else {
            return Ok(Vec::new());
        };
        let result = self.append_synced(*first, chunks);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn append_synced(&mut self, first: u64, chunks: &[(u64, Vec<u8>)]) -> io::Result<Vec<Pointer>> {
        let mut created = false;
        if self.active.as_ref().is_none_or(|a| a.len >= SEGMENT_BYTES) {
            if let Some(old) = self.active.take() {
                if self.live.get(&old.id).copied().unwrap_or(0) == 0 {
                    self.live.remove(&old.id);
                    self.dead.push(old.id);
                }
            }
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(segment_path(&self.journal, first))?;
            self.active = Some(Active {
                id: first,
                file,
                len: 0,
            });
            created = true;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("no active segment"));
        };
        let total: usize = chunks.iter().map(|(_, bytes)| bytes.len()).sum();
        let mut buffer = Vec::with_capacity(total);
        let mut pointers = Vec::with_capacity(chunks.len());
        for (_, bytes) in chunks {
            pointers.push(Pointer {
                segment: active.id,
                offset: active.len + buffer.len() as u64,
                len: bytes.len() as u32,
                crc: crc32fast::hash(bytes),
            });
            buffer.extend_from_slice(bytes);
        }
        active.file.write_all_at(&buffer, active.len)?;
        active.file.sync_data()?;
        if created {
            File::open(self.journal.join(SEGMENT_DIR))?.sync_all()?;
        }
        active.len += buffer.len() as u64;
        *self.live.entry(active.id).or_insert(0) += chunks.len() as u64;
        Ok(pointers)
    }

    /// A chunk in `segment` lost its pointer (delivered, dropped or
    /// quarantined) in a batch about to be applied.
    pub fn released(&mut self, segment: u64) {
        let Some(count) = self.live.get_mut(&segment) else {
            return;
        };
        *count = count.saturating_sub(1);
        let active = self.active.as_ref().is_some_and(|a| a.id == segment);
        if *count == 0 && !active {
            self.live.remove(&segment);
            self.dead.push(segment);
        }
    }

    /// Segments whose last pointer is gone in a batch already applied;
    /// taken before a flush, deleted after it succeeded.
    pub fn take_dead(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dead)
    }
}

/// Deletes the segment files of `dead` (their pointers' removal is
/// durable); a failure is logged, the file is an orphan for the next open.
pub(crate) fn delete(journal: &Path, dead: &[u64]) {
    for segment in dead {
        let path = segment_path(journal, *segment);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "delivered segment not deleted; the next start deletes it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_round_trips_and_is_told_from_inline_chunks() {
        let p = Pointer {
            segment: 7,
            offset: 1 << 40,
            len: 16_000,
            crc: 0xdead_beef,
        };
        assert_eq!(Pointer::decode(&p.encode()), Some(p));
        assert_eq!(Pointer::decode(&[0xC4, 1, 2]), None);
        assert_eq!(Pointer::decode(&[64; POINTER_LEN]), None);
    }

    #[test]
    fn a_segment_is_dead_only_when_its_last_chunk_goes_and_it_is_not_active() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut segments = Segments::open(dir.path(), BTreeMap::new()).expect("open");
        let a = segments
            .append(&[(0, b"one".to_vec()), (1, b"two".to_vec())])
            .expect("append");
        let reader = Reader::new(dir.path());
        assert_eq!(reader.read(&a[1]).expect("read"), Some(b"two".to_vec()));
        segments.released(0);
        segments.released(0);
        assert!(segments.take_dead().is_empty(), "the active segment stays");
        // Fill past the rotation size: the next append starts segment 2.
        segments.active.as_mut().expect("active").len = SEGMENT_BYTES;
        let b = segments.append(&[(2, b"three".to_vec())]).expect("append");
        assert_eq!(b[0].segment, 2);
        assert_eq!(segments.take_dead(), vec![0]);
        let mut bad = b[0];
        bad.crc ^= 1;
        assert!(
            Reader::new(dir.path()).read(&bad).is_err(),
            "a CRC mismatch is an error"
        );
    }

    #[test]
    fn open_deletes_segments_no_pointer_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut segments = Segments::open(dir.path(), BTreeMap::new()).expect("open");
        segments.append(&[(5, b"x".to_vec())]).expect("append");
        drop(segments);
        let live: BTreeMap<u64, u64> = [(9, 1)].into_iter().collect();
        std::fs::write(segment_path(dir.path(), 9), b"kept").expect("write");
        Segments::open(dir.path(), live).expect("reopen");
        assert!(!segment_path(dir.path(), 5).exists(), "orphan deleted");
        assert!(segment_path(dir.path(), 9).exists(), "referenced kept");
    }
}
