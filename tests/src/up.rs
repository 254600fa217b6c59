//! `knarr up` as a user runs it: the real `knarr` binary on a folder of manifests, with every
//! address on port 0, its Envoy and its pods. The fixture reads the addresses `knarr up`
//! prints, drives the `knarr` CLI against its API, and sends traffic through the gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::{
    activator_binary, envoy_binary, http_get, knarr_binary, poll_until, queue_proxy_binary,
    HttpReply,
};

/// How long `knarr up` gets to print its addresses (Envoy starting included).
const START: Duration = Duration::from_secs(60);

/// The example app (`examples/apps/hello.py`), by absolute path.
pub fn hello_app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/apps/hello.py")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("examples/apps/hello.py"))
}

/// A Knative Service running the example app with `TARGET=target`, plus `extra` YAML lines
/// appended under `spec:` (e.g. a `traffic:` block) and `labels` under `metadata:`.
pub fn hello_service(name: &str, target: &str, labels: &str, extra: &str) -> String {
    let app = hello_app();
    format!(
        "apiVersion: serving.knative.dev/v1\n\
         kind: Service\n\
         metadata:\n  name: {name}\n  namespace: default\n{labels}\
         spec:\n  template:\n    spec:\n      containers:\n      - image: example.com/hello\n        \
         command: [python3, {app}]\n        env: [{{name: TARGET, value: {target}}}]\n{extra}",
        app = app.display()
    )
}

/// A running `knarr up`.
pub struct KnarrUp {
    child: Child,
    /// The watched manifest folder.
    pub manifests: tempfile::TempDir,
    /// Pod logs, Envoy's bootstrap and log.
    pub state: tempfile::TempDir,
    pub gateway: SocketAddr,
    pub internal: SocketAddr,
    pub api: SocketAddr,
    stdout: Arc<Mutex<String>>,
}

impl KnarrUp {
    /// Writes `files` (name, YAML) into a new folder and runs `knarr up` on it.
    pub async fn start(files: &[(&str, &str)]) -> anyhow::Result<KnarrUp> {
        Self::start_with(files, None, &[]).await
    }

    /// [`KnarrUp::start`] with Knative's `config-autoscaler` keys (a YAML map), e.g. short
    /// windows so that idle revisions go to zero within a test, and more `knarr up` flags.
    pub async fn start_with(
        files: &[(&str, &str)],
        autoscaler: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<KnarrUp> {
        let manifests = tempfile::Builder::new()
            .prefix("knarr-up-manifests.")
            .tempdir()?;
        for (name, text) in files {
            std::fs::write(manifests.path().join(name), text)?;
        }
        let path = manifests.path().to_owned();
        Self::launch(&[&path], manifests, autoscaler, args).await
    }

    /// Runs `knarr up` on `paths`; `manifests` is kept as the folder [`KnarrUp::write`] edits.
    pub async fn start_on(paths: &[&Path], manifests: tempfile::TempDir) -> anyhow::Result<Self> {
        Self::launch(paths, manifests, None, &[]).await
    }

    async fn launch(
        paths: &[&Path],
        manifests: tempfile::TempDir,
        autoscaler: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        crate::trace_init();
        let (knarr, envoy, queue_proxy, activator) = tokio::task::spawn_blocking(|| {
            anyhow::Ok((
                knarr_binary()?,
                envoy_binary()?,
                queue_proxy_binary()?,
                activator_binary()?,
            ))
        })
        .await??;
        let state = tempfile::Builder::new()
            .prefix("knarr-up-state.")
            .tempdir()?;
        let stderr = std::fs::File::create(state.path().join("knarr.log"))?;
        let mut extra: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        if let Some(yaml) = autoscaler {
            let path = state.path().join("config-autoscaler.yaml");
            std::fs::write(&path, yaml)?;
            extra.push(std::ffi::OsString::from("--autoscaler-config"));
            extra.push(path.into_os_string());
        }
        let mut child = Command::new(&knarr)
            .arg("up")
            .args(paths)
            .args(extra)
            .args(["--port", "0", "--internal-port", "0"])
            .args(["--api-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0", "--drain-seconds", "0.2"])
            .arg("--state-dir")
            .arg(state.path())
            .env("KNARR_ENVOY", envoy)
            .env("KNARR_QUEUE_PROXY", queue_proxy)
            .env("KNARR_ACTIVATOR", activator)
            .env("KNARR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            // Not killed on drop: SIGKILL would leave its Envoy and pods running (see `Drop`).
            .spawn()
            .with_context(|| format!("spawning {}", knarr.display()))?;
        let stdout = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = stdout.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let (mut gateway, mut internal, mut api) = (None, None, None);
        let deadline = tokio::time::Instant::now() + START;
        while gateway.is_none() || internal.is_none() || api.is_none() {
            let line = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => line,
                _ => bail!(
                    "knarr up did not print its addresses; stdout:\n{}\nstderr:\n{}",
                    stdout.lock().unwrap(),
                    std::fs::read_to_string(state.path().join("knarr.log")).unwrap_or_default()
                ),
            };
            let addr = |prefix: &str| -> Option<SocketAddr> {
                let rest = line.trim().strip_prefix(prefix)?.trim();
                let word = rest.split_whitespace().next()?;
                word.trim_start_matches("http://").parse().ok()
            };
            gateway = gateway.or_else(|| addr("gateway:"));
            internal = internal.or_else(|| addr("cluster-local:"));
            api = api.or_else(|| addr("api:"));
        }
        Ok(KnarrUp {
            child,
            manifests,
            state,
            gateway: gateway.unwrap_or_else(|| unreachable!()),
            internal: internal.unwrap_or_else(|| unreachable!()),
            api: api.unwrap_or_else(|| unreachable!()),
            stdout,
        })
    }

    /// What `knarr up` printed so far.
    pub fn output(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Its log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("knarr.log")).unwrap_or_default()
    }

    /// Writes (or replaces) a manifest in the watched folder, atomically (write, then rename).
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let tmp = self.manifests.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests.path().join(name))?;
        Ok(())
    }

    /// Runs the `knarr` CLI against this instance's API; returns (success, stdout, stderr).
    pub async fn knarr(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let knarr = tokio::task::spawn_blocking(knarr_binary).await??;
        let out = Command::new(knarr)
            .args(args)
            .env("KNARR_API_ADDR", self.api.to_string())
            .stdin(Stdio::null())
            .output()
            .await?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// GET through the external gateway.
    pub async fn get(&self, host: &str, path: &str) -> anyhow::Result<HttpReply> {
        http_get(self.gateway, host, path).await
    }

    /// GET through the cluster-local gateway.
    pub async fn get_internal(&self, host: &str, path: &str) -> anyhow::Result<HttpReply> {
        http_get(self.internal, host, path).await
    }

    /// A JSON document of the status API (`/api/v1/...`).
    pub async fn api_json(&self, path: &str) -> anyhow::Result<Value> {
        let reply = http_get(self.api, "knarr", path).await?;
        if reply.status != 200 {
            bail!("{path}: {} {}", reply.status, reply.body);
        }
        Ok(serde_json::from_str(&reply.body)?)
    }

    /// A Knative Service's manifest with status.
    pub async fn service(&self, name: &str) -> anyhow::Result<Value> {
        self.api_json(&format!("/api/v1/services/default/{name}"))
            .await
    }

    /// Waits until the Service is Ready and its latest created revision is `revision`, ready.
    pub async fn wait_service(&self, name: &str, revision: &str, timeout: Duration) {
        let result = poll_until(
            &format!("Service {name} Ready on {revision}"),
            timeout,
            || async {
                let Ok(s) = self.service(name).await else {
                    return false;
                };
                let status = &s["status"];
                let ready = status["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                ready && status["latestReadyRevisionName"] == revision
            },
        )
        .await;
        if let Err(e) = result {
            panic!(
                "{e:#}\nservice: {}\nknarr up printed:\n{}\nlog:\n{}",
                self.service(name)
                    .await
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                self.output(),
                self.log()
            );
        }
    }

    /// The pids of every process of the pods of `name` (a Service or Revision).
    pub async fn pod_pids(&self, name: &str) -> anyhow::Result<Vec<u32>> {
        let pods = self
            .api_json(&format!("/api/v1/pods/default/{name}"))
            .await?;
        let mut pids = Vec::new();
        for pod in pods["items"].as_array().into_iter().flatten() {
            for key in ["appPid", "queueProxyPid"] {
                if let Some(pid) = pod[key].as_u64() {
                    pids.push(u32::try_from(pid)?);
                }
            }
        }
        Ok(pids)
    }

    /// The pid of `knarr up` itself.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Where the activator takes requests, as `knarr up` printed it (`activator:`); `None`
    /// until it is printed, and always with `--no-autoscaling`.
    pub fn activator(&self) -> Option<SocketAddr> {
        self.output().lines().find_map(|line| {
            let rest = line.trim().strip_prefix("activator:")?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// The activator's admin address (`/metrics`), from the `activator serving … admin=ADDR`
    /// line of its log in the state folder.
    pub fn activator_admin(&self) -> Option<SocketAddr> {
        let log = std::fs::read_to_string(self.state.path().join("activator.log")).ok()?;
        log.lines()
            .filter(|line| line.contains("activator serving"))
            .find_map(|line| {
                let rest = &line[line.find("admin=")? + "admin=".len()..];
                rest.split_whitespace().next()?.parse().ok()
            })
    }

    /// The activator's pid: the process whose command line names this instance's
    /// `activator-address.txt`.
    pub fn activator_pid(&self) -> Option<u32> {
        let file = self.state.path().join("activator-address.txt");
        processes_mentioning(&file.to_string_lossy())
            .into_iter()
            .next()
    }

    /// Sends SIGINT (Ctrl-C) and waits for `knarr up` to exit.
    pub async fn stop(mut self) -> anyhow::Result<(ExitStatus, String)> {
        let pid = self.child.id().context("already exited")?;
        let status = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -INT {pid} failed");
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("knarr up did not exit within 60 s of SIGINT")??;
        // Let the stdout reader drain.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok((status, self.output()))
    }
}

/// A test that ends without [`KnarrUp::stop`] (a failed assertion, say) still leaves nothing
/// running: `knarr up` gets SIGINT and stops its Envoy and pods on its own.
impl Drop for KnarrUp {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
    }
}

/// Whether a process is alive (and not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Pids of live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) && process_alive(pid) {
                found.push(pid);
            }
        }
    }
    found
}
