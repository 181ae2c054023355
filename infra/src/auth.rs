//! Who is calling, and what they may do.
//!
//! - [`Keys`]: the operator token and the key access tokens are signed with, from
//!   files or the environment, or created in the data directory (mode 0600) on first
//!   start. Access tokens are JWTs (HS256, pinned; `iss`, `aud`, `exp` checked by
//!   `jsonwebtoken`), at most [`ACCESS_TOKEN_TTL`] long.
//! - [`access`]: the one table of which routes are open, which need a customer (or
//!   an operator) and which an operator. A route it does not name is operator-only.
//! - [`authenticate`]: the middleware that applies it, checks the login behind a
//!   customer's token is still live ([`Sessions`]), limits each client's rate
//!   ([`RateLimit`]) and hands the handlers a [`Principal`].

use crate::http::ApiError;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// The issuer of every access token.
pub const ISSUER: &str = "orderline";
/// The audience of every access token.
pub const AUDIENCE: &str = "orderline-api";
/// How long an access token is good for.
pub const ACCESS_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// The one algorithm access tokens are signed and checked with.
const ALGORITHM: Algorithm = Algorithm::HS256;
/// The shortest operator token or signing key taken from a file or the environment.
const MIN_SECRET_BYTES: usize = 32;

/// Why the keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what}: cannot read or create {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} must be at least {MIN_SECRET_BYTES} bytes long ({from})")]
    TooShort { what: &'static str, from: String },
    #[error("no randomness: {0}")]
    Random(String),
}

/// Where a secret comes from: its value (an environment variable), a file, or (when
/// neither is given) `<data-dir>/<name>`, created on first start.
#[derive(Debug, Clone, Default)]
pub struct SecretSource {
    pub value: Option<String>,
    pub file: Option<PathBuf>,
}

/// How the API is secured (`--auth`, the key sources, `--rate-limit`).
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Off: the token-free v1 contract (never the default; a warning at start-up).
    pub enabled: bool,
    pub operator_token: SecretSource,
    pub signing_key: SecretSource,
    /// Requests per second and burst per client; `None` for no limit.
    pub rate_limit: Option<RateLimit>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            enabled: true,
            operator_token: SecretSource::default(),
            signing_key: SecretSource::default(),
            rate_limit: Some(RateLimit::default()),
        }
    }
}

impl AuthSettings {
    /// The token-free v1 contract, with no rate limit.
    pub fn off() -> AuthSettings {
        AuthSettings {
            enabled: false,
            rate_limit: None,
            ..AuthSettings::default()
        }
    }
}

/// A token bucket per client: `per_second` requests a second, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 50,
            burst: 100,
        }
    }
}

impl std::str::FromStr for RateLimit {
    type Err = String;

    /// `RATE` or `RATE/BURST`, both at least 1 (`50/100`).
    fn from_str(text: &str) -> Result<Self, String> {
        let wrong = || format!("{text:?}: expected RATE or RATE/BURST, each at least 1 (50/100)");
        let (rate, burst) = match text.split_once('/') {
            Some((rate, burst)) => (rate, Some(burst)),
            None => (text, None),
        };
        let per_second: u32 = rate.trim().parse().map_err(|_| wrong())?;
        let burst: u32 = match burst {
            Some(burst) => burst.trim().parse().map_err(|_| wrong())?,
            None => per_second.saturating_mul(2),
        };
        if per_second == 0 || burst == 0 {
            return Err(wrong());
        }
        Ok(RateLimit { per_second, burst })
    }
}

/// What an access token says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The customer id.
    pub sub: String,
    /// The login (session) the token belongs to.
    pub sid: Uuid,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
}

/// The operator token and the access tokens' key; cheap to clone.
#[derive(Clone)]
pub struct Keys(Arc<KeysInner>);

struct KeysInner {
    operator: [u8; 32],
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys([redacted])")
    }
}

impl Keys {
    /// The keys of `settings`, creating what is missing under `data_dir`.
    pub fn load(settings: &AuthSettings, data_dir: &Path) -> Result<Keys, KeyError> {
        let operator = secret(
            "the operator token",
            &settings.operator_token,
            &data_dir.join("operator-token"),
        )?;
        let signing = secret(
            "the signing key",
            &settings.signing_key,
            &data_dir.join("signing-key"),
        )?;
        Ok(Keys::from_secrets(&operator, &signing))
    }

    /// Keys that live only in this process (until the configured ones are set).
    pub fn ephemeral() -> Keys {
        // Without the system's randomness, UUIDv4s (the same source) would fail too:
        // fall back to v7s, whose random bits come from the thread's generator.
        let random =
            || random_text().unwrap_or_else(|_| format!("{}{}", Uuid::now_v7(), Uuid::now_v7()));
        Keys::from_secrets(&random(), &random())
    }

    pub fn from_secrets(operator: &str, signing: &str) -> Keys {
        let mut validation = Validation::new(ALGORITHM);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 0;
        Keys(Arc::new(KeysInner {
            operator: Sha256::digest(operator.as_bytes()).into(),
            encoding: EncodingKey::from_secret(signing.as_bytes()),
            decoding: DecodingKey::from_secret(signing.as_bytes()),
            validation,
        }))
    }

    /// An access token for `customer` in login `session`, issued at `now` (seconds
    /// since the epoch).
    pub fn issue(&self, customer: &str, session: Uuid, now: u64) -> Result<String, ApiError> {
        let claims = Claims {
            sub: customer.to_owned(),
            sid: session,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat: now,
            exp: now + ACCESS_TOKEN_TTL.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(ALGORITHM), &claims, &self.0.encoding)
            .map_err(ApiError::internal)
    }

    /// The claims of a good access token; why not otherwise (said to the client).
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        jsonwebtoken::decode::<Claims>(token, &self.0.decoding, &self.0.validation)
            .map(|data| data.claims)
            .map_err(|error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired".into(),
                _ => "the token is not valid".into(),
            })
    }

    /// Whether `token` is the operator token (compared as digests, in constant time).
    pub fn is_operator(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        digest
            .iter()
            .zip(self.0.operator.iter())
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
    }
}

/// 32 random bytes as URL-safe base64 text.
pub fn random_text() -> Result<String, KeyError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The hex SHA-256 digest of a token (how refresh tokens are kept).
pub fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A secret from its value, its file, or the file at `default` (created when missing).
fn secret(what: &'static str, source: &SecretSource, default: &Path) -> Result<String, KeyError> {
    let checked = |text: String, from: String| {
        let text = text.trim().to_owned();
        if text.len() < MIN_SECRET_BYTES {
            return Err(KeyError::TooShort { what, from });
        }
        Ok(text)
    };
    if let Some(value) = &source.value {
        return checked(value.clone(), "from the environment".into());
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| KeyError::Io { what, path, source }
    };
    if let Some(file) = &source.file {
        let text = std::fs::read_to_string(file).map_err(io(file))?;
        return checked(text, file.display().to_string());
    }
    match std::fs::read_to_string(default) {
        Ok(text) => checked(text, default.display().to_string()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let text = random_text()?;
            match create_private(default, &text) {
                Ok(()) => {
                    tracing::info!(path = %default.display(), "{what} was created");
                    Ok(text)
                }
                // Another process created it first: use theirs.
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(default).map_err(io(default))?;
                    checked(text, default.display().to_string())
                }
                Err(error) => Err(io(default)(error)),
            }
        }
        Err(error) => Err(io(default)(error)),
    }
}

/// Write `text` to a new file only its owner can read.
fn create_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Auth is off: the v1 contract, no restriction.
    Anyone,
    /// No credentials, on an open route.
    Anonymous,
    Operator,
    Customer {
        id: String,
        session: Uuid,
    },
}

impl Principal {
    /// The customer, when the caller is one (and may see only its own).
    pub fn customer(&self) -> Option<&str> {
        match self {
            Principal::Customer { id, .. } => Some(id),
            _ => None,
        }
    }

    /// Whether the caller may see or change what belongs to `owner`.
    pub fn may_act_for(&self, owner: &str) -> bool {
        match self {
            Principal::Customer { id, .. } => id == owner,
            Principal::Anonymous => false,
            Principal::Anyone | Principal::Operator => true,
        }
    }

    /// Whose resources a request is about: a customer's own (naming another is 403,
    /// with `refusal` as the detail), or whomever an operator named (`None`: anyone's).
    pub fn whose(&self, named: Option<&str>, refusal: &str) -> Result<Option<String>, ApiError> {
        match (self.customer(), named) {
            (Some(own), None) => Ok(Some(own.to_owned())),
            (Some(own), Some(named)) if named == own => Ok(Some(own.to_owned())),
            (Some(_), Some(_)) => Err(ApiError::forbidden(refusal)),
            (None, named) => Ok(named.map(str::to_owned)),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    /// The principal [`authenticate`] found; a route served without it is a wiring
    /// fault, refused rather than served open.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::internal("a route was served without authentication"))
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without credentials.
    Open,
    /// A customer (for itself) or an operator.
    Customer,
    /// A customer only (its own profile).
    CustomerOnly,
    Operator,
}

/// The routes that are not operator-only, by method and path template.
const ROUTES: &[(&str, &str, Access)] = &[
    ("GET", "/health", Access::Open),
    ("GET", "/metrics", Access::Open),
    ("GET", "/openapi.json", Access::Open),
    ("POST", "/v1/customers", Access::Open),
    ("POST", "/v1/auth/login", Access::Open),
    ("POST", "/v1/auth/refresh", Access::Open),
    ("POST", "/v1/auth/logout", Access::Open),
    ("GET", "/v1/customers/me", Access::CustomerOnly),
    ("PATCH", "/v1/customers/me", Access::CustomerOnly),
    ("POST", "/v1/orders", Access::Customer),
    ("GET", "/v1/orders", Access::Customer),
    ("GET", "/v1/orders/{order_id}", Access::Customer),
    ("POST", "/v1/orders/{order_id}/cancel", Access::Customer),
    ("GET", "/v1/inventory/{sku}", Access::Customer),
    ("GET", "/v1/cart", Access::CustomerOnly),
    ("PUT", "/v1/cart/lines/{sku}", Access::CustomerOnly),
    ("DELETE", "/v1/cart/lines/{sku}", Access::CustomerOnly),
    ("POST", "/v1/cart/checkout", Access::CustomerOnly),
    ("GET", "/v1/notifications", Access::Customer),
    ("GET", "/v1/products", Access::Open),
    ("GET", "/v1/products/{sku}", Access::Open),
];

/// Who may call `method` on the route `path` (its template); operators only unless
/// the table says otherwise.
pub fn access(method: &Method, path: &str) -> Access {
    ROUTES
        .iter()
        .find(|(m, p, _)| *p == path && *m == method.as_str())
        .map_or(Access::Operator, |(_, _, access)| *access)
}

/// Whether the login behind a customer's token is still live (not logged out, not
/// ended for a reused refresh token).
#[async_trait::async_trait]
pub trait Sessions: Send + Sync {
    async fn live(&self, session: Uuid) -> Result<bool, ApiError>;
}

/// What [`authenticate`] needs; cheap to clone.
#[derive(Clone)]
pub struct Gate {
    pub enabled: bool,
    pub keys: Keys,
    /// Where logins can be checked (the process that holds them); `None` leaves a
    /// token good until it expires.
    pub sessions: Option<Arc<dyn Sessions>>,
    pub limiter: Option<Arc<Limiter>>,
}

/// Per-client token buckets.
pub struct Limiter {
    buckets: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Limiter {
        let per_second = NonZeroU32::new(limit.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
        Limiter {
            buckets: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            checks: AtomicU64::new(0),
        }
    }

    /// `Ok` if `client` may make a request now; else how many seconds to wait.
    pub fn check(&self, client: &str) -> Result<(), u64> {
        // Now and then, forget the buckets of clients that are full again.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            self.buckets.retain_recent();
        }
        self.buckets
            .check_key(&client.to_owned())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
            })
    }
}

impl Gate {
    /// The gate of `settings` with `keys`.
    pub fn new(settings: &AuthSettings, keys: Keys) -> Gate {
        Gate {
            enabled: settings.enabled,
            keys,
            sessions: None,
            limiter: settings
                .rate_limit
                .map(|limit| Arc::new(Limiter::new(limit))),
        }
    }

    /// Who presents `authorization` (the header's value, if any).
    async fn principal(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let Some(value) = authorization else {
            return Ok(Principal::Anonymous);
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| ApiError::unauthorized("expected `Authorization: Bearer <token>`"))?;
        if self.keys.is_operator(token) {
            return Ok(Principal::Operator);
        }
        let claims = self.keys.verify(token).map_err(ApiError::unauthorized)?;
        if let Some(sessions) = &self.sessions {
            if !sessions.live(claims.sid).await? {
                return Err(ApiError::unauthorized("the login has ended; log in again"));
            }
        }
        Ok(Principal::Customer {
            id: claims.sub,
            session: claims.sid,
        })
    }
}

/// The middleware: find the principal, apply [`access`] and the rate limit, and put
/// the principal in the request for the handlers.
pub async fn authenticate(
    State(gate): State<Gate>,
    route: MatchedPath,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip().to_string());
    let principal = if gate.enabled {
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or_default());
        let access = access(request.method(), route.as_str());
        let principal = match (access, gate.principal(authorization).await) {
            // Credentials do not matter on an open route.
            (Access::Open, result) => result.unwrap_or(Principal::Anonymous),
            (_, Err(error)) => return error.into_response(),
            (_, Ok(principal)) => principal,
        };
        if let Err(error) = allowed(access, &principal) {
            return error.into_response();
        }
        principal
    } else {
        Principal::Anyone
    };
    if let Some(limiter) = &gate.limiter {
        let client = match &principal {
            Principal::Customer { id, .. } => format!("customer:{id}"),
            Principal::Operator => "operator".to_owned(),
            _ => format!("address:{}", peer.as_deref().unwrap_or("unknown")),
        };
        if let Err(wait) = limiter.check(&client) {
            return ApiError::rate_limited(wait.max(1)).into_response();
        }
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// A router's requests as with auth off (for routers served without [`authenticate`]:
/// the crates' own tests).
pub async fn unchecked(mut request: Request, next: Next) -> Response {
    request.extensions_mut().insert(Principal::Anyone);
    next.run(request).await
}

/// Whether `principal` may call a route of `access`.
fn allowed(access: Access, principal: &Principal) -> Result<(), ApiError> {
    let forbidden = |detail: &str| Err(ApiError::forbidden(detail));
    match (access, principal) {
        (Access::Open, _) | (_, Principal::Anyone) => Ok(()),
        (_, Principal::Anonymous) => Err(ApiError::unauthorized(
            "this route needs `Authorization: Bearer <token>`",
        )),
        (Access::Customer, Principal::Customer { .. } | Principal::Operator) => Ok(()),
        (Access::CustomerOnly, Principal::Customer { .. }) => Ok(()),
        (Access::CustomerOnly, Principal::Operator) => {
            forbidden("this route is a customer's own; operators have no profile")
        }
        (Access::Operator, Principal::Operator) => Ok(()),
        (Access::Operator, Principal::Customer { .. }) => forbidden("this route is for operators"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_with_its_key_only_and_says_who_and_which_login() {
        let keys = Keys::from_secrets(&"o".repeat(32), &"s".repeat(32));
        let session = Uuid::now_v7();
        let now = chrono::Utc::now().timestamp() as u64;
        let token = keys.issue("c-1", session, now).expect("issued");
        let claims = keys.verify(&token).expect("verifies");
        assert_eq!((claims.sub.as_str(), claims.sid), ("c-1", session));
        let other = Keys::from_secrets(&"o".repeat(32), &"t".repeat(32));
        assert!(other.verify(&token).is_err());
        let old = keys.issue("c-1", session, now - 3600).expect("issued");
        assert_eq!(
            keys.verify(&old).map(|_| ()),
            Err("the token has expired".into())
        );
        assert!(keys.is_operator(&"o".repeat(32)));
        assert!(!keys.is_operator(&"o".repeat(31)));
    }

    #[test]
    fn routes_not_in_the_table_are_for_operators() {
        assert_eq!(access(&Method::POST, "/v1/orders"), Access::Customer);
        assert_eq!(
            access(&Method::POST, "/v1/inventory/{sku}/restock"),
            Access::Operator
        );
        assert_eq!(access(&Method::DELETE, "/v1/orders"), Access::Operator);
        assert_eq!(access(&Method::GET, "/v1/anything/new"), Access::Operator);
    }

    #[test]
    fn rate_limits_read_as_rate_and_burst() {
        assert_eq!(
            "50/100".parse(),
            Ok(RateLimit {
                per_second: 50,
                burst: 100
            })
        );
        assert_eq!(
            "10".parse(),
            Ok(RateLimit {
                per_second: 10,
                burst: 20
            })
        );
        assert!("0/1".parse::<RateLimit>().is_err());
        assert!("fast".parse::<RateLimit>().is_err());
    }

    #[test]
    fn a_client_past_its_burst_waits_and_others_do_not() {
        let limiter = Limiter::new(RateLimit {
            per_second: 1,
            burst: 2,
        });
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_ok());
        assert_eq!(limiter.check("a"), Err(1));
        assert!(limiter.check("b").is_ok());
    }

    #[test]
    fn a_missing_secret_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().expect("dir");
        let settings = AuthSettings::default();
        let keys = Keys::load(&settings, dir.path()).expect("created");
        let token = std::fs::read_to_string(dir.path().join("operator-token")).expect("file");
        assert!(keys.is_operator(token.trim()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("signing-key"))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = Keys::load(&settings, dir.path()).expect("read");
        assert!(again.is_operator(token.trim()));
        let short = AuthSettings {
            operator_token: SecretSource {
                value: Some("short".into()),
                file: None,
            },
            ..AuthSettings::default()
        };
        assert!(matches!(
            Keys::load(&short, dir.path()),
            Err(KeyError::TooShort { .. })
        ));
    }
}
