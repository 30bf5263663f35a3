//! The agent's side of the CA: one `CreateCertificate` call over gRPC (HTTP/2 over
//! TLS 1.3), authenticated by the node's bearer token, and the key and CSR it sends.
//!
//! The CA is checked before anything is sent: its certificate must chain to the
//! trust bundle and name exactly `spiffe://<trust-domain>/ns/weft-system/sa/weft-ca`,
//! so the token never reaches anyone else.
//!
//! Each call opens its own connection. Calls are rare (one per workload per half
//! certificate lifetime), so a pooled connection would save nothing worth its
//! reconnect and health logic.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, sync::Semaphore, task::JoinHandle};
use tokio_rustls::TlsConnector;

use super::{
    ca_identity,
    proto::{self, CertificateRequest, CertificateResponse, Code},
};
use crate::{
    identity::SpiffeId,
    tls::{self, TrustBundle},
};

/// Default bound on a whole call: connect, handshakes, request and answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls one client makes at once; more wait their turn. An agent starting with
/// many workloads would otherwise open a connection per identity at once, and
/// the CA holds at most `--max-connections-per-peer` (32 by default) from one
/// address: it would close the rest, to be retried after a backoff.
pub const MAX_CALLS_IN_FLIGHT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CA client setup: {0}")]
    Setup(String),
    #[error("cannot connect to the CA at {addr}: {source}")]
    Connect {
        addr: CaAddr,
        source: std::io::Error,
    },
    #[error(
        "TLS with the CA at {addr} failed (check that it serves {expected} with a \
         certificate from a root in the trust bundle): {source}"
    )]
    Tls {
        addr: CaAddr,
        expected: String,
        source: std::io::Error,
    },
    #[error("the CA at {addr} did not answer within {timeout:?}")]
    Timeout { addr: CaAddr, timeout: Duration },
    #[error("HTTP/2 with the CA at {addr}: {source}")]
    H2 { addr: CaAddr, source: h2::Error },
    #[error("the CA at {addr} answered something that is not a certificate: {message}")]
    Protocol { addr: CaAddr, message: String },
    /// The CA answered, and said no.
    #[error("the CA refused: {code}: {message}")]
    Refused { code: Code, message: String },
}

impl Error {
    /// Whether the same call may succeed later: every transport failure, and the
    /// refusals gRPC defines as transient. A CA that says "unauthenticated" or
    /// "permission denied" will keep saying it until someone changes its config.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Setup(_) => false,
            Error::Refused { code, .. } => matches!(
                *code,
                Code::UNAVAILABLE
                    | Code::DEADLINE_EXCEEDED
                    | Code::RESOURCE_EXHAUSTED
                    | Code::INTERNAL
            ),
            _ => true,
        }
    }
}

/// Where the CA is: `host:port`, with a name (the CA's Service in a cluster,
/// resolved at each connection) or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaAddr {
    host: String,
    port: u16,
}

impl std::str::FromStr for CaAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(addr.into());
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("{s:?}: the port is not a number"))?;
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !name_ok {
            return Err(format!(
                "{s:?}: {host:?} is neither an address nor a DNS name"
            ));
        }
        Ok(CaAddr {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl From<SocketAddr> for CaAddr {
    fn from(a: SocketAddr) -> Self {
        CaAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for CaAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl CaAddr {
    /// The address itself, when it is one (an embedded CA binds it).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip = self.host.parse::<std::net::IpAddr>().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }
}

/// A client of one CA. Cheap to clone: the TLS config is shared.
#[derive(Clone)]
pub struct CaClient {
    addr: CaAddr,
    authorization: HeaderValue,
    /// Where the token is read again at each call: a projected service-account
    /// token, which the kubelet replaces before it expires.
    token_file: Option<std::path::PathBuf>,
    /// The trust bundle in force: each call builds its TLS config from it, so
    /// a CA serving under a root newly added to the bundle is trusted, and one
    /// under a root since removed is not, without a restart.
    bundle: tls::LiveBundle,
    expected: SpiffeId,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the token.
        f.debug_struct("CaClient")
            .field("addr", &self.addr)
            .field("expected", &self.expected.to_string())
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// A client of the CA at `addr` for `trust_domain`, trusting `bundle` and
    /// authenticating with this node's `token`.
    pub fn new(
        addr: impl Into<CaAddr>,
        token: String,
        bundle: TrustBundle,
        trust_domain: &str,
    ) -> Result<Self, Error> {
        let expected = ca_identity(trust_domain).map_err(|e| Error::Setup(e.to_string()))?;
        let mut authorization = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Error::Setup("the node token is not a valid header value".into()))?;
        authorization.set_sensitive(true);
        // Checked now, so a bad setup fails at start rather than at each call.
        tls::anonymous_client_config(&bundle, expected.clone())
            .map_err(|e| Error::Setup(e.to_string()))?;
        Ok(CaClient {
            addr: addr.into(),
            authorization,
            token_file: None,
            bundle: Arc::new(std::sync::RwLock::new(bundle)),
            expected,
            timeout: DEFAULT_TIMEOUT,
            in_flight: Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT)),
        })
    }

    /// Follows `bundle` (the agent's, which it reloads when the file changes)
    /// instead of the one given at creation.
    pub fn following(mut self, bundle: tls::LiveBundle) -> Self {
        self.bundle = bundle;
        self
    }

    /// Reads the token from `path` at each call instead of using the one given
    /// at creation (which was read from it too): the file may be rotated.
    pub fn with_token_file(mut self, path: std::path::PathBuf) -> Self {
        self.token_file = Some(path);
        self
    }

    fn authorization(&self) -> Result<HeaderValue, Error> {
        let Some(path) = &self.token_file else {
            return Ok(self.authorization.clone());
        };
        let token =
            super::tokens::read_token_file(path).map_err(|e| Error::Setup(e.to_string()))?;
        let mut value = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Error::Setup("the token is not a valid header value".into()))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// Bounds every call to `timeout` (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn addr(&self) -> &CaAddr {
        &self.addr
    }

    /// Asks the CA to sign `csr_pem` for `id`, valid for `ttl` (the CA may shorten
    /// it). Returns the chain as PEM, leaf first.
    pub async fn sign(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, Error> {
        // Waiting for a turn is not the CA's slowness: the timeout starts after.
        let _turn = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| Error::Setup("the CA client is closed".into()))?;
        let call = self.create_certificate(csr_pem, id, ttl);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                addr: self.addr.clone(),
                timeout: self.timeout,
            }),
        }
    }

    async fn create_certificate(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, Error> {
        let message = CertificateRequest {
            csr: csr_pem.to_owned(),
            validity_secs: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            impersonated_identity: Some(id.to_string()),
        }
        .encode();
        let request = self.request(proto::CREATE_CERTIFICATE)?;
        let (send, _conn) = self.connect().await?;
        let mut send = send.ready().await.map_err(|e| self.h2(e))?;
        let (response, mut body) = send.send_request(request, false).map_err(|e| self.h2(e))?;
        // A CA that refuses before reading the body may reset the stream first: the
        // answer, not this error, then says why.
        if let Err(e) = body.send_data(Bytes::from(proto::frame(&message)), true) {
            tracing::debug!(error = %e, "request body not sent");
        }
        let response = response.await.map_err(|e| self.h2(e))?;
        let (parts, mut body) = response.into_parts();
        if parts.status != StatusCode::OK {
            return Err(self.protocol(format!("HTTP status {}", parts.status)));
        }
        // Trailers-only: an error (or a bogus empty success) with no body.
        if let Some(code) = status_of(&parts.headers) {
            let code = code.map_err(|m| self.protocol(m))?;
            return Err(refusal(code, &parts.headers)
                .unwrap_or_else(|| self.protocol("success without a certificate".into())));
        }
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            return Err(self.protocol("the answer is not gRPC".into()));
        }
        let mut buf = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| self.h2(e))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if buf.len() + chunk.len() > proto::MAX_MESSAGE + 5 {
                return Err(self.protocol("the answer is over the size limit".into()));
            }
            buf.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| self.h2(e))?
            .unwrap_or_default();
        let code = status_of(&trailers)
            .ok_or_else(|| self.protocol("no grpc-status".into()))?
            .map_err(|m| self.protocol(m))?;
        if let Some(refused) = refusal(code, &trailers) {
            return Err(refused);
        }
        let message = match proto::unframe(&buf) {
            Ok(Some((message, used))) if used == buf.len() => message,
            Ok(_) => return Err(self.protocol("not exactly one gRPC message".into())),
            Err(e) => return Err(self.protocol(e.to_string())),
        };
        let chain = CertificateResponse::decode(message)
            .map_err(|e| self.protocol(e.to_string()))?
            .cert_chain;
        let leaf = chain
            .first()
            .ok_or_else(|| self.protocol("an empty certificate chain".into()))?;
        let got = tls::certs_from_pem(leaf)
            .and_then(|certs| tls::identity_of(&certs[0]))
            .map_err(|e| self.protocol(format!("the leaf certificate: {e}")))?;
        if &got != id {
            return Err(self.protocol(format!("a certificate for {got}, asked for {id}")));
        }
        Ok(chain)
    }

    /// A TLS + HTTP/2 connection to the CA. The connection is driven by a task
    /// that the returned guard aborts when dropped, so a timed-out call leaves
    /// nothing behind.
    pub(crate) async fn connect(&self) -> Result<(SendRequest<Bytes>, AbortOnDrop), Error> {
        // A name is resolved at each connection: the CA's Service may move.
        let tcp = TcpStream::connect((self.addr.host.as_str(), self.addr.port))
            .await
            .map_err(|source| Error::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        // No SNI for an IP address; the verifier checks the SPIFFE ID, not a name.
        let name = match self.addr.host.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(self.addr.host.clone())
                .map_err(|e| Error::Setup(format!("--ca-addr {}: {e}", self.addr)))?,
        };
        // A config per call (microseconds, next to a CA round trip): the
        // bundle of this moment.
        let config =
            tls::anonymous_client_config(&tls::current(&self.bundle), self.expected.clone())
                .map_err(|e| Error::Setup(e.to_string()))?;
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| Error::Tls {
                addr: self.addr.clone(),
                expected: self.expected.to_string(),
                source,
            })?;
        let (send, conn) = h2::client::handshake(tls).await.map_err(|e| self.h2(e))?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "CA connection ended");
            }
        });
        Ok((send, AbortOnDrop(task)))
    }

    /// A gRPC request head for `path`, with the bearer token.
    pub(crate) fn request(&self, path: &str) -> Result<Request<()>, Error> {
        let uri = http::Uri::builder()
            .scheme("https")
            .authority(self.addr.to_string())
            .path_and_query(path)
            .build()
            .map_err(|e| Error::Setup(e.to_string()))?;
        Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .header(header::AUTHORIZATION, self.authorization()?)
            .body(())
            .map_err(|e| Error::Setup(e.to_string()))
    }

    fn h2(&self, source: h2::Error) -> Error {
        Error::H2 {
            addr: self.addr.clone(),
            source,
        }
    }

    fn protocol(&self, message: String) -> Error {
        Error::Protocol {
            addr: self.addr.clone(),
            message,
        }
    }
}

/// Aborts the task driving a connection when the call is over.
pub(crate) struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The `grpc-status` of a header block: `None` if absent.
fn status_of(headers: &HeaderMap) -> Option<Result<Code, String>> {
    let value = headers.get("grpc-status")?;
    Some(Code::parse(value.as_bytes()).ok_or_else(|| format!("bad grpc-status {value:?}")))
}

/// The refusal a non-OK status means.
fn refusal(code: Code, headers: &HeaderMap) -> Option<Error> {
    (code != Code::OK).then(|| Error::Refused {
        code,
        message: headers
            .get("grpc-message")
            .map(|v| proto::decode_message(v.as_bytes()))
            .unwrap_or_default(),
    })
}
