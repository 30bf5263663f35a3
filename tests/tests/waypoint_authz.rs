//! L7 authorization end to end: AuthorizationPolicy attached to a service
//! bound to the waypoint (`target_refs`), with curl as the client (`--path-as-is`
//! so the bypass attempts reach the waypoint as written), `weft-tk http-echo`
//! as the servers, and a small real ext_authz server (Python's http.server)
//! for CUSTOM. The last test shows the rule between layers at the agent.
//!
//! | pod   | role |
//! |-------|------|
//! | (0,0) | the client (`front/ui` is not its identity: `default/default`) |
//! | (0,1) | the waypoint (service `wp`) |
//! | (1,0) | http-echo `v1`, service `echo` (bound to the waypoint) and `echo-v1` (not) |
//! | (1,1) | http-echo `v2`, service `echo` |
//! | (1,2) | the ext_authz server, service `ext-authz` port 8000 |

use anyhow::{Context, Result, ensure};
use weft_tests::l7::{self, CurlResult};
use weft_tests::{Cluster, Host as _, Mesh, Proc, require_privileged};

const ECHO: &str = "10.96.0.20";
const ECHO_V1: &str = "10.96.0.21";
const HTTP: u16 = 8080;
const EXT: u16 = 8000;

fn services() -> String {
    format!(
        "services:\n\
         - {{name: echo, addresses: [{ECHO}], selector: {{app: echo}}, waypoint: wp, ports: [{{port: 80, target_port: {HTTP}}}]}}\n\
         - {{name: echo-v1, addresses: [{ECHO_V1}], selector: {{app: echo, version: v1}}, ports: [{{port: 80, target_port: {HTTP}}}]}}\n\
         - {{name: ext-authz, addresses: [10.96.0.30], selector: {{app: ext}}, ports: [{{port: {EXT}}}]}}\n\
         - {{name: wp, addresses: [], ports: [], selector: {{role: waypoint}}}}\n"
    )
}

struct Az<'c> {
    c: &'c Cluster,
    mesh: Mesh<'c>,
    _procs: Vec<Proc>,
    ext: Option<Proc>,
}

impl<'c> Az<'c> {
    fn start(c: &'c Cluster, policies: &str, ext_authz: bool) -> Result<Az<'c>> {
        let wp = c.pod(0, 1);
        let mut mesh = Mesh::new(c, |p| p.name != wp.name)?;
        mesh.set_extra(wp, "  native_tunnel: true\n  labels: {role: waypoint}\n")?;
        mesh.set_extra(c.pod(1, 0), "  labels: {app: echo, version: v1}\n")?;
        mesh.set_extra(c.pod(1, 1), "  labels: {app: echo, version: v2}\n")?;
        mesh.set_extra(c.pod(1, 2), "  labels: {app: ext}\n")?;
        mesh.set_sections(&format!("{}{policies}", services()))?;
        mesh.start_all()?;
        let mut procs = vec![
            l7::http_echo(c.pod(1, 0), HTTP, "v1")?,
            l7::http_echo(c.pod(1, 1), HTTP, "v2")?,
        ];
        let ext = if ext_authz {
            Some(ext_authz_server(c)?)
        } else {
            None
        };
        procs.push(mesh.start_waypoint(wp, &[])?);
        Ok(Az {
            c,
            mesh,
            _procs: procs,
            ext,
        })
    }

    fn get(&self, path: &str, args: &[&str]) -> Result<CurlResult> {
        l7::curl(
            self.c.pod(0, 0),
            &format!("http://{ECHO}{path}"),
            &[&["--path-as-is"], args].concat(),
        )
    }
}

/// An ext_authz HTTP service: 200 when the check carries `x-ext-authz:
/// allow`, else 403 with `x-ext-authz-check-result: denied`; it prints each
/// check's path.
fn ext_authz_server(c: &Cluster) -> Result<Proc> {
    const SERVER: &str = r#"
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def check(self):
        ok = self.headers.get("x-ext-authz") == "allow"
        print(json.dumps({"check": self.path, "method": self.command, "allowed": ok}), flush=True)
        self.send_response(200 if ok else 403)
        if not ok:
            self.send_header("x-ext-authz-check-result", "denied")
        self.send_header("content-length", "0")
        self.end_headers()
    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = check
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H)
print(json.dumps({"listening": sys.argv[1]}), flush=True)
s.serve_forever()
"#;
    let pod = c.pod(1, 2);
    let mut cmd = pod.command(l7::PYTHON);
    cmd.args(["-c", SERVER, &EXT.to_string()]);
    let p = pod.spawn(&mut cmd)?;
    p.wait_for_json(std::time::Duration::from_secs(10), |v| {
        v.get("listening").is_some()
    })?;
    Ok(p)
}

fn privileged(test: impl FnOnce() -> Result<()>) -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    test()
}

#[test]
fn deny_on_admin_holds_against_every_encoding() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("az-admin", 2, 3)?;
        let s = Az::start(
            &c,
            r#"authorization_policies:
- name: no-admin
  action: DENY
  target_refs: [{kind: Service, name: echo}]
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#,
            false,
        )?;
        let r = s.get("/public", &[])?;
        ensure!(r.status == 200, "{r:?}");
        ensure!(r.body["path"] == "/public", "{r:?}");
        for path in [
            "/admin",
            "/admin/",
            "/admin/x",
            "/%61dmin",
            "/%61%64%6d%69%6e",
            "/a/../admin",
            "/./admin",
            "/%2e%2e/admin",
            "/x/%2e%2e/admin",
            "//admin",
            "///admin/x",
            "/%2Fadmin",
            "/x%2F..%2Fadmin",
            "/%5Cadmin",
            "/admin;x",
            "/admin?x=1",
        ] {
            for version in [&[][..], &["--http2-prior-knowledge"][..]] {
                let r = s.get(path, version)?;
                ensure!(r.status == 403, "{path} {version:?}: {r:?}");
                ensure!(
                    r.body == "RBAC: access denied",
                    "{path}: no detail in the body: {r:?}"
                );
            }
        }
        let r = s.get("/admin%00", &[])?;
        ensure!(r.status == 400, "{r:?}");
        // Case is kept (Istio matches case-sensitively): `/ADMIN` is another
        // path, and the application gets it as it is.
        let r = s.get("/ADMIN", &[])?;
        ensure!(r.status == 200 && r.body["path"] == "/ADMIN", "{r:?}");
        // The normalized path is what goes upstream.
        let r = s.get("/x/../public//a", &[])?;
        ensure!(r.status == 200 && r.body["path"] == "/public/a", "{r:?}");
        Ok(())
    })
}

#[test]
fn allow_by_principal_and_method_and_when_on_a_header() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("az-allow", 2, 3)?;
        let s = Az::start(
            &c,
            r#"authorization_policies:
- name: reads
  target_refs: [{kind: Service, name: echo}]
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/*"]}}]
    to: [{operation: {methods: [GET]}}]
  - to: [{operation: {methods: [POST], paths: ["/api/{*}/items"]}}]
    when: [{key: "request.headers[x-team]", values: ["blue*"]}]
"#,
            false,
        )?;
        ensure!(s.get("/x", &[])?.status == 200);
        ensure!(s.get("/x", &["-X", "DELETE"])?.status == 403);
        ensure!(s.get("/api/1/items", &["-X", "POST"])?.status == 403);
        let r = s.get("/api/1/items", &["-X", "POST", "-H", "x-team: blue-2"])?;
        ensure!(r.status == 200, "{r:?}");
        let r = s.get("/api/1/2/items", &["-X", "POST", "-H", "x-team: blue"])?;
        ensure!(r.status == 403, "{r:?}");
        Ok(())
    })
}

#[test]
fn custom_ext_authz_allows_by_header_and_fails_closed() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("az-custom", 2, 3)?;
        let policies = |fail_open: bool| {
            format!(
                r#"extension_providers:
- name: ext
  http: {{service: ext-authz.default, port: {EXT}, timeout: 2s, path_prefix: /check,
         include_request_headers_in_check: [x-ext-authz]}}
  fail_open: {fail_open}
authorization_policies:
- name: ext
  action: CUSTOM
  provider: {{name: ext}}
  target_refs: [{{kind: Service, name: echo}}]
  rules: [{{to: [{{operation: {{paths: ["/api*"]}}}}]}}]
"#
            )
        };
        let mut s = Az::start(&c, &policies(false), true)?;
        ensure!(s.get("/free", &[])?.status == 200, "not matched: no check");
        let r = s.get("/api/x", &["-H", "x-ext-authz: allow"])?;
        ensure!(r.status == 200 && r.body["path"] == "/api/x", "{r:?}");
        let r = s.get("/api/x", &["-H", "x-ext-authz: no"])?;
        ensure!(r.status == 403, "{r:?}");
        ensure!(r.body == "RBAC: access denied", "{r:?}");
        // The server down: fail closed.
        drop(s.ext.take());
        let r = s.get("/api/x", &["-H", "x-ext-authz: allow"])?;
        ensure!(r.status == 403, "fail closed: {r:?}");
        // `fail_open` lets it through.
        s.mesh
            .set_sections(&format!("{}{}", services(), policies(true)))
            .context("fail_open")?;
        let ok = weft_tests::eventually(std::time::Duration::from_secs(10), || {
            s.get("/api/x", &[]).is_ok_and(|r| r.status != 403)
        });
        ensure!(ok, "fail_open did not apply");
        Ok(())
    })
}

/// The same CUSTOM policy with Envoy's gRPC protocol, against a real gRPC
/// ext_authz server (`weft-tk ext-authz-grpc`): the check carries the
/// client's identity and headers; an allow adds the server's header upstream;
/// a denial answers the server's status and header; a gRPC error fails closed.
#[test]
fn custom_ext_authz_over_grpc() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("az-grpc", 2, 3)?;
        let policies = format!(
            r#"extension_providers:
- name: ext
  envoyExtAuthzGrpc: {{service: ext-authz.default, port: {EXT}, timeout: 2s}}
authorization_policies:
- name: ext
  action: CUSTOM
  provider: {{name: ext}}
  target_refs: [{{kind: Service, name: echo}}]
  rules: [{{to: [{{operation: {{paths: ["/api*"]}}}}]}}]
"#
        );
        let s = Az::start(&c, &policies, false)?;
        let pod = c.pod(1, 2);
        let mut cmd = pod.command(weft_tests::bin_path("weft-tk"));
        cmd.args(["ext-authz-grpc", "--port", &EXT.to_string()]);
        let server = pod.spawn(&mut cmd)?;
        server.wait_for_json(std::time::Duration::from_secs(10), |v| {
            v.get("listening").is_some()
        })?;

        ensure!(s.get("/free", &[])?.status == 200, "not matched: no check");
        let r = s.get("/api/x?q=1", &["-H", "x-ext-authz: allow"])?;
        ensure!(r.status == 200 && r.body["path"] == "/api/x", "{r:?}");
        let client = weft_tests::mesh::identity(c.pod(0, 0));
        ensure!(
            r.body["headers"]["x-ext-authz-user"][0] == client.as_str(),
            "the allow's header upstream, naming the client: {r:?}"
        );
        let checks: Vec<_> = server
            .json_lines()
            .into_iter()
            .filter(|v| v.get("check").is_some())
            .collect();
        ensure!(checks.len() == 1, "one check for two requests: {checks:?}");
        ensure!(
            checks[0]["check"] == "/api/x?q=1" && checks[0]["method"] == "GET",
            "{checks:?}"
        );
        ensure!(checks[0]["principal"] == client.as_str(), "{checks:?}");
        ensure!(
            checks[0]["source"] == c.pod(0, 0).ip.to_string(),
            "{checks:?}"
        );

        let r = s.get("/api/x", &["-H", "x-ext-authz: no"])?;
        ensure!(r.status == 403, "{r:?}");
        ensure!(
            r.headers
                .get("x-ext-authz-check-result")
                .is_some_and(|v| v.iter().any(|x| x == "denied")),
            "{r:?}"
        );
        ensure!(
            r.body == "RBAC: access denied",
            "no body of the authorizer's leaks: {r:?}"
        );
        let r = s.get("/api/x", &["-H", "x-ext-authz: error"])?;
        ensure!(r.status == 403, "a gRPC error fails closed: {r:?}");
        drop(server);
        let r = s.get("/api/x", &["-H", "x-ext-authz: allow"])?;
        ensure!(r.status == 403, "the server down fails closed: {r:?}");
        Ok(())
    })
}

#[test]
fn l7_fields_at_the_agent() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("az-layers", 2, 3)?;
        let client = c.pod(0, 0);
        let direct = format!("http://{ECHO_V1}/");
        let reaches =
            || l7::curl(client, &direct, &["--max-time", "5"]).is_ok_and(|r| r.status == 200);
        let mut s = Az::start(&c, "", false)?;
        ensure!(reaches(), "no policy: allowed");
        // An ALLOW rule with L7 fields, on the workloads (no target_refs):
        // the agent never matches it, so nothing gets in (not even a GET).
        s.mesh.set_sections(&format!(
            "{}{}",
            services(),
            r#"authorization_policies:
- name: gets
  selector: {version: v1}
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#
        ))?;
        ensure!(
            weft_tests::eventually(std::time::Duration::from_secs(10), || !reaches()),
            "ALLOW with L7 fields must never match at L4"
        );
        // A DENY rule with L7 fields denies every connection.
        s.mesh.set_sections(&format!(
            "{}{}",
            services(),
            r#"authorization_policies:
- name: no-admin
  action: DENY
  selector: {version: v1}
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
- {name: all, selector: {version: v1}, rules: [{}]}
"#
        ))?;
        std::thread::sleep(std::time::Duration::from_secs(2));
        ensure!(
            !reaches(),
            "DENY with L7 fields must match every connection at L4"
        );
        // Without it, the same ALLOW-all lets the connection in.
        s.mesh.set_sections(&format!(
            "{}{}",
            services(),
            "authorization_policies:\n- {name: all, selector: {version: v1}, rules: [{}]}\n"
        ))?;
        ensure!(
            weft_tests::eventually(std::time::Duration::from_secs(10), reaches),
            "allowed again"
        );
        Ok(())
    })
}
