//! Three `ferry` daemons as separate processes, set up with `ferry cluster
//! init` and driven by the `ferry` CLI: create VMs, estimate and move one,
//! drain a node, resume it with failback, list what happened, stop the
//! daemons with SIGTERM. Every figure printed is measured in this run (by the
//! CLI's own output).
//!
//! `cargo run --example multi_process`
//!
//! So that it runs without `cargo build` of the binary first, this example
//! is its own `ferry`: started with `FERRY_EXAMPLE_AS_FERRY=1` it is exactly
//! the `ferry` command line (`ferry::cli`), and every daemon and command
//! below is a separate process running it.

use anyhow::{bail, Context};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AS_FERRY: &str = "FERRY_EXAMPLE_AS_FERRY";

fn ferry_command(config: Option<&Path>) -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(AS_FERRY, "1").stdin(Stdio::null());
    if let Some(c) = config {
        cmd.env("FERRY_CONFIG", c);
    }
    Ok(cmd)
}

/// Runs `ferry args…`, echoing the command and its output; its exit code.
fn ferry(config: Option<&Path>, args: &[&str]) -> anyhow::Result<(i32, String)> {
    println!("$ ferry {}", args.join(" "));
    let out = ferry_command(config)?.args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    println!();
    Ok((out.status.code().unwrap_or(-1), stdout))
}

fn free_api_port() -> u16 {
    let mut base = 21_000 + (std::process::id() % 10_000) as u16;
    while !(0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
        base += 11;
    }
    base
}

struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    if std::env::var_os(AS_FERRY).is_some() {
        return Ok(ferry::cli::run(ferry::cli::Cli::parse()));
    }
    let dir = std::env::temp_dir().join(format!("ferry-multi-process-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| std::process::ExitCode::SUCCESS)
}

fn run(dir: &Path) -> anyhow::Result<()> {
    let api_port = free_api_port().to_string();
    let dir_arg = dir.display().to_string();
    let (code, _) = ferry(
        None,
        &[
            "cluster",
            "init",
            "--nodes",
            "3",
            "--dir",
            &dir_arg,
            "--network",
            "mig-1=127.71.0.0/16",
            "--network",
            "mig-2=127.72.0.0/16",
            "--port",
            "7400",
            "--api-port",
            &api_port,
        ],
    )?;
    if code != 0 {
        bail!("ferry cluster init failed");
    }
    let configs: Vec<PathBuf> = (1..=3)
        .map(|i| dir.join(format!("node-{i}/node.toml")))
        .collect();
    let mut daemons = Daemons(Vec::new());
    for (i, config) in configs.iter().enumerate() {
        println!(
            "$ ferry node run --config {}   (node-{}, in the background)",
            config.display(),
            i + 1
        );
        let log = std::fs::File::create(dir.join(format!("node-{}.log", i + 1)))?;
        daemons.0.push(
            ferry_command(None)?
                .args(["node", "run", "--config"])
                .arg(config)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
    }
    println!();
    let c1 = Some(configs[0].as_path());
    let c3 = Some(configs[2].as_path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ferry_command(c1)?.args(["status", "--json"]).output()?;
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if status["voters"].as_array().is_some_and(|v| v.len() == 3) && status["nodes"] == 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster did not form; see the logs in {}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ferry(c1, &["status"])?;
    for (vm, node, mem, rate) in [
        ("web-1", "node-1", "256", "20000"),
        ("db-1", "node-1", "128", "5000"),
        ("cache-1", "node-2", "128", "40000"),
    ] {
        ferry(
            c1,
            &[
                "vm",
                "create",
                vm,
                "--node",
                node,
                "--memory-mib",
                mem,
                "--dirty-pages-per-sec",
                rate,
            ],
        )?;
    }
    ferry(c1, &["vm", "estimate", "web-1"])?;
    // Through node 3, a follower: the move is forwarded to web-1's owner.
    let (code, _) = ferry(c3, &["vm", "move", "web-1", "--to", "node-2"])?;
    println!("(exit code {code})\n");
    let (code, _) = ferry(c1, &["node", "pause", "node-1", "--drain"])?;
    println!("(exit code {code})\n");
    ferry(c1, &["node", "list"])?;
    ferry(c1, &["vm", "list"])?;
    ferry(c1, &["migrations", "list"])?;
    ferry(c1, &["node", "resume", "node-1", "--failback"])?;
    ferry(c1, &["vm", "list"])?;
    let (code, _) = ferry(c1, &["vm", "move", "nope", "--to", "node-2"])?;
    println!("(exit code {code}: not found)\n");

    for (i, child) in daemons.0.iter_mut().enumerate() {
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("kill -TERM")?;
        let t = Instant::now();
        let status = child.wait()?;
        println!(
            "node-{} stopped on SIGTERM: {status} after {:.0?}",
            i + 1,
            t.elapsed()
        );
    }
    Ok(())
}
