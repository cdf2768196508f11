//! The `kiln` binary: parse the command line, set up logging, run.

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// jemalloc, whose background thread gives freed memory back to the system
/// (glibc's malloc keeps what idle connections used in its per-thread arenas).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // First of all: nothing this process creates (data directory, sockets,
    // relay slots, images) is readable by other users.
    kiln_coordinator::secrets::modes::restrict_umask();
    let cli = kiln_coordinator::cli::Cli::parse();
    // The relay runs once per guest connection: no runtime, no logging, at once.
    if let kiln_coordinator::cli::Command::GuestRelay { socket, target, slots } = &cli.command {
        return match kiln_coordinator::cli::relay::run(socket, *target, slots.as_deref()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiln guest-relay: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("warning: jemalloc's background purging is off: {e}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: kiln_coordinator::cli::Cli) -> std::process::ExitCode {
    // The server logs what it does; client commands print results, and only warnings.
    let default = if matches!(cli.command, kiln_coordinator::cli::Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match kiln_coordinator::cli::run(cli).await {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
