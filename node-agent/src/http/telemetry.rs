//! Request telemetry: Istio's request metrics and the access log.

/// The metrics page.
pub fn render() -> String {
    String::new()
}
