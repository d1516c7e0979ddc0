//! A simulated PLC line: good and scrap counters that advance on a timer,
//! read through the same counter semantics and journal path as a real
//! source. For trying plant-edge without hardware, and for the demo.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use buffer::event::Origin;
use buffer::EventType;

use crate::counter::{CounterRules, CounterState, CounterWidth};
use crate::runtime::{Closed, Positioned};
use crate::source::{CounterSignal, SourceContext};

/// Simulated line settings.
#[derive(Clone, Debug)]
pub struct SimulatedConfig {
    /// Line name.
    pub line: String,
    /// Machine name.
    pub machine: String,
    /// Poll (and production) interval.
    pub interval: Duration,
    /// Up to this many good parts per interval (random 0..=n).
    pub good_per_tick: u64,
    /// One scrap part every this many intervals (0: never).
    pub scrap_every: u64,
    /// Counter width; 16-bit wraps quickly, which shows wrap handling.
    pub width: CounterWidth,
    /// Raw value the simulated good counter starts from.
    pub start: u64,
}

/// Parts counted into the journal per (line, event type): what the
/// sources produced, for reconciliation against what sinks delivered.
pub type Tally = Arc<Mutex<BTreeMap<(String, String), u64>>>;

/// Runs the simulated line until shutdown. Returns on shutdown or when the
/// journal stops taking appends.
pub async fn run(ctx: SourceContext, config: SimulatedConfig, tally: Tally) {
    let rules = CounterRules {
        width: config.width,
        max_step: config.good_per_tick.max(1) * 4,
    };
    let signals = [
        CounterSignal {
            name: "good".into(),
            event_type: EventType::completion(),
            unit: "EA".into(),
            line: config.line.clone(),
            machine: config.machine.clone(),
            attributes: BTreeMap::new(),
            rules,
        },
        CounterSignal {
            name: "scrap".into(),
            event_type: EventType::scrap(),
            unit: "EA".into(),
            line: config.line.clone(),
            machine: config.machine.clone(),
            attributes: BTreeMap::new(),
            rules,
        },
    ];
    let mut states = Positioned::<BTreeMap<String, CounterState>>::load(&ctx);
    // A real PLC keeps counting while the agent is down; model that by
    // resuming the simulated counters where the stored cursor left them.
    let resume = |signal: &str, default: u64| states.get().get(signal).map_or(default, |s| s.raw);
    let start = match config.width {
        CounterWidth::U64 => config.start,
        width => config.start % (width.max() + 1),
    };
    let mut plc = [resume("good", start), resume("scrap", 0)];
    let mut ticker = tokio::time::interval(config.interval);
    let mut shutdown = ctx.shutdown.clone();
    let mut tick: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        // The first poll reads the counters as found (the baseline); the
        // line produces between polls.
        if tick > 0 {
            let made = fastrand::u64(0..=config.good_per_tick);
            plc[0] = advance(plc[0], made, config.width);
            if config.scrap_every > 0 && tick.is_multiple_of(config.scrap_every) {
                plc[1] = advance(plc[1], 1, config.width);
            }
        }
        tick += 1;
        let read_at = SystemTime::now();
        let mut next_states = states.get().clone();
        let mut events = Vec::new();
        let mut counted = Vec::new();
        for (signal, raw) in signals.iter().zip(plc) {
            let observation = signal
                .rules
                .observe(states.get().get(&signal.name).copied(), raw);
            next_states.insert(signal.name.clone(), observation.next);
            let origin = Origin {
                protocol: "simulated".into(),
                endpoint: format!("sim://{}", config.machine),
                address: signal.name.clone(),
                quality: "good".into(),
                source_time: None,
            };
            if let Some(event) = signal.event_for(&ctx, &observation, origin, read_at) {
                events.push(ctx.new_event(&event));
                counted.push((signal.event_type.to_string(), observation.delta));
            }
        }
        let stored = states
            .store_batched(&ctx, events, next_states, "counting again next poll")
            .await;
        match stored {
            Ok(Some(outcome)) => {
                let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
                for ((event_type, delta), seq) in counted.into_iter().zip(outcome.seqs) {
                    if seq.is_some() {
                        *tally.entry((config.line.clone(), event_type)).or_default() += delta;
                    }
                }
            }
            Ok(None) => {}
            Err(Closed) => break,
        }
    }
    tracing::info!(source = %ctx.name, "simulated source stopped");
}

fn advance(raw: u64, by: u64, width: CounterWidth) -> u64 {
    match width {
        CounterWidth::U64 => raw.wrapping_add(by),
        other => (raw + by) % (other.max() + 1),
    }
}
