//! When the last pod may go: Knative's `handleScaleToZero` as a state machine.
//!
//! A revision is *active* while it wants pods. When the decider (after min/max scale) first wants
//! none, the revision must have been active for a whole stable window; then it turns *inactive*,
//! which puts the activator in the path (proxy mode), but its pods stay. They go only once the
//! activator is confirmed in the path (the caller says since when), and either the revision has
//! been inactive for max(grace period, pod retention period), or the retention period has passed
//! and the activator has been in the path for the grace period. So no request finds nobody.

use std::time::Instant;

use crate::scaling::RevisionScaling;

/// Whether the revision wants pods, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Active { since: Instant },
    Inactive { since: Instant },
}

/// One tick's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleToZeroInput {
    pub now: Instant,
    /// Pods wanted by the decider after min/max scale.
    pub wanted: usize,
    /// Pods the runtime was last told to run.
    pub current: usize,
    /// Some route sends the revision traffic.
    pub reachable: bool,
    /// Since when the activator is confirmed in the revision's path: Envoy has ACKed the
    /// endpoints that point at the activator. `None` while it is not.
    pub proxy_since: Option<Instant>,
}

/// One tick's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleToZeroOutcome {
    /// Pods to run.
    pub desired: usize,
    /// The revision is inactive: the activator must be in its path whatever the pod count.
    pub inactive: bool,
}

/// The scale-to-zero state of one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleToZero {
    activity: Activity,
}

impl ScaleToZero {
    /// A new revision is active from `now`, or inactive when it starts with no pods
    /// (`initial-scale: 0`).
    pub fn new(now: Instant, active: bool) -> Self {
        let activity = if active {
            Activity::Active { since: now }
        } else {
            Activity::Inactive { since: now }
        };
        ScaleToZero { activity }
    }

    pub fn activity(&self) -> Activity {
        self.activity
    }

    pub fn is_inactive(&self) -> bool {
        matches!(self.activity, Activity::Inactive { .. })
    }

    pub fn step(
        &mut self,
        scaling: &RevisionScaling,
        input: ScaleToZeroInput,
    ) -> ScaleToZeroOutcome {
        let ScaleToZeroInput {
            now,
            wanted,
            current,
            reachable,
            proxy_since,
        } = input;
        let keep = ScaleToZeroOutcome {
            desired: current,
            inactive: true,
        };
        if wanted > 0 {
            if self.is_inactive() {
                self.activity = Activity::Active { since: now };
            }
            return ScaleToZeroOutcome {
                desired: wanted,
                inactive: false,
            };
        }
        // enable-scale-to-zero false: a routed revision keeps one pod. (Knative keeps one even
        // when unrouted; Knarr lets a revision no route uses go.)
        if !scaling.enable_scale_to_zero && reachable {
            return ScaleToZeroOutcome {
                desired: 1,
                inactive: false,
            };
        }
        let inactive_since = match self.activity {
            // stable-window: active for less than a window, come down to one pod and wait.
            Activity::Active { since }
                if now.saturating_duration_since(since) < scaling.stable_window =>
            {
                return ScaleToZeroOutcome {
                    desired: 1,
                    inactive: false,
                };
            }
            Activity::Active { .. } => {
                self.activity = Activity::Inactive { since: now };
                now
            }
            Activity::Inactive { since } => since,
        };
        // Pods stay until the activator is confirmed in the path.
        let Some(proxy_since) = proxy_since else {
            return keep;
        };
        let grace = scaling.scale_to_zero_grace_period;
        let retention = scaling.scale_to_zero_pod_retention_period;
        let inactive_for = now.saturating_duration_since(inactive_since);
        let zero = ScaleToZeroOutcome {
            desired: 0,
            inactive: true,
        };
        // scale-to-zero-grace-period and -pod-retention-period both over since going inactive.
        if inactive_for >= grace.max(retention) {
            return zero;
        }
        // scale-to-zero-pod-retention-period: the last pod stays this long after going inactive.
        if inactive_for < retention {
            return keep;
        }
        // scale-to-zero-grace-period: the activator has been in the path this long.
        if now.saturating_duration_since(proxy_since) >= grace {
            return zero;
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AutoscalerConfig;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn scaling() -> RevisionScaling {
        RevisionScaling::from_annotations(&BTreeMap::new(), 0, &AutoscalerConfig::default())
            .unwrap()
    }

    struct Clock(Instant);

    impl Clock {
        fn at(&self, s: u64) -> Instant {
            self.0 + Duration::from_secs(s)
        }
    }

    fn input(
        now: Instant,
        wanted: usize,
        current: usize,
        proxy_since: Option<Instant>,
    ) -> ScaleToZeroInput {
        ScaleToZeroInput {
            now,
            wanted,
            current,
            reachable: true,
            proxy_since,
        }
    }

    fn out(desired: usize, inactive: bool) -> ScaleToZeroOutcome {
        ScaleToZeroOutcome { desired, inactive }
    }

    #[test]
    fn wanting_pods_passes_through() {
        let s = scaling();
        let c = Clock(Instant::now());
        let mut z = ScaleToZero::new(c.at(0), true);
        assert_eq!(z.step(&s, input(c.at(1), 3, 1, None)), out(3, false));
        assert_eq!(z.activity(), Activity::Active { since: c.at(0) });
    }

    #[test]
    fn a_revision_active_for_less_than_a_stable_window_keeps_one_pod() {
        let s = scaling();
        let c = Clock(Instant::now());
        let mut z = ScaleToZero::new(c.at(0), true);
        assert_eq!(
            z.step(&s, input(c.at(59), 0, 3, Some(c.at(0)))),
            out(1, false)
        );
        assert!(!z.is_inactive());
    }

    #[test]
    fn inactive_pods_stay_until_the_activator_has_been_in_the_path_for_the_grace_period() {
        let s = scaling();
        let c = Clock(Instant::now());
        let mut z = ScaleToZero::new(c.at(0), true);
        // Active for 60 s: inactive now, pods kept, the activator not in the path yet.
        assert_eq!(z.step(&s, input(c.at(60), 0, 1, None)), out(1, true));
        assert_eq!(z.activity(), Activity::Inactive { since: c.at(60) });
        assert_eq!(z.step(&s, input(c.at(62), 0, 1, None)), out(1, true));
        // Proxy mode confirmed at 63: 30 s of grace from there (or from going inactive).
        assert_eq!(
            z.step(&s, input(c.at(64), 0, 1, Some(c.at(63)))),
            out(1, true)
        );
        assert_eq!(
            z.step(&s, input(c.at(89), 0, 1, Some(c.at(63)))),
            out(1, true)
        );
        assert_eq!(
            z.step(&s, input(c.at(90), 0, 1, Some(c.at(63)))),
            out(0, true)
        );
    }

    #[test]
    fn an_activator_long_in_the_path_lets_the_last_pod_go_at_once() {
        let s = scaling();
        let c = Clock(Instant::now());
        let mut z = ScaleToZero::new(c.at(0), true);
        // Target burst capacity kept the activator in the path all along.
        assert_eq!(
            z.step(&s, input(c.at(100), 0, 1, Some(c.at(0)))),
            out(0, true)
        );
    }

    #[test]
    fn the_grace_period_counts_from_going_inactive_too() {
        let s = scaling();
        let c = Clock(Instant::now());
        let mut z = ScaleToZero::new(c.at(0), false);
        // Inactive since 0, proxy only just confirmed: inactive for the grace period is enough.
        assert_eq!(
            z.step(&s, input(c.at(29), 0, 2, Some(c.at(29)))),
            out(2, true)
        );
        assert_eq!(
            z.step(&s, input(c.at(30), 0, 2, Some(c.at(29)))),
            out(0, true)
        );
    }

    #[test]
    fn the_retention_period_keeps_the_last_pod() {
        let mut s = scaling();
        s.scale_to_zero_pod_retention_period = Duration::from_secs(120);
        let c = Clock(Instant::now());
        let mut z = ScaleToZero::new(c.at(0), true);
        assert_eq!(
            z.step(&s, input(c.at(60), 0, 1, Some(c.at(0)))),
            out(1, true)
        );
        assert_eq!(
            z.step(&s, input(c.at(179), 0, 1, Some(c.at(0)))),
            out(1, true)
        );
        assert_eq!(
            z.step(&s, input(c.at(180), 0, 1, Some(c.at(0)))),
            out(0, true)
        );
    }

    #[test]
    fn traffic_makes_an_inactive_revision_active_again() {
        let s = scaling();
        let c = Clock(Instant::now());
        let mut z = ScaleToZero::new(c.at(0), false);
        assert_eq!(
            z.step(&s, input(c.at(5), 1, 0, Some(c.at(0)))),
            out(1, false)
        );
        assert_eq!(z.activity(), Activity::Active { since: c.at(5) });
        // The stable window counts from then.
        assert_eq!(
            z.step(&s, input(c.at(64), 0, 1, Some(c.at(0)))),
            out(1, false)
        );
        assert_eq!(
            z.step(&s, input(c.at(65), 0, 1, Some(c.at(0)))),
            out(0, true)
        );
    }

    #[test]
    fn without_scale_to_zero_a_routed_revision_keeps_one_pod() {
        let mut s = scaling();
        s.enable_scale_to_zero = false;
        let c = Clock(Instant::now());
        let mut z = ScaleToZero::new(c.at(0), true);
        assert_eq!(
            z.step(&s, input(c.at(500), 0, 2, Some(c.at(0)))),
            out(1, false)
        );
        let unrouted = ScaleToZeroInput {
            reachable: false,
            ..input(c.at(500), 0, 1, Some(c.at(0)))
        };
        assert_eq!(z.step(&s, unrouted), out(0, true));
    }
}
