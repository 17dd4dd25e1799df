//! Moves between daemons while one of their networks fails from outside Ferry: three
//! `ferry node run` daemons in network namespaces on two migration networks
//! ([`netns::Topology`]), a client appending to the VM's service through node 1's API
//! the whole time, and a packet filter dropping one node's traffic on one network at a
//! chosen phase of the move. Used by `tests/netns_paths.rs` (a handful of cases) and
//! `examples/path_soak.rs` (hundreds of random ones, release builds).

use super::daemons::{in_netns, wait_for, Daemons, TempDir};
use super::netns::{Direction, Topology};
use ferry::client::Client;
use ferry::requests::{Append, CreateVm, MoveVm};
use ferry::views::{MigrationView, MoveStarted, StatusView, VmView};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const NODES: usize = 3;
pub const NETWORKS: usize = 2;
pub const VM: &str = "web";

/// When in a move a fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The first copy of memory, with some megabytes already across.
    Round0,
    /// A later copy round (when the move needs one; else the next phase).
    DirtyRound,
    /// The guest is paused on the source.
    Blackout,
    /// The target verified the copy; the store is committing the switchover.
    Switchover,
    /// The switchover committed; the target resumes the guest.
    Resume,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Round0,
        Phase::DirtyRound,
        Phase::Blackout,
        Phase::Switchover,
        Phase::Resume,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Round0 => "round0",
            Phase::DirtyRound => "dirty-round",
            Phase::Blackout => "blackout",
            Phase::Switchover => "switchover",
            Phase::Resume => "resume",
        }
    }

    /// Whether the move, as seen in `m` with `arrived` bytes received by the target
    /// since it began, has reached this phase (or passed it).
    fn reached(self, m: &MigrationView, arrived: u64) -> bool {
        let progress = m.progress.as_ref();
        let live = |p: &str| progress.is_some_and(|v| v.phase == p);
        let round = progress.map(|v| v.round).unwrap_or(0);
        let after_copy = ["blackout", "switching_over", "completed", "aborted"]
            .iter()
            .any(|p| live(p));
        let done = m.outcome != "active";
        match self {
            Phase::Round0 => done || arrived > 8 << 20 || round > 0 || after_copy,
            Phase::DirtyRound => done || round > 0 || after_copy,
            Phase::Blackout => done || after_copy,
            Phase::Switchover => {
                done || live("switching_over")
                    || matches!(m.phase.as_str(), "verified" | "switched_over")
            }
            Phase::Resume => done || m.phase == "switched_over",
        }
    }
}

/// One network of one node failing.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub node: usize,
    /// 1-based.
    pub network: usize,
    /// Every network of the node, not only `network`.
    pub all_networks: bool,
    pub direction: Direction,
    pub phase: Phase,
}

/// What one move did.
#[derive(Clone, Debug)]
pub struct MoveRun {
    pub outcome: String,
    pub reason: Option<String>,
    pub phase_at_fault: Option<String>,
    /// From the move's request to its end.
    pub took: Duration,
    /// Longest time between two acknowledged appends during the move.
    pub max_gap: Duration,
    /// From the fault to the first acknowledged append after it.
    pub answered_after_fault: Option<Duration>,
    pub owner: u64,
}

/// Acknowledged appends: when, and the sequence number the service gave.
type Acks = Arc<Mutex<Vec<(Instant, u64)>>>;

/// The three daemons, their namespaces and the appending client.
pub struct PathRig {
    /// Whether moves compare memory digests in the blackout (on unless told): each
    /// side hashes the whole guest while it is paused, which lengthens the blackout.
    pub verify: bool,
    pub d: Daemons,
    pub topo: Topology,
    acks: Acks,
    /// The client's last refused append, for the report of a run that saw none.
    last_append_error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    appender: Option<std::thread::JoinHandle<Result<(), String>>>,
    _dir: TempDir,
}

impl PathRig {
    /// Builds the namespaces, starts three daemons and a VM of `memory_mib` dirtying
    /// `dirty_pages_per_sec` on node `on` (0-based), and starts the client.
    pub fn start(
        tag: &str,
        memory_mib: u64,
        dirty_pages_per_sec: u64,
        on: usize,
    ) -> Result<PathRig, String> {
        Self::start_backend(tag, memory_mib, dirty_pages_per_sec, on, None)
    }

    /// [`start`](Self::start) with a VM of another backend (`"qemu"`, `"kvm"`).
    pub fn start_backend(
        tag: &str,
        memory_mib: u64,
        dirty_pages_per_sec: u64,
        on: usize,
        backend: Option<&str>,
    ) -> Result<PathRig, String> {
        let topo = Topology::build(tag, NODES, NETWORKS)?;
        let dir = TempDir::new(tag);
        let nets: Vec<(String, String)> = (1..=NETWORKS)
            .map(|k| (format!("mig-{k}"), Topology::subnet(k)))
            .collect();
        let nets: Vec<(&str, &str)> = nets.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let mut d = Daemons::init(
            &dir.0,
            NODES as u64,
            &nets,
            7400,
            7701,
            topo.nodes.iter().cloned().map(Some).collect(),
        );
        for i in 0..NODES {
            d.spawn(i);
        }
        for i in 0..NODES {
            d.wait_ready(i, Duration::from_secs(120));
        }
        let mut create = CreateVm::new(VM);
        create.node = Some(format!("node-{}", on + 1));
        create.memory_mib = memory_mib;
        create.dirty_pages_per_sec = dirty_pages_per_sec;
        create.backend = backend.map(String::from);
        let _: VmView = d
            .api(0, |c| c.post("/api/vms", &create))
            .map_err(|e| format!("creating {VM}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while d.vm(VM).is_none_or(|v| v.state != "running") {
            if Instant::now() > deadline {
                let log = d.log(on);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                return Err(format!(
                    "{VM} not running 60 s after its creation: {:?}\nnode-{} log, newest first:\n{}",
                    d.vm(VM),
                    on + 1,
                    tail.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let acks: Acks = Arc::default();
        let last_append_error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let appender = {
            let (acks, stop, last) = (acks.clone(), stop.clone(), last_append_error.clone());
            let c = &d.loaded[0];
            let mut client =
                Client::for_node(c).expect("an API client from the node configuration");
            client.timeout = Duration::from_secs(30);
            let ns = topo.nodes[0].clone();
            std::thread::spawn(move || in_netns(&ns, || append_loop(&client, &acks, &last, &stop)))
        };
        let rig = PathRig {
            verify: true,
            d,
            topo,
            acks,
            last_append_error,
            stop,
            appender: Some(appender),
            _dir: dir,
        };
        wait_for("the first append", Duration::from_secs(30), || {
            (!lock(&rig.acks).is_empty()).then_some(())
        });
        Ok(rig)
    }

    pub fn owner(&self) -> u64 {
        self.d.vm(VM).map(|v| v.owner).unwrap_or(0)
    }

    /// The Raft leader, once there is one (an election may follow a partition).
    pub fn leader(&self) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leader = self
                .d
                .get::<StatusView>("/api/status")
                .and_then(|s| s.leader);
            if leader.is_some() || Instant::now() > deadline {
                return leader;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a write through node `through` commits and applies there: the
    /// store has healed from whatever the last fault did (a partitioned node
    /// catching up, a replication stream backing off).
    pub fn wait_store_healed(&self, through: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.timed_write(through, 4) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sets the cluster's downtime limit (`PATCH /api/settings`).
    pub fn set_downtime_limit(&self, ms: u32) -> Result<(), String> {
        let patch = serde_json::json!({ "downtime_limit_ms": ms });
        self.d
            .api(0, |c| {
                c.call::<serde_json::Value>("PATCH", "/api/settings", Some(&patch))
            })
            .map(|_| ())
            .map_err(|e| format!("settings write: {e}"))
    }

    /// Moves the VM to node `to` (0-based) and applies `fault` when the move reaches
    /// its phase; lifts the fault after the move ends.
    pub fn run_move(&self, to: usize, fault: Option<Fault>) -> Result<MoveRun, String> {
        let from = self.owner() as usize - 1;
        let request = MoveVm {
            target: Some(format!("node-{}", to + 1)),
            verify: self.verify,
            ..Default::default()
        };
        let begun = Instant::now();
        let moving: MoveStarted = self
            .d
            .api(from, |c| c.post(&format!("/api/vms/{VM}/move"), &request))
            .map_err(|e| format!("move request: {e}"))?;
        let path = format!("/api/migrations/{}", moving.migration);
        let poll = || -> Option<MigrationView> {
            self.d.api(from, |c| c.get::<MigrationView>(&path).ok())
        };
        let rx = || -> u64 { self.topo.rx_bytes(to).iter().sum() };
        let rx_at_start = rx();
        let mut struck: Option<(Instant, String)> = None;
        let ended = loop {
            let m = poll();
            if let (Some(f), None, Some(m)) = (fault, &struck, &m) {
                let arrived = if f.phase == Phase::Round0 {
                    rx().saturating_sub(rx_at_start)
                } else {
                    0
                };
                if f.phase.reached(m, arrived) {
                    if f.all_networks {
                        for k in 1..=NETWORKS {
                            self.topo.block(f.node, k, f.direction)?;
                        }
                    } else {
                        self.topo.block(f.node, f.network, f.direction)?;
                    }
                    let seen = m.progress.as_ref().map_or(m.phase.clone(), |p| {
                        format!("{} round {}", p.phase, p.round)
                    });
                    struck = Some((Instant::now(), seen));
                }
            }
            if let Some(m) = m.filter(|m| m.outcome != "active") {
                break m;
            }
            if begun.elapsed() > Duration::from_secs(120) {
                return Err(format!(
                    "migration {} still active after 120 s",
                    moving.migration
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let took = begun.elapsed();
        // The service answers again (on whichever node runs the VM) before the fault
        // is lifted: what a client saw is measured with the network still down.
        let ack_count = lock(&self.acks).len();
        let answered = try_wait("an append after the move", Duration::from_secs(30), || {
            (lock(&self.acks).len() > ack_count).then_some(())
        });
        if let Err(e) = answered {
            // A run that fails leaves no rule behind for the next one.
            if let Some(f) = fault {
                self.topo.unblock(f.node)?;
            }
            let refused = lock(&self.last_append_error).clone();
            return Err(format!(
                "migration {} ({}): {e}; the last append refused: {}",
                moving.migration,
                ended.outcome,
                refused.as_deref().unwrap_or("none")
            ));
        }
        let acks = lock(&self.acks).clone();
        let during: Vec<Instant> = acks.iter().map(|a| a.0).filter(|t| *t >= begun).collect();
        let mut max_gap = Duration::ZERO;
        let mut prev = acks
            .iter()
            .rev()
            .map(|a| a.0)
            .find(|t| *t < begun)
            .unwrap_or(begun);
        for t in &during {
            max_gap = max_gap.max(t.duration_since(prev));
            prev = *t;
        }
        let answered_after_fault = struck.as_ref().and_then(|(at, _)| {
            acks.iter()
                .find(|a| a.0 > *at)
                .map(|a| a.0.duration_since(*at))
        });
        if let Some(f) = fault {
            self.topo.unblock(f.node)?;
        }
        let owner = try_wait("the VM running again", Duration::from_secs(30), || {
            self.d
                .vm(VM)
                .filter(|v| v.state == "running")
                .map(|v| v.owner)
        })?;
        Ok(MoveRun {
            outcome: ended.outcome,
            reason: ended.reason,
            phase_at_fault: struck.map(|s| s.1),
            took,
            max_gap,
            answered_after_fault,
            owner,
        })
    }

    /// Every acknowledged append got a sequence number above all before it: none
    /// was lost (the service would hand its number out again) and no two copies of
    /// the VM answered. (A number may be skipped: an append whose answer the client
    /// never got may still have been applied.) Returns how many were acknowledged.
    pub fn check_acks(&self) -> Result<usize, String> {
        let acks = lock(&self.acks);
        for w in acks.windows(2) {
            if w[1].1 <= w[0].1 {
                return Err(format!(
                    "acknowledged append {} followed by {}: an acknowledged write was lost or two copies answered",
                    w[0].1, w[1].1
                ));
            }
        }
        Ok(acks.len())
    }

    /// A write through a node that is not the leader, timed: from the request to the
    /// store's commit.
    pub fn timed_write(&self, through: usize, limit: u32) -> Result<Duration, String> {
        let started = Instant::now();
        let patch = serde_json::json!({ "max_migrations_per_node": limit });
        self.d
            .api(through, |c| {
                c.call::<serde_json::Value>("PATCH", "/api/settings", Some(&patch))
            })
            .map_err(|e| format!("settings write: {e}"))?;
        Ok(started.elapsed())
    }
}

impl Drop for PathRig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(a) = self.appender.take() {
            let _ = a.join();
        }
    }
}

/// Polls `f` every 5 ms until it returns `Some`; an error after `timeout`, so a
/// soak counts the run as failed and goes on.
fn try_wait<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often the client appends: often enough that a gap is measured to a few
/// milliseconds, seldom enough that the guest's 4 MiB service log (24 bytes a
/// record) holds a whole soak (about half an hour).
const APPEND_EVERY: Duration = Duration::from_millis(10);

/// Appends a record every [`APPEND_EVERY`] through node 1's API until stopped; an
/// error (the VM paused, a node moving) is retried at the next slot, and the last one
/// is kept for the report of a run that saw no append.
fn append_loop(
    client: &Client,
    acks: &Acks,
    last_error: &Mutex<Option<String>>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut n = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let append = Append {
            record: format!("r{n}"),
        };
        match client.post::<serde_json::Value>(&format!("/api/vms/{VM}/append"), &append) {
            Ok(v) => {
                let seq = v["seq"]
                    .as_u64()
                    .ok_or_else(|| format!("append answer without a seq: {v}"))?;
                lock(acks).push((Instant::now(), seq));
            }
            Err(e) => *lock(last_error) = Some(e.to_string()),
        }
        next = (next + APPEND_EVERY).max(Instant::now());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(())
}
