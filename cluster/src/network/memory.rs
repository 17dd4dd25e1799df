//! An in-process [`ClusterTransport`]: nodes of one [`MemNetwork`] call each other's handlers
//! directly. For tests of the Raft wiring that need no sockets; a node can be cut off
//! (`set_reachable`) or shut down like a real one.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{BoxFuture, CallError, ClusterTransport, ServiceHandler};
use crate::model::NodeId;

#[derive(Default)]
struct Registry {
    handlers: HashMap<NodeId, HashMap<&'static str, Arc<dyn ServiceHandler>>>,
    down: BTreeSet<NodeId>,
}

/// A set of in-process nodes that can reach each other.
#[derive(Clone, Default)]
pub struct MemNetwork {
    registry: Arc<Mutex<Registry>>,
}

fn lock(m: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// The transport endpoint of node `id` on this network (up and reachable).
    pub fn endpoint(&self, id: NodeId) -> Arc<MemTransport> {
        let mut reg = lock(&self.registry);
        reg.handlers.entry(id).or_default();
        reg.down.remove(&id);
        Arc::new(MemTransport {
            id,
            registry: self.registry.clone(),
        })
    }

    /// Cut a node off (`false`) or reconnect it (`true`): calls to and from it fail.
    pub fn set_reachable(&self, id: NodeId, reachable: bool) {
        let mut reg = lock(&self.registry);
        if reachable {
            reg.down.remove(&id);
        } else {
            reg.down.insert(id);
        }
    }
}

/// One node's endpoint on a [`MemNetwork`].
pub struct MemTransport {
    id: NodeId,
    registry: Arc<Mutex<Registry>>,
}

impl ClusterTransport for MemTransport {
    fn call<'a>(
        &'a self,
        peer: NodeId,
        _addrs: &'a [SocketAddr],
        service: &'static str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            let handler = {
                let reg = lock(&self.registry);
                if reg.down.contains(&self.id) || reg.down.contains(&peer) {
                    None
                } else {
                    reg.handlers
                        .get(&peer)
                        .and_then(|h| h.get(service))
                        .cloned()
                }
            };
            let Some(handler) = handler else {
                return Err(CallError::Unreachable {
                    peer,
                    reason: "not on the network".into(),
                });
            };
            match tokio::time::timeout(timeout, handler.handle(self.id, request)).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(reason)) => Err(CallError::Remote { peer, reason }),
                Err(_) => Err(CallError::Timeout { peer, timeout }),
            }
        })
    }

    fn register(&self, service: &'static str, handler: Arc<dyn ServiceHandler>) {
        lock(&self.registry)
            .handlers
            .entry(self.id)
            .or_default()
            .insert(service, handler);
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut reg = lock(&self.registry);
            reg.handlers.remove(&self.id);
            reg.down.insert(self.id);
        })
    }
}
