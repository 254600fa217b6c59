//! The activator: holds requests for revisions that have no ready pods, pokes the autoscaler,
//! waits for endpoints, then forwards with capacity-aware load balancing.
//!
//! Not built yet: it arrives with the scale-to-zero issue. The crate exists so the workspace has
//! its final shape and the dependency direction (activator never depends on kube) is fixed early.
