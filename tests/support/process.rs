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

/// Asserts that resident memory grew by less than `rss_bound` bytes and the
/// live tasks by less than `task_bound` under an attack of `attack` (its
/// description, for the failure message).
pub fn assert_bounded(
    rss_grew: u64,
    rss_bound: u64,
    tasks_before: usize,
    tasks_peak: usize,
    task_bound: usize,
    attack: &str,
) {
    assert!(
        rss_grew < rss_bound,
        "resident memory grew {} MiB under the attack (bound {} MiB)",
        rss_grew >> 20,
        rss_bound >> 20
    );
    assert!(
        tasks_peak < tasks_before + task_bound,
        "tasks grew from {tasks_before} to {tasks_peak} over {attack}"
    );
}
