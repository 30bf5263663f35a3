//! Gateway API conformance, end to end: each test is named after the
//! conformance test it covers (`HTTPRouteQueryParamMatching` →
//! `http_route_query_param_matching`) and runs real clients (curl over
//! HTTP/1.1 and HTTP/2 with prior knowledge, h2load, Python's grpcio and
//! websockets) and real servers (`weft-tk http-echo`, grpcio) through the
//! waypoint: client pod → its agent → HBONE to the waypoint → HBONE with the
//! waypoint's identity → the endpoint's agent → the server pod.
//!
//! Every test builds the same cluster ([`Gw::start`]); only the routes and
//! the assertions differ:
//!
//! | pod   | role |
//! |-------|------|
//! | (0,0) | the client |
//! | (0,1) | the waypoint (service `wp`) |
//! | (1,0) | http-echo `v1` (`app: echo, version: v1`), service `echo-v1` |
//! | (1,1) | http-echo `v2` (`app: echo, version: v2`), service `echo-v2` |
//! | (0,2) | `mirror-a`, service `mirror-a` (started by the tests that use it) |
//! | (1,2) | `mirror-b`, service `mirror-b` |
//!
//! Service `echo` (the routes' parent, bound to the waypoint) selects both
//! versions on port 80 (HTTP, detected), 9090 (gRPC) and 7000 (TCP, detected).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weft_tests::l7::{self, CurlResult};
use weft_tests::{Cluster, Mesh, Pod, Proc, eventually, require_privileged, tk};

const ECHO: &str = "10.96.0.20";
const HTTP: u16 = 8080;
const GRPC: u16 = 9090;
const TCP: u16 = 7000;
/// curl's arguments for each HTTP version the matching tests run over.
const VERSIONS: [&[&str]; 2] = [&[], &["--http2-prior-knowledge"]];

fn services() -> String {
    let svc = |name: &str, vip: &str, selector: &str, extra: &str| {
        format!(
            "- name: {name}\n  addresses: [{vip}]\n  selector: {{{selector}}}\n{extra}  ports:\n  \
             - {{port: 80, target_port: {HTTP}}}\n  \
             - {{port: {GRPC}, target_port: {GRPC}, app_protocol: grpc}}\n  \
             - {{port: {TCP}, target_port: {TCP}}}\n"
        )
    };
    [
        "services:\n".to_owned(),
        svc("echo", ECHO, "app: echo", "  waypoint: wp\n"),
        svc("echo-v1", "10.96.0.21", "app: echo, version: v1", ""),
        svc("echo-v2", "10.96.0.22", "app: echo, version: v2", ""),
        svc("mirror-a", "10.96.0.23", "app: mirror, slot: a", ""),
        svc("mirror-b", "10.96.0.24", "app: mirror, slot: b", ""),
        "- name: wp\n  addresses: []\n  ports: []\n  selector: {role: waypoint}\n".to_owned(),
    ]
    .concat()
}

/// The cluster of the module's table, its mesh, the waypoint and the two
/// versions of the echo server.
struct Gw<'c> {
    c: &'c Cluster,
    mesh: Mesh<'c>,
    waypoint: Proc,
    v1: Proc,
    v2: Proc,
}

impl<'c> Gw<'c> {
    /// The mesh with `routes` (`http_routes:` / `grpc_routes:` YAML) after
    /// the services; `v1_flags` go to v1's http-echo (`--fail-every 2`).
    fn start(c: &'c Cluster, routes: &str, v1_flags: &[&str]) -> Result<Gw<'c>> {
        let wp = c.pod(0, 1);
        let mut mesh = Mesh::new(c, |p| p.name != wp.name)?;
        mesh.set_extra(wp, "  native_tunnel: true\n  labels: {role: waypoint}\n")?;
        mesh.set_extra(c.pod(1, 0), "  labels: {app: echo, version: v1}\n")?;
        mesh.set_extra(c.pod(1, 1), "  labels: {app: echo, version: v2}\n")?;
        mesh.set_extra(c.pod(0, 2), "  labels: {app: mirror, slot: a}\n")?;
        mesh.set_extra(c.pod(1, 2), "  labels: {app: mirror, slot: b}\n")?;
        mesh.set_sections(&format!("{}{routes}", services()))?;
        mesh.start_all()?;
        let v1 = l7::http_echo_with(c.pod(1, 0), HTTP, "v1", v1_flags)?;
        let v2 = l7::http_echo(c.pod(1, 1), HTTP, "v2")?;
        let waypoint = mesh.start_waypoint(wp, &[])?;
        Ok(Gw {
            c,
            mesh,
            waypoint,
            v1,
            v2,
        })
    }

    fn client(&self) -> &'c Pod {
        self.c.pod(0, 0)
    }

    /// `curl http://echo<path>` from the client.
    fn get(&self, path: &str, args: &[&str]) -> Result<CurlResult> {
        l7::curl(self.client(), &format!("http://{ECHO}{path}"), args)
    }

    /// Replaces the routes; the waypoint applies them without a restart.
    fn set_routes(&mut self, routes: &str) -> Result<()> {
        self.mesh.set_sections(&format!("{}{routes}", services()))
    }
}

/// Who answered (`v1`, `v2`), from http-echo's JSON.
fn pod(r: &CurlResult) -> &str {
    r.body["pod"].as_str().unwrap_or("")
}

/// The values of request header `name` as the server received it.
fn received<'a>(r: &'a CurlResult, name: &str) -> Vec<&'a str> {
    r.body["headers"][name]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// Requests a server reported for `path`.
fn served_path(server: &Proc, path: &str) -> usize {
    l7::served_by(server)
        .iter()
        .filter(|v| v["path"] == path)
        .count()
}

/// Requests `(path, curl args)` each expected to reach `pod` (`v1`/`v2`) or,
/// for anything else, to get that status code; over both HTTP versions.
fn expect_each(s: &Gw, cases: &[(&str, &[&str], &str)]) -> Result<()> {
    for version in VERSIONS {
        for (path, args, want) in cases {
            let r = s.get(path, &[*args, version].concat())?;
            let got = match *want {
                "v1" | "v2" => {
                    ensure!(r.status == 200, "{path} {args:?} {version:?}: {r:?}");
                    pod(&r).to_owned()
                }
                _ => r.status.to_string(),
            };
            ensure!(
                got == *want,
                "{path} {args:?} {version:?}: want {want}, got {got}: {r:?}"
            );
        }
    }
    Ok(())
}

/// Runs `test` unless privileged tests cannot run here.
fn privileged(test: impl FnOnce() -> Result<()>) -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    test()
}

// ---------------------------------------------------------------------------
// Mesh basics

#[test]
fn mesh_basic() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-basic", 2, 3)?;
        let s = Gw::start(&c, "", &[])?;
        // No route: the service itself, per request over its endpoints.
        let mut seen = BTreeMap::<String, u32>::new();
        for version in VERSIONS {
            for _ in 0..10 {
                let r = s.get("/anything", version)?;
                assert_eq!(r.status, 200, "{r:?}");
                *seen.entry(pod(&r).to_owned()).or_default() += 1;
            }
        }
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["v1", "v2"], "{seen:?}");
        // HTTP/2 stays HTTP/2 to the endpoint.
        let r = s.get("/", &["--http2-prior-knowledge"])?;
        assert_eq!(
            (r.http_version.as_str(), &r.body["protocol"]),
            ("2", &Value::from("HTTP/2")),
            "{r:?}"
        );
        Ok(())
    })
}

#[test]
fn mesh_routes_without_a_match_answer_404() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-nomatch", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: only-v1
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /v1}}]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
            &[],
        )?;
        expect_each(&s, &[("/v1/x", &[], "v1"), ("/other", &[], "404")])?;
        assert_eq!(
            served_path(&s.v2, "/other") + served_path(&s.v1, "/other"),
            0
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Matching

#[test]
fn http_route_exact_path_matching() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-exact", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: exact-matching
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: Exact, value: /}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: Exact, value: /v2}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
            &[],
        )?;
        expect_each(
            &s,
            &[
                ("/", &[], "v1"),
                ("/v2", &[], "v2"),
                ("/v2/", &[], "404"),
                ("/v2example", &[], "404"),
                ("/foo", &[], "404"),
            ],
        )
    })
}

#[test]
fn http_route_path_match_order() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-order", 2, 3)?;
        // The precedence holds across the rules of two routes, whatever the
        // order they are written in.
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: a-prefixes
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /match/prefix}}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /match/prefix/longer}}]
      backendRefs: [{name: echo-v1, port: 80}]
- name: b-exact-and-headers
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: Exact, value: /match/prefix/exact}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches:
      - path: {type: PathPrefix, value: /match}
        headers: [{name: version, value: two}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches:
      - path: {type: PathPrefix, value: /match/prefix/longer}
        method: POST
      backendRefs: [{name: echo-v2, port: 80}]
"#,
            &[],
        )?;
        expect_each(
            &s,
            &[
                ("/", &[], "v1"),
                ("/match", &[], "v1"),
                ("/match/prefix", &[], "v2"),
                ("/match/prefix/", &[], "v2"),
                // A prefix matches whole path segments only.
                ("/match/prefixes", &[], "v1"),
                ("/match/prefix/longer/x", &[], "v1"),
                // Exact beats every prefix.
                ("/match/prefix/exact", &[], "v1"),
                // The longest prefix wins over a header match.
                ("/match/prefix/x", &["-H", "version: two"], "v2"),
                ("/match/x", &["-H", "version: two"], "v2"),
                // Same prefix: the one with a method wins.
                ("/match/prefix/longer/x", &["-X", "POST"], "v2"),
            ],
        )
    })
}

#[test]
fn http_route_matching_across_routes() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-across", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: matching-part1
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: Exact, value: /}}, {path: {type: PathPrefix, value: /example}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: Exact, value: /same}}]
      backendRefs: [{name: echo-v1, port: 80}]
- name: matching-part2
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: Exact, value: /}, headers: [{name: version, value: two}]}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{path: {type: Exact, value: /same}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
            &[],
        )?;
        expect_each(
            &s,
            &[
                ("/", &[], "v1"),
                ("/example", &[], "v1"),
                ("/example/x", &["-H", "version: two"], "v1"),
                // The other route's match is more specific (a header).
                ("/", &["-H", "version: two"], "v2"),
                ("/v2", &[], "v2"),
                ("/v2/example", &[], "v2"),
                // A tie goes to the route first by namespace/name.
                ("/same", &[], "v1"),
                ("/nowhere", &[], "404"),
            ],
        )
    })
}

#[test]
fn http_route_header_matching() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-headers", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: header-matching
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{headers: [{name: version, value: one}]}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{headers: [{name: version, value: two}]}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{headers: [{name: color, value: blue}]}, {headers: [{name: color, value: green}]}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{headers: [{name: color, value: red}]}, {headers: [{name: color, value: yellow}]}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{headers: [{type: RegularExpression, name: x-build, value: "v[0-9]+\\.[0-9]+"}]}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
            &[],
        )?;
        expect_each(
            &s,
            &[
                ("/", &["-H", "Version: one"], "v1"),
                ("/", &["-H", "version: two"], "v2"),
                ("/", &["-H", "version: two", "-H", "color: orange"], "v1"),
                ("/", &["-H", "color: blue"], "v1"),
                ("/", &["-H", "color: green"], "v1"),
                ("/", &["-H", "color: red"], "v2"),
                ("/", &["-H", "color: yellow"], "v2"),
                // Values match exactly, names case-insensitively.
                ("/", &["-H", "version: One"], "404"),
                ("/", &["-H", "color: purple"], "404"),
                ("/", &["-H", "x-build: v1.12"], "v2"),
                // A regex matches the whole value.
                ("/", &["-H", "x-build: v1.12-rc"], "404"),
                ("/", &[], "404"),
            ],
        )
    })
}

#[test]
fn http_route_query_param_matching() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-query", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: query-param-matching
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{queryParams: [{name: animal, value: whale}]}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{queryParams: [{name: animal, value: dolphin}]}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{queryParams: [{name: ANIMAL, value: Whale}]}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
            &[],
        )?;
        expect_each(
            &s,
            &[
                ("/?animal=whale", &[], "v1"),
                ("/?animal=dolphin", &[], "v2"),
                ("/?animal=dolphin&color=blue", &[], "v1"),
                ("/?color=blue&animal=dolphin", &[], "v1"),
                // Names are case-sensitive.
                ("/?ANIMAL=Whale", &[], "v2"),
                ("/?animal=Whale", &[], "404"),
                ("/?animal=shark", &[], "404"),
                ("/", &[], "404"),
            ],
        )?;
        // The query reaches the server as sent.
        let r = s.get("/path?animal=whale&x=1", &[])?;
        assert_eq!(r.body["query"], "animal=whale&x=1", "{r:?}");
        Ok(())
    })
}

#[test]
fn http_route_method_matching() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-method", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: method-matching
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{method: POST}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{method: GET}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /path1}, method: GET}]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
            &[],
        )?;
        expect_each(
            &s,
            &[
                ("/", &["-X", "POST"], "v1"),
                ("/", &[], "v2"),
                ("/path1", &[], "v1"),
                ("/path1", &["-X", "POST"], "v1"),
                ("/", &["-I"], "404"),
                ("/", &["-X", "PUT"], "404"),
            ],
        )?;
        let r = s.get("/", &["-X", "POST", "-d", "hello"])?;
        assert_eq!(
            (r.body["method"].as_str(), r.body["body_bytes"].as_u64()),
            (Some("POST"), Some(5))
        );
        Ok(())
    })
}

#[test]
fn http_route_regex_path_matching() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-regex", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: regex-path
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: RegularExpression, value: "/v1/[0-9]+"}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: RegularExpression, value: "/v2/[a-z]+(/.*)?"}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
            &[],
        )?;
        expect_each(
            &s,
            &[
                ("/v1/123", &[], "v1"),
                ("/v1/12a", &[], "404"),
                ("/v1/123/more", &[], "404"),
                ("/v2/abc", &[], "v2"),
                ("/v2/abc/more/4", &[], "v2"),
                ("/v2/", &[], "404"),
            ],
        )
    })
}

// ---------------------------------------------------------------------------
// Header filters

#[test]
fn http_route_request_header_modifier() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-reqhdr", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: request-header-modifier
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - filters:
      - type: RequestHeaderModifier
        requestHeaderModifier:
          set: [{name: X-Header-Set, value: set-overwrites-values}]
          add: [{name: X-Header-Add, value: add-appends-values}]
          remove: [X-Header-Remove]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
            &[],
        )?;
        for version in VERSIONS {
            let sent = [
                "-H",
                "X-Header-Set: some-other-value",
                "-H",
                "X-Header-Add: add-to",
                "-H",
                "X-Header-Remove: gone",
                "-H",
                "X-Untouched: here",
            ];
            let r = s.get("/", &[&sent[..], version].concat())?;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(
                received(&r, "x-header-set"),
                ["set-overwrites-values"],
                "{r:?}"
            );
            assert_eq!(
                received(&r, "x-header-add"),
                ["add-to,add-appends-values"],
                "{r:?}"
            );
            assert!(received(&r, "x-header-remove").is_empty(), "{r:?}");
            assert_eq!(received(&r, "x-untouched"), ["here"], "{r:?}");
            // Without the headers: set and add create them.
            let r = s.get("/", version)?;
            assert_eq!(
                received(&r, "x-header-set"),
                ["set-overwrites-values"],
                "{r:?}"
            );
            assert_eq!(
                received(&r, "x-header-add"),
                ["add-appends-values"],
                "{r:?}"
            );
        }
        Ok(())
    })
}

#[test]
fn http_route_response_header_modifier() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-resphdr", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: response-header-modifier
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier:
          set: [{name: X-Header-Set, value: set-overwrites-values}]
          add: [{name: X-Header-Add, value: add-appends-values}]
          remove: [X-Header-Remove]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
            &[],
        )?;
        for version in VERSIONS {
            // http-echo answers with `x-echo-set-<name>` as `<name>`.
            let asked = [
                "-H",
                "x-echo-set-x-header-set: some-other-value",
                "-H",
                "x-echo-set-x-header-add: add-to",
                "-H",
                "x-echo-set-x-header-remove: gone",
                "-H",
                "x-echo-set-x-untouched: here",
            ];
            let r = s.get("/", &[&asked[..], version].concat())?;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(
                r.headers["x-header-set"],
                ["set-overwrites-values"],
                "{r:?}"
            );
            assert_eq!(
                r.headers["x-header-add"],
                ["add-to,add-appends-values"],
                "{r:?}"
            );
            assert!(!r.headers.contains_key("x-header-remove"), "{r:?}");
            assert_eq!(r.header("x-untouched"), Some("here"), "{r:?}");
        }
        Ok(())
    })
}

#[test]
fn http_route_backend_request_header_modification() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-behdr", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: backend-request-header-modification
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - filters:
      - type: RequestHeaderModifier
        requestHeaderModifier:
          set: [{name: x-rule, value: both}]
      backendRefs:
      - name: echo-v1
        port: 80
        filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-backend, value: to-v1}]
            remove: [x-drop-for-v1]
      - name: echo-v2
        port: 80
        filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            add: [{name: x-backend, value: to-v2}]
"#,
            &[],
        )?;
        let mut seen = BTreeMap::<String, u32>::new();
        for i in 0..30 {
            let version = VERSIONS[i % 2];
            let r = s.get("/", &[&["-H", "x-drop-for-v1: x"][..], version].concat())?;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(received(&r, "x-rule"), ["both"], "{r:?}");
            match pod(&r) {
                "v1" => {
                    assert_eq!(received(&r, "x-backend"), ["to-v1"], "{r:?}");
                    assert!(received(&r, "x-drop-for-v1").is_empty(), "{r:?}");
                }
                "v2" => {
                    assert_eq!(received(&r, "x-backend"), ["to-v2"], "{r:?}");
                    assert_eq!(received(&r, "x-drop-for-v1"), ["x"], "{r:?}");
                }
                other => panic!("answered by {other:?}: {r:?}"),
            }
            *seen.entry(pod(&r).to_owned()).or_default() += 1;
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Redirects and rewrites

const REDIRECTS: &str = r#"http_routes:
- name: redirects
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /scheme}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
    - matches: [{path: {type: PathPrefix, value: /scheme-and-port}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, port: 8443}}]
    - matches: [{path: {type: PathPrefix, value: /hostname}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
    - matches: [{path: {type: PathPrefix, value: /host-and-status}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 301}}]
    - matches: [{path: {type: PathPrefix, value: /status-308}}]
      filters: [{type: RequestRedirect, requestRedirect: {statusCode: 308}}]
    - matches: [{path: {type: PathPrefix, value: /port}}]
      filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
    - matches: [{path: {type: PathPrefix, value: /full}}]
      filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full-replacement}}}]
    - matches: [{path: {type: PathPrefix, value: /original-prefix}}]
      filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
    - backendRefs: [{name: echo-v1, port: 80}]
"#;

/// The routes of [`REDIRECTS`]: each case's path gets `status` and
/// `location`, over both HTTP versions; the waypoint answers them itself.
fn expect_redirects(name: &str, cases: &[(&str, u16, &str)]) -> Result<()> {
    let c = Cluster::new(name, 2, 3)?;
    let s = Gw::start(&c, REDIRECTS, &[])?;
    for version in VERSIONS {
        for (path, status, location) in cases {
            let r = s.get(path, version)?;
            ensure!(
                (r.status, r.header("location")) == (*status, Some(*location)),
                "{path} {version:?}: want {status} to {location}, got {r:?}"
            );
        }
        ensure!(pod(&s.get("/other", version)?) == "v1");
    }
    let served = l7::served_by(&s.v1);
    ensure!(
        served.len() == 2,
        "a redirect reached the backend: {served:?}"
    );
    Ok(())
}

#[test]
fn http_route_redirect_scheme() -> Result<()> {
    privileged(|| {
        expect_redirects(
            "gw-rscheme",
            &[("/scheme", 302, "https://10.96.0.20/scheme")],
        )
    })
}

#[test]
fn http_route_redirect_host_and_status() -> Result<()> {
    privileged(|| {
        expect_redirects(
            "gw-rhost",
            &[
                ("/hostname", 302, "http://example.org/hostname"),
                (
                    "/host-and-status",
                    301,
                    "http://example.org/host-and-status",
                ),
                ("/status-308", 308, "http://10.96.0.20/status-308"),
            ],
        )
    })
}

#[test]
fn http_route_redirect_port() -> Result<()> {
    privileged(|| {
        expect_redirects(
            "gw-rport",
            &[
                ("/port", 302, "http://10.96.0.20:8083/port"),
                (
                    "/scheme-and-port",
                    302,
                    "https://10.96.0.20:8443/scheme-and-port",
                ),
            ],
        )
    })
}

#[test]
fn http_route_redirect_path() -> Result<()> {
    privileged(|| {
        expect_redirects(
            "gw-rpath",
            &[
                ("/full/x", 302, "http://10.96.0.20/full-replacement"),
                (
                    "/original-prefix/lemon",
                    302,
                    "http://10.96.0.20/replacement-prefix/lemon",
                ),
                (
                    "/original-prefix",
                    302,
                    "http://10.96.0.20/replacement-prefix",
                ),
                // The query is kept.
                (
                    "/original-prefix/lemon?x=1&y",
                    302,
                    "http://10.96.0.20/replacement-prefix/lemon?x=1&y",
                ),
            ],
        )
    })
}

#[test]
fn http_route_rewrite_path() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-rwpath", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: rewrite-path
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /full/one}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
            &[],
        )?;
        let cases = [
            ("/prefix/one/two", "/one/two", ""),
            ("/prefix/one", "/one", ""),
            ("/strip-prefix/three", "/three", ""),
            ("/strip-prefix", "/", ""),
            ("/full/one/two", "/one", ""),
            ("/prefix/one/two?q=1&r=2", "/one/two", "q=1&r=2"),
            ("/full/one/two?q=1", "/one", "q=1"),
        ];
        for version in VERSIONS {
            for (sent, path, query) in cases {
                let r = s.get(sent, version)?;
                assert_eq!(
                    (r.status, r.body["path"].as_str(), r.body["query"].as_str()),
                    (200, Some(path), Some(query)),
                    "{sent} {version:?}: {r:?}"
                );
            }
        }
        Ok(())
    })
}

#[test]
fn http_route_rewrite_host() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-rwhost", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: rewrite-host
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /one}}]
      filters: [{type: URLRewrite, urlRewrite: {hostname: one.example.org}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /}}]
      filters: [{type: URLRewrite, urlRewrite: {hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /rewritten}}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
            &[],
        )?;
        for version in VERSIONS {
            let r = s.get("/one", version)?;
            assert_eq!(
                (pod(&r), r.body["host"].as_str()),
                ("v1", Some("one.example.org")),
                "{r:?}"
            );
            let r = s.get(
                "/x",
                &[&["-H", "host: sent.example.com"][..], version].concat(),
            )?;
            assert_eq!(
                (pod(&r), r.body["host"].as_str(), r.body["path"].as_str()),
                ("v2", Some("example.org"), Some("/rewritten/x")),
                "{r:?}"
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Backends

#[test]
fn http_route_weight() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-weight", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: weighted
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - backendRefs:
      - {name: echo-v1, port: 80, weight: 90}
      - {name: echo-v2, port: 80, weight: 10}
"#,
            &[],
        )?;
        const N: usize = 500;
        let load = l7::h2load(
            s.client(),
            &format!("http://{ECHO}/weight"),
            N as u64,
            4,
            false,
        )?;
        assert_eq!(
            (load.done, load.status[0]),
            (N as u64, N as u64),
            "{load:?}"
        );
        let (v1, v2) = (served_path(&s.v1, "/weight"), served_path(&s.v2, "/weight"));
        assert_eq!(v1 + v2, N, "v1 {v1}, v2 {v2}");
        // 10% of 500 is 50 (σ ≈ 6.7): 10% ± 5 points is more than 3.7 σ.
        assert!(
            (25..=75).contains(&v2),
            "v2 served {v2} of {N} (want 10% ± 5 points)"
        );
        Ok(())
    })
}

const INVALID_BACKENDS: &str = r#"http_routes:
- name: invalid-backends
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /unknown-kind}}]
      backendRefs: [{group: example.org, kind: NotAService, name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /nonexistent}}]
      backendRefs: [{name: does-not-exist, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /bad-port}}]
      backendRefs: [{name: echo-v1, port: 81}]
    - matches: [{path: {type: PathPrefix, value: /partial}}]
      backendRefs:
      - {name: echo-v1, port: 80, weight: 1}
      - {name: does-not-exist, port: 80, weight: 1}
    - matches: [{path: {type: PathPrefix, value: /valid}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#;

#[test]
fn http_route_invalid_backend_ref_unknown_kind() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-kind", 2, 3)?;
        let s = Gw::start(&c, INVALID_BACKENDS, &[])?;
        expect_each(&s, &[("/unknown-kind", &[], "500"), ("/valid", &[], "v2")])?;
        assert_eq!(served_path(&s.v1, "/unknown-kind"), 0);
        Ok(())
    })
}

#[test]
fn http_route_invalid_non_existent_backend_ref() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-nobackend", 2, 3)?;
        let s = Gw::start(&c, INVALID_BACKENDS, &[])?;
        // A service that does not exist, or a port the service does not have.
        expect_each(
            &s,
            &[
                ("/nonexistent", &[], "500"),
                ("/bad-port", &[], "500"),
                ("/valid", &[], "v2"),
            ],
        )?;
        assert_eq!(served_path(&s.v1, "/bad-port"), 0);
        Ok(())
    })
}

#[test]
fn http_route_partially_invalid_backend_split() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-partial", 2, 3)?;
        let s = Gw::start(&c, INVALID_BACKENDS, &[])?;
        // Half the weight on a backend that does not exist: that share gets
        // 500, the valid share still flows.
        let mut codes = BTreeMap::<u16, usize>::new();
        for i in 0..60 {
            *codes
                .entry(s.get("/partial", VERSIONS[i % 2])?.status)
                .or_default() += 1;
        }
        let ok = codes.get(&200).copied().unwrap_or(0);
        let failed = codes.get(&500).copied().unwrap_or(0);
        assert_eq!(ok + failed, 60, "{codes:?}");
        // Binomial(60, 1/2): σ ≈ 3.9, so 12 is 4.6 σ below the mean.
        assert!(ok >= 12 && failed >= 12, "{codes:?}");
        assert_eq!(served_path(&s.v1, "/partial"), ok);
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Mirrors

/// One rule to v1 with the mirror `filters`; it sets `x-rule: all` for every
/// request and `x-backend: to-v1` for the ones to its backend, v1: a mirror
/// gets the first, not the second.
fn mirror_routes(filters: &str) -> String {
    format!(
        r#"http_routes:
- name: mirror
  spec:
    parentRefs: [{{group: "", kind: Service, name: echo, port: 80}}]
    rules:
    - filters:
      - {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-rule, value: all}}]}}}}
{filters}      backendRefs:
      - name: echo-v1
        port: 80
        filters:
        - {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-backend, value: to-v1}}]}}}}
"#
    )
}

/// Waits until `server` has reported `n` requests for `path`, then a little
/// longer, and returns how many it reported: a mirror is sent after the
/// answer, so some may still be on their way.
fn settled_count(server: &Proc, path: &str, n: usize) -> usize {
    eventually(Duration::from_secs(10), || served_path(server, path) >= n);
    let mut last = served_path(server, path);
    while eventually(Duration::from_millis(500), || {
        served_path(server, path) != last
    }) {
        last = served_path(server, path);
    }
    last
}

#[test]
fn http_route_request_mirror() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-mirror", 2, 3)?;
        let s = Gw::start(
            &c,
            &mirror_routes(
                "      - {type: RequestMirror, requestMirror: {backendRef: {name: mirror-a, port: 80}}}\n",
            ),
            &[],
        )?;
        let mirror = l7::http_echo(c.pod(0, 2), HTTP, "mirror-a")?;
        for i in 0..10 {
            let r = s.get(
                "/mirror?n=1",
                &[&["-H", "x-sent: yes"][..], VERSIONS[i % 2]].concat(),
            )?;
            assert_eq!((r.status, pod(&r)), (200, "v1"), "{r:?}");
        }
        assert_eq!(settled_count(&mirror, "/mirror", 10), 10);
        assert_eq!(served_path(&s.v1, "/mirror"), 10);
        let copy = &l7::served_by(&mirror)[0];
        let header = |v: &Value, name: &str| v["headers"][name][0].as_str().map(str::to_owned);
        assert_eq!(
            (
                copy["query"].as_str(),
                header(copy, "x-sent"),
                header(copy, "x-rule")
            ),
            (Some("n=1"), Some("yes".into()), Some("all".into())),
            "{copy}"
        );
        // The backend's own filters are for requests to that backend only.
        assert_eq!(header(copy, "x-backend"), None, "{copy}");
        let original = &l7::served_by(&s.v1)[0];
        assert_eq!(
            header(original, "x-backend").as_deref(),
            Some("to-v1"),
            "{original}"
        );
        Ok(())
    })
}

#[test]
fn http_route_request_multiple_mirrors() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-mirrors", 2, 3)?;
        let s = Gw::start(
            &c,
            &mirror_routes(
                "      - {type: RequestMirror, requestMirror: {backendRef: {name: mirror-a, port: 80}}}\n      \
                 - {type: RequestMirror, requestMirror: {backendRef: {name: mirror-b, port: 80}}}\n",
            ),
            &[],
        )?;
        let a = l7::http_echo(c.pod(0, 2), HTTP, "mirror-a")?;
        let b = l7::http_echo(c.pod(1, 2), HTTP, "mirror-b")?;
        for i in 0..10 {
            let r = s.get(
                "/multi",
                &[&["-X", "PUT", "-d", "body"][..], VERSIONS[i % 2]].concat(),
            )?;
            assert_eq!((r.status, pod(&r)), (200, "v1"), "{r:?}");
        }
        assert_eq!(settled_count(&a, "/multi", 10), 10);
        assert_eq!(settled_count(&b, "/multi", 10), 10);
        // The mirrors get the method and the body too.
        for copy in l7::served_by(&a).iter().chain(&l7::served_by(&b)) {
            assert_eq!(
                (copy["method"].as_str(), copy["body_bytes"].as_u64()),
                (Some("PUT"), Some(4)),
                "{copy}"
            );
        }
        Ok(())
    })
}

#[test]
fn http_route_request_percentage_mirror() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-pmirror", 2, 3)?;
        let s = Gw::start(
            &c,
            &mirror_routes(
                "      - {type: RequestMirror, requestMirror: {backendRef: {name: mirror-a, port: 80}, percent: 20}}\n      \
                 - {type: RequestMirror, requestMirror: {backendRef: {name: mirror-b, port: 80}, fraction: {numerator: 1, denominator: 2}}}\n",
            ),
            &[],
        )?;
        let a = l7::http_echo(c.pod(0, 2), HTTP, "mirror-a")?;
        let b = l7::http_echo(c.pod(1, 2), HTTP, "mirror-b")?;
        const N: u64 = 300;
        let load = l7::h2load(s.client(), &format!("http://{ECHO}/pct"), N, 4, false)?;
        assert_eq!(load.status[0], N, "{load:?}");
        // 20% of 300 is 60 (σ ≈ 6.9), 50% is 150 (σ ≈ 8.7): ± 4.5 σ.
        let (to_a, to_b) = (
            settled_count(&a, "/pct", 30),
            settled_count(&b, "/pct", 110),
        );
        assert!(
            (30..=90).contains(&to_a),
            "mirror-a (20%) got {to_a} of {N}"
        );
        assert!(
            (110..=190).contains(&to_b),
            "mirror-b (1/2) got {to_b} of {N}"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Timeouts and retries

const TIMEOUTS: &str = r#"http_routes:
- name: timeouts
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /request-timeout}}]
      timeouts: {request: 500ms}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /backend-timeout}}]
      timeouts: {request: 5s, backendRequest: 500ms}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /disabled}}]
      timeouts: {request: 0s}
      backendRefs: [{name: echo-v1, port: 80}]
"#;

/// `path` (a rule of [`TIMEOUTS`] with a 500 ms timeout) gets 504 soon after
/// the timeout when the server takes 2 s, and 200 when it is quick.
fn expect_timeout(s: &Gw, path: &str) -> Result<()> {
    for version in VERSIONS {
        let started = std::time::Instant::now();
        let r = s.get(&format!("{path}?delay_ms=2000"), version)?;
        let took = started.elapsed();
        ensure!(r.status == 504, "{path} {version:?}: {r:?}");
        ensure!(
            took < Duration::from_millis(1800),
            "{path}: answered after {took:?}"
        );
        let r = s.get(&format!("{path}?delay_ms=10"), version)?;
        ensure!(r.status == 200, "{path} {version:?}: {r:?}");
    }
    Ok(())
}

#[test]
fn http_route_timeout_request() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-timeout", 2, 3)?;
        let s = Gw::start(&c, TIMEOUTS, &[])?;
        expect_timeout(&s, "/request-timeout")?;
        // `0s` turns the timeout off.
        for version in VERSIONS {
            let r = s.get("/disabled?delay_ms=1000", version)?;
            assert_eq!(r.status, 200, "{r:?}");
        }
        Ok(())
    })
}

#[test]
fn http_route_timeout_backend_request() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-betimeout", 2, 3)?;
        let s = Gw::start(&c, TIMEOUTS, &[])?;
        expect_timeout(&s, "/backend-timeout")
    })
}

#[test]
fn http_route_retry() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-retry", 2, 3)?;
        // v1 answers every second request 503: a flaky replica.
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: retry
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /retried}}]
      retry: {codes: [503], attempts: 2, backoff: 10ms}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /not-retried}}]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
            &["--fail-every", "2"],
        )?;
        for i in 0..20 {
            let r = s.get("/retried", VERSIONS[i % 2])?;
            assert_eq!((r.status, pod(&r)), (200, "v1"), "request {i}: {r:?}");
        }
        // The retries were real: v1 answered 503 about as often as 200.
        let lines = l7::served_by(&s.v1);
        let failed = lines.iter().filter(|v| v["status"] == 503).count();
        assert!(
            failed >= 10,
            "v1 failed {failed} of {} attempts",
            lines.len()
        );
        // Without a retry policy the flaky replica shows.
        let codes: Vec<u16> = (0..10)
            .map(|_| s.get("/not-retried", &[]).map(|r| r.status))
            .collect::<Result<_>>()?;
        assert_eq!(codes.iter().filter(|&&c| c == 503).count(), 5, "{codes:?}");
        Ok(())
    })
}

#[test]
fn http_route_retry_budget_stops_retries_multiplying() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-budget", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: retry-everything
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - retry: {codes: [503], attempts: 3, backoff: 20ms}
      backendRefs: [{name: echo, port: 80}]
"#,
            &[],
        )?;
        // Every replica fails: without a budget, 4 attempts per request.
        const N: u64 = 300;
        let load = l7::h2load(
            s.client(),
            &format!("http://{ECHO}/status/503"),
            N,
            30,
            false,
        )?;
        assert_eq!(load.status[3], N, "{load:?}");
        let attempts =
            settled_count(&s.v1, "/status/503", 0) + settled_count(&s.v2, "/status/503", 0);
        eprintln!("{N} requests, {attempts} attempts on the servers");
        assert!(
            attempts > N as usize,
            "{attempts} attempts for {N} requests: no retry at all"
        );
        assert!(
            attempts < 2 * N as usize,
            "{attempts} attempts for {N} requests: retries multiplied the outage"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// CORS

#[test]
fn http_route_cors() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-cors", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: cors
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - filters:
      - type: CORS
        cors:
          allowOrigins: ["https://www.foo.com", "https://*.bar.com"]
          allowMethods: [GET, PUT]
          allowHeaders: [x-header-1, x-header-2]
          exposeHeaders: [x-header-3]
          allowCredentials: true
          maxAge: 3600
      backendRefs: [{name: echo-v1, port: 80}]
"#,
            &[],
        )?;
        for version in VERSIONS {
            let preflight = |origin: &str| {
                let origin = format!("origin: {origin}");
                let args = [
                    &["-X", "OPTIONS", "-H", &origin][..],
                    &["-H", "access-control-request-method: PUT"],
                    &["-H", "access-control-request-headers: x-header-1"],
                    version,
                ]
                .concat();
                s.get("/cors", &args)
            };
            let r = preflight("https://www.foo.com")?;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(
                r.header("access-control-allow-origin"),
                Some("https://www.foo.com"),
                "{r:?}"
            );
            assert_eq!(
                r.header("access-control-allow-credentials"),
                Some("true"),
                "{r:?}"
            );
            assert_eq!(
                r.header("access-control-allow-methods"),
                Some("GET, PUT"),
                "{r:?}"
            );
            assert_eq!(
                r.header("access-control-allow-headers"),
                Some("x-header-1, x-header-2"),
                "{r:?}"
            );
            assert_eq!(r.header("access-control-max-age"), Some("3600"), "{r:?}");
            let r = preflight("https://api.bar.com")?;
            assert_eq!(
                r.header("access-control-allow-origin"),
                Some("https://api.bar.com"),
                "{r:?}"
            );
            // A disallowed origin gets no CORS headers.
            let r = preflight("https://evil.example")?;
            assert_eq!(r.status, 200, "{r:?}");
            assert!(
                !r.headers.keys().any(|k| k.starts_with("access-control-")),
                "{r:?}"
            );

            // The actual request reaches the backend and gets the headers.
            let args = [&["-H", "origin: https://www.foo.com"][..], version].concat();
            let r = s.get("/cors", &args)?;
            assert_eq!((r.status, pod(&r)), (200, "v1"), "{r:?}");
            assert_eq!(
                r.header("access-control-allow-origin"),
                Some("https://www.foo.com"),
                "{r:?}"
            );
            assert_eq!(
                r.header("access-control-expose-headers"),
                Some("x-header-3"),
                "{r:?}"
            );
            let args = [&["-H", "origin: https://evil.example"][..], version].concat();
            let r = s.get("/cors", &args)?;
            assert_eq!(
                (r.status, r.header("access-control-allow-origin")),
                (200, None),
                "{r:?}"
            );
        }
        // Preflights are answered by the waypoint.
        assert!(
            l7::served_by(&s.v1)
                .iter()
                .all(|v| v["method"] != "OPTIONS"),
            "{:?}",
            l7::served_by(&s.v1)
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// gRPC

/// The GRPCRoute of the gRPC port, and an HTTPRoute on that port that would
/// send everything to v2: GEP-1294 applies the GRPCRoute only.
const GRPC_ROUTES: &str = r#"http_routes:
- name: shadowed-by-grpc
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 9090}]
    rules:
    - backendRefs: [{name: echo-v2, port: 9090}]
grpc_routes:
- name: grpc-matching
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 9090}]
    rules:
    - matches: [{method: {service: weft.test.Echo, method: Say}}]
      backendRefs: [{name: echo-v1, port: 9090}]
    - matches: [{method: {service: weft.test.Echo, method: Stream}}]
      backendRefs: [{name: echo-v2, port: 9090}]
    - matches:
      - method: {service: weft.test.Echo, method: Say}
        headers: [{name: version, value: two}]
      backendRefs: [{name: echo-v2, port: 9090}]
    - matches:
      - method: {service: weft.test.Echo, method: Say}
        headers: [{name: version, value: two}, {name: color, value: blue}]
      backendRefs: [{name: echo-v1, port: 9090}]
    - matches:
      - method: {service: weft.test.Echo, method: Stream}
        headers: [{type: RegularExpression, name: x-build, value: "v[0-9]+"}]
      backendRefs: [{name: echo-v1, port: 9090}]
"#;

/// The two gRPC servers, on v1's and v2's pods.
fn grpc_servers(c: &Cluster) -> Result<(Proc, Proc)> {
    Ok((
        l7::grpc_server(c.pod(1, 0), GRPC, "v1")?,
        l7::grpc_server(c.pod(1, 1), GRPC, "v2")?,
    ))
}

/// Who served a call, from the trailer every call of the echo server ends with.
fn grpc_pod(r: &l7::GrpcResult) -> &str {
    r.trailers
        .get("x-echo-pod")
        .and_then(|v| v.first())
        .map_or("", String::as_str)
}

/// A gRPC call of `weft.test.Echo`: the method, its metadata, and who
/// should answer it.
struct GrpcCase<'a> {
    method: &'a str,
    metadata: &'a [(&'a str, &'a str)],
    want: &'a str,
}

fn expect_grpc(name: &str, cases: &[GrpcCase]) -> Result<()> {
    let c = Cluster::new(name, 2, 3)?;
    let s = Gw::start(&c, GRPC_ROUTES, &[])?;
    let _servers = grpc_servers(&c)?;
    let target = format!("{ECHO}:{GRPC}");
    for GrpcCase {
        method,
        metadata,
        want,
    } in cases
    {
        let r = l7::grpc_call(s.client(), &target, method, "hello", metadata)?;
        ensure!(
            (r.code, grpc_pod(&r)) == (0, *want),
            "{method} {metadata:?}: want {want}, got {r:?}"
        );
        ensure!(
            !r.messages.is_empty() && r.messages.iter().all(|m| m == "hello"),
            "{r:?}"
        );
    }
    Ok(())
}

#[test]
fn grpc_route_exact_method_matching() -> Result<()> {
    privileged(|| {
        let case = |method, want| GrpcCase {
            method,
            metadata: &[],
            want,
        };
        expect_grpc("gw-grpcm", &[case("Say", "v1"), case("Stream", "v2")])
    })
}

#[test]
fn grpc_route_header_matching() -> Result<()> {
    privileged(|| {
        let case = |method, metadata, want| GrpcCase {
            method,
            metadata,
            want,
        };
        expect_grpc(
            "gw-grpch",
            &[
                case("Say", &[("version", "one")], "v1"),
                case("Say", &[("version", "two")], "v2"),
                case("Say", &[("version", "two"), ("color", "blue")], "v1"),
                case("Say", &[("version", "two"), ("color", "red")], "v2"),
                case("Stream", &[("x-build", "v12")], "v1"),
                case("Stream", &[("x-build", "v12-rc")], "v2"),
            ],
        )
    })
}

#[test]
fn grpc_status_codes_and_trailers_are_preserved() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-grpcst", 2, 3)?;
        let s = Gw::start(&c, GRPC_ROUTES, &[])?;
        let _servers = grpc_servers(&c)?;
        let target = format!("{ECHO}:{GRPC}");
        for method in ["Say", "Stream"] {
            let r = l7::grpc_call(
                s.client(),
                &target,
                method,
                "x",
                &[
                    ("x-echo-grpc-status", "9"),
                    ("x-echo-grpc-message", "not today"),
                    ("x-echo-trailer-x-weft-trailer", "kept"),
                ],
            )?;
            assert_eq!(
                (r.code, r.code_name.as_str(), r.details.as_str()),
                (9, "FAILED_PRECONDITION", "not today"),
                "{method}: {r:?}"
            );
            assert_eq!(
                r.trailers.get("x-weft-trailer").map(Vec::as_slice),
                Some(&["kept".to_owned()][..]),
                "{r:?}"
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Other protocols through the waypoint

#[test]
fn websocket_upgrade_through_the_waypoint() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-ws", 2, 3)?;
        let s = Gw::start(
            &c,
            r#"http_routes:
- name: websocket
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /ws}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
            &[],
        )?;
        let sent = ["hello", "through", "the waypoint"];
        let echoes = l7::ws_echo_roundtrip(s.client(), &format!("ws://{ECHO}/ws"), &sent)?;
        assert_eq!(echoes, sent);
        assert_eq!(served_path(&s.v2, "/ws"), 1);
        Ok(())
    })
}

#[test]
fn tcp_passthrough_of_a_bound_service() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-tcp", 2, 3)?;
        // Routes on the HTTP port do not touch the TCP port.
        let s = Gw::start(&c, GRPC_ROUTES, &[])?;
        let _echoes = (tk::echo(c.pod(1, 0), TCP)?, tk::echo(c.pod(1, 1), TCP)?);
        for message in ["*1\r\n$4\r\nPING\r\n", "not http at all"] {
            let report = tk::say(s.client(), &format!("{ECHO}:{TCP}"), message, &[])?;
            assert_eq!(report["ok"], true, "{report}");
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Bodies and config

/// A memory figure of `/proc/<pid>/status` (`VmRSS`, `VmHWM`: the peak), in KiB.
fn memory_kib(p: &Proc, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid()))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in the waypoint's status"))
}

#[test]
fn request_and_response_bodies_stream_through_the_waypoint() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-bodies", 2, 3)?;
        let s = Gw::start(&c, "", &[])?;
        const SIZE: u64 = 20 << 20;
        let file = std::env::temp_dir().join(format!("{}-upload", c.id()));
        std::fs::write(&file, vec![b'w'; SIZE as usize])?;
        let upload = format!("@{}", file.display());
        s.get("/warm-up", &[])?;
        let before = memory_kib(&s.waypoint, "VmRSS")?;
        let moved = (|| -> Result<()> {
            for version in VERSIONS {
                let r = s.get(
                    "/upload",
                    &[&["--data-binary", &upload][..], version].concat(),
                )?;
                let got = (r.status, r.body["body_bytes"].as_u64());
                ensure!(got == (200, Some(SIZE)), "upload {version:?}: {r:?}");
                let r = s.get(&format!("/download?body_bytes={SIZE}"), version)?;
                ensure!(
                    (r.status, r.size) == (200, SIZE),
                    "download {version:?}: {r:?}"
                );
            }
            Ok(())
        })();
        let _ = std::fs::remove_file(&file);
        moved?;
        let (after, peak) = (
            memory_kib(&s.waypoint, "VmRSS")?,
            memory_kib(&s.waypoint, "VmHWM")?,
        );
        eprintln!("waypoint RSS: {before} KiB before, {after} KiB after, {peak} KiB at its peak");
        // 80 MiB went through it: it may hold flow-control windows (1 MiB a
        // stream), never a whole body.
        assert!(
            peak < before + 8 * 1024,
            "waypoint RSS went from {before} KiB to {peak} KiB at its peak ({after} KiB after)"
        );
        Ok(())
    })
}

#[test]
fn an_invalid_route_change_keeps_the_last_good_routes() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("gw-reload", 2, 3)?;
        let routes = |backend: &str, path: &str| {
            format!(
                r#"http_routes:
- name: reloaded
  spec:
    parentRefs: [{{group: "", kind: Service, name: echo, port: 80}}]
    rules:
    - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]
      backendRefs: [{{name: {backend}, port: 80}}]
"#
            )
        };
        let mut s = Gw::start(&c, &routes("echo-v1", "/"), &[])?;
        assert_eq!(pod(&s.get("/", &[])?), "v1");

        let rejected = |s: &Gw| {
            s.waypoint
                .json_lines()
                .into_iter()
                .filter(|v| v["message"] == "config rejected; the last good config keeps serving")
                .collect::<Vec<_>>()
        };
        s.set_routes(&routes("echo-v2", "no-slash"))?;
        let mut why = Vec::new();
        assert!(
            eventually(Duration::from_secs(10), || {
                why = rejected(&s);
                !why.is_empty()
            }),
            "the waypoint did not reject the route: {:?}",
            s.waypoint.stdout_lines()
        );
        let error = why[0]["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.contains("http_routes[0] (default/reloaded)")
                && error.contains("rules[0].matches[0].path"),
            "the reason names where: {error}"
        );
        for version in VERSIONS {
            assert_eq!(pod(&s.get("/", version)?), "v1");
        }

        s.set_routes(&routes("echo-v2", "/"))?;
        assert!(
            eventually(Duration::from_secs(10), || {
                s.get("/", &[]).is_ok_and(|r| pod(&r) == "v2")
            }),
            "the good change did not apply: {:?}",
            s.waypoint.stdout_lines()
        );
        Ok(())
    })
}
