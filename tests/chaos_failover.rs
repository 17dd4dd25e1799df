//! Failover chaos with real processes: three `ferry node run` daemons, four
//! VMs that ask to be restarted, and a seeded schedule of node faults, at
//! most one node faulty at a time:
//!
//! - **kill**: SIGKILL a node that runs VMs; each of its VMs runs again on
//!   another node within the bound, then the daemon starts again and rejoins;
//! - **false suspicion**: SIGSTOP a node that runs VMs for 4–7 s (longer than
//!   the detection timeout), then SIGCONT; its VMs run elsewhere within the
//!   bound and the continued process never answers for them again;
//! - **short pause**: SIGSTOP for 0.3–1.2 s (under the detection timeout); the
//!   node is never shown down, nothing restarts, and its VMs answer on it
//!   again (they may be fenced for a moment);
//! - **kill during a restart**: SIGKILL node A; as soon as one of A's VMs is
//!   shown restarted on node B, A's daemon starts again and B is killed; every
//!   VM of B — the one just restarted there too — runs again within the bound
//!   of B's kill.
//!
//! The bound is the detection timeout (3 s, the cluster's default) plus 5 s.
//! The checker judges what the observer (a probe outside the daemons that
//! appends to each VM's service on every node directly) and the store
//! reported: never two running copies (the nodes that acknowledged a VM, in
//! order, form one run per node process), acknowledged sequence numbers that
//! only grow within a run, every VM of a node that went down running again
//! within the bound, no restart after a short pause, and after each step every
//! VM on exactly one node, where the store says, with no migration left
//! active. A step that did not exercise its fault counts as a failure.
//!
//! `FERRY_FAILOVER_SEED` (decimal or 0x-hex) replays a schedule;
//! `FERRY_FAILOVER_STEPS` sets its length (default 8: each kind twice).
#![allow(clippy::unwrap_used)]

mod chaos_support;

use chaos_support::daemons::{free_ports, try_wait_for, wait_for, Daemons, Observer, TempDir};
use ferry::client::Client;
use ferry::requests::CreateVm;
use ferry::views::{MigrationView, NodeView, StatusView, VmView};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const NODES: usize = 3;
const VMS: [&str; 4] = ["fo-a", "fo-b", "fo-c", "fo-d"];
/// The node each VM is created on.
const HOMES: [u64; 4] = [1, 2, 3, 1];
/// The cluster's default detection timeout (`failure_detection_ms`).
const DETECTION: Duration = Duration::from_millis(3000);
/// A down node's VMs run again within this of the fault.
const BOUND: Duration = Duration::from_millis(8000);
/// The schedule CI runs.
const CI_SEED: u64 = 0x00fa_110e_2c1a_0001;
/// Each kind twice: under a minute in a debug build on two cores.
const DEFAULT_STEPS: usize = 8;
/// Appends every VM must get after a step, before it is judged (so a
/// continued or restarted process has had its chance to answer wrongly).
const SETTLE_ACKS: usize = 30;

/// A tiny seeded generator (SplitMix64), written out rather than taken from
/// `rand`, whose seeded algorithms may change between versions: a seed that
/// found a bug must plan the same faults after any dependency upgrade.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (multiply-shift).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    fn millis_between(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Kill,
    FalseSuspicion,
    ShortPause,
    KillDuringRestart,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::Kill,
        Kind::FalseSuspicion,
        Kind::ShortPause,
        Kind::KillDuringRestart,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::FalseSuspicion => "false-suspicion",
            Kind::ShortPause => "short-pause",
            Kind::KillDuringRestart => "kill-during-restart",
        }
    }
}

/// One planned step. The victim is chosen when the step runs, among the
/// nodes that run VMs then (`pick` indexes them), so every step strikes VMs.
#[derive(Debug, Clone)]
struct Planned {
    kind: Kind,
    pick: u64,
    pause: Duration,
}

/// The schedule of `seed`: kinds dealt like cards, each group of four steps
/// holding each kind once in a seeded order, so the default run covers all.
fn plan(seed: u64, steps: usize) -> Vec<Planned> {
    let mut rng = SplitMix64(seed);
    let mut deck: Vec<Kind> = Vec::new();
    let mut out = Vec::new();
    while out.len() < steps {
        if deck.is_empty() {
            deck = Kind::ALL.to_vec();
            for k in (1..deck.len()).rev() {
                let j = rng.below(k as u64 + 1) as usize;
                deck.swap(k, j);
            }
        }
        let kind = deck.pop().unwrap();
        let pick = rng.next_u64();
        let pause = match kind {
            Kind::FalseSuspicion => rng.millis_between(4000, 7000),
            Kind::ShortPause => rng.millis_between(300, 1200),
            Kind::Kill | Kind::KillDuringRestart => Duration::ZERO,
        };
        out.push(Planned { kind, pick, pause });
    }
    out
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => v.replace('_', "").parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// A VM whose node went down (or was killed under it) and must run again:
/// counted from `from` (an index into the observer's acknowledgements of
/// this step); an acknowledgement by a node in `exclude` counts only at or
/// after the index given with it (a process started again there).
struct Target {
    vm: String,
    node: u64,
    from: usize,
    t0: Instant,
    exclude: Vec<(u64, usize)>,
    found: Option<(u64, Duration)>,
}

/// What one step did, for the replay list and the summary.
struct StepLog {
    kind: Kind,
    text: String,
}

struct Chaos {
    d: Daemons,
    observer: Observer,
    /// `(step, text)`.
    violations: Vec<(usize, String)>,
    checks: u64,
    /// Time to run again of every VM of a node that went down.
    restarts: Vec<(String, Duration)>,
    detections: Vec<Duration>,
    /// Per node, where in this step's acknowledgements of each VM it was
    /// started again (its new process is a new run).
    respawns: Vec<(u64, BTreeMap<String, usize>)>,
    step: usize,
    log: Vec<StepLog>,
}

fn node_index(node: u64) -> usize {
    node as usize - 1
}

impl Chaos {
    fn violation(&mut self, text: impl Into<String>) {
        self.violations.push((self.step, text.into()));
    }

    fn check(&mut self, ok: bool, text: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            let t = text();
            self.violation(t);
        }
    }

    /// A node to read the store through: live, not paused, not in `avoid`
    /// (a continued or restarted node's replica lags).
    fn reader(&self, avoid: &[u64]) -> Option<usize> {
        (0..NODES).find(|&i| {
            self.d.is_running(i) && !self.d.is_stopped(i) && !avoid.contains(&(i as u64 + 1))
        })
    }

    fn vms_via(&self, i: usize) -> Option<BTreeMap<String, VmView>> {
        let all: Vec<VmView> = self.d.get_from(i, "/api/vms")?;
        Some(all.into_iter().map(|v| (v.name.clone(), v)).collect())
    }

    fn node_via(&self, i: usize, node: u64) -> Option<NodeView> {
        let all: Vec<NodeView> = self.d.get_from(i, "/api/nodes")?;
        all.into_iter().find(|n| n.id == node)
    }

    fn acks_len(&self, vm: &str) -> usize {
        self.observer.seen(vm).acks.len()
    }

    /// Whether node `i`'s API answers, with a short timeout (a process just
    /// started may accept before it serves).
    fn answers(&self, i: usize) -> bool {
        let c = &self.d.loaded[i];
        let mut client = Client::for_node(c).expect("an API client from the node configuration");
        client.timeout = Duration::from_millis(500);
        client.get::<StatusView>("/api/status").is_ok()
    }

    fn kill(&mut self, node: u64) {
        self.observer.node_down(node, true);
        self.d.sigkill(node_index(node));
    }

    /// Starts node `node`'s daemon again and marks, for every VM, where its
    /// new process's acknowledgements begin. The observer probes it again
    /// once its API answers (see [`Chaos::unmark_if_up`]).
    fn respawn(&mut self, node: u64) {
        self.d.spawn(node_index(node));
        let marks = VMS
            .iter()
            .map(|vm| (vm.to_string(), self.acks_len(vm)))
            .collect();
        self.respawns.push((node, marks));
    }

    /// Probes a respawned node again once its API answers. Returns whether it
    /// does.
    fn unmark_if_up(&mut self, node: u64) -> bool {
        let up = self.answers(node_index(node));
        if up {
            self.observer.node_down(node, false);
        }
        up
    }

    /// Polls the observer (and `extra`, each round) until every target ran
    /// again or its bound passed; `extra` returning `true` holds the loop
    /// open (it has more to do). Records each target's time.
    fn watch_targets(&mut self, targets: &mut [Target], mut extra: impl FnMut(&mut Chaos) -> bool) {
        loop {
            let now = Instant::now();
            let mut pending = false;
            for t in targets.iter_mut() {
                if t.found.is_some() {
                    continue;
                }
                let acks = self.observer.seen(&t.vm).acks;
                let hit =
                    acks.iter().enumerate().skip(t.from).find(|(k, (n, _))| {
                        !t.exclude.iter().any(|(x, since)| x == n && *k < *since)
                    });
                if let Some((_, (n, _))) = hit {
                    t.found = Some((*n, t.t0.elapsed()));
                } else if now < t.t0 + BOUND {
                    pending = true;
                }
            }
            let more = extra(self);
            if !pending && !more {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Judges the targets once watched: each ran again within the bound.
    fn judge_targets(&mut self, targets: &[Target], fault: &str) {
        for t in targets {
            match t.found {
                Some((n, at)) if at <= BOUND => {
                    self.checks += 1;
                    self.restarts.push((t.vm.clone(), at));
                    println!(
                        "  {} (of node {}) runs again on node {n} {} ms after the {fault}",
                        t.vm,
                        t.node,
                        ms(at)
                    );
                }
                _ => {
                    let store = self
                        .reader(&[t.node])
                        .and_then(|i| self.d.get_from::<VmView>(i, &format!("/api/vms/{}", t.vm)));
                    let last: Vec<(u64, u64)> = {
                        let acks = self.observer.seen(&t.vm).acks;
                        acks[acks.len().saturating_sub(5)..].to_vec()
                    };
                    self.checks += 1;
                    self.violation(format!(
                        "{} (of node {}) did not run again on another node within {} ms of the {fault}; the store says {:?}; the last acknowledgements (node, seq): {last:?}",
                        t.vm,
                        t.node,
                        ms(BOUND),
                        store.map(|v| (v.owner, v.state, v.epoch)),
                    ));
                }
            }
        }
    }

    /// The store's view through some node other than `avoid`, waited for.
    fn store(&self, avoid: &[u64]) -> Option<(usize, BTreeMap<String, VmView>)> {
        try_wait_for(Duration::from_secs(10), || {
            let i = self.reader(avoid)?;
            Some((i, self.vms_via(i)?))
        })
    }

    /// Nodes running VMs, by the store, with their VMs.
    fn occupied(vms: &BTreeMap<String, VmView>) -> BTreeMap<u64, Vec<String>> {
        let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for v in vms.values().filter(|v| v.state == "running") {
            out.entry(v.owner).or_default().push(v.name.clone());
        }
        out
    }

    /// Whether each of `vms` is acknowledged by `node` in this step (after
    /// `from`) within 10 s.
    fn answering_on(&self, vms: &[String], node: u64, from: &BTreeMap<String, usize>) -> bool {
        try_wait_for(Duration::from_secs(10), || {
            vms.iter()
                .all(|vm| {
                    self.observer.seen(vm).acks[from.get(vm).copied().unwrap_or(0)..]
                        .iter()
                        .any(|(n, _)| *n == node)
                })
                .then_some(())
        })
        .is_some()
    }

    // ---- the steps ----

    fn step_kill(&mut self, victim: u64, vms: Vec<String>) -> String {
        let t0 = Instant::now();
        self.kill(victim);
        let mut targets = targets(&vms, victim, t0, |_| 0, vec![(victim, usize::MAX)]);
        let mut down: Option<(Duration, Option<String>)> = None;
        self.watch_targets(&mut targets, |c| {
            if down.is_none() {
                if let Some(n) = c.reader(&[victim]).and_then(|i| c.node_via(i, victim)) {
                    if n.state == "down" {
                        down = Some((t0.elapsed(), n.down_reason));
                    }
                }
            }
            down.is_none() && t0.elapsed() < BOUND
        });
        self.judge_detection(victim, &down);
        self.judge_targets(&targets, &format!("SIGKILL of node {victim}"));
        self.respawn(victim);
        format!("kill node {victim} (running {})", vms.join(","))
    }

    fn judge_detection(&mut self, victim: u64, down: &Option<(Duration, Option<String>)>) {
        match down {
            Some((at, reason)) => {
                self.detections.push(*at);
                let reason = reason.clone().unwrap_or_default();
                self.check(reason.contains("no lease renewal"), || {
                    format!(
                        "node {victim} shown down with reason {reason:?}, not for a lapsed lease"
                    )
                });
                println!("  node {victim} shown down after {} ms: {reason}", ms(*at));
            }
            None => self.violation(format!(
                "node {victim} was not shown down within {} ms of its fault",
                ms(BOUND)
            )),
        }
    }

    fn step_false_suspicion(&mut self, victim: u64, vms: Vec<String>, pause: Duration) -> String {
        let i = node_index(victim);
        let t0 = Instant::now();
        // A paused node makes each probe wait out its timeout; it is probed
        // again from the moment it is continued (before SIGCONT, so an answer
        // it should not give is seen).
        self.observer.node_down(victim, true);
        self.d.signal(i, libc::SIGSTOP);
        let mut targets = targets(&vms, victim, t0, |_| 0, vec![(victim, usize::MAX)]);
        let mut down: Option<(Duration, Option<String>)> = None;
        let mut continued = false;
        self.watch_targets(&mut targets, |c| {
            if down.is_none() {
                if let Some(n) = c.reader(&[victim]).and_then(|r| c.node_via(r, victim)) {
                    if n.state == "down" {
                        down = Some((t0.elapsed(), n.down_reason));
                    }
                }
            }
            if !continued && t0.elapsed() >= pause {
                c.observer.node_down(victim, false);
                c.d.signal(i, libc::SIGCONT);
                continued = true;
            }
            !continued || (down.is_none() && t0.elapsed() < BOUND)
        });
        self.judge_detection(victim, &down);
        self.judge_targets(
            &targets,
            &format!("SIGSTOP of node {victim} ({} ms pause)", ms(pause)),
        );
        // The continued node learns it is down and drops its guests.
        let noticed = try_wait_for(Duration::from_secs(20), || {
            self.d
                .log(i)
                .contains("declared down by the cluster")
                .then_some(())
        })
        .is_some();
        self.check(noticed, || {
            format!(
                "node {victim}, continued after SIGSTOP, never logged that it was declared down"
            )
        });
        format!(
            "false suspicion: SIGSTOP node {victim} for {} ms (running {})",
            ms(pause),
            vms.join(",")
        )
    }

    fn step_short_pause(&mut self, victim: u64, vms: Vec<String>, pause: Duration) -> String {
        let i = node_index(victim);
        let t0 = Instant::now();
        self.observer.node_down(victim, true);
        self.d.signal(i, libc::SIGSTOP);
        let mut shown_down: Option<(Duration, Option<String>)> = None;
        let mut cont_marks: Option<BTreeMap<String, usize>> = None;
        // Watch the store until a down mark would have come for a node
        // silent since the pause began, and a second more.
        while t0.elapsed() < DETECTION + Duration::from_secs(1) {
            if cont_marks.is_none() && t0.elapsed() >= pause {
                self.observer.node_down(victim, false);
                cont_marks = Some(
                    VMS.iter()
                        .map(|vm| (vm.to_string(), self.acks_len(vm)))
                        .collect(),
                );
                self.d.signal(i, libc::SIGCONT);
            }
            if shown_down.is_none() {
                if let Some(n) = self
                    .reader(&[victim])
                    .and_then(|r| self.node_via(r, victim))
                {
                    if n.state != "up" {
                        shown_down = Some((t0.elapsed(), n.down_reason));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.check(shown_down.is_none(), || {
            let (at, reason) = shown_down.clone().unwrap();
            format!(
                "node {victim}, paused {} ms (under the {} ms detection timeout), was shown down after {} ms: {reason:?}",
                ms(pause),
                ms(DETECTION),
                ms(at)
            )
        });
        // Its VMs answer on it again (they may have been fenced a moment).
        let marks = cont_marks.unwrap();
        let again = self.answering_on(&vms, victim, &marks);
        self.check(again, || {
            format!("{vms:?} did not answer on node {victim} again after its short pause")
        });
        format!(
            "short pause: SIGSTOP node {victim} for {} ms (running {})",
            ms(pause),
            vms.join(",")
        )
    }

    fn step_kill_during_restart(&mut self, a: u64, vms_a: Vec<String>) -> (String, Vec<u64>) {
        let t0 = Instant::now();
        self.kill(a);
        let mut ta = targets(&vms_a, a, t0, |_| 0, vec![(a, usize::MAX)]);
        // Until one of A's VMs is shown restarted on B.
        let mut first: Option<(String, u64)> = None;
        self.watch_targets(&mut ta, |c| {
            if first.is_none() {
                if let Some(vms) = c.reader(&[a]).and_then(|r| c.vms_via(r)) {
                    first = vms_a.iter().find_map(|vm| {
                        let v = vms.get(vm)?;
                        (v.owner != a && v.state == "running").then(|| (vm.clone(), v.owner))
                    });
                }
            }
            first.is_none() && t0.elapsed() < BOUND
        });
        let Some((vm1, b)) = first else {
            self.judge_targets(&ta, &format!("SIGKILL of node {a}"));
            self.violation(format!(
                "no VM of node {a} was shown restarted within {} ms of its kill: the second kill never happened",
                ms(BOUND)
            ));
            self.respawn(a);
            return (
                format!("kill node {a}, then (never) its VMs' new node"),
                vec![a],
            );
        };
        // The swap: A starts again, B dies.
        self.respawn(a);
        let a_mark = self.respawns.last().unwrap().1.clone();
        for t in ta.iter_mut() {
            t.exclude = vec![(a, a_mark[&t.vm])];
        }
        let t1 = Instant::now();
        let b_from: BTreeMap<String, usize> = VMS
            .iter()
            .map(|vm| (vm.to_string(), self.acks_len(vm)))
            .collect();
        self.kill(b);
        let swap_gap = t1.elapsed();
        println!(
            "  {vm1} shown restarted on node {b} {} ms after node {a}'s kill: node {a} started again, node {b} killed",
            ms(t1 - t0)
        );
        // B's VMs now, by the store (read through the third node).
        let third = (1..=NODES as u64).find(|n| *n != a && *n != b).unwrap();
        let vms_b: Vec<String> = try_wait_for(Duration::from_secs(10), || {
            let vms = self.vms_via(node_index(third))?;
            Some(
                vms.values()
                    .filter(|v| v.owner == b)
                    .map(|v| v.name.clone())
                    .collect::<Vec<_>>(),
            )
        })
        .unwrap_or_default();
        self.check(vms_b.contains(&vm1), || {
            format!("{vm1}, shown restarted on node {b}, is not among node {b}'s VMs ({vms_b:?}) right after B's kill")
        });
        let mut tb = targets(&vms_b, b, t1, |vm| b_from[vm], vec![(b, usize::MAX)]);
        let mut a_up = false;
        let mut down_b: Option<(Duration, Option<String>)> = None;
        // Both sets at once: A's VMs against A's kill, B's against B's.
        let mut all: Vec<Target> = ta.into_iter().chain(tb.drain(..)).collect();
        self.watch_targets(&mut all, |c| {
            if !a_up {
                a_up = c.unmark_if_up(a);
            }
            if down_b.is_none() {
                if let Some(n) = c.node_via(node_index(third), b) {
                    if n.state == "down" {
                        down_b = Some((t1.elapsed(), n.down_reason));
                    }
                }
            }
            down_b.is_none() && t1.elapsed() < BOUND
        });
        self.judge_detection(b, &down_b);
        let (ta, tb): (Vec<Target>, Vec<Target>) = all.into_iter().partition(|t| t.node == a);
        self.judge_targets(&ta, &format!("SIGKILL of node {a}"));
        self.judge_targets(&tb, &format!("SIGKILL of node {b}"));
        self.respawn(b);
        (
            format!(
                "kill node {a} (running {}); {vm1} restarted on node {b} after {} ms; node {a} restarted and node {b} (running {}) killed {} ms later",
                vms_a.join(","),
                ms(t1 - t0),
                vms_b.join(","),
                ms(swap_gap)
            ),
            vec![a, b],
        )
    }

    // ---- after each step ----

    /// Every node back up, every VM on exactly one node where the store
    /// says, no migration active; then the checker over this step's
    /// acknowledgements. `false` when the cluster did not come back (the run
    /// cannot go on).
    fn settle(
        &mut self,
        kind: Kind,
        faulty: &[u64],
        before: &BTreeMap<String, VmView>,
        struck: &BTreeSet<String>,
    ) -> bool {
        // The daemons answer again and the store shows every node up, as a
        // node that was not faulty says.
        for &n in faulty {
            let i = node_index(n);
            if !self.d.is_running(i) {
                self.respawn(n);
            }
            if try_wait_for(Duration::from_secs(60), || self.answers(i).then_some(())).is_none() {
                self.violation(format!(
                    "node {n}'s daemon did not answer within 60 s of starting"
                ));
                return false;
            }
            self.observer.node_down(n, false);
        }
        let Some(r) = self.reader(faulty) else {
            self.violation("no node to read the store through");
            return false;
        };
        let up = try_wait_for(Duration::from_secs(60), || {
            let nodes: Vec<NodeView> = self.d.get_from(r, "/api/nodes")?;
            let status: StatusView = self.d.get_from(r, "/api/status")?;
            (nodes.len() == NODES
                && nodes.iter().all(|n| n.state == "up")
                && status.voters.len() == NODES
                && status.leader.is_some())
            .then_some(())
        });
        if up.is_none() {
            let nodes: Option<Vec<NodeView>> = self.d.get_from(r, "/api/nodes");
            self.violation(format!(
                "the store (through node {}) did not show every node up within 60 s: {:?}",
                r + 1,
                nodes.map(|ns| ns
                    .into_iter()
                    .map(|n| (n.id, n.state, n.down_reason))
                    .collect::<Vec<_>>())
            ));
            return false;
        }
        self.checks += 1;
        // More appends, so that a process that should not answer has had its
        // chance to.
        let from: Vec<usize> = VMS.iter().map(|vm| self.acks_len(vm)).collect();
        let _ = try_wait_for(Duration::from_secs(15), || {
            VMS.iter()
                .zip(&from)
                .all(|(vm, f)| self.acks_len(vm) >= f + SETTLE_ACKS)
                .then_some(())
        });
        // Each VM on exactly one node, where the store says, running.
        let window = Duration::from_millis(1000);
        for vm in VMS {
            let agreed = try_wait_for(Duration::from_secs(15), || {
                let v: VmView = self.d.get_from(r, &format!("/api/vms/{vm}"))?;
                let on = self.observer.running_on(vm, window);
                (v.state == "running" && v.migration.is_none() && on == vec![v.owner]).then_some(v)
            });
            self.checks += 1;
            if agreed.is_none() {
                let v: Option<VmView> = self.d.get_from(r, &format!("/api/vms/{vm}"));
                let text = format!(
                    "{vm} does not run on exactly one node where the store says: the observer saw it on {:?} in the last {} ms, the store says {:?}",
                    self.observer.running_on(vm, window),
                    ms(window),
                    v.map(|v| (v.owner, v.state, v.epoch, v.migration))
                );
                self.violation(text);
            }
            let Some(v) = agreed else { continue };
            // A struck VM started again at a new epoch; the others were left
            // alone (and after a short pause nothing restarted at all).
            let b = &before[vm];
            if struck.contains(vm) && kind != Kind::ShortPause {
                self.check(v.epoch > b.epoch, || {
                    format!(
                        "{vm} runs again on node {} at epoch {}, not above its epoch {} before the fault",
                        v.owner, v.epoch, b.epoch
                    )
                });
            } else {
                self.check(v.epoch == b.epoch && v.owner == b.owner, || {
                    format!(
                        "{vm} was restarted or moved although its node was not down: node {} epoch {} before, node {} epoch {} after",
                        b.owner, b.epoch, v.owner, v.epoch
                    )
                });
            }
        }
        let active: Option<Vec<MigrationView>> = self.d.get_from(r, "/api/migrations");
        let active: Vec<u64> = active
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.outcome == "active")
            .map(|m| m.id)
            .collect();
        self.check(active.is_empty(), || {
            format!("migrations left active after the step: {active:?}")
        });
        for vm in VMS {
            self.check_acks(vm);
        }
        true
    }

    /// Checks (1) and (2) over this step's acknowledgements of `vm`.
    fn check_acks(&mut self, vm: &str) {
        let acks = self.observer.seen(vm).acks;
        let marks: Vec<(u64, usize)> = self
            .respawns
            .iter()
            .map(|(n, m)| (*n, m.get(vm).copied().unwrap_or(usize::MAX)))
            .collect();
        let found = judge_acks(vm, &acks, &marks);
        self.checks += 2;
        for v in found {
            self.violation(v);
        }
    }
}

/// Checks (1) and (2) over one VM's acknowledgements `(node, seq)`, in the
/// order they came; `marks` says where a node's new process begins (an
/// index into `acks`). A run is one node process's consecutive
/// acknowledgements. (1) Never twice: each node process answers in one run
/// only (answering again after another node answered is a second running
/// copy). (2) Within a run the sequence only grows (a restart elsewhere
/// starts a new run, which may start low).
fn judge_acks(vm: &str, acks: &[(u64, u64)], marks: &[(u64, usize)]) -> Vec<String> {
    let mut runs: Vec<((u64, usize), Vec<u64>)> = Vec::new();
    for (k, (node, seq)) in acks.iter().enumerate() {
        let life = marks.iter().filter(|(n, at)| n == node && *at <= k).count();
        match runs.last_mut() {
            Some((key, seqs)) if *key == (*node, life) => seqs.push(*seq),
            _ => runs.push(((*node, life), vec![*seq])),
        }
    }
    let shown = || {
        runs.iter()
            .map(|((n, life), seqs)| {
                format!(
                    "node {n}{} seq {}..{} ({} acks)",
                    if *life > 0 {
                        format!(" (process {})", life + 1)
                    } else {
                        String::new()
                    },
                    seqs[0],
                    seqs[seqs.len() - 1],
                    seqs.len()
                )
            })
            .collect::<Vec<_>>()
            .join(" → ")
    };
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    if let Some(((n, _), _)) = runs.iter().find(|(key, _)| !seen.insert(*key)) {
        out.push(format!(
            "{vm} answered on node {n} again after another node had answered: two running copies; runs: {}",
            shown()
        ));
    }
    let bad = runs.iter().find_map(|((n, _), seqs)| {
        seqs.windows(2)
            .find(|w| w[1] <= w[0])
            .map(|w| (*n, w[0], w[1]))
    });
    if let Some((n, a, b)) = bad {
        out.push(format!(
            "{vm} on node {n} acknowledged seq {b} after seq {a} in one run (a lost append or a second copy); runs: {}",
            shown()
        ));
    }
    out
}

/// The checker itself, on made-up observations: it passes a restart and a
/// node process started again, and catches two copies and a falling sequence.
#[test]
fn the_checker_catches_two_copies_and_a_falling_sequence() {
    // Node 1 runs it, it restarts on node 2 (a new sequence), node 1's new
    // process gets it back later: fine.
    let ok = [(1, 5), (1, 6), (2, 1), (2, 2), (1, 1), (1, 2)];
    assert!(judge_acks("vm", &ok, &[(1, 4)]).is_empty());
    // The same without node 1 having started again: two copies.
    let v = judge_acks("vm", &ok, &[]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("two running copies"), "{v:?}");
    // Interleaved answers: two copies, whatever the sequence numbers.
    let v = judge_acks("vm", &[(1, 5), (2, 1), (1, 6), (2, 2)], &[]);
    assert!(v[0].contains("two running copies"), "{v:?}");
    // A sequence that falls within one run: an append lost.
    let v = judge_acks("vm", &[(3, 7), (3, 8), (3, 8)], &[]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("seq 8 after seq 8"), "{v:?}");
}

fn targets(
    vms: &[String],
    node: u64,
    t0: Instant,
    from: impl Fn(&str) -> usize,
    exclude: Vec<(u64, usize)>,
) -> Vec<Target> {
    vms.iter()
        .map(|vm| Target {
            vm: vm.clone(),
            node,
            from: from(vm),
            t0,
            exclude: exclude.clone(),
            found: None,
        })
        .collect()
}

fn start_cluster(dir: &TempDir) -> (Daemons, Observer) {
    let port = 7600 + (std::process::id() % 500) as u16;
    let api = free_ports(3, 97 << 8);
    let mut d = Daemons::init(
        &dir.0,
        NODES as u64,
        &[("mig-1", "127.97.0.0/16"), ("mig-2", "127.98.0.0/16")],
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
        "127.97.0.250:0".parse().unwrap(),
        "127.98.0.250:0".parse().unwrap(),
    ];
    let observer = Observer::start(&d, listen, None);
    (d, observer)
}

#[test]
fn failover_chaos_keeps_every_vm_running_once() {
    let started = Instant::now();
    let seed = env_u64("FERRY_FAILOVER_SEED").unwrap_or(CI_SEED);
    let steps = env_u64("FERRY_FAILOVER_STEPS").map_or(DEFAULT_STEPS, |n| n as usize);
    let schedule = plan(seed, steps);
    println!(
        "failover chaos: seed {seed:#x}, {steps} steps: {}",
        schedule
            .iter()
            .map(|p| match p.kind {
                Kind::FalseSuspicion | Kind::ShortPause =>
                    format!("{} {} ms", p.kind.name(), ms(p.pause)),
                _ => p.kind.name().to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let dir = TempDir::new("chaos-failover");
    let (d, observer) = start_cluster(&dir);
    for (vm, home) in VMS.iter().zip(HOMES) {
        let mut req = CreateVm::new(*vm);
        req.node = Some(home.to_string());
        req.memory_mib = 64;
        req.dirty_pages_per_sec = 2000;
        req.restart = true;
        let v: VmView = d.api(0, |c| c.post("/api/vms", &req)).unwrap();
        assert_eq!(v.owner, home, "{v:?}");
        observer.watch(vm);
    }
    for vm in VMS {
        wait_for(
            &format!("{vm}'s first acknowledgement"),
            Duration::from_secs(30),
            || (!observer.seen(vm).acks.is_empty()).then_some(()),
        );
    }
    println!(
        "failover chaos: cluster and {} VMs up after {} ms",
        VMS.len(),
        ms(started.elapsed())
    );
    let mut c = Chaos {
        d,
        observer,
        violations: Vec::new(),
        checks: 0,
        restarts: Vec::new(),
        detections: Vec::new(),
        respawns: Vec::new(),
        step: 0,
        log: Vec::new(),
    };
    let mut last_faulty: Vec<u64> = Vec::new();
    for (k, p) in schedule.iter().enumerate() {
        c.step = k + 1;
        let step_started = Instant::now();
        for vm in VMS {
            c.observer.forget(vm);
        }
        c.respawns.clear();
        // Read through a node that was not faulty last step (a restarted or
        // continued node's replica may still lag).
        let Some((_, before)) = c.store(&last_faulty) else {
            c.violation("the store could not be read before the step");
            break;
        };
        let occupied = Chaos::occupied(&before);
        let candidates: Vec<u64> = occupied.keys().copied().collect();
        if candidates.is_empty() {
            c.violation(format!("no VM runs anywhere before the step: {before:?}"));
            break;
        }
        let victim = candidates[(p.pick % candidates.len() as u64) as usize];
        let vms = occupied[&victim].clone();
        println!(
            "step {}/{}: {} on node {victim} (running {})",
            k + 1,
            steps,
            p.kind.name(),
            vms.join(",")
        );
        // The step strikes VMs that answer on the victim now.
        let exercised = c.answering_on(&vms, victim, &BTreeMap::new());
        c.check(exercised, || {
            format!(
                "the step did not exercise its fault: {vms:?} were not answering on node {victim}"
            )
        });
        if !exercised {
            c.log.push(StepLog {
                kind: p.kind,
                text: format!(
                    "{} on node {victim}: its VMs were not answering",
                    p.kind.name()
                ),
            });
            break;
        }
        let (text, faulty) = match p.kind {
            Kind::Kill => (c.step_kill(victim, vms.clone()), vec![victim]),
            Kind::FalseSuspicion => (
                c.step_false_suspicion(victim, vms.clone(), p.pause),
                vec![victim],
            ),
            Kind::ShortPause => (
                c.step_short_pause(victim, vms.clone(), p.pause),
                vec![victim],
            ),
            Kind::KillDuringRestart => c.step_kill_during_restart(victim, vms.clone()),
        };
        // Struck: every VM on a faulty node when the step began (in a kill
        // during a restart, A's and B's; those of A restarted onto B are A's).
        let struck: BTreeSet<String> = before
            .values()
            .filter(|v| faulty.contains(&v.owner))
            .map(|v| v.name.clone())
            .collect();
        let ok = c.settle(p.kind, &faulty, &before, &struck);
        last_faulty = faulty;
        println!(
            "  step {} done in {} ms: {text}",
            k + 1,
            ms(step_started.elapsed())
        );
        c.log.push(StepLog { kind: p.kind, text });
        if !ok {
            break;
        }
    }

    let mut per_kind: BTreeMap<Kind, usize> = Kind::ALL.iter().map(|k| (*k, 0)).collect();
    for s in &c.log {
        *per_kind.get_mut(&s.kind).unwrap() += 1;
    }
    let max_restart = c.restarts.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let max_detect = c.detections.iter().copied().max().unwrap_or_default();
    println!(
        "failover chaos summary: seed={seed:#x} steps={} {} vms_restarted={} max_time_to_run_again_ms={} max_detection_ms={} checks={} violations={} elapsed_s={:.1}",
        c.log.len(),
        per_kind
            .iter()
            .map(|(k, n)| format!("{}={n}", k.name()))
            .collect::<Vec<_>>()
            .join(" "),
        c.restarts.len(),
        ms(max_restart),
        ms(max_detect),
        c.checks,
        c.violations.len(),
        started.elapsed().as_secs_f64()
    );
    if c.log.len() < steps && c.violations.is_empty() {
        c.violations
            .push((c.step, "the run stopped before its last step".into()));
    }
    if !c.violations.is_empty() {
        let steps_list: Vec<String> = c
            .log
            .iter()
            .enumerate()
            .map(|(k, s)| format!("  {}. {}", k + 1, s.text))
            .collect();
        let logs: Vec<String> = (0..NODES)
            .map(|i| {
                format!(
                    "--- node {} (last 40 lines) ---\n{}",
                    i + 1,
                    c.d.log_tail(i, 40)
                )
            })
            .collect();
        // Keep the logs and data for a person to read.
        let kept = dir.0.clone();
        std::mem::forget(dir);
        panic!(
            "failover chaos found {} violation(s) with seed {seed:#x}:\n{}\nsteps:\n{}\nreplay: FERRY_FAILOVER_SEED={seed:#x} FERRY_FAILOVER_STEPS={steps} cargo test --test chaos_failover -- --nocapture\nnode logs and data kept in {}\n{}",
            c.violations.len(),
            c.violations
                .iter()
                .map(|(s, v)| format!("  step {s}: {v}"))
                .collect::<Vec<_>>()
                .join("\n"),
            steps_list.join("\n"),
            kept.display(),
            logs.join("\n")
        );
    }
}
