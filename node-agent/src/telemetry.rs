//! Logging. `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` writes one JSON
//! object per line with the event's fields at the top level, for machines.
//!
//! Access logs are events with target `weft::access`, one per connection.

use tracing_subscriber::EnvFilter;

/// Target of the per-connection access log events.
pub const ACCESS_LOG: &str = "weft::access";

pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}
