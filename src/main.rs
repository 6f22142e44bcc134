//! The `courseview` binary: parse the command line, start telemetry, dispatch.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use courseview::cli::{self, Cli, Command};
use courseview::{shutdown, telemetry};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.global.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(run(cli));
    // Commands bound their own draining; a blocking call still stuck in a
    // client library must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Install the recorder before anything counts, so no early sample is lost.
    telemetry::prometheus();
    let token = shutdown::on_signal();
    match cli.command {
        Command::Project(args) => cli::project::run(cli.global, args, token).await,
        Command::Serve(args) => cli::serve::run(cli.global, args, token).await,
        Command::Dlq(command) => cli::dlq::run(cli.global, command).await,
        Command::Rebuild(args) => cli::rebuild::run(cli.global, args, token).await,
        Command::Status(args) => cli::status::run(cli.global, args, token).await,
        Command::Produce(args) => cli::produce::run(cli.global, args, token).await,
        Command::Token(args) => cli::token::run(&args),
    }
}
