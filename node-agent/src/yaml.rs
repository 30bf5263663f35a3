//! The one way Weft reads YAML (the mesh file, the node-token file): serde-saphyr,
//! a maintained, panic-free parser, strict where YAML is loose.
//!
//! - Booleans are `true`/`false` only: `enrolled: no` or `on` is an error, not a
//!   guess (YAML 1.1's spellings turned `NO`, Norway's code, into `false`).
//! - A key given twice in one mapping is an error (the second would silently win).
//! - Aliases, nesting and events are bounded by the parser's budget, so a small
//!   file cannot expand into gigabytes ("billion laughs").
//! - Errors are one line: `line 4 column 3: unknown field ...`.

use serde::de::DeserializeOwned;

/// Parses `text` into `T`; the error is one line with the location.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let options = serde_saphyr::options! {
        strict_booleans: true,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options(text, options).map_err(|e| one_line(&e.to_string()))
}

/// The first line of a message, without the `error: ` prefix the parser adds.
fn one_line(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message);
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}
