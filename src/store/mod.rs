//! Persistent state behind a small key-value interface: ACME accounts, issued certificates with their keys,
//! per-certificate renewal state, and pending HTTP-01 challenges.
//!
//! Keys are `/`-separated paths of safe characters (`acme/<ca>/account`, `challenges/<token>`). Every write
//! replaces a whole value; `compare_and_swap` makes a write conditional on the revision read before, so a
//! shared backend (etcd) can later serve several replicas through the same interface. The first backend,
//! [`FsStore`], maps keys to files under one directory: the directory is 0700, every file 0600, and every
//! write is temp file + fsync + rename + directory fsync, so a crash leaves either the old or the new value.
//!
//! One daemon per directory: [`FsStore::open`] takes an exclusive lock (`flock` on `.lock`, released by the
//! kernel when the process ends, however it ends) and a second daemon on the same directory refuses to start,
//! naming the holder; two daemons ordering and overwriting each other's state would hammer the CA and lose
//! certificates. [`FsStore::open_read_only`] (for `acme-sds status`) takes no lock and writes nothing, not
//! even temp-file clean-up. Temp files have unpredictable names and are created exclusively (`O_EXCL`), so
//! nothing else on the host can pre-create or race them.

pub mod etcd;
pub mod sealed;

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A stored value and its revision (a hash of the value; 0 means absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The bytes.
    pub value: Vec<u8>,
    /// A hash of them: what a compare-and-swap compares.
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
/// Why a store operation failed.
pub enum StoreError {
    #[error("invalid store key {0:?}")]
    /// A key with characters the layout does not allow.
    BadKey(String),
    #[error(
        "{} is in use by another acme-sds ({holder}); one daemon per storage directory (several replicas need a shared store such as etcd)",
        .path.display()
    )]
    /// Another acme-sds holds the storage directory.
    Locked {
        /// The lock file.
        path: PathBuf,
        /// Who holds it, as its lock file says (pid, host, start).
        holder: String,
    },
    #[error("storage {} is open read-only", .0.display())]
    /// The store was opened read-only (`acme-sds status` offline).
    ReadOnly(PathBuf),
    #[error("storage {op} {}: {source}", .path.display())]
    /// A file system operation failed.
    Io {
        /// What was being done (`create`, `rename`, ...).
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// An etcd request failed (no quorum, unreachable, refused).
    #[error("etcd {op} {key}: {reason}")]
    Etcd {
        /// What was being done (`get`, `put`, `compare-and-swap`, ...).
        op: &'static str,
        /// The store key (or the endpoints, for `connect`).
        key: String,
        /// What the client said.
        reason: String,
    },
    /// A write made under a lock was refused because the lock is no longer this process's (its lease
    /// expired while it was paused or cut off, and another replica may hold it now).
    #[error("write to {key} refused: the lock {lock} is no longer held here (its lease expired)")]
    Fenced {
        /// The key written.
        key: String,
        /// The lock it was written under.
        lock: String,
    },
    /// A value that must be sealed (it holds a private key) is in clear while `storage.encryption_key_file`
    /// is set: anyone who can write to the store could have planted it (see [`sealed`]).
    #[error(
        "storage value at {key} holds a private key in clear, and storage.encryption_key_file is set: refused, as anyone who can write to the store could have put it there. If it was stored before the key was configured, set storage.accept_unsealed = true for one start: private keys in clear are then read and sealed in place"
    )]
    Unsealed {
        /// The store key.
        key: String,
    },
    /// A sealed value (see [`sealed`]) could not be opened, or a value could not be sealed.
    #[error("storage value at {key} is sealed: {reason}")]
    Sealed {
        /// The store key.
        key: String,
        /// Why it cannot be opened (which key it needs, or that it was moved or altered).
        reason: String,
    },
    #[error(
        "storage value at {key} changed concurrently (expected revision {expected}, found {found})"
    )]
    /// A compare-and-swap lost the race.
    Conflict {
        /// The key.
        key: String,
        /// The revision the writer expected.
        expected: u64,
        /// The revision found.
        found: u64,
    },
}

/// Longest key segment: a file name in [`FsStore`], with room left for its temp-file (`.NAME.tmp-…`, 22
/// bytes more) and quarantine (`NAME.corrupt-…`) names under the usual 255-byte limit.
pub const MAX_SEGMENT_BYTES: usize = 200;

/// A name (a secret's) as one store key segment: kept as it is when made of letters, digits, `-`, `_` and
/// `.`, hex-encoded (`x-…`) otherwise. `Err` says why when the segment would be too long for a file name.
pub fn name_segment(name: &str) -> Result<String, String> {
    let safe = !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    let segment = if safe {
        name.to_owned()
    } else {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x-{hex}")
    };
    if segment.len() > MAX_SEGMENT_BYTES {
        return Err(format!(
            "{name:?} would be stored under a file name of {} bytes, over the {MAX_SEGMENT_BYTES} the storage allows; use a shorter name (names of letters, digits, '-', '_' and '.' are stored as they are; others take two bytes per byte)",
            segment.len()
        ));
    }
    Ok(segment)
}

/// A secret name as one store key segment. Names too long for one were refused by the configuration; should
/// one get here anyway, it is stored under its hash rather than failing.
pub fn key_segment(name: &str) -> String {
    name_segment(name).unwrap_or_else(|_| {
        let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("h-{hex}")
    })
}

/// The storage interface. Implementations must make each `put` atomic.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The value at `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Writes `value` unconditionally; returns the new revision.
    async fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError>;
    /// Writes `value` only if the current revision is `expected` (0: the key must not exist).
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<u64, StoreError>;
    /// Removes `key` (absent is fine).
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Keys directly or indirectly under `prefix/`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Moves an unusable value aside (to `<key>.corrupt-<unix time>`), keeping it for inspection; returns
    /// the key it now has.
    async fn quarantine(&self, key: &str) -> Result<String, StoreError>;

    /// Every value under `prefix/`, sorted by key: on etcd a few requests of a few hundred values each, all
    /// read at one revision (a cold start reads thousands of certificates as one snapshot), a read per file
    /// on a directory.
    async fn scan(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        let mut out = Vec::new();
        for key in self.list(prefix).await? {
            if let Some(e) = self.get(&key).await? {
                out.push((key, e));
            }
        }
        Ok(out)
    }

    /// Whether other processes share this store (etcd): their challenges and locks are not this
    /// process's to clear, and their writes arrive through [`Store::watch`].
    fn shared(&self) -> bool {
        false
    }

    /// Takes the lock `name` (a store key: the resource it guards), waiting while another replica holds
    /// it; a lock lives on a lease of `ttl` renewed while held. Bound the wait with a timeout.
    async fn lock(&self, name: &str, _ttl: std::time::Duration) -> Result<Lock, StoreError> {
        Ok(Lock {
            name: name.to_owned(),
            etcd: None,
        })
    }

    /// Gives `lock` up (another replica waiting for it takes it at once).
    async fn unlock(&self, _lock: Lock) -> Result<(), StoreError> {
        Ok(())
    }

    /// Writes `value` at `key` only while `lock` is still held ([`StoreError::Fenced`] otherwise): a
    /// holder paused past its lease cannot overwrite what the next holder stored.
    async fn put_locked(&self, _lock: &Lock, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        self.put(key, value).await
    }

    /// Removes `key` only while `lock` is still held.
    async fn delete_locked(&self, _lock: &Lock, key: &str) -> Result<(), StoreError> {
        self.delete(key).await
    }

    /// Writes a value that removes itself after `ttl` if nobody deletes it first (etcd: a lease), for
    /// pending challenges a crashed replica would leave behind. On a directory it is a plain write (a
    /// daemon clears what a previous one left at start).
    async fn put_expiring(
        &self,
        key: &str,
        value: &[u8],
        _ttl: std::time::Duration,
    ) -> Result<u64, StoreError> {
        self.put(key, value).await
    }

    /// Changes under `prefix/` made after this call returns, until `shutdown`, when other processes can
    /// make them (etcd); `None` for a directory, which only this process writes.
    async fn watch(
        &self,
        _prefix: &str,
        _shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::sync::mpsc::Receiver<Change>> {
        None
    }

    /// Whether the store can be written now, and its last failure.
    fn health(&self) -> StoreHealth {
        StoreHealth {
            backend: "directory",
            ..StoreHealth::default()
        }
    }
}

/// A store shared by the sources that use it.
pub type SharedStore = Arc<dyn Store>;

/// A lock on one resource (one certificate's orders, the ACME account), taken with [`Store::lock`]: while
/// it is held, its holder is the only process working on that resource, and the writes it makes with
/// [`Store::put_locked`] land only while it is still held. On a directory the lock is the directory's own
/// (one daemon per directory), so taking one never waits.
pub struct Lock {
    name: String,
    etcd: Option<etcd::EtcdLock>,
}

impl Lock {
    /// The resource locked (a store key).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// False once the lock's lease could not be renewed: it may have lapsed, and another replica may take
    /// it (writes made under it are refused from then on).
    pub fn held(&self) -> bool {
        self.etcd.as_ref().is_none_or(|l| l.renewing())
    }

    /// Stops renewing the lock's lease, as a paused or cut-off process would (for fault tests).
    pub fn stop_renewing(&self) {
        if let Some(l) = &self.etcd {
            l.stop_renewing();
        }
    }
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lock").field("name", &self.name).finish()
    }
}

/// A change to the store seen by [`Store::watch`], whoever made it (this process or another replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `key` was written.
    Put(String),
    /// `key` was removed (or its lease expired).
    Deleted(String),
    /// Changes may have been missed (the history the watch would have resumed from was compacted): read
    /// everything under the watched prefix again.
    Resync,
}

/// Whether the store can be written now, as the readiness check and `/status` report it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreHealth {
    /// The backend: `directory` or `etcd`.
    pub backend: &'static str,
    /// Why nothing can be stored now (no quorum, unreachable); `None` when the store works.
    pub unavailable: Option<String>,
    /// The last failed request, if any.
    pub last_error: Option<String>,
    /// When it failed (Unix time).
    pub last_error_at: Option<i64>,
}

fn revision(value: &[u8]) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, value);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b).max(1)
}

/// Where [`Store::quarantine`] moves `key`'s value: `KEY.corrupt-<unix time>`.
fn quarantine_key(key: &str) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{key}.corrupt-{stamp}")
}

/// Whether `key` holds a value moved aside by [`Store::quarantine`] (kept for inspection only).
pub fn is_quarantined(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|s| s.contains(".corrupt-"))
}

fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(key.to_owned()))
    }
}

/// Files under one directory. Single writer per directory (one acme-sds process, enforced by a lock); writes
/// are serialised in-process so that `compare_and_swap` is exact.
pub struct FsStore {
    root: PathBuf,
    write_lock: tokio::sync::Mutex<()>,
    /// The directory lock, held for as long as the store is open; `None` when opened read-only.
    lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// Where the state goes when the configured directory belongs to another user.
pub const PRIVATE_SUBDIR: &str = "acme-sds";

/// The directory the state lives in: `root` itself when it is private (0700) or acme-sds can make it so,
/// else its private subdirectory (also once that holds a store). With `create`, creates what is missing
/// and fixes modes; without, only looks.
fn private_dir(root: &Path, create: bool) -> Result<PathBuf, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let io = |op, path: &Path, source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    };
    let private = root.join(PRIVATE_SUBDIR);
    if private.join(LOCK_FILE).exists() {
        return Ok(private);
    }
    if !create {
        return Ok(root.to_owned());
    }
    let mkdir = |dir: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("create", dir, e))
    };
    mkdir(root)?;
    let meta = std::fs::metadata(root).map_err(|e| io("open", root, e))?;
    if meta.permissions().mode() & 0o077 == 0 {
        return Ok(root.to_owned());
    }
    match std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)) {
        Ok(()) => return Ok(root.to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Err(e) => return Err(io("chmod", root, e)),
    }
    tracing::info!(
        storage = %root.display(),
        owner = meta.uid(),
        group = meta.gid(),
        mode = format!("{:04o}", meta.permissions().mode() & 0o7777),
        "the storage directory is not acme-sds's to make private (a volume it does not own): keeping the state in its private subdirectory {PRIVATE_SUBDIR}/"
    );
    mkdir(&private)?;
    let sub = std::fs::metadata(&private).map_err(|e| io("open", &private, e))?;
    if sub.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod", &private, e))?;
    }
    Ok(private)
}

/// The lock file, in the store directory.
const LOCK_FILE: &str = ".lock";

impl FsStore {
    /// Opens (creating if needed, mode 0700) the store directory for this process alone: fails with
    /// [`StoreError::Locked`] when another process holds it.
    ///
    /// A directory that belongs to another user (a Kubernetes volume with `fsGroup`, root:GID mode 2775; a
    /// Docker `VOLUME` created by root) cannot be made private by acme-sds: its state then goes into a
    /// private subdirectory of it, [`PRIVATE_SUBDIR`], created 0700 and owned by acme-sds's user.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dir = private_dir(root, true)?;
        let lock = lock_dir(&dir)?;
        remove_temp_files(&dir);
        Ok(FsStore {
            root: dir,
            write_lock: tokio::sync::Mutex::new(()),
            lock: Some(lock),
        })
    }

    /// Opens an existing store directory to read it, alongside a daemon that may be running: no lock, no
    /// clean-up, and every write refused.
    pub fn open_read_only(root: &Path) -> Result<Self, StoreError> {
        let dir = private_dir(root, false)?;
        Ok(FsStore {
            root: dir,
            write_lock: tokio::sync::Mutex::new(()),
            lock: None,
        })
    }

    fn writable(&self) -> Result<(), StoreError> {
        match self.lock {
            Some(_) => Ok(()),
            None => Err(StoreError::ReadOnly(self.root.clone())),
        }
    }

    /// The storage directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn read(path: &Path) -> Result<Option<Entry>, StoreError> {
        match std::fs::read(path) {
            Ok(value) => Ok(Some(Entry {
                revision: revision(&value),
                value,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io {
                op: "read",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// temp file (0600) + fsync + rename + directory fsync.
    fn write_atomic(path: &Path, value: &[u8]) -> Result<(), StoreError> {
        let io = |op, source| StoreError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let dir = path
            .parent()
            .ok_or_else(|| io("write", std::io::ErrorKind::InvalidInput.into()))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("create directory for", e))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Unpredictable, and created exclusively: nobody can have prepared it (a symlink, a FIFO).
        let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(value)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(|e| io("write", e))
    }
}

#[async_trait::async_trait]
impl Store for FsStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || Self::read(&path))
            .await
            .unwrap_or_else(|e| Err(join_error(e)))
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        self.writable()?;
        let path = self.path(key)?;
        let value = value.to_vec();
        let _guard = self.write_lock.lock().await;
        tokio::task::spawn_blocking(move || {
            Self::write_atomic(&path, &value)?;
            Ok(revision(&value))
        })
        .await
        .unwrap_or_else(|e| Err(join_error(e)))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<u64, StoreError> {
        self.writable()?;
        let path = self.path(key)?;
        let value = value.to_vec();
        let key = key.to_owned();
        let _guard = self.write_lock.lock().await;
        tokio::task::spawn_blocking(move || {
            let found = Self::read(&path)?.map(|e| e.revision).unwrap_or(0);
            if found != expected {
                return Err(StoreError::Conflict {
                    key,
                    expected,
                    found,
                });
            }
            Self::write_atomic(&path, &value)?;
            Ok(revision(&value))
        })
        .await
        .unwrap_or_else(|e| Err(join_error(e)))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.writable()?;
        let path = self.path(key)?;
        let _guard = self.write_lock.lock().await;
        tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                op: "delete",
                path,
                source,
            }),
        })
        .await
        .unwrap_or_else(|e| Err(join_error(e)))
    }

    async fn quarantine(&self, key: &str) -> Result<String, StoreError> {
        self.writable()?;
        let path = self.path(key)?;
        let new_key = quarantine_key(key);
        let new_path = self.path(&new_key)?;
        let _guard = self.write_lock.lock().await;
        tokio::task::spawn_blocking(move || {
            std::fs::rename(&path, &new_path).map_err(|source| StoreError::Io {
                op: "move aside",
                path,
                source,
            })?;
            Ok(new_key)
        })
        .await
        .unwrap_or_else(|e| Err(join_error(e)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.path(prefix)?;
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![(dir, prefix)];
            while let Some((dir, key)) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        return Err(StoreError::Io {
                            op: "list",
                            path: dir,
                            source,
                        });
                    }
                };
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') {
                        continue; // temp files
                    }
                    let child = format!("{key}/{name}");
                    match entry.file_type() {
                        Ok(t) if t.is_dir() => stack.push((entry.path(), child)),
                        Ok(t) if t.is_file() => out.push(child),
                        _ => {}
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .unwrap_or_else(|e| Err(join_error(e)))
    }
}

/// Takes the directory's lock, or says who holds it. The lock file records the holder (pid, host, start
/// time) for that message; the lock itself is the kernel's, gone with the process.
fn lock_dir(root: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    use std::io::{Read, Seek};
    let path = root.join(LOCK_FILE);
    let io = |op, source| StoreError::Io {
        op,
        path: path.clone(),
        source,
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path);
    // On a read-only file system the lock file can still be locked if it exists (nothing will be written
    // there anyway, so the holder is not recorded).
    let (file, writable) = match opened {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(nix::libc::EROFS) => match std::fs::File::open(&path) {
            Ok(f) => (f, false),
            Err(_) => return Err(io("open", e)),
        },
        Err(e) => return Err(io("open", e)),
    };
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(StoreError::Locked {
                path: root.to_owned(),
                holder: if holder.is_empty() {
                    "holder unknown".into()
                } else {
                    holder.chars().take(200).collect()
                },
            });
        }
        Err((_, errno)) => return Err(io("lock", errno.into())),
    };
    if !writable {
        return Ok(lock);
    }
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let since = crate::certs::format_time(time::OffsetDateTime::now_utc());
    let holder = format!("pid {} on {host}, since {since}\n", std::process::id());
    let written = lock
        .set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| lock.write_all(holder.as_bytes()))
        .and_then(|()| lock.sync_all());
    written.map_err(|e| io("write", e))?;
    Ok(lock)
}

/// Removes temp files a crash left mid-write (`.<name>.tmp-<pid>`): the value they were to replace is
/// still whole, and nothing else reads them.
fn remove_temp_files(root: &Path) {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t)
                    if t.is_file()
                        && name.starts_with('.')
                        && name.contains(".tmp-")
                        && name != LOCK_FILE
                        && std::fs::remove_file(entry.path()).is_ok() =>
                {
                    tracing::info!(file = %entry.path().display(), "removed a temp file left by an interrupted write");
                }
                _ => {}
            }
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io {
        op: "run",
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn put_get_cas_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        let store = FsStore::open(&root).unwrap();
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(store.get("a/b").await.unwrap(), None);
        let r1 = store.put("a/b", b"one").await.unwrap();
        let mode = std::fs::metadata(root.join("a/b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(store.get("a/b").await.unwrap().unwrap().revision, r1);
        assert!(matches!(
            store.compare_and_swap("a/b", 0, b"x").await,
            Err(StoreError::Conflict { .. })
        ));
        let r2 = store.compare_and_swap("a/b", r1, b"two").await.unwrap();
        assert_ne!(r1, r2);
        store.compare_and_swap("a/c/d", 0, b"new").await.unwrap();
        assert_eq!(store.list("a").await.unwrap(), ["a/b", "a/c/d"]);
        store.delete("a/b").await.unwrap();
        store.delete("a/b").await.unwrap();
        assert_eq!(store.list("a").await.unwrap(), ["a/c/d"]);
        assert_eq!(store.list("nothing").await.unwrap(), Vec::<String>::new());
        let aside = store.quarantine("a/c/d").await.unwrap();
        assert!(aside.starts_with("a/c/d.corrupt-"), "{aside}");
        assert_eq!(store.get("a/c/d").await.unwrap(), None);
        assert_eq!(store.get(&aside).await.unwrap().unwrap().value, b"new");
    }

    #[tokio::test]
    async fn one_process_per_directory_and_readers_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        store.put("k", b"v").await.unwrap();
        // A second open in this process is refused as a second daemon would be (flock is per open file).
        let err = FsStore::open(dir.path()).err().expect("locked");
        let text = err.to_string();
        assert!(matches!(err, StoreError::Locked { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        // A reader sees the data and cannot write.
        let reader = FsStore::open_read_only(dir.path()).unwrap();
        assert_eq!(reader.get("k").await.unwrap().unwrap().value, b"v");
        assert!(matches!(
            reader.put("k", b"x").await,
            Err(StoreError::ReadOnly(_))
        ));
        assert!(matches!(
            reader.delete("k").await,
            Err(StoreError::ReadOnly(_))
        ));
        drop(store);
        FsStore::open(dir.path()).expect("free again once the holder is gone");
    }

    #[tokio::test]
    async fn temp_files_are_unpredictable_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        // Something planted where a predictable temp name would be is left alone.
        let planted = dir.path().join(format!(".k.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink("/etc/passwd", &planted).unwrap();
        store.put("k", b"v").await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("k")).unwrap(), b"v");
        assert!(std::fs::symlink_metadata(&planted).is_ok());
    }

    #[test]
    fn names_become_segments_that_fit_a_file_name() {
        assert_eq!(name_segment("web-1.example").unwrap(), "web-1.example");
        assert_eq!(name_segment("a/b c").unwrap(), "x-612f622063");
        assert_eq!(name_segment(".hidden").unwrap(), "x-2e68696464656e");
        assert!(name_segment(&"a".repeat(200)).is_ok());
        assert!(
            name_segment(&"a".repeat(201))
                .unwrap_err()
                .contains("201 bytes")
        );
        assert!(name_segment(&":".repeat(100)).is_err(), "hex doubles it");
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        for bad in ["", "../x", "a/../b", "/abs", "a//b", ".hidden", "a b"] {
            assert!(
                matches!(store.get(bad).await, Err(StoreError::BadKey(_))),
                "{bad}"
            );
        }
    }
}
