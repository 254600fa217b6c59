//! One revision's autoscaler: the collector, the decider, the scale bounds and the
//! scale-to-zero rules in the order Knative's KPA applies them, behind one `tick`.

use std::time::Instant;

use crate::decider::{excess_burst_capacity, Decider, Decision};
use crate::metrics::{MetricCollector, Observed, Sample};
use crate::scale_to_zero::{ScaleToZero, ScaleToZeroInput, ScaleToZeroOutcome};
use crate::scaling::RevisionScaling;
use crate::{serve_mode, ServeMode};

/// What the control plane knows about the revision at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickInput {
    /// Pods whose queue-proxy readiness probe passes.
    pub ready_pods: usize,
    /// The revision is routed, or is its Configuration's latest and not yet routed (Knative:
    /// reachability is not `Unreachable`). Gates min-scale and initial-scale, and lets an
    /// unrouted revision scale straight down.
    pub reachable: bool,
    /// Since when the activator is confirmed in the path: the gateway's Envoys have ACKed the
    /// endpoints that send this revision to the activator. `None` in serve mode.
    pub proxy_since: Option<Instant>,
}

/// What the revision should look like after a tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tick {
    /// Pods the runtime should run.
    pub desired_pods: usize,
    /// See [`crate::excess_burst_capacity`]; the last known value when there is no data.
    pub excess_burst_capacity: i64,
    /// Where the gateway sends the revision's requests.
    pub mode: ServeMode,
    pub in_panic: bool,
    /// The revision wants no pods and waits for them to go; always [`ServeMode::Proxy`].
    pub inactive: bool,
    /// The load this tick scaled on; `None` when there was no data (nothing changed).
    pub observed: Option<Observed>,
}

/// A revision's autoscaler. Create it when the revision appears, [`record`](Self::record) every
/// stats report, and [`tick`](Self::tick) every tick interval (2 s) — and once more right after
/// recording an activator poke.
#[derive(Debug, Clone)]
pub struct RevisionAutoscaler {
    scaling: RevisionScaling,
    collector: MetricCollector,
    decider: Decider,
    scale_to_zero: ScaleToZero,
    /// The revision has had its initial scale of ready pods once.
    initialized: bool,
    last: Option<Decision>,
    /// What the last tick asked for.
    current: usize,
}

impl RevisionAutoscaler {
    pub fn new(scaling: RevisionScaling, now: Instant) -> Self {
        RevisionAutoscaler {
            collector: MetricCollector::new(now, scaling.stable_window, scaling.panic_window),
            decider: Decider::new(now, 0),
            scale_to_zero: ScaleToZero::new(now, scaling.initial_scale > 0),
            initialized: false,
            last: None,
            current: 0,
            scaling,
        }
    }

    pub fn scaling(&self) -> &RevisionScaling {
        &self.scaling
    }

    /// New knobs (the config map changed); history and panic state carry over.
    pub fn update(&mut self, scaling: RevisionScaling) {
        if (scaling.stable_window, scaling.panic_window)
            != (self.scaling.stable_window, self.scaling.panic_window)
        {
            self.collector
                .resize(scaling.stable_window, scaling.panic_window);
        }
        self.scaling = scaling;
    }

    /// One report from a pod's queue-proxy or an activator.
    pub fn record(&mut self, now: Instant, sample: Sample) {
        self.collector.record(now, sample);
    }

    pub fn tick(&mut self, now: Instant, input: TickInput) -> Tick {
        let TickInput {
            ready_pods,
            reachable,
            proxy_since,
        } = input;
        let s = self.scaling;
        // min-scale holds only while the revision is routed.
        let min = if reachable { s.min_scale } else { 0 };
        // initial-scale: a new revision runs that many pods until they have all been ready.
        // Like Knative's status, "reached" is as of the previous tick.
        let initial = bound(min.max(s.initial_scale), min, s.max_scale);
        let floor = if reachable && !self.initialized {
            initial
        } else {
            min
        };

        let observed = self.collector.observe(now, s.metric);
        let decision = observed.map(|o| self.decider.decide(&s, now, o, ready_pods, reachable));
        if decision.is_some() {
            self.last = decision;
        }
        let wanted = match decision {
            Some(d) => Some(d.desired_pods),
            // No data: keep what runs (Knative ignores a scale result without metrics), but
            // within the bounds — which is how a new revision gets its initial scale.
            None => {
                let kept = bound(self.current, floor, s.max_scale);
                (kept != self.current).then_some(kept)
            }
        };
        let outcome = match wanted {
            Some(w) => self.scale_to_zero.step(
                &s,
                ScaleToZeroInput {
                    now,
                    wanted: bound(w, floor, s.max_scale),
                    current: self.current,
                    reachable,
                    proxy_since,
                },
            ),
            None => ScaleToZeroOutcome {
                desired: self.current,
                inactive: self.scale_to_zero.is_inactive(),
            },
        };
        self.current = outcome.desired;
        if ready_pods >= initial {
            self.initialized = true;
        }

        let ebc = match self.last {
            Some(d) => d.excess_burst_capacity,
            None => excess_burst_capacity(ready_pods, s.total_target, s.target_burst_capacity, 0.0),
        };
        // An inactive revision is on its way to zero: proxy whatever its pods.
        let want = if outcome.inactive { 0 } else { outcome.desired };
        let mode = if serve_mode(want, ebc, ready_pods) {
            ServeMode::Serve
        } else {
            ServeMode::Proxy
        };
        Tick {
            desired_pods: outcome.desired,
            excess_burst_capacity: ebc,
            mode,
            in_panic: self.decider.in_panic(),
            inactive: outcome.inactive,
            observed,
        }
    }
}

/// min/max-scale: at least `min`, at most `max` (0 = unbounded; max wins over an initial scale
/// above it).
fn bound(x: usize, min: usize, max: usize) -> usize {
    let x = x.max(min);
    if max == 0 {
        x
    } else {
        x.min(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AutoscalerConfig;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn scaling(pairs: &[(&str, &str)]) -> RevisionScaling {
        let annotations = pairs
            .iter()
            .map(|(k, v)| (format!("autoscaling.knative.dev/{k}"), v.to_string()))
            .collect::<BTreeMap<_, _>>();
        RevisionScaling::from_annotations(&annotations, 0, &AutoscalerConfig::default()).unwrap()
    }

    /// A revision driven second by second: each second every ready pod reports `per_pod`
    /// concurrency and every other second the autoscaler ticks.
    struct Sim {
        t0: Instant,
        now: u64,
        a: RevisionAutoscaler,
        ready: usize,
        reachable: bool,
        proxy_since: Option<Instant>,
        last: Option<Tick>,
    }

    impl Sim {
        fn new(s: RevisionScaling) -> Sim {
            let t0 = Instant::now();
            Sim {
                t0,
                now: 0,
                a: RevisionAutoscaler::new(s, t0),
                ready: 0,
                reachable: true,
                proxy_since: None,
                last: None,
            }
        }

        fn at(&self, s: u64) -> Instant {
            self.t0 + Duration::from_secs(s)
        }

        fn tick(&mut self) -> Tick {
            let now = self.at(self.now);
            let tick = self.a.tick(
                now,
                TickInput {
                    ready_pods: self.ready,
                    reachable: self.reachable,
                    proxy_since: self.proxy_since,
                },
            );
            // The control plane programs the mode; Envoy ACKs at once here.
            match tick.mode {
                ServeMode::Proxy => {
                    self.proxy_since.get_or_insert(now);
                }
                ServeMode::Serve => self.proxy_since = None,
            }
            self.last = Some(tick);
            tick
        }

        /// Runs `secs` seconds with the given total load spread over the ready pods; pods
        /// become ready at once (the runtime is instant here).
        fn run(&mut self, secs: u64, load: f64) -> Tick {
            for _ in 0..secs {
                self.now += 1;
                let now = self.at(self.now);
                for _ in 0..self.ready {
                    let per_pod = load / self.ready as f64;
                    self.a
                        .record(now, Sample::from_queue_proxy(per_pod, 0.0, 0.0, 0.0));
                }
                if self.now.is_multiple_of(2) {
                    let tick = self.tick();
                    self.ready = tick.desired_pods;
                }
            }
            self.last.unwrap()
        }
    }

    #[test]
    fn a_new_revision_starts_at_initial_scale_in_proxy_mode() {
        let mut sim = Sim::new(scaling(&[]));
        let tick = sim.tick();
        assert_eq!(tick.desired_pods, 1);
        assert_eq!(tick.mode, ServeMode::Proxy);
        assert_eq!(tick.observed, None);
        // One idle ready pod: 100 − 211 < 0, the activator stays in the path.
        sim.ready = 1;
        let tick = sim.tick();
        assert_eq!((tick.desired_pods, tick.excess_burst_capacity), (1, -111));
        assert_eq!(tick.mode, ServeMode::Proxy);
    }

    #[test]
    fn an_idle_revision_goes_to_zero_after_the_window_and_the_grace_period() {
        let mut sim = Sim::new(scaling(&[]));
        sim.ready = 1;
        sim.tick();
        // Idle pods report zeros; for the first 60 s the revision keeps its pod.
        let tick = sim.run(58, 0.0);
        assert_eq!((tick.desired_pods, tick.inactive), (1, false));
        // At 60 s it turns inactive; the activator has been in the path since the start
        // (burst capacity), so the pod goes at once.
        let tick = sim.run(2, 0.0);
        assert_eq!((tick.desired_pods, tick.inactive), (0, true));
        assert_eq!(tick.mode, ServeMode::Proxy);
        // No pods, no reports: no data, nothing changes.
        let tick = sim.run(100, 0.0);
        assert_eq!((tick.desired_pods, tick.observed), (0, None));
    }

    #[test]
    fn without_burst_capacity_the_grace_period_runs_from_proxy_mode() {
        let mut sim = Sim::new(scaling(&[("target-burst-capacity", "0")]));
        sim.ready = 1;
        let tick = sim.tick();
        assert_eq!(tick.mode, ServeMode::Serve);
        sim.run(58, 0.0);
        assert!(sim.proxy_since.is_none());
        // Inactive at 60: proxy mode from there, the pod stays for the grace period.
        let tick = sim.run(2, 0.0);
        assert_eq!(
            (tick.desired_pods, tick.inactive, tick.mode),
            (1, true, ServeMode::Proxy)
        );
        assert_eq!(sim.proxy_since, Some(sim.at(60)));
        let tick = sim.run(28, 0.0);
        assert_eq!(tick.desired_pods, 1);
        let tick = sim.run(2, 0.0);
        assert_eq!(tick.desired_pods, 0);
        assert_eq!(sim.now, 90);
    }

    #[test]
    fn a_poke_scales_from_zero_at_once() {
        let mut sim = Sim::new(scaling(&[]));
        sim.ready = 1;
        sim.run(70, 0.0);
        assert_eq!(sim.last.unwrap().desired_pods, 0);
        // The activator's first request: record the poke and tick right away.
        let now = sim.at(sim.now);
        sim.a.record(now, Sample::POKE);
        let tick = sim.tick();
        assert_eq!(
            (tick.desired_pods, tick.inactive, tick.mode),
            (1, false, ServeMode::Proxy)
        );
    }

    #[test]
    fn load_scales_up_and_serve_mode_waits_for_burst_headroom() {
        let mut sim = Sim::new(scaling(&[]));
        sim.ready = 1;
        sim.tick();
        // 350 in flight: panic wants ceil(350/70) = 5 for 1 ready pod.
        let tick = sim.run(2, 350.0);
        assert!(tick.in_panic);
        assert_eq!(tick.desired_pods, 5);
        assert_eq!(tick.mode, ServeMode::Proxy);
        // With 5 pods: 500 − 211 − 350 < 0, still proxied.
        let tick = sim.run(2, 350.0);
        assert_eq!(tick.desired_pods, 5);
        assert_eq!(tick.mode, ServeMode::Proxy);
        // Load falls to 140: panic holds 5 pods, and 500 − 211 − 140 = 149 ≥ 0 serves.
        let tick = sim.run(6, 140.0);
        assert_eq!((tick.desired_pods, tick.in_panic), (5, true));
        assert_eq!(tick.excess_burst_capacity, 149);
        assert_eq!(tick.mode, ServeMode::Serve);
    }

    #[test]
    fn initial_scale_holds_until_reached_once() {
        let mut sim = Sim::new(scaling(&[("initial-scale", "3")]));
        assert_eq!(sim.tick().desired_pods, 3);
        // Two of three ready, idle: still 3.
        sim.ready = 2;
        sim.a.record(sim.at(0), Sample::default());
        assert_eq!(sim.tick().desired_pods, 3);
        // All three ready once: from the next tick the decider takes over (idle 3 → at least
        // 3/2 = 1).
        sim.ready = 3;
        assert_eq!(sim.tick().desired_pods, 3);
        assert_eq!(sim.tick().desired_pods, 1);
    }

    #[test]
    fn initial_scale_zero_starts_with_no_pods() {
        let config = AutoscalerConfig {
            allow_zero_initial_scale: true,
            ..AutoscalerConfig::default()
        };
        let mut annotations = BTreeMap::new();
        annotations.insert("autoscaling.knative.dev/initial-scale".into(), "0".into());
        let s = RevisionScaling::from_annotations(&annotations, 0, &config).unwrap();
        let mut sim = Sim::new(s);
        let tick = sim.tick();
        assert_eq!(
            (tick.desired_pods, tick.inactive, tick.mode),
            (0, true, ServeMode::Proxy)
        );
    }

    #[test]
    fn min_scale_holds_only_while_routed() {
        let mut sim = Sim::new(scaling(&[("min-scale", "2"), ("max-scale", "4")]));
        sim.reachable = false;
        assert_eq!(sim.tick().desired_pods, 0);
        // Routed: min-scale applies at once, before any load report.
        sim.reachable = true;
        assert_eq!(sim.tick().desired_pods, 2);
        sim.ready = 2;
        let tick = sim.run(120, 0.0);
        assert_eq!((tick.desired_pods, tick.inactive), (2, false));
        // Heavy load is capped at max-scale.
        let tick = sim.run(4, 1000.0);
        assert_eq!(tick.desired_pods, 4);
        // Unrouted: no min-scale. Panic and the stable window still remember the load for a
        // minute, then the revision turns inactive and goes after the grace period.
        sim.reachable = false;
        let tick = sim.run(60, 0.0);
        assert_eq!(tick.desired_pods, 4);
        let tick = sim.run(60, 0.0);
        assert_eq!((tick.desired_pods, tick.inactive), (0, true));
    }

    #[test]
    fn activation_scale_applies_when_scaling_from_zero() {
        let mut sim = Sim::new(scaling(&[("activation-scale", "3")]));
        sim.ready = 1;
        sim.run(70, 0.0);
        assert_eq!(sim.last.unwrap().desired_pods, 0);
        sim.a.record(sim.at(sim.now), Sample::POKE);
        assert_eq!(sim.tick().desired_pods, 3);
    }

    #[test]
    fn updating_the_windows_keeps_the_history() {
        let mut sim = Sim::new(scaling(&[]));
        sim.ready = 1;
        sim.run(10, 35.0);
        let mut s = *sim.a.scaling();
        s.stable_window = Duration::from_secs(30);
        s.panic_window = Duration::from_secs(3);
        sim.a.update(s);
        let tick = sim.tick();
        assert_eq!(tick.observed.unwrap().stable, 35.0);
        assert_eq!(sim.a.scaling().stable_window, Duration::from_secs(30));
    }
}
