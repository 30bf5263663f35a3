//! The answers of an external authorizer (gRPC `Check`) and the checks a test
//! server reads: protobuf from the network.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::http::extauthz::{CheckRequest, CheckResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = CheckResponse::decode(data) {
        // What decodes re-encodes to something that decodes the same way.
        let again = CheckResponse::decode(&resp.encode()).expect("re-encoded");
        assert_eq!(again.code == 0, resp.code == 0);
    }
    if let Ok(req) = CheckRequest::decode(data) {
        let _ = CheckRequest::decode(&req.encode()).expect("re-encoded");
    }
});
