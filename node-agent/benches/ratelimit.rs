//! The cost of a local rate limit decision: hashing a bucket key and checking
//! its GCRA bucket in the sharded store, for one hot key, for keys spread over
//! 10 000 clients, and with the store at its cap (every insert may evict).
//!
//! `cargo bench -p weft --bench ratelimit` (add `-- --quick` for a short run).

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use weft::http::ratelimit::{Buckets, Gcra, MAX_KEYS};

fn bench(c: &mut Criterion) {
    let gcra = Gcra::new(1_000_000, Duration::from_secs(1), 1_000, 1);
    let buckets = Buckets::new(MAX_KEYS);
    c.bench_function("ratelimit/local/one_key", |b| {
        b.iter(|| {
            let key = buckets.hash(black_box(b"shop/web\x00svc/shop/web\x00alice"));
            black_box(buckets.check(key, &gcra, buckets.now()))
        })
    });
    let mut i = 0u64;
    c.bench_function("ratelimit/local/10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % 10_000;
            let key = buckets.hash(&i.to_le_bytes());
            black_box(buckets.check(key, &gcra, buckets.now()))
        })
    });
    let full = Buckets::new(16 * 1024);
    let slow = Gcra::new(1, Duration::from_secs(3600), 1, 1);
    let mut n = 0u64;
    c.bench_function("ratelimit/local/at_cap_evicting", |b| {
        b.iter(|| {
            n += 1;
            let key = full.hash(&n.to_le_bytes());
            black_box(full.check(key, &slow, full.now()))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
