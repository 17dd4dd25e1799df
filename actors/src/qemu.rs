//! Where a node runs its QEMU guests: Ferry's boot image, written once per
//! process, and a run directory per VM (its QMP and service sockets, QEMU's
//! logs), under `FERRY_QEMU_DIR` or a directory of this process in the
//! system's temporary directory.

use crate::migration::protocol::GuestSpec;
use ferry_vmm::qemu::{guest::QemuGuest, AccelChoice, BootImage, QemuConfig};
use ferry_vmm::Guest;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// Names the directory QEMU guests' files go under.
pub const QEMU_DIR_ENV: &str = "FERRY_QEMU_DIR";

/// This process's QEMU directory.
fn root() -> PathBuf {
    std::env::var_os(QEMU_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ferry-qemu-{}", std::process::id())))
}

/// The boot image, or why this node cannot run QEMU guests (asked once).
fn image() -> Result<BootImage, String> {
    static IMAGE: OnceLock<Result<BootImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            ferry_vmm::qemu::gate::check()?;
            BootImage::prepare(&root().join("image")).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| format!("this node cannot run QEMU guests: {e}"))
}

/// Starts a QEMU guest for `spec`: booted, or (`incoming`) paused and
/// waiting for its stream. `compatibility` picks a baseline CPU model; both
/// ends of a move must pick the same, so the target reads it from the store.
pub(crate) fn build(
    spec: &GuestSpec,
    compatibility: bool,
    incoming: bool,
) -> Result<Arc<dyn Guest>, String> {
    let image = image()?;
    let name = spec
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let mut config = QemuConfig::new(&name, spec.memory_bytes >> 20, image, &root().join("run"));
    config.vcpus = spec.vcpus;
    config.compatibility = compatibility;
    let guest = if incoming {
        QemuGuest::incoming(config)
    } else {
        QemuGuest::boot(config)
    }
    .map_err(|e| e.to_string())?;
    if let Some(accel) = guest.accel() {
        tracing::info!(vm = %name, accel, "QEMU guest started");
    }
    Ok(Arc::new(guest))
}

/// Which accelerator this node's QEMU guests get, for the daemon to say.
pub fn accelerator() -> &'static str {
    ferry_vmm::qemu::resolve_accel(AccelChoice::from_env(AccelChoice::Auto)).name()
}
