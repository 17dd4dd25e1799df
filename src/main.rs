//! `ferry`: the node daemon and the command line.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of running VMs between cluster nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy a running simulated guest live into a second one in this process
    /// and print what was measured.
    ///
    /// Example: ferry demo --memory-mib 512 --dirty-pages-per-sec 20000
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo {
            memory_mib,
            vcpus,
            dirty_pages_per_sec,
        } => {
            if memory_mib < 8 {
                eprintln!("error: --memory-mib must be at least 8");
                return std::process::ExitCode::from(2);
            }
            match ferry::demo::run(&ferry::demo::DemoConfig {
                memory_mib,
                vcpus,
                dirty_pages_per_sec,
            }) {
                Ok(outcome) => {
                    println!("{outcome}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
