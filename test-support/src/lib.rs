//! `knarr-test-support`: what every Knarr crate's tests share, and nothing Knarr-specific.
//!
//! It depends on **no knarr crate** (only tokio, hyper, http, anyhow, tempfile, tracing,
//! rustls, rcgen, nix and the like), so any crate can take it as a dev-dependency without a
//! cycle: the activator's and the queue-proxy's tests (unit and integration) use it directly,
//! and `knarr-tests` (the integration tests against a real Envoy, the benchmarks) re-exports
//! it under its old paths and adds what needs the control plane (fixtures that run `knarr`,
//! conformance backends).
//!
//! - [`Envoy`] ([`envoy`]): launches the real Envoy on a bootstrap (binary from `$KNARR_ENVOY`
//!   or `<workspace>/.knarr/envoy`, see [`envoy_binary`] and `scripts/install-envoy.sh`), finds
//!   its admin port (always port 0) and reads its state back through the admin API: `/ready`,
//!   bound listener ports, stats and the config dump ([`ConfigDump`]). Every wait polls a
//!   readiness signal, never sleeps blindly, and a failed wait carries the tail of Envoy's log.
//! - [`Upstream`] ([`upstream`]): a fake backend or pod on `127.0.0.1:0` (or on a listener the
//!   test bound, such as one in a [`NetHost`]), configured with a small builder: it answers
//!   with its name, echoes and reports what reached it, answers Knative's probes (and can be
//!   unready), sleeps, holds responses until the test releases them, streams, echoes or
//!   refuses upgrades, and counts requests.
//! - [`KubeApi`] ([`kube`]): a real kube-apiserver on etcd, started as envtest does, with an
//!   admin token, ServiceAccount tokens for RBAC tests, `kubectl` and server-side apply, a
//!   kubeconfig for the `kube` crate, and "API server restarted" / "etcd wiped". Binaries from
//!   `scripts/kube-bin.sh` ([`kube_binaries`]: `$KNARR_KUBE_BIN`, or built once into
//!   `~/.cache/knarr/kube`).
//! - [`NetHost`] ([`netns`]): a network namespace with its own address `10.244.<N>.2`
//!   reachable from the root namespace, for backends that Endpoints must point at (the API
//!   server refuses loopback addresses there); [`NetHost::bind`] binds a listener inside it
//!   from this process. Needs root.
//! - [`http_get`] / [`HttpClient`] ([`client`]): a minimal HTTP/1.1 and h2c client that buffers
//!   [`HttpReply`]s, with a [`REQUEST_TIMEOUT`] on every call.
//! - Waits: [`poll_until`] (an async condition, an error on timeout), [`wait_until`] (a cheap
//!   synchronous condition, a panic on timeout) and [`within`] (a future, a panic on timeout).
//! - Ports: [`local_listener`] and [`ReservedPort`] (bound, never guessed); [`free_port`] only
//!   for a child process that must be told a port number.
//! - [`trace_init`] (logs through the test harness) and [`proc_usage`] (a process's RSS and
//!   CPU time, for benchmarks).

pub mod admin;
pub mod client;
pub mod envoy;
pub mod install;
pub mod kube;
pub mod netns;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;

pub use admin::{ConfigDump, ResourceKind};
pub use client::{http_get, http_send, HttpClient, HttpReply, REQUEST_TIMEOUT};
pub use envoy::{Envoy, EnvoyBuilder, STARTUP_TIMEOUT};
pub use install::{envoy_binary, ENVOY_VERSION};
pub use kube::{kube_binaries, KubeApi, KUBE_BINARIES, KUBE_STARTUP_TIMEOUT};
pub use netns::NetHost;
pub use upstream::{BodyWriter, SeenRequest, Upstream, UpstreamBuilder};

/// How often [`poll_until`] and [`Envoy`]'s waits re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(15);

/// How often [`wait_until`] re-checks its (cheap, synchronous) condition.
const FAST_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How long [`wait_until`] and [`within`] wait before failing the test: things that should take
/// milliseconds, with a margin for a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(10);

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

/// Checks the synchronous predicate `f` every 5 ms until it is true; panics naming `what` after
/// [`WAIT`].
///
/// For cheap in-process conditions (an atomic, a state snapshot) in tests that panic rather
/// than return errors; use [`poll_until`] for anything that does I/O.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting until {what}"
        );
        tokio::time::sleep(FAST_POLL_INTERVAL).await;
    }
}

/// Awaits `f`; panics naming `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// A listener bound to `127.0.0.1:0`, for a test's own server; its address is
/// `local_addr()`. Binding port 0 and keeping the socket is the only race-free way to get a
/// port: see [`ReservedPort`] for a port that must refuse connections first.
pub async fn local_listener() -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding 127.0.0.1:0")
}

/// A loopback port that is bound but not listening: connections to it are refused, yet no
/// other test or process can take it, until [`listen`](Self::listen) turns it into a listener.
/// For "the app is not listening yet" cases, instead of a port guessed free.
#[derive(Debug)]
pub struct ReservedPort {
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl ReservedPort {
    /// Binds `127.0.0.1:0` without listening.
    pub fn new() -> anyhow::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4().context("creating a TCP socket")?;
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .context("binding 127.0.0.1:0")?;
        let addr = socket.local_addr()?;
        Ok(Self { socket, addr })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Starts listening on the reserved port (e.g. for [`UpstreamBuilder::start_on`]).
    pub fn listen(self) -> anyhow::Result<tokio::net::TcpListener> {
        self.socket
            .listen(1024)
            .with_context(|| format!("listening on {}", self.addr))
    }
}

/// A port that was free on loopback a moment ago.
///
/// Only for a **child process that must be told a port number** (a binary configured by
/// flags or environment, such as the queue-proxy's `QUEUE_SERVING_PORT` or a benchmark's
/// `knarr` instance): the port is released before the child binds it, so another process could
/// take it in between. In-process servers bind port 0 themselves ([`local_listener`],
/// [`Upstream`]); a port that must refuse connections is a [`ReservedPort`].
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A process's resident memory (MiB) and CPU time (user + system, seconds), from `/proc`.
pub fn proc_usage(pid: u32) -> anyhow::Result<(f64, f64)> {
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

    #[tokio::test]
    async fn wait_until_and_within_return_what_is_ready() {
        let calls = AtomicU32::new(0);
        wait_until("the third check", || {
            calls.fetch_add(1, Ordering::SeqCst) >= 2
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(within("a ready future", async { 7 }).await, 7);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 10s waiting until never")]
    async fn wait_until_panics_naming_what() {
        wait_until("never", || false).await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 10s: pending")]
    async fn within_panics_naming_what() {
        within("pending", std::future::pending::<()>()).await;
    }

    #[tokio::test]
    async fn a_reserved_port_refuses_then_listens() {
        let reserved = ReservedPort::new().unwrap();
        let addr = reserved.addr();
        assert_ne!(reserved.port(), 0);
        let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        let listener = reserved.listen().unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        tokio::net::TcpStream::connect(addr).await.unwrap();
    }

    #[tokio::test]
    async fn a_local_listener_is_bound_on_loopback() {
        let listener = local_listener().await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
        tokio::net::TcpStream::connect(addr).await.unwrap();
    }

    #[test]
    fn proc_usage_of_this_process() {
        let (rss_mib, cpu_s) = proc_usage(std::process::id()).unwrap();
        assert!(rss_mib > 0.0 && cpu_s >= 0.0, "{rss_mib} MiB, {cpu_s} s");
    }

    #[test]
    fn trace_init_is_idempotent() {
        trace_init();
        trace_init();
    }
}
