//! Helpers for the interface tests: clusters of `ferry` daemons (separate
//! processes) or of in-process nodes, free ports, and the CLI.
#![allow(clippy::unwrap_used, dead_code)]

pub mod cdp;

use ferry::client::Client;
use ferry::config::{init_cluster, InitOptions, NodeConfig};
use ferry::Node;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ferry-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A base port such that `n` consecutive ports on 127.0.0.1 are free now
/// and were not handed out before in this process: the tests of one binary
/// run at once, and a test's daemons bind their ports only later, so "free
/// now" alone would give two tests the same ports.
pub fn free_ports(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static HANDED_OUT: AtomicU16 = AtomicU16::new(0);
    let first = 20_000 + (std::process::id() % 20_000) as u16;
    let mut base = first.max(HANDED_OUT.load(Ordering::SeqCst));
    loop {
        let all_free = (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        let unclaimed = HANDED_OUT
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                (all_free && h <= base).then_some(base + n)
            })
            .is_ok();
        if unclaimed {
            return base;
        }
        base = base
            .max(HANDED_OUT.load(Ordering::SeqCst))
            .wrapping_add(n + 7)
            .max(20_000);
    }
}

/// Cluster options on networks `127.a.0.0/16` and `127.b.0.0/16` (tests use
/// their own second octets so they never collide with each other).
pub fn options(dir: &Path, nodes: u64, a: u8, b: u8) -> InitOptions {
    let mut opts = InitOptions::local(dir, nodes);
    opts.networks = vec![
        ("mig-1".into(), format!("127.{a}.0.0/16").parse().unwrap()),
        ("mig-2".into(), format!("127.{b}.0.0/16").parse().unwrap()),
    ];
    opts.api_port = free_ports(nodes as u16);
    opts.memory_mib = 8 * 1024;
    opts
}

/// The outcome of one CLI run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ferry args…` against the node configured in `config`.
pub fn cli(config: &Path, args: &[&str]) -> Run {
    let out = Command::new(FERRY)
        .args(args)
        .env("FERRY_CONFIG", config)
        .env_remove("FERRY_API")
        .env_remove("FERRY_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn client(config: &Path) -> Client {
    let c = NodeConfig::load(config).unwrap();
    Client::for_node(&c).unwrap()
}

/// Polls `f` until it returns `Some`, at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ferry node run` processes, stopped with SIGTERM on drop.
pub struct Daemons {
    pub configs: Vec<PathBuf>,
    pub children: Vec<Option<Child>>,
    pub dir: PathBuf,
}

impl Daemons {
    pub fn init(dir: &Path, nodes: u64, a: u8, b: u8) -> Daemons {
        let configs = init_cluster(&options(dir, nodes, a, b)).unwrap();
        Daemons {
            children: configs.iter().map(|_| None).collect(),
            configs,
            dir: dir.to_path_buf(),
        }
    }

    pub fn spawn(&mut self, i: usize) {
        let log = std::fs::File::create(self.dir.join(format!("node-{}.log", i + 1))).unwrap();
        let child = Command::new(FERRY)
            .args(["node", "run", "--config"])
            .arg(&self.configs[i])
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
    }

    /// Sends SIGTERM to daemon `i` and waits for it; its exit code.
    pub fn terminate(&mut self, i: usize) -> Option<i32> {
        let mut child = self.children[i].take()?;
        sigterm(&child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{}.log", i + 1))).unwrap_or_default()
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in self.children.iter().flatten() {
            sigterm(child);
        }
        for child in self.children.iter_mut().flatten() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// Nodes started in this process through the library, with the API served
/// by each; stopped (cleanly) on drop.
pub struct InProcess {
    pub configs: Vec<PathBuf>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    pub fn start(dir: &Path, nodes: u64, a: u8, b: u8) -> InProcess {
        let configs = init_cluster(&options(dir, nodes, a, b)).unwrap();
        let loaded: Vec<NodeConfig> = configs
            .iter()
            .map(|p| NodeConfig::load(p).unwrap())
            .collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            ferry::actors::local::run(async move {
                let mut running = Vec::new();
                for config in loaded {
                    let node = Node::start(config).await.unwrap();
                    let server = ferry::api::server(&node).unwrap();
                    let handle = server.handle();
                    tokio::spawn(server);
                    running.push((node, handle));
                }
                for (node, _) in &running {
                    node.wait_ready(Duration::from_secs(30)).await.unwrap();
                }
                ready_tx.send(()).unwrap();
                let _ = stopped.await;
                let mut stopping = Vec::new();
                for (node, handle) in running {
                    stopping.push(tokio::spawn(async move {
                        handle.stop(true).await;
                        node.shutdown().await;
                    }));
                }
                for s in stopping {
                    s.await.unwrap();
                }
            })
            .unwrap();
        });
        ready.recv_timeout(Duration::from_secs(60)).unwrap();
        InProcess {
            configs,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn localhost() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}
