//! [`ClusterTransport`] over the real transport: `ferry_transport::RpcNode` (QUIC, mutual
//! TLS; a peer's node id comes from its certificate).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_transport::{RpcError, RpcHandler, RpcNode};

use super::{BoxFuture, CallError, ClusterTransport, ServiceHandler};
use crate::model::NodeId;

/// Serves a cluster service through the transport's handler interface.
struct Adapter(Arc<dyn ServiceHandler>);

impl RpcHandler for Adapter {
    fn handle(&self, from: NodeId, request: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        self.0.handle(from, request)
    }
}

fn call_error(peer: NodeId, e: RpcError) -> CallError {
    match e {
        RpcError::Timeout(timeout) => CallError::Timeout { peer, timeout },
        RpcError::Unreachable { reason, .. } => CallError::Unreachable { peer, reason },
        e @ (RpcError::Closed(_) | RpcError::Shutdown | RpcError::PeerIdentity(_)) => {
            CallError::Unreachable {
                peer,
                reason: e.to_string(),
            }
        }
        e => CallError::Remote {
            peer,
            reason: e.to_string(),
        },
    }
}

impl ClusterTransport for RpcNode {
    fn call<'a>(
        &'a self,
        peer: NodeId,
        addrs: &'a [SocketAddr],
        service: &'static str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            RpcNode::call(self, peer, addrs, service, request, timeout)
                .await
                .map_err(|e| call_error(peer, e))
        })
    }

    fn register(&self, service: &'static str, handler: Arc<dyn ServiceHandler>) {
        RpcNode::register(self, service, Arc::new(Adapter(handler)));
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(RpcNode::shutdown(self))
    }
}
