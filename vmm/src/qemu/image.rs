//! Ferry's boot image for QEMU guests: the distribution's kernel and an
//! initramfs Ferry writes itself from busybox and an `/init` script.
//!
//! The init mounts the pseudo file systems and runs the append service on the
//! second serial port (`ttyS1`; `ttyS0` is the kernel's console). The service
//! is a busybox shell loop that keeps its log in `/run/ferry/log` — the
//! initramfs root is a RAM file system, so the log is guest memory and moves
//! with the VM. The protocol is in [`super::append`].
//!
//! Where the parts are found: the kernel from `FERRY_QEMU_KERNEL`, else the
//! newest `vmlinuz-*` under `/var/cache/ferry/kernel/boot` (where `.ci/run`
//! extracts Debian's kernel package), else under `/boot`; busybox from
//! `FERRY_BUSYBOX`, else `/bin/busybox` or `/usr/bin/busybox`, and it must be
//! statically linked (the initramfs has no shared libraries).

use super::cpio::Cpio;
use std::path::{Path, PathBuf};

/// Names the kernel image to boot.
pub const KERNEL_ENV: &str = "FERRY_QEMU_KERNEL";
/// Names the static busybox to put in the initramfs.
pub const BUSYBOX_ENV: &str = "FERRY_BUSYBOX";
/// Where `.ci/run` extracts the distribution's kernel package.
pub const KERNEL_CACHE: &str = "/var/cache/ferry/kernel";
/// The file name of the initramfs in the directory it is written to.
pub const INITRAMFS_NAME: &str = "ferry-initramfs.cpio";

/// The kernel command line: console on the first serial port, no reboot on
/// panic (QEMU runs with `-no-reboot`, so the process exits instead).
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 8250.nr_uarts=4";

/// The guest's `/init`. Replies carry the request's tag so a client can tell
/// a late answer from the one it waits for.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /run/ferry
touch /run/ferry/log
echo "ferry: init up, append service on ttyS1"

serve() {
  exec 3<>/dev/ttyS1
  stty raw -echo <&3
  seq=$(wc -l < /run/ferry/log)
  while read -r cmd tag a b <&3; do
    case "$cmd" in
      '') ;;
      P) echo "PONG $tag" >&3 ;;
      A)
        # A record cut short (its line split by a pause or a move) fails
        # the length check and is refused, never stored.
        case "$a" in ''|*[!0-9]*) a=-1 ;; esac
        case "$b" in *[!0-9a-f]*) a=-1 ;; esac
        if [ "${#b}" -eq $((a * 2)) ]; then
          echo "$b" >> /run/ferry/log; seq=$((seq + 1)); echo "OK $tag $seq" >&3
        else
          echo "ERR $tag bad-record" >&3
        fi ;;
      R)
        case "$a" in ''|*[!0-9]*) a=1 ;; esac
        n=0
        while read -r rec; do
          n=$((n + 1))
          [ "$n" -ge "$a" ] && echo "REC $tag $n $rec" >&3
        done < /run/ferry/log
        echo "END $tag $n" >&3 ;;
      *) echo "ERR $tag unknown-command" >&3 ;;
    esac
  done
  exec 3<&-
}

while true; do serve; sleep 1; done
"#;

/// Why no boot image could be made.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("no kernel: set {KERNEL_ENV}, or extract linux-image-amd64 into {KERNEL_CACHE} (see .ci/run)")]
    NoKernel,
    #[error("no busybox: install busybox-static or set {BUSYBOX_ENV}")]
    NoBusybox,
    #[error("{0} is not a statically linked busybox (install busybox-static)")]
    NotStatic(PathBuf),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: String },
}

/// A kernel and an initramfs to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl BootImage {
    /// Finds the kernel and busybox and writes the initramfs into `dir`.
    pub fn prepare(dir: &Path) -> Result<BootImage, ImageError> {
        let kernel = find_kernel()?;
        let busybox = find_busybox()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| ImageError::Io {
                path,
                error: e.to_string(),
            }
        };
        let busybox_bytes = std::fs::read(&busybox).map_err(io(&busybox))?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let initramfs = dir.join(INITRAMFS_NAME);
        std::fs::write(&initramfs, initramfs_bytes(&busybox_bytes)).map_err(io(&initramfs))?;
        Ok(BootImage { kernel, initramfs })
    }
}

/// The initramfs: busybox, `/init`, and the console node the kernel opens
/// for init's standard streams before any file system is mounted.
pub fn initramfs_bytes(busybox: &[u8]) -> Vec<u8> {
    let mut cpio = Cpio::new();
    for dir in ["bin", "dev", "proc", "sys", "run", "tmp"] {
        cpio.dir(dir, 0o755);
    }
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.file("bin/busybox", 0o755, busybox);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
    cpio.finish()
}

/// The kernel to boot (see the module doc for the search order).
pub fn find_kernel() -> Result<PathBuf, ImageError> {
    if let Some(path) = std::env::var_os(KERNEL_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ImageError::NoKernel)
        };
    }
    let cache = Path::new(KERNEL_CACHE).join("boot");
    [cache.as_path(), Path::new("/boot")]
        .iter()
        .find_map(|dir| newest_vmlinuz(dir))
        .ok_or(ImageError::NoKernel)
}

fn newest_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort_by_key(|path| version_key(path));
    found.pop()
}

/// Sorts `vmlinuz-6.1.0-9-amd64` before `vmlinuz-6.1.0-10-amd64`: numbers
/// compare as numbers.
fn version_key(path: &Path) -> Vec<(u64, String)> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.split(|c: char| !c.is_ascii_alphanumeric())
        .map(|part| (part.parse().unwrap_or(0), part.to_string()))
        .collect()
}

/// A statically linked busybox (see the module doc for the search order).
pub fn find_busybox() -> Result<PathBuf, ImageError> {
    let candidates: Vec<PathBuf> = match std::env::var_os(BUSYBOX_ENV) {
        Some(path) => vec![path.into()],
        None => vec!["/bin/busybox".into(), "/usr/bin/busybox".into()],
    };
    let path = candidates
        .into_iter()
        .find(|path| path.is_file())
        .ok_or(ImageError::NoBusybox)?;
    let bytes = std::fs::read(&path).map_err(|e| ImageError::Io {
        path: path.clone(),
        error: e.to_string(),
    })?;
    if is_static_elf(&bytes) {
        Ok(path)
    } else {
        Err(ImageError::NotStatic(path))
    }
}

/// Whether `elf` is a 64-bit little-endian ELF with no program interpreter
/// (`PT_INTERP`), i.e. runs without a dynamic loader.
pub fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = usize::try_from(phoff).unwrap_or(usize::MAX);
        let at = at.saturating_add(i * usize::from(phentsize));
        u32_at(at).is_some_and(|kind| kind != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(program_types: &[u32]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56 * program_types.len()];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&(program_types.len() as u16).to_le_bytes());
        for (i, kind) in program_types.iter().enumerate() {
            elf[64 + 56 * i..68 + 56 * i].copy_from_slice(&kind.to_le_bytes());
        }
        elf
    }

    #[test]
    fn only_an_elf_without_an_interpreter_counts_as_static() {
        assert!(is_static_elf(&elf(&[1, 1, 4])));
        assert!(!is_static_elf(&elf(&[6, 3, 1])), "PT_INTERP: dynamic");
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        let mut truncated = elf(&[1, 1]);
        truncated.truncate(100);
        assert!(!is_static_elf(&truncated));
    }

    #[test]
    fn kernels_sort_by_version_numbers() {
        let mut names = [
            "vmlinuz-6.1.0-10-amd64",
            "vmlinuz-6.1.0-9-amd64",
            "vmlinuz-5.10.0-30-amd64",
        ]
        .map(PathBuf::from);
        names.sort_by_key(|p| version_key(p));
        assert_eq!(names[2], PathBuf::from("vmlinuz-6.1.0-10-amd64"));
        assert_eq!(names[0], PathBuf::from("vmlinuz-5.10.0-30-amd64"));
    }

    #[test]
    fn the_initramfs_holds_init_busybox_and_the_console() {
        let bytes = initramfs_bytes(b"BUSYBOX");
        let text = String::from_utf8_lossy(&bytes);
        for name in ["init\0", "bin/busybox\0", "dev/console\0", "TRAILER!!!\0"] {
            assert!(text.contains(name), "{name}");
        }
        assert!(text.contains("while read -r cmd tag a b"));
        assert_eq!(bytes, initramfs_bytes(b"BUSYBOX"), "deterministic");
    }
}
