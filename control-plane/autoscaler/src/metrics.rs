//! Metric windows: per-second buckets of load and their stable- and panic-window averages, as
//! Knative's `MetricCollector` keeps them.
//!
//! Every report that lands in the same one-second bucket is added: the queue-proxy of each pod
//! and each activator report once a second what they saw during that second, so the sum of a
//! bucket is the revision's load in that second. Knative's scraper also extrapolates from a
//! sample of pods to the unscraped ones; Knarr reads every pod, so there is nothing to
//! extrapolate. Summing (rather than averaging reports from one source in one bucket) keeps the
//! window total right when a report drifts across a bucket edge: one bucket gets two, the next
//! none, and the window average is unchanged.
//!
//! Silence is not zero. A second nobody reported about is a gap: the average is taken over the
//! seconds that had reports (Knative's partial window), and when nothing arrived for a whole
//! stable window there is *no data* and the decider must not act. The caller therefore records
//! every scrape of a ready pod, idle ones included.

use std::time::{Duration, Instant};

use crate::config::BUCKET;
use crate::scaling::Metric;

/// One report of load over the last second from one pod's queue-proxy or one activator.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    /// Time-weighted average of in-flight requests over the period.
    pub concurrency: f64,
    /// Requests that arrived during the period (the period is one second, so this is rps).
    pub requests: f64,
}

impl Sample {
    /// What the activator's first request for a revision with no ready pod stands for: one
    /// request in flight. Record it and tick at once so scale-from-zero starts now.
    pub const POKE: Sample = Sample {
        concurrency: 1.0,
        requests: 1.0,
    };

    /// From a queue-proxy `Stat`. Requests that came through the activator are counted by the
    /// activator's own reports, so they are taken out here (Knative's collector does the same).
    pub fn from_queue_proxy(
        average_concurrent_requests: f64,
        average_proxied_concurrent_requests: f64,
        request_count: f64,
        proxied_request_count: f64,
    ) -> Sample {
        Sample {
            concurrency: average_concurrent_requests - average_proxied_concurrent_requests,
            requests: request_count - proxied_request_count,
        }
    }

    /// From an activator's `RevisionStats`.
    pub fn from_activator(average_concurrency: f64, request_count: f64) -> Sample {
        Sample {
            concurrency: average_concurrency,
            requests: request_count,
        }
    }
}

/// The averages the decider scales on, in the unit of the revision's [`Metric`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observed {
    /// Average over the stable window (60 s).
    pub stable: f64,
    /// Average over the panic window (6 s).
    pub panic: f64,
}

/// A revision's load history: concurrency and rps, each over the stable and the panic window.
#[derive(Debug, Clone)]
pub struct MetricCollector {
    /// Bucket 0 starts here; every `Instant` given later is taken relative to it.
    epoch: Instant,
    concurrency_stable: Window,
    concurrency_panic: Window,
    rps_stable: Window,
    rps_panic: Window,
}

impl MetricCollector {
    /// An empty history. `epoch` is any instant not after the first sample (the revision's
    /// creation, say); windows are whole seconds, at least one.
    pub fn new(epoch: Instant, stable_window: Duration, panic_window: Duration) -> Self {
        MetricCollector {
            epoch,
            concurrency_stable: Window::new(stable_window),
            concurrency_panic: Window::new(panic_window),
            rps_stable: Window::new(stable_window),
            rps_panic: Window::new(panic_window),
        }
    }

    /// Adds one report to the bucket of `now`. Negative or non-finite values count as 0 (a
    /// queue-proxy's proxied share can exceed its total by a rounding error).
    pub fn record(&mut self, now: Instant, sample: Sample) {
        let sec = self.bucket(now);
        let clean = |v: f64| if v.is_finite() && v > 0.0 { v } else { 0.0 };
        let (c, r) = (clean(sample.concurrency), clean(sample.requests));
        self.concurrency_stable.record(sec, c);
        self.concurrency_panic.record(sec, c);
        self.rps_stable.record(sec, r);
        self.rps_panic.record(sec, r);
    }

    /// The stable and panic averages of `metric` at `now`; `None` when nothing was recorded
    /// during the last stable window ("no data": do not scale).
    pub fn observe(&self, now: Instant, metric: Metric) -> Option<Observed> {
        let sec = self.bucket(now);
        let (stable, panic) = match metric {
            Metric::Concurrency => (&self.concurrency_stable, &self.concurrency_panic),
            Metric::Rps => (&self.rps_stable, &self.rps_panic),
        };
        if stable.is_empty(sec) {
            return None;
        }
        Some(Observed {
            stable: stable.average(sec),
            panic: panic.average(sec),
        })
    }

    /// Changes the window lengths, keeping the history that fits the new ones.
    pub fn resize(&mut self, stable_window: Duration, panic_window: Duration) {
        self.concurrency_stable.resize(stable_window);
        self.rps_stable.resize(stable_window);
        self.concurrency_panic.resize(panic_window);
        self.rps_panic.resize(panic_window);
    }

    fn bucket(&self, t: Instant) -> u64 {
        // Instants before the epoch land in bucket 0.
        (t.saturating_duration_since(self.epoch).as_nanos() / BUCKET.as_nanos()) as u64
    }
}

/// One-second buckets over a window, in a ring indexed by `second % len`.
#[derive(Debug, Clone)]
struct Window {
    buckets: Vec<f64>,
    /// The first and last second written since the window was last empty.
    span: Option<(u64, u64)>,
}

impl Window {
    fn new(window: Duration) -> Self {
        let len = window.as_secs().max(1) as usize;
        Window {
            buckets: vec![0.0; len],
            span: None,
        }
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    fn slot(&self, sec: u64) -> usize {
        (sec % self.len()) as usize
    }

    fn record(&mut self, sec: u64, value: f64) {
        let len = self.len();
        match self.span {
            // First write, or nothing for a whole window: start over (the average is again
            // over the seconds since this write).
            None => self.restart(sec),
            Some((_, last)) if sec >= last + len => self.restart(sec),
            Some((first, last)) if sec > last => {
                // The seconds skipped since `last` had no reports: clear their slots, which
                // still hold values from a window ago.
                for s in last + 1..=sec {
                    let i = self.slot(s);
                    self.buckets[i] = 0.0;
                }
                self.span = Some((first, sec));
            }
            // Too old: its slot now belongs to a second inside the window.
            Some((_, last)) if sec + len <= last => return,
            Some((first, last)) => self.span = Some((first.min(sec), last)),
        }
        let i = self.slot(sec);
        self.buckets[i] += value;
    }

    fn restart(&mut self, sec: u64) {
        self.buckets.iter_mut().for_each(|b| *b = 0.0);
        self.span = Some((sec, sec));
    }

    /// Nothing written during the window ending at `now` (Knative: `now - lastWrite > window`).
    fn is_empty(&self, now: u64) -> bool {
        match self.span {
            None => true,
            Some((_, last)) => now.saturating_sub(last) > self.len(),
        }
    }

    /// Average per second over the window ending at `now`, counting only the seconds from the
    /// first write (or the window's start) to the last write. Sums the buckets every time
    /// rather than keeping a running total, so an idle window is exactly 0.
    fn average(&self, now: u64) -> f64 {
        let Some((first, last)) = self.span else {
            return 0.0;
        };
        let len = self.len();
        let end = now.max(last);
        if end - last >= len {
            return 0.0;
        }
        let start = first.max((end + 1).saturating_sub(len));
        let sum: f64 = (start..=last).map(|s| self.buckets[self.slot(s)]).sum();
        sum / (last - start + 1) as f64
    }

    fn resize(&mut self, window: Duration) {
        let mut resized = Window::new(window);
        if resized.len() == self.len() {
            return;
        }
        if let Some((first, last)) = self.span {
            let keep = resized.len().min(self.len());
            let start = first.max((last + 1).saturating_sub(keep));
            for s in start..=last {
                let (from, to) = (self.slot(s), resized.slot(s));
                resized.buckets[to] = self.buckets[from];
            }
            resized.span = Some((start, last));
        }
        *self = resized;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collector() -> (Instant, MetricCollector) {
        let t0 = Instant::now();
        let c = MetricCollector::new(t0, Duration::from_secs(60), Duration::from_secs(6));
        (t0, c)
    }

    fn at(t0: Instant, secs: f64) -> Instant {
        t0 + Duration::from_secs_f64(secs)
    }

    fn conc(c: f64) -> Sample {
        Sample {
            concurrency: c,
            requests: 0.0,
        }
    }

    #[test]
    fn no_reports_is_no_data() {
        let (t0, c) = collector();
        assert_eq!(c.observe(t0, Metric::Concurrency), None);
        assert_eq!(c.observe(at(t0, 100.0), Metric::Rps), None);
    }

    #[test]
    fn steady_load_averages_to_itself() {
        let (t0, mut c) = collector();
        for s in 0..60 {
            c.record(at(t0, s as f64 + 0.5), conc(10.0));
        }
        let o = c.observe(at(t0, 59.9), Metric::Concurrency).unwrap();
        assert_eq!(
            o,
            Observed {
                stable: 10.0,
                panic: 10.0
            }
        );
    }

    #[test]
    fn a_young_window_averages_over_the_seconds_it_has() {
        let (t0, mut c) = collector();
        // 3 seconds at 10, then 3 at 20: the stable average is over 6 buckets, not 60.
        for s in 0..6 {
            c.record(at(t0, s as f64), conc(if s < 3 { 10.0 } else { 20.0 }));
        }
        let o = c.observe(at(t0, 5.0), Metric::Concurrency).unwrap();
        assert_eq!(o.stable, 15.0);
        assert_eq!(o.panic, 15.0);
    }

    #[test]
    fn reports_in_one_second_add_up() {
        let (t0, mut c) = collector();
        // Two pods and an activator, all in second 0.
        c.record(at(t0, 0.1), conc(5.0));
        c.record(at(t0, 0.4), conc(2.0));
        c.record(at(t0, 0.9), Sample::from_activator(3.0, 4.0));
        let o = c.observe(at(t0, 0.9), Metric::Concurrency).unwrap();
        assert_eq!(o.stable, 10.0);
        let rps = c.observe(at(t0, 0.9), Metric::Rps).unwrap();
        assert_eq!(rps.stable, 4.0);
    }

    #[test]
    fn old_load_falls_out_of_the_panic_window_first() {
        let (t0, mut c) = collector();
        for s in 0..60 {
            c.record(at(t0, s as f64), conc(10.0));
        }
        // Load stops; the pods keep reporting zeros for 6 seconds.
        for s in 60..66 {
            c.record(at(t0, s as f64), conc(0.0));
        }
        let o = c.observe(at(t0, 65.0), Metric::Concurrency).unwrap();
        assert_eq!(o.panic, 0.0);
        // Window (5, 65]: 54 seconds at 10 and 6 at 0.
        assert_eq!(o.stable, 9.0);
        // A stable window of zeros later the stable average is exactly 0.
        for s in 66..126 {
            c.record(at(t0, s as f64), conc(0.0));
        }
        let o = c.observe(at(t0, 125.0), Metric::Concurrency).unwrap();
        assert_eq!(
            o,
            Observed {
                stable: 0.0,
                panic: 0.0
            }
        );
    }

    #[test]
    fn silence_is_a_gap_not_zero() {
        let (t0, mut c) = collector();
        for s in 0..10 {
            c.record(at(t0, s as f64), conc(10.0));
        }
        // Nothing for 6 seconds: the panic window is past its last report, the stable window
        // still averages the seconds that had reports.
        let o = c.observe(at(t0, 15.0), Metric::Concurrency).unwrap();
        assert_eq!(
            o,
            Observed {
                stable: 10.0,
                panic: 0.0
            }
        );
        // Nothing for more than the stable window: no data.
        assert!(c.observe(at(t0, 69.0), Metric::Concurrency).is_some());
        assert_eq!(c.observe(at(t0, 70.0), Metric::Concurrency), None);
    }

    #[test]
    fn the_stable_average_slides_past_old_seconds() {
        let (t0, mut c) = collector();
        // 30 s at 10 then 40 s at 40: the window (10, 70] holds 20 s at 10 and 40 s at 40.
        for s in 0..70 {
            c.record(at(t0, s as f64), conc(if s < 30 { 10.0 } else { 40.0 }));
        }
        let o = c.observe(at(t0, 69.0), Metric::Concurrency).unwrap();
        assert_eq!(o.stable, (20.0 * 10.0 + 40.0 * 40.0) / 60.0);
        assert_eq!(o.panic, 40.0);
    }

    #[test]
    fn a_gap_of_a_whole_window_starts_over() {
        let (t0, mut c) = collector();
        for s in 0..60 {
            c.record(at(t0, s as f64), conc(100.0));
        }
        c.record(at(t0, 200.0), conc(4.0));
        let o = c.observe(at(t0, 200.0), Metric::Concurrency).unwrap();
        assert_eq!(
            o,
            Observed {
                stable: 4.0,
                panic: 4.0
            }
        );
    }

    #[test]
    fn late_reports_count_and_too_late_ones_are_dropped() {
        let (t0, mut c) = collector();
        for s in 0..100 {
            c.record(at(t0, s as f64), conc(1.0));
        }
        // A report for second 95 arriving after second 99's: still in both windows.
        c.record(at(t0, 95.0), conc(6.0));
        let o = c.observe(at(t0, 99.0), Metric::Concurrency).unwrap();
        assert_eq!(o.panic, 2.0); // (6 × 1 + 6) / 6
        assert_eq!(o.stable, 1.1); // (60 + 6) / 60
                                   // One for second 30 is older than the stable window: ignored.
        c.record(at(t0, 30.0), conc(600.0));
        assert_eq!(
            c.observe(at(t0, 99.0), Metric::Concurrency).unwrap().stable,
            1.1
        );
    }

    #[test]
    fn rps_is_requests_per_second_over_the_window() {
        let (t0, mut c) = collector();
        for s in 0..10 {
            let requests = if s % 2 == 0 { 4.0 } else { 2.0 };
            c.record(
                at(t0, s as f64),
                Sample {
                    concurrency: 0.5,
                    requests,
                },
            );
        }
        let o = c.observe(at(t0, 9.0), Metric::Rps).unwrap();
        assert_eq!(o.stable, 3.0);
        assert_eq!(o.panic, 3.0); // seconds 4..=9: 4,2,4,2,4,2
        assert_eq!(
            c.observe(at(t0, 9.0), Metric::Concurrency).unwrap().stable,
            0.5
        );
    }

    #[test]
    fn queue_proxy_reports_leave_out_what_the_activator_counted() {
        let s = Sample::from_queue_proxy(5.0, 2.0, 10.0, 4.0);
        assert_eq!(
            s,
            Sample {
                concurrency: 3.0,
                requests: 6.0
            }
        );
        let (t0, mut c) = collector();
        // A rounding error below zero, and garbage, count as nothing.
        c.record(t0, Sample::from_queue_proxy(1.0, 1.0000001, 0.0, 0.0));
        c.record(t0, conc(f64::NAN));
        assert_eq!(c.observe(t0, Metric::Concurrency).unwrap().stable, 0.0);
    }

    #[test]
    fn resizing_keeps_what_fits() {
        let (t0, mut c) = collector();
        for s in 0..60 {
            c.record(at(t0, s as f64), conc(s as f64));
        }
        c.resize(Duration::from_secs(10), Duration::from_secs(2));
        let o = c.observe(at(t0, 59.0), Metric::Concurrency).unwrap();
        assert_eq!(o.stable, (50..60).sum::<u64>() as f64 / 10.0);
        assert_eq!(o.panic, 58.5);
        // Growing back keeps the 10 s there is.
        c.resize(Duration::from_secs(60), Duration::from_secs(6));
        c.record(at(t0, 60.0), conc(60.0));
        let o = c.observe(at(t0, 60.0), Metric::Concurrency).unwrap();
        assert_eq!(o.stable, (50..=60).sum::<u64>() as f64 / 11.0);
        // The panic window kept seconds 58 and 59 when it shrank to 2 s.
        assert_eq!(o.panic, (58.0 + 59.0 + 60.0) / 3.0);
    }
}
