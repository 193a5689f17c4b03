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
//! sealed again as they are next written). A value written in clear before a key was configured is still
//! read; one sealed without a key configured is refused with an error saying which key it needs.

use std::borrow::Cow;
use std::path::Path;
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

/// The keys of `storage.encryption_key_file`: the first seals, all open.
pub struct Sealer {
    keys: Vec<MasterKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.keys.iter().map(|k| hex(&k.id)).collect();
        f.debug_struct("Sealer").field("key_ids", &ids).finish()
    }
}

impl Sealer {
    /// Reads the key file: one key per line, each 32 bytes in base64 (`head -c 32 /dev/urandom | base64`);
    /// blank lines and `#` comments are skipped. The error names the file and the line at fault.
    pub fn load(path: &Path) -> Result<Sealer, KeyFileError> {
        let fail = |reason: String| KeyFileError {
            path: path.display().to_string(),
            reason,
        };
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
        })
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
}

impl SealedStore {
    /// `inner`, sealing the values of the keys `secret` names with `sealer` (none: written in clear, and a
    /// sealed value found is refused with the key id it needs).
    pub fn new(inner: SharedStore, sealer: Option<Arc<Sealer>>, secret: fn(&str) -> bool) -> Self {
        SealedStore {
            inner,
            sealer,
            secret,
        }
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
            Some(entry) => self.open(key, entry).map(Some),
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
            match self.open(&key, entry) {
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
    /// A value as read from the backend, opened when sealed.
    fn open(&self, key: &str, entry: Entry) -> Result<Entry, StoreError> {
        if !is_sealed(&entry.value) {
            return Ok(entry);
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
        Ok(Entry {
            value: std::mem::take(&mut *value),
            revision: entry.revision,
        })
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
        // A value written in clear before a key was configured is still read.
        keyless.put("secret/old", b"clear").await.unwrap();
        assert_eq!(
            after.get("secret/old").await.unwrap().unwrap().value,
            b"clear"
        );
    }

    #[test]
    fn a_bad_key_file_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "# comment\n\nshort\n").unwrap();
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
        let sealer = Sealer::load(&key_file(dir.path(), "ok", &[[7; 32]])).unwrap();
        assert!(
            !format!("{sealer:?}").contains("LessSafeKey"),
            "Debug shows ids only"
        );
    }
}
