//! Pure policies: plain code over plain data. Each takes what it judges (a
//! store snapshot, round statistics, load reports) and the time as arguments
//! and returns a decision; none does I/O or reads a clock, so the tests run
//! without sockets, fast, and can replay recorded traces.
//!
//! - [`convergence`]: after every pre-copy round, another round, a harder
//!   throttle, stop and copy, or give up.
//! - [`estimate`]: how long a move will take and how long the guest will be
//!   dark, played against the same convergence policy.
//! - [`placement`]: which node a VM goes to, over which networks.
//! - [`drain`]: which VMs leave a paused node, for where, and what each move's
//!   outcome means for the rest.
//! - [`tips`]: when a node's load earns a tip, for which VM and target; which
//!   tips a node applies.
//! - [`failover`]: a node's lease, the leader's failure detector, and where
//!   a dead node's VMs start again.

pub mod convergence;
pub mod drain;
pub mod estimate;
pub mod failover;
pub mod placement;
pub mod tips;
