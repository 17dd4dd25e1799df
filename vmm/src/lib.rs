//! Guests: the [`Guest`] trait a live-migration engine drives, and its backends.
//!
//! A guest is memory (4 KiB pages), a dirty log, vCPUs that can be paused,
//! resumed and throttled, device state that can be saved and restored, and a
//! digest that lets two guests be compared. [`SimGuest`] is a simulated guest
//! with real memory and real vCPU threads writing into it; it also runs a small
//! append service whose state lives in guest memory, so tests can prove that no
//! acknowledged write is lost across a move.
//!
//! A guest runs only while the [`RunLease`] bound to it holds: its vCPUs and
//! its service check the lease themselves, so a node whose cluster lease ran
//! out (or a process resumed after a long stop) runs no guest work and
//! acknowledges no append, even before anyone pauses the guest.

pub mod cpu;
pub mod dirty;
pub mod disk;
pub mod guest;
#[cfg(target_os = "linux")]
pub mod kvm;
pub mod lease;
pub mod local;
pub mod memory;
#[cfg(target_os = "linux")]
pub mod qemu;
pub mod service;
pub mod sim;
pub mod state;
pub mod stream;
pub mod with_disk;
pub mod workload;

pub use dirty::DirtyBitmap;
pub use disk::VirtualDisk;
pub use guest::{Guest, GuestError, GuestResult, MemoryDigest, PAGE_SIZE};
#[cfg(target_os = "linux")]
pub use kvm::{KvmGuest, KvmGuestConfig};
pub use lease::RunLease;
#[cfg(target_os = "linux")]
pub use qemu::{QemuConfig, QemuVm};
pub use service::{ServiceError, SERVICE_PAGES};
pub use sim::{SimGuest, SimGuestConfig};
pub use state::{DeviceState, NicState, VcpuState, DEVICE_STATE_VERSION};
pub use stream::{StreamGuest, StreamProgress, StreamSettings, StreamStatus};
pub use with_disk::{DiskPlacement, DiskWorkload, GuestWithDisk};
pub use workload::{Pattern, Workload};
