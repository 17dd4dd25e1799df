//! `ferry`: the node daemon and the command line (see `ferry --help`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    ferry::cli::run(ferry::cli::Cli::parse())
}
