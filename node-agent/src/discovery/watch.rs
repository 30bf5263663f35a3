//! Watching files for changes by event (inotify), not by polling.
//!
//! Each file's *directory* is watched, not the file: editors, config management
//! and Kubernetes ConfigMap mounts replace a file by renaming another over it (or
//! a symlink over a directory), and a watch on the old inode would see nothing.
//! Any event in a watched directory starts a short quiet window ([`DEBOUNCE`]);
//! once nothing more has happened for that long (or [`MAX_DELAY`] has passed),
//! each file's stamp (modification time, size, inode, through symlinks) is
//! compared with the last one seen, and the files that changed are reported. A
//! burst of writes (a file written in pieces, a rename after a write) is thus
//! one change, read once it has settled; an idle agent does not wake at all.
//!
//! If inotify cannot be had (the per-user instance or watch limits are often
//! exhausted on busy nodes), the watcher falls back to checking the stamps every
//! [`FALLBACK_POLL`], and says so once.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use inotify::{Inotify, WatchMask};
use tokio::io::unix::AsyncFd;
use tracing::warn;

/// How long a directory must stay quiet before its files are read.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A directory that never goes quiet is read after this long anyway.
pub const MAX_DELAY: Duration = Duration::from_secs(2);
/// Stamp checks when inotify is not available.
pub const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// What identifies a version of a file cheaply.
type Stamp = (SystemTime, u64, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Watches a set of files; [`Watch::changed`] says which changed.
pub struct Watch {
    files: Vec<(PathBuf, Option<Stamp>)>,
    events: Option<AsyncFd<Inotify>>,
    buf: Vec<u8>,
    /// Events were read and the files not compared yet: a [`Watch::changed`]
    /// dropped in its quiet window (the agent waits on it in a `select!` beside
    /// timers) must not lose them, or the change is seen only at the next event.
    pending: bool,
}

impl Watch {
    /// Starts watching `files` (their current stamps are the baseline: read them
    /// *after* this, so a change in between is seen).
    pub fn new(files: &[&Path]) -> Watch {
        let files: Vec<(PathBuf, Option<Stamp>)> =
            files.iter().map(|f| (f.to_path_buf(), stamp(f))).collect();
        let events = match Self::inotify(&files) {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!(
                    error = %e,
                    every_ms = FALLBACK_POLL.as_millis() as u64,
                    "cannot watch files with inotify; checking them on a timer instead"
                );
                None
            }
        };
        Watch {
            files,
            events,
            buf: vec![0; 4096],
            pending: false,
        }
    }

    fn inotify(files: &[(PathBuf, Option<Stamp>)]) -> io::Result<AsyncFd<Inotify>> {
        let inotify = Inotify::init()?;
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MODIFY
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB;
        for (file, _) in files {
            let dir = match file.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            inotify.watches().add(&dir, mask)?;
        }
        // SAFETY: `Inotify` owns its descriptor and keeps it open, unchanged,
        // for as long as it lives, which is as long as the `AsyncFd` that owns it.
        unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Waits until at least one file changed and has settled; returns the
    /// indices (in the order given to [`Watch::new`]) of those that changed.
    /// Cancel-safe: dropped before it returns, it loses no event.
    pub async fn changed(&mut self) -> Vec<usize> {
        loop {
            match self.events.is_some() {
                true => {
                    if let Err(e) = self.next_burst().await {
                        warn!(error = %e, "inotify failed; checking files on a timer instead");
                        self.events = None;
                    }
                }
                false => tokio::time::sleep(FALLBACK_POLL).await,
            }
            self.pending = false;
            let changed: Vec<usize> = self
                .files
                .iter_mut()
                .enumerate()
                .filter_map(|(i, (path, last))| {
                    let now = stamp(path);
                    (now != *last).then(|| {
                        *last = now;
                        i
                    })
                })
                .collect();
            if !changed.is_empty() {
                return changed;
            }
        }
    }

    /// Waits for an event, then for the quiet window.
    async fn next_burst(&mut self) -> io::Result<()> {
        if !self.pending {
            self.drain_events(None).await?;
            self.pending = true;
        }
        let until = tokio::time::Instant::now() + MAX_DELAY;
        loop {
            let quiet = (tokio::time::Instant::now() + DEBOUNCE).min(until);
            if !self.drain_events(Some(quiet)).await? {
                return Ok(());
            }
        }
    }

    /// Reads pending events; waits for some first (until `deadline`, if given).
    /// Whether any arrived.
    async fn drain_events(&mut self, deadline: Option<tokio::time::Instant>) -> io::Result<bool> {
        let Some(fd) = &mut self.events else {
            return Ok(false);
        };
        loop {
            let ready = match deadline {
                Some(d) => match tokio::time::timeout_at(d, fd.readable_mut()).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(false),
                },
                None => fd.readable_mut().await?,
            };
            let mut guard = ready;
            match guard.try_io(|inner| {
                inner
                    .get_mut()
                    .read_events(&mut self.buf)
                    .map(|e| e.count())
            }) {
                Ok(Ok(n)) if n > 0 => return Ok(true),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-watch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn a_rename_over_the_file_and_an_in_place_write_are_seen_and_a_burst_is_one_change() {
        let d = dir("rename");
        let (a, b) = (d.join("a.yaml"), d.join("b.yaml"));
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "one").unwrap();
        let mut w = Watch::new(&[&a, &b]);
        assert!(w.events.is_some(), "inotify is available here");

        // Atomic replace of b.
        std::fs::write(d.join(".b.tmp"), "two").unwrap();
        std::fs::rename(d.join(".b.tmp"), &b).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), w.changed()).await;
        assert_eq!(got.unwrap(), vec![1]);

        // A write in several pieces, then another file touched in the burst.
        let writer = {
            let a = a.clone();
            tokio::spawn(async move {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&a).unwrap();
                for piece in ["wor", "kl", "oads: []\n"] {
                    f.write_all(piece.as_bytes()).unwrap();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            })
        };
        let got = tokio::time::timeout(Duration::from_secs(5), w.changed()).await;
        writer.await.unwrap();
        assert_eq!(got.unwrap(), vec![0]);
        assert_eq!(
            std::fs::read_to_string(&a).unwrap(),
            "workloads: []\n",
            "read after the burst settled"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn a_change_read_by_a_wait_that_was_dropped_is_reported_by_the_next() {
        let d = dir("cancel");
        let a = d.join("a.yaml");
        std::fs::write(&a, "one").unwrap();
        let mut w = Watch::new(&[&a]);
        std::fs::write(d.join(".a.tmp"), "two").unwrap();
        std::fs::rename(d.join(".a.tmp"), &a).unwrap();
        // Dropped in its quiet window, after it read the events (as a `select!`
        // drops it when a timer fires first).
        let first = tokio::time::timeout(DEBOUNCE / 2, w.changed()).await;
        assert!(
            first.is_err(),
            "reported before the quiet window: {first:?}"
        );
        let got = tokio::time::timeout(Duration::from_secs(5), w.changed()).await;
        let _ = std::fs::remove_dir_all(&d);
        assert_eq!(got.expect("the change was lost"), vec![0]);
    }

    #[tokio::test]
    async fn another_file_in_the_directory_is_not_a_change() {
        let d = dir("other");
        let a = d.join("a.yaml");
        std::fs::write(&a, "one").unwrap();
        let mut w = Watch::new(&[&a]);
        std::fs::write(d.join("unrelated"), "x").unwrap();
        let got = tokio::time::timeout(Duration::from_millis(600), w.changed()).await;
        assert!(got.is_err(), "reported {got:?}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
