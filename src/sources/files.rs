//! File-backed secrets: `cert_file`/`key_file` pairs and `trust_bundle` files, loaded at start and watched.
//!
//! Changes are seen through inotify ([`crate::watch`]) on the directories that hold the files, which covers
//! rename-over, in-place rewrites and the Kubernetes Secret-volume symlink swap (`..data` renamed in the
//! mounted directory); a periodic re-check of each file's identity (device, inode, size, mtime, ctime) is the
//! safety net for filesystems without events. Only files whose identity changed are read again. A pair that
//! does not parse or whose key does not match its leaf is rejected with one error log, and the last good
//! version keeps being served.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::certs::{self, MaterialError};
use crate::config::{CertificateSource, Config, Problem};
use crate::registry::{Published, Registry, SecretContent, SecretVersion};
use crate::values::SecretName;
use crate::watch::{DirWatch, next_change};

/// How often files are re-checked when no change event arrives.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// A change that does not load yet (a pair written one file at a time) gets this long, or until the next
/// event, to become whole before it is reported as an error.
const SETTLE: Duration = Duration::from_millis(100);
/// How many events in a row may find a change still not loadable before it is reported.
const MAX_TENTATIVE: usize = 16;

#[derive(Debug, Clone)]
enum Files {
    Pair { cert: PathBuf, key: PathBuf },
    Bundle { file: PathBuf },
}

/// Identity of a file's current content, as far as metadata tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

#[derive(Debug)]
struct Entry {
    name: SecretName,
    key: String,
    files: Files,
    stamps: Vec<Option<Stamp>>,
    /// The stamps of a change that did not load yet (tentatively): not read again until they change.
    tried: Option<Vec<Option<Stamp>>>,
    last_error: Option<String>,
}

/// Why a file-backed secret could not be loaded.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        which: &'static str,
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Material {
        path: PathBuf,
        which: &'static str,
        source: MaterialError,
    },
}

impl Entry {
    fn paths(&self) -> Vec<&Path> {
        match &self.files {
            Files::Pair { cert, key, .. } if cert == key => vec![cert],
            Files::Pair { cert, key, .. } => vec![cert, key],
            Files::Bundle { file, .. } => vec![file],
        }
    }

    fn read(
        &self,
        path: &Path,
        which: &'static str,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, LoadError> {
        std::fs::read(path)
            .map(zeroize::Zeroizing::new)
            .map_err(|source| LoadError::Read {
                path: path.to_owned(),
                which,
                source,
            })
    }

    fn load(&self) -> Result<SecretContent, LoadError> {
        match &self.files {
            Files::Pair { cert, key, .. } => {
                let chain = self.read(cert, "cert_file")?;
                // A combined PEM (chain and key in one file, named by both keys) is read once, so that both
                // halves come from the same version of the file.
                let key_pem = if key == cert {
                    chain.clone()
                } else {
                    self.read(key, "key_file")?
                };
                let pair = certs::certified_pem(&chain, &key_pem).map_err(|e| {
                    let (which, path) = if e.is_about_key() {
                        ("key_file", key)
                    } else {
                        ("cert_file", cert)
                    };
                    LoadError::Material {
                        path: path.to_owned(),
                        which,
                        source: e,
                    }
                })?;
                Ok(SecretContent::TlsCertificate(pair))
            }
            Files::Bundle { file, .. } => {
                let pem = self.read(file, "file")?;
                let bundle =
                    certs::trust_bundle_pem(&pem).map_err(|source| LoadError::Material {
                        path: file.clone(),
                        which: "file",
                        source,
                    })?;
                Ok(SecretContent::TrustBundle(bundle))
            }
        }
    }

    /// The problem, named by its config key (`certificate[0].key_file`); [`Config::error`] adds the line.
    fn problem(&self, e: &LoadError) -> Problem {
        let which = match e {
            LoadError::Read { which, .. } | LoadError::Material { which, .. } => *which,
        };
        Problem::new(format!("{}.{which}", self.key), None, e.to_string())
    }
}

/// The file-backed secrets of a configuration.
#[derive(Debug)]
pub struct FileSource {
    entries: Vec<Entry>,
}

impl FileSource {
    /// The file-backed secrets of `config`, not loaded yet.
    pub fn from_config(config: &Config) -> Self {
        let certs = config.certificates.iter().filter_map(|c| {
            let CertificateSource::Files {
                cert_file,
                key_file,
            } = &c.source
            else {
                return None;
            };
            Some((
                c.name.clone(),
                c.key.clone(),
                Files::Pair {
                    cert: cert_file.clone(),
                    key: key_file.clone(),
                },
            ))
        });
        let bundles = config.trust_bundles.iter().map(|b| {
            (
                b.name.clone(),
                b.key.clone(),
                Files::Bundle {
                    file: b.file.clone(),
                },
            )
        });
        let entries = certs
            .chain(bundles)
            .map(|(name, key, files)| Entry {
                name,
                key,
                files,
                stamps: Vec::new(),
                tried: None,
                last_error: None,
            })
            .collect();
        FileSource { entries }
    }

    /// Loads every file now. Any failure is a problem naming its config key; used by `check` and at start.
    pub fn load_all(&mut self) -> Result<Vec<(SecretName, SecretContent)>, Vec<Problem>> {
        let mut loaded = Vec::new();
        let mut problems = Vec::new();
        for entry in &mut self.entries {
            entry.stamps = entry.paths().iter().map(|p| stamp(p)).collect();
            match entry.load() {
                Ok(content) => loaded.push((entry.name.clone(), content)),
                Err(e) => problems.push(entry.problem(&e)),
            }
        }
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(problems)
        }
    }

    /// Directories to watch: each file's own directory, and the directory its symlinks resolve to.
    fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for entry in &self.entries {
            for path in entry.paths() {
                crate::watch::dirs_for(path, &mut dirs);
            }
        }
        dirs
    }

    /// Re-reads every entry whose files changed and publishes what is new.
    pub fn reload(&mut self, registry: &Registry) {
        let mut published = Vec::new();
        self.reload_with(registry, false, &mut published);
        log_published(&mut published);
    }

    /// Like [`FileSource::reload`], leaving the log lines of what it published in `published`; when
    /// `tentative`, a change that does not load (a pair caught between its two writes) is neither logged
    /// nor remembered, so the next look reads it again. Returns whether such a change is waiting.
    fn reload_with(
        &mut self,
        registry: &Registry,
        tentative: bool,
        published: &mut Vec<Reloaded>,
    ) -> bool {
        let mut waiting = false;
        for entry in &mut self.entries {
            let stamps: Vec<_> = entry.paths().iter().map(|p| stamp(p)).collect();
            if stamps == entry.stamps {
                continue;
            }
            // Events for other files (a temp file being written) say nothing new about this pair.
            if tentative && entry.tried.as_ref() == Some(&stamps) {
                waiting = true;
                continue;
            }
            let loaded = entry.load();
            if tentative && loaded.is_err() {
                entry.tried = Some(stamps);
                waiting = true;
                continue;
            }
            entry.tried = None;
            entry.stamps = stamps;
            match loaded {
                Ok(content) => {
                    entry.last_error = None;
                    if let Published::New(v) = registry.publish(&entry.name, &content) {
                        published.push((entry.name.clone(), content, v));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if entry.last_error.as_deref() != Some(msg.as_str()) {
                        let serving = registry.get(&entry.name);
                        tracing::error!(
                            secret = %entry.name,
                            error = %msg,
                            serving_version = serving.as_ref().map(|v| v.version()).unwrap_or("none"),
                            "rejected changed files; still serving the last good version"
                        );
                        entry.last_error = Some(msg);
                    }
                }
            }
        }
        waiting
    }

    /// Watches the files until `shutdown`, publishing every good change.
    pub async fn run(mut self, registry: Arc<Registry>, shutdown: CancellationToken) {
        if self.entries.is_empty() {
            return;
        }
        let mut watch = match DirWatch::new(&self.watch_dirs()) {
            Ok((watch, failed)) => {
                for (dir, e) in failed {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; changes there are seen by periodic re-checks");
                }
                Some(watch)
            }
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable; changes are seen by periodic re-checks");
                None
            }
        };
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.reload_with(&registry, false, &mut published);
                    log_after_pushes(&mut published).await;
                    continue;
                }
                changed = next_change(&mut watch) => {
                    if let Err(e) = changed {
                        tracing::warn!(error = %e, "file watch failed; changes are seen by periodic re-checks");
                        watch = None;
                        continue;
                    }
                }
            }
            // A change: publish it at once when it loads. One that does not (the certificate written, its
            // key not yet) is looked at again on the next event, or after SETTLE, and only then reported.
            for _ in 0..MAX_TENTATIVE {
                let waiting = self.reload_with(&registry, true, &mut published);
                log_after_pushes(&mut published).await;
                if !waiting {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = next_change(&mut watch) => {
                        if changed.is_err() {
                            watch = None;
                        }
                        continue;
                    }
                    _ = tokio::time::sleep(SETTLE) => {}
                }
                self.reload_with(&registry, false, &mut published);
                log_after_pushes(&mut published).await;
                break;
            }
        }
    }
}

/// What a reload published, for its log line: name, content and the new version.
type Reloaded = (SecretName, SecretContent, Arc<SecretVersion>);

fn log_published(published: &mut Vec<Reloaded>) {
    for (name, content, v) in published.drain(..) {
        super::log_loaded(&name, &content, v.version(), "reloaded");
    }
}

/// Logs what was published once the streams it woke have had their turn: writing a log line (to a pipe
/// whose reader wakes up) before them would hold back every push by as long.
async fn log_after_pushes(published: &mut Vec<Reloaded>) {
    if !published.is_empty() {
        tokio::task::yield_now().await;
        log_published(published);
    }
}
