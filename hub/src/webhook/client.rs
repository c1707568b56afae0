//! The HTTP client webhook requests go out on: one connection per request,
//! to an address the SSRF guard allowed (resolved here, so the address
//! checked is the address connected to), TLS with the system's roots and
//! `--webhook-ca`, HTTP/1.1, no redirects, timeouts on connecting and on
//! the answer, and a bound on the answer's size.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::target::{AddressPolicy, WebhookUrl};

/// The largest answer body read; a larger one delivers without its outcome.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// What came of one request.
#[derive(Debug)]
pub enum Answer {
    /// An HTTP answer; `body` is `None` when it was over
    /// [`MAX_ANSWER_BYTES`] or broke off.
    Http { status: u16, body: Option<Bytes> },
    /// No answer within the timeout.
    Timeout(String),
    /// No connection (refused, unreachable, TLS handshake failed, the
    /// connection broke before an answer).
    Connect(String),
    /// Every address of the host is one the hub must not reach.
    Refused(String),
}

/// Sends webhook requests.
#[derive(Clone)]
pub struct Client {
    tls: TlsConnector,
    policy: AddressPolicy,
    connect_timeout: Duration,
    timeout: Duration,
}

impl Client {
    /// A client trusting the system's roots and `extra_roots`.
    pub fn new(
        policy: AddressPolicy,
        extra_roots: &[CertificateDer<'static>],
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::debug!(%error, "a system root certificate could not be read");
        }
        roots.add_parsable_certificates(native.certs);
        roots.add_parsable_certificates(extra_roots.iter().cloned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            tls: TlsConnector::from(Arc::new(config)),
            policy,
            connect_timeout,
            timeout,
        }
    }

    /// POSTs `body` with `headers` to `url`.
    pub async fn post(
        &self,
        url: &WebhookUrl,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    ) -> Answer {
        let tcp = match tokio::time::timeout(self.connect_timeout, self.connect(url)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(answer)) => return answer,
            Err(_) => {
                return Answer::Connect(format!("no connection within {:?}", self.connect_timeout));
            }
        };
        match tokio::time::timeout(self.timeout, self.exchange(url, tcp, headers, body)).await {
            Ok(answer) => answer,
            Err(_) => Answer::Timeout(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// Resolves the host and connects to the first allowed address that
    /// answers (TLS for https:// within the same connect timeout).
    async fn connect(&self, url: &WebhookUrl) -> Result<Stream, Answer> {
        let host = url.url().host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url.port();
        let addrs: Vec<SocketAddr> = match url.literal_ip() {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => match tokio::net::lookup_host((host, port)).await {
                Ok(addrs) => addrs.collect(),
                Err(e) => return Err(Answer::Connect(format!("cannot resolve {host}: {e}"))),
            },
        };
        let https = url.url().scheme() == "https";
        let mut refusal = None;
        let mut last_error = None;
        for addr in addrs {
            if let Some(why) = self.policy.refuse(addr, !https) {
                refusal.get_or_insert(why);
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    if !https {
                        return Ok(Stream::Plain(tcp));
                    }
                    let name = ServerName::try_from(host.to_owned())
                        .map_err(|e| Answer::Connect(format!("{host}: {e}")))?;
                    return match self.tls.connect(name, tcp).await {
                        Ok(tls) => Ok(Stream::Tls(Box::new(tls))),
                        Err(e) => Err(Answer::Connect(format!("TLS with {addr}: {e}"))),
                    };
                }
                Err(e) => last_error = Some(format!("{addr}: {e}")),
            }
        }
        Err(match (last_error, refusal) {
            (Some(e), _) => Answer::Connect(e),
            (None, Some(why)) => Answer::Refused(why),
            (None, None) => Answer::Connect(format!("{host} has no address")),
        })
    }

    async fn exchange(
        &self,
        url: &WebhookUrl,
        stream: Stream,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    ) -> Answer {
        let io = TokioIo::new(stream);
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(pair) => pair,
            Err(e) => return Answer::Connect(e.to_string()),
        };
        let conn = tokio::spawn(conn);
        let target = match url.url().query() {
            Some(q) => format!("{}?{q}", url.url().path()),
            None => url.url().path().to_owned(),
        };
        let host = match url.url().port() {
            Some(port) => format!("{}:{port}", url.url().host_str().unwrap_or_default()),
            None => url.url().host_str().unwrap_or_default().to_owned(),
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(target)
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("hub/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                request = request.header(name, value);
            }
        }
        let request = match request.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return Answer::Connect(format!("request: {e}")),
        };
        let answer = match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                    .ok()
                    .map(|b| b.to_bytes());
                Answer::Http { status, body }
            }
            Err(e) => Answer::Connect(format!("no answer: {e}")),
        };
        conn.abort();
        answer
    }
}

/// A connection, plain (loopback http://) or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
