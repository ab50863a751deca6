use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use meshlab::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Keygen) = cli.command {
        println!("{}", meshlab::noise::MeshKey::generate().to_hex());
        return ExitCode::SUCCESS;
    }
    if let Err(why) = cli.config.check() {
        Cli::command().error(clap::error::ErrorKind::ArgumentConflict, why).exit();
    }
    if let Err(why) = cli.config.mesh_key() {
        Cli::command().error(clap::error::ErrorKind::InvalidValue, format!("{why:#}")).exit();
    }
    meshlab::init_logging();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(meshlab::run(cli.config));
    // Do not wait for the blocking stdin reader: it may never return.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
