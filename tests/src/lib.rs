//! Knarr's integration tests against a real Envoy, and the fixtures that need Knarr itself.
//!
//! Knarr's data plane *is* Envoy, so the tests that matter run the real binary
//! rather than a mock. What needs no knarr crate (the [`Envoy`] launcher, the
//! [`Upstream`] fakes, the [`HttpClient`], [`poll_until`], [`trace_init`],
//! [`free_port`], [`proc_usage`], …) lives in `knarr-test-support`, which the
//! activator's and the queue-proxy's tests use too; it is re-exported here under
//! the paths the tests and benchmarks always used. This crate adds:
//!
//! - [`kfixture`]: the control plane (`knarr serve`'s pieces) in-process in
//!   front of a real Envoy, fed KIngresses, Services and Endpoints.
//! - [`up`]: `knarr up` as a user runs it (the real binary, its CLI).
//! - [`conformance`]: gRPC and WebSocket echo backends and clients, TLS
//!   certificates and an HTTPS client, and a load generator, for Knative's
//!   ingress conformance cases.
//! - [`bench`]: load loops for the benchmarks in `src/bin`.
//! - Locators for this build's binaries ([`knarr_binary`],
//!   [`queue_proxy_binary`], [`activator_binary`]).
//!
//! Data flows: test → bootstrap YAML → [`Envoy`] process; test traffic →
//! Envoy listener → [`Upstream`]; assertions read [`HttpReply`]s, upstream
//! counters and Envoy's admin API.

pub mod bench;
pub mod conformance;
pub mod kfixture;
pub mod kube_fixture;
pub mod up;

// What moved to `knarr-test-support`, under its old paths. `client` and
// `upstream` are also named as modules for the conformance backends.
pub(crate) use knarr_test_support::{client, upstream};
pub use knarr_test_support::{
    envoy, envoy_binary, free_port, http_get, http_send, local_listener, poll_until, proc_usage,
    trace_init, wait_until, within, ConfigDump, Envoy, EnvoyBuilder, HttpClient, HttpReply,
    ReservedPort, ResourceKind, Upstream, UpstreamBuilder, ENVOY_VERSION, POLL_INTERVAL,
    REQUEST_TIMEOUT, STARTUP_TIMEOUT,
};
pub use knarr_test_support::{KubeApi, NetHost};

pub use conformance::{
    https_get, ws_connect, GrpcEcho, GrpcStreamClient, LoadGenerator, LoadSummary, TestCa,
    WebSocketEcho, WsClient,
};

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
