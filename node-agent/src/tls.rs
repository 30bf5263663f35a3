//! TLS between workloads (and to the CA): rustls with *ring*, TLS 1.3 only, AES-GCM
//! suites first; X.509 SVIDs; a multi-root trust bundle; and the checks that make a
//! certificate mean an identity.
//!
//! The web PKI's name check does not apply: SVIDs carry a SPIFFE URI SAN and no DNS
//! name. A server is checked by chain (to a root of the bundle, `serverAuth`) and
//! then by its one URI SAN, which must equal the identity the caller expects. A
//! client is checked by chain (`clientAuth`); its identity is then read from its one
//! URI SAN by [`peer_identity`].

use std::{
    fmt,
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime},
    server::{
        ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use crate::identity::SpiffeId;

/// ALPN of HBONE (and of gRPC to the CA).
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error("no certificate in the PEM")]
    NoCertificate,
    #[error("bad certificate: {0}")]
    Certificate(String),
    #[error("bad private key: {0}")]
    Key(String),
    #[error("the certificate names no SPIFFE identity, or more than one: {0}")]
    Identity(String),
    #[error("the trust bundle holds no usable root")]
    EmptyBundle,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every TLS config here uses: *ring*, TLS 1.3 suites only
/// (AES-128-GCM, AES-256-GCM, then ChaCha20-Poly1305), X25519 then P-256.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let base = ring::default_provider();
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                    ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                    ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                ],
                kx_groups: vec![ring::kx_group::X25519, ring::kx_group::SECP256R1],
                ..base
            })
        })
        .clone()
}

fn sig_algs() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// Parses every certificate in a PEM text, in order.
pub fn certs_from_pem(text: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let blocks = pem::parse_many(text).map_err(|e| Error::Pem(e.to_string()))?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(Error::NoCertificate);
    }
    Ok(certs)
}

/// The single SPIFFE identity of a certificate: exactly one URI SAN, and it must
/// parse as a SPIFFE ID.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::Certificate(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| Error::Certificate(e.to_string()))?
        .ok_or_else(|| Error::Identity("no subjectAltName".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => uri
            .parse::<SpiffeId>()
            .map_err(|e| Error::Identity(e.to_string())),
        (None, _) => Err(Error::Identity("no URI SAN".into())),
        (Some(_), Some(_)) => Err(Error::Identity("several URI SANs".into())),
    }
}

/// The identity of a verified TLS peer, from its leaf certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, Error> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(Error::Identity("the peer sent no certificate".into()))?;
    identity_of(leaf)
}

/// A workload's X.509 SVID and its key, ready for rustls.
pub struct Svid {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial number of the leaf, for logs.
    pub serial: String,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// An SVID from its chain (leaf first; a trailing root is dropped, peers have
    /// it in their bundle) and the PKCS#8 key, both PEM. The leaf must name exactly
    /// one SPIFFE identity and match the key.
    pub fn from_pem(chain: &[String], key_pem: &str) -> Result<Self, Error> {
        let mut certs = Vec::new();
        for pem in chain {
            certs.extend(certs_from_pem(pem)?);
        }
        let leaf = certs.first().ok_or(Error::NoCertificate)?.clone();
        let id = identity_of(&leaf)?;
        let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let ts = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        let not_before = ts(x509.validity().not_before.timestamp());
        let not_after = ts(x509.validity().not_after.timestamp());
        let serial = x509.raw_serial_as_string().replace(':', "");
        // Send leaf and intermediates; a self-signed root is the peer's to have.
        if certs.len() > 1
            && let Some(last) = certs.last()
            && let Ok((_, last)) = x509_parser::parse_x509_certificate(last.as_ref())
            && last.subject() == last.issuer()
        {
            certs.pop();
        }
        let key_der = pem::parse(key_pem).map_err(|e| Error::Key(e.to_string()))?;
        let key = PrivateKeyDer::try_from(key_der.into_contents())
            .map_err(|e| Error::Key(e.to_string()))?;
        let certified = CertifiedKey::from_der(certs, key, &provider())?;
        Ok(Svid {
            id,
            not_before,
            not_after,
            serial,
            certified: Arc::new(certified),
        })
    }

    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// How long after `received` to renew: half of the life it had left then (the
    /// CA backdates `not_before` for clock skew, so that is not counted), and never
    /// sooner than a second, so a CA handing out near-expired certificates cannot
    /// make us spin.
    pub fn renew_after(&self, received: SystemTime) -> Duration {
        let left = self.not_after.duration_since(received).unwrap_or_default();
        (left / 2).max(Duration::from_secs(1))
    }

    pub fn expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }
}

/// The roots a workload trusts (several during a root rotation).
#[derive(Clone)]
pub struct TrustBundle {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    /// Client certificates checked against these roots, built once per bundle.
    client_verifier: Arc<dyn ClientCertVerifier>,
}

/// The trust bundle in force, shared: every verifier reads it at handshake time
/// (a cheap clone of two `Arc`s under a read lock), so a root added to or
/// removed from the bundle counts from the next handshake on, on every
/// listener and client, without rebuilding any config.
pub type LiveBundle = Arc<RwLock<TrustBundle>>;

/// The bundle in force now.
pub fn current(bundle: &LiveBundle) -> TrustBundle {
    bundle.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.anchors.len())
    }
}

impl TrustBundle {
    /// Every certificate in `text` becomes a root.
    pub fn from_pem(text: &str) -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        let mut anchors = Vec::new();
        for cert in certs_from_pem(text)? {
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| Error::Certificate(format!("{e:?}")))?
                .to_owned();
            anchors.push(anchor);
            roots.add(cert)?;
        }
        if anchors.is_empty() {
            return Err(Error::EmptyBundle);
        }
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| Error::Certificate(e.to_string()))?;
        Ok(TrustBundle {
            anchors: Arc::new(anchors),
            client_verifier,
        })
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}

/// Checks a server's chain against the bundle and its URI SAN against the one
/// identity this connection is meant to reach.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            sig_algs().all,
            &self.bundle.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let got = identity_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if got != self.expected {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongIdentity {
                    expected: self.expected.to_string(),
                    got: got.to_string(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &sig_algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        sig_algs().supported_schemes()
    }
}

/// The server presented a valid certificate for someone else.
#[derive(Debug, thiserror::Error)]
#[error("the peer is {got}, expected {expected}")]
pub struct WrongIdentity {
    pub expected: String,
    pub got: String,
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let c = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { .. } | E::InvalidCertValidity => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(c)
}

/// The client side both configs share: TLS 1.3 only, and a server that must prove
/// to be `expected` under `bundle`.
fn spiffe_client(
    bundle: &TrustBundle,
    expected: SpiffeId,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, Error> {
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle: bundle.clone(),
        expected,
    });
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

/// A client config that presents `svid` and accepts only a server that proves to
/// be `expected` under `bundle`. ALPN `h2`, TLS 1.3 only.
pub fn client_config(
    svid: &Svid,
    bundle: &TrustBundle,
    expected: SpiffeId,
) -> Result<Arc<ClientConfig>, Error> {
    let mut config = spiffe_client(bundle, expected)?
        .with_client_cert_resolver(Arc::new(FixedClientCert(svid.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A client config for a caller without a certificate of its own (the agent
/// talking to the CA): the server must prove to be `expected`.
pub fn anonymous_client_config(
    bundle: &TrustBundle,
    expected: SpiffeId,
) -> Result<Arc<ClientConfig>, Error> {
    let mut config = spiffe_client(bundle, expected)?.with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks a client's chain (`clientAuth`) against the bundle in force at the
/// handshake.
#[derive(Debug)]
struct LiveClientVerifier {
    bundle: LiveBundle,
}

impl ClientCertVerifier for LiveClientVerifier {
    /// No hints: the bundle may change under a borrowed slice, and our peers
    /// (and ztunnel) present their one certificate whatever the hints say.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        current(&self.bundle)
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &sig_algs())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &sig_algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        sig_algs().supported_schemes()
    }
}

/// A server config that requires a client certificate chaining to the bundle in
/// force at each handshake (`clientAuth`), and presents whatever `certs`
/// resolves at handshake time (so a renewed certificate is used without
/// rebuilding the config). ALPN `h2`.
pub fn server_config(
    certs: Arc<dyn ResolvesServerCert>,
    bundle: &LiveBundle,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = Arc::new(LiveClientVerifier {
        bundle: bundle.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    no_resumption(&mut config);
    Ok(Arc::new(config))
}

/// A server config without client authentication (the CA's endpoint: callers
/// authenticate with a token instead), presenting `svid`.
pub fn server_config_no_client_auth(svid: &Svid) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedServerCert(svid.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    no_resumption(&mut config);
    Ok(Arc::new(config))
}

/// Every handshake is a full one: a resumed session would skip the certificate
/// checks and so outlive the peer's certificate (or its root leaving the bundle).
/// No session cache, no tickets sent (rustls has no stateless ticketer unless one is
/// set; `Ticketer` is left at its default, none).
fn no_resumption(config: &mut ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ca::Authority;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

    const DAY: Duration = Duration::from_secs(86_400);

    /// An SVID for `id` signed by `ca`.
    pub(crate) fn issue(ca: &Authority, id: &SpiffeId, ttl: Duration) -> Svid {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let chain = ca.sign(&csr, id, ttl).unwrap();
        Svid::from_pem(&chain, &key.serialize_pem()).unwrap()
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn svid_reads_identity_validity_and_drops_the_root() {
        let ca = Authority::generate("cluster.local", DAY).unwrap();
        let svid = issue(&ca, &id("a"), DAY);
        assert_eq!(svid.id, id("a"));
        assert_eq!(svid.certified_key().cert.len(), 1);
        assert!(!svid.expired());
        let now = SystemTime::now();
        let renew = svid.renew_after(now);
        assert!(
            renew > DAY / 2 - Duration::from_secs(5) && renew <= DAY / 2,
            "{renew:?}"
        );
    }

    /// A full handshake between `client` and `server` in memory; how it went.
    fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> rustls::HandshakeKind {
        try_handshake(client, server).unwrap()
    }

    /// The same, or the error either side met.
    fn try_handshake(
        client: &Arc<ClientConfig>,
        server: &Arc<ServerConfig>,
    ) -> Result<rustls::HandshakeKind, rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from("weft").unwrap();
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        Ok(c.handshake_kind().unwrap())
    }

    #[test]
    fn a_listener_follows_the_bundle_from_one_handshake_to_the_next() {
        let (old, new) = (
            Authority::generate("cluster.local", DAY).unwrap(),
            Authority::generate("cluster.local", DAY).unwrap(),
        );
        let both = format!("{}{}", old.root_pem(), new.root_pem());
        let live: LiveBundle =
            Arc::new(RwLock::new(TrustBundle::from_pem(old.root_pem()).unwrap()));
        let b = issue(&old, &id("b"), DAY);
        // One server config for the whole rotation, as a pod's 15008 keeps.
        let server = server_config(Arc::new(FixedServerCert(b.certified_key())), &live).unwrap();
        let client_of = |ca: &Authority| {
            let bundle = TrustBundle::from_pem(&both).unwrap();
            client_config(&issue(ca, &id("a"), DAY), &bundle, id("b")).unwrap()
        };
        assert!(try_handshake(&client_of(&old), &server).is_ok());
        assert!(
            try_handshake(&client_of(&new), &server).is_err(),
            "a root not yet trusted"
        );
        // The new root joins the bundle: its certificates are accepted at once.
        *live.write().unwrap() = TrustBundle::from_pem(&both).unwrap();
        assert!(try_handshake(&client_of(&new), &server).is_ok());
        assert!(try_handshake(&client_of(&old), &server).is_ok());
        // The old root leaves: its certificates are refused from the next handshake.
        *live.write().unwrap() = TrustBundle::from_pem(new.root_pem()).unwrap();
        let e = try_handshake(&client_of(&old), &server).unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e}");
        assert!(try_handshake(&client_of(&new), &server).is_ok());
    }

    #[test]
    fn the_mesh_port_never_resumes_a_session() {
        let ca = Authority::generate("cluster.local", DAY).unwrap();
        let bundle = TrustBundle::from_pem(ca.root_pem()).unwrap();
        let (a, b) = (issue(&ca, &id("a"), DAY), issue(&ca, &id("b"), DAY));
        let live = Arc::new(RwLock::new(bundle.clone()));
        let server = server_config(Arc::new(FixedServerCert(b.certified_key())), &live).unwrap();
        // A client that would resume if it could (our own never tries).
        let mut client = (*client_config(&a, &bundle, id("b")).unwrap()).clone();
        client.resumption = rustls::client::Resumption::in_memory_sessions(16);
        let client = Arc::new(client);
        assert_eq!(handshake(&client, &server), rustls::HandshakeKind::Full);
        assert_eq!(handshake(&client, &server), rustls::HandshakeKind::Full);
        // The same check, proven able to fail: a server that sends tickets resumes.
        let mut resuming = (*server).clone();
        resuming.send_tls13_tickets = 2;
        resuming.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
        let resuming = Arc::new(resuming);
        handshake(&client, &resuming);
        assert_eq!(
            handshake(&client, &resuming),
            rustls::HandshakeKind::Resumed
        );
    }

    #[test]
    fn bundle_takes_every_root() {
        let a = Authority::generate("cluster.local", DAY).unwrap();
        let b = Authority::generate("cluster.local", DAY).unwrap();
        let text = format!("{}{}", a.root_pem(), b.root_pem());
        assert_eq!(TrustBundle::from_pem(&text).unwrap().len(), 2);
        assert!(TrustBundle::from_pem("").is_err());
    }

    fn verify(bundle: &TrustBundle, expected: SpiffeId, svid: &Svid) -> Result<(), rustls::Error> {
        let v = SpiffeServerVerifier {
            bundle: bundle.clone(),
            expected,
        };
        let ck = svid.certified_key();
        v.verify_server_cert(
            &ck.cert[0],
            &ck.cert[1..],
            &ServerName::try_from("x").unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
    }

    #[test]
    fn server_check_wants_the_chain_and_the_exact_identity() {
        let ca = Authority::generate("cluster.local", DAY).unwrap();
        let other = Authority::generate("cluster.local", DAY).unwrap();
        let bundle = TrustBundle::from_pem(ca.root_pem()).unwrap();
        let svid = issue(&ca, &id("b"), DAY);
        verify(&bundle, id("b"), &svid).unwrap();
        let e = verify(&bundle, id("c"), &svid).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
        let foreign = issue(&other, &id("b"), DAY);
        // Same issuer name, other key: refused (bad signature or unknown issuer).
        assert!(matches!(
            verify(&bundle, id("b"), &foreign),
            Err(rustls::Error::InvalidCertificate(_))
        ));
    }
}
