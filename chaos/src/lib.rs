//! Chaos: fault injection for tests and examples — link proxies, seeded fault
//! schedules, an invariant checker over recorded histories, the witness that
//! digests guests for it, fault traces for replay, network namespaces.
//! Used only as a dev-dependency: no production code path links it.

pub mod checker;
pub mod proxy;
pub mod schedule;
pub mod trace;
pub mod witness;
