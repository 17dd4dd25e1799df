//! Chaos: fault injection for tests and examples — link proxies, seeded fault
//! schedules, an invariant checker over recorded histories, the witness that
//! digests guests for it, abort reasons sorted into the kinds a run expects,
//! fault traces for replay, network namespaces.
//! Used only as a dev-dependency: no production code path links it.

pub mod aborts;
pub mod checker;
pub mod proxy;
pub mod schedule;
pub mod trace;
pub mod witness;
