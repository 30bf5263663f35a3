//! What `weft cni` and the agent say to each other over the agent's Unix
//! socket: one request and one answer per connection, each a JSON object on
//! one line, at most [`MAX_MESSAGE`] bytes. Both sides read with that cap, so
//! a peer that never sends a newline costs a bounded buffer and a timeout.
//!
//! Across an upgrade the new plugin (installed by the new agent pod's init
//! container) talks to the old agent until the new one is ready and takes the
//! socket (`app::succession`). The agent refuses unknown fields, so a release
//! must not send the previous release a field it does not know: a new field is
//! sent only once the agents that read it have rolled out (an answer the old
//! agent refuses fails the ADD, and the runtime retries it: fail closed, for
//! those seconds).

use std::{io, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The largest request or answer, newline included.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Where the agent listens unless told otherwise (`--cni-socket`, and the
/// plugin's `agent_socket`).
pub const DEFAULT_SOCKET: &str = "/var/run/weft/cni.sock";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Add,
    Del,
    Check,
    /// CNI 1.1 STATUS: may pods be added now? (No pod.)
    Status,
    /// CNI 1.1 GC: release every sandbox but [`Request::valid`]. (No pod.)
    Gc,
}

impl Command {
    /// Whether the request names a pod and a sandbox.
    pub fn of_a_pod(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

/// The pod, as the container runtime names it (`K8S_POD_*` in `CNI_ARGS`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub command: Command,
    /// Empty for STATUS and GC.
    #[serde(default)]
    pub pod: PodRef,
    /// The sandbox's id: a DEL for an older sandbox of the same pod must not
    /// release a newer one. Empty for STATUS and GC.
    #[serde(default)]
    pub container_id: String,
    /// The sandbox's network namespace; a DEL may come without one (spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The addresses the plugins before this one gave the pod.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// For GC: the sandboxes the runtime still has (their container ids).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid: Vec<String>,
}

/// The agent's answer. Keys it does not know are ignored, so a newer agent
/// may say more to an older plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The pod is captured: its listeners are up and its namespace is in the
    /// capture maps.
    Enrolled,
    /// The mesh does not capture this pod: it may start as it is.
    NotMeshed,
    /// A DEL or GC was taken in.
    Released,
    /// STATUS: pods may be added.
    Ready,
    /// The agent has no model yet: try again later.
    NotReady,
    /// The pod cannot be enrolled (now): it must not start.
    Refused { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the message is larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("the connection closed before a whole message arrived")]
    Truncated,
    #[error("not a valid message: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One message as sent: its JSON and a newline.
pub fn encode(message: &impl Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec(message).unwrap_or_default();
    out.push(b'\n');
    out
}

/// A message from the bytes up to its newline (which must be there: a
/// message cut short by a closed connection is refused, not half-read).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let line = bytes
        .strip_suffix(b"\n")
        .ok_or(if bytes.len() >= MAX_MESSAGE {
            Error::TooLarge
        } else {
            Error::Truncated
        })?;
    if line.len() >= MAX_MESSAGE {
        return Err(Error::TooLarge);
    }
    Ok(serde_json::from_slice(line)?)
}

/// Reads one message from a blocking reader (the plugin's side), at most
/// [`MAX_MESSAGE`] bytes whatever the peer sends.
pub fn read<T: DeserializeOwned>(reader: impl io::Read) -> Result<T, Error> {
    use io::BufRead as _;
    let mut buf = Vec::new();
    io::BufReader::new(reader.take(MAX_MESSAGE as u64)).read_until(b'\n', &mut buf)?;
    decode(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add() -> Request {
        Request {
            command: Command::Add,
            pod: PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: Some("0f1e".into()),
            },
            container_id: "abc".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            ips: vec!["10.1.2.3".parse().unwrap(), "fd00::3".parse().unwrap()],
            valid: Vec::new(),
        }
    }

    #[test]
    fn requests_and_answers_round_trip() {
        let req = add();
        assert_eq!(decode::<Request>(&encode(&req)).unwrap(), req);
        let gc = Request {
            command: Command::Gc,
            pod: PodRef::default(),
            container_id: String::new(),
            netns: None,
            ips: Vec::new(),
            valid: vec!["abc".into(), "def".into()],
        };
        assert_eq!(decode::<Request>(&encode(&gc)).unwrap(), gc);
        assert_eq!(
            decode::<Request>(b"{\"command\":\"status\"}\n")
                .unwrap()
                .command,
            Command::Status
        );
        for resp in [
            Response::Enrolled,
            Response::NotMeshed,
            Response::Released,
            Response::Ready,
            Response::NotReady,
            Response::Refused {
                reason: "no".into(),
            },
        ] {
            assert_eq!(decode::<Response>(&encode(&resp)).unwrap(), resp);
        }
        assert_eq!(
            String::from_utf8(encode(&Response::Enrolled)).unwrap(),
            "{\"result\":\"enrolled\"}\n"
        );
    }

    #[test]
    fn bad_messages_are_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "closed before"),
            (b"{\"result\":\"enrolled\"}", "closed before"),
            (b"garbage\n", "not a valid message"),
            (b"{\"result\":\"maybe\"}\n", "not a valid message"),
            (b"[1,2]\n", "not a valid message"),
        ];
        for (bytes, want) in cases {
            let err = decode::<Response>(bytes).unwrap_err().to_string();
            assert!(err.contains(want), "{bytes:?}: {err}");
        }
        // A request with a field misspelled, or an address that is not one.
        let text = String::from_utf8(encode(&add())).unwrap();
        for bad in [
            text.replace("container_id", "containerid"),
            text.replace("10.1.2.3", "10.1.2.300"),
            text.replace("\"add\"", "\"ADD\""),
        ] {
            assert!(decode::<Request>(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_stop_at_the_cap() {
        // A peer that sends a megabyte without a newline is cut at the cap.
        let flood = vec![b'x'; 1 << 20];
        let err = read::<Response>(&flood[..]).unwrap_err();
        assert!(matches!(err, Error::TooLarge), "{err}");
        // Exactly what fits is read, and what follows the newline is not.
        let mut two = encode(&Response::NotMeshed);
        two.extend(encode(&Response::Enrolled));
        assert_eq!(read::<Response>(&two[..]).unwrap(), Response::NotMeshed);
    }
}
