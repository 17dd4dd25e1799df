//! Support for the chaos tests: the in-process chaos cluster, the history
//! recording, the fault driver and one seeded run (`tests/chaos.rs`); `ferry`
//! daemons as processes, network namespaces and the observer probe
//! (`tests/chaos_process.rs`, `tests/chaos_netns.rs`); moves with a network
//! failing from outside (`tests/netns_paths.rs`, `examples/path_soak.rs`).
#![allow(dead_code)]

pub mod cluster;
pub mod daemons;
pub mod faults;
pub mod netns;
pub mod paths;
pub mod qemu_watch;
pub mod recording;
pub mod run;
