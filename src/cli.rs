//! The `ferry` command line: the daemon (`ferry node run`), cluster setup
//! (`ferry cluster init`), and the commands that talk to a node's HTTP API.
//!
//! Every API command prints a table (or `--json`), and exits with a code a
//! script can rely on (see [`ExitCode`]). Moves and drains follow their
//! progress with a bar until they end, unless `--no-wait`.

use crate::client::{Client, ClientError};
use crate::config::{InitOptions, NodeConfig};
use crate::error::ApiError;
use crate::events::Event;
use crate::node::AppendView;
use crate::requests;
use crate::views::*;
use clap::{Args, Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the operation ran and failed (a move aborted, a drain left VMs behind) or an internal error
  2  usage error (bad arguments)
  3  not found: no such VM, node, network, migration or tip
  4  refused: the cluster said no (a conflict, or an invalid value)
  5  unreachable: the node could not be reached, or the cluster has no leader
  6  unauthorized: the API token is missing or wrong

Connecting: commands talk to one node's API, found from --api/--token, or
FERRY_API/FERRY_TOKEN, or the node configuration given with --config or
FERRY_CONFIG (its api.listen and api.token).";

const MAIN_EXAMPLES: &str = "\
Examples:
  ferry cluster init --nodes 3 --dir ./cluster
  ferry node run --config ./cluster/node-1/node.toml &
  export FERRY_CONFIG=./cluster/node-1/node.toml
  ferry status
  ferry vm create web-1 --node node-1 --memory-mib 256 --dirty-pages-per-sec 5000
  ferry vm move web-1 --to node-2
  ferry node pause node-1 --drain
  ferry migrations watch
  ferry vm list --json";

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of running VMs between cluster nodes",
    after_help = format!("{MAIN_EXAMPLES}\n\n{EXIT_CODES}")
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach a node's API.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// API address of the node to talk to: host:port or https://host:port
    /// (HTTPS, the default), http://host:port for an API with api.tls = false.
    #[arg(long, global = true, env = "FERRY_API")]
    pub api: Option<String>,
    /// The cluster CA certificate (the cluster directory's ca.pem) to trust
    /// for an HTTPS API; --config gives its api.ca.
    #[arg(long, global = true, env = "FERRY_CA")]
    pub ca: Option<PathBuf>,
    /// API token.
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A node configuration to take the API address and token from.
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of tables and progress bars.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Set up a cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Run or stop a node daemon, add or remove a node, list nodes, pause
    /// (maintenance, drain), resume them, declare one down.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Create, start, stop and move VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Networks and their use for live migration.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Migrations: history, live progress, and aborting a stuck one.
    #[command(subcommand, alias = "migration")]
    Migrations(MigrationsCmd),
    /// Policy tips (move this VM there, because…): list, accept, dismiss.
    Tips {
        #[command(subcommand)]
        command: Option<TipsCmd>,
    },
    /// Cluster settings: downtime limit, migrations per node, tip mode,
    /// failure detection.
    #[command(subcommand)]
    Settings(SettingsCmd),
    /// The cluster at a glance, as the node sees it.
    #[command(after_help = "\
With --wait, waits until the node answers, the cluster has a leader and every
node of the configuration (or, with --api alone, every node the cluster
knows) is a voting member and up, then prints the status; exit 1 if that does
not happen within --timeout-s. Right after starting daemons:
  ferry status --wait && ferry vm create web-1")]
    Status {
        /// Wait until every node has joined and is up.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 60, requires = "wait")]
        timeout_s: u64,
    },
    /// Copy a running simulated guest live into a second one in this process
    /// and print what was measured (no cluster, no network).
    #[command(after_help = "Example: ferry demo --memory-mib 512 --dirty-pages-per-sec 20000")]
    Demo {
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// vCPU threads running the workload.
        #[arg(long, default_value_t = 2)]
        vcpus: u32,
        /// Page writes per second by the workload.
        #[arg(long, default_value_t = 20_000)]
        dirty_pages_per_sec: u64,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Write a cluster CA, node certificates and ready-to-run node
    /// configurations for a cluster on this machine.
    #[command(after_help = "\
Node i gets address 127.K.0.i on network K (all loopback: no root needed), the
same transport port on each, and its API on 127.0.0.1:(api-port + i - 1).
Node 1 forms the cluster on its first start; the others join it.

Example:
  ferry cluster init --nodes 3 --dir ./cluster
  ferry cluster init --nodes 3 --dir ./c2 --network mig-1=127.11.0.0/16 --network mig-2=127.12.0.0/16 --api-port 7801")]
    Init {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long)]
        dir: PathBuf,
        /// `name=address/prefix`; repeat for each network (default: mig-1 and mig-2 on 127.1/16 and 127.2/16).
        #[arg(long = "network")]
        networks: Vec<String>,
        /// Transport port (every network address).
        #[arg(long, default_value_t = 7400)]
        port: u16,
        /// API port of node 1.
        #[arg(long, default_value_t = 7701)]
        api_port: u16,
        /// Memory each node offers to guests.
        #[arg(long, default_value_t = 16 * 1024)]
        memory_mib: u64,
        #[arg(long, default_value_t = 32)]
        max_vms: u32,
        #[arg(long, default_value = "ferry")]
        name: String,
    },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Run a node daemon until SIGTERM or Ctrl-C.
    #[command(after_help = "\
The data directory is locked: a second daemon on it refuses to start. A node
restarted on its data directory resumes its cluster state. On SIGTERM (or
`ferry node stop`) the node first moves its VMs away live where the cluster can
take them, stops the rest (the cluster restarts them elsewhere), tells the
cluster it left, writes <data_dir>/shutdown-report.json and exits 0.

Example: ferry node run --config ./cluster/node-1/node.toml")]
    /// (The node's configuration is the global `--config PATH`.)
    Run,
    /// Stop the daemon of the node named by --config, gracefully, and print
    /// what it did with its VMs.
    #[command(after_help = "\
Sends SIGTERM to the daemon whose pid is in <data_dir>/ferry.lock and waits (up
to 150 s) for it to exit: it moves its VMs away live where the cluster can take
them, stops the rest (the cluster restarts them elsewhere) and tells the cluster
it left. Then prints its report, <data_dir>/shutdown-report.json (--json: the
report itself). Run it on the node's machine.

Exit codes: 0 stopped, with a report; 1 not running, no report, or still running
after 150 s; 4 the process is not yours to signal.

Example: ferry node stop --config ./cluster/node-2/node.toml")]
    Stop,
    /// Add a node to a running cluster: its certificate from the cluster CA
    /// and its configuration.
    #[command(after_help = "\
Signs the new node's certificate with the cluster CA's key, which `ferry cluster
init` left in the cluster directory (<dir>/ca.key, beside the node-N
directories): run this where that file is — on the machine of the first node
for a cluster made with `cluster init` — or name the directory with
--cluster-dir (default: the directory above FERRY_CONFIG's node directory).
Writes <cluster dir>/<name>/node.pem and node.toml: the node's address on
every network of FERRY_CONFIG's node (the subnet's base plus its id, same
port), the same API token, that node and its peers as the peers to join
through. Asks the cluster (FERRY_CONFIG's node) which names and ids are taken.

Then start it; it joins as a learner, catches up with the store, and becomes a
voter (`ferry status --wait` with its configuration returns once it has: that
configuration names every node, itself included):
  ferry node add node-4
  ferry node run --config ./cluster/node-4/node.toml &
  ferry status --wait --config ./cluster/node-4/node.toml
  ferry vm move web-1 --to node-4

The certificate is valid for --valid-days (365); renew it before then with
`ferry node renew-cert`.

Exit codes: 0 written; 2 invalid name; 4 name or id taken; 1 the CA key
cannot be read (nothing written); 5 the cluster cannot be reached.")]
    Add {
        name: String,
        /// The node's id (default: one more than any id the cluster and the
        /// cluster directory know).
        #[arg(long)]
        id: Option<u64>,
        /// Where ca.pem and ca.key are.
        #[arg(long)]
        cluster_dir: Option<PathBuf>,
        /// Memory offered to VMs (default: as FERRY_CONFIG's node).
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Most VMs (default: as FERRY_CONFIG's node).
        #[arg(long)]
        max_vms: Option<u32>,
        /// How long the certificate is valid.
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
        /// How long the certificate is valid, in seconds (tests; overrides
        /// --valid-days).
        #[arg(long, hide = true)]
        valid_secs: Option<u64>,
    },
    /// Remove a node from the cluster for good and revoke its certificate.
    #[command(after_help = "\
Refused while the node owns VMs or takes part in a migration (exit 4, naming
them): move them away first with `ferry node pause <node> --drain`. Then the
cluster store forgets the node and puts it on its revocation list, and the node
leaves the Raft membership: every node refuses its certificates (issued up to
now) in the TLS handshake and closes its connections. Stop its daemon
afterwards; to bring the machine back, `ferry node add` it again (a new
certificate). Ask another node than the one removed (FERRY_CONFIG/--api).

Example: ferry node remove node-4")]
    Remove { node: String },
    /// Issue a node's next certificate from the cluster CA (before the
    /// current one expires).
    #[command(after_help = "\
Writes <cluster dir>/<node>/node.pem anew (the old one is kept as
node.pem.old), and the API's certificate (api.pem) where the node serves its API
over HTTPS, both signed with the cluster CA's key (<cluster dir>/ca.key: run this
where that file is). The daemon reads its certificates at start: restart it to
use the new one (`ferry node stop --config …` moves its VMs away first, then
`ferry node run --config …`). A daemon refuses to start on an expired
certificate, and warns 30 days before.

Example: ferry node renew-cert node-2")]
    RenewCert {
        node: String,
        #[arg(long)]
        cluster_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
    },
    /// List the nodes.
    List,
    /// Show one node.
    Show { node: String },
    /// Put a node in maintenance mode; with --drain move its VMs off first.
    #[command(after_help = "\
Examples:
  ferry node pause node-1 --drain
  ferry node pause node-1 --drain --downtime-limit-ms 50
With --drain the command follows the drain and exits 1 if VMs were left behind,
naming each with the reason.")]
    Pause {
        node: String,
        #[arg(long)]
        drain: bool,
        /// The longest blackout each move of the drain may impose, in place
        /// of the cluster's downtime limit.
        #[arg(long, requires = "drain")]
        downtime_limit_ms: Option<u32>,
        /// Return once the node is paused, without following the drain.
        #[arg(long)]
        no_wait: bool,
    },
    /// Take a node out of maintenance mode.
    #[command(
        after_help = "Examples:\n  ferry node resume node-1\n  ferry node resume node-1 --failback   (bring back the VMs its drain moved away)"
    )]
    Resume {
        node: String,
        /// Move back the VMs the node's drain moved away.
        #[arg(long)]
        failback: bool,
    },
    /// Declare a node down, so the cluster restarts its VMs elsewhere.
    #[command(after_help = "\
The fencing guarantee: without --confirmed-dead the cluster declares the node
down only once it has heard no lease renewal from it for the failure-detection
timeout (`ferry settings`), so the node has already stopped its guests (its
lease ended). A node that is alive is refused (exit 4, node_alive) and nothing
changes: stop it first (`ferry node stop`, or kill its process).

With --confirmed-dead you vouch that the node can run nothing (powered off, its
process killed) and it is declared down at once. If that is wrong, its VMs may
briefly run twice.

Examples:
  ferry node mark-down node-3 --reason \"rack 4 lost power\"
  ferry node mark-down node-3 --confirmed-dead --reason \"powered off at the PDU\"")]
    MarkDown {
        node: String,
        /// Why (shown as the node's down reason; at most 200 characters).
        #[arg(long)]
        reason: Option<String>,
        /// The node can run nothing (powered off, process killed): declare
        /// it down now, without waiting for its lease to run out.
        #[arg(long)]
        confirmed_dead: bool,
    },
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// List the VMs and where they run.
    List,
    /// Show one VM.
    Show { vm: String },
    /// Define a VM (simulated; KVM with --backend kvm; a QEMU process running
    /// Linux with --backend qemu) and start it.
    #[command(
        after_help = "Example: ferry vm create web-1 --node node-1 --memory-mib 256 --dirty-pages-per-sec 5000"
    )]
    Create {
        name: String,
        /// Node to run it on (default: the node you talk to).
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value_t = 64)]
        memory_mib: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Page writes per second of the guest's workload.
        #[arg(long, default_value_t = 0)]
        dirty_pages_per_sec: u64,
        /// uniform, hot_set or sequential.
        #[arg(long)]
        pattern: Option<String>,
        /// shared (cluster-shared volume) or local (the disk moves with the VM).
        #[arg(long)]
        storage: Option<String>,
        /// sim (simulated guest), kvm (a real KVM guest; needs usable /dev/kvm) or
        /// qemu (a QEMU process running Linux; needs qemu-system-x86_64, a kernel
        /// and busybox: see README).
        #[arg(long)]
        backend: Option<String>,
        /// Start with the cluster's common CPU baseline.
        #[arg(long)]
        processor_compatibility: bool,
        /// Define it only.
        #[arg(long)]
        no_start: bool,
        /// When its node dies, leave it down (needs_restart) instead of
        /// restarting it on another node.
        #[arg(long)]
        no_restart: bool,
        /// Failover order, 0 to 1000: higher restarts first when a dead
        /// node's VMs compete for room.
        #[arg(long, default_value_t = 0)]
        priority: u32,
    },
    /// Start a VM that is off.
    Start {
        vm: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Stop a VM.
    Stop { vm: String },
    /// Delete a VM that is off.
    Delete { vm: String },
    /// Change a VM's settings (while it is off).
    #[command(after_help = "\
Example (processor-compatibility mode, for a move between CPU families):
  ferry vm stop web-1 && ferry vm set web-1 --processor-compatibility on && ferry vm start web-1")]
    Set {
        vm: String,
        /// on or off.
        #[arg(long, value_parser = ["on", "off"])]
        processor_compatibility: Option<String>,
    },
    /// Move a running VM live to another node.
    #[command(after_help = "\
Examples:
  ferry vm move web-1 --to node-2
  ferry vm move web-1              (placement picks the target)
  ferry vm move web-1 --to node-3 --json --no-wait
  ferry vm move web-1 --to node-2 --downtime-limit-ms 50
Shows the estimate, then a progress bar per copy round; exits 0 when the VM runs
on the target, 1 if the move aborted (the VM runs on the source).")]
    Move {
        vm: String,
        /// Target node (default: the one with the fewest VMs that can take it).
        #[arg(long)]
        to: Option<String>,
        /// Compare memory digests of source and target in the blackout.
        #[arg(long)]
        verify: bool,
        /// The longest blackout this move may impose, in place of the
        /// cluster's downtime limit (`ferry settings`).
        #[arg(long)]
        downtime_limit_ms: Option<u32>,
        /// Return once the migration is recorded.
        #[arg(long)]
        no_wait: bool,
    },
    /// Cancel the move of a VM under way (asks its source to stop; for a
    /// move stuck behind a dead source see `ferry migrations abort`).
    Cancel { vm: String },
    /// How long a move would take, and how long the VM would be paused:
    /// measured on the node that runs it (the dirty rate sampled from the
    /// guest's dirty log, the bandwidth from a recent move or a probe to the
    /// target), printed with what each figure rests on.
    Estimate {
        vm: String,
        /// The node the move would go to (by default, where `vm move`
        /// without `--to` would send it).
        #[arg(long)]
        to: Option<String>,
    },
    /// Append a record to the VM's service, as a client would.
    Append { vm: String, record: String },
}

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// List the networks, their roles and migration order.
    List,
    /// Allow or forbid live migration on a network, or set its gateway.
    #[command(after_help = "\
Examples:
  ferry network set mig-2 --migration forbid
  ferry network set public --gateway 10.0.0.1 --migration allow
A change that would leave no network for live migration is refused (exit 4).")]
    Set {
        name: String,
        /// default, allow or forbid.
        #[arg(long)]
        migration: Option<String>,
        #[arg(long, conflicts_with = "no_gateway")]
        gateway: Option<String>,
        #[arg(long)]
        no_gateway: bool,
    },
    /// Put networks first in the migration order.
    #[command(after_help = "Example: ferry network order mig-2 mig-1")]
    Order { names: Vec<String> },
}

#[derive(Subcommand)]
pub enum MigrationsCmd {
    /// Recent migrations, newest first.
    List,
    /// One migration with its rounds.
    Show { id: u64 },
    /// Follow migrations live, one progress line (or bar) per migration.
    #[command(after_help = "\
Examples:
  ferry migrations watch
  ferry migrations watch --json --count 1     (one JSON line per event; stop after one migration ends)")]
    Watch {
        /// Only this migration.
        #[arg(long)]
        migration: Option<u64>,
        /// Stop after this many migrations ended.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Abort a migration by recording the abort in the cluster store.
    #[command(after_help = "\
`ferry vm cancel VM` asks the move's source to stop the move: the usual way.
`abort` records the abort in the store directly, without the source or the
target, for a move stuck behind a dead source. It is safe at any point: the
store orders it against the switchover, and exactly one of them wins. A
migration that already ended is refused (exit 4).

Example: ferry migrations abort 17")]
    Abort { id: u64 },
}

#[derive(Subcommand)]
pub enum TipsCmd {
    List,
    /// Accept a pending tip: the policy moves the VM.
    Accept {
        id: u64,
    },
    /// Dismiss a pending tip.
    Dismiss {
        id: u64,
    },
}

#[derive(Subcommand)]
pub enum SettingsCmd {
    Show,
    /// Change settings.
    #[command(after_help = "\
Examples:
  ferry settings set --downtime-limit-ms 200 --pro-tip-mode automatic
  ferry settings set --failure-detection-ms 5000")]
    Set {
        #[arg(long)]
        downtime_limit_ms: Option<u32>,
        #[arg(long)]
        max_migrations_per_node: Option<u32>,
        /// off, manual or automatic.
        #[arg(long)]
        pro_tip_mode: Option<String>,
        /// How long a silent node has before the cluster declares it down
        /// and restarts its VMs elsewhere (1000 to 60000 ms).
        #[arg(long)]
        failure_detection_ms: Option<u32>,
    },
}

/// What a command's failure means to a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    NotFound = 3,
    Refused = 4,
    Unreachable = 5,
    Unauthorized = 6,
}

impl ExitCode {
    pub fn of_api(e: &ApiError) -> ExitCode {
        match e.status {
            401 | 403 => ExitCode::Unauthorized,
            404 => ExitCode::NotFound,
            400 | 405 | 409 | 413 | 422 => ExitCode::Refused,
            502..=504 => ExitCode::Unreachable,
            _ => ExitCode::Failed,
        }
    }
}

/// A command's failure: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    pub code: ExitCode,
    pub error: ApiError,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api(error) => Failure {
                code: ExitCode::of_api(&error),
                error,
            },
            ClientError::Io { .. } => Failure {
                code: ExitCode::Unreachable,
                error: ApiError::unavailable("node_unreachable", e.to_string()),
            },
            ClientError::Protocol { .. } => Failure {
                code: ExitCode::Failed,
                error: ApiError::internal(e.to_string()),
            },
            ClientError::Tls { .. } => Failure {
                code: ExitCode::Unreachable,
                error: ApiError::unavailable("tls_failed", e.to_string()),
            },
            ClientError::Setup(_) => usage(e.to_string()),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure {
            code: ExitCode::Failed,
            error: ApiError::internal(format!("{e:#}")),
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: ExitCode::Usage,
        error: ApiError::bad_request("usage", message),
    }
}

type Outcome = Result<ExitCode, Failure>;

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> std::process::ExitCode {
    let json = cli.conn.json;
    let result = dispatch(cli);
    let code = match result {
        Ok(code) => code,
        Err(f) => {
            if json {
                println!("{}", f.error.body());
            }
            eprintln!("error: {} [{}]", f.error.message, f.error.code);
            f.code
        }
    };
    std::process::ExitCode::from(code as u8)
}

fn client(conn: &Conn) -> Result<Client, Failure> {
    let config = match &conn.config {
        Some(path) => Some(NodeConfig::load(path)?),
        None => None,
    };
    let setup = |e: ClientError| usage(e.to_string());
    match (&conn.api, config) {
        (None, Some(config)) => match &conn.token {
            Some(t) => Client::for_node_with(&config, Some(t.clone())),
            None => Client::for_node(&config),
        }
        .map_err(setup),
        (Some(api), config) => {
            let token = conn
                .token
                .clone()
                .or_else(|| config.as_ref().map(|c| c.api.token.clone()));
            if api.starts_with("http://") {
                return Ok(Client::new(api, token));
            }
            let ca = conn
                .ca
                .clone()
                .or_else(|| config.and_then(|c| c.api.ca))
                .ok_or_else(|| {
                    usage(format!(
                        "{api} is reached over HTTPS: give the cluster CA with --ca <cluster \
                         dir>/ca.pem (or FERRY_CA, or --config), or http:// for an API with \
                         api.tls = false"
                    ))
                })?;
            let pem = std::fs::read_to_string(&ca)
                .map_err(|e| usage(format!("reading the cluster CA {}: {e}", ca.display())))?;
            Client::https(api, token, &pem).map_err(setup)
        }
        (None, None) => Err(usage(
            "no node to talk to: give --api, --config, FERRY_API or FERRY_CONFIG",
        )),
    }
}

fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: {e}"),
    }
}

/// Prints rows under headers, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn mib(bytes: u64) -> String {
    format!("{}", bytes >> 20)
}

fn dispatch(cli: Cli) -> Outcome {
    let conn = cli.conn;
    match cli.command {
        Command::Demo {
            memory_mib,
            vcpus,
            dirty_pages_per_sec,
        } => {
            if memory_mib < 8 {
                return Err(usage("--memory-mib must be at least 8"));
            }
            let outcome = crate::demo::run(&crate::demo::DemoConfig {
                memory_mib,
                vcpus,
                dirty_pages_per_sec,
            })?;
            println!("{outcome}");
            Ok(ExitCode::Ok)
        }
        Command::Cluster(ClusterCmd::Init {
            nodes,
            dir,
            networks,
            port,
            api_port,
            memory_mib,
            max_vms,
            name,
        }) => {
            let mut opts = InitOptions::local(dir, nodes);
            opts.port = port;
            opts.api_port = api_port;
            opts.memory_mib = memory_mib;
            opts.max_vms = max_vms;
            opts.cluster_name = name;
            if !networks.is_empty() {
                opts.networks = networks
                    .iter()
                    .map(|n| {
                        let (name, subnet) = n.split_once('=').ok_or_else(|| {
                            usage(format!("--network {n:?}: expected name=address/prefix"))
                        })?;
                        let subnet = subnet
                            .parse()
                            .map_err(|e| usage(format!("--network {n:?}: {e}")))?;
                        Ok((name.to_string(), subnet))
                    })
                    .collect::<Result<_, Failure>>()?;
            }
            let paths = crate::config::init_cluster(&opts)?;
            if conn.json {
                print_json(&paths);
            } else {
                for p in &paths {
                    println!("wrote {}", p.display());
                }
                if let Some(first) = paths.first() {
                    println!("\nstart each node:  ferry node run --config <path>");
                    println!("then talk to one: export FERRY_CONFIG={}", first.display());
                }
            }
            Ok(ExitCode::Ok)
        }
        Command::Node(NodeCmd::Run) => {
            let path = conn
                .config
                .ok_or_else(|| usage("ferry node run needs --config PATH (or FERRY_CONFIG)"))?;
            crate::daemon::run(&path)?;
            Ok(ExitCode::Ok)
        }
        Command::Node(NodeCmd::Stop) => {
            let path = conn
                .config
                .ok_or_else(|| usage("ferry node stop needs --config PATH (or FERRY_CONFIG)"))?;
            node_stop(&path, conn.json)
        }
        Command::Node(NodeCmd::Add {
            name,
            id,
            cluster_dir,
            memory_mib,
            max_vms,
            valid_days,
            valid_secs,
        }) => {
            let valid_for =
                Duration::from_secs(valid_secs.unwrap_or(u64::from(valid_days) * 86_400));
            node_add(
                &conn,
                crate::enroll::AddNode {
                    name,
                    id,
                    cluster_dir: PathBuf::new(),
                    reference: reference_config(&conn)?,
                    members: Vec::new(),
                    memory_mib,
                    max_vms,
                    valid_for,
                },
                cluster_dir,
            )
        }
        Command::Node(NodeCmd::RenewCert {
            node,
            cluster_dir,
            valid_days,
        }) => {
            let dir = match cluster_dir {
                Some(d) => d,
                None => crate::enroll::cluster_dir_of(&reference_path(&conn)?),
            };
            let config = dir.join(&node).join("node.toml");
            let (creds, v) = crate::enroll::renew_cert(
                &dir,
                &config,
                Duration::from_secs(u64::from(valid_days) * 86_400),
            )?;
            if conn.json {
                print_json(&serde_json::json!({
                    "node": creds.node_id,
                    "not_before_s": v.not_before_s,
                    "not_after_s": v.not_after_s,
                }));
            } else {
                println!(
                    "renewed the certificate of {node} (id {}): valid until Unix time {}",
                    creds.node_id, v.not_after_s
                );
                println!("restart its daemon to use it: ferry node stop --config {0}; ferry node run --config {0}", config.display());
            }
            Ok(ExitCode::Ok)
        }
        Command::Node(cmd) => node_cmd(&client(&conn)?, conn.json, cmd),
        Command::Vm(cmd) => vm_cmd(&client(&conn)?, conn.json, cmd),
        Command::Network(cmd) => network_cmd(&client(&conn)?, conn.json, cmd),
        Command::Migrations(cmd) => migrations_cmd(&client(&conn)?, conn.json, cmd),
        Command::Tips { command } => {
            tips_cmd(&client(&conn)?, conn.json, command.unwrap_or(TipsCmd::List))
        }
        Command::Settings(cmd) => settings_cmd(&client(&conn)?, conn.json, cmd),
        Command::Status { wait, timeout_s } => {
            let c = client(&conn)?;
            if wait {
                wait_for_members(&c, &conn, Duration::from_secs(timeout_s))?;
            }
            let s: StatusView = c.get("/api/status")?;
            if conn.json {
                print_json(&s);
            } else {
                let nodes: Vec<NodeView> = c.get("/api/nodes")?;
                let leader = s
                    .leader
                    .map(|l| format!("node {l}"))
                    .unwrap_or_else(|| "none".into());
                println!("answering node  {} (id {})", s.name, s.node);
                println!(
                    "raft            leader {leader}, term {}, voters {:?}",
                    s.term, s.voters
                );
                println!("nodes           {} ({} up)", s.nodes, s.nodes_up);
                for n in nodes.iter().filter(|n| n.state == "down") {
                    println!("  {} down    {}", n.name, down_reason(n));
                }
                println!("lease           {}", lease(&s.failover));
                println!("vms             {} ({} running)", s.vms, s.vms_running);
                println!("migrations      {} active", s.active_migrations);
                println!("tips            {} pending", s.pending_tips);
            }
            Ok(ExitCode::Ok)
        }
    }
}

/// `ferry status --wait`: polls the node until the cluster is whole (a
/// leader, every expected node a voter and up). A node that does not answer
/// yet (its daemon still starting) is waited for too.
fn wait_for_members(c: &Client, conn: &Conn, timeout: Duration) -> Result<(), Failure> {
    // The configuration names every node of the cluster (itself and its
    // peers); without one, the cluster's own list is what there is.
    let expected = match &conn.config {
        Some(path) => Some(NodeConfig::load(path)?.peers.len() + 1),
        None => None,
    };
    let deadline = Instant::now() + timeout;
    let mut said = String::new();
    loop {
        let now = match c.get::<StatusView>("/api/status") {
            Ok(s) => {
                let want = expected.unwrap_or(s.nodes).max(1);
                // The answering node's lease too: until it holds one, a VM
                // moved onto it is fenced (a node that just joined).
                if s.leader.is_some()
                    && s.voters.len() >= want
                    && s.nodes >= want
                    && s.nodes_up >= want
                    && s.failover.leased
                {
                    return Ok(());
                }
                format!(
                    "waiting: {} of {want} nodes joined, {} up, leader {}{}",
                    s.voters.len().min(s.nodes),
                    s.nodes_up,
                    s.leader
                        .map_or("none yet".to_string(), |l| format!("node {l}")),
                    if s.failover.leased {
                        ""
                    } else {
                        ", no lease yet on this node"
                    }
                )
            }
            Err(e) => format!("waiting for the node to answer: {e}"),
        };
        if now != said {
            eprintln!("{now}");
            said = now;
        }
        if Instant::now() > deadline {
            return Err(Failure {
                code: ExitCode::Failed,
                error: ApiError::unavailable(
                    "not_ready",
                    format!("the cluster was not whole within {timeout:?} ({said})"),
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_nodes(nodes: &[NodeView]) {
    table(
        &[
            "ID",
            "NAME",
            "STATE",
            "DRAIN",
            "VMS",
            "MEM USED MiB",
            "MIGRATIONS",
            "LEADER",
        ],
        &nodes
            .iter()
            .map(|n| {
                vec![
                    n.id.to_string(),
                    n.name.clone(),
                    n.state.clone(),
                    n.drain.clone(),
                    format!("{}/{}", n.vms, n.max_vms),
                    format!("{}/{}", mib(n.memory_used_bytes), mib(n.memory_bytes)),
                    n.active_migrations.to_string(),
                    if n.leader { "*".into() } else { String::new() },
                ]
            })
            .collect::<Vec<_>>(),
    );
}

/// Why a down node is down, and since when (seconds ago, by this machine's
/// clock).
fn down_reason(n: &NodeView) -> String {
    let reason = n
        .down_reason
        .clone()
        .unwrap_or_else(|| "no reason recorded".into());
    match n.down_since_ms {
        Some(at) => {
            let ago = ferry_actors::node::now_ms().saturating_sub(at) / 1000;
            format!("{reason} ({ago} s ago)")
        }
        None => reason,
    }
}

fn lease(f: &FailoverView) -> String {
    let mut s = if f.leased {
        format!("held, {} ms left", f.lease_left_ms)
    } else {
        "not held (this node's VMs are stopped until the leader renews it)".into()
    };
    if f.lapses > 0 || f.downs > 0 {
        s.push_str(&format!(
            "; lapsed {} times, declared down {} times",
            f.lapses, f.downs
        ));
    }
    s
}

fn print_down_reasons(nodes: &[NodeView]) {
    for n in nodes.iter().filter(|n| n.state == "down") {
        println!("{} is down: {}", n.name, down_reason(n));
    }
}

fn reference_path(conn: &Conn) -> Result<PathBuf, Failure> {
    conn.config.clone().ok_or_else(|| {
        usage("this command needs a running node's configuration: --config PATH or FERRY_CONFIG")
    })
}

fn reference_config(conn: &Conn) -> Result<NodeConfig, Failure> {
    Ok(NodeConfig::load(&reference_path(conn)?)?)
}

/// `ferry node add`: asks the cluster which names and ids are taken, then
/// writes the node's certificate and configuration (`enroll.rs`).
fn node_add(
    conn: &Conn,
    mut opts: crate::enroll::AddNode,
    cluster_dir: Option<PathBuf>,
) -> Outcome {
    opts.cluster_dir = match cluster_dir {
        Some(d) => d,
        None => crate::enroll::cluster_dir_of(&reference_path(conn)?),
    };
    let nodes: Vec<NodeView> = client(conn)?.get("/api/nodes")?;
    opts.members = nodes.iter().map(|n| (n.id, n.name.clone())).collect();
    let path = crate::enroll::add_node(&opts).map_err(|e| {
        let code = match e.downcast_ref::<crate::enroll::AddRefused>() {
            Some(crate::enroll::AddRefused::Taken(_)) => (ExitCode::Refused, "name_taken"),
            Some(crate::enroll::AddRefused::Invalid(_)) => (ExitCode::Usage, "invalid_name"),
            None => (ExitCode::Failed, "not_written"),
        };
        Failure {
            code: code.0,
            error: ApiError::new(400, code.1, format!("{e:#}")),
        }
    })?;
    if conn.json {
        print_json(&serde_json::json!({ "name": opts.name, "config": path }));
    } else {
        println!("wrote {}", path.display());
        println!("start it:  ferry node run --config {}", path.display());
        println!(
            "it joins as a learner, then becomes a voter; this waits until it has:\n  ferry status --wait --config {}",
            path.display()
        );
    }
    Ok(ExitCode::Ok)
}

fn node_cmd(c: &Client, json: bool, cmd: NodeCmd) -> Outcome {
    match cmd {
        NodeCmd::Run => Err(usage("ferry node run needs --config PATH")),
        NodeCmd::Stop => Err(usage("ferry node stop needs --config PATH")),
        NodeCmd::Add { .. } | NodeCmd::RenewCert { .. } => Err(usage(
            "ferry node add and renew-cert run where the cluster CA is",
        )),
        NodeCmd::Remove { node } => {
            let removed: RemovedNodeView = c.post(
                &format!("/api/nodes/{node}/remove"),
                &requests::RemoveNode {
                    confirm: node.clone(),
                },
            )?;
            if json {
                print_json(&removed);
            } else {
                println!(
                    "removed {} (id {}): it left the Raft membership, and every node refuses its certificate",
                    removed.name, removed.id
                );
                println!("stop its daemon now; `ferry node add` brings a machine back with a new certificate");
            }
            Ok(ExitCode::Ok)
        }
        NodeCmd::List => {
            let nodes: Vec<NodeView> = c.get("/api/nodes")?;
            if json {
                print_json(&nodes);
            } else {
                print_nodes(&nodes);
                print_down_reasons(&nodes);
            }
            Ok(ExitCode::Ok)
        }
        NodeCmd::Show { node } => {
            let n: NodeView = c.get(&format!("/api/nodes/{node}"))?;
            if json {
                print_json(&n);
            } else {
                print_nodes(std::slice::from_ref(&n));
                print_down_reasons(std::slice::from_ref(&n));
                for s in &n.stuck {
                    println!("stuck: {} — {}", s.vm, s.reason);
                }
            }
            Ok(ExitCode::Ok)
        }
        NodeCmd::MarkDown {
            node,
            reason,
            confirmed_dead,
        } => {
            let n: NodeView = c.post(
                &format!("/api/nodes/{node}/down"),
                &requests::MarkNodeDown {
                    reason,
                    confirmed_dead,
                },
            )?;
            if json {
                print_json(&n);
            } else {
                println!("{} is {}", n.name, n.state);
                if let Some(r) = &n.down_reason {
                    println!("reason: {r}");
                }
                println!("the cluster restarts its VMs elsewhere (those that allow it)");
            }
            Ok(ExitCode::Ok)
        }
        NodeCmd::Resume { node, failback } => {
            let r: ResumedView = c.post(
                &format!("/api/nodes/{node}/resume"),
                &requests::ResumeNode { failback },
            )?;
            if json {
                print_json(&r);
            } else {
                println!("{} is {}", r.node.name, r.node.state);
                for m in &r.failback.moved {
                    println!("back: {} (epoch {})", m.vm, m.epoch);
                }
                for f in &r.failback.failed {
                    println!("stayed: {} — {}", f.vm, f.reason);
                }
            }
            Ok(if r.failback.failed.is_empty() {
                ExitCode::Ok
            } else {
                ExitCode::Failed
            })
        }
        NodeCmd::Pause {
            node,
            drain,
            downtime_limit_ms,
            no_wait,
        } => {
            let before: Vec<VmView> = c.get("/api/vms")?;
            let n: NodeView = c.post(
                &format!("/api/nodes/{node}/pause"),
                &requests::PauseNode {
                    drain,
                    downtime_limit_ms,
                },
            )?;
            if !drain || no_wait {
                if json {
                    print_json(&n);
                } else {
                    println!(
                        "{} is {}{}",
                        n.name,
                        n.state,
                        if drain { ", draining" } else { "" }
                    );
                }
                return Ok(ExitCode::Ok);
            }
            follow_drain(c, json, &n, &before)
        }
    }
}

/// How long `ferry node stop` waits for the daemon to exit: its shutdown
/// drain may take 90 s, and closing the store a few more.
const STOP_DEADLINE: Duration = Duration::from_secs(150);

fn stop_failure(code: ExitCode, error_code: &str, message: String) -> Failure {
    let status = if code == ExitCode::Refused { 403 } else { 409 };
    Failure {
        code,
        error: ApiError::new(status, error_code, message),
    }
}

/// Whether `pid` still exists as a process that has not exited. A zombie has
/// exited (its parent has not reaped it yet, which may be the caller's own
/// shell or test harness): `kill(pid, 0)` still succeeds on it.
fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and
        // may itself hold spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => true,
    }
}

/// Whether a daemon holds the data directory's lock (`Node::start` takes it
/// with `flock` and holds it while it runs). Probing takes the lock for an
/// instant when it is free; a daemon starting in that instant would refuse
/// to start, which is the price of not signalling a pid that was recycled.
fn daemon_holds(lock: &std::path::Path) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().read(true).open(lock)?;
    // SAFETY: `flock` only reads the descriptor, which `file` owns and keeps
    // open across the call; closing `file` releases a lock taken here.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(false);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(true)
    } else {
        Err(e)
    }
}

/// `ferry node stop`: SIGTERM to the daemon of the node configured in
/// `config_path`, then its shutdown report.
fn node_stop(config_path: &std::path::Path, json: bool) -> Outcome {
    let config = NodeConfig::load(config_path)?;
    let data_dir = &config.data_dir;
    let lock = crate::node::lock_path(data_dir);
    let not_running = |why: String| stop_failure(ExitCode::Failed, "not_running", why);
    let text = match std::fs::read_to_string(&lock) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_running(format!(
                "no pid file {}: no daemon has run on {}",
                lock.display(),
                data_dir.display()
            )))
        }
        Err(e) => return Err(not_running(format!("reading {}: {e}", lock.display()))),
    };
    let pid: libc::pid_t = match text.trim().parse() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(not_running(format!(
                "{} holds no pid ({:?}): the daemon of node {} is not running",
                lock.display(),
                text.trim(),
                config.name
            )))
        }
    };
    match daemon_holds(&lock) {
        Ok(true) => {}
        Ok(false) => {
            return Err(not_running(format!(
                "the daemon of node {} is not running ({} is not locked; pid {pid} was its last)",
                config.name,
                data_dir.display()
            )))
        }
        Err(e) => return Err(not_running(format!("checking {}: {e}", lock.display()))),
    }
    let sent_ms = ferry_actors::node::now_ms();
    // SAFETY: sends SIGTERM to `pid`; no memory is involved.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) => stop_failure(
                ExitCode::Refused,
                "not_permitted",
                format!(
                    "not allowed to signal pid {pid}, the daemon of node {}: it runs as another user",
                    config.name
                ),
            ),
            Some(libc::ESRCH) => not_running(format!(
                "the daemon of node {} (pid {pid}) is not running",
                config.name
            )),
            _ => not_running(format!("signalling pid {pid}: {e}")),
        });
    }
    let spinner = if json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(format!(
            "stopping node {} (pid {pid}): moving its VMs away, then leaving the cluster",
            config.name
        ));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    };
    let started = Instant::now();
    while alive(pid) {
        if started.elapsed() > STOP_DEADLINE {
            spinner.finish_and_clear();
            return Err(stop_failure(
                ExitCode::Failed,
                "still_running",
                format!(
                    "the daemon of node {} (pid {pid}) is still running {} s after SIGTERM; see its log",
                    config.name,
                    STOP_DEADLINE.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    spinner.finish_and_clear();
    let path = crate::node::report_path(data_dir);
    let report: Option<crate::node::ShutdownReport> = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        // A report written before the signal is an earlier stop's.
        .filter(|r: &crate::node::ShutdownReport| r.at_ms >= sent_ms);
    let Some(report) = report else {
        return Err(stop_failure(
            ExitCode::Failed,
            "no_report",
            format!(
                "the daemon of node {} (pid {pid}) exited after {:.1?} but left no report of this stop in {}; see its log",
                config.name,
                started.elapsed(),
                path.display()
            ),
        ));
    };
    if json {
        print_json(&report);
    } else {
        println!(
            "node {} (pid {pid}) stopped in {:.1?}",
            config.name,
            started.elapsed()
        );
        for line in report.lines() {
            println!("{line}");
        }
    }
    Ok(ExitCode::Ok)
}

fn on_node(vms: &[VmView], node: u64) -> Vec<String> {
    vms.iter()
        .filter(|v| v.owner == node && (v.state == "running" || v.state == "migrating"))
        .map(|v| v.name.clone())
        .collect()
}

fn follow_drain(c: &Client, json: bool, n: &NodeView, before: &[VmView]) -> Outcome {
    let leaving = on_node(before, n.id);
    let bar = if json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(leaving.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "draining {prefix} [{bar:30}] {pos}/{len} VMs moved  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(n.name.clone());
        bar
    };
    let started = Instant::now();
    let node = loop {
        let node: NodeView = c.get(&format!("/api/nodes/{}", n.id))?;
        let vms: Vec<VmView> = c.get("/api/vms")?;
        let left = on_node(&vms, n.id);
        bar.set_position(leaving.iter().filter(|v| !left.contains(v)).count() as u64);
        bar.set_message(left.join(" "));
        if node.drain != "draining" || node.state != "paused" {
            break node;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            break node;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    bar.finish_and_clear();
    let vms: Vec<VmView> = c.get("/api/vms")?;
    if json {
        print_json(&serde_json::json!({ "node": node, "vms": vms }));
    } else {
        println!("{}: {} in {:.1?}", node.name, node.drain, started.elapsed());
        let rows: Vec<Vec<String>> = vms
            .iter()
            .filter(|v| leaving.contains(&v.name))
            .map(|v| vec![v.name.clone(), v.owner_name.clone(), v.state.clone()])
            .collect();
        if !rows.is_empty() {
            table(&["VM", "NOW ON", "STATE"], &rows);
        }
        for s in &node.stuck {
            println!("left behind: {} — {}", s.vm, s.reason);
        }
    }
    Ok(if node.drain == "drained" {
        ExitCode::Ok
    } else {
        ExitCode::Failed
    })
}

fn print_vms(vms: &[VmView]) {
    table(
        &[
            "NAME",
            "STATE",
            "OWNER",
            "MEM MiB",
            "VCPUS",
            "EPOCH",
            "STORAGE",
            "MIGRATION",
        ],
        &vms.iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.state.clone(),
                    v.owner_name.clone(),
                    mib(v.memory_bytes),
                    v.vcpus.to_string(),
                    v.epoch.to_string(),
                    v.storage.clone(),
                    v.migration.map(|m| m.to_string()).unwrap_or_default(),
                ]
            })
            .collect::<Vec<_>>(),
    );
}

fn vm_cmd(c: &Client, json: bool, cmd: VmCmd) -> Outcome {
    let show = |v: &VmView| {
        if json {
            print_json(v);
        } else {
            print_vms(std::slice::from_ref(v));
        }
    };
    match cmd {
        VmCmd::List => {
            let vms: Vec<VmView> = c.get("/api/vms")?;
            if json {
                print_json(&vms);
            } else {
                print_vms(&vms);
            }
        }
        VmCmd::Show { vm } => show(&c.get(&format!("/api/vms/{vm}"))?),
        VmCmd::Create {
            name,
            node,
            memory_mib,
            vcpus,
            dirty_pages_per_sec,
            pattern,
            storage,
            backend,
            processor_compatibility,
            no_start,
            no_restart,
            priority,
        } => {
            let req = requests::CreateVm {
                name,
                node,
                memory_mib,
                vcpus,
                dirty_pages_per_sec,
                pattern,
                storage,
                backend,
                processor_compatibility,
                tcp_connections: 0,
                start: !no_start,
                restart: !no_restart,
                priority,
            };
            show(&c.post("/api/vms", &req)?);
        }
        VmCmd::Start { vm, node } => {
            show(&c.post(&format!("/api/vms/{vm}/start"), &requests::StartVm { node })?)
        }
        VmCmd::Stop { vm } => {
            show(&c.post(&format!("/api/vms/{vm}/stop"), &serde_json::json!({}))?)
        }
        VmCmd::Set {
            vm,
            processor_compatibility,
        } => show(&c.call(
            "PATCH",
            &format!("/api/vms/{vm}"),
            Some(&requests::VmPatch {
                processor_compatibility: processor_compatibility.map(|v| v == "on"),
            }),
        )?),
        VmCmd::Delete { vm } => {
            c.call::<serde_json::Value>("DELETE", &format!("/api/vms/{vm}"), None::<&()>)?;
            if json {
                print_json(&serde_json::json!({ "deleted": vm }));
            } else {
                println!("deleted {vm}");
            }
        }
        VmCmd::Cancel { vm } => {
            let v: serde_json::Value =
                c.post(&format!("/api/vms/{vm}/cancel"), &serde_json::json!({}))?;
            if json {
                print_json(&v);
            } else {
                println!("cancelling the move of {vm}; it stays on its source");
            }
        }
        VmCmd::Estimate { vm, to } => {
            let query = to.map_or(String::new(), |t| format!("?to={t}"));
            let e: EstimateView = c.get(&format!("/api/vms/{vm}/estimate{query}"))?;
            if json {
                print_json(&e);
            } else {
                println!("{vm}: {}", e.summary);
                print!("{}", estimate_basis(&e));
            }
        }
        VmCmd::Append { vm, record } => {
            let a: AppendView = c.post(
                &format!("/api/vms/{vm}/append"),
                &requests::Append { record },
            )?;
            if json {
                print_json(&a);
            } else {
                println!("{vm}: appended as #{} on node {}", a.seq, a.node);
            }
        }
        VmCmd::Move {
            vm,
            to,
            verify,
            downtime_limit_ms,
            no_wait,
        } => {
            let req = requests::MoveVm {
                target: to,
                verify,
                downtime_limit_ms,
            };
            return vm_move(c, json, &vm, req, no_wait);
        }
    }
    Ok(ExitCode::Ok)
}

/// Spawns a reader of the node's event stream; events arrive on the channel.
fn subscribe(c: &Client, path: &str) -> Result<std::sync::mpsc::Receiver<Event>, Failure> {
    let stream = c.events(path)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for sse in stream {
            let Ok(sse) = sse else { return };
            if let Ok(event) = serde_json::from_str::<Event>(&sse.data) {
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

const MIB: f64 = 1048576.0;

fn round_message(p: &ProgressView) -> String {
    match p.phase.as_str() {
        // Mid-round (at least every 250 ms): what the round sent, what is
        // left of it, and when it will be done at its pace so far.
        "copying" | "blackout" if p.mid_round => {
            let eta = p
                .eta_ms
                .map(|ms| format!(", {:.1} s left", ms / 1e3))
                .unwrap_or_default();
            let label = if p.phase == "copying" {
                format!("round {}", p.round)
            } else {
                "blackout".to_string()
            };
            format!(
                "{label}: {:.1} of {:.1} MiB, {:.0} MB/s{eta}",
                p.round_bytes_sent as f64 / MIB,
                (p.round_bytes_sent + p.bytes_remaining) as f64 / MIB,
                p.rate / 1e6
            )
        }
        "copying" => format!(
            "round {}: {} pages dirty, {:.0} MB/s",
            p.round,
            p.remaining_pages,
            p.bandwidth / 1e6
        ),
        other => other.replace('_', " "),
    }
}

/// What an estimate was computed from, one line a factor, in words.
fn estimate_basis(e: &EstimateView) -> String {
    let memory = match e.nonzero_pages {
        Some(pages) => format!(
            "{} MiB, {} MiB of it in use",
            mib(e.memory_bytes),
            mib(pages.saturating_mul(4096))
        ),
        None => format!("{} MiB", mib(e.memory_bytes)),
    };
    let to = e
        .target_name
        .as_deref()
        .map_or(String::new(), |t| format!(" to {t}"));
    format!(
        "  memory:     {memory}\n  dirty rate: {:.0} pages/s ({:.1} MiB/s), {}\n  bandwidth:  {:.0} MiB/s{to}, {}\n  setup:      {:.0} ms\n",
        e.dirty_rate,
        e.dirty_rate * 4096.0 / (1u64 << 20) as f64,
        e.dirty_rate_basis,
        e.bandwidth / (1u64 << 20) as f64,
        e.bandwidth_basis,
        e.setup_ms
    )
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:<24} [{bar:30}] {pos:>3}%  {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn vm_move(c: &Client, json: bool, vm: &str, req: requests::MoveVm, no_wait: bool) -> Outcome {
    let events = if no_wait {
        None
    } else {
        Some(subscribe(c, "/api/events")?)
    };
    let started: MoveStarted = c.post(&format!("/api/vms/{vm}/move"), &req)?;
    if no_wait {
        if json {
            print_json(&started);
        } else {
            println!(
                "migration {}: {vm} node {} -> {}",
                started.migration, started.source, started.target_name
            );
        }
        return Ok(ExitCode::Ok);
    }
    if !json {
        println!(
            "migration {}: moving {vm} to {}",
            started.migration, started.target_name
        );
        if let Some(e) = &started.estimate {
            println!("estimate: {}", e.summary);
            print!("{}", estimate_basis(e));
        }
    }
    let bar = if json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(100).with_style(bar_style());
        bar.set_prefix(format!("{vm} -> {}", started.target_name));
        bar
    };
    let id = started.migration;
    let mut last_poll = Instant::now();
    if let Some(rx) = events {
        loop {
            match rx.recv_timeout(Duration::from_millis(300)) {
                Ok(Event::Progress(p)) if p.migration == id => {
                    bar.set_position(p.percent.clamp(0.0, 100.0) as u64);
                    bar.set_message(round_message(&p));
                    if p.is_final() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(200))
                }
            }
            if last_poll.elapsed() > Duration::from_millis(500) {
                last_poll = Instant::now();
                let m: MigrationView = c.get(&format!("/api/migrations/{id}"))?;
                if m.outcome != "active" {
                    break;
                }
            }
        }
    }
    bar.finish_and_clear();
    // The store decides; the report may trail the outcome by a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    let m = loop {
        let m: MigrationView = c.get(&format!("/api/migrations/{id}"))?;
        if m.outcome != "active"
            && (m.report.is_some() || m.outcome != "completed" || Instant::now() > deadline)
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if json {
        print_json(&m);
    } else {
        print_migration_result(&m);
    }
    Ok(if m.outcome == "completed" {
        ExitCode::Ok
    } else {
        ExitCode::Failed
    })
}

fn print_migration_result(m: &MigrationView) {
    match (m.outcome.as_str(), &m.report) {
        ("completed", Some(r)) => println!(
            "{} now runs on node {}: {} rounds, {:.1} MiB sent, {:.0} ms total, {:.1} ms blackout",
            m.vm,
            m.target,
            r.rounds,
            r.bytes as f64 / (1u64 << 20) as f64,
            r.total_ms,
            r.blackout_ms
        ),
        ("completed", None) => println!("{} now runs on node {}", m.vm, m.target),
        _ => println!(
            "migration {} of {} {}: {} — the VM runs on node {}",
            m.id,
            m.vm,
            m.outcome,
            m.reason.clone().unwrap_or_default(),
            m.source
        ),
    }
}

fn print_networks(nets: &[NetworkView]) {
    table(
        &[
            "ORDER",
            "NAME",
            "SUBNET",
            "GATEWAY",
            "ROLE",
            "MIGRATION",
            "ALLOWED",
        ],
        &nets
            .iter()
            .map(|n| {
                vec![
                    n.order.to_string(),
                    n.name.clone(),
                    n.subnet.clone(),
                    n.gateway.clone().unwrap_or_else(|| "-".into()),
                    n.role.clone(),
                    n.migration.clone(),
                    if n.allowed { "yes".into() } else { "no".into() },
                ]
            })
            .collect::<Vec<_>>(),
    );
}

fn network_cmd(c: &Client, json: bool, cmd: NetworkCmd) -> Outcome {
    let nets: Vec<NetworkView> = match cmd {
        NetworkCmd::List => c.get("/api/networks")?,
        NetworkCmd::Set {
            name,
            migration,
            gateway,
            no_gateway,
        } => {
            let patch = requests::NetworkPatch {
                migration,
                gateway: if no_gateway {
                    Some(None)
                } else {
                    gateway.map(Some)
                },
            };
            if patch == requests::NetworkPatch::default() {
                return Err(usage(
                    "nothing to set: give --migration, --gateway or --no-gateway",
                ));
            }
            let n: NetworkView = c.call("PATCH", &format!("/api/networks/{name}"), Some(&patch))?;
            vec![n]
        }
        NetworkCmd::Order { names } => c.call(
            "PUT",
            "/api/networks/order",
            Some(&requests::NetworkOrder { order: names }),
        )?,
    };
    if json {
        print_json(&nets);
    } else {
        print_networks(&nets);
    }
    Ok(ExitCode::Ok)
}

fn migrations_cmd(c: &Client, json: bool, cmd: MigrationsCmd) -> Outcome {
    match cmd {
        MigrationsCmd::List => {
            let ms: Vec<MigrationView> = c.get("/api/migrations")?;
            if json {
                print_json(&ms);
            } else {
                table(
                    &[
                        "ID",
                        "VM",
                        "FROM",
                        "TO",
                        "TRIGGER",
                        "PHASE",
                        "OUTCOME",
                        "BLACKOUT ms",
                        "REASON",
                    ],
                    &ms.iter()
                        .map(|m| {
                            vec![
                                m.id.to_string(),
                                m.vm.clone(),
                                m.source.to_string(),
                                m.target.to_string(),
                                m.trigger.clone(),
                                m.phase.clone(),
                                m.outcome.clone(),
                                m.report
                                    .as_ref()
                                    .map(|r| format!("{:.1}", r.blackout_ms))
                                    .unwrap_or_default(),
                                m.reason.clone().unwrap_or_default(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                );
            }
        }
        MigrationsCmd::Show { id } => {
            let m: MigrationView = c.get(&format!("/api/migrations/{id}"))?;
            if json {
                print_json(&m);
            } else {
                print_migration_result(&m);
                table(
                    &[
                        "ROUND",
                        "PHASE",
                        "MiB SENT",
                        "DIRTY PAGES",
                        "DIRTY/s",
                        "MB/s",
                        "THROTTLE",
                    ],
                    &m.rounds
                        .iter()
                        .map(|p| {
                            vec![
                                p.round.to_string(),
                                p.phase.clone(),
                                format!("{:.1}", p.bytes_sent as f64 / (1u64 << 20) as f64),
                                p.remaining_pages.to_string(),
                                format!("{:.0}", p.dirty_rate),
                                format!("{:.0}", p.bandwidth / 1e6),
                                format!("{:.0}%", p.throttle * 100.0),
                            ]
                        })
                        .collect::<Vec<_>>(),
                );
            }
        }
        MigrationsCmd::Abort { id } => {
            let m: MigrationView = c.post(
                &format!("/api/migrations/{id}/abort"),
                &serde_json::json!({}),
            )?;
            if json {
                print_json(&m);
            } else {
                print_migration_result(&m);
            }
        }
        MigrationsCmd::Watch {
            migration,
            count,
            timeout,
        } => {
            let path = match migration {
                Some(id) => format!("/api/events?migration={id}"),
                None => "/api/events".into(),
            };
            let rx = subscribe(c, &path)?;
            let deadline = timeout.map(|s| Instant::now() + Duration::from_secs(s));
            let bars = MultiProgress::new();
            let tty = !json && std::io::stderr().is_terminal();
            let mut shown: HashMap<u64, ProgressBar> = HashMap::new();
            let mut ended = 0u64;
            loop {
                if deadline.is_some_and(|d| Instant::now() > d) || count.is_some_and(|n| ended >= n)
                {
                    break;
                }
                let event = match rx.recv_timeout(Duration::from_millis(250)) {
                    Ok(e) => e,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(Failure::from(ClientError::Api(ApiError::unavailable(
                            "node_unreachable",
                            "the event stream ended",
                        ))))
                    }
                };
                let Event::Progress(p) = event else {
                    if json {
                        if let Event::Report(r) = &event {
                            println!("{}", serde_json::json!({ "type": "report", "report": r }));
                        }
                    }
                    continue;
                };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "type": "progress", "progress": p })
                    );
                } else if tty {
                    let bar = shown.entry(p.migration).or_insert_with(|| {
                        let bar = bars.add(ProgressBar::new(100).with_style(bar_style()));
                        bar.set_prefix(format!("#{} {}", p.migration, p.vm));
                        bar
                    });
                    bar.set_position(p.percent.clamp(0.0, 100.0) as u64);
                    bar.set_message(round_message(&p));
                    if p.is_final() {
                        bar.finish();
                    }
                } else {
                    println!(
                        "migration {} {} from node {}: {} ({:.0}%)",
                        p.migration,
                        p.vm,
                        p.node,
                        round_message(&p),
                        p.percent
                    );
                }
                if p.is_final() {
                    ended += 1;
                }
            }
        }
    }
    Ok(ExitCode::Ok)
}

fn print_tips(tips: &[TipView]) {
    table(
        &["ID", "VM", "FROM", "TO", "STATE", "REASON"],
        &tips
            .iter()
            .map(|t| {
                vec![
                    t.id.to_string(),
                    t.vm.clone(),
                    t.source.to_string(),
                    t.target.to_string(),
                    t.state.clone(),
                    t.failure.clone().unwrap_or_else(|| t.reason.clone()),
                ]
            })
            .collect::<Vec<_>>(),
    );
}

fn tips_cmd(c: &Client, json: bool, cmd: TipsCmd) -> Outcome {
    let tips: Vec<TipView> = match cmd {
        TipsCmd::List => c.get("/api/tips")?,
        TipsCmd::Accept { id } => {
            vec![c.post(&format!("/api/tips/{id}/accept"), &serde_json::json!({}))?]
        }
        TipsCmd::Dismiss { id } => {
            vec![c.post(&format!("/api/tips/{id}/dismiss"), &serde_json::json!({}))?]
        }
    };
    if json {
        print_json(&tips);
    } else {
        print_tips(&tips);
    }
    Ok(ExitCode::Ok)
}

fn settings_cmd(c: &Client, json: bool, cmd: SettingsCmd) -> Outcome {
    let s: SettingsView = match cmd {
        SettingsCmd::Show => c.get("/api/settings")?,
        SettingsCmd::Set {
            downtime_limit_ms,
            max_migrations_per_node,
            pro_tip_mode,
            failure_detection_ms,
        } => c.call(
            "PATCH",
            "/api/settings",
            Some(&requests::SettingsPatch {
                downtime_limit_ms,
                bandwidth_cap_bytes_per_sec: None,
                max_migrations_per_node,
                pro_tip_mode,
                failure_detection_ms,
            }),
        )?,
    };
    if json {
        print_json(&s);
    } else {
        println!("downtime limit           {} ms", s.downtime_limit_ms);
        println!("migrations per node      {}", s.max_migrations_per_node);
        println!("policy tips              {}", s.pro_tip_mode);
        println!("failure detection        {} ms", s.failure_detection_ms);
    }
    Ok(ExitCode::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_mid_round_says_what_the_round_sent_and_has_left() {
        let p = ProgressView {
            migration: 4,
            vm: "web-1".into(),
            node: 1,
            phase: "copying".into(),
            round: 0,
            bytes_sent: 300 << 20,
            remaining_pages: (724 << 20) / 4096,
            bytes_remaining: 724 << 20,
            dirty_rate: 0.0,
            bandwidth: 0.0,
            expected_downtime_ms: 0.0,
            throttle: 0.0,
            mid_round: true,
            round_bytes_sent: 300 << 20,
            rate: 250e6,
            eta_ms: Some(3040.0),
            percent: 29.3,
            at_ms: 0,
        };
        assert_eq!(
            round_message(&p),
            "round 0: 300.0 of 1024.0 MiB, 250 MB/s, 3.0 s left"
        );
        let ended = ProgressView {
            mid_round: false,
            remaining_pages: 120,
            bandwidth: 251e6,
            ..p
        };
        assert_eq!(round_message(&ended), "round 0: 120 pages dirty, 251 MB/s");
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
