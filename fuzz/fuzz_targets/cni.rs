//! What reaches the CNI path from outside: a request on the agent's socket,
//! the network config a runtime hands `weft-cni` on stdin, and a conflist
//! `weft cni install` edits. Any bytes must give a value or an error.
#![no_main]

use std::{collections::BTreeMap, path::Path};

use libfuzzer_sys::fuzz_target;
use weft::cni::{install, plugin, proto};

fuzz_target!(|data: &[u8]| {
    let _ = proto::decode::<proto::Request>(data);
    let _ = proto::decode::<proto::Response>(data);
    // A sandbox that is no Kubernetes pod: the whole config is read and
    // checked, and nothing is sent anywhere (a fuzzed `agent_socket` must not
    // reach a real socket).
    let env: BTreeMap<String, String> = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "fuzz"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let out = plugin::run(&env, data);
    assert!(out.success || out.stdout.contains("\"code\""));
    if let Ok(text) = std::str::from_utf8(data) {
        let entry = install::Entry {
            agent_socket: "/run/weft/cni.sock".into(),
            exclude_namespaces: vec![],
        };
        let _ = install::with_entry(Path::new("fuzz.conflist"), text, Some(&entry));
        let _ = install::with_entry(Path::new("fuzz.conflist"), text, None);
    }
});
