//! `credbroker-bench`: measures the broker against the floor of its own stack and prints one table.
//!
//! - **Floor**: a bare tonic server on a Unix socket answering a constant `GetTokenResponse`, with the daemon's
//!   server settings, run as its own process (`credbroker-bench floor SOCKET`), so it pays for the same
//!   process boundary as the daemon.
//! - **Broker**: the release `credbrokerd` against the in-repo stand-in token endpoint.
//! - The cached path is reported as ratios to the floor, from interleaved rounds (floor, broker, floor, …),
//!   because absolute figures drift on a shared machine.
//!
//! Run it with `scripts/bench` (builds the release binaries first). `--quick` shortens every phase.
//! `--fleet` runs the fleet simulation instead ([`fleet`]): 1000 hosts × 20 keys through a 10-minute outage.

mod fleet;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credbroker_proto::pb;
use credbroker_proto::{TokenBroker, TokenBrokerClient, TokenBrokerServer};
use credbroker_tests::idp::{Fault, Registration, StandInIdp};
use credbroker_tests::{Daemon, DaemonOptions, TestDir, bin};
use tokio::io::AsyncBufReadExt;
use tonic::transport::Channel;

const HOT: &str = "bench:hot";
const DISTINCT: usize = 1000;
/// Entries of the largest scope set allowed (64 scopes of 256 bytes) cached to measure their cost.
const LARGEST: usize = 200;

/// The largest scope set allowed, number `i`: 64 scopes of 256 bytes.
fn largest_scope_set(i: usize) -> Vec<String> {
    (0..64)
        .map(|j| format!("bench:{i:03}{j:02}{}", "x".repeat(245)))
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("floor") {
        let socket = args
            .get(2)
            .ok_or_else(|| anyhow::anyhow!("usage: credbroker-bench floor SOCKET"))?;
        return tokio::runtime::Runtime::new()?.block_on(floor(Path::new(socket)));
    }
    const USAGE: &str = "usage: credbroker-bench [--quick] [--fleet]   (or: credbroker-bench floor SOCKET)\n\
        \n\
        Measures the release daemon against a bare tonic server and prints one table (Markdown).\n\
        --quick  shortens every phase (CI's smoke run)\n\
        --fleet  the fleet simulation instead: 1000 hosts x 20 keys through a 10-minute IdP outage\n\
        Run it with scripts/bench, which builds the release binaries first.";
    if let Some(unknown) = args[1..]
        .iter()
        .find(|a| !["--quick", "--fleet"].contains(&a.as_str()))
    {
        if unknown == "--help" || unknown == "-h" {
            println!("{USAGE}");
            return Ok(());
        }
        eprintln!("credbroker-bench: unknown argument {unknown:?}\n{USAGE}");
        std::process::exit(64);
    }
    let quick = args.iter().any(|a| a == "--quick");
    if args.iter().any(|a| a == "--fleet") {
        return run_fleet(quick);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(quick))
}

/// Prints the fleet simulation's table: for each way the IdP fails, its request rate steady, at the outage's
/// peak and in the first minute after it, and the callers that failed.
fn run_fleet(quick: bool) -> anyhow::Result<()> {
    let (hosts, keys) = if quick { (100, 20) } else { (1000, 20) };
    let (lifetime, outage) = (Duration::from_secs(3600), Duration::from_secs(600));
    println!(
        "fleet: {hosts} hosts x {keys} keys, {} s tokens, each key asked for every minute; the IdP fails for {} s \
         two hours in. Rates are IdP requests per second over 30-second windows (steady: the 30 minutes before).\n",
        lifetime.as_secs(),
        outage.as_secs()
    );
    println!(
        "| outage | steady /s | outage peak /s | first minute after /s | 30 min after, peak /s | callers failed with a valid cached token | without one | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for kind in [
        fleet::Outage::Unavailable,
        fleet::Outage::RateLimited,
        fleet::Outage::Timeout,
    ] {
        let r = fleet::simulate(hosts, keys, lifetime, outage, kind)?;
        println!(
            "| {} | {:.1} | {:.1} ({:.2}x) | {:.1} ({:.2}x) | {:.1} ({:.2}x) | {} | {} | {:.1} s |",
            kind.name(),
            r.steady,
            r.outage_peak,
            r.outage_peak / r.steady,
            r.recovery_peak,
            r.recovery_peak / r.steady,
            r.after_peak,
            r.after_peak / r.steady,
            r.failed_with_valid_token,
            r.failed_without,
            r.wall.as_secs_f64()
        );
    }
    println!(
        "\ntargets: outage peak <= 1.5x steady, first minute after <= 2x, no caller with a valid cached token fails"
    );
    Ok(())
}

/// The floor: a tonic server on a Unix socket that answers every GetToken with the same response.
async fn floor(socket: &Path) -> anyhow::Result<()> {
    struct Constant(pb::GetTokenResponse);
    #[tonic::async_trait]
    impl TokenBroker for Constant {
        async fn get_token(
            &self,
            _: tonic::Request<pb::GetTokenRequest>,
        ) -> Result<tonic::Response<pb::GetTokenResponse>, tonic::Status> {
            Ok(tonic::Response::new(self.0.clone()))
        }
        async fn who_am_i(
            &self,
            _: tonic::Request<pb::WhoAmIRequest>,
        ) -> Result<tonic::Response<pb::WhoAmIResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::WhoAmIResponse::default()))
        }
        async fn proof(
            &self,
            _: tonic::Request<pb::ProofRequest>,
        ) -> Result<tonic::Response<pb::ProofResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("the floor serves GetToken"))
        }
    }
    let response = pb::GetTokenResponse {
        access_token: "0b5f1e9e-55a4-4b53-9d0a-6f0f3b0c1d2e".into(),
        token_type: "Bearer".into(),
        expires_at: Some(prost_types::Timestamp::from(
            std::time::SystemTime::now() + Duration::from_secs(3600),
        )),
        scopes: vec![HOT.into()],
        client: "idp".into(),
    };
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    println!("ready");
    // The daemon's own server settings, so the ratio measures what credbroker adds, not a configuration.
    credbroker_daemon::serve::server::builder()
        .add_service(TokenBrokerServer::new(Constant(response)))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await?;
    Ok(())
}

async fn channel(socket: &Path) -> anyhow::Result<Channel> {
    Ok(credbroker_tests::uds_channel(socket).await)
}

/// What one load run measured.
#[derive(Default)]
struct Stats {
    calls: u64,
    errors: u64,
    elapsed: Duration,
    /// Latencies in microseconds, sorted.
    latencies: Vec<u32>,
}

impl Stats {
    fn throughput(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_micros(u64::from(self.latencies[i]))
    }
}

fn request(scope: &str) -> pb::GetTokenRequest {
    pb::GetTokenRequest {
        scopes: vec![scope.to_owned()],
        client: "idp".to_owned(),
        ..Default::default()
    }
}

/// A Proof for a GET to a URL within the bench policy's targets, with a token of client `bound`.
fn proof_request() -> pb::ProofRequest {
    pb::ProofRequest {
        scopes: vec![HOT.to_owned()],
        client: "bound".to_owned(),
        method: "GET".to_owned(),
        url: "https://api.example.com/v1/users?page=2".to_owned(),
        ..Default::default()
    }
}

/// What the load's callers call.
#[derive(Clone, Copy)]
enum Call {
    GetToken,
    Proof,
}

/// `callers` concurrent callers over `conns` connections, each calling GetToken in a loop for `duration`.
async fn load(
    socket: &Path,
    callers: usize,
    conns: usize,
    duration: Duration,
) -> anyhow::Result<Stats> {
    load_of(Call::GetToken, socket, callers, conns, duration).await
}

/// As [`load`], calling `call`.
async fn load_of(
    call: Call,
    socket: &Path,
    callers: usize,
    conns: usize,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let mut channels = Vec::new();
    for _ in 0..conns {
        channels.push(channel(socket).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..callers {
        let mut client = TokenBrokerClient::new(channels[i % conns].clone());
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = match call {
                    Call::GetToken => client.get_token(request(HOT)).await.is_ok(),
                    Call::Proof => client.proof(proof_request()).await.is_ok(),
                };
                if ok {
                    latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        });
    }
    collect(tasks, start).await
}

/// `callers` concurrent callers of the HTTP API, each on its own HTTP/1.1 keep-alive connection (as curl or
/// httpx would), each asking `GET /v1/token` in a loop for `duration`.
async fn http_load(socket: &Path, callers: usize, duration: Duration) -> anyhow::Result<Stats> {
    use http_body_util::{BodyExt, Empty};
    let request = || {
        http::Request::get(format!("/v1/token?scope={HOT}&client=idp"))
            .header("host", "localhost")
            .header("credbroker-request", "true")
            .body(Empty::<bytes::Bytes>::new())
            .expect("a valid request")
    };
    // A connection is checked with one request first: the daemon closes at once a connection over the uid's
    // budget (64), which the previous phase's connections may still hold for a moment.
    type Sender = hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>;
    let connect = move |socket: std::path::PathBuf| async move {
        for _ in 0..100 {
            let io = hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(&socket).await?);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            if let Ok(r) = sender.send_request(request()).await
                && r.status() == 200
                && r.into_body().collect().await.is_ok()
            {
                return Ok::<Sender, anyhow::Error>(sender);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("the HTTP API does not answer")
    };
    let mut senders = Vec::new();
    for _ in 0..callers {
        senders.push(connect(socket.to_owned()).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut sender in senders {
        let socket = socket.to_owned();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let (failure, close) = match sender.send_request(request()).await {
                    Ok(response) => {
                        // The daemon ends a keep-alive connection after 1000 requests, as any client expects.
                        let close = response
                            .headers()
                            .get("connection")
                            .is_some_and(|v| v == "close");
                        let status = response.status();
                        match response.into_body().collect().await {
                            Ok(_) if status == 200 => (None, close),
                            Ok(body) => (Some(format!("{status}: {:?}", body.to_bytes())), close),
                            Err(e) => (Some(format!("{status}, body: {e}")), true),
                        }
                    }
                    // The daemon closed the connection while it was idle, before this request was sent (an
                    // HTTP/1.1 connection waiting longer than 5 s for its next request is closed): a client
                    // reconnects and sends it again, as HTTP clients do with a pooled connection.
                    Err(e) if e.is_canceled() => {
                        match connect(socket.clone()).await {
                            Ok(s) => sender = s,
                            Err(_) => break,
                        }
                        continue;
                    }
                    Err(e) => (Some(e.to_string()), true),
                };
                match failure {
                    None => {
                        latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Some(why) => {
                        // (Each caller's first error is shown, on stderr, beside the table.)
                        if errors == 0 {
                            eprintln!("HTTP API error after {:?}: {why}", t.duration_since(start));
                        }
                        errors += 1;
                    }
                }
                if close {
                    match connect(socket.clone()).await {
                        Ok(s) => sender = s,
                        Err(_) => break,
                    }
                }
            }
            (latencies, errors)
        });
    }
    collect(tasks, start).await
}

/// The callers' latencies and errors, summed up once they are all done.
async fn collect(
    mut tasks: tokio::task::JoinSet<(Vec<u32>, u64)>,
    start: Instant,
) -> anyhow::Result<Stats> {
    let mut stats = Stats::default();
    while let Some(r) = tasks.join_next().await {
        let (lat, errors) = r?;
        stats.calls += lat.len() as u64;
        stats.errors += errors;
        stats.latencies.extend(lat);
    }
    stats.elapsed = start.elapsed();
    stats.latencies.sort_unstable();
    Ok(stats)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

struct Row {
    what: String,
    value: String,
    target: String,
    ok: Option<bool>,
}

fn row(what: &str, value: String, target: &str, ok: Option<bool>) -> Row {
    Row {
        what: what.to_owned(),
        value,
        target: target.to_owned(),
        ok,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

async fn run(quick: bool) -> anyhow::Result<()> {
    let (rounds, phase) = if quick {
        (1, Duration::from_secs(1))
    } else {
        (5, Duration::from_secs(3))
    };
    let dir = TestDir::new();
    let secret = "bench-secret";
    dir.write("idp.secret", secret, 0o600);
    let mut scopes: Vec<String> = (0..DISTINCT).map(|i| format!("bench:s{i}")).collect();
    scopes.extend([HOT.to_owned(), "bench:cold".to_owned()]);
    // For the oidc-agent peer, which asks for these with its refresh token.
    scopes.extend(["openid".to_owned(), "offline_access".to_owned()]);
    scopes.extend((0..LARGEST).flat_map(largest_scope_set));
    let idp = StandInIdp::start(
        0,
        vec![Registration {
            id: "broker".into(),
            secret: secret.into(),
            scopes,
        }],
    )
    .await;
    let config = format!(
        r#"version = 1
[daemon]
socket = "{dir}/credbroker.sock"
rate_limit = {{ per_minute = 1000000, burst = 100000 }}

[clients.idp]
token_url = "{url}"
client_id = "broker"
allow_http = true
client_secret = {{ file = "{dir}/idp.secret" }}

[[policy]]
name = "bench"
match = {{ uid = 0 }}
client = "idp"
scopes = ["bench:*"]

# DPoP: tokens bound to a key the daemon holds, proofs for one API.
[clients.bound]
token_url = "{url}"
client_id = "broker"
allow_http = true
client_secret = {{ file = "{dir}/idp.secret" }}
dpop = true

[[policy]]
name = "bench-bound"
match = {{ uid = 0 }}
client = "bound"
scopes = ["bench:*"]
dpop_targets = ["https://api.example.com/v1/"]

# The exec race: scopes for uid 65534 only while it runs /usr/bin/sleep.
[[policy]]
name = "race"
match = {{ uid = 65534, exe = "/usr/bin/sleep" }}
client = "idp"
scopes = ["race:write"]

# The attackers of the "under attack" rows: ordinary users with a policy of their own.
[[policy]]
name = "attacker"
match = {{ uid = [65534, 40001, 40002] }}
client = "idp"
scopes = ["other:read"]
"#,
        dir = dir.path().display(),
        url = idp.token_url()
    );
    let opts = DaemonOptions {
        log: "warn".into(),
        ..DaemonOptions::default()
    };
    let daemon = Daemon::start_with(&dir, &config, opts).await;
    let broker_socket = daemon.socket.clone();
    let floor_socket = dir.path().join("floor.sock");
    let mut floor = tokio::process::Command::new(std::env::current_exe()?)
        .arg("floor")
        .arg(&floor_socket)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    tokio::io::BufReader::new(floor.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .await?;
    anyhow::ensure!(
        line.trim() == "ready",
        "the floor server did not start: {line:?}"
    );

    // Warm up both (connections, the cache, the allocator).
    load(&broker_socket, 4, 2, Duration::from_millis(500)).await?;
    load(&floor_socket, 4, 2, Duration::from_millis(500)).await?;
    let idle_rss = rss_kib(daemon.pid());

    // Interleaved rounds of the cached path.
    let scenarios = [(1usize, 1usize), (64, 16)];
    let mut results: Vec<Vec<(Stats, Stats)>> = scenarios.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, (callers, conns)) in scenarios.iter().enumerate() {
            let f = load(&floor_socket, *callers, *conns, phase).await?;
            let b = load(&broker_socket, *callers, *conns, phase).await?;
            results[i].push((f, b));
        }
    }
    let mut rows = Vec::new();
    for (i, (callers, conns)) in scenarios.iter().enumerate() {
        let runs = &results[i];
        let tput = |pick: fn(&(Stats, Stats)) -> &Stats| {
            median(runs.iter().map(|r| pick(r).throughput()).collect())
        };
        let pct = |pick: fn(&(Stats, Stats)) -> &Stats, p: f64| {
            Duration::from_secs_f64(median(
                runs.iter()
                    .map(|r| pick(r).percentile(p).as_secs_f64())
                    .collect(),
            ))
        };
        let (ft, bt) = (tput(|r| &r.0), tput(|r| &r.1));
        let errors: u64 = runs.iter().map(|r| r.1.errors).sum();
        let label = format!("cache hit, {callers} caller(s) / {conns} conn(s)");
        rows.push(row(
            &format!("{label}: throughput"),
            format!("{bt:.0}/s (floor {ft:.0}/s) = {:.2}x", bt / ft),
            if *callers == 64 { ">= 0.95x floor" } else { "" },
            (*callers == 64).then_some(bt / ft >= 0.95),
        ));
        for (name, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
            let (fp, bp) = (pct(|r| &r.0, p), pct(|r| &r.1, p));
            let ratio = bp.as_secs_f64() / fp.as_secs_f64();
            let target = *callers == 1 && name == "p50";
            rows.push(row(
                &format!("{label}: {name}"),
                format!("{} (floor {}) = {ratio:.2}x", ms(bp), ms(fp)),
                if target { "<= 1.10x floor" } else { "" },
                target.then_some(ratio <= 1.10),
            ));
        }
        rows.push(row(
            &format!("{label}: errors"),
            errors.to_string(),
            "0",
            Some(errors == 0),
        ));
    }
    // The HTTP API on the same socket, interleaved with the gRPC path it is compared to.
    let mut http = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, callers) in [1usize, 64].into_iter().enumerate() {
            let h = http_load(&broker_socket, callers, phase).await?;
            let g = load(&broker_socket, callers, callers.min(16), phase).await?;
            http[i].push((h, g));
        }
    }
    let h1 = &http[0];
    let p50 = |pick: fn(&(Stats, Stats)) -> &Stats| {
        Duration::from_secs_f64(median(
            h1.iter()
                .map(|r| pick(r).percentile(0.5).as_secs_f64())
                .collect(),
        ))
    };
    let (hp, gp) = (p50(|r| &r.0), p50(|r| &r.1));
    rows.push(row(
        "HTTP API (HTTP/1.1), 1 caller: p50",
        format!(
            "{} (gRPC {}) = {:.2}x",
            ms(hp),
            ms(gp),
            hp.as_secs_f64() / gp.as_secs_f64()
        ),
        "",
        None,
    ));
    let h64 = &http[1];
    let tput = |pick: fn(&(Stats, Stats)) -> &Stats| {
        median(h64.iter().map(|r| pick(r).throughput()).collect())
    };
    let (ht, gt) = (tput(|r| &r.0), tput(|r| &r.1));
    let errors: u64 = http.iter().flatten().map(|r| r.0.errors).sum();
    rows.push(row(
        "HTTP API (HTTP/1.1), 64 callers / 64 conns: throughput",
        format!(
            "{ht:.0}/s (gRPC, 64 callers / 16 conns: {gt:.0}/s) = {:.2}x",
            ht / gt
        ),
        "",
        None,
    ));
    rows.push(row(
        "HTTP API: errors",
        errors.to_string(),
        "0",
        Some(errors == 0),
    ));
    // A cached Proof (a signature on top of a cached token) beside a cached GetToken, interleaved.
    load_of(
        Call::Proof,
        &broker_socket,
        1,
        1,
        Duration::from_millis(300),
    )
    .await?;
    let mut proofs = Vec::new();
    for _ in 0..rounds {
        let g = load(&broker_socket, 1, 1, phase).await?;
        let p = load_of(Call::Proof, &broker_socket, 1, 1, phase).await?;
        proofs.push((g, p));
    }
    let p50 = |pick: fn(&(Stats, Stats)) -> &Stats| {
        Duration::from_secs_f64(median(
            proofs
                .iter()
                .map(|r| pick(r).percentile(0.5).as_secs_f64())
                .collect(),
        ))
    };
    let (gp, pp) = (p50(|r| &r.0), p50(|r| &r.1));
    let ratio = pp.as_secs_f64() / gp.as_secs_f64();
    let errors: u64 = proofs.iter().map(|r| r.1.errors).sum();
    rows.push(row(
        "DPoP Proof (cached token), 1 caller: p50",
        format!(
            "{} (GetToken {}) = {ratio:.2}x, {errors} errors",
            ms(pp),
            ms(gp)
        ),
        "<= 1.5x GetToken",
        Some(ratio <= 1.5 && errors == 0),
    ));
    rows.push(row(
        "daemon idle RSS",
        format!("{:.1} MB", idle_rss as f64 / 1024.0),
        "< 20 MB",
        Some(idle_rss < 20 * 1024),
    ));

    // A cold burst: 300 callers for one key nobody asked for yet, against an IdP that takes 200 ms.
    idp.set_fault(Fault::Slow(Duration::from_millis(200)));
    let before = idp.request_count();
    let mut channels = Vec::new();
    for _ in 0..30 {
        channels.push(channel(&broker_socket).await?);
    }
    let start = Instant::now();
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..300 {
        let mut c = TokenBrokerClient::new(channels[i % channels.len()].clone());
        burst.spawn(async move {
            c.get_token(request("bench:cold"))
                .await
                .map(|r| r.into_inner().access_token)
        });
    }
    let mut tokens = std::collections::HashSet::new();
    while let Some(r) = burst.join_next().await {
        tokens.insert(r??);
    }
    let wall = start.elapsed();
    idp.set_fault(Fault::None);
    let idp_requests = idp.request_count() - before;
    rows.push(row(
        "cold burst, 300 callers, 1 key (IdP 200 ms)",
        format!(
            "{idp_requests} IdP request(s), {} distinct token(s), {} wall",
            tokens.len(),
            ms(wall)
        ),
        "1 IdP request",
        Some(idp_requests == 1 && tokens.len() == 1),
    ));

    // 1,000 distinct scope sets cached.
    let rss_before = rss_kib(daemon.pid());
    let ch = channel(&broker_socket).await?;
    let mut fill = tokio::task::JoinSet::new();
    for chunk in 0..16 {
        let mut c = TokenBrokerClient::new(ch.clone());
        fill.spawn(async move {
            for i in (chunk..DISTINCT).step_by(16) {
                c.get_token(request(&format!("bench:s{i}"))).await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(r) = fill.join_next().await {
        r??;
    }
    let rss_after = rss_kib(daemon.pid());
    let per_token = (rss_after.saturating_sub(rss_before) * 1024) as f64 / DISTINCT as f64;
    rows.push(row(
        "1,000 distinct scope sets cached",
        format!(
            "RSS {:.1} -> {:.1} MB, {per_token:.0} B per cached token",
            rss_before as f64 / 1024.0,
            rss_after as f64 / 1024.0
        ),
        "< 2 KB per token",
        Some(per_token < 2048.0),
    ));

    // The largest scope sets allowed, cached: the bytes each entry costs.
    let rss_before = rss_kib(daemon.pid());
    let mut c = TokenBrokerClient::new(ch.clone());
    for i in 0..LARGEST {
        c.get_token(pb::GetTokenRequest {
            scopes: largest_scope_set(i),
            client: "idp".to_owned(),
            ..Default::default()
        })
        .await?;
    }
    let rss_after = rss_kib(daemon.pid());
    let per_entry = (rss_after.saturating_sub(rss_before) * 1024) as f64 / LARGEST as f64;
    rows.push(row(
        "cached entries of the largest scope set (64 scopes of 256 B)",
        format!(
            "RSS {:.1} -> {:.1} MB, {per_entry:.0} B per entry ({LARGEST} entries)",
            rss_before as f64 / 1024.0,
            rss_after as f64 / 1024.0
        ),
        "",
        None,
    ));

    // A legitimate caller under attack from another uid, next to the same caller unattacked.
    if credbroker_daemon::sys::euid() == 0 {
        rows.extend(under_attack(&daemon, phase).await?);
    } else {
        rows.push(row(
            "under attack",
            "skipped: the attacker runs as uid 65534, which needs root".into(),
            "",
            None,
        ));
    }

    // The CLI's cold start: a whole `credbroker token` process for a cached token. Processes are run and
    // waited for from a thread of their own (std's spawn and waitpid, as hyperfine does): tokio's child
    // reaping, woken by SIGCHLD, would add its own latency to every run.
    let cli = bin("credbroker");
    let ours = {
        let (cli, socket) = (cli.clone(), broker_socket.clone());
        move || {
            let mut c = std::process::Command::new(&cli);
            c.arg("--socket")
                .arg(&socket)
                .args(["token", "-c", "idp", HOT])
                .stdout(Stdio::null());
            c
        }
    };
    let runs = if quick { 11 } else { 51 };
    let mut walls = {
        let ours = ours.clone();
        tokio::task::spawn_blocking(move || {
            (0..runs)
                .map(|_| run_wall(&mut ours()))
                .collect::<anyhow::Result<Vec<f64>>>()
        })
        .await??
    };
    let cli_median = Duration::from_secs_f64(median(walls.clone()));
    walls.sort_by(f64::total_cmp);
    let cli_p90 = Duration::from_secs_f64(walls[walls.len() * 9 / 10]);
    rows.push(row(
        "CLI `credbroker token` (cached), wall",
        format!(
            "median {}, p90 {} ({runs} runs)",
            ms(cli_median),
            ms(cli_p90)
        ),
        "median < 15 ms",
        Some(cli_median < Duration::from_millis(15)),
    ));

    // A peer: oidc-agent's `oidc-token` (C) for a cached token, paired with `credbroker token`, interleaved.
    rows.push(match oidc_agent(&idp, &dir, secret).await {
        Ok(agent) => {
            let pairs = if quick { 101 } else { 1001 };
            let peer = {
                let socket = agent.socket.clone();
                move || {
                    let mut c = std::process::Command::new("oidc-token");
                    c.arg("bench")
                        .env("OIDC_SOCK", &socket)
                        .stdout(Stdio::null());
                    c
                }
            };
            let (o, p) = tokio::task::spawn_blocking(move || {
                let (mut theirs, mut mine) = (Vec::new(), Vec::new());
                for i in 0..pairs {
                    // Which goes first alternates, so neither always finds the caches warm.
                    if i % 2 == 0 {
                        mine.push(run_wall(&mut ours())?);
                        theirs.push(run_wall(&mut peer())?);
                    } else {
                        theirs.push(run_wall(&mut peer())?);
                        mine.push(run_wall(&mut ours())?);
                    }
                }
                anyhow::Ok((median(mine), median(theirs)))
            })
            .await??;
            row(
                "CLI `credbroker token` vs oidc-agent's `oidc-token` (cached), paired, median wall",
                format!(
                    "{} vs {} = {:.2}x ({pairs} pairs)",
                    ms(Duration::from_secs_f64(o)),
                    ms(Duration::from_secs_f64(p)),
                    o / p
                ),
                "<= 0.9x",
                Some(o / p <= 0.9),
            )
        }
        Err(e) => row(
            "CLI `credbroker token` vs oidc-agent's `oidc-token`",
            format!("skipped: {e}"),
            "",
            None,
        ),
    });

    // The CLI's `proof`, whole process, for a cached token.
    let (cli, socket) = (cli.clone(), broker_socket.clone());
    let walls = tokio::task::spawn_blocking(move || {
        (0..runs)
            .map(|_| {
                run_wall(
                    std::process::Command::new(&cli)
                        .arg("--socket")
                        .arg(&socket)
                        .args(["proof", "-c", "bound", "--method", "GET", "--url"])
                        .arg("https://api.example.com/v1/users")
                        .arg(HOT)
                        .stdout(Stdio::null()),
                )
            })
            .collect::<anyhow::Result<Vec<f64>>>()
    })
    .await??;
    rows.push(row(
        "CLI `credbroker proof` (cached token), wall",
        format!("median {}", ms(Duration::from_secs_f64(median(walls)))),
        "",
        None,
    ));

    // IdP requests per hour for a steady workload of 5-minute tokens (the daemon's cache on a paused clock).
    let per_hour = std::thread::spawn(steady_workload)
        .join()
        .map_err(|_| anyhow::anyhow!("model panicked"))??;
    rows.push(row(
        "steady workload, 5-min tokens, 1 call/s for 1 h",
        format!("{per_hour} IdP requests per hour (a token lasts 300 s: 12 is the floor)"),
        "",
        None,
    ));

    print_table(&rows, quick);
    drop(floor);
    drop(daemon);
    Ok(())
}

/// Starts `tests/helpers/attacker.py MODE ARGS` as `uid` against `socket` and waits for its first report.
async fn attacker(socket: &Path, uid: u32, args: &[&str]) -> anyhow::Result<tokio::process::Child> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/helpers/attacker.py");
    let mut child = tokio::process::Command::new("/usr/bin/python3")
        .arg(script)
        .arg(socket)
        .args(args)
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    tokio::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .await?;
    anyhow::ensure!(
        line.starts_with('{'),
        "the attacker did not start: {line:?}"
    );
    Ok(child)
}

/// The daemon's (VmRSS, VmHWM) in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The wall time of one run of `command`, which must succeed (its output unread).
fn run_wall(command: &mut std::process::Command) -> anyhow::Result<f64> {
    let t = Instant::now();
    let status = command.status()?;
    let took = t.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "{command:?} failed: {status}");
    Ok(took)
}

/// A running oidc-agent with account `bench` set up against the stand-in (by the refresh-token grant) and its
/// token cached; killed when dropped.
struct OidcAgent {
    socket: String,
    pid: u32,
}

impl Drop for OidcAgent {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.pid.to_string())
            .status();
    }
}

/// Starts oidc-agent (Debian's `oidc-agent-cli`) with its own home in `dir`, and sets up account `bench`.
async fn oidc_agent(idp: &StandInIdp, dir: &TestDir, secret: &str) -> anyhow::Result<OidcAgent> {
    let home = dir.path().join("oidc-home");
    std::fs::create_dir_all(&home)?;
    let out = tokio::process::Command::new("oidc-agent")
        .arg("--no-autoload")
        .env("HOME", &home)
        .output()
        .await
        .map_err(|e| {
            anyhow::anyhow!("oidc-agent is not installed (apt-get install oidc-agent-cli): {e}")
        })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = |name: &str| {
        text.split(';')
            .find_map(|part| part.trim().strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    let (Some(socket), Some(pid)) = (value("OIDC_SOCK"), value("OIDCD_PID")) else {
        anyhow::bail!("oidc-agent did not say where it listens: {text:?}");
    };
    let agent = OidcAgent {
        socket,
        pid: pid.parse()?,
    };
    idp.allow_refresh_token("bench-refresh-token", &["openid", "offline_access", HOT]);
    let generated = tokio::process::Command::new("oidc-gen")
        .arg(format!("--iss={}", idp.issuer()))
        .args(["--client-id=broker", &format!("--client-secret={secret}")])
        .args(["--rt=bench-refresh-token", &format!("--scope=openid {HOT}")])
        .args([
            "--pw-env",
            "--confirm-default",
            "--prompt=none",
            "--no-url-call",
            "--no-save",
            "bench",
        ])
        .env("HOME", &home)
        .env("OIDC_SOCK", &agent.socket)
        .env("OIDC_ENCRYPTION_PW", "bench")
        .stdin(Stdio::null())
        .output()
        .await?;
    anyhow::ensure!(
        generated.status.success(),
        "oidc-gen could not set up the account: {}",
        String::from_utf8_lossy(&generated.stderr).trim()
    );
    let status = tokio::process::Command::new("oidc-token")
        .arg("bench")
        .env("OIDC_SOCK", &agent.socket)
        .stdout(Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "oidc-token failed");
    Ok(agent)
}

/// Attacking processes: each a uid and `attacker.py`'s arguments.
type Attackers<'a> = Vec<(u32, Vec<&'a str>)>;

/// One legitimate caller (uid 0, 1 connection) before and during each attack (by uid 65534, or by three uids
/// at once): its p50 and p99, and the daemon's RSS (now and peak).
async fn under_attack(daemon: &Daemon, phase: Duration) -> anyhow::Result<Vec<Row>> {
    let socket = &daemon.socket;
    let mut rows = Vec::new();
    let quiet = load(socket, 1, 1, phase).await?;
    let (rss, _) = memory_kib(daemon.pid());
    rows.push(row(
        "unattacked: 1 caller, p50 / p99 / RSS",
        format!(
            "{} / {} / {:.1} MB",
            ms(quiet.percentile(0.5)),
            ms(quiet.percentile(0.99)),
            rss as f64 / 1024.0
        ),
        "",
        None,
    ));
    let secs = (phase.as_secs_f64() + 2.0).to_string();
    let replies = ["replies", "64", "50", "zero"];
    let one = |args: &[&'static str]| vec![(65534, args.to_vec())];
    let attacks: [(&str, Attackers<'_>); 5] = [
        (
            "1000 connections x 16 unfinished 20 KiB messages",
            one(&["streams", "1000"]),
        ),
        ("1000 idle connections", one(&["idle", "1000"])),
        (
            "connection attempts without pause",
            vec![(65534, vec!["attempts-for", &secs])],
        ),
        (
            "64 connections x 16 reflection streams x 50 answers, no window",
            one(&replies),
        ),
        (
            "the same from three uids at once",
            [65534, 40001, 40002]
                .map(|uid| (uid, replies.to_vec()))
                .to_vec(),
        ),
    ];
    for (what, attackers) in attacks {
        let mut children = Vec::new();
        for (uid, args) in &attackers {
            children.push(attacker(socket, *uid, args).await?);
        }
        let s = load(socket, 1, 1, phase).await?;
        let (rss, peak) = memory_kib(daemon.pid());
        for mut child in children {
            if let Some(mut stdin) = child.stdin.take() {
                use tokio::io::AsyncWriteExt;
                let _ = stdin.write_all(b"\n").await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        }
        let bound = if attackers.len() > 1 { 128 } else { 64 };
        rows.push(row(
            &format!("under attack ({what}): 1 caller, p50 / p99 / RSS (peak)"),
            format!(
                "{} / {} / {:.1} MB ({:.1} MB), {} errors",
                ms(s.percentile(0.5)),
                ms(s.percentile(0.99)),
                rss as f64 / 1024.0,
                peak as f64 / 1024.0,
                s.errors
            ),
            &format!("served; RSS < {bound} MB"),
            Some(s.errors == 0 && !s.latencies.is_empty() && peak < bound * 1024),
        ));
    }
    // The exec race: a process connects and at once execs the program an `exe` policy allows, while a child
    // it forked before connecting calls over the shared connection. Won when the daemon reads the executable
    // after the exec: with no queue ahead, and behind 60 connections (then the daemon does not judge it).
    let races = if phase < Duration::from_secs(2) {
        10
    } else {
        50
    };
    let mut won = Vec::new();
    for prior in ["0", "60"] {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/helpers/attacker.py");
        let out = tokio::process::Command::new("/usr/bin/python3")
            .arg(script)
            .arg(socket)
            .args(["exec-races", "/usr/bin/sleep", &races.to_string(), prior])
            .env("SCOPE", "race:write")
            .uid(65534)
            .gid(65534)
            .stderr(Stdio::null())
            .output()
            .await?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow::anyhow!("exec-races: {e}: {}", String::from_utf8_lossy(&out.stdout))
        })?;
        won.push(report["won"].as_u64().unwrap_or(0));
    }
    rows.push(row(
        "exec race (`attacker.py exec-races`): races won with no queue ahead / behind 60 connections",
        format!("{} / {} of {races}", won[0], won[1]),
        "",
        None,
    ));
    Ok(rows)
}

/// Drives the daemon's own `TokenCache` on a paused clock: one call a second for an hour, 5-minute tokens,
/// the default min TTL; counts the fetches (initial and refreshes).
fn steady_workload() -> anyhow::Result<usize> {
    use credbroker_daemon::policy::scope::ScopeSet;
    use credbroker_daemon::tokens::cache::{
        CacheConfig, CacheKey, FetchFuture, FetchKind, Fetcher, MinTtl, TokenCache,
    };
    use credbroker_daemon::tokens::upstream::Issued;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl Fetcher for Count {
        fn fetch(&self, key: &CacheKey, _: FetchKind) -> FetchFuture {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            let granted = key.scopes.clone();
            Box::pin(async move {
                Ok(Issued {
                    access_token: secrecy::SecretString::from(format!("token-{n}")),
                    token_type: "Bearer".into(),
                    lifetime: Duration::from_secs(300),
                    received_at: tokio::time::Instant::now(),
                    granted,
                    credential: None,
                })
            })
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    rt.block_on(async {
        let counter = Arc::new(Count(AtomicUsize::new(0)));
        let cache = TokenCache::new(counter.clone(), CacheConfig::default());
        let key = CacheKey {
            client: "idp".into(),
            scopes: ScopeSet::parse(&[HOT])?,
        };
        for _ in 0..3600 {
            cache
                .get(&key, MinTtl::Default(Duration::from_secs(60)), || Ok(()))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(counter.0.load(Ordering::SeqCst))
    })
}

fn print_table(rows: &[Row], quick: bool) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("machine: {cores} cores, {cpu}, Linux {}", kernel.trim());
    println!(
        "mode: {}",
        if quick {
            "quick (1 round of 1 s)"
        } else {
            "5 interleaved rounds of 3 s per scenario; medians"
        }
    );
    println!();
    println!("| measurement | result | target | |");
    println!("|---|---|---|---|");
    for r in rows {
        let ok = match r.ok {
            Some(true) => "ok",
            Some(false) => "MISSED",
            None => "",
        };
        println!("| {} | {} | {} | {ok} |", r.what, r.value, r.target);
    }
}
