//! What a QEMU VM is started with, and the command line that says it.
//!
//! Building the command line is a plain function of the configuration, the
//! chosen accelerator and the run directory, so it is tested without QEMU.
//! Source and target of a migration must be started with the same devices;
//! both are built from the same [`QemuConfig`] and differ only in
//! `-S -incoming defer` on the target.

use super::image::{BootImage, KERNEL_CMDLINE};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Names the accelerator: `kvm`, `tcg` or `auto`.
pub const ACCEL_ENV: &str = "FERRY_QEMU_ACCEL";
/// Names the QEMU binary (default `qemu-system-x86_64` on the `PATH`).
pub const QEMU_ENV: &str = "FERRY_QEMU";

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when `/dev/kvm` is usable (Ferry's KVM probe passes), TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

impl AccelChoice {
    /// From `FERRY_QEMU_ACCEL` (`kvm`, `tcg`, `auto`); `default` when unset
    /// or unrecognised.
    pub fn from_env(default: AccelChoice) -> AccelChoice {
        match std::env::var(ACCEL_ENV).as_deref().map(str::trim) {
            Ok("kvm") => AccelChoice::Kvm,
            Ok("tcg") => AccelChoice::Tcg,
            Ok("auto") => AccelChoice::Auto,
            _ => default,
        }
    }

    /// The accelerator this choice gives, `kvm_usable` saying whether KVM
    /// probed usable on this host.
    pub fn resolve(self, kvm_usable: bool) -> Accel {
        match self {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto if kvm_usable => Accel::Kvm,
            AccelChoice::Auto => Accel::Tcg,
        }
    }
}

/// The accelerator a VM runs under, reported so the daemon can say which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The QEMU CPU model for a VM: a baseline every x86-64 node has in processor
/// compatibility mode, so the VM can move to any node; the host's own CPU (or
/// everything TCG emulates) otherwise.
pub fn cpu_model(compatibility: bool, accel: Accel) -> &'static str {
    match (compatibility, accel) {
        (true, _) => "qemu64",
        (false, Accel::Kvm) => "host",
        (false, Accel::Tcg) => "max",
    }
}

/// A QEMU VM's settings.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Used in the run directory's name and QEMU's `-name`.
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub accel: AccelChoice,
    /// Processor compatibility mode: a baseline CPU model.
    pub compatibility: bool,
    pub image: BootImage,
    /// The caller's directory under which the VM's run directory (sockets,
    /// logs) is made; the run directory is removed when the VM is destroyed.
    pub run_root: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// How long the guest may take to boot until its service answers.
    pub boot_timeout: Duration,
    /// How long one QMP command may take to be answered.
    pub command_timeout: Duration,
    /// How long one append or read of the service may take.
    pub service_timeout: Duration,
}

impl QemuConfig {
    /// A VM of `memory_mib` with one vCPU, the accelerator from
    /// `FERRY_QEMU_ACCEL` (else [`AccelChoice::Auto`]), and the QEMU binary
    /// from `FERRY_QEMU` (else `qemu-system-x86_64`).
    pub fn new(name: &str, memory_mib: u64, image: BootImage, run_root: &Path) -> Self {
        QemuConfig {
            name: name.into(),
            memory_mib,
            vcpus: 1,
            accel: AccelChoice::from_env(AccelChoice::Auto),
            compatibility: false,
            image,
            run_root: run_root.into(),
            qemu: std::env::var_os(QEMU_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
            boot_timeout: Duration::from_secs(120),
            command_timeout: Duration::from_secs(10),
            service_timeout: Duration::from_secs(5),
        }
    }
}

/// The files of one VM's run directory.
#[derive(Debug, Clone)]
pub struct RunFiles {
    pub dir: PathBuf,
    pub qmp: PathBuf,
    /// A second QMP monitor for watchers outside Ferry (tests checking that
    /// no two copies of a VM run at once); Ferry itself never uses it.
    pub observe: PathBuf,
    pub service: PathBuf,
    pub console: PathBuf,
    pub log: PathBuf,
}

impl RunFiles {
    pub fn in_dir(dir: &Path) -> Self {
        RunFiles {
            dir: dir.into(),
            qmp: dir.join("qmp.sock"),
            observe: dir.join("observe.sock"),
            service: dir.join("service.sock"),
            console: dir.join("console.log"),
            log: dir.join("qemu.log"),
        }
    }
}

/// QEMU's arguments. `incoming` starts the VM paused, waiting for
/// `migrate-incoming`.
pub fn arguments(
    config: &QemuConfig,
    accel: Accel,
    files: &RunFiles,
    incoming: bool,
) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = [
        "-name",
        &format!("ferry-{}", config.name),
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-machine",
        "pc",
        "-accel",
        accel.name(),
        "-cpu",
        cpu_model(config.compatibility, accel),
        "-m",
        &config.memory_mib.to_string(),
        "-smp",
        &config.vcpus.to_string(),
        "-kernel",
        &path(&config.image.kernel),
        "-initrd",
        &path(&config.image.initramfs),
        "-append",
        KERNEL_CMDLINE,
        "-chardev",
        &format!("socket,id=qmp,path={},server=on,wait=off", path(&files.qmp)),
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        &format!(
            "socket,id=observe,path={},server=on,wait=off",
            path(&files.observe)
        ),
        "-mon",
        "chardev=observe,mode=control",
        // ttyS0: the kernel's console, kept for diagnosis.
        "-chardev",
        &format!("file,id=console,path={}", path(&files.console)),
        "-serial",
        "chardev:console",
        // ttyS1: the append service.
        "-chardev",
        &format!(
            "socket,id=service,path={},server=on,wait=off",
            path(&files.service)
        ),
        "-serial",
        "chardev:service",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if incoming {
        args.extend(["-S", "-incoming", "defer"].map(String::from));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        let image = BootImage {
            kernel: "/k/vmlinuz".into(),
            initramfs: "/r/init.cpio".into(),
        };
        let mut config = QemuConfig::new("vm1", 256, image, Path::new("/run/ferry"));
        config.vcpus = 2;
        config
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn the_command_line_names_memory_cpu_accel_and_sockets() {
        let files = RunFiles::in_dir(Path::new("/run/ferry/vm1"));
        let args = arguments(&config(), Accel::Tcg, &files, false);
        assert_eq!(after(&args, "-m"), ["256"]);
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert_eq!(after(&args, "-accel"), ["tcg"]);
        assert_eq!(after(&args, "-cpu"), ["max"]);
        assert_eq!(after(&args, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(
            after(&args, "-serial"),
            ["chardev:console", "chardev:service"]
        );
        let chardevs = after(&args, "-chardev");
        assert!(chardevs[0].contains("path=/run/ferry/vm1/qmp.sock,server=on,wait=off"));
        assert!(chardevs[1].contains("path=/run/ferry/vm1/observe.sock,server=on,wait=off"));
        assert_eq!(
            after(&args, "-mon"),
            ["chardev=qmp,mode=control", "chardev=observe,mode=control"]
        );
        assert!(chardevs[3].contains("path=/run/ferry/vm1/service.sock"));
        assert!(args.contains(&"-nodefaults".to_string()));
        assert!(!args.contains(&"-S".to_string()));

        let target = arguments(&config(), Accel::Kvm, &files, true);
        assert_eq!(after(&target, "-incoming"), ["defer"]);
        assert!(target.contains(&"-S".to_string()));
        assert_eq!(after(&target, "-cpu"), ["host"]);
    }

    #[test]
    fn compatibility_mode_is_a_baseline_model_and_auto_needs_usable_kvm() {
        assert_eq!(cpu_model(true, Accel::Kvm), "qemu64");
        assert_eq!(cpu_model(true, Accel::Tcg), "qemu64");
        assert_eq!(AccelChoice::Auto.resolve(true), Accel::Kvm);
        assert_eq!(AccelChoice::Auto.resolve(false), Accel::Tcg);
        assert_eq!(AccelChoice::Kvm.resolve(false), Accel::Kvm);
        assert_eq!(AccelChoice::Tcg.resolve(true), Accel::Tcg);
    }
}
