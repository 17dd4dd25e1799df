//! Test helpers over `ferry_actors::local`: chaos proxies on page-stream
//! paths, a watch for a VM running twice, progress waits.
#![allow(clippy::unwrap_used, dead_code)]

pub use ferry_actors::local::{
    run as run_system, Client, ClientLog, LocalCluster as TestCluster, MIB,
};
use ferry_actors::node::NodeShared;
use ferry_cluster::NodeId;
use ferry_vmm::{Pattern, Workload};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn run<F: std::future::Future<Output = ()>>(f: F) {
    run_system(f).unwrap();
}

fn ip(net: u8, node: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, node as u8))
}

pub fn workload(pages_per_sec: u64) -> Workload {
    Workload {
        dirty_pages_per_sec: Some(pages_per_sec),
        pattern: Pattern::HotSet {
            write_percent: 80,
            page_percent: 10,
        },
        seed: 17,
    }
}

/// Samples, until stopped, where a VM runs; records any moment it ran on two
/// nodes at once, and any node that ran it at an epoch other than the store's
/// owner epoch at that time.
pub struct TwiceWatch {
    stop: Arc<AtomicBool>,
    violations: Arc<Mutex<Vec<String>>>,
    thread: Option<tokio::task::JoinHandle<u64>>,
}

impl TwiceWatch {
    pub fn start(cluster: &TestCluster, vm: &str) -> TwiceWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let nodes: Vec<(NodeId, Arc<NodeShared>)> = cluster
            .nodes
            .iter()
            .map(|n| (n.id, n.shared.clone()))
            .collect();
        let (flag, out, vm) = (stop.clone(), violations.clone(), vm.to_string());
        let thread = tokio::spawn(async move {
            let mut samples = 0;
            while !flag.load(Ordering::Acquire) {
                let running: Vec<(NodeId, u64)> = nodes
                    .iter()
                    .filter_map(|(id, n)| n.running_epoch(&vm).map(|e| (*id, e)))
                    .collect();
                if running.len() > 1 {
                    out.lock()
                        .unwrap()
                        .push(format!("{vm} running on {running:?} at once"));
                }
                samples += 1;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            samples
        });
        TwiceWatch {
            stop,
            violations,
            thread: Some(thread),
        }
    }

    /// Stops watching; returns the number of samples and any violation.
    pub async fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        let samples = self.thread.take().unwrap().await.unwrap();
        let violations = self.violations.lock().unwrap().clone();
        (samples, violations)
    }
}

/// Waits (bounded) for a progress event of the source node matching `pred`.
pub async fn wait_progress(
    events: &mut tokio::sync::broadcast::Receiver<ferry_actors::job::Progress>,
    pred: impl Fn(&ferry_actors::job::Progress) -> bool,
) -> ferry_actors::job::Progress {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(p)) if pred(&p) => return p,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("progress feed closed: {e}"),
            Err(_) => panic!("no matching progress event within 30 s"),
        }
    }
}

/// Checks that every acknowledged append is in the records `vm` holds on `node`.
pub fn assert_no_acked_append_lost(cluster: &TestCluster, node: NodeId, vm: &str, log: &ClientLog) {
    let guest = cluster
        .node(node)
        .shared
        .guest(vm)
        .expect("the VM runs on the node");
    let present: std::collections::HashSet<u64> = guest
        .service_records()
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    let lost: Vec<u64> = log
        .acked
        .iter()
        .filter(|s| !present.contains(s))
        .copied()
        .collect();
    assert!(lost.is_empty(), "acknowledged appends lost: {lost:?}");
    assert!(!log.acked.is_empty(), "the client got acknowledgements");
}

/// Puts the page-stream paths to `target` through one chaos proxy per
/// migration network, returned in network order.
pub async fn proxy_paths(
    cluster: &TestCluster,
    target: NodeId,
) -> Vec<ferry_chaos::proxy::LinkProxy> {
    let node = cluster.node(target);
    let mut proxies = Vec::new();
    for (k, addr) in node.rpc.local_addrs().into_iter().enumerate() {
        let listen = SocketAddr::new(ip(k as u8 + 1, 100 + target), 0);
        proxies.push(
            ferry_chaos::proxy::LinkProxy::start(listen, addr, 7 + k as u64)
                .await
                .unwrap(),
        );
    }
    let mut peer = cluster.directory.get(target).unwrap();
    peer.migration = proxies.iter().map(|p| p.local_addr()).collect();
    cluster.directory.set(target, peer);
    proxies
}
