//! Knative's request breaker: at most `CONTAINER_CONCURRENCY` (CC) requests reach the user
//! container at once, up to 10 × CC more wait their turn in arrival order, and anything beyond that
//! is refused at once (the caller answers 503 "pending request queue full").
//!
//! A [`tokio::sync::Semaphore`] with CC permits gives the FIFO-fair slots; an atomic counter of
//! admitted requests (in flight + waiting) bounds the queue, as Knative's `breaker.pending` does.
//! Both are given back by drop guards, so a waiter whose future is dropped (the client went away)
//! leaves the queue, and a dropped [`Permit`] hands its slot to the next waiter.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

/// How many requests may wait per unit of container concurrency (Knative's queue-proxy).
pub const QUEUE_DEPTH_PER_SLOT: usize = 10;

/// The request was refused because CC requests are in flight and 10 × CC are already waiting.
#[derive(Debug, thiserror::Error)]
#[error("pending request queue full")]
pub struct QueueFull;

/// Limits concurrent requests to the user container. Cheap to share behind an `Arc`.
pub struct Breaker {
    inner: Arc<Inner>,
}

struct Inner {
    /// One permit per request allowed in flight; tokio's semaphore serves waiters FIFO.
    slots: Semaphore,
    capacity: usize,
    /// `capacity` + queue depth: the most requests admitted (in flight or waiting) at once.
    max_admitted: usize,
    /// Requests in flight or waiting for a slot.
    admitted: AtomicUsize,
}

impl Breaker {
    /// A breaker for `container_concurrency` requests in flight with a queue of
    /// 10 × `container_concurrency`. Returns `None` for 0, Knative's "unlimited": callers skip
    /// the breaker entirely.
    pub fn new(container_concurrency: usize) -> Option<Breaker> {
        if container_concurrency == 0 {
            return None;
        }
        // Knative validates CC ≤ 1000; clamp only so absurd values cannot panic the semaphore.
        let capacity = container_concurrency.min(Semaphore::MAX_PERMITS);
        let max_admitted = capacity.saturating_add(capacity.saturating_mul(QUEUE_DEPTH_PER_SLOT));
        Some(Breaker {
            inner: Arc::new(Inner {
                slots: Semaphore::new(capacity),
                capacity,
                max_admitted,
                admitted: AtomicUsize::new(0),
            }),
        })
    }

    /// Waits for a slot, in arrival order. Fails at once with [`QueueFull`] when CC requests are in
    /// flight and 10 × CC are waiting. Dropping the returned future gives the queue place back.
    pub async fn acquire(&self) -> Result<Permit, QueueFull> {
        let inner = &*self.inner;
        inner
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.max_admitted).then_some(n + 1)
            })
            .map_err(|_| QueueFull)?;
        // From here on the guard owns the queue place: if this future is dropped while waiting,
        // its Drop gives the place back (and no slot, since it holds none yet).
        let mut permit = Permit {
            inner: Arc::clone(&self.inner),
            holds_slot: false,
        };
        match inner.slots.acquire().await {
            Ok(slot) => {
                // The permit's Drop returns the slot with `add_permits`, avoiding a borrow of the
                // semaphore in `Permit`.
                slot.forget();
                permit.holds_slot = true;
                Ok(permit)
            }
            // The semaphore is never closed; treat it as full rather than panic.
            Err(_closed) => Err(QueueFull),
        }
    }

    /// Requests holding a slot.
    pub fn in_flight(&self) -> usize {
        self.inner
            .capacity
            .saturating_sub(self.inner.slots.available_permits())
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.inner
            .admitted
            .load(Ordering::Acquire)
            .saturating_sub(self.in_flight())
    }

    /// Requests allowed in flight at once (CC).
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Requests allowed to wait for a slot (10 × CC).
    pub fn queue_depth(&self) -> usize {
        self.inner.max_admitted - self.inner.capacity
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("capacity", &self.capacity())
            .field("queue_depth", &self.queue_depth())
            .field("in_flight", &self.in_flight())
            .field("waiting", &self.waiting())
            .finish()
    }
}

/// A slot in the breaker; dropping it lets the next waiter in. `'static`, so it can travel with a
/// streaming response body.
pub struct Permit {
    inner: Arc<Inner>,
    /// False only while the owning `acquire` future is still waiting (then this is a queue place).
    holds_slot: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Leave the admitted count first so a newcomer is never refused for a place being freed.
        self.inner.admitted.fetch_sub(1, Ordering::AcqRel);
        if self.holds_slot {
            self.inner.slots.add_permits(1);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("holds_slot", &self.holds_slot)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::task::JoinHandle;

    /// Lets spawned tasks on the current-thread runtime run until they block.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Spawns a task that acquires a slot and holds it until `release` fires.
    fn spawn_holder(
        breaker: &Arc<Breaker>,
        release: tokio::sync::oneshot::Receiver<()>,
    ) -> JoinHandle<Result<(), QueueFull>> {
        let breaker = Arc::clone(breaker);
        tokio::spawn(async move {
            let _permit = breaker.acquire().await?;
            let _ = release.await;
            Ok(())
        })
    }

    #[test]
    fn zero_means_unlimited() {
        assert!(Breaker::new(0).is_none());
    }

    #[test]
    fn sizes_follow_knative() {
        let b = Breaker::new(3).unwrap();
        assert_eq!(b.capacity(), 3);
        assert_eq!(b.queue_depth(), 30);
        assert_eq!((b.in_flight(), b.waiting()), (0, 0));
    }

    #[test]
    fn absurd_concurrency_does_not_panic() {
        let b = Breaker::new(usize::MAX).unwrap();
        assert_eq!(b.capacity(), Semaphore::MAX_PERMITS);
    }

    #[test]
    fn breaker_and_permit_are_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Breaker>();
        check::<Permit>();
    }

    #[tokio::test(start_paused = true)]
    async fn cc_one_serialises() {
        let breaker = Arc::new(Breaker::new(1).unwrap());
        let running = Arc::new(AtomicUsize::new(0));
        let max_running = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let (breaker, running, max_running) = (
                    Arc::clone(&breaker),
                    Arc::clone(&running),
                    Arc::clone(&max_running),
                );
                tokio::spawn(async move {
                    let _permit = breaker.acquire().await.unwrap();
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    max_running.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        settle().await;
        assert_eq!((breaker.in_flight(), breaker.waiting()), (1, 4));

        let start = tokio::time::Instant::now();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max_running.load(Ordering::SeqCst), 1);
        // One after the other: 5 × 100 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        assert_eq!((breaker.in_flight(), breaker.waiting()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order() {
        let breaker = Arc::new(Breaker::new(1).unwrap());
        let first = breaker.acquire().await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (breaker, order) = (Arc::clone(&breaker), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let _permit = breaker.acquire().await.unwrap();
                order.lock().unwrap().push(i);
                tokio::task::yield_now().await;
            }));
            // Make sure task i is queued before task i + 1 arrives.
            settle().await;
        }
        assert_eq!(breaker.waiting(), 8);
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn overflow_exactly_at_cc_plus_ten_cc() {
        const CC: usize = 2;
        let breaker = Arc::new(Breaker::new(CC).unwrap());
        let mut releases = Vec::new();
        let mut holders = Vec::new();
        for _ in 0..CC + 10 * CC {
            let (tx, rx) = tokio::sync::oneshot::channel();
            releases.push(tx);
            holders.push(spawn_holder(&breaker, rx));
        }
        settle().await;
        assert_eq!((breaker.in_flight(), breaker.waiting()), (CC, 10 * CC));
        assert!(
            holders.iter().all(|h| !h.is_finished()),
            "nobody refused yet"
        );

        // The 23rd request fails at once, without waiting.
        assert!(matches!(breaker.acquire().await, Err(QueueFull)));
        assert_eq!(QueueFull.to_string(), "pending request queue full");

        // One request finishes: a waiter takes its slot and the queue has one place again.
        releases.remove(0).send(()).unwrap();
        settle().await;
        assert_eq!((breaker.in_flight(), breaker.waiting()), (CC, 10 * CC - 1));
        let (tx, rx) = tokio::sync::oneshot::channel();
        releases.push(tx);
        holders.push(spawn_holder(&breaker, rx));
        settle().await;
        assert_eq!((breaker.in_flight(), breaker.waiting()), (CC, 10 * CC));
        assert!(matches!(breaker.acquire().await, Err(QueueFull)));

        for tx in releases {
            tx.send(()).unwrap();
        }
        for h in holders {
            h.await.unwrap().unwrap();
        }
        assert_eq!((breaker.in_flight(), breaker.waiting()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_gives_back_its_place() {
        let breaker = Arc::new(Breaker::new(1).unwrap());
        let permit = breaker.acquire().await.unwrap();
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let breaker = Arc::clone(&breaker);
                tokio::spawn(async move { breaker.acquire().await.map(drop) })
            })
            .collect();
        settle().await;
        assert_eq!(breaker.waiting(), 10);
        assert!(breaker.acquire().await.is_err());

        // The client of one waiter disconnects: its task (and acquire future) is dropped.
        waiters[3].abort();
        settle().await;
        assert_eq!(breaker.waiting(), 9);

        // A request that gives up after a timeout also gives its place back.
        let timed_out = tokio::time::timeout(Duration::from_millis(10), breaker.acquire()).await;
        assert!(timed_out.is_err(), "should have waited, not been refused");
        assert_eq!(breaker.waiting(), 9);

        // The freed place can be used by a newcomer.
        let newcomer = {
            let breaker = Arc::clone(&breaker);
            tokio::spawn(async move { breaker.acquire().await.map(drop) })
        };
        settle().await;
        assert_eq!(breaker.waiting(), 10);

        drop(permit);
        for (i, w) in waiters.into_iter().enumerate() {
            match w.await {
                Ok(r) => r.unwrap(),
                Err(e) => assert!(i == 3 && e.is_cancelled()),
            }
        }
        newcomer.await.unwrap().unwrap();
        assert_eq!((breaker.in_flight(), breaker.waiting()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_does_not_take_a_slot_handed_to_it() {
        // The slot is released while the only waiter is being cancelled: it must go to the next
        // waiter or back to the semaphore, never be lost.
        let breaker = Arc::new(Breaker::new(1).unwrap());
        let permit = breaker.acquire().await.unwrap();
        let mut doomed = Box::pin(breaker.acquire());
        let first_poll =
            std::future::poll_fn(|cx| std::task::Poll::Ready(doomed.as_mut().poll(cx))).await;
        assert!(first_poll.is_pending());
        drop(permit); // the slot is assigned to `doomed`, which is never polled again
        drop(doomed);
        assert_eq!((breaker.in_flight(), breaker.waiting()), (0, 0));
        let again = breaker.acquire().await.unwrap();
        assert_eq!(breaker.in_flight(), 1);
        drop(again);
        assert_eq!(breaker.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_load_never_exceeds_capacity() {
        const CC: usize = 3;
        let breaker = Arc::new(Breaker::new(CC).unwrap());
        let running = Arc::new(AtomicUsize::new(0));
        let max_running = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (breaker, running, max_running, refused) = (
                    Arc::clone(&breaker),
                    Arc::clone(&running),
                    Arc::clone(&max_running),
                    Arc::clone(&refused),
                );
                tokio::spawn(async move {
                    let Ok(_permit) = breaker.acquire().await else {
                        refused.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    max_running.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(max_running.load(Ordering::SeqCst) <= CC);
        assert!(refused.load(Ordering::SeqCst) < 200);
        assert_eq!((breaker.in_flight(), breaker.waiting()), (0, 0));
    }
}
