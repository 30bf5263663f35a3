//! One access-log line per connection, written when its guard drops (so no path,
//! early refusal, error or a panic unwinding a task, forgets it), and the typed
//! reason a connection ended.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tracing::info;

use super::pod::Pod;
use crate::{
    net::copy::{Side, Transfer},
    stats::{Flags, STATS, TcpLabels},
    telemetry::ACCESS_LOG,
};

/// Which way a connection goes through this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How a connection ended: the access log's `end`, and what the metrics'
/// `response_flags` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides finished cleanly.
    Closed,
    /// Refused by this agent before any upstream was tried (no original
    /// destination, a reserved port, outside the mesh with `refuse`...).
    Refused,
    /// Denied by peer authentication or an authorization policy.
    Denied,
    /// No upstream connection could be made.
    UpstreamConnectFailed,
    /// A service had no endpoint that could take it.
    NoHealthyEndpoint,
    /// A service bound to a waypoint had no waypoint replica that could take
    /// it: refused, never sent around the waypoint.
    NoWaypoint,
    /// The peer failed the TLS checks.
    TlsError,
    /// This side had no certificate to present.
    NoCertificate,
    /// An inbound HBONE stream that was not a valid CONNECT (answered 400).
    BadRequest,
    /// The client's side failed.
    DownstreamError,
    /// The upstream's side failed.
    UpstreamError,
    /// Still open (never logged as such: every path sets an end).
    Unknown,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Refused => "refused",
            End::Denied => "denied",
            End::UpstreamConnectFailed => "upstream_connect_failed",
            End::NoHealthyEndpoint => "no_healthy_endpoint",
            End::NoWaypoint => "no_waypoint",
            End::TlsError => "tls_error",
            End::NoCertificate => "no_certificate",
            End::BadRequest => "bad_request",
            End::DownstreamError => "downstream_error",
            End::UpstreamError => "upstream_error",
            End::Unknown => "unknown",
        }
    }

    /// The response flag it maps to in the metrics.
    fn flags(self) -> Flags {
        match self {
            End::Denied => Flags::Deny,
            End::UpstreamConnectFailed
            | End::NoHealthyEndpoint
            | End::NoWaypoint
            | End::TlsError
            | End::NoCertificate => Flags::Connect,
            _ => Flags::None,
        }
    }

    /// The end an HBONE status means, on the side that answered it.
    pub fn of_status(status: http::StatusCode) -> End {
        match status {
            http::StatusCode::SERVICE_UNAVAILABLE => End::UpstreamConnectFailed,
            http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN => End::Denied,
            _ => End::BadRequest,
        }
    }
}

/// Connections in flight (an access-log guard is alive for each).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Connections in flight now.
pub fn in_flight() -> usize {
    ACTIVE.load(Relaxed)
}

/// Waits until no connection is in flight and every HBONE connection served
/// has closed (after its GOAWAY: see [`crate::hbone::server::open_connections`]),
/// or `deadline` passes; returns how many connections were still open.
pub async fn drain(deadline: Duration) -> usize {
    let until = Instant::now() + deadline;
    loop {
        let n = ACTIVE.load(Relaxed);
        let done = n == 0 && crate::hbone::server::open_connections() == 0;
        if done || Instant::now() >= until {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The guard of one connection's access-log line and metrics.
pub struct AccessLog {
    pub direction: Direction,
    pub pod: Arc<Pod>,
    /// The connection's source on the wire.
    pub src: SocketAddr,
    /// Where an inbound peer claimed the connection originally came from
    /// (`forwarded`): logged beside `src`, never instead of it.
    pub forwarded: Option<SocketAddr>,
    dst: Option<SocketAddr>,
    start: Instant,
    /// The SPIFFE identities of the two ends, when known.
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    /// How the connection crossed the network: `mutual_tls` (HBONE),
    /// `node_local` or `none`.
    pub security: &'static str,
    /// The pooled HBONE connection that carried it.
    pub connection: Option<u64>,
    pub sent: u64,
    pub received: u64,
    pub end: End,
    pub error: Option<String>,
    /// The service the client dialed, when it dialed one.
    pub service: Option<String>,
    /// The metric labels, once both ends are known (see [`AccessLog::opened`]).
    tcp: Option<TcpLabels>,
}

/// `security` of a connection carried over HBONE.
pub const MUTUAL_TLS: &str = "mutual_tls";
/// `security` of a connection between two pods of this node that the agent
/// connected in-process (no network, so no TLS).
pub const NODE_LOCAL: &str = "node_local";

impl AccessLog {
    pub fn new(direction: Direction, pod: Arc<Pod>, src: SocketAddr) -> Self {
        ACTIVE.fetch_add(1, Relaxed);
        AccessLog {
            direction,
            pod,
            src,
            forwarded: None,
            dst: None,
            start: Instant::now(),
            src_identity: None,
            dst_identity: None,
            security: "none",
            connection: None,
            sent: 0,
            received: 0,
            end: End::Unknown,
            error: None,
            service: None,
            tcp: None,
        }
    }

    /// Both ends are known: counts the connection as opened under `labels`; its
    /// close is counted when the log is written.
    pub fn opened(&mut self, labels: TcpLabels) {
        STATS.opened(&labels);
        self.tcp = Some(labels);
    }

    pub fn set_dst(&mut self, dst: SocketAddr) {
        self.dst = Some(dst);
    }

    pub fn fail(&mut self, end: End, error: impl ToString) {
        self.end = end;
        self.error = Some(error.to_string());
    }

    /// Takes the outcome of a byte copy: its counts, and its end. `reversed`:
    /// the copy's "downstream" socket was this connection's upstream (an
    /// inbound HBONE stream copies from the application's socket).
    pub fn finish(&mut self, t: &Transfer, reversed: bool) {
        let (sent, received) = if reversed {
            (t.received, t.sent)
        } else {
            (t.sent, t.received)
        };
        self.sent += sent;
        self.received += received;
        match &t.result {
            Ok(()) => self.end = End::Closed,
            Err((side, e)) => {
                let down = (*side == Side::Downstream) != reversed;
                let end = if down {
                    End::DownstreamError
                } else {
                    End::UpstreamError
                };
                self.fail(end, e);
            }
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Relaxed);
        if let Some(mut labels) = self.tcp.take() {
            labels.flags = self.end.flags();
            STATS.closed(&labels, self.sent, self.received);
        }
        let dst = self.dst.map(|a| a.to_string());
        let forwarded = self.forwarded.map(|a| a.to_string());
        info!(
            target: ACCESS_LOG,
            direction = self.direction.as_str(),
            workload = %self.pod.key,
            src.addr = %self.src,
            src.forwarded = forwarded.as_deref(),
            dst.addr = dst.as_deref().unwrap_or("-"),
            service = self.service.as_deref(),
            src.identity = self.src_identity.as_deref(),
            dst.identity = self.dst_identity.as_deref(),
            security = self.security,
            hbone.connection = self.connection,
            bytes_sent = self.sent,
            bytes_received = self.received,
            duration_ms = self.start.elapsed().as_secs_f64() * 1e3,
            end = self.end.as_str(),
            error = self.error.as_deref(),
            "connection closed"
        );
    }
}
