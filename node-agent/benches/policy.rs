//! The waypoint's policy phases for one request, in process, with real inputs
//! (issue 21: "JWT + authz + local limit add ≤ 20 µs CPU per request"):
//!
//! - request authentication: `jwt::Policy::authenticate` on a request carrying
//!   a valid bearer token, ES256 (a P-256 key made by ring) and RS256 (the
//!   2048-bit test key of `src/http/testdata`), keys inline in the JWKS;
//! - authorization: one ALLOW policy of 100 rules for the service, for a
//!   request that only the last rule matches (every rule is evaluated) and
//!   for one no rule matches (denied: every rule is evaluated too);
//! - the three phases as the waypoint runs them (`engine::Engine::admit`):
//!   authenticate, hand the claims to authorization, decide, then the local
//!   rate limit keyed by the token's `sub`.
//!
//! `authenticate` and `Limiter::admit` are async, but with inline keys and a
//! local limit they never wait: each future is polled once with a no-op waker
//! (`std::task::Waker::noop`), which costs nothing next to a runtime's
//! `block_on`; a `Pending` would panic. Authorization uses
//! `Authz::denied`, the decision of `authz::admit` without the CUSTOM
//! providers it would ask (there are none here) and without the upstream
//! pool that asking needs.
//!
//! Each request's head is built outside the timing (`iter_batched`): the
//! phases take the token out of it.
//!
//! `cargo bench -p weft --bench policy` (add `-- --quick` for a short run).

use std::{
    hint::black_box,
    path::Path,
    pin::pin,
    sync::Arc,
    task::{Context as TaskContext, Poll, Waker},
    time::{SystemTime, UNIX_EPOCH},
};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::request::Parts;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::{
    rand::SystemRandom,
    signature::{self, KeyPair as _},
};
use serde_json::json;
use weft::{
    http::{
        authz::{Authz, RequestAuth, Settings},
        engine::Context,
        jwt::{self, Jwks},
        ratelimit::{Limiter, Policies},
        telemetry::Record,
    },
    model::Mesh,
    view::{Balancers, View},
};

const RSA_PEM: &str = include_str!("../src/http/testdata/rsa-2048.pem");
const ISS: &str = "https://issuer.example";

/// Polls a future that cannot wait here (inline keys, local limits) once.
fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut TaskContext::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a policy phase waited"),
    }
}

use weft::jwk::b64url as b64;

/// A signing key, and its public half as a JWK.
struct Signer {
    enc: EncodingKey,
    alg: Algorithm,
    kid: &'static str,
    jwk: serde_json::Value,
}

fn es256() -> Signer {
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let rng = SystemRandom::new();
    let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let public = pair.public_key().as_ref();
    Signer {
        enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
        alg: Algorithm::ES256,
        kid: "ec",
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": "ec", "use": "sig",
            "x": b64(&public[1..33]), "y": b64(&public[33..])}),
    }
}

fn rs256() -> Signer {
    let der = pem::parse(RSA_PEM).unwrap().into_contents();
    let pair = signature::RsaKeyPair::from_der(&der).unwrap();
    let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
    Signer {
        enc: EncodingKey::from_rsa_der(&der),
        alg: Algorithm::RS256,
        kid: "rsa",
        jwk: json!({"kty": "RSA", "kid": "rsa", "use": "sig",
            "n": b64(&public.n), "e": b64(&public.e)}),
    }
}

fn token(s: &Signer) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut h = Header::new(s.alg);
    h.kid = Some(s.kid.into());
    let claims = json!({"iss": ISS, "sub": "alice", "aud": ["web"], "iat": now,
        "exp": now + 24 * 3600, "group": "admins", "scope": "read write"});
    jsonwebtoken::encode(&h, &claims, &s.enc).unwrap()
}

/// Service `web` bound to waypoint `wp`, with a request authentication (both
/// keys inline), one ALLOW policy of 100 rules, and a local limit per `sub`
/// that never refuses.
fn mesh(signers: &[&Signer]) -> Mesh {
    let jwks = json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()});
    let mut rules = String::new();
    for i in 0..100 {
        rules.push_str(&format!(
            "  - from: [{{source: {{requestPrincipals: [\"{ISS}/*\"]}}}}]\n    \
             to: [{{operation: {{methods: [GET, HEAD], paths: [\"/api/v1/items{i}/*\", \"/api/v2/items{i}\"]}}}}]\n"
        ));
    }
    let yaml = format!(
        r#"
workloads:
- {{name: wp-0, node: n0, native_tunnel: true, labels: {{app: wp}}, addresses: [10.0.0.1]}}
- {{name: web-0, node: n0, labels: {{app: web}}, addresses: [10.0.0.2]}}
services:
- {{name: wp, addresses: [], ports: [], selector: {{app: wp}}}}
- {{name: web, addresses: [10.96.0.2], ports: [{{port: 80}}], selector: {{app: web}}, waypoint: wp}}
request_authentications:
- name: web-jwt
  targetRefs: [{{kind: Service, group: "", name: web}}]
  jwtRules:
  - issuer: {ISS}
    audiences: [web]
    jwks: '{jwks}'
authorization_policies:
- name: web-api
  targetRefs: [{{kind: Service, group: "", name: web}}]
  action: ALLOW
  rules:
{rules}rate_limits:
- name: per-user
  target_refs: [{{kind: Service, name: web}}]
  type: Local
  key: ["claim:sub"]
  rules: [{{limit: {{requests: 1000000000, unit: Second}}}}]
"#
    );
    weft::discovery::file::parse(Path::new("bench.yaml"), &yaml)
        .unwrap()
        .mesh
}

fn head(path: &str, token: &str) -> Parts {
    http::Request::get(path)
        .header("host", "web.default:80")
        .header("authorization", format!("Bearer {token}"))
        .header("user-agent", "curl/8.5.0")
        .header("accept", "*/*")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// What the authentication phase hands to authorization, as the engine does.
fn request_auth(a: jwt::Authenticated) -> RequestAuth {
    let audiences = match &a.claims["aud"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(list) => list
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let presenter = a.claims["azp"].as_str().map(str::to_owned);
    RequestAuth {
        principal: a.principal,
        audiences,
        presenter,
        claims: a.claims,
    }
}

struct Waypoint {
    ctx: Context,
    authn: Arc<jwt::Policy>,
    authz: Authz,
    settings: Settings,
    limits: Policies,
    limiter: Limiter,
}

impl Waypoint {
    /// The three phases for one request; `Err` names the one that refused.
    fn admit(&self, parts: &mut Parts) -> Result<(), &'static str> {
        if let Some(a) = ready(self.authn.authenticate(parts)).map_err(|_| "authn")? {
            parts.extensions.insert(request_auth(a));
        }
        if self
            .authz
            .denied(&self.settings, &self.ctx, parts)
            .is_some()
        {
            return Err("authz");
        }
        let mut record = Record::default();
        ready(
            self.limiter
                .admit(&self.limits, &self.ctx, parts, &mut record),
        )
        .map_err(|_| "ratelimit")
    }
}

fn bench(c: &mut Criterion) {
    let (ec, rsa) = (es256(), rs256());
    let mesh = mesh(&[&ec, &rsa]);
    let svc = mesh.services.iter().find(|s| s.name == "web").unwrap();
    let waypoint = mesh.waypoint_of(svc);
    let port = svc.ports[0].clone();
    let wp = Waypoint {
        ctx: Context::new(
            Some("spiffe://cluster.local/ns/front/sa/ui".parse().unwrap()),
            "10.1.0.9".parse().unwrap(),
            Arc::new(svc.clone()),
            port,
        ),
        authn: jwt::Policy::compile(&mesh, svc, waypoint.as_ref(), &Jwks::default())
            .expect("the request authentication compiles"),
        authz: Authz::new(&mesh),
        settings: Settings::default(),
        limits: Policies::new(&View::new(mesh.clone(), "n0", &Balancers::default())),
        limiter: Limiter::new(None),
    };
    let tokens = [("es256", token(&ec)), ("rs256", token(&rsa))];
    const LAST: &str = "/api/v1/items99/42";
    const NONE: &str = "/internal/metrics";

    for (alg, token) in &tokens {
        c.bench_function(&format!("policy/jwt/{alg}"), |b| {
            b.iter_batched(
                || head(LAST, token),
                |mut parts| {
                    let a = ready(wp.authn.authenticate(&mut parts));
                    black_box(a.expect("the token verifies").expect("a principal"))
                },
                BatchSize::SmallInput,
            )
        });
    }

    // The floor: ring's signature check alone, on a message of a token's size.
    let msg = token(&ec).into_bytes();
    let rng = SystemRandom::new();
    let p256 =
        signature::EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
    let p256 = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        p256.as_ref(),
        &rng,
    )
    .unwrap();
    let sig = p256.sign(&rng, &msg).unwrap();
    let public = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_FIXED,
        p256.public_key().as_ref().to_vec(),
    );
    c.bench_function("policy/ring_verify_only/es256", |b| {
        b.iter(|| {
            public
                .verify(black_box(&msg), black_box(sig.as_ref()))
                .unwrap()
        })
    });
    let der = pem::parse(RSA_PEM).unwrap().into_contents();
    let pair = signature::RsaKeyPair::from_der(&der).unwrap();
    let mut sig = vec![0; pair.public().modulus_len()];
    pair.sign(&signature::RSA_PKCS1_SHA256, &rng, &msg, &mut sig)
        .unwrap();
    let public = signature::UnparsedPublicKey::new(
        &signature::RSA_PKCS1_2048_8192_SHA256,
        pair.public().as_ref().to_vec(),
    );
    c.bench_function("policy/ring_verify_only/rs256", |b| {
        b.iter(|| public.verify(black_box(&msg), black_box(&sig)).unwrap())
    });

    // Authorization alone: the claims the token would give, already in place.
    let authed = |path: &str| {
        let mut parts = head(path, &tokens[0].1);
        let a = ready(wp.authn.authenticate(&mut parts)).unwrap().unwrap();
        parts.extensions.insert(request_auth(a));
        parts
    };
    let last = authed(LAST);
    assert_eq!(wp.authz.denied(&wp.settings, &wp.ctx, &last), None);
    c.bench_function("policy/authz/100_rules/last_matches", |b| {
        b.iter(|| black_box(wp.authz.denied(&wp.settings, &wp.ctx, black_box(&last))))
    });
    let none = authed(NONE);
    assert!(wp.authz.denied(&wp.settings, &wp.ctx, &none).is_some());
    c.bench_function("policy/authz/100_rules/none_matches", |b| {
        b.iter(|| black_box(wp.authz.denied(&wp.settings, &wp.ctx, black_box(&none))))
    });

    for (alg, token) in &tokens {
        assert_eq!(wp.admit(&mut head(LAST, token)), Ok(()));
        c.bench_function(&format!("policy/all/{alg}"), |b| {
            b.iter_batched(
                || head(LAST, token),
                |mut parts| black_box(wp.admit(&mut parts)),
                BatchSize::SmallInput,
            )
        });
    }
    // The local limit alone, as the waypoint calls it (key from the claims).
    let limited = authed(LAST);
    c.bench_function("policy/ratelimit/local_by_claim", |b| {
        b.iter(|| {
            let mut record = Record::default();
            black_box(
                ready(
                    wp.limiter
                        .admit(&wp.limits, &wp.ctx, black_box(&limited), &mut record),
                )
                .is_ok(),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
