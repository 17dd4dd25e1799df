//! TLS for the HTTP API: the certificate each node serves it with, the
//! server's rustls configuration, and the client's.
//!
//! The cluster CA that signs node certificates also signs one API
//! certificate per node (`api.pem`, written by `ferry cluster init` and
//! `ferry node add`), whose subject alternative names are what a client
//! reaches the API by: the node's name, `localhost`, the listen address and
//! the loopback addresses. Clients trust that CA alone. A client may present
//! a certificate; one that does not chain to the cluster CA is refused in the
//! handshake, none at all is fine (the token authenticates the caller).
//! Everything runs on ring, the provider of the cluster's own streams.
//!
//! The listener ([`serve_https`]) looks at a connection's first byte before
//! the handshake: a TLS client starts with a handshake record (0x16), so
//! anything else is a plain-HTTP client, answered `400` with a sentence
//! saying to use https:// instead of a TLS alert it cannot read.

use actix_http::{body::MessageBody, HttpService, Request};
use actix_service::{map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::{
    fn_factory, fn_service, AppConfig, Response, Server, Service, ServiceFactory,
};
use anyhow::Context;
use ferry_transport::{ClusterCa, NodeCredentials};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

/// The names an API listening on `listen` is reached by: (DNS names, IPs).
pub fn api_cert_names(node_name: &str, listen: SocketAddr) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec![node_name.to_string()];
    if node_name != "localhost" {
        dns.push("localhost".into());
    }
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
        ips.push(listen.ip());
    }
    (dns, ips)
}

/// Signs the API certificate of node `node_name` listening on `listen` and
/// writes it with its key to `path` (mode 0600).
pub fn write_api_cert(
    ca: &ClusterCa,
    node_name: &str,
    listen: SocketAddr,
    path: &Path,
) -> anyhow::Result<()> {
    let (dns, ips) = api_cert_names(node_name, listen);
    let (cert, key) = ca
        .issue_api_server(&dns, &ips)
        .context("signing the API certificate")?;
    crate::config::write_secret(path, &format!("{}\n{key}", cert.trim_end()))
}

fn certs(pem: &str, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading the certificates of {what}"))?;
    if certs.is_empty() {
        anyhow::bail!("{what} holds no certificate");
    }
    Ok(certs)
}

fn roots(ca_pem: &str, what: &str) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, what)? {
        roots
            .add(c)
            .with_context(|| format!("{what}: not a usable CA certificate"))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ferry_transport::crypto_provider())
}

/// The API server's configuration: the certificate and key in `cert_path`,
/// and client certificates optional but, when presented, checked against
/// the CA in the node's `credentials`.
pub fn server_config(cert_path: &Path, credentials: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let what = cert_path.display().to_string();
    let pem = std::fs::read_to_string(cert_path)
        .with_context(|| format!("reading the API certificate {what}"))?;
    let chain = certs(&pem, &what)?;
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .with_context(|| format!("reading the API key in {what}"))?;
    let creds_text = std::fs::read_to_string(credentials)
        .with_context(|| format!("reading {}", credentials.display()))?;
    let creds = NodeCredentials::from_pem(&creds_text)?;
    let roots = roots(&creds.ca_cert_pem, "the cluster CA")?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .context("building the API's client verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| format!("the API certificate {what} does not match its key"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The first byte of a TLS connection: a handshake record.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// What a plain-HTTP request to the HTTPS port gets back.
pub fn plain_http_refusal(addr: SocketAddr) -> String {
    let body = format!(
        "{{\"code\":\"https_required\",\"message\":\"this API speaks HTTPS: use https://{addr}/ \
         and trust the cluster CA (ca.pem in the cluster directory)\"}}"
    );
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serves the app `make_app` builds (one per worker, as `HttpServer::new`
/// takes it) over HTTPS on `listener` with `tls`, two workers; a connection
/// whose first byte is not a TLS handshake is answered
/// [`plain_http_refusal`] and closed.
pub fn serve_https<F, I, S, B>(
    listener: std::net::TcpListener,
    tls: rustls::ServerConfig,
    make_app: F,
) -> std::io::Result<Server>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let addr = listener.local_addr()?;
    let refusal = Arc::new(plain_http_refusal(addr));
    Server::build()
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .listen("ferry-api-https", listener, move || {
            let app = make_app()
                .into_factory()
                .map_err(|e| e.into().error_response());
            let https = HttpService::build()
                // The default config says `http` to `ConnectionInfo`, which
                // nothing here reads; its constructor with a scheme is private.
                .finish(map_config(app, |_| AppConfig::default()))
                .rustls_0_23(tls.clone());
            let https = Arc::new(https);
            let refusal = refusal.clone();
            fn_factory(move || {
                let made = https.new_service(());
                let refusal = refusal.clone();
                async move {
                    let service = std::rc::Rc::new(made.await?);
                    Ok::<_, ()>(fn_service(move |io: actix_rt::net::TcpStream| {
                        let service = service.clone();
                        let refusal = refusal.clone();
                        async move {
                            let mut first = [0u8; 1];
                            let n = io.peek(&mut first).await.map_err(|_| ())?;
                            if n == 1 && first[0] != TLS_HANDSHAKE {
                                refuse_plain(io, &refusal).await;
                                return Ok(());
                            }
                            service.call(io).await.map_err(|_| ())
                        }
                    }))
                }
            })
        })
        .map(|b| b.run())
}

/// Reads what a plain-HTTP client sent (a little, so closing does not reset
/// the connection before it reads the answer), answers, closes.
async fn refuse_plain(mut io: actix_rt::net::TcpStream, refusal: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), io.read(&mut head)).await;
    let _ = io.write_all(refusal.as_bytes()).await;
    let _ = io.shutdown().await;
}

/// A client configuration trusting only the CA in `ca_pem`, presenting
/// `identity` (certificate PEM, key PEM) when given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .context("TLS versions")?
        .with_root_certificates(roots(ca_pem, "the cluster CA")?);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let key =
                PrivateKeyDer::from_pem_slice(key.as_bytes()).context("reading the client key")?;
            builder
                .with_client_auth_cert(certs(cert, "the client certificate")?, key)
                .context("the client certificate")?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_names_what_the_api_is_reached_by() {
        let (dns, ips) = api_cert_names(
            "node-2",
            "10.0.0.7:7702".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(dns, ["node-2", "localhost"]);
        assert!(ips.contains(&"10.0.0.7".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(ips.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let (_, ips) = api_cert_names(
            "node-2",
            "0.0.0.0:7702".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        assert!(ips.iter().all(|ip| !ip.is_unspecified()));
    }
}
