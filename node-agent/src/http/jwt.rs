//! Request authentication (JWT), with Istio's `RequestAuthentication`
//! semantics: the first of the policy phases.
//!
//! - A request without a token passes, with no request principal:
//!   authorization decides what such a request may do.
//! - A request with a token that does not verify (bad signature, expired, not
//!   yet valid, wrong audience, an issuer no rule names, an algorithm refused)
//!   is answered 401 with `www-authenticate: Bearer ... error="invalid_token"`,
//!   as Envoy does; the reason is logged, never sent.
//! - A verified token gives the request principal `<iss>/<sub>` and its
//!   claims; claims are copied to headers, and the token is stripped unless
//!   the rule forwards it.
//!
//! Keys are public only (RSA, EC P-256/P-384, Ed25519): `alg: none`, HMAC and
//! any key whose `kty`, `crv` or `alg` disagrees with the token's `alg` are
//! refused, so a public key can never be used as an HMAC secret.
//!
//! Keys come inline or from a JWKS URL over HTTPS ([`Jwks`]): fetched by a
//! background task per URL, refreshed on an interval, fetched again (at most
//! once per [`REFETCH_THROTTLE`]) when a token names a `kid` the set lacks, and
//! kept when a fetch fails. A request waits on a fetch only while its provider
//! has never had keys, for at most the rule's timeout; without keys the token
//! cannot verify, so it is refused 401 (Envoy's answer when its remote JWKS
//! fetch failed; Istio, which fetches in istiod, also ends in a 401).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header, request::Parts};
use http_body_util::BodyExt as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tracing::{debug, warn};

use super::{Body, upstream::full};
pub use crate::jwk::KeySet;
use crate::{
    jwk::{self, Invalid},
    model::{Mesh, Service, ServiceKey, authn},
};

/// Clock skew allowed on `exp` and `nbf`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// How often a JWKS URL is fetched again, by default.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// A JWKS URL is fetched again for an unknown `kid` at most this often.
pub const REFETCH_THROTTLE: Duration = Duration::from_secs(10);
/// How long one fetch may take when the rule gives no timeout (Istio's).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed fetch with no keys yet, the next try comes this soon.
const RETRY: Duration = Duration::from_secs(5);
/// The largest JWKS document read.
const MAX_JWKS_BYTES: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no CA to check the JWKS server's certificate with (give --jwks-ca-file)")]
    NoTrust,
    #[error("JWKS URL {0:?} is not an https:// URL")]
    Url(String),
    #[error("connecting to the JWKS server: {0}")]
    Connect(std::io::Error),
    #[error("TLS with the JWKS server: {0}")]
    Tls(std::io::Error),
    #[error("HTTP with the JWKS server: {0}")]
    Http(hyper::Error),
    #[error("the JWKS server answered {0}")]
    Status(StatusCode),
    #[error("reading the JWKS: {0}")]
    Body(String),
    #[error("the JWKS fetch took longer than {0:?}")]
    Timeout(Duration),
    #[error("unusable JWKS: {0}")]
    Jwks(String),
    #[error("JWKS CA file: {0}")]
    Ca(String),
}

/// Why a token was refused (logged, never sent to the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("malformed token")]
    Malformed,
    #[error("algorithm {0} is refused (public-key algorithms only)")]
    Algorithm(String),
    #[error("issuer {0:?} has no rule")]
    UnknownIssuer(String),
    #[error("no key with kid {0:?}")]
    UnknownKid(String),
    #[error("no key of the provider fits the token's algorithm")]
    NoKey,
    #[error("the provider has no keys (JWKS not fetched)")]
    NoKeys,
    #[error("bad signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("not valid yet")]
    NotYetValid,
    #[error("audience not allowed")]
    Audience,
    #[error("{0}")]
    Other(String),
}

// ---- metrics -------------------------------------------------------------------------

/// Process-wide counts, for the metrics page: a waypoint has one engine.
struct Metrics {
    verified: AtomicU64,
    /// Per [`Reject::index`].
    rejected: [AtomicU64; Reject::LABELS.len()],
    jwks_fetched: AtomicU64,
    jwks_failed: AtomicU64,
}

static METRICS: Metrics = Metrics {
    verified: AtomicU64::new(0),
    rejected: [const { AtomicU64::new(0) }; Reject::LABELS.len()],
    jwks_fetched: AtomicU64::new(0),
    jwks_failed: AtomicU64::new(0),
};

impl Reject {
    /// The `reason` label of each kind, in [`Reject::index`] order.
    const LABELS: [&'static str; 11] = [
        "malformed",
        "algorithm",
        "unknown_issuer",
        "unknown_kid",
        "no_key",
        "no_keys",
        "signature",
        "expired",
        "not_yet_valid",
        "audience",
        "other",
    ];

    fn index(&self) -> usize {
        match self {
            Reject::Malformed => 0,
            Reject::Algorithm(_) => 1,
            Reject::UnknownIssuer(_) => 2,
            Reject::UnknownKid(_) => 3,
            Reject::NoKey => 4,
            Reject::NoKeys => 5,
            Reject::Signature => 6,
            Reject::Expired => 7,
            Reject::NotYetValid => 8,
            Reject::Audience => 9,
            Reject::Other(_) => 10,
        }
    }
}

/// `weft_jwt_tokens_total{result,reason}` (tokens verified or refused, with
/// why) and `weft_jwks_fetches_total{result}`, for the metrics page.
pub fn render() -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "# HELP weft_jwt_tokens_total Tokens the waypoint's request authentication verified or refused (401), by reason.\n\
         # TYPE weft_jwt_tokens_total counter\n",
    );
    let _ = writeln!(
        out,
        "weft_jwt_tokens_total{{result=\"verified\",reason=\"\"}} {}",
        METRICS.verified.load(Relaxed)
    );
    for (label, n) in Reject::LABELS.iter().zip(&METRICS.rejected) {
        let _ = writeln!(
            out,
            "weft_jwt_tokens_total{{result=\"refused\",reason=\"{label}\"}} {}",
            n.load(Relaxed)
        );
    }
    out.push_str(
        "# HELP weft_jwks_fetches_total JWKS fetches from issuers; a failed one keeps the last good keys.\n\
         # TYPE weft_jwks_fetches_total counter\n",
    );
    let _ = writeln!(
        out,
        "weft_jwks_fetches_total{{result=\"ok\"}} {}",
        METRICS.jwks_fetched.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "weft_jwks_fetches_total{{result=\"failed\"}} {}",
        METRICS.jwks_failed.load(Relaxed)
    );
    out
}

// ---- remote key sets ---------------------------------------------------------------

/// The JWKS URLs in use, each with the task that keeps its keys: shared by
/// every compiled config, so a config reload keeps the keys already fetched.
/// A URL's task ends when no config uses it any more.
#[derive(Clone)]
pub struct Jwks {
    inner: Arc<JwksInner>,
}

struct JwksInner {
    tls: Option<Arc<rustls::ClientConfig>>,
    refresh: Duration,
    remotes: Mutex<HashMap<String, Weak<Remote>>>,
}

impl Default for Jwks {
    /// No trust (remote keys are never fetched), default refresh.
    fn default() -> Self {
        Jwks::new(None, DEFAULT_REFRESH)
    }
}

impl Jwks {
    /// `tls`: how JWKS servers are checked; `None`: remote key sets are never
    /// fetched (their tokens are refused).
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, refresh: Duration) -> Jwks {
        Jwks {
            inner: Arc::new(JwksInner {
                tls,
                refresh,
                remotes: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The keys of `uri`, kept by a background task (started here when none
    /// runs for it, if a runtime is there to run it).
    fn remote(&self, uri: &str, timeout: Duration) -> Arc<Remote> {
        let mut remotes = self.inner.remotes.lock().unwrap_or_else(|e| e.into_inner());
        remotes.retain(|_, r| r.strong_count() > 0);
        if let Some(r) = remotes.get(uri).and_then(Weak::upgrade) {
            return r;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = Arc::new(Shared {
            uri: uri.to_owned(),
            timeout,
            keys: RwLock::new(None),
            kick: tokio::sync::Notify::new(),
            last_kick: Mutex::new(None),
            fetched: tokio::sync::watch::Sender::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(keep(
                shared.clone(),
                self.inner.tls.clone(),
                self.inner.refresh,
                stopped,
            ));
        }
        let remote = Arc::new(Remote {
            shared,
            _stop: stop,
        });
        remotes.insert(uri.to_owned(), Arc::downgrade(&remote));
        remote
    }
}

/// A JWKS URL's keys; dropping the last handle ends its task.
struct Remote {
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Shared {
    uri: String,
    timeout: Duration,
    /// The last key set fetched well.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Asks the task to fetch now.
    kick: tokio::sync::Notify,
    last_kick: Mutex<Option<Instant>>,
    /// Counts the fetches done, well or not (what a first request waits on).
    fetched: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The keys, waiting (at most the fetch timeout) for the first fetch
    /// when there are none yet.
    async fn first(&self) -> Option<Arc<KeySet>> {
        let mut fetched = self.fetched.subscribe();
        if let Some(k) = self.current() {
            return Some(k);
        }
        let _ = tokio::time::timeout(self.timeout, fetched.changed()).await;
        self.current()
    }

    /// Asks for a fetch now, unless one was asked for within the throttle.
    fn refetch(&self) {
        let mut last = self.last_kick.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < REFETCH_THROTTLE) {
            return;
        }
        *last = Some(Instant::now());
        self.kick.notify_one();
    }
}

/// Keeps a JWKS URL's keys: fetches, then waits for the refresh interval (or
/// less while there are no keys) or a refetch, until the URL is unused.
async fn keep(
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ClientConfig>>,
    refresh: Duration,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let fetched = tokio::select! {
            _ = &mut stopped => return,
            f = fetch(&shared.uri, tls.as_ref(), shared.timeout) => f,
        };
        match fetched {
            Ok(set) => {
                METRICS.jwks_fetched.fetch_add(1, Relaxed);
                debug!(uri = %shared.uri, keys = set.len(), "JWKS fetched");
                *shared.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
            }
            Err(e) => {
                METRICS.jwks_failed.fetch_add(1, Relaxed);
                warn!(uri = %shared.uri, error = %e, "JWKS fetch failed; the last good keys stay in use");
            }
        }
        shared.fetched.send_modify(|n| *n += 1);
        let wait = if shared.current().is_some() {
            refresh
        } else {
            refresh.min(RETRY)
        };
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(wait) => {}
            _ = shared.kick.notified() => {}
        }
    }
}

async fn fetch(
    uri: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<KeySet, Error> {
    tokio::time::timeout(timeout, fetch_once(uri, tls))
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

async fn fetch_once(uri: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<KeySet, Error> {
    let tls = tls.ok_or(Error::NoTrust)?;
    let parsed: http::Uri = uri.parse().map_err(|_| Error::Url(uri.to_owned()))?;
    let (Some("https"), Some(authority)) = (parsed.scheme_str(), parsed.authority()) else {
        return Err(Error::Url(uri.to_owned()));
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(Error::Connect)?;
    let name =
        rustls::pki_types::ServerName::try_from(host).map_err(|_| Error::Url(uri.to_owned()))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(Error::Tls)?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(Error::Http)?;
    tokio::spawn(conn);
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(header::ACCEPT, "application/json")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|_| Error::Url(uri.to_owned()))?;
    let resp = send.send_request(req).await.map_err(Error::Http)?;
    if resp.status() != StatusCode::OK {
        return Err(Error::Status(resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| Error::Body(e.to_string()))?
        .to_bytes();
    let text = std::str::from_utf8(&body).map_err(|e| Error::Body(e.to_string()))?;
    KeySet::parse(text).map_err(Error::Jwks)
}

/// A TLS client config for JWKS servers: their certificates must chain to one
/// of the roots in `pems` (the configured CA file, the mesh's trust bundle),
/// and name the URL's host.
pub fn client_config(pems: &[&str]) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in pems {
        for cert in crate::tls::certs_from_pem(pem).map_err(|e| Error::Ca(e.to_string()))? {
            roots.add(cert).map_err(|e| Error::Ca(e.to_string()))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// ---- providers and policies -------------------------------------------------------

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

enum Keys {
    Inline(Arc<KeySet>),
    Remote(Arc<Remote>),
}

/// One JWT rule, compiled.
struct Provider {
    issuer: String,
    audiences: Vec<String>,
    locations: Vec<Location>,
    keys: Keys,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, String)>,
    forward: bool,
    /// Tokens this provider verified, with their claims (see [`Verified`]).
    verified: Verified,
}

impl Provider {
    fn compile(rule: &authn::JwtRule, jwks: &Jwks) -> Result<Provider, String> {
        let keys = match (&rule.jwks, &rule.jwks_uri) {
            (Some(text), _) => Keys::Inline(Arc::new(KeySet::parse(text)?)),
            (None, Some(uri)) => {
                Keys::Remote(jwks.remote(uri, rule.timeout.unwrap_or(DEFAULT_FETCH_TIMEOUT)))
            }
            (None, None) => return Err("no keys".into()),
        };
        let mut locations = Vec::new();
        for h in &rule.from_headers {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| e.to_string())?;
            locations.push(Location::Header {
                name,
                prefix: h.prefix.clone(),
            });
        }
        locations.extend(rule.from_params.iter().cloned().map(Location::Param));
        locations.extend(rule.from_cookies.iter().cloned().map(Location::Cookie));
        if locations.is_empty() {
            locations = vec![
                Location::Header {
                    name: header::AUTHORIZATION,
                    prefix: "Bearer ".into(),
                },
                Location::Param("access_token".into()),
            ];
        }
        let header = |h: &str| HeaderName::from_bytes(h.as_bytes()).map_err(|e| e.to_string());
        Ok(Provider {
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            locations,
            keys,
            payload_header: rule
                .output_payload_to_header
                .as_deref()
                .map(header)
                .transpose()?,
            claim_headers: rule
                .output_claim_to_headers
                .iter()
                .map(|c| Ok((header(&c.header)?, c.claim.clone())))
                .collect::<Result<_, String>>()?,
            forward: rule.forward_original_token,
            verified: Verified::default(),
        })
    }

    /// Verifies `token` (whose `alg` the header gives) with the provider's
    /// keys; its claims if it holds.
    async fn verify(&self, token: &str) -> Result<serde_json::Value, Reject> {
        let head = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::Json(_) => Reject::Algorithm("unknown or none".into()),
            _ => Reject::Malformed,
        })?;
        if !jwk::ALLOWED.contains(&head.alg) {
            return Err(Reject::Algorithm(format!("{:?}", head.alg)));
        }
        let keys = match &self.keys {
            Keys::Inline(k) => k.clone(),
            Keys::Remote(r) => r.shared.first().await.ok_or(Reject::NoKeys)?,
        };
        if let Some(claims) = self.verified.get(token, &keys)? {
            return Ok(claims);
        }
        if let Some(kid) = &head.kid
            && !keys.has_kid(kid)
        {
            // Perhaps the issuer rotated its keys: fetch them again soon.
            if let Keys::Remote(r) = &self.keys {
                r.shared.refetch();
            }
            return Err(Reject::UnknownKid(kid.clone()));
        }
        let mut validation = Validation::new(head.alg);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.required_spec_claims.clear();
        validation.validate_nbf = true;
        // Checked below, with Istio's rule (one of the token's audiences is listed).
        validation.validate_aud = false;
        let claims = keys
            .verify(token, &head, &validation)
            .map_err(|e| match e {
                Invalid::NoKey => Reject::NoKey,
                Invalid::Signature => Reject::Signature,
                Invalid::Expired => Reject::Expired,
                Invalid::NotYetValid => Reject::NotYetValid,
                Invalid::Other(why) => Reject::Other(why),
            })?;
        let claims = self.checked(claims)?;
        self.verified.put(token, &keys, &claims);
        Ok(claims)
    }

    /// Istio's issuer and audience rules, on verified claims.
    fn checked(&self, claims: serde_json::Value) -> Result<serde_json::Value, Reject> {
        if claims.get("iss").and_then(|i| i.as_str()) != Some(self.issuer.as_str()) {
            return Err(Reject::UnknownIssuer(String::new()));
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(serde_json::Value::String(a)) => self.audiences.contains(a),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .filter_map(|a| a.as_str())
                    .any(|a| self.audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(Reject::Audience);
            }
        }
        Ok(claims)
    }
}

/// Tokens a provider has verified, so a client that sends the same token with
/// every request pays for its signature once: the check is 23 µs (RS256) to
/// 59 µs (ES256) here, most of the policy phases' cost (BENCHMARKS.md), and
/// Envoy caches likewise (`jwt_cache_config`).
///
/// An entry is the exact token, the key set that verified it (held, so a key
/// set replaced by a refresh never matches again, and no address is reused)
/// and its claims. A hit re-checks `exp` and `nbf` against the clock; a token
/// whose key set changed is verified again. At most [`VERIFIED_MAX`] entries
/// per provider: when full, the cache starts over.
#[derive(Default)]
struct Verified(std::sync::Mutex<HashMap<u64, CachedToken>>);

struct CachedToken {
    token: Box<str>,
    keys: Arc<KeySet>,
    claims: serde_json::Value,
}

const VERIFIED_MAX: usize = 4096;

impl Verified {
    fn hash(token: &str) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        // A per-process random key: a client cannot aim collisions.
        static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let mut h = STATE.get_or_init(Default::default).build_hasher();
        h.write(token.as_bytes());
        h.finish()
    }

    /// The claims of `token` if these keys verified it before and it is
    /// still within its time bounds; `Err` once it has expired.
    fn get(&self, token: &str, keys: &Arc<KeySet>) -> Result<Option<serde_json::Value>, Reject> {
        let cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(hit) = cache
            .get(&Self::hash(token))
            .filter(|c| &*c.token == token && Arc::ptr_eq(&c.keys, keys))
        else {
            return Ok(None);
        };
        let now = jsonwebtoken::get_current_timestamp();
        let skew = CLOCK_SKEW.as_secs();
        let bound = |name: &str| hit.claims.get(name).and_then(serde_json::Value::as_u64);
        if bound("exp").is_some_and(|exp| now.saturating_sub(skew) > exp) {
            return Err(Reject::Expired);
        }
        if bound("nbf").is_some_and(|nbf| now + skew < nbf) {
            return Err(Reject::NotYetValid);
        }
        Ok(Some(hit.claims.clone()))
    }

    fn put(&self, token: &str, keys: &Arc<KeySet>, claims: &serde_json::Value) {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= VERIFIED_MAX {
            cache.clear();
        }
        cache.insert(
            Self::hash(token),
            CachedToken {
                token: token.into(),
                keys: keys.clone(),
                claims: claims.clone(),
            },
        );
    }
}

/// The JWT rules that apply to one service's requests, compiled.
pub struct Policy {
    providers: Vec<Provider>,
    /// Every header a rule writes: taken off every request first, so a client
    /// cannot forge a claim header by sending it without a token.
    outputs: Vec<HeaderName>,
}

/// A verified token: what the later phases (authorization) get.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// Istio's request principal: `<iss>/<sub>`.
    pub principal: String,
    pub claims: serde_json::Value,
}

impl Policy {
    /// The rules of every request authentication that applies to `svc` at
    /// `waypoint` (see `model::authn`); `None` when there is none. A rule whose
    /// keys cannot be used is left out, and logged.
    pub fn compile(
        mesh: &Mesh,
        svc: &Service,
        waypoint: Option<&ServiceKey>,
        jwks: &Jwks,
    ) -> Option<Arc<Policy>> {
        let rules = mesh
            .request_authentications
            .iter()
            .filter(|p| p.applies_to(mesh, svc, waypoint))
            .flat_map(|p| p.jwt_rules.iter().map(move |r| (p, r)));
        let mut providers = Vec::new();
        for (p, rule) in rules {
            match Provider::compile(rule, jwks) {
                Ok(provider) => providers.push(provider),
                Err(why) => warn!(
                    policy = %format!("{}/{}", p.namespace, p.name),
                    issuer = %rule.issuer,
                    reason = %why,
                    "JWT rule left out"
                ),
            }
        }
        Policy::of(providers)
    }

    fn of(providers: Vec<Provider>) -> Option<Arc<Policy>> {
        if providers.is_empty() {
            return None;
        }
        let mut outputs: Vec<HeaderName> = Vec::new();
        for p in &providers {
            for h in p
                .payload_header
                .iter()
                .chain(p.claim_headers.iter().map(|(h, _)| h))
            {
                if !outputs.contains(h) {
                    outputs.push(h.clone());
                }
            }
        }
        Some(Arc::new(Policy { providers, outputs }))
    }

    /// Authenticates a request: `Ok(None)` when it carries no token,
    /// `Ok(Some(..))` when its token verifies (the request then carries the
    /// rule's output headers, and no token unless the rule forwards it), and
    /// the 401 answer when a token does not verify.
    pub async fn authenticate(
        &self,
        parts: &mut Parts,
    ) -> Result<Option<Authenticated>, Response<Body>> {
        for h in &self.outputs {
            parts.headers.remove(h);
        }
        let mut found: Vec<(Location, String)> = Vec::new();
        for loc in self.providers.iter().flat_map(|p| &p.locations) {
            if found.iter().any(|(l, _)| l == loc) {
                continue;
            }
            if let Some(token) = extract(loc, parts) {
                found.push((loc.clone(), token));
            }
        }
        let mut authenticated = None;
        for (loc, token) in found {
            let verified = match self.verify(&loc, &token).await {
                Ok(v) => {
                    METRICS.verified.fetch_add(1, Relaxed);
                    v
                }
                Err(why) => {
                    debug!(reason = %why, "JWT refused");
                    METRICS.rejected[why.index()].fetch_add(1, Relaxed);
                    return Err(unauthorized(parts));
                }
            };
            let (provider, claims) = verified;
            if !provider.forward {
                strip(&loc, parts);
            }
            if let Some(h) = &provider.payload_header
                && let Some(payload) = token.split('.').nth(1)
                && let Ok(v) = HeaderValue::from_str(payload)
            {
                parts.headers.insert(h.clone(), v);
            }
            for (h, claim) in &provider.claim_headers {
                if let Some(v) = claim_value(&claims, claim)
                    && let Ok(v) = HeaderValue::from_str(&v)
                {
                    parts.headers.insert(h.clone(), v);
                }
            }
            if authenticated.is_none() {
                let iss = claims.get("iss").and_then(|v| v.as_str()).unwrap_or("");
                let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("");
                authenticated = Some(Authenticated {
                    principal: format!("{iss}/{sub}"),
                    claims,
                });
            }
        }
        Ok(authenticated)
    }

    /// The provider for the token's issuer that looks where it was found, and
    /// the token's claims if that provider verifies it.
    async fn verify(
        &self,
        loc: &Location,
        token: &str,
    ) -> Result<(&Provider, serde_json::Value), Reject> {
        let iss = unverified_issuer(token).ok_or(Reject::Malformed)?;
        let provider = self
            .providers
            .iter()
            .find(|p| p.issuer == iss && p.locations.contains(loc))
            .ok_or(Reject::UnknownIssuer(iss))?;
        Ok((provider, provider.verify(token).await?))
    }
}

/// The `iss` a token claims, before anything is verified: it only picks the
/// provider whose keys then verify the token.
fn unverified_issuer(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    let mut v = Validation::new(Algorithm::RS256);
    v.insecure_disable_signature_validation();
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<Iss>(token, &DecodingKey::from_secret(&[]), &v)
        .ok()?
        .claims
        .iss
}

/// A claim as a header value: a string as it is, a number or a boolean
/// written out, a list of those joined with `,`; `a.b` names a nested claim.
fn claim_value(claims: &serde_json::Value, path: &str) -> Option<String> {
    let v = claims
        .get(path)
        .or_else(|| path.split('.').try_fold(claims, |v, k| v.get(k)))?;
    let one = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match v {
        serde_json::Value::Array(list) => {
            let parts: Option<Vec<_>> = list.iter().map(one).collect();
            Some(parts?.join(","))
        }
        v => one(v),
    }
}

fn extract(loc: &Location, parts: &Parts) -> Option<String> {
    match loc {
        Location::Header { name, prefix } => {
            let v = parts.headers.get(name)?.to_str().ok()?;
            // The scheme of `Authorization` is case-insensitive (RFC 9110 11.1).
            let rest = if v.len() >= prefix.len()
                && v.is_char_boundary(prefix.len())
                && v[..prefix.len()].eq_ignore_ascii_case(prefix)
            {
                &v[prefix.len()..]
            } else {
                return None;
            };
            Some(rest.trim().to_owned()).filter(|t| !t.is_empty())
        }
        Location::Param(name) => parts
            .uri
            .query()?
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_owned())
            .filter(|t| !t.is_empty()),
        Location::Cookie(name) => cookies(&parts.headers)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_owned())
            .filter(|t| !t.is_empty()),
    }
}

fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
}

/// Takes the token out of the request.
fn strip(loc: &Location, parts: &mut Parts) {
    match loc {
        Location::Header { name, .. } => {
            parts.headers.remove(name);
        }
        Location::Param(name) => {
            let Some(query) = parts.uri.query() else {
                return;
            };
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| p.split_once('=').map_or(*p, |(k, _)| k) != name)
                .collect();
            let path = parts.uri.path();
            let pq = if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", kept.join("&"))
            };
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            if let Ok(pq) = pq.parse() {
                uri.path_and_query = Some(pq);
            }
            if let Ok(u) = http::Uri::from_parts(uri) {
                parts.uri = u;
            }
        }
        Location::Cookie(name) => {
            let kept: Vec<String> = cookies(&parts.headers)
                .filter(|(k, _)| k != name)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            parts.headers.remove(header::COOKIE);
            if !kept.is_empty()
                && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
            {
                parts.headers.insert(header::COOKIE, v);
            }
        }
    }
}

/// Envoy's answer to a token that does not verify: 401, a `www-authenticate`
/// challenge naming the realm, and no reason.
fn unauthorized(parts: &Parts) -> Response<Body> {
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let challenge = format!(
        "Bearer realm=\"http://{host}{}\", error=\"invalid_token\"",
        parts.uri.path()
    );
    let challenge = HeaderValue::from_str(&challenge)
        .ok()
        .filter(|_| !host.contains('"'))
        .unwrap_or(HeaderValue::from_static("Bearer error=\"invalid_token\""));
    let mut r = Response::new(full("Jwt verification fails"));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
    r
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::{SystemTime, UNIX_EPOCH},
    };

    use crate::jwk::b64url as b64;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::{
        rand::SystemRandom,
        signature::{self, KeyPair as _},
    };
    use serde_json::json;

    use super::*;

    /// A fixed RSA key (ring cannot make one): a test vector, used nowhere else.
    const RSA_PEM: &str = include_str!("testdata/rsa-2048.pem");

    const ISS: &str = "https://issuer.example";

    /// A private key, its algorithm, and its public half as a JWK.
    struct Signer {
        enc: EncodingKey,
        alg: Algorithm,
        kid: String,
        jwk: serde_json::Value,
    }

    fn ec(kid: &str, alg: Algorithm) -> Signer {
        let (ring_alg, crv, len) = match alg {
            Algorithm::ES256 => (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32),
            _ => (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48),
        };
        let rng = SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(ring_alg, &rng).unwrap();
        let pair = signature::EcdsaKeyPair::from_pkcs8(ring_alg, pkcs8.as_ref(), &rng).unwrap();
        let public = pair.public_key().as_ref();
        Signer {
            enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
            alg,
            kid: kid.into(),
            jwk: json!({"kty": "EC", "crv": crv, "kid": kid, "use": "sig",
                "x": b64(&public[1..1 + len]), "y": b64(&public[1 + len..])}),
        }
    }

    fn ed25519(kid: &str) -> Signer {
        let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        Signer {
            enc: EncodingKey::from_ed_der(pkcs8.as_ref()),
            alg: Algorithm::EdDSA,
            kid: kid.into(),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                "x": b64(pair.public_key().as_ref())}),
        }
    }

    fn rsa(kid: &str, alg: Algorithm) -> Signer {
        let der = ::pem::parse(RSA_PEM).unwrap().into_contents();
        let pair = signature::RsaKeyPair::from_der(&der).unwrap();
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        Signer {
            enc: EncodingKey::from_rsa_der(&der),
            alg,
            kid: kid.into(),
            jwk: json!({"kty": "RSA", "kid": kid, "n": b64(&public.n), "e": b64(&public.e)}),
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims() -> serde_json::Value {
        json!({"iss": ISS, "sub": "alice", "aud": ["shop"], "exp": now() + 600,
            "group": "admins", "org": {"team": "blue"}, "roles": ["a", "b"]})
    }

    fn token(s: &Signer, claims: &serde_json::Value) -> String {
        let mut h = Header::new(s.alg);
        h.kid = Some(s.kid.clone());
        jsonwebtoken::encode(&h, claims, &s.enc).unwrap()
    }

    fn jwks(signers: &[&Signer]) -> String {
        json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()}).to_string()
    }

    /// A policy of JWT rules written as Istio's `jwtRules` (YAML).
    fn policy(rules: &str, jwks: &Jwks) -> Arc<Policy> {
        let rules: Vec<authn::JwtRule> = crate::yaml::from_str(rules).unwrap();
        Policy::of(
            rules
                .iter()
                .map(|r| Provider::compile(r, jwks).unwrap())
                .collect(),
        )
        .unwrap()
    }

    fn inline(signers: &[&Signer], extra: &str) -> Arc<Policy> {
        let rule = format!(
            "- issuer: {ISS}\n  jwks: '{}'\n{extra}",
            jwks(signers).replace('\'', "''")
        );
        policy(&rule, &Jwks::default())
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn bearer(token: &str) -> Parts {
        parts("/", &[("authorization", &format!("Bearer {token}"))])
    }

    async fn check(p: &Policy, parts: &mut Parts) -> Result<Option<Authenticated>, StatusCode> {
        p.authenticate(parts).await.map_err(|r| r.status())
    }

    #[tokio::test]
    async fn a_valid_token_of_each_algorithm_gives_the_request_principal() {
        let signers = [
            rsa("r256", Algorithm::RS256),
            rsa("r384", Algorithm::RS384),
            rsa("r512", Algorithm::RS512),
            rsa("p256", Algorithm::PS256),
            ec("e256", Algorithm::ES256),
            ec("e384", Algorithm::ES384),
            ed25519("ed"),
        ];
        let p = inline(&signers.iter().collect::<Vec<_>>(), "");
        for s in &signers {
            let mut req = bearer(&token(s, &claims()));
            let a = check(&p, &mut req).await.unwrap().expect("authenticated");
            assert_eq!(a.principal, format!("{ISS}/alice"), "{:?}", s.alg);
            assert_eq!(a.claims["group"], "admins");
            assert!(
                !req.headers.contains_key(header::AUTHORIZATION),
                "the token is stripped"
            );
        }
    }

    #[tokio::test]
    async fn no_token_passes_with_no_principal_and_forged_outputs_are_dropped() {
        let s = ec("k", Algorithm::ES256);
        let p = inline(
            &[&s],
            "  outputClaimToHeaders: [{header: x-jwt-group, claim: group}]\n",
        );
        let mut req = parts("/", &[("x-jwt-group", "admins")]);
        assert_eq!(check(&p, &mut req).await, Ok(None));
        assert!(!req.headers.contains_key("x-jwt-group"));
    }

    #[tokio::test]
    async fn a_verified_token_is_cached_until_it_expires_and_only_for_its_keys() {
        let s = ec("k", Algorithm::ES256);
        let p = inline(&[&s], "");
        // A token about to leave its skew: verified once, then taken from the
        // cache, which re-checks the clock (it expires while cached).
        let mut c = claims();
        c["exp"] = json!(now() - 58);
        let t = token(&s, &c);
        assert!(check(&p, &mut bearer(&t)).await.is_ok());
        let provider = &p.providers[0];
        assert_eq!(provider.verified.0.lock().unwrap().len(), 1, "cached");
        assert!(check(&p, &mut bearer(&t)).await.is_ok(), "a hit");
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert!(
            check(&p, &mut bearer(&t)).await.is_err(),
            "a cached token still expires"
        );
        // A cached entry counts only for the key set that verified it.
        let good = token(&s, &claims());
        assert!(check(&p, &mut bearer(&good)).await.is_ok());
        let Keys::Inline(keys) = &provider.keys else {
            unreachable!()
        };
        let other = Arc::new(KeySet::parse(&jwks(&[&s])).unwrap());
        assert!(!Arc::ptr_eq(keys, &other));
        assert!(matches!(provider.verified.get(&good, &other), Ok(None)));
        assert!(matches!(provider.verified.get(&good, keys), Ok(Some(_))));
    }

    #[tokio::test]
    async fn time_bounds_hold_with_a_minute_of_skew() {
        let s = ec("k", Algorithm::ES256);
        let p = inline(&[&s], "");
        let at = |exp: u64, nbf: Option<u64>| {
            let mut c = claims();
            c["exp"] = json!(exp);
            if let Some(nbf) = nbf {
                c["nbf"] = json!(nbf);
            }
            token(&s, &c)
        };
        for (name, t, ok) in [
            ("expired", at(now() - 120, None), false),
            ("expired within the skew", at(now() - 30, None), true),
            ("not valid yet", at(now() + 600, Some(now() + 120)), false),
            (
                "valid soon, within the skew",
                at(now() + 600, Some(now() + 30)),
                true,
            ),
        ] {
            let got = check(&p, &mut bearer(&t)).await;
            assert_eq!(got.is_ok(), ok, "{name}: {got:?}");
        }
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        assert!(
            check(&p, &mut bearer(&token(&s, &c))).await.is_ok(),
            "exp is optional, as in Envoy"
        );
    }

    #[tokio::test]
    async fn issuer_and_audience_are_checked() {
        let s = ec("k", Algorithm::ES256);
        let p = inline(&[&s], "  audiences: [shop, billing]\n");
        let mut c = claims();
        c["iss"] = json!("https://other.example");
        assert_eq!(
            check(&p, &mut bearer(&token(&s, &c))).await,
            Err(StatusCode::UNAUTHORIZED),
            "an issuer no rule names"
        );
        let mut c = claims();
        c["aud"] = json!("mail");
        assert_eq!(
            check(&p, &mut bearer(&token(&s, &c))).await,
            Err(StatusCode::UNAUTHORIZED),
            "wrong audience"
        );
        c["aud"] = json!(["mail", "billing"]);
        assert!(check(&p, &mut bearer(&token(&s, &c))).await.is_ok());
    }

    #[tokio::test]
    async fn alg_none_hmac_and_mismatched_keys_are_refused() {
        let r = rsa("r", Algorithm::RS256);
        let e = ec("e", Algorithm::ES256);
        let p = inline(&[&r, &e], "");
        let payload = b64(claims().to_string().as_bytes());
        let none = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        assert_eq!(
            check(&p, &mut bearer(&none)).await,
            Err(StatusCode::UNAUTHORIZED)
        );
        // The classic attack: HS256 with the server's public key as the secret.
        for secret in [
            r.jwk.to_string().into_bytes(),
            ::pem::parse(RSA_PEM).unwrap().into_contents(),
        ] {
            let hmac = Signer {
                enc: EncodingKey::from_secret(&secret),
                alg: Algorithm::HS256,
                kid: "r".into(),
                jwk: json!({}),
            };
            assert_eq!(
                check(&p, &mut bearer(&token(&hmac, &claims()))).await,
                Err(StatusCode::UNAUTHORIZED)
            );
        }
        // An ES256 token naming the RSA key's kid.
        let wrong = Signer {
            kid: "r".into(),
            ..ec("x", Algorithm::ES256)
        };
        assert_eq!(
            check(&p, &mut bearer(&token(&wrong, &claims()))).await,
            Err(StatusCode::UNAUTHORIZED)
        );
        // Signed by another key under a known kid.
        let forged = Signer {
            kid: "e".into(),
            ..ec("x", Algorithm::ES256)
        };
        assert_eq!(
            check(&p, &mut bearer(&token(&forged, &claims()))).await,
            Err(StatusCode::UNAUTHORIZED)
        );
        // A key whose own alg disagrees with its type is left out.
        let mut bad = e.jwk.clone();
        bad["alg"] = json!("RS256");
        assert!(KeySet::parse(&json!({ "keys": [bad] }).to_string()).is_err());
        let oct = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string();
        assert!(KeySet::parse(&oct).is_err(), "symmetric keys are refused");
    }

    #[tokio::test]
    async fn the_refusal_is_a_bearer_challenge_without_detail() {
        let s = ec("k", Algorithm::ES256);
        let p = inline(&[&s], "");
        let mut c = claims();
        c["exp"] = json!(now() - 3600);
        let mut req = parts(
            "/api?x=1",
            &[
                ("host", "shop.default"),
                ("authorization", &format!("Bearer {}", token(&s, &c))),
            ],
        );
        let r = p.authenticate(&mut req).await.unwrap_err();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"http://shop.default/api\", error=\"invalid_token\""
        );
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Jwt verification fails");
    }

    #[tokio::test]
    async fn tokens_are_found_in_headers_params_and_cookies_and_stripped() {
        let s = ed25519("k");
        let p = inline(
            &[&s],
            "  fromHeaders: [{name: x-token, prefix: 'Token '}]\n  fromParams: [jwt]\n  fromCookies: [session]\n",
        );
        let t = token(&s, &claims());
        let mut req = parts("/", &[("x-token", &format!("Token {t}"))]);
        assert!(check(&p, &mut req).await.unwrap().is_some());
        assert!(!req.headers.contains_key("x-token"));

        let mut req = parts(&format!("/a?b=1&jwt={t}&c=2"), &[]);
        assert!(check(&p, &mut req).await.unwrap().is_some());
        assert_eq!(req.uri, "/a?b=1&c=2");

        let mut req = parts("/", &[("cookie", &format!("a=1; session={t}; b=2"))]);
        assert!(check(&p, &mut req).await.unwrap().is_some());
        assert_eq!(req.headers[header::COOKIE], "a=1; b=2");

        let mut req = bearer(&t);
        assert_eq!(
            check(&p, &mut req).await,
            Ok(None),
            "Authorization is not looked at when other places are configured"
        );
        let mut req = parts("/", &[("x-token", &format!("Token {t}x"))]);
        assert_eq!(check(&p, &mut req).await, Err(StatusCode::UNAUTHORIZED));
    }

    #[tokio::test]
    async fn claims_go_to_headers_and_the_token_may_be_forwarded() {
        let s = ec("k", Algorithm::ES384);
        let p = inline(
            &[&s],
            "  outputPayloadToHeader: x-jwt-payload\n  forwardOriginalToken: true\n  outputClaimToHeaders:\n  - {header: x-jwt-sub, claim: sub}\n  - {header: x-jwt-team, claim: org.team}\n  - {header: x-jwt-roles, claim: roles}\n  - {header: x-jwt-exp, claim: exp}\n  - {header: x-jwt-none, claim: nothing}\n",
        );
        let t = token(&s, &claims());
        let mut req = bearer(&t);
        check(&p, &mut req).await.unwrap().unwrap();
        let h = &req.headers;
        assert_eq!(h["x-jwt-sub"], "alice");
        assert_eq!(h["x-jwt-team"], "blue");
        assert_eq!(h["x-jwt-roles"], "a,b");
        assert!(h.contains_key("x-jwt-exp"));
        assert!(!h.contains_key("x-jwt-none"));
        assert_eq!(h["x-jwt-payload"], t.split('.').nth(1).unwrap());
        assert_eq!(h[header::AUTHORIZATION], format!("Bearer {t}"));
    }

    #[tokio::test]
    async fn several_providers_each_check_their_own_issuer() {
        let a = ec("a", Algorithm::ES256);
        let b = ed25519("b");
        let rules = format!(
            "- {{issuer: {ISS}, jwks: '{}'}}\n- {{issuer: https://b.example, jwks: '{}'}}\n",
            jwks(&[&a]),
            jwks(&[&b])
        );
        let p = policy(&rules, &Jwks::default());
        let mut c = claims();
        c["iss"] = json!("https://b.example");
        let got = check(&p, &mut bearer(&token(&b, &c))).await.unwrap();
        assert_eq!(got.unwrap().principal, "https://b.example/alice");
        // b's token claiming a's issuer: a's keys do not verify it.
        assert_eq!(
            check(&p, &mut bearer(&token(&b, &claims()))).await,
            Err(StatusCode::UNAUTHORIZED)
        );
    }

    /// A JWKS server over HTTPS on the loopback: serves `doc` (status, body),
    /// counts fetches. Returns its URL and its CA (PEM).
    async fn jwks_server(
        doc: Arc<Mutex<(u16, String)>>,
        hits: Arc<AtomicUsize>,
    ) -> (String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = vec![0; 4096];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(m) => n += m,
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let (status, body) = doc.lock().unwrap().clone();
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        (format!("https://localhost:{port}/keys"), ca_pem)
    }

    #[tokio::test]
    async fn remote_keys_are_fetched_refetched_for_an_unknown_kid_and_kept_on_failure() {
        let old = ec("old", Algorithm::ES256);
        let new = rsa("new", Algorithm::PS256);
        let doc = Arc::new(Mutex::new((200, jwks(&[&old]))));
        let hits = Arc::new(AtomicUsize::new(0));
        let (uri, ca) = jwks_server(doc.clone(), hits.clone()).await;
        let store = Jwks::new(Some(client_config(&[&ca]).unwrap()), DEFAULT_REFRESH);
        let p = policy(&format!("- {{issuer: {ISS}, jwksUri: '{uri}'}}\n"), &store);
        // The first request waits for the first fetch.
        assert!(
            check(&p, &mut bearer(&token(&old, &claims())))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // The issuer rotates: a token with the new kid asks for a refetch.
        *doc.lock().unwrap() = (200, jwks(&[&new]));
        let t = token(&new, &claims());
        assert_eq!(
            check(&p, &mut bearer(&t)).await,
            Err(StatusCode::UNAUTHORIZED)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while check(&p, &mut bearer(&t)).await.is_err() {
            assert!(Instant::now() < deadline, "the new key never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // Unknown kids again within the throttle: no further fetch.
        let other = ec("other", Algorithm::ES256);
        for _ in 0..3 {
            assert!(
                check(&p, &mut bearer(&token(&other, &claims())))
                    .await
                    .is_err()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(hits.load(Ordering::SeqCst), 2, "throttled");
        // A failing server: the last good keys stay.
        *doc.lock().unwrap() = (500, String::new());
        store
            .remote(&uri, DEFAULT_FETCH_TIMEOUT)
            .shared
            .kick
            .notify_one();
        let deadline = Instant::now() + Duration::from_secs(5);
        while hits.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "no refetch");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(check(&p, &mut bearer(&t)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_provider_without_keys_refuses_after_its_timeout() {
        let s = ec("k", Algorithm::ES256);
        // Nothing trusted: the fetch cannot succeed.
        let p = policy(
            &format!("- {{issuer: {ISS}, jwksUri: 'https://127.0.0.1:9/keys', timeout: 200ms}}\n"),
            &Jwks::default(),
        );
        let started = Instant::now();
        assert_eq!(
            check(&p, &mut bearer(&token(&s, &claims()))).await,
            Err(StatusCode::UNAUTHORIZED)
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(check(&p, &mut parts("/", &[])).await, Ok(None));
    }
}
