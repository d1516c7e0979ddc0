//! Supervision of source and sink tasks.
//!
//! # Invariants
//!
//! - A task that panics or ends while the agent is not stopping is
//!   restarted with capped exponential backoff; every restart is counted,
//!   logged with the reason, and visible in `/status`, the metrics and
//!   `/readyz` (which fails while any task is down).
//! - A restarted task starts from what the journal holds, never from what
//!   it was given at the first start (a source re-reads its stored
//!   position: the one from start-up would count parts twice).
//! - A task that keeps failing without ever staying up for
//!   [`STABLE_AFTER`] is past recovery in-process: after
//!   [`MAX_QUICK_RESTARTS`] such restarts the agent stops feeding the
//!   systemd watchdog, so systemd restarts the whole service.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A task up this long counts as recovered (its failure streak resets).
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Failures in a row, each within [`STABLE_AFTER`] of its start, after
/// which the agent is unhealthy.
pub const MAX_QUICK_RESTARTS: u32 = 5;
/// Ceiling of the first restart's wait (jittered within its upper half).
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// What one supervised task is doing, for status, metrics and readiness.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskState {
    /// `source` or `sink`.
    pub kind: &'static str,
    /// The configured name.
    pub name: String,
    /// Running now.
    pub up: bool,
    /// Restarts since the agent started.
    pub restarts: u64,
    /// Failures in a row that did not stay up for [`STABLE_AFTER`].
    pub quick_failures: u32,
    /// Why it last stopped, if it ever failed.
    pub last_failure: Option<String>,
    /// When it was last started.
    #[serde(skip)]
    pub up_since: Option<Instant>,
}

/// The shared view of every supervised task.
#[derive(Clone, Default)]
pub struct Tasks(Arc<Mutex<Vec<TaskState>>>);

impl Tasks {
    /// A copy of every task's state.
    pub fn snapshot(&self) -> Vec<TaskState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first task that is down, with why.
    pub fn first_down(&self) -> Option<TaskState> {
        self.snapshot().into_iter().find(|t| !t.up)
    }

    /// A task that keeps failing and has not stayed up since (the agent
    /// cannot recover it by itself).
    pub fn past_recovery(&self) -> Option<TaskState> {
        self.snapshot().into_iter().find(|t| {
            t.quick_failures >= MAX_QUICK_RESTARTS
                && t.up_since
                    .is_none_or(|since| since.elapsed() < STABLE_AFTER)
        })
    }

    fn register(&self, kind: &'static str, name: &str) -> usize {
        let mut tasks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tasks.push(TaskState {
            kind,
            name: name.to_owned(),
            up: true,
            restarts: 0,
            quick_failures: 0,
            last_failure: None,
            up_since: Some(Instant::now()),
        });
        tasks.len() - 1
    }

    fn update(&self, index: usize, f: impl FnOnce(&mut TaskState)) {
        let mut tasks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(task) = tasks.get_mut(index) {
            f(task);
        }
    }
}

/// The text of a panic payload.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked".to_owned()
    }
}

/// A fault to inject for tests: `PLANT_EDGE_TEST_PANIC=<kind>:<name>:<n>`
/// makes that task panic shortly after each of its first `n` starts.
/// Debug builds only: a release binary ignores it.
fn injected_faults(kind: &str, name: &str) -> u32 {
    if !cfg!(debug_assertions) {
        return 0;
    }
    let Ok(spec) = std::env::var("PLANT_EDGE_TEST_PANIC") else {
        return 0;
    };
    let mut parts = spec.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(k), Some(n), times) if k == kind && n == name => {
            times.and_then(|t| t.parse().ok()).unwrap_or(1)
        }
        _ => 0,
    }
}

/// Runs `start()` as a supervised task until `stop` is true; returns the
/// supervisor's handle (it ends when the task ends on a stop).
pub fn spawn<F, Fut>(
    tasks: &Tasks,
    kind: &'static str,
    name: &str,
    mut stop: watch::Receiver<bool>,
    mut start: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Option<Fut> + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let index = tasks.register(kind, name);
    let tasks = tasks.clone();
    let name = name.to_owned();
    let mut inject = injected_faults(kind, &name);
    tokio::spawn(async move {
        let mut backoff = protocols::pace::Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
        loop {
            let started = Instant::now();
            let outcome = match start() {
                Some(task) => {
                    let fault = inject > 0;
                    inject = inject.saturating_sub(1);
                    let run = async move {
                        if fault {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            panic!("injected test fault");
                        }
                        task.await
                    };
                    // The task's own spawn: a panic stays inside it.
                    match tokio::spawn(run).await {
                        Ok(()) => None,
                        Err(e) if e.is_panic() => {
                            Some(format!("panicked: {}", panic_text(&*e.into_panic())))
                        }
                        Err(e) => Some(format!("task failed: {e}")),
                    }
                }
                None => Some("could not be started".to_owned()),
            };
            if *stop.borrow() {
                return;
            }
            let why = outcome.unwrap_or_else(|| "ended unexpectedly".to_owned());
            if started.elapsed() >= STABLE_AFTER {
                backoff.reset();
            }
            let wait = backoff.next_wait();
            tasks.update(index, |t| {
                t.up = false;
                t.up_since = None;
                t.last_failure = Some(why.clone());
                if started.elapsed() >= STABLE_AFTER {
                    t.quick_failures = 1;
                } else {
                    t.quick_failures += 1;
                }
            });
            tracing::error!(task = %name, kind, reason = %why, restart_in_ms = wait.as_millis() as u64, "TASK DOWN: restarting it");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
            tasks.update(index, |t| {
                t.up = true;
                t.up_since = Some(Instant::now());
                t.restarts += 1;
            });
            tracing::warn!(task = %name, kind, "task restarted");
        }
    })
}
