//! A Linux guest under QEMU (TCG, 256 MiB): boots from Ferry's own boot image,
//! serves appends, moves live to a second QEMU with the stream relayed by a
//! test thread (standing in for Ferry's network), survives an aborted move,
//! and is fenced by its run lease. One boot is shared by all of it (a boot
//! takes ~5 s under TCG). Skips with `SKIPPED qemu: ...` where QEMU, a kernel
//! or busybox is missing, unless `FERRY_CI_PROVIDES` names `qemu`.
#![cfg(target_os = "linux")]

use ferry_vmm::qemu::{
    usable_or_skip, Accel, AccelChoice, MigrationSettings, MigrationStatus, QemuError,
};
use ferry_vmm::service::MAX_RECORD;
use ferry_vmm::{QemuConfig, QemuVm, RunLease, ServiceError};
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// A scratch directory removed at the end, pass or fail.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-qemu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Carries the migration stream from the source QEMU (which connects to
/// `listener`) into the target's incoming socket, as Ferry will over its
/// network. Returns the bytes carried.
fn relay(listener: UnixListener, target: PathBuf) -> JoinHandle<io::Result<u64>> {
    std::thread::spawn(move || {
        let (mut from_source, _) = listener.accept()?;
        let mut to_target = UnixStream::connect(&target)?;
        let carried = io::copy(&mut from_source, &mut to_target)?;
        to_target.shutdown(std::net::Shutdown::Write)?;
        Ok(carried)
    })
}

/// Records of varied size and content: empty, binary, the largest allowed.
fn record(i: usize) -> Vec<u8> {
    match i % 4 {
        0 => format!("record {i}").into_bytes(),
        1 => Vec::new(),
        2 => (0..=255u8).cycle().skip(i).take(300).collect(),
        _ => vec![b'x'; MAX_RECORD],
    }
}

/// Every acknowledged (seq, record) is in `vm`'s log under its seq.
fn assert_all_present(vm: &QemuVm, acked: &[(u64, Vec<u8>)], where_: &str) {
    let started = Instant::now();
    let log = vm.records().expect("read the log back");
    eprintln!(
        "qemu: {where_}: read {} records back in {:?}",
        log.len(),
        started.elapsed()
    );
    for (seq, data) in acked {
        let found = log.iter().find(|(s, _)| s == seq);
        assert_eq!(
            found.map(|(_, d)| d),
            Some(data),
            "{where_}: acknowledged append #{seq} missing or changed"
        );
    }
}

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_linux_guest_boots_serves_moves_survives_an_abort_and_is_fenced() {
    let scratch = Scratch::new("move");
    let what = "a_linux_guest_boots_serves_moves_survives_an_abort_and_is_fenced";
    let Some(image) = usable_or_skip(what, &scratch.0) else {
        return;
    };
    let config = |name: &str| {
        let mut config = QemuConfig::new(name, 256, image.clone(), &scratch.0);
        config.accel = AccelChoice::Tcg;
        config
    };

    // Boot, appends acknowledged and read back.
    let source = QemuVm::start(config("source")).expect("boot the guest");
    assert_eq!(source.accel(), Accel::Tcg);
    eprintln!(
        "qemu: booted to the append service in {:?}",
        source.booted_in()
    );
    assert!(source.is_running().expect("query-status"));
    let mut acked: Vec<(u64, Vec<u8>)> = Vec::new();
    for i in 0..12 {
        let data = record(i);
        let seq = source.append(&data).expect("append on the booted guest");
        acked.push((seq, data));
    }
    let seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<u64>>());
    assert_eq!(source.records().expect("read back"), acked);
    assert_eq!(
        source.append(&vec![0; MAX_RECORD + 1]),
        Err(ServiceError::TooLarge(MAX_RECORD + 1))
    );

    // A live move, fenced at the switchover.
    let target = QemuVm::start_incoming(config("target")).expect("start the target");
    assert!(
        !target.is_running().expect("target status"),
        "target starts paused"
    );
    let incoming = target.files().dir.join("incoming.sock");
    target.accept_incoming(&incoming).expect("migrate-incoming");
    let outgoing = scratch.0.join("relay.sock");
    let carrier = relay(
        UnixListener::bind(&outgoing).expect("relay socket"),
        incoming,
    );
    let settings = MigrationSettings {
        downtime_limit: Duration::from_millis(50),
        ..MigrationSettings::default()
    };
    source
        .prepare_outgoing(&settings)
        .expect("capabilities and parameters");
    let started = Instant::now();
    source.start_outgoing(&outgoing).expect("migrate");
    // A client appends while memory is copied, until the source pauses; the
    // engine's side waits for pre-switchover meanwhile.
    let (paused, paused_at, during, last_source_ack) = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let mut acked = Vec::new();
            let mut last_ack = Instant::now();
            for i in 100.. {
                let data = record(i);
                match source.append_within(&data, Duration::from_millis(500)) {
                    Ok(seq) => {
                        last_ack = Instant::now();
                        acked.push((seq, data));
                    }
                    Err(ServiceError::Paused) => break,
                    Err(e) => panic!("append during the move: {e}"),
                }
            }
            (acked, last_ack)
        });
        let paused = source.wait_pre_switchover(MIGRATION_TIMEOUT);
        let paused_at = Instant::now();
        let (during, last_ack) = client.join().expect("client thread");
        (paused, paused_at, during, last_ack)
    });
    let paused = paused.expect("pre-switchover");
    let precopy = paused_at - started;
    eprintln!(
        "qemu: {} appends acknowledged during the pre-copy",
        during.len()
    );
    acked.extend(during);
    assert_eq!(paused.status, MigrationStatus::PreSwitchover);
    assert!(
        paused.round >= 1 && paused.transferred_bytes > 0,
        "{paused:?}"
    );
    // Ferry's commit sits here: neither copy runs.
    assert!(
        !source.is_running().expect("source status"),
        "source paused at pre-switchover"
    );
    assert!(
        !target.is_running().expect("target status"),
        "target still paused"
    );
    assert_eq!(
        source.append_within(b"not acknowledged", Duration::from_millis(300)),
        Err(ServiceError::Paused)
    );
    let commit = Instant::now();
    source.continue_switchover().expect("migrate-continue");
    target
        .wait_incoming_completed(MIGRATION_TIMEOUT)
        .expect("target loaded the stream");
    assert!(
        !target.is_running().expect("target status"),
        "paused until cont"
    );
    let done = source
        .wait_outgoing_completed(MIGRATION_TIMEOUT)
        .expect("source completed");
    target.resume().expect("cont");
    let switchover = commit.elapsed();
    let seq = target
        .append(b"after the move")
        .expect("append on the target");
    let blackout = last_source_ack.elapsed();
    assert!(seq > acked.last().map_or(0, |(s, _)| *s));
    let carried = carrier.join().expect("relay thread").expect("relay");
    assert!(carried > 0);
    assert_all_present(&target, &acked, "target after the move");
    acked.push((seq, b"after the move".to_vec()));
    let source_pid = source.pid().expect("source pid");
    source.destroy();
    assert!(process_gone(source_pid), "the source QEMU is gone");
    eprintln!(
        "qemu: move: pre-copy {precopy:?} (rounds {}), commit to target running {switchover:?}, \
         QEMU total {:?}, QEMU downtime {:?} (includes the test's hold of {:?} between seeing pre-switchover and the commit), \
         client blackout (last ack on the source to first on the target) {blackout:?}, \
         {carried} bytes relayed",
        paused.round,
        done.total_time,
        done.downtime,
        commit - paused_at,
    );

    // An aborted move: the source resumes, nothing lost.
    let doomed = QemuVm::start_incoming(config("doomed")).expect("start the second target");
    let incoming = doomed.files().dir.join("incoming.sock");
    doomed.accept_incoming(&incoming).expect("migrate-incoming");
    let outgoing = scratch.0.join("relay-abort.sock");
    let carrier = relay(
        UnixListener::bind(&outgoing).expect("relay socket"),
        incoming,
    );
    target.prepare_outgoing(&settings).expect("capabilities");
    target.start_outgoing(&outgoing).expect("migrate");
    target
        .wait_pre_switchover(MIGRATION_TIMEOUT)
        .expect("pre-switchover");
    assert!(!target.is_running().expect("status") && !doomed.is_running().expect("status"));
    target
        .cancel_outgoing(MIGRATION_TIMEOUT)
        .expect("cancel and resume");
    assert!(
        target.is_running().expect("status"),
        "the source runs again"
    );
    let _ = carrier.join().expect("relay thread");
    for i in 200..204 {
        let data = record(i);
        acked.push((target.append(&data).expect("append after the abort"), data));
    }
    assert_all_present(&target, &acked, "source after the abort");
    doomed.destroy();

    // The run lease fences the VM: stopped, and no acknowledgement.
    let lease = RunLease::unlimited();
    target.bind_lease(lease.clone());
    assert!(target.append(b"leased").is_ok());
    lease.expire();
    assert_eq!(target.append(b"fenced"), Err(ServiceError::Fenced));
    let deadline = Instant::now() + Duration::from_secs(10);
    while target.is_running().expect("status") {
        assert!(Instant::now() < deadline, "the fence did not stop the VM");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(target.resume().is_err(), "no resume without the lease");
    lease.extend_to(Instant::now() + Duration::from_secs(600));
    target.resume().expect("resume once the lease holds");
    assert!(target.append(b"renewed").is_ok());

    // A lease that lapses during a move: the cancel leaves the VM stopped,
    // though QEMU resumes a cancelled source by itself.
    let doomed = QemuVm::start_incoming(config("doomed-2")).expect("start the third target");
    let incoming = doomed.files().dir.join("incoming.sock");
    doomed.accept_incoming(&incoming).expect("migrate-incoming");
    let outgoing = scratch.0.join("relay-fenced.sock");
    let carrier = relay(
        UnixListener::bind(&outgoing).expect("relay socket"),
        incoming,
    );
    target.start_outgoing(&outgoing).expect("migrate");
    target
        .wait_pre_switchover(MIGRATION_TIMEOUT)
        .expect("pre-switchover");
    lease.expire();
    assert_eq!(
        target.cancel_outgoing(MIGRATION_TIMEOUT),
        Err(QemuError::Fenced)
    );
    let _ = carrier.join().expect("relay thread");
    assert!(
        !target.is_running().expect("status"),
        "fenced after the cancel"
    );
    doomed.destroy();
    lease.extend_to(Instant::now() + Duration::from_secs(600));
    target.resume().expect("resume once the lease holds");
    assert_all_present(&target, &acked, "source after the fenced abort");

    let run_dir = target.files().dir.clone();
    let pid = target.pid().expect("pid");
    target.destroy();
    assert!(
        process_gone(pid) && !run_dir.exists(),
        "destroy kills, reaps and tidies"
    );
}
