//! `knarr`: the command users run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use knarr::bootstrap::{self, BootstrapOptions};
use knarr::{ControlPlane, ServeConfig};
use knarr_snapshot::NodeGrouping;
use knarr_translate::kingress::GatewayConfig;
use knarr_translate::reconcile::ClassFilter;

use tracing::{error, info};

mod api_client;
mod apply;
mod describe;
mod get;
mod logs;

use api_client::{AlreadyReported, UsageError};

/// Exit code for bad configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "knarr",
    version,
    about = "Knative Serving's data plane around a real Envoy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Grouping {
    /// Each Envoy node id gets its own snapshot (falling back to the shared one).
    NodeId,
    /// Envoys with the same node cluster share a snapshot.
    Cluster,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the xDS gRPC server.
    #[arg(long, default_value = "127.0.0.1:18000")]
    xds_addr: SocketAddr,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics, /clients).
    #[arg(long, default_value = "127.0.0.1:18002")]
    admin_addr: SocketAddr,
    /// Address of the read-only status API that `knarr get` reads.
    #[arg(long, default_value = "127.0.0.1:18001")]
    api_addr: SocketAddr,
    /// Where objects come from: `file:DIR` (repeatable; every YAML file in DIR is loaded and
    /// watched: KIngresses, Services, Endpoints, EndpointSlices and TLS Secrets), or `kube`:
    /// the Kubernetes API server (a build with the `kube` feature), which also gets each
    /// KIngress's status written back.
    #[arg(long = "source", value_name = "file:DIR|kube")]
    sources: Vec<String>,
    #[command(flatten)]
    kube: KubeArgs,
    /// A single YAML file of objects, watched (repeatable).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// A Knarr routes file (see examples/routes.yaml), served as it is (repeatable).
    #[arg(long = "routes", value_name = "FILE")]
    routes: Vec<PathBuf>,
    /// How Envoys are grouped for config.
    #[arg(long, value_enum, default_value = "node-id")]
    group_by: Grouping,
    /// Address the gateway Envoy listens on (0.0.0.0 in a cluster).
    #[arg(long, default_value = "127.0.0.1")]
    gateway_address: std::net::IpAddr,
    /// External HTTP port of the gateway.
    #[arg(long, default_value_t = 8080)]
    external_port: u16,
    /// Cluster-local HTTP port of the gateway.
    #[arg(long, default_value_t = 8081)]
    internal_port: u16,
    /// External HTTPS port of the gateway (opened when an ingress has TLS).
    #[arg(long, default_value_t = 8443)]
    https_port: u16,
    /// Cluster-local HTTPS port of the gateway (opened when an ingress has TLS).
    #[arg(long, default_value_t = 8444)]
    internal_https_port: u16,
    /// The ingress class to program (`networking.knative.dev/ingress.class`); repeat it to
    /// program several, e.g. Kourier's `kourier.ingress.networking.knative.dev` too.
    #[arg(long, default_value = knarr_model::KNARR_INGRESS_CLASS)]
    ingress_class: Vec<String>,
    /// Leave ingresses without a class annotation alone (by default they are programmed).
    #[arg(long)]
    ignore_unannotated: bool,
}

/// `--source kube` only.
#[derive(clap::Args, Default)]
struct KubeArgs {
    /// Kubeconfig to use (default: `$KUBECONFIG`, `~/.kube/config`, else the in-cluster
    /// service account).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Watch this namespace only (default: all).
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,
    /// Namespace of the Lease that elects the replica writing status (default: `$POD_NAMESPACE`,
    /// else `knarr-system`).
    #[arg(long, value_name = "NS")]
    lease_namespace: Option<String>,
    /// Name of that Lease.
    #[arg(long, default_value = "knarr-controller.ingress")]
    lease_name: String,
    /// This replica's name in the election (default: `$POD_NAME`, else the host name and pid).
    #[arg(long)]
    identity: Option<String>,
    /// Seconds a leader keeps the Lease without renewing it; a new leader takes over within
    /// this after the old one dies.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// The gateway Service, `NAMESPACE/NAME`, whose ready pods (from its EndpointSlices) are
    /// the gateways hash-probed before an ingress is Ready. Needed with several replicas, as
    /// each gateway connects to only one of them; without it, the Envoys connected to this
    /// replica are probed.
    #[arg(long, value_name = "NS/NAME")]
    gateway_service: Option<String>,
    /// Read and watch the ConfigMap `config-knarr` in this namespace: its keys override the
    /// flags (ingress classes and the gateway names in status apply live).
    #[arg(long, value_name = "NS")]
    config_namespace: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run Knative Services on this machine: control plane, Envoy gateway and local pods.
    Up(Box<knarr::up::UpArgs>),
    /// Run the control plane: the xDS (ADS) server Envoys connect to, fed by Knative objects.
    Serve(Box<ServeArgs>),
    /// List Knative Services, Configurations, Revisions, Routes (from `knarr up`), ingresses or
    /// source errors, with their status.
    Get(get::GetArgs),
    /// Create or update Knative Services, Configurations and Routes in a running `knarr up`.
    Apply(apply::ApplyArgs),
    /// Delete Knative Services, Configurations or Routes from a running `knarr up`.
    Delete(apply::DeleteArgs),
    /// Show one Knative object in detail: URL, traffic, revisions, pods, conditions.
    Describe(describe::DescribeArgs),
    /// Print the logs of a Knative Service's (or Revision's) pods.
    Logs(logs::LogsArgs),
    /// Print an Envoy bootstrap that connects to `knarr serve` over ADS.
    EnvoyBootstrap {
        /// Where Knarr's xDS server is reachable from Envoy.
        #[arg(long, default_value = "127.0.0.1:18000")]
        xds_addr: String,
        /// Use incremental (delta) xDS.
        #[arg(long)]
        delta: bool,
        #[arg(long, default_value = "knarr-gateway")]
        node_id: String,
        #[arg(long, default_value = "knarr-gateway")]
        node_cluster: String,
        /// Envoy admin port (on 127.0.0.1); 0 picks a free one.
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KNARR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::EnvoyBootstrap {
            xds_addr,
            delta,
            node_id,
            node_cluster,
            admin_port,
        } => {
            let opts = BootstrapOptions {
                xds_addr,
                delta,
                node_id,
                node_cluster,
                admin_port,
                ..Default::default()
            };
            match bootstrap::render(&opts) {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("knarr envoy-bootstrap: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Up(args) => knarr::up::run(*args),
        Command::Serve(args) => {
            init_tracing();
            let mut args = *args;
            let kube_args = args
                .sources
                .iter()
                .any(|s| s == "kube")
                .then(|| std::mem::take(&mut args.kube));
            args.sources.retain(|s| s != "kube");
            let config = match serve_config(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("knarr serve: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("knarr: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match kube_args {
                None => runtime.block_on(serve(config)),
                Some(kube) => serve_kube(&runtime, config, kube),
            }
        }
        Command::Get(args) => client_command("get", get::run(&args)),
        Command::Apply(args) => client_command("apply", apply::apply(&args)),
        Command::Delete(args) => client_command("delete", apply::delete(&args)),
        Command::Describe(args) => client_command("describe", describe::run(&args)),
        Command::Logs(args) => client_command("logs", logs::run(&args)),
    }
}

/// The exit code of a command that talks to the API, after saying what went wrong.
fn client_command(name: &str, result: anyhow::Result<()>) -> ExitCode {
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    if e.is::<AlreadyReported>() {
        return ExitCode::FAILURE;
    }
    // `knarr logs ... | head` closing the pipe is how such commands normally end.
    if e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    {
        return ExitCode::SUCCESS;
    }
    eprintln!("knarr {name}: {e:#}");
    if e.is::<UsageError>() {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::FAILURE
    }
}

fn serve_config(args: ServeArgs) -> Result<ServeConfig, String> {
    let mut source_dirs = Vec::new();
    for source in &args.sources {
        match source.split_once(':') {
            Some(("file", dir)) if !dir.is_empty() => source_dirs.push(PathBuf::from(dir)),
            _ => return Err(format!("--source {source:?}: expected file:DIR or kube")),
        }
    }
    Ok(ServeConfig {
        xds_addr: args.xds_addr,
        admin_addr: args.admin_addr,
        api_addr: args.api_addr,
        source_dirs,
        files: args.files,
        route_files: args.routes,
        grouping: match args.group_by {
            Grouping::NodeId => NodeGrouping::NodeId,
            Grouping::Cluster => NodeGrouping::Cluster,
        },
        gateway: GatewayConfig {
            address: args.gateway_address,
            external_http_port: args.external_port,
            internal_http_port: args.internal_port,
            external_https_port: args.https_port,
            internal_https_port: args.internal_https_port,
        },
        classes: ClassFilter {
            classes: args.ingress_class,
            take_unannotated: !args.ignore_unannotated,
        },
        ..Default::default()
    })
}

#[cfg(not(feature = "kube"))]
fn serve_kube(_: &tokio::runtime::Runtime, _: ServeConfig, _: KubeArgs) -> ExitCode {
    eprintln!(
        "knarr serve: --source kube needs a knarr built with the `kube` feature \
         (cargo build --release -p knarr --features kube)"
    );
    ExitCode::from(EXIT_CONFIG)
}

#[cfg(feature = "kube")]
fn serve_kube(runtime: &tokio::runtime::Runtime, config: ServeConfig, args: KubeArgs) -> ExitCode {
    if !config.source_dirs.is_empty() || !config.files.is_empty() {
        eprintln!("knarr serve: --source kube cannot be combined with file sources");
        return ExitCode::from(EXIT_CONFIG);
    }
    let identity = args
        .identity
        .or_else(|| std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "knarr".into());
            format!("{host}-{}", std::process::id())
        });
    let lease_namespace = args
        .lease_namespace
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "knarr-system".into());
    let gateway_service = match args.gateway_service.as_deref().map(|s| s.split_once('/')) {
        None => None,
        Some(Some((ns, name))) if !ns.is_empty() && !name.is_empty() => {
            Some((ns.to_owned(), name.to_owned()))
        }
        Some(_) => {
            eprintln!("knarr serve: --gateway-service: expected NAMESPACE/NAME");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let kube = knarr_kube::KubeConfig {
        gateway_service,
        config_namespace: args.config_namespace,
        kubeconfig: args.kubeconfig,
        namespace: args.namespace,
        classes: config.classes.clone(),
        lease: knarr_kube::LeaseConfig {
            namespace: lease_namespace,
            name: args.lease_name,
            identity,
            duration: Duration::from_secs(args.lease_seconds.max(2)),
            grace: Duration::from_secs((args.lease_seconds / 3).max(1)),
        },
    };
    runtime.block_on(async move {
        let cp = match knarr_kube::KubeControlPlane::start(config, kube).await {
            Ok(cp) => cp,
            Err(e) => {
                error!("{e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let signal = wait_for_signal().await;
        info!(signal, "shutting down");
        cp.shutdown(Duration::from_secs(10)).await;
        ExitCode::SUCCESS
    })
}

async fn serve(config: ServeConfig) -> ExitCode {
    let control_plane = match ControlPlane::start(config).await {
        Ok(cp) => cp,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let signal = wait_for_signal().await;
    info!(signal, "shutting down");
    control_plane.shutdown(Duration::from_secs(10)).await;
    ExitCode::SUCCESS
}

/// Waits for SIGTERM or SIGINT. SIGHUP (which would otherwise end the process) is logged and
/// ignored: there is no configuration to reload.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        unreachable!()
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => tracing::info!("SIGHUP ignored: sources are watched, nothing to reload"),
        }
    }
}
