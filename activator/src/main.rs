//! `knarr-activator`: configured by flags (or `KNARR_ACTIVATOR_*` variables); see the crate docs.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use knarr_activator::config::{Config, ConfigError};
use knarr_activator::xds_client::{self, ClientConfig};
use knarr_activator::{stats_channel, Running};
use knarr_proto::activator::RevisionStats;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Exit code for bad configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let config = match Config::from_args(std::env::args_os()) {
        Ok(c) => c,
        Err(ConfigError::Display(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(ConfigError::Invalid(e)) => {
            eprintln!("knarr-activator: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KNARR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("knarr-activator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (stats_tx, stats_rx) = stats_channel();
        let running = match Running::start(config.clone(), stats_tx).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("knarr-activator: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        if let Some(path) = &config.address_file {
            // Written whole, then renamed: a reader never sees half an address.
            let tmp = path.with_extension("tmp");
            let written = std::fs::write(&tmp, running.listen_addr.to_string())
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                eprintln!("knarr-activator: cannot write {}: {e}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        }
        // Revisions from the control plane, load back to it; without one, only the static
        // revisions are known and stats are logged.
        match &config.xds_addr {
            Some(addr) => {
                let client = ClientConfig {
                    xds_addr: addr.clone(),
                    node_id: config.node_id.clone(),
                };
                tokio::spawn(xds_client::run(client, running.revisions.clone(), stats_rx));
            }
            None => {
                warn!("no --xds-addr: only static revisions are known");
                tokio::spawn(log_stats(stats_rx));
            }
        }
        let signal = knarr_data_path::wait_for_signal().await;
        info!(signal, "draining");
        running.drain_and_stop().await;
        ExitCode::SUCCESS
    })
}

/// Without a control plane, stats are only logged (at debug).
async fn log_stats(mut stats: mpsc::Receiver<RevisionStats>) {
    while let Some(s) = stats.recv().await {
        debug!(
            revision = %format_args!("{}/{}", s.namespace, s.revision),
            average_concurrency = s.average_concurrency,
            request_count = s.request_count,
            poke = s.poke,
            "revision stats"
        );
    }
}
