//! Logging through `tracing`: plain text by default, JSON on request; no
//! ANSI colours unless stderr is a terminal (journald stores raw bytes).
//! Under systemd (`$JOURNAL_STREAM` set) each text line starts with its
//! syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug),
//! which journald takes as the entry's PRIORITY, and carries no time of
//! its own (journald stamps every entry).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// What is logged unless `RUST_LOG` says otherwise: the agent at info,
/// one line when a link goes down and one when it is back; the network
/// libraries' own lines (OPC UA, MQTT, HTTP, TLS: several per reconnect
/// attempt) only on request, since the agent's line says what happened and
/// what to do. sled's warnings stay.
pub const DEFAULT_FILTER: &str = "info,opcua_client=off,opcua_core=off,opcua_crypto=off,opcua_types=off,opcua_nodes=off,rumqttc=off,hyper=off,hyper_util=off,reqwest=off,h2=off,rustls=off,sled=warn";

/// Installs the global subscriber; `RUST_LOG` overrides [`DEFAULT_FILTER`].
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // A second init (tests, demo) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text if journald => builder
            .event_format(Prioritised(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .try_init(),
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A text line prefixed with its syslog priority for journald.
struct Prioritised<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Prioritised<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs the global subscriber writing plain text to `file` (the demo:
/// its terminal shows progress, the agent's log goes to a file).
#[cfg(feature = "demo")]
pub fn init_file(file: &std::path::Path) -> std::io::Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(false)
        .try_init();
    Ok(())
}
