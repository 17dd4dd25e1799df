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

/// What the daemon says when its API serves plain HTTP: a loud warning when
/// that listens beyond loopback (tokens and VM data cross the network in
/// clear text), a quiet note otherwise; nothing over HTTPS.
pub fn plain_api_warning(api: &crate::config::ApiConfig) -> Option<String> {
    if api.tls {
        return None;
    }
    if api.listen.ip().is_loopback() {
        return Some(format!(
            "note: the API on {} serves plain HTTP (api.tls = false); loopback only",
            api.listen
        ));
    }
    Some(format!(
        "WARNING: the API listens on {} beyond loopback WITHOUT TLS (api.tls = false): \
         its tokens and everything it answers cross the network in clear text. \
         Remove api.tls = false to serve HTTPS with the cluster CA's certificate.",
        api.listen
    ))
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
                return Err(e);
            }
        };
        let handle = server.handle();
        let serving = tokio::spawn(server);
        let api = &node.config().api;
        println!(
            "ferry node {} (id {}) running; API and dashboard on {}://{}/",
            node.config().name,
            node.id(),
            if api.tls { "https" } else { "http" },
            api.listen
        );
        if let Some(warning) = plain_api_warning(api) {
            eprintln!("{warning}");
            tracing::warn!("{warning}");
        }
        // Say at start whether this node can run KVM guests; without usable
        // KVM it refuses them with the same reason.
        match ferry_vmm::kvm::probe() {
            Ok(caps) => println!("KVM: usable ({})", caps.summary()),
            Err(reason) => println!("KVM: not usable here ({reason}); KVM VMs will be refused"),
        }
        // And which accelerator its QEMU guests get, or why it has none.
        match ferry_vmm::qemu::gate::check() {
            Ok(qemu) => println!(
                "QEMU: {} with {} (FERRY_QEMU_ACCEL=kvm|tcg|auto chooses)",
                qemu.display(),
                ferry_actors::qemu::accelerator()
            ),
            Err(reason) => println!("QEMU: not usable here ({reason}); QEMU VMs will be refused"),
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
