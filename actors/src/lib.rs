//! Actors: Node, Vm and MigrationJob actors (actix) that drive live migration,
//! and the pure decision logic they consult (convergence policy, estimates).
//!
//! - [`node`]: a node's shared state — the guests it hosts, starting,
//!   stopping and losing them, client appends.
//! - [`migration`]: the two sides of a move — [`migration::source`] (start to
//!   switchover), [`migration::target`] (the RPC service that takes the copy),
//!   and the control messages between them, [`migration::protocol`].
//! - [`actors`]: the actix actors that own and drive the above.
//! - [`qemu`]: where a node runs its QEMU guests (boot image, run dirs).
//! - [`switch`]: the virtual switch clients reach VMs through.
//! - [`disks`]: where a node keeps its guests' virtual disks, and which
//!   disk a guest gets (copied with it, or on a shared volume).
//! - [`local`]: a whole cluster in one process, for examples, tests and
//!   control planes that embed Ferry.
//! - [`policy`]: pure decisions — when to stop iterating, how long a move
//!   will take, which node a VM goes to, what a drain does next, when a tip
//!   is raised.
//! - [`triggers`]: what starts moves besides a user — maintenance drains with
//!   failback, and policy (PRO) tips: load reports, the leader's loop,
//!   applying tips.
//! - [`measure`]: what a pre-move estimate is computed from — the dirty
//!   rate sampled from the guest's dirty log, the bandwidth from recent moves
//!   or a probe.
//! - [`history`]: an optional recorder of what a node did to its guests and
//!   migrations, for the chaos suite's invariant checker.

pub mod actors;
pub mod disks;
pub mod history;
pub mod local;
pub mod measure;
pub mod migration;
pub mod node;
pub mod policy;
pub mod qemu;
pub mod switch;
pub mod triggers;
