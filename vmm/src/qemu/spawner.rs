//! Starts QEMU processes that die with the process that started them.
//!
//! A QEMU VM Ferry runs must not outlive its node: a daemon that is killed
//! loses its run lease, the cluster restarts the VM elsewhere, and a QEMU
//! left behind would run it a second time. The kernel's parent-death signal
//! (`PR_SET_PDEATHSIG`) kills QEMU with its parent — but the "parent" is the
//! thread that forked it, not the process. So every QEMU is forked from one
//! thread that lives as long as the process.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock, PoisonError};

type Request = (Command, Sender<io::Result<Child>>);

/// Spawns `command` from the process-long spawner thread, with `SIGKILL` as
/// its parent-death signal.
pub fn spawn(mut command: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the signal was armed.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("the process that started QEMU is gone"));
            }
            Ok(())
        });
    }
    let (reply, answer) = channel();
    spawner()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send((command, reply))
        .map_err(|_| io::Error::other("the QEMU spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the QEMU spawner thread is gone"))?
}

fn spawner() -> &'static Mutex<Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = channel::<Request>();
        let started = std::thread::Builder::new()
            .name("qemu-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(e) = started {
            tracing::error!("cannot start the QEMU spawner thread: {e}");
        }
        Mutex::new(requests)
    })
}
