//! A small blocking HTTP/1.1 client for the CLI and the tests: JSON requests,
//! `Content-Length` or chunked responses, and server-sent event streams.
//!
//! Why not reqwest or hyper's client: the CLI makes one request at a time to
//! one node, and this is about 300 lines over `std::net::TcpStream` and
//! rustls's blocking `StreamOwned`, with no async runtime and no new
//! dependency in the binary. Each request opens its own connection
//! (`Connection: close`), which is plenty for a command line.
//!
//! A node's API speaks HTTPS with a certificate from the cluster CA: the
//! client trusts that CA alone ([`Client::https`], [`Client::for_node`]) and
//! says in words what went wrong when the handshake fails (a certificate it
//! does not trust, a server that speaks plain HTTP, or the reverse).
//! [`Client::new`] speaks plain HTTP (an API with `api.tls = false`,
//! Chromium's DevTools endpoint in the browser test).

use crate::config::NodeConfig;
use crate::error::ApiError;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// Why a request did not get an answer from the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node could not be reached or the connection broke.
    #[error("cannot reach {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    /// The node answered with an error.
    #[error("{0}")]
    Api(ApiError),
    /// The answer was not HTTP or not the JSON expected.
    #[error("bad answer from {addr}: {what}")]
    Protocol { addr: String, what: String },
    /// The TLS handshake failed: an untrusted certificate, a server that
    /// does not speak TLS, a client certificate the server refused.
    #[error("TLS with {addr} failed: {what}")]
    Tls { addr: String, what: String },
    /// The client could not be set up (a CA file missing or unreadable).
    #[error("{0}")]
    Setup(String),
}

type Headers = Vec<(String, String)>;
type Body = Box<dyn BufRead + Send>;

/// An HTTP response, read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// A client of one node's API.
#[derive(Clone)]
pub struct Client {
    /// `host:port`.
    pub addr: String,
    pub token: Option<String>,
    pub timeout: Duration,
    /// HTTPS with this configuration; `None`: plain HTTP.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("https", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// `addr` without its scheme and trailing slash.
fn bare(addr: &str) -> String {
    addr.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

impl Client {
    /// A plain-HTTP client; `addr` is `host:port`, optionally prefixed with
    /// `http://`.
    pub fn new(addr: &str, token: Option<String>) -> Client {
        Client {
            addr: bare(addr),
            token,
            timeout: Duration::from_secs(30),
            tls: None,
        }
    }

    /// An HTTPS client trusting only the CA certificate(s) in `ca_pem`;
    /// `addr` is `host:port`, optionally prefixed with `https://`.
    pub fn https(addr: &str, token: Option<String>, ca_pem: &str) -> Result<Client, ClientError> {
        let config = crate::api_tls::client_config(ca_pem, None)
            .map_err(|e| ClientError::Setup(format!("{e:#}")))?;
        Ok(Client {
            tls: Some(Arc::new(config)),
            ..Client::new(addr, token)
        })
    }

    /// This HTTPS client presenting a client certificate (`cert_pem`,
    /// `key_pem`) besides trusting `ca_pem`.
    pub fn with_identity(
        self,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Client, ClientError> {
        let config = crate::api_tls::client_config(ca_pem, Some((cert_pem, key_pem)))
            .map_err(|e| ClientError::Setup(format!("{e:#}")))?;
        Ok(Client {
            tls: Some(Arc::new(config)),
            ..self
        })
    }

    /// A client of the API `config` describes, with its operator token:
    /// HTTPS trusting `api.ca` unless `api.tls = false`.
    pub fn for_node(config: &NodeConfig) -> Result<Client, ClientError> {
        Client::for_node_with(config, Some(config.api.token.clone()))
    }

    /// [`for_node`](Self::for_node) with another token (or none).
    pub fn for_node_with(
        config: &NodeConfig,
        token: Option<String>,
    ) -> Result<Client, ClientError> {
        let addr = config.api.listen.to_string();
        if !config.api.tls {
            return Ok(Client::new(&addr, token));
        }
        let ca = config.api.ca.as_deref().ok_or_else(|| {
            ClientError::Setup(format!(
                "the API of {} speaks HTTPS but its configuration names no CA (api.ca)",
                config.name
            ))
        })?;
        let pem = std::fs::read_to_string(ca).map_err(|e| {
            ClientError::Setup(format!("reading the cluster CA {}: {e}", ca.display()))
        })?;
        Client::https(&addr, token, &pem)
    }

    /// Whether this client speaks HTTPS.
    pub fn is_https(&self) -> bool {
        self.tls.is_some()
    }

    /// The base URL, `https://host:port`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        let tls = source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(e) = tls {
            return ClientError::Tls {
                addr: self.addr.clone(),
                what: explain_tls(e),
            };
        }
        ClientError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    fn protocol(&self, what: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            addr: self.addr.clone(),
            what: what.into(),
        }
    }

    /// A connection, TLS when this client speaks HTTPS, with the handshake
    /// done (so its failure is told as such).
    fn connect(&self) -> Result<Box<dyn ReadWrite>, ClientError> {
        let tcp = self.connect_tcp()?;
        let Some(config) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = server_name(&self.addr).ok_or_else(|| {
            ClientError::Setup(format!(
                "{}: no host name to check the certificate against",
                self.addr
            ))
        })?;
        let conn = rustls::ClientConnection::new(config.clone(), name)
            .map_err(|e| ClientError::Setup(format!("TLS setup: {e}")))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| self.handshake_failed(e))?;
        }
        Ok(Box::new(stream))
    }

    fn handshake_failed(&self, e: std::io::Error) -> ClientError {
        match self.io(e) {
            ClientError::Io { addr, source }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                ClientError::Tls {
                    addr,
                    what: format!(
                        "the server closed the connection during the handshake ({source}); \
                         it may speak plain HTTP (api.tls = false: use http://)"
                    ),
                }
            }
            other => other,
        }
    }

    fn connect_tcp(&self) -> Result<TcpStream, ClientError> {
        let addrs: Vec<SocketAddr> = self
            .addr
            .to_socket_addrs()
            .map_err(|e| self.io(e))?
            .collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(3)) {
                Ok(s) => {
                    s.set_read_timeout(Some(self.timeout))
                        .map_err(|e| self.io(e))?;
                    s.set_nodelay(true).map_err(|e| self.io(e))?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(self.io(last))
    }

    /// Sends a request and returns the response head and a reader of its body.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        accept: &str,
    ) -> Result<(u16, Headers, Body), ClientError> {
        let mut stream = self.connect()?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: {accept}\r\nConnection: close\r\nUser-Agent: ferry-cli/{}\r\n",
            self.addr,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .and_then(|_| stream.write_all(body.unwrap_or_default()))
            .map_err(|e| self.io(e))?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| self.io(e))?;
        // A TLS server answers a plain request with an alert record (0x15,
        // version 3.x) or just closes: say what that means.
        let tls_answer = line.is_empty() || matches!(line.as_bytes(), [0x15 | 0x16, 0x03, ..]);
        if tls_answer && self.tls.is_none() {
            return Err(self.protocol(
                "no HTTP answer, the server expects TLS: this API speaks HTTPS \
                 (use https:// and trust the cluster CA: --ca <cluster dir>/ca.pem)",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.protocol(format!("not an HTTP status line: {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).map_err(|e| self.io(e))?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let body: Box<dyn BufRead + Send> =
            if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                Box::new(BufReader::new(Chunked {
                    inner: reader,
                    left: 0,
                    done: false,
                }))
            } else if let Some(n) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
                Box::new(reader.take(n))
            } else {
                Box::new(reader)
            };
        Ok((status, headers, body))
    }

    /// A request answered whole.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let (status, headers, mut reader) = self.send(method, path, body, "application/json")?;
        let mut body = Vec::new();
        reader.read_to_end(&mut body).map_err(|e| self.io(e))?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// A JSON request; a non-2xx answer becomes [`ClientError::Api`].
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| self.protocol(e.to_string()))?),
            None => None,
        };
        let r = self.request(method, path, bytes.as_deref())?;
        if !(200..300).contains(&r.status) {
            return Err(ClientError::Api(error_of(&r)));
        }
        let body: &[u8] = if r.body.is_empty() { b"null" } else { &r.body };
        serde_json::from_slice(body).map_err(|e| self.protocol(format!("{e} in {}", r.text())))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None::<&()>)
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.call("POST", path, Some(body))
    }

    /// Opens the event stream at `path`; each call of the iterator blocks
    /// until the next event (name, data).
    pub fn events(&self, path: &str) -> Result<EventStream, ClientError> {
        let mut me = self.clone();
        me.timeout = Duration::from_secs(60);
        let (status, headers, reader) = me.send("GET", path, None, "text/event-stream")?;
        if status != 200 {
            let mut body = Vec::new();
            let mut reader = reader;
            let _ = reader.read_to_end(&mut body);
            return Err(ClientError::Api(error_of(&Response {
                status,
                headers,
                body,
            })));
        }
        Ok(EventStream { reader })
    }
}

/// A connection the client reads and writes: TCP or TLS over TCP.
trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// The name the server's certificate must carry: the host of `addr`
/// (`host:port`, `[v6]:port`), an IP address or a DNS name.
fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}

/// A TLS failure in words a person can act on.
fn explain_tls(e: &rustls::Error) -> String {
    use rustls::{AlertDescription, CertificateError, Error};
    match e {
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the API's certificate is not signed by the cluster CA this client trusts ({e}); \
             is --ca / api.ca this cluster's ca.pem?"
        ),
        Error::InvalidCertificate(CertificateError::NotValidForName)
        | Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => format!(
            "the API's certificate does not name the address dialled ({e}); dial the node by \
             its listen address, its name or localhost"
        ),
        Error::InvalidCertificate(c) => format!("the API's certificate is refused: {c:?}"),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => format!(
            "the server does not speak TLS ({e}): it serves plain HTTP (api.tls = false), \
             use http://"
        ),
        Error::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::DecryptError),
        ) => format!(
            "the API refused this client's certificate ({a:?}): a client certificate must \
             come from the cluster CA, or be left out"
        ),
        other => other.to_string(),
    }
}

/// The API's error from a response (or one made up from its status).
pub fn error_of(r: &Response) -> ApiError {
    let json = r.json().ok();
    let field = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    ApiError {
        status: r.status,
        code: field("code").unwrap_or_else(|| format!("http_{}", r.status)),
        message: field("message").unwrap_or_else(|| r.text()),
    }
}

/// Decodes a chunked body.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            // The CRLF ending the previous chunk, then the size line.
            while line.trim().is_empty() {
                line.clear();
                if self.inner.read_line(&mut line)? == 0 {
                    self.done = true;
                    return Ok(0);
                }
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {size:?}"),
                )
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            self.done = true;
        }
        self.left -= got;
        Ok(got)
    }
}

/// A server-sent event stream.
pub struct EventStream {
    reader: Box<dyn BufRead + Send>,
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub event: String,
    pub data: String,
}

impl Iterator for EventStream {
    type Item = Result<Sse, std::io::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut event = String::from("message");
        let mut data = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if data.is_empty() {
                    event = "message".into();
                    continue;
                }
                return Some(Ok(Sse { event, data }));
            }
            if let Some(v) = l.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = l.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.trim_start());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chunked_bodies_and_event_streams_decode() {
        let raw = b"7\r\nevent: \r\n1d\r\nprogress\ndata: {\"a\":1}\n\n: ka\n\r\n0\r\n\r\n";
        let mut body = String::new();
        Chunked {
            inner: &raw[..],
            left: 0,
            done: false,
        }
        .read_to_string(&mut body)
        .unwrap();
        assert_eq!(body, "event: progress\ndata: {\"a\":1}\n\n: ka\n");
        let mut events = EventStream {
            reader: Box::new(std::io::Cursor::new(body.into_bytes())),
        };
        let e = events.next().unwrap().unwrap();
        assert_eq!(
            e,
            Sse {
                event: "progress".into(),
                data: "{\"a\":1}".into()
            }
        );
        assert!(events.next().is_none());
    }
}
