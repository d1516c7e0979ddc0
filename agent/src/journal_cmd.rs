//! `plant-edge journal ...`: inspect and repair a stopped agent's journal.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use buffer::journal::DeadLetter;
use buffer::{Journal, JournalConfig, JournalError};
use clap::{Args, Subcommand};

use crate::config::Config;

/// Which journal: from a config file or a state directory.
#[derive(Args, Debug)]
pub struct Target {
    /// Config file (its agent.state_dir is used).
    #[arg(short, long, conflicts_with = "state")]
    config: Option<PathBuf>,
    /// State directory (holds `journal/`).
    #[arg(long)]
    state: Option<PathBuf>,
}

/// Journal subcommands.
#[derive(Subcommand, Debug)]
pub enum JournalCommand {
    /// Figures: pending, bytes, sink cursors, dead letters, counters.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Pending events, oldest first.
    List {
        /// First sequence to list.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Most events to list.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One event's CloudEvents JSON, by id (UUID) or sequence number.
    Show {
        /// Event id or sequence.
        id: String,
    },
    /// Check sequences, decoding and cursors; exit 1 on problems.
    Verify,
    /// Per line and period: counted at the PLC (checkpoints), sent,
    /// delivered, pending, dead-lettered, difference; from the ledger, also
    /// while the agent runs (asked over its metrics endpoint with -c).
    /// Exit 1 when a closed period's counted and sent differ.
    Report {
        #[command(flatten)]
        window: crate::reconcile::Window,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The backlog (with the sinks each event still goes to), dead letters
    /// and source positions in the versioned interchange format (NDJSON,
    /// README "Moving a journal"), to stdout or a file; read back with
    /// `import` by this or any later version.
    Export {
        /// Output file (default stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only the pending events' CloudEvents JSON, one per line (for
        /// other tools; `import` does not read it).
        #[arg(long)]
        events: bool,
    },
    /// Reads an export into this journal (created if there is none):
    /// events appended unless their id is already here, dead letters kept,
    /// positions replaced. Safe to run twice.
    Import {
        /// The export file.
        file: PathBuf,
    },
    /// Confirms a format upgrade: removes the journal kept from before it
    /// (from then on the previous version refuses this journal instead of
    /// rolling back to the kept one). Runs beside a running agent.
    CommitUpgrade,
    /// Rejected and expired events.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// The sinks the journal keeps events for.
    #[command(subcommand)]
    Sinks(SinkCommand),
}

/// Sink subcommands.
#[derive(Subcommand, Debug)]
pub enum SinkCommand {
    /// One line per registered sink: name and backlog.
    List,
    /// Unregister a sink that left the configuration for good: its
    /// undelivered events go to the dead letters (reason `sink-removed`).
    Retire {
        /// The sink's name.
        name: String,
    },
}

/// Dead-letter subcommands.
#[derive(Subcommand, Debug)]
pub enum DeadLetterCommand {
    /// One line per dead letter: number, sink, reason, id.
    List {
        /// Print JSON lines with the event included.
        #[arg(long)]
        json: bool,
        /// Only those whose reason contains this text (any case).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Every dead letter (or those with a reason containing `--reason`) as
    /// JSON lines with the event, for a spreadsheet or the ERP team.
    Export {
        /// Only those whose reason contains this text (any case).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Send dead letters again (same id) to the sink that refused them.
    Requeue {
        /// Dead-letter numbers.
        numbers: Vec<u64>,
        /// All of them.
        #[arg(long, conflicts_with_all = ["numbers", "reason"])]
        all: bool,
        /// Those whose reason contains this text (any case): after fixing
        /// the cause, e.g. `--reason "material unknown"`.
        #[arg(long, conflicts_with = "numbers")]
        reason: Option<String>,
    },
    /// Delete dead letters for good.
    Purge {
        /// Dead-letter numbers.
        numbers: Vec<u64>,
        /// All of them.
        #[arg(long, conflicts_with_all = ["numbers", "reason"])]
        all: bool,
        /// Those whose reason contains this text (any case).
        #[arg(long, conflicts_with = "numbers")]
        reason: Option<String>,
    },
}

/// Dead letters whose reason contains `pattern` (any case); all without one.
fn matching(letters: Vec<DeadLetter>, pattern: Option<&str>) -> Vec<DeadLetter> {
    let Some(pattern) = pattern.map(str::to_lowercase) else {
        return letters;
    };
    letters
        .into_iter()
        .filter(|d| d.reason.to_lowercase().contains(&pattern))
        .collect()
}

/// The numbers a requeue or purge acts on: named, all (`None`), or those
/// matching a reason.
fn selected(
    journal: &Journal,
    numbers: Vec<u64>,
    all: bool,
    reason: Option<&str>,
) -> anyhow::Result<Option<Vec<u64>>> {
    Ok(match (all, reason) {
        (true, _) => None,
        (false, Some(pattern)) => Some(
            matching(journal.dead_letters()?, Some(pattern))
                .iter()
                .map(|d| d.number)
                .collect(),
        ),
        (false, None) if numbers.is_empty() => {
            bail!("name dead-letter numbers, or pass --all or --reason TEXT")
        }
        (false, None) => Some(numbers),
    })
}

fn json_line(d: &DeadLetter) -> anyhow::Result<String> {
    let event: serde_json::Value =
        serde_json::from_slice(&d.payload).unwrap_or(serde_json::Value::Null);
    let mut v = serde_json::to_value(d)?;
    v["event"] = event;
    Ok(v.to_string())
}

/// Run as root on the service's journal, sled would leave root-owned files
/// (its settings, snapshots) that the service then cannot open. So root
/// acts as the journal directory's owner for the whole command.
fn act_as_owner(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let meta = std::fs::metadata(dir)?;
    let (uid, gid) = (meta.uid(), meta.gid());
    if uid == 0 {
        return Ok(());
    }
    let owner = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    let switched = nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(gid)])
        .and_then(|()| nix::unistd::setgid(nix::unistd::Gid::from_raw(gid)))
        .and_then(|()| nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)));
    match switched {
        Ok(()) => {
            eprintln!(
                "plant-edge: acting as {owner} (the owner of {}), so the service can still open what this command writes",
                dir.display()
            );
            Ok(())
        }
        Err(e) => bail!(
            "cannot act as {owner}, the owner of {} ({e}); run it as that user: runuser -u {owner} -- plant-edge journal ...",
            dir.display()
        ),
    }
}

fn journal_dir(target: &Target) -> anyhow::Result<PathBuf> {
    Ok(match (&target.config, &target.state) {
        (Some(file), _) => Config::load_without_secrets(file)?.journal_dir(),
        (None, Some(state)) => state.join("journal"),
        (None, None) => bail!("say which journal: -c CONFIG or --state DIR"),
    })
}

fn open(target: &Target) -> anyhow::Result<Journal> {
    let dir = journal_dir(target)?;
    if !dir.join("db").exists() {
        bail!("no journal at {}", dir.display());
    }
    open_dir(dir)
}

fn open_dir(dir: PathBuf) -> anyhow::Result<Journal> {
    act_as_owner(&dir)?;
    let mut jc = JournalConfig::new(&dir);
    jc.lock_wait = Duration::from_millis(500);
    match Journal::open(jc) {
        Ok(journal) => Ok(journal),
        Err(JournalError::Locked { path }) => bail!(
            "the journal at {} is in use; stop the agent first (systemctl stop plant-edge)",
            path.display()
        ),
        Err(e) => Err(e).context("opening the journal"),
    }
}

fn commit_upgrade(target: &Target) -> anyhow::Result<bool> {
    let dir = journal_dir(target)?;
    match buffer::journal::upgrade::commit(&dir).context("committing the upgrade")? {
        Some((marker, freed)) => println!(
            "upgrade committed: format {} (from {}, format {}); removed the kept journal {} ({} bytes). The previous version now refuses this journal instead of rolling back.",
            marker.to_format, marker.from_writer, marker.from_format, marker.kept, freed
        ),
        None => println!("no upgrade to commit at {}", dir.display()),
    }
    Ok(true)
}

fn import(target: &Target, file: &std::path::Path) -> anyhow::Result<bool> {
    let dir = journal_dir(target)?;
    let mut input = std::io::BufReader::new(
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let journal = open_dir(dir)?;
    let counts = journal
        .import_from(&mut input)
        .with_context(|| format!("importing {}", file.display()))?;
    journal.close()?;
    println!(
        "imported {} events, {} dead letters, {} positions; {} already here (same id), skipped{}",
        counts.events,
        counts.dead_letters,
        counts.positions,
        counts.duplicates,
        if counts.complete {
            ""
        } else {
            "; THE FILE HAS NO END RECORD: it was cut short, what it held is imported"
        }
    );
    Ok(counts.complete)
}

/// Runs a journal command; `Ok(false)` means "ran, found problems".
pub fn run(target: Target, command: JournalCommand) -> anyhow::Result<bool> {
    if let JournalCommand::Report { window, json } = &command {
        return crate::reconcile::run_report(target.config, target.state, window, *json);
    }
    if let JournalCommand::CommitUpgrade = &command {
        return commit_upgrade(&target);
    }
    if let JournalCommand::Import { file } = &command {
        return import(&target, file);
    }
    let journal = open(&target)?;
    let mut out = std::io::stdout().lock();
    match command {
        // Answered above, before the journal was opened.
        JournalCommand::Report { .. }
        | JournalCommand::CommitUpgrade
        | JournalCommand::Import { .. } => {}
        JournalCommand::Stats { json } => {
            let s = journal.stats();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
            } else {
                writeln!(out, "pending events     {}", s.pending_events)?;
                writeln!(
                    out,
                    "pending bytes      {} of {} (with dead letters: {})",
                    s.pending_bytes, s.max_bytes, s.used_bytes
                )?;
                writeln!(
                    out,
                    "oldest pending     {}",
                    s.oldest_pending_age_ms
                        .map(
                            |ms| humantime::format_duration(Duration::from_secs(ms / 1000))
                                .to_string()
                        )
                        .unwrap_or_else(|| "-".into())
                )?;
                writeln!(out, "next sequence      {}", s.next_seq)?;
                writeln!(
                    out,
                    "ledger             {} bytes{}",
                    s.ledger_bytes,
                    journal
                        .ledger_since()?
                        .map(|ms| format!(
                            ", since {}",
                            buffer::event::rfc3339_millis(
                                std::time::UNIX_EPOCH + Duration::from_millis(ms)
                            )
                        ))
                        .unwrap_or_default()
                )?;
                writeln!(
                    out,
                    "dead letters       {} ({} bytes)",
                    s.dead_letters, s.dead_letter_bytes
                )?;
                writeln!(
                    out,
                    "dedup window ids   {} ({} KiB in memory)",
                    s.dedup_ids,
                    s.dedup_bytes / 1024
                )?;
                if let Some(upgrade) = journal.upgrade_pending() {
                    writeln!(
                        out,
                        "upgrade            format {} -> {}, not committed (kept: {}; plant-edge journal commit-upgrade)",
                        upgrade.from_format, upgrade.to_format, upgrade.kept
                    )?;
                }
                for sink in &s.sinks {
                    writeln!(
                        out,
                        "sink {:<13} cursor {} backlog {}",
                        sink.name, sink.cursor, sink.backlog
                    )?;
                }
                let c = s.counters;
                writeln!(out, "appended {} duplicates {} delivered {} rejected {} expired {} dropped-telemetry {} held-for-space {} requeued {} purged {} orphaned {} quarantined {}",
                    c.appended, c.duplicates, c.delivered, c.rejected, c.expired, c.dropped_telemetry, c.backpressured, c.requeued, c.purged, c.orphaned, c.quarantined)?;
            }
        }
        JournalCommand::List { from, limit } => {
            for e in journal.list(from, limit)? {
                writeln!(
                    out,
                    "{:>10}  {}  {:<24} {:<22} {:<9} {}  {} B",
                    e.seq,
                    e.id,
                    e.event_type,
                    e.source,
                    format!("{:?}", e.class).to_lowercase(),
                    e.appended,
                    e.bytes
                )?;
            }
        }
        JournalCommand::Show { id } => {
            let found = match id.parse::<u64>() {
                Ok(seq) => journal.find(None, Some(seq))?,
                Err(_) => {
                    let uuid = buffer::journal::parse_id(&id).with_context(|| {
                        format!("{id:?} is neither a sequence number nor a UUID")
                    })?;
                    let pending = journal.find(Some(uuid), None)?;
                    match pending {
                        Some(p) => Some(p),
                        None => {
                            if let Some(d) =
                                journal.dead_letters()?.into_iter().find(|d| d.id == uuid)
                            {
                                writeln!(
                                    out,
                                    "# dead letter {} (sink {}, reason: {})",
                                    d.number, d.sink, d.reason
                                )?;
                                out.write_all(&d.payload)?;
                                writeln!(out)?;
                                return Ok(true);
                            }
                            None
                        }
                    }
                }
            };
            match found {
                Some(e) => {
                    let value: serde_json::Value =
                        serde_json::from_slice(&e.payload).unwrap_or(serde_json::Value::Null);
                    writeln!(out, "# seq {} source {}", e.seq, e.source)?;
                    writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
                }
                None => bail!("no pending event or dead letter {id}"),
            }
        }
        JournalCommand::Verify => {
            let report = journal.verify();
            writeln!(
                out,
                "{} chunks, {} pending events, {} dead letters checked",
                report.chunks, report.events, report.dead_letters
            )?;
            for p in &report.problems {
                writeln!(out, "PROBLEM: {p}")?;
            }
            if report.is_ok() {
                writeln!(out, "journal OK")?;
            }
            return Ok(report.is_ok());
        }
        JournalCommand::Export {
            out: file,
            events: false,
        } => {
            let mut sink: Box<dyn Write> = match &file {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let counts = journal.export_to(&mut sink)?;
            sink.flush()?;
            drop(sink);
            if let Some(path) = &file {
                std::fs::File::open(path)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("syncing {}", path.display()))?;
            }
            eprintln!(
                "exported {} events, {} dead letters, {} positions",
                counts.events, counts.dead_letters, counts.positions
            );
        }
        JournalCommand::Export {
            out: file,
            events: true,
        } => {
            let mut sink: Box<dyn Write> = match file {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&path)
                        .with_context(|| format!("creating {}", path.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut failure = None;
            let mut count = 0u64;
            journal.scan_events(journal.stats().floor, |e| {
                let r = sink
                    .write_all(&e.payload)
                    .and_then(|_| sink.write_all(b"\n"));
                count += 1;
                match r {
                    Ok(()) => true,
                    Err(err) => {
                        failure = Some(err);
                        false
                    }
                }
            })?;
            if let Some(e) = failure {
                return Err(e).context("writing the export");
            }
            sink.flush()?;
            eprintln!("exported {count} events");
        }
        JournalCommand::Sinks(SinkCommand::List) => {
            for sink in journal.stats().sinks {
                writeln!(out, "{}\tbacklog {}", sink.name, sink.backlog)?;
            }
        }
        JournalCommand::Sinks(SinkCommand::Retire { name }) => {
            if !journal.sink_names().contains(&name) {
                bail!(
                    "no sink {name:?} in this journal (it has: {})",
                    journal.sink_names().join(", ")
                );
            }
            let orphaned = journal.retire_sink(&name)?;
            writeln!(
                out,
                "sink {name} retired: {orphaned} undelivered events moved to the dead letters (reason sink-removed)"
            )?;
        }
        JournalCommand::DeadLetters(cmd) => match cmd {
            DeadLetterCommand::Export { reason } => {
                for d in matching(journal.dead_letters()?, reason.as_deref()) {
                    writeln!(out, "{}", json_line(&d)?)?;
                }
            }
            DeadLetterCommand::List { json, reason } => {
                for d in matching(journal.dead_letters()?, reason.as_deref()) {
                    if json {
                        writeln!(out, "{}", json_line(&d)?)?;
                    } else {
                        writeln!(
                            out,
                            "{:>6}  {}  sink={} attempts={} at={}  {}  reason: {}",
                            d.number, d.id, d.sink, d.attempts, d.dead_at, d.source, d.reason
                        )?;
                    }
                }
            }
            DeadLetterCommand::Requeue {
                numbers,
                all,
                reason,
            } => {
                let chosen = selected(&journal, numbers, all, reason.as_deref())?;
                let n = journal.requeue_dead_letters(chosen.as_deref())?;
                writeln!(out, "requeued {n} dead letters")?;
            }
            DeadLetterCommand::Purge {
                numbers,
                all,
                reason,
            } => {
                let chosen = selected(&journal, numbers, all, reason.as_deref())?;
                let n = journal.purge_dead_letters(chosen.as_deref())?;
                writeln!(out, "purged {n} dead letters")?;
            }
        },
    }
    journal.close()?;
    Ok(true)
}
