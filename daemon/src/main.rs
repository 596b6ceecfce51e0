//! `credbrokerd`: parses flags, makes the process non-dumpable, sets up logging, loads the config and runs
//! the daemon until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use credbroker_daemon::config::{self, Config};
use credbroker_daemon::notify::Notifier;
use credbroker_daemon::secret::SecretEnv;
use credbroker_daemon::{server, sys};

/// Exit code for a bad config or bad flags (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the process cannot be made non-dumpable (EX_OSERR).
const EXIT_OSERR: u8 = 71;

/// Hands least-privilege OAuth 2.0 tokens to local processes over a Unix socket.
///
/// Exit codes: 0 clean shutdown or valid config; 1 runtime failure (e.g. the socket cannot be bound);
/// 64 invalid config; 71 the process could not be made non-dumpable.
#[derive(Parser)]
#[command(version, about)]
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

fn main() -> ExitCode {
    // Before anything reads a secret: no core dumps, no ptrace or /proc/<pid>/mem by other processes.
    if let Err(e) = sys::make_non_dumpable() {
        eprintln!("credbrokerd: refusing to start: cannot make the process non-dumpable: {e}");
        return ExitCode::from(EXIT_OSERR);
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CREDBROKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();

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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credbrokerd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("credbrokerd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let d = &config.daemon;
    let socket = d.socket.clone();
    let listener = server::bind(&socket, d.socket_mode, d.socket_group.as_ref().map(|g| g.1))?;
    tracing::info!(
        socket = %socket.display(),
        clients = config.clients.len(),
        policies = config.policies.policies().len(),
        "serving"
    );
    let notifier = Notifier::new(std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from));
    let shutdown = {
        let notifier = notifier.clone();
        async move {
            let reason = shutdown_signal().await;
            tracing::info!("{reason}: shutting down");
            let _ = notifier.notify("STOPPING=1");
        }
    };
    let served = credbroker_daemon::run(config, listener, async {
        if let Err(e) = notifier.notify("READY=1\nSTATUS=serving") {
            tracing::warn!(error = %e, "cannot notify readiness");
        }
        shutdown.await;
    });
    let result = served.await;
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the socket");
    }
    result
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
