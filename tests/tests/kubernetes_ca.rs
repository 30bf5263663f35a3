//! The CA's Kubernetes mode, end to end in the virtual cluster: agents prove
//! their node with a projected service-account token (as the kubelet mounts it
//! in the agent pod), the CA verifies it with the issuer's JWKS and signs each
//! node only its pods' identities. The tokens are minted by the test with a
//! real key, in the exact shape the API server (1.30+) gives pod-bound tokens;
//! no API server runs here.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use weft_tests::{
    Cluster, Mesh, PATIENCE, eventually,
    jwt::{EsKey, jwks},
    require_privileged, tk,
};

const PORT: u16 = 9000;
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The service-account issuer: an ES256 key and its JWKS.
struct Issuer {
    key: EsKey,
    jwks: String,
}

impl Issuer {
    fn new() -> Result<Issuer> {
        let key = EsKey::new("sa-1")?;
        let jwks = jwks(&[&key]);
        Ok(Issuer { key, jwks })
    }

    /// A projected token of agent pod `pod` on `node`, for `audience`.
    fn token(&self, node: &str, pod: &str, audience: &str) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims: Value = json!({
            "aud": [audience], "exp": now + 3600, "iat": now, "nbf": now, "iss": ISSUER,
            "kubernetes.io": {
                "namespace": "weft-system",
                "node": {"name": node, "uid": format!("uid-{node}")},
                "pod": {"name": pod, "uid": format!("uid-{pod}")},
                "serviceaccount": {"name": "weft-agent", "uid": "uid-sa"}
            },
            "sub": "system:serviceaccount:weft-system:weft-agent"
        });
        self.key.sign(&claims)
    }
}

#[test]
fn agents_get_their_pods_identities_with_projected_service_account_tokens() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("k8s_ca", 2, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    let issuer = Issuer::new()?;
    // In the harness's directory, removed with the mesh.
    let jwks = mesh.token_path(0).with_file_name("sa-jwks.json");
    std::fs::write(&jwks, &issuer.jwks)?;
    mesh.ca_args = [
        "--agent-auth",
        "service-account",
        "--sa-jwks-file",
        jwks.to_str().unwrap(),
        "--sa-issuer",
        ISSUER,
    ]
    .map(String::from)
    .to_vec();
    // Node 0's agent holds a token for another audience: it proves nothing.
    weft_tests::write_secret(
        &mesh.token_path(0),
        &issuer.token(
            &c.node(0).name,
            "weft-agent-0",
            "https://kubernetes.default.svc",
        )?,
    )?;
    weft_tests::write_secret(
        &mesh.token_path(1),
        &issuer.token(&c.node(1).name, "weft-agent-1", "weft-ca")?,
    )?;
    mesh.start_ca()?;
    mesh.start_agent(1)?;
    // Node 0's agent starts but gets no certificate: its pod cannot connect.
    let mut cmd = mesh.agent_command(0);
    let agent0 = weft_tests::Proc::spawn(&mut cmd, "weft agent n0 (wrong audience)")?;
    ensure!(
        eventually(PATIENCE, || {
            agent0
                .stdout_lines()
                .iter()
                .any(|l| l.contains("audience is not"))
        }),
        "node 0's agent was not told why the CA refused it:\n{}",
        agent0.stdout_lines().join("\n")
    );
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let _echo = tk::echo(b, PORT)?;
    let r = tk::say(a, &format!("{}:{PORT}", b.ip), "hello", &[])?;
    ensure!(
        r["ok"] != true,
        "a pod of a node with no valid token reached {}: {r}",
        b.name
    );
    drop(agent0);

    // The kubelet rotates the token file: the right audience now. The agent
    // reads it at its next call and its pods get their identities.
    weft_tests::write_secret(
        &mesh.token_path(0),
        &issuer.token(&c.node(0).name, "weft-agent-0", "weft-ca")?,
    )?;
    mesh.start_agent(0)?;
    let r = tk::say(a, &format!("{}:{PORT}", b.ip), "hello", &[])?;
    ensure!(r["ok"] == true, "{} → {}: {r}", a.name, b.name);
    ensure!(
        eventually(PATIENCE, || {
            mesh.access_logs(1).iter().any(|v| {
                v["direction"] == "inbound"
                    && v["security"] == "mutual_tls"
                    && v["src.identity"] == weft_tests::mesh::identity(a)
            })
        }),
        "no mutual-TLS inbound from {}: {:#?}",
        a.name,
        mesh.access_logs(1)
    );
    Ok(())
}
