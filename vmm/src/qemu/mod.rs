//! The QEMU guest: a Linux VM run by a QEMU process Ferry starts, watches over
//! QMP, serves an append service from, fences, and migrates.
//!
//! A QEMU VM does not fit the page-based [`Guest`](crate::Guest) trait: QEMU
//! migrates itself as one byte stream. So [`QemuVm`] offers the migration as
//! explicit steps ([`migration`]) that Ferry's migration engine drives, with
//! Ferry carrying the stream between a Unix socket on each node.
//!
//! - [`image`]: Ferry's boot image (the distribution's kernel, an initramfs
//!   written from busybox with the append service as `/init`).
//! - [`qmp`]: the QMP client, every call with a deadline.
//! - [`append`]: the append service's line protocol and client.
//! - [`config`]: the VM's settings and QEMU's command line.
//! - [`fence`]: stops the VM when its [`RunLease`] stops holding.
//! - [`gate`]: whether this host can run QEMU guests (for tests and the daemon).
//!
//! Each VM has a run directory under the caller's `run_root` holding the QMP
//! and service sockets and QEMU's logs; destroying the VM (or dropping it)
//! kills and reaps the process and removes the directory.

pub mod append;
pub mod config;
pub mod cpio;
mod fence;
pub mod gate;
pub mod guest;
pub mod image;
mod lines;
pub mod migration;
pub mod qmp;
mod spawner;

pub use config::{Accel, AccelChoice, QemuConfig, RunFiles};
pub use gate::usable_or_skip;
pub use image::BootImage;
pub use migration::{MigrationProgress, MigrationSettings, MigrationStatus};
pub use qmp::{Qmp, QmpError, QmpEvent};

use crate::lease::RunLease;
use crate::service::ServiceError;
use append::AppendClient;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a service ping may take while waiting for the guest to boot.
const BOOT_PING: Duration = Duration::from_millis(500);
/// How often the boot wait retries while QEMU's sockets are not there yet.
const RETRY: Duration = Duration::from_millis(20);

/// Why a QEMU VM step failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QemuError {
    #[error("run directory {path}: {error}")]
    RunDir { path: String, error: String },
    #[error("cannot start {qemu}: {error}")]
    Spawn { qemu: String, error: String },
    #[error("QEMU exited ({status}); its log ends: {log}")]
    Exited { status: String, log: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        waiting_for: String,
        after: Duration,
    },
    #[error("migration ended {status}: {}", error.as_deref().unwrap_or("no error given"))]
    Migration {
        status: String,
        error: Option<String>,
    },
    #[error("the VM's run lease does not hold: it may not run here")]
    Fenced,
    #[error("QEMU answered something unexpected: {0}")]
    Protocol(String),
}

/// A QEMU VM on this node: the process, its QMP session and a connection to
/// its append service.
pub struct QemuVm {
    config: QemuConfig,
    accel: Accel,
    files: RunFiles,
    child: Mutex<Option<Child>>,
    qmp: Arc<Mutex<Qmp>>,
    service: Mutex<Option<AppendClient>>,
    fence: fence::Fence,
    booted_in: Option<Duration>,
}

impl QemuVm {
    /// Starts the VM and waits until its append service answers (within
    /// `config.boot_timeout`).
    pub fn start(config: QemuConfig) -> Result<QemuVm, QemuError> {
        let started = Instant::now();
        let mut vm = Self::spawn(config, false)?;
        let deadline = started + vm.config.boot_timeout;
        loop {
            vm.check_alive()?;
            let answered = vm.with_service(|client| client.ping(BOOT_PING));
            if answered.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Timeout {
                    waiting_for: "the guest's append service to answer".into(),
                    after: vm.config.boot_timeout,
                });
            }
            if matches!(answered, Err(ServiceError::NotRunning)) {
                std::thread::sleep(RETRY);
            }
        }
        vm.booted_in = Some(started.elapsed());
        Ok(vm)
    }

    /// Starts the VM as a migration target: paused (`-S`), waiting for
    /// [`accept_incoming`](Self::accept_incoming). Returns once QMP answers.
    pub fn start_incoming(config: QemuConfig) -> Result<QemuVm, QemuError> {
        Self::spawn(config, true)
    }

    fn spawn(config: QemuConfig, incoming: bool) -> Result<QemuVm, QemuError> {
        let accel = resolve_accel(config.accel);
        let dir = config
            .run_root
            .join(format!("qemu-{}-{}", config.name, unique()));
        let files = RunFiles::in_dir(&dir);
        for socket in [&files.qmp, &files.observe, &files.service] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(run_dir_error(
                    &dir,
                    "socket path too long for a Unix socket",
                ));
            }
        }
        std::fs::create_dir_all(&dir).map_err(|e| run_dir_error(&dir, &e.to_string()))?;
        let log =
            std::fs::File::create(&files.log).map_err(|e| run_dir_error(&dir, &e.to_string()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| run_dir_error(&dir, &e.to_string()))?;
        let mut command = Command::new(&config.qemu);
        command
            .args(config::arguments(&config, accel, &files, incoming))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = spawner::spawn(command);
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(QemuError::Spawn {
                    qemu: config.qemu.display().to_string(),
                    error: e.to_string(),
                });
            }
        };
        let child = Mutex::new(Some(child));
        // Until the QMP session exists there is no QemuVm whose drop cleans up.
        let qmp = match connect_qmp(&child, &files, &config) {
            Ok(qmp) => qmp,
            Err(e) => {
                kill_and_reap(&child);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let qmp = Arc::new(Mutex::new(qmp));
        Ok(QemuVm {
            fence: fence::Fence::new(qmp.clone()),
            config,
            accel,
            files,
            child,
            qmp,
            service: Mutex::new(None),
            booted_in: None,
        })
    }

    /// The accelerator QEMU runs this VM under.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// How long [`start`](Self::start) took until the service answered.
    pub fn booted_in(&self) -> Option<Duration> {
        self.booted_in
    }

    /// How long one QMP command may take.
    pub(crate) fn config_command_timeout(&self) -> Duration {
        self.config.command_timeout
    }

    /// The QEMU process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// The run directory (sockets, `console.log`, `qemu.log`).
    pub fn files(&self) -> &RunFiles {
        &self.files
    }

    /// Runs a QMP command (within the configured command timeout).
    pub fn qmp(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QemuError> {
        let answer = self.lock_qmp().execute(command, arguments);
        match answer {
            Err(QmpError::Closed) => {
                self.check_alive()?;
                Err(QmpError::Closed.into())
            }
            other => Ok(other?),
        }
    }

    /// The events QEMU sent so far, oldest first (taken: a second call
    /// returns only newer ones).
    pub fn take_events(&self) -> Vec<QmpEvent> {
        self.lock_qmp().take_events()
    }

    /// QEMU's run state (`running`, `paused`, `inmigrate`, `postmigrate`,
    /// `finish-migrate`, ...).
    pub fn run_status(&self) -> Result<String, QemuError> {
        let answer = self.qmp("query-status", None)?;
        answer
            .get("status")
            .and_then(serde_json::Value::as_str)
            .map(String::from)
            .ok_or_else(|| QemuError::Protocol(format!("query-status without a status: {answer}")))
    }

    /// Whether the vCPUs run (`query-status`'s `running`).
    pub fn is_running(&self) -> Result<bool, QemuError> {
        let answer = self.qmp("query-status", None)?;
        answer
            .get("running")
            .and_then(serde_json::Value::as_bool)
            .ok_or_else(|| QemuError::Protocol(format!("query-status without running: {answer}")))
    }

    /// Stops the vCPUs now (QMP `stop`).
    pub fn pause(&self) -> Result<(), QemuError> {
        self.qmp("stop", None)?;
        Ok(())
    }

    /// Lets the vCPUs run (QMP `cont`): a target after its commit, or a
    /// paused VM. Refuses while the run lease does not hold.
    pub fn resume(&self) -> Result<(), QemuError> {
        if !self.fence.holds() {
            return Err(QemuError::Fenced);
        }
        self.qmp("cont", None)?;
        Ok(())
    }

    /// Binds the VM to `lease`: from now on the VM is stopped (QMP `stop`)
    /// as soon as the lease stops holding, appends are refused with
    /// [`ServiceError::Fenced`], and [`resume`](Self::resume) refuses. A
    /// fenced VM stays paused until `resume` is called with the lease holding.
    pub fn bind_lease(&self, lease: RunLease) {
        self.fence.bind(lease);
    }

    /// Appends a record to the guest's service; its sequence number once the
    /// guest stored it. [`ServiceError::Paused`] when the guest does not
    /// answer within the service timeout.
    pub fn append(&self, record: &[u8]) -> Result<u64, ServiceError> {
        self.append_within(record, self.config.service_timeout)
    }

    /// [`append`](Self::append) with its own timeout.
    pub fn append_within(&self, record: &[u8], timeout: Duration) -> Result<u64, ServiceError> {
        if !self.fence.holds() {
            return Err(ServiceError::Fenced);
        }
        let seq = self.with_service(|client| client.append(record, timeout))?;
        // An answer that came after the lease ran out is no acknowledgement.
        if !self.fence.holds() {
            return Err(ServiceError::Fenced);
        }
        Ok(seq)
    }

    /// Every record in the guest's log, in order, as (sequence number, bytes).
    pub fn records(&self) -> Result<Vec<(u64, Vec<u8>)>, ServiceError> {
        let timeout = self.config.service_timeout;
        self.with_service(|client| client.records(timeout))
    }

    /// Kills and reaps the QEMU process and removes the run directory.
    pub fn destroy(self) {
        drop(self);
    }

    fn with_service<T>(
        &self,
        call: impl FnOnce(&mut AppendClient) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let mut service = lock(&self.service);
        if service.is_none() {
            *service = Some(AppendClient::connect(&self.files.service)?);
        }
        let client = service.as_mut().ok_or(ServiceError::NotRunning)?;
        let result = call(client);
        if matches!(result, Err(ServiceError::NotRunning)) {
            // The connection broke: connect afresh next time.
            *service = None;
        }
        result
    }

    pub(crate) fn lock_qmp(&self) -> MutexGuard<'_, Qmp> {
        lock(&self.qmp)
    }

    pub(crate) fn fence_holds(&self) -> bool {
        self.fence.holds()
    }

    /// An [`QemuError::Exited`] once the process has exited.
    pub(crate) fn check_alive(&self) -> Result<(), QemuError> {
        check_alive(&self.child, &self.files)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.fence.stop();
        kill_and_reap(&self.child);
        let _ = std::fs::remove_dir_all(&self.files.dir);
    }
}

fn connect_qmp(
    child: &Mutex<Option<Child>>,
    files: &RunFiles,
    config: &QemuConfig,
) -> Result<Qmp, QemuError> {
    let timeout = config.command_timeout.max(Duration::from_secs(10));
    let deadline = Instant::now() + timeout;
    loop {
        check_alive(child, files)?;
        match Qmp::connect(&files.qmp, config.command_timeout) {
            Ok(qmp) => return Ok(qmp),
            Err(_) if Instant::now() < deadline => std::thread::sleep(RETRY),
            Err(e) => return Err(e.into()),
        }
    }
}

fn check_alive(child: &Mutex<Option<Child>>, files: &RunFiles) -> Result<(), QemuError> {
    let mut child = lock(child);
    let status = match child.as_mut().map(Child::try_wait) {
        None => "destroyed".to_string(),
        Some(Ok(None)) => return Ok(()),
        Some(Ok(Some(status))) => status.to_string(),
        Some(Err(e)) => e.to_string(),
    };
    Err(QemuError::Exited {
        status,
        log: log_tail(files),
    })
}

fn kill_and_reap(child: &Mutex<Option<Child>>) {
    if let Some(mut child) = lock(child).take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The end of QEMU's own log and of the guest console, for error messages.
fn log_tail(files: &RunFiles) -> String {
    let tail = |path: &std::path::Path| {
        let text = std::fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text[text.len().saturating_sub(600)..]).into_owned();
        text.trim().replace('\n', " | ")
    };
    format!(
        "qemu: [{}] console: [{}]",
        tail(&files.log),
        tail(&files.console)
    )
}

fn run_dir_error(dir: &std::path::Path, error: &str) -> QemuError {
    QemuError::RunDir {
        path: dir.display().to_string(),
        error: error.into(),
    }
}

/// The accelerator `choice` gives on this host.
pub fn resolve_accel(choice: AccelChoice) -> Accel {
    choice.resolve(kvm_usable(choice))
}

/// Whether [`AccelChoice::Auto`] finds KVM usable (probed only for `Auto`):
/// a KVM that works and runs on the processor's own virtualization
/// (`kvm_intel` or `kvm_amd`). A software KVM such as PVM (`kvm_pvm`, on
/// cloud VMs without nested virtualization) runs guest kernel code so slowly
/// that Linux does not boot in minutes; TCG boots it in seconds.
fn kvm_usable(choice: AccelChoice) -> bool {
    #[cfg(target_os = "linux")]
    if choice == AccelChoice::Auto {
        let hardware = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
            .iter()
            .any(|m| std::path::Path::new(m).exists());
        return hardware && crate::kvm::probe().is_ok();
    }
    let _ = choice;
    false
}

/// A name part no other VM of this process (or another process) uses.
fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The engine drives a VM from several tasks (steps, progress, the fence).
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<QemuVm>();
};
