//! The HTTP API over HTTPS with role tokens: it answers over TLS with the
//! cluster CA's certificate; plain HTTP, a wrong token, the read-only token
//! on a write, a token in the URL outside the event stream, a client
//! certificate from a foreign CA and a server certificate the client does
//! not trust are each refused with a clear error. One node started in this
//! process through the library.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry::client::{Client, ClientError};
use ferry::config::NodeConfig;
use ferry::transport::ClusterCa;
use ferry::views::{StatusView, VmView};
use serde_json::{json, Value};

fn status_of(c: &Client, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
    let r = c.request(method, path, body).unwrap();
    (r.status, r.json().unwrap_or(Value::Null))
}

#[test]
fn the_api_speaks_https_and_refuses_what_it_should() {
    let dir = TempDir::new("api-tls");
    let cluster = InProcess::start(&dir.0, 1, 87, 88);
    let config = NodeConfig::load(&cluster.configs[0]).unwrap();
    let ca_pem = std::fs::read_to_string(config.api.ca.as_ref().unwrap()).unwrap();
    let read_token = config.api.read_token.clone().unwrap();

    // Over HTTPS, trusting the cluster CA `cluster init` wrote.
    let operator = Client::for_node(&config).unwrap();
    assert!(operator.is_https());
    let before = operator
        .get::<StatusView>("/api/status")
        .unwrap()
        .last_applied;
    // By the names the certificate carries besides the listen address.
    let port = config.api.listen.port();
    let by_name = Client::https(
        &format!("https://localhost:{port}"),
        Some(config.api.token.clone()),
        &ca_pem,
    )
    .unwrap();
    assert!(by_name.get::<StatusView>("/api/status").is_ok());

    // Plain HTTP to the HTTPS port: refused before any handshake, in words.
    let plain = Client::new(
        &config.api.listen.to_string(),
        Some(config.api.token.clone()),
    );
    let r = plain.request("GET", "/api/status", None).unwrap();
    let body = r.json().unwrap();
    assert_eq!(
        (r.status, body["code"].as_str()),
        (400, Some("https_required")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("this API speaks HTTPS: use https://"),
        "{body}"
    );

    // A wrong token: 401.
    let wrong =
        Client::for_node_with(&config, Some("0123456789abcdef0123456789abcdef".into())).unwrap();
    let (status, body) = status_of(&wrong, "GET", "/api/status", None);
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );

    // The read-only token reads…
    let reader = Client::for_node_with(&config, Some(read_token.clone())).unwrap();
    assert_eq!(reader.get::<Vec<VmView>>("/api/vms").unwrap().len(), 0);
    let (status, _) = status_of(&reader, "GET", "/metrics", None);
    assert_eq!(status, 200);
    // …and is refused every write with 403, which changes nothing.
    let create =
        serde_json::to_vec(&json!({"name": "web-1", "node": "node-1", "memory_mib": 64})).unwrap();
    let (status, body) = status_of(&reader, "POST", "/api/vms", Some(&create));
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("operator token"),
        "{body}"
    );
    let (status, _) = status_of(&reader, "PATCH", "/api/settings", Some(b"{}"));
    assert_eq!(status, 403);
    assert_eq!(reader.get::<Vec<VmView>>("/api/vms").unwrap().len(), 0);
    assert_eq!(
        operator
            .get::<StatusView>("/api/status")
            .unwrap()
            .last_applied,
        before,
        "a refused write reached the store"
    );
    // The operator's token writes.
    let (status, body) = status_of(&operator, "POST", "/api/vms", Some(&create));
    assert_eq!(status, 201, "{body}");

    // A token in the URL: refused on a normal endpoint, taken on the event stream.
    let anonymous = Client::for_node_with(&config, None).unwrap();
    let (status, body) = status_of(
        &anonymous,
        "GET",
        &format!("/api/vms?access_token={}", config.api.token),
        None,
    );
    assert_eq!(status, 401, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("only on /api/events"),
        "{body}"
    );
    let mut events = anonymous
        .events(&format!("/api/events?access_token={read_token}"))
        .unwrap();
    let (status, _) = status_of(&operator, "POST", "/api/vms/web-1/stop", Some(b"{}"));
    assert!(status < 500);
    assert!(events.next().is_some(), "the event stream sent nothing");

    // A client certificate from the cluster CA is accepted…
    let creds = ferry::transport::NodeCredentials::from_pem(
        &std::fs::read_to_string(&config.credentials).unwrap(),
    )
    .unwrap();
    let member = Client::for_node(&config)
        .unwrap()
        .with_identity(&ca_pem, &creds.cert_pem, &creds.key_pem)
        .unwrap();
    assert!(member.get::<StatusView>("/api/status").is_ok());
    // …one from a foreign CA is refused in the handshake.
    let foreign = ClusterCa::generate("intruders").unwrap().issue(1).unwrap();
    let intruder = Client::for_node(&config)
        .unwrap()
        .with_identity(&ca_pem, &foreign.cert_pem, &foreign.key_pem)
        .unwrap();
    let e = intruder.get::<Value>("/api/status").unwrap_err();
    assert!(
        matches!(&e, ClientError::Tls { what, .. } if what.contains("refused this client's certificate")),
        "{e}"
    );

    // A client that trusts another CA refuses the API's certificate.
    let other_ca = ClusterCa::generate("elsewhere").unwrap().cert_pem();
    let misled = Client::https(
        &config.api.listen.to_string(),
        Some(config.api.token.clone()),
        &other_ca,
    )
    .unwrap();
    let e = misled.get::<Value>("/api/status").unwrap_err();
    assert!(
        matches!(&e, ClientError::Tls { what, .. } if what.contains("not signed by the cluster CA")),
        "{e}"
    );

    // The CLI: https by default from the configuration; http:// is told plainly.
    let run = cli(&cluster.configs[0], &["vm", "list"]);
    assert_eq!(run.code, 0, "{run:?}");
    let run = cli(
        &cluster.configs[0],
        &[
            "--api",
            &format!("http://{}", config.api.listen),
            "vm",
            "list",
        ],
    );
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("this API speaks HTTPS"), "{run:?}");
}

#[test]
fn a_plain_api_beyond_loopback_is_warned_about() {
    let mut api = ferry::config::ApiConfig {
        listen: "10.0.0.5:7701".parse().unwrap(),
        token: "0123456789abcdef".into(),
        read_token: None,
        tls: true,
        cert: None,
        ca: None,
    };
    assert_eq!(ferry::daemon::plain_api_warning(&api), None);
    api.tls = false;
    let w = ferry::daemon::plain_api_warning(&api).unwrap();
    assert!(w.starts_with("WARNING") && w.contains("WITHOUT TLS"), "{w}");
    api.listen = "127.0.0.1:7701".parse().unwrap();
    assert!(!ferry::daemon::plain_api_warning(&api)
        .unwrap()
        .contains("WARNING"));
}
