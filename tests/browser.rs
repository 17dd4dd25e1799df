//! The dashboard in a real headless browser (Debian's chromium), driven over
//! the DevTools protocol: it shows a migration's progress (percent, phase and
//! the per-round chart of dirty pages and throughput), and a click on a
//! node's Drain button starts a drain that empties the node.
//!
//! Three nodes run in this process through the library (the same `Node` the
//! daemon runs), each serving the API; the browser talks to node 1.
//! Without chromium the test prints a SKIPPED line and passes, unless
//! `FERRY_CI_PROVIDES` names `browser` (CI installs chromium), where it fails.
#![allow(clippy::unwrap_used)]

mod common;

use common::cdp::{find_chromium, Browser};
use common::*;
use ferry::views::{NodeView, VmView};
use std::time::{Duration, Instant};

/// Whether CI (`.ci/run`) promises `what` in `FERRY_CI_PROVIDES`: then a
/// test that needs it fails instead of skipping without it.
fn ci_provides(what: &str) -> bool {
    std::env::var("FERRY_CI_PROVIDES")
        .is_ok_and(|list| list.split(',').any(|item| item.trim() == what))
}

#[test]
fn dashboard_shows_progress_and_a_click_on_drain_starts_a_drain() {
    let Some(chromium) = find_chromium() else {
        let reason = "no chromium on PATH (apt-get install -y chromium)";
        if ci_provides("browser") {
            panic!("FERRY_CI_PROVIDES says it provides browser, but: {reason}");
        }
        println!("SKIPPED dashboard_shows_progress_and_a_click_on_drain_starts_a_drain: {reason}");
        return;
    };
    let started = Instant::now();
    let dir = TempDir::new("browser");
    let cluster = InProcess::start(&dir.0, 3, 45, 46);
    let api = client(&cluster.configs[0]);
    for (name, node, mib, rate) in [
        ("web-1", "node-1", 192, 30_000),
        ("db-1", "node-2", 48, 1_000),
    ] {
        let _: VmView = api
            .post(
                "/api/vms",
                &serde_json::json!({
                    "name": name, "node": node, "memory_mib": mib,
                    "dirty_pages_per_sec": rate, "pattern": "uniform"
                }),
            )
            .unwrap();
    }
    let url = format!("{}/?token={}", api.url(), api.token.clone().unwrap());
    let config = ferry::config::NodeConfig::load(&cluster.configs[0]).unwrap();
    let pin = spki_pin(config.api.cert.as_ref().unwrap());
    let mut browser = Browser::launch(
        &chromium,
        &dir.0.join("profile"),
        &url,
        &[format!("--ignore-certificate-errors-spki-list={pin}")],
    );
    browser.wait_for(
        "the dashboard to load and follow the event stream",
        "document.body.dataset.loaded === '1' && document.body.dataset.live === '1' \
         && document.querySelectorAll('#nodes tr[data-node]').length === 3",
        Duration::from_secs(30),
    );
    // The token left the address bar.
    assert_eq!(browser.eval("location.search"), "");
    assert_eq!(
        browser.eval("document.querySelector('#vms tr[data-vm=\"web-1\"]').dataset.owner"),
        "node-1"
    );

    // Move web-1 to node 3 with the dashboard's own controls.
    browser.eval("document.getElementById('target-web-1').value = 'node-3'");
    browser.click("#move-web-1");
    // Its progress shows: phases as they come, then completion with the chart.
    let sel = "document.querySelector('[data-migration][data-vm=\"web-1\"]')";
    let mut phases = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = browser.eval(&format!(
            "(() => {{ const m = {sel}; return m ? [m.dataset.phase, m.dataset.percent, \
             m.querySelector('svg.chart').dataset.rounds] : null; }})()"
        ));
        if let Some(v) = seen.as_array() {
            let phase = v[0].as_str().unwrap().to_string();
            if phases.last() != Some(&phase) {
                println!("dashboard: web-1 {phase} {}% ({} rounds drawn)", v[1], v[2]);
                phases.push(phase.clone());
            }
            if phase == "completed" {
                assert_eq!(v[1], "100");
                assert!(v[2].as_str().unwrap().parse::<u32>().unwrap() >= 1);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the move did not complete: {phases:?}"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    let dots = browser.eval(&format!("{sel}.querySelectorAll('circle.dirty').length"));
    assert!(dots.as_u64().unwrap() >= 1, "no round on the chart");
    let summary = browser.wait_for(
        "the move's measured figures",
        &format!("{sel}.textContent.includes('ms blackout') && {sel}.textContent"),
        Duration::from_secs(10),
    );
    println!(
        "dashboard: {}",
        summary
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    let web: VmView = api.get("/api/vms/web-1").unwrap();
    assert_eq!(web.owner, 3);
    browser.wait_for(
        "the VM table to show web-1 on node-3",
        "document.querySelector('#vms tr[data-vm=\"web-1\"]').dataset.owner === 'node-3'",
        Duration::from_secs(10),
    );

    // A click on node-2's Drain button drains it.
    browser.click("#drain-node-2");
    let n2: NodeView = wait_for("node-2 to drain", Duration::from_secs(60), || {
        let n: NodeView = api.get("/api/nodes/node-2").ok()?;
        (n.drain == "drained").then_some(n)
    });
    assert_eq!(n2.state, "paused");
    // The answering node's replica may trail the drained node's by a commit.
    let db: VmView = wait_for("db-1 to leave node-2", Duration::from_secs(20), || {
        let v: VmView = api.get("/api/vms/db-1").ok()?;
        (v.owner != 2).then_some(v)
    });
    assert_ne!(db.owner, 2, "db-1 still on the drained node");
    browser.wait_for(
        "the dashboard to show node-2 paused and drained",
        "(() => { const n = document.querySelector('#nodes tr[data-node=\"node-2\"]'); \
         return n.dataset.state === 'paused' && n.dataset.drain === 'drained' \
         && !!document.getElementById('resume-node-2'); })()",
        Duration::from_secs(10),
    );
    println!("browser test took {:.1?}", started.elapsed());
}

/// The base64 SHA-256 of the public key of the API certificate in `api_pem`:
/// what `--ignore-certificate-errors-spki-list` takes. Chromium then accepts
/// the certificates carrying this one key (the test node's API) and still
/// refuses every other certificate error, where `--ignore-certificate-errors`
/// would accept any certificate from anyone; trusting the cluster CA itself
/// would need an NSS database written with certutil, which the test machine
/// need not have.
fn spki_pin(api_pem: &std::path::Path) -> String {
    let pem = std::fs::read_to_string(api_pem).unwrap();
    // api.pem is the certificate, then the key.
    let key_at = pem.find("-----BEGIN PRIVATE KEY-----").unwrap();
    let key = rcgen::KeyPair::from_pem(&pem[key_at..]).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let provider = ferry::transport::crypto_provider();
    let Some(rustls::SupportedCipherSuite::Tls13(suite)) = provider.cipher_suites.first() else {
        panic!("no TLS 1.3 suite to hash with")
    };
    let digest = suite.common.hash_provider.hash(&spki);
    base64(digest.as_ref())
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
