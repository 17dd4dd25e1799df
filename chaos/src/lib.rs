//! Chaos: fault injection for tests and examples — link proxies, seeded fault
//! schedules, an invariant checker over recorded histories, network namespaces.
//! Used only as a dev-dependency: no production code path links it.

pub mod checker;
pub mod proxy;
pub mod schedule;
