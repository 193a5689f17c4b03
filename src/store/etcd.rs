//! The store on etcd (v3 API), for several replicas sharing one state: every key lives under a prefix,
//! reads are linearizable (etcd's default), and a compare-and-swap is one transaction comparing the key's
//! `mod_revision` (or, for "must not exist", its `create_revision` being 0). A revision here is the key's
//! `mod_revision`, so the same interface serves both backends. Requests need a leader
//! (`require_leader`): without quorum they fail at once instead of waiting, and callers keep serving what
//! they have.
//!
//! Locks ([`EtcdStore::lock`]) decide which replica works on a resource (orders one certificate): a lock
//! is a key under `PREFIX/locks/` attached to a lease the holder keeps alive. A holder that stops renewing
//! (paused past its lease, cut off) loses the lock when the lease expires, and may not know it: so every
//! write made under a lock is fenced ([`EtcdStore::fenced_put`]), one transaction that writes only if the
//! lock key still has the `create_revision` it had when this holder took it.
//! How replicas learn of each other's writes (a watch on the prefix) is built on top of this.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};

use super::{Entry, Store, StoreError};

/// How long connecting to a member, and any one request, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request is retried through transient failures (a member gone and the client still picking
/// it, a leader election under way) before its failure is reported.
const RETRY_FOR: Duration = Duration::from_secs(10);

/// Whether a failed request may succeed if sent again: the member or the path to it failed, or the cluster
/// was between leaders; not a refusal of the request itself.
fn transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown
        ),
        _ => false,
    }
}

/// Runs `f` until it succeeds, fails for good, or [`RETRY_FOR`] has passed (backing off 50 ms to 1 s).
/// Every operation here is safe to repeat: puts and deletes are idempotent, and a compare-and-swap whose
/// first attempt did land reports a conflict on the second, which its caller resolves by reading again.
async fn retrying<T, F, Fut>(op: &'static str, key: &str, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut wait = Duration::from_millis(50);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && tokio::time::Instant::now() + wait < deadline => {
                tracing::debug!(op, key, error = %e, "etcd request failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(etcd(op, key, e)),
        }
    }
}

/// A store under `prefix` in an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// `PREFIX/`: every key acme-sds writes starts with it.
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn etcd(op: &'static str, key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Etcd {
        op,
        key: key.to_owned(),
        reason: e.to_string(),
    }
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port`, several members), keeping everything
    /// under `prefix` (`/acme-sds`).
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_require_leader(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| etcd("connect", &endpoints.join(","), e))?;
        Ok(EtcdStore {
            client,
            prefix: format!("{}/", prefix.trim_end_matches('/')),
        })
    }

    fn full(&self, key: &str) -> Result<String, StoreError> {
        super::check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    async fn current(&self, full: &str, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let resp = retrying("get", key, || {
            let mut kv = self.client.kv_client();
            let full = full.to_owned();
            async move { kv.get(full, None).await }
        })
        .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }
}

/// A lock held on a lease; see [`EtcdStore::lock`]. Dropping it stops renewing the lease (the lock then
/// lapses when the lease expires); [`EtcdStore::release`] gives it up at once.
pub struct EtcdLock {
    /// The lock key, in full.
    key: String,
    /// The lock's name, for messages.
    name: String,
    lease: i64,
    /// The lock key's `create_revision` when taken: the fencing token.
    fence: i64,
    renewing: Arc<AtomicBool>,
    /// Renews the lease; stopped when the lock is dropped.
    keeper: AbortOnDrop,
}

impl EtcdLock {
    /// The fencing token: every write under this lock compares it.
    pub fn fence(&self) -> u64 {
        revision(self.fence)
    }

    /// Whether the lease is still being renewed (false once a renewal failed or renewing was stopped).
    pub fn renewing(&self) -> bool {
        self.renewing.load(Ordering::SeqCst) && !self.keeper.0.is_finished()
    }

    /// Stops renewing the lease, as a process paused or cut off would: the lock lapses when it expires.
    pub fn stop_renewing(&self) {
        self.renewing.store(false, Ordering::SeqCst);
        self.keeper.0.abort();
    }
}

impl EtcdStore {
    /// Takes the lock `name` (store-key syntax, such as the certificate's key), waiting while another
    /// holder has it (polling, 50 ms to 1 s apart; bound the wait with a timeout). The lock lives on a
    /// lease of `ttl` (at least 1 s) renewed every third of it while the lock is held.
    pub async fn lock(&self, name: &str, ttl: Duration) -> Result<EtcdLock, StoreError> {
        let key = self.full(&format!("locks/{name}"))?;
        let ttl_secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(60);
        let lease = retrying("lock", name, || {
            let mut client = self.client.clone();
            async move { client.lease_grant(ttl_secs, None).await }
        })
        .await?
        .id();
        // The lease is renewed from now on, while this replica waits for the lock too (a lease left to age
        // while waiting would be gone by the time the lock is free).
        let renewing = Arc::new(AtomicBool::new(true));
        let keeper = AbortOnDrop({
            let mut client = self.client.clone();
            let renewing = renewing.clone();
            let every = Duration::from_secs(u64::try_from(ttl_secs).unwrap_or(1)) / 3;
            let name = name.to_owned();
            tokio::spawn(async move {
                let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await else {
                    renewing.store(false, Ordering::SeqCst);
                    return;
                };
                loop {
                    let renewed = match keeper.keep_alive().await {
                        Ok(()) => matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0),
                        Err(_) => false,
                    };
                    if !renewed {
                        tracing::warn!(
                            lock = name,
                            "cannot renew the lock's lease: it lapses when the lease expires"
                        );
                        renewing.store(false, Ordering::SeqCst);
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            })
        });
        let holder = format!("{}:{}", hostname(), std::process::id());
        let mut wait = Duration::from_millis(50);
        let fence = loop {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    holder.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let resp = retrying("lock", name, || {
                let mut kv = self.client.kv_client();
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
            if resp.succeeded() {
                break resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        };
        Ok(EtcdLock {
            key,
            name: name.to_owned(),
            lease,
            fence,
            renewing,
            keeper,
        })
    }

    /// Gives the lock up at once (revoking its lease deletes the lock key).
    pub async fn release(&self, lock: EtcdLock) -> Result<(), StoreError> {
        lock.keeper.0.abort();
        let lease = lock.lease;
        retrying("unlock", &lock.name, || {
            let mut client = self.client.clone();
            async move { client.lease_revoke(lease).await }
        })
        .await?;
        Ok(())
    }

    /// Writes `value` at `key` only while `lock` is still this holder's: one transaction comparing the
    /// lock key's `create_revision` with the lock's fence. A holder whose lease lapsed (and whose lock
    /// another replica may hold now) gets [`StoreError::Fenced`] and changes nothing.
    pub async fn fenced_put(
        &self,
        lock: &EtcdLock,
        key: &str,
        value: &[u8],
    ) -> Result<u64, StoreError> {
        let full = self.full(key)?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                lock.key.clone(),
                CompareOp::Equal,
                lock.fence,
            )])
            .and_then([TxnOp::put(full, value, None)]);
        let resp = retrying("fenced put", key, || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
        if resp.succeeded() {
            Ok(resp.header().map(|h| revision(h.revision())).unwrap_or(0))
        } else {
            Err(StoreError::Fenced {
                key: key.to_owned(),
                lock: lock.name.clone(),
            })
        }
    }
}

/// A renewal task that stops with its owner: a lock attempt given up (timed out, cancelled) stops renewing
/// its lease, which then expires by itself.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This host's name, for the lock holder's record.
fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let full = self.full(key)?;
        Ok(self.current(&full, key).await?.map(|(value, rev)| Entry {
            value,
            revision: revision(rev),
        }))
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        let full = self.full(key)?;
        let resp = retrying("put", key, || {
            let mut kv = self.client.kv_client();
            let (full, value) = (full.clone(), value.to_vec());
            async move { kv.put(full, value, None).await }
        })
        .await?;
        Ok(resp.header().map(|h| revision(h.revision())).unwrap_or(0))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<u64, StoreError> {
        let full = self.full(key)?;
        let compare = if expected == 0 {
            Compare::create_revision(full.clone(), CompareOp::Equal, 0)
        } else {
            let expected = i64::try_from(expected).map_err(|e| etcd("compare", key, e))?;
            Compare::mod_revision(full.clone(), CompareOp::Equal, expected)
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(full.clone(), value, None)])
            .or_else([TxnOp::get(full, None)]);
        let resp = retrying("compare-and-swap", key, || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
        if resp.succeeded() {
            return Ok(resp.header().map(|h| revision(h.revision())).unwrap_or(0));
        }
        let found = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map_or(0, |kv| kv.mod_revision())),
                _ => None,
            })
            .unwrap_or(0);
        Err(StoreError::Conflict {
            key: key.to_owned(),
            expected,
            found: revision(found),
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full(key)?;
        retrying("delete", key, || {
            let mut kv = self.client.kv_client();
            let full = full.clone();
            async move { kv.delete(full, None::<DeleteOptions>).await }
        })
        .await?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = format!("{}/", self.full(prefix)?);
        let resp = retrying("list", prefix, || {
            let mut kv = self.client.kv_client();
            let dir = dir.clone();
            async move {
                kv.get(dir, Some(GetOptions::new().with_prefix().with_keys_only()))
                    .await
            }
        })
        .await?;
        let mut keys: Vec<String> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = std::str::from_utf8(kv.key()).ok()?;
                k.strip_prefix(&self.prefix).map(str::to_owned)
            })
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn quarantine(&self, key: &str) -> Result<String, StoreError> {
        let full = self.full(key)?;
        let new_key = super::quarantine_key(key);
        let new_full = self.full(&new_key)?;
        let Some((value, rev)) = self.current(&full, key).await? else {
            return Ok(new_key);
        };
        // Moved only if nobody changed it meanwhile: a replica may just have stored a good value.
        let txn = Txn::new()
            .when([Compare::mod_revision(full.clone(), CompareOp::Equal, rev)])
            .and_then([
                TxnOp::put(new_full, value, None),
                TxnOp::delete(full, None::<DeleteOptions>),
            ]);
        retrying("quarantine", key, || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
        Ok(new_key)
    }
}
