//! Certificates that expire and that are revoked, and a membership gate: each
//! refused in both directions with an error that says why, while the other
//! peers keep being served.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{addr, start_node};
use ferry_transport::identity::Validity;
use ferry_transport::{handler_fn, Admission, ClusterCa, NetworkConfig, NodeId, RpcError, RpcNode};

const T: Duration = Duration::from_secs(5);

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn register_echo(node: &RpcNode) {
    node.register("echo", handler_fn(|_, req| async move { Ok(req) }));
}

async fn start_with(ca: &ClusterCa, id: NodeId, validity: Validity) -> Arc<RpcNode> {
    let creds = ca.issue_with(id, validity).unwrap();
    RpcNode::start(creds, vec![addr(1, id as u8)], NetworkConfig::loopback())
        .await
        .unwrap()
}

async fn echo(from: &RpcNode, to: NodeId, addrs: &[SocketAddr]) -> Result<Vec<u8>, RpcError> {
    from.call(to, addrs, "echo", b"hi".to_vec(), T).await
}

fn refused_for(r: &Result<Vec<u8>, RpcError>, why: &str) {
    match r {
        Err(RpcError::PeerIdentity(msg)) => assert!(
            msg.to_lowercase().contains(why),
            "refusal does not say {why:?}: {msg}"
        ),
        other => panic!("expected a refused identity ({why}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_both_ways() {
    let ca = ClusterCa::generate("expiry").unwrap();
    let a = start_node(&ca, 1, &[1], NetworkConfig::loopback()).await;
    let now = now_s();
    let expired = start_with(&ca, 2, Validity::from_unix(now - 7200, now - 3600)).await;
    register_echo(&a);
    register_echo(&expired);

    // The expired node dials: the member's handshake refuses its certificate.
    let r = echo(&expired, 1, &a.local_addrs()).await;
    refused_for(&r, "expired");
    // The member dials the expired node: its own verifier refuses the server.
    let r = echo(&a, 2, &expired.local_addrs()).await;
    refused_for(&r, "expired");
    assert!(a.stats().connections_refused >= 1);

    // A certificate that became valid an hour ago is fine.
    let fresh = start_with(&ca, 3, Validity::from_unix(now - 3600, now + 3600)).await;
    assert_eq!(echo(&fresh, 1, &a.local_addrs()).await.unwrap(), b"hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_refused_and_its_connections_closed() {
    let ca = ClusterCa::generate("revocation").unwrap();
    let a = start_node(&ca, 1, &[1], NetworkConfig::loopback()).await;
    let b = start_node(&ca, 2, &[1], NetworkConfig::loopback()).await;
    let c = start_node(&ca, 3, &[1], NetworkConfig::loopback()).await;
    for n in [&a, &b, &c] {
        register_echo(n);
    }
    // Connected both ways before the removal.
    echo(&b, 1, &a.local_addrs()).await.unwrap();
    echo(&a, 2, &b.local_addrs()).await.unwrap();

    a.set_revoked(BTreeMap::from([(2, now_s() as u64)]));
    assert_eq!(a.revocations().snapshot().get(&2), Some(&(now_s() as u64)));

    // Its open connections were closed; a new handshake is refused, as a
    // client and as a server, saying the certificate is revoked.
    let r = echo(&b, 1, &a.local_addrs()).await;
    refused_for(&r, "revoked");
    let r = echo(&a, 2, &b.local_addrs()).await;
    refused_for(&r, "revoked");
    // Everyone else is served.
    assert_eq!(echo(&c, 1, &a.local_addrs()).await.unwrap(), b"hi");
    assert_eq!(echo(&a, 3, &c.local_addrs()).await.unwrap(), b"hi");

    // The node added again, with a certificate issued after its removal
    // (moved 10 s into the past here, so the new one is already valid).
    a.set_revoked(BTreeMap::from([(2, (now_s() - 10) as u64)]));
    let again = RpcNode::start(
        ca.issue_with(2, Validity::from_unix(now_s() - 5, now_s() + 3600))
            .unwrap(),
        vec![addr(1, 22)],
        NetworkConfig::loopback(),
    )
    .await
    .unwrap();
    assert_eq!(echo(&again, 1, &a.local_addrs()).await.unwrap(), b"hi");
    // Its old certificate is still refused.
    let r = echo(&b, 1, &a.local_addrs()).await;
    refused_for(&r, "revoked");
}

/// Admits nodes 1 and 2 only.
struct OnlyMembers;

impl Admission for OnlyMembers {
    fn admit(&self, peer: NodeId, service: &str, _request: &[u8]) -> Result<(), String> {
        if peer <= 2 {
            Ok(())
        } else {
            Err(format!("node {peer} is not a member: {service} refuses it"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_membership_gate_refuses_strangers_before_the_handler_runs() {
    let ca = ClusterCa::generate("gate").unwrap();
    let a = start_node(&ca, 1, &[1], NetworkConfig::loopback()).await;
    let b = start_node(&ca, 2, &[1], NetworkConfig::loopback()).await;
    let stranger = start_node(&ca, 3, &[1], NetworkConfig::loopback()).await;
    let ran = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let ran = ran.clone();
        a.register(
            "echo",
            handler_fn(move |_, req| {
                ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { Ok(req) }
            }),
        );
    }
    a.set_admission(Arc::new(OnlyMembers));
    match echo(&stranger, 1, &a.local_addrs()).await {
        Err(RpcError::Remote(msg)) => {
            assert!(
                msg.contains("refused: node 3 is not a member: echo"),
                "{msg}"
            )
        }
        other => panic!("expected the gate's refusal, got {other:?}"),
    }
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(echo(&b, 1, &a.local_addrs()).await.unwrap(), b"hi");
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
}
