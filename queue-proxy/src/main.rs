//! `knarr-queue-proxy`: configured by Knative's environment variables; see the crate docs.

use std::process::ExitCode;

use knarr_queue_proxy::app::Running;
use knarr_queue_proxy::config::{Config, ProcessEnv};
use tracing::info;

/// Exit code for bad configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KNARR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::from_env(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("knarr-queue-proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // One thread: a sidecar per pod should cost little, and the proxy path is I/O bound; a
    // single-threaded runtime also saves the cross-thread wakeups of a work-stealing one.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("knarr-queue-proxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let running = match Running::start(config).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("knarr-queue-proxy: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let signal = knarr_data_path::wait_for_signal().await;
        info!(signal, "draining");
        running.drain_and_stop().await;
        ExitCode::SUCCESS
    })
}
