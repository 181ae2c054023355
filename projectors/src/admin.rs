//! Operator routes over the projections: where each stands, online rebuilds, and the
//! dead-letter store.

use crate::rebuild::rebuild;
use crate::runner::{apply_one, Projections};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use infra::db::Db;
use infra::http::ApiError;
use infra::{dead_letters, guard};
use schemas::http::{
    CommandRefusals, DeadLetterList, ProjectionList, ProjectionView, ReadRefusals, RebuildProgress,
    RebuildStarted,
};
use schemas::topics::Service;
use serde_json::json;
use std::sync::atomic::Ordering;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn router(projections: Projections) -> Router {
    let (router, _) = routes().with_state(projections).split_for_parts();
    router
}

/// The operator routes, each registered with its description in the OpenAPI document.
pub fn routes() -> OpenApiRouter<Projections> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(start_rebuild))
        .routes(routes!(list_dead_letters))
        .routes(routes!(retry_dead_letter))
}

/// Where every projection stands.
pub async fn views(all: &Projections) -> Result<Vec<ProjectionView>, ApiError> {
    let mut views = vec![];
    for handle in &all.handles {
        let name = handle.projection.as_str();
        let (checkpoint, lag) = all.standing(handle).await?;
        let rebuild = all.progress.rebuild(name);
        views.push(ProjectionView {
            name: name.to_owned(),
            checkpoint,
            lag,
            status: if rebuild.is_some() || handle.rebuilding.load(Ordering::SeqCst) {
                "rebuilding"
            } else {
                "running"
            }
            .to_owned(),
            dead_letters: dead_letters::count(&handle.db.pool, name).await?,
            rebuild: rebuild.map(|r| RebuildProgress {
                processed: r.processed,
                total: r.total,
            }),
        });
    }
    Ok(views)
}

/// Where every projection stands: checkpoint, lag, status, dead letters, and a
/// rebuild's progress.
#[utoipa::path(
    get,
    path = "/v1/projections",
    tag = "operators",
    responses((status = 200, body = ProjectionList), ReadRefusals)
)]
async fn list(State(all): State<Projections>) -> Result<Json<ProjectionList>, ApiError> {
    Ok(Json(ProjectionList {
        projections: views(&all).await?,
    }))
}

/// Rebuild a projection from the start of its topics, online: the live tables keep
/// serving until the swap.
#[utoipa::path(
    post,
    path = "/v1/projections/{name}/rebuild",
    tag = "operators",
    params(("name" = String, Path, description = "orders, inventory, payments or shipments")),
    responses((status = 202, description = "Started", body = RebuildStarted), CommandRefusals)
)]
async fn start_rebuild(
    State(all): State<Projections>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let handle = name
        .parse()
        .ok()
        .and_then(|name| all.get(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no projection named {name:?}")))?;
    if handle.rebuilding.swap(true, Ordering::SeqCst) {
        return Err(ApiError::conflict(format!(
            "{name} is being rebuilt already"
        )));
    }
    let task_all = all.clone();
    all.spawn(async move {
        let name = handle.projection.as_str();
        tracing::info!(projection = name, "online rebuild started");
        match rebuild(&task_all, &handle, |_| {}).await {
            Ok(events) => tracing::info!(projection = name, events, "online rebuild finished"),
            Err(error) => {
                task_all.progress.set_rebuild(name, None);
                tracing::error!(projection = name, error = %error, "online rebuild failed; the live tables are untouched");
            }
        }
        handle.rebuilding.store(false, Ordering::SeqCst);
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(RebuildStarted {
            name,
            status: "rebuilding".into(),
        }),
    )
        .into_response())
}

/// A page of the dead letters of every service this process runs, in order of
/// service then number.
#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "operators",
    params(
        ("limit" = Option<u32>, Query, description = "Dead letters per page: 1 to 1000 (default 100)"),
        ("after" = Option<String>, Query, description = "`next_cursor` of the page before"),
    ),
    responses((status = 200, body = DeadLetterList), ReadRefusals)
)]
async fn list_dead_letters(
    State(all): State<Projections>,
    params: Result<Query<dead_letters::PageParams>, QueryRejection>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::malformed(e.body_text()))?;
    let page = params.page().map_err(ApiError::invalid)?;
    let mut services: Vec<(Service, &Db)> = vec![];
    for handle in &all.handles {
        let service = handle.projection.service();
        if !services.iter().any(|(s, _)| *s == service) {
            services.push((service, &handle.db));
        }
    }
    services.sort_by_key(|(service, _)| dead_letters::rank(*service));
    let mut out = vec![];
    for (service, db) in services {
        let rank = dead_letters::rank(service);
        let after = match page.after {
            Some((at, _)) if at > rank => continue,
            Some((at, number)) if at == rank => number,
            _ => 0,
        };
        let wanted = (page.limit + 1 - out.len()) as i64;
        out.extend(dead_letters::list_after(&db.pool, service.as_str(), after, wanted).await?);
        if out.len() > page.limit {
            break;
        }
    }
    let next_cursor = if out.len() > page.limit {
        out.truncate(page.limit);
        out.last().map(|letter| letter.id.clone())
    } else {
        None
    };
    Ok(Json(DeadLetterList {
        dead_letters: out,
        next_cursor,
    }))
}

/// Apply a dead-lettered event to its projection's live tables again; on success it
/// leaves the store. (The saga's dead letters are for reading: a saga's inputs must
/// come in order, so fix and replay instead.)
/// Apply a dead letter again, in order (under the projection's lock and version
/// guard); it is removed once applied.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{id}/retry",
    tag = "operators",
    params(("id" = String, Path, description = "`<service>:<number>`, e.g. `order:3`")),
    responses((status = 200, description = "Applied and removed", body = Object), CommandRefusals)
)]
async fn retry_dead_letter(
    State(all): State<Projections>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found(format!("no dead letter {id:?}"));
    let (service, number) = dead_letters::parse_id(&id).ok_or_else(not_found)?;
    let db = all
        .handles
        .iter()
        .find(|h| h.projection.service() == service)
        .map(|h| h.db.clone())
        .ok_or_else(not_found)?;
    // Which projection it belongs to (read again below, under that projection's lock).
    let (consumer, _) = dead_letters::get(&db.pool, number)
        .await?
        .ok_or_else(not_found)?;
    let handle = consumer
        .parse()
        .ok()
        .and_then(|name| all.get(name))
        .cloned()
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "{consumer} does not retry dead letters; rebuild or replay instead"
            ))
        })?;
    // The live runner is paused while the dead letter is read, applied and removed,
    // all in one transaction: two retries of one dead letter apply it once.
    let _live = handle.lock.lock().await;
    let mut tx = db.begin_write().await?;
    let (_, event) = dead_letters::get_in(&mut tx, number)
        .await?
        .ok_or_else(not_found)?;
    let event = event.map_err(|e| {
        ApiError::conflict(format!(
            "the record is not an event ({e}); it cannot be applied"
        ))
    })?;
    // The version guard: applied over later events of its stream, an old event
    // would set the read model back.
    let envelope = &event.envelope;
    let applied: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT version FROM {} WHERE aggregate_type = $1 AND aggregate_id = $2",
        handle.projection.applied_table("")
    ))
    .bind(&envelope.aggregate_type)
    .bind(&envelope.aggregate_id)
    .fetch_optional(&mut *tx)
    .await?;
    if applied.is_some_and(|version| version > envelope.version) {
        return Err(ApiError::conflict(format!(
            "later events of {} {} were applied since; rebuild the projection to apply this one in order",
            envelope.aggregate_type, envelope.aggregate_id
        )));
    }
    match apply_one(&mut tx, db.dialect, handle.projection, "", &event).await? {
        Ok(()) => {
            guard::advance_to(
                &mut tx,
                db.dialect,
                &handle.projection.applied_table(""),
                &event,
            )
            .await?;
            dead_letters::delete(&mut tx, number).await?;
            tx.commit().await?;
            Ok((
                StatusCode::OK,
                Json(json!({ "id": id, "status": "applied" })),
            )
                .into_response())
        }
        Err(error) => {
            tx.rollback().await?;
            dead_letters::set_error(&db.pool, number, &error).await?;
            Err(ApiError::conflict(format!(
                "the event still cannot be applied: {}",
                dead_letters::public_error(&error)
            )))
        }
    }
}
