//! The store on etcd (v3 API), for several replicas sharing one state: every key lives under a prefix,
//! reads are linearizable (etcd's default), and a compare-and-swap is one transaction comparing the key's
//! `mod_revision` (or, for "must not exist", its `create_revision` being 0). A revision here is the key's
//! `mod_revision`, so the same interface serves both backends. Requests need a leader
//! (`require_leader`): without quorum they fail at once instead of waiting, and callers keep serving what
//! they have. Reads of a whole prefix ([`Store::scan`], [`Store::list`]) are paged, every page at the
//! first page's revision: one consistent snapshot, and no reply near the client's 4 MiB message limit.
//!
//! Locks ([`EtcdStore::lock`]) decide which replica works on a resource (orders one certificate): a lock
//! is a key under `PREFIX/locks/` attached to a lease the holder keeps alive. A holder that stops renewing
//! (paused past its lease, cut off) loses the lock when the lease expires, and may not know it: so every
//! write made under a lock is fenced ([`EtcdStore::fenced_put`]), one transaction that writes only if the
//! lock key still has the `create_revision` it had when this holder took it. Taking a lock is one
//! transaction that also reads the key when it exists, so an attempt whose reply was lost (its retry finds
//! the key on its own lease) knows it holds the lock rather than waiting for itself.
//!
//! Replicas learn of each other's writes through [`Store::watch`]: one watch on a prefix per consumer,
//! resumed from the revision after the last event it delivered when the stream breaks (a member lost, a
//! leader change), so no write is missed; when that revision was compacted away the consumer is told to
//! read everything again ([`Change::Resync`]). The watch is also the health signal: while it is down (no
//! quorum, etcd unreachable) [`Store::health`] says why, and nothing else polls etcd.
//! Pending challenges are written on leases ([`Store::put_expiring`]): a crashed replica's expire.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::{Change, Entry, Lock, Store, StoreError, StoreHealth};

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

/// Runs `f` until it succeeds, fails for good, or [`RETRY_FOR`] has passed (backing off 50 ms to 1 s),
/// recording a final failure in `health`. Every operation here is safe to repeat: puts and deletes are
/// idempotent, and a compare-and-swap whose first attempt did land reports a conflict on the second, which
/// its caller resolves by reading again.
async fn retrying<T, F, Fut>(
    health: &Health,
    op: &'static str,
    key: &str,
    mut f: F,
) -> Result<T, StoreError>
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
            Err(e) => {
                let e = etcd(op, key, e);
                health.failed(&e);
                return Err(e);
            }
        }
    }
}

/// What [`Store::health`] reports: whether the watch is up (the store usable), and the last failure.
#[derive(Clone, Default)]
struct Health(Arc<Mutex<StoreHealth>>);

impl Health {
    fn update(&self, f: impl FnOnce(&mut StoreHealth)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn failed(&self, e: &StoreError) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.update(|h| {
            h.last_error = Some(e.to_string());
            h.last_error_at = i64::try_from(now).ok();
        });
    }

    fn get(&self) -> StoreHealth {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How to reach the cluster.
#[derive(Default)]
pub struct EtcdSettings {
    /// Member URLs (`http://host:2379`, or `https://` with `ca_pem`).
    pub endpoints: Vec<String>,
    /// Everything acme-sds writes lives under it (`/acme-sds`).
    pub prefix: String,
    /// The CA that signed the members' certificates (PEM), for `https://` endpoints.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key (PEM), when the cluster asks for one.
    pub identity: Option<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    /// etcd user name and password, when the cluster has authentication on.
    pub user: Option<(String, Zeroizing<String>)>,
}

impl std::fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("tls", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .field("user", &self.user.as_ref().map(|u| &u.0))
            .finish()
    }
}

/// A store under `prefix` in an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// `PREFIX/`: every key acme-sds writes starts with it.
    prefix: String,
    health: Health,
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
        EtcdStore::connect_with(&EtcdSettings {
            endpoints: endpoints.to_vec(),
            prefix: prefix.to_owned(),
            ..EtcdSettings::default()
        })
        .await
    }

    /// Connects as `settings` say (TLS, client certificate, user). Fails when no member answers.
    pub async fn connect_with(settings: &EtcdSettings) -> Result<EtcdStore, StoreError> {
        let endpoints = settings.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_require_leader(true);
        if settings.ca_pem.is_some() || settings.identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &settings.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &settings.identity {
                tls = tls.identity(Identity::from_pem(cert, key.as_slice()));
            }
            options = options.with_tls(tls);
        }
        if let Some((user, password)) = &settings.user {
            options = options.with_user(user.clone(), password.as_str());
        }
        let client = Client::connect(&settings.endpoints, Some(options))
            .await
            .map_err(|e| etcd("connect", &endpoints, e))?;
        Ok(EtcdStore {
            client,
            prefix: format!("{}/", settings.prefix.trim_end_matches('/')),
            health: Health::default(),
        })
    }

    fn full(&self, key: &str) -> Result<String, StoreError> {
        super::check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// The cluster's present revision (one count-only read of `dir`, a full key prefix).
    async fn present(&self, dir: &str) -> Result<i64, etcd_client::Error> {
        let mut kv = self.client.kv_client();
        let r = kv
            .get(dir, Some(GetOptions::new().with_prefix().with_count_only()))
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    async fn current(&self, full: &str, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let resp = retrying(&self.health, "get", key, || {
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

/// Keys per range request when values are read ([`Store::scan`]): a page stays well under the client's
/// 4 MiB message limit even with 10 KiB values (2.5 MiB).
const PAGE_VALUES: i64 = 256;
/// Keys per range request when only keys are read ([`Store::list`]): at most ~600 bytes each.
const PAGE_KEYS: i64 = 2048;
/// How often a paged read starts again because the revision it reads at was compacted meanwhile.
const SNAPSHOT_ATTEMPTS: usize = 3;

/// One page of a paged read, or why it has to be read otherwise.
enum Page {
    Got(etcd_client::GetResponse),
    /// Over the client's message limit (values far larger than a certificate's): read it in halves.
    TooLarge,
    /// The revision the read is pinned to was compacted between two pages: start again.
    Compacted,
}

fn page_of(
    result: Result<etcd_client::GetResponse, etcd_client::Error>,
) -> Result<Page, etcd_client::Error> {
    use tonic::Code;
    match result {
        Ok(r) => Ok(Page::Got(r)),
        Err(etcd_client::Error::GRpcStatus(s)) if s.code() == Code::OutOfRange => {
            if s.message().contains("message length too large") {
                Ok(Page::TooLarge)
            } else if s.message().contains("compacted") {
                Ok(Page::Compacted)
            } else {
                Err(etcd_client::Error::GRpcStatus(s))
            }
        }
        Err(e) => Err(e),
    }
}

/// The end of the range of keys that start with `dir` (which ends in `/`): `dir` with its last byte
/// raised by one.
fn range_end(dir: &str) -> Vec<u8> {
    let mut end = dir.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

impl EtcdStore {
    /// A failure that retrying cannot cure, recorded in the store's health.
    fn gave_up(&self, op: &'static str, key: &str, why: &str) -> StoreError {
        let e = etcd(op, key, why);
        self.health.failed(&e);
        e
    }

    /// Every key under `dir` (a full key prefix ending in `/`), with its value unless `keys_only`, in key
    /// order: read in pages of `page` keys, every page at the revision of the first, so the result is one
    /// snapshot of the prefix as a single range request would be, without its size limit (the client
    /// refuses a reply over 4 MiB: a few thousand certificates, and then no replica could start). A page
    /// that does not fit the limit anyway is read again in halves; a pinned revision compacted between
    /// pages (etcd's auto-compaction) starts the read again at the present one.
    async fn range(
        &self,
        op: &'static str,
        prefix: &str,
        dir: &str,
        page: i64,
        keys_only: bool,
    ) -> Result<Vec<etcd_client::KeyValue>, StoreError> {
        let end = range_end(dir);
        let mut attempts = 0;
        'snapshot: loop {
            attempts += 1;
            let mut out = Vec::new();
            let mut start = dir.as_bytes().to_vec();
            // 0 for the first page: the present; then the revision it was read at.
            let mut at = 0;
            let mut limit = page;
            loop {
                let mut options = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(limit)
                    .with_revision(at);
                if keys_only {
                    options = options.with_keys_only();
                }
                let got = retrying(&self.health, op, prefix, || {
                    let mut kv = self.client.kv_client();
                    let (start, options) = (start.clone(), options.clone());
                    async move { page_of(kv.get(start, Some(options)).await) }
                })
                .await?;
                let mut resp = match got {
                    Page::Got(r) => r,
                    Page::TooLarge if limit > 1 => {
                        limit /= 2;
                        continue;
                    }
                    Page::TooLarge => {
                        return Err(self.gave_up(
                            op,
                            prefix,
                            "a single value is larger than the client's 4 MiB message limit",
                        ));
                    }
                    Page::Compacted if attempts < SNAPSHOT_ATTEMPTS => continue 'snapshot,
                    Page::Compacted => {
                        return Err(self.gave_up(
                            op,
                            prefix,
                            "the revision it was read at was compacted meanwhile, every time",
                        ));
                    }
                };
                if at == 0 {
                    at = resp.header().map_or(0, |h| h.revision());
                }
                let more = resp.more();
                let kvs = resp.take_kvs();
                match kvs.last() {
                    // After the last key read: the next byte string after it.
                    Some(last) if more => {
                        start = last.key().to_vec();
                        start.push(0);
                    }
                    _ => {
                        out.extend(kvs);
                        return Ok(out);
                    }
                }
                out.extend(kvs);
                limit = page;
            }
        }
    }
}

/// A lock held on a lease; see [`Store::lock`]. Dropping it stops renewing the lease (the lock then
/// lapses when the lease expires); [`Store::unlock`] gives it up at once.
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
    async fn take_lock(&self, name: &str, ttl: Duration) -> Result<EtcdLock, StoreError> {
        let key = self.full(&format!("locks/{name}"))?;
        let ttl_secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(60);
        let lease = retrying(&self.health, "lock", name, || {
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
                // A renewal that fails (the member it went to died, a leader election) is tried again,
                // on a new stream, until the lease would have expired: only then is the lock lost.
                let ttl = Duration::from_secs(u64::try_from(ttl_secs).unwrap_or(1));
                let mut renewed_at = tokio::time::Instant::now();
                loop {
                    if let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await {
                        loop {
                            let renewed = match keeper.keep_alive().await {
                                Ok(()) => match stream.message().await {
                                    Ok(Some(r)) if r.ttl() > 0 => true,
                                    Ok(Some(_)) => {
                                        // The lease is gone (expired): the lock is lost for good.
                                        renewed_at = tokio::time::Instant::now() - ttl;
                                        false
                                    }
                                    _ => false,
                                },
                                Err(_) => false,
                            };
                            if !renewed {
                                break;
                            }
                            renewed_at = tokio::time::Instant::now();
                            tokio::time::sleep(every).await;
                        }
                    }
                    if renewed_at.elapsed() >= ttl {
                        tracing::warn!(
                            lock = name,
                            "cannot renew the lock's lease: it lapsed, and another replica may hold the lock now"
                        );
                        renewing.store(false, Ordering::SeqCst);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        let holder = format!("{}:{}", hostname(), std::process::id());
        let mut wait = Duration::from_millis(50);
        // Taken when the key is absent; when it is not, the else-branch reads it: a key on this attempt's
        // own lease means an earlier try of this same transaction committed and its reply was lost (a
        // deadline, a leader change, a connection cut). Without that read, this holder would wait for
        // its own lease, renewed forever, and nobody would work on the resource until a restart.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                holder,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let fence = loop {
            let resp = retrying(&self.health, "lock", name, || {
                let mut kv = self.client.kv_client();
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
            if resp.succeeded() {
                break resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let ours = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .filter(|kv| kv.lease() == lease)
                    .map(|kv| kv.create_revision()),
                _ => None,
            });
            if let Some(created) = ours {
                tracing::debug!(
                    lock = name,
                    "the lock was taken by an earlier attempt whose reply was lost"
                );
                break created;
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
    async fn release(&self, lock: EtcdLock) -> Result<(), StoreError> {
        lock.keeper.0.abort();
        let lease = lock.lease;
        retrying(&self.health, "unlock", &lock.name, || {
            let mut client = self.client.clone();
            async move { client.lease_revoke(lease).await }
        })
        .await?;
        Ok(())
    }

    /// Runs `op` only while `lock` is still this holder's: one transaction comparing the lock key's
    /// `create_revision` with the lock's fence. A holder whose lease lapsed (and whose lock another
    /// replica may hold now) gets [`StoreError::Fenced`] and changes nothing.
    async fn fenced(
        &self,
        lock: &Lock,
        what: &'static str,
        key: &str,
        op: TxnOp,
    ) -> Result<u64, StoreError> {
        let Some(held) = &lock.etcd else {
            return Err(StoreError::Fenced {
                key: key.to_owned(),
                lock: lock.name.clone(),
            });
        };
        let txn = Txn::new()
            .when([Compare::create_revision(
                held.key.clone(),
                CompareOp::Equal,
                held.fence,
            )])
            .and_then([op]);
        let resp = retrying(&self.health, what, key, || {
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
                lock: held.name.clone(),
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
        let resp = retrying(&self.health, "put", key, || {
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
        let resp = retrying(&self.health, "compare-and-swap", key, || {
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
        retrying(&self.health, "delete", key, || {
            let mut kv = self.client.kv_client();
            let full = full.clone();
            async move { kv.delete(full, None::<DeleteOptions>).await }
        })
        .await?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = format!("{}/", self.full(prefix)?);
        let kvs = self.range("list", prefix, &dir, PAGE_KEYS, true).await?;
        // In key order already (etcd's, byte-wise, as `sort` would give).
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let k = std::str::from_utf8(kv.key()).ok()?;
                k.strip_prefix(&self.prefix).map(str::to_owned)
            })
            .collect())
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
        retrying(&self.health, "quarantine", key, || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
        Ok(new_key)
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        let dir = format!("{}/", self.full(prefix)?);
        let kvs = self.range("scan", prefix, &dir, PAGE_VALUES, false).await?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key()).ok()?;
                let key = key.strip_prefix(&self.prefix)?.to_owned();
                let entry = Entry {
                    value: kv.value().to_vec(),
                    revision: revision(kv.mod_revision()),
                };
                Some((key, entry))
            })
            .collect())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn lock(&self, name: &str, ttl: Duration) -> Result<Lock, StoreError> {
        let held = self.take_lock(name, ttl).await?;
        Ok(Lock {
            name: name.to_owned(),
            etcd: Some(held),
        })
    }

    async fn unlock(&self, lock: Lock) -> Result<(), StoreError> {
        match lock.etcd {
            Some(held) => self.release(held).await,
            None => Ok(()),
        }
    }

    async fn put_locked(&self, lock: &Lock, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        let op = TxnOp::put(self.full(key)?, value, None);
        self.fenced(lock, "fenced put", key, op).await
    }

    async fn delete_locked(&self, lock: &Lock, key: &str) -> Result<(), StoreError> {
        let op = TxnOp::delete(self.full(key)?, None::<DeleteOptions>);
        self.fenced(lock, "fenced delete", key, op)
            .await
            .map(|_| ())
    }

    async fn put_expiring(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let full = self.full(key)?;
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(3600);
        let lease = retrying(&self.health, "lease", key, || {
            let mut client = self.client.clone();
            async move { client.lease_grant(ttl, None).await }
        })
        .await?
        .id();
        let resp = retrying(&self.health, "put", key, || {
            let mut kv = self.client.kv_client();
            let (full, value) = (full.clone(), value.to_vec());
            async move {
                kv.put(full, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(resp.header().map(|h| revision(h.revision())).unwrap_or(0))
    }

    async fn watch(
        &self,
        prefix: &str,
        shutdown: CancellationToken,
    ) -> Option<mpsc::Receiver<Change>> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let dir = format!("{}{}/", self.prefix, prefix.trim_end_matches('/'));
        // The present revision: the watch starts after it. When it cannot be read, the watch starts when
        // etcd answers and its consumer is told to read everything then.
        let start = self.present(&dir).await.ok();
        tokio::spawn(watch_loop(self.clone(), dir, start, tx, shutdown));
        Some(rx)
    }

    fn health(&self) -> StoreHealth {
        StoreHealth {
            backend: "etcd",
            ..self.health.get()
        }
    }
}

/// Changes a watch may hold before its consumer takes them (it then waits: nothing is dropped).
const WATCH_BUFFER: usize = 1024;

/// Keeps one watch on `dir` (a full key prefix) open until `shutdown`, sending what changes to `tx`. A
/// broken stream is opened again from the revision after the last event sent, so nothing is missed; if
/// that revision was compacted, the consumer is told to resync and the watch starts from the present.
/// While the watch is down, the store's health says why.
async fn watch_loop(
    store: EtcdStore,
    dir: String,
    start: Option<i64>,
    tx: mpsc::Sender<Change>,
    shutdown: CancellationToken,
) {
    // 0: "from the present", learnt with a read before the watch is opened (and a resync then).
    let mut next: i64 = start.map_or(0, |r| r + 1);
    let mut resync = start.is_none();
    let mut wait = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let down = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = watch_once(&store, &dir, &tx, &mut next, &mut resync) => r,
        };
        if tx.is_closed() {
            return;
        }
        let reason = down.to_string();
        if store.health.get().unavailable.is_none() {
            tracing::warn!(
                error = reason,
                "etcd watch lost; serving what is loaded, storing nothing until it is back"
            );
        }
        store.health.update(|h| h.unavailable = Some(reason));
        if down.progressed {
            wait = Duration::from_millis(100);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Why a watch stream ended.
struct WatchDown {
    reason: String,
    /// Whether it was up (created) before it ended: the retry starts quickly again.
    progressed: bool,
}

impl std::fmt::Display for WatchDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd watch: {}", self.reason)
    }
}

/// One watch stream, from open to end.
async fn watch_once(
    store: &EtcdStore,
    dir: &str,
    tx: &mpsc::Sender<Change>,
    next: &mut i64,
    resync: &mut bool,
) -> WatchDown {
    let down = |reason: String, progressed| WatchDown { reason, progressed };
    if *next == 0 {
        // The watch starts after the present revision, and a consumer told to resync reads at or after
        // it, so a write lands either in what it reads or in what the watch sends.
        match store.present(dir).await {
            Ok(r) => *next = r + 1,
            Err(e) => return down(e.to_string(), false),
        }
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*next)
        .with_progress_notify();
    let mut client = store.client.clone();
    let mut stream = match client.watch(dir, Some(options)).await {
        Ok(s) => s,
        Err(e) => return down(e.to_string(), false),
    };
    let mut progressed = false;
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return down("the stream ended".into(), progressed),
            Err(e) => return down(e.to_string(), progressed),
        };
        if resp.compact_revision() > 0 {
            tracing::warn!(
                from = *next,
                compacted = resp.compact_revision(),
                "etcd compacted the history this watch resumes from; reading everything again"
            );
            *next = 0;
            *resync = true;
            return down("history compacted; resyncing".into(), progressed);
        }
        if resp.canceled() {
            return down(format!("cancelled: {}", resp.cancel_reason()), progressed);
        }
        if resp.created() {
            progressed = true;
            if store.health.get().unavailable.is_some() {
                tracing::info!("etcd watch is back; storing again");
            }
            store.health.update(|h| h.unavailable = None);
            if std::mem::take(resync) && tx.send(Change::Resync).await.is_err() {
                return down("nobody watches".into(), progressed);
            }
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            *next = kv.mod_revision() + 1;
            let Some(key) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(&store.prefix))
            else {
                continue;
            };
            let change = match event.event_type() {
                EventType::Put => Change::Put(key.to_owned()),
                EventType::Delete => Change::Deleted(key.to_owned()),
            };
            if tx.send(change).await.is_err() {
                return down("nobody watches".into(), progressed);
            }
        }
        // A progress notification (no events) says every change up to its revision was sent.
        if resp.events().is_empty()
            && !resp.created()
            && let Some(h) = resp.header()
        {
            *next = (*next).max(h.revision() + 1);
        }
    }
}
