//! Where a node keeps its guests' virtual disks, and which disk a guest gets.
//!
//! A node with disk directories ([`NodeShared::set_disk_dirs`]) gives every
//! sim or KVM guest a disk (`ferry_vmm::with_disk`), planned from the
//! store's VM record — never from the source's `Prepare`, so the wire
//! protocol carries nothing new and a source cannot ask a target for a disk
//! of its own sizing:
//!
//! - `StorageSpec::Local { size_bytes }`: `<local>/<vm>.disk`, on this node
//!   alone. It is copied with memory (one copy space), created empty on a
//!   target, removed from the source after the switchover commit, and from
//!   the target when the move aborts.
//! - `StorageSpec::Shared { volume }`: `<shared>/<volume>/<vm>.disk`, a
//!   directory every node reaches, the size of the VM's memory. Nothing is
//!   copied and nothing removed: both nodes open the same file, and only the
//!   guest that runs writes it.
//!
//! How the workload writes the disk travels with the VM's guest program, as
//! an optional trailer after it ([`encode_program_with_disk`]): a program
//! written without one (before disks existed) still reads, and its disk is
//! written at a rate derived from its memory workload.

use crate::node::{program_of, NodeShared};
use ferry_cluster::model::{StorageSpec, VmConfig};
use ferry_vmm::{DiskPlacement, DiskWorkload, Guest, GuestWithDisk, VirtualDisk};
use std::path::PathBuf;
use std::sync::Arc;

/// A node's disk directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDirs {
    /// This node's own disks (local storage).
    pub local: PathBuf,
    /// The cluster's shared volumes, reached by every node: one folder per
    /// volume inside. None: this node reaches no shared volume, and a VM on
    /// one gets no disk here.
    pub shared: Option<PathBuf>,
}

/// Which disk a guest gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub placement: DiskPlacement,
    pub workload: DiskWorkload,
}

/// A disk written this fast at most when the program does not say.
const DEFAULT_MAX_BLOCKS_PER_SEC: u64 = 1024;

/// Encodes a guest program followed by how its workload writes the disk.
pub fn encode_program_with_disk(
    program: &crate::node::GuestProgram,
    disk: &DiskWorkload,
) -> Vec<u8> {
    let mut bytes = crate::node::encode_program(program);
    bytes.extend(
        bincode::serde::encode_to_vec(disk, bincode::config::standard()).unwrap_or_default(),
    );
    bytes
}

/// How the VM's workload writes its disk: the trailer after its guest
/// program, or, without one, a sixteenth of its memory write rate (at most
/// [`DEFAULT_MAX_BLOCKS_PER_SEC`]) and no prefill.
pub fn disk_workload_of(config: &VmConfig) -> Result<DiskWorkload, String> {
    let standard = bincode::config::standard().with_limit::<4096>();
    let (_, used) = bincode::serde::decode_from_slice::<crate::node::GuestProgram, _>(
        &config.workload,
        standard,
    )
    .map_err(|e| format!("the VM's workload is not readable: {e}"))?;
    let trailer = config.workload.get(used..).unwrap_or_default();
    if !trailer.is_empty() {
        return bincode::serde::decode_from_slice::<DiskWorkload, _>(trailer, standard)
            .map(|(disk, _)| disk)
            .map_err(|e| format!("the VM's disk workload is not readable: {e}"));
    }
    let workload = program_of(config)?.workload;
    Ok(DiskWorkload {
        blocks_per_sec: workload
            .dirty_pages_per_sec
            .map_or(DEFAULT_MAX_BLOCKS_PER_SEC, |rate| rate / 16)
            .min(DEFAULT_MAX_BLOCKS_PER_SEC),
        prefill_blocks: 0,
        seed: workload.seed ^ 0xd15c,
    })
}

/// A name (of a VM, of a volume) as a file name: letters, digits, `-` and
/// `_` kept, anything else (a `/`, a `.`) written as `%xx`, so no name can
/// leave its folder.
fn escaped(vm: &str) -> String {
    let mut name = String::new();
    for b in vm.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02x}"));
        }
    }
    name
}

/// The file of `vm`'s disk.
fn file_name(vm: &str) -> String {
    escaped(vm) + ".disk"
}

/// The disk `vm` gets under `dirs`, from its record in the store; none for
/// a VM on a shared volume where this node reaches none.
pub fn plan(dirs: &DiskDirs, vm: &str, config: &VmConfig) -> Result<Option<DiskPlan>, String> {
    let workload = disk_workload_of(config)?;
    let (path, size_bytes, placement) = match (&config.storage, &dirs.shared) {
        (StorageSpec::Local { size_bytes }, _) => (
            dirs.local.join(file_name(vm)),
            *size_bytes,
            DiskPlacement::Copied,
        ),
        (StorageSpec::Shared { volume }, Some(shared)) => (
            shared.join(escaped(volume)).join(file_name(vm)),
            config.memory_bytes,
            DiskPlacement::Shared,
        ),
        (StorageSpec::Shared { .. }, None) => return Ok(None),
    };
    Ok(Some(DiskPlan {
        path,
        size_bytes,
        placement,
        workload,
    }))
}

/// Gives `guest` the disk `plan` names: a booting guest opens it (creating
/// and prefilling it the first time), an incoming one starts a copy's empty
/// disk, or opens the shared one. On failure the guest is destroyed.
pub fn attach(
    guest: Arc<dyn Guest>,
    plan: &DiskPlan,
    incoming: bool,
    lease: &ferry_vmm::RunLease,
) -> Result<Arc<dyn Guest>, String> {
    let opened = open(plan, incoming).and_then(|disk| {
        GuestWithDisk::new(guest.clone(), Arc::new(disk), plan.placement, plan.workload)
            .map_err(|e| e.to_string())
    });
    match opened {
        Ok(with_disk) => {
            with_disk.bind_lease(lease.clone());
            Ok(with_disk)
        }
        Err(e) => {
            guest.destroy();
            Err(format!("disk {}: {e}", plan.path.display()))
        }
    }
}

fn open(plan: &DiskPlan, incoming: bool) -> Result<VirtualDisk, String> {
    if incoming && plan.placement == DiskPlacement::Copied {
        return VirtualDisk::create_empty(&plan.path, plan.size_bytes).map_err(|e| e.to_string());
    }
    let (disk, created) =
        VirtualDisk::open_or_create(&plan.path, plan.size_bytes).map_err(|e| e.to_string())?;
    if created && !incoming {
        ferry_vmm::with_disk::prefill(&disk, &plan.workload).map_err(|e| e.to_string())?;
    }
    Ok(disk)
}

/// Removes a guest's disk file if it is the guest's own copy (local
/// storage): after the switchover commit on the source, or when a target
/// discards an aborted copy. A shared disk stays.
pub fn remove_copied_disk(guest: &dyn Guest) {
    let Some(with_disk) = guest.with_disk() else {
        return;
    };
    if with_disk.placement() != DiskPlacement::Copied {
        return;
    }
    if let Err(e) = with_disk.disk().remove() {
        tracing::warn!(disk = %with_disk.disk().path().display(), "could not remove the disk: {e}");
    }
}

impl NodeShared {
    /// From now on, guests started or received here get disks under `dirs`.
    pub fn set_disk_dirs(&self, dirs: DiskDirs) {
        *self.disk_dirs.write().unwrap_or_else(|p| p.into_inner()) = Some(dirs);
    }

    /// This node's disk directories, if it gives guests disks.
    pub fn disk_dirs(&self) -> Option<DiskDirs> {
        self.disk_dirs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `guest` with the disk the store's record of `vm` plans for it here,
    /// or `guest` alone on a node without disk directories.
    pub(crate) fn with_planned_disk(
        &self,
        vm: &str,
        guest: Arc<dyn Guest>,
        incoming: bool,
    ) -> Result<Arc<dyn Guest>, String> {
        // A guest that moves as one byte stream (QEMU) brings its own
        // devices; it gets no disk here.
        let Some(dirs) = self.disk_dirs().filter(|_| guest.as_stream().is_none()) else {
            return Ok(guest);
        };
        let config = self.cluster.read().vms.get(vm).map(|v| v.config.clone());
        let Some(config) = config else {
            guest.destroy();
            return Err(format!("VM {vm} is not in this node's store"));
        };
        match plan(&dirs, vm, &config) {
            Ok(Some(plan)) => attach(guest, &plan, incoming, self.run_lease()),
            Ok(None) => Ok(guest),
            Err(e) => {
                guest.destroy();
                Err(e)
            }
        }
    }

    /// The disk of the guest this node holds for `vm` (running or incoming).
    pub fn disk(&self, vm: &str) -> Option<Arc<VirtualDisk>> {
        crate::node::lock(&self.vms)
            .get(vm)
            .and_then(|h| h.guest.with_disk().map(|d| d.disk().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::vm_config;
    use crate::node::{encode_program, GuestProgram};
    use ferry_vmm::Workload;

    fn dirs() -> DiskDirs {
        DiskDirs {
            local: "/l".into(),
            shared: Some("/s".into()),
        }
    }

    #[test]
    fn local_disks_are_copied_and_shared_ones_are_reached_by_volume() {
        let mut config = vm_config(64 << 20, Workload::uniform(3200, 1), 1);
        let shared = plan(&dirs(), "web/1", &config).unwrap().unwrap();
        assert_eq!(shared.path, PathBuf::from("/s/csv-1/web%2f1.disk"));
        assert_eq!(
            (shared.size_bytes, shared.placement),
            (64 << 20, DiskPlacement::Shared)
        );
        // No trailer: a sixteenth of the memory rate.
        assert_eq!(shared.workload.blocks_per_sec, 200);
        config.storage = StorageSpec::Local {
            size_bytes: 1 << 30,
        };
        let disk = DiskWorkload {
            blocks_per_sec: 77,
            prefill_blocks: 5,
            seed: 9,
        };
        config.workload = encode_program_with_disk(
            &GuestProgram {
                workload: Workload::idle(),
                prefill_seed: None,
                tcp_connections: 0,
            },
            &disk,
        );
        let local = plan(&dirs(), "..", &config).unwrap().unwrap();
        assert_eq!(local.path, PathBuf::from("/l/%2e%2e.disk"));
        assert_eq!(
            (local.size_bytes, local.placement, local.workload),
            (1 << 30, DiskPlacement::Copied, disk)
        );
        // A node without shared volumes still has its local disks.
        let no_shared = DiskDirs {
            shared: None,
            ..dirs()
        };
        assert!(plan(&no_shared, "..", &config).unwrap().is_some());
        // The program itself still reads with the trailer after it.
        assert!(program_of(&config).is_ok());
        config.workload = encode_program(&GuestProgram {
            workload: Workload::idle(),
            prefill_seed: None,
            tcp_connections: 0,
        });
        config.workload.push(0xff);
        assert!(disk_workload_of(&config).is_err());
        config.workload.pop();
        config.storage = StorageSpec::Shared {
            volume: "csv-1".into(),
        };
        assert_eq!(plan(&no_shared, "web", &config), Ok(None));
    }
}
