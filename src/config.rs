//! A node's configuration file (`node.toml`) and `ferry cluster init`, which
//! writes a cluster CA, a certificate per node and ready-to-run configurations
//! for a cluster on one machine.
//!
//! Addresses follow the local convention of the design: node `i` has address
//! `base + i` in every network's subnet (`127.1.0.i`, `127.2.0.i` by default),
//! all on the same port, and its HTTP API on `127.0.0.1:(api_port + i - 1)`.
//! Every node's file lists its peers, so a node knows where to find the others
//! before the cluster store can tell it.

use anyhow::{bail, Context};
use ferry_cluster::model::Subnet;
use ferry_cluster::NodeId;
use ferry_transport::ClusterCa;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// `node.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub name: String,
    /// The node's cluster store, lock file and state. Relative paths are
    /// relative to the configuration file.
    pub data_dir: PathBuf,
    /// The node's certificate, key and the cluster CA (`NodeCredentials::to_pem`).
    pub credentials: PathBuf,
    /// Whether this node forms the cluster on its first start (exactly one
    /// node should); the others ask to join.
    #[serde(default)]
    pub bootstrap: bool,
    pub api: ApiConfig,
    pub capacity: CapacityConfig,
    /// CPU features this node offers (processor compatibility checks), by
    /// the names in `ferry_vmm::cpu::FEATURES`. Absent: read from this
    /// processor's CPUID at start (`ferry_vmm::cpu::host_features`), which is
    /// what a real node wants; a list overrides it (tests that need nodes
    /// with different processors on one machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<Vec<String>>,
    #[serde(default)]
    pub tcp_offload: bool,
    /// The networks this node is attached to, with its address on each. The
    /// bootstrap node defines them in the cluster store in this order.
    pub networks: Vec<NetworkEntry>,
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// The operator's bearer token: every request, reads and writes. Secret.
    pub token: String,
    /// A read-only bearer token: GET requests only (`api_auth.rs`). Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_token: Option<String>,
    /// Serve HTTPS (the default). `false` serves plain HTTP, which the
    /// daemon warns about loudly when the API listens beyond loopback.
    #[serde(default = "tls_by_default")]
    pub tls: bool,
    /// The API's certificate and key (PEM), signed by the cluster CA, whose
    /// names cover what clients reach the API by (`api_tls.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The cluster CA certificate (PEM) clients of this API trust: the CLI
    /// reads it from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

fn tls_by_default() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    pub memory_mib: u64,
    pub max_vms: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkEntry {
    pub name: String,
    /// `address/prefix`.
    pub subnet: String,
    /// A network with a gateway is public (not used for migration by default).
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// This node's transport address on the network.
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    pub id: NodeId,
    pub name: String,
    pub api: SocketAddr,
    /// The peer's transport address per network name.
    pub addresses: BTreeMap<String, SocketAddr>,
}

impl NodeConfig {
    /// Reads and checks a configuration file; relative paths in it are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading configuration {}", path.display()))?;
        let mut config: NodeConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.data_dir.is_relative() {
            config.data_dir = base.join(&config.data_dir);
        }
        if config.credentials.is_relative() {
            config.credentials = base.join(&config.credentials);
        }
        for path in [&mut config.api.cert, &mut config.api.ca]
            .into_iter()
            .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        config.check()?;
        Ok(config)
    }

    /// Consistency checks that need no I/O.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.networks.is_empty() {
            bail!("node {} has no network", self.name);
        }
        for n in &self.networks {
            let subnet: Subnet = n.subnet.parse()?;
            if !subnet.contains(n.address.ip()) {
                bail!(
                    "address {} is outside network {}'s subnet {subnet}",
                    n.address,
                    n.name
                );
            }
        }
        if self.api.token.len() < 16 {
            bail!("the API token must be at least 16 characters");
        }
        if let Some(read) = &self.api.read_token {
            if read.len() < 16 {
                bail!("the API's read-only token must be at least 16 characters");
            }
            if *read == self.api.token {
                bail!("api.read_token must differ from api.token (the operator's)");
            }
        }
        if self.api.tls && self.api.cert.is_none() {
            bail!(
                "api.tls is on but api.cert (the API's certificate from the cluster CA) is not \
                 set: `ferry cluster init` and `ferry node add` write one; or set api.tls = false"
            );
        }
        if self.peers.iter().any(|p| p.id == self.node_id) {
            bail!("node {} lists itself as a peer", self.node_id);
        }
        Ok(())
    }

    /// The transport addresses this node listens on, one per network.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.networks.iter().map(|n| n.address).collect()
    }

    pub fn to_toml(&self) -> anyhow::Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

/// What `ferry cluster init` writes.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub nodes: u64,
    pub dir: PathBuf,
    pub cluster_name: String,
    /// `(name, subnet)`; node `i` gets `subnet base + i` on each.
    pub networks: Vec<(String, Subnet)>,
    /// Transport port on every network address.
    pub port: u16,
    /// API port of node 1; node `i` gets `api_port + i - 1` on 127.0.0.1.
    pub api_port: u16,
    pub memory_mib: u64,
    pub max_vms: u32,
}

impl InitOptions {
    /// Three nodes on 127.1.0.0/16 and 127.2.0.0/16 (both private).
    pub fn local(dir: impl Into<PathBuf>, nodes: u64) -> InitOptions {
        InitOptions {
            nodes,
            dir: dir.into(),
            cluster_name: "ferry".into(),
            networks: vec![
                ("mig-1".into(), subnet(127, 1)),
                ("mig-2".into(), subnet(127, 2)),
            ],
            port: 7400,
            api_port: 7701,
            memory_mib: 16 * 1024,
            max_vms: 32,
        }
    }
}

fn subnet(a: u8, b: u8) -> Subnet {
    Subnet {
        addr: IpAddr::V4(Ipv4Addr::new(a, b, 0, 0)),
        prefix: 16,
    }
}

/// Node `i`'s address in `subnet`: the subnet's base address plus `i`.
pub fn node_ip(subnet: &Subnet, i: NodeId) -> anyhow::Result<IpAddr> {
    let ip = match subnet.addr {
        IpAddr::V4(a) => {
            let n = u32::from(a)
                .checked_add(u32::try_from(i)?)
                .context("address overflow")?;
            IpAddr::V4(Ipv4Addr::from(n))
        }
        IpAddr::V6(a) => IpAddr::V6(
            u128::from(a)
                .checked_add(u128::from(i))
                .context("address overflow")?
                .into(),
        ),
    };
    if !subnet.contains(ip) {
        bail!("subnet {subnet} has no room for node {i}");
    }
    Ok(ip)
}

/// A fresh random API token (128 bits, hex).
pub fn new_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Writes `dir/ca.pem`, `dir/ca.key`, and for each node `dir/node-i/node.pem`,
/// `dir/node-i/api.pem` (the API's certificate) and `dir/node-i/node.toml`
/// (with an operator and a read-only API token, shared by the cluster). Refuses a directory that already holds a
/// cluster. Returns the configuration paths, node 1 first.
pub fn init_cluster(opts: &InitOptions) -> anyhow::Result<Vec<PathBuf>> {
    if opts.nodes == 0 || opts.nodes > 250 {
        bail!("--nodes must be between 1 and 250");
    }
    if opts.networks.is_empty() {
        bail!("at least one network is needed");
    }
    let dir = if opts.dir.is_absolute() {
        opts.dir.clone()
    } else {
        std::env::current_dir()?.join(&opts.dir)
    };
    if dir.join("ca.pem").exists() {
        bail!("{} already holds a cluster (ca.pem exists)", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    let ca = ClusterCa::generate(&opts.cluster_name)?;
    write_secret(&dir.join("ca.pem"), &ca.cert_pem())?;
    write_secret(&dir.join("ca.key"), &ca.key_pem())?;
    let token = new_token();
    let read_token = new_token();
    let api = |i: NodeId| -> anyhow::Result<SocketAddr> {
        let port = u16::try_from(u64::from(opts.api_port) + i - 1).context("API port overflow")?;
        Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    };
    let addresses = |i: NodeId| -> anyhow::Result<BTreeMap<String, SocketAddr>> {
        opts.networks
            .iter()
            .map(|(name, subnet)| {
                Ok((
                    name.clone(),
                    SocketAddr::new(node_ip(subnet, i)?, opts.port),
                ))
            })
            .collect()
    };
    let mut paths = Vec::new();
    for i in 1..=opts.nodes {
        let node_dir = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let creds = ca.issue(i)?;
        write_secret(&node_dir.join("node.pem"), &creds.to_pem())?;
        let api_cert = node_dir.join("api.pem");
        crate::api_tls::write_api_cert(&ca, &format!("node-{i}"), api(i)?, &api_cert)?;
        let mine = addresses(i)?;
        let config = NodeConfig {
            node_id: i,
            name: format!("node-{i}"),
            data_dir: node_dir.join("data"),
            credentials: node_dir.join("node.pem"),
            bootstrap: i == 1,
            api: ApiConfig {
                listen: api(i)?,
                token: token.clone(),
                read_token: Some(read_token.clone()),
                tls: true,
                cert: Some(api_cert),
                ca: Some(dir.join("ca.pem")),
            },
            capacity: CapacityConfig {
                memory_mib: opts.memory_mib,
                max_vms: opts.max_vms,
            },
            cpu_features: None,
            tcp_offload: false,
            networks: opts
                .networks
                .iter()
                .map(|(name, subnet)| NetworkEntry {
                    name: name.clone(),
                    subnet: subnet.to_string(),
                    gateway: None,
                    address: mine[name],
                })
                .collect(),
            peers: (1..=opts.nodes)
                .filter(|&p| p != i)
                .map(|p| {
                    Ok(PeerEntry {
                        id: p,
                        name: format!("node-{p}"),
                        api: api(p)?,
                        addresses: addresses(p)?,
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        };
        config.check()?;
        let path = node_dir.join("node.toml");
        write_secret(&path, &config.to_toml()?)?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn init_writes_configs_that_load_back() {
        let dir = std::env::temp_dir().join(format!("ferry-init-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let paths = init_cluster(&InitOptions::local(&dir, 3)).unwrap();
        assert_eq!(paths.len(), 3);
        let c2 = NodeConfig::load(&paths[1]).unwrap();
        assert_eq!(c2.node_id, 2);
        assert!(!c2.bootstrap);
        assert_eq!(c2.networks[1].address, "127.2.0.2:7400".parse().unwrap());
        assert_eq!(c2.api.listen, "127.0.0.1:7702".parse().unwrap());
        assert_eq!(c2.peers.len(), 2);
        // No features written: the node reads its processor's at start.
        assert_eq!(c2.cpu_features, None);
        assert!(!std::fs::read_to_string(&paths[1])
            .unwrap()
            .contains("cpu_features"));
        let creds = std::fs::read_to_string(&c2.credentials).unwrap();
        assert_eq!(
            ferry_transport::NodeCredentials::from_pem(&creds)
                .unwrap()
                .node_id,
            2
        );
        assert!(init_cluster(&InitOptions::local(&dir, 3)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn named_cpu_features_override_the_processors() {
        let dir = std::env::temp_dir().join(format!("ferry-cpu-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let paths = init_cluster(&InitOptions::local(&dir, 1)).unwrap();
        let text = std::fs::read_to_string(&paths[0]).unwrap();
        let named = format!("cpu_features = [\"sse4_2\", \"avx2\"]\n{text}");
        std::fs::write(&paths[0], named).unwrap();
        let c = NodeConfig::load(&paths[0]).unwrap();
        assert_eq!(
            c.cpu_features,
            Some(vec!["sse4_2".to_string(), "avx2".to_string()])
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
