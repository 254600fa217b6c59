//! Load the activator reports to the autoscaler, per revision.
//!
//! Each revision's `Window` integrates the requests it has in flight (held *and* proxied) over
//! time, as the queue-proxy does for a pod, so a report carries the time-weighted average
//! concurrency of the period and the requests that arrived in it. Every [`REPORTING_PERIOD`] the
//! reporter closes every revision's window and sends one [`RevisionStats`] per revision that had
//! requests or in-flight requests; a request for a revision with no ready pod also sends a
//! `poke` at once (see `Throttler::arrive`). Both go down the channel from [`stats_channel`]; the
//! control-plane client streams them to the autoscaler.
//!
//! Times are [`tokio::time::Instant`], so windows are tested on paused time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use knarr_proto::activator::RevisionStats;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::revisions::Revisions;

/// How often stats are sent (Knative: 1 s).
pub const REPORTING_PERIOD: Duration = Duration::from_secs(1);
/// At most one poke per revision this often, however many requests arrive.
pub const POKE_INTERVAL: Duration = Duration::from_millis(100);
/// Room in the stats channel; beyond it stats are dropped (and counted), never waited for.
pub const STATS_CHANNEL_CAPACITY: usize = 4096;

/// The channel the activator sends [`RevisionStats`] into: give the sender to
/// [`Running::start`](crate::app::Running::start), stream the receiver to the autoscaler.
pub fn stats_channel() -> (mpsc::Sender<RevisionStats>, mpsc::Receiver<RevisionStats>) {
    mpsc::channel(STATS_CHANNEL_CAPACITY)
}

/// A revision's load over one reporting period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Load {
    pub average_concurrency: f64,
    pub requests: u64,
}

/// The reporting period being accumulated for one revision.
#[derive(Debug)]
pub(crate) struct Window {
    start: Instant,
    last_change: Instant,
    in_flight: u64,
    /// ∑ in_flight × nanoseconds; integer, so hand-computed tests are exact.
    concurrency_nanos: u128,
    requests: u64,
}

impl Window {
    pub fn new(now: Instant) -> Window {
        Window {
            start: now,
            last_change: now,
            in_flight: 0,
            concurrency_nanos: 0,
            requests: 0,
        }
    }

    /// Counts the time since the last change at the current concurrency. A `now` before the last
    /// change (threads racing with their own clocks) counts as no time.
    fn advance(&mut self, now: Instant) {
        if now > self.last_change {
            let nanos = (now - self.last_change).as_nanos();
            self.concurrency_nanos += nanos * u128::from(self.in_flight);
            self.last_change = now;
        }
    }

    pub fn arrive(&mut self, now: Instant) {
        self.advance(now);
        self.in_flight += 1;
        self.requests += 1;
    }

    pub fn depart(&mut self, now: Instant) {
        self.advance(now);
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Closes the window at `now` and opens the next. `None` if nothing happened in it (no
    /// arrival, nothing in flight): idle revisions are not reported.
    pub fn close(&mut self, now: Instant) -> Option<Load> {
        let now = now.max(self.last_change);
        self.advance(now);
        let nanos = (now - self.start).as_nanos();
        let load = if self.requests == 0 && self.concurrency_nanos == 0 && self.in_flight == 0 {
            None
        } else {
            Some(Load {
                // A zero-length window reports the current concurrency (the limit as it shrinks).
                average_concurrency: if nanos == 0 {
                    self.in_flight as f64
                } else {
                    self.concurrency_nanos as f64 / nanos as f64
                },
                requests: self.requests,
            })
        };
        self.start = now;
        self.concurrency_nanos = 0;
        self.requests = 0;
        load
    }
}

pub(crate) fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Sends without waiting: a slow consumer costs stats (counted), never request latency.
pub(crate) fn offer(
    tx: &mpsc::Sender<RevisionStats>,
    stat: RevisionStats,
    dropped: &prometheus_client::metrics::counter::Counter,
) {
    match tx.try_send(stat) {
        Ok(()) => {}
        Err(TrySendError::Full(stat)) => {
            dropped.inc();
            tracing::debug!(revision = %stat.revision, poke = stat.poke, "stats channel full; dropped");
        }
        // Nobody streams stats (no control plane): nothing to do.
        Err(TrySendError::Closed(_)) => {}
    }
}

/// Every `period`, closes every revision's window and sends the non-idle ones.
pub(crate) fn spawn_reporter(revisions: Revisions, period: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        // After a stall, one report over the longer window rather than a burst of empty ones.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            revisions.report(Instant::now(), unix_millis(SystemTime::now()));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn idle_windows_are_not_reported() {
        let mut w = Window::new(Instant::now());
        advance(1000 * MS).await;
        assert_eq!(w.close(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn time_weighted_concurrency() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        // One request for the whole second, another for the last 250 ms, a third arrives and
        // leaves at once.
        w.arrive(t0);
        w.arrive(t0 + 750 * MS);
        w.arrive(t0 + 800 * MS);
        w.depart(t0 + 800 * MS);
        let load = w.close(t0 + 1000 * MS).unwrap();
        assert_eq!(load.requests, 3);
        assert!((load.average_concurrency - 1.25).abs() < 1e-9, "{load:?}");

        // Still two in flight: the next window reports them though nothing arrived.
        let load = w.close(t0 + 2000 * MS).unwrap();
        assert_eq!(load.requests, 0);
        assert!((load.average_concurrency - 2.0).abs() < 1e-9, "{load:?}");

        // Both leave half-way: reported once more, then idle.
        w.depart(t0 + 2500 * MS);
        w.depart(t0 + 2500 * MS);
        let load = w.close(t0 + 3000 * MS).unwrap();
        assert!((load.average_concurrency - 1.0).abs() < 1e-9, "{load:?}");
        assert_eq!(w.close(t0 + 4000 * MS), None);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_length_window_reports_current_concurrency() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        w.arrive(t0);
        let load = w.close(t0).unwrap();
        assert_eq!(load.average_concurrency, 1.0);
        assert_eq!(w.in_flight(), 1);
    }
}
