//! The map of the code in ARCHITECTURE.md says what each top-level module may
//! import. This test reads the sources and holds them to it, so a new import that
//! breaks a layer (or makes a cycle) fails here instead of in review.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Module → the crate modules it may use outside its tests. Kept in the same order
/// as the table in ARCHITECTURE.md.
const ALLOWED: &[(&str, &[&str])] = &[
    ("units", &[]),
    ("yaml", &[]),
    ("net", &[]),
    ("grpc", &[]),
    ("identity", &[]),
    ("jwk", &[]),
    ("metrics", &["net"]),
    ("telemetry", &[]),
    ("workers", &[]),
    ("tls", &["identity"]),
    ("model", &["identity", "units"]),
    ("discovery", &["model", "units", "yaml"]),
    ("authz", &["identity", "model"]),
    ("lb", &["model"]),
    ("stats", &["metrics", "model", "net", "telemetry"]),
    ("view", &["authz", "lb", "model", "stats"]),
    ("ebpf", &["net"]),
    // The CNI plugin and its protocol: the agent's side is node::cni.
    ("cni", &[]),
    (
        "ca",
        &[
            "discovery",
            "grpc",
            "identity",
            "jwk",
            "metrics",
            "model",
            "net",
            "tls",
            "yaml",
        ],
    ),
    ("certs", &["ca", "identity", "metrics", "tls"]),
    ("hbone", &["certs", "identity", "net", "tls", "workers"]),
    // The L7 engine: routes, filters, upstreams; no front of its own.
    (
        "http",
        &[
            "authz",
            "grpc",
            "hbone",
            "identity",
            "jwk",
            "lb",
            "metrics",
            "model",
            "net",
            "stats",
            "telemetry",
            "tls",
            "view",
            "workers",
        ],
    ),
    // The waypoint's front: HBONE in, the engine behind.
    ("waypoint", &["hbone", "http", "identity", "model", "net"]),
    (
        "node",
        &[
            "authz",
            "certs",
            "cni",
            "ebpf",
            "hbone",
            "identity",
            "lb",
            "model",
            "net",
            "stats",
            "telemetry",
            "tls",
            "view",
            "workers",
        ],
    ),
    (
        "admin",
        &["metrics", "model", "node", "stats", "telemetry", "workers"],
    ),
    ("cli", &["ca", "cni", "discovery", "http", "node", "units"]),
    // The wiring of each role may use everything below it.
    (
        "app",
        &[
            "admin",
            "ca",
            "certs",
            "cli",
            "cni",
            "discovery",
            "ebpf",
            "hbone",
            "http",
            "identity",
            "metrics",
            "model",
            "net",
            "node",
            "stats",
            "telemetry",
            "tls",
            "units",
            "view",
            "waypoint",
            "workers",
        ],
    ),
    ("lib", &[]),
    ("main", &[]),
];

/// The top-level crate modules named by `crate::x` and `crate::{x, y::z}`.
fn uses(source: &str) -> BTreeSet<String> {
    // Tests may reach anywhere; only the code that ships is held to the map.
    let code = source.split("#[cfg(test)]").next().unwrap_or_default();
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group, skipping nested braces.
            let (mut depth, mut name, mut start) = (0usize, String::new(), true);
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        start = true;
                        name.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && start {
                    if c.is_ascii_lowercase() || c == '_' {
                        name.push(c);
                    } else if !name.is_empty() {
                        found.insert(std::mem::take(&mut name));
                        start = false;
                    }
                }
            }
            if !name.is_empty() {
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_import_only_what_the_map_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut problems = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some(may) = allowed.get(top.as_str()) else {
            problems.push(format!(
                "{}: module `{top}` is not in the map (ARCHITECTURE.md and ALLOWED here)",
                rel.display()
            ));
            continue;
        };
        for used in uses(&fs::read_to_string(&file).unwrap()) {
            if used != top && used != "self" && !may.contains(used.as_str()) {
                problems.push(format!(
                    "{}: `{top}` uses `crate::{used}`, which the map does not allow",
                    rel.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_map_has_no_cycles() {
    let graph: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    // Each module may only use modules listed before it: an order exists, so no cycle.
    let order: Vec<&str> = ALLOWED.iter().map(|(m, _)| *m).collect();
    for (i, m) in order.iter().enumerate() {
        for dep in graph[m] {
            let j = order.iter().position(|o| o == dep);
            assert!(
                j.is_some_and(|j| j < i),
                "`{m}` may use `{dep}`, which is not listed before it: a cycle is possible"
            );
        }
    }
}

#[test]
fn the_reader_finds_grouped_and_plain_uses() {
    let found = uses(
        "use crate::{a::{b, c}, d_e::F, g};\nfn x() { crate::h::i(); }\n#[cfg(test)]\nuse crate::z;",
    );
    let found: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(found, ["a", "d_e", "g", "h"]);
}
