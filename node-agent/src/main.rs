//! The `weft` binary: parse the command line, set up logging, run the chosen role.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The container runtime runs a CNI plugin by its `type`, with no arguments:
    // installed as `weft-cni`, this binary is the plugin.
    if std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n == weft::cni::install::PLUGIN_TYPE)
        })
        .unwrap_or(false)
    {
        return weft::cni::plugin_main();
    }
    let cli = weft::cli::Cli::parse();
    // `weft cni` as a plugin: stdout is the runtime's, so no logging set up.
    if let weft::cli::Command::Cni(weft::cli::CniArgs { command: None }) = cli.command {
        return weft::cni::plugin_main();
    }
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
