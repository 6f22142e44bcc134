//! The `courseview` binary: parse the command line, start telemetry, dispatch.

use clap::Parser;
use courseview::cli::{self, Cli, Command};
use courseview::{shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.global.log_format);
    // Install the recorder before anything counts, so no early sample is lost.
    telemetry::prometheus();
    let token = shutdown::on_signal();
    match cli.command {
        Command::Project(args) => cli::project::run(cli.global, args, token).await,
        Command::Serve(args) => cli::serve::run(cli.global, args, token).await,
        Command::Dlq(command) => cli::dlq::run(cli.global, command).await,
        Command::Rebuild(args) => cli::rebuild::run(cli.global, args, token).await,
        Command::Status(args) => cli::status::run(cli.global, args).await,
        Command::Produce(args) => cli::produce::run(cli.global, args, token).await,
    }
}
