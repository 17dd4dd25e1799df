//! Whether this host can run QEMU guests, for the tests and the daemon.
//!
//! A QEMU guest needs the QEMU binary, a kernel and a static busybox. A test
//! that lacks one skips, printing `SKIPPED qemu: <test>: <reason>` — unless
//! `FERRY_CI_PROVIDES` names `qemu` (`.ci/run` installs the packages and
//! extracts the kernel, then says so), where it fails instead.

use super::config::QEMU_ENV;
use super::image::{find_busybox, find_kernel, BootImage};
use crate::kvm::ci_provides;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What is missing for QEMU guests here, or `Ok` with the QEMU binary.
pub fn check() -> Result<PathBuf, String> {
    let qemu: PathBuf = std::env::var_os(QEMU_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| "qemu-system-x86_64".into());
    let version = Command::new(&qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match version {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(format!(
                "{} --version failed ({})",
                qemu.display(),
                out.status
            ))
        }
        Err(e) => {
            return Err(format!(
                "no {} ({e}; install qemu-system-x86)",
                qemu.display()
            ))
        }
    }
    find_kernel().map_err(|e| e.to_string())?;
    find_busybox().map_err(|e| e.to_string())?;
    Ok(qemu)
}

/// The gate every QEMU test passes first: the boot image, written into
/// `dir`, when QEMU guests can run here. Otherwise prints
/// `SKIPPED qemu: <what>: <reason>` and returns `None`, or panics where
/// `FERRY_CI_PROVIDES` names `qemu`. Lines go to stderr, past the test
/// harness's capture, so a log always shows whether the QEMU tests ran.
pub fn usable_or_skip(what: &str, dir: &Path) -> Option<BootImage> {
    let ready = check().and_then(|_| BootImage::prepare(dir).map_err(|e| e.to_string()));
    let line = match gate(what, ready, ci_provides("qemu")) {
        Gate::Run(image) => {
            let line = format!("RUNNING qemu: {what} (kernel {})\n", image.kernel.display());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            return Some(image);
        }
        Gate::Fail(message) => panic!("{message}"),
        Gate::Skip(line) => line + "\n",
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    None
}

/// What a QEMU test does with what [`check`] and the image found.
#[derive(Debug, PartialEq)]
enum Gate {
    Run(BootImage),
    Skip(String),
    Fail(String),
}

fn gate(what: &str, ready: Result<BootImage, String>, ci_provides_qemu: bool) -> Gate {
    match ready {
        Ok(image) => Gate::Run(image),
        Err(reason) if ci_provides_qemu => Gate::Fail(format!(
            "FERRY_CI_PROVIDES says it provides qemu, but: {what}: {reason}"
        )),
        Err(reason) => Gate::Skip(format!("SKIPPED qemu: {what}: {reason}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_part_skips_unless_ci_provides_qemu() {
        let missing = || Err("no kernel".to_string());
        assert_eq!(
            gate("t", missing(), false),
            Gate::Skip("SKIPPED qemu: t: no kernel".into())
        );
        match gate("t", missing(), true) {
            Gate::Fail(m) => assert!(m.contains("provides qemu") && m.contains("t: no kernel")),
            other => panic!("{other:?}"),
        }
        let image = BootImage {
            kernel: "/k".into(),
            initramfs: "/i".into(),
        };
        assert_eq!(gate("t", Ok(image.clone()), true), Gate::Run(image));
    }
}
