//! The cost of choosing an endpoint: `Balancer::pick` (and the drop of its `Pick`)
//! for each policy with 3 and 100 endpoints, healthy, with a tenth ejected, and on a
//! retry; plus `report`, and `new`/`update` as a config reload sees them.
//!
//! `cargo bench -p weft --bench lb` (add `-- --quick` for a short run).

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weft::{
    lb::{Balancer, EndpointSpec, UNTRIED},
    model::{LbPolicy, OutlierDetection, Workload, WorkloadKey},
};

const POLICIES: [(&str, LbPolicy); 3] = [
    ("round_robin", LbPolicy::RoundRobin),
    ("least_request", LbPolicy::LeastRequest),
    ("consistent_hash", LbPolicy::ConsistentHash),
];
const SIZES: [usize; 2] = [3, 100];

fn key(i: usize) -> WorkloadKey {
    WorkloadKey {
        namespace: "shop".to_owned(),
        name: format!("checkout-{i}"),
    }
}

fn endpoints(n: usize) -> Vec<EndpointSpec> {
    (0..n)
        .map(|i| EndpointSpec {
            workload: std::sync::Arc::new(Workload {
                name: key(i).name,
                namespace: "shop".to_owned(),
                service_account: "checkout".to_owned(),
                node: "n".to_owned(),
                addresses: vec![],
                enrolled: true,
                outside_mesh: Default::default(),
                labels: Default::default(),
                native_tunnel: false,
            }),
            weight: 1,
            same_node: false,
        })
        .collect()
}

/// One failure ejects, for long enough that the bench never sees it end; up to
/// half the endpoints may be out.
fn outlier() -> OutlierDetection {
    OutlierDetection {
        consecutive_failures: 1,
        base_ejection_time: Duration::from_secs(3600),
        max_ejection_time: Duration::from_secs(3600),
        max_ejection_percent: 50,
    }
}

fn balancer(policy: LbPolicy, n: usize) -> Balancer {
    Balancer::new(policy, false, outlier(), endpoints(n))
}

/// A different client per call (consistent hash looks its address up).
fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a01_0000 | (i & 0xffff)))
}

fn pick(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("lb_pick");
    for (name, policy) in POLICIES {
        for n in SIZES {
            let b = balancer(policy, n);
            let mut i = 0u32;
            group.bench_function(BenchmarkId::new(name, n), |bench| {
                bench.iter(|| {
                    i = i.wrapping_add(1);
                    b.pick(black_box(client(i)), UNTRIED, now)
                })
            });
        }
    }
    group.finish();

    // 100 endpoints, every tenth ejected.
    let mut group = c.benchmark_group("lb_pick_10_of_100_ejected");
    for (name, policy) in POLICIES {
        let b = balancer(policy, 100);
        for e in (0..100).step_by(10) {
            assert!(
                b.report(&key(e), false, now).is_some(),
                "{name}: not ejected"
            );
        }
        let mut i = 0u32;
        group.bench_function(name, |bench| {
            bench.iter(|| {
                i = i.wrapping_add(1);
                b.pick(black_box(client(i)), UNTRIED, now)
            })
        });
    }
    group.finish();

    // A second retry: 100 endpoints, two already tried.
    let tried = [key(17), key(42)];
    let mut group = c.benchmark_group("lb_pick_retry_2_tried_of_100");
    for (name, policy) in POLICIES {
        let b = balancer(policy, 100);
        let mut i = 0u32;
        group.bench_function(name, |bench| {
            bench.iter(|| {
                i = i.wrapping_add(1);
                b.pick(black_box(client(i)), black_box(&tried), now)
            })
        });
    }
    group.finish();
}

fn report_and_reload(c: &mut Criterion) {
    let now = Instant::now();
    let b = balancer(LbPolicy::RoundRobin, 100);
    let ok = key(57);
    c.bench_function("lb_report_success_of_100", |bench| {
        bench.iter(|| b.report(black_box(&ok), true, now))
    });

    let mut group = c.benchmark_group("lb_update_unchanged_100");
    for (name, policy) in POLICIES {
        let b = balancer(policy, 100);
        group.bench_function(name, |bench| {
            bench.iter_batched(
                || endpoints(100),
                |specs| b.update(policy, false, outlier(), specs),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    // `new` builds the hash ring (100 x 1024 points) for consistent hash.
    let mut group = c.benchmark_group("lb_new_100");
    group.sample_size(20);
    for (name, policy) in POLICIES {
        group.bench_function(name, |bench| {
            bench.iter_batched(
                || endpoints(100),
                |specs| Balancer::new(policy, false, outlier(), specs),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, pick, report_and_reload);
criterion_main!(benches);
