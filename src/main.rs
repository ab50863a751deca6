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
    meshlab::linkwatch::raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    // The peer runs as a task of the runtime rather than as the future `block_on` polls: a task
    // woken by another task on the same thread is simply queued, while waking `block_on`'s
    // future goes through the poller (an eventfd write and one more epoll_wait per wake-up).
    let result = runtime.block_on(async {
        match tokio::spawn(meshlab::run(cli.config)).await {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("the peer's task failed: {e}")),
        }
    });
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
