//! The HTTP API (actix-web) every node serves, and the dashboard.
//!
//! Every route under `/api/` (except the OpenAPI document) and `/metrics`
//! needs the cluster's token, as `Authorization: Bearer <token>` or, for
//! clients that cannot set headers (a browser's `EventSource`), as the
//! `access_token` query parameter. Bodies are read whole (at most 64 KiB) and
//! parsed before anything else happens: a malformed request is answered with
//! an error and never reaches the cluster store. Errors are
//! `{"code", "message"}` with the codes listed in [`crate::error`].
//!
//! Handlers run on the HTTP server's worker threads; every operation that
//! touches the store or a peer is sent to the node's own runtime
//! ([`Node::run_here`]), where the transport and Raft live.

use crate::error::ApiError;
use crate::events::Event;
use crate::node::Node;
use crate::requests;
use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The dashboard: one static page, no build step.
pub const DASHBOARD_HTML: &str = include_str!("web/dashboard.html");
/// The OpenAPI 3 description of this API.
pub const OPENAPI_JSON: &str = include_str!("web/openapi.json");

/// Every route: (method, path). The OpenAPI document is checked against it.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/status"),
    ("get", "/api/nodes"),
    ("get", "/api/nodes/{node}"),
    ("post", "/api/nodes/{node}/pause"),
    ("post", "/api/nodes/{node}/resume"),
    ("get", "/api/vms"),
    ("post", "/api/vms"),
    ("get", "/api/vms/{vm}"),
    ("patch", "/api/vms/{vm}"),
    ("delete", "/api/vms/{vm}"),
    ("post", "/api/vms/{vm}/start"),
    ("post", "/api/vms/{vm}/stop"),
    ("post", "/api/vms/{vm}/move"),
    ("post", "/api/vms/{vm}/cancel"),
    ("get", "/api/vms/{vm}/estimate"),
    ("post", "/api/vms/{vm}/append"),
    ("get", "/api/networks"),
    ("put", "/api/networks/order"),
    ("patch", "/api/networks/{network}"),
    ("get", "/api/migrations"),
    ("get", "/api/migrations/{id}"),
    ("get", "/api/tips"),
    ("post", "/api/tips/{id}/accept"),
    ("post", "/api/tips/{id}/dismiss"),
    ("get", "/api/settings"),
    ("patch", "/api/settings"),
    ("get", "/api/events"),
    ("get", "/api/openapi.json"),
    ("get", "/metrics"),
];

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(self.body())
    }
}

type ApiResult = Result<HttpResponse, ApiError>;

fn ok<T: Serialize>(value: T) -> ApiResult {
    Ok(HttpResponse::Ok().json(value))
}

/// Reads a JSON body. An empty body reads as `{}` (every field optional
/// where the request has optional fields).
async fn body<T: DeserializeOwned>(payload: web::Payload) -> Result<T, ApiError> {
    let bytes = payload
        .to_bytes_limited(BODY_LIMIT)
        .await
        .map_err(|_| {
            ApiError::new(
                413,
                "payload_too_large",
                format!("request bodies are limited to {BODY_LIMIT} bytes"),
            )
        })?
        .map_err(|e| ApiError::bad_request("malformed_json", format!("reading the body: {e}")))?;
    parse_json(&bytes)
}

/// Parses a request body: JSON that is not JSON is `malformed_json`; JSON
/// of the wrong shape is `invalid_request`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::bad_request("invalid_request", e.to_string()),
            _ => ApiError::bad_request("malformed_json", format!("the body is not JSON: {e}")),
        }
    })
}

fn tip_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::not_found("unknown_tip", format!("unknown tip {s:?}")))
}

fn migration_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::not_found("unknown_migration", format!("unknown migration {s:?}")))
}

// ---- handlers ----

async fn status(node: web::Data<Node>) -> ApiResult {
    ok(node.status())
}

async fn nodes(node: web::Data<Node>) -> ApiResult {
    ok(node.nodes())
}

async fn node_get(node: web::Data<Node>, name: web::Path<String>) -> ApiResult {
    ok(node.node(&name)?)
}

async fn node_pause(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let req: requests::PauseNode = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.pause_node(&name, req).await })
        .await?)
}

async fn node_resume(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let req: requests::ResumeNode = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.resume_node(&name, req).await })
        .await?)
}

async fn vms(node: web::Data<Node>) -> ApiResult {
    ok(node.vms())
}

async fn vm_create(node: web::Data<Node>, payload: web::Payload) -> ApiResult {
    let req: requests::CreateVm = body(payload).await?;
    let n = node.get_ref().clone();
    let vm = node.run_here(async move { n.create_vm(req).await }).await?;
    Ok(HttpResponse::Created().json(vm))
}

async fn vm_get(node: web::Data<Node>, name: web::Path<String>) -> ApiResult {
    ok(node.vm(&name)?)
}

async fn vm_patch(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let req: requests::VmPatch = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.update_vm(&name, req).await })
        .await?)
}

async fn vm_delete(node: web::Data<Node>, name: web::Path<String>) -> ApiResult {
    let n = node.get_ref().clone();
    node.run_here(async move { n.delete_vm(&name).await })
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn vm_start(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let req: requests::StartVm = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.start_vm(&name, req).await })
        .await?)
}

async fn vm_stop(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let _: serde_json::Map<String, serde_json::Value> = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node.run_here(async move { n.stop_vm(&name).await }).await?)
}

async fn vm_move(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let req: requests::MoveVm = body(payload).await?;
    let n = node.get_ref().clone();
    let started = node
        .run_here(async move { n.move_vm(&name, req).await })
        .await?;
    Ok(HttpResponse::Accepted().json(started))
}

async fn vm_cancel(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let _: serde_json::Map<String, serde_json::Value> = body(payload).await?;
    let n = node.get_ref().clone();
    let vm = name.clone();
    node.run_here(async move { n.cancel_move(&vm).await })
        .await?;
    ok(serde_json::json!({ "vm": name.as_str(), "cancelled": true }))
}

async fn vm_estimate(node: web::Data<Node>, name: web::Path<String>) -> ApiResult {
    ok(node.estimate(&name)?)
}

async fn vm_append(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let req: requests::Append = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.append(&name, req.record.as_bytes()).await })
        .await?)
}

async fn networks(node: web::Data<Node>) -> ApiResult {
    ok(node.networks())
}

async fn network_order(node: web::Data<Node>, payload: web::Payload) -> ApiResult {
    let req: requests::NetworkOrder = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.order_networks(req.order).await })
        .await?)
}

async fn network_patch(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let req: requests::NetworkPatch = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.set_network(&name, req).await })
        .await?)
}

async fn migrations(node: web::Data<Node>) -> ApiResult {
    ok(node.migrations())
}

async fn migration_get(node: web::Data<Node>, id: web::Path<String>) -> ApiResult {
    ok(node.migration(migration_id(&id)?)?)
}

async fn tips(node: web::Data<Node>) -> ApiResult {
    ok(node.tips())
}

async fn tip_resolve(
    node: web::Data<Node>,
    id: web::Path<String>,
    accept: bool,
    payload: web::Payload,
) -> ApiResult {
    let _: serde_json::Map<String, serde_json::Value> = body(payload).await?;
    let id = tip_id(&id)?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.resolve_tip(id, accept).await })
        .await?)
}

async fn tip_accept(node: web::Data<Node>, id: web::Path<String>, p: web::Payload) -> ApiResult {
    tip_resolve(node, id, true, p).await
}

async fn tip_dismiss(node: web::Data<Node>, id: web::Path<String>, p: web::Payload) -> ApiResult {
    tip_resolve(node, id, false, p).await
}

async fn settings(node: web::Data<Node>) -> ApiResult {
    ok(node.settings())
}

async fn settings_patch(node: web::Data<Node>, payload: web::Payload) -> ApiResult {
    let req: requests::SettingsPatch = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.update_settings(req).await })
        .await?)
}

/// Server-sent events: `progress`, `report` and `change`, each with a JSON
/// `data` line; `?migration=<id>` keeps only one migration's events.
async fn events(node: web::Data<Node>, req: HttpRequest) -> ApiResult {
    let only: Option<u64> = match query_param(&req, "migration") {
        Some(s) => Some(migration_id(&s)?),
        None => None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let mut rx_events = node.events();
    node.runtime().spawn(async move {
        if tx
            .send(Bytes::from_static(b": ferry event stream\n\n"))
            .await
            .is_err()
        {
            return;
        }
        let mut keepalive = tokio::time::interval(Duration::from_secs(10));
        keepalive.tick().await;
        loop {
            let chunk = tokio::select! {
                e = rx_events.recv() => match e {
                    Ok(event) => {
                        if only.is_some() && event.migration() != only {
                            continue;
                        }
                        sse_frame(&event)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Bytes::from(format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    Ok(HttpResponse::Ok()
        .insert_header(("content-type", "text/event-stream"))
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .body(SseBody(rx)))
}

/// One SSE frame for `event`.
pub fn sse_frame(event: &Event) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!("event: {}\ndata: {data}\n\n", event.kind()))
}

struct SseBody(tokio::sync::mpsc::Receiver<Bytes>);

impl MessageBody for SseBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(Ok))
    }
}

async fn metrics(node: web::Data<Node>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::metrics::render(&node))
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI_JSON)
}

async fn dashboard() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("cache-control", "no-cache"))
        .body(DASHBOARD_HTML)
}

async fn not_found(req: HttpRequest) -> ApiResult {
    Err(ApiError::not_found(
        "not_found",
        format!("no route {} {}", req.method(), req.path()),
    ))
}

async fn method_not_allowed(req: HttpRequest) -> ApiResult {
    Err(ApiError::new(
        405,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.path()),
    ))
}

fn query_param(req: &HttpRequest, name: &str) -> Option<String> {
    req.query_string().split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// Constant-time comparison, so the token cannot be guessed byte by byte
/// from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn needs_token(path: &str) -> bool {
    (path.starts_with("/api/") && path != "/api/openapi.json") || path == "/metrics"
}

fn authorized(req: &actix_web::dev::ServiceRequest, token: &str) -> bool {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    if let Some(t) = header {
        return same(t.trim().as_bytes(), token.as_bytes());
    }
    req.query_string().split('&').any(|kv| {
        kv.split_once('=')
            .is_some_and(|(k, v)| k == "access_token" && same(v.as_bytes(), token.as_bytes()))
    })
}

fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

/// Registers the API's and the dashboard's routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/").route(web::get().to(dashboard)))
        .service(resource("/metrics").route(web::get().to(metrics)))
        .service(resource("/api/openapi.json").route(web::get().to(openapi)))
        .service(resource("/api/status").route(web::get().to(status)))
        .service(resource("/api/events").route(web::get().to(events)))
        .service(resource("/api/nodes").route(web::get().to(nodes)))
        .service(resource("/api/nodes/{node}").route(web::get().to(node_get)))
        .service(resource("/api/nodes/{node}/pause").route(web::post().to(node_pause)))
        .service(resource("/api/nodes/{node}/resume").route(web::post().to(node_resume)))
        .service(
            resource("/api/vms")
                .route(web::get().to(vms))
                .route(web::post().to(vm_create)),
        )
        .service(
            resource("/api/vms/{vm}")
                .route(web::get().to(vm_get))
                .route(web::patch().to(vm_patch))
                .route(web::delete().to(vm_delete)),
        )
        .service(resource("/api/vms/{vm}/start").route(web::post().to(vm_start)))
        .service(resource("/api/vms/{vm}/stop").route(web::post().to(vm_stop)))
        .service(resource("/api/vms/{vm}/move").route(web::post().to(vm_move)))
        .service(resource("/api/vms/{vm}/cancel").route(web::post().to(vm_cancel)))
        .service(resource("/api/vms/{vm}/estimate").route(web::get().to(vm_estimate)))
        .service(resource("/api/vms/{vm}/append").route(web::post().to(vm_append)))
        .service(resource("/api/networks").route(web::get().to(networks)))
        .service(resource("/api/networks/order").route(web::put().to(network_order)))
        .service(resource("/api/networks/{network}").route(web::patch().to(network_patch)))
        .service(resource("/api/migrations").route(web::get().to(migrations)))
        .service(resource("/api/migrations/{id}").route(web::get().to(migration_get)))
        .service(resource("/api/tips").route(web::get().to(tips)))
        .service(resource("/api/tips/{id}/accept").route(web::post().to(tip_accept)))
        .service(resource("/api/tips/{id}/dismiss").route(web::post().to(tip_dismiss)))
        .service(
            resource("/api/settings")
                .route(web::get().to(settings))
                .route(web::patch().to(settings_patch)),
        )
        .default_service(web::to(not_found));
}

/// The API server of `node`, bound to the configured address and not yet
/// running: spawn it (it is a future) and stop it with its handle.
pub fn server(node: &Node) -> std::io::Result<actix_web::dev::Server> {
    let data = web::Data::new(node.clone());
    let token = node.config().api.token.clone();
    let server = HttpServer::new(move || {
        let token = token.clone();
        let counting = data.clone();
        App::new()
            .app_data(data.clone())
            .wrap_fn(move |req, srv| {
                let counters = counting.clone();
                counters
                    .api_counters()
                    .requests
                    .fetch_add(1, Ordering::Relaxed);
                let fut: Pin<Box<dyn std::future::Future<Output = _>>> =
                    if needs_token(req.path()) && !authorized(&req, &token) {
                        let response = ApiError::new(
                            401,
                            "unauthorized",
                            "this API needs the cluster's token: Authorization: Bearer <token>",
                        )
                        .error_response();
                        let res: ServiceResponse = req.into_response(response);
                        Box::pin(async move { Ok(res) })
                    } else {
                        Box::pin(srv.call(req))
                    };
                async move {
                    let res: Result<ServiceResponse, actix_web::Error> = fut.await;
                    if let Ok(r) = &res {
                        let c = counters.api_counters();
                        if r.status().is_client_error() {
                            c.errors_4xx.fetch_add(1, Ordering::Relaxed);
                        } else if r.status().is_server_error() {
                            c.errors_5xx.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    res
                }
            })
            .configure(configure)
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(node.config().api.listen)?
    .run();
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_describes_every_route() {
        let doc: serde_json::Value = match serde_json::from_str(OPENAPI_JSON) {
            Ok(d) => d,
            Err(e) => panic!("openapi.json is not JSON: {e}"),
        };
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        for (method, path) in ROUTES {
            assert!(
                doc["paths"][path][method].is_object(),
                "openapi.json lacks {method} {path}"
            );
        }
        let paths = doc["paths"].as_object().map(|p| p.len()).unwrap_or(0);
        let distinct: std::collections::BTreeSet<&str> = ROUTES.iter().map(|r| r.1).collect();
        assert_eq!(
            paths,
            distinct.len(),
            "openapi.json has paths the API lacks"
        );
    }

    #[test]
    fn bodies_are_classified() {
        let e = parse_json::<requests::MoveVm>(b"{not json").err();
        assert_eq!(e.map(|e| e.code), Some("malformed_json".into()));
        let e = parse_json::<requests::MoveVm>(br#"{"target": 3}"#).err();
        assert_eq!(e.map(|e| e.code), Some("invalid_request".into()));
        let e = parse_json::<requests::MoveVm>(br#"{"tagret": "node-2"}"#).err();
        assert_eq!(e.map(|e| e.code), Some("invalid_request".into()));
        assert!(parse_json::<requests::MoveVm>(b"").is_ok());
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
