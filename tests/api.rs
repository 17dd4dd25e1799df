//! The HTTP API's answers to bad requests — each with its status and stable
//! error code, and none reaching the cluster store — and its other fixtures:
//! the event stream, metrics, the OpenAPI document, the dashboard page.
//! One node started in this process through the library.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry::client::Client;
use ferry::views::{StatusView, VmView};
use std::time::Duration;

fn expect_error(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    status: u16,
    code: &str,
) {
    let r = c.request(method, path, body).unwrap();
    assert_eq!(r.status, status, "{method} {path}: {}", r.text());
    let json = r
        .json()
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.text()));
    assert_eq!(json["code"], code, "{method} {path}: {json}");
    assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[test]
fn bad_requests_get_stable_error_codes_and_never_reach_the_store() {
    let dir = TempDir::new("api");
    let cluster = InProcess::start(&dir.0, 1, 43, 44);
    let api = client(&cluster.configs[0]);
    let created: VmView = api
        .post(
            "/api/vms",
            &serde_json::json!({ "name": "web-1", "memory_mib": 16 }),
        )
        .unwrap();
    assert_eq!(created.state, "running");
    let applied = |c: &Client| c.get::<StatusView>("/api/status").unwrap().last_applied;
    let before = applied(&api);

    // No token, or the wrong one.
    let anonymous = Client::new(&api.addr, None);
    expect_error(&anonymous, "GET", "/api/vms", None, 401, "unauthorized");
    expect_error(
        &anonymous,
        "POST",
        "/api/vms/web-1/move",
        Some(b"{}"),
        401,
        "unauthorized",
    );
    expect_error(&anonymous, "GET", "/metrics", None, 401, "unauthorized");
    let wrong = Client::new(&api.addr, Some("0123456789abcdef0123456789abcdef".into()));
    expect_error(&wrong, "GET", "/api/status", None, 401, "unauthorized");

    // Malformed JSON, and JSON of the wrong shape.
    expect_error(
        &api,
        "POST",
        "/api/vms",
        Some(b"{\"name\": "),
        400,
        "malformed_json",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms/web-1/move",
        Some(b"not json"),
        400,
        "malformed_json",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms",
        Some(b"{\"memory_mib\": 64}"),
        400,
        "invalid_request",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms/web-1/move",
        Some(b"{\"tagret\": \"node-2\"}"),
        400,
        "invalid_request",
    );
    expect_error(
        &api,
        "POST",
        "/api/nodes/node-1/pause",
        Some(b"{\"drain\": \"yes\"}"),
        400,
        "invalid_request",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms",
        Some(b"{\"name\": \"a b\"}"),
        400,
        "invalid_name",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms",
        Some(b"{\"name\": \"x\", \"memory_mib\": 1}"),
        400,
        "invalid_value",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms",
        Some(b"{\"name\": \"x\", \"backend\": \"xen\"}"),
        400,
        "invalid_value",
    );
    expect_error(
        &api,
        "PATCH",
        "/api/settings",
        Some(b"{\"pro_tip_mode\": \"sometimes\"}"),
        400,
        "invalid_value",
    );
    let huge = vec![b' '; ferry::api::BODY_LIMIT + 1];
    expect_error(
        &api,
        "POST",
        "/api/vms",
        Some(&huge),
        413,
        "payload_too_large",
    );

    // Unknown things.
    expect_error(&api, "GET", "/api/vms/nope", None, 404, "unknown_vm");
    expect_error(
        &api,
        "POST",
        "/api/vms/nope/move",
        Some(b"{}"),
        404,
        "unknown_vm",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms/web-1/move",
        Some(b"{\"target\": \"node-7\"}"),
        404,
        "unknown_node",
    );
    expect_error(
        &api,
        "POST",
        "/api/nodes/node-7/pause",
        Some(b"{}"),
        404,
        "unknown_node",
    );
    expect_error(
        &api,
        "GET",
        "/api/migrations/12345",
        None,
        404,
        "unknown_migration",
    );
    expect_error(
        &api,
        "POST",
        "/api/tips/99/accept",
        None,
        404,
        "unknown_tip",
    );
    expect_error(
        &api,
        "PATCH",
        "/api/networks/nope",
        Some(b"{\"migration\": \"allow\"}"),
        404,
        "unknown_network",
    );
    expect_error(&api, "GET", "/api/nothing-here", None, 404, "not_found");
    expect_error(
        &api,
        "DELETE",
        "/api/nodes",
        None,
        405,
        "method_not_allowed",
    );

    // None of that reached the cluster store.
    assert_eq!(applied(&api), before, "a refused request changed the store");

    // Refusals by the store keep the store's name for them.
    expect_error(
        &api,
        "POST",
        "/api/vms/web-1/move",
        Some(b"{}"),
        409,
        "no_eligible_target",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms/web-1/move",
        Some(b"{\"target\": \"node-1\"}"),
        409,
        "same_source_and_target",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms/web-1/cancel",
        None,
        409,
        "not_migrating",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms",
        Some(b"{\"name\": \"web-1\"}"),
        409,
        "vm_exists",
    );
    expect_error(&api, "DELETE", "/api/vms/web-1", None, 409, "vm_not_off");
    let net: serde_json::Value = api
        .call(
            "PATCH",
            "/api/networks/mig-1",
            Some(&serde_json::json!({ "migration": "forbid" })),
        )
        .unwrap();
    assert_eq!(net["allowed"], false);
    expect_error(
        &api,
        "PATCH",
        "/api/networks/mig-2",
        Some(b"{\"migration\": \"forbid\"}"),
        409,
        "no_migration_network_left",
    );

    // The event stream carries the store's changes as they apply.
    let events = api.events("/api/events").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for e in events {
            if tx.send(e.unwrap()).is_err() {
                return;
            }
        }
    });
    let _: VmView = api
        .post(
            "/api/vms",
            &serde_json::json!({ "name": "db-1", "memory_mib": 16, "start": false }),
        )
        .unwrap();
    let change = loop {
        let e = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let data: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        if e.event == "change" && data["command"] == "CreateVm" {
            break data;
        }
    };
    assert_eq!(change["ok"], true);
    expect_error(&anonymous, "GET", "/api/events", None, 401, "unauthorized");
    let token = api.token.clone().unwrap();
    let by_query = Client::new(&api.addr, None);
    assert!(by_query
        .events(&format!("/api/events?access_token={token}"))
        .is_ok());

    // Metrics, the OpenAPI document and the dashboard.
    let metrics = api.request("GET", "/metrics", None).unwrap();
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(text.contains("ferry_vms{state=\"running\"} 1"), "{text}");
    assert!(text.contains("ferry_raft_leader 1"), "{text}");
    assert!(
        text.contains("# TYPE ferry_api_requests_total counter"),
        "{text}"
    );
    let doc = anonymous.request("GET", "/api/openapi.json", None).unwrap();
    assert_eq!(doc.status, 200);
    assert!(doc.json().unwrap()["paths"]["/api/vms/{vm}/move"]["post"].is_object());
    let page = anonymous.request("GET", "/", None).unwrap();
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("Live migrations"));
}
