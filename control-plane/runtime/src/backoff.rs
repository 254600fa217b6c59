//! The wait before restarting a crashed pod: doubling from [`Backoff::INITIAL`] up to
//! [`Backoff::MAX`], like the kubelet's CrashLoopBackOff, and starting over once a run has lasted
//! long enough to count as healthy (the kubelet forgets a back-off after twice its maximum).

use std::time::Duration;

/// Restart delays for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// The delay the next crash gets.
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Backoff::INITIAL, Backoff::MAX)
    }
}

impl Backoff {
    pub const INITIAL: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(10);

    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial.min(max),
        }
    }

    /// How long to wait before restarting, after a run that lasted `ran` and then crashed.
    pub fn next_delay(&mut self, ran: Duration) -> Duration {
        if ran >= self.max * 2 {
            self.next = self.initial.min(self.max);
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRASH_AT_ONCE: Duration = Duration::ZERO;

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..10)
            .map(|_| b.next_delay(CRASH_AT_ONCE).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn a_long_healthy_run_starts_over() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay(CRASH_AT_ONCE);
        }
        assert_eq!(
            b.next_delay(Duration::from_secs(5)),
            Duration::from_millis(3200)
        );
        assert_eq!(b.next_delay(Duration::from_secs(20)), Backoff::INITIAL);
        assert_eq!(b.next_delay(CRASH_AT_ONCE), Duration::from_millis(200));
    }
}
