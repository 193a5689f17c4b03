//! Change notifications for directories: "something in here changed, look again".
//!
//! On Linux this is inotify read on the tokio reactor (the `inotify` crate's stream), so a renamed
//! certificate wakes the task that reloads it straight from epoll; there is no watcher thread to hand the
//! event over (a thread wake-up costs more than the rest of the reload on a busy machine). Elsewhere it is
//! the `notify` crate's watcher thread. Events carry no meaning beyond the wake-up: callers compare file identities themselves, so a burst of
//! events (a temp file written, then renamed) is drained into one wake-up and nothing is lost by merging.
//! Reads of the watched files (open, access, close without writing) do not wake anyone.

use std::io;
use std::path::{Path, PathBuf};

/// The directories to watch so that a change to `path` is seen: its parent, and its resolved target's
/// parent when it is a symlink (a Kubernetes Secret volume's `tls.crt -> ..data/tls.crt`).
pub fn dirs_for(path: &Path, dirs: &mut Vec<PathBuf>) {
    let resolved = std::fs::canonicalize(path).ok();
    for p in std::iter::once(path.to_owned()).chain(resolved) {
        let dir = match p.parent() {
            Some(d) if d.as_os_str().is_empty() => PathBuf::from("."),
            Some(d) => d.to_owned(),
            None => continue,
        };
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::path::PathBuf;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use inotify::{EventStream, Inotify, WatchMask};
    use tokio_stream::Stream;

    pub struct DirWatch(EventStream<Vec<u8>>);

    impl DirWatch {
        pub fn new(dirs: &[PathBuf]) -> io::Result<(DirWatch, Vec<(PathBuf, io::Error)>)> {
            let inotify = Inotify::init()?;
            let mask = WatchMask::MODIFY
                | WatchMask::ATTRIB
                | WatchMask::CLOSE_WRITE
                | WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM
                | WatchMask::MOVED_TO
                | WatchMask::DELETE_SELF
                | WatchMask::MOVE_SELF;
            let mut failed = Vec::new();
            for dir in dirs {
                if let Err(e) = inotify.watches().add(dir, mask) {
                    failed.push((dir.clone(), e));
                }
            }
            Ok((DirWatch(inotify.into_event_stream(vec![0; 4096])?), failed))
        }

        /// Polls for the next event.
        fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match Pin::new(&mut self.0).poll_next(cx) {
                Poll::Ready(Some(Ok(_))) => Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Err(e)),
                Poll::Ready(None) => Poll::Ready(Err(io::Error::other("inotify closed"))),
                Poll::Pending => Poll::Pending,
            }
        }

        pub async fn changed(&mut self) -> io::Result<()> {
            std::future::poll_fn(|cx| {
                std::task::ready!(self.poll_event(cx))?;
                // Drain the burst: everything already queued belongs to this wake-up.
                while let Poll::Ready(r) = self.poll_event(cx) {
                    r?;
                }
                Poll::Ready(Ok(()))
            })
            .await
        }

        /// Whether an event is waiting to be read (consumes it).
        #[cfg(test)]
        pub fn queued(&mut self) -> bool {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            self.poll_event(&mut cx).is_ready()
        }
    }
}

/// The `notify` crate's watcher: what other systems use (compiled and tested on Linux too).
#[cfg(any(not(target_os = "linux"), test))]
mod fallback {
    use std::io;
    use std::path::PathBuf;
    use std::sync::Arc;

    use notify::{EventKind, RecursiveMode, Watcher};

    pub struct DirWatch {
        _watcher: notify::RecommendedWatcher,
        wake: Arc<tokio::sync::Notify>,
    }

    impl DirWatch {
        pub fn new(dirs: &[PathBuf]) -> io::Result<(DirWatch, Vec<(PathBuf, io::Error)>)> {
            let wake = Arc::new(tokio::sync::Notify::new());
            let waker = wake.clone();
            let mut watcher =
                notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                    if !matches!(res, Ok(ref ev) if matches!(ev.kind, EventKind::Access(_))) {
                        waker.notify_one();
                    }
                })
                .map_err(io::Error::other)?;
            let mut failed = Vec::new();
            for dir in dirs {
                if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                    failed.push((dir.clone(), io::Error::other(e)));
                }
            }
            Ok((
                DirWatch {
                    _watcher: watcher,
                    wake,
                },
                failed,
            ))
        }

        pub async fn changed(&mut self) -> io::Result<()> {
            self.wake.notified().await;
            Ok(())
        }
    }
}

#[cfg(not(target_os = "linux"))]
use fallback as imp;

/// A set of watched directories.
pub struct DirWatch(imp::DirWatch);

impl DirWatch {
    /// Watches `dirs` (not recursively). Returns the directories that could not be watched, with why; the
    /// caller decides how to report them.
    pub fn new(dirs: &[PathBuf]) -> io::Result<(DirWatch, Vec<(PathBuf, io::Error)>)> {
        let (watch, failed) = imp::DirWatch::new(dirs)?;
        Ok((DirWatch(watch), failed))
    }

    /// Resolves once something changed in a watched directory since the last call; every event already
    /// queued is consumed with it. Cancel-safe: an event that arrives while nobody waits is kept.
    pub async fn changed(&mut self) -> io::Result<()> {
        self.0.changed().await
    }
}

/// The next change seen by `watch`; never, when there is no watch (the caller re-checks periodically).
pub async fn next_change(watch: &mut Option<DirWatch>) -> io::Result<()> {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait(watch: &mut DirWatch) {
        tokio::time::timeout(std::time::Duration::from_secs(10), watch.changed())
            .await
            .expect("no change seen within 10 s")
            .unwrap();
    }

    #[tokio::test]
    async fn a_rename_wakes_once_for_the_whole_burst_and_reads_wake_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.pem");
        std::fs::write(&file, "one").unwrap();
        let (mut watch, failed) = DirWatch::new(&[dir.path().to_owned()]).unwrap();
        assert!(failed.is_empty(), "{failed:?}");

        // A temp file written and renamed over: several events, one wake-up that consumes them all.
        let tmp = dir.path().join("a.tmp");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        wait(&mut watch).await;
        #[cfg(target_os = "linux")]
        assert!(!watch.0.queued(), "the burst was not drained");

        // Reading the file (as a reload does) queues nothing: inotify queues events as the syscalls happen.
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "two");
        #[cfg(target_os = "linux")]
        assert!(!watch.0.queued(), "a read woke the watcher");

        // A change made while nobody waits is kept for the next wait.
        std::fs::write(dir.path().join("b.pem"), "three").unwrap();
        wait(&mut watch).await;
    }

    #[tokio::test]
    async fn the_fallback_wakes_on_a_rename_and_keeps_a_change_made_while_nobody_waits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.pem");
        std::fs::write(&file, "one").unwrap();
        let (mut watch, failed) = fallback::DirWatch::new(&[dir.path().to_owned()]).unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        let wait = std::time::Duration::from_secs(10);
        let tmp = dir.path().join("a.tmp");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(wait, watch.changed())
            .await
            .unwrap()
            .unwrap();
        std::fs::write(dir.path().join("b.pem"), "three").unwrap();
        tokio::time::timeout(wait, watch.changed())
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_symlinked_file_watches_both_directories() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("data");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("tls.crt"), "x").unwrap();
        let link = dir.path().join("tls.crt");
        std::os::unix::fs::symlink(real.join("tls.crt"), &link).unwrap();
        let mut dirs = Vec::new();
        dirs_for(&link, &mut dirs);
        dirs_for(&link, &mut dirs);
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(dirs.len(), 2, "{dirs:?}");
        assert_eq!(canon(&dirs[0]), canon(dir.path()));
        assert_eq!(canon(&dirs[1]), canon(&real));
    }
}
