//! Graceful drain on SIGTERM: readiness fails at once (so the control plane and load balancers
//! take the activator out), requests — held ones too — are still served, and the drain is over
//! once no request has arrived for a quiet period (Knative: 30 s). The caller then stops
//! accepting and lets requests in flight finish.
//!
//! Time is `tokio::time`, so drains are tested on paused time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug)]
pub struct Drainer {
    quiet_period: Duration,
    epoch: Instant,
    /// Nanoseconds from `epoch` to the latest request (probes excluded).
    last_request: AtomicU64,
    /// When draining started.
    since: watch::Sender<Option<Instant>>,
}

impl Drainer {
    pub fn new(quiet_period: Duration) -> Arc<Drainer> {
        Arc::new(Drainer {
            quiet_period,
            epoch: Instant::now(),
            last_request: AtomicU64::new(0),
            since: watch::Sender::new(None),
        })
    }

    /// A request arrived; while draining, the quiet period starts again.
    pub fn request_seen(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_request.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Starts draining (idempotent: the quiet period counts from the first call).
    pub fn start(&self) {
        let started = self.since.send_if_modified(|since| {
            if since.is_some() {
                return false;
            }
            *since = Some(Instant::now());
            true
        });
        if started {
            tracing::info!(quiet_period = ?self.quiet_period, "draining: not ready from now on");
        }
    }

    pub fn is_draining(&self) -> bool {
        self.since.borrow().is_some()
    }

    fn last_request(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_request.load(Ordering::Relaxed))
    }

    /// Resolves once draining has started and no request has arrived for the quiet period.
    pub async fn drained(&self) {
        let mut since_rx = self.since.subscribe();
        let since = since_rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|s| *s);
        let Some(since) = since else {
            // The sender lives in `self`, so this cannot happen; wait forever rather than end.
            return std::future::pending().await;
        };
        loop {
            let quiet_until = since.max(self.last_request()) + self.quiet_period;
            if Instant::now() >= quiet_until {
                return;
            }
            // Requests only push the deadline later: waking at the current one and looking
            // again is enough, with no per-request wake-ups.
            tokio::time::sleep_until(quiet_until).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{sleep, sleep_until};

    const QUIET: Duration = Duration::from_millis(100);

    fn drained_at(drainer: &Arc<Drainer>) -> tokio::task::JoinHandle<Instant> {
        let drainer = Arc::clone(drainer);
        tokio::spawn(async move {
            drainer.drained().await;
            Instant::now()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_start_then_a_quiet_period() {
        let drainer = Drainer::new(QUIET);
        let done = drained_at(&drainer);
        sleep(Duration::from_secs(5)).await;
        assert!(!done.is_finished());
        assert!(!drainer.is_draining());
        let t0 = Instant::now();
        drainer.start();
        drainer.start();
        assert!(drainer.is_draining());
        assert_eq!(done.await.unwrap() - t0, QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_push_the_end_out() {
        let drainer = Drainer::new(QUIET);
        drainer.request_seen(); // before the drain: does not count
        let t0 = Instant::now();
        drainer.start();
        let done = drained_at(&drainer);
        for i in 1..=3 {
            sleep_until(t0 + Duration::from_millis(70) * i).await;
            drainer.request_seen();
        }
        assert_eq!(done.await.unwrap() - t0, Duration::from_millis(310));
    }
}
