//! What a node keeps doing in the background for as long as it runs: progress
//! of the migrations it is the source of goes to its event hub and, best
//! effort, to every peer (the relay); every change its store replica applies
//! goes to the event hub; and its address book points at the peers' sockets,
//! taken from the configuration (which networks a migration uses, in which
//! order, the store decides).

use super::Node;
use crate::events::Event;
use crate::peer::{self, Envelope, PeerRequest, Relayed};
use crate::views::ProgressView;
use ferry_actors::node::{now_ms, PeerAddrs};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

impl Node {
    pub(super) fn spawn_progress_forwarder(&self) {
        let mut rx = self.inner.shared.events.subscribe();
        let node = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let p = match rx.recv().await {
                    Ok(p) => p,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(inner) = node.upgrade() else { return };
                let view = ProgressView::from_progress(inner.config.node_id, &p, now_ms());
                inner.hub.publish(Event::Progress(view.clone()));
                let _ = inner.relay.try_send(Relayed::Progress(view));
            }
        });
    }

    pub(super) fn spawn_relay(&self, mut rx: tokio::sync::mpsc::Receiver<Relayed>) {
        let node = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let Some(inner) = node.upgrade() else { return };
                let bytes = ferry_transport::encode(&Envelope {
                    version: peer::VERSION,
                    request: PeerRequest::Relay(event),
                });
                for p in inner.peers.values() {
                    let addrs: Vec<SocketAddr> = p.addresses.values().copied().collect();
                    let send = inner
                        .shared
                        .rpc
                        .send(p.id, &addrs, peer::SERVICE, bytes.clone());
                    let _ = tokio::time::timeout(Duration::from_millis(300), send).await;
                }
            }
        });
    }

    pub(super) fn spawn_store_watcher(&self) {
        let mut rx = self.cluster().subscribe();
        let node = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let applied = match rx.recv().await {
                    Ok(a) => Some(a),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(inner) = node.upgrade() else { return };
                let node = Node { inner };
                node.sync_membership();
                if let Some(applied) = applied {
                    let event = match applied.change {
                        ferry_cluster::Change::Command { command, result } => Event::Change {
                            command: command.name().into(),
                            ok: result.is_ok(),
                            error: result.err().map(|e| e.to_string()),
                        },
                        ferry_cluster::Change::Membership { .. } => Event::Change {
                            command: "Membership".into(),
                            ok: true,
                            error: None,
                        },
                        ferry_cluster::Change::Snapshot => Event::Change {
                            command: "Snapshot".into(),
                            ok: true,
                            error: None,
                        },
                    };
                    node.inner.hub.publish(event);
                }
            }
        });
    }

    /// Points the address book at the peers: their transport sockets for
    /// control calls, and the socket on each network for the page stream
    /// (which networks a migration uses, in which order, the store decides).
    pub(super) fn refresh_directory(&self) {
        for p in self.inner.peers.values() {
            let rpc: Vec<SocketAddr> = self
                .inner
                .config
                .networks
                .iter()
                .filter_map(|n| p.addresses.get(&n.name).copied())
                .collect();
            self.inner.shared.directory.set(
                p.id,
                PeerAddrs {
                    rpc,
                    networks: p.addresses.clone(),
                },
            );
        }
    }
}
