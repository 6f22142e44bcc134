//! The `courseview` binary: parse the command line, start telemetry, dispatch.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use courseview::cli::{self, Cli, Command};
use courseview::{shutdown, telemetry};

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // Traces are exported as the role that sends them: courseview-project,
    // courseview-serve, …
    let service = format!("courseview-{}", cli.command.name());
    let _traces = telemetry::init_tracing(cli.global.log_format, &service)?;
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
        Command::Pause(args) => cli::pause::run(cli.global, args).await,
        Command::Resume(args) => cli::resume::run(cli.global, args).await,
        Command::Offsets(args) => cli::offsets::run(cli.global, args).await,
        Command::Status(args) => cli::status::run(cli.global, args, token).await,
        Command::Produce(args) => cli::produce::run(cli.global, args, token).await,
        Command::Token(args) => cli::token::run(&args),
    }
}

/// glibc gives each thread that allocates under contention an arena of its
/// own and keeps freed memory in each; with librdkafka's threads that grew
/// a worker's RSS with its run (81 → 66 MiB at 20 k events with two
/// arenas: PERFORMANCE.md). The Dockerfile and `scripts/run` set
/// `MALLOC_ARENA_MAX=2`; the binary now does so itself, so a worker started
/// any other way is bounded the same. Called before any thread starts, as
/// glibc requires; an operator's own `MALLOC_ARENA_MAX` wins.
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
