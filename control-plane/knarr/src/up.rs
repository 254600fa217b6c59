//! `knarr up`: Knative Serving on one machine — the control plane, a real Envoy as the gateway,
//! and revisions as local processes, fed by watched manifests and `knarr apply`.

use std::path::PathBuf;
use std::process::ExitCode;

/// `knarr up`'s command line.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Manifests to apply and watch: YAML files, or directories of them.
    #[arg(value_name = "FILE|DIR")]
    pub paths: Vec<PathBuf>,
}

/// Runs `knarr up` until Ctrl-C or SIGTERM.
pub fn run(_args: UpArgs) -> ExitCode {
    eprintln!("knarr up: not wired yet");
    ExitCode::FAILURE
}
