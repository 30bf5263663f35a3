//! Kubernetes service-account tokens: how agents prove their node to the CA in
//! a cluster, in place of the local mode's node-token file ([`super::tokens`]).
//!
//! Each agent pod mounts a projected ServiceAccount token whose audience is the
//! CA's (`--token-audience`, `weft-ca` by default) and presents it as
//! `authorization: Bearer <token>`. The kubelet rewrites the file before the
//! token expires, so the agent reads it at each call. The CA accepts a token
//! only if:
//!
//! - it verifies: its signature with the service-account issuer's public keys
//!   (`/openid/v1/jwks` of the API server, or a JWKS file), its `iss`, one of its
//!   `aud` the CA's audience, `exp` and `nbf` with a minute of skew; or, in the
//!   `token-review` mode, the API server says so (a TokenReview, which also
//!   fails once the pod the token is bound to is gone);
//! - it is the agent's service account (`system:serviceaccount:<ns>:<sa>`,
//!   `--agent-service-account`, `weft-system/weft-agent` by default): a token of
//!   any other service account proves nothing about a node;
//! - it is bound to a pod (a token requested for a pod, as the kubelet's
//!   projection makes; a long-lived Secret token is not) and names that pod's
//!   node: Kubernetes 1.30 and later put `kubernetes.io.node` in pod-bound
//!   tokens, and the TokenReview's `extra` carries the same.
//!
//! The node it names is what the CA then signs for: only identities of pods the
//! model schedules there ([`super::server`]'s `authorize`).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::Validation;
use serde_json::Value;
use tracing::{info, warn};

use crate::jwk::{self, Invalid, KeySet};

/// Clock skew allowed on `exp` and `nbf`.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// How often the issuer's keys are fetched again.
const REFRESH: Duration = Duration::from_secs(300);
/// A token naming a key the set lacks triggers a fetch at most this often.
const REFETCH_THROTTLE: Duration = Duration::from_secs(10);
/// The largest JWKS document read.
const MAX_JWKS_BYTES: usize = 256 << 10;
/// How long a TokenReview's answer is reused for the same token, and for how
/// many tokens: agents call the CA a few times per rotation, so this only
/// spares the API server a burst (an agent starting with many pods).
const REVIEW_CACHE_TTL: Duration = Duration::from_secs(30);
const REVIEW_CACHE_MAX: usize = 1024;
/// The longest token looked at.
const MAX_TOKEN_BYTES: usize = 16 << 10;

/// Where the keys that sign service-account tokens come from, or who checks
/// the tokens instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Verify locally, with the issuer's JWKS fetched from the API server
    /// (`GET /openid/v1/jwks`, which every service account may read).
    ApiServerJwks,
    /// Verify locally, with the JWKS in this file (read again on a refresh or
    /// an unknown key id).
    JwksFile(PathBuf),
    /// Ask the API server (a TokenReview per token, cached briefly).
    TokenReview,
}

#[derive(Debug, Clone)]
pub struct SaOptions {
    pub check: Check,
    /// The service-account issuer (`iss`), as the API server's
    /// `--service-account-issuer` says; not checked with `TokenReview`.
    pub issuer: String,
    /// The audience the agents' tokens are projected for.
    pub audience: String,
    /// The agents' service account: namespace and name.
    pub agent_namespace: String,
    pub agent_service_account: String,
}

/// The agent pod a token was issued to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub node: String,
    pub pod: String,
    pub pod_uid: String,
    /// `None` for the agents' service account. `Some((namespace, account))`
    /// for any other: a workload's own token (a waypoint's, which speaks
    /// HBONE itself and asks for its certificate), which may have only its own
    /// identity, and only as the pod the token is bound to.
    pub own: Option<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Kubernetes client: {0}")]
    Client(String),
    #[error("the service-account JWKS: {0}")]
    Jwks(String),
}

/// Checks agents' service-account tokens.
pub struct SaVerifier {
    opts: SaOptions,
    inner: Inner,
}

enum Inner {
    Jwks(Arc<Keys>),
    Review {
        client: kube::Client,
        cache: Mutex<HashMap<[u8; 32], (AgentPod, Instant)>>,
    },
}

/// The issuer's keys in force, and a way to ask for a fetch.
struct Keys {
    current: RwLock<Option<Arc<KeySet>>>,
    refetch: tokio::sync::Notify,
}

impl SaVerifier {
    /// Starts checking tokens per `opts`; `client` is required unless the keys
    /// come from a file. With a JWKS, the first fetch is waited for, so a CA
    /// that cannot get the keys says so at start rather than refusing every
    /// agent.
    pub async fn start(opts: SaOptions, client: Option<kube::Client>) -> Result<Self, Error> {
        let need_client = || {
            client
                .clone()
                .ok_or_else(|| Error::Client("no Kubernetes client for this mode".into()))
        };
        let inner = match &opts.check {
            Check::TokenReview => Inner::Review {
                client: need_client()?,
                cache: Mutex::new(HashMap::new()),
            },
            check => {
                let source = match check {
                    Check::JwksFile(path) => Source::File(path.clone()),
                    _ => Source::ApiServer(need_client()?),
                };
                let first = source.fetch().await.map_err(Error::Jwks)?;
                info!(keys = first.len(), from = %source, "service-account keys loaded");
                let keys = Arc::new(Keys {
                    current: RwLock::new(Some(Arc::new(first))),
                    refetch: tokio::sync::Notify::new(),
                });
                tokio::spawn(keep_keys(source, Arc::downgrade(&keys)));
                Inner::Jwks(keys)
            }
        };
        Ok(SaVerifier { opts, inner })
    }

    /// The agent pod `token` was issued to, or why it proves nothing.
    pub async fn agent_of(&self, token: &[u8]) -> Result<AgentPod, String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!("the token is over {MAX_TOKEN_BYTES} bytes"));
        }
        let token = std::str::from_utf8(token).map_err(|_| "the token is not UTF-8")?;
        match &self.inner {
            Inner::Jwks(keys) => self.verify_locally(token, keys),
            Inner::Review { client, cache } => {
                let key = digest(token);
                if let Some((pod, at)) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
                    && at.elapsed() < REVIEW_CACHE_TTL
                {
                    return Ok(pod.clone());
                }
                let pod = self.review(client, token).await?;
                let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= REVIEW_CACHE_MAX {
                    cache.retain(|_, (_, at)| at.elapsed() < REVIEW_CACHE_TTL);
                    if cache.len() >= REVIEW_CACHE_MAX {
                        cache.clear();
                    }
                }
                cache.insert(key, (pod.clone(), Instant::now()));
                Ok(pod)
            }
        }
    }

    fn verify_locally(&self, token: &str, keys: &Keys) -> Result<AgentPod, String> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "not a JWT (or alg none)".to_string())?;
        if !jwk::ALLOWED.contains(&header.alg) {
            return Err(format!("algorithm {:?} is refused", header.alg));
        }
        let set = keys
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or("no service-account keys")?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.opts.issuer]);
        validation.set_audience(&[&self.opts.audience]);
        let claims = set.verify(token, &header, &validation).map_err(|e| {
            if matches!(e, Invalid::NoKey) && header.kid.as_ref().is_some_and(|k| !set.has_kid(k)) {
                // Perhaps the issuer rotated its keys: fetch them again soon.
                keys.refetch.notify_one();
            }
            match e {
                Invalid::Other(why) if why.contains("InvalidIssuer") => {
                    format!("the issuer is not {:?}", self.opts.issuer)
                }
                Invalid::Other(why) if why.contains("InvalidAudience") => {
                    format!("the audience is not {:?}", self.opts.audience)
                }
                e => format!("the token does not verify: {e}"),
            }
        })?;
        agent_pod(&claims, &self.opts)
    }

    async fn review(&self, client: &kube::Client, token: &str) -> Result<AgentPod, String> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.opts.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| {
                warn!(error = %e, "TokenReview failed");
                format!("the API server could not review the token: {e}")
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(format!(
                "the API server does not accept the token: {}",
                status.error.as_deref().unwrap_or("no reason given")
            ));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.opts.audience))
        {
            return Err(format!("the audience is not {:?}", self.opts.audience));
        }
        let user = status.user.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| {
            extra
                .get(&format!("authentication.kubernetes.io/{k}"))
                .and_then(|v| v.first())
                .cloned()
        };
        check_agent(
            user.username.as_deref().unwrap_or_default(),
            first("pod-name"),
            first("pod-uid"),
            first("node-name"),
            &self.opts,
        )
    }
}

/// The agent pod of verified claims, if they are the agent's service account
/// and bound to a pod and its node.
fn agent_pod(claims: &Value, opts: &SaOptions) -> Result<AgentPod, String> {
    let k8s = &claims["kubernetes.io"];
    let s = |v: &Value| v.as_str().map(str::to_owned);
    check_agent(
        claims["sub"].as_str().unwrap_or_default(),
        s(&k8s["pod"]["name"]),
        s(&k8s["pod"]["uid"]),
        s(&k8s["node"]["name"]),
        opts,
    )
}

fn check_agent(
    username: &str,
    pod: Option<String>,
    pod_uid: Option<String>,
    node: Option<String>,
    opts: &SaOptions,
) -> Result<AgentPod, String> {
    let (ns, sa) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| format!("the token is {username:?}'s, not a service account's"))?;
    let own = (ns != opts.agent_namespace || sa != opts.agent_service_account)
        .then(|| (ns.to_owned(), sa.to_owned()));
    let (Some(pod), Some(pod_uid)) = (pod, pod_uid) else {
        return Err(
            "the token is not bound to a pod (use a projected service-account token, not a \
             Secret's)"
                .into(),
        );
    };
    let node = node.filter(|n| !n.is_empty()).ok_or(
        "the token names no node (Kubernetes puts the node in pod-bound tokens from 1.30 on)",
    )?;
    Ok(AgentPod {
        node,
        pod,
        pod_uid,
        own,
    })
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Where the keys are fetched from.
enum Source {
    ApiServer(kube::Client),
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::ApiServer(_) => f.write_str("the API server's /openid/v1/jwks"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Source {
    async fn fetch(&self) -> Result<KeySet, String> {
        let text = match self {
            Source::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if text.len() > MAX_JWKS_BYTES {
                    return Err(format!("{}: over {MAX_JWKS_BYTES} bytes", path.display()));
                }
                text
            }
            Source::ApiServer(client) => {
                let request = http::Request::get("/openid/v1/jwks")
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                let text = client
                    .request_text(request)
                    .await
                    .map_err(|e| format!("GET /openid/v1/jwks: {e}"))?;
                if text.len() > MAX_JWKS_BYTES {
                    return Err(format!("/openid/v1/jwks: over {MAX_JWKS_BYTES} bytes"));
                }
                text
            }
        };
        KeySet::parse(&text).map_err(|e| format!("{self}: {e}"))
    }
}

/// Fetches the keys again every [`REFRESH`], and when a token names an unknown
/// key (at most every [`REFETCH_THROTTLE`]); a failed fetch keeps the last good
/// set. Ends with the verifier.
async fn keep_keys(source: Source, keys: std::sync::Weak<Keys>) {
    loop {
        let Some(k) = keys.upgrade() else { return };
        let _ = tokio::time::timeout(REFRESH, k.refetch.notified()).await;
        match source.fetch().await {
            Ok(set) => {
                *k.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
            }
            Err(e) => {
                warn!(error = %e, "service-account keys not refreshed; the last good ones stay")
            }
        }
        drop(k);
        tokio::time::sleep(REFETCH_THROTTLE).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;

    /// An RSA key and the JWKS of its public half, as the API server signs
    /// service-account tokens (RS256).
    pub(crate) struct Issuer {
        enc: EncodingKey,
        pub jwks: String,
        kid: String,
    }

    impl Issuer {
        pub(crate) fn new(kid: &str) -> Issuer {
            let der = pem::parse(include_str!("../http/testdata/rsa-2048.pem"))
                .unwrap()
                .into_contents();
            let pair = ring::signature::RsaKeyPair::from_der(&der).unwrap();
            let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(
                ring::signature::KeyPair::public_key(&pair),
            );
            let b64 = crate::jwk::b64url;
            let jwks = json!({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                "n": b64(&public.n), "e": b64(&public.e)}]})
            .to_string();
            Issuer {
                enc: EncodingKey::from_rsa_der(&der),
                jwks,
                kid: kid.into(),
            }
        }

        pub(crate) fn sign(&self, claims: &Value) -> String {
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&h, claims, &self.enc).unwrap()
        }
    }

    pub(crate) const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    /// The claims of a projected token of agent pod `pod` on `node`, as the
    /// API server (1.30+) mints them.
    pub(crate) fn claims(node: &str, pod: &str) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({
            "aud": ["weft-ca"],
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "jti": "8c4f2d0e-0a4b-4f0e-9d2b-4b8d2e1c7a11",
            "kubernetes.io": {
                "namespace": "weft-system",
                "node": {"name": node, "uid": "6f1d3a2b-node"},
                "pod": {"name": pod, "uid": format!("uid-{pod}")},
                "serviceaccount": {"name": "weft-agent", "uid": "0e9f8a7b-sa"}
            },
            "sub": "system:serviceaccount:weft-system:weft-agent"
        })
    }

    pub(crate) fn options(check: Check) -> SaOptions {
        SaOptions {
            check,
            issuer: ISSUER.into(),
            audience: "weft-ca".into(),
            agent_namespace: "weft-system".into(),
            agent_service_account: "weft-agent".into(),
        }
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    async fn verifier(issuer: &Issuer) -> (SaVerifier, Dir) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("weft-satoken-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        std::fs::write(&path, &issuer.jwks).unwrap();
        let v = SaVerifier::start(options(Check::JwksFile(path)), None)
            .await
            .unwrap();
        (v, Dir(dir))
    }

    #[tokio::test]
    async fn a_projected_agent_token_names_its_pod_and_node() {
        let issuer = Issuer::new("k1");
        let (v, _dir) = verifier(&issuer).await;
        let token = issuer.sign(&claims("node-a", "weft-agent-x7k2p"));
        let pod = v.agent_of(token.as_bytes()).await.unwrap();
        assert_eq!(
            pod,
            AgentPod {
                node: "node-a".into(),
                pod: "weft-agent-x7k2p".into(),
                pod_uid: "uid-weft-agent-x7k2p".into(),
                own: None,
            }
        );
        // Another service account's token: that workload's own.
        let mut c = claims("node-a", "wp-5d9f");
        c["sub"] = json!("system:serviceaccount:shop:waypoint");
        let pod = v.agent_of(issuer.sign(&c).as_bytes()).await.unwrap();
        assert_eq!(pod.own, Some(("shop".into(), "waypoint".into())));
    }

    #[tokio::test]
    async fn tokens_that_prove_no_agent_node_are_refused_with_the_reason() {
        let issuer = Issuer::new("k1");
        let (v, _dir) = verifier(&issuer).await;
        let now = jsonwebtoken::get_current_timestamp();
        type Change = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "audience",
                Box::new(|c| c["aud"] = json!(["https://kubernetes.default.svc"])),
            ),
            (
                "issuer",
                Box::new(|c| c["iss"] = json!("https://evil.example")),
            ),
            ("expired", Box::new(move |c| c["exp"] = json!(now - 600))),
            (
                "not valid yet",
                Box::new(move |c| c["nbf"] = json!(now + 600)),
            ),
            (
                "not a service account's",
                Box::new(|c| c["sub"] = json!("system:admin")),
            ),
            (
                "not bound to a pod",
                Box::new(|c| {
                    c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
                }),
            ),
            (
                "names no node",
                Box::new(|c| {
                    c["kubernetes.io"].as_object_mut().unwrap().remove("node");
                }),
            ),
        ];
        for (why, change) in cases {
            let mut c = claims("node-a", "weft-agent-x7k2p");
            change(&mut c);
            let err = v.agent_of(issuer.sign(&c).as_bytes()).await.unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
        // Another key, the same kid: the signature does not hold.
        let forged = {
            let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &ring::rand::SystemRandom::new(),
            )
            .unwrap();
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some("k1".into());
            jsonwebtoken::encode(
                &h,
                &claims("node-a", "p"),
                &EncodingKey::from_ec_der(pkcs8.as_ref()),
            )
            .unwrap()
        };
        let err = v.agent_of(forged.as_bytes()).await.unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        // alg none, garbage, and a huge token.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIn0",
            "eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6d2VmdC1zeXN0ZW06d2VmdC1hZ2VudCJ9"
        );
        assert!(v.agent_of(none.as_bytes()).await.is_err());
        assert!(v.agent_of(b"not a token").await.is_err());
        assert!(v.agent_of(&vec![b'a'; MAX_TOKEN_BYTES + 1]).await.is_err());
    }

    /// The API-server calls the CA makes, `GET /openid/v1/jwks` and `POST
    /// .../tokenreviews`, answered as the API server does (the TokenReview
    /// accepts `good` tokens only, with the `extra` of a pod-bound token),
    /// over real TLS to real kube-rs ([`super::super::testapi`]); the calls
    /// seen.
    async fn api_server(jwks: String) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
        super::super::testapi::serve(move |parts, body| {
            (200, answer(&jwks, parts.uri.path(), body))
        })
        .await
    }

    fn answer(jwks: &str, path: &str, body: &[u8]) -> String {
        match path {
            "/openid/v1/jwks" => jwks.to_owned(),
            "/apis/authentication.k8s.io/v1/tokenreviews" => {
                let review: Value = serde_json::from_slice(body).unwrap();
                let mut out = review.clone();
                out["status"] = if review["spec"]["token"] == "good" {
                    json!({"authenticated": true, "audiences": review["spec"]["audiences"],
                    "user": {"username": "system:serviceaccount:weft-system:weft-agent",
                        "uid": "0e9f8a7b-sa",
                        "groups": ["system:serviceaccounts", "system:authenticated"],
                        "extra": {
                            "authentication.kubernetes.io/credential-id": ["JTI=8c4f"],
                            "authentication.kubernetes.io/node-name": ["node-b"],
                            "authentication.kubernetes.io/node-uid": ["6f1d"],
                            "authentication.kubernetes.io/pod-name": ["weft-agent-q2w3e"],
                            "authentication.kubernetes.io/pod-uid": ["a1b2"]}}})
                } else {
                    json!({"user": {}, "error": "[invalid bearer token, service account token has been invalidated]"})
                };
                out.to_string()
            }
            _ => String::from("{}"),
        }
    }

    #[tokio::test]
    async fn the_issuers_keys_come_from_the_api_server() {
        let issuer = Issuer::new("k9");
        let (client, seen) = api_server(issuer.jwks.clone()).await;
        let v = SaVerifier::start(options(Check::ApiServerJwks), Some(client))
            .await
            .unwrap();
        let token = issuer.sign(&claims("node-c", "weft-agent-zz9"));
        assert_eq!(v.agent_of(token.as_bytes()).await.unwrap().node, "node-c");
        assert_eq!(*seen.lock().unwrap(), ["GET /openid/v1/jwks"]);
    }

    #[tokio::test]
    async fn a_token_review_names_the_node_and_a_refusal_is_final() {
        let (client, seen) = api_server(String::new()).await;
        let v = SaVerifier::start(options(Check::TokenReview), Some(client))
            .await
            .unwrap();
        let pod = v.agent_of(b"good").await.unwrap();
        assert_eq!(
            (pod.node.as_str(), pod.pod.as_str()),
            ("node-b", "weft-agent-q2w3e")
        );
        // Cached: a second call does not ask again.
        v.agent_of(b"good").await.unwrap();
        let err = v.agent_of(b"stale").await.unwrap_err();
        assert!(err.contains("invalidated"), "{err}");
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_token_review_answer_is_read_as_the_api_server_writes_it() {
        let opts = options(Check::TokenReview);
        let ok = check_agent(
            "system:serviceaccount:weft-system:weft-agent",
            Some("weft-agent-x7k2p".into()),
            Some("u1".into()),
            Some("node-a".into()),
            &opts,
        );
        assert_eq!(ok.unwrap().node, "node-a");
        assert!(
            check_agent(
                "system:serviceaccount:weft-system:weft-agent",
                Some("p".into()),
                Some("u".into()),
                None,
                &opts
            )
            .is_err()
        );
    }
}
