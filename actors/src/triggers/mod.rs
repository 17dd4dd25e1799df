//! What starts moves besides a user: a maintenance [`drain`] empties a paused
//! node (and a failback brings its VMs back), and policy [`tips`] move a VM off
//! a node that stays overloaded. Both are driven by the cluster store, so a
//! request through any node reaches the node that must act, whose actor runs
//! the moves. Their decisions are the pure ones in [`policy`](crate::policy).

pub mod drain;
pub mod tips;
