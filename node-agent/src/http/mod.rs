//! The L7 engine, shared by every L7 front (the waypoint now, the edge gateway
//! later): compiled routes and filters, the upstream connections, and the
//! engine that runs a request through them. Nothing here knows how a request
//! arrived; the fronts (`waypoint`) hand it over with what they know of its
//! source.

pub mod engine;
pub mod telemetry;
pub mod upstream;

use bytes::Bytes;

/// Errors of bodies, whatever side they come from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the engine handles: streamed from a peer or made here.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;
