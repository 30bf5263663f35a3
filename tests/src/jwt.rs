//! Keys and tokens the tests mint: an ES256 key whose public half is a JWK,
//! for the JWKS servers and issuers the tests play.

use anyhow::Result;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::{rand::SystemRandom, signature};
use serde_json::{Value, json};

pub use weft::jwk::b64url;

/// An ES256 key: its private half for signing, its public half as a JWK.
pub struct EsKey {
    pub enc: EncodingKey,
    pub kid: String,
    pub jwk: Value,
}

impl EsKey {
    pub fn new(kid: &str) -> Result<EsKey> {
        use signature::KeyPair as _;
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let rng = SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?;
        let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("reading the P-256 key"))?;
        let public = pair.public_key().as_ref();
        Ok(EsKey {
            enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
            kid: kid.to_owned(),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                "x": b64url(&public[1..33]), "y": b64url(&public[33..])}),
        })
    }

    /// `claims`, signed, with this key's `kid` in the header.
    pub fn sign(&self, claims: &Value) -> Result<String> {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&h, claims, &self.enc)?)
    }
}

/// The JWKS document of `keys`.
pub fn jwks(keys: &[&EsKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}
