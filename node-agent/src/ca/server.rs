//! The CA's network face (`weft ca`): Istio's `CreateCertificate` over gRPC
//! (HTTP/2 over TLS 1.3), for node agents.
//!
//! Who may have what: an agent proves which node it runs on with a bearer token
//! (the node-token file, the local-mode stand-in for a projected service-account
//! token), and gets signed only identities that the mesh config places on that
//! node. The identity asked for is the CSR's one URI SAN; the rest of the
//! certificate is the CA's own ([`Authority::sign`]). The CA proves itself to
//! agents with an SVID for `spiffe://<trust-domain>/ns/weft-system/sa/weft-ca`
//! that it signs for itself at every start, so agents need nothing but the bundle.
//!
//! Peers are untrusted until their token checks out: headers, body and time are
//! bounded per stream, streams per connection, and connections per server and per
//! peer address. Until a request of the connection has shown a node token, the
//! connection has one deadline, fixed at accept, for the TLS and HTTP/2
//! handshakes and its first answered request: sending slowly, sending requests
//! without a token, or sending nothing cannot extend it. A node's connection is
//! then closed when idle, counted from its last answered request. A close sends
//! GOAWAY and drops the socket shortly after, whether or not the peer reads it.
//!
//! State lives in one directory (see [`super::store`]).

use std::{
    collections::BTreeSet,
    future::Future,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{
    RecvStream,
    server::{self as h2s, SendResponse},
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::{
    Authority, new_key_and_csr,
    placement::Placement,
    proto::{self, CertificateRequest, CertificateResponse, Code},
    satoken::{self, SaOptions, SaVerifier},
    store,
    tokens::{self, NodeTokens},
};
use crate::{
    discovery::{self, file, kube::Update, watch::Watch},
    identity::SpiffeId,
    model::Mesh,
    net::limit::{Full, Limit, Throttle},
    tls,
};

pub use super::ca_identity;

/// Lifetime of the CA's serving certificate (re-issued at every start).
const SERVING_TTL: Duration = Duration::from_secs(30 * 86_400);
/// The longest `--cert-ttl` accepted.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(365 * 86_400);
/// Bound on a request's body.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to send its GOAWAY before the socket
/// is dropped: the peer is not waited for.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Streams a connection may have open at once.
const MAX_STREAMS: u32 = 16;
/// Request header block limit: a token and a few gRPC headers.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// On shutdown, how long connections in flight may take to finish.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Config(#[from] file::Error),
    #[error(transparent)]
    Tokens(#[from] tokens::Error),
    #[error("CA state: {0}")]
    Store(#[from] store::Error),
    #[error("the CA's serving certificate: {0}")]
    Serving(String),
    #[error("{0}")]
    Options(String),
}

/// What `weft ca` is told on its command line.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// The state directory (root, trusted roots, bundle, addr).
    pub dir: PathBuf,
    /// Where the mesh comes from: which identities live on which node.
    pub mesh: MeshSource,
    /// How agents prove their node.
    pub auth: AgentAuth,
    pub listen: SocketAddr,
    /// Where `GET /metrics` is served (plain HTTP); `None` for nowhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The longest certificate lifetime handed out, and the one given when the
    /// request names none.
    pub max_ttl: Duration,
    /// The largest mesh file read.
    pub config_max_bytes: u64,
    /// Connection caps and deadlines.
    pub limits: Limits,
}

/// Where the CA learns which identities live on which node.
#[derive(Debug, Clone)]
pub enum MeshSource {
    /// The mesh file, watched.
    File(PathBuf),
    /// An ordered source (Kubernetes discovery): a whole mesh once it has
    /// listed everything, then each change, pods as deltas. The CA starts
    /// serving only after the first: before, it would refuse every node. Each
    /// change applies as it arrives (a delta at its cost), so a pod gone from
    /// a node stops being signed for it at once.
    Updates {
        trust_domain: String,
        updates: Updates,
    },
}

/// The receiving end of an ordered source, for the one CA that binds with
/// it (options are cloned; a receiver cannot be).
#[derive(Debug, Clone)]
pub struct Updates(Arc<std::sync::Mutex<Option<mpsc::Receiver<Update>>>>);

impl Updates {
    pub fn new(rx: mpsc::Receiver<Update>) -> Updates {
        Updates(Arc::new(std::sync::Mutex::new(Some(rx))))
    }

    fn take(&self) -> Option<mpsc::Receiver<Update>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl MeshSource {
    fn file(&self) -> Option<&Path> {
        match self {
            MeshSource::File(p) => Some(p),
            MeshSource::Updates { .. } => None,
        }
    }
}

/// How agents prove which node they serve.
#[derive(Debug, Clone)]
pub enum AgentAuth {
    /// A node-token file (`node-name: token` per line, YAML), watched: local
    /// mode.
    NodeTokens(PathBuf),
    /// Kubernetes: the agent pod's projected service-account token.
    ServiceAccounts(SaOptions),
}

impl AgentAuth {
    fn node_tokens(&self) -> Option<&Path> {
        match self {
            AgentAuth::NodeTokens(p) => Some(p),
            AgentAuth::ServiceAccounts(_) => None,
        }
    }
}

/// The checker of agents' tokens in force.
enum Auth {
    /// Reloaded when the file changes.
    Nodes(RwLock<Arc<NodeTokens>>),
    Agents(Box<SaVerifier>),
}

/// How many connections the CA holds, and for how long (`weft ca` flags).
///
/// Why per peer address and a deadline fixed at accept: every call of an agent
/// opens a connection that is unauthenticated until its request is read, so the
/// slots cannot be kept for nodes by identity. What stops one pod from holding
/// them all is that it gets `max_connections_per_peer` of them, each for at most
/// `first_request_timeout`, however it behaves. An agent calls from its node's
/// address with at most [`super::client::MAX_CALLS_IN_FLIGHT`] calls at once, well
/// under the per-peer cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once; more are closed on accept.
    pub max_connections: usize,
    /// Connections held at once from one IP address; more are closed on accept.
    pub max_connections_per_peer: usize,
    /// From accept: the TLS and HTTP/2 handshakes and the first answered request,
    /// and every request until one shows a node token.
    pub first_request_timeout: Duration,
    /// A node's connection with no request in flight is closed this long after
    /// its last answered request.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_connections_per_peer: 32,
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    fn check(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_connections_per_peer == 0 {
            return Err("the connection limits must be at least 1".into());
        }
        if self.max_connections_per_peer > self.max_connections {
            return Err(format!(
                "the per-peer connection limit ({}) is over the total ({})",
                self.max_connections_per_peer, self.max_connections
            ));
        }
        if self.first_request_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err("the CA's connection timeouts must be longer than zero".into());
        }
        Ok(())
    }
}

/// A bound CA: [`CaServer::bind`] loads everything and opens the ports (so every
/// startup error surfaces there), [`CaServer::run`] serves until shutdown.
pub struct CaServer {
    listener: TcpListener,
    metrics: Option<TcpListener>,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    opts: CaOptions,
    watch: Watch,
    /// The mesh file's mesh, for its reloads to be compared with.
    file_mesh: Option<Arc<Mesh>>,
    /// The discovery source's receiver, followed once serving.
    updates: Option<mpsc::Receiver<Update>>,
}

/// What every connection reads.
struct Shared {
    authority: Authority,
    trust_domain: String,
    max_ttl: Duration,
    /// Which identities run on which node.
    placement: RwLock<Placement>,
    /// The namespaces where pods that speak HBONE themselves run (the
    /// placement's), for the trust bundle to follow.
    native: watch::Sender<BTreeSet<String>>,
    auth: Auth,
    counters: Counters,
    limits: Limits,
    /// The connections held, in all and per peer address.
    connections: Limit,
}

impl CaServer {
    /// Loads the config and tokens, loads (or on first start makes) the root,
    /// writes `bundle.pem`, issues the serving certificate and binds the ports.
    pub async fn bind(opts: CaOptions) -> Result<CaServer, Error> {
        if opts.max_ttl < Duration::from_secs(1) || opts.max_ttl > MAX_CERT_TTL {
            return Err(Error::Options(format!(
                "the certificate TTL must be between 1s and {}d",
                MAX_CERT_TTL.as_secs() / 86_400
            )));
        }
        opts.limits.check().map_err(Error::Options)?;
        // Watch before reading: a change in between is then seen.
        // What `watch_files` follows, in this order (see `watched`).
        let files: Vec<&Path> = opts
            .mesh
            .file()
            .into_iter()
            .chain(opts.auth.node_tokens())
            .collect();
        let watch = Watch::new(&files);
        // The file's mesh, which its reloads are compared with; or the
        // source's receiver, which follows it.
        let (placement, file_mesh, updates) = match &opts.mesh {
            MeshSource::File(path) => {
                let mesh = file::load(path, opts.config_max_bytes)?.mesh;
                (Placement::new(&mesh), Some(Arc::new(mesh)), None)
            }
            MeshSource::Updates {
                trust_domain,
                updates,
            } => {
                let mut updates = updates
                    .take()
                    .ok_or_else(|| Error::Options("the discovery source is another CA's".into()))?;
                info!("waiting for the first complete mesh from discovery");
                let mesh = loop {
                    // The first update is a whole mesh.
                    match updates.recv().await {
                        Some(Update::Mesh(m)) => break m,
                        Some(Update::Delta(_)) => continue,
                        None => {
                            return Err(Error::Options(
                                "discovery stopped before its first mesh".into(),
                            ));
                        }
                    }
                };
                if mesh.trust_domain != *trust_domain {
                    return Err(Error::Options(format!(
                        "discovery's trust domain {:?} is not the CA's {trust_domain:?}",
                        mesh.trust_domain
                    )));
                }
                (Placement::new(&mesh), None, Some(updates))
            }
        };
        let auth = match &opts.auth {
            AgentAuth::NodeTokens(path) => {
                let tokens = NodeTokens::load(path)?;
                if let Some(problem) = tokens::loose_permissions(path) {
                    warn!(%problem, "a node-token file others may read");
                }
                Auth::Nodes(RwLock::new(Arc::new(tokens)))
            }
            AgentAuth::ServiceAccounts(sa) => {
                let client = match sa.check {
                    satoken::Check::JwksFile(_) => None,
                    _ => Some(kube::Client::try_default().await.map_err(|e| {
                        Error::Options(format!(
                            "no Kubernetes client (in-cluster config or KUBECONFIG): {e}"
                        ))
                    })?),
                };
                Auth::Agents(Box::new(
                    SaVerifier::start(sa.clone(), client)
                        .await
                        .map_err(|e| Error::Options(e.to_string()))?,
                ))
            }
        };
        let trust_domain = placement.trust_domain().to_owned();

        let authority = store::load_authority(&opts.dir, &trust_domain)?;
        store::write_bundle(&opts.dir, &authority)?;
        let acceptor = serving_tls(&authority, &trust_domain)?;

        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: opts.listen,
                source,
            })?;
        let metrics = match opts.metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?,
            ),
            None => None,
        };
        Ok(CaServer {
            listener,
            metrics,
            acceptor,
            shared: Arc::new(Shared {
                authority,
                trust_domain,
                max_ttl: opts.max_ttl,
                native: watch::channel(native_namespaces(&placement)).0,
                placement: RwLock::new(placement),
                auth,
                counters: Counters::default(),
                limits: opts.limits,
                connections: Limit::new(
                    opts.limits.max_connections,
                    opts.limits.max_connections_per_peer,
                ),
            }),
            opts,
            watch,
            file_mesh,
            updates,
        })
    }

    /// Where the CA listens (the actual port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `GET /metrics` is served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn trust_domain(&self) -> &str {
        &self.shared.trust_domain
    }

    /// Every trusted root (PEM), the signing one first: what `bundle.pem` holds.
    pub fn bundle_pem(&self) -> String {
        self.shared.authority.bundle().concat()
    }

    /// The namespaces where pods that speak HBONE themselves (waypoints) run,
    /// as the mesh changes: where the trust bundle must be published.
    pub fn waypoint_namespaces(&self) -> watch::Receiver<BTreeSet<String>> {
        self.shared.native.subscribe()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets connections
    /// in flight finish for a few seconds and cuts the rest.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let CaServer {
            listener,
            metrics,
            acceptor,
            shared,
            opts,
            watch,
            file_mesh,
            updates,
        } = self;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: opts.listen,
            source,
        })?;
        store::write_addr(&opts.dir, addr)?;

        let mut background = JoinSet::new();
        background.spawn(watch_files(opts.clone(), shared.clone(), watch, file_mesh));
        if let Some(updates) = updates {
            background.spawn(follow_updates(updates, shared.clone()));
        }
        let metrics_addr = metrics
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "off".to_owned(), |a| a.to_string());
        if let Some(l) = metrics {
            let counters = shared.clone();
            background.spawn(crate::metrics::serve(
                l,
                Arc::new(move || counters.counters.render(counters.connections.held())),
            ));
        }
        info!(
            addr = %addr,
            metrics = %metrics_addr,
            trust_domain = %shared.trust_domain,
            roots = shared.authority.bundle().len(),
            max_ttl_s = shared.max_ttl.as_secs(),
            max_connections = shared.limits.max_connections,
            max_connections_per_peer = shared.limits.max_connections_per_peer,
            first_request_timeout_ms = shared.limits.first_request_timeout.as_millis() as u64,
            idle_timeout_ms = shared.limits.idle_timeout.as_millis() as u64,
            dir = %opts.dir.display(),
            "ca ready"
        );

        let (stop, stopping) = watch::channel(false);
        let mut conns = JoinSet::new();
        let mut backoff = Duration::ZERO;
        // Every refusal is counted; at most one a second is logged.
        let refusals = Throttle::default();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        backoff = Duration::ZERO;
                        // Deadlines start now, before anything is read.
                        let deadline = Instant::now() + shared.limits.first_request_timeout;
                        let slot = match shared.connections.admit(peer.ip().to_canonical()) {
                            Ok(slot) => slot,
                            Err(full) => {
                                // Dropping the socket closes it at once.
                                drop(tcp);
                                shared.counters.refused(full);
                                if let Some(suppressed) = refusals.allow() {
                                    warn!(
                                        %peer,
                                        reason = refused_label(full),
                                        suppressed,
                                        max_connections = shared.limits.max_connections,
                                        max_connections_per_peer =
                                            shared.limits.max_connections_per_peer,
                                        "connection refused: over a limit"
                                    );
                                }
                                continue;
                            }
                        };
                        let conn = connection(
                            tcp,
                            deadline,
                            acceptor.clone(),
                            shared.clone(),
                            stopping.clone(),
                        );
                        conns.spawn(
                            async move {
                                conn.await;
                                drop(slot);
                            }
                            .instrument(info_span!("ca_conn", peer = %peer)),
                        );
                    }
                    Err(e) => {
                        // Out of descriptors or the like: back off, do not spin.
                        backoff = (backoff * 2)
                            .clamp(Duration::from_millis(10), Duration::from_secs(1));
                        warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                        tokio::time::sleep(backoff).await;
                    }
                },
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = done && e.is_panic() {
                        error!(error = %e, "a CA connection task panicked");
                    }
                }
            }
        }
        drop(listener);
        let _ = stop.send(true);
        let drained =
            tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} })
                .await
                .is_ok();
        conns.abort_all();
        background.abort_all();
        info!(drained, "ca stopped");
        Ok(())
    }
}

/// Binds and serves until `shutdown`: [`CaServer::bind`] then [`CaServer::run`].
pub async fn serve(opts: CaOptions, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    CaServer::bind(opts).await?.run(shutdown).await
}

// ---- one connection, one stream ------------------------------------------------

/// Serves one connection until the peer closes it, a deadline passes or the CA
/// stops. `first_deadline` was fixed at accept.
async fn connection(
    tcp: TcpStream,
    first_deadline: Instant,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut stopping: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    // One deadline for both handshakes: a peer that trickles bytes in either
    // cannot extend it, as a timeout per read would let it.
    let setup = async {
        let tls = acceptor.accept(tcp).await.map_err(|e| {
            debug!(error = %e, "TLS handshake failed");
        })?;
        h2s::Builder::new()
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(proto::MAX_MESSAGE + 1024)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| debug!(error = %e, "HTTP/2 handshake failed"))
    };
    let mut conn = match tokio::time::timeout_at(first_deadline, setup).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(())) => return,
        Err(_) => {
            shared.counters.timed_out(Phase::FirstRequest);
            return debug!("handshakes not done by the first-request deadline; closed");
        }
    };
    let mut streams: JoinSet<bool> = JoinSet::new();
    // Whether a request of this connection showed a node token: until then the
    // deadline stays the one fixed at accept.
    let mut authenticated = false;
    let mut deadline = first_deadline;
    // Once closing: when the socket is dropped, whatever the peer does.
    let mut drop_at: Option<Instant> = None;
    loop {
        // A node's requests in flight are bounded each (IO_TIMEOUT); the idle
        // clock starts when the last one is answered.
        let waiting = drop_at.is_some() || !authenticated || streams.is_empty();
        let wake = drop_at.unwrap_or(deadline);
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) if drop_at.is_none() => {
                    streams.spawn(serve_stream(request, respond, shared.clone()).in_current_span());
                }
                // Closing: a request that crossed the GOAWAY is reset, not served.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    debug!(error = %e, "HTTP/2 connection failed");
                    break;
                }
                None => break,
            },
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                match done {
                    Ok(node) => authenticated |= node,
                    Err(e) if e.is_panic() => error!(error = %e, "a CA stream task panicked"),
                    Err(_) => {}
                }
                if authenticated && streams.is_empty() && drop_at.is_none() {
                    deadline = Instant::now() + shared.limits.idle_timeout;
                }
            }
            _ = stopping.changed(), if drop_at.is_none() => {
                conn.graceful_shutdown();
                // The CA's own drain bound cuts what is still running then.
                drop_at = Some(Instant::now() + DRAIN);
            }
            () = tokio::time::sleep_until(wake), if waiting => {
                if drop_at.is_some() {
                    debug!("the peer did not finish closing; dropped");
                    break;
                }
                let phase = if authenticated { Phase::Idle } else { Phase::FirstRequest };
                shared.counters.timed_out(phase);
                debug!(phase = phase.label(), "deadline passed; closing");
                // Requests still in flight past the first-request deadline are a
                // stranger's: cut them. GOAWAY, then the socket goes shortly after.
                streams.abort_all();
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                drop_at = Some(Instant::now() + CLOSE_GRACE);
            }
        }
    }
}

/// The `reason` label of a connection refused on accept.
fn refused_label(full: Full) -> &'static str {
    match full {
        Full::Total => "connection_limit",
        Full::Peer => "peer_limit",
    }
}

/// Which deadline closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The one fixed at accept: handshakes and requests until a node token.
    FirstRequest,
    /// A node's connection, idle since its last answered request.
    Idle,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::FirstRequest => "first_request",
            Phase::Idle => "idle",
        }
    }
}

/// The result of a `CreateCertificate` call, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Signed,
    Unauthenticated,
    Denied,
    Invalid,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Signed,
        Outcome::Unauthenticated,
        Outcome::Denied,
        Outcome::Invalid,
        Outcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Signed => "signed",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

/// Why a call was refused: what is counted, the status sent, and the reason.
struct Refusal {
    outcome: Outcome,
    code: Code,
    reason: String,
}

impl Refusal {
    fn new(outcome: Outcome, code: Code, reason: impl Into<String>) -> Self {
        Refusal {
            outcome,
            code,
            reason: reason.into(),
        }
    }

    fn invalid(reason: impl Into<String>) -> Self {
        Refusal::new(Outcome::Invalid, Code::INVALID_ARGUMENT, reason)
    }
}

/// Who asked for what, as far as the call got: for the log line.
#[derive(Default)]
struct Caller {
    node: Option<String>,
    identity: Option<String>,
}

/// Answers one request; whether it showed a node token.
async fn serve_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    shared: Arc<Shared>,
) -> bool {
    let (head, body) = request.into_parts();
    let grpc = head
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let ours = head.method == Method::POST && head.uri.path() == proto::CREATE_CERTIFICATE;
    if !grpc {
        let status = if ours {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else {
            StatusCode::NOT_FOUND
        };
        debug!(path = head.uri.path(), %status, "not a gRPC request");
        send_http_status(&mut respond, status);
        return false;
    }
    if !ours {
        debug!(path = head.uri.path(), "unknown gRPC method");
        let reason = format!("unknown method {} {}", head.method, head.uri.path());
        send_status(&mut respond, Code::UNIMPLEMENTED, &reason);
        return false;
    }

    let mut caller = Caller::default();
    let result = create_certificate(&head.headers, body, &shared, &mut caller).await;
    let node = caller.node.as_deref().unwrap_or("-");
    let identity = caller.identity.as_deref().unwrap_or("-");
    match result {
        Ok((chain, ttl)) => {
            shared.counters.record(Outcome::Signed);
            info!(node, identity, ttl_s = ttl.as_secs(), "certificate signed");
            send_chain(&mut respond, chain);
        }
        Err(refusal) => {
            shared.counters.record(refusal.outcome);
            warn!(
                node,
                identity,
                result = refusal.outcome.label(),
                code = refusal.code.0,
                reason = %refusal.reason,
                "certificate refused"
            );
            send_status(&mut respond, refusal.code, &refusal.reason);
        }
    }
    caller.node.is_some()
}

async fn create_certificate(
    headers: &HeaderMap,
    body: RecvStream,
    shared: &Shared,
    caller: &mut Caller,
) -> Result<(Vec<String>, Duration), Refusal> {
    // Authenticate before reading the body: strangers get nothing but a status.
    let token = bearer_token(headers).ok_or_else(|| {
        Refusal::new(
            Outcome::Unauthenticated,
            Code::UNAUTHENTICATED,
            "missing `authorization: Bearer <node token>` header",
        )
    })?;
    // A workload's own token (not an agent's): namespace, account, pod.
    let mut own: Option<(String, String, String)> = None;
    let node = match &shared.auth {
        Auth::Nodes(tokens) => read_lock(tokens).node_for(token).ok_or_else(|| {
            Refusal::new(
                Outcome::Unauthenticated,
                Code::UNAUTHENTICATED,
                "the node token is not one this CA knows (check the CA's node-token file)",
            )
        })?,
        Auth::Agents(verifier) => {
            let agent = verifier.agent_of(token).await.map_err(|why| {
                Refusal::new(
                    Outcome::Unauthenticated,
                    Code::UNAUTHENTICATED,
                    format!("the service-account token is refused: {why}"),
                )
            })?;
            debug!(pod = %agent.pod, node = %agent.node, "agent authenticated");
            own = agent.own.map(|(ns, sa)| (ns, sa, agent.pod));
            agent.node
        }
    };
    caller.node = Some(node);

    let message = match tokio::time::timeout(IO_TIMEOUT, read_message(body)).await {
        Ok(message) => message?,
        Err(_) => {
            return Err(Refusal::new(
                Outcome::Invalid,
                Code::DEADLINE_EXCEEDED,
                format!("the request body did not arrive within {IO_TIMEOUT:?}"),
            ));
        }
    };
    let request = CertificateRequest::decode(&message)
        .map_err(|e| Refusal::invalid(format!("bad request message: {e}")))?;
    let id = csr_identity(&request.csr).map_err(Refusal::invalid)?;
    caller.identity = Some(id.to_string());
    if let Some(asked) = &request.impersonated_identity
        && asked.parse::<SpiffeId>().as_ref() != Ok(&id)
    {
        return Err(Refusal::invalid(format!(
            "the {} metadata {asked:?} does not match the CSR's identity {id}",
            proto::IMPERSONATED_IDENTITY
        )));
    }

    let node = caller.node.as_deref().unwrap_or_default();
    {
        let placement = shared.placement.read().unwrap_or_else(|e| e.into_inner());
        authorize(&placement, &id, node)?;
        if let Some((ns, sa, pod)) = &own {
            authorize_own(&placement, &id, node, ns, sa, pod)?;
        }
    }

    let ttl = match u64::try_from(request.validity_secs) {
        Ok(0) => shared.max_ttl,
        Ok(secs) => Duration::from_secs(secs).min(shared.max_ttl),
        Err(_) => {
            return Err(Refusal::invalid(format!(
                "negative validity_duration {}",
                request.validity_secs
            )));
        }
    };
    match shared.authority.sign(&request.csr, &id, ttl) {
        Ok(chain) => Ok((chain, ttl)),
        Err(e @ (super::Error::Sign(_) | super::Error::Material(_))) => Err(Refusal::new(
            Outcome::Error,
            Code::INTERNAL,
            format!("signing failed: {e}"),
        )),
        Err(e) => Err(Refusal::invalid(e.to_string())),
    }
}

/// Whether `node` may have `id`: only if the mesh places a workload with that
/// identity on it, and never the CA's own identity, whatever the mesh says (the
/// model refuses a workload with it; this holds even if a source forgot to).
fn authorize(placement: &Placement, id: &SpiffeId, node: &str) -> Result<(), Refusal> {
    let denied = |reason: String| Refusal::new(Outcome::Denied, Code::PERMISSION_DENIED, reason);
    if id.is_ca() {
        return Err(denied(format!(
            "{id} is the CA's own identity: it is signed for no node"
        )));
    }
    if !placement.identity_on_node(id, node) {
        return Err(denied(format!(
            "node {node} may not have {id}: the mesh config places no workload with \
             that identity on it"
        )));
    }
    Ok(())
}

/// A workload that asks with its own token (a waypoint) may have only its
/// own identity, as the pod the token is bound to, and only if that pod speaks
/// HBONE itself (`native_tunnel`): any other pod's certificates are its
/// agent's to ask for.
fn authorize_own(
    placement: &Placement,
    id: &SpiffeId,
    node: &str,
    ns: &str,
    sa: &str,
    pod: &str,
) -> Result<(), Refusal> {
    let denied = |reason: String| Refusal::new(Outcome::Denied, Code::PERMISSION_DENIED, reason);
    if id.namespace() != ns || id.service_account() != sa {
        return Err(denied(format!(
            "a token of {ns}/{sa} may have only its own identity, not {id}"
        )));
    }
    let ok = placement
        .workload(ns, pod)
        .is_some_and(|w| w.service_account == sa && w.node == node && w.native_tunnel);
    if !ok {
        return Err(denied(format!(
            "pod {ns}/{pod} on {node} is not a workload that speaks HBONE itself \
             (a waypoint): its agent asks for its certificates"
        )));
    }
    Ok(())
}

/// Reads a request body that must hold exactly one gRPC message, refusing as soon
/// as it says (or proves) to be too large.
async fn read_message(mut body: RecvStream) -> Result<Vec<u8>, Refusal> {
    let too_large = |n: usize| {
        Refusal::new(
            Outcome::Invalid,
            Code::RESOURCE_EXHAUSTED,
            format!(
                "request of {n} bytes is over the {}-byte limit",
                proto::MAX_MESSAGE
            ),
        )
    };
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| Refusal::invalid(format!("request body: {e}")))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > proto::MAX_MESSAGE + 5 {
            return Err(too_large(buf.len() + chunk.len()));
        }
        buf.extend_from_slice(&chunk);
        if let Err(proto::Error::TooLarge { len: n, .. }) = proto::unframe(&buf) {
            return Err(too_large(n));
        }
    }
    match proto::unframe(&buf) {
        Ok(Some((message, used))) if used == buf.len() => Ok(message.to_vec()),
        Ok(Some(_)) => Err(Refusal::invalid("more than one request message")),
        Ok(None) => Err(Refusal::invalid("the request message is truncated")),
        Err(e) => Err(Refusal::invalid(e.to_string())),
    }
}

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
}

/// The one SPIFFE identity a CSR asks for (its signature is verified too).
fn csr_identity(csr_pem: &str) -> Result<SpiffeId, String> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| format!("the CSR does not parse or its signature does not verify: {e}"))?;
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            rcgen::SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri
            .parse()
            .map_err(|e| format!("the CSR's URI SAN is not a SPIFFE ID: {e}")),
        _ => Err(format!(
            "the CSR must name exactly one URI SAN, the identity asked for; it names {}",
            uris.len()
        )),
    }
}

fn read_lock<T: Clone>(lock: &RwLock<T>) -> T {
    // A writer that panicked left a whole value behind (writes are one assignment).
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn write_lock<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(|e| e.into_inner()) = value;
}

fn grpc_response(status: Option<(Code, &str)>) -> Response<()> {
    let mut response = Response::new(());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Some((code, message)) = status {
        insert_status(headers, code, message);
    }
    response
}

fn insert_status(headers: &mut HeaderMap, code: Code, message: &str) {
    headers.insert("grpc-status", HeaderValue::from(code.0));
    if !message.is_empty()
        && let Ok(v) = HeaderValue::try_from(proto::encode_message(message))
    {
        headers.insert("grpc-message", v);
    }
}

/// A trailers-only gRPC answer.
fn send_status(respond: &mut SendResponse<Bytes>, code: Code, message: &str) {
    if let Err(e) = respond.send_response(grpc_response(Some((code, message))), true) {
        debug!(error = %e, "cannot answer, the client is gone");
    }
}

fn send_chain(respond: &mut SendResponse<Bytes>, cert_chain: Vec<String>) {
    let message = proto::frame(&CertificateResponse { cert_chain }.encode());
    let sent = respond
        .send_response(grpc_response(None), false)
        .and_then(|mut body| {
            body.send_data(Bytes::from(message), false)?;
            let mut trailers = HeaderMap::new();
            insert_status(&mut trailers, Code::OK, "");
            body.send_trailers(trailers)
        });
    if let Err(e) = sent {
        debug!(error = %e, "cannot answer, the client is gone");
    }
}

fn send_http_status(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(e) = respond.send_response(response, true) {
        debug!(error = %e, "cannot answer, the client is gone");
    }
}

// ---- files ---------------------------------------------------------------------

/// The indexes, in the CA's [`Watch`], of the mesh file and the node-token
/// file, each if there is one.
fn watched(opts: &CaOptions) -> (Option<usize>, Option<usize>) {
    let mesh = opts.mesh.file().map(|_| 0);
    let tokens = opts.auth.node_tokens().map(|_| usize::from(mesh.is_some()));
    (mesh, tokens)
}

/// Applies each update of a discovery source: a whole mesh replaces the
/// placement, a delta changes it at its cost.
async fn follow_updates(mut updates: mpsc::Receiver<Update>, shared: Arc<Shared>) {
    while let Some(update) = updates.recv().await {
        match update {
            Update::Mesh(mesh) => {
                if mesh.trust_domain != shared.trust_domain {
                    error!(from = %shared.trust_domain, to = %mesh.trust_domain, "mesh rejected: the trust domain changed; restart the CA to change it");
                    continue;
                }
                debug!(workloads = mesh.workloads.len(), "mesh updated");
                let placement = Placement::new(&mesh);
                drop(mesh);
                *shared.placement.write().unwrap_or_else(|e| e.into_inner()) = placement;
            }
            Update::Delta(delta) => {
                debug!(
                    changed = delta.upserts.len(),
                    removed = delta.removes.len(),
                    "workloads updated"
                );
                shared
                    .placement
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .apply(&delta);
            }
        }
        shared.publish_native();
    }
}

/// The namespaces of `placement`'s pods that speak HBONE themselves.
fn native_namespaces(placement: &Placement) -> BTreeSet<String> {
    placement.native_namespaces().map(str::to_owned).collect()
}

impl Shared {
    /// Tells the bundle's follower where waypoints run now, if that changed.
    fn publish_native(&self) {
        let now = native_namespaces(&self.placement.read().unwrap_or_else(|e| e.into_inner()));
        self.native.send_if_modified(|was| {
            let changed = *was != now;
            if changed {
                *was = now;
            }
            changed
        });
    }
}

/// Follows the mesh config and the node tokens; a file that fails to load (or
/// a mesh change the guard refuses) is reported and the last good version keeps
/// serving.
async fn watch_files(
    opts: CaOptions,
    shared: Arc<Shared>,
    mut watch: Watch,
    mut current: Option<Arc<Mesh>>,
) {
    loop {
        let changed = watch.changed().await;
        let (mesh_file, tokens_file) = watched(&opts);
        if let Some(config) = opts.mesh.file()
            && let Some(current) = current.as_mut()
            && mesh_file.is_some_and(|i| changed.contains(&i))
        {
            match file::load(config, opts.config_max_bytes) {
                Ok(c) if c.mesh.trust_domain != shared.trust_domain => error!(
                    path = %config.display(),
                    from = %shared.trust_domain,
                    to = %c.mesh.trust_domain,
                    "mesh config rejected: the trust domain changed; restart the CA to change it \
                     (its identity is in the old one); the last good config keeps serving"
                ),
                Ok(c) => match discovery::guard(current, &c.mesh, c.allow_shrink) {
                    Err(e) => error!(
                        path = %config.display(),
                        error = %e,
                        "mesh config rejected; the last good config keeps serving (put `allow_shrink: true` in the file if the change is meant)"
                    ),
                    Ok(()) if **current != c.mesh => {
                        info!(
                            path = %config.display(),
                            workloads = c.mesh.workloads.len(),
                            "mesh config reloaded"
                        );
                        let placement = Placement::new(&c.mesh);
                        *shared.placement.write().unwrap_or_else(|e| e.into_inner()) = placement;
                        *current = Arc::new(c.mesh);
                        shared.publish_native();
                    }
                    Ok(()) => {}
                },
                Err(e) => {
                    error!(error = %e, "mesh config rejected; the last good config keeps serving")
                }
            }
        }
        if tokens_file.is_some_and(|i| changed.contains(&i))
            && let (Some(path), Auth::Nodes(current)) = (opts.auth.node_tokens(), &shared.auth)
        {
            match NodeTokens::load(path) {
                Ok(t) => {
                    info!(path = %path.display(), nodes = t.len(), "node tokens reloaded");
                    write_lock(current, Arc::new(t));
                }
                Err(e) => {
                    error!(error = %e, "node tokens rejected; the last good ones keep serving")
                }
            }
        }
    }
}

/// The TLS config the CA serves with: a fresh key and a certificate for its own
/// identity, signed by its root (which also proves the root's key is its own).
fn serving_tls(authority: &Authority, trust_domain: &str) -> Result<TlsAcceptor, Error> {
    let bad = Error::Serving;
    let id = ca_identity(trust_domain).map_err(|e| bad(e.to_string()))?;
    let (key, csr) = new_key_and_csr(&id).map_err(|e| bad(e.to_string()))?;
    let chain = authority
        .sign(&csr, &id, SERVING_TTL)
        .map_err(|e| bad(format!("cannot issue the serving certificate: {e}")))?;
    let verified = (|| {
        let leaf = ::pem::parse(chain.first()?).ok()?;
        let root = ::pem::parse(authority.root_pem()).ok()?;
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf.contents()).ok()?;
        let (_, root) = x509_parser::parse_x509_certificate(root.contents()).ok()?;
        leaf.verify_signature(Some(root.public_key())).ok()
    })();
    if verified.is_none() {
        return Err(bad("root-key.pem is not the key of root.pem".into()));
    }
    let svid = tls::Svid::from_pem(&chain, &key).map_err(|e| bad(e.to_string()))?;
    let config = tls::server_config_no_client_auth(&svid).map_err(|e| bad(e.to_string()))?;
    Ok(TlsAcceptor::from(config))
}

// ---- metrics -------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    requests: [AtomicU64; 5],
    /// By [`Full`]: total, peer.
    refused: [AtomicU64; 2],
    /// By [`Phase`]: first request, idle.
    timed_out: [AtomicU64; 2],
}

impl Counters {
    fn record(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    fn refused(&self, full: Full) {
        let i = match full {
            Full::Total => 0,
            Full::Peer => 1,
        };
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    fn timed_out(&self, phase: Phase) {
        self.timed_out[phase as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition format; `open` is the connections held now.
    fn render(&self, open: usize) -> String {
        let mut out = String::from(
            "# HELP weft_ca_requests_total Certificate requests, by result.\n\
             # TYPE weft_ca_requests_total counter\n",
        );
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (outcome, c) in Outcome::ALL.iter().zip(&self.requests) {
            out.push_str(&format!(
                "weft_ca_requests_total{{result=\"{}\"}} {}\n",
                outcome.label(),
                n(c)
            ));
        }
        out.push_str(
            "# HELP weft_ca_connections_refused_total Connections closed on accept: the CA \
             held its limit in all (connection_limit) or from the peer's address (peer_limit).\n\
             # TYPE weft_ca_connections_refused_total counter\n",
        );
        for (full, c) in [Full::Total, Full::Peer].iter().zip(&self.refused) {
            out.push_str(&format!(
                "weft_ca_connections_refused_total{{reason=\"{}\"}} {}\n",
                refused_label(*full),
                n(c)
            ));
        }
        out.push_str(
            "# HELP weft_ca_connections_timed_out_total Connections the CA closed at a \
             deadline: handshakes and requests before a node token (first_request), or idle.\n\
             # TYPE weft_ca_connections_timed_out_total counter\n",
        );
        for (phase, c) in [Phase::FirstRequest, Phase::Idle]
            .iter()
            .zip(&self.timed_out)
        {
            out.push_str(&format!(
                "weft_ca_connections_timed_out_total{{phase=\"{}\"}} {}\n",
                phase.label(),
                n(c)
            ));
        }
        out.push_str(&format!(
            "# HELP weft_ca_connections_open Connections the CA holds.\n\
             # TYPE weft_ca_connections_open gauge\n\
             weft_ca_connections_open {open}\n"
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, path::Path, sync::atomic::AtomicUsize};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        sync::oneshot,
    };

    use super::*;
    use crate::{
        ca::{
            CA_NAMESPACE, CA_SERVICE_ACCOUNT,
            client::{self, CaClient},
        },
        model::{MeshDelta, WorkloadKey},
        tls::{Svid, TrustBundle},
    };

    const TD: &str = "cluster.local";
    const N1: &str = "n1-token-0123456789abcdef";
    const N2: &str = "n2-token-0123456789abcdef";
    const MESH: &str = "workloads:
- {name: web-0, namespace: shop, service_account: web, node: n1}
- {name: db-0, namespace: shop, service_account: db, node: n2}
";
    const HOUR: Duration = Duration::from_secs(3600);
    const BACKDATE: Duration = Duration::from_secs(60);

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "weft-ca-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Options for a CA on loopback port 0 with the two-node mesh.
    fn options(tmp: &TempDir) -> CaOptions {
        let config = tmp.0.join("mesh.yaml");
        let node_tokens = tmp.0.join("tokens.yaml");
        std::fs::write(&config, MESH).unwrap();
        std::fs::write(&node_tokens, format!("n1: {N1}\nn2: {N2}\n")).unwrap();
        CaOptions {
            dir: tmp.0.join("ca"),
            mesh: MeshSource::File(config),
            auth: AgentAuth::NodeTokens(node_tokens),
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
            max_ttl: HOUR,
            config_max_bytes: file::DEFAULT_MAX_BYTES,
            limits: Limits::default(),
        }
    }

    struct Running {
        addr: SocketAddr,
        metrics: SocketAddr,
        bundle: String,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), Error>>,
    }

    impl Running {
        async fn start(opts: CaOptions) -> Running {
            let server = CaServer::bind(opts).await.unwrap();
            let (stop, stopped) = oneshot::channel();
            Running {
                addr: server.local_addr().unwrap(),
                metrics: server.metrics_addr().unwrap(),
                bundle: server.bundle_pem(),
                stop,
                task: tokio::spawn(server.run(async {
                    let _ = stopped.await;
                })),
            }
        }

        async fn stop(self) {
            let _ = self.stop.send(());
            self.task.await.unwrap().unwrap();
        }

        fn client(&self, token: &str) -> CaClient {
            let bundle = TrustBundle::from_pem(&self.bundle).unwrap();
            CaClient::new(self.addr, token.into(), bundle, TD).unwrap()
        }
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new(TD, "shop", sa).unwrap()
    }

    /// Asks for `id` with a fresh key; the SVID it makes.
    async fn sign(client: &CaClient, id: &SpiffeId, ttl: Duration) -> Result<Svid, client::Error> {
        let (key, csr) = super::new_key_and_csr(id).unwrap();
        let chain = client.sign(&csr, id, ttl).await?;
        Ok(Svid::from_pem(&chain, &key).unwrap())
    }

    fn refused(result: Result<Svid, client::Error>) -> (Code, String) {
        match result {
            Err(client::Error::Refused { code, message }) => (code, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn lifetime(svid: &Svid) -> Duration {
        svid.not_after.duration_since(svid.not_before).unwrap()
    }

    /// Polls `check` until it holds, for at most five seconds.
    async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check().await {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn signs_identities_of_the_callers_node_with_a_capped_ttl() {
        let tmp = TempDir::new();
        let opts = options(&tmp);
        let ca = Running::start(opts.clone()).await;
        assert_eq!(
            std::fs::read_to_string(opts.dir.join("bundle.pem")).unwrap(),
            ca.bundle
        );
        let n1 = ca.client(N1);

        let svid = sign(&n1, &id("web"), 24 * HOUR).await.unwrap();
        assert_eq!(svid.id, id("web"));
        assert_eq!(lifetime(&svid), HOUR + BACKDATE, "capped at --cert-ttl");
        let svid = sign(&n1, &id("web"), 10 * 60 * Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(lifetime(&svid), Duration::from_secs(600) + BACKDATE);
        let svid = sign(&n1, &id("web"), Duration::ZERO).await.unwrap();
        assert_eq!(lifetime(&svid), HOUR + BACKDATE, "none asked: --cert-ttl");

        // The chain ends with the signing root, which heads the bundle.
        let (_, csr) = super::new_key_and_csr(&id("db")).unwrap();
        let chain = ca.client(N2).sign(&csr, &id("db"), HOUR).await.unwrap();
        assert_eq!(chain.len(), 2);
        assert!(ca.bundle.starts_with(&chain[1]));

        // `addr` says where the CA listens.
        let written = std::fs::read_to_string(opts.dir.join("addr")).unwrap();
        assert_eq!(written.trim(), ca.addr.to_string());
        ca.stop().await;
    }

    #[tokio::test]
    async fn refuses_identities_of_other_nodes_and_mismatched_requests() {
        let tmp = TempDir::new();
        let ca = Running::start(options(&tmp)).await;
        let n1 = ca.client(N1);

        let e = sign(&n1, &id("db"), HOUR).await;
        let (code, message) = refused(e);
        assert_eq!(code, Code::PERMISSION_DENIED);
        assert!(
            message.contains("spiffe://cluster.local/ns/shop/sa/db"),
            "{message}"
        );
        assert!(message.contains("node n1"), "{message}");

        let foreign = SpiffeId::new("other.local", "shop", "web").unwrap();
        assert_eq!(
            refused(sign(&n1, &foreign, HOUR).await).0,
            Code::PERMISSION_DENIED
        );

        // The CSR asks for web, the metadata for db.
        let (_, csr) = super::new_key_and_csr(&id("web")).unwrap();
        match n1.sign(&csr, &id("db"), HOUR).await {
            Err(
                e @ client::Error::Refused {
                    code: Code::INVALID_ARGUMENT,
                    ..
                },
            ) => {
                assert!(!e.is_retryable());
                assert!(e.to_string().contains("does not match"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // A P-384 key, in a CSR signed with SHA-256: refused, and the answer says
        // what the key is.
        match n1
            .sign(crate::ca::tests::P384_SHA256_CSR, &id("web"), HOUR)
            .await
        {
            Err(client::Error::Refused { code, message }) => {
                assert_eq!(code, Code::INVALID_ARGUMENT);
                assert!(
                    message.contains("P-256") && message.contains("P-384"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        match n1.sign("not a CSR", &id("web"), HOUR).await {
            Err(client::Error::Refused { code, message }) => {
                assert_eq!(code, Code::INVALID_ARGUMENT);
                assert!(message.contains("CSR"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        ca.stop().await;
    }

    #[tokio::test]
    async fn the_ca_identity_is_signed_for_no_node_whatever_the_mesh_says() {
        let tmp = TempDir::new();
        let opts = options(&tmp);
        let with_ca = format!(
            "{MESH}- {{name: fake-ca, namespace: weft-system, service_account: weft-ca, node: n1}}\n"
        );
        let ca_id = ca_identity(TD).unwrap();

        // A mesh file that gives a workload the CA's identity does not load...
        std::fs::write(opts.mesh.file().unwrap(), &with_ca).unwrap();
        let e = CaServer::bind(opts.clone())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("weft-system/weft-ca is the CA's identity"),
            "{e}"
        );

        // ...nor reload, and the CA never signs its identity for a node.
        std::fs::write(opts.mesh.file().unwrap(), MESH).unwrap();
        let ca = Running::start(opts.clone()).await;
        let n1 = ca.client(N1);
        std::fs::write(opts.mesh.file().unwrap(), &with_ca).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (code, message) = refused(sign(&n1, &ca_id, HOUR).await);
        assert_eq!(code, Code::PERMISSION_DENIED);
        assert!(message.contains("CA's own identity"), "{message}");
        ca.stop().await;

        // Even a model that slipped past validation does not get it.
        let mut mesh = file::parse(Path::new("mesh.yaml"), MESH).unwrap().mesh;
        let w = std::sync::Arc::make_mut(&mut mesh.workloads[0]);
        w.namespace = CA_NAMESPACE.into();
        w.service_account = CA_SERVICE_ACCOUNT.into();
        assert!(mesh.identity_on_node(&ca_id, "n1"));
        let refusal = authorize(&Placement::new(&mesh), &ca_id, "n1")
            .err()
            .unwrap();
        assert_eq!(refusal.code, Code::PERMISSION_DENIED);
        assert_eq!(refusal.outcome, Outcome::Denied);
        let web = file::parse(Path::new("mesh.yaml"), MESH).unwrap().mesh;
        assert!(authorize(&Placement::new(&web), &id("web"), "n1").is_ok());
    }

    #[tokio::test]
    async fn the_client_wants_exactly_the_ca_identity() {
        // A server with a good certificate from the right root, for a workload.
        let root = Authority::generate(TD, HOUR).unwrap();
        let bundle = TrustBundle::from_pem(root.root_pem()).unwrap();
        let serve = |id: SpiffeId| {
            let (key, csr) = super::new_key_and_csr(&id).unwrap();
            let chain = root.sign(&csr, &id, HOUR).unwrap();
            let svid = Svid::from_pem(&chain, &key).unwrap();
            TlsAcceptor::from(tls::server_config_no_client_auth(&svid).unwrap())
        };
        for (served, accepted) in [(id("web"), false), (ca_identity(TD).unwrap(), true)] {
            let acceptor = serve(served.clone());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                // Handshake, then hang up: the client gets no CA behind it.
                let _ = acceptor.accept(tcp).await;
            });
            let client = CaClient::new(addr, N1.into(), bundle.clone(), TD).unwrap();
            let e = sign(&client, &id("web"), HOUR).await.unwrap_err();
            let tls_refused = matches!(&e, client::Error::Tls { .. });
            assert_eq!(tls_refused, !accepted, "{served}: {e}");
            if !accepted {
                assert!(e.to_string().contains(&served.to_string()), "{e}");
            }
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn in_kubernetes_an_agent_proves_its_node_with_its_pods_projected_token() {
        use super::satoken::tests::{Issuer, claims, options as sa_options};
        let tmp = TempDir::new();
        let issuer = Issuer::new("sa-key-1");
        let jwks = tmp.0.join("jwks.json");
        std::fs::write(&jwks, &issuer.jwks).unwrap();
        let mut opts = options(&tmp);
        opts.auth = AgentAuth::ServiceAccounts(sa_options(satoken::Check::JwksFile(jwks)));
        let ca = Running::start(opts).await;

        // The agent reads its token file at each call, as the kubelet rotates it.
        let token_file = tmp.0.join("token");
        let write_token = |node: &str| {
            std::fs::write(&token_file, issuer.sign(&claims(node, "weft-agent-abcde"))).unwrap()
        };
        write_token("n1");
        let agent = ca.client("unused").with_token_file(token_file.clone());
        sign(&agent, &id("web"), HOUR).await.unwrap();
        let (code, why) = refused(sign(&agent, &id("db"), HOUR).await);
        assert_eq!(code, Code::PERMISSION_DENIED, "{why}");
        assert!(why.contains("node n1 may not have"), "{why}");

        // Rotated to a token of a pod on n2: now it is n2's agent.
        write_token("n2");
        sign(&agent, &id("db"), HOUR).await.unwrap();
        assert!(sign(&agent, &id("web"), HOUR).await.is_err());

        // A node token means nothing here, nor does a token for another audience.
        let (code, why) = refused(sign(&ca.client(N1), &id("web"), HOUR).await);
        assert_eq!(code, Code::UNAUTHENTICATED, "{why}");
        let mut other = claims("n1", "weft-agent-abcde");
        other["aud"] = serde_json::json!(["https://kubernetes.default.svc"]);
        let (code, why) = refused(sign(&ca.client(&issuer.sign(&other)), &id("web"), HOUR).await);
        assert_eq!(code, Code::UNAUTHENTICATED);
        assert!(why.contains("audience"), "{why}");
        ca.stop().await;
    }

    #[tokio::test]
    async fn a_waypoint_gets_only_its_own_identity_with_its_own_token() {
        use super::satoken::tests::{Issuer, claims, options as sa_options};
        let tmp = TempDir::new();
        let issuer = Issuer::new("sa-key-1");
        let jwks = tmp.0.join("jwks.json");
        std::fs::write(&jwks, &issuer.jwks).unwrap();
        let mut opts = options(&tmp);
        std::fs::write(
            opts.mesh.file().unwrap(),
            format!("{MESH}- {{name: wp-0, namespace: shop, service_account: waypoint, node: n1, native_tunnel: true}}\n"),
        )
        .unwrap();
        opts.auth = AgentAuth::ServiceAccounts(sa_options(satoken::Check::JwksFile(jwks)));
        let ca = Running::start(opts).await;
        let token = |pod: &str, sa: &str, node: &str| {
            let mut c = claims(node, pod);
            c["sub"] = serde_json::json!(format!("system:serviceaccount:shop:{sa}"));
            issuer.sign(&c)
        };
        let wp = ca.client(&token("wp-0", "waypoint", "n1"));
        sign(&wp, &id("waypoint"), HOUR).await.unwrap();
        let (code, why) = refused(sign(&wp, &id("web"), HOUR).await);
        assert_eq!(code, Code::PERMISSION_DENIED, "{why}");
        assert!(why.contains("only its own identity"), "{why}");
        // An ordinary pod's token gets nothing: its agent asks for it.
        let web = ca.client(&token("web-0", "web", "n1"));
        let (code, why) = refused(sign(&web, &id("web"), HOUR).await);
        assert_eq!(code, Code::PERMISSION_DENIED, "{why}");
        assert!(why.contains("speaks HBONE itself"), "{why}");
        // The waypoint's token names another node than its pod's: refused.
        let moved = ca.client(&token("wp-0", "waypoint", "n2"));
        assert!(sign(&moved, &id("waypoint"), HOUR).await.is_err());
        ca.stop().await;
    }

    #[tokio::test]
    async fn with_a_discovery_source_the_ca_serves_once_synced_and_follows_each_change() {
        let tmp = TempDir::new();
        let mut opts = options(&tmp);
        let parse = |text: &str| Arc::new(file::parse(Path::new("mesh"), text).unwrap().mesh);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        opts.mesh = MeshSource::Updates {
            trust_domain: TD.into(),
            updates: Updates::new(rx),
        };
        // Not synced yet: the CA does not listen.
        let binding = tokio::spawn(CaServer::bind(opts));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !binding.is_finished(),
            "the CA bound before discovery synced"
        );
        tx.send(Update::Mesh(parse(MESH))).await.unwrap();
        let server = binding.await.unwrap().unwrap();
        let mut waypoints = server.waypoint_namespaces();
        assert!(waypoints.borrow_and_update().is_empty());
        let (stop, stopped) = oneshot::channel::<()>();
        let ca = Running {
            addr: server.local_addr().unwrap(),
            metrics: server.metrics_addr().unwrap(),
            bundle: server.bundle_pem(),
            stop,
            task: tokio::spawn(server.run(async {
                let _ = stopped.await;
            })),
        };
        let (n1, n2) = (ca.client(N1), ca.client(N2));
        sign(&n1, &id("web"), HOUR).await.unwrap();
        // web's pod is rescheduled on n2 (a whole mesh): n1 loses it at once.
        tx.send(Update::Mesh(parse(&MESH.replace("node: n1", "node: n2"))))
            .await
            .unwrap();
        eventually("n1 loses web", || async {
            sign(&n1, &id("web"), HOUR).await.is_err()
        })
        .await;
        sign(&n2, &id("web"), HOUR).await.unwrap();
        // As a delta: back on n1, and a waypoint appears in `shop`.
        let moved = parse(
            "workloads:
- {name: web-0, namespace: shop, service_account: web, node: n1}
- {name: shop-waypoint-0, namespace: shop, service_account: waypoint, node: n2, native_tunnel: true}
",
        );
        tx.send(Update::Delta(MeshDelta {
            upserts: moved.workloads.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
        eventually("n1 has web again", || async {
            sign(&n1, &id("web"), HOUR).await.is_ok()
        })
        .await;
        assert!(sign(&n2, &id("web"), HOUR).await.is_err());
        waypoints.changed().await.unwrap();
        assert_eq!(
            *waypoints.borrow_and_update(),
            BTreeSet::from(["shop".to_owned()])
        );
        // A removal is one too.
        tx.send(Update::Delta(MeshDelta {
            removes: vec![WorkloadKey {
                namespace: "shop".into(),
                name: "web-0".into(),
            }],
            ..Default::default()
        }))
        .await
        .unwrap();
        eventually("n1 loses web again", || async {
            sign(&n1, &id("web"), HOUR).await.is_err()
        })
        .await;
        ca.stop().await;
    }

    #[tokio::test]
    async fn refuses_unknown_or_missing_tokens() {
        let tmp = TempDir::new();
        let ca = Running::start(options(&tmp)).await;
        let (code, message) = refused(
            sign(
                &ca.client("n1-token-but-not-the-right-one"),
                &id("web"),
                HOUR,
            )
            .await,
        );
        assert_eq!(code, Code::UNAUTHENTICATED);
        assert!(message.contains("node token"), "{message}");

        let mut request = ca.client(N1).request(proto::CREATE_CERTIFICATE).unwrap();
        request.headers_mut().remove(header::AUTHORIZATION);
        let answer = raw_call(&ca.client(N1), request, b"").await;
        assert_eq!(answer.grpc_status(), Some(Code::UNAUTHENTICATED));

        // Compared exactly: the right token with a space after it is another one.
        for near in [format!("Bearer {N1} "), format!("Bearer  {N1}")] {
            let mut request = ca.client(N1).request(proto::CREATE_CERTIFICATE).unwrap();
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, HeaderValue::try_from(near).unwrap());
            let answer = raw_call(&ca.client(N1), request, b"").await;
            assert_eq!(answer.grpc_status(), Some(Code::UNAUTHENTICATED));
        }
        ca.stop().await;
    }

    #[tokio::test]
    async fn the_client_checks_it_reaches_the_ca() {
        let tmp = TempDir::new();
        let ca = Running::start(options(&tmp)).await;
        let bundle = TrustBundle::from_pem(&ca.bundle).unwrap();

        // Right root, but expecting the CA of another trust domain.
        let other_td = CaClient::new(ca.addr, N1.into(), bundle, "other.local").unwrap();
        let e = sign(&other_td, &id("web"), HOUR).await.unwrap_err();
        assert!(matches!(e, client::Error::Tls { .. }), "{e}");
        assert!(e.is_retryable());

        // Trusting another root.
        let stranger = Authority::generate(TD, HOUR).unwrap();
        let foreign = TrustBundle::from_pem(stranger.root_pem()).unwrap();
        let client = CaClient::new(ca.addr, N1.into(), foreign, TD).unwrap();
        let e = sign(&client, &id("web"), HOUR).await.unwrap_err();
        assert!(matches!(e, client::Error::Tls { .. }), "{e}");

        // Nobody there.
        let addr = ca.addr;
        ca.stop().await;
        let e = sign(&other_td.clone(), &id("web"), HOUR).await.unwrap_err();
        assert!(
            matches!(&e, client::Error::Connect { addr: a, .. } if *a == addr.into()),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_client_follows_the_live_bundle_from_one_call_to_the_next() {
        let tmp = TempDir::new();
        let ca = Running::start(options(&tmp)).await;
        let other = Authority::generate(TD, HOUR).unwrap();
        let stranger = TrustBundle::from_pem(other.root_pem()).unwrap();
        let live = Arc::new(std::sync::RwLock::new(stranger.clone()));
        let client = CaClient::new(ca.addr, N1.into(), stranger, TD)
            .unwrap()
            .following(live.clone());
        // A bundle without the CA's root: the CA is not trusted.
        let e = sign(&client, &id("web"), HOUR).await.unwrap_err();
        assert!(e.to_string().contains("TLS"), "{e}");
        // The agent reloads its bundle with the CA's root: the same client
        // trusts the CA from its next call.
        *live.write().unwrap() = TrustBundle::from_pem(&ca.bundle).unwrap();
        sign(&client, &id("web"), HOUR).await.unwrap();
        // And a root removed is no longer trusted.
        *live.write().unwrap() = TrustBundle::from_pem(other.root_pem()).unwrap();
        assert!(sign(&client, &id("web"), HOUR).await.is_err());
        ca.stop().await;
    }

    #[tokio::test]
    async fn a_restart_keeps_the_root_and_trusted_roots_join_the_bundle() {
        let tmp = TempDir::new();
        let opts = options(&tmp);
        let ca = Running::start(opts.clone()).await;
        let first = ca.bundle.clone();
        ca.stop().await;
        let mode = std::fs::metadata(opts.dir.join("root-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let ca = Running::start(opts.clone()).await;
        assert_eq!(ca.bundle, first);
        // A bundle read before the restart still trusts the CA.
        let old_bundle = TrustBundle::from_pem(&first).unwrap();
        let client = CaClient::new(ca.addr, N1.into(), old_bundle, TD).unwrap();
        sign(&client, &id("web"), HOUR).await.unwrap();
        ca.stop().await;

        // Rotation: a root in trusted/ is trusted too, after the signing one.
        let next = Authority::generate(TD, HOUR).unwrap();
        std::fs::create_dir_all(opts.dir.join("trusted")).unwrap();
        std::fs::write(opts.dir.join("trusted/next.pem"), next.root_pem()).unwrap();
        std::fs::write(opts.dir.join("trusted/notes.txt"), "ignored").unwrap();
        // A copy of the signing root there is not a second root.
        std::fs::copy(
            opts.dir.join("root.pem"),
            opts.dir.join("trusted/current.pem"),
        )
        .unwrap();
        let ca = Running::start(opts.clone()).await;
        assert_eq!(TrustBundle::from_pem(&ca.bundle).unwrap().len(), 2);
        assert!(ca.bundle.starts_with(&first));
        assert_eq!(
            std::fs::read_to_string(opts.dir.join("bundle.pem")).unwrap(),
            ca.bundle
        );
        ca.stop().await;

        // A trusted file that is not a certificate stops the start.
        std::fs::write(opts.dir.join("trusted/bad.pem"), "garbage").unwrap();
        let e = CaServer::bind(opts).await.err().unwrap();
        assert!(e.to_string().contains("bad.pem"), "{e}");
    }

    #[tokio::test]
    async fn refuses_to_start_on_half_a_root_or_bad_options() {
        let tmp = TempDir::new();
        let opts = options(&tmp);
        std::fs::create_dir_all(&opts.dir).unwrap();
        std::fs::write(opts.dir.join("root.pem"), "x").unwrap();
        let e = CaServer::bind(opts.clone()).await.err().unwrap();
        assert!(
            e.to_string()
                .contains("only one of root.pem and root-key.pem"),
            "{e}"
        );

        let tmp = TempDir::new();
        let mut opts = options(&tmp);
        opts.max_ttl = Duration::ZERO;
        assert!(matches!(CaServer::bind(opts).await, Err(Error::Options(_))));
        for limits in [
            Limits {
                max_connections_per_peer: 2000,
                ..Limits::default()
            },
            Limits {
                max_connections: 0,
                ..Limits::default()
            },
            Limits {
                first_request_timeout: Duration::ZERO,
                ..Limits::default()
            },
        ] {
            let mut opts = options(&tmp);
            opts.limits = limits;
            assert!(
                matches!(CaServer::bind(opts).await, Err(Error::Options(_))),
                "{limits:?}"
            );
        }

        let tmp = TempDir::new();
        let opts = options(&tmp);
        std::fs::write(opts.auth.node_tokens().unwrap(), "n1: short\n").unwrap();
        assert!(matches!(
            CaServer::bind(opts).await,
            Err(Error::Tokens { .. })
        ));
    }

    #[tokio::test]
    async fn follows_the_mesh_config_and_tokens_and_keeps_the_last_good_ones() {
        let tmp = TempDir::new();
        let opts = options(&tmp);
        let ca = Running::start(opts.clone()).await;
        let (n1, n2) = (ca.client(N1), ca.client(N2));
        sign(&n1, &id("web"), HOUR).await.unwrap();

        // web moves to n2.
        std::fs::write(
            opts.mesh.file().unwrap(),
            MESH.replace("node: n1", "node: n2"),
        )
        .unwrap();
        eventually("n1 loses web", || async {
            sign(&n1, &id("web"), HOUR).await.is_err()
        })
        .await;
        sign(&n2, &id("web"), HOUR).await.unwrap();

        // A broken file changes nothing.
        std::fs::write(opts.mesh.file().unwrap(), "workloads: [nonsense").unwrap();
        std::fs::write(opts.auth.node_tokens().unwrap(), "n1: short\n").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        sign(&n2, &id("web"), HOUR).await.unwrap();

        // n2's token is replaced.
        std::fs::write(
            opts.auth.node_tokens().unwrap(),
            format!("n1: {N1}\nn2: n2-new-token-0123456789\n"),
        )
        .unwrap();
        eventually("the old n2 token stops working", || async {
            matches!(
                sign(&n2, &id("web"), HOUR).await,
                Err(client::Error::Refused {
                    code: Code::UNAUTHENTICATED,
                    ..
                })
            )
        })
        .await;
        sign(&ca.client("n2-new-token-0123456789"), &id("web"), HOUR)
            .await
            .unwrap();
        ca.stop().await;
    }

    #[tokio::test]
    async fn metrics_count_every_result() {
        let tmp = TempDir::new();
        let ca = Running::start(options(&tmp)).await;
        let n1 = ca.client(N1);
        sign(&n1, &id("web"), HOUR).await.unwrap();
        sign(&n1, &id("web"), HOUR).await.unwrap();
        sign(&n1, &id("db"), HOUR).await.unwrap_err();
        sign(&ca.client("nobody-0123456789abcdef"), &id("web"), HOUR)
            .await
            .unwrap_err();
        n1.sign("junk", &id("web"), HOUR).await.unwrap_err();

        let text = http_get(ca.metrics, "/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        for line in [
            "# TYPE weft_ca_requests_total counter",
            "weft_ca_requests_total{result=\"signed\"} 2",
            "weft_ca_requests_total{result=\"denied\"} 1",
            "weft_ca_requests_total{result=\"unauthenticated\"} 1",
            "weft_ca_requests_total{result=\"invalid\"} 1",
            "weft_ca_requests_total{result=\"error\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(
            http_get(ca.metrics, "/other")
                .await
                .starts_with("HTTP/1.1 404")
        );
        ca.stop().await;
    }

    #[tokio::test]
    async fn garbage_is_refused_and_the_ca_keeps_serving() {
        let tmp = TempDir::new();
        let ca = Running::start(options(&tmp)).await;
        let n1 = ca.client(N1);

        // Not TLS at all: raw bytes, and a plaintext HTTP/1 request. The server
        // closes (after a TLS alert at most).
        for junk in [
            &[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0][..],
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        ] {
            let mut tcp = TcpStream::connect(ca.addr).await.unwrap();
            tcp.write_all(junk).await.unwrap();
            let mut rest = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
            assert!(read.is_ok(), "the CA kept a garbage connection open");
            assert!(rest.len() < 64, "{rest:?}");
        }

        // HTTP/2 to another path: UNIMPLEMENTED for gRPC, 404 otherwise.
        let request = n1.request("/grpc.health.v1.Health/Check").unwrap();
        let answer = raw_call(&n1, request, &proto::frame(b"")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.grpc_status(), Some(Code::UNIMPLEMENTED));
        let mut request = n1.request("/").unwrap();
        *request.method_mut() = Method::GET;
        request.headers_mut().remove(header::CONTENT_TYPE);
        assert_eq!(
            raw_call(&n1, request, b"").await.status,
            StatusCode::NOT_FOUND
        );

        // The right path but not gRPC.
        let mut request = n1.request(proto::CREATE_CERTIFICATE).unwrap();
        request.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert_eq!(
            raw_call(&n1, request, b"{}").await.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );

        // Oversized: a frame that says so, and a body that is.
        let mut big = vec![0u8, 0xff, 0xff, 0xff, 0xff];
        big.extend(std::iter::repeat_n(b'x', 1000));
        let request = n1.request(proto::CREATE_CERTIFICATE).unwrap();
        let answer = raw_call(&n1, request, &big).await;
        assert_eq!(answer.grpc_status(), Some(Code::RESOURCE_EXHAUSTED));
        let big = proto::frame(&vec![b'x'; proto::MAX_MESSAGE + 1]);
        let request = n1.request(proto::CREATE_CERTIFICATE).unwrap();
        assert_eq!(
            raw_call(&n1, request, &big).await.grpc_status(),
            Some(Code::RESOURCE_EXHAUSTED)
        );

        // Not one message: truncated, two, compressed, not protobuf.
        let message = CertificateRequest {
            csr: "x".into(),
            ..Default::default()
        }
        .encode();
        let framed = proto::frame(&message);
        let two = [framed.clone(), framed.clone()].concat();
        let mut compressed = framed.clone();
        compressed[0] = 1;
        for body in [
            &framed[..3],
            &framed[..framed.len() - 1],
            &two,
            &compressed,
            &proto::frame(&[0xff; 3]),
        ] {
            let request = n1.request(proto::CREATE_CERTIFICATE).unwrap();
            let answer = raw_call(&n1, request, body).await;
            assert_eq!(
                answer.grpc_status(),
                Some(Code::INVALID_ARGUMENT),
                "{body:?}"
            );
        }

        // Still serving.
        sign(&n1, &id("web"), HOUR).await.unwrap();
        ca.stop().await;
    }

    fn short_limits(first: Duration, idle: Duration) -> Limits {
        Limits {
            max_connections: 64,
            max_connections_per_peer: 4,
            first_request_timeout: first,
            idle_timeout: idle,
        }
    }

    /// A TCP connection to `to` from loopback address `src`: a peer address of its
    /// own, so that per-peer limits count it apart from the test's clients.
    async fn tcp_from(src: [u8; 4], to: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((src, 0))).unwrap();
        socket.connect(to).await.unwrap()
    }

    /// Reads what the CA sends until it closes the connection (end of file or a
    /// reset) and says when, or `None` if it is still open at `until`.
    async fn closed_by<S: tokio::io::AsyncRead + Unpin>(
        io: &mut S,
        until: Instant,
    ) -> Option<Instant> {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(until, io.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(Instant::now()),
                Ok(Ok(_)) => {}
            }
        }
    }

    fn metric(text: &str, name: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    /// TLS to the CA, checking it as an agent does.
    async fn tls_to(
        ca: &Running,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let bundle = TrustBundle::from_pem(&ca.bundle).unwrap();
        let config = tls::anonymous_client_config(&bundle, ca_identity(TD).unwrap()).unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(ca.addr.ip().into());
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    }

    #[tokio::test]
    async fn strangers_hold_a_few_slots_for_a_fixed_time_and_nodes_are_served() {
        let tmp = TempDir::new();
        let first = Duration::from_millis(800);
        let mut opts = options(&tmp);
        opts.limits = short_limits(first, Duration::from_secs(60));
        let ca = Running::start(opts).await;
        let start = Instant::now();
        // Everything a stranger holds is closed by then, whatever it does.
        let bound = start + first + CLOSE_GRACE + Duration::from_secs(1);
        let mut held = Vec::new();

        // 127.0.0.2 connects and says nothing: four are held...
        let mut silent = Vec::new();
        for _ in 0..4 {
            silent.push(tcp_from([127, 0, 0, 2], ca.addr).await);
        }
        // ...and more are closed at once, long before any deadline.
        for _ in 0..2 {
            let mut extra = tcp_from([127, 0, 0, 2], ca.addr).await;
            let closed = closed_by(&mut extra, start + first / 2).await;
            assert!(
                closed.is_some(),
                "a fifth connection from one address was held"
            );
        }
        for tcp in silent {
            held.push(tokio::spawn(async move {
                let mut tcp = tcp;
                ("silent", closed_by(&mut tcp, bound).await)
            }));
        }

        // 127.0.0.3: TLS and the HTTP/2 preface, then silence.
        for _ in 0..2 {
            let mut tls = tls_to(&ca, tcp_from([127, 0, 0, 3], ca.addr).await)
                .await
                .unwrap();
            tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await
                .unwrap();
            held.push(tokio::spawn(async move {
                ("preface", closed_by(&mut tls, bound).await)
            }));
        }
        // A TLS record that trickles in, a byte every 50 ms.
        let mut trickle = tcp_from([127, 0, 0, 3], ca.addr).await;
        held.push(tokio::spawn(async move {
            let mut record = vec![0x16, 0x03, 0x01, 0x02, 0x00];
            record.resize(5 + 512, 0x01);
            for b in record {
                if trickle.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ("trickle", closed_by(&mut trickle, bound).await)
        }));
        // Requests without a token, one after another on one connection: each is
        // answered, none extends the deadline.
        let tls = tls_to(&ca, tcp_from([127, 0, 0, 3], ca.addr).await)
            .await
            .unwrap();
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        let driver = tokio::spawn(conn);
        let strange = ca.client("not-a-token-of-this-ca-0000");
        held.push(tokio::spawn(async move {
            let mut send = send;
            let mut refused = 0;
            let requests = async {
                loop {
                    let Ok(ready) = send.ready().await else { break };
                    send = ready;
                    let request = strange.request(proto::CREATE_CERTIFICATE).unwrap();
                    let Ok((response, _)) = send.send_request(request, true) else {
                        break;
                    };
                    match response.await {
                        Ok(r) if r.headers().get("grpc-status").is_some() => refused += 1,
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            let _ = tokio::time::timeout_at(bound, requests).await;
            assert!(refused > 3, "only {refused} requests answered");
            let closed = tokio::time::timeout_at(bound, driver)
                .await
                .ok()
                .map(|_| Instant::now());
            ("tokenless requests", closed)
        }));

        // Meanwhile a node gets its certificate.
        tokio::time::sleep(Duration::from_millis(100)).await;
        sign(&ca.client(N1), &id("web"), HOUR).await.unwrap();

        for h in held {
            let (what, closed) = h.await.unwrap();
            let closed = closed.unwrap_or_else(|| panic!("{what}: still open"));
            // Closed at the deadline fixed at accept, not before it.
            assert!(closed >= start + first, "{what}: closed early");
        }
        let text = http_get(ca.metrics, "/metrics").await;
        assert_eq!(
            metric(
                &text,
                "weft_ca_connections_refused_total{reason=\"peer_limit\"}"
            ),
            2
        );
        assert_eq!(
            metric(
                &text,
                "weft_ca_connections_refused_total{reason=\"connection_limit\"}"
            ),
            0
        );
        assert_eq!(
            metric(
                &text,
                "weft_ca_connections_timed_out_total{phase=\"first_request\"}"
            ),
            8
        );
        assert_eq!(metric(&text, "weft_ca_connections_open"), 0);
        ca.stop().await;
    }

    #[tokio::test]
    async fn a_nodes_connection_idles_out_from_its_last_answer_and_the_total_is_capped() {
        let tmp = TempDir::new();
        let (first, idle) = (Duration::from_millis(300), Duration::from_millis(1500));
        let mut opts = options(&tmp);
        opts.limits = short_limits(first, idle);
        opts.limits.max_connections = 6;
        let ca = Running::start(opts).await;
        let n1 = ca.client(N1);

        let tls = tls_to(&ca, TcpStream::connect(ca.addr).await.unwrap())
            .await
            .unwrap();
        let (send, mut conn) = h2::client::handshake(tls).await.unwrap();
        let mut pings = conn.ping_pong().unwrap();
        let mut driver = tokio::spawn(conn);
        let call = |send: h2::client::SendRequest<Bytes>| {
            let n1 = n1.clone();
            async move {
                let mut send = send.ready().await.unwrap();
                let (_, csr) = super::new_key_and_csr(&id("web")).unwrap();
                let message = CertificateRequest {
                    csr,
                    ..Default::default()
                }
                .encode();
                let request = n1.request(proto::CREATE_CERTIFICATE).unwrap();
                let (response, mut body) = send.send_request(request, false).unwrap();
                body.send_data(Bytes::from(proto::frame(&message)), true)
                    .unwrap();
                let mut body = response.await.unwrap().into_body();
                while let Some(chunk) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.unwrap().len());
                }
                let trailers = body.trailers().await.unwrap().unwrap();
                assert_eq!(trailers["grpc-status"], "0");
                send
            }
        };
        let send = call(send).await;
        // Past the first-request deadline: a node's connection stays.
        tokio::time::sleep(first * 2).await;
        let _send = call(send).await;
        let answered = Instant::now();
        // Bytes are not requests: pings all along do not keep it open.
        let closed = async {
            loop {
                tokio::select! {
                    _ = &mut driver => return Instant::now(),
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        let _ = pings.ping(h2::Ping::opaque()).await;
                    }
                }
            }
        };
        let closed = tokio::time::timeout(idle + CLOSE_GRACE + Duration::from_secs(2), closed)
            .await
            .expect("the idle connection was not closed");
        assert!(closed >= answered + idle, "closed before it was idle");

        // The total: six held from three addresses, the seventh is closed at once.
        let mut held = Vec::new();
        for src in 2..5 {
            for _ in 0..2 {
                held.push(tcp_from([127, 0, 0, src], ca.addr).await);
            }
        }
        let mut seventh = tcp_from([127, 0, 0, 9], ca.addr).await;
        assert!(
            closed_by(&mut seventh, Instant::now() + first / 2)
                .await
                .is_some()
        );
        let text = http_get(ca.metrics, "/metrics").await;
        assert_eq!(
            metric(
                &text,
                "weft_ca_connections_refused_total{reason=\"connection_limit\"}"
            ),
            1
        );
        assert_eq!(
            metric(&text, "weft_ca_connections_timed_out_total{phase=\"idle\"}"),
            1
        );
        assert_eq!(metric(&text, "weft_ca_connections_open"), 6);
        drop(held);
        ca.stop().await;
    }

    #[tokio::test]
    async fn an_agent_with_many_workloads_stays_under_the_per_peer_cap() {
        let tmp = TempDir::new();
        let mut opts = options(&tmp);
        opts.limits.max_connections_per_peer = client::MAX_CALLS_IN_FLIGHT;
        let ca = Running::start(opts).await;
        // One client, as one agent has, asking for many certificates at once.
        let n1 = ca.client(N1);
        let calls: Vec<_> = (0..4 * client::MAX_CALLS_IN_FLIGHT)
            .map(|_| {
                let n1 = n1.clone();
                tokio::spawn(async move { sign(&n1, &id("web"), HOUR).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        let text = http_get(ca.metrics, "/metrics").await;
        assert_eq!(
            metric(
                &text,
                "weft_ca_connections_refused_total{reason=\"peer_limit\"}"
            ),
            0
        );
        ca.stop().await;
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer_token(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bear"));
        assert_eq!(bearer_token(&h), None);
    }

    /// An HTTP/2 answer, as seen on the wire.
    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        trailers: Option<HeaderMap>,
    }

    impl Answer {
        fn grpc_status(&self) -> Option<Code> {
            let h = self
                .headers
                .get("grpc-status")
                .or_else(|| self.trailers.as_ref().and_then(|t| t.get("grpc-status")))?;
            Code::parse(h.as_bytes())
        }
    }

    /// Sends `request` with `body` over a fresh connection of `client`'s.
    async fn raw_call(client: &CaClient, request: Request<()>, body: &[u8]) -> Answer {
        let (send, _conn) = client.connect().await.unwrap();
        let mut send = send.ready().await.unwrap();
        let (response, mut stream) = send.send_request(request, false).unwrap();
        stream
            .send_data(Bytes::copy_from_slice(body), true)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("no answer")
            .unwrap();
        let (head, mut body) = response.into_parts();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.ok().flatten();
        Answer {
            status: head.status,
            headers: head.headers,
            trailers,
        }
    }

    async fn http_get(addr: SocketAddr, path: &str) -> String {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    }
}
