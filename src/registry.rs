//! The secret registry: the only thing SDS streams read.
//!
//! Per secret name it holds the latest published version, already encoded as the protobuf `Any` that goes on
//! the wire, inside an `Arc`. A push to 10,000 streams therefore clones pointers (`Any.value` is a refcounted
//! `Bytes`), never re-encodes. The version is a short hash of the encoded secret, so publishing identical
//! material is a no-op and never wakes a stream.
//!
//! Subscribers wait on a `tokio::sync::watch` per name: a slow stream only ever sees the newest value, never
//! an unbounded queue of old ones. A [`Subscription`] keeps one wait armed for as long as it lives (a
//! reusable boxed future), so a stream polled for other reasons (an ACK arriving) does not register and
//! unregister itself with the channel each time. A name nobody has published yet is just a name without a
//! value; waiting on it is how a stream learns the moment it appears. Entries for such names are dropped
//! again when the last subscriber goes, so clients asking for made-up names cannot grow the registry.
//! Secrets are never removed once published: a stream that already delivered one must be able to keep
//! sending it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
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
use crate::values::{ISTIO_PREFIX, canonical_name};

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

    /// The encoded secret, named exactly as the client asked for it.
    pub fn resource_for(&self, requested: &str) -> Any {
        if requested.starts_with(ISTIO_PREFIX) {
            self.prefixed.clone()
        } else {
            self.plain.clone()
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
type Slot = Arc<watch::Sender<Value>>;

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

/// Secrets by name, watchable. Cheap to share: wrap in an `Arc`.
#[derive(Default)]
pub struct Registry {
    slots: RwLock<HashMap<String, Slot>>,
    /// Secrets no longer offered (removed by a reload): streams that hold them keep them and keep hearing
    /// about them; new subscriptions see them as unknown until they are published again.
    withdrawn: RwLock<std::collections::HashSet<String>>,
    /// Names a source is obtaining now (on demand): a stream waits for them instead of reporting them
    /// missing.
    expected: RwLock<std::collections::HashSet<String>>,
    /// Secrets also published under other spellings (an on-demand certificate under every SNI spelling
    /// Envoy asked for: the resource name must be exactly the one requested): the spellings, and the
    /// content last published, to publish a spelling added later.
    aliases: RwLock<HashMap<String, Aliased>>,
}

#[derive(Default)]
struct Aliased {
    spellings: std::collections::BTreeSet<String>,
    last: Option<(SecretContent, bool)>,
}

impl Registry {
    /// An empty registry, shared.
    pub fn new() -> Arc<Self> {
        Arc::new(Registry::default())
    }

    // A poisoned lock only means another thread panicked while holding it; the map itself is always
    // consistent (every mutation is a single insert or remove), so carry on with it.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Slot>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `content` as the newest version of secret `name` and wakes every subscriber, unless the
    /// encoded bytes equal the current version's.
    pub fn publish(&self, name: &str, content: &SecretContent) -> Published {
        self.publish_as(name, content, false)
    }

    /// Publishes a temporary stand-in for a certificate that has not been issued yet (a self-signed one, so
    /// that Envoy's listeners can start): served like any version, but its summary says it is temporary,
    /// so status views and metrics never count it as ready.
    pub fn publish_temporary(&self, name: &str, content: &SecretContent) -> Published {
        self.publish_as(name, content, true)
    }

    fn publish_as(&self, name: &str, content: &SecretContent, temporary: bool) -> Published {
        let spellings = {
            let mut aliases = self.aliases.write().unwrap_or_else(|e| e.into_inner());
            aliases.get_mut(name).map(|a| {
                a.last = Some((content.clone(), temporary));
                a.spellings.clone()
            })
        };
        for spelling in spellings.into_iter().flatten() {
            self.publish_one(&spelling, content, temporary);
        }
        self.publish_one(name, content, temporary)
    }

    fn publish_one(&self, name: &str, content: &SecretContent, temporary: bool) -> Published {
        if self.is_expected(name) {
            self.expected
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
        }
        let plain = encode(&content.to_secret(name.to_owned()));
        let version = content_version(&plain.value);
        let was_withdrawn = self
            .withdrawn
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(current) = self.get(name)
            && current.version == version
        {
            if was_withdrawn {
                // Offered again: wake subscriptions made while it was withdrawn (the others see no change).
                if let Some(slot) = self.read().get(name) {
                    slot.send_modify(|_| {});
                }
            }
            return Published::Unchanged(current);
        }
        let prefixed = encode(&content.to_secret(format!("{ISTIO_PREFIX}{name}")));
        let new = Arc::new(SecretVersion {
            name: name.to_owned(),
            version,
            plain,
            prefixed,
            summary: content.summary(temporary),
        });
        let mut slots = self.write();
        match slots.get(name) {
            Some(slot) => {
                slot.send_replace(Some(new.clone()));
            }
            None => {
                slots.insert(
                    name.to_owned(),
                    Arc::new(watch::Sender::new(Some(new.clone()))),
                );
            }
        }
        Published::New(new)
    }

    /// The current version of a secret, by registered or requested (`sds://`) name.
    pub fn get(&self, name: &str) -> Option<Arc<SecretVersion>> {
        if self.is_withdrawn(canonical_name(name)) {
            return None;
        }
        self.read()
            .get(canonical_name(name))
            .and_then(|slot| slot.borrow().clone())
    }

    /// Names of all published secrets, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .read()
            .iter()
            .filter(|(n, s)| s.borrow().is_some() && !self.is_withdrawn(n))
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Watches a secret by registered or requested (`sds://`) name; it need not exist yet.
    pub fn watch(self: &Arc<Self>, requested: &str) -> Subscription {
        let name = canonical_name(requested);
        let slot = self.read().get(name).cloned();
        let slot = slot.unwrap_or_else(|| {
            self.write()
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(watch::Sender::new(None)))
                .clone()
        });
        // Subscribing marks the current value seen: the wait is for the next one.
        let wait = ReusableBoxFuture::new(next_change(slot.subscribe()));
        Subscription {
            hidden: self.is_withdrawn(name),
            registry: self.clone(),
            name: name.into(),
            slot,
            wait,
        }
    }

    /// Stops offering a secret (its configuration was removed): new requests see it as unknown, while
    /// streams that already hold it keep it (their receivers keep the last value; nothing is yanked).
    pub fn withdraw(&self, name: &str) {
        self.withdrawn
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned());
    }

    fn is_withdrawn(&self, name: &str) -> bool {
        self.withdrawn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// Publishes whatever is published as `name` under other spellings as well, from now on (see
    /// [`Registry::alias`]).
    pub fn follow_aliases(&self, name: &str) {
        self.aliases
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_default();
    }

    /// Publishes `name` (followed with [`Registry::follow_aliases`]) as `spelling` too, at once when it has
    /// a version and at every publication after. A spelling equal to the name changes nothing.
    pub fn alias(&self, spelling: &str, name: &str) {
        if spelling == name {
            return;
        }
        let last = {
            let mut aliases = self.aliases.write().unwrap_or_else(|e| e.into_inner());
            let a = aliases.entry(name.to_owned()).or_default();
            a.spellings.insert(spelling.to_owned());
            a.last.clone()
        };
        if let Some((content, temporary)) = last {
            self.publish_one(spelling, &content, temporary);
        }
    }

    /// Stops publishing `name` under other spellings (it was refused, or dropped).
    pub fn forget_aliases(&self, name: &str) {
        self.aliases
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// The other spellings `name` is published under.
    pub fn spellings(&self, name: &str) -> Vec<String> {
        self.aliases
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|a| a.spellings.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Marks `name` as being obtained (on demand): streams wait for it rather than report it missing.
    pub fn expect_soon(&self, name: &str) {
        self.expected
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned());
    }

    /// Whether `name` is being obtained (see [`Registry::expect_soon`]).
    pub fn is_expected(&self, name: &str) -> bool {
        self.expected
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// `name` will not be obtained (it was refused): streams waiting for it are woken, and report it missing
    /// (for Envoy's on-demand selector, a delta `removed_resources` fails the waiting handshake at once).
    pub fn refuse(&self, name: &str) {
        self.expected
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(slot) = self.read().get(canonical_name(name)) {
            slot.send_modify(|_| {});
        }
    }

    /// How many SDS streams watch a secret now.
    pub fn subscribers(&self, name: &str) -> usize {
        self.read()
            .get(canonical_name(name))
            .map(|s| s.receiver_count())
            .unwrap_or(0)
    }

    /// How many names have an entry (published or awaited); for tests and status.
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

/// A stream's interest in one secret. Dropping it forgets a never-published name nobody else waits for.
pub struct Subscription {
    registry: Arc<Registry>,
    /// Made while the secret was withdrawn: it shows nothing until the secret is offered again.
    hidden: bool,
    name: Box<str>,
    /// The channel, for reading its current value.
    slot: Slot,
    /// The armed wait for the next version; owns this subscription's receiver.
    wait: ReusableBoxFuture<'static, watch::Receiver<Value>>,
}

impl Subscription {
    /// The current version.
    pub fn current(&mut self) -> Option<Arc<SecretVersion>> {
        let value = self.slot.borrow().clone();
        if self.hidden {
            if self.registry.is_withdrawn(&self.name) {
                return None;
            }
            self.hidden = false;
        }
        value
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
        if self.slot.borrow().is_some() {
            return;
        }
        let mut slots = self.registry.write();
        // Only an unpublished slot whose last receiver is ours (still alive in `wait`) is removed.
        let ours = slots
            .get(&*self.name)
            .is_some_and(|slot| Arc::ptr_eq(slot, &self.slot));
        if ours && self.slot.borrow().is_none() && self.slot.receiver_count() <= 1 {
            slots.remove(&*self.name);
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
        let mut sub = reg.watch("ca");
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
        let mut held = reg.watch("gone");
        assert!(held.current().is_some());
        reg.withdraw("gone");
        assert!(reg.get("gone").is_none(), "no longer offered");
        assert!(
            held.current().is_some(),
            "still held by the stream that had it"
        );
        let mut fresh = reg.watch("gone");
        assert!(
            fresh.current().is_none(),
            "a new subscription does not see it"
        );
        assert!(reg.names().is_empty());
        // Re-added with the same bytes: the fresh subscription is woken and sees it; the holder is not
        // bothered (same version).
        let same = match reg.publish("gone", &a) {
            Published::Unchanged(v) | Published::New(v) => v,
        };
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
        let a = reg.watch("nope");
        let b = reg.watch("sds://nope");
        assert_eq!(reg.slot_count(), 2);
        drop(a);
        assert_eq!(reg.slot_count(), 2, "still awaited by b");
        drop(b);
        assert_eq!(reg.slot_count(), 1);
        drop(reg.watch("known"));
        assert_eq!(reg.names(), ["known"]);
    }

    #[tokio::test]
    async fn a_name_that_appears_wakes_its_waiter() {
        let reg = Registry::new();
        let mut sub = reg.watch("late");
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
