//! Public keys of a JWKS (RFC 7517), checked for the algorithm a token names,
//! and the signature check of a JWT with them: shared by the waypoint's
//! request authentication (`http::jwt`) and the CA's check of Kubernetes
//! service-account tokens (`ca::satoken`), so both refuse the same things.
//!
//! Keys are public only (RSA, EC P-256/P-384, Ed25519): `alg: none`, HMAC and
//! any key whose `kty`, `crv` or `alg` disagrees with the token's `alg` are
//! refused, so a public key can never be used as an HMAC secret.

use jsonwebtoken::{
    Algorithm, DecodingKey, Header, Validation,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse},
};
use tracing::debug;

/// The algorithms a token may be signed with.
pub const ALLOWED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A public key of a JWKS, checked for use with a token's algorithm.
struct Key {
    kid: Option<String>,
    /// The key's own `alg`, if it names one.
    alg: Option<Algorithm>,
    kind: KeyKind,
    decoding: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    /// An EC key, with the one algorithm its curve serves.
    Ec(Algorithm),
    Ed25519,
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        let kind = match self.kind {
            KeyKind::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            KeyKind::Ec(a) => a == alg,
            KeyKind::Ed25519 => alg == Algorithm::EdDSA,
        };
        kind && self.alg.is_none_or(|a| a == alg)
    }
}

/// The usable keys of a JWKS.
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| k.kid.as_deref()).collect();
        write!(f, "KeySet({kids:?})")
    }
}

impl KeySet {
    /// Parses a JWKS document, keeping the public signing keys it can use and
    /// leaving the others out (logged); an error if none is left.
    pub fn parse(text: &str) -> Result<KeySet, String> {
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let list = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("a JWKS is an object with a `keys` list")?;
        let mut keys = Vec::new();
        for (i, v) in list.iter().enumerate() {
            match key(v) {
                Ok(k) => keys.push(k),
                Err(why) => debug!(index = i, reason = %why, "JWKS key left out"),
            }
        }
        if keys.is_empty() {
            return Err("no usable public key".into());
        }
        Ok(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

fn key(v: &serde_json::Value) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key".into());
    }
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(signing(a).ok_or_else(|| format!("alg {a:?} is refused"))?),
    };
    let (kind, decoding) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => (
            KeyKind::Rsa,
            DecodingKey::from_rsa_components(&p.n, &p.e).map_err(|e| e.to_string())?,
        ),
        AlgorithmParameters::EllipticCurve(p) => {
            let alg = match p.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                ref c => return Err(format!("curve {c:?} is not supported")),
            };
            (
                KeyKind::Ec(alg),
                DecodingKey::from_ec_components(&p.x, &p.y).map_err(|e| e.to_string())?,
            )
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 {
                return Err(format!("curve {:?} is not supported", p.curve));
            }
            (
                KeyKind::Ed25519,
                DecodingKey::from_ed_components(&p.x).map_err(|e| e.to_string())?,
            )
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric key: public keys only".into());
        }
    };
    let key = Key {
        kid: jwk.common.key_id,
        alg,
        kind,
        decoding,
    };
    if let Some(a) = alg
        && !key.fits(a)
    {
        return Err(format!("alg {a:?} does not fit a key of kind {kind:?}"));
    }
    Ok(key)
}

/// The signing algorithm a JWK's `alg` names, if it is one we accept.
fn signing(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Why a token did not verify with a key set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("no key of the set fits the token's algorithm and kid")]
    NoKey,
    #[error("bad signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("not valid yet")]
    NotYetValid,
    #[error("{0}")]
    Other(String),
}

impl KeySet {
    /// Checks `token`'s signature with the keys that fit its header (its `kid`,
    /// if it names one, and its `alg`), and the time claims `validation` asks
    /// for; the claims if it holds. The caller has checked that `header.alg` is
    /// one of [`ALLOWED`].
    pub fn verify(
        &self,
        token: &str,
        header: &Header,
        validation: &Validation,
    ) -> Result<serde_json::Value, Invalid> {
        let mut outcome = Err(Invalid::NoKey);
        for k in self
            .keys
            .iter()
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .filter(|k| k.fits(header.alg))
        {
            use jsonwebtoken::errors::ErrorKind as K;
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.decoding, validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    outcome = Err(match e.kind() {
                        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
                            Invalid::Signature
                        }
                        K::ExpiredSignature => return Err(Invalid::Expired),
                        K::ImmatureSignature => return Err(Invalid::NotYetValid),
                        other => return Err(Invalid::Other(format!("{other:?}"))),
                    });
                }
            }
        }
        outcome
    }
}

/// Base64url without padding: what JWKs and tokens are written in (tests and
/// benches mint them with it).
pub fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
