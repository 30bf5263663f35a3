//! The cost the waypoint's telemetry adds to one request: `telemetry::start`
//! (the trace context: parse `traceparent`, new span id, rewrite the header),
//! `telemetry::finish` (the request's pair of ends found by a hash of borrowed
//! names) and the end of the response body (its series found, the counter and
//! three histograms updated). There is no log subscriber, so the access-log line
//! is not formatted: its cost is the log thread's (as for the agent's
//! connection lines) and is not measured here. A JSON subscriber scoped with
//! `with_default` after the callsites had registered with none stayed disabled
//! (tracing caches each callsite's interest), so it was left out rather than
//! report a number that did not include it. Before the Criterion run it prints
//! the allocations per request, counted by the global allocator; they include
//! the fixture's own `Request` and the `Workload` and `View` the engine clones
//! into the record.
//!
//! The response's body is a small `Full` (polled to its end by hand), so
//! what is measured is the telemetry, not a body.
//!
//! `cargo bench -p weft --bench telemetry` (add `-- --quick` for a short run).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context as Cx, Poll, Waker},
};

use criterion::Criterion;
use http::{Request, Response};
use http_body::Body as _;
use weft::{
    http::{
        Body,
        engine::Context,
        telemetry::{self, Record},
        upstream::full,
    },
    identity::SpiffeId,
    model::{Endpoints, Mesh, Service, ServicePort, Workload, WorkloadKey},
    view::{Balancers, View},
};

/// Requests over which the allocations per request are counted.
const COUNTED: u64 = 1_000;

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, that is from System, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn workload(namespace: &str, name: &str, ip: [u8; 4]) -> Workload {
    Workload {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
        node: "n0".to_owned(),
        addresses: vec![IpAddr::from(ip)],
        enrolled: true,
        outside_mesh: Default::default(),
        labels: [("app", name), ("version", "v1")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        native_tunnel: false,
    }
}

struct Fixture {
    ctx: Context,
    view: Arc<View>,
    endpoint: Arc<Workload>,
}

fn fixture() -> Fixture {
    let port = ServicePort {
        port: 80,
        target_port: 8080,
        app_protocol: None,
    };
    let mesh = Mesh {
        workloads: vec![
            Arc::new(workload("default", "client", [10, 0, 0, 1])),
            Arc::new(workload("shop", "web", [10, 0, 1, 1])),
        ],
        ..Default::default()
    };
    let view = Arc::new(View::new(mesh, "n0", &Balancers::default()));
    Fixture {
        ctx: Context::new(
            Some(SpiffeId::new("cluster.local", "default", "client").unwrap()),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            Arc::new(Service {
                name: "web".into(),
                namespace: "shop".into(),
                addresses: vec![],
                ports: vec![port.clone()],
                endpoints: Endpoints::Listed(vec![]),
                load_balancing: Default::default(),
                outlier_detection: Default::default(),
                waypoint: None,
            }),
            port,
        ),
        endpoint: view
            .workload_arc(&WorkloadKey {
                namespace: "shop".into(),
                name: "web".into(),
            })
            .unwrap(),
        view,
    }
}

/// One request's telemetry, start to the end of its response body.
fn one(f: &Fixture) {
    let mut req = Request::get("http://web.shop/items?page=2")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(())
        .unwrap();
    let started = telemetry::start(&f.ctx, &mut req);
    // The engine puts the view and the endpoint (two refcounts) on the record
    // per request; counted here as part of the cost.
    let mut record = Record::default();
    record.endpoint = Some(f.endpoint.clone());
    record.view = Some(f.view.clone());
    record.upstream = Some("10.0.1.1:8080".parse().unwrap());
    let response = telemetry::finish(started, &f.ctx, record, Response::new(full("hello")));
    let mut body: Body = response.into_body();
    let mut cx = Cx::from_waker(Waker::noop());
    while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
        black_box(frame.ok());
    }
    drop(black_box(body));
}

fn allocations_per_request(f: &Fixture) -> f64 {
    one(f); // the series exists from here on
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..COUNTED {
        one(f);
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / COUNTED as f64
}

fn main() {
    let f = fixture();
    println!(
        "allocations per request (with the fixture's): {:.1}",
        allocations_per_request(&f)
    );
    let mut c = Criterion::default().configure_from_args();
    c.bench_function("telemetry/request (metrics, trace)", |b| b.iter(|| one(&f)));
    c.final_summary();
}
