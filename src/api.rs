//! The HTTP API (actix-web) every node serves, and the dashboard.
//!
//! Served over HTTPS by default with a certificate from the cluster CA
//! (`api_tls.rs`). Every route under `/api/` (except the OpenAPI document)
//! and `/metrics` needs one of the cluster's tokens, operator or read-only,
//! as `Authorization: Bearer <token>`; only the event stream also takes it as
//! the `access_token` query parameter, for a browser's `EventSource`
//! (`api_auth.rs`). Bodies are read whole (at most 64 KiB) and
//! parsed before anything else happens: a malformed request is answered with
//! an error and never reaches the cluster store. Errors are
//! `{"code", "message"}` with the codes listed in [`crate::error`].
//!
//! Handlers run on the HTTP server's worker threads; every operation that
//! touches the store or a peer is sent to the node's own runtime
//! ([`Node::run_here`]), where the transport and Raft live.

use crate::api_auth::{query_token, Tokens};
use crate::error::ApiError;
use crate::events::Event;
use crate::node::Node;
use crate::requests::{self, Request};
use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use anyhow::Context as _;
use bytes::Bytes;
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
    ("post", "/api/nodes/{node}/down"),
    ("post", "/api/nodes/{node}/remove"),
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
    ("post", "/api/migrations/{id}/abort"),
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
async fn body<T: Request>(payload: web::Payload) -> Result<T, ApiError> {
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

/// Parses and checks a request body: JSON that is not JSON is
/// `malformed_json`; JSON that is not an object (an array, `null`, a number),
/// or an object of the wrong shape, is `invalid_request`; a field whose value
/// is out of its bounds is `invalid_value` or `invalid_name`
/// ([`Request::validate`]).
pub fn parse_json<T: Request>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        b"{}"
    } else {
        bytes
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("the body is not JSON: {e}"))
    })?;
    if !value.is_object() {
        // serde would read an array as a struct's fields in order; a body
        // is an object with named fields, nothing else.
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "the body must be a JSON object ({}), not {}",
                T::SCHEMA,
                json_kind(&value)
            ),
        ));
    }
    let req = serde_json::from_value::<T>(value)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))?;
    req.validate()?;
    Ok(req)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
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

async fn node_down(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let req: requests::MarkNodeDown = body(payload).await?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.mark_node_down(&name, req).await })
        .await?)
}

async fn node_remove(
    node: web::Data<Node>,
    name: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let req: requests::RemoveNode = body(payload).await?;
    if req.confirm != *name {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!(
                "confirm is {:?}: it must repeat the name of the node to remove, {:?}",
                req.confirm, *name
            ),
        ));
    }
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.remove_node(&name).await })
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
    let _: requests::Empty = body(payload).await?;
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
    let _: requests::Empty = body(payload).await?;
    let n = node.get_ref().clone();
    let vm = name.clone();
    node.run_here(async move { n.cancel_move(&vm).await })
        .await?;
    ok(serde_json::json!({ "vm": name.as_str(), "cancelled": true }))
}

async fn vm_estimate(
    node: web::Data<Node>,
    name: web::Path<String>,
    req: HttpRequest,
) -> ApiResult {
    let n = node.get_ref().clone();
    let to = query_param(&req, "to");
    ok(node
        .run_here(async move { n.estimate(&name, to.as_deref()).await })
        .await?)
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

async fn migration_abort(
    node: web::Data<Node>,
    id: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let _: requests::Empty = body(payload).await?;
    let id = migration_id(&id)?;
    let n = node.get_ref().clone();
    ok(node
        .run_here(async move { n.abort_migration(id).await })
        .await?)
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
    let _: requests::Empty = body(payload).await?;
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

/// 405, with the `Allow` header HTTP requires: the methods `path` has.
fn method_not_allowed(req: &HttpRequest, allow: &str) -> HttpResponse {
    let mut res = ApiError::new(
        405,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}; allowed: {allow}",
            req.method(),
            req.path()
        ),
    )
    .error_response();
    if let Ok(v) = HeaderValue::from_str(allow) {
        res.headers_mut().insert(header::ALLOW, v);
    }
    res
}

fn query_param(req: &HttpRequest, name: &str) -> Option<String> {
    req.query_string().split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// The methods of `path` in [`ROUTES`], as an `Allow` header: `GET, POST`.
pub fn allowed_methods(path: &str) -> String {
    ROUTES
        .iter()
        .filter(|(_, p)| *p == path)
        .map(|(m, _)| m.to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A resource whose other methods are answered 405 with `Allow: <allow>`.
fn resource(path: &str, allow: String) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move |req: HttpRequest| {
        let res = method_not_allowed(&req, &allow);
        async move { res }
    }))
}

/// The handler of one entry of [`ROUTES`]; `None` for a route it lacks (a
/// test checks there is none).
fn handler(method: &str, path: &str) -> Option<actix_web::Route> {
    let route = match (method, path) {
        ("get", "/api/status") => web::get().to(status),
        ("get", "/api/nodes") => web::get().to(nodes),
        ("get", "/api/nodes/{node}") => web::get().to(node_get),
        ("post", "/api/nodes/{node}/pause") => web::post().to(node_pause),
        ("post", "/api/nodes/{node}/resume") => web::post().to(node_resume),
        ("post", "/api/nodes/{node}/down") => web::post().to(node_down),
        ("post", "/api/nodes/{node}/remove") => web::post().to(node_remove),
        ("get", "/api/vms") => web::get().to(vms),
        ("post", "/api/vms") => web::post().to(vm_create),
        ("get", "/api/vms/{vm}") => web::get().to(vm_get),
        ("patch", "/api/vms/{vm}") => web::patch().to(vm_patch),
        ("delete", "/api/vms/{vm}") => web::delete().to(vm_delete),
        ("post", "/api/vms/{vm}/start") => web::post().to(vm_start),
        ("post", "/api/vms/{vm}/stop") => web::post().to(vm_stop),
        ("post", "/api/vms/{vm}/move") => web::post().to(vm_move),
        ("post", "/api/vms/{vm}/cancel") => web::post().to(vm_cancel),
        ("get", "/api/vms/{vm}/estimate") => web::get().to(vm_estimate),
        ("post", "/api/vms/{vm}/append") => web::post().to(vm_append),
        ("get", "/api/networks") => web::get().to(networks),
        ("put", "/api/networks/order") => web::put().to(network_order),
        ("patch", "/api/networks/{network}") => web::patch().to(network_patch),
        ("get", "/api/migrations") => web::get().to(migrations),
        ("get", "/api/migrations/{id}") => web::get().to(migration_get),
        ("post", "/api/migrations/{id}/abort") => web::post().to(migration_abort),
        ("get", "/api/tips") => web::get().to(tips),
        ("post", "/api/tips/{id}/accept") => web::post().to(tip_accept),
        ("post", "/api/tips/{id}/dismiss") => web::post().to(tip_dismiss),
        ("get", "/api/settings") => web::get().to(settings),
        ("patch", "/api/settings") => web::patch().to(settings_patch),
        ("get", "/api/events") => web::get().to(events),
        ("get", "/api/openapi.json") => web::get().to(openapi),
        ("get", "/metrics") => web::get().to(metrics),
        _ => return None,
    };
    Some(route)
}

/// Registers the API's routes (from [`ROUTES`], in its order: a fixed path
/// such as `/api/networks/order` comes before `/api/networks/{network}`) and
/// the dashboard's.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/", "GET".into()).route(web::get().to(dashboard)));
    let mut paths: Vec<&str> = Vec::new();
    for (_, path) in ROUTES {
        if !paths.contains(path) {
            paths.push(path);
        }
    }
    for path in paths {
        let mut r = resource(path, allowed_methods(path));
        for (method, _) in ROUTES.iter().filter(|(_, p)| *p == path) {
            match handler(method, path) {
                Some(h) => r = r.route(h),
                None => tracing::error!("no handler for {method} {path}"),
            }
        }
        cfg.service(r);
    }
    cfg.default_service(web::to(not_found));
}

/// The API server of `node`, bound to the configured address and not yet
/// running: spawn it (it is a future) and stop it with its handle.
pub fn server(node: &Node) -> anyhow::Result<actix_web::dev::Server> {
    let data = web::Data::new(node.clone());
    let api = &node.config().api;
    let tokens = Tokens {
        operator: api.token.clone(),
        read_only: api.read_token.clone(),
    };
    let make_app = move || {
        let tokens = tokens.clone();
        let counting = data.clone();
        App::new()
            .app_data(data.clone())
            .wrap_fn(move |req, srv| {
                let counters = counting.clone();
                counters
                    .api_counters()
                    .requests
                    .fetch_add(1, Ordering::Relaxed);
                let bearer = req
                    .headers()
                    .get("authorization")
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.strip_prefix("Bearer "));
                let decision = crate::api_auth::authorize(
                    &tokens,
                    req.method().as_str(),
                    req.path(),
                    bearer,
                    query_token(req.query_string()),
                );
                let fut: Pin<Box<dyn std::future::Future<Output = _>>> = match decision {
                    Err(refusal) => {
                        let res: ServiceResponse = req.into_response(refusal.error_response());
                        Box::pin(async move { Ok(res) })
                    }
                    Ok(_) => Box::pin(srv.call(req)),
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
    };
    let binding = || format!("binding the API to {}", api.listen);
    if api.tls {
        let cert = api
            .cert
            .as_deref()
            .context("api.tls is on but api.cert is not set")?;
        let tls = crate::api_tls::server_config(cert, &node.config().credentials)?;
        let listener = std::net::TcpListener::bind(api.listen).with_context(binding)?;
        return crate::api_tls::serve_https(listener, tls, make_app).with_context(binding);
    }
    Ok(HttpServer::new(make_app)
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(api.listen)
        .with_context(binding)?
        .run())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::collections::BTreeSet;

    fn doc() -> Value {
        match serde_json::from_str(OPENAPI_JSON) {
            Ok(d) => d,
            Err(e) => panic!("openapi.json is not JSON: {e}"),
        }
    }

    #[test]
    fn openapi_document_describes_every_route_and_only_those() {
        let doc = doc();
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let mut declared = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                declared.insert((method.clone(), path.clone()));
                let id = op["operationId"].as_str().unwrap_or_default().to_string();
                assert!(!id.is_empty(), "{method} {path} has no operationId");
                assert!(ids.insert(id), "{method} {path}: operationId used twice");
            }
        }
        let routes: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(declared, routes, "openapi.json and ROUTES disagree");
        for (method, path) in ROUTES {
            assert!(
                handler(method, path).is_some(),
                "no handler for {method} {path}"
            );
        }
        assert_eq!(allowed_methods("/api/vms/{vm}"), "GET, PATCH, DELETE");
        assert_eq!(allowed_methods("/api/networks/order"), "PUT");
    }

    /// The names of `T`'s fields, from serde's own refusal of an unknown one.
    fn fields_of<T: Request>() -> BTreeSet<String> {
        let e = match serde_json::from_value::<T>(json!({ "\u{1}": 0 })) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} accepts unknown fields", T::SCHEMA),
        };
        if e.contains("there are no fields") {
            return BTreeSet::new();
        }
        let Some((_, expected)) = e.split_once("expected") else {
            panic!("{}: unexpected serde error {e}", T::SCHEMA)
        };
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// A value `schema` accepts, the simplest one.
    fn sample(schema: &Value) -> Value {
        if let Some(d) = schema.get("default") {
            return d.clone();
        }
        if let Some(e) = schema["enum"].get(0) {
            return e.clone();
        }
        if let Some(first) = schema["anyOf"].get(0) {
            return sample(first);
        }
        match schema["type"].as_str() {
            Some("integer") => schema["minimum"].clone(),
            Some("boolean") => json!(false),
            Some("array") => json!([]),
            Some("string") if schema["format"] == "ipv4" => json!("10.0.0.1"),
            Some("string") if schema["format"] == "ipv6" => json!("fd00::1"),
            Some("string") => json!("a"),
            other => panic!("no sample for {other:?}: {schema}"),
        }
    }

    fn code_of<T: Request>(body: &Value) -> Option<String> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        parse_json::<T>(&bytes).err().map(|e| {
            assert_eq!(e.status, 400, "{}: {body}: {e}", T::SCHEMA);
            e.code
        })
    }

    /// The document's schema of `T` against what the server does with
    /// bodies: the same fields, the same required ones, and every bound,
    /// enum and length it declares is the one the server checks.
    fn check_request<T: Request>() {
        let doc = doc();
        let schema = &doc["components"]["schemas"][T::SCHEMA];
        let name = T::SCHEMA;
        assert_eq!(schema["type"], "object", "{name}");
        assert_eq!(schema["additionalProperties"], false, "{name}");
        let empty = serde_json::Map::new();
        let props = schema["properties"].as_object().unwrap_or(&empty);
        let declared: BTreeSet<String> = props.keys().cloned().collect();
        assert_eq!(declared, fields_of::<T>(), "{name}: properties != fields");
        let required: BTreeSet<String> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect();

        // The required fields, and only they, make a body.
        let minimal: serde_json::Map<String, Value> = props
            .iter()
            .filter(|(k, _)| required.contains(*k))
            .map(|(k, v)| (k.clone(), sample(v)))
            .collect();
        let body = Value::Object(minimal.clone());
        assert_eq!(code_of::<T>(&body), None, "{name}: {body}");
        for r in &required {
            let mut without = minimal.clone();
            without.remove(r);
            let e = parse_json::<T>(&serde_json::to_vec(&without).unwrap_or_default()).err();
            assert!(
                e.is_some_and(|e| e.code == "invalid_request" && e.message.contains(r.as_str())),
                "{name}: {r} is required"
            );
        }
        // Every optional field alone, with its sample, is accepted.
        for (k, v) in props {
            let mut with = minimal.clone();
            with.insert(k.clone(), sample(v));
            assert_eq!(code_of::<T>(&Value::Object(with)), None, "{name}.{k}");
        }
        let with = |k: &str, v: Value| {
            let mut b = minimal.clone();
            b.insert(k.into(), v);
            Value::Object(b)
        };

        // Bounds: declared exactly where the server has one, and the same.
        for (k, p) in props {
            let int = p["type"] == "integer";
            let bound = requests::INTEGER_BOUNDS
                .iter()
                .find(|(s, f, _, _)| *s == name && f == k);
            assert_eq!(int, bound.is_some(), "{name}.{k}: integer without a bound");
            if let Some((_, _, min, max)) = bound {
                assert_eq!(p["minimum"].as_u64(), Some(*min), "{name}.{k} minimum");
                assert_eq!(p["maximum"].as_u64(), Some(*max), "{name}.{k} maximum");
                assert_eq!(code_of::<T>(&with(k, json!(min))), None, "{name}.{k}={min}");
                assert_eq!(code_of::<T>(&with(k, json!(max))), None, "{name}.{k}={max}");
                let below = json!(i128::from(*min) - 1);
                assert!(code_of::<T>(&with(k, below)).is_some(), "{name}.{k} < min");
                let above: Value = match serde_json::from_str(&(u128::from(*max) + 1).to_string()) {
                    Ok(v) => v,
                    Err(e) => panic!("{e}"),
                };
                assert!(code_of::<T>(&with(k, above)).is_some(), "{name}.{k} > max");
            }
            let values = requests::ENUMS
                .iter()
                .find(|(s, f, _)| *s == name && f == k)
                .map(|e| e.2);
            let listed: Option<Vec<&str>> = p["enum"]
                .as_array()
                .map(|e| e.iter().filter_map(Value::as_str).collect());
            assert_eq!(listed.as_deref(), values, "{name}.{k} enum");
            if values.is_some() {
                let code = code_of::<T>(&with(k, json!("bogus")));
                assert_eq!(code.as_deref(), Some("invalid_value"), "{name}.{k}");
            }
            let longest = requests::MAX_CHARS
                .iter()
                .find(|(s, f, _)| *s == name && f == k)
                .map(|m| m.2);
            assert_eq!(
                p["maxLength"].as_u64(),
                longest.map(|n| n as u64),
                "{name}.{k} maxLength"
            );
            if let Some(n) = longest {
                assert_eq!(
                    code_of::<T>(&with(k, json!("a".repeat(n)))),
                    None,
                    "{name}.{k}"
                );
                if !p["pattern"].is_string() {
                    // Characters, not bytes, as JSON Schema counts them.
                    assert_eq!(code_of::<T>(&with(k, json!("é".repeat(n)))), None);
                }
                assert!(code_of::<T>(&with(k, json!("a".repeat(n + 1)))).is_some());
            }
            if p["pattern"].is_string() {
                assert_eq!(p["pattern"], requests::NAME_PATTERN, "{name}.{k}");
                for bad in ["-a", "a b", "a/b", ""] {
                    assert!(
                        code_of::<T>(&with(k, json!(bad))).is_some(),
                        "{name}.{k}={bad:?}"
                    );
                }
            }
            if p["type"] == "string" && !p["enum"].is_array() && !p["pattern"].is_string() {
                // A free string: any one is the server's to resolve (404), not a 400.
                assert_eq!(
                    code_of::<T>(&with(k, json!("\u{0}x y"))),
                    None,
                    "{name}.{k}"
                );
            }
            // null is a value only where the document says so.
            let null = code_of::<T>(&with(k, Value::Null));
            if p["nullable"] == true {
                assert_eq!(null, None, "{name}.{k}=null");
            } else {
                assert_eq!(null.as_deref(), Some("invalid_request"), "{name}.{k}=null");
            }
        }
        // Anything but an object, and an unknown field, is invalid_request.
        for bad in [
            json!([null, null]),
            json!(null),
            json!(3),
            json!("x"),
            json!(true),
            json!([]),
        ] {
            assert_eq!(
                code_of::<T>(&bad).as_deref(),
                Some("invalid_request"),
                "{name}: {bad}"
            );
        }
        assert_eq!(
            code_of::<T>(&with("zzz", json!(1))).as_deref(),
            Some("invalid_request")
        );
    }

    #[test]
    fn request_schemas_match_what_the_server_accepts() {
        check_request::<requests::CreateVm>();
        check_request::<requests::StartVm>();
        check_request::<requests::VmPatch>();
        check_request::<requests::MoveVm>();
        check_request::<requests::Append>();
        check_request::<requests::PauseNode>();
        check_request::<requests::ResumeNode>();
        check_request::<requests::NetworkPatch>();
        check_request::<requests::NetworkOrder>();
        check_request::<requests::SettingsPatch>();
        check_request::<requests::MarkNodeDown>();
        check_request::<requests::RemoveNode>();
        check_request::<requests::Empty>();
        // Every schema the document gives a body is one of those.
        let doc = doc();
        let checked = [
            "CreateVm",
            "StartVm",
            "VmPatch",
            "MoveVm",
            "Append",
            "PauseNode",
            "ResumeNode",
            "NetworkPatch",
            "NetworkOrder",
            "SettingsPatch",
            "MarkNodeDown",
            "RemoveNode",
            "Empty",
        ];
        for (method, path) in ROUTES {
            let body = &doc["paths"][path][method]["requestBody"];
            if body.is_null() {
                continue;
            }
            let r = body["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .unwrap_or_default();
            let schema = r.trim_start_matches("#/components/schemas/");
            assert!(
                checked.contains(&schema),
                "{method} {path}: body {r} unchecked"
            );
        }
        // Each bound and enum names a property the document has.
        for (s, f, _, _) in requests::INTEGER_BOUNDS {
            assert!(
                doc["components"]["schemas"][s]["properties"][f].is_object(),
                "{s}.{f}"
            );
        }
        for (s, f, _) in requests::ENUMS {
            assert!(
                doc["components"]["schemas"][s]["properties"][f].is_object(),
                "{s}.{f}"
            );
        }
        // The gateway is an address or null.
        let gw = |g: Value| code_of::<requests::NetworkPatch>(&json!({ "gateway": g }));
        assert_eq!(gw(json!("fd00::1")), None);
        assert_eq!(gw(json!("false")).as_deref(), Some("invalid_value"));
    }

    #[test]
    fn bodies_are_classified() {
        let e = parse_json::<requests::MoveVm>(b"{not json").err();
        assert_eq!(e.map(|e| e.code), Some("malformed_json".into()));
        let e = parse_json::<requests::MoveVm>(br#"{"target": 3}"#).err();
        assert_eq!(e.map(|e| e.code), Some("invalid_request".into()));
        let e = parse_json::<requests::MoveVm>(br#"{"tagret": "node-2"}"#).err();
        assert_eq!(e.map(|e| e.code), Some("invalid_request".into()));
        let e = parse_json::<requests::SettingsPatch>(b"[null, null]").err();
        assert_eq!(e.map(|e| e.code), Some("invalid_request".into()));
        assert!(parse_json::<requests::MoveVm>(b"").is_ok());
    }
}
