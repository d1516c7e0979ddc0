//! A polled source's schedule, kept honestly: the configured interval, the
//! interval it achieved (a histogram and the mean of the last window),
//! and every tick that came late or was skipped.
//!
//! Invariants: ticks of every source with the same interval fall on the
//! same instants (multiples of the interval since the process started),
//! so sources that share a device ask it at the same moment and their
//! reads can be merged, and the appends of one tick share one commit (the
//! journal writer gathers them for a moment) and one wakeup of the
//! runtime (50 devices spread over the interval took 17 % of a core in
//! the modbus_poll bench, aligned 13–14 %); a tick that fires more than half an interval late
//! counts as one overrun, a tick skipped because the previous poll was
//! still running counts as one overrun each; nothing is stacked (a late
//! poll is not followed by a burst of catch-up polls). Intervals across a
//! device outage are not recorded: the outage is counted as one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Upper bounds (seconds) of the achieved-interval histogram's buckets.
pub const INTERVAL_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Mean achieved interval is published once per this window.
const WINDOW: Duration = Duration::from_secs(5);

/// A source's schedule as its ticks found it (shared with metrics).
#[derive(Debug, Default)]
pub struct PollSchedule {
    configured_us: AtomicU64,
    /// One per bucket of [`INTERVAL_BUCKETS`] plus `+Inf`.
    buckets: [AtomicU64; INTERVAL_BUCKETS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
    recent_us: AtomicU64,
    late: AtomicU64,
    skipped: AtomicU64,
}

/// What [`PollSchedule`] holds, read at once.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleSnapshot {
    /// The configured poll interval.
    pub configured: Duration,
    /// Mean interval between polls over the last window (`None` before
    /// one passed).
    pub achieved: Option<Duration>,
    /// Per bucket of [`INTERVAL_BUCKETS`] and `+Inf` (not cumulative).
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the recorded intervals, seconds.
    pub sum_seconds: f64,
    /// Intervals recorded.
    pub count: u64,
    /// Ticks that fired late (more than half an interval).
    pub late: u64,
    /// Ticks skipped because the previous poll still ran.
    pub skipped: u64,
}

impl PollSchedule {
    /// Late plus skipped ticks.
    pub fn overruns(&self) -> u64 {
        self.late.load(Ordering::Relaxed) + self.skipped.load(Ordering::Relaxed)
    }

    /// Everything at once.
    pub fn snapshot(&self) -> ScheduleSnapshot {
        let mut buckets: Vec<(f64, u64)> = INTERVAL_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(le, n)| (*le, n.load(Ordering::Relaxed)))
            .collect();
        buckets.push((
            f64::INFINITY,
            self.buckets[INTERVAL_BUCKETS.len()].load(Ordering::Relaxed),
        ));
        let recent = self.recent_us.load(Ordering::Relaxed);
        ScheduleSnapshot {
            configured: Duration::from_micros(self.configured_us.load(Ordering::Relaxed)),
            achieved: (recent > 0).then(|| Duration::from_micros(recent)),
            buckets,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
            late: self.late.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }

    fn record(&self, interval: Duration) {
        let seconds = interval.as_secs_f64();
        let bucket = INTERVAL_BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(INTERVAL_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(interval.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// The instant every schedule is aligned to.
fn epoch() -> Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    Instant::from_std(*EPOCH.get_or_init(std::time::Instant::now))
}

/// A source's poll clock: aligned ticks, each one checked against the
/// schedule.
#[derive(Debug)]
pub struct Ticks {
    interval: Interval,
    period: Duration,
    last_scheduled: Option<Instant>,
    last_started: Option<Instant>,
    window: (u64, Duration, Instant),
}

impl Ticks {
    /// Ticks every `period`, on the multiples of `period` since the
    /// process started (so sources of one interval tick together).
    pub fn aligned(period: Duration, schedule: &PollSchedule) -> Self {
        let period = period.max(Duration::from_millis(1));
        schedule
            .configured_us
            .store(period.as_micros() as u64, Ordering::Relaxed);
        let now = Instant::now();
        let since = now.saturating_duration_since(epoch()).as_nanos();
        let step = period.as_nanos();
        let next = epoch() + Duration::from_nanos(since.div_ceil(step).saturating_mul(step) as u64);
        let mut interval = tokio::time::interval_at(next.max(now), period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Self {
            interval,
            period,
            last_scheduled: None,
            last_started: None,
            window: (0, Duration::ZERO, now),
        }
    }

    /// Waits for the next tick and books it: late, skipped, the interval
    /// since the previous poll.
    pub async fn tick(&mut self, schedule: &PollSchedule) {
        let scheduled = self.interval.tick().await;
        let now = Instant::now();
        if let Some(previous) = self.last_scheduled {
            let periods = (scheduled.saturating_duration_since(previous).as_nanos()
                + self.period.as_nanos() / 2)
                / self.period.as_nanos();
            let skipped = (periods as u64).saturating_sub(1);
            schedule.skipped.fetch_add(skipped, Ordering::Relaxed);
        }
        if now.saturating_duration_since(scheduled) > self.period / 2 {
            schedule.late.fetch_add(1, Ordering::Relaxed);
        }
        self.last_scheduled = Some(scheduled);
        if let Some(started) = self.last_started {
            let interval = now.saturating_duration_since(started);
            schedule.record(interval);
            let (n, sum, since) = &mut self.window;
            *n += 1;
            *sum += interval;
            if now.saturating_duration_since(*since) >= WINDOW {
                let mean = *sum / (*n).max(1) as u32;
                schedule
                    .recent_us
                    .store(mean.as_micros().max(1) as u64, Ordering::Relaxed);
                self.window = (0, Duration::ZERO, now);
            }
        }
        self.last_started = Some(now);
    }

    /// The device was unreachable: the next interval spans an outage and
    /// is not a schedule figure.
    pub fn interrupted(&mut self) {
        self.last_started = None;
        self.last_scheduled = None;
        self.window = (0, Duration::ZERO, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slow_polls_count_skipped_ticks_and_record_the_achieved_interval() {
        let schedule = PollSchedule::default();
        let mut ticks = Ticks::aligned(Duration::from_millis(100), &schedule);
        ticks.tick(&schedule).await;
        for _ in 0..5 {
            ticks.tick(&schedule).await;
        }
        let on_time = schedule.snapshot();
        assert_eq!(on_time.count, 5);
        assert_eq!(schedule.overruns(), 0, "{on_time:?}");
        // Each poll now takes 300 ms: of every three slots, one is polled
        // late and two are skipped.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            ticks.tick(&schedule).await;
        }
        let slow = schedule.snapshot();
        assert_eq!((slow.late, slow.skipped), (4, 6), "{slow:?}");
        assert_eq!(schedule.overruns(), 10);
        assert_eq!(slow.configured, Duration::from_millis(100));
        let over_250ms: u64 = slow
            .buckets
            .iter()
            .filter(|(le, _)| *le > 0.25)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(over_250ms, 4, "{slow:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn sources_with_one_interval_tick_at_the_same_instants() {
        let (a, b) = (PollSchedule::default(), PollSchedule::default());
        let mut first = Ticks::aligned(Duration::from_millis(100), &a);
        tokio::time::sleep(Duration::from_millis(37)).await;
        let mut second = Ticks::aligned(Duration::from_millis(100), &b);
        // The first source's first tick was due before the second started.
        first.tick(&a).await;
        first.tick(&a).await;
        let at_first = Instant::now();
        second.tick(&b).await;
        assert_eq!(
            Instant::now(),
            at_first,
            "the later source joins the same tick"
        );
        assert_eq!(
            at_first.duration_since(epoch()).as_millis() % 100,
            0,
            "ticks fall on multiples of the interval"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_achieved_interval_is_published_per_window() {
        let schedule = PollSchedule::default();
        let mut ticks = Ticks::aligned(Duration::from_millis(100), &schedule);
        for _ in 0..60 {
            ticks.tick(&schedule).await;
        }
        let achieved = schedule.snapshot().achieved.expect("a window passed");
        assert_eq!(achieved, Duration::from_millis(100));
    }
}
