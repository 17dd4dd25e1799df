//! Forming the cluster: a bootstrap node initializes Raft and records the
//! networks and itself in the model; any other node asks its peers, in turn,
//! to add it as a voter. Once a member, a node reconciles the store with what
//! actually runs here after a restart (nothing), so the store tells the truth
//! again.

use super::{Node, FORWARD_TIMEOUT};
use crate::config::PeerEntry;
use crate::peer::{JoinInfo, PeerRequest};
use anyhow::bail;
use ferry_actors::node::now_ms;
use ferry_cluster::model::{Capacity, Subnet, VmState};
use ferry_cluster::{ClusterError, ClusterNode, Command, CommandError};
use std::time::{Duration, Instant};

impl Node {
    fn join_info(&self) -> anyhow::Result<JoinInfo> {
        let c = &self.inner.config;
        Ok(JoinInfo {
            id: c.node_id,
            name: c.name.clone(),
            rpc: self.inner.shared.rpc.local_addrs(),
            addresses: c
                .networks
                .iter()
                .map(|n| (n.name.clone(), n.address.ip()))
                .collect(),
            cpu_features: match &c.cpu_features {
                Some(named) => named.iter().cloned().collect(),
                None => ferry_vmm::cpu::host_features(),
            },
            capacity: Capacity {
                memory_bytes: c.capacity.memory_mib.saturating_mul(1 << 20),
                max_vms: c.capacity.max_vms,
            },
            tcp_offload: c.tcp_offload,
        })
    }

    pub(super) async fn form_or_join(&self) {
        let result = if self.inner.config.bootstrap {
            self.bootstrap().await
        } else {
            self.join().await
        };
        match result {
            Ok(()) => {
                tracing::info!(node = self.id(), "member of the cluster");
                self.reconcile().await;
                self.inner.reconciled.send_replace(true);
            }
            Err(e) => {
                tracing::error!(node = self.id(), error = %e, "could not form or join the cluster")
            }
        }
    }

    /// First node: initialize Raft (a no-op when the store already belongs to
    /// a cluster), then record the networks and this node if missing.
    async fn bootstrap(&self) -> anyhow::Result<()> {
        self.cluster().initialize().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.bootstrap_model().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline && !self.stopping() => {
                    tracing::debug!(error = %e, "bootstrap: retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn bootstrap_model(&self) -> anyhow::Result<()> {
        let state = self.cluster().read_linearizable().await?;
        for n in &self.inner.config.networks {
            if !state.networks.contains_key(&n.name) {
                let subnet: Subnet = n.subnet.parse()?;
                ignore_exists(
                    self.cluster()
                        .write(Command::DefineNetwork {
                            name: n.name.clone(),
                            subnet,
                            gateway: n.gateway,
                        })
                        .await,
                )?;
            }
        }
        if !state.nodes.contains_key(&self.id()) {
            add_node(self.cluster(), self.join_info()?).await?;
        }
        Ok(())
    }

    /// Other nodes: ask the peers, in turn, to add this node, until it is a
    /// voter and recorded in the model.
    async fn join(&self) -> anyhow::Result<()> {
        let info = self.join_info()?;
        let mut peers: Vec<&PeerEntry> = self.inner.peers.values().collect();
        peers.sort_by_key(|p| p.id);
        let mut last = String::from("no peer configured");
        loop {
            if self.stopping() {
                bail!("stopped before joining: {last}");
            }
            if self.is_member() && self.state().nodes.contains_key(&self.id()) {
                return Ok(());
            }
            for p in &peers {
                match self
                    .call_peer(p.id, PeerRequest::Join(info.clone()), FORWARD_TIMEOUT)
                    .await
                {
                    Ok(_) => break,
                    Err(e) => last = format!("{}: {}", p.name, e.message),
                }
            }
            tracing::debug!(node = self.id(), %last, "joining");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// After a restart nothing runs here, whatever the store last said: moves
    /// this node was the source of are aborted, and VMs it ran are recorded
    /// lost, so the cluster starts each of them again, once, at a new epoch
    /// (after a cluster-wide stop too: the VMs that were running run again).
    /// Only then does this node boot VMs the store places here. Retried until
    /// the store answers: at a cluster's cold start the quorum may take a
    /// moment.
    async fn reconcile(&self) {
        let state = loop {
            match self.fresh().await {
                Ok(s) => break s,
                Err(e) if !self.stopping() => {
                    tracing::debug!(node = self.id(), "reconcile: {}", e.message);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => return,
            }
        };
        for m in state.active_migrations() {
            if m.source == self.id() {
                let _ = self
                    .cluster()
                    .write(Command::AbortMigration {
                        migration: m.id,
                        reason: "the source node restarted".into(),
                        at_ms: now_ms(),
                    })
                    .await;
            }
        }
        let state = self.cluster().read();
        for vm in state.vms_on(self.id()) {
            if matches!(vm.state, VmState::Running | VmState::Migrating)
                && !self.inner.shared.holds(&vm.name)
            {
                tracing::warn!(vm = %vm.name, epoch = vm.epoch, "VM was running here before a restart; its memory is gone: the cluster restarts it");
                let _ = self
                    .cluster()
                    .write(Command::VmLost {
                        vm: vm.name.clone(),
                        epoch: vm.epoch,
                    })
                    .await;
            }
        }
        self.inner.shared.begin_adopting();
    }
}

fn ignore_exists(r: Result<ferry_cluster::Response, ClusterError>) -> Result<(), ClusterError> {
    match r {
        Ok(_)
        | Err(ClusterError::Rejected(CommandError::NetworkExists { .. }))
        | Err(ClusterError::Rejected(CommandError::NodeExists { .. })) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) async fn add_node(cluster: &ClusterNode, info: JoinInfo) -> Result<(), ClusterError> {
    ignore_exists(
        cluster
            .write(Command::AddNode {
                id: info.id,
                name: info.name,
                addresses: info.addresses,
                cpu_features: info.cpu_features,
                capacity: info.capacity,
                tcp_offload: info.tcp_offload,
            })
            .await,
    )
}
