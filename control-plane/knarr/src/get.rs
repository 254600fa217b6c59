//! `knarr get`: reads the status API of a running `knarr serve` and prints it.

use std::net::SocketAddr;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use serde_json::Value;

use crate::{GetWhat, Output};

async fn fetch(api: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let stream = tokio::net::TcpStream::connect(api).await.with_context(|| {
        format!("cannot reach the status API at {api}; is `knarr serve` running?")
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, api.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{path}: {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("{path}: not JSON"))
}

fn cond<'v>(report: &'v Value, type_: &str) -> Option<&'v Value> {
    report["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn table(items: &[Value]) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "NAME".into(),
        "READY".into(),
        "REASON".into(),
        "HOSTS".into(),
    ]];
    for item in items {
        let ready = cond(item, "Ready");
        let hosts: Vec<&str> = item["hosts"]
            .as_array()
            .map(|h| h.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut reason = ready
            .and_then(|c| c["reason"].as_str())
            .unwrap_or_default()
            .to_owned();
        if item.get("error").is_some() {
            reason = if reason.is_empty() {
                "SourceError".into()
            } else {
                format!("{reason},SourceError")
            };
        }
        rows.push([
            item["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .into(),
            item["metadata"]["name"].as_str().unwrap_or_default().into(),
            ready
                .and_then(|c| c["status"].as_str())
                .unwrap_or("Unknown")
                .into(),
            reason,
            hosts.join(","),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    for item in items {
        if let Some(e) = item.get("error").and_then(Value::as_str) {
            out.push_str(&format!("error: {e}\n"));
        }
    }
    out
}

pub(crate) fn run(api: SocketAddr, what: GetWhat, output: Output) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let path = match what {
        GetWhat::Ingresses => "/api/v1/ingresses",
        GetWhat::Errors => "/api/v1/errors",
    };
    let value = runtime.block_on(fetch(api, path))?;
    let text = match (output, what) {
        (Output::Json, _) => serde_json::to_string_pretty(&value)? + "\n",
        (Output::Yaml, _) => serde_yaml::to_string(&value)?,
        (Output::Table, GetWhat::Ingresses) => table(
            value["items"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default(),
        ),
        (Output::Table, GetWhat::Errors) => {
            let errors: Vec<&str> = value["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if errors.is_empty() {
                "no errors\n".into()
            } else {
                errors.join("\n") + "\n"
            }
        }
    };
    print!("{text}");
    Ok(())
}
