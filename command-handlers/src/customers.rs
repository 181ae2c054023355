//! The customer service's commands: registration, login (an access token and a
//! refresh token), refresh with rotation and reuse detection, logout, and the
//! customer's own profile.
//!
//! Passwords are hashed with argon2id (its default parameters) on a blocking thread;
//! a login for an unknown email checks the password against a hash of its own, so
//! both wrong answers take the same time and get the same 401. Refresh tokens are
//! `<session id>.<32 random bytes>`; only their SHA-256 digest is kept.

use crate::app::{CommandError, Executed, Handlers, Meta};
use crate::routes::observe;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use domain::customer::{customer_id, Customer, CustomerCommand, Session, SessionCommand};
use domain::values::parse_name;
use domain::{DomainError, Email};
use infra::auth::{digest, random_text, Principal, ACCESS_TOKEN_TTL};
use infra::http::{token_header, ApiError, JsonBody};
use schemas::http::{
    CommandRefusals, LoginRequest, RefreshRequest, RegisterRequest, Registered, RenameRequest,
    TokenPair,
};
use serde_json::json;
use std::sync::OnceLock;
use uuid::Uuid;

/// The shortest password taken.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// The longest password taken (hashing a longer one would be work for an attacker's
/// benefit).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Register a customer: 201 with its id; 409 when the email is taken (also when two
/// registrations of one email race: one stream, one version 1).
#[utoipa::path(
    post,
    path = "/v1/customers",
    tag = "customers",
    request_body = RegisterRequest,
    responses((status = 201, description = "Registered", body = Registered), CommandRefusals)
)]
pub async fn register(
    State(h): State<Handlers>,
    body: Result<JsonBody<RegisterRequest>, ApiError>,
) -> Response {
    let result = async {
        let JsonBody(request, _) = body?;
        let email = Email::parse(&request.email).map_err(invalid)?;
        let name = parse_name(&request.name).map_err(invalid)?;
        if request.password.chars().count() < MIN_PASSWORD_CHARS {
            return Err(ApiError::invalid(format!(
                "password: must be at least {MIN_PASSWORD_CHARS} characters long"
            )));
        }
        if request.password.len() > MAX_PASSWORD_BYTES {
            return Err(ApiError::invalid(format!(
                "password: must be at most {MAX_PASSWORD_BYTES} bytes long"
            )));
        }
        let id = customer_id(&email).to_string();
        // A registration of a taken email is refused before the hashing work.
        let (known, _, _) = h.load::<Customer>(&id).await.map_err(ApiError::from)?;
        if known.registered() {
            return Err(taken());
        }
        let password_hash = hash(request.password).await?;
        let command = CustomerCommand::Register {
            email,
            name,
            password_hash,
        };
        let executed = h
            .execute::<Customer>(&id, &command, &Meta::fresh())
            .await
            .map_err(|error| match error {
                CommandError::Domain(DomainError::Conflict(_)) => taken(),
                error => ApiError::from(error),
            })?;
        let token = consistency(executed);
        let body = Registered {
            customer_id: id,
            consistency_token: token.clone(),
        };
        Ok((StatusCode::CREATED, token_header(&token), Json(body)).into_response())
    }
    .await;
    observe(&h, "register", result)
}

/// Log in: an access token (a JWT good for 15 minutes) and a refresh token.
#[utoipa::path(
    post,
    path = "/v1/auth/login",
    tag = "customers",
    request_body = LoginRequest,
    responses((status = 200, description = "Logged in", body = TokenPair), CommandRefusals)
)]
pub async fn login(
    State(h): State<Handlers>,
    body: Result<JsonBody<LoginRequest>, ApiError>,
) -> Response {
    let result = async {
        let JsonBody(request, _) = body?;
        let refused = || ApiError::unauthorized("wrong email or password");
        // A malformed email is only a wrong one: the same answer.
        let email = Email::parse(&request.email).ok();
        let id = email.as_ref().map(|email| customer_id(email).to_string());
        let customer = match &id {
            Some(id) => h.load::<Customer>(id).await.map_err(ApiError::from)?.0,
            None => Customer::default(),
        };
        let stored = customer
            .registered()
            .then(|| customer.password_hash.clone());
        let matches = verify(request.password, stored.clone()).await?;
        let (Some(id), Some(_), true) = (id, stored, matches) else {
            return Err(refused());
        };
        let session = Uuid::now_v7();
        let refresh_token = refresh_token(session)?;
        let command = SessionCommand::Start {
            customer_id: id.clone(),
            token_digest: digest(&refresh_token),
        };
        h.execute::<Session>(&session.to_string(), &command, &Meta::fresh())
            .await
            .map_err(ApiError::from)?;
        pair(&h, &id, session, refresh_token)
    }
    .await;
    observe(&h, "login", result)
}

/// Trade a refresh token for a new pair. A refresh token works once: presenting one
/// already used ends the whole login (every token of it) and answers 401.
#[utoipa::path(
    post,
    path = "/v1/auth/refresh",
    tag = "customers",
    request_body = RefreshRequest,
    responses((status = 200, description = "A new pair", body = TokenPair), CommandRefusals)
)]
pub async fn refresh(
    State(h): State<Handlers>,
    body: Result<JsonBody<RefreshRequest>, ApiError>,
) -> Response {
    let result = async {
        let JsonBody(request, _) = body?;
        let session = session_of(&request.refresh_token)?;
        let next_token = refresh_token(session)?;
        let next = digest(&next_token);
        let command = SessionCommand::Refresh {
            presented: digest(&request.refresh_token),
            next: next.clone(),
        };
        let id = session.to_string();
        h.execute::<Session>(&id, &command, &Meta::fresh())
            .await
            .map_err(refusal)?;
        // What was decided: the rotation to this request's token, or the end of the
        // login (the presented token had been used: by whom, cannot be told).
        let (state, _, _) = h.load::<Session>(&id).await.map_err(ApiError::from)?;
        match (&state.customer_id, state.live() && state.current == next) {
            (Some(customer), true) => pair(&h, customer, session, next_token),
            _ => Err(ApiError::unauthorized(
                "the refresh token was used before; the login has ended, log in again",
            )),
        }
    }
    .await;
    observe(&h, "refresh", result)
}

/// Log out: the login's refresh token stops working (and, where the login can be
/// checked, its access tokens).
#[utoipa::path(
    post,
    path = "/v1/auth/logout",
    tag = "customers",
    request_body = RefreshRequest,
    responses((status = 204, description = "Logged out"), CommandRefusals)
)]
pub async fn logout(
    State(h): State<Handlers>,
    body: Result<JsonBody<RefreshRequest>, ApiError>,
) -> Response {
    let result = async {
        let JsonBody(request, _) = body?;
        let session = session_of(&request.refresh_token)?;
        let command = SessionCommand::End {
            presented: digest(&request.refresh_token),
        };
        h.execute::<Session>(&session.to_string(), &command, &Meta::fresh())
            .await
            .map_err(refusal)?;
        Ok::<_, ApiError>(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    observe(&h, "logout", result)
}

/// Change the caller's own name.
#[utoipa::path(
    patch,
    path = "/v1/customers/me",
    tag = "customers",
    request_body = RenameRequest,
    responses((status = 202, description = "Renamed", body = schemas::http::Accepted), CommandRefusals)
)]
pub async fn rename(
    State(h): State<Handlers>,
    principal: Principal,
    body: Result<JsonBody<RenameRequest>, ApiError>,
) -> Response {
    let result = async {
        let customer = principal
            .customer()
            .ok_or_else(|| ApiError::forbidden("only a customer has a profile"))?
            .to_owned();
        let JsonBody(request, _) = body?;
        let name = parse_name(&request.name).map_err(invalid)?;
        let executed = h
            .execute::<Customer>(&customer, &CustomerCommand::Rename { name }, &Meta::fresh())
            .await
            .map_err(ApiError::from)?;
        let token = consistency(executed);
        let body = json!({ "customer_id": customer, "consistency_token": token });
        Ok::<_, ApiError>((StatusCode::ACCEPTED, token_header(&token), Json(body)).into_response())
    }
    .await;
    observe(&h, "rename_customer", result)
}

/// Logins are checked where they are kept: an access token of a login that ended is
/// refused from then on.
#[async_trait::async_trait]
impl infra::auth::Sessions for Handlers {
    async fn live(&self, session: Uuid) -> Result<bool, ApiError> {
        let (state, _, _) = self
            .load::<Session>(&session.to_string())
            .await
            .map_err(ApiError::from)?;
        Ok(state.live())
    }
}

fn invalid(error: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(error.to_string())
}

fn taken() -> ApiError {
    ApiError::conflict("a customer with this email is already registered")
}

/// A refused refresh or logout: an unknown, forged or ended login is a 401.
fn refusal(error: CommandError) -> ApiError {
    match error {
        CommandError::Domain(DomainError::NotFound(_)) => {
            ApiError::unauthorized("the refresh token is not valid")
        }
        error => ApiError::from(error),
    }
}

fn consistency(executed: Executed) -> String {
    match executed {
        Executed::Done { token, .. } | Executed::Repeated { token, .. } => token,
    }
}

/// A new refresh token of `session`.
fn refresh_token(session: Uuid) -> Result<String, ApiError> {
    Ok(format!(
        "{session}.{}",
        random_text().map_err(ApiError::internal)?
    ))
}

/// The login a refresh token belongs to.
fn session_of(token: &str) -> Result<Uuid, ApiError> {
    token
        .split_once('.')
        .and_then(|(session, _)| Uuid::parse_str(session).ok())
        .ok_or_else(|| ApiError::unauthorized("the refresh token is not valid"))
}

/// The answer to a login or a refresh.
fn pair(
    h: &Handlers,
    customer: &str,
    session: Uuid,
    refresh_token: String,
) -> Result<Response, ApiError> {
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
    let access_token = h.keys.issue(customer, session, now)?;
    let body = TokenPair {
        access_token,
        token_type: "Bearer".into(),
        expires_in: ACCESS_TOKEN_TTL.as_secs(),
        refresh_token,
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// The argon2id hash (PHC string) of a password, on a blocking thread.
async fn hash(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|error| ApiError::internal(format!("cannot hash a password: {error}")))
    })
    .await
    .map_err(ApiError::internal)?
}

/// Whether `password` matches `stored`; with nothing stored, the same work against a
/// hash of no one's password (and `false`).
async fn verify(password: String, stored: Option<String>) -> Result<bool, ApiError> {
    tokio::task::spawn_blocking(move || {
        let known = stored.is_some();
        let hash = match stored {
            Some(hash) => hash,
            None => decoy()?.to_owned(),
        };
        let parsed = PasswordHash::new(&hash)
            .map_err(|error| ApiError::internal(format!("a stored hash does not read: {error}")))?;
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        Ok(known && matches)
    })
    .await
    .map_err(ApiError::internal)?
}

/// A hash of a random password, made once.
fn decoy() -> Result<&'static str, ApiError> {
    static DECOY: OnceLock<String> = OnceLock::new();
    if let Some(hash) = DECOY.get() {
        return Ok(hash);
    }
    let password = random_text().map_err(ApiError::internal)?;
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|error| ApiError::internal(format!("cannot hash a password: {error}")))?
        .to_string();
    Ok(DECOY.get_or_init(|| hash))
}
