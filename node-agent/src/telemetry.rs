//! Logging. `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` writes one JSON
//! object per line with the event's fields at the top level, for machines.
//!
//! Access logs are events with target `weft::access`, one per connection.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::EnvFilter;

/// Target of the per-connection access log events.
pub const ACCESS_LOG: &str = "weft::access";

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the log filter at run time (the admin endpoint's `/logging`).
static RELOAD: OnceLock<Reload> = OnceLock::new();
/// The filter in force, as text.
static CURRENT: Mutex<String> = Mutex::new(String::new());

pub fn init_logging() {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = filter.to_string();
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stdout);
    if json {
        let builder = builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    } else {
        let builder = builder.with_env_filter(filter).with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    }
}

/// The log filter in force (`RUST_LOG` syntax).
pub fn log_filter() -> String {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Replaces the log filter: `debug`, `info,weft::access=off`, ...
pub fn set_log_filter(directives: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(directives).map_err(|e| format!("{directives:?}: {e}"))?;
    let text = filter.to_string();
    let reload = RELOAD.get().ok_or("logging is not set up")?;
    reload(filter)?;
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = text;
    Ok(())
}
