//! Ferry moves running virtual machines between the nodes of a cluster without
//! their clients noticing.
//!
//! This crate is the facade a control plane embeds: it re-exports the parts
//! (guests, transport, cluster store, actors) and holds the `ferry` binary.

pub mod demo;

pub use ferry_actors as actors;
pub use ferry_vmm as vmm;
