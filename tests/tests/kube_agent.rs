//! The agent in its Kubernetes mode (`--discovery kubernetes`), end to end in
//! the virtual cluster, against `weft_tests::kubeapi` (list and watch over
//! HTTP, as the API server serves them; no API server can run here) with a
//! real kubeconfig and kube's real watcher in the agent and the CA.
//!
//! Pods and services the API lists are meshed; a change of one pod or of one
//! EndpointSlice reaches the agents as a delta.
//!
//! An uninstall (`kubectl delete -k deploy/`) deletes Weft's namespace; an
//! agent that saw it go takes itself out of its node as it stops: the chained
//! CNI plugin (which would otherwise fail every new pod's ADD, fail closed,
//! for an agent that never comes back) and the capture. Any other stop leaves
//! both in place.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_tests::{
    Cluster, Mesh, PATIENCE, Pod, eventually,
    kubeapi::{FakeApi, rules_of},
    require_privileged, tk,
};

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PORT: u16 = 9000;
/// A service's cluster IP.
const VIP: &str = "10.96.0.20";

fn namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("uid-{name}"),
                     "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// A namespace whose pods are meshed (`weft.dev/mesh: enabled`).
fn meshed(name: &str) -> Value {
    let mut ns = namespace(name);
    ns["metadata"]["labels"]["weft.dev/mesh"] = json!("enabled");
    ns
}

/// The cluster's pod `pod` as the API server shows it running: its node,
/// its addresses, the service account whose identity the harness's CA signs
/// for it (`spiffe://cluster.local/ns/default/sa/<name>`).
fn pod_object(c: &Cluster, pod: &Pod) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": "default", "uid": format!("uid-{}", pod.name),
            "labels": {"app": pod.name, "pod-template-hash": "5d8f7c9b6"},
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1"}],
        },
        "spec": {
            "nodeName": c.node(pod.node).name,
            "serviceAccountName": pod.name,
            "containers": [{"name": "app", "image": "registry.example/app:1.0",
                            "ports": [{"containerPort": PORT, "protocol": "TCP"}]}],
        },
        "status": {
            "phase": "Running",
            "hostIP": c.node(pod.node).ip.to_string(),
            "podIP": pod.ip.to_string(),
            "podIPs": [{"ip": pod.ip.to_string()}, {"ip": pod.ip6.to_string()}],
        },
    })
}

/// As the API server shows a namespace once deleted, while its pods go.
fn terminating(mut ns: Value) -> Value {
    ns["metadata"]["deletionTimestamp"] = json!("2026-12-07T12:00:00Z");
    ns["status"]["phase"] = json!("Terminating");
    ns
}

/// A node's CNI directories with a bridge conflist, and `weft cni install`
/// run into them as the DaemonSet's init container runs it.
fn install_cni(bin: &Path, conf: &Path) -> Result<String> {
    std::fs::create_dir_all(bin)?;
    std::fs::create_dir_all(conf)?;
    std::fs::write(
        conf.join("10-bridge.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "cbr0", "plugins": [
  {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}}
]}"#,
    )?;
    let out = std::process::Command::new(weft_tests::bin_path("weft"))
        .args(["cni", "install", "--bin-dir"])
        .arg(bin)
        .arg("--conf-dir")
        .arg(conf)
        .output()?;
    ensure!(out.status.success(), "weft cni install: {out:?}");
    let list = std::fs::read_to_string(conf.join("10-bridge.conflist"))?;
    ensure!(list.contains("weft-cni"), "{list}");
    Ok(list)
}

/// Stops node 0's agent (SIGTERM, as the kubelet stops a pod) and returns
/// its last line, written once it has done all it does on a stop.
fn stop(mesh: &mut Mesh) -> Result<Value> {
    mesh.agent(0).signal(libc::SIGTERM)?;
    let last = mesh.agent(0).wait_for_json(Duration::from_secs(20), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("agent stopped"))
    })?;
    mesh.stop_agent(0, false)?;
    Ok(last)
}

/// Kubeconfigs for the agents and for the CA, each as its own service account
/// with exactly the roles `deploy/` gives it: whatever either asks of the API
/// beyond them is refused, and the test fails on [`all_granted`].
fn as_deployed(api: &FakeApi, dir: &Path) -> Result<(String, String)> {
    api.grant(
        "weft-agent",
        rules_of("agent/rbac.yaml", "ClusterRole", "weft-agent")?,
    );
    let mut ca = rules_of("ca/rbac.yaml", "ClusterRole", "weft-ca")?;
    ca.extend(rules_of("ca/rbac.yaml", "Role", "weft-ca")?);
    api.grant("weft-ca", ca);
    Ok((
        api.kubeconfig_as(dir, "weft-agent")?.display().to_string(),
        api.kubeconfig_as(dir, "weft-ca")?.display().to_string(),
    ))
}

/// The API stand-in on node 0's uplink (both nodes reach it, as they reach
/// the CA), listing Weft's namespace, a meshed `default` and `pods`; the
/// agents and the CA of `mesh` learn the mesh from it, as their service
/// accounts ([`as_deployed`]), with their kubeconfigs in `dir`.
fn on_kubernetes(c: &Cluster, mesh: &mut Mesh, dir: &str, pods: &[&Pod]) -> Result<FakeApi> {
    let dir = mesh.token_path(0).with_file_name(dir);
    std::fs::create_dir_all(&dir)?;
    let api = FakeApi::start_at(&c.node(0).netns_path, c.node(0).ip.into())?;
    api.put(NAMESPACES, namespace("weft-system"))?;
    api.put(NAMESPACES, meshed("default"))?;
    for p in pods {
        api.put(PODS, pod_object(c, p))?;
    }
    let (agent_config, ca_config) = as_deployed(&api, &dir)?;
    mesh.agent_args = ["--discovery", "kubernetes"].map(String::from).to_vec();
    mesh.agent_env.push(("KUBECONFIG".into(), agent_config));
    mesh.ca_args = ["--discovery", "kubernetes"].map(String::from).to_vec();
    mesh.ca_env.push(("KUBECONFIG".into(), ca_config));
    Ok(api)
}

/// Nothing the agents or the CA asked was beyond `deploy/`'s roles.
fn all_granted(api: &FakeApi) -> Result<()> {
    let refused = api.forbidden();
    ensure!(
        refused.is_empty(),
        "refused by the roles in deploy/: {refused:#?}"
    );
    Ok(())
}

/// How many whole meshes node `node`'s agent has applied (a delta is not
/// logged so).
fn whole_meshes(mesh: &Mesh, node: usize) -> usize {
    mesh.logs(node, |v| {
        v["message"] == "mesh changed in Kubernetes, applying"
    })
    .len()
}

fn chained(conf: &Path) -> Result<bool> {
    Ok(std::fs::read_to_string(conf.join("10-bridge.conflist"))?.contains("weft-cni"))
}

#[test]
fn an_agent_leaves_its_node_when_weft_s_namespace_is_deleted_and_only_then() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("kube_leave", 1, 1)?;
    // Nothing enrolled: the API lists no pod.
    let mut mesh = Mesh::new(&c, |_| false)?;
    let dir = mesh.token_path(0).with_file_name("kube-agent");
    std::fs::create_dir_all(&dir)?;
    let (bin, conf) = (dir.join("opt-cni-bin"), dir.join("etc-cni-net.d"));
    install_cni(&bin, &conf)?;

    let api = FakeApi::start_in(&c.node(0).netns_path)?;
    api.put(NAMESPACES, namespace("weft-system"))?;
    api.put(NAMESPACES, namespace("default"))?;
    let (kubeconfig, _) = as_deployed(&api, &dir)?;
    mesh.agent_args = [
        "--discovery",
        "kubernetes",
        "--namespace",
        "weft-system",
        "--cni-conf-dir",
    ]
    .map(String::from)
    .to_vec();
    mesh.agent_args.push(conf.display().to_string());
    mesh.agent_args.push("--cni-bin-dir".into());
    mesh.agent_args.push(bin.display().to_string());
    mesh.agent_env.push(("KUBECONFIG".into(), kubeconfig));
    mesh.start_ca()?;
    let pins = mesh.pin_dir(0);

    // A stop that is not an uninstall (an upgrade, a restart): the plugin
    // stays chained (new pods wait for the next agent) and the capture
    // stays pinned for it.
    mesh.start_agent(0)?;
    let listed = mesh.logs(0, |v| v["message"] == "mesh listed from Kubernetes");
    ensure!(listed.len() == 1, "{listed:?}");
    let last = stop(&mut mesh)?;
    ensure!(
        last["message"] == "agent stopped; capture stays pinned (use --uninstall to remove it)",
        "{last}"
    );
    ensure!(chained(&conf)?, "a restart took the plugin out");
    ensure!(bin.join("weft-cni").exists());
    ensure!(pins.join("maps").exists(), "a restart removed the capture");

    // The uninstall: Weft's namespace is deleted (another namespace's
    // deletion first, which is not it).
    mesh.start_agent(0)?;
    api.put(NAMESPACES, terminating(namespace("default")))?;
    api.put(NAMESPACES, terminating(namespace("weft-system")))?;
    eventually(PATIENCE, || {
        !mesh
            .logs(0, |v| v["message"] == "Weft's namespace is being deleted")
            .is_empty()
    });
    let seen = mesh.logs(0, |v| v["message"] == "Weft's namespace is being deleted");
    ensure!(seen.len() == 1, "{seen:?}");
    ensure!(seen[0]["namespace"] == "weft-system", "{}", seen[0]);
    let last = stop(&mut mesh)?;
    ensure!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("agent stopped and uninstalled")),
        "{last}"
    );
    ensure!(
        !chained(&conf)?,
        "the plugin is still chained after an uninstall"
    );
    ensure!(!bin.join("weft-cni").exists(), "the plugin's binary stayed");
    ensure!(
        !pins.exists(),
        "the capture stayed pinned after an uninstall"
    );
    let list: Value = serde_json::from_str(
        &std::fs::read_to_string(conf.join("10-bridge.conflist")).context("the conflist")?,
    )?;
    ensure!(
        list["plugins"].as_array().map(Vec::len) == Some(1),
        "{list}"
    );
    all_granted(&api)
}

/// Two nodes whose agents and CA learn the mesh from the API alone: a pod of
/// a labelled namespace, running before its agent, is found in /proc and
/// enrolled, and talks to a pod on the other node over mutual TLS with the
/// identity of its service account, which the CA signed because the API
/// places that pod on that node; relabelled out of the mesh (a change of one
/// pod: a delta), it is unenrolled and its traffic goes plain; and so is the
/// other pod when its namespace is taken out (a delta of its pods).
#[test]
fn agents_on_kubernetes_mesh_the_pods_the_api_lists() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("kube_mesh", 2, 1)?;
    let (client, server) = (c.pod(0, 0), c.pod(1, 0));
    let mut mesh = Mesh::new(&c, |_| true)?;
    let api = on_kubernetes(&c, &mut mesh, "kube-agent", &[client, server])?;
    // The pods run before their agents: only /proc tells where.
    let _echo = tk::echo(server, PORT)?;
    let _client_app = tk::echo(client, PORT)?;
    mesh.start_ca()?;
    mesh.start_agent(0)?;
    mesh.start_agent(1)?;
    for (node, pod) in [(0, client), (1, server)] {
        let enrolled = mesh.logs(node, |v| {
            v["message"] == "pod enrolled" && v["workload"] == format!("default/{}", pod.name)
        });
        ensure!(
            enrolled.len() == 1,
            "{} not enrolled: {enrolled:?}",
            pod.name
        );
    }

    let to = std::net::SocketAddr::new(server.ip.into(), PORT).to_string();
    let r = tk::say(client, &to, "meshed", &[])?;
    ensure!(r["ok"] == true, "{r}");
    let over_mtls = |v: &Value| {
        v["direction"] == "inbound"
            && v["security"] == "mutual_tls"
            && v["src.identity"] == weft_tests::mesh::identity(client)
    };
    ensure!(
        eventually(PATIENCE, || mesh.access_logs(1).iter().any(over_mtls)),
        "no inbound mutual TLS from the client: {:#?}",
        mesh.access_logs(1)
    );

    // The pod opts out (its own label wins over its namespace's): one pod
    // changed, which the agent applies as a delta.
    let mut out = pod_object(&c, client);
    out["metadata"]["labels"]["weft.dev/mesh"] = json!("disabled");
    api.put(PODS, out)?;
    ensure!(
        eventually(PATIENCE, || !mesh
            .logs(0, |v| v["message"] == "pod unenrolled"
                && v["workload"] == format!("default/{}", client.name))
            .is_empty()),
        "the client was not unenrolled"
    );
    let before = mesh.access_logs(1).len();
    let r = tk::say(client, &to, "plain", &[])?;
    ensure!(r["ok"] == true, "{r}");
    let plain = |v: &Value| v["direction"] == "inbound" && v["security"] != "mutual_tls";
    ensure!(
        eventually(PATIENCE, || mesh.access_logs(1)[before..].iter().any(plain)),
        "the unenrolled client's connection should arrive plain: {:#?}",
        &mesh.access_logs(1)[before..]
    );

    // The namespace is taken out of the mesh: its pods' enrollment changes,
    // sent as a delta of those pods, not a whole mesh.
    let whole = |mesh: &Mesh| whole_meshes(mesh, 1);
    let meshes = whole(&mesh);
    let mut out = meshed("default");
    out["metadata"]["labels"]["weft.dev/mesh"] = json!("disabled");
    api.put(NAMESPACES, out)?;
    ensure!(
        eventually(PATIENCE, || !mesh
            .logs(1, |v| v["message"] == "pod unenrolled"
                && v["workload"] == format!("default/{}", server.name))
            .is_empty()),
        "the server was not unenrolled with its namespace"
    );
    ensure!(
        whole(&mesh) == meshes,
        "a namespace's enrollment was applied as a whole mesh"
    );
    all_granted(&api)
}

/// The service `echo` on `VIP:80` → the port named `http`, as the API server
/// shows it.
fn echo_service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": "default", "uid": "uid-svc-echo"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": VIP,
            "clusterIPs": [VIP],
            "selector": {"app": "echo"},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}],
        },
    })
}

/// `echo`'s EndpointSlice as the controller writes it: each pod, ready or
/// not, and the port `http` resolved to `PORT`.
fn echo_slice(c: &Cluster, endpoints: &[(&Pod, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "echo-x7k2p", "namespace": "default", "uid": "uid-slice-echo",
            "labels": {"kubernetes.io/service-name": "echo",
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(p, ready)| json!({
            "addresses": [p.ip.to_string()],
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "nodeName": c.node(p.node).name,
            "targetRef": {"kind": "Pod", "namespace": "default", "name": p.name,
                          "uid": format!("uid-{}", p.name)},
        })).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
    })
}

/// A service whose endpoints the API lists: an endpoint that turns not
/// ready in the EndpointSlice stops getting connections, and gets them
/// again when it is ready, each change applied to the agents as a delta
/// (no whole mesh assembled or compiled again).
#[test]
fn a_service_follows_its_endpoint_slice_by_deltas() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("kube_slice", 2, 2)?;
    let (client, a, b) = (c.pod(0, 0), c.pod(1, 0), c.pod(1, 1));
    let mut mesh = Mesh::new(&c, |_| true)?;
    let api = on_kubernetes(&c, &mut mesh, "kube-slice", &[client, a, b, c.pod(0, 1)])?;
    api.put(SERVICES, echo_service())?;
    api.put(SLICES, echo_slice(&c, &[(a, true), (b, true)]))?;
    let _a = tk::name(a, PORT)?;
    let _b = tk::name(b, PORT)?;
    mesh.start_ca()?;
    mesh.start_agent(0)?;
    mesh.start_agent(1)?;

    let to = format!("{VIP}:80");
    let answering = |count: usize| -> Result<Vec<String>> {
        let report = tk::who(client, &to, count, 2)?;
        ensure!(report["failures"] == 0, "{report}");
        let mut who: Vec<String> = report["counts"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        who.sort();
        Ok(who)
    };
    let both = vec![a.name.clone(), b.name.clone()];
    let mut seen = Vec::new();
    ensure!(
        eventually(PATIENCE, || {
            seen = answering(20).unwrap_or_default();
            seen == both
        }),
        "both endpoints should answer through {to}: {seen:?}"
    );
    let whole = |mesh: &Mesh| whole_meshes(mesh, 0);
    let meshes = whole(&mesh);

    // b turns not ready.
    api.put(SLICES, echo_slice(&c, &[(a, true), (b, false)]))?;
    ensure!(
        eventually(PATIENCE, || {
            seen = answering(20).unwrap_or_default();
            seen == [a.name.clone()]
        }),
        "only {} should answer once {} is not ready: {seen:?}",
        a.name,
        b.name
    );
    // Ready again.
    api.put(SLICES, echo_slice(&c, &[(a, true), (b, true)]))?;
    ensure!(
        eventually(PATIENCE, || {
            seen = answering(20).unwrap_or_default();
            seen == both
        }),
        "both should answer again: {seen:?}"
    );
    ensure!(
        whole(&mesh) == meshes,
        "an endpoint's change was applied as a whole mesh"
    );
    all_granted(&api)
}

const POLICIES: &str = "/apis/weft.dev/v1/authorizationpolicies";
const ISTIO_POLICIES: &str = "/apis/security.istio.io/v1beta1/authorizationpolicies";

/// A Weft AuthorizationPolicy as `kubectl get -o json` shows it: `action`
/// on the server's pods for connections from `principal`.
fn policy(name: &str, server: &Pod, action: &str, principal: &str) -> Value {
    json!({
        "apiVersion": "weft.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "generation": 1},
        "spec": {
            "selector": {"matchLabels": {"app": server.name}},
            "action": action,
            "rules": [{"from": [{"source": {"principals": [principal]}}]}],
        },
    })
}

/// Policies as Kubernetes resources, end to end: a DENY put into the API
/// refuses the client's connections at the server's agent, an invalid policy
/// beside it is reported and breaks nothing, and deleting the DENY lets the
/// client through again; Istio's, served at `v1beta1` only, are read there.
#[test]
fn an_authorization_policy_from_the_api_is_enforced() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("kube_policy", 2, 1)?;
    let (client, server) = (c.pod(0, 0), c.pod(1, 0));
    let mut mesh = Mesh::new(&c, |_| true)?;
    let api = on_kubernetes(&c, &mut mesh, "kube-policy", &[client, server])?;
    let _echo = tk::echo(server, PORT)?;
    let _client_app = tk::echo(client, PORT)?;
    mesh.start_ca()?;
    mesh.start_agent(0)?;
    mesh.start_agent(1)?;
    let to = std::net::SocketAddr::new(server.ip.into(), PORT).to_string();
    let say = |message: &str| tk::say(client, &to, message, &["--timeout-secs", "3"]);
    let r = say("before")?;
    ensure!(r["ok"] == true, "{r}");

    // A policy that stays in force throughout: removing the last one is
    // held back by the agent's guard for 10 s (it would allow what they
    // denied), which this test does not wait for.
    api.put(
        POLICIES,
        policy(
            "deny-nobody",
            server,
            "DENY",
            "cluster.local/ns/default/sa/nobody",
        ),
    )?;
    let principal = format!("cluster.local/ns/default/sa/{}", client.name);
    let deny = policy("deny-client", server, "DENY", &principal);
    api.put(POLICIES, deny.clone())?;
    // Beside it, one Istio's rules refuse (no such action): skipped,
    // reported, and the DENY still applies.
    api.put(
        POLICIES,
        policy(
            "typo",
            server,
            "DENNY",
            "cluster.local/ns/default/sa/nobody",
        ),
    )?;
    ensure!(
        eventually(PATIENCE, || say("denied").is_ok_and(|r| r["ok"] == false)),
        "the DENY from the API was not enforced"
    );
    let denied = |v: &Value| {
        v["direction"] == "inbound"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("deny-client"))
    };
    ensure!(
        eventually(PATIENCE, || mesh.access_logs(1).iter().any(denied)),
        "no denial naming the policy: {:#?}",
        mesh.access_logs(1)
    );
    let skipped = |v: &Value| {
        v["message"] == "invalid object skipped; the rest of the mesh applies"
            && v["object"] == "default/typo"
    };
    ensure!(
        eventually(PATIENCE, || !mesh.logs(1, skipped).is_empty()),
        "the invalid policy was not reported"
    );

    api.delete(POLICIES, &deny)?;
    ensure!(
        eventually(PATIENCE, || say("allowed again")
            .is_ok_and(|r| r["ok"] == true)),
        "deleting the DENY did not let the client through: {:#?}",
        mesh.access_logs(1).last()
    );

    // Istio's own, from an Istio before 1.22 whose CRD serves only
    // `v1beta1`: read there when `v1` is not served, and enforced the same.
    let mut istio = policy("istio-deny-client", server, "DENY", &principal);
    istio["apiVersion"] = json!("security.istio.io/v1beta1");
    api.put(ISTIO_POLICIES, istio)?;
    ensure!(
        eventually(PATIENCE, || say("denied by istio")
            .is_ok_and(|r| r["ok"] == false)),
        "Istio's v1beta1 DENY was not enforced"
    );
    ensure!(
        !mesh
            .logs(1, |v| v["message"] == "now served; watching it"
                && v["api"] == "security.istio.io/v1beta1"
                && v["kind"] == "AuthorizationPolicy")
            .is_empty(),
        "no word of Istio's policies read at v1beta1"
    );
    all_granted(&api)
}
