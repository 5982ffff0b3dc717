//! The `charter` command line: parse arguments, hand over to the command ([`cli`], one
//! file per command). Subcommands are documented in README.md and by `--help`.

#![warn(clippy::too_many_lines)] // bound in clippy.toml, as in lib.rs

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    cli::run(cli::Cli::parse())
}
