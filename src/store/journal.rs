//! The spool: this process's append-only journal of audit entries on local disk.
//!
//! Every entry is appended here (one JSON line, one `write` to the kernel) *before* the
//! response that produced it is sent, so a record survives the process dying at any point
//! (SIGKILL, OOM kill, panic): the bytes are in the kernel's page cache and reach the disk
//! by the group fsync (`audit.fsync_interval_ms`), or at once with an interval of 0.
//!
//! The journal is cut into segments (`spool-<seq>.jsonl`). A segment is deleted once it is
//! sealed (no longer appended to) and every entry in it is committed to the database.
//! A segment is *replayed* (read back and written to the database in order, idempotently)
//! when some of its entries did not go through the in-memory queue (the queue was full),
//! and every segment found at start-up is replayed: it is what a crash left behind.
//!
//! This module owns the files and their accounting; it knows nothing of the database.
//! One process per folder: a lock file (`LOCK`, an advisory file lock) refuses a second.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Segments are sealed beyond this size or age, so that committed ones can be deleted.
const SEGMENT_BYTES: u64 = 8 << 20;
const SEGMENT_AGE: Duration = Duration::from_secs(10);
/// Room a probe wants before calling a full spool writable again: a few records' worth.
const PROBE_HEADROOM: u64 = 64 << 10;
const PREFIX: &str = "spool-";
const SUFFIX: &str = ".jsonl";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool folder {0} is in use by another process (one spool folder per process: set audit.spool_dir)")]
    Locked(PathBuf),
    #[error("spool is full ({bytes} bytes, audit.spool_max_bytes = {max})")]
    Full { bytes: u64, max: u64 },
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    appended: u64,
    committed: u64,
    /// Some entries must be read back from the file (they are not all in memory).
    replay: bool,
    sealed: bool,
    /// Written since the last fsync.
    dirty: bool,
    file: Option<Arc<File>>,
}

struct Active {
    seq: u64,
    file: Arc<File>,
    opened: Instant,
    /// A write failed part-way: the file may end in a partial line; never append again.
    broken: bool,
}

struct Inner {
    active: Option<Active>,
    segments: BTreeMap<u64, Segment>,
    next_seq: u64,
    total_bytes: u64,
    dir_dirty: bool,
}

pub struct Journal {
    dir: PathBuf,
    max_bytes: u64,
    sync_every_append: bool,
    inner: Mutex<Inner>,
    /// Held for the life of the journal: the advisory lock on `LOCK`.
    _lock: File,
}

/// What the journal holds, for metrics and `/readyz`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpoolStats {
    pub bytes: u64,
    pub segments: usize,
    pub pending_replay: usize,
}

impl Journal {
    /// Opens (creating) the folder, takes its lock and lists what an earlier run left: every
    /// such segment is marked for replay.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        sync_every_append: bool,
    ) -> Result<Journal, SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked(dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut segments = BTreeMap::new();
        let mut total_bytes = 0;
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = entry.metadata().map_err(io)?.len();
            total_bytes += bytes;
            segments.insert(
                seq,
                Segment {
                    path: entry.path(),
                    bytes,
                    appended: 0,
                    committed: 0,
                    replay: true,
                    sealed: true,
                    dirty: false,
                    file: None,
                },
            );
        }
        let next_seq = segments.keys().next_back().map_or(1, |s| s + 1);
        Ok(Journal {
            dir: dir.to_path_buf(),
            max_bytes,
            sync_every_append,
            inner: Mutex::new(Inner {
                active: None,
                segments,
                next_seq,
                total_bytes,
                dir_dirty: false,
            }),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough counters; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one line (ending in `\n`) and returns its segment. On error nothing usable
    /// was written (a partial line is skipped at replay).
    pub fn append(&self, line: &[u8]) -> Result<u64, SpoolError> {
        let mut inner = self.lock();
        let len = line.len() as u64;
        if inner.total_bytes + len > self.max_bytes {
            return Err(SpoolError::Full {
                bytes: inner.total_bytes,
                max: self.max_bytes,
            });
        }
        let rotate = match &inner.active {
            None => true,
            Some(a) => {
                a.broken
                    || inner
                        .segments
                        .get(&a.seq)
                        .is_none_or(|s| s.bytes >= SEGMENT_BYTES)
            }
        };
        if rotate {
            self.rotate(&mut inner)?;
        }
        let active = inner.active.as_mut().expect("rotate opened a segment");
        let seq = active.seq;
        let file = Arc::clone(&active.file);
        if let Err(source) = (&*file).write_all(line) {
            active.broken = true;
            return Err(SpoolError::Io {
                path: self.dir.clone(),
                source,
            });
        }
        if self.sync_every_append {
            if let Err(source) = file.sync_data() {
                active.broken = true;
                return Err(SpoolError::Io {
                    path: self.dir.clone(),
                    source,
                });
            }
        }
        inner.total_bytes += len;
        let segment = inner
            .segments
            .get_mut(&seq)
            .expect("active segment is listed");
        segment.bytes += len;
        segment.appended += 1;
        segment.dirty = !self.sync_every_append;
        Ok(seq)
    }

    /// Seals the active segment (if any) and opens the next one.
    fn rotate(&self, inner: &mut Inner) -> Result<(), SpoolError> {
        self.seal_active(inner);
        let seq = inner.next_seq;
        let path = self.dir.join(format!("{PREFIX}{seq:020}{SUFFIX}"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| SpoolError::Io {
                path: path.clone(),
                source,
            })?;
        let file = Arc::new(file);
        inner.next_seq += 1;
        inner.dir_dirty = true;
        inner.segments.insert(
            seq,
            Segment {
                path,
                bytes: 0,
                appended: 0,
                committed: 0,
                replay: false,
                sealed: false,
                dirty: false,
                file: Some(Arc::clone(&file)),
            },
        );
        inner.active = Some(Active {
            seq,
            file,
            opened: Instant::now(),
            broken: false,
        });
        Ok(())
    }

    fn seal_active(&self, inner: &mut Inner) {
        if let Some(active) = inner.active.take() {
            if let Some(segment) = inner.segments.get_mut(&active.seq) {
                segment.sealed = true;
                // A broken segment may end in a partial line: read it back rather than trust
                // the counts.
                segment.replay |= active.broken;
            }
            self.delete_if_done(inner, active.seq);
        }
    }

    /// An entry of segment `seq` could not be queued in memory: the segment must be read
    /// back from disk.
    pub fn mark_replay(&self, seq: u64) {
        if let Some(segment) = self.lock().segments.get_mut(&seq) {
            segment.replay = true;
        }
    }

    /// `n` entries of segment `seq` are in the database.
    pub fn committed(&self, seq: u64, n: u64) {
        let mut inner = self.lock();
        if let Some(segment) = inner.segments.get_mut(&seq) {
            segment.committed += n;
            self.delete_if_done(&mut inner, seq);
        }
    }

    fn delete_if_done(&self, inner: &mut Inner, seq: u64) {
        let done = inner
            .segments
            .get(&seq)
            .is_some_and(|s| s.sealed && !s.replay && s.committed >= s.appended);
        if done {
            self.remove(inner, seq);
        }
    }

    fn remove(&self, inner: &mut Inner, seq: u64) {
        if let Some(segment) = inner.segments.remove(&seq) {
            inner.total_bytes = inner.total_bytes.saturating_sub(segment.bytes);
            inner.dir_dirty = true;
            if let Err(e) = std::fs::remove_file(&segment.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %segment.path.display(), error = %e, "cannot delete committed spool segment; it will be replayed at next start");
                }
            }
        }
    }

    /// The oldest segment that must be replayed, sealed first if it is the active one.
    pub fn next_replay(&self) -> Option<(u64, PathBuf)> {
        let mut inner = self.lock();
        let (seq, path) = inner
            .segments
            .iter()
            .find(|(_, s)| s.replay)
            .map(|(seq, s)| (*seq, s.path.clone()))?;
        if inner.active.as_ref().is_some_and(|a| a.seq == seq) {
            self.seal_active(&mut inner);
        }
        Some((seq, path))
    }

    /// Every entry of segment `seq` was read back and committed: delete it.
    pub fn replayed(&self, seq: u64) {
        let mut inner = self.lock();
        self.remove(&mut inner, seq);
    }

    /// Fsyncs what was written since the last call (and the folder when files came or
    /// went); seals an active segment older than [`SEGMENT_AGE`]. Runs off the request path.
    pub fn sync(&self) -> std::io::Result<()> {
        let (files, dir_dirty) = {
            let mut inner = self.lock();
            if inner
                .active
                .as_ref()
                .is_some_and(|a| a.opened.elapsed() >= SEGMENT_AGE)
            {
                self.seal_active(&mut inner);
            }
            let mut files = Vec::new();
            for segment in inner.segments.values_mut() {
                if segment.dirty {
                    segment.dirty = false;
                    if let Some(file) = &segment.file {
                        files.push(Arc::clone(file));
                    }
                }
                if segment.sealed {
                    // The last sync of a sealed segment is this one: let the file close.
                    segment.file = None;
                }
            }
            let dir_dirty = std::mem::take(&mut inner.dir_dirty);
            (files, dir_dirty)
        };
        for file in files {
            file.sync_data()?;
        }
        if dir_dirty {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Whether appends would succeed now: room for a few records left and a segment can
    /// be opened.
    pub fn probe(&self) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        if inner.total_bytes + PROBE_HEADROOM > self.max_bytes {
            return Err(SpoolError::Full {
                bytes: inner.total_bytes,
                max: self.max_bytes,
            });
        }
        if inner.active.as_ref().is_none_or(|a| a.broken) {
            self.rotate(&mut inner)?;
        }
        Ok(())
    }

    /// Seals the active segment and deletes every fully committed one (clean shutdown).
    pub fn seal(&self) {
        let mut inner = self.lock();
        self.seal_active(&mut inner);
        let seqs: Vec<u64> = inner.segments.keys().copied().collect();
        for seq in seqs {
            self.delete_if_done(&mut inner, seq);
        }
    }

    pub fn stats(&self) -> SpoolStats {
        let inner = self.lock();
        SpoolStats {
            bytes: inner.total_bytes,
            segments: inner.segments.len(),
            pending_replay: inner.segments.values().filter(|s| s.replay).count(),
        }
    }
}

/// Reads a segment back: the parsed lines in order, and how many lines were unreadable
/// (a partial last line after a crash, or damage).
pub fn read_segment<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> std::io::Result<(Vec<T>, usize)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    let mut bad = 0;
    for line in bytes.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice(line) {
            Ok(v) => out.push(v),
            Err(e) => {
                bad += 1;
                tracing::warn!(path = %path.display(), error = %e, line_bytes = line.len(), "unreadable spool line skipped");
            }
        }
    }
    Ok((out, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: u32) -> Vec<u8> {
        format!("{{\"n\":{n}}}\n").into_bytes()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(PREFIX))
            .collect();
        names.sort();
        names
    }

    #[derive(serde::Deserialize, PartialEq, Debug)]
    struct N {
        n: u32,
    }

    #[test]
    fn committed_sealed_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 1 << 20, false).unwrap();
        let seq = j.append(&line(1)).unwrap();
        j.append(&line(2)).unwrap();
        j.committed(seq, 2);
        assert_eq!(files(dir.path()).len(), 1, "the active segment stays");
        j.seal();
        assert!(files(dir.path()).is_empty());
        assert_eq!(j.stats().bytes, 0);
    }

    #[test]
    fn leftovers_are_replayed_in_order_and_a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path(), 1 << 20, true).unwrap();
            assert!(matches!(
                Journal::open(dir.path(), 1 << 20, false),
                Err(SpoolError::Locked(_))
            ));
            j.append(&line(1)).unwrap();
            j.append(&line(2)).unwrap();
            // A crash: nothing committed, and a partial last line.
            let name = files(dir.path()).pop().unwrap();
            std::fs::OpenOptions::new()
                .append(true)
                .open(dir.path().join(name))
                .unwrap()
                .write_all(b"{\"n\":3")
                .unwrap();
        }
        let j = Journal::open(dir.path(), 1 << 20, false).unwrap();
        assert_eq!(j.stats().pending_replay, 1);
        let (seq, path) = j.next_replay().unwrap();
        let (lines, bad) = read_segment::<N>(&path).unwrap();
        assert_eq!(lines, vec![N { n: 1 }, N { n: 2 }]);
        assert_eq!(bad, 1);
        j.replayed(seq);
        assert!(j.next_replay().is_none());
        // New segments continue the numbering after the old ones.
        let next = j.append(&line(4)).unwrap();
        assert!(next > seq);
    }

    #[test]
    fn overflowed_active_segment_is_sealed_for_replay() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 1 << 20, false).unwrap();
        let seq = j.append(&line(1)).unwrap();
        j.mark_replay(seq);
        let (replay_seq, _) = j.next_replay().unwrap();
        assert_eq!(replay_seq, seq);
        let next = j.append(&line(2)).unwrap();
        assert_ne!(next, seq, "a segment being replayed is not appended to");
    }

    #[test]
    fn a_full_spool_refuses_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let max = PROBE_HEADROOM + 20;
        let j = Journal::open(dir.path(), max, false).unwrap();
        let big = vec![b'x'; PROBE_HEADROOM as usize];
        let seq = j.append(&big).unwrap();
        j.append(&line(1)).unwrap();
        j.append(&line(2)).unwrap();
        assert!(matches!(j.append(&line(3)), Err(SpoolError::Full { .. })));
        assert!(j.probe().is_err());
        j.committed(seq, 3);
        j.seal();
        j.probe().unwrap();
        j.append(&line(3)).unwrap();
    }
}
