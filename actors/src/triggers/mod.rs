//! What starts moves and restarts besides a user: a maintenance [`drain`]
//! empties a paused node (and a failback brings its VMs back), policy
//! [`tips`] move a VM off a node that stays overloaded, and [`failover`]
//! notices a dead node, fences it and restarts its VMs elsewhere. They are
//! driven by the cluster store, so a request through any node reaches the
//! node that must act. Their decisions are the pure ones in
//! [`policy`](crate::policy).

pub mod drain;
pub mod failover;
pub mod tips;
