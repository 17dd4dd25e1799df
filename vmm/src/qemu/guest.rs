//! [`QemuGuest`]: a [`QemuVm`] behind the [`Guest`] trait the node and the
//! migration engine drive, with its migration as a [`StreamGuest`].
//!
//! A QEMU VM's memory is QEMU's: Ferry never reads or writes its pages, and
//! its device state travels inside its own stream. So the page methods
//! refuse with a clear error, and the migration engine takes the stream path
//! (`Guest::as_stream`). Pause, resume, the run lease and the append service
//! are the VM's own.

use super::{MigrationProgress, MigrationSettings, MigrationStatus, QemuConfig, QemuError, QemuVm};
use crate::dirty::DirtyBitmap;
use crate::guest::{Guest, GuestError, GuestResult, MemoryDigest, PAGE_SIZE};
use crate::lease::RunLease;
use crate::service::ServiceError;
use crate::state::DeviceState;
use crate::stream::{StreamGuest, StreamProgress, StreamSettings, StreamStatus};
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// The backend name.
pub const KIND: &str = "qemu";
/// How long an append may wait for the guest: short, so an append caught by
/// a pause fails fast and the client retries where the VM runs next.
const APPEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long cancelling an outgoing migration may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one wait for a QMP event holds the monitor: appends and the
/// fence share it.
const EVENT_WAIT: Duration = Duration::from_millis(10);

/// A QEMU VM as a Ferry guest.
pub struct QemuGuest {
    vm: RwLock<Option<QemuVm>>,
    pages: u64,
    run_dir: PathBuf,
}

impl QemuGuest {
    /// Starts a VM and waits for its service (a boot: seconds under TCG).
    pub fn boot(config: QemuConfig) -> Result<QemuGuest, QemuError> {
        let pages = pages_of(&config);
        Ok(Self::wrap(QemuVm::start(config)?, pages))
    }

    /// Starts a VM paused, waiting for an incoming stream.
    pub fn incoming(config: QemuConfig) -> Result<QemuGuest, QemuError> {
        let pages = pages_of(&config);
        Ok(Self::wrap(QemuVm::start_incoming(config)?, pages))
    }

    fn wrap(vm: QemuVm, pages: u64) -> QemuGuest {
        QemuGuest {
            pages,
            run_dir: vm.files().dir.clone(),
            vm: RwLock::new(Some(vm)),
        }
    }

    /// The VM, while it is not destroyed.
    fn vm(&self) -> GuestResult<VmRef<'_>> {
        let guard = self.vm.read().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            return Err(GuestError::Destroyed);
        }
        Ok(VmRef(guard))
    }

    /// The accelerator QEMU runs with (`kvm` or `tcg`).
    pub fn accel(&self) -> Option<&'static str> {
        self.vm().ok().map(|vm| vm.get().accel().name())
    }

    /// The QEMU process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.vm().ok().and_then(|vm| vm.get().pid())
    }
}

/// A read guard on a live VM.
struct VmRef<'a>(RwLockReadGuard<'a, Option<QemuVm>>);

impl VmRef<'_> {
    fn get(&self) -> &QemuVm {
        // Checked by `QemuGuest::vm`, and nothing takes the VM out while a
        // read guard is held.
        self.0.as_ref().expect("a VmRef holds a live VM")
    }
}

fn pages_of(config: &QemuConfig) -> u64 {
    config.memory_mib * ((1 << 20) / PAGE_SIZE as u64)
}

fn backend(e: QemuError) -> GuestError {
    GuestError::Backend(e.to_string())
}

fn not_pages(what: &str) -> GuestError {
    GuestError::Backend(format!(
        "a QEMU VM's memory is QEMU's ({what}): it moves as one stream"
    ))
}

impl Guest for QemuGuest {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn page_count(&self) -> u64 {
        self.pages
    }

    fn read_pages(&self, _first: u64, _buf: &mut [u8]) -> GuestResult<()> {
        Err(not_pages("reading pages"))
    }

    fn write_pages(&self, _first: u64, _data: &[u8]) -> GuestResult<()> {
        Err(not_pages("writing pages"))
    }

    fn zero_pages(&self, _first: u64, _count: u64) -> GuestResult<()> {
        Err(not_pages("zeroing pages"))
    }

    fn fetch_and_clear_dirty(&self, _bitmap: &mut DirtyBitmap) -> GuestResult<()> {
        Err(not_pages("its dirty log"))
    }

    fn start_dirty_log(&self) -> GuestResult<()> {
        Err(not_pages("its dirty log"))
    }

    fn pause(&self) -> GuestResult<()> {
        self.vm()?.get().pause().map_err(backend)
    }

    fn resume(&self) -> GuestResult<()> {
        self.vm()?.get().resume().map_err(backend)
    }

    fn is_paused(&self) -> bool {
        // A VM that cannot say counts as paused: nothing resumes it blindly,
        // and `resume` itself asks QEMU.
        !matches!(self.vm().map(|vm| vm.get().is_running()), Ok(Ok(true)))
    }

    fn bind_lease(&self, lease: RunLease) {
        if let Ok(vm) = self.vm() {
            vm.get().bind_lease(lease);
        }
    }

    fn set_throttle(&self, share: f64) -> GuestResult<()> {
        // QEMU throttles itself (auto-converge); Ferry only ever resets it.
        if share == 0.0 {
            Ok(())
        } else {
            Err(GuestError::Backend(
                "a QEMU VM throttles itself (auto-converge)".into(),
            ))
        }
    }

    fn save_state(&self) -> GuestResult<DeviceState> {
        Err(GuestError::Backend(
            "a QEMU VM's device state travels in its own stream".into(),
        ))
    }

    fn restore_state(&self, _state: &DeviceState) -> GuestResult<()> {
        Err(GuestError::Backend(
            "a QEMU VM's device state travels in its own stream".into(),
        ))
    }

    fn digest(&self) -> GuestResult<MemoryDigest> {
        Err(not_pages("a digest"))
    }

    fn service_append(&self, record: &[u8]) -> Result<u64, ServiceError> {
        let vm = self.vm().map_err(|_| ServiceError::NotRunning)?;
        let vm = vm.get();
        // A paused guest answers nothing: say so now rather than after the
        // timeout, so the client tries again where the VM runs next.
        match vm.is_running() {
            Ok(true) => vm.append_within(record, APPEND_TIMEOUT),
            Ok(false) => Err(ServiceError::Paused),
            Err(_) => Err(ServiceError::NotRunning),
        }
    }

    fn service_records(&self) -> Result<Vec<(u64, Vec<u8>)>, ServiceError> {
        let vm = self.vm().map_err(|_| ServiceError::NotRunning)?;
        vm.get().records()
    }

    fn destroy(&self) {
        let vm = self
            .vm
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(vm) = vm {
            vm.destroy();
        }
    }

    fn as_stream(&self) -> Option<&dyn StreamGuest> {
        Some(self)
    }
}

fn status_of(p: &MigrationProgress) -> StreamStatus {
    match &p.status {
        MigrationStatus::None => StreamStatus::None,
        MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Device => {
            StreamStatus::Active
        }
        MigrationStatus::PreSwitchover => StreamStatus::PreSwitchover,
        MigrationStatus::Completed => StreamStatus::Completed,
        MigrationStatus::Failed => StreamStatus::Failed(
            p.error
                .clone()
                .unwrap_or_else(|| "QEMU gave no reason".into()),
        ),
        MigrationStatus::Cancelling | MigrationStatus::Cancelled => StreamStatus::Cancelled,
        // Statuses Ferry does not drive (postcopy, unplug waits) are still
        // under way.
        MigrationStatus::Other(_) => StreamStatus::Active,
    }
}

impl StreamGuest for QemuGuest {
    fn run_dir(&self) -> PathBuf {
        self.run_dir.clone()
    }

    fn start_outgoing(&self, socket: &Path, settings: &StreamSettings) -> GuestResult<()> {
        let vm = self.vm()?;
        let vm = vm.get();
        vm.prepare_outgoing(&MigrationSettings {
            downtime_limit: settings.downtime_limit,
            max_bandwidth: settings.max_bandwidth,
            auto_converge: settings.auto_converge,
        })
        .map_err(backend)?;
        vm.start_outgoing(socket).map_err(backend)
    }

    fn outgoing(&self) -> GuestResult<StreamProgress> {
        let p = self.vm()?.get().progress().map_err(backend)?;
        Ok(progress_of(&p))
    }

    fn wait_outgoing(&self, timeout: Duration) -> GuestResult<StreamProgress> {
        self.wait_settled(timeout).map(|p| progress_of(&p))
    }

    fn continue_switchover(&self) -> GuestResult<()> {
        self.vm()?.get().continue_switchover().map_err(backend)
    }

    fn cancel_outgoing(&self) -> GuestResult<()> {
        let vm = self.vm()?;
        let vm = vm.get();
        // A completed migration is past cancelling (`migrate_cancel` does
        // nothing, and waiting for `cancelled` would only time out): the
        // source stays paused, and `resume` runs it again.
        match vm.progress().map_err(backend)?.status {
            MigrationStatus::Completed | MigrationStatus::None => Ok(()),
            _ => vm.cancel_outgoing(CANCEL_TIMEOUT).map_err(backend),
        }
    }

    fn dirty_rate(&self, window: Duration) -> GuestResult<f64> {
        self.vm()?.get().dirty_rate(window).map_err(backend)
    }

    fn accept_incoming(&self, socket: &Path) -> GuestResult<()> {
        self.vm()?.get().accept_incoming(socket).map_err(backend)
    }

    fn incoming(&self) -> GuestResult<StreamStatus> {
        let p = self.vm()?.get().progress().map_err(backend)?;
        Ok(status_of(&p))
    }

    fn wait_incoming(&self, timeout: Duration) -> GuestResult<StreamStatus> {
        self.wait_settled(timeout).map(|p| status_of(&p))
    }
}

impl QemuGuest {
    /// `query-migrate` once its status is no longer `None`/`Active`, or at
    /// `timeout`; between looks it waits for QEMU's next event (a status
    /// change sends a `MIGRATION` event), never longer than `EVENT_WAIT`.
    fn wait_settled(&self, timeout: Duration) -> GuestResult<MigrationProgress> {
        let vm = self.vm()?;
        let vm = vm.get();
        let deadline = Instant::now() + timeout;
        loop {
            let p = vm.progress().map_err(backend)?;
            let now = Instant::now();
            if !matches!(status_of(&p), StreamStatus::None | StreamStatus::Active)
                || now >= deadline
            {
                return Ok(p);
            }
            vm.lock_qmp()
                .wait_for_event(deadline.min(now + EVENT_WAIT))
                .map_err(|e| backend(e.into()))?;
        }
    }
}

fn progress_of(p: &MigrationProgress) -> StreamProgress {
    StreamProgress {
        status: status_of(p),
        round: p.round,
        transferred: p.transferred_bytes,
        remaining: p.remaining_bytes,
        total: p.total_bytes,
        rate: p.rate_bps / 8.0,
        expected_downtime: p.expected_downtime,
    }
}
