//! L7: what the waypoint does to an HTTP request, as pure functions over `http`
//! types (no I/O, so every rule is unit-tested against the Gateway API's
//! conformance cases). `route` compiles a parent Service's HTTPRoutes and
//! GRPCRoutes into a table and picks the rule a request matches; `filter`
//! holds the filters a rule applies. The waypoint process (HBONE front, server,
//! upstream pools) calls them; it lives elsewhere.

pub mod filter;
pub mod route;
