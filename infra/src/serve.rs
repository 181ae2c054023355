//! Serving a router at the public edge, with limits: a cap on open connections, a
//! deadline for a request's head (which also closes a connection left idle), for
//! each part of its body and for the whole request, and a cap on requests in progress
//! past which requests are shed with 503 and `Retry-After` rather than queued. Built
//! from hyper's HTTP/1 connection (its header-read timeout), tower's global
//! concurrency limit and load shedding, and tower-http's timeouts.

use crate::http::ApiError;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

/// The limits of the edge; each is a flag and a variable of `orderline serve` and
/// `orderline gateway` (see README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most; past it, new connections wait in the listen queue
    /// until one closes (`ORDERLINE_MAX_CONNECTIONS`, 1024).
    pub max_connections: usize,
    /// Requests in progress at most; past it, a request is answered 503 with
    /// `Retry-After` at once (`ORDERLINE_MAX_IN_FLIGHT`, 512). `/health` and
    /// `/metrics` are not counted.
    pub max_in_flight: usize,
    /// How long a request's head may take to arrive, and how long a connection may
    /// stay idle between requests (`ORDERLINE_HEADER_TIMEOUT_MS`, 10 s).
    pub header_timeout: Duration,
    /// How long the body may pause between two parts (`ORDERLINE_BODY_TIMEOUT_MS`,
    /// 10 s): past it the request is answered 408.
    pub body_timeout: Duration,
    /// How long a whole request may take, consistency waits included
    /// (`ORDERLINE_REQUEST_TIMEOUT_MS`, 60 s): past it, 408.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_in_flight: 512,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// `router` with the per-request limits: the whole-request and body timeouts, and
    /// the cap on requests in progress (shared by every route of `router`), past which
    /// requests are shed. Routes added to the result afterwards are not limited.
    pub fn apply(&self, router: Router) -> Router {
        router.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(shed))
                .layer(LoadShedLayer::new())
                .layer(GlobalConcurrencyLimitLayer::new(self.max_in_flight))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    self.request_timeout,
                ))
                .layer(RequestBodyTimeoutLayer::new(self.body_timeout)),
        )
    }
}

/// A request refused because as many are in progress as the server takes.
async fn shed(error: tower::BoxError) -> Response {
    if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::busy("the server has as many requests in progress as it takes; try again")
            .into_response()
    } else {
        ApiError::internal(error).into_response()
    }
}

/// Serve `router` on `listener` under `limits` until `stop` resolves; then stop
/// accepting, let requests in progress finish (at most the request timeout) and
/// return.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: wait a moment rather than spin.
                    tracing::warn!(error = %error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        // The client's address, for per-client limits (`axum::extract::ConnectInfo`).
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                request
            },
        ));
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.request_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in progress after the request timeout; stopping anyway");
    }
    Ok(())
}
