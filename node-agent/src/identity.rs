//! Workload identities: SPIFFE IDs of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing is strict (this is what certificates are checked against): one scheme,
//! a lowercase trust domain, exactly the `ns`/`sa` path, DNS-label segments.
//!
//! One identity per trust domain is reserved: the CA's
//! (`spiffe://<trust-domain>/ns/weft-system/sa/weft-ca`). Agents trust whoever
//! proves it with their node token, so it belongs to no workload (the model
//! refuses one that has it) and the CA signs it for no node.

use std::{fmt, str::FromStr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a SPIFFE ID (must start with spiffe://): {0:?}")]
    Scheme(String),
    #[error("bad trust domain {0:?}: lowercase letters, digits, '.', '-', '_' only")]
    TrustDomain(String),
    #[error("bad SPIFFE path {0:?}: expected /ns/<namespace>/sa/<service-account>")]
    Path(String),
}

/// Default trust domain, as in Istio.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The namespace and service account of the CA's own identity.
pub const CA_NAMESPACE: &str = "weft-system";
pub const CA_SERVICE_ACCOUNT: &str = "weft-ca";

/// The identity the CA serves under, and agents check it against.
pub fn ca_identity(trust_domain: &str) -> Result<SpiffeId, Error> {
    SpiffeId::new(trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)
}

/// Whether a namespace and service account name the CA's reserved identity (in
/// any trust domain).
pub fn is_ca(namespace: &str, service_account: &str) -> bool {
    namespace == CA_NAMESPACE && service_account == CA_SERVICE_ACCOUNT
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, Error> {
        if !valid_trust_domain(trust_domain) {
            return Err(Error::TrustDomain(trust_domain.to_owned()));
        }
        if !valid_segment(namespace) || !valid_segment(service_account) {
            return Err(Error::Path(format!("/ns/{namespace}/sa/{service_account}")));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// Whether this is the CA's reserved identity (of its trust domain).
    pub fn is_ca(&self) -> bool {
        is_ca(&self.namespace, &self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| Error::Scheme(s.to_owned()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| Error::Path(rest.to_owned()))?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => SpiffeId::new(td, ns, sa),
            _ => Err(Error::Path(format!("/{path}"))),
        }
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// A namespace or service-account name: a DNS label (Kubernetes allows service
/// accounts to be DNS subdomains; dots are accepted for that).
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
    }

    #[test]
    fn the_ca_identity_is_recognised_in_any_trust_domain() {
        let ca = ca_identity("cluster.local").unwrap();
        assert_eq!(
            ca.to_string(),
            "spiffe://cluster.local/ns/weft-system/sa/weft-ca"
        );
        assert!(ca.is_ca());
        assert!(ca_identity("other.local").unwrap().is_ca());
        for (ns, sa) in [("weft-system", "default"), ("default", "weft-ca")] {
            assert!(!SpiffeId::new("cluster.local", ns, sa).unwrap().is_ca());
        }
    }

    #[test]
    fn rejects_what_is_not_exactly_an_identity() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a/sa/-b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} accepted");
        }
    }
}
