//! For tests: an HTTPS endpoint on the loopback that answers as the
//! Kubernetes API server would, and a kube client for it. No API server runs
//! here; this checks our client side over real TLS and real kube-rs.

use std::sync::{Arc, Mutex};

use http::request::Parts;

/// Serves `answer(request parts, body)` (a status and JSON) on a fresh port;
/// the client, and the log of calls (`METHOD /path`, in order).
pub async fn serve(
    answer: impl Fn(&Parts, &[u8]) -> (u16, String) + Send + Sync + 'static,
) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
    use http_body_util::{BodyExt as _, Full};
    use rcgen::{CertificateParams, KeyPair};
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let (answer, log) = (answer.clone(), log.clone());
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (answer, log) = (answer.clone(), log.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        log.lock()
                            .unwrap()
                            .push(format!("{} {}", parts.method, parts.uri.path()));
                        let (status, out) = answer(&parts, &body);
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(bytes::Bytes::from(out)))
                                .unwrap(),
                        )
                    }
                });
            tokio::spawn(
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .into_owned(),
            );
        }
    });
    let mut config = kube::Config::new(format!("https://127.0.0.1:{port}").parse().unwrap());
    config.root_cert = Some(vec![cert.der().to_vec()]);
    (kube::Client::try_from(config).unwrap(), seen)
}
