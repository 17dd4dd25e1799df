//! Failover, the I/O side: lease renewals, fencing, the leader's failure
//! detector and the restarts it orders. The rules are the pure ones in
//! [`policy::failover`](crate::policy::failover); read its module doc first.
//!
//! Every node runs one [`FailoverLoop`]:
//! - **Renewal.** Every `renew_every` the node asks the Raft leader (RPC
//!   service [`LIVENESS_SERVICE`]; on the leader, itself) to confirm it. The
//!   leader answers only after confirming its leadership with a quorum, and
//!   the node then extends its lease to `sent + lease`, which is the deadline
//!   of [`NodeShared::run_lease`]: every guest of the node checks it before
//!   each batch of work and each service append, so a node that stops hearing
//!   back — partitioned, or its process paused and continued — has stopped its
//!   guests by the deadline, without any task of its own having to run.
//! - **Down.** A node the store shows down is told so when it renews: it
//!   throws away every guest it holds (each is being restarted elsewhere),
//!   then marks itself up, and only then is leased again.
//! - **Detection** (on the leader): a node silent for the detection timeout
//!   is marked down, with the reason. A detector that did not run for a
//!   while (this process was paused) starts counting afresh, so a leader
//!   that was itself stopped does not condemn the nodes it could not hear.
//! - **Restart** (on the leader): every VM that needs a restart and may be
//!   restarted is started on the node [`restarts`] chooses, by writing
//!   `StartVm` for that node; that node's actor boots it
//!   ([`NodeShared::adopt_start`]). The store refuses a second start of the
//!   same VM, so each restart happens once, at a new epoch.

use crate::node::{lock, now_ms, NodeShared};
use crate::policy::failover::{restarts, Detector, Lease, LeaseTiming, Renewal};
use ferry_cluster::model::NodeState;
use ferry_cluster::{ClusterError, Command, CommandError, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// RPC service on which the leader confirms lease renewals.
pub const LIVENESS_SERVICE: &str = "liveness";

/// How long a restart the leader ordered is left alone before it is
/// ordered again (the target may have failed to boot it).
const RESTART_RETRY: Duration = Duration::from_secs(5);

/// A call on the [`LIVENESS_SERVICE`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum LivenessRequest {
    /// Confirm the caller's lease.
    Renew,
    /// An operator asks for `node` to be declared down (see
    /// [`FailoverLoop::mark_down`]).
    MarkDown {
        node: NodeId,
        reason: String,
        confirmed_dead: bool,
    },
}

/// What this node's failover loop has done, for status pages and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailoverStatus {
    /// Whether the node holds its lease now.
    pub leased: bool,
    /// How long the lease has left, in milliseconds (0 when it does not hold).
    pub lease_left_ms: u64,
    /// Times this node's lease lapsed while it ran (its guests stopped).
    pub lapses: u64,
    /// Times the store told this node it was down and it dropped its guests.
    pub downs: u64,
}

/// The failover loop of one node (see the module doc). Dropping it, or
/// [`FailoverLoop::stop`], ends its tasks; the node's guests then keep the
/// lease they last had and stop when it ends.
pub struct FailoverLoop {
    node: Arc<NodeShared>,
    lease: Mutex<Lease>,
    /// The detector of the term in which this node leads, if it leads.
    detector: Mutex<Option<(u64, Detector)>>,
    /// VMs this leader ordered restarted, and when.
    restarting: Mutex<BTreeMap<String, Instant>>,
    status: Mutex<FailoverStatus>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl FailoverLoop {
    /// Starts the loop on `node`. From here on the node's guests run only
    /// while it holds its lease, which it has not yet: the first renewal
    /// follows at once. Must run inside a tokio runtime.
    pub fn start(node: Arc<NodeShared>) -> Arc<FailoverLoop> {
        node.run_lease().expire();
        let failover = Arc::new(FailoverLoop {
            node: node.clone(),
            lease: Mutex::new(Lease::default()),
            detector: Mutex::new(None),
            restarting: Mutex::new(BTreeMap::new()),
            status: Mutex::new(FailoverStatus::default()),
            tasks: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&failover);
        node.rpc.register(
            LIVENESS_SERVICE,
            ferry_transport::handler_fn(move |from, request| {
                let weak = weak.clone();
                async move {
                    let failover = weak.upgrade().ok_or("failover is stopped")?;
                    match ferry_transport::decode::<LivenessRequest>(&request)
                        .map_err(|e| e.to_string())?
                    {
                        LivenessRequest::Renew => {
                            let renewal = failover.confirm(from).await?;
                            Ok(ferry_transport::encode(&renewal))
                        }
                        LivenessRequest::MarkDown {
                            node,
                            reason,
                            confirmed_dead,
                        } => {
                            let said = failover
                                .mark_down_here(node, &reason, confirmed_dead)
                                .await?;
                            Ok(ferry_transport::encode(&said))
                        }
                    }
                }
            }),
        );
        let renewals = tokio::spawn(renew_loop(Arc::downgrade(&failover)));
        let leader = tokio::spawn(leader_loop(Arc::downgrade(&failover)));
        *lock(&failover.tasks) = vec![renewals.abort_handle(), leader.abort_handle()];
        failover
    }

    /// Stops the loop's tasks.
    pub fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    pub fn status(&self) -> FailoverStatus {
        let mut status = lock(&self.status).clone();
        let until = lock(&self.lease).until();
        let now = Instant::now();
        status.leased = until.is_some_and(|u| now < u);
        status.lease_left_ms =
            until.map_or(0, |u| u.saturating_duration_since(now).as_millis() as u64);
        status
    }

    fn timing(&self) -> LeaseTiming {
        LeaseTiming::from_settings(&self.node.cluster.read().settings)
    }

    fn term(&self) -> u64 {
        self.node.cluster.metrics().current_term
    }

    fn is_leader(&self) -> bool {
        self.node.cluster.leader() == Some(self.node.id)
    }

    /// The detector of the current term, made afresh when the term changed.
    fn with_detector<T>(&self, term: u64, f: impl FnOnce(&mut Detector) -> T) -> T {
        let mut slot = lock(&self.detector);
        if slot.as_ref().is_some_and(|(t, _)| *t != term) {
            *slot = None;
        }
        let (_, detector) = slot.get_or_insert_with(|| (term, Detector::new(Instant::now())));
        f(detector)
    }

    /// Confirms with a quorum, now, that this node leads, and reads the
    /// state as of that moment; answers the term it leads in.
    async fn confirm_leadership(
        &self,
        within: Duration,
    ) -> Result<(u64, Arc<ferry_cluster::model::ClusterState>), String> {
        if !self.is_leader() {
            return Err("not the leader".into());
        }
        let term = self.term();
        let state = self
            .node
            .cluster
            .read_linearizable_within(within)
            .await
            .map_err(|e| format!("leadership not confirmed: {e}"))?;
        if self.term() != term || !self.is_leader() {
            return Err("leadership changed".into());
        }
        Ok((term, state))
    }

    /// The leader's side of a renewal from `from` (or from itself).
    async fn confirm(&self, from: NodeId) -> Result<Renewal, String> {
        // A quorum confirms this node still leads, after the renewal was
        // sent: any later leader was elected after this point.
        let (term, state) = self.confirm_leadership(self.timing().lease).await?;
        let down = match state.nodes.get(&from) {
            Some(n) => n.state == NodeState::Down,
            None => return Err(format!("node {from} is not in the cluster")),
        };
        let renewal = self.with_detector(term, |d| d.renewed(from, Instant::now(), down));
        if renewal == Renewal::Down && !down {
            // Being declared down right now: no lease, and no "down" either
            // until the store says so (the write may still fail).
            return Err(format!("node {from} is being declared down"));
        }
        Ok(renewal)
    }

    /// An operator declares `node` down, through any node (the leader
    /// decides). The fencing guarantee: without `confirmed_dead` the node is
    /// declared down only once the leader has heard no renewal from it for
    /// the detection timeout, so its lease has ended and its guests stopped
    /// whatever state it is in; a node that renewed within that time is
    /// refused as alive. With `confirmed_dead` the operator vouches that the
    /// node cannot run anything (powered off, its process killed) and it is
    /// declared down at once: if that is not true, its VMs may run twice
    /// until its lease ends. Answers what was done.
    pub async fn mark_down(
        &self,
        node: NodeId,
        reason: &str,
        confirmed_dead: bool,
    ) -> Result<String, String> {
        let leader = self
            .node
            .cluster
            .leader()
            .ok_or("the cluster has no leader")?;
        if leader == self.node.id {
            return self.mark_down_here(node, reason, confirmed_dead).await;
        }
        let request = LivenessRequest::MarkDown {
            node,
            reason: reason.to_string(),
            confirmed_dead,
        };
        self.ask_leader(leader, &request, Duration::from_secs(10))
            .await
    }

    /// One call on the leader's liveness service, its answer decoded.
    async fn ask_leader<T: serde::de::DeserializeOwned>(
        &self,
        leader: NodeId,
        request: &LivenessRequest,
        timeout: Duration,
    ) -> Result<T, String> {
        let addrs = self
            .node
            .directory
            .get(leader)
            .map(|p| p.rpc)
            .ok_or_else(|| format!("leader {leader} is not in the directory"))?;
        let reply = self
            .node
            .rpc
            .call(
                leader,
                &addrs,
                LIVENESS_SERVICE,
                ferry_transport::encode(request),
                timeout,
            )
            .await
            .map_err(|e| format!("asking leader {leader}: {e}"))?;
        ferry_transport::decode::<T>(&reply).map_err(|e| e.to_string())
    }

    async fn mark_down_here(
        &self,
        node: NodeId,
        reason: &str,
        confirmed_dead: bool,
    ) -> Result<String, String> {
        let timing = self.timing();
        let (term, state) = self.confirm_leadership(Duration::from_secs(3)).await?;
        match state.nodes.get(&node) {
            None => return Err(format!("unknown node {node}")),
            Some(n) if n.state == NodeState::Down => {
                return Ok(format!("node {node} is already down"))
            }
            Some(_) => {}
        }
        let silent = self.with_detector(term, |d| d.silent_for(node, Instant::now()));
        if !confirmed_dead && silent < timing.detection {
            return Err(format!(
                "node {node} renewed its lease {} ms ago: it may still run its VMs, so it is not \
                 declared down (they would run twice). Stop it (`ferry node stop`, or kill its \
                 process) and the cluster declares it down {} ms after its last renewal; or, \
                 if you know it cannot run anything, confirm that it is dead",
                silent.as_millis(),
                timing.detection.as_millis()
            ));
        }
        self.with_detector(term, |d| d.condemn(node));
        let why = if confirmed_dead {
            format!("declared dead by an operator: {reason}")
        } else {
            format!(
                "declared down by an operator after {} ms without a lease renewal: {reason}",
                silent.as_millis()
            )
        };
        match self
            .node
            .cluster
            .write(Command::MarkNodeDown {
                node,
                reason: why.clone(),
                at_ms: now_ms(),
            })
            .await
        {
            Ok(_) | Err(ClusterError::Rejected(CommandError::NodeDown { .. })) => {
                self.with_detector(term, |d| d.settled(node, Instant::now()));
                Ok(format!(
                    "node {node} is down ({why}); its VMs restart elsewhere"
                ))
            }
            Err(e) => {
                self.with_detector(term, |d| d.pardon(node));
                Err(e.to_string())
            }
        }
    }

    /// One renewal: ask the leader, extend the lease, or learn of being down.
    async fn renew(&self, timing: LeaseTiming) -> Result<(), String> {
        let sent = Instant::now();
        let leader = self.node.cluster.leader().ok_or("no leader known")?;
        let renewal = if leader == self.node.id {
            self.confirm(self.node.id).await?
        } else {
            self.ask_leader(leader, &LivenessRequest::Renew, timing.lease)
                .await?
        };
        match renewal {
            Renewal::Leased => {
                lock(&self.lease).confirmed(sent, timing.lease);
                self.node.run_lease().extend_to(sent + timing.lease);
                Ok(())
            }
            Renewal::Down => {
                self.on_down().await;
                Ok(())
            }
        }
    }

    /// The store declares this node down: drop every guest, then say it is
    /// up again (the next renewal then leases it).
    async fn on_down(&self) {
        lock(&self.lease).revoke();
        self.node.run_lease().expire();
        let dropped = self.node.drop_all_guests();
        if !dropped.is_empty() {
            tracing::warn!(
                node = self.node.id,
                ?dropped,
                "declared down by the cluster: dropped every guest (each restarts elsewhere)"
            );
        }
        lock(&self.status).downs += 1;
        match self
            .node
            .cluster
            .write(Command::MarkNodeUp { node: self.node.id })
            .await
        {
            Ok(_) => tracing::info!(node = self.node.id, "back in the cluster"),
            Err(ClusterError::Rejected(CommandError::NodeNotDown { .. })) => {}
            Err(e) => tracing::debug!(node = self.node.id, "marking this node up: {e}"),
        }
    }

    /// The leader's periodic work: mark silent nodes down, restart VMs.
    async fn lead(&self, timing: LeaseTiming, stalled: bool) {
        let term = self.term();
        if stalled {
            self.with_detector(term, |d| *d = Detector::new(Instant::now()));
        }
        let state = self.node.cluster.read();
        let now = Instant::now();
        let suspects = self.with_detector(term, |d| {
            d.suspects(&state, self.node.id, now, timing.detection)
        });
        for suspect in suspects {
            self.with_detector(term, |d| d.condemn(suspect.node));
            let reason = format!(
                "no lease renewal for {} ms (failure detection after {} ms)",
                suspect.silent_for.as_millis(),
                timing.detection.as_millis()
            );
            tracing::warn!(node = suspect.node, %reason, "declaring node down");
            let written = self
                .node
                .cluster
                .write(Command::MarkNodeDown {
                    node: suspect.node,
                    reason,
                    at_ms: now_ms(),
                })
                .await;
            match written {
                Ok(_) | Err(ClusterError::Rejected(CommandError::NodeDown { .. })) => {
                    self.with_detector(term, |d| d.settled(suspect.node, Instant::now()))
                }
                Err(e) => {
                    tracing::info!(node = suspect.node, "could not declare the node down: {e}");
                    self.with_detector(term, |d| d.pardon(suspect.node));
                }
            }
        }
        self.restart_lost_vms().await;
    }

    async fn restart_lost_vms(&self) {
        let state = self.node.cluster.read();
        let now = Instant::now();
        let skip: BTreeSet<String> = {
            let mut restarting = lock(&self.restarting);
            restarting.retain(|vm, at| {
                now.duration_since(*at) < RESTART_RETRY && state.vms.contains_key(vm)
            });
            restarting.keys().cloned().collect()
        };
        for restart in restarts(&state, &skip) {
            let node = match restart.target {
                Ok(node) => node,
                Err(why) => {
                    tracing::debug!(vm = %restart.vm, "cannot restart yet: {why}");
                    continue;
                }
            };
            lock(&self.restarting).insert(restart.vm.clone(), now);
            match self
                .node
                .cluster
                .write(Command::StartVm {
                    vm: restart.vm.clone(),
                    node,
                })
                .await
            {
                Ok(_) => tracing::info!(vm = %restart.vm, node, "restarting a VM whose node died"),
                Err(e) => tracing::info!(vm = %restart.vm, node, "restart refused: {e}"),
            }
        }
    }
}

impl Drop for FailoverLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn renew_loop(failover: Weak<FailoverLoop>) {
    let mut lapsed = false;
    loop {
        let Some(f) = failover.upgrade() else { return };
        if f.node.is_dead() {
            return;
        }
        let timing = f.timing();
        if let Err(e) = tokio::time::timeout(timing.lease, f.renew(timing))
            .await
            .unwrap_or_else(|_| Err("renewal timed out".into()))
        {
            tracing::debug!(node = f.node.id, "lease not renewed: {e}");
        }
        let holds = lock(&f.lease).holds_at(Instant::now());
        if !holds && !lapsed && lock(&f.lease).until().is_some() {
            tracing::warn!(
                node = f.node.id,
                "lease with the cluster lapsed: this node's guests are stopped until it is renewed"
            );
            lock(&f.status).lapses += 1;
        }
        lapsed = !holds;
        drop(f);
        tokio::time::sleep(timing.renew_every).await;
    }
}

async fn leader_loop(failover: Weak<FailoverLoop>) {
    let mut last_tick = Instant::now();
    loop {
        let Some(f) = failover.upgrade() else { return };
        if f.node.is_dead() {
            return;
        }
        let timing = f.timing();
        let now = Instant::now();
        // Ticks come every `renew_every`; a gap of a lease means this process
        // did not run (paused, starved), and neither did it hear anyone.
        let stalled = now.duration_since(last_tick) > timing.lease;
        last_tick = now;
        if f.is_leader() {
            f.lead(timing, stalled).await;
        } else {
            lock(&f.detector).take();
        }
        drop(f);
        tokio::time::sleep(timing.renew_every).await;
    }
}
