//! The virtual switch: which node serves each VM's address.
//!
//! Clients of a VM's service reach it through the switch, the way a real
//! client reaches a VM through the cluster's L2 network: the switch looks up
//! the node that last announced the VM's address (the seed's gratuitous ARP)
//! and hands the request to that node's port. After a migration the target's
//! announcement moves the route; until then requests keep going to the source,
//! which refuses them while paused — exactly what a client sees during the
//! blackout.
//!
//! Announcements carry the VM's ownership epoch and an older epoch never
//! overrides a newer one, so a stale source cannot pull the route back.

use ferry_vmm::ServiceError;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Node identity, as in the cluster store.
pub type NodeId = u64;

/// Where a node takes requests for the VMs it runs.
pub trait ServicePort: Send + Sync {
    /// Appends `record` to `vm`'s service; the sequence number is the
    /// acknowledgement.
    fn append(&self, vm: &str, record: &[u8]) -> Result<u64, ClientError>;
}

/// What a client of a VM's service can be told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("no node has announced VM {0}")]
    NoRoute(String),
    #[error("node {node} serving VM {vm} is unreachable")]
    Unreachable { vm: String, node: NodeId },
    #[error("node {node} does not run VM {vm}")]
    NotHere { vm: String, node: NodeId },
    #[error("VM {vm}: {error}")]
    Service { vm: String, error: ServiceError },
}

impl ClientError {
    /// Whether a client should simply retry (the blackout, a route that is
    /// about to move, or a fenced guest whose VM the cluster restarts
    /// elsewhere).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::NotHere { .. }
                | ClientError::Service {
                    error: ServiceError::Paused | ServiceError::NotRunning | ServiceError::Fenced,
                    ..
                }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    node: NodeId,
    epoch: u64,
}

/// The cluster's virtual switch.
#[derive(Default)]
pub struct VirtualSwitch {
    routes: RwLock<HashMap<String, Route>>,
    ports: RwLock<HashMap<NodeId, Arc<dyn ServicePort>>>,
}

impl VirtualSwitch {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Plugs a node in.
    pub fn attach(&self, node: NodeId, port: Arc<dyn ServicePort>) {
        self.ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, port);
    }

    /// Unplugs a node (it died or left): its VMs become unreachable, not
    /// rerouted — only an announcement moves a route.
    pub fn detach(&self, node: NodeId) {
        self.ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
    }

    /// `node` now serves `vm` at ownership `epoch`. Returns whether the route
    /// changed; an announcement with an older epoch than the route's is ignored.
    pub fn announce(&self, vm: &str, node: NodeId, epoch: u64) -> bool {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        match routes.get(vm) {
            Some(route) if route.epoch > epoch => false,
            _ => {
                routes.insert(vm.to_string(), Route { node, epoch });
                true
            }
        }
    }

    /// The node currently serving `vm`, with the epoch it announced.
    pub fn route(&self, vm: &str) -> Option<(NodeId, u64)> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm)
            .map(|r| (r.node, r.epoch))
    }

    /// Forgets `vm` (deleted).
    pub fn withdraw(&self, vm: &str) {
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
    }

    /// A client's append to `vm`'s service, delivered where the route points.
    pub fn append(&self, vm: &str, record: &[u8]) -> Result<u64, ClientError> {
        let (node, _) = self
            .route(vm)
            .ok_or_else(|| ClientError::NoRoute(vm.to_string()))?;
        let port = self
            .ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .cloned()
            .ok_or_else(|| ClientError::Unreachable {
                vm: vm.to_string(),
                node,
            })?;
        port.append(vm, record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(NodeId);
    impl ServicePort for Fixed {
        fn append(&self, _vm: &str, _record: &[u8]) -> Result<u64, ClientError> {
            Ok(self.0)
        }
    }

    #[test]
    fn announcement_moves_the_route_and_stale_epochs_are_ignored() {
        let switch = VirtualSwitch::new();
        switch.attach(1, Arc::new(Fixed(1)));
        switch.attach(2, Arc::new(Fixed(2)));
        assert_eq!(
            switch.append("web", b"x"),
            Err(ClientError::NoRoute("web".into()))
        );
        assert!(switch.announce("web", 1, 0));
        assert_eq!(switch.append("web", b"x"), Ok(1));
        assert!(switch.announce("web", 2, 1));
        assert_eq!(switch.append("web", b"x"), Ok(2));
        assert!(
            !switch.announce("web", 1, 0),
            "a stale source cannot take the route back"
        );
        assert_eq!(switch.route("web"), Some((2, 1)));
        switch.detach(2);
        assert_eq!(
            switch.append("web", b"x"),
            Err(ClientError::Unreachable {
                vm: "web".into(),
                node: 2
            })
        );
    }
}
