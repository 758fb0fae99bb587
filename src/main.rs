//! The `esmbed` command. All work happens in the library; this parses arguments, sets up
//! logging, and turns errors into messages and exit codes.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use esmbed::{Error, ErrorKind};

use cli::{Cli, Command};

/// Exit codes, documented in the README.
mod exit {
    /// Bad input: unreadable or invalid input, a bad record under --strict, duplicate ids.
    pub const BAD_INPUT: u8 = 3;
    /// Reading or writing files failed.
    pub const IO: u8 = 4;
    /// The model could not be loaded or run (out of memory and device failures included).
    pub const MODEL: u8 = 5;
    /// Invalid options, or an output in the way.
    pub const USAGE: u8 = 2;
    /// Interrupted (SIGINT/SIGTERM); rerun with --resume.
    pub const INTERRUPTED: u8 = 130;
    /// A bug in esmbed (EX_SOFTWARE); please report it.
    pub const INTERNAL: u8 = 70;
}

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

/// The exit code of a failure, from its kind (the README's table). Errors that are not the
/// library's come from argument checks in `cli/`: usage.
fn exit_code(error: &anyhow::Error) -> u8 {
    let Some(error) = error.downcast_ref::<Error>() else {
        return exit::USAGE;
    };
    match error.kind() {
        ErrorKind::BadInput => exit::BAD_INPUT,
        ErrorKind::Io => exit::IO,
        ErrorKind::Model => exit::MODEL,
        ErrorKind::Usage => exit::USAGE,
        ErrorKind::Interrupted => exit::INTERRUPTED,
        ErrorKind::Internal => exit::INTERNAL,
    }
}
