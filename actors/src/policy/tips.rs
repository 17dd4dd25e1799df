//! Policy tips — the seed's PRO tips: "move this VM there, because that node
//! has been overloaded for a while" — the decisions, pure.
//!
//! - [`TipPolicy`]: load reports go in ([`TipPolicy::observe`]), a
//!   cluster-state snapshot and the time go in ([`TipPolicy::decide`]), and
//!   [`TipAction`]s come out: raise a tip, expire one. It never reads a clock,
//!   so tests drive it with made-up times.
//! - [`tips_to_apply`] says which tips a node should act on now — accepted
//!   ones, and pending ones when the mode is automatic.
//!
//! The loop around them — load reports to the leader, the policy evaluated
//! there, tips applied by their source node — is
//! [`triggers::tips`](crate::triggers::tips).
//!
//! The rule: a node is over its threshold when its guests' CPU share or memory
//! pressure exceeds the configured level, and it must stay over for
//! [`TipConfig::sustain`] before a tip is raised (one report over the line is
//! noise). The VM to move is the smallest one whose share alone brings the node
//! back under the line — moving less memory is a faster, cheaper migration —
//! or, when none suffices, the one that relieves it most. The target comes from
//! [`placement`], excluding nodes that would themselves go over the threshold
//! with the VM added, or whose load is unknown. Nodes are assumed to have
//! comparable CPUs (a VM's CPU share moves with it unchanged); memory is
//! compared in bytes against each capacity.

use crate::policy::placement::{self, Placement, Reservation};
use ferry_cluster::model::{ClusterState, NodeState, ProTipMode, Tip, TipState, VmState};
use ferry_cluster::{Command, NodeId, TipId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// One VM's share of its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmLoad {
    /// Share of the node's CPU the VM uses, 0.0..=1.0.
    pub cpu: f64,
    /// Guest memory in use, in bytes.
    pub memory_bytes: u64,
}

/// What a node says about its load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub node: NodeId,
    /// When it was measured, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Share of the node's CPU its guests use, 0.0..=1.0.
    pub cpu: f64,
    /// Memory pressure: guest memory in use over the node's capacity, 0.0..=1.0.
    pub memory: f64,
    pub vms: BTreeMap<String, VmLoad>,
}

impl LoadReport {
    /// Refuses shares that are not numbers in 0..=1 (a report comes over the
    /// network; a NaN must not reach the policy).
    pub fn check(&self) -> Result<(), String> {
        let share = |what: &str, v: f64| {
            if v.is_finite() && (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{what} {v} is not a share in 0..=1"))
            }
        };
        share("cpu", self.cpu)?;
        share("memory", self.memory)?;
        for (name, vm) in &self.vms {
            share(&format!("VM {name} cpu"), vm.cpu)?;
        }
        Ok(())
    }
}

/// Thresholds and timing of the policy and its loop.
#[derive(Debug, Clone, PartialEq)]
pub struct TipConfig {
    /// A node is over when its guests use more than this share of its CPU.
    pub cpu_threshold: f64,
    /// … or when its memory pressure exceeds this share.
    pub memory_threshold: f64,
    /// How long a node must stay over before a tip is raised.
    pub sustain: Duration,
    /// How long a manual tip waits for a user before it expires.
    pub ttl: Duration,
    /// A report older than this says nothing about the node any more.
    pub stale_after: Duration,
    /// How often the leader evaluates the policy.
    pub evaluate_every: Duration,
    /// How often a node reports its own load; `None`: only through
    /// [`Tips::report`](crate::triggers::tips::Tips::report) (a control plane with its own monitoring, or a test).
    pub report_every: Option<Duration>,
}

impl Default for TipConfig {
    fn default() -> Self {
        TipConfig {
            cpu_threshold: 0.85,
            memory_threshold: 0.90,
            sustain: Duration::from_secs(60),
            ttl: Duration::from_secs(600),
            stale_after: Duration::from_secs(30),
            evaluate_every: Duration::from_secs(5),
            report_every: Some(Duration::from_secs(10)),
        }
    }
}

/// What the policy wants written to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum TipAction {
    Raise {
        vm: String,
        target: NodeId,
        reason: String,
        at_ms: u64,
        expires_at_ms: u64,
    },
    Expire {
        tip: TipId,
    },
}

impl TipAction {
    /// The store command that carries it out.
    pub fn command(&self, now_ms: u64) -> Command {
        match self {
            TipAction::Raise {
                vm,
                target,
                reason,
                at_ms,
                expires_at_ms,
            } => Command::RaiseTip {
                vm: vm.clone(),
                target: *target,
                reason: reason.clone(),
                at_ms: *at_ms,
                expires_at_ms: *expires_at_ms,
            },
            TipAction::Expire { tip } => Command::ResolveTip {
                tip: *tip,
                state: TipState::Expired,
                at_ms: now_ms,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Cpu,
    Memory,
}

struct Watched {
    latest: LoadReport,
    /// Since when the node has been over a threshold without a break.
    over_since: Option<u64>,
}

/// The pure policy. See the module doc for the rule.
pub struct TipPolicy {
    config: TipConfig,
    watched: BTreeMap<NodeId, Watched>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

fn percent(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

impl TipPolicy {
    pub fn new(config: TipConfig) -> Self {
        TipPolicy {
            config,
            watched: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &TipConfig {
        &self.config
    }

    fn over(&self, r: &LoadReport) -> bool {
        r.cpu > self.config.cpu_threshold || r.memory > self.config.memory_threshold
    }

    /// Takes a load report. An older report than the one held is ignored.
    pub fn observe(&mut self, report: LoadReport) {
        let over = self.over(&report);
        let at = report.at_ms;
        match self.watched.get_mut(&report.node) {
            Some(w) if w.latest.at_ms > at => {}
            Some(w) => {
                w.over_since = if over {
                    Some(w.over_since.unwrap_or(at))
                } else {
                    None
                };
                w.latest = report;
            }
            None => {
                self.watched.insert(
                    report.node,
                    Watched {
                        latest: report,
                        over_since: over.then_some(at),
                    },
                );
            }
        }
    }

    /// The latest report of `node`, if fresh at `now_ms`.
    fn fresh(&self, node: NodeId, now_ms: u64) -> Option<&LoadReport> {
        self.watched
            .get(&node)
            .map(|w| &w.latest)
            .filter(|r| now_ms.saturating_sub(r.at_ms) <= ms(self.config.stale_after))
    }

    /// What to write to the store now.
    pub fn decide(&mut self, state: &ClusterState, now_ms: u64) -> Vec<TipAction> {
        let mut actions: Vec<TipAction> = state
            .tips
            .values()
            .filter(|t| t.state == TipState::Pending && t.expires_at_ms <= now_ms)
            .map(|t| TipAction::Expire { tip: t.id })
            .collect();
        if state.settings.pro_tip_mode == ProTipMode::Off {
            return actions;
        }
        let sustain = ms(self.config.sustain);
        let due: Vec<NodeId> = self
            .watched
            .iter()
            .filter(|(node, w)| {
                w.over_since
                    .is_some_and(|since| now_ms.saturating_sub(since) >= sustain)
                    && self.fresh(**node, now_ms).is_some()
            })
            .map(|(node, _)| *node)
            .collect();
        for node in due {
            if let Some(raise) = self.tip_for(state, node, now_ms) {
                // The node must stay over for a whole new window before the
                // next tip about it.
                if let Some(w) = self.watched.get_mut(&node) {
                    w.over_since = Some(now_ms);
                }
                actions.push(raise);
            }
        }
        actions
    }

    fn tip_for(&self, state: &ClusterState, node: NodeId, now_ms: u64) -> Option<TipAction> {
        let report = self.fresh(node, now_ms)?;
        let n = state.nodes.get(&node)?;
        if n.state != NodeState::Up {
            // A paused node drains (or deliberately keeps its VMs); a down one
            // has nothing to move.
            return None;
        }
        let busy = state
            .tips
            .values()
            .any(|t| t.source == node && !t.state.is_final())
            || state.active_migrations().any(|m| m.source == node);
        if busy {
            // Something is already moving load off it.
            return None;
        }
        let c = &self.config;
        let cpu_excess = (report.cpu - c.cpu_threshold) / c.cpu_threshold.max(f64::EPSILON);
        let mem_excess =
            (report.memory - c.memory_threshold) / c.memory_threshold.max(f64::EPSILON);
        let (resource, threshold, level) = if cpu_excess >= mem_excess {
            (Resource::Cpu, c.cpu_threshold, report.cpu)
        } else {
            (Resource::Memory, c.memory_threshold, report.memory)
        };
        let excess = level - threshold;
        let capacity = n.capacity.memory_bytes.max(1) as f64;
        let share = |l: &VmLoad| match resource {
            Resource::Cpu => l.cpu,
            Resource::Memory => l.memory_bytes as f64 / capacity,
        };
        let tipped = |vm: &str| {
            state
                .tips
                .values()
                .any(|t| t.vm == vm && !t.state.is_final())
        };
        let mut candidates: Vec<(&String, &VmLoad)> = report
            .vms
            .iter()
            .filter(|(name, _)| {
                state
                    .vms
                    .get(*name)
                    .is_some_and(|v| v.owner == node && v.state == VmState::Running)
                    && !tipped(name)
            })
            .collect();
        // Smallest sufficient first, then the rest largest first.
        candidates.sort_by(|(an, a), (bn, b)| {
            let (sa, sb) = (share(a), share(b));
            let (fa, fb) = (sa >= excess, sb >= excess);
            fb.cmp(&fa)
                .then_with(|| {
                    if fa {
                        sa.total_cmp(&sb)
                    } else {
                        sb.total_cmp(&sa)
                    }
                })
                .then_with(|| an.cmp(bn))
        });
        for (name, load) in candidates {
            let vm = state.vms.get(name.as_str())?;
            let exclude = self.overloaded_targets(state, node, load, resource, now_ms);
            if let Placement::Target(target) =
                placement::place(state, vm, &BTreeMap::<NodeId, Reservation>::new(), &exclude)
            {
                let what = match resource {
                    Resource::Cpu => "CPU",
                    Resource::Memory => "memory",
                };
                let target_level = self
                    .fresh(target, now_ms)
                    .map(|r| match resource {
                        Resource::Cpu => r.cpu,
                        Resource::Memory => r.memory,
                    })
                    .unwrap_or(0.0);
                let since = self
                    .watched
                    .get(&node)
                    .and_then(|w| w.over_since)
                    .unwrap_or(now_ms);
                let reason = format!(
                    "{} {what} at {} for {:.1} s (threshold {}): move {name} ({} of the node) to {} ({what} at {})",
                    n.name,
                    percent(level),
                    now_ms.saturating_sub(since) as f64 / 1000.0,
                    percent(threshold),
                    percent(share(load)),
                    state.nodes.get(&target).map_or("?", |t| t.name.as_str()),
                    percent(target_level),
                );
                return Some(TipAction::Raise {
                    vm: name.clone(),
                    target,
                    reason,
                    at_ms: now_ms,
                    expires_at_ms: now_ms.saturating_add(ms(self.config.ttl)),
                });
            }
        }
        None
    }

    /// Nodes that must not receive `load`: they would go over the threshold
    /// themselves, or their load is unknown.
    fn overloaded_targets(
        &self,
        state: &ClusterState,
        source: NodeId,
        load: &VmLoad,
        resource: Resource,
        now_ms: u64,
    ) -> BTreeMap<NodeId, String> {
        let mut out = BTreeMap::new();
        for n in state.nodes.values().filter(|n| n.id != source) {
            let Some(r) = self.fresh(n.id, now_ms) else {
                out.insert(n.id, "reports no recent load".to_string());
                continue;
            };
            let after = match resource {
                Resource::Cpu => r.cpu + load.cpu,
                Resource::Memory => {
                    r.memory + load.memory_bytes as f64 / n.capacity.memory_bytes.max(1) as f64
                }
            };
            let threshold = match resource {
                Resource::Cpu => self.config.cpu_threshold,
                Resource::Memory => self.config.memory_threshold,
            };
            if after > threshold {
                out.insert(
                    n.id,
                    format!(
                        "would be at {} with the VM (threshold {})",
                        percent(after),
                        percent(threshold)
                    ),
                );
            }
        }
        out
    }
}

/// The tips node `node` should act on now: accepted ones, and pending ones
/// that have not expired when the mode is automatic. Oldest first.
pub fn tips_to_apply(state: &ClusterState, node: NodeId, now_ms: u64) -> Vec<&Tip> {
    let automatic = state.settings.pro_tip_mode == ProTipMode::Automatic;
    state
        .tips
        .values()
        .filter(|t| t.source == node)
        .filter(|t| match t.state {
            TipState::Accepted => true,
            TipState::Pending => automatic && now_ms < t.expires_at_ms,
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::apply;
    use ferry_cluster::model::{Capacity, MacAddr, StorageSpec, Subnet, VmConfig};
    use std::net::{IpAddr, Ipv4Addr};

    const MIB: u64 = 1 << 20;

    fn config() -> TipConfig {
        TipConfig {
            cpu_threshold: 0.8,
            memory_threshold: 0.9,
            sustain: Duration::from_millis(1000),
            ttl: Duration::from_millis(5000),
            stale_after: Duration::from_millis(3000),
            evaluate_every: Duration::from_millis(100),
            report_every: None,
        }
    }

    fn state(mode: ProTipMode) -> ClusterState {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            Command::DefineNetwork {
                name: "mig".into(),
                subnet: Subnet {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
                    prefix: 16,
                },
                gateway: None,
            },
        )
        .unwrap();
        for id in 1..=3u64 {
            apply(
                &mut s,
                Command::AddNode {
                    id,
                    name: format!("node-{id}"),
                    addresses: BTreeMap::from([(
                        "mig".to_string(),
                        IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)),
                    )]),
                    cpu_features: Default::default(),
                    capacity: Capacity {
                        memory_bytes: 1024 * MIB,
                        max_vms: 8,
                    },
                    tcp_offload: false,
                },
            )
            .unwrap();
        }
        for (i, name) in ["small", "mid", "big"].iter().enumerate() {
            apply(
                &mut s,
                Command::CreateVm {
                    name: name.to_string(),
                    config: VmConfig {
                        failover: Default::default(),
                        memory_bytes: 64 * MIB,
                        vcpus: 1,
                        mac: MacAddr([2, 0, 0, 0, 0, i as u8 + 1]),
                        backend: ferry_cluster::model::Backend::Sim,
                        workload: vec![],
                        storage: StorageSpec::Shared {
                            volume: "csv".into(),
                        },
                    },
                    node: 1,
                },
            )
            .unwrap();
            apply(
                &mut s,
                Command::StartVm {
                    vm: name.to_string(),
                    node: 1,
                },
            )
            .unwrap();
        }
        let mut settings = s.settings.clone();
        settings.pro_tip_mode = mode;
        apply(&mut s, Command::UpdateSettings { settings }).unwrap();
        s
    }

    fn report(node: NodeId, at_ms: u64, cpu: f64, vms: &[(&str, f64)]) -> LoadReport {
        LoadReport {
            node,
            at_ms,
            cpu,
            memory: 0.2,
            vms: vms
                .iter()
                .map(|(n, c)| {
                    (
                        n.to_string(),
                        VmLoad {
                            cpu: *c,
                            memory_bytes: 64 * MIB,
                        },
                    )
                })
                .collect(),
        }
    }

    fn hot(at: u64) -> LoadReport {
        report(1, at, 0.95, &[("small", 0.1), ("mid", 0.2), ("big", 0.5)])
    }

    #[test]
    fn a_node_over_its_threshold_for_the_sustain_time_gets_a_tip() {
        let s = state(ProTipMode::Manual);
        let mut p = TipPolicy::new(config());
        p.observe(hot(10_000));
        p.observe(report(2, 10_000, 0.5, &[]));
        p.observe(report(3, 10_000, 0.1, &[]));
        // Not yet: over for 0.5 s only.
        assert_eq!(p.decide(&s, 10_500), vec![]);
        p.observe(hot(10_900));
        let actions = p.decide(&s, 11_000);
        // 0.95 - 0.8 = 0.15 over: "mid" (0.2) is the smallest VM that brings
        // node 1 back under; node 2 would go to 0.7 and node 3 to 0.3: both
        // fit, node 2 and 3 hold no VM, so the lower id.
        let [TipAction::Raise {
            vm,
            target,
            reason,
            expires_at_ms,
            ..
        }] = actions.as_slice()
        else {
            panic!("{actions:?}")
        };
        assert_eq!((vm.as_str(), *target, *expires_at_ms), ("mid", 2, 16_000));
        assert!(reason.contains("node-1 CPU at 95%"), "{reason}");
        assert!(reason.contains("threshold 80%"), "{reason}");
        // The next tip needs a whole new window.
        assert_eq!(p.decide(&s, 11_500), vec![]);
    }

    #[test]
    fn a_dip_under_the_threshold_restarts_the_window() {
        let s = state(ProTipMode::Manual);
        let mut p = TipPolicy::new(config());
        p.observe(report(2, 0, 0.1, &[]));
        p.observe(report(3, 0, 0.1, &[]));
        p.observe(hot(10_000));
        p.observe(report(1, 10_600, 0.5, &[("mid", 0.2)]));
        p.observe(hot(10_800));
        p.observe(report(2, 11_000, 0.1, &[]));
        p.observe(report(3, 11_000, 0.1, &[]));
        assert_eq!(p.decide(&s, 11_200), vec![]);
        assert_eq!(p.decide(&s, 11_800).len(), 1);
    }

    #[test]
    fn targets_that_would_go_over_or_report_nothing_are_not_chosen() {
        let s = state(ProTipMode::Manual);
        let mut p = TipPolicy::new(config());
        p.observe(hot(0));
        p.observe(report(2, 0, 0.72, &[]));
        // Node 3 reports nothing: unknown load is no place to move load to,
        // and every VM would take node 2 over the line.
        assert_eq!(p.decide(&s, 1_000), vec![]);
        p.observe(report(3, 1_000, 0.65, &[]));
        p.observe(hot(1_000));
        // "mid" (enough on its own) would take node 2 to 92% and node 3 to
        // 85%; "small" is not enough but still relieves node 1, and fits on
        // node 3 only.
        let actions = p.decide(&s, 1_000);
        let [TipAction::Raise { vm, target, .. }] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!((vm.as_str(), *target), ("small", 3));
    }

    #[test]
    fn stale_reports_mode_off_and_pending_tips_hold_tips_back_and_old_tips_expire() {
        let mut s = state(ProTipMode::Off);
        let mut p = TipPolicy::new(config());
        p.observe(hot(0));
        p.observe(report(2, 0, 0.1, &[]));
        p.observe(report(3, 0, 0.1, &[]));
        assert_eq!(p.decide(&s, 1_000), vec![], "mode off");
        let mut settings = s.settings.clone();
        settings.pro_tip_mode = ProTipMode::Manual;
        apply(&mut s, Command::UpdateSettings { settings }).unwrap();
        assert_eq!(p.decide(&s, 4_000), vec![], "reports are stale");
        p.observe(hot(4_000));
        p.observe(report(2, 4_000, 0.1, &[]));
        p.observe(report(3, 4_000, 0.1, &[]));
        let actions = p.decide(&s, 4_000);
        assert_eq!(actions.len(), 1);
        apply(&mut s, actions[0].command(4_000)).unwrap();
        // A pending tip about node 1: no second one, whatever the load.
        p.observe(hot(6_000));
        p.observe(report(2, 6_000, 0.1, &[]));
        p.observe(report(3, 6_000, 0.1, &[]));
        assert_eq!(p.decide(&s, 6_000), vec![]);
        // Past its expiry it expires, and is final.
        let tip = *s.tips.keys().next().unwrap();
        let actions = p.decide(&s, 9_000);
        assert_eq!(actions, vec![TipAction::Expire { tip }]);
        apply(&mut s, actions[0].command(9_000)).unwrap();
        assert_eq!(s.tips[&tip].state, TipState::Expired);
    }

    #[test]
    fn the_source_applies_accepted_tips_and_in_automatic_mode_pending_ones() {
        let mut s = state(ProTipMode::Manual);
        apply(
            &mut s,
            Command::RaiseTip {
                vm: "big".into(),
                target: 2,
                reason: "test".into(),
                at_ms: 0,
                expires_at_ms: 1_000,
            },
        )
        .unwrap();
        let tip = *s.tips.keys().next().unwrap();
        assert!(tips_to_apply(&s, 1, 10).is_empty(), "manual: waits");
        let mut auto = s.clone();
        auto.settings.pro_tip_mode = ProTipMode::Automatic;
        assert_eq!(tips_to_apply(&auto, 1, 10)[0].id, tip);
        assert!(tips_to_apply(&auto, 2, 10).is_empty(), "only the source");
        assert!(
            tips_to_apply(&auto, 1, 1_000).is_empty(),
            "not once expired"
        );
        apply(
            &mut s,
            Command::ResolveTip {
                tip,
                state: TipState::Accepted,
                at_ms: 5,
            },
        )
        .unwrap();
        assert_eq!(tips_to_apply(&s, 1, 10)[0].id, tip);
        let mut dismissed = state(ProTipMode::Automatic);
        apply(
            &mut dismissed,
            Command::RaiseTip {
                vm: "big".into(),
                target: 2,
                reason: "test".into(),
                at_ms: 0,
                expires_at_ms: 1_000,
            },
        )
        .unwrap();
        let tip = *dismissed.tips.keys().next().unwrap();
        apply(
            &mut dismissed,
            Command::ResolveTip {
                tip,
                state: TipState::Dismissed,
                at_ms: 1,
            },
        )
        .unwrap();
        assert!(tips_to_apply(&dismissed, 1, 10).is_empty());
    }

    #[test]
    fn reports_must_hold_shares() {
        let mut r = hot(0);
        assert!(r.check().is_ok());
        r.cpu = f64::NAN;
        assert!(r.check().is_err());
        let mut r = hot(0);
        r.vms.get_mut("mid").unwrap().cpu = 1.5;
        assert!(r.check().is_err());
    }
}
