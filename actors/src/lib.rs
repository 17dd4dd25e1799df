//! Actors: Node, Vm and MigrationJob actors (actix) that drive live migration,
//! and the pure decision logic they consult (convergence policy, estimates).
//!
//! - [`node`]: a node's shared state — the guests it hosts, and the target side
//!   of the migration exchange (an RPC service).
//! - [`job`]: the source side of one migration, start to switchover.
//! - [`actors`]: the actix actors that own and drive the above.
//! - [`protocol`]: the source↔target control messages, in one file.
//! - [`switch`]: the virtual switch clients reach VMs through.
//! - [`local`]: a whole cluster in one process, for examples, tests and
//!   control planes that embed Ferry.
//! - [`policy`], [`estimate`]: pure decisions — when to stop iterating, how long
//!   a move will take.
//! - [`placement`]: pure — which node a VM goes to, over which networks.
//! - [`drain`]: maintenance mode — moving every VM off a paused node, failback.
//! - [`tips`]: policy (PRO) tips — load reports, the leader's policy, applying
//!   tips.
//! - [`history`]: an optional recorder of what a node did to its guests and
//!   migrations, for the chaos suite's invariant checker.

pub mod actors;
pub mod drain;
pub mod estimate;
pub mod history;
pub mod job;
pub mod local;
pub mod node;
pub mod placement;
pub mod policy;
pub mod protocol;
pub mod switch;
pub mod tips;
