//! `credbroker`: get a least-privilege OAuth token from `credbrokerd` in one line of shell.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use credbroker_client::secrecy::ExposeSecret;
use credbroker_client::{Client, Error, Token, TokenRequest};

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
    /// Operator action needed: the IdP refused the broker's credentials or the scope.
    pub(crate) const OPERATOR: u8 = 78;
}

const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   other error
  64  usage: bad arguments, invalid scope, unknown or ambiguous client
  75  retryable: daemon unreachable, IdP unavailable, rate limited
  77  denied: no policy allows this process the requested client or scope
  78  operator action needed: the IdP rejected the broker's credentials or the scope";

/// Least-privilege OAuth 2.0 tokens from credbrokerd, for this process as the kernel identifies it.
#[derive(Parser)]
#[command(version, about, after_help = EXIT_CODES)]
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
        /// raw: the token; header: "Authorization: Bearer <token>"; json: the token and its metadata.
        #[arg(long, value_enum, default_value_t = Format::Raw)]
        format: Format,
        /// Scopes to request.
        #[arg(required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// Show how the daemon sees this process, and what it may request.
    #[command(after_help = EXIT_CODES)]
    Whoami {
        /// Output format.
        #[arg(long, value_enum, default_value_t = WhoamiFormat::Text)]
        format: WhoamiFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Raw,
    Json,
    Header,
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("credbroker: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
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

async fn run(cli: Cli) -> Result<(), Error> {
    let socket = cli
        .socket
        .unwrap_or_else(credbroker_client::discover_socket);
    let mut client = Client::connect(&socket).await?;
    match cli.command {
        Command::Token {
            client: name,
            min_ttl,
            format,
            scopes,
        } => {
            // A pasted OAuth scope string ("a b c") is several scopes.
            let scopes: Vec<String> = scopes
                .iter()
                .flat_map(|s| s.split_whitespace())
                .map(str::to_owned)
                .collect();
            let mut request = TokenRequest::new(scopes);
            if let Some(name) = name {
                request = request.client(name);
            }
            if let Some(min_ttl) = min_ttl {
                request = request.min_ttl(min_ttl);
            }
            let token = client.get_token(request).await?;
            println!("{}", render(&token, format));
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
                    println!("{v}");
                }
                WhoamiFormat::Text => {
                    println!("uid:    {} ({})", me.uid, me.user);
                    println!("gid:    {}", me.gid);
                    println!("groups: {}", me.groups.join(", "));
                    println!("pid:    {}", me.pid);
                    println!("exe:    {}", me.exe);
                    println!(
                        "unit:   {}",
                        if me.unit.is_empty() { "-" } else { &me.unit }
                    );
                    if me.grants.is_empty() {
                        println!("grants: none (no policy matches this process)");
                    }
                    for (client, scopes) in &me.grants {
                        println!("grant:  {client}: {}", scopes.join(" "));
                    }
                }
            }
        }
    }
    Ok(())
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
