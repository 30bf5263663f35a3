//! Path normalization, before a request is routed or authorized (Istio's
//! `meshConfig.pathNormalization`, which sets Envoy's `normalize_path`,
//! `merge_slashes` and `path_with_escaped_slashes_action`).
//!
//! The normalized path replaces the request's: routing, authorization and the
//! upstream all see the same one, so a path that a policy did not match is
//! never read as one it would have by the application behind it. This is what
//! Envoy does too; the access log keeps the path as the client sent it.
//!
//! Weft's default is [`Normalization::DecodeAndMergeSlashes`], where Istio's is
//! `BASE`: under `BASE`, `//admin` and `/admin%2F` reach an application that
//! merges slashes or decodes them as `/admin...` while a policy on `/admin*`
//! sees something else. Matching stays case-sensitive, as in Istio: `/ADMIN`
//! is another path (a policy for an application that ignores case must list
//! both). Path parameters (`/admin;x`) are kept, as Envoy keeps them: a prefix
//! (`/admin*`) matches them, an exact `/admin` does not.

use std::fmt::Write as _;

/// How much a path is normalized (Istio's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Normalization {
    /// As sent.
    None,
    /// RFC 3986: percent-encoded unreserved characters decoded (and other
    /// escapes in upper case), `\` read as `/`, `.` and `..` segments
    /// resolved.
    Base,
    /// `Base`, and runs of slashes merged into one.
    MergeSlashes,
    /// `MergeSlashes`, and `%2F` and `%5C` (any case) decoded first, so they
    /// separate segments too.
    #[default]
    DecodeAndMergeSlashes,
}

/// Why a path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A NUL byte, encoded: no application means it, some stop reading there.
    #[error("the path holds an encoded NUL")]
    Nul,
}

/// The normalized form of `path` (an origin-form path, without its query);
/// anything not starting with `/` (`*`, an authority) is left as it is.
pub fn path(path: &str, how: Normalization) -> Result<String, Error> {
    if how == Normalization::None || !path.starts_with('/') {
        return Ok(path.to_owned());
    }
    let decoded = decode(path, how == Normalization::DecodeAndMergeSlashes)?;
    let merge = how != Normalization::Base;
    Ok(remove_dots(&decoded, merge))
}

/// Percent-decodes unreserved characters (and, if `slashes`, `/` and `\`),
/// upper-cases the other escapes, and reads `\` as `/`.
fn decode(path: &str, slashes: bool) -> Result<String, Error> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%'
            && let Some(v) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            i += 3;
            match v {
                0 => return Err(Error::Nul),
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    out.push(char::from(v));
                }
                b'/' | b'\\' if slashes => out.push('/'),
                _ => {
                    let _ = write!(out, "%{v:02X}");
                }
            }
            continue;
        }
        out.push(if b == b'\\' { '/' } else { char::from(b) });
        i += 1;
    }
    Ok(out)
}

/// RFC 3986 5.2.4 over segments, with empty segments (runs of slashes)
/// dropped when `merge`. A `..` above the root stays at the root.
fn remove_dots(path: &str, merge: bool) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = path[1..].split('/').peekable();
    // A last segment of `.` or `..` (or an empty one) leaves a trailing slash.
    let mut trailing = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            "." => trailing = last,
            ".." => {
                segments.pop();
                trailing = last;
            }
            "" if merge || last => trailing = last,
            s => {
                segments.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

/// Normalizes the path of `uri` in place (the query is kept as it is).
pub fn uri(uri: &mut http::Uri, how: Normalization) -> Result<(), Error> {
    let Some(pq) = uri.path_and_query() else {
        return Ok(());
    };
    let normalized = path(pq.path(), how)?;
    if normalized == pq.path() {
        return Ok(());
    }
    let pq = match pq.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = std::mem::take(uri).into_parts();
    // Every byte of the result was in a valid path, or is an escape.
    parts.path_and_query = pq.parse().ok().or(parts.path_and_query);
    *uri = http::Uri::from_parts(parts).unwrap_or_default();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Normalization::*, *};

    #[test]
    fn every_known_way_to_spell_admin_becomes_admin() {
        for spelled in [
            "/admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "/%61%64%6d%69%6e",
            "/a/../admin",
            "/a/b/../../admin",
            "/../admin",
            "/../../admin",
            "/./admin",
            "/%2e/admin",
            "/%2E%2E/admin",
            "/x/%2e%2e/admin",
            "/x/.%2e/admin",
            "//admin",
            "///admin",
            "/\\admin",
            "/%5Cadmin",
            "/%5cadmin",
            "/%2Fadmin",
            "/%2fadmin",
            "/x/..%2Fadmin",
            "/x%2F..%2Fadmin",
            "/x\\..\\admin",
            "/x/%5C..%5Cadmin",
        ] {
            assert_eq!(
                path(spelled, DecodeAndMergeSlashes).unwrap(),
                "/admin",
                "{spelled}"
            );
        }
    }

    #[test]
    fn trailing_slashes_and_dots() {
        let table = [
            ("/", "/"),
            ("/admin/", "/admin/"),
            ("/admin//", "/admin/"),
            ("/admin/.", "/admin/"),
            ("/admin/..", "/"),
            ("/admin/x/..", "/admin/"),
            ("/..", "/"),
            ("/.", "/"),
            ("/a/.b/..c", "/a/.b/..c"),
            ("/a/...", "/a/..."),
        ];
        for (from, want) in table {
            assert_eq!(path(from, DecodeAndMergeSlashes).unwrap(), want, "{from}");
        }
    }

    #[test]
    fn what_each_level_does() {
        let p = "/a//b%2Fc/%7Ed/%41/%3f/../e";
        assert_eq!(path(p, None).unwrap(), p);
        assert_eq!(path(p, Base).unwrap(), "/a//b%2Fc/~d/A/e");
        assert_eq!(path(p, MergeSlashes).unwrap(), "/a/b%2Fc/~d/A/e");
        assert_eq!(path(p, DecodeAndMergeSlashes).unwrap(), "/a/b/c/~d/A/e");
        // Escapes of reserved characters stay, in upper case; a broken escape
        // stays as it is.
        assert_eq!(path("/a%3b%3Fb%zz%4", Base).unwrap(), "/a%3B%3Fb%zz%4");
        // No double decoding: `%25` is `%`, and stays encoded.
        assert_eq!(
            path("/%2561dmin", DecodeAndMergeSlashes).unwrap(),
            "/%2561dmin"
        );
        assert_eq!(path("/%252F", DecodeAndMergeSlashes).unwrap(), "/%252F");
    }

    #[test]
    fn case_and_parameters_are_kept() {
        assert_eq!(path("/ADMIN", DecodeAndMergeSlashes).unwrap(), "/ADMIN");
        assert_eq!(path("/admin;x", DecodeAndMergeSlashes).unwrap(), "/admin;x");
        assert_eq!(
            path("/admin%3Bx", DecodeAndMergeSlashes).unwrap(),
            "/admin%3Bx"
        );
    }

    #[test]
    fn an_encoded_nul_is_refused() {
        assert_eq!(path("/admin%00", Base), Err(Error::Nul));
        assert_eq!(path("/admin%00", DecodeAndMergeSlashes), Err(Error::Nul));
        assert_eq!(path("/admin%00", None).unwrap(), "/admin%00");
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in [
            "/a//..//admin",
            "/a/%2e%2e%2f%2e%2e/admin",
            "/%2F/%2F..%5C..",
            "/x/./y/../../z//",
            "/%2541",
        ] {
            let once = path(p, DecodeAndMergeSlashes).unwrap();
            assert_eq!(path(&once, DecodeAndMergeSlashes).unwrap(), once, "{p}");
        }
    }

    #[test]
    fn the_query_is_kept_and_other_forms_are_left_alone() {
        let mut u: http::Uri = "/a/../b%2Fc?x=%2F..&y".parse().unwrap();
        uri(&mut u, DecodeAndMergeSlashes).unwrap();
        assert_eq!(u, "/b/c?x=%2F..&y");
        let mut u: http::Uri = "http://h:8080//a/./b".parse().unwrap();
        uri(&mut u, DecodeAndMergeSlashes).unwrap();
        assert_eq!(u, "http://h:8080/a/b");
        assert_eq!(path("*", DecodeAndMergeSlashes).unwrap(), "*");
    }
}
