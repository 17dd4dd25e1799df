//! The target side of a live migration: the [`protocol`] service that builds an
//! incoming guest shell and accepts its page stream, restores and verifies the
//! device state, and resumes the guest — only once this node's replica of the
//! store shows the switchover committed to it — or discards the copy when the
//! move is abandoned or aborted.
//!
//! These are methods on [`NodeShared`]: the incoming guest lives among the
//! node's other guests, behind the same lock, so "resume only if the store
//! says so" is one check under one lock.

use crate::history::{GuestPoint, HistoryEvent};
use crate::migration::protocol::{self, GuestSpec, Reply, Request};
use crate::node::{build_guest, lock, Hosted, NodeShared, Role};
use ferry_cluster::model::MigrationOutcome;
use ferry_cluster::NodeId;
use ferry_transport::{PageSink, RpcHandler};
use ferry_vmm::{DeviceState, Guest};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

mod stream;
pub(crate) use stream::IncomingStream;

impl NodeShared {
    /// Makes room for an incoming copy of `vm`, which the store says runs
    /// elsewhere at `epoch`. A copy this node still holds as an owner from an
    /// earlier epoch is the paused source copy of a switchover that already
    /// committed: its job destroys it once the target has answered `Resume`,
    /// which a dead path can delay, and a move back may arrive before that.
    /// It can never run again, so it goes now. Anything else this node holds
    /// of `vm` (a running copy, another incoming one) refuses the move.
    fn clear_stale_copy(&self, vm: &str, epoch: u64) -> Result<(), String> {
        let mut vms = lock(&self.vms);
        let Some(held) = vms.get(vm) else {
            return Ok(());
        };
        let stale = matches!(held.role, Role::Owner { epoch: mine } if mine < epoch)
            && held.guest.is_paused();
        if !stale {
            return Err(format!("this node already holds VM {vm}"));
        }
        if let Some(old) = vms.remove(vm) {
            tracing::info!(
                vm,
                epoch,
                "dropping the paused source copy of an earlier switchover"
            );
            old.guest.destroy();
        }
        Ok(())
    }

    fn prepare(
        &self,
        migration: u64,
        vm: String,
        epoch: u64,
        spec: GuestSpec,
        from: NodeId,
    ) -> Reply {
        if let Err(reason) = self.admit_incoming(migration, &vm, epoch, &spec, from) {
            return Reply::Refused { reason };
        }
        let guest = match build_guest(&spec, None, self.run_lease())
            .and_then(|g| self.with_planned_disk(&vm, g, true))
        {
            Ok(g) => g,
            Err(reason) => return Reply::Refused { reason },
        };
        let receiver =
            match self
                .rpc
                .accept_page_stream(migration, from, Arc::new(GuestSink(guest.clone())))
            {
                Ok(r) => r,
                Err(e) => {
                    guest.destroy();
                    crate::disks::remove_copied_disk(guest.as_ref());
                    return Reply::Refused {
                        reason: e.to_string(),
                    };
                }
            };
        lock(&self.vms).insert(
            vm,
            Hosted {
                guest,
                spec,
                role: Role::Incoming {
                    migration,
                    receiver: Some(receiver),
                    stream: None,
                    verified: false,
                    verified_digest: None,
                },
            },
        );
        Reply::Prepared
    }

    /// Checks an incoming move against this node's replica of the store, and
    /// makes room for it.
    fn admit_incoming(
        &self,
        migration: u64,
        vm: &str,
        epoch: u64,
        spec: &GuestSpec,
        from: NodeId,
    ) -> Result<(), String> {
        // The store must know of this migration, of this VM, to this node, at
        // this epoch.
        let state = self.cluster.read();
        match state.migrations.get(&migration) {
            Some(m)
                if m.vm == vm
                    && m.target == self.id
                    && m.source == from
                    && m.epoch == epoch
                    && m.is_active() => {}
            Some(m) => {
                return Err(format!(
                    "migration {migration} does not match the store: {m:?}"
                ))
            }
            None => {
                return Err(format!(
                    "migration {migration} is not (yet) in this node's store"
                ))
            }
        }
        // `epoch` is now the store's: the migration's, from its source.
        self.clear_stale_copy(vm, epoch)?;
        // The machine to build is the one the store defined, not whatever the
        // source says: the store checked this node's capacity for that one,
        // and a spec of the source's own making could ask for any memory or
        // vCPU count (`u32::MAX` vCPUs aborted the process).
        check_spec(spec, state.vms.get(vm).map(|v| &v.config))
            .map_err(|reason| format!("migration {migration} of VM {vm}: {reason}"))
    }

    fn incoming_guest(&self, migration: u64) -> Option<(String, Arc<dyn Guest>)> {
        lock(&self.vms).iter().find_map(|(name, h)| match h.role {
            Role::Incoming { migration: m, .. } if m == migration => {
                Some((name.clone(), h.guest.clone()))
            }
            _ => None,
        })
    }

    fn complete(
        &self,
        migration: u64,
        device_state: &[u8],
        digest: Option<ferry_vmm::MemoryDigest>,
    ) -> Reply {
        let Some((vm, guest)) = self.incoming_guest(migration) else {
            return Reply::Refused {
                reason: format!("no incoming migration {migration} here"),
            };
        };
        let state = match DeviceState::decode(device_state) {
            Ok(s) => s,
            Err(e) => {
                return Reply::Refused {
                    reason: e.to_string(),
                }
            }
        };
        if let Err(e) = guest.restore_state(&state) {
            return Reply::Refused {
                reason: e.to_string(),
            };
        }
        let mine = if digest.is_some() {
            match guest.digest() {
                Ok(d) => Some(d),
                Err(e) => {
                    return Reply::Refused {
                        reason: e.to_string(),
                    }
                }
            }
        } else {
            None
        };
        // A node stopped while it hashed (in this process: `kill` marks it
        // dead, then discards its guests' memory) hashed zeros, not the copy:
        // that is a dead target, not a copy that differs. Seen alive after
        // the hash, it was alive during all of it.
        if self.is_dead() {
            return Reply::Refused {
                reason: "this node stopped".into(),
            };
        }
        if mine != digest {
            return Reply::Refused {
                reason: format!("digest mismatch: source {digest:?}, target {mine:?}"),
            };
        }
        if let Some(h) = lock(&self.vms).get_mut(&vm) {
            if let Role::Incoming {
                verified,
                verified_digest,
                ..
            } = &mut h.role
            {
                *verified = true;
                *verified_digest = mine;
            }
        }
        Reply::Verified { digest: mine }
    }

    /// Resumes an incoming VM if, and only if, the store shows the switchover
    /// to this node committed. Idempotent.
    pub(crate) fn resume_if_committed(&self, migration: u64) -> bool {
        let state = self.cluster.read();
        let Some(m) = state.migrations.get(&migration) else {
            return false;
        };
        if m.outcome != MigrationOutcome::Completed || m.target != self.id {
            return false;
        }
        let Some(vm) = state.vms.get(&m.vm) else {
            return false;
        };
        if vm.owner != self.id {
            return false;
        }
        let mut vms = lock(&self.vms);
        let Some(h) = vms.get_mut(&m.vm) else {
            return false;
        };
        match &mut h.role {
            Role::Incoming {
                migration: mig,
                verified: true,
                receiver,
                stream,
                verified_digest,
            } if *mig == migration => {
                // The NIC takes the capability of this host: connections the
                // source pushed back into the guest are offloaded again only
                // if this node's NIC offloads TCP.
                let offload = state.nodes.get(&self.id).is_some_and(|n| n.tcp_offload);
                if let Ok(mut device) = h.guest.save_state() {
                    let before = device.nic.clone();
                    device.nic.reoffload(offload);
                    if device.nic != before {
                        if let Err(e) = h.guest.restore_state(&device) {
                            tracing::warn!(vm = %m.vm, "NIC offload not restored: {e}");
                        }
                    }
                }
                let digest = *verified_digest;
                self.observe(GuestPoint::Resuming, migration, &m.vm, h.guest.as_ref());
                if h.guest.resume().is_err() {
                    return false;
                }
                // Reported before the route moves, so every acknowledgement
                // a client gets from this copy comes after it in a history.
                if let Some(digest) = digest {
                    self.record(|| HistoryEvent::DigestAtResume {
                        vm: m.vm.clone(),
                        node: self.id,
                        digest,
                    });
                }
                self.record(|| HistoryEvent::TargetResumed {
                    migration,
                    vm: m.vm.clone(),
                    node: self.id,
                    epoch: vm.epoch,
                });
                receiver.take();
                stream.take();
                h.role = Role::Owner { epoch: vm.epoch };
                self.switch.announce(&m.vm, self.id, vm.epoch);
                tracing::info!(node = self.id, vm = %m.vm, epoch = vm.epoch, "resumed after switchover");
                true
            }
            Role::Owner { .. } => true,
            _ => false,
        }
    }

    /// Discards an incoming copy (the migration was aborted or abandoned).
    pub(crate) fn discard_incoming(&self, migration: u64) {
        let mut vms = lock(&self.vms);
        let name = vms.iter().find_map(|(name, h)| match h.role {
            Role::Incoming { migration: m, .. } if m == migration => Some(name.clone()),
            _ => None,
        });
        if let Some((name, h)) = name.and_then(|n| vms.remove(&n).map(|h| (n, h))) {
            h.guest.destroy();
            // A partial copy of a disk that moves with the VM goes with it.
            crate::disks::remove_copied_disk(h.guest.as_ref());
            self.record(|| HistoryEvent::CopyDestroyed {
                vm: name,
                node: self.id,
            });
        }
    }

    /// Reacts to the store's verdict on `migration`, on either side.
    pub(crate) fn on_migration_outcome(&self, migration: u64) {
        let state = self.cluster.read();
        let Some(m) = state.migrations.get(&migration) else {
            return;
        };
        match &m.outcome {
            MigrationOutcome::Completed if m.target == self.id => {
                self.resume_if_committed(migration);
            }
            MigrationOutcome::Aborted { .. } if m.target == self.id => {
                self.discard_incoming(migration)
            }
            _ => {}
        }
    }

    async fn resume_request(&self, migration: u64) -> Reply {
        // The source heard the commit; this node's replica may lag by a few
        // milliseconds. Wait for it, bounded.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if self.resume_if_committed(migration) {
                return Reply::Resumed;
            }
            if tokio::time::Instant::now() > deadline {
                return Reply::Refused {
                    reason: format!("the store does not show migration {migration} committed here"),
                };
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Pages arriving on the page stream go straight into the incoming guest.
struct GuestSink(Arc<dyn Guest>);

impl PageSink for GuestSink {
    fn apply(&self, first: u64, count: u32, data: Option<&[u8]>) -> Result<(), String> {
        match data {
            Some(bytes) => self.0.write_pages(first, bytes),
            None => self.0.zero_pages(first, u64::from(count)),
        }
        .map_err(|e| e.to_string())
    }
}

/// Checks a source's guest spec against the VM the store defines: memory, vCPUs,
/// backend, MAC and service area must all be the store's.
fn check_spec(
    spec: &GuestSpec,
    config: Option<&ferry_cluster::model::VmConfig>,
) -> Result<(), String> {
    let config = config.ok_or("the VM is not in this node's store")?;
    let expected = crate::node::spec_of(config)?;
    let mut wrong = Vec::new();
    if spec.memory_bytes != expected.memory_bytes {
        wrong.push(format!(
            "memory {} bytes (the store says {})",
            spec.memory_bytes, expected.memory_bytes
        ));
    }
    if spec.vcpus != expected.vcpus {
        wrong.push(format!(
            "{} vCPUs (the store says {})",
            spec.vcpus, expected.vcpus
        ));
    }
    if spec.backend != expected.backend {
        wrong.push(format!(
            "backend {:?} (the store says {:?})",
            spec.backend, expected.backend
        ));
    }
    if spec.mac != expected.mac {
        wrong.push("a MAC address other than the store's".into());
    }
    if spec.service_pages != expected.service_pages {
        wrong.push(format!(
            "{} service pages (the store's VM has {})",
            spec.service_pages, expected.service_pages
        ));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the source's guest spec does not match the store: {}",
            wrong.join(", ")
        ))
    }
}

/// The target side of the migration exchange, as an RPC service.
pub(crate) struct MigrationService(pub(crate) std::sync::Weak<NodeShared>);

impl RpcHandler for MigrationService {
    fn handle(
        &self,
        from: NodeId,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
        Box::pin(async move {
            let node = self.0.upgrade().ok_or("node is shutting down")?;
            let request: Request = ferry_transport::decode(&request).map_err(|e| e.to_string())?;
            let reply = match request {
                Request::Prepare {
                    version,
                    migration,
                    vm,
                    epoch,
                    spec,
                } => {
                    if !protocol::supported(version) {
                        Reply::Refused {
                            reason: format!(
                                "migration protocol version {version} is not supported (this node speaks {} to {})",
                                protocol::MIN_PROTOCOL_VERSION,
                                protocol::PROTOCOL_VERSION
                            ),
                        }
                    } else if protocol::is_stream_backend(&spec.backend) {
                        node.prepare_stream(migration, vm, epoch, spec, from).await
                    } else {
                        node.prepare(migration, vm, epoch, spec, from)
                    }
                }
                Request::Complete { migration, .. } if node.incoming_is_stream(migration) => {
                    node.complete_stream(migration).await
                }
                Request::Complete {
                    migration,
                    device_state,
                    digest,
                    ..
                } => node.complete(migration, &device_state, digest),
                Request::Resume { migration, .. } => node.resume_request(migration).await,
                Request::Abandon { migration, .. } => {
                    node.discard_incoming(migration);
                    Reply::Abandoned
                }
                Request::Append { vm, record } => match node.append(&vm, &record) {
                    Ok(seq) => Reply::Appended { seq },
                    Err(e) => Reply::Refused {
                        reason: e.to_string(),
                    },
                },
            };
            Ok(ferry_transport::encode(&reply))
        })
    }
}
