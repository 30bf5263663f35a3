//! The node-token file: the local-mode stand-in for Kubernetes' projected
//! service-account tokens. An agent presents its node's token to the CA as
//! `authorization: Bearer <token>`; the CA learns from it which node is asking.
//!
//! ```yaml
//! node-a: 3f9c0e1d6b2a4e8f9a7c5d3b1e0f2a4c
//! node-b: 8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d
//! ```
//!
//! Parsing is strict: one map of strings, every node once, tokens of
//! [`MIN_TOKEN_LEN`] to 4096 printable ASCII characters, no token shared by two
//! nodes (it would prove neither).
//!
//! An agent's own token file (`--ca-token-file`) holds the token alone, taken
//! byte for byte: one final `\n` is the file's line ending (what `echo` writes)
//! and is dropped; anything else, a space, a tab, a `\r` or a second newline, is
//! part of what the file says and fails the token rules, so the agent refuses to
//! start rather than send something that is not the token. The CA compares a
//! presented token exactly, in constant time: nothing is trimmed.
//!
//! Token files are secrets: whoever reads a node's token gets that node's
//! identities. Both kinds are written `0600`; one that others may read is
//! loaded, with a warning that says so.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use ring::hmac;

/// Tokens shorter than this are refused (guessable).
pub const MIN_TOKEN_LEN: usize = 16;
const MAX_TOKEN_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("node tokens {path}: {message}")]
pub struct Error {
    pub path: PathBuf,
    pub message: String,
}

/// Which bearer token proves which node.
///
/// Tokens are kept only as HMACs under a key made at load, and a presented token
/// is checked against every node with `ring`'s constant-time tag comparison, so
/// the time taken does not tell how much of a token matched, or whose it was.
pub struct NodeTokens {
    key: hmac::Key,
    nodes: Vec<(String, hmac::Tag)>,
}

impl NodeTokens {
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// Parses a token file's text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let bad = |message: String| Error {
            path: path.to_owned(),
            message,
        };
        let Entries(map) = crate::yaml::from_str(text)
            .map_err(|e| bad(format!("{e} (expected a map of `node-name: token`)")))?;
        if map.is_empty() {
            return Err(bad(
                "names no node (expected `node-name: token` lines)".into()
            ));
        }
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| bad("no randomness for the token key".into()))?;
        let mut problems = Vec::new();
        let mut nodes: Vec<(String, hmac::Tag)> = Vec::new();
        let mut seen = HashMap::new();
        for (node, token) in &map {
            if node.is_empty() || node.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(format!("node name {node:?} is empty or has whitespace"));
            }
            if let Err(e) = check_token(token) {
                problems.push(format!("{node}: {e}"));
            }
            if nodes.iter().any(|(n, _)| n == node) {
                problems.push(format!("{node}: listed twice"));
            }
            if let Some(other) = seen.insert(token.as_str(), node.as_str()) {
                problems.push(format!("{node}: same token as {other}"));
            }
            nodes.push((node.clone(), hmac::sign(&key, token.as_bytes())));
        }
        if !problems.is_empty() {
            return Err(bad(problems.join("; ")));
        }
        Ok(NodeTokens { key, nodes })
    }

    /// How many nodes have a token.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node `token` belongs to. Every node's tag is checked, match or not.
    pub fn node_for(&self, token: &[u8]) -> Option<String> {
        let mut found = None;
        for (node, tag) in &self.nodes {
            if hmac::verify(&self.key, token, tag.as_ref()).is_ok() {
                found = Some(node);
            }
        }
        found.cloned()
    }
}

/// The token rules, for the CA's file and an agent's alike.
fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN || token.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "the token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters"
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// An agent's token file (`--ca-token-file`): the token exactly, and at most one
/// final `\n`.
pub fn read_token_file(path: &Path) -> Result<String, Error> {
    let bad = |message: String| Error {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.strip_suffix('\n').unwrap_or(&text);
    check_token(token).map_err(|e| {
        bad(format!(
            "{e} (the file holds the token alone, byte for byte, and at most one final \
             newline; nothing is trimmed)"
        ))
    })?;
    Ok(token.to_owned())
}

/// Why a token file is not private (`Some`: others than its owner may read or
/// write it), for a warning.
pub fn loose_permissions(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} is mode {mode:04o}: others may read the node token(s) in it \
             (chmod 600 it)",
            path.display()
        )
    })
}

/// `node`'s token in a node-token file: what an agent with an embedded CA uses
/// to authenticate to it, as any other node does.
pub fn token_of(path: &Path, node: &str) -> Result<String, Error> {
    let bad = |message: String| Error {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let Entries(map) = crate::yaml::from_str(&text)
        .map_err(|e| bad(format!("{e} (expected a map of `node-name: token`)")))?;
    map.into_iter()
        .find(|(n, _)| n == node)
        .map(|(_, t)| t)
        .ok_or_else(|| bad(format!("has no token for node {node:?}")))
}

/// The entries of a YAML map of strings, in file order, duplicates kept (a map
/// type would silently keep only the last of two entries for a node).
struct Entries(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of node names to tokens")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N1: &str = "n1-token-0123456789abcdef";
    const N2: &str = "n2-token-0123456789abcdef";

    #[test]
    fn node_token_files_are_strict() {
        let parse = |text: &str| NodeTokens::parse(Path::new("tokens.yaml"), text);
        let ok = parse(&format!("n1: {N1}\nn2: {N2}\n")).unwrap();
        assert_eq!(ok.node_for(N1.as_bytes()).as_deref(), Some("n1"));
        assert_eq!(ok.node_for(N2.as_bytes()).as_deref(), Some("n2"));
        assert_eq!(ok.node_for(b"n1-token-0123456789abcde"), None);
        assert_eq!(ok.node_for(b""), None);
        for (text, why) in [
            ("", "empty"),
            ("{}", "no node"),
            ("- n1\n", "a list"),
            ("n1: short\n", "short token"),
            (&format!("n1: {N1}\nn2: {N1}\n"), "shared token"),
            (&format!("n1: {N1}\nn1: {N2}\n"), "duplicate node"),
            ("n1: \"0123456789 abcdefgh\"\n", "space in the token"),
            (&format!("n1: {{a: {N1}}}\n"), "not a string"),
        ] {
            assert!(parse(text).is_err(), "accepted {why}: {text:?}");
        }
    }

    #[test]
    fn presented_tokens_match_exactly() {
        let tokens = NodeTokens::parse(Path::new("t"), &format!("n1: {N1}\n")).unwrap();
        for near in [
            format!("{N1} "),
            format!(" {N1}"),
            format!("{N1}\n"),
            format!("{N1}\t"),
            N1.to_uppercase(),
        ] {
            assert_eq!(tokens.node_for(near.as_bytes()), None, "{near:?}");
        }
        assert_eq!(tokens.node_for(N1.as_bytes()).as_deref(), Some("n1"));
    }

    #[test]
    fn an_agent_token_file_is_the_token_and_one_line_ending_at_most() {
        let path = std::env::temp_dir().join(format!("weft-token-{}", std::process::id()));
        let read = |text: &str| {
            std::fs::write(&path, text).unwrap();
            read_token_file(&path)
        };
        let got = [
            read(N1),
            read(&format!("{N1}\n")),
            read(&format!("{N1} ")),
            read(&format!("{N1} \n")),
            read(&format!("{N1}\n\n")),
            read(&format!("{N1}\r\n")),
            read(&format!(" {N1}")),
            read(&format!("{N1}\n{N2}\n")),
        ];
        let _ = std::fs::remove_file(&path);
        assert_eq!(got[0].as_deref().unwrap(), N1);
        assert_eq!(
            got[1].as_deref().unwrap(),
            N1,
            "echo's newline is no part of it"
        );
        for (i, r) in got.iter().enumerate().skip(2) {
            let e = r
                .as_ref()
                .err()
                .unwrap_or_else(|| panic!("case {i}: accepted"));
            assert!(e.to_string().contains("nothing is trimmed"), "{e}");
        }
    }

    #[test]
    fn token_files_others_can_read_are_named() {
        use std::os::unix::fs::PermissionsExt as _;
        let path = std::env::temp_dir().join(format!("weft-token-mode-{}", std::process::id()));
        std::fs::write(&path, N1).unwrap();
        let mode = |m: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
            loose_permissions(&path)
        };
        let (private, owner_ro, world, group) =
            (mode(0o600), mode(0o400), mode(0o644), mode(0o640));
        let _ = std::fs::remove_file(&path);
        assert_eq!((private, owner_ro), (None, None));
        assert!(world.unwrap().contains("mode 0644"));
        assert!(group.is_some());
    }

    #[test]
    fn an_embedded_ca_agent_finds_its_own_token() {
        let path = std::env::temp_dir().join(format!("weft-tokens-{}", std::process::id()));
        std::fs::write(&path, format!("n1: {N1}\nn2: {N2}\n")).unwrap();
        let got = (token_of(&path, "n2"), token_of(&path, "n3"));
        let _ = std::fs::remove_file(&path);
        assert_eq!(got.0.unwrap(), N2);
        let err = got.1.unwrap_err().to_string();
        assert!(err.contains("no token for node \"n3\""), "{err}");
    }
}
