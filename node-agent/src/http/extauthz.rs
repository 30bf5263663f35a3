//! Envoy's external authorization protocol over gRPC
//! (`envoy.service.auth.v3.Authorization/Check`), the part of its messages a
//! waypoint fills and reads, both ways: the waypoint encodes a
//! [`CheckRequest`] and decodes a [`CheckResponse`]; a server (the test
//! server in `weft-tk`) does the converse. Field numbers are Envoy's:
//!
//! ```proto
//! message CheckRequest { AttributeContext attributes = 1; }
//! message AttributeContext { Peer source = 1; Peer destination = 2; Request request = 4; }
//! message Peer { Address address = 1; string principal = 4; }
//! message Address { SocketAddress socket_address = 1; }
//! message SocketAddress { string address = 2; uint32 port_value = 3; }
//! message Request { HttpRequest http = 2; }
//! message HttpRequest { string id = 1; string method = 2; map<string,string> headers = 3;
//!   string path = 4; string host = 5; string scheme = 6; string protocol = 10; }
//! message CheckResponse { google.rpc.Status status = 1;
//!   DeniedHttpResponse denied_response = 2; OkHttpResponse ok_response = 3; }
//! message Status { int32 code = 1; string message = 2; }
//! message DeniedHttpResponse { HttpStatus status = 1; repeated HeaderValueOption headers = 2; string body = 3; }
//! message HttpStatus { StatusCode code = 1; }
//! message OkHttpResponse { repeated HeaderValueOption headers = 2; }
//! message HeaderValueOption { HeaderValue header = 1; }
//! message HeaderValue { string key = 1; string value = 2; }
//! ```

use std::net::SocketAddr;

use crate::grpc::{
    Error, LEN, VARINT, get_key, get_len, get_string, get_varint, put_bytes, put_key, put_varint,
    skip,
};

/// The gRPC method.
pub const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
/// The largest answer read.
pub const MAX_MESSAGE: usize = 64 << 10;

/// What the authorizer is told of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckRequest {
    pub source: Option<SocketAddr>,
    /// The source's SPIFFE ID, when it proved one.
    pub source_principal: String,
    pub destination: Option<SocketAddr>,
    pub id: String,
    pub method: String,
    /// Lowercase names; one entry per name, values joined with `,` as Envoy
    /// does.
    pub headers: Vec<(String, String)>,
    pub path: String,
    pub host: String,
    pub scheme: String,
    pub protocol: String,
}

/// What the authorizer answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckResponse {
    /// `google.rpc.Code`: 0 allows; anything else denies.
    pub code: i32,
    /// On a denial: the HTTP status to answer (0: not given, 403 then).
    pub denied_status: u16,
    /// On a denial: headers for the client.
    pub denied_headers: Vec<(String, String)>,
    pub denied_body: String,
    /// On an allow: headers to set on the request upstream.
    pub ok_headers: Vec<(String, String)>,
}

fn put_str(out: &mut Vec<u8>, field: u64, s: &str) {
    if !s.is_empty() {
        put_bytes(out, field, s.as_bytes());
    }
}

fn put_uint(out: &mut Vec<u8>, field: u64, v: u64) {
    if v != 0 {
        put_key(out, field, VARINT);
        put_varint(out, v);
    }
}

fn peer(addr: Option<SocketAddr>, principal: &str) -> Vec<u8> {
    let mut p = Vec::new();
    if let Some(a) = addr {
        let mut sock = Vec::new();
        put_str(&mut sock, 2, &a.ip().to_canonical().to_string());
        put_uint(&mut sock, 3, u64::from(a.port()));
        let mut address = Vec::new();
        put_bytes(&mut address, 1, &sock);
        put_bytes(&mut p, 1, &address);
    }
    put_str(&mut p, 4, principal);
    p
}

/// A message of two strings, fields 1 and 2.
fn pair(k: &str, v: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(k.len() + v.len() + 4);
    put_str(&mut out, 1, k);
    put_str(&mut out, 2, v);
    out
}

fn header_options(out: &mut Vec<u8>, field: u64, headers: &[(String, String)]) {
    for (k, v) in headers {
        let mut opt = Vec::new();
        put_bytes(&mut opt, 1, &pair(k, v));
        put_bytes(out, field, &opt);
    }
}

/// Reads the fields of one message: `each(field, wire type, buf)` takes the
/// fields it knows (returning `Ok(true)`); the others are skipped.
fn fields(
    mut buf: &[u8],
    mut each: impl FnMut(u64, u8, &mut &[u8]) -> Result<bool, Error>,
) -> Result<(), Error> {
    while !buf.is_empty() {
        let (field, wt) = get_key(&mut buf)?;
        if !each(field, wt, &mut buf)? {
            skip(&mut buf, wt)?;
        }
    }
    Ok(())
}

fn read_peer(buf: &[u8]) -> Result<(Option<SocketAddr>, String), Error> {
    let (mut addr, mut principal) = (None, String::new());
    fields(buf, |f, wt, b| match (f, wt) {
        (1, LEN) => {
            let address = get_len(b)?;
            fields(address, |f, wt, b| match (f, wt) {
                (1, LEN) => {
                    let (mut ip, mut port) = (String::new(), 0u64);
                    fields(get_len(b)?, |f, wt, b| match (f, wt) {
                        (2, LEN) => {
                            ip = get_string(b, f)?;
                            Ok(true)
                        }
                        (3, VARINT) => {
                            port = get_varint(b)?;
                            Ok(true)
                        }
                        _ => Ok(false),
                    })?;
                    addr = ip
                        .parse()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, u16::try_from(port).unwrap_or(0)));
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            Ok(true)
        }
        (4, LEN) => {
            principal = get_string(b, f)?;
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok((addr, principal))
}

/// A message of two strings, fields 1 and 2: a map entry, a `HeaderValue`.
fn read_pair(buf: &[u8]) -> Result<(String, String), Error> {
    let (mut k, mut v) = (String::new(), String::new());
    fields(buf, |f, wt, b| match (f, wt) {
        (1, LEN) => {
            k = get_string(b, f)?;
            Ok(true)
        }
        (2, LEN) => {
            v = get_string(b, f)?;
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok((k, v))
}

fn read_header_option(buf: &[u8]) -> Result<Option<(String, String)>, Error> {
    let mut out = None;
    fields(buf, |f, wt, b| match (f, wt) {
        (1, LEN) => {
            out = Some(read_pair(get_len(b)?)?);
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok(out)
}

impl CheckRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut http = Vec::with_capacity(256);
        put_str(&mut http, 1, &self.id);
        put_str(&mut http, 2, &self.method);
        for (k, v) in &self.headers {
            put_bytes(&mut http, 3, &pair(k, v));
        }
        put_str(&mut http, 4, &self.path);
        put_str(&mut http, 5, &self.host);
        put_str(&mut http, 6, &self.scheme);
        put_str(&mut http, 10, &self.protocol);
        let mut request = Vec::new();
        put_bytes(&mut request, 2, &http);
        let mut attributes = Vec::new();
        put_bytes(
            &mut attributes,
            1,
            &peer(self.source, &self.source_principal),
        );
        put_bytes(&mut attributes, 2, &peer(self.destination, ""));
        put_bytes(&mut attributes, 4, &request);
        let mut out = Vec::new();
        put_bytes(&mut out, 1, &attributes);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut r = CheckRequest::default();
        fields(buf, |f, wt, b| match (f, wt) {
            (1, LEN) => {
                fields(get_len(b)?, |f, wt, b| match (f, wt) {
                    (1, LEN) => {
                        (r.source, r.source_principal) = read_peer(get_len(b)?)?;
                        Ok(true)
                    }
                    (2, LEN) => {
                        r.destination = read_peer(get_len(b)?)?.0;
                        Ok(true)
                    }
                    (4, LEN) => {
                        fields(get_len(b)?, |f, wt, b| match (f, wt) {
                            (2, LEN) => {
                                r.read_http(get_len(b)?)?;
                                Ok(true)
                            }
                            _ => Ok(false),
                        })?;
                        Ok(true)
                    }
                    _ => Ok(false),
                })?;
                Ok(true)
            }
            _ => Ok(false),
        })?;
        Ok(r)
    }

    fn read_http(&mut self, buf: &[u8]) -> Result<(), Error> {
        fields(buf, |f, wt, b| {
            if wt != LEN {
                return Ok(false);
            }
            match f {
                1 => self.id = get_string(b, f)?,
                2 => self.method = get_string(b, f)?,
                3 => self.headers.push(read_pair(get_len(b)?)?),
                4 => self.path = get_string(b, f)?,
                5 => self.host = get_string(b, f)?,
                6 => self.scheme = get_string(b, f)?,
                10 => self.protocol = get_string(b, f)?,
                _ => return Ok(false),
            }
            Ok(true)
        })
    }

    /// The value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl CheckResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut status = Vec::new();
        put_uint(&mut status, 1, u64::from(self.code as u32));
        let mut out = Vec::new();
        put_bytes(&mut out, 1, &status);
        if self.code != 0 {
            let mut denied = Vec::new();
            let mut http_status = Vec::new();
            put_uint(&mut http_status, 1, u64::from(self.denied_status));
            put_bytes(&mut denied, 1, &http_status);
            header_options(&mut denied, 2, &self.denied_headers);
            put_str(&mut denied, 3, &self.denied_body);
            put_bytes(&mut out, 2, &denied);
        } else {
            let mut ok = Vec::new();
            header_options(&mut ok, 2, &self.ok_headers);
            put_bytes(&mut out, 3, &ok);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut r = CheckResponse::default();
        fields(buf, |f, wt, b| match (f, wt) {
            (1, LEN) => {
                fields(get_len(b)?, |f, wt, b| match (f, wt) {
                    (1, VARINT) => {
                        // int32 on the wire: a negative code is ten bytes.
                        r.code = get_varint(b)? as i32;
                        Ok(true)
                    }
                    _ => Ok(false),
                })?;
                Ok(true)
            }
            (2, LEN) => {
                fields(get_len(b)?, |f, wt, b| match (f, wt) {
                    (1, LEN) => {
                        fields(get_len(b)?, |f, wt, b| match (f, wt) {
                            (1, VARINT) => {
                                r.denied_status = u16::try_from(get_varint(b)?).unwrap_or(0);
                                Ok(true)
                            }
                            _ => Ok(false),
                        })?;
                        Ok(true)
                    }
                    (2, LEN) => {
                        r.denied_headers.extend(read_header_option(get_len(b)?)?);
                        Ok(true)
                    }
                    (3, LEN) => {
                        r.denied_body = get_string(b, f)?;
                        Ok(true)
                    }
                    _ => Ok(false),
                })?;
                Ok(true)
            }
            (3, LEN) => {
                fields(get_len(b)?, |f, wt, b| match (f, wt) {
                    (2, LEN) => {
                        r.ok_headers.extend(read_header_option(get_len(b)?)?);
                        Ok(true)
                    }
                    _ => Ok(false),
                })?;
                Ok(true)
            }
            _ => Ok(false),
        })?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_messages_round_trip_and_garbage_is_an_error() {
        let req = CheckRequest {
            source: Some("10.0.0.7:41000".parse().unwrap()),
            source_principal: "spiffe://cluster.local/ns/a/sa/b".into(),
            destination: Some("10.96.0.20:8080".parse().unwrap()),
            id: "4bf92f3577b34da6".into(),
            method: "GET".into(),
            headers: vec![
                (":path".into(), "/admin".into()),
                ("x-user".into(), "eve".into()),
            ],
            path: "/admin?x=1".into(),
            host: "echo".into(),
            scheme: "http".into(),
            protocol: "HTTP/1.1".into(),
        };
        let back = CheckRequest::decode(&req.encode()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.header("x-user"), Some("eve"));
        for resp in [
            CheckResponse {
                code: 7,
                denied_status: 401,
                denied_headers: vec![("www-authenticate".into(), "Basic".into())],
                denied_body: "no".into(),
                ok_headers: vec![],
            },
            CheckResponse {
                code: 0,
                ok_headers: vec![("x-ext-user".into(), "alice".into())],
                ..Default::default()
            },
        ] {
            assert_eq!(CheckResponse::decode(&resp.encode()).unwrap(), resp);
        }
        // Truncated and mistyped input is an error, never a panic.
        let bytes = req.encode();
        for n in 0..bytes.len() {
            let _ = CheckRequest::decode(&bytes[..n]);
            let _ = CheckResponse::decode(&bytes[..n]);
        }
        assert!(CheckResponse::decode(&[0x0a, 0x05, 0x08]).is_err());
    }
}
