//! Who may read one secret: patterns on Envoy's node id (`allowed_nodes`) and on the client certificate's
//! identities (`allowed_clients`), and what they mean.
//!
//! Patterns are globs compiled by `globset` (the matcher ripgrep uses) when the configuration is read, so a
//! malformed one is a configuration error with its line, never a surprise at request time. The semantics:
//! - a client pattern containing `://` is a URI pattern (a SPIFFE ID) and is matched against the
//!   certificate's URI SANs only; `*` and `?` stay within one path segment, `**` spans segments
//!   (`spiffe://example.org/ns/edge/sa/*` admits `.../sa/gateway`, not `.../sa/gateway/x`);
//! - any other client pattern is a DNS pattern, matched case-insensitively against DNS SANs only, where `*`
//!   and `?` stay within one label (`*.edge.example.com` admits `a.edge.example.com`, not `a.b.edge...`);
//! - a node pattern is matched against the whole node id, where `*` may span anything: node ids have no
//!   hierarchy that acme-sds could know (Istio's look like `router~10.0.0.1~gw-7.ns~ns.svc.cluster.local`).
//!
//! `[abc]`, `[!abc]` and `{a,b}` work everywhere. A node id is what the client says it is: a node rule is
//! advisory unless the connection itself is authenticated (peer uid or mutual TLS).

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};

use crate::certs::ClientIdentities;

/// A glob on Envoy's node id.
#[derive(Clone)]
pub struct NodePattern {
    text: String,
    matcher: GlobMatcher,
}

/// A glob on a client certificate identity: DNS or URI, by the pattern's shape.
#[derive(Clone)]
pub struct ClientPattern {
    text: String,
    kind: ClientKind,
    matcher: GlobMatcher,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ClientKind {
    Dns,
    Uri,
}

/// Labels become path segments so that `*` stays within one label; a DNS name never contains `/`.
fn dns_as_path(name: &str) -> Option<String> {
    (!name.contains('/')).then(|| name.trim_end_matches('.').replace('.', "/"))
}

fn compile(text: &str, separator: bool, case_insensitive: bool) -> Result<GlobMatcher, String> {
    GlobBuilder::new(text)
        .literal_separator(separator)
        .case_insensitive(case_insensitive)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{text:?} is not a valid pattern: {}", e.kind()))
}

impl NodePattern {
    /// Compiles a node id pattern (`*` and `?` over the whole id); the error says what is wrong.
    pub fn new(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty pattern".into());
        }
        Ok(NodePattern {
            text: text.to_owned(),
            matcher: compile(text, false, false)?,
        })
    }

    /// Whether `node_id` matches.
    pub fn matches(&self, node_id: &str) -> bool {
        self.matcher.is_match(node_id)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl ClientPattern {
    /// Compiles a client identity pattern (`spiffe://...` against URI SANs, anything else against DNS SANs); the error says what is wrong.
    pub fn new(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty pattern".into());
        }
        if text.contains("://") {
            return Ok(ClientPattern {
                text: text.to_owned(),
                kind: ClientKind::Uri,
                matcher: compile(text, true, false)?,
            });
        }
        let path = dns_as_path(text).ok_or_else(|| {
            format!(
                "{text:?}: a DNS pattern cannot contain '/'; URI patterns (SPIFFE IDs) start with a scheme such as spiffe://"
            )
        })?;
        Ok(ClientPattern {
            text: text.to_owned(),
            kind: ClientKind::Dns,
            matcher: compile(&path, true, true)?,
        })
    }

    /// Whether one of the certificate's identities of this pattern's kind matches.
    pub fn matches(&self, ids: &ClientIdentities) -> bool {
        match self.kind {
            ClientKind::Uri => ids.uris.iter().any(|u| self.matcher.is_match(u)),
            ClientKind::Dns => ids
                .dns
                .iter()
                .filter_map(|d| dns_as_path(d))
                .any(|d| self.matcher.is_match(d)),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

macro_rules! by_text {
    ($t:ty) => {
        impl PartialEq for $t {
            fn eq(&self, other: &Self) -> bool {
                self.text == other.text
            }
        }
        impl Eq for $t {}
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.text, f)
            }
        }
    };
}
by_text!(NodePattern);
by_text!(ClientPattern);

/// Who may read one secret. `None` means no restriction of that kind; when both are given, both must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Patterns on Envoy's node id.
    pub nodes: Option<Vec<NodePattern>>,
    /// Patterns on the client certificate's DNS or URI SANs; needs mutual TLS.
    pub clients: Option<Vec<ClientPattern>>,
}

impl Access {
    /// Whether anything restricts this secret.
    pub fn is_restricted(&self) -> bool {
        self.nodes.is_some() || self.clients.is_some()
    }

    /// Whether a caller may read the secret. `node_id` is `None` when the caller sent no usable node id
    /// (none, or one too long to keep): a node rule then never matches.
    pub fn allows(&self, node_id: Option<&str>, ids: &ClientIdentities) -> bool {
        let nodes_ok = self
            .nodes
            .as_ref()
            .is_none_or(|pats| node_id.is_some_and(|n| pats.iter().any(|p| p.matches(n))));
        let clients_ok = self
            .clients
            .as_ref()
            .is_none_or(|pats| pats.iter().any(|p| p.matches(ids)));
        nodes_ok && clients_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(p: &str, id: &str) -> bool {
        NodePattern::new(p).unwrap().matches(id)
    }

    fn ids(dns: &[&str], uris: &[&str]) -> ClientIdentities {
        ClientIdentities {
            dns: dns.iter().map(|s| s.to_string()).collect(),
            uris: uris.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn client(p: &str, dns: &[&str], uris: &[&str]) -> bool {
        ClientPattern::new(p).unwrap().matches(&ids(dns, uris))
    }

    #[test]
    fn node_patterns_match_the_whole_id() {
        assert!(node("edge-*", "edge-1"));
        assert!(node("edge-?", "edge-1"));
        assert!(!node("edge-?", "edge-12"));
        assert!(!node("edge-*", "core-1"));
        assert!(!node("edge", "edge-1"), "no implicit prefix match");
        assert!(node("*", ""));
        assert!(node("a*b*c", "aXXbYYc"));
        assert!(!node("a*b*c", "aXXbYY"));
        assert!(node(
            "router~*~*.istio-system~*",
            "router~10.0.0.1~gw-7.istio-system~istio-system.svc.cluster.local"
        ));
        assert!(node("edge-[0-9]", "edge-4"));
        assert!(!node("edge-[0-9]", "edge-x"));
        assert!(node("{edge,core}-1", "core-1"));
        assert!(!node("Edge-*", "edge-1"), "node ids are case-sensitive");
    }

    #[test]
    fn uri_patterns_stay_within_a_path_segment_and_match_uris_only() {
        let p = "spiffe://example.org/ns/edge/sa/*";
        assert!(client(p, &[], &["spiffe://example.org/ns/edge/sa/gateway"]));
        assert!(!client(
            p,
            &[],
            &["spiffe://example.org/ns/edge/sa/gateway/x"]
        ));
        assert!(!client(
            "spiffe://example.org/ns/edge/*",
            &[],
            &["spiffe://example.org/ns/edge/sa/gw"]
        ));
        assert!(client(
            "spiffe://example.org/ns/edge/**",
            &[],
            &["spiffe://example.org/ns/edge/sa/gw"]
        ));
        assert!(client(
            "spiffe://example.org/ns/*/sa/gw",
            &[],
            &["spiffe://example.org/ns/a/sa/gw"]
        ));
        assert!(
            !client(p, &["spiffe://example.org/ns/edge/sa/gateway"], &[]),
            "a URI pattern never matches a DNS name"
        );
    }

    #[test]
    fn dns_patterns_stay_within_a_label_and_match_dns_names_only() {
        assert!(client("*.edge.example.com", &["a.edge.example.com"], &[]));
        assert!(!client(
            "*.edge.example.com",
            &["a.b.edge.example.com"],
            &[]
        ));
        assert!(!client("*.edge.example.com", &["edge.example.com"], &[]));
        assert!(
            client("*.EDGE.example.com", &["A.edge.example.COM"], &[]),
            "DNS is case-insensitive"
        );
        assert!(client("gw-?.example.com", &["gw-1.example.com"], &[]));
        assert!(!client("*", &["a.b"], &[]), "* is one label");
        assert!(
            !client("*.example.com", &[], &["https://a.example.com"]),
            "a DNS pattern never matches a URI"
        );
        assert!(
            !client("*.example.com", &["a/b.example.com"], &[]),
            "not a DNS name"
        );
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        assert!(NodePattern::new("").is_err());
        assert!(NodePattern::new("edge-[").unwrap_err().contains("edge-["));
        assert!(
            ClientPattern::new("a/b")
                .unwrap_err()
                .contains("cannot contain '/'")
        );
        assert!(ClientPattern::new("spiffe://x/{a").is_err());
    }

    #[test]
    fn both_rules_must_match() {
        let access = Access {
            nodes: Some(vec![NodePattern::new("edge-*").unwrap()]),
            clients: Some(vec![ClientPattern::new("spiffe://e/ns/edge/sa/*").unwrap()]),
        };
        let gw = ids(&[], &["spiffe://e/ns/edge/sa/gw"]);
        assert!(access.allows(Some("edge-1"), &gw));
        assert!(!access.allows(Some("core-1"), &gw));
        assert!(!access.allows(None, &gw));
        assert!(!access.allows(Some("edge-1"), &ids(&[], &["spiffe://e/ns/app/sa/x"])));
        assert!(Access::default().allows(None, &ClientIdentities::default()));
    }
}
