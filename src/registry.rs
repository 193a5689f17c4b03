//! The secret registry: the only thing SDS streams read.
//!
//! Per secret ([`SecretId`]: a name, or a certificate obtained on demand in a namespace of its own) it holds
//! the latest published version, already encoded as the protobuf `Any` that goes on the wire, inside an
//! `Arc`. A push to 10,000 streams therefore clones pointers (`Any.value` is a refcounted `Bytes`), never
//! re-encodes. The version is a short hash of the encoded secret, so publishing identical material is a
//! no-op and never wakes a stream.
//!
//! Envoy checks that a secret carries exactly the name it asked for, and asks under whatever spelling a
//! client's SNI had (`Shop.Example.COM`), so a secret may be subscribed under several spellings. The name
//! and `sds://NAME` are encoded with each version; any other spelling is encoded once per version while a
//! subscription holds it, kept with the secret, and dropped with its last subscriber. At most
//! [`MAX_SPELLINGS`] other spellings per secret are served at once: made-up spellings cannot multiply the
//! memory a certificate takes (2^letters of them exist).
//!
//! Subscribers wait on a `tokio::sync::watch` per secret: a slow stream only ever sees the newest value,
//! never an unbounded queue of old ones. A [`Subscription`] keeps one wait armed for as long as it lives (a
//! reusable boxed future), so a stream polled for other reasons (an ACK arriving) does not register and
//! unregister itself with the channel each time. A secret nobody has published yet is just an id without a
//! value; waiting on it is how a stream learns the moment it appears. Entries for such ids are dropped
//! again when the last subscriber goes, so clients asking for made-up names cannot grow the registry.
//! Secrets are never removed once published: a stream that already delivered one must be able to keep
//! sending it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use prost::Message;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::ReusableBoxFuture;

use crate::certs::{CertifiedPem, TrustBundlePem};
use crate::proto::envoy::config::core::v3::{DataSource, data_source};
use crate::proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use crate::proto::google::protobuf::Any;
use crate::values::{ISTIO_PREFIX, SecretId, SecretName, canonical_name};

/// Most spellings of one secret, besides its name and `sds://NAME`, served at once (see the module docs).
pub const MAX_SPELLINGS: usize = 8;

/// The type URL of an Envoy SDS secret.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// TLS material to publish under a name.
#[derive(Debug, Clone)]
pub enum SecretContent {
    /// Served as `tls_certificate` with inline PEM.
    TlsCertificate(CertifiedPem),
    /// Served as `validation_context.trusted_ca` with inline PEM.
    TrustBundle(TrustBundlePem),
}

impl SecretContent {
    fn to_secret(&self, name: String) -> Secret {
        let inline = |b: &Bytes| DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(b.clone())),
            watched_directory: None,
        };
        let kind = match self {
            SecretContent::TlsCertificate(c) => secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(&c.chain_pem)),
                private_key: Some(inline(&c.key_pem)),
                ..Default::default()
            }),
            SecretContent::TrustBundle(b) => {
                secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: Some(inline(&b.pem)),
                    ..Default::default()
                })
            }
        };
        Secret {
            name,
            r#type: Some(kind),
        }
    }

    fn summary(&self, temporary: bool) -> SecretSummary {
        match self {
            SecretContent::TlsCertificate(c) => SecretSummary {
                kind: SecretKind::TlsCertificate,
                serial: Some(c.leaf.serial.clone()),
                dns_names: c.leaf.dns_names.clone(),
                not_before: Some(c.leaf.not_before),
                not_after: Some(c.leaf.not_after),
                temporary,
            },
            SecretContent::TrustBundle(b) => SecretSummary {
                kind: SecretKind::ValidationContext,
                serial: None,
                dns_names: Vec::new(),
                not_before: None,
                not_after: b.earliest_expiry(),
                temporary,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// The kind of an SDS secret.
pub enum SecretKind {
    /// `tls_certificate`: a chain and its key.
    TlsCertificate,
    /// `validation_context`: trusted CA certificates.
    ValidationContext,
}

/// What may be said about a secret version without touching key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSummary {
    /// What the secret is.
    pub kind: SecretKind,
    /// The leaf's serial, for certificates.
    pub serial: Option<String>,
    /// The leaf's DNS names, for certificates.
    pub dns_names: Vec<String>,
    /// The leaf's start of validity.
    pub not_before: Option<OffsetDateTime>,
    /// The leaf's expiry; for a trust bundle the earliest expiry in it.
    pub not_after: Option<OffsetDateTime>,
    /// A stand-in served until the real certificate is issued (see [`Registry::publish_temporary`]): never
    /// counted as ready.
    pub temporary: bool,
}

/// One published version of a secret, encoded once for every stream.
pub struct SecretVersion {
    name: String,
    version: String,
    /// The secret named as registered (`web`).
    plain: Any,
    /// The same secret named with Istio's prefix (`sds://web`): Envoy checks that a secret's name is exactly
    /// the one it asked for.
    prefixed: Any,
    summary: SecretSummary,
}

impl std::fmt::Debug for SecretVersion {
    // The encoded secret carries the private key: show only what may be logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretVersion")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl SecretVersion {
    /// The secret's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A short content hash: equal bytes, equal version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// What may be said about it without touching key material.
    pub fn summary(&self) -> &SecretSummary {
        &self.summary
    }

    /// The encoded secret, named exactly as the client asked for it: the name and `sds://NAME` as encoded
    /// with the version, any other spelling encoded now (a [`Subscription`] keeps those it serves).
    pub fn resource_for(&self, requested: &str) -> Any {
        if requested == self.name {
            self.plain.clone()
        } else if requested.strip_prefix(ISTIO_PREFIX) == Some(self.name.as_str()) {
            self.prefixed.clone()
        } else {
            self.encode_as(requested)
        }
    }

    /// The secret encoded under another name (the spelling a client asked for).
    fn encode_as(&self, requested: &str) -> Any {
        // The encoding is the only copy kept: decoded, renamed and encoded again (a few microseconds).
        match Secret::decode(self.plain.value.clone()) {
            Ok(mut secret) => {
                secret.name = requested.to_owned();
                encode(&secret)
            }
            Err(_) => self.plain.clone(),
        }
    }
}

fn encode(secret: &Secret) -> Any {
    Any {
        type_url: SECRET_TYPE_URL.to_owned(),
        // A TLS certificate secret carries its private key: wipe the encoding when it is dropped.
        value: crate::certs::secret_bytes(secret.encode_to_vec()),
    }
}

fn content_version(encoded: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, encoded);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

type Value = Option<Arc<SecretVersion>>;

/// One secret's channel, and the spellings it is subscribed under (see the module docs).
struct Slot {
    tx: watch::Sender<Value>,
    spellings: Mutex<HashMap<Box<str>, Spelling>>,
}

/// A spelling subscribed now: by how many subscriptions, and the current version encoded under it.
struct Spelling {
    subscribers: usize,
    encoded: Option<(Arc<SecretVersion>, Any)>,
}

impl Slot {
    fn new(value: Value) -> Arc<Slot> {
        Arc::new(Slot {
            tx: watch::Sender::new(value),
            spellings: Mutex::default(),
        })
    }

    fn spellings(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Spelling>> {
        self.spellings.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The outcome of [`Registry::publish`].
#[derive(Debug, Clone)]
pub enum Published {
    /// The same bytes were already published: nothing was pushed.
    Unchanged(Arc<SecretVersion>),
    /// A new version, now on its way to every subscriber.
    New(Arc<SecretVersion>),
}

impl Published {
    /// The version this subscription last saw.
    pub fn version(&self) -> &Arc<SecretVersion> {
        match self {
            Published::Unchanged(v) | Published::New(v) => v,
        }
    }
}

/// A secret named by a source (a configured secret), or any id: what the registry's methods take.
pub trait Id {
    /// The id.
    fn id(&self) -> SecretId;
}

impl Id for SecretId {
    fn id(&self) -> SecretId {
        self.clone()
    }
}

impl<T: Id + ?Sized> Id for &T {
    fn id(&self) -> SecretId {
        (**self).id()
    }
}

impl Id for SecretName {
    fn id(&self) -> SecretId {
        SecretId::from(self)
    }
}

/// A name as published or requested (`sds://NAME` is `NAME`).
impl Id for str {
    fn id(&self) -> SecretId {
        SecretId::named(canonical_name(self))
    }
}

impl Id for String {
    fn id(&self) -> SecretId {
        self.as_str().id()
    }
}

/// Secrets by id, watchable. Cheap to share: wrap in an `Arc`.
#[derive(Default)]
pub struct Registry {
    slots: RwLock<HashMap<SecretId, Arc<Slot>>>,
    /// Secrets no longer offered (removed by a reload): streams that hold them keep them and keep hearing
    /// about them; new subscriptions see them as unknown until they are published again.
    withdrawn: RwLock<HashSet<SecretId>>,
    /// Secrets a source is obtaining now (on demand): a stream waits for them instead of reporting them
    /// missing.
    expected: RwLock<HashSet<SecretId>>,
}

impl Registry {
    /// An empty registry, shared.
    pub fn new() -> Arc<Self> {
        Arc::new(Registry::default())
    }

    // A poisoned lock only means another thread panicked while holding it; the map itself is always
    // consistent (every mutation is a single insert or remove), so carry on with it.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<SecretId, Arc<Slot>>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<SecretId, Arc<Slot>>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `content` as the newest version of secret `id` and wakes every subscriber, unless the
    /// encoded bytes equal the current version's.
    pub fn publish(&self, id: &(impl Id + ?Sized), content: &SecretContent) -> Published {
        self.publish_as(id.id(), content, false)
    }

    /// Publishes a temporary stand-in for a certificate that has not been issued yet (a self-signed one, so
    /// that Envoy's listeners can start): served like any version, but its summary says it is temporary,
    /// so status views and metrics never count it as ready.
    pub fn publish_temporary(&self, id: &(impl Id + ?Sized), content: &SecretContent) -> Published {
        self.publish_as(id.id(), content, true)
    }

    fn publish_as(&self, id: SecretId, content: &SecretContent, temporary: bool) -> Published {
        if self.is_expected(&id) {
            self.expected
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
        let name = id.as_str().to_owned();
        let plain = encode(&content.to_secret(name.clone()));
        let version = content_version(&plain.value);
        // Compared with what the slot holds, withdrawn or not: publishing never offers a withdrawn
        // secret again (a certificate task stopped by a reload may finish one more issuance), only
        // [`Registry::offer`] does.
        let current = self
            .read()
            .get(&id)
            .and_then(|slot| slot.tx.borrow().clone());
        if let Some(current) = current
            && current.version == version
        {
            return Published::Unchanged(current);
        }
        let prefixed = encode(&content.to_secret(format!("{ISTIO_PREFIX}{name}")));
        let new = Arc::new(SecretVersion {
            name,
            version,
            plain,
            prefixed,
            summary: content.summary(temporary),
        });
        let mut slots = self.write();
        match slots.get(&id) {
            Some(slot) => {
                slot.tx.send_replace(Some(new.clone()));
            }
            None => {
                slots.insert(id, Slot::new(Some(new.clone())));
            }
        }
        Published::New(new)
    }

    /// The current version of a secret.
    pub fn get(&self, id: &(impl Id + ?Sized)) -> Option<Arc<SecretVersion>> {
        let id = id.id();
        if self.is_withdrawn(&id) {
            return None;
        }
        self.read()
            .get(&id)
            .and_then(|slot| slot.tx.borrow().clone())
    }

    /// Names of all published secrets (not those obtained on demand), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .read()
            .iter()
            .filter(|(id, s)| {
                !id.is_on_demand() && s.tx.borrow().is_some() && !self.is_withdrawn(id)
            })
            .map(|(id, _)| id.as_str().to_owned())
            .collect();
        names.sort();
        names
    }

    /// Watches secret `id`, requested as `requested` (the name the client used, which the secret is
    /// served under); it need not exist yet. Past [`MAX_SPELLINGS`] other spellings of the secret
    /// subscribed at once, the subscription is refused: it never sees a version
    /// ([`Subscription::is_refused`]).
    pub fn watch(self: &Arc<Self>, id: &(impl Id + ?Sized), requested: &str) -> Subscription {
        let id = id.id();
        let slot = self.read().get(&id).cloned();
        let slot = slot.unwrap_or_else(|| {
            self.write()
                .entry(id.clone())
                .or_insert_with(|| Slot::new(None))
                .clone()
        });
        let spelling = if requested == id.as_str()
            || requested.strip_prefix(ISTIO_PREFIX) == Some(id.as_str())
        {
            None
        } else {
            Some(Box::<str>::from(requested))
        };
        let mut refused = false;
        if let Some(s) = &spelling {
            let mut spellings = slot.spellings();
            let full = spellings.len() >= MAX_SPELLINGS;
            match spellings.get_mut(s) {
                Some(entry) => entry.subscribers += 1,
                None if !full => {
                    spellings.insert(
                        s.clone(),
                        Spelling {
                            subscribers: 1,
                            encoded: None,
                        },
                    );
                }
                None => refused = true,
            }
        }
        // Subscribing marks the current value seen: the wait is for the next one.
        let wait = ReusableBoxFuture::new(next_change(slot.tx.subscribe()));
        Subscription {
            hidden: self.is_withdrawn(&id),
            registry: self.clone(),
            id,
            slot,
            wait,
            spelling: if refused { None } else { spelling },
            refused,
        }
    }

    /// Stops offering a secret (its configuration was removed): new requests see it as unknown, while
    /// streams that already hold it keep it (their receivers keep the last value; nothing is yanked),
    /// until [`Registry::offer`].
    pub fn withdraw(&self, id: &(impl Id + ?Sized)) {
        self.withdrawn
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.id());
    }

    /// Offers a withdrawn secret again (configured again by a reload, obtained on demand again): new
    /// requests see it, and subscriptions made while it was withdrawn are woken.
    pub fn offer(&self, id: &(impl Id + ?Sized)) {
        let id = id.id();
        let was = self
            .withdrawn
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if was && let Some(slot) = self.read().get(&id) {
            slot.tx.send_modify(|_| {});
        }
    }

    fn is_withdrawn(&self, id: &SecretId) -> bool {
        self.withdrawn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// Marks `id` as being obtained (on demand): streams wait for it rather than report it missing.
    pub fn expect_soon(&self, id: &SecretId) {
        self.expected
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone());
    }

    /// Whether `id` is being obtained (see [`Registry::expect_soon`]).
    pub fn is_expected(&self, id: &SecretId) -> bool {
        self.expected
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// `id` will not be obtained (it was refused): streams waiting for it are woken, and report it missing
    /// (for Envoy's on-demand selector, a delta `removed_resources` fails the waiting handshake at once).
    pub fn refuse(&self, id: &SecretId) {
        self.expected
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(slot) = self.read().get(id) {
            slot.tx.send_modify(|_| {});
        }
    }

    /// How many SDS streams watch a secret now, under any spelling.
    pub fn subscribers(&self, id: &(impl Id + ?Sized)) -> usize {
        self.read()
            .get(&id.id())
            .map(|s| s.tx.receiver_count())
            .unwrap_or(0)
    }

    /// How many secrets have an entry (published or awaited); for tests and status.
    pub fn slot_count(&self) -> usize {
        self.read().len()
    }
}

/// Resolves, handing the receiver back, when a version newer than the last one it saw is published.
async fn next_change(mut rx: watch::Receiver<Value>) -> watch::Receiver<Value> {
    if rx.changed().await.is_err() {
        // The slot was removed, which only happens to unpublished slots with no other subscriber: nothing
        // will ever be published through this receiver, so wait forever.
        std::future::pending::<()>().await;
    }
    rx
}

/// A stream's interest in one secret, under one spelling. Dropping it forgets a never-published secret
/// nobody else waits for, and a spelling nobody else subscribes under.
pub struct Subscription {
    registry: Arc<Registry>,
    /// Made while the secret was withdrawn: it shows nothing until the secret is offered again.
    hidden: bool,
    id: SecretId,
    /// The channel, for reading its current value.
    slot: Arc<Slot>,
    /// The armed wait for the next version; owns this subscription's receiver.
    wait: ReusableBoxFuture<'static, watch::Receiver<Value>>,
    /// The spelling it was requested under, when that is neither the name nor `sds://NAME`.
    spelling: Option<Box<str>>,
    /// Past [`MAX_SPELLINGS`]: it never sees a version.
    refused: bool,
}

impl Subscription {
    /// The current version.
    pub fn current(&mut self) -> Option<Arc<SecretVersion>> {
        if self.refused {
            return None;
        }
        let value = self.slot.tx.borrow().clone();
        if self.hidden {
            if self.registry.is_withdrawn(&self.id) {
                return None;
            }
            self.hidden = false;
        }
        value
    }

    /// Whether it was refused (too many spellings of the secret at once): it will never see a version.
    pub fn is_refused(&self) -> bool {
        self.refused
    }

    /// What it watches.
    pub fn id(&self) -> &SecretId {
        &self.id
    }

    /// `version` encoded under the name this subscription was requested as (`requested`, the same name as
    /// given to [`Registry::watch`]): once per version and spelling, whatever the number of streams.
    pub fn resource(&self, version: &Arc<SecretVersion>, requested: &str) -> Any {
        let Some(spelling) = &self.spelling else {
            return version.resource_for(requested);
        };
        let mut spellings = self.slot.spellings();
        let Some(entry) = spellings.get_mut(spelling) else {
            return version.encode_as(spelling);
        };
        if let Some((v, any)) = &entry.encoded
            && Arc::ptr_eq(v, version)
        {
            return any.clone();
        }
        let any = version.encode_as(spelling);
        entry.encoded = Some((version.clone(), any.clone()));
        any
    }

    /// Ready once for every burst of new versions published since the last time it was ready (or since the
    /// subscription was made); re-arms itself. Read [`Subscription::current`] after it.
    pub fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut changed = false;
        // Re-armed waits are polled at once, so that they are registered for the next change.
        while let Poll::Ready(mut rx) = self.wait.poll(cx) {
            // Seen before re-arming: whatever comes after is a new change, and `current` reads the newest.
            rx.borrow_and_update();
            self.wait.set(next_change(rx));
            changed = true;
        }
        if changed {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Resolves when a version newer than the last one seen is published. Cancel-safe.
    pub async fn changed(&mut self) {
        std::future::poll_fn(|cx| self.poll_changed(cx)).await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(spelling) = &self.spelling {
            let mut spellings = self.slot.spellings();
            if let Some(entry) = spellings.get_mut(spelling) {
                entry.subscribers = entry.subscribers.saturating_sub(1);
                if entry.subscribers == 0 {
                    spellings.remove(spelling);
                }
            }
        }
        if self.slot.tx.borrow().is_some() {
            return;
        }
        let mut slots = self.registry.write();
        // Only an unpublished slot whose last receiver is ours (still alive in `wait`) is removed.
        let ours = slots
            .get(&self.id)
            .is_some_and(|slot| Arc::ptr_eq(slot, &self.slot));
        if ours && self.slot.tx.borrow().is_none() && self.slot.tx.receiver_count() <= 1 {
            slots.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::trust_bundle_pem;

    fn bundle(n: &str) -> SecretContent {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![n.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        SecretContent::TrustBundle(trust_bundle_pem(cert.pem().as_bytes()).unwrap())
    }

    #[tokio::test]
    async fn identical_bytes_keep_version_and_wake_nobody() {
        let reg = Registry::new();
        let content = bundle("a");
        let v1 = reg.publish("ca", &content);
        assert!(matches!(v1, Published::New(_)));
        let mut sub = reg.watch("ca", "ca");
        assert_eq!(sub.current().unwrap().version(), v1.version().version());
        assert!(matches!(
            reg.publish("ca", &content),
            Published::Unchanged(_)
        ));
        assert!(
            sub.poll_changed(&mut Context::from_waker(std::task::Waker::noop()))
                .is_pending()
        );
        reg.publish("ca", &bundle("b"));
        sub.changed().await;
        assert_ne!(sub.current().unwrap().version(), v1.version().version());
    }

    #[test]
    fn prefixed_names_share_the_secret_but_carry_their_own_name() {
        let reg = Registry::new();
        reg.publish("web", &bundle("a"));
        let v = reg.get("sds://web").unwrap();
        let plain = Secret::decode(v.resource_for("web").value).unwrap();
        let prefixed = Secret::decode(v.resource_for("sds://web").value).unwrap();
        assert_eq!(plain.name, "web");
        assert_eq!(prefixed.name, "sds://web");
        assert_eq!(plain.r#type, prefixed.r#type);
    }

    #[test]
    fn every_stream_shares_one_encoding() {
        let reg = Registry::new();
        reg.publish("web", &bundle("a"));
        let a = reg.get("web").unwrap().resource_for("web");
        let b = reg.get("web").unwrap().resource_for("web");
        assert_eq!(a.value.as_ptr(), b.value.as_ptr(), "same bytes, not a copy");
        let p1 = reg.get("web").unwrap().resource_for("sds://web");
        let p2 = reg.get("web").unwrap().resource_for("sds://web");
        assert_eq!(p1.value.as_ptr(), p2.value.as_ptr());
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let reg = Registry::new();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["d.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pair =
            crate::certs::certified_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
                .unwrap();
        let published = reg.publish("d", &SecretContent::TlsCertificate(pair.clone()));
        let text = format!(
            "{published:?} {:?} {pair:?}",
            SecretContent::TlsCertificate(pair.clone())
        );
        assert!(!text.contains("PRIVATE"), "{text}");
        let body = key.serialize_pem();
        let line = body.lines().nth(1).unwrap();
        assert!(!text.contains(line));
    }

    #[tokio::test]
    async fn withdrawn_secrets_stay_with_their_streams_only() {
        let reg = Registry::new();
        let a = bundle("a");
        reg.publish("gone", &a);
        let mut held = reg.watch("gone", "gone");
        assert!(held.current().is_some());
        reg.withdraw("gone");
        assert!(reg.get("gone").is_none(), "no longer offered");
        assert!(
            held.current().is_some(),
            "still held by the stream that had it"
        );
        let mut fresh = reg.watch("gone", "gone");
        assert!(
            fresh.current().is_none(),
            "a new subscription does not see it"
        );
        assert!(reg.names().is_empty());
        // Publishing alone does not offer it again (a stopped source's late publication).
        let same = match reg.publish("gone", &a) {
            Published::Unchanged(v) | Published::New(v) => v,
        };
        assert!(reg.get("gone").is_none(), "still withdrawn");
        // Offered again (configured again): the fresh subscription is woken and sees it; the holder is
        // not bothered (same version).
        reg.offer("gone");
        fresh.changed().await;
        assert_eq!(fresh.current().unwrap().version(), same.version());
        reg.publish("gone", &bundle("b"));
        held.changed().await;
        assert_ne!(
            held.current().unwrap().version(),
            same.version(),
            "the holder hears about rotations"
        );
    }

    #[test]
    fn unknown_names_leave_no_trace() {
        let reg = Registry::new();
        reg.publish("known", &bundle("a"));
        let a = reg.watch("nope", "nope");
        let b = reg.watch("sds://nope", "sds://nope");
        assert_eq!(reg.slot_count(), 2);
        drop(a);
        assert_eq!(reg.slot_count(), 2, "still awaited by b");
        drop(b);
        assert_eq!(reg.slot_count(), 1);
        drop(reg.watch("known", "known"));
        assert_eq!(reg.names(), ["known"]);
    }

    /// Another spelling of a secret is served under that spelling, encoded once per version however many
    /// streams hold it, and forgotten with its last subscriber; past the cap, a new spelling is refused.
    #[tokio::test]
    async fn spellings_are_encoded_once_capped_and_dropped_with_their_last_subscriber() {
        let reg = Registry::new();
        reg.publish("shop.example.com", &bundle("a"));
        let spelled = |i: usize| format!("Shop.Example.Com{}", ".".repeat(i));
        let mut a = reg.watch("shop.example.com", &spelled(0));
        let mut b = reg.watch("shop.example.com", &spelled(0));
        let va = a.current().unwrap();
        let ra = a.resource(&va, &spelled(0));
        let vb = b.current().unwrap();
        let rb = b.resource(&vb, &spelled(0));
        assert_eq!(Secret::decode(ra.value.clone()).unwrap().name, spelled(0));
        assert_eq!(
            ra.value.as_ptr(),
            rb.value.as_ptr(),
            "one encoding for both"
        );
        // The name itself and sds://NAME do not count as spellings.
        let plain = reg.watch("shop.example.com", "shop.example.com");
        let prefixed = reg.watch("shop.example.com", "sds://shop.example.com");
        let mut others: Vec<Subscription> = (1..MAX_SPELLINGS)
            .map(|i| reg.watch("shop.example.com", &spelled(i)))
            .collect();
        assert!(others.iter().all(|s| !s.is_refused()));
        let mut over = reg.watch("shop.example.com", &spelled(MAX_SPELLINGS));
        assert!(over.is_refused() && over.current().is_none());
        assert!(!plain.is_refused() && !prefixed.is_refused());
        // A new version is encoded again for the spelling.
        reg.publish("shop.example.com", &bundle("b"));
        a.changed().await;
        let v2 = a.current().unwrap();
        let r2 = a.resource(&v2, &spelled(0));
        assert_ne!(r2.value, ra.value);
        // Dropped with its last subscriber: a spelling's place is free again.
        drop(a);
        drop(b);
        others.pop();
        drop(over);
        let mut again = reg.watch("shop.example.com", &spelled(MAX_SPELLINGS));
        assert!(!again.is_refused());
        assert!(again.current().is_some());
    }

    /// A certificate obtained on demand lives apart from a secret of the same name.
    #[test]
    fn on_demand_certificates_never_mix_with_named_secrets() {
        let reg = Registry::new();
        let name = crate::values::DnsName::new("shop.example.com").unwrap();
        let on_demand = SecretId::OnDemand(name);
        reg.publish("shop.example.com", &bundle("configured"));
        reg.publish(&on_demand, &bundle("on demand"));
        assert_ne!(
            reg.get("shop.example.com").unwrap().version(),
            reg.get(&on_demand).unwrap().version()
        );
        assert_eq!(reg.names(), ["shop.example.com"]);
    }

    #[tokio::test]
    async fn a_name_that_appears_wakes_its_waiter() {
        let reg = Registry::new();
        let mut sub = reg.watch("late", "late");
        assert!(sub.current().is_none());
        let publisher = reg.clone();
        let task = tokio::spawn(async move {
            sub.changed().await;
            sub.current().map(|v| v.name().to_owned())
        });
        publisher.publish("late", &bundle("x"));
        assert_eq!(task.await.unwrap().as_deref(), Some("late"));
    }
}
