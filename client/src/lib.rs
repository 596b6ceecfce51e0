//! Client for `credbrokerd`: least-privilege OAuth 2.0 access tokens for this process, over the daemon's Unix
//! socket. The daemon decides what this process may have from the identity the kernel reports for it
//! (uid, gid, executable, systemd unit); nothing this library sends can widen that.
//!
//! ```no_run
//! # async fn demo() -> Result<(), credbroker_client::Error> {
//! use secrecy::ExposeSecret;
//!
//! let mut client = credbroker_client::Client::from_env().await?;
//! let token = client.token(["scim:read"]).await?;
//! println!("expires at {:?}", token.expires_at());
//! let _header = token.bearer_header(); // "Bearer …", to put in an Authorization header
//! let _raw = token.access_token().expose_secret();
//! # Ok(()) }
//! ```
//!
//! # Security
//! Tokens are held in [`SecretString`]s: their `Debug` output is redacted and their memory is zeroized on
//! drop. Do not log [`Token::access_token`]'s exposed value.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use credbroker_proto::TokenBrokerClient;
use credbroker_proto::pb;
use hyper_util::rt::TokioIo;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

#[cfg(feature = "oneshot")]
pub mod oneshot;

pub use secrecy;

/// The admin API's messages (`credbroker.admin.v1`), as [`Client::status`] and [`Client::explain`] return them.
pub use credbroker_proto::admin;

/// The system socket.
pub const DEFAULT_SOCKET: &str = "/run/credbroker/credbroker.sock";
/// Timeout applied to every call unless changed with [`Client::with_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The daemon's socket could not be reached: is `credbrokerd` running, and is this the right path?
    #[error("cannot reach credbrokerd at {}: {source} (is the service running? try: systemctl status credbroker.socket)", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The socket exists but this process may not connect to it: its mode and group keep this user out.
    #[error(
        "permission denied on credbrokerd's socket {} (mode {mode:04o}, group {group}): ask an administrator \
         to add this user to that group, or to widen daemon.socket_mode",
        socket.display()
    )]
    SocketPermission {
        /// The socket path.
        socket: PathBuf,
        /// The socket's permission bits.
        mode: u32,
        /// The socket's group: its name where `/etc/group` has one, and its id.
        group: String,
    },
    /// The request was malformed: no or invalid scopes, an unknown client, an ambiguous client.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// No policy lets this process have what it asked for. The message names the refused scope and how the
    /// daemon saw this process.
    #[error("denied: {0}")]
    PermissionDenied(String),
    /// The daemon could not establish this process's identity.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The IdP refused the broker's own credentials or the scope, or the broker's credential cannot be used
    /// (an expired client assertion): an operator must act.
    #[error("operator action needed: {0}")]
    FailedPrecondition(String),
    /// The daemon or the IdP is unavailable; worth retrying.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// This caller asked for new tokens too fast; retry later.
    #[error("rate limited: {0}")]
    ResourceExhausted(String),
    /// The call did not complete within its timeout.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Any other status.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC code.
        code: tonic::Code,
        /// The message.
        message: String,
    },
}

impl Error {
    /// Whether the caller was refused: by policy, by the socket's permissions, or because it could not be
    /// identified.
    pub fn is_denied(&self) -> bool {
        matches!(
            self,
            Self::PermissionDenied(_) | Self::Unauthenticated(_) | Self::SocketPermission { .. }
        )
    }

    /// Whether trying again later may succeed: the daemon or the IdP is unavailable, or rate limited.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. }
                | Self::Unavailable(_)
                | Self::ResourceExhausted(_)
                | Self::Timeout(_)
        )
    }

    /// Whether an operator must fix the broker's configuration or its IdP registration.
    pub fn needs_operator(&self) -> bool {
        matches!(self, Self::FailedPrecondition(_))
    }

    /// Whether the request itself was malformed.
    pub fn is_invalid_request(&self) -> bool {
        matches!(self, Self::InvalidArgument(_))
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        let message = s.message().to_owned();
        match s.code() {
            tonic::Code::InvalidArgument => Self::InvalidArgument(message),
            tonic::Code::PermissionDenied => Self::PermissionDenied(message),
            tonic::Code::Unauthenticated => Self::Unauthenticated(message),
            tonic::Code::FailedPrecondition => Self::FailedPrecondition(message),
            tonic::Code::Unavailable => Self::Unavailable(message),
            tonic::Code::ResourceExhausted => Self::ResourceExhausted(message),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Self::Timeout(message),
            code => Self::Other { code, message },
        }
    }
}

/// What a reload changed ([`Client::reload`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reloaded {
    /// The daemon's status line for the new config: `serving N clients, M policies`.
    pub summary: String,
    /// Clients whose endpoint, client id or parameters changed, or that are gone.
    pub clients_changed: Vec<String>,
    /// Cached entries dropped for them.
    pub tokens_dropped: u64,
    /// Settings that take effect at the next restart.
    pub need_restart: Vec<String>,
}

/// An access token from the daemon.
#[derive(Clone)]
pub struct Token {
    access_token: SecretString,
    token_type: String,
    expires_at: SystemTime,
    scopes: Vec<String>,
    client: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .field("client", &self.client)
            .finish()
    }
}

impl Token {
    /// The access token.
    pub fn access_token(&self) -> &SecretString {
        &self.access_token
    }

    /// `token_type` as the IdP issued it, e.g. `Bearer`.
    pub fn token_type(&self) -> &str {
        &self.token_type
    }

    /// When the token expires.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Time left until expiry (zero once expired).
    pub fn expires_in(&self) -> Duration {
        self.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// The scopes granted.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The client (IdP registration) it came from.
    pub fn client(&self) -> &str {
        &self.client
    }

    /// The value of an `Authorization` header: `Bearer <token>` (the scheme spelled as RFC 6750 does,
    /// whatever case the IdP used).
    pub fn bearer_header(&self) -> SecretString {
        let scheme = if self.token_type.eq_ignore_ascii_case("bearer") {
            "Bearer"
        } else {
            self.token_type.as_str()
        };
        SecretString::from(format!("{scheme} {}", self.access_token.expose_secret()))
    }
}

/// A GetToken request: scopes, and optionally a client and a least remaining lifetime.
#[derive(Clone, Debug, Default)]
pub struct TokenRequest {
    scopes: Vec<String>,
    client: Option<String>,
    min_ttl: Option<Duration>,
}

impl TokenRequest {
    /// A request for `scopes` (order and duplicates do not matter).
    pub fn new<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            scopes: scopes.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// From this client (needed when this caller's policies name several).
    pub fn client(mut self, client: impl Into<String>) -> Self {
        self.client = Some(client.into());
        self
    }

    /// The token must stay valid at least this long (whole seconds; default: the daemon's).
    pub fn min_ttl(mut self, min_ttl: Duration) -> Self {
        self.min_ttl = Some(min_ttl);
        self
    }

    /// `min_ttl` as the wire has it: whole seconds, rounded up (a caller asking for 1.5 s needs 2); 0 for the
    /// daemon's default.
    pub(crate) fn min_ttl_seconds(&self) -> u32 {
        self.min_ttl.map_or(0, |d| {
            u32::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(u32::MAX)
        })
    }
}

/// The two headers of one request to an API with a DPoP-bound token ([`Client::proof`]).
#[derive(Clone)]
pub struct Proof {
    authorization: SecretString,
    dpop: SecretString,
    expires_at: SystemTime,
    scopes: Vec<String>,
    client: String,
}

impl fmt::Debug for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proof")
            .field("authorization", &"[redacted]")
            .field("dpop", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .field("client", &self.client)
            .finish()
    }
}

impl Proof {
    /// The `Authorization` header's value: `DPoP <token>`.
    ///
    /// # Security
    /// The token it carries is bound to the daemon's key: worthless without a fresh proof, but still a
    /// credential while it is used with one.
    pub fn authorization(&self) -> &SecretString {
        &self.authorization
    }

    /// The `DPoP` header's value: a proof for this one request (method and URL), signed by the daemon.
    pub fn dpop(&self) -> &SecretString {
        &self.dpop
    }

    /// When the token expires.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// The scopes granted.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The client (IdP registration) the token came from.
    pub fn client(&self) -> &str {
        &self.client
    }
}

/// A Proof request: the token's request, and the request to the API the proof is for.
#[derive(Clone, Debug)]
pub struct ProofRequest {
    token: TokenRequest,
    method: String,
    url: String,
    nonce: Option<String>,
}

impl ProofRequest {
    /// A proof for a `method` request to `url`, with a token of `token`'s scopes and client.
    pub fn new(token: TokenRequest, method: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            token,
            method: method.into(),
            url: url.into(),
            nonce: None,
        }
    }

    /// With the nonce the API gave (`DPoP-Nonce`).
    pub fn nonce(mut self, nonce: impl Into<String>) -> Self {
        self.nonce = Some(nonce.into());
        self
    }
}

/// How the daemon sees this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WhoAmI {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Process id.
    pub pid: i32,
    /// User name (empty if none).
    pub user: String,
    /// Group names, primary first.
    pub groups: Vec<String>,
    /// Executable path (empty if unreadable).
    pub exe: String,
    /// Systemd unit (empty if none).
    pub unit: String,
    /// For each client, the scope patterns this process may request.
    pub grants: Vec<(String, Vec<String>)>,
}

/// A connection to `credbrokerd`. Cheap to clone; reconnects by itself after the daemon restarts.
#[derive(Clone, Debug)]
pub struct Client {
    inner: TokenBrokerClient<Channel>,
    /// The same connection, for the admin API.
    channel: Channel,
    socket: PathBuf,
    timeout: Duration,
}

/// The socket to use: `CREDBROKER_SOCKET`, else the system socket if it exists, else
/// `$XDG_RUNTIME_DIR/credbroker/credbroker.sock` if that exists, else the system socket.
pub fn discover_socket() -> PathBuf {
    socket_from(
        std::env::var_os("CREDBROKER_SOCKET").map(PathBuf::from),
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        |p| p.exists(),
    )
}

fn socket_from(
    explicit: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    exists: impl Fn(&Path) -> bool,
) -> PathBuf {
    if let Some(p) = explicit.filter(|p| !p.as_os_str().is_empty()) {
        return p;
    }
    let system = PathBuf::from(DEFAULT_SOCKET);
    if exists(&system) {
        return system;
    }
    match runtime_dir.map(|d| d.join("credbroker/credbroker.sock")) {
        Some(user) if exists(&user) => user,
        _ => system,
    }
}

impl Client {
    /// Connects to the daemon's socket at `socket`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), credbroker_client::Error> {
    /// let client = credbroker_client::Client::connect("/run/credbroker/credbroker.sock").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Connect`] when the socket cannot be reached.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, Error> {
        let socket = socket.as_ref().to_owned();
        // The URI is required by the HTTP/2 layer and ignored by the connector.
        let endpoint = Endpoint::from_static("http://credbroker.invalid");
        let open = || {
            let path = socket.clone();
            endpoint.connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
        };
        // A connection the daemon accepted but closed before serving it (an instance stopping while systemd
        // keeps the socket for the next) is tried once more, as a broken call is.
        let channel = match open().await {
            Ok(channel) => channel,
            Err(e) => match connect_error(&socket, &e) {
                Error::Connect { .. } if closed_by_peer(&e) => {
                    open().await.map_err(|e| connect_error(&socket, &e))?
                }
                other => return Err(other),
            },
        };
        Ok(Self {
            inner: TokenBrokerClient::new(channel.clone()),
            channel,
            socket,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Connects to the socket [`discover_socket`] finds.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), credbroker_client::Error> {
    /// let client = credbroker_client::Client::from_env().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Connect`] when the socket cannot be reached.
    pub async fn from_env() -> Result<Self, Error> {
        Self::connect(discover_socket()).await
    }

    /// Sets the timeout of every call (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A token with exactly `scopes`, from the only client this caller's policies name.
    ///
    /// ```no_run
    /// # async fn demo(mut client: credbroker_client::Client) -> Result<(), credbroker_client::Error> {
    /// let token = client.token(["scim:read", "scim:write"]).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`Error`]: [`Error::is_denied`] when policy refuses, [`Error::is_retryable`] when the daemon or IdP
    /// is unavailable, [`Error::needs_operator`] when the IdP refused the broker's configuration.
    pub async fn token<I, S>(&mut self, scopes: I) -> Result<Token, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.get_token(TokenRequest::new(scopes)).await
    }

    /// A token for a full [`TokenRequest`].
    ///
    /// ```no_run
    /// # async fn demo(mut client: credbroker_client::Client) -> Result<(), credbroker_client::Error> {
    /// use credbroker_client::TokenRequest;
    /// use std::time::Duration;
    ///
    /// let request = TokenRequest::new(["scim:read"]).client("asgardeo").min_ttl(Duration::from_secs(300));
    /// let token = client.get_token(request).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Client::token`].
    pub async fn get_token(&mut self, request: TokenRequest) -> Result<Token, Error> {
        let min_ttl = request.min_ttl_seconds();
        let req = tonic::Request::new(pb::GetTokenRequest {
            scopes: request.scopes,
            client: request.client.unwrap_or_default(),
            min_ttl_seconds: min_ttl,
        });
        let resp = self
            .call(req, |mut c, r| async move { c.get_token(r).await })
            .await?
            .into_inner();
        let expires_at = resp
            .expires_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(Token {
            access_token: SecretString::from(resp.access_token),
            token_type: resp.token_type,
            expires_at,
            scopes: resp.scopes,
            client: resp.client,
        })
    }

    /// The headers of one request to an API with a DPoP-bound token (RFC 9449): the daemon holds the key,
    /// signs the proof, and gives it only for URLs within this caller's policy's `dpop_targets`.
    ///
    /// ```no_run
    /// # async fn demo(mut client: credbroker_client::Client) -> Result<(), credbroker_client::Error> {
    /// use credbroker_client::{ProofRequest, TokenRequest};
    ///
    /// let proof = client
    ///     .proof(ProofRequest::new(TokenRequest::new(["scim:read"]), "GET", "https://api.example.com/v1/users"))
    ///     .await?;
    /// // Authorization: proof.authorization(), DPoP: proof.dpop()
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Client::token`]; [`Error::is_denied`] too when the URL is not within the policy's targets, and
    /// [`Error::is_invalid_request`] when the client does not bind its tokens or the method or URL is not
    /// usable.
    pub async fn proof(&mut self, request: ProofRequest) -> Result<Proof, Error> {
        let min_ttl = request.token.min_ttl_seconds();
        let req = tonic::Request::new(pb::ProofRequest {
            scopes: request.token.scopes,
            client: request.token.client.unwrap_or_default(),
            min_ttl_seconds: min_ttl,
            method: request.method,
            url: request.url,
            nonce: request.nonce.unwrap_or_default(),
        });
        let resp = self
            .call(req, |mut c, r| async move { c.proof(r).await })
            .await?
            .into_inner();
        Ok(Proof {
            authorization: SecretString::from(resp.authorization),
            dpop: SecretString::from(resp.dpop),
            expires_at: resp
                .expires_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .unwrap_or(SystemTime::UNIX_EPOCH),
            scopes: resp.scopes,
            client: resp.client,
        })
    }

    /// How the daemon sees this process, and what it may request.
    ///
    /// ```no_run
    /// # async fn demo(mut client: credbroker_client::Client) -> Result<(), credbroker_client::Error> {
    /// let me = client.whoami().await?;
    /// println!("uid {} exe {}", me.uid, me.exe);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] when the daemon cannot identify this process; [`Error::is_retryable`] ones
    /// when it is unreachable.
    pub async fn whoami(&mut self) -> Result<WhoAmI, Error> {
        let req = tonic::Request::new(pb::WhoAmIRequest {});
        let resp = self
            .call(req, |mut c, r| async move { c.who_am_i(r).await })
            .await?
            .into_inner();
        let c = resp.caller.unwrap_or_default();
        Ok(WhoAmI {
            uid: c.uid,
            gid: c.gid,
            pid: c.pid,
            user: c.user,
            groups: c.groups,
            exe: c.exe,
            unit: c.unit,
            grants: resp
                .grants
                .into_iter()
                .map(|g| (g.client, g.scopes))
                .collect(),
        })
    }

    /// Reloads the daemon's config, as SIGHUP does, and says what changed. Admins only (`daemon.admins`).
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] for a caller that is not an admin; [`Error::InvalidArgument`] with every
    /// config error when the new config is refused (the old one keeps serving).
    pub async fn reload(&mut self) -> Result<Reloaded, Error> {
        let mut admin =
            credbroker_proto::admin::admin_client::AdminClient::new(self.channel.clone());
        let r = self
            .admin_call(admin.reload(credbroker_proto::admin::ReloadRequest {}))
            .await?;
        Ok(Reloaded {
            summary: r.summary,
            clients_changed: r.clients_changed,
            tokens_dropped: r.tokens_dropped,
            need_restart: r.need_restart,
        })
    }

    /// Drops the daemon's cached entries of `client` (all clients if empty) whose scope set holds all of
    /// `scopes` (any set if none); returns how many went. Admins only.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] for a caller that is not an admin.
    pub async fn flush(&mut self, client: &str, scopes: &[String]) -> Result<u64, Error> {
        let mut admin =
            credbroker_proto::admin::admin_client::AdminClient::new(self.channel.clone());
        let request = credbroker_proto::admin::FlushRequest {
            client: client.to_owned(),
            scopes: scopes.to_vec(),
        };
        Ok(self.admin_call(admin.flush(request)).await?.dropped)
    }

    /// What the daemon is doing ([`admin::StatusResponse`]): its pages gathered into one, the cache entries
    /// of every page in `entries`. Never a token or a secret. Admins only.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] for a caller that is not an admin.
    pub async fn status(&mut self) -> Result<admin::StatusResponse, Error> {
        let mut client = admin::admin_client::AdminClient::new(self.channel.clone())
            .max_decoding_message_size(8 << 20);
        let gather = async {
            let mut stream = client.status(admin::StatusRequest {}).await?.into_inner();
            let mut status = stream.message().await?.unwrap_or_default();
            while let Some(page) = stream.message().await? {
                status.entries.extend(page.entries);
            }
            Ok::<_, tonic::Status>(status)
        };
        let result = tokio::time::timeout(self.timeout, gather).await;
        self.outcome(result)
    }

    /// How the daemon's policies judge `request`'s caller asking for its client and scopes. Admins only.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] for a caller that is not an admin; [`Error::InvalidArgument`] for an
    /// unknown user, group, client or process, or an invalid scope.
    pub async fn explain(
        &mut self,
        request: admin::ExplainRequest,
    ) -> Result<admin::ExplainResponse, Error> {
        let mut client = admin::admin_client::AdminClient::new(self.channel.clone());
        self.admin_call(client.explain(request)).await
    }

    /// An admin call with the client's timeout.
    async fn admin_call<Resp>(
        &self,
        call: impl Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    ) -> Result<Resp, Error> {
        let result = tokio::time::timeout(self.timeout, call).await;
        self.outcome(result).map(tonic::Response::into_inner)
    }

    /// A call's result as the client reports it: a broken connection is [`Error::Connect`], no answer in
    /// time [`Error::Timeout`], any other status its [`Error`].
    fn outcome<Resp>(
        &self,
        result: Result<Result<Resp, tonic::Status>, tokio::time::error::Elapsed>,
    ) -> Result<Resp, Error> {
        match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(status)) if is_transport(&status) => Err(Error::Connect {
                socket: self.socket.clone(),
                source: status.message().to_owned().into(),
            }),
            Ok(Err(status)) => Err(status.into()),
            Err(_) => Err(Error::Timeout(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// Sends one call with the client's timeout. A call that fails because the connection broke (the daemon
    /// restarted) is sent once more on a fresh connection: both RPCs are idempotent.
    async fn call<Req, Resp, F, Fut>(
        &self,
        request: tonic::Request<Req>,
        send: F,
    ) -> Result<tonic::Response<Resp>, Error>
    where
        Req: Clone,
        F: Fn(TokenBrokerClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let message = request.into_inner();
        let attempt = |message: Req| {
            let mut req = tonic::Request::new(message);
            req.set_timeout(self.timeout);
            tokio::time::timeout(
                self.timeout + Duration::from_secs(1),
                send(self.inner.clone(), req),
            )
        };
        let mut result = attempt(message.clone()).await;
        if matches!(&result, Ok(Err(status)) if is_transport(status)) {
            result = attempt(message).await;
        }
        self.outcome(result)
    }

    /// A [`TokenSource`] that reuses the token `request` gets until it nears its min TTL.
    ///
    /// ```no_run
    /// # async fn demo(client: credbroker_client::Client) -> Result<(), credbroker_client::Error> {
    /// use credbroker_client::TokenRequest;
    ///
    /// let source = client.token_source(TokenRequest::new(["scim:read"]));
    /// for _ in 0..1000 {
    ///     let token = source.token().await?; // asks the daemon only when the token nears expiry
    /// #   let _ = token;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn token_source(&self, request: TokenRequest) -> TokenSource {
        TokenSource {
            client: self.clone(),
            request,
            current: tokio::sync::Mutex::new(None),
        }
    }
}

/// Whether a status means the connection to the daemon failed, rather than the daemon answering: tonic
/// attaches the transport error as the status's source only for failures on this side.
fn is_transport(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown
    ) && std::error::Error::source(status).is_some()
}

/// Opt-in in-process reuse: keeps the last token and asks the daemon again only when it nears its min TTL
/// (the request's, else 60 s capped at half the token's lifetime), so hot loops do not pay an RPC per call.
///
/// # Security
/// The token stays in this process's memory (in a [`SecretString`]) while it is reused.
pub struct TokenSource {
    client: Client,
    request: TokenRequest,
    current: tokio::sync::Mutex<Option<(Token, SystemTime)>>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

/// Default least time left on a reused token when the request sets no min TTL.
pub const DEFAULT_REUSE_MIN_TTL: Duration = Duration::from_secs(60);

/// Whether a token received at `received` that expires at `expires` may still be reused at `now`.
fn reusable(
    received: SystemTime,
    expires: SystemTime,
    min_ttl: Option<Duration>,
    now: SystemTime,
) -> bool {
    let lifetime = expires.duration_since(received).unwrap_or_default();
    let needed = min_ttl.unwrap_or_else(|| DEFAULT_REUSE_MIN_TTL.min(lifetime / 2));
    expires.duration_since(now).is_ok_and(|left| left > needed)
}

impl TokenSource {
    /// The current token, fetched anew from the daemon when it nears its min TTL.
    ///
    /// # Errors
    /// As [`Client::get_token`], when a new token is needed and cannot be had.
    pub async fn token(&self) -> Result<Token, Error> {
        let mut current = self.current.lock().await;
        if let Some((token, received)) = current.as_ref()
            && reusable(
                *received,
                token.expires_at,
                self.request.min_ttl,
                SystemTime::now(),
            )
        {
            return Ok(token.clone());
        }
        let received = SystemTime::now();
        let token = self.client.clone().get_token(self.request.clone()).await?;
        *current = Some((token.clone(), received));
        Ok(token)
    }
}

/// [`Error::SocketPermission`] when the kernel refused the connection for the socket's permissions, else
/// [`Error::Connect`].
fn connect_error(socket: &Path, e: &(dyn std::error::Error + 'static)) -> Error {
    use std::os::unix::fs::MetadataExt;
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let denied = cause
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied);
    if denied && let Ok(meta) = std::fs::metadata(socket) {
        return Error::SocketPermission {
            socket: socket.to_owned(),
            mode: meta.mode() & 0o7777,
            group: group_name(meta.gid()),
        };
    }
    Error::Connect {
        socket: socket.to_owned(),
        source: cause.to_string().into(),
    }
}

/// Whether a connection failed because the other end closed it (broken pipe, reset, early EOF) rather than
/// because nobody listens or the socket is missing.
fn closed_by_peer(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind as K;
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
        matches!(
            io.kind(),
            K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof
        )
    })
}

/// `name (gid)` from `/etc/group`, or the bare gid.
fn group_name(gid: u32) -> String {
    let name = std::fs::read_to_string("/etc/group")
        .ok()
        .and_then(|groups| {
            groups.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id = fields.nth(1)?;
                (id.parse() == Ok(gid)).then(|| name.to_owned())
            })
        });
    match name {
        Some(name) => format!("{name} ({gid})"),
        None => gid.to_string(),
    }
}

/// A blocking facade for programs without an async runtime (feature `blocking`).
///
/// ```no_run
/// # fn demo() -> Result<(), credbroker_client::Error> {
/// let mut client = credbroker_client::blocking::Client::from_env()?;
/// let token = client.token(["scim:read"])?;
/// # Ok(()) }
/// ```
#[cfg(feature = "blocking")]
pub mod blocking {
    use std::path::Path;

    use super::{Error, Token, TokenRequest, WhoAmI};

    /// A blocking client: each call runs on a private single-threaded runtime. Do not call it from async code.
    #[derive(Debug)]
    pub struct Client {
        runtime: tokio::runtime::Runtime,
        inner: super::Client,
    }

    fn runtime() -> Result<tokio::runtime::Runtime, Error> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Other {
                code: tonic::Code::Internal,
                message: format!("cannot start a runtime: {e}"),
            })
    }

    impl Client {
        /// Connects to the daemon's socket at `socket`.
        ///
        /// # Errors
        /// [`Error::Connect`] when the socket cannot be reached.
        pub fn connect(socket: impl AsRef<Path>) -> Result<Self, Error> {
            let runtime = runtime()?;
            let inner = runtime.block_on(super::Client::connect(socket))?;
            Ok(Self { runtime, inner })
        }

        /// Connects to the socket [`super::discover_socket`] finds.
        ///
        /// # Errors
        /// [`Error::Connect`] when the socket cannot be reached.
        pub fn from_env() -> Result<Self, Error> {
            Self::connect(super::discover_socket())
        }

        /// As [`super::Client::token`].
        ///
        /// # Errors
        /// As [`super::Client::token`].
        pub fn token<I, S>(&mut self, scopes: I) -> Result<Token, Error>
        where
            I: IntoIterator<Item = S>,
            S: Into<String>,
        {
            self.get_token(TokenRequest::new(scopes))
        }

        /// As [`super::Client::get_token`].
        ///
        /// # Errors
        /// As [`super::Client::get_token`].
        pub fn get_token(&mut self, request: TokenRequest) -> Result<Token, Error> {
            self.runtime.block_on(self.inner.get_token(request))
        }

        /// As [`super::Client::whoami`].
        ///
        /// # Errors
        /// As [`super::Client::whoami`].
        pub fn whoami(&mut self) -> Result<WhoAmI, Error> {
            self.runtime.block_on(self.inner.whoami())
        }
    }
}

/// Puts a token on a `reqwest` request (feature `reqwest`).
///
/// ```no_run
/// # async fn demo(token: credbroker_client::Token) -> Result<(), reqwest::Error> {
/// use credbroker_client::RequestBuilderExt;
///
/// let response = reqwest::Client::new()
///     .get("https://api.example.com/scim2/Users")
///     .credbroker_auth(&token)
///     .send()
///     .await?;
/// # Ok(()) }
/// ```
#[cfg(feature = "reqwest")]
pub trait RequestBuilderExt {
    /// Sets `Authorization: Bearer <token>`, marked sensitive (not logged by reqwest or hyper).
    fn credbroker_auth(self, token: &Token) -> Self;
}

#[cfg(feature = "reqwest")]
impl RequestBuilderExt for reqwest::RequestBuilder {
    fn credbroker_auth(self, token: &Token) -> Self {
        match reqwest::header::HeaderValue::from_str(token.bearer_header().expose_secret()) {
            Ok(mut value) => {
                value.set_sensitive(true);
                self.header(reqwest::header::AUTHORIZATION, value)
            }
            // The daemon only hands out printable ASCII tokens; anything else cannot be a header.
            Err(_) => self,
        }
    }
}

/// Sends requests to an API with DPoP-bound tokens (feature `reqwest`): each request gets its own proof from
/// the daemon, and a resource server's nonce challenge (`401` with `WWW-Authenticate: DPoP
/// error="use_dpop_nonce"` and a `DPoP-Nonce`) is answered once with a new proof carrying the nonce, which is
/// then remembered for that server's later requests.
///
/// ```no_run
/// # async fn demo(client: credbroker_client::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use credbroker_client::{DpopSender, TokenRequest};
///
/// let api = DpopSender::new(client, reqwest::Client::new(), TokenRequest::new(["scim:read"]));
/// let response = api.send(reqwest::Method::GET, "https://api.example.com/v1/users", None).await?;
/// # Ok(()) }
/// ```
#[cfg(feature = "reqwest")]
pub struct DpopSender {
    client: Client,
    http: reqwest::Client,
    token: TokenRequest,
    /// The latest nonce each origin gave.
    nonces: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// Why a [`DpopSender`] request failed.
#[cfg(feature = "reqwest")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DpopError {
    /// The daemon gave no proof.
    #[error(transparent)]
    Daemon(#[from] Error),
    /// The request to the API failed.
    #[error("the request to the API failed: {0}")]
    Http(#[from] reqwest::Error),
    /// A header the daemon gave cannot be sent (never expected: they are printable ASCII).
    #[error("the daemon's header cannot be sent")]
    Header,
}

#[cfg(feature = "reqwest")]
impl DpopSender {
    /// Requests through `http`, with tokens of `token`'s scopes and client and proofs from `client`.
    pub fn new(client: Client, http: reqwest::Client, token: TokenRequest) -> Self {
        Self {
            client,
            http,
            token,
            nonces: std::sync::Mutex::default(),
        }
    }

    /// Sends a `method` request to `url`, with `body` if given, its two DPoP headers made for it; answers a
    /// nonce challenge once.
    ///
    /// # Errors
    /// [`DpopError`].
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, DpopError> {
        let origin = reqwest::Url::parse(url)
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_default();
        let mut nonce = self.nonce(&origin);
        let mut challenged = false;
        loop {
            let mut request = ProofRequest::new(self.token.clone(), method.as_str(), url);
            if let Some(n) = &nonce {
                request = request.nonce(n.clone());
            }
            // A clone per request (cheap: one channel), so that concurrent sends do not wait on each other.
            let proof = self.client.clone().proof(request).await?;
            let header = |v: &SecretString| {
                reqwest::header::HeaderValue::from_str(v.expose_secret())
                    .map(|mut h| {
                        h.set_sensitive(true);
                        h
                    })
                    .map_err(|_| DpopError::Header)
            };
            let mut builder = self
                .http
                .request(method.clone(), url)
                .header(
                    reqwest::header::AUTHORIZATION,
                    header(proof.authorization())?,
                )
                .header("DPoP", header(proof.dpop())?);
            if let Some(b) = &body {
                builder = builder.body(b.clone());
            }
            let response = builder.send().await?;
            let given = response
                .headers()
                .get("dpop-nonce")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(n) = &given {
                self.nonces
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(origin.clone(), n.clone());
            }
            let asks_nonce = response.status() == reqwest::StatusCode::UNAUTHORIZED
                && response
                    .headers()
                    .get_all(reqwest::header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| {
                        v.trim_start().to_ascii_lowercase().starts_with("dpop")
                            && v.contains("use_dpop_nonce")
                    });
            match given {
                Some(n) if asks_nonce && !challenged => {
                    challenged = true;
                    nonce = Some(n);
                }
                _ => return Ok(response),
            }
        }
    }

    fn nonce(&self, origin: &str) -> Option<String> {
        self.nonces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(origin)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_until_the_min_ttl_nears() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let exp = t0 + Duration::from_secs(3600);
        assert!(reusable(t0, exp, None, t0 + Duration::from_secs(3500)));
        assert!(!reusable(t0, exp, None, t0 + Duration::from_secs(3541)));
        assert!(!reusable(
            t0,
            exp,
            Some(Duration::from_secs(600)),
            t0 + Duration::from_secs(3001)
        ));
        // A short-lived token is reused for its first half at most.
        let short = t0 + Duration::from_secs(30);
        assert!(reusable(t0, short, None, t0 + Duration::from_secs(14)));
        assert!(!reusable(t0, short, None, t0 + Duration::from_secs(16)));
        assert!(!reusable(t0, exp, None, exp + Duration::from_secs(1)));
    }

    #[test]
    fn socket_discovery_order() {
        let none = |_: &Path| false;
        assert_eq!(
            socket_from(Some("/x.sock".into()), None, none),
            PathBuf::from("/x.sock")
        );
        assert_eq!(
            socket_from(None, Some("/run/user/1".into()), none),
            PathBuf::from(DEFAULT_SOCKET)
        );
        let user_only = |p: &Path| p.starts_with("/run/user");
        assert_eq!(
            socket_from(None, Some("/run/user/1".into()), user_only),
            PathBuf::from("/run/user/1/credbroker/credbroker.sock")
        );
        assert_eq!(
            socket_from(Some("".into()), None, none),
            PathBuf::from(DEFAULT_SOCKET)
        );
    }

    #[test]
    fn token_debug_is_redacted_and_header_is_canonical() {
        let t = Token {
            access_token: SecretString::from("tok-123".to_owned()),
            token_type: "bearer".into(),
            expires_at: SystemTime::now(),
            scopes: vec!["a".into()],
            client: "idp".into(),
        };
        assert!(!format!("{t:?}").contains("tok-123"));
        assert_eq!(t.bearer_header().expose_secret(), "Bearer tok-123");
    }

    #[test]
    fn classifiers() {
        assert!(Error::from(tonic::Status::permission_denied("x")).is_denied());
        assert!(Error::from(tonic::Status::unavailable("x")).is_retryable());
        assert!(Error::from(tonic::Status::resource_exhausted("x")).is_retryable());
        assert!(Error::from(tonic::Status::failed_precondition("x")).needs_operator());
        assert!(Error::from(tonic::Status::invalid_argument("x")).is_invalid_request());
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;

    #[test]
    fn only_a_connection_the_daemon_closed_is_tried_again() {
        use std::io::{Error as IoError, ErrorKind as K};
        for kind in [K::BrokenPipe, K::ConnectionReset, K::UnexpectedEof] {
            assert!(closed_by_peer(&IoError::from(kind)), "{kind:?}");
        }
        for kind in [K::NotFound, K::ConnectionRefused, K::PermissionDenied] {
            assert!(!closed_by_peer(&IoError::from(kind)), "{kind:?}");
        }
    }
}
