//! JWKS documents (fetched from issuers and API servers) and JWTs (from any
//! client of the waypoint, from any agent at the CA) are parsed from bytes a
//! peer chose: neither may panic, whatever they hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::jwk::{ALLOWED, KeySet};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = KeySet::parse(text);
    // The same bytes as a token, against a real key set.
    let keys = KeySet::parse(
        r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k","alg":"ES256",
        "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#,
    )
    .expect("a valid JWKS");
    if let Ok(header) = jsonwebtoken::decode_header(text)
        && ALLOWED.contains(&header.alg)
    {
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.required_spec_claims.clear();
        let _ = keys.verify(text, &header, &validation);
    }
});
