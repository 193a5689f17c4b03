//! Who is on the other end of an SDS connection, and how much of the server each caller may hold.
//!
//! Every connection is attributed to a *peer*: the uid on a Unix socket (from `SO_PEERCRED`, which the kernel
//! vouches for), the client certificate's identity over mutual TLS, or the source address on plain TCP (an
//! IPv6 address by its /64, since one host can use a whole /64). [`Limits`] is the handle the daemon owns and
//! passes to the listeners and the SDS service: it keeps the global stream limit and, per peer, the
//! connections, streams and subscribed names each holds, so that one caller (a runaway client or a hostile
//! one) reaching its quota leaves room for everyone else. Usage is counted by guards that give it back when
//! dropped; a peer's entry disappears with its last guard, so the table holds only peers that are connected.

use crate::certs::ClientIdentities;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The quotas, as configured (`[sds]` `max_streams`, `max_streams_per_peer`, `max_names_per_peer`,
/// `max_connections`, `max_connections_per_peer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// SDS streams open at once, over all peers.
    pub max_streams: usize,
    /// SDS streams one peer may hold.
    pub max_streams_per_peer: usize,
    /// Secret names one peer may be subscribed to, summed over its streams.
    pub max_names_per_peer: usize,
    /// Connections one SDS listener holds at once.
    pub max_connections: usize,
    /// Connections from one source (uid or IP address) on one listener.
    pub max_connections_per_peer: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_streams: 100_000,
            max_streams_per_peer: 25_000,
            max_names_per_peer: 100_000,
            max_connections: 4_096,
            max_connections_per_peer: 512,
        }
    }
}

/// What a peer is counted as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A Unix socket peer, by uid.
    Uid(u32),
    /// A mutual-TLS client, by the identities in its certificate (or the certificate's hash when it has none).
    Client(Arc<str>),
    /// A plain TCP peer, by address (IPv6 by /64).
    Ip(IpAddr),
    /// A caller that came through no listener of ours (in-process use).
    Local,
}

impl PeerKey {
    /// The key for a TCP source address.
    pub fn for_ip(ip: IpAddr) -> PeerKey {
        let IpAddr::V6(v6) = ip else {
            return PeerKey::Ip(ip);
        };
        if let Some(v4) = v6.to_ipv4_mapped() {
            return PeerKey::Ip(IpAddr::V4(v4));
        }
        if v6.is_loopback() {
            return PeerKey::Ip(ip);
        }
        let s = v6.segments();
        PeerKey::Ip(IpAddr::V6(Ipv6Addr::new(
            s[0], s[1], s[2], s[3], 0, 0, 0, 0,
        )))
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::Uid(uid) => write!(f, "uid {uid}"),
            PeerKey::Client(id) => write!(f, "client {id}"),
            PeerKey::Ip(IpAddr::V6(v6)) if !v6.is_loopback() => write!(f, "{v6}/64"),
            PeerKey::Ip(ip) => write!(f, "{ip}"),
            PeerKey::Local => f.write_str("local"),
        }
    }
}

/// Why a connection or a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the server's limit of {0} open SDS streams is reached")]
    /// The server holds its most streams (`max_streams`).
    Streams(usize),
    #[error("this caller already holds its quota of {0} SDS streams")]
    /// This caller holds its most streams (`max_streams_per_peer`).
    PeerStreams(usize),
    #[error("this caller is already subscribed to its quota of {0} secret names")]
    /// This caller watches its most names (`max_names_per_peer`).
    PeerNames(usize),
    #[error("this source already holds its quota of {0} connections")]
    /// This caller holds its most connections (`max_connections_per_peer`).
    PeerConnections(usize),
}

#[derive(Debug, Default)]
struct Usage {
    connections: usize,
    streams: usize,
    names: usize,
}

impl Usage {
    fn is_idle(&self) -> bool {
        self.connections == 0 && self.streams == 0 && self.names == 0
    }
}

#[derive(Debug)]
struct Shared {
    quotas: Quotas,
    open_streams: AtomicUsize,
    peers: Mutex<HashMap<PeerKey, Usage>>,
}

/// The quotas and what every peer holds now. Cheap to clone; the daemon owns it and passes it down.
#[derive(Debug, Clone)]
pub struct Limits {
    shared: Arc<Shared>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(Quotas::default())
    }
}

impl Limits {
    /// Limits enforcing `quotas`, with nothing held yet.
    pub fn new(quotas: Quotas) -> Self {
        Limits {
            shared: Arc::new(Shared {
                quotas,
                open_streams: AtomicUsize::new(0),
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The quotas these limits enforce.
    pub fn quotas(&self) -> Quotas {
        self.shared.quotas
    }

    /// SDS streams open now, over all peers.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::Relaxed)
    }

    /// Streams `key` holds now.
    pub fn peer_streams(&self, key: &PeerKey) -> usize {
        self.peers().get(key).map(|u| u.streams).unwrap_or(0)
    }

    /// How many peers hold anything now.
    pub fn peer_count(&self) -> usize {
        self.peers().len()
    }

    // A poisoned lock only means a thread panicked while holding it; every update is a single field
    // change, so the table is still consistent.
    fn peers(&self) -> MutexGuard<'_, HashMap<PeerKey, Usage>> {
        self.shared.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, key: &PeerKey, f: impl FnOnce(&mut Usage)) {
        let mut peers = self.peers();
        if let Some(u) = peers.get_mut(key) {
            f(u);
            if u.is_idle() {
                peers.remove(key);
            }
        }
    }

    /// Counts a connection from `key` until the guard is dropped, unless the source holds its quota.
    pub fn admit_connection(&self, key: PeerKey) -> Result<ConnectionGuard, Refused> {
        let max = self.shared.quotas.max_connections_per_peer;
        let mut peers = self.peers();
        let usage = peers.entry(key.clone()).or_default();
        if usage.connections >= max {
            if usage.is_idle() {
                peers.remove(&key);
            }
            return Err(Refused::PeerConnections(max));
        }
        usage.connections += 1;
        Ok(ConnectionGuard {
            limits: self.clone(),
            key,
        })
    }

    /// Counts a stream for `key` until the slot is dropped, unless the server or the peer is at its limit.
    pub fn open_stream(&self, key: &PeerKey) -> Result<StreamSlot, Refused> {
        let q = self.shared.quotas;
        let before = self.shared.open_streams.fetch_add(1, Ordering::Relaxed);
        if before >= q.max_streams {
            self.shared.open_streams.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Streams(q.max_streams));
        }
        let mut peers = self.peers();
        let usage = peers.entry(key.clone()).or_default();
        if usage.streams >= q.max_streams_per_peer {
            if usage.is_idle() {
                peers.remove(key);
            }
            drop(peers);
            self.shared.open_streams.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::PeerStreams(q.max_streams_per_peer));
        }
        usage.streams += 1;
        Ok(StreamSlot {
            limits: self.clone(),
            key: key.clone(),
            names: 0,
        })
    }
}

/// One counted connection; gives it back when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    limits: Limits,
    key: PeerKey,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.limits.release(&self.key, |u| u.connections -= 1);
    }
}

/// One counted stream and the names it is subscribed to; gives both back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    limits: Limits,
    key: PeerKey,
    names: usize,
}

impl StreamSlot {
    /// The stream is now subscribed to `names` names: counted against the peer's quota, or refused (and the
    /// count left as it was) when the peer would go over it.
    pub fn set_names(&mut self, names: usize) -> Result<(), Refused> {
        if names == self.names {
            return Ok(());
        }
        let max = self.limits.shared.quotas.max_names_per_peer;
        let mut peers = self.limits.peers();
        let usage = peers.entry(self.key.clone()).or_default();
        let total = usage.names.saturating_sub(self.names) + names;
        if names > self.names && total > max {
            return Err(Refused::PeerNames(max));
        }
        usage.names = total;
        self.names = names;
        Ok(())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.limits
            .shared
            .open_streams
            .fetch_sub(1, Ordering::Relaxed);
        let names = self.names;
        self.limits.release(&self.key, |u| {
            u.streams -= 1;
            u.names -= names;
        });
    }
}

/// Who is on the other end of a connection: put into every request's extensions by the listener, read by
/// the SDS service for quotas, access rules and logs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Peer {
    inner: Arc<PeerInfo>,
}

#[derive(Debug)]
struct PeerInfo {
    key: PeerKey,
    /// For logs: `127.0.0.1:40000`, `unix(uid=101,pid=7)`.
    address: String,
    identities: ClientIdentities,
}

impl Peer {
    /// A Unix socket peer.
    pub fn unix(uid: u32, pid: Option<i32>) -> Peer {
        let address = match pid {
            Some(pid) => format!("unix(uid={uid},pid={pid})"),
            None => format!("unix(uid={uid})"),
        };
        Peer::new(PeerKey::Uid(uid), address, ClientIdentities::default())
    }

    /// A TCP peer; with `client` (mutual TLS) it is counted by its certificate's identities.
    pub fn tcp(addr: SocketAddr, client: Option<(ClientIdentities, &[u8])>) -> Peer {
        match client {
            Some((ids, der)) => {
                let mut names: Vec<&str> = ids
                    .uris
                    .iter()
                    .chain(&ids.dns)
                    .map(String::as_str)
                    .collect();
                names.sort_unstable();
                let key = if names.is_empty() {
                    let digest = ring::digest::digest(&ring::digest::SHA256, der);
                    let hex: String = digest.as_ref()[..16]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    format!("sha256:{hex}")
                } else {
                    names.join(",")
                };
                Peer::new(PeerKey::Client(key.into()), addr.to_string(), ids)
            }
            None => Peer::new(
                PeerKey::for_ip(addr.ip()),
                addr.to_string(),
                ClientIdentities::default(),
            ),
        }
    }

    /// A caller that came through no listener (in-process use, fuzzing).
    pub fn local() -> Peer {
        Peer::new(PeerKey::Local, "local".into(), ClientIdentities::default())
    }

    fn new(key: PeerKey, address: String, identities: ClientIdentities) -> Peer {
        Peer {
            inner: Arc::new(PeerInfo {
                key,
                address,
                identities,
            }),
        }
    }

    /// What the caller is counted as.
    pub fn key(&self) -> &PeerKey {
        &self.inner.key
    }

    /// The caller's address, for logs.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// The names its client certificate carries (none without mutual TLS).
    pub fn identities(&self) -> &ClientIdentities {
        &self.inner.identities
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas() -> Quotas {
        Quotas {
            max_streams: 5,
            max_streams_per_peer: 3,
            max_names_per_peer: 10,
            max_connections: 100,
            max_connections_per_peer: 2,
        }
    }

    #[test]
    fn one_peer_at_its_quota_leaves_room_for_others() {
        let limits = Limits::new(quotas());
        let a = PeerKey::Uid(1);
        let b = PeerKey::Uid(2);
        let held: Vec<_> = (0..3).map(|_| limits.open_stream(&a).unwrap()).collect();
        assert_eq!(limits.open_stream(&a).unwrap_err(), Refused::PeerStreams(3));
        let b1 = limits.open_stream(&b).unwrap();
        let b2 = limits.open_stream(&b).unwrap();
        assert_eq!(limits.open_stream(&b).unwrap_err(), Refused::Streams(5));
        assert_eq!(limits.open_streams(), 5);
        drop(held);
        drop((b1, b2));
        assert_eq!(limits.open_streams(), 0);
        assert_eq!(limits.peer_count(), 0, "no entry outlives its guards");
    }

    #[test]
    fn names_are_counted_over_a_peers_streams() {
        let limits = Limits::new(quotas());
        let a = PeerKey::Ip("127.0.0.2".parse().unwrap());
        let mut s1 = limits.open_stream(&a).unwrap();
        let mut s2 = limits.open_stream(&a).unwrap();
        s1.set_names(6).unwrap();
        assert_eq!(s2.set_names(5).unwrap_err(), Refused::PeerNames(10));
        s2.set_names(4).unwrap();
        s1.set_names(1).unwrap();
        s2.set_names(9).unwrap();
        drop(s1);
        drop(s2);
        assert_eq!(limits.peer_count(), 0);
    }

    #[test]
    fn connections_per_source() {
        let limits = Limits::new(quotas());
        let a = PeerKey::Uid(7);
        let c1 = limits.admit_connection(a.clone()).unwrap();
        let _c2 = limits.admit_connection(a.clone()).unwrap();
        assert_eq!(
            limits.admit_connection(a.clone()).unwrap_err(),
            Refused::PeerConnections(2)
        );
        drop(c1);
        assert!(limits.admit_connection(a).is_ok());
    }

    #[test]
    fn ipv6_sources_count_by_64() {
        let a = PeerKey::for_ip("2001:db8:1:2::1".parse().unwrap());
        let b = PeerKey::for_ip("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = PeerKey::for_ip("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            PeerKey::for_ip("::ffff:10.0.0.1".parse().unwrap()),
            PeerKey::Ip("10.0.0.1".parse().unwrap())
        );
        assert_ne!(
            PeerKey::for_ip("127.0.0.1".parse().unwrap()),
            PeerKey::for_ip("127.0.0.2".parse().unwrap())
        );
    }
}
