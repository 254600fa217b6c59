//! Knative's KPA autoscaler as pure functions and small state machines: no clock (every
//! function is given `now` as an [`Instant`](std::time::Instant)), no I/O, no async.
//!
//! # Data flow
//!
//! ```text
//!  queue-proxy Stat (each ready pod, 1/s) ─┐ Sample::from_queue_proxy (minus proxied share)
//!  activator RevisionStats (1/s, + poke) ──┤ Sample::from_activator / Sample::POKE
//!                                          ▼
//!                                   MetricCollector      1 s buckets, summed across sources
//!                                          │ Observed { stable (60 s), panic (6 s) } or no data
//!                                          ▼
//!                                       Decider          ceil(load / target), rate limits,
//!                                          │             panic, activation scale, delay, EBC
//!                                          ▼
//!                       min/max-scale, initial-scale     (only while reachable)
//!                                          ▼
//!                                     ScaleToZero        stable window, grace, retention
//!                                          ▼
//!                    desired pods + excess burst capacity ─► serve_mode ─► Serve | Proxy
//! ```
//!
//! [`RevisionAutoscaler`] strings these together for one revision; the control plane keeps one
//! per revision and, every [`AutoscalerConfig::tick_interval`] (2 s):
//!
//! 1. feeds it every stats report as it arrives with [`RevisionAutoscaler::record`] — each
//!    scrape of a ready pod, idle ones too (silence is "no data", not zero load);
//! 2. calls [`RevisionAutoscaler::tick`] with the ready pod count, whether the revision is
//!    routed, and since when the activator is confirmed in its path (Envoy ACKed the EDS that
//!    points at the activator);
//! 3. scales the runtime to [`Tick::desired_pods`] and programs [`Tick::mode`]: `Serve` sends
//!    the gateway straight to the pods, `Proxy` through the activator.
//!
//! An activator poke (first request for a revision with no ready pod) is recorded as
//! [`Sample::POKE`] followed by an immediate tick.
//!
//! Knobs come from [`AutoscalerConfig::from_map`] (`config-autoscaler`) and, per revision,
//! [`RevisionScaling::from_annotations`] (`autoscaling.knative.dev/*`); both validate as
//! Knative does and name the bad key.
//!
//! # Where Knarr reads Knative's facts a particular way
//!
//! - The concurrency capacity is `containerConcurrency` whenever it is set (above 100 too), the
//!   default 100 only when it is 0; a `target` annotation is capped by it (Knative's
//!   `ResolveMetricTarget`). Excess burst capacity uses that capacity *before* utilization
//!   (Knative's `TotalValue`, 100 not 70) and the real ready count (0 stays 0).
//! - Panic lasts a stable window past the *last* tick over the threshold: each such tick
//!   extends it (Knative's `panicTime = now`).
//! - Reports in one bucket are summed; unscraped pods are not extrapolated (every pod is read).
//! - `enable-scale-to-zero: false` keeps one pod only while the revision is routed.
//! - There is no activation timeout: a revision whose pods never become ready loses its load
//!   when the activator times the requests out, and then scales to zero like any idle one.

mod config;
mod decider;
mod go;
mod metrics;
mod revision;
mod scale_to_zero;
mod scaling;

pub use config::{
    AutoscalerConfig, ConfigError, BUCKET, PANIC_THRESHOLD_PERCENTAGE_MAX,
    PANIC_THRESHOLD_PERCENTAGE_MIN, PANIC_WINDOW_PERCENTAGE_MAX, PANIC_WINDOW_PERCENTAGE_MIN,
    RPS_TARGET_UTILIZATION, TARGET_MIN, WINDOW_MAX, WINDOW_MIN,
};
pub use decider::{excess_burst_capacity, Decider, Decision};
pub use metrics::{MetricCollector, Observed, Sample};
pub use revision::{RevisionAutoscaler, Tick, TickInput};
pub use scale_to_zero::{Activity, ScaleToZero, ScaleToZeroInput, ScaleToZeroOutcome};
pub use scaling::{
    AnnotationError, Metric, RevisionScaling, ACTIVATION_SCALE_ANNOTATION, ANNOTATION_PREFIX,
    CLASS_ANNOTATION, INITIAL_SCALE_ANNOTATION, KPA_CLASS, MAX_SCALE_ANNOTATION, METRIC_ANNOTATION,
    MIN_SCALE_ANNOTATION, PANIC_THRESHOLD_PERCENTAGE_ANNOTATION,
    PANIC_WINDOW_PERCENTAGE_ANNOTATION, SCALE_DOWN_DELAY_ANNOTATION,
    SCALE_TO_ZERO_POD_RETENTION_ANNOTATION, TARGET_ANNOTATION, TARGET_BURST_CAPACITY_ANNOTATION,
    TARGET_UTILIZATION_ANNOTATION, WINDOW_ANNOTATION,
};

/// Where the gateway sends a revision's requests (Knative's SKS mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeMode {
    /// Straight to the revision's ready pods.
    Serve,
    /// Through the activator, which holds requests until a pod can take them.
    Proxy,
}

/// Whether the gateway may go straight to the pods: only when pods are wanted, there is spare
/// burst capacity (`excess_burst_capacity ≥ 0`) and at least one pod is ready. Otherwise the
/// activator stays in the path.
pub fn serve_mode(desired_pods: usize, excess_burst_capacity: i64, ready_pods: usize) -> bool {
    desired_pods > 0 && excess_burst_capacity >= 0 && ready_pods > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_only_with_pods_wanted_headroom_and_a_ready_pod() {
        assert!(serve_mode(3, 0, 3));
        assert!(serve_mode(1, 89, 1));
        assert!(!serve_mode(0, 89, 3), "scaling to zero");
        assert!(!serve_mode(3, -1, 3), "not enough burst capacity");
        assert!(!serve_mode(3, 89, 0), "no ready pods");
    }
}
