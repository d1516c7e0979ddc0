//! Retry spacing and rate limits, shared by every source, sink and the
//! agent's forwarder and supervisor.
//!
//! Invariants: a wait is never longer than the configured maximum (except
//! a peer's own delay, which the caller honours on top); a retry is never
//! immediate (the jitter covers the upper half of the ceiling only, so
//! gateways that lost the same link at once spread out without any of
//! them hammering it); a pacer never lets more than one second's worth of
//! units through in a burst.

use std::time::Duration;

use tokio::time::Instant;

/// Capped exponential backoff with jitter over the upper half of each step.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `first`, doubles per consecutive failure, never above `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            failures: 0,
        }
    }

    /// Counts one more failure and returns how long to wait before the
    /// next attempt.
    pub fn next_wait(&mut self) -> Duration {
        let wait = wait_after(self.first, self.max, self.failures);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// An attempt worked: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures counted since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The wait before retry number `attempt` (0 = the first retry): the
/// ceiling `first × 2^attempt` capped at `max`, jittered within its upper
/// half.
pub fn wait_after(first: Duration, max: Duration, attempt: u32) -> Duration {
    let ceiling = first.saturating_mul(1u32 << attempt.min(20)).min(max);
    ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
}

/// Spaces units (messages, events) to at most `rate` per second.
#[derive(Debug)]
pub struct Pacer {
    rate: Option<u32>,
    next: Instant,
}

impl Pacer {
    /// `None` or zero: unpaced.
    pub fn new(rate: Option<u32>) -> Self {
        Self {
            rate: rate.filter(|r| *r > 0),
            next: Instant::now(),
        }
    }

    /// Waits until `units` more may go out.
    pub async fn wait(&mut self, units: usize) {
        let Some(rate) = self.rate else {
            return;
        };
        let now = Instant::now();
        // After idling, up to one second's worth may go at once: a backlog
        // starts at once, and the rate still holds over any second after.
        let floor = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        self.next = self.next.max(floor);
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
        self.next += Duration::from_secs_f64(units as f64 / f64::from(rate));
    }
}

/// One outage of a link (a PLC, a server, a broker, an endpoint), so that
/// it is logged once when it starts and once when it ends, not once per
/// retry. With [`Outage::lasting`], failures count as an outage only once
/// several came in a row or they went on for a while: a single failed
/// delivery followed by success is counted (retries), not announced.
#[derive(Clone, Debug)]
pub struct Outage {
    since: Option<(std::time::Instant, std::time::SystemTime)>,
    failures: u64,
    announced: bool,
    after_failures: u64,
    after: Duration,
}

impl Default for Outage {
    /// Announced at the first failure.
    fn default() -> Self {
        Self::lasting(1, Duration::ZERO)
    }
}

impl Outage {
    /// Announced once `failures` attempts in a row failed, or failures
    /// went on for `after`, whichever comes first.
    pub fn lasting(failures: u64, after: Duration) -> Self {
        Self {
            since: None,
            failures: 0,
            announced: false,
            after_failures: failures.max(1),
            after,
        }
    }

    /// A failed attempt; `true` once per outage, when it becomes one (log
    /// it).
    pub fn failed(&mut self) -> bool {
        self.failures += 1;
        let (started, _) = *self
            .since
            .get_or_insert_with(|| (std::time::Instant::now(), std::time::SystemTime::now()));
        if self.announced {
            return false;
        }
        let lasted = !self.after.is_zero() && started.elapsed() >= self.after;
        self.announced = self.failures >= self.after_failures || lasted;
        self.announced
    }

    /// A working attempt: how long the outage lasted and how many attempts
    /// failed, if an announced one just ended (log the recovery). Failures
    /// too few to be announced end silently.
    pub fn recovered(&mut self) -> Option<(Duration, u64)> {
        let (started, _) = self.since.take()?;
        let failures = std::mem::take(&mut self.failures);
        std::mem::take(&mut self.announced).then(|| (started.elapsed(), failures))
    }

    /// When the current outage started, RFC 3339 (for the log line).
    pub fn since_text(&self) -> String {
        self.since
            .map(|(_, at)| humantime::format_rfc3339_seconds(at).to_string())
            .unwrap_or_default()
    }
}

/// A duration as an operator reads it: `3m12s`, `2h05m`, `450ms`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_failure_followed_by_success_is_no_outage() {
        let mut outage = Outage::lasting(3, Duration::from_secs(5));
        for _ in 0..50 {
            assert!(!outage.failed(), "one failure is not announced");
            assert_eq!(outage.recovered(), None, "nor is its end");
        }
        assert!(!outage.failed());
        assert!(!outage.failed());
        assert!(outage.failed(), "the third failure in a row is an outage");
        assert!(!outage.failed(), "announced once");
        let (_, failures) = outage.recovered().expect("its end is announced");
        assert_eq!(failures, 4);
    }

    #[test]
    fn failures_that_go_on_long_enough_are_an_outage_however_few() {
        let mut outage = Outage::lasting(100, Duration::from_millis(30));
        assert!(!outage.failed());
        std::thread::sleep(Duration::from_millis(40));
        assert!(outage.failed(), "lasted past 30 ms");
    }

    #[test]
    fn by_default_the_first_failure_is_announced() {
        let mut outage = Outage::default();
        assert!(outage.failed());
        assert!(outage.recovered().is_some());
    }

    #[test]
    fn backoff_doubles_stays_within_the_upper_half_and_is_capped() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut backoff = Backoff::new(first, max);
        for attempt in 0..40u32 {
            let ceiling = first.saturating_mul(1 << attempt.min(20)).min(max);
            let wait = backoff.next_wait();
            assert!(
                wait >= ceiling / 2 && wait <= ceiling,
                "attempt {attempt}: {wait:?} outside {:?}..={ceiling:?}",
                ceiling / 2
            );
        }
        assert_eq!(backoff.failures(), 40);
        backoff.reset();
        assert!(backoff.next_wait() <= first, "a success starts over");
    }

    #[test]
    fn waits_spread_out_instead_of_all_retrying_together() {
        let waits: std::collections::BTreeSet<Duration> = (0..50)
            .map(|_| wait_after(Duration::from_secs(1), Duration::from_secs(60), 3))
            .collect();
        assert!(
            waits.len() > 40,
            "jitter: {} distinct waits of 50",
            waits.len()
        );
    }

    #[test]
    fn an_outage_is_reported_once_when_it_starts_and_once_when_it_ends() {
        let mut outage = Outage::default();
        assert_eq!(outage.recovered(), None, "nothing to recover from");
        assert!(outage.failed(), "the first failure starts the incident");
        assert!(!outage.failed() && !outage.failed(), "retries are not news");
        assert!(!outage.since_text().is_empty());
        let (_, failures) = outage.recovered().expect("recovery");
        assert_eq!(failures, 3);
        assert_eq!(outage.recovered(), None, "reported once");
        assert!(outage.failed(), "a new outage is news again");
        assert_eq!(human(Duration::from_secs(192)), "3m12s");
        assert_eq!(human(Duration::from_secs(7500)), "2h05m");
        assert_eq!(human(Duration::from_millis(450)), "450ms");
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_holds_the_rate_and_lets_one_second_go_after_idling() {
        let mut pacer = Pacer::new(Some(10));
        let started = Instant::now();
        for _ in 0..30 {
            pacer.wait(1).await;
        }
        // The first goes at once; 29 more at 100 ms each.
        assert_eq!(started.elapsed(), Duration::from_millis(2900));

        tokio::time::sleep(Duration::from_secs(5)).await;
        let resumed = Instant::now();
        for _ in 0..10 {
            pacer.wait(1).await;
        }
        assert_eq!(
            resumed.elapsed(),
            Duration::ZERO,
            "one second's worth goes at once after idling"
        );
        pacer.wait(5).await;
        pacer.wait(1).await;
        assert_eq!(
            resumed.elapsed(),
            Duration::from_millis(500),
            "then the rate holds, counted in units (a batch of 5 is 500 ms)"
        );

        let mut unpaced = Pacer::new(Some(0));
        let at = Instant::now();
        for _ in 0..1000 {
            unpaced.wait(1).await;
        }
        assert_eq!(at.elapsed(), Duration::ZERO, "0 means unpaced");
    }
}
