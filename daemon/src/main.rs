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
    /// Print a man page (roff): credbrokerd(8) (the default), or credbroker.toml(5), the configuration
    /// reference; as `credbroker manpage` prints credbroker(1).
    #[command(alias = "man")]
    Manpage {
        /// Which page.
        #[arg(value_enum, default_value_t = Page::Credbrokerd)]
        page: Page,
    },
    /// Print the configuration reference as a Markdown table (the README's).
    ConfigReference,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Page {
    /// credbrokerd(8).
    Credbrokerd,
    /// credbroker.toml(5).
    #[value(name = "credbroker.toml")]
    CredbrokerToml,
}

/// The date man pages carry: `SOURCE_DATE_EPOCH` (reproducible package builds), else today.
fn man_date() -> String {
    let at = env("SOURCE_DATE_EPOCH")
        .and_then(|s| s.parse::<u64>().ok())
        .map_or_else(std::time::SystemTime::now, |secs| {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
        });
    humantime::format_rfc3339_seconds(at).to_string()[..10].to_owned()
}

/// credbrokerd(8): clap's sections, then signals, exit status, environment and files.
fn daemon_man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory;
    let man = clap_mangen::Man::new(Cli::command())
        .section("8")
        .date(man_date())
        .source(format!("credbroker {}", env!("CARGO_PKG_VERSION")))
        .manual("System Manager's Manual");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    page.extend_from_slice(
        br#".SH COMMANDS
With no command, \fBcredbrokerd\fR runs: it serves the socket systemd passes (\fBLISTEN_FDS\fR) or binds
\fBdaemon.socket\fR, notifies systemd when ready, and runs until SIGTERM.
.TP
.B credbrokerd check\-config \fR[\fB\-\-config\fR \fIPATH\fR]
Validate the config, secrets included, and print a summary without secrets: the effective configuration as
TOML, every key with the value in use (defaults included) and each secret shown by its source, itself a valid
config. Warn about policies that name users or groups that do not exist. Exit 0, or 64 with every problem
listed by key path.
.TP
.B credbrokerd manpage \fR[\fIcredbrokerd\fR|\fIcredbroker.toml\fR]
Print this page, or credbroker.toml(5), in roff.
.TP
.B credbrokerd config\-reference
Print the configuration reference as a Markdown table.
.SH SIGNALS
.TP
.B SIGHUP
Reload: read the config and secrets again; new policies apply in one step; a broken config is refused (every error logged) and the running one keeps serving.
.TP
.BR SIGTERM ", " SIGINT
Stop accepting, let in\-flight calls finish for up to 10 s, exit 0.
.SH "EXIT STATUS"
.TP
.B 0
Clean shutdown, or a valid config for \fBcheck\-config\fR.
.TP
.B 1
A runtime failure, such as a socket it cannot bind.
.TP
.B 64
An invalid config (every problem listed by key path), or bad flags.
.TP
.B 71
The process could not be made non\-dumpable; no secret was read.
.SH ENVIRONMENT
.TP
.B CREDBROKER_CONFIG
The config file, instead of \fI/etc/credbroker/credbroker.toml\fR.
.TP
.B CREDBROKER_LOG
A tracing filter: \fBinfo\fR (default), \fBdebug\fR, \fBinfo,credbroker::audit=warn\fR.
.TP
.B CREDENTIALS_DIRECTORY
Where \fB{ credential = "NAME" }\fR secrets are read (set by systemd's \fBLoadCredential=\fR).
.TP
.BR LISTEN_FDS ", " LISTEN_PID ", " NOTIFY_SOCKET ", " WATCHDOG_USEC
Socket activation, readiness and watchdog, from systemd.
.SH FILES
.TP
.I /etc/credbroker/credbroker.toml
The configuration; see credbroker.toml(5).
.TP
.I /run/credbroker/credbroker.sock
The socket callers connect to (gRPC, and plain HTTP).
.SH "SEE ALSO"
credbroker(1), credbroker.toml(5), systemd.socket(5)
"#,
    );
    Ok(page)
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

/// Writes generated text to stdout: exit 0, or 74 (EX_IOERR) when it cannot be written.
fn write_out(text: std::io::Result<Vec<u8>>) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match text
        .and_then(|t| out.write_all(&t))
        .and_then(|()| out.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credbrokerd: cannot write the output: {e}");
            ExitCode::from(74)
        }
    }
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
    match cli.command {
        Some(Command::Manpage { page }) => {
            let page = match page {
                Page::Credbrokerd => daemon_man_page(),
                Page::CredbrokerToml => {
                    Ok(config::keys::man_page(&man_date(), env!("CARGO_PKG_VERSION")).into_bytes())
                }
            };
            return write_out(page);
        }
        Some(Command::ConfigReference) => {
            return write_out(Ok(config::keys::markdown().into_bytes()));
        }
        _ => {}
    }
    let config = match Config::load(&cli.config, &SecretEnv::process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("credbrokerd: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let warnings = config.warnings();
    if matches!(cli.command, Some(Command::CheckConfig)) {
        for w in &warnings {
            eprintln!("credbrokerd: warning: {}: {}", w.key, w.message);
        }
        // A comment, so that the whole output is a config file.
        println!("# {}: OK", cli.config.display());
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
        reload_config: std::sync::Arc::new(move || Config::load(&path, &SecretEnv::process())),
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
