//! Routes: the Gateway API's HTTPRoute and GRPCRoute (v1), as the waypoint reads
//! them.
//!
//! Unlike the rest of the model, these types are the API object's own shape
//! (camelCase fields, the spec's defaults): the Gateway API is the format both
//! sources speak (a user pastes an HTTPRoute's `spec` into the mesh file, and
//! Kubernetes discovery will hand us the same object), so a second shape would
//! only be a translation to get wrong. Fields the spec marks optional stay
//! `Option` where "absent" means something different from any value; where the
//! spec gives a default, serde fills it in, so the rest of the code never
//! re-derives it.
//!
//! What may be written is checked in [`super::validate`]; what it means at request
//! time lives in `http::route` (matching, precedence) and `http::filter`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An HTTPRoute: a name, a namespace and its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    pub spec: HttpRouteSpec,
}

/// A GRPCRoute: a name, a namespace and its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrpcRoute {
    pub name: String,
    pub namespace: String,
    pub spec: GrpcRouteSpec,
}

/// Gateway API `HTTPRouteSpec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Ignored for Service parents (GEP-1294: meshes SHOULD NOT infer anything
    /// from them); checked for form only.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Absent: one rule matching every request (the spec's default).
    #[serde(default = "default_http_rules")]
    pub rules: Vec<HttpRouteRule>,
}

fn default_http_rules() -> Vec<HttpRouteRule> {
    vec![HttpRouteRule::default()]
}

/// Gateway API `ParentReference`. The defaults are the spec's: a Gateway in the
/// Gateway API group, which a mesh route must override with `group: ""` and
/// `kind: Service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    #[serde(default = "gateway_group")]
    pub group: String,
    #[serde(default = "gateway_kind")]
    pub kind: String,
    /// Absent: the route's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub section_name: Option<String>,
    /// For a Service parent: only this service port. Absent: every port.
    #[serde(default)]
    pub port: Option<u16>,
}

/// The API group of Gateway API objects: the default group of a parent.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

fn gateway_group() -> String {
    GATEWAY_GROUP.to_owned()
}

fn gateway_kind() -> String {
    "Gateway".to_owned()
}

impl ParentReference {
    /// Whether it names a core Service (the only parent a mesh route has yet).
    pub fn is_service(&self) -> bool {
        is_core_group(&self.group) && self.kind == "Service"
    }
}

/// `""` and `"core"` both name the Kubernetes core group.
pub fn is_core_group(group: &str) -> bool {
    group.is_empty() || group == "core"
}

/// Gateway API `HTTPRouteRule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Any one must match. Absent: a prefix match on `/` (every request).
    #[serde(default = "default_http_matches")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
    /// Not supported: reported by validation rather than ignored.
    #[serde(default)]
    pub session_persistence: Option<SessionPersistence>,
}

impl Default for HttpRouteRule {
    fn default() -> Self {
        HttpRouteRule {
            name: None,
            matches: default_http_matches(),
            filters: Vec::new(),
            backend_refs: Vec::new(),
            timeouts: None,
            retry: None,
            session_persistence: None,
        }
    }
}

fn default_http_matches() -> Vec<HttpRouteMatch> {
    vec![HttpRouteMatch::default()]
}

/// Gateway API `HTTPRouteMatch`: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Absent: a prefix match on `/`.
    #[serde(default)]
    pub path: HttpPathMatch,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HttpQueryParamMatch>,
    #[serde(default)]
    pub method: Option<HttpMethod>,
}

/// Gateway API `HTTPPathMatch`; defaults to `PathPrefix` `/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    #[serde(default = "slash")]
    pub value: String,
}

impl Default for HttpPathMatch {
    fn default() -> Self {
        HttpPathMatch {
            kind: PathMatchType::PathPrefix,
            value: slash(),
        }
    }
}

fn slash() -> String {
    "/".to_owned()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HeaderMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// Gateway API `HTTPHeaderMatch` (and `GRPCHeaderMatch`, the same shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeaderMatch {
    #[serde(default, rename = "type")]
    pub kind: HeaderMatchType,
    pub name: String,
    pub value: String,
}

/// Gateway API `HTTPQueryParamMatch`: the same shape as a header match, but the
/// name is compared exactly (query names are case-sensitive).
pub type HttpQueryParamMatch = HttpHeaderMatch;

/// Gateway API `HTTPMethod`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Patch => "PATCH",
        }
    }
}

/// Gateway API `HTTPRouteFilter`: `type` says which one of the other fields is
/// given (validation holds them to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: HttpRouteFilterType,
    #[serde(default)]
    pub request_header_modifier: Option<HttpHeaderFilter>,
    #[serde(default)]
    pub response_header_modifier: Option<HttpHeaderFilter>,
    #[serde(default)]
    pub request_mirror: Option<HttpRequestMirrorFilter>,
    #[serde(default)]
    pub request_redirect: Option<HttpRequestRedirectFilter>,
    #[serde(default)]
    pub url_rewrite: Option<HttpUrlRewriteFilter>,
    #[serde(default)]
    pub cors: Option<HttpCorsFilter>,
    #[serde(default)]
    pub extension_ref: Option<LocalObjectReference>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HttpRouteFilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestMirror,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    #[serde(rename = "CORS")]
    Cors,
    ExtensionRef,
}

/// Gateway API `HTTPHeaderFilter`: header names compare case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeaderFilter {
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

/// Gateway API `HTTPRequestRedirectFilter`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRequestRedirectFilter {
    /// `http` or `https`; absent: the request's.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Absent: the request's host.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<HttpPathModifier>,
    /// Absent: see `http::filter::redirect` for the spec's defaulting.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_redirect_status")]
    pub status_code: u16,
}

fn default_redirect_status() -> u16 {
    302
}

/// Gateway API `HTTPURLRewriteFilter`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpUrlRewriteFilter {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<HttpPathModifier>,
}

/// Gateway API `HTTPPathModifier`: `type` says which value is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathModifier {
    #[serde(rename = "type")]
    pub kind: HttpPathModifierType,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HttpPathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

/// Gateway API `HTTPRequestMirrorFilter`: neither `percent` nor `fraction`
/// mirrors every request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRequestMirrorFilter {
    pub backend_ref: BackendObjectReference,
    #[serde(default)]
    pub percent: Option<i32>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

/// Gateway API `Fraction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fraction {
    pub numerator: i32,
    #[serde(default = "default_denominator")]
    pub denominator: i32,
}

fn default_denominator() -> i32 {
    100
}

/// Gateway API `HTTPCORSFilter` (GEP-1767).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCorsFilter {
    #[serde(default)]
    pub allow_origins: Vec<String>,
    #[serde(default)]
    pub allow_credentials: Option<bool>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Seconds a client may cache a preflight's answer.
    #[serde(default = "default_max_age")]
    pub max_age: i32,
}

fn default_max_age() -> i32 {
    5
}

/// Gateway API `LocalObjectReference` (an ExtensionRef filter's target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalObjectReference {
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// Gateway API `BackendObjectReference`; defaults: the core group, a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendObjectReference {
    #[serde(default)]
    pub group: String,
    #[serde(default = "service_kind")]
    pub kind: String,
    pub name: String,
    /// Absent: the route's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Required for a Service.
    #[serde(default)]
    pub port: Option<u16>,
}

fn service_kind() -> String {
    "Service".to_owned()
}

/// Gateway API `HTTPBackendRef` / `GRPCBackendRef`: a backend object reference
/// with a weight and per-backend filters. (Written out rather than flattening
/// [`BackendObjectReference`]: serde cannot deny unknown fields through a flatten.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef<F> {
    #[serde(default)]
    pub group: String,
    #[serde(default = "service_kind")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// Relative share of requests, 0 to 1,000,000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default = "Vec::new")]
    pub filters: Vec<F>,
}

fn default_weight() -> u32 {
    1
}

impl<F> BackendRef<F> {
    /// The object it names, without weight and filters.
    pub fn object(&self) -> BackendObjectReference {
        BackendObjectReference {
            group: self.group.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            port: self.port,
        }
    }
}

pub type HttpBackendRef = BackendRef<HttpRouteFilter>;
pub type GrpcBackendRef = BackendRef<GrpcRouteFilter>;

/// Gateway API `HTTPRouteTimeouts`: Gateway API durations (GEP-2257), see
/// [`parse_duration`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// Gateway API `HTTPRouteRetry`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<String>,
}

/// Gateway API `SessionPersistence`: parsed so that a pasted spec is read, then
/// reported as unsupported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionPersistence {
    #[serde(default)]
    pub session_name: Option<String>,
    #[serde(default)]
    pub absolute_timeout: Option<String>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub cookie_config: Option<CookieConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieConfig {
    #[serde(default)]
    pub lifetime_type: Option<String>,
}

/// Gateway API `GRPCRouteSpec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Ignored for Service parents, as for HTTPRoutes.
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// Gateway API `GRPCRouteRule`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Any one must match; none: every request matches.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<GrpcRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<GrpcBackendRef>,
    #[serde(default)]
    pub session_persistence: Option<SessionPersistence>,
}

/// Gateway API `GRPCRouteMatch`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// Absent: every service and method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
}

/// Gateway API `GRPCMethodMatch`: at least one of `service` and `method`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub kind: HeaderMatchType,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

/// Gateway API `GRPCRouteFilter`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteFilter {
    #[serde(rename = "type")]
    pub kind: GrpcRouteFilterType,
    #[serde(default)]
    pub request_header_modifier: Option<HttpHeaderFilter>,
    #[serde(default)]
    pub response_header_modifier: Option<HttpHeaderFilter>,
    #[serde(default)]
    pub request_mirror: Option<HttpRequestMirrorFilter>,
    #[serde(default)]
    pub extension_ref: Option<LocalObjectReference>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GrpcRouteFilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestMirror,
    ExtensionRef,
}

/// The compiled size of one route regex: a pattern that needs more is refused
/// (RE2 compiles to an automaton whose size a pattern like `(a{100}){100}`
/// multiplies; the regex crate's default allows 10 MiB per pattern).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Compiles a route's RegularExpression (RE2 syntax) to match a whole value,
/// as Envoy-based implementations do: `/v[0-9]` matches `/v1`, not `/v1/x`.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            let e = e.to_string();
            // The parser's message spans lines (it draws the pattern); keep its last.
            let last = e.lines().rfind(|l| !l.trim().is_empty()).unwrap_or(&e);
            format!(
                "{pattern:?} is not a valid regular expression: {}",
                last.trim()
            )
        })
}

/// A Gateway API Duration (GEP-2257): one to four `<1-5 digits><h|m|s|ms>`
/// parts, e.g. `10s`, `500ms`, `1h2m`; `0s` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a Gateway API duration like 10s, 500ms or 1h2m");
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        // At most 99999h per part: no overflow.
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_api_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h2m"), Ok(Duration::from_secs(3720)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("1h1m1s1ms"),
            Ok(Duration::from_millis(3_661_001))
        );
        for bad in [
            "",
            "10",
            "1.5s",
            "100000s",
            "1d",
            "1h1m1s1ms1s",
            "s",
            "-1s",
            " 1s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn regexes_match_whole_values_and_are_bounded() {
        let r = compile_regex("/v[0-9]").unwrap();
        assert!(r.is_match("/v1"));
        assert!(!r.is_match("/v1/x"));
        assert!(compile_regex("(").is_err());
        let e = compile_regex("(((a{100}){100}){100})").unwrap_err();
        assert!(e.contains("is not a valid regular expression"), "{e}");
    }

    #[test]
    fn spec_defaults_are_filled_in() {
        let spec: HttpRouteSpec = crate::yaml::from_str(
            "parentRefs: [{name: echo}]\nrules:\n- backendRefs: [{name: echo, port: 80}]\n  filters:\n  - type: RequestRedirect\n    requestRedirect: {hostname: example.org}\n",
        )
        .unwrap();
        let parent = &spec.parent_refs[0];
        assert_eq!(
            (parent.group.as_str(), parent.kind.as_str()),
            (GATEWAY_GROUP, "Gateway")
        );
        let rule = &spec.rules[0];
        assert_eq!(rule.matches, vec![HttpRouteMatch::default()]);
        assert_eq!(rule.matches[0].path.kind, PathMatchType::PathPrefix);
        assert_eq!(rule.backend_refs[0].weight, 1);
        assert_eq!(rule.backend_refs[0].kind, "Service");
        let redirect = rule.filters[0].request_redirect.as_ref().unwrap();
        assert_eq!(redirect.status_code, 302);
        let empty: HttpRouteSpec = crate::yaml::from_str("parentRefs: []\n").unwrap();
        assert_eq!(empty.rules, vec![HttpRouteRule::default()]);
    }
}
