//! A real Kubernetes API server for tests: `etcd` and `kube-apiserver` as child processes,
//! configured the way controller-runtime's envtest does (see `shared/KUBERNETES.md` §4), plus
//! `kubectl` against it.
//!
//! The binaries come from `scripts/kube-bin.sh` ([`kube_binaries`]): `$KNARR_KUBE_BIN` if set,
//! else built once from Go modules into `~/.cache/knarr/kube/<versions>/bin`. Tests never skip
//! for missing binaries; they build them or fail naming the step that failed.
//!
//! [`KubeApi::start`] makes a temporary directory with a throwaway CA, a serving certificate
//! for `127.0.0.1`/`localhost`, a service-account signing key and a static admin token
//! (`system:masters`) — with [`KubeApi::start_with_static_service_accounts`] also static
//! tokens that act as ServiceAccounts and survive etcd wipes — starts etcd on free loopback
//! ports and waits for its `/health`, then starts kube-apiserver (RBAC, no ServiceAccount admission, no endpoint reconciler) and waits
//! for `/readyz` to say `ok` over TLS that trusts only that CA. Both logs go to files in the
//! directory; a failed wait carries the tail of the log. Dropping the [`KubeApi`] kills both
//! processes and waits for them before the directory goes (it is kept, and its path printed,
//! when the test is panicking).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::io::AsyncWriteExt as _;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::client::{buffer, HttpReply};
use crate::REQUEST_TIMEOUT;

/// The four executables [`kube_binaries`] provides.
pub const KUBE_BINARIES: [&str; 4] = [
    "kube-apiserver",
    "etcd",
    "kubectl",
    "kube-controller-manager",
];

/// How long [`KubeApi::start`] (and the restarts) wait for etcd's `/health` and then for
/// kube-apiserver's `/readyz`. kube-apiserver needs a few seconds; the margin is for a loaded
/// 2-core machine.
pub const KUBE_STARTUP_TIMEOUT: Duration = Duration::from_secs(90);

/// How long one `kubectl` call may take.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the startup waits re-check (each check of the apiserver is a TLS handshake).
const STARTUP_POLL: Duration = Duration::from_millis(50);

/// Lines of a log (or of `kube-bin.sh`'s stderr) attached to errors.
const LOG_TAIL_LINES: usize = 40;

/// The field manager of [`KubeApi::apply_yaml`]'s server-side applies.
const FIELD_MANAGER: &str = "knarr-test-support";

/// The directory holding `kube-apiserver`, `etcd`, `kubectl` and `kube-controller-manager`.
///
/// Runs `bash <workspace>/scripts/kube-bin.sh` (which honours `KNARR_KUBE_BIN=DIR`, and
/// otherwise builds the binaries once into `~/.cache/knarr/kube/<versions>/bin`, which takes
/// a long time on the first run) and takes the last line of its stdout. Its progress is passed
/// on to stderr as it comes. The outcome, success or failure, is computed once per process so
/// parallel tests do not each run the script; a failure names the step that failed and carries
/// the tail of the script's stderr. Blocking: call it from `spawn_blocking` in async code
/// ([`KubeApi::start`] does).
pub fn kube_binaries() -> anyhow::Result<PathBuf> {
    static BINARIES: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARIES
        .get_or_init(|| {
            run_kube_bin(&crate::install::workspace_root().join("scripts/kube-bin.sh"))
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Runs the script, streaming its stderr through while keeping the tail for the error.
fn run_kube_bin(script: &Path) -> anyhow::Result<PathBuf> {
    let how = "run `scripts/kube-bin.sh` by hand to see the whole output, or set \
               KNARR_KUBE_BIN to a directory holding kube-apiserver, etcd, kubectl and \
               kube-controller-manager";
    let mut child = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running bash {}", script.display()))?;
    // Drain stdout on a thread so neither pipe can fill up while the other is read.
    let mut stdout = child.stdout.take().context("kube-bin.sh stdout")?;
    let stdout = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let mut tail = VecDeque::with_capacity(LOG_TAIL_LINES);
    let mut last_step = None;
    for line in BufReader::new(child.stderr.take().context("kube-bin.sh stderr")?).lines() {
        let line = line.context("reading kube-bin.sh's stderr")?;
        eprintln!("{line}");
        if line.starts_with("kube-bin: ") {
            last_step = Some(line.clone());
        }
        if tail.len() == LOG_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child.wait().context("waiting for kube-bin.sh")?;
    let stdout = stdout
        .join()
        .map_err(|_| anyhow::anyhow!("the thread reading kube-bin.sh's stdout panicked"))?
        .context("reading kube-bin.sh's stdout")?;
    if !status.success() {
        let tail = Vec::from(tail).join("\n");
        bail!(
            "{} ({status}); {how}\n--- last lines of its stderr ---\n{tail}",
            last_step.unwrap_or_else(|| format!("{} failed", script.display())),
        );
    }
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .with_context(|| format!("{} printed no directory on stdout; {how}", script.display()))?;
    for binary in KUBE_BINARIES {
        if !dir.join(binary).is_file() {
            bail!(
                "{} printed {}, which has no {binary}; {how}",
                script.display(),
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// A running etcd and kube-apiserver on free loopback ports, with an admin token, for one test.
///
/// Killed (both processes, waited for) when dropped.
#[derive(Debug)]
pub struct KubeApi {
    // Declared before `dir`: the processes go before their data directory.
    apiserver: Option<Process>,
    etcd: Option<Process>,
    bin: PathBuf,
    etcd_args: Vec<String>,
    apiserver_args: Vec<String>,
    etcd_url: String,
    etcd_data: PathBuf,
    port: u16,
    admin_token: String,
    /// (namespace, name, token) of each ServiceAccount with a static token.
    static_tokens: Vec<(String, String, String)>,
    ca_pem: String,
    tls: Arc<ClientConfig>,
    kubeconfig: PathBuf,
    kubectl_cache: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl KubeApi {
    /// Starts etcd, waits for its `/health`, starts kube-apiserver and waits for `/readyz`.
    ///
    /// The flags are envtest's (`shared/KUBERNETES.md` §4) with token authentication: the admin
    /// is user `admin` in group `system:masters` ([`admin_token`](Self::admin_token)), and
    /// ServiceAccount tokens can be minted ([`token_for_service_account`](Self::token_for_service_account)).
    pub async fn start() -> anyhow::Result<KubeApi> {
        Self::start_with_static_service_accounts(&[]).await
    }

    /// [`start`](Self::start), and each ServiceAccount `(namespace, name)` in `accounts` also
    /// gets a static token in `--token-auth-file` ([`static_service_account_token`](Self::static_service_account_token)).
    ///
    /// It authenticates as the ServiceAccount does (user `system:serviceaccount:NS:NAME`, groups
    /// `system:serviceaccounts` and `system:serviceaccounts:NS`), so the RoleBindings naming the
    /// ServiceAccount are what it may do; but it needs no ServiceAccount object, so unlike a
    /// TokenRequest token it stays valid across [`restart_apiserver`](Self::restart_apiserver)
    /// and [`wipe_etcd`](Self::wipe_etcd) (where the ServiceAccount, if recreated, gets a new
    /// UID and the tokens minted for the old one are refused).
    pub async fn start_with_static_service_accounts(
        accounts: &[(&str, &str)],
    ) -> anyhow::Result<KubeApi> {
        let bin = tokio::task::spawn_blocking(kube_binaries).await??;
        let dir = tempfile::Builder::new()
            .prefix("knarr-kube.")
            .tempdir()
            .context("creating the API server's temporary directory")?;
        let path = |name: &str| dir.path().join(name);
        let arg = |flag: &str, p: &Path| format!("--{flag}={}", p.display());

        let pki = Pki::generate()?;
        std::fs::write(path("ca.crt"), &pki.ca_pem)?;
        std::fs::write(path("apiserver.crt"), &pki.serving_cert_pem)?;
        std::fs::write(path("apiserver.key"), &pki.serving_key_pem)?;
        std::fs::write(path("sa.key"), &pki.sa_key_pem)?;
        std::fs::write(path("sa.pub"), &pki.sa_public_pem)?;
        let admin_token = random_token()?;
        // token,user,uid,"group1,group2"
        let mut tokens = format!("{admin_token},admin,admin,\"system:masters\"\n");
        let mut static_tokens = Vec::new();
        for (ns, name) in accounts {
            let token = random_token()?;
            tokens.push_str(&format!(
                "{token},system:serviceaccount:{ns}:{name},static-{ns}-{name},\
                 \"system:serviceaccounts,system:serviceaccounts:{ns}\"\n"
            ));
            static_tokens.push((ns.to_string(), name.to_string(), token));
        }
        std::fs::write(path("tokens.csv"), tokens)?;

        // Ports a child process must be told; each is re-bound by the same process kind on a
        // restart, so they stay fixed for the KubeApi's life.
        let client_port = crate::free_port()?;
        let peer_port = crate::free_port()?;
        let port = crate::free_port()?;
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_data = path("etcd");
        let etcd_args = vec![
            "--name=knarr".to_owned(),
            arg("data-dir", &etcd_data),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=knarr={peer_url}"),
            "--unsafe-no-fsync=true".to_owned(),
        ];
        let url = format!("https://127.0.0.1:{port}");
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".to_owned(),
            arg("tls-cert-file", &path("apiserver.crt")),
            arg("tls-private-key-file", &path("apiserver.key")),
            arg("cert-dir", &path("certs")),
            arg("token-auth-file", &path("tokens.csv")),
            "--authorization-mode=RBAC".to_owned(),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            format!("--service-account-issuer={url}/"),
            arg("service-account-key-file", &path("sa.pub")),
            arg("service-account-signing-key-file", &path("sa.key")),
            "--disable-admission-plugins=ServiceAccount".to_owned(),
            "--endpoint-reconciler-type=none".to_owned(),
            "--allow-privileged=true".to_owned(),
        ];

        let kubeconfig = path("admin.kubeconfig");
        let mut api = KubeApi {
            apiserver: None,
            etcd: None,
            bin,
            etcd_args,
            apiserver_args,
            etcd_url,
            etcd_data,
            port,
            admin_token,
            static_tokens,
            tls: Arc::new(client_config(&pki.ca_pem)?),
            ca_pem: pki.ca_pem,
            kubeconfig: kubeconfig.clone(),
            kubectl_cache: path("kubectl-cache"),
            dir: Some(dir),
        };
        api.write_kubeconfig(&kubeconfig, &api.admin_token)?;
        let started = Instant::now();
        api.start_etcd().await?;
        api.start_apiserver().await?;
        tracing::info!(url = %api.url(), elapsed = ?started.elapsed(), "kube-apiserver ready");
        Ok(api)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The API server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// etcd's client URL (`http://127.0.0.1:PORT`).
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// A bearer token for user `admin` in group `system:masters`.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The static token of ServiceAccount `ns/name`, if it was given to
    /// [`start_with_static_service_accounts`](Self::start_with_static_service_accounts).
    pub fn static_service_account_token(&self, ns: &str, name: &str) -> Option<&str> {
        self.static_tokens
            .iter()
            .find(|(n, a, _)| n == ns && a == name)
            .map(|(_, _, token)| token.as_str())
    }

    /// The CA that signed the API server's serving certificate, in PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The temporary directory: certificates, keys, `tokens.csv`, `admin.kubeconfig`, the logs
    /// (`etcd.log`, `kube-apiserver.log`) and etcd's data.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new(""), |d| d.path())
    }

    /// The admin kubeconfig [`kubectl`](Self::kubectl) uses.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Path of kube-apiserver's log (every run of it, restarts appended).
    pub fn apiserver_log_path(&self) -> PathBuf {
        self.dir().join("kube-apiserver.log")
    }

    /// Path of etcd's log.
    pub fn etcd_log_path(&self) -> PathBuf {
        self.dir().join("etcd.log")
    }

    /// Writes a kubeconfig for this API server that authenticates with `token` (the CA inline
    /// as `certificate-authority-data`), as both the Rust `kube` crate and `kubectl` read it.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> anyhow::Result<()> {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        // JSON is YAML, and needs no quoting rules of our own.
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "knarr", "cluster": {
                "server": self.url(),
                "certificate-authority-data": ca,
            }}],
            "users": [{"name": "knarr", "user": {"token": token}}],
            "contexts": [{"name": "knarr", "context": {"cluster": "knarr", "user": "knarr"}}],
            "current-context": "knarr",
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// Runs `kubectl ARGS` as the admin and returns its stdout; a failure carries its stderr.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_with_input(args, None).await
    }

    /// `kubectl apply --server-side -f -` with `yaml` on stdin, as the admin; returns kubectl's
    /// output (`namespace/x serverside-applied`, ...).
    pub async fn apply_yaml(&self, yaml: &str) -> anyhow::Result<String> {
        let manager = format!("--field-manager={FIELD_MANAGER}");
        self.kubectl_with_input(&["apply", "--server-side", &manager, "-f", "-"], Some(yaml))
            .await
    }

    /// A token for ServiceAccount `ns/name` from the TokenRequest API (`kubectl create token`),
    /// so a test can act as that ServiceAccount under RBAC rather than as the admin. Creates the
    /// namespace and the ServiceAccount first if they are missing (nothing else would: there is
    /// no ServiceAccount controller).
    pub async fn token_for_service_account(&self, ns: &str, name: &str) -> anyhow::Result<String> {
        self.apply_yaml(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
        ))
        .await
        .with_context(|| format!("creating ServiceAccount {ns}/{name}"))?;
        let token = self.kubectl(&["create", "token", name, "-n", ns]).await?;
        let token = token.trim();
        anyhow::ensure!(
            !token.is_empty(),
            "kubectl create token {name} -n {ns} printed nothing"
        );
        Ok(token.to_owned())
    }

    /// `GET {path}` as the admin, over TLS that trusts only [`ca_pem`](Self::ca_pem).
    pub async fn get(&self, path: &str) -> anyhow::Result<HttpReply> {
        self.get_as(path, &self.admin_token).await
    }

    /// `GET {path}` with `Authorization: Bearer {token}`.
    pub async fn get_as(&self, path: &str, token: &str) -> anyhow::Result<HttpReply> {
        let what = format!("GET {}{path}", self.url());
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(self.addr())
                .await
                .context("connect")?;
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
            let tls = TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .context("HTTP/1.1 handshake")?;
            let conn = tokio::spawn(conn);
            let req = Request::get(path)
                .header(header::HOST, format!("127.0.0.1:{}", self.port))
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Empty::<Bytes>::new())?;
            let resp = sender.send_request(req).await.context("sending request");
            let reply = match resp {
                Ok(resp) => buffer(resp).await,
                Err(e) => Err(e),
            };
            conn.abort();
            reply
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("{what}: no complete response within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| what)
    }

    /// Stops kube-apiserver (SIGKILL, as a crash) and starts it again on the same port with the
    /// same flags, keeping etcd and so every object; returns once `/readyz` says `ok`.
    pub async fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        self.apiserver = None; // killed and waited for
        self.start_apiserver().await
    }

    /// Stops kube-apiserver and etcd, deletes etcd's data, and starts both again (same ports,
    /// same credentials): an empty cluster behind the same URL.
    pub async fn wipe_etcd(&mut self) -> anyhow::Result<()> {
        self.apiserver = None; // killed and waited for, as etcd below
        self.etcd = None;
        std::fs::remove_dir_all(&self.etcd_data)
            .with_context(|| format!("deleting etcd's data in {}", self.etcd_data.display()))?;
        self.start_etcd().await?;
        self.start_apiserver().await
    }

    async fn start_etcd(&mut self) -> anyhow::Result<()> {
        let mut etcd = Process::spawn(
            "etcd",
            &self.bin.join("etcd"),
            &self.etcd_args,
            &self.etcd_log_path(),
        )?;
        let health: SocketAddr = self
            .etcd_url
            .trim_start_matches("http://")
            .parse()
            .context("etcd's client URL")?;
        let deadline = Instant::now() + KUBE_STARTUP_TIMEOUT;
        loop {
            if let Ok(reply) = crate::http_get(health, "127.0.0.1", "/health").await {
                // {"health":"true","reason":""}
                if reply.status == 200 && reply.body.contains(r#""health":"true""#) {
                    break;
                }
            }
            etcd.fail_if_exited()?;
            if Instant::now() >= deadline {
                bail!(
                    "etcd did not report healthy at {}/health within {KUBE_STARTUP_TIMEOUT:?}{}",
                    self.etcd_url,
                    log_tail(&etcd.log)
                );
            }
            tokio::time::sleep(STARTUP_POLL).await;
        }
        self.etcd = Some(etcd);
        Ok(())
    }

    async fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let mut apiserver = Process::spawn(
            "kube-apiserver",
            &self.bin.join("kube-apiserver"),
            &self.apiserver_args,
            &self.apiserver_log_path(),
        )?;
        let deadline = Instant::now() + KUBE_STARTUP_TIMEOUT;
        loop {
            let last = match self.get("/readyz").await {
                Ok(reply) if reply.status == 200 && reply.body == "ok" => break,
                Ok(reply) => format!("{}: {}", reply.status, reply.body),
                Err(e) => format!("{e:#}"),
            };
            apiserver.fail_if_exited()?;
            if Instant::now() >= deadline {
                bail!(
                    "kube-apiserver at {} was not ready within {KUBE_STARTUP_TIMEOUT:?} \
                     (last /readyz: {last}){}",
                    self.url(),
                    log_tail(&apiserver.log)
                );
            }
            tokio::time::sleep(STARTUP_POLL).await;
        }
        self.apiserver = Some(apiserver);
        Ok(())
    }

    async fn kubectl_with_input(
        &self,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<String> {
        let what = format!("kubectl {}", args.join(" "));
        let mut child = tokio::process::Command::new(self.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            // Its own discovery cache: another API server may have had this port before.
            .arg(format!("--cache-dir={}", self.kubectl_cache.display()))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        if let Some(input) = input {
            let mut stdin = child.stdin.take().context("kubectl's stdin")?;
            stdin
                .write_all(input.as_bytes())
                .await
                .with_context(|| format!("{what}: writing stdin"))?;
            // Dropped: kubectl sees EOF.
        }
        let out = tokio::time::timeout(KUBECTL_TIMEOUT, child.wait_with_output())
            .await
            .with_context(|| format!("{what}: no exit within {KUBECTL_TIMEOUT:?}"))?
            .with_context(|| format!("{what}: waiting for it"))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        String::from_utf8(out.stdout).with_context(|| format!("{what}: stdout is not UTF-8"))
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // Processes first: etcd must not be writing while its directory is removed.
        self.apiserver = None;
        self.etcd = None;
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "kube-apiserver and etcd files kept in {}{}",
                    kept.display(),
                    log_tail(&kept.join("kube-apiserver.log"))
                );
            }
        }
    }
}

/// A child process whose output goes to a log file; killed and waited for when dropped.
#[derive(Debug)]
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(
        name: &'static str,
        binary: &Path,
        args: &[String],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        writeln!(
            file,
            "--- knarr-test-support: starting {} {}",
            binary.display(),
            args.join(" ")
        )?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        tracing::debug!(name, pid = child.id(), "spawned");
        Ok(Process {
            name,
            child,
            log: log.to_owned(),
        })
    }

    /// An error with the log's tail if the process has exited.
    fn fail_if_exited(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!(
                "{} exited during startup ({status}){}",
                self.name,
                log_tail(&self.log)
            ),
            None => Ok(()),
        }
    }

    fn kill_and_wait(&mut self) -> std::io::Result<ExitStatus> {
        // An error only means it has exited already; `wait` reaps it either way.
        let _ = self.child.kill();
        self.child.wait()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.kill_and_wait() {
            tracing::warn!(name = self.name, error = %e, "waiting for a killed process");
        }
    }
}

/// The certificates and keys of one API server, in PEM.
struct Pki {
    ca_pem: String,
    serving_cert_pem: String,
    serving_key_pem: String,
    sa_key_pem: String,
    sa_public_pem: String,
}

impl Pki {
    /// A CA (ECDSA P-256), a serving certificate it signs for `127.0.0.1` and `localhost`, and
    /// a separate key pair that signs ServiceAccount tokens (ES256).
    fn generate() -> anyhow::Result<Pki> {
        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "knarr kube-apiserver test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).context("self-signing the CA")?;
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate().context("generating the serving key")?;
        // "127.0.0.1" becomes an IP address SAN.
        let mut serving =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let serving_cert = serving
            .signed_by(&serving_key, &issuer)
            .context("signing the serving certificate")?;

        let sa_key = KeyPair::generate().context("generating the service-account key")?;
        Ok(Pki {
            ca_pem: ca_cert.pem(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_public_pem: sa_key.public_key_pem(),
        })
    }
}

/// A rustls client config (ring provider) that trusts only `ca_pem`.
fn client_config(ca_pem: &str) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("parsing the CA PEM")?)
            .context("adding the CA")?;
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// 32 hex characters from the kernel's random source.
fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
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
    use rustls::client::danger::ServerCertVerifier as _;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("kube-bin.sh");
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn a_failing_script_names_its_step_and_carries_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "echo 'kube-bin: building kube-apiserver ...' >&2\n\
             echo 'compile error in foo.go' >&2\n\
             echo 'kube-bin: building kube-apiserver failed: go build exited with status 1' >&2\n\
             exit 1\n",
        );
        let err = format!("{:#}", run_kube_bin(&path).unwrap_err());
        assert!(
            err.starts_with("kube-bin: building kube-apiserver failed: go build exited"),
            "{err}"
        );
        assert!(err.contains("compile error in foo.go"), "{err}");
        assert!(err.contains("KNARR_KUBE_BIN"), "{err}");
    }

    #[test]
    fn the_last_stdout_line_is_the_directory_and_must_hold_the_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let body = format!("echo noise\necho progress >&2\necho {}\n", bin.display());
        let err = format!(
            "{:#}",
            run_kube_bin(&script(dir.path(), &body)).unwrap_err()
        );
        assert!(err.contains("which has no kube-apiserver"), "{err}");
        for b in KUBE_BINARIES {
            std::fs::write(bin.join(b), "").unwrap();
        }
        assert_eq!(run_kube_bin(&script(dir.path(), &body)).unwrap(), bin);
    }

    #[test]
    fn the_serving_certificate_verifies_for_127_0_0_1_under_its_ca() {
        let pki = Pki::generate().unwrap();
        let cert = CertificateDer::from_pem_slice(pki.serving_cert_pem.as_bytes()).unwrap();
        let roots = Arc::new({
            let mut r = RootCertStore::empty();
            r.add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
                .unwrap();
            r
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for name in ["127.0.0.1", "localhost"] {
            let name = ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&cert, &[], &name, &[], now)
                .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
        let other = ServerName::try_from("10.0.0.1").unwrap();
        assert!(verifier
            .verify_server_cert(&cert, &[], &other, &[], now)
            .is_err());
        assert!(pki.sa_key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(pki.sa_public_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    }

    #[test]
    fn a_process_that_exits_during_startup_fails_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let args = [
            "-c".to_owned(),
            "echo 'bad flag --nope' >&2; exit 3".to_owned(),
        ];
        let mut process = Process::spawn("sh", Path::new("sh"), &args, &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            if let Err(e) = process.fail_if_exited() {
                break format!("{e:#}");
            }
            assert!(Instant::now() < deadline, "sh did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            err.starts_with("sh exited during startup (exit status: 3)"),
            "{err}"
        );
        assert!(err.contains("bad flag --nope"), "{err}");
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }
}
