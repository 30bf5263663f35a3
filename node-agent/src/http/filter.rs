//! The Gateway API's filters, compiled from the model and applied as pure
//! functions over `http` types: header modifiers (request and response),
//! redirects, URL rewrites and CORS. What each may change: a header modifier
//! only the headers it names; a rewrite the path, the Host header and the URI's
//! authority; a redirect and a CORS preflight answer the request themselves (the
//! caller sends their response and forwards nothing).
//!
//! Values were checked by `model::validate`; compiling skips what would still
//! not convert, so a request never panics on configuration.

use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri,
    header::{self, HOST, LOCATION},
    request::Parts,
};

use crate::model::route;

/// Gateway API `HTTPHeaderFilter`, compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn compile(f: &route::HttpHeaderFilter) -> Self {
        let pairs = |list: &[route::HttpHeader]| {
            list.iter()
                .filter_map(|h| {
                    Some((
                        HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                        HeaderValue::from_str(&h.value).ok()?,
                    ))
                })
                .collect()
        };
        HeaderModifier {
            set: pairs(&f.set),
            add: pairs(&f.add),
            remove: f
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    /// Set replaces every value of a header; add appends to the values there
    /// are, comma-joined into one line as the spec's example shows (`foo,bar`),
    /// except `set-cookie`, which cannot be joined; remove drops every value.
    /// Names compare case-insensitively (`HeaderName` is lowercase).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            if name == header::SET_COOKIE || !headers.contains_key(name) {
                headers.append(name.clone(), value.clone());
                continue;
            }
            let mut joined = Vec::new();
            for v in headers.get_all(name) {
                joined.extend_from_slice(v.as_bytes());
                joined.push(b',');
            }
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                headers.insert(name.clone(), v);
            }
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// Gateway API `HTTPPathModifier`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

impl PathModifier {
    pub fn compile(m: &route::HttpPathModifier) -> Self {
        match m.kind {
            route::HttpPathModifierType::ReplaceFullPath => {
                PathModifier::ReplaceFullPath(m.replace_full_path.clone().unwrap_or_default())
            }
            route::HttpPathModifierType::ReplacePrefixMatch => {
                PathModifier::ReplacePrefixMatch(m.replace_prefix_match.clone().unwrap_or_default())
            }
        }
    }

    /// The new path for `path`, which matched `matched_prefix`.
    fn apply(&self, path: &str, matched_prefix: Option<&str>) -> String {
        match self {
            PathModifier::ReplaceFullPath(p) => p.clone(),
            PathModifier::ReplacePrefixMatch(with) => match matched_prefix {
                Some(prefix) => replace_prefix(path, prefix, with),
                None => path.to_owned(),
            },
        }
    }
}

/// Replaces the path elements `prefix` matched with `with`, as the spec's table
/// says: trailing slashes of both are ignored, the rest of the path is kept,
/// and an empty result is `/` (`/foo/bar`, `/foo`, `` → `/bar`; `/foo`, `/foo`,
/// `/` → `/`).
pub fn replace_prefix(path: &str, prefix: &str, with: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let Some(rest) = path.strip_prefix(prefix) else {
        return path.to_owned();
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return path.to_owned();
    }
    let mut out = with.trim_end_matches('/').to_owned();
    out.push_str(rest);
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    out
}

/// Gateway API `HTTPRequestRedirectFilter`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: StatusCode,
}

impl Redirect {
    pub fn compile(r: &route::HttpRequestRedirectFilter) -> Self {
        Redirect {
            scheme: r.scheme.clone(),
            hostname: r.hostname.clone(),
            path: r.path.as_ref().map(PathModifier::compile),
            port: r.port,
            status: StatusCode::from_u16(r.status_code).unwrap_or(StatusCode::FOUND),
        }
    }
}

/// The redirect's response: its status and a `Location` built from the request
/// and the filter. `listener_port` is the service port the request came to (a
/// mesh's "listener"). The port follows the spec: the filter's; else the
/// scheme's well-known port when the filter changes the scheme; else the
/// listener's; and it is left out when it is the scheme's well-known one.
pub fn redirect(
    r: &Redirect,
    req: &Parts,
    matched_prefix: Option<&str>,
    listener_port: u16,
) -> Response<()> {
    let scheme = r
        .scheme
        .as_deref()
        .or(req.uri.scheme_str())
        .unwrap_or("http");
    let host = r
        .hostname
        .as_deref()
        .unwrap_or_else(|| split_port(request_host(req)).0);
    let port = r.port.unwrap_or(match r.scheme.as_deref() {
        Some("https") => 443,
        Some("http") => 80,
        _ => listener_port,
    });
    let path = match &r.path {
        Some(m) => m.apply(req.uri.path(), matched_prefix),
        None => req.uri.path().to_owned(),
    };
    let mut location = format!("{scheme}://{host}");
    if !matches!((scheme, port), ("http", 80) | ("https", 443)) {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(&path);
    if let Some(q) = req.uri.query() {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = Response::new(());
    *resp.status_mut() = r.status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}

/// The request's host as the client wrote it: the URI's authority (HTTP/2's
/// `:authority`, or an absolute-form target), else the Host header.
fn request_host(req: &Parts) -> &str {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("")
}

/// `host:port` → (`host`, Some(port)); brackets of an IPv6 literal stay.
fn split_port(hostport: &str) -> (&str, Option<&str>) {
    match hostport.rfind(':') {
        Some(i) if !hostport[i..].contains(']') => (&hostport[..i], Some(&hostport[i + 1..])),
        _ => (hostport, None),
    }
}

/// Gateway API `HTTPURLRewriteFilter`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlRewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

impl UrlRewrite {
    pub fn compile(r: &route::HttpUrlRewriteFilter) -> Self {
        UrlRewrite {
            hostname: r
                .hostname
                .as_deref()
                .and_then(|h| HeaderValue::from_str(h).ok()),
            path: r.path.as_ref().map(PathModifier::compile),
        }
    }
}

/// Rewrites the request before it is forwarded: the hostname replaces the Host
/// header and the URI's authority (which HTTP/2 sends as `:authority`); the path
/// is replaced whole or by prefix, and the query is kept.
pub fn rewrite(r: &UrlRewrite, req: &mut Parts, matched_prefix: Option<&str>) {
    let mut uri = std::mem::take(&mut req.uri).into_parts();
    if let Some(host) = &r.hostname {
        req.headers.insert(HOST, host.clone());
        if uri.authority.is_some() {
            uri.authority = host.to_str().ok().and_then(|h| h.parse().ok());
        }
    }
    if let Some(m) = &r.path {
        let old = uri.path_and_query.as_ref();
        let path = m.apply(old.map_or("/", |p| p.path()), matched_prefix);
        let new = match old.and_then(|p| p.query()) {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        if let Ok(pq) = new.parse() {
            uri.path_and_query = Some(pq);
        }
    }
    // The parts came from a valid URI and changed only in valid pieces.
    req.uri = Uri::from_parts(uri).unwrap_or_default();
}

/// Gateway API `HTTPCORSFilter` (GEP-1767), compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// `None`: any origin (`*`).
    origins: Option<Vec<OriginPattern>>,
    credentials: bool,
    /// `None`: any method (`*`).
    methods: Option<String>,
    /// `None`: any header (`*`).
    headers: Option<String>,
    expose: Option<String>,
    max_age: HeaderValue,
}

/// `scheme://host[:port]`, where the host may start with `*` (a greedy match of
/// any labels to its left).
#[derive(Debug, Clone, PartialEq, Eq)]
struct OriginPattern {
    scheme: String,
    /// Lowercase; `*.example.com` keeps the `*`.
    host: String,
    port: u16,
}

/// (scheme, lowercase host, port with the scheme's default) of an origin.
fn parse_origin(origin: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = origin.split_once("://")?;
    let default = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let (host, port) = match split_port(rest) {
        (h, Some(p)) => (h, p.parse().ok()?),
        (h, None) => (h, default),
    };
    Some((scheme.to_owned(), host.to_ascii_lowercase(), port))
}

impl OriginPattern {
    fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.scheme == scheme
            && self.port == port
            && match self.host.strip_prefix('*') {
                Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
                None => self.host == host,
            }
    }
}

const CORS_SAFELISTED: [&str; 3] = ["GET", "HEAD", "POST"];

impl Cors {
    pub fn compile(c: &route::HttpCorsFilter) -> Self {
        let any = |list: &[String]| list.iter().any(|v| v == "*");
        let join = |list: &[String]| (!list.is_empty()).then(|| list.join(", "));
        Cors {
            origins: (!any(&c.allow_origins)).then(|| {
                c.allow_origins
                    .iter()
                    .filter_map(|o| {
                        let (scheme, host, port) = parse_origin(o)?;
                        Some(OriginPattern { scheme, host, port })
                    })
                    .collect()
            }),
            credentials: c.allow_credentials == Some(true),
            methods: if any(&c.allow_methods) {
                None
            } else {
                Some(join(&c.allow_methods).unwrap_or_default())
            },
            headers: if any(&c.allow_headers) {
                None
            } else {
                Some(join(&c.allow_headers).unwrap_or_default())
            },
            expose: join(&c.expose_headers),
            max_age: HeaderValue::from(c.max_age.max(0)),
        }
    }

    /// The request's Origin, if this filter allows it.
    fn allowed_origin<'r>(&self, req: &'r Parts) -> Option<&'r HeaderValue> {
        let origin = req.headers.get(header::ORIGIN)?;
        let Some(patterns) = &self.origins else {
            return Some(origin);
        };
        let (scheme, host, port) = parse_origin(origin.to_str().ok()?)?;
        patterns
            .iter()
            .any(|p| p.matches(&scheme, &host, port))
            .then_some(origin)
    }

    /// The `Access-Control-Allow-Origin` value: `*` only when any origin is
    /// allowed without credentials, else the request's own Origin (the spec
    /// forbids `*` with credentials).
    fn allow_origin_value(&self, origin: &HeaderValue) -> HeaderValue {
        if self.origins.is_none() && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    /// The answer to a CORS preflight (OPTIONS with Origin and
    /// Access-Control-Request-Method), which the waypoint sends instead of
    /// forwarding; `None` for any other request. A disallowed origin gets a 200
    /// without CORS headers, so the browser refuses the actual request (one of
    /// the spec's two choices; the other is 403).
    pub fn preflight(&self, req: &Parts) -> Option<Response<()>> {
        if req.method != Method::OPTIONS
            || !req.headers.contains_key(header::ORIGIN)
            || !req
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let mut resp = Response::new(());
        let Some(origin) = self.allowed_origin(req) else {
            return Some(resp);
        };
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin_value(origin),
        );
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        let requested_method = req.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD);
        let methods = match &self.methods {
            Some(m) if m.is_empty() => None,
            Some(m) => HeaderValue::from_str(m).ok(),
            // `*` may not be sent with credentials: echo the method asked for.
            None if self.credentials => requested_method.cloned(),
            None => Some(HeaderValue::from_static("*")),
        };
        if let Some(m) = methods {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, m);
        } else if let Some(m) = requested_method
            && m.to_str().is_ok_and(|m| CORS_SAFELISTED.contains(&m))
        {
            // Safelisted methods are always allowed.
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, m.clone());
        }
        let headers = match &self.headers {
            Some(v) if v.is_empty() => None,
            Some(v) => HeaderValue::from_str(v).ok(),
            None if self.credentials => req
                .headers
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned(),
            None => Some(HeaderValue::from_static("*")),
        };
        if let Some(v) = headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        self.expose_headers(h);
        h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        Some(resp)
    }

    /// Adds the CORS headers to the response of an actual (not preflight)
    /// cross-origin request from an allowed origin; leaves others untouched.
    pub fn apply_response(&self, req: &Parts, resp: &mut HeaderMap) {
        let Some(origin) = self.allowed_origin(req) else {
            return;
        };
        resp.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin_value(origin),
        );
        if self.credentials {
            resp.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        self.expose_headers(resp);
    }

    fn expose_headers(&self, h: &mut HeaderMap) {
        // `*` means nothing to a browser when credentials are allowed: leave it out.
        if let Some(e) = &self.expose
            && !(self.credentials && e == "*")
            && let Ok(v) = HeaderValue::from_str(e)
        {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn modifier(yaml: &str) -> HeaderModifier {
        HeaderModifier::compile(&crate::yaml::from_str(yaml).unwrap())
    }

    /// HTTPRouteRequestHeaderModifier: set, add and remove, names case-insensitive.
    #[test]
    fn http_route_request_header_modifier() {
        let m = modifier(
            "set: [{name: X-Header-Set, value: set-overwrites-values}]\n\
             add: [{name: X-Header-Add, value: add-appends-values}]\n\
             remove: [X-Header-Remove]\n",
        );
        let mut req = parts(
            "GET",
            "/",
            &[
                ("some-other-header", "val"),
                ("x-header-set", "some-other-value"),
                ("x-header-add", "header-val-1"),
                ("X-Header-Remove", "val"),
            ],
        );
        m.apply(&mut req.headers);
        assert_eq!(req.headers["x-header-set"], "set-overwrites-values");
        assert_eq!(
            req.headers["x-header-add"],
            "header-val-1,add-appends-values"
        );
        assert!(!req.headers.contains_key("x-header-remove"));
        assert_eq!(req.headers["some-other-header"], "val");
        let mut empty = HeaderMap::new();
        m.apply(&mut empty);
        assert_eq!(empty["x-header-add"], "add-appends-values");
        assert_eq!(empty["x-header-set"], "set-overwrites-values");
    }

    /// HTTPRouteResponseHeaderModifier: the same filter over a response's headers;
    /// set-cookie values stay separate lines.
    #[test]
    fn http_route_response_header_modifier() {
        let m = modifier(
            "set: [{name: X-Header-Set, value: set-overwrites-values}]\n\
             add: [{name: Set-Cookie, value: b=2}]\n\
             remove: [X-Header-Remove-1]\n",
        );
        let mut h = HeaderMap::new();
        h.insert("set-cookie", HeaderValue::from_static("a=1"));
        h.insert("x-header-remove-1", HeaderValue::from_static("x"));
        m.apply(&mut h);
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
        assert!(!h.contains_key("x-header-remove-1"));
        assert_eq!(h["x-header-set"], "set-overwrites-values");
    }

    fn redirect_of(yaml: &str) -> Redirect {
        Redirect::compile(&crate::yaml::from_str(yaml).unwrap())
    }

    fn location(r: &Redirect, uri: &str, prefix: Option<&str>, port: u16) -> (u16, String) {
        let req = parts("GET", uri, &[("host", "echo")]);
        let resp = redirect(r, &req, prefix, port);
        (
            resp.status().as_u16(),
            resp.headers()[LOCATION].to_str().unwrap().to_owned(),
        )
    }

    /// HTTPRouteRedirectHostAndStatus and the 303/307/308 variants.
    #[test]
    fn http_route_redirect_host_and_status() {
        let r = redirect_of("hostname: example.org\n");
        assert_eq!(
            location(&r, "/hostname-redirect", None, 80),
            (302, "http://example.org/hostname-redirect".into())
        );
        for code in [301, 303, 307, 308] {
            let r = redirect_of(&format!("hostname: example.org\nstatusCode: {code}\n"));
            assert_eq!(
                location(&r, "/x?a=b", None, 80),
                (code, "http://example.org/x?a=b".into())
            );
        }
    }

    /// HTTPRouteRedirectPort and MeshHTTPRouteRedirectPort.
    #[test]
    fn http_route_redirect_port() {
        let r = redirect_of("port: 8083\n");
        assert_eq!(location(&r, "/port", None, 80).1, "http://echo:8083/port");
        let r = redirect_of("port: 8083\nhostname: example.org\n");
        assert_eq!(
            location(&r, "/port-and-host", None, 80).1,
            "http://example.org:8083/port-and-host"
        );
        // No port in the filter: the listener's, left out when well-known.
        let r = redirect_of("hostname: example.org\n");
        assert_eq!(location(&r, "/", None, 8080).1, "http://example.org:8080/");
    }

    /// HTTPRouteRedirectScheme: a new scheme brings its well-known port.
    #[test]
    fn http_route_redirect_scheme() {
        let r = redirect_of("scheme: https\n");
        assert_eq!(location(&r, "/scheme", None, 8080).1, "https://echo/scheme");
        let r = redirect_of("scheme: https\nhostname: example.org\nport: 8443\n");
        assert_eq!(location(&r, "/s", None, 80).1, "https://example.org:8443/s");
        let r = redirect_of("scheme: http\nport: 80\n");
        assert_eq!(location(&r, "/s", None, 443).1, "http://echo/s");
    }

    /// HTTPRouteRedirectPath: full and prefix replacements, query kept.
    #[test]
    fn http_route_redirect_path() {
        let r = redirect_of(
            "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}\n",
        );
        assert_eq!(
            location(&r, "/original-prefix/lemon", Some("/original-prefix"), 80).1,
            "http://echo/replacement-prefix/lemon"
        );
        let r = redirect_of("path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}\n");
        assert_eq!(
            location(&r, "/full/path/original?k=v", None, 80).1,
            "http://echo/replacement-full?k=v"
        );
    }

    /// HTTPRouteRewritePath: the conformance cases and the spec's table.
    #[test]
    fn http_route_rewrite_path() {
        for (path, prefix, with, want) in [
            ("/prefix/one/two", "/prefix/one", "/one", "/one/two"),
            ("/prefix/one/two", "/prefix/one", "/", "/two"),
            ("/strip-prefix/three", "/strip-prefix", "/", "/three"),
            ("/strip-prefix", "/strip-prefix", "/", "/"),
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/anything", "/", "/api", "/api/anything"),
        ] {
            assert_eq!(
                replace_prefix(path, prefix, with),
                want,
                "{path} {prefix} {with}"
            );
        }
        let r = UrlRewrite::compile(
            &crate::yaml::from_str("path: {type: ReplaceFullPath, replaceFullPath: /one}\n")
                .unwrap(),
        );
        let mut req = parts("GET", "/full/one/two?a=b", &[]);
        rewrite(&r, &mut req, Some("/full"));
        assert_eq!(req.uri, "/one?a=b");
    }

    /// HTTPRouteRewriteHost: the Host header and an HTTP/2 authority both change.
    #[test]
    fn http_route_rewrite_host() {
        let r = UrlRewrite::compile(&crate::yaml::from_str("hostname: one.example.org\n").unwrap());
        let mut req = parts(
            "GET",
            "http://rewrite.example/x?y=1",
            &[("host", "rewrite.example")],
        );
        rewrite(&r, &mut req, None);
        assert_eq!(req.headers[HOST], "one.example.org");
        assert_eq!(req.uri, "http://one.example.org/x?y=1");
        let mut req = parts("GET", "/x", &[("host", "rewrite.example")]);
        rewrite(&r, &mut req, None);
        assert_eq!(
            (
                req.headers[HOST].to_str().unwrap(),
                req.uri.to_string().as_str()
            ),
            ("one.example.org", "/x")
        );
    }

    fn cors(yaml: &str) -> Cors {
        Cors::compile(&crate::yaml::from_str(yaml).unwrap())
    }

    /// HTTPRouteCORS: its routes and requests.
    #[test]
    fn http_route_cors() {
        let c = cors(
            "allowOrigins: ['https://www.foo.com', 'https://*.bar.com']\n\
             allowMethods: [GET, OPTIONS]\n\
             allowHeaders: [x-header-1, x-header-2]\n\
             exposeHeaders: [x-header-3, x-header-4]\n\
             allowCredentials: true\nmaxAge: 3600\n",
        );
        for origin in [
            "https://www.foo.com",
            "https://www.bar.com",
            "https://xpto.www.bar.com",
        ] {
            let req = parts(
                "OPTIONS",
                "/cors-1",
                &[
                    ("origin", origin),
                    ("access-control-request-method", "GET"),
                    ("access-control-request-headers", "x-header-1, x-header-2"),
                ],
            );
            let resp = c.preflight(&req).expect("a preflight");
            let h = resp.headers();
            assert_eq!(resp.status(), 200);
            assert_eq!(h["access-control-allow-origin"], origin);
            assert_eq!(h["access-control-allow-methods"], "GET, OPTIONS");
            assert_eq!(h["access-control-allow-headers"], "x-header-1, x-header-2");
            assert_eq!(h["access-control-expose-headers"], "x-header-3, x-header-4");
            assert_eq!(h["access-control-max-age"], "3600");
            assert_eq!(h["access-control-allow-credentials"], "true");
        }
        let denied = parts(
            "OPTIONS",
            "/cors-1",
            &[
                ("origin", "https://foobar.com"),
                ("access-control-request-method", "GET"),
            ],
        );
        let resp = c.preflight(&denied).unwrap();
        assert!(!resp.headers().contains_key("access-control-allow-origin"));
        // Not a preflight: the request is forwarded, and the response gets headers.
        let get = parts("GET", "/cors-1", &[("origin", "https://www.bar.com")]);
        assert!(c.preflight(&get).is_none());
        let mut h = HeaderMap::new();
        c.apply_response(&get, &mut h);
        assert_eq!(h["access-control-allow-origin"], "https://www.bar.com");
        let mut h = HeaderMap::new();
        c.apply_response(
            &parts("GET", "/", &[("origin", "https://foobar.com")]),
            &mut h,
        );
        assert!(h.is_empty());

        // cors-wildcard-methods: `*` without credentials.
        let c = cors("allowOrigins: ['https://www.foo.com']\nallowMethods: ['*']\n");
        let req = parts(
            "OPTIONS",
            "/cors-2",
            &[
                ("origin", "https://www.foo.com"),
                ("access-control-request-method", "POST"),
            ],
        );
        let resp = c.preflight(&req).unwrap();
        assert_eq!(resp.headers()["access-control-allow-methods"], "*");
        assert!(
            !resp
                .headers()
                .contains_key("access-control-allow-credentials")
        );
        assert_eq!(resp.headers()["access-control-max-age"], "5", "the default");

        // cors-wildcard-origin, with a port in the origin.
        let c = cors("allowOrigins: ['*']\nallowMethods: [PUT]\n");
        let req = parts(
            "OPTIONS",
            "/",
            &[
                ("origin", "https://foobar.com:12345"),
                ("access-control-request-method", "PUT"),
            ],
        );
        let resp = c.preflight(&req).unwrap();
        assert_eq!(resp.headers()["access-control-allow-origin"], "*");
        assert_eq!(resp.headers()["access-control-allow-methods"], "PUT");
        // With credentials, `*` is never sent: the origin and method are echoed.
        let c = cors("allowOrigins: ['*']\nallowMethods: ['*']\nallowCredentials: true\n");
        let resp = c.preflight(&req).unwrap();
        assert_eq!(
            resp.headers()["access-control-allow-origin"],
            "https://foobar.com:12345"
        );
        assert_eq!(resp.headers()["access-control-allow-methods"], "PUT");
    }
}
