//! One device connection (a Modbus TCP endpoint or a serial line), owned
//! by one task; every source that names the endpoint sends its requests
//! here and waits for the answer.
//!
//! # Invariants
//!
//! - Only the device task touches the connection. It is busy only with
//!   requests: a source that waits for the journal (a commit window, a
//!   handshake's fsync) holds nothing another source needs, so one
//!   source's commit never delays another source's reads.
//! - Reads queued at the same moment (sources ticking together, as their
//!   aligned schedules make them) are merged per unit and table into the
//!   fewest requests the protocol allows (125 registers, 2000 bits), with
//!   no larger gap than the smallest `max_gap` among them. A merged read
//!   the device refuses is done again as each source's own reads in the
//!   same batch, so one source's bad address never marks another
//!   source's values bad.
//! - Each request runs under its source's timeout. A transport error or
//!   timeout drops the connection (a half-read frame may sit in the
//!   codec) and answers every request still in the batch with it; a
//!   failed connect holds off the next one for a backoff, answering at
//!   once meanwhile, so twenty sources do not dial a dead PLC twenty times.
//! - An outage is logged once when it starts and once when it ends, per
//!   device, not per source; so is a schedule the device cannot keep
//!   ("20 sources want 200 polls/s, achieved 19/s").
//! - The channel to the task is bounded; each source has at most one
//!   request outstanding.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_modbus::client::{Context, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use super::map::{plan, Address, Read, Table};
use super::{connect, read, Endpoint};

/// Requests a device task can have queued (each source has one at most).
const QUEUE: usize = 256;
/// Most requests taken into one batch.
const BATCH: usize = 64;
/// How often the device compares the polls its sources want with the
/// polls they got.
pub(super) const SCHEDULE_WINDOW: Duration = Duration::from_secs(10);
/// Below this share of the wanted polls, the device "cannot keep up".
const KEEPS_UP: f64 = 0.95;
/// Longest wait, at a tick, for the first reads of the other sources
/// that read counters at every tick (they tick at the same instants, but
/// wake one after another on two cores).
const TICK_GATHER: Duration = Duration::from_millis(2);

/// What a source asks of the device.
enum Work {
    /// Read these spans.
    Read {
        spans: Vec<(Address, u16)>,
        max_gap: u16,
        /// The source's first read of a tick (its counters): worth
        /// waiting a moment for the other sources' first reads.
        at_tick: bool,
    },
    /// Set a coil (true unless `value` is 0) or a holding register.
    Write { address: Address, value: u16 },
}

struct Job {
    unit: u8,
    timeout: Duration,
    work: Work,
    reply: oneshot::Sender<Result<Answer, String>>,
}

/// The device's answer to one request.
pub(super) enum Answer {
    /// Per read request: the words, or the device's exception.
    Read(Vec<(Read, Result<Vec<u16>, ExceptionCode>)>),
    /// The write's outcome.
    Written(Result<(), ExceptionCode>),
}

/// A device's request counts and schedule, shared with its sources.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Modbus requests sent (reads and writes).
    pub requests: AtomicU64,
    /// Source read requests answered from a merged read.
    pub merged: AtomicU64,
    /// Connections made.
    pub connects: AtomicU64,
    /// Polls its sources made (for the schedule check).
    polls: AtomicU64,
    /// Sum over registered sources of polls wanted per second, × 1000.
    wanted_millipolls: AtomicU64,
    /// Registered sources that read counters at every tick.
    tick_readers: AtomicU64,
}

/// One endpoint's connection, shared while any source holds it.
pub struct Device {
    jobs: mpsc::Sender<Job>,
    /// Counters shared with the device task.
    pub counters: Arc<DeviceCounters>,
}

/// A source's claim on a device's schedule: its polls count towards the
/// device's "wanted" rate until dropped.
pub(super) struct Registration {
    counters: Arc<DeviceCounters>,
    millipolls: u64,
    reads_at_tick: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.counters
            .wanted_millipolls
            .fetch_sub(self.millipolls, Ordering::Relaxed);
        if self.reads_at_tick {
            self.counters.tick_readers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Registration {
    /// One poll done.
    pub(super) fn polled(&self) {
        self.counters.polls.fetch_add(1, Ordering::Relaxed);
    }
}

impl Device {
    /// The device for `endpoint`: the running one if any source holds it,
    /// else a new task on the current runtime.
    pub(super) fn for_endpoint(endpoint: &Endpoint) -> Arc<Device> {
        static DEVICES: std::sync::OnceLock<Mutex<BTreeMap<String, Weak<Device>>>> =
            std::sync::OnceLock::new();
        let mut devices = DEVICES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = endpoint.to_string();
        // A device whose task ended (its runtime shut down) is not reused.
        if let Some(device) = devices
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|d| !d.jobs.is_closed())
        {
            return device;
        }
        let (jobs, queue) = mpsc::channel(QUEUE);
        let counters = Arc::new(DeviceCounters::default());
        let device = Arc::new(Device {
            jobs,
            counters: counters.clone(),
        });
        tokio::spawn(serve(endpoint.clone(), queue, counters));
        devices.retain(|_, weak| weak.strong_count() > 0);
        devices.insert(key, Arc::downgrade(&device));
        device
    }

    /// Counts a source wanting one poll every `interval` (and reading
    /// counters at each tick if `reads_at_tick`).
    pub(super) fn register(&self, interval: Duration, reads_at_tick: bool) -> Registration {
        let millipolls = (1000.0 / interval.as_secs_f64().max(0.001)).round() as u64;
        self.counters
            .wanted_millipolls
            .fetch_add(millipolls, Ordering::Relaxed);
        if reads_at_tick {
            self.counters.tick_readers.fetch_add(1, Ordering::Relaxed);
        }
        Registration {
            counters: self.counters.clone(),
            millipolls,
            reads_at_tick,
        }
    }

    async fn ask(&self, unit: u8, timeout: Duration, work: Work) -> Result<Answer, String> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            unit,
            timeout,
            work,
            reply,
        };
        if self.jobs.send(job).await.is_err() {
            return Err("the device task ended".into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err("the device task ended".into()))
    }

    /// Reads `spans` of `unit` (merged with other sources' reads of the
    /// moment; `at_tick`: the source's counters at its tick). Outer
    /// error: transport (reconnect); per read: the device's exception.
    pub(super) async fn read_spans(
        &self,
        unit: u8,
        spans: Vec<(Address, u16)>,
        max_gap: u16,
        timeout: Duration,
        at_tick: bool,
    ) -> Result<Vec<(Read, Result<Vec<u16>, ExceptionCode>)>, String> {
        let work = Work::Read {
            spans,
            max_gap,
            at_tick,
        };
        match self.ask(unit, timeout, work).await? {
            Answer::Read(reads) => Ok(reads),
            Answer::Written(_) => Err("the device task answered a read with a write".into()),
        }
    }

    /// Sets a flag (coil true/false, or holding register 1/0).
    pub(super) async fn write_flag(
        &self,
        unit: u8,
        address: Address,
        on: bool,
        timeout: Duration,
    ) -> Result<Result<(), ExceptionCode>, String> {
        self.write(unit, address, u16::from(on), timeout).await
    }

    /// Writes one holding register (or a coil: on unless `value` is 0).
    pub(super) async fn write(
        &self,
        unit: u8,
        address: Address,
        value: u16,
        timeout: Duration,
    ) -> Result<Result<(), ExceptionCode>, String> {
        match self
            .ask(unit, timeout, Work::Write { address, value })
            .await?
        {
            Answer::Written(result) => Ok(result),
            Answer::Read(_) => Err("the device task answered a write with a read".into()),
        }
    }
}

/// The connection's state inside the device task.
struct Link {
    endpoint: Endpoint,
    context: Option<Context>,
    /// No connect before this (after a failed one).
    hold_off: Option<(Instant, String)>,
    backoff: crate::pace::Backoff,
    outage: crate::pace::Outage,
    counters: Arc<DeviceCounters>,
}

impl Link {
    /// Silence after a serial transaction: 3.5 character times (11 bits
    /// each), at least 1.75 ms as the Modbus RTU spec fixes above 19200
    /// baud. None on TCP.
    fn frame_gap(&self) -> Option<Duration> {
        let Endpoint::Rtu(settings) = &self.endpoint else {
            return None;
        };
        let per_char = Duration::from_secs_f64(11.0 / settings.baud.max(300) as f64);
        Some(per_char.mul_f64(3.5).max(Duration::from_micros(1750)))
    }

    /// The connection, made if needed (unless held off after a failure).
    async fn ready(&mut self, unit: u8, timeout: Duration) -> Result<&mut Context, String> {
        if self.context.is_none() {
            if let Some((until, why)) = &self.hold_off {
                if Instant::now() < *until {
                    return Err(why.clone());
                }
            }
            match connect(&self.endpoint, unit, timeout).await {
                Ok(context) => {
                    self.counters.connects.fetch_add(1, Ordering::Relaxed);
                    self.hold_off = None;
                    self.backoff.reset();
                    let device = self.endpoint.to_string();
                    match self.outage.recovered() {
                        Some((lasted, failures)) => {
                            tracing::info!(%device, after = %crate::pace::human(lasted), failed_attempts = failures, "PLC back; counters catch up from their stored positions")
                        }
                        None => tracing::info!(%device, "PLC connected"),
                    }
                    self.context = Some(context);
                }
                Err(e) => {
                    let wait = self.backoff.next_wait();
                    if self.outage.failed() {
                        tracing::warn!(device = %self.endpoint, error = %e, since = %self.outage.since_text(), "PLC UNREACHABLE: reconnecting with backoff");
                    } else {
                        tracing::debug!(device = %self.endpoint, error = %e, retry_in_ms = wait.as_millis() as u64, "PLC still unreachable");
                    }
                    self.hold_off = Some((Instant::now() + wait, e.clone()));
                    return Err(e);
                }
            }
        }
        match self.context.as_mut() {
            Some(context) => {
                context.set_slave(Slave(unit));
                Ok(context)
            }
            None => Err("not connected".into()),
        }
    }

    /// One read; a transport error drops the connection.
    async fn read(
        &mut self,
        unit: u8,
        r: Read,
        timeout: Duration,
    ) -> Result<Result<Vec<u16>, ExceptionCode>, String> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let context = self.ready(unit, timeout).await?;
        let result = read(context, r, timeout).await;
        self.after_request(&result).await;
        result
    }

    async fn write(
        &mut self,
        unit: u8,
        address: Address,
        value: u16,
        timeout: Duration,
    ) -> Result<Result<(), ExceptionCode>, String> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let context = self.ready(unit, timeout).await?;
        let call = async {
            match address.table {
                Table::Coil => context.write_single_coil(address.offset, value != 0).await,
                _ => context.write_single_register(address.offset, value).await,
            }
        };
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err(format!("writing {address}: {e}")),
            Err(_) => Err(format!("no answer within {timeout:?} writing {address}")),
        };
        self.after_request(&result).await;
        result
    }

    async fn after_request<T>(&mut self, result: &Result<T, String>) {
        if let Err(e) = result {
            tracing::warn!(device = %self.endpoint, error = %e, "PLC link lost; reconnecting");
            self.context = None;
        }
        if let Some(gap) = self.frame_gap() {
            tokio::time::sleep(gap).await;
        }
    }
}

/// The device task: takes requests until every source let go.
async fn serve(endpoint: Endpoint, mut queue: mpsc::Receiver<Job>, counters: Arc<DeviceCounters>) {
    let mut link = Link {
        endpoint,
        context: None,
        hold_off: None,
        backoff: crate::pace::Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
        outage: crate::pace::Outage::default(),
        counters: counters.clone(),
    };
    let mut schedule = ScheduleCheck::new(counters.clone());
    let mut check = tokio::time::interval(SCHEDULE_WINDOW);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            job = queue.recv() => match job {
                Some(job) => job,
                None => return,
            },
            _ = check.tick() => {
                schedule.check(&link.endpoint, link.outage_now());
                continue;
            }
        };
        let mut batch = vec![first];
        // Let the other sources woken by the same tick queue their reads
        // before this batch goes out, so they share its requests.
        loop {
            tokio::task::yield_now().await;
            let before = batch.len();
            while batch.len() < BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if batch.len() == before || batch.len() >= BATCH {
                break;
            }
        }
        gather_tick_reads(&mut queue, &mut batch, &counters).await;
        execute(&mut link, batch).await;
    }
}

fn at_tick(job: &Job) -> bool {
    matches!(job.work, Work::Read { at_tick: true, .. })
}

/// At a tick, waits up to [`TICK_GATHER`] for the first reads of every
/// source that reads counters at each tick, so the tick costs one merged
/// set of requests rather than one per source.
async fn gather_tick_reads(
    queue: &mut mpsc::Receiver<Job>,
    batch: &mut Vec<Job>,
    counters: &DeviceCounters,
) {
    if !batch.iter().any(at_tick) {
        return;
    }
    let deadline = Instant::now() + TICK_GATHER;
    let readers = counters.tick_readers.load(Ordering::Relaxed) as usize;
    while batch.len() < BATCH && batch.iter().filter(|j| at_tick(j)).count() < readers {
        match tokio::time::timeout_at(deadline, queue.recv()).await {
            Ok(Some(job)) => batch.push(job),
            Ok(None) | Err(_) => return,
        }
    }
}

impl Link {
    fn outage_now(&self) -> bool {
        self.context.is_none()
    }
}

/// Runs one batch: reads merged per unit, then writes in arrival order.
async fn execute(link: &mut Link, batch: Vec<Job>) {
    let mut reads: BTreeMap<u8, Vec<Job>> = BTreeMap::new();
    let mut writes = Vec::new();
    for job in batch {
        match job.work {
            Work::Read { .. } => reads.entry(job.unit).or_default().push(job),
            Work::Write { .. } => writes.push(job),
        }
    }
    for (unit, jobs) in reads {
        read_together(link, unit, jobs).await;
    }
    for job in writes {
        let Work::Write { address, value } = job.work else {
            continue;
        };
        let result = link.write(job.unit, address, value, job.timeout).await;
        // A source that stopped waiting (shutdown) needs no answer.
        let _ = job.reply.send(result.map(Answer::Written));
    }
}

fn spans_of(job: &Job) -> (&[(Address, u16)], u16) {
    match &job.work {
        Work::Read { spans, max_gap, .. } => (spans, *max_gap),
        Work::Write { .. } => (&[], 0),
    }
}

/// Whether `r` holds any word of the span `(address, width)`.
fn covers(r: &Read, (address, width): &(Address, u16)) -> bool {
    let end = address.offset.saturating_add(*width);
    r.table == address.table && address.offset < r.start.saturating_add(r.count) && r.start < end
}

/// Reads of one unit for several sources: one merged plan; if the device
/// refuses any merged request, each source's own plan instead.
async fn read_together(link: &mut Link, unit: u8, jobs: Vec<Job>) {
    let timeout = jobs
        .iter()
        .map(|j| j.timeout)
        .max()
        .unwrap_or(Duration::from_secs(1));
    if jobs.len() > 1 {
        let all: Vec<(Address, u16)> = jobs
            .iter()
            .flat_map(|j| spans_of(j).0.iter().copied())
            .collect();
        let gap = jobs.iter().map(|j| spans_of(j).1).min().unwrap_or(0);
        let mut done = Vec::new();
        let mut refused = false;
        for r in plan(&all, gap) {
            match link.read(unit, r, timeout).await {
                Ok(Ok(words)) => done.push((r, Ok(words))),
                Ok(Err(_)) => {
                    refused = true;
                    break;
                }
                Err(e) => {
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                    return;
                }
            }
        }
        if !refused {
            link.counters
                .merged
                .fetch_add(jobs.len() as u64, Ordering::Relaxed);
            for job in jobs {
                let mine: Vec<(Read, Result<Vec<u16>, ExceptionCode>)> = done
                    .iter()
                    .filter(|(r, _)| spans_of(&job).0.iter().any(|s| covers(r, s)))
                    .cloned()
                    .collect();
                let _ = job.reply.send(Ok(Answer::Read(mine)));
            }
            return;
        }
    }
    let mut jobs = jobs.into_iter();
    while let Some(job) = jobs.next() {
        let (spans, gap) = spans_of(&job);
        let mut mine = Vec::new();
        let mut failed = None;
        for r in plan(spans, gap) {
            match link.read(unit, r, job.timeout).await {
                Ok(result) => mine.push((r, result)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            let _ = job.reply.send(Err(e.clone()));
            for rest in jobs {
                let _ = rest.reply.send(Err(e.clone()));
            }
            return;
        }
        let _ = job.reply.send(Ok(Answer::Read(mine)));
    }
}

/// Compares the polls the device's sources want with the polls they got,
/// once per [`SCHEDULE_WINDOW`], and says so once when the device cannot
/// keep up and once when it can again.
struct ScheduleCheck {
    counters: Arc<DeviceCounters>,
    polls_before: u64,
    since: Instant,
    behind: bool,
}

impl ScheduleCheck {
    fn new(counters: Arc<DeviceCounters>) -> Self {
        Self {
            polls_before: counters.polls.load(Ordering::Relaxed),
            counters,
            since: Instant::now(),
            behind: false,
        }
    }

    fn check(&mut self, endpoint: &Endpoint, unreachable: bool) {
        let polls = self.counters.polls.load(Ordering::Relaxed);
        let elapsed = self.since.elapsed().as_secs_f64();
        let done = polls.saturating_sub(self.polls_before);
        self.polls_before = polls;
        self.since = Instant::now();
        let wanted = self.counters.wanted_millipolls.load(Ordering::Relaxed) as f64 / 1000.0;
        // An unreachable device is an outage, logged as one; the first
        // window after start may hold no full poll yet.
        if unreachable || wanted <= 0.0 || elapsed < SCHEDULE_WINDOW.as_secs_f64() / 2.0 {
            return;
        }
        let achieved = done as f64 / elapsed;
        if achieved < wanted * KEEPS_UP {
            if !self.behind {
                tracing::warn!(device = %endpoint, wanted_per_s = wanted, achieved_per_s = (achieved * 10.0).round() / 10.0, "PLC {endpoint}: its sources want {wanted:.0} polls/s, achieved {achieved:.1}/s; the device or the link cannot keep up (see each source's overruns)");
            }
            self.behind = true;
        } else if self.behind {
            tracing::info!(device = %endpoint, wanted_per_s = wanted, achieved_per_s = (achieved * 10.0).round() / 10.0, "PLC {endpoint} keeps its sources' schedule again");
            self.behind = false;
        }
    }
}
