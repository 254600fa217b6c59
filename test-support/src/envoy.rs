//! Running a real Envoy for a test and reading its state back through the
//! admin API.
//!
//! Envoy gets a bootstrap whose admin (and usually listener) ports are 0; the
//! launcher learns the admin address from `--admin-address-path` and the
//! listener ports from `/listeners`, so tests never use fixed ports. All waits
//! poll a readiness signal, fail fast if Envoy exits, and put the tail of
//! Envoy's log in their error.

use std::cell::Cell;
use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

use crate::admin::{self, ConfigDump, ResourceKind};
use crate::client::{HttpClient, HttpReply};
use crate::POLL_INTERVAL;

/// How long [`Envoy::start`] waits for the admin listener. Envoy needs well
/// under a second; the margin is for a loaded 2-core CI machine.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of Envoy's log attached to errors.
const LOG_TAIL_LINES: usize = 60;

/// A running Envoy process, killed when dropped.
///
/// Its config, log and admin address file live in a temporary directory that
/// is removed on drop, unless the thread is panicking (a failing test), in
/// which case the directory is kept and the log tail is printed.
#[derive(Debug)]
pub struct Envoy {
    child: Mutex<Option<Child>>,
    pid: u32,
    admin_addr: SocketAddr,
    admin: HttpClient,
    config_path: PathBuf,
    log_path: PathBuf,
    dir: Option<tempfile::TempDir>,
}

/// Launch options for [`Envoy`]; from [`Envoy::builder`].
#[derive(Clone, Debug)]
pub struct EnvoyBuilder {
    log_level: String,
    args: Vec<OsString>,
    startup_timeout: Duration,
}

impl Default for EnvoyBuilder {
    fn default() -> Self {
        Self {
            log_level: "info".to_owned(),
            args: Vec::new(),
            startup_timeout: STARTUP_TIMEOUT,
        }
    }
}

impl EnvoyBuilder {
    /// Envoy's `--log-level` (default `info`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_owned();
        self
    }

    /// An extra command-line argument, e.g. `--component-log-level`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// How long to wait for the admin listener (default [`STARTUP_TIMEOUT`]).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Writes `bootstrap_yaml` to a temporary directory, starts Envoy on it
    /// and waits until its admin listener is bound. Does not wait for
    /// `/ready`: see [`Envoy::wait_ready`].
    pub async fn start(self, bootstrap_yaml: &str) -> anyhow::Result<Envoy> {
        let binary = tokio::task::spawn_blocking(crate::envoy_binary).await??;
        let dir = tempfile::Builder::new()
            .prefix("knarr-envoy.")
            .tempdir()
            .context("creating Envoy's temporary directory")?;
        let config_path = dir.path().join("envoy.yaml");
        let log_path = dir.path().join("envoy.log");
        let admin_path = dir.path().join("admin.txt");
        std::fs::write(&config_path, bootstrap_yaml).context("writing bootstrap")?;
        let log = std::fs::File::create(&log_path).context("creating Envoy log")?;

        let mut child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                &self.log_level,
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let pid = child.id().context("Envoy exited before its pid was read")?;
        tracing::debug!(pid, dir = %dir.path().display(), "envoy spawned");

        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        let admin_addr = loop {
            // Envoy may be caught mid-write; an unparsable file is retried.
            if let Ok(text) = std::fs::read_to_string(&admin_path) {
                if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                    break addr;
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "Envoy exited during startup ({status}){}",
                    log_tail(&log_path)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill().await;
                bail!(
                    "Envoy did not bind its admin listener within {:?}{}",
                    self.startup_timeout,
                    log_tail(&log_path)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        tracing::info!(pid, %admin_addr, "envoy started");

        Ok(Envoy {
            child: Mutex::new(Some(child)),
            pid,
            admin_addr,
            admin: HttpClient::new(admin_addr),
            config_path,
            log_path,
            dir: Some(dir),
        })
    }
}

impl Envoy {
    /// Starts Envoy on `bootstrap_yaml` with default options; see
    /// [`EnvoyBuilder::start`].
    pub async fn start(bootstrap_yaml: &str) -> anyhow::Result<Envoy> {
        Self::builder().start(bootstrap_yaml).await
    }

    /// Launch options beyond the defaults.
    pub fn builder() -> EnvoyBuilder {
        EnvoyBuilder::default()
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Path of the bootstrap file Envoy was started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Path of Envoy's combined stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Envoy's log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status, if Envoy has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Polls the async predicate `f` until it is true. Fails after `timeout`,
    /// or as soon as Envoy exits, with an error naming `what` and carrying
    /// the tail of Envoy's log.
    pub async fn wait_until<F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if f().await {
                return Ok(());
            }
            if let Some(status) = self.exit_status() {
                bail!(
                    "Envoy exited ({status}) while waiting for {what}{}",
                    self.log_tail()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until `GET /ready` answers 200 (Envoy has finished initializing,
    /// including its first xDS responses).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until("Envoy /ready to answer 200", timeout, || async {
            matches!(self.admin_get("/ready").await, Ok(r) if r.status == 200)
        })
        .await
    }

    /// `GET {path_and_query}` on the admin API, whatever the status.
    pub async fn admin_get(&self, path_and_query: &str) -> anyhow::Result<HttpReply> {
        self.admin
            .get(&self.admin_addr.to_string(), path_and_query)
            .await
    }

    /// `POST {path_and_query}` on the admin API (e.g. `/healthcheck/fail`,
    /// `/drain_listeners?graceful`), whatever the status.
    pub async fn admin_post(&self, path_and_query: &str) -> anyhow::Result<HttpReply> {
        let req = http::Request::post(path_and_query)
            .body(bytes::Bytes::new())
            .with_context(|| format!("building POST {path_and_query}"))?;
        self.admin.send(req).await
    }

    /// `GET {path_and_query}` on the admin API, parsed as JSON; non-200 is an
    /// error.
    pub async fn admin_json(&self, path_and_query: &str) -> anyhow::Result<serde_json::Value> {
        let reply = self.admin_get(path_and_query).await?;
        if reply.status != 200 {
            bail!(
                "admin GET {path_and_query}: {} {}",
                reply.status,
                reply.body
            );
        }
        serde_json::from_str(&reply.body)
            .with_context(|| format!("admin GET {path_and_query}: not JSON"))
    }

    /// `GET /config_dump?include_eds`.
    pub async fn config_dump(&self) -> anyhow::Result<ConfigDump> {
        self.admin_json("/config_dump?include_eds")
            .await
            .map(ConfigDump)
    }

    /// Names of active dynamic listeners; see [`ConfigDump::listener_names`].
    pub async fn listener_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.config_dump().await?.listener_names())
    }

    /// Names of active dynamic clusters; see [`ConfigDump::cluster_names`].
    pub async fn cluster_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.config_dump().await?.cluster_names())
    }

    /// Names of dynamic route configurations; see
    /// [`ConfigDump::route_config_names`].
    pub async fn route_config_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.config_dump().await?.route_config_names())
    }

    /// `version_info` of the active dynamic resource `name` of `kind`; see
    /// [`ConfigDump::version_of`].
    pub async fn version_of(
        &self,
        kind: ResourceKind,
        name: &str,
    ) -> anyhow::Result<Option<String>> {
        Ok(self.config_dump().await?.version_of(kind, name))
    }

    /// The port listener `name` is bound to (from `/listeners`), so listeners
    /// configured on port 0 can be reached. `None` if it is not bound yet or
    /// the admin API did not answer.
    pub async fn listener_port(&self, name: &str) -> Option<u16> {
        let listeners = self.admin_json("/listeners?format=json").await.ok()?;
        admin::listener_ports(&listeners)
            .into_iter()
            .find_map(|(n, port)| (n == name).then_some(port))
    }

    /// Waits until listener `name` is bound and returns its port.
    pub async fn wait_listener_port(&self, name: &str, timeout: Duration) -> anyhow::Result<u16> {
        let port = Cell::new(None);
        self.wait_until(
            &format!("listener {name:?} to be bound"),
            timeout,
            || async {
                port.set(self.listener_port(name).await);
                port.get().is_some()
            },
        )
        .await?;
        Ok(port.get().unwrap_or_default())
    }

    /// The value of counter or gauge `name` (e.g.
    /// `cluster.rev-1.upstream_rq_total`); `None` if it does not exist (yet),
    /// is not numeric, or the admin API did not answer.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let reply = self
            .admin_get(&format!("/stats?filter={}", admin::exact_stat_filter(name)))
            .await
            .ok()?;
        if reply.status != 200 {
            return None;
        }
        admin::stat_value(&reply.body, name)
    }

    /// Asks Envoy to exit (`/quitquitquit`) and waits for it, killing it if it
    /// has not exited within 5 s.
    pub async fn stop(self) {
        let _ = self.admin_post("/quitquitquit").await;
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = child {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                tracing::warn!(pid = self.pid, "envoy ignored /quitquitquit; killing it");
                let _ = child.kill().await;
            }
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "Envoy (pid {}) files kept in {}{}",
                    self.pid,
                    kept.display(),
                    log_tail(&self.log_path)
                );
            }
        }
        // The child (kill_on_drop) and the temporary directory go with self.
    }
}

/// The last lines of the log at `path`, formatted to append to an error.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    format!(
        "\n--- last {} lines of {} ---\n{}",
        tail.len(),
        path.display(),
        tail.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{http_get, trace_init, HttpClient, Upstream};

    const WAIT: Duration = Duration::from_secs(20);

    /// Admin and listener on port 0; `/hello` answered by Envoy itself, the
    /// rest routed to a static cluster pointing at `upstream_port`.
    fn bootstrap(upstream_port: u16) -> String {
        format!(
            r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ path: "/hello" }}
                direct_response: {{ status: 200, body: {{ inline_string: "hello" }} }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }} }}
"#
        )
    }

    #[tokio::test]
    async fn real_envoy_serves_direct_response_and_proxies() {
        trace_init();
        let upstream = Upstream::start("rev-1").await.unwrap();
        let envoy = Envoy::start(&bootstrap(upstream.port())).await.unwrap();
        envoy.wait_ready(WAIT).await.unwrap();
        let port = envoy.wait_listener_port("ingress", WAIT).await.unwrap();
        assert_ne!(port, 0);
        let listener = SocketAddr::from(([127, 0, 0, 1], port));

        let reply = http_get(listener, "svc.example.com", "/hello")
            .await
            .unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "hello"));

        let client = HttpClient::new(listener);
        let req = http::Request::get("/")
            .header("host", "svc.example.com")
            .header("knative-serving-revision", "rev-1")
            .body(bytes::Bytes::new())
            .unwrap();
        let reply = client.send(req).await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "rev-1");
        assert_eq!(
            reply.header("x-echo-knative-serving-revision"),
            Some("rev-1")
        );
        // Envoy adds a request id; the upstream echoes it.
        assert!(
            reply.header("x-echo-x-request-id").is_some(),
            "{:?}",
            reply.headers
        );
        assert_eq!(upstream.requests(), 1);

        envoy
            .wait_until("backend rq counter", WAIT, || async {
                envoy.stat("cluster.backend.upstream_rq_total").await == Some(1)
            })
            .await
            .unwrap();
        assert_eq!(
            envoy.stat("listener_manager.total_listeners_active").await,
            Some(1)
        );
        assert_eq!(envoy.stat("no.such.stat").await, None);
        assert_eq!(envoy.listener_port("no-such-listener").await, None);

        // Everything here is static, so the dynamic-only helpers see nothing,
        // while the raw dump has the bootstrap's listener.
        let dump = envoy.config_dump().await.unwrap();
        assert!(dump.cluster_names().is_empty());
        let listeners = dump.section(ResourceKind::Listener.dump_type()).unwrap();
        assert_eq!(
            listeners["static_listeners"][0]["listener"]["name"],
            "ingress"
        );

        assert!(
            envoy.log().contains("starting main dispatch loop"),
            "{}",
            envoy.log()
        );
        envoy.stop().await;
    }

    #[tokio::test]
    async fn bad_bootstrap_fails_fast_with_the_log() {
        let started = std::time::Instant::now();
        let err = Envoy::start("admin: {address: {socket_address: {port_value: not-a-port}}}")
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("exited during startup"), "{msg}");
        assert!(msg.contains("envoy.log"), "{msg}");
        assert!(started.elapsed() < STARTUP_TIMEOUT, "did not fail fast");
    }
}
