//! What a test under attack reads of its own process: resident memory and
//! the tokio runtime's live tasks. Shared by the hostile-input tests of
//! several crates (`#[path]`-included), so each bound is read the same way.

/// The process's resident memory in bytes, from `/proc/self/status` (Ferry
/// runs on Linux only).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kib << 10
}

/// Tasks alive on the current tokio runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}
