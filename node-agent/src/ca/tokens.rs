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
            if token.len() < MIN_TOKEN_LEN || token.len() > MAX_TOKEN_LEN {
                problems.push(format!(
                    "{node}: the token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters"
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push(format!(
                    "{node}: the token must be printable ASCII without spaces"
                ));
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
