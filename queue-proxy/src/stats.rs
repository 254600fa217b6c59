//! The per-pod load report the KPA autoscaler scrapes from `:9090/metrics`.
//!
//! [`Stats`] integrates the number of requests in flight over time (Knative's
//! `network.RequestStats`): every arrival and departure first adds `in_flight × elapsed` to the
//! current window, so [`Stats::report`] can return the time-weighted average concurrency for the
//! window it closes. Requests that came through the activator are tracked separately ("proxied").
//! [`Reporter`] closes a window every period (1 s), keeps the latest [`Stat`] (also
//! protobuf-encoded) for the `/metrics` handler, and feeds the Prometheus gauges people read on
//! `:9091`.
//!
//! All times are [`tokio::time::Instant`], so tests run on paused time with hand-computed numbers.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use knarr_proto::Stat;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Request counts and time-weighted concurrency for one pod. Cheap to share behind an `Arc`.
pub struct Stats {
    inner: Arc<Inner>,
}

struct Inner {
    pod_name: String,
    started: Instant,
    window: Mutex<Window>,
    metrics: Metrics,
}

/// Prometheus metrics ("metrics for humans"). Each is an `Arc`'d atomic, so the copies handed to
/// a registry stay live.
#[derive(Default)]
struct Metrics {
    requests_total: Counter,
    proxied_requests_total: Counter,
    in_flight: Gauge,
    average_concurrency: Gauge<f64, AtomicU64>,
    average_proxied_concurrency: Gauge<f64, AtomicU64>,
    requests_per_second: Gauge<f64, AtomicU64>,
    proxied_requests_per_second: Gauge<f64, AtomicU64>,
}

/// The reporting window being accumulated.
#[derive(Debug)]
struct Window {
    start: Instant,
    /// When the in-flight counts last changed (or the window last advanced).
    last_change: Instant,
    in_flight: u64,
    proxied_in_flight: u64,
    /// ∑ in_flight × nanoseconds over the window so far; integer so hand-computed tests are exact.
    concurrency_nanos: u128,
    proxied_concurrency_nanos: u128,
    /// Arrivals in the window.
    requests: u64,
    proxied_requests: u64,
}

impl Window {
    /// Accounts for the time since the last change at the current counts. A `now` earlier than
    /// the last change (two threads racing with their own `Instant::now()`) counts as no time.
    fn advance(&mut self, now: Instant) {
        if now > self.last_change {
            let nanos = (now - self.last_change).as_nanos();
            self.concurrency_nanos += nanos * u128::from(self.in_flight);
            self.proxied_concurrency_nanos += nanos * u128::from(self.proxied_in_flight);
            self.last_change = now;
        }
    }
}

impl Stats {
    /// Stats for `pod_name`; `started` is when the process started (for `process_uptime`) and
    /// also opens the first reporting window, as in Knative.
    pub fn new(pod_name: String, started: Instant) -> Stats {
        Stats {
            inner: Arc::new(Inner {
                pod_name,
                started,
                window: Mutex::new(Window {
                    start: started,
                    last_change: started,
                    in_flight: 0,
                    proxied_in_flight: 0,
                    concurrency_nanos: 0,
                    proxied_concurrency_nanos: 0,
                    requests: 0,
                    proxied_requests: 0,
                }),
                metrics: Metrics::default(),
            }),
        }
    }

    /// A request arrived; it is in flight until the returned guard is dropped (including when the
    /// client disconnects and the handler future is dropped). Probes must not be counted: callers
    /// don't call this for them. `proxied`: it came through the activator
    /// (`K-Proxy-Request: activator`).
    pub fn request(&self, proxied: bool) -> InFlight {
        let now = Instant::now();
        {
            let mut w = self.inner.lock();
            w.advance(now);
            w.in_flight += 1;
            w.requests += 1;
            if proxied {
                w.proxied_in_flight += 1;
                w.proxied_requests += 1;
            }
            self.inner.metrics.in_flight.set(gauge_value(w.in_flight));
        }
        self.inner.metrics.requests_total.inc();
        if proxied {
            self.inner.metrics.proxied_requests_total.inc();
        }
        InFlight {
            inner: Arc::clone(&self.inner),
            proxied,
        }
    }

    /// Closes the current window at `now`, opens the next one, and returns the window's `Stat`:
    /// time-weighted average (proxied) concurrency, (proxied) requests that *arrived* in the
    /// window, seconds since `started`, wall-clock timestamp (unix ns) and pod name.
    ///
    /// A zero-length window (two reports at the same instant) reports the current concurrency,
    /// the limit of the average as the window shrinks.
    pub fn report(&self, now: Instant) -> Stat {
        let mut w = self.inner.lock();
        let now = now.max(w.last_change);
        w.advance(now);
        let window_nanos = (now - w.start).as_nanos();
        let (average, proxied_average) = if window_nanos == 0 {
            (w.in_flight as f64, w.proxied_in_flight as f64)
        } else {
            (
                w.concurrency_nanos as f64 / window_nanos as f64,
                w.proxied_concurrency_nanos as f64 / window_nanos as f64,
            )
        };
        let (requests, proxied_requests) = (w.requests, w.proxied_requests);
        w.start = now;
        w.concurrency_nanos = 0;
        w.proxied_concurrency_nanos = 0;
        w.requests = 0;
        w.proxied_requests = 0;
        drop(w);

        Stat {
            pod_name: self.inner.pod_name.clone(),
            average_concurrent_requests: average,
            average_proxied_concurrent_requests: proxied_average,
            request_count: requests as f64,
            proxied_request_count: proxied_requests as f64,
            process_uptime: now
                .saturating_duration_since(self.inner.started)
                .as_secs_f64(),
            timestamp: unix_nanos(SystemTime::now()),
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u64 {
        self.inner.lock().in_flight
    }

    /// Requests in flight now that came through the activator.
    pub fn proxied_in_flight(&self) -> u64 {
        self.inner.lock().proxied_in_flight
    }

    /// Requests counted since start.
    pub fn total_requests(&self) -> u64 {
        self.inner.metrics.requests_total.get()
    }

    /// Requests counted since start that came through the activator.
    pub fn total_proxied_requests(&self) -> u64 {
        self.inner.metrics.proxied_requests_total.get()
    }

    pub fn pod_name(&self) -> &str {
        &self.inner.pod_name
    }

    /// Registers the Prometheus metrics for people (`:9091/metrics`): counters
    /// `queue_requests_total`, `queue_proxied_requests_total`; gauge `queue_in_flight_requests`;
    /// and, updated by the [`Reporter`] each period, `queue_average_concurrent_requests`,
    /// `queue_average_proxied_concurrent_requests`, `queue_requests_per_second` and
    /// `queue_proxied_operations_per_second` (Knative's names). Use a sub-registry to add labels.
    pub fn register(&self, registry: &mut Registry) {
        let m = &self.inner.metrics;
        // prometheus-client appends `_total` to counters.
        registry.register(
            "queue_requests",
            "Requests received (excluding probes)",
            m.requests_total.clone(),
        );
        registry.register(
            "queue_proxied_requests",
            "Requests received through the activator",
            m.proxied_requests_total.clone(),
        );
        registry.register(
            "queue_in_flight_requests",
            "Requests currently in flight",
            m.in_flight.clone(),
        );
        registry.register(
            "queue_average_concurrent_requests",
            "Time-weighted average concurrency over the last reporting period",
            m.average_concurrency.clone(),
        );
        registry.register(
            "queue_average_proxied_concurrent_requests",
            "Time-weighted average concurrency of activator-proxied requests over the last reporting period",
            m.average_proxied_concurrency.clone(),
        );
        registry.register(
            "queue_requests_per_second",
            "Requests per second over the last reporting period",
            m.requests_per_second.clone(),
        );
        registry.register(
            "queue_proxied_operations_per_second",
            "Activator-proxied requests per second over the last reporting period",
            m.proxied_requests_per_second.clone(),
        );
    }

    /// Publishes a reported `Stat` (with per-second counts) to the Prometheus gauges.
    fn publish(&self, stat: &Stat) {
        let m = &self.inner.metrics;
        m.average_concurrency.set(stat.average_concurrent_requests);
        m.average_proxied_concurrency
            .set(stat.average_proxied_concurrent_requests);
        m.requests_per_second.set(stat.request_count);
        m.proxied_requests_per_second
            .set(stat.proxied_request_count);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Window> {
        // Nothing panics while holding the lock, but a poisoned window is still a valid window.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stats")
            .field("pod_name", &self.inner.pod_name)
            .field("window", &*self.inner.lock())
            .finish()
    }
}

/// A request in flight; it finishes when this is dropped. `'static`, so it can travel with a
/// streaming response body.
pub struct InFlight {
    inner: Arc<Inner>,
    proxied: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut w = self.inner.lock();
        w.advance(now);
        w.in_flight = w.in_flight.saturating_sub(1);
        if self.proxied {
            w.proxied_in_flight = w.proxied_in_flight.saturating_sub(1);
        }
        self.inner.metrics.in_flight.set(gauge_value(w.in_flight));
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("proxied", &self.proxied)
            .finish()
    }
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Closes a [`Stats`] window every period and keeps the latest [`Stat`] for the autoscaler's
/// `GET :9090/metrics`. The background task stops when the `Reporter` is dropped or on
/// [`Reporter::stop`].
pub struct Reporter {
    latest: Arc<Mutex<Latest>>,
    task: AbortHandle,
}

struct Latest {
    stat: Stat,
    encoded: Bytes,
}

impl Reporter {
    /// Spawns the reporting task on the current tokio runtime; the first report is one `period`
    /// from now. As Knative's `ProtobufStatsReporter`, the reported `request_count` and
    /// `proxied_request_count` are per second (window count ÷ `period`), the same thing with
    /// Knative's 1 s period.
    ///
    /// # Panics
    /// If `period` is zero, or when called outside a tokio runtime.
    pub fn spawn(stats: Arc<Stats>, period: Duration) -> Arc<Reporter> {
        assert!(!period.is_zero(), "stats reporting period must be positive");
        let initial = Stat {
            pod_name: stats.inner.pod_name.clone(),
            ..Stat::default()
        };
        let latest = Arc::new(Mutex::new(Latest {
            encoded: Bytes::from(initial.encode_to_vec()),
            stat: initial,
        }));
        let task = tokio::spawn(report_every(stats, period, Arc::clone(&latest)));
        Arc::new(Reporter {
            latest,
            task: task.abort_handle(),
        })
    }

    /// The latest report; before the first one, a default `Stat` carrying the pod name.
    pub fn latest(&self) -> Stat {
        self.lock().stat.clone()
    }

    /// Protobuf encoding of [`Reporter::latest`], served as `Content-Type: application/protobuf`.
    pub fn latest_encoded(&self) -> Bytes {
        self.lock().encoded.clone()
    }

    /// Stops reporting; [`Reporter::latest`] keeps returning the last report.
    pub fn stop(&self) {
        self.task.abort();
    }

    fn lock(&self) -> MutexGuard<'_, Latest> {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reporter")
            .field("latest", &self.lock().stat)
            .finish()
    }
}

async fn report_every(stats: Arc<Stats>, period: Duration, latest: Arc<Mutex<Latest>>) {
    let per_second = period.as_secs_f64();
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    // After a stall, report once (over the longer window) rather than a burst of empty windows.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut stat = stats.report(Instant::now());
        stat.request_count /= per_second;
        stat.proxied_request_count /= per_second;
        stats.publish(&stat);
        let encoded = Bytes::from(stat.encode_to_vec());
        *latest.lock().unwrap_or_else(PoisonError::into_inner) = Latest { stat, encoded };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{advance, sleep};

    const MS: Duration = Duration::from_millis(1);

    fn stats() -> Stats {
        Stats::new("pod-1".into(), Instant::now())
    }

    #[test]
    fn types_are_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Stats>();
        check::<InFlight>();
        check::<Reporter>();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_window_reports_zeros() {
        let s = stats();
        advance(1000 * MS).await;
        let stat = s.report(Instant::now());
        assert_eq!(stat.pod_name, "pod-1");
        assert_eq!(stat.average_concurrent_requests, 0.0);
        assert_eq!(stat.average_proxied_concurrent_requests, 0.0);
        assert_eq!(stat.request_count, 0.0);
        assert_eq!(stat.proxied_request_count, 0.0);
        assert_eq!(stat.process_uptime, 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn two_requests_for_half_the_window_average_one() {
        let s = stats();
        let a = s.request(false);
        let b = s.request(false);
        advance(500 * MS).await;
        drop((a, b));
        advance(500 * MS).await;
        let stat = s.report(Instant::now());
        assert_eq!(stat.average_concurrent_requests, 1.0);
        assert_eq!(stat.average_proxied_concurrent_requests, 0.0);
        assert_eq!(stat.request_count, 2.0);
        assert_eq!(stat.proxied_request_count, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn proxied_request_for_the_whole_window() {
        let s = stats();
        let r = s.request(true);
        assert_eq!((s.in_flight(), s.proxied_in_flight()), (1, 1));
        advance(1000 * MS).await;
        let stat = s.report(Instant::now());
        assert_eq!(stat.average_concurrent_requests, 1.0);
        assert_eq!(stat.average_proxied_concurrent_requests, 1.0);
        assert_eq!(stat.request_count, 1.0);
        assert_eq!(stat.proxied_request_count, 1.0);
        drop(r);
        assert_eq!((s.in_flight(), s.proxied_in_flight()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn staggered_mix_is_time_weighted() {
        // t=0..1000 ms: A (direct) 0–1000, B (proxied) 250–750, C (direct) 500–600.
        // ∫concurrency = 1000 + 500 + 100 = 1600 ms → 1.6; proxied 500 ms → 0.5.
        let s = stats();
        let a = s.request(false);
        advance(250 * MS).await;
        let b = s.request(true);
        advance(250 * MS).await;
        let c = s.request(false);
        assert_eq!(s.in_flight(), 3);
        advance(100 * MS).await;
        drop(c);
        advance(150 * MS).await;
        drop(b);
        advance(250 * MS).await;
        let stat = s.report(Instant::now());
        assert!((stat.average_concurrent_requests - 1.6).abs() < 1e-12);
        assert_eq!(stat.average_proxied_concurrent_requests, 0.5);
        assert_eq!(stat.request_count, 3.0);
        assert_eq!(stat.proxied_request_count, 1.0);
        drop(a);
        assert_eq!(s.total_requests(), 3);
        assert_eq!(s.total_proxied_requests(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn request_spanning_windows_counts_in_each_for_its_time_there() {
        let s = stats();
        advance(500 * MS).await;
        let r = s.request(true); // arrives at 0.5 s in window 1
        advance(500 * MS).await;
        let w1 = s.report(Instant::now());
        advance(500 * MS).await;
        drop(r); // leaves at 0.5 s in window 2
        advance(500 * MS).await;
        let w2 = s.report(Instant::now());
        advance(1000 * MS).await;
        let w3 = s.report(Instant::now());

        assert_eq!(w1.average_concurrent_requests, 0.5);
        assert_eq!(w1.average_proxied_concurrent_requests, 0.5);
        assert_eq!(w1.request_count, 1.0, "counted where it arrived");
        assert_eq!(w2.average_concurrent_requests, 0.5);
        assert_eq!(w2.average_proxied_concurrent_requests, 0.5);
        assert_eq!(w2.request_count, 0.0);
        assert_eq!(w2.proxied_request_count, 0.0);
        assert_eq!(w3.average_concurrent_requests, 0.0);
        assert_eq!(w3.process_uptime, 3.0);
    }

    #[tokio::test(start_paused = true)]
    async fn long_request_spans_many_windows() {
        let s = stats();
        let _r = s.request(false);
        for _ in 0..5 {
            advance(1000 * MS).await;
            let stat = s.report(Instant::now());
            assert_eq!(stat.average_concurrent_requests, 1.0);
        }
        assert_eq!(s.total_requests(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn client_disconnect_mid_request_ends_it() {
        let s = Arc::new(stats());
        let handler = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let _in_flight = s.request(false);
                sleep(Duration::from_secs(60)).await; // the upstream is slow
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(s.in_flight(), 1);
        sleep(250 * MS).await;
        handler.abort(); // hyper drops the handler future when the client goes away
        assert!(handler.await.unwrap_err().is_cancelled());
        assert_eq!(s.in_flight(), 0);
        sleep(750 * MS).await;
        let stat = s.report(Instant::now());
        assert_eq!(stat.average_concurrent_requests, 0.25);
        assert_eq!(stat.request_count, 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_length_window_reports_current_concurrency() {
        let s = stats();
        let _a = s.request(false);
        let _b = s.request(true);
        let stat = s.report(Instant::now());
        assert_eq!(stat.average_concurrent_requests, 2.0);
        assert_eq!(stat.average_proxied_concurrent_requests, 1.0);
        assert_eq!(stat.request_count, 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn report_at_an_earlier_instant_is_harmless() {
        let start = Instant::now();
        let s = stats();
        advance(500 * MS).await;
        let r = s.request(false);
        advance(500 * MS).await;
        let stale = s.report(start); // before the last change: treated as "now"
        assert_eq!(stale.request_count, 1.0);
        assert!(stale.average_concurrent_requests.is_finite());
        drop(r);
        advance(1000 * MS).await;
        let next = s.report(Instant::now());
        assert!(next.average_concurrent_requests >= 0.0);
        assert_eq!(s.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn uptime_and_timestamp() {
        let started = Instant::now();
        advance(Duration::from_secs(3)).await;
        let s = Stats::new("p".into(), started);
        let before = unix_nanos(SystemTime::now());
        let stat = s.report(started + Duration::from_millis(4500));
        let after = unix_nanos(SystemTime::now());
        assert_eq!(stat.process_uptime, 4.5);
        // Wall clock, not the paused tokio clock.
        assert!(before <= stat.timestamp && stat.timestamp <= after);
        assert!(stat.timestamp > 1_600_000_000 * 1_000_000_000);
    }

    #[tokio::test(start_paused = true)]
    async fn prometheus_metrics() {
        use prometheus_client::encoding::text::encode;
        let s = Arc::new(stats());
        let mut registry = Registry::default();
        s.register(&mut registry);
        let _a = s.request(false);
        let _b = s.request(true);
        let c = s.request(false);
        drop(c);
        let reporter = Reporter::spawn(Arc::clone(&s), Duration::from_secs(1));
        sleep(1500 * MS).await;
        assert_eq!(reporter.latest().request_count, 3.0);

        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "queue_requests_total 3\n",
            "queue_proxied_requests_total 1\n",
            "queue_in_flight_requests 2\n",
            "queue_average_concurrent_requests 2.0\n",
            "queue_average_proxied_concurrent_requests 1.0\n",
            "queue_requests_per_second 3.0\n",
            "queue_proxied_operations_per_second 1.0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reporter_keeps_the_latest_stat() {
        let s = Arc::new(stats());
        let reporter = Reporter::spawn(Arc::clone(&s), Duration::from_secs(1));
        let before = reporter.latest();
        assert_eq!(
            before,
            Stat {
                pod_name: "pod-1".into(),
                ..Stat::default()
            }
        );
        assert_eq!(Stat::decode(reporter.latest_encoded()).unwrap(), before);

        // Window 1 (0–1 s): two requests for 0.5 s.
        let a = s.request(false);
        let b = s.request(true);
        sleep(500 * MS).await;
        drop((a, b));
        sleep(600 * MS).await; // t = 1.1 s: first report done at 1 s
        let first = reporter.latest();
        assert_eq!(first.average_concurrent_requests, 1.0);
        assert_eq!(first.average_proxied_concurrent_requests, 0.5);
        assert_eq!(first.request_count, 2.0);
        assert_eq!(first.proxied_request_count, 1.0);
        assert_eq!(first.process_uptime, 1.0);
        assert_eq!(Stat::decode(reporter.latest_encoded()).unwrap(), first);

        // Window 2 (1–2 s): idle.
        sleep(1000 * MS).await;
        let second = reporter.latest();
        assert_eq!(second.average_concurrent_requests, 0.0);
        assert_eq!(second.request_count, 0.0);
        assert_eq!(second.process_uptime, 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn reporter_counts_per_second_for_longer_periods() {
        let s = Arc::new(stats());
        let reporter = Reporter::spawn(Arc::clone(&s), Duration::from_secs(2));
        for _ in 0..4 {
            drop(s.request(false));
        }
        let r = s.request(false);
        sleep(Duration::from_secs(1)).await;
        drop(r);
        sleep(Duration::from_millis(1100)).await;
        let stat = reporter.latest();
        assert_eq!(stat.request_count, 2.5, "5 requests over 2 s");
        assert_eq!(stat.average_concurrent_requests, 0.5);
    }

    #[tokio::test(start_paused = true)]
    async fn reporter_stops_when_dropped_or_stopped() {
        let s = Arc::new(stats());
        let reporter = Reporter::spawn(Arc::clone(&s), Duration::from_secs(1));
        assert_eq!(Arc::strong_count(&s), 2);
        drop(reporter);
        tokio::task::yield_now().await;
        assert_eq!(Arc::strong_count(&s), 1, "the task released its Stats");

        let reporter = Reporter::spawn(Arc::clone(&s), Duration::from_secs(1));
        let _r = s.request(false);
        sleep(1100 * MS).await;
        let last = reporter.latest();
        assert_eq!(last.request_count, 1.0);
        reporter.stop();
        sleep(Duration::from_secs(3)).await;
        assert_eq!(reporter.latest(), last, "no reports after stop");
        assert_eq!(Arc::strong_count(&s), 1);
    }
}
