//! The `knarr` command line: `knarr up` (the supervisor of one machine's control plane, Envoy,
//! activator and pods) here; `serve`, `apply`, `get`, `describe`, `delete`, `logs` and
//! `envoy-bootstrap` in `main.rs`. The control plane itself is `knarr-control`.

pub mod up;

pub use knarr_control::{api, bootstrap, ControlPlane, ServeConfig};
