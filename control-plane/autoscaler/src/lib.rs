//! Knative's KPA autoscaler, pure: no clock, no I/O. (Being written: configuration, metric windows, the decider and scale-to-zero so far.)

mod config;
mod decider;
mod go;
mod metrics;
mod scale_to_zero;
mod scaling;

pub use config::{
    AutoscalerConfig, ConfigError, BUCKET, PANIC_THRESHOLD_PERCENTAGE_MAX,
    PANIC_THRESHOLD_PERCENTAGE_MIN, PANIC_WINDOW_PERCENTAGE_MAX, PANIC_WINDOW_PERCENTAGE_MIN,
    RPS_TARGET_UTILIZATION, TARGET_MIN, WINDOW_MAX, WINDOW_MIN,
};
pub use decider::{excess_burst_capacity, Decider, Decision};
pub use metrics::{MetricCollector, Observed, Sample};
pub use scale_to_zero::{Activity, ScaleToZero, ScaleToZeroInput, ScaleToZeroOutcome};
pub use scaling::{
    AnnotationError, Metric, RevisionScaling, ACTIVATION_SCALE_ANNOTATION, ANNOTATION_PREFIX,
    CLASS_ANNOTATION, INITIAL_SCALE_ANNOTATION, KPA_CLASS, MAX_SCALE_ANNOTATION, METRIC_ANNOTATION,
    MIN_SCALE_ANNOTATION, PANIC_THRESHOLD_PERCENTAGE_ANNOTATION,
    PANIC_WINDOW_PERCENTAGE_ANNOTATION, SCALE_DOWN_DELAY_ANNOTATION,
    SCALE_TO_ZERO_POD_RETENTION_ANNOTATION, TARGET_ANNOTATION, TARGET_BURST_CAPACITY_ANNOTATION,
    TARGET_UTILIZATION_ANNOTATION, WINDOW_ANNOTATION,
};
