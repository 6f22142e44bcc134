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
/// `MALLOC_ARENA_MAX=2`; the binary does so itself, so a worker started
/// any other way is bounded the same.
///
/// glibc also raises its mmap threshold to the size of each large block
/// freed (up to 32 MiB), after which a fold's write buffers and librdkafka's
/// fetch buffers come from the arenas and leave them fragmented: a worker's
/// peak RSS grew with the length of its replay (76.8 MiB at 1 M events).
/// A fixed threshold of 128 KiB (glibc's starting one) keeps such blocks
/// in their own mappings, returned whole when freed: 59.8–64.9 MiB at
/// 1 M, the rate unchanged (PERFORMANCE.md).
///
/// Called before any thread starts, as glibc requires; an operator's own
/// `MALLOC_ARENA_MAX` or `MALLOC_MMAP_THRESHOLD_` wins.
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only sets an allocator parameter; no thread exists yet.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            }
        }
    }
}
