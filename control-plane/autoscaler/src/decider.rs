//! The KPA decider: desired pods from the observed load, with panic mode, the scale-up and
//! scale-down rate limits, activation scale and scale-down delay; and the excess burst capacity
//! that decides whether the activator stays in the path.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::metrics::Observed;
use crate::scaling::RevisionScaling;

/// What one tick of the decider wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Pods wanted, before min/max scale and the scale-to-zero rules.
    pub desired_pods: usize,
    /// Spare capacity in requests beyond the target burst capacity; negative means too little,
    /// so the activator must stay in the path. See [`excess_burst_capacity`].
    pub excess_burst_capacity: i64,
    /// The decider is in panic mode (it will not scale down).
    pub in_panic: bool,
}

/// One revision's decider state across ticks.
#[derive(Debug, Clone)]
pub struct Decider {
    /// The last tick at which the panic window was over the threshold; `None` when not
    /// panicking.
    panic_time: Option<Instant>,
    /// The most pods wanted since the panic began.
    max_panic_pods: usize,
    /// Desired counts of the last `scale-down-delay`, newest last, values strictly decreasing
    /// front to back: the front is the window's maximum.
    delay: VecDeque<(Instant, usize)>,
}

impl Decider {
    /// A decider for a revision that has `ready_pods` now. With more than one ready pod it
    /// starts in panic mode holding that count, as Knative's does after an autoscaler restart:
    /// with no metric history it must not scale down before it has seen a window of load.
    pub fn new(now: Instant, ready_pods: usize) -> Self {
        let restarting = ready_pods > 1;
        Decider {
            panic_time: restarting.then_some(now),
            max_panic_pods: if restarting { ready_pods } else { 0 },
            delay: VecDeque::new(),
        }
    }

    /// Whether the decider is in panic mode.
    pub fn in_panic(&self) -> bool {
        self.panic_time.is_some()
    }

    /// One tick. `ready_pods` are the revision's ready pods now; `reachable` is false when no
    /// route sends the revision traffic (it may then drop to 0 at once).
    pub fn decide(
        &mut self,
        scaling: &RevisionScaling,
        now: Instant,
        observed: Observed,
        ready_pods: usize,
        reachable: bool,
    ) -> Decision {
        // Zero ready pods count as one, so a revision at zero can still scale up.
        let ready = ready_pods.max(1) as f64;
        // max-scale-up-rate: at most rate × ready, rounded up so a low rate still adds a pod.
        let max_up = (scaling.max_scale_up_rate * ready).ceil();
        // max-scale-down-rate: at least ready / rate; nothing holds an unreachable revision.
        let max_down = if reachable {
            (ready / scaling.max_scale_down_rate).floor()
        } else {
            0.0
        };

        let stable_want = (observed.stable / scaling.target).ceil();
        let panic_want = (observed.panic / scaling.target).ceil();
        let clamp = |want: f64| want.max(max_down).min(max_up) as usize;
        let mut stable_pods = clamp(stable_want);
        let mut panic_pods = clamp(panic_want);

        // activation-scale: any load at all means at least this many pods.
        if scaling.activation_scale > 1 {
            if stable_want > 0.0 {
                stable_pods = stable_pods.max(scaling.activation_scale);
            }
            if panic_want > 0.0 {
                panic_pods = panic_pods.max(scaling.activation_scale);
            }
        }

        // panic-threshold-percentage: the panic window wants that share of the ready pods.
        let over_threshold = panic_want / ready >= scaling.panic_threshold;
        match self.panic_time {
            // Enter, or extend: panic lasts a stable window past the last tick over it.
            _ if over_threshold => self.panic_time = Some(now),
            // Leave once the surge has been in the stable window for a whole window.
            Some(since) if now > since + scaling.stable_window => {
                self.panic_time = None;
                self.max_panic_pods = 0;
            }
            _ => {}
        }

        let mut desired = stable_pods;
        if self.panic_time.is_some() {
            // Provision for the larger of the two windows, and never scale down in panic.
            desired = desired.max(panic_pods).max(self.max_panic_pods);
            self.max_panic_pods = desired;
        }

        // scale-down-delay: hold the largest count of the last delay window.
        if !scaling.scale_down_delay.is_zero() {
            desired = self.delayed(now, desired, scaling.scale_down_delay);
        } else {
            self.delay.clear();
        }

        Decision {
            desired_pods: desired,
            excess_burst_capacity: excess_burst_capacity(
                ready_pods,
                scaling.total_target,
                scaling.target_burst_capacity,
                observed.panic,
            ),
            in_panic: self.panic_time.is_some(),
        }
    }

    /// Records `desired` and returns the maximum over the last `delay` (a monotonic queue).
    fn delayed(&mut self, now: Instant, desired: usize, delay: Duration) -> usize {
        while self.delay.back().is_some_and(|&(_, v)| v <= desired) {
            self.delay.pop_back();
        }
        self.delay.push_back((now, desired));
        while self
            .delay
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) >= delay)
        {
            self.delay.pop_front();
        }
        self.delay.front().map_or(desired, |&(_, v)| v)
    }
}

/// Knative's excess burst capacity: the requests the ready pods could take beyond the current
/// panic-window load and the target burst capacity,
/// `floor(ready × total_target − target_burst_capacity − panic_load)`.
///
/// `total_target` is the per-pod capacity *before* utilization (100 by default, not 70), and
/// `ready_pods` is the real count (0 stays 0). Target burst capacity 0 gives 0 (the activator
/// leaves the path as soon as there are pods); -1 gives -1 (it never leaves).
pub fn excess_burst_capacity(
    ready_pods: usize,
    total_target: f64,
    target_burst_capacity: f64,
    panic_load: f64,
) -> i64 {
    if target_burst_capacity == 0.0 {
        0
    } else if target_burst_capacity < 0.0 {
        -1
    } else {
        (ready_pods as f64 * total_target - target_burst_capacity - panic_load).floor() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AutoscalerConfig;
    use std::collections::BTreeMap;

    fn scaling() -> RevisionScaling {
        RevisionScaling::from_annotations(&BTreeMap::new(), 0, &AutoscalerConfig::default())
            .unwrap()
    }

    fn load(stable: f64, panic: f64) -> Observed {
        Observed { stable, panic }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn desired_is_load_over_target_rounded_up() {
        let s = scaling();
        let t0 = Instant::now();
        let mut d = Decider::new(t0, 0);
        // Target 70: 140 needs 2 pods, 141 needs 3.
        let got = d.decide(&s, t0, load(140.0, 140.0), 2, true);
        assert_eq!((got.desired_pods, got.in_panic), (2, false));
        let got = d.decide(&s, secs(t0, 2), load(141.0, 141.0), 2, true);
        assert_eq!(got.desired_pods, 3);
        let got = d.decide(&s, secs(t0, 4), load(1.0, 1.0), 1, true);
        assert_eq!(got.desired_pods, 1);
    }

    #[test]
    fn scale_up_is_capped_at_the_rate_times_ready_pods() {
        let mut s = scaling();
        let t0 = Instant::now();
        // 1000× one pod: 100 000 requests want 1429 pods, 1000 are allowed.
        let got = Decider::new(t0, 0).decide(&s, t0, load(100_000.0, 0.0), 1, true);
        assert_eq!(got.desired_pods, 1000);
        // Zero ready pods count as one.
        let got = Decider::new(t0, 0).decide(&s, t0, load(100_000.0, 0.0), 0, true);
        assert_eq!(got.desired_pods, 1000);
        // A rate of 1.5 on 3 pods: ceil(4.5) = 5.
        s.max_scale_up_rate = 1.5;
        let got = Decider::new(t0, 0).decide(&s, t0, load(700.0, 0.0), 3, true);
        assert_eq!(got.desired_pods, 5);
    }

    #[test]
    fn scale_down_is_at_most_half_the_ready_pods() {
        let s = scaling();
        let t0 = Instant::now();
        let got = Decider::new(t0, 0).decide(&s, t0, load(0.0, 0.0), 10, true);
        assert_eq!(got.desired_pods, 5);
        let got = Decider::new(t0, 0).decide(&s, t0, load(0.0, 0.0), 3, true);
        assert_eq!(got.desired_pods, 1);
        let got = Decider::new(t0, 0).decide(&s, t0, load(0.0, 0.0), 1, true);
        assert_eq!(got.desired_pods, 0);
        // Unreachable: straight to what the load needs.
        let got = Decider::new(t0, 0).decide(&s, t0, load(0.0, 0.0), 10, false);
        assert_eq!(got.desired_pods, 0);
    }

    #[test]
    fn panic_starts_at_twice_the_ready_capacity() {
        let s = scaling();
        let t0 = Instant::now();
        let mut d = Decider::new(t0, 0);
        // Panic wants ceil(139/70) = 2 pods for 1 ready: 2/1 ≥ 2.0.
        let got = d.decide(&s, t0, load(10.0, 139.0), 1, true);
        assert!(got.in_panic);
        // In panic the larger of the two windows wins.
        assert_eq!(got.desired_pods, 2);
        let mut d = Decider::new(t0, 0);
        // ceil(130/70) = 2 for 2 ready: 1.0, no panic; the stable window decides.
        let got = d.decide(&s, t0, load(10.0, 130.0), 2, true);
        assert!(!got.in_panic);
        assert_eq!(got.desired_pods, 1);
    }

    #[test]
    fn panic_never_scales_down_and_ends_a_stable_window_after_the_surge() {
        let s = scaling();
        let t0 = Instant::now();
        let mut d = Decider::new(t0, 0);
        let got = d.decide(&s, t0, load(50.0, 350.0), 1, true);
        assert_eq!((got.desired_pods, got.in_panic), (5, true));
        // Surge over: the load wants 1 pod, panic holds 5.
        let got = d.decide(&s, secs(t0, 2), load(60.0, 10.0), 5, true);
        assert_eq!((got.desired_pods, got.in_panic), (5, true));
        // Increases still apply in panic; ceil(770/70) = 11 for 5 ready is over 2× again.
        let got = d.decide(&s, secs(t0, 4), load(60.0, 770.0), 5, true);
        assert_eq!((got.desired_pods, got.in_panic), (11, true));
        // 60 s after the last tick over the threshold (t=4) panic still holds...
        let got = d.decide(&s, secs(t0, 64), load(60.0, 10.0), 11, true);
        assert_eq!((got.desired_pods, got.in_panic), (11, true));
        // ...and just past it the stable window decides: ceil(60/70) = 1, at least 11/2 = 5.
        let got = d.decide(&s, secs(t0, 65), load(60.0, 10.0), 11, true);
        assert_eq!((got.desired_pods, got.in_panic), (5, false));
    }

    #[test]
    fn staying_over_the_threshold_extends_panic() {
        let s = scaling();
        let t0 = Instant::now();
        let mut d = Decider::new(t0, 0);
        d.decide(&s, t0, load(0.0, 200.0), 1, true);
        // Still over at t=30 (ceil(420/70) = 6 ≥ 2 × 3 ready).
        assert!(
            d.decide(&s, secs(t0, 30), load(0.0, 420.0), 3, true)
                .in_panic
        );
        assert!(d.decide(&s, secs(t0, 61), load(0.0, 0.0), 6, true).in_panic);
        let got = d.decide(&s, secs(t0, 91), load(0.0, 0.0), 6, true);
        assert!(!got.in_panic);
        assert_eq!(got.desired_pods, 3);
    }

    #[test]
    fn a_restarted_decider_holds_the_current_pods() {
        let s = scaling();
        let t0 = Instant::now();
        let mut d = Decider::new(t0, 4);
        assert!(d.in_panic());
        let got = d.decide(&s, secs(t0, 2), load(0.0, 0.0), 4, true);
        assert_eq!((got.desired_pods, got.in_panic), (4, true));
        assert!(!Decider::new(t0, 1).in_panic());
    }

    #[test]
    fn activation_scale_applies_to_any_load() {
        let mut s = scaling();
        s.activation_scale = 3;
        let t0 = Instant::now();
        let got = Decider::new(t0, 0).decide(&s, t0, load(1.0, 1.0), 0, true);
        assert_eq!(got.desired_pods, 3);
        let got = Decider::new(t0, 0).decide(&s, t0, load(0.0, 0.0), 1, true);
        assert_eq!(got.desired_pods, 0);
        // More load than activation scale: the load wins.
        let got = Decider::new(t0, 0).decide(&s, t0, load(350.0, 350.0), 5, true);
        assert_eq!(got.desired_pods, 5);
    }

    #[test]
    fn scale_down_delay_holds_the_highest_recent_count() {
        let mut s = scaling();
        s.scale_down_delay = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut d = Decider::new(t0, 0);
        assert_eq!(
            d.decide(&s, t0, load(350.0, 350.0), 5, true).desired_pods,
            5
        );
        // Load drops to one pod's worth at t=2; the decision holds 5 until t=10.
        for t in [2, 4, 6, 8] {
            let got = d.decide(&s, secs(t0, t), load(70.0, 70.0), 5, false);
            assert_eq!(got.desired_pods, 5, "t={t}");
        }
        assert_eq!(
            d.decide(&s, secs(t0, 10), load(70.0, 70.0), 5, false)
                .desired_pods,
            1
        );
        // Increases are immediate.
        assert_eq!(
            d.decide(&s, secs(t0, 12), load(210.0, 210.0), 1, false)
                .desired_pods,
            3
        );
    }

    #[test]
    fn excess_burst_capacity_follows_knative() {
        // 3 pods × 100 − 211 − 50 = 39.
        assert_eq!(excess_burst_capacity(3, 100.0, 211.0, 50.0), 39);
        // One idle pod is not enough headroom for 211: the activator stays.
        assert_eq!(excess_burst_capacity(1, 100.0, 211.0, 0.0), -111);
        assert_eq!(excess_burst_capacity(0, 100.0, 211.0, 0.0), -211);
        assert_eq!(excess_burst_capacity(3, 100.0, 211.0, 89.5), -1);
        assert_eq!(excess_burst_capacity(3, 100.0, 0.0, 1000.0), 0);
        assert_eq!(excess_burst_capacity(30, 100.0, -1.0, 0.0), -1);
    }

    #[test]
    fn decisions_carry_the_excess_burst_capacity_of_the_total_target() {
        let s = scaling();
        let t0 = Instant::now();
        let got = Decider::new(t0, 0).decide(&s, t0, load(100.0, 50.0), 3, true);
        // 3 × 100 (not 3 × 70) − 211 − 50.
        assert_eq!(got.excess_burst_capacity, 39);
    }
}
