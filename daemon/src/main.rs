//! `credbrokerd`: parses flags, makes the process non-dumpable, loads the config, sets up logging, takes the
//! socket (from systemd or by binding it) and runs the daemon until SIGTERM or SIGINT, reloading on SIGHUP.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use credbroker_daemon::config::{self, Config, LogFormat};
use credbroker_daemon::notify::{self, Notifier};
use credbroker_daemon::secret::SecretEnv;
use credbroker_daemon::{Options, Signal, server, sys};
use tokio_stream::StreamExt;

/// Exit code for a bad config or bad flags (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the process cannot be made non-dumpable (EX_OSERR).
const EXIT_OSERR: u8 = 71;
/// How long in-flight calls may take to finish after SIGTERM.
const GRACE: Duration = Duration::from_secs(10);

/// Hands least-privilege OAuth 2.0 tokens to local processes over a Unix socket.
///
/// Exit codes: 0 clean shutdown or valid config; 1 runtime failure (e.g. the socket cannot be bound);
/// 64 invalid config; 71 the process could not be made non-dumpable.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "CREDBROKER_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config (secrets included) and print a summary without secrets; exit 0 or 64.
    CheckConfig,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn main() -> ExitCode {
    // Before anything reads a secret: no core dumps, no ptrace or /proc/<pid>/mem by other processes.
    if let Err(e) = sys::make_non_dumpable() {
        eprintln!("credbrokerd: refusing to start: cannot make the process non-dumpable: {e}");
        return ExitCode::from(EXIT_OSERR);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_CONFIG } else { 0 });
        }
    };
    let config = match Config::load(&cli.config, &SecretEnv::process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("credbrokerd: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        println!("{}: OK", cli.config.display());
        print!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    init_logging(config.daemon.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credbrokerd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, &cli.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("credbrokerd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Text by default (without timestamps under journald, which adds its own), JSON when configured; the
/// level filter comes from `CREDBROKER_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CREDBROKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => {
            let ansi =
                std::io::IsTerminal::is_terminal(&std::io::stderr()) && env("NO_COLOR").is_none();
            let builder = builder.with_ansi(ansi);
            if env("JOURNAL_STREAM").is_some() {
                builder.without_time().init();
            } else {
                builder.init();
            }
        }
    }
}

async fn serve(config: Config, config_path: &Path) -> anyhow::Result<()> {
    let d = &config.daemon;
    let (listener, bound) =
        match sys::take_listen_fd(env("LISTEN_PID").as_deref(), env("LISTEN_FDS").as_deref())? {
            Some(passed) => {
                tracing::info!("serving the socket systemd passed");
                (tokio::net::UnixListener::from_std(passed)?, None)
            }
            None => {
                let listener = server::bind(
                    &d.socket,
                    d.socket_mode,
                    d.socket_group.as_ref().map(|g| g.1),
                )?;
                tracing::info!(socket = %d.socket.display(), "serving");
                (listener, Some(d.socket.clone()))
            }
        };
    use tokio::signal::unix::{SignalKind, signal};
    let on = |kind: SignalKind, what: Signal| -> anyhow::Result<_> {
        Ok(tokio_stream::wrappers::SignalStream::new(signal(kind)?).map(move |()| what))
    };
    let signals = on(SignalKind::hangup(), Signal::Reload)?
        .merge(on(SignalKind::terminate(), Signal::Shutdown("SIGTERM"))?)
        .merge(on(SignalKind::interrupt(), Signal::Shutdown("SIGINT"))?);
    let path = config_path.to_owned();
    let options = Options {
        reload_config: Box::new(move || Config::load(&path, &SecretEnv::process())),
        notifier: Notifier::new(std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from)),
        watchdog: notify::watchdog_interval(
            env("WATCHDOG_USEC").as_deref(),
            env("WATCHDOG_PID").as_deref(),
        ),
        grace: GRACE,
    };
    let result = credbroker_daemon::run(config, listener, signals, options).await;
    // Remove the socket only if this process bound it: one systemd passed belongs to systemd.
    if let Some(socket) = bound
        && let Err(e) = std::fs::remove_file(&socket)
    {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the socket");
    }
    result
}
