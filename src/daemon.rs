//! `ferry node run`: one node as a long-running process — the node, its HTTP
//! API and dashboard, until SIGTERM or Ctrl-C, then a clean shutdown.

use crate::config::NodeConfig;
use crate::node::Node;
use anyhow::Context;
use std::path::Path;

/// Logs to stderr; `RUST_LOG` filters (default: Ferry at `info`, Raft's
/// own chatter at `warn`).
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Runs the node configured in `config_path` until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    init_logging();
    let config = NodeConfig::load(config_path)?;
    ferry_actors::local::run(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        let node = Node::start(config).await?;
        let server = match crate::api::server(&node) {
            Ok(s) => s,
            Err(e) => {
                node.shutdown().await;
                return Err(e).context(format!("binding the API to {}", node.config().api.listen));
            }
        };
        let handle = server.handle();
        let serving = tokio::spawn(server);
        println!(
            "ferry node {} (id {}) running; API and dashboard on http://{}/",
            node.config().name,
            node.id(),
            node.config().api.listen
        );
        // Say at start whether this node can run KVM guests; without usable
        // KVM it refuses them with the same reason.
        match ferry_vmm::kvm::probe() {
            Ok(caps) => println!("KVM: usable ({})", caps.summary()),
            Err(reason) => println!("KVM: not usable here ({reason}); KVM VMs will be refused"),
        }
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            r = serving => tracing::error!(result = ?r, "the API server stopped"),
        }
        handle.stop(true).await;
        node.shutdown().await;
        println!("ferry node {} stopped", node.config().name);
        Ok(())
    })?
}
