//! `credbroker`: get a least-privilege OAuth token from `credbrokerd` in one line of shell.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use credbroker_client::secrecy::ExposeSecret;
use credbroker_client::{Client, Error, Token, TokenRequest, admin};

mod admin_view;
mod helpers;
mod sink;

/// Exit codes (sysexits.h), documented in `--help` and the README.
mod exit {
    /// The token was printed.
    pub(crate) const OK: u8 = 0;
    /// Anything not covered below.
    pub(crate) const OTHER: u8 = 1;
    /// Bad flags or arguments, or a request the daemon found malformed (bad scope, unknown client).
    pub(crate) const USAGE: u8 = 64;
    /// Worth retrying: the daemon is unreachable, the IdP is unavailable, or this caller is rate limited.
    pub(crate) const RETRY: u8 = 75;
    /// Denied: no policy lets this process have what it asked for (or it could not be identified).
    pub(crate) const DENIED: u8 = 77;
    /// The output could not be written (a closed pipe, a full disk).
    pub(crate) const IOERR: u8 = 74;
    /// Operator action needed: the IdP refused the broker's credentials or the scope.
    pub(crate) const OPERATOR: u8 = 78;
}

const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   other error
  64  usage: bad arguments, invalid scope, unknown or ambiguous client
  74  the output could not be written (closed pipe, full disk, a sink's file or directory)
  75  retryable: daemon unreachable, IdP unavailable, rate limited
  77  denied: no policy allows this process the requested client or scope, or the socket's
      permissions keep this user out
  78  operator action needed: the IdP rejected the broker's credentials or the scope";

const EXEC_EXIT_CODES: &str = "\
Exit codes, until CMD runs: as `credbroker token` (64 usage, 75 retryable, 77 denied, 78 operator action
needed, 1 other); once it runs, the exit status is CMD's own; 126 or 127 if it cannot be run";

const WHOAMI_EXIT_CODES: &str = "\
Exit codes:
  0   success
  74  the output could not be written
  75  the daemon is unreachable
  77  the daemon could not identify this process, or the socket's permissions keep this user out";

const ADMIN_EXIT_CODES: &str = "\
Exit codes:
  0   success
  64  (reload) the config has errors: each is printed, and the running config keeps serving
  74  the output could not be written
  75  the daemon is unreachable
  77  this user is not one of the daemon's admins (daemon.admins)";

const EXPLAIN_EXIT_CODES: &str = "\
Exit codes:
  0   the request would be allowed (without scopes: some policy matches the caller)
  1   the request would be denied (without scopes: no policy matches the caller)
  64  bad input: unknown user, group, client or process, invalid scope
  74  the output could not be written
  75  the daemon is unreachable
  77  the asker is not one of the daemon's admins (daemon.admins)";

/// Least-privilege OAuth 2.0 tokens from credbrokerd, for this process as the kernel identifies it.
#[derive(Parser)]
#[command(name = "credbroker", version, after_help = EXIT_CODES)]
struct Cli {
    /// The daemon's socket [default: $CREDBROKER_SOCKET, else /run/credbroker/credbroker.sock, else
    /// $XDG_RUNTIME_DIR/credbroker/credbroker.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print an access token for SCOPE... (a quoted, space-separated OAuth scope string works too).
    #[command(after_help = EXIT_CODES)]
    Token {
        /// The client (IdP registration) to use; needed when your policies name several.
        #[arg(short, long)]
        client: Option<String>,
        /// The token must stay valid at least this long: "90", "90s", "5m".
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        min_ttl: Option<Duration>,
        /// raw: the token; header: "Authorization: Bearer <token>"; json: the token and its metadata;
        /// exec-credential: kubectl's ExecCredential, in the apiVersion KUBERNETES_EXEC_INFO names (v1 or
        /// v1beta1; v1 without it).
        #[arg(long, value_enum, default_value_t = TokenFormat::Raw)]
        format: TokenFormat,
        /// Scopes to request.
        #[arg(required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// Keep FILE holding a fresh token, for programs that read a token from a file. Runs as the consuming
    /// user (the daemon judges it as any caller), replaces FILE atomically ahead of expiry, keeps a valid
    /// token in place while the daemon or the IdP is down (removing it once it expires with no successor),
    /// and runs CMD after each new token. With --config, keeps every [[sink]] of a TOML file.
    #[command(after_help = EXIT_CODES)]
    Sink {
        /// The file to keep fresh; its directory must be writable by its owner only.
        #[arg(long, value_name = "FILE", required_unless_present = "config")]
        path: Option<PathBuf>,
        /// What the file holds: raw, the token; header, "Authorization: Bearer <token>"; json, the token
        /// and its metadata. A newline ends each.
        #[arg(long, value_enum, default_value_t = Format::Raw)]
        format: Format,
        /// The file's permission bits, in octal.
        #[arg(long, value_name = "MODE", default_value = "0600", value_parser = sink::parse_mode)]
        mode: u32,
        /// The token must stay valid at least this long when written: "90", "90s", "5m".
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        min_ttl: Option<Duration>,
        /// A command run with `sh -c` after each new token (not more often), with CREDBROKER_SINK_PATH set,
        /// e.g. "systemctl reload prometheus".
        #[arg(long, value_name = "CMD")]
        on_change: Option<String>,
        /// Write the file once and exit, with the exit codes below (for cron jobs and ExecStartPre=).
        #[arg(long)]
        once: bool,
        /// The client (IdP registration) to use; needed when your policies name several.
        #[arg(short, long)]
        client: Option<String>,
        /// Keep the sinks of this TOML file ([[sink]] tables with path, scopes, and optionally client,
        /// format, mode, min_ttl, on_change), instead of one given by the options above.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["path", "on_change", "client", "min_ttl"])]
        config: Option<PathBuf>,
        /// Scopes to request.
        #[arg(value_name = "SCOPE", required_unless_present = "config")]
        scopes: Vec<String>,
    },
    /// Print the two headers of one request to an API with a DPoP-bound token (the client must have dpop =
    /// true): `Authorization: DPoP <token>` and `DPoP: <proof>`, the proof signed by the daemon for METHOD and
    /// URL, e.g. `credbroker proof --method GET --url "$URL" scim:read | curl -H @- "$URL"`. Only for URLs
    /// within your policy's dpop_targets.
    #[command(after_help = EXIT_CODES)]
    Proof {
        /// The client (IdP registration) to use; needed when your policies name several.
        #[arg(short, long)]
        client: Option<String>,
        /// The token must stay valid at least this long: "90", "90s", "5m".
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        min_ttl: Option<Duration>,
        /// The HTTP method of the request the proof is for.
        #[arg(long, value_name = "METHOD")]
        method: String,
        /// The URL of that request (the proof covers it without query and fragment).
        #[arg(long, value_name = "URL")]
        url: String,
        /// The nonce the API gave in its DPoP-Nonce header, if it asked for one.
        #[arg(long, value_name = "NONCE")]
        nonce: Option<String>,
        /// headers: the two header lines; json: {"authorization", "dpop"}.
        #[arg(long, value_enum, default_value_t = ProofFormat::Headers)]
        format: ProofFormat,
        /// Scopes of the token.
        #[arg(required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// A git credential helper: answers git's `get` with a token (as a Bearer credential for git 2.46 and
    /// later, else as the password of --username); `store` and `erase` do nothing. Configure it with
    /// `git config credential.https://git.example.com.helper '!credbroker git-credential -c CLIENT --scope SCOPE'`.
    #[command(after_help = EXIT_CODES)]
    GitCredential {
        /// The client (IdP registration) to use; needed when your policies name several.
        #[arg(short, long)]
        client: Option<String>,
        /// A scope to request; repeat for several (a quoted scope string is split too).
        #[arg(short = 's', long = "scope", required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
        /// The user name git sends with the token as password, for git before 2.46 and servers that want
        /// Basic authentication.
        #[arg(long, value_name = "NAME", default_value = "x-access-token")]
        username: String,
        /// What git asks: get, store or erase.
        #[arg(value_enum)]
        operation: GitOperation,
    },
    /// Run CMD with a token in its environment (never on a command line). credbroker replaces itself with
    /// CMD, so CMD's exit status and the signals sent to it are its own. CMD goes after `--`.
    #[command(after_help = EXEC_EXIT_CODES)]
    Exec {
        /// The client (IdP registration) to use; needed when your policies name several.
        #[arg(short, long)]
        client: Option<String>,
        /// The token must stay valid at least this long: "90", "90s", "5m".
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        min_ttl: Option<Duration>,
        /// The environment variable that carries the token.
        #[arg(long = "env", value_name = "NAME", default_value = "ACCESS_TOKEN", value_parser = parse_env_name)]
        env: String,
        /// A scope to request; repeat for several (a quoted scope string is split too).
        #[arg(short = 's', long = "scope", required = true, num_args = 1.., value_name = "SCOPE")]
        scopes: Vec<String>,
        /// The command and its arguments.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Show how the daemon sees this process, and what it may request.
    #[command(after_help = WHOAMI_EXIT_CODES)]
    Whoami {
        /// Output format.
        #[arg(long, value_enum, default_value_t = WhoamiFormat::Text)]
        format: WhoamiFormat,
    },
    /// Reload the daemon's config, as SIGHUP does, and print what changed (admins only). On a broken config,
    /// print every error and exit 64; the running config keeps serving.
    #[command(after_help = ADMIN_EXIT_CODES)]
    Reload,
    /// Drop the daemon's cached tokens of CLIENT (all clients if none) whose scope set holds every SCOPE
    /// given (admins only), e.g. after a revocation at the IdP; print how many went.
    #[command(after_help = ADMIN_EXIT_CODES)]
    Flush {
        /// The client whose entries to drop; every client if not given.
        #[arg(short, long)]
        client: Option<String>,
        /// Only entries whose scope set holds all of these.
        #[arg(value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// Show what the daemon is doing (admins only): its version, uptime and config; each client's endpoint
    /// and IdP health; the cached tokens (fingerprints, expiry, next renewal, hits; never a token); each caller
    /// uid's connections and rate limit.
    #[command(after_help = ADMIN_EXIT_CODES)]
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = WhoamiFormat::Text)]
        format: WhoamiFormat,
    },
    /// Explain how the daemon's policies judge a caller, without running it (admins only): the policies that
    /// match it, the decision on CLIENT and SCOPE..., and the policies that came close, each with the key that
    /// fails. The daemon decides, with the code that decides real calls.
    #[command(after_help = EXPLAIN_EXIT_CODES)]
    #[command(group(clap::ArgGroup::new("who").required(true).args(["uid", "user", "pid"])))]
    Explain {
        /// The caller's uid.
        #[arg(long, value_name = "UID")]
        uid: Option<u32>,
        /// The caller's user name.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// A live process, identified by the kernel as on a real call (its uid, groups, executable, unit).
        #[arg(long, value_name = "PID", conflicts_with_all = ["group", "exe", "unit"])]
        pid: Option<i32>,
        /// A group of the caller, by name or gid; repeat for several, the primary first [default: the user's
        /// groups in the group database].
        #[arg(long, value_name = "GROUP")]
        group: Vec<String>,
        /// The caller's executable, matched as on a real call: by the file at that path now (device and inode).
        #[arg(long, value_name = "PATH")]
        exe: Option<PathBuf>,
        /// The caller's systemd unit.
        #[arg(long, value_name = "UNIT")]
        unit: Option<String>,
        /// The client the caller asks for; needed when its policies name several.
        #[arg(short, long)]
        client: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = WhoamiFormat::Text)]
        format: WhoamiFormat,
        /// Scopes the caller asks for; without any, only the matching policies are shown.
        #[arg(value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// Print a shell completion script (e.g. `credbroker completions bash > /etc/bash_completion.d/credbroker`).
    Completions {
        /// The shell.
        shell: Shell,
    },
    /// Print the man page (roff), e.g. `credbroker manpage > /usr/local/share/man/man1/credbroker.1`.
    Manpage,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
    Elvish,
    Powershell,
}

/// What a token is written as.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Raw,
    Json,
    Header,
}

/// What `credbroker token` prints.
#[derive(Clone, Copy, ValueEnum)]
enum TokenFormat {
    Raw,
    Json,
    Header,
    ExecCredential,
}

/// What `credbroker proof` prints.
#[derive(Clone, Copy, ValueEnum)]
enum ProofFormat {
    Headers,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum GitOperation {
    Get,
    Store,
    Erase,
}

#[derive(Clone, Copy, ValueEnum)]
enum WhoamiFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. \"90\", \"90s\" or \"5m\")"))
}

fn parse_env_name(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not an environment variable name"))
    }
}

/// Splits pasted OAuth scope strings ("a b c") into scopes.
fn split_scopes(scopes: &[String]) -> Vec<String> {
    scopes
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(str::to_owned)
        .collect()
}

fn request(scopes: &[String], client: Option<String>, min_ttl: Option<Duration>) -> TokenRequest {
    let mut request = TokenRequest::new(split_scopes(scopes));
    if let Some(client) = client {
        request = request.client(client);
    }
    if let Some(min_ttl) = min_ttl {
        request = request.min_ttl(min_ttl);
    }
    request
}

/// Where the CLI's output goes: standard output. A write that fails (a closed pipe, a full disk) is an
/// error (exit 74); output to `/dev/null`, whatever mode it was opened in, is written, and fine.
struct Output;

impl Output {
    /// Writes `text` and a newline, and flushes.
    fn line(&self, text: &str) -> Result<(), CliError> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}")
            .and_then(|()| out.flush())
            .map_err(CliError::Output)
    }

    /// Writes `bytes` as they are, and flushes.
    fn raw(&self, bytes: &[u8]) -> Result<(), CliError> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(CliError::Output)
    }
}

/// Why the CLI failed: the daemon's answer, its own output, or a usage error found after parsing.
enum CliError {
    Daemon(Error),
    Output(std::io::Error),
    /// A problem with the input, exit 64.
    Usage(String),
    /// A sink's file or directory (exit 74).
    Sink(String),
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        Self::Daemon(e)
    }
}

/// `credbroker [--socket PATH] token [-c CLIENT] [--min-ttl DUR] [--format F] SCOPE...` in its plain forms,
/// parsed without building the whole command line interface: kubectl and scripts run it once per command, and
/// a process's start is most of its cost. Anything else (help, an unknown or repeated flag, a bad value) is
/// left to the full parser, which says what is wrong.
struct FastToken {
    socket: Option<PathBuf>,
    client: Option<String>,
    min_ttl: Option<Duration>,
    format: TokenFormat,
    scopes: Vec<String>,
}

fn fast_token(args: &[String]) -> Option<FastToken> {
    let mut fast = FastToken {
        socket: None,
        client: None,
        min_ttl: None,
        format: TokenFormat::Raw,
        scopes: Vec::new(),
    };
    let (mut seen_token, mut seen) = (false, Vec::new());
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        if !flag.starts_with('-') {
            if seen_token {
                fast.scopes.push(arg.clone());
            } else if arg == "token" {
                seen_token = true;
            } else {
                return None;
            }
            continue;
        }
        let name = match flag {
            "--socket" => "socket",
            "-c" | "--client" if seen_token => "client",
            "--min-ttl" if seen_token => "min-ttl",
            "--format" if seen_token => "format",
            _ => return None,
        };
        if seen.contains(&name) {
            return None;
        }
        seen.push(name);
        let value = match inline {
            Some(v) => v,
            None => args.next().filter(|v| !v.starts_with('-'))?.clone(),
        };
        match name {
            "socket" => fast.socket = Some(PathBuf::from(value)),
            "client" => fast.client = Some(value),
            "min-ttl" => fast.min_ttl = Some(parse_duration(&value).ok()?),
            _ => fast.format = TokenFormat::from_str(&value, false).ok()?,
        }
    }
    (seen_token && !fast.scopes.is_empty()).then_some(fast)
}

/// Runs a [`FastToken`]: the token by one HTTP/1.1 request, printed as `credbroker token` prints it.
fn run_fast_token(fast: FastToken) -> ExitCode {
    let out = Output;
    let socket = fast
        .socket
        .unwrap_or_else(credbroker_client::discover_socket);
    match print_token(
        &out,
        &socket,
        &request(&fast.scopes, fast.client, fast.min_ttl),
        fast.format,
    ) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => report(e),
    }
}

/// `credbroker token`: asks the daemon (one HTTP/1.1 request) and prints the token as `format` says.
fn print_token(
    out: &Output,
    socket: &std::path::Path,
    request: &TokenRequest,
    format: TokenFormat,
) -> Result<(), CliError> {
    // kubectl's exec plugin: the version it asks for is checked before asking the daemon.
    let api_version = match format {
        TokenFormat::ExecCredential => Some(
            helpers::exec_credential_version(std::env::var("KUBERNETES_EXEC_INFO").ok().as_deref())
                .map_err(CliError::Usage)?,
        ),
        _ => None,
    };
    let token =
        credbroker_client::oneshot::token(socket, request, credbroker_client::DEFAULT_TIMEOUT)?;
    let text = match (format, api_version) {
        (TokenFormat::ExecCredential, Some(v)) => helpers::exec_credential(&token, v),
        (TokenFormat::Json, _) => render(&token, Format::Json),
        (TokenFormat::Header, _) => render(&token, Format::Header),
        _ => render(&token, Format::Raw),
    };
    out.line(&text)
}

/// Prints why the CLI failed, and the exit code that says it.
fn report(e: CliError) -> ExitCode {
    match e {
        CliError::Daemon(e) => {
            eprintln!("credbroker: {e}");
            ExitCode::from(exit_code(&e))
        }
        CliError::Output(e) => {
            eprintln!("credbroker: cannot write the output: {e}");
            ExitCode::from(exit::IOERR)
        }
        CliError::Usage(e) => {
            eprintln!("credbroker: {e}");
            ExitCode::from(exit::USAGE)
        }
        CliError::Sink(e) => {
            eprintln!("credbroker sink: {e}");
            ExitCode::from(exit::IOERR)
        }
    }
}

fn main() -> ExitCode {
    // (Arguments that are not UTF-8 go to the full parser, which handles them.)
    let args: Option<Vec<String>> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string().ok())
        .collect();
    if let Some(fast) = args.as_deref().and_then(fast_token) {
        return run_fast_token(fast);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let args = args.unwrap_or_default();
            let exec = args.iter().any(|a| a == "exec") && !args.iter().any(|a| a == "--");
            if exec && e.kind() == clap::error::ErrorKind::MissingRequiredArgument {
                eprintln!(
                    "credbroker exec: the command goes after `--` (without it, every word after -s is a \
                     scope): credbroker exec -s SCOPE... -- CMD [ARGS...]"
                );
                return ExitCode::from(exit::USAGE);
            }
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credbroker: cannot start: {e}");
            return ExitCode::from(exit::OTHER);
        }
    };
    let out = Output;
    match runtime.block_on(run(cli, &out)) {
        Ok(Next::Done) => ExitCode::from(exit::OK),
        Ok(Next::Exit(code)) => ExitCode::from(code),
        Ok(Next::Exec {
            command,
            env,
            token,
        }) => {
            drop(runtime);
            exec(&command, &env, &token)
        }
        Err(e) => report(e),
    }
}

/// What to do once the daemon has answered.
enum Next {
    Done,
    /// Done, with this exit status.
    Exit(u8),
    Exec {
        command: Vec<String>,
        env: String,
        token: Token,
    },
}

/// Replaces this process with `command`, the token in `env`. Returns only if that fails.
fn exec(command: &[String], env: &str, token: &Token) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let (program, args) = command.split_first().expect("clap requires a command");
    let err = std::process::Command::new(program)
        .args(args)
        .env(env, token.access_token().expose_secret())
        .exec();
    eprintln!("credbroker: cannot run {program}: {err}");
    // As shells do: 127 when the command is not found, 126 when it cannot be executed.
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

fn exit_code(e: &Error) -> u8 {
    if e.is_denied() {
        exit::DENIED
    } else if e.is_retryable() {
        exit::RETRY
    } else if e.needs_operator() {
        exit::OPERATOR
    } else if e.is_invalid_request() {
        exit::USAGE
    } else {
        exit::OTHER
    }
}

async fn run(cli: Cli, out: &Output) -> Result<Next, CliError> {
    if matches!(cli.command, Command::Completions { .. } | Command::Manpage) && cli.socket.is_some()
    {
        return Err(CliError::Usage(
            "--socket does not apply here: completions and the man page are printed without the daemon"
                .to_owned(),
        ));
    }
    match &cli.command {
        Command::Completions { shell } => {
            out.raw(&completions(*shell))?;
            return Ok(Next::Done);
        }
        Command::Manpage => {
            out.raw(&man_page().map_err(CliError::Output)?)?;
            return Ok(Next::Done);
        }
        _ => {}
    }
    let socket = cli
        .socket
        .unwrap_or_else(credbroker_client::discover_socket);
    match cli.command {
        Command::Sink {
            path,
            format,
            mode,
            min_ttl,
            on_change,
            once,
            client: name,
            config,
            scopes,
        } => {
            let sinks = match (config, path) {
                (Some(config), _) => {
                    let text = std::fs::read_to_string(&config).map_err(|e| {
                        CliError::Usage(format!("cannot read {}: {e}", config.display()))
                    })?;
                    sink::parse_file(&text)
                        .map_err(|e| CliError::Usage(format!("{}: {e}", config.display())))?
                }
                (None, Some(path)) => vec![sink::Sink {
                    path,
                    format,
                    mode,
                    request: request(&scopes, name, min_ttl),
                    on_change,
                }],
                (None, None) => unreachable!("clap requires --path or --config"),
            };
            return run_sinks(socket, sinks, once).await;
        }
        Command::Token {
            client: name,
            min_ttl,
            format,
            scopes,
        } => {
            print_token(out, &socket, &request(&scopes, name, min_ttl), format)?;
            return Ok(Next::Done);
        }
        Command::Exec {
            client: name,
            min_ttl,
            env,
            scopes,
            command,
        } => {
            let token = credbroker_client::oneshot::token(
                &socket,
                &request(&scopes, name, min_ttl),
                credbroker_client::DEFAULT_TIMEOUT,
            )?;
            return Ok(Next::Exec {
                command,
                env,
                token,
            });
        }
        Command::GitCredential {
            client: name,
            scopes,
            username,
            operation,
        } => {
            // store and erase: nothing is stored, so nothing to do (git still sends the request).
            let asked =
                helpers::read_git_request(std::io::stdin().lock()).map_err(CliError::Usage)?;
            if !matches!(operation, GitOperation::Get) {
                return Ok(Next::Done);
            }
            let token = credbroker_client::oneshot::token(
                &socket,
                &request(&scopes, name, None),
                credbroker_client::DEFAULT_TIMEOUT,
            )?;
            out.raw(helpers::git_answer(&asked, &token, &username).as_bytes())?;
            return Ok(Next::Done);
        }
        Command::Proof {
            client: name,
            min_ttl,
            method,
            url,
            nonce,
            format,
            scopes,
        } => {
            let mut request =
                credbroker_client::ProofRequest::new(request(&scopes, name, min_ttl), method, url);
            if let Some(nonce) = nonce {
                request = request.nonce(nonce);
            }
            let proof = credbroker_client::oneshot::proof(
                &socket,
                &request,
                credbroker_client::DEFAULT_TIMEOUT,
            )?;
            let (authorization, dpop) = (
                proof.authorization().expose_secret(),
                proof.dpop().expose_secret(),
            );
            out.line(&match format {
                ProofFormat::Headers => format!("Authorization: {authorization}\nDPoP: {dpop}"),
                ProofFormat::Json => {
                    serde_json::json!({ "authorization": authorization, "dpop": dpop }).to_string()
                }
            })?;
            return Ok(Next::Done);
        }
        _ => {}
    }
    let mut client = Client::connect(&socket).await?;
    match cli.command {
        Command::Sink { .. }
        | Command::GitCredential { .. }
        | Command::Token { .. }
        | Command::Exec { .. }
        | Command::Proof { .. } => unreachable!("handled above"),
        Command::Completions { .. } | Command::Manpage => unreachable!("handled above"),
        Command::Reload => {
            let r = client.reload().await.map_err(|e| match e {
                // The daemon's message says what happened and lists every error.
                Error::InvalidArgument(m) => CliError::Usage(m),
                other => CliError::Daemon(other),
            })?;
            let mut text = format!("reloaded: {}", r.summary);
            if !r.clients_changed.is_empty() {
                text.push_str(&format!(
                    "\nclients changed: {} ({} cached tokens dropped)",
                    r.clients_changed.join(", "),
                    r.tokens_dropped
                ));
            }
            for setting in &r.need_restart {
                text.push_str(&format!(
                    "\n{setting} changed: takes effect after a restart"
                ));
            }
            out.line(&text)?;
        }
        Command::Flush {
            client: name,
            scopes,
        } => {
            let dropped = client
                .flush(name.as_deref().unwrap_or(""), &split_scopes(&scopes))
                .await?;
            out.line(&format!("dropped {dropped} cached entries"))?;
        }
        Command::Status { format } => {
            let status = client.status().await?;
            match format {
                WhoamiFormat::Json => out.line(&admin_view::status_json(&status).to_string())?,
                WhoamiFormat::Text => out.line(&admin_view::status_text(&status))?,
            }
        }
        Command::Explain {
            uid,
            user,
            pid,
            group,
            exe,
            unit,
            client: name,
            format,
            scopes,
        } => {
            use admin::explain_request::Who;
            let who = match (uid, user, pid) {
                (Some(uid), ..) => Who::Uid(uid),
                (_, Some(user), _) => Who::User(user),
                (.., Some(pid)) => Who::Pid(pid),
                _ => unreachable!("clap requires one of --uid, --user, --pid"),
            };
            let request = admin::ExplainRequest {
                who: Some(who),
                groups: group,
                exe: exe
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                unit: unit.unwrap_or_default(),
                client: name.unwrap_or_default(),
                scopes: split_scopes(&scopes),
            };
            let e = client.explain(request).await?;
            match format {
                WhoamiFormat::Json => out.line(&admin_view::explain_json(&e).to_string())?,
                WhoamiFormat::Text => out.line(&admin_view::explain_text(&e))?,
            }
            let allowed = if e.decided {
                e.allowed
            } else {
                !e.matching.is_empty()
            };
            return Ok(if allowed {
                Next::Done
            } else {
                Next::Exit(exit::OTHER)
            });
        }
        Command::Whoami { format } => {
            let me = client.whoami().await?;
            match format {
                WhoamiFormat::Json => {
                    let grants: serde_json::Map<String, serde_json::Value> = me
                        .grants
                        .iter()
                        .map(|(c, s)| (c.clone(), serde_json::json!(s)))
                        .collect();
                    let v = serde_json::json!({
                        "uid": me.uid, "gid": me.gid, "pid": me.pid, "user": me.user, "groups": me.groups,
                        "exe": me.exe, "unit": me.unit, "grants": grants,
                    });
                    out.line(&v.to_string())?;
                }
                WhoamiFormat::Text => {
                    let mut text = format!(
                        "uid:    {} ({})\ngid:    {}\ngroups: {}\npid:    {}\nexe:    {}\nunit:   {}",
                        me.uid,
                        me.user,
                        me.gid,
                        me.groups.join(", "),
                        me.pid,
                        me.exe,
                        if me.unit.is_empty() { "-" } else { &me.unit }
                    );
                    if me.grants.is_empty() {
                        text.push_str("\ngrants: none (no policy matches this process)");
                    }
                    for (client, scopes) in &me.grants {
                        text.push_str(&format!("\ngrant:  {client}: {}", scopes.join(" ")));
                    }
                    out.line(&text)?;
                }
            }
        }
    }
    Ok(Next::Done)
}

/// The date man pages carry: `SOURCE_DATE_EPOCH` (reproducible package builds), else today.
fn man_date() -> String {
    let at = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or_else(std::time::SystemTime::now, |secs| {
            std::time::UNIX_EPOCH + Duration::from_secs(secs)
        });
    humantime::format_rfc3339_seconds(at).to_string()[..10].to_owned()
}

/// credbroker(1): the command and its global options, then every subcommand with its own options, then exit
/// status, environment and files; all from the clap definition but the last three.
fn man_page() -> std::io::Result<Vec<u8>> {
    let cmd = Cli::command();
    let source = format!("credbroker {}", env!("CARGO_PKG_VERSION"));
    let man = clap_mangen::Man::new(cmd.clone())
        .date(man_date())
        .source(source.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    page.extend_from_slice(b".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("credbroker {}", sub.get_name());
        let sub = sub.clone().name(name.clone()).bin_name(&name);
        let mut part = Vec::new();
        let sub_man = clap_mangen::Man::new(sub);
        sub_man.render_synopsis_section(&mut part)?;
        sub_man.render_description_section(&mut part)?;
        sub_man.render_options_section(&mut part)?;
        // (clap_mangen separates "Possible values" with `.br`, a blank line, `.br`: one `.sp` says it.)
        let part = String::from_utf8_lossy(&part)
            .replace("\n.br\n\n.br\n", "\n.sp\n")
            .replace(".SH SYNOPSIS\n", &format!(".SS \"{name}\"\n"))
            .replace(".SH DESCRIPTION\n", ".PP\n")
            .replace(".SH OPTIONS\n", ".PP\nOptions:\n");
        page.extend_from_slice(part.as_bytes());
    }
    page.extend_from_slice(b".SH \"EXIT STATUS\"\n.nf\n");
    let exec_line = "exec: once CMD runs, its own exit status; 126 or 127 if it cannot be run";
    for line in EXIT_CODES.lines().skip(1).chain([exec_line]) {
        page.extend_from_slice(line.trim_start().replace('-', "\\-").as_bytes());
        page.push(b'\n');
    }
    page.extend_from_slice(
        br#".fi
.SH ENVIRONMENT
.TP
.B CREDBROKER_SOCKET
The daemon's socket, unless \fB\-\-socket\fR names one.
.TP
.B XDG_RUNTIME_DIR
Where a per-user daemon's socket is looked for (\fI$XDG_RUNTIME_DIR/credbroker/credbroker.sock\fR) when the
system socket does not exist.
.SH FILES
.TP
.I /run/credbroker/credbroker.sock
The system daemon's socket.
.SH "SEE ALSO"
credbrokerd(8), credbroker.toml(5)
"#,
    );
    Ok(page)
}

fn completions(shell: Shell) -> Vec<u8> {
    use clap_complete::Shell as S;
    let shell = match shell {
        Shell::Bash => S::Bash,
        Shell::Zsh => S::Zsh,
        Shell::Fish => S::Fish,
        Shell::Elvish => S::Elvish,
        Shell::Powershell => S::PowerShell,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "credbroker", &mut script);
    script
}

/// Runs every sink until the process is stopped (SIGTERM, SIGINT: exit 0, the files left in place), or once
/// each with `once`. A sink that cannot start ends the process with its exit code.
async fn run_sinks(socket: PathBuf, sinks: Vec<sink::Sink>, once: bool) -> Result<Next, CliError> {
    let mut tasks = tokio::task::JoinSet::new();
    for s in sinks {
        tasks.spawn(sink::run(socket.clone(), s, once));
    }
    let stopped = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                None => return Ok(Next::Done),
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(sink::SinkError::Daemon { path, source }))) => {
                    eprintln!("credbroker sink: {}: {source}", path.display());
                    return Ok(Next::Exit(exit_code(&source)));
                }
                Some(Ok(Err(sink::SinkError::File(e)))) => return Err(CliError::Sink(e)),
                Some(Err(e)) => return Err(CliError::Sink(format!("a sink stopped: {e}"))),
            },
            () = &mut stopped => return Ok(Next::Done),
        }
    }
}

fn render(token: &Token, format: Format) -> String {
    match format {
        Format::Raw => token.access_token().expose_secret().to_owned(),
        Format::Header => format!("Authorization: {}", token.bearer_header().expose_secret()),
        Format::Json => serde_json::json!({
            "access_token": token.access_token().expose_secret(),
            "token_type": token.token_type(),
            "expires_at": humantime::format_rfc3339_seconds(token.expires_at()).to_string(),
            "expires_in": token.expires_in().as_secs(),
            "scopes": token.scopes(),
            "client": token.client(),
        })
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    /// The fast path reads a command line as the full parser does, or leaves it to the full parser.
    #[test]
    fn the_fast_token_path_agrees_with_the_full_parser() {
        for line in [
            "token scim:read",
            "token scim:read scim:write",
            "--socket /s token a",
            "token --socket=/s a",
            "token -c idp --min-ttl 5m --format header a b",
            "token --client=idp --min-ttl=90 --format=json a",
            "token a --format exec-credential",
        ] {
            let fast = fast_token(&args(line)).unwrap_or_else(|| panic!("{line}: not fast"));
            let full =
                Cli::try_parse_from(std::iter::once("credbroker".to_owned()).chain(args(line)))
                    .unwrap_or_else(|e| panic!("{line}: {e}"));
            let Command::Token {
                client,
                min_ttl,
                format,
                scopes,
            } = full.command
            else {
                panic!("{line}: not token");
            };
            assert_eq!(fast.socket, full.socket, "{line}");
            assert_eq!(fast.client, client, "{line}");
            assert_eq!(fast.min_ttl, min_ttl, "{line}");
            assert_eq!(fast.scopes, scopes, "{line}");
            assert_eq!(
                format!("{:?}", fast.format.to_possible_value()),
                format!("{:?}", format.to_possible_value()),
                "{line}"
            );
        }
        for line in [
            "token",
            "token --help",
            "token -h a",
            "token a --format",
            "token a --format bogus",
            "token a --min-ttl soon",
            "token -c -x a",
            "token -c a -c b s",
            "token -- a",
            "token -cidp a",
            "--socket",
            "whoami",
            "exec -s a -- env",
            "--version",
        ] {
            assert!(
                fast_token(&args(line)).is_none(),
                "{line}: taken by the fast path"
            );
        }
    }
}
