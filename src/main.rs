//! The `esmbed` command. All work happens in the library; this parses arguments, sets up
//! logging, and turns errors into messages and exit codes.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use esmbed::Error;

use cli::{Cli, Command};

/// Exit codes, documented in the README.
mod exit {
    /// Bad input: unreadable or invalid input, a bad record under --strict, duplicate ids.
    pub const BAD_INPUT: u8 = 3;
    /// Reading or writing files failed.
    pub const IO: u8 = 4;
    /// The model could not be loaded or run.
    pub const MODEL: u8 = 5;
    /// Invalid options, or an output in the way.
    pub const USAGE: u8 = 2;
    /// Interrupted (SIGINT/SIGTERM); rerun with --resume.
    pub const INTERRUPTED: u8 = 130;
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

fn exit_code(error: &anyhow::Error) -> u8 {
    if let Some(input) = error.downcast_ref::<esmbed::input::InputError>() {
        return match input {
            esmbed::input::InputError::Format { .. } => exit::BAD_INPUT,
            esmbed::input::InputError::Io { .. } => exit::IO,
        };
    }
    let Some(error) = error.downcast_ref::<Error>() else {
        return exit::USAGE;
    };
    match error {
        Error::Tokenize(_)
        | Error::InvalidSequence { .. }
        | Error::Strict { .. }
        | Error::DuplicateId { .. }
        | Error::Input(esmbed::input::InputError::Format { .. }) => exit::BAD_INPUT,
        Error::Io { .. }
        | Error::Remote { .. }
        | Error::Input(esmbed::input::InputError::Io { .. }) => exit::IO,
        Error::Model { .. }
        | Error::MissingTensor { .. }
        | Error::TensorShape { .. }
        | Error::Hub { .. }
        | Error::Candle(_) => exit::MODEL,
        Error::InvalidOption(_) | Error::OutputExists { .. } => exit::USAGE,
        Error::Interrupted { .. } => exit::INTERRUPTED,
    }
}
