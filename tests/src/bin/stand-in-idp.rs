//! `credbroker-stand-in-idp`: the in-repo stand-in token endpoint as a process, for the quick start.
//! **Not an identity provider**: it issues opaque test tokens to one client on 127.0.0.1.
//!
//! Prints `token_url=http://127.0.0.1:PORT/oauth2/token` on stdout once listening, then serves until killed.

use credbroker_tests::idp::{Registration, StandInIdp};

const USAGE: &str = "usage: credbroker-stand-in-idp [--port N] [--refresh-token TOKEN] --client-id ID --client-secret-file PATH --scopes 'A B C'";

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!(
            "credbroker-stand-in-idp: a stand-in OAuth 2.0 token endpoint for the quick start and the tests \
             (NOT an identity provider)\n{USAGE}"
        );
        return std::process::ExitCode::SUCCESS;
    }
    match serve().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credbroker-stand-in-idp: {e}");
            std::process::ExitCode::from(64)
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut port, mut id, mut secret_file, mut scopes) = (0u16, None, None, None);
    let mut refresh = None;
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--port" => port = value()?.parse()?,
            "--client-id" => id = Some(value()?),
            "--client-secret-file" => secret_file = Some(value()?),
            "--scopes" => scopes = Some(value()?),
            "--refresh-token" => refresh = Some(value()?),
            _ => anyhow::bail!("unknown argument {flag}\n{USAGE}"),
        }
    }
    let (Some(id), Some(secret_file), Some(scopes)) = (id, secret_file, scopes) else {
        anyhow::bail!(USAGE);
    };
    let secret = std::fs::read_to_string(&secret_file)?.trim_end().to_owned();
    let scopes: Vec<String> = scopes.split_whitespace().map(str::to_owned).collect();
    let idp = StandInIdp::start(
        port,
        vec![Registration {
            id,
            secret,
            scopes: scopes.clone(),
        }],
    )
    .await;
    if let Some(token) = refresh {
        idp.allow_refresh_token(
            &token,
            &scopes.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }
    println!("token_url={}", idp.token_url());
    eprintln!(
        "stand-in token endpoint (NOT an identity provider) at {}",
        idp.token_url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
