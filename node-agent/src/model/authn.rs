//! Request authentication: Istio's `RequestAuthentication` (JWT rules), as the
//! waypoint applies it.
//!
//! Like routes, these types keep the API object's shape (Istio's `jwtRules`
//! fields, in snake_case with the camelCase names accepted too), so a user
//! pastes a policy's `spec` fields as Istio writes them.
//!
//! Which policies apply to a request for service S at its waypoint (Istio
//! ambient's rules): those whose `target_refs` name S (a `Service` in the
//! policy's namespace), those that name the waypoint itself (a `Gateway` of
//! that name in the policy's namespace: every service bound to it), and those
//! in the root namespace with neither `selector` nor `target_refs` (mesh-wide).
//! A policy with a `selector` is for sidecars and workloads: no waypoint
//! applies it (Istio does the same), nor does a namespace-wide one outside the
//! root namespace.
//!
//! What may be written is checked by [`problems`]; what it means at request
//! time lives in `http::jwt`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Labels, Mesh, Service, ServiceKey};

/// Istio's `RequestAuthentication`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestAuthentication {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Workloads it applies to (sidecars): never applied at a waypoint.
    #[serde(default)]
    pub selector: Option<Labels>,
    /// The services (or the waypoint) it applies to.
    #[serde(default, alias = "targetRefs")]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default, alias = "jwtRules")]
    pub jwt_rules: Vec<JwtRule>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// Istio's `PolicyTargetReference`: a `Service` (group `""`) or a `Gateway`
/// (group `gateway.networking.k8s.io`: the waypoint) of the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    /// Must be the policy's own, if given.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// Istio's `JWTRule`: one issuer, its keys, where its tokens are found and what
/// is passed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRule {
    /// The token's `iss` must be this.
    pub issuer: String,
    /// The token's `aud` must hold one of these; empty: not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The keys inline: a JWKS document (JSON).
    #[serde(default)]
    pub jwks: Option<String>,
    /// Where the keys are fetched from (HTTPS), refreshed on an interval.
    #[serde(default, alias = "jwksUri")]
    pub jwks_uri: Option<String>,
    /// Headers that may carry the token. None of `from_headers`,
    /// `from_params` and `from_cookies`: `Authorization: Bearer <token>` or
    /// the `access_token` query parameter (Envoy's default).
    #[serde(default, alias = "fromHeaders")]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default, alias = "fromParams")]
    pub from_params: Vec<String>,
    #[serde(default, alias = "fromCookies")]
    pub from_cookies: Vec<String>,
    /// A header to carry the verified payload (base64url JSON).
    #[serde(default, alias = "outputPayloadToHeader")]
    pub output_payload_to_header: Option<String>,
    /// Claims copied to request headers.
    #[serde(default, alias = "outputClaimToHeaders")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Keep the token in the request sent on (default: stripped).
    #[serde(default, alias = "forwardOriginalToken")]
    pub forward_original_token: bool,
    /// How long a fetch of `jwks_uri` may take (default 5 s).
    #[serde(
        default,
        deserialize_with = "opt_duration",
        serialize_with = "super::ser_opt_duration"
    )]
    pub timeout: Option<Duration>,
}

/// Istio's `JWTHeader`: a header name and the prefix its value starts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

/// Istio's `ClaimToHeader`: a claim (`a.b` for a nested one) copied to a header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    crate::units::parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// The Gateway API group: a `Gateway` target names a waypoint.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

impl RequestAuthentication {
    /// Whether this policy applies at a waypoint to requests for `svc`, sent
    /// through the waypoint `waypoint`.
    pub fn applies_to(&self, mesh: &Mesh, svc: &Service, waypoint: Option<&ServiceKey>) -> bool {
        if self.target_refs.is_empty() {
            return self.selector.is_none() && self.namespace == mesh.root_namespace;
        }
        self.target_refs.iter().any(|t| {
            if t.namespace
                .as_deref()
                .is_some_and(|ns| ns != self.namespace)
            {
                return false;
            }
            match (t.group.as_str(), t.kind.as_str()) {
                ("", "Service") => svc.namespace == self.namespace && svc.name == t.name,
                (GATEWAY_GROUP, "Gateway") => {
                    waypoint.is_some_and(|(ns, name)| *ns == self.namespace && *name == t.name)
                }
                _ => false,
            }
        })
    }
}

/// What must hold of `mesh.request_authentications`, whatever the source.
pub fn problems(mesh: &Mesh, problems: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    for (i, p) in mesh.request_authentications.iter().enumerate() {
        let at = format!("request_authentications[{i}] ({}/{})", p.namespace, p.name);
        if p.name.is_empty() || !super::validate::is_dns_label(&p.namespace) {
            problems.push(format!(
                "{at}: needs a name, and the namespace must be a DNS label"
            ));
        }
        if !seen.insert((&p.namespace, &p.name)) {
            problems.push(format!("{at}: duplicate request authentication"));
        }
        if p.selector.is_some() && !p.target_refs.is_empty() {
            problems.push(format!(
                "{at}: give at most one of `selector` and `targetRefs`"
            ));
        }
        for (t, r) in p.target_refs.iter().enumerate() {
            let at = format!("{at}: targetRefs[{t}]");
            match (r.group.as_str(), r.kind.as_str()) {
                ("", "Service") | (GATEWAY_GROUP, "Gateway") => {}
                (g, k) => problems.push(format!(
                    "{at}: {g}/{k} is not supported: name a Service (group \"\") or a waypoint \
                     (a Gateway of group {GATEWAY_GROUP})"
                )),
            }
            if r.name.is_empty() {
                problems.push(format!("{at}: needs a name"));
            }
            if let Some(ns) = &r.namespace
                && *ns != p.namespace
            {
                problems.push(format!(
                    "{at}: namespace {ns:?}: a policy may only target its own namespace ({})",
                    p.namespace
                ));
            }
        }
        let mut issuers = std::collections::HashSet::new();
        for (r, rule) in p.jwt_rules.iter().enumerate() {
            rule_problems(&format!("{at}: jwtRules[{r}]"), rule, problems);
            if !issuers.insert(&rule.issuer) {
                problems.push(format!(
                    "{at}: jwtRules[{r}]: issuer {:?} has a rule already",
                    rule.issuer
                ));
            }
        }
    }
}

fn rule_problems(at: &str, rule: &JwtRule, problems: &mut Vec<String>) {
    if rule.issuer.is_empty() {
        problems.push(format!("{at}.issuer: must not be empty"));
    }
    match (&rule.jwks, &rule.jwks_uri) {
        (Some(_), Some(_)) => problems.push(format!("{at}: give one of `jwks` and `jwksUri`")),
        (None, None) => problems.push(format!(
            "{at}: give `jwks` or `jwksUri` (OpenID discovery from the issuer is not supported)"
        )),
        (Some(jwks), None) => {
            if let Err(e) = jwks_problem(jwks) {
                problems.push(format!("{at}.jwks: {e}"));
            }
        }
        (None, Some(uri)) => {
            let ok = uri.parse::<http::Uri>().is_ok_and(|u| {
                u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                problems.push(format!(
                    "{at}.jwksUri: {uri:?} is not an https:// URL (keys are only fetched over TLS)"
                ));
            }
        }
    }
    for (h, header) in rule.from_headers.iter().enumerate() {
        if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
            problems.push(format!(
                "{at}.fromHeaders[{h}].name: {:?} is not a valid header name",
                header.name
            ));
        }
    }
    for (field, names) in [
        ("fromParams", &rule.from_params),
        ("fromCookies", &rule.from_cookies),
    ] {
        for (n, name) in names.iter().enumerate() {
            if name.is_empty() || name.contains(['=', ';', '&', ' ']) {
                problems.push(format!("{at}.{field}[{n}]: {name:?} is not a valid name"));
            }
        }
    }
    if let Some(h) = &rule.output_payload_to_header
        && http::HeaderName::from_bytes(h.as_bytes()).is_err()
    {
        problems.push(format!(
            "{at}.outputPayloadToHeader: {h:?} is not a valid header name"
        ));
    }
    for (c, out) in rule.output_claim_to_headers.iter().enumerate() {
        if http::HeaderName::from_bytes(out.header.as_bytes()).is_err() {
            problems.push(format!(
                "{at}.outputClaimToHeaders[{c}].header: {:?} is not a valid header name",
                out.header
            ));
        }
        if out.claim.is_empty() {
            problems.push(format!(
                "{at}.outputClaimToHeaders[{c}].claim: must not be empty"
            ));
        }
    }
    if rule.timeout.is_some_and(|t| t.is_zero()) {
        problems.push(format!("{at}.timeout: must be more than 0s"));
    }
}

/// Why an inline JWKS is unusable, if it is: it must be a JSON object with a
/// `keys` list of public keys (`kty` RSA, EC or OKP). A symmetric key (`oct`)
/// is refused: a waypoint holds no secret a client could also sign with.
pub fn jwks_problem(jwks: &str) -> Result<(), String> {
    let doc: serde_json::Value =
        serde_json::from_str(jwks).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("a JWKS is an object with a `keys` list")?;
    if keys.is_empty() {
        return Err("no keys".into());
    }
    for (i, k) in keys.iter().enumerate() {
        match k.get("kty").and_then(|t| t.as_str()) {
            Some("RSA" | "EC" | "OKP") => {}
            Some("oct") => {
                return Err(format!(
                    "keys[{i}]: symmetric (oct) keys are refused: public keys only"
                ));
            }
            other => return Err(format!("keys[{i}]: kty {other:?} is not RSA, EC or OKP")),
        }
    }
    Ok(())
}
