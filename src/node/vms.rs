//! VM writes: create, start, stop, update and delete a VM, move it live,
//! wait for a move and cancel it, and clients' appends to its service. Each
//! checks its request and a fresh read of the store first, then writes the
//! command to the store or hands the operation to the node that must carry it
//! out (the VM's owner, or a move's source).

use super::{AppendView, Node};
use crate::error::ApiError;
use crate::peer::{PeerReply, PeerRequest};
use crate::requests::{self, Request};
use crate::views::{self, *};
use ferry_actors::node::{encode_program, GuestProgram};
use ferry_actors::policy::placement::{self, Placement};
use ferry_cluster::model::{Backend, MacAddr, MigrationTrigger, StorageSpec, VmConfig, VmState};
use ferry_cluster::{Command, CommandError};
use ferry_vmm::{Pattern, Workload};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

impl Node {
    /// Defines a simulated VM on a node and, unless `start` is false, starts it.
    pub async fn create_vm(&self, req: requests::CreateVm) -> Result<VmView, ApiError> {
        req.validate()?;
        let pattern = match req.pattern.as_deref() {
            None | Some("hot_set") => Pattern::HotSet {
                write_percent: 80,
                page_percent: 10,
            },
            Some("uniform") => Pattern::Uniform,
            Some("sequential") => Pattern::Sequential,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("pattern {other:?} is not uniform, hot_set or sequential"),
                ))
            }
        };
        let memory_bytes = req.memory_mib << 20;
        let storage = match req.storage.as_deref() {
            None | Some("shared") => StorageSpec::Shared {
                volume: "csv-1".into(),
            },
            Some("local") => StorageSpec::Local {
                size_bytes: memory_bytes,
            },
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("storage {other:?} is not shared or local"),
                ))
            }
        };
        let backend = match req.backend.as_deref() {
            None | Some("sim") => Backend::Sim,
            Some("kvm") => Backend::Kvm,
            Some("qemu") => Backend::Qemu,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("backend {other:?} is not sim, kvm or qemu"),
                ))
            }
        };
        let state = self.fresh().await?;
        let node = match &req.node {
            Some(r) => self.node_ref(&state, r)?,
            None => self.id(),
        };
        if state.vms.contains_key(&req.name) {
            return Err(CommandError::VmExists { vm: req.name }.into());
        }
        let seed = req.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let used: BTreeSet<MacAddr> = state.vms.values().map(|v| v.config.mac).collect();
        let mac = (0u64..)
            .map(|i| {
                let x = seed.wrapping_add(i).to_be_bytes();
                MacAddr([0x02, 0xfe, x[4], x[5], x[6], x[7]])
            })
            .find(|m| !used.contains(m))
            .unwrap_or(MacAddr([0x02, 0xfe, 0, 0, 0, 1]));
        let config = VmConfig {
            memory_bytes,
            vcpus: req.vcpus,
            mac,
            backend,
            workload: encode_program(&GuestProgram {
                workload: Workload {
                    dirty_pages_per_sec: Some(req.dirty_pages_per_sec),
                    pattern,
                    seed,
                },
                prefill_seed: Some(seed),
                tcp_connections: req.tcp_connections,
            }),
            storage,
            failover: ferry_cluster::model::Failover {
                restart: req.restart,
                priority: req.priority,
            },
        };
        self.write(Command::CreateVm {
            name: req.name.clone(),
            config,
            node,
        })
        .await?;
        if req.processor_compatibility {
            self.write(Command::SetProcessorCompatibility {
                vm: req.name.clone(),
                enabled: true,
            })
            .await?;
        }
        if req.start {
            return self
                .start_vm(
                    &req.name,
                    requests::StartVm {
                        node: Some(node.to_string()),
                    },
                )
                .await;
        }
        self.vm(&req.name)
    }

    /// Starts a VM that is off, on its owner or on the node named.
    pub async fn start_vm(&self, vm: &str, req: requests::StartVm) -> Result<VmView, ApiError> {
        let state = self.fresh().await?;
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        if v.state != VmState::Off {
            return Err(CommandError::VmNotOff {
                vm: vm.into(),
                state: v.state,
            }
            .into());
        }
        let node = match &req.node {
            Some(r) => self.node_ref(&state, r)?,
            None => v.owner,
        };
        self.on_node(node, PeerRequest::StartVm { vm: vm.into() })
            .await?;
        self.vm_fresh(vm).await
    }

    /// Stops a running VM (on its owner) and records it off.
    pub async fn stop_vm(&self, vm: &str) -> Result<VmView, ApiError> {
        let state = self.fresh().await?;
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        if v.state == VmState::NeedsRestart {
            self.write(Command::StopVm {
                vm: vm.into(),
                epoch: Some(v.epoch),
            })
            .await?;
        } else {
            self.on_node(
                v.owner,
                PeerRequest::StopVm {
                    vm: vm.into(),
                    epoch: v.epoch,
                },
            )
            .await?;
        }
        self.vm_fresh(vm).await
    }

    /// Changes a VM's settings; processor compatibility only while it is off
    /// (the store refuses otherwise).
    pub async fn update_vm(&self, vm: &str, patch: requests::VmPatch) -> Result<VmView, ApiError> {
        let state = self.fresh().await?;
        if !state.vms.contains_key(vm) {
            return Err(ApiError::unknown_vm(vm));
        }
        if let Some(enabled) = patch.processor_compatibility {
            self.write(Command::SetProcessorCompatibility {
                vm: vm.into(),
                enabled,
            })
            .await?;
        }
        self.vm(vm)
    }

    /// Deletes a VM that is off.
    pub async fn delete_vm(&self, vm: &str) -> Result<(), ApiError> {
        let state = self.fresh().await?;
        if !state.vms.contains_key(vm) {
            return Err(ApiError::unknown_vm(vm));
        }
        self.write(Command::DeleteVm { vm: vm.into() }).await?;
        Ok(())
    }

    /// Moves a running VM live to the node named, or to the one placement
    /// picks. Answers once the migration is recorded; follow it with
    /// [`wait_migration`](Self::wait_migration) or the event stream.
    pub async fn move_vm(&self, vm: &str, req: requests::MoveVm) -> Result<MoveStarted, ApiError> {
        req.validate()?;
        let state = self.fresh().await?;
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        if let Some(m) = v.migration {
            return Err(CommandError::VmAlreadyMigrating {
                vm: vm.into(),
                migration: m,
            }
            .into());
        }
        if v.state != VmState::Running {
            return Err(CommandError::VmNotRunning {
                vm: vm.into(),
                state: v.state,
            }
            .into());
        }
        let target = match &req.target {
            Some(r) => self.node_ref(&state, r)?,
            None => match placement::place(&state, v, &BTreeMap::new(), &BTreeMap::new()) {
                Placement::Target(node) => node,
                p @ Placement::Busy { .. } => {
                    return Err(ApiError::conflict("targets_busy", p.explain()))
                }
                p @ Placement::NoTarget { .. } => {
                    return Err(ApiError::conflict("no_eligible_target", p.explain()))
                }
            },
        };
        let source = v.owner;
        if target == source {
            return Err(CommandError::SameSourceAndTarget { node: source }.into());
        }
        let estimate = self.estimate_under(vm, target, req.downtime_limit_ms).ok();
        let reply = self
            .on_node(
                source,
                PeerRequest::Move {
                    vm: vm.into(),
                    target,
                    trigger: MigrationTrigger::User,
                    verify: req.verify,
                    downtime_limit_ms: req.downtime_limit_ms,
                },
            )
            .await?;
        let PeerReply::MoveBegun { migration } = reply else {
            return Err(ApiError::internal(format!("unexpected reply {reply:?}")));
        };
        Ok(MoveStarted {
            migration,
            vm: vm.into(),
            source,
            target,
            target_name: views::node_name(&state, target),
            estimate,
        })
    }

    /// Waits until `migration` completes or aborts (or `timeout` passes) and
    /// returns it as the store and the event stream know it.
    pub async fn wait_migration(
        &self,
        migration: u64,
        timeout: Duration,
    ) -> Result<MigrationView, ApiError> {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.migration(migration)?;
            let reported = view.report.is_some() || view.outcome != "completed";
            if view.outcome != "active" && (reported || Instant::now() > deadline) {
                return Ok(view);
            }
            if Instant::now() > deadline {
                return Err(ApiError::new(
                    504,
                    "timeout",
                    format!("migration {migration} still active after {timeout:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Cancels the move of `vm` under way; the VM stays on its source.
    pub async fn cancel_move(&self, vm: &str) -> Result<(), ApiError> {
        let state = self.fresh().await?;
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        let source = v
            .migration
            .and_then(|m| state.migrations.get(&m))
            .map(|m| m.source)
            .ok_or_else(|| {
                ApiError::conflict("not_migrating", format!("VM {vm:?} is not being moved"))
            })?;
        self.on_node(source, PeerRequest::Cancel { vm: vm.into() })
            .await?;
        Ok(())
    }

    /// A client's write to the VM's service, delivered to the node that runs
    /// it; answers with the sequence number the guest acknowledged.
    pub async fn append(&self, vm: &str, record: &[u8]) -> Result<AppendView, ApiError> {
        let state = self.state();
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        // A VM that is off has no service to append to: a conflict with its
        // state, not an outage.
        if !matches!(v.state, VmState::Running | VmState::Migrating) {
            return Err(CommandError::VmNotRunning {
                vm: vm.into(),
                state: v.state,
            }
            .into());
        }
        let owner = v.owner;
        let refused = |reason: String| ApiError::unavailable("service_unavailable", reason);
        let seq = if owner == self.id() {
            self.inner
                .shared
                .switch
                .append(vm, record)
                .map_err(|e| refused(e.to_string()))?
        } else {
            use ferry_actors::migration::protocol::{Reply, Request, SERVICE};
            let addrs = self
                .inner
                .shared
                .directory
                .get(owner)
                .map(|a| a.rpc)
                .unwrap_or_default();
            let bytes = ferry_transport::encode(&Request::Append {
                vm: vm.into(),
                record: record.to_vec(),
            });
            // A client waits on this: a silent path is left after 100 ms, not
            // the default quarter second (the owner runs each request once).
            let opts = ferry_transport::CallOptions::new(Duration::from_secs(5))
                .hedge_after(Duration::from_millis(100));
            let reply = self
                .inner
                .shared
                .rpc
                .call_with(owner, &addrs, SERVICE, bytes, opts)
                .await
                .map_err(|e| ApiError::unavailable("node_unreachable", e.to_string()))?;
            match ferry_transport::decode::<Reply>(&reply) {
                Ok(Reply::Appended { seq }) => seq,
                Ok(Reply::Refused { reason }) => return Err(refused(reason)),
                Ok(other) => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
                Err(e) => return Err(ApiError::internal(e.to_string())),
            }
        };
        Ok(AppendView {
            vm: vm.into(),
            node: owner,
            seq,
        })
    }
}
