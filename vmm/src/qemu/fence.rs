//! Fencing a QEMU VM by its run lease.
//!
//! The other backends check their [`RunLease`] inside the guest's own loops. A
//! QEMU guest's vCPUs are QEMU's, so Ferry fences from outside: a watcher
//! thread issues QMP `stop` as soon as the lease stops holding (checked every
//! [`TICK`]), and the VM's append and resume paths
//! check the lease themselves. The fence latency is the tick plus however long
//! the QMP session is busy with another call (a migration wait holds it for at
//! most 50 ms at a time).

use super::qmp::Qmp;
use crate::lease::{BoundLease, RunLease};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

const TICK: Duration = Duration::from_millis(10);

struct Watcher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

pub(super) struct Fence {
    lease: Arc<BoundLease>,
    qmp: Arc<Mutex<Qmp>>,
    watcher: Mutex<Option<Watcher>>,
}

impl Fence {
    /// An unbound fence: the VM is not fenced until a lease is bound.
    pub(super) fn new(qmp: Arc<Mutex<Qmp>>) -> Self {
        Fence {
            lease: Arc::new(BoundLease::new()),
            qmp,
            watcher: Mutex::new(None),
        }
    }

    pub(super) fn holds(&self) -> bool {
        self.lease.holds()
    }

    /// Binds `lease` and starts the watcher if it is not running yet.
    pub(super) fn bind(&self, lease: RunLease) {
        self.lease.bind(lease);
        let mut watcher = self.watcher.lock().unwrap_or_else(PoisonError::into_inner);
        if watcher.is_some() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, bound, qmp) = (stop.clone(), self.lease.clone(), self.qmp.clone());
        let thread = std::thread::Builder::new()
            .name("ferry-qemu-fence".into())
            .spawn(move || watch(&flag, &bound, &qmp));
        match thread {
            Ok(thread) => *watcher = Some(Watcher { stop, thread }),
            // Without a watcher the append and resume checks still fence; the
            // vCPUs are stopped only by whoever calls `pause`.
            Err(e) => tracing::error!("no fence watcher for a QEMU VM: {e}"),
        }
    }

    /// Ends the watcher (the VM is being destroyed).
    pub(super) fn stop(&self) {
        let watcher = self
            .watcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(watcher) = watcher {
            watcher.stop.store(true, Ordering::SeqCst);
            watcher.thread.thread().unpark();
            let _ = watcher.thread.join();
        }
    }
}

/// While the lease does not hold, keeps the VM stopped: checked every tick,
/// not just once per lapse, because QEMU resumes a VM by itself when a
/// migration that began while it ran is cancelled.
fn watch(stop: &AtomicBool, lease: &BoundLease, qmp: &Mutex<Qmp>) {
    while !stop.load(Ordering::SeqCst) {
        if !lease.holds() {
            let mut qmp = qmp.lock().unwrap_or_else(PoisonError::into_inner);
            let running = qmp
                .execute("query-status", None)
                .map(|status| status.get("running").and_then(serde_json::Value::as_bool));
            // Unknown counts as running: one `stop` too many harms nothing.
            if !matches!(running, Ok(Some(false))) {
                if let Err(e) = qmp.execute("stop", None) {
                    // Tried again next tick; QEMU gone is the destroy path's business.
                    tracing::warn!("fencing a QEMU VM: stop failed: {e}");
                }
            }
        }
        std::thread::park_timeout(TICK);
    }
}
