//! `plant-edge`: durable store-and-forward of production events from PLCs
//! and MES to the ERP. See `plant-edge --help`.

mod commission;
mod config;
#[cfg(feature = "demo")]
mod demo;
mod forwarder;
mod journal_cmd;
mod line_status;
mod logging;
mod metrics;
mod probe;
mod reconcile;
mod run;
mod status_cmd;
mod supervise;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, LogFormat};

/// Exit code for a bad configuration (EX_CONFIG); systemd does not restart.
const EXIT_CONFIG: u8 = 78;
/// The journal was written by a newer version (EX_DATAERR): not retried.
const EXIT_JOURNAL_NEWER: u8 = 65;

#[derive(Parser, Debug)]
#[command(
    name = "plant-edge",
    version,
    about = "Durable store-and-forward of production events from PLCs and MES to the ERP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent until SIGTERM/SIGINT.
    Run {
        /// Config file.
        #[arg(short, long)]
        config: PathBuf,
        /// Log as JSON lines (overrides agent.log_format).
        #[arg(long)]
        json_logs: bool,
    },
    /// Check a config file: exit 0, or 78 naming the file, key and what was expected.
    Validate {
        /// Config file.
        #[arg(short, long)]
        config: PathBuf,
        /// Then try every source and sink as configured (reads only, no
        /// event posted, no journal touched): one line each, exit 0 only
        /// if all are ok (commissioning).
        #[arg(long)]
        connect: bool,
    },
    /// Print a commented default configuration.
    PrintConfig,
    /// Inspect or repair a stopped agent's journal.
    Journal {
        #[command(flatten)]
        target: journal_cmd::Target,
        #[command(subcommand)]
        command: journal_cmd::JournalCommand,
    },
    /// Compare an ERP's bookings export (CSV or JSON lines with the event id
    /// and quantity) with what the PLC counted and the gateway sent, per
    /// line and period: exit 1 on any difference, naming the ids.
    Reconcile {
        /// Config file (its journal, or its running agent, and periods).
        #[arg(short, long, conflicts_with = "state")]
        config: Option<PathBuf>,
        /// State directory instead (periods are then UTC days).
        #[arg(long)]
        state: Option<PathBuf>,
        /// What the ERP booked.
        #[arg(long)]
        bookings: PathBuf,
        #[command(flatten)]
        window: reconcile::Window,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One-screen summary from a running agent (its metrics endpoint).
    Status {
        /// Config file (its agent.metrics_listen is asked; no secrets needed).
        #[arg(short, long)]
        config: PathBuf,
        /// The agent's whole status as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Ask a device what it holds, without touching any journal.
    #[command(subcommand)]
    Probe(ProbeCommand),
    #[cfg(feature = "demo")]
    /// Run the whole job locally (simulated PLC and MES → journal → simulated ERP, with a cloud outage) and reconcile.
    Demo {
        /// How long the plant produces (0: until Ctrl-C).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// How long the cloud link is cut midway (0: no outage).
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        outage: Duration,
        /// Keep the demo's state (journal, archive, config) here.
        #[arg(long)]
        state: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ProbeCommand {
    /// Read registers, coils or inputs from a Modbus device.
    Modbus {
        /// tcp://HOST[:PORT] or rtu:///dev/ttyUSB0?baud=19200&parity=E
        endpoint: String,
        /// Unit (slave) id.
        #[arg(long, default_value_t = 1)]
        unit: u8,
        /// What to read: holding:100..110, input:0..4, coil:5, discrete:0..8 (end exclusive).
        #[arg(long)]
        read: String,
        /// Decode registers as u16, i16, u32, i32, f32, bcd or string.
        #[arg(long = "as", default_value = "u16")]
        decode_as: String,
        /// Low word first for 32-bit values.
        #[arg(long)]
        low_word_first: bool,
        /// Swap the bytes inside each register.
        #[arg(long)]
        byte_swap: bool,
        /// Per-request timeout.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Browse, read or watch nodes of an OPC UA server.
    Opcua {
        /// opc.tcp://HOST:PORT[/PATH]
        endpoint: String,
        /// POLICY:MODE, e.g. Basic256Sha256:SignAndEncrypt (default None:None).
        #[arg(long, default_value = "None:None")]
        security: String,
        /// User name (with --password-file).
        #[arg(long)]
        user: Option<String>,
        /// File holding the password.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// PKI directory (own certificate, trusted/, rejected/).
        #[arg(long, default_value = "/var/lib/plant-edge/pki")]
        pki_dir: PathBuf,
        /// Trust the server's certificate without it being in trusted/.
        #[arg(long)]
        trust_server: bool,
        /// List the children of this node (ns=2;s=Line1, or i=85 for Objects).
        #[arg(long, group = "what")]
        browse: Option<String>,
        /// Print one value with status and timestamps.
        #[arg(long, group = "what")]
        read: Option<String>,
        /// Subscribe and print changes (Ctrl-C or --for ends it).
        #[arg(long, group = "what")]
        watch: Option<String>,
        /// How long --watch runs.
        #[arg(long = "for", default_value = "0s", value_parser = humantime::parse_duration)]
        watch_for: Duration,
        /// Per-request timeout.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("plant-edge: invalid configuration: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// `agent.worker_threads`: `None` one worker per core, 1 a current-thread
/// runtime (no worker pool at all), n a pool of n.
fn runtime_with(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().thread_name("plant-edge").build()
}

fn failure(e: anyhow::Error) -> ExitCode {
    eprintln!("plant-edge: {e:#}");
    let newer = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<buffer::JournalError>(),
            Some(buffer::JournalError::NewerFormat { .. })
        )
    });
    if newer {
        ExitCode::from(EXIT_JOURNAL_NEWER)
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    // One TLS stack for every client in the process: rustls with ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config, connect } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: OK ({} sources, {} sinks)",
                    config.display(),
                    c.sources.len(),
                    c.sinks.len()
                );
                if !connect {
                    return ExitCode::SUCCESS;
                }
                let report = match runtime() {
                    Ok(rt) => rt.block_on(commission::run(&c)),
                    Err(e) => return failure(e.into()),
                };
                for line in &report {
                    println!("{line}");
                }
                let failed = report.iter().filter(|c| c.result.is_err()).count();
                if failed == 0 {
                    println!("all {} checks ok", report.len());
                    ExitCode::SUCCESS
                } else {
                    println!("{failed} of {} checks FAILED", report.len());
                    ExitCode::FAILURE
                }
            }
            Err(e) => config_failure(&e),
        },
        Command::PrintConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Run { config, json_logs } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            logging::init(if json_logs {
                LogFormat::Json
            } else {
                config.log_format
            });
            match runtime_with(config.worker_threads)
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run::run(config)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "plant-edge stopped on an error");
                    failure(e)
                }
            }
        }
        Command::Journal { target, command } => {
            logging::init(LogFormat::Text);
            match journal_cmd::run(target, command) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => match e.downcast_ref::<ConfigError>() {
                    Some(ce) => config_failure(ce),
                    None => failure(e),
                },
            }
        }
        Command::Reconcile {
            config,
            state,
            bookings,
            window,
            json,
        } => {
            logging::init(LogFormat::Text);
            match reconcile::run_reconcile(config, state, &bookings, &window, json) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => match e.downcast_ref::<ConfigError>() {
                    Some(ce) => config_failure(ce),
                    None => failure(e),
                },
            }
        }
        Command::Status { config, json } => {
            let config = match Config::load_without_secrets(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            match runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(status_cmd::status(config, json)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => failure(e),
            }
        }
        Command::Probe(ProbeCommand::Modbus {
            endpoint,
            unit,
            read,
            decode_as,
            low_word_first,
            byte_swap,
            timeout,
        }) => {
            let probe = probe::modbus(
                &endpoint,
                unit,
                &read,
                &decode_as,
                low_word_first,
                byte_swap,
                timeout,
            );
            match runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(probe))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => failure(e),
            }
        }
        Command::Probe(ProbeCommand::Opcua {
            endpoint,
            security,
            user,
            password_file,
            pki_dir,
            trust_server,
            browse,
            read,
            watch,
            watch_for,
            timeout,
        }) => {
            let request = probe::OpcUaProbe {
                endpoint,
                security,
                user,
                password_file,
                pki_dir,
                trust_server,
                browse,
                read,
                watch,
                watch_for,
                timeout,
            };
            match runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(probe::opcua(request)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => failure(e),
            }
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            duration,
            outage,
            state,
        } => {
            // The agent's log goes to a file in the demo's state folder
            // (demo::run sets it up); the terminal shows progress only.
            match runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(demo::run(duration, outage, state)))
            {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => failure(e),
            }
        }
    }
}
