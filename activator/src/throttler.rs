//! One revision's throttler: which of its pods may take a request now, and who waits.
//!
//! Capacity is Knative's: container concurrency (CC) × ready pods, where CC 0 means no limit per
//! pod but still at least one ready pod. A pod counts as ready only once it answered a probe
//! (`K-Network-Probe: queue` → 200 `queue`), tried every [`PROBE_INTERVAL`] from the moment its
//! endpoint appears; a pod that refuses a connection goes back to probing.
//!
//! A request either takes a slot at once (nobody is waiting and a pod has room) or joins a FIFO
//! queue of at most `queue_depth` waiters (beyond it: refused). Whenever capacity appears (a
//! request finishes, a pod passes its probe, CC grows) waiters are handed a `Lease` in arrival
//! order through a oneshot channel. A lease is the slot: dropping it frees the slot and serves
//! the next waiter. Pods are chosen as Knative's activator does ([`Policy`]).
//!
//! Locking: one `std` mutex per revision, never held across an `.await` nor while a `Lease` or
//! `InFlight` is dropped (their drops take it).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use knarr_proto::activator::RevisionStats;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info};

use crate::metrics::RevisionLabels;
use crate::probe::probe_pod;
use crate::revisions::Shared;
use crate::stats::{offer, unix_millis, Window, POKE_INTERVAL};

/// How often a pod that has not answered its probe yet is probed again (Knative: 200 ms).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// How the next pod is chosen, from the revision's container concurrency (Knative's activator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// CC 1–3: the first pod (in endpoint order) with a free slot, so pods fill up in order and
    /// a burst lands where requests were just served.
    FirstAvailable,
    /// CC > 3: the next pod with a free slot after the last one chosen.
    RoundRobin,
    /// CC 0: of two pods chosen at random, the one with fewer requests in flight.
    TwoRandomChoices,
}

impl Policy {
    pub fn for_container_concurrency(cc: usize) -> Policy {
        match cc {
            0 => Policy::TwoRandomChoices,
            1..=3 => Policy::FirstAvailable,
            _ => Policy::RoundRobin,
        }
    }
}

/// What the throttler and the proxy need to know about a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spec {
    /// Requests per pod; 0 = unlimited.
    pub container_concurrency: usize,
    /// Total time a request may take, waiting included (→ 504).
    pub timeout: Duration,
    /// Time from forwarding to the start of the pod's response (→ 504).
    pub response_start_timeout: Option<Duration>,
    /// Longest pause between bytes of the pod's response.
    pub idle_timeout: Option<Duration>,
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("pending request queue full")]
    QueueFull,
    #[error("activator request timeout")]
    Timeout,
    #[error("the revision was removed while the request waited")]
    Removed,
}

/// One pod endpoint, for as long as it is in the revision. A pod that leaves and comes back is a
/// new `Target`, so leases from before never count against it.
#[derive(Debug)]
pub(crate) struct Target {
    pub addr: SocketAddr,
    pub authority: http::uri::Authority,
    /// Leases on this pod. Changed only under the revision's lock; atomic so leases can share
    /// the `Target`.
    in_flight: AtomicUsize,
}

impl Target {
    fn new(addr: SocketAddr) -> Target {
        Target {
            addr,
            authority: addr
                .to_string()
                .parse()
                .expect("a socket address is a URI authority"),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

struct Pod {
    target: Arc<Target>,
    /// Passed its probe and not failed since.
    ready: bool,
    prober: Option<AbortHandle>,
}

impl Pod {
    fn stop_probing(&mut self) {
        if let Some(p) = self.prober.take() {
            p.abort();
        }
    }
}

/// The revision's pods and the pick; no I/O, unit-tested on its own.
struct Pool {
    pods: Vec<Pod>,
    round_robin: usize,
    rng: fastrand::Rng,
}

impl Pool {
    fn ready(&self) -> usize {
        self.pods.iter().filter(|p| p.ready).count()
    }

    /// The index of the pod the next request goes to, if any has room.
    fn pick(&mut self, cc: usize) -> Option<usize> {
        let has_room = |p: &Pod| p.ready && (cc == 0 || p.target.load() < cc);
        match Policy::for_container_concurrency(cc) {
            Policy::FirstAvailable => self.pods.iter().position(has_room),
            Policy::RoundRobin => {
                let n = self.pods.len();
                let found = (0..n)
                    .map(|k| (self.round_robin + k) % n)
                    .find(|&i| has_room(&self.pods[i]))?;
                self.round_robin = (found + 1) % n;
                Some(found)
            }
            Policy::TwoRandomChoices => {
                let ready = self.ready();
                let nth_ready = |k: usize| {
                    self.pods
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.ready)
                        .nth(k)
                        .map(|(i, _)| i)
                };
                match ready {
                    0 => None,
                    1 => nth_ready(0),
                    _ => {
                        let a = self.rng.usize(..ready);
                        let mut b = self.rng.usize(..ready - 1);
                        if b >= a {
                            b += 1;
                        }
                        let (a, b) = (nth_ready(a)?, nth_ready(b)?);
                        Some(if self.pods[b].target.load() < self.pods[a].target.load() {
                            b
                        } else {
                            a
                        })
                    }
                }
            }
        }
    }
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Lease>,
}

struct State {
    spec: Spec,
    pool: Pool,
    /// In arrival order; ids increase, so a waiter can be found by binary search.
    waiters: VecDeque<Waiter>,
    next_waiter: u64,
    /// Removed from the table: nobody waits any more.
    closed: bool,
    last_poke: Option<Instant>,
    window: Window,
    /// What the global held gauge has been told about this revision.
    held_reported: usize,
}

/// A revision's throttler. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Throttler {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    name: String,
    labels: RevisionLabels,
    in_flight_gauge: Gauge,
    held_gauge: Gauge,
    shared: Arc<Shared>,
    state: Mutex<State>,
}

/// A revision's state at one moment, for tests, logs and debugging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionState {
    pub container_concurrency: usize,
    /// Endpoints the control plane listed.
    pub endpoints: usize,
    /// Of those, the ones that passed their probe.
    pub ready_pods: usize,
    /// Requests that may be proxied at once; `None`: no limit (CC 0 with a ready pod).
    pub capacity: Option<usize>,
    /// Requests waiting for capacity.
    pub held: usize,
    /// Requests handed to a pod and not finished.
    pub proxied: usize,
    /// Requests held or proxied (what the stats count).
    pub in_flight: u64,
}

impl Throttler {
    pub fn new(
        namespace: String,
        name: String,
        spec: Spec,
        endpoints: &[SocketAddr],
        shared: Arc<Shared>,
    ) -> Throttler {
        let labels = RevisionLabels {
            namespace: namespace.clone(),
            revision: name.clone(),
        };
        let in_flight_gauge = shared
            .metrics
            .revision_in_flight
            .get_or_create_owned(&labels);
        let held_gauge = shared.metrics.revision_held.get_or_create_owned(&labels);
        let throttler = Throttler {
            inner: Arc::new(Inner {
                namespace,
                name,
                labels,
                in_flight_gauge,
                held_gauge,
                shared,
                state: Mutex::new(State {
                    spec,
                    pool: Pool {
                        pods: Vec::new(),
                        round_robin: 0,
                        rng: fastrand::Rng::new(),
                    },
                    waiters: VecDeque::new(),
                    next_waiter: 0,
                    closed: false,
                    last_poke: None,
                    window: Window::new(Instant::now()),
                    held_reported: 0,
                }),
            }),
        };
        throttler.update(spec, endpoints);
        throttler
    }

    pub fn spec(&self) -> Spec {
        self.inner.lock().spec
    }

    /// New limits and pods. Pods that stay keep their state and load; new ones are probed;
    /// gone ones stop being probed and get no new requests (those in flight finish).
    pub fn update(&self, spec: Spec, endpoints: &[SocketAddr]) {
        let inner = &self.inner;
        let mut st = inner.lock();
        if st.closed {
            return;
        }
        st.spec = spec;
        let mut old: HashMap<SocketAddr, Pod> = std::mem::take(&mut st.pool.pods)
            .into_iter()
            .map(|p| (p.target.addr, p))
            .collect();
        let mut pods = Vec::with_capacity(endpoints.len());
        for &addr in endpoints {
            if let Some(pod) = old.remove(&addr) {
                pods.push(pod);
            } else {
                debug!(revision = %inner.key(), pod = %addr, "pod added: probing it");
                let target = Arc::new(Target::new(addr));
                let prober = Some(inner.spawn_prober(&target));
                pods.push(Pod {
                    target,
                    ready: false,
                    prober,
                });
            }
        }
        for mut gone in old.into_values() {
            debug!(revision = %inner.key(), pod = %gone.target.addr, "pod removed");
            gone.stop_probing();
        }
        st.pool.pods = pods;
        if st.pool.round_robin >= st.pool.pods.len() {
            st.pool.round_robin = 0;
        }
        inner.dispatch(&mut st);
    }

    /// The revision is gone: waiters are refused, probing stops. Requests in flight finish.
    pub fn close(&self) {
        let mut st = self.inner.lock();
        st.closed = true;
        // Dropping the senders wakes every waiter with `Refused::Removed`.
        st.waiters.clear();
        for pod in &mut st.pool.pods {
            pod.stop_probing();
        }
        st.pool.pods.clear();
        self.inner.held_changed(&mut st);
        drop(st);
        self.inner
            .shared
            .metrics
            .remove_revision(&self.inner.labels);
    }

    /// A request for this revision arrived: counted in the stats until the returned guard is
    /// dropped (held or proxied alike). With no ready pod, the autoscaler is poked at once (at
    /// most every [`POKE_INTERVAL`]).
    pub fn arrive(&self) -> InFlight {
        let now = Instant::now();
        let poke = {
            let mut st = self.inner.lock();
            st.window.arrive(now);
            let in_flight = st.window.in_flight();
            self.inner.in_flight_gauge.set(gauge(in_flight));
            let poke = st.pool.ready() == 0
                && st
                    .last_poke
                    .is_none_or(|t| now.saturating_duration_since(t) >= POKE_INTERVAL);
            if poke {
                st.last_poke = Some(now);
            }
            poke.then_some(in_flight)
        };
        if let Some(in_flight) = poke {
            debug!(revision = %self.inner.key(), "no ready pod: poking the autoscaler");
            let stat = RevisionStats {
                activator: self.inner.shared.node_id.clone(),
                namespace: self.inner.namespace.clone(),
                revision: self.inner.name.clone(),
                average_concurrency: in_flight as f64,
                request_count: 1.0,
                poke: true,
                timestamp_millis: unix_millis(SystemTime::now()),
            };
            offer(
                &self.inner.shared.stats,
                stat,
                &self.inner.shared.metrics.stats_dropped,
            );
        }
        InFlight {
            inner: Arc::clone(&self.inner),
        }
    }

    /// A slot on a ready pod: at once if nobody waits and a pod has room, else in arrival order
    /// once capacity appears, until `deadline`.
    pub async fn acquire(&self, deadline: Instant) -> Result<Lease, Refused> {
        let (rx, id) = {
            let mut st = self.inner.lock();
            if st.closed {
                return Err(Refused::Removed);
            }
            if st.waiters.is_empty() {
                let cc = st.spec.container_concurrency;
                if let Some(i) = st.pool.pick(cc) {
                    let target = Arc::clone(&st.pool.pods[i].target);
                    return Ok(self.inner.lease(target));
                }
            }
            if st.waiters.len() >= self.inner.shared.queue_depth {
                return Err(Refused::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_waiter;
            st.next_waiter += 1;
            st.waiters.push_back(Waiter { id, tx });
            self.inner.held_changed(&mut st);
            (rx, id)
        };
        // Leaves the queue however this ends (lease, timeout, the client going away).
        let _place = Place {
            inner: &self.inner,
            id,
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(lease)) => Ok(lease),
            // The sender was dropped without a lease: the revision was closed.
            Ok(Err(_)) => Err(Refused::Removed),
            Err(_) => Err(Refused::Timeout),
        }
    }

    /// Closes the stats window at `now`: the revision's report, unless it was idle.
    pub fn report(&self, now: Instant, timestamp_millis: i64) -> Option<RevisionStats> {
        let load = self.inner.lock().window.close(now)?;
        Some(RevisionStats {
            activator: self.inner.shared.node_id.clone(),
            namespace: self.inner.namespace.clone(),
            revision: self.inner.name.clone(),
            average_concurrency: load.average_concurrency,
            request_count: load.requests as f64,
            poke: false,
            timestamp_millis,
        })
    }

    pub fn state(&self) -> RevisionState {
        let st = self.inner.lock();
        let cc = st.spec.container_concurrency;
        let ready_pods = st.pool.ready();
        RevisionState {
            container_concurrency: cc,
            endpoints: st.pool.pods.len(),
            ready_pods,
            capacity: if cc == 0 && ready_pods > 0 {
                None
            } else {
                Some(cc * ready_pods)
            },
            held: st.waiters.len(),
            proxied: st.pool.pods.iter().map(|p| p.target.load()).sum(),
            in_flight: st.window.in_flight(),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics under the lock; a poisoned state would still be consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// A slot on `target`; call with the lock held.
    fn lease(self: &Arc<Self>, target: Arc<Target>) -> Lease {
        target.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease {
            inner: Arc::clone(self),
            target,
            armed: true,
        }
    }

    /// Hands free slots to waiters, first come first served.
    fn dispatch(self: &Arc<Self>, st: &mut State) {
        let cc = st.spec.container_concurrency;
        while !st.waiters.is_empty() {
            let Some(i) = st.pool.pick(cc) else { break };
            let waiter = st.waiters.pop_front().expect("checked non-empty");
            let lease = self.lease(Arc::clone(&st.pool.pods[i].target));
            if let Err(mut lease) = waiter.tx.send(lease) {
                // The waiter gave up just now: take the slot back here, under the lock (the
                // lease's own drop would take the lock again).
                lease.armed = false;
                lease.target.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.held_changed(st);
    }

    fn held_changed(&self, st: &mut State) {
        let held = st.waiters.len();
        self.held_gauge.set(gauge(held as u64));
        let global = &self.shared.metrics.held;
        if held > st.held_reported {
            global.inc_by(gauge((held - st.held_reported) as u64));
        } else {
            global.dec_by(gauge((st.held_reported - held) as u64));
        }
        st.held_reported = held;
    }

    fn release(self: &Arc<Self>, target: &Target) {
        let mut st = self.lock();
        target.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.dispatch(&mut st);
    }

    fn pod_ready(self: &Arc<Self>, target: &Arc<Target>) {
        let mut st = self.lock();
        let Some(pod) = st
            .pool
            .pods
            .iter_mut()
            .find(|p| Arc::ptr_eq(&p.target, target))
        else {
            return;
        };
        pod.ready = true;
        pod.prober = None;
        info!(revision = %self.key(), pod = %target.addr, "pod ready");
        self.dispatch(&mut st);
    }

    fn pod_unreachable(self: &Arc<Self>, target: &Arc<Target>) {
        let mut st = self.lock();
        let Some(i) = st
            .pool
            .pods
            .iter()
            .position(|p| Arc::ptr_eq(&p.target, target))
        else {
            return;
        };
        if !st.pool.pods[i].ready {
            return;
        }
        info!(revision = %self.key(), pod = %target.addr, "pod unreachable: probing it again");
        let prober = self.spawn_prober(target);
        let pod = &mut st.pool.pods[i];
        pod.ready = false;
        pod.prober = Some(prober);
    }

    fn spawn_prober(self: &Arc<Self>, target: &Arc<Target>) -> AbortHandle {
        self.shared
            .runtime
            .spawn(probe_until_ready(Arc::downgrade(self), Arc::clone(target)))
            .abort_handle()
    }
}

/// Probes `target` every [`PROBE_INTERVAL`] until it answers, then marks it ready. Aborted when
/// the pod leaves; also ends if the revision's throttler is gone.
async fn probe_until_ready(throttler: Weak<Inner>, target: Arc<Target>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures = 0u64;
    loop {
        ticks.tick().await;
        let Some(client) = throttler.upgrade().map(|t| t.shared.clients.http1.clone()) else {
            return;
        };
        match probe_pod(&client, &target.authority).await {
            Ok(()) => {
                if let Some(inner) = throttler.upgrade() {
                    inner.pod_ready(&target);
                }
                return;
            }
            Err(e) => {
                failures += 1;
                // The first failure is expected (the pod is starting); then now and then.
                if failures % 25 == 1 {
                    debug!(pod = %target.addr, failures, error = %e, "pod not ready yet");
                }
            }
        }
    }
}

/// A slot on a pod. Dropping it frees the slot for the next waiter.
pub(crate) struct Lease {
    inner: Arc<Inner>,
    target: Arc<Target>,
    /// False only for a lease taken back by `dispatch` (its slot is already given back).
    armed: bool,
}

impl Lease {
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The pod refused the connection: no new requests for it until a probe passes again.
    pub fn pod_unreachable(&self) {
        self.inner.pod_unreachable(&self.target);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            self.inner.release(&self.target);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("revision", &self.inner.key())
            .field("pod", &self.target.addr)
            .finish()
    }
}

/// A request counted in its revision's stats until dropped.
pub(crate) struct InFlight {
    inner: Arc<Inner>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.window.depart(Instant::now());
        self.inner.in_flight_gauge.set(gauge(st.window.in_flight()));
    }
}

/// A waiter's place in the queue; leaving (however `acquire` ends) removes it if still there.
struct Place<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Ok(i) = st.waiters.binary_search_by_key(&self.id, |w| w.id) {
            st.waiters.remove(i);
            self.inner.held_changed(&mut st);
        }
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(pods: &[(bool, usize)]) -> Pool {
        Pool {
            pods: pods
                .iter()
                .enumerate()
                .map(|(i, &(ready, load))| {
                    let target = Arc::new(Target::new(SocketAddr::from((
                        [10, 0, 0, 1],
                        8000 + i as u16,
                    ))));
                    target.in_flight.store(load, Ordering::Relaxed);
                    Pod {
                        target,
                        ready,
                        prober: None,
                    }
                })
                .collect(),
            round_robin: 0,
            rng: fastrand::Rng::with_seed(7),
        }
    }

    fn take(pool: &mut Pool, cc: usize) -> Option<usize> {
        let i = pool.pick(cc)?;
        pool.pods[i]
            .target
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Some(i)
    }

    #[tokio::test(start_paused = true)]
    async fn pokes_at_most_every_interval_while_no_pod_is_ready() {
        let (tx, mut rx) = crate::stats::stats_channel();
        let revisions = crate::Revisions::new("act-1", 10, tx);
        revisions
            .upsert(knarr_proto::activator::Revision {
                namespace: "ns".into(),
                name: "r".into(),
                ..Default::default()
            })
            .unwrap();
        let throttler = revisions.lookup("ns", "r").unwrap();
        let mut requests: Vec<_> = (0..5).map(|_| throttler.arrive()).collect();
        let poke = rx.try_recv().unwrap();
        assert!(poke.poke);
        assert_eq!(
            (
                poke.activator.as_str(),
                poke.namespace.as_str(),
                poke.revision.as_str()
            ),
            ("act-1", "ns", "r")
        );
        assert_eq!((poke.average_concurrency, poke.request_count), (1.0, 1.0));
        assert!(rx.try_recv().is_err(), "one poke per interval");

        tokio::time::advance(POKE_INTERVAL - Duration::from_millis(1)).await;
        requests.push(throttler.arrive());
        assert!(rx.try_recv().is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        requests.push(throttler.arrive());
        let poke = rx.try_recv().unwrap();
        assert!(poke.poke);
        assert_eq!(poke.average_concurrency, 7.0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_in_timeout_or_a_full_queue() {
        let (tx, _rx) = crate::stats::stats_channel();
        let revisions = crate::Revisions::new("act-1", 2, tx);
        revisions
            .upsert(knarr_proto::activator::Revision {
                namespace: "ns".into(),
                name: "r".into(),
                ..Default::default()
            })
            .unwrap();
        let throttler = revisions.lookup("ns", "r").unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        let (a, b) = (throttler.clone(), throttler.clone());
        let waiters = [
            tokio::spawn(async move { a.acquire(deadline).await.map(drop) }),
            tokio::spawn(async move { b.acquire(deadline).await.map(drop) }),
        ];
        tokio::task::yield_now().await;
        assert_eq!(throttler.state().held, 2);
        assert_eq!(
            throttler.acquire(deadline).await.map(drop),
            Err(Refused::QueueFull)
        );
        for w in waiters {
            assert_eq!(w.await.unwrap(), Err(Refused::Timeout));
        }
        assert_eq!(Instant::now(), deadline);
        assert_eq!(throttler.state().held, 0);
    }

    #[test]
    fn policy_follows_container_concurrency() {
        assert_eq!(
            Policy::for_container_concurrency(0),
            Policy::TwoRandomChoices
        );
        for cc in 1..=3 {
            assert_eq!(
                Policy::for_container_concurrency(cc),
                Policy::FirstAvailable
            );
        }
        assert_eq!(Policy::for_container_concurrency(4), Policy::RoundRobin);
        assert_eq!(Policy::for_container_concurrency(1000), Policy::RoundRobin);
    }

    #[test]
    fn no_ready_pod_no_pick() {
        assert_eq!(pool(&[]).pick(0), None);
        assert_eq!(pool(&[(false, 0), (false, 0)]).pick(0), None);
        assert_eq!(pool(&[(false, 0), (false, 0)]).pick(1), None);
        assert_eq!(pool(&[(false, 0), (false, 0)]).pick(10), None);
    }

    #[test]
    fn first_available_fills_pods_in_order() {
        let mut p = pool(&[(false, 0), (true, 0), (true, 0), (true, 0)]);
        let picks: Vec<_> = (0..7).map(|_| take(&mut p, 2)).collect();
        assert_eq!(
            picks,
            [Some(1), Some(1), Some(2), Some(2), Some(3), Some(3), None]
        );
        // A slot frees on pod 2: the next request goes there.
        p.pods[2].target.in_flight.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(take(&mut p, 2), Some(2));
    }

    #[test]
    fn round_robin_cycles_over_pods_with_room() {
        let mut p = pool(&[(true, 0), (true, 0), (false, 0), (true, 4)]);
        let picks: Vec<_> = (0..6).map(|_| take(&mut p, 4).unwrap()).collect();
        // Pod 2 is not ready and pod 3 is full.
        assert_eq!(picks, [0, 1, 0, 1, 0, 1]);
        p.pods[3].target.in_flight.store(0, Ordering::Relaxed);
        assert_eq!(take(&mut p, 4), Some(3));
        assert_eq!(take(&mut p, 4), Some(0));
    }

    #[test]
    fn two_random_choices_prefers_the_less_loaded() {
        // With two ready pods both are always drawn: the less loaded one wins.
        let mut p = pool(&[(true, 5), (false, 0), (true, 2)]);
        for _ in 0..20 {
            assert_eq!(p.pick(0), Some(2));
        }
        // Unlimited: load spreads out evenly over many pods.
        let mut p = pool(&[(true, 0); 4]);
        for _ in 0..400 {
            take(&mut p, 0);
        }
        let loads: Vec<_> = p.pods.iter().map(|p| p.target.load()).collect();
        assert!(loads.iter().all(|&l| (80..=120).contains(&l)), "{loads:?}");
        // A single ready pod takes everything.
        let mut p = pool(&[(false, 0), (true, 100)]);
        assert_eq!(p.pick(0), Some(1));
    }
}
