//! Nodes of different protocol versions in one cluster, as during a rolling upgrade:
//! a node that speaks only version 2 (the build before listed chunks, through the
//! test-only `speak_versions`; also with the hello of a build from before version
//! ranges, `hello_without_range`) or the last build before ranges, beside nodes of
//! this build (2 to 3). Calls and page streams work both ways at the version they
//! share, scattered pages arriving intact (as plain chunks at version 2); a node that
//! shares no version is refused with a clear reason.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{pages, send_scattered, start_node, CheckingSink, ZERO};
use ferry_transport::protocol::{MIN_VERSION, VERSION};
use ferry_transport::{
    handler_fn, ClusterCa, NetworkConfig, PageStreamError, RpcError, RpcNode, SenderStats,
};

const T: Duration = Duration::from_secs(10);
const PAGES: u64 = 16 * 1024;

fn speaking(versions: Option<(u16, u16)>) -> NetworkConfig {
    let mut cfg = NetworkConfig::loopback();
    // Several paths per network: every one of them must agree on the version.
    cfg.page_stream.connections_per_network = 2;
    cfg.speak_versions = versions;
    cfg
}

/// Round 0 of every page, then a dirty round of scattered pages (every 3rd page
/// with data, every 5th that is not also a 3rd zeroed) through `send_listed`, as a
/// migration's later rounds send them. Checks every page on the receiver and
/// returns the sender's stats and the chunks the dirty round took.
async fn stream_scattered(from: &Arc<RpcNode>, to: &Arc<RpcNode>, id: u64) -> (SenderStats, u64) {
    let sink = CheckingSink::new(PAGES);
    let rx = to
        .accept_page_stream(id, from.node_id(), sink.clone())
        .unwrap();
    let tx = from
        .open_page_stream(to.node_id(), &to.local_addrs(), id)
        .await
        .unwrap();
    for first in (0..PAGES).step_by(1024) {
        tx.send_bytes(0, first, Bytes::from(pages(first, 1024, 0)))
            .await
            .unwrap();
    }
    tx.barrier(0).await.unwrap();
    let after_round_0 = tx.stats().chunks_queued;

    let dirty: Vec<u64> = (0..PAGES).filter(|p| p % 3 == 0).collect();
    let zeroed: Vec<u64> = (0..PAGES).filter(|p| p % 5 == 0 && p % 3 != 0).collect();
    send_scattered(&tx, 1, &dirty, &zeroed).await;
    let stats = tx.finish().await.unwrap();
    rx.wait().await.unwrap();

    for p in 0..PAGES {
        let want = if p % 3 == 0 {
            2
        } else if p % 5 == 0 {
            ZERO
        } else {
            1
        };
        assert_eq!(sink.round_of(p), want, "page {p}");
    }
    sink.assert_clean();
    let dirty_chunks = stats.chunks_queued - after_round_0;
    (stats, dirty_chunks)
}

/// A node of this build (1), a node configured as `old` (2) and another node of
/// this build (3): streams of scattered pages and calls between 1 and 2 both ways
/// at `version`, and between 1 and 3 at this build's version, with listed chunks.
/// Returns the three nodes' stats.
async fn old_and_new_both_ways(old: NetworkConfig, version: u16) {
    let ca = ClusterCa::generate("versions").unwrap();
    let new = start_node(&ca, 1, &[1, 2], speaking(None)).await;
    let old = start_node(&ca, 2, &[1, 2], old).await;
    let newer = start_node(&ca, 3, &[1, 2], speaking(None)).await;
    assert_eq!((MIN_VERSION, VERSION), (2, 3), "this build speaks 2 to 3");

    // At version 2, where listed chunks do not exist, every scattered page is a
    // chunk of its own; at 3 they share full listed chunks. Intact both ways.
    let scattered = (PAGES / 3 + 1) + (PAGES / 5 + 1 - (PAGES / 15 + 1));
    let listed = scattered.div_ceil(64) + 2 * PAGES / 256 + 2;
    for (from, to, id) in [(&new, &old, 10), (&old, &new, 11)] {
        let (stats, chunks) = stream_scattered(from, to, id).await;
        let way = format!("node {} to node {}", from.node_id(), to.node_id());
        assert_eq!(stats.wire_version, Some(version), "{way}");
        if version < 3 {
            assert_eq!(chunks, scattered, "{way}: one plain chunk per page");
        } else {
            assert!(chunks <= listed, "{way}: {chunks} chunks, listed");
        }
    }
    let (stats, chunks) = stream_scattered(&new, &newer, 12).await;
    assert_eq!(stats.wire_version, Some(VERSION));
    assert!(
        chunks <= listed,
        "{chunks} chunks for {scattered} pages, listed"
    );

    // Calls, both ways.
    for n in [&new, &old] {
        n.register("echo", handler_fn(|_, r| async move { Ok(r) }));
    }
    let r = new
        .call(2, &old.local_addrs(), "echo", b"to old".to_vec(), T)
        .await;
    assert_eq!(r.unwrap(), b"to old");
    let r = old
        .call(1, &new.local_addrs(), "echo", b"to new".to_vec(), T)
        .await;
    assert_eq!(r.unwrap(), b"to new");

    // Nobody broke the protocol after a hello: a listed chunk on a version-2 path
    // would have been a protocol error on its receiver. Only a node from before
    // ranges refused hellos (the range it cannot read; the caller then offered
    // it one version), and this build refused none.
    let legacy = old.config().hello_without_range;
    for n in [&new, &old, &newer] {
        let s = n.stats();
        let refusals = n.recent_refusals();
        assert_eq!(s.protocol_errors, 0, "node {}: {refusals:?}", n.node_id());
        // A hedged call abandoning a handshake is no refusal of a hello.
        let hellos: Vec<&String> = refusals
            .iter()
            .filter(|r| r.contains(": bad hello: "))
            .collect();
        if legacy && n.node_id() == 2 {
            assert!(
                hellos
                    .iter()
                    .all(|r| r.contains("trailing bytes") || r.contains("protocol version")),
                "{refusals:?}"
            );
            assert!(!hellos.is_empty(), "this build first offered its range");
        } else {
            assert!(hellos.is_empty(), "node {}: {refusals:?}", n.node_id());
        }
    }
    for n in [new, old, newer] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_speaking_only_version_2_and_this_build_stream_and_call_both_ways() {
    old_and_new_both_ways(speaking(Some((2, 2))), 2).await;
}

/// The build before listed chunks, hello and all: this build is refused its
/// highest version, offers 2 alone, and they speak 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_build_from_before_ranges_and_this_build_work_both_ways() {
    let mut old = speaking(Some((2, 2)));
    old.hello_without_range = true;
    old_and_new_both_ways(old, 2).await;
}

/// The last build before ranges (version 3 only): it refuses the range after the
/// hello, this build offers 3 alone, and they speak 3 with listed chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_build_before_ranges_and_this_build_work_both_ways() {
    let mut old = speaking(Some((3, 3)));
    old.hello_without_range = true;
    old_and_new_both_ways(old, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sharing_no_version_is_refused_with_both_ranges_named() {
    let ca = ClusterCa::generate("versions-none").unwrap();
    let new = start_node(&ca, 1, &[1], speaking(None)).await;
    let future = start_node(&ca, 4, &[1], speaking(Some((4, 4)))).await;
    for n in [&new, &future] {
        n.register("echo", handler_fn(|_, r| async move { Ok(r) }));
    }
    let named =
        |reason: &str| reason.contains("version 4") && reason.contains("version 2 to version 3");

    // The future node calls: this build refuses its hello.
    match future
        .call(1, &new.local_addrs(), "echo", b"x".to_vec(), T)
        .await
    {
        Err(RpcError::VersionMismatch(reason)) => assert!(named(&reason), "{reason}"),
        other => panic!("expected a version mismatch, got {other:?}"),
    }
    assert!(
        new.recent_refusals().iter().any(|r| named(r)),
        "{:?}",
        new.recent_refusals()
    );
    // This build calls: the future node refuses.
    match new
        .call(4, &future.local_addrs(), "echo", b"x".to_vec(), T)
        .await
    {
        Err(RpcError::VersionMismatch(reason)) => assert!(named(&reason), "{reason}"),
        other => panic!("expected a version mismatch, got {other:?}"),
    }
    // A page stream fails at once (not after its dead-path timeout), for the same
    // reason.
    let _rx = future
        .accept_page_stream(20, 1, CheckingSink::new(16))
        .unwrap();
    let opened = tokio::time::timeout(T, new.open_page_stream(4, &future.local_addrs(), 20))
        .await
        .expect("refused, not left to time out");
    match opened {
        Err(PageStreamError::Connect(RpcError::VersionMismatch(reason))) => {
            assert!(named(&reason), "{reason}")
        }
        Err(other) => panic!("expected a version mismatch, got {other}"),
        Ok(_) => panic!("a stream to a node sharing no version opened"),
    }
    for n in [new, future] {
        n.shutdown().await;
    }
}
