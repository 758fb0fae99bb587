//! The `esmbed` command. All work happens in the library; this parses arguments, sets up
//! logging, and turns errors into messages and exit codes.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use esmbed::Error;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "esmbed=info",
        1 => "esmbed=debug",
        _ => "esmbed=trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let result = match cli.command {
        Command::Embed(args) => cli::embed::run(*args).map(|_| ()),
        Command::Score(args) => cli::score::run(*args),
        Command::Inspect(args) => cli::inspect::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Verify(args) => cli::verify::run(args),
        Command::Sql(args) => cli::sql::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("esmbed: error: {error:#}");
            ExitCode::from(exit_code(&error))
        }
    }
}

/// The exit code of a failure: from its kind ([`esmbed::ErrorKind::exit_code`], the README's
/// table). Errors that are not the library's come from argument checks in `cli/`: usage (2).
fn exit_code(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<Error>() {
        Some(error) => error.kind().exit_code(),
        None => 2,
    }
}
