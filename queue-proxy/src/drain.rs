//! Graceful drain: on SIGTERM or the user container's preStop hook (`GET :8022/wait-for-drain`),
//! probes start failing at once (so the endpoint is taken out of rotation) while requests are
//! still served, until no request has arrived for a quiet period (Knative: 30 s).
//!
//! Time is `tokio::time`, so drains can be tested with paused time.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;

/// Knative's quiet period (`drainSleepDuration`).
pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_secs(30);

/// A drain begun by `/wait-for-drain` alone is cancelled unless SIGTERM ([`Drainer::start`])
/// follows within this window. The preStop hook also runs when only the user container restarts
/// (a failed liveness probe); the queue-proxy then gets no SIGTERM, and a drain that never ended
/// would leave the pod unready for good. On pod deletion both containers are told at once.
/// Knative does the same (its drainer's `Reset` one second after `/wait-for-drain`).
pub const PRESTOP_CONFIRM_WINDOW: Duration = Duration::from_secs(1);

/// The admin port's drain endpoint, called by the user container's preStop hook.
pub const WAIT_FOR_DRAIN_PATH: &str = "/wait-for-drain";

/// Whether and since when we are draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Phase {
    since: Option<Instant>,
    /// SIGTERM seen: the drain is final.
    confirmed: bool,
}

impl Phase {
    /// When an unconfirmed (preStop-only) drain lapses.
    fn lapses_at(&self) -> Option<Instant> {
        match self.since {
            Some(since) if !self.confirmed => Some(since + PRESTOP_CONFIRM_WINDOW),
            _ => None,
        }
    }

    fn is_draining_at(&self, now: Instant) -> bool {
        self.since.is_some() && self.lapses_at().is_none_or(|lapse| now < lapse)
    }
}

/// How a `/wait-for-drain` call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreStop {
    Drained,
    /// No SIGTERM followed: only the user container is restarting.
    Lapsed,
}

/// Tracks traffic and the drain; shared by the serving path, the signal handler and the admin
/// port.
#[derive(Debug)]
pub struct Drainer {
    quiet_period: Duration,
    epoch: Instant,
    /// Nanoseconds from `epoch` to the latest non-probe request.
    last_request: AtomicU64,
    phase: watch::Sender<Phase>,
}

impl Drainer {
    /// `quiet_period`: how long no request must arrive, once draining, before shutdown.
    pub fn new(quiet_period: Duration) -> Arc<Drainer> {
        Arc::new(Drainer {
            quiet_period,
            epoch: Instant::now(),
            last_request: AtomicU64::new(0),
            phase: watch::Sender::new(Phase::default()),
        })
    }

    pub fn quiet_period(&self) -> Duration {
        self.quiet_period
    }

    /// Call on every request that is not a probe: while draining, it restarts the quiet period.
    pub fn request_seen(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_request.fetch_max(nanos, Ordering::Relaxed);
    }

    /// SIGTERM: probes fail from now on, for good. Idempotent; the quiet period counts from the
    /// first start (a preStop drain already under way included).
    pub fn start(&self) {
        let now = Instant::now();
        let changed = self.phase.send_if_modified(|phase| {
            let before = *phase;
            if !phase.is_draining_at(now) {
                phase.since = Some(now);
            }
            phase.confirmed = true;
            *phase != before
        });
        if changed {
            tracing::info!(quiet_period = ?self.quiet_period, "draining: probes fail from now on");
        }
    }

    /// The preStop hook: drain, but lapse unless [`start`](Self::start) follows within
    /// [`PRESTOP_CONFIRM_WINDOW`].
    fn start_prestop(&self) {
        let now = Instant::now();
        let changed = self.phase.send_if_modified(|phase| {
            if phase.is_draining_at(now) {
                return false;
            }
            *phase = Phase {
                since: Some(now),
                confirmed: false,
            };
            true
        });
        if changed {
            tracing::info!(
                quiet_period = ?self.quiet_period,
                "draining for the preStop hook: probes fail from now on"
            );
        }
    }

    pub fn is_draining(&self) -> bool {
        self.phase.borrow().is_draining_at(Instant::now())
    }

    fn last_request(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_request.load(Ordering::Relaxed))
    }

    /// Resolves once draining has started and no request has been seen for the quiet period.
    pub async fn drained(&self) {
        let mut phase_rx = self.phase.subscribe();
        loop {
            let phase = *phase_rx.borrow_and_update();
            let now = Instant::now();
            let wake = match phase.since {
                Some(since) if phase.is_draining_at(now) => {
                    let quiet_until = since.max(self.last_request()) + self.quiet_period;
                    if now >= quiet_until {
                        return;
                    }
                    // Requests only ever push the deadline later, so waking at the current one
                    // and looking again is enough; no per-request wake-ups.
                    Some(
                        phase
                            .lapses_at()
                            .map_or(quiet_until, |lapse| lapse.min(quiet_until)),
                    )
                }
                _ => None,
            };
            // The sender lives in `self`: `changed` cannot fail while we are borrowed.
            match wake {
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    _ = phase_rx.changed() => {}
                },
                None => {
                    let _ = phase_rx.changed().await;
                }
            }
        }
    }

    /// Resolves when the preStop drain lapses; never once SIGTERM confirmed it.
    async fn prestop_lapsed(&self) {
        let mut phase_rx = self.phase.subscribe();
        loop {
            let phase = *phase_rx.borrow_and_update();
            let Some(lapse) = phase.lapses_at() else {
                if phase.confirmed {
                    std::future::pending::<()>().await;
                }
                return;
            };
            if Instant::now() >= lapse {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(lapse) => {}
                _ = phase_rx.changed() => {}
            }
        }
    }

    /// `/wait-for-drain`: starts a preStop drain and waits for it to finish or lapse.
    async fn wait_for_drain(&self) -> PreStop {
        self.start_prestop();
        tokio::select! {
            biased;
            () = self.drained() => PreStop::Drained,
            () = self.prestop_lapsed() => PreStop::Lapsed,
        }
    }
}

/// The admin port (8022), one request at a time (any method).
///
/// - `/wait-for-drain` (the preStop hook): starts draining and answers 200 once drained. If no
///   SIGTERM follows within [`PRESTOP_CONFIRM_WINDOW`], only the user container is restarting:
///   the drain is cancelled and the answer is 200 at once, so the restart is not held up.
/// - `/healthz`: 200.
/// - anything else: 404.
pub fn admin_response<'a>(
    path: &str,
    drainer: &'a Drainer,
) -> impl Future<Output = Response<Bytes>> + Send + 'a {
    let route = match path {
        WAIT_FOR_DRAIN_PATH => Some(true),
        "/healthz" => Some(false),
        _ => None,
    };
    async move {
        match route {
            Some(true) => match drainer.wait_for_drain().await {
                PreStop::Drained => text(StatusCode::OK, "drained"),
                PreStop::Lapsed => {
                    tracing::info!("no SIGTERM after the preStop hook: drain cancelled");
                    text(
                        StatusCode::OK,
                        "drain cancelled: no SIGTERM followed (user container restart)",
                    )
                }
            },
            Some(false) => text(StatusCode::OK, "ok"),
            None => text(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from_static(body.as_bytes()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use tokio::time::{sleep, sleep_until};

    use super::*;

    const QUIET: Duration = Duration::from_millis(100);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs `drained()` in a task; yields the instant it resolved.
    fn drained_at(drainer: &Arc<Drainer>) -> tokio::task::JoinHandle<Instant> {
        let drainer = Arc::clone(drainer);
        tokio::spawn(async move {
            drainer.drained().await;
            Instant::now()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn drained_one_quiet_period_after_start() {
        let drainer = Drainer::new(QUIET);
        assert!(!drainer.is_draining());
        let t0 = Instant::now();
        drainer.start();
        assert!(drainer.is_draining());
        assert_eq!(drained_at(&drainer).await.unwrap() - t0, QUIET);
        assert!(drainer.is_draining(), "draining is final");
        // Resolves at once from then on.
        assert_eq!(drained_at(&drainer).await.unwrap() - t0, QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_keep_pushing_the_deadline() {
        let drainer = Drainer::new(QUIET);
        let t0 = Instant::now();
        drainer.start();
        let done = drained_at(&drainer);
        for i in 1..=5 {
            sleep_until(t0 + ms(60) * i).await;
            drainer.request_seen();
        }
        // Last request at 300 ms.
        assert_eq!(done.await.unwrap() - t0, ms(400));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_before_the_drain_do_not_count() {
        let drainer = Drainer::new(QUIET);
        drainer.request_seen();
        sleep(ms(90)).await;
        let t0 = Instant::now();
        drainer.start();
        assert_eq!(drained_at(&drainer).await.unwrap() - t0, QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn drained_waits_for_the_drain_to_start() {
        let drainer = Drainer::new(QUIET);
        let done = drained_at(&drainer);
        sleep(ms(500)).await;
        assert!(!done.is_finished());
        let t0 = Instant::now();
        drainer.start();
        drainer.start(); // idempotent: does not move the deadline
        sleep(ms(50)).await;
        drainer.start();
        assert_eq!(done.await.unwrap() - t0, QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn admin_health_and_unknown_paths() {
        let drainer = Drainer::new(QUIET);
        let ok = admin_response("/healthz", &drainer).await;
        assert_eq!(ok.status(), StatusCode::OK);
        let missing = admin_response("/nope", &drainer).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert!(!drainer.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_drain_with_sigterm_answers_once_drained() {
        let drainer = Drainer::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let hook = tokio::spawn({
            let drainer = Arc::clone(&drainer);
            async move {
                let response = admin_response(WAIT_FOR_DRAIN_PATH, &drainer).await;
                (Instant::now(), response)
            }
        });
        tokio::task::yield_now().await;
        assert!(
            drainer.is_draining(),
            "probes fail as soon as the hook calls"
        );

        sleep(ms(300)).await;
        drainer.start(); // SIGTERM, within the window
        sleep(Duration::from_secs(5)).await;
        drainer.request_seen();

        let (at, response) = hook.await.unwrap();
        // Quiet period counted from the last request (5.3 s), not from the hook.
        assert_eq!(at - t0, ms(5_300) + Duration::from_secs(30));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body().as_ref(), b"drained");
        assert!(drainer.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_drain_without_sigterm_lapses() {
        let drainer = Drainer::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let response = admin_response(WAIT_FOR_DRAIN_PATH, &drainer).await;
        assert_eq!(Instant::now() - t0, PRESTOP_CONFIRM_WINDOW);
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            std::str::from_utf8(response.body())
                .unwrap()
                .contains("cancelled"),
            "{response:?}"
        );
        assert!(!drainer.is_draining(), "ready for the restarted container");

        // A later SIGTERM drains normally, counting from itself.
        sleep(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        drainer.start();
        assert_eq!(
            drained_at(&drainer).await.unwrap() - t1,
            Duration::from_secs(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sigterm_before_the_hook_is_final() {
        let drainer = Drainer::new(Duration::from_secs(3));
        let t0 = Instant::now();
        drainer.start();
        sleep(ms(200)).await;
        let response = admin_response(WAIT_FOR_DRAIN_PATH, &drainer).await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(3));
        assert_eq!(response.body().as_ref(), b"drained");
        assert!(drainer.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn drained_is_not_fooled_by_a_lapsed_prestop_drain() {
        let drainer = Drainer::new(Duration::from_secs(5));
        let done = drained_at(&drainer);
        let _ = admin_response(WAIT_FOR_DRAIN_PATH, &drainer).await; // lapses after 1 s
        sleep(Duration::from_secs(10)).await;
        assert!(!done.is_finished());
        let t0 = Instant::now();
        drainer.start();
        assert_eq!(done.await.unwrap() - t0, Duration::from_secs(5));
    }
}
