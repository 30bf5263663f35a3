//! Rate limiting at the waypoint, the third policy phase (after request
//! authentication and authorization): Envoy Gateway's local and global rate
//! limits (`model::ratelimit` has the shape and where it differs).
//!
//! Which policies apply to a request for service S: those whose `target_refs`
//! name S (a `Service` of the policy's namespace), and those naming the
//! HTTPRoute the request matched. Each target, rule and key has its own
//! bucket. Every matching rule of every policy is charged; the first refusal
//! of a policy not in shadow mode answers.
//!
//! The algorithm is GCRA (the generic cell rate algorithm): a bucket is one
//! number, its theoretical arrival time (TAT). A request at `now` is let
//! through when `max(TAT, now) + T - now <= burst * T` (T = the unit divided
//! by the requests), and then moves TAT by T. A bucket whose TAT is past is
//! the same as no bucket at all, which is what lets the local store evict
//! freely.
//!
//! Local limits are ours, not `governor`'s: its keyed limiter has no cap on
//! distinct keys (only a `retain_recent` sweep someone must call), and it
//! brings dashmap, quanta, futures-timer, nonzero_ext and spinning_top; GCRA
//! itself is twenty lines. The store is sharded mutexes over hashes of keys,
//! at most [`MAX_KEYS`] buckets (see [`Buckets`]).
//!
//! Global limits run the same GCRA in Redis, in one Lua script for all of a
//! request's global buckets (one call per request at most), with Redis's
//! clock so replicas agree. The client is ours too (EVALSHA, EVAL on
//! NOSCRIPT, PING over RESP2): the `redis` crate with `tokio-comp` brings
//! combine, url, futures-util, tokio-util, arc-swap and sha1_smol for three
//! commands. It pipelines: two connections, each driven by a task that writes
//! every call queued since its last write in one write and hands the replies
//! back in order (see [`Redis`]), so a request waits for one Redis round trip
//! when idle and shares it with the others under load, with no pool of
//! connections for Redis to juggle. A refusal is remembered (the negative
//! cache) until its retry-after, so a client over its limit costs no Redis
//! call. And a hot bucket with a large burst is leased: Redis grants a few
//! of its requests ahead (as many as the bucket saw in the last 20 ms, at
//! most a twentieth of its burst), the requests that follow are admitted
//! here without a call, and the lease is topped up in the background when
//! half is used (see [`Leases`]: what that costs the limit's precision,
//! which is never to admit more).
//!
//! Answers: 429 with `Retry-After`, `RateLimit-Policy` and `RateLimit`
//! (draft-ietf-httpapi-ratelimit-headers-10's structured fields) and, as an
//! option, `X-RateLimit-*`; the record's flags are `RL`. When Redis fails and
//! the policy fails closed: 500 and `RLSE`, as Envoy's `failure_mode_deny`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    hash::{BuildHasher, Hasher},
    net::IpAddr,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{debug, info, warn};

use super::{Body, authz::RequestAuth, engine::Context, telemetry::Record, upstream::full};
use crate::model::{
    IpNet, ServiceKey,
    ratelimit::{
        DEFAULT_TIMEOUT, FailureMode, HeaderMatchType, KeyPart, LimitType, RateLimitPolicy,
        SourceMatchType,
    },
};
use crate::view::View;

/// The most buckets the local store holds, all policies together.
pub const MAX_KEYS: usize = 100_000;
/// The most keys the negative cache holds.
const MAX_NEGATIVE: usize = 10_000;

// ---- GCRA ----------------------------------------------------------------------

/// One limit, as GCRA sees it: nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// T: the time one request costs.
    pub interval: u64,
    /// burst × T: how far ahead of now a bucket's TAT may run.
    pub tolerance: u64,
}

/// What a bucket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Requests that could still go now (after this one, if allowed).
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// When refused: until one request may go.
    pub retry_after: Duration,
}

impl Gcra {
    /// T in µs, as Redis counts (at least 1).
    fn interval_us(&self) -> u64 {
        (self.interval / 1000).max(1)
    }

    /// The args of [`SCRIPT`] for this limit, asking for `n` requests.
    pub fn args(&self, n: u64) -> [String; 3] {
        [
            self.interval_us().to_string(),
            (self.tolerance / 1000).to_string(),
            n.to_string(),
        ]
    }

    /// The most a lease of this bucket may hold ([`Leases`]).
    fn lease_max(&self) -> u64 {
        (self.tolerance / self.interval / LEASE_SHARE).min(MAX_LEASE)
    }

    /// `requests` per `per`, `burst` at once (at least 1), each divided by
    /// `divide` (the replicas sharing the limit; the result at least 1).
    pub fn new(requests: u32, per: Duration, burst: u32, divide: u32) -> Gcra {
        let divide = u64::from(divide.max(1));
        let requests = (u64::from(requests) / divide).max(1);
        let burst = (u64::from(burst) / divide).max(1);
        let interval = (per.as_nanos() as u64 / requests).max(1);
        Gcra {
            interval,
            tolerance: interval.saturating_mul(burst),
        }
    }

    /// The decision for a bucket at `tat` at time `now`, and its new TAT.
    pub fn check(&self, tat: u64, now: u64) -> (Outcome, u64) {
        let new = tat.max(now) + self.interval;
        let ahead = new - now;
        if ahead > self.tolerance {
            let retry = ahead - self.tolerance;
            let out = Outcome {
                allowed: false,
                remaining: 0,
                reset: Duration::from_nanos(tat.saturating_sub(now)),
                retry_after: Duration::from_nanos(retry),
            };
            return (out, tat);
        }
        let out = Outcome {
            allowed: true,
            remaining: (self.tolerance - ahead) / self.interval,
            reset: Duration::from_nanos(ahead),
            retry_after: Duration::ZERO,
        };
        (out, new)
    }
}

// ---- the local store ---------------------------------------------------------

const SHARDS: usize = 16;

/// Local buckets: a key's hash → its TAT (ns since the store's epoch), in
/// shards so requests on different keys rarely meet on a lock.
///
/// Bounded: a shard at its share of the cap first drops the buckets whose
/// TAT is past (they hold nothing); if it is still above seven eighths full,
/// it drops the eighth with the oldest TATs (the closest to full, so the
/// least leniency given away). No peer can grow it past the cap, and the
/// cost of a sweep is paid once per eighth of a shard's inserts.
pub struct Buckets {
    shards: Box<[Mutex<HashMap<u64, u64>>]>,
    per_shard: usize,
    hasher: std::hash::RandomState,
    epoch: Instant,
}

impl Buckets {
    pub fn new(max_keys: usize) -> Buckets {
        Buckets {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (max_keys / SHARDS).max(8),
            hasher: std::hash::RandomState::new(),
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds since the store's epoch.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The hash of a key, as the store indexes it (random per process, so a
    /// peer cannot aim keys at one shard or one hash).
    pub fn hash(&self, key: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(key);
        h.finish()
    }

    pub fn check(&self, key: u64, gcra: &Gcra, now: u64) -> Outcome {
        let mut shard = self.shards[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let tat = shard.get(&key).copied().unwrap_or(0);
        let (out, new) = gcra.check(tat, now);
        if out.allowed {
            if shard.len() >= self.per_shard && !shard.contains_key(&key) {
                evict(&mut shard, self.per_shard, now);
            }
            shard.insert(key, new);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn evict(shard: &mut HashMap<u64, u64>, cap: usize, now: u64) {
    shard.retain(|_, tat| *tat > now);
    if shard.len() < cap - cap / 8 {
        return;
    }
    let mut tats: Vec<u64> = shard.values().copied().collect();
    let nth = cap / 8;
    let (_, cut, _) = tats.select_nth_unstable(nth);
    let cut = *cut;
    shard.retain(|_, tat| *tat > cut);
}

// ---- compiled policies -----------------------------------------------------------

/// The rate limits of one mesh, compiled; part of the engine's `Config`.
#[derive(Default)]
pub struct Policies {
    policies: Vec<Policy>,
    by_service: HashMap<ServiceKey, Vec<usize>>,
    /// By the route's namespace and name.
    by_route: HashMap<(String, String), Vec<usize>>,
    /// The replicas of each bound service's waypoint, for `divide_by_replicas`.
    replicas: HashMap<ServiceKey, u32>,
}

struct Policy {
    /// `namespace/name`.
    id: Arc<str>,
    /// The name, as the `RateLimit` fields name it.
    name: String,
    kind: LimitType,
    rules: Vec<Rule>,
    key: Vec<KeyPart>,
    shadow: bool,
    divide: bool,
    failure_mode: FailureMode,
    timeout: Duration,
    x_headers: bool,
    counters: Arc<Counters>,
}

struct Rule {
    selectors: Vec<Selector>,
    requests: u32,
    unit: Duration,
    burst: u32,
}

struct Selector {
    headers: Vec<(HeaderName, HeaderTest)>,
    source: Option<(IpNet, SourceMatchType)>,
}

enum HeaderTest {
    Exact(String),
    Regex(regex::Regex),
    Distinct,
}

impl Policies {
    /// The limits of `view`'s mesh.
    pub fn new(view: &View) -> Policies {
        let mesh = view.config();
        let mut p = Policies::default();
        for m in &mesh.rate_limits {
            let Some(policy) = Policy::compile(m) else {
                warn!(policy = %format!("{}/{}", m.namespace, m.name), "rate limit left out: invalid");
                continue;
            };
            let index = p.policies.len();
            p.policies.push(policy);
            for t in &m.target_refs {
                let key = (m.namespace.clone(), t.name.clone());
                match t.kind.as_str() {
                    "Service" => p.by_service.entry(key).or_default().push(index),
                    "HTTPRoute" => p.by_route.entry(key).or_default().push(index),
                    _ => {}
                }
            }
        }
        if p.policies.iter().any(|p| p.divide) {
            p.replicas = Policies::replicas(view);
        }
        p
    }

    /// Per service bound to a waypoint, how many replicas its waypoint has
    /// (its endpoints in `view`), at least 1.
    fn replicas(view: &View) -> HashMap<ServiceKey, u32> {
        view.config()
            .services
            .iter()
            .filter_map(|svc| {
                let (wp, _) = view.waypoint_of(svc)?;
                let n = view.endpoint_workloads(wp).len().max(1);
                Some((svc.key(), n as u32))
            })
            .collect()
    }

    /// Whether these policies hold for `view` as they are: no limit is
    /// divided among replicas, or their numbers did not change.
    pub fn hold_for(&self, view: &View) -> bool {
        !self.policies.iter().any(|p| p.divide) || self.replicas == Policies::replicas(view)
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

impl Policy {
    fn compile(m: &RateLimitPolicy) -> Option<Policy> {
        let id: Arc<str> = format!("{}/{}", m.namespace, m.name).into();
        let mut rules = Vec::new();
        for r in &m.rules {
            let mut selectors = Vec::new();
            for s in &r.client_selectors {
                let mut headers = Vec::new();
                for h in &s.headers {
                    let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                    let test = match (h.kind, &h.value) {
                        (HeaderMatchType::Distinct, _) => HeaderTest::Distinct,
                        (HeaderMatchType::Exact, Some(v)) => HeaderTest::Exact(v.clone()),
                        (HeaderMatchType::RegularExpression, Some(v)) => {
                            HeaderTest::Regex(crate::model::route::compile_regex(v).ok()?)
                        }
                        (_, None) => return None,
                    };
                    headers.push((name, test));
                }
                let source = match &s.source_cidr {
                    Some(src) => Some((src.value.parse().ok()?, src.kind)),
                    None => None,
                };
                selectors.push(Selector { headers, source });
            }
            rules.push(Rule {
                selectors,
                requests: r.limit.requests,
                unit: r.limit.unit.duration(),
                burst: r.burst.unwrap_or(r.limit.requests),
            });
        }
        let key = m
            .key
            .iter()
            .map(|k| KeyPart::parse(k).ok())
            .collect::<Option<Vec<_>>>()?;
        Some(Policy {
            counters: counters(&id),
            id,
            name: m.name.clone(),
            kind: m.kind,
            rules,
            key,
            shadow: m.shadow,
            divide: m.divide_by_replicas,
            failure_mode: m.failure_mode,
            timeout: m.timeout.unwrap_or(DEFAULT_TIMEOUT),
            x_headers: m.x_ratelimit_headers,
        })
    }
}

/// What a request is keyed and matched on.
pub struct Attributes<'a> {
    pub peer: Option<String>,
    pub source_ip: IpAddr,
    pub parts: &'a http::request::Parts,
}

impl Selector {
    /// Whether it holds, and what it adds to the bucket's key (`Distinct`).
    fn matches(&self, a: &Attributes, key: &mut Vec<u8>) -> bool {
        for (name, test) in &self.headers {
            let Some(v) = a.parts.headers.get(name) else {
                return false;
            };
            match test {
                HeaderTest::Exact(want) => {
                    if v.as_bytes() != want.as_bytes() {
                        return false;
                    }
                }
                HeaderTest::Regex(re) => {
                    if !v.to_str().is_ok_and(|v| re.is_match(v)) {
                        return false;
                    }
                }
                HeaderTest::Distinct => push_part(key, v.as_bytes()),
            }
        }
        if let Some((net, kind)) = &self.source {
            if !net.contains(a.source_ip) {
                return false;
            }
            if *kind == SourceMatchType::Distinct {
                push_part(key, a.source_ip.to_string().as_bytes());
            }
        }
        true
    }
}

/// Appends a length-prefixed part, so no two lists of parts make one key.
fn push_part(key: &mut Vec<u8>, part: &[u8]) {
    key.extend_from_slice(&(part.len() as u32).to_le_bytes());
    key.extend_from_slice(part);
}

/// The bucket key's parts that `key` asks for.
pub fn key_parts(parts: &[KeyPart], a: &Attributes, key: &mut Vec<u8>) {
    for p in parts {
        match p {
            KeyPart::SourceIdentity => push_part(key, a.peer.as_deref().unwrap_or("").as_bytes()),
            KeyPart::SourceIp => push_part(key, a.source_ip.to_string().as_bytes()),
            KeyPart::Header(h) => push_part(
                key,
                a.parts
                    .headers
                    .get(h.as_str())
                    .map_or(&b""[..], |v| v.as_bytes()),
            ),
            KeyPart::Claim(c) => {
                let claims = a.parts.extensions.get::<RequestAuth>().map(|r| &r.claims);
                let v = claims.and_then(|mut v| {
                    for step in c.split('.') {
                        v = v.get(step)?;
                    }
                    Some(match v {
                        serde_json::Value::String(s) => s.clone(),
                        v => v.to_string(),
                    })
                });
                push_part(key, v.unwrap_or_default().as_bytes());
            }
            KeyPart::Path => push_part(key, a.parts.uri.path().as_bytes()),
            KeyPart::Method => push_part(key, a.parts.method.as_str().as_bytes()),
        }
    }
}

// ---- the phase -------------------------------------------------------------------

/// The engine's rate limit state, kept across configs: the local buckets, the
/// negative cache and the Redis client.
pub struct Limiter {
    buckets: Buckets,
    negative: Arc<Negative>,
    leases: Arc<Leases>,
    redis: Option<Arc<Redis>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(None)
    }
}

/// A refusal, to answer with.
struct Refusal<'p> {
    policy: &'p Policy,
    rule: &'p Rule,
    retry_after: Duration,
    reset: Duration,
}

/// A global bucket waiting for the Redis call.
struct Pending<'p> {
    policy: &'p Policy,
    rule: &'p Rule,
    key: String,
    gcra: Gcra,
    /// Requests to ask Redis for: this one, and any more for the lease.
    ask: u64,
}

impl Limiter {
    /// Global limits ask Redis at `redis` (`host:port`), if given.
    pub fn new(redis: Option<String>) -> Limiter {
        Limiter {
            buckets: Buckets::new(MAX_KEYS),
            negative: Arc::default(),
            leases: Arc::default(),
            redis: redis.map(|addr| Arc::new(Redis::new(addr))),
        }
    }

    /// The rate limit phase of a request: `Err` is the answer that refuses it.
    pub async fn admit(
        &self,
        policies: &Policies,
        ctx: &Context,
        parts: &http::request::Parts,
        record: &mut Record,
    ) -> Result<(), Response<Body>> {
        if policies.is_empty() {
            return Ok(());
        }
        let service = &ctx.default_backend.service;
        // `kind namespace/name[#rule]`, as the route phase wrote it.
        let route = record.route.as_deref().and_then(|r| {
            let r = r.strip_prefix("HTTPRoute ")?;
            let r = r.split_once('#').map_or(r, |(r, _)| r);
            let (ns, name) = r.split_once('/')?;
            Some((ns.to_owned(), name.to_owned()))
        });
        let mut applicable: Vec<(usize, String)> = Vec::new();
        if let Some(list) = policies.by_service.get(service) {
            applicable.extend(
                list.iter()
                    .map(|&i| (i, format!("svc/{}/{}", service.0, service.1))),
            );
        }
        if let Some(route) = &route
            && let Some(list) = policies.by_route.get(route)
        {
            applicable.extend(
                list.iter()
                    .map(|&i| (i, format!("route/{}/{}", route.0, route.1))),
            );
        }
        if applicable.is_empty() {
            return Ok(());
        }
        let attrs = Attributes {
            peer: ctx.peer.as_ref().map(|p| p.to_string()),
            source_ip: ctx.source_ip,
            parts,
        };
        let replicas = policies.replicas.get(service).copied().unwrap_or(1);
        let now = self.buckets.now();
        let mut refusal: Option<Refusal> = None;
        let mut used: Option<Used> = None;
        let mut pending: Vec<Pending> = Vec::new();
        for (index, target) in &applicable {
            let policy = &policies.policies[*index];
            for (r, rule) in policy.rules.iter().enumerate() {
                let mut key = Vec::with_capacity(64);
                push_part(&mut key, policy.id.as_bytes());
                push_part(&mut key, target.as_bytes());
                key.extend_from_slice(&(r as u32).to_le_bytes());
                if !rule.selectors.iter().all(|s| s.matches(&attrs, &mut key)) {
                    continue;
                }
                key_parts(&policy.key, &attrs, &mut key);
                let divide = if policy.divide { replicas } else { 1 };
                let gcra = Gcra::new(rule.requests, rule.unit, rule.burst, divide);
                match policy.kind {
                    LimitType::Local => {
                        let out = self.buckets.check(self.buckets.hash(&key), &gcra, now);
                        if out.allowed && !policy.shadow {
                            tighten(&mut used, policy, rule, out.remaining, out.reset);
                        }
                        let refused = decide(policy, out.allowed, ctx);
                        if refused && refusal.is_none() {
                            refusal = Some(Refusal {
                                policy,
                                rule,
                                retry_after: out.retry_after,
                                reset: out.reset,
                            });
                        }
                    }
                    LimitType::Global => pending.push(Pending {
                        policy,
                        rule,
                        key: redis_key(&key),
                        gcra,
                        ask: 1,
                    }),
                }
            }
        }
        if let Some(r) = refusal {
            // Global buckets are not charged for a request refused already.
            return Err(refused(r, record));
        }
        if !pending.is_empty() {
            self.global(pending, ctx, record, &mut used).await?;
        }
        if let Some(u) = used {
            record.rate_limit_headers = quota_headers(u.policy, u.rule, u.remaining, u.reset);
        }
        Ok(())
    }

    async fn global<'p>(
        &self,
        mut pending: Vec<Pending<'p>>,
        ctx: &Context,
        record: &mut Record,
        used: &mut Option<Used<'p>>,
    ) -> Result<(), Response<Body>> {
        let now = Instant::now();
        // The negative cache: a bucket Redis refused is refused here until its
        // retry-after, without asking again.
        {
            let cache = lock(&self.negative.0);
            let mut first = None;
            pending.retain(|p| match cache.get(&p.key) {
                Some(until) if *until > now => {
                    if decide(p.policy, false, ctx) && first.is_none() {
                        first = Some(Refusal {
                            policy: p.policy,
                            rule: p.rule,
                            retry_after: *until - now,
                            reset: *until - now,
                        });
                    }
                    false
                }
                _ => true,
            });
            if let Some(r) = first {
                return Err(refused(r, record));
            }
        }
        // Then the leases: a bucket with budget leased here goes without
        // asking Redis.
        pending.retain_mut(
            |p| match self.leases.take(&p.key, p.gcra.lease_max(), now) {
                Leased::Taken {
                    remaining,
                    reset,
                    refill,
                } => {
                    LEASED.fetch_add(1, Relaxed);
                    if !p.policy.shadow {
                        tighten(used, p.policy, p.rule, remaining, reset);
                    }
                    decide(p.policy, true, ctx);
                    if let Some(n) = refill {
                        self.refill(p.key.clone(), p.gcra, n, p.policy.timeout);
                    }
                    false
                }
                Leased::Ask(n) => {
                    p.ask = n;
                    true
                }
            },
        );
        if pending.is_empty() {
            return Ok(());
        }
        // A lease this request asks for is the bucket's only one under way:
        // if the request goes away before the answer (its client left), the
        // lease must not stay "asked for" forever.
        let mut asked = Asked {
            leases: &self.leases,
            keys: pending
                .iter()
                .filter(|p| p.ask > 1)
                .map(|p| (p.key.clone(), p.ask))
                .collect(),
        };
        let timeout = pending
            .iter()
            .map(|p| p.policy.timeout)
            .min()
            .unwrap_or(DEFAULT_TIMEOUT);
        let answer = match &self.redis {
            None => Err(RedisError::Unconfigured),
            Some(redis) => {
                let keys: Vec<&str> = pending.iter().map(|p| p.key.as_str()).collect();
                let args: Vec<String> = pending.iter().flat_map(|p| p.gcra.args(p.ask)).collect();
                redis.gcra_timed(&keys, &args, timeout).await
            }
        };
        // Answered (or failed): each lease is settled below.
        asked.keys.clear();
        let outcomes = match answer {
            Ok(o) => o,
            Err(e) => {
                REDIS_ERRORS.count(&e);
                debug!(error = %e, "redis rate limit call failed");
                let now = Instant::now();
                let mut closed = None;
                for p in &pending {
                    self.leases.granted(&p.key, p.ask, None, now);
                    let c = &p.policy.counters;
                    match p.policy.failure_mode {
                        FailureMode::Open => c.failed_open.fetch_add(1, Relaxed),
                        FailureMode::Closed => c.failed_closed.fetch_add(1, Relaxed),
                    };
                    if p.policy.failure_mode == FailureMode::Closed && !p.policy.shadow {
                        closed.get_or_insert(p.policy);
                    }
                }
                if let Some(policy) = closed {
                    warn!(policy = %policy.id, error = %e, "rate limit service failed: refusing (failure_mode: closed)");
                    record.flags = "RLSE";
                    return Err(super::engine::error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "rate limit service unavailable",
                    ));
                }
                return Ok(());
            }
        };
        let now = Instant::now();
        let mut first = None;
        for (p, (granted, a, b)) in pending.iter().zip(outcomes) {
            let allowed = granted > 0;
            let (for_lease, left) = (granted.saturating_sub(1), a / p.gcra.interval_us());
            let reset = Duration::from_micros(b);
            self.leases
                .granted(&p.key, p.ask, Some((for_lease, left, reset)), now);
            if allowed && !p.policy.shadow {
                tighten(used, p.policy, p.rule, left + for_lease, reset);
            }
            if !allowed {
                self.negative
                    .remember(&p.key, now + Duration::from_micros(a), now);
            }
            if decide(p.policy, allowed, ctx) && first.is_none() {
                first = Some(Refusal {
                    policy: p.policy,
                    rule: p.rule,
                    retry_after: Duration::from_micros(a),
                    reset: Duration::from_micros(b),
                });
            }
        }
        match first {
            Some(r) => Err(refused(r, record)),
            None => Ok(()),
        }
    }

    /// Tops up the lease of bucket `key` by `n` in the background: no
    /// request waits for it.
    fn refill(&self, key: String, gcra: Gcra, n: u64, timeout: Duration) {
        let (Some(redis), Ok(rt)) = (&self.redis, tokio::runtime::Handle::try_current()) else {
            self.leases.granted(&key, n, None, Instant::now());
            return;
        };
        let (redis, leases, negative) = (redis.clone(), self.leases.clone(), self.negative.clone());
        rt.spawn(async move {
            // Behind the work the request that asked has queued on this
            // worker (its upstream write, its stream's frames): the top-up
            // is not urgent, that request is.
            tokio::task::yield_now().await;
            let answer = redis.gcra_timed(&[&key], &gcra.args(n), timeout).await;
            let now = Instant::now();
            match answer.as_deref() {
                Ok(&[(granted, a, b)]) => {
                    if granted == 0 {
                        negative.remember(&key, now + Duration::from_micros(a), now);
                    }
                    let left = a / gcra.interval_us();
                    leases.granted(
                        &key,
                        n,
                        Some((granted, left, Duration::from_micros(b))),
                        now,
                    );
                }
                Ok(_) => leases.granted(&key, n, None, now),
                Err(e) => {
                    REDIS_ERRORS.count(e);
                    debug!(error = %e, "refilling a rate limit lease failed");
                    leases.granted(&key, n, None, now);
                }
            }
        });
    }

    /// The local buckets (for tests and the bench).
    pub fn buckets(&self) -> &Buckets {
        &self.buckets
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The negative cache: a bucket Redis refused, until its retry-after.
#[derive(Default)]
struct Negative(Mutex<HashMap<String, Instant>>);

impl Negative {
    fn remember(&self, key: &str, until: Instant, now: Instant) {
        let mut cache = lock(&self.0);
        if cache.len() >= MAX_NEGATIVE {
            cache.retain(|_, until| *until > now);
            if cache.len() >= MAX_NEGATIVE {
                cache.clear();
            }
        }
        cache.insert(key.to_owned(), until);
    }
}

// ---- leases of global budget ---------------------------------------------------

/// How long leased budget stays good: unused by then, it is dropped (its
/// budget is lost, never given twice).
const LEASE_TTL: Duration = Duration::from_millis(100);
/// A key's demand in this window sizes its lease, which so lasts about as
/// long: far longer than a Redis round trip, so the refill, asked for when
/// half is used, comes back before the rest is.
const LEASE_WINDOW: Duration = Duration::from_millis(20);
/// A lease holds at most one part in this many of its bucket's burst...
const LEASE_SHARE: u64 = 20;
/// ...and never more than this many requests.
const MAX_LEASE: u64 = 1000;
/// The most keys with a lease at once.
const MAX_LEASES: usize = 10_000;

/// Global budget held by this replica: Redis grants a hot bucket's
/// requests in advance, a lease of them, and the requests that follow are
/// admitted here, with no Redis call on their path; the lease is topped up
/// in the background when half is used. A bucket is leased only as far as
/// its demand in the last [`LEASE_WINDOW`] (so one seen once in a while is
/// asked about per request, exactly, as without leases) and at most a
/// [`LEASE_SHARE`]th of its burst ([`Gcra::lease_max`]; a bucket whose burst
/// is under twice that is never leased).
///
/// What it changes, and what it does not: Redis's GCRA counts every
/// request it grants, leased or not, so all replicas together never admit
/// more than the limit allows; a lease's requests may be admitted up to
/// [`LEASE_TTL`] after Redis granted them. What a replica holds unused,
/// another cannot have: across R replicas the limit can admit up to
/// R × the lease (at most a twentieth of the burst each) fewer than it
/// allows, and budget leased but not used in time is lost. The `RateLimit`
/// header's `r` of a request admitted from a lease is Redis's count at the
/// last grant plus what the lease holds.
#[derive(Default)]
struct Leases(Mutex<HashMap<String, Lease>>);

struct Lease {
    /// Requests granted and not used yet, good until `expires`.
    tokens: u64,
    expires: Instant,
    /// A call that will top up `tokens` is on its way.
    asking: bool,
    /// At the last grant: Redis's budget left (requests, this lease
    /// included), and the time until its bucket is full.
    left: u64,
    reset: Duration,
    /// The demand: requests since `window`, and the lease they call for.
    window: Instant,
    seen: u64,
    size: u64,
}

/// What a bucket's lease says for a request.
enum Leased {
    /// Admitted from the lease: the budget left and the reset, for the
    /// `RateLimit` header, and a top-up to ask for (its size), if due.
    Taken {
        remaining: u64,
        reset: Duration,
        refill: Option<u64>,
    },
    /// Ask Redis for this many: the request's own, and the rest to lease.
    Ask(u64),
}

impl Leases {
    /// One request of bucket `key`, whose lease may hold up to `max`.
    fn take(&self, key: &str, max: u64, now: Instant) -> Leased {
        if max <= 1 {
            return Leased::Ask(1);
        }
        let mut map = lock(&self.0);
        if !map.contains_key(key) {
            if map.len() >= MAX_LEASES {
                map.retain(|_, l| l.asking || l.expires > now || now - l.window < LEASE_WINDOW);
                if map.len() >= MAX_LEASES {
                    return Leased::Ask(1);
                }
            }
            let lease = Lease {
                tokens: 0,
                expires: now,
                asking: false,
                left: 0,
                reset: Duration::ZERO,
                window: now,
                seen: 0,
                size: 1,
            };
            map.insert(key.to_owned(), lease);
        }
        let Some(l) = map.get_mut(key) else {
            return Leased::Ask(1);
        };
        let since = now.saturating_duration_since(l.window);
        if since >= LEASE_WINDOW {
            // The last window's demand, if it was the last; after a pause,
            // start again from one.
            l.size = if since < 2 * LEASE_WINDOW {
                l.seen.clamp(1, max)
            } else {
                1
            };
            l.window = now;
            l.seen = 0;
        }
        l.seen += 1;
        if l.expires <= now {
            l.tokens = 0;
        }
        if l.tokens > 0 {
            l.tokens -= 1;
            // Topped up to its size (no more) when half is used. `asking`
            // marks a lease call (two or more) under way, which
            // [`Leases::granted`] settles: a top-up of one is left to the
            // next request's own call.
            let due = l.tokens * 2 <= l.size && l.size - l.tokens >= 2;
            let refill = (due && !l.asking).then(|| {
                l.asking = true;
                l.size - l.tokens
            });
            return Leased::Taken {
                remaining: l.left + l.tokens,
                reset: l.reset,
                refill,
            };
        }
        if l.asking || l.size <= 1 {
            return Leased::Ask(1);
        }
        l.asking = true;
        Leased::Ask(l.size)
    }

    /// Redis answered (`None`: failed) a call that asked for `asked` of
    /// bucket `key`: `for_lease` of them (those no request took), Redis's
    /// budget left after them, and its bucket's reset.
    fn granted(&self, key: &str, asked: u64, grant: Option<(u64, u64, Duration)>, now: Instant) {
        if asked <= 1 {
            return;
        }
        let mut map = lock(&self.0);
        // Evicted meanwhile: what it was granted is dropped.
        let Some(l) = map.get_mut(key) else {
            return;
        };
        l.asking = false;
        let Some((for_lease, left, reset)) = grant else {
            return;
        };
        if l.expires <= now {
            l.tokens = 0;
        }
        // Never more than was asked for, whatever Redis answers.
        let for_lease = for_lease.min(asked);
        if for_lease > 0 {
            l.tokens += for_lease;
            l.expires = now + LEASE_TTL;
        }
        l.left = left;
        l.reset = reset;
    }
}

/// The leases a request asked for, settled as failed if it is dropped
/// before they are.
struct Asked<'a> {
    leases: &'a Leases,
    keys: Vec<(String, u64)>,
}

impl Drop for Asked<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        for (key, n) in self.keys.drain(..) {
            self.leases.granted(&key, n, None, now);
        }
    }
}

/// Decisions admitted from a lease, without a Redis call.
static LEASED: AtomicU64 = AtomicU64::new(0);

/// Counts a bucket's answer; whether the request is to be refused (never in
/// shadow mode).
fn decide(policy: &Policy, allowed: bool, ctx: &Context) -> bool {
    let c = &policy.counters;
    if allowed {
        c.allowed.fetch_add(1, Relaxed);
        return false;
    }
    if policy.shadow {
        c.shadow_limited.fetch_add(1, Relaxed);
        info!(policy = %policy.id, source.ip = %ctx.source_ip, "over the rate limit (shadow mode: let through)");
        return false;
    }
    c.limited.fetch_add(1, Relaxed);
    true
}

/// A Redis key for a bucket: readable when short, a digest when long (keys
/// carry header values a client chooses).
fn redis_key(key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key);
    let mut s = String::from("weft:rl:");
    for b in &digest.as_ref()[..16] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn refused(r: Refusal, record: &mut Record) -> Response<Body> {
    record.flags = "RL";
    debug!(policy = %r.policy.id, retry_after = ?r.retry_after, "rate limited");
    let mut resp = Response::new(full("rate limited"));
    *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    for (name, value) in headers(r.policy, r.rule, r.retry_after, r.reset) {
        resp.headers_mut().insert(name, value);
    }
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// The quota an allowed request used that has the least left: what its
/// response's `RateLimit` fields describe.
struct Used<'p> {
    policy: &'p Policy,
    rule: &'p Rule,
    remaining: u64,
    reset: Duration,
}

fn tighten<'p>(
    used: &mut Option<Used<'p>>,
    policy: &'p Policy,
    rule: &'p Rule,
    remaining: u64,
    reset: Duration,
) {
    if used.as_ref().is_none_or(|u| remaining < u.remaining) {
        *used = Some(Used {
            policy,
            rule,
            remaining,
            reset,
        });
    }
}

/// The fields of an allowed response, for the quota with the least left, so a
/// client can pace itself before it is refused.
fn quota_headers(
    policy: &Policy,
    rule: &Rule,
    remaining: u64,
    reset: Duration,
) -> Vec<(HeaderName, HeaderValue)> {
    let reset = ceil_secs(reset);
    fields(policy, rule, remaining, reset, reset)
}

/// Whole seconds, rounded up (a client that waits this long gets through).
fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

/// A refusal's rate limit fields: `Retry-After`, then [`fields`] with nothing
/// left until the retry.
fn headers(
    policy: &Policy,
    rule: &Rule,
    retry_after: Duration,
    reset: Duration,
) -> Vec<(HeaderName, HeaderValue)> {
    let retry = ceil_secs(retry_after).max(1);
    let mut out = vec![(header::RETRY_AFTER, HeaderValue::from(retry))];
    out.extend(fields(policy, rule, 0, retry, ceil_secs(reset).max(retry)));
    out
}

/// The draft's `RateLimit-Policy: "<name>";q=<requests>;w=<window>` and
/// `RateLimit: "<name>";r=<left>;t=<seconds>`, and `X-RateLimit-Limit`,
/// `-Remaining`, `-Reset` if the policy asks for them.
fn fields(
    policy: &Policy,
    rule: &Rule,
    remaining: u64,
    t: u64,
    x_reset: u64,
) -> Vec<(HeaderName, HeaderValue)> {
    let name = sf_string(&policy.name);
    let mut out = vec![
        (
            HeaderName::from_static("ratelimit-policy"),
            format!("{name};q={};w={}", rule.requests, rule.unit.as_secs()),
        ),
        (
            HeaderName::from_static("ratelimit"),
            format!("{name};r={remaining};t={t}"),
        ),
    ];
    if policy.x_headers {
        out.push((
            HeaderName::from_static("x-ratelimit-limit"),
            rule.requests.to_string(),
        ));
        out.push((
            HeaderName::from_static("x-ratelimit-remaining"),
            remaining.to_string(),
        ));
        out.push((
            HeaderName::from_static("x-ratelimit-reset"),
            x_reset.to_string(),
        ));
    }
    out.into_iter()
        .filter_map(|(k, v)| Some((k, HeaderValue::from_str(&v).ok()?)))
        .collect()
}

/// An RFC 8941 string: printable ASCII, `"` and `\` escaped; anything else
/// dropped.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

// ---- metrics -------------------------------------------------------------------------

/// A policy's decisions; kept across configs by its `namespace/name`.
#[derive(Default)]
struct Counters {
    allowed: AtomicU64,
    limited: AtomicU64,
    shadow_limited: AtomicU64,
    failed_open: AtomicU64,
    failed_closed: AtomicU64,
}

static COUNTERS: LazyLock<Mutex<BTreeMap<Arc<str>, Arc<Counters>>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

fn counters(id: &Arc<str>) -> Arc<Counters> {
    COUNTERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(id.clone())
        .or_default()
        .clone()
}

#[derive(Default)]
struct RedisErrors {
    timeout: AtomicU64,
    connect: AtomicU64,
    io: AtomicU64,
    protocol: AtomicU64,
    script: AtomicU64,
    busy: AtomicU64,
    unconfigured: AtomicU64,
}

static REDIS_ERRORS: RedisErrors = RedisErrors {
    timeout: AtomicU64::new(0),
    connect: AtomicU64::new(0),
    io: AtomicU64::new(0),
    protocol: AtomicU64::new(0),
    script: AtomicU64::new(0),
    busy: AtomicU64::new(0),
    unconfigured: AtomicU64::new(0),
};

impl RedisErrors {
    fn count(&self, e: &RedisError) {
        let c = match e {
            RedisError::Timeout => &self.timeout,
            RedisError::Connect(_) => &self.connect,
            RedisError::Io(_) => &self.io,
            RedisError::Protocol(_) => &self.protocol,
            RedisError::Script(_) => &self.script,
            RedisError::Busy => &self.busy,
            RedisError::Unconfigured => &self.unconfigured,
        };
        c.fetch_add(1, Relaxed);
    }
}

/// How long calls to Redis take, as the waypoint waits for them (from the
/// call to its answer, its wait in the client's queue included; failed and
/// timed-out calls too): `weft_ratelimit_redis_call_seconds`. The buckets
/// are fine below a millisecond, where a healthy Redis answers.
struct CallTimes {
    counts: [AtomicU64; CALL_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// Upper bounds in µs, and as the `le` label (seconds).
const CALL_BUCKETS: [(u64, &str); 14] = [
    (50, "5e-05"),
    (100, "0.0001"),
    (150, "0.00015"),
    (200, "0.0002"),
    (300, "0.0003"),
    (500, "0.0005"),
    (1_000, "0.001"),
    (2_500, "0.0025"),
    (5_000, "0.005"),
    (10_000, "0.01"),
    (25_000, "0.025"),
    (50_000, "0.05"),
    (100_000, "0.1"),
    (1_000_000, "1"),
];

static CALL_TIMES: CallTimes = CallTimes {
    counts: [const { AtomicU64::new(0) }; CALL_BUCKETS.len() + 1],
    sum_ns: AtomicU64::new(0),
};

impl CallTimes {
    fn observe(&self, took: Duration) {
        let us = took.as_micros() as u64;
        let i = CALL_BUCKETS.partition_point(|(le, _)| *le < us);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    fn render(&self, out: &mut String) {
        let name = "weft_ratelimit_redis_call_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Calls to Redis for global rate limits, from the call to its answer.\n# TYPE {name} histogram"
        );
        let mut total = 0;
        for (i, count) in self.counts.iter().enumerate() {
            total += count.load(Relaxed);
            let le = CALL_BUCKETS.get(i).map_or("+Inf", |(_, le)| le);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {total}");
        }
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {total}");
    }
}

/// `weft_ratelimit_decisions_total{policy,decision}`,
/// `weft_ratelimit_redis_errors_total{reason}` and
/// `weft_ratelimit_redis_call_seconds`, for the metrics page.
pub fn render() -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP weft_ratelimit_decisions_total Rate limit decisions at the waypoint, by policy.\n\
         # TYPE weft_ratelimit_decisions_total counter\n",
    );
    for (id, c) in COUNTERS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        for (decision, n) in [
            ("allowed", &c.allowed),
            ("limited", &c.limited),
            ("shadow_limited", &c.shadow_limited),
            ("failed_open", &c.failed_open),
            ("failed_closed", &c.failed_closed),
        ] {
            let _ = writeln!(
                out,
                "weft_ratelimit_decisions_total{{policy=\"{id}\",decision=\"{decision}\"}} {}",
                n.load(Relaxed)
            );
        }
    }
    out.push_str(
        "# HELP weft_ratelimit_redis_errors_total Failed calls to Redis for global rate limits.\n\
         # TYPE weft_ratelimit_redis_errors_total counter\n",
    );
    let e = &REDIS_ERRORS;
    for (reason, n) in [
        ("timeout", &e.timeout),
        ("connect", &e.connect),
        ("io", &e.io),
        ("protocol", &e.protocol),
        ("script", &e.script),
        ("busy", &e.busy),
        ("unconfigured", &e.unconfigured),
    ] {
        let _ = writeln!(
            out,
            "weft_ratelimit_redis_errors_total{{reason=\"{reason}\"}} {}",
            n.load(Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP weft_ratelimit_leased_total Global rate limit decisions admitted from budget Redis leased ahead, without a call.\n\
         # TYPE weft_ratelimit_leased_total counter\n\
         weft_ratelimit_leased_total {}",
        LEASED.load(Relaxed)
    );
    CALL_TIMES.render(&mut out);
    out
}

// ---- Redis -----------------------------------------------------------------------------

/// GCRA over every key of a request at once, with Redis's clock (µs). ARGV
/// holds each key's T, burst × T (µs) and how many requests to take (1, or
/// more to lease some: see [`Leases`]). Returns three integers per key: how
/// many were granted (as many as fit, up to the number asked; 0 refuses),
/// then the budget left (granted) or the retry-after of one (refused), then
/// the time until the bucket is full. The TAT is written with `%.0f`: Lua
/// 5.1's `tostring` keeps 14 digits, and µs since 1970 have 16.
pub const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local tolerance = tonumber(ARGV[3 * i - 1])
  local want = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local fit = math.floor((tolerance - (tat - now)) / interval)
  if fit > want then fit = want end
  if fit < 1 then
    out[#out + 1] = 0
    out[#out + 1] = tat + interval - now - tolerance
    out[#out + 1] = tat - now
  else
    local new = tat + fit * interval
    local ahead = new - now
    redis.call('SET', key, string.format('%.0f', new), 'PX', math.floor(ahead / 1000) + 1)
    out[#out + 1] = fit
    out[#out + 1] = tolerance - ahead
    out[#out + 1] = ahead
  end
end
return out
"#;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("no --redis-addr is set: global rate limits cannot be checked")]
    Unconfigured,
    #[error("redis did not answer in time")]
    Timeout,
    #[error("cannot connect to redis: {0}")]
    Connect(std::io::Error),
    #[error("redis connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("too many calls wait for redis already")]
    Busy,
    #[error("redis answered something else than expected: {0}")]
    Protocol(&'static str),
    #[error("redis refused the script: {0}")]
    Script(String),
}

/// A RESP2 reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A Redis client for the limiter, pipelined: [`CONNS`] connections, with
/// the calls of every request queued on them and written out by whoever
/// comes first, and each connection's replies read by a task of its own and
/// handed back in the order the calls were written, which is the order Redis
/// answers them in.
///
/// Who writes: a call made when its connection has nothing in flight writes
/// itself out at once, from the request's own task (no hand-off to another
/// task: each hand-off is a wake-up, on this VM tens of µs across CPUs, and
/// at a thousand requests a second that is most calls). A call made while
/// others are in flight is queued, and written with every call queued
/// meanwhile when the next reply comes, by the reader that reads it (awake
/// anyway): under load many calls share one write and one Redis read (the
/// pipelining), and no task is woken to write. An earlier version had a
/// writer task per connection that every call was handed to and that handed
/// each reply back through the reader: three wake-ups per call, which doubled
/// the round trip at p50 (the bench's policies pass).
///
/// A caller that gives up (its `timeout` passed) drops its end of the
/// channel: its reply is still read, in its turn, and thrown away, so the
/// next caller gets its own answer. One that gives up while it writes for
/// others hands the rest of the writing to a task ([`Flusher`]), and closes
/// the connection if its write was cut short. A connection that breaks fails
/// every call written on it and not yet answered (`Io`); the next call
/// connects again.
pub struct Redis {
    sha: String,
    conns: Box<[Arc<Conn>]>,
    next: AtomicUsize,
}

/// Connections: one per data-path worker ([`crate::workers`]), at least two.
/// A worker's calls go on its own connection, whose reader task is spawned by
/// the call that opens it and so runs on that worker too: a reply wakes its
/// caller on the thread already awake, never another one. Redis runs
/// commands one at a time on one thread, so more connections add no capacity
/// there; two let two threads write and read at once when they are busy, at
/// the price of batches half as large. Off the workers (tests), calls go
/// round robin.
const CONNS: usize = 2;

/// The most calls one connection holds, queued and in flight: a caller past
/// it is refused at once (`Busy`) rather than held in memory, since they pile
/// up only when Redis answers slower than requests come, and then every call
/// behind them would miss its timeout anyway. Each is under a few hundred
/// bytes.
const IN_FLIGHT: usize = 4096;
/// A connect that takes longer fails the calls waiting for it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed connect, calls fail at once (`Connect`) for this long
/// instead of each trying again: a Redis that is down costs no connect per
/// request. Short, so a restarted Redis is used again at once.
const BACKOFF: Duration = Duration::from_millis(100);

type ReplyTx = tokio::sync::oneshot::Sender<Result<Reply, RedisError>>;

/// One connection.
struct Conn {
    addr: Arc<str>,
    /// Writes to Redis, all connections together: calls per write is how
    /// much pipelining did.
    writes: Arc<AtomicU64>,
    state: Mutex<ConnState>,
    /// The write half, used by the flusher of the moment only (one at a
    /// time: `ConnState::flushing`), so the lock is never waited for.
    link: tokio::sync::Mutex<Link>,
}

/// What callers, the flusher and the reader share, under one lock: whether a
/// call is written at once, queued, or picked up by the reader is decided
/// with the queue and the calls in flight in view together, so no call is
/// ever left queued with no one to write it.
#[derive(Default)]
struct ConnState {
    /// Calls not written yet, back to back, and where their replies go, in
    /// the same order.
    queued: Vec<u8>,
    queued_replies: Vec<ReplyTx>,
    /// Calls written and not answered yet, in the order written.
    waiting: std::collections::VecDeque<ReplyTx>,
    /// Someone (a caller or the reader) is writing the queue out.
    flushing: bool,
    /// The connection of generation `epoch` is up and its reader reads.
    open: bool,
    epoch: u64,
}

struct Link {
    write: Option<tokio::net::tcp::OwnedWriteHalf>,
    /// No connect before this (the last one failed).
    retry_at: Option<Instant>,
}

impl Redis {
    pub fn new(addr: String) -> Redis {
        let digest =
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, SCRIPT.as_bytes());
        let mut sha = String::with_capacity(40);
        for b in digest.as_ref() {
            let _ = write!(sha, "{b:02x}");
        }
        let addr: Arc<str> = addr.into();
        let writes = Arc::new(AtomicU64::new(0));
        Redis {
            conns: (0..crate::workers::loads().len().max(CONNS))
                .map(|_| {
                    Arc::new(Conn {
                        addr: addr.clone(),
                        writes: writes.clone(),
                        state: Mutex::new(ConnState::default()),
                        link: tokio::sync::Mutex::new(Link {
                            write: None,
                            retry_at: None,
                        }),
                    })
                })
                .collect(),
            sha,
            next: AtomicUsize::new(0),
        }
    }

    async fn call(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The worker's own connection; round robin off the workers.
        let i = match crate::workers::current() {
            0 => self.next.fetch_add(1, Relaxed),
            worker => worker - 1,
        };
        let conn = &self.conns[i % self.conns.len()];
        let flush = {
            let mut s = conn.lock();
            if s.queued_replies.len() + s.waiting.len() >= IN_FLIGHT {
                return Err(RedisError::Busy);
            }
            // Encoded straight into the queue: no buffer of its own.
            let _ = write!(Fmt(&mut s.queued), "*{}\r\n", args.len());
            for a in args {
                let _ = write!(Fmt(&mut s.queued), "${}\r\n", a.len());
                s.queued.extend_from_slice(a);
                s.queued.extend_from_slice(b"\r\n");
            }
            s.queued_replies.push(tx);
            // Nothing in flight (or no connection yet): written now, by this
            // task. Else the next reply's reader writes it, with the others.
            let flush = !s.flushing && (s.waiting.is_empty() || !s.open);
            s.flushing |= flush;
            flush
        };
        if flush {
            Flusher::new(conn.clone()).run().await;
        }
        rx.await.unwrap_or_else(|_| Err(RedisError::Io(gone())))
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        match self.call(&[b"PING"]).await? {
            Reply::Simple(s) if s == "PONG" => Ok(()),
            _ => Err(RedisError::Protocol("PING")),
        }
    }

    /// [`Redis::gcra`] within `timeout`, timed in
    /// `weft_ratelimit_redis_call_seconds`.
    async fn gcra_timed(
        &self,
        keys: &[&str],
        args: &[String],
        timeout: Duration,
    ) -> Result<Vec<(u64, u64, u64)>, RedisError> {
        let started = Instant::now();
        let answer = tokio::time::timeout(timeout, self.gcra(keys, args))
            .await
            .unwrap_or(Err(RedisError::Timeout));
        CALL_TIMES.observe(started.elapsed());
        answer
    }

    /// The script over `keys`: per key, (granted, µs, µs).
    pub async fn gcra(
        &self,
        keys: &[&str],
        args: &[String],
    ) -> Result<Vec<(u64, u64, u64)>, RedisError> {
        let n = keys.len().to_string();
        let mut call: Vec<&[u8]> = vec![b"EVALSHA", self.sha.as_bytes(), n.as_bytes()];
        call.extend(keys.iter().map(|k| k.as_bytes()));
        call.extend(args.iter().map(|a| a.as_bytes()));
        let mut reply = self.call(&call).await?;
        if matches!(&reply, Reply::Error(e) if e.starts_with("NOSCRIPT")) {
            call[0] = b"EVAL";
            call[1] = SCRIPT.as_bytes();
            reply = self.call(&call).await?;
        }
        let items = match reply {
            Reply::Array(items) => items,
            Reply::Error(e) => return Err(RedisError::Script(e)),
            _ => return Err(RedisError::Protocol("the script's reply is not a list")),
        };
        let ints: Vec<i64> = items
            .into_iter()
            .map(|i| match i {
                Reply::Int(n) => Ok(n),
                _ => Err(RedisError::Protocol(
                    "the script's reply holds a non-integer",
                )),
            })
            .collect::<Result<_, _>>()?;
        if ints.len() != keys.len() * 3 {
            return Err(RedisError::Protocol(
                "the script's reply has the wrong length",
            ));
        }
        Ok(ints
            .chunks(3)
            .map(|c| (c[0].max(0) as u64, c[1].max(0) as u64, c[2].max(0) as u64))
            .collect())
    }
}

/// The error of a call whose connection went away under it.
fn gone() -> std::io::Error {
    std::io::Error::other("the redis connection closed")
}

/// Fails `replies`: the first with `first`, the others with `gone`.
fn fail_all(replies: impl IntoIterator<Item = ReplyTx>, first: RedisError) {
    let mut first = Some(first);
    for tx in replies {
        let e = first.take().unwrap_or_else(|| RedisError::Io(gone()));
        let _ = tx.send(Err(e));
    }
}

impl Conn {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The generation of the open connection, connecting first if there is
    /// none (and no backoff forbids it).
    async fn open(self: &Arc<Self>, link: &mut Link) -> Result<u64, RedisError> {
        {
            let s = self.lock();
            if s.open && link.write.is_some() {
                return Ok(s.epoch);
            }
        }
        if link.retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(RedisError::Connect(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the last connect failed; trying again shortly",
            )));
        }
        let stream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*self.addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(self.connect_failed(link, e)),
                Err(_) => {
                    let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                    return Err(self.connect_failed(link, e));
                }
            };
        link.retry_at = None;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let epoch = {
            let mut s = self.lock();
            s.epoch += 1;
            s.open = true;
            s.epoch
        };
        link.write = Some(write);
        tokio::spawn(read_replies(self.clone(), read, epoch));
        Ok(epoch)
    }

    fn connect_failed(&self, link: &mut Link, e: std::io::Error) -> RedisError {
        if link.retry_at.is_none() {
            debug!(redis = %self.addr, error = %e, "cannot connect to redis");
        }
        link.retry_at = Some(Instant::now() + BACKOFF);
        RedisError::Connect(e)
    }

    /// The connection of generation `epoch` is gone: its calls in flight fail
    /// (the first with `e`), and the next flush connects again. Dropping the
    /// write half (the caller's part) closes it, which ends its reader.
    fn broke(&self, epoch: u64, e: RedisError) {
        let lost = {
            let mut s = self.lock();
            if s.epoch != epoch || !s.open {
                return;
            }
            s.open = false;
            std::mem::take(&mut s.waiting)
        };
        if !lost.is_empty() {
            debug!(error = %e, calls = lost.len(), "redis connection broke");
        }
        fail_all(lost, e);
    }
}

/// Writes a connection's queue out until it is empty, then lets go of
/// `ConnState::flushing`, which its maker set. Dropped before that (the
/// caller that flushes gave up), it hands the rest to a task: `flushing`
/// must not stay set with no one writing; and a write it cut short leaves a
/// partial command on the connection, which is then closed.
struct Flusher {
    conn: Arc<Conn>,
    /// Set while a write is under way (and after one was cut short).
    writing: Option<u64>,
    done: bool,
    /// A task taking over from a flusher dropped midway does not hand over
    /// again: dropped unfinished itself, its runtime is going away.
    takes_over: bool,
}

impl Flusher {
    fn new(conn: Arc<Conn>) -> Flusher {
        Flusher {
            conn,
            writing: None,
            done: false,
            takes_over: false,
        }
    }

    async fn run(mut self) {
        self.flush().await;
        self.done = true;
    }

    async fn flush(&mut self) {
        let conn = self.conn.clone();
        let mut link = conn.link.lock().await;
        if let Some(epoch) = self.writing.take() {
            // A write of this generation was cut short.
            link.write = None;
            conn.broke(epoch, RedisError::Io(gone()));
        }
        let mut batch = Vec::new();
        let mut replies = Vec::new();
        loop {
            {
                let mut s = conn.lock();
                if s.queued_replies.is_empty() {
                    s.flushing = false;
                    // The next calls encode into this one's buffers.
                    if s.queued.capacity() == 0 {
                        std::mem::swap(&mut s.queued, &mut batch);
                        std::mem::swap(&mut s.queued_replies, &mut replies);
                    }
                    return;
                }
                std::mem::swap(&mut s.queued, &mut batch);
                std::mem::swap(&mut s.queued_replies, &mut replies);
            }
            let epoch = match conn.open(&mut link).await {
                Ok(epoch) => epoch,
                Err(e) => {
                    // These calls and those queued behind them fail alike
                    // (the backoff makes the next ones fail at once).
                    batch.clear();
                    fail_all(replies.drain(..), e);
                    continue;
                }
            };
            let stale = {
                let mut s = conn.lock();
                let stale = s.epoch != epoch || !s.open;
                if stale {
                    // Its reader saw it break since: back in front of the
                    // queue, for a new connection.
                    s.queued.splice(0..0, batch.drain(..));
                    s.queued_replies.splice(0..0, replies.drain(..));
                } else {
                    // In flight before the write: the reply may come
                    // before the write returns.
                    s.waiting.extend(replies.drain(..));
                }
                stale
            };
            if stale {
                link.write = None;
                continue;
            }
            let Some(write) = link.write.as_mut() else {
                // Not after `open`; were it so, the calls fail, not hang.
                conn.broke(epoch, RedisError::Io(gone()));
                batch.clear();
                continue;
            };
            self.writing = Some(epoch);
            let written = write.write_all(&batch).await;
            self.writing = None;
            batch.clear();
            match written {
                Ok(()) => {
                    conn.writes.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    link.write = None;
                    conn.broke(epoch, RedisError::Io(e));
                }
            }
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let rt = tokio::runtime::Handle::try_current();
        if let (false, Ok(rt)) = (self.takes_over, rt) {
            let rest = Flusher {
                conn: self.conn.clone(),
                writing: self.writing,
                done: false,
                takes_over: true,
            };
            rt.spawn(rest.run());
        } else {
            // No runtime left to write on: the calls queued fail, and a
            // connection with a write cut short is not used again.
            if let Some(epoch) = self.writing {
                self.conn.broke(epoch, RedisError::Io(gone()));
            }
            let failed = {
                let mut s = self.conn.lock();
                s.flushing = false;
                s.queued.clear();
                std::mem::take(&mut s.queued_replies)
            };
            fail_all(failed, RedisError::Io(gone()));
        }
    }
}

/// A connection's reader: hands each reply to its call, in order, and when
/// calls were queued while others were in flight, writes them out (it is
/// awake anyway: that is the pipelining). Ends when the connection breaks
/// or is replaced.
///
/// Boxed, with its type named: a flush may connect, which starts a reader,
/// so the reader's future would otherwise be part of its own type.
fn read_replies(
    conn: Arc<Conn>,
    read: tokio::net::tcp::OwnedReadHalf,
    epoch: u64,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let mut read = tokio::io::BufReader::new(read);
        loop {
            let reply = match read_reply(&mut read, 0).await {
                Ok(reply) => reply,
                Err(e) => return conn.broke(epoch, e),
            };
            let (tx, flush) = {
                let mut s = conn.lock();
                if s.epoch != epoch || !s.open {
                    return;
                }
                let tx = s.waiting.pop_front();
                let flush = !s.flushing && !s.queued_replies.is_empty();
                s.flushing |= flush;
                (tx, flush)
            };
            let Some(tx) = tx else {
                return conn.broke(epoch, RedisError::Protocol("a reply to no call"));
            };
            // Sent even when the caller is gone: the reply is consumed in its
            // turn either way.
            let _ = tx.send(Ok(reply));
            if flush {
                Flusher::new(conn.clone()).run().await;
            }
        }
    })
}

/// `write!` into a byte vector.
struct Fmt<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Fmt<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Reads one reply, with bounds: a line of 512 bytes, a bulk string of 1 MiB,
/// 4096 items, nesting 4 deep.
pub async fn read_reply<R>(r: &mut R, depth: u8) -> Result<Reply, RedisError>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    if depth > 4 {
        return Err(RedisError::Protocol("nested too deep"));
    }
    let mut line = Vec::with_capacity(32);
    (&mut *r).take(512).read_until(b'\n', &mut line).await?;
    if line.is_empty() && depth == 0 {
        // The end of the stream between replies: the connection closed, which
        // is not a malformed reply.
        return Err(RedisError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if !line.ends_with(b"\r\n") {
        return Err(RedisError::Protocol("a line without CRLF"));
    }
    line.truncate(line.len() - 2);
    let (kind, rest) = line
        .split_first()
        .ok_or(RedisError::Protocol("an empty line"))?;
    let text = String::from_utf8_lossy(rest).into_owned();
    let int = || {
        text.parse::<i64>()
            .map_err(|_| RedisError::Protocol("not an integer"))
    };
    Ok(match kind {
        b'+' => Reply::Simple(text),
        b'-' => Reply::Error(text),
        b':' => Reply::Int(int()?),
        b'$' => {
            let n = int()?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            if n > 1 << 20 {
                return Err(RedisError::Protocol("a bulk string over 1 MiB"));
            }
            let mut buf = vec![0; n as usize + 2];
            r.read_exact(&mut buf).await?;
            buf.truncate(n as usize);
            Reply::Bulk(Some(buf))
        }
        b'*' => {
            let n = int()?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            if n > 4096 {
                return Err(RedisError::Protocol("a list over 4096 items"));
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(Box::pin(read_reply(r, depth + 1)).await?);
            }
            Reply::Array(items)
        }
        _ => return Err(RedisError::Protocol("an unknown reply type")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn gcra_lets_a_burst_through_then_the_steady_rate() {
        // 10 per second, 5 at once: T = 100ms, burst × T = 500ms.
        let g = Gcra::new(10, Duration::from_secs(1), 5, 1);
        assert_eq!((g.interval, g.tolerance), (100 * MS, 500 * MS));
        let now = 1_000 * MS;
        let mut tat = 0;
        let mut remaining = Vec::new();
        for _ in 0..5 {
            let (out, new) = g.check(tat, now);
            assert!(out.allowed);
            remaining.push(out.remaining);
            tat = new;
        }
        assert_eq!(remaining, [4, 3, 2, 1, 0]);
        let (out, same) = g.check(tat, now);
        assert!(!out.allowed, "the sixth at once is refused");
        assert_eq!(same, tat, "a refusal does not move the bucket");
        assert_eq!(out.retry_after, Duration::from_millis(100));
        assert_eq!(out.reset, Duration::from_millis(500));
        // 100ms later exactly one more goes.
        let (out, new) = g.check(tat, now + 100 * MS);
        assert!(out.allowed);
        let (out, _) = g.check(new, now + 100 * MS);
        assert!(!out.allowed);
        // Over a steady second, ten go.
        let mut tat = new;
        let mut allowed = 0;
        for i in 1..=100 {
            let (out, new) = g.check(tat, now + 100 * MS + i * 10 * MS);
            if out.allowed {
                allowed += 1;
                tat = new;
            }
        }
        assert_eq!(allowed, 10);
    }

    #[test]
    fn gcra_retry_after_and_division_by_replicas() {
        let g = Gcra::new(60, Duration::from_secs(60), 1, 1);
        let (_, tat) = g.check(0, 0);
        let (out, _) = g.check(tat, 250 * MS);
        assert_eq!(out.retry_after, Duration::from_millis(750));
        assert_eq!(ceil_secs(out.retry_after), 1);
        // 100/s over 4 replicas: 25/s each; a burst of 10: 2 each; never 0.
        let g = Gcra::new(100, Duration::from_secs(1), 10, 4);
        assert_eq!((g.interval, g.tolerance), (40 * MS, 80 * MS));
        let g = Gcra::new(1, Duration::from_secs(1), 1, 8);
        assert_eq!((g.interval, g.tolerance), (1000 * MS, 1000 * MS));
    }

    /// A limit divided among a waypoint's replicas counts them in the view,
    /// and follows them when only workloads change (a replica added).
    #[test]
    fn replicas_are_counted_in_the_view_and_follow_its_changes() {
        use crate::view::{Balancers, View};
        let mesh = crate::discovery::file::parse(
            std::path::Path::new("t.yaml"),
            "workloads:\n\
             - {name: web-0, node: n0, addresses: [10.0.0.2], labels: {app: web}}\n\
             - {name: wp-0, node: n0, addresses: [10.0.0.3], native_tunnel: true, labels: {role: wp}}\n\
             - {name: wp-1, node: n1, addresses: [10.0.0.4], native_tunnel: true, labels: {role: wp}}\n\
             services:\n\
             - {name: web, addresses: [10.96.0.1], ports: [{port: 80}], selector: {app: web}, waypoint: wp}\n\
             - {name: wp, addresses: [], ports: [], selector: {role: wp}}\n\
             rate_limits:\n\
             - {name: per-replica, type: Local, divide_by_replicas: true, target_refs: [{kind: Service, name: web}], rules: [{limit: {requests: 10, unit: Second}}]}\n",
        )
        .unwrap()
        .mesh;
        let balancers = Balancers::default();
        let view = View::new(mesh.clone(), "n0", &balancers);
        let web = ("default".to_owned(), "web".to_owned());
        let p = Policies::new(&view);
        assert_eq!(p.replicas.get(&web), Some(&2));
        assert!(p.hold_for(&view));
        let mut third = (*mesh.workloads[2]).clone();
        third.name = "wp-2".into();
        third.addresses = vec!["10.0.0.5".parse().unwrap()];
        let grown = view.with_delta(
            crate::model::MeshDelta {
                upserts: vec![std::sync::Arc::new(third)],
                ..Default::default()
            },
            &balancers,
        );
        assert!(!p.hold_for(&grown), "three replicas now");
        assert_eq!(Policies::new(&grown).replicas.get(&web), Some(&3));
    }

    #[test]
    fn the_store_holds_at_most_its_cap_and_evicts_the_oldest() {
        let b = Buckets::new(16 * 64);
        let g = Gcra::new(1, Duration::from_secs(3600), 1, 1);
        for i in 0..100_000u64 {
            b.check(b.hash(&i.to_le_bytes()), &g, i);
        }
        assert!(b.len() <= 16 * 64, "{} buckets", b.len());
        // The newest keys are still limited: they were not evicted.
        let newest = b.hash(&99_999u64.to_le_bytes());
        assert!(!b.check(newest, &g, 100_000).allowed);
        // A past TAT is no bucket at all: the sweep frees everything.
        let later = 10_000 * 1_000 * MS;
        b.check(b.hash(b"fresh"), &g, later);
        assert!(b.len() <= 16 * 64);
    }

    fn parts(req: http::Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn keys_tell_buckets_apart() {
        let key = |spec: &[&str], req: http::Request<()>, ip: &str| {
            let parts = parts(req);
            let a = Attributes {
                peer: Some("spiffe://cluster.local/ns/a/sa/x".into()),
                source_ip: ip.parse().unwrap(),
                parts: &parts,
            };
            let spec: Vec<KeyPart> = spec.iter().map(|s| KeyPart::parse(s).unwrap()).collect();
            let mut k = Vec::new();
            key_parts(&spec, &a, &mut k);
            k
        };
        let get = |h: &str| {
            http::Request::get("/a?x=1")
                .header("x-user", h)
                .body(())
                .unwrap()
        };
        assert_eq!(
            key(&["header:X-User"], get("one"), "10.0.0.1"),
            key(&["header:x-user"], get("one"), "10.0.0.2")
        );
        assert_ne!(
            key(&["header:x-user"], get("one"), "10.0.0.1"),
            key(&["header:x-user"], get("two"), "10.0.0.1")
        );
        assert_ne!(
            key(&["source_ip"], get("one"), "10.0.0.1"),
            key(&["source_ip"], get("one"), "10.0.0.2")
        );
        assert_eq!(
            key(&["path", "method"], get("one"), "10.0.0.1"),
            key(&["path", "method"], get("two"), "10.0.0.1"),
            "the path has no query"
        );
        // Length prefixes: ("ab", "") and ("a", "b") differ.
        let two = |a: &str, b: &str| {
            http::Request::get("/")
                .header("h1", a)
                .header("h2", b)
                .body(())
                .unwrap()
        };
        assert_ne!(
            key(&["header:h1", "header:h2"], two("ab", ""), "10.0.0.1"),
            key(&["header:h1", "header:h2"], two("a", "b"), "10.0.0.1")
        );
        // Claims, nested.
        let mut req = get("x");
        req.extensions_mut().insert(RequestAuth {
            claims: serde_json::json!({"org": {"team": "blue"}, "n": 3}),
            ..RequestAuth::default()
        });
        let k = key(&["claim:org.team", "claim:n"], req, "10.0.0.1");
        assert!(k.windows(4).any(|w| w == b"blue"));
        assert!(k.ends_with(b"3"));
        assert!(KeyPart::parse("cookie:x").is_err());
        assert!(KeyPart::parse("header:bad header").is_err());
    }

    #[test]
    fn refusal_headers_follow_the_draft() {
        let policy = Policy::compile(&serde_saphyr::from_str::<RateLimitPolicy>(
            "{name: per-user, target_refs: [{kind: Service, name: s}], x_ratelimit_headers: true,\n\
              rules: [{limit: {requests: 100, unit: Minute}}]}",
        ).unwrap())
        .unwrap();
        let h: HashMap<String, String> = headers(
            &policy,
            &policy.rules[0],
            Duration::from_millis(1500),
            Duration::from_secs(59),
        )
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["ratelimit-policy"], "\"per-user\";q=100;w=60");
        assert_eq!(h["ratelimit"], "\"per-user\";r=0;t=2");
        assert_eq!(h["x-ratelimit-limit"], "100");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "59");
        assert_eq!(sf_string("a\"b\\c\u{e9}"), "\"a\\\"b\\\\c\"");
    }

    #[tokio::test]
    async fn resp_replies_parse_within_bounds() {
        let parse = |s: &'static str| async move {
            let mut r = tokio::io::BufReader::new(s.as_bytes());
            read_reply(&mut r, 0).await
        };
        assert_eq!(
            parse("+PONG\r\n").await.unwrap(),
            Reply::Simple("PONG".into())
        );
        assert_eq!(
            parse("*3\r\n:1\r\n$2\r\nab\r\n$-1\r\n").await.unwrap(),
            Reply::Array(vec![
                Reply::Int(1),
                Reply::Bulk(Some(b"ab".to_vec())),
                Reply::Bulk(None)
            ])
        );
        assert!(
            matches!(parse("-NOSCRIPT x\r\n").await.unwrap(), Reply::Error(e) if e.starts_with("NOSCRIPT"))
        );
        assert!(parse("$99999999\r\n").await.is_err());
        assert!(
            parse("*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n")
                .await
                .is_err()
        );
        assert!(parse("?\r\n").await.is_err());
        assert!(parse(":12").await.is_err());
    }

    /// A real `redis-server` (`cargo xtask setup` installs it) on a free
    /// port, killed when dropped, and a client for it; `None` (the test is
    /// skipped) without one, except under `CI=true`, where it must run.
    struct Server(std::process::Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    async fn redis_server() -> Option<(Server, Redis)> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let Ok(child) = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
        else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: redis-server must be installed (cargo xtask setup)"
            );
            eprintln!("no redis-server: skipped");
            return None;
        };
        let server = Server(child);
        listening(&port.to_string()).await;
        Some((server, Redis::new(format!("127.0.0.1:{port}"))))
    }

    /// Waits for redis-server to listen, without the client (whose connects
    /// that fail would start its backoff).
    async fn listening(port: &str) {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not listen");
    }

    /// The args of [`SCRIPT`] for one request of a limit.
    fn args(g: &Gcra) -> [String; 3] {
        g.args(1)
    }

    #[tokio::test]
    async fn the_script_limits_in_a_real_redis() {
        let Some((_server, redis)) = redis_server().await else {
            return;
        };
        let args = args(&Gcra::new(10, Duration::from_secs(60), 3, 1));
        let mut seen = Vec::new();
        for _ in 0..5 {
            // The first call loads the script (NOSCRIPT, then EVAL).
            seen.push(redis.gcra(&["weft:rl:test"], &args).await.unwrap()[0]);
        }
        let granted: Vec<u64> = seen.iter().map(|s| s.0).collect();
        assert_eq!(granted, [1, 1, 1, 0, 0]);
        assert_eq!(
            seen[0].1, 12_000_000,
            "two more after the first, in µs of budget"
        );
        // Refused: retry after about T (6s), less the time the calls took.
        assert!((5_000_000..=6_000_000).contains(&seen[3].1), "{seen:?}");
    }

    /// Asked for several (a lease), the script grants as many as fit and
    /// charges the bucket for those only.
    #[tokio::test]
    async fn the_script_grants_what_fits_of_a_lease() {
        let Some((_server, redis)) = redis_server().await else {
            return;
        };
        let g = Gcra::new(10, Duration::from_secs(60), 3, 1);
        let got = redis.gcra(&["weft:rl:lease"], &g.args(5)).await.unwrap();
        assert_eq!(got, [(3, 0, 18_000_000)], "3 of 5 fit, none left");
        let got = redis.gcra(&["weft:rl:lease"], &g.args(2)).await.unwrap();
        assert_eq!(got[0].0, 0, "{got:?}");
        assert!((5_000_000..=6_000_000).contains(&got[0].1), "{got:?}");
    }

    /// A lease follows its bucket's demand, stays within its share of the
    /// burst, is topped up in the background when half is used, and what it
    /// holds expires.
    #[test]
    fn leases_follow_demand_within_their_bound() {
        let leases = Leases::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let ask = |l: &Leased| match l {
            Leased::Ask(n) => Some(*n),
            Leased::Taken { .. } => None,
        };
        // A small burst is never leased.
        assert_eq!(Gcra::new(20, Duration::from_secs(60), 20, 1).lease_max(), 1);
        assert_eq!(
            Gcra::new(600, Duration::from_secs(60), 600, 1).lease_max(),
            30
        );
        assert_eq!(ask(&leases.take("small", 1, t0)), Some(1));
        // A new key is asked about per request; 40 requests in a window
        // make the next ask a lease, capped at 30.
        for i in 0..40 {
            assert_eq!(ask(&leases.take("k", 30, ms(i / 2))), Some(1));
        }
        assert_eq!(ask(&leases.take("k", 30, ms(20))), Some(30));
        // While that call is out, others ask for themselves only.
        assert_eq!(ask(&leases.take("k", 30, ms(20))), Some(1));
        // The request that asked went away (its client left): the lease is
        // not left "asked for" forever.
        drop(Asked {
            leases: &leases,
            keys: vec![("k".to_owned(), 30)],
        });
        assert_eq!(ask(&leases.take("k", 30, ms(20))), Some(30));
        leases.granted("k", 30, Some((29, 500, Duration::from_secs(1))), ms(21));
        // Taken from the lease, with Redis's count plus the lease's.
        let mut refills = Vec::new();
        for _ in 0..29 {
            match leases.take("k", 30, ms(22)) {
                Leased::Taken {
                    remaining, refill, ..
                } => {
                    assert!(remaining >= 500, "{remaining}");
                    refills.extend(refill);
                }
                Leased::Ask(n) => panic!("asked for {n} with a lease left"),
            }
        }
        // One top-up, when half was used: up to the size again, no more.
        assert_eq!(refills, [15], "topped up once, to 30");
        // Used up before the top-up came: the next one asks for itself.
        assert_eq!(ask(&leases.take("k", 30, ms(23))), Some(1));
        leases.granted("k", 15, Some((15, 400, Duration::from_secs(1))), ms(24));
        assert!(matches!(leases.take("k", 30, ms(25)), Leased::Taken { .. }));
        // Unused past its TTL, it is gone; after a pause, the demand starts
        // from one again.
        assert_eq!(ask(&leases.take("k", 30, ms(200))), Some(1));
        let held = leases.0.lock().unwrap()["k"].tokens;
        assert_eq!(held, 0);
    }

    /// Whatever the demand and however the calls end, a lease is marked
    /// "asked for" only while a call that asked for it is out: a mark left
    /// behind would stop the bucket's leasing for good (the first version
    /// left one after a top-up of one, and the bench saw leasing stop).
    #[test]
    fn a_lease_is_asked_for_only_while_a_call_is_out() {
        let leases = Leases::default();
        let t0 = Instant::now();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        let mut out: Vec<u64> = Vec::new();
        let mut at = Duration::ZERO;
        for _ in 0..200_000 {
            // Bursts and pauses: demand from 0 to a few per millisecond.
            at += Duration::from_micros(next(3) * next(400) + 1);
            let now = t0 + at;
            let max = [2, 3, 5, 30][next(4) as usize];
            match leases.take("k", max, now) {
                Leased::Ask(n) if n > 1 => out.push(n),
                Leased::Taken {
                    refill: Some(n), ..
                } => out.push(n),
                _ => {}
            }
            // Calls end in any order, granted in part, in full or failed.
            if !out.is_empty() && next(3) == 0 {
                let n = out.swap_remove(next(out.len() as u64) as usize);
                let grant = match next(3) {
                    0 => None,
                    1 => Some((next(n + 1), 10, Duration::ZERO)),
                    _ => Some((n, 10, Duration::ZERO)),
                };
                leases.granted("k", n, grant, now);
            }
            let map = leases.0.lock().unwrap();
            if let Some(l) = map.get("k") {
                assert_eq!(l.asking, !out.is_empty(), "{out:?}");
                assert!(out.len() <= 1, "one lease call at a time: {out:?}");
                assert!(l.tokens <= l.size.max(30), "{} held", l.tokens);
            }
        }
    }

    /// Many callers at once: each gets its own answer (every key has its own
    /// rate, so a reply handed to the wrong caller shows), and they share
    /// writes (pipelining), which one call per connection would not.
    #[tokio::test]
    async fn concurrent_calls_are_pipelined_and_each_gets_its_answer() {
        let Some((_server, redis)) = redis_server().await else {
            return;
        };
        let redis = Arc::new(redis);
        // Loaded once, so each call below is one EVALSHA.
        redis
            .gcra(
                &["weft:rl:warm"],
                &args(&Gcra::new(1, Duration::from_secs(1), 1, 1)),
            )
            .await
            .unwrap();
        let before = redis.conns[0].writes.load(Relaxed);
        const N: u32 = 200;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..N {
            let redis = redis.clone();
            tasks.spawn(async move {
                // i + 1 an hour, a burst of 3: T = 3600 s / (i + 1).
                let g = Gcra::new(i + 1, Duration::from_secs(3600), 3, 1);
                let got = redis.gcra(&[&format!("weft:rl:many:{i}")], &args(&g)).await;
                let (t, burst) = (g.interval / 1000, g.tolerance / 1000);
                assert_eq!(got.unwrap(), [(1, burst - t, t)], "caller {i}");
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let writes = redis.conns[0].writes.load(Relaxed) - before;
        assert!(writes * 4 <= u64::from(N), "{N} calls took {writes} writes");
    }

    /// A caller that gives up before its reply comes does not shift the
    /// replies: the next callers on every connection get their own.
    #[tokio::test]
    async fn a_caller_that_times_out_does_not_desync_the_next() {
        let Some((_server, redis)) = redis_server().await else {
            return;
        };
        // Busy for 200ms in Redis, then a reply no other call would expect.
        let slow = "local s = redis.call('TIME')\n\
                    local start = s[1] * 1000000 + s[2]\n\
                    repeat local t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > 200000\n\
                    return 'slow'";
        for _ in 0..CONNS {
            let late = tokio::time::timeout(
                Duration::from_millis(20),
                redis.call(&[b"EVAL", slow.as_bytes(), b"0"]),
            )
            .await;
            assert!(late.is_err(), "the slow script answered in 20ms");
        }
        let g = Gcra::new(10, Duration::from_secs(60), 3, 1);
        for i in 0..2 * CONNS {
            redis.ping().await.unwrap();
            let got = redis
                .gcra(&[&format!("weft:rl:after:{i}")], &args(&g))
                .await;
            assert_eq!(got.unwrap(), [(1, 12_000_000, 6_000_000)]);
        }
    }

    #[test]
    fn redis_call_times_render_as_a_prometheus_histogram() {
        let times = CallTimes {
            counts: [const { AtomicU64::new(0) }; CALL_BUCKETS.len() + 1],
            sum_ns: AtomicU64::new(0),
        };
        times.observe(Duration::from_micros(120));
        times.observe(Duration::from_micros(150));
        times.observe(Duration::from_millis(3));
        times.observe(Duration::from_secs(2));
        let mut out = String::new();
        times.render(&mut out);
        let line = |le: &str| {
            let want = format!("weft_ratelimit_redis_call_seconds_bucket{{le=\"{le}\"}} ");
            out.lines()
                .find_map(|l| l.strip_prefix(&want))
                .unwrap_or_else(|| panic!("no bucket {le} in\n{out}"))
                .to_owned()
        };
        // Cumulative; a bound is inclusive (150 µs is in le=0.00015).
        assert_eq!(line("0.0001"), "0");
        assert_eq!(line("0.00015"), "2");
        assert_eq!(line("0.005"), "3");
        assert_eq!(line("1"), "3");
        assert_eq!(line("+Inf"), "4");
        assert!(
            out.contains("weft_ratelimit_redis_call_seconds_count 4\n"),
            "{out}"
        );
        assert!(
            out.contains("weft_ratelimit_redis_call_seconds_sum 2.00327\n"),
            "{out}"
        );
        assert!(out.starts_with("# HELP weft_ratelimit_redis_call_seconds "));
    }

    /// A caller that gives up while it is writing (Redis stopped reading:
    /// the socket is full) leaves part of a command on the connection: that
    /// connection is closed, and the calls after it, on a new one, get their
    /// own answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_mid_write_does_not_corrupt_the_connection() {
        let Some((server, redis)) = redis_server().await else {
            return;
        };
        let redis = Arc::new(redis);
        for _ in 0..CONNS {
            redis.ping().await.unwrap();
        }
        let pid = server.0.id() as i32;
        // SAFETY: signals to the child this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let big = vec![b'x'; 32 << 20];
        for _ in 0..CONNS {
            let cut = tokio::time::timeout(
                Duration::from_millis(200),
                redis.call(&[b"SET", b"weft:big", &big]),
            )
            .await;
            assert!(cut.is_err(), "32 MiB written to a stopped redis");
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let g = Gcra::new(10, Duration::from_secs(60), 3, 1);
        for i in 0..2 * CONNS {
            let got = tokio::time::timeout(
                Duration::from_secs(5),
                redis.gcra(&[&format!("weft:rl:cut:{i}")], &args(&g)),
            )
            .await
            .expect("answered");
            assert_eq!(got.unwrap(), [(1, 12_000_000, 6_000_000)], "call {i}");
            redis.ping().await.unwrap();
        }
    }

    /// Redis killed: the calls fail (`Io` on the open connection, then
    /// `Connect`) without hanging; restarted on the same port, every call
    /// after the backoff connects again.
    #[tokio::test]
    async fn the_client_reconnects_after_redis_restarts() {
        let Some((server, redis)) = redis_server().await else {
            return;
        };
        let port = redis.conns[0].addr.rsplit(':').next().unwrap().to_owned();
        drop(server);
        for _ in 0..2 * CONNS {
            let e = tokio::time::timeout(Duration::from_secs(1), redis.ping())
                .await
                .expect("a call to a dead redis fails at once")
                .unwrap_err();
            assert!(
                matches!(e, RedisError::Io(_) | RedisError::Connect(_)),
                "{e}"
            );
        }
        let _server = Server(
            std::process::Command::new("redis-server")
                .args(["--port", &port, "--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        listening(&port).await;
        tokio::time::sleep(BACKOFF).await;
        for _ in 0..2 * CONNS {
            redis.ping().await.unwrap();
        }
    }
}
