//! Istio's standard TCP metrics (`istio_tcp_*`, the labels ztunnel uses, so
//! existing dashboards work) and Weft's own counters, served on 15020.
//!
//! A connection takes its label set once, when the agent knows both ends: the
//! opened counter goes up then. When it ends, the closed counter and the byte
//! counters of the same labels (with the final `response_flags`) go up. Bytes are
//! added at close, not while the connection runs: a scrape during a long transfer
//! does not see its bytes yet.
//!
//! Cost: one lock and one hash of the label set per connection at open and at
//! close; the label values are a handful of short strings built per connection.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use crate::{
    metrics::label,
    model::{Labels, Workload},
    net::limit::Refused,
};

/// The agent's counters (one per process).
pub static STATS: LazyLock<Stats> = LazyLock::new(Stats::default);

/// Who reports: the source's agent (outbound) or the destination's (inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    Source,
    Destination,
}

/// Why a connection ended badly, as ztunnel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flags {
    None,
    /// Denied by an authorization policy (or peer authentication).
    Deny,
    /// No upstream connection could be made.
    Connect,
}

impl Flags {
    fn as_str(self) -> &'static str {
        match self {
            Flags::None => "-",
            Flags::Deny => "DENY",
            Flags::Connect => "CONNECT",
        }
    }
}

/// One end of a connection, as the metrics name it. Unknown parts are "unknown".
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub principal: Option<String>,
    pub app: Option<String>,
    pub version: Option<String>,
}

impl Peer {
    /// What the config says about `w`; `principal` only when proven by mTLS.
    pub fn of(w: &Workload, principal: Option<String>) -> Peer {
        Peer {
            workload: Some(w.name.clone()),
            namespace: Some(w.namespace.clone()),
            principal,
            app: Some(canonical_name(w).to_owned()),
            version: Some(canonical_revision(&w.labels).to_owned()),
        }
    }
}

/// Istio's canonical service: the `service.istio.io/canonical-name` label, else
/// `app.kubernetes.io/name`, else `app`, else the workload's name.
pub(crate) fn canonical_name(w: &Workload) -> &str {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| w.labels.get(k))
    .map_or(&w.name, |v| v)
}

/// Istio's canonical revision: `service.istio.io/canonical-revision`, else
/// `app.kubernetes.io/version`, else `version`, else "latest".
pub(crate) fn canonical_revision(labels: &Labels) -> &str {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(k))
    .map_or("latest", |v| v)
}

/// A service as the metrics name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

/// Every label of one `istio_tcp_*` series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    pub service: Option<ServiceName>,
    pub mutual_tls: bool,
    pub flags: Flags,
}

#[derive(Debug, Default)]
struct TcpCounters {
    opened: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    /// When a connection last opened or closed, in seconds of [`clock`].
    touched: AtomicU64,
}

/// Seconds since the first call: the time `prune` compares.
pub(crate) fn clock() -> u64 {
    static START: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
    START.elapsed().as_secs()
}

/// Whether a workload (namespace, name) is still in the model.
pub type Present<'a> = &'a dyn Fn(&str, &str) -> bool;

/// Labelled counters of Weft's own.
#[derive(Debug, Default)]
struct Family(Mutex<BTreeMap<Vec<(&'static str, String)>, u64>>);

impl Family {
    fn add(&self, labels: Vec<(&'static str, String)>, n: u64) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(labels)
            .or_default() += n;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, kind: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, n) in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "{name}{} {n}", render_labels(labels));
        }
    }

    fn set(&self, labels: Vec<(&'static str, String)>, n: u64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(labels, n);
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

fn render_labels(labels: &[(&'static str, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[derive(Debug, Default)]
pub struct Stats {
    tcp: Mutex<HashMap<TcpLabels, Arc<TcpCounters>>>,
    config_reloads: Family,
    config_last_ok: AtomicU64,
    ejections: Family,
    no_endpoint: Family,
    no_waypoint: Family,
    denied: Family,
    map_entries: Family,
    cni_requests: Family,
    /// Connections and streams a listener's limits refused, by listener and reason.
    refused: [[AtomicU64; Refused::ALL.len()]; Listener::ALL.len()],
    idle_closed: AtomicU64,
}

/// A kind of listener, as `weft_listener_refusals_total` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// 15008, inbound HBONE.
    Hbone,
    /// 15006, inbound plaintext.
    Inbound,
    /// 15001, the pod's captured connects.
    Outbound,
    /// The agent's own HTTP endpoints (15020, 15021, 15000).
    Endpoints,
}

impl Listener {
    const ALL: [Listener; 4] = [
        Listener::Hbone,
        Listener::Inbound,
        Listener::Outbound,
        Listener::Endpoints,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Hbone => "hbone",
            Listener::Inbound => "inbound",
            Listener::Outbound => "outbound",
            Listener::Endpoints => "endpoints",
        }
    }
}

impl Stats {
    fn counters(&self, labels: &TcpLabels) -> Arc<TcpCounters> {
        let mut map = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(labels) {
            return c.clone();
        }
        let c = Arc::<TcpCounters>::default();
        map.insert(labels.clone(), c.clone());
        c
    }

    /// A connection is open between known ends.
    pub fn opened(&self, labels: &TcpLabels) {
        let c = self.counters(labels);
        c.opened.fetch_add(1, Relaxed);
        c.touched.store(clock(), Relaxed);
    }

    /// A connection has ended. `request` bytes went from source to destination
    /// (Istio's `received`), `response` bytes back (Istio's `sent`).
    pub fn closed(&self, labels: &TcpLabels, request: u64, response: u64) {
        let c = self.counters(labels);
        c.closed.fetch_add(1, Relaxed);
        c.received.fetch_add(request, Relaxed);
        c.sent.fetch_add(response, Relaxed);
        c.touched.store(clock(), Relaxed);
    }

    /// Drops the series of workloads that have left the model, once they have
    /// had no connection open and none opened or closed for `quiet` seconds (so
    /// scrapes saw their last values): without it, every pod that ever came and
    /// went would keep its series, and churn would grow the agent's memory
    /// without bound. Returns how many series went.
    pub fn prune(&self, present: Present<'_>, quiet: u64) -> usize {
        self.prune_at(present, quiet, clock())
    }

    fn prune_at(&self, present: Present<'_>, quiet: u64, now: u64) -> usize {
        let departed = |p: &Peer| match (&p.namespace, &p.workload) {
            (Some(ns), Some(name)) => !present(ns, name),
            _ => false,
        };
        let mut pruned = 0;
        self.tcp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|labels, c| {
                let idle = c.opened.load(Relaxed) == c.closed.load(Relaxed)
                    && c.touched.load(Relaxed) + quiet <= now;
                let keep = !(idle && (departed(&labels.source) || departed(&labels.destination)));
                pruned += usize::from(!keep);
                keep
            });
        // `weft_connections_denied_total{workload="ns/name"}`.
        self.denied
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|labels, _| {
                let keep = labels.iter().all(|(k, v)| {
                    *k != "workload" || v.split_once('/').is_none_or(|(ns, name)| present(ns, name))
                });
                pruned += usize::from(!keep);
                keep
            });
        pruned
    }

    /// The first config is in force.
    pub fn config_loaded(&self) {
        self.config_last_ok.store(1, Relaxed);
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "rejected" };
        self.config_reloads
            .add(vec![("result", result.to_owned())], 1);
        self.config_last_ok.store(u64::from(ok), Relaxed);
    }

    pub fn ejection(&self, service: &str, endpoint: &str) {
        self.ejections.add(
            vec![
                ("service", service.to_owned()),
                ("endpoint", endpoint.to_owned()),
            ],
            1,
        );
    }

    pub fn no_healthy_endpoint(&self, service: &str) {
        self.no_endpoint
            .add(vec![("service", service.to_owned())], 1);
    }

    /// A connection to a service bound to a waypoint was refused: no replica
    /// of the waypoint could take it (never sent around it).
    pub fn no_waypoint(&self, service: &str) {
        self.no_waypoint
            .add(vec![("service", service.to_owned())], 1);
    }

    pub fn policy_denied(&self, workload: &str, reason: &'static str) {
        self.denied.add(
            vec![
                ("workload", workload.to_owned()),
                ("reason", reason.to_owned()),
            ],
            1,
        );
    }

    /// A listener refused a connection or stream (one atomic add: this runs
    /// once per refusal of a flood).
    pub fn refused(&self, listener: Listener, why: Refused) {
        self.refused[listener as usize][why as usize].fetch_add(1, Relaxed);
    }

    /// An HBONE connection that carried no stream for the idle timeout was
    /// closed by this side.
    pub fn idle_closed(&self) {
        self.idle_closed.fetch_add(1, Relaxed);
    }

    /// A request on the CNI socket was answered (or cut off), by command and
    /// result.
    pub fn cni_request(&self, command: &'static str, result: &'static str) {
        self.cni_requests.add(
            vec![
                ("command", command.to_owned()),
                ("result", result.to_owned()),
            ],
            1,
        );
    }

    /// The current entry count of each eBPF map.
    pub fn set_map_entries(&self, counts: &[(&'static str, usize)]) {
        self.map_entries.clear();
        for (map, n) in counts {
            self.map_entries
                .set(vec![("map", (*map).to_owned())], *n as u64);
        }
    }

    /// The Prometheus text of every counter here.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let tcp: Vec<(TcpLabels, Arc<TcpCounters>)> = {
            let map = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<_> = map.iter().map(|(k, c)| (k.clone(), c.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let series: Vec<(String, &TcpCounters)> = tcp
            .iter()
            .map(|(l, c)| (istio_labels(l), c.as_ref()))
            .collect();
        for (name, help, get) in [
            (
                "istio_tcp_connections_opened_total",
                "The total number of TCP connections opened",
                (|c: &TcpCounters| c.opened.load(Relaxed)) as fn(&TcpCounters) -> u64,
            ),
            (
                "istio_tcp_connections_closed_total",
                "The total number of TCP connections closed",
                |c| c.closed.load(Relaxed),
            ),
            (
                "istio_tcp_sent_bytes_total",
                "The size of total bytes sent during response in case of a TCP connection",
                |c| c.sent.load(Relaxed),
            ),
            (
                "istio_tcp_received_bytes_total",
                "The size of total bytes received during request in case of a TCP connection",
                |c| c.received.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, c) in &series {
                let _ = writeln!(out, "{name}{{{labels}}} {}", get(c));
            }
        }
        self.config_reloads.render(
            &mut out,
            "weft_config_reloads_total",
            "Config file changes seen, by result (rejected: the last good config kept serving).",
            "counter",
        );
        let _ = writeln!(
            out,
            "# HELP weft_config_last_reload_successful 1 if the last config change was applied.\n\
             # TYPE weft_config_last_reload_successful gauge\n\
             weft_config_last_reload_successful {}",
            self.config_last_ok.load(Relaxed)
        );
        self.ejections.render(
            &mut out,
            "weft_endpoint_ejections_total",
            "Service endpoints ejected by outlier detection.",
            "counter",
        );
        self.no_endpoint.render(
            &mut out,
            "weft_service_no_healthy_endpoint_total",
            "Connections to a service refused because no endpoint could take them.",
            "counter",
        );
        self.no_waypoint.render(
            &mut out,
            "weft_waypoint_unavailable_total",
            "Connections to a service bound to a waypoint refused because no waypoint replica could take them (fail closed).",
            "counter",
        );
        self.denied.render(
            &mut out,
            "weft_connections_denied_total",
            "Inbound connections refused by policy, by destination workload and reason.",
            "counter",
        );
        self.cni_requests.render(
            &mut out,
            "weft_cni_requests_total",
            "Requests of the chained CNI plugin, by command and result (refused, not_ready: the pod does not start; bad_request, not_root: cut off).",
            "counter",
        );
        self.map_entries.render(
            &mut out,
            "weft_ebpf_map_entries",
            "Entries in each eBPF map.",
            "gauge",
        );
        let name = "weft_listener_refusals_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections (and HBONE streams) refused by a listener's limits before they were served.\n# TYPE {name} counter"
        );
        for listener in Listener::ALL {
            for why in Refused::ALL {
                let mut n = self.refused[listener as usize][why as usize].load(Relaxed);
                match (listener, why) {
                    (Listener::Endpoints, Refused::ListenerLimit) => {
                        n += crate::metrics::REFUSED.load(Relaxed);
                    }
                    (Listener::Endpoints, Refused::PeerLimit) => {
                        n += crate::metrics::PEER_REFUSED.load(Relaxed);
                    }
                    _ => {}
                }
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\",reason=\"{}\"}} {n}",
                    listener.as_str(),
                    why.as_str()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP weft_log_lines_dropped_total Log lines dropped because stdout did not take them (8 MiB were waiting).\n\
             # TYPE weft_log_lines_dropped_total counter\n\
             weft_log_lines_dropped_total {}",
            crate::telemetry::dropped_lines()
        );
        let _ = writeln!(
            out,
            "# HELP weft_hbone_idle_closed_total Inbound HBONE connections closed after carrying no stream for the idle timeout.\n\
             # TYPE weft_hbone_idle_closed_total counter\n\
             weft_hbone_idle_closed_total {}",
            self.idle_closed.load(Relaxed)
        );
        out
    }
}

/// The label text (without braces) of one series, in ztunnel's label names.
fn istio_labels(l: &TcpLabels) -> String {
    let mut s = String::with_capacity(768);
    let reporter = match l.reporter {
        Reporter::Source => "source",
        Reporter::Destination => "destination",
    };
    write_peers(
        &mut s,
        reporter,
        &l.source,
        &l.destination,
        l.service.as_ref(),
    );
    let _ = write!(
        s,
        ",request_protocol=\"tcp\",response_flags=\"{}\",connection_security_policy=\"{}\"",
        l.flags.as_str(),
        if l.mutual_tls {
            "mutual_tls"
        } else {
            "unknown"
        }
    );
    s
}

/// The labels Istio's TCP and request metrics share: the reporter, both
/// workloads and the destination service, "unknown" where not known. The
/// waypoint's request metrics (`http::telemetry`) write theirs with this too,
/// so dashboards see one naming whichever proxy reported.
pub(crate) fn write_peers(
    s: &mut String,
    reporter: &str,
    source: &Peer,
    destination: &Peer,
    service: Option<&ServiceName>,
) {
    const CLUSTER: &str = "Kubernetes";
    let u = |v: &Option<String>| v.as_deref().map_or_else(|| "unknown".to_owned(), label);
    let _ = write!(s, "reporter=\"{reporter}\"");
    for (side, p) in [("source", source), ("destination", destination)] {
        if side == "destination" {
            let (svc, ns, name) = match service {
                Some(svc) => (
                    format!("{}.{}.svc.cluster.local", svc.name, svc.namespace),
                    svc.namespace.clone(),
                    svc.name.clone(),
                ),
                None => ("unknown".into(), "unknown".into(), "unknown".into()),
            };
            let _ = write!(
                s,
                ",destination_service=\"{}\",destination_service_namespace=\"{}\",destination_service_name=\"{}\"",
                label(&svc),
                label(&ns),
                label(&name)
            );
        }
        let known = p.workload.is_some();
        let _ = write!(
            s,
            ",{side}_workload=\"{}\",{side}_canonical_service=\"{}\",{side}_canonical_revision=\"{}\",{side}_workload_namespace=\"{}\",{side}_principal=\"{}\",{side}_app=\"{}\",{side}_version=\"{}\",{side}_cluster=\"{}\"",
            u(&p.workload),
            u(&p.app),
            u(&p.version),
            u(&p.namespace),
            u(&p.principal),
            u(&p.app),
            u(&p.version),
            if known { CLUSTER } else { "unknown" },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(flags: Flags) -> TcpLabels {
        TcpLabels {
            reporter: Reporter::Destination,
            source: Peer {
                workload: Some("client".into()),
                namespace: Some("default".into()),
                principal: Some("spiffe://cluster.local/ns/default/sa/client".into()),
                app: Some("client".into()),
                version: Some("latest".into()),
            },
            destination: Peer::default(),
            service: Some(ServiceName {
                namespace: "shop".into(),
                name: "web".into(),
            }),
            mutual_tls: true,
            flags,
        }
    }

    #[test]
    fn the_series_of_departed_workloads_go_once_quiet_and_no_others() {
        let stats = Stats::default();
        let gone = labels(Flags::None); // source "default/client"
        let mut stays = labels(Flags::None);
        stays.source.workload = Some("server".into());
        let mut open = labels(Flags::Deny);
        open.source.workload = Some("leaving".into());
        stats.opened(&gone);
        stats.closed(&gone, 1, 2);
        stats.opened(&stays);
        stats.closed(&stays, 1, 2);
        stats.opened(&open); // still open
        stats.policy_denied("default/client", "policy");
        stats.policy_denied("default/server", "policy");
        let present = |ns: &str, name: &str| ns == "default" && name == "server";
        let now = clock();
        // Not quiet long enough yet: everything stays.
        assert_eq!(
            stats.prune_at(&present, 300, now),
            1,
            "only the denial counter goes at once"
        );
        assert_eq!(stats.tcp.lock().unwrap().len(), 3);
        // Five minutes later the departed, idle series goes; the one with a
        // connection still open stays until it closes.
        assert_eq!(stats.prune_at(&present, 300, now + 300), 1);
        let left = stats.tcp.lock().unwrap();
        assert!(left.contains_key(&stays) && left.contains_key(&open) && !left.contains_key(&gone));
        drop(left);
        let page = stats.render();
        assert!(page.contains("workload=\"default/server\""));
        assert!(!page.contains("workload=\"default/client\""));
    }

    #[test]
    fn renders_istio_names_and_labels() {
        let stats = Stats::default();
        stats.opened(&labels(Flags::None));
        stats.closed(&labels(Flags::None), 7, 100);
        stats.closed(&labels(Flags::None), 1, 1);
        stats.opened(&labels(Flags::Deny));
        stats.closed(&labels(Flags::Deny), 0, 0);
        let text = stats.render();
        let line = |name: &str, flags: &str| -> Option<String> {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains(&format!("response_flags=\"{flags}\"")))
                .map(str::to_owned)
        };
        let sent = line("istio_tcp_sent_bytes_total{", "-").unwrap();
        assert!(sent.ends_with(" 101"), "{sent}");
        for want in [
            "reporter=\"destination\"",
            "source_workload=\"client\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
            "destination_workload=\"unknown\"",
            "destination_service=\"web.shop.svc.cluster.local\"",
            "destination_service_name=\"web\"",
            "connection_security_policy=\"mutual_tls\"",
            "request_protocol=\"tcp\"",
        ] {
            assert!(sent.contains(want), "{want} not in {sent}");
        }
        assert!(
            line("istio_tcp_connections_closed_total{", "DENY")
                .unwrap()
                .ends_with(" 1")
        );
        assert!(
            line("istio_tcp_connections_opened_total{", "-")
                .unwrap()
                .ends_with(" 1")
        );
    }
}
