//! `weft cni` as the container runtime runs it: a CNI plugin (spec 1.1.0, and
//! 1.0.0 and 0.4.0) chained after the cluster's own plugins.
//!
//! The runtime gives the command and the pod in the environment (`CNI_*`,
//! `K8S_POD_*` inside `CNI_ARGS`) and the network config on stdin, with the
//! result of the plugins before this one as `prevResult`. An ADD hands the pod
//! (namespace, name, uid), its network namespace and its addresses to the
//! agent and waits for the agent to say it is captured; only then does it print
//! `prevResult` unchanged and succeed. Anything else (no agent, an agent
//! without a model yet, a refusal, a timeout) fails the ADD, so the runtime
//! tears the sandbox down and tries again later: a pod of the mesh never
//! starts unmeshed. A DEL tells the agent if it can and always succeeds, as the
//! spec asks (a node whose agent is gone must still be able to delete pods).
//!
//! CNI 1.1 adds two commands without a pod. STATUS succeeds only while the
//! agent is up and has its model (else error 50, "not available"): an ADD
//! would fail, so the runtime reports its network as not ready rather than
//! start sandboxes that fail. GC hands the agent the sandboxes the runtime
//! still has (`cni.dev/valid-attachments`); the agent releases any other it
//! holds, as if its DEL had come (a DEL lost while the agent was down). With
//! no agent there is nothing of ours to collect, so GC then succeeds.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::proto::{self, Command, PodRef, Request, Response};

/// The versions of the spec this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// The newest of [`SUPPORTED_VERSIONS`].
const NEWEST: &str = "1.1.0";

/// The largest network config read from stdin: a conflist entry with its
/// `prevResult` is a few KiB.
const MAX_CONFIG: u64 = 1 << 20;

/// How long an ADD or CHECK waits for the agent's answer. The agent itself
/// answers within about 5 s (its wait for a pod its model does not know yet).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A DEL waits less: it succeeds whatever happens.
const DEL_TIMEOUT: Duration = Duration::from_secs(3);

/// CNI's well-known error codes (spec 1.0, "Error").
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS (1.1): the plugin cannot serve ADDs now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific (100+): the agent refused to enroll the pod.
    pub const REFUSED: u32 = 100;
}

/// A CNI error: what the runtime logs and shows in the pod's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error as the spec prints it on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

/// What a run ends with: text for stdout, and whether it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

/// The plugin's own keys in its conflist entry.
#[derive(Debug, Deserialize)]
struct Conf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    /// The agent's socket.
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    /// Pods of these namespaces are never sent to the agent (the cluster's
    /// own, which must start even while the mesh is down).
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    /// GC's list of the sandboxes the runtime still has (spec 1.1; libcni
    /// also passes it as `cni.dev/attachments`, an earlier spelling).
    #[serde(rename = "cni.dev/valid-attachments", alias = "cni.dev/attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// An attachment GC keeps.
#[derive(Debug, Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
}

/// Runs the plugin: the environment as given, stdin from `stdin`.
pub fn run(env: &BTreeMap<String, String>, stdin: impl std::io::Read) -> Outcome {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        return Outcome {
            stdout: json!({"cniVersion": NEWEST, "supportedVersions": SUPPORTED_VERSIONS})
                .to_string(),
            success: true,
        };
    }
    // Until the config is read, errors carry the newest version we speak.
    let mut version = NEWEST.to_owned();
    // A command we do not know is an error before stdin is read: run by
    // hand on a terminal, the plugin must not sit waiting for input.
    let known = match command {
        "ADD" | "DEL" | "CHECK" | "STATUS" | "GC" => Ok(()),
        "" => Err(CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "weft-cni is a CNI plugin: the container runtime runs it with CNI_COMMAND (ADD, DEL, CHECK, STATUS, GC, VERSION) and the network config on stdin",
        )),
        other => Err(CniError::new(
            code::INVALID_ENV,
            "unknown CNI_COMMAND",
            format!("{other:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
        )),
    };
    let result = known.and_then(|()| read_conf(stdin)).and_then(|conf| {
        version = conf.cni_version.clone();
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "weft-cni speaks {}; the config asks for {}",
                    SUPPORTED_VERSIONS.join(", "),
                    conf.cni_version
                ),
            ));
        }
        match command {
            "ADD" => add(env, &conf),
            "DEL" => {
                del(env, &conf);
                Ok(String::new())
            }
            "STATUS" => status(&conf).map(|()| String::new()),
            "GC" => gc(&conf).map(|()| String::new()),
            _ => check(env, &conf).map(|()| String::new()),
        }
    });
    // A DEL succeeds whatever its input: a pod whose teardown failed here would
    // be stuck for good, and there is nothing of ours it could leave behind
    // that the agent does not clean up when the namespace goes.
    let result = if command == "DEL" {
        Ok(String::new())
    } else {
        result
    };
    match result {
        Ok(stdout) => Outcome {
            stdout,
            success: true,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&version),
            success: false,
        },
    }
}

fn read_conf(stdin: impl std::io::Read) -> Result<Conf, CniError> {
    let mut bytes = Vec::new();
    stdin
        .take(MAX_CONFIG + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CniError::new(code::IO, "cannot read the network config", e.to_string()))?;
    if bytes.len() as u64 > MAX_CONFIG {
        return Err(CniError::new(
            code::DECODE,
            "the network config on stdin is too large",
            format!("more than {MAX_CONFIG} bytes"),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot decode the network config on stdin",
            e.to_string(),
        )
    })
}

fn env_var<'a>(env: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, CniError> {
    env.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("{name} is not set"),
                "the container runtime sets it for every plugin it runs",
            )
        })
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
pub fn parse_args(args: &str) -> Result<BTreeMap<String, String>, CniError> {
    args.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    "CNI_ARGS is malformed",
                    format!("{pair:?} is not KEY=VALUE"),
                )
            })?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The pod named in `CNI_ARGS`, if the runtime is Kubernetes'.
fn pod_of(env: &BTreeMap<String, String>) -> Result<Option<PodRef>, CniError> {
    let args = parse_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""))?;
    let (Some(namespace), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
    else {
        return Ok(None);
    };
    if namespace.is_empty() || name.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            "CNI_ARGS names an empty pod",
            "K8S_POD_NAMESPACE and K8S_POD_NAME must not be empty",
        ));
    }
    Ok(Some(PodRef {
        namespace: namespace.clone(),
        name: name.clone(),
        uid: args.get("K8S_POD_UID").filter(|u| !u.is_empty()).cloned(),
    }))
}

/// The addresses in a result (`ips[].address`, CIDR notation); both 0.4.0
/// and 1.0.0 results have them there.
pub fn result_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let bad = |details: String| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult has a bad address",
            details,
        )
    };
    let Some(ips) = result.get("ips") else {
        return Ok(Vec::new());
    };
    let ips = ips
        .as_array()
        .ok_or_else(|| bad("`ips` is not a list".into()))?;
    ips.iter()
        .map(|ip| {
            let text = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{ip} has no `address`")))?;
            let addr = text.split_once('/').map_or(text, |(a, _)| a);
            addr.parse::<IpAddr>()
                .map_err(|e| bad(format!("{text:?}: {e}")))
        })
        .collect()
}

fn add(env: &BTreeMap<String, String>, conf: &Conf) -> Result<String, CniError> {
    let container_id = env_var(env, "CNI_CONTAINERID")?;
    let netns = env_var(env, "CNI_NETNS")?;
    env_var(env, "CNI_IFNAME")?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "weft-cni has no prevResult",
            "it must be chained after the plugin that sets up the pod's interface (the last entry of a .conflist)",
        )
    })?;
    let ips = result_ips(prev)?;
    let output = prev.to_string();
    // Not a Kubernetes pod (no K8S_POD_* in CNI_ARGS): the mesh has no name for
    // it, so it can be no workload of the mesh.
    let Some(pod) = pod_of(env)? else {
        return Ok(output);
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(output);
    }
    let request = Request {
        command: Command::Add,
        pod,
        container_id: container_id.to_owned(),
        netns: Some(PathBuf::from(netns)),
        ips,
        valid: Vec::new(),
    };
    match ask(conf, &request, ANSWER_TIMEOUT)? {
        Response::Enrolled | Response::NotMeshed => Ok(output),
        other => Err(unwelcome(other)),
    }
}

fn del(env: &BTreeMap<String, String>, conf: &Conf) {
    // Best effort: whatever is missing or fails, the DEL succeeds.
    let Ok(Some(pod)) = pod_of(env) else { return };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return;
    }
    let Some(container_id) = env.get("CNI_CONTAINERID") else {
        return;
    };
    let request = Request {
        command: Command::Del,
        pod,
        container_id: container_id.clone(),
        netns: env
            .get("CNI_NETNS")
            .filter(|n| !n.is_empty())
            .map(PathBuf::from),
        ips: Vec::new(),
        valid: Vec::new(),
    };
    let _ = ask(conf, &request, DEL_TIMEOUT);
}

fn check(env: &BTreeMap<String, String>, conf: &Conf) -> Result<(), CniError> {
    let container_id = env_var(env, "CNI_CONTAINERID")?;
    let netns = env_var(env, "CNI_NETNS")?;
    let Some(pod) = pod_of(env)? else {
        return Ok(());
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(());
    }
    let request = Request {
        command: Command::Check,
        pod,
        container_id: container_id.to_owned(),
        netns: Some(PathBuf::from(netns)),
        ips: Vec::new(),
        valid: Vec::new(),
    };
    match ask(conf, &request, ANSWER_TIMEOUT)? {
        Response::Enrolled | Response::NotMeshed => Ok(()),
        other => Err(unwelcome(other)),
    }
}

/// A request without a pod.
fn request(command: Command, valid: Vec<String>) -> Request {
    Request {
        command,
        pod: PodRef::default(),
        container_id: String::new(),
        netns: None,
        ips: Vec::new(),
        valid,
    }
}

fn status(conf: &Conf) -> Result<(), CniError> {
    let unavailable = |details: String| {
        CniError::new(
            code::NOT_AVAILABLE,
            "the weft agent cannot enroll pods now",
            details,
        )
    };
    match ask(conf, &request(Command::Status, Vec::new()), ANSWER_TIMEOUT) {
        Ok(Response::Ready) => Ok(()),
        Ok(Response::NotReady) => Err(unavailable("it is up but has no mesh model yet".to_owned())),
        Ok(other) => Err(unavailable(format!("unexpected answer {other:?}"))),
        Err(e) => Err(unavailable(format!("{}: {}", e.msg, e.details))),
    }
}

fn gc(conf: &Conf) -> Result<(), CniError> {
    // Without the list, "every sandbox but these" is every sandbox: refuse
    // rather than release them all.
    let Some(valid) = &conf.valid_attachments else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "GC without cni.dev/valid-attachments",
            "the runtime passes the sandboxes it still has; weft-cni releases none without the list",
        ));
    };
    let valid = valid.iter().map(|a| a.container_id.clone()).collect();
    match ask(conf, &request(Command::Gc, valid), ANSWER_TIMEOUT) {
        Ok(Response::Released) => Ok(()),
        // No agent, one still starting, or one that does not answer: it holds
        // nothing from before its start that its scan of /proc does not
        // check again, and the runtime calls GC again later.
        Ok(Response::NotReady) | Err(_) => Ok(()),
        Ok(other) => Err(unwelcome(other)),
    }
}

fn unwelcome(answer: Response) -> CniError {
    match answer {
        Response::NotReady => CniError::new(
            code::TRY_AGAIN_LATER,
            "the weft agent is not ready",
            "it has no mesh model yet; the pod is retried",
        ),
        Response::Refused { reason } => {
            CniError::new(code::REFUSED, "the weft agent refused the pod", reason)
        }
        other => CniError::new(
            code::REFUSED,
            "the weft agent gave an unexpected answer",
            format!("{other:?}"),
        ),
    }
}

/// One exchange with the agent.
fn ask(conf: &Conf, request: &Request, timeout: Duration) -> Result<Response, CniError> {
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(proto::DEFAULT_SOCKET));
    let unreachable = |e: std::io::Error| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "the weft agent is not reachable",
            format!(
                "{}: {e} (is the weft agent running on this node, with --cni-socket?)",
                socket.display()
            ),
        )
    };
    let mut stream = UnixStream::connect(&socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(unreachable)?;
    stream
        .write_all(&proto::encode(request))
        .map_err(unreachable)?;
    proto::read::<Response>(&stream).map_err(|e| {
        let timed_out = matches!(&e, proto::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        CniError::new(
            code::TRY_AGAIN_LATER,
            if timed_out {
                "the weft agent did not answer in time"
            } else {
                "no answer from the weft agent"
            },
            format!("{}: {e}", socket.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn add_env() -> BTreeMap<String, String> {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u-1",
            ),
        ])
    }

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.1.200.5/24","gateway":"10.1.200.1","interface":0},{"address":"fd00::5/64","interface":0}],"routes":[{"dst":"0.0.0.0/0"}]}"#;

    fn conf(socket: &std::path::Path, extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"weft-cni","agent_socket":{:?}{extra},"prevResult":{PREV}}}"#,
            socket.display().to_string()
        )
    }

    /// An agent that answers `answer` to one request and hands the request back.
    fn agent(answer: Response) -> (std::path::PathBuf, std::thread::JoinHandle<Request>) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "weft-cni-test-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let req: Request = proto::read(&s).unwrap();
            s.write_all(&proto::encode(&answer)).unwrap();
            req
        });
        (path, handle)
    }

    #[test]
    fn version_lists_what_is_spoken() {
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), &b""[..]);
        assert!(out.success);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    /// A 1.1 runtime's STATUS and GC (no pod, no CNI_CONTAINERID).
    fn pod_less(command: &str, socket: &std::path::Path, extra: &str) -> Outcome {
        let stdin = format!(
            r#"{{"cniVersion":"1.1.0","name":"k8s","type":"weft-cni","agent_socket":{:?}{extra}}}"#,
            socket.display().to_string()
        );
        run(
            &env(&[("CNI_COMMAND", command), ("CNI_PATH", "/opt/cni/bin")]),
            stdin.as_bytes(),
        )
    }

    #[test]
    fn status_succeeds_only_while_the_agent_can_enroll() {
        let (socket, answered) = agent(Response::Ready);
        let out = pod_less("STATUS", &socket, "");
        let req = answered.join().unwrap();
        let _ = std::fs::remove_file(&socket);
        assert!(out.success && out.stdout.is_empty(), "{}", out.stdout);
        assert_eq!(req.command, Command::Status);
        assert_eq!(req.pod, PodRef::default());
        // Up without a model, or not there at all: 50, not available.
        let (socket, answered) = agent(Response::NotReady);
        let out = pod_less("STATUS", &socket, "");
        answered.join().unwrap();
        let _ = std::fs::remove_file(&socket);
        let gone = pod_less("STATUS", &socket, "");
        for out in [out, gone] {
            assert!(!out.success);
            let e: Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(e["code"], 50, "{e}");
            assert_eq!(e["cniVersion"], "1.1.0");
        }
    }

    #[test]
    fn gc_hands_the_agent_the_sandboxes_to_keep() {
        let (socket, answered) = agent(Response::Released);
        let out = pod_less(
            "GC",
            &socket,
            r#","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"},{"containerID":"c2","ifname":"eth0"}]"#,
        );
        let req = answered.join().unwrap();
        let _ = std::fs::remove_file(&socket);
        assert!(out.success && out.stdout.is_empty(), "{}", out.stdout);
        assert_eq!(req.command, Command::Gc);
        assert_eq!(req.valid, ["c1", "c2"]);
        // The earlier spelling, and an empty list: nothing is kept.
        let (socket, answered) = agent(Response::Released);
        let out = pod_less("GC", &socket, r#","cni.dev/attachments":[]"#);
        let req = answered.join().unwrap();
        assert!(out.success, "{}", out.stdout);
        assert!(req.valid.is_empty());
        // No list: refused, rather than release every sandbox.
        let out = pod_less("GC", &socket, "");
        let _ = std::fs::remove_file(&socket);
        assert!(!out.success);
        let e: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(e["code"], 7, "{e}");
        // No agent: nothing of ours to collect.
        let out = pod_less("GC", &socket, r#","cni.dev/valid-attachments":[]"#);
        assert!(out.success, "{}", out.stdout);
    }

    #[test]
    fn add_sends_the_pod_and_prints_prev_result_unchanged() {
        let (socket, agent) = agent(Response::Enrolled);
        let out = run(&add_env(), conf(&socket, "").as_bytes());
        let req = agent.join().unwrap();
        let _ = std::fs::remove_file(&socket);
        assert!(out.success, "{}", out.stdout);
        let printed: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(printed, serde_json::from_str::<Value>(PREV).unwrap());
        assert_eq!(req.command, Command::Add);
        assert_eq!(
            req.pod,
            PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: Some("u-1".into())
            }
        );
        assert_eq!(req.container_id, "c1");
        assert_eq!(
            req.netns.as_deref(),
            Some(std::path::Path::new("/var/run/netns/x"))
        );
        assert_eq!(
            req.ips,
            vec![
                "10.1.200.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_0_4_0_chain_is_spoken_too() {
        // 0.4.0 results carry `version` per address; the rest is the same.
        let prev = r#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.1.200.6/24","interface":0}]}"#;
        let (socket, agent) = agent(Response::NotMeshed);
        let stdin = format!(
            r#"{{"cniVersion":"0.4.0","name":"k8s","type":"weft-cni","agent_socket":{:?},"prevResult":{prev}}}"#,
            socket.display().to_string()
        );
        let out = run(&add_env(), stdin.as_bytes());
        let req = agent.join().unwrap();
        let _ = std::fs::remove_file(&socket);
        assert!(out.success, "{}", out.stdout);
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap(),
            serde_json::from_str::<Value>(prev).unwrap()
        );
        assert_eq!(req.ips, vec!["10.1.200.6".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn add_fails_closed() {
        // Refused, not ready, and no agent at all: each an error on stdout.
        for (answer, code) in [
            (
                Response::Refused {
                    reason: "nope".into(),
                },
                code::REFUSED,
            ),
            (Response::NotReady, code::TRY_AGAIN_LATER),
        ] {
            let (socket, agent) = agent(answer);
            let out = run(&add_env(), conf(&socket, "").as_bytes());
            agent.join().unwrap();
            let _ = std::fs::remove_file(&socket);
            assert!(!out.success);
            let e: Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(e["code"], code, "{e}");
            assert_eq!(e["cniVersion"], "1.0.0");
        }
        let gone = std::path::Path::new("/nonexistent/weft/cni.sock");
        let out = run(&add_env(), conf(gone, "").as_bytes());
        assert!(!out.success);
        let e: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(e["code"], code::TRY_AGAIN_LATER);
        assert!(
            e["details"]
                .as_str()
                .unwrap()
                .contains("/nonexistent/weft/cni.sock")
        );
        // DEL succeeds all the same.
        let mut del = add_env();
        del.insert("CNI_COMMAND".into(), "DEL".into());
        let out = run(&del, conf(gone, "").as_bytes());
        assert_eq!(
            out,
            Outcome {
                stdout: String::new(),
                success: true
            }
        );
    }

    #[test]
    fn excluded_namespaces_and_non_kubernetes_sandboxes_pass_through() {
        let gone = std::path::Path::new("/nonexistent/weft/cni.sock");
        let out = run(
            &add_env(),
            conf(gone, r#","exclude_namespaces":["shop"]"#).as_bytes(),
        );
        assert!(out.success, "{}", out.stdout);
        let mut plain = add_env();
        plain.insert("CNI_ARGS".into(), "IgnoreUnknown=1".into());
        let out = run(&plain, conf(gone, "").as_bytes());
        assert!(out.success, "{}", out.stdout);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let gone = std::path::Path::new("/nonexistent/weft/cni.sock");
        let good = conf(gone, "");
        let mut no_netns = add_env();
        no_netns.remove("CNI_NETNS");
        let mut bad_args = add_env();
        bad_args.insert("CNI_ARGS".into(), "K8S_POD_NAME".into());
        let mut no_command = add_env();
        no_command.remove("CNI_COMMAND");
        let mut odd_command = add_env();
        odd_command.insert("CNI_COMMAND".into(), "FROB".into());
        let cases: Vec<(BTreeMap<String, String>, String, u32, &str)> = vec![
            (add_env(), "garbage".into(), code::DECODE, "cannot decode"),
            (add_env(), String::new(), code::DECODE, "cannot decode"),
            (add_env(), "x".repeat(2 << 20), code::DECODE, "too large"),
            (
                add_env(),
                good.replace("1.0.0\",\"name", "0.2.0\",\"name"),
                code::INCOMPATIBLE_VERSION,
                "incompatible",
            ),
            (
                add_env(),
                r#"{"cniVersion":"1.0.0","name":"k8s","type":"weft-cni"}"#.into(),
                code::INVALID_CONFIG,
                "prevResult",
            ),
            (
                add_env(),
                good.replace("10.1.200.5/24", "10.1.200.500/24"),
                code::INVALID_CONFIG,
                "bad address",
            ),
            (no_netns, good.clone(), code::INVALID_ENV, "CNI_NETNS"),
            (bad_args, good.clone(), code::INVALID_ENV, "CNI_ARGS"),
            (no_command, good.clone(), code::INVALID_ENV, "CNI_COMMAND"),
            (odd_command, good.clone(), code::INVALID_ENV, "unknown"),
        ];
        // A DEL succeeds even so.
        let mut del = add_env();
        del.insert("CNI_COMMAND".into(), "DEL".into());
        assert!(run(&del, &b"garbage"[..]).success);
        // An unknown command is refused before stdin is read (a terminal
        // would block).
        struct Unreadable;
        impl std::io::Read for Unreadable {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                panic!("stdin read for a command that needs none");
            }
        }
        let mut odd = add_env();
        odd.insert("CNI_COMMAND".into(), "FROB".into());
        assert!(!run(&odd, Unreadable).success);
        for (env, stdin, want_code, want_msg) in cases {
            let out = run(&env, stdin.as_bytes());
            assert!(!out.success, "{env:?}");
            let e: Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(e["code"], want_code, "{e}");
            assert!(e["msg"].as_str().unwrap().contains(want_msg), "{e}");
            assert!(e["details"].is_string() && e["cniVersion"].is_string());
        }
    }

    #[test]
    fn cni_args_parse() {
        let args = parse_args("IgnoreUnknown=1;K8S_POD_NAME=a=b;;").unwrap();
        assert_eq!(args["K8S_POD_NAME"], "a=b");
        assert_eq!(args["IgnoreUnknown"], "1");
        assert!(parse_args("").unwrap().is_empty());
        assert!(parse_args("novalue").is_err());
    }
}
