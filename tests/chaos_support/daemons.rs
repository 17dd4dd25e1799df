//! `ferry` daemons as separate processes for the chaos tests: a cluster made
//! by `ferry cluster init`, nodes started with `ferry node run` (optionally
//! inside a network namespace each), killed with SIGKILL and restarted, and
//! reached through their HTTP API.
//!
//! Also the observer: a probe that holds a certificate from the cluster's CA
//! and asks each node directly, over the transport, to append to a VM's
//! service. A node answers only for a VM it runs (owner, not paused), so the
//! probe sees where a VM really runs — not where the store says it runs —
//! and, being a client, checks the acknowledged sequence: two running copies
//! or a lost append both show as a sequence number that does not grow.

use ferry::client::Client;
use ferry::config::NodeConfig;
use ferry::views::{MigrationView, StatusView, VmView};
use ferry_actors::migration::protocol::{Reply, Request, SERVICE};
use ferry_transport::{ClusterCa, NetworkConfig, RpcNode};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `ferry` binary the tests built; `None` in an example, which then runs
/// itself as `ferry` (see [`ferry_command`]).
pub const FERRY_BIN: Option<&str> = option_env!("CARGO_BIN_EXE_ferry");

/// The `ferry` program: the built binary in a test; in an example (cargo
/// does not build the binary for one) the example itself, which with
/// `FERRY_EXAMPLE_AS_FERRY=1` is exactly the `ferry` command line.
pub fn ferry_program() -> (PathBuf, Vec<(&'static str, &'static str)>) {
    match FERRY_BIN {
        Some(bin) => (PathBuf::from(bin), Vec::new()),
        None => (
            std::env::current_exe().expect("the path of this program"),
            vec![("FERRY_EXAMPLE_AS_FERRY", "1")],
        ),
    }
}

/// A `Command` running [`ferry_program`].
pub fn ferry_command() -> Command {
    let (program, env) = ferry_program();
    let mut c = Command::new(program);
    c.envs(env);
    c
}

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

/// A base port such that `n` consecutive TCP ports on 127.0.0.1 are free now.
pub fn free_ports(n: u16, salt: u16) -> u16 {
    let mut base = 21_000 + ((std::process::id() as u16).wrapping_mul(7) ^ salt) % 18_000;
    loop {
        let free = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
        base = 21_000 + (base - 21_000 + n + 13) % 18_000;
    }
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it opens
/// live there), and returns its result; a panic in `f` is passed on.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("network namespace {ns}: {e}"));
    std::thread::scope(|s| {
        let joined = s
            .spawn(move || {
                // SAFETY: `setns` only reads the descriptor, which `file` owns
                // and keeps open across the call; it moves this thread alone
                // (a scoped thread that ends when `f` returns) into the
                // namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({ns}): {}", std::io::Error::last_os_error());
                f()
            })
            .join();
        match joined {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Polls `f` every 5 ms until it returns `Some`, at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `ferry node run` processes of one cluster, killed on drop.
pub struct Daemons {
    pub dir: PathBuf,
    pub configs: Vec<PathBuf>,
    pub loaded: Vec<NodeConfig>,
    /// Network namespace of each node (`None`: this one).
    pub netns: Vec<Option<String>>,
    children: Vec<Option<Child>>,
    spawned: Vec<u32>,
    /// Nodes stopped with SIGSTOP: their API would not answer.
    stopped: Vec<bool>,
}

impl Daemons {
    /// `ferry cluster init` of `nodes` nodes on `networks` (name, subnet).
    pub fn init(
        dir: &Path,
        nodes: u64,
        networks: &[(&str, &str)],
        port: u16,
        api_port: u16,
        netns: Vec<Option<String>>,
    ) -> Daemons {
        let mut cmd = ferry_command();
        cmd.args(["cluster", "init", "--nodes", &nodes.to_string(), "--dir"])
            .arg(dir)
            .args(["--port", &port.to_string()])
            .args(["--api-port", &api_port.to_string()])
            .args(["--memory-mib", "8192"]);
        for (name, subnet) in networks {
            cmd.args(["--network", &format!("{name}={subnet}")]);
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "ferry cluster init: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let configs: Vec<PathBuf> = (1..=nodes)
            .map(|i| dir.join(format!("node-{i}")).join("node.toml"))
            .collect();
        let loaded = configs
            .iter()
            .map(|c| NodeConfig::load(c).unwrap())
            .collect();
        Daemons {
            dir: dir.to_path_buf(),
            configs,
            loaded,
            netns,
            children: (0..nodes).map(|_| None).collect(),
            spawned: vec![0; nodes as usize],
            stopped: vec![false; nodes as usize],
        }
    }

    pub fn nodes(&self) -> usize {
        self.configs.len()
    }

    /// Starts node `i` (0-based) with `ferry node run`; its output goes to
    /// `node-<i+1>.log`, appended across restarts.
    pub fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{}.log", i + 1)))
            .unwrap();
        let mut cmd = match &self.netns[i] {
            Some(ns) => {
                let (program, env) = ferry_program();
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program).envs(env);
                c
            }
            None => ferry_command(),
        };
        let child = cmd
            .args(["node", "run", "--config"])
            .arg(&self.configs[i])
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
        self.spawned[i] += 1;
    }

    /// SIGKILL: no goodbye, no flush. Waits until the process is gone.
    pub fn sigkill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, SIGTERM …) to node `i`'s process.
    pub fn signal(&mut self, i: usize, signal: i32) {
        match signal {
            libc::SIGSTOP => self.stopped[i] = true,
            libc::SIGCONT => self.stopped[i] = false,
            _ => {}
        }
        let child = self.children[i].as_ref().expect("node is running");
        // SAFETY: `kill` only sends a signal to the pid of a child this
        // struct spawned and has not reaped, so the pid is still ours.
        let rc = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// SIGTERM, then waits for the process to exit by itself (a graceful
    /// shutdown), at most `timeout`. Returns its exit status.
    pub fn sigterm_and_wait(&mut self, i: usize, timeout: Duration) -> std::process::ExitStatus {
        self.signal(i, libc::SIGTERM);
        let mut child = self.children[i].take().expect("node is running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {} did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    i + 1,
                    self.log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{}.log", i + 1))).unwrap_or_default()
    }

    /// Runs `f` with node `i`'s API client, from inside its namespace.
    pub fn api<T: Send>(&self, i: usize, f: impl FnOnce(&Client) -> T + Send) -> T {
        let c = &self.loaded[i];
        let mut client = Client::for_node(c).expect("an API client from the node configuration");
        client.timeout = Duration::from_secs(10);
        match &self.netns[i] {
            Some(ns) => in_netns(ns, || f(&client)),
            None => f(&client),
        }
    }

    /// Waits until node `i` answers and the cluster has every node as a voter.
    pub fn wait_ready(&self, i: usize, timeout: Duration) {
        let n = self.nodes();
        wait_for(&format!("node {} ready", i + 1), timeout, || {
            let s: StatusView = self.api(i, |c| c.get("/api/status").ok())?;
            (s.voters.len() == n && s.nodes == n && s.leader.is_some()).then_some(())
        });
    }

    /// The first live node's answer to `GET path`.
    pub fn get<T: serde::de::DeserializeOwned + Send>(&self, path: &str) -> Option<T> {
        (0..self.nodes())
            .filter(|&i| self.is_running(i) && !self.stopped[i])
            .find_map(|i| self.api(i, |c| c.get::<T>(path).ok()))
    }

    pub fn migration(&self, id: u64) -> Option<MigrationView> {
        self.get(&format!("/api/migrations/{id}"))
    }

    pub fn vm(&self, name: &str) -> Option<VmView> {
        self.get(&format!("/api/vms/{name}"))
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.sigkill(i);
        }
    }
}

/// What the observer saw of one VM.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Acknowledged sequence numbers, in the order they came, with the node.
    pub acks: Vec<(u64, u64)>,
    /// The highest acknowledged sequence of the current life of the VM.
    pub last: Option<u64>,
    /// Nodes that accepted an append, with the time of the last one.
    pub last_on: BTreeMap<u64, Instant>,
    pub violations: Vec<String>,
}

/// The observer: a probe with its own certificate from the cluster's CA.
pub struct Observer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<String, Seen>>>,
    /// Nodes the probe skips (known dead).
    down: Arc<Mutex<BTreeSet<u64>>>,
    vms: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The node id the observer's certificate names: no cluster member has it.
pub const OBSERVER_ID: u64 = 250;

impl Observer {
    /// Starts probing every node of `daemons` (its addresses from the node
    /// configurations; `listen` is where the observer's own endpoints go, one
    /// per network, inside `netns` if given).
    pub fn start(daemons: &Daemons, listen: Vec<SocketAddr>, netns: Option<String>) -> Observer {
        let ca = ClusterCa::from_pem(
            &std::fs::read_to_string(daemons.dir.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(daemons.dir.join("ca.key")).unwrap(),
        )
        .unwrap();
        let creds = ca.issue(OBSERVER_ID).unwrap();
        let peers: Vec<(u64, Vec<SocketAddr>)> = daemons
            .loaded
            .iter()
            .map(|c| (c.node_id, c.networks.iter().map(|n| n.address).collect()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<BTreeMap<String, Seen>>> = Arc::default();
        let down: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
        let vms: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, se, d, v) = (stop.clone(), seen.clone(), down.clone(), vms.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let body = move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let config = NetworkConfig {
                        connect_timeout: Duration::from_millis(300),
                        ..NetworkConfig::default()
                    };
                    let rpc = RpcNode::start(creds, listen, config).await.unwrap();
                    ready_tx.send(()).unwrap();
                    let mut n = 0u64;
                    while !s.load(Ordering::Acquire) {
                        let names = v.lock().unwrap().clone();
                        for vm in &names {
                            for (id, addrs) in &peers {
                                if d.lock().unwrap().contains(id) {
                                    continue;
                                }
                                n += 1;
                                let request = ferry_transport::encode(&Request::Append {
                                    vm: vm.clone(),
                                    record: format!("probe-{n}").into_bytes(),
                                });
                                let answer = rpc
                                    .call(*id, addrs, SERVICE, request, Duration::from_millis(300))
                                    .await;
                                let Ok(bytes) = answer else { continue };
                                if let Ok(Reply::Appended { seq }) =
                                    ferry_transport::decode::<Reply>(&bytes)
                                {
                                    let mut all = se.lock().unwrap();
                                    let seen = all.entry(vm.clone()).or_default();
                                    if let Some(last) = seen.last {
                                        if seq <= last {
                                            seen.violations.push(format!(
                                                "vm {vm}: node {id} acknowledged seq {seq} after seq {last} was acknowledged: two running copies or a lost append"
                                            ));
                                        }
                                    }
                                    let now = Instant::now();
                                    seen.last = Some(seen.last.map_or(seq, |l| l.max(seq)));
                                    seen.last_on.insert(*id, now);
                                    seen.acks.push((*id, seq));
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    rpc.shutdown().await;
                });
            };
            match netns {
                Some(ns) => in_netns(&ns, body),
                None => body(),
            }
        });
        ready.recv_timeout(Duration::from_secs(30)).unwrap();
        Observer {
            stop,
            seen,
            down,
            vms,
            thread: Some(thread),
        }
    }

    pub fn watch(&self, vm: &str) {
        self.vms.lock().unwrap().push(vm.to_string());
    }

    pub fn unwatch(&self, vm: &str) {
        self.vms.lock().unwrap().retain(|v| v != vm);
    }

    pub fn node_down(&self, node: u64, down: bool) {
        let mut d = self.down.lock().unwrap();
        if down {
            d.insert(node);
        } else {
            d.remove(&node);
        }
    }

    /// The VM restarts from boot: its service starts a new sequence.
    pub fn new_life(&self, vm: &str) {
        let mut all = self.seen.lock().unwrap();
        let seen = all.entry(vm.to_string()).or_default();
        seen.last = None;
        seen.last_on.clear();
    }

    /// Forgets what was seen of `vm` so far (a new phase of a test).
    pub fn forget(&self, vm: &str) {
        self.seen.lock().unwrap().remove(vm);
    }

    pub fn seen(&self, vm: &str) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .get(vm)
            .cloned()
            .unwrap_or_default()
    }

    /// The nodes that took an append for `vm` within the last `window`.
    pub fn running_on(&self, vm: &str, window: Duration) -> Vec<u64> {
        self.seen(vm)
            .last_on
            .iter()
            .filter(|(_, at)| at.elapsed() < window)
            .map(|(n, _)| *n)
            .collect()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Like [`wait_for`], but `None` at the deadline rather than a panic: a chaos
/// checker records the miss as a violation and goes on to report the rest.
pub fn try_wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Daemons {
    /// Whether node `i` (0-based) is stopped with SIGSTOP now.
    pub fn is_stopped(&self, i: usize) -> bool {
        self.stopped[i]
    }

    /// `GET path` answered by node `i` itself, from its own replica (which
    /// may lag: a node continued after SIGSTOP, or just restarted, answers
    /// from what it had). `None` if it does not answer.
    pub fn get_from<T: serde::de::DeserializeOwned + Send>(
        &self,
        i: usize,
        path: &str,
    ) -> Option<T> {
        if !self.is_running(i) || self.stopped[i] {
            return None;
        }
        self.api(i, |c| c.get::<T>(path).ok())
    }

    /// The last `lines` lines of node `i`'s log (for a failure report).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = self.log(i);
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
