//! `[on_demand]`: certificates for names nobody listed, obtained when Envoy first asks for them (its
//! on-demand certificate selector subscribes to the SNI of a handshake it has no certificate for), and the
//! policy that decides which names may be obtained at all.

use std::time::Duration;

use toml::Spanned;

use super::Validator;
use super::raw::RawOnDemand;
use crate::sds::access::NodePattern;
use crate::values::{DomainPattern, KeyType};

/// `[on_demand]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDemandConfig {
    /// `allow`: the names that may be obtained (exact, or `*.` one label in front). Required.
    pub allow: Vec<DomainPattern>,
    /// `ask`: a URL asked `GET ?domain=NAME` for each new name (any 2xx allows), as Caddy's.
    pub ask: Option<String>,
    /// `ask_timeout`: how long `ask` may take; no answer is a denial.
    pub ask_timeout: Duration,
    /// `ask_concurrency`: `ask` requests in flight at once; names past it (and past as many again waiting)
    /// are refused for now rather than queued without end.
    pub ask_concurrency: usize,
    /// `max_new_per_hour`: new certificates per hour, all names together (renewals do not count).
    pub max_new_per_hour: u32,
    /// `max_pending`: on-demand orders in flight at once; more wait their turn.
    pub max_pending: usize,
    /// `key_type` of on-demand certificates.
    pub key_type: KeyType,
    /// `allowed_nodes`: which Envoys (node ids) may make a name be obtained, and read on-demand
    /// certificates; anyone when absent.
    pub allowed_nodes: Option<Vec<NodePattern>>,
    /// `drop_unused_after`: a certificate no Envoy asked for this long is no longer renewed, and dropped;
    /// `None`: after its own lifetime.
    pub drop_unused_after: Option<Duration>,
}

/// `ask_timeout` when not configured.
pub const DEFAULT_ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// `ask_concurrency` when not configured.
pub const DEFAULT_ASK_CONCURRENCY: usize = 32;
/// `max_new_per_hour` when not configured.
pub const DEFAULT_MAX_NEW_PER_HOUR: u32 = 100;
/// `max_pending` when not configured.
pub const DEFAULT_MAX_PENDING: usize = 16;

impl Validator<'_> {
    pub(super) fn on_demand(&mut self, raw: Spanned<RawOnDemand>) -> OnDemandConfig {
        let line = self.line(&raw);
        let raw = raw.into_inner();
        let mut allow = Vec::new();
        match raw.allow {
            None => self.problem(
                "on_demand.allow",
                line,
                "is required: the names that may be obtained on demand, such as [\"*.customers.example.com\"] (nothing else is ever ordered)",
            ),
            Some(list) => {
                let list_line = self.line(&list);
                if list.get_ref().is_empty() {
                    self.problem(
                        "on_demand.allow",
                        list_line,
                        "allows nothing; list at least one name or \"*.\" pattern",
                    );
                }
                for (i, p) in list.into_inner().into_iter().enumerate() {
                    let l = self.line(&p);
                    match DomainPattern::new(p.get_ref()) {
                        Ok(p) => allow.push(p),
                        Err(msg) => self.problem(format!("on_demand.allow[{i}]"), l, msg),
                    }
                }
            }
        }
        let ask = raw.ask.and_then(|a| {
            let l = self.line(&a);
            let url = a.into_inner();
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.parse::<hyper::Uri>().is_ok_and(|u| u.host().is_some());
            if ok {
                Some(url)
            } else {
                self.problem(
                    "on_demand.ask",
                    l,
                    format!("{url:?} is not an http:// or https:// URL such as \"http://127.0.0.1:9123/allowed\""),
                );
                None
            }
        });
        let duration = |v: &mut Validator<'_>, key: &str, raw: Option<Spanned<String>>| {
            let d = raw?;
            let l = v.line(&d);
            match super::parse_duration(d.get_ref()) {
                Ok(x) if !x.is_zero() => Some(x),
                Ok(_) => {
                    v.problem(format!("on_demand.{key}"), l, "must be longer than zero");
                    None
                }
                Err(msg) => {
                    v.problem(format!("on_demand.{key}"), l, msg);
                    None
                }
            }
        };
        let ask_timeout =
            duration(self, "ask_timeout", raw.ask_timeout).unwrap_or(DEFAULT_ASK_TIMEOUT);
        let drop_unused_after = duration(self, "drop_unused_after", raw.drop_unused_after);
        let count = |v: &mut Validator<'_>, key: &str, raw: Option<Spanned<i64>>, default: u32| {
            let Some(n) = raw else { return default };
            let l = v.line(&n);
            match u32::try_from(*n.get_ref()) {
                Ok(n) if n > 0 => n,
                _ => {
                    v.problem(
                        format!("on_demand.{key}"),
                        l,
                        "must be a whole number of at least 1",
                    );
                    default
                }
            }
        };
        let max_new_per_hour = count(
            self,
            "max_new_per_hour",
            raw.max_new_per_hour,
            DEFAULT_MAX_NEW_PER_HOUR,
        );
        let max_pending = count(
            self,
            "max_pending",
            raw.max_pending,
            u32::try_from(DEFAULT_MAX_PENDING).unwrap_or(16),
        ) as usize;
        let ask_concurrency = count(
            self,
            "ask_concurrency",
            raw.ask_concurrency,
            u32::try_from(DEFAULT_ASK_CONCURRENCY).unwrap_or(32),
        ) as usize;
        let key_type = match raw.key_type {
            None => KeyType::EcdsaP256,
            Some(k) => {
                let l = self.line(&k);
                KeyType::from_name(k.get_ref()).unwrap_or_else(|msg| {
                    self.problem("on_demand.key_type", l, msg);
                    KeyType::EcdsaP256
                })
            }
        };
        let access = self.access("on_demand", raw.allowed_nodes, None);
        OnDemandConfig {
            allow,
            ask,
            ask_timeout,
            ask_concurrency,
            max_new_per_hour,
            max_pending,
            key_type,
            allowed_nodes: access.nodes,
            drop_unused_after,
        }
    }
}
