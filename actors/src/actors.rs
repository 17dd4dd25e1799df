//! The actix actors: a `NodeActor` per node, a `MigrationJob` per move.
//!
//! Handlers never block: the migration itself runs as a tokio task the job
//! actor owns (on the multi-threaded runtime, where the page stream wants to
//! be), and the node actor learns about the cluster through a task that feeds
//! it the store's applied changes in order.

use crate::job::{self, JobHandle, MigrationError, MigrationReport, MoveRequest};
use crate::node::NodeShared;
use actix::prelude::*;
use ferry_cluster::{Applied, Change, Command, Response};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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

#[derive(Message)]
#[rtype(result = "()")]
struct StoreChanged(Applied);

/// One node's control actor.
pub struct NodeActor {
    shared: Arc<NodeShared>,
    jobs: HashMap<String, (Addr<MigrationJob>, JobHandle)>,
}

impl NodeActor {
    pub fn new(shared: Arc<NodeShared>) -> Self {
        NodeActor {
            shared,
            jobs: HashMap::new(),
        }
    }
}

impl Actor for NodeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let mut changes = self.shared.cluster.subscribe();
        let addr = ctx.address();
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(applied) => addr.do_send(StoreChanged(applied)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

impl Handler<StoreChanged> for NodeActor {
    type Result = ();

    fn handle(&mut self, msg: StoreChanged, _ctx: &mut Context<Self>) {
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
        let task = tokio::spawn(job::run(self.shared.clone(), request, self.handle.clone()));
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
