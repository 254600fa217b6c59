//! One revision's scaling knobs: the `autoscaling.knative.dev/*` annotations over the global
//! config, validated as Knative's webhook validates them and resolved to the numbers the
//! decider uses.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::config::{
    AutoscalerConfig, BUCKET, PANIC_THRESHOLD_PERCENTAGE_MAX, PANIC_THRESHOLD_PERCENTAGE_MIN,
    PANIC_WINDOW_PERCENTAGE_MAX, PANIC_WINDOW_PERCENTAGE_MIN, RPS_TARGET_UTILIZATION, TARGET_MIN,
    WINDOW_MAX, WINDOW_MIN,
};
use crate::go;

/// The annotation prefix.
pub const ANNOTATION_PREFIX: &str = "autoscaling.knative.dev/";
/// The only autoscaler class Knarr runs.
pub const KPA_CLASS: &str = "kpa.autoscaling.knative.dev";

pub const CLASS_ANNOTATION: &str = "autoscaling.knative.dev/class";
pub const METRIC_ANNOTATION: &str = "autoscaling.knative.dev/metric";
pub const TARGET_ANNOTATION: &str = "autoscaling.knative.dev/target";
pub const TARGET_UTILIZATION_ANNOTATION: &str =
    "autoscaling.knative.dev/target-utilization-percentage";
pub const WINDOW_ANNOTATION: &str = "autoscaling.knative.dev/window";
pub const PANIC_WINDOW_PERCENTAGE_ANNOTATION: &str =
    "autoscaling.knative.dev/panic-window-percentage";
pub const PANIC_THRESHOLD_PERCENTAGE_ANNOTATION: &str =
    "autoscaling.knative.dev/panic-threshold-percentage";
pub const MIN_SCALE_ANNOTATION: &str = "autoscaling.knative.dev/min-scale";
pub const MAX_SCALE_ANNOTATION: &str = "autoscaling.knative.dev/max-scale";
pub const INITIAL_SCALE_ANNOTATION: &str = "autoscaling.knative.dev/initial-scale";
pub const ACTIVATION_SCALE_ANNOTATION: &str = "autoscaling.knative.dev/activation-scale";
pub const SCALE_DOWN_DELAY_ANNOTATION: &str = "autoscaling.knative.dev/scale-down-delay";
pub const TARGET_BURST_CAPACITY_ANNOTATION: &str = "autoscaling.knative.dev/target-burst-capacity";
pub const SCALE_TO_ZERO_POD_RETENTION_ANNOTATION: &str =
    "autoscaling.knative.dev/scale-to-zero-pod-retention-period";

/// What the decider scales on (`autoscaling.knative.dev/metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Metric {
    /// In-flight requests per pod.
    #[default]
    Concurrency,
    /// Requests per second per pod.
    Rps,
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metric::Concurrency => "concurrency",
            Metric::Rps => "rps",
        })
    }
}

/// A revision's autoscaling, resolved: what the decider, the metric windows and the
/// scale-to-zero rules read. Build it with [`RevisionScaling::from_annotations`]; the fields are
/// public so tests and callers can adjust one knob.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RevisionScaling {
    pub metric: Metric,
    /// Per-pod value the decider aims for: [`Self::total_target`] × utilization (70 %), at least
    /// 0.01. `desired = ceil(observed / target)`.
    pub target: f64,
    /// Per-pod value before utilization (Knative's `TotalValue`): what one pod is taken to hold
    /// when computing excess burst capacity.
    pub total_target: f64,
    /// Requests of headroom wanted before the activator leaves the path; 0 = only at zero,
    /// -1 = activator always in the path.
    pub target_burst_capacity: f64,
    pub stable_window: Duration,
    /// `stable_window` × panic-window-percentage, rounded to whole seconds, at least 1 s.
    pub panic_window: Duration,
    /// panic-threshold-percentage as a ratio (200 % → 2.0).
    pub panic_threshold: f64,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub min_scale: usize,
    /// 0 = unbounded.
    pub max_scale: usize,
    pub initial_scale: usize,
    pub activation_scale: usize,
    pub scale_down_delay: Duration,
    pub scale_to_zero_grace_period: Duration,
    pub scale_to_zero_pod_retention_period: Duration,
    pub enable_scale_to_zero: bool,
}

/// A bad autoscaling annotation. `field` is the path Knative's webhook reports, e.g.
/// `metadata.annotations[autoscaling.knative.dev/target]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct AnnotationError {
    pub field: String,
    pub reason: String,
}

fn field(key: &str) -> String {
    format!("metadata.annotations[{key}]")
}

fn fail<T>(key: &str, reason: impl Into<String>) -> Result<T, AnnotationError> {
    Err(AnnotationError {
        field: field(key),
        reason: reason.into(),
    })
}

fn invalid<T>(key: &str, value: &str, why: &str) -> Result<T, AnnotationError> {
    fail(key, format!("invalid value {value:?}: {why}"))
}

struct Annotations<'a>(&'a BTreeMap<String, String>);

impl Annotations<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.trim())
    }

    /// A number in [lo, hi] (no upper bound when `hi` is `None`).
    fn float(&self, key: &str, lo: f64, hi: Option<f64>) -> Result<Option<f64>, AnnotationError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match (go::parse_float(v), hi) {
            (Ok(f), Some(hi)) if (lo..=hi).contains(&f) => Ok(Some(f)),
            (Ok(f), None) if f >= lo => Ok(Some(f)),
            (Ok(_), Some(hi)) => invalid(key, v, &format!("must be in [{lo}, {hi}]")),
            (Ok(_), None) => invalid(key, v, &format!("must be at least {lo}")),
            (Err(why), _) => invalid(key, v, why),
        }
    }

    /// A pod count: a whole number, at least `lo`, in int32 range.
    fn count(&self, key: &str, lo: usize) -> Result<Option<usize>, AnnotationError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match go::parse_int32(v) {
            Ok(n) if n >= 0 && n as usize >= lo => Ok(Some(n as usize)),
            Ok(_) => invalid(key, v, &format!("must be at least {lo}")),
            Err(why) => invalid(key, v, why),
        }
    }

    /// A duration in [lo, hi]; `whole` asks for whole seconds.
    fn duration(
        &self,
        key: &str,
        lo: Duration,
        hi: Duration,
        whole: bool,
    ) -> Result<Option<Duration>, AnnotationError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match go::parse_duration_nanos(v) {
            Err(why) => invalid(key, v, why),
            Ok(n) if n < lo.as_nanos() as i128 || n > hi.as_nanos() as i128 => invalid(
                key,
                v,
                &format!(
                    "must be in [{}, {}]",
                    go::format_duration(lo),
                    go::format_duration(hi)
                ),
            ),
            Ok(n) if whole && n % 1_000_000_000 != 0 => {
                invalid(key, v, "must be specified with at most second precision")
            }
            Ok(n) => Ok(Some(Duration::from_nanos(n as u64))),
        }
    }
}

impl RevisionScaling {
    /// Resolves a revision's scaling from its annotations, its `containerConcurrency` (0 =
    /// unlimited; negative is taken as 0, the model crate rejects it) and the global config.
    ///
    /// Validation follows Knative's webhook; the first bad annotation is the error. A `class`
    /// other than `kpa.autoscaling.knative.dev` is an error too: Knarr runs no other autoscaler.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        container_concurrency: i64,
        config: &AutoscalerConfig,
    ) -> Result<RevisionScaling, AnnotationError> {
        let a = Annotations(annotations);

        if let Some(class) = a.get(CLASS_ANNOTATION) {
            if class != KPA_CLASS {
                return fail(
                    CLASS_ANNOTATION,
                    format!(
                        "autoscaler class {class:?} is not supported: Knarr only runs \
                         {KPA_CLASS:?}"
                    ),
                );
            }
        }
        let metric = match a.get(METRIC_ANNOTATION) {
            None | Some("concurrency") => Metric::Concurrency,
            Some("rps") => Metric::Rps,
            Some(other) => {
                return invalid(
                    METRIC_ANNOTATION,
                    other,
                    "the kpa class scales on \"concurrency\" or \"rps\"",
                )
            }
        };
        let target = a.float(TARGET_ANNOTATION, TARGET_MIN, None)?;
        let utilization = a.float(TARGET_UTILIZATION_ANNOTATION, 1.0, Some(100.0))?;
        let stable_window = a
            .duration(WINDOW_ANNOTATION, WINDOW_MIN, WINDOW_MAX, true)?
            .unwrap_or(config.stable_window);
        let panic_window_percentage = a
            .float(
                PANIC_WINDOW_PERCENTAGE_ANNOTATION,
                PANIC_WINDOW_PERCENTAGE_MIN,
                Some(PANIC_WINDOW_PERCENTAGE_MAX),
            )?
            .unwrap_or(config.panic_window_percentage);
        let panic_threshold_percentage = a
            .float(
                PANIC_THRESHOLD_PERCENTAGE_ANNOTATION,
                PANIC_THRESHOLD_PERCENTAGE_MIN,
                Some(PANIC_THRESHOLD_PERCENTAGE_MAX),
            )?
            .unwrap_or(config.panic_threshold_percentage);

        let min_annotation = a.count(MIN_SCALE_ANNOTATION, 0)?;
        let max_annotation = a.count(MAX_SCALE_ANNOTATION, 0)?;
        let min_scale = min_annotation.unwrap_or(config.min_scale);
        let max_scale = max_annotation.unwrap_or(config.max_scale);
        if max_scale != 0 && max_scale < min_scale {
            // Name whichever of the two the revision set (max-scale when both).
            let key = if max_annotation.is_some() {
                MAX_SCALE_ANNOTATION
            } else {
                MIN_SCALE_ANNOTATION
            };
            return fail(
                key,
                format!("max-scale={max_scale} is less than min-scale={min_scale}"),
            );
        }

        let initial_scale = match a.count(INITIAL_SCALE_ANNOTATION, 0)? {
            Some(0) if !config.allow_zero_initial_scale => {
                return fail(
                    INITIAL_SCALE_ANNOTATION,
                    "initial-scale=0 is not allowed: allow-zero-initial-scale is false",
                )
            }
            Some(n) => n,
            None => config.initial_scale,
        };
        let activation_scale = a
            .count(ACTIVATION_SCALE_ANNOTATION, 1)?
            .unwrap_or(config.activation_scale);
        if max_scale != 0 && activation_scale > max_scale {
            return fail(
                ACTIVATION_SCALE_ANNOTATION,
                format!("max-scale={max_scale} is less than activation-scale={activation_scale}"),
            );
        }
        let scale_down_delay = a
            .duration(
                SCALE_DOWN_DELAY_ANNOTATION,
                Duration::ZERO,
                WINDOW_MAX,
                true,
            )?
            .unwrap_or(config.scale_down_delay);
        let retention = a
            .duration(
                SCALE_TO_ZERO_POD_RETENTION_ANNOTATION,
                Duration::ZERO,
                WINDOW_MAX,
                false,
            )?
            .unwrap_or(config.scale_to_zero_pod_retention_period);
        let target_burst_capacity = match a.get(TARGET_BURST_CAPACITY_ANNOTATION) {
            None => config.target_burst_capacity,
            Some(v) => match go::parse_float(v) {
                Ok(f) if f >= 0.0 || f == -1.0 => f,
                Ok(_) => {
                    return invalid(
                        TARGET_BURST_CAPACITY_ANNOTATION,
                        v,
                        "must be either non-negative or -1 (for unlimited)",
                    )
                }
                Err(why) => return invalid(TARGET_BURST_CAPACITY_ANNOTATION, v, why),
            },
        };

        // Knative's ResolveMetricTarget. `total` is the per-pod capacity, `target` what the
        // decider aims for.
        let cc = container_concurrency.max(0) as f64;
        let (mut total, default_utilization) = match metric {
            Metric::Rps => (
                config.requests_per_second_target_default,
                RPS_TARGET_UTILIZATION,
            ),
            // containerConcurrency, when set, is the capacity whether it is above or below
            // the default; the default only stands in for "unlimited".
            Metric::Concurrency if cc > 0.0 => (cc, config.container_concurrency_target_fraction),
            Metric::Concurrency => (
                config.container_concurrency_target_default,
                config.container_concurrency_target_fraction,
            ),
        };
        if let Some(t) = target {
            // A soft target above the hard limit is cut to the hard limit.
            total = if metric == Metric::Concurrency && cc > 0.0 {
                t.min(cc)
            } else {
                t
            };
        }
        let utilization = utilization.map_or(default_utilization, |u| u / 100.0);
        let target = (total * utilization).max(TARGET_MIN);

        Ok(RevisionScaling {
            metric,
            target,
            total_target: total,
            target_burst_capacity,
            stable_window,
            panic_window: panic_window(stable_window, panic_window_percentage),
            panic_threshold: panic_threshold_percentage / 100.0,
            max_scale_up_rate: config.max_scale_up_rate,
            max_scale_down_rate: config.max_scale_down_rate,
            min_scale,
            max_scale,
            initial_scale,
            activation_scale,
            scale_down_delay,
            scale_to_zero_grace_period: config.scale_to_zero_grace_period,
            scale_to_zero_pod_retention_period: retention,
            enable_scale_to_zero: config.enable_scale_to_zero,
        })
    }
}

/// The panic window: a share of the stable window, rounded to the bucket width, at least one
/// bucket (Knative's `MakeMetric`).
fn panic_window(stable: Duration, percentage: f64) -> Duration {
    let secs = (stable.as_secs_f64() * percentage / 100.0).round();
    Duration::from_secs(secs as u64).max(BUCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), v.to_string()))
            .collect()
    }

    fn resolve(pairs: &[(&str, &str)], cc: i64) -> RevisionScaling {
        RevisionScaling::from_annotations(&ann(pairs), cc, &AutoscalerConfig::default()).unwrap()
    }

    fn error(pairs: &[(&str, &str)]) -> AnnotationError {
        RevisionScaling::from_annotations(&ann(pairs), 0, &AutoscalerConfig::default()).unwrap_err()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn defaults_target_70_of_100() {
        let s = resolve(&[], 0);
        assert_eq!(s.metric, Metric::Concurrency);
        assert!(close(s.target, 70.0), "{}", s.target);
        assert_eq!(s.total_target, 100.0);
        assert_eq!(s.target_burst_capacity, 211.0);
        assert_eq!(s.stable_window, Duration::from_secs(60));
        assert_eq!(s.panic_window, Duration::from_secs(6));
        assert_eq!(s.panic_threshold, 2.0);
        assert_eq!((s.min_scale, s.max_scale, s.initial_scale), (0, 0, 1));
        assert_eq!(s.activation_scale, 1);
        assert!(s.enable_scale_to_zero);
    }

    #[test]
    fn container_concurrency_is_the_capacity_when_set() {
        let s = resolve(&[], 10);
        assert_eq!(s.total_target, 10.0);
        assert!(close(s.target, 7.0));
        // Above the default too: Knative's ResolveMetricTarget takes CC as is.
        let s = resolve(&[], 200);
        assert_eq!(s.total_target, 200.0);
        assert!(close(s.target, 140.0));
    }

    #[test]
    fn target_annotation_is_capped_by_container_concurrency() {
        let s = resolve(&[("target", "50")], 10);
        assert_eq!(s.total_target, 10.0);
        assert!(close(s.target, 7.0));
        let s = resolve(&[("target", "5")], 10);
        assert_eq!(s.total_target, 5.0);
        assert!(close(s.target, 3.5));
        let s = resolve(&[("target", "50")], 0);
        assert_eq!(s.total_target, 50.0);
        assert!(close(s.target, 35.0));
    }

    #[test]
    fn utilization_annotation_replaces_the_percentage() {
        let s = resolve(&[("target-utilization-percentage", "50")], 0);
        assert_eq!(s.total_target, 100.0);
        assert!(close(s.target, 50.0));
    }

    #[test]
    fn rps_targets_200_times_utilization_and_ignores_container_concurrency() {
        let s = resolve(&[("metric", "rps")], 10);
        assert_eq!(s.metric, Metric::Rps);
        assert_eq!(s.total_target, 200.0);
        assert!(close(s.target, 140.0));
        let s = resolve(&[("metric", "rps"), ("target", "1000")], 10);
        assert_eq!(s.total_target, 1000.0);
        assert!(close(s.target, 700.0));
    }

    #[test]
    fn target_never_falls_below_the_minimum() {
        let s = resolve(&[("target", "0.01")], 0);
        assert_eq!(s.total_target, 0.01);
        assert_eq!(s.target, TARGET_MIN);
    }

    #[test]
    fn window_annotations_shape_the_panic_window() {
        let s = resolve(&[("window", "30s"), ("panic-window-percentage", "5")], 0);
        assert_eq!(s.stable_window, Duration::from_secs(30));
        // 1.5 s rounds to 2 s.
        assert_eq!(s.panic_window, Duration::from_secs(2));
        let s = resolve(&[("window", "6s"), ("panic-window-percentage", "1")], 0);
        assert_eq!(s.panic_window, Duration::from_secs(1));
        let s = resolve(
            &[("window", "1m30s"), ("panic-threshold-percentage", "150")],
            0,
        );
        assert_eq!(s.panic_window, Duration::from_secs(9));
        assert_eq!(s.panic_threshold, 1.5);
    }

    #[test]
    fn scale_annotations_override_config() {
        let s = resolve(
            &[
                ("min-scale", "2"),
                ("max-scale", "5"),
                ("initial-scale", "3"),
                ("activation-scale", "4"),
                ("scale-down-delay", "10s"),
                ("target-burst-capacity", "-1"),
                ("scale-to-zero-pod-retention-period", "1m5s"),
                ("class", KPA_CLASS),
            ],
            0,
        );
        assert_eq!((s.min_scale, s.max_scale, s.initial_scale), (2, 5, 3));
        assert_eq!(s.activation_scale, 4);
        assert_eq!(s.scale_down_delay, Duration::from_secs(10));
        assert_eq!(s.target_burst_capacity, -1.0);
        assert_eq!(
            s.scale_to_zero_pod_retention_period,
            Duration::from_secs(65)
        );
    }

    #[test]
    fn zero_initial_scale_needs_the_cluster_to_allow_it() {
        let e = error(&[("initial-scale", "0")]);
        assert_eq!(
            e.field,
            "metadata.annotations[autoscaling.knative.dev/initial-scale]"
        );
        let config = AutoscalerConfig {
            allow_zero_initial_scale: true,
            ..AutoscalerConfig::default()
        };
        let s =
            RevisionScaling::from_annotations(&ann(&[("initial-scale", "0")]), 0, &config).unwrap();
        assert_eq!(s.initial_scale, 0);
    }

    #[test]
    fn errors_name_the_annotation() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "class",
                "hpa.autoscaling.knative.dev",
                "class",
                "not supported",
            ),
            ("metric", "cpu", "metric", "\"concurrency\" or \"rps\""),
            ("target", "0", "target", "must be at least 0.01"),
            ("target", "lots", "target", "not a number"),
            (
                "target-utilization-percentage",
                "101",
                "target-utilization-percentage",
                "[1, 100]",
            ),
            ("window", "5s", "window", "must be in [6s, 1h]"),
            ("window", "6.5s", "window", "second precision"),
            ("window", "1 minute", "window", "duration"),
            (
                "panic-window-percentage",
                "0",
                "panic-window-percentage",
                "[1, 100]",
            ),
            (
                "panic-threshold-percentage",
                "100",
                "panic-threshold-percentage",
                "[110, 1000]",
            ),
            ("min-scale", "-1", "min-scale", "at least 0"),
            ("max-scale", "1.5", "max-scale", "not a whole number"),
            ("activation-scale", "0", "activation-scale", "at least 1"),
            ("scale-down-delay", "2h", "scale-down-delay", "[0s, 1h]"),
            (
                "scale-down-delay",
                "1500ms",
                "scale-down-delay",
                "second precision",
            ),
            (
                "scale-to-zero-pod-retention-period",
                "-1s",
                "scale-to-zero-pod-retention-period",
                "[0s, 1h]",
            ),
            (
                "target-burst-capacity",
                "-5",
                "target-burst-capacity",
                "non-negative or -1",
            ),
        ];
        for (key, value, named, reason) in cases {
            let e = error(&[(key, value)]);
            assert_eq!(
                e.field,
                format!("metadata.annotations[autoscaling.knative.dev/{named}]"),
                "{key}={value}"
            );
            assert!(e.reason.contains(reason), "{key}={value}: {e}");
        }
        assert_eq!(
            error(&[("target", "0")]).to_string(),
            "metadata.annotations[autoscaling.knative.dev/target]: invalid value \"0\": must be \
             at least 0.01"
        );
    }

    #[test]
    fn scale_bounds_must_agree() {
        let e = error(&[("min-scale", "3"), ("max-scale", "2")]);
        assert_eq!(
            e.to_string(),
            "metadata.annotations[autoscaling.knative.dev/max-scale]: max-scale=2 is less than \
             min-scale=3"
        );
        let e = error(&[("max-scale", "2"), ("activation-scale", "3")]);
        assert_eq!(
            e.field,
            "metadata.annotations[autoscaling.knative.dev/activation-scale]"
        );
        // A min-scale above the cluster's max-scale names min-scale, the key the revision set.
        let config = AutoscalerConfig {
            max_scale: 4,
            ..AutoscalerConfig::default()
        };
        let e =
            RevisionScaling::from_annotations(&ann(&[("min-scale", "5")]), 0, &config).unwrap_err();
        assert_eq!(
            e.field,
            "metadata.annotations[autoscaling.knative.dev/min-scale]"
        );
    }
}
