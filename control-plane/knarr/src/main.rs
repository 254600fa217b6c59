//! `knarr`: the command users run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use knarr::bootstrap::{self, BootstrapOptions};
use knarr::{ControlPlane, ServeConfig};
use knarr_xds::NodeGrouping;
use tracing::{error, info};

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

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: the xDS (ADS) server Envoys connect to.
    Serve {
        /// Address of the xDS gRPC server.
        #[arg(long, default_value = "127.0.0.1:18000")]
        xds_addr: SocketAddr,
        /// Address of the admin endpoint (/healthz, /readyz, /metrics, /clients).
        #[arg(long, default_value = "127.0.0.1:18002")]
        admin_addr: SocketAddr,
        /// Routes file to serve (repeatable); see examples/routes.yaml.
        #[arg(short = 'f', long = "file")]
        files: Vec<PathBuf>,
        /// How Envoys are grouped for config.
        #[arg(long, value_enum, default_value = "node-id")]
        group_by: Grouping,
    },
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
        Command::Serve {
            xds_addr,
            admin_addr,
            files,
            group_by,
        } => {
            init_tracing();
            let config = ServeConfig {
                xds_addr,
                admin_addr,
                route_files: files,
                grouping: match group_by {
                    Grouping::NodeId => NodeGrouping::NodeId,
                    Grouping::Cluster => NodeGrouping::Cluster,
                },
                ..Default::default()
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("knarr: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(config))
        }
    }
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

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        unreachable!()
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
