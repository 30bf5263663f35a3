//! Speaking HBONE by hand, from inside a pod's network namespace: a prober that
//! behaves like a broken or hostile peer of port 15008, a fake HBONE server that
//! records what reaches it, and certificates to present.
//!
//! Both run on a dedicated thread that enters the namespace (`setns` on that thread
//! only, so the rest of the test process stays where it is) and drives a
//! current-thread tokio runtime. The test process is in no pod's cgroup, so the
//! kernel capture leaves these sockets alone: the prober reaches the destination
//! pod's 15008 directly, as another node's agent would.
//!
//! ```no_run
//! # use weft_tests::probe::{Probe, Outcome};
//! # fn f(src: &weft_tests::Pod, dst: &weft_tests::Pod, cert: weft_tests::probe::CertKey) {
//! let report = Probe::connect(dst.ip, 15008, &format!("{}:9000", dst.ip))
//!     .cert(cert)
//!     .run(&src.netns_path)
//!     .unwrap();
//! assert!(matches!(report.outcome, Outcome::Connected { .. }));
//! # }
//! ```

use std::{
    fmt,
    fs::File,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex, mpsc},
    task::{Context, Poll},
    thread::{self, JoinHandle},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, anyhow};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName as TlsName, ServerConfig,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft::{ca::Authority, identity::SpiffeId, tls};

/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// How long one probe may take in all, so a silent peer cannot hang a test. Not
/// a measurement: every step normally finishes in milliseconds.
pub const PROBE_LIMIT: Duration = Duration::from_secs(20);

/// Runs `f` on a new thread inside the network namespace at `netns` (a
/// `/var/run/netns/...` path), in a current-thread tokio runtime, and returns
/// its result.
pub fn run_in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    thread::Builder::new()
        .name("weft-probe".into())
        .spawn(move || {
            enter(&ns)?;
            runtime()?.block_on(f())
        })
        .context("spawning the probe thread")?
        .join()
        .map_err(|_| anyhow!("the probe thread panicked"))?
}

/// Moves the calling thread (only it) into the network namespace `ns`.
fn enter(ns: &File) -> Result<()> {
    // SAFETY: setns only reads the descriptor, which `ns` keeps open; for a
    // network namespace it affects the calling thread alone.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("setns into the pod's namespace");
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")
}

// ---------------------------------------------------------------------------
// Certificates

/// A certificate chain (leaf first) and its PKCS#8 key, both PEM.
#[derive(Clone)]
pub struct CertKey {
    pub chain_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertKey(..)")
    }
}

impl CertKey {
    /// A regular SVID for `id` from `ca`, the way `weft ca` signs one (fresh
    /// P-256 key, CSR, `Authority::sign`).
    pub fn issue(ca: &Authority, id: &str, ttl: Duration) -> Result<CertKey> {
        let id: SpiffeId = id
            .parse()
            .with_context(|| format!("bad SPIFFE ID {id:?}"))?;
        let (key_pem, csr) = weft::ca::new_key_and_csr(&id)?;
        let chain = ca.sign(&csr, &id, ttl)?;
        Ok(CertKey {
            chain_pem: chain.concat(),
            key_pem,
        })
    }

    /// The certificates, DER.
    pub fn certs(&self) -> Result<Vec<CertificateDer<'static>>> {
        Ok(tls::certs_from_pem(&self.chain_pem)?)
    }

    /// The key, DER.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>> {
        let key = KeyPair::from_pem(&self.key_pem).context("parsing the key")?;
        Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
    }
}

/// An end-entity certificate made by hand, with whatever names and validity a
/// test needs (things `Authority::sign` would never produce).
#[derive(Debug, Clone)]
pub struct Leaf {
    /// URI SANs (a SPIFFE ID, several, or something else).
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Leaf {
    /// One URI SAN, valid from a minute ago for an hour.
    pub fn uri(uri: &str) -> Leaf {
        let now = SystemTime::now();
        Leaf {
            uris: vec![uri.to_owned()],
            dns_names: Vec::new(),
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
        }
    }

    /// Valid from `not_before` to `not_after`.
    pub fn valid(mut self, not_before: SystemTime, not_after: SystemTime) -> Leaf {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Signs the leaf with a CA's certificate and key (PEM): P-256, serverAuth
    /// and clientAuth, like a workload certificate. The chain is the leaf alone.
    pub fn sign(&self, ca_cert_pem: &str, ca_key_pem: &str) -> Result<CertKey> {
        let ca_key = KeyPair::from_pem(ca_key_pem).context("parsing the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("parsing the CA certificate")?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for uri in &self.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        for name in &self.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertKey {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

// ---------------------------------------------------------------------------
// The prober

/// One attempt at an HBONE exchange with a server, from the TCP connect up to
/// a `CONNECT` and an echo round trip, with a way to go wrong at each step.
#[derive(Debug, Clone)]
pub struct Probe {
    pub server: SocketAddr,
    /// Sent right after the TCP connect instead of a TLS handshake.
    pub plaintext: Option<Vec<u8>>,
    /// The client certificate, if any.
    pub cert: Option<CertKey>,
    /// Sent right after the TLS handshake instead of HTTP/2.
    pub garbage: Option<Vec<u8>>,
    pub method: Method,
    /// `ip:port`, the `:authority` of the request.
    pub authority: String,
    /// Sent on the tunnel after a 200; the probe expects it echoed.
    pub message: Vec<u8>,
    /// Extra request headers (name, value).
    pub headers: Vec<(String, String)>,
}

/// What became of a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The TCP connect itself failed.
    ConnectFailed(String),
    /// TLS failed: the handshake, or an alert right after it (in TLS 1.3 the
    /// server judges the client's certificate after the client has finished).
    TlsRefused(String),
    /// The connection (or the stream) ended, without an HTTP status.
    Closed(String),
    /// The server answered with a status other than 200.
    Status(u16),
    /// 200, then the tunnel broke before the echo came back whole.
    BrokenTunnel(String),
    /// 200, and the message came back through the tunnel.
    Connected { reply: Vec<u8> },
}

impl Outcome {
    /// The peer refused before any status: TLS failed or the connection closed.
    pub fn refused_before_status(&self) -> bool {
        matches!(self, Outcome::TlsRefused(_) | Outcome::Closed(_))
    }
}

/// A probe's outcome, and the local address it used (which the server logs as
/// the peer).
#[derive(Debug, Clone)]
pub struct Report {
    pub local: Option<SocketAddr>,
    pub outcome: Outcome,
}

impl Probe {
    /// A well-formed `CONNECT authority` to `ip:port`, without a client
    /// certificate (add one with [`Probe::cert`]).
    pub fn connect(ip: impl Into<IpAddr>, port: u16, authority: &str) -> Probe {
        Probe {
            server: SocketAddr::new(ip.into(), port),
            plaintext: None,
            cert: None,
            garbage: None,
            method: Method::CONNECT,
            authority: authority.to_owned(),
            message: b"hello through the tunnel".to_vec(),
            headers: Vec::new(),
        }
    }

    /// Adds a request header (as a peer could: a `forwarded` claim, say).
    pub fn header(mut self, name: &str, value: &str) -> Probe {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn cert(mut self, cert: CertKey) -> Probe {
        self.cert = Some(cert);
        self
    }

    /// Send `bytes` instead of a TLS ClientHello.
    pub fn plaintext(mut self, bytes: &[u8]) -> Probe {
        self.plaintext = Some(bytes.to_vec());
        self
    }

    /// Send `bytes` after the TLS handshake instead of HTTP/2.
    pub fn garbage(mut self, bytes: &[u8]) -> Probe {
        self.garbage = Some(bytes.to_vec());
        self
    }

    pub fn method(mut self, method: Method) -> Probe {
        self.method = method;
        self
    }

    /// Runs the probe from the network namespace at `netns`.
    pub fn run(&self, netns: &Path) -> Result<Report> {
        let probe = self.clone();
        run_in_netns(netns, move || async move {
            let mut local = None;
            let outcome = match timeout(PROBE_LIMIT, probe.exchange(&mut local)).await {
                Ok(r) => r?,
                Err(_) => Outcome::Closed(format!("no outcome within {PROBE_LIMIT:?}")),
            };
            Ok(Report { local, outcome })
        })
    }

    async fn exchange(&self, local: &mut Option<SocketAddr>) -> Result<Outcome> {
        let mut tcp = match TcpStream::connect(self.server).await {
            Ok(s) => s,
            Err(e) => return Ok(Outcome::ConnectFailed(e.to_string())),
        };
        *local = tcp.local_addr().ok();
        let _ = tcp.set_nodelay(true);
        if let Some(bytes) = &self.plaintext {
            if let Err(e) = tcp.write_all(bytes).await {
                return Ok(Outcome::Closed(format!("sending: {e}")));
            }
            return Ok(Outcome::Closed(read_to_close(&mut tcp).await));
        }

        let connector = TlsConnector::from(self.client_config()?);
        let name = ServerName::try_from("hbone.probe.invalid")?;
        let mut tls = match connector.connect(name, tcp).await {
            Ok(t) => t,
            Err(e) => return Ok(Outcome::TlsRefused(e.to_string())),
        };
        if let Some(bytes) = &self.garbage {
            if let Err(e) = tls.write_all(bytes).await {
                return Ok(classify_io(&e));
            }
            let _ = tls.flush().await;
            let mut buf = [0u8; 4096];
            let mut got = 0;
            return Ok(loop {
                match tls.read(&mut buf).await {
                    Ok(0) => break Outcome::Closed(format!("{got} bytes back, then EOF")),
                    Ok(n) => got += n,
                    Err(e) => break classify_io(&e),
                }
            });
        }

        // h2 reports I/O errors as text; the recorder keeps the first one as it
        // was, so a TLS alert is told apart from a plain close.
        let first_error = Arc::new(Mutex::new(None));
        let tls = Recorder {
            inner: tls,
            first_error: first_error.clone(),
        };
        let recorded = move || {
            first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        let (send, conn) = match h2::client::Builder::new().handshake::<_, Bytes>(tls).await {
            Ok(h) => h,
            Err(e) => return Ok(recorded().unwrap_or_else(|| classify_h2(&e))),
        };
        let (conn_tx, mut conn_rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = conn_tx.send(conn.await);
        });
        let outcome = self.request(send).await;
        match outcome {
            // A stream-level answer, or the connection's own error explains it.
            Err(e) if e.reason().is_some() && !e.is_go_away() => {
                Ok(Outcome::Closed(format!("stream reset: {e}")))
            }
            Err(e) => {
                // The response failed because the connection did: its error says
                // why (a TLS alert, most likely).
                let conn = timeout(Duration::from_secs(2), &mut conn_rx).await;
                Ok(recorded().unwrap_or_else(|| match conn {
                    Ok(Ok(Err(ce))) => classify_h2(&ce),
                    _ => classify_h2(&e),
                }))
            }
            Ok(o) => Ok(o),
        }
    }

    /// Sends the request; on 200, the message round trip.
    async fn request(&self, send: h2::client::SendRequest<Bytes>) -> Result<Outcome, h2::Error> {
        let mut send = send.ready().await?;
        let uri = if self.method == Method::CONNECT {
            self.authority.clone()
        } else {
            format!("https://{}/", self.authority)
        };
        let mut req = Request::builder().method(self.method.clone()).uri(uri);
        for (name, value) in &self.headers {
            req = req.header(name.as_str(), value.as_str());
        }
        let req = req.body(()).expect("a valid request");
        let (response, mut body_tx) = send.send_request(req, false)?;
        let response = response.await?;
        let status = response.status();
        if status != StatusCode::OK {
            return Ok(Outcome::Status(status.as_u16()));
        }
        let mut body = response.into_body();
        if let Err(e) = body_tx.send_data(Bytes::from(self.message.clone()), false) {
            return Ok(Outcome::BrokenTunnel(format!("sending: {e}")));
        }
        let mut reply = Vec::new();
        let mut ended = false;
        while reply.len() < self.message.len() {
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    reply.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Ok(Outcome::BrokenTunnel(format!("reading: {e}"))),
                None => {
                    ended = true;
                    break;
                }
            }
        }
        // Half-close; the echo server then closes its side, which ends the stream.
        let _ = body_tx.send_data(Bytes::new(), true);
        while !ended {
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    reply.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Ok(Outcome::BrokenTunnel(format!("reading: {e}"))),
                None => ended = true,
            }
        }
        if reply == self.message {
            Ok(Outcome::Connected { reply })
        } else {
            Ok(Outcome::BrokenTunnel(format!(
                "the echo came back as {:?}",
                String::from_utf8_lossy(&reply)
            )))
        }
    }

    fn client_config(&self) -> Result<Arc<ClientConfig>> {
        client_config(self.cert.as_ref())
    }
}

/// Reads until the peer closes or fails; says how it ended.
/// A TLS 1.3 client config as an HBONE peer's (ALPN h2, no resumption) that
/// accepts any server certificate, presenting `cert` if given.
pub fn client_config(cert: Option<&CertKey>) -> Result<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match cert {
        Some(c) => builder.with_client_auth_cert(c.certs()?, c.key()?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

async fn read_to_close(s: &mut (impl AsyncRead + Unpin)) -> String {
    let mut buf = [0u8; 4096];
    let mut got = 0;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return format!("{got} bytes back, then EOF"),
            Ok(n) => got += n,
            Err(e) => return format!("{got} bytes back, then {e}"),
        }
    }
}

/// A stream that remembers how its reads or writes failed: the first failure, or
/// the first TLS alert.
struct Recorder<S> {
    inner: S,
    first_error: Arc<Mutex<Option<Outcome>>>,
}

impl<S> Recorder<S> {
    fn record<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            // A write can fail (broken pipe) before the read that brings the
            // peer's TLS alert; the alert is the better explanation.
            let this = classify_io(e);
            let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
            let better = matches!(this, Outcome::TlsRefused(_))
                && !matches!(*first, Some(Outcome::TlsRefused(_)));
            if first.is_none() || better {
                *first = Some(this);
            }
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.record(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.record(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.record(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.record(r)
    }
}

fn classify_io(e: &io::Error) -> Outcome {
    let tls_error = e
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    if tls_error {
        Outcome::TlsRefused(e.to_string())
    } else {
        Outcome::Closed(e.to_string())
    }
}

fn classify_h2(e: &h2::Error) -> Outcome {
    match e.get_io() {
        Some(io) => classify_io(io),
        None => Outcome::Closed(e.to_string()),
    }
}

/// Accepts any server certificate (the server is what is under test), but
/// checks the handshake signature so the TLS exchange itself is real.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &tls::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// The fake server

/// What reached a [`FakeServer`].
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// TCP connections accepted.
    pub connections: usize,
    /// TLS handshakes that failed, and why (e.g. the client rejected our
    /// certificate).
    pub tls_failures: Vec<String>,
    /// TLS handshakes that completed.
    pub handshakes: usize,
    /// HTTP/2 requests, as `"METHOD uri"`.
    pub requests: Vec<String>,
    /// The headers of each of [`Seen::requests`] (name, value).
    pub headers: Vec<Vec<(String, String)>>,
}

impl Seen {
    /// The `CONNECT` requests among [`Seen::requests`].
    pub fn connects(&self) -> Vec<&String> {
        self.requests
            .iter()
            .filter(|r| r.starts_with("CONNECT "))
            .collect()
    }
}

/// An HBONE server impostor: TLS 1.3 with a given certificate, ALPN h2, a client
/// certificate required but not checked, HTTP/2; every request is recorded and
/// answered 503 (it never connects anywhere). Stops when dropped.
pub struct FakeServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeServer")
            .field("addr", &self.addr)
            .field("seen", &self.seen())
            .finish()
    }
}

impl FakeServer {
    /// Listens on `addr` inside the network namespace at `netns`, presenting
    /// `cert`; returns once it listens.
    pub fn start(netns: &Path, addr: SocketAddr, cert: &CertKey) -> Result<FakeServer> {
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let config = fake_server_config(cert)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<SocketAddr>>();
        let seen2 = seen.clone();
        let thread = thread::Builder::new()
            .name("weft-fake-hbone".into())
            .spawn(move || {
                let setup = enter(&ns).and_then(|()| runtime());
                let rt = match setup {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow!("binding {addr}: {e}")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(listener.local_addr().map_err(Into::into));
                    let acceptor = TlsAcceptor::from(config);
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(listener, acceptor, seen2) => {}
                    }
                });
            })
            .context("spawning the fake server's thread")?;
        let addr = ready_rx
            .recv()
            .map_err(|_| anyhow!("the fake server's thread died"))??;
        Ok(FakeServer {
            addr,
            seen,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, seen: Arc<Mutex<Seen>>) {
    let record = move |seen: &Mutex<Seen>, f: &dyn Fn(&mut Seen)| {
        f(&mut seen.lock().unwrap_or_else(|e| e.into_inner()))
    };
    loop {
        let Ok((tcp, _peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        record(&seen, &|s| s.connections += 1);
        let (acceptor, seen) = (acceptor.clone(), seen.clone());
        tokio::spawn(async move {
            let tls = match timeout(PROBE_LIMIT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    let e = e.to_string();
                    return record(&seen, &|s| s.tls_failures.push(e.clone()));
                }
                Err(_) => {
                    return record(&seen, &|s| s.tls_failures.push("timed out".into()));
                }
            };
            record(&seen, &|s| s.handshakes += 1);
            let Ok(mut h2) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = h2.accept().await {
                let line = format!("{} {}", req.method(), req.uri());
                let headers: Vec<(String, String)> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                    .collect();
                record(&seen, &|s| {
                    s.requests.push(line.clone());
                    s.headers.push(headers.clone());
                });
                let resp = Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(())
                    .unwrap_or_default();
                let _ = respond.send_response(resp, true);
            }
        });
    }
}

fn fake_server_config(cert: &CertKey) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyClient))
        .with_single_cert(cert.certs()?, cert.key()?)?;
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Wants a client certificate, accepts any (with a valid handshake signature).
#[derive(Debug)]
struct AnyClient;

impl ClientCertVerifier for AnyClient {
    fn root_hint_subjects(&self) -> &[TlsName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
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
        AnyServer.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        AnyServer.supported_verify_schemes()
    }
}
