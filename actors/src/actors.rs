//! The actix actors: a `NodeActor` per node, a `MigrationJob` per move.
//!
//! Handlers never block: the migration itself runs as a tokio task the job
//! actor owns (on the multi-threaded runtime, where the page stream wants to
//! be), and the node actor learns about the cluster through a task that feeds
//! it the store's applied changes in order.
//!
//! The node actor also reacts to what the store asks of its node: when the node
//! is paused with drain it runs the [drain], and when a policy tip about one of
//! its VMs is accepted (or raised in automatic mode) it moves the VM
//! ([`tips_to_apply`]). Both are store-driven so that a request through any
//! node — CLI, HTTP API, another node's actor — reaches the node that must act.
//!
//! Messages others send: [`MoveVm`], [`CancelMove`], [`StartVm`],
//! [`DrainNode`], [`WatchDrain`], [`ResumeNode`].

use crate::migration::source::{self, JobHandle, MigrationError, MigrationReport, MoveRequest};
use crate::node::{now_ms, NodeShared};
use crate::policy::drain::{drain_requested, drained_vms, DrainReport};
use crate::policy::tips::tips_to_apply;
use crate::triggers::drain::{self, DrainOptions, FailbackReport};
use crate::triggers::tips::tip_move;
use actix::prelude::*;
use ferry_cluster::model::TipState;
use ferry_cluster::{Applied, Change, Command, Response, TipId};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::watch;

/// Move a VM off this node.
#[derive(Message)]
#[rtype(result = "Result<MigrationReport, MigrationError>")]
pub struct MoveVm(pub MoveRequest);

/// Cancel the move of a VM; answers whether a move was under way.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct CancelMove(pub String);

/// Start a VM on this node.
#[derive(Message)]
#[rtype(result = "Result<u64, String>")]
pub struct StartVm(pub String);

/// Put this node in maintenance mode and move every VM off it (see
/// [`drain`]). Answers once the drain runs, with its progress; the drain's
/// outcome is also recorded in the store (the node's drain status). Asking a
/// node that already drains returns the running drain's progress.
#[derive(Message)]
#[rtype(result = "Result<watch::Receiver<DrainReport>, String>")]
pub struct DrainNode(pub DrainOptions);

/// The progress of this node's current (or last) drain, if it ran one.
#[derive(Message)]
#[rtype(result = "Option<watch::Receiver<DrainReport>>")]
pub struct WatchDrain;

/// Take this node out of maintenance mode; with `failback`, move back the VMs
/// its drain moved away that have not moved since (each by its owner).
#[derive(Message)]
#[rtype(result = "Result<FailbackReport, String>")]
pub struct ResumeNode {
    pub failback: bool,
    /// Verify digests in each failback move (see [`MoveRequest::verify`]).
    pub verify: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
struct StoreChanged(Applied);

#[derive(Message)]
#[rtype(result = "Option<watch::Receiver<DrainReport>>")]
struct EnsureDrain;

#[derive(Message)]
#[rtype(result = "()")]
struct TipDone(TipId);

struct DrainRun {
    task: tokio::task::JoinHandle<()>,
    progress: watch::Receiver<DrainReport>,
}

/// One node's control actor.
pub struct NodeActor {
    shared: Arc<NodeShared>,
    jobs: HashMap<String, (Addr<MigrationJob>, JobHandle)>,
    drain: Option<DrainRun>,
    /// Options for the next drain this node starts (set by [`DrainNode`];
    /// a drain requested through the store alone uses the defaults).
    drain_options: Option<DrainOptions>,
    /// Tips this node is applying now.
    applying: HashSet<TipId>,
}

impl NodeActor {
    pub fn new(shared: Arc<NodeShared>) -> Self {
        NodeActor {
            shared,
            jobs: HashMap::new(),
            drain: None,
            drain_options: None,
            applying: HashSet::new(),
        }
    }

    /// Starts a drain if the store asks for one and none runs.
    fn maybe_start_drain(&mut self, ctx: &mut Context<Self>) {
        if self.shared.is_dead() || !drain_requested(&self.shared.cluster.read(), self.shared.id) {
            return;
        }
        if self.drain.as_ref().is_some_and(|d| !d.task.is_finished()) {
            return;
        }
        let options = self.drain_options.take().unwrap_or_default();
        let (tx, rx) = watch::channel(DrainReport {
            node: self.shared.id,
            vms: Default::default(),
            outcome: None,
        });
        let task = tokio::spawn(drain::run(self.shared.clone(), ctx.address(), options, tx));
        self.drain = Some(DrainRun { task, progress: rx });
    }

    /// Moves the VMs of the tips this node should apply now.
    fn apply_tips(&mut self, ctx: &mut Context<Self>) {
        if self.shared.is_dead() {
            return;
        }
        let state = self.shared.cluster.read();
        let due: Vec<(TipId, String, u64)> = tips_to_apply(&state, self.shared.id, now_ms())
            .into_iter()
            .filter(|t| !self.applying.contains(&t.id))
            .map(|t| (t.id, t.vm.clone(), t.target))
            .collect();
        drop(state);
        for (tip, vm, target) in due {
            self.applying.insert(tip);
            let me = ctx.address();
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let request = tip_move(tip, vm, target);
                let result = me
                    .send(MoveVm(request))
                    .await
                    .unwrap_or_else(|e| Err(MigrationError::Aborted(format!("node actor: {e}"))));
                match &result {
                    Ok(report) => {
                        tracing::info!(tip, vm = %report.vm, target = report.target, "tip applied")
                    }
                    // Refused before the migration began: the tip is still
                    // open, and says why it could not be applied. (Once begun,
                    // the tip is `Applied` and the migration records the rest.)
                    Err(e @ (MigrationError::Rejected(_) | MigrationError::Refused(_))) => {
                        let _ = shared
                            .cluster
                            .write(Command::ResolveTip {
                                tip,
                                state: TipState::Failed {
                                    reason: e.to_string(),
                                },
                                at_ms: now_ms(),
                            })
                            .await;
                    }
                    Err(e) => tracing::info!(tip, "tip's move did not complete: {e}"),
                }
                me.do_send(TipDone(tip));
            });
        }
    }
}

impl Actor for NodeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        drain::serve_failback(&self.shared, ctx.address());
        // The store may have asked for something before this actor started.
        self.maybe_start_drain(ctx);
        self.apply_tips(ctx);
        let mut changes = self.shared.cluster.subscribe();
        let addr = ctx.address();
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(applied) => addr.do_send(StoreChanged(applied)),
                    // Changes were missed: look at everything again, as
                    // after a snapshot.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        addr.do_send(StoreChanged(Applied {
                            index: 0,
                            change: Change::Snapshot,
                        }))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

impl Handler<StoreChanged> for NodeActor {
    type Result = ();

    fn handle(&mut self, msg: StoreChanged, ctx: &mut Context<Self>) {
        // What the store may now ask of this node.
        let (drain, tips) = match &msg.0.change {
            Change::Command {
                command,
                result: Ok(_),
            } => match command {
                Command::PauseNode { node, .. }
                | Command::RecordDrain { node, .. }
                | Command::ResumeNode { node } => (*node == self.shared.id, false),
                Command::RaiseTip { .. }
                | Command::ResolveTip { .. }
                | Command::UpdateSettings { .. } => (false, true),
                _ => (false, false),
            },
            Change::Snapshot => (true, true),
            _ => (false, false),
        };
        if drain {
            self.maybe_start_drain(ctx);
        }
        if tips {
            self.apply_tips(ctx);
        }
        // VMs the store started here without this node asking (failover).
        match &msg.0.change {
            Change::Command {
                command: Command::StartVm { vm, .. },
                result: Ok(Response::VmStarted { node, epoch, .. }),
            } if *node == self.shared.id => self.shared.spawn_adopt(vm.clone(), *epoch),
            Change::Snapshot => self.shared.adopt_orphans(),
            _ => {}
        }
        // Migrations whose outcome this change may have decided.
        let decided: Vec<u64> = match msg.0.change {
            Change::Command { command, result } => match (command, result) {
                (Command::CommitSwitchover { migration, .. }, Ok(_))
                | (Command::AbortMigration { migration, .. }, Ok(_)) => vec![migration],
                (_, Ok(Response::NodeMarkedDown { aborted, .. })) => aborted,
                _ => Vec::new(),
            },
            // A snapshot may carry any number of outcomes: look at all of them.
            Change::Snapshot => self
                .shared
                .cluster
                .read()
                .migrations
                .keys()
                .copied()
                .collect(),
            Change::Membership { .. } => Vec::new(),
        };
        for migration in decided {
            self.shared.on_migration_outcome(migration);
        }
    }
}

impl Handler<MoveVm> for NodeActor {
    type Result = ResponseFuture<Result<MigrationReport, MigrationError>>;

    fn handle(&mut self, msg: MoveVm, ctx: &mut Context<Self>) -> Self::Result {
        let vm = msg.0.vm.clone();
        // One job per guest: a second would pause and resume a guest the
        // first still holds (its late abort resuming a guest the second had
        // paused), whatever the store says about the first migration.
        if self.jobs.contains_key(&vm) {
            return Box::pin(async move {
                Err(MigrationError::Refused(format!(
                    "VM {vm} is already being moved from this node"
                )))
            });
        }
        let handle = JobHandle::default();
        let (reply, done) = tokio::sync::oneshot::channel();
        let job = MigrationJob {
            shared: self.shared.clone(),
            request: Some(msg.0),
            handle: handle.clone(),
            reply: Some(reply),
        }
        .start();
        self.jobs.insert(vm.clone(), (job, handle));
        let me = ctx.address();
        Box::pin(async move {
            let result = done
                .await
                .unwrap_or_else(|_| Err(MigrationError::Aborted("migration job stopped".into())));
            me.do_send(JobEnded(vm));
            result
        })
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct JobEnded(String);

impl Handler<JobEnded> for NodeActor {
    type Result = ();

    fn handle(&mut self, msg: JobEnded, _ctx: &mut Context<Self>) {
        self.jobs.remove(&msg.0);
    }
}

impl Handler<TipDone> for NodeActor {
    type Result = ();

    fn handle(&mut self, msg: TipDone, _ctx: &mut Context<Self>) {
        self.applying.remove(&msg.0);
    }
}

impl Handler<EnsureDrain> for NodeActor {
    type Result = Option<watch::Receiver<DrainReport>>;

    fn handle(&mut self, _: EnsureDrain, ctx: &mut Context<Self>) -> Self::Result {
        self.maybe_start_drain(ctx);
        self.drain.as_ref().map(|d| d.progress.clone())
    }
}

impl Handler<DrainNode> for NodeActor {
    type Result = ResponseFuture<Result<watch::Receiver<DrainReport>, String>>;

    fn handle(&mut self, msg: DrainNode, ctx: &mut Context<Self>) -> Self::Result {
        // Set before the store changes, so the drain the change starts uses
        // them (a drain already running keeps its own).
        if self.drain.as_ref().is_none_or(|d| d.task.is_finished()) {
            self.drain_options = Some(msg.0);
        }
        let shared = self.shared.clone();
        let me = ctx.address();
        Box::pin(async move {
            let state = shared
                .cluster
                .read_linearizable()
                .await
                .map_err(|e| e.to_string())?;
            if !drain_requested(&state, shared.id) {
                shared
                    .cluster
                    .write(Command::PauseNode {
                        node: shared.id,
                        drain: true,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            me.send(EnsureDrain)
                .await
                .map_err(|e| format!("node actor: {e}"))?
                .ok_or_else(|| "the drain did not start".to_string())
        })
    }
}

impl Handler<WatchDrain> for NodeActor {
    type Result = Option<watch::Receiver<DrainReport>>;

    fn handle(&mut self, _: WatchDrain, _ctx: &mut Context<Self>) -> Self::Result {
        self.drain.as_ref().map(|d| d.progress.clone())
    }
}

impl Handler<ResumeNode> for NodeActor {
    type Result = ResponseFuture<Result<FailbackReport, String>>;

    fn handle(&mut self, msg: ResumeNode, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move {
            let state = shared
                .cluster
                .read_linearizable()
                .await
                .map_err(|e| e.to_string())?;
            let back = if msg.failback {
                drained_vms(&state, shared.id)
            } else {
                Vec::new()
            };
            shared
                .cluster
                .write(Command::ResumeNode { node: shared.id })
                .await
                .map_err(|e| e.to_string())?;
            if back.is_empty() {
                return Ok(FailbackReport::default());
            }
            Ok(drain::fail_back(&shared, back, msg.verify).await)
        })
    }
}

impl Handler<CancelMove> for NodeActor {
    type Result = bool;

    fn handle(&mut self, msg: CancelMove, _ctx: &mut Context<Self>) -> bool {
        match self.jobs.get(&msg.0) {
            Some((_, handle)) => {
                handle.cancel.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }
}

impl Handler<StartVm> for NodeActor {
    type Result = ResponseFuture<Result<u64, String>>;

    fn handle(&mut self, msg: StartVm, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::spawn(async move { shared.start_vm(&msg.0).await })
                .await
                .unwrap_or_else(|e| Err(format!("start task failed: {e}")))
        })
    }
}

/// One migration's source side. Its task runs the job; the actor carries the
/// result back and stops.
pub struct MigrationJob {
    shared: Arc<NodeShared>,
    request: Option<MoveRequest>,
    handle: JobHandle,
    reply: Option<tokio::sync::oneshot::Sender<Result<MigrationReport, MigrationError>>>,
}

impl Actor for MigrationJob {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(request) = self.request.take() else {
            return ctx.stop();
        };
        let task = tokio::spawn(source::run(
            self.shared.clone(),
            request,
            self.handle.clone(),
        ));
        ctx.spawn(
            actix::fut::wrap_future::<_, Self>(task).map(|result, job, ctx| {
                let result = result.unwrap_or_else(|e| {
                    Err(MigrationError::Aborted(format!(
                        "migration task failed: {e}"
                    )))
                });
                if let Some(reply) = job.reply.take() {
                    let _ = reply.send(result);
                }
                ctx.stop();
            }),
        );
    }
}
