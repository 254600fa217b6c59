//! A WebSocket echo backend and client (HTTP/1.1 upgrade, tokio-tungstenite).
//!
//! The backend puts its name in `x-upstream` on the `101 Switching Protocols`
//! (with the same `x-upstream-host`/`x-upstream-path`/`x-echo-*` headers as
//! [`Upstream`](crate::Upstream)), so the echoed messages stay exactly what
//! the client sent and a split test still sees which backend it reached.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context as _};
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as UpgradeRequest, Response as UpgradeResponse,
};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::TestServer;
use crate::REQUEST_TIMEOUT;

/// A running WebSocket echo backend on `127.0.0.1:<ephemeral>`: every text
/// or binary message is sent straight back. Stops serving, and drops its
/// connections, when dropped.
#[derive(Debug)]
pub struct WebSocketEcho(TestServer);

impl WebSocketEcho {
    /// Binds `127.0.0.1:0` and starts serving as `name`.
    pub async fn start(name: &str) -> anyhow::Result<WebSocketEcho> {
        TestServer::start(
            name,
            "websocket echo",
            |stream, name, connections| async move {
                // The error type is tungstenite's `Callback` contract.
                #[allow(clippy::result_large_err)]
                let add_headers = |req: &UpgradeRequest, resp: UpgradeResponse| {
                    Ok::<_, ErrorResponse>(upgrade_headers(&name, req, resp))
                };
                // A failed handshake is the client's problem; tungstenite has already answered it
                // with an error status.
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, add_headers).await else {
                    return;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                echo(ws).await;
            },
        )
        .await
        .map(WebSocketEcho)
    }

    /// Upgrades completed so far.
    pub fn connections(&self) -> u64 {
        self.0.count()
    }
}

impl std::ops::Deref for WebSocketEcho {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.0
    }
}

fn upgrade_headers(
    name: &HeaderValue,
    req: &UpgradeRequest,
    mut resp: UpgradeResponse,
) -> UpgradeResponse {
    let headers = resp.headers_mut();
    headers.insert("x-upstream", name.clone());
    if let Some(host) = req.headers().get(http::header::HOST) {
        headers.insert("x-upstream-host", host.clone());
    }
    if let Some(path) = req.uri().path_and_query() {
        if let Ok(path) = HeaderValue::from_str(path.as_str()) {
            headers.insert("x-upstream-path", path);
        }
    }
    for (echo, value) in crate::upstream::echoed(req.headers()) {
        headers.append(echo, value.clone());
    }
    resp
}

async fn echo(mut ws: WebSocketStream<TcpStream>) {
    while let Some(Ok(message)) = ws.next().await {
        let reply = match message {
            Message::Text(_) | Message::Binary(_) => message,
            // tungstenite queues the pong / close reply itself; flushing on
            // the next read or send delivers it.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(_) => break,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
    let _ = ws.close(None).await;
}

/// An open WebSocket to a virtual host, for echo round trips. Every wait is
/// bounded by [`REQUEST_TIMEOUT`].
#[derive(Debug)]
pub struct WsClient {
    what: String,
    ws: WebSocketStream<TcpStream>,
    status: StatusCode,
    headers: HeaderMap,
}

/// Connects to `addr` and upgrades `GET {path}` with `Host: {host}`.
///
/// Fails, naming the status and body, if the answer is not a `101` (e.g.
/// Envoy's 404 for an unknown host).
pub async fn ws_connect(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<WsClient> {
    ws_connect_with_headers(addr, host, path, &[]).await
}

/// [`ws_connect`] with extra request headers (e.g. a tag header to route on).
pub async fn ws_connect_with_headers(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<WsClient> {
    let what = format!("websocket {host}{path} via {addr}");
    let mut req = format!("ws://{host}{path}")
        .into_client_request()
        .with_context(|| format!("{what}: building the upgrade request"))?;
    for (name, value) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_str(value)?,
        );
    }
    let connect = async {
        let stream = TcpStream::connect(addr).await.context("connect")?;
        stream.set_nodelay(true)?;
        match tokio_tungstenite::client_async(req, stream).await {
            Ok(connected) => Ok(connected),
            Err(WsError::Http(resp)) => {
                let body = resp.body().as_deref().unwrap_or_default();
                bail!(
                    "upgrade refused with {} {:?}",
                    resp.status(),
                    String::from_utf8_lossy(body)
                )
            }
            Err(e) => Err(e).context("upgrade"),
        }
    };
    let (ws, resp) = tokio::time::timeout(REQUEST_TIMEOUT, connect)
        .await
        .with_context(|| format!("{what}: no upgrade within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| what.clone())?;
    let (parts, _) = resp.into_parts();
    Ok(WsClient {
        what,
        ws,
        status: parts.status,
        headers: parts.headers,
    })
}

impl WsClient {
    /// The upgrade response's status (101).
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The upgrade response's headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The `x-upstream` header of the upgrade response: which backend
    /// answered (`None` if absent).
    pub fn upstream(&self) -> Option<&str> {
        self.headers.get("x-upstream").and_then(|v| v.to_str().ok())
    }

    /// Sends one text message.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.ws.send(Message::text(text)))
            .await
            .with_context(|| format!("{}: send timed out", self.what))?
            .with_context(|| format!("{}: send", self.what))
    }

    /// Receives the next text message, skipping control frames; fails on a
    /// binary message or a close.
    pub async fn recv_text(&mut self) -> anyhow::Result<String> {
        loop {
            let next = tokio::time::timeout(REQUEST_TIMEOUT, self.ws.next())
                .await
                .with_context(|| format!("{}: no message within {REQUEST_TIMEOUT:?}", self.what))?;
            match next {
                None => bail!("{}: connection closed", self.what),
                Some(Err(e)) => return Err(e).with_context(|| format!("{}: recv", self.what)),
                Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(other)) => bail!("{}: wanted text, got {other:?}", self.what),
            }
        }
    }

    /// Sends `text` and returns the next text message.
    pub async fn echo(&mut self, text: &str) -> anyhow::Result<String> {
        self.send_text(text).await?;
        self.recv_text().await
    }

    /// Closes the connection cleanly (close frame, then waits for the
    /// server's).
    pub async fn close(mut self) -> anyhow::Result<()> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.ws.close(None))
            .await
            .with_context(|| format!("{}: close timed out", self.what))?
            .with_context(|| format!("{}: close", self.what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hundred_echoes_and_the_backend_name_on_the_upgrade() {
        let echo = WebSocketEcho::start("ws-a").await.unwrap();
        let mut ws = ws_connect_with_headers(
            echo.addr(),
            "ws.example.com",
            "/chat?room=1",
            &[("knative-serving-tag", "blue")],
        )
        .await
        .unwrap();
        assert_eq!(ws.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(ws.upstream(), Some("ws-a"));
        assert_eq!(ws.headers()["x-upstream-host"], "ws.example.com");
        assert_eq!(ws.headers()["x-upstream-path"], "/chat?room=1");
        assert_eq!(ws.headers()["x-echo-knative-serving-tag"], "blue");
        for i in 0..100 {
            let text = format!("hello {i}");
            assert_eq!(ws.echo(&text).await.unwrap(), text);
        }
        ws.close().await.unwrap();
        assert_eq!(echo.connections(), 1);
    }

    #[tokio::test]
    async fn a_refused_upgrade_names_the_status() {
        let up = crate::Upstream::builder("plain")
            .status(404)
            .start()
            .await
            .unwrap();
        let err = ws_connect(up.addr(), "x", "/").await.unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("404") && err.contains("plain"), "{err}");
    }
}
