//! The `esmbed` command: all of it is [`esmbed::cli`], which the Python package runs too.

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(esmbed::cli::main(std::env::args_os()))
}
