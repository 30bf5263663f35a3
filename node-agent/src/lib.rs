//! Weft: a sidecarless service mesh. This crate is the `weft` binary's library: the
//! node agent (eBPF capture, per-pod listeners, the proxy), and the roles to come
//! (CA, waypoint, gateway).
//!
//! Layout: `cli` (flags), `app` (wires a role together), `config` (the mesh model
//! and its file), `ebpf` (loading, pinning, typed maps: nobody else sees map names),
//! `netns` (entering pod namespaces), `identity` (SPIFFE IDs), `ca` (signing
//! workload certificates on CSR), `agent` (the set of enrolled pods), `proxy`
//! (listeners and the byte copy), `telemetry` (logs).

pub mod admin;
pub mod agent;
pub mod app;
pub mod authz;
pub mod ca;
pub mod certs;
pub mod cli;
pub mod config;
pub mod ebpf;
pub mod hbone;
pub mod identity;
pub mod lb;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod stats;
pub mod telemetry;
pub mod tls;
pub mod view;
pub mod workers;
