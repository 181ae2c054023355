//! HTTP plumbing shared by the command and query APIs: one error type that renders
//! as `application/problem+json`, a strict JSON body extractor, and consistency
//! tokens.

use crate::progress::Progress;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::http::{Problem, CONSISTENCY_TOKEN, CONSISTENCY_WAIT_MS};
use schemas::topics::{AggregateType, ProjectionName};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// The largest request body accepted (413 beyond it).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long a read waits for its consistency token unless told otherwise.
pub const DEFAULT_CONSISTENCY_WAIT: Duration = Duration::from_millis(2000);
/// The longest wait a client may ask for.
pub const MAX_CONSISTENCY_WAIT: Duration = Duration::from_millis(30_000);

/// An error answer. Internal causes are logged, never sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub retry_after: Option<u64>,
    /// A 401's `WWW-Authenticate: Bearer` challenge.
    pub challenge: bool,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            title,
            detail: detail.into(),
            retry_after: None,
            challenge: false,
        }
    }

    /// No credentials, or bad ones (401 with `WWW-Authenticate: Bearer`).
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        let mut error = Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Not authenticated",
            detail,
        );
        error.challenge = true;
        error
    }

    /// A line's stated price is not the product's price now (422).
    pub fn price_changed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "price-changed",
            "Price changed",
            detail,
        )
    }

    /// Authenticated, but not allowed this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Not allowed", detail)
    }

    /// The client sent more than its rate allows (429 with Retry-After).
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            "this client sent more requests than its rate allows; retry later",
        );
        error.retry_after = Some(retry_after_secs);
        error
    }

    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-request",
            "Malformed request",
            detail,
        )
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-value",
            "Invalid value",
            detail,
        )
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "conflict",
            "Not allowed in the current state",
            detail,
        )
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            detail,
        )
    }

    pub fn idempotency_key_reused() -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency key reused",
            "this Idempotency-Key was used before with a different request",
        )
    }

    pub fn not_yet_consistent(retry_after_secs: u64) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-yet-consistent",
            "Read model not yet consistent",
            "the read model has not caught up with the consistency token yet; retry",
        );
        error.retry_after = Some(retry_after_secs);
        error
    }

    /// A dependency (the database, the brokers) is down or busy: log the cause, answer
    /// 503 with Retry-After without it.
    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "dependency unavailable");
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "a dependency of the service is unavailable; retry",
        );
        error.retry_after = Some(1);
        error
    }

    /// Too much work is waiting behind this request: come back later.
    pub fn overloaded(retry_after_secs: u64) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Too many orders in progress",
            "the orders already accepted are still being fulfilled; retry later",
        );
        error.retry_after = Some(retry_after_secs);
        error
    }

    /// Too many requests of this kind are in progress: come back shortly.
    pub fn busy(detail: impl Into<String>) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "Too many such requests in progress",
            detail,
        );
        error.retry_after = Some(1);
        error
    }

    /// Log the cause; answer 500 without it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the server failed to handle the request; it was logged",
        )
    }

    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:orderline:problem:{}", self.kind),
            title: self.title.to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"orderline\""),
            );
        }
        response
    }
}

/// Every error answer as `application/problem+json`. The framework's own answers (a
/// method a route does not take, a path that does not decode, an extractor's
/// rejection, a body over the limit) come as plain text or with no body; they are
/// rewritten here with their status and their other headers (`Allow`,
/// `Retry-After`) kept. A server error's own text is not passed on.
pub async fn problem_json(request: Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/problem+json"));
    if is_problem || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .unwrap_or_default();
    let said = String::from_utf8_lossy(&text).trim().to_owned();
    let reason = status.canonical_reason().unwrap_or("Error");
    let error = match status {
        StatusCode::BAD_REQUEST if !said.is_empty() => ApiError::malformed(said),
        StatusCode::NOT_FOUND => ApiError::not_found("no such resource"),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(format!(
            "the body is over the limit of {MAX_BODY_BYTES} bytes"
        )),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            status,
            "method-not-allowed",
            "Method not allowed",
            "the resource does not take this method; `Allow` lists those it takes",
        ),
        status if status.is_server_error() => {
            ApiError::new(status, "internal", "Internal error", reason)
        }
        status => ApiError::new(
            status,
            "request-refused",
            "Request refused",
            if said.is_empty() {
                reason.to_owned()
            } else {
                said
            },
        ),
    };
    let problem = error.into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in problem.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, problem.into_body())
}

impl From<crate::InfraError> for ApiError {
    /// 503 when a dependency is down (the request may succeed later), 500 otherwise.
    fn from(error: crate::InfraError) -> Self {
        if error.is_unavailable() {
            ApiError::unavailable(error)
        } else {
            ApiError::internal(error)
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::from(crate::InfraError::Database(error))
    }
}

/// A JSON body parsed strictly: a syntax error, a missing or unknown field or a wrong
/// type is a 400; an empty body reads as `{}`; past [`MAX_BODY_BYTES`] is a 413.
/// Also hands over the raw bytes, for idempotency hashing.
pub struct JsonBody<T>(pub T, pub Bytes);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(request, state).await?;
        let text: &[u8] = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => b"{}",
            Some(b'{') => &bytes,
            Some(_) => return Err(ApiError::malformed("the body must be a JSON object")),
        };
        let mut json = serde_json::Deserializer::from_slice(text);
        let value = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                ApiError::malformed(format!("the body is not valid: {inner}"))
            } else {
                ApiError::malformed(format!("the body is not valid at {path}: {inner}"))
            }
        })?;
        json.end()
            .map_err(|e| ApiError::malformed(format!("the body is not valid: {e}")))?;
        Ok(JsonBody(value, bytes))
    }
}

/// A request's body as bytes: past [`MAX_BODY_BYTES`] a 413, a body that paused
/// longer than the body timeout (`serve::Limits`) a 408, any other failure to read it
/// a 400.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(request, state)
            .await
            .map(RawBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    return too_large();
                }
                unreadable_body(&rejection)
            })
    }
}

fn too_large() -> ApiError {
    ApiError::too_large(format!("the body may be at most {MAX_BODY_BYTES} bytes"))
}

/// The answer to a body that could not be read: past [`MAX_BODY_BYTES`] a 413, a
/// body that paused longer than the body timeout a 408, anything else a 400.
pub fn unreadable_body(error: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<http_body_util::LengthLimitError>() {
            return too_large();
        }
        if error.is::<tower_http::timeout::TimeoutError>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "Request timeout",
                "the body stopped arriving before it was complete",
            );
        }
        cause = error.source();
    }
    ApiError::malformed(format!("the body could not be read: {error}"))
}

/// A consistency token: what a read must reflect to reflect a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// Embedded deployment: a position in the one log (`"42"`).
    Position(i64),
    /// Distributed deployment: a version of one stream (`"order:<id>:3"`); only
    /// read models that read that stream's topic have anything to wait for.
    Stream {
        aggregate_type: AggregateType,
        aggregate_id: String,
        version: i64,
    },
}

impl Token {
    pub fn parse(raw: &str) -> Option<Token> {
        let raw = raw.trim();
        if let Ok(position) = raw.parse::<i64>() {
            return (position >= 0).then_some(Token::Position(position));
        }
        let (aggregate_type, rest) = raw.split_once(':')?;
        let (aggregate_id, version) = rest.rsplit_once(':')?;
        let version = version.parse::<i64>().ok().filter(|v| *v >= 0)?;
        let aggregate_type = aggregate_type.parse().ok()?;
        if aggregate_id.is_empty() {
            return None;
        }
        Some(Token::Stream {
            aggregate_type,
            aggregate_id: aggregate_id.to_owned(),
            version,
        })
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::Position(position) => write!(f, "{position}"),
            Token::Stream {
                aggregate_type,
                aggregate_id,
                version,
            } => write!(f, "{aggregate_type}:{aggregate_id}:{version}"),
        }
    }
}

/// The consistency token a read sent, with how long it may wait.
pub fn requested_consistency(headers: &HeaderMap) -> Result<Option<(Token, Duration)>, ApiError> {
    let Some(token) = headers.get(CONSISTENCY_TOKEN) else {
        return Ok(None);
    };
    let token = token.to_str().ok().and_then(Token::parse).ok_or_else(|| {
        ApiError::malformed("X-Consistency-Token is not a token this server issued")
    })?;
    let wait = match headers.get(CONSISTENCY_WAIT_MS) {
        None => DEFAULT_CONSISTENCY_WAIT,
        Some(raw) => raw
            .to_str()
            .ok()
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
            .filter(|wait| *wait <= MAX_CONSISTENCY_WAIT)
            .ok_or_else(|| {
                ApiError::malformed(
                    "X-Consistency-Wait-Ms must be a whole number of milliseconds up to 30000",
                )
            })?,
    };
    Ok(Some((token, wait)))
}

/// Wait, within the bound the client asked for, until `projection` (whose tables are
/// in `db`) reflects the token in `headers`; a 503 with Retry-After when it does not
/// in time. `head` is the last position of the log this process reads (embedded): a
/// position past it was never issued, and is refused with 400 rather than waited for.
pub async fn await_consistency(
    progress: &Progress,
    projection: ProjectionName,
    db: &sqlx::AnyPool,
    headers: &HeaderMap,
    head: i64,
) -> Result<(), ApiError> {
    let Some((token, wait)) = requested_consistency(headers)? else {
        return Ok(());
    };
    // A token of the other deployment's kind was never issued here: a position
    // means nothing to a distributed service, and a stream token would cost a
    // database read per checkpoint change in the embedded one.
    if matches!(token, Token::Stream { .. }) != progress.issues_stream_tokens() {
        return Err(ApiError::malformed(
            "X-Consistency-Token is not a token this server issued",
        ));
    }
    let reflected = match token {
        Token::Position(position) if position > head => {
            return Err(ApiError::malformed(
                "X-Consistency-Token is not a token this server issued",
            ));
        }
        Token::Position(position) => progress.wait_for(projection.as_str(), position, wait).await,
        Token::Stream {
            aggregate_type,
            aggregate_id,
            version,
        } => {
            if !projection.reads(aggregate_type) {
                // The write did not touch anything this read model shows.
                return Ok(());
            }
            let mut changes = progress.watch(projection.as_str());
            let deadline = tokio::time::Instant::now() + wait;
            let sql = format!(
                "SELECT version FROM {} WHERE aggregate_type = $1 AND aggregate_id = $2",
                projection.applied_table("")
            );
            loop {
                changes.borrow_and_update();
                let applied: Option<i64> = sqlx::query_scalar(&sql)
                    .bind(aggregate_type.as_str())
                    .bind(&aggregate_id)
                    .fetch_optional(db)
                    .await?;
                if applied.is_some_and(|v| v >= version) {
                    break true;
                }
                match tokio::time::timeout_at(deadline, changes.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => break false,
                }
            }
        }
    };
    if reflected {
        Ok(())
    } else {
        Err(ApiError::not_yet_consistent(1))
    }
}

/// The consistency token header for a write.
pub fn token_header(token: &str) -> [(&'static str, String); 1] {
    [(CONSISTENCY_TOKEN, token.to_owned())]
}

/// The answer for any path no route serves.
pub async fn not_found_fallback() -> ApiError {
    ApiError::not_found("no such resource")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_read_back_as_written_and_nothing_else_reads_as_one() {
        for raw in ["42", "order:0192-ab:3", "inventory:S:1:2"] {
            let token = Token::parse(raw).expect(raw);
            assert_eq!(token.to_string(), raw);
        }
        assert_eq!(
            Token::parse("inventory:S:1:2"),
            Some(Token::Stream {
                aggregate_type: AggregateType::Inventory,
                aggregate_id: "S:1".into(),
                version: 2,
            })
        );
        for raw in ["-1", "", "widget:x:1", "order::1", "order:x:-2", "order:x"] {
            assert_eq!(Token::parse(raw), None, "{raw}");
        }
    }

    #[test]
    fn an_error_renders_as_problem_json_with_retry_after_when_it_has_one() {
        let response = ApiError::not_yet_consistent(2).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let headers = response.headers();
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(headers[header::RETRY_AFTER], "2");
    }
}
