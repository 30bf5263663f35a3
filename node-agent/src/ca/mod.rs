//! The certificate authority's signing core: turns a workload's CSR into an X.509
//! SVID, and holds the trust bundle.
//!
//! The CSR boundary: the requester generates the key and proves possession of it
//! (the CSR's signature is verified); the CA takes *only* the public key from the
//! request, checks that the request asks for exactly the identity the caller is
//! authorized for, and builds every other field itself. Nothing else a requester
//! puts in a CSR (extra names, CA flags, key usages, validity) reaches a
//! certificate. The signing key leaves this struct only to be saved by the CA
//! that made it ([`Authority::key_pem`]).
//!
//! The trust bundle can hold several roots, so a root can be rotated without
//! downtime: add the new root to every bundle, switch signing to it, and drop the
//! old one once no certificate it signed is alive.

pub mod client;
pub mod cluster;
pub mod placement;
pub mod proto;
pub mod satoken;
pub mod server;
pub mod store;
#[cfg(test)]
mod testapi;
pub mod tokens;

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use time::OffsetDateTime;
use x509_parser::{
    certification_request::X509CertificationRequest,
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521},
    prelude::FromDer as _,
};

use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the CSR does not parse or its signature does not verify: {0}")]
    BadCsr(rcgen::Error),
    #[error("the CSR's key must be ECDSA P-256 (id-ecPublicKey on prime256v1); it is {0}")]
    KeyType(String),
    #[error("the CSR must name exactly one URI SAN, the requested identity; it names {0:?}")]
    Names(Vec<String>),
    #[error("the CSR asks for {asked}, but the request is for {requested}")]
    Mismatch { asked: String, requested: String },
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
    #[error("bad CA material: {0}")]
    Material(rcgen::Error),
}

pub use crate::identity::{CA_NAMESPACE, CA_SERVICE_ACCOUNT, ca_identity};

/// A fresh P-256 key and a CSR for `id` (one URI SAN, nothing else), both PEM:
/// what a requester makes and sends (the key stays with it). The key is PKCS#8,
/// as [`crate::tls::Svid::from_pem`] takes it.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}

/// How far back `not_before` is set, to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

/// A signing root and the bundle of roots workloads trust.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    /// PEM of every trusted root, the signing one first.
    bundle: Vec<String>,
}

impl Authority {
    /// A new self-signed P-256 root for `trust_domain`, valid for `validity`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::Material)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "weft root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key).map_err(Error::Material)?;
        let root_pem = cert.pem();
        Ok(Authority {
            issuer: Issuer::new(params, key),
            bundle: vec![root_pem.clone()],
            root_pem,
        })
    }

    /// An authority from an existing root certificate and its key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(Error::Material)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(Error::Material)?;
        Ok(Authority {
            issuer,
            root_pem: cert_pem.to_owned(),
            bundle: vec![cert_pem.to_owned()],
        })
    }

    /// Adds a root to the trust bundle (for rotation); signing is unchanged.
    pub fn trust_also(&mut self, root_pem: String) {
        if !self.bundle.contains(&root_pem) {
            self.bundle.push(root_pem);
        }
    }

    /// The signing key (PKCS#8 PEM), for the CA to save a root it generated.
    pub(crate) fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The signing root (PEM).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Every trusted root (PEM), the signing one first.
    pub fn bundle(&self) -> &[String] {
        &self.bundle
    }

    /// Signs `csr_pem` for `requested`, valid for `ttl`. The caller has already
    /// decided that its peer may have `requested`. Returns the chain as PEM, leaf
    /// first, then the signing root.
    pub fn sign(
        &self,
        csr_pem: &str,
        requested: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(Error::BadCsr)?;
        let public_key = p256_key(csr_pem)?;
        let names: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        let [asked] = names.as_slice() else {
            return Err(Error::Names(names));
        };
        if asked.parse::<SpiffeId>().as_ref() != Ok(requested) {
            return Err(Error::Mismatch {
                asked: asked.clone(),
                requested: requested.to_string(),
            });
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            requested.to_string().try_into().map_err(Error::Sign)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        // An ECDSA key signs; it cannot encipher keys (keyEncipherment is for RSA
        // key transport), so digitalSignature is the one usage it needs.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial()?);
        let leaf = params
            .signed_by(&public_key, &self.issuer)
            .map_err(Error::Sign)?;
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }
}

/// The CSR's public key, if it is an ECDSA P-256 one: checked by the key's own
/// algorithm and curve (`id-ecPublicKey`, `prime256v1`) and its encoding (an
/// uncompressed point, 65 bytes), not by the CSR's signature algorithm. rcgen
/// infers the key type from the signature algorithm, so a P-384 key that signs
/// its CSR with ecdsa-with-SHA256 (what `openssl req` does by default) passed for
/// P-256, and was signed into a certificate whose key info claims P-256 around a
/// P-384 point, which no TLS library loads.
fn p256_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, Error> {
    let der = ::pem::parse(csr_pem)
        .map_err(|e| Error::KeyType(format!("unreadable ({e})")))?
        .into_contents();
    let (_, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| Error::KeyType(format!("unreadable ({e})")))?;
    let spki = &csr.certification_request_info.subject_pki;
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(Error::KeyType(format!("a key of algorithm {algorithm}")));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    match curve {
        Some(c) if c == OID_EC_P256 => {}
        Some(c) => {
            let name = if c == OID_NIST_EC_P384 {
                "P-384 (secp384r1)".to_owned()
            } else if c == OID_NIST_EC_P521 {
                "P-521 (secp521r1)".to_owned()
            } else {
                c.to_id_string()
            };
            return Err(Error::KeyType(format!("an EC key on curve {name}")));
        }
        None => return Err(Error::KeyType("an EC key without a named curve".into())),
    }
    let point = spki.subject_public_key.data.as_ref();
    if point.len() != 65 || point[0] != 0x04 {
        return Err(Error::KeyType(format!(
            "a P-256 key that is not an uncompressed point ({} bytes)",
            point.len()
        )));
    }
    let key = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| Error::KeyType(format!("unreadable ({e})")))?;
    Ok(key)
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    getrandom(&mut bytes)?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn getrandom(buf: &mut [u8]) -> Result<(), Error> {
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        Ok(())
    } else {
        Err(Error::Material(rcgen::Error::RingUnspecified))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    fn csr_for(sans: &[&str]) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|s| SanType::URI((*s).try_into().unwrap()))
            .collect();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    fn parse(pem: &str) -> x509_parser::certificate::X509Certificate<'static> {
        let der = ::pem::parse(pem).unwrap().into_contents();
        let der: &'static [u8] = Box::leak(der.into_boxed_slice());
        x509_parser::parse_x509_certificate(der).unwrap().1
    }

    #[test]
    fn signs_exactly_the_requested_identity_with_the_requesters_key() {
        let ca = Authority::generate("cluster.local", 365 * DAY).unwrap();
        let want = id("shop", "web");
        let (key, csr) = csr_for(&[&want.to_string()]);
        let chain = ca.sign(&csr, &want, DAY).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.root_pem());
        let leaf = parse(&chain[0]);
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            format!("[URI(\"{want}\")]")
        );
        assert!(!leaf.is_ca());
        let root = parse(ca.root_pem());
        leaf.verify_signature(Some(root.public_key())).unwrap();
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime as u64, DAY.as_secs() + BACKDATE.as_secs());
    }

    #[test]
    fn refuses_a_csr_for_another_identity_or_with_extra_names() {
        let ca = Authority::generate("cluster.local", DAY).unwrap();
        let want = id("shop", "web");
        let (_, other) = csr_for(&["spiffe://cluster.local/ns/shop/sa/admin"]);
        assert!(matches!(
            ca.sign(&other, &want, DAY),
            Err(Error::Mismatch { .. })
        ));
        let (_, two) = csr_for(&[&want.to_string(), "spiffe://cluster.local/ns/x/sa/y"]);
        assert!(matches!(ca.sign(&two, &want, DAY), Err(Error::Names(_))));
        let (_, none) = csr_for(&[]);
        assert!(matches!(ca.sign(&none, &want, DAY), Err(Error::Names(_))));
    }

    #[test]
    fn refuses_garbage_and_forged_signatures() {
        let ca = Authority::generate("cluster.local", DAY).unwrap();
        let want = id("shop", "web");
        assert!(matches!(
            ca.sign("not a csr", &want, DAY),
            Err(Error::BadCsr(_))
        ));
        let (_, csr) = csr_for(&[&want.to_string()]);
        // Flip a byte inside the signed body: the signature no longer verifies.
        let mut der = ::pem::parse(&csr).unwrap().into_contents();
        let mid = der.len() / 2;
        der[mid] ^= 0x01;
        let forged = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(ca.sign(&forged, &want, DAY).is_err());
    }

    #[test]
    fn a_csr_cannot_ask_to_be_a_ca() {
        let ca = Authority::generate("cluster.local", DAY).unwrap();
        let want = id("shop", "web");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(want.to_string().try_into().unwrap())];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let chain = ca.sign(&csr, &want, DAY).unwrap();
        assert!(!parse(&chain[0]).is_ca());
    }

    #[test]
    fn rotation_keeps_old_roots_trusted() {
        let old = Authority::generate("cluster.local", DAY).unwrap();
        let mut new = Authority::generate("cluster.local", DAY).unwrap();
        new.trust_also(old.root_pem().to_owned());
        assert_eq!(new.bundle().len(), 2);
        assert_eq!(new.bundle()[0], new.root_pem());
    }

    /// `openssl req -new -key <secp384r1 key> -sha256` for
    /// spiffe://cluster.local/ns/shop/sa/web: a P-384 key, a SHA-256 signature.
    pub(super) const P384_SHA256_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBPDCBwgIBADAAMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEQj457GMgRX9QBdGP\nfObMmAtRTtSv5gVK3haTztrCY1hKuX5cdv9g1HOYAi8Q4HszQhQ88oozt+Lma/Or\nDVXeCUV19vtqV2iMA/iXhZKyb6mGp9I/kmsoqQOtF3rV8asMoEMwQQYJKoZIhvcN\nAQkOMTQwMjAwBgNVHREEKTAnhiVzcGlmZmU6Ly9jbHVzdGVyLmxvY2FsL25zL3No\nb3Avc2Evd2ViMAoGCCqGSM49BAMCA2kAMGYCMQDY4WGItx8XdujkVhYiFIJiJnPt\n+useYqKEvBHfPfWRRQQbkwABP6mLX4FT8K68ltcCMQCOVi2z1pcIZWtfIvCjMxEJ\n+S40yqVy1MxLA+KabftWvkxxPxF/ItmjmebLMPjCM0w=\n-----END CERTIFICATE REQUEST-----";
    /// The same with a prime256v1 key and `-sha384`.
    const P256_SHA384_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----\nMIH/MIGlAgEAMAAwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATs+v3GekCK7kEC\ngjd1vKO12+cmipwz0u+8GzwARx23GExBbnU3ycCXSnsPDLD8PgC0+OekG2t66kuP\ntuguvbNFoEMwQQYJKoZIhvcNAQkOMTQwMjAwBgNVHREEKTAnhiVzcGlmZmU6Ly9j\nbHVzdGVyLmxvY2FsL25zL3Nob3Avc2Evd2ViMAoGCCqGSM49BAMDA0kAMEYCIQCe\nIBJieAkmdm955nLWVmmA+cTA7E7u+DxoQvQt0zsdUAIhAIpUtlsL2vW68k5FEnoD\n46OfEDFeYThxGjHi8gh11cYS\n-----END CERTIFICATE REQUEST-----";
    /// The same with a secp256k1 key and `-sha256`.
    const K256_SHA256_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----\nMIH7MIGiAgEAMAAwVjAQBgcqhkjOPQIBBgUrgQQACgNCAARDh6A08OfrqPS0BADW\nXNRPyzgovBAPCU3fakm8sBXC3DaDy5yvL0L4ZoPBdlTm+ofCMOZeaAydN2tCuXsX\nDq9PoEMwQQYJKoZIhvcNAQkOMTQwMjAwBgNVHREEKTAnhiVzcGlmZmU6Ly9jbHVz\ndGVyLmxvY2FsL25zL3Nob3Avc2Evd2ViMAoGCCqGSM49BAMCA0gAMEUCICov34SZ\nSmMJVmMB4DAPNdQJhnPSns8G299yC5+d9PfSAiEA9m2SUss0PqMsoLN6+qLjZxDy\nnXRdWbSXfnJ6XCmLiS0=\n-----END CERTIFICATE REQUEST-----";

    #[test]
    fn refuses_every_key_but_p256_by_its_curve() {
        let ca = Authority::generate("cluster.local", DAY).unwrap();
        let want = id("shop", "web");
        // Signed before: rcgen took the key type from the signature algorithm.
        match ca.sign(P384_SHA256_CSR, &want, DAY) {
            Err(e @ Error::KeyType(_)) => assert!(e.to_string().contains("P-384"), "{e}"),
            other => panic!("a P-384 key was not refused: {other:?}"),
        }
        // Refused whatever the reason (here, rcgen or x509-parser refuse first).
        assert!(ca.sign(K256_SHA256_CSR, &want, DAY).is_err());
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::URI(want.to_string().try_into().unwrap())];
            let csr = params.serialize_request(&key).unwrap().pem().unwrap();
            assert!(
                matches!(ca.sign(&csr, &want, DAY), Err(Error::KeyType(_))),
                "{alg:?}"
            );
        }

        // A P-256 key is one whatever hash signed its CSR, and the certificate
        // says P-256 around that key's point.
        let chain = ca.sign(P256_SHA384_CSR, &want, DAY).unwrap();
        let leaf = parse(&chain[0]);
        let spki = leaf.public_key();
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        assert_eq!(
            spki.algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap(),
            OID_EC_P256
        );
        let csr_der = ::pem::parse(P256_SHA384_CSR).unwrap().into_contents();
        let (_, csr) = X509CertificationRequest::from_der(&csr_der).unwrap();
        assert_eq!(
            spki.subject_public_key.data,
            csr.certification_request_info
                .subject_pki
                .subject_public_key
                .data
        );
        let der = ::pem::parse(&chain[0]).unwrap().into_contents();
        webpki::EndEntityCert::try_from(&rustls::pki_types::CertificateDer::from(der)).unwrap();
    }

    #[test]
    fn leaf_key_usage_is_what_ecdsa_needs() {
        let ca = Authority::generate("cluster.local", DAY).unwrap();
        let want = id("shop", "web");
        // The requester asks for more: it gets none of it.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(want.to_string().try_into().unwrap())];
        params.key_usages = vec![
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyCertSign,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let chain = ca.sign(&csr, &want, DAY).unwrap();
        let leaf = parse(&chain[0]);
        let usage = leaf.key_usage().unwrap().expect("a key usage extension");
        assert!(usage.critical);
        assert!(usage.value.digital_signature());
        assert_eq!(
            usage.value.flags, 1,
            "digitalSignature only, got {}",
            usage.value
        );
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!eku.code_signing && !eku.any && eku.other.is_empty());
    }
}
