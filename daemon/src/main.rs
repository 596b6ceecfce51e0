//! `credbrokerd`: parses flags, makes the process non-dumpable, loads the config, sets up logging, takes the
//! socket (from systemd or by binding it) and runs the daemon until SIGTERM or SIGINT, reloading on SIGHUP.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use credbroker_daemon::config::{self, Config, LogFormat};
use credbroker_daemon::secret::SecretEnv;
use credbroker_daemon::serve::notify::{self, Notifier};
use credbroker_daemon::serve::server;
use credbroker_daemon::{Options, Signal, sys};
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
#[command(name = "credbrokerd", version)]
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

/// An error and its causes, `: `-separated, leaving out a cause whose text the message before already holds
/// (many errors here print their source themselves).
fn causes(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
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
    let warnings = config.warnings();
    if let Some(Command::CheckConfig) = cli.command {
        for w in &warnings {
            eprintln!("credbrokerd: warning: {}: {}", w.key, w.message);
        }
        println!("{}: OK", cli.config.display());
        print!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    init_logging(config.daemon.log_format);
    for w in &warnings {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    // Each connection costs three descriptors (see limits::FDS_PER_CONNECTION): take all the kernel allows.
    let nofile = match sys::raise_nofile() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("credbrokerd: cannot read RLIMIT_NOFILE: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before the runtime starts any thread: binding sets the socket's mode through the umask.
    let socket = match take_socket(&config) {
        Ok(s) => s,
        Err(e) => {
            // Logging goes to stderr already: say it once, each cause once.
            tracing::error!("{}", causes(&e));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credbrokerd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, &cli.config, socket, nofile)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging goes to stderr already: say it once, each cause once.
            tracing::error!("{}", causes(&e));
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

/// The listening socket: the one systemd passed, else one bound at the configured path (with the record of
/// what was bound, to remove it at exit).
fn take_socket(
    config: &Config,
) -> anyhow::Result<(
    std::os::unix::net::UnixListener,
    Option<server::BoundSocket>,
)> {
    let d = &config.daemon;
    if let Some(passed) =
        sys::take_listen_fd(env("LISTEN_PID").as_deref(), env("LISTEN_FDS").as_deref())?
    {
        tracing::info!("serving the socket systemd passed");
        return Ok((passed, None));
    }
    let (listener, bound) = server::bind(
        &d.socket,
        d.socket_mode,
        d.socket_group.as_ref().map(|g| g.1),
    )?;
    tracing::info!(socket = %d.socket.display(), "serving");
    Ok((listener, Some(bound)))
}

async fn serve(
    config: Config,
    config_path: &Path,
    (listener, bound): (
        std::os::unix::net::UnixListener,
        Option<server::BoundSocket>,
    ),
    nofile: u64,
) -> anyhow::Result<()> {
    let listener = tokio::net::UnixListener::from_std(listener)?;
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
        nofile,
    };
    let result = credbroker_daemon::run(config, listener, signals, options).await;
    // Remove the socket only if this process bound it (one systemd passed belongs to systemd), and only if
    // it is still the file it bound (a newer instance may have replaced it while this one drained).
    if let Some(socket) = bound {
        match socket.remove() {
            Ok(true) => {}
            Ok(false) => tracing::info!(
                socket = %socket.path().display(),
                "the socket path now belongs to another instance; leaving it"
            ),
            Err(e) => {
                tracing::warn!(socket = %socket.path().display(), error = %e, "cannot remove the socket")
            }
        }
    }
    result
}
