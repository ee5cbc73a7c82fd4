//! The `tollgate` binary: parse the command line, set up logging, the network namespace and the
//! runtime, then hand the command to [`cli::run`]. Each command family lives in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use tollgate::control::{exit, ControlError};

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging(args.log_json);
    if let Some(ns) = &args.netns {
        // Before the runtime exists, so every thread is created inside the namespace.
        if let Err(e) = tollgate::sys::enter_netns(ns) {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(cli::run(args.cmd)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<ControlError>())
                .map_or(exit::ERROR, ControlError::exit_code);
            ExitCode::from(code)
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
