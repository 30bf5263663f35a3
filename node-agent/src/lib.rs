//! Weft: a sidecarless service mesh. This crate is the `weft` binary's library:
//! every role (node agent, CA; waypoint and gateway to come) and what they share.
//! ARCHITECTURE.md has the map: each folder, what lives there, and what it may
//! import (a test in `xtask` holds the code to it).
//!
//! - `app/`: one wiring file per role; `cli`: flags.
//! - `model/`: the mesh model, whatever its source; `discovery/`: its sources
//!   (the local file, watched).
//! - `view`, `authz`, `lb`: the model compiled for the data path.
//! - `http/`: L7 routing and filters (Gateway API), pure, for the waypoint.
//! - `node/`: the agent's pods and their listeners; `ebpf`: the kernel capture.
//! - `hbone/`: the HBONE protocol (client pool, server, headers, stream copy).
//! - `net/`: sockets in pod namespaces, byte copies, buffers.
//! - `ca/`: the CA; `certs`, `tls`, `identity`: certificates and identities.
//! - `admin`, `metrics`, `stats`, `telemetry`: operators' endpoints, metrics, logs.
//! - `workers`: the data-path threads.
//! - `cni`: the chained CNI plugin (`weft cni`) and its install; the agent's
//!   side of its socket is `node::cni`.

pub mod admin;
pub mod app;
pub mod authz;
pub mod ca;
pub mod certs;
pub mod cli;
pub mod cni;
pub mod discovery;
pub mod ebpf;
pub mod grpc;
pub mod hbone;
pub mod http;
pub mod identity;
pub mod jwk;
pub mod lb;
pub mod metrics;
pub mod model;
pub mod net;
pub mod node;
pub mod stats;
pub mod telemetry;
pub mod tls;
pub mod units;
pub mod view;
pub mod waypoint;
pub mod workers;
pub mod yaml;
