//! The HTTP API's answers to bad requests — each with its status and stable
//! error code, and none reaching the cluster store — and its other fixtures:
//! the event stream, metrics, the OpenAPI document, the dashboard page.
//! Every answer, good or bad, is checked against the OpenAPI document the
//! node serves: the status is declared for the operation and the body
//! matches the declared schema. One node started in this process through
//! the library.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry::client::Client;
use ferry::views::{EstimateView, NodeView, SettingsView, StatusView, VmView};
use serde_json::Value;
use std::time::Duration;

/// The route of `path` in `ferry::api::ROUTES` (`/api/vms/web-1` →
/// `/api/vms/{vm}`); a fixed segment wins over a parameter, as in routing.
fn route_of(path: &str) -> Option<&'static str> {
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.split('/').collect();
    let matches = |route: &str| {
        let r: Vec<&str> = route.split('/').collect();
        r.len() == segs.len()
            && r.iter()
                .zip(&segs)
                .all(|(a, b)| a == b || (a.starts_with('{') && !b.is_empty()))
    };
    // The first path that matches (ROUTES lists fixed paths first) decides,
    // whatever the method: that is the resource that answers.
    ferry::api::ROUTES
        .iter()
        .map(|(_, r)| *r)
        .find(|r| matches(r))
}

/// Checks `value` against an OpenAPI 3.0 schema (the keywords the document
/// uses; `pattern` and `format` are left to the schemathesis run).
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let target = doc
            .pointer(r.trim_start_matches('#'))
            .ok_or(format!("{at}: no {r}"))?;
        return conforms(doc, target, value, at);
    }
    if value.is_null() && schema["nullable"] == true {
        return Ok(());
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            conforms(doc, s, value, at)?;
        }
    }
    if let Some(any) = schema["anyOf"].as_array() {
        if !any.iter().any(|s| conforms(doc, s, value, at).is_ok()) {
            return Err(format!("{at}: {value} matches no anyOf branch"));
        }
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(value) {
            return Err(format!("{at}: {value} not in {schema}"));
        }
    }
    let ok = match schema["type"].as_str() {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(other) => return Err(format!("{at}: unknown type {other}")),
    };
    if !ok {
        return Err(format!("{at}: {value} is not {}", schema["type"]));
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m)
            || schema["maximum"].as_f64().is_some_and(|m| n > m)
        {
            return Err(format!("{at}: {value} out of bounds"));
        }
    }
    if let Some(s) = value.as_str() {
        let n = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|m| n < m)
            || schema["maxLength"].as_u64().is_some_and(|m| n > m)
        {
            return Err(format!("{at}: {value} has the wrong length"));
        }
    }
    if let Some(items) = value.as_array() {
        for (i, v) in items.iter().enumerate() {
            conforms(doc, &schema["items"], v, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(obj) = value.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap_or_default();
            if !obj.contains_key(r) {
                return Err(format!("{at}: missing {r}"));
            }
        }
        for (k, v) in obj {
            let at = format!("{at}.{k}");
            match schema["properties"].get(k) {
                Some(p) => conforms(doc, p, v, &at)?,
                None if schema["additionalProperties"] == false => {
                    return Err(format!("{at}: not in the schema"))
                }
                None if schema["additionalProperties"].is_object() => {
                    conforms(doc, &schema["additionalProperties"], v, &at)?
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// The answer `r` to `method path` is one the document declares: its status
/// among the operation's responses (or 405 with `Allow` for a method the
/// path lacks), its body of the declared schema.
fn check_against_document(doc: &Value, method: &str, path: &str, r: &ferry::client::Response) {
    let Some(route) = route_of(path) else {
        assert_eq!(r.status, 404, "{method} {path}: no route, so 404");
        return;
    };
    let op = &doc["paths"][route][method.to_ascii_lowercase()];
    if op.is_null() {
        assert_eq!(r.status, 405, "{method} {path}: undeclared method");
        assert_eq!(
            r.header("allow"),
            Some(ferry::api::allowed_methods(route).as_str()),
            "{method} {path}: Allow"
        );
        return;
    }
    let mut resp = &op["responses"][r.status.to_string()];
    assert!(
        resp.is_object(),
        "{method} {route}: status {} is not declared: {}",
        r.status,
        r.text()
    );
    if let Some(reference) = resp["$ref"].as_str() {
        resp = doc.pointer(reference.trim_start_matches('#')).unwrap();
    }
    match resp["content"]["application/json"]["schema"] {
        Value::Null => assert!(
            r.status == 204 || resp["content"].is_object(),
            "{method} {route}: {} has a body the document does not declare",
            r.status
        ),
        ref schema => {
            let body = r
                .json()
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON: {e}"));
            if let Err(e) = conforms(doc, schema, &body, "body") {
                panic!("{method} {path} → {}: {e}\n{body}", r.status);
            }
        }
    }
}

fn served_document() -> Value {
    serde_json::from_str(ferry::api::OPENAPI_JSON).unwrap()
}

/// `method path` answers 2xx, as the document says it may.
fn expect_ok(c: &Client, method: &str, path: &str, body: Option<Value>) -> Value {
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
    let r = c.request(method, path, bytes.as_deref()).unwrap();
    assert!(
        (200..300).contains(&r.status),
        "{method} {path}: {}",
        r.text()
    );
    check_against_document(&served_document(), method, path, &r);
    r.json().unwrap_or(Value::Null)
}

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
    check_against_document(&served_document(), method, path, &r);
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
    let config = ferry::config::NodeConfig::load(&cluster.configs[0]).unwrap();
    let created = expect_ok(
        &api,
        "POST",
        "/api/vms",
        Some(serde_json::json!({ "name": "web-1", "memory_mib": 16 })),
    );
    let created: VmView = serde_json::from_value(created).unwrap();
    assert_eq!(created.state, "running");
    assert!(created.restart && created.priority == 0, "{created:?}");
    // Every read answers what the document says it does.
    for path in [
        "/api/status",
        "/api/nodes",
        "/api/nodes/node-1",
        "/api/vms",
        "/api/vms/web-1",
        "/api/vms/web-1/estimate",
        "/api/networks",
        "/api/settings",
        "/api/migrations",
        "/api/tips",
    ] {
        expect_ok(&api, "GET", path, None);
    }
    // The estimate says what it rests on: the dirty rate sampled from the
    // guest's dirty log just now; with no other node to probe, the bandwidth
    // assumed, and said to be.
    let estimate: EstimateView = api.get("/api/vms/web-1/estimate").unwrap();
    assert_eq!(estimate.dirty_rate_source, "sampled", "{estimate:?}");
    assert!(
        estimate.sample_window_ms.is_some_and(|w| w >= 300.0)
            && estimate.dirty_rate_basis.contains("dirty log"),
        "{estimate:?}"
    );
    assert_eq!(estimate.bandwidth_source, "assumed", "{estimate:?}");
    assert!(
        estimate.bandwidth_basis.contains("no node to move to"),
        "{estimate:?}"
    );
    assert_eq!(estimate.target, None);
    assert!(
        estimate
            .nonzero_pages
            .is_some_and(|p| p <= estimate.memory_bytes / 4096),
        "{estimate:?}"
    );
    // A target can be named; not an unknown one, nor the VM's own node.
    expect_error(
        &api,
        "GET",
        "/api/vms/web-1/estimate?to=node-9",
        None,
        404,
        "unknown_node",
    );
    expect_error(
        &api,
        "GET",
        "/api/vms/web-1/estimate?to=node-1",
        None,
        409,
        "same_source_and_target",
    );
    expect_ok(&api, "PATCH", "/api/settings", Some(serde_json::json!({})));
    let applied = |c: &Client| c.get::<StatusView>("/api/status").unwrap().last_applied;
    let before = applied(&api);

    // No token, or the wrong one.
    let anonymous = Client::for_node_with(&config, None).unwrap();
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
    let wrong =
        Client::for_node_with(&config, Some("0123456789abcdef0123456789abcdef".into())).unwrap();
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
    // Bodies that are not an object, and values outside the declared bounds.
    for bad in [&b"[null, null]"[..], b"null", b"3", b"\"x\"", b"[]"] {
        expect_error(
            &api,
            "PATCH",
            "/api/settings",
            Some(bad),
            400,
            "invalid_request",
        );
    }
    expect_error(
        &api,
        "POST",
        "/api/vms/web-1/append",
        Some(b"[\"a record\"]"),
        400,
        "invalid_request",
    );
    expect_error(
        &api,
        "POST",
        "/api/vms/web-1/stop",
        Some(b"{\"now\": true}"),
        400,
        "invalid_request",
    );
    for (path, body) in [
        ("/api/settings", &b"{\"max_migrations_per_node\": 0}"[..]),
        ("/api/settings", b"{\"downtime_limit_ms\": 0}"),
        ("/api/settings", b"{\"bandwidth_cap_bytes_per_sec\": 0}"),
        ("/api/networks/mig-1", b"{\"gateway\": \"false\"}"),
    ] {
        expect_error(&api, "PATCH", path, Some(body), 400, "invalid_value");
    }
    expect_error(
        &api,
        "PATCH",
        "/api/settings",
        Some(b"{\"failure_detection_ms\": 999}"),
        400,
        "invalid_value",
    );
    for body in [
        &b"{\"name\": \"x\", \"memory_mib\": 65537}"[..],
        b"{\"name\": \"x\", \"vcpus\": 65}",
        b"{\"name\": \"x\", \"tcp_connections\": 65536}",
        b"{\"name\": \"x\", \"priority\": 1001}",
    ] {
        expect_error(&api, "POST", "/api/vms", Some(body), 400, "invalid_value");
    }
    let long = format!(
        "{{\"record\": \"{}\"}}",
        "r".repeat(ferry::requests::RECORD_MAX_CHARS + 1)
    );
    expect_error(
        &api,
        "POST",
        "/api/vms/web-1/append",
        Some(long.as_bytes()),
        400,
        "invalid_value",
    );
    let long = format!(
        "{{\"reason\": \"{}\"}}",
        "r".repeat(ferry::requests::REASON_MAX_CHARS + 1)
    );
    expect_error(
        &api,
        "POST",
        "/api/nodes/node-1/down",
        Some(long.as_bytes()),
        400,
        "invalid_value",
    );
    expect_error(
        &api,
        "POST",
        "/api/nodes/node-1/down",
        Some(b"{\"confirmed_dead\": \"yes\"}"),
        400,
        "invalid_request",
    );
    expect_error(
        &api,
        "POST",
        "/api/migrations/12345/abort",
        Some(b"{\"now\": true}"),
        400,
        "invalid_request",
    );
    // A method a path lacks: 405 with the path's methods in Allow.
    for (method, path) in [
        ("TRACE", "/api/vms"),
        ("PUT", "/api/vms/web-1"),
        ("OPTIONS", "/api/settings"),
        ("GET", "/api/networks/order"),
    ] {
        expect_error(&api, method, path, None, 405, "method_not_allowed");
    }
    let r = api.request("TRACE", "/api/vms/web-1", None).unwrap();
    assert_eq!(r.header("allow"), Some("GET, PATCH, DELETE"));
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
        "POST",
        "/api/migrations/12345/abort",
        None,
        404,
        "unknown_migration",
    );
    expect_error(
        &api,
        "POST",
        "/api/migrations/nope/abort",
        Some(b"{}"),
        404,
        "unknown_migration",
    );
    expect_error(
        &api,
        "POST",
        "/api/nodes/node-7/down",
        Some(b"{}"),
        404,
        "unknown_node",
    );
    expect_error(
        &api,
        "GET",
        "/api/nodes/node-1/down",
        None,
        405,
        "method_not_allowed",
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

    // A live node is not declared down: it renewed its lease, so it may
    // still run its VMs. Nothing changes.
    for body in [None, Some(&b"{\"reason\": \"maintenance\"}"[..])] {
        expect_error(
            &api,
            "POST",
            "/api/nodes/node-1/down",
            body,
            409,
            "node_alive",
        );
    }
    let n1: NodeView = api.get("/api/nodes/node-1").unwrap();
    assert_eq!(n1.state, "up", "{n1:?}");
    assert_eq!((n1.down_reason, n1.down_since_ms), (None, None));
    let web: VmView = api.get("/api/vms/web-1").unwrap();
    assert_eq!((web.state.as_str(), web.owner), ("running", 1));
    // The answering node shows its lease, which it holds while it runs VMs.
    wait_for("node-1 to hold its lease", Duration::from_secs(10), || {
        let s: StatusView = api.get("/api/status").ok()?;
        (s.failover.leased && s.failover.lease_left_ms > 0).then_some(())
    });

    // The failure-detection timeout is a setting.
    let set = expect_ok(
        &api,
        "PATCH",
        "/api/settings",
        Some(serde_json::json!({ "failure_detection_ms": 5000 })),
    );
    assert_eq!(set["failure_detection_ms"], 5000);
    let shown: SettingsView = api.get("/api/settings").unwrap();
    assert_eq!(shown.failure_detection_ms, 5000);

    // The longest record the document allows, in the widest characters,
    // is one the guest's service takes.
    let widest = "\u{1F600}".repeat(ferry::requests::RECORD_MAX_CHARS);
    expect_ok(
        &api,
        "POST",
        "/api/vms/web-1/append",
        Some(serde_json::json!({ "record": widest })),
    );

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
        // Ends when the node shuts down (the connection closes under it).
        for e in events.map_while(Result::ok) {
            if tx.send(e).is_err() {
                return;
            }
        }
    });
    let db = expect_ok(
        &api,
        "POST",
        "/api/vms",
        Some(serde_json::json!({
            "name": "db-1", "memory_mib": 16, "start": false,
            "restart": false, "priority": 1000
        })),
    );
    assert_eq!(
        (&db["restart"], &db["priority"]),
        (&false.into(), &1000.into())
    );
    let change = loop {
        let e = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let data: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        if e.event == "change" && data["command"] == "CreateVm" {
            break data;
        }
    };
    assert_eq!(change["ok"], true);
    expect_error(&anonymous, "GET", "/api/events", None, 401, "unauthorized");
    // A VM that is off has no service: a conflict, not an outage.
    expect_error(
        &api,
        "POST",
        "/api/vms/db-1/append",
        Some(b"{\"record\": \"r\"}"),
        409,
        "vm_not_running",
    );
    expect_ok(&api, "DELETE", "/api/vms/db-1", None);
    let token = api.token.clone().unwrap();
    let by_query = Client::for_node_with(&config, None).unwrap();
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
