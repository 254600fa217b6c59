//! The client side of the status API (`knarr::api`) that `get`, `apply`, `delete`, `describe`
//! and `logs` share: where the API is, one request at a time, and what to say when nobody
//! answers.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Full};
use knarr_model::serving::ServingKind;
use serde_json::Value;

/// Where `knarr up` and `knarr serve` put the API unless told otherwise.
pub(crate) const DEFAULT_API_ADDR: &str = "127.0.0.1:18001";
/// The environment variable that overrides [`DEFAULT_API_ADDR`].
pub(crate) const API_ADDR_ENV: &str = "KNARR_API_ADDR";
/// The namespace of commands not given `-n`.
pub(crate) const DEFAULT_NAMESPACE: &str = "default";

/// How long one request may take (applying a manifest answers as soon as it is stored).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub(crate) struct ApiArgs {
    /// The API of `knarr up` (or `knarr serve`). [env: KNARR_API_ADDR] [default: 127.0.0.1:18001]
    #[arg(long, value_name = "IP:PORT")]
    api_addr: Option<SocketAddr>,
}

impl ApiArgs {
    /// The flag, else `env` (the value of [`API_ADDR_ENV`]), else the default.
    pub(crate) fn resolve(&self, env: Option<&str>) -> Result<SocketAddr, UsageError> {
        if let Some(addr) = self.api_addr {
            return Ok(addr);
        }
        match env.filter(|v| !v.is_empty()) {
            Some(value) => value.parse().map_err(|_| {
                UsageError(format!(
                    "{API_ADDR_ENV}={value:?}: expected an IP:PORT such as {DEFAULT_API_ADDR}"
                ))
            }),
            None => Ok(DEFAULT_API_ADDR
                .parse()
                .expect("the default address parses")),
        }
    }

    /// A client for the API these arguments name; `server` is the command expected to run it
    /// (for the message when nothing answers).
    pub(crate) fn client(&self, server: &'static str) -> anyhow::Result<ApiClient> {
        let env = std::env::var(API_ADDR_ENV).ok();
        let addr = self.resolve(env.as_deref())?;
        ApiClient::new(addr, server)
    }
}

/// A command-line mistake (exit code 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// The command already told the user what went wrong; only the exit code is left to set.
#[derive(Debug, thiserror::Error)]
#[error("failed")]
pub(crate) struct AlreadyReported;

/// One answer from the API.
pub(crate) struct ApiReply {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

impl ApiReply {
    /// The body as text, as the API's error messages are.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim_end().to_owned()
    }

    pub(crate) fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).context("the API did not answer JSON")
    }
}

/// Talks to the API one request (and one connection) at a time, blocking.
pub(crate) struct ApiClient {
    addr: SocketAddr,
    server: &'static str,
    runtime: tokio::runtime::Runtime,
}

impl ApiClient {
    pub(crate) fn new(addr: SocketAddr, server: &'static str) -> anyhow::Result<ApiClient> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(ApiClient {
            addr,
            server,
            runtime,
        })
    }

    /// Sends one request; any status is an answer, only a failed exchange is an error.
    pub(crate) fn send(
        &self,
        method: &Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> anyhow::Result<ApiReply> {
        let addr = self.addr;
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(path)
            // The API takes changes only from a Host that is an IP address (see `knarr::api`).
            .header(http::header::HOST, addr.to_string());
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let req = req.body(Full::new(body))?;
        let exchange = async move {
            let stream = match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => stream,
                Err(e) => bail!(
                    "cannot reach the Knarr API at {addr} ({e}); is {} running? (--api-addr or \
                     {API_ADDR_ENV} name another address)",
                    self.server
                ),
            };
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            let conn = tokio::spawn(conn);
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            conn.abort();
            anyhow::Ok(ApiReply { status, body })
        };
        self.runtime
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, exchange).await })
            .map_err(|_| {
                anyhow::anyhow!("{method} {path}: the Knarr API at {addr} did not answer in time")
            })?
    }

    /// `GET path` as JSON; any other status than 200 is an error saying what the API said.
    pub(crate) fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let reply = self.send(&Method::GET, path, &[], Bytes::new())?;
        if reply.status != StatusCode::OK {
            bail!("{}", reply.text());
        }
        reply.json()
    }

    /// Like [`get_json`](Self::get_json), with 404 as `None` (the message is kept for errors
    /// that want it).
    pub(crate) fn get_optional(&self, path: &str) -> anyhow::Result<Result<Value, String>> {
        let reply = self.send(&Method::GET, path, &[], Bytes::new())?;
        match reply.status {
            StatusCode::OK => Ok(Ok(reply.json()?)),
            StatusCode::NOT_FOUND => Ok(Err(reply.text())),
            _ => bail!("{}", reply.text()),
        }
    }
}

/// The API path of a serving kind's list (`/api/v1/services`) or, with a name, one object.
pub(crate) fn serving_path(kind: ServingKind, object: Option<(&str, &str)>) -> String {
    let plural = knarr::api::plural(kind);
    match object {
        Some((namespace, name)) => format!("/api/v1/{plural}/{namespace}/{name}"),
        None => format!("/api/v1/{plural}"),
    }
}

/// kubectl's name for a kind's resource (`service.serving.knative.dev`).
pub(crate) fn resource_name(kind: &str) -> String {
    format!("{}.serving.knative.dev", kind.to_ascii_lowercase())
}

/// Checks a name or namespace from the command line before it goes into a URL path.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), UsageError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(UsageError(format!(
            "{what} {name:?}: expected a Kubernetes name (letters, digits, '-', '.')"
        )))
    }
}

/// Lays out rows in columns three spaces apart, as kubectl does; the first row is the header.
pub(crate) fn render_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// The condition of `type_` in a manifest's `status.conditions`.
pub(crate) fn condition<'v>(object: &'v Value, type_: &str) -> Option<&'v Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// A string field, or "" when missing.
pub(crate) fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_the_environment_over_the_default() {
        let flag = ApiArgs {
            api_addr: Some("127.0.0.1:1".parse().unwrap()),
        };
        assert_eq!(
            flag.resolve(Some("127.0.0.1:2")).unwrap(),
            "127.0.0.1:1".parse().unwrap()
        );
        let none = ApiArgs { api_addr: None };
        assert_eq!(
            none.resolve(Some("127.0.0.1:2")).unwrap(),
            "127.0.0.1:2".parse().unwrap()
        );
        assert_eq!(
            none.resolve(None).unwrap(),
            DEFAULT_API_ADDR.parse().unwrap()
        );
        assert_eq!(
            none.resolve(Some("")).unwrap(),
            DEFAULT_API_ADDR.parse().unwrap()
        );
        let err = none.resolve(Some("localhost")).unwrap_err().to_string();
        assert!(err.starts_with("KNARR_API_ADDR=\"localhost\""), "{err}");
    }

    #[test]
    fn tables_pad_columns_and_trim_line_ends() {
        let rows = vec![
            vec!["NAME".to_string(), "READY".into(), "REASON".into()],
            vec!["hello".into(), "True".into(), String::new()],
        ];
        assert_eq!(
            render_table(&rows),
            "NAME    READY   REASON\nhello   True\n"
        );
    }

    #[test]
    fn names_that_would_break_a_path_are_refused() {
        assert!(check_name("name", "hello-00001").is_ok());
        assert!(check_name("name", "a/b").is_err());
        assert!(check_name("name", "").is_err());
        assert!(check_name("namespace", "x?y").is_err());
    }
}
