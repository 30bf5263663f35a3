//! Rate limits at the waypoint: Envoy Gateway's `BackendTrafficPolicy`
//! `rateLimit` shape, as close as it fits a mesh file.
//!
//! Like routes and request authentications, these types are the file's shape
//! (snake_case, the camelCase names accepted too). Where they differ from
//! Envoy Gateway's:
//!
//! - one entry is one policy of one `type` (EG nests `local:` and `global:`
//!   under `rateLimit`); targets are a `Service` (every request for it) or an
//!   `HTTPRoute` (requests that route matched), each target with its own
//!   buckets (EG: "limits are applied per route");
//! - `key` says what else tells buckets apart (EG only has `Distinct` header
//!   and `sourceCIDR` selectors, which are kept): the source's identity, its
//!   address, a header, a JWT claim, the path or the method;
//! - `burst` (EG's local limit is a token bucket as deep as `requests`: that
//!   is the default here too), `shadow` (EG has `shadowMode` per rule; here
//!   per policy), `divide_by_replicas`, and for Global `failure_mode` and
//!   `timeout` (EG sets these on the rate limit service, mesh-wide);
//! - `Distinct` header matches and `sourceCIDR` work for Local limits too;
//!   `invert` is not supported.
//!
//! What may be written is checked by [`problems`]; what it means at request
//! time lives in `http::ratelimit`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{IpNet, Mesh};

/// One rate limit policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// What it applies to: `Service`s and `HTTPRoute`s of its namespace.
    #[serde(default, alias = "targetRefs")]
    pub target_refs: Vec<TargetRef>,
    #[serde(rename = "type", default)]
    pub kind: LimitType,
    pub rules: Vec<Rule>,
    /// What distinguishes buckets, beyond the target and the rule:
    /// `source_identity`, `source_ip`, `header:<name>`, `claim:<name>` (`a.b`
    /// for a nested one), `path`, `method`. Empty: one bucket per target.
    #[serde(default)]
    pub key: Vec<String>,
    /// Count and log what would be refused, refuse nothing.
    #[serde(default, alias = "shadowMode")]
    pub shadow: bool,
    /// Local only: each replica of the waypoint enforces the limit divided by
    /// the number of replicas the model lists, so the total holds as it scales.
    #[serde(default, alias = "divideByReplicas")]
    pub divide_by_replicas: bool,
    /// Global only: what a request gets when Redis fails or is slow.
    #[serde(default, alias = "failureMode")]
    pub failure_mode: FailureMode,
    /// Global only: how long the Redis call may take (default 50ms).
    #[serde(
        default,
        deserialize_with = "opt_duration",
        serialize_with = "super::ser_opt_duration"
    )]
    pub timeout: Option<Duration>,
    /// Add `X-RateLimit-Limit`, `-Remaining` and `-Reset` to refusals, beside
    /// the draft's `RateLimit` and `RateLimit-Policy`.
    #[serde(default, alias = "xRateLimitHeaders")]
    pub x_ratelimit_headers: bool,
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    crate::units::parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// The Redis call's timeout when a policy gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitType {
    /// Each waypoint replica counts on its own.
    #[default]
    Local,
    /// The replicas share counts in Redis (`--redis-addr`).
    Global,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through (Envoy's default, `failure_mode_deny: false`).
    #[default]
    Open,
    /// Refuse it with 500, as Envoy does with `failure_mode_deny: true`.
    Closed,
}

/// EG's `RateLimitRule`: which clients, and their limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Every selector must hold for the rule to apply; none: every request.
    #[serde(default, alias = "clientSelectors")]
    pub client_selectors: Vec<ClientSelector>,
    pub limit: Limit,
    /// How many requests may come at once after a quiet spell (default
    /// `limit.requests`).
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSelector {
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, alias = "sourceCIDR")]
    pub source_cidr: Option<SourceMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: HeaderMatchType,
    /// Needed for `Exact` and `RegularExpression`; none for `Distinct`.
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeaderMatchType {
    #[default]
    Exact,
    /// RE2 syntax, matching the whole value.
    RegularExpression,
    /// Present, with a bucket per value.
    Distinct,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceMatch {
    #[serde(rename = "type", default)]
    pub kind: SourceMatchType,
    /// A CIDR the connection's source address must be in.
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceMatchType {
    /// One bucket for the whole block.
    #[default]
    Exact,
    /// A bucket per address.
    Distinct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub requests: u32,
    pub unit: Unit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unit {
    Second,
    Minute,
    Hour,
}

impl Unit {
    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3600,
        })
    }
}

/// One part of a bucket's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    SourceIdentity,
    SourceIp,
    /// A request header, lowercase.
    Header(String),
    /// A JWT claim's path (`a.b`).
    Claim(String),
    Path,
    Method,
}

impl KeyPart {
    pub fn parse(s: &str) -> Result<KeyPart, String> {
        Ok(match s {
            "source_identity" => KeyPart::SourceIdentity,
            "source_ip" => KeyPart::SourceIp,
            "path" => KeyPart::Path,
            "method" => KeyPart::Method,
            _ => match s.split_once(':') {
                Some(("header", h)) => {
                    if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                        return Err(format!("{h:?} is not a valid header name"));
                    }
                    KeyPart::Header(h.to_ascii_lowercase())
                }
                Some(("claim", c)) if !c.is_empty() => KeyPart::Claim(c.to_owned()),
                _ => {
                    return Err(format!(
                        "{s:?} is none of source_identity, source_ip, header:<name>, \
                         claim:<name>, path, method"
                    ));
                }
            },
        })
    }
}

/// What must hold of `mesh.rate_limits`, whatever the source.
pub fn problems(mesh: &Mesh, problems: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    for (i, p) in mesh.rate_limits.iter().enumerate() {
        let at = format!("rate_limits[{i}] ({}/{})", p.namespace, p.name);
        if p.name.is_empty() || !super::validate::is_dns_label(&p.namespace) {
            problems.push(format!(
                "{at}: needs a name, and the namespace must be a DNS label"
            ));
        }
        if !seen.insert((&p.namespace, &p.name)) {
            problems.push(format!("{at}: duplicate rate limit"));
        }
        if p.target_refs.is_empty() {
            problems.push(format!("{at}: target_refs: name a Service or an HTTPRoute"));
        }
        for (t, r) in p.target_refs.iter().enumerate() {
            let ok = matches!(
                (r.group.as_str(), r.kind.as_str()),
                ("", "Service") | ("" | "gateway.networking.k8s.io", "HTTPRoute")
            );
            if !ok {
                problems.push(format!(
                    "{at}: target_refs[{t}]: kind {:?} is not supported: name a Service or an HTTPRoute",
                    r.kind
                ));
            }
            if r.name.is_empty() {
                problems.push(format!("{at}: target_refs[{t}]: needs a name"));
            }
        }
        if p.rules.is_empty() {
            problems.push(format!("{at}: rules: give at least one"));
        }
        for (r, rule) in p.rules.iter().enumerate() {
            rule_problems(&format!("{at}: rules[{r}]"), rule, problems);
        }
        for (k, key) in p.key.iter().enumerate() {
            if let Err(e) = KeyPart::parse(key) {
                problems.push(format!("{at}: key[{k}]: {e}"));
            }
        }
        match p.kind {
            LimitType::Local => {
                if p.failure_mode != FailureMode::Open || p.timeout.is_some() {
                    problems.push(format!(
                        "{at}: failure_mode and timeout are for Global limits (Local ones never wait)"
                    ));
                }
            }
            LimitType::Global => {
                if p.divide_by_replicas {
                    problems.push(format!(
                        "{at}: divide_by_replicas is for Local limits (Global ones are shared already)"
                    ));
                }
                if p.timeout
                    .is_some_and(|t| t.is_zero() || t > Duration::from_secs(5))
                {
                    problems.push(format!(
                        "{at}: timeout: must be more than 0s and at most 5s"
                    ));
                }
            }
        }
    }
}

fn rule_problems(at: &str, rule: &Rule, problems: &mut Vec<String>) {
    if rule.limit.requests == 0 {
        problems.push(format!(
            "{at}.limit.requests: must be more than 0 (deny with an AuthorizationPolicy)"
        ));
    }
    if rule.burst == Some(0) {
        problems.push(format!("{at}.burst: must be more than 0"));
    }
    for (s, sel) in rule.client_selectors.iter().enumerate() {
        let at = format!("{at}.client_selectors[{s}]");
        if sel.headers.is_empty() && sel.source_cidr.is_none() {
            problems.push(format!("{at}: give headers or source_cidr"));
        }
        for (h, m) in sel.headers.iter().enumerate() {
            let at = format!("{at}.headers[{h}]");
            if http::HeaderName::from_bytes(m.name.as_bytes()).is_err() {
                problems.push(format!(
                    "{at}.name: {:?} is not a valid header name",
                    m.name
                ));
            }
            match (m.kind, &m.value) {
                (HeaderMatchType::Distinct, Some(_)) => {
                    problems.push(format!("{at}: a Distinct match takes no value"));
                }
                (HeaderMatchType::Distinct, None) => {}
                (_, None) => problems.push(format!("{at}.value: needed")),
                (HeaderMatchType::RegularExpression, Some(v)) => {
                    if let Err(e) = super::route::compile_regex(v) {
                        problems.push(format!("{at}.value: {e}"));
                    }
                }
                (HeaderMatchType::Exact, Some(_)) => {}
            }
        }
        if let Some(src) = &sel.source_cidr
            && src.value.parse::<IpNet>().is_err()
        {
            problems.push(format!(
                "{at}.source_cidr.value: {:?} is not a CIDR",
                src.value
            ));
        }
    }
}
