//! The `charter` command line: parse arguments, hand over to the command ([`cli`], one
//! file per command). Subcommands are documented in README.md and by `--help`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    cli::run(cli::Cli::parse())
}
