//! The cluster's downtime limit reaches every kind of move: a drain (which no
//! user asked to be careful) plans each blackout under the limit the settings
//! name, or gives the move up and leaves the VM running where it was.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::actors::DrainNode;
use ferry_actors::history::HistoryEvent;
use ferry_actors::migration::source::Phase;
use ferry_actors::policy::drain::VmDrain;
use ferry_actors::triggers::drain::{self, DrainOptions};
use ferry_cluster::model::MigrationTrigger;
use ferry_cluster::Command;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

/// Memory and dirty rate of each guest: round 0 leaves more than 50 ms of
/// dirty pages (a drain under the default 300 ms limit pauses right there),
/// while the dirty rate is a small share of the link, so a round more brings
/// the remainder under the limit.
const MEMORY: u64 = 512 * MIB;
const DIRTY_PAGES_PER_SEC: u64 = 12_000;

/// Every node's history, each event with the moment it was reported.
struct History(Arc<Mutex<Vec<(Instant, HistoryEvent)>>>);

impl History {
    fn record(cluster: &TestCluster) -> History {
        let seen = Arc::new(Mutex::new(Vec::new()));
        for node in &cluster.nodes {
            let seen = seen.clone();
            node.shared.set_history(Arc::new(move |event| {
                seen.lock().unwrap().push((Instant::now(), event));
            }));
        }
        History(seen)
    }

    /// Each migration that paused its guest: the blackout, from the source's
    /// pause until the guest ran again (on the target, or on the source after
    /// an abort); `None` if it never ran again.
    fn blackouts(&self) -> BTreeMap<u64, Option<Duration>> {
        let mut out = BTreeMap::new();
        let mut paused = BTreeMap::new();
        for (at, event) in self.0.lock().unwrap().iter() {
            match event {
                HistoryEvent::SourcePaused { migration, .. } => {
                    paused.insert(*migration, *at);
                    out.insert(*migration, None);
                }
                HistoryEvent::TargetResumed { migration, .. }
                | HistoryEvent::SourceResumed { migration, .. } => {
                    if let Some(p) = paused.get(migration) {
                        out.entry(*migration)
                            .or_insert(None)
                            .get_or_insert(at.saturating_duration_since(*p));
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Copy rounds each migration ran (round 0 included).
    fn rounds(&self) -> BTreeMap<u64, u32> {
        let mut out = BTreeMap::new();
        for (_, event) in self.0.lock().unwrap().iter() {
            if let HistoryEvent::CopyRound { migration, .. } = event {
                *out.entry(*migration).or_insert(0) += 1;
            }
        }
        out
    }
}

#[test]
fn a_drain_under_a_50_ms_downtime_limit_plans_every_blackout_under_it() {
    run(async {
        let cluster = TestCluster::start("drain-50ms", 3).await.unwrap();
        let limit = Duration::from_millis(50);
        let mut settings = cluster.node(1).shared.cluster.read().settings.clone();
        settings.downtime_limit_ms = 50;
        cluster
            .write(Command::UpdateSettings { settings })
            .await
            .unwrap();
        let names = ["ledger-1", "ledger-2", "ledger-3"];
        for (i, name) in names.iter().enumerate() {
            let workload = ferry_vmm::Workload {
                dirty_pages_per_sec: Some(DIRTY_PAGES_PER_SEC),
                pattern: ferry_vmm::Pattern::Uniform,
                seed: i as u64,
            };
            cluster
                .start_vm(name, 1, MEMORY, workload, 30 + i as u8)
                .await
                .unwrap();
        }
        let clients: Vec<Client> = names
            .iter()
            .map(|n| Client::start(cluster.switch.clone(), n))
            .collect();
        let history = History::record(&cluster);
        // What the policy expected of each blackout, announced as the guest
        // pauses (node 1 is the source of every move of its drain).
        let planned = Arc::new(Mutex::new(BTreeMap::new()));
        let mut events = cluster.node(1).shared.events.subscribe();
        let listener = {
            let planned = planned.clone();
            tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(p) if p.phase == Phase::Blackout => {
                            planned
                                .lock()
                                .unwrap()
                                .insert(p.migration, p.expected_downtime);
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    }
                }
            })
        };

        // The drain's own options say nothing about downtime: the cluster's
        // setting must reach every move.
        let mut progress = cluster
            .node(1)
            .actor
            .send(DrainNode(DrainOptions::default()))
            .await
            .unwrap()
            .unwrap();
        let report = drain::wait(&mut progress, Duration::from_secs(120))
            .await
            .unwrap();

        let state = cluster.node(1).shared.cluster.read();
        let blackouts = history.blackouts();
        let rounds = history.rounds();
        // Each pause was announced before its move ended; the listener may
        // still be reading.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let planned = loop {
            let planned = planned.lock().unwrap().clone();
            if blackouts.keys().all(|id| planned.contains_key(id)) {
                break planned;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pauses not announced: {blackouts:?} {planned:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        listener.abort();
        let mut moved = 0;
        for (name, client) in names.iter().zip(clients) {
            let ids: Vec<u64> = state
                .migrations
                .iter()
                .filter(|(_, m)| m.vm == *name && m.trigger == MigrationTrigger::Drain)
                .map(|(id, _)| *id)
                .collect();
            assert!(!ids.is_empty(), "{name}: the drain moved it or tried");
            for id in &ids {
                match blackouts.get(id) {
                    // Gave up before pausing: the guest never went dark.
                    None => {}
                    Some(None) => panic!("{name}: migration {id} paused it for good"),
                    Some(Some(_)) => {
                        let plan = planned.get(id).copied();
                        assert!(
                            plan.is_some_and(|p| p <= limit),
                            "{name}: migration {id} planned a blackout of {plan:?}, limit {limit:?}"
                        );
                    }
                }
            }
            let home = match &report.vms[*name] {
                VmDrain::Moved { target, epoch, .. } => {
                    moved += 1;
                    assert_eq!(cluster.running(name), vec![(*target, *epoch)]);
                    *target
                }
                // The policy could not promise the limit: the VM stays home.
                VmDrain::Stuck { .. } => {
                    assert_eq!(cluster.running(name), vec![(1, state.vms[*name].epoch)]);
                    1
                }
                other => panic!("{name}: {other:?}"),
            };
            let log = client.stop();
            assert_no_acked_append_lost(&cluster, home, name, &log);
            for id in &ids {
                println!(
                    "{name}: migration {id}, {:?} rounds, blackout planned {:?}, measured {:?}",
                    rounds.get(id),
                    planned.get(id),
                    blackouts.get(id).copied().flatten()
                );
            }
        }
        assert!(moved > 0, "nothing moved: {report:?}");
    });
}
