//! Ferry moves running virtual machines between the nodes of a cluster without
//! their clients noticing.
//!
//! This crate is what users and control planes touch: the `ferry` binary (the
//! node daemon and the CLI), the HTTP API and dashboard every node serves, and
//! [`Node`], the way a larger control plane starts a node in its own process
//! and drives it with the same operations the API offers.
//!
//! # Embedding a node
//!
//! Write the configuration files with [`config::init_cluster`] (what `ferry
//! cluster init` does) or by hand, then start a [`Node`] inside an actix
//! System (the actors need one) on a multi-threaded tokio runtime
//! ([`actors::local::run`] sets both up):
//!
//! ```no_run
//! use ferry::{config, requests, Node, NodeConfig};
//! use std::time::Duration;
//!
//! fn main() -> anyhow::Result<()> {
//!     let paths = config::init_cluster(&config::InitOptions::local("/tmp/ferry-cluster", 1))?;
//!     let config = NodeConfig::load(&paths[0])?;
//!     ferry::actors::local::run(async move {
//!         let node = Node::start(config).await?;
//!         node.wait_ready(Duration::from_secs(30)).await?;
//!         let vm = node.create_vm(requests::CreateVm::new("web-1")).await?;
//!         println!("{} runs on {}", vm.name, vm.owner_name);
//!         // Serve the HTTP API and dashboard too, if the control plane wants them.
//!         let server = ferry::api::server(&node)?;
//!         let handle = server.handle();
//!         tokio::spawn(server);
//!         handle.stop(true).await;
//!         node.shutdown().await;
//!         Ok(())
//!     })?
//! }
//! ```
//!
//! `examples/embedded.rs` runs three such nodes and moves a VM between them;
//! `examples/multi_process.rs` does the same with three `ferry` daemons driven
//! by the CLI.
//!
//! # Modules
//!
//! - [`node`]: [`Node`] and its operations; forwarding to the node that must act.
//! - [`api`]: the HTTP API (actix-web), event stream, metrics, OpenAPI, dashboard.
//! - [`cli`], [`client`]: the command line and its small HTTP client.
//! - [`config`]: `node.toml` and `ferry cluster init`.
//! - [`enroll`]: `ferry node add` and `renew-cert` (certificates from the cluster CA).
//! - [`daemon`]: `ferry node run`.
//! - [`views`], [`requests`], [`error`]: the shapes the API speaks.
//! - [`events`], [`peer`]: progress relayed between nodes; the control exchange.

pub mod api;
pub mod api_auth;
pub mod api_tls;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod enroll;
pub mod error;
pub mod events;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod requests;
pub mod views;

pub use config::NodeConfig;
pub use error::ApiError;
pub use node::Node;

pub use ferry_actors as actors;
pub use ferry_cluster as cluster;
pub use ferry_transport as transport;
pub use ferry_vmm as vmm;
