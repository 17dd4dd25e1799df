//! Cluster store: the Raft-replicated cluster configuration of a Ferry cluster (openraft 0.9).
//!
//! Every decision the cluster makes — who is a member, which node is in maintenance, which
//! networks carry migrations, which node owns each VM — lives in one replicated
//! [`ClusterState`], changed only by [`Command`]s that a Raft majority committed.
//!
//! - [`model`]: the state itself, plain data.
//! - [`command`]: the commands, their responses and their typed refusals.
//! - [`apply()`]: the state machine as one pure function (no I/O, no clock).
//! - [`store`]: the durable log (redb, fsync before acknowledging) and the snapshotting
//!   state machine.
//! - [`network`]: Raft RPCs and leader forwarding over the transport's RPC.
//! - [`node`]: [`ClusterNode`], the handle the rest of Ferry uses.
//!
//! ```text
//! caller ── write(cmd) ──▶ ClusterNode ──(follower: forward over "cluster")──▶ leader
//!                                                     leader: Raft log ──▶ majority fsync
//!          ◀── Response / CommandError ◀── apply(state, cmd) on every replica, in order
//! ```

pub mod apply;
pub mod command;
pub mod model;
pub mod network;
pub mod node;
pub mod raft_types;
pub mod store;

pub use apply::apply;
pub use command::{ApplyResult, Command, CommandError, Resource, Response};
pub use model::{ClusterState, MigrationId, NodeId, TipId};
pub use network::{CallError, ClusterTransport, ServiceHandler};
pub use node::{ClusterError, ClusterNode, ClusterNodeConfig, RaftTiming, SnapshotSettings};
pub use raft_types::{Member, RaftMetrics};
pub use store::{Applied, Change, StoreStats};
