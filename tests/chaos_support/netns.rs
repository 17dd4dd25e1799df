//! Real links for faults Ferry does not inject itself: one network namespace per
//! node, attached by veth pairs to one bridge per migration network in a namespace
//! of its own. Node `i` (0-based) has `10.201.K.(i+1)/24` on `ethK` for network K.
//!
//! Faults are what a failed NIC, cable or switch port does: `ip link set … down`
//! ([`Topology::set_link`]), or every packet dropped in one direction or both by an
//! nftables rule inside the node's namespace ([`Topology::block`]) — the process sees
//! nothing but silence. Everything is named after this process and removed on drop,
//! also when a test fails; namespaces left by dead runs are removed first.

use super::daemons::in_netns;
use std::process::Command;

/// Runs `tool args…`; its stdout, or why it failed.
pub fn run(tool: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// Why namespaces with packet filters cannot be built here, if they cannot.
pub fn cannot_run() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if uid != "0" {
        return Some(format!("not root (effective uid {uid})"));
    }
    for (tool, arg) in [("ip", "-V"), ("tc", "-V"), ("nft", "--version")] {
        if let Err(e) = run(tool, &[arg]) {
            return Some(format!("`{tool}` is not usable: {e}"));
        }
    }
    None
}

/// Which packets of a node's interface a [`Topology::block`] drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Arriving at the node.
    In,
    /// Leaving the node.
    Out,
    Both,
}

impl Direction {
    pub const ALL: [Direction; 3] = [Direction::In, Direction::Out, Direction::Both];

    pub fn name(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Both => "both",
        }
    }
}

const PREFIX: &str = "ferrych";
const TABLE: &str = "ferry_chaos";

/// The namespaces of one run; dropping it deletes them, and with them every
/// interface and rule inside.
pub struct Topology {
    switch: String,
    pub nodes: Vec<String>,
    pub networks: usize,
}

impl Topology {
    /// Deletes namespaces left by runs whose process is gone.
    fn remove_stale() {
        let Ok(list) = ip(&["netns", "list"]) else {
            return;
        };
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }

    /// `nodes` namespaces on `networks` bridges. `tag` keeps two topologies of one
    /// process apart.
    pub fn build(tag: &str, nodes: usize, networks: usize) -> Result<Topology, String> {
        Self::remove_stale();
        let run_name = format!("{PREFIX}-{}-{tag}", std::process::id());
        let switch = format!("{run_name}-sw");
        // Owned from here: whatever fails below, drop cleans up.
        let mut topo = Topology {
            switch: switch.clone(),
            nodes: Vec::new(),
            networks,
        };
        ip(&["netns", "add", &switch])?;
        for i in 1..=nodes {
            let ns = format!("{run_name}-n{i}");
            ip(&["netns", "add", &ns])?;
            topo.nodes.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            topo.nft(i - 1, &format!("add table inet {TABLE}"))?;
            for hook in ["input", "output"] {
                topo.nft(
                    i - 1,
                    &format!(
                        "add chain inet {TABLE} {hook} {{ type filter hook {hook} priority 0 ; }}"
                    ),
                )?;
            }
        }
        for k in 1..=networks {
            let br = format!("br{k}");
            ip(&["-n", &switch, "link", "add", &br, "type", "bridge"])?;
            ip(&["-n", &switch, "link", "set", &br, "up"])?;
            for (i, ns) in topo.nodes.clone().iter().enumerate() {
                let eth = format!("eth{k}");
                let port = format!("p{}k{k}", i + 1);
                ip(&[
                    "-n", ns, "link", "add", &eth, "type", "veth", "peer", "name", &port, "netns",
                    &switch,
                ])?;
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/24", Self::addr(k, i)),
                    "dev",
                    &eth,
                ])?;
                ip(&["-n", ns, "link", "set", &eth, "up"])?;
                ip(&["-n", &switch, "link", "set", &port, "master", &br])?;
                ip(&["-n", &switch, "link", "set", &port, "up"])?;
            }
        }
        Ok(topo)
    }

    /// Node `node`'s (0-based) address on network `network` (1-based).
    pub fn addr(network: usize, node: usize) -> String {
        format!("10.201.{network}.{}", node + 1)
    }

    /// Network `network`'s (1-based) subnet.
    pub fn subnet(network: usize) -> String {
        format!("10.201.{network}.0/24")
    }

    fn nft(&self, node: usize, rule: &str) -> Result<String, String> {
        let mut args = vec!["netns", "exec", &self.nodes[node], "nft"];
        args.extend(rule.split(' '));
        run("ip", &args)
    }

    /// Takes node `node`'s link on `network` down or up.
    pub fn set_link(&self, node: usize, network: usize, up: bool) -> Result<(), String> {
        let eth = format!("eth{network}");
        ip(&[
            "-n",
            &self.nodes[node],
            "link",
            "set",
            &eth,
            if up { "up" } else { "down" },
        ])
        .map(|_| ())
    }

    /// Drops every packet of node `node`'s interface on `network` going `direction`.
    pub fn block(&self, node: usize, network: usize, direction: Direction) -> Result<(), String> {
        let eth = format!("eth{network}");
        if matches!(direction, Direction::In | Direction::Both) {
            self.nft(
                node,
                &format!("add rule inet {TABLE} input iifname {eth} drop"),
            )?;
        }
        if matches!(direction, Direction::Out | Direction::Both) {
            self.nft(
                node,
                &format!("add rule inet {TABLE} output oifname {eth} drop"),
            )?;
        }
        Ok(())
    }

    /// Removes every [`block`](Self::block) of node `node`.
    pub fn unblock(&self, node: usize) -> Result<(), String> {
        for hook in ["input", "output"] {
            self.nft(node, &format!("flush chain inet {TABLE} {hook}"))?;
        }
        Ok(())
    }

    /// Bytes received so far on each network's interface of node `node`.
    pub fn rx_bytes(&self, node: usize) -> Vec<u64> {
        in_netns(&self.nodes[node], || rx_bytes_here(self.networks))
    }
}

/// Bytes received so far on `eth1`…`eth<networks>` of the calling thread's namespace.
pub fn rx_bytes_here(networks: usize) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    let mut out = vec![0; networks];
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(k) = name
            .trim()
            .strip_prefix("eth")
            .and_then(|k| k.parse::<usize>().ok())
        else {
            continue;
        };
        if let Some(slot) = out.get_mut(k.wrapping_sub(1)) {
            *slot = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    out
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.switch)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
