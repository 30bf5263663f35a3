//! The `weft` binary: parse the command line, set up logging, run the chosen role.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = weft::cli::Cli::parse();
    weft::telemetry::init_logging();
    let result = weft::app::run(cli);
    weft::telemetry::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "weft failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
