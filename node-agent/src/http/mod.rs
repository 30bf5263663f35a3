//! The L7 engine, shared by every L7 front (the waypoint now, the edge gateway
//! later). `route` compiles a parent Service's HTTPRoutes and GRPCRoutes into a
//! table and picks the rule a request matches; `filter` holds the filters a
//! rule applies (both pure functions over `http` types, unit-tested against the
//! Gateway API's conformance cases); `jwt` authenticates requests (Istio's
//! RequestAuthentication); `upstream` holds the pooled connections to
//! endpoints; `engine` runs a request through them; `telemetry` records it
//! (`otlp` exports its spans).
//! `normalize` makes a path canonical before anything reads it; `authz`
//! holds the policies attached to waypoints (Istio's AuthorizationPolicy at
//! L7, external authorization included); `ratelimit` the rate limits (GCRA,
//! local or shared in Redis).
//! Nothing here knows how a request arrived: the fronts (`waypoint`) hand it
//! over with what they know of its source.

pub mod authz;
pub mod engine;
pub mod extauthz;
pub mod filter;
pub mod jwt;
pub mod normalize;
pub mod otlp;
pub mod ratelimit;
pub mod route;
pub mod telemetry;
pub mod upstream;

use bytes::Bytes;

/// Errors of bodies, whatever side they come from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the engine handles: streamed from a peer or made here.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;
