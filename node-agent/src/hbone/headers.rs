//! The headers of an HBONE `CONNECT`, as ztunnel writes and reads them:
//! `forwarded` (RFC 7239) with the original source, `baggage` (W3C) naming the
//! source workload for the destination's telemetry, and a W3C `traceparent`.

use std::{
    cell::Cell,
    net::{IpAddr, SocketAddr},
};

use http::{HeaderValue, Method, Request};

/// `CONNECT ip:port` with the original source (`forwarded: for=...`), the
/// source's `baggage`, and a fresh trace context.
pub fn connect_request(
    authority: SocketAddr,
    source: Option<IpAddr>,
    baggage: Option<HeaderValue>,
) -> Request<()> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .header("traceparent", traceparent());
    if let Some(ip) = source {
        req = req.header("forwarded", forwarded(ip));
    }
    if let Some(baggage) = baggage {
        req = req.header("baggage", baggage);
    }
    // Only a malformed header value could fail here, and ours are all well formed.
    req.body(()).unwrap_or_default()
}

/// `forwarded: for=<ip>` (RFC 7239; an IPv6 address quoted in brackets): on a
/// CONNECT, and on each request a waypoint sends on.
pub fn forwarded(ip: IpAddr) -> HeaderValue {
    let value = match ip {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    // Digits, dots, colons, brackets and quotes: always a valid header value.
    HeaderValue::try_from(value).unwrap_or(HeaderValue::from_static("for=unknown"))
}

/// What ztunnel sends as `baggage` for a source workload (its cluster,
/// namespace, name, canonical service and revision), so an Istio peer's
/// telemetry names our workloads. `None` if a value cannot be a header.
pub fn baggage(namespace: &str, name: &str, service: &str, version: &str) -> Option<HeaderValue> {
    HeaderValue::try_from(format!(
        "k8s.cluster.name=Kubernetes,k8s.namespace.name={namespace},k8s.pod.name={name},service.name={service},service.version={version}"
    ))
    .ok()
}

/// The original client a peer claims in `forwarded` (RFC 7239): the `for` of
/// the first element, in any of its forms (`for=10.1.2.3`,
/// `for="10.1.2.3:4567"`, `for="[fd00::1]:4567"`), with port 0 when none is
/// given. A claim, never proof: the connection's own peer address is what
/// policy and the access log's `src.addr` use.
pub fn forwarded_for(value: &HeaderValue) -> Option<SocketAddr> {
    let value = value.to_str().ok()?;
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (key, v) = pair.trim().split_once('=')?;
        key.eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(SocketAddr::new(addr.ip().to_canonical(), addr.port()));
    }
    let ip = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    let ip: IpAddr = ip.parse().ok()?;
    Some(SocketAddr::new(ip.to_canonical(), 0))
}

/// A W3C `traceparent` for a new trace: version 00, random trace and span ids,
/// sampled flag off. Not security sensitive: a per-thread xorshift seeded from the
/// kernel's random source once.
fn traceparent() -> String {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut b = [0u8; 8];
            // SAFETY: getrandom writes at most 8 bytes into `b`.
            unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
            u64::from_ne_bytes(b) | 1
        });
    }
    let next = || {
        STATE.with(|s| {
            let mut x = s.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
    };
    format!("00-{:016x}{:016x}-{:016x}-00", next(), next(), next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_is_hbone_shaped() {
        let r = connect_request(
            "10.2.1.2:8080".parse().unwrap(),
            Some("10.1.1.2".parse().unwrap()),
            baggage("shop", "web-0", "web", "v1"),
        );
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(r.uri().authority().unwrap().as_str(), "10.2.1.2:8080");
        assert!(r.uri().scheme().is_none());
        assert_eq!(r.headers()["forwarded"], "for=10.1.1.2");
        assert_eq!(
            r.headers()["baggage"],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=web-0,service.name=web,service.version=v1"
        );
        let tp = r.headers()["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55);
        assert!(tp.starts_with("00-") && tp.ends_with("-00"));
        let r = connect_request(
            "[fd00::2]:80".parse().unwrap(),
            Some("fd00::1".parse().unwrap()),
            None,
        );
        assert_eq!(r.uri().authority().unwrap().as_str(), "[fd00::2]:80");
        assert_eq!(r.headers()["forwarded"], "for=\"[fd00::1]\"");
        assert!(r.headers().get("baggage").is_none());
        assert_ne!(traceparent(), traceparent());
    }

    #[test]
    fn reads_every_form_of_forwarded_for() {
        let f = |s: &'static str| forwarded_for(&HeaderValue::from_static(s));
        let addr = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(f("for=10.1.1.2"), addr("10.1.1.2:0"));
        // ztunnel's form: quoted, with the port.
        assert_eq!(f("for=\"10.1.2.3:4567\""), addr("10.1.2.3:4567"));
        assert_eq!(f("for=\"[fd00::2]\""), addr("[fd00::2]:0"));
        assert_eq!(f("for=\"[fd00::2]:4711\""), addr("[fd00::2]:4711"));
        assert_eq!(f("For=10.0.0.1;proto=http;by=10.0.0.2"), addr("10.0.0.1:0"));
        assert_eq!(f("proto=http; for=10.0.0.1"), addr("10.0.0.1:0"));
        // The first element is the original client.
        assert_eq!(f("for=10.0.0.1, for=10.0.0.2"), addr("10.0.0.1:0"));
        assert_eq!(f("for=\"[::ffff:10.0.0.1]:80\""), addr("10.0.0.1:80"));
        for junk in [
            "for=unknown",
            "for=_hidden",
            "by=10.0.0.1",
            "",
            "for=\"10.0.0.1",
        ] {
            assert_eq!(f(junk), None, "{junk:?}");
        }
    }
}
