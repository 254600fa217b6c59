//! The global knobs: Knative's `config-autoscaler` ConfigMap, its keys, defaults and validation.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::go;

/// Shortest and longest stable window Knative accepts (`autoscaling.WindowMin`/`WindowMax`); the
/// same upper bound caps `scale-down-delay` and the pod retention period on annotations.
pub const WINDOW_MIN: Duration = Duration::from_secs(6);
pub const WINDOW_MAX: Duration = Duration::from_secs(3600);
/// The smallest per-pod target any metric may resolve to (`autoscaling.TargetMin`).
pub const TARGET_MIN: f64 = 0.01;
/// Bounds of `panic-window-percentage` and `panic-threshold-percentage`.
pub const PANIC_WINDOW_PERCENTAGE_MIN: f64 = 1.0;
pub const PANIC_WINDOW_PERCENTAGE_MAX: f64 = 100.0;
pub const PANIC_THRESHOLD_PERCENTAGE_MIN: f64 = 110.0;
pub const PANIC_THRESHOLD_PERCENTAGE_MAX: f64 = 1000.0;
/// Utilization applied to the rps target. Knative's `TargetUtilization`: fixed, not a ConfigMap
/// key (`container-concurrency-target-percentage` only moves the concurrency target); the
/// `target-utilization-percentage` annotation overrides both.
pub const RPS_TARGET_UTILIZATION: f64 = 0.7;
/// Width of one metric bucket (Knative's `BucketSize`).
pub const BUCKET: Duration = Duration::from_secs(1);

/// `config-autoscaler`, parsed and validated. Durations are whole values; percentages that
/// Knative keeps as fractions are fractions here (named so).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalerConfig {
    /// `container-concurrency-target-default` (100): per-pod concurrency target when the
    /// revision sets no `containerConcurrency` and no `target` annotation.
    pub container_concurrency_target_default: f64,
    /// `container-concurrency-target-percentage` (70) as a fraction (0.7). Values ≤ 1 in the map
    /// are taken as fractions already, as Knative does for legacy reasons.
    pub container_concurrency_target_fraction: f64,
    /// `requests-per-second-target-default` (200).
    pub requests_per_second_target_default: f64,
    /// `target-burst-capacity` (211); 0 = activator only at zero, -1 = activator always.
    pub target_burst_capacity: f64,
    /// `stable-window` (60s), 6s..=1h in whole seconds.
    pub stable_window: Duration,
    /// `panic-window-percentage` (10): the panic window as a share of the stable window.
    pub panic_window_percentage: f64,
    /// `panic-threshold-percentage` (200): panic when the panic window wants this share of the
    /// ready capacity.
    pub panic_threshold_percentage: f64,
    /// `max-scale-up-rate` (1000): at most this many times the ready pods per tick.
    pub max_scale_up_rate: f64,
    /// `max-scale-down-rate` (2): at least ready/this pods per tick.
    pub max_scale_down_rate: f64,
    /// `scale-to-zero-grace-period` (30s): how long the activator must have been in the path
    /// before the last pod goes.
    pub scale_to_zero_grace_period: Duration,
    /// `scale-to-zero-pod-retention-period` (0s): how long the last pod stays after the
    /// revision went inactive.
    pub scale_to_zero_pod_retention_period: Duration,
    /// `enable-scale-to-zero` (true).
    pub enable_scale_to_zero: bool,
    /// `initial-scale` (1): pods of a new revision until it has been that big once.
    pub initial_scale: usize,
    /// `allow-zero-initial-scale` (false): whether `initial-scale` may be 0.
    pub allow_zero_initial_scale: bool,
    /// `min-scale` (0) and `max-scale` (0 = unbounded): defaults for the annotations.
    pub min_scale: usize,
    pub max_scale: usize,
    /// `activation-scale` (1): pods to go to at least when scaling up from zero. Knative only has
    /// the annotation; the key here sets the default for it.
    pub activation_scale: usize,
    /// `scale-down-delay` (0s): a scale-down waits until the lower count held this long.
    pub scale_down_delay: Duration,
    /// `tick-interval` (2s): how often the control plane runs each revision's decider. Knative
    /// fixed it at 2s after dropping the key; Knarr reads it so tests can tick faster.
    pub tick_interval: Duration,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        AutoscalerConfig {
            container_concurrency_target_default: 100.0,
            container_concurrency_target_fraction: 0.7,
            requests_per_second_target_default: 200.0,
            target_burst_capacity: 211.0,
            stable_window: Duration::from_secs(60),
            panic_window_percentage: 10.0,
            panic_threshold_percentage: 200.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_to_zero_grace_period: Duration::from_secs(30),
            scale_to_zero_pod_retention_period: Duration::ZERO,
            enable_scale_to_zero: true,
            initial_scale: 1,
            allow_zero_initial_scale: false,
            min_scale: 0,
            max_scale: 0,
            activation_scale: 1,
            scale_down_delay: Duration::ZERO,
            tick_interval: Duration::from_secs(2),
        }
    }
}

/// A bad `config-autoscaler` entry: which key, the value as written, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config-autoscaler: {key}: invalid value {value:?}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl AutoscalerConfig {
    /// Reads `config-autoscaler`'s data. Missing keys keep their defaults; unknown keys (such as
    /// `_example`) are ignored, as Knative ignores them. The first bad entry is the error.
    pub fn from_map(data: &BTreeMap<String, String>) -> Result<AutoscalerConfig, ConfigError> {
        let mut c = AutoscalerConfig::default();
        let r = Reader { data };

        r.bool("enable-scale-to-zero", &mut c.enable_scale_to_zero)?;
        r.bool("allow-zero-initial-scale", &mut c.allow_zero_initial_scale)?;

        r.float("max-scale-up-rate", &mut c.max_scale_up_rate)?;
        r.float("max-scale-down-rate", &mut c.max_scale_down_rate)?;
        r.float(
            "container-concurrency-target-percentage",
            &mut c.container_concurrency_target_fraction,
        )?;
        r.float(
            "container-concurrency-target-default",
            &mut c.container_concurrency_target_default,
        )?;
        r.float(
            "requests-per-second-target-default",
            &mut c.requests_per_second_target_default,
        )?;
        r.float("target-burst-capacity", &mut c.target_burst_capacity)?;
        r.float("panic-window-percentage", &mut c.panic_window_percentage)?;
        r.float(
            "panic-threshold-percentage",
            &mut c.panic_threshold_percentage,
        )?;

        r.count("initial-scale", &mut c.initial_scale)?;
        r.count("min-scale", &mut c.min_scale)?;
        r.count("max-scale", &mut c.max_scale)?;
        r.count("activation-scale", &mut c.activation_scale)?;

        r.duration("stable-window", &mut c.stable_window)?;
        r.duration("scale-down-delay", &mut c.scale_down_delay)?;
        r.duration(
            "scale-to-zero-grace-period",
            &mut c.scale_to_zero_grace_period,
        )?;
        r.duration(
            "scale-to-zero-pod-retention-period",
            &mut c.scale_to_zero_pod_retention_period,
        )?;
        r.duration("tick-interval", &mut c.tick_interval)?;

        // Percent → fraction; (0, 1] is already a fraction (Knative's legacy reading).
        if c.container_concurrency_target_fraction > 1.0 {
            c.container_concurrency_target_fraction /= 100.0;
        }

        r.check(
            "scale-to-zero-grace-period",
            !c.scale_to_zero_grace_period.is_zero(),
            "must be positive",
        )?;
        r.check(
            "scale-down-delay",
            go::whole_seconds(c.scale_down_delay),
            "must be specified with at most second precision",
        )?;
        r.check(
            "target-burst-capacity",
            c.target_burst_capacity >= 0.0 || c.target_burst_capacity == -1.0,
            "must be either non-negative or -1 (for unlimited)",
        )?;
        r.check(
            "container-concurrency-target-percentage",
            c.container_concurrency_target_fraction > 0.0
                && c.container_concurrency_target_fraction <= 1.0,
            "must be in (0, 100]",
        )?;
        r.check(
            "container-concurrency-target-default",
            c.container_concurrency_target_default * c.container_concurrency_target_fraction
                >= TARGET_MIN,
            &format!(
                "with container-concurrency-target-percentage it yields a target concurrency \
                 below {TARGET_MIN}"
            ),
        )?;
        r.check(
            "requests-per-second-target-default",
            c.requests_per_second_target_default >= TARGET_MIN,
            &format!("must be at least {TARGET_MIN}"),
        )?;
        r.check(
            "max-scale-up-rate",
            c.max_scale_up_rate > 1.0,
            "must be greater than 1.0",
        )?;
        r.check(
            "max-scale-down-rate",
            c.max_scale_down_rate > 1.0,
            "must be greater than 1.0",
        )?;
        r.check(
            "stable-window",
            (WINDOW_MIN..=WINDOW_MAX).contains(&c.stable_window),
            "must be in [6s, 1h]",
        )?;
        r.check(
            "stable-window",
            go::whole_seconds(c.stable_window),
            "must be specified with at most second precision",
        )?;
        r.check(
            "panic-window-percentage",
            (PANIC_WINDOW_PERCENTAGE_MIN..=PANIC_WINDOW_PERCENTAGE_MAX)
                .contains(&c.panic_window_percentage),
            "must be in [1, 100]",
        )?;
        // Knative checks this range on the annotation only; the same range here keeps a
        // cluster-wide typo from putting every revision in permanent panic.
        r.check(
            "panic-threshold-percentage",
            (PANIC_THRESHOLD_PERCENTAGE_MIN..=PANIC_THRESHOLD_PERCENTAGE_MAX)
                .contains(&c.panic_threshold_percentage),
            "must be in [110, 1000]",
        )?;
        r.check(
            "initial-scale",
            c.initial_scale > 0 || c.allow_zero_initial_scale,
            "must be at least 1 unless allow-zero-initial-scale is true",
        )?;
        r.check(
            "min-scale",
            c.max_scale == 0 || c.min_scale <= c.max_scale,
            &format!("must not be above max-scale ({})", c.max_scale),
        )?;
        r.check(
            "activation-scale",
            c.activation_scale >= 1,
            "must be at least 1",
        )?;
        r.check(
            "tick-interval",
            !c.tick_interval.is_zero(),
            "must be positive",
        )?;
        Ok(c)
    }
}

struct Reader<'a> {
    data: &'a BTreeMap<String, String>,
}

impl Reader<'_> {
    fn fail<T>(&self, key: &str, reason: &str) -> Result<T, ConfigError> {
        Err(ConfigError {
            key: key.to_string(),
            value: self.data.get(key).cloned().unwrap_or_default(),
            reason: reason.to_string(),
        })
    }

    fn read<T>(
        &self,
        key: &str,
        out: &mut T,
        parse: impl Fn(&str) -> Result<T, &'static str>,
    ) -> Result<(), ConfigError> {
        if let Some(v) = self.data.get(key) {
            match parse(v.trim()) {
                Ok(parsed) => *out = parsed,
                Err(reason) => return self.fail(key, reason),
            }
        }
        Ok(())
    }

    fn bool(&self, key: &str, out: &mut bool) -> Result<(), ConfigError> {
        self.read(key, out, go::parse_bool)
    }

    fn float(&self, key: &str, out: &mut f64) -> Result<(), ConfigError> {
        self.read(key, out, go::parse_float)
    }

    fn duration(&self, key: &str, out: &mut Duration) -> Result<(), ConfigError> {
        self.read(key, out, go::parse_duration)
    }

    /// A pod count: an int32 that is not negative.
    fn count(&self, key: &str, out: &mut usize) -> Result<(), ConfigError> {
        self.read(key, out, |s| match go::parse_int32(s)? {
            n if n < 0 => Err("must not be negative"),
            n => Ok(n as usize),
        })
    }

    fn check(&self, key: &str, ok: bool, reason: &str) -> Result<(), ConfigError> {
        if ok {
            Ok(())
        } else {
            self.fail(key, reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err(pairs: &[(&str, &str)]) -> ConfigError {
        AutoscalerConfig::from_map(&map(pairs)).unwrap_err()
    }

    #[test]
    fn defaults_are_knatives() {
        let c = AutoscalerConfig::from_map(&BTreeMap::new()).unwrap();
        assert_eq!(c, AutoscalerConfig::default());
        assert_eq!(c.container_concurrency_target_default, 100.0);
        assert_eq!(c.container_concurrency_target_fraction, 0.7);
        assert_eq!(c.requests_per_second_target_default, 200.0);
        assert_eq!(c.target_burst_capacity, 211.0);
        assert_eq!(c.stable_window, Duration::from_secs(60));
        assert_eq!(c.panic_window_percentage, 10.0);
        assert_eq!(c.panic_threshold_percentage, 200.0);
        assert_eq!(c.max_scale_up_rate, 1000.0);
        assert_eq!(c.max_scale_down_rate, 2.0);
        assert_eq!(c.scale_to_zero_grace_period, Duration::from_secs(30));
        assert_eq!(c.scale_to_zero_pod_retention_period, Duration::ZERO);
        assert!(c.enable_scale_to_zero);
        assert_eq!((c.initial_scale, c.allow_zero_initial_scale), (1, false));
        assert_eq!((c.min_scale, c.max_scale, c.activation_scale), (0, 0, 1));
        assert_eq!(c.scale_down_delay, Duration::ZERO);
        assert_eq!(c.tick_interval, Duration::from_secs(2));
    }

    #[test]
    fn every_key_is_read() {
        let c = AutoscalerConfig::from_map(&map(&[
            ("container-concurrency-target-default", "50"),
            ("container-concurrency-target-percentage", "80"),
            ("requests-per-second-target-default", "300"),
            ("target-burst-capacity", "-1"),
            ("stable-window", "1m30s"),
            ("panic-window-percentage", "20"),
            ("panic-threshold-percentage", "150"),
            ("max-scale-up-rate", "10"),
            ("max-scale-down-rate", "4"),
            ("scale-to-zero-grace-period", "45s"),
            ("scale-to-zero-pod-retention-period", "2m"),
            ("enable-scale-to-zero", "false"),
            ("initial-scale", "0"),
            ("allow-zero-initial-scale", "true"),
            ("min-scale", "1"),
            ("max-scale", "10"),
            ("activation-scale", "3"),
            ("scale-down-delay", "15s"),
            ("tick-interval", "500ms"),
            ("_example", "ignored, like any unknown key"),
        ]))
        .unwrap();
        assert_eq!(c.container_concurrency_target_default, 50.0);
        assert!((c.container_concurrency_target_fraction - 0.8).abs() < 1e-12);
        assert_eq!(c.requests_per_second_target_default, 300.0);
        assert_eq!(c.target_burst_capacity, -1.0);
        assert_eq!(c.stable_window, Duration::from_secs(90));
        assert_eq!(c.panic_window_percentage, 20.0);
        assert_eq!(c.panic_threshold_percentage, 150.0);
        assert_eq!((c.max_scale_up_rate, c.max_scale_down_rate), (10.0, 4.0));
        assert_eq!(c.scale_to_zero_grace_period, Duration::from_secs(45));
        assert_eq!(
            c.scale_to_zero_pod_retention_period,
            Duration::from_secs(120)
        );
        assert!(!c.enable_scale_to_zero);
        assert_eq!((c.initial_scale, c.allow_zero_initial_scale), (0, true));
        assert_eq!((c.min_scale, c.max_scale, c.activation_scale), (1, 10, 3));
        assert_eq!(c.scale_down_delay, Duration::from_secs(15));
        assert_eq!(c.tick_interval, Duration::from_millis(500));
    }

    #[test]
    fn a_fraction_is_taken_as_a_fraction() {
        let c =
            AutoscalerConfig::from_map(&map(&[("container-concurrency-target-percentage", "0.5")]))
                .unwrap();
        assert_eq!(c.container_concurrency_target_fraction, 0.5);
    }

    #[test]
    fn errors_name_the_key_and_the_value() {
        let e = err(&[("stable-window", "5s")]);
        assert_eq!(
            (e.key.as_str(), e.value.as_str(), e.reason.as_str()),
            ("stable-window", "5s", "must be in [6s, 1h]")
        );
        assert_eq!(
            e.to_string(),
            "config-autoscaler: stable-window: invalid value \"5s\": must be in [6s, 1h]"
        );
        let e = err(&[("stable-window", "sixty")]);
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            ("stable-window", "sixty")
        );
        assert!(e.reason.contains("not a duration"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let cases: &[(&str, &str, &str)] = &[
            ("stable-window", "2h", "must be in [6s, 1h]"),
            ("stable-window", "6500ms", "at most second precision"),
            ("scale-to-zero-grace-period", "0s", "must be positive"),
            (
                "scale-to-zero-pod-retention-period",
                "-1s",
                "must not be negative",
            ),
            ("scale-down-delay", "1.5s", "at most second precision"),
            ("target-burst-capacity", "-2", "non-negative or -1"),
            ("container-concurrency-target-percentage", "0", "(0, 100]"),
            ("container-concurrency-target-percentage", "101", "(0, 100]"),
            ("container-concurrency-target-default", "0.01", "below 0.01"),
            ("requests-per-second-target-default", "0", "at least 0.01"),
            ("max-scale-up-rate", "1", "greater than 1.0"),
            ("max-scale-down-rate", "0.5", "greater than 1.0"),
            ("panic-window-percentage", "0.5", "[1, 100]"),
            ("panic-threshold-percentage", "100", "[110, 1000]"),
            ("initial-scale", "0", "allow-zero-initial-scale"),
            ("initial-scale", "-1", "must not be negative"),
            ("max-scale", "many", "not a whole number"),
            ("activation-scale", "0", "at least 1"),
            ("enable-scale-to-zero", "yes", "not a boolean"),
            ("max-scale-up-rate", "fast", "not a number"),
            ("tick-interval", "0", "must be positive"),
        ];
        for (key, value, reason) in cases {
            let e = err(&[(key, value)]);
            assert_eq!(
                (e.key.as_str(), e.value.as_str()),
                (*key, *value),
                "{key}={value}"
            );
            assert!(e.reason.contains(reason), "{key}={value}: {e}");
        }
    }

    #[test]
    fn min_scale_above_max_scale_is_refused() {
        let e = err(&[("min-scale", "3"), ("max-scale", "2")]);
        assert_eq!(e.key, "min-scale");
        assert_eq!(e.reason, "must not be above max-scale (2)");
        // max-scale 0 is unbounded.
        assert!(AutoscalerConfig::from_map(&map(&[("min-scale", "3")])).is_ok());
    }
}
