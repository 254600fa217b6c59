//! The queue-proxy: the per-pod sidecar in front of the user container (concurrency limit,
//! timeouts, readiness probing, graceful drain, autoscaler metrics).
//!
//! Not built yet: it arrives with the queue-proxy issue. The crate exists so the workspace has
//! its final shape from the start.
