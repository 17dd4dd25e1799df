//! Test helpers over `ferry_actors::local`: chaos proxies on page-stream
//! paths, a watch for a VM running twice, progress waits.
#![allow(clippy::unwrap_used, dead_code)]

// Each test binary uses some of these.
#[allow(unused_imports)]
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
    events: &mut tokio::sync::broadcast::Receiver<ferry_actors::migration::source::Progress>,
    pred: impl Fn(&ferry_actors::migration::source::Progress) -> bool,
) -> ferry_actors::migration::source::Progress {
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
    for (k, proxy) in proxies.iter().enumerate() {
        cluster
            .directory
            .redirect(target, &format!("mig-{}", k + 1), Some(proxy.local_addr()));
    }
    proxies
}

/// Which nodes are cut off from the cluster store's traffic.
#[derive(Default)]
pub struct Partition {
    isolated: Mutex<std::collections::BTreeSet<NodeId>>,
}

impl Partition {
    pub fn isolate(&self, node: NodeId) {
        self.isolated.lock().unwrap().insert(node);
    }

    pub fn heal(&self) {
        self.isolated.lock().unwrap().clear();
    }

    fn cut(&self, a: NodeId, b: NodeId) -> bool {
        let isolated = self.isolated.lock().unwrap();
        isolated.contains(&a) || isolated.contains(&b)
    }
}

use ferry_cluster::network::{BoxFuture, CallError, ClusterTransport, ServiceHandler};

/// The store's transport of one node, through a partition: calls to or from
/// an isolated node fail as unreachable, in both directions.
pub struct PartitionedTransport {
    pub me: NodeId,
    pub inner: Arc<ferry_transport::RpcNode>,
    pub partition: Arc<Partition>,
}

struct PartitionedHandler {
    me: NodeId,
    inner: Arc<dyn ServiceHandler>,
    partition: Arc<Partition>,
}

impl ServiceHandler for PartitionedHandler {
    fn handle(&self, from: NodeId, request: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        if self.partition.cut(from, self.me) {
            return Box::pin(async { Err("partitioned".to_string()) });
        }
        self.inner.handle(from, request)
    }
}

impl ClusterTransport for PartitionedTransport {
    fn call<'a>(
        &'a self,
        peer: NodeId,
        addrs: &'a [SocketAddr],
        service: &'static str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, CallError>> {
        if self.partition.cut(self.me, peer) {
            return Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Err(CallError::Unreachable {
                    peer,
                    reason: "partitioned".into(),
                })
            });
        }
        ClusterTransport::call(self.inner.as_ref(), peer, addrs, service, request, timeout)
    }

    fn register(&self, service: &'static str, handler: Arc<dyn ServiceHandler>) {
        let wrapped = PartitionedHandler {
            me: self.me,
            inner: handler,
            partition: self.partition.clone(),
        };
        ClusterTransport::register(self.inner.as_ref(), service, Arc::new(wrapped));
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        ClusterTransport::shutdown(self.inner.as_ref())
    }
}
