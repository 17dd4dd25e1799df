//! Actors: Node, Vm and MigrationJob actors (actix) that drive live migration,
//! and the pure decision logic they consult (convergence policy, estimates).

pub mod estimate;
pub mod policy;
