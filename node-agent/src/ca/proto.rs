//! The CA's wire format: Istio's `istio.v1.auth.IstioCertificateService`
//! (`CreateCertificate`), the protocol ztunnel speaks, framed as gRPC messages.
//!
//! ```proto
//! message IstioCertificateRequest {
//!   string csr = 1;                      // PEM
//!   int64 validity_duration = 3;         // seconds
//!   google.protobuf.Struct metadata = 4; // "ImpersonatedIdentity": the SPIFFE ID asked for
//! }
//! message IstioCertificateResponse { repeated string cert_chain = 1; }
//! ```
//!
//! Two small messages do not justify a protobuf code generator and its build-time
//! dependencies, so the codec is written out here. Decoding is strict about what it
//! reads (wire types, lengths, UTF-8, sizes) and skips unknown fields, as protobuf
//! requires. Input comes from the network: every error is a value, never a panic.

/// gRPC method path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

pub use crate::grpc::{Code, Error, decode_message, encode_message, frame};
use crate::grpc::{
    LEN, VARINT, get_key, get_len, get_string, get_varint, put_bytes, put_key, put_varint, skip,
};

/// Largest message accepted either way: a P-256 CSR is well under 1 KiB and a chain
/// of a few certificates a few KiB.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Metadata key carrying the identity requested (ztunnel's name for it).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateRequest {
    pub csr: String,
    pub validity_secs: i64,
    pub impersonated_identity: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateResponse {
    pub cert_chain: Vec<String>,
}

impl CertificateRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.csr.len() + 96);
        put_bytes(&mut out, 1, self.csr.as_bytes());
        if self.validity_secs != 0 {
            put_key(&mut out, 3, VARINT);
            put_varint(&mut out, self.validity_secs as u64);
        }
        if let Some(id) = &self.impersonated_identity {
            // Struct { fields: map<string, Value> = 1 } with one entry
            // { key = 1: "ImpersonatedIdentity", value = 2: Value { string_value = 3 } }.
            let mut value = Vec::new();
            put_bytes(&mut value, 3, id.as_bytes());
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, IMPERSONATED_IDENTITY.as_bytes());
            put_bytes(&mut entry, 2, &value);
            let mut st = Vec::new();
            put_bytes(&mut st, 1, &entry);
            put_bytes(&mut out, 4, &st);
        }
        out
    }

    pub fn decode(mut buf: &[u8]) -> Result<Self, Error> {
        let mut req = CertificateRequest::default();
        while !buf.is_empty() {
            let (field, wt) = get_key(&mut buf)?;
            match (field, wt) {
                (1, LEN) => req.csr = get_string(&mut buf, field)?,
                (3, VARINT) => req.validity_secs = get_varint(&mut buf)? as i64,
                (4, LEN) => {
                    let st = get_len(&mut buf)?;
                    if let Some(id) = struct_string(st, IMPERSONATED_IDENTITY)? {
                        req.impersonated_identity = Some(id);
                    }
                }
                (1 | 3 | 4, _) => {
                    return Err(Error::WireType {
                        field,
                        wire_type: wt,
                    });
                }
                _ => skip(&mut buf, wt)?,
            }
        }
        Ok(req)
    }
}

impl CertificateResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.cert_chain.iter().map(|c| c.len() + 4).sum());
        for cert in &self.cert_chain {
            put_bytes(&mut out, 1, cert.as_bytes());
        }
        out
    }

    pub fn decode(mut buf: &[u8]) -> Result<Self, Error> {
        let mut resp = CertificateResponse::default();
        while !buf.is_empty() {
            let (field, wt) = get_key(&mut buf)?;
            match (field, wt) {
                (1, LEN) => resp.cert_chain.push(get_string(&mut buf, field)?),
                (1, _) => {
                    return Err(Error::WireType {
                        field,
                        wire_type: wt,
                    });
                }
                _ => skip(&mut buf, wt)?,
            }
        }
        Ok(resp)
    }
}

/// Takes one gRPC frame of at most [`MAX_MESSAGE`] off the front of `buf`
/// (see [`crate::grpc::unframe`]).
pub fn unframe(buf: &[u8]) -> Result<Option<(&[u8], usize)>, Error> {
    crate::grpc::unframe(buf, MAX_MESSAGE)
}

/// The string value of `key` in an encoded `google.protobuf.Struct`, if present.
fn struct_string(mut st: &[u8], key: &str) -> Result<Option<String>, Error> {
    let mut found = None;
    while !st.is_empty() {
        let (field, wt) = get_key(&mut st)?;
        if (field, wt) != (1, LEN) {
            skip(&mut st, wt)?;
            continue;
        }
        let mut entry = get_len(&mut st)?;
        let (mut k, mut v) = (None, None);
        while !entry.is_empty() {
            let (f, w) = get_key(&mut entry)?;
            match (f, w) {
                (1, LEN) => k = Some(get_string(&mut entry, f)?),
                (2, LEN) => {
                    let mut value = get_len(&mut entry)?;
                    while !value.is_empty() {
                        let (vf, vw) = get_key(&mut value)?;
                        if (vf, vw) == (3, LEN) {
                            v = Some(get_string(&mut value, vf)?);
                        } else {
                            skip(&mut value, vw)?;
                        }
                    }
                }
                _ => skip(&mut entry, w)?,
            }
        }
        if k.as_deref() == Some(key) {
            found = v;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let req = CertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----\nabc\n".into(),
            validity_secs: 86_400,
            impersonated_identity: Some("spiffe://cluster.local/ns/a/sa/b".into()),
        };
        assert_eq!(CertificateRequest::decode(&req.encode()).unwrap(), req);
        let bare = CertificateRequest {
            csr: "x".into(),
            ..Default::default()
        };
        assert_eq!(CertificateRequest::decode(&bare.encode()).unwrap(), bare);
    }

    #[test]
    fn request_matches_the_protobuf_wire_format() {
        // csr = "a" (field 1), validity_duration = 300 (field 3): bytes a protobuf
        // library produces for the same message.
        let req = CertificateRequest {
            csr: "a".into(),
            validity_secs: 300,
            impersonated_identity: None,
        };
        assert_eq!(req.encode(), [0x0a, 0x01, b'a', 0x18, 0xac, 0x02]);
    }

    #[test]
    fn response_round_trips_and_skips_unknown_fields() {
        let resp = CertificateResponse {
            cert_chain: vec!["leaf".into(), "root".into()],
        };
        let mut wire = resp.encode();
        // An unknown varint field 7 and an unknown fixed64 field 8.
        wire.extend_from_slice(&[0x38, 0x05, 0x41, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(CertificateResponse::decode(&wire).unwrap(), resp);
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        for bad in [
            &[0x0a, 0x05, b'a'][..],       // length past the end
            &[0x0a][..],                   // key, then nothing
            &[0x08, 0x01][..],             // csr as a varint
            &[0x0a, 0x02, 0xff, 0xfe][..], // csr not UTF-8
            &[0xff; 11][..],               // endless varint
            &[0x0b][..],                   // wire type 3 (groups)
        ] {
            assert!(CertificateRequest::decode(bad).is_err(), "{bad:?} accepted");
        }
        // Every prefix of a valid message either decodes or errors.
        let wire = CertificateRequest {
            csr: "csr".into(),
            validity_secs: 5,
            impersonated_identity: Some("id".into()),
        }
        .encode();
        for n in 0..wire.len() {
            let _ = CertificateRequest::decode(&wire[..n]);
        }
    }

    #[test]
    fn status_codes_and_messages() {
        assert_eq!(Code::parse(b"7"), Some(Code::PERMISSION_DENIED));
        assert_eq!(Code::PERMISSION_DENIED.to_string(), "PERMISSION_DENIED (7)");
        assert_eq!(Code(99).name(), "UNKNOWN");
        for bad in [&b""[..], b"-1", b"1 ", b"99999999999"] {
            assert_eq!(Code::parse(bad), None, "{bad:?}");
        }
        let text = "node n1: 100% denied \u{e9}\n";
        let wire = encode_message(text);
        assert!(wire.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{wire}");
        assert_eq!(decode_message(wire.as_bytes()), text);
        assert_eq!(decode_message(b"50%"), "50%");
        assert_eq!(decode_message(b"%zz%4"), "%zz%4");
        assert_eq!(decode_message(b"%FF"), "\u{fffd}");
    }

    #[test]
    fn frames() {
        let f = frame(b"hello");
        assert_eq!(unframe(&f[..4]).unwrap(), None);
        assert_eq!(unframe(&f[..7]).unwrap(), None);
        assert_eq!(unframe(&f).unwrap(), Some((&b"hello"[..], 10)));
        assert_eq!(unframe(&[1, 0, 0, 0, 0]), Err(Error::Compressed));
        assert_eq!(
            unframe(&[0, 0xff, 0xff, 0xff, 0xff]),
            Err(Error::TooLarge {
                len: u32::MAX as usize,
                max: MAX_MESSAGE
            })
        );
    }
}
