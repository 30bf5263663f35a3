//! The CA's request decoder and gRPC unframing take bytes straight from the network.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::ca::proto::{CertificateRequest, CertificateResponse, unframe};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = CertificateRequest::decode(data) {
        // What decodes re-encodes to something that decodes to the same value.
        assert_eq!(CertificateRequest::decode(&req.encode()).as_ref(), Ok(&req));
    }
    let _ = CertificateResponse::decode(data);
    let _ = unframe(data);
});
