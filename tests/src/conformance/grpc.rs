//! A gRPC-shaped echo backend and a streaming client, over h2c and without
//! protoc: messages are opaque bytes in gRPC's length-prefixed framing
//! (1 flag byte, 4-byte big-endian length, payload).
//!
//! The conformance `grpc` case does 100 round trips on one bidirectional
//! stream through Envoy, so [`GrpcEcho`] echoes each message the moment it has
//! read it whole, and [`GrpcStreamClient::send`] waits for that echo.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context as _};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::channel::{Channel, Sender};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::TestServer;
use crate::REQUEST_TIMEOUT;

/// Bytes before each gRPC message: compressed flag and length.
const PREFIX_LEN: usize = 5;

/// A running gRPC echo backend on `127.0.0.1:<ephemeral>`, HTTP/2 with prior
/// knowledge only. Any `POST` with `content-type: application/grpc*` is a
/// stream whose messages are echoed back as they arrive; the response carries
/// `x-upstream: <name>` (and the same `x-upstream-*`/`x-echo-*` headers as
/// [`Upstream`](crate::Upstream)) and ends with trailer `grpc-status: 0`. Other
/// requests get 415. Stops serving when dropped.
#[derive(Debug)]
pub struct GrpcEcho(TestServer);

impl GrpcEcho {
    /// Binds `127.0.0.1:0` and starts serving as `name`.
    pub async fn start(name: &str) -> anyhow::Result<GrpcEcho> {
        TestServer::start(name, "gRPC echo", |stream, name, streams| async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = echo_call(&name, &streams, req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await
        .map(GrpcEcho)
    }

    /// gRPC streams (calls) received so far.
    pub fn streams(&self) -> u64 {
        self.0.count()
    }
}

impl std::ops::Deref for GrpcEcho {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.0
    }
}

/// Answers one call: headers at once, then each request message echoed as a
/// response message, then `grpc-status` trailers when the request ends.
fn echo_call(
    name: &HeaderValue,
    streams: &AtomicU64,
    req: Request<Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let is_grpc = req.method() == Method::POST
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
    let mut resp = Response::new(Empty::new().boxed());
    let headers = resp.headers_mut();
    headers.insert("x-upstream", name.clone());
    headers.insert(
        "x-upstream-proto",
        HeaderValue::from_static(if req.version() == http::Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        }),
    );
    if let Some(authority) = req.uri().authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            headers.insert("x-upstream-host", host);
        }
    }
    for (echo, value) in crate::upstream::echoed(req.headers()) {
        headers.append(echo, value.clone());
    }
    if !is_grpc {
        *resp.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return resp;
    }
    streams.fetch_add(1, Ordering::SeqCst);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let (tx, body) = Channel::new(16);
    tokio::spawn(echo_messages(req.into_body(), tx));
    resp.map(|_| body.boxed())
}

async fn echo_messages(mut incoming: Incoming, mut tx: Sender<Bytes>) {
    let mut messages = MessageBuffer::default();
    loop {
        match incoming.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // request trailers: nothing to echo
                };
                messages.push(&data);
                while let Some(message) = messages.next_framed() {
                    if tx.send_data(message).await.is_err() {
                        return; // the client reset the stream
                    }
                }
            }
            Some(Err(_)) => return, // reset or connection gone
            None => break,
        }
    }
    // A request that ended inside a message is malformed: INTERNAL (13).
    let status = if messages.is_empty() { "0" } else { "13" };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    let _ = tx.send_trailers(trailers).await;
}

/// Frames `payload` as one uncompressed gRPC message.
pub fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(PREFIX_LEN + payload.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(payload.len()).expect("gRPC message under 4 GiB"));
    framed.put_slice(payload);
    framed.freeze()
}

/// Reassembles gRPC messages from DATA frames that may split or join them.
#[derive(Debug, Default)]
struct MessageBuffer {
    buf: BytesMut,
}

impl MessageBuffer {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message with its prefix, if one has arrived.
    fn next_framed(&mut self) -> Option<Bytes> {
        if self.buf.len() < PREFIX_LEN {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let total = PREFIX_LEN + len as usize;
        (self.buf.len() >= total).then(|| self.buf.split_to(total).freeze())
    }

    /// The next whole message's payload, if one has arrived.
    fn next_payload(&mut self) -> Option<Bytes> {
        let mut framed = self.next_framed()?;
        framed.advance(PREFIX_LEN);
        Some(framed)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// What the response side of a call delivers, in order.
#[derive(Debug)]
enum CallEvent {
    Headers(StatusCode, HeaderMap),
    Message(Bytes),
    Trailers(HeaderMap),
    /// The response ended without trailers.
    End,
    Failed(String),
}

/// One bidirectional gRPC stream over its own h2c connection: send a message,
/// read its echo, repeat; then [`finish`](Self::finish). Every wait is bounded
/// by [`REQUEST_TIMEOUT`]. Dropping it resets the stream and closes the
/// connection.
#[derive(Debug)]
pub struct GrpcStreamClient {
    what: String,
    body: Option<Sender<Bytes>>,
    events: mpsc::UnboundedReceiver<CallEvent>,
    headers: Option<(StatusCode, HeaderMap)>,
    tasks: [JoinHandle<()>; 2],
}

impl GrpcStreamClient {
    /// Opens a call to `path` (e.g. `/echo.Echo/Stream`) with `:authority` =
    /// `authority` over a new h2c connection to `addr`. Returns once the
    /// request headers are on their way; the response headers are read
    /// lazily (some servers send them only with the first message).
    pub async fn connect(
        addr: SocketAddr,
        authority: &str,
        path: &str,
    ) -> anyhow::Result<GrpcStreamClient> {
        let what = format!("gRPC POST {authority}{path} via {addr}");
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| format!("{what}: connect timed out"))?
            .with_context(|| format!("{what}: connect"))?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .with_context(|| format!("{what}: HTTP/2 handshake"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let (body_tx, body) = Channel::<Bytes>::new(16);
        let req = Request::post(format!("http://{authority}{path}"))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(body)
            .with_context(|| format!("{what}: building request"))?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let response = sender.send_request(req);
        let reader = tokio::spawn(async move {
            // Keep the sender alive as long as the call.
            let _sender = sender;
            read_response(response, &events_tx).await;
        });
        Ok(GrpcStreamClient {
            what,
            body: Some(body_tx),
            events,
            headers: None,
            tasks: [reader, conn],
        })
    }

    /// Sends one message and returns the next message the server sends (for
    /// [`GrpcEcho`], the same bytes).
    pub async fn send(&mut self, message: &[u8]) -> anyhow::Result<Bytes> {
        let what = self.what.clone();
        let body = self
            .body
            .as_mut()
            .with_context(|| format!("{what}: request already finished"))?;
        tokio::time::timeout(REQUEST_TIMEOUT, body.send_data(grpc_frame(message)))
            .await
            .with_context(|| format!("{what}: sending a message timed out"))?
            .map_err(|_| anyhow::anyhow!("{what}: the call closed before a message was sent"))?;
        loop {
            match self.next_event().await? {
                CallEvent::Headers(status, headers) => self.headers = Some((status, headers)),
                CallEvent::Message(reply) => return Ok(reply),
                other => bail!(
                    "{what}: wanted an echoed message, got {}",
                    self.describe(other)
                ),
            }
        }
    }

    /// The response headers (HTTP status and header map), waiting for them if
    /// they have not arrived yet.
    pub async fn response_headers(&mut self) -> anyhow::Result<(StatusCode, &HeaderMap)> {
        while self.headers.is_none() {
            match self.next_event().await? {
                CallEvent::Headers(status, headers) => self.headers = Some((status, headers)),
                other => bail!(
                    "{}: wanted response headers, got {}",
                    self.what,
                    self.describe(other)
                ),
            }
        }
        let (status, headers) = self.headers.as_ref().expect("set above");
        Ok((*status, headers))
    }

    /// The `x-upstream` response header: which backend answered.
    pub async fn upstream(&mut self) -> anyhow::Result<String> {
        let (_, headers) = self.response_headers().await?;
        Ok(headers
            .get("x-upstream")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned())
    }

    /// Ends the request stream and waits for the response to end; succeeds
    /// with the trailers if they say `grpc-status: 0`. A trailers-only
    /// response (`grpc-status` in the headers, as Envoy sends for its own
    /// errors) counts as trailers.
    pub async fn finish(mut self) -> anyhow::Result<HeaderMap> {
        self.body = None; // ends the request body: END_STREAM
        if let Some((_, headers)) = &self.headers {
            if headers.contains_key("grpc-status") {
                return grpc_ok(&self.what, headers.clone());
            }
        }
        loop {
            match self.next_event().await? {
                CallEvent::Headers(status, headers) if headers.contains_key("grpc-status") => {
                    self.headers = Some((status, headers.clone()));
                    return grpc_ok(&self.what, headers);
                }
                CallEvent::Headers(status, headers) => self.headers = Some((status, headers)),
                CallEvent::Message(m) => bail!(
                    "{}: unexpected message of {} bytes after the last send",
                    self.what,
                    m.len()
                ),
                CallEvent::Trailers(trailers) => return grpc_ok(&self.what, trailers),
                other => bail!(
                    "{}: wanted trailers, got {}",
                    self.what,
                    self.describe(other)
                ),
            }
        }
    }

    async fn next_event(&mut self) -> anyhow::Result<CallEvent> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.events.recv())
            .await
            .with_context(|| {
                format!(
                    "{}: nothing from the server within {REQUEST_TIMEOUT:?}",
                    self.what
                )
            })?
            .with_context(|| format!("{}: the call ended without trailers", self.what))
    }

    /// An unexpected event, with the HTTP status when it explains it.
    fn describe(&self, event: CallEvent) -> String {
        let status = match &self.headers {
            Some((status, headers)) => format!(
                " (HTTP {status}, grpc-status {:?})",
                headers.get("grpc-status")
            ),
            None => String::new(),
        };
        match event {
            CallEvent::Headers(status, headers) => format!(
                "response headers again (HTTP {status}, grpc-status {:?})",
                headers.get("grpc-status")
            ),
            CallEvent::Message(m) => format!("a message of {} bytes{status}", m.len()),
            CallEvent::Trailers(t) => format!("trailers {t:?}{status}"),
            CallEvent::End => format!("the end of the response{status}"),
            CallEvent::Failed(e) => format!("an error: {e}{status}"),
        }
    }
}

impl Drop for GrpcStreamClient {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn grpc_ok(what: &str, trailers: HeaderMap) -> anyhow::Result<HeaderMap> {
    match trailers.get("grpc-status").map(HeaderValue::as_bytes) {
        Some(b"0") => Ok(trailers),
        status => bail!(
            "{what}: grpc-status {:?}, grpc-message {:?}",
            status.map(String::from_utf8_lossy),
            trailers.get("grpc-message")
        ),
    }
}

/// Turns the response into [`CallEvent`]s until it ends or the client goes.
async fn read_response(
    response: impl std::future::Future<Output = hyper::Result<Response<Incoming>>>,
    events: &mpsc::UnboundedSender<CallEvent>,
) {
    let resp = match response.await {
        Ok(resp) => resp,
        Err(e) => {
            let _ = events.send(CallEvent::Failed(format!("request failed: {e}")));
            return;
        }
    };
    let (parts, mut body) = resp.into_parts();
    let _ = events.send(CallEvent::Headers(parts.status, parts.headers));
    let mut messages = MessageBuffer::default();
    loop {
        let event = match body.frame().await {
            None => CallEvent::End,
            Some(Err(e)) => CallEvent::Failed(format!("reading the response: {e}")),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    messages.push(&data);
                    while let Some(message) = messages.next_payload() {
                        if events.send(CallEvent::Message(message)).is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => CallEvent::Trailers(trailers),
                    Err(_) => continue,
                },
            },
        };
        let last = !matches!(event, CallEvent::Message(_));
        if events.send(event).is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_buffer_reassembles_split_and_joined_messages() {
        let mut wire = Vec::new();
        for payload in [&b"one"[..], b"", b"three"] {
            wire.extend_from_slice(&grpc_frame(payload));
        }
        let mut buf = MessageBuffer::default();
        let mut got = Vec::new();
        // Byte by byte: every split point.
        for byte in &wire {
            buf.push(std::slice::from_ref(byte));
            while let Some(m) = buf.next_payload() {
                got.push(m);
            }
        }
        assert_eq!(got, [&b"one"[..], b"", b"three"]);
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn hundred_round_trips_on_one_stream() {
        let echo = GrpcEcho::start("grpc-a").await.unwrap();
        let mut call = GrpcStreamClient::connect(echo.addr(), "grpc.example.com", "/e.Echo/Chat")
            .await
            .unwrap();
        for i in 0..100 {
            let message = format!("message {i}");
            let reply = call.send(message.as_bytes()).await.unwrap();
            assert_eq!(reply, message.as_bytes());
        }
        assert_eq!(call.upstream().await.unwrap(), "grpc-a");
        let (status, headers) = call.response_headers().await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-upstream-host"], "grpc.example.com");
        assert_eq!(headers["x-upstream-proto"], "HTTP/2");
        let trailers = call.finish().await.unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(echo.streams(), 1);
    }

    #[tokio::test]
    async fn large_messages_span_frames() {
        let echo = GrpcEcho::start("big").await.unwrap();
        let mut call = GrpcStreamClient::connect(echo.addr(), "big", "/e.Echo/Chat")
            .await
            .unwrap();
        // Larger than the default 16 KiB frame and 64 KiB window.
        let message: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(call.send(&message).await.unwrap(), message);
        call.finish().await.unwrap();
    }

    #[tokio::test]
    async fn non_grpc_requests_are_refused() {
        let echo = GrpcEcho::start("strict").await.unwrap();
        let reply = crate::HttpClient::h2c(echo.addr())
            .get("x", "/")
            .await
            .unwrap();
        assert_eq!(reply.status, 415);
        assert_eq!(reply.header("x-upstream"), Some("strict"));
        assert_eq!(echo.streams(), 0);
    }

    #[tokio::test]
    async fn a_non_grpc_answer_fails_the_call_with_its_status() {
        let up = crate::Upstream::builder("plain")
            .status(404)
            .start()
            .await
            .unwrap();
        let mut call = GrpcStreamClient::connect(up.addr(), "x", "/e.Echo/Chat")
            .await
            .unwrap();
        let err = call.send(b"hi").await.unwrap_err().to_string();
        assert!(err.contains("404"), "{err}");
    }
}
