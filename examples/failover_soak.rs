//! The failover soak: three `ferry` daemons on loopback, six VMs that ask to be
//! restarted, and an observer (a probe outside the daemons that appends to each
//! VM's service on every node directly, so it sees where a VM really runs).
//! Each run strikes a node that runs VMs (round robin): SIGKILL, or every few
//! runs SIGSTOP for 5 s and SIGCONT (a false suspicion: the process was alive
//! all along). Two figures per run:
//!
//! - **detection**: from the fault until the store, read through a live node,
//!   shows the node down;
//! - **restart**: from the fault until every VM the node ran has been
//!   acknowledged by the observer on another node.
//!
//! Then the node comes back (a killed daemon starts again) and the store must
//! show it up. A run fails — counted and described, the soak goes on — when a
//! VM does not run again within 15 s, when a VM answers on two node processes
//! (never twice: the nodes that acknowledged a VM, in order, form one run per
//! node process), or when the cluster does not settle with every VM on exactly
//! one node, where the store says.
//!
//!     cargo run --release --example failover_soak -- [--runs 20]
//!         [--pause-every 4] [--pause-ms 5000]
//!
//! The last two lines are `failover soak: N passed, M failed` and the figures
//! as `key=value`. The example is its own `ferry` (cargo builds no binary for
//! an example): with `FERRY_EXAMPLE_AS_FERRY=1` it is exactly the `ferry`
//! command line.
#![allow(clippy::unwrap_used)]

#[path = "../tests/chaos_support/mod.rs"]
mod chaos_support;

use chaos_support::daemons::{free_ports, try_wait_for, Daemons, Observer, TempDir};
use clap::Parser;
use ferry::client::Client;
use ferry::requests::CreateVm;
use ferry::views::{MigrationView, NodeView, StatusView, VmView};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Faults, one per run.
    #[arg(long, default_value_t = 20)]
    runs: u32,
    /// Every this many runs, a SIGSTOP (false suspicion) instead of SIGKILL.
    #[arg(long, default_value_t = 4)]
    pause_every: u32,
    /// How long a paused node stays stopped (longer than the detection
    /// timeout, 3 s by default, so the cluster restarts its VMs).
    #[arg(long, default_value_t = 5000)]
    pause_ms: u64,
    #[arg(long, default_value_t = 6)]
    vms: u32,
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
    #[arg(long, default_value_t = 2000)]
    dirty_pages_per_sec: u64,
}

const NODES: usize = 3;
/// A VM not acknowledged on another node within this of the fault fails the run.
const RESTART_LIMIT: Duration = Duration::from_secs(15);
/// Appends every VM must get after a run before it is judged.
const SETTLE_ACKS: usize = 30;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

/// How many times a node process answered for `vm` again after another had
/// (each a second running copy). `marks`: where a node's new process begins.
fn twice(acks: &[(u64, u64)], marks: &[(u64, usize)]) -> Vec<u64> {
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for (k, (node, _)) in acks.iter().enumerate() {
        let life = marks.iter().filter(|(n, at)| n == node && *at <= k).count();
        if runs.last() != Some(&(*node, life)) {
            runs.push((*node, life));
        }
    }
    let mut seen = BTreeSet::new();
    runs.into_iter()
        .filter(|key| !seen.insert(*key))
        .map(|(n, _)| n)
        .collect()
}

struct Soak {
    d: Daemons,
    observer: Observer,
    vms: Vec<String>,
    /// This run's restarted processes: (node, where each VM's acks begin).
    marks: Vec<(u64, BTreeMap<String, usize>)>,
}

impl Soak {
    /// A node to read the store through: live, not paused, not `avoid`.
    fn reader(&self, avoid: u64) -> Option<usize> {
        (0..NODES).find(|&i| self.d.is_running(i) && !self.d.is_stopped(i) && i as u64 + 1 != avoid)
    }

    fn node_via(&self, i: usize, node: u64) -> Option<NodeView> {
        let all: Vec<NodeView> = self.d.get_from(i, "/api/nodes")?;
        all.into_iter().find(|n| n.id == node)
    }

    fn acks_len(&self, vm: &str) -> usize {
        self.observer.seen(vm).acks.len()
    }

    /// Whether node `i`'s API answers (short timeout: a process just
    /// started may accept before it serves).
    fn answers(&self, i: usize) -> bool {
        let c = &self.d.loaded[i];
        let mut client = Client::for_node(c).expect("an API client from the node configuration");
        client.timeout = Duration::from_millis(500);
        client.get::<StatusView>("/api/status").is_ok()
    }

    /// The nodes running VMs, with their VMs, by the store.
    fn occupied(&self, avoid: u64) -> Option<BTreeMap<u64, Vec<String>>> {
        try_wait_for(Duration::from_secs(10), || {
            let all: Vec<VmView> = self.d.get_from(self.reader(avoid)?, "/api/vms")?;
            let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
            for v in all.into_iter().filter(|v| v.state == "running") {
                out.entry(v.owner).or_default().push(v.name);
            }
            Some(out)
        })
    }

    /// One fault on `victim`, which runs `vms`. Returns (detection, restart)
    /// or why the run failed; `Err` with `fatal` when the cluster did not
    /// come back.
    fn run(&mut self, victim: u64, vms: &[String], pause: Option<Duration>) -> RunResult {
        let i = victim as usize - 1;
        let mut r = RunResult::default();
        for vm in &self.vms {
            self.observer.forget(vm);
        }
        self.marks.clear();
        // The VMs answer on the victim before the fault (else the run would
        // strike nothing).
        let answering = try_wait_for(Duration::from_secs(10), || {
            vms.iter()
                .all(|vm| {
                    self.observer
                        .seen(vm)
                        .acks
                        .iter()
                        .any(|(n, _)| *n == victim)
                })
                .then_some(())
        });
        if answering.is_none() {
            r.failures.push(format!(
                "{vms:?} were not answering on node {victim} before the fault"
            ));
            return r;
        }
        let t0 = Instant::now();
        self.observer.node_down(victim, true);
        match pause {
            None => self.d.sigkill(i),
            Some(_) => self.d.signal(i, libc::SIGSTOP),
        }
        let mut found: BTreeMap<String, (u64, Duration)> = BTreeMap::new();
        let mut continued = pause.is_none();
        loop {
            if r.detection.is_none() {
                if let Some(n) = self.reader(victim).and_then(|j| self.node_via(j, victim)) {
                    if n.state == "down" {
                        r.detection = Some(t0.elapsed());
                    }
                }
            }
            for vm in vms {
                if found.contains_key(vm) {
                    continue;
                }
                if let Some((n, _)) = self
                    .observer
                    .seen(vm)
                    .acks
                    .iter()
                    .find(|(n, _)| *n != victim)
                {
                    found.insert(vm.clone(), (*n, t0.elapsed()));
                }
            }
            if let (false, Some(p)) = (continued, pause) {
                if t0.elapsed() >= p {
                    self.observer.node_down(victim, false);
                    self.d.signal(i, libc::SIGCONT);
                    continued = true;
                }
            }
            let done = found.len() == vms.len() && r.detection.is_some();
            if (done && continued) || t0.elapsed() > RESTART_LIMIT {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !continued {
            self.observer.node_down(victim, false);
            self.d.signal(i, libc::SIGCONT);
        }
        if found.len() == vms.len() {
            r.restart = found.values().map(|(_, at)| *at).max();
        }
        for vm in vms.iter().filter(|vm| !found.contains_key(*vm)) {
            r.failures.push(format!(
                "{vm} (of node {victim}) did not run again on another node within {} s",
                RESTART_LIMIT.as_secs()
            ));
        }
        if r.detection.is_none() {
            r.failures.push(format!(
                "node {victim} was not shown down within {} s",
                RESTART_LIMIT.as_secs()
            ));
        }
        r.placed = found.iter().map(|(vm, (n, _))| (vm.clone(), *n)).collect();
        // Back: a killed daemon starts again; either way the store shows the
        // node up, as another node says.
        if pause.is_none() {
            self.d.spawn(i);
            let marks = self
                .vms
                .iter()
                .map(|vm| (vm.clone(), self.acks_len(vm)))
                .collect();
            self.marks.push((victim, marks));
            if try_wait_for(Duration::from_secs(60), || self.answers(i).then_some(())).is_none() {
                r.failures.push(format!(
                    "node {victim}'s daemon did not answer within 60 s of starting"
                ));
                r.fatal = true;
                return r;
            }
            self.observer.node_down(victim, false);
        }
        let back = try_wait_for(Duration::from_secs(60), || {
            let j = self.reader(victim)?;
            let n = self.node_via(j, victim)?;
            (n.state == "up").then_some(())
        });
        if back.is_none() {
            r.failures
                .push(format!("node {victim} was not shown up again within 60 s"));
            r.fatal = true;
            return r;
        }
        r.back = Some(t0.elapsed());
        self.settle(victim, &mut r);
        r
    }

    /// Every VM on exactly one node, where the store says; no migration
    /// active; never twice.
    fn settle(&mut self, victim: u64, r: &mut RunResult) {
        let from: Vec<usize> = self.vms.iter().map(|vm| self.acks_len(vm)).collect();
        let _ = try_wait_for(Duration::from_secs(15), || {
            self.vms
                .iter()
                .zip(&from)
                .all(|(vm, f)| self.acks_len(vm) >= f + SETTLE_ACKS)
                .then_some(())
        });
        let Some(j) = self.reader(victim) else {
            r.failures.push("no node to read the store through".into());
            return;
        };
        let window = Duration::from_millis(1000);
        for vm in &self.vms {
            let agreed = try_wait_for(Duration::from_secs(15), || {
                let v: VmView = self.d.get_from(j, &format!("/api/vms/{vm}"))?;
                let on = self.observer.running_on(vm, window);
                (v.state == "running" && v.migration.is_none() && on == vec![v.owner]).then_some(())
            });
            if agreed.is_none() {
                let v: Option<VmView> = self.d.get_from(j, &format!("/api/vms/{vm}"));
                r.failures.push(format!(
                    "{vm} does not run on exactly one node where the store says: the observer saw it on {:?}, the store says {:?}",
                    self.observer.running_on(vm, window),
                    v.map(|v| (v.owner, v.state, v.epoch))
                ));
            }
            let marks: Vec<(u64, usize)> = self
                .marks
                .iter()
                .map(|(n, m)| (*n, m.get(vm).copied().unwrap_or(usize::MAX)))
                .collect();
            for n in twice(&self.observer.seen(vm).acks, &marks) {
                r.twice += 1;
                r.failures.push(format!(
                    "{vm} answered on node {n} again after another node had answered: two running copies"
                ));
            }
        }
        let migrations: Vec<MigrationView> =
            self.d.get_from(j, "/api/migrations").unwrap_or_default();
        let active: Vec<u64> = migrations
            .iter()
            .filter(|m| m.outcome == "active")
            .map(|m| m.id)
            .collect();
        if !active.is_empty() {
            r.failures
                .push(format!("migrations left active: {active:?}"));
        }
    }
}

#[derive(Default)]
struct RunResult {
    detection: Option<Duration>,
    restart: Option<Duration>,
    back: Option<Duration>,
    placed: BTreeMap<String, u64>,
    twice: u32,
    failures: Vec<String>,
    fatal: bool,
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("FERRY_EXAMPLE_AS_FERRY").is_some() {
        return ferry::cli::run(ferry::cli::Cli::parse());
    }
    let args = Args::parse();
    let dir = TempDir::new("failover-soak");
    let port = 7900 + (std::process::id() % 500) as u16;
    let api = free_ports(3, 101 << 8);
    let mut d = Daemons::init(
        &dir.0,
        NODES as u64,
        &[("mig-1", "127.101.0.0/16"), ("mig-2", "127.102.0.0/16")],
        port,
        api,
        vec![None; NODES],
    );
    for i in 0..NODES {
        d.spawn(i);
    }
    for i in 0..NODES {
        d.wait_ready(i, Duration::from_secs(60));
    }
    let listen: Vec<SocketAddr> = vec![
        "127.101.0.250:0".parse().unwrap(),
        "127.102.0.250:0".parse().unwrap(),
    ];
    let observer = Observer::start(&d, listen, None);
    let names: Vec<String> = (1..=args.vms).map(|k| format!("soak-{k}")).collect();
    for (k, vm) in names.iter().enumerate() {
        let mut req = CreateVm::new(vm);
        req.node = Some((k % NODES + 1).to_string());
        req.memory_mib = args.memory_mib;
        req.dirty_pages_per_sec = args.dirty_pages_per_sec;
        req.restart = true;
        if let Err(e) = d.api(0, |c| c.post::<VmView>("/api/vms", &req)) {
            eprintln!("failover soak: cannot create {vm}: {e}");
            return std::process::ExitCode::from(2);
        }
        observer.watch(vm);
    }
    let started = try_wait_for(Duration::from_secs(30), || {
        names
            .iter()
            .all(|vm| !observer.seen(vm).acks.is_empty())
            .then_some(())
    });
    if started.is_none() {
        eprintln!("failover soak: the VMs did not all answer within 30 s of their creation");
        return std::process::ExitCode::from(2);
    }
    let mut soak = Soak {
        d,
        observer,
        vms: names,
        marks: Vec::new(),
    };

    let (mut passed, mut failed) = (0u32, 0u32);
    let (mut kills, mut pauses, mut twice_total) = (0u32, 0u32, 0u32);
    let mut detections = Vec::new();
    let mut restarts = Vec::new();
    let mut last_victim = 0u64;
    let mut last_faulty = 0u64;
    for run in 1..=args.runs {
        let Some(occupied) = soak.occupied(last_faulty) else {
            println!("run {run}: the store could not be read  FAILED");
            failed += 1;
            break;
        };
        // Round robin over the nodes that run VMs.
        let victim = (1..=NODES as u64)
            .map(|k| (last_victim + k - 1) % NODES as u64 + 1)
            .find(|n| occupied.contains_key(n));
        let Some(victim) = victim else {
            println!("run {run}: no VM runs anywhere  FAILED");
            failed += 1;
            break;
        };
        last_victim = victim;
        last_faulty = victim;
        let vms = occupied[&victim].clone();
        let pause = (args.pause_every > 0 && run % args.pause_every == 0)
            .then(|| Duration::from_millis(args.pause_ms));
        if pause.is_some() {
            pauses += 1;
        } else {
            kills += 1;
        }
        let r = soak.run(victim, &vms, pause);
        twice_total += r.twice;
        if let Some(at) = r.detection {
            detections.push(at);
        }
        if let Some(at) = r.restart {
            restarts.push(at);
        }
        let ok = r.failures.is_empty();
        println!(
            "run {run}: {} node-{victim} (running {}): shown down after {} ms, all its VMs answered elsewhere after {} ms ({}), node back up after {} ms{}",
            match pause {
                Some(p) => format!("SIGSTOP {} ms", p.as_millis()),
                None => "SIGKILL".into(),
            },
            vms.join(","),
            r.detection.map_or("-".into(), ms),
            r.restart.map_or("-".into(), ms),
            r.placed
                .iter()
                .map(|(vm, n)| format!("{vm}→node-{n}"))
                .collect::<Vec<_>>()
                .join(" "),
            r.back.map_or("-".into(), ms),
            if ok { "" } else { "  FAILED" }
        );
        for f in &r.failures {
            println!("    {f}");
        }
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        if r.fatal {
            println!(
                "the cluster did not come back: the soak stops here; node logs in {}",
                dir.0.display()
            );
            for i in 0..NODES {
                println!(
                    "--- node {} (last 30 lines) ---\n{}",
                    i + 1,
                    soak.d.log_tail(i, 30)
                );
            }
            break;
        }
    }
    if failed > 0 {
        println!("node logs and data kept in {}", dir.0.display());
        std::mem::forget(dir);
    }
    detections.sort();
    restarts.sort();
    println!("failover soak: {passed} passed, {failed} failed");
    println!(
        "runs={} kills={kills} pauses={pauses} detect_p50_ms={} detect_max_ms={} restart_p50_ms={} restart_max_ms={} never_twice_violations={twice_total}",
        passed + failed,
        ms(percentile(&detections, 0.5)),
        ms(detections.last().copied().unwrap_or_default()),
        ms(percentile(&restarts, 0.5)),
        ms(restarts.last().copied().unwrap_or_default()),
    );
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
