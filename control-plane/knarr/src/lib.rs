//! The `knarr` control plane: wires the routes source, translation and the xDS server together,
//! and serves admin endpoints. `main.rs` parses the command line and calls into this.

pub mod admin;
pub mod api;
pub mod app;
pub mod bootstrap;
pub mod file_source;
pub mod ingress_controller;
pub mod prober;
pub mod routes_file;
pub mod serving_controller;
pub mod status;
pub mod store;
pub mod up;

pub use app::{ControlPlane, ServeConfig};
