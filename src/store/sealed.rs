//! Encryption at rest for the values that hold private keys (the ACME account key, certificate keys, the
//! internal CA's key), in any store: a [`SealedStore`] wraps the backend and seals what a predicate says
//! is secret; certificates, renewal plans and challenge tokens stay readable.
//!
//! Envelope per value: `ASDS1 | key id (8) | nonce (12) | wrapped data key (32 + 16) | nonce (12) |
//! AES-256-GCM ciphertext`. Every value gets a fresh data key, wrapped by the key from
//! `storage.encryption_key_file`; the associated data of both is the key id and the store key, so a value
//! copied to another key (one certificate's key passed off as another's) or under another key id fails to
//! open instead of being served. The key file may hold several keys, one per line: the first seals new
//! values, the others still open old ones (rotation: add a new first line, restart, and the old values are
//! sealed again as they are next written). A value sealed without a key configured is refused with an error
//! saying which key it needs.
//!
//! With a key configured, a private key found in clear is refused ([`StoreError::Unsealed`]): anyone with
//! write access to the store (etcd credentials, a backup restored by hand) could otherwise plant a key that
//! every replica would serve. A store that predates the key is converted with `storage.accept_unsealed`
//! ([`Unsealed::Reseal`]): such values are read and written back sealed, so one start with it on seals
//! every key the start-up scan reads. `acme-sds storage migrate` reads its source directory as it is
//! ([`Unsealed::Read`]), changing nothing there.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::{Change, Entry, Lock, SharedStore, Store, StoreError, StoreHealth};

/// What every sealed value starts with.
const MAGIC: &[u8] = b"ASDS1";
const KEY_ID_LEN: usize = 8;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Bytes before the value's own nonce and ciphertext.
const HEADER_LEN: usize = MAGIC.len() + KEY_ID_LEN + NONCE_LEN + KEY_LEN + TAG_LEN;

/// Why the key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("storage.encryption_key_file: {path}: {reason}")]
pub struct KeyFileError {
    path: String,
    reason: String,
}

/// `storage.encryption_key_file`, and whether a private key found in clear is accepted
/// (`storage.accept_unsealed`): what [`Sealer::load`] reads. A bare path converts into one that refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    /// The key file.
    pub path: PathBuf,
    /// `storage.accept_unsealed`: private keys found in clear are read and sealed in place rather than
    /// refused.
    pub accept_unsealed: bool,
}

impl std::ops::Deref for KeyFile {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl From<&Path> for KeyFile {
    fn from(path: &Path) -> KeyFile {
        KeyFile {
            path: path.to_owned(),
            accept_unsealed: false,
        }
    }
}

impl From<&PathBuf> for KeyFile {
    fn from(path: &PathBuf) -> KeyFile {
        KeyFile::from(path.as_path())
    }
}

impl From<&KeyFile> for KeyFile {
    fn from(key_file: &KeyFile) -> KeyFile {
        key_file.clone()
    }
}

/// What a [`SealedStore`] with a key does with a value in clear at a key that must be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsealed {
    /// Refused with [`StoreError::Unsealed`], naming the key and the setting that would allow it.
    Refuse,
    /// Read, and written back sealed (`storage.accept_unsealed`): the store converges.
    Reseal,
    /// Read as it is, nothing written: the source directory of `acme-sds storage migrate`, which may
    /// predate the key and is not this command's to change.
    Read,
}

/// One master key and its id (the first 8 bytes of its SHA-256).
struct MasterKey {
    id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
}

impl MasterKey {
    fn new(bytes: &[u8]) -> Option<MasterKey> {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
        let key = UnboundKey::new(&AES_256_GCM, bytes).ok()?;
        Some(MasterKey {
            id,
            key: LessSafeKey::new(key),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys of `storage.encryption_key_file`: the first seals, all open; and what becomes of a private
/// key found in clear.
pub struct Sealer {
    keys: Vec<MasterKey>,
    rng: SystemRandom,
    unsealed: Unsealed,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.keys.iter().map(|k| hex(&k.id)).collect();
        f.debug_struct("Sealer")
            .field("key_ids", &ids)
            .field("unsealed", &self.unsealed)
            .finish()
    }
}

impl Sealer {
    /// Reads the key file: one key per line, each 32 bytes in base64 (`head -c 32 /dev/urandom | base64`);
    /// blank lines and `#` comments are skipped. The error names the file and the line at fault. A file
    /// every user of the host may open is refused ([`crate::config::secret_files`]).
    pub fn load(key_file: impl Into<KeyFile>) -> Result<Sealer, KeyFileError> {
        let key_file = key_file.into();
        let path = key_file.path.as_path();
        let fail = |reason: String| KeyFileError {
            path: path.display().to_string(),
            reason,
        };
        if let Some(why) = crate::config::secret_files::world_access(path) {
            return Err(fail(why));
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?,
        );
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(line)
                    .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(line))
                    .map_err(|_| fail(format!("line {}: not base64", i + 1)))?,
            );
            if bytes.len() != KEY_LEN {
                return Err(fail(format!(
                    "line {}: a key is {KEY_LEN} bytes (`head -c 32 /dev/urandom | base64`), this one {}",
                    i + 1,
                    bytes.len()
                )));
            }
            keys.push(MasterKey::new(&bytes).ok_or_else(|| fail("unusable key".into()))?);
        }
        if keys.is_empty() {
            return Err(fail(
                "no key in it: write one with `head -c 32 /dev/urandom | base64`".into(),
            ));
        }
        Ok(Sealer {
            keys,
            rng: SystemRandom::new(),
            unsealed: if key_file.accept_unsealed {
                Unsealed::Reseal
            } else {
                Unsealed::Refuse
            },
        })
    }

    /// What a store sealed with these keys does with a private key found in clear.
    pub fn unsealed(&self) -> Unsealed {
        self.unsealed
    }

    /// The id of the key new values are sealed with (hex), for logs.
    pub fn key_id(&self) -> String {
        hex(&self.keys[0].id)
    }

    fn aad(id: &[u8], store_key: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(MAGIC.len() + id.len() + store_key.len());
        aad.extend_from_slice(MAGIC);
        aad.extend_from_slice(id);
        aad.extend_from_slice(store_key.as_bytes());
        aad
    }

    fn nonce(&self) -> Result<[u8; NONCE_LEN], StoreError> {
        let mut n = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut n)
            .map_err(|_| sealing(None, "no randomness"))?;
        Ok(n)
    }

    /// `value` sealed for `store_key`.
    fn seal(&self, store_key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let master = &self.keys[0];
        let aad = Self::aad(&master.id, store_key);
        let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
        self.rng
            .fill(data_key.as_mut())
            .map_err(|_| sealing(Some(store_key), "no randomness"))?;
        let (n1, n2) = (self.nonce()?, self.nonce()?);
        let mut wrapped = data_key.to_vec();
        master
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(n1),
                Aad::from(&aad),
                &mut wrapped,
            )
            .map_err(|_| sealing(Some(store_key), "wrapping the data key failed"))?;
        let dk = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, data_key.as_ref())
                .map_err(|_| sealing(Some(store_key), "unusable data key"))?,
        );
        let mut body = value.to_vec();
        dk.seal_in_place_append_tag(Nonce::assume_unique_for_key(n2), Aad::from(&aad), &mut body)
            .map_err(|_| sealing(Some(store_key), "sealing failed"))?;
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&master.id);
        out.extend_from_slice(&n1);
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&n2);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The value sealed in `sealed` for `store_key`.
    fn open(&self, store_key: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        if sealed.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
            return Err(sealing(Some(store_key), "truncated sealed value"));
        }
        let id = &sealed[MAGIC.len()..MAGIC.len() + KEY_ID_LEN];
        let Some(master) = self.keys.iter().find(|k| k.id == id) else {
            return Err(sealing(
                Some(store_key),
                &format!(
                    "sealed with key {}, which storage.encryption_key_file does not hold",
                    hex(id)
                ),
            ));
        };
        let aad = Self::aad(id, store_key);
        let mut at = MAGIC.len() + KEY_ID_LEN;
        let n1 = &sealed[at..at + NONCE_LEN];
        at += NONCE_LEN;
        // Opened in place: the data key ends up in this buffer, zeroed when it drops.
        let mut wrapped = Zeroizing::new(sealed[at..at + KEY_LEN + TAG_LEN].to_vec());
        at += KEY_LEN + TAG_LEN;
        let n2 = &sealed[at..at + NONCE_LEN];
        at += NONCE_LEN;
        let refused = || {
            sealing(
                Some(store_key),
                "does not open under its own key: moved from another key, or altered",
            )
        };
        let nonce = |n: &[u8]| Nonce::try_assume_unique_for_key(n).map_err(|_| refused());
        let data_key = master
            .key
            .open_in_place(nonce(n1)?, Aad::from(&aad), wrapped.as_mut_slice())
            .map_err(|_| refused())?;
        let dk = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, data_key).map_err(|_| refused())?);
        let mut body = Zeroizing::new(sealed[at..].to_vec());
        let len = dk
            .open_in_place(nonce(n2)?, Aad::from(&aad), &mut body)
            .map_err(|_| refused())?
            .len();
        body.truncate(len);
        Ok(body)
    }
}

fn sealing(key: Option<&str>, reason: &str) -> StoreError {
    StoreError::Sealed {
        key: key.unwrap_or("").to_owned(),
        reason: reason.to_owned(),
    }
}

/// Whether `value` is a sealed envelope.
pub fn is_sealed(value: &[u8]) -> bool {
    value.starts_with(MAGIC)
}

/// A store whose secret values (those `secret` says hold private keys) are sealed with `sealer`, when one is
/// configured. Revisions are the backend's (of the sealed bytes), so compare-and-swap works unchanged.
pub struct SealedStore {
    inner: SharedStore,
    sealer: Option<Arc<Sealer>>,
    secret: fn(&str) -> bool,
    /// What a value in clear at a secret key gets, when a sealer is configured.
    unsealed: Unsealed,
}

impl SealedStore {
    /// `inner`, sealing the values of the keys `secret` names with `sealer` (none: written in clear, and a
    /// sealed value found is refused with the key id it needs). A secret value found in clear is treated
    /// as the sealer says ([`Sealer::unsealed`]).
    pub fn new(inner: SharedStore, sealer: Option<Arc<Sealer>>, secret: fn(&str) -> bool) -> Self {
        let unsealed = sealer.as_ref().map_or(Unsealed::Read, |s| s.unsealed);
        SealedStore {
            inner,
            sealer,
            secret,
            unsealed,
        }
    }

    /// The same store, treating a secret value in clear as `unsealed` says (the migration's source reads
    /// them as they are).
    pub fn with_unsealed(mut self, unsealed: Unsealed) -> Self {
        self.unsealed = unsealed;
        self
    }

    /// `value` as stored at `key`: sealed when `key` is secret and a key is configured, else as it is.
    fn seal<'a>(&self, key: &str, value: &'a [u8]) -> Result<Cow<'a, [u8]>, StoreError> {
        match &self.sealer {
            Some(s) if (self.secret)(key) => s.seal(key, value).map(Cow::Owned),
            _ => Ok(Cow::Borrowed(value)),
        }
    }
}

#[async_trait::async_trait]
impl Store for SealedStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        match self.inner.get(key).await? {
            Some(entry) => self.opened(key, entry).await.map(Some),
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        let value = self.seal(key, value)?;
        self.inner.put(key, &value).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<u64, StoreError> {
        let value = self.seal(key, value)?;
        self.inner.compare_and_swap(key, expected, &value).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }

    async fn quarantine(&self, key: &str) -> Result<String, StoreError> {
        self.inner.quarantine(key).await
    }

    /// A value that does not open fails the scan (naming it), unless it was moved aside for inspection
    /// ([`super::is_quarantined`]): those are left out.
    async fn scan(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        let mut out = Vec::new();
        for (key, entry) in self.inner.scan(prefix).await? {
            let opened = if super::is_quarantined(&key) {
                // Kept for inspection as it was: not sealed in place either.
                self.open(&key, entry).map(|(entry, _)| entry)
            } else {
                self.opened(&key, entry).await
            };
            match opened {
                Ok(entry) => out.push((key, entry)),
                Err(_) if super::is_quarantined(&key) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    async fn lock(&self, name: &str, ttl: std::time::Duration) -> Result<Lock, StoreError> {
        self.inner.lock(name, ttl).await
    }

    async fn unlock(&self, lock: Lock) -> Result<(), StoreError> {
        self.inner.unlock(lock).await
    }

    async fn put_locked(&self, lock: &Lock, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        let value = self.seal(key, value)?;
        self.inner.put_locked(lock, key, &value).await
    }

    async fn delete_locked(&self, lock: &Lock, key: &str) -> Result<(), StoreError> {
        self.inner.delete_locked(lock, key).await
    }

    async fn put_expiring(
        &self,
        key: &str,
        value: &[u8],
        ttl: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let value = self.seal(key, value)?;
        self.inner.put_expiring(key, &value, ttl).await
    }

    async fn watch(
        &self,
        prefix: &str,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::sync::mpsc::Receiver<Change>> {
        self.inner.watch(prefix, shutdown).await
    }

    fn health(&self) -> StoreHealth {
        self.inner.health()
    }
}

impl SealedStore {
    /// A value as read from the backend, opened when sealed; `true` when it is a secret in clear that is
    /// to be sealed in place.
    fn open(&self, key: &str, entry: Entry) -> Result<(Entry, bool), StoreError> {
        if !is_sealed(&entry.value) {
            if self.sealer.is_none() || !(self.secret)(key) {
                return Ok((entry, false));
            }
            return match self.unsealed {
                Unsealed::Refuse => Err(StoreError::Unsealed {
                    key: key.to_owned(),
                }),
                Unsealed::Reseal => Ok((entry, true)),
                Unsealed::Read => Ok((entry, false)),
            };
        }
        let Some(sealer) = &self.sealer else {
            let id = entry
                .value
                .get(MAGIC.len()..MAGIC.len() + KEY_ID_LEN)
                .map(hex);
            return Err(sealing(
                Some(key),
                &format!(
                    "sealed with key {}: set storage.encryption_key_file to the file holding it",
                    id.unwrap_or_default()
                ),
            ));
        };
        let mut value = sealer.open(key, &entry.value)?;
        Ok((
            Entry {
                value: std::mem::take(&mut *value),
                revision: entry.revision,
            },
            false,
        ))
    }

    /// [`SealedStore::open`], then a secret in clear written back sealed (`storage.accept_unsealed`):
    /// compare-and-swap on the revision read, so a value changed meanwhile is left to its writer. The
    /// entry returned carries the new revision, for the caller's own compare-and-swap. A write that fails
    /// (a read-only store, etcd unavailable) leaves the value in clear, to be sealed at a later read.
    async fn opened(&self, key: &str, entry: Entry) -> Result<Entry, StoreError> {
        let (entry, reseal) = self.open(key, entry)?;
        if !reseal {
            return Ok(entry);
        }
        let sealed = self.seal(key, &entry.value)?;
        match self
            .inner
            .compare_and_swap(key, entry.revision, &sealed)
            .await
        {
            Ok(revision) => {
                tracing::info!(
                    key,
                    "sealed a private key found in clear (storage.accept_unsealed)"
                );
                Ok(Entry {
                    value: entry.value,
                    revision,
                })
            }
            Err(StoreError::ReadOnly(_)) => Ok(entry),
            Err(e) => {
                tracing::warn!(key, error = %e, "could not seal a private key found in clear; it is sealed at a later read");
                Ok(entry)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FsStore;

    fn key_file(dir: &Path, name: &str, keys: &[[u8; 32]]) -> std::path::PathBuf {
        let path = dir.join(name);
        let text: Vec<String> = keys
            .iter()
            .map(|k| base64::engine::general_purpose::STANDARD.encode(k))
            .collect();
        std::fs::write(&path, format!("# test keys\n{}\n", text.join("\n"))).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        path
    }

    fn secret(key: &str) -> bool {
        key.starts_with("secret/")
    }

    #[tokio::test]
    async fn secrets_are_sealed_bound_to_their_key_and_open_after_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let fs: SharedStore = Arc::new(FsStore::open(&dir.path().join("data")).unwrap());
        let one = Arc::new(Sealer::load(&key_file(dir.path(), "k1", &[[1; 32]])).unwrap());
        let store = SealedStore::new(fs.clone(), Some(one.clone()), secret);
        let pem = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAw\n-----END PRIVATE KEY-----\n";
        store.put("secret/a", pem).await.unwrap();
        store.put("public/b", b"certificate").await.unwrap();

        // At rest: the secret is sealed, the rest is not; read back through the store, both are as written.
        let raw = fs.get("secret/a").await.unwrap().unwrap().value;
        assert!(is_sealed(&raw));
        assert!(!raw.windows(11).any(|w| w == b"PRIVATE KEY"));
        assert_eq!(
            fs.get("public/b").await.unwrap().unwrap().value,
            b"certificate"
        );
        assert_eq!(store.get("secret/a").await.unwrap().unwrap().value, pem);

        // A sealed value moved to another key does not open there.
        fs.put("secret/c", &raw).await.unwrap();
        let err = store.get("secret/c").await.unwrap_err().to_string();
        assert!(err.contains("moved from another key, or altered"), "{err}");
        // Nor does an altered one.
        let mut bent = raw.clone();
        *bent.last_mut().unwrap() ^= 1;
        fs.put("secret/a", &bent).await.unwrap();
        assert!(store.get("secret/a").await.is_err());
        store.put("secret/a", pem).await.unwrap();

        // Rotation: a new first key seals, the old one still opens.
        let both = Sealer::load(&key_file(dir.path(), "k2", &[[2; 32], [1; 32]])).unwrap();
        assert_ne!(both.key_id(), one.key_id());
        let rotated = SealedStore::new(fs.clone(), Some(Arc::new(both)), secret);
        assert_eq!(rotated.get("secret/a").await.unwrap().unwrap().value, pem);
        rotated.put("secret/a", pem).await.unwrap();
        let only_new = Sealer::load(&key_file(dir.path(), "k3", &[[2; 32]])).unwrap();
        let after = SealedStore::new(fs.clone(), Some(Arc::new(only_new)), secret);
        assert_eq!(after.get("secret/a").await.unwrap().unwrap().value, pem);

        // Without the key, a sealed value is refused with the key it needs.
        let keyless = SealedStore::new(fs.clone(), None, secret);
        let err = keyless.get("secret/a").await.unwrap_err().to_string();
        assert!(err.contains("set storage.encryption_key_file"), "{err}");
        // A value written in clear before a key was configured is refused once one is (see below).
        keyless.put("secret/old", b"clear").await.unwrap();
        assert!(matches!(
            after.get("secret/old").await,
            Err(StoreError::Unsealed { .. })
        ));
    }

    /// With a key configured, a private key in clear (planted by someone who can write to the store, or
    /// older than the key) is refused by every read, naming the store key and the setting that would let
    /// it in; values that are not secret are read in clear as ever.
    #[tokio::test]
    async fn a_private_key_in_clear_is_refused_naming_the_key_and_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let fs: SharedStore = Arc::new(FsStore::open(&dir.path().join("data")).unwrap());
        let sealer = Arc::new(Sealer::load(&key_file(dir.path(), "k", &[[1; 32]])).unwrap());
        let store = SealedStore::new(fs.clone(), Some(sealer), secret);
        fs.put("secret/planted", b"-----BEGIN PRIVATE KEY-----")
            .await
            .unwrap();
        fs.put("public/cert", b"certificate").await.unwrap();
        let err = store.get("secret/planted").await.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, StoreError::Unsealed { ref key } if key == "secret/planted")
                && text.contains("storage value at secret/planted")
                && text.contains("storage.accept_unsealed = true"),
            "{text}"
        );
        let err = store.scan("secret").await.unwrap_err().to_string();
        assert!(err.contains("secret/planted"), "{err}");
        assert_eq!(
            store.get("public/cert").await.unwrap().unwrap().value,
            b"certificate"
        );
        // Nothing was changed by the refusal.
        assert!(!is_sealed(
            &fs.get("secret/planted").await.unwrap().unwrap().value
        ));
    }

    /// `storage.accept_unsealed`: a private key in clear is read and written back sealed (by get and by
    /// scan), with the new revision handed to the caller, so the store converges; the migration's source
    /// reads such values as they are and changes nothing.
    #[tokio::test]
    async fn accept_unsealed_reads_a_key_in_clear_and_seals_it_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let fs: SharedStore = Arc::new(FsStore::open(&dir.path().join("data")).unwrap());
        let path = key_file(dir.path(), "k", &[[1; 32]]);
        let pem = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAw\n-----END PRIVATE KEY-----\n";
        fs.put("secret/a", pem).await.unwrap();
        fs.put("secret/b", pem).await.unwrap();

        let reader = SealedStore::new(
            fs.clone(),
            Some(Arc::new(Sealer::load(&path).unwrap())),
            secret,
        )
        .with_unsealed(Unsealed::Read);
        assert_eq!(reader.get("secret/a").await.unwrap().unwrap().value, pem);
        assert!(!is_sealed(
            &fs.get("secret/a").await.unwrap().unwrap().value
        ));

        let accepting = Sealer::load(KeyFile {
            path,
            accept_unsealed: true,
        })
        .unwrap();
        assert_eq!(accepting.unsealed(), Unsealed::Reseal);
        let store = SealedStore::new(fs.clone(), Some(Arc::new(accepting)), secret);
        let read = store.get("secret/a").await.unwrap().unwrap();
        assert_eq!(read.value, pem);
        let raw = fs.get("secret/a").await.unwrap().unwrap();
        assert!(is_sealed(&raw.value), "sealed in place");
        assert_eq!(
            read.revision, raw.revision,
            "the revision of what is stored now"
        );
        store
            .compare_and_swap("secret/a", read.revision, pem)
            .await
            .expect("a write on the revision read goes through");
        let scanned = store.scan("secret").await.unwrap();
        assert_eq!(scanned.len(), 2);
        assert!(scanned.iter().all(|(_, e)| e.value == pem));
        assert!(is_sealed(&fs.get("secret/b").await.unwrap().unwrap().value));
    }

    #[test]
    fn a_bad_key_file_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "# comment\n\nshort\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let err = Sealer::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("storage.encryption_key_file") && err.contains("line 3"),
            "{err}"
        );
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(
            Sealer::load(&path)
                .unwrap_err()
                .to_string()
                .contains("no key")
        );
        assert!(Sealer::load(&dir.path().join("absent")).is_err());
        let ok = key_file(dir.path(), "ok", &[[7; 32]]);
        let sealer = Sealer::load(&ok).unwrap();
        assert!(
            !format!("{sealer:?}").contains("LessSafeKey"),
            "Debug shows ids only"
        );
        // Readable by every user of the host: refused, naming the file, its mode and the fix.
        std::fs::set_permissions(&ok, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = Sealer::load(&ok).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "storage.encryption_key_file: {}: mode 0644",
                ok.display()
            )) && err.contains(&format!("chmod 600 {}", ok.display())),
            "{err}"
        );
    }
}
