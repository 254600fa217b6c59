//! Certificates and an HTTPS client for the `tls` conformance case.
//!
//! [`TestCa`] makes a throwaway CA and leaf certificates whose PEM goes
//! straight into a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`);
//! [`https_get`] connects with SNI and ALPN (`h2`, `http/1.1`), trusts only
//! that CA, and reports which protocol was negotiated. rustls runs on its
//! `ring` provider, named explicitly so no process-wide default is needed.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::client::buffer;
use crate::{HttpReply, REQUEST_TIMEOUT};

/// A throwaway certificate authority for one test.
pub struct TestCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, in PEM: the `tls.crt` and `tls.key` of a
/// `kubernetes.io/tls` Secret.
#[derive(Clone, Debug)]
pub struct LeafCert {
    /// The certificate chain: the leaf alone (the CA is the trust anchor).
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key.
    pub key_pem: String,
}

impl TestCa {
    /// A new CA (ECDSA P-256) named `Knarr test CA`.
    pub fn new() -> anyhow::Result<TestCa> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Knarr test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate in PEM, for clients to trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `dns_names` (wildcards like `*.example.com`
    /// allowed), signed by this CA.
    pub fn issue(&self, dns_names: &[&str]) -> anyhow::Result<LeafCert> {
        let key = KeyPair::generate().context("generating a leaf key")?;
        let names: Vec<String> = dns_names.iter().map(|&n| n.to_owned()).collect();
        let mut params = CertificateParams::new(names)
            .with_context(|| format!("certificate names {dns_names:?}"))?;
        if let Some(first) = dns_names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the leaf")?;
        Ok(LeafCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// An HTTPS response and the ALPN protocol the TLS handshake settled on.
#[derive(Clone, Debug)]
pub struct HttpsReply {
    /// `Some("h2")`, `Some("http/1.1")`, or `None` if the server chose none
    /// (then HTTP/1.1 was spoken).
    pub alpn: Option<String>,
    /// The response itself.
    pub reply: HttpReply,
}

/// `GET {path}` over TLS to `addr`, with SNI and `Host`/`:authority` =
/// `sni_host`, offering ALPN `h2` and `http/1.1`, trusting only `ca_pem`.
/// Speaks whichever protocol was negotiated.
pub async fn https_get(
    addr: SocketAddr,
    sni_host: &str,
    path: &str,
    ca_pem: &str,
) -> anyhow::Result<HttpsReply> {
    https_get_with_alpn(addr, sni_host, path, ca_pem, &["h2", "http/1.1"]).await
}

/// [`https_get`] offering exactly `alpn` (e.g. `&["http/1.1"]`, or `&[]` for
/// none).
pub async fn https_get_with_alpn(
    addr: SocketAddr,
    sni_host: &str,
    path: &str,
    ca_pem: &str,
    alpn: &[&str],
) -> anyhow::Result<HttpsReply> {
    let what = format!("GET https://{sni_host}{path} via {addr}");
    let connector = TlsConnector::from(Arc::new(client_config(ca_pem, alpn)?));
    let server_name = ServerName::try_from(sni_host.to_owned())
        .with_context(|| format!("{what}: {sni_host:?} is not a valid server name"))?;
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.context("connect")?;
        tcp.set_nodelay(true)?;
        let tls = connector
            .connect(server_name, tcp)
            .await
            .context("TLS handshake")?;
        let alpn = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let io = TokioIo::new(tls);
        let resp = if alpn.as_deref() == Some("h2") {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .context("HTTP/2 handshake")?;
            let conn = tokio::spawn(conn);
            // h2 takes `:authority` from an absolute URI.
            let req =
                Request::get(format!("https://{sni_host}{path}")).body(Empty::<Bytes>::new())?;
            let resp = sender.send_request(req).await.context("sending request");
            let reply = buffer(resp?).await;
            conn.abort();
            reply?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .context("HTTP/1.1 handshake")?;
            let conn = tokio::spawn(conn);
            let req = Request::get(path)
                .header(header::HOST, sni_host)
                .body(Empty::<Bytes>::new())?;
            let resp = sender.send_request(req).await.context("sending request");
            let reply = buffer(resp?).await;
            conn.abort();
            reply?
        };
        anyhow::Ok(HttpsReply { alpn, reply: resp })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .with_context(|| format!("{what}: no complete response within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| what)
}

fn client_config(ca_pem: &str, alpn: &[&str]) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("parsing the CA PEM")?)
            .context("adding the CA")?;
    }
    anyhow::ensure!(!roots.is_empty(), "no certificate in the CA PEM");
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// A rustls server config for `leaf`, offering ALPN `alpn` (for test
/// servers that stand in for Envoy's TLS listener).
pub fn server_config(leaf: &LeafCert, alpn: &[&str]) -> anyhow::Result<rustls::ServerConfig> {
    let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the certificate PEM")?;
    let key =
        PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).context("parsing the key PEM")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("certificate and key do not match")?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Upstream;
    use tokio::net::TcpListener;

    /// A stand-in for Envoy's TLS listener: terminates TLS with `leaf` and
    /// answers HTTP/1.1 or h2 with "<version> <host> <path>" as it saw them.
    async fn tls_server(
        leaf: &LeafCert,
        alpn: &[&str],
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(server_config(leaf, alpn).unwrap()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let host = req
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .or_else(|| {
                                    req.headers()
                                        .get(header::HOST)
                                        .and_then(|h| h.to_str().ok())
                                        .map(str::to_owned)
                                })
                                .unwrap_or_default();
                            let body = format!("{:?} {host} {}", req.version(), req.uri().path());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from(body)),
                            ))
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn https_get_negotiates_h2_and_verifies_the_name() {
        let ca = TestCa::new().unwrap();
        let leaf = ca
            .issue(&["secure.example.com", "*.wild.example.com"])
            .unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let (addr, server) = tls_server(&leaf, &["h2", "http/1.1"]).await;

        let got = https_get(addr, "secure.example.com", "/p", ca.cert_pem())
            .await
            .unwrap();
        assert_eq!(got.alpn.as_deref(), Some("h2"));
        assert_eq!(got.reply.status, 200);
        assert_eq!(got.reply.body, "HTTP/2.0 secure.example.com /p");

        let got = https_get_with_alpn(
            addr,
            "a.wild.example.com",
            "/q",
            ca.cert_pem(),
            &["http/1.1"],
        )
        .await
        .unwrap();
        assert_eq!(got.alpn.as_deref(), Some("http/1.1"));
        assert_eq!(got.reply.body, "HTTP/1.1 a.wild.example.com /q");

        // A name the certificate does not cover, and a CA we did not use.
        let err = https_get(addr, "other.example.com", "/", ca.cert_pem())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("TLS handshake"), "{err:#}");
        let stranger = TestCa::new().unwrap();
        let err = https_get(addr, "secure.example.com", "/", stranger.cert_pem())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("TLS handshake"), "{err:#}");
        server.abort();
    }

    #[tokio::test]
    async fn a_server_without_alpn_gets_http1() {
        let ca = TestCa::new().unwrap();
        let leaf = ca.issue(&["plain.example.com"]).unwrap();
        let (addr, server) = tls_server(&leaf, &[]).await;
        let got = https_get(addr, "plain.example.com", "/", ca.cert_pem())
            .await
            .unwrap();
        assert_eq!(got.alpn, None);
        assert_eq!(got.reply.body, "HTTP/1.1 plain.example.com /");
        server.abort();
    }

    #[tokio::test]
    async fn tls_to_a_plain_port_fails_the_handshake() {
        let up = Upstream::start("plain").await.unwrap();
        let ca = TestCa::new().unwrap();
        let err = https_get(up.addr(), "x.example.com", "/", ca.cert_pem())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("TLS handshake"), "{err:#}");
    }
}
