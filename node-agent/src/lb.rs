//! Load balancing for service VIPs: which endpoint a new connection goes to, and
//! which endpoints sit out for a while because connects to them keep failing.
//!
//! Pure logic, no I/O and no clock of its own: every call takes `now`, so tests drive
//! time explicitly. The proxy keeps one [`Balancer`] per service across config
//! reloads ([`Balancer::update`]), and per connection calls [`Balancer::pick`],
//! connects, tells the outcome to [`Balancer::report`], and on failure picks again
//! with the endpoints already tried excluded.
//!
//! Which endpoints a pick chooses among, in order:
//! 1. never one in `tried`; none left: no pick;
//! 2. those not ejected by outlier detection; if every untried endpoint is ejected,
//!    all the untried ones (*panic mode*, as Envoy does: an endpoint that might be
//!    back is better than refusing the connection outright);
//! 3. with `prefer_same_node`, those on the client's node if any is left by 2.
//!
//! The policy then chooses one of them: smooth weighted round robin, weighted power of
//! two choices, or a hash ring over the client's address.
//!
//! Concurrency: all state sits behind one mutex per service, held only for the
//! choice itself (a pass over the endpoints, or a ring lookup), never across I/O. The
//! active count a least-request pick relies on is an atomic shared with the
//! [`Pick`], so releasing it takes no lock.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use ring::rand::{SecureRandom, SystemRandom};

use crate::model::{LbPolicy, OutlierDetection, Workload, WorkloadId, WorkloadKey};

/// Hash-ring points per unit of weight. An endpoint's share of the ring is the sum of
/// the arcs ending at its points; with `p` points it deviates from its due by about
/// `1/sqrt(p)` (relative standard deviation): 3% at 1024, where Ketama's customary
/// 100 to 160 would leave 8 to 10%, and a client share off by a fifth not rare.
const RING_POINTS_PER_WEIGHT: u64 = 1024;

/// At most this many ring points per service (8 bytes each: 512 KiB), whatever the
/// weights. Below the bound an endpoint's points depend only on its own key and
/// weight, so a change to the endpoints moves only the clients it must; at the bound
/// the points are scaled down by the total weight, and a change moves a few more.
const MAX_RING_POINTS: u64 = 1 << 16;

/// Ejections longer than this are cut to it, so `now + duration` cannot overflow
/// whatever the config says (a century is "until the next restart" in practice).
const LONGEST_EJECTION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// An endpoint as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The view's workload, shared (a refcount: every pod of a cluster is
    /// some service's endpoint, and a copy of its key is ~80 bytes), and
    /// handed to each [`Pick`] without copying a string.
    pub workload: Arc<Workload>,
    /// Relative share of connections; 0 counts as 1 (validation allows 1 to 1000).
    pub weight: u32,
    /// Whether it runs on this agent's node (for `prefer_same_node`).
    pub same_node: bool,
}

/// An endpoint chosen for a new connection. It counts as one active request on the
/// endpoint (what least-request compares) until it is dropped, so keep it alive as
/// long as the connection.
#[derive(Debug)]
pub struct Pick {
    pub workload: Arc<Workload>,
    /// Chosen in panic mode: every endpoint not yet tried is ejected.
    pub panic: bool,
    /// The endpoint's counters, shared with the balancer; outlive the
    /// endpoint's removal by `update`.
    load: Arc<Load>,
}

impl WorkloadId for Pick {
    fn id(&self) -> (&str, &str) {
        self.workload.id()
    }
}

/// No endpoint tried yet: `tried` of a first [`Balancer::pick`].
pub const UNTRIED: &[WorkloadKey] = &[];

/// An endpoint's counters, shared by the balancer and its live picks.
#[derive(Debug, Default)]
struct Load {
    /// Live picks.
    active: AtomicUsize,
    /// Latency EWMA in µs, fed by L7 picks ([`Pick::observe`]); 0: none.
    latency: AtomicU64,
}

impl Pick {
    /// Records how long the endpoint took to answer (at L7, to a response's
    /// head), into its moving average: least request then weighs each
    /// endpoint's active requests by its latency (Peak EWMA, as Finagle and
    /// Linkerd do), so a slow replica gets less. A connection proxy (L4) has
    /// no such measure and never calls this: it balances on counts alone.
    pub fn observe(&self, took: std::time::Duration) {
        let sample = (took.as_micros() as u64).max(1);
        let old = self.load.latency.load(Relaxed);
        // Peak-sensitive: a slower sample counts at once, a faster one decays
        // in (weight 1/4), so a replica that stalls is avoided quickly and
        // trusted again gradually.
        let new = if old == 0 || sample > old {
            sample
        } else {
            old - (old - sample) / 4
        };
        self.load.latency.store(new, Relaxed);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.load.active.fetch_sub(1, Relaxed);
    }
}

/// An ejection that a [`Balancer::report`] caused, for the caller to log and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    pub key: WorkloadKey,
    /// How long it is out.
    pub duration: Duration,
    /// The failures in a row that ejected it.
    pub consecutive_failures: u32,
}

/// One endpoint's state, for admin and status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointState {
    pub key: WorkloadKey,
    pub weight: u32,
    pub same_node: bool,
    /// Live [`Pick`]s on it.
    pub active: usize,
    /// Connect failures since its last success (or re-admission).
    pub consecutive_failures: u32,
    /// Set while it is ejected.
    pub ejected_until: Option<Instant>,
    /// Ejections since it joined the service.
    pub ejections: u64,
}

/// The load balancer of one service. Shared by every connection to the service
/// (through an `Arc`); lives across config reloads.
pub struct Balancer {
    inner: Mutex<Inner>,
}

struct Inner {
    policy: LbPolicy,
    prefer_same_node: bool,
    outlier: OutlierDetection,
    /// Sorted by key, one per key: the same order on every agent, which the hash
    /// ring's tie-break relies on, and a binary search finds an endpoint.
    endpoints: Vec<Endpoint>,
    /// Built for `ConsistentHash` only; its endpoint indices are into `endpoints`.
    ring: Option<Arc<Ring>>,
    rng: WyRand,
}

struct Endpoint {
    spec: EndpointSpec,
    load: Arc<Load>,
    /// Smooth weighted round robin's current weight (nginx's `current_weight`).
    current: i64,
    consecutive_failures: u32,
    /// The exponent of the next ejection's doubling: one more per ejection (until the
    /// cap is reached), one less per success.
    backoff: u32,
    ejected_until: Option<Instant>,
    ejections: u64,
}

impl Endpoint {
    fn new(spec: EndpointSpec) -> Self {
        Endpoint {
            spec,
            load: Arc::default(),
            current: 0,
            consecutive_failures: 0,
            backoff: 0,
            ejected_until: None,
            ejections: 0,
        }
    }

    /// Re-admission is implicit: an ejection simply ends at `ejected_until`.
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }

    fn weight(&self) -> u64 {
        u64::from(self.spec.weight)
    }
}

/// Which endpoints one pick may choose among (see the module doc).
struct Eligible {
    /// Indices of the tried endpoints (a handful at most: retries are bounded).
    tried: Vec<usize>,
    /// Panic mode: ejected endpoints are eligible too.
    panic: bool,
    same_node_only: bool,
    now: Instant,
}

impl Eligible {
    fn admits(&self, i: usize, ep: &Endpoint) -> bool {
        !self.tried.contains(&i)
            && (self.panic || !ep.ejected(self.now))
            && (!self.same_node_only || ep.spec.same_node)
    }
}

impl Balancer {
    pub fn new(
        policy: LbPolicy,
        prefer_same_node: bool,
        outlier: OutlierDetection,
        endpoints: Vec<EndpointSpec>,
    ) -> Balancer {
        let balancer = Balancer {
            inner: Mutex::new(Inner {
                policy,
                prefer_same_node,
                outlier,
                endpoints: Vec::new(),
                ring: None,
                rng: WyRand::from_system(),
            }),
        };
        balancer.update(policy, prefer_same_node, outlier, endpoints);
        balancer
    }

    /// A config reload: new endpoint set and settings. Endpoints that stay keep their
    /// state (outlier state, active count, round-robin position); removed ones are
    /// forgotten, and one added back later starts afresh. A key listed twice counts
    /// once (the first entry). Ejections in progress run their course even if the new
    /// settings or a smaller set would not allow as many.
    pub fn update(
        &self,
        policy: LbPolicy,
        prefer_same_node: bool,
        outlier: OutlierDetection,
        endpoints: Vec<EndpointSpec>,
    ) {
        let mut specs = endpoints;
        for spec in &mut specs {
            spec.weight = spec.weight.max(1);
        }
        // Stable, so of two entries with one key the first stays.
        specs.sort_by(|a, b| a.workload.id().cmp(&b.workload.id()));
        specs.dedup_by(|later, earlier| later.workload.id() == earlier.workload.id());

        // The ring is a pure function of the keys and weights: reuse it when they
        // did not change, and build it outside the lock when they did, so that picks
        // never wait for a rebuild.
        let ring = (policy == LbPolicy::ConsistentHash).then(|| {
            let current = self.lock().ring.clone();
            match current {
                Some(ring) if ring.is_for(&specs) => ring,
                _ => Arc::new(Ring::build(&specs)),
            }
        });

        let mut inner = self.lock();
        inner.policy = policy;
        inner.prefer_same_node = prefer_same_node;
        inner.outlier = outlier;
        inner.ring = ring;
        // Both lists are sorted by key: carry each survivor's state over in one pass.
        let mut old = std::mem::take(&mut inner.endpoints).into_iter().peekable();
        inner.endpoints = specs
            .into_iter()
            .map(|spec| {
                let id = spec.workload.id();
                while old.next_if(|ep| ep.spec.workload.id() < id).is_some() {}
                match old.next_if(|ep| ep.spec.workload.id() == id) {
                    Some(mut ep) => {
                        ep.spec = spec;
                        ep
                    }
                    None => Endpoint::new(spec),
                }
            })
            .collect();
    }

    /// Picks an endpoint for a new connection from `client` (the source pod's
    /// address; consistent hash uses it), skipping `tried`. `None` only when every
    /// endpoint is tried or there is none: when all untried ones are ejected, one of
    /// them is picked anyway (panic mode, flagged on the [`Pick`]).
    pub fn pick(&self, client: IpAddr, tried: &[impl WorkloadId], now: Instant) -> Option<Pick> {
        let mut inner = self.lock();
        let (i, panic) = inner.choose(client, tried, now)?;
        let ep = &inner.endpoints[i];
        ep.load.active.fetch_add(1, Relaxed);
        Some(Pick {
            workload: ep.spec.workload.clone(),
            panic,
            load: ep.load.clone(),
        })
    }

    /// The outcome of a connect attempt to `key`. A success resets its
    /// consecutive-failure count and takes one step off its ejection backoff; the
    /// `consecutive_failures`-th failure in a row ejects it for `base_ejection_time *
    /// 2^backoff` (at most `max_ejection_time`), unless that would leave more than
    /// `max_ejection_percent` of the endpoints ejected at once. One endpoint may
    /// always be ejected when there are at least two; the only endpoint never is
    /// (there is nothing else to send to). A refused ejection keeps the failures
    /// counted, so the next failure tries again.
    ///
    /// Reports about an endpoint while it is ejected (connects started before, or in
    /// panic mode) change nothing: its count starts from zero when it is re-admitted.
    /// Reports about an endpoint no longer in the set are ignored.
    ///
    /// Returns the ejection this report caused, if any.
    pub fn report(&self, key: &impl WorkloadId, ok: bool, now: Instant) -> Option<Ejection> {
        let mut inner = self.lock();
        let i = inner.position(key)?;
        let od = inner.outlier;
        let ep = &mut inner.endpoints[i];
        if ep.ejected(now) {
            return None;
        }
        if ok {
            ep.consecutive_failures = 0;
            ep.backoff = ep.backoff.saturating_sub(1);
            return None;
        }
        ep.consecutive_failures = ep.consecutive_failures.saturating_add(1);
        if ep.consecutive_failures < od.consecutive_failures.max(1) {
            return None;
        }
        let total = inner.endpoints.len();
        let others_ejected = inner
            .endpoints
            .iter()
            .enumerate()
            .filter(|(j, other)| *j != i && other.ejected(now))
            .count();
        let room = total >= 2
            && (others_ejected == 0
                || (others_ejected + 1) * 100 <= usize::from(od.max_ejection_percent) * total);
        if !room {
            return None;
        }
        let ep = &mut inner.endpoints[i];
        let factor = 1u32.checked_shl(ep.backoff).unwrap_or(u32::MAX);
        let duration = od
            .base_ejection_time
            .saturating_mul(factor)
            .min(od.max_ejection_time)
            .min(LONGEST_EJECTION);
        if duration < od.max_ejection_time {
            ep.backoff = ep.backoff.saturating_add(1);
        }
        let ejection = Ejection {
            key: ep.spec.workload.key(),
            duration,
            consecutive_failures: ep.consecutive_failures,
        };
        ep.ejected_until = Some(now + duration);
        ep.ejections += 1;
        ep.consecutive_failures = 0;
        Some(ejection)
    }

    /// Every endpoint's state, sorted by key.
    pub fn snapshot(&self, now: Instant) -> Vec<EndpointState> {
        let inner = self.lock();
        inner
            .endpoints
            .iter()
            .map(|ep| EndpointState {
                key: ep.spec.workload.key(),
                weight: ep.spec.weight,
                same_node: ep.spec.same_node,
                active: ep.load.active.load(Relaxed),
                consecutive_failures: ep.consecutive_failures,
                ejected_until: ep.ejected_until.filter(|until| *until > now),
                ejections: ep.ejections,
            })
            .collect()
    }

    /// The state is consistent between statements (nothing in here panics midway
    /// through a change), so a panic elsewhere while holding the lock leaves it
    /// usable.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn position(&self, key: &impl WorkloadId) -> Option<usize> {
        let id = key.id();
        self.endpoints
            .binary_search_by(|ep| ep.spec.workload.id().cmp(&id))
            .ok()
    }

    /// The index of the chosen endpoint, and whether it was chosen in panic mode.
    fn choose(
        &mut self,
        client: IpAddr,
        tried: &[impl WorkloadId],
        now: Instant,
    ) -> Option<(usize, bool)> {
        let tried: Vec<usize> = tried.iter().filter_map(|k| self.position(k)).collect();
        let (mut untried, mut healthy, mut untried_local, mut healthy_local) =
            (false, false, false, false);
        for (i, ep) in self.endpoints.iter().enumerate() {
            if tried.contains(&i) {
                continue;
            }
            let up = !ep.ejected(now);
            untried = true;
            healthy |= up;
            if ep.spec.same_node {
                untried_local = true;
                healthy_local |= up;
            }
        }
        if !untried {
            return None;
        }
        let panic = !healthy;
        let eligible = Eligible {
            tried,
            panic,
            same_node_only: self.prefer_same_node
                && if panic { untried_local } else { healthy_local },
            now,
        };
        let i = match self.policy {
            LbPolicy::RoundRobin => self.round_robin(&eligible),
            LbPolicy::LeastRequest => self.least_request(&eligible),
            LbPolicy::ConsistentHash => self.consistent_hash(client, &eligible),
        };
        // Every policy finds one when `eligible` admits any, which the pass above
        // made sure of; the fallback only guards against a slip.
        let i = i.or_else(|| {
            (0..self.endpoints.len()).find(|&i| eligible.admits(i, &self.endpoints[i]))
        })?;
        Some((i, panic))
    }

    /// nginx's smooth weighted round robin: every eligible endpoint gains its
    /// weight, the one with the most is chosen and loses the total. Weights 3:1 give
    /// a a b a, not a a a b; equal weights give plain rotation. Endpoints not
    /// eligible this time keep their current weight.
    fn round_robin(&mut self, eligible: &Eligible) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, ep) in self.endpoints.iter_mut().enumerate() {
            if !eligible.admits(i, ep) {
                continue;
            }
            let weight = i64::from(ep.spec.weight);
            ep.current += weight;
            total += weight;
            if best.is_none_or(|(_, current)| ep.current > current) {
                best = Some((i, ep.current));
            }
        }
        let (i, _) = best?;
        self.endpoints[i].current -= total;
        Some(i)
    }

    /// Power of two choices: two distinct endpoints drawn at random in proportion
    /// to their weights; the one with fewer active picks per unit of weight wins
    /// (the first drawn on a tie).
    fn least_request(&mut self, eligible: &Eligible) -> Option<usize> {
        let (mut count, mut total) = (0usize, 0u64);
        for (i, ep) in self.endpoints.iter().enumerate() {
            if eligible.admits(i, ep) {
                count += 1;
                total += ep.weight();
            }
        }
        let first = self.draw(eligible, total, None)?;
        if count < 2 {
            return Some(first);
        }
        let rest = total - self.endpoints[first].weight();
        let Some(second) = self.draw(eligible, rest, Some(first)) else {
            return Some(first);
        };
        let (a, b) = (&self.endpoints[first], &self.endpoints[second]);
        // a.active / a.weight <= b.active / b.weight, without division; at L7
        // each side's (active + 1) is weighed by its latency EWMA (an endpoint
        // not yet measured counts as the fastest, so it gets measured).
        let (la, lb) = (a.load.latency.load(Relaxed), b.load.latency.load(Relaxed));
        let measured = la != 0 || lb != 0;
        let load = |ep: &Endpoint, lat: u64, other: &Endpoint| {
            let active = ep.load.active.load(Relaxed) as u64;
            let cost = if measured {
                u128::from(active + 1) * u128::from(lat.max(1))
            } else {
                u128::from(active)
            };
            cost * u128::from(other.weight())
        };
        let (load_a, load_b) = (load(a, la, b), load(b, lb, a));
        Some(if load_a <= load_b { first } else { second })
    }

    /// An eligible endpoint other than `except`, drawn in proportion to its weight;
    /// `total` is the weight of those it draws from.
    fn draw(&mut self, eligible: &Eligible, total: u64, except: Option<usize>) -> Option<usize> {
        if total == 0 {
            return None;
        }
        let mut r = self.rng.below(total);
        for (i, ep) in self.endpoints.iter().enumerate() {
            if Some(i) == except || !eligible.admits(i, ep) {
                continue;
            }
            if r < ep.weight() {
                return Some(i);
            }
            r -= ep.weight();
        }
        None
    }

    /// The first point clockwise from the client's hash whose endpoint is eligible:
    /// a client stays on its endpoint while that one is eligible, and while it is
    /// not, its clients go to the next endpoint round the ring (spread over the
    /// others, as the endpoint's points are) and come back afterwards.
    fn consistent_hash(&self, client: IpAddr, eligible: &Eligible) -> Option<usize> {
        let ring = self.ring.as_ref()?;
        ring.lookup(client_point(client), |i| {
            eligible.admits(i, &self.endpoints[i])
        })
    }
}

/// A ketama-style hash ring: points on a 32-bit circle, each owned by an endpoint,
/// as many per endpoint as its weight times [`RING_POINTS_PER_WEIGHT`] (see
/// [`MAX_RING_POINTS`]). An endpoint's points are a prefix of one sequence seeded by
/// its key, so they do not depend on the other endpoints (below the bound), and
/// every agent builds the same ring from the same endpoints.
struct Ring {
    /// What it was built from, to reuse it across reloads that keep them.
    members: Vec<(Arc<Workload>, u32)>,
    /// `(point, endpoint index)`, sorted. Indices follow key order, so two endpoints
    /// on one point (rare, but possible in 32 bits) are ordered the same everywhere.
    points: Vec<(u32, u32)>,
}

impl Ring {
    /// `specs` are sorted by key, one per key, weights at least 1.
    fn build(specs: &[EndpointSpec]) -> Ring {
        let total_weight: u64 = specs.iter().map(|s| u64::from(s.weight)).sum();
        let scaled = total_weight.saturating_mul(RING_POINTS_PER_WEIGHT) > MAX_RING_POINTS;
        let points_for = |weight: u32| {
            if scaled {
                (u64::from(weight) * MAX_RING_POINTS / total_weight).max(1)
            } else {
                u64::from(weight) * RING_POINTS_PER_WEIGHT
            }
        };
        let mut points =
            Vec::with_capacity(specs.iter().map(|s| points_for(s.weight)).sum::<u64>() as usize);
        for (i, spec) in specs.iter().enumerate() {
            let seed = key_seed(spec.workload.id());
            points.extend((0..points_for(spec.weight)).map(|v| (vnode_point(seed, v), i as u32)));
        }
        points.sort_unstable();
        Ring {
            members: specs
                .iter()
                .map(|s| (s.workload.clone(), s.weight))
                .collect(),
            points,
        }
    }

    fn is_for(&self, specs: &[EndpointSpec]) -> bool {
        self.members.len() == specs.len()
            && self
                .members
                .iter()
                .zip(specs)
                .all(|((w, weight), s)| w.id() == s.workload.id() && *weight == s.weight)
    }

    fn lookup(&self, hash: u32, mut admits: impl FnMut(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        let start = self.points.partition_point(|&(point, _)| point < hash);
        (0..n)
            .map(|k| self.points[(start + k) % n].1 as usize)
            .find(|&i| admits(i))
    }
}

// Seed-free hashing, fixed forever: every agent (of every version) must map a client
// to the same point, and an endpoint to the same points. FNV-1a over the bytes, then
// SplitMix64's finalizer, which FNV needs for short inputs such as addresses.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An IPv4-mapped IPv6 address hashes as the IPv4 address it carries.
fn client_point(client: IpAddr) -> u32 {
    let hash = match client.to_canonical() {
        IpAddr::V4(a) => fnv1a(FNV_OFFSET, &a.octets()),
        IpAddr::V6(a) => fnv1a(FNV_OFFSET, &a.octets()),
    };
    (mix64(hash) >> 32) as u32
}

/// Over `namespace/name` (neither may contain a `/`).
fn key_seed((namespace, name): (&str, &str)) -> u64 {
    let hash = fnv1a(FNV_OFFSET, namespace.as_bytes());
    fnv1a(fnv1a(hash, b"/"), name.as_bytes())
}

/// The `v`-th point of an endpoint: the SplitMix64 sequence seeded by its key.
fn vnode_point(seed: u64, v: u64) -> u32 {
    (mix64(seed.wrapping_add(v.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA))) >> 32) as u32
}

thread_local! {
    static RNG: std::cell::RefCell<WyRand> = std::cell::RefCell::new(WyRand::from_system());
}

/// A random number from this thread's generator (wyrand): for draws that
/// spread load (weighted backends, mirror percentages, jitter), not secrets.
pub fn random() -> u64 {
    RNG.with(|r| r.borrow_mut().next())
}

/// wyrand: fast, small, good enough to draw endpoints (not for secrets). Seeded from
/// the system, so agents do not all draw alike.
struct WyRand(u64);

impl WyRand {
    fn from_system() -> Self {
        let mut seed = [0u8; 8];
        // The system generator does not fail on Linux once booted; if it ever did, a
        // clock-based seed still spreads load.
        if SystemRandom::new().fill(&mut seed).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            seed = nanos.to_le_bytes();
        }
        WyRand(u64::from_le_bytes(seed))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Uniform in `0..n` (Lemire's multiply; the bias is below 2^-32 for any `n`
    /// a balancer sees).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, HashMap},
        net::Ipv4Addr,
    };

    use super::*;

    fn key(name: &str) -> WorkloadKey {
        WorkloadKey {
            namespace: "default".to_owned(),
            name: name.to_owned(),
        }
    }

    fn ep(name: &str, weight: u32) -> EndpointSpec {
        EndpointSpec {
            workload: Arc::new(Workload {
                name: name.to_owned(),
                namespace: "default".to_owned(),
                service_account: "default".to_owned(),
                node: "n".to_owned(),
                addresses: vec![],
                enrolled: true,
                outside_mesh: Default::default(),
                labels: Default::default(),
                native_tunnel: false,
            }),
            weight,
            same_node: false,
        }
    }

    fn local(name: &str) -> EndpointSpec {
        EndpointSpec {
            same_node: true,
            ..ep(name, 1)
        }
    }

    fn od(consecutive_failures: u32, max_ejection_percent: u8) -> OutlierDetection {
        OutlierDetection {
            consecutive_failures,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(100),
            max_ejection_percent,
        }
    }

    fn balancer(policy: LbPolicy, endpoints: Vec<EndpointSpec>) -> Balancer {
        Balancer::new(policy, false, od(3, 50), endpoints)
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i))
    }

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 7));
    const POLICIES: [LbPolicy; 3] = [
        LbPolicy::RoundRobin,
        LbPolicy::LeastRequest,
        LbPolicy::ConsistentHash,
    ];

    fn name(pick: &Pick) -> &str {
        &pick.workload.name
    }

    /// Fails `name` until it is ejected; returns the ejection.
    fn eject(b: &Balancer, name: &str, now: Instant) -> Ejection {
        for _ in 0..100 {
            if let Some(e) = b.report(&key(name), false, now) {
                return e;
            }
        }
        panic!("{name} was not ejected");
    }

    fn counts(picks: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for p in picks {
            *counts.entry(p).or_default() += 1;
        }
        counts
    }

    #[test]
    fn balancer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Balancer>();
        check::<Pick>();
    }

    #[test]
    fn round_robin_rotates_equal_weights_exactly() {
        let b = balancer(
            LbPolicy::RoundRobin,
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        let now = Instant::now();
        let picks: Vec<String> = (0..3000)
            .map(|_| name(&b.pick(CLIENT, UNTRIED, now).unwrap()).to_owned())
            .collect();
        assert_eq!(&picks[..6], ["a", "b", "c", "a", "b", "c"]);
        let counts = counts(picks);
        assert!(counts.values().all(|&n| n == 1000), "{counts:?}");
    }

    #[test]
    fn round_robin_is_exact_under_concurrency() {
        let b = balancer(
            LbPolicy::RoundRobin,
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        let now = Instant::now();
        let picks: Vec<String> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..750)
                            .map(|_| name(&b.pick(CLIENT, UNTRIED, now).unwrap()).to_owned())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let counts = counts(picks);
        assert!(counts.values().all(|&n| n == 1000), "{counts:?}");
    }

    #[test]
    fn round_robin_weights_three_to_one_interleave() {
        let b = balancer(LbPolicy::RoundRobin, vec![ep("a", 3), ep("b", 1)]);
        let now = Instant::now();
        let picks: Vec<String> = (0..4000)
            .map(|_| name(&b.pick(CLIENT, UNTRIED, now).unwrap()).to_owned())
            .collect();
        // Every window of four holds exactly one b, and a never runs three times in
        // a row before b: a a b a, a a b a, ...
        for window in picks.chunks(4) {
            assert_eq!(window, ["a", "a", "b", "a"]);
        }
        assert_eq!(
            counts(picks),
            BTreeMap::from([("a".into(), 3000), ("b".into(), 1000)])
        );
    }

    #[test]
    fn least_request_spreads_concurrent_picks_evenly() {
        let b = balancer(
            LbPolicy::LeastRequest,
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        let now = Instant::now();
        let held: Vec<Pick> = (0..3000)
            .map(|_| b.pick(CLIENT, UNTRIED, now).unwrap())
            .collect();
        let counts = counts(held.iter().map(|p| name(p).to_owned()));
        assert!(
            counts.values().all(|&n| n.abs_diff(1000) <= 50),
            "{counts:?}"
        );
        let active: Vec<usize> = b.snapshot(now).iter().map(|s| s.active).collect();
        assert_eq!(active.iter().sum::<usize>(), 3000);
        drop(held);
        assert!(b.snapshot(now).iter().all(|s| s.active == 0));
    }

    #[test]
    fn least_request_follows_weights() {
        let b = balancer(LbPolicy::LeastRequest, vec![ep("a", 2), ep("b", 1)]);
        let now = Instant::now();
        let held: Vec<Pick> = (0..3000)
            .map(|_| b.pick(CLIENT, UNTRIED, now).unwrap())
            .collect();
        let counts = counts(held.iter().map(|p| name(p).to_owned()));
        assert!(counts["a"].abs_diff(2000) <= 100, "{counts:?}");
    }

    #[test]
    fn least_request_prefers_the_less_loaded() {
        let b = balancer(LbPolicy::LeastRequest, vec![ep("a", 1), ep("b", 1)]);
        let now = Instant::now();
        // Five connections on a (b excluded), then b catches up before a gets more.
        let on_a: Vec<Pick> = (0..5)
            .map(|_| b.pick(CLIENT, &[key("b")], now).unwrap())
            .collect();
        assert!(on_a.iter().all(|p| name(p) == "a"));
        let on_b: Vec<Pick> = (0..5)
            .map(|_| b.pick(CLIENT, UNTRIED, now).unwrap())
            .collect();
        assert!(on_b.iter().all(|p| name(p) == "b"));
        // Once a's connections close, a is the less loaded.
        drop(on_a);
        assert_eq!(name(&b.pick(CLIENT, UNTRIED, now).unwrap()), "a");
    }

    #[test]
    fn least_request_weighs_active_requests_by_latency_once_measured() {
        let b = balancer(LbPolicy::LeastRequest, vec![ep("a", 1), ep("b", 1)]);
        let now = Instant::now();
        // a answers in 10 ms, b in 1 ms (measured at L7 on each pick).
        let slow = b.pick(CLIENT, &[key("b")], now).unwrap();
        slow.observe(std::time::Duration::from_millis(10));
        let fast = b.pick(CLIENT, &[key("a")], now).unwrap();
        fast.observe(std::time::Duration::from_millis(1));
        drop((slow, fast));
        // With a handful in flight on the fast one, it still wins: (4 + 1) x 1 ms
        // is less than (0 + 1) x 10 ms.
        let held: Vec<Pick> = (0..4)
            .map(|_| b.pick(CLIENT, &[key("a")], now).unwrap())
            .collect();
        for _ in 0..20 {
            assert_eq!(name(&b.pick(CLIENT, UNTRIED, now).unwrap()), "b");
        }
        drop(held);
        // A faster sample decays in; a slower one counts at once.
        let p = b.pick(CLIENT, &[key("b")], now).unwrap();
        p.observe(std::time::Duration::from_millis(2));
        assert_eq!(p.load.latency.load(Relaxed), 8_000);
        p.observe(std::time::Duration::from_millis(50));
        assert_eq!(p.load.latency.load(Relaxed), 50_000);
    }

    fn placements(b: &Balancer, now: Instant) -> Vec<String> {
        (0..1000)
            .map(|i| name(&b.pick(client(i), UNTRIED, now).unwrap()).to_owned())
            .collect()
    }

    #[test]
    fn consistent_hash_keeps_clients_and_shares_evenly() {
        let b = balancer(
            LbPolicy::ConsistentHash,
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        let now = Instant::now();
        let first = placements(&b, now);
        for _ in 0..3 {
            assert_eq!(placements(&b, now), first);
        }
        // ±15% of a third, for 1000 clients (sampling noise alone is ±4.5%).
        let counts = counts(first.clone());
        assert_eq!(counts.len(), 3);
        assert!(
            counts.values().all(|&n| n.abs_diff(333) <= 50),
            "{counts:?}"
        );

        // Another agent, given the endpoints in another order, maps alike.
        let other = balancer(
            LbPolicy::ConsistentHash,
            vec![ep("c", 1), ep("a", 1), ep("b", 1)],
        );
        assert_eq!(placements(&other, now), first);
    }

    #[test]
    fn consistent_hash_ring_shares_are_within_a_few_percent() {
        let specs = vec![ep("a", 1), ep("b", 1), ep("c", 1)];
        let ring = Ring::build(&specs);
        assert_eq!(ring.points.len(), 3 * 1024);
        let mut owned = [0u64; 3];
        let n = ring.points.len();
        for k in 0..n {
            // Each point owns the arc from the previous point up to it.
            let (point, i) = ring.points[k];
            let prev = ring.points[(k + n - 1) % n].0;
            owned[i as usize] += u64::from(point.wrapping_sub(prev));
        }
        let third = (1u64 << 32) / 3;
        for share in owned {
            let deviation = share.abs_diff(third) as f64 / third as f64;
            assert!(deviation < 0.03, "{owned:?}");
        }
    }

    #[test]
    fn consistent_hash_is_pinned() {
        // The hash is part of the protocol between agents: a change here moves
        // clients when agents of two versions serve one service.
        assert_eq!(client_point("10.1.0.7".parse().unwrap()), 0x7c7a_db1f);
        assert_eq!(
            client_point("::ffff:10.1.0.7".parse().unwrap()),
            client_point("10.1.0.7".parse().unwrap())
        );
        assert_eq!(vnode_point(key_seed(key("a").id()), 0), 0x4da5_a4f2);
    }

    #[test]
    fn consistent_hash_moves_only_the_removed_endpoints_clients() {
        let b = balancer(
            LbPolicy::ConsistentHash,
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        let now = Instant::now();
        let before = placements(&b, now);
        b.update(
            LbPolicy::ConsistentHash,
            false,
            od(3, 50),
            vec![ep("a", 1), ep("c", 1)],
        );
        let after = placements(&b, now);
        for (was, is) in before.iter().zip(&after) {
            if was == "b" {
                assert_ne!(is, "b");
            } else {
                assert_eq!(was, is);
            }
        }
        // b's clients spread over both others.
        let moved = counts(
            before
                .iter()
                .zip(&after)
                .filter(|(was, _)| *was == "b")
                .map(|(_, is)| is.clone()),
        );
        assert!(moved.values().all(|&n| n > 100), "{moved:?}");

        // Adding it back restores the original placement.
        b.update(
            LbPolicy::ConsistentHash,
            false,
            od(3, 50),
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        assert_eq!(placements(&b, now), before);
    }

    #[test]
    fn consistent_hash_sends_an_ejected_endpoints_clients_elsewhere_until_it_is_back() {
        let b = balancer(
            LbPolicy::ConsistentHash,
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        let now = Instant::now();
        let before = placements(&b, now);
        let ejection = eject(&b, "b", now);
        let during = placements(&b, now + Duration::from_secs(1));
        for (was, is) in before.iter().zip(&during) {
            if was == "b" {
                assert_ne!(is, "b");
            } else {
                assert_eq!(was, is);
            }
        }
        // Tried endpoints are skipped the same way.
        let retried: Vec<String> = (0..1000)
            .map(|i| name(&b.pick(client(i), &[key("b")], now).unwrap()).to_owned())
            .collect();
        assert_eq!(retried, during);
        assert_eq!(placements(&b, now + ejection.duration), before);
    }

    #[test]
    fn consistent_hash_ring_size_is_bounded() {
        let specs: Vec<EndpointSpec> = (0..300).map(|i| ep(&format!("e{i:03}"), 1000)).collect();
        let ring = Ring::build(&specs);
        assert!(ring.points.len() as u64 <= MAX_RING_POINTS);
        // Weights still hold: 1000:1 with the bound in force.
        let mut specs = specs;
        specs[0].weight = 1;
        let ring = Ring::build(&specs);
        let of = |i: u32| ring.points.iter().filter(|p| p.1 == i).count();
        assert_eq!(of(0), 1);
        assert!(of(1) >= 200, "{}", of(1));
    }

    #[test]
    fn prefer_same_node_while_a_local_endpoint_is_eligible() {
        for policy in POLICIES {
            let b = Balancer::new(
                policy,
                true,
                od(1, 100),
                vec![ep("a", 1), local("b"), ep("c", 1)],
            );
            let now = Instant::now();
            for i in 0..100 {
                assert_eq!(
                    name(&b.pick(client(i), UNTRIED, now).unwrap()),
                    "b",
                    "{policy:?}"
                );
            }
            // Tried, then ejected: the others take over.
            let picked = b.pick(CLIENT, &[key("b")], now).unwrap();
            assert_ne!(name(&picked), "b", "{policy:?}");
            eject(&b, "b", now);
            let picked = b.pick(CLIENT, UNTRIED, now).unwrap();
            assert_ne!(name(&picked), "b", "{policy:?}");
            assert!(!picked.panic);

            // Without the preference, all three get picked.
            b.update(
                policy,
                false,
                od(1, 100),
                vec![ep("a", 1), local("b"), ep("c", 1)],
            );
            let later = now + Duration::from_secs(10);
            let picked = counts(
                (0..300).map(|i| name(&b.pick(client(i), UNTRIED, later).unwrap()).to_owned()),
            );
            assert_eq!(picked.len(), 3, "{policy:?}: {picked:?}");
        }
    }

    #[test]
    fn tried_endpoints_are_skipped() {
        for policy in POLICIES {
            let b = balancer(policy, vec![ep("a", 1), ep("b", 1), ep("c", 1)]);
            let now = Instant::now();
            for i in 0..100 {
                let p = b.pick(client(i), &[key("a"), key("c")], now).unwrap();
                assert_eq!(name(&p), "b", "{policy:?}");
                let p = b.pick(client(i), &[key("a")], now).unwrap();
                assert_ne!(name(&p), "a", "{policy:?}");
            }
            // A retry sequence visits each once, then there is nothing left.
            let mut tried = Vec::new();
            while let Some(p) = b.pick(CLIENT, &tried, now) {
                assert!(!tried.contains(&p.workload.key()), "{policy:?}");
                tried.push(p.workload.key());
            }
            assert_eq!(tried.len(), 3, "{policy:?}");
            // Unknown keys in `tried` are ignored.
            assert!(b.pick(CLIENT, &[key("zz")], now).is_some());
            let empty = balancer(policy, vec![]);
            assert!(empty.pick(CLIENT, UNTRIED, now).is_none());
        }
    }

    #[test]
    fn ejection_after_consecutive_failures_doubles_up_to_the_cap() {
        let b = balancer(LbPolicy::RoundRobin, vec![ep("a", 1), ep("b", 1)]);
        let mut now = Instant::now();
        // A success in between resets the count.
        assert_eq!(b.report(&key("a"), false, now), None);
        assert_eq!(b.report(&key("a"), false, now), None);
        assert_eq!(b.report(&key("a"), true, now), None);
        assert_eq!(b.report(&key("a"), false, now), None);
        assert_eq!(b.report(&key("a"), false, now), None);
        assert_eq!(
            b.report(&key("a"), false, now),
            Some(Ejection {
                key: key("a"),
                duration: Duration::from_secs(10),
                consecutive_failures: 3,
            })
        );
        // Ejected: never picked, and reports change nothing.
        for _ in 0..10 {
            assert_eq!(name(&b.pick(CLIENT, UNTRIED, now).unwrap()), "b");
            assert_eq!(b.report(&key("a"), false, now), None);
        }
        let state = &b.snapshot(now)[0];
        assert_eq!(state.ejected_until, Some(now + Duration::from_secs(10)));
        assert_eq!((state.ejections, state.consecutive_failures), (1, 0));

        // Re-admitted when the time is up, with its count reset: three more failures
        // eject it again, for twice as long, then up to the cap.
        let mut durations = Vec::new();
        for _ in 0..6 {
            let e = b.snapshot(now)[0].ejected_until.unwrap();
            assert_eq!(name(&b.pick(CLIENT, &[key("b")], e).unwrap()), "a");
            assert!(b.snapshot(e)[0].ejected_until.is_none());
            now = e;
            durations.push(eject(&b, "a", now).duration.as_secs());
        }
        assert_eq!(durations, [20, 40, 80, 100, 100, 100]);
        assert_eq!(b.snapshot(now)[0].ejections, 7);

        // Successes after re-admission bring the backoff down a step each.
        now += Duration::from_secs(100);
        assert!(b.report(&key("a"), true, now).is_none());
        assert_eq!(eject(&b, "a", now).duration.as_secs(), 80);
        now += Duration::from_secs(80);
        for _ in 0..10 {
            b.report(&key("a"), true, now);
        }
        assert_eq!(eject(&b, "a", now).duration.as_secs(), 10);
    }

    #[test]
    fn max_ejection_percent_limits_ejections_but_one_is_always_allowed() {
        let four = || vec![ep("a", 1), ep("b", 1), ep("c", 1), ep("d", 1)];
        // (percent, endpoints, how many of them can be ejected at once)
        let cases: [(u8, Vec<EndpointSpec>, usize); 6] = [
            (50, four(), 2),
            (74, four(), 2),
            (75, four(), 3),
            (0, four(), 1),
            (100, four(), 4),
            (0, vec![ep("a", 1), ep("b", 1)], 1),
        ];
        for (percent, endpoints, most) in cases {
            let n = endpoints.len();
            let b = Balancer::new(LbPolicy::RoundRobin, false, od(1, percent), endpoints);
            let now = Instant::now();
            let names: Vec<String> = b.snapshot(now).into_iter().map(|s| s.key.name).collect();
            let ejected = names
                .iter()
                .filter(|n| b.report(&key(n), false, now).is_some())
                .count();
            assert_eq!(ejected, most, "{percent}% of {n}");
        }

        // A refused ejection keeps counting, and happens once there is room.
        let b = Balancer::new(
            LbPolicy::RoundRobin,
            false,
            od(2, 50),
            vec![ep("a", 1), ep("b", 1)],
        );
        let now = Instant::now();
        eject(&b, "a", now);
        for _ in 0..5 {
            assert_eq!(b.report(&key("b"), false, now), None);
        }
        let later = now + Duration::from_secs(10);
        let e = b.report(&key("b"), false, later).unwrap();
        assert_eq!(e.consecutive_failures, 6);
    }

    #[test]
    fn the_only_endpoint_is_never_ejected() {
        let b = Balancer::new(LbPolicy::RoundRobin, false, od(1, 100), vec![ep("a", 1)]);
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.report(&key("a"), false, now), None);
        }
        let p = b.pick(CLIENT, UNTRIED, now).unwrap();
        assert!(!p.panic);
        assert_eq!(b.snapshot(now)[0].consecutive_failures, 10);
    }

    #[test]
    fn panic_mode_picks_ejected_endpoints_rather_than_none() {
        for policy in POLICIES {
            let b = Balancer::new(policy, false, od(1, 100), vec![ep("a", 1), ep("b", 1)]);
            let now = Instant::now();
            eject(&b, "a", now);
            eject(&b, "b", now);
            let p = b.pick(CLIENT, UNTRIED, now).unwrap();
            assert!(p.panic, "{policy:?}");
            let other = if name(&p) == "a" { "b" } else { "a" };
            let retry = b
                .pick(CLIENT, std::slice::from_ref(&p.workload), now)
                .unwrap();
            assert_eq!(name(&retry), other, "{policy:?}");
            assert!(b.pick(CLIENT, &[key("a"), key("b")], now).is_none());

            // Also when the healthy ones were tried: better an ejected one than none.
            let b = Balancer::new(policy, false, od(1, 50), vec![ep("a", 1), ep("b", 1)]);
            eject(&b, "a", now);
            let p = b.pick(CLIENT, &[key("b")], now).unwrap();
            assert_eq!((name(&p), p.panic), ("a", true), "{policy:?}");
            let p = b.pick(CLIENT, UNTRIED, now).unwrap();
            assert_eq!((name(&p), p.panic), ("b", false), "{policy:?}");
        }
    }

    #[test]
    fn update_keeps_the_state_of_endpoints_that_stay() {
        let b = balancer(
            LbPolicy::LeastRequest,
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        let now = Instant::now();
        // a: two failures of three; b: ejected; c: two active picks.
        b.report(&key("a"), false, now);
        b.report(&key("a"), false, now);
        let ejected = eject(&b, "b", now);
        let on_c: Vec<Pick> = (0..2)
            .map(|_| b.pick(CLIENT, &[key("a"), key("b")], now).unwrap())
            .collect();

        b.update(
            LbPolicy::RoundRobin,
            false,
            od(3, 50),
            vec![ep("d", 1), ep("c", 2), ep("b", 1), ep("a", 1)],
        );
        let state: HashMap<String, EndpointState> = b
            .snapshot(now)
            .into_iter()
            .map(|s| (s.key.name.clone(), s))
            .collect();
        assert_eq!(state["a"].consecutive_failures, 2);
        assert_eq!(state["b"].ejected_until, Some(now + ejected.duration));
        assert_eq!((state["c"].active, state["c"].weight), (2, 2));
        assert_eq!((state["d"].active, state["d"].ejections), (0, 0));
        // One more failure ejects a: the count survived.
        assert!(b.report(&key("a"), false, now).is_some());

        // Removed endpoints are forgotten; their picks still release cleanly, and one
        // added back starts afresh.
        b.update(
            LbPolicy::RoundRobin,
            false,
            od(3, 50),
            vec![ep("a", 1), ep("d", 1)],
        );
        assert_eq!(b.report(&key("c"), false, now), None);
        drop(on_c);
        b.update(
            LbPolicy::RoundRobin,
            false,
            od(3, 50),
            vec![ep("a", 1), ep("b", 1), ep("c", 1), ep("d", 1)],
        );
        let state = b.snapshot(now);
        assert!(state.iter().all(|s| s.active == 0));
        assert!(state[0].ejected_until.is_some());
        assert!(
            state
                .iter()
                .all(|s| s.key.name == "a" || s.ejected_until.is_none())
        );
    }

    #[test]
    fn update_keeps_round_robin_fairness() {
        let b = balancer(
            LbPolicy::RoundRobin,
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        let now = Instant::now();
        let p = |b: &Balancer| name(&b.pick(CLIENT, UNTRIED, now).unwrap()).to_owned();
        assert_eq!((p(&b), p(&b)), ("a".into(), "b".into()));
        // A reload that changes nothing does not restart the rotation.
        b.update(
            LbPolicy::RoundRobin,
            false,
            od(3, 50),
            vec![ep("a", 1), ep("b", 1), ep("c", 1)],
        );
        assert_eq!((p(&b), p(&b)), ("c".into(), "a".into()));
    }

    #[test]
    fn duplicate_keys_and_zero_weights_are_tolerated() {
        let b = balancer(
            LbPolicy::RoundRobin,
            vec![ep("a", 0), ep("b", 1), ep("a", 5)],
        );
        let now = Instant::now();
        let state = b.snapshot(now);
        assert_eq!(state.len(), 2);
        assert_eq!(state[0].weight, 1);
        let counts =
            counts((0..100).map(|_| name(&b.pick(CLIENT, UNTRIED, now).unwrap()).to_owned()));
        assert_eq!(counts["a"], 50);
    }
}
