//! The agent's operator endpoints: readiness on 15021 (`GET /healthz/ready`), and
//! the admin endpoint on `127.0.0.1:15000`:
//!
//! | path | what |
//! |---|---|
//! | `GET /status` | the node's view as JSON: pods, identities, services and their endpoints, connections (what `weft status` prints) |
//! | `GET /config_dump` | the config in force (JSON), when it was loaded, and the last rejected change with its error |
//! | `GET /certs` | every workload certificate: identity, serial, validity, last CA error |
//! | `GET /logging`, `POST /logging?level=<RUST_LOG filter>` | the log filter, and changing it at run time |
//! | `GET /stats/prometheus` | the same as 15020's `/metrics` |

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    metrics::{Handler, Reply, query_param},
    model::WorkloadKey,
    node::Shared,
    telemetry,
};

/// What the operator endpoints read.
pub struct Admin {
    pub shared: Arc<Shared>,
    pub node: String,
    pub config_path: PathBuf,
    ready: AtomicBool,
    config: Mutex<ConfigStatus>,
    /// Enrolled pods (in the kernel and listening) and their namespace cookie.
    enrolled: Mutex<BTreeMap<WorkloadKey, u64>>,
    /// How the metrics page is made.
    pub render_metrics: crate::metrics::Render,
}

#[derive(Debug, Clone, Default, Serialize)]
struct ConfigStatus {
    /// When the config in force was loaded (Unix seconds).
    loaded_at: u64,
    /// The last change that was rejected, if the last change was rejected.
    last_error: Option<Rejected>,
    accepted: u64,
    rejected: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Rejected {
    at: u64,
    error: String,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Admin {
    pub fn new(
        shared: Arc<Shared>,
        node: String,
        config_path: PathBuf,
        render_metrics: crate::metrics::Render,
    ) -> Admin {
        Admin {
            shared,
            node,
            config_path,
            ready: AtomicBool::new(false),
            config: Mutex::new(ConfigStatus {
                loaded_at: unix(SystemTime::now()),
                ..ConfigStatus::default()
            }),
            enrolled: Mutex::new(BTreeMap::new()),
            render_metrics,
        }
    }

    /// Programs attached, config loaded, first certificates settled.
    pub fn set_ready(&self) {
        self.ready.store(true, Relaxed);
    }

    /// The first config is in force (the agent would not have started without).
    pub fn config_loaded(&self, allow_shrink: bool) {
        crate::stats::STATS.config_loaded();
        warn_allow_shrink(allow_shrink);
    }

    /// A changed config file was taken (applied, or equal to the one in force).
    pub fn config_applied(&self, allow_shrink: bool) {
        let mut c = self.config.lock().unwrap_or_else(|e| e.into_inner());
        c.loaded_at = unix(SystemTime::now());
        c.last_error = None;
        c.accepted += 1;
        crate::stats::STATS.config_reload(true);
        warn_allow_shrink(allow_shrink);
    }

    pub fn config_rejected(&self, error: String) {
        let mut c = self.config.lock().unwrap_or_else(|e| e.into_inner());
        c.last_error = Some(Rejected {
            at: unix(SystemTime::now()),
            error,
        });
        c.rejected += 1;
        crate::stats::STATS.config_reload(false);
    }

    pub fn set_enrolled(&self, pods: BTreeMap<WorkloadKey, u64>) {
        *self.enrolled.lock().unwrap_or_else(|e| e.into_inner()) = pods;
    }

    /// The readiness endpoint (15021).
    pub fn readiness(self: &Arc<Self>) -> Handler {
        let admin = self.clone();
        Arc::new(
            move |method: &str, path: &str, _: &str| match (method, path) {
                ("GET", "/healthz/ready") if admin.ready.load(Relaxed) => {
                    Reply::text(200, "ready\n")
                }
                ("GET", "/healthz/ready") => Reply::text(
                    503,
                    "not ready: programs, config or certificates not settled yet\n",
                ),
                _ => Reply::text(404, "not found\n"),
            },
        )
    }

    /// The admin endpoint (15000).
    pub fn handler(self: &Arc<Self>) -> Handler {
        let admin = self.clone();
        Arc::new(
            move |method: &str, path: &str, query: &str| match (method, path) {
                ("GET", "/status") => Reply::json(&admin.status()),
                ("GET", "/config_dump") => Reply::json(&admin.config_dump()),
                ("GET", "/certs") => Reply::json(&admin.certs()),
                ("GET", "/logging") => Reply::text(200, format!("{}\n", telemetry::log_filter())),
                ("POST", "/logging") => match query_param(query, "level") {
                    Some(level) => {
                        let level = level.replace("%2C", ",").replace("%3D", "=");
                        match telemetry::set_log_filter(&level) {
                            Ok(()) => {
                                tracing::info!(filter = %telemetry::log_filter(), "log filter changed");
                                Reply::text(200, format!("{}\n", telemetry::log_filter()))
                            }
                            Err(e) => Reply::text(400, format!("{e}\n")),
                        }
                    }
                    None => Reply::text(400, "give ?level=<filter>, e.g. ?level=debug\n"),
                },
                ("GET", "/stats/prometheus") => Reply {
                    status: 200,
                    content_type: "text/plain; version=0.0.4",
                    body: (admin.render_metrics)(),
                },
                ("GET", "/") => Reply::text(
                    200,
                    "/status  /config_dump  /certs  /logging (POST ?level=)  /stats/prometheus\n",
                ),
                (_, "/logging") => Reply::text(405, "GET or POST\n"),
                _ => Reply::text(404, "not found\n"),
            },
        )
    }

    fn config_dump(&self) -> serde_json::Value {
        let view = self.shared.view();
        let status = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        serde_json::json!({
            "node": self.node,
            "file": self.config_path.display().to_string(),
            "status": status,
            "config": view.to_mesh(),
        })
    }

    fn certs(&self) -> Vec<serde_json::Value> {
        self.shared
            .certs
            .snapshot()
            .into_iter()
            .map(|(id, s)| {
                serde_json::json!({
                    "identity": id.to_string(),
                    "serial": s.svid.as_ref().map(|c| c.serial.clone()),
                    "not_before": s.svid.as_ref().map(|c| unix(c.not_before)),
                    "not_after": s.svid.as_ref().map(|c| unix(c.not_after)),
                    "last_error": s.last_error,
                    "requests": s.attempts,
                })
            })
            .collect()
    }

    fn status(&self) -> Status {
        let view = self.shared.view();
        let enrolled = self
            .enrolled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let certs: BTreeMap<String, u64> = self
            .shared
            .certs
            .snapshot()
            .into_iter()
            .filter_map(|(id, s)| Some((id.to_string(), unix(s.svid?.not_after))))
            .collect();
        let pods = view
            .local()
            .map(|w| {
                let identity = w
                    .identity(view.trust_domain())
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                PodStatus {
                    workload: w.key().to_string(),
                    cert_expires: certs.get(&identity).copied(),
                    identity,
                    addresses: w.addresses.iter().map(ToString::to_string).collect(),
                    enrolled: w.enrolled,
                    captured: enrolled.contains_key(&w.key()),
                }
            })
            .collect();
        let now = Instant::now();
        let balancers: BTreeMap<_, _> = self.shared.balancers.all().into_iter().collect();
        let services = view
            .services()
            .map(|svc| {
                let key = (svc.namespace.clone(), svc.name.clone());
                let endpoints = balancers
                    .get(&key)
                    .map(|b| {
                        b.snapshot(now)
                            .into_iter()
                            .map(|e| EndpointStatus {
                                workload: e.key.to_string(),
                                active: e.active,
                                ejected_for_ms: e
                                    .ejected_until
                                    .map(|u| u.saturating_duration_since(now).as_millis() as u64),
                                ejections: e.ejections,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                ServiceStatus {
                    service: format!("{}/{}", svc.namespace, svc.name),
                    addresses: svc.addresses.iter().map(ToString::to_string).collect(),
                    ports: svc
                        .ports
                        .iter()
                        .map(|p| format!("{}->{}", p.port, p.target_port))
                        .collect(),
                    policy: format!("{:?}", svc.load_balancing.policy),
                    endpoints,
                }
            })
            .collect();
        let config = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Status {
            node: self.node.clone(),
            ready: self.ready.load(Relaxed),
            config_loaded_at: config.loaded_at,
            config_error: config.last_error.map(|r| r.error),
            pods,
            services,
            connections: Connections {
                in_flight: crate::node::access::in_flight(),
                inbound_policy_checked: self.shared.live.len(),
                per_worker: crate::workers::loads(),
            },
        }
    }
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub node: String,
    pub ready: bool,
    pub config_loaded_at: u64,
    pub config_error: Option<String>,
    pub pods: Vec<PodStatus>,
    pub services: Vec<ServiceStatus>,
    pub connections: Connections,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct PodStatus {
    pub workload: String,
    pub identity: String,
    pub addresses: Vec<String>,
    pub enrolled: bool,
    /// Capture is on and the listeners are open.
    pub captured: bool,
    pub cert_expires: Option<u64>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub addresses: Vec<String>,
    pub ports: Vec<String>,
    pub policy: String,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct EndpointStatus {
    pub workload: String,
    pub active: usize,
    pub ejected_for_ms: Option<u64>,
    pub ejections: u64,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Connections {
    /// Proxied connections open now (both directions).
    pub in_flight: usize,
    /// Inbound connections held to policy (closed if a change denies them).
    pub inbound_policy_checked: usize,
    /// Accepted connections (from pods, plaintext inbound, HBONE from other
    /// agents) each data-path worker carries now.
    #[serde(default)]
    pub per_worker: Vec<usize>,
}

/// While the file says `allow_shrink: true`, the guard against a change that
/// takes most of the mesh away is off: say so at every load.
fn warn_allow_shrink(allow_shrink: bool) {
    if allow_shrink {
        tracing::warn!(
            "the mesh file says `allow_shrink: true`: a change that unenrolls most of the mesh or removes every policy is applied; remove it once the change is done"
        );
    }
}

/// `weft status`: the node's view, as a person reads it.
pub fn print_status(s: &Status) -> String {
    use std::fmt::Write as _;
    let now = unix(SystemTime::now());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}: {}; config loaded {}s ago{}",
        s.node,
        if s.ready { "ready" } else { "NOT READY" },
        now.saturating_sub(s.config_loaded_at),
        s.config_error
            .as_ref()
            .map(|e| format!("; LAST CHANGE REJECTED: {e}"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "\nPODS");
    let _ = writeln!(
        out,
        "  {:<24} {:<9} {:<46} {:<28} CERTIFICATE",
        "WORKLOAD", "STATE", "IDENTITY", "ADDRESSES"
    );
    for p in &s.pods {
        let state = match (p.enrolled, p.captured) {
            (true, true) => "enrolled",
            (true, false) => "pending",
            (false, _) => "-",
        };
        let cert = match p.cert_expires {
            Some(t) => format!("expires in {}", human(t.saturating_sub(now))),
            None if p.enrolled => "none yet".to_owned(),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {:<24} {:<9} {:<46} {:<28} {cert}",
            p.workload,
            state,
            p.identity,
            p.addresses.join(",")
        );
    }
    let _ = writeln!(out, "\nSERVICES");
    if s.services.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for svc in &s.services {
        let _ = writeln!(
            out,
            "  {:<24} {:<20} ports {:<16} {}",
            svc.service,
            svc.addresses.join(","),
            svc.ports.join(","),
            svc.policy
        );
        for e in &svc.endpoints {
            let ejected = e
                .ejected_for_ms
                .map(|ms| format!(", EJECTED for {}", human(ms.div_ceil(1000))))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "    -> {:<24} active {}{ejected} (ejected {} times)",
                e.workload, e.active, e.ejections
            );
        }
    }
    let _ = writeln!(
        out,
        "\nCONNECTIONS\n  in flight: {}  (inbound under policy: {})",
        s.connections.in_flight, s.connections.inbound_policy_checked
    );
    if !s.connections.per_worker.is_empty() {
        let loads: Vec<String> = s
            .connections
            .per_worker
            .iter()
            .map(usize::to_string)
            .collect();
        let _ = writeln!(out, "  accepted, per worker: {}", loads.join(" "));
    }
    out
}

fn human(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}
