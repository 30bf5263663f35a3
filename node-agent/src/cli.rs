//! Command-line flags. Every flag can also come from a `WEFT_*` environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::units::parse_duration;

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "Weft: a sidecarless service mesh")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load and attach the eBPF programs, serve enrolled pods.
    Agent(Box<AgentArgs>),
    /// Run the certificate authority: sign workload certificates for node agents.
    Ca(Box<CaArgs>),
    /// Run a waypoint: the L7 proxy (HTTP routing) of the services bound to it.
    /// It runs as a workload of the mesh (`native_tunnel: true`), in its own pod.
    Waypoint(Box<WaypointArgs>),
    /// Print a node's view (pods, identities, services, connections) from its
    /// agent's admin endpoint.
    Status(StatusArgs),
    /// The chained CNI plugin (run by the container runtime, with the CNI
    /// environment and config; also installed as `weft-cni`), and its install
    /// into a node's CNI directories.
    Cni(CniArgs),
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a mesh config file and print every error with its location.
    Validate { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct CniArgs {
    /// Without a subcommand: act as the plugin.
    #[command(subcommand)]
    pub command: Option<CniCommand>,
}

#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Copy this binary into the CNI bin dir as `weft-cni` and chain it at the
    /// end of the conflist the runtime uses (idempotent).
    Install {
        /// The node's CNI bin dir (mounted from the host).
        #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The node's CNI config dir (mounted from the host).
        #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The agent's socket, as the plugin will reach it on the node.
        #[arg(long, env = "WEFT_CNI_SOCKET", default_value = crate::cni::proto::DEFAULT_SOCKET)]
        agent_socket: PathBuf,
        /// Namespaces whose pods the plugin never sends to the agent: the
        /// cluster's own, which must start even while the mesh is down.
        #[arg(
            long,
            env = "WEFT_CNI_EXCLUDE_NAMESPACES",
            value_delimiter = ',',
            default_value = "kube-system,weft-system"
        )]
        exclude_namespaces: Vec<String>,
    },
    /// Take the plugin out of every conflist in the conf dir (and the binary
    /// out of the bin dir, if given).
    Uninstall {
        #[arg(long, env = "WEFT_CNI_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's admin endpoint.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Print the JSON the agent returns instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WaypointArgs {
    /// The mesh config file. Watched: a change applies without a restart, and
    /// one that does not validate keeps the last good one serving. Required
    /// with `--discovery file`.
    #[arg(long, env = "WEFT_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub source: Source,

    /// This waypoint's workload in the config, `<namespace>/<name>`: its
    /// identity and node.
    #[arg(long, env = "WEFT_WAYPOINT_WORKLOAD")]
    pub workload: String,

    /// Where HBONE is served.
    #[arg(long, env = "WEFT_WAYPOINT_LISTEN", default_value = "[::]:15008")]
    pub listen: SocketAddr,

    /// Where Prometheus `GET /metrics` is served (plain HTTP).
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = "[::]:15020")]
    pub metrics_addr: SocketAddr,

    /// Where `GET /healthz/ready` answers 200 once the waypoint serves.
    #[arg(long, env = "WEFT_READINESS_ADDR", default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,

    /// The CA that signs this waypoint's certificate.
    /// `host:port`: an address, or a name resolved at each connection.
    #[arg(long, env = "WEFT_CA_ADDR", default_value = "127.0.0.1:15012")]
    pub ca_addr: crate::ca::client::CaAddr,

    /// A file holding the CA token of this waypoint's node.
    #[arg(long, env = "WEFT_CA_TOKEN_FILE")]
    pub ca_token_file: PathBuf,

    /// The trust bundle (PEM; the CA writes it). Re-read when it changes.
    #[arg(long, env = "WEFT_TRUST_BUNDLE")]
    pub trust_bundle: PathBuf,

    /// Lifetime asked for the waypoint's certificate; renewed at half life.
    #[arg(long, env = "WEFT_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,

    /// Timeout for connecting to an endpoint.
    #[arg(long, env = "WEFT_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// How long a request may wait for its response head when its route sets
    /// no timeout.
    #[arg(long, env = "WEFT_REQUEST_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Data-path worker threads, as the agent's: a downstream connection
    /// stays on one with its requests, and each keeps its own upstream and
    /// Redis connections. Default: the CPUs this process may use.
    #[arg(long, env = "WEFT_WORKERS")]
    pub workers: Option<usize>,

    /// On shutdown, how long connections in flight may take to finish before
    /// they are cut. New connections are refused at once.
    #[arg(long, env = "WEFT_DRAIN", default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,

    /// The largest mesh file read, in bytes.
    #[arg(long, env = "WEFT_CONFIG_MAX_BYTES", default_value_t = crate::discovery::file::DEFAULT_MAX_BYTES)]
    pub config_max_bytes: u64,

    /// Connections held at once from one peer address (a source node's agent).
    #[arg(long, env = "WEFT_MAX_CONNECTIONS_PER_PEER", default_value_t = 4096)]
    pub max_connections_per_peer: usize,

    /// Connections held at once in all.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = 16384)]
    pub max_connections: usize,

    /// An OpenTelemetry collector (`http://host:4318`; OTLP/HTTP JSON, path
    /// `/v1/traces` unless given) to send sampled request spans to. Without
    /// it spans are not exported (the trace context is still propagated).
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Mark the traces the waypoint starts (a request without a valid
    /// `traceparent`) sampled; a caller's sampling decision is always kept.
    #[arg(long, env = "WEFT_TRACE_SAMPLE_NEW")]
    pub trace_sample_new: bool,

    /// CA certificates (PEM) that JWKS servers' certificates (`jwksUri`) must
    /// chain to, besides the mesh's trust bundle.
    #[arg(long, env = "WEFT_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<PathBuf>,

    /// How often keys fetched from a `jwksUri` are fetched again.
    #[arg(long, env = "WEFT_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub jwks_refresh: Duration,

    /// Proxies in front whose `X-Forwarded-For` entries are trusted: the
    /// client (policies' `remoteIpBlocks`, `remote.ip`) is the entry this many
    /// from the right; 0: the connection's source.
    #[arg(long, env = "WEFT_XFF_TRUSTED_HOPS", default_value_t = 0)]
    pub xff_trusted_hops: usize,

    /// How request paths are normalized before routing and authorization
    /// (Istio's `pathNormalization`); the upstream gets the normalized path.
    #[arg(
        long,
        env = "WEFT_NORMALIZE_PATH",
        value_enum,
        default_value = "decode-and-merge-slashes"
    )]
    pub normalize_path: crate::http::normalize::Normalization,

    /// The Redis server (`host:port`) that Global rate limits share; without
    /// it, they fail as their `failure_mode` says.
    #[arg(long, env = "WEFT_REDIS_ADDR")]
    pub redis_addr: Option<String>,
}

#[derive(Debug, Args)]
pub struct CaArgs {
    /// The CA's state directory: `root.pem` and `root-key.pem` (made on first
    /// start), `trusted/*.pem` (more roots to trust, for rotation), and what the CA
    /// writes for others: `bundle.pem` (the trust bundle) and `addr`.
    #[arg(long, env = "WEFT_CA_DIR")]
    pub dir: PathBuf,

    /// The mesh config: a node gets signed only identities of workloads the file
    /// places on it. Watched: changes apply without a restart. Required with
    /// `--discovery file`.
    #[arg(long, env = "WEFT_CA_CONFIG")]
    pub config: Option<PathBuf>,

    /// Where the CA learns which pods run on which node: the `--config` file,
    /// or the Kubernetes API (pods and namespaces; it serves once it has listed
    /// them).
    #[arg(long, env = "WEFT_CA_DISCOVERY", value_enum, default_value_t = Discovery::File)]
    pub discovery: Discovery,

    /// The trust domain, with `--discovery kubernetes` (a file names its own).
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// The node-token file (YAML, `node-name: token`): how agents prove their node
    /// in local mode. Watched. Required with `--agent-auth node-tokens`.
    #[arg(long, env = "WEFT_CA_NODE_TOKENS")]
    pub node_tokens: Option<PathBuf>,

    /// How agents prove their node: `node-tokens` (local mode, `--node-tokens`);
    /// `service-account` (Kubernetes: the agent pod's projected token, verified
    /// here with the issuer's keys from the API server, or from `--sa-jwks-file`);
    /// `token-review` (Kubernetes: the API server checks each token).
    #[arg(long, env = "WEFT_CA_AGENT_AUTH", value_enum, default_value_t = AgentAuthMode::NodeTokens)]
    pub agent_auth: AgentAuthMode,

    /// The audience the agents' service-account tokens are projected for.
    #[arg(long, env = "WEFT_CA_TOKEN_AUDIENCE", default_value = "weft-ca")]
    pub token_audience: String,

    /// The service-account issuer (the API server's `--service-account-issuer`).
    #[arg(
        long,
        env = "WEFT_CA_SA_ISSUER",
        default_value = "https://kubernetes.default.svc.cluster.local"
    )]
    pub sa_issuer: String,

    /// The issuer's JWKS as a file, instead of `GET /openid/v1/jwks` from the API
    /// server (`--agent-auth service-account`).
    #[arg(long, env = "WEFT_CA_SA_JWKS_FILE")]
    pub sa_jwks_file: Option<PathBuf>,

    /// In a cluster: the Secret (`namespace/name`) that holds the mesh's root.
    /// At start its root is written into `--dir`; on the mesh's first start the
    /// root made there is stored in it. Every replica signs with the same root.
    #[arg(long, env = "WEFT_CA_ROOT_SECRET")]
    pub root_secret: Option<String>,

    /// In a cluster: the ConfigMap (`namespace/name`) the trust bundle is
    /// published in (key `roots.pem`), for agents and waypoints to mount. With
    /// `--discovery kubernetes`, also under that name in every namespace where a
    /// waypoint pod (`weft.dev/role: waypoint`) runs.
    #[arg(long, env = "WEFT_CA_BUNDLE_CONFIGMAP")]
    pub bundle_configmap: Option<String>,

    /// The agents' service account, `namespace/name`: only its tokens prove a node.
    #[arg(
        long,
        env = "WEFT_CA_AGENT_SERVICE_ACCOUNT",
        default_value = "weft-system/weft-agent"
    )]
    pub agent_service_account: String,

    /// Where the gRPC endpoint (TLS) listens.
    #[arg(long, env = "WEFT_CA_LISTEN", default_value = "127.0.0.1:15012")]
    pub listen: SocketAddr,

    /// Where `GET /metrics` (plain HTTP) listens.
    #[arg(long, env = "WEFT_CA_METRICS_ADDR", default_value = "127.0.0.1:15014")]
    pub metrics_addr: SocketAddr,

    /// The longest certificate lifetime handed out, and the one given when a
    /// request names none. Forms: `90s`, `30m`, `24h`.
    #[arg(long, env = "WEFT_CA_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,

    /// The largest mesh file read, in bytes; a larger one is refused unread.
    #[arg(long, env = "WEFT_CA_CONFIG_MAX_BYTES", default_value_t = crate::discovery::file::DEFAULT_MAX_BYTES)]
    pub config_max_bytes: u64,

    /// Connections the CA holds at once; more are closed on accept (and counted).
    #[arg(long, env = "WEFT_CA_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Connections the CA holds at once from one IP address; more are closed on
    /// accept (and counted).
    #[arg(long, env = "WEFT_CA_MAX_CONNECTIONS_PER_PEER", default_value_t = 32)]
    pub max_connections_per_peer: usize,

    /// From accept, how long a connection has for its TLS and HTTP/2 handshakes and
    /// its first answered request (and for every request until one shows a node
    /// token). Fixed at accept: a slow peer cannot extend it.
    #[arg(long, env = "WEFT_CA_FIRST_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub first_request_timeout: Duration,

    /// A node's connection is closed this long after its last answered request.
    #[arg(long, env = "WEFT_CA_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
}

/// How agents prove their node to the CA (`weft ca --agent-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentAuthMode {
    NodeTokens,
    ServiceAccount,
    TokenReview,
}

/// Where the agent learns the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Discovery {
    /// The mesh file (`--config`), watched.
    File,
    /// The Kubernetes API (in cluster, or `KUBECONFIG`): pods, services,
    /// EndpointSlices, namespaces, Gateway API routes and policy CRDs.
    Kubernetes,
}

/// Where the agent and a waypoint learn the mesh (one set of flags for both).
#[derive(Debug, Clone, Args)]
pub struct Source {
    /// Where the mesh comes from: the `--config` file, or the Kubernetes API.
    #[arg(long, env = "WEFT_DISCOVERY", value_enum, default_value_t = Discovery::File)]
    pub discovery: Discovery,

    /// The trust domain of the mesh read from Kubernetes (a file names its own).
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// The root namespace of the mesh read from Kubernetes: its policies apply
    /// mesh-wide (a file names its own).
    #[arg(long, env = "WEFT_ROOT_NAMESPACE", default_value = "weft-system")]
    pub root_namespace: String,
}

impl Source {
    /// The Kubernetes source's options: every kind, these settings.
    pub fn kube_options(&self) -> crate::discovery::kube::KubeOptions {
        crate::discovery::kube::KubeOptions {
            kinds: crate::discovery::kube::Kinds::All,
            trust_domain: self.trust_domain.clone(),
            root_namespace: self.root_namespace.clone(),
            own_namespace: None,
        }
    }
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The mesh config file (local mode). Watched: changes apply without a restart.
    /// Required with `--discovery file`.
    #[arg(long, env = "WEFT_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub source: Source,

    /// This node's name; the agent serves the workloads the config places on it.
    #[arg(long, env = "WEFT_NODE")]
    pub node: Option<String>,

    /// The cgroup (v2) the capture programs attach to: every pod of this node must
    /// live below it, and the agent itself must not. Default: the cgroup2 root.
    #[arg(long, env = "WEFT_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// The procfs the agent writes pods' sysctls through and finds running pods
    /// in. In a container, the host's `/proc` mounted writable (the container's
    /// own `/proc/sys` is read-only).
    #[arg(long, env = "WEFT_PROC_DIR", default_value = "/proc")]
    pub proc_dir: PathBuf,

    /// Where programs, links and maps are pinned on bpffs.
    #[arg(long, env = "WEFT_BPF_PIN_DIR", default_value = "/sys/fs/bpf/weft")]
    pub bpf_pin_dir: PathBuf,

    /// The largest mesh file read, in bytes; a larger one is refused unread
    /// (and the last good one keeps serving).
    #[arg(long, env = "WEFT_CONFIG_MAX_BYTES", default_value_t = crate::discovery::file::DEFAULT_MAX_BYTES)]
    pub config_max_bytes: u64,

    /// Timeout for connecting to an upstream, in milliseconds.
    #[arg(long, env = "WEFT_CONNECT_TIMEOUT_MS", default_value_t = 10_000)]
    pub connect_timeout_ms: u64,

    /// On shutdown, how long connections in flight may take to finish before they
    /// are cut, in milliseconds. New connections are refused at once.
    #[arg(long, env = "WEFT_DRAIN_MS", default_value_t = 5_000)]
    pub drain_ms: u64,

    /// Remove every program, link, map and pin this agent installed, then exit.
    #[arg(long)]
    pub uninstall: bool,

    /// Where Prometheus `GET /metrics` is served (plain HTTP).
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = "[::]:15020")]
    pub metrics_addr: std::net::SocketAddr,

    /// Where `GET /healthz/ready` answers 200 once the agent serves.
    #[arg(long, env = "WEFT_READINESS_ADDR", default_value = "[::]:15021")]
    pub readiness_addr: std::net::SocketAddr,

    /// The admin endpoint (config dump, certificates, log level, status). Keep
    /// it on loopback: it is unauthenticated.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: std::net::SocketAddr,

    /// The CA (`weft ca`) that signs this node's workload certificates.
    /// `host:port`: an address, or a name resolved at each connection (in a
    /// cluster, the CA's Service: `weft-ca.weft-system.svc:15012`).
    #[arg(long, env = "WEFT_CA_ADDR", default_value = "127.0.0.1:15012")]
    pub ca_addr: crate::ca::client::CaAddr,

    /// A file holding this node's token for the CA. With `--embedded-ca-dir`,
    /// defaults to this node's entry in `--embedded-ca-node-tokens`.
    #[arg(long, env = "WEFT_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,

    /// The trust bundle (PEM, every root workloads trust; the CA writes it).
    /// Re-read when it changes, so a new root can be added without a restart.
    /// With `--embedded-ca-dir`, defaults to that directory's `bundle.pem`.
    #[arg(long, env = "WEFT_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,

    /// Run a CA inside this agent, with its state in this directory (as
    /// `weft ca --dir`). It listens on `--ca-addr`, so other nodes' agents can use
    /// it too, signs from the same `--config`, and this agent talks to it over the
    /// same authenticated CSR protocol as to a separate `weft ca`: the proxy code
    /// never holds the signing key. Both share one address space, though; where
    /// that matters, run `weft ca` as its own process.
    #[arg(
        long,
        env = "WEFT_EMBEDDED_CA_DIR",
        requires = "embedded_ca_node_tokens"
    )]
    pub embedded_ca_dir: Option<PathBuf>,

    /// The embedded CA's node-token file (as `weft ca --node-tokens`).
    #[arg(
        long,
        env = "WEFT_EMBEDDED_CA_NODE_TOKENS",
        requires = "embedded_ca_dir"
    )]
    pub embedded_ca_node_tokens: Option<PathBuf>,

    /// Where the embedded CA serves `GET /metrics` (as `weft ca --metrics-addr`).
    #[arg(
        long,
        env = "WEFT_EMBEDDED_CA_METRICS_ADDR",
        default_value = "127.0.0.1:15014"
    )]
    pub embedded_ca_metrics_addr: std::net::SocketAddr,

    /// The longest certificate lifetime the embedded CA hands out
    /// (as `weft ca --cert-ttl`).
    #[arg(long, env = "WEFT_EMBEDDED_CA_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub embedded_ca_cert_ttl: std::time::Duration,

    /// Lifetime asked for workload certificates (the CA may cap it); renewed at
    /// half life. Forms: `90s`, `30m`, `24h`.
    #[arg(long, env = "WEFT_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: std::time::Duration,

    /// HBONE: streams one pooled connection carries at most.
    #[arg(long, env = "WEFT_HBONE_MAX_STREAMS", default_value_t = 100)]
    pub hbone_max_streams: usize,

    /// HBONE: connections per (worker, source, destination) opened before any
    /// carries a second stream. Default: 2.
    #[arg(long, env = "WEFT_HBONE_SPREAD")]
    pub hbone_spread: Option<usize>,

    /// Data-path worker threads; each proxied connection stays on one. Default:
    /// the CPUs this process may use.
    #[arg(long, env = "WEFT_WORKERS")]
    pub workers: Option<usize>,

    /// How connections between two pods of this node travel: `in-process` (the
    /// agent connects them itself, applying the destination's policy to the
    /// source's identity; no TLS, one TCP hop less) or `hbone` (mutual TLS to
    /// this agent's own 15008, as between nodes).
    #[arg(long, env = "WEFT_SAME_NODE", value_enum, default_value_t = crate::node::SameNode::InProcess)]
    pub same_node: crate::node::SameNode,

    /// Where the agent's connections to applications come from: `client` (the
    /// client's own address, so applications see who connected) or `loopback`
    /// (127.0.0.6 / ::1, as Istio's sidecars do).
    #[arg(long, env = "WEFT_INBOUND_SOURCE", value_enum, default_value_t = crate::node::InboundSource::Client)]
    pub inbound_source: crate::node::InboundSource,

    /// HBONE: an unused pooled connection is closed after this long.
    #[arg(long, env = "WEFT_HBONE_IDLE", default_value = "60s", value_parser = parse_duration)]
    pub hbone_idle: std::time::Duration,

    /// Sockets all listeners of this agent hold at once for proxied
    /// connections (one per accepted connection, one per connection to an
    /// application or a plaintext destination). Default: the open-file limit
    /// less 1024 kept for everything else, so a flood can never take the
    /// agent to its fd limit.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Connections one pod listener (15001, 15006, 15008) holds at once; on
    /// 15008 the same number of streams.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS_PER_LISTENER", default_value_t = crate::node::Caps::default().per_listener)]
    pub max_connections_per_listener: usize,

    /// Connections one peer address holds at once on one pod listener (15006,
    /// 15008).
    #[arg(long, env = "WEFT_MAX_CONNECTIONS_PER_PEER", default_value_t = crate::node::Caps::default().per_peer)]
    pub max_connections_per_peer: usize,

    /// HBONE: streams one peer address holds at once on one pod's 15008 (each
    /// is one connection of a client pod to this one, and holds a socket to
    /// the application).
    #[arg(long, env = "WEFT_HBONE_MAX_STREAMS_PER_PEER", default_value_t = crate::node::Caps::default().streams_per_peer)]
    pub hbone_max_streams_per_peer: usize,

    /// HBONE: TLS handshakes in progress at once on one pod's 15008.
    #[arg(long, env = "WEFT_HBONE_MAX_HANDSHAKES", default_value_t = crate::node::Caps::default().handshakes)]
    pub hbone_max_handshakes: usize,

    /// HBONE: TLS handshakes in progress at once from one peer address, on one
    /// pod's 15008: what a peer holds before it has proved anything.
    #[arg(long, env = "WEFT_HBONE_MAX_HANDSHAKES_PER_PEER", default_value_t = crate::node::Caps::default().handshakes_per_peer)]
    pub hbone_max_handshakes_per_peer: usize,

    /// HBONE: the TLS and HTTP/2 handshakes of an inbound connection must both
    /// finish within this (one deadline, however slowly bytes trickle in).
    #[arg(long, env = "WEFT_HBONE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub hbone_handshake_timeout: std::time::Duration,

    /// HBONE: an inbound connection that carries no stream for this long is
    /// closed (GOAWAY, then dropped 2 s later whatever the peer does). Keep it
    /// above the peers' `--hbone-idle`, so they close first.
    #[arg(long, env = "WEFT_HBONE_SERVER_IDLE", default_value = "120s", value_parser = parse_duration)]
    pub hbone_server_idle: std::time::Duration,

    /// HBONE: every pooled connection sends an HTTP/2 PING this often (`0s`:
    /// never), so a dead peer or a black-holed path is noticed.
    #[arg(long, env = "WEFT_HBONE_PING_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub hbone_ping_interval: std::time::Duration,

    /// HBONE: a connection whose PING is not answered within this is closed
    /// (its streams fail) and the next stream to that peer opens a fresh one.
    #[arg(long, env = "WEFT_HBONE_PING_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub hbone_ping_timeout: std::time::Duration,

    /// Where the chained CNI plugin (`weft cni`) reaches this agent to hand
    /// it each new pod's network namespace (a Unix socket, mode 0600, root
    /// peers only). Off when not given.
    #[arg(long, env = "WEFT_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,

    /// Weft's own namespace, where this agent's DaemonSet lives (with
    /// `--discovery kubernetes`). Deleting it is uninstalling Weft: an agent
    /// that saw it being deleted takes itself out of the node as it stops,
    /// as `weft cni uninstall` and `weft agent --uninstall` do (the plugin's
    /// entry in `--cni-conf-dir`, its binary in `--cni-bin-dir`, the
    /// capture), so that the node's new pods can start without it. An agent
    /// stopped for any other reason (an upgrade, a restart, an eviction)
    /// leaves all of it in place: new pods wait for the next agent.
    #[arg(long, env = "WEFT_NAMESPACE")]
    pub namespace: Option<String>,

    /// The node's CNI conf dir, where `weft cni install` put the plugin's
    /// entry: taken out of it on an uninstall (see `--namespace`).
    #[arg(long, env = "WEFT_CNI_CONF_DIR")]
    pub cni_conf_dir: Option<PathBuf>,

    /// The node's CNI bin dir, where `weft cni install` copied the plugin:
    /// removed from it on an uninstall (see `--namespace`).
    #[arg(long, env = "WEFT_CNI_BIN_DIR")]
    pub cni_bin_dir: Option<PathBuf>,
}
