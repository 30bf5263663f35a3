//! Request authentication at the waypoint, end to end: a JWKS server over
//! HTTPS in a pod (Python's `http.server` with `ssl`, its certificate signed
//! by a test CA the waypoint trusts through `--jwks-ca-file`), tokens minted
//! here with real keys, curl as the client, `weft-tk http-echo` as the server.
//!
//! | pod   | role |
//! |-------|------|
//! | (0,0) | the client |
//! | (0,1) | the waypoint (service `wp`) |
//! | (0,2) | the JWKS server (not enrolled) |
//! | (1,0) | http-echo, service `echo` (bound to the waypoint) |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::json;
use weft_tests::{Cluster, Host as _, Mesh, Pod, Proc, eventually, l7, require_privileged};

const ECHO: &str = "10.96.0.20";
const HTTP: u16 = 8080;
const JWKS_PORT: u16 = 8443;
const ISS: &str = "https://issuer.weft.test";

use weft_tests::jwt::{EsKey as Key, jwks};

/// A token of `key` for the issuer and audience of these tests, expiring in
/// `exp_in` seconds (negative: expired).
fn token(key: &Key, exp_in: i64) -> Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    key.sign(&json!({"iss": ISS, "sub": "alice", "aud": "echo", "exp": now + exp_in}))
}

/// Python's HTTPS server in `pod`, serving `dir/keys` (read per request, so
/// writing the file rotates the keys), with a certificate for the pod's
/// address signed by a fresh CA. Returns the server and the CA's PEM.
fn jwks_server(pod: &Pod, dir: &std::path::Path) -> Result<(Proc, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::V4(pod.ip)));
    let cert = leaf.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    let script = format!(
        r#"
import http.server, ssl
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = open("keys", "rb").read()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print("fetched", flush=True)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("cert.pem", "key.pem")
s = http.server.HTTPServer(("0.0.0.0", {JWKS_PORT}), H)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("listening", flush=True)
s.serve_forever()
"#
    );
    std::fs::write(dir.join("jwks.py"), script)?;
    let mut cmd = pod.command("python3");
    cmd.arg("jwks.py").current_dir(dir);
    let proc = Proc::spawn(&mut cmd, format!("jwks server {}", pod.name))?;
    let ready = eventually(Duration::from_secs(10), || {
        proc.stdout_lines().iter().any(|l| l == "listening")
    });
    anyhow::ensure!(ready, "the JWKS server did not start: {}", proc.stderr());
    Ok((proc, ca_pem))
}

fn get(client: &Pod, token: Option<&str>) -> Result<l7::CurlResult> {
    let auth = token.map(|t| format!("authorization: Bearer {t}"));
    let args: Vec<&str> = match &auth {
        Some(a) => vec!["-H", a],
        None => vec![],
    };
    l7::curl(client, &format!("http://{ECHO}/"), &args)
}

#[test]
fn waypoint_authn() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("wp-authn", 2, 3)?;
    let (client, wp, keys_pod) = (c.pod(0, 0), c.pod(0, 1), c.pod(0, 2));
    let mut mesh = Mesh::new(&c, |p| p.name != wp.name && p.name != keys_pod.name)?;
    mesh.set_extra(wp, "  native_tunnel: true\n  labels: {role: waypoint}\n")?;
    mesh.set_extra(c.pod(1, 0), "  labels: {app: echo}\n")?;

    let dir = std::env::temp_dir().join(format!("weft-{}-jwks", c.id()));
    std::fs::create_dir_all(&dir)?;
    let (first, second) = (Key::new("first")?, Key::new("second")?);
    std::fs::write(dir.join("keys"), jwks(&[&first]))?;
    let (keys_server, ca_pem) = jwks_server(keys_pod, &dir)?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca_pem)?;

    mesh.set_sections(&format!(
        "services:\n\
         - {{name: echo, addresses: [{ECHO}], ports: [{{port: 80, target_port: {HTTP}}}], selector: {{app: echo}}, waypoint: wp}}\n\
         - {{name: wp, addresses: [], ports: [], selector: {{role: waypoint}}}}\n\
         request_authentications:\n\
         - name: echo-jwt\n  targetRefs: [{{kind: Service, group: \"\", name: echo}}]\n  jwtRules:\n  \
         - issuer: {ISS}\n    jwksUri: https://{}:{JWKS_PORT}/keys\n    audiences: [echo]\n    \
         outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]\n\
         authorization_policies:\n\
         - name: echo-secure\n  targetRefs: [{{kind: Service, group: \"\", name: echo}}]\n  action: ALLOW\n  rules:\n  \
         - from: [{{source: {{requestPrincipals: [\"{ISS}/alice\"]}}}}]\n    to: [{{operation: {{paths: [\"/secure*\"]}}}}]\n  \
         - to: [{{operation: {{notPaths: [\"/secure*\"]}}}}]\n",
        keys_pod.ip
    ))?;
    mesh.start_all()?;
    let _echo = l7::http_echo(c.pod(1, 0), HTTP, "echo")?;
    let _waypoint = mesh.start_waypoint(
        wp,
        &[
            "--jwks-ca-file",
            &ca_file.to_string_lossy(),
            "--jwks-refresh",
            "1h",
        ],
    )?;

    // No token: passes, with no claim header (a forged one is dropped).
    let r = l7::curl(
        client,
        &format!("http://{ECHO}/"),
        &["-H", "x-jwt-sub: mallory"],
    )?;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body["headers"].get("x-jwt-sub").is_none(), "{r:?}");

    // A valid token: passes, its claim reaches the server, the token does not.
    let r = get(client, Some(&token(&first, 600)?))?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["headers"]["x-jwt-sub"][0], "alice", "{r:?}");
    assert!(r.body["headers"].get("authorization").is_none(), "{r:?}");

    // Authorization sees the request principal the token proved: /secure
    // needs alice's token; without one the request passes authentication
    // and is denied by the ALLOW policy.
    let secure = format!("http://{ECHO}/secure/data");
    let r = l7::curl(client, &secure, &[])?;
    assert_eq!(r.status, 403, "{r:?}");
    let bearer = format!("authorization: Bearer {}", token(&first, 600)?);
    let r = l7::curl(client, &secure, &["-H", &bearer])?;
    assert_eq!(r.status, 200, "{r:?}");

    // A bad signature (another key under the same kid) and an expired token.
    let forged = Key {
        kid: "first".into(),
        ..Key::new("forged")?
    };
    for (what, token) in [
        ("bad signature", token(&forged, 600)?),
        ("expired", token(&first, -3600)?),
    ] {
        let r = get(client, Some(&token))?;
        assert_eq!(r.status, 401, "{what}: {r:?}");
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer "), "{what}: {challenge}");
        assert!(
            challenge.contains("error=\"invalid_token\""),
            "{what}: {challenge}"
        );
        assert_eq!(r.body, "Jwt verification fails", "{what}: no detail");
    }

    // The issuer rotates its keys: a token with the new kid is accepted once
    // the waypoint has fetched them again (the unknown kid asks for it).
    std::fs::write(dir.join("keys"), jwks(&[&second]))?;
    let token = token(&second, 600)?;
    let mut last = None;
    let accepted = eventually(Duration::from_secs(30), || {
        let r = get(client, Some(&token));
        let ok = r.as_ref().is_ok_and(|r| r.status == 200);
        last = Some(r.map(|r| r.status));
        ok
    });
    assert!(accepted, "the rotated key was never used: {last:?}");
    let fetches = keys_server
        .stdout_lines()
        .iter()
        .filter(|l| *l == "fetched")
        .count();
    assert!(fetches >= 2, "{fetches} fetches");

    // The waypoint counted what it verified and refused, and its fetches.
    let page = c
        .pod(0, 1)
        .exec("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    let page = String::from_utf8_lossy(&page.stdout).into_owned();
    let count = |series: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    for (series, at_least) in [
        (r#"weft_jwt_tokens_total{result="verified",reason=""}"#, 3),
        (
            r#"weft_jwt_tokens_total{result="refused",reason="signature"}"#,
            1,
        ),
        (
            r#"weft_jwt_tokens_total{result="refused",reason="expired"}"#,
            1,
        ),
        (
            r#"weft_jwt_tokens_total{result="refused",reason="unknown_kid"}"#,
            1,
        ),
        (r#"weft_jwks_fetches_total{result="ok"}"#, 2),
    ] {
        assert!(count(series) >= at_least, "{series} < {at_least}:\n{page}");
    }
    Ok(())
}
