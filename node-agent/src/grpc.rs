//! gRPC over HTTP/2 as the CA and the waypoint's external authorization
//! speak it: status codes, `grpc-message` escaping, the length-prefixed frame,
//! and the protobuf wire format, written out by hand.
//!
//! A few small messages (Istio's `CreateCertificate`, Envoy's `ext_authz`
//! `Check`) do not justify a protobuf code generator and its build-time
//! dependencies. Decoding is strict about what it reads (wire types, lengths,
//! UTF-8, sizes) and skips unknown fields, as protobuf requires. Input comes from
//! the network: every error is a value, never a panic.

/// A gRPC status code (the `grpc-status` trailer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(pub u32);

impl Code {
    pub const OK: Code = Code(0);
    pub const DEADLINE_EXCEEDED: Code = Code(4);
    pub const INVALID_ARGUMENT: Code = Code(3);
    pub const PERMISSION_DENIED: Code = Code(7);
    pub const RESOURCE_EXHAUSTED: Code = Code(8);
    pub const UNIMPLEMENTED: Code = Code(12);
    pub const INTERNAL: Code = Code(13);
    pub const UNAVAILABLE: Code = Code(14);
    pub const UNAUTHENTICATED: Code = Code(16);

    /// The canonical name, as gRPC documents it.
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 17] = [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ];
        usize::try_from(self.0)
            .ok()
            .and_then(|i| NAMES.get(i))
            .copied()
            .unwrap_or("UNKNOWN")
    }

    /// Parses a `grpc-status` value (decimal digits only).
    pub fn parse(value: &[u8]) -> Option<Code> {
        if value.is_empty() || value.len() > 9 || !value.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(value).ok()?.parse().ok().map(Code)
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// Percent-encodes a `grpc-message` value: bytes outside printable ASCII, and `%`,
/// become `%XX` (the gRPC HTTP/2 spec), so any UTF-8 text is a valid header value.
pub fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a `grpc-message` value; a malformed escape is kept as is, and invalid
/// UTF-8 is replaced, as the spec asks of receivers (never fail on a message).
pub fn decode_message(value: &[u8]) -> String {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        let hex = value
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("message truncated")]
    Truncated,
    #[error("message of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("compressed gRPC messages are not supported")]
    Compressed,
    #[error("field {field}: wrong wire type {wire_type}")]
    WireType { field: u64, wire_type: u8 },
    #[error("field {0}: not UTF-8")]
    Utf8(u64),
    #[error("varint too long")]
    Varint,
    #[error("unsupported wire type {0}")]
    UnknownWireType(u8),
}

pub const VARINT: u8 = 0;
pub const I64: u8 = 1;
pub const LEN: u8 = 2;
pub const I32: u8 = 5;

/// Wraps a message in gRPC's length-prefixed frame (uncompressed).
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Takes one gRPC frame off the front of `buf`: `Ok(None)` if more bytes are
/// needed, else the message and the number of bytes consumed. A message over
/// `max` bytes is refused before it arrives.
pub fn unframe(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, Error> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(Error::Compressed);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > max {
        return Err(Error::TooLarge { len, max });
    }
    Ok(buf.get(5..5 + len).map(|m| (m, 5 + len)))
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn put_key(out: &mut Vec<u8>, field: u64, wire_type: u8) {
    put_varint(out, (field << 3) | u64::from(wire_type));
}

pub fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub fn get_varint(buf: &mut &[u8]) -> Result<u64, Error> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or(Error::Truncated)?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(Error::Varint)
}

pub fn get_key(buf: &mut &[u8]) -> Result<(u64, u8), Error> {
    let k = get_varint(buf)?;
    Ok((k >> 3, (k & 7) as u8))
}

pub fn get_len<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], Error> {
    let len = get_varint(buf)?;
    let len = usize::try_from(len).map_err(|_| Error::Truncated)?;
    if len > buf.len() {
        return Err(Error::Truncated);
    }
    let (head, rest) = buf.split_at(len);
    *buf = rest;
    Ok(head)
}

pub fn get_string(buf: &mut &[u8], field: u64) -> Result<String, Error> {
    let b = get_len(buf)?;
    String::from_utf8(b.to_vec()).map_err(|_| Error::Utf8(field))
}

pub fn skip(buf: &mut &[u8], wire_type: u8) -> Result<(), Error> {
    let n = match wire_type {
        VARINT => return get_varint(buf).map(|_| ()),
        LEN => return get_len(buf).map(|_| ()),
        I64 => 8,
        I32 => 4,
        other => return Err(Error::UnknownWireType(other)),
    };
    if buf.len() < n {
        return Err(Error::Truncated);
    }
    *buf = &buf[n..];
    Ok(())
}
