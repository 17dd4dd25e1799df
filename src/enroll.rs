//! What `ferry node add` and `ferry node renew-cert` write: a node's
//! certificate from the cluster CA, and for a new node its configuration.
//!
//! The CA's key stays where `ferry cluster init` wrote it, `<cluster
//! dir>/ca.key` (the directory holding `ca.pem` and the `node-N/`
//! directories), so these commands run where that file is; nothing sends the
//! key over the network. A new node's configuration follows the layout of
//! `cluster init` (see `config.rs`): its address on every network of the
//! reference node's configuration is the subnet's base plus its id, on the
//! same port; its API port is the reference node's shifted by the id
//! difference; it lists the reference node and that node's peers, so it can
//! ask any of them to let it join (as a learner that catches up, then as a
//! voter: `node/forming.rs`).

use crate::config::{node_ip, ApiConfig, CapacityConfig, NetworkEntry, NodeConfig, PeerEntry};
use anyhow::Context;
use ferry_cluster::model::Subnet;
use ferry_cluster::NodeId;
use ferry_transport::identity::Validity;
use ferry_transport::{ClusterCa, NodeCredentials};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The cluster directory of a node configuration written by `cluster init`
/// or `node add`: the directory above the node's own.
pub fn cluster_dir_of(config_path: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    abs.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Loads the cluster CA from `dir/ca.pem` and `dir/ca.key`, saying what to do
/// when the key cannot be read.
pub fn load_ca(dir: &Path) -> anyhow::Result<ClusterCa> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read the cluster CA's {} ({}): a node certificate is signed with the \
                 CA key that `ferry cluster init` wrote there; run this where that file is, \
                 as a user who may read it, or name the cluster directory with --cluster-dir",
                if file == "ca.key" {
                    "key"
                } else {
                    "certificate"
                },
                path.display()
            )
        })
    };
    let cert = read("ca.pem")?;
    let key = read("ca.key")?;
    Ok(ClusterCa::from_pem(&cert, &key)?)
}

/// What `ferry node add` needs to know.
#[derive(Debug, Clone)]
pub struct AddNode {
    pub name: String,
    /// The new node's id; `None`: one more than any id known.
    pub id: Option<NodeId>,
    pub cluster_dir: PathBuf,
    /// A running member's configuration: networks, port, token, peers.
    pub reference: NodeConfig,
    /// The store's nodes now: (id, name).
    pub members: Vec<(NodeId, String)>,
    pub memory_mib: Option<u64>,
    pub max_vms: Option<u32>,
    pub valid_for: Duration,
}

/// Why `node add` refused, for the exit code.
#[derive(Debug, thiserror::Error)]
pub enum AddRefused {
    #[error("{0}")]
    Taken(String),
    #[error("{0}")]
    Invalid(String),
}

/// Writes `<cluster dir>/<name>/node.pem` and `node.toml`; returns the
/// configuration's path.
pub fn add_node(opts: &AddNode) -> anyhow::Result<PathBuf> {
    crate::requests::check_name("node", &opts.name).map_err(|e| AddRefused::Invalid(e.message))?;
    if let Some((id, _)) = opts.members.iter().find(|(_, n)| *n == opts.name) {
        return Err(AddRefused::Taken(format!(
            "the name {:?} is taken: node {id} of the cluster has it",
            opts.name
        ))
        .into());
    }
    let node_dir = opts.cluster_dir.join(&opts.name);
    if node_dir.exists() {
        return Err(AddRefused::Taken(format!(
            "the name {:?} is taken: {} already exists (a node of this cluster, or one removed; \
             pick another name)",
            opts.name,
            node_dir.display()
        ))
        .into());
    }
    let known = known_ids(opts);
    let id = match opts.id {
        Some(0) => return Err(AddRefused::Invalid("node ids start at 1".into()).into()),
        Some(id) if known.contains(&id) => {
            return Err(AddRefused::Taken(format!("node id {id} is taken")).into())
        }
        Some(id) => id,
        None => known.iter().max().copied().unwrap_or(0) + 1,
    };
    let ca = load_ca(&opts.cluster_dir)?;
    let r = &opts.reference;
    let networks = r
        .networks
        .iter()
        .map(|n| {
            let subnet: Subnet = n.subnet.parse()?;
            Ok(NetworkEntry {
                name: n.name.clone(),
                subnet: n.subnet.clone(),
                gateway: n.gateway,
                address: SocketAddr::new(node_ip(&subnet, id)?, n.address.port()),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let api_port = i64::from(r.api.listen.port()) + id as i64 - r.node_id as i64;
    let api_port = u16::try_from(api_port).context("API port out of range")?;
    let mut peers: Vec<PeerEntry> = vec![PeerEntry {
        id: r.node_id,
        name: r.name.clone(),
        api: r.api.listen,
        addresses: r
            .networks
            .iter()
            .map(|n| (n.name.clone(), n.address))
            .collect::<BTreeMap<_, _>>(),
    }];
    peers.extend(
        r.peers
            .iter()
            .filter(|p| opts.members.iter().any(|(id, _)| *id == p.id))
            .cloned(),
    );
    let config = NodeConfig {
        node_id: id,
        name: opts.name.clone(),
        data_dir: node_dir.join("data"),
        credentials: node_dir.join("node.pem"),
        bootstrap: false,
        api: ApiConfig {
            listen: SocketAddr::new(r.api.listen.ip(), api_port),
            token: r.api.token.clone(),
            read_token: r.api.read_token.clone(),
            tls: r.api.tls,
            cert: r.api.tls.then(|| node_dir.join("api.pem")),
            ca: r
                .api
                .ca
                .clone()
                .or_else(|| r.api.tls.then(|| opts.cluster_dir.join("ca.pem"))),
        },
        capacity: CapacityConfig {
            memory_mib: opts.memory_mib.unwrap_or(r.capacity.memory_mib),
            max_vms: opts.max_vms.unwrap_or(r.capacity.max_vms),
        },
        cpu_features: r.cpu_features.clone(),
        tcp_offload: r.tcp_offload,
        networks,
        peers,
    };
    config.check()?;
    let creds = ca.issue_with(id, Validity::starting_now(opts.valid_for))?;
    std::fs::create_dir_all(&node_dir)
        .with_context(|| format!("creating {}", node_dir.display()))?;
    crate::config::write_secret(&config.credentials, &creds.to_pem())?;
    if let Some(api_cert) = &config.api.cert {
        crate::api_tls::write_api_cert(&ca, &config.name, config.api.listen, api_cert)?;
    }
    let path = node_dir.join("node.toml");
    crate::config::write_secret(&path, &config.to_toml()?)?;
    Ok(path)
}

/// Every id this cluster has used that `node add` can see: the store's
/// nodes, the reference configuration's, and the `node-N`-style directories'
/// configurations (removed nodes keep theirs).
fn known_ids(opts: &AddNode) -> Vec<NodeId> {
    let mut ids: Vec<NodeId> = opts.members.iter().map(|(id, _)| *id).collect();
    ids.push(opts.reference.node_id);
    ids.extend(opts.reference.peers.iter().map(|p| p.id));
    if let Ok(entries) = std::fs::read_dir(&opts.cluster_dir) {
        for e in entries.flatten() {
            if let Ok(c) = NodeConfig::load(&e.path().join("node.toml")) {
                ids.push(c.node_id);
            }
        }
    }
    ids
}

/// Issues node `config`'s next certificate, valid for `valid_for`, and
/// replaces its credentials file (the old one is kept as `node.pem.old`).
/// The daemon reads it at its next start.
pub fn renew_cert(
    cluster_dir: &Path,
    config_path: &Path,
    valid_for: Duration,
) -> anyhow::Result<(NodeCredentials, Validity)> {
    let config = NodeConfig::load(config_path)?;
    let ca = load_ca(cluster_dir)?;
    let creds = ca.issue_with(config.node_id, Validity::starting_now(valid_for))?;
    let validity = creds.validity()?;
    replace_secret(&config.credentials, true, |fresh| {
        crate::config::write_secret(fresh, &creds.to_pem())
    })?;
    // The API's certificate expires like the node's: renewed with it, or the
    // API would stop answering a year after `cluster init` however often the
    // node's certificate was renewed.
    if let Some(api_cert) = &config.api.cert {
        replace_secret(api_cert, false, |fresh| {
            crate::api_tls::write_api_cert(&ca, &config.name, config.api.listen, fresh)
        })?;
    }
    Ok((creds, validity))
}

/// Replaces the secret at `path` with what `write` puts in a fresh file
/// beside it, by a rename, so a crash leaves the old file or the new one,
/// never half of one; with `keep_old` the old one stays as `<name>.old`.
fn replace_secret(
    path: &Path,
    keep_old: bool,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut fresh = path.as_os_str().to_owned();
    fresh.push(".new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    write(&fresh)?;
    if keep_old && path.exists() {
        let mut old = path.as_os_str().to_owned();
        old.push(".old");
        std::fs::rename(path, &old).with_context(|| format!("keeping {}", path.display()))?;
    }
    std::fs::rename(&fresh, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{init_cluster, InitOptions};

    fn cluster(tag: &str) -> (PathBuf, NodeConfig) {
        let dir = std::env::temp_dir().join(format!("ferry-enroll-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let paths = init_cluster(&InitOptions::local(&dir, 3)).unwrap();
        (dir, NodeConfig::load(&paths[0]).unwrap())
    }

    fn opts(dir: &Path, reference: NodeConfig, name: &str) -> AddNode {
        AddNode {
            name: name.into(),
            id: None,
            cluster_dir: dir.to_path_buf(),
            reference,
            members: vec![
                (1, "node-1".into()),
                (2, "node-2".into()),
                (3, "node-3".into()),
            ],
            memory_mib: None,
            max_vms: None,
            valid_for: Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_new_node_gets_the_next_id_addresses_on_every_network_and_a_ca_certificate() {
        let (dir, reference) = cluster("add");
        assert_eq!(cluster_dir_of(&dir.join("node-1/node.toml")), dir);
        let path = add_node(&opts(&dir, reference.clone(), "node-4")).unwrap();
        let c = NodeConfig::load(&path).unwrap();
        assert_eq!(
            (c.node_id, c.name.as_str(), c.bootstrap),
            (4, "node-4", false)
        );
        assert_eq!(c.networks[0].address, "127.1.0.4:7400".parse().unwrap());
        assert_eq!(c.networks[1].address, "127.2.0.4:7400".parse().unwrap());
        assert_eq!(c.api.listen, "127.0.0.1:7704".parse().unwrap());
        assert_eq!(c.peers.len(), 3);
        let creds =
            NodeCredentials::from_pem(&std::fs::read_to_string(&c.credentials).unwrap()).unwrap();
        assert_eq!(creds.node_id, 4);
        assert_eq!(creds.ca_cert_pem, reference_ca(&dir));
        let v = creds.validity().unwrap();
        assert!(
            (3500..=3700).contains(&(v.not_after_s - v.not_before_s)),
            "{v:?}"
        );

        // Taken names and ids, invalid names.
        let again = add_node(&opts(&dir, reference.clone(), "node-4")).unwrap_err();
        assert!(matches!(
            again.downcast_ref::<AddRefused>(),
            Some(AddRefused::Taken(_))
        ));
        let member = add_node(&opts(&dir, reference.clone(), "node-2")).unwrap_err();
        assert!(
            member.to_string().contains("node 2 of the cluster has it"),
            "{member}"
        );
        let bad = add_node(&opts(&dir, reference.clone(), "-x")).unwrap_err();
        assert!(matches!(
            bad.downcast_ref::<AddRefused>(),
            Some(AddRefused::Invalid(_))
        ));
        // The next one takes id 5: node-4's directory holds id 4.
        let five = add_node(&opts(&dir, reference.clone(), "edge")).unwrap();
        assert_eq!(NodeConfig::load(&five).unwrap().node_id, 5);

        // No CA key: said so, nothing written.
        std::fs::rename(dir.join("ca.key"), dir.join("ca.key.away")).unwrap();
        let no_key = add_node(&opts(&dir, reference, "node-6")).unwrap_err();
        assert!(
            format!("{no_key:#}").contains("cannot read the cluster CA's key"),
            "{no_key:#}"
        );
        assert!(!dir.join("node-6").exists());
        std::fs::rename(dir.join("ca.key.away"), dir.join("ca.key")).unwrap();

        // Renewal: a new certificate, the old one kept, and a new API one.
        let api_before = std::fs::read_to_string(dir.join("node-2/api.pem")).unwrap();
        let (creds, validity) = renew_cert(
            &dir,
            &dir.join("node-2/node.toml"),
            Duration::from_secs(7200),
        )
        .unwrap();
        assert_eq!(creds.node_id, 2);
        assert!(validity.not_after_s - validity.not_before_s > 7000);
        assert!(dir.join("node-2/node.pem.old").exists());
        let api_after = std::fs::read_to_string(dir.join("node-2/api.pem")).unwrap();
        assert_ne!(api_before, api_after, "the API certificate was renewed too");
        assert!(api_after.contains("BEGIN CERTIFICATE") && api_after.contains("PRIVATE KEY"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn reference_ca(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("ca.pem")).unwrap()
    }
}
